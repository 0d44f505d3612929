"""Seeded known-warp cases: a real subject and a copy of it moved by a random smooth diffeomorphism.

    python benchmarks/warp_cases.py IMAGE LABEL OUTPUT_DIR [--magnitude 8] [--seed 0]

The pair (fixed = the subject, moving = the subject warped) has an exact answer, the inverse of the warp, so how far
a method ends from Dice 1 measures its registration of large deformations alone, without the anatomical
differences between two subjects (the validation protocol of issue 31, on the training subjects v and w only).

The warp is ``φ = exp(v)``: a stationary velocity field drawn as seeded Gaussian noise on a coarse grid (one control
point every ``CONTROL_SPACING`` voxels), cubic-interpolated to the image grid, scaled so that its largest vector
inside the brain is ``magnitude`` voxels, and integrated by scaling and squaring (``SQUARINGS`` steps of
``u ← u + u ∘ (id + u)``, linear interpolation). ``exp`` of a smooth velocity is invertible, so the moving copy holds
the same anatomy; the largest displacement it makes is about ``magnitude`` (written to ``NAME.json`` with the folded
fraction of its Jacobian, which is 0 for the sizes used here). The moving image is the subject at ``x + u(x)``
(linear), its label the subject's label there (nearest neighbour); grid and header stay the subject's.
"""

from __future__ import annotations

import argparse
import json
import os

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates, zoom

CONTROL_SPACING = 24  # voxels between the velocity's random control points (1 mm brains: 24 mm)
SQUARINGS = 7
MAGNITUDES = (4.0, 8.0, 12.0)  # voxels: the default sizes of oasis_benchmark.py --case warp


def warp_case_name(subject: str, magnitude: float, seed: int) -> str:
    """The case's file stem, shared by ``oasis_benchmark.py --case warp`` and ``validation_pairs.py``."""
    return f"{subject}_warp{magnitude:g}_seed{seed}"


def _warp_components(field: np.ndarray, displacement: np.ndarray, order: int = 1) -> np.ndarray:
    """``field`` (``(C, *spatial)``) sampled at ``x + displacement(x)``, edge values beyond the grid."""
    grid = np.indices(displacement.shape[1:], dtype=np.float32) + displacement
    return np.stack([map_coordinates(c, grid, order=order, mode="nearest") for c in field]).astype(np.float32)


def random_displacement(shape: tuple[int, ...], mask: np.ndarray, magnitude: float, seed: int) -> np.ndarray:
    """``u`` of ``φ = id + u = exp(v)``, ``(d, *shape)`` in voxels, with ``max |v|`` over ``mask`` = ``magnitude``."""
    rng = np.random.default_rng(seed)
    coarse_shape = [max(2, int(np.ceil(n / CONTROL_SPACING)) + 1) for n in shape]
    coarse = rng.normal(size=(len(shape), *coarse_shape))
    velocity = np.stack(
        [zoom(c, [n / m for n, m in zip(shape, coarse_shape)], order=3, mode="nearest") for c in coarse]
    )[(slice(None), *[slice(0, n) for n in shape])].astype(np.float32)
    largest = float(np.sqrt((velocity**2).sum(0))[mask].max())
    displacement = velocity * (magnitude / largest / 2**SQUARINGS)
    for _ in range(SQUARINGS):
        displacement = displacement + _warp_components(displacement, displacement)
    return displacement


def folded_fraction(displacement: np.ndarray, mask: np.ndarray) -> float:
    """Share of ``mask`` voxels where ``det(I + ∇u) <= 0`` (central differences)."""
    gradients = np.stack([np.stack(np.gradient(c), 0) for c in displacement], 0)  # (d, d, *spatial)
    jacobian = np.moveaxis(gradients, (0, 1), (-2, -1)) + np.eye(displacement.shape[0])
    return float((np.linalg.det(jacobian)[mask] <= 0).mean())


def make_warp_case(
    image_path: str, label_path: str, output_dir: str, magnitude: float, seed: int, name: str | None = None
) -> tuple[str, str]:
    """Write ``NAME_image.nii.gz``, ``NAME_label.nii.gz`` and ``NAME.json`` into ``output_dir`` (deterministic for
    a seed and magnitude); returns the image and label paths. 2D slices (``X x Y x 1``) are warped in plane."""
    source = nib.load(image_path)
    values = np.asarray(source.dataobj, dtype=np.float32)
    label_image = nib.load(label_path)
    labels = np.asarray(label_image.dataobj)
    squeeze = values.ndim == 3 and values.shape[2] == 1
    if squeeze:
        values, labels = values[..., 0], labels[..., 0]
    mask = values > 0.05 * float(values.max())
    displacement = random_displacement(values.shape, mask, magnitude, seed)
    warped = _warp_components(values[None], displacement)[0]
    warped_label = _warp_components(labels[None].astype(np.float32), displacement, order=0)[0]
    warped_label = np.round(warped_label).astype(labels.dtype)
    if squeeze:
        warped, warped_label = warped[..., None], warped_label[..., None]
    name = name or f"warp{seed}"
    os.makedirs(output_dir, exist_ok=True)
    image_out = os.path.join(output_dir, f"{name}_image.nii.gz")
    label_out = os.path.join(output_dir, f"{name}_label.nii.gz")
    nib.save(nib.Nifti1Image(warped, source.affine, source.header), image_out)
    nib.save(nib.Nifti1Image(warped_label, label_image.affine, label_image.header), label_out)
    lengths = np.sqrt((displacement**2).sum(0))[mask]
    description = {
        "seed": seed,
        "magnitude_voxels": magnitude,
        "largest_displacement_voxels": round(float(lengths.max()), 3),
        "mean_displacement_voxels": round(float(lengths.mean()), 3),
        "folded_fraction": folded_fraction(displacement, mask),
        "control_spacing_voxels": CONTROL_SPACING,
    }
    with open(os.path.join(output_dir, f"{name}.json"), "w", encoding="utf-8") as stream:
        json.dump(description, stream, indent=1)
    return image_out, label_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("label")
    parser.add_argument("output_dir")
    parser.add_argument("--magnitude", type=float, default=8.0, help="largest velocity vector in the brain (voxels)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    image, label = make_warp_case(args.image, args.label, args.output_dir, args.magnitude, args.seed)
    print(image, label)


if __name__ == "__main__":
    main()
