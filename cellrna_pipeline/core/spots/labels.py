"""Spot instance masks: each spot covers the voxels within one sigma of its centre.

The same rule as the synthetic ground truth (``core/synth``): a voxel belongs to a spot
when its normalized distance ``sqrt(sum(((v - c) / sigma)^2))`` to the sub-voxel centre is
at most 1; where spots overlap the nearer centre wins, and the voxel at a spot's rounded
centre always carries that spot (so no spot is empty unless two share a centre voxel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellrna_pipeline.core.spots._kernels import spot_voxels

__all__ = ["RasterizedSpots", "rasterize_spots"]


@dataclass(frozen=True)
class RasterizedSpots:
    """Result of :func:`rasterize_spots`.

    Attributes
    ----------
    sizes : ``(n,)`` int64 voxels of each spot's mask.
    labels : ``(z, y, x)`` uint32 ids ``1..n`` (spot ``i`` has id ``i + 1``), or ``None``
        when not asked for.
    """

    sizes: np.ndarray
    labels: np.ndarray | None


def rasterize_spots(
    centres_zyx: np.ndarray,
    shape_zyx: tuple[int, ...],
    *,
    sigma_vox: tuple[float, float, float],
    labels: bool = False,
) -> RasterizedSpots:
    """Instance masks of spots (ellipsoids of one sigma), without a full-size array unless
    ``labels`` is set.

    Parameters
    ----------
    centres_zyx : ``(n, 3)`` sub-voxel centres in voxels.
    shape_zyx : volume shape.
    sigma_vox : spot sigma in voxels per axis (``z`` 0 for 2-D: a one-plane mask).
    labels : also return the ``(z, y, x)`` uint32 label volume.
    """
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    n = len(centres)
    shape = tuple(int(s) for s in shape_zyx)
    if n == 0:
        return RasterizedSpots(
            np.zeros(0, np.int64), np.zeros(shape, np.uint32) if labels else None
        )
    sig = np.asarray(sigma_vox, dtype=np.float64)
    reach = np.array([int(np.ceil(s)) + 1 if s > 0 else 0 for s in sig], dtype=np.int64)
    inv = np.where(sig > 0, 1.0 / np.where(sig > 0, sig, 1.0), 0.0)
    rounded = np.clip(np.rint(centres).astype(np.int64), 0, np.array(shape) - 1)
    flat, spot = spot_voxels(centres, rounded, np.array(shape, dtype=np.int64), inv, reach)
    sizes = np.bincount(spot, minlength=n).astype(np.int64)
    out = None
    if labels:
        out = np.zeros(int(np.prod(shape)), dtype=np.uint32)
        out[flat] = (spot + 1).astype(np.uint32)
        out = out.reshape(shape)
    return RasterizedSpots(sizes, out)
