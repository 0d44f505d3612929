"""Per-subject preprocessing shared by training, evaluation and inference, plus the input checks MONAI lacks.

The chain is made of MONAI transforms; it is built by one function so that ``train.yaml`` and the standalone
``inference.yaml`` use the very same steps (a YAML file cannot include another one by a path that does not depend
on the working directory).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SqueezeDim,
)

__all__ = ["EnsureSpatialDimsd", "CheckIntensityd", "subject_preprocessing"]


def _filename(data: Mapping, key: Hashable) -> str:
    meta = getattr(data[key], "meta", {})
    return str(meta.get("filename_or_obj", f"<{key}>"))


class EnsureSpatialDimsd(MapTransform):
    """Reject images whose dimensionality does not match ``spatial_dims`` (after ``EnsureChannelFirstd``).

    2D slices stored as ``(H, W, 1)`` volumes are accepted by a 2D configuration and squeezed to ``(H, W)`` (MONAI's
    ``SqueezeDim`` keeps the affine consistent); a 3D volume given to a 2D configuration, a 2D image given to a 3D
    configuration, and multi-channel / 4D images are errors that name the file.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.squeeze_last = SqueezeDim(dim=3)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape)
            channels, spatial = shape[0], shape[1:]
            name = _filename(d, key)
            if channels != 1:
                raise ValueError(
                    f"{name} ('{key}') has {channels} channels/frames (array shape {shape[1:]} + {channels}); "
                    "expected a single-channel 2D or 3D image"
                )
            non_trivial = [s for s in spatial if s > 1]
            if self.spatial_dims == 2:
                if len(spatial) == 3 and spatial[-1] != 1:
                    raise ValueError(f"{name} ('{key}') is a 3D volume of shape {spatial}; spatial_dims is 2")
                if len(spatial) == 3:
                    d[key] = self.squeeze_last(d[key])
            elif len(spatial) != 3 or len(non_trivial) != 3:
                raise ValueError(f"{name} ('{key}') has shape {spatial}, which is 2D; spatial_dims is 3")
        return d


class CheckIntensityd(MapTransform):
    """Reject images with NaN/inf or constant intensity, and labels with no foreground, naming the file."""

    def __init__(self, image_keys: KeysCollection, label_keys: KeysCollection = (), allow_missing_keys: bool = True):
        image_keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
        label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        super().__init__(image_keys + label_keys, allow_missing_keys)
        self.image_keys, self.label_keys = set(image_keys), set(label_keys)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key])
            name = _filename(d, key)
            if key in self.image_keys:
                if not torch.isfinite(values).all():
                    raise ValueError(f"{name} ('{key}') contains NaN or infinite values")
                if values.max() == values.min():
                    raise ValueError(f"{name} ('{key}') is constant ({float(values.max())}); nothing to register")
            elif not (values > 0).any():
                raise ValueError(f"{name} ('{key}') has no foreground label (all values are 0)")
        return d


def subject_preprocessing(
    spatial_dims: int,
    pixdim: Sequence[float] | float | None,
    spatial_size: Sequence[int] | None,
    image_key: str = "image",
    label_key: str = "label",
    intensity_percentiles: Sequence[float] = (0.0, 99.5),
) -> Compose:
    """Load one subject ``{image, label?}`` into the network's space.

    load -> channel first -> dimensionality check (2D slices ``(H, W, 1)`` squeezed) -> RAS orientation ->
    resample to ``pixdim`` (labels nearest) -> NaN/constant/empty-label checks -> robust [0, 1] intensity scaling ->
    centre crop/pad to ``spatial_size`` (None keeps the resampled size) -> float32 tensors.
    """
    keys = [image_key, label_key]
    steps = [
        LoadImaged(keys, image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(keys, allow_missing_keys=True),
        EnsureSpatialDimsd(keys, spatial_dims=spatial_dims),
    ]
    steps.append(Orientationd(keys, axcodes="RAS"[:spatial_dims], allow_missing_keys=True))
    if pixdim is not None:
        pixdim = [float(pixdim)] * spatial_dims if np.isscalar(pixdim) else list(pixdim)
        steps.append(Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest"), allow_missing_keys=True))
    lower, upper = intensity_percentiles
    steps += [
        CheckIntensityd(image_key, label_key),
        ScaleIntensityRangePercentilesd(image_key, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True),
    ]
    if spatial_size is not None:
        steps.append(ResizeWithPadOrCropd(keys, spatial_size=list(spatial_size), allow_missing_keys=True))
    steps.append(EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True))
    return Compose(steps)
