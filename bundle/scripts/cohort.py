"""The pairs of a cohort registration (``batch_inference``): a ``pairs.csv``, or an atlas with every image of a glob.

Everything here is checked before anything registers: a malformed list (a missing column, an unknown one, a missing
file, a duplicate pair id) is refused naming its row, so a cohort run never stops at pair 412 for a typo in row 412.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["ATLAS_DIRECTIONS", "CohortPair", "atlas_pairs", "cohort_pairs", "read_pairs_csv"]

REQUIRED_COLUMNS = ("fixed_image", "moving_image")
OPTIONAL_COLUMNS = ("fixed_label", "moving_label", "pair_id")
# from_atlas: the atlas is the moving image, registered onto each image (atlas-based segmentation: the atlas label
# warped onto every subject); to_atlas: each image is registered onto the atlas (spatial normalisation)
ATLAS_DIRECTIONS = ("from_atlas", "to_atlas")
# a pair id names a folder of --output_dir: one path component, no hidden or relative names
PAIR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class CohortPair:
    """One pair to register; ``where`` names its source (``pairs.csv row 3``) for every message about it."""

    pair_id: str
    fixed_image: str
    moving_image: str
    fixed_label: str | None = None
    moving_label: str | None = None
    where: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def derived_pair_id(fixed_image: str, moving_image: str) -> str:
    """``<moving>_to_<fixed>`` from the file names (as the single command names a pair), characters outside
    ``[A-Za-z0-9._+-]`` replaced by ``_``."""
    name = f"{_stem(moving_image)}_to_{_stem(fixed_image)}"
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    return name if PAIR_ID.fullmatch(name) else f"pair_{name}"


def _resolve(value: str, base: str) -> str:
    value = os.path.expanduser(value.strip())
    return os.path.abspath(value if os.path.isabs(value) else os.path.join(base, value))


def read_pairs_csv(path: str) -> list[CohortPair]:
    """The checked pairs of ``path`` (columns ``fixed_image, moving_image[, fixed_label, moving_label, pair_id]``;
    relative paths are relative to the CSV's folder; an empty label cell means no label)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pairs: file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"--pairs {path} is not a CSV text file: {error}") from error
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"--pairs {path}: the header row {columns} lacks the column(s) {missing}; expected "
            f"{', '.join(REQUIRED_COLUMNS)}[, {', '.join(OPTIONAL_COLUMNS)}]"
        )
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise ValueError(
            f"--pairs {path}: unknown column(s) {unknown}; the columns are {', '.join(REQUIRED_COLUMNS)}"
            f"[, {', '.join(OPTIONAL_COLUMNS)}]"
        )
    pairs = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header: numbers as a spreadsheet shows them
        where = f"{path} row {number}"
        if None in row or any(v is None for v in row.values()):  # DictReader's marks of too many / few cells
            raise ValueError(f"{where}: the row has a different number of cells than the header")
        row = {k.strip(): v.strip() for k, v in row.items()}
        for column in REQUIRED_COLUMNS:
            if not row.get(column):
                raise ValueError(f"{where}: the {column} cell is empty")
        files = {
            c: _resolve(row[c], base)
            for c in ("fixed_image", "moving_image", "fixed_label", "moving_label")
            if row.get(c)
        }
        pair_id = row.get("pair_id") or derived_pair_id(files["fixed_image"], files["moving_image"])
        pairs.append(CohortPair(pair_id=pair_id, where=where, **files))
    if not pairs:
        raise ValueError(f"--pairs {path} lists no pairs (a header row only)")
    return _checked(pairs)


def atlas_pairs(
    atlas_image: str, images: str | Sequence[str], atlas_label: str | None = None, direction: str = "from_atlas"
) -> list[CohortPair]:
    """The atlas with every image of ``images`` (a glob pattern, a folder, or a list of them), ``direction`` one of
    ``ATLAS_DIRECTIONS``; the atlas label (optional) goes with the atlas image on its side of each pair."""
    if direction not in ATLAS_DIRECTIONS:
        raise ValueError(f"--atlas_direction must be one of {ATLAS_DIRECTIONS}, got {direction!r}")
    patterns = [images] if isinstance(images, str) else list(images)
    found: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "*.nii*")
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"--images {pattern}: no file matches")
        found += [os.path.abspath(m) for m in matches if os.path.isfile(m)]
    atlas = os.path.abspath(os.path.expanduser(atlas_image))
    atlas_label = os.path.abspath(os.path.expanduser(atlas_label)) if atlas_label else None
    subjects = [f for f in dict.fromkeys(found) if os.path.realpath(f) not in {os.path.realpath(atlas)}]
    pairs = []
    for number, image in enumerate(subjects, start=1):
        where = f"--images file {number} ({image})"
        if direction == "from_atlas":
            pair = {"fixed_image": image, "moving_image": atlas, "moving_label": atlas_label}
        else:
            pair = {"fixed_image": atlas, "moving_image": image, "fixed_label": atlas_label}
        pairs.append(
            CohortPair(pair_id=derived_pair_id(pair["fixed_image"], pair["moving_image"]), where=where, **pair)
        )
    if not pairs:
        raise ValueError(f"--images {images}: no image besides the atlas")
    return _checked(pairs)


def _checked(pairs: list[CohortPair]) -> list[CohortPair]:
    """Every file exists, every pair id is a plain folder name and appears once."""
    seen: dict[str, str] = {}
    for pair in pairs:
        if not PAIR_ID.fullmatch(pair.pair_id):
            raise ValueError(
                f"{pair.where}: pair_id {pair.pair_id!r} is not a folder name (letters, digits, '.', '_', '+', '-'; "
                "not starting with '.')"
            )
        key = pair.pair_id.lower()  # case-insensitive file systems would merge two ids that differ in case
        if key in seen:
            raise ValueError(
                f"{pair.where}: pair id {pair.pair_id!r} repeats {seen[key]}; give each pair its own pair_id"
            )
        seen[key] = pair.where
        for column in ("fixed_image", "moving_image", "fixed_label", "moving_label"):
            path = getattr(pair, column)
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"{pair.where}: {column} file not found: {path}")
    return pairs


def cohort_pairs(
    pairs: str | None = None,
    atlas_image: str | None = None,
    images: str | Sequence[str] | None = None,
    atlas_label: str | None = None,
    atlas_direction: str = "from_atlas",
) -> list[CohortPair]:
    """The pairs of ``--pairs pairs.csv`` or of ``--atlas_image A --images GLOB`` (exactly one of the two)."""
    if pairs and (atlas_image or images):
        raise ValueError("give either --pairs pairs.csv or --atlas_image with --images, not both")
    if pairs:
        return read_pairs_csv(str(pairs))
    if atlas_image and images:
        return atlas_pairs(str(atlas_image), images, atlas_label, atlas_direction)
    if atlas_image or images:
        raise ValueError("the atlas mode needs both --atlas_image A.nii.gz and --images 'DIR/*.nii.gz'")
    raise ValueError("batch_inference needs --pairs pairs.csv, or --atlas_image A.nii.gz with --images 'DIR/*.nii.gz'")
