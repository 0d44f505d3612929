"""Checkpoint handlers: atomic saving (best / final) and loading with errors that name the file."""

from __future__ import annotations

import math
import os
import tempfile

from ignite.engine import Engine, Events

from .files import logger

__all__ = ["AtomicCheckpointSaver", "CheckpointFileLoader"]


class AtomicCheckpointSaver:
    """Saves ``network.state_dict()`` to ``save_dir/filename``: at each new best key metric of the evaluator it is
    attached to (``when="best"``; every time when the metric is NaN, i.e. validation pairs without labels), or when
    the engine completes (``when="final"``).

    MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed mid-write leaves a truncated
    ``model.pt``; here the file is written beside the target and renamed, so ``model.pt`` is always loadable.
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
        self.save(os.path.join(self.save_dir, self.filename))

    def save(self, path: str) -> None:
        import torch

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".tmp", suffix=".pt", dir=os.path.dirname(os.path.abspath(path)))
        os.close(handle)
        try:
            network = getattr(self.network, "module", self.network)  # unwrap DistributedDataParallel
            torch.save(network.state_dict(), temporary)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
            logger.info("saved checkpoint %s", path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


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
