"""Map the moving image's contrast onto the fixed image's before the network and the refinement (``--multimodal``).

The network and the LNCC refinement were trained and tuned for one contrast; a PD- or T2-like moving image in front
of a T1 fixed image puts them off the distribution they know (a T1-trained network on a PD-like brain: Dice below no
registration). When the two images already overlap (after the affine stage), the joint histogram says which fixed
intensity each moving intensity mostly lies on: the conditional mean

    g(b) = E[f(x) | m(x) in bin b]   (64 bins of m over [0, its 99.9th percentile]),

a least-squares estimate of the fixed contrast from the moving one. ``g(m)`` is a T1-like copy of the moving image
that the same-contrast pipeline registers; the outputs (``warped_image``, ``warped_label``) still warp the moving
file itself. ``g`` need not be monotonic, so any one-to-one tissue contrast maps back; tissues that share a moving
intensity are blended, and a bias field blurs the histogram (both limit it: docs/experiments.md).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["conditional_mean_map"]


def conditional_mean_map(
    moving: torch.Tensor, fixed: torch.Tensor, bins: int = 64, upper_percentile: float = 99.5
) -> torch.Tensor:
    """``g(moving)`` for ``(B, 1, *spatial)`` images on one grid: each moving voxel replaced by the mean fixed
    intensity of the voxels in its intensity bin; the moving background (``<= 0``) stays 0. Empty bins take the
    linear interpolation of their filled neighbours. The copy is then scaled as the preprocessing scales an input
    (``[0, upper_percentile]`` onto [0, 1], clipped): ``g`` averages away the fixed image's brightest voxels, and the
    network expects its inputs' usual range (unscaled, the network saw a darker copy than it was trained on)."""
    if moving.shape != fixed.shape:
        raise ValueError(f"contrast mapping needs two images on one grid, got {tuple(moving.shape)}, {fixed.shape}")
    out = torch.zeros(moving.shape, dtype=moving.dtype, device=moving.device)  # contiguous, whatever moving's strides
    for b in range(moving.shape[0]):
        m, f = moving[b].reshape(-1).float(), fixed[b].reshape(-1).float()
        foreground = m > 0
        if not bool(foreground.any()):
            continue
        values = m[foreground]
        top = float(torch.kthvalue(values.cpu(), max(1, int(0.999 * values.numel()))).values)
        top = top if top > 0 else float(values.max())
        index = torch.clamp((m / top * bins).long(), 0, bins - 1)
        sums = torch.zeros(bins, dtype=torch.float64, device=m.device).index_add_(0, index, f.double())
        counts = torch.bincount(index, minlength=bins).double()
        filled = counts > 0
        lut = torch.where(filled, sums / counts.clamp(min=1), torch.zeros_like(sums))
        if not bool(filled.all()):
            centres = torch.arange(bins, dtype=torch.float64, device=m.device)
            known = centres[filled].cpu().numpy()
            lut = torch.as_tensor(np.interp(centres.cpu().numpy(), known, lut[filled].cpu().numpy()), device=m.device)
        mapped = torch.where(foreground, lut[index].float(), torch.zeros_like(m))
        rank = max(1, int(upper_percentile / 100.0 * mapped.numel()))  # of all voxels, as the preprocessing
        scale = float(torch.kthvalue(mapped.cpu(), rank).values)
        if scale > 0:
            mapped = torch.clamp(mapped / scale, 0.0, 1.0)
        out[b].view(-1)[:] = mapped.to(out.dtype)
    return out
