"""Warping, integration and deformation metrics on fields with known answers."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from scipy import ndimage
from monai.networks.blocks import Warp
from monai.networks.nets import VoxelMorphUNet
from scripts.metrics import deformation_stats, dice_per_label, hd95_per_label, jacobian_determinant, labels_to_score
from scripts.network import RegistrationNet


def _blob(shape, centre, radius=4.0):
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (sum((g - c) ** 2 for g, c in zip(grids, centre)) < radius**2).astype(np.float32)


@pytest.mark.parametrize("shape", [(32, 28), (20, 24, 16)])
def test_identity_ddf_leaves_image_unchanged(shape):
    image = torch.rand((1, 1) + shape, generator=torch.Generator().manual_seed(0))
    ddf = torch.zeros((1, len(shape)) + shape)
    for mode in ("bilinear", "nearest"):
        torch.testing.assert_close(Warp(mode=mode, padding_mode="border")(image, ddf), image)


@pytest.mark.parametrize("shape, shift", [((40, 40), (3, -5)), ((24, 28, 20), (2, 4, -3))])
def test_translation_ddf_moves_blob_by_that_amount(shape, shift):
    centre = [s // 2 for s in shape]
    moving = torch.as_tensor(_blob(shape, centre))[None, None]
    # warped(x) = moving(x + u): a constant u = -shift moves content by +shift
    ddf = torch.stack([torch.full(shape, -float(s)) for s in shift])[None]
    warped = Warp(mode="nearest", padding_mode="zeros")(moving, ddf)[0, 0].numpy()
    expected = _blob(shape, [c + s for c, s in zip(centre, shift)])
    np.testing.assert_array_equal(warped, expected)
    moved_centre = np.argwhere(warped > 0).mean(axis=0)
    np.testing.assert_allclose(moved_centre, np.array(centre) + np.array(shift), atol=1e-6)


def test_jacobian_of_known_fields():
    shape = (16, 18, 14)
    assert deformation_stats(np.zeros((3,) + shape))["folding_fraction"] == 0.0
    np.testing.assert_allclose(jacobian_determinant(np.zeros((3,) + shape)), 1.0)
    grids = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    np.testing.assert_allclose(jacobian_determinant(0.1 * grids), 1.1**3)  # uniform scaling
    stats = deformation_stats(0.1 * grids)
    assert stats["folding_fraction"] == 0.0 and stats["std_log_jacobian"] < 1e-9


@pytest.mark.parametrize("shape", [(37, 11, 9), (21, 13)])
def test_slab_wise_stats_equal_numpy_on_the_whole_field(shape):
    """det J and its statistics are computed in slabs of the first axis (for speed); every value must be what
    np.gradient on the whole field gives, slab borders and the field's own border included, folds included."""
    rng = np.random.default_rng(0)
    ddf = rng.normal(scale=0.8, size=(len(shape),) + shape)  # rough enough to fold some voxels
    gradients = [np.gradient(ddf[i]) for i in range(len(shape))]
    jac = np.array([[gradients[i][j] + (i == j) for j in range(len(shape))] for i in range(len(shape))])
    expected = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    np.testing.assert_allclose(jacobian_determinant(ddf), expected, rtol=1e-9, atol=1e-9)
    stats = deformation_stats(ddf)
    assert 0.0 < stats["folding_fraction"] < 1.0
    assert stats["folding_fraction"] == pytest.approx(np.mean(expected <= 0), abs=1e-12)
    assert stats["std_log_jacobian"] == pytest.approx(np.log(expected[expected > 0]).std(), rel=1e-9)
    assert stats["sdlogj_learn2reg"] == pytest.approx(np.log(np.clip(expected + 3, 1e-9, 1e9)).std(), rel=1e-9)


def test_folding_fraction_positive_for_a_folding_field():
    shape = (32, 32)
    rows = np.arange(shape[0], dtype=float)[:, None] * np.ones(shape)
    # φ_0(x) = x_0 + u_0 with u_0 = -2 x_0 inside a band: d φ_0 / d x_0 = -1 there, the grid folds over itself
    ddf = np.zeros((2,) + shape)
    ddf[0, 10:20] = -2.0 * rows[10:20]
    stats = deformation_stats(ddf)
    assert 0.2 < stats["folding_fraction"] < 0.45
    assert np.isfinite(stats["sdlogj_learn2reg"])
    assert deformation_stats(np.zeros((2,) + shape))["folding_fraction"] == 0.0


def test_dice_skips_labels_absent_from_either_image_and_scores_per_label():
    fixed = np.zeros((10, 10), dtype=int)
    moving = np.zeros((10, 10), dtype=int)
    fixed[:5], moving[:5] = 1, 1  # label 1 identical
    fixed[5:, :5], moving[5:, :4] = 2, 2  # label 2 partially overlapping
    fixed[9, 9] = 7  # only in fixed: skipped
    moving[0, 0] = 255  # only in moving (overwrites a label-1 voxel): skipped
    ids = labels_to_score(fixed, moving, None)
    assert ids == [1, 2]
    scores = dice_per_label(fixed, moving, ids)
    assert scores[1] == pytest.approx(2 * 49 / (50 + 49))
    assert scores[2] == pytest.approx(2 * 20 / (25 + 20))
    assert labels_to_score(fixed, moving, [2, 7]) == [2]
    assert dice_per_label(fixed, np.zeros_like(fixed), [1]) == {1: 0.0}


