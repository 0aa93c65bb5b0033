"""Spot instance masks: each spot covers the voxels within one sigma of its centre.

The same rule as the synthetic ground truth (``core/synth``): a voxel belongs to a spot
when its normalized distance ``sqrt(sum(((v - c) / sigma)^2))`` to the sub-voxel centre is
at most 1; where spots overlap the nearer centre wins, and the voxel at a spot's rounded
centre always carries that spot (so no spot is empty unless two share a centre voxel).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

__all__ = ["RasterizedSpots", "rasterize_spots"]

_BATCH = 8192  # spots rasterized together


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
    reach = [int(np.ceil(s)) + 1 if s > 0 else 0 for s in sig]
    offsets = np.array(list(itertools.product(*[range(-r, r + 1) for r in reach])), dtype=np.int64)
    inv = np.where(sig > 0, 1.0 / np.where(sig > 0, sig, 1.0), 0.0)
    centre_off = np.all(offsets == 0, axis=1)
    parts = []
    for start in range(0, n, _BATCH):  # batches: the (spots, offsets, 3) arrays stay small
        c = centres[start : start + _BATCH]
        rounded = np.clip(np.rint(c).astype(np.int64), 0, np.array(shape) - 1)
        # only the offsets that can be within one sigma of some centre of the batch
        # (each is at most ``shift`` from its rounded voxel): most of the box is not
        shift = np.abs(c - rounded).max(axis=0)
        near = (((np.maximum(np.abs(offsets) - shift, 0.0) * inv) ** 2).sum(axis=1) <= 1.0) | (
            centre_off
        )
        vox = rounded[:, None, :] + offsets[near][None]  # (batch, k, 3)
        d = np.sqrt((((vox - c[:, None, :]) * inv) ** 2).sum(axis=2))
        d[:, centre_off[near]] = -1.0  # the centre voxel is always the spot's own
        inside = (d <= 1.0) & np.all((vox >= 0) & (vox < np.array(shape)), axis=2)
        spot = np.broadcast_to(np.arange(start, start + len(c))[:, None], d.shape)[inside]
        parts.append((np.ravel_multi_index(tuple(vox[inside].T), shape), spot, d[inside]))
    flat, spot, dist = (np.concatenate(p) for p in zip(*parts, strict=True))
    order = np.lexsort((spot, dist, flat))
    flat, spot = flat[order], spot[order]
    first = np.ones(len(flat), dtype=bool)
    first[1:] = flat[1:] != flat[:-1]
    flat, spot = flat[first], spot[first]
    sizes = np.bincount(spot, minlength=n).astype(np.int64)
    out = None
    if labels:
        out = np.zeros(int(np.prod(shape)), dtype=np.uint32)
        out[flat] = (spot + 1).astype(np.uint32)
        out = out.reshape(shape)
    return RasterizedSpots(sizes, out)
