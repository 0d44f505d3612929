"""What ``--resume true`` costs: seconds from the command to the first resumed iteration, and disk per saved state.

    python benchmarks/resume_cost.py [--spatial_dims 2] [--threads 2]

Trains the default network (train.yaml, ``--spatial_dims`` 2 or 3) on the synthetic data for 2 epochs of 8 pairs,
then runs the same command with ``--max_epochs 3 --resume true``, as a user would after a crash, and prints from
the runs' logs:

- start-up: the command to the trainer's start (imports, config parsing, data caching), fresh and resumed;
- restore: the trainer's start to the log line ``resumed run ...`` (reading the state, loading every object), after
  which the first resumed iteration runs;
- the size of one full training state (``state_checkpoint_<epoch>.pt``) next to the network's weights (``model.pt``),
  the time to write one (a ``torch.save`` into the same folder, as ignite's ``DiskSaver`` does every epoch) and the
  disk the ``keep_states`` (3) kept states take.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVENTS = {
    "trainer": "SupervisedTrainer - INFO - Engine run resuming from",
    "restored": "registration - INFO - resumed run",
}


def train(out: Path, threads: int, extra: list[str]) -> tuple[float, dict[str, float]]:
    """One training in a fresh process; returns its start time and the log times of the ``EVENTS`` it reached."""
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.yaml"]
    command += ["--output_dir", str(out), "--synthetic_dir", str(out.parent / "synthetic"), "--run_name", "run"]
    command += ["--num_pairs_per_epoch", "8", "--batch_size", "4", "--val_interval", "1", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    started = time.time()
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise SystemExit(process.stdout[-3000:] + process.stderr[-3000:])
    events: dict[str, float] = {}
    for line in (process.stdout + process.stderr).splitlines():
        for key, text in EVENTS.items():
            if text in line and key not in events:
                events[key] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return started, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spatial_dims", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as folder:
        dims = ["--spatial_dims", str(args.spatial_dims)]
        train(Path(folder) / "warm_up", args.threads, [*dims, "--max_epochs", "1"])  # writes the synthetic data
        out = Path(folder) / "out"
        fresh_start, fresh = train(out, args.threads, [*dims, "--max_epochs", "2"])
        resumed_start, resumed = train(out, args.threads, [*dims, "--max_epochs", "3", "--resume", "true"])
        run = out / "runs" / "run"
        states = sorted((run / "checkpoints").glob("state_checkpoint_*.pt"))
        state_size, model_size = states[-1].stat().st_size, (run / "model.pt").stat().st_size
        state = torch.load(states[-1], weights_only=True)
        started = time.perf_counter()
        torch.save(state, run / "checkpoints" / "timing.pt")
        write_seconds = time.perf_counter() - started
        restore = resumed["restored"] - resumed["trainer"]
        print(f"spatial_dims {args.spatial_dims}, {args.threads} threads, default network")
        print(f"start-up, fresh run:   {fresh['trainer'] - fresh_start:6.2f} s (command -> trainer start)")
        print(f"start-up, resumed run: {resumed['trainer'] - resumed_start:6.2f} s (command -> trainer start)")
        print(f"restore:               {restore:6.3f} s (trainer start -> log 'resumed run')")
        print(f"command -> first resumed iteration: {resumed['restored'] - resumed_start:.2f} s")
        print(f"full training state: {state_size / 2**20:.2f} MiB (model.pt: {model_size / 2**20:.2f} MiB)")
        print(f"write one state: {write_seconds:.3f} s; disk for the 3 kept: {3 * state_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
