#!/usr/bin/env bash
# Seed study of the shipped training command, made for a machine with a GPU and many cores (it runs
# on a CPU too, slowly): simulate the training cohort with parallel generators (each subject is
# drawn from (seed, subject), so the files equal those of scripts/train_default.sh) and the
# benchmark's validation split, train SEEDS at once, then score every run's best-validation and
# last-epoch weights with studies/seed_study/score_checkpoints.py on REAL_DIR and the validation split.
# Environment: SEEDS ("1 2 3 4"), EPOCHS (50), EXTRA ("name|seed|epochs|overlay.json-or--" ...,
# other runs beside the seeds), REAL_DIR (.cache/real/ds000240), OUT (runs/seed_study),
# PYTHON (python). Used for the seed study in studies/seed_study/README.md (0.5.0).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/seed_study}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
SEEDS=${SEEDS:-"1 2 3 4"}
EPOCHS=${EPOCHS:-50}
generate() {  # DIR SEED FIRST COUNT PER
    local f
    for ((f = $3; f < $3 + $4; f += $5)); do
        asl-simulate --output_dir "$1" --num_subjects $(($5 < $3 + $4 - f ? $5 : $3 + $4 - f)) \
            --num_pairs 8 --seed "$2" --first_subject "$f" >>"$OUT/gen.log" 2>&1 &
    done
}
[ -f data/train/dataset_description.json ] || generate data/train 0 1 64 4
[ -f data/bench_val/dataset_description.json ] || generate data/bench_val 1 301 12 3
wait
train() {  # NAME SEED EPOCHS CONFIG
    "$PY" -m monai.bundle run --config_file "$4" --bundle_root asl_bundle --dataset_dir data/train \
        --truth_dir data/train/derivatives/simulation --target truth --seed "$2" --max_epochs "$3" \
        --ckpt_dir "$OUT/$1" --output_dir "$OUT/$1" >"$OUT/train_$1.log" 2>&1 &
}
RUNS=()
for s in $SEEDS; do
    train "s$s" "$s" "$EPOCHS" asl_bundle/configs/train.json
    RUNS+=("$OUT/s$s")
done
for x in ${EXTRA:-}; do
    IFS='|' read -r name seed epochs overlay <<<"$x"
    if [ "$overlay" = "-" ]; then
        train "$name" "$seed" "$epochs" asl_bundle/configs/train.json
        RUNS+=("$OUT/$name")
    else
        train "$name" "$seed" "$epochs" "['asl_bundle/configs/train.json','$overlay']"
        RUNS+=("$OUT/$name:$overlay")
    fi
done
wait
for log in "$OUT"/train_*.log; do
    echo "$log: $(grep -a "Key metric" "$log" | tail -1)"
done
"$PY" studies/seed_study/score_checkpoints.py "$(nproc)" "${REAL_DIR:-.cache/real/ds000240}" data/bench_val "$OUT/scores.json" "${RUNS[@]}"
