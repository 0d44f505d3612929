#!/usr/bin/env python
"""The 2D refinement chosen on the real cohort's validation subjects: Dice, folding and seconds of each setting.

    python benchmarks/refine_2d_sweep.py [--variants NAME ...] [--pairs cohort|slices]
        [--ckpt bundle/models/2d/model.pt] [--threads 2] [--work DIR]

The shipped 2D model (or ``--ckpt``) registers the 20 validation subjects of ``bundle/datalists/oasis2d_train.json``
in the ring the training's validation uses (subject ``i`` moving onto subject ``i + 1``, the pairs of
``validation_pairs.py --cohort2d``), once per refinement setting, through ``batch_inference`` (one process a
setting; the affine stage, the network and the writer as a user runs them). Each pair is scored by the bundle's own
metrics over the structures of ``eval_labels.json`` present in both. No cohort-test, ``oasis2d/`` or ``oasis3d/``
test subject is read. ``--pairs slices`` scores instead the labelled training subjects v and w (``oasis3d_train``)
at axial slices 90-110, both directions (``validation_pairs.py --slices2d``): nearer the ``oasis2d/`` test slices'
position and processing than the cohort's slice 109. Printed per setting: mean Dice (lowest pair), mean folded-voxel
%, seconds a pair.

Why: the 0.17.0 2D refinement (levels 2, 1 with 40, 10 iterations, LNCC window 5, λ 1, learning rate 0.1) was set
for the earlier 2D model trained on random label maps; with the model trained on the real cohort it scored no higher
than the network alone. An earlier sweep (docs/experiments.md, 0.16.0) varied λ and the iterations at window 5; this
one adds the LNCC window and the learning rate.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from validation_pairs import DEFAULT_DATA, write_cohort2d_validation_pairs, write_slice_pairs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = "['bundle/configs/inference.yaml','bundle/configs/batch_inference.yaml']"
DATALIST = REPO / "bundle" / "datalists" / "oasis2d_train.json"
EVAL_LABELS = REPO.parent / "shared" / "data" / "oasis3d" / "eval_labels.json"

# name -> overrides of inference.yaml. Every setting is spelled out from the 0.17.0 2D refinement (EARLIER: levels
# 2, 1 with 40, 10 iterations, window 5, λ 1, learning rate 0.1), so the table means the same whatever the default is.
EARLIER = {"refine_kernel_size": 5, "refine_learning_rate": 0.1}
VARIANTS: dict[str, dict] = {
    "network alone": {"refine_iterations": 0},
    "0.17.0 default (levels 2,1; 40,10 it; window 5; λ 1; lr 0.1)": EARLIER,
    "window 9 (the training's LNCC)": {**EARLIER, "refine_kernel_size": 9},
    "λ 2": {**EARLIER, "refine_regularization_weight": 2.0},
    "λ 4": {**EARLIER, "refine_regularization_weight": 4.0},
    "window 9, λ 2": {**EARLIER, "refine_kernel_size": 9, "refine_regularization_weight": 2.0},
    "2 mm level only (40 it)": {**EARLIER, "refine_levels": "[2]", "refine_iterations": "[40]"},
    "half the iterations (20,5)": {**EARLIER, "refine_iterations": "[20,5]"},
    "learning rate 0.05": {**EARLIER, "refine_learning_rate": 0.05},
    "no affine stage, network alone": {"affine": "false", "refine_iterations": 0},
    "window 9, λ 0.5": {**EARLIER, "refine_kernel_size": 9, "refine_regularization_weight": 0.5},
    "window 9, twice the iterations (80,20)": {**EARLIER, "refine_kernel_size": 9, "refine_iterations": "[80,20]"},
    "window 9, learning rate 0.2": {**EARLIER, "refine_kernel_size": 9, "refine_learning_rate": 0.2},
    "window 13": {**EARLIER, "refine_kernel_size": 13},
    "window 9, levels 4,2,1 (40,40,10 it)": {
        **EARLIER,
        "refine_kernel_size": 9,
        "refine_levels": "[4,2,1]",
        "refine_iterations": "[40,40,10]",
    },
    "no affine stage, window 9": {**EARLIER, "affine": "false", "refine_kernel_size": 9},
    "window 17": {**EARLIER, "refine_kernel_size": 17},
    "window 21 (0.18.0 default)": {**EARLIER, "refine_kernel_size": 21},
    "window 13, learning rate 0.2": {"refine_kernel_size": 13, "refine_learning_rate": 0.2},
    "window 13, twice the iterations (80,20)": {**EARLIER, "refine_kernel_size": 13, "refine_iterations": "[80,20]"},
    "window 13, learning rate 0.2, λ 0.3": {
        "refine_kernel_size": 13,
        "refine_learning_rate": 0.2,
        "refine_regularization_weight": 0.3,
    },
}


def run_variant(pairs: Path, out: Path, overrides: dict, ckpt: Path, threads: int) -> dict:
    """One ``batch_inference`` process over ``pairs``; returns the summary with the lowest pair and mean seconds."""
    command = [sys.executable, "-m", "monai.bundle", "run", "batch_inference", "--config_file", CONFIGS]
    settings = {
        "pairs": pairs,
        "output_dir": out,
        "outputs": "metrics",
        "overwrite": "true",
        "num_workers": 0,
        "ckpt_path": ckpt,
        **({"eval_label_ids": EVAL_LABELS} if EVAL_LABELS.is_file() else {}),
        **overrides,
    }
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{(process.stdout + process.stderr)[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "summary.csv", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    summary["lowest_dice"] = min(float(r["mean_dice"]) for r in rows)
    summary["seconds_per_pair"] = sum(float(r["seconds_load_to_write"]) for r in rows) / len(rows)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names of VARIANTS (default: all)")
    parser.add_argument("--ckpt", type=Path, default=REPO / "bundle" / "models" / "2d" / "model.pt")
    parser.add_argument(
        "--pairs",
        choices=["cohort", "slices"],
        default="cohort",
        help="cohort: the cohort's validation ring; slices: v <-> w slices near the test slices' position",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if not DATALIST.is_file() or not (REPO.parent / "shared" / "data" / "oasis2d_train").is_dir():
        raise SystemExit("the real 2D cohort is not there: ../shared/data/oasis2d_train (see ../shared/data/README.md)")
    work = args.work or Path(tempfile.mkdtemp(prefix="refine_2d_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.pairs == "cohort":
        pairs, kind = Path(write_cohort2d_validation_pairs(str(work))), "cohort validation"
    else:
        pairs, kind = Path(write_slice_pairs(str(work), DEFAULT_DATA)), "v <-> w slice"
    with open(pairs, encoding="utf-8") as stream:
        count = sum(1 for _ in stream) - 1
    print(f"{count} {kind} pairs, model {args.ckpt}, {args.threads} threads")
    print("| setting | mean Dice (lowest pair) | folded % | seconds a pair, load to write |")
    print("|---|---|---|---|")
    results = {}
    for index, name in enumerate(args.variants):
        summary = run_variant(pairs, work / f"variant_{index}", VARIANTS[name], args.ckpt, args.threads)
        results[name] = summary
        print(
            f"| {name} | {summary['mean_dice']:.4f} ({summary['lowest_dice']:.3f}) "
            f"| {100 * summary['mean_folding_fraction']:.3f} | {summary['seconds_per_pair']:.2f} |",
            flush=True,
        )
    first = next(iter(results.values()))
    print(f"no registration: mean Dice {first['identity_mean_dice']:.4f}")
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
