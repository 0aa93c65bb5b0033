"""Percentile normalization per channel, robust to hot pixels.

The low and high percentiles of each channel map to 0 and 1. They are computed on
z-planes sampled evenly through the volume, each 3x3 median-filtered first: a hot pixel
(an isolated bright voxel) disappears in the median, so it cannot move the high
percentile, while spots and cells (several voxels wide) survive. The same sample is
taken whether the volume is a numpy array or a chunked dask array, so both give the same
percentiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from cellrna_pipeline.core.errors import InputError

__all__ = ["normalize_percentile", "percentile_range", "sample_plane_indices"]

_MAX_SAMPLE_PIXELS = 1 << 18  # per plane, after the median filter (strided)


def sample_plane_indices(n_z: int, n_planes: int) -> np.ndarray:
    """``n_planes`` (or fewer) distinct z indices spread evenly over ``0..n_z-1``."""
    if n_z < 1:
        raise InputError(f"volume has no z-planes (n_z={n_z})")
    return np.unique(np.linspace(0, n_z - 1, min(n_z, max(1, n_planes))).round().astype(int))


def _median_planes(planes: np.ndarray) -> np.ndarray:
    """3x3 median of each ``(..., y, x)`` plane (edges reflected)."""
    arr = np.asarray(planes, dtype=np.float32)
    return ndi.median_filter(arr, size=(1,) * (arr.ndim - 2) + (3, 3))


def _stride(y: int, x: int) -> int:
    return max(1, math.ceil(math.sqrt(y * x / _MAX_SAMPLE_PIXELS)))


def percentile_range(
    volume_czyx: Any,
    *,
    percentiles: Sequence[float] = (1.0, 99.8),
    n_planes: int = 16,
) -> np.ndarray:
    """Low and high percentile of each channel, robust to hot pixels.

    Parameters
    ----------
    volume_czyx : ``(c, z, y, x)`` numpy or dask array (e.g. calibrated counts); only the
        sampled planes are read. For dask, the median filter runs chunk by chunk (one
        pixel of overlap, so values equal the whole-plane filter) and only the strided
        sample comes back, so memory does not grow with the plane size.
    percentiles : ``(low, high)`` in percent.
    n_planes : z-planes sampled per channel.

    Returns
    -------
    ``(c, 2)`` float64: the values at the low and high percentile per channel. A
    channel whose two values coincide (a constant channel) gets ``high = low + 1``.
    """
    if getattr(volume_czyx, "ndim", 0) != 4:
        raise InputError(
            f"need a (c, z, y, x) volume, got shape {getattr(volume_czyx, 'shape', None)}"
        )
    lo_p, hi_p = (float(p) for p in percentiles)
    if not 0 <= lo_p < hi_p <= 100:
        raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got {[lo_p, hi_p]}")
    n_c, n_z, n_y, n_x = (int(v) for v in volume_czyx.shape)
    zs = sample_plane_indices(n_z, n_planes)
    stride = _stride(n_y, n_x)
    if hasattr(volume_czyx, "dask"):
        import dask

        selected = volume_czyx[:, zs].astype(np.float32)
        filtered = selected.map_overlap(
            _median_planes,
            depth={0: 0, 1: 0, 2: 1, 3: 1},
            boundary="none",
            dtype=np.float32,
        )
        # one channel at a time: only its strided sample is held
        samples = tuple(dask.compute(filtered[c, :, ::stride, ::stride])[0] for c in range(n_c))
    else:
        volume = np.asarray(volume_czyx)
        samples = tuple(_median_planes(volume[c, zs])[:, ::stride, ::stride] for c in range(n_c))
    out = np.empty((n_c, 2))
    for c, sample in enumerate(samples):
        values = np.asarray(sample).ravel()
        if not np.isfinite(values).all():
            raise InputError(f"channel {c} holds NaN or infinite values")
        lo, hi = np.percentile(values, [lo_p, hi_p])
        if hi <= lo:
            hi = lo + 1.0
        out[c] = (lo, hi)
    return out


def normalize_percentile(volume_czyx: Any, ranges: np.ndarray) -> Any:
    """Map ``ranges[c] = (low, high)`` to 0 and 1 per channel, float32, unclipped.

    Works elementwise on numpy and dask arrays of shape ``(c, z, y, x)``.
    """
    r = np.asarray(ranges, dtype=np.float64)
    if r.shape != (int(volume_czyx.shape[0]), 2):
        raise InputError(f"need one (low, high) per channel, got shape {r.shape}")
    lo = r[:, 0].astype(np.float32)[:, None, None, None]
    scale = (1.0 / (r[:, 1] - r[:, 0])).astype(np.float32)[:, None, None, None]
    return (volume_czyx.astype(np.float32) - lo) * scale
