"""Band-pass filtering and local extrema of one block (the chunked part of the detector).

Everything here depends only on a bounded neighbourhood of each voxel, so a block read
with a halo of :func:`halo_depth` voxels gives, in its core, exactly the values of a
whole-volume run (``scipy.ndimage`` ``reflect`` borders apply only at the volume edges).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

GAUSS_TRUNCATE = 3.0
NOISE_STRIDE_YX = 4  # noise sample: every voxel with y % 4 == 0 and x % 4 == 0


@dataclass(frozen=True)
class Filters:
    """Filter sizes in voxels derived from the spot sigma."""

    sigma_vox: tuple[float, float, float]
    background_size: tuple[int, int, int]
    smooth_vox: tuple[float, float, float]
    peak_smooth_vox: tuple[float, float, float]

    @classmethod
    def from_sigma(
        cls,
        sigma_vox: tuple[float, float, float],
        background_radius: float,
        smoothing: float = 1.0,
        peak_smoothing: float | None = None,
    ) -> Filters:
        """Filters for spots of ``sigma_vox``.

        ``smoothing``: Gaussian of the band-pass whose values are thresholded, in spot
        sigmas (1 = the matched filter). ``peak_smoothing`` (<= ``smoothing``): a sharper
        Gaussian whose local maxima locate the spots (resolves closer pairs); ``None`` =
        the same. The background box spans ``2 x background_radius`` sigmas.
        """
        size = tuple(
            1 if s == 0 else 2 * max(1, round(background_radius * s)) + 1 for s in sigma_vox
        )
        ps = smoothing if peak_smoothing is None else min(peak_smoothing, smoothing)
        smooth = tuple(float(smoothing * s) for s in sigma_vox)
        peak = tuple(float(ps * s) for s in sigma_vox)
        return cls(
            sigma_vox=sigma_vox,
            background_size=(size[0], size[1], size[2]),
            smooth_vox=(smooth[0], smooth[1], smooth[2]),
            peak_smooth_vox=(peak[0], peak[1], peak[2]),
        )

    @property
    def _rest_vox(self) -> tuple[float, ...]:
        """Gaussian that takes the peak-finding smoothing to the thresholding one."""
        return tuple(
            float(np.sqrt(max(m * m - p * p, 0.0)))
            for m, p in zip(self.smooth_vox, self.peak_smooth_vox, strict=True)
        )

    def halo_depth(self, extra: int = 0) -> tuple[int, int, int]:
        """Voxels of context a block needs around its core for exact results."""
        return tuple(  # type: ignore[return-value]
            int(GAUSS_TRUNCATE * p + 0.5) + int(GAUSS_TRUNCATE * r + 0.5) + b // 2 + 2 + extra
            for p, r, b in zip(
                self.peak_smooth_vox, self._rest_vox, self.background_size, strict=True
            )
        )

    def _minus_background(self, smooth: np.ndarray) -> np.ndarray:
        background = smooth
        for axis, k in enumerate(self.background_size):
            background = box_mean(background, k, axis)
        return smooth - background

    def bandpass_pair(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(P, D)``: band-passes ``G(s) * I - box(G(s) * I)`` with the peak-finding
        Gaussian (``P``, whose local maxima locate spots) and the thresholding one (``D =
        G(rest) * P``, a cascade). The same array twice when both smoothings are equal.
        float32, the block's shape."""
        first = ndi.gaussian_filter(
            block.astype(np.float32, copy=False), self.peak_smooth_vox, truncate=GAUSS_TRUNCATE
        )
        rest = self._rest_vox
        if not any(r > 0 for r in rest):
            band = self._minus_background(first)
            return band, band
        # Both minus their local background (where spots crowd, the "background" is the
        # neighbouring spots, and subtracting it is what separates them). Gaussian and box
        # filters commute, so the matched band-pass is the sharp one smoothed further:
        # one box pass instead of two.
        peak_band = self._minus_background(first)
        del first
        band = ndi.gaussian_filter(peak_band, rest, truncate=GAUSS_TRUNCATE)
        return peak_band, band

    def bandpass(self, block: np.ndarray) -> np.ndarray:
        """The thresholding band-pass ``D`` (float32, the block's shape)."""
        return self.bandpass_pair(block)[1]

    def unit_response(self) -> float:
        """Band-pass peak of a unit-amplitude Gaussian spot of ``sigma_vox`` on a voxel centre."""
        half = [
            int(GAUSS_TRUNCATE * s + 0.5) + b
            for s, b in zip(self.sigma_vox, self.background_size, strict=True)
        ]
        axes = []
        for s, h in zip(self.sigma_vox, half, strict=True):
            r = np.arange(-h, h + 1, dtype=np.float64)
            axes.append(np.exp(-0.5 * (r / s) ** 2) if s > 0 else (r == 0).astype(np.float64))
        spot = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        resp = self.bandpass(spot.astype(np.float32))
        return float(resp[tuple(half)])

    def noise_gain(self) -> float:
        """Std of the band-passed image per unit std of white noise (kernel L2 norm)."""
        half = [
            int(GAUSS_TRUNCATE * s + 0.5) + b
            for s, b in zip(self.sigma_vox, self.background_size, strict=True)
        ]
        delta = np.zeros([2 * h + 1 for h in half], dtype=np.float32)
        delta[tuple(half)] = 1.0
        return float(np.sqrt((self.bandpass(delta).astype(np.float64) ** 2).sum()))


