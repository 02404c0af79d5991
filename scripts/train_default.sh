#!/usr/bin/env bash
# Train the shipped default model from scratch on the CPU: simulate the training cohort, then run
# the bundle's train.json with the noise-free target the simulator provides. Writes runs/train_default/
# (model.pt: the network after the last epoch; model_best_val.pt: the best validation; TensorBoard logs).
# The shipped weights are replaced only as an explicit step, printed at the end.
# Extra arguments are passed to the runner (e.g. --max_epochs 5 for a short trial).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh data
set -euo pipefail
DATA=data/train
RUN=${RUN:-runs/train_default}
if [ ! -f "$DATA/dataset_description.json" ]; then
    asl-simulate --output_dir "$DATA" --num_subjects 64 --num_pairs 8 --seed 0 --first_subject 1
fi
python -m monai.bundle run --config_file asl_bundle/configs/train.json --bundle_root asl_bundle \
    --dataset_dir "$DATA" --truth_dir "$DATA/derivatives/simulation" --target truth --output_dir "$RUN" "$@"
echo
echo "Trained weights: $RUN/model.pt"
echo "To ship them:    cp $RUN/model.pt asl_bundle/models/model.pt && bash scripts/export_model.sh"
