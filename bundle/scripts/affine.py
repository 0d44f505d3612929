"""The affine stage: a world-space affine that maps the fixed image onto the moving one, estimated before the network.

The network and the refinement only learn deformations of a few millimetres; a brain rotated by 10° and shifted by
1 cm is far outside that. This stage estimates ``T`` (world → world, RAS millimetres) with

    fixed world point x  ↦  moving world point  T(x) = c_m + t + exp(M) · (x - c_f)

``c_f``, ``c_m`` the intensity centres of mass (moments initialisation: the headers put both images in world space,
the centres of mass catch offsets of centimetres), ``exp(M)`` the matrix exponential of a general ``d x d`` matrix
(12 dof in 3D; ``transform="rigid"`` keeps ``M`` skew-symmetric: 6 dof). ``exp`` keeps ``det > 0``, so no
parameter value mirrors the brain. Optimised coarse to fine (default 8 → 4 → 2 mm, box-averaged images) by Adam on
the global mutual information of the two images (MONAI's ``GlobalMutualInformationLoss``, Parzen windows; it does
not assume one contrast) at a seeded sample of the fixed grid's voxels, which keeps each iteration cheap at any
resolution (elastix and ANTs sample the same way).

Written here rather than taken from a library: MONAI has no intensity-based affine registration, and ITK's
optimiser takes tens of seconds for a 1 mm brain. The estimate runs in torch on the CPU (~1.5 s on 2 threads); the
resampling through ``T`` runs on the network's device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from .files import logger
from .integrate import grid_sample as threaded_grid_sample
from .runs import as_flag
from .losses import FixedImageMutualInformation

__all__ = [
    "AffineRegistration",
    "AffineStage",
    "AffineResult",
    "affine_report",
    "itk_affine_text",
    "voxel_sampling_grid",
    "write_itk_affine",
]

TRANSFORMS = ("affine", "rigid")
SIMILARITIES = ("mi", "ncc")


@dataclass
class AffineResult:
    """``matrix``: ``(d + 1, d + 1)`` float64, fixed world point → moving world point (RAS mm); ``report``: what
    ``metrics.json`` records (parameters, seconds, similarity before and after, warnings)."""

    matrix: np.ndarray
    report: dict


def _homogeneous(linear: np.ndarray, offset: np.ndarray) -> np.ndarray:
    dims = linear.shape[0]
    matrix = np.eye(dims + 1)
    matrix[:dims, :dims], matrix[:dims, dims] = linear, offset
    return matrix


def _pool_affine(affine: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Voxel-to-world affine of an image box-averaged by ``factors``: pooled voxel ``j`` is the mean of input voxels
    ``f·j ... f·j + f - 1``, whose centre is input voxel ``f·j + (f - 1) / 2``."""
    factors = np.asarray(factors, dtype=np.float64)
    return affine @ _homogeneous(np.diag(factors), (factors - 1.0) / 2.0)


def _centre_of_mass(image: torch.Tensor, affine: np.ndarray) -> tuple[np.ndarray, float]:
    """Intensity centre of mass (world mm) of a ``(*spatial)`` image and the RMS distance of its mass from it.

    From the mass's marginal along each axis (one reduction per axis instead of coordinate images of the volume).
    """
    values = image.float().clamp_min(0)
    spacing = np.linalg.norm(affine[:-1, :-1], axis=0)
    voxel, second = [], 0.0
    for axis in range(values.dim()):
        others = [a for a in range(values.dim()) if a != axis]
        marginal = values.sum(dim=others).double().cpu().numpy()
        total = max(float(marginal.sum()), 1e-12)
        coordinate = np.arange(marginal.shape[0], dtype=np.float64)
        mean = float((marginal * coordinate).sum()) / total
        voxel.append(mean)
        second += float((marginal * ((coordinate - mean) * spacing[axis]) ** 2).sum()) / total
    centre = affine[:-1, :-1] @ np.asarray(voxel) + affine[:-1, -1]
    return centre, math.sqrt(max(second, 1.0))


