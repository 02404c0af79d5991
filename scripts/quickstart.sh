#!/usr/bin/env bash
# One command from a fresh clone: install, make (or reuse) the small default BIDS-ASL data set,
# enhance it with the shipped weights from 2 of its 8 pairs, and say where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh data
set -euo pipefail
DATA=data/default
OUT=outputs/default
if [ ! -f "$DATA/dataset_description.json" ]; then
    asl-simulate --output_dir "$DATA" --num_subjects 3 --num_pairs 8 --first_subject 91 --seed 2024
fi
python -m monai.bundle run --config_file asl_bundle/configs/inference.json --bundle_root asl_bundle \
    --dataset_dir "$DATA" --output_dir "$OUT" --num_pairs 2 --overwrite true
echo
echo "Input data set:       $(pwd)/$DATA"
echo "Enhanced deltaM:      $(find "$(pwd)/$OUT" -name '*_desc-enhanced_deltam.nii.gz' | sort | head -n 1) (and the other series)"
echo "Comparison figures:   $(find "$(pwd)/$OUT" -name '*_qc.png' | sort | tr '\n' ' ')"
