"""Datalist reading with early, specific errors.

The datalist is MONAI's decathlon style (``monai.data.load_decathlon_datalist`` resolves the paths)::

    {"training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}, ...],
     "validation": [...], "test": [...],
     "atlas": {"image": "atlas.nii.gz", "label": "atlas_seg.nii.gz"},           # optional, for pair_mode "atlas"
     "pairs": {"validation": [{"fixed": "b.nii.gz", "moving": "a.nii.gz"}]}}    # optional explicit pairs

Checking every file up front turns a crash deep inside a worker hours into a run into a one-line message that
names the datalist key and the file.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

from .pairs import PAIR_MODES, pair_indices_from_paths

# Sections up to this size are decompressed in full at start-up (seconds); larger ones get a header check only.
FULL_CHECK_MAX_FILES = 64

__all__ = ["check_image_file", "load_section", "load_atlas", "load_pairs", "load_held_out", "subjects_from_files"]


def check_image_file(path: str, what: str, read_data: bool = True) -> None:
    """Raise a clear error when ``path`` is missing, not NIfTI-readable or (``read_data``) a corrupt/truncated gzip.

    Reading the data costs a decompression per file, so datalists of thousands of volumes check headers only and
    leave truncated data to the loader (whose error also names the file).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a file path, got {type(path).__name__} {path!r}")
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file not found: {path}")
    try:
        image = nib.load(path)
        if read_data and path.endswith(".gz"):
            # A truncated gzip has a readable header; only reading to the end finds the damage.
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 24):
                    pass
    except EOFError as error:
        raise ValueError(f"{what}: {path} is truncated (the gzip data ends early): {error}") from error
    except (OSError, zlib.error, nib.filebasedimages.ImageFileError, ValueError) as error:
        raise ValueError(f"{what}: cannot read {path} as a NIfTI image ({type(error).__name__}: {error})") from error
    _check_data_size(image, path, what)
    if len(image.shape) < 2:
        raise ValueError(f"{what}: {path} has shape {image.shape}; expected a 2D or 3D image")
    _check_geometry(image, path, what)


# Voxel sizes outside this range (mm) are header mistakes (e.g. metres or microns written as mm), not brain MRI.
SPACING_RANGE_MM = (1e-4, 1e4)


def _check_geometry(image: nib.filebasedimages.FileBasedImage, path: str, what: str) -> None:
    """A zero-size axis, a non-finite or singular voxel-to-world affine, or an absurd voxel size cannot be
    resampled onto any grid; caught from the header, before anything is loaded or registered."""
    if 0 in tuple(image.shape):
        raise ValueError(f"{what}: {path} has shape {tuple(image.shape)}, with a zero-size axis: it holds no voxels")
    affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
    if not np.isfinite(affine).all():
        raise ValueError(f"{what}: {path} has a non-finite voxel-to-world affine {affine.tolist()}")
    singular_values = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if singular_values.min() <= 1e-9 * max(1.0, singular_values.max()):
        raise ValueError(
            f"{what}: {path} has a singular voxel-to-world affine (an axis of zero length: {affine[:3, :3].tolist()}); "
            "fix the header's sform/qform"
        )
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    header = image.header
    if "qform_code" in header and int(header["qform_code"]) == 0 and int(header["sform_code"]) > 0:
        zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
        n = min(len(zooms), 3)
        if not np.allclose(zooms[:n], spacing[:n], rtol=1e-3):
            raise ValueError(
                f"{what}: {path} has voxel size {np.round(zooms[:n], 6).tolist()} mm in its header's pixdim but "
                f"{np.round(spacing[:n], 6).tolist()} mm in its sform (and no qform): readers disagree on such a file; "
                "fix the header"
            )
    low, high = SPACING_RANGE_MM
    if spacing.min() < low or spacing.max() > high:
        raise ValueError(
            f"{what}: {path} has voxel size {np.round(spacing, 8).tolist()} mm, outside {low:g}-{high:g} mm; "
            "fix the header's spacing"
        )


def _check_data_size(image: nib.filebasedimages.FileBasedImage, path: str, what: str) -> None:
    """An uncompressed NIfTI cut short keeps a readable header; its size against the header's shows the damage."""
    proxy = getattr(image, "dataobj", None)
    if path.endswith(".gz") or not all(hasattr(proxy, name) for name in ("offset", "dtype", "shape")):
        return
    expected = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    actual = os.path.getsize(path)
    if actual < expected:
        raise ValueError(
            f"{what}: {path} is truncated: {actual} bytes, but the header's shape {proxy.shape} needs {expected}"
        )


