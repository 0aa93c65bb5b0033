"""One volume through the whole preprocessing: calibrate, normalize, denoise, register.

:func:`preprocess_volume` runs in memory on a numpy array or lazily on a dask array
(chunked, bounded memory); both give the same values. Order and why:

1. **calibrate** ``(raw - dark) / flat`` per channel (camera offset, vignetting);
2. **normalize** the robust low/high percentiles of each channel to 0 and 1;
3. **denoise** (Gaussian by default, non-local means optionally) on the original voxel
   grid, where the noise is independent from voxel to voxel;
4. **register**: one shift per channel, ``-(drift + chromatic shift)``, applied with one
   linear interpolation; voxels that come from outside the field get ``fill_value``
   (0 = the low percentile, i.e. dark background).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.preprocess.calibration import CameraCalibration, apply_calibration
from cellrna_pipeline.core.preprocess.chunked import auto_chunks_zyx, to_dask
from cellrna_pipeline.core.preprocess.config import PreprocessConfig
from cellrna_pipeline.core.preprocess.denoise import (
    estimate_noise_sigma,
    gaussian_denoise,
    gaussian_depth,
    gaussian_sigma_vox,
    nl_means_denoise,
    nl_means_depth,
)
from cellrna_pipeline.core.preprocess.normalize import percentile_range, sample_plane_indices
from cellrna_pipeline.core.preprocess.register import shift_volume
from cellrna_pipeline.core.types import VoxelSize

__all__ = ["PreprocessResult", "preprocess_volume", "process_channel"]


@dataclass(frozen=True)
class PreprocessResult:
    """Output of :func:`preprocess_volume`.

    Attributes
    ----------
    data : ``(c, z, y, x)`` float32, numpy (in memory) or dask (lazy, chunked).
    percentile_values : ``(c, 2)`` calibrated values that were mapped to 0 and 1.
    shifts_applied_zyx_px : ``(c, 3)`` displacement applied to each channel (voxels),
        ``-(drift + chromatic shift)``.
    noise_sigma : per channel, the noise sigma used by non-local means (else ``None``).
    chunks_zyx : chunk shape of a chunked run (``None`` in memory).
    """

    data: Any
    percentile_values: np.ndarray
    shifts_applied_zyx_px: np.ndarray
    noise_sigma: tuple[float, ...] | None
    chunks_zyx: tuple[int, int, int] | None


def _normalize(
    raw: np.ndarray,
    calibration: tuple[np.ndarray, np.ndarray] | None,
    low: np.float32,
    scale: np.float32,
) -> np.ndarray:
    x = raw.astype(np.float32)
    if calibration is not None:
        dark, inverse = calibration
        x = (x - dark) * inverse
    return (x - low) * scale


def process_channel(
    raw_zyx: np.ndarray,
    dark_1yx: np.ndarray | None = None,
    inverse_flat_1yx: np.ndarray | None = None,
    *,
    low: np.float32,
    scale: np.float32,
    denoise: str,
    sigma_vox: tuple[float, float, float],
    nl_means: dict[str, Any],
    shift_zyx_px: tuple[float, float, float],
    fill_value: float,
) -> np.ndarray:
    """The whole chain on one channel (or one chunk of it, with overlap): calibrate,
    normalize, denoise, shift. float32 ``(z, y, x)``.

    ``dark_1yx`` and ``inverse_flat_1yx`` are ``(1, y, x)`` (the rows and columns of this
    chunk); ``low`` and ``scale`` map the percentile range to 0..1. The chunked runner calls
    this on every chunk extended by the denoiser's reach plus the shift's, so the trimmed
    result equals the whole-channel result bit for bit.
    """
    cal = None if dark_1yx is None or inverse_flat_1yx is None else (dark_1yx, inverse_flat_1yx)
    x = _normalize(raw_zyx, cal, low, scale)
    if denoise == "gaussian":
        x = gaussian_denoise(x, sigma_vox)
    elif denoise == "nl_means":
        x = nl_means_denoise(x, **nl_means)
    if any(shift_zyx_px):
        x = shift_volume(x, shift_zyx_px, fill_value=fill_value)
    return x


def _check_input(volume: Any) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in getattr(volume, "shape", ()))
    if len(shape) != 4:
        raise InputError(f"need a (c, z, y, x) volume, got shape {shape}")
    dtype = np.dtype(getattr(volume, "dtype", None))
    if dtype.kind not in "uif":
        raise InputError(f"volume must hold real numbers, got dtype {dtype}")
    if min(shape) < 1:
        raise InputError(f"volume is empty: shape {shape}")
    return (shape[0], shape[1], shape[2], shape[3])


def preprocess_volume(
    volume_czyx: Any,
    *,
    voxel_size: VoxelSize,
    calibration: CameraCalibration | None = None,
    drift_zyx_px: Sequence[float] = (0.0, 0.0, 0.0),
    config: PreprocessConfig | None = None,
    chunked: bool | None = None,
    chunks_zyx: Sequence[int] | None = None,
    percentile_values: np.ndarray | None = None,
) -> PreprocessResult:
    """Calibrate, normalize, denoise and register one timepoint.

    Parameters
    ----------
    volume_czyx : ``(c, z, y, x)`` raw counts, numpy or dask (any real dtype).
    voxel_size : physical voxel size (um); the Gaussian sigma is given in nm.
    calibration : dark, flat and channel shifts of the experiment; ``None`` skips
        dark/flat correction and chromatic shifts.
    drift_zyx_px : displacement of this timepoint relative to the reference timepoint
        (voxels); the volume is moved back by it.
    config : :class:`PreprocessConfig`.
    chunked : run lazily with dask (``True``), in memory (``False``), or as the input is
        (``None``: chunked for a dask input).
    chunks_zyx : chunk shape of a chunked run (default from ``config.chunk_mib``).
    percentile_values : ``(c, 2)`` values to map to 0 and 1 instead of computing them
        from this volume (e.g. one normalization for a whole experiment, or a crop that
        must match the whole volume).

    Returns
    -------
    PreprocessResult; ``data`` is a dask array when chunked (compute or store it).
    Percentiles are computed eagerly (one read of the sampled planes).

    Raises
    ------
    InputError
        Wrong dimensions or dtype, calibration of another shape or channel count,
        non-finite drift, NaN in the data.
    """
    cfg = config or PreprocessConfig()
    n_c, n_z, n_y, n_x = _check_input(volume_czyx)
    drift = np.asarray(drift_zyx_px, dtype=np.float64)
    if drift.shape != (3,) or not np.isfinite(drift).all():
        raise InputError(f"drift must be 3 finite numbers (z, y, x), got {list(drift_zyx_px)}")
    if calibration is not None and (
        calibration.n_channels != n_c or calibration.shape_yx != (n_y, n_x)
    ):
        raise InputError(
            f"calibration is for {calibration.n_channels} channels of "
            f"{calibration.shape_yx}, the volume has {n_c} of {(n_y, n_x)}"
        )
    is_dask = hasattr(volume_czyx, "dask")
    use_dask = is_dask if chunked is None else bool(chunked)
    chunks: tuple[int, int, int] | None = None
    volume: Any = volume_czyx
    if use_dask:
        chunks = (
            tuple(int(c) for c in chunks_zyx)  # type: ignore[assignment]
            if chunks_zyx is not None
            else auto_chunks_zyx((n_z, n_y, n_x), 4, target_chunk_mib=cfg.chunk_mib)
        )
        volume = to_dask(volume_czyx, chunks)  # type: ignore[arg-type]
    elif is_dask:
        volume = np.asarray(volume_czyx)

    if calibration is not None:
        chroma = calibration.channel_shifts_zyx_px
        dark = calibration.dark_cyx.astype(np.float32)
        inverse = np.float32(1.0) / calibration.flat_cyx.astype(np.float32)
    else:
        chroma = np.zeros((n_c, 3))
    # percentiles of the calibrated volume: one read of the sampled planes
    if percentile_values is None:
        calibrated = (
            apply_calibration(volume, calibration.dark_cyx, calibration.flat_cyx)
            if calibration is not None
            else volume
        )
        ranges = percentile_range(
            calibrated, percentiles=cfg.percentiles, n_planes=cfg.percentile_planes
        )
    else:
        ranges = np.asarray(percentile_values, dtype=np.float64)
        if ranges.shape != (n_c, 2) or not np.isfinite(ranges).all():
            raise InputError(f"percentile_values must be finite (c={n_c}, 2), got {ranges.shape}")
    lows = ranges[:, 0].astype(np.float32)
    scales = (1.0 / (ranges[:, 1] - ranges[:, 0])).astype(np.float32)
    noise: list[float] | None = None
    if cfg.denoise == "nl_means":
        zs = sample_plane_indices(n_z, 4)
        noise = []
        for c in range(n_c):
            planes = np.asarray(volume[c, zs])
            cal = (dark[c : c + 1], inverse[c : c + 1]) if calibration is not None else None
            noise.append(estimate_noise_sigma(_normalize(planes, cal, lows[c], scales[c])))
    sigma = gaussian_sigma_vox(cfg.gaussian_sigma_nm, voxel_size)
    shifts = -(drift[None, :] + chroma)
    channels = []
    for c in range(n_c):
        kwargs: dict[str, Any] = {
            "low": lows[c],
            "scale": scales[c],
            "denoise": cfg.denoise,
            "sigma_vox": sigma,
            "nl_means": {
                "noise_sigma": noise[c] if noise is not None else 0.0,
                "h": cfg.nl_means_h,
                "patch_size": cfg.nl_means_patch_size,
                "patch_distance": cfg.nl_means_patch_distance,
            },
            "shift_zyx_px": tuple(float(v) for v in shifts[c]),
            "fill_value": cfg.fill_value,
        }
        if not use_dask:
            cal_c = (
                (dark[c : c + 1], inverse[c : c + 1]) if calibration is not None else (None, None)
            )
            channels.append(process_channel(np.asarray(volume[c]), *cal_c, **kwargs))
            continue
        import dask.array as da

        # one overlap for the whole chain: the filter's reach plus the shift's
        if cfg.denoise == "gaussian":
            reach = gaussian_depth(sigma)
        elif cfg.denoise == "nl_means":
            reach = nl_means_depth(cfg.nl_means_patch_size, cfg.nl_means_patch_distance)
        else:
            reach = (0, 0, 0)
        depth = [
            min(r + (0 if s == 0 else math.ceil(abs(s)) + 1), n)
            for r, s, n in zip(reach, shifts[c], (n_z, n_y, n_x), strict=True)
        ]
        raw_c = volume[c]
        if calibration is None:
            channels.append(
                raw_c.map_overlap(
                    process_channel,
                    depth=dict(enumerate(depth)),
                    boundary="none",
                    dtype=np.float32,
                    **kwargs,
                )
            )
            continue
        plane_chunks = (1, raw_c.chunks[1], raw_c.chunks[2])
        dark_c = da.from_array(dark[c : c + 1], chunks=plane_chunks)
        inverse_c = da.from_array(inverse[c : c + 1], chunks=plane_chunks)
        plane_depth = {0: 0, 1: depth[1], 2: depth[2]}
        channels.append(
            da.map_overlap(
                process_channel,
                raw_c,
                dark_c,
                inverse_c,
                depth=[dict(enumerate(depth)), plane_depth, plane_depth],
                boundary="none",
                dtype=np.float32,
                **kwargs,
            )
        )
    if use_dask:
        import dask.array as da

        out: Any = da.stack(channels)
    else:
        out = np.stack(channels)
    return PreprocessResult(
        data=out,
        percentile_values=ranges,
        shifts_applied_zyx_px=shifts,
        noise_sigma=tuple(noise) if noise is not None else None,
        chunks_zyx=chunks,
    )
