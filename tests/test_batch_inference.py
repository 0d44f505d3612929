"""batch_inference: a cohort in one command (pairs.csv or an atlas with a glob), --outputs, a bad pair recorded while
the others go on, resume after kill -9, a malformed pairs.csv refused before anything runs, two torchrun ranks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import CONFIGS, REPO, bundle_command, check_ok, run_bundle

from scripts.batch import CohortPlan, cohort_spatial_dims, parse_outputs
from scripts.cohort import atlas_pairs, read_pairs_csv

BATCH_CONFIGS = [str(CONFIGS / "inference.yaml"), str(CONFIGS / "batch_inference.yaml")]


def _subject(folder: Path, name: str, seed: int) -> tuple[str, str]:
    """A 2D 'brain' (two blobs of different brightness in an ellipse) and its label map, shifted by the seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:64, :72].astype(np.float32)
    dy, dx = rng.uniform(-3, 3, size=2)
    brain = ((y - 32 - dy) / 26) ** 2 + ((x - 36 - dx) / 30) ** 2 < 1
    inner = ((y - 28 - dy) / 9) ** 2 + ((x - 30 - dx) / 11) ** 2 < 1
    image = 0.4 * brain + 0.5 * inner + 0.02 * rng.standard_normal(brain.shape)
    label = (brain.astype(np.int16) + inner.astype(np.int16))[..., None]
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    image_path, label_path = folder / f"{name}_image.nii.gz", folder / f"{name}_label.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32)[..., None], affine), image_path)
    nib.save(nib.Nifti1Image(label, affine), label_path)
    return str(image_path), str(label_path)


