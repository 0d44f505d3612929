"""Registration time of one 3D pair on this machine: the network alone, and network + default refinement.

    python benchmarks/inference_time.py [--data ../shared/data/oasis3d] [--threads 2] [--repeats 2]
        [--variants network,fast,default,accurate]

Runs the README's command (``python -m monai.bundle run inference`` with the shipped model, moving subject_b ->
fixed subject_a at 1 mm, 160 x 192 x 224) as a user would, ``repeats`` times per variant, and prints the medians of
what ``metrics.json`` reports:

- ``seconds``: network + integration (+ refinement) + warp, the figure of the "network <= 3 s" target;
- ``seconds_load_to_write``: reading the images to the last output written, the figure of the "<= 15 s" target;
- start-up: the process' wall time minus load-to-write (Python, torch and MONAI imports, config parsing);
- for ``default-inverse`` (``--write_inverse_ddf true``), how far ``φ ∘ φ⁻¹`` is from the identity (``metrics.json``'s
  ``inverse_consistency``: mean / 99th percentile / max, 1 mm voxels, of the last run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "network": ["--refine_iterations", "0"],
    "fast": ["--refine_preset", "fast"],
    "default": [],
    "accurate": ["--refine_preset", "accurate"],
    "default-inverse": ["--write_inverse_ddf", "true"],  # default, plus inverse_ddf.nii.gz
    "default-noaffine": ["--affine", "false"],  # default without the affine stage (pre-aligned inputs)
    "multimodal": ["--multimodal", "true"],  # the moving contrast mapped onto the fixed one first
}


def run_once(data: Path, threads: int, extra: list[str]) -> dict:
    """One inference run in a fresh process; returns metrics.json plus the process' wall seconds."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "monai.bundle", "run", "inference",
            "--config_file", "bundle/configs/inference.yaml",
            "--fixed_image", str(data / "subject_a_image.nii.gz"),
            "--moving_image", str(data / "subject_b_image.nii.gz"),
            "--moving_label", str(data / "subject_b_label.nii.gz"),
            "--output_dir", out, *extra,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
        start = time.perf_counter()
        process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if process.returncode != 0:
            raise SystemExit(f"inference failed:\n{(process.stdout + process.stderr)[-3000:]}")
        record = json.loads((Path(out) / "metrics.json").read_text())
    record["process_wall_seconds"] = wall
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "oasis3d"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="network,default", help=f"comma-separated subset of {list(VARIANTS)}")
    args = parser.parse_args()
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}, {args.repeats} runs per variant")
    print(
        "| variant | seconds (network + refinement + warp) | load to write s | start-up s | runs (load to write) "
        "| φ ∘ φ⁻¹ - id, voxels (mean / p99 / max) |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        runs = [run_once(Path(args.data), args.threads, VARIANTS[name]) for _ in range(args.repeats)]
        seconds = statistics.median(r["seconds"] for r in runs)
        total = statistics.median(r["seconds_load_to_write"] for r in runs)
        startup = statistics.median(r["process_wall_seconds"] - r["seconds_load_to_write"] for r in runs)
        every = ", ".join(f"{r['seconds_load_to_write']:.1f}" for r in runs)
        inverse = runs[-1].get("inverse_consistency")
        consistency = (
            "-"
            if inverse is None
            else " / ".join(f"{inverse[k]:.2f}" for k in ("mean_voxels", "p99_voxels", "max_voxels"))
        )
        print(f"| {name} | {seconds:.2f} | {total:.2f} | {startup:.2f} | {every} | {consistency} |", flush=True)


if __name__ == "__main__":
    main()
