"""Camera calibration: dark/offset, flat-field (vignetting) and chromatic channel shifts.

A raw voxel ``I`` of channel ``c`` becomes ``(I - dark[c]) / flat[c]`` (counts above the
camera offset, as if the illumination were uniform); channel ``c`` is then shifted by
``-channel_shifts_zyx_px[c]`` together with the drift (one interpolation, see
:mod:`~cellrna_pipeline.core.preprocess.pipeline`).

Sources, best first:

- **dark**: dark frames (``(y, x)`` or ``(n, y, x)``, averaged); else a given camera
  offset; else an offset estimated from the data by a photon-transfer fit: in background
  tiles the shot-noise variance grows linearly with the mean, ``var = g (mean - offset)``,
  and the vignetting spreads the means enough to fit the line.
- **flat**: flat-field images (a uniform fluorescent slide; ``(y, x)`` for every channel
  or ``(c, y, x)``), dark-subtracted, fitted by a smooth surface (2-D Legendre
  polynomial), scaled to mean 1; else estimated from the data in the spirit of BaSiC
  (Peng et al. 2017, which fits a smooth DCT basis): over many planes of the acquisition
  the low percentile of each pixel is its background, the flat-field times a constant;
  the same robust smooth fit gives the flat-field.
- **chromatic shifts**: a bead volume seen in every channel (``(c, z, y, x)``),
  registered channel by channel; else registration of the channels of the data
  themselves, kept only when the channels correlate after registration (different
  stains usually do not, so this often falls back to no correction, which is reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.preprocess.config import CalibrationConfig, RegistrationConfig
from cellrna_pipeline.core.preprocess.register import register_translation
from cellrna_pipeline.core.types import VoxelSize

__all__ = [
    "CameraCalibration",
    "apply_calibration",
    "dark_from_frames",
    "estimate_camera_calibration",
    "estimate_camera_offset",
    "estimate_channel_shifts",
    "estimate_flat_field",
    "flat_from_images",
    "smooth_flat_field",
]

_TILE = 16  # tile size (pixels) of the photon-transfer fit
_MIN_FLAT = 1e-3
_FIT_SIZE = 96  # a flat-field is fitted on an image binned to at most this many pixels
_MIN_SHIFT_CORRELATION = 0.5  # a channel registration below this is not trusted


@dataclass(frozen=True)
class CameraCalibration:
    """Per-channel camera corrections of one experiment.

    Attributes
    ----------
    dark_cyx : ``(c, y, x)`` float32 counts to subtract (camera offset / dark image).
    flat_cyx : ``(c, y, x)`` float32 flat-field, mean 1 per channel (divide by it).
    channel_shifts_zyx_px : ``(c, 3)`` float64 chromatic displacement of each channel
        relative to the reference channel, voxels ``(z, y, x)`` (0 for the reference).
    channel_names : one name per channel.
    sources : how each part was obtained, e.g. ``{"dark": "images", "flat": "estimated",
        "chromatic": "beads"}``.
    details : numbers worth reporting (estimated offset, correlations, ...).
    """

    dark_cyx: np.ndarray
    flat_cyx: np.ndarray
    channel_shifts_zyx_px: np.ndarray
    channel_names: tuple[str, ...]
    sources: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = len(self.channel_names)
        if self.dark_cyx.ndim != 3 or self.dark_cyx.shape[0] != c:
            raise InputError(f"dark must be (c={c}, y, x), got {self.dark_cyx.shape}")
        if self.flat_cyx.shape != self.dark_cyx.shape:
            raise InputError(f"flat {self.flat_cyx.shape} and dark {self.dark_cyx.shape} differ")
        if self.channel_shifts_zyx_px.shape != (c, 3):
            raise InputError(
                f"channel shifts must be (c={c}, 3), got {self.channel_shifts_zyx_px.shape}"
            )
        if not (np.isfinite(self.flat_cyx).all() and (self.flat_cyx > 0).all()):
            raise InputError("flat-field must be positive and finite")

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def shape_yx(self) -> tuple[int, int]:
        return (int(self.dark_cyx.shape[1]), int(self.dark_cyx.shape[2]))

    def calibrate_channel(
        self,
        volume_zyx: np.ndarray,
        channel: int,
        *,
        y: slice = slice(None),
        x: slice = slice(None),
    ) -> np.ndarray:
        """``(volume - dark) / flat`` of one channel (or of a crop at rows ``y``, columns
        ``x`` of the image), float32 ``(z, y, x)``."""
        return apply_calibration(
            np.asarray(volume_zyx)[None],
            self.dark_cyx[channel : channel + 1, y, x],
            self.flat_cyx[channel : channel + 1, y, x],
        )[0]

    @classmethod
    def identity(
        cls, channel_names: Sequence[str], shape_yx: Sequence[int], *, offset_adu: float = 0.0
    ) -> CameraCalibration:
        """No correction except a constant offset: dark = offset, flat = 1, shifts = 0."""
        c, (y, x) = len(channel_names), shape_yx
        return cls(
            dark_cyx=np.full((c, y, x), offset_adu, dtype=np.float32),
            flat_cyx=np.ones((c, y, x), dtype=np.float32),
            channel_shifts_zyx_px=np.zeros((c, 3)),
            channel_names=tuple(channel_names),
            sources={"dark": "constant", "flat": "none", "chromatic": "none"},
        )


def apply_calibration(
    volume_czyx: np.ndarray,
    dark_cyx: np.ndarray,
    flat_cyx: np.ndarray,
) -> np.ndarray:
    """``(volume - dark) / flat`` per channel, float32.

    Parameters
    ----------
    volume_czyx : ``(c, z, y, x)`` raw counts (any real dtype); works on numpy and dask
        arrays alike (elementwise).
    dark_cyx, flat_cyx : ``(c, y, x)`` (or the matching crop of them).

    Returns
    -------
    ``(c, z, y, x)`` float32 counts above the offset, flat-field corrected.
    """
    dark = np.asarray(dark_cyx, dtype=np.float32)[:, None]
    inverse = (np.float32(1.0) / np.asarray(flat_cyx, dtype=np.float32))[:, None]
    return (volume_czyx.astype(np.float32) - dark) * inverse


def dark_from_frames(frames: np.ndarray, *, n_channels: int) -> np.ndarray:
    """Average dark frames into a ``(c, y, x)`` float32 dark image (same for every channel).

    Parameters
    ----------
    frames : ``(y, x)`` or ``(n, y, x)`` dark frames (no light), any real dtype.
    n_channels : number of channels to broadcast to.
    """
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.dtype.kind not in "uif":
        raise InputError(f"dark frames must be (y, x) or (n, y, x) numbers, got {arr.shape}")
    mean = arr.mean(axis=0, dtype=np.float64).astype(np.float32)
    if not np.isfinite(mean).all():
        raise InputError("dark frames hold NaN or infinite values")
    return np.broadcast_to(mean, (n_channels, *mean.shape)).copy()


def smooth_flat_field(image_yx: np.ndarray, *, degree: int = 6) -> np.ndarray:
    """Fit a smooth surface to a flat-field image and scale it to mean 1.

    A 2-D Legendre polynomial of ``degree`` in y and x is fitted by least squares (three
    rounds, rejecting pixels more than 3 MAD off, e.g. a cell in a data-based estimate)
    to the image binned to at most 96 pixels per axis, and evaluated at full
    resolution. Unlike a Gaussian blur this keeps the vignetting's slope up to the
    image edge.

    Parameters
    ----------
    image_yx : ``(y, x)`` dark-subtracted flat-field image (any positive scale).
    degree : polynomial degree per axis.

    Returns
    -------
    ``(y, x)`` float32, mean 1, at least ``1e-3``.
    """
    from numpy.polynomial import legendre

    img = np.asarray(image_yx, dtype=np.float64)
    ny, nx = img.shape
    by, bx = max(1, -(-ny // _FIT_SIZE)), max(1, -(-nx // _FIT_SIZE))
    small = _bin_yx(img[None], by, bx)[0]
    sy, sx = small.shape

    def coords(n_small: int, factor: int, n_full: int) -> np.ndarray:
        # centres of the binned pixels, in the [-1, 1] frame of the full image
        return ((np.arange(n_small) + 0.5) * factor) / n_full * 2.0 - 1.0

    cy, cx = coords(sy, by, ny), coords(sx, bx, nx)
    deg_y, deg_x = min(degree, sy - 1), min(degree, sx - 1)
    grid_y, grid_x = np.meshgrid(cy, cx, indexing="ij")
    vander = legendre.legvander2d(grid_y, grid_x, [deg_y, deg_x]).reshape(sy * sx, -1)
    values = small.ravel()
    keep = np.isfinite(values)
    coef = np.zeros(vander.shape[1])
    for _ in range(3):
        v = vander[keep]
        # normal equations: a few dozen Legendre terms are well conditioned, and this is
        # much cheaper than an SVD-based lstsq
        coef = np.linalg.solve(v.T @ v, v.T @ values[keep])
        resid = values - vander @ coef
        mad = float(np.median(np.abs(resid[keep]))) * 1.4826 or 1e-12
        new = np.isfinite(values) & (np.abs(resid) < 3.0 * mad)
        if new.sum() < vander.shape[1] * 2 or np.array_equal(new, keep):
            break
        keep = new
    fy = (np.arange(ny) + 0.5) / ny * 2.0 - 1.0
    fx = (np.arange(nx) + 0.5) / nx * 2.0 - 1.0
    surface = legendre.leggrid2d(fy, fx, coef.reshape(deg_y + 1, deg_x + 1))
    mean = float(surface.mean())
    if not math.isfinite(mean) or mean <= 0:
        raise InputError("flat-field image has no signal above the dark level")
    return np.maximum(surface / mean, _MIN_FLAT).astype(np.float32)


def flat_from_images(
    flat_images: np.ndarray, dark_cyx: np.ndarray, *, degree: int = 6
) -> np.ndarray:
    """Flat-field ``(c, y, x)`` float32 of mean 1 per channel from flat-field images.

    Parameters
    ----------
    flat_images : ``(y, x)`` (one for every channel) or ``(c, y, x)`` images of a
        uniform sample, raw counts.
    dark_cyx : the dark image to subtract first.
    degree : degree of the smooth fit (:func:`smooth_flat_field`).
    """
    arr = np.asarray(flat_images)
    c, y, x = dark_cyx.shape
    if arr.ndim == 2:
        arr = np.broadcast_to(arr, (c, *arr.shape))
    if arr.shape != (c, y, x):
        raise InputError(
            f"flat-field images must be (y, x) or (c={c}, y={y}, x={x}), got {arr.shape}"
        )
    if arr.dtype.kind not in "uif" or not np.isfinite(arr).all():
        raise InputError("flat-field images must hold finite numbers")
    return np.stack(
        [
            smooth_flat_field(arr[i].astype(np.float32) - dark_cyx[i], degree=degree)
            for i in range(c)
        ]
    )


def estimate_camera_offset(planes: np.ndarray) -> dict[str, float]:
    """Camera offset (counts) from the shot noise of background tiles (photon transfer).

    At each ``16 x 16`` tile position, the darkest quarter of the planes is taken as
    background; their noise variance (from differences of neighbouring pixels, which
    cancels smooth gradients) and mean follow ``var = gain (mean - offset)`` for shot
    noise. A robust line fit over tiles gives gain and offset; the vignetting spreads
    the tile means enough for the fit. Read-noise variance is neglected, which biases
    the offset low by ``read_noise_e**2`` counts (about 4 for 2 e-).

    Parameters
    ----------
    planes : ``(n, y, x)`` raw planes of one channel (sampled over z and time).

    Returns
    -------
    dict with ``offset_adu``, ``gain_adu_per_e`` and ``tiles`` (number used).
    """
    arr = np.asarray(planes, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1] < 2 * _TILE or arr.shape[2] < 2 * _TILE:
        raise InputError(f"need (n, y, x) planes of at least {2 * _TILE} px, got {arr.shape}")
    n, y, x = arr.shape
    ty, tx = y // _TILE, x // _TILE
    tiles = arr[:, : ty * _TILE, : tx * _TILE].reshape(n, ty, _TILE, tx, _TILE)
    tiles = tiles.transpose(0, 1, 3, 2, 4).reshape(n, ty * tx, _TILE, _TILE)
    means = tiles.mean(axis=(2, 3))  # (n, tiles)
    # the darkest quarter of the planes at each tile position is its background
    k = max(1, n // 4)
    darkest = np.argsort(means, axis=0)[:k]  # (k, tiles)
    pick = np.take_along_axis(tiles, darkest[:, :, None, None], axis=0)
    diff = np.diff(pick, axis=3)  # noise x sqrt(2); smooth gradients cancel
    var = (diff.var(axis=(2, 3)) / 2.0).ravel()
    mean = pick.mean(axis=(2, 3)).ravel()
    keep = np.isfinite(var) & np.isfinite(mean)
    mean, var = mean[keep].astype(np.float64), var[keep].astype(np.float64)
    if mean.size < 8 or float(np.ptp(mean)) == 0.0:
        raise InputError("not enough background variation to estimate the camera offset")
    slope, intercept = _robust_line(mean, var)
    if not slope > 0:
        raise InputError(
            "cannot estimate the camera offset from the data (noise does not grow with "
            "signal); give camera_offset_adu or a dark image"
        )
    offset = -intercept / slope
    floor = float(np.percentile(arr, 0.1))
    return {
        "offset_adu": float(min(max(offset, 0.0), floor)),
        "gain_adu_per_e": float(slope),
        "tiles": int(mean.size),
    }


def _robust_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares with two rounds of 3-MAD outlier rejection (cells in a tile)."""
    keep = np.ones(x.size, dtype=bool)
    slope = intercept = 0.0
    for _ in range(3):
        slope, intercept = np.polyfit(x[keep], y[keep], 1)
        resid = y - (slope * x + intercept)
        mad = float(np.median(np.abs(resid[keep] - np.median(resid[keep])))) or 1e-12
        new = np.abs(resid) < 3.0 * 1.4826 * mad
        if new.sum() < 8 or np.array_equal(new, keep):
            break
        keep = new
    return float(slope), float(intercept)


