"""The tutorial's analyses on the real 2D cohort (``../shared/data/oasis2d_train``, split by
``bundle/datalists/oasis2d_train.json``): limited data, regularisation, semi-supervision, out of sample and amortised
versus per-pair optimisation, each printing its table and writing its figure. Run through ``benchmarks/tutorial.py``:

    python benchmarks/tutorial.py cohort-limited-data    # 2 ... 365 training subjects, the same iterations each
    python benchmarks/tutorial.py cohort-regularization  # λ over two decades: Dice, folding, std log|J|
    python benchmarks/tutorial.py cohort-semi-supervised # a Dice loss on some structures: seen against unseen
    python benchmarks/tutorial.py cohort-out-of-sample   # digit, skull-stripped and with-skull models, crossed
    python benchmarks/tutorial.py cohort-amortized       # network alone / + refinement / refinement from identity
    python benchmarks/tutorial.py cohort                 # all of them, one after the other

Every model is trained from scratch through ``train.yaml + oasis2d.yaml`` on (a nested subset of) the datalist's
training section with ``--cohort_epochs`` x 160 pairs, and scored by ``evaluate.yaml`` on its cohort-test section
(20 held-out subjects, the ring of ``pairs.test``), over the structures of ``eval_labels.json`` present in both. The
validation and cohort-test subjects are the same for every model; no ``oasis2d/`` or ``oasis3d/`` test subject is
read. ``cohort-out-of-sample`` also needs the digit-5 model of ``tutorial.py mnist`` (trained first when missing).
``cohort-amortized`` uses the shipped 2D model and ``batch_inference`` over the same 20 pairs (one process a
variant; seconds are each pair's registration, load to write, as ``summary.csv`` reports them).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from tutorial_report import (
    draw_grouped_bars,
    draw_sweep,
    observed_and_unobserved,
    print_sweep,
    report_observed_and_unobserved,
    save_figure,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COHORT_DATALIST = REPO / "bundle" / "datalists" / "oasis2d_train.json"
TRAINING = [str(CONFIGS / "train.yaml"), str(CONFIGS / "oasis2d.yaml")]
MNIST_TRAINING = [str(CONFIGS / "train.yaml"), str(CONFIGS / "mnist.yaml")]
TRAIN_SIZES = [2, 5, 10, 20, 50, 100, 365]  # pairwise training needs two subjects: 1 has no pair to learn from
LAMBDAS = [0.1, 0.3, 1.0, 3.0, 10.0]
# semi-supervised: the Dice loss sees the cortex, white matter and lateral ventricles (both sides); the deep grey
# matter, hippocampus, amygdala, ventral DC, ... are never in the loss
OBSERVED = [2, 3, 4, 41, 42, 43]
# from scratch: train.yaml's 2D step (oasis2d.yaml's 0.001 is for continuing from the shipped model)
FROM_SCRATCH = {"learning_rate": 0.003}
# out of sample: each model and the kind of test pair it was trained on
IN_SAMPLE = {
    "MNIST 5s model": "MNIST 5s",
    "skull-stripped slices model": "real slices, skull-stripped",
    "with-skull slices model": "real slices, with skull",
}
AMORTIZED_VARIANTS = {
    "network alone": {"refine_iterations": 0},
    "network + refinement (default)": {},
    "refinement from the identity (default schedule)": {"network_passes": 0},
    "refinement from the identity, 5x iterations": {"network_passes": 0, "refine_iterations": "[200,50]"},
    "refinement from the identity, 20x iterations": {"network_passes": 0, "refine_iterations": "[800,200]"},
}

Bundle = Callable[[str, list, dict, int], str]
TrainAndTest = Callable[[Path, list, int, int, dict], dict]


def cohort_datalist(folder: Path, size: int | None = None, datalist: Path | None = None, images: str = "image") -> Path:
    """``datalist`` (default ``COHORT_DATALIST``) with absolute paths (it can then live anywhere), keeping only its
    first ``size`` training subjects (nested sets: every smaller set is inside the larger ones); validation, test
    and the test pairs unchanged. ``images="head"`` points every image at the subject's slice before skull stripping
    (``*_head``, same grid and labels). Returns the written file."""
    if images not in ("image", "head"):
        raise ValueError(f"images must be 'image' or 'head', not {images!r}")
    datalist = Path(datalist or COHORT_DATALIST)
    content = json.loads(datalist.read_text())
    base = datalist.parent

    def absolute(value):
        if isinstance(value, str):
            return str((base / value.replace("_image.nii", f"_{images}.nii")).resolve())
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
    name = "datalist" + ("" if size is None else f"_train{size}") + ("" if images == "image" else f"_{images}")
    path = folder / f"{name}.json"
    path.write_text(json.dumps(content, indent=1))
    return path


def _eval_labels(data: Path) -> dict:
    labels = data / "oasis3d" / "eval_labels.json"
    return {"eval_label_ids": labels} if labels.is_file() else {}


def require_cohort(data: Path) -> None:
    if not (data / "oasis2d_train").is_dir():
        raise SystemExit(f"the real 2D cohort is not there: {data / 'oasis2d_train'} (see ../shared/data/README.md)")


def limited_data(work: Path, threads: int, epochs: int, data: Path, train_and_test: TrainAndTest, figures: Path):
    """Dice on the cohort test pairs against the training-set size (VoxelMorph TMI 2019, Fig. 9 on real slices)."""
    require_cohort(data)
    results = {}
    for size in TRAIN_SIZES:
        datalist = cohort_datalist(work / "cohort_datalists", size)
        overrides = {"datalist": datalist, **FROM_SCRATCH, **_eval_labels(data)}
        results[str(size)] = train_and_test(work / f"cohort_train_{size}", TRAINING, threads, epochs, overrides)
    print_sweep(results, "training subjects")
    title = f"Limited training data, real slices ({epochs} epochs x 160 pairs each)"
    draw_sweep(results, "training subjects (real OASIS slices)", title, figures / "tutorial_cohort_limited_data.png")
    return results


def regularization(work: Path, threads: int, epochs: int, data: Path, train_and_test: TrainAndTest, figures: Path):
    """Dice, folded voxels and std log|J| on the cohort test pairs against λ, all training subjects."""
    require_cohort(data)
    datalist = cohort_datalist(work / "cohort_datalists")
    results = {}
    for weight in LAMBDAS:
        overrides = {"datalist": datalist, "regularization_weight": weight, **FROM_SCRATCH, **_eval_labels(data)}
        folder = work / f"cohort_lambda_{weight:g}"
        results[f"{weight:g}"] = train_and_test(folder, TRAINING, threads, epochs, overrides)
    print_sweep(results, "λ (bending energy)")
    title = f"Regularisation, real slices ({epochs} epochs x 160 pairs each)"
    path = figures / "tutorial_cohort_regularization.png"
    draw_sweep(results, "λ (bending energy weight)", title, path, "std_log_jacobian")
    return results


def semi_supervised(work: Path, threads: int, epochs: int, data: Path, train_and_test: TrainAndTest, figures: Path):
    """VoxelMorph's observed/unobserved experiment (MedIA 2019) on real slices: a Dice loss on ``OBSERVED`` only."""
    require_cohort(data)
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
        results[name] = observed_and_unobserved(summary, OBSERVED)
    first = next(iter(results.values()))
    observed = f"structures in the loss ({len(first['observed_labels'])})"
    unobserved = f"structures never in the loss ({len(first['unobserved_labels'])})"
    title = "Semi-supervised on real slices: Dice loss on some structures"
    path = figures / "tutorial_cohort_semi_supervised.png"
    report_observed_and_unobserved(results, observed, unobserved, title, path)
    return results