def test_dice_counts_every_id_at_once_as_one_comparison_per_id_does():
    """The bincount path (non-negative integer maps) and the per-id comparisons (float maps, negative ids) agree."""
    rng = np.random.default_rng(0)
    fixed = rng.choice([0, 2, 3, 41, 255], size=(20, 24, 16))
    warped = np.where(rng.random(fixed.shape) < 0.7, fixed, rng.choice([0, 2, 3, 41, 77], size=fixed.shape))
    ids = [2, 3, 41, 255, 77, 1000]  # 77 only warped, 1000 in neither
    counted = dice_per_label(fixed.astype(np.int16), warped.astype(np.int16), ids)
    compared = dice_per_label(fixed.astype(np.float32), warped.astype(np.float32), ids)
    assert counted == pytest.approx(compared, abs=1e-12) and counted[1000] == 0.0 and counted[77] == 0.0
    assert 0.5 < counted[2] < 0.95
    assert labels_to_score(fixed.astype(np.uint8), warped.astype(np.uint8), None) == [2, 3, 41, 255]
    assert labels_to_score(fixed - 1, warped - 1, None) == [-1, 1, 2, 40, 254]  # negative ids: np.unique


def test_hd95_known_shift():
    fixed = _blob((40, 40), (20, 20), radius=8).astype(int)
    shifted = _blob((40, 40), (23, 20), radius=8).astype(int)
    distance = hd95_per_label(fixed, shifted, [1])[1]
    assert 1.5 <= distance <= 3.0
    assert hd95_per_label(fixed, fixed, [1])[1] == 0.0
    assert hd95_per_label(fixed, shifted, [1], spacing=[2.0, 2.0])[1] == pytest.approx(2 * distance)


@pytest.mark.parametrize("dtype", [np.int32, np.float32], ids=["ids-boxed-in-one-pass", "per-id-fallback"])
def test_hd95_of_many_structures_equals_monai_on_the_whole_volume(dtype):
    """Cropping to each structure's box (found in one pass for integer maps) and scoring structures side by side give
    MONAI's value on the full volume; an id absent from one map is NaN, as is one absent from both."""
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(5)
    fixed = ndimage.zoom(rng.integers(0, 6, (6, 7, 5)), 5, order=0)  # blocky structures 1..5 (0: background)
    warped = np.roll(fixed, (2, -1, 1), axis=(0, 1, 2))
    warped[warped == 4] = 0  # structure 4 lost in the warped map
    ids = [1, 2, 3, 4, 5, 9]
    scores = hd95_per_label(fixed.astype(dtype), warped.astype(dtype), ids, spacing=[1.0, 2.0, 1.5])
    assert list(scores) == ids
    assert np.isnan(scores[4]) and np.isnan(scores[9])
    for label in (1, 2, 3, 5):
        full = compute_hausdorff_distance(
            torch.as_tensor(warped == label)[None, None],
            torch.as_tensor(fixed == label)[None, None],
            percentile=95,
            spacing=[1.0, 2.0, 1.5],
        )
        assert scores[label] == pytest.approx(float(full), abs=1e-6), label
        assert scores[label] > 0


@pytest.mark.parametrize("spatial_dims, shape", [(2, (40, 52)), (3, (20, 24, 18))])
@pytest.mark.parametrize("steps", [0, 7])
def test_network_takes_one_tensor_returns_ddf_of_input_size_near_identity(spatial_dims, shape, steps):
    torch.manual_seed(0)
    backbone = VoxelMorphUNet(
        spatial_dims=spatial_dims, in_channels=2, unet_out_channels=8, channels=(8, 8, 8, 8), final_conv_channels=(8,)
    )
    net = RegistrationNet(backbone, spatial_dims=spatial_dims, integration_steps=steps, divisor=8)
    ddf = net(torch.rand((2, 2) + shape))
    assert ddf.shape == (2, spatial_dims) + shape
    assert ddf.abs().max() < 1e-2  # flow head initialised near zero: training starts at the identity
    with pytest.raises(ValueError, match="expected cat\\(moving, fixed\\)"):
        net(torch.rand((1, 1) + shape))


def test_scaling_and_squaring_gives_invertible_field_where_plain_displacement_folds():
    """The same large, rough velocity: integrated it does not fold, used directly as a displacement it does."""
    rng = np.random.default_rng(1)
    shape = (64, 64)
    smooth = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 4) for _ in range(2)])
    velocity = torch.as_tensor(smooth / np.abs(smooth).max() * 10.0, dtype=torch.float32)[None]

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return velocity

    plain = RegistrationNet(Fixed(), spatial_dims=2, integration_steps=0, divisor=1, flow_init_std=None)
    integrated = RegistrationNet(Fixed(), spatial_dims=2, integration_steps=7, divisor=1, flow_init_std=None)
    x = torch.zeros(1, 2, *shape)
    assert deformation_stats(plain(x)[0].numpy())["folding_fraction"] > 0.01
    assert deformation_stats(integrated(x)[0].detach().numpy())["folding_fraction"] < 0.001


