"""Fast LNCC, grid_sample integration, the downsampling network and test-time refinement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import DVF2DDF, Warp
from monai.networks.nets import VoxelMorphUNet
from scripts.integrate import compose_ddfs, grid_sample, integrate_velocity, warp
from scripts.losses import BoxLNCCLoss, FastBendingEnergyLoss, box_sum
from scripts.metrics import deformation_stats
from scripts.network import RegistrationNet
from scripts.refine import VelocityRefiner, downsample_image
from scripts.registration_step import RegistrationEvalStep, _warp_padded


def _smooth_field(shape: tuple[int, ...], amplitude: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    field = torch.randn((1, len(shape)) + shape, generator=generator)
    pool = F.avg_pool2d if len(shape) == 2 else F.avg_pool3d
    for _ in range(3):
        field = pool(field, 5, 1, 2)
    return field / field.abs().max() * amplitude


@pytest.mark.parametrize("shape, kernel", [((30, 41), 9), ((18, 20, 22), 5)])
def test_box_lncc_equals_monai_lncc(shape, kernel):
    generator = torch.Generator().manual_seed(1)
    target = torch.rand((2, 1) + shape, generator=generator)
    pred = target + 0.5 * torch.rand((2, 1) + shape, generator=generator)
    expected = LocalNormalizedCrossCorrelationLoss(len(shape), kernel_size=kernel)(pred, target)
    torch.testing.assert_close(BoxLNCCLoss(len(shape), kernel)(pred, target), expected, rtol=1e-4, atol=1e-5)
    assert BoxLNCCLoss(len(shape), kernel)(target, target) < -0.99  # identical images: perfect correlation
    # the target's window sums kept by a caller (refinement, once per level) give the same loss and gradient
    loss = BoxLNCCLoss(len(shape), kernel)
    moving = pred.clone().requires_grad_(True)
    kept = loss(moving, target, loss.target_sums(target))
    (kept_grad,) = torch.autograd.grad(kept, moving)
    recomputed = loss(moving, target)
    (recomputed_grad,) = torch.autograd.grad(recomputed, moving)
    assert torch.equal(kept, recomputed) and torch.equal(kept_grad, recomputed_grad)
    assert not torch.equal(loss(moving, target, loss.target_sums(pred.detach())), recomputed)  # the sums are used


@pytest.mark.parametrize("shape", [(30, 41), (16, 20, 18)])
def test_grid_sample_integration_and_warp_equal_monai(shape):
    velocity = _smooth_field(shape, amplitude=4.0)
    torch.testing.assert_close(integrate_velocity(velocity, 5), DVF2DDF(num_steps=5)(velocity), rtol=1e-4, atol=1e-4)
    image = torch.rand((1, 1) + shape, generator=torch.Generator().manual_seed(2))
    ddf = DVF2DDF(num_steps=5)(velocity)
    torch.testing.assert_close(warp(image, ddf), Warp(mode="bilinear", padding_mode="border")(image, ddf))
    labels = torch.randint(0, 5, (1, 1) + shape, generator=torch.Generator().manual_seed(3)).float()
    torch.testing.assert_close(
        warp(labels, ddf, mode="nearest", padding_mode="zeros"), Warp(mode="nearest", padding_mode="zeros")(labels, ddf)
    )


@pytest.mark.parametrize("shape", [(13, 7), (11, 6, 5), (2, 9, 4)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_threaded_grid_sample_equals_torch_values_and_gradients(shape, mode):
    """One pair cut into per-thread slabs (rows not a multiple of the thread count) gives torch's own answer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        generator = torch.Generator().manual_seed(4)
        image = torch.rand((1, 3) + shape, generator=generator, requires_grad=True)
        grid = (torch.rand((1,) + shape + (len(shape),), generator=generator) * 2.4 - 1.2).requires_grad_(True)
        expected = F.grid_sample(image, grid, mode=mode, padding_mode="border", align_corners=True)
        sampled = grid_sample(image, grid, mode=mode, padding_mode="border")
        torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
        weights = torch.rand(expected.shape, generator=generator)
        expected_grads = torch.autograd.grad((expected * weights).sum(), [image, grid])
        grads = torch.autograd.grad((sampled * weights).sum(), [image, grid])
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(2, 2, 9, 12), (1, 3, 7, 8, 9)])
def test_fast_bending_energy_equals_monai_value_and_gradient(shape):
    field = _smooth_field(shape[2:], amplitude=3.0).repeat(shape[0], 1, *([1] * (len(shape) - 2)))
    field = (field + 0.1 * torch.rand(shape, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    expected = BendingEnergyLoss()(field)
    energy = FastBendingEnergyLoss()(field)
    torch.testing.assert_close(energy, expected)
    (expected_grad,) = torch.autograd.grad(2.5 * expected, field)
    (grad,) = torch.autograd.grad(2.5 * energy, field)
    torch.testing.assert_close(grad, expected_grad)
    assert FastBendingEnergyLoss()(torch.zeros(shape)) == 0  # an affine field (here zero) bends nothing
    with pytest.raises(ValueError, match="longer than 2"):
        FastBendingEnergyLoss()(torch.zeros(1, 2, 2, 9))


def test_box_sum_gradient_is_the_box_sum_of_the_gradient():
    """The box sum is symmetric (its own adjoint): the written-out backward equals autograd's through the slices."""
    generator = torch.Generator().manual_seed(6)
    volumes = torch.rand(1, 2, 9, 8, 7, generator=generator, requires_grad=True)
    weights = torch.rand(1, 2, 9, 8, 7, generator=generator)
    (grad,) = torch.autograd.grad((box_sum(volumes, 5) * weights).sum(), volumes)
    direct = volumes.detach().clone().requires_grad_(True)
    total = torch.zeros_like(weights)
    for shift in torch.cartesian_prod(*[torch.arange(-2, 3)] * 3).tolist():  # sum of the 125 shifted copies
        padded = F.pad(direct, [2] * 6)
        total = (
            total
            + padded[:, :, 2 + shift[0] : 11 + shift[0], 2 + shift[1] : 10 + shift[1], 2 + shift[2] : 9 + shift[2]]
        )
    torch.testing.assert_close(box_sum(volumes, 5), total.detach(), rtol=1e-5, atol=1e-5)
    (expected,) = torch.autograd.grad((total * weights).sum(), direct)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def test_downsampling_network_runs_its_backbone_on_block_averages():
    torch.manual_seed(0)  # deterministic weights and input (unseeded, the mean check below varied run to run)
    backbone = VoxelMorphUNet(3, 2, 8, (8, 8, 8, 8), (8,))
    network = RegistrationNet(backbone, 3, integration_steps=3, divisor=8, flow_init_std=0.1, downsample=2).eval()
    x = torch.rand(1, 2, 34, 30, 20)
    with torch.no_grad():
        velocity = network.velocity(x)
        assert velocity.shape == (1, 3, 17, 15, 10)
        ddf = network(x)
        assert ddf.shape == (1, 3, 34, 30, 20)
        # the same weights on the averaged images at downsample 1 give the same velocity
        network.downsample = 1
        torch.testing.assert_close(network.velocity(F.avg_pool3d(x, 2)), velocity)
        # the upsampled DDF is in input voxels: twice the coarse displacement
        coarse = integrate_velocity(velocity, 3)
        torch.testing.assert_close(ddf[:, :, 1::2, 1::2, 1::2].mean(), 2 * coarse.mean(), rtol=0.05, atol=1e-4)


def _synthetic_pair(shape=(32, 36, 28)) -> tuple[torch.Tensor, torch.Tensor]:
    """A blob image and the same image under a known smooth diffeomorphism."""
    generator = torch.Generator().manual_seed(3)
    image = torch.rand((1, 1) + shape, generator=generator)
    for _ in range(2):
        image = F.avg_pool3d(image, 5, 1, 2)
    image = (image - image.min()) / (image.max() - image.min())
    moved = warp(image, integrate_velocity(_smooth_field(shape, amplitude=3.0, seed=4), 5))
    return moved, image


def test_truncated_integration_gradient_keeps_the_value_and_approximates_the_gradient():
    """differentiated_steps=K: exp(v) itself unchanged; the gradient close to the exact one for a moderate field,
    not equal to it (the truncation is in effect), and exact for K = steps."""
    velocity = _smooth_field((20, 18, 16), amplitude=2.0, seed=7)
    weights = torch.rand(velocity.shape, generator=torch.Generator().manual_seed(8))

    def value_and_gradient(differentiated_steps):
        field = velocity.clone().requires_grad_()
        ddf = integrate_velocity(field, 5, differentiated_steps=differentiated_steps)
        (ddf * weights).sum().backward()
        return ddf.detach(), field.grad

    exact_ddf, exact_grad = value_and_gradient(None)
    for steps in (5, 2, 0):
        ddf, grad = value_and_gradient(steps)
        torch.testing.assert_close(ddf, exact_ddf, rtol=0, atol=0)
        cosine = F.cosine_similarity(grad.flatten(), exact_grad.flatten(), dim=0)
        if steps == 5:
            torch.testing.assert_close(grad, exact_grad)
        else:
            assert not torch.allclose(grad, exact_grad)
        if steps == 2:  # direction and size both close (a missing 2^-K factor would scale it 4x)
            assert cosine > 0.995, float(cosine)
            assert abs(float(grad.norm() / exact_grad.norm()) - 1) < 0.05
    with torch.no_grad():  # no graph: the plain integration
        torch.testing.assert_close(integrate_velocity(velocity, 5, differentiated_steps=2), exact_ddf)


@pytest.mark.parametrize("differentiated_squarings", [None, 2])
def test_refinement_lowers_the_loss_and_keeps_the_field_unfolded(differentiated_squarings):
    moving, fixed = _synthetic_pair()
    refiner = VelocityRefiner(
        levels=(2, 1),
        iterations=(30, 15),
        learning_rate=0.1,
        kernel_size=5,
        differentiated_squarings=differentiated_squarings,
    )
    start = torch.zeros(1, 3, *fixed.shape[2:])
    refined, report = refiner(start, moving, fixed, field_factor=1)
    assert [level["factor"] for level in report["levels"]] == [2, 1]
    before, _ = refiner.level_loss(start, moving, fixed, 1, 1)
    after, _ = refiner.level_loss(refined, moving, fixed, 1, 1)
    assert after < before - 0.05, (float(before), float(after))
    for level in report["levels"]:
        assert level["loss_end"] < level["loss_start"]
    ddf = integrate_velocity(refined, 5)
    assert deformation_stats(ddf[0].numpy())["folding_fraction"] == 0.0
    # the registered image is closer to the fixed one than the moving image was
    assert (warp(moving, ddf) - fixed).abs().mean() < 0.8 * (moving - fixed).abs().mean()


def test_zero_iterations_leave_the_network_field_unchanged():
    moving, fixed = _synthetic_pair((16, 16, 16))
    field = _smooth_field((8, 8, 8), amplitude=1.0)
    refiner = VelocityRefiner(levels=(4, 2), iterations=0)
    assert not refiner.enabled
    refined, report = refiner(field, moving, fixed, field_factor=2)
    torch.testing.assert_close(refined, field)
    assert report["levels"] == []


def test_refinement_settings_are_checked():
    with pytest.raises(ValueError, match="one count per level"):
        VelocityRefiner(levels=(4, 2), iterations=(10,))
    with pytest.raises(ValueError, match="levels must be >= 1"):
        VelocityRefiner(levels=(0,), iterations=(10,))
    with pytest.raises(ValueError, match="one positive step for all levels"):
        VelocityRefiner(levels=(4, 2), iterations=(10, 5), learning_rate=(0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="one positive step for all levels"):
        VelocityRefiner(levels=(4, 2), iterations=(10, 5), learning_rate=(0.1, 0.0))


def test_a_learning_rate_per_level_sets_each_levels_step():
    """Adam moves each component by about the learning rate an iteration: a level with a tiny step leaves the field
    where the level before left it, and a level's larger step carries it further."""
    moving, fixed = _synthetic_pair((16, 16, 16))
    start = torch.zeros(1, 3, 16, 16, 16)
    first_only, _ = VelocityRefiner(levels=(2,), iterations=(10,), learning_rate=0.1)(start, moving, fixed)
    frozen_second, _ = VelocityRefiner(levels=(2, 1), iterations=(10, 10), learning_rate=(0.1, 1e-9))(
        start, moving, fixed
    )
    torch.testing.assert_close(frozen_second, first_only, atol=1e-6, rtol=0)
    slow, _ = VelocityRefiner(levels=(2,), iterations=(5,), learning_rate=0.05)(start, moving, fixed)
    fast, _ = VelocityRefiner(levels=(2,), iterations=(5,), learning_rate=(0.2,))(start, moving, fixed)
    assert 0 < slow.abs().max() <= 1.05 * 5 * 0.05 < fast.abs().max() <= 1.05 * 5 * 0.2


def test_downsample_image_averages_blocks():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert downsample_image(image, 2)[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4
    assert downsample_image(torch.ones(1, 1, 5, 5, 5), 2).shape == (1, 1, 3, 3, 3)


def test_composed_ddf_warps_as_the_two_warps_in_turn():
    """compose_ddfs(a, b): warping by it is warping by a, then by b (one interpolation); translations add."""
    shape = (24, 26, 22)
    first, second = _smooth_field(shape, 2.0, seed=5), _smooth_field(shape, 2.0, seed=6)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    image = (torch.sin(z / 3.0) * torch.cos(y / 4.0) + torch.sin(x / 3.5))[None, None]  # smooth: little blur
    in_turn = warp(warp(image, first), second)
    inside = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # away from the border padding
    composed_error = (warp(image, compose_ddfs(first, second)) - in_turn)[inside].abs()
    added_error = (warp(image, first + second) - in_turn)[inside].abs()  # adding the fields is not composing
    assert composed_error.mean() < 0.3 * added_error.mean(), (float(composed_error.mean()), float(added_error.mean()))
    assert composed_error.max() < 0.3 * added_error.max(), (float(composed_error.max()), float(added_error.max()))
    shift_a = torch.tensor([1.5, -2.0, 0.5]).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    shift_b = torch.tensor([-0.5, 1.0, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    torch.testing.assert_close(compose_ddfs(shift_a, shift_b), shift_a + shift_b)


class _ConstantShift(torch.nn.Module):
    """A stand-in network: always the same translation, and a record of the moving images it was given."""

    def __init__(self, shift: list[float]) -> None:
        super().__init__()
        self.shift = torch.tensor(shift).view(1, 3, 1, 1, 1)
        self.seen: list[torch.Tensor] = []

    def forward(self, moving_fixed: torch.Tensor) -> torch.Tensor:
        self.seen.append(moving_fixed[:, :1].clone())
        return self.shift.expand(1, 3, *moving_fixed.shape[2:]).clone()


def test_network_passes_register_the_warped_moving_image_again_and_compose():
    moving, fixed = _synthetic_pair((20, 22, 18))
    network = _ConstantShift([1.0, -1.0, 0.5])
    ddf, seconds = RegistrationEvalStep(network_passes=2).network_ddf(network, moving, fixed, [])
    assert len(network.seen) == 2 and seconds > 0
    torch.testing.assert_close(network.seen[0], moving)
    torch.testing.assert_close(network.seen[1], warp(moving, network.shift.expand_as(ddf)))  # the second pass' input
    torch.testing.assert_close(ddf, 2 * network.shift.expand_as(ddf))  # two translations compose to their sum
    single, _ = RegistrationEvalStep().network_ddf(_ConstantShift([1.0, -1.0, 0.5]), moving, fixed, [])
    torch.testing.assert_close(single, network.shift.expand_as(ddf))
    with pytest.raises(ValueError, match="network_passes must be >= 0"):
        RegistrationEvalStep(network_passes=-1)
    with pytest.raises(ValueError, match="needs a test-time refinement"):  # no network and nothing else: refused
        RegistrationEvalStep(network_passes=0)


def test_no_network_pass_refines_from_the_identity():
    """``network_passes 0`` (``--multimodal true``): the network is not run, the refinement starts at ``v = 0`` and
    gives what the refiner gives for a zero field."""
    torch.manual_seed(0)
    moving, fixed = _synthetic_pair((32, 32, 32))
    backbone = VoxelMorphUNet(3, 2, 8, (8, 8, 8, 8), (8,))
    network = RegistrationNet(backbone, 3, integration_steps=3, divisor=8, flow_init_std=0.1, downsample=2).eval()
    refiner = VelocityRefiner(levels=(2, 1), iterations=(10, 5), integration_steps=3)
    reports: list[dict] = []
    calls = []
    network.backbone.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        ddf, _ = RegistrationEvalStep(refiner=refiner, network_passes=0).network_ddf(network, moving, fixed, reports)
    assert not calls  # the backbone never ran
    expected = refiner.refine(torch.zeros(1, 3, 16, 16, 16), moving, fixed, 2)
    torch.testing.assert_close(ddf, network.upsample_ddf(expected.ddf, (32, 32, 32)))
    assert reports[0]["levels"][0]["loss_end"] < reports[0]["levels"][0]["loss_start"]


def test_network_passes_with_refinement_refine_the_last_pass():
    """Two passes and a refiner: one refinement report, of the last pass on the once-warped pair; no folding."""
    torch.manual_seed(0)
    moving, fixed = _synthetic_pair((32, 32, 32))
    backbone = VoxelMorphUNet(3, 2, 8, (8, 8, 8, 8), (8,))
    network = RegistrationNet(backbone, 3, integration_steps=3, divisor=8, flow_init_std=0.1).eval()
    refiner = VelocityRefiner(levels=(2, 1), iterations=(10, 5), learning_rate=0.1, kernel_size=5)
    reports: list[dict] = []
    with torch.no_grad():
        ddf, _ = RegistrationEvalStep(refiner=refiner, network_passes=2).network_ddf(network, moving, fixed, reports)
        first = network(torch.cat([moving, fixed], dim=1))
    assert len(reports) == 1 and [level["factor"] for level in reports[0]["levels"]] == [2, 1]
    assert all(level["loss_end"] < level["loss_start"] for level in reports[0]["levels"])
    assert deformation_stats(ddf[0].numpy())["folding_fraction"] == 0.0
    # closer to the fixed image than the first pass alone
    assert (warp(moving, ddf) - fixed).abs().mean() < (warp(moving, first) - fixed).abs().mean()


def test_refinement_hands_over_the_integrated_field_it_evaluated_last():
    """The last level on the field's grid integrates the refined field for its closing loss; that DDF is returned and
    used by the eval step in place of a second integration: it must be exactly exp(v) of the refined field."""
    torch.manual_seed(0)
    moving, fixed = _synthetic_pair((32, 32, 32))
    backbone = VoxelMorphUNet(3, 2, 8, (8, 8, 8, 8), (8,))
    network = RegistrationNet(backbone, 3, integration_steps=4, divisor=8, downsample=2, flow_init_std=0.1).eval()
    refiner = VelocityRefiner(levels=(4, 2), iterations=(6, 3), kernel_size=3, integration_steps=4)
    with torch.no_grad():
        field = network.velocity(torch.cat([moving, fixed], dim=1))
        result = refiner.refine(field, moving, fixed, network.downsample)
        assert result.ddf is not None and torch.equal(result.ddf, network.integrate(result.field))
        reports: list[dict] = []
        ddf, _ = RegistrationEvalStep(refiner=refiner).network_ddf(network, moving, fixed, reports)
        assert torch.equal(ddf, network.upsample_ddf(network.integrate(result.field), moving.shape[2:]))
        # a finer last level integrates on the field's grid too, then upsamples: the same hand-over
        finer = VelocityRefiner(levels=(4, 1), iterations=(3, 2), kernel_size=3, integration_steps=4)
        result = finer.refine(field, moving, fixed, network.downsample)
        assert result.ddf is not None and torch.equal(result.ddf, network.integrate(result.field))
        # a last level coarser than the field's grid never integrates on it: nothing to hand over
        assert (
            VelocityRefiner(levels=(4,), iterations=(3,), integration_steps=4).refine(field, moving, fixed, 2).ddf
            is None
        )


def test_network_passes_compose_on_the_velocity_grid_as_at_full_resolution():
    """A downsampling RegistrationNet composes its passes on the coarse grid and upsamples once: the same DDF (up to
    interpolation) as upsampling each pass and composing at full resolution, at an eighth of the voxels."""
    torch.manual_seed(0)
    moving, fixed = _synthetic_pair((32, 32, 32))
    backbone = VoxelMorphUNet(3, 2, 8, (8, 8, 8, 8), (8,))
    network = RegistrationNet(backbone, 3, integration_steps=3, divisor=8, flow_init_std=0.3, downsample=2).eval()
    with torch.no_grad():
        ddf, _ = RegistrationEvalStep(network_passes=2).network_ddf(network, moving, fixed, [])
        first = network(torch.cat([moving, fixed], dim=1))
        second = network(torch.cat([warp(moving, first), fixed], dim=1))
        full_resolution = compose_ddfs(first, second)
    assert second.abs().max() > 0.5  # the passes move voxels: the check below is not between two zero fields
    inside = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    error = (ddf - full_resolution)[inside].abs()
    assert error.max() < 0.03 * full_resolution[inside].abs().max(), (
        float(error.max()),
        float(full_resolution.abs().max()),
    )


def test_later_passes_see_the_moving_image_warped_on_the_backbone_grid_with_its_zero_padding_kept():
    """A downsampling network averages its input to the coarse grid anyway, so passes after the first warp the
    averaged moving image there (``pooled_pair``) instead of warping at full resolution and averaging again; the
    zero padding up to the backbone's multiple stays zero."""
    torch.manual_seed(0)
    backbone = VoxelMorphUNet(3, 2, 8, (8, 8, 8, 8), (8,))
    network = RegistrationNet(backbone, 3, integration_steps=3, divisor=8, flow_init_std=0.3, downsample=2).eval()
    moving, fixed = _synthetic_pair((30, 34, 28))  # not multiples of 16: padded, last coarse cells partial
    pair = torch.cat([moving, fixed], dim=1)
    with torch.no_grad():
        pooled = network.pooled_pair(pair)
        assert list(pooled.shape[2:]) == [16, 24, 16]
        torch.testing.assert_close(network.velocity_from_pooled(pooled, pair.shape[2:]), network.velocity(pair))
        shift = torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1, 1).expand(1, 3, *network.coarse_shape([30, 34, 28]))
        warped = _warp_padded(pooled[:, :1], shift, RegistrationEvalStep().warp_image)
    assert warped.shape == pooled[:, :1].shape
    torch.testing.assert_close(warped[:, :, :15, :17, :14], warp(pooled[:, :1, :15, :17, :14], shift))
    assert warped[:, :, 15:].abs().max() == 0 and warped[:, :, :, 17:].abs().max() == 0
    assert warped[:, :, :, :, 14:].abs().max() == 0


class _TwoVelocities(RegistrationNet):
    """A RegistrationNet whose passes predict two fixed, different smooth velocities in turn (they do not commute)."""

    def __init__(self, velocities: list[torch.Tensor]) -> None:
        super().__init__(VoxelMorphUNet(3, 2, 8, (8, 8, 8, 8), (8,)), 3, integration_steps=5, divisor=8, downsample=2)
        self.velocities, self.calls = velocities, 0

    def velocity_from_pooled(self, pooled: torch.Tensor, spatial) -> torch.Tensor:
        self.calls += 1
        return self.velocities[(self.calls - 1) % len(self.velocities)]


def test_inverse_field_undoes_the_composed_passes_and_the_refined_field():
    """``φ = exp(v_1) ∘ exp(v_2)`` (two passes), so ``φ⁻¹ = exp(-v_2) ∘ exp(-v_1)``: ``φ ∘ φ⁻¹`` must be the identity
    up to interpolation, far closer than the field's own size and than the wrong order; with refinement the inverse
    is that of the refined field. A displacement network (no integration) has no such inverse: a clear error."""
    moving, fixed = _synthetic_pair((32, 32, 32))
    network = _TwoVelocities([_smooth_field((16, 16, 16), 2.0, seed=s) for s in (5, 6)]).eval()
    inside = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    with torch.no_grad():
        step = RegistrationEvalStep(network_passes=2, inverse=True)
        fields = step.register(network, moving, fixed, [])
        inverse, consistency = step.inverse_ddf(network, fields, moving.shape[2:])
        assert len(fields.velocities) == 2 and inverse.shape == fields.ddf.shape
        residual = compose_ddfs(fields.ddf, inverse)[inside].abs().max()
        wrong_order = compose_ddfs(network.integrate(-fields.velocities[0]), network.integrate(-fields.velocities[1]))
        wrong = compose_ddfs(fields.ddf, network.upsample_ddf(wrong_order, moving.shape[2:]))[inside].abs().max()
        size = fields.ddf[inside].abs().max()
        assert size > 2.0, float(size)  # the passes move voxels: the check is not between near-zero fields
        assert residual < 0.1 * size and residual < 0.5 * wrong, (float(residual), float(wrong), float(size))
        assert consistency[0]["mean_voxels"] <= consistency[0]["p99_voxels"] <= consistency[0]["max_voxels"]
        assert consistency[0]["mean_voxels"] < 0.05 * float(size)

        torch.manual_seed(0)
        backbone = VoxelMorphUNet(3, 2, 8, (8, 8, 8, 8), (8,))
        trained = RegistrationNet(backbone, 3, integration_steps=5, divisor=8, flow_init_std=0.3, downsample=2).eval()
        refiner = VelocityRefiner(levels=(4, 2), iterations=(5, 3), kernel_size=3, integration_steps=5)
        refined_step = RegistrationEvalStep(refiner=refiner, inverse=True)
        refined = refined_step.register(trained, moving, fixed, [])
        refined_inverse, _ = refined_step.inverse_ddf(trained, refined, moving.shape[2:])
        torch.testing.assert_close(
            refined_inverse, trained.upsample_ddf(trained.integrate(-refined.velocities[-1]), moving.shape[2:])
        )
        assert compose_ddfs(refined.ddf, refined_inverse)[inside].abs().max() < 0.1 * refined.ddf[inside].abs().max()

        displacement_net = RegistrationNet(backbone, 3, integration_steps=0, divisor=8, downsample=2).eval()
        with pytest.raises(ValueError, match="integration_steps > 0"):
            step.inverse_ddf(displacement_net, step.register(displacement_net, moving, fixed, []), moving.shape[2:])
