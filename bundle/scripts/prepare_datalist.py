#!/usr/bin/env python
"""Write a decathlon-style datalist JSON (the bundle's ``--datalist``) from a folder of subjects.

Two kinds of folder are understood:

* the neurite-oasis release (one folder per subject)::

      OASIS_OAS1_0001_MR1/aligned_norm.nii.gz   OASIS_OAS1_0001_MR1/aligned_seg35.nii.gz   (3D)
      OASIS_OAS1_0001_MR1/slice_norm.nii.gz     OASIS_OAS1_0001_MR1/slice_seg24.nii.gz     (2D)

  chosen with ``--layout neurite-oasis-3d`` or ``--layout neurite-oasis-2d``;

* a generic layout (``--layout generic``, the default): images are the files that match ``--image-glob``
  (default ``*_image.nii.gz``, relative to the folder, ``**`` allowed), and each image's label is found by replacing
  the last occurrence of ``--label-from`` (default ``_image``) in the image's *file name* with ``--label-to``
  (default ``_label``): ``subject_a_image.nii.gz`` -> ``subject_a_label.nii.gz``.

Subjects are sorted by their image path relative to the folder, shuffled with ``random.Random(seed)`` and split into
validation, test and training (the rest). Labels are optional: a subject whose label file does not exist is written
without one, unless ``--require-labels`` makes that an error. Paths in the JSON are relative to the datalist's
folder. The file is written atomically (temporary file in the same folder, then ``os.replace``).

Standard library only, so that it runs as a plain script and imports as ``scripts.prepare_datalist``::

    python bundle/scripts/prepare_datalist.py /data/neurite-oasis.v1.0 --layout neurite-oasis-3d \\
        --val 20 --test 50 --seed 0 --test-pairs ring -o /data/oasis/datalist.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

try:  # imported as part of the bundle's scripts package
    from .files import atomic_output
except ImportError:  # run as a standalone script: python bundle/scripts/<name>.py
    from files import atomic_output

__all__ = [
    "LAYOUTS",
    "find_subjects",
    "split_subjects",
    "build_datalist",
    "write_datalist",
    "datalist_warnings",
    "main",
]

# preset name -> (image glob, label-from, label-to)
LAYOUTS: dict[str, tuple[str, str, str]] = {
    "generic": ("*_image.nii.gz", "_image", "_label"),
    "neurite-oasis-3d": ("*/aligned_norm.nii.gz", "aligned_norm", "aligned_seg35"),
    "neurite-oasis-2d": ("*/slice_norm.nii.gz", "slice_norm", "slice_seg24"),
}


def _label_path(image: Path, label_from: str, label_to: str) -> Path | None:
    """The label file name derived from ``image`` (last ``label_from`` in the file name replaced), or None."""
    name = image.name
    position = name.rfind(label_from) if label_from else -1
    if position < 0:
        return None
    return image.with_name(name[:position] + label_to + name[position + len(label_from) :])


def _layout_rule(layout: str, image_glob: str | None, label_from: str | None, label_to: str | None):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; expected one of {sorted(LAYOUTS)}")
    preset = LAYOUTS[layout]
    return (
        image_glob if image_glob is not None else preset[0],
        label_from if label_from is not None else preset[1],
        label_to if label_to is not None else preset[2],
    )


def find_subjects(
    data_dir: str | os.PathLike,
    layout: str = "generic",
    image_glob: str | None = None,
    label_from: str | None = None,
    label_to: str | None = None,
    labels: bool = True,
    require_labels: bool = False,
    exclude: tuple[str | os.PathLike, ...] = (),
) -> list[dict]:
    """Subjects ``{"name", "image", "label"?}`` (absolute paths) of ``data_dir``, sorted by name.

    ``name`` is the image path relative to ``data_dir``. Hidden files and folders (``.*``, e.g. macOS ``._`` files)
    are skipped, as are files that are the label of another matched image and the paths in ``exclude`` (the atlas).
    """
    root = Path(os.path.abspath(data_dir))
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder is not a folder: {root}")
    image_glob, label_from, label_to = _layout_rule(layout, image_glob, label_from, label_to)
    excluded = {os.path.realpath(path) for path in exclude}
    matched = sorted(
        path
        for path in root.glob(image_glob)
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and os.path.realpath(path) not in excluded
    )
    # With a broad glob (e.g. "*.nii.gz") the label files match too: they are labels, not subjects.
    derived = set()
    for path in matched:
        label = _label_path(path, label_from, label_to)
        if label is not None and label != path:
            derived.add(os.path.realpath(label))
    matched = [path for path in matched if os.path.realpath(path) not in derived]
    if not matched:
        raise FileNotFoundError(f"no images match '{image_glob}' in {root}")
    subjects = []
    for path in matched:
        subject = {"name": path.relative_to(root).as_posix(), "image": os.path.abspath(path)}
        if labels:
            label = _label_path(path, label_from, label_to)
            if label is not None and label.is_file():
                subject["label"] = os.path.abspath(label)
            elif require_labels:
                if label is None:
                    raise ValueError(
                        f"cannot derive a label name for image {path}: its file name does not contain '{label_from}'"
                    )
                raise FileNotFoundError(f"label not found for image {path}: expected {label}")
        subjects.append(subject)
    return subjects


def _count(amount: int | float, total: int, what: str) -> int:
    """A count as given, or a fraction of ``total`` rounded half up (at least 1 when the fraction is positive)."""
    if isinstance(amount, bool):
        raise TypeError(f"--{what} must be a count or a fraction, got {amount!r}")
    if isinstance(amount, int):
        if amount < 0:
            raise ValueError(f"--{what} must not be negative, got {amount}")
        return amount
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"--{what} as a fraction must be in [0, 1), got {amount}")
    return 0 if amount == 0 else max(1, int(amount * total + 0.5))


def split_subjects(
    subjects: list[dict], val: int | float = 0, test: int | float = 0, seed: int = 0, where: str = "the data folder"
) -> dict[str, list[dict]]:
    """Deterministic ``{"training", "validation", "test"}`` split: sort by name, shuffle with ``seed``, cut.

    ``val``/``test`` are counts (int) or fractions in [0, 1) of all subjects. Each section is sorted by name.
    """
    ordered = sorted(subjects, key=lambda subject: subject["name"])
    n = len(ordered)
    n_val, n_test = _count(val, n, "val"), _count(test, n, "test")
    if n_val + n_test + 1 > n:
        raise ValueError(
            f"{where}: {n} subject(s) found, but the split needs {n_val} validation + {n_test} test "
            f"+ at least 1 training subject ({n_val + n_test + 1})"
        )
    random.Random(seed).shuffle(ordered)
    sections = {
        "validation": ordered[:n_val],
        "test": ordered[n_val : n_val + n_test],
        "training": ordered[n_val + n_test :],
    }
    return {key: sorted(value, key=lambda subject: subject["name"]) for key, value in sections.items()}


def _relative(path: str | os.PathLike, base_dir: str) -> str:
    """``path`` relative to ``base_dir`` with forward slashes (absolute where no relative path exists)."""
    absolute = os.path.abspath(path)
    try:
        return Path(os.path.relpath(absolute, base_dir)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(absolute).as_posix()


def _check_file(path: str | os.PathLike, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def build_datalist(
    data_dir: str | os.PathLike,
    output: str | os.PathLike,
    layout: str = "generic",
    image_glob: str | None = None,
    label_from: str | None = None,
    label_to: str | None = None,
    labels: bool = True,
    require_labels: bool = False,
    val: int | float = 0,
    test: int | float = 0,
    seed: int = 0,
    atlas: str | os.PathLike | None = None,
    atlas_label: str | os.PathLike | None = None,
    test_pairs: str | None = None,
) -> dict:
    """The datalist content (paths relative to ``output``'s folder), without writing it.

    Args:
        data_dir: folder of subjects.
        output: the datalist file the paths will be relative to.
        layout: ``generic``, ``neurite-oasis-3d`` or ``neurite-oasis-2d`` (defaults for the next three arguments).
        image_glob: pattern of the image files relative to ``data_dir`` (``**`` allowed).
        label_from, label_to: the label's file name is the image's with the last ``label_from`` replaced.
        labels: False writes no labels at all.
        require_labels: an image without its label file is an error (otherwise the subject has no label).
        val, test: counts (int) or fractions in [0, 1) of the subjects; training gets the rest (at least 1).
        seed: seed of the shuffle; the same files and seed give the same split.
        atlas, atlas_label: optional atlas image/label files (excluded from the subjects if the glob matches them).
        test_pairs: ``"ring"`` writes explicit test pairs, test subject i moving onto subject i + 1.
    """
    if test_pairs not in (None, "none", "ring"):
        raise ValueError(f"unknown test_pairs '{test_pairs}'; expected 'ring' or None")
    if atlas_label is not None and atlas is None:
        raise ValueError("an atlas label needs an atlas image (--atlas)")
    if atlas is not None:
        _check_file(atlas, "atlas image")
        if atlas_label is not None:
            _check_file(atlas_label, "atlas label")
    base_dir = os.path.dirname(os.path.abspath(output))
    exclude = tuple(path for path in (atlas, atlas_label) if path is not None)
    subjects = find_subjects(data_dir, layout, image_glob, label_from, label_to, labels, require_labels, exclude)
    sections = split_subjects(subjects, val, test, seed, where=os.path.abspath(data_dir))

    def entry(subject: dict) -> dict:
        item = {"image": _relative(subject["image"], base_dir)}
        if "label" in subject:
            item["label"] = _relative(subject["label"], base_dir)
        return item

    content: dict = {
        "description": (
            f"made by prepare_datalist.py from {os.path.abspath(data_dir)} "
            f"(layout {layout}, seed {seed}, {len(subjects)} subjects)"
        ),
    }
    for key in ("training", "validation", "test"):
        content[key] = [entry(subject) for subject in sections[key]]
    if atlas is not None:
        content["atlas"] = {"image": _relative(atlas, base_dir)}
        if atlas_label is not None:
            content["atlas"]["label"] = _relative(atlas_label, base_dir)
    if test_pairs == "ring":
        images = [item["image"] for item in content["test"]]
        if len(images) < 2:
            raise ValueError(f"--test-pairs ring needs at least 2 test subjects, the split has {len(images)}")
        # subject i moving onto subject i + 1 (the last onto the first): as many pairs as test subjects
        pairs = [{"fixed": images[(i + 1) % len(images)], "moving": images[i]} for i in range(len(images))]
        content["pairs"] = {"test": pairs}
    return content


def _write_json_atomic(content: dict, output: str | os.PathLike) -> None:
    with atomic_output(output, ".json") as temporary, open(temporary, "w") as stream:
        json.dump(content, stream, indent=1)
        stream.write("\n")


def write_datalist(data_dir: str | os.PathLike, output: str | os.PathLike | None = None, **options: Any) -> str:
    """Find the subjects of ``data_dir``, split them and write the datalist JSON atomically; return its path.

    ``output`` defaults to ``data_dir/datalist.json`` (an existing folder means ``folder/datalist.json``);
    ``options`` are those of ``build_datalist``.
    """
    if output is None:
        output = Path(data_dir) / "datalist.json"
    if os.path.isdir(output):
        output = Path(output) / "datalist.json"
    _write_json_atomic(build_datalist(data_dir, output, **options), output)
    return str(output)


def datalist_warnings(content: dict) -> list[str]:
    """Things a datalist allows but the bundle's default training (pair_mode pairwise) will trip over."""
    notes = []
    atlas = "atlas" in content
    if len(content.get("training", [])) < 2 and not atlas:
        notes.append("fewer than 2 training subjects: pair_mode pairwise needs 2 (or use an atlas, pair_mode atlas)")
    n_val = len(content.get("validation", []))
    if n_val == 0:
        notes.append("no validation subjects: training validates every val_interval epochs and needs some (--val)")
    elif n_val == 1 and not atlas:
        notes.append("1 validation subject: the default ring of validation pairs needs 2 (or an atlas)")
    subjects = [item for key in ("training", "validation", "test") for item in content.get(key, [])]
    with_label = sum("label" in item for item in subjects)
    if 0 < with_label < len(subjects):
        notes.append(f"only {with_label} of {len(subjects)} subjects have a label")
    return notes


def _amount(text: str) -> int | float:
    """Command-line count ("20") or fraction ("0.1")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (e.g. 20) or a fraction (e.g. 0.1), got '{text}'") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_datalist.py",
        description="Write a decathlon-style datalist JSON (training/validation/test, optional atlas and explicit "
        "test pairs) from a folder of subjects, for the bundle's --datalist override. Paths in the JSON are "
        "relative to the datalist's folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="layouts (image glob, label-from -> label-to):\n"
        + "\n".join(f"  {name:17s} {glob}, {src} -> {dst}" for name, (glob, src, dst) in LAYOUTS.items())
        + "\n\nexamples:\n"
        "  %(prog)s /data/neurite-oasis.v1.0 --layout neurite-oasis-3d --val 20 --test 50 "
        "-o /data/oasis/datalist.json\n"
        "  %(prog)s ../shared/data/oasis3d --val 0 --test 0 -o /tmp/oasis3d.json\n"
        "  %(prog)s scans/ --image-glob '*/t1.nii.gz' --label-from t1 --label-to seg --val 0.1 --test 0.1",
    )
    parser.add_argument("data_dir", help="folder of subjects")
    parser.add_argument("-o", "--output", help="datalist file to write (default: DATA_DIR/datalist.json)")
    parser.add_argument(
        "--layout", choices=sorted(LAYOUTS), default="generic", help="file-name preset (default: generic)"
    )
    parser.add_argument("--image-glob", help="image files relative to DATA_DIR, '**' allowed (overrides the layout)")
    parser.add_argument(
        "--label-from", "--label-suffix-from", dest="label_from",
        help="part of the image file name replaced (its last occurrence) to name the label (overrides the layout)",
    )  # fmt: skip
    parser.add_argument(
        "--label-to", "--label-suffix-to", dest="label_to",
        help="its replacement in the label's file name (overrides the layout)",
    )  # fmt: skip
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--require-labels", action="store_true", help="an image without its label file is an error")
    group.add_argument("--no-labels", action="store_true", help="write no labels")
    parser.add_argument("--val", type=_amount, default=0, help="validation subjects: count or fraction (default: 0)")
    parser.add_argument("--test", type=_amount, default=0, help="test subjects: count or fraction (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    parser.add_argument("--atlas", help="atlas image file (datalist key 'atlas', for pair_mode atlas)")
    parser.add_argument("--atlas-label", help="atlas label file")
    parser.add_argument(
        "--test-pairs", choices=["none", "ring"], default="none",
        help="ring: explicit test pairs, test subject i moving onto subject i+1 (default: none)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        output = write_datalist(
            args.data_dir,
            args.output,
            layout=args.layout,
            image_glob=args.image_glob,
            label_from=args.label_from,
            label_to=args.label_to,
            labels=not args.no_labels,
            require_labels=args.require_labels,
            val=args.val,
            test=args.test,
            seed=args.seed,
            atlas=args.atlas,
            atlas_label=args.atlas_label,
            test_pairs=args.test_pairs,
        )
    except (OSError, ValueError, TypeError) as error:
        print(f"prepare_datalist.py: error: {error}", file=sys.stderr)
        return 1
    with open(output) as stream:
        content = json.load(stream)
    counts = ", ".join(f"{len(content[key])} {key}" for key in ("training", "validation", "test"))
    extras = []
    if "atlas" in content:
        extras.append("atlas")
    if "pairs" in content:
        extras.append(f"{len(content['pairs']['test'])} explicit test pairs")
    print(f"wrote {output}: {counts}" + (f" ({', '.join(extras)})" if extras else ""))
    for note in datalist_warnings(content):
        print(f"warning: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
