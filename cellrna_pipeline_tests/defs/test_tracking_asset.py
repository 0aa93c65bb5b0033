"""``cell_tracks``: ground-truth cell labels in, tracks labels + tables + CTC folder out."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize

from cellrna_pipeline.core.io import (
    create_image,
    create_labels,
    list_labels,
    read_label_timepoint,
    timepoints_written,
    write_label_timepoint,
    write_timepoint,
)
from cellrna_pipeline.core.io.ctc import check_ctc_result
from cellrna_pipeline.core.synth import SynthConfig, synthesize
from cellrna_pipeline.defs.assets.tracking import (
    CHECKS,
    cell_tracks,
    ctc_path,
    evaluate_divisions,
    evaluate_jumps,
    lineage_path,
    read_tracking_metadata,
    tracks_path,
)
from cellrna_pipeline.defs.resources import DataRootResource


@pytest.fixture(scope="module")
def acq():
    return synthesize(
        SynthConfig(
            seed=4,
            timepoints=5,
            shape_zyx=(8, 80, 80),
            voxel_size_um=(0.6, 0.3, 0.3),
            n_cells=5,
            cell_radius_um=4.0,
            division_probability=0.3,
            enter_leave=False,
            calibration_images=False,
        )
    )


def _processed(root, acq, experiment="exp1", timepoints=None):
    """What preprocessed_volume and cell_masks leave: the image and its 'cells' labels."""
    path = root.processed(experiment)
    create_image(path, acq.meta)
    create_labels(path, "cells", dtype="uint32")
    for t in timepoints if timepoints is not None else range(acq.cells.shape[0]):
        write_timepoint(path, t, acq.image[t])
        write_label_timepoint(path, "cells", t, acq.cells[t])
    return path


def _run(root, experiment="exp1"):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("experiments", [experiment])
    return materialize(
        [cell_tracks, *CHECKS],
        partition_key=experiment,
        instance=instance,
        resources={"data_root": DataRootResource(home=str(root.home))},
        raise_on_error=False,
    )


def test_cell_tracks_materializes_with_passing_checks(data_root, acq):
    path = _processed(data_root, acq)
    result = _run(data_root)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "check_cell_tracks_no_jump_beyond_gate": True,
        "check_cell_tracks_divisions_two_daughters": True,
    }
    meta = result.asset_materializations_for_node("cell_tracks")[0].metadata
    assert meta["n_tracks"].value == acq.lineage.height
    assert meta["n_divisions"].value == int((acq.lineage["parent_label"] > 0).sum()) // 2 > 0

    # label image 'tracks': one track id per ground-truth cell, every timepoint written
    assert "tracks" in list_labels(path)
    assert timepoints_written(path, label="tracks") == list(range(acq.cells.shape[0]))
    for t in range(acq.cells.shape[0]):
        tracked = read_label_timepoint(path, "tracks", t)[0]
        pairs = {
            (int(a), int(b))
            for a, b in zip(acq.cells[t].ravel(), tracked.ravel(), strict=True)
            if a
        }
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})

    tracks = pl.read_parquet(tracks_path(data_root, "exp1"))
    lineage = pl.read_parquet(lineage_path(data_root, "exp1"))
    assert tracks.columns[:6] == ["experiment", "track_id", "t", "z", "y", "x"]
    assert tracks.height == sum(len(np.unique(c)) - 1 for c in acq.cells)
    assert lineage.height == acq.lineage.height and set(lineage["experiment"]) == {"exp1"}
    provenance = read_tracking_metadata(tracks_path(data_root, "exp1"))
    assert provenance["max_displacement_um"] > 0 and provenance["n_frames"] == 5
    assert check_ctc_result(ctc_path(data_root, "exp1")) == []


def test_checks_fail_on_corrupted_tables(data_root, acq):
    _processed(data_root, acq)
    assert _run(data_root).success
    assert evaluate_jumps(data_root, "exp1").passed
    assert evaluate_divisions(data_root, "exp1").passed
    # move one cell far away in the stored table: the jump check must fail
    tpath = tracks_path(data_root, "exp1")
    table = pq.read_table(tpath)
    y = table.column("y_um").to_numpy().copy()
    y[1] += 1000.0
    pq.write_table(table.set_column(table.schema.get_field_index("y_um"), "y_um", [y]), tpath)
    jumps = evaluate_jumps(data_root, "exp1")
    assert not jumps.passed and jumps.metadata["n_jumps"].value >= 1
    # give one division a third daughter: the division check must fail
    lpath = lineage_path(data_root, "exp1")
    lineage = pl.read_parquet(lpath)
    parent = lineage.filter(pl.col("parent_track_id") > 0)["parent_track_id"][0]
    orphan = lineage.filter(pl.col("parent_track_id") == 0, pl.col("track_id") != parent)[
        "track_id"
    ][0]
    lineage.with_columns(
        pl.when(pl.col("track_id") == orphan)
        .then(parent)
        .otherwise(pl.col("parent_track_id"))
        .alias("parent_track_id")
    ).write_parquet(lpath)
    assert not evaluate_divisions(data_root, "exp1").passed


def test_missing_cell_masks_fail_with_a_clear_error(data_root, acq):
    _processed(data_root, acq, timepoints=[0, 1, 3, 4])
    result = _run(data_root)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "missing for timepoint(s) [2]" in str(failure.event_specific_data.error)
    assert not tracks_path(data_root, "exp1").exists()
    assert not ctc_path(data_root, "exp1").exists()
