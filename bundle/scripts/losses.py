"""Fast local normalised cross-correlation for the CPU.

MONAI's ``LocalNormalizedCrossCorrelationLoss`` filters with a 1-channel convolution per axis, which PyTorch runs
slowly on the CPU (a 3D brain at 1 mm: seconds per call). A box window needs no weights: running sums per axis
(cumulative sum, then a difference) compute the same local sums about twice as fast, forward and backward, and
give the same value as MONAI's rectangular kernel (a test checks it), so training and test-time refinement can
afford full-resolution similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BoxLNCCLoss", "box_sum"]


def box_sum(volumes: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Sum over a centred ``kernel_size`` box (zero padding) of each channel of ``(B, C, *spatial)``.

    Per axis: zero-pad, cumulative sum, difference of two shifted views; O(1) per voxel whatever the window.
    """
    half = kernel_size // 2
    for axis in range(2, volumes.dim()):
        padding = [0] * (2 * (volumes.dim() - 2))
        position = 2 * (volumes.dim() - 1 - axis)  # F.pad lists the last axis first
        padding[position], padding[position + 1] = half + 1, half
        cumulative = F.pad(volumes, padding).cumsum(axis)
        size = volumes.shape[axis]
        volumes = cumulative.narrow(axis, kernel_size, size) - cumulative.narrow(axis, 0, size)
    return volumes


class BoxLNCCLoss(nn.Module):
    """``-mean(cross² / (var_t · var_p))`` over local ``k^d`` windows: MONAI's LNCC with a rectangular kernel.

    Per window of ``N = k^d`` voxels, with sums ``Σt, Σp, Σt², Σp², Σtp``: ``cross = Σtp - Σp·Σt/N``,
    ``var_t = max(Σt² - (Σt)²/N, ε)``, likewise ``var_p``; the loss is in ``[-1, 0]``, -1 for a perfect match.

    Args:
        spatial_dims: 1, 2 or 3.
        kernel_size: window width ``k`` (odd).
        smooth_dr: ``ε``, floor of the local variances (MONAI's default).
    """

    def __init__(self, spatial_dims: int = 3, kernel_size: int = 9, smooth_dr: float = 1e-5) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.spatial_dims, self.kernel_size, self.smooth_dr = spatial_dims, int(kernel_size), float(smooth_dr)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.dim() != self.spatial_dims + 2:
            raise ValueError(f"expected two (B, C, *spatial) tensors of one shape, got {pred.shape}, {target.shape}")
        channels = pred.shape[1]
        sums = box_sum(torch.cat([target, pred, target * target, pred * pred, target * pred], dim=1), self.kernel_size)
        t_sum, p_sum, t2_sum, p2_sum, tp_sum = torch.split(sums, channels, dim=1)
        volume = float(self.kernel_size**self.spatial_dims)
        cross = tp_sum - p_sum * t_sum / volume
        t_var = torch.clamp(t2_sum - t_sum * t_sum / volume, min=self.smooth_dr)
        p_var = torch.clamp(p2_sum - p_sum * p_sum / volume, min=self.smooth_dr)
        return -torch.mean(cross * cross / (t_var * p_var))
