"""End to end on real OASIS brains from ../shared/data (skipped, with the reason, where that folder is absent).

Pair of record: moving = subject_b, fixed = subject_a (the pair of the reference table in shared/data/README.md).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from conftest import CONFIGS, SHARED_DATA, check_ok, requires_shared_data, run_bundle

TRAIN = str(CONFIGS / "train.yaml")
EVALUATE = str(CONFIGS / "evaluate.yaml")
INFERENCE = str(CONFIGS / "inference.yaml")
BRAIN3D = str(CONFIGS / "brain3d.yaml")


def _write_datalist(folder, data, with_atlas: bool) -> str:
    subjects = [
        {"image": str(data / f"subject_{s}_image.nii.gz"), "label": str(data / f"subject_{s}_label.nii.gz")}
        for s in ("a", "b")
    ]
    datalist = {
        "training": subjects,
        "validation": subjects,
        "test": subjects,
        "pairs": {"test": [{"fixed": subjects[0]["image"], "moving": subjects[1]["image"]}]},
    }
    if with_atlas:
        datalist["atlas"] = {"image": str(data / "atlas_image.nii.gz"), "label": str(data / "atlas_label.nii.gz")}
    path = folder / "datalist.json"
    path.write_text(json.dumps(datalist))
    return str(path)


def _check_inference_overlays_fixed(out, fixed_image, moving_label):
    fixed = nib.load(fixed_image)
    for name in ("warped_image", "warped_label", "ddf"):
        written = nib.load(str(out / f"{name}.nii.gz"))
        np.testing.assert_allclose(written.affine, fixed.affine, atol=1e-5)
        assert written.shape[:3] == fixed.shape, name
    warped = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    assert set(np.unique(warped)) <= set(np.unique(np.asarray(nib.load(moving_label).dataobj)))
    record = json.loads((out / "metrics.json").read_text())
    assert record["moving"] == "subject_b_image" and record["fixed"] == "subject_a_image"
    return record


@requires_shared_data
def test_oasis2d_atlas_mode_train_evaluate_infer(tmp_path):
    data = SHARED_DATA / "oasis2d"
    common = {
        "datalist": _write_datalist(tmp_path, data, with_atlas=True),
        "spatial_dims": 2,
        "spatial_size": "[160,192]",
        "pair_mode": "atlas",
        "atlas_direction": "both",
        "output_dir": tmp_path / "out",
        "ckpt_dir": tmp_path / "models",
    }
    check_ok(run_bundle("training", [TRAIN], {**common, "max_epochs": 1, "batch_size": 2, "val_interval": 1}))
    (validation_report,) = (tmp_path / "out" / "runs").glob("*/validation/metrics.json")  # the run's own folder
    validation = json.loads(validation_report.read_text())
    assert validation["summary"]["pairs"] == 4  # two subjects, both directions to and from the atlas
    assert {p["fixed"] for p in validation["pairs"]} == {"atlas_image", "subject_a_image", "subject_b_image"}

    check_ok(run_bundle("evaluating", [TRAIN, EVALUATE], common))
    report = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    assert report["summary"]["pairs"] == 1  # the explicit test pair
    assert report["pairs"][0]["moving"] == "subject_b_image" and report["pairs"][0]["fixed"] == "subject_a_image"
    assert 0.2 < report["summary"]["identity_mean_dice"] < 0.8

    infer = {
        "spatial_dims": 2,
        "ckpt_dir": tmp_path / "models",
        "output_dir": tmp_path / "infer",
        "fixed_image": data / "subject_a_image.nii.gz",
        "moving_image": data / "subject_b_image.nii.gz",
        "moving_label": data / "subject_b_label.nii.gz",
        "fixed_label": data / "subject_a_label.nii.gz",
    }
    check_ok(run_bundle("inference", [INFERENCE], infer))
    record = _check_inference_overlays_fixed(
        tmp_path / "infer", str(data / "subject_a_image.nii.gz"), str(data / "subject_b_label.nii.gz")
    )
    # same pair, same grid: the inference identity baseline equals evaluation's
    assert abs(record["identity_mean_dice"] - report["pairs"][0]["identity_mean_dice"]) < 1e-9


@requires_shared_data
def test_oasis3d_train_evaluate_then_infer_at_full_resolution(tmp_path):
    """Training and evaluation at 2 mm keep the CPU test short; inference runs on the full 1 mm grid."""
    data = SHARED_DATA / "oasis3d"
    eval_labels = data / "eval_labels.json"
    common = {
        "datalist": _write_datalist(tmp_path, data, with_atlas=False),
        "spatial_dims": 3,
        "pixdim": 2.0,
        "spatial_size": "[80,96,112]",
        "eval_label_ids": f"'{eval_labels}'",
        "output_dir": tmp_path / "out",
        "ckpt_dir": tmp_path / "models",
    }
    check_ok(
        run_bundle(
            "training",
            [TRAIN, BRAIN3D],  # the shipped brain model's network, so inference.yaml's 3D network fits it
            {
                **common,
                "max_epochs": 1,
                "num_pairs_per_epoch": 2,
                "batch_size": 1,
                "val_batch_size": 1,
                "val_interval": 1,
            },
        )
    )
    check_ok(run_bundle("evaluating", [TRAIN, BRAIN3D, EVALUATE], common))
    report = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    pair = report["pairs"][0]
    wanted = set(json.loads(eval_labels.read_text())["labels"])
    assert {int(k) for k in pair["identity_dice"]} <= wanted
    assert len(pair["identity_dice"]) >= 25  # most of the 30 structures are in both brains
    # shared/data/README.md: no registration scores 0.522 on these 30 structures at 1 mm; 2 mm is close to it
    assert 0.45 < pair["identity_mean_dice"] < 0.6

    infer = {
        "spatial_dims": 3,
        "ckpt_dir": tmp_path / "models",
        "output_dir": tmp_path / "infer",
        "fixed_image": data / "subject_a_image.nii.gz",
        "moving_image": data / "subject_b_image.nii.gz",
        "moving_label": data / "subject_b_label.nii.gz",
        "fixed_label": data / "subject_a_label.nii.gz",
        "eval_label_ids": f"'{eval_labels}'",
    }
    check_ok(run_bundle("inference", [INFERENCE], infer))
    record = _check_inference_overlays_fixed(
        tmp_path / "infer", str(data / "subject_a_image.nii.gz"), str(data / "subject_b_label.nii.gz")
    )
    assert abs(record["identity_mean_dice"] - 0.522) < 0.005  # full resolution reproduces the reference figure
