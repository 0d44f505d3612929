"""The benchmark's scoring and its ITK (LPS mm) -> fixed-voxel field conversion, on a small synthetic volume.

The grid is deliberately awkward (axes permuted, one flipped, anisotropic, shifted), so a sign flip, a missed
LPS/RAS flip or swapped axes all move the label and break Dice = 1. Expected voxel displacements are worked out by
hand from the affine, not with the formula under test. ANTs / Greedy parts run only where those packages are installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("oasis_benchmark", REPO / "benchmarks" / "oasis_benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = benchmark  # dataclasses look their module up while the file executes
spec.loader.exec_module(benchmark)

# array axis 0 -> anterior (+y RAS) at 1.2 mm, axis 1 -> left (-x RAS) at 1.5 mm, axis 2 -> superior (+z) at 2 mm
AFFINE = np.array([[0.0, -1.5, 0.0, 40.0], [1.2, 0.0, 0.0, -12.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (20, 22, 18)
# LPS mm: 3 mm to the left, 2.4 mm to the posterior, 4 mm to the superior ...
D_LPS = np.array([3.0, 2.4, 4.0])
# ... is, along the array axes: 2.4 mm posterior = -2 voxels of axis 0 (anterior, 1.2 mm); 3 mm left = +2 voxels of
# axis 1 (left, 1.5 mm); 4 mm superior = +2 voxels of axis 2 (superior, 2 mm).
U_VOXELS = np.array([-2.0, 2.0, 2.0])
LABEL_IDS = [1, 2, 3]


def _labels() -> tuple[np.ndarray, np.ndarray]:
    """A moving label map and the fixed one it becomes under ``warped(x) = moving(x + U_VOXELS)``."""
    moving = np.zeros(SHAPE, dtype=np.int32)
    moving[4:12, 3:9, 4:10] = 1
    moving[9:15, 10:16, 6:12] = 2
    moving[5:9, 12:18, 3:7] = 3
    fixed = np.zeros_like(moving)
    shift = U_VOXELS.astype(int)
    source = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(shift, SHAPE))
    target = tuple(slice(max(-s, 0), n + min(-s, 0)) for s, n in zip(shift, SHAPE))
    fixed[target] = moving[source]  # fixed(x) = moving(x + shift)
    return moving, fixed


def _constant_field(vector: np.ndarray) -> np.ndarray:
    """ITK's NIfTI layout of a displacement field: ``(X, Y, Z, 1, 3)``."""
    return np.broadcast_to(np.asarray(vector, dtype=np.float32), SHAPE + (1, 3)).copy()


def test_lps_field_converts_to_hand_computed_voxel_displacement():
    ddf = benchmark.itk_displacement_to_voxels(_constant_field(D_LPS), AFFINE)
    assert ddf.shape == (3,) + SHAPE
    np.testing.assert_allclose(ddf[:, 3, 4, 5], U_VOXELS, atol=1e-5)
    # a field already in RAS (NIfTI DISPVECT) skips the flip
    ras = benchmark.itk_displacement_to_voxels(_constant_field(D_LPS * [-1, -1, 1]), AFFINE, frame="RAS")
    np.testing.assert_allclose(ras[:, 0, 0, 0], U_VOXELS, atol=1e-5)


def _assert_each_wrong_convention_fails(moving: np.ndarray, fixed: np.ndarray, wrong: dict) -> None:
    """Warping with a field converted the wrong way (named by its key) must not reproduce the fixed labels."""
    for name, field in wrong.items():
        dice = benchmark.score(fixed, benchmark.warp_label(moving, field, AFFINE, AFFINE), field, LABEL_IDS)
        assert dice["mean_dice"] < 0.6, name


