"""Learned templates (configs/template.yaml, scripts/template.py): the math of the pieces, and a tiny real run."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, SHARED_DATA, check_ok, run_bundle
from monai.losses import BendingEnergyLoss
from monai.networks.nets import VoxelMorphUNet

from scripts.network import RegistrationNet
from scripts.synthetic import SyntheticSpec, generate_subjects
from scripts.template import (
    LearnedTemplate,
    TemplateLoss,
    TemplateRegistration,
    mean_displacement,
    mean_image,
    propagate_labels,
    sharpness,
)

TEMPLATE = [str(CONFIGS / "train.yaml"), str(CONFIGS / "template.yaml")]


def _network(initial: torch.Tensor, num_attributes: int = 0) -> TemplateRegistration:
    backbone = VoxelMorphUNet(2, 2, 8, [8, 8, 8, 8, 8, 8], [8, 8])
    registration = RegistrationNet(backbone, spatial_dims=2, integration_steps=4, divisor=16)
    return TemplateRegistration(registration, LearnedTemplate(initial, num_attributes=num_attributes))


def _subjects(count: int = 12, shape=(32, 32)) -> list[dict]:
    subjects, _ = generate_subjects(
        SyntheticSpec(spatial_dims=2, shape=list(shape), num_subjects=count, num_validation=0, num_test=0)
    )
    return [
        {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label.astype(np.float32))[None]}
        for image, label in subjects
    ]


def test_conditional_template_starts_at_the_base_for_every_attribute_and_rejects_unknown_ones():
    initial = torch.rand(1, 20, 24)
    template = LearnedTemplate(initial, num_attributes=3)
    images = template(torch.tensor([0, 2, 1]))
    assert images.shape == (3, 1, 20, 24)
    assert torch.allclose(images, initial.expand(3, 1, 20, 24))  # zero-initialised decoder head
    with pytest.raises(ValueError, match=r"attribute values must be 0..2"):
        template(torch.tensor([3]))
    with pytest.raises(ValueError, match="needs the attribute"):
        template(None)
    with pytest.raises(ValueError, match="non-finite"):
        LearnedTemplate(torch.full((1, 8, 8), float("nan")))


def test_centrality_term_is_the_squared_mean_displacement_over_the_batch():
    loss = TemplateLoss(torch.nn.MSELoss(), BendingEnergyLoss(), centrality_weight=1.0)
    image = torch.rand(2, 1, 16, 16)
    shift = torch.randn(1, 2, 16, 16)
    opposite = loss.terms(image, image, torch.cat([shift, -shift]), torch.cat([-shift, shift]))
    assert float(opposite["centrality"]) == pytest.approx(0.0, abs=1e-7)
    same = loss.terms(image, image, torch.cat([shift, shift]), torch.cat([-shift, -shift]))
    assert float(same["centrality"]) == pytest.approx(float(shift.pow(2).mean()), rel=1e-5)
    assert float(same["loss"]) > float(opposite["loss"])  # Sim and Reg are equal: the difference is the centrality


def test_label_vote_under_the_identity_is_the_voxelwise_majority():
    subjects = _subjects(5)
    network = _network(mean_image(subjects))
    for parameter in network.registration.parameters():
        torch.nn.init.zeros_(parameter)  # velocity 0 everywhere: φ is the identity
    vote = propagate_labels(network, subjects)[0, 0]
    labels = torch.stack([s["label"][0].long() for s in subjects])
    counts = torch.stack([(labels == v).sum(0) for v in range(int(labels.max()) + 1)])
    agreed = counts.max(0).values >= 3  # a strict majority: no tie to break
    assert torch.equal(vote[agreed], counts.argmax(0)[agreed])
    assert mean_displacement(network, subjects) == pytest.approx(0.0, abs=1e-6)


def test_sharpness_prefers_a_crisp_edge_to_the_same_edge_blurred():
    from scipy import ndimage

    edge = np.zeros((32, 32))
    edge[:, 16:] = 1.0
    assert sharpness(edge) > 1.5 * sharpness(ndimage.gaussian_filter(edge, 3))
    noisy = np.random.default_rng(0).normal(0.0, 0.02, edge.shape)  # faint noise is not sharpness
    assert sharpness(noisy) < 0.5 * sharpness(ndimage.gaussian_filter(edge, 3))


def _train(subjects: list[dict], centrality_weight: float, steps: int = 40) -> TemplateRegistration:
    """A few Adam steps of network + template, the template starting at one subject (off the population's centre)."""
    torch.manual_seed(0)
    network = _network(subjects[0]["image"])
    loss = TemplateLoss(torch.nn.MSELoss(), BendingEnergyLoss(), centrality_weight=centrality_weight)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    images = torch.stack([s["image"] for s in subjects])
    for _ in range(steps):
        template = network.template(batch_size=len(images))
        velocity = network.velocity(torch.cat([template, images], dim=1))
        ddf = network.field_to_ddf(velocity, images.shape[2:])
        inverse = network.field_to_ddf(-velocity, images.shape[2:])
        terms = loss.terms(template, images, ddf, inverse)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    return network


def test_the_centrality_term_lowers_the_mean_displacement_from_the_template():
    torch.set_num_threads(1)
    subjects = _subjects(12)
    without = mean_displacement(_train(subjects, 0.0), subjects)
    with_term = mean_displacement(_train(subjects, 1.0), subjects)
    assert without > 0.05  # the network learned to move: otherwise the comparison says nothing
    assert with_term < 0.7 * without, (with_term, without)


def test_template_overlay_writes_a_sharp_template_usable_as_an_atlas(tmp_path):
    overrides = {
        "synthetic_dir": tmp_path / "synthetic",
        "output_dir": tmp_path / "out",
        "synthetic#shape": "[48,48]",  # small images, so that 256 steps of training fit in about a minute
        "spatial_size": "[48,48]",
        "max_epochs": 8,
        "val_interval": 8,
        "template_interval": 4,
        "subjects_per_epoch": 256,
    }
    output = check_ok(run_bundle("training", TEMPLATE, overrides, timeout=600))
    assert "template (epoch 8) written to" in output
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    folder = run_dir / "template"
    for name in ("template.nii.gz", "template_label.nii.gz", "template.png"):
        assert (folder / name).is_file(), name

    # The files are an atlas as they are: the datalist's "atlas" entry, through the bundle's own checks and loading.
    from scripts.datalist import load_atlas
    from scripts.transforms import subject_preprocessing

    datalist = tmp_path / "atlas_datalist.json"
    atlas_entry = {"image": str(folder / "template.nii.gz"), "label": str(folder / "template_label.nii.gz")}
    datalist.write_text(json.dumps({"training": [], "atlas": atlas_entry}))
    preprocessing = subject_preprocessing(spatial_dims=2, pixdim=1.0, spatial_size=[48, 48])
    atlas = preprocessing(load_atlas(str(datalist)))
    training = json.loads((tmp_path / "synthetic" / "datalist.json").read_text())["training"]
    subjects = [
        preprocessing({key: str(tmp_path / "synthetic" / entry[key]) for key in ("image", "label")})
        for entry in training
    ]
    assert atlas["image"].shape == subjects[0]["image"].shape == (1, 48, 48)
    assert np.allclose(atlas["image"].affine, subjects[0]["image"].affine)
    label_ids = set(np.unique(atlas["label"].numpy()).astype(int))
    assert label_ids <= set(np.unique(np.concatenate([s["label"].numpy().ravel() for s in subjects])).astype(int))
    assert len(label_ids) >= 5  # background + most structures survive the vote

    template = nib.load(folder / "template.nii.gz").get_fdata()
    assert np.isfinite(template).all()
    assert sharpness(template) > 1.15 * sharpness(mean_image(subjects)), "the template is not sharper than the mean"
    # held-out subjects segmented with the template: registration beats placing its labels as they are
    summary = json.loads(next(run_dir.rglob("validation/metrics.json")).read_text())["summary"]
    assert summary["registered_mean_dice"] > summary["identity_mean_dice"] + 0.05, summary


def test_conditional_label_vote_uses_only_the_subjects_of_each_attribute():
    subjects = _subjects(6)
    for index, subject in enumerate(subjects):
        subject["attribute"] = index % 2
        subject["label"] = torch.full_like(subject["label"], 1 + index % 2)  # attribute a: every voxel is a + 1
    network = _network(mean_image(subjects), num_attributes=2)
    for attribute in (0, 1):
        vote = propagate_labels(network, subjects, attribute)
        assert vote is not None and set(torch.unique(vote[..., 4:-4, 4:-4]).tolist()) == {attribute + 1}
    assert propagate_labels(network, [{**s, "label": None} for s in subjects], 0) is None  # no labels: no atlas labels


def test_mnist_classes_dataset_gives_every_entry_its_digit_as_attribute(tmp_path):
    from scripts.mnist import ensure_mnist_classes_dataset

    datalist = json.loads(
        open(ensure_mnist_classes_dataset(str(tmp_path / "m"), 3, 1, 2, seed=0)).read()  # train, validation, test
    )
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [30, 10, 20]
    for section in ("training", "validation", "test"):
        for entry in datalist[section]:
            assert entry["image"].startswith(f"digit{entry['attribute']}_")
    held_out = {e["image"] for s in ("validation", "test") for e in datalist[s]}
    assert not held_out & {e["image"] for e in datalist["training"]}


def test_synthetic_size_classes_give_a_known_attribute_and_leave_the_default_population_alone(tmp_path):
    from scripts.synthetic import ensure_synthetic_dataset, scaled_anatomy, size_class

    spec = SyntheticSpec(spatial_dims=2, shape=[48, 48], num_subjects=12, num_size_classes=3)
    subjects, (_, anatomy) = generate_subjects(spec)
    areas = {k: np.mean([(subjects[i][1] > 0).sum() for i in range(k, 12, 3)]) for k in range(3)}
    assert areas[0] < areas[1] < areas[2]  # the class is the size the generator gave the anatomy
    assert [size_class(spec, i)[0] for i in range(4)] == [0, 1, 2, 0]
    assert (scaled_anatomy(anatomy, 1.12) > 0).sum() > (anatomy > 0).sum() > (scaled_anatomy(anatomy, 0.88) > 0).sum()
    entries = json.loads(open(ensure_synthetic_dataset(str(tmp_path / "s"), spec)).read())["training"]
    assert all(entry["attribute"] == int(entry["image"][8:11]) % 3 for entry in entries)
    # without size classes nothing changes: same subjects as the plain spec, no attribute in the datalist
    plain, _ = generate_subjects(SyntheticSpec(spatial_dims=2, shape=[48, 48], num_subjects=12))
    same, _ = generate_subjects(SyntheticSpec(spatial_dims=2, shape=[48, 48], num_subjects=12, num_size_classes=0))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(plain, same))


