"""Inference outputs land on the fixed file's own grid: orientation, slice position and shape kept, DDF converted."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, check_ok, run_bundle
from monai.bundle import ConfigParser
from scripts.apply_ddf import apply_ddf
from scripts.integrate import warp
from scripts.synthetic import SyntheticSpec, generate_subjects


@pytest.fixture(scope="module")
def pair_and_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("geometry")
    subjects, _ = generate_subjects(
        SyntheticSpec(spatial_dims=2, shape=[64, 64], num_subjects=4, num_validation=1, num_test=1, seed=7)
    )
    affine = np.eye(4)
    affine[2, 3] = 100.0  # a slice taken at z = 100 mm must stay there
    files = {}
    for name, (image, label) in zip(("fixed", "moving"), subjects[:2]):
        for kind, array in (("image", image), ("label", label)):
            files[f"{name}_{kind}"] = str(folder / f"{name}_{kind}.nii.gz")
            nib.save(nib.Nifti1Image(array[..., None], affine), files[f"{name}_{kind}"])
    # The same fixed slice stored flipped along the first axis (L-A-S instead of R-A-S).
    flipped_affine = affine.copy()
    flipped_affine[0, 0], flipped_affine[0, 3] = -1.0, 63.0
    files["fixed_flipped"] = str(folder / "fixed_flipped.nii.gz")
    nib.save(nib.Nifti1Image(subjects[0][0][::-1, :, None].copy(), flipped_affine), files["fixed_flipped"])
    files["moving_flipped"] = str(folder / "moving_flipped.nii.gz")
    nib.save(nib.Nifti1Image(subjects[1][0][::-1, :, None].copy(), flipped_affine), files["moving_flipped"])
    # The same moving slice with 4 more voxels of background on either side of the first axis (origin 4 mm lower): a
    # larger field of view, resampled onto the fixed grid in world coordinates before registering.
    padded_affine = affine.copy()
    padded_affine[0, 3] = -4.0
    files["moving_padded"] = str(folder / "moving_padded.nii.gz")
    padded = np.pad(subjects[1][0], ((4, 4), (0, 0)))
    nib.save(nib.Nifti1Image(padded[:, :, None], padded_affine), files["moving_padded"])
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    parser.update({"spatial_dims": 2})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    # a visibly non-zero field, so the DDF conversion is exercised
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    flow_head = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.normal_(flow_head.weight, std=2.0)
    torch.save(network.state_dict(), folder / "model.pt")
    return folder, files


def _infer(folder, files, fixed_key, out):
    overrides = {
        "fixed_image": files[fixed_key],
        "moving_image": files["moving_image"],
        "moving_label": files["moving_label"],
        "ckpt_path": folder / "model.pt",
        "output_dir": out,
        "refine_iterations": 0,  # the network's own field: this test is about geometry, not optimisation
        "affine": False,  # the pre-aligned path's geometry (tests/test_affine.py: the affine stage's)
    }
    check_ok(run_bundle("inference", [str(CONFIGS / "inference.yaml")], overrides))
    return {name: nib.load(str(out / f"{name}.nii.gz")) for name in ("warped_image", "warped_label", "ddf")}


def test_outputs_carry_the_fixed_files_affine_and_follow_its_orientation(pair_and_checkpoint, tmp_path):
    folder, files = pair_and_checkpoint
    plain = _infer(folder, files, "fixed_image", tmp_path / "plain")
    flipped = _infer(folder, files, "fixed_flipped", tmp_path / "flipped")
    fixed_affine = nib.load(files["fixed_image"]).affine
    for name in plain:
        np.testing.assert_allclose(plain[name].affine, fixed_affine)
        np.testing.assert_allclose(flipped[name].affine, nib.load(files["fixed_flipped"]).affine)
        assert plain[name].shape[:3] == flipped[name].shape[:3] == (64, 64, 1)
    label, label_flipped = (np.asarray(o["warped_label"].dataobj) for o in (plain, flipped))
    assert len(np.unique(label)) > 3
    np.testing.assert_array_equal(label_flipped, label[::-1])  # same anatomy at the same world positions
    image, image_flipped = (o["warped_image"].get_fdata() for o in (plain, flipped))
    np.testing.assert_allclose(image_flipped, image[::-1], atol=1e-5)
    ddf, ddf_flipped = (o["ddf"].get_fdata() for o in (plain, flipped))
    assert np.abs(ddf).max() > 0.5
    # axis 0 runs the other way in the flipped file: its displacement component changes sign
    np.testing.assert_allclose(ddf_flipped[..., 0], -ddf[::-1, ..., 0], atol=1e-4)
    np.testing.assert_allclose(ddf_flipped[..., 1], ddf[::-1, ..., 1], atol=1e-4)


def test_inverse_field_lands_on_the_moving_files_grid_and_undoes_the_forward_field(pair_and_checkpoint, tmp_path):
    """``--write_inverse_ddf true`` writes φ⁻¹ on the moving file's grid with its affine: a moving file stored flipped
    gives the same field flipped (the network sees the same RAS arrays), one with a larger field of view the same
    field inside the fixed one and zero outside; on a shared grid φ ∘ φ⁻¹ ≈ identity."""
    folder, files = pair_and_checkpoint
    written = {}
    for moving_key in ("moving_image", "moving_flipped", "moving_padded"):
        out = tmp_path / moving_key
        overrides = {
            "fixed_image": files["fixed_image"],
            "moving_image": files[moving_key],
            "ckpt_path": folder / "model.pt",
            "output_dir": out,
            "refine_iterations": 0,
            "write_inverse_ddf": "true",  # as the command line passes it
            "affine": "false",  # the pre-aligned path's geometry (tests/test_affine.py: the affine stage's)
        }
        check_ok(run_bundle("inference", [str(CONFIGS / "inference.yaml")], overrides))
        written[moving_key] = (nib.load(str(out / "inverse_ddf.nii.gz")), nib.load(str(out / "ddf.nii.gz")))
        np.testing.assert_allclose(written[moving_key][0].affine, nib.load(files[moving_key]).affine)
        assert written[moving_key][0].shape == nib.load(files[moving_key]).shape[:3] + (1, 2)
        assert written[moving_key][0].header.get_intent()[0] == "vector"
        consistency = json.loads((out / "metrics.json").read_text())["inverse_consistency"]
        assert 0 <= consistency["mean_voxels"] <= consistency["p99_voxels"] <= consistency["max_voxels"]
    inverse, ddf = (np.asarray(image.dataobj)[:, :, 0, 0, :] for image in written["moving_image"])
    flipped = np.asarray(written["moving_flipped"][0].dataobj)[:, :, 0, 0, :]
    assert np.abs(inverse).max() > 0.5
    np.testing.assert_allclose(flipped[..., 0], -inverse[::-1, :, 0], atol=1e-4)
    np.testing.assert_allclose(flipped[..., 1], inverse[::-1, :, 1], atol=1e-4)
    # the larger moving file: the same field on its own grid (4 voxels in), nothing outside the fixed field of view
    padded = np.asarray(written["moving_padded"][0].dataobj)[:, :, 0, 0, :]
    assert padded.shape == (72, 64, 2)
    np.testing.assert_allclose(padded[4:-4], inverse, atol=1e-4)
    assert np.abs(padded[:4]).max() == 0 and np.abs(padded[-4:]).max() == 0
    # φ(φ⁻¹(x)) - x = u⁻¹(x) + u(x + u⁻¹(x)), away from the border where φ⁻¹ leaves the grid
    to_tensor = lambda field: torch.as_tensor(np.moveaxis(field, -1, 0)[None].copy())  # noqa: E731
    residual = to_tensor(inverse) + warp(to_tensor(ddf), to_tensor(inverse), mode="bilinear", padding_mode="border")
    assert residual[..., 8:-8, 8:-8].abs().mean() < 0.1 * np.abs(ddf).mean(), (
        float(residual[..., 8:-8, 8:-8].abs().mean()),
        float(np.abs(ddf).mean()),
    )


def test_apply_ddf_reproduces_the_warped_label_and_carries_the_fixed_label_onto_the_moving_grid(
    pair_and_checkpoint, tmp_path
):
    """``scripts/apply_ddf.py`` warps a file on its own grid with a field the bundle wrote: the moving label stored
    with a larger field of view, warped by ``ddf.nii.gz``, is the run's ``warped_label``; the fixed label warped by
    ``inverse_ddf.nii.gz`` lands on the moving file's grid and, warped back, on the fixed label. Bad input is named."""
    folder, files = pair_and_checkpoint
    padded_label = tmp_path / "moving_padded_label.nii.gz"
    moving_label = nib.load(files["moving_label"])
    padded = np.pad(np.asarray(moving_label.dataobj)[:, :, 0], ((4, 4), (0, 0)))[:, :, None]
    nib.save(nib.Nifti1Image(padded, nib.load(files["moving_padded"]).affine), str(padded_label))
    out = tmp_path / "run"
    overrides = {
        "fixed_image": files["fixed_image"],
        "moving_image": files["moving_padded"],
        "moving_label": str(padded_label),
        "ckpt_path": folder / "model.pt",
        "output_dir": out,
        "refine_iterations": 0,
        "write_inverse_ddf": True,
        "affine": False,  # the pre-aligned path (tests/test_affine.py applies the affine stage's fields)
    }
    check_ok(run_bundle("inference", [str(CONFIGS / "inference.yaml")], overrides))
    warped = apply_ddf(str(out / "ddf.nii.gz"), str(padded_label), str(tmp_path / "warped.nii.gz"), label=True)
    expected = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    assert warped.shape == expected.shape == (64, 64, 1) and len(np.unique(expected)) > 3
    assert (warped == expected).mean() > 0.995, (warped != expected).sum()
    np.testing.assert_allclose(nib.load(str(tmp_path / "warped.nii.gz")).affine, nib.load(files["fixed_image"]).affine)

    fixed_label = np.asarray(nib.load(files["fixed_label"]).dataobj)
    on_moving = tmp_path / "fixed_label_on_moving.nii.gz"
    carried = apply_ddf(str(out / "inverse_ddf.nii.gz"), files["fixed_label"], str(on_moving), label=True)
    assert carried.shape == (72, 64, 1) and carried.dtype == np.int16
    np.testing.assert_allclose(nib.load(str(on_moving)).affine, nib.load(files["moving_padded"]).affine)
    assert np.abs(carried[:4]).max() == 0 and np.abs(carried[-4:]).max() == 0  # outside the fixed field of view
    back = apply_ddf(str(out / "ddf.nii.gz"), str(on_moving), label=True)
    inside = (slice(4, -4), slice(4, -4))
    assert (back[inside] == fixed_label[inside]).mean() > 0.97

    script = BUNDLE / "scripts" / "apply_ddf.py"
    missing, never = tmp_path / "nope.nii.gz", tmp_path / "never.nii.gz"
    command = [sys.executable, str(script), str(out / "ddf.nii.gz"), str(missing), str(never)]
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 1 and not never.exists()
    assert (
        failed.stderr.strip().splitlines()[-1] == f"ERROR: FileNotFoundError: {missing} (image to warp): file not found"
    )
    with pytest.raises(ValueError, match="vector field"):
        apply_ddf(files["fixed_image"], files["fixed_label"])