def evaluate(bundle: Bundle, threads: int, folder: Path, configs: list, ckpt_dir: Path, overrides: dict) -> dict:
    """``evaluating`` (``configs + evaluate.yaml``, the test section, network alone) of the model in ``ckpt_dir``
    into ``folder``; returns the test summary."""
    settings = {"output_dir": folder / "runs", "ckpt_dir": ckpt_dir, "eval_output_dir": folder, "eval_hd95": "false"}
    bundle("evaluating", configs + [str(CONFIGS / "evaluate.yaml")], {**settings, **overrides}, threads)
    return json.loads((folder / "metrics.json").read_text())["summary"]


def out_of_sample(
    work: Path,
    threads: int,
    epochs: int,
    data: Path,
    train_and_test: TrainAndTest,
    bundle: Bundle,
    figures: Path,
    mnist_models: Path,
) -> dict:
    """Every model on every kind of test pair ("might work, might fail completely"): the digit-5 model of
    ``tutorial.py mnist`` (in ``mnist_models``), a model trained on the skull-stripped slices and one trained on the
    same slices before skull stripping (``*_head``, same budget), each scored on the MNIST 5s test pairs and on the
    cohort-test pairs of both kinds; the diagonal is in sample."""
    require_cohort(data)
    datalists = {images: cohort_datalist(work / "cohort_datalists", images=images) for images in ("image", "head")}
    test_sets = {
        "MNIST 5s": (MNIST_TRAINING, {"mnist_dir": work / "mnist_digit5"}),
        "real slices, skull-stripped": (TRAINING, {"datalist": datalists["image"], **_eval_labels(data)}),
        "real slices, with skull": (TRAINING, {"datalist": datalists["head"], **_eval_labels(data)}),
    }
    results: dict = {name: {} for name in IN_SAMPLE}
    models = {"MNIST 5s model": mnist_models}
    for images, name in (("image", "skull-stripped slices model"), ("head", "with-skull slices model")):
        folder = work / f"cohort_out_of_sample_{images}"
        overrides = {"datalist": datalists[images], **FROM_SCRATCH, **_eval_labels(data)}
        results[name][IN_SAMPLE[name]] = train_and_test(folder, TRAINING, threads, epochs, overrides)
        models[name] = folder / "models"
    for name, ckpt_dir in models.items():
        for index, (test_set, (configs, overrides)) in enumerate(test_sets.items()):
            if test_set not in results[name]:
                folder = work / "cohort_out_of_sample_scores" / f"{name.split()[0]}_{index}"
                results[name][test_set] = evaluate(bundle, threads, folder, configs, ckpt_dir, overrides)
    report_out_of_sample(results, figures)
    return results


