"""Side-by-side registration benchmark: identity, this bundle (network alone / refined), ANTs SyN and Greedy.

    python benchmarks/oasis_benchmark.py [--methods identity,bundle-network,bundle-fast,bundle-refined,
        bundle-accurate,ants-syn,greedy]
        [--directions forward|reverse|both] [--reverse] [--data ../shared/data/oasis3d|oasis2d] [--datalist D.json]
        [--threads 2] [--output_dir bundle/runs/benchmark] [--merge] [--bundle_ckpt PATH]

Default pair: the real OASIS subjects at 1 mm, moving ``subject_b`` -> fixed ``subject_a`` ("b_to_a");
``--data ../shared/data/oasis2d`` takes the same subjects' 2D slices instead (files ``X x Y x 1``, scored in 2D);
``--directions reverse`` runs a->b only, ``--directions both`` (or ``--reverse``) runs both. ``--datalist D.json``
replaces the OASIS pair with ``{"pairs": [{"fixed", "moving", "fixed_label", "moving_label"[, "name"]}, ...]}``
(relative paths are relative to the JSON file).

Every method is scored by the same code, the bundle's ``scripts.metrics``: Dice per structure (the
``eval_labels.json`` ids present in both label maps; ``DATA/eval_labels.json``, else the 3D folder's, which is what
a 2D folder without one uses) between the fixed label and the method's own warped moving
label, folded-voxel % and SD of log det J of its displacement field expressed in voxels of the fixed grid along the
array axes (``warped(x) = moving(x + u(x))``). ANTs and Greedy write ITK displacement fields (physical LPS mm); they
are converted with the fixed file's affine, and that conversion is checked on every run: warping the moving label
with the converted field (nearest neighbour) must give nearly the Dice of the tool's own warped label.

2D (a fixed file whose third axis has size 1): every field is ``(2, X, Y)``, Dice is on the 2D label maps, ANTs and
Greedy (``Greedy2D``, ``-m NCC 2x2``) register true 2D copies of the slices (``dim[0] = 2``, the file's in-plane
affine; ITK reads a ``X x Y x 1`` NIfTI as a 2D image with an identity direction, i.e. mirrored in x and y against
the header) and their 2-component LPS fields are converted with the in-plane block of the fixed affine. The bundle
uses its shipped 2D model (``bundle/models/2d/model.pt``) unless ``--bundle_ckpt`` names another (e.g. a model
trained with ``bundle/configs/train.yaml``).

Timing (wall and CPU seconds, CPU = this process + waited-for children): the bundle runs as the user would run it,
``python -m monai.bundle run inference`` in a subprocess, so its time includes interpreter/torch start-up and file
I/O (the bundle's own registration seconds are recorded beside it); ANTs and Greedy run in this process and are timed
from reading the images to writing the warped label. Scoring and field conversion are never timed.

Classical tools are optional: ``pip install --no-deps -r requirements-benchmark.txt``.
Outputs (atomically): ``OUTPUT_DIR/results.json``, ``OUTPUT_DIR/dice_boxplot.png``, ``OUTPUT_DIR/logs/*.log``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "oasis3d")
sys.path.insert(0, str(REPO / "bundle"))

from scripts.files import atomic_write_text  # noqa: E402
from scripts.metrics import deformation_stats, dice_per_label, labels_to_score, resolve_label_ids  # noqa: E402

CASES = ("aligned", "misaligned", "contrast", "both", "warp")
MOVED_CASES = ("misaligned", "both")  # the moving image on another grid: Greedy runs its affine stage first
CONTRAST_CASES = ("contrast", "both")  # the moving image in another contrast: Greedy and the bundle switch to it
METHODS = (
    "identity",
    "bundle-network",
    "bundle-fast",
    "bundle-refined",
    "bundle-accurate",
    "bundle-noaffine",
    "bundle-multimodal",
    "ants-syn",
    "greedy",
)
# bundle method -> inference overrides: the network alone, then the refinement presets of inference.yaml
BUNDLE_VARIANTS = {
    "bundle-network": ["--refine_iterations", "0"],
    "bundle-fast": ["--refine_preset", "fast"],
    "bundle-refined": [],
    "bundle-accurate": ["--refine_preset", "accurate"],
    "bundle-noaffine": ["--affine", "false"],  # the default without its affine stage (pre-aligned inputs)
    "bundle-multimodal": ["--multimodal", "true"],  # the contrast-invariant path (MIND-SSC refinement)
}
CLASSICAL_PACKAGES = {"ants-syn": ("ants", "antspyx"), "greedy": ("picsl_greedy", "picsl-greedy")}
INSTALL_HINT = "pip install --no-deps -r requirements-benchmark.txt"
GREEDY_SETTINGS = {3: "-m NCC 2x2x2 -n 100x50x10", 2: "-m NCC 2x2 -n 100x50x10"}  # by spatial dims
GREEDY_MULTIMODAL_SETTINGS = {3: "-m NMI -n 100x50x10", 2: "-m NMI -n 100x50x10"}  # two contrasts: Greedy's NMI
# NIfTI intent codes: ITK writes its displacement fields as VECTOR with the raw LPS components; since ITK 5.3 a
# DISPVECT field is stored in RAS (ITK flips x and y on read and write).
NIFTI_INTENT_DISPVECT, NIFTI_INTENT_VECTOR = 1006, 1007
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # 2D: its top-left 2 x 2 block
# Mean-Dice gap (own nearest-neighbour warp vs the tool's warped label) above which the field convention is suspect:
# interpolators differ (genericLabel, LABEL 0.2vox) by well under 0.01; a sign or axis error costs far more.
CONVENTION_TOLERANCE = 0.02
ANTS_TRANSFORM = re.compile(r"^ants_\d+(Warp\.nii\.gz|GenericAffine\.mat)$")  # what registration(outprefix) writes


# ---------------------------------------------------------------------------------------------------------- fields


def grid_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The spatial grid of an image: ``(X, Y)`` for a 2D slice (``X x Y`` or ``X x Y x 1``), else ``(X, Y, Z)``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2 or (len(shape) >= 3 and shape[2] == 1):
        return shape[:2]
    return shape[:3]


def squeeze_to_grid(array: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
    """``array`` on the grid ``shape``, dropping trailing singleton axes (a 2D slice stored ``X x Y x 1``)."""
    dims = len(shape)
    if array.shape[:dims] != tuple(shape) or any(s != 1 for s in array.shape[dims:]):
        raise ValueError(f"{what}: grid {array.shape} differs from the fixed grid {tuple(shape)}")
    return array.reshape(tuple(shape))


def spatial_affine(affine: np.ndarray, dims: int) -> np.ndarray:
    """The homogeneous affine of the first ``dims`` array axes: the 4 x 4 itself in 3D, the in-plane 3 x 3
    (rows/columns x, y and translation) in 2D, which is what ITK keeps when it reads a slice as a 2D image."""
    affine = np.asarray(affine, dtype=np.float64)
    if dims == 3:
        return affine
    if dims != 2:
        raise ValueError(f"spatial dims must be 2 or 3, got {dims}")
    if not (np.allclose(affine[:2, 2], 0.0, atol=1e-6) and np.allclose(affine[2, :2], 0.0, atol=1e-6)):
        raise ValueError(
            "2D slice with an oblique affine (its third axis mixes with the in-plane ones): the in-plane 2D "
            f"geometry ITK uses would differ from the file's:\n{affine}"
        )
    return affine[np.ix_([0, 1, 3], [0, 1, 3])]


def itk_displacement_to_voxels(field: np.ndarray, fixed_affine: np.ndarray, frame: str = "LPS") -> np.ndarray:
    """Physical displacement field in mm -> voxels of the fixed grid along the array axes.

    3D: ``(X, Y, Z[, 1], 3)`` -> ``(3, X, Y, Z)``; 2D (2 components, as ITK writes a 2D field):
    ``(X, Y[, 1, 1], 2)`` -> ``(2, X, Y)``. ITK (ANTs, Greedy) maps a fixed physical point ``p`` to ``p + d(p)`` in
    moving space with ``d`` in LPS mm; the bundle's metrics want ``u`` in fixed-grid voxels along the array axes.
    With ``A`` the fixed file's nibabel (RAS) affine, ``d_RAS = diag(-1, -1, 1) d_LPS`` and ``u = A[:3, :3]^-1
    d_RAS`` (translation does not apply to a displacement); in 2D the in-plane blocks, ``diag(-1, -1)`` and
    ``A[:2, :2]``. ``frame="RAS"`` skips the flip, for fields already in RAS (NIfTI intent DISPVECT).
    """
    vectors = np.asarray(field, dtype=np.float64)
    dims = vectors.shape[-1] if vectors.ndim >= 3 else 0
    spatial = list(vectors.shape[:-1])
    while len(spatial) > dims and spatial[-1] == 1:
        spatial.pop()
    if dims not in (2, 3) or len(spatial) != dims:
        raise ValueError(
            f"expected a displacement field (X, Y, Z[, 1], 3) or (X, Y[, 1, 1], 2), got shape {np.shape(field)}"
        )
    vectors = vectors.reshape(tuple(spatial) + (dims,))
    if frame not in ("LPS", "RAS"):
        raise ValueError(f"frame must be 'LPS' or 'RAS', got {frame!r}")
    ras = vectors @ LPS_TO_RAS[:dims, :dims].T if frame == "LPS" else vectors
    to_voxels = np.linalg.inv(spatial_affine(fixed_affine, dims)[:dims, :dims])
    return np.ascontiguousarray(np.einsum("ij,...j->i...", to_voxels, ras), dtype=np.float32)


def load_itk_displacement(path: str, fixed_affine: np.ndarray, fixed_shape: Sequence[int]) -> np.ndarray:
    """Read an ITK/ANTs/Greedy warp file written on the fixed grid and return it in fixed-grid voxels,
    ``(len(fixed_shape), *fixed_shape)``; a 2D field is ``(X, Y, 1, 1, 2)`` on file.

    Refuses a field on another grid or in another frame (in 2D, the in-plane affine is compared): the conversion
    assumes the field's voxels and physical axes are the fixed file's.
    """
    image = nib.load(path)
    dims = len(fixed_shape)
    if tuple(image.shape[:dims]) != tuple(fixed_shape) or any(s != 1 for s in image.shape[dims:-1]):
        raise ValueError(
            f"{path}: displacement grid {image.shape[:-1]} differs from the fixed grid {tuple(fixed_shape)}"
        )
    if not np.allclose(spatial_affine(image.affine, dims), spatial_affine(fixed_affine, dims), atol=1e-3):
        raise ValueError(f"{path}: displacement field affine differs from the fixed image's:\n{image.affine}")
    intent = int(image.header["intent_code"])
    frame = "RAS" if intent == NIFTI_INTENT_DISPVECT else "LPS"
    return itk_displacement_to_voxels(np.asarray(image.dataobj), fixed_affine, frame=frame)


def load_bundle_ddf(path: str, fixed_shape: Sequence[int]) -> np.ndarray:
    """The bundle's ``ddf.nii.gz``, already fixed-grid voxels: 3D ``(X, Y, Z, 1, 3)`` -> ``(3, X, Y, Z)``, 2D
    ``(X, Y, 1, 1, 2)`` (the slice's singleton third axis kept) -> ``(2, X, Y)``."""
    vectors = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    dims = len(fixed_shape)
    layout = "(X, Y, Z, 1, 3)" if dims == 3 else "(X, Y, 1, 1, 2)"
    if vectors.ndim != 5 or vectors.shape[3] != 1 or vectors.shape[-1] != dims or (dims == 2 and vectors.shape[2] != 1):
        raise ValueError(f"{path}: expected a {dims}D NIfTI vector field {layout}, got {vectors.shape}")
    if tuple(vectors.shape[:dims]) != tuple(fixed_shape):
        raise ValueError(f"{path}: grid {vectors.shape[:dims]} differs from the fixed grid {tuple(fixed_shape)}")
    return np.ascontiguousarray(np.moveaxis(vectors.reshape(tuple(fixed_shape) + (dims,)), -1, 0))


def warp_label(
    moving_label: np.ndarray, ddf: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour ``moving(x + u(x))`` on the fixed grid, ``u`` in fixed voxels, through physical space.

    Independent of every tool's resampler, so comparing its Dice with the tool's own warped label tests the field
    conversion; moving and fixed may sit on different grids. Rounds explicitly rather than calling
    ``scipy.ndimage.map_coordinates(order=0, mode="constant")``, which returns ``cval`` for points in the outer half
    voxel (beyond ``n - 1``), i.e. blanks border voxels a nearest-neighbour resampler keeps. 2D: ``ddf`` is
    ``(2, X, Y)``, ``moving_label`` ``(X', Y')`` and the affines' in-plane blocks are used.
    """
    dims = ddf.shape[0]
    shape = ddf.shape[1:]
    if moving_label.ndim != dims:
        raise ValueError(f"moving label {moving_label.shape} is not {dims}D like the field {ddf.shape}")
    points = np.indices(shape, dtype=np.float32) + ddf
    vox2vox = np.linalg.inv(spatial_affine(moving_affine, dims)) @ spatial_affine(fixed_affine, dims)
    if not np.allclose(vox2vox, np.eye(dims + 1), atol=1e-6):
        points = np.einsum("ij,j...->i...", vox2vox[:dims, :dims], points) + vox2vox[:dims, dims].reshape(
            (dims,) + (1,) * dims
        )
    index = np.floor(points + 0.5).astype(np.intp)
    del points
    inside = np.ones(shape, dtype=bool)
    for axis, size in enumerate(moving_label.shape):
        inside &= (index[axis] >= 0) & (index[axis] < size)
        np.clip(index[axis], 0, size - 1, out=index[axis])
    warped = moving_label[tuple(index)]
    warped[~inside] = 0
    return warped


# ---------------------------------------------------------------------------------------------------------- scoring


def score(fixed_label: np.ndarray, warped_label: np.ndarray, ddf: np.ndarray, label_ids: Sequence[int]) -> dict:
    """The benchmark's numbers for one method, from ``scripts.metrics`` only, so every method is measured alike."""
    dice = dice_per_label(fixed_label, warped_label, label_ids)
    stats = deformation_stats(ddf)
    return {
        "dice": {str(label): value for label, value in dice.items()},
        "mean_dice": float(np.mean(list(dice.values()))) if dice else float("nan"),
        "folded_percent": 100.0 * stats["folding_fraction"],
        "std_log_jacobian": stats["std_log_jacobian"],
        "sdlogj_learn2reg": stats["sdlogj_learn2reg"],
    }


def convention_check(
    fixed_label: np.ndarray, own_warped: np.ndarray, tool_warped: np.ndarray, label_ids: Sequence[int], tool_mean: float
) -> dict:
    """How well the converted field reproduces the tool's own warped label; ``ok`` False flags a convention error."""
    own_mean = float(np.mean(list(dice_per_label(fixed_label, own_warped, label_ids).values())))
    foreground = (own_warped > 0) | (tool_warped > 0)
    agreement = float((own_warped[foreground] == tool_warped[foreground]).mean()) if foreground.any() else 1.0
    return {
        "mean_dice_own_nearest_warp": own_mean,
        "mean_dice_difference": abs(own_mean - tool_mean),
        "foreground_voxel_agreement": agreement,
        "ok": abs(own_mean - tool_mean) <= CONVENTION_TOLERANCE,
    }


# ---------------------------------------------------------------------------------------------------------- methods


@dataclass
class Pair:
    """One registration to run: moving -> fixed, with both label maps."""

    name: str
    fixed: str
    moving: str
    fixed_label: str
    moving_label: str

    def reversed(self) -> Pair:
        """The opposite direction (a->b from b->a): registration is not symmetric, so both are worth scoring."""
        if "_to_" in self.name:
            source, target = self.name.split("_to_", 1)
            name = f"{target}_to_{source}"
        else:
            name = f"{self.name}_reversed"
        return Pair(name, self.moving, self.fixed, self.moving_label, self.fixed_label)


@dataclass
class MethodOutput:
    """What a method hands to scoring: its own warped label, its field in fixed voxels, and its cost."""

    warped_label: np.ndarray
    ddf: np.ndarray
    wall_s: float
    cpu_s: float
    extra: dict = field(default_factory=dict)


class Stopwatch:
    """Wall and CPU seconds of a block; CPU counts all threads of this process plus waited-for child processes
    (``RUSAGE_CHILDREN``), so in-process libraries and the bundle's subprocess are measured the same way."""

    @staticmethod
    def _cpu() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = self._cpu() - self._cpu0


def load_label(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer label map and its affine (labels may be stored as floats by some tools: rounded, never truncated)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label map not found: {path}")
    image = nib.load(path)
    return np.rint(np.asarray(image.dataobj, dtype=np.float64)).astype(np.int32), np.asarray(image.affine)


def _load_warped_label(path: str, fixed_shape: Sequence[int]) -> np.ndarray:
    """A tool's warped label, required on the fixed grid so it is scored voxel for voxel against the fixed label."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected warped label was not written: {path}")
    label, _ = load_label(path)
    return squeeze_to_grid(label, fixed_shape, f"{path}: warped label")


@dataclass
class Context:
    """Everything a method runner needs besides the pair."""

    threads: int
    work: Path
    logs: Path
    fixed_shape: tuple[int, ...]
    fixed_affine: np.ndarray
    moving_label: np.ndarray
    moving_affine: np.ndarray
    bundle_ckpt: str | None = None
    bundle_timeout: int = 7200
    greedy_warp_precision: float | None = None
    greedy_affine: bool = False
    greedy_multimodal: bool = False


def write_2d_slice(path: str, out: str) -> str:
    """A true 2D NIfTI (``dim[0] = 2``) of an ``X x Y x 1`` slice, with the file's in-plane affine, for ITK tools.

    ITK reads the ``X x Y x 1`` file as a 2D image but with an identity LPS direction whatever the header says
    (Greedy2D writes such a slice back with the affine ``diag(-1, -1, 1)`` for a RAS-identity input): the tool would
    register the mirror image of the file's geometry, and its LPS field would not match the file's affine. A
    ``dim[0] = 2`` file is read with the header's in-plane direction, spacing and origin (checked again on the warp
    the tool writes, by ``load_itk_displacement``).
    """
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    affine = spatial_affine(image.affine, 2)  # refuses an oblique slice
    full = np.eye(4)
    full[np.ix_([0, 1, 3], [0, 1, 3])] = affine
    full[2, 3] = image.affine[2, 3]
    sliced = nib.Nifti1Image(squeeze_to_grid(data, grid_shape(data.shape), path), full)
    sliced.set_qform(full, code=1)
    sliced.set_sform(full, code=1)
    nib.save(sliced, out)
    return out


def _tool_inputs(pair: Pair, ctx: Context, tag: str) -> tuple[str, str, str]:
    """Fixed, moving and moving-label files as the tool should read them: the originals in 3D, true 2D copies of
    2D slices (``write_2d_slice``) in their own folder: ANTsPy collects its transforms by globbing its output prefix,
    so nothing else may share that prefix."""
    files = (pair.fixed, pair.moving, pair.moving_label)
    if len(ctx.fixed_shape) == 3:
        return files
    folder = ctx.work / f"inputs_2d_{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    names = ("fixed", "moving", "moving_label")
    return tuple(write_2d_slice(f, str(folder / f"{n}.nii.gz")) for f, n in zip(files, names))


def run_identity(pair: Pair, ctx: Context) -> MethodOutput:
    """No registration: the moving label taken onto the fixed grid through physical space (a copy when the grids
    match), zero displacement."""
    with Stopwatch() as clock:
        ddf = np.zeros((len(ctx.fixed_shape),) + ctx.fixed_shape, dtype=np.float32)
        warped = warp_label(ctx.moving_label, ddf, ctx.fixed_affine, ctx.moving_affine)
    return MethodOutput(warped, ddf, clock.wall_s, clock.cpu_s)


def _thread_env(threads: int) -> dict[str, str]:
    """Thread caps honoured by torch (OpenMP), ITK/ANTs and BLAS, so every method gets the same cores."""
    value = str(threads)
    return {
        "OMP_NUM_THREADS": value,
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": value,
        "MKL_NUM_THREADS": value,
        "OPENBLAS_NUM_THREADS": value,
    }


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")
# MONAI re-raises any failure inside a config expression as this; the cause printed above it is the useful line.
WRAPPER_ERRORS = ("Failed to evaluate ConfigExpression", "Failed to instantiate")


def _last_error_line(text: str) -> str:
    """The line that names the failure: the last ``SomeError: ...`` line that is not MONAI's generic config wrapper
    (whose own line only quotes the expression), else the last non-decoration line."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("-=^~ ")]
    errors = [line for line in lines if EXCEPTION_LINE.match(line)]
    specific = [line for line in errors if not any(wrapper in line for wrapper in WRAPPER_ERRORS)]
    if specific or errors:
        return (specific or errors)[-1]
    return lines[-1] if lines else "(no output)"


def run_bundle(pair: Pair, ctx: Context, name: str) -> MethodOutput:
    """This bundle exactly as a user runs it (``monai.bundle run inference``), network alone or with a test-time
    refinement preset (``BUNDLE_VARIANTS``); its ``ddf.nii.gz`` is already in fixed-grid voxels. Its shipped model
    for the pair's dimensionality unless ``--bundle_ckpt`` is given; a missing checkpoint's error becomes the failed
    entry."""
    out = ctx.work / name
    command = [
        sys.executable, "-m", "monai.bundle", "run", "inference",
        "--config_file", "bundle/configs/inference.yaml",
        "--fixed_image", pair.fixed, "--moving_image", pair.moving, "--moving_label", pair.moving_label,
        "--output_dir", str(out),
    ]  # fmt: skip
    command += BUNDLE_VARIANTS[name]
    if ctx.bundle_ckpt:
        command += ["--ckpt_path", ctx.bundle_ckpt]
    env = dict(os.environ, PYTHONWARNINGS="ignore", **_thread_env(ctx.threads))
    with Stopwatch() as clock:
        try:
            process = subprocess.run(
                command, cwd=REPO, env=env, capture_output=True, text=True, timeout=ctx.bundle_timeout
            )
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"bundle inference exceeded {ctx.bundle_timeout} s") from error
    log = ctx.logs / f"{pair.name}_{name}.log"
    atomic_write_text(str(log), " ".join(command) + "\n\n" + process.stdout + process.stderr)
    if process.returncode != 0:
        cause = _last_error_line(process.stderr or process.stdout)
        # the bundle's hint names its own --ckpt_path; this script passes --bundle_ckpt on to it
        hint = " [benchmark: --bundle_ckpt PATH]" if "checkpoint not found" in cause and not ctx.bundle_ckpt else ""
        raise RuntimeError(f"exit {process.returncode}: {cause}{hint} (log: {log})")
    extra: dict = {"command": " ".join(command), "log": str(log), "checkpoint": ctx.bundle_ckpt or "bundle default"}
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        record = json.loads(metrics_path.read_text())
        extra["bundle_reported_seconds"] = record.get("seconds")
        extra["registration_s"] = record.get("seconds_load_to_write")
        if "refinement" in record:
            extra["refinement"] = record["refinement"]
    ddf = load_bundle_ddf(str(out / "ddf.nii.gz"), ctx.fixed_shape)
    warped = _load_warped_label(str(out / "warped_label.nii.gz"), ctx.fixed_shape)
    return MethodOutput(warped, ddf, clock.wall_s, clock.cpu_s, extra)


def run_ants(pair: Pair, ctx: Context) -> MethodOutput:
    """ANTsPy ``registration(type_of_transform='SyN')`` with its defaults (affine + SyN, Mattes MI), label warped
    with ``genericLabel``; the forward transforms are composed into one field on the fixed grid for folding.
    2D slices are registered as 2D images (``write_2d_slice``), same defaults."""
    import ants

    prefix = str(ctx.work / "ants_")
    warped_path = str(ctx.work / "ants_warped_label.nii.gz")
    dims = len(ctx.fixed_shape)
    for stale in ctx.work.glob("ants_*"):  # a --keep_work rerun: ANTsPy would list the old files as transforms
        if stale.is_file():
            stale.unlink()
    with Stopwatch() as clock:
        fixed_path, moving_path, moving_label_path = _tool_inputs(pair, ctx, "ants")
        fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
        if fixed.dimension != dims or moving.dimension != dims:
            raise ValueError(f"ANTs read {fixed.dimension}D/{moving.dimension}D images for a {dims}D pair")
        registration = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=prefix)
        stray = [t for t in registration["fwdtransforms"] if not ANTS_TRANSFORM.search(os.path.basename(t))]
        if stray:  # ANTsPy lists every file that starts with the prefix (a leftover would be applied as a transform)
            raise RuntimeError(f"ANTs transform list holds files that are not its transforms: {stray}")
        moving_label = ants.image_read(moving_label_path)
        warped = ants.apply_transforms(fixed, moving_label, registration["fwdtransforms"], interpolator="genericLabel")
        ants.image_write(warped, warped_path)
    composite = ants.apply_transforms(fixed, moving, registration["fwdtransforms"], compose=prefix)
    ddf = load_itk_displacement(composite, ctx.fixed_affine, ctx.fixed_shape)
    extra = {"fwdtransforms": [os.path.basename(t) for t in registration["fwdtransforms"]], "ants": ants.__version__}
    return MethodOutput(_load_warped_label(warped_path, ctx.fixed_shape), ddf, clock.wall_s, clock.cpu_s, extra)