def test_warped_image_is_the_moving_file_in_its_own_intensities(pair_and_checkpoint, tmp_path):
    """``warped_image.nii.gz`` is the moving file itself resampled once through ``ddf.nii.gz``, in the file's own
    units (here ×800 + 20, as a scanner's): it equals ``apply_ddf.py ddf.nii.gz MOVING``, and since the percentile
    scaling makes the registration blind to such a change of units, the field is the same as for the [0, 1] file
    and the image is 800 · its warped image + 20."""
    folder, files = pair_and_checkpoint
    padded = nib.load(files["moving_padded"])
    scanner = tmp_path / "moving_scanner_units.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(padded.dataobj) * 800.0 + 20.0).astype(np.float32), padded.affine), scanner)
    written = {}
    for name, moving in (("unit", files["moving_padded"]), ("scanner", str(scanner))):
        out = tmp_path / name
        overrides = {
            "fixed_image": files["fixed_image"],
            "moving_image": moving,
            "ckpt_path": folder / "model.pt",
            "output_dir": out,
            "refine_iterations": 0,
            "affine": False,
        }
        check_ok(run_bundle("inference", [str(CONFIGS / "inference.yaml")], overrides))
        image = np.asarray(nib.load(str(out / "warped_image.nii.gz")).dataobj)
        written[name] = (image, np.asarray(nib.load(str(out / "ddf.nii.gz")).dataobj))
        np.testing.assert_allclose(image, apply_ddf(str(out / "ddf.nii.gz"), moving), rtol=1e-5, atol=1e-4)
    (unit, unit_ddf), (units, units_ddf) = written["unit"], written["scanner"]
    assert unit.dtype == units.dtype == np.float32 and unit.shape == units.shape == (64, 64, 1)
    np.testing.assert_allclose(units_ddf, unit_ddf, atol=1e-4)
    assert np.abs(unit_ddf).max() > 0.5
    inside = (slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(units[inside], 800.0 * unit[inside] + 20.0, rtol=1e-4, atol=1e-2)
    assert units[inside].max() > 400.0