def report_out_of_sample(results: dict, figures: Path) -> None:
    """The table and figure of ``out_of_sample`` (``results[model][test set]``: evaluation summaries); also
    ``tutorial.py cohort-out-of-sample --redraw`` from the saved results."""
    test_sets = list(next(iter(results.values())))
    identity = {test_set: results["MNIST 5s model"][test_set]["identity_mean_dice"] for test_set in test_sets}
    pairs = {test_set: results["MNIST 5s model"][test_set]["pairs"] for test_set in test_sets}
    print("| model \\ test pairs | " + " | ".join(f"{t} ({pairs[t]})" for t in test_sets) + " |")
    print("|---" * (len(test_sets) + 1) + "|")
    print("| no registration | " + " | ".join(f"{identity[t]:.3f}" for t in test_sets) + " |")
    for name, scores in results.items():
        cells = []
        for test_set in test_sets:
            cell = f"{scores[test_set]['registered_mean_dice']:.3f}"
            cells.append(f"**{cell}** (in sample)" if IN_SAMPLE[name] == test_set else cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    groups = {"no registration": list(identity.values())}
    for name, scores in results.items():
        groups[name] = [scores[test_set]["registered_mean_dice"] for test_set in test_sets]
    title = "Out of sample: every model on every kind of pair"
    ylabel = "mean Dice (foreground / structures)"
    draw_grouped_bars(groups, test_sets, ylabel, title, figures / "tutorial_cohort_out_of_sample.png")


def write_test_pairs(folder: Path, datalist: Path | None = None) -> Path:
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
    the default schedule and with 5x its iterations, on the cohort test pairs. Every variant runs the default
    affine stage first; its seconds (the same for all) are reported apart from the deformable part's."""
    require_cohort(data)
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
        records = [json.loads((out / row["pair_id"] / "metrics.json").read_text()) for row in rows]
        affine = [record.get("seconds_affine", 0.0) for record in records]
        results[name] = {
            "mean_dice": summary["mean_dice"],
            "lowest_dice": min(float(r["mean_dice"]) for r in rows),
            "identity_mean_dice": summary["identity_mean_dice"],
            "deformable_seconds": float(np.mean([r["seconds"] - a for r, a in zip(records, affine)])),
            "affine_seconds": float(np.mean(affine)),
            "load_to_write_seconds": float(np.mean([float(r["seconds_load_to_write"]) for r in rows])),
            "mean_folding_fraction": summary["mean_folding_fraction"],
            "pairs": summary["pairs"],
        }
    first = next(iter(results.values()))
    print(
        f"| method ({first['pairs']} cohort-test pairs) | mean Dice (lowest pair) "
        "| seconds a pair: network + refinement | load to write | folded % |"
    )
    print("|---|---|---|---|---|")
    print(f"| no registration | {first['identity_mean_dice']:.3f} | 0 | — | 0.000 |")
    for name, r in results.items():
        print(
            f"| {name} | {r['mean_dice']:.3f} ({r['lowest_dice']:.3f}) | {r['deformable_seconds']:.3f} "
            f"| {r['load_to_write_seconds']:.2f} | {100 * r['mean_folding_fraction']:.3f} |"
        )
    affine = np.mean([r["affine_seconds"] for r in results.values()])
    print(f"every variant first runs the affine stage: {affine:.2f} s a pair, within load to write")
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for index, (name, r) in enumerate(results.items()):
        axis.plot(r["deformable_seconds"], r["mean_dice"], "o", color=f"C{index}", label=name)
    axis.axhline(first["identity_mean_dice"], color="0.6", linestyle="--", label="no registration")
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_xlabel(f"seconds a pair, network passes + refinement ({threads} CPU threads)")
    axis.set_ylabel(f"mean Dice, {first['pairs']} test pairs")
    axis.legend(fontsize=7, loc="lower right")
    axis.set_title("Amortised (one network pass) versus per-pair optimisation")
    save_figure(figure, figures / "tutorial_cohort_amortized.png")
    return results