def estimate_flat_field(
    planes: np.ndarray,
    dark_yx: np.ndarray | float,
    *,
    percentile: float = 10.0,
    degree: int = 6,
    shape_yx: Sequence[int] | None = None,
) -> np.ndarray:
    """Flat-field ``(y, x)`` float32 of mean 1 estimated from the data (BaSiC-style).

    Over planes sampled across z and time, the ``percentile`` of each pixel is its
    background: the flat-field times the background level. A smooth surface fitted to
    it (:func:`smooth_flat_field`, robust to pixels that a cell covers in most planes)
    is the estimate.

    Parameters
    ----------
    planes : ``(n, y, x)`` raw planes of one channel, possibly binned in y and x (block
        means) to save memory; ``n >= 2``.
    dark_yx : dark level to subtract (scalar or ``(y, x)`` at the planes' resolution).
    percentile : per-pixel percentile over the planes taken as background.
    degree : degree of the smooth fit.
    shape_yx : full-resolution shape of the result (default: the planes' shape); the
        fit is evaluated there directly.
    """
    arr = np.asarray(planes, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] < 2:
        raise InputError(
            f"need at least 2 planes (n, y, x) to estimate a flat-field, got {arr.shape}"
        )
    background = np.percentile(arr, percentile, axis=0) - np.asarray(dark_yx, dtype=np.float64)
    flat = smooth_flat_field(np.maximum(background, 0.0), degree=degree)
    if shape_yx is not None and tuple(shape_yx) != flat.shape:
        from skimage.transform import resize

        flat = resize(flat, tuple(shape_yx), order=1, mode="edge", anti_aliasing=False)
        flat = (flat / flat.mean()).astype(np.float32)
    return flat