def _read_datalist(datalist: str) -> dict:
    """The datalist's JSON object, or an error naming the file and what is wrong with it."""
    if not os.path.isfile(datalist):
        raise FileNotFoundError(f"datalist not found: {datalist}")
    try:
        with open(datalist) as stream:
            content = json.load(stream)
    except json.JSONDecodeError as error:
        raise ValueError(f"datalist {datalist} is not valid JSON: {error}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"datalist {datalist} is not a JSON text file: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(
            f'datalist {datalist} must be a JSON object such as {{"training": [...]}}, got a {type(content).__name__}'
        )
    return content


def _require_objects(entries: list, where: str, datalist: str) -> None:
    """Entries must be ``{"image": path, ...}`` objects; MONAI's path joining fails obscurely on anything else."""
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(
                f"{datalist}: entry {index} of '{where}' must be an object like {{\"image\": path}}, got {entry!r}"
            )


def _check_entries(entries: list[dict], where: str, datalist: str, read_data: bool = True) -> None:
    for index, entry in enumerate(entries):
        if "image" not in entry:
            raise KeyError(f"{datalist}: entry {index} of '{where}' has no 'image' key: {entry}")
        for key in ("image", "label"):
            if key in entry:
                check_image_file(entry[key], f"{datalist} '{where}'[{index}]['{key}']", read_data)


def load_section(datalist: str, section: str, base_dir: str | None = None, required: bool = True) -> list[dict]:
    """Return the checked subjects of one datalist section (``training``, ``validation``, ``test``)."""
    return _section(_read_datalist(datalist), datalist, section, base_dir, required)


def _section(content: dict, datalist: str, section: str, base_dir: str | None, required: bool = True) -> list[dict]:
    if section not in content or not content[section]:
        if required:
            why = "the key is missing" if section not in content else f"it is {content[section]!r}"
            raise ValueError(f"datalist {datalist} has no subjects in section '{section}' ({why})")
        return []
    if not isinstance(content[section], list):
        kind = type(content[section]).__name__
        raise ValueError(f"datalist {datalist}: section '{section}' must be a list of subjects, got a {kind}")
    if section != "test" or isinstance(content[section][0], dict):  # MONAI accepts bare paths in 'test' only
        _require_objects(content[section], section, datalist)
    base_dir = base_dir if base_dir is not None else str(Path(datalist).parent)
    # MONAI's own path resolution (it re-reads the file: its public API takes a path, not the parsed content)
    entries = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=section, base_dir=base_dir)
    _check_entries(entries, section, datalist, read_data=len(entries) <= FULL_CHECK_MAX_FILES)
    return entries


def load_atlas(datalist: str, base_dir: str | None = None) -> dict:
    """Return the checked atlas subject ``{"image", "label"?}`` of the datalist (needed by pair_mode ``atlas``)."""
    return _atlas(_read_datalist(datalist), datalist, base_dir)


def _atlas(content: dict, datalist: str, base_dir: str | None) -> dict:
    if "atlas" not in content:
        raise ValueError(f"pair_mode 'atlas' needs an 'atlas' entry in datalist {datalist}")
    base = Path(base_dir if base_dir is not None else Path(datalist).parent)
    atlas = {key: str(base / value) for key, value in content["atlas"].items() if key in ("image", "label")}
    _check_entries([atlas], "atlas", datalist)
    return atlas


def load_pairs(datalist: str, section: str, base_dir: str | None = None) -> list[dict] | None:
    """Explicit ``pairs[section]`` as ``[{"fixed": path, "moving": path}]`` with resolved paths, or None."""
    return _pairs(_read_datalist(datalist), datalist, section, base_dir)


def _pairs(content: dict, datalist: str, section: str, base_dir: str | None) -> list[dict] | None:
    pairs = content.get("pairs", {}).get(section)
    if pairs is None:
        return None
    base = Path(base_dir if base_dir is not None else Path(datalist).parent)
    resolved = []
    for index, pair in enumerate(pairs):
        if not {"fixed", "moving"} <= set(pair):
            raise KeyError(f"{datalist}: pairs['{section}'][{index}] needs 'fixed' and 'moving' keys, got {pair}")
        resolved.append({role: str((base / pair[role]).resolve()) for role in ("fixed", "moving")})
    return resolved