def run_greedy(pair: Pair, ctx: Context) -> MethodOutput:
    """Greedy (picsl-greedy), deformable only, ``-m NCC 2x2x2 -n 100x50x10`` (2D slices: ``Greedy2D``, ``-d 2``,
    ``-m NCC 2x2``, on true 2D copies, ``write_2d_slice``); label resliced with ``LABEL 0.2vox``.

    Greedy's warp is an ITK displacement field (LPS mm) on the fixed grid. By default Greedy saves it rounded to
    0.1 voxel (``-wp 0.1``), and the reslice reads that file: what a Greedy user gets, but the rounding steps add
    to the Jacobian statistics; ``--greedy_warp_precision 0`` saves the field as computed."""
    import picsl_greedy

    dims = len(ctx.fixed_shape)
    for path in (pair.fixed, pair.moving, pair.moving_label, str(ctx.work)):
        if any(c.isspace() for c in path):
            raise ValueError(f"Greedy's command line is split on whitespace; rename or link: {path}")
    warp = str(ctx.work / "greedy_warp.nii.gz")
    affine = str(ctx.work / "greedy_affine.mat")
    total = str(ctx.work / "greedy_total_warp.nii.gz")
    warped_image = str(ctx.work / "greedy_warped_image.nii.gz")
    warped_label = str(ctx.work / "greedy_warped_label.nii.gz")
    common = f"-d {dims} -threads {ctx.threads} -V 0"
    precision = "" if ctx.greedy_warp_precision is None else f" -wp {ctx.greedy_warp_precision:g}"
    with Stopwatch() as clock:
        fixed, moving, moving_label = _tool_inputs(pair, ctx, "greedy")
        register = f"{common} -i {fixed} {moving} -o {warp} {GREEDY_SETTINGS[dims]}{precision}"
        reslice = (
            f"{common} -rf {fixed} -rm {moving} {warped_image} "
            f"-ri LABEL 0.2vox -rm {moving_label} {warped_label} -r {warp}"
        )
        settings = (GREEDY_MULTIMODAL_SETTINGS if ctx.greedy_multimodal else GREEDY_SETTINGS)[dims]
        register = register.replace(GREEDY_SETTINGS[dims], settings)
        greedy = getattr(picsl_greedy, f"Greedy{dims}D")()
        commands = []
        if ctx.greedy_affine:  # Greedy's own affine stage first (image centres, 12 dof), as its users run it
            metric = settings.split(" -n ")[0]
            commands.append(
                f"{common} -a -dof 12 -ia-image-centers -i {fixed} {moving} -o {affine} {metric} -n 100x50x10"
            )
            register += f" -it {affine}"
            reslice += f" {affine}"
        commands += [register, reslice]
        for command in commands:
            greedy.execute(command)
        field_file = warp
        if ctx.greedy_affine:  # the whole transform (warp, then affine) as one field on the fixed grid, by Greedy
            compose = f"{common} -rf {fixed} -rc {total} -r {warp} {affine}"
            greedy.execute(compose)
            field_file = total
    ddf = load_itk_displacement(field_file, ctx.fixed_affine, ctx.fixed_shape)
    extra = {"commands": [f"greedy {c}" for c in commands]}
    return MethodOutput(_load_warped_label(warped_label, ctx.fixed_shape), ddf, clock.wall_s, clock.cpu_s, extra)


