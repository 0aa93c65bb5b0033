"""Dense-cluster decomposition: a blob wider than one spot becomes as many spots as it holds.

A bright blob is either one bright spot (a transcription site: point-like, so as wide as
the PSF) or several spots closer than the PSF (a cluster: wider than the PSF). The blob's
spread (intensity-weighted second moments above 30 % of its peak, in units of the spot
sigma) tells them apart; a cluster's spot count is its integrated intensity over that of
the reference single spot, and the spots are placed by matching pursuit (repeatedly take
the brightest point of the residual and subtract one reference spot there).

All blobs of an image are processed together: their windows are stacked into one
``(blobs, z, y, x)`` array and every step is one array operation over the stack.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellrna_pipeline.core.spots import _kernels as _k
from cellrna_pipeline.core.spots._threads import pieces, thread_map
from cellrna_pipeline.core.spots.fit import gather

__all__ = ["Blobs", "decompose_blobs", "point_extent"]

_REGION_LEVEL = 0.3  # blob = voxels connected to the peak above 30 % of its height
_MASS_LEVEL = 0.3  # mass counted above 30 % of a reference spot's height
_MAX_SPOTS_PER_BLOB = 60
_EXTENT_RADIUS = 2.5  # spread measured within this many sigmas of the peak
_MASS_RADIUS = 4.0  # a cluster's spots are looked for within this many sigmas
_STOP_LEVEL = 0.5
_HALF_SIGMAS = 5.0  # window: +-(5 sigma + 1) around the peak ...
_MARGIN_SIGMAS = 3.0  # ... read with a margin of 3 sigma for the smoothing
_BATCH_BLOBS = 256  # blobs processed together (memory: their windows), at most ...
_MIN_BATCH_BLOBS = 64  # ... and at least, when they are spread over threads
_PAD_VOXELS = 8_000_000  # in-memory images up to this size are mirrored whole, once


@dataclass(frozen=True)
class Blobs:
    """Result of :func:`decompose_blobs` for ``nb`` blobs.

    Attributes
    ----------
    extent : ``(nb,)`` spread of each blob over that of a single spot (1 = point-like).
    spots_zyx : ``(m, 3)`` float64 global sub-voxel positions of the spots of the
        clusters (none for point-like blobs), grouped by blob.
    spot_blob : ``(m,)`` int64 blob of each spot.
    amplitudes : ``(m,)`` float64 amplitude of each spot (counts above background).
    """

    extent: np.ndarray
    spots_zyx: np.ndarray
    spot_blob: np.ndarray
    amplitudes: np.ndarray
    _mass: np.ndarray  # (nb, kz, ky, kx) bool mass region of each cluster
    _origin: np.ndarray  # (nb, 3) global voxel of each window's [0, 0, 0]
    _shape: tuple[int, int, int]

    def regions_flat(self, blobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat global indices of the voxels of the clusters ``blobs`` (their mass
        regions), and for each voxel its position in ``blobs`` (ascending)."""
        local = np.argwhere(self._mass[blobs])
        zyx = local[:, 1:] + self._origin[blobs[local[:, 0]]]
        inside = np.all((zyx >= 0) & (zyx < np.asarray(self._shape)), axis=1)
        return np.ravel_multi_index(tuple(zyx[inside].T), self._shape), local[inside, 0]


def _grid(sigma: np.ndarray, radius_sigmas: float, extra: int) -> np.ndarray:
    return np.array(
        [0 if s == 0 else max(2, int(np.ceil(radius_sigmas * s)) + extra) for s in sigma]
    )


def _margin(sigma: np.ndarray) -> np.ndarray:
    """Voxels read beyond a window for the smoothing."""
    return np.array([0 if s == 0 else int(np.ceil(_MARGIN_SIGMAS * s)) for s in sigma])


def _reach(sigma: np.ndarray) -> np.ndarray:
    """Half-size of a blob's window with its margin, per axis (voxels)."""
    return _grid(sigma, _HALF_SIGMAS, 1) + _margin(sigma)


@functools.lru_cache(maxsize=32)
def _gaussian_weights(sigma: float) -> np.ndarray:
    """``ndimage.gaussian_filter1d``'s weights for ``sigma`` (truncated at 3 sigma)."""
    radius = int(3.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / (sigma * sigma) * x**2)
    return w / w.sum()