def test_known_translation_scores_perfectly_and_wrong_conventions_do_not():
    moving, fixed = _labels()
    identity = benchmark.score(fixed, moving, np.zeros((3,) + SHAPE, np.float32), LABEL_IDS)
    assert identity["mean_dice"] < 0.6

    ddf = benchmark.itk_displacement_to_voxels(_constant_field(D_LPS), AFFINE)
    warped = benchmark.warp_label(moving, ddf, AFFINE, AFFINE)
    result = benchmark.score(fixed, warped, ddf, LABEL_IDS)
    assert result["dice"] == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert result["mean_dice"] == 1.0
    assert result["folded_percent"] == 0.0 and result["std_log_jacobian"] == pytest.approx(0.0, abs=1e-6)

    wrong = {
        "sign": benchmark.itk_displacement_to_voxels(_constant_field(-D_LPS), AFFINE),
        "no LPS->RAS flip": benchmark.itk_displacement_to_voxels(_constant_field(D_LPS), AFFINE, frame="RAS"),
        "axes reversed": ddf[::-1].copy(),
    }
    _assert_each_wrong_convention_fails(moving, fixed, wrong)

    # the same physical warp when the moving label lies on another grid (here one voxel shifted along axis 1)
    moving_affine = AFFINE.copy()
    moving_affine[:3, 3] += AFFINE[:3, 1]
    shifted = np.zeros_like(moving)
    shifted[:, :-1] = moving[:, 1:]
    assert benchmark.score(fixed, benchmark.warp_label(shifted, ddf, AFFINE, moving_affine), ddf, LABEL_IDS)[
        "mean_dice"
    ] == pytest.approx(1.0, abs=1e-3)


def test_folding_is_reported_in_percent():
    ddf = np.zeros((3,) + SHAPE, np.float32)
    ddf[0] = -2.0 * np.arange(SHAPE[0], dtype=np.float32)[:, None, None]  # d(x + u)/dx = -1 everywhere
    moving, fixed = _labels()
    assert benchmark.score(fixed, fixed, ddf, LABEL_IDS)["folded_percent"] == pytest.approx(100.0)


def test_warp_file_loader_checks_grid_and_reads_intent(tmp_path):
    path = str(tmp_path / "warp.nii.gz")
    image = nib.Nifti1Image(_constant_field(D_LPS), AFFINE)
    image.header.set_intent(benchmark.NIFTI_INTENT_VECTOR)
    nib.save(image, path)
    np.testing.assert_allclose(benchmark.load_itk_displacement(path, AFFINE, SHAPE)[:, 1, 2, 3], U_VOXELS, atol=1e-5)
    with pytest.raises(ValueError, match="warp.nii.gz"):
        benchmark.load_itk_displacement(path, np.diag([1.0, 1.0, 1.0, 1.0]), SHAPE)
    ras = nib.Nifti1Image(_constant_field(D_LPS * [-1, -1, 1]), AFFINE)
    ras.header.set_intent(benchmark.NIFTI_INTENT_DISPVECT)
    nib.save(ras, path)
    np.testing.assert_allclose(benchmark.load_itk_displacement(path, AFFINE, SHAPE)[:, 0, 0, 0], U_VOXELS, atol=1e-5)


def test_table_and_failed_method_entries():
    table = benchmark.markdown_table(
        "b_to_a",
        {
            "moving_name": "b.nii.gz",
            "fixed_name": "a.nii.gz",
            "label_ids": LABEL_IDS,
            "methods": {
                "identity": {
                    "status": "ok",
                    "mean_dice": 0.5,
                    "folded_percent": 0.0,
                    "std_log_jacobian": 0.0,
                    "wall_s": 0.1,
                    "cpu_s": 0.1,
                },
                "bundle-network": {"status": "failed", "error": "exit 1: KeyError: 'refine_iterations'"},
            },
        },
        benchmark.METHODS,
    )
    assert "| identity | 0.500 | 0.000 | 0.000 | 0.1 | 0.1 |" in table
    assert "| bundle-network | failed: exit 1: KeyError: 'refine_iterations' |" in table
    assert "mean Dice (3 structures)" in table
    # a failed bundle run is reported by its cause, not by MONAI's wrapper that quotes the config expression
    log = (
        "Traceback (most recent call last):\n  ...\nFileNotFoundError: checkpoint not found: /x/model.pt\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "RuntimeError: Failed to evaluate ConfigExpression: \n\"$__local_refs['infer::evaluator'].run()\"\n"
    )
    assert benchmark._last_error_line(log) == "FileNotFoundError: checkpoint not found: /x/model.pt"


