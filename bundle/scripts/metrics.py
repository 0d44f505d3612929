"""Registration metrics MONAI lacks or makes easy to misuse: per-structure Dice/HD95 on label maps, Jacobians.

``monai.metrics.DiceMetric`` wants one-hot input with a known number of classes (on raw label maps it scores
label 1 only), and FreeSurfer-style ids run to 255 with gaps, so Dice here is computed per label id directly.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage
from monai.metrics import compute_hausdorff_distance

__all__ = [
    "resolve_label_ids",
    "labels_to_score",
    "dice_per_label",
    "hd95_per_label",
    "jacobian_determinant",
    "deformation_stats",
]


def resolve_label_ids(value: Sequence[int] | str | None) -> list[int] | None:
    """Label ids to score: a list, a JSON file with a ``labels`` list (e.g. ``eval_labels.json``), or None (all)."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [int(v) for v in value]
    if not os.path.isfile(value):
        raise FileNotFoundError(f"eval_label_ids: file not found: {value}")
    with open(value) as stream:
        content = json.load(stream)
    labels = content["labels"] if isinstance(content, dict) else content
    return [int(v) for v in labels]


def labels_to_score(fixed_label: np.ndarray, moving_label: np.ndarray, label_ids: Iterable[int] | None) -> list[int]:
    """Foreground ids present in both label maps (Learn2Reg skips structures absent from either), optionally
    restricted to ``label_ids``. Fixed and moving (not warped) maps decide, so identity and registration are
    scored on the same structures."""
    present = _ids_present(fixed_label) & _ids_present(moving_label)
    present.discard(0)
    if label_ids is not None:
        present &= set(int(i) for i in label_ids)
    return sorted(present)


def _ids_present(label_map: np.ndarray) -> set[int]:
    """The ids of a label map: a ``np.bincount`` for non-negative integer maps (a sort-free pass, where
    ``np.unique`` sorts the whole volume), ``np.unique`` otherwise."""
    if (
        np.issubdtype(label_map.dtype, np.integer)
        and label_map.size
        and 0 <= label_map.min() <= label_map.max() < 2**16
    ):
        return {int(i) for i in np.flatnonzero(np.bincount(label_map.ravel()))}
    return set(np.unique(label_map).astype(int))


def dice_per_label(fixed_label: np.ndarray, warped_label: np.ndarray, label_ids: Sequence[int]) -> dict[int, float]:
    """Dice ``2|F∩W| / (|F|+|W|)`` for each id; a structure that vanished after warping scores 0.

    Integer maps with ids in ``[0, 2**16)``: three ``np.bincount`` passes over the voxels count every id at once
    (|F|, |W| and |F∩W| where both maps hold the same id), where one comparison per id would read the volume twice
    per structure (a 1 mm brain, 35 structures: ~0.8 s -> well under 0.1 s). Other maps: one comparison per id.
    """
    ids = [int(label) for label in label_ids]
    bounded = ids and min(ids) >= 0 and max(ids) < 2**16
    integral = np.issubdtype(fixed_label.dtype, np.integer) and np.issubdtype(warped_label.dtype, np.integer)
    if bounded and integral and fixed_label.size and fixed_label.min() >= 0 and warped_label.min() >= 0:
        fixed, warped = fixed_label.ravel(), warped_label.ravel()
        size = max(max(ids), int(fixed.max()), int(warped.max())) + 1
        fixed_counts = np.bincount(fixed, minlength=size)
        warped_counts = np.bincount(warped, minlength=size)
        shared_counts = np.bincount(fixed[fixed == warped], minlength=size)
        scores = {}
        for label in ids:
            denominator = int(fixed_counts[label]) + int(warped_counts[label])
            scores[label] = float(2.0 * shared_counts[label] / denominator) if denominator else 0.0
        return scores
    scores = {}
    for label in label_ids:
        fixed_mask, warped_mask = fixed_label == label, warped_label == label
        denominator = fixed_mask.sum() + warped_mask.sum()
        scores[label] = float(2.0 * np.logical_and(fixed_mask, warped_mask).sum() / denominator) if denominator else 0.0
    return scores


def _bounding_boxes(label_map: np.ndarray, label_ids: Sequence[int]) -> dict[int, tuple[slice, ...] | None]:
    """Bounding box of each id (None when absent): one pass over the map (``scipy.ndimage.find_objects``) instead of
    one full-volume comparison and ``argwhere`` per id; per-id comparisons where ids are negative or huge."""
    ids = [int(label) for label in label_ids]
    if ids and np.issubdtype(label_map.dtype, np.integer) and label_map.min() >= 0 and max(ids) < 2**20:
        objects = ndimage.find_objects(label_map, max_label=max(ids))
        return {label: objects[label - 1] if label > 0 else _box_of(label_map == label) for label in ids}
    return {label: _box_of(label_map == label) for label in ids}


def _box_of(mask: np.ndarray) -> tuple[slice, ...] | None:
    found = np.argwhere(mask)
    if not found.size:
        return None
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(found.min(axis=0), found.max(axis=0)))