def _row_nanmedian(x: np.ndarray) -> np.ndarray:
    """``np.nanmedian(x, axis=1)`` of a 2-D array (the same values; a sort per row,
    much faster than numpy's masked-array path when rows hold NaNs)."""
    s = np.sort(x, axis=1)  # NaNs last
    count = (~np.isnan(x)).sum(axis=1)
    r = np.arange(len(x))
    mid = (s[r, np.maximum(count - 1, 0) // 2] + s[r, count // 2]) / x.dtype.type(2)
    return np.where(count > 0, mid, np.nan)


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """scipy's ``reflect`` boundary (``d c b a | a b c d | d c b a``) as indices."""
    i = np.mod(i, 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def _balls(
    shape: tuple[int, ...], centre: np.ndarray, sigma: np.ndarray, radius: float
) -> np.ndarray:
    """Voxels of a ``(kz, ky, kx)`` window within ``radius`` sigmas of ``centre``."""
    d2 = np.zeros(shape)
    for axis, (n, c, s) in enumerate(zip(shape, centre, sigma, strict=True)):
        if s <= 0:
            continue
        r = ((np.arange(n) - c) / s) ** 2
        d2 = d2 + r.reshape([-1 if a == axis else 1 for a in range(3)])
    return d2 <= radius * radius


def _connected_to_centre(mask: np.ndarray, centre: tuple[int, ...]) -> np.ndarray:
    """Per blob, the component of ``mask`` ``(nb, kz, ky, kx)`` holding ``centre``
    (26-connected within a blob, never across blobs)."""
    out = _k.connected_to_centre(np.ascontiguousarray(mask), centre)
    out[:, centre[0], centre[1], centre[2]] = True  # an empty blob keeps its peak
    return out


def _extents(smooth: np.ndarray, region: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Largest principal variance (sigma units) of each blob's intensity-weighted region.

    A pair of spots stretches a blob along one direction only, so the largest
    eigenvalue of the covariance responds to it more than the summed variance does.
    """
    nb = len(smooth)
    w = (smooth * region).reshape(nb, -1).astype(np.float64)
    total = w.sum(axis=1)
    axes = [a for a in range(3) if sigma[a] > 0]
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in smooth.shape[1:]], indexing="ij")
    coords = np.stack([grids[a].ravel() / sigma[a] for a in axes])  # (d, k)
    safe = np.where(total > 0, total, 1.0)
    mean = np.einsum("nk,dk->nd", w, coords) / safe[:, None]  # (nb, d); no BLAS threads
    second = np.einsum("nk,ik,jk->nij", w, coords, coords) / safe[:, None, None]
    cov = second - mean[:, :, None] * mean[:, None, :]
    if cov.shape[1] < 3:  # 2-D: the z row and column are 0 (the covariance is >= 0)
        cov = np.pad(cov, [(0, 0), (3 - cov.shape[1], 0), (3 - cov.shape[1], 0)])
    out = _k.principal_axes(np.ascontiguousarray(cov))[0]
    return np.where(total > 0, out, 0.0)


def decompose_blobs(
    vol: Any,
    peaks_zyx: np.ndarray,
    *,
    sigma_vox: tuple[float, float, float],
    reference_amplitude: float,
    reference_extent: float,
    extent_ratio: float,
    threads: int = 1,
) -> Blobs:
    """Decide for each blob whether it is one spot or a cluster, and split the clusters.

    Parameters
    ----------
    vol : ``(z, y, x)`` image (numpy, memory map, zarr or dask; read point-wise).
    peaks_zyx : ``(nb, 3)`` int voxels of the blobs' peaks.
    sigma_vox : spot sigma in voxels (``z`` 0 for 2-D).
    reference_amplitude : amplitude (counts above background) of a typical single spot.
    reference_extent : :func:`point_extent` for ``sigma_vox``.
    extent_ratio : clusters are blobs whose extent exceeds the reference by this factor.
    threads : batches of blobs are decomposed on this many threads (each blob on its own:
        the result does not depend on it).
    """
    peaks = np.asarray(peaks_zyx, dtype=np.int64).reshape(-1, 3)
    args = (sigma_vox, reference_amplitude, reference_extent, extent_ratio)
    # batches of neighbouring blobs (a lazy volume is read where they are), in position order
    order = np.lexsort(peaks.T[::-1])
    windows = None
    if type(vol) is np.ndarray and vol.size <= _PAD_VOXELS:
        # in memory: windows of the volume mirrored once at its faces (as _reflect does)
        reach = _reach(np.asarray(sigma_vox, dtype=np.float64))
        padded = np.pad(vol, [(int(r), int(r)) for r in reach], mode="symmetric")
        windows = np.lib.stride_tricks.sliding_window_view(padded, tuple(2 * reach + 1))
    parts = thread_map(
        _decompose_batch,
        [
            (vol, peaks[order[a:b]], *args, windows)
            for a, b in pieces(max(len(peaks), 1), threads, _MIN_BATCH_BLOBS, _BATCH_BLOBS)
        ],
        threads,
    )
    first = np.cumsum([0] + [len(p.extent) for p in parts[:-1]])
    blob = order[np.concatenate([p.spot_blob + f for p, f in zip(parts, first, strict=True)])]
    by_blob = np.argsort(blob, kind="stable")  # spots grouped by blob, in blob order
    back = np.argsort(order)
    return Blobs(
        np.concatenate([p.extent for p in parts])[back],
        np.concatenate([p.spots_zyx for p in parts])[by_blob],
        blob[by_blob],
        np.concatenate([p.amplitudes for p in parts])[by_blob],
        np.concatenate([p._mass for p in parts])[back],
        np.concatenate([p._origin for p in parts])[back],
        parts[0]._shape,
    )


def _decompose_batch(
    vol: Any,
    peaks: np.ndarray,
    sigma_vox: tuple[float, float, float],
    reference_amplitude: float,
    reference_extent: float,
    extent_ratio: float,
    windows: np.ndarray | None = None,
) -> Blobs:
    """:func:`decompose_blobs` for one batch of blobs (their windows stacked);
    ``windows``: the sliding windows of the mirrored volume when it is in memory."""
    shape: tuple[int, int, int] = tuple(int(s) for s in vol.shape)  # type: ignore[assignment]
    sigma = np.asarray(sigma_vox, dtype=np.float64)
    nb = len(peaks)
    half = _grid(sigma, _HALF_SIGMAS, 1)
    margin = _margin(sigma)
    reach = half + margin
    size = tuple(int(v) for v in 2 * reach + 1)
    # windows (with margin) read point-wise, reflected at the volume's faces
    idx = []
    inside = np.ones((nb, 1, 1, 1), dtype=bool)
    for a in range(3):
        v = peaks[:, a, None] + np.arange(-reach[a], reach[a] + 1)[None]
        sh = [nb, 1, 1, 1]
        sh[a + 1] = size[a]
        inside = inside & ((v >= 0) & (v < shape[a])).reshape(sh)
        idx.append(np.broadcast_to(_reflect(v, shape[a]).reshape(sh), (nb, *size)))
    if windows is not None:
        raw = windows[peaks[:, 0], peaks[:, 1], peaks[:, 2]].astype(np.float32)
    else:
        raw = gather(vol, np.stack([i.ravel() for i in idx], axis=1)).reshape(nb, *size)
        raw = raw.astype(np.float32)
    crop = (
        slice(None),
        *(slice(int(m), int(m + 2 * h + 1)) for m, h in zip(margin, half, strict=True)),
    )
    # Gaussian smoothing, axis by axis, each axis cropped to the window once its pass is
    # done (the margin serves only that pass: the same values as smoothing the whole
    # window, less work)
    smooth = raw
    for a, s in enumerate(sigma):
        if s > 0:  # ndimage.gaussian_filter1d (truncate 3), only where the crop keeps it
            dims = smooth.shape
            line = np.ascontiguousarray(smooth).reshape(
                int(np.prod(dims[: a + 1])), dims[a + 1], -1
            )
            keep = crop[a + 1]
            smooth = _k.correlate_crop(
                line, _gaussian_weights(float(s)), keep.start, keep.stop - keep.start
            ).reshape(*dims[: a + 1], keep.stop - keep.start, *dims[a + 2 :])
        else:
            smooth = smooth[tuple(crop[a + 1] if d == a + 1 else slice(None) for d in range(4))]
    # mirrored voxels beyond the volume's faces only serve the smoothing
    raw, inside = raw[crop], np.broadcast_to(inside, (nb, *size))[crop]
    kshape = smooth.shape[1:]
    centre = tuple(int(h) for h in half)
    # background: the median of the planes around the peak (a window reaching below a
    # cell's bottom or above its top would mix in the darker medium)
    dz = max(1, round(float(sigma[0]))) if sigma[0] > 0 else 0
    zs = slice(max(0, centre[0] - dz), centre[0] + dz + 1)
    planes = np.where(inside[:, zs], smooth[:, zs], np.nan).reshape(nb, -1)
    background = _row_nanmedian(planes)[:, None, None, None]
    smooth = smooth - background
    rawbg = raw - background
    height = smooth[(slice(None), *centre)]
    ok = height > 0
    level = (_REGION_LEVEL * np.maximum(height, 0))[:, None, None, None]
    ball = _balls(kshape, np.asarray(centre), sigma, _EXTENT_RADIUS)
    region = _connected_to_centre(
        (smooth > level) & ball & inside & ok[:, None, None, None], centre
    )
    extent = np.where(ok, _extents(smooth, region, sigma) / max(reference_extent, 1e-9), 1.0)
    cluster = ok & (extent >= extent_ratio)

    origin = peaks - half
    mass_region = np.zeros((nb, *kshape), dtype=bool)
    empty = Blobs(
        extent, np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0), mass_region, origin, shape
    )
    if not cluster.any():
        return empty
    ci = np.flatnonzero(cluster)
    unit_smooth = float(np.prod([1.0 / np.sqrt(2.0) for s in sigma if s > 0]))
    ref_height = reference_amplitude * unit_smooth
    sm = smooth[ci]
    mass_ball = _balls(kshape, np.asarray(centre), sigma, _MASS_RADIUS)
    mass = _connected_to_centre((sm > _MASS_LEVEL * ref_height) & mass_ball & inside[ci], centre)
    mass_region[ci] = mass
    flux = (rawbg[ci] * mass).reshape(len(ci), -1).sum(axis=1)  # unclipped: noise averages out
    unit_mass = float(np.prod([np.sqrt(2 * np.pi) * s for s in sigma if s > 0]))
    n = np.clip(np.rint(flux / (reference_amplitude * unit_mass)), 1, _MAX_SPOTS_PER_BLOB).astype(
        int
    )
    # up to n spots per window (CLEAN): the brightest voxel, refined to sub-voxel, minus a
    # reference spot there (smoothed: sigma sqrt 2), until half a reference spot is left
    spots, owner = _k.matching_pursuit(
        np.where(mass, sm, -np.inf).astype(np.float64), n, sigma, ref_height, _STOP_LEVEL
    )
    if not len(spots):
        return Blobs(
            extent, np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0), mass_region, origin, shape
        )
    blob = ci[owner]
    counts = np.bincount(owner, minlength=len(ci))
    amps = flux[owner] / unit_mass / counts[owner]
    return Blobs(extent, spots + origin[blob], blob, amps, mass_region, origin, shape)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=32)
def point_extent(sigma_vox: tuple[float, float, float]) -> float:
    """The extent measure of one noise-free spot on a voxel centre (the reference)."""
    sigma = np.asarray(sigma_vox, dtype=np.float64)
    half = _reach(sigma)
    shape = tuple(int(v) for v in 2 * half + 1)
    spot = np.ones(shape)
    for axis, (n, s) in enumerate(zip(shape, sigma, strict=True)):
        r = np.arange(n) - half[axis]
        f = np.exp(-0.5 * (r / s) ** 2) if s > 0 else (r == 0).astype(np.float64)
        spot = spot * f.reshape([-1 if a == axis else 1 for a in range(3)])
    blobs = decompose_blobs(
        spot,
        half[None],
        sigma_vox=sigma_vox,
        reference_amplitude=1.0,
        reference_extent=1.0,
        extent_ratio=np.inf,
    )
    return float(blobs.extent[0])
