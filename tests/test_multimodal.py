"""The contrast-invariant path: MIND-SSC descriptors, their loss in the refinement, and the contrast cases."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SHARED_DATA, run_bundle
from scripts.losses import BoxLNCCLoss
from scripts.mind import MINDSSCLoss, mind_ssc, ssc_pairs
from scripts.refine import VelocityRefiner

sys.path.insert(0, str(REPO / "benchmarks"))
from contrast_cases import remap_contrast, tissue_means  # noqa: E402


def _reference_mind(image: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """MIND-SSC written from its definition, voxel by voxel (replicated edges, box patches): the reference."""
    dims = image.ndim
    padded = np.pad(image.astype(np.float64), dilation + radius, mode="edge")
    offset = dilation + radius

    def value(index: tuple[int, ...]) -> float:
        # the replicated padding of mind_ssc applies to the neighbour shift; the patch box is zero-padded
        clipped = tuple(min(max(i, 0), n - 1) for i, n in zip(index, image.shape))
        return padded[tuple(c + offset for c in clipped)]

    pairs = ssc_pairs(dims)
    out = np.zeros((len(pairs),) + image.shape)
    for voxel in itertools.product(*[range(n) for n in image.shape]):
        for k, (p, q) in enumerate(pairs):
            total = 0.0
            for step in itertools.product(range(-radius, radius + 1), repeat=dims):
                centre = tuple(v + s for v, s in zip(voxel, step))
                if any(c < 0 or c >= n for c, n in zip(centre, image.shape)):
                    continue  # the box sum's zero padding
                a = value(tuple(c + dilation * o for c, o in zip(centre, p)))
                b = value(tuple(c + dilation * o for c, o in zip(centre, q)))
                total += (a - b) ** 2
            out[(k,) + voxel] = total / (2 * radius + 1) ** dims
    out = out - out.min(0, keepdims=True)
    variance = out.mean(0, keepdims=True)
    scale = variance.mean()
    variance = np.clip(variance, 0.001 * scale, 1000 * scale)
    return np.exp(-out / variance)


def _blobs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A piecewise-smooth 'anatomy' of three tissue classes, ``(1, 1, *shape)`` integer labels 0..3."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 1) + shape, generator=generator)
    pool = F.avg_pool2d if len(shape) == 2 else F.avg_pool3d
    for _ in range(3):
        noise = pool(noise, 5, 1, 2)
    noise = (noise - noise.mean()) / noise.std()
    return (noise > -0.8).long() + (noise > 0.0).long() + (noise > 0.8).long()


def _contrast(labels: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[labels]


@pytest.mark.parametrize("shape, radius, dilation", [((9, 11), 1, 2), ((6, 7, 5), 1, 1)])
def test_mind_ssc_equals_its_definition(shape, radius, dilation):
    image = torch.rand((1, 1) + shape, generator=torch.Generator().manual_seed(0))
    expected = _reference_mind(image[0, 0].numpy(), radius, dilation)
    features = mind_ssc(image, radius, dilation)
    assert features.shape == (1, 12 if len(shape) == 3 else 4) + shape
    np.testing.assert_allclose(features[0].double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_mind_loss_gradient_matches_finite_differences():
    generator = torch.Generator().manual_seed(1)
    fixed = torch.rand(1, 1, 7, 8, 6, generator=generator, dtype=torch.float64)
    moving = torch.rand(1, 1, 7, 8, 6, generator=generator, dtype=torch.float64).requires_grad_(True)
    loss = MINDSSCLoss(radius=1, dilation=1)
    assert torch.autograd.gradcheck(lambda m: loss(m, fixed), (moving,), eps=1e-6, atol=1e-6)
    kept = loss(moving, fixed, loss.target_sums(fixed))
    assert torch.equal(kept, loss(moving, fixed))  # the fixed descriptors kept by the refiner: the same value


@pytest.mark.parametrize("shape", [(40, 44), (20, 22, 18)])
def test_mind_is_invariant_to_monotonic_and_non_monotonic_remaps(shape):
    labels = _blobs(shape, seed=2)
    t1 = _contrast(labels, (0.0, 0.3, 0.6, 0.9))
    monotonic = _contrast(labels, (0.0, 0.1, 0.2, 0.95))  # the same order, other spacing
    pd_like = _contrast(labels, (0.0, 0.6, 1.0, 0.5))  # the middle class brightest: non-monotonic
    other_anatomy = _contrast(_blobs(shape, seed=3), (0.0, 0.3, 0.6, 0.9))
    mind, lncc = MINDSSCLoss(1, 1), BoxLNCCLoss(len(shape), 5)
    unrelated = float(mind(other_anatomy, t1))
    for remapped in (monotonic, pd_like):
        assert float(mind(remapped, t1)) < 0.35 * unrelated  # same anatomy: far closer than other anatomy
    # LNCC sees the non-monotonic contrast as a worse match than the same contrast of another anatomy can be
    assert float(lncc(pd_like, t1)) > -0.75 > float(lncc(monotonic, t1))


def test_mind_across_contrasts_is_lowest_at_the_true_shift_and_the_refinement_moves_towards_it():
    labels = _blobs((48, 52), seed=4)
    fixed = _contrast(labels, (0.0, 0.3, 0.6, 0.9))
    moved = torch.roll(labels, shifts=(2, -2), dims=(2, 3))  # moving(x) = fixed(x - (2, -2)): displacement (2, -2)
    moving = _contrast(moved, (0.0, 0.6, 1.0, 0.5))  # PD-like: the middle class brightest
    loss = MINDSSCLoss(1, 2)
    shifts = list(itertools.product(range(-3, 4), repeat=2))
    values = {
        shift: float(loss(torch.roll(moving, shifts=(-shift[0], -shift[1]), dims=(2, 3)), fixed)) for shift in shifts
    }
    assert min(values, key=values.get) == (2, -2)
    refiner = VelocityRefiner(
        levels=[2, 1], iterations=[60, 30], similarity="mind", regularization_weight=0.05, integration_steps=4
    )
    result = refiner.refine(torch.zeros(1, 2, 24, 26), moving, fixed, field_factor=2)
    ddf = F.interpolate(result.ddf, size=(48, 52), mode="bilinear", align_corners=False) * 2
    interior = ddf[0, :, 8:-8, 8:-8].reshape(2, -1).mean(1)
    truth = torch.tensor([2.0, -2.0])
    assert float((interior - truth).norm()) < 0.75 * float(truth.norm()), interior  # part of the way, no further
    assert result.report["levels"][-1]["similarity_end"] < result.report["levels"][-1]["similarity_start"]


def test_refinement_similarity_is_checked():
    with pytest.raises(ValueError, match="one of"):
        VelocityRefiner(similarity="nmi")


def test_contrast_cases_reorder_the_tissues_deterministically():
    labels = _blobs((30, 34, 28), seed=5)
    t1 = _contrast(labels, (0.0, 0.2, 0.45, 0.8))[0, 0].numpy()
    np.testing.assert_allclose(tissue_means(t1[t1 > 0]), [0.2, 0.45, 0.8], atol=1e-6)
    for kind in ("pd", "t2"):
        out = remap_contrast(t1, kind, seed=0)
        assert np.array_equal(out, remap_contrast(t1, kind, seed=0))
        assert not np.array_equal(out, remap_contrast(t1, kind, seed=1))
        assert np.all(out[t1 == 0] == 0)  # the background stays empty
        csf, grey, white = (float(np.median(out[labels[0, 0].numpy() == k])) for k in (1, 2, 3))
        if kind == "pd":  # grey matter brightest
            assert grey > max(csf, white), (csf, grey, white)
        else:  # T1's order reversed
            assert csf > grey > white, (csf, grey, white)
    with pytest.raises(ValueError, match="contrast kind"):
        remap_contrast(t1, "flair", seed=0)


def test_contrast_mapping_recovers_a_non_monotonic_contrast():
    """``g = E[f | m]`` maps a PD-like copy of a piecewise-constant image back onto the fixed contrast exactly
    (each tissue one moving intensity), scaled as the preprocessing scales; the background stays 0."""
    from scripts.contrast_map import conditional_mean_map

    labels = _blobs((30, 34, 28), seed=6)
    fixed = _contrast(labels, (0.0, 0.25, 0.5, 1.0))
    moving = _contrast(labels, (0.0, 0.6, 1.0, 0.45))
    mapped = conditional_mean_map(moving, fixed)
    top = float(torch.kthvalue(fixed.flatten(), int(0.995 * fixed.numel())).values)
    torch.testing.assert_close(mapped, torch.clamp(fixed / top, 0, 1))
    lncc = BoxLNCCLoss(3, 5)
    assert float(lncc(mapped, fixed)) < float(lncc(moving, fixed)) - 0.1  # what the LNCC refinement then sees
    empty = conditional_mean_map(torch.zeros_like(moving), fixed)
    assert torch.equal(empty, torch.zeros_like(moving))
    # a non-contiguous image (a NIfTI array is Fortran-ordered; a transposed view) maps as its contiguous copy
    strided_moving, strided_fixed = moving.transpose(2, 4), fixed.transpose(2, 4)
    assert not strided_moving.is_contiguous()
    torch.testing.assert_close(conditional_mean_map(strided_moving, strided_fixed), mapped.transpose(2, 4))
    with pytest.raises(ValueError, match="one grid"):
        conditional_mean_map(moving, fixed[..., :-1])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_multimodal_flag_maps_the_contrast_before_the_network(spatial_dims):
    """``--multimodal true`` (a contract): the evaluation step maps the moving contrast; the default does not;
    anything but true/false is refused naming the flag."""
    from conftest import CONFIGS
    from monai.bundle import ConfigParser

    def parsed(overrides: dict) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "inference.yaml"))
        parser.update({"spatial_dims": spatial_dims, **overrides})
        return parser

    assert parsed({}).get_parsed_content("infer#step").contrast_mapping is False
    step = parsed({"multimodal": "true"}).get_parsed_content("infer#step")  # as the command line gives it
    assert step.contrast_mapping is True and step.refiner.similarity == "lncc" and step.network_passes == 1
    with pytest.raises(Exception) as error:
        parsed({"multimodal": "perhaps"}).get_parsed_content("infer#step")
    assert "--multimodal expects true or false, got 'perhaps'" in repr(error.value.__cause__ or error.value)


@pytest.mark.skipif(not (SHARED_DATA / "oasis2d_train").is_dir(), reason=f"oasis2d_train not found under {SHARED_DATA}")
def test_multimodal_registers_a_t2_like_slice_onto_a_t1_slice(tmp_path):
    """A real training slice (oasis2d_train, not a test subject) made T2-like onto another subject's T1 slice, by the
    README's command: the default collapses (the T1 network and LNCC see another contrast), --multimodal registers."""
    from contrast_cases import make_contrast_case

    data = SHARED_DATA / "oasis2d_train"
    moving = make_contrast_case(str(data / "OAS1_0011_image.nii.gz"), str(tmp_path), "t2", seed=0)
    dice = {}
    for name, extra in (("default", {}), ("multimodal", {"multimodal": "true"})):
        overrides = {
            "fixed_image": data / "OAS1_0012_image.nii.gz",
            "moving_image": moving,
            "fixed_label": data / "OAS1_0012_label.nii.gz",
            "moving_label": data / "OAS1_0011_label.nii.gz",
            "output_dir": tmp_path / name,
            **extra,
        }
        process = run_bundle("inference", ["bundle/configs/inference.yaml"], overrides, timeout=600)
        assert process.returncode == 0, process.stderr[-2000:]
        record = json.loads((tmp_path / name / "metrics.json").read_text())
        dice[name] = (record["identity_mean_dice"], record["registered_mean_dice"], record["folding_fraction"])
    identity = dice["default"][0]
    assert dice["multimodal"][1] > identity + 0.05, dice
    assert dice["multimodal"][1] > dice["default"][1] + 0.2, dice
    assert dice["multimodal"][2] < 0.0005, dice  # folded voxels < 0.05 %