def load_held_out(
    datalist: str, section: str, base_dir: str | None = None, pair_mode: str = "pairwise"
) -> dict[str, object]:
    """The subjects of a held-out section (validation or test) and how they pair, from one read of the datalist.

    The pairs are the same in every run: explicit ``pairs[section]`` from the datalist win; otherwise atlas pairs in
    ``atlas`` mode; otherwise the ring (each subject moving onto the next). Returns the keyword arguments of the
    section's ``PairDataset`` in data form, which ``train.yaml`` turns into datasets (``validate#...``)::

        {"subjects": [{image, label?}, ...], "mode": "explicit" | "atlas" | "ring",
         "pairs": [(fixed, moving) subject indices] (explicit mode) | None, "atlas": {image, label?} | None}
    """
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"unknown pair_mode '{pair_mode}'; expected one of {PAIR_MODES}")
    content = _read_datalist(datalist)
    subjects = _section(content, datalist, section, base_dir)
    held_out: dict[str, object] = {"subjects": subjects, "mode": "ring", "pairs": None, "atlas": None}
    explicit = _pairs(content, datalist, section, base_dir)
    if explicit:
        held_out.update(mode="explicit", pairs=pair_indices_from_paths([s["image"] for s in subjects], explicit))
    elif pair_mode == "atlas":
        held_out.update(mode="atlas", atlas=_atlas(content, datalist, base_dir))
    elif len(subjects) < 2:
        raise ValueError(
            f"{datalist}: section '{section}' has {len(subjects)} subject(s); held-out pairs (each subject onto the "
            f"next) need at least 2: add subjects, list explicit pairs['{section}'], or use pair_mode 'atlas'"
        )
    return held_out


def subjects_from_files(
    fixed_image: str, moving_image: str, fixed_label: str | None = None, moving_label: str | None = None
) -> list[dict]:
    """Two checked subjects ``[fixed, moving]`` for registering one pair given as files (inference)."""
    subjects = []
    for role, image, label in (("fixed", fixed_image, fixed_label), ("moving", moving_image, moving_label)):
        if not image:
            raise ValueError(f"--{role}_image is required")
        entry = {"image": str(image)}
        check_image_file(entry["image"], f"--{role}_image")
        if label:
            entry["label"] = str(label)
            check_image_file(entry["label"], f"--{role}_label")
        subjects.append(entry)
    return subjects


def spatial_dims_of_file(path: str | None, what: str = "image", default: int = 3) -> int:
    """2 or 3 from an image file's header: ``(X, Y)`` and ``(X, Y, 1)`` are 2D slices, ``(X, Y, Z)`` is 3D.

    Without a file (Model Zoo tools that only build ``network_def``) the shipped model's ``default`` is returned.
    """
    if not path:
        return int(default)
    check_image_file(str(path), what, read_data=False)
    shape = tuple(int(n) for n in nib.load(str(path)).shape)
    spatial = shape[:2] if len(shape) == 2 or (len(shape) >= 3 and shape[2] == 1) else shape[:3]
    if len(shape) > 3 and any(n > 1 for n in shape[3:]):
        raise ValueError(f"{path} ({what}) has shape {shape}: expected one 2D or 3D image, not a series")
    return len(spatial)


# Measured peak of a 3D inference with refinement (160 x 192 x 224 at 1 mm: 1.44 GB): start-up + bytes per voxel.
BASE_BYTES, BYTES_PER_VOXEL = 0.5e9, 150.0


def _available_bytes() -> float:
    """MemAvailable from /proc/meminfo (Linux), else physical pages free; inf where neither is known."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def _bytes_needed(path: str, pixdim: float | list[float]) -> tuple[float, list[int]]:
    header = nib.load(str(path)).header
    shape = [int(n) for n in header.get_data_shape()[:3]]
    spacing = [float(z) for z in header.get_zooms()[:3]]
    target = [float(pixdim)] * len(shape) if isinstance(pixdim, (int, float)) else [float(p) for p in pixdim]
    voxels = float(np.prod([max(1.0, n * z / t) for n, z, t in zip(shape, spacing, target)]))
    return BASE_BYTES + BYTES_PER_VOXEL * voxels, shape


def check_fits_in_memory(
    path: str | None, pixdim: float | list[float], what: str = "--fixed_image", moving_path: str | None = None
) -> float:
    """Estimate the memory to register a pair on ``path``'s field of view resampled to ``pixdim`` mm (and to load
    ``moving_path`` at ``pixdim`` before it is resampled onto that grid); raise a ``MemoryError`` that names the
    file, the need, what is available and the way out, before anything is loaded.

    Returns the estimate in bytes. The estimate is linear in the voxels of the network's grid (measured constants).
    """
    if not path:
        return 0.0
    available = _available_bytes()
    estimates = []
    for file, option in ((path, what), (moving_path, "--moving_image")):
        if not file:
            continue
        check_image_file(str(file), option, read_data=False)
        needed, shape = _bytes_needed(str(file), pixdim)
        if needed > available:
            raise MemoryError(
                f"{file} ({option}): registering {shape} voxels at pixdim {pixdim} needs about "
                f"{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is available; pass --pixdim 2 (8x fewer "
                "voxels in 3D) or free memory"
            )
        estimates.append(needed)
    return max(estimates)
