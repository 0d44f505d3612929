"""Work is never lost or mixed up: partly labelled datalists, label checks, strict-JSON metrics, one run per output
folder, and the specific error as the last line a user sees."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, check_ok, run_bundle
from monai.bundle import ConfigParser
from monai.data import DataLoader
from scripts import _specific_error
from scripts.files import atomic_write_json
from scripts.pairs import PairDataset, label_present
from scripts.registration_step import RegistrationEvalStep
from scripts.synthetic import SyntheticSpec, ensure_synthetic_dataset
from scripts.transforms import CheckIntensityd, subject_preprocessing

TRAIN = str(CONFIGS / "train.yaml")
INFERENCE = str(CONFIGS / "inference.yaml")


def _save(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return str(path)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((32, 32, 1)).astype(np.float32)


def _label(value: int = 1) -> np.ndarray:
    label = np.zeros((32, 32, 1), dtype=np.int16)
    label[8:24, 8:24] = value
    return label


def _last_line(process) -> str:
    lines = [line for line in (process.stdout + process.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---- labels must be label maps ----


@pytest.mark.parametrize(
    "make_label, problem",
    [
        (lambda: _image(3), r"has non-integer values \(e\.g\. 0\.\d+\).*probability map or an intensity image"),
        (
            lambda: (np.random.default_rng(3).random((64, 64, 1)) * 3000 + 1).astype(np.int16),  # an int16 MRI
            r"has \d+ distinct values, more than max_label_values \(1000\).*intensity image rather than a label",
        ),
        (lambda: -_label(3), r"has negative values \(min -3\); label ids must be >= 0"),
        (lambda: np.where(_label() > 0, np.nan, 0).astype(np.float32), "contains NaN or infinite values"),
    ],
    ids=["probability-map", "intensity-image", "all-negative", "nan"],
)
def test_a_label_that_is_not_a_label_map_is_rejected_naming_the_file(tmp_path, make_label, problem):
    label_array = make_label()
    image = _save(tmp_path / "a.nii.gz", np.random.default_rng(0).random(label_array.shape).astype(np.float32))
    label = _save(tmp_path / "a_seg.nii.gz", label_array)
    with pytest.raises(ValueError, match=re.escape(f"{label} ('label') ") + problem):
        subject_preprocessing(2, 1.0, None)({"image": image, "label": label})


def test_integer_labels_stored_as_float_are_accepted(tmp_path):
    image = _save(tmp_path / "a.nii.gz", _image())
    label = _save(tmp_path / "a_seg.nii.gz", _label(7).astype(np.float32) + 1e-5)
    loaded = subject_preprocessing(2, 1.0, None)({"image": image, "label": label})
    assert set(torch.unique(loaded["label"]).round().tolist()) == {0.0, 7.0}


@pytest.mark.parametrize("highest", [1000, 2**21], ids=["counted", "sorted"])
def test_distinct_label_ids_are_counted_whatever_their_range(highest):
    """Ids are counted with bincount up to 2^20 and with unique beyond: both count the same way."""
    check = CheckIntensityd((), "label")
    sparse = torch.zeros(1, 16, 16)
    sparse[0, 0, :3] = torch.tensor([3.0, 50.0, float(highest)])
    check({"label": sparse})  # three ids, however far apart
    crowded = torch.arange(1, 1002, dtype=torch.float32) + (highest - 1001)  # 1001 distinct ids ending at highest
    with pytest.raises(ValueError, match=r"has 1001 distinct values, more than max_label_values \(1000\)"):
        check({"label": crowded.reshape(1, 7, 143)})


# ---- metrics files are strict JSON ----


def test_metrics_json_writes_null_with_the_reason_for_undefined_values(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(str(path), {"mean_dice": float("nan"), "dice": {"3": 0.5, "4": float("inf")}, "seconds": 1.0})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    content = json.loads(text)
    assert content["mean_dice"] is None and content["dice"] == {"3": 0.5, "4": None} and content["seconds"] == 1.0
    assert set(content["undefined"]) == {"mean_dice", "dice.4"}


# ---- partly labelled datalists ----


def _subjects(tmp_path: Path, labelled: list[bool]) -> list[dict]:
    preprocessing = subject_preprocessing(2, 1.0, None)
    subjects = []
    for i, has_label in enumerate(labelled):
        entry = {"image": _save(tmp_path / f"s{i}.nii.gz", _image(i))}
        if has_label:
            entry["label"] = _save(tmp_path / f"s{i}_seg.nii.gz", _label())
        subjects.append(preprocessing(entry))
    return subjects


def test_pairs_of_a_partly_labelled_cohort_collate_and_only_labelled_pairs_are_scored(tmp_path):
    subjects = _subjects(tmp_path, [True, False, True])
    pairs = PairDataset(subjects, mode="explicit", pairs=[(0, 2), (0, 1), (1, 2)])
    batch = next(iter(DataLoader(pairs, batch_size=3)))  # failed with KeyError: 'moving_label' before
    assert [label_present(batch, "fixed", i) for i in range(3)] == [True, True, False]
    assert [label_present(batch, "moving", i) for i in range(3)] == [True, False, True]

    class Engine:  # the attributes RegistrationEvalStep reads from ignite's evaluator
        class state:
            device = torch.device("cpu")

        amp = False
        network = torch.nn.Module()

    Engine.network.forward = lambda x: torch.zeros(x.shape[0], 2, *x.shape[2:])
    records = RegistrationEvalStep(compute_hd95=False)(Engine, batch)["records"]
    assert ["registered_mean_dice" in r for r in records] == [True, False, False]
    assert records[0]["registered_mean_dice"] == pytest.approx(1.0) and records[0]["scored_structures"] == 1


def test_training_and_validation_run_on_a_partly_labelled_datalist_with_the_label_loss(tmp_path):
    root = ensure_synthetic_dataset(
        str(tmp_path / "synthetic"), SyntheticSpec(2, [48, 48], num_subjects=8, num_validation=3, num_test=1)
    )
    datalist = json.loads(Path(root).read_text())
    for section, keep in (("training", 2), ("validation", 2)):
        for entry in datalist[section][keep:]:
            entry.pop("label")
    partial = Path(root).parent / "partial.json"  # entries are relative to the datalist
    partial.write_text(json.dumps(datalist))
    overrides = {
        "datalist": partial,
        "output_dir": tmp_path / "out",
        "ckpt_dir": tmp_path / "models",
        "spatial_size": "[48,48]",
        "max_epochs": 1,
        "val_interval": 1,
        "num_pairs_per_epoch": 4,
        "batch_size": 2,
        "val_batch_size": 3,
        "label_weight": 0.5,
        "train_label_ids": "[1,2,3]",
    }
    output = check_ok(run_bundle("training", [TRAIN], overrides))
    assert "2 of 4 subjects have a label" in output
    (report_file,) = (tmp_path / "out").rglob("validation/metrics.json")
    report = json.loads(report_file.read_text())
    # ring pairs over validation subjects [labelled, labelled, unlabelled]: one pair has both labels
    assert report["summary"]["pairs"] == 3 and report["summary"]["scored_pairs"] == 1
    assert "1 of 3 pairs scored by Dice" in output
    assert math.isfinite(report["summary"]["registered_mean_dice"])


# ---- inference output folders hold one run's files; failures say what went wrong last ----


def _infer(tmp_path: Path, checkpoint_dir: Path, out: Path, **files: str):
    overrides = {"ckpt_dir": checkpoint_dir, "output_dir": out, "refine_iterations": 0, **files}
    return run_bundle("inference", [INFERENCE], overrides, timeout=300)


def test_a_rerun_into_the_same_output_folder_leaves_no_file_of_the_earlier_run(tmp_path, checkpoint_dir):
    fixed, moving = _save(tmp_path / "f.nii.gz", _image(1)), _save(tmp_path / "m.nii.gz", _image(2))
    moving_label = _save(tmp_path / "m_seg.nii.gz", _label())
    out = tmp_path / "out"
    check_ok(_infer(tmp_path, checkpoint_dir, out, fixed_image=fixed, moving_image=moving, moving_label=moving_label))
    assert (out / "warped_label.nii.gz").is_file()
    other = _save(tmp_path / "other.nii.gz", _image(3))
    output = check_ok(_infer(tmp_path, checkpoint_dir, out, fixed_image=fixed, moving_image=other))
    assert sorted(p.name for p in out.iterdir()) == [
        "affine.txt",  # the affine stage's T (default on)
        "ddf.nii.gz",
        "metrics.json",
        "overview.png",
        "warped_image.nii.gz",
    ]
    assert json.loads((out / "metrics.json").read_text())["moving"] == "other"
    assert "replaced the 6 files of an earlier run" in output  # with affine.txt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "staging folders left behind"


def test_a_failed_run_leaves_the_earlier_outputs_untouched_and_says_why_last(tmp_path, checkpoint_dir):
    fixed, moving = _save(tmp_path / "f.nii.gz", _image(1)), _save(tmp_path / "m.nii.gz", _image(2))
    out = tmp_path / "out"
    check_ok(_infer(tmp_path, checkpoint_dir, out, fixed_image=fixed, moving_image=moving))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    broken = _image(4)
    broken[3, 3, 0] = np.nan
    bad = _save(tmp_path / "bad.nii.gz", broken)
    process = _infer(tmp_path, checkpoint_dir, out, fixed_image=fixed, moving_image=bad)
    assert process.returncode != 0
    assert _last_line(process) == f"ERROR: ValueError: {bad} ('image') contains NaN or infinite values"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "staging folders left behind"


def test_an_output_folder_with_other_files_is_refused_before_registering(tmp_path, checkpoint_dir):
    fixed, moving = _save(tmp_path / "f.nii.gz", _image(1)), _save(tmp_path / "m.nii.gz", _image(2))
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    process = _infer(tmp_path, checkpoint_dir, out, fixed_image=fixed, moving_image=moving)
    assert process.returncode != 0
    assert "holds files that are not registration outputs (e.g. chapter1.tex)" in _last_line(process)
    assert [p.name for p in out.iterdir()] == ["chapter1.tex"]


def test_the_specific_error_is_found_under_monai_config_wrappers():
    specific = FileNotFoundError("--fixed_image: file not found: x.nii.gz")
    try:
        try:
            raise specific
        except FileNotFoundError as error:
            raise RuntimeError("Failed to evaluate ConfigExpression: $@memory_check") from error
    except RuntimeError as wrapper:
        assert _specific_error(wrapper) is specific


def test_a_single_held_out_subject_is_named_with_its_section_and_datalist(tmp_path):
    from scripts.datalist import load_held_out

    image = _save(tmp_path / "a.nii.gz", _image())
    datalist = tmp_path / "datalist.json"
    content = {"training": [{"image": image}, {"image": image}], "validation": [{"image": image}]}
    datalist.write_text(json.dumps(content))
    expected = re.escape(f"{datalist}: section 'validation' has 1 subject(s); held-out pairs")
    with pytest.raises(ValueError, match=expected):
        load_held_out(str(datalist), "validation")
    # as train.yaml reaches it
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser["datalist"] = str(datalist)
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content("validate#dataset")
    assert re.search(expected, str(_specific_error(info.value)))


def test_the_overview_png_shows_the_pair_and_its_grid_and_leaves_no_open_figure(tmp_path):
    """Written at every registration, also inside a long-running MONAI Label server: a figure left open in
    pyplot's registry would leak memory with every request, and a half-written PNG must never take the name."""
    import matplotlib.pyplot as plt
    from PIL import Image
    from scripts.visualize import save_overview_png

    fixed = np.zeros((20, 24, 28), dtype=np.float32)
    fixed[5:15, 6:18] = 0.5  # mid-gray under the panels' [0, max] window
    fixed[0, 0] = 1.0
    ddf = np.zeros((3, 20, 24, 28), dtype=np.float32)
    ddf[0] = 2.0  # a shift of two voxels along the first axis
    open_before = plt.get_fignums()
    path = save_overview_png(str(tmp_path / "overview.png"), fixed, fixed, fixed, ddf)
    assert plt.get_fignums() == open_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overview.png"]
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape == (440, 1600, 3)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 110) & (pixels[..., 2] < 110)  # the grid's tab:red lines
    columns = np.nonzero(red.any(axis=0))[0]
    assert columns.size and columns.min() > 1200  # only in the fourth panel
    fixed_panel = pixels[:, :400]
    assert (fixed_panel.max(axis=-1) < 30).any()  # the image's zero background, in gray
    gray = (np.abs(fixed_panel - 128) < 12).all(axis=-1)
    assert gray.sum() > 1000  # its mid-gray square
