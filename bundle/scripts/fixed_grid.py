"""Bring arrays from the network's grid back onto the fixed image file's own grid (shape, orientation, spacing).

The network works on the preprocessed grid (RAS, ``pixdim``, ``spatial_size``); a user overlays outputs on the fixed
file in ITK-SNAP / 3D Slicer and expects its exact header. When the two grids coincide nothing is resampled.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch

__all__ = ["FixedFileGrid"]


class FixedFileGrid:
    """The fixed file's grid, and conversions of network-grid arrays onto it (the moving file's grid for the
    inverse field, given the moving image's affine on the network grid).

    With an affine stage the network's world is the fixed image's, and the moving image was brought into it by the
    world affine ``T`` (fixed world → moving world, ``scripts.affine``): the fixed file's DDF then ends its vectors
    in the moving world (``endpoint_world = T``: the written field is the whole transform), and the moving file's
    inverse field starts from where its voxels sit in the fixed world (``file_to_network_world = T⁻¹``).

    Args:
        fixed_path: the fixed image file (or the moving one).
        network_affine: ``(dims + 1)``-square affine of the preprocessed fixed image (MONAI's, 3x3 for 2D).
        network_shape: spatial shape of the preprocessed fixed image.
        file_to_network_world: ``(dims + 1)``-square world transform from the file's world to the network's.
        endpoint_world: ``(dims + 1)``-square world transform applied to the DDF's end points.
    """

    def __init__(
        self,
        fixed_path: str,
        network_affine: np.ndarray,
        network_shape: tuple[int, ...],
        file_to_network_world: np.ndarray | None = None,
        endpoint_world: np.ndarray | None = None,
    ) -> None:
        header = nib.load(fixed_path)
        self.file_affine = np.asarray(header.affine, dtype=np.float64)
        self.file_shape = tuple(int(s) for s in header.shape[:3])
        self.dims = len(network_shape)
        # 2D networks drop the slice axis; embed their in-plane affine in the file's so the slice keeps its position.
        self.network_affine = self.file_affine.copy()
        network_affine = np.asarray(network_affine, dtype=np.float64)
        self.network_affine[: self.dims, : self.dims] = network_affine[: self.dims, : self.dims]
        self.network_affine[: self.dims, 3] = network_affine[: self.dims, self.dims]
        self.network_shape = tuple(network_shape) + (1,) * (3 - self.dims)
        self.base = _embed(file_to_network_world, self.dims)
        self.endpoint = _embed(endpoint_world, self.dims)
        self.sample_affine = self.base @ self.file_affine  # file voxel -> network world
        self.identical = self.network_shape == self.file_shape and np.allclose(
            self.network_affine, self.sample_affine, atol=1e-4
        )
        self._resample = ResampleToMatch()
        self._destination = MetaTensor(torch.zeros((1,) + self.file_shape), affine=torch.as_tensor(self.sample_affine))

    def _to_file(self, channels: np.ndarray, mode: str) -> np.ndarray:
        """``(C, *network spatial)`` -> ``(C, X, Y, Z)`` on the file grid."""
        volume = channels.reshape((channels.shape[0],) + self.network_shape)
        if self.identical:
            return volume
        source = MetaTensor(torch.as_tensor(volume, dtype=torch.float32), affine=torch.as_tensor(self.network_affine))
        resampled = self._resample(source, self._destination, mode=mode, padding_mode="zeros")
        return np.asarray(resampled.detach().cpu().numpy())

    def image(self, image: np.ndarray) -> np.ndarray:
        """Intensity image ``(*network spatial)`` -> ``(X, Y, Z)`` on the file grid (bilinear)."""
        return self._to_file(image[None], mode="bilinear")[0]

    def label(self, label: np.ndarray) -> np.ndarray:
        """Label map ``(*network spatial)`` -> ``(X, Y, Z)`` on the file grid (nearest neighbour)."""
        return self._to_file(label[None], mode="nearest")[0]

    def ddf(self, ddf: np.ndarray) -> np.ndarray:
        """DDF in network-grid voxels ``(dims, *network spatial)`` -> file-grid voxels ``(X, Y, Z, 1, dims)``.

        Displacements are vectors: they go through world coordinates (``A_network · u``), are resampled
        component-wise, and come back as ``A_file⁻¹ · d`` in the file's voxel axes.
        """
        moved = not (np.allclose(self.base, np.eye(4)) and np.allclose(self.endpoint, np.eye(4)))
        if moved or not self.identical:
            ddf = self._moved_ddf(ddf)
        ddf = ddf.reshape((self.dims,) + self.file_shape)
        return np.moveaxis(ddf, 0, -1)[..., None, :].astype(np.float32)

    def _moved_ddf(self, ddf: np.ndarray) -> np.ndarray:
        """``u(k) = A_file⁻¹ · E(B · A_file · k + d(k)) - k`` with ``d`` the network's displacement in world mm,
        sampled where file voxel ``k`` sits in the network's world (``B · A_file · k``), ``E`` the end-point
        transform: ``(dims, *network)`` network voxels -> ``(dims, X, Y, Z)`` file voxels.

        Written as ``(Q - I) · k + R · d(k)`` with ``Q = A_file⁻¹ E B A_file`` and ``R = (A_file⁻¹ E)``'s linear
        part: the index term broadcasts per axis, no coordinate volume is built. Without an affine stage
        (``B = E = I``) it is ``A_file⁻¹ · d``: the vector taken through world space onto the file's axes."""
        linear = self.network_affine[: self.dims, : self.dims]
        to_file = np.linalg.inv(self.file_affine) @ self.endpoint
        q = to_file @ self.sample_affine - np.eye(4)
        r = to_file[: self.dims, : self.dims]
        flat = ddf.reshape(self.dims, -1).astype(np.float32, copy=False)
        if self.identical:  # no resampling: both linear maps in one (BLAS) product
            out = (r @ linear).astype(np.float32) @ flat
        else:
            world = self._to_file(linear.astype(np.float32) @ flat, mode="bilinear").astype(np.float32)
            out = r.astype(np.float32) @ world.reshape(self.dims, -1)
        out = out.reshape((self.dims,) + self.file_shape)
        axes = [np.arange(n, dtype=np.float32) for n in self.file_shape]
        for c in range(self.dims):
            out[c] += np.float32(q[c, 3])
            for a in range(3):
                if q[c, a] != 0:
                    shape = [1, 1, 1]
                    shape[a] = -1
                    out[c] += np.float32(q[c, a]) * axes[a].reshape(shape)
        return out


def _embed(matrix: np.ndarray | None, dims: int) -> np.ndarray:
    """A ``(dims + 1)``-square world transform (2D: in-plane) as a 4x4 one; None is the identity."""
    full = np.eye(4)
    if matrix is None:
        return full
    matrix = np.asarray(matrix, dtype=np.float64)
    full[:dims, :dims], full[:dims, 3] = matrix[:dims, :dims], matrix[:dims, dims]
    return full
