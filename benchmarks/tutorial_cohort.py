"""The tutorial's analyses on the real 2D cohort (``../shared/data/oasis2d_train``, split by
``bundle/datalists/oasis2d_train.json``): limited data, regularisation, semi-supervision and amortised versus
per-pair optimisation, each printing its table and writing its figure. Run through ``benchmarks/tutorial.py``:

    python benchmarks/tutorial.py cohort-limited-data    # 2 ... 365 training subjects, the same iterations each
    python benchmarks/tutorial.py cohort-regularization  # λ over two decades: Dice, folding, std log|J|
    python benchmarks/tutorial.py cohort-semi-supervised # a Dice loss on some structures: seen against unseen
    python benchmarks/tutorial.py cohort-amortized       # network alone / + refinement / refinement from identity

Every model is trained from scratch through ``train.yaml + oasis2d.yaml`` on (a nested subset of) the datalist's
training section with ``--cohort_epochs`` x 160 pairs, and scored by ``evaluate.yaml`` on its cohort-test section
(20 held-out subjects, the ring of ``pairs.test``), over the structures of ``eval_labels.json`` present in both. The
validation and cohort-test subjects are the same for every model; no ``oasis2d/`` or ``oasis3d/`` test subject is
read. ``cohort-amortized`` uses the shipped 2D model and ``batch_inference`` over the same 20 pairs (one process a
variant; seconds are each pair's registration, load to write, as ``summary.csv`` reports them).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COHORT_DATALIST = REPO / "bundle" / "datalists" / "oasis2d_train.json"
TRAINING = [str(CONFIGS / "train.yaml"), str(CONFIGS / "oasis2d.yaml")]
TRAIN_SIZES = [2, 5, 10, 20, 50, 100, 365]  # pairwise training needs two subjects: 1 has no pair to learn from
LAMBDAS = [0.1, 0.3, 1.0, 3.0, 10.0]
# semi-supervised: the Dice loss sees the cortex, white matter and lateral ventricles (both sides); the deep grey
# matter, hippocampus, amygdala, ventral DC, ... are never in the loss
OBSERVED = [2, 3, 4, 41, 42, 43]
# from scratch: train.yaml's 2D step (oasis2d.yaml's 0.001 is for continuing from the shipped model)
FROM_SCRATCH = {"learning_rate": 0.003}
AMORTIZED_VARIANTS = {
    "network alone": {"refine_iterations": 0},
    "network + refinement (default)": {},
    "refinement from the identity (default schedule)": {"network_passes": 0},
    "refinement from the identity, 5x iterations": {"network_passes": 0, "refine_iterations": "[200,50]"},
}

Bundle = Callable[[str, list, dict, int], str]
TrainAndTest = Callable[[Path, list, int, int, dict], dict]


def cohort_datalist(folder: Path, size: int | None = None, datalist: Path = COHORT_DATALIST) -> Path:
    """``datalist`` with absolute paths (it can then live anywhere), keeping only its first ``size`` training
    subjects (nested sets: every smaller set is inside the larger ones); validation, test and the test pairs
    unchanged. Returns the written file."""
    content = json.loads(Path(datalist).read_text())
    base = Path(datalist).parent

    def absolute(value):
        if isinstance(value, str):
            return str((base / value).resolve())
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, dict):
            return {k: absolute(v) for k, v in value.items()}
        return value

    content = {key: (value if key == "description" else absolute(value)) for key, value in content.items()}
    if size is not None:
        if not 2 <= size <= len(content["training"]):
            raise ValueError(f"training-set size {size} outside [2, {len(content['training'])}]")
        content["training"] = content["training"][:size]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("datalist.json" if size is None else f"datalist_train{size}.json")
    path.write_text(json.dumps(content, indent=1))
    return path


def _eval_labels(data: Path) -> dict:
    labels = data / "oasis3d" / "eval_labels.json"
    return {"eval_label_ids": labels} if labels.is_file() else {}


def _require_cohort(data: Path) -> None:
    if not (data / "oasis2d_train").is_dir():
        raise SystemExit(f"the real 2D cohort is not there: {data / 'oasis2d_train'} (see ../shared/data/README.md)")


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    print(f"wrote {path}")


def limited_data(work: Path, threads: int, epochs: int, data: Path, train_and_test: TrainAndTest, figures: Path):
    """Dice on the cohort test pairs against the training-set size (VoxelMorph TMI 2019, Fig. 9 on real slices)."""
    _require_cohort(data)
    results = {}
    for size in TRAIN_SIZES:
        datalist = cohort_datalist(work / "cohort_datalists", size)
        overrides = {"datalist": datalist, **FROM_SCRATCH, **_eval_labels(data)}
        results[str(size)] = train_and_test(work / f"cohort_train_{size}", TRAINING, threads, epochs, overrides)
    first = next(iter(results.values()))
    print(f"| training subjects | mean Dice ({first['pairs']} cohort-test pairs) | folded voxels % | std log det J |")
    print("|---|---|---|---|")
    for size, summary in results.items():
        print(
            f"| {size} | {summary['registered_mean_dice']:.3f} | {100 * summary['registered_folding_fraction']:.3f} "
            f"| {summary['registered_std_log_jacobian']:.3f} |"
        )
    print(f"no registration: mean Dice {first['identity_mean_dice']:.3f}")
    sizes = [int(size) for size in results]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.semilogx(sizes, [r["registered_mean_dice"] for r in results.values()], "o-", label="registered")
    axis.axhline(first["identity_mean_dice"], color="0.6", linestyle="--", label="no registration")
    axis.minorticks_off()
    axis.set_xticks(sizes)
    axis.set_xticklabels([str(size) for size in sizes])
    axis.set_xlabel("training subjects (real OASIS slices)")
    axis.set_ylabel(f"mean Dice, {first['pairs']} test pairs")
    axis.legend()
    axis.set_title(f"Limited training data, real slices ({epochs} epochs x 160 pairs each)")
    _save(figure, figures / "tutorial_cohort_limited_data.png")
    return results


def regularization(work: Path, threads: int, epochs: int, data: Path, train_and_test: TrainAndTest, figures: Path):
    """Dice, folded voxels and std log|J| on the cohort test pairs against λ, all training subjects."""
    _require_cohort(data)
    datalist = cohort_datalist(work / "cohort_datalists")
    results = {}
    for weight in LAMBDAS:
        overrides = {"datalist": datalist, "regularization_weight": weight, **FROM_SCRATCH, **_eval_labels(data)}
        folder = work / f"cohort_lambda_{weight:g}"
        results[f"{weight:g}"] = train_and_test(folder, TRAINING, threads, epochs, overrides)
    print("| λ (bending energy) | mean Dice | folded voxels % | std log det J |")
    print("|---|---|---|---|")
    for weight, summary in results.items():
        print(
            f"| {weight} | {summary['registered_mean_dice']:.3f} | {100 * summary['registered_folding_fraction']:.3f} "
            f"| {summary['registered_std_log_jacobian']:.3f} |"
        )
    identity = next(iter(results.values()))["identity_mean_dice"]
    print(f"no registration: mean Dice {identity:.3f}")
    weights = [float(w) for w in results]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.semilogx(weights, [r["registered_mean_dice"] for r in results.values()], "o-", label="mean Dice")
    axis.axhline(identity, color="0.6", linestyle="--", label="Dice, no registration")
    axis.set_xlabel("λ (bending energy weight)")
    axis.set_ylabel("mean Dice")
    other = axis.twinx()
    other.semilogx(
        weights, [r["registered_std_log_jacobian"] for r in results.values()], "s-", color="C3", label="std log|J|"
    )
    other.set_ylabel("std log|J|", color="C3")
    axis.legend(loc="lower left")
    axis.set_title(f"Regularisation, real slices ({epochs} epochs x 160 pairs each)")
    _save(figure, figures / "tutorial_cohort_regularization.png")
    return results


def semi_supervised(work: Path, threads: int, epochs: int, data: Path, train_and_test: TrainAndTest, figures: Path):
    """VoxelMorph's observed/unobserved experiment (MedIA 2019) on real slices: a Dice loss on ``OBSERVED`` only."""
    _require_cohort(data)
    datalist = cohort_datalist(work / "cohort_datalists")
    variants = {
        "unsupervised": {},
        "Dice loss on WM, cortex, ventricles": {"label_weight": 1.0, "train_label_ids": str(OBSERVED)},
    }
    results = {}
    for name, options in variants.items():
        folder = work / ("cohort_semi_" + ("unsupervised" if not options else "observed"))
        overrides = {"datalist": datalist, **FROM_SCRATCH, **_eval_labels(data), **options}
        summary = train_and_test(folder, TRAINING, threads, epochs, overrides)
        per_label = {int(k): v for k, v in summary["registered_dice_per_label"].items()}
        identity = {int(k): v for k, v in summary["identity_dice_per_label"].items()}
        seen = [k for k in per_label if k in OBSERVED]
        unseen = [k for k in per_label if k not in OBSERVED]
        results[name] = {
            "observed": float(np.mean([per_label[k] for k in seen])),
            "unobserved": float(np.mean([per_label[k] for k in unseen])),
            "identity_observed": float(np.mean([identity[k] for k in seen])),
            "identity_unobserved": float(np.mean([identity[k] for k in unseen])),
            "observed_labels": seen,
            "unobserved_labels": unseen,
            "folded_percent": 100 * summary["registered_folding_fraction"],
            "pairs": summary["pairs"],
        }
    first = next(iter(results.values()))
    print(
        f"| model | Dice, structures in the loss ({len(first['observed_labels'])}) "
        f"| Dice, structures never in the loss ({len(first['unobserved_labels'])}) | folded % |"
    )
    print("|---|---|---|---|")
    print(f"| no registration | {first['identity_observed']:.3f} | {first['identity_unobserved']:.3f} | 0.000 |")
    for name, r in results.items():
        print(f"| {name} | {r['observed']:.3f} | {r['unobserved']:.3f} | {r['folded_percent']:.3f} |")
    names = ["no registration"] + list(results)
    observed = [first["identity_observed"]] + [r["observed"] for r in results.values()]
    unobserved = [first["identity_unobserved"]] + [r["unobserved"] for r in results.values()]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(names))
    axis.bar(x - 0.2, observed, 0.4, label="structures in the loss")
    axis.bar(x + 0.2, unobserved, 0.4, label="structures never in the loss")
    axis.set_xticks(x)
    axis.set_xticklabels(names)
    axis.set_ylim(0, 1)
    axis.set_ylabel(f"mean Dice, {first['pairs']} test pairs")
    axis.legend(loc="lower right")
    axis.set_title("Semi-supervised on real slices: Dice loss on some structures")
    _save(figure, figures / "tutorial_cohort_semi_supervised.png")
    return results


