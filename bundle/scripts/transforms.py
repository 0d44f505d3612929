"""Per-subject preprocessing shared by training, evaluation and inference, plus the input checks MONAI lacks.

The chain is made of MONAI transforms; it is built by one function so that ``train.yaml`` and the standalone
``inference.yaml`` use the very same steps (a YAML file cannot include another one by a path that does not depend
on the working directory).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
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

__all__ = [
    "LoadSubjectImaged",
    "EnsureSpatialDimsd",
    "CheckLabelGridd",
    "CheckIntensityd",
    "SubjectCompose",
    "subject_preprocessing",
]


def _filename(data: Mapping, key: Hashable) -> str:
    meta = getattr(data[key], "meta", {})
    return str(meta.get("filename_or_obj", f"<{key}>"))


def _root_cause(error: BaseException) -> BaseException:
    """The innermost ``__cause__``: the reader's own error under MONAI's and nibabel's wrappers."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def _read_problem(error: BaseException) -> str:
    """A short statement of why a file could not be read, from the reader's exception."""
    cause = _root_cause(error)
    if isinstance(cause, EOFError):
        return "the compressed data ends early (truncated or corrupt gzip)"
    if isinstance(cause, zlib.error):
        return f"the compressed data is corrupt ({cause})"
    return f"{type(cause).__name__}: {str(cause).strip()}"


class LoadSubjectImaged(MapTransform):
    """``LoadImaged`` whose errors name the file, its key and the problem (missing, not an image, truncated).

    MONAI's reader errors often name only the symptom (``EOFError: Compressed file ended before the end-of-stream
    marker was reached``); a user with a thousand files needs to know which one.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImaged(keys, image_only=True, allow_missing_keys=True)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
                raise FileNotFoundError(f"{path} ('{key}'): file not found")
            try:
                d[key] = self.loader({key: path})[key]
            except MemoryError:
                raise
            except Exception as error:  # readers raise OSError, EOFError, zlib.error, ImageFileError, RuntimeError...
                raise ValueError(f"{path} ('{key}'): cannot read as an image: {_read_problem(error)}") from error
        return d


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
                    f"{name} ('{key}') is a {len(spatial) + 1}D image with {channels} channels/frames (array shape "
                    f"{spatial} + {channels}); expected a single-channel 2D or 3D image"
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
    """Reject images with NaN/inf or constant intensity, and labels that are not label maps (non-finite, negative,
    non-integer, no foreground, more than ``max_label_values`` distinct ids), naming the file.

    ``after`` names the step that ran before (e.g. resampling), so that a label whose few foreground voxels vanish
    when resampled is not reported as an empty file.
    """

    def __init__(
        self,
        image_keys: KeysCollection,
        label_keys: KeysCollection = (),
        allow_missing_keys: bool = True,
        after: str | None = None,
        max_label_values: int = 1000,
        integer_tolerance: float = 1e-3,
    ):
        image_keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
        label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        super().__init__(image_keys + label_keys, allow_missing_keys)
        self.image_keys, self.label_keys = set(image_keys), set(label_keys)
        self.suffix = f" after {after}" if after else ""
        self.max_label_values, self.integer_tolerance = int(max_label_values), float(integer_tolerance)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key])
            name = _filename(d, key)
            if key in self.image_keys:
                plain = values.as_tensor() if isinstance(values, MetaTensor) else values
                lowest, highest = (float(v) for v in torch.aminmax(plain.float()))  # one pass; NaN propagates
                if not (math.isfinite(lowest) and math.isfinite(highest)):
                    raise ValueError(f"{name} ('{key}') contains NaN or infinite values{self.suffix}")
                if highest == lowest:
                    raise ValueError(f"{name} ('{key}') is constant ({highest}){self.suffix}; nothing to register")
            else:
                self._check_label(values, f"{name} ('{key}')")
        return d

    def _check_label(self, values: torch.Tensor, name: str) -> None:
        """A label map holds non-negative integer ids of a plausible number of structures; a probability map or an
        intensity image given as a label would otherwise warp into an empty label and NaN scores.

        Few passes over the voxels (this runs on every label a registration reads, twice when it is resampled):
        ``aminmax`` (NaN propagates into it), an exact integer test with the tolerance only computed when that fails,
        and the distinct ids counted only when the highest id leaves room for too many.
        """
        values = values.as_tensor() if isinstance(values, MetaTensor) else values  # plain ops, no meta bookkeeping
        values = values.float()
        lowest, highest_value = (float(v) for v in torch.aminmax(values))
        if not (math.isfinite(lowest) and math.isfinite(highest_value)):
            raise ValueError(f"{name} contains NaN or infinite values{self.suffix}; a label map holds integer ids")
        if lowest < 0:
            raise ValueError(f"{name} has negative values (min {lowest:g}){self.suffix}; label ids must be >= 0")
        rounded = values.round()
        if not torch.equal(rounded, values):
            fraction = (values - rounded).abs()
            if float(fraction.max()) > self.integer_tolerance:
                example = float(values.flatten()[int(fraction.flatten().argmax())])
                raise ValueError(
                    f"{name} has non-integer values (e.g. {example:g}){self.suffix}: a label map holds integer ids "
                    "(a probability map or an intensity image is not a label)"
                )
        highest = round(highest_value)
        if highest == 0:
            raise ValueError(f"{name} has no foreground label (all values are 0){self.suffix}")
        if highest + 1 <= self.max_label_values:
            return  # ids 0..highest: no more distinct values than max_label_values, nothing to count
        ids = rounded.long()
        # bincount counts the ids in one pass; torch.unique sorts every voxel (the slowest step of loading a label).
        if highest < 2**20:
            distinct = int(torch.bincount(ids.flatten(), minlength=highest + 1).count_nonzero())
        else:
            distinct = int(torch.unique(ids).numel())
        if distinct > self.max_label_values:
            raise ValueError(
                f"{name} has {distinct} distinct values{self.suffix}, more than max_label_values "
                f"({self.max_label_values}) structures: is it an intensity image rather than a label map?"
            )


class CheckLabelGridd(MapTransform):
    """Reject a label that is not on its image's voxel grid (shape and affine), naming both files.

    Resampling would hide the mistake (a label of another subject or of another preprocessing), and further on the
    mismatch only shows as a shape error inside the warp.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", tolerance: float = 1e-3) -> None:
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.image_key, self.label_key, self.tolerance = image_key, label_key, float(tolerance)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.image_key not in d or self.label_key not in d:
            return d
        image, label = d[self.image_key], d[self.label_key]
        image_affine = np.asarray(torch.as_tensor(getattr(image, "affine", torch.eye(4))), dtype=np.float64)
        label_affine = np.asarray(torch.as_tensor(getattr(label, "affine", torch.eye(4))), dtype=np.float64)
        same_shape = tuple(image.shape[1:]) == tuple(label.shape[1:])
        scale = max(1.0, float(np.abs(image_affine).max()))
        same_affine = image_affine.shape == label_affine.shape and np.allclose(
            image_affine, label_affine, atol=self.tolerance * scale
        )
        if not (same_shape and same_affine):
            raise ValueError(
                f"{_filename(d, self.label_key)} ('{self.label_key}') is not on the grid of its image "
                f"{_filename(d, self.image_key)}: shape {tuple(label.shape[1:])} vs {tuple(image.shape[1:])}, "
                f"voxel-to-world affine {np.round(label_affine, 4).tolist()} vs {np.round(image_affine, 4).tolist()}"
            )
        return d


