"""Writes inference outputs as NIfTI on the fixed image file's grid, plus an overview PNG and metrics, atomically."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
from nibabel.fileholders import FileHolder
import numpy as np
import torch
from ignite.engine import Engine, Events

from .affine import write_itk_affine
from .apply_ddf import read_image_values, warp_values
from .fixed_grid import FixedFileGrid
from .files import atomic_output, atomic_write_json, logger
from .pairs import label_present
from .visualize import save_overview_png

__all__ = ["OUTPUT_NAMES", "RegistrationWriter", "save_nifti_atomic", "write_pair_outputs"]

NIFTI_INTENT_VECTOR = 1007
# what a registration writes: output name (``--outputs`` of batch_inference) -> file in the pair's folder
OUTPUT_NAMES = {
    "warped_image": "warped_image.nii.gz",
    "warped_label": "warped_label.nii.gz",
    "ddf": "ddf.nii.gz",
    "inverse_ddf": "inverse_ddf.nii.gz",
    "affine": "affine.txt",
    "overview": "overview.png",
    "metrics": "metrics.json",
}
OUTPUT_FILES = tuple(OUTPUT_NAMES.values())
# A displacement field is float noise to deflate: gzip shrinks a 1 mm brain's DDF from 83 to 77 MB in ~3.5 s of CPU,
# the largest part of writing the outputs. It is stored uncompressed inside ddf.nii.gz (still a valid .nii.gz).
DDF_COMPRESSLEVEL = 0


def save_nifti_atomic(
    array: np.ndarray, affine: np.ndarray, path: str, intent: int | None = None, compresslevel: int | None = None
) -> str:
    """Save via a temporary file in the target folder, then rename: no partial NIfTI is ever left at ``path``.

    ``compresslevel`` (``.gz`` only) overrides nibabel's gzip level; 0 stores the bytes in a valid gzip stream
    without deflating them (for float fields that deflate shrinks by a few percent at seconds of CPU).
    """
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))  # the fixed file's own 4x4 affine
    if intent is not None:
        image.header.set_intent(intent)
    suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
    with atomic_output(path, suffix) as temporary:
        if compresslevel is not None and suffix == ".nii.gz":
            with gzip.GzipFile(temporary, "wb", compresslevel=compresslevel, mtime=0) as stream:
                # header and array streamed into the gzip file (no intermediate bytes copy of the whole image)
                holder = FileHolder(fileobj=stream)
                image.to_file_map({"header": holder, "image": holder})
        else:
            nib.save(image, temporary)
    return path


def _output_files(folder: str) -> list[str]:
    """Relative paths of the files under ``folder`` (empty when it does not exist)."""
    if not os.path.isdir(folder):
        return []
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(found)


def _foreign_files(folder: str) -> list[str]:
    """Files under ``folder`` that no registration run writes (outputs sit at the top or one pair folder down)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return [folder]
    return [f for f in _output_files(folder) if os.path.basename(f) not in OUTPUT_FILES or f.count(os.sep) > 1]


