#!/usr/bin/env bash
# Export the trained weights (models/model.pt) to TorchScript with MONAI's documented command, so the
# bundle's metadata.json and inference.json travel inside model.ts (as extra/metadata.json and
# extra/inference.json: what MONAI Deploy's bundle operator and load_net_with_metadata read).
# With --onnx it also writes models/model.onnx and checks it with ONNX Runtime (needs onnx, onnxscript,
# onnxruntime: not project dependencies).
# Usage: scripts/export_model.sh [--bundle_root DIR] [--ckpt FILE] [--out FILE] [--onnx]
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=asl_bundle
CKPT=""
OUT=""
ONNX=0
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle_root) BUNDLE="$2"; shift 2 ;;
        --ckpt) CKPT="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --onnx) ONNX=1; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
CKPT="${CKPT:-$BUNDLE/models/model.pt}"
OUT="${OUT:-$BUNDLE/models/model.ts}"
PY="${PYTHON:-python}"
if [ ! -f "$CKPT" ]; then
    echo "no checkpoint at $CKPT: train first (scripts/train_default.sh) or pass --ckpt" >&2
    exit 1
fi
mkdir -p "$(dirname "$OUT")"
# the bundle's own package (asl_enhance) must be importable when the config is parsed
export PYTHONPATH="$BUNDLE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m monai.bundle ckpt_export network_def \
    --filepath "$OUT" \
    --ckpt_file "$CKPT" \
    --meta_file "$BUNDLE/configs/metadata.json" \
    --config_file "$BUNDLE/configs/inference.json" \
    --bundle_root "$BUNDLE"
echo "TorchScript: $OUT"
if [ "$ONNX" = 1 ]; then
    ONNX_OUT="${OUT%.ts}.onnx"
    # the input channels the network takes (deltaM, guide, noise twin, twin flag), from the bundle's metadata
    CHANNELS=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['network_data_format']['inputs']['image']['num_channels'])" "$BUNDLE/configs/metadata.json")
    # dynamic spatial axes: the network is fully convolutional and takes any volume size
    "$PY" -m monai.bundle onnx_export network_def \
        --filepath "$ONNX_OUT" \
        --ckpt_file "$CKPT" \
        --meta_file "$BUNDLE/configs/metadata.json" \
        --config_file "$BUNDLE/configs/inference.json" \
        --bundle_root "$BUNDLE" \
        --input_shape "[1, $CHANNELS, 32, 32, 8]" \
        --use_trace true \
        --converter_kwargs "{'dynamic_axes': {'x': {0: 'batch', 2: 'x', 3: 'y', 4: 'z'}}, 'input_names': ['x'], 'output_names': ['pred'], 'dynamo': False}"
    "$PY" - "$ONNX_OUT" "$OUT" "$CHANNELS" <<'PYEOF'
"""Compare ONNX Runtime with the TorchScript export on a volume of another size than the trace's."""
import sys

import numpy as np
import onnxruntime as ort
import torch

onnx_path, ts_path, channels = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = torch.rand(1, channels, 24, 20, 6)
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
want = torch.jit.load(ts_path, map_location="cpu")(x).detach().numpy()
err = float(np.abs(got - want).max())
print(f"ONNX Runtime vs TorchScript: max abs difference {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
PYEOF
    echo "ONNX: $ONNX_OUT"
fi