def test_trainer_refuses_a_non_finite_loss_before_updating_weights():
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.losses import BendingEnergyLoss
    from scripts.registration_step import FiniteLossGuard, RegistrationBatch, RegistrationLoss

    class Batches:  # 3 pairs an epoch; the 7th served (epoch 3, iteration 7) has a NaN voxel
        served = 0

        def __len__(self):
            return 3

        def __iter__(self):
            for _ in range(3):
                Batches.served += 1
                fixed = torch.rand(1, 1, 16, 16)
                if Batches.served == 7:
                    fixed[0, 0, 3, 3] = float("nan")
                moving = torch.rand(1, 1, 16, 16)
                yield {"fixed_image": fixed, "moving_image": moving, "fixed_name": ["f"], "moving_name": ["m"]}

    torch.manual_seed(0)
    backbone = VoxelMorphUNet(
        spatial_dims=2, in_channels=2, unet_out_channels=8, channels=(8, 8, 8, 8), final_conv_channels=(8,)
    )
    network = RegistrationNet(backbone, spatial_dims=2, divisor=4)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=5,
        train_data_loader=Batches(),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        loss_function=RegistrationLoss(torch.nn.MSELoss(), BendingEnergyLoss()),
        prepare_batch=RegistrationBatch(),
        train_handlers=[FiniteLossGuard()],
        decollate=False,
    )
    after: dict = {}
    losses: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _keep(engine):
        losses.append(float(engine.state.output["loss"]))
        after.update({k: v.clone() for k, v in network.state_dict().items()})

    with pytest.raises(
        FloatingPointError, match=re.escape("non-finite loss at epoch 3, iteration 7 (pair ['m'] -> ['f'])")
    ):
        trainer.run()
    assert len(losses) == 6 and np.isfinite(losses).all()
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, after[key])  # the non-finite loss updated nothing


def test_onednn_conv3d_gives_the_plain_convolution_and_its_gradients_and_is_used_by_the_network():
    """The brain network's few-channel 3D layers are routed to oneDNN on the CPU (scripts.conv_backend): same
    values and gradients as nn.Conv3d, same state dict, and every 3D convolution of the network is routed."""
    from scripts.conv_backend import OneDnnConv3d

    torch.manual_seed(0)
    plain = torch.nn.Conv3d(2, 8, 3, padding=1)
    routed = OneDnnConv3d(2, 8, 3, padding=1)
    routed.load_state_dict(plain.state_dict())
    image = torch.randn(1, 2, 20, 24, 28)
    outputs, grads = [], []
    for layer in (plain, routed):
        x = image.clone().requires_grad_(True)
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append((x.grad, layer.weight.grad, layer.bias.grad))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for routed_grad, plain_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(routed_grad, plain_grad, rtol=1e-5, atol=1e-4)
    with torch.profiler.profile() as profile:
        routed(image)
    assert "aten::mkldnn_convolution" in {event.key for event in profile.key_averages()}

    backbone = VoxelMorphUNet(3, 2, 16, (8, 16, 16, 16, 16, 16), (8, 8))
    reference = copy.deepcopy(backbone)
    net = RegistrationNet(backbone, 3, integration_steps=3, flow_init_std=0.1)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(type(m) is OneDnnConv3d for m in convs)
    reference.load_state_dict(net.backbone.state_dict())  # same keys: shipped checkpoints still load
    pair = torch.randn(1, 2, 32, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(net.backbone(pair), reference(pair), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_label_wise_linear_warp_is_the_argmax_of_each_labels_interpolated_mask(dims):
    """``warp_label_linear`` (the inference's warped_label) equals interpolating every label's mask with
    ``grid_sample`` and keeping the largest, without building the masks; it differs from nearest neighbour."""
    from scripts.integrate import identity_grid, warp_label_linear

    generator = torch.Generator().manual_seed(dims)
    shape_in, shape_out = [12, 10, 9][:dims], [20, 17, 15][:dims]
    label = torch.randint(0, 5, (1, 1, *shape_in), generator=generator).float()
    grid = identity_grid(shape_out) * 1.1 + 0.03 * torch.randn(1, *shape_out, dims, generator=generator)
    ours = warp_label_linear(label, grid)[0, 0]
    masks = [
        torch.nn.functional.grid_sample((label == i).float(), grid, mode="bilinear", align_corners=True)[0, 0]
        for i in range(5)
    ]
    expected = torch.stack(masks).argmax(0).float()
    inside = (grid.abs() <= 1).all(-1)[0]
    assert inside.float().mean() > 0.5
    assert torch.equal(ours[inside], expected[inside])
    nearest = torch.nn.functional.grid_sample(label, grid, mode="nearest", align_corners=True)[0, 0]
    assert (nearest[inside] != ours[inside]).any()
