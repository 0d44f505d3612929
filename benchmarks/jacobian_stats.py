"""Time of the deformation statistics of a 1 mm brain DDF: slab by slab (``scripts.metrics``) against the whole array.

    python benchmarks/jacobian_stats.py [--threads 2] [--repeats 5] [--shape 160,192,224]

Every inference scores its DDF (folding fraction, SDlogJ) at full resolution. The field here is smooth and random
(a coarse random field upsampled, ~3 voxels), like a registration's. Prints the median seconds of
``deformation_stats`` and of the same statistics from det J computed over the whole field at once (torch, the way
0.10.0 did it), and the largest difference between the two (det J values and statistics).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.metrics import _jacobian_determinant, deformation_stats, jacobian_determinant  # noqa: E402


def whole_array_stats(ddf: np.ndarray) -> tuple[dict[str, float], torch.Tensor]:
    """The statistics from det J of the whole field in one array (the reference)."""
    det = _jacobian_determinant(torch.from_numpy(ddf))
    positive = det[det > 0]
    stats = {
        "folding_fraction": 1.0 - positive.numel() / det.numel(),
        "std_log_jacobian": float(positive.log().std(correction=0)),
        "sdlogj_learn2reg": float((det + 3.0).clamp(1e-9, 1e9).log().std(correction=0)),
    }
    return stats, det


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", default="160,192,224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = [int(n) for n in args.shape.split(",")]
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, len(shape), *[max(n // 8, 2) for n in shape], generator=generator) * 3.0
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    ddf = F.interpolate(coarse, size=shape, mode=mode, align_corners=False)[0].contiguous().numpy()

    reference, det = whole_array_stats(ddf)
    slabs = deformation_stats(ddf)
    det_difference = float((torch.from_numpy(jacobian_determinant(ddf)) - det).abs().max())
    stats_difference = max(abs(slabs[k] - reference[k]) for k in reference)
    whole = median_seconds(lambda: whole_array_stats(ddf), args.repeats)
    slabbed = median_seconds(lambda: deformation_stats(ddf), args.repeats)
    print(f"DDF {tuple(ddf.shape)}, {args.threads} threads, median of {args.repeats}")
    print(f"whole array: {whole:.3f} s; slab by slab (deformation_stats): {slabbed:.3f} s")
    print(f"largest difference: det J {det_difference:.2e}, statistics {stats_difference:.2e} ({slabs})")


if __name__ == "__main__":
    main()
