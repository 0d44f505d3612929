#!/usr/bin/env python
"""How good the inverse field is on real anatomy: one registration scored in both directions.

    python benchmarks/inverse_field.py [--data ../shared/data/oasis3d|oasis2d] [--threads 2]
        [--extra "--refine_iterations 0"]

For each direction of the OASIS pair (moving ``subject_b`` -> fixed ``subject_a``, and the reverse) it runs the
README's inference command as a user would, with ``--write_inverse_ddf true``, and scores, with ``scripts.metrics``
(the benchmark's scoring; the 30 structures of ``eval_labels.json``, the 3D folder's for the 2D slices):

- forward: the fixed label against the moving label warped by ``ddf.nii.gz`` (the run's ``warped_label``);
- inverse: the moving label against the fixed label carried onto the moving grid by ``inverse_ddf.nii.gz``
  (``scripts/apply_ddf.py``, nearest neighbour), i.e. the same registration read the other way round, beside the
  other direction's own registration;
- folded voxels % of both fields, and ``metrics.json``'s ``inverse_consistency`` (``|φ(φ⁻¹(x)) - x|``, voxels).

The pair is a test pair: this scores the inverse, nothing is chosen by it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from scripts.apply_ddf import apply_ddf  # noqa: E402
from scripts.metrics import deformation_stats, dice_per_label, labels_to_score, resolve_label_ids  # noqa: E402


def register(data: Path, fixed: str, moving: str, out: Path, threads: int, extra: list[str]) -> dict:
    """The README's inference command with the inverse field; returns its metrics.json."""
    command = [
        sys.executable, "-m", "monai.bundle", "run", "inference",
        "--config_file", "bundle/configs/inference.yaml",
        "--fixed_image", str(data / f"{fixed}_image.nii.gz"),
        "--moving_image", str(data / f"{moving}_image.nii.gz"),
        "--moving_label", str(data / f"{moving}_label.nii.gz"),
        "--output_dir", str(out), "--write_inverse_ddf", "true", *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if process.returncode != 0:
        raise SystemExit(f"inference failed:\n{(process.stdout + process.stderr)[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).round().astype(np.int32)


def field(path: Path) -> np.ndarray:
    """A written field ``(X, Y, Z, 1, d)`` as ``(d, X, Y, Z)`` (2D: ``(2, X, Y)``), the layout ``deformation_stats``
    takes."""
    vectors = np.moveaxis(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)[..., 0, :], -1, 0)
    return vectors[..., 0] if vectors.shape[0] == 2 else vectors


def mean_dice(reference: np.ndarray, warped: np.ndarray, label_ids) -> float:
    """Mean Dice over ``label_ids``, as the benchmark scores: ``label_ids`` are those present in both subjects."""
    return float(np.mean(list(dice_per_label(reference, warped, label_ids).values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "oasis3d"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", default="", help='more inference flags, e.g. "--refine_iterations 0"')
    args = parser.parse_args()
    data = Path(args.data)
    own = data / "eval_labels.json"  # a folder without one (the 2D slices) scores the 3D folder's 30 structures
    label_ids = resolve_label_ids(str(own if own.is_file() else data.parent / "oasis3d" / "eval_labels.json"))
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for moving, fixed in (("subject_b", "subject_a"), ("subject_a", "subject_b")):
            out = Path(work) / f"{moving}_to_{fixed}"
            metrics = register(data, fixed, moving, out, args.threads, shlex.split(args.extra))
            fixed_label, moving_label = labels(data / f"{fixed}_label.nii.gz"), labels(data / f"{moving}_label.nii.gz")
            present = labels_to_score(fixed_label, moving_label, label_ids)  # the 2D slices hold 21 of the 30
            carried = apply_ddf(str(out / "inverse_ddf.nii.gz"), str(data / f"{fixed}_label.nii.gz"), label=True)
            carried = carried.reshape(moving_label.shape)
            rows[(moving, fixed)] = {
                "forward": mean_dice(fixed_label, labels(out / "warped_label.nii.gz"), present),
                "inverse": mean_dice(moving_label, carried.astype(np.int32), present),
                "folded": 100 * deformation_stats(field(out / "ddf.nii.gz"))["folding_fraction"],
                "folded_inverse": 100 * deformation_stats(field(out / "inverse_ddf.nii.gz"))["folding_fraction"],
                "consistency": metrics["inverse_consistency"],
            }
    print(f"{args.threads} threads, inference flags: {args.extra or '(none: the default)'}")
    print(
        "| registration | forward Dice | inverse Dice (fixed labels onto the moving grid) | the reverse registration's "
        "own Dice | folded % (φ / φ⁻¹) | φ ∘ φ⁻¹ - id, voxels (mean / p99 / max) |"
    )
    print("|---|---|---|---|---|---|")
    for (moving, fixed), row in rows.items():
        reverse = rows[(fixed, moving)]["forward"]
        consistency = " / ".join(f"{row['consistency'][k]:.2f}" for k in ("mean_voxels", "p99_voxels", "max_voxels"))
        print(
            f"| {moving} -> {fixed} | {row['forward']:.4f} | {row['inverse']:.4f} ({fixed} -> {moving}) | "
            f"{reverse:.4f} | {row['folded']:.3f} / {row['folded_inverse']:.3f} | {consistency} |"
        )


if __name__ == "__main__":
    main()
