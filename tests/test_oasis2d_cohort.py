"""The real 2D cohort's split (bundle/datalists/oasis2d_train.json, read by configs/oasis2d.yaml): reproducible from
its command, no subject in two sections, nothing from the test subjects' folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLE, CONFIGS, REPO, SHARED_DATA

DATALIST = BUNDLE / "datalists" / "oasis2d_train.json"
COHORT = SHARED_DATA / "oasis2d_train"


def _subjects(section: list[dict]) -> list[str]:
    return [os.path.basename(entry["image"]).split("_image")[0] for entry in section]


def test_split_has_disjoint_sections_and_no_test_subject():
    content = json.loads(DATALIST.read_text())
    sections = {name: _subjects(content[name]) for name in ("training", "validation", "test")}
    assert [len(sections[n]) for n in ("training", "validation", "test")] == [365, 20, 20]
    everyone = sum(sections.values(), [])
    assert len(set(everyone)) == 405, "a subject is in two sections"
    for section in ("training", "validation", "test"):
        for entry in content[section]:
            for key in ("image", "label"):
                path = Path(entry[key])
                assert path.parts[-2] == "oasis2d_train", f"{path} is not a training-cohort file"
                assert not {"oasis2d", "oasis3d"} & set(path.parts), f"{path} points into a test subjects' folder"
    assert len(content["pairs"]["test"]) == 20  # the cohort-test ring


@pytest.mark.skipif(not COHORT.is_dir(), reason=f"the real 2D cohort is not at {COHORT}")
def test_split_is_what_its_command_writes(tmp_path):
    """The command in configs/oasis2d.yaml regenerates the committed datalist (the split is reproducible), and every
    file it names exists."""
    written = tmp_path / "datalists" / "oasis2d_train.json"
    written.parent.mkdir()
    command = [sys.executable, str(BUNDLE / "scripts" / "prepare_datalist.py"), str(COHORT), "--require-labels"]
    command += ["--val", "20", "--test", "20", "--seed", "0", "--test-pairs", "ring", "-o", str(written)]
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    assert (
        "prepare_datalist.py ../shared/data/oasis2d_train --require-labels --val 20 --test 20"
        in (CONFIGS / "oasis2d.yaml").read_text()
    )
    ours, theirs = json.loads(DATALIST.read_text()), json.loads(written.read_text())
    for section in ("training", "validation", "test"):
        assert _subjects(ours[section]) == _subjects(theirs[section]), section
        for entry in ours[section]:
            assert (DATALIST.parent / entry["image"]).resolve().is_file()
            assert (DATALIST.parent / entry["label"]).resolve().is_file()


def test_benchmark_pairs_are_the_cohort_test_ring():
    """benchmarks/oasis2d_cohort_test_pairs.json (the model card's cohort figures) holds the datalist's test pairs,
    with their labels, and nothing else."""
    content = json.loads(DATALIST.read_text())
    pairs = json.loads((REPO / "benchmarks" / "oasis2d_cohort_test_pairs.json").read_text())["pairs"]

    def name(path: str) -> str:
        return os.path.basename(path).split("_")[1]

    expected = [(name(p["fixed"]), name(p["moving"])) for p in content["pairs"]["test"]]
    assert [(name(p["fixed"]), name(p["moving"])) for p in pairs] == expected
    assert all(name(p["fixed_label"]) == name(p["fixed"]) and "_label" in p["fixed_label"] for p in pairs)
    assert {n for pair in expected for n in pair} == {name(e["image"]) for e in content["test"]}