def write_test_pairs(folder: Path, datalist: Path = COHORT_DATALIST) -> Path:
    """The datalist's ``pairs.test`` (the ring of its cohort-test subjects) with their labels as a
    ``batch_inference`` pairs.csv of absolute paths."""
    content = json.loads(Path(cohort_datalist(folder, None, datalist)).read_text())
    labels = {entry["image"]: entry["label"] for entry in content["test"]}
    stem = lambda p: Path(p).name.split("_image")[0]  # noqa: E731
    path = folder / "cohort_test_pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["fixed_image", "moving_image", "fixed_label", "moving_label", "pair_id"])
        for pair in content["pairs"]["test"]:
            fixed, moving = pair["fixed"], pair["moving"]
            writer.writerow([fixed, moving, labels[fixed], labels[moving], f"{stem(moving)}_to_{stem(fixed)}"])
    return path


def amortized(work: Path, threads: int, data: Path, bundle: Bundle, figures: Path) -> dict:
    """Dice against seconds a pair: one forward pass of the shipped 2D model, the same followed by the default
    refinement, and the refinement alone from the identity (the per-pair optimisation a classical tool does), with
    the default schedule and with 5x its iterations, on the cohort test pairs."""
    _require_cohort(data)
    pairs = write_test_pairs(work / "cohort_datalists")
    configs = [str(CONFIGS / "inference.yaml"), str(CONFIGS / "batch_inference.yaml")]
    results = {}
    for index, (name, options) in enumerate(AMORTIZED_VARIANTS.items()):
        out = work / f"cohort_amortized_{index}"
        overrides = {"pairs": pairs, "output_dir": out, "outputs": "metrics", "overwrite": "true"}
        bundle("batch_inference", configs, {**overrides, "num_workers": 0, **_eval_labels(data), **options}, threads)
        summary = json.loads((out / "summary.json").read_text())
        with open(out / "summary.csv", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        results[name] = {
            "mean_dice": summary["mean_dice"],
            "lowest_dice": min(float(r["mean_dice"]) for r in rows),
            "identity_mean_dice": summary["identity_mean_dice"],
            "mean_seconds": float(np.mean([float(r["seconds_load_to_write"]) for r in rows])),
            "mean_folding_fraction": summary["mean_folding_fraction"],
            "pairs": summary["pairs"],
        }
    first = next(iter(results.values()))
    print(f"| method ({first['pairs']} cohort-test pairs) | mean Dice (lowest pair) | seconds a pair | folded % |")
    print("|---|---|---|---|")
    print(f"| no registration | {first['identity_mean_dice']:.3f} | 0 | 0.000 |")
    for name, r in results.items():
        print(
            f"| {name} | {r['mean_dice']:.3f} ({r['lowest_dice']:.3f}) | {r['mean_seconds']:.2f} "
            f"| {100 * r['mean_folding_fraction']:.3f} |"
        )
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for index, (name, r) in enumerate(results.items()):
        axis.plot(r["mean_seconds"], r["mean_dice"], "o", color=f"C{index}", label=name)
    axis.axhline(first["identity_mean_dice"], color="0.6", linestyle="--", label="no registration")
    axis.set_xscale("log")
    axis.set_xlabel("seconds a pair, load to write (2 CPU threads)")
    axis.set_ylabel(f"mean Dice, {first['pairs']} test pairs")
    axis.legend(fontsize=7, loc="lower right")
    axis.set_title("Amortised (one network pass) versus per-pair optimisation")
    _save(figure, figures / "tutorial_cohort_amortized.png")
    return results
