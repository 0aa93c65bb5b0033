"""Dense-cluster decomposition: a blob wider than one spot becomes as many spots as it holds.

A bright blob is either one bright spot (a transcription site: point-like, so as wide as
the PSF) or several spots closer than the PSF (a cluster: wider than the PSF). The blob's
spread (intensity-weighted second moments above 30 % of its peak, in units of the spot
sigma) tells them apart; a cluster's spot count is its integrated intensity over that of
the reference single spot, and the spots are placed by matching pursuit (repeatedly take
the brightest point of the residual and subtract one reference spot there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Blob", "decompose_blob", "point_extent"]

_REGION_LEVEL = 0.3  # blob = voxels connected to the peak above 30 % of its height
_MASS_LEVEL = 0.3  # mass counted above 30 % of a reference spot's height
_MAX_SPOTS_PER_BLOB = 60
_EXTENT_RADIUS = 2.5  # spread measured within this many sigmas of the peak
_MASS_RADIUS = 4.0  # a cluster's spots are looked for within this many sigmas
_STOP_LEVEL = 0.5


@dataclass(frozen=True)
class Blob:
    """Result of :func:`decompose_blob`.

    Attributes
    ----------
    extent : spread of the blob over that of a single spot (1 = point-like).
    spots_zyx : ``(n, 3)`` float64 global sub-voxel positions of the spots it holds
        (empty when the blob is point-like: keep the original peak).
    amplitudes : ``(n,)`` float64 amplitude of each spot (counts above background).
    region_zyx : ``(m, 3)`` int64 global voxels of a cluster (to absorb the other peaks in
        it); just the peak for a point-like blob.
    """

    extent: float
    spots_zyx: np.ndarray
    amplitudes: np.ndarray
    region_zyx: np.ndarray


def _gauss_axes(shape: tuple[int, ...], centre: np.ndarray, sigma: np.ndarray) -> list[np.ndarray]:
    out = []
    for n, c, s in zip(shape, centre, sigma, strict=True):
        r = np.arange(n, dtype=np.float64) - c
        out.append(np.exp(-0.5 * (r / s) ** 2) if s > 0 else (np.abs(r) < 0.5).astype(np.float64))
    return out


def _moment_extent(values: np.ndarray, mask: np.ndarray, sigma: np.ndarray) -> float:
    """Largest principal variance of the intensity-weighted voxels, in sigma units.

    A pair of spots stretches the blob along one direction only, so the largest
    eigenvalue of the covariance responds to it more than the summed variance does.
    """
    idx = np.nonzero(mask)
    w = values[idx].astype(np.float64)
    total = w.sum()
    if total <= 0:
        return 0.0
    axes = [a for a, s in enumerate(sigma) if s > 0]
    coords = np.stack([idx[a].astype(np.float64) / sigma[a] for a in axes])
    mean = (coords * w).sum(axis=1, keepdims=True) / total
    d = coords - mean
    cov = (d * w) @ d.T / total
    return float(np.linalg.eigvalsh(np.atleast_2d(cov))[-1])


def _smooth_sigma(sigma: np.ndarray) -> tuple[float, ...]:
    return tuple(float(s) for s in sigma)


def point_extent(sigma_vox: tuple[float, float, float]) -> float:
    """:func:`_moment_extent` of one smoothed spot on a voxel centre (the reference)."""
    sigma = np.asarray(sigma_vox, dtype=np.float64)
    half = [max(1, int(np.ceil(5 * s))) for s in sigma]
    shape = tuple(2 * h + 1 for h in half)
    ax = _gauss_axes(shape, np.asarray(half, dtype=np.float64), sigma)
    spot = ax[0][:, None, None] * ax[1][None, :, None] * ax[2][None, None, :]
    sm = ndi.gaussian_filter(spot, _smooth_sigma(sigma), truncate=3.0)
    ball = _ball(sm.shape, tuple(half), sigma, _EXTENT_RADIUS)
    region = _peak_region(sm, tuple(half), _REGION_LEVEL * sm[tuple(half)], ball)
    return _moment_extent(sm, region, sigma)


def _ball(
    shape: tuple[int, ...], centre: tuple[int, ...], sigma: np.ndarray, radius: float
) -> np.ndarray:
    """Voxels within ``radius`` sigmas (normalized distance) of ``centre`` (read-only)."""
    return _ball_cached(
        tuple(int(v) for v in shape),
        tuple(int(v) for v in centre),
        tuple(float(v) for v in sigma),
        float(radius),
    )


@functools.lru_cache(maxsize=256)
def _ball_cached(
    shape: tuple[int, ...], centre: tuple[int, ...], sigma: tuple[float, ...], radius: float
) -> np.ndarray:
    d2 = np.zeros(shape)
    for axis, (n, c, s) in enumerate(zip(shape, centre, sigma, strict=True)):
        if s <= 0:
            continue
        r = (np.arange(n) - c) / s
        d2 = d2 + (r**2).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    ball = d2 <= radius * radius
    ball.flags.writeable = False
    return ball


def _peak_region(
    values: np.ndarray, peak: tuple[int, ...], level: float, within: np.ndarray | None = None
) -> np.ndarray:
    above = values > level
    if within is not None:
        above &= within
    labels, _ = ndi.label(above)
    lab = labels[peak]
    if lab == 0:
        out = np.zeros(values.shape, dtype=bool)
        out[peak] = True
        return out
    return labels == lab


def decompose_blob(
    read: Callable[[tuple[slice, ...]], np.ndarray],
    shape_zyx: tuple[int, int, int],
    peak_zyx: np.ndarray,
    *,
    sigma_vox: tuple[float, float, float],
    reference_amplitude: float,
    reference_extent: float,
    extent_ratio: float,
) -> Blob:
    """Decide whether the blob at ``peak_zyx`` is one spot or a cluster, and split it.

    Parameters
    ----------
    read : returns the image (float32-castable) for a tuple of global ``zyx`` slices.
    shape_zyx : image shape.
    peak_zyx : ``(3,)`` int voxel of the blob's peak.
    sigma_vox : spot sigma in voxels (``z`` 0 for 2-D).
    reference_amplitude : amplitude (counts above background) of a typical single spot.
    reference_extent : :func:`point_extent` for ``sigma_vox``.
    extent_ratio : clusters are blobs whose extent exceeds the reference by this factor.
    """
    sigma = np.asarray(sigma_vox, dtype=np.float64)
    half = np.array([0 if s == 0 else max(2, int(np.ceil(5 * s)) + 1) for s in sigma])
    margin = np.array([0 if s == 0 else int(np.ceil(3 * s)) for s in sigma])
    lo = np.maximum(peak_zyx - half - margin, 0)
    hi = np.minimum(peak_zyx + half + margin + 1, shape_zyx)
    raw = np.asarray(
        read(tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))), dtype=np.float32
    )
    smooth = ndi.gaussian_filter(raw, _smooth_sigma(sigma), truncate=3.0)
    # Crop the margin away (kept only so that smoothing near the window edge is right).
    wlo = np.maximum(peak_zyx - half, 0) - lo
    whi = np.minimum(peak_zyx + half + 1, shape_zyx) - lo
    crop = tuple(slice(int(a), int(b)) for a, b in zip(wlo, whi, strict=True))
    smooth, raw = smooth[crop], raw[crop]
    origin = lo + wlo
    # Background: the median of the planes around the peak (a window that reaches below
    # a cell's bottom or above its top would mix in the darker medium).
    local_z = int(peak_zyx[0] - origin[0])
    dz = max(1, round(float(sigma[0])))
    background = float(np.median(smooth[max(0, local_z - dz) : local_z + dz + 1]))
    smooth = smooth - background
    rawbg = raw - background
    local_peak = tuple(int(v) for v in (peak_zyx - origin))
    height = float(smooth[local_peak])
    empty = np.zeros((0, 3))
    if height <= 0:
        return Blob(1.0, empty, np.zeros(0), np.asarray([peak_zyx]))
    region = _peak_region(
        smooth,
        local_peak,
        _REGION_LEVEL * height,
        _ball(smooth.shape, local_peak, sigma, _EXTENT_RADIUS),
    )
    extent = _moment_extent(smooth, region, sigma) / max(reference_extent, 1e-9)
    if extent < extent_ratio:
        return Blob(extent, empty, np.zeros(0), np.asarray([peak_zyx]))

    # A cluster: count spots from the integrated intensity.
    unit_smooth = float(np.prod([1.0 / np.sqrt(2.0) for s in sigma if s > 0]))
    ref_height = reference_amplitude * unit_smooth
    mass_region = _peak_region(
        smooth,
        local_peak,
        _MASS_LEVEL * ref_height,
        _ball(smooth.shape, local_peak, sigma, _MASS_RADIUS),
    )
    mass = float(rawbg[mass_region].sum())  # unclipped: noise averages out
    unit_mass = float(np.prod([np.sqrt(2 * np.pi) * s for s in sigma if s > 0]))
    n = int(np.clip(round(mass / (reference_amplitude * unit_mass)), 1, _MAX_SPOTS_PER_BLOB))
    # Matching pursuit on the smoothed residual: one reference spot (smoothed) per step.
    residual = np.where(mass_region, smooth, -np.inf).astype(np.float64)
    smooth_sigma = np.sqrt(2.0) * sigma
    spots, taken = [], np.zeros(residual.shape, dtype=bool)
    for _ in range(n):
        masked = np.where(taken, -np.inf, residual)
        k = np.unravel_index(int(np.argmax(masked)), masked.shape)
        # Stop when what is left is less than half a reference spot (CLEAN's criterion).
        if not masked[k] >= _STOP_LEVEL * ref_height:
            break
        pos = np.asarray(k, dtype=np.float64)
        for axis in range(3):  # parabolic sub-voxel refinement on the residual
            if sigma[axis] == 0 or not 0 < k[axis] < residual.shape[axis] - 1:
                continue
            idx = list(k)
            idx[axis] -= 1
            a = residual[tuple(idx)]
            idx[axis] += 2
            b = residual[tuple(idx)]
            c = residual[k]
            curv = a - 2 * c + b
            if np.isfinite(curv) and curv < 0:
                pos[axis] += float(np.clip(0.5 * (a - b) / curv, -0.49, 0.49))
        spots.append(pos)
        taken[k] = True
        ax = _gauss_axes(residual.shape, pos, smooth_sigma)
        residual -= ref_height * (
            ax[0][:, None, None] * ax[1][None, :, None] * ax[2][None, None, :]
        )
    if not spots:
        return Blob(extent, empty, np.zeros(0), np.asarray([peak_zyx]))
    zyx = np.asarray(spots) + origin
    amp = np.full(len(zyx), mass / unit_mass / len(zyx))
    return Blob(extent, zyx, amp, np.argwhere(mass_region) + origin)
