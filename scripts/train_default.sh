#!/usr/bin/env bash
# Train the shipped default model from scratch on the CPU: simulate the training cohort, then run
# the bundle's train.json with the noise-free target the simulator provides. Writes
# asl_bundle/models/model.pt (the network after the last epoch; the best-validation checkpoint goes to
# model_best_val.pt beside it) and TensorBoard logs under runs/train.
# Extra arguments are passed to the runner (e.g. --max_epochs 5 for a short trial).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh data
set -euo pipefail
DATA=data/train
if [ ! -f "$DATA/dataset_description.json" ]; then
    python scripts/generate_data.py --output_dir "$DATA" --num_subjects 64 --num_pairs 8 --seed 0 --first_subject 1
fi
python -m monai.bundle run --config_file asl_bundle/configs/train.json --bundle_root asl_bundle \
    --dataset_dir "$DATA" --truth_dir "$DATA/derivatives/simulation" --target truth "$@"
