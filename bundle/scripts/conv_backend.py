"""3D convolutions on oneDNN for a batch of one on the CPU, where PyTorch would pick its slow reference kernel.

PyTorch chooses the CPU backend of a convolution by a size heuristic written for 2D inputs: for a 5D input of batch
one it multiplies only ``N · C · D · H`` (the last axis is left out) and, below about 20,000, runs the native
``slow_conv3d`` instead of oneDNN (MKL-DNN). The few-channel layers of the brain network (2 -> 8 channels at
80 x 96 x 112, 8 -> 16 at 40 x 48 x 56, the 32 -> 16 and 16 -> 16 layers at 20 x 24 x 28) all fall below it, and
the reference kernel is several times slower than oneDNN on them. oneDNN computes the same convolution (same weights,
float32, differences at rounding level; tests/test_deformation.py checks values and gradients).
``python benchmarks/cpu_kernels.py`` times the first layer and the whole network both ways. Elsewhere (GPU, other
dtypes, autocast, tracing for ``ckpt_export``) the layer is PyTorch's own ``Conv3d`` path, unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OneDnnConv3d", "use_onednn_conv3d"]


class OneDnnConv3d(nn.Conv3d):
    """``nn.Conv3d`` that calls oneDNN directly for float32 CPU tensors (same parameters, same state dict)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            input.device.type == "cpu"
            and input.dtype == torch.float32
            and weight.dtype == torch.float32
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)  # not the string forms 'same' / 'valid'
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing()  # a traced model.ts must stay device-neutral
        ):
            return torch.ops.aten.mkldnn_convolution(
                input.contiguous(), weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(input, weight, bias)


def use_onednn_conv3d(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv3d`` inside ``module`` into ``OneDnnConv3d`` in place (parameters, hooks and
    state-dict keys are kept: the subclass adds no state) and return ``module``."""
    for layer in module.modules():
        if type(layer) is nn.Conv3d:
            layer.__class__ = OneDnnConv3d
    return module
