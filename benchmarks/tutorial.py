"""The tutorial's experiments on MNIST, each printing its table and writing its figure into ``bundle/docs/``.

    python benchmarks/tutorial.py mnist          # train on digit 5 (bundle CLI), figure of held-out pairs
    python benchmarks/tutorial.py out-of-sample  # the digit-5 model on every digit class and on a real brain slice
    python benchmarks/tutorial.py regularization # λ over two orders of magnitude: Dice and folding on test pairs
    python benchmarks/tutorial.py limited-data   # 2 ... 400 training digits: Dice on the same test pairs
    python benchmarks/tutorial.py semi-supervised  # synthetic 2D brains: Dice loss on some of the structures
    python benchmarks/tutorial.py brains2d       # step 2: train on synthetic 2D brains, register them and real slices
    python benchmarks/tutorial.py limited-data-brains  # 2 ... 64 synthetic training brains: Dice on the same tests
    python benchmarks/tutorial.py cohort-limited-data  # the real 2D cohort: 2 ... 365 training subjects
    python benchmarks/tutorial.py cohort-regularization   # the real cohort: λ over two decades
    python benchmarks/tutorial.py cohort-semi-supervised  # the real cohort: Dice loss on 6 of the structures
    python benchmarks/tutorial.py cohort-out-of-sample  # digit, skull-stripped and with-skull models, crossed
    python benchmarks/tutorial.py cohort-amortized  # the real cohort: network, + refinement, refinement alone
    python benchmarks/tutorial.py cohort  # the five real-cohort analyses, one after the other (~1 h on 2 threads)

``mnist`` runs ``python -m monai.bundle run training`` with ``train.yaml + mnist.yaml`` as a user would (into
``--work``), then registers held-out test pairs with the trained model and draws moving / fixed / warped / grid
(``tutorial_mnist_pairs.png``). ``out-of-sample`` scores that model, unchanged, on 40 test pairs of every digit class
(``evaluating`` with ``--eval_section test_digit_<k>``) and on the OASIS 2D slice pair when ``../shared/data`` is
there (``inference``, network alone), against no registration (``tutorial_out_of_sample.png``). ``regularization``
and ``limited-data`` train one model per setting with the same budget (``--sweep_epochs`` x 400 pairs) and score
them on the same 40 test pairs (``tutorial_regularization.png``, ``tutorial_limited_data.png``). ``semi-supervised``
trains the default synthetic 2D model twice, unsupervised and with a Dice loss on structures 1-3 and 5, and scores
both on the test pairs per structure, observed (1-3, 5) and unobserved (6-8) (``tutorial_semi_supervised.png``).
``brains2d`` is the tutorial's second step: the default training (``train.yaml``, synthetic 2D brains), its
evaluation on the test pairs, and the README's inference command on a synthetic test pair and on the real OASIS
slice pair (network alone and with the default refinement), drawn as moving / fixed / warped / labels
(``tutorial_brains2d.png``). ``limited-data-brains`` generates one population of 76 synthetic 2D brains (64
training, 4 validation, 8 test subjects), trains one model on the first 2, 4, 8, 16 and 64 training subjects with
the same budget (``--brain_epochs`` x 160 pairs; a datalist per size, passed with ``--datalist`` as a user would)
and scores each on the same 8 test pairs (``tutorial_limited_data_brains.png``).
Tables are markdown,
ready for ``bundle/docs/tutorial.md``; numbers also go to ``<work>/tutorial_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DOCS = REPO / "bundle" / "docs"
FIGURES = DOCS  # where the figures go (--figures_dir; tests draw into a temporary folder)
# The sweeps; a test runs each experiment with shorter ones and SMOKE_OVERRIDES (e.g. fewer pairs per epoch).
LAMBDAS = [0.001, 0.003, 0.01, 0.03, 0.1]
DIGIT_TRAIN_SIZES = [2, 5, 10, 50, 400]  # pairwise sampling needs two subjects
BRAIN_TRAIN_SIZES = [2, 4, 8, 16, 64]
SMOKE_OVERRIDES: dict = {}
TRAINING = [str(CONFIGS / "train.yaml"), str(CONFIGS / "mnist.yaml")]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(REPO / "benchmarks"))
import tutorial_cohort  # noqa: E402
from tutorial_report import (  # noqa: E402
    draw_grouped_bars,
    draw_sweep,
    observed_and_unobserved,
    print_sweep,
    report_observed_and_unobserved,
    save_figure,
)  # noqa: E402

# the analyses on the real 2D cohort (benchmarks/tutorial_cohort.py); cohort-amortized trains nothing
COHORT_EXPERIMENTS = {
    "cohort-limited-data": tutorial_cohort.limited_data,
    "cohort-regularization": tutorial_cohort.regularization,
    "cohort-semi-supervised": tutorial_cohort.semi_supervised,
    "cohort-out-of-sample": tutorial_cohort.out_of_sample,
    "cohort-amortized": tutorial_cohort.amortized,
}


def bundle(run_id: str, configs: list[str], overrides: dict, threads: int) -> str:
    """Run ``python -m monai.bundle run <run_id>`` in a fresh process; return its output, failing loudly."""
    config = "[" + ",".join(f"'{c}'" for c in configs) + "]" if len(configs) > 1 else configs[0]
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config]
    for key, value in {**overrides, **SMOKE_OVERRIDES}.items():
        command += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    output = process.stdout + process.stderr
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return output


def common(work: Path) -> dict:
    return {"output_dir": work / "runs", "ckpt_dir": work / "models", "mnist_dir": work / "mnist_digit5"}


def train(work: Path, threads: int, epochs: int) -> dict:
    overrides = {**common(work), "max_epochs": epochs, "val_interval": epochs, "overwrite_model": "true"}
    bundle("training", TRAINING, overrides, threads)
    report = json.loads(next((work / "runs").rglob("validation/metrics.json")).read_text())["summary"]
    print(
        f"trained {epochs} epochs; validation mean Dice {report['identity_mean_dice']:.3f} -> "
        f"{report['registered_mean_dice']:.3f}"
    )
    return report


def pair_figure(work: Path, path: Path, pairs: int = 5) -> None:
    """Moving / fixed / warped / deformed grid for the first ``pairs`` test pairs, with the trained model."""
    from monai.bundle import ConfigParser
    from monai.networks.blocks import Warp

    parser = ConfigParser()
    parser.read_config(TRAINING)
    parser.update({"bundle_root": str(REPO / "bundle"), **{k: str(v) for k, v in common(work).items()}})
    parser["validate#section"] = "test"
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(work / "models" / "model.pt", weights_only=True))
    network.eval()
    dataset = parser.get_parsed_content("validate#dataset")
    figure, axes = plt.subplots(pairs, 4, figsize=(8, 2 * pairs))
    for row in range(pairs):
        item = dataset[row]
        moving, fixed = item["moving_image"][None].float(), item["fixed_image"][None].float()
        with torch.no_grad():
            ddf = network(torch.cat([moving, fixed], dim=1))
        warped = Warp()(moving, ddf)[0, 0].numpy()
        grid = np.zeros(fixed.shape[2:], dtype=np.float32)
        grid[::4, :] = grid[:, ::4] = 1.0
        warped_grid = Warp()(torch.as_tensor(grid)[None, None], ddf)[0, 0].numpy()
        for column, (title, image) in enumerate(
            (("moving", moving[0, 0].numpy()), ("fixed", fixed[0, 0].numpy()), ("warped", warped), ("φ", warped_grid))
        ):
            axes[row, column].imshow(image, cmap="gray")  # MNIST rows down, columns across, as digits are read
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            if row == 0:
                axes[row, column].set_title(title)
    save_figure(figure, path)


def out_of_sample(work: Path, threads: int, data: Path) -> dict:
    results: dict = {}
    evaluate = TRAINING + [str(CONFIGS / "evaluate.yaml")]
    for digit in range(10):
        eval_dir = work / f"eval_digit{digit}"
        overrides = {
            **common(work),
            "eval_section": f"test_digit_{digit}",
            "eval_output_dir": eval_dir,
            "eval_hd95": "false",
        }
        bundle("evaluating", evaluate, overrides, threads)
        summary = json.loads((eval_dir / "metrics.json").read_text())["summary"]
        results[f"digit {digit}"] = summary
    oasis = data / "oasis2d"
    if (oasis / "subject_a_image.nii.gz").is_file():
        with tempfile.TemporaryDirectory() as out:
            overrides = {
                "fixed_image": oasis / "subject_a_image.nii.gz",
                "moving_image": oasis / "subject_b_image.nii.gz",
                "fixed_label": oasis / "subject_a_label.nii.gz",
                "moving_label": oasis / "subject_b_label.nii.gz",
                "ckpt_dir": work / "models",
                "refine_iterations": 0,
                "network_passes": 1,  # the tutorial scores the trained network's single pass (VoxelMorph's setting)
                "output_dir": Path(out) / "oasis2d",
            }
            bundle("inference", [str(CONFIGS / "inference.yaml")], overrides, threads)
            record = json.loads((Path(out) / "oasis2d" / "metrics.json").read_text())
        results["OASIS brain slice"] = {
            "identity_mean_dice": record["identity_mean_dice"],
            "registered_mean_dice": record["registered_mean_dice"],
            "registered_folding_fraction": record["folding_fraction"],
            "pairs": 1,
        }
    print(
        "| data (model trained on MNIST 5s) | pairs | mean Dice, no registration | mean Dice, registered | folded % |"
    )
    print("|---|---|---|---|---|")
    for name, summary in results.items():
        print(
            f"| {name} | {summary['pairs']} | {summary['identity_mean_dice']:.3f} | "
            f"{summary['registered_mean_dice']:.3f} | {100 * summary['registered_folding_fraction']:.3f} |"
        )
    names = list(results)
    groups = {
        "no registration": [results[n]["identity_mean_dice"] for n in names],
        "digit-5 model": [results[n]["registered_mean_dice"] for n in names],
    }
    title = "A model trained on 5s, registering other digits and a brain slice"
    labels = [n.replace("OASIS brain slice", "brain") for n in names]
    ylabel = "mean Dice (foreground / structures)"
    draw_grouped_bars(groups, labels, ylabel, title, FIGURES / "tutorial_out_of_sample.png")
    return results


def train_and_test(folder: Path, configs: list[str], threads: int, epochs: int, overrides: dict) -> dict:
    """Train one model with ``configs`` + ``overrides`` into ``folder``, evaluate it on the datalist's test section
    (``evaluate.yaml``) and return the test summary."""
    settings = {
        "output_dir": folder / "runs",
        "ckpt_dir": folder / "models",
        "max_epochs": epochs,
        "val_interval": epochs,
        "overwrite_model": "true",
        **overrides,
    }
    bundle("training", configs, settings, threads)
    evaluate = {**settings, "eval_output_dir": folder / "eval", "eval_hd95": "false"}
    bundle("evaluating", configs + [str(CONFIGS / "evaluate.yaml")], evaluate, threads)
    return json.loads((folder / "eval" / "metrics.json").read_text())["summary"]


def regularization(work: Path, threads: int, epochs: int) -> dict:
    results = {}
    for weight in LAMBDAS:
        overrides = {"regularization_weight": weight, "mnist_dir": work / "mnist_digit5"}
        results[f"{weight:g}"] = train_and_test(work / f"lambda_{weight:g}", TRAINING, threads, epochs, overrides)
    print_sweep(results, "λ (bending energy)")
    title = f"Regularisation on MNIST 5s ({epochs} epochs each)"
    draw_sweep(results, "λ (bending energy weight)", title, FIGURES / "tutorial_regularization.png", "folding")
    return results


def limited_data(work: Path, threads: int, epochs: int) -> dict:
    results = {}
    for size in DIGIT_TRAIN_SIZES:
        overrides = {"datalist#num_train": size, "mnist_dir": work / f"mnist_digit5_train{size}"}
        results[str(size)] = train_and_test(work / f"train_{size}", TRAINING, threads, epochs, overrides)
    print_sweep(results, "training digits", std_log_jacobian=False)
    title = f"Limited training data ({epochs} epochs x 400 pairs each)"
    draw_sweep(results, "training digits (5s)", title, FIGURES / "tutorial_limited_data.png")
    return results


def nested_training_datalists(population: Path, sizes: list[int]) -> dict[int, Path]:
    """One datalist per training-set size beside ``population``'s: its first ``size`` training subjects (nested
    sets), the same validation and test subjects for every size, so the curve measures the training data alone."""
    content = json.loads(population.read_text())
    datalists = {}
    for size in sizes:
        if size > len(content["training"]):
            continue
        datalist = population.parent / f"datalist_train{size}.json"
        datalist.write_text(json.dumps({**content, "training": content["training"][:size]}, indent=1))
        datalists[size] = datalist
    return datalists


def draw_limited_data_brains(results: dict, epochs: int) -> None:
    """The curve of ``limited_data_brains`` (``{size: test summary}``), with the no-registration baseline."""
    title = f"Limited training data, brains ({epochs} epochs x 160 pairs each)"
    draw_sweep(results, "training subjects (synthetic 2D brains)", title, FIGURES / "tutorial_limited_data_brains.png")


def limited_data_brains(work: Path, threads: int, epochs: int) -> dict:
    """The limited-data curve on synthetic 2D brains: one population, nested training sets, the same test pairs."""
    from scripts.synthetic import ensure_synthetic_dataset

    spec = {"spatial_dims": 2, "seed": 0, "num_subjects": 76, "num_validation": 4, "num_test": 8}
    population = Path(ensure_synthetic_dataset(str(work / "synthetic_2d_76"), spec))
    datalists = nested_training_datalists(population, BRAIN_TRAIN_SIZES)
    results = {}
    for size, datalist in datalists.items():
        folder = work / f"brains_train_{size}"
        summary = train_and_test(folder, [str(CONFIGS / "train.yaml")], threads, epochs, {"datalist": datalist})
        results[str(size)] = summary
    print_sweep(results, "training brains")
    draw_limited_data_brains(results, epochs)
    return results


def register_pair(work: Path, name: str, threads: int, ckpt_dir: Path, files: dict, refine: bool) -> dict:
    """The README's inference command on one pair of files; returns metrics.json plus the arrays to draw."""
    import nibabel as nib

    out = work / "brains2d" / "inference" / name
    # network alone: one pass, the trained network's own output (VoxelMorph's setting; inference runs two by default)
    alone = {"refine_iterations": 0, "network_passes": 1}
    overrides = {**files, "ckpt_dir": ckpt_dir, "output_dir": out, **({} if refine else alone)}
    bundle("inference", [str(CONFIGS / "inference.yaml")], overrides, threads)
    record = json.loads((out / "metrics.json").read_text())

    def read(path) -> np.ndarray:
        return np.asarray(nib.load(str(path)).dataobj).squeeze()

    record["arrays"] = {
        "moving": read(files["moving_image"]),
        "fixed": read(files["fixed_image"]),
        "warped": read(out / "warped_image.nii.gz"),
        "fixed_label": read(files["fixed_label"]),
        "warped_label": read(out / "warped_label.nii.gz"),
    }
    return record


