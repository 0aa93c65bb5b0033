"""Settings of the classical spot detector and the physical-unit helpers it needs.

Lengths are nanometres (``_nm``) on the command line and in configs; filters work in
voxels. Every ``zyx`` tuple is in ``(z, y, x)`` order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError, field_validator

from cellrna_pipeline.core.config import StrictModel
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.types import VoxelSize

__all__ = ["DEFAULT_SPOT_RADIUS_NM", "SpotDetectionConfig", "psf_sigma_vox"]

DEFAULT_SPOT_RADIUS_NM: tuple[float, float, float] = (350.0, 150.0, 150.0)
"""A diffraction-limited spot: Gaussian PSF sigma ~350 nm axial, ~150 nm lateral."""


class SpotDetectionConfig(StrictModel):
    """Settings of :func:`~cellrna_pipeline.core.spots.detect_spots` (unknown keys refused).

    Attributes
    ----------
    spot_radius_nm : Gaussian sigma of a single spot (the PSF) along ``z, y, x``, in nm.
    threshold_sigma : fixed detection threshold in units of the noise std of the
        band-passed image; ``None`` (default) chooses it per image between
        ``faint_threshold_sigma`` and ``bright_threshold_sigma`` from how bright the
        spots are (see ``docs/spots.md``).
    faint_threshold_sigma, bright_threshold_sigma : the automatic threshold's range:
        faint spots need a low threshold to be found at all, bright spots afford a high
        one that rejects background structure (cell edges, texture).
    background_radius : half-width of the local-background box, in spot sigmas.
    decompose : split dense clusters (blobs wider than one spot) into single spots.
    cluster_extent_ratio : a blob counts as a cluster when its spread exceeds a single
        spot's by this factor (on the summed variance over axes).
    chunk_shape_zyx : process the volume in chunks of this shape (a dask task per chunk,
        with a halo that makes the result identical to one block); ``None`` picks
        chunks of about 4 M voxels (up to 64 x 256 x 256) for images larger than that,
        else one block. Peak memory is about 60 bytes per voxel of a chunk (with its
        halo) times the dask worker threads, plus the candidates and spots.
    """

    spot_radius_nm: tuple[float, float, float] = DEFAULT_SPOT_RADIUS_NM
    threshold_sigma: float | None = None
    faint_threshold_sigma: float = 4.25
    bright_threshold_sigma: float = 6.0
    background_radius: float = 2.0
    decompose: bool = True
    cluster_extent_ratio: float = 1.3
    chunk_shape_zyx: tuple[int, int, int] | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            # Our range checks raise InputError inside pydantic: surface it as one line.
            for err in exc.errors():
                inner = (err.get("ctx") or {}).get("error")
                if isinstance(inner, InputError):
                    raise InputError(str(inner)) from None
            raise

    @field_validator("spot_radius_nm")
    @classmethod
    def _positive_radius(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not math.isfinite(x) or x <= 0 for x in v):
            raise InputError(f"spot_radius_nm must be 3 positive finite values, got {list(v)}")
        return v

    @field_validator("threshold_sigma", "faint_threshold_sigma", "bright_threshold_sigma")
    @classmethod
    def _positive_threshold(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise InputError(f"threshold must be a positive number of sigmas, got {v!r}")
        return v

    @field_validator("background_radius", "cluster_extent_ratio")
    @classmethod
    def _above_one(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 1:
            raise InputError(f"background_radius and cluster_extent_ratio must be > 1, got {v!r}")
        return v

    @field_validator("chunk_shape_zyx")
    @classmethod
    def _chunks(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and any(c < 1 for c in v):
            raise InputError(f"chunk_shape_zyx must be positive, got {list(v)}")
        return v


def psf_sigma_vox(
    voxel_size: VoxelSize, spot_radius_nm: Sequence[float], *, is_2d: bool = False
) -> tuple[float, float, float]:
    """Spot sigma in voxels ``(z, y, x)``; ``z`` is 0 for a 2-D image.

    Parameters
    ----------
    voxel_size : physical voxel size (um).
    spot_radius_nm : spot (PSF) sigma ``(z, y, x)`` in nm.
    is_2d : the image has one plane: no filtering along z.
    """
    if len(spot_radius_nm) != 3:
        raise InputError(f"spot radius needs 3 values Z Y X in nm, got {len(spot_radius_nm)}")
    z, y, x = (float(r) / float(v) for r, v in zip(spot_radius_nm, voxel_size.as_nm(), strict=True))
    if min(y, x) < 0.3:
        raise InputError(
            f"spot radius {list(spot_radius_nm)} nm is {min(y, x):.2f} voxel laterally: "
            "below 0.3 voxel a spot cannot be told from noise (check --voxel-size-nm)"
        )
    if max(y, x) > 20:
        raise InputError(
            f"spot radius {list(spot_radius_nm)} nm is {max(y, x):.1f} voxels laterally: "
            "more than 20 voxels is not a diffraction-limited spot (check --voxel-size-nm)"
        )
    return (0.0 if is_2d else z, y, x)
