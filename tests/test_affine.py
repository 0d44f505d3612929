"""The affine stage (scripts/affine.py): recovers known world affines across grids in 2D and 3D, its transform file
is ITK's, the whole transform lands in ddf.nii.gz, and bad pairs are named rather than warped into garbage."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, SHARED_DATA, check_ok, requires_shared_data, run_bundle
from monai.losses import GlobalMutualInformationLoss
from scripts.affine import AffineRegistration, itk_affine_text, write_itk_affine
from scripts.apply_ddf import apply_ddf
from scripts.losses import FixedImageMutualInformation
from scripts.transforms import subject_preprocessing

spec = importlib.util.spec_from_file_location("misaligned_cases", REPO / "benchmarks" / "misaligned_cases.py")
misaligned_cases = importlib.util.module_from_spec(spec)
sys.modules["misaligned_cases"] = misaligned_cases  # its dataclass looks itself up there
spec.loader.exec_module(misaligned_cases)


def _phantom(shape: tuple[int, ...], seed: int = 3) -> np.ndarray:
    """A brain-sized smooth phantom: anisotropic blobs of different intensities on a zero background (no symmetry
    that would make the affine ambiguous)."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    image = np.zeros(shape, dtype=np.float64)
    for _ in range(9):
        centre = rng.uniform(-0.45, 0.45, size=len(shape))
        width = rng.uniform(0.08, 0.3, size=len(shape))
        distance = sum(((a - c) / w) ** 2 for a, c, w in zip(axes, centre, width))
        image += rng.uniform(0.3, 1.0) * np.exp(-distance)
    envelope = sum((a / 0.7) ** 2 for a in axes) < 1.0
    image = image * envelope
    return (image / image.max()).astype(np.float32)


def _save(array: np.ndarray, affine: np.ndarray, path) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _max_error_mm(found: np.ndarray, expected: np.ndarray, centre: np.ndarray, radius: float) -> tuple[float, float]:
    """Largest distance between the two transforms' images of points at ``radius`` mm about ``centre``, and the
    rotation angle (degrees) of ``expected⁻¹ · found``."""
    dims = found.shape[0] - 1
    directions = np.concatenate([np.eye(dims), -np.eye(dims)])
    points = centre + radius * directions
    mapped = [(m[:dims, :dims] @ points.T + m[:dims, dims : dims + 1]).T for m in (found, expected)]
    residual = np.linalg.inv(expected) @ found
    u, _, vt = np.linalg.svd(residual[:dims, :dims])
    cosine = (np.trace(u @ vt) - (dims - 2)) / 2
    return float(np.linalg.norm(mapped[0] - mapped[1], axis=1).max()), float(np.degrees(np.arccos(min(1.0, cosine))))


def _load(path: str, dims: int):
    image = subject_preprocessing(dims, 1.0 if dims == 2 else 2.0, None)({"image": path})["image"]
    return image[0], image.affine.numpy()


@pytest.mark.parametrize("dims,similarity", [(2, "mi"), (2, "ncc"), (3, "mi"), (3, "ncc")])
def test_recovers_a_known_world_affine_across_grids(dims, similarity, tmp_path):
    """The subject moved by a seeded affine (rotation ~6-14°, translation ~6-14 mm, scale ±6 %, shear) and written
    on another grid (3D: another orientation, voxel size and field of view) is found within 1 mm / 1°, with the MI
    (any contrast: --multimodal true) and the NCC (same contrast: the default) similarity."""
    shape = (96, 112) if dims == 2 else (64, 72, 64)
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if dims == 2 else np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40.0, -50.0, 30.0]
    volume = _phantom(shape)
    source = _save(volume[..., None] if dims == 2 else volume, affine, tmp_path / "subject.nii.gz")
    fixed, fixed_affine = _load(source, dims)
    registration = AffineRegistration(
        levels_mm=(8.0, 4.0, 2.0) if dims == 3 else (4.0, 2.0, 1.0), similarity=similarity
    )
    grids = set()
    for seed in (0, 1):
        case = misaligned_cases.make_case(source, None, str(tmp_path), seed, voxel_sizes=(2.0, 2.4))
        moving, moving_affine = _load(case.image, dims)
        grids.add((tuple(moving.shape), tuple(np.round(moving_affine.flatten(), 3))))
        result = registration.estimate(fixed, fixed_affine, moving, moving_affine)
        expected = case.world_matrix if dims == 3 else case.world_matrix[[0, 1, 3]][:, [0, 1, 3]]
        centre = fixed_affine[:dims, :dims] @ (np.asarray(fixed.shape) / 2) + fixed_affine[:dims, dims]
        distance, degrees = _max_error_mm(result.matrix, expected, centre, radius=50.0)
        assert distance < 1.0 and degrees < 1.0, (seed, distance, degrees, result.report)
        assert result.report["rotation_degrees"] > 4 and "warnings" not in result.report
    assert len(grids) == 2  # the two cases are on different grids


