"""Moving/fixed pair sampling over a dataset of preprocessed subjects.

Subjects are loaded and cached once (``CacheDataset``); pairs are drawn on the fly, so the N*(N-1) ordered pairs of a
large cohort are never materialised.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Randomizable, ResampleToMatch
from torch.utils.data import Dataset

from .files import logger

__all__ = ["PAIR_MODES", "PairDataset", "label_present", "pair_indices_from_paths"]

PAIR_MODES = ("pairwise", "ring", "atlas", "explicit")
ATLAS_DIRECTIONS = ("subject_to_atlas", "atlas_to_subject", "both")


def _subject_name(subject: Mapping) -> str:
    meta = getattr(subject["image"], "meta", {})
    name = os.path.basename(str(meta.get("filename_or_obj", "subject")))
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _entries(dataset: object) -> list:
    """The input entries (paths) of a MONAI dataset, without loading them; a plain list is its own entries."""
    data = getattr(dataset, "data", dataset)
    return list(data) if isinstance(data, Sequence) else []


def _has_label(entry: object) -> bool:
    return isinstance(entry, Mapping) and entry.get("label") is not None


def label_present(batch: Mapping, role: str, i: int) -> bool:
    """Whether pair ``i`` of a batch has a real ``role`` ('fixed'/'moving') label (not a stand-in of zeros)."""
    if f"{role}_label" not in batch:
        return False
    flags = batch.get(f"{role}_label_present")
    return True if flags is None else bool(torch.as_tensor(flags).flatten()[i])


def pair_indices_from_paths(subject_images: Sequence[str], pairs: Sequence[Mapping]) -> list[tuple[int, int]]:
    """Map explicit ``[{"fixed": image path, "moving": image path}]`` to ``(fixed, moving)`` subject indices."""
    index = {os.path.realpath(path): i for i, path in enumerate(subject_images)}
    resolved = []
    for number, pair in enumerate(pairs):
        try:
            resolved.append((index[os.path.realpath(pair["fixed"])], index[os.path.realpath(pair["moving"])]))
        except KeyError as error:
            raise ValueError(
                f"explicit pair {number} names {error.args[0]}, which is not an image of the same datalist section"
            ) from None
    return resolved


class PairDataset(Randomizable, Dataset):
    """Pairs ``{fixed_image, moving_image, fixed_label?, moving_label?, fixed_name, moving_name}`` of subjects.

    Modes:
        ``pairwise``: each item is a fresh random pair of two distinct subjects (``num_pairs`` items an epoch,
            default one per subject); the sequence continues across epochs, so every epoch sees new pairs.
        ``ring``: deterministic, subject ``i`` moving onto subject ``i + 1`` (validation/test without explicit pairs).
        ``atlas``: every subject with the atlas; ``atlas_direction`` picks subject->atlas, atlas->subject or both.
        ``explicit``: the given ``(fixed, moving)`` index pairs.

    Args:
        subjects: indexable dataset of preprocessed subjects ``{image, label?}``.
        mode: one of ``PAIR_MODES``.
        num_pairs: items per epoch in ``pairwise`` mode.
        atlas: indexable dataset whose first item is the preprocessed atlas (``atlas`` mode).
        atlas_direction: one of ``subject_to_atlas`` (moving = subject), ``atlas_to_subject``, ``both``.
        pairs: ``(fixed, moving)`` subject indices for ``explicit`` mode.
        transform: applied to each pair dictionary (e.g. random augmentation in training).
        seed: seed of the pair sampler.
        resample_moving: put a moving subject of another shape on the fixed grid in world coordinates (identity);
            False keeps it on its own grid, for an affine stage that resamples it through its estimate
            (``scripts.affine``; batches of one pair).
    """

    def __init__(
        self,
        subjects: Sequence[Mapping],
        mode: str = "pairwise",
        num_pairs: int | None = None,
        atlas: Sequence[Mapping] | None = None,
        atlas_direction: str = "subject_to_atlas",
        pairs: Sequence[tuple[int, int]] | None = None,
        transform: Callable | None = None,
        seed: int = 0,
        resample_moving: bool = True,
    ) -> None:
        if mode not in PAIR_MODES:
            raise ValueError(f"unknown pair_mode '{mode}'; expected one of {PAIR_MODES}")
        if atlas_direction not in ATLAS_DIRECTIONS:
            raise ValueError(f"unknown atlas_direction '{atlas_direction}'; expected one of {ATLAS_DIRECTIONS}")
        n = len(subjects)
        if mode in ("pairwise", "ring") and n < 2:
            raise ValueError(f"pair_mode '{mode}' needs at least 2 subjects, got {n}")
        if mode == "atlas" and (atlas is None or len(atlas) < 1):
            raise ValueError("pair_mode 'atlas' needs an atlas (datalist key 'atlas')")
        if mode == "explicit" and not pairs:
            raise ValueError("pair_mode 'explicit' needs a non-empty list of pairs")
        self.subjects, self.atlas, self.mode = subjects, atlas, mode
        # Partly labelled datalists: when any subject has a label, every pair carries both label keys (zeros where a
        # subject has none) and ``*_label_present`` flags, so batches collate and consumers skip the missing ones.
        entries = _entries(subjects)
        labelled = sum(_has_label(entry) for entry in entries)
        self.labelled = labelled > 0 or any(_has_label(entry) for entry in _entries(atlas or []))
        if 0 < labelled < len(entries):
            logger.info(
                "%d of %d subjects have a label: label losses and Dice use the pairs where both sides have one",
                labelled,
                len(entries),
            )
        self.num_pairs = int(num_pairs) if num_pairs else n
        self.transform = transform
        self.resample = ResampleToMatch()
        self.resample_moving = bool(resample_moving)
        if mode == "ring":
            self.pairs = [((i + 1) % n, i) for i in range(n)]
        elif mode == "atlas":
            forward = [(-1, i) for i in range(n)]  # -1 stands for the atlas
            backward = [(i, -1) for i in range(n)]
            self.pairs = {"subject_to_atlas": forward, "atlas_to_subject": backward, "both": forward + backward}[
                atlas_direction
            ]
        elif mode == "explicit":
            self.pairs = [(int(f), int(m)) for f, m in pairs]
            for f, m in self.pairs:
                if not (0 <= f < n and 0 <= m < n):
                    raise ValueError(f"explicit pair ({f}, {m}) is out of range for {n} subjects")
        else:
            self.pairs = None
        self.set_random_state(seed=seed)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> PairDataset:
        # DataLoader workers seed the dataset; pass the seed on to the pair transform's random transforms too.
        super().set_random_state(seed=seed, state=state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data: None = None) -> tuple[int, int]:
        n = len(self.subjects)
        fixed = int(self.R.randint(n))
        moving = int(self.R.randint(n - 1))
        return fixed, moving + (moving >= fixed)  # uniform over subjects other than `fixed`

    def __len__(self) -> int:
        return self.num_pairs if self.pairs is None else len(self.pairs)

    def _subject(self, index: int) -> Mapping:
        return self.atlas[0] if index == -1 else self.subjects[index]

    def __getitem__(self, index: int) -> dict:
        if self.pairs is None:
            fixed_index, moving_index = self.randomize()
        else:
            fixed_index, moving_index = self.pairs[index]
        pair: dict = {}
        for role, subject_index in (("fixed", fixed_index), ("moving", moving_index)):
            subject = self._subject(subject_index)
            pair[f"{role}_image"] = subject["image"]
            if "label" in subject:
                pair[f"{role}_label"] = subject["label"]
            elif self.labelled:
                image = subject["image"]
                zeros = np.zeros_like if isinstance(image, np.ndarray) else torch.zeros_like
                pair[f"{role}_label"] = zeros(image)
            if self.labelled:
                pair[f"{role}_label_present"] = "label" in subject
            pair[f"{role}_name"] = _subject_name(subject)
        if self.resample_moving and pair["fixed_image"].shape != pair["moving_image"].shape:
            # Different field of view or spacing: resample the moving subject onto the fixed grid in world
            # coordinates (the images are assumed affinely aligned, as registration inputs are).
            pair["moving_image"] = self.resample(pair["moving_image"], pair["fixed_image"], mode="bilinear")
            if "moving_label" in pair:
                pair["moving_label"] = self.resample(pair["moving_label"], pair["fixed_image"], mode="nearest")
        return self.transform(pair) if self.transform is not None else pair
