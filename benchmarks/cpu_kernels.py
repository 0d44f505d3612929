#!/usr/bin/env python
"""Forward + backward time of the CPU kernels behind refinement and training, the bundle's versions against the plain
ones they replace (same values; tests/test_refinement.py checks that), on the shipped 3D model's 2 mm grid.

    python benchmarks/cpu_kernels.py [--threads 2] [--repeats 5] [--shape 80 96 112]

Rows: ``grid_sample`` of a 3-channel field (one scaling-and-squaring step) with torch's kernel vs
``scripts.integrate.grid_sample`` (one slab per thread); MONAI's ``BendingEnergyLoss`` vs ``FastBendingEnergyLoss``;
the LNCC's box sums through autograd vs the self-adjoint ``box_sum``; the LNCC loss computing the fixed image's
window sums at every call vs with them kept (``BoxLNCCLoss.target_sums``, once per refinement level); one Adam step
on a velocity of that grid, PyTorch's default (foreach) vs ``fused=True`` as test-time refinement builds it (the step
alone, no backward);
the network's first 3D convolution (2 -> 8 channels) with PyTorch's backend choice vs ``OneDnnConv3d``, and the
shipped network with plain ``nn.Conv3d`` layers vs the bundle's (``use_onednn_conv3d``): its forward pass on a 1 mm
pair (no gradient; inference) and a forward + backward pass on a pair of the 2 mm training grid (a training step).
Prints a Markdown table of median milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import copy

import torch
import torch.nn.functional as F
from torch import nn
from training_pair import inference_config, shipped_network

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from monai.losses import BendingEnergyLoss  # noqa: E402
from scripts.conv_backend import OneDnnConv3d  # noqa: E402
from scripts.integrate import grid_sample, identity_grid  # noqa: E402
from scripts.losses import BoxLNCCLoss, FastBendingEnergyLoss, _box_sum, box_sum  # noqa: E402


def median_ms(step, repeats: int) -> float:
    """Median wall time of ``step()`` (one warm-up call first), in milliseconds."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=[80, 96, 112])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    generator = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(1, 3, 10, 12, 14, generator=generator), size=shape, mode="trilinear")
    flow = (0.01 * smooth.movedim(1, -1)).requires_grad_(True)  # a small displacement, grid_sample units
    grid = identity_grid(shape)
    field = (3.0 * smooth).requires_grad_(True)
    maps = torch.rand((1, 5) + shape, generator=generator, requires_grad=True)  # LNCC's five maps
    lncc = BoxLNCCLoss(3, 5)
    fixed_image = torch.rand((1, 1) + shape, generator=generator)
    warped_image = torch.rand((1, 1) + shape, generator=generator, requires_grad=True)
    fixed_sums = lncc.target_sums(fixed_image)  # what refinement keeps for a level
    optimizers = {}
    for name, options in (("foreach", {}), ("fused", {"fused": True})):
        velocity = torch.nn.Parameter(smooth.clone())
        velocity.grad = torch.randn(velocity.shape, generator=generator)
        optimizers[name] = torch.optim.Adam([velocity], lr=0.1, **options)

    def torch_sample():
        F.grid_sample(flow.movedim(-1, 1), grid + flow, align_corners=True).sum().backward()

    def threaded_sample():
        grid_sample(flow.movedim(-1, 1), grid + flow).sum().backward()

    first_conv = nn.Conv3d(2, 8, 3, padding=1)
    first_conv_bundle = copy.deepcopy(first_conv)
    first_conv_bundle.__class__ = OneDnnConv3d
    images = torch.rand((1, 2) + shape, generator=generator, requires_grad=True)
    network = shipped_network(inference_config(spatial_dims=3))  # the weights do not change the time
    network_plain = copy.deepcopy(network)
    for layer in network_plain.modules():
        if isinstance(layer, OneDnnConv3d):
            layer.__class__ = nn.Conv3d
    doubled = F.interpolate(images.detach(), scale_factor=2.0)  # a 1 mm pair: the network averages it to 2 mm

    def network_forward(net):
        with torch.no_grad():
            net.velocity(doubled)

    def network_training_step(net):  # forward + backward at the 2 mm training grid (brain3d.yaml: no downsampling)
        net.downsample = 1
        try:
            net.velocity(images.detach()).square().mean().backward()
        finally:
            net.downsample = 2

    rows = [
        ("grid_sample, 3-channel field", torch_sample, threaded_sample),
        (
            "bending energy",
            lambda: BendingEnergyLoss()(field).backward(),
            lambda: FastBendingEnergyLoss()(field).backward(),
        ),
        (
            "LNCC box sums (5 maps, window 5)",
            lambda: _box_sum(maps, 5).sum().backward(),
            lambda: box_sum(maps, 5).sum().backward(),
        ),
        (
            "LNCC loss, fixed image's window sums recomputed vs kept",
            lambda: lncc(warped_image, fixed_image).backward(),
            lambda: lncc(warped_image, fixed_image, fixed_sums).backward(),
        ),
        ("Adam step, 3-channel velocity", optimizers["foreach"].step, optimizers["fused"].step),
        (
            "conv3d 2 -> 8 channels",
            lambda: first_conv(images).sum().backward(),
            lambda: first_conv_bundle(images).sum().backward(),
        ),
        (
            "shipped network, velocity (no gradient)",
            lambda: network_forward(network_plain),
            lambda: network_forward(network),
        ),
        (
            "shipped network, forward + backward (training)",
            lambda: network_training_step(network_plain),
            lambda: network_training_step(network),
        ),
    ]
    print(f"{args.threads} threads, grid {shape}, median of {args.repeats}, forward + backward (Adam: the step)")
    print("| kernel | plain ms | bundle ms |")
    print("|---|---|---|")
    for name, plain, bundle in rows:
        print(f"| {name} | {median_ms(plain, args.repeats):.0f} | {median_ms(bundle, args.repeats):.0f} |")


if __name__ == "__main__":
    main()
