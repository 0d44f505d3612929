#!/usr/bin/env python
"""Warp any image or label map with a field the bundle wrote, without registering again.

    python bundle/scripts/apply_ddf.py OUT/ddf.nii.gz MOVING_OTHER.nii.gz WARPED.nii.gz [--label]
    python bundle/scripts/apply_ddf.py OUT/inverse_ddf.nii.gz FIXED_LABEL.nii.gz FIXED_LABEL_ON_MOVING.nii.gz --label

A field file holds ``u`` in voxels of its own grid (``ddf.nii.gz``: the fixed file's; ``inverse_ddf.nii.gz``: the
moving file's) with that grid's affine ``A``: the output voxel ``x`` takes the input's value at the world point
``A · (x + u(x))``, wherever the input's own grid puts it (``A_in⁻¹`` of that point; any orientation, spacing or field
of view, as long as it is in the same world space as the registered images). So another contrast or a label map of
the moving subject lands on the fixed grid as ``warped_image`` did, and with the inverse the fixed image's labels land
on the moving grid. Linear interpolation (``--label``: each label's mask interpolated linearly and the label of
largest weight kept, as the inference's ``warped_label`` and ANTs' ``genericLabel``; integer output); zero outside
the input.
The output is on the field's grid with its affine, written atomically.
"""

from __future__ import annotations

import argparse
import sys

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates

import torch

try:  # imported as part of the bundle's scripts package
    from .files import atomic_output
    from .integrate import label_at_points
except ImportError:  # run as a standalone script: python bundle/scripts/<name>.py
    from files import atomic_output
    from integrate import label_at_points

__all__ = ["apply_ddf"]


def _load(path: str, what: str) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} ({what}): file not found") from None
    except Exception as error:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error...
        raise ValueError(f"{path} ({what}): cannot read as NIfTI: {error}") from error


def apply_ddf(ddf_path: str, image_path: str, output_path: str | None = None, label: bool = False) -> np.ndarray:
    """The image at ``image_path`` warped by the field at ``ddf_path`` onto the field's grid ``(X, Y, Z)`` (and written
    to ``output_path`` when given): linear, or for ``label`` the label-wise linear vote, integer values."""
    field_image = _load(ddf_path, "displacement field")
    field = np.asarray(field_image.dataobj, dtype=np.float64)
    if field.ndim != 5 or field.shape[3] != 1 or field.shape[4] not in (2, 3):
        raise ValueError(
            f"{ddf_path}: expected the bundle's vector field of shape (X, Y, Z, 1, 2 or 3), got {field.shape}"
        )
    if not np.isfinite(field).all():
        raise ValueError(f"{ddf_path}: the displacement field contains NaN or infinite values")
    source = _load(image_path, "image to warp")
    values = np.asarray(source.dataobj)
    if values.ndim == 2:
        values = values[..., None]
    if values.ndim != 3:
        raise ValueError(f"{image_path}: expected a 2D or 3D image, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{image_path}: the image contains NaN or infinite values")
    if label and not np.allclose(values, np.round(values), atol=1e-3):
        raise ValueError(f"{image_path}: --label expects integer label ids, found non-integer values")
    grid = field.shape[:3]
    displacement = field[..., 0, :]
    if displacement.shape[-1] == 2:  # a 2D field: no displacement across the slice
        displacement = np.concatenate([displacement, np.zeros(grid + (1,))], axis=-1)
    points = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid], indexing="ij"), axis=-1)
    points += displacement
    # field voxels -> world (the field's affine) -> the input's voxels (its affine): one 4x4 matrix
    to_input = np.linalg.inv(source.affine) @ field_image.affine
    coordinates = np.einsum("ij,...j->i...", to_input[:3, :3], points) + to_input[:3, 3].reshape(3, 1, 1, 1)
    if label:  # the inference's warped_label: each label's mask interpolated, the label of largest weight kept
        points = torch.as_tensor(coordinates.reshape(3, -1).T, dtype=torch.float32)
        ids = label_at_points(torch.as_tensor(np.round(values).astype(np.int32)), points).numpy().reshape(grid)
        warped = ids.astype(np.int16 if values.max() < 2**15 else np.int32)
    else:
        warped = map_coordinates(values.astype(np.float32), coordinates, order=1, mode="constant", cval=0.0)
    if output_path:
        with atomic_output(output_path, ".nii.gz" if output_path.endswith(".gz") else ".nii") as temporary:
            nib.save(nib.Nifti1Image(warped, field_image.affine), temporary)
    return warped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ddf", help="ddf.nii.gz or inverse_ddf.nii.gz written by the bundle's inference")
    parser.add_argument("image", help="the image or label map to warp (any grid in the registered images' space)")
    parser.add_argument("output", help="where to write the warped image (.nii.gz), on the field's grid")
    parser.add_argument("--label", action="store_true", help="integer label ids (label-wise linear interpolation)")
    args = parser.parse_args()
    try:
        apply_ddf(args.ddf, args.image, args.output, label=args.label)
    except (OSError, ValueError) as error:
        print(f"ERROR: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
