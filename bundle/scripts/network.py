"""The bundle's ``network_def``: one tensor ``cat(moving, fixed)`` in, one dense displacement field out.

That single-tensor contract is what ``verify_net_in_out``, ``ckpt_export`` and MONAI Label's bundle tasks feed and
expect, which MONAI's ``VoxelMorph`` (two inputs, returns ``(warped, ddf)``) does not offer; warping stays outside.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv_backend import use_onednn_conv3d
from .integrate import integrate_velocity

__all__ = ["RegistrationNet"]


class RegistrationNet(nn.Module):
    """Backbone -> stationary velocity ``v`` -> ``φ = exp(v)`` by scaling and squaring -> DDF.

    With ``downsample = s > 1`` the backbone sees both images averaged over ``s^d`` blocks and ``v`` lives and is
    integrated on that coarse grid; the DDF is upsampled (linear) and scaled by ``s`` onto the input grid
    (VoxelMorph's ``int_downsize``, applied to the whole network): a 1 mm brain then costs what a 2 mm one does, and
    weights trained on ``s`` mm images run unchanged on 1 mm ones. ``velocity`` and ``field_to_ddf`` expose the two
    halves, so test-time refinement can optimise ``v`` itself and keep ``φ`` diffeomorphic.

    With ``integration_steps = n > 0``, ``v`` is scaled by ``2**-n`` and composed with itself ``n`` times
    (as MONAI's ``DVF2DDF``, composed in ``grid_sample`` units: ``scripts.integrate``), which keeps ``φ`` smooth
    and invertible in the continuum; ``n = 0`` treats the backbone output as
    a plain displacement. Inputs are zero-padded so every resolution level divides, and the field is cropped back.
    The backbone's 3D convolutions run on oneDNN on the CPU (``scripts.conv_backend``: same values, less time for the
    brain network, where PyTorch would pick its slow reference kernel for the few-channel layers).

    Args:
        backbone: module mapping ``(B, 2, *spatial)`` to ``(B, spatial_dims, *spatial)``, e.g. MONAI's
            ``VoxelMorphUNet`` or ``LocalNet``.
        spatial_dims: 2 or 3.
        integration_steps: scaling-and-squaring steps (VoxelMorph's default 7); 0 for no integration.
        divisor: every spatial size is padded up to a multiple of this (2 ** number of downsamplings).
        downsample: integer factor ``s`` between the input grid and the velocity's grid (1: same grid).
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
        downsample: int = 1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
        if int(downsample) < 1:
            raise ValueError(f"downsample must be a positive integer, got {downsample}")
        self.downsample = int(downsample)
        self.backbone = use_onednn_conv3d(backbone)
        self.spatial_dims = spatial_dims
        self.integration_steps = integration_steps
        self.divisor = divisor
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
        # Plain tensor ops only, so `monai.bundle ckpt_export --use_trace True` can trace it (the integration cannot
        # be scripted, so a traced model.ts is fixed to the input shape it was traced with).
        return self.field_to_ddf(self.velocity(moving_fixed), moving_fixed.shape[2:])

    def coarse_shape(self, spatial: Sequence[int]) -> list[int]:
        """Shape of the velocity grid for an input of shape ``spatial``: ``ceil(n / s)`` per axis."""
        return [-(-int(n) // self.downsample) for n in spatial]

    def velocity(self, moving_fixed: torch.Tensor) -> torch.Tensor:
        """``(B, 2, *spatial)`` -> the backbone's field ``(B, d, *coarse_shape(spatial))``, before integration."""
        return self.velocity_from_pooled(self.pooled_pair(moving_fixed), moving_fixed.shape[2:])

    def pooled_pair(self, moving_fixed: torch.Tensor) -> torch.Tensor:
        """What the backbone sees: ``(B, 2, *spatial)`` zero-padded to a multiple of ``divisor · downsample`` and
        averaged over ``downsample^d`` blocks, ``(B, 2, *padded / downsample)``."""
        if moving_fixed.dim() != self.spatial_dims + 2 or moving_fixed.shape[1] != 2:
            raise ValueError(
                "expected cat(moving, fixed) of shape (B, 2, *spatial) with "
                + str(self.spatial_dims)
                + " spatial dims, got "
                + str(list(moving_fixed.shape))
            )
        spatial = moving_fixed.shape[2:]
        multiple = self.divisor * self.downsample
        padding: list[int] = []  # F.pad lists the last axis first, (before, after) per axis
        for axis in range(len(spatial) - 1, -1, -1):
            padding += [0, (multiple - spatial[axis] % multiple) % multiple]
        inputs = F.pad(moving_fixed, padding)
        if self.downsample > 1:
            pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
            inputs = pool(inputs, self.downsample)
        return inputs

    def velocity_from_pooled(self, pooled: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """The backbone's field for a ``pooled_pair`` of an input of shape ``spatial``: ``(B, d, *coarse_shape)``."""
        field = self.backbone(pooled)
        if field.shape[1] != self.spatial_dims:
            raise ValueError("backbone returned " + str(field.shape[1]) + " channels, expected spatial_dims")
        for axis, size in enumerate(self.coarse_shape(spatial)):
            field = field.narrow(axis + 2, 0, size)
        return field

    def field_to_ddf(self, field: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """Integrate the coarse field (scaling and squaring) and bring the DDF onto the input grid ``spatial``:
        ``(B, d, *coarse)`` -> ``(B, d, *spatial)``, displacements in input voxels."""
        return self.upsample_ddf(self.integrate(field), spatial)

    def integrate(self, field: torch.Tensor) -> torch.Tensor:
        """``exp(v)`` on the velocity's own grid: ``(B, d, *coarse)`` displacements in coarse voxels."""
        return integrate_velocity(field, self.integration_steps)

    def upsample_ddf(self, ddf: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """A DDF of the velocity grid onto the input grid ``spatial`` (linear, displacements scaled by ``s``)."""
        if self.downsample > 1:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            size = [n * self.downsample for n in ddf.shape[2:]]
            ddf = F.interpolate(ddf, size=size, mode=mode, align_corners=False) * float(self.downsample)
            for axis in range(len(spatial)):
                ddf = ddf.narrow(axis + 2, 0, int(spatial[axis]))
        return ddf
