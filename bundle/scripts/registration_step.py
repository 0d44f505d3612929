"""The registration iteration plugged into MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` (``iteration_update``).

The default supervised iteration computes ``loss(network(x), y)``; registration needs the moving image warped by the
network's output before the loss, and the evaluator needs the moving labels warped and scored. Everything else
(epochs, handlers, checkpoints, AMP scaler, metrics) stays with the MONAI/ignite engines.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.networks.blocks import Warp
from torch import nn

from .pairs import label_present
from .metrics import deformation_stats, dice_per_label, hd95_per_label, labels_to_score, resolve_label_ids

__all__ = ["RegistrationLoss", "RegistrationTrainStep", "RegistrationEvalStep", "optimizer_step", "one_hot_labels"]


def one_hot_labels(label: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """``(B, 1, *spatial)`` label map -> ``(B, len(label_ids), *spatial)`` float masks for the given ids."""
    return torch.cat([(label == i).to(torch.float32) for i in label_ids], dim=1)


class RegistrationLoss(nn.Module):
    """``Sim(m ∘ φ, f) + λ · Reg(φ) [+ γ · LabelLoss(m_label ∘ φ, f_label)]``.

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

    @property
    def uses_labels(self) -> bool:
        return self.label_weight > 0

    def forward(
        self,
        warped_image: torch.Tensor,
        fixed_image: torch.Tensor,
        ddf: torch.Tensor,
        warped_label: torch.Tensor | None = None,
        fixed_label: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        terms = {
            "similarity": self.image_loss(warped_image, fixed_image),
            "regularization": self.regularization(ddf),
        }
        loss = terms["similarity"] + self.regularization_weight * terms["regularization"]
        if self.uses_labels:
            if warped_label is None or fixed_label is None or warped_label.shape[0] == 0:
                terms["label"] = torch.zeros((), device=ddf.device)  # no pair of this batch has both labels
            else:
                terms["label"] = self.label_loss(warped_label, fixed_label)
            loss = loss + self.label_weight * terms["label"]
        terms["loss"] = loss
        return terms


class RegistrationTrainStep:
    """One optimisation step: ``ddf = net(cat(m, f))``, warp, loss, backward; returns images for handlers."""

    def __init__(self, loss: RegistrationLoss) -> None:
        self.loss = loss
        self.warp = Warp(mode="bilinear", padding_mode="border")

    def __call__(self, engine, batch: Mapping) -> dict:
        device = engine.state.device
        fixed = batch["fixed_image"].to(device, non_blocking=engine.non_blocking)
        moving = batch["moving_image"].to(device, non_blocking=engine.non_blocking)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type=torch.device(device).type, enabled=engine.amp):
            ddf = engine.network(torch.cat([moving, fixed], dim=1))
            warped = self.warp(moving, ddf)
            labels = {}
            if self.loss.uses_labels:
                ids = self.loss.label_ids
                both = [i for i in range(fixed.shape[0]) if _labelled_pair(batch, i)]
                if both:
                    keep = torch.as_tensor(both, device=device)
                    moving_label = batch["moving_label"].to(device)[keep]
                    # Bilinear on one-hot masks: nearest-neighbour warping has no gradient w.r.t. the DDF.
                    labels["warped_label"] = self.warp(one_hot_labels(moving_label, ids), ddf[keep])
                    labels["fixed_label"] = one_hot_labels(batch["fixed_label"].to(device)[keep], ids)
            terms = self.loss(warped, fixed, ddf, **labels)
        optimizer_step(
            terms, engine, f"pair {list(batch.get('moving_name', []))} -> {list(batch.get('fixed_name', []))}"
        )
        output = {name: value.item() for name, value in terms.items()}
        output.update(
            fixed_image=fixed.detach(), moving_image=moving.detach(), warped_image=warped.detach(), ddf=ddf.detach()
        )
        return output


def optimizer_step(terms: Mapping[str, torch.Tensor], engine, what: str) -> None:
    """Backward and optimiser step on ``terms["loss"]`` (through the engine's AMP scaler when it has one), shared by
    every train step; stops first on a non-finite loss, whose update would corrupt the weights checkpoints save."""
    if not torch.isfinite(terms["loss"]):
        values = {name: float(value) for name, value in terms.items()}
        raise FloatingPointError(
            f"non-finite loss at epoch {engine.state.epoch}, iteration {engine.state.iteration} ({what}): {values}; "
            "lower learning_rate or check the images"
        )
    if engine.amp and engine.scaler is not None:
        engine.scaler.scale(terms["loss"]).backward()
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        terms["loss"].backward()
        engine.optimizer.step()