@pytest.mark.skipif(
    not (SHARED_DATA / "oasis2d_train").is_dir(), reason=f"the real 2D cohort is not there: {SHARED_DATA}/oasis2d_train"
)
def test_cohort_template_evidence_runs_on_a_small_cut_of_the_real_cohort(tmp_path, monkeypatch):
    """``benchmarks/template.py cohort`` (template of the real 2D cohort, atlas-based segmentation of its cohort-test
    subjects) end to end through the bundle CLI, on 4 training, 2 validation and 3 test subjects, one short epoch."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import template as template_evidence
    import tutorial
    import tutorial_cohort

    content = json.loads(tutorial_cohort.cohort_datalist(tmp_path / "full").read_text())
    small = {"training": content["training"][:4], "validation": content["validation"][:2], "test": content["test"][:3]}
    (tmp_path / "small.json").write_text(json.dumps(small))
    monkeypatch.setattr(tutorial_cohort, "COHORT_DATALIST", tmp_path / "small.json")
    monkeypatch.setattr(tutorial, "SMOKE_OVERRIDES", {"subjects_per_epoch": 8})
    monkeypatch.setattr(template_evidence, "DOCS", tmp_path)
    results = template_evidence.cohort(tmp_path / "work", 2, 1, SHARED_DATA, atlas_subjects=2)
    assert results["train_subjects"] == 4 and results["test_subjects"] == 3
    for rows in results["segmentation"].values():
        assert set(rows) >= {"learned template", "mean image", "random subject (mean)"}
        assert all(0.2 < dice < 1.0 for dice in rows.values())
        assert rows["random subject (worst)"] <= rows["random subject (mean)"] <= rows["random subject (best)"]
    assert (tmp_path / "template_cohort.png").stat().st_size > 10000
    (run,) = (tmp_path / "work" / "cohort" / "runs").iterdir()
    template = nib.load(run / "template" / "template.nii.gz")
    assert template.shape[:2] == (160, 192)  # on the cohort's grid, usable as its atlas