def _write_case(tmp_path) -> dict[str, str]:
    """Fixed image, moving label and the constant LPS field as files, for the tools' own resamplers."""
    moving, fixed = _labels()
    files = {name: str(tmp_path / f"{name}.nii.gz") for name in ("fixed", "moving_label", "warp")}
    nib.save(nib.Nifti1Image(fixed.astype(np.float32), AFFINE), files["fixed"])
    nib.save(nib.Nifti1Image(moving.astype(np.int16), AFFINE), files["moving_label"])
    warp = nib.Nifti1Image(_constant_field(D_LPS), AFFINE)
    warp.header.set_intent(benchmark.NIFTI_INTENT_VECTOR)  # what ANTs and Greedy write
    nib.save(warp, files["warp"])
    return files


def test_greedy_reads_the_field_as_the_benchmark_does(tmp_path):
    greedy = pytest.importorskip("picsl_greedy", reason="picsl-greedy not installed (requirements-benchmark.txt)")
    files = _write_case(tmp_path)
    out = str(tmp_path / "greedy_nn.nii.gz")
    greedy.Greedy3D().execute(
        f"-d 3 -threads 1 -V 0 -rf {files['fixed']} -ri NN -rm {files['moving_label']} {out} -r {files['warp']}"
    )
    moving, fixed = _labels()
    np.testing.assert_array_equal(benchmark.load_label(out)[0], fixed)


def test_ants_reads_the_field_as_the_benchmark_does(tmp_path):
    ants = pytest.importorskip("ants", reason="antspyx not installed (requirements-benchmark.txt)")
    files = _write_case(tmp_path)
    warped = ants.apply_transforms(
        ants.image_read(files["fixed"]),
        ants.image_read(files["moving_label"]),
        [files["warp"]],
        interpolator="nearestNeighbor",
    )
    out = str(tmp_path / "ants_nn.nii.gz")
    ants.image_write(warped, out)
    moving, fixed = _labels()
    np.testing.assert_array_equal(benchmark.load_label(out)[0], fixed)


# ------------------------------------------------------------------------------------------------ 2D slices (X x Y x 1)
# In-plane: array axis 0 -> anterior (+y RAS) at 1.2 mm, axis 1 -> left (-x RAS) at 1.5 mm (the AFFINE above); the
# singleton third axis -> superior at 2 mm. A 2D ITK field has 2 components, LPS x and y.
SHAPE_2D = (20, 22)
# LPS mm: 4.5 mm to the left, 2.4 mm to the posterior ...
D_LPS_2D = np.array([4.5, 2.4])
# ... is 2.4 mm posterior = -2 voxels of axis 0 (anterior, 1.2 mm) and 4.5 mm left = +3 voxels of axis 1 (left,
# 1.5 mm). Unequal magnitudes, so a sign error (2, -3), a missed LPS flip (2, -3) and swapped axes (3, -2) all differ.
U_VOXELS_2D = np.array([-2.0, 3.0])


def _labels_2d() -> tuple[np.ndarray, np.ndarray]:
    """2D moving label map and the fixed one it becomes under ``warped(x) = moving(x + U_VOXELS_2D)``."""
    moving = np.zeros(SHAPE_2D, dtype=np.int32)
    moving[4:12, 3:9] = 1
    moving[9:15, 10:16] = 2
    moving[5:9, 12:19] = 3
    fixed = np.zeros_like(moving)
    fixed[2:, :-3] = moving[:-2, 3:]  # fixed(i, j) = moving(i - 2, j + 3)
    return moving, fixed


def _constant_field_2d(vector: np.ndarray) -> np.ndarray:
    """ITK's NIfTI layout of a 2D displacement field: ``(X, Y, 1, 1, 2)``."""
    return np.broadcast_to(np.asarray(vector, dtype=np.float32), SHAPE_2D + (1, 1, 2)).copy()


