"""The validation protocol's pairs as a ``batch_inference`` pairs.csv: v ↔ w and the known-warp cases of v and w.

    python benchmarks/validation_pairs.py OUTPUT_DIR [--data ../shared/data/oasis3d_train] [--magnitudes 4,8,12]
        [--seed 0]

Writes the warp cases (``warp_cases.make_warp_case``, as ``oasis_benchmark.py --case warp`` makes them) and
``OUTPUT_DIR/pairs.csv`` (absolute paths), so that a refinement setting is scored on all of them in one process:

    python -m monai.bundle run batch_inference \\
        --config_file "['bundle/configs/inference.yaml','bundle/configs/batch_inference.yaml']" \\
        --pairs OUTPUT_DIR/pairs.csv --outputs metrics --eval_label_ids ../shared/data/oasis3d/eval_labels.json \\
        --output_dir O [overrides]

Only the labelled *training* subjects are used (never a test subject). ``--cohort2d`` writes instead the 2D
model's validation pairs: the ring (subject i onto subject i + 1) of the 20 validation subjects of
``bundle/datalists/oasis2d_train.json``, as ``OUTPUT_DIR/pairs2d.csv``. ``--slices2d`` writes 2D pairs nearer the
``oasis2d/`` test slices (slice 100 of the third axis, another processing than the cohort's slice 109): slices
``SLICE_POSITIONS`` of the third axis of v and w (``oasis3d_train``), v -> w and w -> v at each, as
``OUTPUT_DIR/pairs_slices2d.csv``. ``--misaligned`` writes instead v and w each moved by the seeded world affines of
``misaligned_cases.py`` (seeds ``--misaligned_seeds``, another grid each) onto the other subject, as
``OUTPUT_DIR/pairs_misaligned.csv``: the affine stage's validation pairs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from misaligned_cases import make_case  # noqa: E402
from warp_cases import MAGNITUDES, make_warp_case, warp_case_name  # noqa: E402

COHORT2D_DATALIST = Path(__file__).resolve().parents[1] / "bundle" / "datalists" / "oasis2d_train.json"
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "oasis3d_train")
SUBJECTS = ("subject_v", "subject_w")
SLICE_POSITIONS = (90, 95, 100, 105, 110)  # the oasis2d/ test slices are 100


def write_validation_pairs(output_dir: str, data: str, magnitudes, seed: int) -> str:
    """Write the cases and ``pairs.csv``; returns the csv's path."""
    paths = _subject_files(data)
    (v_image, v_label), (w_image, w_label) = paths[SUBJECTS[0]], paths[SUBJECTS[1]]
    rows = [(w_image, v_image, w_label, v_label, "v_to_w"), (v_image, w_image, v_label, w_label, "w_to_v")]
    for subject, (image, label) in paths.items():
        for magnitude in magnitudes:
            name = warp_case_name(subject, magnitude, seed)
            folder = os.path.join(output_dir, subject)
            moved_image, moved_label = make_warp_case(image, label, folder, magnitude, seed, name)
            rows.append((image, os.path.abspath(moved_image), label, os.path.abspath(moved_label), name))
    csv_path = os.path.join(output_dir, "pairs.csv")
    return _write_pairs_csv(csv_path, rows)


def _write_pairs_csv(csv_path: str, rows) -> str:
    """``rows`` of (fixed_image, moving_image, fixed_label, moving_label, pair_id) as a ``batch_inference`` pairs.csv,
    the four paths made absolute; returns ``csv_path``."""
    with open(csv_path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["fixed_image", "moving_image", "fixed_label", "moving_label", "pair_id"])
        writer.writerows([[os.path.abspath(p) for p in row[:4]] + [row[4]] for row in rows])
    return csv_path


def _subject_files(data: str) -> dict[str, tuple[str, str]]:
    """The (image, label) paths of v and w in ``data``; a missing file is an error naming it."""
    paths = {s: (os.path.join(data, f"{s}_image.nii.gz"), os.path.join(data, f"{s}_label.nii.gz")) for s in SUBJECTS}
    for image, label in paths.values():
        for path in (image, label):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"validation subject file not found: {path}")
    return paths