RUNNERS: dict[str, Callable[[Pair, Context], MethodOutput]] = {
    "identity": run_identity,
    **{name: (lambda pair, ctx, name=name: run_bundle(pair, ctx, name)) for name in BUNDLE_VARIANTS},
    "ants-syn": run_ants,
    "greedy": run_greedy,
}


# ---------------------------------------------------------------------------------------------------------- driver


def classical_import_error(method: str) -> str | None:
    """Why a classical method cannot run here (its package missing or broken), or None when it can."""
    if method not in CLASSICAL_PACKAGES:
        return None
    module, package = CLASSICAL_PACKAGES[method]
    try:
        __import__(module)
    except Exception as error:  # a broken install (missing runtime dependency) counts as unavailable too
        return f"{package} not importable ({type(error).__name__}: {error}); install with: {INSTALL_HINT}"
    return None


def default_eval_labels(data: str) -> str:
    """``DATA/eval_labels.json``; a folder without one (the 2D slices) uses the 3D data's 30 structures, of which
    only those present in both label maps are scored (``labels_to_score``)."""
    own = Path(data) / "eval_labels.json"
    return str(own if own.is_file() else Path(DEFAULT_DATA) / "eval_labels.json")


def build_pairs(args: argparse.Namespace) -> list[Pair]:
    """The OASIS pair (b -> a) or the datalist's pairs, in the requested direction(s)."""
    if args.datalist:
        base = Path(args.datalist).resolve().parent
        content = json.loads(Path(args.datalist).read_text())
        if not isinstance(content, dict) or not isinstance(content.get("pairs"), list) or not content["pairs"]:
            raise ValueError(f"{args.datalist}: expected {{'pairs': [{{fixed, moving, fixed_label, moving_label}}]}}")
        forward = []
        for i, entry in enumerate(content["pairs"]):
            missing = {"fixed", "moving", "fixed_label", "moving_label"} - set(entry)
            if missing:
                raise ValueError(f"{args.datalist}: pair {i} lacks {sorted(missing)}")
            paths = {k: str((base / entry[k]).resolve()) for k in ("fixed", "moving", "fixed_label", "moving_label")}
            stem = lambda p: Path(p).name.split(".")[0]  # noqa: E731
            name = entry.get("name") or f"{stem(paths['moving'])}_to_{stem(paths['fixed'])}"
            forward.append(Pair(name, **paths))
    else:
        data = Path(args.data).resolve()
        forward = [
            Pair(
                "b_to_a",
                fixed=str(data / "subject_a_image.nii.gz"),
                moving=str(data / "subject_b_image.nii.gz"),
                fixed_label=str(data / "subject_a_label.nii.gz"),
                moving_label=str(data / "subject_b_label.nii.gz"),
            )
        ]
    pairs = {"forward": forward, "reverse": [p.reversed() for p in forward]}
    pairs["both"] = [q for p in forward for q in (p, p.reversed())]
    selected = pairs[args.directions]
    for pair in selected:
        for path in (pair.fixed, pair.moving, pair.fixed_label, pair.moving_label):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"pair {pair.name}: file not found: {path}")
    return selected


