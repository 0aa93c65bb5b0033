"""The generator's live-RNA mode: spots that persist over frames with ground-truth track ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.synth import (
    LIVE_SPOT_TABLE_SCHEMA,
    SPOT_TABLE_SCHEMA,
    LiveRnaConfig,
    SynthAcquisition,
    SynthConfig,
    live_rna_config,
    load_ground_truth,
    read_manifest,
    synthesize,
    write_acquisition,
)

_SMALL = {
    "shape_zyx": (10, 96, 96),
    "voxel_size_um": (0.6, 0.2, 0.2),
    "n_cells": 4,
    "cell_radius_um": 4.0,
    "enter_leave": False,
    "calibration_images": False,
}


def _live(**overrides) -> SynthAcquisition:
    return synthesize(live_rna_config(**{**_SMALL, "seed": 5, "timepoints": 6, **overrides}))


@pytest.fixture(scope="module")
def live() -> SynthAcquisition:
    return _live()


def _links(table: pl.DataFrame) -> pl.DataFrame:
    """Consecutive appearances (t, t+1) of each spot track, with both positions."""
    d = table.sort("track_id", "timepoint")
    nxt = d.select(
        pl.col("track_id").alias("track_id_1"),
        (pl.col("timepoint") - 1).alias("timepoint"),
        *(pl.col(c).alias(f"{c}_1") for c in ("z_um", "y_um", "x_um", "cell_id", "amplitude")),
    )
    return d.join(nxt, left_on=["track_id", "timepoint"], right_on=["track_id_1", "timepoint"])


def test_live_config_validation():
    with pytest.raises(InputError, match="diffusion_um2_per_s"):
        LiveRnaConfig(diffusion_um2_per_s=(0.1, 0.01))
    with pytest.raises(InputError, match="blink_probability"):
        LiveRnaConfig(blink_probability=1.0)
    with pytest.raises(InputError, match="lifetime_frames"):
        LiveRnaConfig(lifetime_frames=0.5)
    # the default 300 s between frames makes spots jump microns: refused with a hint
    with pytest.raises(InputError, match="frame_interval_s"):
        SynthConfig(live_rna=LiveRnaConfig())
    assert live_rna_config().frame_interval_s == 2.0
    assert live_rna_config(live_rna={"directed_fraction": 0.0}).live_rna.directed_fraction == 0.0


def test_static_mode_is_unchanged_and_has_no_track_ids(tiny_config):
    acq = synthesize(tiny_config)
    assert tiny_config.live_rna is None
    assert acq.spot_table.schema == pl.Schema(SPOT_TABLE_SCHEMA)
    # the manifest of a static acquisition does not mention live-RNA settings
    assert "live_rna" not in tiny_config.model_dump(mode="json", exclude={"live_rna"})


def test_live_spot_table_has_persistent_track_ids(live):
    table = live.spot_table
    assert table.schema == pl.Schema(LIVE_SPOT_TABLE_SCHEMA)
    assert table.height > 0
    # one row per track and frame
    assert table.select("channel", "timepoint", "track_id").is_duplicated().sum() == 0
    lengths = table.group_by("track_id").len()["len"]
    assert (lengths >= 3).sum() > 0.5 * len(lengths)  # most spots persist
    # spot labels and the table still agree (spot_id = label of the rounded centre)
    for t in range(live.cells.shape[0]):
        rows = table.filter(pl.col("timepoint") == t)
        idx = tuple(np.rint(rows.select("z", "y", "x").to_numpy()).astype(int).T)
        assert np.array_equal(live.spots[t, 0][idx], rows["spot_id"].to_numpy())
        assert np.array_equal(live.cells[t][idx], rows["cell_id"].to_numpy())


def test_live_spots_move_a_little_and_with_their_cell(live):
    links = _links(live.spot_table.filter(pl.col("cell_id") > 0))
    assert links.height > 50
    step = np.sqrt(
        sum((links[f"{a}_um_1"] - links[f"{a}_um"]).to_numpy() ** 2 for a in ("z", "y", "x"))
    )
    # frames 2 s apart: sub-micron steps (diffusion, transport, cell motion, drift)
    assert np.median(step) < 1.0
    assert (links["cell_id"] == links["cell_id_1"]).mean() > 0.95  # spots stay in their cell


def test_live_diffusion_coefficient_sets_the_step():
    still = {"motion_um_per_frame": 0.0, "drift_um_per_frame": (0.0, 0.0, 0.0)}
    steps = []
    for d in ((0.001, 0.001), (0.05, 0.05)):
        acq = _live(
            **still,
            live_rna={"diffusion_um2_per_s": d, "directed_fraction": 0.0, "blink_probability": 0.0},
        )
        links = _links(acq.spot_table.filter(pl.col("kind") == "single"))
        steps.append(float(np.median(np.abs((links["y_um_1"] - links["y_um"]).to_numpy()))))
    assert steps[1] > 3 * steps[0]


def test_live_blinking_births_and_deaths():
    steady = _live(live_rna={"blink_probability": 0.0, "lifetime_frames": 1000.0})
    busy = _live(live_rna={"blink_probability": 0.4, "lifetime_frames": 2.0})

    def gaps_and_starts(acq):
        spans = acq.spot_table.group_by("track_id").agg(
            pl.len().alias("n"),
            pl.col("timepoint").min().alias("b"),
            pl.col("timepoint").max().alias("e"),
        )
        gaps = int((spans["e"] - spans["b"] + 1 - spans["n"]).sum())
        return gaps, int((spans["b"] > 0).sum())

    g0, s0 = gaps_and_starts(steady)
    g1, s1 = gaps_and_starts(busy)
    assert g1 > g0 and s1 > 2 * s0
    # births keep the number of spots per frame about constant
    counts = busy.spot_table.group_by("timepoint").len()["len"].to_numpy()
    assert counts.min() > 0.5 * counts.max()


def test_live_intensity_fluctuates_around_a_per_spot_level(live):
    singles = live.spot_table.filter(pl.col("kind") == "single")
    per_track = (
        singles.group_by("track_id")
        .agg(
            pl.col("amplitude").mean().alias("mean"),
            pl.col("amplitude").std().alias("std"),
            pl.len(),
        )
        .filter(pl.col("len") >= 4)
    )
    within = float((per_track["std"] / per_track["mean"]).median())  # type: ignore[arg-type]
    between = float(per_track["mean"].std() / per_track["mean"].mean())  # type: ignore[operator]
    assert 0.05 < within < 0.5 and between > 0.1


def test_live_spots_follow_divisions_into_the_daughters():
    acq = _live(timepoints=8, division_probability=0.5, seed=2)
    parents = acq.lineage.filter(pl.col("parent_label") > 0)
    assert parents.height >= 2
    links = _links(acq.spot_table)
    kids = dict(zip(parents["label"].to_list(), parents["parent_label"].to_list(), strict=True))
    crossed = links.filter(
        pl.struct("cell_id", "cell_id_1").map_elements(
            lambda r: kids.get(r["cell_id_1"]) == r["cell_id"] and r["cell_id"] > 0,
            return_dtype=pl.Boolean,
        )
    )
    assert crossed.height > 0  # a spot track goes on from a parent cell into a daughter


def test_live_round_trip_and_manifest(tmp_path: Path, live):
    out = write_acquisition(live, tmp_path / "acq")
    manifest = read_manifest(out)
    assert manifest["live_rna"] is True
    assert manifest["generator"]["live_rna"]["lifetime_frames"] == 30.0
    back = load_ground_truth(out, with_image=False)
    assert back.config == live.config
    assert back.spot_table.equals(live.spot_table)
    on_disk = json.loads((tmp_path / "acq" / "manifest.json").read_text())
    assert on_disk["frame_interval_s"] == 2.0


def test_live_same_seed_same_table():
    a, b = _live(timepoints=3), _live(timepoints=3)
    assert a.spot_table.equals(b.spot_table)
    assert np.array_equal(a.image, b.image)
