"""Score training runs' checkpoints, the best-validation pick and the end of the schedule, on the
real scan and a simulated split, with the benchmark's own loading, grouping and model code.

Usage: python studies/seed_study/score_checkpoints.py THREADS REAL_DIR SIM_DIR OUT.json RUN_DIR[:overlay.json] ...

Each RUN_DIR is a ``--ckpt_dir`` of train.json: ``model_best_val.pt`` (or ``model.pt`` of runs made
with ``keep_weights: "best"``) and ``checkpoint.pt`` (its ``model`` entry, the last epoch). Prints and
writes, per checkpoint and k = 1-4, the median noise-corrected NMSE over 10 disjoint groups of the
real scan, and the median NMSE against the truth and output level ratio over the simulated series
(first k pairs), plus the plain k-pair mean for reference. Used for the seed study in the model card.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

import asl_bench.core as bench

KS = (1, 2, 3, 4)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two files hold the same network (``model.pt`` of a run that never validated is its last epoch)."""
    sa, sb = bench.load_weights(a), bench.load_weights(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)


def checkpoints(run_spec: str) -> list[bench.Model]:
    """The best-validation and last-epoch networks of one run (``DIR`` or ``DIR:overlay.json``)."""
    run, *overlays = run_spec.split(":")
    configs = "".join(f":{c}" for c in ([str(bench.INFERENCE_CONFIG), *overlays] if overlays else []))
    last = Path(run) / "checkpoint.pt"
    best = Path(run) / "model_best_val.pt"
    if not best.exists():  # keep_weights "best": model.pt is the pick; "last": model.pt is the last epoch
        best = Path(run) / "model.pt"
        if best.exists() and last.exists() and same_weights(best, last):
            best = Path(run) / "no_validation_pick"  # the run never validated: no pick to score
    found = [(which, path) for which, path in (("best", best), ("last", last)) if path.exists()]
    specs = [f"{Path(run).name}_{which}={path}{configs}" for which, path in found]
    return bench.build_models(specs) if specs else []


def estimate(model: bench.Model | None, prep: dict) -> np.ndarray:
    """The model's output, or the plain k-pair mean for ``None``."""
    return prep["input_mean"] if model is None else bench.run_model(model, prep)


def score(model: bench.Model | None, real_cases: dict, sim_cases: dict) -> dict[str, float]:
    row = {}
    for k in KS:
        real = [bench.primary_error(s, p, estimate(model, p)) for s, p in real_cases[k]]
        if real:
            row[f"real_k{k}"] = float(np.median(real))
        outputs = [(s, p, estimate(model, p)) for s, p in sim_cases[k]]
        if outputs:
            row[f"sim_k{k}"] = float(np.median([bench.primary_error(s, p, e) for s, p, e in outputs]))
            levels = [e[s.brain].mean() / s.truth[s.brain].mean() for s, _, e in outputs]
            row[f"sim_level_k{k}"] = float(np.median(levels))
    return row


def main() -> None:
    if len(sys.argv) < 6:
        raise SystemExit(__doc__)
    torch.set_num_threads(int(sys.argv[1]))
    real_dir, sim_dir, out = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    real = bench.load_series(real_dir, simulated=False, limit=None)
    sim = bench.load_series(sim_dir, simulated=True, limit=None)
    groups = {k: [(s, g) for s in real for g in bench.groups_for(s.num_pairs, k, bench.MAX_REAL_GROUPS)] for k in KS}
    real_cases = {k: [(s, bench.prepare(s, g)) for s, g in groups[k]] for k in KS}
    sim_cases = {k: [(s, bench.prepare(s, list(range(k)))) for s in sim if s.num_pairs > k] for k in KS}
    models: list[bench.Model | None] = [m for spec in sys.argv[5:] for m in checkpoints(spec)] + [None]
    results = {}
    for model in models:
        name = "mean" if model is None else model.name
        results[name] = score(model, real_cases, sim_cases)
        print(name, " ".join(f"{key} {v:.4f}" for key, v in results[name].items()), flush=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
