from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cellrna_pipeline.core.analysis import (
    cell_features,
    colocalize,
    experiment_summary,
    rna_localization,
    track_behavior,
)
from cellrna_pipeline.core.types import VoxelSize

VOX = VoxelSize(0.5, 0.25, 0.25)


def _ball(shape=(20, 40, 40), centre=(10, 20, 20), radius_um=3.0, vox=VOX):
    grid = np.indices(shape).astype(float)
    d2 = sum(((grid[a] - centre[a]) * vox.as_tuple()[a]) ** 2 for a in range(3))
    return (d2 <= radius_um**2).astype(np.uint32)


def test_features_of_a_ball_are_physical():
    labels = _ball() * 7
    image = np.stack([labels * 2.0, np.ones_like(labels, float)])
    df = cell_features(labels, image, voxel_size=VOX, channel_names=["nucleus", "cytoplasm"])
    row = df.row(0, named=True)
    assert row["cell_id"] == 7
    assert row["volume_um3"] == pytest.approx(4 / 3 * np.pi * 27, rel=0.05)
    assert row["centroid_z_um"] == pytest.approx(10 * 0.5, abs=0.01)
    assert row["centroid_x_um"] == pytest.approx(20 * 0.25, abs=0.01)
    assert 0.85 < row["sphericity"] <= 1.05
    assert row["mean_intensity_nucleus"] == pytest.approx(14.0)
    assert cell_features(np.zeros((2, 3, 3), np.uint32), None, voxel_size=VOX).height == 0


def test_behavior_of_straight_and_still_tracks():
    t = np.arange(6)
    points = pl.DataFrame(
        {
            "track_id": [1] * 6 + [2] * 6,
            "timepoint": list(t) * 2,
            "centroid_z_um": [0.0] * 12,
            "centroid_y_um": [0.0] * 12,
            "centroid_x_um": list(2.0 * t) + [5.0] * 6,
            "volume_um3": [100.0] * 6 + [100.0, 110, 100, 110, 100, 110],
        }
    )
    b = track_behavior(points, frame_interval_s=60.0).sort("track_id")
    moving, still = b.row(0, named=True), b.row(1, named=True)
    assert moving["mean_speed_um_per_min"] == pytest.approx(2.0)
    assert moving["straightness"] == pytest.approx(1.0)
    assert moving["displacement_um"] == pytest.approx(10.0)
    assert moving["msd_alpha"] == pytest.approx(2.0, abs=1e-6)  # ballistic
    assert still["path_length_um"] == 0 and still["straightness"] is None
    assert still["volume_change_per_frame"] == pytest.approx(np.mean([0.1, 10 / 110] * 2 + [0.1]))
    with pytest.raises(ValueError):
        track_behavior(points, frame_interval_s=0)


def test_experiment_summary_counts_divisions_and_cycles():
    lineage = pl.DataFrame(
        {
            "track_id": [1, 2, 3, 4, 5],
            "begin": [0, 3, 3, 7, 7],
            "end": [2, 6, 9, 9, 9],
            "parent_track_id": [0, 1, 1, 2, 2],
        }
    )
    s = experiment_summary(
        lineage, n_timepoints=10, frame_interval_s=3600, n_cells_per_timepoint=[1] * 3 + [2] * 7
    )
    assert s["n_divisions"] == 2
    assert s["division_rate_per_cell_hour"] == pytest.approx(2 / 17)
    assert s["cell_cycle_length_h"] == pytest.approx(4.0)  # track 2: born at 3, divides after 6


def test_localization_counts_match_ground_truth(tiny_config):
    from cellrna_pipeline.core.synth import synthesize

    acq = synthesize(tiny_config.model_copy(update={"timepoints": 1}))
    spots = acq.spot_table.filter(pl.col("timepoint") == 0).with_columns(
        pl.lit(0.0).alias("distance_to_nucleus_um")
    )
    loc = rna_localization(spots, acq.cells[0], voxel_size=acq.voxel_size)
    truth = (
        spots.filter(pl.col("cell_id") > 0)
        .group_by("cell_id", "channel")
        .agg(pl.len().alias("n"), (pl.col("compartment") == "nucleus").sum().alias("nuc"))
    )
    joined = truth.join(loc, on=["cell_id", "channel"])
    assert joined.height == truth.height > 0
    assert (joined["n"] == joined["n_spots"]).all()
    assert (joined["nuc"] == joined["n_nucleus"]).all()
    # every cell of the volume has a row, with zero counts if it has no spots
    assert set(loc["cell_id"].to_list()) == set(np.unique(acq.cells[0])) - {0}


def test_polarization_and_dispersion():
    cells = np.zeros((10, 40, 40), np.uint32)
    cells[:, 5:35, 5:35] = 1
    vox = VoxelSize(1.0, 1.0, 1.0)
    centre = np.array([4.5, 19.5, 19.5])
    near = [centre + [0, d, 0] for d in (-0.5, 0.5)]
    edge = [centre + [0, 14, 14], centre + [0, 13, 14]]

    def frame(pos):
        z, y, x = np.array(pos).T
        return pl.DataFrame(
            {
                "channel": "rna0",
                "cell_id": 1,
                "compartment": "cytoplasm",
                "z_um": z,
                "y_um": y,
                "x_um": x,
            }
        )

    central = rna_localization(frame(near), cells, voxel_size=vox).row(0, named=True)
    polar = rna_localization(frame(edge), cells, voxel_size=vox).row(0, named=True)
    assert central["polarization_index"] < 0.1 < 1.0 < polar["polarization_index"]
    assert central["dispersion_index"] < 0.1 < 1.0 < polar["dispersion_index"]


def test_colocalization_observed_vs_chance():
    cells = np.zeros((10, 60, 60), np.uint32)
    cells[:, 5:55, 5:55] = 3
    rng = np.random.default_rng(0)
    a = rng.uniform([0, 3, 3], [4.5, 13, 13], size=(30, 3))
    b = a + rng.normal(0, 0.03, a.shape)  # every A spot has a B partner within ~50 nm
    spots = pl.concat(
        [
            pl.DataFrame(
                {"channel": ch, "cell_id": 3, "z_um": p[:, 0], "y_um": p[:, 1], "x_um": p[:, 2]}
            )
            for ch, p in (("rna0", a), ("rna1", b))
        ]
    )
    row = colocalize(spots, cells, voxel_size=VoxelSize(0.5, 0.25, 0.25)).row(0, named=True)
    assert row["n_colocalized"] == 30 and row["fraction_a_colocalized"] == 1.0
    assert row["expected_fraction_a_by_chance"] < 0.2
    assert row["enrichment"] > 5
    shifted = spots.with_columns(
        pl.when(pl.col("channel") == "rna1").then(pl.col("x_um") + 5).otherwise(pl.col("x_um"))
    )
    assert colocalize(shifted, cells, voxel_size=VoxelSize(0.5, 0.25, 0.25))["n_colocalized"][0] < 5
