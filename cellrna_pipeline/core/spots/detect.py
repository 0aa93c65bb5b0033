"""Classical 3D spot detection: band-pass, local maxima, adaptive threshold, sub-voxel
positions, dense-cluster decomposition.

Steps (see ``docs/spots.md``):

1. Band-pass ``D = G(sigma) * I - box(G(sigma) * I)``: a Gaussian matched to the spot
   (sigma from the spot radius and the voxel size, anisotropic) minus a local
   background (a box of ``background_radius`` sigmas).
2. Local maxima of ``D`` (26-connected, plus non-maximum suppression within two spot
   sigmas), each with a parabolic sub-voxel offset per axis.
3. Noise level: the robust std (1.4826 MAD) of ``D`` on a fixed lattice of voxels.
4. Threshold (in noise sigmas): fixed, or chosen from how bright the spots are: the
   share of peaks above 5 sigma that are also above 7 sigma separates bright images
   (background structure is the main error: high threshold) from faint ones (the noise
   floor is: low threshold).
5. Blobs wider than one spot are split into the spots they hold (:mod:`.decompose`).

Steps 1-2 run per chunk (dask tasks, each reading its chunk) with a halo that covers every
filter, so a chunked run gives exactly the result of a single-block run; steps 3-5 work on
the (small) candidate lists and on small windows read from the image, so memory stays
bounded by the chunk size.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy.spatial import cKDTree

from cellrna_pipeline.core.device import cpu_threads
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.spots._candidates import (
    BlockCandidates,
    Filters,
    block_candidates,
    noise_strides,
    robust_std,
    suppression_offsets,
)
from cellrna_pipeline.core.spots.config import SpotDetectionConfig, psf_sigma_vox
from cellrna_pipeline.core.spots.decompose import decompose_blobs, point_extent
from cellrna_pipeline.core.spots.fit import fit_spots
from cellrna_pipeline.core.spots.labels import rasterize_spots
from cellrna_pipeline.core.types import VoxelSize

__all__ = ["DETECTION_SCHEMA", "SpotDetection", "as_zyx_array", "detect_spots"]

#: Columns of :attr:`SpotDetection.table` (positions in voxels, sub-voxel).
DETECTION_SCHEMA: dict[str, pl.DataType] = {
    "spot_id": pl.UInt32(),
    "z": pl.Float64(),
    "y": pl.Float64(),
    "x": pl.Float64(),
    "intensity": pl.Float64(),
    "score": pl.Float64(),
    "size_voxels": pl.UInt32(),
}

# Automatic threshold: the share of peaks >= 5 sigma that are also >= 7 sigma is ~1 when
# spots are bright (they sit far above the noise) and ~1/3 when they are faint; measured
# on the generator's grid (seed 0; the benchmark scores other seeds), see docs/spots.md.
_LOW_SIGMA, _HIGH_SIGMA = 5.0, 7.0
_BRIGHT_RATIO, _FAINT_RATIO = 1.3, 2.5
_BLOB_FACTOR = 1.3  # peaks this many times the median height are tested for clusters
_BLOB_SIGMA_FACTOR = 2.0  # ... if also this many times the threshold
_SMOOTHING = 1.0  # Gaussian of the thresholded band-pass, in spot sigmas (matched filter)
_PEAK_SMOOTHING = 0.6  # sharper Gaussian whose maxima locate spots (resolves close pairs)
_NMS_RADIUS = 1.0  # a peak must be the highest within this many spot sigmas
_CROWD_RADIUS = 8.0  # faint peaks with _CROWD_COUNT spots within this many sigmas ...
_CROWD_COUNT = 6  # ... are kept (see _add_crowded)
_AUTO_CHUNK_VOXELS = 4_194_304  # ~50 B of work per voxel: ~250 MB per chunk (and thread)
# A chunk keeps only the maxima above this share of the lowest threshold, in its own noise
# sigmas (memory: most maxima are noise). Chunked runs equal a single block unless a
# chunk's noise exceeds the image's by 1 / _CHUNK_FLOOR.
_CHUNK_FLOOR = 0.6
_AUTO_CHUNK_YX = 256


@dataclass(frozen=True)
class SpotDetection:
    """Result of :func:`detect_spots`.

    Attributes
    ----------
    table : one row per spot, columns :data:`DETECTION_SCHEMA`: ``z, y, x`` sub-voxel
        centre in voxels (``z`` = 0 for 2-D), ``intensity`` amplitude above the local
        background in image units, ``score`` in (0, 1) (0.5 at the threshold, rising
        with the peak's height in noise sigmas), ``size_voxels`` voxels of its instance
        mask (see :func:`~cellrna_pipeline.core.spots.rasterize_spots`).
    threshold_sigma : the threshold used, in noise sigmas of the band-passed image.
    noise_sigma : noise std of the band-passed image (image units).
    reference_amplitude : median amplitude of the detected spots (image units).
    n_clusters : blobs split into several spots.
    sigma_vox : spot sigma in voxels ``(z, y, x)`` (``z`` 0 for 2-D).
    n_split : spots the fit's split test divided in two.
    """

    table: pl.DataFrame
    threshold_sigma: float
    noise_sigma: float
    reference_amplitude: float
    n_clusters: int
    sigma_vox: tuple[float, float, float]
    n_split: int = 0


def as_zyx_array(image: Any) -> tuple[Any, bool]:
    """Validate a 2-D ``(y, x)`` or 3-D ``(z, y, x)`` image; 2-D gets a z axis of 1.

    Accepts numpy arrays, memory maps, zarr and dask arrays (not read here).
    Returns ``(array, is_2d)``.
    """
    shape = tuple(getattr(image, "shape", ()))
    dtype = np.dtype(getattr(image, "dtype", np.float64))
    if len(shape) not in (2, 3):
        raise InputError(
            f"image must be 2-D (y, x) or 3-D (z, y, x), got {len(shape)} dimensions {shape}"
        )
    if dtype.kind not in "uif":
        raise InputError(f"image dtype must be integer or float, got {dtype}")
    if any(s == 0 for s in shape):
        raise InputError(f"image is empty: shape {shape}")
    if min(shape[-2:]) < 3:
        raise InputError(f"image must be at least 3 x 3 in y, x, got {shape}")
    if len(shape) == 2:
        return image[None] if isinstance(image, np.ndarray) else _Expand(image), True
    return image, False


class _Expand:
    """A lazy 2-D array seen as ``(1, y, x)``."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr
        self.shape = (1, *arr.shape)
        self.dtype = arr.dtype
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        return np.asarray(self.arr[key[1:]])[None][key[0]]


def _check_finite(block: np.ndarray) -> None:
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        raise InputError("image contains NaN or inf values")


@functools.lru_cache(maxsize=32)
def _unit_response(filters: Filters) -> float:
    return filters.unit_response()


def _auto_threshold(z: np.ndarray, cfg: SpotDetectionConfig) -> float:
    n_low = int((z >= _LOW_SIGMA).sum())
    n_high = int((z >= _HIGH_SIGMA).sum())
    if n_high == 0:
        return cfg.faint_threshold_sigma
    ratio = n_low / n_high
    f = float(np.clip((_FAINT_RATIO - ratio) / (_FAINT_RATIO - _BRIGHT_RATIO), 0.0, 1.0))
    return cfg.faint_threshold_sigma + f * (cfg.bright_threshold_sigma - cfg.faint_threshold_sigma)


def _release_freed_memory() -> None:
    """Give freed heap memory back to the system: glibc keeps what the band-pass threads
    (of a chunked run) freed in their arenas, which would count as the process's memory
    for the rest of the run. A no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _chunks(shape: tuple[int, int, int], cfg: SpotDetectionConfig) -> tuple[int, int, int]:
    if cfg.chunk_shape_zyx is not None:
        return tuple(min(c, s) for c, s in zip(cfg.chunk_shape_zyx, shape, strict=True))  # type: ignore[return-value]
    if math.prod(shape) <= _AUTO_CHUNK_VOXELS:
        return shape
    yx = (min(shape[1], _AUTO_CHUNK_YX), min(shape[2], _AUTO_CHUNK_YX))
    return (min(shape[0], max(1, _AUTO_CHUNK_VOXELS // math.prod(yx))), *yx)


def _candidates(
    image: Any,
    filters: Filters,
    suppression: list[tuple[int, int, int]],
    chunks: tuple[int, int, int],
    gate_sigma: float,
    threads: int,
) -> tuple[BlockCandidates, float]:
    """Candidates of the whole image above ``gate_sigma`` (the lowest threshold any
    later step uses) noise sigmas, and the noise sigma, one block or chunk by chunk
    (a single block's band-pass on ``threads`` threads; chunks on dask's threads).

    A single block knows the image's noise; a chunk keeps the maxima above
    ``_CHUNK_FLOOR x gate_sigma`` of its own noise (so that memory does not grow with
    all the maxima of the volume) and the gate is applied once the image's noise is
    known (the result is the same)."""
    shape = tuple(int(s) for s in image.shape)
    strides = noise_strides(shape)
    if chunks == shape:
        block = np.asarray(image[:])
        _check_finite(block)
        core = tuple(slice(0, s) for s in shape)
        cand = block_candidates(
            block,
            core,  # type: ignore[arg-type]
            (0, 0, 0),
            filters,
            suppression,
            gate_sigma,
            strides,
            threads,
        )
        return cand, cand.noise

    import dask

    reach = [max([abs(o[a]) for o in suppression] + [1]) for a in range(3)]
    depth = [d + r for d, r in zip(filters.halo_depth(), reach, strict=True)]

    def run(start: tuple[int, ...]) -> BlockCandidates:
        stop = [min(b + c, s) for b, c, s in zip(start, chunks, shape, strict=True)]
        # the chunk and its halo (none beyond the volume's faces)
        lo = [max(0, b - d) for b, d in zip(start, depth, strict=True)]
        hi = [min(s, e + d) for e, d, s in zip(stop, depth, shape, strict=True)]
        block = image[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        block = block.compute(scheduler="sync") if hasattr(block, "compute") else block
        block = np.asarray(block)
        _check_finite(block)
        core = tuple(slice(b - a, e - a) for a, b, e in zip(lo, start, stop, strict=True))
        return block_candidates(
            block,
            core,  # type: ignore[arg-type]
            tuple(lo),  # type: ignore[arg-type]
            filters,
            suppression,
            _CHUNK_FLOOR * gate_sigma,
            strides,
        )

    # One task per chunk, each reading its own region: no task waits for another, so
    # memory is bounded by the chunks in flight (one per worker thread). The scheduler is
    # the caller's: local threads by default, or a dask.distributed cluster when one is
    # active (see integrations/dask.py).
    task = dask.delayed(run, pure=False, name=f"spot-candidates-{id(image)}")
    starts = itertools.product(*(range(0, s, c) for s, c in zip(shape, chunks, strict=True)))
    parts = list(dask.compute(*[task(st) for st in starts]))
    _release_freed_memory()
    noise = robust_std(np.concatenate([p.noise_sample for p in parts]))
    keep = [p.peak_value > gate_sigma * noise for p in parts]
    cand = BlockCandidates(
        peak_zyx=np.concatenate([p.peak_zyx[k] for p, k in zip(parts, keep, strict=True)]),
        peak_offset=np.concatenate([p.peak_offset[k] for p, k in zip(parts, keep, strict=True)]),
        peak_value=np.concatenate([p.peak_value[k] for p, k in zip(parts, keep, strict=True)]),
        noise_sample=np.zeros(0, np.float32),
    )
    return cand, noise


def detect_spots(
    image: Any,
    *,
    voxel_size: VoxelSize,
    config: SpotDetectionConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> SpotDetection:
    """Detect diffraction-limited spots in one 3-D (or 2-D) channel.

    Parameters
    ----------
    image : ``(z, y, x)`` or ``(y, x)`` intensities, any integer or float dtype;
        a numpy array, memory map, zarr or dask array (read chunk by chunk).
    voxel_size : physical voxel size (um); for 2-D only y and x matter.
    config : detector settings (spot radius in nm, threshold, chunking).
    progress : called with short progress messages.

    Returns
    -------
    SpotDetection with the spot table (sorted by ``z, y, x``; ``spot_id`` 1..n).

    Raises
    ------
    InputError
        Wrong number of dimensions, non-numeric dtype, NaN/inf, a spot radius that is
        not a few voxels.
    """
    cfg = config or SpotDetectionConfig()
    vol, is_2d = as_zyx_array(image)
    shape = tuple(int(s) for s in vol.shape)
    sigma = psf_sigma_vox(voxel_size, cfg.spot_radius_nm, is_2d=is_2d or shape[0] == 1)
    filters = Filters.from_sigma(sigma, cfg.background_radius, _SMOOTHING, _PEAK_SMOOTHING)
    suppression = suppression_offsets(tuple(_NMS_RADIUS * s for s in sigma))  # type: ignore[arg-type]
    chunks = _chunks(shape, cfg)  # type: ignore[arg-type]
    if progress:
        progress(
            f"band-pass and local maxima, sigma {tuple(round(s, 2) for s in sigma)} voxels, chunks {chunks}"
        )
    if cfg.threshold_sigma is not None:
        lowest = cfg.threshold_sigma
    else:
        lowest = min(cfg.faint_threshold_sigma, cfg.bright_threshold_sigma, _LOW_SIGMA)
    threads = cpu_threads()  # the result does not depend on it
    cand, noise = _candidates(vol, filters, suppression, chunks, 0.999 * lowest, threads)
    if not noise > 0:  # a constant image
        empty = pl.DataFrame(schema=DETECTION_SCHEMA)
        return SpotDetection(empty, float("inf"), 0.0, float("nan"), 0, sigma)
    z = cand.peak_value.astype(np.float64) / noise
    t_sigma = cfg.threshold_sigma if cfg.threshold_sigma is not None else _auto_threshold(z, cfg)

    keep = z >= t_sigma
    pos = cand.peak_zyx[keep].astype(np.float64) + cand.peak_offset[keep]
    unit = _unit_response(filters)
    amp = cand.peak_value[keep].astype(np.float64) / unit
    zk = z[keep]
    peaks = cand.peak_zyx[keep]
    reference = float(np.median(amp)) if len(amp) else float("nan")

    n_clusters = 0
    if cfg.decompose and len(amp) >= 3:
        pos, amp, zk, n_clusters = _decompose(
            vol,
            shape,
            peaks,
            pos,
            amp,
            zk,
            sigma=sigma,
            reference=reference,
            threshold_sigma=t_sigma,
            cfg=cfg,
            threads=threads,
        )
    floor = np.full(len(pos), t_sigma)  # each spot's threshold, in noise sigmas
    if cfg.threshold_sigma is None and len(pos):
        pos, amp, zk, floor = _add_crowded(
            cand, z, pos, amp, zk, floor, sigma=sigma, faint=cfg.faint_threshold_sigma, unit=unit
        )
    n_split = 0
    if cfg.decompose and len(pos):
        fitted = fit_spots(
            vol, pos, amp, sigma_vox=sigma, min_amplitude=floor * noise / unit, threads=threads
        )
        pos, amp, floor = fitted.zyx, fitted.amplitude, fitted.min_amplitude * unit / noise
        zk = amp * unit / noise
        n_split = fitted.n_split
    if progress:
        progress(
            f"threshold {t_sigma:.2f} sigma: {len(pos)} spots "
            f"({n_clusters} clusters decomposed, {n_split} pairs split)"
        )
    order = np.lexsort((pos[:, 2], pos[:, 1], pos[:, 0])) if len(pos) else np.zeros(0, np.int64)
    pos, amp, zk, floor = pos[order], amp[order], zk[order], floor[order]
    sizes = rasterize_spots(pos, shape, sigma_vox=sigma).sizes
    score = 1.0 / (1.0 + np.exp(-(zk - floor)))
    table = pl.DataFrame(
        {
            "spot_id": np.arange(1, len(pos) + 1, dtype=np.uint32),
            "z": pos[:, 0] if len(pos) else np.zeros(0),
            "y": pos[:, 1] if len(pos) else np.zeros(0),
            "x": pos[:, 2] if len(pos) else np.zeros(0),
            "intensity": amp,
            "score": score,
            "size_voxels": sizes.astype(np.uint32),
        },
        schema=DETECTION_SCHEMA,
    )
    return SpotDetection(table, float(t_sigma), noise, reference, n_clusters, sigma, n_split)


def _add_crowded(
    cand: BlockCandidates,
    z: np.ndarray,
    pos: np.ndarray,
    amp: np.ndarray,
    zk: np.ndarray,
    floor: np.ndarray,
    *,
    sigma: tuple[float, float, float],
    faint: float,
    unit: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Add the peaks between the faint and the image's threshold that lie where spots
    crowd: at least ``_CROWD_COUNT`` spots within ``_CROWD_RADIUS`` spot sigmas.

    The automatic threshold is set for the image as a whole; where spots crowd (a cell
    full of transcripts), a faint peak is much more likely a spot than background
    structure, which is spread over the cells. These peaks keep the faint threshold.
    """
    band = (z >= faint) & (z < floor.min())
    if not band.any():
        return pos, amp, zk, floor
    scale = np.where(np.asarray(sigma) > 0, 1.0 / np.maximum(np.asarray(sigma), 1e-9), 0.0)
    bpos = cand.peak_zyx[band].astype(np.float64) + cand.peak_offset[band]
    hits = cKDTree(pos * scale).query_ball_point(bpos * scale, _CROWD_RADIUS, return_length=True)
    crowded = np.asarray(hits) >= _CROWD_COUNT
    n = int(crowded.sum())
    return (
        np.concatenate([pos, bpos[crowded]]),
        np.concatenate([amp, cand.peak_value[band][crowded].astype(np.float64) / unit]),
        np.concatenate([zk, z[band][crowded]]),
        np.concatenate([floor, np.full(n, faint)]),
    )


def _decompose(
    vol: Any,
    shape: tuple[int, ...],
    peaks: np.ndarray,
    pos: np.ndarray,
    amp: np.ndarray,
    zk: np.ndarray,
    *,
    sigma: tuple[float, float, float],
    reference: float,
    threshold_sigma: float,
    cfg: SpotDetectionConfig,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Replace the peaks of cluster blobs by the spots each blob holds."""
    order = np.argsort(-amp, kind="stable")
    # Blobs worth testing: brighter than one spot, and far enough above the threshold that
    # their shape is measured, not guessed from noise.
    bright = order[
        (amp[order] >= _BLOB_FACTOR * reference)
        & (zk[order] >= _BLOB_SIGMA_FACTOR * threshold_sigma)
    ]
    if not len(bright):
        return pos, amp, zk, 0
    blobs = decompose_blobs(
        vol,
        peaks[bright],
        sigma_vox=sigma,
        reference_amplitude=reference,
        reference_extent=point_extent(sigma),
        extent_ratio=cfg.cluster_extent_ratio,
        threads=threads,
    )
    peak_flat = np.ravel_multi_index(tuple(peaks.T), shape)
    by_flat = np.argsort(peak_flat)
    sorted_flat = peak_flat[by_flat]
    removed = np.zeros(len(pos), dtype=bool)
    starts = np.searchsorted(blobs.spot_blob, np.arange(len(bright) + 1))
    new: list[int] = []
    # the peaks in each cluster's region
    clusters = np.unique(blobs.spot_blob)
    region_flat, owner = blobs.regions_flat(clusters)
    at = np.clip(np.searchsorted(sorted_flat, region_flat), 0, len(sorted_flat) - 1)
    found = sorted_flat[at] == region_flat
    hits, cuts = by_flat[at[found]], np.searchsorted(owner[found], np.arange(len(clusters) + 1))
    # brightest first: a blob whose peak an earlier cluster absorbed is not a blob of its own
    for j, b in enumerate(clusters):
        i = bright[b]
        if removed[i]:
            continue
        hit = hits[cuts[j] : cuts[j + 1]]
        absorbed = hit[~removed[hit]]
        if starts[b + 1] - starts[b] <= len(absorbed):
            continue  # the peaks already found account for the blob
        removed[absorbed] = True
        new.append(int(b))
    if not new:
        return pos, amp, zk, 0
    take = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in new])
    return (
        np.concatenate([pos[~removed], blobs.spots_zyx[take]]),
        np.concatenate([amp[~removed], blobs.amplitudes[take]]),
        np.concatenate([zk[~removed], zk[bright[blobs.spot_blob[take]]]]),
        len(new),
    )
