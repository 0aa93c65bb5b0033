"""Chunked (dask) execution of volume filters with overlap that makes chunk borders exact.

Every filter of :mod:`~cellrna_pipeline.core.preprocess` is a numpy function on one
``(z, y, x)`` volume that reaches at most ``depth`` voxels per axis. Run through
:func:`dask.array.map_overlap` with that depth and ``boundary="none"``, each chunk sees its
neighbours' voxels where the filter needs them and the true volume edge where the volume
ends, so the result equals the single-block result (bit for bit for local filters).
Memory is bounded by a few chunks per worker thread, not by the volume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io.omezarr import DEFAULT_CHUNK_YX, auto_chunks_zyx
from cellrna_pipeline.core.preprocess.register import shift_volume

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "DEFAULT_CHUNK_YX",
    "auto_chunks_zyx",
    "filter_chunked",
    "shift_chunked",
    "to_dask",
]


def to_dask(volume: Any, chunks_zyx: Sequence[int]) -> da.Array:
    """A numpy or dask ``(..., z, y, x)`` array as dask with the given z, y, x chunks."""
    import dask.array as da

    lead = (1,) * (volume.ndim - 3)
    chunks = (*lead, *(int(c) for c in chunks_zyx))
    if isinstance(volume, da.Array):
        return volume.rechunk(chunks)
    return da.from_array(np.asarray(volume), chunks=chunks)


def filter_chunked(
    func: Callable[..., np.ndarray],
    volume_zyx: da.Array,
    depth_zyx: Sequence[int],
    **kwargs: Any,
) -> da.Array:
    """``func(block, **kwargs)`` over a 3-D dask array with exact chunk borders.

    Parameters
    ----------
    func : numpy function ``(z, y, x) -> (z, y, x) float32`` whose output at a voxel
        depends on input voxels at most ``depth_zyx`` away.
    volume_zyx : 3-D dask array.
    depth_zyx : overlap per axis (voxels); dask merges chunks smaller than it.
    """
    depth = {a: int(d) for a, d in enumerate(depth_zyx)}
    if volume_zyx.ndim != 3:
        raise InputError(f"need a 3-D (z, y, x) dask array, got {volume_zyx.ndim} dimensions")
    arr = volume_zyx  # dask merges chunks smaller than the depth itself
    if not any(depth.values()):
        return arr.map_blocks(func, dtype=np.float32, **kwargs)  # type: ignore[arg-type]
    return arr.map_overlap(
        func, depth=depth, boundary="none", trim=True, dtype=np.float32, **kwargs
    )


def shift_chunked(
    volume_zyx: da.Array, shift_zyx_px: Sequence[float], *, fill_value: float = 0.0
) -> da.Array:
    """Chunked :func:`~cellrna_pipeline.core.preprocess.register.shift_volume`.

    Each chunk is shifted with ``ceil(|shift|) + 1`` voxels of overlap per axis (what the
    integer move plus the linear interpolation reach), so every output voxel sees the same
    input voxels as in the whole volume: equal to the in-memory result bit for bit. At the
    volume's edges there is no overlap and the fill value comes in, as in memory.
    """
    if len(shift_zyx_px) != 3 or not all(math.isfinite(float(s)) for s in shift_zyx_px):
        raise InputError(f"shift must be 3 finite numbers, got {list(shift_zyx_px)}")
    shift = tuple(float(s) for s in shift_zyx_px)
    depth = [
        0 if s == 0 else min(math.ceil(abs(s)) + 1, n)
        for s, n in zip(shift, volume_zyx.shape, strict=True)
    ]
    return filter_chunked(
        shift_volume,
        volume_zyx.astype(np.float32),
        depth,
        shift_zyx_px=shift,
        fill_value=fill_value,
    )