def _input_files(data: object) -> list[str]:
    """File names of a subject dictionary, whether its values are still paths or already loaded images."""
    if not isinstance(data, Mapping):
        return []
    names = []
    for value in data.values():
        if isinstance(value, (str, os.PathLike)):
            names.append(str(value))
        elif "filename_or_obj" in getattr(value, "meta", {}):
            names.append(str(value.meta["filename_or_obj"]))
    return names


class SubjectCompose(Compose):
    """``Compose`` whose errors state the file and the problem in their own message.

    MONAI re-raises any error of a step as ``RuntimeError("applying transform <... object at 0x...>")``, a line that
    names neither; logs and job schedulers often keep only that last line. The step's error (whose message names
    the file, or gets the subject's files prepended) is raised instead, chained to the original.
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy: bool | None = None):
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as error:
            cause = error
            while isinstance(cause, RuntimeError) and str(cause).startswith("applying transform") and cause.__cause__:
                cause = cause.__cause__
            if cause is error:
                raise
            message = str(cause)
            files = _input_files(input_)
            if files and not any(name in message for name in files):
                message = f"{', '.join(files)}: {type(cause).__name__}: {message}"
            if isinstance(cause, MemoryError) and not str(cause):
                message = f"{', '.join(files)}: not enough memory to load and resample it"
            documented = (ValueError, FileNotFoundError, TypeError, MemoryError)
            error_type = type(cause) if type(cause) in documented else RuntimeError
            raise error_type(message) from cause


def subject_preprocessing(
    spatial_dims: int,
    pixdim: Sequence[float] | float | None,
    spatial_size: Sequence[int] | None,
    image_key: str = "image",
    label_key: str = "label",
    intensity_percentiles: Sequence[float] = (0.0, 99.5),
) -> Compose:
    """Load one subject ``{image, label?}`` into the network's space.

    load (missing/unreadable files named) -> channel first -> dimensionality check (2D slices ``(H, W, 1)``
    squeezed) -> label on its image's grid -> NaN/constant/label-map checks on the file's values -> RAS orientation
    -> resample to ``pixdim`` (labels nearest; labels checked again) -> robust [0, 1] intensity scaling -> centre
    crop/pad to ``spatial_size`` (None keeps the resampled size) -> float32 tensors. Errors name the file and the
    problem (``SubjectCompose``).
    """
    keys = [image_key, label_key]
    steps = [
        LoadSubjectImaged(keys),
        EnsureChannelFirstd(keys, allow_missing_keys=True),
        EnsureSpatialDimsd(keys, spatial_dims=spatial_dims),
        CheckLabelGridd(image_key, label_key),
        CheckIntensityd(image_key, label_key),
        Orientationd(keys, axcodes="RAS"[:spatial_dims], allow_missing_keys=True),
    ]
    if pixdim is not None:
        pixdim = [float(pixdim)] * spatial_dims if np.isscalar(pixdim) else list(pixdim)
        steps.append(Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest"), allow_missing_keys=True))
        steps.append(CheckIntensityd((), label_key, after=f"resampling to pixdim {pixdim}"))
    lower, upper = intensity_percentiles
    steps.append(ScaleIntensityRangePercentilesd(image_key, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True))
    if spatial_size is not None:
        steps.append(ResizeWithPadOrCropd(keys, spatial_size=list(spatial_size), allow_missing_keys=True))
    steps.append(EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True))
    return SubjectCompose(steps)