def test_2d_lps_field_converts_to_hand_computed_voxel_displacement_and_scores_in_2d():
    assert benchmark.grid_shape(SHAPE_2D + (1,)) == SHAPE_2D and benchmark.grid_shape(SHAPE) == SHAPE
    ddf = benchmark.itk_displacement_to_voxels(_constant_field_2d(D_LPS_2D), AFFINE)
    assert ddf.shape == (2,) + SHAPE_2D
    np.testing.assert_allclose(ddf[:, 3, 4], U_VOXELS_2D, atol=1e-5)
    ras = benchmark.itk_displacement_to_voxels(_constant_field_2d(-D_LPS_2D), AFFINE, frame="RAS")
    np.testing.assert_allclose(ras[:, 0, 0], U_VOXELS_2D, atol=1e-5)

    moving, fixed = _labels_2d()
    assert benchmark.score(fixed, moving, np.zeros((2,) + SHAPE_2D, np.float32), LABEL_IDS)["mean_dice"] < 0.6
    result = benchmark.score(fixed, benchmark.warp_label(moving, ddf, AFFINE, AFFINE), ddf, LABEL_IDS)
    assert result["dice"] == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert result["folded_percent"] == 0.0 and result["std_log_jacobian"] == pytest.approx(0.0, abs=1e-6)
    wrong = {
        "sign": benchmark.itk_displacement_to_voxels(_constant_field_2d(-D_LPS_2D), AFFINE),
        "no LPS->RAS flip": benchmark.itk_displacement_to_voxels(_constant_field_2d(D_LPS_2D), AFFINE, frame="RAS"),
        "axes swapped": ddf[::-1].copy(),
    }
    _assert_each_wrong_convention_fails(moving, fixed, wrong)


def test_2d_field_files(tmp_path):
    # ITK / ANTs / Greedy warp: (X, Y, 1, 1, 2) LPS mm, on the slice's grid
    path = str(tmp_path / "warp2d.nii.gz")
    image = nib.Nifti1Image(_constant_field_2d(D_LPS_2D), AFFINE)
    image.header.set_intent(benchmark.NIFTI_INTENT_VECTOR)
    nib.save(image, path)
    np.testing.assert_allclose(benchmark.load_itk_displacement(path, AFFINE, SHAPE_2D)[:, 5, 6], U_VOXELS_2D, atol=1e-5)
    # a field in the frame ITK gives an X x Y x 1 file read as 2D (identity LPS direction) is refused
    with pytest.raises(ValueError, match="affine differs"):
        benchmark.load_itk_displacement(path, np.diag([-1.2, -1.5, 2.0, 1.0]), SHAPE_2D)
    # the bundle's ddf.nii.gz: (X, Y, 1, 1, 2), already fixed-grid voxels
    bundle = str(tmp_path / "ddf.nii.gz")
    vectors = np.zeros(SHAPE_2D + (1, 1, 2), np.float32)
    vectors[..., 0], vectors[..., 1] = 0.5, -1.5
    nib.save(nib.Nifti1Image(vectors, AFFINE), bundle)
    ddf = benchmark.load_bundle_ddf(bundle, SHAPE_2D)
    assert ddf.shape == (2,) + SHAPE_2D
    np.testing.assert_allclose(ddf[:, 1, 2], [0.5, -1.5])
    with pytest.raises(ValueError, match="3D NIfTI vector field"):  # a 2D field for a 3D grid
        benchmark.load_bundle_ddf(bundle, SHAPE_2D + (1,))


def _write_case_2d(tmp_path) -> dict[str, str]:
    """The 2D case as the data ships it (``X x Y x 1`` files), the tools' true-2D copies and the 2D LPS field."""
    moving, fixed = _labels_2d()
    files = {name: str(tmp_path / f"{name}.nii.gz") for name in ("fixed", "moving_label", "warp")}
    nib.save(nib.Nifti1Image(fixed[..., None].astype(np.float32), AFFINE), files["fixed"])
    nib.save(nib.Nifti1Image(moving[..., None].astype(np.int16), AFFINE), files["moving_label"])
    for name in ("fixed", "moving_label"):
        files[name] = benchmark.write_2d_slice(files[name], str(tmp_path / f"{name}_2d.nii.gz"))
    warp = nib.Nifti1Image(_constant_field_2d(D_LPS_2D), AFFINE)
    warp.header.set_intent(benchmark.NIFTI_INTENT_VECTOR)
    nib.save(warp, files["warp"])
    return files


def test_greedy2d_reads_the_2d_field_as_the_benchmark_does(tmp_path):
    greedy = pytest.importorskip("picsl_greedy", reason="picsl-greedy not installed (requirements-benchmark.txt)")
    files = _write_case_2d(tmp_path)
    out = str(tmp_path / "greedy_nn.nii.gz")
    greedy.Greedy2D().execute(
        f"-d 2 -threads 1 -V 0 -rf {files['fixed']} -ri NN -rm {files['moving_label']} {out} -r {files['warp']}"
    )
    np.testing.assert_array_equal(benchmark.load_label(out)[0], _labels_2d()[1])


