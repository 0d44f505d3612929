"""Run folders: every training writes its logs, validation reports and checkpoints into a folder of its own.

A rerun into the same ``output_dir`` used to mix its TensorBoard events with the previous run's and overwrite its
reports; a folder per run (``runs_dir/<run name>``, a timestamp unless named) keeps each run's record whole, and is
what ``--resume true`` continues.
"""

from __future__ import annotations

import glob
import os
import time

from .files import logger

__all__ = ["STATE_FOLDER", "STATE_PREFIX", "as_flag", "run_folder", "state_checkpoints"]

STATE_FOLDER = "checkpoints"  # full training states inside a run folder
STATE_PREFIX = "state"  # ignite's Checkpoint names them state_checkpoint_<epoch>.pt


def as_flag(value: bool | str | int, name: str) -> bool:
    """A yes/no option as given on the command line: the CLI passes ``--resume true`` as the string ``"true"``,
    which a plain ``bool()`` would also take ``"false"`` to be."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no", "none", ""):
            return False
        raise ValueError(f"--{name} expects true or false, got '{value}'")
    return bool(value)


def state_checkpoints(run_dir: str) -> list[str]:
    """Full-state checkpoints of a run, oldest epoch first (temporary files of an interrupted write are skipped)."""

    def epoch(path: str) -> int:
        return int(os.path.basename(path).rsplit("_", 1)[-1].split(".")[0])

    paths = glob.glob(os.path.join(run_dir, STATE_FOLDER, f"{STATE_PREFIX}_checkpoint_*.pt"))
    return sorted(paths, key=epoch)


def _new_run_name(runs_dir: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, number = stamp, 1
    while os.path.exists(os.path.join(runs_dir, name)):  # two runs started within one second
        number += 1
        name = f"{stamp}-{number}"
    return name


def _resolve(runs_dir: str, name: str | None, resume: bool) -> str:
    if not resume:
        run_dir = os.path.join(runs_dir, name or _new_run_name(runs_dir))
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            raise FileExistsError(
                f"run folder {run_dir} already holds a run: pass --resume true to continue it, or another --run_name"
            )
        os.makedirs(run_dir, exist_ok=True)
        logger.info("run folder %s (TensorBoard events, validation reports, checkpoints of this run)", run_dir)
        return run_dir
    if name:
        run_dir = os.path.join(runs_dir, name)
        if not state_checkpoints(run_dir):
            raise FileNotFoundError(
                f"--resume true: no training state to resume in {os.path.join(run_dir, STATE_FOLDER)} "
                "(the run saves one at the end of each epoch; drop --resume to start a new run)"
            )
        return run_dir
    candidates = [
        (os.path.getmtime(states[-1]), folder)
        for folder in glob.glob(os.path.join(runs_dir, "*"))
        if (states := state_checkpoints(folder))
    ]
    if not candidates:
        raise FileNotFoundError(
            f"--resume true: no run with a saved training state in {runs_dir} "
            f"(expected <run>/{STATE_FOLDER}/{STATE_PREFIX}_checkpoint_<epoch>.pt; drop --resume to start a new run, "
            "or check --output_dir)"
        )
    return max(candidates)[1]


def run_folder(runs_dir: str, name: str | int | None = None, resume: bool | str = False) -> str:
    """The folder of this training run, created when new.

    Args:
        runs_dir: parent of all run folders (``output_dir/runs``).
        name: the run's folder name; ``None`` = a new timestamp ``YYYYmmdd-HHMMSS`` (or, with ``resume``, the run
            whose latest training state is the most recent).
        resume: continue an existing run: its folder must hold a saved training state, else ``FileNotFoundError``
            names the folder searched (failing beats silently starting over, which would cost the whole training).
            Without it, a named folder that already holds a run is refused (``FileExistsError``) rather than mixed.

    Under ``torch.distributed`` rank 0 decides and broadcasts, so all ranks agree on a timestamp name.
    """
    import torch.distributed as dist

    resume = as_flag(resume, "resume")
    name = None if name is None else str(name)  # the CLI turns --run_name 1 into an int
    if not (dist.is_available() and dist.is_initialized()):
        return _resolve(runs_dir, name, resume)
    decided: list = [None]
    if dist.get_rank() == 0:
        try:
            decided[0] = _resolve(runs_dir, name, resume)
        except (FileNotFoundError, FileExistsError) as error:  # every rank must fail, not wait forever on the broadcast
            decided[0] = error
    dist.broadcast_object_list(decided, src=0)
    if isinstance(decided[0], Exception):
        raise decided[0]
    return decided[0]
