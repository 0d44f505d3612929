"""Scaling and squaring and warping with ``grid_sample`` directly, for the CPU.

MONAI's ``DVF2DDF``/``Warp`` rebuild the identity grid and convert units at every composition; for test-time
refinement, which integrates and warps hundreds of times, that overhead is most of the cost. Here the field is
converted once into ``grid_sample``'s normalised coordinates and composed there; the result equals MONAI's
(a test checks it) with the same conventions: channel ``i`` is the displacement along spatial axis ``i`` in voxels,
``warped(x) = image(x + u(x))``, linear interpolation, border padding for the field.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "grid_sample",
    "identity_grid",
    "integrate_velocity",
    "sampling_grid",
    "label_at_points",
    "warp",
    "warp_label_linear",
]


def grid_sample(
    image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """``F.grid_sample`` (``align_corners=True``) that uses every CPU thread for a batch of one.

    PyTorch's CPU kernels (forward and backward, 2D and 3D) parallelise over the batch only, so one pair — every
    integration step and warp of inference and test-time refinement — runs on one core. Here the output grid is cut
    along its first spatial axis into one slab per thread, the slabs become the batch and the image is shared
    (``expand``, no copy; autograd sums its gradient over the slabs). Each output value is computed exactly as before
    (``benchmarks/cpu_kernels.py``: a 3D squaring step ~1.5x faster on 2 cores).
    ``image`` ``(B, C, *spatial)``, ``grid`` ``(B, *out_spatial, d)``.
    """
    threads = torch.get_num_threads()
    rows = grid.shape[1]
    if image.device.type != "cpu" or grid.shape[0] != 1 or threads < 2 or rows < 2 * threads:
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    slab = -(-rows // threads)
    padded = slab * threads
    if padded > rows:  # repeat the last row so that every slab has the same size; cropped below
        grid = torch.cat([grid, grid[:, -1:].expand(1, padded - rows, *grid.shape[2:])], dim=1)
    slabs = grid.reshape(threads, slab, *grid.shape[2:])
    sampled = F.grid_sample(
        image.expand(threads, *image.shape[1:]), slabs, mode=mode, padding_mode=padding_mode, align_corners=True
    )
    # (threads, C, slab, ...) -> (1, C, threads * slab, ...), slabs back in order along the first axis
    joined = sampled.transpose(0, 1).reshape(1, image.shape[1], padded, *sampled.shape[3:])
    return joined[:, :, :rows]


def identity_grid(shape: torch.Size | list[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """``grid_sample``'s identity grid ``(1, *shape, d)`` (last dim ordered x=last axis first, align_corners=True)."""
    axes = [torch.linspace(-1.0, 1.0, int(n), device=device, dtype=dtype) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh[::-1], dim=-1).unsqueeze(0)


def _to_normalised(field: torch.Tensor) -> torch.Tensor:
    """``(B, d, *spatial)`` voxel displacements -> ``(B, *spatial, d)`` in normalised units, grid_sample's order."""
    spatial = field.shape[2:]
    scale = torch.tensor([2.0 / max(int(n) - 1, 1) for n in spatial], dtype=field.dtype, device=field.device)
    moved = field * scale.view(1, -1, *([1] * len(spatial)))
    return moved.movedim(1, -1).flip(-1)


