"""Embedded default data: a deterministic SynthMorph-style population written as NIfTI + datalist.

Why generate instead of ship: the default ``training`` run must need no download and still exercise the exact
loading path real data takes (NIfTI files -> datalist -> LoadImaged ...). Every subject is one shared template
anatomy (smooth random label map inside an ellipsoidal "head") deformed by its own smooth random deformation, so
registration has a true answer, and labels give Dice on structures the unsupervised loss never sees. Images get
per-label intensities, blur, a multiplicative bias field and noise (Hoffmann et al., SynthMorph, 2022).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch.distributed
from scipy import ndimage

from .files import atomic_folder

__all__ = [
    "DEFAULT_SHAPES",
    "SyntheticSpec",
    "default_shape",
    "ensure_synthetic_dataset",
    "generate_subjects",
    "scaled_anatomy",
    "size_class",
]

PARAMS_FILE = "synthetic.json"
# Bump when the generator's output changes, so copies written by an older version are regenerated.
GENERATOR_VERSION = 2


DEFAULT_SHAPES = {2: [96, 96], 3: [32, 32, 32]}


def default_shape(spatial_dims: int) -> list[int]:
    """The grid of the default synthetic subjects, which is also train.yaml's default network input size."""
    if spatial_dims not in DEFAULT_SHAPES:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return list(DEFAULT_SHAPES[spatial_dims])


