"""Cohort throughput: pairs per minute of (a) a shell loop of single commands, (b) one ``batch_inference`` process,
(c) ``torchrun`` with several processes, all writing the same outputs on the same pairs.

    python benchmarks/batch_throughput.py [--data ../shared/data] [--pairs 8] [--threads 2]
        [--modes loop,batch,torchrun] [--outputs all] [--keep DIR]

The pairs are a ring over real 1 mm brains (``oasis3d`` a, b and ``oasis3d_train`` v, w, p, q, x, y: subject ``i + 1``
moving onto subject ``i``; four of them have labels, so three pairs are scored). Each mode runs as a user would type
it, with ``--threads`` CPU threads in all: (a) ``python -m monai.bundle run inference`` once per pair with
``OMP_NUM_THREADS=threads``; (b) ``batch_inference`` in one process with ``threads`` threads; (c) ``torchrun
--nproc_per_node=threads`` with one thread each. It prints wall time, pairs per minute, the speed-up over the loop,
the peak memory of the largest process and of all processes together (sampled every 0.2 s), and the largest
difference of any scored pair's mean Dice from the loop's (the registration must not change).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIGS = "['bundle/configs/inference.yaml','bundle/configs/batch_inference.yaml']"
SUBJECTS = [("oasis3d", s) for s in "ab"] + [("oasis3d_train", s) for s in "vwpqxy"]


def ring_pairs(data: Path, count: int) -> list[dict]:
    subjects = []
    for folder, name in SUBJECTS:
        image = data / folder / f"subject_{name}_image.nii.gz"
        label = data / folder / f"subject_{name}_label.nii.gz"
        if image.is_file():
            subjects.append({"image": str(image), "label": str(label) if label.is_file() else ""})
    if len(subjects) < 2:
        raise SystemExit(f"need at least two subjects under {data}")
    pairs = []
    for i in range(count):
        fixed, moving = subjects[i % len(subjects)], subjects[(i + 1) % len(subjects)]
        labelled = bool(fixed["label"] and moving["label"])
        pairs.append(
            {
                "fixed_image": fixed["image"],
                "moving_image": moving["image"],
                "fixed_label": fixed["label"] if labelled else "",
                "moving_label": moving["label"] if labelled else "",
                "pair_id": f"pair{i:03d}",
            }
        )
    return pairs


class MemorySampler(threading.Thread):
    """Peak RSS of the largest process and of the whole tree under ``pid`` (sampled every 0.2 s)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_process = self.peak_total = 0.0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                processes = [self.root, *self.root.children(recursive=True)]
                sizes = []
                for process in processes:
                    try:
                        sizes.append(process.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
                if sizes:
                    self.peak_process = max(self.peak_process, max(sizes))
                    self.peak_total = max(self.peak_total, sum(sizes))
            except psutil.Error:
                pass
            time.sleep(0.2)


def timed(command: list[str], env: dict) -> tuple[float, MemorySampler, subprocess.CompletedProcess]:
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(process.pid)
    sampler.start()
    output, _ = process.communicate()
    sampler.running = False
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{output[-4000:]}")
    return wall, sampler, subprocess.CompletedProcess(command, process.returncode, output)


def environment(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")


def run_loop(pairs: list[dict], out: Path, threads: int) -> tuple[float, float, float, dict]:
    wall, peak_process, dice = 0.0, 0.0, {}
    for pair in pairs:
        command = [
            sys.executable, "-m", "monai.bundle", "run", "inference",
            "--config_file", "bundle/configs/inference.yaml",
            "--fixed_image", pair["fixed_image"], "--moving_image", pair["moving_image"],
            "--output_dir", str(out / pair["pair_id"]),
        ]  # fmt: skip
        if pair["moving_label"]:
            command += ["--moving_label", pair["moving_label"], "--fixed_label", pair["fixed_label"]]
        seconds, sampler, _ = timed(command, environment(threads))
        wall += seconds
        peak_process = max(peak_process, sampler.peak_total)
        record = json.loads((out / pair["pair_id"] / "metrics.json").read_text())
        if "registered_mean_dice" in record:
            dice[pair["pair_id"]] = record["registered_mean_dice"]
    return wall, peak_process, peak_process, dice


def run_batch(pairs_csv: Path, out: Path, threads: int, ranks: int, outputs: str) -> tuple[float, float, float, dict]:
    arguments = ["batch_inference", "--config_file", CONFIGS, "--pairs", str(pairs_csv), "--output_dir", str(out)]
    arguments += ["--outputs", outputs]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "-m", "monai.bundle"]
        command += ["run", *arguments]
        env = environment(max(1, threads // ranks))
    else:
        command = [sys.executable, "-m", "monai.bundle", "run", *arguments]
        env = environment(threads)
    wall, sampler, _ = timed(command, env)
    with open(out / "summary.csv") as stream:
        rows = list(csv.DictReader(stream))
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        raise SystemExit(f"batch run failed for {failed}")
    dice = {row["pair_id"]: float(row["mean_dice"]) for row in rows if row["mean_dice"]}
    return wall, sampler.peak_process, sampler.peak_total, dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="loop,batch,torchrun")
    parser.add_argument("--outputs", default="all", help="batch_inference --outputs (the loop writes all)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the outputs in this folder")
    args = parser.parse_args()
    pairs = ring_pairs(args.data, args.pairs)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        pairs_csv = root / "pairs.csv"
        with open(pairs_csv, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(pairs[0]))
            writer.writeheader()
            writer.writerows(pairs)
        results = {}
        for mode in args.modes.split(","):
            out = root / mode
            if mode == "loop":
                results[mode] = run_loop(pairs, out, args.threads)
            elif mode == "batch":
                results[mode] = run_batch(pairs_csv, out, args.threads, 1, args.outputs)
            elif mode == "torchrun":
                results[mode] = run_batch(pairs_csv, out, args.threads, args.threads, args.outputs)
            else:
                raise SystemExit(f"unknown mode {mode}")
            wall = results[mode][0]
            print(f"{mode}: {wall:.1f} s for {len(pairs)} pairs", flush=True)
    reference = results.get("loop")
    print(f"\n{len(pairs)} pairs of 1 mm brains, {args.threads} CPU threads in all, --outputs {args.outputs}")
    print(
        "| mode | wall s | pairs / min | speed-up vs loop | peak MiB, largest process | peak MiB, all | max |ΔDice| |"
    )
    print("|---|---|---|---|---|---|---|")
    labels = {
        "loop": "(a) shell loop of single commands",
        "batch": f"(b) one batch_inference process, {args.threads} threads",
        "torchrun": f"(c) torchrun, {args.threads} processes x {max(1, args.threads // args.threads)} thread",
    }
    for mode, (wall, peak_process, peak_total, dice) in results.items():
        speed = f"{reference[0] / wall:.2f}x" if reference else "-"
        if reference and dice:
            difference = max(abs(dice[k] - reference[3][k]) for k in dice if k in reference[3])
            shown = f"{difference:.4f} ({len(dice)} pairs)"
        else:
            shown = "-"
        print(
            f"| {labels[mode]} | {wall:.1f} | {60 * len(pairs) / wall:.2f} | {speed} | {peak_process:.0f} | "
            f"{peak_total:.0f} | {shown} |"
        )


if __name__ == "__main__":
    main()
