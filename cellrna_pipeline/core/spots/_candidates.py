"""Band-pass filtering and local extrema of one block (the chunked part of the detector).

Everything here depends only on a bounded neighbourhood of each voxel, so a block read
with a halo of :func:`halo_depth` voxels gives, in its core, exactly the values of a
whole-volume run (mirrored, as ``scipy.ndimage``'s ``reflect`` mode does, only at the
volume edges). The filter passes are numba loops (:mod:`._kernels`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cellrna_pipeline.core.spots import _kernels as _k
from cellrna_pipeline.core.spots._threads import pieces, thread_map

GAUSS_TRUNCATE = 3.0
NOISE_STRIDE_YX = 4  # noise sample: every voxel with y % 4 == 0 and x % 4 == 0 ...
NOISE_SAMPLE_MAX = 4_000_000  # ... thinned (see noise_strides) to at most this many values
_MIN_SLAB_PLANES = 4  # a band-pass pass goes to threads in slabs of at least this many planes


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

    def bandpass_pair(self, block: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(P, D)``: band-passes ``G(s) * I - box(G(s) * I)`` with the peak-finding
        Gaussian (``P``, whose local maxima locate spots) and the thresholding one (``D =
        G(rest) * P``, a cascade: Gaussian and box filters commute). float32, the block's
        shape.

        Both are minus their local background: where spots crowd, the "background" is
        the neighbouring spots, and subtracting it is what separates them. The block is
        mirrored once at its faces (scipy's ``reflect``; every kernel is symmetric, so
        this equals mirroring before each pass) and every pass keeps only the voxels its
        kernel fully covers. Each pass's planes are spread over ``threads`` threads.
        """
        peak = [_gauss_kernel(s) for s in self.peak_smooth_vox]
        rest = [_gauss_kernel(s) for s in self._rest_vox]
        rr = [len(k) // 2 for k in rest]
        rb = [b // 2 for b in self.background_size]
        pad = [len(k) // 2 + b + r for k, b, r in zip(peak, rb, rr, strict=True)]
        x = np.pad(block.astype(np.float32, copy=False), [(p, p) for p in pad], mode="symmetric")
        x = _separable(x, peak, False, threads)
        box = [np.full(b, 1.0 / b, dtype=np.float32) for b in self.background_size]
        background = _separable(x, box, True, threads)
        peak_band = x[tuple(slice(b, x.shape[a] - b) for a, b in enumerate(rb))] - background
        band = _separable(peak_band, rest, False, threads)
        core = tuple(slice(r, peak_band.shape[a] - r) for a, r in enumerate(rr))
        return peak_band[core], band

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


def _separable(a: np.ndarray, w: list[np.ndarray], box: bool, threads: int) -> np.ndarray:
    """:func:`._kernels.separable_valid` of ``a`` with the kernels ``w`` ``(z, y, x)``,
    slabs of output planes on ``threads`` threads (each plane on its own: the same
    values for any thread count)."""
    r = [len(k) // 2 for k in w]
    out = np.empty(tuple(n - 2 * h for n, h in zip(a.shape, r, strict=True)), np.float32)
    a = np.ascontiguousarray(a)
    thread_map(
        _k.separable_valid,
        [
            (a[z0 : z1 + 2 * r[0]], w[0], w[1], w[2], box, out[z0:z1])
            for z0, z1 in pieces(len(out), threads, _MIN_SLAB_PLANES, len(out) or 1)
        ],
        threads,
    )
    return out


def _gauss_kernel(sigma: float) -> np.ndarray:
    """Normalized Gaussian weights (float32) truncated at ``GAUSS_TRUNCATE`` sigmas."""
    radius = int(GAUSS_TRUNCATE * sigma + 0.5) if sigma > 0 else 0
    if radius == 0:
        return np.ones(1, dtype=np.float32)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


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
    noise_sample : float32 band-pass values on a fixed lattice (:func:`noise_strides`),
        for the noise level.
    noise : :func:`robust_std` of ``noise_sample`` (the block's noise level).
    """

    peak_zyx: np.ndarray
    peak_offset: np.ndarray
    peak_value: np.ndarray
    noise_sample: np.ndarray
    noise: float = float("nan")


def _extrema(
    a: np.ndarray,
    core: tuple[slice, ...],
    extra: list[tuple[int, int, int]],
    gate: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """26-connected strict local maxima of ``a`` (padded by one voxel of ``-inf``) inside
    ``core``, among the voxels where ``gate`` (core-shaped bool) is set.

    Returns local coordinates (in ``a``), values and the 6 axis neighbours (for the
    sub-voxel fit).
    """
    offsets = list(_AXIS_OFFSETS) + [tuple(-v for v in o) for o in _AXIS_OFFSETS]
    if gate.mean() > 0.05:
        # a wide gate: axis neighbours as whole-array comparisons first
        c = a[core]
        mask = gate.copy()
        tmp = np.empty_like(mask)
        for o in offsets:
            nb = a[tuple(slice(sl.start + d, sl.stop + d) for sl, d in zip(core, o, strict=True))]
            (np.greater if _strict(o) else np.greater_equal)(c, nb, out=tmp)
            mask &= tmp
        gate, offsets = mask, []
    zyx = np.stack(np.unravel_index(np.flatnonzero(gate), gate.shape), axis=1)
    zyx += np.array([sl.start for sl in core])
    flat = np.ravel_multi_index(tuple(zyx.T), a.shape)
    av = a.ravel()
    values = av[flat]
    strides = np.array([a.shape[1] * a.shape[2], a.shape[2], 1])
    keep = np.ones(len(flat), dtype=bool)
    for o in offsets + _DIAGONAL_OFFSETS:
        nb = av[flat + int(np.dot(o, strides))]
        keep &= values > nb if _strict(o) else values >= nb
    zyx, flat, values = zyx[keep], flat[keep], values[keep]
    if extra:
        # Non-maximum suppression over the spot's footprint (coordinates clipped at the
        # array border: the halo covers the footprint, so clipping only hits volume edges).
        keep = np.ones(len(flat), dtype=bool)
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


def noise_strides(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Strides ``(z, y, x)`` of the noise-sample lattice of a volume of ``shape``: every
    ``NOISE_STRIDE_YX``-th voxel in y and x, and the axis with the most lattice points
    halved until there are at most ``NOISE_SAMPLE_MAX`` (a fixed, chunk-independent
    lattice: chunks and a single block draw the same sample)."""
    strides = [1, NOISE_STRIDE_YX, NOISE_STRIDE_YX]
    while True:
        counts = [-(-int(n) // s) for n, s in zip(shape, strides, strict=True)]
        if int(np.prod(counts)) <= NOISE_SAMPLE_MAX:
            return strides[0], strides[1], strides[2]
        strides[int(np.argmax(counts))] *= 2


def robust_std(sample: np.ndarray) -> float:
    """1.4826 x the median absolute deviation (the std of Gaussian noise); the plain std
    when that is 0; 0 for an empty or constant sample."""
    x = sample.astype(np.float64)
    if not x.size:
        return 0.0
    out = float(1.4826 * np.median(np.abs(x - np.median(x))))
    return out if out > 0 else float(x.std())


def block_candidates(
    block: np.ndarray,
    core: tuple[slice, slice, slice],
    origin: tuple[int, int, int],
    filters: Filters,
    suppression: list[tuple[int, int, int]] | None = None,
    gate_sigma: float | None = None,
    strides: tuple[int, int, int] = (1, NOISE_STRIDE_YX, NOISE_STRIDE_YX),
    threads: int = 1,
) -> BlockCandidates:
    """Band-pass ``block`` and return the extrema of its ``core``.

    Parameters
    ----------
    block : ``(z, y, x)`` image block including its halo (any real dtype).
    core : slices of ``block`` whose extrema are reported.
    origin : global voxel coordinate of ``block[0, 0, 0]``.
    filters : filter sizes.
    suppression : extra offsets a maximum must beat (non-maximum suppression).
    gate_sigma : report only extrema above this many noise sigmas of the block's own
        noise sample; ``None``: all above 0.
    strides : of the global noise-sample lattice (:func:`noise_strides`).
    threads : for the band-pass (the result does not depend on it).
    """
    peak_band, band = filters.bandpass_pair(block, threads)
    sample_core = band[core]
    first = [(-(o + c.start)) % s for o, c, s in zip(origin, core, strides, strict=True)]
    lattice = tuple(slice(f, None, s) for f, s in zip(first, strides, strict=True))
    sample = sample_core[lattice].ravel()
    noise = robust_std(sample)
    level = 0.0 if gate_sigma is None else gate_sigma * noise
    padded = np.pad(peak_band, 1, mode="constant", constant_values=-np.inf)
    core_p = tuple(slice(s.start + 1, s.stop + 1) for s in core)
    # Candidates: where the thresholding band-pass is above the local background (level).
    zyx, peak_values, nb = _extrema(padded, core_p, suppression or [], sample_core > level)
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
    return BlockCandidates(
        peak_zyx=(zyx + g).astype(np.int64),
        peak_offset=offset,
        peak_value=values.astype(np.float32),
        noise_sample=sample.astype(np.float32),
        noise=noise,
    )
