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
from monai.data import load_decathlon_datalist

# Sections up to this size are decompressed in full at start-up (seconds); larger ones get a header check only.
FULL_CHECK_MAX_FILES = 64

__all__ = ["check_image_file", "load_section", "load_atlas", "load_pairs", "subjects_from_files"]


def check_image_file(path: str, what: str, read_data: bool = True) -> None:
    """Raise a clear error when ``path`` is missing, not NIfTI-readable or (``read_data``) a corrupt/truncated gzip.

    Reading the data costs a decompression per file, so datalists of thousands of volumes check headers only and
    leave truncated data to the loader (whose error also names the file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file not found: {path}")
    try:
        image = nib.load(path)
        if read_data and path.endswith(".gz"):
            # A truncated gzip has a readable header; only reading to the end finds the damage.
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 24):
                    pass
    except (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError, ValueError) as error:
        raise ValueError(f"{what}: cannot read {path} as a NIfTI image ({type(error).__name__}: {error})") from error
    if len(image.shape) < 2:
        raise ValueError(f"{what}: {path} has shape {image.shape}; expected a 2D or 3D image")


def _check_entries(entries: list[dict], where: str, datalist: str, read_data: bool = True) -> None:
    for index, entry in enumerate(entries):
        if "image" not in entry:
            raise KeyError(f"{datalist}: entry {index} of '{where}' has no 'image' key: {entry}")
        for key in ("image", "label"):
            if key in entry:
                check_image_file(entry[key], f"{datalist} '{where}'[{index}]['{key}']", read_data)


def load_section(datalist: str, section: str, base_dir: str | None = None, required: bool = True) -> list[dict]:
    """Return the checked subjects of one datalist section (``training``, ``validation``, ``test``)."""
    if not os.path.isfile(datalist):
        raise FileNotFoundError(f"datalist not found: {datalist}")
    with open(datalist) as stream:
        try:
            content = json.load(stream)
        except json.JSONDecodeError as error:
            raise ValueError(f"datalist {datalist} is not valid JSON: {error}") from error
    if section not in content or not content[section]:
        if required:
            raise ValueError(f"datalist {datalist} has no subjects in section '{section}'")
        return []
    base_dir = base_dir if base_dir is not None else str(Path(datalist).parent)
    entries = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=section, base_dir=base_dir)
    _check_entries(entries, section, datalist, read_data=len(entries) <= FULL_CHECK_MAX_FILES)
    return entries


def load_atlas(datalist: str, base_dir: str | None = None) -> dict:
    """Return the checked atlas subject ``{"image", "label"?}`` of the datalist (needed by pair_mode ``atlas``)."""
    with open(datalist) as stream:
        content = json.load(stream)
    if "atlas" not in content:
        raise ValueError(f"pair_mode 'atlas' needs an 'atlas' entry in datalist {datalist}")
    base = Path(base_dir if base_dir is not None else Path(datalist).parent)
    atlas = {key: str(base / value) for key, value in content["atlas"].items() if key in ("image", "label")}
    _check_entries([atlas], "atlas", datalist)
    return atlas


def load_pairs(datalist: str, section: str, base_dir: str | None = None) -> list[dict] | None:
    """Explicit ``pairs[section]`` as ``[{"fixed": path, "moving": path}]`` with resolved paths, or None."""
    with open(datalist) as stream:
        content = json.load(stream)
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


def subjects_from_files(
    fixed_image: str, moving_image: str, fixed_label: str | None = None, moving_label: str | None = None
) -> list[dict]:
    """Two checked subjects ``[fixed, moving]`` for registering one pair given as files (inference)."""
    subjects = []
    for role, image, label in (("fixed", fixed_image, fixed_label), ("moving", moving_image, moving_label)):
        if not image:
            raise ValueError(f"--{role}_image is required")
        entry = {"image": str(image)}
        if label:
            entry["label"] = str(label)
        _check_entries([entry], role, "inference input")
        subjects.append(entry)
    return subjects
