"""Seeded copies of a T1 subject in another contrast: a non-monotonic intensity remap, a bias field and noise.

    python benchmarks/contrast_cases.py IMAGE OUTPUT_DIR [--kind pd|t2] [--seed 0]

The brain's three tissue intensities (CSF < grey matter < white matter in T1) are found by a 1D k-means of the
image's own foreground values (no label map), and a piecewise-linear remap sends them to the target contrast's
order with seeded jitter:

- ``pd`` (proton-density-like): grey matter brightest, CSF and white matter darker (non-monotonic in T1);
- ``t2`` (T2-like): CSF brightest, grey matter, then white matter darkest (reversed, and 0 stays 0: the background
  and the brain's edge are non-monotonic too).

Then a smooth multiplicative bias field ``exp(b)`` (``b`` cubic-interpolated from a 4-point-per-axis random grid,
about ±20 %) and Gaussian noise (2 % of the maximum) inside the brain; the background stays 0, as in a
skull-stripped scan. The grid and header are the input's, so ``--case contrast`` pairs stay aligned; ``--case both``
then moves the copy with ``misaligned_cases.make_case``. Used by ``oasis_benchmark.py`` and the tests; only ever
applied to the repository's own training subjects for any choice.
"""

from __future__ import annotations

import argparse
import json
import os

import nibabel as nib
import numpy as np
from scipy.ndimage import zoom

KINDS = ("pd", "t2")
# target intensity of (CSF, grey matter, white matter), before jitter
TISSUE_TARGETS = {"pd": (0.55, 1.0, 0.65), "t2": (1.0, 0.55, 0.3)}
JITTER = 0.06
BIAS_STD = 0.12
NOISE_FRACTION = 0.02


def tissue_means(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """The three cluster means (ascending) of a 1D k-means of ``values`` (foreground intensities), started at the
    10th, 50th and 90th percentiles; 20k values sampled with ``seed``."""
    rng = np.random.default_rng(seed)
    sample = rng.choice(values, size=min(20000, values.size), replace=False)
    centres = np.percentile(sample, [10, 50, 90]).astype(np.float64)
    for _ in range(50):
        nearest = np.abs(sample[:, None] - centres[None]).argmin(1)
        updated = np.array([sample[nearest == k].mean() if np.any(nearest == k) else centres[k] for k in range(3)])
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.sort(centres)


def remap_contrast(values: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """``values`` (a skull-stripped T1, background 0) in contrast ``kind``, deterministic for a seed; see the module
    docstring. Returns float32 in about [0, 1.3]."""
    if kind not in KINDS:
        raise ValueError(f"contrast kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float32)
    foreground = values > 0.02 * float(values.max())
    csf, grey, white = tissue_means(values[foreground], seed)
    targets = np.asarray(TISSUE_TARGETS[kind]) + rng.uniform(-JITTER, JITTER, size=3)
    top = float(np.percentile(values[foreground], 99.9))
    # 0 stays 0; beyond white matter the remap stays flat (T1's brightest voxels are white matter)
    anchors = [0.0, csf, grey, white, max(top, white * 1.05)]
    levels = [0.0, targets[0], targets[1], targets[2], targets[2]]
    remapped = np.interp(values, anchors, levels).astype(np.float32)
    coarse = rng.normal(0.0, BIAS_STD, size=(4,) * values.ndim)
    bias = np.exp(zoom(coarse, [n / 4 for n in values.shape], order=3, mode="nearest"))[
        tuple(slice(0, n) for n in values.shape)
    ]
    noise = rng.normal(0.0, NOISE_FRACTION, size=values.shape)
    out = np.where(foreground, np.clip(remapped * bias + noise, 0.0, None), 0.0)
    return out.astype(np.float32)


def make_contrast_case(image_path: str, output_dir: str, kind: str, seed: int, name: str | None = None) -> str:
    """Write ``NAME_image.nii.gz`` (the input's grid and header) into ``output_dir``; returns its path."""
    source = nib.load(image_path)
    values = np.asarray(source.dataobj, dtype=np.float32)
    out = remap_contrast(values, kind, seed)
    name = name or f"{kind}{seed}"
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}_image.nii.gz")
    nib.save(nib.Nifti1Image(out, source.affine, source.header), path)
    with open(os.path.join(output_dir, f"{name}.json"), "w", encoding="utf-8") as stream:
        json.dump({"kind": kind, "seed": seed, "source": os.path.basename(image_path)}, stream, indent=1)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("output_dir")
    parser.add_argument("--kind", choices=KINDS, default="pd")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_contrast_case(args.image, args.output_dir, args.kind, args.seed))


if __name__ == "__main__":
    main()
