"""Full training state: saved at the end of every epoch, restored by ``--resume true`` after a crash or ``kill -9``.

A state holds what an exact continuation needs: network, optimiser, LR schedule, the trainer's epoch and iteration,
the best key metric so far (the evaluator's and the run's best-model saver's), and every random generator the
training draws from (python, numpy, torch CPU/CUDA, the pair sampler and its augmentation transforms).
"""

from __future__ import annotations

import glob
import math
import os
import random
from collections.abc import Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.transforms import Randomizable

from .files import logger
from .runs import STATE_FOLDER, STATE_PREFIX, as_flag, state_checkpoints

__all__ = ["RandomStates", "TrainingState"]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _numpy_state(generator: np.random.RandomState) -> dict:
    # torch.load(weights_only=True) refuses numpy arrays: the key goes into a tensor, the rest are plain numbers
    _, key, position, has_gauss, cached_gaussian = generator.get_state()
    return {
        "key": torch.from_numpy(key.astype(np.int64)),
        "pos": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_state(generator: np.random.RandomState, state: Mapping) -> None:
    key = state["key"].numpy().astype(np.uint32)
    generator.set_state(("MT19937", key, state["pos"], state["has_gauss"], state["cached_gaussian"]))


class RandomStates:
    """The states of every random generator of a training, as one ``state_dict`` for ``Checkpoint``.

    Besides the global python/numpy/torch generators, MONAI's random transforms and the pair sampler each own a
    ``RandomState`` (``Randomizable.R``), reached from ``sources`` through attributes and lists (``Compose`` ->
    ``RandAffined`` -> ``RandAffine`` -> ``RandAffineGrid``); without them a resumed run would draw the pairs and
    augmentations of its first epochs again. The states are rank-specific under ``torch.distributed`` (each rank
    samples its own pairs): a rank other than the one that saved them keeps its own generators and says so.

    Args:
        sources: ``Randomizable`` objects whose generators (and those of their randomizable attributes) to keep,
            e.g. the training ``PairDataset``.
    """

    def __init__(self, sources: list) -> None:
        self.sources = list(sources)

    def _generators(self) -> list[np.random.RandomState]:
        generators: dict[int, np.random.RandomState] = {}
        seen: set[int] = set()

        def visit(item) -> None:
            if isinstance(item, (list, tuple)):
                for element in item:
                    visit(element)
                return
            if not isinstance(item, Randomizable) or id(item) in seen:
                return
            seen.add(id(item))
            generators.setdefault(id(item.R), item.R)
            for value in vars(item).values():
                visit(value)

        visit(self.sources)
        return list(generators.values())

    def state_dict(self) -> dict:
        state = {
            "rank": _rank(),
            "python": list(random.getstate()),
            "numpy": _numpy_state(np.random.mtrand._rand),
            "torch": torch.get_rng_state(),
            "transforms": [_numpy_state(generator) for generator in self._generators()],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        if state["rank"] != _rank():
            logger.info("random states were saved by rank %d: rank %d keeps its own", state["rank"], _rank())
            return
        generators = self._generators()
        if len(generators) != len(state["transforms"]):
            raise ValueError(
                f"training state has {len(state['transforms'])} transform random states, this configuration has "
                f"{len(generators)}: resume with the configuration (augmentation, pair_mode) the run started with"
            )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        _set_numpy_state(np.random.mtrand._rand, state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([generator.cpu() for generator in state["cuda"]])
        for generator, saved in zip(generators, state["transforms"]):
            _set_numpy_state(generator, saved)


class _KeyMetricBest:
    """An evaluator's best key metric and its epoch: MONAI keeps them on ``engine.state``, outside ignite's
    ``Engine.state_dict``, and logs "best value ... at epoch" from them."""

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]


class TrainingState:
    """Saves the full training state into ``run_dir/checkpoints/state_checkpoint_<epoch>.pt`` at the end of every
    epoch, keeping the last ``keep``; with ``resume``, restores the latest when the trainer starts.

    Saving is ignite's ``Checkpoint`` + ``DiskSaver(atomic=True)`` (a temporary file in the same folder, then
    ``os.replace``: a kill mid-write leaves the previous states intact); its own list of saved files is part of the
    state, so a resumed run goes on pruning the files of the killed one. Restoring is MONAI's ``CheckpointLoader``,
    which keeps the configured ``max_epochs``. Attach it after ``ValidationHandler``: the state of an epoch then
    includes its validation (best metric, best model). Under ``torch.distributed`` every rank restores and only
    rank 0 writes.

    Args:
        run_dir: the run folder (``scripts.runs.run_folder``).
        objects: what to save and restore besides the trainer, e.g. ``{"network": ..., "optimizer": ...,
            "lr_scheduler": ..., "best_model": AtomicCheckpointSaver, "random": RandomStates}``.
        evaluator: the validation engine whose best key metric is kept.
        resume: restore the latest state of ``run_dir`` when the trainer starts.
        keep: number of most recent states kept on disk.
    """

    def __init__(
        self, run_dir: str, objects: dict, evaluator: Engine | None = None, resume: bool = False, keep: int = 3
    ) -> None:
        self.run_dir, self.resume, self.keep = run_dir, as_flag(resume, "resume"), int(keep)
        self.objects = dict(objects)
        if evaluator is not None:
            self.objects["evaluator_best"] = _KeyMetricBest(evaluator)
        self.evaluator = evaluator
        self.checkpoint: Checkpoint | None = None

    def attach(self, engine: Engine) -> None:
        saver = DiskSaver(os.path.join(self.run_dir, STATE_FOLDER), atomic=True, require_empty=False)
        self.checkpoint = Checkpoint(
            {**self.objects, "trainer": engine},
            saver,
            filename_prefix=STATE_PREFIX,
            n_saved=self.keep,
            global_step_transform=lambda trainer, _: trainer.state.epoch,
            include_self=True,
        )
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.restore)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.checkpoint)

    def restore(self, engine: Engine) -> None:
        from monai.handlers import CheckpointLoader

        states = state_checkpoints(self.run_dir)
        if not states:
            raise FileNotFoundError(f"--resume true: no training state in {os.path.join(self.run_dir, STATE_FOLDER)}")
        path = states[-1]
        to_load = {**self.objects, "trainer": engine, "checkpointer": self.checkpoint}
        configured_length = engine.state.epoch_length
        try:
            CheckpointLoader(load_path=path, load_dict=to_load, map_location="cpu")(engine)
        except (RuntimeError, KeyError, ValueError) as error:
            raise ValueError(
                f"cannot resume from {path}: {error} (resume with the configuration the run started with)"
            ) from error
        if configured_length is not None and engine.state.epoch_length != configured_length:
            # ignite counts epochs as iteration // epoch_length: a saved run cannot change its epoch length
            logger.warning(
                "the resumed run keeps its epoch length of %d iterations (this configuration gives %d, e.g. another "
                "--num_pairs_per_epoch): start a new run (--init_ckpt) for another epoch length",
                engine.state.epoch_length,
                configured_length,
            )
        # a kill during a write leaves ignite's temporary file (tmp*, never a state_checkpoint_*) in this run's folder
        for stale in glob.glob(os.path.join(self.run_dir, STATE_FOLDER, "tmp*")) if _rank() == 0 else []:
            os.remove(stale)
            logger.info("removed %s, the partial write of a killed run", stale)
        best = ""
        if self.evaluator is not None and self.evaluator.state.best_metric_epoch > 0:
            value = self.evaluator.state.best_metric
            if not math.isnan(value):
                best = f", best {self.evaluator.state.key_metric_name} {value:.4f} at epoch "
                best += str(self.evaluator.state.best_metric_epoch)
        done, total = engine.state.epoch, engine.state.max_epochs
        then = f"continuing with epoch {done + 1}" if done < total else "nothing left to train (raise --max_epochs)"
        logger.info(
            "resumed run %s from %s: epoch %d of %d complete (iteration %d)%s; %s",
            self.run_dir,
            path,
            done,
            total,
            engine.state.iteration,
            best,
            then,
        )