def brains2d(work: Path, threads: int, epochs: int, data: Path) -> dict:
    """The tutorial's 2D brain step: train on synthetic brains, then register synthetic and real slices."""
    from scripts.synthetic import ensure_synthetic_dataset

    folder = work / "brains2d"
    population = Path(ensure_synthetic_dataset(str(work / "synthetic_2d"), {"spatial_dims": 2, "seed": 0}))
    summary = train_and_test(folder, [str(CONFIGS / "train.yaml")], threads, epochs, {"datalist": population})
    results = {
        f"synthetic test pairs ({summary['pairs']}), network": {
            "identity": summary["identity_mean_dice"],
            "registered": summary["registered_mean_dice"],
            "folded_percent": 100 * summary["registered_folding_fraction"],
        }
    }
    test = json.loads(population.read_text())["test"]
    synthetic_files = {
        "fixed_image": population.parent / test[0]["image"],
        "moving_image": population.parent / test[1]["image"],
        "fixed_label": population.parent / test[0]["label"],
        "moving_label": population.parent / test[1]["label"],
    }
    rows = {
        "synthetic test pair, network": register_pair(
            work, "synthetic", threads, folder / "models", synthetic_files, False
        )
    }
    oasis = data / "oasis2d"
    if (oasis / "subject_a_image.nii.gz").is_file():
        real_files = {
            "fixed_image": oasis / "subject_a_image.nii.gz",
            "moving_image": oasis / "subject_b_image.nii.gz",
            "fixed_label": oasis / "subject_a_label.nii.gz",
            "moving_label": oasis / "subject_b_label.nii.gz",
        }
        for refine in (False, True):
            name = "OASIS slice pair, " + ("network + refinement" if refine else "network")
            rows[name] = register_pair(
                work, f"oasis_{'refined' if refine else 'network'}", threads, folder / "models", real_files, refine
            )
    for name, record in rows.items():
        if name.startswith("OASIS"):
            results[name] = {
                "identity": record["identity_mean_dice"],
                "registered": record["registered_mean_dice"],
                "folded_percent": 100 * record["folding_fraction"],
                "seconds": record["seconds"],
            }
    print(
        "| pairs (model trained on synthetic 2D brains) | mean Dice, no registration | mean Dice, registered "
        "| folded % |"
    )
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['identity']:.3f} | {r['registered']:.3f} | {r['folded_percent']:.3f} |")
    figure, axes = plt.subplots(len(rows), 4, figsize=(9, 2.4 * len(rows)), squeeze=False)
    for row, (name, record) in enumerate(rows.items()):
        arrays = record["arrays"]
        panels = (("moving", arrays["moving"]), ("fixed", arrays["fixed"]), ("warped moving", arrays["warped"]))
        for column, (title, image) in enumerate(panels):
            axes[row, column].imshow(np.rot90(image), cmap="gray")
            axes[row, column].set_title(title, fontsize=9)
        axes[row, 3].imshow(np.rot90(arrays["fixed"]), cmap="gray")
        axes[row, 3].contour(
            np.rot90(arrays["fixed_label"]),
            levels=np.unique(arrays["fixed_label"]) + 0.5,
            colors="lime",
            linewidths=0.4,
        )
        axes[row, 3].contour(
            np.rot90(arrays["warped_label"]),
            levels=np.unique(arrays["warped_label"]) + 0.5,
            colors="red",
            linewidths=0.4,
        )
        dice = record.get("registered_mean_dice", float("nan"))
        axes[row, 3].set_title(f"labels: fixed (green), warped (red)\nDice {dice:.3f}", fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=8)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    save_figure(figure, FIGURES / "tutorial_brains2d.png")
    return results


