"""Ignite handlers for the training/evaluation engines: TensorBoard overview figures and the progress bar."""

from __future__ import annotations

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

from .visualize import overview_figure

__all__ = ["EngineProgressBar", "RegistrationImageLogger"]


class RegistrationImageLogger:
    """TensorBoard figure (fixed, moving, warped, deformation grid) of the first pair of each evaluation epoch."""

    def __init__(self, log_dir: str, tag: str = "validation/overview") -> None:
        self.log_dir, self.tag = log_dir, tag
        self._first: dict | None = None
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._forget)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _forget(self, engine: Engine) -> None:
        self._first = None

    def _keep_first(self, engine: Engine) -> None:
        if self._first is None:
            output = engine.state.output
            keys = ("fixed_image", "moving_image", "warped_image", "ddf")
            self._first = {k: output[k][0].detach().float().cpu().numpy() for k in keys}

    def _write(self, engine: Engine) -> None:
        if self._first is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        first = self._first
        figure = overview_figure(
            first["fixed_image"][0], first["moving_image"][0], first["warped_image"][0], first["ddf"]
        )
        self._writer.add_figure(self.tag, figure, global_step=engine.state.epoch, close=True)
        self._writer.flush()


class EngineProgressBar:
    """tqdm progress bar (ignite's ``ProgressBar``) showing the loss when the engine output has one."""

    def __init__(self, persist: bool = True) -> None:
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        ProgressBar(persist=self.persist).attach(
            engine, output_transform=lambda output: {"loss": output["loss"]} if "loss" in output else {}
        )