def voxel_sampling_grid(points_voxel: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(..., d)`` voxel coordinates of an image of ``shape`` → ``grid_sample``'s normalised coordinates
    (``align_corners=True``, last axis first)."""
    scale = torch.tensor(
        [2.0 / max(int(n) - 1, 1) for n in shape], dtype=points_voxel.dtype, device=points_voxel.device
    )
    return (points_voxel * scale - 1.0).flip(-1)


def _sample(image: torch.Tensor, points_voxel: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Values of a ``(*spatial)`` image at ``(N, d)`` voxel coordinates (zero outside), as ``(N,)``."""
    dims = image.dim()
    grid = voxel_sampling_grid(points_voxel, image.shape).view(1, -1, *([1] * (dims - 1)), dims)
    sampled = F.grid_sample(image[None, None], grid, mode=mode, padding_mode="zeros", align_corners=True)
    return sampled.flatten()


def _ncc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred, target = pred - pred.mean(), target - target.mean()
    return -(pred * target).sum() / (pred.norm() * target.norm() + 1e-8)


class AffineRegistration:
    """The ``affine_stage`` of ``inference.yaml``: estimate ``T`` for a pair, resample the moving image through it.

    Args:
        enabled: False skips the stage (``--affine false``: inputs already affinely aligned).
        transform: ``affine`` (12 dof in 3D, 6 in 2D) or ``rigid`` (6 / 3 dof).
        levels_mm: voxel size of each level, coarse to fine (the images are box-averaged to it).
        iterations: Adam iterations per level.
        learning_rate: Adam's step per level's first iteration, in units of ``exp(M)`` entries (radians for a
            rotation) and of the brain's RMS radius for the translation; halved at each finer level.
        similarity: ``mi`` (global mutual information, any contrast) or ``ncc`` (global normalised correlation).
        num_bins: histogram bins of the mutual information.
        max_points: fixed-grid voxels sampled per level (all of them when the level has fewer).
        scale_range: singular values of ``exp(M)`` outside it mean the optimisation diverged: the centre-of-mass
            translation is used instead, with a warning.
        min_overlap: the fraction of the fixed image's mass that must land inside the moving field of view.
        seed: seed of the voxel sample (the result is deterministic for a pair).
    """

    def __init__(
        self,
        enabled: bool = True,
        transform: str = "affine",
        levels_mm: Sequence[float] = (8.0, 4.0, 2.0),
        iterations: Sequence[int] = (100, 50, 25),
        learning_rate: float = 0.02,
        similarity: str = "mi",
        num_bins: int = 32,
        max_points: int = 10000,
        scale_range: Sequence[float] = (0.5, 2.0),
        min_overlap: float = 0.5,
        seed: int = 0,
    ) -> None:
        if transform not in TRANSFORMS:
            raise ValueError(f"affine transform must be one of {TRANSFORMS}, got {transform!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"affine similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if len(levels_mm) != len(iterations):
            raise ValueError(f"affine levels_mm {list(levels_mm)} and iterations {list(iterations)} differ in length")
        self.enabled = as_flag(enabled, "affine")
        self.transform, self.similarity = transform, similarity
        self.levels_mm = [float(level) for level in levels_mm]
        self.iterations = [int(n) for n in iterations]
        self.learning_rate, self.max_points, self.seed = float(learning_rate), int(max_points), int(seed)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.min_overlap = float(min_overlap)
        self.mutual_information = FixedImageMutualInformation(num_bins=int(num_bins))

    # ---- estimation ----
    def _loss(self, moving_values: torch.Tensor, fixed_values: torch.Tensor) -> torch.Tensor:
        if self.similarity == "ncc":
            return _ncc_loss(moving_values, fixed_values)
        return self.mutual_information(moving_values[None, None])  # fixed_values set once per level

    def _linear(self, parameters: torch.Tensor, dims: int) -> torch.Tensor:
        generator = parameters.view(dims, dims)
        if self.transform == "rigid":
            generator = (generator - generator.T) / 2
        return torch.linalg.matrix_exp(generator)

    def estimate(
        self,
        fixed: torch.Tensor,
        fixed_affine: np.ndarray,
        moving: torch.Tensor,
        moving_affine: np.ndarray,
        names: tuple[str, str] = ("fixed image", "moving image"),
    ) -> AffineResult:
        """``T`` for ``(*spatial)`` images with intensities in [0, 1] and their ``(d + 1)``-square voxel-to-world
        affines (the moving one may have another shape, spacing and orientation)."""
        start = time.perf_counter()
        fixed, moving = fixed.float(), moving.float()
        dims = fixed.dim()
        fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
        moving_affine = np.asarray(moving_affine, dtype=np.float64)
        fixed_centre, radius = _centre_of_mass(fixed, fixed_affine)
        moving_centre, _ = _centre_of_mass(moving, moving_affine)
        warnings: list[str] = []
        header_offset = float(np.linalg.norm(moving_centre - fixed_centre))
        generator = torch.zeros(dims * dims, dtype=torch.float32, requires_grad=True)
        shift = torch.zeros(dims, dtype=torch.float32, requires_grad=True)  # in units of the fixed brain's radius
        c_f = torch.as_tensor(fixed_centre, dtype=torch.float32)
        c_m = torch.as_tensor(moving_centre, dtype=torch.float32)
        rng = np.random.default_rng(self.seed)
        losses: list[dict] = []
        initial_loss = None
        for level, (level_mm, iterations) in enumerate(zip(self.levels_mm, self.iterations)):
            f_image, f_affine = self._level(fixed, fixed_affine, level_mm)
            m_image, m_affine = self._level(moving, moving_affine, level_mm)
            points, fixed_values = self._points(f_image, f_affine, rng)
            to_moving_voxels = torch.as_tensor(np.linalg.inv(m_affine), dtype=torch.float32)
            optimizer = torch.optim.Adam([generator, shift], lr=self.learning_rate / 2**level)
            self.mutual_information.set_target(fixed_values[None, None])

            def evaluate() -> torch.Tensor:
                linear = self._linear(generator, dims)
                world = (points - c_f) @ linear.T + c_m + shift * radius
                voxels = world @ to_moving_voxels[:dims, :dims].T + to_moving_voxels[:dims, dims]
                return self._loss(_sample(m_image, voxels), fixed_values)

            with torch.no_grad():
                first = float(evaluate())
            initial_loss = first if initial_loss is None else initial_loss
            for _ in range(iterations):
                optimizer.zero_grad(set_to_none=True)
                loss = evaluate()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                losses.append(
                    {"level_mm": level_mm, "points": int(points.shape[0]), "first": first, "last": float(evaluate())}
                )
        with torch.no_grad():
            linear = self._linear(generator, dims).double().numpy()
            offset = moving_centre + shift.double().numpy() * radius - linear @ fixed_centre
        matrix = _homogeneous(linear, offset)
        problem = self._divergence(matrix)
        if problem:
            warnings.append(
                f"the affine of {names[1]} onto {names[0]} diverged ({problem}); used the centre-of-mass translation "
                "instead (check the images, or pass --affine false for pre-aligned inputs)"
            )
            logger.warning(warnings[-1])
            matrix = _homogeneous(np.eye(dims), moving_centre - fixed_centre)
        overlap = self.overlap(fixed, fixed_affine, moving.shape, moving_affine, matrix)
        if overlap < self.min_overlap:
            raise ValueError(
                f"{names[1]} and {names[0]} do not overlap after the affine stage ({overlap:.0%} of the fixed image's "
                f"mass lands inside the moving field of view; the headers put their centres {header_offset:.0f} mm "
                "apart): check that both files hold the same anatomy and that their headers are right"
            )
        report = affine_report(matrix)
        report.update(
            {
                "transform": self.transform,
                "similarity": self.similarity,
                "levels": losses,
                "initial_loss": initial_loss,
                "centre_of_mass_offset_mm": header_offset,
                "fixed_mass_inside_moving": overlap,
                "seconds": time.perf_counter() - start,
            }
        )
        if warnings:
            report["warnings"] = warnings
        return AffineResult(matrix, report)

    def _level(self, image: torch.Tensor, affine: np.ndarray, level_mm: float) -> tuple[torch.Tensor, np.ndarray]:
        spacing = np.linalg.norm(affine[:-1, :-1], axis=0)
        factors = [max(1, int(round(level_mm / s))) for s in spacing]
        factors = [min(f, n) for f, n in zip(factors, image.shape)]
        if max(factors) == 1:
            return image, affine
        pooled = F.avg_pool3d if image.dim() == 3 else F.avg_pool2d
        return pooled(image[None, None], factors, ceil_mode=False)[0, 0], _pool_affine(affine, factors)

    def _points(self, image: torch.Tensor, affine: np.ndarray, rng: np.random.Generator):
        """World coordinates ``(N, d)`` of a seeded sample of the level's voxels, and the image's values there."""
        count = image.numel()
        chosen = np.arange(count) if count <= self.max_points else np.sort(rng.choice(count, self.max_points, False))
        index = torch.as_tensor(np.stack(np.unravel_index(chosen, tuple(image.shape)), axis=-1), dtype=torch.float32)
        world = index @ torch.as_tensor(affine[:-1, :-1].T, dtype=torch.float32) + torch.as_tensor(
            affine[:-1, -1], dtype=torch.float32
        )
        return world, image.flatten()[torch.as_tensor(chosen)]

    def _divergence(self, matrix: np.ndarray) -> str | None:
        if not np.isfinite(matrix).all():
            return "non-finite parameters"
        dims = matrix.shape[0] - 1
        determinant = float(np.linalg.det(matrix[:dims, :dims]))
        if determinant <= 0:
            return f"det {determinant:.3g} <= 0"
        singular = np.linalg.svd(matrix[:dims, :dims], compute_uv=False)
        low, high = self.scale_range
        if singular.min() < low or singular.max() > high:
            return f"scales {np.round(singular, 3).tolist()} outside [{low:g}, {high:g}]"
        return None

    @staticmethod
    def overlap(
        fixed: torch.Tensor,
        fixed_affine: np.ndarray,
        moving_shape: Sequence[int],
        moving_affine: np.ndarray,
        matrix: np.ndarray,
    ) -> float:
        """Fraction of the fixed image's mass whose voxels ``T`` maps inside the moving image's field of view."""
        dims = fixed.dim()
        step = max(1, int(round(4.0 / float(np.linalg.norm(fixed_affine[:-1, :-1], axis=0).min()))))
        coarse = fixed[tuple(slice(None, None, step) for _ in range(dims))].double()
        index = np.stack(np.meshgrid(*[np.arange(0, n, step) for n in fixed.shape], indexing="ij"), axis=-1)
        to_moving = np.linalg.inv(moving_affine) @ matrix @ fixed_affine
        voxels = index @ to_moving[:dims, :dims].T + to_moving[:dims, dims]
        inside = np.all((voxels >= -0.5) & (voxels <= np.asarray(moving_shape) - 0.5), axis=-1)
        mass = coarse.clamp_min(0).numpy()
        return float((mass * inside).sum() / max(mass.sum(), 1e-12))

    # ---- resampling ----
    @staticmethod
    def fixed_to_moving_voxels(fixed_affine: np.ndarray, moving_affine: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """``A_m⁻¹ · T · A_f``: fixed-grid voxel → moving-grid voxel (homogeneous, float64)."""
        return np.linalg.inv(np.asarray(moving_affine, np.float64)) @ matrix @ np.asarray(fixed_affine, np.float64)

    @classmethod
    def sampling_grid(
        cls,
        fixed_affine: np.ndarray,
        fixed_shape: Sequence[int],
        moving_affine: np.ndarray,
        moving_shape: Sequence[int],
        matrix: np.ndarray,
        ddf: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``grid_sample`` grid ``(1, *fixed_shape, d)`` that samples the moving image at ``T(A_f · (x + u(x)))``
        for every fixed-grid voxel ``x``: the affine alone, or composed with a ``(1, d, *fixed_shape)`` voxel DDF of
        the fixed grid (the network's): the moving image is interpolated once for the whole transform.

        The affine part is ``F.affine_grid`` of ``N_m · A_m⁻¹ T A_f · N_f⁻¹`` (``N``: voxel → normalised
        coordinates, axes in ``grid_sample``'s order); the DDF adds its linear image."""
        dims = len(fixed_shape)
        device = ddf.device if ddf is not None else torch.device(device or "cpu")

        def normalise(shape: Sequence[int]) -> np.ndarray:  # voxel (index order) -> normalised (grid order)
            scale = np.array([2.0 / max(int(n) - 1, 1) for n in shape])
            to_normal = _homogeneous(np.diag(scale), -np.ones(dims))
            order = np.eye(dims + 1)
            order[:dims, :dims] = np.eye(dims)[::-1]
            return order @ to_normal

        voxels = cls.fixed_to_moving_voxels(fixed_affine, moving_affine, matrix)
        theta = normalise(moving_shape) @ voxels @ np.linalg.inv(normalise(fixed_shape))
        theta_t = torch.as_tensor(theta[:dims], dtype=torch.float32, device=device)[None]
        grid = F.affine_grid(theta_t, [1, 1, *[int(n) for n in fixed_shape]], align_corners=True)
        if ddf is not None:
            linear = normalise(moving_shape)[:dims, :dims] @ voxels[:dims, :dims]  # fixed voxel -> moving normalised
            grid = grid + torch.einsum(
                "ji,bi...->b...j", torch.as_tensor(linear, dtype=torch.float32, device=device), ddf.float()
            )
        return grid


def _affine_of(image: torch.Tensor) -> np.ndarray:
    affine = torch.as_tensor(getattr(image, "affine", None))
    return np.asarray((affine[0] if affine.dim() == 3 else affine).detach().cpu(), dtype=np.float64)


def _file_of(image: torch.Tensor, default: str) -> str:
    names = getattr(image, "meta", {}).get("filename_or_obj", default)
    return str(names[0] if isinstance(names, (list, tuple)) else names)


class AffineStage:
    """One pair of a batch through the affine stage (the evaluation step's view of it).

    ``batch_fixed``/``batch_moving``: the batch's MetaTensors (their affines: voxel → world); ``fixed``/``moving``:
    the same as plain ``(1, 1, *spatial)`` tensors on the device. ``aligned`` is the moving image resampled through
    ``T`` onto the fixed grid, what the network sees; ``sampling_grid(ddf)`` samples the moving grid at
    ``T(A_f (x + u(x)))``, the whole transform in one interpolation.
    """

    def __init__(self, registration: AffineRegistration, batch, fixed: torch.Tensor, moving: torch.Tensor) -> None:
        if fixed.shape[0] != 1:
            raise ValueError(f"the affine stage registers one pair per batch (batch_size 1), got {fixed.shape[0]}")
        self.fixed_affine = _affine_of(batch["fixed_image"])
        self.moving_affine = _affine_of(batch["moving_image"])
        names = (_file_of(batch["fixed_image"], "fixed image"), _file_of(batch["moving_image"], "moving image"))
        result = registration.estimate(
            fixed[0, 0].cpu(), self.fixed_affine, moving[0, 0].cpu(), self.moving_affine, names
        )
        self.matrix, self.report = result.matrix, result.report
        self.fixed_shape, self.moving_shape = tuple(fixed.shape[2:]), tuple(moving.shape[2:])
        self.device = fixed.device
        self._grids: dict[str, torch.Tensor] = {}
        self.aligned = threaded_grid_sample(moving, self.sampling_grid(), mode="bilinear", padding_mode="zeros")

    def sampling_grid(self, ddf: torch.Tensor | None = None, matrix: np.ndarray | None = None) -> torch.Tensor:
        """The grid for ``T`` (or ``matrix``) after ``ddf``; grids without a DDF are kept for the next image."""
        key = "affine" if matrix is None else "other"
        if ddf is None and key in self._grids:
            return self._grids[key]
        grid = AffineRegistration.sampling_grid(
            self.fixed_affine,
            self.fixed_shape,
            self.moving_affine,
            self.moving_shape,
            self.matrix if matrix is None else matrix,
            ddf,
            self.device,
        )
        if ddf is None:
            self._grids[key] = grid
        return grid

    def aligned_label(self, label: torch.Tensor) -> torch.Tensor:
        """A moving-grid label map after the affine alone, on the fixed grid (nearest neighbour)."""
        return threaded_grid_sample(label, self.sampling_grid(), mode="nearest", padding_mode="zeros")

    def unregistered(self, image: torch.Tensor, mode: str) -> torch.Tensor:
        """A moving-grid image where its header puts it on the fixed grid (no registration: the baseline)."""
        identity = np.eye(len(self.fixed_shape) + 1)
        return threaded_grid_sample(image, self.sampling_grid(matrix=identity), mode=mode, padding_mode="zeros")


def affine_report(matrix: np.ndarray) -> dict:
    """``metrics.json``'s view of ``T``: the matrix, and its translation, rotation (degrees, of the polar
    decomposition's rotation), scales and the shear left over."""
    dims = matrix.shape[0] - 1
    linear = matrix[:dims, :dims]
    u, singular, vt = np.linalg.svd(linear)
    rotation = u @ vt
    stretch = vt.T @ np.diag(singular) @ vt  # linear = rotation @ stretch (polar decomposition)
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(rotation) - (dims - 2)) / 2.0))))
    return {
        "world_matrix_ras": np.round(matrix, 8).tolist(),
        "convention": "fixed world point x (RAS mm) -> moving world point T x; affine.txt holds it in ITK's LPS",
        "translation_mm": np.round(matrix[:dims, dims], 4).tolist(),
        "rotation_degrees": round(angle, 4),
        "scales": np.round(singular, 5).tolist(),
        "shear": round(float(np.abs(stretch - np.diag(np.diag(stretch))).max()), 5),
        "determinant": round(float(np.linalg.det(linear)), 6),
    }


def itk_affine_text(matrix_ras: np.ndarray) -> str:
    """``T`` as an ITK transform file (``#Insight Transform File V1.0``), as ANTs, Greedy and ITK-SNAP read it.

    ITK's transform maps a fixed physical point to a moving physical point in LPS millimetres:
    ``T_LPS = F · T_RAS · F`` with ``F = diag(-1, -1, 1)`` (2D: ``diag(-1, -1)``); parameters are the matrix
    row by row, then the translation, about the centre 0.
    """
    matrix_ras = np.asarray(matrix_ras, dtype=np.float64)
    dims = matrix_ras.shape[0] - 1
    flip = np.diag([-1.0, -1.0] + [1.0] * (dims - 2) + [1.0])
    lps = flip @ matrix_ras @ flip
    values = list(lps[:dims, :dims].flatten()) + list(lps[:dims, dims])
    return (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        f"Transform: AffineTransform_double_{dims}_{dims}\n"
        f"Parameters: {' '.join(repr(float(v)) for v in values)}\n"
        f"FixedParameters: {' '.join(['0'] * dims)}\n"
    )


def write_itk_affine(path: str, matrix_ras: np.ndarray) -> str:
    """Write ``itk_affine_text`` atomically (temporary file, then rename)."""
    from .files import atomic_output

    with atomic_output(path, ".txt") as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(itk_affine_text(matrix_ras))
    return path
