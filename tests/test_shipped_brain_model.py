"""The shipped 3D brain model registers the real OASIS pair with no flag but the files (moving b -> fixed a).

These are regression checks of the out-of-the-box path, not the benchmark: the figures of record come from
``benchmarks/oasis_benchmark.py``. The thresholds sit well below the measured values and well above no registration.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import CONFIGS, SHARED_DATA, check_ok, requires_shared_data, run_bundle
from scripts.metrics import dice_per_label, labels_to_score, resolve_label_ids

INFERENCE = str(CONFIGS / "inference.yaml")
DATA = SHARED_DATA / "oasis3d"


def _register(tmp_path, **extra) -> dict:
    """The README's command: fixed, moving, moving label, output folder (plus ``extra`` flags)."""
    out = tmp_path / "out"
    overrides = {
        "fixed_image": DATA / "subject_a_image.nii.gz",
        "moving_image": DATA / "subject_b_image.nii.gz",
        "moving_label": DATA / "subject_b_label.nii.gz",
        "output_dir": out,
        **extra,
    }
    check_ok(run_bundle("inference", [INFERENCE], overrides))
    fixed = nib.load(str(DATA / "subject_a_image.nii.gz"))
    for name in ("warped_image", "warped_label", "ddf"):
        written = nib.load(str(out / f"{name}.nii.gz"))
        assert written.shape[:3] == fixed.shape and np.allclose(written.affine, fixed.affine, atol=1e-5), name
    assert (out / "overview.png").stat().st_size > 0
    record = json.loads((out / "metrics.json").read_text())
    # scored here, from the written files, on the 30 structures of eval_labels.json
    fixed_label = np.asarray(nib.load(str(DATA / "subject_a_label.nii.gz")).dataobj).astype(np.int32)
    moving_label = np.asarray(nib.load(str(DATA / "subject_b_label.nii.gz")).dataobj).astype(np.int32)
    warped_label = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj).astype(np.int32)
    ids = labels_to_score(fixed_label, moving_label, resolve_label_ids(str(DATA / "eval_labels.json")))
    record["test_identity_dice"] = float(np.mean(list(dice_per_label(fixed_label, moving_label, ids).values())))
    record["test_registered_dice"] = float(np.mean(list(dice_per_label(fixed_label, warped_label, ids).values())))
    return record


@requires_shared_data
def test_flag_free_3d_inference_refines_the_shipped_model(tmp_path):
    """No fixed label (an unlabelled pair), no flag: the shipped model, then the default refinement."""
    record = _register(tmp_path)
    levels = record["refinement"]["levels"]
    assert [level["factor"] for level in levels] == [4, 2]
    assert record["network_passes"] == 1  # refinement starts from one pass
    assert all(level["loss_end"] < level["loss_start"] for level in levels)
    assert record["test_registered_dice"] > record["test_identity_dice"] + 0.15, record["test_registered_dice"]
    assert record["folding_fraction"] < 5e-4
    assert record["seconds_load_to_write"] >= record["seconds"] > record["refinement"]["seconds"]


@requires_shared_data
def test_network_alone_with_refine_iterations_zero(tmp_path):
    record = _register(
        tmp_path,
        refine_iterations=0,
        fixed_label=DATA / "subject_a_label.nii.gz",
        eval_label_ids=DATA / "eval_labels.json",
    )
    assert "refinement" not in record
    assert record["network_passes"] == 2  # the network alone runs twice
    assert record["registered_mean_dice"] == pytest.approx(record["test_registered_dice"])  # metrics.json agrees
    assert record["test_registered_dice"] > record["test_identity_dice"] + 0.01, record["test_registered_dice"]
    assert record["folding_fraction"] < 5e-4


def _oasis2d_pair(tmp_path, labels: bool) -> dict:
    """Inference overrides for the OASIS slice pair (moving subject_b, fixed subject_a), output in ``tmp_path/out``."""
    data = SHARED_DATA / "oasis2d"
    overrides = {
        "fixed_image": data / "subject_a_image.nii.gz",
        "moving_image": data / "subject_b_image.nii.gz",
        "output_dir": tmp_path / "out",
    }
    if labels:
        overrides.update(fixed_label=data / "subject_a_label.nii.gz", moving_label=data / "subject_b_label.nii.gz")
    return overrides


