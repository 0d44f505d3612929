"""bundle/scripts/prepare_datalist.py: layouts, deterministic split, relative paths, atlas, pairs, errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE, REPO, SHARED_DATA, requires_shared_data
from scripts.datalist import load_atlas, load_pairs, load_section
from scripts.pairs import pair_indices_from_paths
from scripts.prepare_datalist import build_datalist, split_subjects, write_datalist

SCRIPT = BUNDLE / "scripts" / "prepare_datalist.py"
SECTIONS = ("training", "validation", "test")


def _nifti(path: Path, shape: tuple[int, ...], label: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.arange(np.prod(shape)).reshape(shape) % 3).astype(np.int16 if label else np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _neurite_oasis(root: Path, count: int = 10, two_d: bool = False, unlabeled: tuple[int, ...] = ()) -> list[str]:
    """A fake neurite-oasis release: OASIS_OAS1_XXXX_MR1/{aligned_norm,aligned_seg35} (or the 2D slice files)."""
    image_name, label_name, shape = (
        ("slice_norm.nii.gz", "slice_seg24.nii.gz", (8, 8, 1)) if two_d else
        ("aligned_norm.nii.gz", "aligned_seg35.nii.gz", (8, 8, 8))
    )  # fmt: skip
    names = []
    for number in range(1, count + 1):
        subject = root / f"OASIS_OAS1_{number:04d}_MR1"
        _nifti(subject / image_name, shape)
        if number not in unlabeled:
            _nifti(subject / label_name, shape, label=True)
        # other files of the release that must not become subjects
        _nifti(subject / ("slice_orig.nii.gz" if two_d else "aligned_orig.nii.gz"), shape)
        names.append(subject.name)
    (root / "subjects.txt").write_text("\n".join(names) + "\n")
    (root / "OASIS_OAS1_0001_MR1" / f"._{image_name}").write_bytes(b"macOS resource fork")
    return names


def _subject_names(content: dict, section: str) -> list[str]:
    return [Path(entry["image"]).parent.name for entry in content[section]]


def test_neurite_oasis_3d_split_sizes_relative_paths_and_read_back(tmp_path):
    names = _neurite_oasis(tmp_path / "neurite-oasis.v1.0")
    output = write_datalist(
        tmp_path / "neurite-oasis.v1.0", tmp_path / "lists" / "oasis.json", layout="neurite-oasis-3d", val=2, test=3
    )
    content = json.loads(Path(output).read_text())
    assert [len(content[key]) for key in SECTIONS] == [5, 2, 3]
    seen = [name for key in SECTIONS for name in _subject_names(content, key)]
    assert sorted(seen) == names  # every subject exactly once, the hidden "._" file and *_orig files ignored
    for key in SECTIONS:
        assert _subject_names(content, key) == sorted(_subject_names(content, key))
        for entry in content[key]:
            assert not os.path.isabs(entry["image"]) and entry["image"].startswith("../neurite-oasis.v1.0/")
            assert entry["image"].endswith("/aligned_norm.nii.gz") and entry["label"].endswith("/aligned_seg35.nii.gz")
        entries = load_section(output, key)
        assert [Path(entry["label"]).parent.name for entry in entries] == _subject_names(content, key)
    assert "atlas" not in content and "pairs" not in content
    assert not [path for path in (tmp_path / "lists").iterdir() if path.name != "oasis.json"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert Path(output).stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600


def test_neurite_oasis_2d_layout_and_default_output(tmp_path):
    _neurite_oasis(tmp_path / "oasis2d", count=4, two_d=True)
    output = write_datalist(tmp_path / "oasis2d", layout="neurite-oasis-2d", val=1, test=1)
    assert Path(output) == tmp_path / "oasis2d" / "datalist.json"
    content = json.loads(Path(output).read_text())
    assert content["training"][0]["image"].startswith("OASIS_OAS1_")  # relative to the data folder itself
    assert all(entry["label"].endswith("/slice_seg24.nii.gz") for key in SECTIONS for entry in content[key])
    assert len(load_section(output, "training")) == 2


def test_split_is_deterministic_per_seed_and_independent_of_listing_order(tmp_path):
    _neurite_oasis(tmp_path / "data", count=12)
    kwargs = dict(layout="neurite-oasis-3d", val=3, test=3)
    first = build_datalist(tmp_path / "data", tmp_path / "a.json", seed=7, **kwargs)
    again = build_datalist(tmp_path / "data", tmp_path / "a.json", seed=7, **kwargs)
    other = build_datalist(tmp_path / "data", tmp_path / "a.json", seed=8, **kwargs)
    assert first == again
    assert _subject_names(first, "test") != _subject_names(other, "test")
    subjects = [{"name": f"s{i:02d}", "image": f"/x/s{i:02d}.nii.gz"} for i in range(9)]
    forward = split_subjects(subjects, val=2, test=2, seed=3)
    backward = split_subjects(subjects[::-1], val=2, test=2, seed=3)
    assert forward == backward


def test_fractions_round_half_up_with_at_least_one(tmp_path):
    subjects = [{"name": f"s{i:02d}", "image": f"/x/s{i:02d}.nii.gz"} for i in range(10)]
    sections = split_subjects(subjects, val=0.2, test=0.15)
    assert [len(sections[key]) for key in SECTIONS] == [6, 2, 2]
    sections = split_subjects(subjects, val=0.01, test=0.0)
    assert [len(sections[key]) for key in SECTIONS] == [9, 1, 0]
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_subjects(subjects, val=1.5)


def test_labels_optional_required_or_off(tmp_path):
    _neurite_oasis(tmp_path / "data", count=4, unlabeled=(2,))
    content = build_datalist(tmp_path / "data", tmp_path / "d.json", layout="neurite-oasis-3d")
    by_name = {Path(entry["image"]).parent.name: entry for entry in content["training"]}
    assert "label" not in by_name["OASIS_OAS1_0002_MR1"] and "label" in by_name["OASIS_OAS1_0001_MR1"]
    missing = tmp_path / "data" / "OASIS_OAS1_0002_MR1" / "aligned_seg35.nii.gz"
    with pytest.raises(FileNotFoundError, match="label not found") as error:
        build_datalist(tmp_path / "data", tmp_path / "d.json", layout="neurite-oasis-3d", require_labels=True)
    assert str(missing) in str(error.value)
    content = build_datalist(tmp_path / "data", tmp_path / "d.json", layout="neurite-oasis-3d", labels=False)
    assert all("label" not in entry for entry in content["training"])


def test_generic_layout_with_broad_glob_excludes_labels_and_atlas(tmp_path):
    data = tmp_path / "flat"
    for name in ("a", "b", "c"):
        _nifti(data / f"subject_{name}_t1.nii.gz", (8, 8, 8))
        _nifti(data / f"subject_{name}_seg.nii.gz", (8, 8, 8), label=True)
    _nifti(data / "atlas_t1.nii.gz", (8, 8, 8))
    _nifti(data / "atlas_seg.nii.gz", (8, 8, 8), label=True)
    content = build_datalist(
        data, data / "datalist.json", image_glob="*.nii.gz", label_from="_t1", label_to="_seg",
        atlas=data / "atlas_t1.nii.gz", atlas_label=data / "atlas_seg.nii.gz",
    )  # fmt: skip
    assert [entry["image"] for entry in content["training"]] == [f"subject_{n}_t1.nii.gz" for n in "abc"]
    assert [entry["label"] for entry in content["training"]] == [f"subject_{n}_seg.nii.gz" for n in "abc"]
    assert content["atlas"] == {"image": "atlas_t1.nii.gz", "label": "atlas_seg.nii.gz"}


def test_atlas_and_ring_test_pairs_read_back(tmp_path):
    _neurite_oasis(tmp_path / "data", count=8)
    atlas_dir = tmp_path / "atlas"
    _nifti(atlas_dir / "atlas_norm.nii.gz", (8, 8, 8))
    _nifti(atlas_dir / "atlas_seg35.nii.gz", (8, 8, 8), label=True)
    output = write_datalist(
        tmp_path / "data", tmp_path / "out" / "nested" / "datalist.json", layout="neurite-oasis-3d",
        val=2, test=3, atlas=atlas_dir / "atlas_norm.nii.gz", atlas_label=atlas_dir / "atlas_seg35.nii.gz",
        test_pairs="ring",
    )  # fmt: skip
    content = json.loads(Path(output).read_text())
    assert content["atlas"] == {"image": "../../atlas/atlas_norm.nii.gz", "label": "../../atlas/atlas_seg35.nii.gz"}
    atlas = load_atlas(output)
    assert Path(atlas["image"]).resolve() == (atlas_dir / "atlas_norm.nii.gz").resolve()
    images = [entry["image"] for entry in content["test"]]
    assert content["pairs"]["test"] == [{"fixed": images[(i + 1) % 3], "moving": images[i]} for i in range(3)]
    entries = load_section(output, "test")
    indices = pair_indices_from_paths([entry["image"] for entry in entries], load_pairs(output, "test"))
    assert indices == [(1, 0), (2, 1), (0, 2)]  # (fixed, moving): subject i moving onto subject i + 1


def test_errors_name_the_folder_or_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="data folder not found") as error:
        write_datalist(missing, tmp_path / "d.json")
    assert str(missing) in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images match '\*/aligned_norm.nii.gz'") as error:
        write_datalist(tmp_path / "empty", tmp_path / "d.json", layout="neurite-oasis-3d")
    assert str(tmp_path / "empty") in str(error.value)
    _neurite_oasis(tmp_path / "data", count=3)
    with pytest.raises(ValueError, match=r"3 subject\(s\) found, but the split needs 2 validation \+ 1 test") as error:
        write_datalist(tmp_path / "data", tmp_path / "d.json", layout="neurite-oasis-3d", val=2, test=1)
    assert str(tmp_path / "data") in str(error.value)
    with pytest.raises(FileNotFoundError, match="atlas image not found") as error:
        write_datalist(tmp_path / "data", tmp_path / "d.json", layout="neurite-oasis-3d", atlas=tmp_path / "atl.nii")
    assert str(tmp_path / "atl.nii") in str(error.value)
    with pytest.raises(ValueError, match="ring needs at least 2 test subjects"):
        write_datalist(tmp_path / "data", tmp_path / "d.json", layout="neurite-oasis-3d", test=1, test_pairs="ring")
    assert not (tmp_path / "d.json").exists()  # nothing written by a failed call


def test_failed_write_keeps_the_old_datalist(tmp_path, monkeypatch):
    _neurite_oasis(tmp_path / "data", count=3)
    output = tmp_path / "d.json"
    output.write_text('{"old": true}')

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("scripts.prepare_datalist.json.dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_datalist(tmp_path / "data", output, layout="neurite-oasis-3d")
    assert json.loads(output.read_text()) == {"old": True}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d.json", "data"]


def test_command_line(tmp_path):
    _neurite_oasis(tmp_path / "data", count=5, two_d=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = [sys.executable, str(SCRIPT)]
    shown = subprocess.run(run + ["--help"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0 and "--test-pairs" in shown.stdout and "neurite-oasis-2d" in shown.stdout
    output = tmp_path / "lists" / "datalist.json"
    arguments = ["--layout", "neurite-oasis-2d", "--val", "2", "--test", "0.4", "--seed", "1", "--test-pairs", "ring"]
    done = subprocess.run(
        run + [str(tmp_path / "data"), "-o", str(output)] + arguments,
        cwd=REPO, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {output}: 1 training, 2 validation, 2 test" in done.stdout
    assert "fewer than 2 training subjects" in done.stderr  # a warning, not an error
    content = json.loads(output.read_text())
    assert content == build_datalist(
        tmp_path / "data", output, layout="neurite-oasis-2d", val=2, test=0.4, seed=1, test_pairs="ring"
    )
    failed = subprocess.run(
        run + [str(tmp_path / "data"), "-o", str(output), "--layout", "neurite-oasis-3d"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert failed.returncode == 1 and "no images match" in failed.stderr and str(tmp_path / "data") in failed.stderr


@requires_shared_data
def test_real_oasis3d_generic_layout_reads_back(tmp_path):
    data = SHARED_DATA / "oasis3d"
    output = write_datalist(
        data, tmp_path / "datalist.json", image_glob="*_image.nii.gz", label_from="_image", label_to="_label",
        val=0, test=0, require_labels=True,
    )  # fmt: skip
    content = json.loads(Path(output).read_text())
    assert [Path(entry["image"]).name for entry in content["training"]] == [
        "subject_a_image.nii.gz",
        "subject_b_image.nii.gz",
    ]
    assert all(not os.path.isabs(entry["image"]) for entry in content["training"])
    entries = load_section(output, "training")
    assert [Path(entry["label"]).name for entry in entries] == ["subject_a_label.nii.gz", "subject_b_label.nii.gz"]
    assert Path(entries[0]["image"]).resolve() == (data / "subject_a_image.nii.gz").resolve()
