#!/usr/bin/env python
"""How many squarings test-time refinement must differentiate: the loss it reaches and its time, per choice.

    python benchmarks/refine_gradient.py [--data ../shared/data/oasis3d_train] [--squarings all,3,2,1,0]
        [--threads 2]

On the unlabelled *training* pair (``subject_x`` <-> ``subject_y`` of ``oasis3d_train``, both directions; no test
subject, no label), the shipped 3D model predicts the velocity, then ``inference.yaml``'s default refinement runs
with the gradient of the last ``K`` of the 5 squarings (``scripts.integrate.integrate_velocity``'s
``differentiated_steps``; ``all`` is the exact gradient). Prints, per ``K`` and direction, the refinement objective
at the end of each level (LNCC + λ·bending energy; lower is better, the criterion the refinement itself optimises)
and the seconds per level. ``inference.yaml`` uses the smallest ``K`` that ends where the exact gradient does.
"""

from __future__ import annotations

import argparse

import torch
from training_pair import DEFAULT_DATA, network_starts, refiner_settings

from scripts.refine import VelocityRefiner


def main() -> None:
    parser_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser_.add_argument("--data", default=str(DEFAULT_DATA))
    parser_.add_argument("--squarings", default="all,3,2,1,0")
    parser_.add_argument("--threads", type=int, default=2)
    args = parser_.parse_args()
    torch.set_num_threads(args.threads)
    config, network, starts = network_starts(args.data)
    keys = ("levels", "iterations", "learning_rate", "kernel_size", "regularization_weight", "integration_steps")
    settings = refiner_settings(config, keys)

    print(f"{args.threads} threads; refinement {settings}")
    print("| squarings differentiated | direction | loss at the end of each level | seconds per level |")
    print("|---|---|---|---|")
    for direction, (velocity, moving, fixed) in starts.items():
        for choice in args.squarings.split(","):
            squarings = None if choice == "all" else int(choice)
            refiner = VelocityRefiner(**settings, differentiated_squarings=squarings)
            _, report = refiner(velocity, moving, fixed, network.downsample)
            losses = " / ".join(f"{level['loss_end']:.4f}" for level in report["levels"])
            seconds = " / ".join(f"{level['seconds']:.1f}" for level in report["levels"])
            total = f"{report['seconds']:.1f}"
            print(f"| {choice} | {direction} | {losses} | {seconds} (total {total}) |")


if __name__ == "__main__":
    main()
