"""End to end on the embedded synthetic data, through the real CLI: train -> evaluate -> infer, in 2D and 3D."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import CONFIGS, check_ok, run_bundle

TRAIN = str(CONFIGS / "train.yaml")
EVALUATE = str(CONFIGS / "evaluate.yaml")
INFERENCE = str(CONFIGS / "inference.yaml")


# 2D runs the defaults (unsupervised LNCC + bending energy, VoxelMorph UNet, 7 integration steps); 3D runs the
# alternatives a user switches on by override: MSE, semi-supervised Dice on training labels, LocalNet, no integration.
OPTIONS = {
    2: {},
    3: {
        "similarity": "mse",
        "label_weight": 0.5,
        "train_label_ids": "[1,2,3,4,5,6,7,8]",
        "backbone_name": "localnet",
        "integration_steps": 0,
    },
}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_train_evaluate_infer_on_synthetic_data(tmp_path, spatial_dims):
    options = OPTIONS[spatial_dims]
    common = {
        **options,
        "spatial_dims": spatial_dims,
        "synthetic_dir": tmp_path / "synthetic",
        "synthetic#num_subjects": 10,
        "synthetic#num_validation": 2,
        "synthetic#num_test": 2,
        "output_dir": tmp_path / "out",
        "ckpt_dir": tmp_path / "models",
    }
    train = {**common, "max_epochs": 2, "num_pairs_per_epoch": 4, "batch_size": 2, "val_interval": 1, "val_hd95": True}
    output = check_ok(run_bundle("training", [TRAIN], train))
    assert "registration report" in output and "identity" in output
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    assert (tmp_path / "models" / "model.pt").is_file() and (run_dir / "model_final.pt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    validation = json.loads((run_dir / "validation" / "metrics.json").read_text())
    assert validation["summary"]["pairs"] == 2

    check_ok(run_bundle("evaluating", [TRAIN, EVALUATE], common))
    report = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    summary = report["summary"]
    assert summary["pairs"] == 2 and len(report["pairs"]) == 2
    for key in (
        "identity_mean_dice",
        "registered_mean_dice",
        "registered_dsc30",
        "registered_mean_hd95",
        "identity_mean_hd95",
        "registered_folding_fraction",
        "registered_std_log_jacobian",
        "registered_sdlogj_learn2reg",
        "registered_seconds",
    ):
        assert np.isfinite(summary[key]), key
    assert 0.0 < summary["identity_mean_dice"] < 1.0
    assert set(report["pairs"][0]["registered_dice"]) == set(report["pairs"][0]["identity_dice"])
    csv_lines = (tmp_path / "out" / "eval" / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and "registered_dice_" in csv_lines[0]

    datalist = json.loads((tmp_path / "synthetic" / "datalist.json").read_text())
    fixed, moving = (str(tmp_path / "synthetic" / datalist["test"][i]["image"]) for i in (0, 1))
    moving_label = str(tmp_path / "synthetic" / datalist["test"][1]["label"])
    network_options = {k: v for k, v in options.items() if k in ("backbone_name", "integration_steps")}
    infer = {
        **network_options,
        "spatial_dims": spatial_dims,
        "ckpt_dir": tmp_path / "models",
        "output_dir": tmp_path / "infer",
        "fixed_image": fixed,
        "moving_image": moving,
        "moving_label": moving_label,
    }
    check_ok(run_bundle("inference", [INFERENCE], infer))
    fixed_nifti = nib.load(fixed)
    for name in ("warped_image", "warped_label", "ddf"):
        written = nib.load(str(tmp_path / "infer" / f"{name}.nii.gz"))
        np.testing.assert_allclose(written.affine, fixed_nifti.affine)
        assert written.shape[:3] == fixed_nifti.shape
    assert nib.load(str(tmp_path / "infer" / "ddf.nii.gz")).shape[3:] == (1, spatial_dims)
    warped_label = np.asarray(nib.load(str(tmp_path / "infer" / "warped_label.nii.gz")).dataobj)
    assert set(np.unique(warped_label)) <= set(np.unique(np.asarray(nib.load(moving_label).dataobj)))
    assert (tmp_path / "infer" / "overview.png").stat().st_size > 10_000
    assert not list((tmp_path / "infer").glob(".tmp*"))


def test_training_without_any_labels_still_saves_model_pt(tmp_path):
    """Unlabelled cohorts are the point of unsupervised registration: no Dice to rank by, so the latest is kept."""
    from scripts.synthetic import ensure_synthetic_dataset

    source = ensure_synthetic_dataset(
        str(tmp_path / "synthetic"), dict(spatial_dims=2, shape=[64, 64], num_subjects=6, num_validation=2, num_test=1)
    )
    content = json.loads(open(source).read())
    unlabelled = {
        section: [{"image": entry["image"]} for entry in content[section]]
        for section in ("training", "validation", "test")
    }
    datalist = tmp_path / "synthetic" / "unlabelled.json"
    datalist.write_text(json.dumps(unlabelled))
    overrides = {
        "datalist": datalist,
        "spatial_size": "[64,64]",
        "output_dir": tmp_path / "out",
        "ckpt_dir": tmp_path / "models",
        "max_epochs": 1,
        "num_pairs_per_epoch": 2,
        "batch_size": 2,
        "val_interval": 1,
    }
    output = check_ok(run_bundle("training", [TRAIN], overrides))
    assert "saving the latest" in output
    assert (tmp_path / "models" / "model.pt").is_file()
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    summary = json.loads((run_dir / "validation" / "metrics.json").read_text())["summary"]
    assert summary["pairs"] == 2 and "registered_mean_dice" not in summary
    assert summary["registered_folding_fraction"] >= 0.0
