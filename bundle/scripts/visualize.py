"""Overview figure of one registered pair: fixed, moving, warped, and the deformation grid over the fixed image."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from .files import atomic_output

__all__ = ["overview_figure", "save_overview_png"]

matplotlib.use("Agg")  # headless: the bundle's other figures (template, benchmarks) use pyplot after importing this


def _middle_slice(volume: np.ndarray) -> np.ndarray:
    """2D view of a ``(*spatial)`` array: itself in 2D, the middle slice of the last axis in 3D."""
    return volume if volume.ndim == 2 else volume[..., volume.shape[-1] // 2]


def overview_figure(
    fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, ddf: np.ndarray, grid_step: int = 6
) -> Figure:
    """Figure with four panels from ``(*spatial)`` images and a ``(spatial_dims, *spatial)`` DDF (voxels).

    Arrays are RAS after preprocessing, so panels put axis 0 left to right and axis 1 bottom to top (an axial slice
    then reads in neurological convention: right on the right, anterior up). The grid panel draws the lines of
    ``φ(x) = x + u(x)`` with the in-plane displacement components.

    Built with matplotlib's object API rather than pyplot: no global figure registry (nothing to close, safe outside
    the main thread), the grid as one ``LineCollection`` and a fixed layout instead of ``tight_layout`` (which
    renders the figure once more to measure it): about half the time of the pyplot version for a 3D brain.
    """
    panels = [("fixed", fixed), ("moving", moving), ("warped moving", warped)]
    figure = Figure(figsize=(16, 4.4))
    axes = figure.subplots(1, 4)
    for axis, (title, image) in zip(axes, panels):
        axis.imshow(_middle_slice(image).T, cmap="gray", origin="lower", vmin=0.0, vmax=max(float(image.max()), 1e-6))
        axis.set_title(title)
    fixed_view = _middle_slice(fixed)
    axes[3].imshow(fixed_view.T, cmap="gray", origin="lower", vmin=0.0, vmax=max(float(fixed.max()), 1e-6), alpha=0.5)
    first, second = np.meshgrid(np.arange(fixed_view.shape[0]), np.arange(fixed_view.shape[1]), indexing="ij")
    mapped = np.stack([first + _middle_slice(ddf[0]), second + _middle_slice(ddf[1])], axis=-1)  # (X, Y, 2)
    lines = [mapped[i, :] for i in range(0, fixed_view.shape[0], grid_step)]
    lines += [mapped[:, j] for j in range(0, fixed_view.shape[1], grid_step)]
    axes[3].add_collection(LineCollection(lines, colors="tab:red", linewidths=0.6))
    axes[3].set_xlim(-0.5, fixed_view.shape[0] - 0.5)
    axes[3].set_ylim(-0.5, fixed_view.shape[1] - 0.5)
    axes[3].set_title("deformation grid φ")
    for axis in axes:
        axis.set_axis_off()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.92, wspace=0.06)
    return figure


def save_overview_png(path: str, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, ddf: np.ndarray) -> str:
    """Write the overview PNG atomically (temporary file in the same folder, then rename).

    zlib level 1: a preview, written at every registration, where the default level 6 costs about twice the time
    for a file about a fifth smaller.
    """
    figure = overview_figure(fixed, moving, warped, ddf)
    with atomic_output(path, ".png") as temporary:
        figure.savefig(temporary, dpi=100, pil_kwargs={"compress_level": 1})
    return path
