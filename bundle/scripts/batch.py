"""Cohort registration (``batch_inference``): many pairs in one process, resumable, sharded over torchrun ranks.

One process loads the model once and runs MONAI's ``SupervisedEvaluator`` over the pairs: a ``DataLoader`` with
workers reads and preprocesses the next pairs while the current one registers (``CohortPairDataset``), and the
outputs are written by a background thread while the next pair registers (``CohortWriter``). Each pair's folder
``O/<pair_id>/`` is published atomically (written into a hidden staging folder, then renamed), and its summary row
is kept in ``O/.batch/<pair_id>.json``: a rerun skips the pairs whose row and files are complete, whatever killed
the earlier run and however many ranks ran it. A pair that fails (unreadable file, NaN image, out of memory...) is
recorded with the bundle's own message and the cohort goes on; the run exits non-zero at the end with the count.
Under ``torchrun`` rank ``r`` of ``n`` takes pairs ``r, r + n, ...``; rank 0 merges ``O/summary.csv`` and
``O/summary.json`` once every rank is done.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import resource
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import list_data_collate
from torch.utils.data import Dataset

from .cohort import CohortPair
from .datalist import check_fits_in_memory, check_image_file, spatial_dims_of_file
from .files import atomic_folder, atomic_write_json, atomic_write_text, logger
from .pairs import PairDataset
from .writer import OUTPUT_NAMES, _output_files, write_pair_outputs

__all__ = [
    "CohortPairDataset",
    "CohortPlan",
    "CohortWriter",
    "GuardedStep",
    "Shard",
    "cohort_spatial_dims",
    "collate_one",
    "loader_worker_init",
    "parse_outputs",
]

SUMMARY_COLUMNS = (
    "pair_id",
    "status",
    "seconds",
    "seconds_load_to_write",
    "folding_fraction",
    "mean_dice",
    "mean_hd95",
    "identity_mean_dice",
    "fixed_image",
    "moving_image",
    "error",
)
DEFAULT_OUTPUTS = ("warped_image", "warped_label", "ddf", "affine", "overview", "metrics")


def parse_outputs(outputs: str | Sequence[str]) -> list[str]:
    """``--outputs warped_label,metrics`` (a comma-separated string, or the tuple the command line makes of it)
    -> checked output names (keys of ``scripts.writer.OUTPUT_NAMES``); ``all`` is every output but the inverse."""
    names = [str(n).strip() for n in (outputs.split(",") if isinstance(outputs, str) else outputs) if str(n).strip()]
    if names == ["all"]:
        return list(DEFAULT_OUTPUTS)
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown or not names:
        raise ValueError(f"--outputs {outputs!r}: unknown output(s) {unknown}; choose among {', '.join(OUTPUT_NAMES)}")
    return list(dict.fromkeys(names))


def cohort_spatial_dims(pairs: Sequence[CohortPair]) -> int:
    """2 or 3, from the first fixed image whose header reads: one unreadable file must not stop the cohort (its pair
    fails alone, as does a pair of the other dimensionality)."""
    errors = []
    for pair in pairs:
        try:
            return spatial_dims_of_file(pair.fixed_image, f"{pair.where} fixed_image")
        except (ValueError, OSError) as error:
            errors.append(str(error))
    raise ValueError(f"no fixed image of the cohort has a readable header (first: {errors[0] if errors else 'none'})")


class Shard:
    """This process' rank and the number of ranks (``torchrun`` sets ``RANK``/``WORLD_SIZE``; one process: 0 of 1).

    With several ranks the process group is initialised here (gloo on CPU, nccl with one GPU per rank), with a
    long timeout: rank 0 waits at the end for the slowest rank, which may register for hours.
    """

    def __init__(self, timeout_hours: float = 72.0) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(backend, timeout=timedelta(hours=timeout_hours))

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def select(self, items: Sequence) -> list:
        """This rank's share: items ``rank, rank + world_size, ...`` (the same split whatever is already done)."""
        return list(items[self.rank :: self.world_size])

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


