"""Bad input gives an error that names the file (or datalist key) and the problem, and leaves no partial output.

Mostly in-process through the functions the configs call (datalist loading, ``subject_preprocessing``, pairing); two
runs of the real inference CLI check the exit status, the message and the empty output folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, run_bundle
from monai.bundle import ConfigParser
from monai.data import Dataset
from scripts.datalist import check_image_file, load_atlas, load_held_out, load_section, subjects_from_files
from scripts.pairs import PairDataset
from scripts.transforms import subject_preprocessing

INFERENCE = str(CONFIGS / "inference.yaml")
TRAIN = str(CONFIGS / "train.yaml")


def _save(path: Path, array: np.ndarray, spacing: float = 1.0) -> str:
    """Write ``array`` as NIfTI with an isotropic ``spacing`` (mm) and return the path as a string."""
    nib.save(nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return str(path)


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _label(shape: tuple[int, ...]) -> np.ndarray:
    label = np.zeros(shape, dtype=np.int16)
    label[tuple(slice(s // 4, 3 * s // 4) if s > 1 else slice(None) for s in shape)] = 1
    return label


def _subject_2d(folder: Path, name: str = "a") -> dict:
    return {
        "image": _save(folder / f"{name}.nii.gz", _image((32, 32, 1))),
        "label": _save(folder / f"{name}_seg.nii.gz", _label((32, 32, 1))),
    }


def _datalist(folder: Path, content: object, raw: str | None = None) -> str:
    path = folder / "datalist.json"
    path.write_text(raw if raw is not None else json.dumps(content))
    return str(path)


def _truncate(path: str, keep: float = 0.5) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return path


def _preprocess(data: dict, spatial_dims: int = 2, spatial_size: list[int] | None = None) -> dict:
    return subject_preprocessing(spatial_dims, 1.0, spatial_size)(data)


# ---- 1. missing files ----


def test_missing_image_in_datalist_names_section_entry_key_and_file(tmp_path):
    subject = _subject_2d(tmp_path)
    missing = str(tmp_path / "gone_seg.nii.gz")
    datalist = _datalist(tmp_path, {"training": [subject, {"image": subject["image"], "label": "gone_seg.nii.gz"}]})
    expected = re.escape(f"'training'[1]['label']: file not found: {missing}")
    with pytest.raises(FileNotFoundError, match=expected) as info:
        load_section(datalist, "training")
    assert datalist in str(info.value)


def test_missing_inference_image_names_the_option_and_file(tmp_path):
    subject = _subject_2d(tmp_path)
    missing = str(tmp_path / "nope.nii.gz")
    with pytest.raises(FileNotFoundError, match=re.escape(f"--fixed_image: file not found: {missing}")):
        subjects_from_files(fixed_image=missing, moving_image=subject["image"])
    with pytest.raises(FileNotFoundError, match=re.escape(f"--moving_label: file not found: {missing}")):
        subjects_from_files(subject["image"], subject["image"], moving_label=missing)
    with pytest.raises(ValueError, match="--moving_image is required"):
        subjects_from_files(subject["image"], None)


def test_preprocessing_names_a_missing_file_in_its_own_message(tmp_path):
    # The bare transform chain (used on cached datasets) must say which file, not "applying transform <object>".
    missing = str(tmp_path / "gone_seg.nii.gz")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing} ('label'): file not found")):
        _preprocess({"image": _subject_2d(tmp_path)["image"], "label": missing})


# ---- 2./3. unreadable files ----


@pytest.mark.parametrize("name", ["x.nii.gz", "x.nii"])
def test_text_file_named_like_nifti_is_not_an_image(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError, match=re.escape(f"entry: cannot read {path} as a NIfTI image")):
        check_image_file(str(path), "entry")
    with pytest.raises(ValueError, match=re.escape(f"{path} ('image'): cannot read as an image: ImageFileError")):
        _preprocess({"image": str(path)})
    datalist = _datalist(tmp_path, {"training": [{"image": name}]})
    with pytest.raises(ValueError, match=re.escape(f"'training'[0]['image']: cannot read {path}")):
        load_section(datalist, "training")


def test_truncated_gzip_nifti_is_rejected_naming_the_file(tmp_path):
    path = _truncate(_save(tmp_path / "cut.nii.gz", _image((16, 16, 16))))
    check_image_file(path, "entry", read_data=False)  # the header survives: only reading the data finds the damage
    with pytest.raises(ValueError, match=re.escape(f"entry: {path} is truncated (the gzip data ends early)")):
        check_image_file(path, "entry")
    datalist = _datalist(tmp_path, {"validation": [{"image": "cut.nii.gz"}]})
    with pytest.raises(ValueError, match=re.escape(f"'validation'[0]['image']: {path} is truncated")):
        load_section(datalist, "validation")
    # Large datalists check headers only; then the loader's error must name the file and the problem.
    expected = re.escape(f"{path} ('image'): cannot read as an image: the compressed data ends early")
    with pytest.raises(ValueError, match=expected):
        _preprocess({"image": path}, spatial_dims=3)


def test_truncated_uncompressed_nifti_is_rejected_from_its_header_size(tmp_path):
    path = _truncate(_save(tmp_path / "cut.nii", _image((16, 16, 16))))
    with pytest.raises(ValueError, match=re.escape(f"entry: {path} is truncated: ") + r"\d+ bytes, .* needs 16736"):
        check_image_file(path, "entry", read_data=False)
    with pytest.raises(ValueError, match=re.escape(f"{path} ('image'): cannot read as an image: OSError")):
        _preprocess({"image": path}, spatial_dims=3)


# ---- 4./5. dimensionality ----


@pytest.mark.parametrize("shape", [(32, 32, 1), (32, 32)])
def test_2d_image_given_to_3d_config(tmp_path, shape):
    path = _save(tmp_path / "slice.nii.gz", _image(shape))
    expected = re.escape(f"{path} ('image') has shape {shape}, which is 2D; spatial_dims is 3")
    with pytest.raises(ValueError, match=expected):
        _preprocess({"image": path}, spatial_dims=3)


@pytest.mark.parametrize("shape", [(32, 32, 1), (32, 32)])
def test_2d_slice_layouts_accepted_by_2d_config(tmp_path, shape):
    path = _save(tmp_path / "slice.nii.gz", _image(shape))
    assert tuple(_preprocess({"image": path})["image"].shape) == (1, 32, 32)


def test_3d_volume_given_to_2d_config(tmp_path):
    path = _save(tmp_path / "volume.nii.gz", _image((16, 16, 16)))
    expected = re.escape(f"{path} ('image') is a 3D volume of shape (16, 16, 16); spatial_dims is 2")
    with pytest.raises(ValueError, match=expected):
        _preprocess({"image": path}, spatial_dims=2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_4d_image_is_rejected(tmp_path, spatial_dims):
    path = _save(tmp_path / "multi.nii.gz", _image((16, 16, 16, 3)))
    expected = f"{path} ('image') is a 4D image with 3 channels/frames (array shape (16, 16, 16) + 3)"
    with pytest.raises(ValueError, match=re.escape(expected) + ".*expected a single-channel 2D or 3D image"):
        _preprocess({"image": path}, spatial_dims=spatial_dims)


# ---- 6. different grids are resampled, not refused ----


def test_spacing_is_resampled_to_pixdim(tmp_path):
    path = _save(tmp_path / "coarse.nii.gz", _image((8, 8, 8)), spacing=2.0)
    image = _preprocess({"image": path}, spatial_dims=3)["image"]
    assert tuple(image.shape[1:]) in {(15, 15, 15), (16, 16, 16)}  # 8 voxels of 2 mm -> 1 mm
    np.testing.assert_allclose(image.pixdim[:3].cpu().numpy(), [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "fixed_shape, moving_shape, moving_spacing",
    [((32, 32, 1), (48, 48, 1), 0.5), ((32, 32, 1), (24, 28, 1), 1.0), ((16, 16, 16), (10, 10, 10), 2.0)],
)
def test_pair_of_different_shape_or_spacing_is_resampled_onto_the_fixed_grid(
    tmp_path, fixed_shape, moving_shape, moving_spacing
):
    spatial_dims = 2 if fixed_shape[-1] == 1 else 3

    def blob(shape, spacing):
        # the same 6 mm square/cube from 4 mm to 10 mm in world coordinates, on each grid
        world = [np.arange(s) * spacing for s in shape]
        inside = [(w >= 4) & (w < 10) if s > 1 else np.ones(1, bool) for w, s in zip(world, shape)]
        mask = np.ix_(*inside)
        image = np.full(shape, 0.1, dtype=np.float32)
        image[mask] = 1.0
        label = np.zeros(shape, dtype=np.int16)
        label[mask] = 1
        return image, label

    subjects = []
    for name, shape, spacing in (("fixed", fixed_shape, 1.0), ("moving", moving_shape, moving_spacing)):
        image, label = blob(shape, spacing)
        subjects.append(
            {
                "image": _save(tmp_path / f"{name}.nii.gz", image, spacing),
                "label": _save(tmp_path / f"{name}_seg.nii.gz", label, spacing),
            }
        )
    dataset = Dataset(subjects, subject_preprocessing(spatial_dims, 1.0, None))
    assert dataset[0]["image"].shape != dataset[1]["image"].shape  # different grids even after Spacingd
    pair = PairDataset(dataset, mode="explicit", pairs=[(0, 1)])[0]
    assert pair["moving_image"].shape == pair["fixed_image"].shape == pair["fixed_label"].shape
    assert pair["moving_label"].shape == pair["fixed_label"].shape
    assert set(torch.unique(pair["moving_label"]).tolist()) == {0.0, 1.0}  # nearest: labels stay labels
    fixed, moving = pair["fixed_label"] > 0, pair["moving_label"] > 0
    dice = 2 * (fixed & moving).sum() / (fixed.sum() + moving.sum())
    assert dice > 0.8, f"moving not resampled in world coordinates (Dice {float(dice):.2f})"


# ---- 7./8. intensities and labels ----


@pytest.mark.parametrize(
    "value, problem", [(np.nan, "contains NaN or infinite values"), (np.inf, "contains NaN or infinite values")]
)
def test_non_finite_image_is_rejected(tmp_path, value, problem):
    image = _image((32, 32, 1))
    image[3, 4, 0] = value
    path = _save(tmp_path / "bad.nii.gz", image)
    with pytest.raises(ValueError, match=re.escape(f"{path} ('image') {problem}")):
        _preprocess({"image": path})


def test_constant_image_is_rejected(tmp_path):
    path = _save(tmp_path / "flat.nii.gz", np.full((32, 32, 1), 7.0, dtype=np.float32), spacing=0.7)
    with pytest.raises(ValueError, match=re.escape(f"{path} ('image') is constant (7.0); nothing to register")):
        _preprocess({"image": path})


def test_label_without_foreground_is_rejected(tmp_path):
    image = _save(tmp_path / "a.nii.gz", _image((32, 32, 1)))
    label = _save(tmp_path / "a_seg.nii.gz", np.zeros((32, 32, 1), dtype=np.int16))
    expected = re.escape(f"{label} ('label') has no foreground label (all values are 0)") + "$"
    with pytest.raises(ValueError, match=expected):
        _preprocess({"image": image, "label": label})


def test_label_whose_foreground_vanishes_when_resampled_says_so(tmp_path):
    label = np.zeros((32, 32, 1), dtype=np.int16)
    label[5, 5, 0] = 1  # one 0.5 mm voxel: gone at 1 mm nearest neighbour
    image_path = _save(tmp_path / "a.nii.gz", _image((32, 32, 1)), spacing=0.5)
    label_path = _save(tmp_path / "a_seg.nii.gz", label, spacing=0.5)
    expected = re.escape(f"{label_path} ('label') has no foreground label") + ".*after resampling to pixdim"
    with pytest.raises(ValueError, match=expected):
        _preprocess({"image": image_path, "label": label_path})


# ---- 9. datalists ----


@pytest.mark.parametrize(
    "content, raw, problem",
    [
        ({"training": [], "validation": [{"image": "a"}]}, None, "has no subjects in section 'training' (it is [])"),
        ({"validation": [{"image": "a.nii.gz"}]}, None, "has no subjects in section 'training' (the key is missing)"),
        (None, '{"training": [{"image": "a.nii.gz"}', "is not valid JSON"),
        (None, "", "is not valid JSON"),
        ([{"image": "a.nii.gz"}], None, "must be a JSON object"),
        ({"training": {"image": "a.nii.gz"}}, None, "section 'training' must be a list of subjects, got a dict"),
        ({"training": ["a.nii.gz"]}, None, "entry 0 of 'training' must be an object like"),
        ({"training": [{"label": "a_seg.nii.gz"}]}, None, "entry 0 of 'training' has no 'image' key"),
    ],
)
def test_bad_datalist_is_named_with_its_problem(tmp_path, content, raw, problem):
    _subject_2d(tmp_path)
    datalist = _datalist(tmp_path, content, raw)
    with pytest.raises((ValueError, KeyError), match=re.escape(datalist) + ".*" + re.escape(problem)):
        load_section(datalist, "training")


def test_invalid_json_datalist_is_named_by_every_reader(tmp_path):
    datalist = _datalist(tmp_path, None, raw="{not json")
    with pytest.raises(ValueError, match=re.escape(f"datalist {datalist} is not valid JSON")):
        load_atlas(datalist)
    with pytest.raises(ValueError, match=re.escape(f"datalist {datalist} is not valid JSON")):
        load_held_out(datalist, "validation")
    with pytest.raises(FileNotFoundError, match=re.escape(f"datalist not found: {tmp_path / 'none.json'}")):
        load_section(str(tmp_path / "none.json"), "training")


# ---- 10. pair mode ----


def test_unknown_pair_mode_is_rejected(tmp_path):
    datalist = _datalist(
        tmp_path,
        {
            "training": [_subject_2d(tmp_path, "a"), _subject_2d(tmp_path, "b")],
            "validation": [_subject_2d(tmp_path, "c"), _subject_2d(tmp_path, "d")],
        },
    )
    expected = re.escape("unknown pair_mode 'random'; expected one of ('pairwise', 'ring', 'atlas', 'explicit')")
    with pytest.raises(ValueError, match=expected):
        load_held_out(datalist, "validation", pair_mode="random")
    # as `--pair_mode random` reaches it through train.yaml
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser["pair_mode"], parser["datalist"] = "random", datalist
    for component in ("train#dataset", "validate#dataset"):
        with pytest.raises(RuntimeError) as info:
            parser.get_parsed_content(component)
        assert isinstance(info.value.__cause__, ValueError) and re.search(expected, str(info.value.__cause__))


# ---- through the inference CLI: non-zero exit, the file named, nothing written ----


def _assert_failed_cleanly(process, message: str, output_dir: Path) -> None:
    output = process.stdout + process.stderr
    assert process.returncode != 0, output[-3000:]
    assert message in output, output[-3000:]
    assert not output_dir.exists() or not [p for p in output_dir.rglob("*") if p.is_file()]


def test_cli_inference_with_missing_moving_image_fails_naming_it(tmp_path, checkpoint_dir):
    fixed = _subject_2d(tmp_path)["image"]
    missing = str(tmp_path / "missing_moving.nii.gz")
    out = tmp_path / "out"
    overrides = {"ckpt_dir": checkpoint_dir, "output_dir": out, "fixed_image": fixed, "moving_image": missing}
    process = run_bundle("inference", [INFERENCE], overrides, timeout=300)
    _assert_failed_cleanly(process, f"--moving_image: file not found: {missing}", out)


def test_cli_inference_with_nan_moving_image_fails_naming_it_and_writes_nothing(tmp_path, checkpoint_dir):
    # A readable file whose content is bad passes the up-front checks: the run starts and must fail on the image.
    fixed = _subject_2d(tmp_path)["image"]
    image = _image((32, 32, 1), seed=1)
    image[10, 10, 0] = np.nan
    moving = _save(tmp_path / "nan_moving.nii.gz", image)
    out = tmp_path / "out"
    overrides = {"ckpt_dir": checkpoint_dir, "output_dir": out, "fixed_image": fixed, "moving_image": moving}
    process = run_bundle("inference", [INFERENCE], overrides, timeout=300)
    _assert_failed_cleanly(process, f"ValueError: {moving} ('image') contains NaN or infinite values", out)
