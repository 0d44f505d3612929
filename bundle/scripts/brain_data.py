"""The datalist of the shipped 3D brain model's real training images (``../shared/data/oasis3d_train``).

Only the unlabelled training images are listed: the labelled OASIS subjects in ``oasis3d``/``oasis2d`` are test
subjects and never enter training. Each image is listed ``repeats`` times so that the pair sampler also draws
same-subject pairs, which the independent random deformations of each side turn into pairs with a known answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import atomic_write_text

__all__ = ["write_training_datalist"]


def write_training_datalist(data_dir: str, output: str, repeats: int = 2, pattern: str = "*_image.nii.gz") -> str:
    """Write ``{"training": [...] * repeats, "validation": [...]}`` for the images matching ``pattern`` in
    ``data_dir`` (absolute paths) to ``output``; returns ``output``.

    Validation lists the same images once (ring pairs): with no labels it only tracks the loss of the run.
    """
    images = sorted(str(path.resolve()) for path in Path(data_dir).glob(pattern))
    if len(images) < 2:
        raise FileNotFoundError(f"{data_dir}: need at least 2 files matching '{pattern}' to train, found {len(images)}")
    entries = [{"image": image} for image in images]
    content = {"training": entries * int(repeats), "validation": entries}
    text = json.dumps(content, indent=1)
    if not os.path.isfile(output) or open(output).read() != text:
        atomic_write_text(output, text)
    return output
