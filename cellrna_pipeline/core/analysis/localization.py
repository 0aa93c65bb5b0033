"""RNA localization per cell: counts by compartment, distance to the nucleus, polarization
and dispersion."""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import ndimage

from cellrna_pipeline.core.types import VoxelSize

LOCALIZATION_SCHEMA = {
    "cell_id": pl.Int64,
    "channel": pl.Utf8,
    "n_spots": pl.Int64,
    "n_nucleus": pl.Int64,
    "n_cytoplasm": pl.Int64,
    "nuclear_fraction": pl.Float64,
    "mean_distance_to_nucleus_um": pl.Float64,
    "median_distance_to_nucleus_um": pl.Float64,
    "polarization_index": pl.Float64,
    "dispersion_index": pl.Float64,
}


def _cell_moments(cells: np.ndarray, spacing: np.ndarray) -> dict[int, tuple[np.ndarray, float]]:
    """Centroid (um) and mean squared radius (um^2) of every cell's voxels."""
    ids = np.unique(cells)
    ids = ids[ids != 0]
    if ids.size == 0:
        return {}
    index = ids.astype(np.int64)
    grids = np.indices(cells.shape, sparse=True)
    out: dict[int, tuple[np.ndarray, float]] = {}
    means = []
    squares = []
    for axis in range(3):
        coord = np.broadcast_to(grids[axis] * spacing[axis], cells.shape)
        means.append(np.asarray(ndimage.mean(coord, cells, index)))
        squares.append(np.asarray(ndimage.mean(coord**2, cells, index)))
    for k, cell_id in enumerate(index):
        centroid = np.array([means[a][k] for a in range(3)])
        variance = sum(squares[a][k] - means[a][k] ** 2 for a in range(3))
        out[int(cell_id)] = (centroid, float(variance))
    return out


def rna_localization(
    spots: pl.DataFrame, cells: np.ndarray, *, voxel_size: VoxelSize
) -> pl.DataFrame:
    """Per cell and RNA channel: counts, nuclear fraction, distances, polarization, dispersion.

    Parameters
    ----------
    spots : one volume's spots with ``channel``, ``cell_id`` (0 = outside), ``compartment``,
        ``z_um``, ``y_um``, ``x_um`` and ``distance_to_nucleus_um`` (distance of the spot
        centre to the nucleus surface, 3D anisotropic).
    cells : int array (z, y, x), the cell labels of the same volume.
    voxel_size : physical voxel size (micrometres).

    Returns
    -------
    One row per (cell, channel), cells without spots included with zero counts, with
    :data:`LOCALIZATION_SCHEMA`. ``polarization_index`` is the distance between the spots'
    centroid and the cell's centroid divided by the cell's radius of gyration;
    ``dispersion_index`` is the spots' mean squared distance to the cell centroid divided
    by the cell's (1 for RNA spread like the cell's volume, < 1 concentrated near the
    centre, > 1 towards the periphery). Both need at least 2 spots.
    """
    spacing = np.asarray(voxel_size.as_tuple())
    moments = _cell_moments(cells, spacing)
    channels = sorted(set(spots["channel"].to_list())) if spots.height else []
    inside = spots.filter(pl.col("cell_id") > 0)
    rows = []
    for channel in channels:
        per_channel = inside.filter(pl.col("channel") == channel)
        groups = {int(k[0]): g for k, g in per_channel.group_by(["cell_id"])}
        for cell_id, (centroid, var) in moments.items():
            g = groups.get(cell_id)
            n = 0 if g is None else g.height
            row: dict[str, object] = {"cell_id": cell_id, "channel": channel, "n_spots": n}
            if g is None or n == 0:
                row.update(n_nucleus=0, n_cytoplasm=0)
                rows.append(row)
                continue
            n_nuc = int((g["compartment"] == "nucleus").sum())
            xyz = g.select("z_um", "y_um", "x_um").to_numpy()
            dist = (
                g["distance_to_nucleus_um"].to_numpy()
                if "distance_to_nucleus_um" in g.columns
                else None
            )
            row.update(
                n_nucleus=n_nuc,
                n_cytoplasm=n - n_nuc,
                nuclear_fraction=n_nuc / n,
                mean_distance_to_nucleus_um=float(np.mean(dist)) if dist is not None else None,
                median_distance_to_nucleus_um=float(np.median(dist)) if dist is not None else None,
            )
            if n >= 2 and var > 0:
                row["polarization_index"] = float(
                    np.linalg.norm(xyz.mean(axis=0) - centroid) / np.sqrt(var)
                )
                row["dispersion_index"] = float(
                    np.mean(np.sum((xyz - centroid) ** 2, axis=1)) / var
                )
            rows.append(row)
    return pl.DataFrame(rows, schema=LOCALIZATION_SCHEMA)