def test_the_same_moving_image_on_another_grid_gives_the_same_affine(tmp_path):
    """World space, not array indices: the moving image stored flipped and transposed (same world positions) gives
    the same transform."""
    volume = _phantom((64, 72, 64), seed=5)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_path = _save(volume, affine, tmp_path / "fixed.nii.gz")
    case = misaligned_cases.make_case(fixed_path, None, str(tmp_path), 4, voxel_sizes=(2.0,))
    image = nib.load(case.image)
    data = np.asarray(image.dataobj)
    # axis 0 reversed, axes 1 and 2 swapped: another array, the same world
    flipped = np.transpose(data[::-1], (0, 2, 1)).copy()
    index_map = np.zeros((4, 4))
    index_map[0, 0], index_map[0, 3] = -1.0, data.shape[0] - 1
    index_map[1, 2] = index_map[2, 1] = index_map[3, 3] = 1.0
    other = _save(flipped, image.affine @ index_map, tmp_path / "moving_other_grid.nii.gz")
    fixed, fixed_affine = _load(fixed_path, 3)
    registration = AffineRegistration()
    results = [registration.estimate(fixed, fixed_affine, *_load(path, 3)) for path in (case.image, other)]
    centre = fixed_affine[:3, :3] @ (np.asarray(fixed.shape) / 2) + fixed_affine[:3, 3]
    distance, _ = _max_error_mm(results[0].matrix, results[1].matrix, centre, radius=50.0)
    assert distance < 0.5, distance


def test_the_ncc_affine_does_not_depend_on_the_number_of_threads(tmp_path):
    """The same pair with 1 and with 2 threads gives the same matrix, bit for bit, with the NCC similarity (the MI's
    histogram sums run in a thread-dependent order, and Adam carried the difference to ~3 mm on a brain pair): a
    cohort sharded over torchrun processes with 1 thread each registers as one process with 2 threads does."""
    volume = _phantom((64, 72, 64), seed=6)
    fixed_path = _save(volume, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "fixed.nii.gz")
    case = misaligned_cases.make_case(fixed_path, None, str(tmp_path), 2, voxel_sizes=(2.0,))
    fixed, fixed_affine = _load(fixed_path, 3)
    moving, moving_affine = _load(case.image, 3)
    registration = AffineRegistration(similarity="ncc")
    threads, matrices = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            matrices.append(registration.estimate(fixed, fixed_affine, moving, moving_affine).matrix)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(matrices[0], matrices[1]), matrices[0] - matrices[1]


