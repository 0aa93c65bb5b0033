"""Typed settings of the preprocessing stage (pydantic, unknown keys refused).

Lengths are micrometres (``_um``) or nanometres (``_nm``), sizes in voxels (``_px``),
camera values in counts (``_adu``); every ``zyx`` tuple is in ``(z, y, x)`` order.
"""

from __future__ import annotations

import math
from typing import Literal

from cellrna_pipeline.core.config import CheckedModel
from cellrna_pipeline.core.errors import InputError

__all__ = ["CalibrationConfig", "PreprocessConfig", "RegistrationConfig"]


def _positive(name: str, *values: float) -> None:
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise InputError(f"{name} must be positive and finite, got {list(values)}")


def _non_negative(name: str, *values: float) -> None:
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise InputError(f"{name} must be >= 0 and finite, got {list(values)}")


class CalibrationConfig(CheckedModel):
    """How :func:`~cellrna_pipeline.core.preprocess.estimate_camera_calibration` works.

    Attributes
    ----------
    flat_poly_degree : degree (per axis) of the smooth 2-D Legendre surface fitted to a
        flat-field (the vignetting is smooth; the fit removes the images' shot noise).
    background_percentile : without a flat image, the flat-field is estimated from the
        data as this per-pixel percentile over many planes (the background), smoothed.
    max_planes : planes per channel sampled (evenly over timepoints and z) for the
        data-based estimates.
    camera_offset_adu : camera offset to subtract when the acquisition has no dark
        image; ``None`` estimates it from the data (photon-transfer fit of the background).
    chromatic : ``"auto"`` (beads if the acquisition has a bead image, else
        cross-correlation between channels, kept only if it is unambiguous), ``"beads"``,
        ``"data"``, or ``"none"`` (no channel shift correction).
    reference_channel : the channel the others are aligned to (index).
    max_chromatic_shift_px : an estimated channel shift larger than this (z, y, x, in
        voxels) is treated as a failed estimate and not applied.
    """

    flat_poly_degree: int = 6
    background_percentile: float = 10.0
    max_planes: int = 96
    camera_offset_adu: float | None = None
    chromatic: Literal["auto", "beads", "data", "none"] = "auto"
    reference_channel: int = 0
    max_chromatic_shift_px: tuple[float, float, float] = (2.0, 5.0, 5.0)

    def _check(self) -> None:
        if not 0 <= self.flat_poly_degree <= 20:
            raise InputError(f"flat_poly_degree must be in 0..20, got {self.flat_poly_degree}")
        if not 0 < self.background_percentile < 100:
            raise InputError(
                f"background_percentile must be in (0, 100), got {self.background_percentile}"
            )
        if self.max_planes < 2:
            raise InputError(f"max_planes must be >= 2, got {self.max_planes}")
        if self.camera_offset_adu is not None:
            _non_negative("camera_offset_adu", self.camera_offset_adu)
        if self.reference_channel < 0:
            raise InputError(f"reference_channel must be >= 0, got {self.reference_channel}")
        _positive("max_chromatic_shift_px", *self.max_chromatic_shift_px)


class RegistrationConfig(CheckedModel):
    """Translation registration (drift between timepoints, shifts between channels).

    Attributes
    ----------
    channel : channel name to register on; ``None``: ``"nucleus"`` if present, else the
        first channel.
    reference_timepoint : shifts are relative to this timepoint (its shift is 0).
    strategy : ``"chain"`` (default): register each timepoint to its neighbour towards the
        reference and sum the steps, re-anchoring on the reference when a direct
        refinement agrees within ``anchor_tolerance_px``; robust when cells move.
        ``"reference"``: register every timepoint directly to the reference.
    anchor_tolerance_px : see ``strategy`` (0 disables re-anchoring).
    smoothing_um : Gaussian sigma (z, y, x) in um applied before the sub-voxel refinement;
        physical units, so anisotropic voxels get a matching (smaller) sigma in z.
    max_crop_zyx : registration uses at most this central crop (voxels) of each volume;
        bounds time and memory on large volumes (shifts must stay well below half of it).
    max_iterations : Gauss-Newton iterations of the refinement.
    tolerance_px : stop when an update is smaller than this (voxels, every axis).
    """

    channel: str | None = None
    reference_timepoint: int = 0
    strategy: Literal["chain", "reference"] = "chain"
    anchor_tolerance_px: float = 1.0
    smoothing_um: tuple[float, float, float] = (0.3, 0.3, 0.3)
    max_crop_zyx: tuple[int, int, int] = (64, 384, 384)
    max_iterations: int = 20
    tolerance_px: float = 1e-3

    def _check(self) -> None:
        if self.reference_timepoint < 0:
            raise InputError(f"reference_timepoint must be >= 0, got {self.reference_timepoint}")
        _non_negative("smoothing_um", *self.smoothing_um)
        _non_negative("anchor_tolerance_px", self.anchor_tolerance_px)
        if any(s < 4 for s in self.max_crop_zyx):
            raise InputError(f"max_crop_zyx must be >= 4 voxels, got {list(self.max_crop_zyx)}")
        if self.max_iterations < 1:
            raise InputError(f"max_iterations must be >= 1, got {self.max_iterations}")
        _positive("tolerance_px", self.tolerance_px)


class PreprocessConfig(CheckedModel):
    """Per-volume preprocessing: normalize, denoise, then shift (calibration comes first).

    Attributes
    ----------
    percentiles : low and high percentiles that map to 0 and 1 per channel.
    percentile_planes : z-planes sampled per channel to compute them (each 3x3
        median-filtered first, so isolated hot pixels do not count).
    denoise : ``"gaussian"`` (default, fast), ``"nl_means"`` (scikit-image non-local
        means per z-plane; slower, better edges) or ``"none"``.
    gaussian_sigma_nm : Gaussian sigma (z, y, x) in nm.
    nl_means_patch_size, nl_means_patch_distance : patch width and search radius in
        voxels (per z-plane).
    nl_means_h : filter strength in units of the estimated noise sigma.
    interpolation : shifts are applied by ``"linear"`` interpolation (local, so chunked
        results equal single-block ones exactly).
    fill_value : value (normalized units) of voxels shifted in from outside the field.
    chunk_mib : target size of one processing chunk in MiB (z is split to reach it;
        y and x chunks are 256).
    """

    percentiles: tuple[float, float] = (1.0, 99.8)
    percentile_planes: int = 16
    denoise: Literal["none", "gaussian", "nl_means"] = "gaussian"
    gaussian_sigma_nm: tuple[float, float, float] = (300.0, 75.0, 75.0)
    nl_means_patch_size: int = 5
    nl_means_patch_distance: int = 6
    nl_means_h: float = 0.8
    interpolation: Literal["linear"] = "linear"
    fill_value: float = 0.0
    chunk_mib: float = 8.0

    def _check(self) -> None:
        lo, hi = self.percentiles
        if not (0 <= lo < hi <= 100):
            raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got {[lo, hi]}")
        if self.percentile_planes < 1:
            raise InputError(f"percentile_planes must be >= 1, got {self.percentile_planes}")
        _non_negative("gaussian_sigma_nm", *self.gaussian_sigma_nm)
        if self.nl_means_patch_size < 1 or self.nl_means_patch_distance < 1:
            raise InputError("nl_means_patch_size and nl_means_patch_distance must be >= 1")
        _positive("nl_means_h", self.nl_means_h)
        if not math.isfinite(self.fill_value):
            raise InputError(f"fill_value must be finite, got {self.fill_value}")
        _positive("chunk_mib", self.chunk_mib)
