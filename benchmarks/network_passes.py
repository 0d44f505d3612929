#!/usr/bin/env python
"""How many network passes inference should run: Dice and folding of the shipped models on their own synthetic
validation pairs, per number of passes.

    python benchmarks/network_passes.py [--passes 1,2,3] [--dims 3,2] [--pairs 8] [--threads 2]

Each pass registers the moving image warped by the passes before it and the fields compose
(``RegistrationEvalStep(network_passes=n).network_ddf``, what ``inference.yaml`` runs). The pairs are the
validation pairs the shipped models were selected on (``synthmorph.yaml``'s ``validate#dataset``: random label maps,
drawn from a fixed seed, at the training grid: 80 x 96 x 112 for 3D, 160 x 192 for 2D); no brain and no test subject
is used. Prints mean Dice over the synthetic labels present in both images, folded voxels % and seconds per pair.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from monai.bundle import ConfigParser  # noqa: E402
from scripts.integrate import warp  # noqa: E402
from scripts.metrics import deformation_stats, dice_per_label, labels_to_score  # noqa: E402
from scripts.registration_step import RegistrationEvalStep  # noqa: E402

CONFIGS = REPO / "bundle" / "configs"
SETUPS = {  # the configs that trained each shipped model, and its weights
    3: (["train.yaml", "brain3d.yaml", "synthmorph.yaml"], REPO / "bundle" / "models" / "model.pt"),
    2: (["train.yaml", "synthmorph.yaml"], REPO / "bundle" / "models" / "2d" / "model.pt"),
}


def model_and_pairs(spatial_dims: int, num_pairs: int):
    """The shipped model of that dimensionality (eval mode) and its synthetic validation dataset."""
    files, weights = SETUPS[spatial_dims]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in files])
    parser["bundle_root"] = str(REPO / "bundle")
    parser["synthmorph_validation_pairs"] = num_pairs
    parser["synthmorph_device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.eval(), parser.get_parsed_content("validate#dataset")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="1,2,3")
    parser.add_argument("--dims", default="3,2")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    passes = [int(p) for p in args.passes.split(",")]
    print(f"{args.threads} threads, {args.pairs} synthetic validation pairs per model")
    print("| model | passes | mean Dice | folded voxels % | seconds per pair |")
    print("|---|---|---|---|---|")
    for spatial_dims in (int(d) for d in args.dims.split(",")):
        network, pairs = model_and_pairs(spatial_dims, args.pairs)
        steps = {n: RegistrationEvalStep(network_passes=n) for n in passes}
        scores = {n: {"dice": [], "folded": [], "seconds": []} for n in ["none", *passes]}
        for index in range(len(pairs)):
            pair = pairs[index]
            moving, fixed = pair["moving_image"][None], pair["fixed_image"][None]
            fixed_label = pair["fixed_label"][0].numpy().round().astype(np.int32)
            moving_label = pair["moving_label"][None].float()
            ids = labels_to_score(fixed_label, moving_label[0, 0].numpy().astype(np.int32), None)
            identity = dice_per_label(fixed_label, moving_label[0, 0].numpy().astype(np.int32), ids)
            scores["none"]["dice"].append(statistics.mean(identity.values()))
            for n, step in steps.items():
                with torch.no_grad():
                    start = time.perf_counter()
                    ddf, _ = step.network_ddf(network, moving, fixed, [])
                    scores[n]["seconds"].append(time.perf_counter() - start)
                    warped = warp(moving_label, ddf, mode="nearest", padding_mode="zeros")[0, 0]
                dice = dice_per_label(fixed_label, warped.numpy().round().astype(np.int32), ids)
                scores[n]["dice"].append(statistics.mean(dice.values()))
                scores[n]["folded"].append(100 * deformation_stats(ddf[0].numpy())["folding_fraction"])
        name = f"{spatial_dims}D"
        print(f"| {name} | no registration | {statistics.mean(scores['none']['dice']):.4f} | 0 | 0 |")
        for n in passes:
            row = scores[n]
            print(
                f"| {name} | {n} | {statistics.mean(row['dice']):.4f} | {statistics.mean(row['folded']):.4f} "
                f"| {statistics.median(row['seconds']):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