class CohortPlan:
    """The cohort's pairs, what is already done in ``output_dir``, this rank's pending share, and the summary.

    A pair is done when its row in ``output_dir/.batch/<pair_id>.json`` says ``ok`` for the same input files and
    at least the requested outputs, and those files are in ``output_dir/<pair_id>/``; ``overwrite`` redoes all.
    """

    def __init__(
        self,
        pairs: Sequence[CohortPair],
        output_dir: str,
        outputs: str | Sequence[str] = DEFAULT_OUTPUTS,
        overwrite: bool = False,
        shard: Shard | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.output_dir = os.path.abspath(output_dir)
        self.outputs = parse_outputs(outputs)
        self.overwrite = bool(overwrite)
        self.shard = shard or Shard()
        self.rows_dir = os.path.join(self.output_dir, ".batch")
        mine = self.shard.select(self.pairs)
        self.pending = [p for p in mine if self.overwrite or not self.done(p)]
        self.skipped = len(mine) - len(self.pending)
        self._clean_staging(mine)
        logger.info(
            "rank %d of %d: %d pairs, %d to register, %d already done in %s%s",
            self.shard.rank,
            self.shard.world_size,
            len(mine),
            len(self.pending),
            self.skipped,
            self.output_dir,
            "" if self.overwrite or not self.skipped else " (--overwrite true redoes them)",
        )

    def folder(self, pair: CohortPair) -> str:
        return os.path.join(self.output_dir, pair.pair_id)

    def row_path(self, pair: CohortPair) -> str:
        return os.path.join(self.rows_dir, f"{pair.pair_id}.json")

    def read_row(self, pair: CohortPair) -> dict | None:
        try:
            with open(self.row_path(pair)) as stream:
                row = json.load(stream)
        except (OSError, ValueError):
            return None
        same_inputs = all(row.get(key) == getattr(pair, key) for key in ("fixed_image", "moving_image"))
        return row if same_inputs else None

    def expected_files(self, pair: CohortPair) -> list[str]:
        """The requested outputs this pair writes (a warped label needs a moving label)."""
        names = [n for n in self.outputs if n != "warped_label" or pair.moving_label]
        return [OUTPUT_NAMES[n] for n in names if n not in ("affine",)]  # affine.txt only with the affine stage

    def done(self, pair: CohortPair) -> bool:
        row = self.read_row(pair)
        if row is None or row.get("status") != "ok" or not set(self.outputs) <= set(row.get("outputs", [])):
            return False
        present = set(_output_files(self.folder(pair)))
        return all(name in present for name in self.expected_files(pair))

    def _clean_staging(self, mine: Sequence[CohortPair]) -> None:
        """Remove the staging folders a killed run left for this rank's pairs (``.<pair_id>.*``, hidden)."""
        if not os.path.isdir(self.output_dir):
            return
        prefixes = tuple(f".{p.pair_id}." for p in mine)
        for name in os.listdir(self.output_dir):
            if name.startswith(prefixes) and os.path.isdir(os.path.join(self.output_dir, name)):
                shutil.rmtree(os.path.join(self.output_dir, name), ignore_errors=True)

    def record(self, pair: CohortPair, row: dict) -> None:
        atomic_write_json(self.row_path(pair), {**pair.as_dict(), **row})

    def _rank_report(self, rank: int) -> dict | None:
        try:
            with open(os.path.join(self.rows_dir, "ranks", f"{rank}.json")) as stream:
                return json.load(stream)
        except (OSError, ValueError):
            return None

    def summarise(self) -> dict:
        """After every rank is done, rank 0 writes ``summary.csv`` (a row a pair, in the input order) and
        ``summary.json`` (counts and means); every rank then raises when any of its pairs failed."""
        # this rank's process: its peak memory (the DataLoader workers are processes of their own)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
        atomic_write_json(
            os.path.join(self.rows_dir, "ranks", f"{self.shard.rank}.json"),
            {"rank": self.shard.rank, "pairs": len(self.pending), "skipped": self.skipped, "peak_memory_mib": peak},
        )
        self.shard.barrier()
        summary: dict = {}
        if self.shard.rank == 0:
            summary = self._write_summary()
        self.shard.barrier()
        failed = [p for p in self.shard.select(self.pairs) if (self.read_row(p) or {}).get("status") != "ok"]
        if self.shard.rank == 0 and summary.get("failed"):
            where = os.path.join(self.output_dir, "summary.csv")
            raise RuntimeError(f"{summary['failed']} of {summary['pairs']} pairs failed: see {where}")
        if failed:
            raise RuntimeError(f"rank {self.shard.rank}: {len(failed)} of its pairs failed (e.g. {failed[0].pair_id})")
        return summary

    def _write_summary(self) -> dict:
        rows = []
        for pair in self.pairs:
            row = self.read_row(pair) or {**pair.as_dict(), "status": "missing", "error": "no rank registered it"}
            rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
        atomic_write_text(os.path.join(self.output_dir, "summary.csv"), text.getvalue())
        ok = [r for r in rows if r.get("status") == "ok"]

        def mean(key: str) -> float | None:
            values = [float(r[key]) for r in ok if r.get(key) is not None and math.isfinite(float(r[key]))]
            return float(np.mean(values)) if values else None

        summary = {
            "pairs": len(rows),
            "ok": len(ok),
            "failed": len(rows) - len(ok),
            "failed_pairs": [r["pair_id"] for r in rows if r.get("status") != "ok"],
            "outputs": self.outputs,
            "world_size": self.shard.world_size,
            # means over the registered pairs of each pair's value (Dice/HD95: the pair's mean over its structures)
            "mean_dice": mean("mean_dice"),
            "mean_hd95": mean("mean_hd95"),
            "identity_mean_dice": mean("identity_mean_dice"),
            "mean_folding_fraction": mean("folding_fraction"),
            "mean_seconds": mean("seconds"),
            "ranks": [self._rank_report(rank) for rank in range(self.shard.world_size)],
        }
        atomic_write_json(os.path.join(self.output_dir, "summary.json"), summary)
        logger.info(
            "%d of %d pairs registered (%d failed); summary in %s",
            summary["ok"],
            summary["pairs"],
            summary["failed"],
            os.path.join(self.output_dir, "summary.csv"),
        )
        return summary


class CohortPairDataset(Dataset):
    """Item ``i``: pair ``i`` read and preprocessed (``{"cohort_pair", "pair"}``, the pair as ``PairDataset`` makes
    it), or ``{"cohort_pair", "error"}`` with the bundle's message when its files cannot be read: in a
    ``DataLoader`` worker, a bad pair must not stop the loader (and with it the cohort)."""

    def __init__(
        self,
        pairs: Sequence[CohortPair],
        preprocessing,
        pixdim: float | Sequence[float] = 1.0,
        resample_moving: bool = False,
    ) -> None:
        self.pairs, self.preprocessing = list(pairs), preprocessing
        self.pixdim, self.resample_moving = pixdim, bool(resample_moving)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        try:
            subjects = []
            for role in ("fixed", "moving"):
                entry = {"image": getattr(pair, f"{role}_image")}
                check_image_file(entry["image"], f"{pair.where} {role}_image", read_data=False)
                if getattr(pair, f"{role}_label"):
                    entry["label"] = getattr(pair, f"{role}_label")
                    check_image_file(entry["label"], f"{pair.where} {role}_label", read_data=False)
                subjects.append(entry)
            check_fits_in_memory(pair.fixed_image, self.pixdim, f"{pair.where} fixed_image", pair.moving_image)
            loaded = [self.preprocessing(subject) for subject in subjects]
            item = PairDataset(loaded, mode="explicit", pairs=[(0, 1)], resample_moving=self.resample_moving)[0]
            return {"cohort_pair": pair, "pair": item}
        except Exception as error:  # noqa: BLE001 - every failure of one pair is that pair's, recorded and skipped
            return {"cohort_pair": pair, "error": f"{type(error).__name__}: {error}"}


BACKGROUND_NICENESS = 10


def run_in_background() -> None:
    """Lower the calling thread's CPU priority (Linux: niceness is per thread, inherited by the threads it starts).

    The loader workers and the writer thread then use the cycles the registration leaves idle instead of taking
    cores from its threads: on a CPU the registration's parallel loops wait at every barrier for their slowest
    thread, so a background process that takes a core slows them far more than its own share of the work.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at the usual priority
        pass


def loader_worker_init(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: a loader worker reads and preprocesses in the background."""
    run_in_background()


def collate_one(items: list[dict]) -> dict:
    """``DataLoader(batch_size=1)``'s collation: MONAI's for a readable pair, the error item as it is."""
    (item,) = items
    if "error" in item:
        return item
    return {"cohort_pair": item["cohort_pair"], **list_data_collate([item["pair"]])}


class GuardedStep:
    """The evaluator's ``iteration_update``: the registration step on one pair, its failure caught and returned as
    ``{"error"}`` (a pair that cannot be registered is recorded; the cohort goes on)."""

    def __init__(self, step) -> None:
        self.step = step

    def __call__(self, engine: Engine, batch: Mapping) -> dict:
        pair = batch["cohort_pair"]
        if "error" in batch:
            return {"cohort_pair": pair, "error": batch["error"]}
        try:
            return {"cohort_pair": pair, **self.step(engine, batch)}
        except Exception as error:  # noqa: BLE001 - recorded with the pair, as the loader's errors are
            return {"cohort_pair": pair, "error": f"{type(error).__name__}: {error}"}


class CohortWriter:
    """Evaluator handler: each registered pair's outputs written by a background thread into a staging folder that
    replaces ``O/<pair_id>/`` when complete, then the pair's summary row; a failed pair gets its row at once.

    One write is in flight at a time (the next pair's write waits for it), so memory stays at two pairs' outputs.
    """

    def __init__(self, plan: CohortPlan) -> None:
        self.plan = plan
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cohort-writer", initializer=run_in_background
        )
        self._job: Future | None = None
        self._clock = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._finish)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._abort)

    def _start(self, engine: Engine) -> None:
        self._clock = time.perf_counter()

    def _wait(self) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            job.result()

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        pair: CohortPair = output["cohort_pair"]
        if "error" in output:
            self._wait()
            self._fail(pair, output["error"], time.perf_counter() - self._clock)
            self._clock = time.perf_counter()
            return
        batch = engine.state.batch
        self._wait()  # one write in flight
        self._job = self._pool.submit(self._write, pair, batch, output, self._clock)
        self._clock = time.perf_counter()

    def _fail(self, pair: CohortPair, error: str, seconds: float) -> None:
        logger.error("pair %s (%s) failed: %s", pair.pair_id, pair.where, error)
        self.plan.record(pair, {"status": "failed", "error": error, "seconds_load_to_write": seconds})

    def _write(self, pair: CohortPair, batch: Mapping, output: Mapping, started: float) -> None:
        record = dict(output["records"][0])
        folder = self.plan.folder(pair)
        try:
            foreign = [
                f for f in _output_files(folder) if os.path.basename(f) not in OUTPUT_NAMES.values() or os.sep in f
            ]
            if foreign:
                raise FileExistsError(
                    f"{folder} holds files that are not registration outputs (e.g. {foreign[0]}); move them away"
                )
            with atomic_folder(folder) as staging:
                write_pair_outputs(str(staging), batch, output, 0, self.plan.outputs)
                record["seconds_load_to_write"] = time.perf_counter() - started
                if "metrics" in self.plan.outputs:
                    atomic_write_json(os.path.join(staging, "metrics.json"), record)
        except Exception as error:  # noqa: BLE001 - a pair whose outputs cannot be written is a failed pair
            self._fail(pair, f"{type(error).__name__}: {error}", time.perf_counter() - started)
            return
        row = {
            "status": "ok",
            "outputs": self.plan.outputs,
            "seconds": record.get("seconds"),
            "seconds_load_to_write": record.get("seconds_load_to_write"),
            "folding_fraction": record.get("folding_fraction"),
            "mean_dice": record.get("registered_mean_dice"),
            "mean_hd95": record.get("registered_mean_hd95"),
            "identity_mean_dice": record.get("identity_mean_dice"),
            "error": None,
        }
        self.plan.record(pair, row)
        logger.info(
            "registered %s in %.2f s (%s); outputs in %s",
            pair.pair_id,
            record["seconds_load_to_write"],
            "no labels to score" if row["mean_dice"] is None else f"mean Dice {row['mean_dice']:.4f}",
            folder,
        )

    def _finish(self, engine: Engine) -> None:
        self._wait()

    def _abort(self, engine: Engine, error: Exception) -> None:
        """An error outside any one pair (e.g. the checkpoint): let the write in flight finish, then re-raise."""
        try:
            self._wait()
        finally:
            raise error
