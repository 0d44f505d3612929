#!/usr/bin/env python
"""How many network passes inference should run: Dice and folding of the shipped models on their own synthetic
validation pairs, per number of passes, with and without test-time refinement.

    python benchmarks/network_passes.py [--passes 1,2,3] [--dims 3,2] [--pairs 8] [--presets fast,default]
        [--threads 2] [--averages none,flip,inverse]

Each pass registers the moving image warped by the passes before it and the fields compose
(``RegistrationEvalStep(network_passes=n).network_ddf``, what ``inference.yaml`` runs). The pairs are the
validation pairs the shipped models were selected on (``synthmorph.yaml``'s ``validate#dataset``: random label maps
drawn from a fixed seed); no brain and no test subject is used. Each model runs as ``inference.yaml`` builds it: the
3D pairs (drawn on the 2 mm training grid, 80 x 96 x 112) are upsampled to 1 mm (linear images, nearest labels), as
the network meets a 1 mm brain; 2D pairs at their own 160 x 192. ``--presets`` adds, for 3D, each refinement preset
of ``inference.yaml`` started from 1 and from 2 passes (the refinement optimises the last pass' velocity; ~1 min per
pair and preset). ``--averages`` adds test-time averaging of each pass' velocity, in place of more passes for the
same number of network evaluations (network alone): ``flip``, the mean of ``v`` and of the velocity predicted for
the pair mirrored along the first axis (mirrored back, first component negated); ``inverse``, the mean of ``v`` and
of ``-v`` predicted for the swapped pair (``exp(-v)`` inverts ``exp(v)``, so a perfectly symmetric network gives the
same field). Prints mean Dice over the synthetic labels present in both images, folded voxels % and median seconds
per pair (network + refinement).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from training_pair import inference_config, shipped_network

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

import torch.nn.functional as F  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from scripts.integrate import warp  # noqa: E402
from scripts.metrics import deformation_stats, dice_per_label, labels_to_score  # noqa: E402
from scripts.registration_step import RegistrationEvalStep  # noqa: E402

CONFIGS = REPO / "bundle" / "configs"
TRAINED_BY = {3: ["train.yaml", "brain3d.yaml", "synthmorph.yaml"], 2: ["train.yaml", "synthmorph.yaml"]}


def model_and_pairs(spatial_dims: int, num_pairs: int):
    """The shipped model as inference.yaml builds and loads it (eval mode), and its synthetic validation dataset."""
    network = shipped_network(inference_config(spatial_dims=spatial_dims))
    training = ConfigParser()
    training.read_config([str(CONFIGS / name) for name in TRAINED_BY[spatial_dims]])
    training["bundle_root"] = str(REPO / "bundle")
    training["synthmorph_validation_pairs"] = num_pairs
    training["synthmorph_device"] = "$torch.device('cpu')"
    return network, training.get_parsed_content("validate#dataset")


class AveragedVelocity(torch.nn.Module):
    """The network with each velocity averaged over a second evaluation (``flip`` or ``inverse``, module doc)."""

    def __init__(self, network: torch.nn.Module, average: str) -> None:
        super().__init__()
        self.network, self.average = network, average
        self.pooled_pair, self.integrate, self.upsample_ddf = (
            network.pooled_pair,
            network.integrate,
            network.upsample_ddf,
        )

    def velocity_from_pooled(self, pooled: torch.Tensor, spatial) -> torch.Tensor:
        velocity = self.network.velocity_from_pooled(pooled, spatial)
        if self.average == "inverse":
            return 0.5 * (velocity - self.network.velocity_from_pooled(pooled.flip(1), spatial))
        if list(pooled.shape[2:]) != self.network.coarse_shape(spatial):
            raise ValueError("flip averaging needs a grid the backbone does not pad (here it pads)")
        mirrored = self.network.velocity_from_pooled(pooled.flip(2), spatial).flip(2)
        mirrored[:, 0] = -mirrored[:, 0]
        return 0.5 * (velocity + mirrored)


def as_inference_input(pair: dict, spatial_dims: int) -> tuple[torch.Tensor, ...]:
    """``(moving, fixed, moving_label, fixed_label)`` as batches of one; 3D upsampled from 2 mm to 1 mm."""
    tensors = [pair[key][None].float() for key in ("moving_image", "fixed_image", "moving_label", "fixed_label")]
    if spatial_dims == 3:
        tensors = [F.interpolate(t, scale_factor=2.0, mode="trilinear", align_corners=False) for t in tensors[:2]] + [
            F.interpolate(t, scale_factor=2.0, mode="nearest") for t in tensors[2:]
        ]
    return tuple(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="1,2,3")
    parser.add_argument("--dims", default="3,2")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--presets", default="", help="3D refinement presets to add, e.g. fast,default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--averages", default="none", help="none,flip,inverse: test-time averaging (network alone)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    passes = [int(p) for p in args.passes.split(",")]
    print(f"{args.threads} threads, {args.pairs} synthetic validation pairs per model")
    print("| model | refinement | averaging | passes | mean Dice | folded voxels % | seconds per pair |")
    print("|---|---|---|---|---|---|---|")
    for spatial_dims in (int(d) for d in args.dims.split(",")):
        network, pairs = model_and_pairs(spatial_dims, args.pairs)
        networks = {"none": network} | {
            average: AveragedVelocity(network, average) for average in args.averages.split(",") if average != "none"
        }
        steps = {("none", average, n): RegistrationEvalStep(network_passes=n) for average in networks for n in passes}
        for preset in filter(None, args.presets.split(",") if spatial_dims == 3 else []):
            refiner = inference_config(spatial_dims=3, refine_preset=preset).get_parsed_content("refiner")
            steps.update({(preset, "none", n): RegistrationEvalStep(refiner=refiner, network_passes=n) for n in (1, 2)})
        scores = {key: {"dice": [], "folded": [], "seconds": []} for key in steps}
        identity = []
        for index in range(len(pairs)):
            moving, fixed, moving_label, fixed_label = as_inference_input(pairs[index], spatial_dims)
            fixed_ids = fixed_label[0, 0].numpy().round().astype(np.int32)
            moving_ids = moving_label[0, 0].numpy().round().astype(np.int32)
            ids = labels_to_score(fixed_ids, moving_ids, None)
            identity.append(statistics.mean(dice_per_label(fixed_ids, moving_ids, ids).values()))
            for key, step in steps.items():
                with torch.no_grad():
                    start = time.perf_counter()
                    ddf, _ = step.network_ddf(networks[key[1]], moving, fixed, [])
                    scores[key]["seconds"].append(time.perf_counter() - start)
                    warped = warp(moving_label, ddf, mode="nearest", padding_mode="zeros")[0, 0]
                dice = dice_per_label(fixed_ids, warped.numpy().round().astype(np.int32), ids)
                scores[key]["dice"].append(statistics.mean(dice.values()))
                scores[key]["folded"].append(100 * deformation_stats(ddf[0].numpy())["folding_fraction"])
        name = f"{spatial_dims}D"
        print(f"| {name} | no registration | - | - | {statistics.mean(identity):.4f} | 0 | 0 |")
        for (refinement, average, n), row in scores.items():
            print(
                f"| {name} | {refinement} | {average} | {n} | {statistics.mean(row['dice']):.4f} "
                f"| {statistics.mean(row['folded']):.4f} | {statistics.median(row['seconds']):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