@requires_shared_data
def test_2d_files_get_a_message_naming_the_model_to_train(tmp_path):
    overrides = {**_oasis2d_pair(tmp_path, labels=False), "ckpt_dir": tmp_path / "no_models_here"}
    process = run_bundle("inference", [INFERENCE], overrides)
    assert process.returncode != 0
    output = process.stdout + process.stderr
    assert "checkpoint not found" in output and "train one with" in output, output[-3000:]
    assert "bundle/models/2d/model.pt" in output  # names the shipped 2D model too
    assert not (tmp_path / "out").exists()


@requires_shared_data
def test_flag_free_2d_inference_uses_the_shipped_2d_model(tmp_path):
    """2D files, no flag: the shipped 2D model (random label maps, then the real 2D cohort) and the default refinement
    register the real OASIS slices without folding (the network-alone path is the 3D test's)."""
    process = run_bundle("inference", [INFERENCE], _oasis2d_pair(tmp_path, labels=True))
    check_ok(process)
    assert "models/2d/model.pt" in process.stdout + process.stderr  # the log names the weights it loaded
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [level["factor"] for level in record["refinement"]["levels"]] == [2, 1]
    assert record["registered_mean_dice"] > record["identity_mean_dice"] + 0.1, record["registered_mean_dice"]
    assert record["folding_fraction"] < 5e-4


def test_shipped_2d_weights_fit_the_2d_network_of_inference_yaml():
    """models/2d/model.pt loads strictly into the network inference.yaml builds for 2D files."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser["spatial_dims"] = 2
    parser["bundle_root"] = str(CONFIGS.parent)
    network = parser.get_parsed_content("network_def")
    weights = CONFIGS.parent / "models" / "2d" / "model.pt"
    assert weights.stat().st_size < 25 * 1024 * 1024
    network.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    with torch.no_grad():
        ddf = network(torch.rand(1, 2, 160, 192))
    assert ddf.shape == (1, 2, 160, 192) and torch.isfinite(ddf).all()


@pytest.mark.parametrize("weights", ["model.pt", "2d/model.pt"])
def test_shipped_weights_load_on_a_cpu_with_a_plain_torch_load(weights):
    """Weights trained on a GPU keep their device in the file unless saved as CPU copies; a plain ``torch.load`` (as
    ``--init_ckpt`` and users do) then fails on a machine without one. Every shipped file must hold CPU tensors."""
    import torch

    state = torch.load(CONFIGS.parent / "models" / weights, weights_only=True)
    assert state and {tensor.device.type for tensor in state.values()} == {"cpu"}
    assert all(torch.isfinite(tensor).all() for tensor in state.values() if tensor.is_floating_point())


@pytest.mark.parametrize("content", [b"", b"not a torch file"])
def test_missing_or_corrupt_weights_name_the_file(tmp_path, content):
    fixed = tmp_path / "f.nii.gz"
    image = nib.Nifti1Image(np.random.default_rng(0).random((24, 20, 16), dtype=np.float32), np.eye(4))
    nib.save(image, str(fixed))
    weights = tmp_path / "model.pt"
    if content:
        weights.write_bytes(content)
    overrides = {"fixed_image": fixed, "moving_image": fixed, "ckpt_path": weights, "output_dir": tmp_path / "out"}
    process = run_bundle("inference", [INFERENCE], overrides)
    assert process.returncode != 0
    output = process.stdout + process.stderr
    assert f"checkpoint {'not found' if not content else ''}" in output and str(weights) in output, output[-3000:]


def test_a_pair_too_large_for_memory_is_refused_with_the_need_and_the_way_out(tmp_path, monkeypatch):
    from scripts import datalist

    fixed = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), dtype=np.float32), np.diag([0.5, 0.5, 0.5, 1.0])), str(fixed))
    needed = datalist.check_fits_in_memory(str(fixed), 1.0)
    assert needed == pytest.approx(datalist.BASE_BYTES + datalist.BYTES_PER_VOXEL * 32**3)  # resampled to 1 mm
    monkeypatch.setattr(
        datalist, "_available_bytes", lambda: datalist.BASE_BYTES + datalist.BYTES_PER_VOXEL * 32**3 / 2
    )
    with pytest.raises(MemoryError, match=r"big.nii.gz \(--fixed_image\).*needs about .* GiB.*--pixdim 2"):
        datalist.check_fits_in_memory(str(fixed), 1.0)
    assert datalist.check_fits_in_memory(str(fixed), 2.0) < needed  # the way out the message names works