# the 2D synthetic label maps hold structures 1-3 and 5-8 (none of the 24 subjects has label 4)
OBSERVED, UNOBSERVED = [1, 2, 3, 5], [6, 7, 8]


def semi_supervised(work: Path, threads: int, epochs: int) -> dict:
    """VoxelMorph's observed/unobserved experiment on the synthetic 2D data (8 structures)."""
    variants = {"unsupervised": {}, "Dice on structures 1-3, 5": {"label_weight": 1.0, "train_label_ids": "[1,2,3,5]"}}
    results = {}
    for name, options in variants.items():
        folder = work / ("semi_" + ("unsupervised" if not options else "dice_observed"))
        overrides = {"synthetic_dir": work / "synthetic_2d", **options}
        summary = train_and_test(folder, [str(CONFIGS / "train.yaml")], threads, epochs, overrides)
        results[name] = observed_and_unobserved(summary, OBSERVED, UNOBSERVED)
    observed, unobserved = "observed structures (1-3, 5)", "unobserved structures (6-8)"
    title = "Semi-supervised: Dice loss on some structures (synthetic 2D)"
    report_observed_and_unobserved(results, observed, unobserved, title, FIGURES / "tutorial_semi_supervised.png")
    return results


def cohort_experiment(experiment: str, work: Path, args: argparse.Namespace) -> dict:
    """One analysis of ``tutorial_cohort`` with what it needs from this driver."""
    data = Path(args.data)
    if experiment == "cohort-amortized":
        return tutorial_cohort.amortized(work, args.threads, data, bundle, FIGURES)
    if experiment == "cohort-out-of-sample":
        if not (work / "models" / "model.pt").is_file():
            train(work, args.threads, args.epochs)  # the digit-5 model it crosses with the brain models
        return tutorial_cohort.out_of_sample(
            work, args.threads, args.cohort_epochs, data, train_and_test, bundle, FIGURES, work / "models"
        )
    return COHORT_EXPERIMENTS[experiment](work, args.threads, args.cohort_epochs, data, train_and_test, FIGURES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "experiment",
        choices=[
            "mnist",
            "out-of-sample",
            "regularization",
            "limited-data",
            "semi-supervised",
            "brains2d",
            "limited-data-brains",
            *COHORT_EXPERIMENTS,
            "cohort",
        ],
    )
    parser.add_argument("--work", default=str(REPO / "bundle" / "runs" / "tutorial"), help="runs, models and data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sweep_epochs", type=int, default=5, help="epochs per model of the sweeps")
    parser.add_argument("--brain_epochs", type=int, default=40, help="epochs per synthetic-brain model")
    parser.add_argument("--cohort_epochs", type=int, default=12, help="epochs (x 160 pairs) per real-cohort model")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="limited-data-brains, cohort-out-of-sample: redraw the figure from <work>/tutorial_results.json",
    )
    parser.add_argument("--figures_dir", default=str(DOCS), help="where the PNGs go (default: bundle/docs)")
    args = parser.parse_args(argv)
    global FIGURES
    FIGURES = Path(args.figures_dir)
    FIGURES.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    results_path = work / "tutorial_results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.experiment == "mnist":
        results["mnist"] = train(work, args.threads, args.epochs)
        pair_figure(work, FIGURES / "tutorial_mnist_pairs.png")
    elif args.experiment == "regularization":
        results["regularization"] = regularization(work, args.threads, args.sweep_epochs)
    elif args.experiment == "semi-supervised":
        results["semi_supervised"] = semi_supervised(work, args.threads, args.brain_epochs)
    elif args.experiment == "limited-data":
        results["limited_data"] = limited_data(work, args.threads, args.sweep_epochs)
    elif args.experiment == "brains2d":
        results["brains2d"] = brains2d(work, args.threads, args.brain_epochs, Path(args.data))
    elif args.experiment == "limited-data-brains" and args.redraw:
        draw_limited_data_brains(results["limited_data_brains"], args.brain_epochs)
    elif args.experiment == "limited-data-brains":
        results["limited_data_brains"] = limited_data_brains(work, args.threads, args.brain_epochs)
    elif args.experiment == "cohort-out-of-sample" and args.redraw:
        tutorial_cohort.report_out_of_sample(results["cohort_out_of_sample"], FIGURES)
    elif args.experiment.startswith("cohort"):
        for experiment in COHORT_EXPERIMENTS if args.experiment == "cohort" else [args.experiment]:
            start = time.perf_counter()
            results[experiment.replace("-", "_")] = cohort_experiment(experiment, work, args)
            minutes = (time.perf_counter() - start) / 60
            results.setdefault("cohort_minutes", {})[experiment] = round(minutes, 1)
            print(f"{experiment}: {minutes:.1f} min on {args.threads} threads")
            results_path.write_text(json.dumps(results, indent=1))
    else:
        if not (work / "models" / "model.pt").is_file():
            raise SystemExit(f"no MNIST model in {work / 'models'}: run `python benchmarks/tutorial.py mnist` first")
        results["out_of_sample"] = out_of_sample(work, args.threads, Path(args.data))
    results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
