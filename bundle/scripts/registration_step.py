"""The registration iteration, through the hooks of MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator``.

Training uses the trainer's own iteration: ``prepare_batch`` (``RegistrationBatch``) turns a pair into the network's
single input ``cat(moving, fixed)`` and the pair as target, the inferer (``SimpleInferer``) runs the network to the
DDF, and ``loss_function`` (``RegistrationLoss``) warps the moving image by it and returns the loss; so ignite's
``FORWARD/LOSS/BACKWARD_COMPLETED`` events fire, AMP follows ``amp``/``amp_kwargs`` and ``accumulation_steps`` works.
``FiniteLossGuard`` (a handler) stops on a non-finite loss before backward. Evaluation keeps an ``iteration_update``
(``RegistrationEvalStep``): it scores each pair (Dice/HD95 of warped labels, folding, identity baseline, timing,
test-time refinement), which is no ``loss(network(x), y)``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field as dataclass_field

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines import IterationEvents
from monai.networks.blocks import Warp
from monai.utils import CommonKeys
from torch import nn

from .affine import AffineStage
from .contrast_map import conditional_mean_map
from .integrate import compose_ddfs, grid_sample, sampling_grid, warp_label_linear
from .pairs import label_present
from .metrics import deformation_stats, dice_per_label, hd95_per_label, labels_to_score, resolve_label_ids

__all__ = [
    "FiniteLossGuard",
    "PassFields",
    "RegistrationBatch",
    "RegistrationEvalStep",
    "RegistrationLoss",
    "TermsLoss",
    "one_hot_labels",
]


def one_hot_labels(label: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """``(B, 1, *spatial)`` label map -> ``(B, len(label_ids), *spatial)`` float masks for the given ids."""
    return torch.cat([(label == i).to(torch.float32) for i in label_ids], dim=1)


class TermsLoss(nn.Module):
    """A trainer's ``loss_function`` made of named terms: ``forward(pred, target)`` returns the scalar ``terms["loss"]``
    that the trainer back-propagates and keeps every term of the call, detached, in ``last_terms`` (read by
    ``FiniteLossGuard``, which puts them in the iteration's output as ``loss_terms``)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, torch.Tensor] = {}

    def _kept(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return terms["loss"]


class RegistrationLoss(TermsLoss):
    """``Sim(m ∘ φ, f) + λ · Reg(φ) [+ γ · LabelLoss(m_label ∘ φ, f_label)]``: the trainer's
    ``loss_function(ddf, pair)``.

    ``m ∘ φ`` warps the moving image (bilinear, border padding) by the network's DDF; the label term, when
    ``label_weight`` > 0, uses the pairs of the batch where both sides have a label, as one-hot masks warped
    bilinearly (nearest-neighbour warping has no gradient w.r.t. the DDF).

    Args:
        image_loss: similarity, e.g. ``LocalNormalizedCrossCorrelationLoss(kernel_size=9)`` or ``MSELoss``.
        regularization: smoothness penalty on the DDF, e.g. ``BendingEnergyLoss``.
        regularization_weight: λ.
        label_loss: optional overlap loss on warped one-hot training labels (semi-supervision), e.g. ``DiceLoss``.
        label_weight: γ; 0 keeps training unsupervised.
        label_ids: ids turned into one-hot channels for ``label_loss``.
    """

    def __init__(
        self,
        image_loss: nn.Module,
        regularization: nn.Module,
        regularization_weight: float = 1.0,
        label_loss: nn.Module | None = None,
        label_weight: float = 0.0,
        label_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if label_weight > 0 and (label_loss is None or not label_ids):
            raise ValueError("label_weight > 0 needs a label_loss and the label_ids to one-hot encode")
        self.image_loss, self.regularization, self.label_loss = image_loss, regularization, label_loss
        self.regularization_weight, self.label_weight = float(regularization_weight), float(label_weight)
        self.label_ids = list(label_ids or [])
        self.warp = Warp(mode="bilinear", padding_mode="border")

    @property
    def uses_labels(self) -> bool:
        return self.label_weight > 0

    def forward(self, ddf: torch.Tensor, pair: Mapping) -> torch.Tensor:
        """``ddf``: the ``(B, dims, *S)`` prediction; ``pair``: the target of ``RegistrationBatch``."""
        return self._kept(self.terms(ddf, pair))

    def terms(self, ddf: torch.Tensor, pair: Mapping) -> dict[str, torch.Tensor]:
        """``similarity``, ``regularization``, [``label``] and their weighted sum ``loss``."""
        fixed = pair["fixed_image"]
        warped = self.warp(pair["moving_image"], ddf)
        labels = {}
        if self.uses_labels:
            both = [i for i in range(fixed.shape[0]) if _labelled_pair(pair, i)]
            if both:
                keep = torch.as_tensor(both, device=ddf.device)
                moving_label = one_hot_labels(pair["moving_label"].to(ddf.device)[keep], self.label_ids)
                labels["warped"] = self.warp(moving_label, ddf[keep])
                labels["fixed"] = one_hot_labels(pair["fixed_label"].to(ddf.device)[keep], self.label_ids)
        terms = {"similarity": self.image_loss(warped, fixed), "regularization": self.regularization(ddf)}
        loss = terms["similarity"] + self.regularization_weight * terms["regularization"]
        if self.uses_labels:
            if labels:
                terms["label"] = self.label_loss(labels["warped"], labels["fixed"])
            else:
                terms["label"] = torch.zeros((), device=ddf.device)  # no pair of this batch has both labels
            loss = loss + self.label_weight * terms["label"]
        terms["loss"] = loss
        return terms


class RegistrationBatch:
    """The trainer's ``prepare_batch``: a collated pair -> ``(cat(moving, fixed), pair)``.

    The first is the network's single input (``network_def``'s contract); the second, the pair with its images moved
    to the device, is the target that ``RegistrationLoss`` reads (labels move only when its label term needs them).
    """

    def __call__(
        self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
    ) -> tuple[torch.Tensor, dict]:
        fixed = batchdata["fixed_image"].to(device, non_blocking=non_blocking, **kwargs)
        moving = batchdata["moving_image"].to(device, non_blocking=non_blocking, **kwargs)
        return torch.cat([moving, fixed], dim=1), {**batchdata, "fixed_image": fixed, "moving_image": moving}

    @staticmethod
    def describe(batchdata: Mapping) -> str:
        """The pairs of a batch, for error messages."""
        return f"pair {list(batchdata.get('moving_name', []))} -> {list(batchdata.get('fixed_name', []))}"


class FiniteLossGuard:
    """Trainer handler on ``LOSS_COMPLETED`` (after the loss, before backward): puts the loss function's named terms
    (``TermsLoss.last_terms``) in the output as ``loss_terms``, and stops on a non-finite loss, whose update would
    corrupt the weights that checkpoints save. Attach it on every rank (each rank has its own loss)."""

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine) -> None:
        output = engine.state.output
        output["loss_terms"] = dict(getattr(engine.loss_function, "last_terms", {}))
        if torch.isfinite(output[CommonKeys.LOSS]).all():
            return
        values = {name: float(value) for name, value in output["loss_terms"].items()}
        values["loss"] = float(output[CommonKeys.LOSS])
        describe = getattr(engine.prepare_batch, "describe", None)
        what = f" ({describe(engine.state.batch)})" if describe is not None else ""
        raise FloatingPointError(
            f"non-finite loss at epoch {engine.state.epoch}, iteration {engine.state.iteration}{what}: {values}; "
            "lower learning_rate or check the images"
        )


def _labelled_pair(batch: Mapping, i: int) -> bool:
    return label_present(batch, "fixed", i) and label_present(batch, "moving", i)


def _plain(image: torch.Tensor) -> torch.Tensor:
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def _spacing(image: torch.Tensor) -> list[float] | None:
    pixdim = getattr(image, "pixdim", None)
    return None if pixdim is None else [float(p) for p in torch.as_tensor(pixdim).flatten()]


def _warp_padded(image: torch.Tensor, ddf: torch.Tensor, warp_image) -> torch.Tensor:
    """``image ∘ (id + ddf)`` where ``ddf`` covers only the leading ``ddf.shape[2:]`` voxels of ``image`` (the
    backbone's zero-padded grid): the rest stays zero, as the padding it is."""
    covered = image
    for axis, size in enumerate(ddf.shape[2:]):
        covered = covered.narrow(axis + 2, 0, size)
    warped = warp_image(covered, sampling_grid(ddf))
    padding: list[int] = []  # F.pad lists the last axis first
    for axis in range(image.dim() - 1, 1, -1):
        padding += [0, image.shape[axis] - warped.shape[axis]]
    return F.pad(warped, padding)


# what the velocity-grid passes and the refinement need of a network (scripts.network.RegistrationNet)
_COARSE_INTERFACE = ("pooled_pair", "velocity_from_pooled", "integrate", "upsample_ddf")


@dataclass
class PassFields:
    """What the network passes (and the refinement) produced for a batch.

    ``ddf``: the composed DDF on the input grid ``(B, d, *spatial)``; ``network_seconds``: the network passes alone;
    ``velocities``: each pass' velocity on the velocity grid ``(B, d, *coarse)``, the last one refined (empty for a
    network without a velocity grid); ``coarse_ddf``: the composed DDF on the velocity grid (None without one).
    """

    ddf: torch.Tensor
    network_seconds: float
    velocities: list[torch.Tensor] = dataclass_field(default_factory=list)
    coarse_ddf: torch.Tensor | None = None


class RegistrationEvalStep:
    """Register a batch of held-out pairs and score them, with the identity (no registration) as the baseline.

    Output per batch: images and DDF for handlers, and ``records``: one dict per pair holding, for ``registered`` and
    ``identity``, per-structure Dice and HD95, mean Dice, and (registered) folding fraction, std log|J| (textbook and
    Learn2Reg) and seconds per pair (network + warp).

    With a ``refiner`` (``scripts.refine.VelocityRefiner``), the network's velocity is optimised for each pair before
    it is integrated (test-time refinement); ``records`` then also hold the refinement's per-level losses and times,
    and ``seconds`` covers network + refinement + warp (``seconds_network`` the network alone).

    With ``network_passes = n > 1`` the network registers the pair ``n`` times, each pass the moving image warped by
    the passes before it (a recursive cascade of one network): ``φ = φ_1 ∘ φ_2 ∘ ... ∘ φ_n``, composed as DDFs
    (``scripts.integrate.compose_ddfs``), so the moving image is interpolated once. Each ``φ_k = exp(v_k)`` is
    diffeomorphic and so is their composition. The refiner optimises the last pass' velocity on the pair it saw.

    Args:
        label_ids: ids to score (list, JSON file with ``labels``, or None for every id present in both images).
        compute_hd95: HD95 costs distance transforms; switch off for quick validation.
        refiner: optional test-time refinement; needs a network with ``velocity``/``integrate``/``upsample_ddf``
            (``scripts.network.RegistrationNet``).
        network_passes: how many times the network registers the pair (1: once; 0: not at all, the refinement
            starts from the identity, ``v = 0``: for pairs the network was not trained for, e.g. two contrasts).
        inverse: also compute ``φ⁻¹`` (output ``inverse_ddf``, on the input grid, which the moving image shares):
            ``φ⁻¹ = exp(-v_n) ∘ ... ∘ exp(-v_1)``, exact up to the integration's interpolation; each record gets
            ``inverse_consistency``, how far ``φ ∘ φ⁻¹`` is from the identity (input voxels). Needs a network with a
            velocity grid that integrates a velocity (``integration_steps > 0``).
        affine: optional affine stage (``scripts.affine.AffineRegistration``) that aligns the moving image, given
            on its own grid (``PairDataset(resample_moving=False)``), before the network; ``ddf`` stays the
            network's (fixed grid), ``affine_matrix`` holds ``T`` and the writer composes the two. One pair a batch.
        contrast_mapping: register ``g(m)``, the moving image mapped onto the fixed image's contrast by the joint
            histogram's conditional mean (``scripts.contrast_map``), after the affine stage (``--multimodal``);
            the outputs warp the moving image itself.
        label_interpolation: how the moving label is warped: ``nearest`` (the VoxelMorph papers' Dice), or
            ``linear``: each label's mask interpolated, the label of largest weight kept
            (``scripts.integrate.warp_label_linear``, as ANTs' ``genericLabel`` / Greedy's ``LABEL``).
    """

    def __init__(
        self,
        label_ids: Sequence[int] | str | None = None,
        compute_hd95: bool = True,
        refiner=None,
        network_passes: int = 1,
        inverse: bool = False,
        affine=None,
        label_interpolation: str = "nearest",
        contrast_mapping: bool = False,
    ) -> None:
        if int(network_passes) < 0:
            raise ValueError(f"network_passes must be >= 0, got {network_passes}")
        if int(network_passes) == 0 and (refiner is None or not refiner.enabled):
            raise ValueError("network_passes 0 (no network) needs a test-time refinement (refine_iterations > 0)")
        self.network_passes = int(network_passes)
        self.contrast_mapping = bool(contrast_mapping)
        self.inverse = bool(inverse)
        self.label_ids = resolve_label_ids(label_ids)
        self.compute_hd95 = compute_hd95
        self.refiner = refiner if refiner is not None and refiner.enabled else None
        self.affine = affine if affine is not None and affine.enabled else None
        # scripts.integrate's sampling: MONAI's Warp convention (a test checks they agree), on every CPU thread; the
        # image and the label share one sampling grid (id + ddf)
        self.warp_image = functools.partial(grid_sample, mode="bilinear", padding_mode="border")
        if label_interpolation not in ("nearest", "linear"):
            raise ValueError(f"label_interpolation must be 'nearest' or 'linear', got {label_interpolation!r}")
        self.label_interpolation = label_interpolation
        if label_interpolation == "linear":
            self.warp_label = warp_label_linear
        else:
            self.warp_label = functools.partial(grid_sample, mode="nearest", padding_mode="zeros")

    def __call__(self, engine, batch: Mapping) -> dict:
        device = engine.state.device
        # Plain tensors: MetaTensor bookkeeping on every operation would slow refinement several-fold.
        fixed = _plain(batch["fixed_image"]).to(device)
        moving = _plain(batch["moving_image"]).to(device)
        engine.network.eval()
        refinements: list[dict] = []
        start = time.perf_counter()
        stage = None
        if self.affine is not None:
            # the affine stage: T estimated on the images' own grids, the moving image resampled through it onto the
            # fixed grid for the network; the outputs below sample the moving file's grid once for T and φ together
            stage = AffineStage(self.affine, batch, fixed, moving)
        network_moving = moving if stage is None else stage.aligned
        if self.contrast_mapping:  # the moving image in the fixed image's contrast, for the network and refinement
            network_moving = conditional_mean_map(network_moving, fixed)
        with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, enabled=engine.amp):
            fields = self.register(engine.network, network_moving, fixed, refinements)
            ddf, network_seconds = fields.ddf, fields.network_seconds
            if stage is None:
                sampling = sampling_grid(ddf)
                warped = self.warp_image(moving, sampling)
            else:
                sampling = stage.sampling_grid(ddf)
                warped = grid_sample(moving, sampling, mode="bilinear", padding_mode="zeros")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / fixed.shape[0]
            network_seconds /= fixed.shape[0]
            warped_label = None
            if "moving_label" in batch:
                warped_label = self.warp_label(_plain(batch["moving_label"]).to(device).float(), sampling)
        shown_moving = moving if stage is None else stage.unregistered(moving, "bilinear")
        output = {"fixed_image": fixed, "moving_image": shown_moving, "warped_image": warped, "ddf": ddf}
        if stage is not None:
            output["affine_matrix"] = [stage.matrix]
        consistency: list[dict] = []
        if self.inverse:
            with torch.no_grad():
                output["inverse_ddf"], consistency = self.inverse_ddf(engine.network, fields, fixed.shape[2:])
        if warped_label is not None and any(label_present(batch, "moving", i) for i in range(fixed.shape[0])):
            output["warped_label"] = warped_label
            moving_label = batch["moving_label"]
            if stage is not None:  # the no-registration baseline: the moving label where the headers put it
                output["affine_label"] = stage.aligned_label(_plain(moving_label).to(device).float())
                moving_label = stage.unregistered(_plain(moving_label).to(device).float(), "nearest")
            output["moving_label"] = moving_label
        if "fixed_label" in batch:
            output["fixed_label"] = batch["fixed_label"]
        output["records"] = [self._score(batch, output, i, seconds) for i in range(fixed.shape[0])]
        for i, record in enumerate(output["records"]):
            if stage is not None:
                record["affine"] = stage.report
                record["seconds_affine"] = stage.report["seconds"]
            record["seconds_network"] = network_seconds
            record["network_passes"] = self.network_passes
            if refinements:
                record["refinement"] = refinements[i]
            if consistency:
                record["inverse_consistency"] = consistency[i]
        return output

    def network_ddf(
        self, network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, reports: list[dict]
    ) -> tuple[torch.Tensor, float]:
        """The DDF of ``network_passes`` passes (the last one refined when there is a refiner) and the seconds spent
        in the network passes (without the refinement); ``register``'s ``ddf`` and ``network_seconds``."""
        fields = self.register(network, moving, fixed, reports)
        return fields.ddf, fields.network_seconds

    def register(
        self, network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, reports: list[dict]
    ) -> PassFields:
        """Run the ``network_passes`` passes (the last one refined when there is a refiner); refinement reports
        are appended to ``reports``.

        With a ``RegistrationNet`` the passes' fields are integrated and composed on the velocity grid and upsampled
        once (a 3D brain: composing on the 2 mm grid costs an eighth of composing at 1 mm), and each later pass sees
        the moving image warped on the grid the backbone sees (its ``pooled_pair``, 2 mm for the brain model): the
        network averages its input to that grid anyway, and a 1 mm upsampling and warp there cost more than the
        pass (docs/experiments.md: network alone 3.30 -> 2.67 s). Other networks compose their full-resolution DDFs
        and warp at full resolution.
        """
        network = getattr(network, "module", network)  # unwrap DistributedDataParallel
        coarse = all(hasattr(network, name) for name in _COARSE_INTERFACE)
        if self.refiner is not None and not coarse:
            raise TypeError(
                f"test-time refinement needs a network with {'/'.join(_COARSE_INTERFACE)} "
                f"(scripts.network.RegistrationNet), got {type(network)}"
            )
        start = time.perf_counter()
        if not coarse:
            ddf = self._full_resolution_passes(network, moving, fixed)
            return PassFields(ddf, time.perf_counter() - start)
        spatial = moving.shape[2:]
        earlier = None  # the composed DDF of the passes before the last, on the velocity grid
        velocities = []
        if self.network_passes == 0:  # no network: the refinement starts from the identity
            field = moving.new_zeros((moving.shape[0], len(spatial), *network.coarse_shape(spatial))).float()
        else:
            pooled = network.pooled_pair(torch.cat([moving, fixed], dim=1))
            pooled_moving, pooled_fixed = pooled[:, :1], pooled[:, 1:]
            for _ in range(self.network_passes - 1):
                velocities.append(network.velocity_from_pooled(pooled, spatial).float())
                step = network.integrate(velocities[-1]).float()
                earlier = step if earlier is None else compose_ddfs(earlier, step)
                pooled = torch.cat([_warp_padded(pooled_moving, earlier, self.warp_image), pooled_fixed], dim=1)
            field = network.velocity_from_pooled(pooled, spatial).float()
        network_seconds = time.perf_counter() - start
        current = moving  # the refinement compares full-resolution images at its own levels
        if self.refiner is not None and earlier is not None:
            current = self.warp_image(moving, sampling_grid(network.upsample_ddf(earlier, spatial)))
        last = None
        if self.refiner is not None:
            with torch.autocast(device_type=moving.device.type, enabled=False):
                results = [
                    self.refiner.refine(field[i : i + 1], current[i : i + 1], fixed[i : i + 1], network.downsample)
                    for i in range(field.shape[0])
                ]
            reports.extend(result.report for result in results)
            field = torch.cat([result.field for result in results])
            # the refinement's closing evaluation integrated the refined field on its own grid: the same exp(v)
            # as network.integrate when both integrate alike (a test checks it), one integration saved
            if self.refiner.integration_steps == getattr(network, "integration_steps", None) and all(
                result.ddf is not None for result in results
            ):
                last = torch.cat([result.ddf for result in results]).float()
        if last is None:
            last = network.integrate(field).float()
        ddf = last if earlier is None else compose_ddfs(earlier, last)
        return PassFields(network.upsample_ddf(ddf, spatial).float(), network_seconds, velocities + [field], ddf)

    def inverse_ddf(
        self, network: nn.Module, fields: PassFields, spatial: Sequence[int]
    ) -> tuple[torch.Tensor, list[dict]]:
        """``φ⁻¹`` on the input grid ``(B, d, *spatial)`` and, per pair, how far ``φ ∘ φ⁻¹`` is from the identity.

        ``φ = exp(v_1) ∘ ... ∘ exp(v_n)``, so ``φ⁻¹ = exp(-v_n) ∘ ... ∘ exp(-v_1)``: integrated and composed on the
        velocity grid, upsampled once, like ``φ``. The residual ``|φ(φ⁻¹(x)) - x|`` is measured there (input voxels:
        coarse voxels x ``downsample``) and reported as its mean, 99th percentile and maximum; it is the
        interpolation error of the integration, not a property of the registration.
        """
        network = getattr(network, "module", network)
        if not fields.velocities or fields.coarse_ddf is None:
            raise TypeError(
                f"the inverse field needs a network with {'/'.join(_COARSE_INTERFACE)} "
                f"(scripts.network.RegistrationNet), got {type(network)}"
            )
        if int(getattr(network, "integration_steps", 0)) <= 0:
            raise ValueError(
                "the inverse field needs a diffeomorphic model (integration_steps > 0): a network that predicts a "
                "displacement (integration_steps 0) has no exp(-v) inverse"
            )
        inverse = None
        for velocity in reversed(fields.velocities):
            step = network.integrate(-velocity).float()
            inverse = step if inverse is None else compose_ddfs(inverse, step)
        residual = compose_ddfs(fields.coarse_ddf, inverse)  # φ ∘ φ⁻¹ - id on the velocity grid
        scale = float(getattr(network, "downsample", 1))
        norms = torch.linalg.vector_norm(residual, dim=1).flatten(1) * scale
        rank = int(round(0.99 * (norms.shape[1] - 1))) + 1  # the 99th percentile's order statistic (1-based)
        consistency = [
            {
                "mean_voxels": float(n.mean()),
                "p99_voxels": float(torch.kthvalue(n, rank).values),  # a selection, not torch.quantile's full sort
                "max_voxels": float(n.max()),
            }
            for n in norms
        ]
        return network.upsample_ddf(inverse, spatial).float(), consistency

    def _full_resolution_passes(self, network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The passes of a network that maps ``cat(moving, fixed)`` to a full-resolution DDF and nothing more."""
        ddf = None
        current = moving
        for index in range(self.network_passes):
            step = network(torch.cat([current, fixed], dim=1)).float()
            ddf = step if ddf is None else compose_ddfs(ddf, step)
            if index < self.network_passes - 1:
                current = self.warp_image(moving, sampling_grid(ddf))
        return ddf

    def _score(self, batch: Mapping, output: Mapping, i: int, seconds: float) -> dict:
        record = {
            "fixed": batch["fixed_name"][i],
            "moving": batch["moving_name"][i],
            "seconds": seconds,
            **deformation_stats(output["ddf"][i].cpu().numpy()),
        }
        if not _labelled_pair(batch, i):
            return record  # Dice/HD95 need both labels; inference may have only the moving one
        fixed_label = output["fixed_label"][i, 0].cpu().numpy().round().astype(np.int32)
        moving_label = output["moving_label"][i, 0].cpu().numpy().round().astype(np.int32)
        warped_label = output["warped_label"][i, 0].cpu().numpy().round().astype(np.int32)
        ids = labels_to_score(fixed_label, moving_label, self.label_ids)
        spacing = _spacing(batch["fixed_image"][i])
        record["scored_structures"] = len(ids)
        undefined: dict[str, str] = {}
        if not ids:
            wanted = "" if self.label_ids is None else " among the eval_label_ids"
            undefined["mean_dice"] = f"no structure{wanted} is present in both the fixed and the moving label"
        for name, candidate in (("identity", moving_label), ("registered", warped_label)):
            dice = dice_per_label(fixed_label, candidate, ids)
            record[f"{name}_dice"] = {str(k): v for k, v in dice.items()}
            record[f"{name}_mean_dice"] = float(np.mean(list(dice.values()))) if dice else float("nan")
            if self.compute_hd95:
                hd95 = hd95_per_label(fixed_label, candidate, ids, spacing)
                record[f"{name}_hd95"] = {str(k): v for k, v in hd95.items()}
                finite = [v for v in hd95.values() if np.isfinite(v)]
                record[f"{name}_mean_hd95"] = float(np.mean(finite)) if finite else float("nan")
                for k, v in hd95.items():
                    if not np.isfinite(v):
                        undefined[f"{name}_hd95.{k}"] = f"structure {k} is absent from the {name} moving label"
        if "affine_label" in output:  # after the affine stage alone (Dice only: a diagnostic, not a result)
            affine_label = output["affine_label"][i, 0].cpu().numpy().round().astype(np.int32)
            dice = dice_per_label(fixed_label, affine_label, ids)
            record["affine_mean_dice"] = float(np.mean(list(dice.values()))) if dice else float("nan")
        if undefined:
            record["undefined"] = undefined
        return record