def hd95_per_label(
    fixed_label: np.ndarray, warped_label: np.ndarray, label_ids: Sequence[int], spacing: Sequence[float] | None = None
) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance (mm when ``spacing`` is given) per id, via MONAI.

    Each structure is cropped to the bounding box of both masks (plus a margin) first: surface distances do not
    change, and the distance transforms then cost a fraction of the full volume. NaN when either mask is empty.
    Structures are scored on every CPU thread (MONAI's surface distances run on one).
    """
    fixed_boxes, warped_boxes = _bounding_boxes(fixed_label, label_ids), _bounding_boxes(warped_label, label_ids)

    def score(label: int) -> float:
        fixed_box, warped_box = fixed_boxes[int(label)], warped_boxes[int(label)]
        if fixed_box is None or warped_box is None:
            return float("nan")
        box = tuple(
            slice(max(min(a.start, b.start) - 2, 0), max(a.stop, b.stop) + 2) for a, b in zip(fixed_box, warped_box)
        )
        pred = torch.as_tensor(warped_label[box] == label)[None, None]
        truth = torch.as_tensor(fixed_label[box] == label)[None, None]
        return float(compute_hausdorff_distance(pred, truth, percentile=95, spacing=spacing).item())

    with ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1)) as pool:
        return dict(zip(label_ids, pool.map(score, label_ids)))


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """det J of ``φ(x) = x + u(x)`` for a displacement ``u`` of shape ``(spatial_dims, *spatial)`` in voxels.

    Central differences inside, one-sided at the border (``np.gradient``'s scheme, the usual choice of evaluation
    scripts), computed in torch on every CPU thread (numpy's runs on one; this is part of every inference's time).
    """
    return torch.cat(list(_determinant_slabs(_as_ddf_tensor(ddf)))).numpy()


# Rows of the first spatial axis per slab: the nine derivative volumes of a slab stay in the CPU's cache, where
# differentiating the whole 1 mm brain at once streams ~250 MB through memory (`python benchmarks/
# jacobian_stats.py`: the same values, a fraction of the time).
_SLAB_ROWS = 8


def _as_ddf_tensor(ddf: np.ndarray) -> torch.Tensor:
    field = torch.from_numpy(np.asarray(ddf))
    spatial_dims = field.shape[0]
    if spatial_dims not in (2, 3) or field.dim() != spatial_dims + 1 or min(field.shape[1:]) < 2:
        shape = tuple(field.shape)
        raise ValueError(f"expected a DDF of shape (spatial_dims, *spatial), 2+ voxels an axis, got {shape}")
    return field


def _determinant_slabs(ddf: torch.Tensor, rows: int = _SLAB_ROWS) -> Iterable[torch.Tensor]:
    """det J in slabs of ``rows`` along the first spatial axis, each differentiated with one neighbouring row on
    either side, so every value is the one ``np.gradient`` gives on the whole field (one-sided at the field's own
    border, central elsewhere)."""
    length = ddf.shape[1]
    for start in range(0, length, rows):
        low, high = max(start - 1, 0), min(start + rows + 1, length)
        det = _jacobian_determinant(ddf[:, low:high])
        yield det[start - low : start - low + min(rows, length - start)]


def _jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    spatial_dims = ddf.shape[0]
    # jac[i][j] = d φ_i / d x_j
    jac = [list(torch.gradient(ddf[i])) for i in range(spatial_dims)]  # np.gradient's scheme, every axis
    for i in range(spatial_dims):
        jac[i][i] += 1.0
    if spatial_dims == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


class _RunningMoments:
    """Count, mean and sum of squared deviations of values seen in parts (Chan et al.'s pairwise update, float64):
    the population std of all the values without holding them at once."""

    def __init__(self) -> None:
        self.count, self.mean, self.squares = 0, 0.0, 0.0

    def add(self, values: torch.Tensor) -> None:
        count = values.numel()
        if count == 0:
            return
        values = values.double()
        mean = float(values.mean())
        squares = float(((values - mean) ** 2).sum())
        total = self.count + count
        delta = mean - self.mean
        self.squares += squares + delta * delta * self.count * count / total
        self.mean += delta * count / total
        self.count = total

    def std(self) -> float:
        return (self.squares / self.count) ** 0.5 if self.count else float("nan")


def deformation_stats(ddf: np.ndarray) -> dict[str, float]:
    """Plausibility of a DDF ``(spatial_dims, *spatial)``.

    ``folding_fraction``: fraction of voxels with det J <= 0.
    ``std_log_jacobian``: textbook std of log det J over the voxels where det J > 0 (log is undefined elsewhere).
    ``sdlogj_learn2reg``: the Learn2Reg evaluation script's value, std of log(clip(det J + 3, 1e-9, 1e9)); the
    +3 shift keeps folded voxels in the log, so it is not comparable with the textbook value.
    Computed slab by slab (``_determinant_slabs``), the same values as from the whole det J array.
    """
    field = _as_ddf_tensor(ddf)
    log_positive, log_shifted = _RunningMoments(), _RunningMoments()
    voxels = 0
    for det in _determinant_slabs(field):
        voxels += det.numel()
        log_positive.add(det[det > 0].log())
        log_shifted.add((det + 3.0).clamp(1e-9, 1e9).log())
    return {
        "folding_fraction": 1.0 - log_positive.count / voxels,
        "std_log_jacobian": log_positive.std(),
        "sdlogj_learn2reg": log_shifted.std(),
    }
