"""The DDF the bundle writes, converted for ITK, moves the moving image exactly as the bundle's own warp did."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, check_ok, run_bundle
from monai.bundle import ConfigParser
from scripts.synthetic import SyntheticSpec, generate_subjects

itk = pytest.importorskip("itk", reason="itk is in requirements.txt; install it to convert DDFs for ITK/ANTs")


def _itk_warp_label(field, moving_label: str, fixed: str) -> np.ndarray:
    """Nearest-neighbour warp done by ITK alone: each fixed voxel's physical point through the displacement field
    transform, then into the moving image's index space (ITK's Python wrapping has no double-precision vector
    images, which its resampler needs, so the transform is applied point by point)."""
    transform = itk.DisplacementFieldTransform[itk.F, 3].New()
    transform.SetDisplacementField(field)
    reference = itk.imread(fixed, itk.F)
    moving = itk.imread(moving_label, itk.F)
    labels = np.transpose(itk.array_from_image(moving), (2, 1, 0))
    shape = tuple(reference.GetLargestPossibleRegion().GetSize())
    warped = np.zeros(shape, dtype=labels.dtype)
    for index in np.ndindex(shape):
        point = reference.TransformIndexToPhysicalPoint([int(i) for i in index])
        mapped = moving.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(point))
        nearest = tuple(int(np.floor(c + 0.5)) for c in mapped)
        if all(0 <= n < s for n, s in zip(nearest, shape)):
            warped[index] = labels[nearest]
    return warped


def test_itk_displacement_field_reproduces_the_bundles_warp(tmp_path):
    from scripts.ddf_to_itk import ddf_to_itk

    subjects, _ = generate_subjects(
        SyntheticSpec(spatial_dims=3, shape=[24, 28, 20], num_subjects=4, num_validation=1, num_test=1, seed=2)
    )
    # an oblique-free but flipped, anisotropic, shifted grid shared by both images (L-A-S, 1.5 x 1 x 2 mm)
    affine = np.diag([-1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [40.0, -12.0, 7.0]
    files = {}
    for name, (image, label) in zip(("fixed", "moving"), subjects[:2]):
        for kind, array in (("image", image), ("label", label)):
            files[f"{name}_{kind}"] = str(tmp_path / f"{name}_{kind}.nii.gz")
            nib.save(nib.Nifti1Image(array, affine), files[f"{name}_{kind}"])
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.yaml"))
    parser.update({"spatial_dims": 3})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    torch.nn.init.normal_([m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1].weight, std=2.0)
    torch.save(network.state_dict(), tmp_path / "model.pt")

    overrides = {
        "spatial_dims": 3,
        "pixdim": "[1.5,1.0,2.0]",
        "ckpt_path": tmp_path / "model.pt",
        "fixed_image": files["fixed_image"],
        "moving_image": files["moving_image"],
        "moving_label": files["moving_label"],
        "output_dir": tmp_path / "out",
        "refine_iterations": 0,  # the network's own (random, large) field: this test is about the ITK conversion
        "label_interpolation": "nearest",  # compared with ITK moving each voxel to its nearest neighbour below
    }
    check_ok(run_bundle("inference", [str(CONFIGS / "inference.yaml")], overrides))
    ddf = nib.load(str(tmp_path / "out" / "ddf.nii.gz")).get_fdata()
    assert np.abs(ddf).max() > 1.0  # a real deformation, not the identity

    field = ddf_to_itk(str(tmp_path / "out" / "ddf.nii.gz"), files["fixed_image"], str(tmp_path / "ddf_itk.nii.gz"))
    bundle_warped = np.asarray(nib.load(str(tmp_path / "out" / "warped_label.nii.gz")).dataobj)
    itk_warped = _itk_warp_label(field, files["moving_label"], files["fixed_image"])
    assert bundle_warped.shape == itk_warped.shape
    agreement = (bundle_warped == itk_warped.round()).mean()
    assert agreement > 0.98, agreement  # nearest-neighbour ties at exact half-voxel positions may differ
    # written file reads back as the same field
    reread = itk.imread(str(tmp_path / "ddf_itk.nii.gz"))
    np.testing.assert_allclose(itk.array_from_image(reread), itk.array_from_image(field), atol=1e-5)
