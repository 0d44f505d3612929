"""Soak: 200 seeded, randomly malformed inputs through the real inference workflow (in-process, 2D and 3D).

Each case must either register (complete output folder, strict-JSON metrics) or fail with one of the bundle's own
errors, whose message names the file or option, leaving no output folder and no staging folder behind.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from conftest import BUNDLE, CONFIGS
from monai.bundle import ConfigParser
from scripts import _specific_error

INFERENCE = str(CONFIGS / "inference.yaml")
CASES = 200
DOCUMENTED_ERRORS = (ValueError, FileNotFoundError, MemoryError, FileExistsError)
OUTPUTS = {"warped_image.nii.gz", "ddf.nii.gz", "overview.png", "metrics.json"}
KINDS = (
    "valid",
    "zero_size_axis",
    "dtype",
    "nan_patch",
    "inf_patch",
    "header_bytes",
    "data_bytes",
    "truncated",
    "singular_affine",
    "sheared_affine",
    "absurd_spacing",
    "random_label",
    "float_label",
    "four_d",
    "not_an_image",
    "empty_file",
    "constant",
    "huge_header",
    "mismatched_grid",
    "three_d",
    "label_grid",
    "inconsistent_header",
)


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None, inconsistent: bool = False) -> str:
    """Save with the affine as the sform only (as the OASIS files are): nibabel refuses to decompose a singular one
    into a qform. ``pixdim`` follows the sform's voxel sizes unless ``affine`` is given with ``inconsistent``."""
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    affine = np.eye(4) if affine is None else affine
    header.set_data_shape(array.shape)
    if not inconsistent:
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        header.set_zooms(tuple(zooms[: min(array.ndim, 3)]) + (1.0,) * max(0, array.ndim - 3))
    header.set_sform(affine, code=1)
    nib.save(nib.Nifti1Image(array, None, header=header), str(path))
    return str(path)


def _corrupt_gzip_member(path: str, rng: np.random.Generator, region: str) -> None:
    """Flip random bytes of the decompressed NIfTI (header: first 348 bytes; data: after 352) and recompress."""
    raw = bytearray(gzip.decompress(Path(path).read_bytes()))
    low, high = (0, 348) if region == "header" else (352, len(raw))
    for position in rng.integers(low, high, size=int(rng.integers(1, 12))):
        raw[position] = int(rng.integers(0, 256))
    Path(path).write_bytes(gzip.compress(bytes(raw)))


