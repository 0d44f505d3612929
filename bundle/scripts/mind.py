"""MIND-SSC: modality-independent neighbourhood descriptors (self-similarity context), a contrast-invariant
similarity for the test-time refinement.

Heinrich et al. (MICCAI 2013, "Towards realtime multimodal fusion..."): describe each voxel by how similar its
neighbourhood patches are to one another, not by its intensity. For the neighbours ``x + p`` at distance ``δ`` along
each axis, take the pairs ``(p, q)`` on different axes (3D: 12 pairs, 2D: 4) and the patch distance

    D_pq(x) = mean over a (2r+1)^d box about x of (I(· + p) - I(· + q))²,

then ``MIND_pq(x) = exp(-(D_pq(x) - min_pq D(x)) / V(x))`` with the local variance estimate ``V(x) = mean_pq D(x)``
(clamped to [0.001, 1000] times its image mean, so flat background does not divide by zero). Any intensity map that
is locally monotonic, increasing or decreasing, leaves the descriptors nearly unchanged, so two contrasts of one
anatomy get the same features; the similarity is their mean squared difference, as in deeds and ConvexAdam.

The refinement keeps the fixed image's descriptors once per level and computes the warped moving image's at every
iteration (``MINDSSCLoss``).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .losses import box_sum

__all__ = ["MINDSSCLoss", "mind_ssc", "ssc_pairs"]


def ssc_pairs(spatial_dims: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The self-similarity-context pairs: unit neighbour offsets ``±e_i`` taken two at a time on different axes
    (3D: 12, 2D: 4); each unordered pair once."""
    offsets = []  # (axis, offset)
    for axis in range(spatial_dims):
        for sign in (-1, 1):
            offsets.append((axis, tuple(sign if a == axis else 0 for a in range(spatial_dims))))
    return [(p, q) for (axis_p, p), (axis_q, q) in itertools.combinations(offsets, 2) if axis_p != axis_q]


def _shifted(padded: torch.Tensor, offset: tuple[int, ...], dilation: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """``I(x + dilation · offset)`` on the original grid from an image padded by ``dilation`` on every side."""
    for axis, (step, size) in enumerate(zip(offset, spatial)):
        padded = padded.narrow(axis + 2, dilation + step * dilation, size)
    return padded


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> torch.Tensor:
    """MIND-SSC descriptors of ``image`` ``(B, 1, *spatial)`` -> ``(B, P, *spatial)`` (``P`` = 12 in 3D, 4 in 2D),
    each in (0, 1], the largest channel of every voxel 1. ``dilation``: neighbour distance in voxels; ``radius``:
    half-width of the patch box. Edges are replicated."""
    if image.dim() not in (4, 5) or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects a (B, 1, *spatial) 2D or 3D image, got {tuple(image.shape)}")
    spatial_dims = image.dim() - 2
    spatial = tuple(image.shape[2:])
    image = image if image.is_floating_point() else image.float()
    padded = F.pad(image, [dilation] * (2 * spatial_dims), mode="replicate")
    differences = torch.cat(
        [
            (_shifted(padded, p, dilation, spatial) - _shifted(padded, q, dilation, spatial)) ** 2
            for p, q in ssc_pairs(spatial_dims)
        ],
        dim=1,
    )
    size = 2 * radius + 1
    distances = box_sum(differences, size) / float(size**spatial_dims)
    distances = distances - distances.amin(dim=1, keepdim=True)
    variance = distances.mean(dim=1, keepdim=True)
    scale = variance.mean().clamp(min=eps)
    variance = variance.clamp(min=0.001 * scale, max=1000.0 * scale)
    return torch.exp(-distances / variance)


class MINDSSCLoss(nn.Module):
    """``mean((MIND(m ∘ φ) - MIND(f))²)`` over voxels and channels (``mind_ssc``).

    The descriptors are computed on the warped image, not warped themselves: interpolating the sharp descriptors
    at fractional positions blurs them, which raises the distance to the fixed image's and pulls the optimum
    towards whole-voxel displacements (on the labelled training pair v -> w the warped-descriptor loss rated the
    network's own result worse than the identity). ``target_sums(target)`` is the fixed image's half (its
    descriptors), kept by the refiner once per level as for ``BoxLNCCLoss``.
    """

    def __init__(self, radius: int = 1, dilation: int = 2) -> None:
        super().__init__()
        self.radius, self.dilation = int(radius), int(dilation)

    def target_sums(self, target: torch.Tensor) -> torch.Tensor:
        """The descriptors of ``target`` ``(B, 1, *spatial)``: ``(B, P, *spatial)``."""
        return mind_ssc(target, self.radius, self.dilation)

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, target_sums: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``pred``/``target``: images ``(B, 1, *spatial)``; ``target_sums``: ``self.target_sums(target)``."""
        if pred.shape != target.shape:
            raise ValueError(f"expected two images of one shape, got {tuple(pred.shape)}, {tuple(target.shape)}")
        if target_sums is None:
            target_sums = self.target_sums(target)
        return torch.mean((mind_ssc(pred, self.radius, self.dilation) - target_sums) ** 2)