def estimate_channel_shifts(
    volume_czyx: np.ndarray,
    *,
    voxel_size: VoxelSize,
    reference_channel: int = 0,
    min_correlation: float = _MIN_SHIFT_CORRELATION,
    max_shift_px: Sequence[float] = (2.0, 5.0, 5.0),
    check_first: bool = False,
    smoothing_um: Sequence[float] = (0.15, 0.1, 0.1),
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Chromatic displacement of each channel relative to ``reference_channel``.

    Parameters
    ----------
    volume_czyx : ``(c, z, y, x)`` calibrated volume where every channel shows the same
        structures (beads), or the data itself.
    voxel_size : physical voxel size (um).
    reference_channel : index of the channel the others are registered to.
    min_correlation : a channel whose registered correlation with the reference is
        below this is not trusted (shift 0, reported).
    max_shift_px : larger estimates (z, y, x voxels) are not trusted either.
    smoothing_um : Gaussian sigma for the sub-voxel refinement (um).
    check_first : test with a cheap integer registration whether the channels correlate
        at all before refining (for data, where they often do not).

    Returns
    -------
    shifts : ``(c, 3)`` float64, voxels; 0 for the reference and untrusted channels.
    report : one dict per channel: ``shift_zyx_px`` (estimated), ``correlation``,
        ``accepted`` (bool), ``reason``.
    """
    arr = np.asarray(volume_czyx)
    if arr.ndim != 4:
        raise InputError(f"need a (c, z, y, x) volume, got shape {arr.shape}")
    n_c = arr.shape[0]
    if not 0 <= reference_channel < n_c:
        raise InputError(f"reference channel {reference_channel} not in 0..{n_c - 1}")
    config = RegistrationConfig(smoothing_um=tuple(smoothing_um))  # type: ignore[arg-type]
    shifts = np.zeros((n_c, 3))
    report: list[dict[str, Any]] = []
    for c in range(n_c):
        if c == reference_channel:
            report.append(
                {
                    "shift_zyx_px": [0.0, 0.0, 0.0],
                    "correlation": 1.0,
                    "accepted": True,
                    "reason": "reference",
                }
            )
            continue
        try:
            quick = (
                _coarse_correlation(arr[reference_channel], arr[c], config) if check_first else 1.0
            )
            if quick < min_correlation:
                report.append(
                    {
                        "shift_zyx_px": [0.0, 0.0, 0.0],
                        "correlation": round(quick, 4),
                        "accepted": False,
                        "reason": f"channels do not correlate ({quick:.2f} < {min_correlation})",
                    }
                )
                continue
            reg = register_translation(
                arr[reference_channel], arr[c], voxel_size=voxel_size, config=config
            )
        except InputError as exc:
            report.append(
                {
                    "shift_zyx_px": [0.0, 0.0, 0.0],
                    "correlation": 0.0,
                    "accepted": False,
                    "reason": str(exc),
                }
            )
            continue
        est = np.asarray(reg.shift_zyx_px)
        too_big = bool(np.any(np.abs(est) > np.asarray(max_shift_px)))
        accepted = reg.correlation >= min_correlation and not too_big and reg.converged
        reason = (
            "ok"
            if accepted
            else "shift too large"
            if too_big
            else "did not converge"
            if not reg.converged
            else f"correlation {reg.correlation:.2f} < {min_correlation}"
        )
        if accepted:
            shifts[c] = est
        report.append(
            {
                "shift_zyx_px": [round(float(v), 4) for v in est],
                "correlation": round(reg.correlation, 4),
                "accepted": accepted,
                "reason": reason,
            }
        )
    return shifts, report


def _coarse_correlation(
    reference: np.ndarray, moving: np.ndarray, config: RegistrationConfig
) -> float:
    """Pearson correlation after the integer part of the phase-correlation shift: a cheap
    test of whether two channels show the same structures at all."""
    from cellrna_pipeline.core.preprocess.register import (
        _coarse_shift,
        central_crop,
        integer_shift,
    )

    crop = central_crop(reference.shape, config.max_crop_zyx)
    ref = reference[crop].astype(np.float32)
    mov = moving[crop].astype(np.float32)
    if float(ref.std()) == 0.0 or float(mov.std()) == 0.0:
        raise InputError("cannot register a constant volume")
    axes = [a for a in range(3) if ref.shape[a] >= 4]
    coarse = np.rint(_coarse_shift(ref, mov, axes)).astype(int)
    back = integer_shift(mov, tuple(int(-v) for v in coarse), fill_value=np.nan)
    valid = np.isfinite(back)
    if valid.sum() < 64:
        return 0.0
    return float(np.corrcoef(ref[valid], back[valid])[0, 1])


def estimate_camera_calibration(
    *,
    channel_names: Sequence[str],
    shape_yx: Sequence[int],
    voxel_size: VoxelSize,
    dark_frames: np.ndarray | None = None,
    flat_images: np.ndarray | None = None,
    beads_czyx: np.ndarray | None = None,
    sample_planes: Sequence[np.ndarray] | None = None,
    sample_bin_yx: int = 1,
    data_czyx: np.ndarray | None = None,
    volume_crop_yx: tuple[slice, slice] = (slice(None), slice(None)),
    config: CalibrationConfig | None = None,
) -> CameraCalibration:
    """Build the :class:`CameraCalibration` of an experiment from what is available.

    Parameters
    ----------
    channel_names : one per channel.
    shape_yx : image size (pixels).
    voxel_size : physical voxel size (um).
    dark_frames : ``(y, x)`` or ``(n, y, x)`` dark frames, if the acquisition has them.
    flat_images : ``(y, x)`` or ``(c, y, x)`` flat-field images, if any.
    beads_czyx : ``(c, z', y, x)`` bead volume seen in every channel, if any.
    sample_planes : per channel, ``(n, y', x')`` raw planes sampled over z and time
        (binned by ``sample_bin_yx``); needed when dark or flat images are missing.
    data_czyx : one raw ``(c, z, y, x)`` volume for the chromatic estimate from the data
        when there are no beads.
    volume_crop_yx : where ``beads_czyx`` and ``data_czyx`` sit in the image when they
        are crops (rows, columns); default the whole image.
    config : :class:`CalibrationConfig`.

    Raises
    ------
    InputError
        Inconsistent shapes, or a part that must be estimated without data to do it.
    """
    cfg = config or CalibrationConfig()
    names = tuple(channel_names)
    n_c, (ny, nx) = len(names), (int(shape_yx[0]), int(shape_yx[1]))
    if not 0 <= cfg.reference_channel < n_c:
        raise InputError(f"reference channel {cfg.reference_channel} not in 0..{n_c - 1}")
    if sample_planes is not None and len(sample_planes) != n_c:
        raise InputError(f"need sampled planes for {n_c} channels, got {len(sample_planes)}")
    sources: dict[str, str] = {}
    details: dict[str, Any] = {}

    def need_samples(what: str) -> Sequence[np.ndarray]:
        if sample_planes is None:
            raise InputError(f"no {what} image and no data to estimate it from")
        return sample_planes

    # --- dark
    if dark_frames is not None:
        dark = dark_from_frames(dark_frames, n_channels=n_c)
        if dark.shape[1:] != (ny, nx):
            raise InputError(f"dark frames are {dark.shape[1:]}, images are {(ny, nx)}")
        sources["dark"] = "images"
        details["dark_mean_adu"] = round(float(dark.mean()), 3)
    elif cfg.camera_offset_adu is not None:
        dark = np.full((n_c, ny, nx), cfg.camera_offset_adu, dtype=np.float32)
        sources["dark"] = "configured offset"
    else:
        planes = need_samples("dark")
        fits = [estimate_camera_offset(p) for p in planes]
        offset = float(np.median([f["offset_adu"] for f in fits]))
        dark = np.full((n_c, ny, nx), offset, dtype=np.float32)
        sources["dark"] = "estimated offset (photon transfer)"
        details["estimated_offset_adu"] = round(offset, 3)
        details["estimated_gain_adu_per_e"] = [round(f["gain_adu_per_e"], 4) for f in fits]

    # --- flat
    if flat_images is not None:
        flat = flat_from_images(flat_images, dark, degree=cfg.flat_poly_degree)
        sources["flat"] = "images"
    else:
        planes = need_samples("flat-field")
        flats = []
        for c in range(n_c):
            dark_small = dark[c]
            if sample_bin_yx > 1:
                dark_small = _bin_yx(dark[c][None], sample_bin_yx)[0]
            flats.append(
                estimate_flat_field(
                    planes[c],
                    dark_small,
                    percentile=cfg.background_percentile,
                    degree=cfg.flat_poly_degree,
                    shape_yx=(ny, nx),
                )
            )
        flat = np.stack(flats)
        sources["flat"] = f"estimated (BaSiC-style, p{cfg.background_percentile:g} background)"
    details["flat_min_max"] = [round(float(flat.min()), 4), round(float(flat.max()), 4)]

    # --- chromatic shifts
    shifts = np.zeros((n_c, 3))
    method = cfg.chromatic
    if method == "auto":
        method = (
            "beads" if beads_czyx is not None else ("data" if data_czyx is not None else "none")
        )
    if method in ("beads", "data") and n_c > 1:
        volume = beads_czyx if method == "beads" else data_czyx
        if volume is None:
            raise InputError(f"chromatic correction from {method} requested but none available")
        volume = np.asarray(volume)
        ys, xs = volume_crop_yx
        crop_shape = dark[0, ys, xs].shape
        if volume.ndim != 4 or volume.shape[0] != n_c or volume.shape[2:] != crop_shape:
            raise InputError(
                f"{method} volume must be (c={n_c}, z, y, x) with (y, x) = {crop_shape}, "
                f"got {volume.shape}"
            )
        calibrated = apply_calibration(volume, dark[:, ys, xs], flat[:, ys, xs])
        shifts, report = estimate_channel_shifts(
            calibrated,
            voxel_size=voxel_size,
            reference_channel=cfg.reference_channel,
            max_shift_px=cfg.max_chromatic_shift_px,
            check_first=method == "data",
        )
        details["chromatic"] = {name: r for name, r in zip(names, report, strict=True)}
        untrusted = [n for n, r in zip(names, report, strict=True) if not r["accepted"]]
        sources["chromatic"] = method + (
            f" (not applied to {', '.join(untrusted)})" if untrusted else ""
        )
    else:
        sources["chromatic"] = "none"
    return CameraCalibration(
        dark_cyx=dark,
        flat_cyx=flat,
        channel_shifts_zyx_px=shifts,
        channel_names=names,
        sources=sources,
        details=details,
    )


def _bin_yx(planes: np.ndarray, factor_y: int, factor_x: int | None = None) -> np.ndarray:
    """Block means of ``(n, y, x)`` by the factors in y and x (edge blocks: their pixels)."""
    fy, fx = factor_y, factor_y if factor_x is None else factor_x
    arr = np.asarray(planes)
    arr = arr.astype(np.float64 if arr.dtype == np.float64 else np.float32, copy=False)
    if fy <= 1 and fx <= 1:
        return arr
    n, y, x = arr.shape
    pad = ((0, 0), (0, (-y) % fy), (0, (-x) % fx))
    if any(p[1] for p in pad):
        arr = np.pad(arr, pad, mode="edge")
    return arr.reshape(n, arr.shape[1] // fy, fy, arr.shape[2] // fx, fx).mean(axis=(2, 4))


def bin_planes(planes: np.ndarray, factor: int) -> np.ndarray:
    """``(n, y, x)`` block means by ``factor`` in y and x (to sample large planes cheaply)."""
    return _bin_yx(planes, factor)