def test_the_itk_transform_file_maps_points_and_resamples_as_the_bundle_does(tmp_path):
    """``affine.txt`` read by ITK maps LPS points as ``T`` maps RAS points, and ITK's resampling of the moving
    image through it equals the bundle's (``AffineRegistration.sampling_grid``)."""
    itk = pytest.importorskip("itk")
    rng = np.random.default_rng(0)
    matrix = misaligned_cases.random_world_affine(rng, np.array([10.0, -5.0, 20.0]))
    path = write_itk_affine(str(tmp_path / "affine.txt"), matrix)
    assert open(path).read() == itk_affine_text(matrix)
    transform = itk.transformread(path)[0]
    flip = np.array([-1.0, -1.0, 1.0])
    for point in rng.uniform(-60, 60, size=(5, 3)):
        expected = matrix[:3, :3] @ point + matrix[:3, 3]
        mapped = np.asarray(transform.TransformPoint([float(v) for v in point * flip])) * flip
        np.testing.assert_allclose(mapped, expected, atol=1e-6)

    volume = _phantom((40, 48, 44), seed=9)
    moving_affine = np.array([[0, 0, -2.0, 30], [2.0, 0, 0, -40], [0, 2.0, 0, -20], [0, 0, 0, 1]])
    moving_path = _save(volume, moving_affine, tmp_path / "moving.nii.gz")
    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_affine[:3, 3] = [-40, -50, -40]
    fixed_shape = (40, 48, 44)
    fixed_path = _save(np.zeros(fixed_shape, np.float32), fixed_affine, tmp_path / "fixed.nii.gz")
    grid = AffineRegistration.sampling_grid(fixed_affine, fixed_shape, moving_affine, volume.shape, matrix)
    ours = torch.nn.functional.grid_sample(
        torch.as_tensor(volume)[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[0, 0].numpy()
    moving_itk = itk.imread(moving_path, itk.F)
    fixed_itk = itk.imread(fixed_path, itk.F)
    interpolator = itk.LinearInterpolateImageFunction[itk.Image[itk.F, 3], itk.D].New()
    resampled = itk.resample_image_filter(
        moving_itk,
        transform=transform,
        interpolator=interpolator,
        reference_image=fixed_itk,
        use_reference_image=True,
        default_pixel_value=0.0,
    )
    theirs = np.transpose(itk.array_from_image(resampled), (2, 1, 0))
    inside = theirs > 0.05  # ITK leaves voxels whose point falls outside the last half voxel at 0
    assert inside.mean() > 0.05
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=2e-3)


def test_fixed_image_mutual_information_equals_monais():
    """The cached-target MI is MONAI's ``GlobalMutualInformationLoss``, value and gradient."""
    torch.manual_seed(0)
    target = torch.rand(1, 1, 5000)
    pred = torch.rand(1, 1, 5000, requires_grad=True)
    ours = FixedImageMutualInformation(num_bins=32)
    ours.set_target(target)
    value = ours(pred)
    (gradient,) = torch.autograd.grad(value, pred)
    reference = GlobalMutualInformationLoss(num_bins=32)(pred, target)
    (expected,) = torch.autograd.grad(reference, pred)
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(gradient, expected)


def test_a_diverging_affine_warns_and_falls_back_to_the_centre_of_mass_translation(tmp_path, caplog):
    volume = _phantom((64, 72, 64), seed=2)
    source = _save(volume, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "subject.nii.gz")
    case = misaligned_cases.make_case(source, None, str(tmp_path), 0, voxel_sizes=(2.0,))
    fixed, fixed_affine = _load(source, 3)
    moving, moving_affine = _load(case.image, 3)
    registration = AffineRegistration(scale_range=(0.999, 1.001))  # any real scale or shear counts as divergence
    with caplog.at_level(logging.WARNING, logger="registration"):
        result = registration.estimate(fixed, fixed_affine, moving, moving_affine, ("F.nii.gz", "M.nii.gz"))
    assert "diverged" in caplog.text and "M.nii.gz" in caplog.text and "centre-of-mass" in caplog.text
    np.testing.assert_allclose(result.matrix[:3, :3], np.eye(3))
    assert "warnings" in result.report


def test_no_overlap_after_the_affine_stage_is_an_error_naming_both_files(tmp_path):
    volume = _phantom((64, 72, 64), seed=2)
    fixed_path = _save(volume, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "fixed.nii.gz")
    # a moving field of view of a few voxels: most of the fixed brain lands outside it whatever the affine
    small = _save(volume[28:34, 30:36, 28:34].copy(), np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "tiny.nii.gz")
    fixed, fixed_affine = _load(fixed_path, 3)
    moving = torch.as_tensor(volume[28:34, 30:36, 28:34].copy())
    with pytest.raises(ValueError, match="tiny.nii.gz and .*fixed.nii.gz do not overlap"):
        AffineRegistration().estimate(fixed, fixed_affine, moving, np.diag([2.0, 2.0, 2.0, 1.0]), (fixed_path, small))


@requires_shared_data
def test_inference_registers_a_misaligned_brain_and_writes_the_whole_transform(tmp_path):
    """The README's command on a labelled training subject moved ~10° / ~1 cm and written on another grid: the
    affine stage recovers most of the overlap, the registration reaches the aligned pair's level, ``ddf.nii.gz``
    applied to the moving file's label reproduces ``warped_label``, ``affine.txt`` and the parameters are written.
    (A labelled training pair, oasis3d_train v -> w, not the test subjects.)"""
    data = SHARED_DATA / "oasis3d_train"
    if not (data / "subject_v_label.nii.gz").is_file():
        pytest.skip(f"labelled training subjects not found in {data}")
    case = misaligned_cases.make_case(
        str(data / "subject_v_image.nii.gz"), str(data / "subject_v_label.nii.gz"), str(tmp_path), 0
    )
    out = tmp_path / "run"
    overrides = {
        "fixed_image": data / "subject_w_image.nii.gz",
        "fixed_label": data / "subject_w_label.nii.gz",
        "moving_image": case.image,
        "moving_label": case.label,
        "output_dir": out,
        "eval_label_ids": SHARED_DATA / "oasis3d" / "eval_labels.json",
        "write_inverse_ddf": "true",
    }
    check_ok(run_bundle("inference", [str(CONFIGS / "inference.yaml")], overrides))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["identity_mean_dice"] < 0.45  # misaligned: far below the aligned pair's 0.58
    assert metrics["affine_mean_dice"] > 0.55, metrics["affine_mean_dice"]
    # the same pair pre-aligned (--affine false on the original files) reaches 0.815; the moved copy within 0.025
    assert metrics["registered_mean_dice"] > 0.79, metrics["registered_mean_dice"]
    assert 5 < metrics["affine"]["rotation_degrees"] < 25 and metrics["affine"]["seconds"] < 10
    warped = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    reapplied = apply_ddf(str(out / "ddf.nii.gz"), case.label, label=True)
    assert (reapplied == warped).mean() > 0.995
    # warped_image: the moved file itself (another grid) resampled once through the whole transform, in its units
    warped_image = np.asarray(nib.load(str(out / "warped_image.nii.gz")).dataobj)
    moving_values = np.asarray(nib.load(case.image).dataobj)
    assert warped_image.shape == nib.load(str(data / "subject_w_image.nii.gz")).shape
    np.testing.assert_allclose(warped_image, apply_ddf(str(out / "ddf.nii.gz"), case.image), atol=1e-5)
    assert 0.9 * moving_values.max() < warped_image.max() <= moving_values.max() + 1e-6
    assert (out / "affine.txt").read_text().startswith("#Insight Transform File V1.0")
    # the inverse of the whole transform carries the fixed label onto the moving file's grid, onto its anatomy
    carried = apply_ddf(str(out / "inverse_ddf.nii.gz"), str(data / "subject_w_label.nii.gz"), label=True)
    moving_label = np.asarray(nib.load(case.label).dataobj)
    assert carried.shape == moving_label.shape
    ids = json.loads((SHARED_DATA / "oasis3d" / "eval_labels.json").read_text())["labels"]
    dice = [
        2 * np.sum((carried == i) & (moving_label == i)) / max(np.sum(carried == i) + np.sum(moving_label == i), 1)
        for i in ids
        if (moving_label == i).any()
    ]
    assert np.mean(dice) > 0.75, np.mean(dice)
