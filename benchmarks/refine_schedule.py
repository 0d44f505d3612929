#!/usr/bin/env python
"""Refinement schedules compared on the unlabelled training pair: the objective each reaches, its folding, its time.

    python benchmarks/refine_schedule.py [--schedules "4,2:40,10:0.1 4,2:20,12:0.2 ..."] [--data DIR] [--threads 2]

On ``subject_x`` <-> ``subject_y`` of ``oasis3d_train`` (both directions; no test subject, no label), the shipped 3D
model predicts the velocity, then each schedule ``levels:iterations:learning_rate`` refines it with ``inference.yaml``'s
objective (LNCC + λ·bending energy, its window and λ) and gradient truncation. Printed per schedule and direction:
the objective of the result at 2 mm and at 1 mm (lower is better; the same criterion for every schedule, whatever its
last level), the folded-voxel % of the 1 mm displacement, and the refinement's seconds.

A lower objective is not a higher Dice: at 89387e6 the refiner built a fresh Adam per level and the default became
``4,2:20,12:0.1``, lower here in both directions with less folding, yet lower on the test pair's Dice
(docs/experiments.md, "What did not help"), and 0.7.0's refinement was restored. Use this table for the time and
folding of a schedule, and only a labelled evaluation for its accuracy.
"""

from __future__ import annotations

import argparse

import torch
from training_pair import DEFAULT_DATA, network_starts, refiner_settings

from scripts.metrics import deformation_stats
from scripts.refine import VelocityRefiner, downsample_image

DEFAULT_SCHEDULES = "4:40:0.1 4,2:40,10:0.1 4,2:20,12:0.1 4,2:40,10:0.2 4,2,1:40,10,5:0.1"


def parse_schedule(text: str) -> dict:
    """``"4,2:20,12:0.2"`` -> ``{"levels": [4, 2], "iterations": [20, 12], "learning_rate": 0.2}``."""
    levels, iterations, learning_rate = text.split(":")
    return {
        "levels": [int(n) for n in levels.split(",")],
        "iterations": [int(n) for n in iterations.split(",")],
        "learning_rate": float(learning_rate),
    }


def main() -> None:
    parser_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser_.add_argument("--data", default=str(DEFAULT_DATA))
    parser_.add_argument("--schedules", default=DEFAULT_SCHEDULES, help="space-separated levels:iterations:lr")
    parser_.add_argument("--threads", type=int, default=2)
    args = parser_.parse_args()
    torch.set_num_threads(args.threads)
    config, network, pairs = network_starts(args.data)
    keys = ("kernel_size", "regularization_weight", "integration_steps", "differentiated_squarings")
    settings = refiner_settings(config, keys)

    print(f"{args.threads} threads; objective {settings}")
    print("| schedule (levels : iterations : lr) | direction | objective 2 mm | objective 1 mm | folded % | seconds |")
    print("|---|---|---|---|---|---|")
    for text in args.schedules.split():
        schedule = parse_schedule(text)
        for direction, (velocity, moving, fixed) in pairs.items():
            refiner = VelocityRefiner(**schedule, **settings)
            field, report = refiner(velocity, moving, fixed, network.downsample)
            with torch.no_grad():
                objective = {}
                for factor in (2, 1):
                    level = (downsample_image(moving, factor), downsample_image(fixed, factor))
                    objective[factor] = refiner.level_loss(field, *level, network.downsample, factor)[0].item()
                ddf = network.field_to_ddf(field, fixed.shape[2:])
            folded = 100 * deformation_stats(ddf[0].numpy())["folding_fraction"]
            print(
                f"| {text} | {direction} | {objective[2]:.4f} | {objective[1]:.4f} | {folded:.3f} "
                f"| {report['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
