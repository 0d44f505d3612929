"""SynthMorph-style training pairs: a new random label map for every pair, no real images needed.

After Hoffmann et al., "SynthMorph: learning contrast-invariant registration without acquired images" (IEEE TMI
2022), written here for this bundle's pair dictionaries (torch, 2D and 3D). For each pair:

1. a label map ``s`` with ``J`` labels: ``J`` smooth random fields (white noise on a grid ``r`` times coarser,
   upsampled linearly), warped by a random smooth deformation so that the shapes are irregular, then
   ``s(x) = argmax_j``;
2. two independent random diffeomorphisms ``φ_m, φ_f`` (a smooth velocity on a coarse grid, integrated by scaling and
   squaring): ``s_m = s ∘ φ_m``, ``s_f = s ∘ φ_f`` (nearest neighbour), the pair's labels;
3. one image per side, drawn independently: per-label mean ``μ_j ~ U(0, 1)`` and noise ``σ_j ~ U(0, σ_max)``,
   Gaussian blur, a multiplicative smooth bias field, min-max normalisation, then a random gamma.

A network trained on such pairs with the Dice of the warped labels (and a regulariser) never sees a real image, so
it cannot learn any contrast and has to match shapes; SynthMorph showed that this transfers to real brain MRI.
Every pair is a new anatomy, which two real training subjects cannot give.

Why not MONAI transforms: MONAI has random elastic deformations, but not a diffeomorphic one, nor label-map
synthesis from noise; the whole generator is a handful of tensor operations, written once here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from monai.transforms import Randomizable
from torch.utils.data import Dataset

from .integrate import integrate_velocity, warp

__all__ = [
    "SynthMorphPairs",
    "ZeroSimilarity",
    "random_contrast",
    "random_diffeomorphism",
    "random_label_map",
    "synthesise_image",
]


def _upsample(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    mode = "bilinear" if field.dim() == 4 else "trilinear"
    return F.interpolate(field, size=list(shape), mode=mode, align_corners=True)


def _coarse_noise(generator: torch.Generator, channels: int, shape: Sequence[int], factor: float) -> torch.Tensor:
    """``(1, channels, *shape)``: standard normal noise on a grid ``factor`` times coarser, upsampled (smooth)."""
    coarse = [max(2, round(n / factor)) for n in shape]
    return _upsample(torch.randn(1, channels, *coarse, generator=generator, device=generator.device), shape)


def random_diffeomorphism(
    generator: torch.Generator, shape: Sequence[int], max_std: float, factor: float = 16.0, steps: int = 5
) -> torch.Tensor:
    """A smooth invertible displacement ``(1, d, *shape)`` in voxels: a random velocity (white noise of standard
    deviation ``U(0, max_std)`` voxels on a grid ``factor`` times coarser) integrated by scaling and squaring on that
    grid, then upsampled linearly (as the network's own ``downsample``): cheap at any size."""
    device = generator.device
    std = float(torch.rand((), generator=generator, device=device)) * max_std
    coarse = [max(2, round(n / factor)) for n in shape]
    scale = torch.tensor([(c - 1) / max(n - 1, 1) for c, n in zip(coarse, shape)], device=device)
    scale = scale.view(1, -1, *[1] * len(shape))
    velocity = torch.randn(1, len(shape), *coarse, generator=generator, device=device) * std * scale  # coarse voxels
    return _upsample(integrate_velocity(velocity, steps), shape) / scale


def random_label_map(
    generator: torch.Generator, shape: Sequence[int], num_labels: int, factor: float, warp_std: float
) -> torch.Tensor:
    """``(1, 1, *shape)`` labels ``1..num_labels``: argmax of smooth noise channels, warped for irregular shapes.

    The channels are white noise on a grid ``factor`` times coarser, sampled (linearly) at the warped full-resolution
    positions in one step, which is what upsampling and then warping would give, at a fraction of the cost."""
    coarse = [max(2, round(n / factor)) for n in shape]
    scores = torch.randn(1, num_labels, *coarse, generator=generator, device=generator.device)
    ddf = random_diffeomorphism(generator, shape, warp_std, factor=factor)
    return (warp(scores, ddf, padding_mode="border").argmax(dim=1, keepdim=True) + 1).float()


def random_contrast(generator: torch.Generator, num_labels: int, max_noise: float = 0.1) -> torch.Tensor:
    """``(2, num_labels + 1)``: per-label mean intensity ``U(0, 1)`` and noise standard deviation
    ``U(0, max_noise)``."""
    device = generator.device
    means = torch.rand(num_labels + 1, generator=generator, device=device)
    return torch.stack([means, torch.rand(num_labels + 1, generator=generator, device=device) * max_noise])


def synthesise_image(
    generator: torch.Generator,
    labels: torch.Tensor,
    contrast: torch.Tensor,
    max_blur: float = 1.0,
    bias_std: float = 0.3,
    gamma_std: float = 0.25,
) -> torch.Tensor:
    """An image ``(1, 1, *shape)`` in [0, 1] for a label map: the ``contrast`` (``random_contrast``) with voxel noise,
    then a random blur, a smooth multiplicative bias field, min-max normalisation and a random gamma."""
    shape = labels.shape[2:]
    index = labels.long().clamp(0, contrast.shape[1] - 1)
    means, noise = contrast
    device = generator.device
    image = means[index] + noise[index] * torch.randn(labels.shape, generator=generator, device=device)
    sigma = float(torch.rand((), generator=generator, device=device)) * max_blur
    if sigma > 0.05:
        image = GaussianFilter(len(shape), sigma).to(device)(image)
    image = image * torch.exp(bias_std * _coarse_noise(generator, 1, shape, max(shape) / 4.0))
    image = (image - image.min()) / (image.max() - image.min() + 1e-6)
    gamma = float(torch.exp(gamma_std * torch.randn((), generator=generator, device=device)))
    return image.clamp(0, 1) ** gamma


class SynthMorphPairs(Randomizable, Dataset):
    """Pairs ``{moving_image, fixed_image, moving_label, fixed_label, moving_name, fixed_name}`` drawn from nothing.

    Args:
        spatial_size: grid of every image, e.g. ``[160, 192]`` or ``[80, 96, 112]``.
        num_pairs: items per epoch.
        num_labels: ``J``, labels per map (SynthMorph: 26).
        label_scale: ``(min, max)`` coarseness ``r`` of the label noise, in voxels (larger: bigger structures).
        label_warp_std: maximum standard deviation (voxels) of the velocity that makes the shapes irregular.
        deformation_std: maximum standard deviation (voxels) of each side's random velocity.
        deformation_scale: coarseness (voxels) of the random velocities.
        shared_contrast: both sides of a pair get the same per-label intensities (a new draw for every pair): the
            mono-modal case (T1 onto T1), and a task a network starts to learn within a few hundred pairs; False
            draws them per side (SynthMorph's contrast-invariant "shapes" training, which takes far longer).
        max_noise, max_blur, bias_std, gamma_std: image synthesis ranges (``random_contrast``, ``synthesise_image``);
            blur, bias field, noise and gamma are always drawn per side.
        device: where the pairs are drawn. ``"cuda"`` draws them on the GPU, which is far faster than CPU workers,
            but needs ``num_workers: 0`` (CUDA cannot run in forked loader workers); a seed gives a different pair
            on a different device (another random generator), but always the same one on the same device.
        deterministic: item ``i`` is always the same pair (seeded by ``seed + i``): fixed validation pairs.
            Otherwise each item draws a new seed from the dataset's ``R``, so every epoch gets new pairs and a
            resumed training continues the sequence (``training_state.RandomStates`` keeps ``R``).
        seed: seed of ``R`` (or base seed of the deterministic pairs).

    Images and labels are ``(1, *spatial_size)`` float tensors (labels hold integers ``1..J``).
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        num_pairs: int = 100,
        num_labels: int = 26,
        label_scale: Sequence[float] = (8.0, 24.0),
        label_warp_std: float = 6.0,
        deformation_std: float = 3.0,
        deformation_scale: float = 16.0,
        max_noise: float = 0.1,
        max_blur: float = 1.0,
        bias_std: float = 0.3,
        gamma_std: float = 0.25,
        shared_contrast: bool = True,
        device: str | torch.device = "cpu",
        deterministic: bool = False,
        seed: int = 0,
    ) -> None:
        self.spatial_size = [int(n) for n in spatial_size]
        if len(self.spatial_size) not in (2, 3) or min(self.spatial_size) < 8:
            raise ValueError(f"spatial_size must be 2 or 3 sizes of at least 8 voxels, got {spatial_size}")
        if int(num_labels) < 2 or int(num_pairs) < 1:
            raise ValueError(f"need num_labels >= 2 and num_pairs >= 1, got {num_labels}, {num_pairs}")
        self.num_pairs, self.num_labels = int(num_pairs), int(num_labels)
        self.label_scale = (float(label_scale[0]), float(label_scale[1]))
        self.label_warp_std, self.deformation_std = float(label_warp_std), float(deformation_std)
        self.deformation_scale = float(deformation_scale)
        self.shared_contrast, self.max_noise = bool(shared_contrast), float(max_noise)
        self.image_options = {
            "max_blur": float(max_blur),
            "bias_std": float(bias_std),
            "gamma_std": float(gamma_std),
        }
        self.device = torch.device(device)
        self.deterministic, self.seed = bool(deterministic), int(seed)
        self.set_random_state(seed=self.seed)

    def __len__(self) -> int:
        return self.num_pairs

    def randomize(self, data=None) -> int:
        return int(self.R.randint(0, 2**31 - 1))

    def pair(self, seed: int) -> dict:
        """The pair drawn from ``seed`` (the same seed gives the same pair)."""
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        shape = self.spatial_size
        low, high = self.label_scale
        factor = low + (high - low) * float(torch.rand((), generator=generator, device=self.device))
        labels = random_label_map(generator, shape, self.num_labels, factor, self.label_warp_std)
        item: dict = {}
        contrast = random_contrast(generator, self.num_labels, self.max_noise)
        for role in ("moving", "fixed"):
            ddf = random_diffeomorphism(generator, shape, self.deformation_std, self.deformation_scale)
            label = warp(labels, ddf, mode="nearest", padding_mode="border")
            if not self.shared_contrast and role == "fixed":
                contrast = random_contrast(generator, self.num_labels, self.max_noise)
            item[f"{role}_image"] = synthesise_image(generator, label, contrast, **self.image_options)[0]
            item[f"{role}_label"] = label[0]
            item[f"{role}_name"] = f"synth{seed}_{role}"
        return item

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"pair {index} of {self.num_pairs}")
        return self.pair(self.seed + index if self.deterministic else self.randomize())


class ZeroSimilarity(torch.nn.Module):
    """No image term: SynthMorph trains on label overlap alone (``label_weight``), so the network cannot rely on
    intensities, which are random. Returns a zero that keeps the graph's device and dtype."""

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return (warped.sum() * 0.0).to(fixed.dtype)
