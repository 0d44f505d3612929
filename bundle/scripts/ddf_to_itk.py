#!/usr/bin/env python
"""Convert the bundle's ``ddf.nii.gz`` into an ITK displacement field (physical LPS millimetres), for ITK/ANTs.

    python bundle/scripts/ddf_to_itk.py OUT/ddf.nii.gz FIXED.nii.gz OUT/ddf_itk.nii.gz

The bundle saves ``u`` in voxels of the fixed file's grid, component ``i`` along array axis ``i``, with
``warped(x) = moving(x + u(x))``. ITK's displacement field transform maps a fixed-space physical point ``p`` to
``p + d(p)`` in moving space with ``d`` in physical LPS coordinates, so ``d = D · diag(spacing) · u`` with ``D`` the
fixed image's ITK direction matrix. The field is written on the fixed grid (same origin, spacing and direction), the
form ``antsApplyTransforms -t`` and ``itk.DisplacementFieldTransform`` read. (MONAI's
``monai.data.itk_torch_bridge.monai_to_itk_ddf`` performs the same bookkeeping for images loaded with ITKReader.)
"""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np

try:  # imported as part of the bundle's scripts package
    from .files import atomic_output
except ImportError:  # run as a standalone script: python bundle/scripts/<name>.py
    from files import atomic_output

__all__ = ["ddf_to_itk"]


def ddf_to_itk(ddf_path: str, fixed_path: str, output_path: str | None = None):
    """Return the ITK displacement field (and write it to ``output_path``, atomically, when given)."""
    import itk  # optional dependency: only this conversion needs it

    fixed = itk.imread(fixed_path, itk.F)
    dims = fixed.GetImageDimension()
    vectors = np.asarray(nib.load(ddf_path).dataobj, dtype=np.float64)  # (X, Y, Z, 1, C)
    if vectors.ndim != 5 or vectors.shape[3] != 1:
        raise ValueError(f"{ddf_path}: expected a NIfTI vector field of shape (X, Y, Z, 1, C), got {vectors.shape}")
    voxels = vectors[..., 0, :]
    grid_shape = tuple(fixed.GetLargestPossibleRegion().GetSize())
    if voxels.shape[: len(grid_shape)] != grid_shape and voxels.shape[:3] != grid_shape + (1,) * (3 - dims):
        raise ValueError(f"{ddf_path}: grid {voxels.shape[:3]} does not match fixed image {fixed_path} {grid_shape}")
    voxels = voxels.reshape(grid_shape + (voxels.shape[-1],))
    components = voxels.shape[-1]
    if components < dims:  # a 2D field on a 3D (H, W, 1) fixed image: no out-of-plane displacement
        voxels = np.concatenate([voxels, np.zeros(voxels.shape[:-1] + (dims - components,))], axis=-1)
    direction = np.asarray(fixed.GetDirection(), dtype=np.float64)
    spacing = np.asarray(fixed.GetSpacing(), dtype=np.float64)
    physical = np.einsum("ij,...j->...i", direction * spacing[None, :], voxels[..., :dims])
    # ITK's numpy view runs the index axes backwards: (z, y, x, component).
    array = np.ascontiguousarray(np.transpose(physical, tuple(range(dims - 1, -1, -1)) + (dims,)), dtype=np.float32)
    field = itk.GetImageFromArray(array, ttype=itk.Image[itk.Vector[itk.F, dims], dims])
    field.SetOrigin(fixed.GetOrigin())
    field.SetSpacing(fixed.GetSpacing())
    field.SetDirection(fixed.GetDirection())
    if output_path:
        with atomic_output(output_path, ".nii.gz") as temporary:
            itk.imwrite(field, temporary)
    return field


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ddf", help="ddf.nii.gz written by the bundle's inference")
    parser.add_argument("fixed", help="the fixed image given to the inference")
    parser.add_argument("output", help="where to write the ITK displacement field (.nii.gz)")
    args = parser.parse_args()
    ddf_to_itk(args.ddf, args.fixed, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