class RegistrationWriter:
    """Writes, for each registered pair, into ``output_dir`` (a sub-folder per pair when there are several), on the
    fixed file's own grid and with its own affine (resampled from the network's grid only where they differ):

    ``warped_image.nii.gz`` (float32: the moving file in its own intensities, ``_save_warped_image``),
    ``warped_label.nii.gz`` (int16, warped as the step's ``label_interpolation`` says; when a moving label is given),
    ``ddf.nii.gz`` (the whole transform, the affine stage's included: displacement in voxels of the fixed file's
    grid, NIfTI vector layout ``(X, Y, Z, 1, dims)``,
    component ``i`` along array axis ``i``: MONAI's ``Warp`` convention, ``warped(x) = moving(x + u(x))``),
    ``inverse_ddf.nii.gz`` (when the step computed ``φ⁻¹``: on the **moving** file's grid with its affine, in its
    voxels, ``fixed_in_moving_space(y) = fixed(y + u⁻¹(y))``; the whole transform's inverse), ``affine.txt`` (with
    the affine stage: its ``T`` alone as an ITK transform file, ``scripts.affine.itk_affine_text``),
    ``overview.png`` (network grid) and ``metrics.json``,
    whose ``seconds_load_to_write`` is the registration time a user waits for: from the engine's start (after the
    checkpoint is loaded) through reading the images, registering and writing the NIfTI outputs (Python start-up and
    config parsing are not counted).

    All of it goes to a hidden staging folder beside ``output_dir`` that replaces ``output_dir`` when the run
    completes (a warning lists the earlier run's files it replaced): the folder never mixes two runs' files, and a
    failed run leaves it untouched. A folder holding anything else is refused before the run starts.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = os.path.abspath(output_dir)
        self._clock = time.perf_counter()
        self._staging: str | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._publish)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._discard)

    def _start(self, engine: Engine) -> None:
        """Check ``output_dir`` holds nothing but an earlier run's outputs, then write into a fresh hidden staging
        folder beside it: the folder is swapped in when the run completes, so it only ever holds one run's files."""
        self._clock = time.perf_counter()
        foreign = _foreign_files(self.output_dir)
        if foreign:
            raise FileExistsError(
                f"--output_dir {self.output_dir} holds files that are not registration outputs (e.g. {foreign[0]}); "
                "the run would replace the folder: choose a new or empty folder"
            )
        parent, name = os.path.split(self.output_dir)
        os.makedirs(parent, exist_ok=True)
        self._staging = tempfile.mkdtemp(prefix=f".{name}.writing-", dir=parent)

    def _publish(self, engine: Engine) -> None:
        if self._staging is None:
            return
        staging, self._staging = self._staging, None
        os.chmod(staging, 0o755)  # mkdtemp makes it private; outputs are shared like any other folder
        earlier = _output_files(self.output_dir)
        if os.path.isdir(self.output_dir):
            parent, name = os.path.split(self.output_dir)
            retired = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
            os.replace(self.output_dir, os.path.join(retired, name))
            os.replace(staging, self.output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, self.output_dir)
        if earlier:
            logger.warning(
                "replaced the %d files of an earlier run in %s (%s)", len(earlier), self.output_dir, ", ".join(earlier)
            )

    def _discard(self, engine: Engine, error: Exception) -> None:
        """A failed run leaves ``output_dir`` as it was (no partial outputs) and re-raises its error."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        raise error

    @staticmethod
    def _save_inverse(batch: Mapping, output: Mapping, i: int, folder: str) -> str:
        """``φ⁻¹`` of pair ``i`` onto the moving file's grid. The network's grid is the fixed one; the moving image
        was put on it voxel for voxel (same shape) or resampled onto it in world coordinates, and its affine there
        says which (``PairDataset``), so that affine maps network voxels to the world of the moving file."""
        moving = batch["moving_image"]
        if "affine_matrix" in output:
            # the inverse was computed on the fixed grid (where the affine stage put the moving image): the moving
            # file's voxels sit at T⁻¹ of their world points there
            fixed = batch["fixed_image"]
            affine = fixed.affine[i] if fixed.affine.ndim == 3 else fixed.affine
            grid = FixedFileGrid(
                moving.meta["filename_or_obj"][i],
                torch.as_tensor(affine).cpu().numpy(),
                tuple(fixed.shape[2:]),
                file_to_network_world=np.linalg.inv(output["affine_matrix"][i]),
            )
        else:
            affine = moving.affine[i] if moving.affine.ndim == 3 else moving.affine
            grid = FixedFileGrid(
                moving.meta["filename_or_obj"][i], torch.as_tensor(affine).cpu().numpy(), tuple(moving.shape[2:])
            )
        inverse = output["inverse_ddf"][i].float().cpu().numpy()
        return save_nifti_atomic(
            grid.ddf(inverse),
            grid.file_affine,
            os.path.join(folder, "inverse_ddf.nii.gz"),
            NIFTI_INTENT_VECTOR,
            DDF_COMPRESSLEVEL,
        )

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        several = len(engine.state.dataloader.dataset) > 1
        for i, record in enumerate(output["records"]):
            subfolder = f"{record['moving']}_to_{record['fixed']}" if several else ""
            folder = os.path.join(self._staging or self.output_dir, subfolder)
            identical = write_pair_outputs(folder, engine.state.batch, output, i)
            record["seconds_load_to_write"] = time.perf_counter() - self._clock
            self._clock = time.perf_counter()
            atomic_write_json(os.path.join(folder, "metrics.json"), record)
            logger.info(
                "registered %s -> %s in %.2f s (%.2f s from reading to writing); outputs in %s%s",
                record["moving"],
                record["fixed"],
                record["seconds"],
                record["seconds_load_to_write"],
                os.path.join(self.output_dir, subfolder),
                "" if identical else " (resampled onto the fixed file's grid)",
            )


def _save_warped_image(
    batch: Mapping, i: int, warped: np.ndarray, grid: FixedFileGrid, file_ddf: np.ndarray, folder: str
) -> str:
    """``warped_image.nii.gz``: the moving file itself, in its own intensities, resampled once through the whole
    transform as written to ``ddf.nii.gz`` (``scripts.apply_ddf.warp_values``: the same as ``apply_ddf.py ddf.nii.gz
    MOVING``). The registration's own warped image is in the bundle's [0, 1] scale (0-99.5 percentiles, clipped) and
    was resampled twice where the moving file is on another grid; it is written instead, with a warning, only when the
    moving image did not come from a readable file."""
    path = os.path.join(folder, "warped_image.nii.gz")
    source = batch["moving_image"].meta.get("filename_or_obj")
    source = source[i] if isinstance(source, (list, tuple)) else source
    if isinstance(source, str) and os.path.isfile(source):
        values, source_affine = read_image_values(source)
        return save_nifti_atomic(
            warp_values(values, source_affine, file_ddf[..., 0, :], grid.file_affine), grid.file_affine, path
        )
    logger.warning(
        "the moving image %r is not a readable file: warped_image.nii.gz is in the bundle's [0, 1] intensity scale",
        source,
    )
    return save_nifti_atomic(grid.image(warped).astype(np.float32), grid.file_affine, path)


def write_pair_outputs(
    folder: str, batch: Mapping, output: Mapping, i: int, outputs: Iterable[str] | None = None
) -> bool:
    """Write pair ``i``'s NIfTI files and figure (``RegistrationWriter``'s conventions) into ``folder``; ``outputs``
    names the ones wanted (keys of ``OUTPUT_NAMES``; None: all that the step computed). ``metrics.json`` is the
    caller's. Returns whether the network's grid is the fixed file's own (nothing was resampled)."""
    wanted = set(OUTPUT_NAMES) if outputs is None else set(outputs)
    fixed = batch["fixed_image"]
    affine = fixed.affine[i] if fixed.affine.ndim == 3 else fixed.affine
    matrix = output["affine_matrix"][i] if "affine_matrix" in output else None
    grid = FixedFileGrid(
        fixed.meta["filename_or_obj"][i],
        torch.as_tensor(affine).cpu().numpy(),
        tuple(fixed.shape[2:]),
        endpoint_world=matrix,  # ddf.nii.gz: the whole transform, the affine stage's T after φ
    )
    warped = output["warped_image"][i, 0].float().cpu().numpy()
    ddf = output["ddf"][i].float().cpu().numpy()
    file_ddf = grid.ddf(ddf) if wanted & {"ddf", "warped_image"} else None
    # gzip releases the GIL: the NIfTI files and the figure are written side by side (3D: ~2x faster).
    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = []
        if "warped_image" in wanted:
            jobs.append(pool.submit(_save_warped_image, batch, i, warped, grid, file_ddf, folder))
        if "ddf" in wanted:
            jobs.append(
                pool.submit(
                    save_nifti_atomic,
                    file_ddf,
                    grid.file_affine,
                    os.path.join(folder, "ddf.nii.gz"),
                    NIFTI_INTENT_VECTOR,
                    DDF_COMPRESSLEVEL,
                )
            )
        if "inverse_ddf" in output and "inverse_ddf" in wanted:
            jobs.append(pool.submit(RegistrationWriter._save_inverse, batch, output, i, folder))
        if matrix is not None and "affine" in wanted:
            jobs.append(pool.submit(write_itk_affine, os.path.join(folder, "affine.txt"), matrix))
        if "warped_label" in output and "warped_label" in wanted and label_present(batch, "moving", i):
            label = grid.label(output["warped_label"][i, 0].cpu().numpy()).round().astype(np.int16)
            jobs.append(
                pool.submit(save_nifti_atomic, label, grid.file_affine, os.path.join(folder, "warped_label.nii.gz"))
            )
        if "overview" in wanted:
            save_overview_png(
                os.path.join(folder, "overview.png"),
                output["fixed_image"][i, 0].float().cpu().numpy(),
                output["moving_image"][i, 0].float().cpu().numpy(),
                warped,
                ddf,
            )
        for job in jobs:
            job.result()  # re-raises a failed write
    return grid.identical