def _case(index: int, folder: Path) -> tuple[str, dict]:
    """The ``index``-th malformed input: (kind, inference overrides with file paths)."""
    rng = np.random.default_rng(index)
    kind = KINDS[index % len(KINDS)]
    shape = (int(rng.integers(12, 40)), int(rng.integers(12, 40)), 1)
    image = rng.random(shape).astype(np.float32)
    moving_image = rng.random(shape).astype(np.float32)
    label = (rng.random(shape) * 4).astype(np.int16)
    affine = np.diag([float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.5, 2.0)), 1.0, 1.0])
    files = {"fixed_image": folder / "fixed.nii.gz", "moving_image": folder / "moving.nii.gz"}
    target = "fixed_image" if rng.random() < 0.5 else "moving_image"
    extra: dict[str, str] = {}
    if kind == "zero_size_axis":
        image = np.zeros((shape[0], 0, 1), dtype=np.float32)
    elif kind == "dtype":
        dtype = [np.uint8, np.int16, np.float64, np.int64, np.uint16][int(rng.integers(5))]
        image = (image * 200).astype(dtype)
    elif kind in ("nan_patch", "inf_patch"):
        x, y = int(rng.integers(shape[0] - 4)), int(rng.integers(shape[1] - 4))
        image[x : x + 4, y : y + 4] = np.nan if kind == "nan_patch" else np.inf
    elif kind == "singular_affine":
        affine = affine.copy()
        affine[:3, int(rng.integers(2))] = 0.0
    elif kind == "sheared_affine":
        affine = affine.copy()
        affine[0, 1] = float(rng.uniform(0.2, 0.9))
    elif kind == "absurd_spacing":
        affine = np.diag([float(rng.choice([1e-6, 1e6])), 1.0, 1.0, 1.0])
    elif kind == "four_d":
        image = rng.random(shape + (int(rng.integers(2, 4)),)).astype(np.float32)
    elif kind == "constant":
        image = np.full(shape, float(rng.random()), dtype=np.float32)
    elif kind == "three_d":
        image = rng.random((shape[0], shape[1], int(rng.integers(12, 24)))).astype(np.float32)
        moving_image = rng.random(image.shape).astype(np.float32)
    label_affine = np.diag([1.5, 1.5, 1.0, 1.0]) if kind == "label_grid" else affine
    if kind in ("random_label", "float_label"):
        bad = rng.random(shape).astype(np.float32) if kind == "float_label" else rng.integers(-5, 5000, shape)
        extra["moving_label"] = _save(folder / "moving_label.nii.gz", bad.astype(np.float32), affine)
        extra["fixed_label"] = _save(folder / "fixed_label.nii.gz", label, affine)
    elif kind == "label_grid" or rng.random() < 0.5:
        extra["moving_label"] = _save(folder / "moving_label.nii.gz", label, label_affine)
    paths = {key: str(path) for key, path in files.items()}
    _save(files["fixed_image"], moving_image if target == "moving_image" and kind != "three_d" else image, affine)
    other = "moving_image" if target == "fixed_image" else "fixed_image"
    _save(files[other], moving_image, affine if kind != "mismatched_grid" else np.diag([3.0, 0.7, 1.0, 1.0]))
    _save(files[target], image, affine, inconsistent=kind == "inconsistent_header")
    if kind in ("header_bytes", "data_bytes"):
        _corrupt_gzip_member(paths[target], rng, kind.split("_")[0])
    elif kind == "truncated":
        data = Path(paths[target]).read_bytes()
        Path(paths[target]).write_bytes(data[: int(len(data) * rng.uniform(0.1, 0.9))])
    elif kind == "not_an_image":
        Path(paths[target]).write_text("this is not a NIfTI file\n" * int(rng.integers(1, 20)))
    elif kind == "empty_file":
        Path(paths[target]).write_bytes(b"")
    elif kind == "huge_header":
        header = nib.Nifti1Header()
        header.set_data_shape((4000, 4000, 4000))
        header.set_data_dtype(np.float32)
        Path(paths[target]).write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return kind, {**paths, **extra}


def _register(files: dict, output_dir: Path, model_2d: Path) -> None:
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update(
        {
            **files,
            "bundle_root": str(BUNDLE),
            "output_dir": str(output_dir),
            "refine_iterations": 0,
            # 2D: an untrained network of the default training's shape; 3D: the shipped model
            "ckpt_dir": f"$'{model_2d}' if @spatial_dims == 2 else @bundle_root + '/models'",
        }
    )
    parser.get_parsed_content("inference")


def test_soak_malformed_inputs_register_or_fail_cleanly(tmp_path, checkpoint_dir):
    torch.set_num_threads(1)
    outcomes: collections.Counter = collections.Counter()
    for index in range(CASES):
        folder = tmp_path / f"case{index:03d}"
        folder.mkdir()
        kind, files = _case(index, folder)
        output_dir = folder / "out"
        try:
            _register(files, output_dir, checkpoint_dir)
        except Exception as error:  # noqa: BLE001 - classified below
            specific = _specific_error(error)
            where = f"case {index} ({kind}, {files}): {type(specific).__name__}: {specific}"
            assert isinstance(specific, DOCUMENTED_ERRORS), "undocumented error in " + where
            named = [str(v) for v in files.values()] + [f"--{k}" for k in files] + [str(output_dir)]
            assert any(name in str(specific) for name in named), "error names no input in " + where
            assert not output_dir.exists() or not any(output_dir.iterdir()), "partial output in " + where
            outcomes[f"{kind}: {type(specific).__name__}"] += 1
        else:
            written = set(os.listdir(output_dir))
            assert OUTPUTS <= written, f"case {index} ({kind}) wrote only {sorted(written)}"
            json.loads((output_dir / "metrics.json").read_text())  # strict JSON (no bare NaN)
            outcomes[f"{kind}: registered"] += 1
        leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".out.")]
        assert not leftovers, f"case {index} ({kind}) left staging folders {leftovers}"
    print("\nsoak outcomes:", dict(sorted(outcomes.items())))
    assert sum(outcomes.values()) == CASES
    assert sum(n for key, n in outcomes.items() if key.endswith("registered")) >= CASES // 10