def write_misaligned_pairs(output_dir: str, data: str, seeds) -> str:
    """v moved (each seed) onto w and w moved onto v, as ``pairs_misaligned.csv`` (absolute paths); returns its path.
    A seed's case is the one ``misaligned_cases.py --seed SEED`` writes (the geometry depends on the seed alone)."""
    paths = _subject_files(data)
    rows = []
    for seed in seeds:
        for moving, fixed in (SUBJECTS, SUBJECTS[::-1]):
            name = f"{moving}_moved_seed{seed}"
            case = make_case(*paths[moving], os.path.join(output_dir, "misaligned"), int(seed), name=name)
            pair_id = f"{moving[-1]}_moved{seed}_to_{fixed[-1]}"
            rows.append([paths[fixed][0], case.image, paths[fixed][1], case.label, pair_id])
    csv_path = os.path.join(output_dir, "pairs_misaligned.csv")
    return _write_pairs_csv(csv_path, rows)


def write_cohort2d_validation_pairs(output_dir: str, datalist: Path = COHORT2D_DATALIST) -> str:
    """The ring of the datalist's validation subjects as ``pairs2d.csv`` (absolute paths); returns its path."""
    subjects = json.loads(Path(datalist).read_text())["validation"]
    resolve = lambda p: str((Path(datalist).parent / p).resolve())  # noqa: E731
    stem = lambda p: Path(p).name.split("_image")[0]  # noqa: E731
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for i, moving in enumerate(subjects):
        fixed = subjects[(i + 1) % len(subjects)]
        # fixed_image, moving_image, fixed_label, moving_label
        paths = [resolve(side[key]) for key in ("image", "label") for side in (fixed, moving)]
        rows.append(paths + [f"{stem(moving['image'])}_to_{stem(fixed['image'])}"])
    return _write_pairs_csv(os.path.join(output_dir, "pairs2d.csv"), rows)


def write_slice_pairs(output_dir: str, data: str, positions=SLICE_POSITIONS) -> str:
    """Axial slices ``positions`` (third axis) of v and w, image and label, as 2D NIfTI files ``(X, Y, 1)`` with the
    volume's affine moved to the slice (as the ``oasis2d/`` files are), and both directions at each position as
    ``pairs_slices2d.csv``; returns its path."""
    import nibabel as nib
    import numpy as np

    rows = []
    for position in positions:
        files = {}
        for subject in SUBJECTS:
            for kind in ("image", "label"):
                source = os.path.join(data, f"{subject}_{kind}.nii.gz")
                if not os.path.isfile(source):
                    raise FileNotFoundError(f"validation subject file not found: {source}")
                volume = nib.load(source)
                if not 0 <= position < volume.shape[2]:
                    raise ValueError(f"slice {position} is outside {source} ({volume.shape[2]} slices)")
                array = np.asarray(volume.dataobj[:, :, position : position + 1])
                affine = volume.affine.copy()
                affine[:3, 3] = volume.affine[:3, :3] @ np.array([0.0, 0.0, position]) + volume.affine[:3, 3]
                path = os.path.join(output_dir, "slices2d", f"{subject}_slice{position}_{kind}.nii.gz")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                nib.save(nib.Nifti1Image(array, affine, volume.header), path)
                files[subject, kind] = os.path.abspath(path)
        v, w = SUBJECTS
        for fixed, moving in ((w, v), (v, w)):
            name = f"{moving[-1]}_to_{fixed[-1]}_slice{position}"
            rows.append([files[fixed, "image"], files[moving, "image"], files[fixed, "label"], files[moving, "label"]])
            rows[-1].append(name)
    return _write_pairs_csv(os.path.join(output_dir, "pairs_slices2d.csv"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--magnitudes", default=",".join(f"{m:g}" for m in MAGNITUDES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cohort2d", action="store_true", help="the 2D cohort's validation ring instead")
    parser.add_argument("--slices2d", action="store_true", help="2D slices of v and w near the test slices instead")
    parser.add_argument("--misaligned", action="store_true", help="v and w moved by seeded affines, onto each other")
    parser.add_argument("--misaligned_seeds", default="0,1,2")
    args = parser.parse_args()
    if args.cohort2d:
        print(write_cohort2d_validation_pairs(args.output_dir))
        return
    if args.slices2d:
        print(write_slice_pairs(args.output_dir, args.data))
        return
    if args.misaligned:
        print(write_misaligned_pairs(args.output_dir, args.data, [int(v) for v in args.misaligned_seeds.split(",")]))
        return
    magnitudes = [float(v) for v in args.magnitudes.split(",") if v.strip()]
    print(write_validation_pairs(args.output_dir, args.data, magnitudes, args.seed))


if __name__ == "__main__":
    main()