class SyntheticSpec(dict):
    """Parameters that fully determine a synthetic population (stored beside it to detect stale copies)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        shape: Sequence[int] | None = None,
        num_subjects: int = 24,
        num_labels: int = 8,
        seed: int = 0,
        num_validation: int = 4,
        num_test: int = 4,
        max_displacement: float = 0.12,
        num_size_classes: int = 0,
        size_step: float = 0.12,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        shape = list(shape) if shape is not None else default_shape(spatial_dims)
        if len(shape) != spatial_dims:
            raise ValueError(f"shape {shape} has {len(shape)} axes but spatial_dims is {spatial_dims}")
        if num_validation + num_test + 2 > num_subjects:
            raise ValueError(
                f"num_subjects={num_subjects} leaves fewer than 2 training subjects after "
                f"{num_validation} validation and {num_test} test subjects"
            )
        super().__init__(
            spatial_dims=spatial_dims,
            shape=[int(s) for s in shape],
            num_subjects=int(num_subjects),
            num_labels=int(num_labels),
            seed=int(seed),
            num_validation=int(num_validation),
            num_test=int(num_test),
            max_displacement=float(max_displacement),
            num_size_classes=int(num_size_classes),
            size_step=float(size_step),
        )


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return field / (field.std() + 1e-8)


def _template_labels(rng: np.random.Generator, shape: Sequence[int], num_labels: int) -> np.ndarray:
    """Label map: background 0 outside a wobbly ellipsoid, labels 1..num_labels inside (argmax of smooth noise)."""
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, s) for s in shape], indexing="ij")
    radius = sum((g / 0.8) ** 2 for g in grids)
    boundary = 1.0 + 0.08 * _smooth_noise(rng, shape, sigma=max(shape) / 8)
    inside = radius < boundary
    scores = np.stack([_smooth_noise(rng, shape, sigma=max(shape) / 10) for _ in range(num_labels)])
    labels = (np.argmax(scores, axis=0) + 1) * inside
    return labels.astype(np.int16)


def _random_deformation(rng: np.random.Generator, shape: Sequence[int], max_displacement: float) -> np.ndarray:
    """Smooth displacement field (voxels), channel-first, with peak magnitude ``max_displacement * min(shape)``."""
    ddf = np.stack([_smooth_noise(rng, shape, sigma=min(shape) / 6) for _ in shape])
    peak = np.abs(ddf).max() + 1e-8
    return ddf * (max_displacement * min(shape) / peak)


def _warp(volume: np.ndarray, ddf: np.ndarray, order: int, scale: float = 1.0) -> np.ndarray:
    """``volume(c + (x + u(x) - c) / scale)``: the displacement ``ddf``, then a scaling about the centre ``c``."""
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in volume.shape], indexing="ij")
    centre = [(n - 1) / 2.0 for n in volume.shape]
    coords = [c + (g + d - c) / scale for g, d, c in zip(grid, ddf, centre)]
    return ndimage.map_coordinates(volume, coords, order=order, mode="nearest")


def size_class(spec: SyntheticSpec, index: int) -> tuple[int | None, float]:
    """``(attribute, scale)`` of subject ``index``: with ``num_size_classes = K > 0`` subject ``i`` has class
    ``i mod K`` and its anatomy is the template scaled by ``1 + size_step · (class - (K-1)/2)`` about the centre
    (a known attribute for conditional templates); otherwise ``(None, 1.0)``."""
    classes = spec.get("num_size_classes", 0)
    if not classes:
        return None, 1.0
    attribute = index % classes
    return attribute, 1.0 + spec["size_step"] * (attribute - (classes - 1) / 2.0)


def scaled_anatomy(labels: np.ndarray, scale: float) -> np.ndarray:
    """``labels`` scaled by ``scale`` about the centre (nearest neighbour): ``A(x) = T(c + (x - c) / scale)``."""
    return _warp(labels, np.zeros((labels.ndim, *labels.shape)), order=0, scale=scale)


def _render_image(rng: np.random.Generator, labels: np.ndarray, label_means: np.ndarray, jitter: float) -> np.ndarray:
    """Intensities per label (shared means + subject jitter), blur, bias field and noise, clipped to [0, 1]."""
    means = label_means + jitter * rng.standard_normal(label_means.shape)
    means[0] = 0.0
    image = means[labels]
    image = ndimage.gaussian_filter(image, sigma=0.8)
    bias = np.exp(0.1 * _smooth_noise(rng, labels.shape, sigma=max(labels.shape) / 4))
    image = image * bias + 0.02 * rng.standard_normal(labels.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def generate_subjects(spec: SyntheticSpec) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """Return ``(subjects, atlas)``: lists of (image float32, label int16) arrays, deterministic for ``spec``."""
    rng = np.random.default_rng(spec["seed"])
    shape = spec["shape"]
    template = _template_labels(rng, shape, spec["num_labels"])
    # Evenly spaced, shuffled means: neighbouring structures always differ in contrast, as tissues mostly do.
    label_means = np.concatenate([[0.0], rng.permutation(np.linspace(0.25, 1.0, spec["num_labels"]))])
    atlas = (_render_image(rng, template, label_means, jitter=0.0), template)
    subjects = []
    for index in range(spec["num_subjects"]):
        ddf = _random_deformation(rng, shape, spec["max_displacement"])
        label = _warp(template, ddf, order=0, scale=size_class(spec, index)[1]).astype(np.int16)
        subjects.append((_render_image(rng, label, label_means, jitter=0.04), label))
    return subjects, atlas


def _save_nifti(array: np.ndarray, path: Path) -> None:
    # 2D subjects are stored as (H, W, 1) volumes, the way 2D slices of real scans usually arrive.
    if array.ndim == 2:
        array = array[..., None]
    nib.save(nib.Nifti1Image(array, affine=np.eye(4)), str(path))


def _is_current(root: Path, spec: SyntheticSpec) -> bool:
    """True when ``root`` holds a complete population generated by this generator version for ``spec``."""
    params, datalist = root / PARAMS_FILE, root / "datalist.json"
    if not (params.is_file() and datalist.is_file()):
        return False
    return json.loads(params.read_text()) == {**spec, "generator_version": GENERATOR_VERSION}


def ensure_synthetic_dataset(root: str, spec: SyntheticSpec | dict | None = None) -> str:
    """Write the synthetic population under ``root`` unless an identical one is there; return its datalist path.

    Generation happens in a temporary sibling folder that is renamed into place (``files.atomic_folder``), so an
    interrupted run never leaves a half-written dataset that a later run would trust.
    """
    spec = SyntheticSpec(**(spec or {}))
    root_path = Path(root)
    datalist_path = root_path / "datalist.json"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under torchrun every rank asks for the data: rank 0 writes it while the others wait.
        if torch.distributed.get_rank() == 0 and not _is_current(root_path, spec):
            _generate(root_path, spec)
        torch.distributed.barrier()
    elif not _is_current(root_path, spec):
        _generate(root_path, spec)
    return str(datalist_path)


def _generate(root_path: Path, spec: SyntheticSpec) -> None:
    # another process may write the same data meanwhile: its complete copy is kept
    with atomic_folder(root_path, is_current=lambda: _is_current(root_path, spec)) as staging:
        subjects, atlas = generate_subjects(spec)
        entries = []
        for index, (image, label) in enumerate(subjects):
            entry = {"image": f"subject_{index:03d}_image.nii.gz", "label": f"subject_{index:03d}_label.nii.gz"}
            attribute = size_class(spec, index)[0]
            if attribute is not None:
                entry["attribute"] = attribute
            _save_nifti(image, staging / entry["image"])
            _save_nifti(label, staging / entry["label"])
            entries.append(entry)
        _save_nifti(atlas[0], staging / "atlas_image.nii.gz")
        _save_nifti(atlas[1], staging / "atlas_label.nii.gz")
        n_val, n_test = spec["num_validation"], spec["num_test"]
        n_train = len(entries) - n_val - n_test
        datalist = {
            "description": "synthetic SynthMorph-style population generated by scripts/synthetic.py",
            "training": entries[:n_train],
            "validation": entries[n_train : n_train + n_val],
            "test": entries[n_train + n_val :],
            "atlas": {"image": "atlas_image.nii.gz", "label": "atlas_label.nii.gz"},
        }
        (staging / "datalist.json").write_text(json.dumps(datalist, indent=1))
        (staging / PARAMS_FILE).write_text(json.dumps({**spec, "generator_version": GENERATOR_VERSION}, indent=1))
