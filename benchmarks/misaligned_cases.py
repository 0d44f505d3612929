"""Seeded misaligned copies of a subject: its image and label moved in world space and written on another grid.

    python benchmarks/misaligned_cases.py IMAGE LABEL OUTPUT_DIR [--seed 0] [--count 3]

A case moves the subject by a random world affine ``S`` (rotation about two or three axes, translation, scale, a
little shear; RAS mm, about the brain's centre) and writes it on a new grid: another orientation (axis order and
signs), voxel size and field of view, so that nothing about the file's array matches the fixed image's. The value at
a new world point ``y`` is the subject's at ``S⁻¹ y`` (linear; the label nearest neighbour), so the correct
fixed → moving transform of the pair is ``S`` composed with whatever aligned the subject before.
Used by ``oasis_benchmark.py --case misaligned`` and the tests; never applied to test subjects' labels for any choice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

# Magnitudes of the example (~10° about two axes, ~10 mm, ~6 %) with a spread around them.
ROTATION_DEGREES = (6.0, 14.0)
TRANSLATION_MM = (6.0, 14.0)
SCALE = 0.06
SHEAR = 0.03
ORIENTATIONS = ("LPS", "RAS", "PIR", "ASL", "LIP")
VOXEL_SIZES_MM = (1.0, 1.0, 1.2)


@dataclass
class Case:
    name: str
    image: str
    label: str | None
    world_matrix: np.ndarray  # S: original world point -> moved world point (RAS mm)


def random_world_affine(rng: np.random.Generator, centre: np.ndarray, dims: int = 3) -> np.ndarray:
    """A ``(d + 1)``-square world affine about ``centre``: rotation, translation, scale and shear of the sizes above."""
    if dims == 3:
        axis = rng.normal(size=3)
        axis[int(rng.integers(3))] *= 0.2  # mostly about two axes
        angle = math.radians(float(rng.uniform(*ROTATION_DEGREES)) * rng.choice([-1, 1]))
        rotation = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()
    else:
        angle = math.radians(float(rng.uniform(*ROTATION_DEGREES)) * rng.choice([-1, 1]))
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    scale = np.diag(1.0 + rng.uniform(-SCALE, SCALE, size=dims))
    shear = np.eye(dims) + np.triu(rng.uniform(-SHEAR, SHEAR, size=(dims, dims)), 1)
    linear = rotation @ scale @ shear
    direction = rng.normal(size=dims)
    translation = direction / np.linalg.norm(direction) * rng.uniform(*TRANSLATION_MM)
    matrix = np.eye(dims + 1)
    matrix[:dims, :dims] = linear
    matrix[:dims, dims] = centre + translation - linear @ centre
    return matrix


def _oriented_affine(code: str, voxel_mm: float) -> np.ndarray:
    """Voxel → world linear part whose array axes point along ``code`` (e.g. ``LPS``: axis 0 towards Left)."""
    directions = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    linear = np.zeros((3, 3))
    for axis, letter in enumerate(code):
        world_axis, sign = directions[letter]
        linear[world_axis, axis] = sign * voxel_mm
    return linear


def make_case(
    image_path: str,
    label_path: str | None,
    output_dir: str,
    seed: int,
    name: str | None = None,
    margin_mm: float = 8.0,
    voxel_sizes: tuple[float, ...] = VOXEL_SIZES_MM,
) -> Case:
    """Write ``NAME_image.nii.gz`` (and ``NAME_label.nii.gz``) into ``output_dir``; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    source = nib.load(image_path)
    values = np.asarray(source.dataobj, dtype=np.float32)
    squeeze = values.ndim == 3 and values.shape[2] == 1
    dims = 2 if squeeze else 3
    affine = np.asarray(source.affine, dtype=np.float64)
    mask = values > 0.05 * float(values.max())
    foreground = np.argwhere(mask)
    corners_voxel = np.array([foreground.min(0), foreground.max(0)], dtype=np.float64)
    centre_world = affine[:3, :3] @ foreground.mean(0) + affine[:3, 3]
    if dims == 3:
        moved = random_world_affine(rng, centre_world)
        code = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
        voxel_mm = float(voxel_sizes[int(rng.integers(len(voxel_sizes)))])
        linear = _oriented_affine(code, voxel_mm)
    else:  # a slice stays a slice: move it in its plane, keep the slice axis
        in_plane = random_world_affine(rng, centre_world[:2], dims=2)
        moved = np.eye(4)
        moved[:2, :2], moved[:2, 3] = in_plane[:2, :2], in_plane[:2, 2]
        code, voxel_mm = "RAS", 1.0
        linear = affine[:3, :3].copy()
    # the moved brain's bounding box in world space, plus a margin, sets the new field of view
    box = np.array(np.meshgrid(*[corners_voxel[:, a] for a in range(3)], indexing="ij")).reshape(3, -1).T
    world_box = (moved[:3, :3] @ (affine[:3, :3] @ box.T + affine[:3, 3:4]) + moved[:3, 3:4]).T
    low, high = world_box.min(0) - margin_mm, world_box.max(0) + margin_mm
    inverse_linear = np.linalg.inv(linear)
    voxel_box = (
        inverse_linear @ np.array(np.meshgrid(*[[low[a], high[a]] for a in range(3)], indexing="ij")).reshape(3, -1)
    ).T
    shape = np.ceil(voxel_box.max(0) - voxel_box.min(0)).astype(int) + 1
    origin = linear @ voxel_box.min(0)
    if dims == 2:
        shape[2], origin[2] = 1, affine[2, 3]
    new_affine = np.eye(4)
    new_affine[:3, :3], new_affine[:3, 3] = linear, origin
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=0)
    to_source = np.linalg.inv(affine) @ np.linalg.inv(moved) @ new_affine
    coordinates = np.einsum("ij,j...->i...", to_source[:3, :3], index) + to_source[:3, 3].reshape(3, 1, 1, 1)
    name = name or f"case{seed}"
    os.makedirs(output_dir, exist_ok=True)
    image_out = os.path.join(output_dir, f"{name}_image.nii.gz")
    warped = map_coordinates(values, coordinates, order=1, mode="constant", cval=0.0).astype(np.float32)
    nib.save(nib.Nifti1Image(warped, new_affine), image_out)
    label_out = None
    if label_path:
        label = np.asarray(nib.load(label_path).dataobj)
        warped_label = map_coordinates(label.astype(np.float32), coordinates, order=0, mode="constant", cval=0)
        label_out = os.path.join(output_dir, f"{name}_label.nii.gz")
        nib.save(nib.Nifti1Image(np.round(warped_label).astype(np.int16), new_affine), label_out)
    description = {
        "seed": seed,
        "orientation": code,
        "voxel_mm": voxel_mm,
        "shape": shape.tolist(),
        "world_matrix_ras": moved.tolist(),
    }
    with open(os.path.join(output_dir, f"{name}.json"), "w", encoding="utf-8") as stream:
        json.dump(description, stream, indent=1)
    return Case(name, image_out, label_out, moved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("label", nargs="?", default=None)
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    for seed in range(args.seed, args.seed + args.count):
        case = make_case(args.image, args.label, args.output_dir, seed)
        print(f"wrote {case.image}")


if __name__ == "__main__":
    main()