def _write_pairs(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _ring(subjects: list[tuple[str, str]], count: int) -> list[dict]:
    rows = []
    for i in range(count):
        (fixed, fixed_label), (moving, moving_label) = subjects[i % len(subjects)], subjects[(i + 1) % len(subjects)]
        rows.append(
            {"fixed_image": fixed, "moving_image": moving, "fixed_label": fixed_label, "moving_label": moving_label}
        )
    return rows


def _summary(out: Path) -> list[dict]:
    with open(out / "summary.csv") as stream:
        return list(csv.DictReader(stream))


def _last_line(process: subprocess.CompletedProcess) -> str:
    return (process.stdout + process.stderr).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[tuple[str, str]]:
    folder = tmp_path_factory.mktemp("cohort")
    return [_subject(folder, f"s{i}", seed=i) for i in range(6)]


# ---- the pair list, checked before anything runs ----


def test_pairs_csv_errors_name_the_row(tmp_path, cohort):
    (a, a_label), (b, b_label) = cohort[:2]
    good = {"fixed_image": a, "moving_image": b}
    cases = {
        "lacks the column(s) ['moving_image']": [{"fixed_image": a}],
        "unknown column(s) ['moving_labels']": [{**good, "moving_labels": b_label}],
        "row 3: moving_image file not found": [good, {"fixed_image": a, "moving_image": str(tmp_path / "no.nii.gz")}],
        "row 3: pair id 's1_image_to_s0_image' repeats": [good, good],
        "row 2: the moving_image cell is empty": [{"fixed_image": a, "moving_image": ""}],
        "row 2: pair_id '../x' is not a folder name": [{**good, "pair_id": "../x"}],
    }
    for number, (message, rows) in enumerate(cases.items()):
        path = _write_pairs(tmp_path / f"pairs{number}.csv", rows)
        with pytest.raises((ValueError, FileNotFoundError), match=None) as error:
            read_pairs_csv(str(path))
        assert message in str(error.value), (message, str(error.value))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text(f"fixed_image,moving_image\n{a},{b}\n{a},{b},{a}\n")
    with pytest.raises(ValueError, match="row 3: the row has a different number of cells"):
        read_pairs_csv(str(ragged))
    # relative paths are relative to the CSV's folder; an empty label cell is no label; ids derive from file names
    (tmp_path / "rel").mkdir()
    relative = _write_pairs(
        tmp_path / "rel" / "pairs.csv",
        [{"fixed_image": os.path.relpath(a, tmp_path / "rel"), "moving_image": b, "moving_label": ""}],
    )
    (pair,) = read_pairs_csv(str(relative))
    assert pair.fixed_image == os.path.abspath(a) and pair.moving_label is None
    assert pair.pair_id == "s1_image_to_s0_image"


def test_atlas_pairs_from_a_glob_in_both_directions(cohort):
    atlas, atlas_label = cohort[0]
    pattern = os.path.join(os.path.dirname(atlas), "*_image.nii.gz")
    onto_images = atlas_pairs(atlas, pattern, atlas_label)
    assert len(onto_images) == 5  # the atlas itself is not registered onto itself
    assert all(p.moving_image == atlas and p.moving_label == atlas_label for p in onto_images)
    assert onto_images[0].pair_id == "s0_image_to_s1_image"
    onto_atlas = atlas_pairs(atlas, pattern, atlas_label, direction="to_atlas")
    assert all(p.fixed_image == atlas and p.fixed_label == atlas_label and p.moving_label is None for p in onto_atlas)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        atlas_pairs(atlas, pattern + ".missing")
    with pytest.raises(ValueError, match="--atlas_direction must be one of"):
        atlas_pairs(atlas, pattern, direction="sideways")


def test_outputs_are_checked_and_overwrite_redoes_done_pairs(tmp_path, cohort):
    assert parse_outputs("warped_label,metrics") == ["warped_label", "metrics"]
    assert parse_outputs(("warped_label", "metrics")) == ["warped_label", "metrics"]  # as the command line parses it
    assert "inverse_ddf" not in parse_outputs("all")
    with pytest.raises(ValueError, match="unknown output"):
        parse_outputs("warped_labels")
    pairs = read_pairs_csv(str(_write_pairs(tmp_path / "pairs.csv", _ring(cohort, 2))))
    plan = CohortPlan(pairs, str(tmp_path / "out"), "warped_label,metrics")
    folder = Path(plan.folder(pairs[0]))
    folder.mkdir(parents=True)
    (folder / "warped_label.nii.gz").write_bytes(b"x")
    (folder / "metrics.json").write_text("{}")
    plan.record(pairs[0], {"status": "ok", "outputs": ["warped_label", "metrics"]})
    assert CohortPlan(pairs, str(tmp_path / "out"), "warped_label,metrics").pending == [pairs[1]]
    assert len(CohortPlan(pairs, str(tmp_path / "out"), "warped_label,metrics", overwrite=True).pending) == 2
    # more outputs than the earlier run wrote, or another input file under the same id: not done
    assert len(CohortPlan(pairs, str(tmp_path / "out"), "warped_label,metrics,overview").pending) == 2
    (folder / "warped_label.nii.gz").unlink()
    assert len(CohortPlan(pairs, str(tmp_path / "out"), "warped_label,metrics").pending) == 2


def test_dimensionality_comes_from_the_first_readable_fixed_image(tmp_path, cohort):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a NIfTI file at all")
    rows = _ring(cohort, 2)
    rows[0]["fixed_image"] = str(garbage)
    pairs = read_pairs_csv(str(_write_pairs(tmp_path / "pairs.csv", rows)))
    assert cohort_spatial_dims(pairs) == 2
    with pytest.raises(ValueError, match="no fixed image of the cohort has a readable header"):
        cohort_spatial_dims(pairs[:1])


# ---- the command ----


def test_cohort_with_a_bad_pair_in_the_middle_then_rerun(tmp_path, cohort):
    """4 pairs, the second one's moving image truncated: the other three register with the single command's Dice,
    the bad one is recorded with the file named, the exit code says how many failed; after the file is fixed, a rerun
    registers that pair only and leaves the others' folders as they were."""
    subjects = list(cohort[:4])
    broken = tmp_path / "broken_image.nii.gz"
    good_bytes = Path(subjects[2][0]).read_bytes()
    broken.write_bytes(good_bytes[: len(good_bytes) // 2])  # a readable header, data cut short
    rows = _ring(subjects, 4)
    rows[1]["moving_image"] = str(broken)
    pairs_csv = _write_pairs(tmp_path / "pairs.csv", rows)
    out = tmp_path / "O"
    overrides = {"pairs": pairs_csv, "output_dir": out, "outputs": "warped_label,metrics"}
    process = run_bundle("batch_inference", BATCH_CONFIGS, overrides)
    assert process.returncode != 0
    assert _last_line(process).endswith(f"1 of 4 pairs failed: see {out / 'summary.csv'}"), _last_line(process)
    summary = _summary(out)
    assert [row["status"] for row in summary] == ["ok", "failed", "ok", "ok"]
    assert str(broken) in summary[1]["error"], summary[1]["error"]  # the bundle's own message, naming the file
    assert not (out / summary[1]["pair_id"]).exists()  # no partial outputs of the failed pair
    for row in summary[0:1] + summary[2:]:
        assert sorted(os.listdir(out / row["pair_id"])) == ["metrics.json", "warped_label.nii.gz"]
        assert 0.0 < float(row["mean_dice"]) <= 1.0 and row["folding_fraction"] != ""
    totals = json.loads((out / "summary.json").read_text())
    assert (totals["pairs"], totals["ok"], totals["failed"]) == (4, 3, 1)
    # the registration is the single command's
    first = rows[0]
    single = tmp_path / "single"
    check_ok(run_bundle("inference", [str(CONFIGS / "inference.yaml")], {**first, "output_dir": single}))
    single_dice = json.loads((single / "metrics.json").read_text())["registered_mean_dice"]
    batch_metrics = json.loads((out / summary[0]["pair_id"] / "metrics.json").read_text())
    assert batch_metrics["registered_mean_dice"] == pytest.approx(single_dice, abs=1e-6)
    assert float(summary[0]["mean_dice"]) == pytest.approx(single_dice, abs=1e-6)

    # fix the file, rerun: only the failed pair registers, the others' outputs stay as they were
    broken.write_bytes(good_bytes)
    stamps = {row["pair_id"]: (out / row["pair_id"] / "metrics.json").stat().st_mtime_ns for row in summary[2:]}
    output = check_ok(run_bundle("batch_inference", BATCH_CONFIGS, overrides))
    assert "4 pairs, 1 to register, 3 already done" in output
    assert [row["status"] for row in _summary(out)] == ["ok"] * 4
    assert stamps == {k: (out / k / "metrics.json").stat().st_mtime_ns for k in stamps}


def test_malformed_pairs_csv_is_refused_before_anything_runs(tmp_path, cohort):
    rows = _ring(cohort, 3)
    rows[2]["pair_id"], rows[1]["pair_id"] = "same", "same"
    rows[0]["pair_id"] = "first"
    out = tmp_path / "O"
    process = run_bundle(
        "batch_inference", BATCH_CONFIGS, {"pairs": _write_pairs(tmp_path / "p.csv", rows), "output_dir": out}
    )
    assert process.returncode != 0
    assert "row 4: pair id 'same' repeats" in _last_line(process), _last_line(process)
    assert not out.exists()


def test_resume_after_kill_minus_nine(tmp_path, cohort):
    """Kill the run (and its loader workers) with SIGKILL once two pairs are done; the same command finishes the rest
    and the summary covers every pair."""
    rows = _ring(cohort, 12)
    for number, row in enumerate(rows):
        row["pair_id"] = f"pair{number:02d}"
    pairs_csv = _write_pairs(tmp_path / "pairs.csv", rows)
    out = tmp_path / "O"
    overrides = {"pairs": pairs_csv, "output_dir": out, "outputs": "warped_label,metrics,overview"}
    command, env = bundle_command("batch_inference", BATCH_CONFIGS, overrides)
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    rows_dir = out / ".batch"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if rows_dir.is_dir() and len(list(rows_dir.glob("pair*.json"))) >= 2:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = len(list(rows_dir.glob("pair*.json")))
    assert 2 <= done_at_kill < 12, f"{done_at_kill} of 12 pairs were done when the run was killed"
    assert not (out / "summary.csv").exists()
    output = check_ok(run_bundle("batch_inference", BATCH_CONFIGS, overrides))
    assert f"12 pairs, {12 - done_at_kill} to register, {done_at_kill} already done" in output
    summary = _summary(out)
    assert [row["pair_id"] for row in summary] == [row["pair_id"] for row in rows]
    assert all(row["status"] == "ok" for row in summary)
    assert not [name for name in os.listdir(out) if name.startswith(".pair")]  # no staging folder left behind
    for row in summary:
        assert sorted(os.listdir(out / row["pair_id"])) == ["metrics.json", "overview.png", "warped_label.nii.gz"]


def test_two_torchrun_ranks_register_an_atlas_onto_a_folder(tmp_path, cohort):
    """torchrun --nproc_per_node=2 on CPU (gloo): the ranks share the pairs, rank 0 merges one summary."""
    atlas, atlas_label = cohort[0]
    images = os.path.join(os.path.dirname(atlas), "*_image.nii.gz")
    out = tmp_path / "O"
    overrides = {"atlas_image": atlas, "atlas_label": atlas_label, "images": images, "output_dir": out}
    overrides["outputs"] = "warped_label,metrics"
    command, env = bundle_command("batch_inference", BATCH_CONFIGS, overrides)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *command[1:]]
    env = dict(env, OMP_NUM_THREADS="1")
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    output = check_ok(process)
    assert "rank 0 of 2: 3 pairs" in output and "rank 1 of 2: 2 pairs" in output
    summary = _summary(out)
    assert [row["pair_id"] for row in summary] == [f"s0_image_to_s{i}_image" for i in range(1, 6)]
    assert all(row["status"] == "ok" for row in summary)
    totals = json.loads((out / "summary.json").read_text())
    assert totals["world_size"] == 2 and [r["rank"] for r in totals["ranks"]] == [0, 1]
    assert sum(r["pairs"] for r in totals["ranks"]) == 5
    for row in summary:  # the atlas label warped onto each image, on that image's grid
        warped = nib.load(out / row["pair_id"] / "warped_label.nii.gz")
        assert warped.shape[:2] == (64, 72) and set(np.unique(np.asarray(warped.dataobj))) <= {0, 1, 2}