def test_ants_reads_the_2d_field_as_the_benchmark_does(tmp_path):
    ants = pytest.importorskip("ants", reason="antspyx not installed (requirements-benchmark.txt)")
    files = _write_case_2d(tmp_path)
    fixed = ants.image_read(files["fixed"])
    assert fixed.dimension == 2
    warped = ants.apply_transforms(
        fixed, ants.image_read(files["moving_label"]), [files["warp"]], interpolator="nearestNeighbor"
    )
    np.testing.assert_array_equal(np.rint(warped.numpy()).astype(np.int32), _labels_2d()[1])


def test_known_warp_cases_are_seeded_smooth_invertible_and_keep_the_grid(tmp_path):
    """The validation protocol's known-warp cases (issue 31): the moving copy is the subject under a smooth
    diffeomorphism of the asked size, on the subject's own grid, the same for a seed and different across seeds."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import json

    from warp_cases import make_warp_case

    rng = np.random.default_rng(0)
    image = np.zeros((40, 44, 36), dtype=np.float32)
    image[6:34, 6:38, 6:30] = 0.5 + 0.5 * rng.random((28, 32, 24), dtype=np.float32)
    labels = np.zeros(image.shape, dtype=np.int16)
    labels[8:20, 8:40, 8:28], labels[20:32, 8:40, 8:28] = 3, 17
    for name, array in (("image", image), ("label", labels)):
        nib.save(nib.Nifti1Image(array, AFFINE), str(tmp_path / f"s_{name}.nii.gz"))
    cases = [
        make_warp_case(str(tmp_path / "s_image.nii.gz"), str(tmp_path / "s_label.nii.gz"), str(tmp_path), 3.0, seed, n)
        for seed, n in ((0, "a"), (0, "b"), (1, "c"))
    ]
    read = [[np.asarray(nib.load(path).dataobj) for path in case] for case in cases]
    assert np.array_equal(read[0][0], read[1][0]) and np.array_equal(read[0][1], read[1][1])  # seeded
    assert not np.array_equal(read[0][0], read[2][0])
    warped_image = nib.load(cases[0][0])
    assert warped_image.shape == image.shape and np.allclose(warped_image.affine, AFFINE)
    assert set(np.unique(read[0][1])) <= {0, 3, 17} and read[0][1].dtype == labels.dtype
    assert not np.array_equal(read[0][1], labels)  # it moved
    description = json.loads((tmp_path / "a.json").read_text())
    assert 2.5 <= description["largest_displacement_voxels"] <= 3.5
    assert description["folded_fraction"] == 0.0


def _small_training_subjects(data, seed: int):
    """Tiny stand-ins for oasis3d_train's v and w (image and label) in ``data``; returns ``data``."""
    data.mkdir()
    rng = np.random.default_rng(seed)
    for subject in ("subject_v", "subject_w"):
        image = np.zeros((24, 20, 22), dtype=np.float32)
        image[4:20, 4:16, 4:18] = 0.5 + 0.5 * rng.random((16, 12, 14), dtype=np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(data / f"{subject}_image.nii.gz"))
        nib.save(nib.Nifti1Image((image > 0.75).astype(np.int16) * 2, np.eye(4)), str(data / f"{subject}_label.nii.gz"))
    return data


