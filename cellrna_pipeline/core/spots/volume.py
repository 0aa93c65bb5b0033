"""All RNA channels of one volume: detect, label, assign to cells (what ``rna_spots`` runs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.spots.assign import assign_spots
from cellrna_pipeline.core.spots.config import SpotDetectionConfig
from cellrna_pipeline.core.spots.detect import detect_spots
from cellrna_pipeline.core.spots.labels import rasterize_spots
from cellrna_pipeline.core.types import VoxelSize

__all__ = ["SPOT_TABLE_SCHEMA", "rna_channels", "spots_for_volume"]

#: Columns of the per-partition spot table (Parquet) written by the ``rna_spots`` asset.
SPOT_TABLE_SCHEMA: dict[str, pl.DataType] = {
    "experiment": pl.String(),
    "timepoint": pl.Int32(),
    "channel": pl.String(),
    "spot_id": pl.UInt32(),
    "z": pl.Float64(),
    "y": pl.Float64(),
    "x": pl.Float64(),
    "z_um": pl.Float64(),
    "y_um": pl.Float64(),
    "x_um": pl.Float64(),
    "intensity": pl.Float64(),
    "score": pl.Float64(),
    "size_voxels": pl.UInt32(),
    "cell_id": pl.UInt32(),
    "compartment": pl.String(),
    "distance_to_nucleus_um": pl.Float64(),
}


def rna_channels(channel_names: Sequence[str]) -> list[str]:
    """The RNA channels (``rna0``, ``rna1``, ...) of an image, in order; InputError if none."""
    names = [c for c in channel_names if c.startswith("rna")]
    if not names:
        raise InputError(f"no RNA channel (rna0, rna1, ...) among {list(channel_names)}")
    return names


def spots_for_volume(
    volume_czyx: np.ndarray,
    *,
    channel_names: Sequence[str],
    cells_zyx: np.ndarray,
    nuclei_zyx: np.ndarray,
    voxel_size: VoxelSize,
    experiment: str,
    timepoint: int,
    config: SpotDetectionConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, pl.DataFrame]:
    """Detect, label and assign the spots of every RNA channel of one volume.

    Parameters
    ----------
    volume_czyx : ``(c, z, y, x)`` image with channels ``channel_names``.
    cells_zyx, nuclei_zyx : ``(z, y, x)`` integer cell and nucleus labels.
    voxel_size : voxel size (um).
    experiment, timepoint : written into the table.
    config : detector settings.

    Returns
    -------
    labels : ``(r, z, y, x)`` uint32 spot instance labels, one channel per RNA channel
        (spot ``spot_id`` has label ``spot_id``).
    table : one row per spot, columns :data:`SPOT_TABLE_SCHEMA`.
    """
    if volume_czyx.ndim != 4 or volume_czyx.shape[0] != len(channel_names):
        raise InputError(
            f"volume must be (c, z, y, x) with {len(channel_names)} channels, got {volume_czyx.shape}"
        )
    if cells_zyx.shape != volume_czyx.shape[1:] or nuclei_zyx.shape != volume_czyx.shape[1:]:
        raise InputError(
            f"cell/nucleus labels {cells_zyx.shape}/{nuclei_zyx.shape} do not match the image "
            f"{volume_czyx.shape[1:]}"
        )
    names = rna_channels(channel_names)
    shape = volume_czyx.shape[1:]
    labels = np.zeros((len(names), *shape), dtype=np.uint32)
    tables = []
    um = np.asarray(voxel_size.as_tuple())
    for r, name in enumerate(names):
        res = detect_spots(
            volume_czyx[list(channel_names).index(name)],
            voxel_size=voxel_size,
            config=config,
            progress=progress,
        )
        tab = res.table
        pos = tab.select(["z", "y", "x"]).to_numpy()
        labels[r] = rasterize_spots(pos, shape, sigma_vox=res.sigma_vox, labels=True).labels
        tab = assign_spots(tab, cells=cells_zyx, nuclei=nuclei_zyx, voxel_size=voxel_size)
        tab = tab.with_columns(
            pl.lit(experiment, dtype=pl.String).alias("experiment"),
            pl.lit(int(timepoint), dtype=pl.Int32).alias("timepoint"),
            pl.lit(name, dtype=pl.String).alias("channel"),
            (pl.col("z") * float(um[0])).alias("z_um"),
            (pl.col("y") * float(um[1])).alias("y_um"),
            (pl.col("x") * float(um[2])).alias("x_um"),
        )
        tables.append(tab.select(list(SPOT_TABLE_SCHEMA)).cast(SPOT_TABLE_SCHEMA))  # type: ignore[arg-type]
    table = pl.concat(tables) if tables else pl.DataFrame(schema=SPOT_TABLE_SCHEMA)
    return labels, table
