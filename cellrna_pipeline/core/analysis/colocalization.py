"""Two-channel colocalization of RNA spots, with the level expected by chance."""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from cellrna_pipeline.core.types import VoxelSize

COLOCALIZATION_SCHEMA = {
    "cell_id": pl.Int64,
    "channel_a": pl.Utf8,
    "channel_b": pl.Utf8,
    "n_a": pl.Int64,
    "n_b": pl.Int64,
    "n_colocalized": pl.Int64,
    "fraction_a_colocalized": pl.Float64,
    "fraction_b_colocalized": pl.Float64,
    "expected_fraction_a_by_chance": pl.Float64,
    "enrichment": pl.Float64,
    "max_distance_um": pl.Float64,
}


def match_count(a_um: np.ndarray, b_um: np.ndarray, max_distance_um: float) -> int:
    """Number of one-to-one pairs between point sets (n, 3) and (m, 3), in micrometres,
    closer than ``max_distance_um`` (Hungarian matching on the distances)."""
    if len(a_um) == 0 or len(b_um) == 0:
        return 0
    pairs = cKDTree(a_um).sparse_distance_matrix(cKDTree(b_um), max_distance_um).tocoo()
    if pairs.nnz == 0:
        return 0
    big = max_distance_um * 10 + 1.0
    cost = np.full((len(a_um), len(b_um)), big)
    cost[pairs.row, pairs.col] = pairs.data
    rows, cols = linear_sum_assignment(cost)
    return int(np.sum(cost[rows, cols] <= max_distance_um))


def colocalize(
    spots: pl.DataFrame,
    cells: np.ndarray,
    *,
    voxel_size: VoxelSize,
    channel_a: str = "rna0",
    channel_b: str = "rna1",
    max_distance_um: float = 0.3,
    n_random: int = 20,
    seed: int = 0,
) -> pl.DataFrame:
    """Per cell: how many spots of channel A pair one-to-one with spots of channel B.

    The chance level places the same numbers of A and B spots uniformly at random inside
    the same cell's voxels (``n_random`` trials, seeded) and matches them the same way.

    Parameters
    ----------
    spots : one volume's spots with ``channel``, ``cell_id``, ``z_um``, ``y_um``, ``x_um``.
    cells : int array (z, y, x), the cell labels of the same volume.
    voxel_size : physical voxel size (micrometres).
    max_distance_um : largest distance of a colocalized pair.

    Returns
    -------
    One row per cell with spots of both channels, :data:`COLOCALIZATION_SCHEMA`;
    ``enrichment`` = observed / expected fraction (null when the expectation is 0).
    """
    rng = np.random.default_rng(seed)
    spacing = np.asarray(voxel_size.as_tuple())
    rows = []
    inside = spots.filter(pl.col("cell_id") > 0)
    for (cell_id,), g in inside.group_by(["cell_id"], maintain_order=True):
        a = g.filter(pl.col("channel") == channel_a).select("z_um", "y_um", "x_um").to_numpy()
        b = g.filter(pl.col("channel") == channel_b).select("z_um", "y_um", "x_um").to_numpy()
        if len(a) == 0 or len(b) == 0:
            continue
        matched = match_count(a, b, max_distance_um)
        voxels = np.argwhere(cells == cell_id)
        expected = []
        for _ in range(n_random):
            ra = (
                voxels[rng.integers(0, len(voxels), len(a))] + rng.random((len(a), 3)) - 0.5
            ) * spacing
            rb = (
                voxels[rng.integers(0, len(voxels), len(b))] + rng.random((len(b), 3)) - 0.5
            ) * spacing
            expected.append(match_count(ra, rb, max_distance_um) / len(a))
        exp_a = float(np.mean(expected)) if expected else 0.0
        rows.append(
            {
                "cell_id": int(cell_id),
                "channel_a": channel_a,
                "channel_b": channel_b,
                "n_a": len(a),
                "n_b": len(b),
                "n_colocalized": matched,
                "fraction_a_colocalized": matched / len(a),
                "fraction_b_colocalized": matched / len(b),
                "expected_fraction_a_by_chance": exp_a,
                "enrichment": (matched / len(a)) / exp_a if exp_a > 0 else None,
                "max_distance_um": max_distance_um,
            }
        )
    return pl.DataFrame(rows, schema=COLOCALIZATION_SCHEMA)
