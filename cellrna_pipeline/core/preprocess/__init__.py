"""Preprocessing of 3D(+t) acquisitions: camera calibration, normalization, denoising,
drift registration and slicing, in memory or chunked with dask.

Axis order is ``(c, z, y, x)`` for one timepoint and ``(z, y, x)`` for one channel;
physical sizes are micrometres (``_um``) or nanometres (``_nm``), shifts voxels (``_px``).

>>> cal = estimate_camera_calibration(channel_names=names, shape_yx=(y, x),   # doctest: +SKIP
...     voxel_size=vox, dark_frames=dark, flat_images=flat, beads_czyx=beads)
>>> drift = estimate_drift(read_nucleus, range(n_t), voxel_size=vox)          # doctest: +SKIP
>>> out = preprocess_volume(raw_t, voxel_size=vox, calibration=cal,            # doctest: +SKIP
...     drift_zyx_px=drift_of(drift, t), chunked=True)
>>> out.data   # (c, z, y, x) float32 dask array: store it chunk by chunk          # doctest: +SKIP

Modules: ``calibration`` (dark, flat-field, chromatic shifts), ``normalize``
(percentiles), ``denoise`` (Gaussian, non-local means), ``register`` (sub-voxel
translation, shifts), ``drift`` (a time series of shifts), ``slicing`` (2-D sections),
``chunked`` (dask execution with exact chunk borders), ``pipeline`` (one volume through
everything), ``store`` (files under the data root).
"""

from cellrna_pipeline.core.preprocess.calibration import (
    CameraCalibration,
    apply_calibration,
    dark_from_frames,
    estimate_camera_calibration,
    estimate_camera_offset,
    estimate_channel_shifts,
    estimate_flat_field,
    flat_from_images,
    smooth_flat_field,
)
from cellrna_pipeline.core.preprocess.chunked import (
    auto_chunks_zyx,
    filter_chunked,
    shift_chunked,
    to_dask,
)
from cellrna_pipeline.core.preprocess.config import (
    CalibrationConfig,
    PreprocessConfig,
    RegistrationConfig,
)
from cellrna_pipeline.core.preprocess.denoise import (
    estimate_noise_sigma,
    gaussian_denoise,
    gaussian_depth,
    gaussian_sigma_vox,
    nl_means_denoise,
    nl_means_depth,
)
from cellrna_pipeline.core.preprocess.drift import (
    DRIFT_SCHEMA,
    drift_of,
    estimate_drift,
    previous_timepoint,
    registration_channel,
)
from cellrna_pipeline.core.preprocess.normalize import (
    normalize_percentile,
    percentile_range,
    sample_plane_indices,
)
from cellrna_pipeline.core.preprocess.pipeline import (
    PreprocessResult,
    preprocess_volume,
    process_channel,
)
from cellrna_pipeline.core.preprocess.register import (
    Registration,
    central_crop,
    register_translation,
    shift_volume,
)
from cellrna_pipeline.core.preprocess.slicing import from_sections, to_sections

__all__ = [
    "DRIFT_SCHEMA",
    "CalibrationConfig",
    "CameraCalibration",
    "PreprocessConfig",
    "PreprocessResult",
    "Registration",
    "RegistrationConfig",
    "apply_calibration",
    "auto_chunks_zyx",
    "central_crop",
    "dark_from_frames",
    "drift_of",
    "estimate_camera_calibration",
    "estimate_camera_offset",
    "estimate_channel_shifts",
    "estimate_drift",
    "estimate_flat_field",
    "estimate_noise_sigma",
    "filter_chunked",
    "flat_from_images",
    "from_sections",
    "gaussian_denoise",
    "gaussian_depth",
    "gaussian_sigma_vox",
    "nl_means_denoise",
    "nl_means_depth",
    "normalize_percentile",
    "percentile_range",
    "preprocess_volume",
    "previous_timepoint",
    "process_channel",
    "register_translation",
    "registration_channel",
    "sample_plane_indices",
    "shift_chunked",
    "shift_volume",
    "smooth_flat_field",
    "to_dask",
    "to_sections",
]