def _labelled_pair(batch: Mapping, i: int) -> bool:
    return label_present(batch, "fixed", i) and label_present(batch, "moving", i)


def _plain(image: torch.Tensor) -> torch.Tensor:
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def _spacing(image: torch.Tensor) -> list[float] | None:
    pixdim = getattr(image, "pixdim", None)
    return None if pixdim is None else [float(p) for p in torch.as_tensor(pixdim).flatten()]


class RegistrationEvalStep:
    """Register a batch of held-out pairs and score them, with the identity (no registration) as the baseline.

    Output per batch: images and DDF for handlers, and ``records``: one dict per pair holding, for ``registered`` and
    ``identity``, per-structure Dice and HD95, mean Dice, and (registered) folding fraction, std log|J| (textbook and
    Learn2Reg) and seconds per pair (network + warp).

    With a ``refiner`` (``scripts.refine.VelocityRefiner``), the network's velocity is optimised for each pair before
    it is integrated (test-time refinement); ``records`` then also hold the refinement's per-level losses and times,
    and ``seconds`` covers network + refinement + warp (``seconds_network`` the network alone).

    Args:
        label_ids: ids to score (list, JSON file with ``labels``, or None for every id present in both images).
        compute_hd95: HD95 costs distance transforms; switch off for quick validation.
        refiner: optional test-time refinement; needs a network with ``velocity``/``field_to_ddf``
            (``scripts.network.RegistrationNet``).
    """

    def __init__(self, label_ids: Sequence[int] | str | None = None, compute_hd95: bool = True, refiner=None) -> None:
        self.label_ids = resolve_label_ids(label_ids)
        self.compute_hd95 = compute_hd95
        self.refiner = refiner if refiner is not None and refiner.enabled else None
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    def __call__(self, engine, batch: Mapping) -> dict:
        device = engine.state.device
        # Plain tensors: MetaTensor bookkeeping on every operation would slow refinement several-fold.
        fixed = _plain(batch["fixed_image"]).to(device)
        moving = _plain(batch["moving_image"]).to(device)
        engine.network.eval()
        refinements: list[dict] = []
        with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, enabled=engine.amp):
            start = time.perf_counter()
            if self.refiner is None:
                ddf = engine.network(torch.cat([moving, fixed], dim=1)).float()
                network_seconds = time.perf_counter() - start
            else:
                ddf, network_seconds = self._refined_ddf(engine.network, moving, fixed, refinements)
            warped = self.warp_image(moving, ddf)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / fixed.shape[0]
            network_seconds /= fixed.shape[0]
            warped_label = None
            if "moving_label" in batch:
                warped_label = self.warp_label(batch["moving_label"].to(device).float(), ddf)
        output = {"fixed_image": fixed, "moving_image": moving, "warped_image": warped, "ddf": ddf}
        if warped_label is not None and any(label_present(batch, "moving", i) for i in range(fixed.shape[0])):
            output["warped_label"] = warped_label
            output["moving_label"] = batch["moving_label"]
        if "fixed_label" in batch:
            output["fixed_label"] = batch["fixed_label"]
        output["records"] = [self._score(batch, output, i, seconds) for i in range(fixed.shape[0])]
        for i, record in enumerate(output["records"]):
            record["seconds_network"] = network_seconds
            if refinements:
                record["refinement"] = refinements[i]
        return output

    def _refined_ddf(
        self, network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, reports: list[dict]
    ) -> tuple[torch.Tensor, float]:
        """Network velocity -> per-pair refinement -> DDF; appends one refinement report per pair."""
        network = getattr(network, "module", network)  # unwrap DistributedDataParallel
        if not hasattr(network, "velocity"):
            raise TypeError(f"test-time refinement needs a network with velocity/field_to_ddf, got {type(network)}")
        start = time.perf_counter()
        fields = network.velocity(torch.cat([moving, fixed], dim=1)).float()
        network_seconds = time.perf_counter() - start
        refined = []
        with torch.autocast(device_type=moving.device.type, enabled=False):
            for i in range(fields.shape[0]):
                field, report = self.refiner(fields[i : i + 1], moving[i : i + 1], fixed[i : i + 1], network.downsample)
                refined.append(field)
                reports.append(report)
        return network.field_to_ddf(torch.cat(refined), moving.shape[2:]).float(), network_seconds

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
        if undefined:
            record["undefined"] = undefined
        return record
