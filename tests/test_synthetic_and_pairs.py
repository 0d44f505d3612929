"""Synthetic default data and pair sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CONFIGS
from monai.bundle import ConfigParser
from scripts.pairs import PairDataset, pair_indices_from_paths
from scripts.synthetic import SyntheticSpec, ensure_synthetic_dataset, generate_subjects


@pytest.mark.parametrize("spatial_dims, shape", [(2, [32, 40]), (3, [16, 20, 24])])
def test_synthetic_generator_is_deterministic_per_seed(spatial_dims, shape):
    spec = dict(spatial_dims=spatial_dims, shape=shape, num_subjects=4, num_validation=1, num_test=1)
    first, atlas_first = generate_subjects(SyntheticSpec(seed=3, **spec))
    again, atlas_again = generate_subjects(SyntheticSpec(seed=3, **spec))
    other, _ = generate_subjects(SyntheticSpec(seed=4, **spec))
    for (image_a, label_a), (image_b, label_b) in zip(first, again):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(label_a, label_b)
    np.testing.assert_array_equal(atlas_first[1], atlas_again[1])
    assert not np.array_equal(first[0][0], other[0][0])
    image, label = first[0]
    assert image.shape == tuple(shape) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert label.dtype == np.int16 and len(np.unique(label)) > 3
    # subjects are distinct deformations of one anatomy: different, but overlapping labels
    assert not np.array_equal(first[0][1], first[1][1])


def test_synthetic_dataset_written_once_with_datalist(tmp_path):
    spec = dict(spatial_dims=2, shape=[24, 24], num_subjects=5, num_validation=1, num_test=1)
    path = ensure_synthetic_dataset(str(tmp_path / "synth"), spec)
    content = json.loads(open(path).read())
    assert [len(content[k]) for k in ("training", "validation", "test")] == [3, 1, 1]
    assert (tmp_path / "synth" / content["training"][0]["image"]).is_file()
    stamp = (tmp_path / "synth" / "datalist.json").stat().st_mtime_ns
    assert ensure_synthetic_dataset(str(tmp_path / "synth"), spec) == path
    assert (tmp_path / "synth" / "datalist.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_dataset_folders_are_replaced_whole_or_not_at_all(tmp_path):
    from scripts.files import atomic_folder

    target = tmp_path / "data"
    with atomic_folder(target) as staging:
        (staging / "datalist.json").write_text("{}")
    assert (target / "datalist.json").read_text() == "{}"
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0o700
    with pytest.raises(RuntimeError, match="interrupted"), atomic_folder(target) as staging:
        (staging / "datalist.json").write_text('{"half": true}')
        raise RuntimeError("interrupted")
    with atomic_folder(target, is_current=lambda: True) as staging:  # another writer finished first: keep its copy
        (staging / "datalist.json").write_text('{"mine": true}')
    assert (target / "datalist.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging folder left


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _subjects(n):
    return [{"image": np.full((1, 4, 4), i, dtype=np.float32), "label": np.full((1, 4, 4), i)} for i in range(n)]


def test_pairwise_sampler_never_pairs_a_subject_with_itself_and_covers_all():
    n = 7
    dataset = PairDataset(_subjects(n), mode="pairwise", num_pairs=400, seed=1)
    fixed_seen, moving_seen = set(), set()
    for i in range(len(dataset)):
        pair = dataset[i]
        fixed, moving = int(pair["fixed_image"][0, 0, 0]), int(pair["moving_image"][0, 0, 0])
        assert fixed != moving
        fixed_seen.add(fixed)
        moving_seen.add(moving)
    assert fixed_seen == moving_seen == set(range(n))


def test_pairwise_sampler_draws_fresh_pairs_each_epoch_but_is_seeded():
    def epoch(dataset):
        return [
            (int(p["fixed_image"][0, 0, 0]), int(p["moving_image"][0, 0, 0])) for p in (dataset[i] for i in range(20))
        ]

    dataset = PairDataset(_subjects(6), mode="pairwise", num_pairs=20, seed=5)
    first, second = epoch(dataset), epoch(dataset)
    assert first != second
    assert epoch(PairDataset(_subjects(6), mode="pairwise", num_pairs=20, seed=5)) == first


def test_deterministic_modes():
    ring = PairDataset(_subjects(4), mode="ring")
    assert [(int(ring[i]["fixed_image"][0, 0, 0]), int(ring[i]["moving_image"][0, 0, 0])) for i in range(4)] == [
        (1, 0),
        (2, 1),
        (3, 2),
        (0, 3),
    ]
    atlas = [{"image": np.full((1, 4, 4), 99.0, dtype=np.float32)}]
    both = PairDataset(_subjects(3), mode="atlas", atlas=atlas, atlas_direction="both")
    assert len(both) == 6
    assert float(both[0]["fixed_image"][0, 0, 0]) == 99.0 and float(both[3]["moving_image"][0, 0, 0]) == 99.0
    explicit = PairDataset(_subjects(3), mode="explicit", pairs=[(2, 0)])
    assert len(explicit) == 1 and int(explicit[0]["fixed_image"][0, 0, 0]) == 2


def _held_out(datalist: str, overrides: dict):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"datalist": datalist, "spatial_size": [24, 24], **overrides})
    return parser.get_parsed_content("validate#dataset")


def test_held_out_pairs_from_the_config_ring_atlas_and_explicit(tmp_path):
    spec = dict(spatial_dims=2, shape=[24, 24], num_subjects=8, num_validation=3, num_test=2)
    datalist = ensure_synthetic_dataset(str(tmp_path / "synth"), spec)
    ring = _held_out(datalist, {})
    assert ring.mode == "ring" and ring.pairs == [(1, 0), (2, 1), (0, 2)]
    assert (ring[0]["fixed_name"], ring[0]["moving_name"]) == ("subject_004_image", "subject_003_image")
    atlas = _held_out(datalist, {"pair_mode": "atlas", "atlas_direction": "both"})
    assert atlas.mode == "atlas" and len(atlas) == 6 and atlas[0]["fixed_name"] == "atlas_image"
    content = json.loads(open(datalist).read())
    validation = [entry["image"] for entry in content["validation"]]
    content["pairs"] = {"validation": [{"fixed": validation[0], "moving": validation[2]}]}
    with open(datalist, "w") as stream:
        json.dump(content, stream)
    for mode in ("pairwise", "atlas"):  # explicit pairs win, whatever the pair_mode
        explicit = _held_out(datalist, {"pair_mode": mode})
        assert explicit.mode == "explicit" and explicit.pairs == [(0, 2)] and explicit.atlas is None
    evaluation = ConfigParser()
    evaluation.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")])
    evaluation.update({"datalist": datalist, "spatial_size": [24, 24]})
    test = evaluation.get_parsed_content("validate#dataset")
    assert test.mode == "ring" and len(test) == 2
    assert (test[0]["fixed_name"], test[0]["moving_name"]) == ("subject_007_image", "subject_006_image")


def test_pair_errors_are_specific():
    with pytest.raises(ValueError, match="unknown pair_mode 'random'"):
        PairDataset(_subjects(3), mode="random")
    with pytest.raises(ValueError, match="at least 2 subjects"):
        PairDataset(_subjects(1), mode="pairwise")
    with pytest.raises(ValueError, match="needs an atlas"):
        PairDataset(_subjects(3), mode="atlas")
    with pytest.raises(ValueError, match="not an image of the same datalist section"):
        pair_indices_from_paths(["/a.nii.gz"], [{"fixed": "/a.nii.gz", "moving": "/b.nii.gz"}])
