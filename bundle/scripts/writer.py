"""Writes inference outputs as NIfTI on the fixed image's (preprocessed) grid, plus an overview PNG and metrics.

Every output carries the affine MONAI tracked for the fixed image through orientation, resampling and crop/pad, so
it overlays the fixed image in ITK-SNAP / 3D Slicer. When ``pixdim`` equals the fixed image's spacing and no
``spatial_size`` is forced, that grid is the fixed image's own (RAS-reoriented) grid.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events

from .handlers import atomic_write_text, logger
from .visualize import save_overview_png

__all__ = ["RegistrationWriter", "save_nifti_atomic", "to_nifti_affine"]

NIFTI_INTENT_VECTOR = 1007


def to_nifti_affine(affine: np.ndarray) -> np.ndarray:
    """4x4 NIfTI affine from MONAI's ``(spatial_dims + 1)``-square affine (2D images get a unit third axis)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape == (4, 4):
        return affine
    if affine.shape != (3, 3):
        raise ValueError(f"unexpected affine shape {affine.shape}")
    full = np.eye(4)
    full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
    return full


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str, intent: int | None = None) -> str:
    """Save via a temporary file in the target folder, then rename: no partial NIfTI is ever left at ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    image = nib.Nifti1Image(array, to_nifti_affine(affine))
    if intent is not None:
        image.header.set_intent(intent)
    temporary = os.path.join(folder, f".tmp{os.getpid()}_{os.path.basename(path)}")
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _spatial(array: np.ndarray) -> np.ndarray:
    """``(*spatial)`` -> 3D NIfTI layout (2D images stored as ``(H, W, 1)``, like their inputs)."""
    return array[..., None] if array.ndim == 2 else array


class RegistrationWriter:
    """Writes, for each registered pair, into ``output_dir`` (a sub-folder per pair when there are several):

    ``warped_image.nii.gz`` (float32), ``warped_label.nii.gz`` (int16, nearest; when a moving label is given),
    ``ddf.nii.gz`` (displacement in voxels of this grid, NIfTI vector layout ``(X, Y, Z, 1, spatial_dims)``,
    component ``i`` along array axis ``i``: MONAI's ``Warp`` convention), ``overview.png`` and ``metrics.json``.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        batch = engine.state.batch
        several = len(engine.state.dataloader.dataset) > 1
        for i, record in enumerate(output["records"]):
            folder = os.path.join(self.output_dir, f"{record['moving']}_to_{record['fixed']}") if several else self.output_dir
            affine = batch["fixed_image"].affine[i] if batch["fixed_image"].affine.ndim == 3 else batch["fixed_image"].affine
            affine = affine.cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
            warped = output["warped_image"][i, 0].float().cpu().numpy()
            ddf = output["ddf"][i].float().cpu().numpy()
            save_nifti_atomic(_spatial(warped).astype(np.float32), affine, os.path.join(folder, "warped_image.nii.gz"))
            vector = np.stack([_spatial(component) for component in ddf], axis=-1)[..., None, :].astype(np.float32)
            save_nifti_atomic(vector, affine, os.path.join(folder, "ddf.nii.gz"), intent=NIFTI_INTENT_VECTOR)
            if "warped_label" in output:
                label = output["warped_label"][i, 0].cpu().numpy().round().astype(np.int16)
                save_nifti_atomic(_spatial(label), affine, os.path.join(folder, "warped_label.nii.gz"))
            save_overview_png(
                os.path.join(folder, "overview.png"),
                output["fixed_image"][i, 0].float().cpu().numpy(),
                output["moving_image"][i, 0].float().cpu().numpy(),
                warped,
                ddf,
            )
            atomic_write_text(os.path.join(folder, "metrics.json"), json.dumps(record, indent=1))
            logger.info("registered %s -> %s in %.3f s; outputs in %s", record["moving"], record["fixed"], record["seconds"], folder)
