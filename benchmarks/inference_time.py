"""Seconds to register one 3D pair at full resolution (network + integration + warp) on this machine.

    python benchmarks/inference_time.py [--data ../shared/data/oasis3d] [--threads 2] [--repeats 3] [--ckpt PATH]

Builds ``network_def`` from ``bundle/configs/inference.yaml`` (so the timed network is the shipped one), loads the
real OASIS pair at 1 mm (160 x 192 x 224) through the bundle's preprocessing, and prints the median over repeats
after one warm-up run. Weights do not change the cost; pass ``--ckpt`` to time a trained checkpoint anyway.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.networks.blocks import Warp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "oasis3d"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = ConfigParser()
    config.read_config(str(REPO / "bundle" / "configs" / "inference.yaml"))
    config.update({"spatial_dims": 3, "device": "$torch.device('cpu')"})
    network = config.get_parsed_content("network_def").eval()
    if args.ckpt:
        network.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True))
    preprocessing = config.get_parsed_content("preprocessing")
    fixed = preprocessing({"image": f"{args.data}/subject_a_image.nii.gz"})["image"][None]
    moving = preprocessing({"image": f"{args.data}/subject_b_image.nii.gz"})["image"][None]
    warp = Warp(mode="bilinear", padding_mode="border")

    def register() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            ddf = network(torch.cat([moving, fixed], dim=1).as_tensor())
            warp(moving.as_tensor(), ddf)
        return time.perf_counter() - start

    register()  # warm-up: first-call allocations and kernel selection
    times = [register() for _ in range(args.repeats)]
    print(f"shape {tuple(fixed.shape[2:])}, {args.threads} threads, {torch.__version__}")
    every = ", ".join(f"{t:.2f}" for t in times)
    print(f"seconds per 3D pair (median of {args.repeats}): {statistics.median(times):.2f}  (all: {every})")


if __name__ == "__main__":
    main()