def box_mean(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Mean over ``size`` voxels along ``axis`` (``reflect`` borders, like scipy's).

    Sums of shifted views: 2-4x faster than ``ndimage.uniform_filter1d`` on the strided
    axes of a float32 volume.
    """
    if size <= 1:
        return a
    r = size // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="symmetric")  # numpy "symmetric" == scipy "reflect"
    n = a.shape[axis]

    def view(i: int) -> np.ndarray:
        return p[tuple(slice(i, i + n) if ax == axis else slice(None) for ax in range(a.ndim))]

    out = view(0).copy()
    for i in range(1, size):
        out += view(i)
    out *= np.float32(1.0 / size)
    return out


_AXIS_OFFSETS = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
_DIAGONAL_OFFSETS = [o for o in itertools.product((-1, 0, 1), repeat=3) if sum(map(abs, o)) >= 2]


def suppression_offsets(radius_vox: tuple[float, float, float]) -> list[tuple[int, int, int]]:
    """Offsets outside the 3x3x3 cube within the ellipsoid of ``radius_vox`` (0 = none)."""
    rng = [range(-int(r), int(r) + 1) for r in radius_vox]
    out: list[tuple[int, int, int]] = []
    for dz, dy, dx in itertools.product(*rng):
        o = (dz, dy, dx)
        if max(map(abs, o)) <= 1:
            continue
        if sum((v / r) ** 2 for v, r in zip(o, radius_vox, strict=True) if r > 0) <= 1.0:
            out.append(o)
    return out


def _strict(offset: tuple[int, ...]) -> bool:
    """Ties: a voxel beats an equal neighbour at a lexicographically smaller offset."""
    for o in offset:
        if o:
            return o < 0
    return False


@dataclass(frozen=True)
class BlockCandidates:
    """Local extrema of one block's core, in global voxel coordinates.

    Attributes
    ----------
    peak_zyx : ``(n, 3)`` int64 voxel of each local maximum with band-pass value > 0.
    peak_offset : ``(n, 3)`` float32 sub-voxel offset (parabola through the neighbours
        in the peak-finding band-pass).
    peak_value : ``(n,)`` float32 thresholding band-pass value at the maximum (> 0).
    noise_sample : float32 band-pass values on a fixed lattice (for the noise level).
    """

    peak_zyx: np.ndarray
    peak_offset: np.ndarray
    peak_value: np.ndarray
    noise_sample: np.ndarray


def _extrema(
    padded: np.ndarray,
    core: tuple[slice, ...],
    sign: float,
    extra: list[tuple[int, int, int]],
    gate: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """26-connected strict local maxima of ``sign * padded`` inside ``core``, among the
    voxels where ``gate`` (core-shaped bool) is set, by default where the value is > 0.

    Returns local coordinates (in ``padded``), values (times ``sign``) and, for maxima,
    the 6 axis neighbours (for the sub-voxel fit).
    """
    a = padded if sign > 0 else -padded
    c = a[core]
    mask = c > 0 if gate is None else gate.copy()
    tmp = np.empty_like(mask)
    for off in _AXIS_OFFSETS:
        for s in (1, -1):
            o = tuple(s * v for v in off)
            nb = a[tuple(slice(sl.start + d, sl.stop + d) for sl, d in zip(core, o, strict=True))]
            (np.greater if _strict(o) else np.greater_equal)(c, nb, out=tmp)
            mask &= tmp
    idx = np.nonzero(mask)
    zyx = np.stack(idx, axis=1) + np.array([sl.start for sl in core])
    flat = np.ravel_multi_index(tuple(zyx.T), a.shape)
    values = a.ravel()[flat]
    keep = np.ones(len(flat), dtype=bool)
    strides = np.array([a.shape[1] * a.shape[2], a.shape[2], 1])
    av = a.ravel()
    for diag in _DIAGONAL_OFFSETS:
        nb = av[flat + int(np.dot(diag, strides))]
        keep &= values > nb if _strict(diag) else values >= nb
    zyx, flat, values = zyx[keep], flat[keep], values[keep]
    keep = np.ones(len(flat), dtype=bool)
    if extra:
        # Non-maximum suppression over the spot's footprint (coordinates clipped at the
        # array border: the halo covers the footprint, so clipping only hits volume edges).
        hi = np.array(a.shape) - 1
        for ext in extra:
            nzyx = np.clip(zyx + np.asarray(ext), 0, hi)
            nb = av[np.ravel_multi_index(tuple(nzyx.T), a.shape)]
            keep &= values > nb if _strict(ext) else values >= nb
    zyx, flat, values = zyx[keep], flat[keep], values[keep]
    neighbours = np.stack(
        [av[flat - int(st)] for st in strides] + [av[flat + int(st)] for st in strides], axis=1
    )
    return zyx, values, neighbours


def block_candidates(
    block: np.ndarray,
    core: tuple[slice, slice, slice],
    origin: tuple[int, int, int],
    filters: Filters,
    suppression: list[tuple[int, int, int]] | None = None,
) -> BlockCandidates:
    """Band-pass ``block`` and return the extrema of its ``core``.

    Parameters
    ----------
    block : ``(z, y, x)`` image block including its halo (any real dtype).
    core : slices of ``block`` whose extrema are reported.
    origin : global voxel coordinate of ``block[0, 0, 0]``.
    filters : filter sizes.
    """
    peak_band, band = filters.bandpass_pair(block)
    padded = np.pad(peak_band, 1, mode="constant", constant_values=-np.inf)
    core_p = tuple(slice(s.start + 1, s.stop + 1) for s in core)
    # Candidates: where the thresholding band-pass is positive (above the local background).
    zyx, peak_values, nb = _extrema(padded, core_p, 1.0, suppression or [], gate=band[core] > 0)
    # Parabola through (-1, 0, +1) along each axis; none at the volume edge (inf neighbour).
    minus, plus = nb[:, :3], nb[:, 3:]
    curv = minus - 2.0 * peak_values[:, None] + plus
    with np.errstate(invalid="ignore", divide="ignore"):
        offset = np.where(
            np.isfinite(minus) & np.isfinite(plus) & (curv < 0),
            0.5 * (minus - plus) / curv,
            0.0,
        )
    offset = np.clip(offset, -0.49, 0.49).astype(np.float32)  # rounding gives the voxel back
    # The peak's strength: the thresholding (matched) band-pass at the same voxel.
    values = band[tuple((zyx - 1).T)] if band is not peak_band else peak_values
    g = np.asarray(origin) - 1  # padded local -> global
    sample_core = band[core]
    oy = (-(origin[1] + core[1].start)) % NOISE_STRIDE_YX
    ox = (-(origin[2] + core[2].start)) % NOISE_STRIDE_YX
    sample = sample_core[:, oy::NOISE_STRIDE_YX, ox::NOISE_STRIDE_YX].ravel()
    return BlockCandidates(
        peak_zyx=(zyx + g).astype(np.int64),
        peak_offset=offset,
        peak_value=values.astype(np.float32),
        noise_sample=sample.astype(np.float32),
    )
