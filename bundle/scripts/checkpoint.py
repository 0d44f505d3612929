"""Checkpoint handlers: atomic saving (best / final), publishing a run's best model only when it beats the one
published, and loading with errors that name the file."""

from __future__ import annotations

import json
import math
import os
import time

from ignite.engine import Engine, Events

from .files import atomic_output, atomic_write_text, logger
from .runs import as_flag

__all__ = ["AtomicCheckpointSaver", "CheckpointFileLoader", "ModelPublisher", "publish_decision", "save_weights"]


def save_weights(network, path: str) -> None:
    """Save ``network.state_dict()`` (unwrapped from DistributedDataParallel) via a temporary file beside ``path``
    and a rename, so ``path`` is always a complete, loadable file. The tensors are saved as CPU copies: ``torch.load``
    puts each tensor back on the device it was saved from, so weights trained on a GPU would not load on a machine
    without one (the shipped models are trained on a GPU and run anywhere)."""
    import torch

    state = getattr(network, "module", network).state_dict()
    with atomic_output(path, ".pt") as temporary:
        torch.save({name: tensor.detach().cpu() for name, tensor in state.items()}, temporary)
    logger.info("saved checkpoint %s", path)


class AtomicCheckpointSaver:
    """Saves ``network.state_dict()`` to ``save_dir/filename``: at each new best key metric of the evaluator it is
    attached to (``when="best"``; every time when the metric is NaN, i.e. validation pairs without labels), or when
    the engine completes (``when="final"``).

    MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed mid-write leaves a truncated
    ``model.pt``; here the file is written beside the target and renamed, so ``model.pt`` is always loadable.

    The best value so far is in ``state_dict()``, so a resumed run (``scripts.training_state``) goes on comparing with
    the best of its first part.
    """

    def __init__(self, save_dir: str, network, filename: str = "model.pt", when: str = "best") -> None:
        if when not in ("best", "final"):
            raise ValueError(f"when must be 'best' or 'final', got {when}")
        self.save_dir, self.network, self.filename, self.when = save_dir, network, filename, when
        self.best = -math.inf

    def attach(self, engine: Engine) -> None:
        event = Events.EPOCH_COMPLETED if self.when == "best" else Events.COMPLETED
        engine.add_event_handler(event, self._maybe_save)

    def _maybe_save(self, engine: Engine) -> None:
        if self.when == "best":
            value = engine.state.metrics.get(engine.state.key_metric_name, float("nan"))
            if math.isnan(value):
                # Unlabelled validation pairs have no Dice: keep the latest model so model.pt always exists.
                logger.info("no key metric (%s) to rank checkpoints: saving the latest", engine.state.key_metric_name)
            elif value <= self.best:
                return
            else:
                self.best = value
        save_weights(self.network, os.path.join(self.save_dir, self.filename))

    def state_dict(self) -> dict:
        return {"best": float(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])


class CheckpointFileLoader:
    """Loads a state dict into ``network`` when the engine starts, failing with the path when it is missing or
    unreadable (MONAI's ``CheckpointLoader`` surfaces a bare ``torch.load`` error deep in the run)."""

    def __init__(self, load_path: str, network, strict: bool = True, missing_hint: str = "") -> None:
        self.load_path, self.network, self.strict = load_path, network, strict
        self.missing_hint = missing_hint or "train first, or pass --ckpt_path"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        import torch

        if not os.path.isfile(self.load_path):
            raise FileNotFoundError(f"checkpoint not found: {self.load_path} ({self.missing_hint})")
        try:
            state = torch.load(self.load_path, map_location=engine.state.device, weights_only=True)
        except Exception as error:  # torch raises several types for truncated or foreign files
            raise ValueError(f"cannot load checkpoint {self.load_path}: {error}") from error
        network = getattr(self.network, "module", self.network)
        try:
            network.load_state_dict(state, strict=self.strict)
        except RuntimeError as error:
            raise ValueError(
                f"checkpoint {self.load_path} does not fit this network (check spatial_dims, backbone_name, "
                "unet_channels, unet_out_channels, final_conv_channels: the model's training config): "
                f"{error}"
            ) from error
        logger.info("loaded checkpoint %s", self.load_path)