def misaligned_pairs(pairs: list[Pair], folder: Path, seeds: Sequence[int]) -> list[Pair]:
    """Each pair once per seed with its moving subject (image and label) moved by a seeded world affine and written
    on another grid (``misaligned_cases.make_case``; the files are kept in ``folder``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from misaligned_cases import make_case

    moved = []
    for pair in pairs:
        for seed in seeds:
            name = f"{pair.name}_moved{seed}"
            case = make_case(pair.moving, pair.moving_label, str(folder / pair.name), seed, name=name)
            moved.append(Pair(name, pair.fixed, case.image, pair.fixed_label, case.label))
    return moved


def contrast_pairs(
    pairs: list[Pair], folder: Path, seeds: Sequence[int], kinds: Sequence[str], moved: bool
) -> list[Pair]:
    """Each pair once per contrast kind and seed with its moving image in another contrast
    (``contrast_cases.make_contrast_case``: a non-monotonic remap, bias field and noise; same grid and label), and,
    with ``moved``, then moved and written on another grid as ``misaligned_pairs`` does (same seed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from contrast_cases import make_contrast_case
    from misaligned_cases import make_case

    out = []
    for pair in pairs:
        for kind in kinds:
            for seed in seeds:
                name = f"{pair.name}_{kind}{seed}"
                image = make_contrast_case(pair.moving, str(folder / pair.name), kind, seed, name=name)
                label = pair.moving_label
                if moved:
                    name += "_moved"
                    case = make_case(image, pair.moving_label, str(folder / pair.name), seed, name=name)
                    image, label = case.image, case.label
                out.append(Pair(name, pair.fixed, image, pair.fixed_label, label))
    return out


def warp_pairs(pairs: list[Pair], folder: Path, seeds: Sequence[int], magnitudes: Sequence[float]) -> list[Pair]:
    """For each pair's moving subject, once per magnitude and seed: the subject (fixed) and a copy of it moved by a
    known smooth diffeomorphism (moving; ``warp_cases.make_warp_case``, the files kept in ``folder``). With
    ``--directions both`` each subject of the datalist's pairs is warped."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from warp_cases import make_warp_case, warp_case_name

    out = []
    for pair in pairs:
        subject = Path(pair.moving).name.split(".")[0].removesuffix("_image")
        for magnitude in magnitudes:
            for seed in seeds:
                name = warp_case_name(subject, magnitude, seed)
                image, label = make_warp_case(
                    pair.moving, pair.moving_label, str(folder / subject), magnitude, seed, name=name
                )
                out.append(Pair(name, pair.moving, image, pair.moving_label, label))
    return out


def run_method(method: str, pair: Pair, ctx: Context, fixed_label: np.ndarray, label_ids: list[int]) -> dict:
    """Run, score and sanity-check one method; a failure becomes a ``failed`` entry with its last error line."""
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load = os.getloadavg()[0]  # other work on the machine inflates wall time; keep the evidence beside the number
    try:
        output = RUNNERS[method](pair, ctx)
    except Exception as error:
        message = _last_error_line(f"{type(error).__name__}: {error}")
        print(f"  {method}: FAILED: {message}", flush=True)
        return {"status": "failed", "error": message, "started": started, "threads": ctx.threads}
    entry = {"status": "ok", "started": started, "threads": ctx.threads, "load_average_at_start": load}
    entry.update(wall_s=output.wall_s, cpu_s=output.cpu_s)
    entry.update(score(fixed_label, output.warped_label, output.ddf, label_ids))
    entry["max_abs_displacement_voxels"] = float(np.abs(output.ddf).max())
    if method != "identity":
        own = warp_label(ctx.moving_label, output.ddf, ctx.fixed_affine, ctx.moving_affine)
        check = convention_check(fixed_label, own, output.warped_label, label_ids, entry["mean_dice"])
        entry["convention_check"] = check
        if not check["ok"]:
            print(
                f"  WARNING {method}: its displacement field, warped here by nearest neighbour, gives mean Dice "
                f"{check['mean_dice_own_nearest_warp']:.4f} but its own warped label gives {entry['mean_dice']:.4f}: "
                "the field conversion (sign / axis / LPS->voxel) is suspect; folding numbers are not trustworthy",
                flush=True,
            )
    entry.update(output.extra)
    print(
        f"  {method}: mean Dice {entry['mean_dice']:.4f}, folded {entry['folded_percent']:.4f} %, "
        f"SDlogJ {entry['std_log_jacobian']:.4f}, {output.wall_s:.1f} s wall, {output.cpu_s:.1f} s CPU",
        flush=True,
    )
    return entry


def markdown_table(pair_name: str, pair_result: dict, methods: Sequence[str]) -> str:
    """One direction's results as the markdown table the model card and reports quote."""
    count = len(pair_result.get("label_ids", []))
    slice_note = ", 2D slice, scored in 2D" if pair_result.get("spatial_dims") == 2 else ""
    lines = [
        f"**{pair_name}** ({pair_result['moving_name']} -> {pair_result['fixed_name']}{slice_note})",
        "",
        f"| method | mean Dice ({count} structures) | folded voxels % | SDlogJ | registration s | wall s | CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in methods:
        entry = pair_result["methods"].get(method)
        if entry is None:
            continue
        if entry["status"] != "ok":
            lines.append(f"| {method} | {entry['status']}: {entry.get('error', '')} | | | | | |")
            continue
        # registration s: the bundle's own load-to-write time (metrics.json), without the Python start-up that wall s
        # includes; ANTs and Greedy run in this process, so their wall time is already load to write.
        registration = entry.get("registration_s", entry["wall_s"])
        lines.append(
            f"| {method} | {entry['mean_dice']:.3f} | {entry['folded_percent']:.3f} | {entry['std_log_jacobian']:.3f} "
            f"| {registration:.1f} | {entry['wall_s']:.1f} | {entry['cpu_s']:.1f} |"
        )
    return "\n".join(lines)


def mean_table(results: dict, methods: Sequence[str]) -> str:
    """Each method's means over the pairs it registered: mean Dice, folded voxels %, registration s (several pairs)."""
    pairs = list(results["pairs"].values())
    lines = [
        f"**mean over {len(pairs)} pairs** (each pair's mean Dice over its structures)",
        "",
        "| method | pairs | mean Dice | min Dice | folded voxels % | registration s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in methods:
        entries = [p["methods"][method] for p in pairs if p["methods"].get(method, {}).get("status") == "ok"]
        if not entries:
            continue
        dice = [e["mean_dice"] for e in entries]
        folded = np.mean([e["folded_percent"] for e in entries])
        seconds = np.mean([e.get("registration_s", e["wall_s"]) for e in entries])
        lines.append(
            f"| {method} | {len(entries)} | {np.mean(dice):.3f} | {min(dice):.3f} | {folded:.4f} | {seconds:.1f} |"
        )
    return "\n".join(lines)


def print_report(results: dict, results_path: Path, figure: Path) -> None:
    ordered = [m for m in METHODS if any(m in r["methods"] for r in results["pairs"].values())]
    print(
        f"{results['settings']['threads']} threads; load average at start "
        f"{results['settings']['load_average_at_start'][0]:.2f}"
    )
    for name, pair_result in results["pairs"].items():
        print(markdown_table(name, pair_result, ordered))
        print()
    if len(results["pairs"]) > 1:
        print(mean_table(results, ordered))
        print()
    print(f"results: {results_path}\nfigure:  {figure}")


def save_boxplot(results: dict, methods: Sequence[str], path: str) -> None:
    """Per-structure Dice, one box per method and one panel per direction (VoxelMorph TMI style), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(results["pairs"].items())
    figure, axes = plt.subplots(1, len(pairs), figsize=(1.4 + 1.3 * len(methods) * len(pairs), 4.2), squeeze=False)
    for axis, (name, pair_result) in zip(axes[0], pairs):
        shown = [m for m in methods if pair_result["methods"].get(m, {}).get("status") == "ok"]
        data = [list(pair_result["methods"][m]["dice"].values()) for m in shown]
        if data:
            axis.boxplot(data, tick_labels=shown, showmeans=True, meanprops={"marker": "^", "markersize": 5})
            for i, values in enumerate(data, start=1):
                jitter = np.random.default_rng(i).uniform(-0.12, 0.12, len(values))
                axis.plot(np.full(len(values), i) + jitter, values, ".", color="grey", alpha=0.5, markersize=3)
        axis.set_title(f"{name}: Dice per structure (n={len(pair_result.get('label_ids', []))})", fontsize=10)
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    axes[0][0].set_ylabel("Dice (box: median, quartiles; triangle: mean)")
    figure.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp", suffix=".png", dir=folder)
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=120)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.remove(temporary)


def _versions() -> dict:
    """Library versions that change the numbers (registration results and timings)."""
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for module in ("torch", "monai", "scipy", "ants", "picsl_greedy"):
        try:
            imported = __import__(module)
            versions[module] = getattr(imported, "__version__", "installed")
        except Exception:
            versions[module] = None
    return versions


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; ``--reverse`` is shorthand for ``--directions both``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} (all)")
    parser.add_argument("--directions", choices=("forward", "reverse", "both"), default="forward")
    parser.add_argument("--reverse", action="store_true", help="also run the reverse direction (= --directions both)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="oasis3d (default) or oasis2d (2D slices)")
    parser.add_argument("--datalist", default=None, help="JSON with a 'pairs' list instead of the OASIS pair")
    parser.add_argument(
        "--eval_labels",
        default=None,
        help="JSON with a 'labels' list (default DATA/eval_labels.json, else the 3D data's: a 2D folder has none)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default=str(REPO / "bundle" / "runs" / "benchmark"))
    parser.add_argument("--report", default=None, help="print the tables of this results.json, run nothing")
    parser.add_argument("--merge", action="store_true", help="keep other methods' entries of an existing results.json")
    parser.add_argument("--bundle_ckpt", default=None, help="passed to the bundle as --ckpt_path")
    parser.add_argument("--bundle_timeout", type=int, default=7200, help="seconds per bundle inference")
    parser.add_argument(
        "--greedy_warp_precision",
        type=float,
        default=None,
        help="Greedy -wp: saved warp precision in voxels (Greedy's default 0.1; 0 = no rounding)",
    )
    parser.add_argument("--keep_work", action="store_true", help="keep warps and warped images in OUTPUT_DIR/work")
    parser.add_argument(
        "--case",
        choices=CASES,
        default="aligned",
        help="aligned: the pairs as given; misaligned: each moving subject moved by a seeded world affine and written "
        "on another grid (benchmarks/misaligned_cases.py; Greedy then runs its affine stage first); contrast: the "
        "moving image remapped to another contrast (benchmarks/contrast_cases.py; Greedy with NMI); both: remapped "
        "and moved; warp: each moving subject and a copy of it moved by a known smooth diffeomorphism "
        "(benchmarks/warp_cases.py, --warp_magnitudes)",
    )
    parser.add_argument("--case_seeds", default="0,1,2", help="seeds of the generated cases (one pair each)")
    parser.add_argument(
        "--contrasts",
        default="pd,t2",
        help="contrast and both cases: the moving image's contrast kinds (benchmarks/contrast_cases.py: pd, t2)",
    )
    parser.add_argument(
        "--warp_magnitudes",
        default="4,8,12",
        help="warp cases: the largest velocity in the brain, voxels (benchmarks/warp_cases.py), one case per seed",
    )
    args = parser.parse_args(argv)
    if args.reverse:
        args.directions = "both"
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    requested = METHODS if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in requested if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.method_list = list(requested)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict also written to ``results.json``."""
    args = parse_args(argv)
    if args.report:  # print the tables of an earlier run's results.json, running nothing
        path = Path(args.report)
        results = json.loads(path.read_text())
        print_report(results, path, path.parent / "dice_boxplot.png")
        return results
    # Before ANTs/ITK/Greedy load: ITK reads its default thread count from the environment once.
    os.environ.update(_thread_env(args.threads))
    import torch

    torch.set_num_threads(args.threads)

    methods = []
    skipped = {}
    for method in args.method_list:
        reason = classical_import_error(method)
        if reason:
            print(f"skipping {method}: {reason}", flush=True)
            skipped[method] = reason
        else:
            methods.append(method)
    pairs = build_pairs(args)
    output_dir = Path(args.output_dir).resolve()
    seeds = [int(v) for v in args.case_seeds.split(",") if v.strip()]
    if args.case == "misaligned":
        pairs = misaligned_pairs(pairs, output_dir / "cases", seeds)
    elif args.case in CONTRAST_CASES:
        kinds = [k.strip() for k in args.contrasts.split(",") if k.strip()]
        pairs = contrast_pairs(pairs, output_dir / "cases", seeds, kinds, moved=args.case == "both")
    elif args.case == "warp":
        magnitudes = [float(v) for v in args.warp_magnitudes.split(",") if v.strip()]
        pairs = warp_pairs(pairs, output_dir / "cases", seeds, magnitudes)
    eval_labels = args.eval_labels or (None if args.datalist else default_eval_labels(args.data))
    label_filter = resolve_label_ids(eval_labels)

    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "results.json"
    results: dict = {"pairs": {}}
    if args.merge and results_path.is_file():
        results = json.loads(results_path.read_text())
    results["settings"] = {
        "command": " ".join([Path(sys.argv[0]).name] + list(sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "threads": args.threads,
        "thread_env": _thread_env(args.threads),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "host": platform.node(),
        "eval_labels": eval_labels,
        "case": args.case,
        "greedy_settings": (GREEDY_MULTIMODAL_SETTINGS if args.case in CONTRAST_CASES else GREEDY_SETTINGS)[3]
        + (" after its affine stage (-a -dof 12)" if args.case in MOVED_CASES else ""),
        "greedy_settings_2d": f"{GREEDY_SETTINGS[2]} (Greedy2D, -d 2)",
        "greedy_warp_precision": "Greedy default (-wp 0.1 voxel)"
        if args.greedy_warp_precision is None
        else f"-wp {args.greedy_warp_precision:g}",
        "ants_settings": "ants.registration(fixed, moving, type_of_transform='SyN') defaults; genericLabel",
        "skipped": skipped,
        "versions": _versions(),
        "timing": "wall/CPU s from reading inputs to writing the warped label; CPU = process + children; the "
        "bundle's includes interpreter start-up (see bundle_reported_seconds)",
    }
    print(f"{len(pairs)} pair(s), methods {methods}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")

    work_root = output_dir / "work" if args.keep_work else Path(tempfile.mkdtemp(prefix="oasis_benchmark_"))
    try:
        for pair in pairs:
            print(f"{pair.name}: {Path(pair.moving).name} -> {Path(pair.fixed).name}", flush=True)
            fixed_image = nib.load(pair.fixed)
            fixed_label, fixed_label_affine = load_label(pair.fixed_label)
            moving_label, moving_label_affine = load_label(pair.moving_label)
            fixed_shape = grid_shape(fixed_image.shape)  # (X, Y) for a 2D slice stored X x Y x 1
            dims = len(fixed_shape)
            for path in (pair.moving, pair.moving_label):
                if len(grid_shape(nib.load(path).shape)) != dims:
                    raise ValueError(f"{path} is not {dims}D like {pair.fixed}")
            if grid_shape(fixed_label.shape) != fixed_shape or not np.allclose(
                fixed_label_affine, fixed_image.affine, atol=1e-3
            ):
                raise ValueError(f"{pair.fixed_label} is not on the grid of {pair.fixed}")
            fixed_label = squeeze_to_grid(fixed_label, fixed_shape, pair.fixed_label)
            moving_label = squeeze_to_grid(moving_label, grid_shape(moving_label.shape), pair.moving_label)
            label_ids = [int(i) for i in labels_to_score(fixed_label, moving_label, label_filter)]
            pair_result = results["pairs"].setdefault(pair.name, {"methods": {}})
            if not args.merge or pair_result.get("label_ids") not in (None, label_ids):
                pair_result["methods"] = {}
            pair_result.update(
                fixed=pair.fixed,
                moving=pair.moving,
                fixed_name=Path(pair.fixed).name,
                moving_name=Path(pair.moving).name,
                spatial_dims=dims,
                label_ids=label_ids,
            )
            for method in methods:
                work = work_root / pair.name / method
                work.mkdir(parents=True, exist_ok=True)
                ctx = Context(
                    threads=args.threads,
                    work=work,
                    logs=logs,
                    fixed_shape=fixed_shape,
                    fixed_affine=np.asarray(fixed_image.affine),
                    moving_label=moving_label,
                    moving_affine=moving_label_affine,
                    bundle_ckpt=args.bundle_ckpt,
                    bundle_timeout=args.bundle_timeout,
                    greedy_warp_precision=args.greedy_warp_precision,
                    greedy_affine=args.case in MOVED_CASES,
                    greedy_multimodal=args.case in CONTRAST_CASES,
                )
                pair_result["methods"][method] = run_method(method, pair, ctx, fixed_label, label_ids)
                atomic_write_text(str(results_path), json.dumps(results, indent=1))  # partial results survive
    finally:
        if not args.keep_work:
            shutil.rmtree(work_root, ignore_errors=True)

    ordered = [m for m in METHODS if any(m in r["methods"] for r in results["pairs"].values())]
    atomic_write_text(str(results_path), json.dumps(results, indent=1))
    save_boxplot(results, ordered, str(output_dir / "dice_boxplot.png"))
    print()
    print_report(results, results_path, output_dir / "dice_boxplot.png")
    return results


if __name__ == "__main__":
    main()
