"""Assemble the warehouse's derived tables from one volume's labels and spots, and from
an experiment's per-volume rows (pure: arrays and polars in, polars out)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from cellrna_pipeline.core.analysis.behavior import experiment_summary, track_behavior
from cellrna_pipeline.core.analysis.colocalization import colocalize
from cellrna_pipeline.core.analysis.features import cell_features
from cellrna_pipeline.core.analysis.localization import rna_localization
from cellrna_pipeline.core.types import VoxelSize


def label_mapping(source: np.ndarray, target: np.ndarray) -> dict[int, int]:
    """For each non-zero id of ``source``, the most frequent non-zero id of ``target`` under
    it (0 if none): e.g. cell id -> track id."""
    both = (source > 0) & (target > 0)
    if not both.any():
        return {}
    pairs = np.stack([source[both], target[both]], axis=1).astype(np.int64)
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    order = np.lexsort((-counts, uniq[:, 0]))
    best: dict[int, int] = {}
    for s, t in uniq[order]:
        best.setdefault(int(s), int(t))
    return best


def volume_tables(
    *,
    image: np.ndarray,
    cells: np.ndarray,
    nuclei: np.ndarray,
    tracks: np.ndarray | None,
    spots: pl.DataFrame,
    voxel_size: VoxelSize,
    channel_names: Sequence[str],
    drift_zyx_um: Sequence[float] = (0.0, 0.0, 0.0),
    colocalization_distance_um: float = 0.3,
) -> dict[str, pl.DataFrame]:
    """The per-volume tables of one timepoint.

    Parameters
    ----------
    image : (c, z, y, x) preprocessed image.
    cells, nuclei : (z, y, x) instance labels (a nucleus has its cell's id).
    tracks : (z, y, x) cell labels relabelled by track id, or None before tracking.
    spots : the volume's spot table (``channel``, ``cell_id``, ``compartment``, ``*_um``, ...).
    voxel_size : micrometres.
    channel_names : names of the image channels.
    drift_zyx_um : the registration shift applied to this volume.

    Returns
    -------
    ``{"cells", "nuclei", "volumes", "rna_localization", "colocalization"}`` frames
    (without the experiment/timepoint keys, which the writer adds).
    """
    cell_df = cell_features(cells, image, voxel_size=voxel_size, channel_names=channel_names)
    nuc_df = cell_features(
        nuclei, image[:1], voxel_size=voxel_size, channel_names=channel_names[:1]
    )
    if cell_df.height:
        nuc_vol = nuc_df.select("cell_id", pl.col("volume_um3").alias("nucleus_volume_um3"))
        cell_df = cell_df.join(nuc_vol, on="cell_id", how="left").with_columns(
            (pl.col("nucleus_volume_um3") / pl.col("volume_um3")).alias(
                "nucleus_to_cell_volume_ratio"
            )
        )
        track_of = label_mapping(cells, tracks) if tracks is not None else {}
        cell_df = cell_df.with_columns(
            pl.col("cell_id")
            .replace_strict(track_of, default=None, return_dtype=pl.Int64)
            .alias("track_id")
        )
    rna_channels = [c for c in channel_names if c.startswith("rna")]
    colocs = [
        colocalize(
            spots,
            cells,
            voxel_size=voxel_size,
            channel_a=a,
            channel_b=b,
            max_distance_um=colocalization_distance_um,
        )
        for i, a in enumerate(rna_channels)
        for b in rna_channels[i + 1 :]
    ]
    volumes = pl.DataFrame(
        {
            "size_z": [cells.shape[0]],
            "size_y": [cells.shape[1]],
            "size_x": [cells.shape[2]],
            "n_channels": [image.shape[0]],
            "voxel_z_um": [voxel_size.z_um],
            "voxel_y_um": [voxel_size.y_um],
            "voxel_x_um": [voxel_size.x_um],
            "drift_z_um": [float(drift_zyx_um[0])],
            "drift_y_um": [float(drift_zyx_um[1])],
            "drift_x_um": [float(drift_zyx_um[2])],
            "n_cells": [cell_df.height],
            "n_spots": [spots.height],
        }
    )
    return {
        "cells": cell_df,
        "nuclei": nuc_df,
        "volumes": volumes,
        "rna_localization": rna_localization(spots, cells, voxel_size=voxel_size),
        "colocalization": pl.concat(colocs) if colocs else pl.DataFrame(),
    }


def _mean(series: pl.Series) -> float | None:
    """Mean of a numeric series, None when empty or all null."""
    value = series.mean()
    return float(value) if isinstance(value, int | float) else None


def experiment_tables(
    cells: pl.DataFrame,
    lineage: pl.DataFrame,
    localization: pl.DataFrame,
    *,
    n_timepoints: int,
    frame_interval_s: float,
) -> dict[str, pl.DataFrame]:
    """Experiment-level tables from the per-volume rows.

    Parameters
    ----------
    cells : all timepoints' cell rows (``timepoint``, ``cell_id``, ``track_id``, centroids, volume).
    lineage : ``track_id``, ``begin``, ``end``, ``parent_track_id``.
    localization : all timepoints' ``rna_localization`` rows.

    Returns
    -------
    ``{"cell_behavior", "experiment_summary"}`` (the tracks table itself is the tracker's).
    """
    tracked = cells.filter(pl.col("track_id").is_not_null())
    behavior = track_behavior(
        tracked.select(
            "track_id", "timepoint", "centroid_z_um", "centroid_y_um", "centroid_x_um", "volume_um3"
        ),
        frame_interval_s=frame_interval_s,
    )
    per_t = cells.group_by("timepoint").len().sort("timepoint")["len"].to_list()
    summary = experiment_summary(
        lineage,
        n_timepoints=n_timepoints,
        frame_interval_s=frame_interval_s,
        n_cells_per_timepoint=per_t,
    )
    n_spots = int(localization["n_spots"].sum()) if localization.height else 0
    summary.update(
        frame_interval_s=frame_interval_s,
        n_spots=n_spots,
        mean_spots_per_cell=n_spots / cells.height if cells.height else None,
        mean_nuclear_fraction=_mean(localization["nuclear_fraction"]),
    )
    return {
        "cell_behavior": behavior,
        "experiment_summary": pl.DataFrame([summary]),
    }
