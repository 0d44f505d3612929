"""SynthMorph-style pairs (scripts/synthmorph.py) and the synthmorph.yaml overlay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CONFIGS, check_ok, run_bundle
from scripts.metrics import deformation_stats
from scripts.synthmorph import SynthMorphPairs, ZeroSimilarity, random_diffeomorphism

TRAINING = [str(CONFIGS / "train.yaml"), str(CONFIGS / "synthmorph.yaml")]


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of voxels with the same label."""
    return float((a == b).float().mean())


def test_pairs_are_one_anatomy_deformed_twice_with_labels_one_to_j():
    data = SynthMorphPairs([64, 72], num_pairs=3, num_labels=10, deterministic=True, seed=5)
    first, second = data[0], data[1]
    for item in (first, second):
        for role in ("moving", "fixed"):
            image, label = item[f"{role}_image"], item[f"{role}_label"]
            assert image.shape == label.shape == (1, 64, 72)
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
            assert torch.equal(label, label.round()) and set(label.unique().tolist()) <= set(range(1, 11))
            assert label.unique().numel() >= 5  # a map of many structures, not one blob
    # the two sides share one anatomy (most voxels keep their label) that differs from another pair's anatomy
    assert _overlap(first["moving_label"], first["fixed_label"]) > 0.6
    assert _overlap(first["moving_label"], second["fixed_label"]) < 0.3
    assert not torch.equal(first["moving_label"], first["fixed_label"])  # but deformed differently
    # T1 onto T1 by default: one random contrast per pair, so the label-wise intensities of the two sides agree
    # (up to each side's blur, bias field and gamma); per side with shared_contrast=False (multi-modal training)
    for shared in (True, False):
        pair = SynthMorphPairs(
            [64, 72], num_pairs=1, num_labels=10, deterministic=True, seed=5, shared_contrast=shared
        )[0]
        means = [
            [float(pair[f"{role}_image"][pair[f"{role}_label"] == j].mean()) for j in range(1, 11)]
            for role in ("moving", "fixed")
        ]
        present = ~np.isnan(means).any(axis=0)
        correlation = np.corrcoef(np.asarray(means)[:, present])[0, 1]
        assert (correlation > 0.8) if shared else (correlation < 0.8), (shared, correlation)


def test_validation_pairs_repeat_and_training_pairs_follow_the_dataset_generator():
    fixed_pairs = SynthMorphPairs([48, 48], num_pairs=2, num_labels=6, deterministic=True, seed=3)
    assert torch.equal(fixed_pairs[1]["moving_image"], fixed_pairs[1]["moving_image"])  # same pair every epoch
    with pytest.raises(IndexError):
        fixed_pairs[2]
    training = SynthMorphPairs([48, 48], num_pairs=2, num_labels=6, seed=3)
    draws = [training[0]["moving_image"], training[0]["moving_image"]]
    assert not torch.equal(*draws)  # a new pair at every draw: every epoch sees new anatomy
    training.set_random_state(seed=3)  # what a resumed run's restored generator state does
    assert torch.equal(training[0]["moving_image"], draws[0])


@pytest.mark.parametrize("shape", [[64, 80], [24, 28, 32]])
def test_random_deformations_are_smooth_and_never_fold(shape):
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        ddf = random_diffeomorphism(generator, shape, max_std=8.0)
        assert ddf.shape == (1, len(shape), *shape)
        assert deformation_stats(ddf[0].numpy())["folding_fraction"] == 0.0
    three_d = SynthMorphPairs(shape, num_pairs=1, num_labels=4, deterministic=True)[0]
    assert three_d["fixed_image"].shape == (1, *shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="drawing pairs on the GPU needs CUDA; CI has no GPU")
def test_pairs_drawn_on_the_gpu_stay_there_and_repeat_per_seed():
    data = SynthMorphPairs([40, 48, 56], num_pairs=2, num_labels=8, deterministic=True, seed=2, device="cuda")
    pair = data[0]
    for role in ("moving", "fixed"):
        image, label = pair[f"{role}_image"], pair[f"{role}_label"]
        assert image.is_cuda and label.is_cuda and image.shape == (1, 40, 48, 56)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert set(label.unique().tolist()) <= set(range(1, 9)) and label.unique().numel() >= 4
    assert _overlap(pair["moving_label"], pair["fixed_label"]) > 0.6  # one anatomy, deformed twice
    assert torch.equal(data[0]["moving_image"], pair["moving_image"])  # the same seed gives the same pair


@pytest.mark.parametrize("num_workers, device", [(0, "cuda:0"), (0, "cpu"), (4, "cuda:0"), (4, "cpu")])
def test_pairs_are_drawn_on_the_training_device_unless_loader_workers_draw_them(num_workers, device):
    """CUDA cannot run in forked loader workers: with workers the pairs are drawn on the CPU, without them on the
    training device (the GPU draws ~20 pairs a second where CPU workers draw ~1 each)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(TRAINING)
    parser.update({"num_workers": num_workers, "device": f"$torch.device('{device}')"})
    expected = device if num_workers == 0 else "cpu"
    assert parser.get_parsed_content("synthmorph_device") == torch.device(expected)
    for section in ("train", "validate"):
        assert parser[f"{section}#dataset#device"] == "@synthmorph_device"


def test_zero_similarity_keeps_the_graph():
    warped = torch.rand(1, 1, 8, 8, requires_grad=True)
    loss = ZeroSimilarity()(warped, torch.rand(1, 1, 8, 8))
    loss.backward()
    assert float(loss) == 0.0 and warped.grad is not None and float(warped.grad.abs().sum()) == 0.0


def test_synthmorph_overlay_trains_on_synthetic_pairs_and_validates_on_fixed_labelled_ones(tmp_path):
    """Wiring: the overlay's pairs reach the trainer and the evaluator, and the label loss moves the network. That
    it learns to register is a longer run's result (docs/experiments.md: the 2D SynthMorph run's validation Dice)."""
    overrides = {
        "output_dir": tmp_path / "out",
        "synthmorph_size": "[32, 32]",
        "synthmorph_labels": 6,
        "num_pairs_per_epoch": 160,
        "max_epochs": 10,
        "val_interval": 10,
    }
    output = check_ok(run_bundle("training", TRAINING, overrides))
    (report_file,) = (tmp_path / "out" / "runs").glob("*/validation/metrics.json")
    summary = json.loads(report_file.read_text())["summary"]
    assert summary["pairs"] == 8 and summary["scored_pairs"] == 8  # the fixed, labelled synthetic validation pairs
    # the field moved: measured on the field itself. (Dice after 10 short epochs at 32 x 32 can be exactly the
    # identity's, a sub-voxel field leaving every nearest-neighbour label in place: std log|J| 0.012 on this machine.)
    assert summary["registered_std_log_jacobian"] > 1e-3, output[-3000:]
    assert summary["registered_mean_dice"] > summary["identity_mean_dice"] - 0.01  # and did not make things worse
    assert summary["registered_folding_fraction"] < 0.01
    assert (tmp_path / "out" / "models" / "model.pt").is_file()
