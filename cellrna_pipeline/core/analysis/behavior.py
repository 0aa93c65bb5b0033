"""Cell behaviour from tracks: motion per track and division statistics per experiment."""

from __future__ import annotations

import numpy as np
import polars as pl

TRACK_POINT_COLUMNS = (
    "track_id",
    "timepoint",
    "centroid_z_um",
    "centroid_y_um",
    "centroid_x_um",
    "volume_um3",
)


def _msd(xyz: np.ndarray, max_lag: int) -> np.ndarray:
    """Mean squared displacement (um^2) for lags 1..max_lag of an (n, 3) trajectory."""
    return np.array(
        [np.mean(np.sum((xyz[lag:] - xyz[:-lag]) ** 2, axis=1)) for lag in range(1, max_lag + 1)]
    )


def track_behavior(points: pl.DataFrame, *, frame_interval_s: float) -> pl.DataFrame:
    """Motion and morphology change of every track.

    Parameters
    ----------
    points : one row per (track, timepoint) with :data:`TRACK_POINT_COLUMNS` (centroids in
        micrometres, volume in cubic micrometres).
    frame_interval_s : seconds between consecutive timepoints.

    Returns
    -------
    One row per track: ``track_id``, ``n_frames``, ``first_timepoint``, ``last_timepoint``,
    ``duration_min``, ``path_length_um``, ``displacement_um`` (first to last),
    ``mean_speed_um_per_min`` (path length / duration), ``straightness``
    (displacement / path length, 1 = straight), ``msd_lag1_um2``, ``msd_alpha`` (slope of
    log MSD over log lag; ~1 diffusive, ~2 directed; null under 4 frames),
    ``volume_change_per_frame`` (mean absolute relative volume change between frames).
    Gaps (missing frames) are bridged: speeds use the real time between observations.
    """
    if frame_interval_s <= 0:
        raise ValueError(f"frame_interval_s must be > 0, got {frame_interval_s}")
    missing = [c for c in TRACK_POINT_COLUMNS if c not in points.columns]
    if missing:
        raise ValueError(f"points lack columns {missing}")
    rows = []
    for (track_id,), group in points.sort("timepoint").group_by(["track_id"], maintain_order=True):
        t = group["timepoint"].to_numpy()
        xyz = group.select("centroid_z_um", "centroid_y_um", "centroid_x_um").to_numpy()
        vol = group["volume_um3"].to_numpy().astype(np.float64)
        steps = np.linalg.norm(np.diff(xyz, axis=0), axis=1)
        path = float(steps.sum())
        disp = float(np.linalg.norm(xyz[-1] - xyz[0])) if len(xyz) > 1 else 0.0
        duration_min = float((t[-1] - t[0]) * frame_interval_s / 60.0)
        msd = _msd(xyz, min(len(xyz) - 1, max(1, len(xyz) // 2))) if len(xyz) > 1 else np.array([])
        alpha = None
        if len(xyz) >= 4 and np.all(msd > 0):
            lags = np.arange(1, len(msd) + 1)
            alpha = float(np.polyfit(np.log(lags), np.log(msd), 1)[0]) if len(msd) >= 2 else None
        rel = np.abs(np.diff(vol)) / np.maximum(vol[:-1], 1e-9) if len(vol) > 1 else np.array([])
        rows.append(
            {
                "track_id": int(track_id),
                "n_frames": len(t),
                "first_timepoint": int(t[0]),
                "last_timepoint": int(t[-1]),
                "duration_min": duration_min,
                "path_length_um": path,
                "displacement_um": disp,
                "mean_speed_um_per_min": path / duration_min if duration_min > 0 else None,
                "straightness": disp / path if path > 0 else None,
                "msd_lag1_um2": float(msd[0]) if msd.size else None,
                "msd_alpha": alpha,
                "volume_change_per_frame": float(rel.mean()) if rel.size else None,
            }
        )
    return pl.DataFrame(rows, schema=BEHAVIOR_SCHEMA)


BEHAVIOR_SCHEMA = {
    "track_id": pl.Int64,
    "n_frames": pl.Int64,
    "first_timepoint": pl.Int64,
    "last_timepoint": pl.Int64,
    "duration_min": pl.Float64,
    "path_length_um": pl.Float64,
    "displacement_um": pl.Float64,
    "mean_speed_um_per_min": pl.Float64,
    "straightness": pl.Float64,
    "msd_lag1_um2": pl.Float64,
    "msd_alpha": pl.Float64,
    "volume_change_per_frame": pl.Float64,
}


def experiment_summary(
    lineage: pl.DataFrame,
    *,
    n_timepoints: int,
    frame_interval_s: float,
    n_cells_per_timepoint: list[int],
) -> dict[str, float | int | None]:
    """Division statistics of one experiment.

    Parameters
    ----------
    lineage : one row per track: ``track_id``, ``begin``, ``end`` (timepoints, inclusive),
        ``parent_track_id`` (0 = none), as in the CTC ``res_track.txt``.
    n_timepoints : timepoints in the experiment.
    frame_interval_s : seconds between timepoints.
    n_cells_per_timepoint : cells observed at each timepoint (for cell-hours).

    Returns
    -------
    ``n_tracks``, ``n_divisions`` (parents with two daughters), ``division_rate_per_cell_hour``
    (divisions / observed cell-hours), ``cell_cycle_length_h`` (mean lifetime of tracks
    born by division that end in a division; null if none is complete), ``mean_cells``.
    """
    children = lineage.filter(pl.col("parent_track_id") > 0).group_by("parent_track_id").len()
    dividing = set(children.filter(pl.col("len") == 2)["parent_track_id"].to_list())
    cell_hours = sum(n_cells_per_timepoint) * frame_interval_s / 3600.0
    born = lineage.filter(
        (pl.col("parent_track_id") > 0) & pl.col("track_id").is_in(list(dividing))
    )
    cycles = ((born["end"] - born["begin"] + 1) * frame_interval_s / 3600.0).to_list()
    return {
        "n_timepoints": n_timepoints,
        "n_tracks": lineage.height,
        "n_divisions": len(dividing),
        "division_rate_per_cell_hour": len(dividing) / cell_hours if cell_hours > 0 else None,
        "cell_cycle_length_h": float(np.mean(cycles)) if cycles else None,
        "mean_cells": float(np.mean(n_cells_per_timepoint)) if n_cells_per_timepoint else 0.0,
    }