def _to_voxels(field: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_to_normalised``."""
    spatial = field.shape[1:-1]
    scale = torch.tensor([max(int(n) - 1, 1) / 2.0 for n in spatial], dtype=field.dtype, device=field.device)
    return field.flip(-1).movedim(-1, 1) * scale.view(1, -1, *([1] * len(spatial)))


def _squaring(flow: torch.Tensor, grid: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """One composition ``u ← u + u ∘ (id + u)`` in normalised coordinates ``(B, *spatial, d)``."""
    sampled = grid_sample(flow.movedim(-1, 1), grid + flow, mode="bilinear", padding_mode=padding_mode)
    return flow + sampled.movedim(1, -1)


def integrate_velocity(
    velocity: torch.Tensor,
    steps: int,
    grid: torch.Tensor | None = None,
    padding_mode: str = "zeros",
    differentiated_steps: int | None = None,
) -> torch.Tensor:
    """``exp(v)`` by scaling and squaring: ``u ← v / 2^steps``, then ``steps`` times ``u ← u + u ∘ (id + u)``.

    ``(B, d, *spatial)`` velocity in voxels -> displacement in voxels; ``grid``: a cached ``identity_grid``;
    ``padding_mode="zeros"`` as MONAI's ``DVF2DDF`` (the field is taken as 0 outside the grid).

    ``differentiated_steps = K < steps`` (test-time refinement) keeps the value exact but differentiates only the
    last ``K`` squarings: the first ``steps - K`` run without a graph, and their result ``exp(v / 2^K)`` enters the
    graph with its first-order Jacobian ``2^-K · I`` (exact as ``v / 2^K → 0``). Each squaring's backward pass
    (the ``grid_sample`` backward) is most of a refinement iteration's cost on a CPU; ``None`` differentiates all.
    """
    if steps <= 0:
        return velocity
    grid = identity_grid(velocity.shape[2:], velocity.device, velocity.dtype) if grid is None else grid
    flow = _to_normalised(velocity / (2.0**steps))
    exact = steps if differentiated_steps is None or not torch.is_grad_enabled() else max(int(differentiated_steps), 0)
    if exact < steps:
        with torch.no_grad():
            for _ in range(steps - exact):
                flow = _squaring(flow, grid, padding_mode)
        first = _to_normalised(velocity / (2.0**exact))  # value exp(v / 2^K), gradient 2^-K with respect to v
        flow = flow + (first - first.detach())
    for _ in range(exact):
        flow = _squaring(flow, grid, padding_mode)
    return _to_voxels(flow)


def sampling_grid(ddf: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
    """``id + ddf`` in ``grid_sample``'s coordinates ``(B, *spatial, d)``, from a ``(B, d, *spatial)`` voxel
    displacement; compute it once to warp several images (image and label) with the same field."""
    grid = identity_grid(ddf.shape[2:], ddf.device, ddf.dtype) if grid is None else grid
    return grid + _to_normalised(ddf)


def warp(
    image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border", grid=None
) -> torch.Tensor:
    """``image ∘ (id + ddf)``: ``(B, C, *spatial)`` image, ``(B, d, *spatial)`` voxel displacement."""
    return grid_sample(image, sampling_grid(ddf, grid), mode=mode, padding_mode=padding_mode)


def compose_ddfs(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """DDF of ``(id + first) ∘ (id + second)``: ``second(x) + first(x + second(x))``, voxel displacements
    ``(B, d, *spatial)``. Warping by it is warping by ``first``, then warping that result by ``second``, with one
    interpolation of the image instead of two. Outside the grid ``first`` is extended from its border."""
    return second + warp(first, second, mode="bilinear", padding_mode="border")


def label_at_points(label: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of each label's mask at ``points``, keeping the label of largest weight: what ANTs'
    ``genericLabel`` and Greedy's ``LABEL`` do (they smooth a little first), instead of nearest neighbour's staircase,
    which misplaces a boundary by up to half a voxel wherever the grids do not coincide.

    Exact without one mask per label: the ``2^d`` corners of a point's cell carry labels ``L_c`` and (multi)linear
    weights ``w_c``; label ``l``'s interpolated mask there is ``Σ_c w_c [L_c = l]``, so the winner is the corner label
    with the largest such sum, and where all corners agree (most of a volume) it is that label. Corners outside the
    input count as background (0), like zero padding.
    ``label`` ``(*spatial)`` integer ids (any dtype), ``points`` ``(N, d)`` voxel coordinates in index order;
    returns ``(N,)`` int32.
    """
    dims = points.shape[-1]
    sizes = [int(n) for n in label.shape]
    strides = [1] * dims
    for axis in range(dims - 2, -1, -1):
        strides[axis] = strides[axis + 1] * sizes[axis + 1]
    flat_label = label.reshape(-1).to(torch.int32)
    corner_offsets = [[(corner >> (dims - 1 - axis)) & 1 for axis in range(dims)] for corner in range(2**dims)]
    # per axis: the two corner coordinates' flat-index contributions, whether they lie inside, the fraction
    fraction, offset, valid = [], [], []
    for axis in range(dims):
        voxel = points[:, axis].float()
        floor = torch.floor(voxel)
        fraction.append(voxel - floor)
        floor = floor.long()
        pair = (floor, floor + 1)
        valid.append([(c >= 0) & (c < sizes[axis]) for c in pair])
        offset.append([c.clamp(0, sizes[axis] - 1) * strides[axis] for c in pair])
    labels = []
    for corner in corner_offsets:
        index = sum(offset[axis][o] for axis, o in enumerate(corner))
        inside = valid[0][corner[0]]
        for axis in range(1, dims):
            inside = inside & valid[axis][corner[axis]]
        labels.append(flat_label[index] * inside)
    labels = torch.stack(labels)  # (2^d, N)
    chosen = labels[0].clone()
    mixed = (labels != labels[:1]).any(0).nonzero().flatten()
    if mixed.numel():
        mixed_labels = labels[:, mixed]
        mixed_fraction = [f[mixed] for f in fraction]
        weights = torch.stack(
            [
                torch.stack([mixed_fraction[a] if o else 1.0 - mixed_fraction[a] for a, o in enumerate(corner)]).prod(0)
                for corner in corner_offsets
            ]
        )
        same = mixed_labels[:, None, :] == mixed_labels[None, :, :]  # (2^d, 2^d, N')
        votes = (same * weights[None, :, :]).sum(1)  # (2^d, N'): the interpolated mask of each corner's label
        chosen[mixed] = mixed_labels.gather(0, votes.argmax(0)[None])[0]
    return chosen


def warp_label_linear(label: torch.Tensor, grid: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``label_at_points`` on a ``grid_sample`` grid: ``label`` ``(B, 1, *in_spatial)``, ``grid``
    ``(B, *out_spatial, d)`` (``align_corners=True``) -> ``(B, 1, *out_spatial)`` in ``label``'s dtype; ``chunk``
    points at a time to bound memory."""
    dims = grid.shape[-1]
    scale = torch.tensor([(int(n) - 1) / 2.0 for n in label.shape[2:]], device=grid.device)
    results = []
    for b in range(grid.shape[0]):
        points = grid[b].reshape(-1, dims)
        out = torch.empty(points.shape[0], dtype=torch.int32, device=grid.device)
        for start in range(0, points.shape[0], chunk):
            voxels = (points[start : start + chunk].flip(-1).float() + 1.0) * scale  # index order
            out[start : start + chunk] = label_at_points(label[b, 0], voxels)
        results.append(out.reshape(grid.shape[1:-1]))
    return torch.stack(results)[:, None].to(label.dtype)
