#!/usr/bin/env bash
# Noise2Noise fine-tuning of the shipped weights on one fold's real training scans (study only).
# usage: bash studies/real_n2n/finetune_fold.sh FOLD REPEAT [extra overrides]; writes runs/real_n2n/FOLD/model.pt
set -euo pipefail
FOLD=$1; REPEAT=$2; shift 2
OUT=runs/real_n2n/${FOLD}${TAG:-}
python -m monai.bundle run --config_file "['asl_bundle/configs/train.json','asl_bundle/configs/finetune.json']" \
    --bundle_root asl_bundle --dataset_dir data/real_n2n/$FOLD/train --output_dir $OUT --ckpt_dir $OUT \
    --partitions '$[@datalist, @datalist]' --train#dataset#data "\$@partitions[0] * $REPEAT" \
    --keep_weights last --max_epochs 10 --val_interval 5 --val_num_pairs '[2]' "$@"
