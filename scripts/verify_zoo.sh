#!/usr/bin/env bash
# Run the MONAI Model Zoo's own ci/verify_bundle.py (full mode: directory, version and changelog, metadata
# schema, bundle properties, verify_net_in_out, TorchScript export and model.ts loading) on this bundle.
#
# The zoo's checkout stays OUTSIDE the repository: ZOO_DIR (default ~/.cache/asl_bundle/model-zoo), cloned
# there when absent and GitHub is reachable. The bundle is copied to a scratch models folder (verify_bundle
# writes models/verify_model.ts into the bundle it checks), with the two files the zoo's CI prepares:
# models/model_info.json ('{}') and <bundle>/eval/schema.json (SCHEMA_FILE, else downloaded from the URL in
# metadata.json's "schema").
# Without the zoo's code (CI has no GitHub access), run the local re-implementation of the same checks:
#   python -m pytest tests/test_zoo_style.py
# Usage: scripts/verify_zoo.sh [full|min]   (needs jsonschema; PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-full}"
PY="${PYTHON:-python}"
ZOO_DIR="${ZOO_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/asl_bundle/model-zoo}"
if [ ! -f "$ZOO_DIR/ci/verify_bundle.py" ]; then
    echo "fetching the model zoo's CI into $ZOO_DIR"
    if ! git clone --depth 1 https://github.com/Project-MONAI/model-zoo "$ZOO_DIR" >/dev/null 2>&1; then
        echo "cannot fetch Project-MONAI/model-zoo: run 'python -m pytest tests/test_zoo_style.py' instead" >&2
        exit 3
    fi
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/models"
cp -r asl_bundle "$WORK/models/asl_bundle"
find "$WORK/models/asl_bundle" \( -name __pycache__ -o -name checkpoint.pt -o -name verify_model.ts \) -prune \
    -exec rm -rf {} +
echo '{}' > "$WORK/models/model_info.json"
mkdir -p "$WORK/models/asl_bundle/eval"
SCHEMA_URL="$("$PY" -c "import json; print(json.load(open('asl_bundle/configs/metadata.json'))['schema'])")"
if [ -n "${SCHEMA_FILE:-}" ]; then
    cp "$SCHEMA_FILE" "$WORK/models/asl_bundle/eval/schema.json"
else
    "$PY" -c "from monai.apps.utils import download_url; import sys; download_url(sys.argv[1], sys.argv[2])" \
        "$SCHEMA_URL" "$WORK/models/asl_bundle/eval/schema.json"
fi
if [ ! -f "$WORK/models/asl_bundle/models/model.pt" ]; then
    echo "no models/model.pt: the zoo requires trained weights (scripts/train_default.sh)" >&2
    exit 1
fi
echo "model zoo CI at $(cat "$ZOO_DIR/COMMIT" 2>/dev/null || git -C "$ZOO_DIR" rev-parse HEAD 2>/dev/null || echo '?')"
cd "$ZOO_DIR"
CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-}" "$PY" ci/verify_bundle.py -b asl_bundle -p "$WORK/models" -m "$MODE"
