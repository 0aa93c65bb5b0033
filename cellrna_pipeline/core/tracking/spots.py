"""RNA spot tracking for live-RNA acquisitions: the cell tracker configured for points.

Spots are points with an intensity (and optionally an appearance embedding, see
:mod:`cellrna_pipeline.core.tracking.embedding`): the same frame-to-frame LAP with the
Kalman motion model, drift estimation and gap closing (blinking spots), without
divisions, shape or volume. Each RNA channel is tracked on its own.

>>> tracks = track_spots(spot_table, config=spot_tracking_config())   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import polars as pl

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.tracking.config import TrackingConfig
from cellrna_pipeline.core.tracking.tracker import track

__all__ = [
    "SPOT_APPEARANCE_SIGMA",
    "SPOT_TRACKING_DEFAULTS",
    "SPOT_TRACKS_SCHEMA",
    "spot_detections",
    "spot_tracking_config",
    "track_spots",
]

SPOT_TRACKS_SCHEMA: dict[str, type[pl.DataType] | pl.DataType] = {
    "track_id": pl.UInt32,
    "t": pl.Int32,
    "z": pl.Float64,
    "y": pl.Float64,
    "x": pl.Float64,
    "channel": pl.String,
    "z_um": pl.Float64,
    "y_um": pl.Float64,
    "x_um": pl.Float64,
    "spot_id": pl.UInt32,
    "intensity": pl.Float64,
}
"""Spot tracks, one row per spot and frame: ``track_id`` (>= 1, unique over all channels
of the table), ``t``, ``z, y, x`` in voxels (a napari Tracks layer with ``scale`` = voxel
size, per channel), ``channel``, the same position in um, the spot's ``spot_id`` in the
spot labels of frame ``t``, and its ``intensity``. Sorted by ``track_id`` then ``t``; a
track may skip frames (a blinking spot)."""

SPOT_TRACKING_DEFAULTS: dict[str, Any] = {
    "max_displacement_um": 1.5,
    "velocity_persistence": 0.0,
    "motion_sigma_um": 0.25,
    "adapt_motion": False,
    "position_sigma_um": 0.03,
    "shape_log_sigma": None,
    "volume_log_sigma": None,
    "intensity_log_sigma": 0.3,
    "max_link_cost": 30.0,
    "max_gap_frames": 2,
    "gap_cost_per_frame": 6.0,
    "divisions": False,
}
"""The tracker's settings for spots (chosen on the tuning seeds of the live-RNA benchmark,
``benchmarks/tracking.py --tune-spots``): a gate of 1.5 um per frame, a random-walk
motion model with a fixed spread (0.25 um per axis and frame), localisation noise 0.03 um,
the intensity cue, gap closing over two missing frames (blinking), no divisions. Set
``appearance_sigma`` (and give an ``embedding`` column) to add the learnt appearance."""


SPOT_APPEARANCE_SIGMA = 0.6
"""``appearance_sigma`` for the shipped spot embedding (``model_registry/spot-embedding``)
with :data:`SPOT_TRACKING_DEFAULTS`, chosen on the live-RNA tuning seeds (0.4-0.8 gave the
same link F1 within 0.003)."""


def _spot_tracks(det: pl.DataFrame, channel: str, offset: int) -> pl.DataFrame:
    """Tracked detections of one channel as :data:`SPOT_TRACKS_SCHEMA` rows (ids + offset)."""
    defaults = {"z_um": 0.0, "spot_id": 0, "mean_intensity": float("nan")}
    det = det.with_columns(
        pl.lit(v).alias(k) for k, v in defaults.items() if k not in det.columns
    ).with_columns(pl.col(f"{a}_um").alias(a) for a in "zyx" if a not in det.columns)
    extra = ["embedding"] if "embedding" in det.columns else []
    return det.select(
        pl.col("track_id") + offset,
        "t",
        "z",
        "y",
        "x",
        pl.lit(channel).alias("channel"),
        "z_um",
        "y_um",
        "x_um",
        "spot_id",
        pl.col("mean_intensity").alias("intensity"),
        *extra,
    ).cast(SPOT_TRACKS_SCHEMA)  # type: ignore[arg-type]


def spot_tracking_config(**overrides: Any) -> TrackingConfig:
    """:class:`TrackingConfig` for spots: :data:`SPOT_TRACKING_DEFAULTS` with ``overrides``."""
    return TrackingConfig(**{**SPOT_TRACKING_DEFAULTS, **overrides})


def spot_detections(spots: pl.DataFrame, *, channel: str | None = None) -> pl.DataFrame:
    """A spot table as tracker detections (one channel).

    Parameters
    ----------
    spots : one row per spot: ``timepoint`` (or ``t``), ``z_um``, ``y_um``, ``x_um``
        and optionally ``channel``, ``z``/``y``/``x`` (voxels), ``spot_id``,
        ``intensity`` (the detector's) or ``amplitude`` (the generator's), and
        ``embedding`` (fixed-length float vectors). Other columns are carried through.
    channel : keep only this channel (``None``: all rows, which must be one channel).

    Returns
    -------
    polars.DataFrame with ``t`` (Int32), the positions, ``mean_intensity`` (the intensity
    cue of :func:`~cellrna_pipeline.core.tracking.track`) and the other columns.
    """
    if not isinstance(spots, pl.DataFrame):
        raise InputError(f"spots must be a polars DataFrame, got {type(spots).__name__}")
    df = spots
    if channel is not None:
        if "channel" not in df.columns:
            raise InputError("the spot table has no channel column")
        df = df.filter(pl.col("channel") == channel)
    if "t" not in df.columns:
        if "timepoint" not in df.columns:
            raise InputError("the spot table has neither a timepoint nor a t column")
        df = df.rename({"timepoint": "t"})
    missing = [c for c in ("y_um", "x_um") if c not in df.columns]
    if missing:
        raise InputError(f"the spot table lacks column(s) {missing}")
    brightness = next((c for c in ("intensity", "amplitude") if c in df.columns), None)
    extra = [pl.col(brightness).cast(pl.Float64).alias("mean_intensity")] if brightness else []
    return df.with_columns(pl.col("t").cast(pl.Int32), *extra)


def track_spots(
    spots: pl.DataFrame,
    *,
    config: TrackingConfig | None = None,
    n_frames: int | None = None,
) -> pl.DataFrame:
    """Track the spots of every channel of a spot table.

    Parameters
    ----------
    spots : see :func:`spot_detections`; several channels are tracked separately.
    config : tracker settings (default :func:`spot_tracking_config`); must set
        ``max_displacement_um`` (points carry no size). With ``appearance_sigma`` set, the
        table must have an ``embedding`` column.
    n_frames : number of frames (default: last frame with a spot + 1).

    Returns
    -------
    polars.DataFrame with :data:`SPOT_TRACKS_SCHEMA` (plus ``embedding`` when given).

    Raises
    ------
    InputError
        Missing columns, NaN positions, no spots, divisions requested, or no gate.
    """
    config = config or spot_tracking_config()
    if config.max_displacement_um is None:
        raise InputError("spot tracking needs max_displacement_um (spots carry no size)")
    if config.divisions:
        raise InputError("spots do not divide: use a config with divisions=False")
    if not isinstance(spots, pl.DataFrame) or spots.height == 0:
        raise InputError("no spots to track")
    channels = (
        spots["channel"].unique(maintain_order=True).to_list()
        if "channel" in spots.columns
        else [None]
    )
    parts = []
    offset = 0
    for channel in channels:
        dets = spot_detections(spots, channel=channel)
        if dets.height == 0:
            continue
        result = track(dets, config=config, n_frames=n_frames)
        parts.append(_spot_tracks(result.detections, channel or "", offset))
        offset += int(result.lineage.height)
    if not parts:
        raise InputError("no spots to track")
    return pl.concat(parts).sort("track_id", "t")
