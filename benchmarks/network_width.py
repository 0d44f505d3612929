"""What a wider 3D network would cost the network-alone path on this CPU: the budget for the next training run.

    python benchmarks/network_width.py [--widths 1,1.5,2] [--threads 2] [--repeats 3] [--passes 2]

The shipped brain network is a half-width VoxelMorph UNet (channels ``[8, 16, 16, 16, 16, 16]``, 16 output
channels, final convolutions ``[8, 8]``). For each width multiplier this builds the same architecture from
``inference.yaml`` with every channel count scaled (random weights: the time does not depend on them) and times
what ``seconds`` of ``metrics.json`` covers for the network alone on a 1 mm 160 x 192 x 224 pair: the network
passes (``RegistrationEvalStep.network_ddf``, ``--passes`` of them, as ``--refine_iterations 0`` runs) and the
warp of the moving image. Prints parameters, megabytes of weights and the median seconds; the issue's budget is 3 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from training_pair import inference_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from scripts.integrate import sampling_grid  # noqa: E402
from scripts.registration_step import RegistrationEvalStep  # noqa: E402


def scaled_network(width: float) -> torch.nn.Module:
    """``inference.yaml``'s 3D ``network_def`` with every channel count multiplied by ``width``."""
    config = inference_config(spatial_dims=3)
    scale = lambda channels: max(int(round(channels * width)), 1)  # noqa: E731
    config["unet_channels"] = [scale(c) for c in config.get_parsed_content("unet_channels")]
    config["unet_out_channels"] = scale(config.get_parsed_content("unet_out_channels"))
    config["final_conv_channels"] = [scale(c) for c in config.get_parsed_content("final_conv_channels")]
    return config.get_parsed_content("network_def", instantiate=True).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="1,1.5,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    moving, fixed = torch.rand((2, 1, 1, 160, 192, 224), generator=generator)
    step = RegistrationEvalStep(network_passes=args.passes)
    print(f"{args.threads} threads, 160 x 192 x 224, {args.passes} network passes + warp, median of {args.repeats}")
    print("| width | parameters | MB | seconds |")
    print("|---|---|---|---|")
    for width in (float(w) for w in args.widths.split(",")):
        network = scaled_network(width)
        parameters = sum(p.numel() for p in network.parameters())
        times = []
        with torch.no_grad():
            for repeat in range(args.repeats + 1):  # the first call warms up (oneDNN primitives, allocator)
                start = time.perf_counter()
                ddf, _ = step.network_ddf(network, moving, fixed, [])
                step.warp_image(moving, sampling_grid(ddf))
                if repeat:
                    times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        print(f"| {width:g} | {parameters:,} | {parameters * 4 / 1e6:.2f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