def test_validation_pairs_list_both_directions_and_every_warp_case(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import csv

    from validation_pairs import write_validation_pairs

    data = _small_training_subjects(tmp_path / "data", seed=1)
    rows = list(csv.DictReader(open(write_validation_pairs(str(tmp_path / "out"), str(data), [2.0, 3.0], 0))))
    assert [row["pair_id"] for row in rows] == [
        "v_to_w",
        "w_to_v",
        "subject_v_warp2_seed0",
        "subject_v_warp3_seed0",
        "subject_w_warp2_seed0",
        "subject_w_warp3_seed0",
    ]
    assert rows[0]["fixed_image"].endswith("w_image.nii.gz") and rows[0]["moving_label"].endswith("v_label.nii.gz")
    assert rows[2]["fixed_image"] == str(data / "subject_v_image.nii.gz")
    assert all(os.path.isfile(row[key]) for row in rows for key in ("fixed_image", "moving_image", "moving_label"))
    with pytest.raises(FileNotFoundError, match="subject_v_image"):
        write_validation_pairs(str(tmp_path / "none"), str(tmp_path), [2.0], 0)


def test_misaligned_validation_pairs_move_each_subject_onto_the_other(tmp_path):
    """validation_pairs.py --misaligned: per seed v moved onto w and w moved onto v, each copy on its own grid, its
    label moved with it; a seed's copy is misaligned_cases.py's for that seed."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import csv

    from misaligned_cases import make_case
    from validation_pairs import write_misaligned_pairs

    data = _small_training_subjects(tmp_path / "data", seed=2)
    rows = list(csv.DictReader(open(write_misaligned_pairs(str(tmp_path / "out"), str(data), [0, 1]))))
    assert [row["pair_id"] for row in rows] == ["v_moved0_to_w", "w_moved0_to_v", "v_moved1_to_w", "w_moved1_to_v"]
    assert rows[0]["fixed_image"] == str(data / "subject_w_image.nii.gz")
    assert rows[1]["fixed_label"] == str(data / "subject_v_label.nii.gz")
    moved = [nib.load(row["moving_image"]) for row in rows]
    assert not np.allclose(moved[0].affine, np.eye(4)) and not np.allclose(moved[0].affine, moved[2].affine)
    assert all(nib.load(row["moving_label"]).shape == image.shape for row, image in zip(rows, moved))
    reference = make_case(str(data / "subject_v_image.nii.gz"), None, str(tmp_path / "ref"), 1)
    assert np.array_equal(nib.load(reference.image).get_fdata(), moved[2].get_fdata())
    with pytest.raises(FileNotFoundError, match="subject_v_image"):
        write_misaligned_pairs(str(tmp_path / "none"), str(tmp_path), [0])


def test_cohort2d_validation_pairs_are_the_ring_of_the_validation_subjects(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import csv
    import json

    from validation_pairs import COHORT2D_DATALIST, write_cohort2d_validation_pairs

    rows = list(csv.DictReader(open(write_cohort2d_validation_pairs(str(tmp_path)))))
    validation = [Path(s["image"]).name for s in json.loads(COHORT2D_DATALIST.read_text())["validation"]]
    assert len(rows) == len(validation) == 20
    assert [Path(row["moving_image"]).name for row in rows] == validation
    assert [Path(row["fixed_image"]).name for row in rows] == validation[1:] + validation[:1]
    assert all(row["fixed_label"].endswith("_label.nii.gz") and "_to_" in row["pair_id"] for row in rows)


def test_slice_validation_pairs_are_the_training_subjects_slices_in_both_directions(tmp_path):
    """validation_pairs.py --slices2d (refine_2d_sweep.py --pairs slices): each position's axial slice of v and w, as
    the (X, Y, 1) files the bundle reads as 2D, the slice's voxels exactly, its world position in the affine, both
    directions; a position outside the volume is refused."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import csv

    from validation_pairs import write_slice_pairs

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(2)
    volumes = {}
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-5.0, -4.0, -3.0]
    for subject in ("subject_v", "subject_w"):
        volumes[subject] = rng.random((12, 10, 8), dtype=np.float32)
        nib.save(nib.Nifti1Image(volumes[subject], affine), str(data / f"{subject}_image.nii.gz"))
        label = (volumes[subject] > 0.5).astype(np.int16) * 3
        nib.save(nib.Nifti1Image(label, affine), str(data / f"{subject}_label.nii.gz"))
    rows = list(csv.DictReader(open(write_slice_pairs(str(tmp_path / "out"), str(data), (2, 5)))))
    assert [row["pair_id"] for row in rows] == ["v_to_w_slice2", "w_to_v_slice2", "v_to_w_slice5", "w_to_v_slice5"]
    assert Path(rows[0]["fixed_image"]).name == "subject_w_slice2_image.nii.gz"
    assert Path(rows[1]["moving_label"]).name == "subject_w_slice2_label.nii.gz"
    written = nib.load(rows[2]["moving_image"])  # v at slice 5
    assert written.shape == (12, 10, 1)
    np.testing.assert_array_equal(np.asarray(written.dataobj)[..., 0], volumes["subject_v"][:, :, 5])
    np.testing.assert_allclose(written.affine[:3, 3], [-5.0, -4.0, 2.0])
    assert nib.load(rows[2]["moving_label"]).get_data_dtype() == np.int16
    with pytest.raises(ValueError, match="slice 8 is outside"):
        write_slice_pairs(str(tmp_path / "bad"), str(data), (8,))
