"""Overview figure of one registered pair: fixed, moving, warped, and the deformation grid over the fixed image."""

from __future__ import annotations


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_output  # noqa: E402

__all__ = ["overview_figure", "save_overview_png"]


def _middle_slice(volume: np.ndarray) -> np.ndarray:
    """2D view of a ``(*spatial)`` array: itself in 2D, the middle slice of the last axis in 3D."""
    return volume if volume.ndim == 2 else volume[..., volume.shape[-1] // 2]


def overview_figure(
    fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, ddf: np.ndarray, grid_step: int = 6
) -> plt.Figure:
    """Figure with four panels from ``(*spatial)`` images and a ``(spatial_dims, *spatial)`` DDF (voxels).

    Arrays are RAS after preprocessing, so panels put axis 0 left to right and axis 1 bottom to top (an axial slice
    then reads in neurological convention: right on the right, anterior up). The grid panel draws the lines of
    ``φ(x) = x + u(x)`` with the in-plane displacement components.
    """
    panels = [("fixed", fixed), ("moving", moving), ("warped moving", warped)]
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for axis, (title, image) in zip(axes, panels):
        axis.imshow(_middle_slice(image).T, cmap="gray", origin="lower", vmin=0.0, vmax=max(float(image.max()), 1e-6))
        axis.set_title(title)
    fixed_view = _middle_slice(fixed)
    axes[3].imshow(fixed_view.T, cmap="gray", origin="lower", vmin=0.0, vmax=max(float(fixed.max()), 1e-6), alpha=0.5)
    first, second = np.meshgrid(np.arange(fixed_view.shape[0]), np.arange(fixed_view.shape[1]), indexing="ij")
    mapped_first = first + _middle_slice(ddf[0])
    mapped_second = second + _middle_slice(ddf[1])
    for i in range(0, fixed_view.shape[0], grid_step):
        axes[3].plot(mapped_first[i, :], mapped_second[i, :], color="tab:red", linewidth=0.6)
    for j in range(0, fixed_view.shape[1], grid_step):
        axes[3].plot(mapped_first[:, j], mapped_second[:, j], color="tab:red", linewidth=0.6)
    axes[3].set_xlim(-0.5, fixed_view.shape[0] - 0.5)
    axes[3].set_ylim(-0.5, fixed_view.shape[1] - 0.5)
    axes[3].set_title("deformation grid φ")
    for axis in axes:
        axis.set_axis_off()
    figure.tight_layout()
    return figure


def save_overview_png(path: str, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, ddf: np.ndarray) -> str:
    """Write the overview PNG atomically (temporary file in the same folder, then rename)."""
    figure = overview_figure(fixed, moving, warped, ddf)
    try:
        with atomic_output(path, ".png") as temporary:
            figure.savefig(temporary, dpi=100)
    finally:
        plt.close(figure)
    return path