def _describe(record: dict | None) -> str:
    if record is None:
        return "of unknown quality: no model.json records its metric"
    value = record.get("value")
    shown = "no value" if value is None else f"{value:.4f}"
    return f"{record.get('metric')} {shown} of run {record.get('run')}, epoch {record.get('epoch')}"


def publish_decision(
    value: float, metric: str, record: dict | None, model_exists: bool, run_dir: str, overwrite: bool = False
) -> tuple[bool, str]:
    """Whether this run's model (key ``metric`` = ``value``, NaN without labels) replaces the published one.

    Rules: nothing published -> publish. Published by another run (or unrecorded) -> only ``overwrite`` or a higher
    recorded value of the same metric replaces it; a NaN metric never does, since models are then incomparable.
    Published by this run -> a higher value replaces it; with a NaN metric, the latest replaces it (as within a run
    without labels). Returns ``(publish, reason)``, the reason for the log.
    """
    if not model_exists:
        return True, "no model published yet"
    own = record is not None and record.get("run_dir") == run_dir
    published = f"the published model ({_describe(record)})"
    if not own and overwrite:
        return True, f"--overwrite_model true replaces {published}"
    if math.isnan(value):
        if own:
            return True, f"no {metric} (validation pairs without labels): the latest model of this run"
        return False, f"no {metric} (validation pairs without labels) to compare with {published}"
    recorded = record.get("value") if record is not None and record.get("metric") == metric else None
    if recorded is None or math.isnan(recorded):
        if own:
            return True, f"{metric} {value:.4f}, the first of this run"
        return False, f"{metric} {value:.4f} cannot be compared with {published}"
    if value > recorded:
        return True, f"{metric} {value:.4f} beats {published}"
    return False, f"{metric} {value:.4f} does not beat {published}"


class ModelPublisher:
    """Publishes the network as ``save_dir/model.pt`` after a validation when :func:`publish_decision` says it beats
    the published model, with ``model.json`` beside it (metric, value, run, run folder, epoch) for the next run to
    compare with; logs which happened and why.

    ``model.pt`` is what evaluation and inference load by default, so a rerun must not replace a better model
    (0.569 was replaced by 0.561); the run's own best stays in its run folder either way.

    Args:
        save_dir: ``ckpt_dir``.
        network: the trained network.
        run_dir: this run's folder (identifies the run in ``model.json``).
        overwrite: replace a model published by another run at the first validation, whatever its metric.
        filename: name of the published weights; the record takes the same stem with ``.json``.
    """

    def __init__(self, save_dir: str, network, run_dir: str, overwrite: bool = False, filename: str = "model.pt"):
        self.network, self.run_dir = network, os.path.abspath(run_dir)
        self.overwrite = as_flag(overwrite, "overwrite_model")
        self.model_path = os.path.join(save_dir, filename)
        self.record_path = os.path.splitext(self.model_path)[0] + ".json"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def read_record(self) -> dict | None:
        if not os.path.isfile(self.record_path):
            return None
        try:
            with open(self.record_path) as stream:
                return json.load(stream)
        except (OSError, ValueError) as error:
            logger.warning("cannot read %s (%s): the published model counts as unrecorded", self.record_path, error)
            return None

    def __call__(self, engine: Engine) -> None:
        metric = engine.state.key_metric_name
        value = float(engine.state.metrics.get(metric, float("nan")))
        record = self.read_record()
        publish, reason = publish_decision(
            value, metric, record, os.path.isfile(self.model_path), self.run_dir, self.overwrite
        )
        if not publish:
            own = record is not None and record.get("run_dir") == self.run_dir
            hint = "" if own else "; --overwrite_model true replaces it"
            logger.info(
                "kept published %s: %s%s; this run's model is in %s", self.model_path, reason, hint, self.run_dir
            )
            return
        # weights first: a kill between the two writes leaves the previous record beside the new weights, never a
        # record of weights that were not written
        save_weights(self.network, self.model_path)
        entry = {
            "metric": metric,
            "value": None if math.isnan(value) else value,
            "run": os.path.basename(self.run_dir),
            "run_dir": self.run_dir,
            "epoch": int(engine.state.epoch),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.record_path, json.dumps(entry, indent=2) + "\n")
        logger.info("published %s: %s", self.model_path, reason)
