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
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from monai.bundle import ConfigParser  # noqa: E402
from scripts.refine import VelocityRefiner  # noqa: E402


def load_pair(parser: ConfigParser, fixed: Path, moving: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images through inference.yaml's own preprocessing, as ``(1, 1, *spatial)`` float tensors."""
    preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
    images = [preprocessing({"image": str(path)})["image"] for path in (fixed, moving)]
    return tuple(torch.as_tensor(image).as_subclass(torch.Tensor)[None].float() for image in images)


def main() -> None:
    parser_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser_.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "oasis3d_train"))
    parser_.add_argument("--squarings", default="all,3,2,1,0")
    parser_.add_argument("--threads", type=int, default=2)
    args = parser_.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    images = {name: data / f"subject_{name}_image.nii.gz" for name in ("x", "y")}
    missing = [str(path) for path in images.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"training images not found: {', '.join(missing)}")

    config = ConfigParser()
    config.read_config(str(REPO / "bundle" / "configs" / "inference.yaml"))
    config["bundle_root"] = str(REPO / "bundle")
    config["fixed_image"] = str(images["x"])
    network = config.get_parsed_content("network_def")
    network.load_state_dict(torch.load(config.get_parsed_content("ckpt_path"), weights_only=True))
    network.eval()
    keys = ("levels", "iterations", "learning_rate", "kernel_size", "regularization_weight", "integration_steps")
    settings = {key: config.get_parsed_content(f"refiner#{key}") for key in keys}

    print(f"{args.threads} threads; refinement {settings}")
    print("| squarings differentiated | direction | loss at the end of each level | seconds per level |")
    print("|---|---|---|---|")
    for direction in (("y", "x"), ("x", "y")):  # (moving, fixed)
        fixed, moving = load_pair(config, images[direction[1]], images[direction[0]])
        with torch.no_grad():
            velocity = network.velocity(torch.cat([moving, fixed], dim=1))
        for choice in args.squarings.split(","):
            squarings = None if choice == "all" else int(choice)
            refiner = VelocityRefiner(**settings, differentiated_squarings=squarings)
            _, report = refiner(velocity, moving, fixed, network.downsample)
            losses = " / ".join(f"{level['loss_end']:.4f}" for level in report["levels"])
            seconds = " / ".join(f"{level['seconds']:.1f}" for level in report["levels"])
            total = f"{report['seconds']:.1f}"
            print(f"| {choice} | {direction[0]} -> {direction[1]} | {losses} | {seconds} (total {total}) |")


if __name__ == "__main__":
    main()
