"""Test-time refinement (instance optimisation) of the network's velocity field for one pair.

The network's guess ``v₀`` is a good start, but one forward pass cannot fit a particular pair's details. Here ``v``
(on the network's coarse grid) is optimised for this pair alone with the training objective,
``LNCC(m ∘ exp(v), f) + λ · BendingEnergy(exp(v))`` (or, for two contrasts, the MIND-SSC descriptors' squared
difference, ``scripts.mind``, or global mutual information), by Adam, coarse to fine: at level ``L`` both images
are averaged over ``L^d`` blocks and ``v`` is resampled onto that grid before it is integrated, so the coarse levels
are cheap and do most iterations. ``v`` stays a stationary velocity integrated by scaling and squaring, so the
result stays diffeomorphic (no folding beyond discretisation) however long it runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .integrate import identity_grid, integrate_velocity, warp
from .losses import BoxLNCCLoss, FastBendingEnergyLoss, FixedImageMutualInformation
from .mind import MINDSSCLoss

__all__ = ["Refinement", "VelocityRefiner", "downsample_image"]


def downsample_image(image: torch.Tensor, factor: int) -> torch.Tensor:
    """``(B, C, *spatial)`` -> block averages over ``factor^d`` voxels (zero-padded up to a multiple)."""
    if factor == 1:
        return image
    padding: list[int] = []
    for size in reversed(image.shape[2:]):
        padding += [0, (factor - size % factor) % factor]
    pool = F.avg_pool2d if image.dim() == 4 else F.avg_pool3d
    return pool(F.pad(image, padding), factor)


def _resize_field(field: torch.Tensor, shape: Sequence[int], scale: float) -> torch.Tensor:
    """Resample a displacement/velocity field onto a grid of ``shape`` and rescale its voxel units by ``scale``."""
    if list(field.shape[2:]) == list(shape):
        return field * scale if scale != 1 else field
    mode = "bilinear" if field.dim() == 4 else "trilinear"
    return F.interpolate(field, size=list(shape), mode=mode, align_corners=False) * scale


SIMILARITIES = ("lncc", "mind", "mi")


class _GlobalMI(torch.nn.Module):
    """Global mutual information (MONAI's Parzen-window MI, 32 bins) with the refiner's interface: ``target_sums``
    keeps the fixed image's Parzen weights (once per level), ``forward`` compares the warped moving image with them.
    Images in [0, 1] (the preprocessing's scaling)."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = FixedImageMutualInformation(num_bins=32)

    def target_sums(self, target: torch.Tensor) -> torch.Tensor:
        self.loss.set_target(target.reshape(target.shape[0], 1, -1))
        return target

    def forward(self, pred: torch.Tensor, target: torch.Tensor, target_sums: torch.Tensor | None = None):
        if target_sums is None:
            self.target_sums(target)
        return self.loss(pred.reshape(pred.shape[0], 1, -1))


class Refinement(NamedTuple):
    """What ``VelocityRefiner.refine`` returns.

    ``field``: the refined velocity, shape of the network's field. ``report``: per-level losses and times.
    ``ddf``: ``exp(field)`` on the field's own grid (``integrate_velocity(field, integration_steps)``, computed without
    a graph, so exactly that value) when the last level ran on the field's grid or a finer one, whose closing loss
    evaluation integrates it anyway; ``None`` after a coarser last level. Callers reuse it instead of integrating the
    field once more.
    """

    field: torch.Tensor
    report: dict
    ddf: torch.Tensor | None


class VelocityRefiner:
    """Optimise a velocity field ``v`` for one pair, coarse to fine.

    Args:
        levels: downsampling factors of the images at each level, coarse to fine (e.g. ``(4, 2)``: quarter then half
            resolution); a level finer than the velocity's own grid resamples ``v`` up to it (costly in 3D).
        iterations: Adam iterations per level; all zero (``--refine_iterations 0``) leaves ``v`` as it is.
        learning_rate: Adam step, in voxels of the velocity grid: one for all levels or one per level. Adam moves
            each velocity component by at most about this much an iteration, so ``learning_rate x iterations`` of
            a level bounds how far it can carry the field (40 x 0.1 = 4 voxels = 8 mm on the brain's 2 mm grid).
        kernel_size: LNCC window, in voxels of each level's grid.
        similarity: ``lncc`` (one contrast: the training objective), ``mind`` (contrast-invariant: MIND-SSC
            descriptors, the fixed image's once per level, the warped moving image's at each iteration;
            ``scripts.mind``) or ``mi`` (global mutual information, the fixed image's Parzen weights per level).
        mind_radius, mind_dilation: the descriptors' patch half-width and neighbour distance, voxels of each level.
        regularization_weight: ``λ`` of the bending energy of the level's displacement field.
        integration_steps: scaling-and-squaring steps (the network's own count).
        differentiated_squarings: differentiate only the last ``K`` squarings of each integration (the value stays
            exact; see ``scripts.integrate.integrate_velocity``), ``None`` all: fewer ``grid_sample`` backward
            passes, the bulk of each iteration's cost on a CPU.

    ``refine(field, moving, fixed, field_factor)``: ``field`` ``(1, d, *coarse)`` is ``v₀`` on a grid ``field_factor``
    times coarser than ``moving``/``fixed`` ``(1, 1, *spatial)``. Returns a ``Refinement``: the refined field (same
    shape), a report ``{"levels": [{"factor", "iterations", "loss_start", "loss_end", "similarity_end", "seconds"}],
    "seconds"}`` and, unless the last level is coarser than the field's grid, the field's integrated DDF.
    ``__call__`` returns the field and the report.
    """

    def __init__(
        self,
        levels: Sequence[int] = (4, 2),
        iterations: Sequence[int] | int = (40, 15),
        learning_rate: float | Sequence[float] = 0.1,
        kernel_size: int = 5,
        regularization_weight: float = 1.0,
        integration_steps: int = 5,
        differentiated_squarings: int | None = None,
        similarity: str = "lncc",
        mind_radius: int = 1,
        mind_dilation: int = 2,
    ) -> None:
        levels = [int(level) for level in levels]
        if isinstance(iterations, int):
            iterations = [iterations] * len(levels)
        iterations = [int(n) for n in iterations]
        if len(iterations) != len(levels):
            raise ValueError(f"refine_iterations {iterations} needs one count per level {levels}")
        if any(level < 1 for level in levels) or any(n < 0 for n in iterations):
            raise ValueError(f"refinement levels must be >= 1 and iterations >= 0, got {levels}, {iterations}")
        self.levels, self.iterations = levels, iterations
        rates = [learning_rate] * len(levels) if isinstance(learning_rate, (int, float)) else list(learning_rate)
        if len(rates) != len(levels) or any(float(rate) <= 0 for rate in rates):
            raise ValueError(
                f"refine_learning_rate {learning_rate} needs one positive step for all levels or per level"
            )
        self.learning_rates = [float(rate) for rate in rates]
        self.learning_rate, self.regularization_weight = self.learning_rates[0], float(regularization_weight)
        self.integration_steps = int(integration_steps)
        self.differentiated_squarings = None if differentiated_squarings is None else int(differentiated_squarings)
        self.kernel_size = int(kernel_size)
        if similarity not in SIMILARITIES:
            raise ValueError(f"refinement similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.similarity = similarity
        self.mind = MINDSSCLoss(mind_radius, mind_dilation)
        self.mutual_information = _GlobalMI()
        self.regularization = FastBendingEnergyLoss()  # MONAI's BendingEnergyLoss, gradient written out
        if self.enabled:
            # torch.optim imports torch._dynamo when the first optimizer of a process is built (seconds: see
            # `python -X importtime -c "import torch._dynamo"`): pay it here, when the config is parsed (Python
            # start-up), not inside the first registration.
            torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])

    @property
    def enabled(self) -> bool:
        return sum(self.iterations) > 0

    def level_loss(
        self,
        field: torch.Tensor,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        field_factor: int,
        factor: int,
        grid: torch.Tensor | None = None,
        field_grid: torch.Tensor | None = None,
        fixed_sums: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, similarity)`` of ``field`` evaluated on the grid of level ``factor`` (``grid``: its identity;
        ``field_grid``: the identity of the field's own grid; ``fixed_sums``: the LNCC window sums of ``fixed``,
        ``BoxLNCCLoss.target_sums``; all three cached by the caller, or computed here when ``None``).

        Coarser than the field (``factor > field_factor``): ``v`` is resampled onto the level's grid and integrated
        there (cheap). Otherwise ``v`` is integrated on its own grid, as the network does, and the displacement is
        upsampled to the level's grid, so the final level optimises exactly the DDF that is returned.
        """
        loss, sim, _ = self._level_terms(field, moving, fixed, field_factor, factor, grid, field_grid, fixed_sums)
        return loss, sim

    def _level_terms(
        self,
        field: torch.Tensor,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        field_factor: int,
        factor: int,
        grid: torch.Tensor | None,
        field_grid: torch.Tensor | None,
        fixed_sums: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``level_loss``'s loss and similarity, and ``exp(field)`` on the field's own grid when this level computed
        it (the level's grid is the field's or finer; ``None`` for a coarser level)."""
        grid = identity_grid(fixed.shape[2:], fixed.device) if grid is None else grid
        on_field_grid = None
        if factor >= field_factor:
            velocity = _resize_field(field, fixed.shape[2:], field_factor / factor)
            ddf = integrate_velocity(
                velocity, self.integration_steps, grid, differentiated_steps=self.differentiated_squarings
            )
            regularization = self.regularization(ddf)
            if factor == field_factor and ddf.shape == field.shape:
                on_field_grid = ddf
        else:
            coarse = integrate_velocity(
                field, self.integration_steps, field_grid, differentiated_steps=self.differentiated_squarings
            )
            regularization = self.regularization(coarse)
            on_field_grid = coarse
            ratio = field_factor / factor
            ddf = _resize_field(coarse, [round(n * ratio) for n in coarse.shape[2:]], ratio)
        for axis, size in enumerate(fixed.shape[2:]):
            ddf = ddf.narrow(axis + 2, 0, size)
        sim = self._similarity(fixed)(warp(moving, ddf, grid=grid), fixed, fixed_sums)
        return sim + self.regularization_weight * regularization, sim, on_field_grid

    def _similarity(self, fixed: torch.Tensor) -> BoxLNCCLoss | MINDSSCLoss | _GlobalMI:
        if self.similarity == "mind":
            return self.mind
        if self.similarity == "mi":
            return self.mutual_information
        return BoxLNCCLoss(fixed.dim() - 2, self.kernel_size)

    def __call__(
        self, field: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, field_factor: int = 1
    ) -> tuple[torch.Tensor, dict]:
        result = self.refine(field, moving, fixed, field_factor)
        return result.field, result.report

    def refine(
        self, field: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, field_factor: int = 1
    ) -> Refinement:
        start = time.perf_counter()
        report: dict = {"levels": []}
        field = field.detach().float().clone()
        if not self.enabled:
            report["seconds"] = 0.0
            return Refinement(field, report, None)
        parameter = torch.nn.Parameter(field)
        field_grid = identity_grid(field.shape[2:], field.device)
        # fused: one kernel per step instead of a dozen passes over the field (benchmarks/cpu_kernels.py)
        fused = parameter.device.type in ("cpu", "cuda")
        optimizer = torch.optim.Adam([parameter], lr=self.learning_rate, fused=fused)
        integrated = None
        with torch.enable_grad():
            for factor, count, rate in zip(self.levels, self.iterations, self.learning_rates):
                if count == 0:
                    continue
                for group in optimizer.param_groups:  # the moments carry over; only the step changes per level
                    group["lr"] = rate
                level_start = time.perf_counter()
                moving_level = downsample_image(moving.float(), factor)
                fixed_level = downsample_image(fixed.float(), factor)
                grid = identity_grid(fixed_level.shape[2:], fixed_level.device)
                with torch.no_grad():  # the fixed image's half of every similarity evaluation of this level, once
                    fixed_sums = self._similarity(fixed_level).target_sums(fixed_level)
                level_inputs = (moving_level, fixed_level, field_factor, factor, grid, field_grid, fixed_sums)
                history = []
                for _ in range(count):
                    optimizer.zero_grad(set_to_none=True)
                    loss, sim = self.level_loss(parameter, *level_inputs)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"test-time refinement: non-finite loss at level {factor}")
                    loss.backward()
                    optimizer.step()
                    history.append((loss.item(), sim.item()))
                with torch.no_grad():
                    loss, sim, integrated = self._level_terms(parameter, *level_inputs)
                report["levels"].append(
                    {
                        "factor": factor,
                        "iterations": count,
                        "loss_start": history[0][0],
                        "loss_end": float(loss),
                        "similarity_start": history[0][1],
                        "similarity_end": float(sim),
                        "seconds": time.perf_counter() - level_start,
                    }
                )
        report["seconds"] = time.perf_counter() - start
        return Refinement(parameter.detach(), report, integrated)
