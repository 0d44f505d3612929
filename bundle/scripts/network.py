"""The bundle's ``network_def``: one tensor ``cat(moving, fixed)`` in, one dense displacement field out.

That single-tensor contract is what ``verify_net_in_out``, ``ckpt_export`` and MONAI Label's bundle tasks feed and
expect, which MONAI's ``VoxelMorph`` (two inputs, returns ``(warped, ddf)``) does not offer; warping stays outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF
from torch import nn

__all__ = ["RegistrationNet"]


class RegistrationNet(nn.Module):
    """Backbone -> stationary velocity ``v`` -> ``φ = exp(v)`` by scaling and squaring -> DDF.

    With ``integration_steps = n > 0``, ``v`` is scaled by ``2**-n`` and composed with itself ``n`` times
    (``DVF2DDF``), which keeps ``φ`` smooth and invertible in the continuum; ``n = 0`` treats the backbone output as
    a plain displacement. Inputs are zero-padded so every resolution level divides, and the field is cropped back.

    Args:
        backbone: module mapping ``(B, 2, *spatial)`` to ``(B, spatial_dims, *spatial)``, e.g. MONAI's
            ``VoxelMorphUNet`` or ``LocalNet``.
        spatial_dims: 2 or 3.
        integration_steps: scaling-and-squaring steps (VoxelMorph's default 7); 0 for no integration.
        divisor: every spatial size is padded up to a multiple of this (2 ** number of downsamplings).
        flow_init_std: standard deviation for re-initialising the last convolution (the flow head), so training
            starts near the identity as in the reference VoxelMorph; None keeps the backbone's own init.

    Input ``(B, 2, H, W[, D])`` = ``cat(moving, fixed)``; output ``(B, spatial_dims, H, W[, D])``, displacements in
    voxels, channel ``i`` along spatial axis ``i`` (MONAI ``Warp`` convention).
    """

    def __init__(
        self,
        backbone: nn.Module,
        spatial_dims: int,
        integration_steps: int = 7,
        divisor: int = 16,
        flow_init_std: float | None = 1e-5,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
        self.backbone = backbone
        self.spatial_dims = spatial_dims
        self.integration_steps = integration_steps
        self.divisor = divisor
        self.integrate = DVF2DDF(num_steps=integration_steps) if integration_steps > 0 else nn.Identity()
        if flow_init_std is not None:
            self._init_flow_head(flow_init_std)

    def _init_flow_head(self, std: float) -> None:
        heads = [m for m in self.backbone.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        if not heads or heads[-1].out_channels != self.spatial_dims:
            raise ValueError("backbone's last convolution must output spatial_dims channels (the flow head)")
        nn.init.normal_(heads[-1].weight, mean=0.0, std=std)
        if heads[-1].bias is not None:
            nn.init.zeros_(heads[-1].bias)

    def forward(self, moving_fixed: torch.Tensor) -> torch.Tensor:
        # Plain tensor ops only, so `monai.bundle ckpt_export --use_trace True` can trace it (MONAI's Warp inside
        # DVF2DDF cannot be scripted, so a traced model.ts is fixed to the input shape it was traced with).
        if moving_fixed.dim() != self.spatial_dims + 2 or moving_fixed.shape[1] != 2:
            raise ValueError(
                "expected cat(moving, fixed) of shape (B, 2, *spatial) with "
                + str(self.spatial_dims)
                + " spatial dims, got "
                + str(list(moving_fixed.shape))
            )
        spatial = moving_fixed.shape[2:]
        padding: list[int] = []  # F.pad lists the last axis first, (before, after) per axis
        for axis in range(len(spatial) - 1, -1, -1):
            padding += [0, (self.divisor - spatial[axis] % self.divisor) % self.divisor]
        field = self.backbone(F.pad(moving_fixed, padding))
        if field.shape[1] != self.spatial_dims:
            raise ValueError("backbone returned " + str(field.shape[1]) + " channels, expected spatial_dims")
        for axis in range(len(spatial)):
            field = field.narrow(axis + 2, 0, spatial[axis])
        return self.integrate(field)
