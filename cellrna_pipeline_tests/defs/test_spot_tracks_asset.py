"""``spot_tracks``: live-RNA experiments only; spot tables + processed image in, tracks out."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import polars as pl
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize

from cellrna_pipeline.core.experiment import ExperimentRecord
from cellrna_pipeline.core.io import atomic_path, create_image, write_timepoint
from cellrna_pipeline.core.synth import live_rna_config, synthesize
from cellrna_pipeline.core.tracking.embedding import DEFAULT_EMBEDDING_DIR
from cellrna_pipeline.defs import LIVE_RNA_ASSETS
from cellrna_pipeline.defs.assets.tracking import (
    SPOT_CHECKS,
    evaluate_spot_coverage,
    evaluate_spot_jumps,
    read_tracking_metadata,
    spot_tracks,
    spot_tracks_path,
)
from cellrna_pipeline.defs.resources import DataRootResource
from cellrna_pipeline.defs.runner import _stages

EXP = "live1"
SHIPPED = (DEFAULT_EMBEDDING_DIR / "weights.pt").exists()


@pytest.fixture(scope="module")
def acq():
    return synthesize(
        live_rna_config(
            seed=6,
            timepoints=4,
            shape_zyx=(10, 96, 96),
            voxel_size_um=(0.6, 0.2, 0.2),
            n_cells=4,
            cell_radius_um=4.0,
            enter_leave=False,
            calibration_images=False,
        )
    )


def _prepare(root, acq, *, live_rna=True, timepoints=None):
    """What ingestion, preprocessed_volume and rna_spots leave behind (true spots as the
    detector's output)."""
    t_all = acq.cells.shape[0]
    record = ExperimentRecord(
        name=EXP,
        source="/nowhere/image.ome.tif",
        shape_tczyx=acq.meta.shape_tczyx,
        dtype="uint16",
        voxel_size_um=acq.voxel_size.as_tuple(),
        channel_names=acq.channel_names,
        frame_interval_s=acq.frame_interval_s,
        fingerprint="test",
        registered_at=time.time(),
        live_rna=live_rna,
    )
    root.experiment_record(EXP).parent.mkdir(parents=True, exist_ok=True)
    root.experiment_record(EXP).write_text(json.dumps(asdict(record)))
    path = root.processed(EXP)
    create_image(path, acq.meta)
    folder = root.tables("spots", EXP)
    folder.mkdir(parents=True, exist_ok=True)
    for t in timepoints if timepoints is not None else range(t_all):
        write_timepoint(path, t, acq.image[t])
        rows = acq.spot_table.filter(pl.col("timepoint") == t).select(
            pl.lit(EXP).alias("experiment"),
            "timepoint",
            "channel",
            "spot_id",
            "z",
            "y",
            "x",
            "z_um",
            "y_um",
            "x_um",
            pl.col("amplitude").alias("intensity"),
            "cell_id",
        )
        with atomic_path(folder / f"t{t:04d}.parquet") as tmp:
            rows.write_parquet(tmp)


def _run(root, **config):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("experiments", [EXP])
    return materialize(
        [spot_tracks, *SPOT_CHECKS],
        partition_key=EXP,
        instance=instance,
        resources={"data_root": DataRootResource(home=str(root.home))},
        run_config={"ops": {"spot_tracks": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _accuracy(acq, tracks: pl.DataFrame) -> float:
    d = acq.spot_table.join(
        tracks.select("channel", "t", "spot_id", pl.col("track_id").alias("ours")),
        left_on=["channel", "timepoint", "spot_id"],
        right_on=["channel", "t", "spot_id"],
    ).sort("track_id", "timepoint")
    truth = (d["track_id"][1:] == d["track_id"][:-1]).to_numpy()
    ours = (d["ours"][1:] == d["ours"][:-1]).to_numpy()
    return float((truth & ours).sum() / truth.sum())


def test_spot_tracks_without_embedding(data_root, acq):
    _prepare(data_root, acq)
    result = _run(data_root, use_embedding=False)
    assert result.success
    assert _checks(result) == {
        "check_spot_tracks_no_jump_beyond_gate": True,
        "check_spot_tracks_every_spot_once": True,
    }
    tracks = pl.read_parquet(spot_tracks_path(data_root, EXP))
    assert tracks.columns[:7] == ["experiment", "track_id", "t", "z", "y", "x", "channel"]
    assert tracks.height == acq.spot_table.height
    assert _accuracy(acq, tracks) > 0.9
    meta = read_tracking_metadata(spot_tracks_path(data_root, EXP))
    assert meta["embedding_model"] is None and meta["config"]["divisions"] is False
    # the checks catch a corrupted table (one spot moved far, one row lost)
    path = spot_tracks_path(data_root, EXP)
    table = pq.read_table(path)
    y = table.column("y_um").to_numpy().copy()
    y[1] += 100.0
    table = table.set_column(table.schema.get_field_index("y_um"), "y_um", [y])
    pq.write_table(table.slice(0, table.num_rows - 1), path)
    assert not evaluate_spot_jumps(data_root, EXP).passed
    assert not evaluate_spot_coverage(data_root, EXP).passed


@pytest.mark.skipif(not SHIPPED, reason="no shipped spot embedding")
def test_spot_tracks_with_the_shipped_embedding(data_root, acq):
    _prepare(data_root, acq)
    result = _run(data_root)
    assert result.success and all(_checks(result).values())
    meta = read_tracking_metadata(spot_tracks_path(data_root, EXP))
    assert meta["embedding_model"] and meta["config"]["appearance_sigma"] > 0
    assert _accuracy(acq, pl.read_parquet(spot_tracks_path(data_root, EXP))) > 0.9


def test_not_live_experiments_are_skipped_unless_forced(data_root, acq):
    _prepare(data_root, acq, live_rna=False)
    result = _run(data_root, use_embedding=False)
    assert result.success
    assert result.asset_materializations_for_node("spot_tracks") == []
    assert not spot_tracks_path(data_root, EXP).exists()
    forced = _run(data_root, use_embedding=False, force=True)
    assert forced.success and spot_tracks_path(data_root, EXP).exists()
    # the runner leaves them out of a default run of a non-live experiment
    assert all(spot_tracks not in stage for stage in _stages(None, live_rna=False))
    assert any(spot_tracks in stage for stage in _stages(None, live_rna=True))
    assert [spot_tracks] == LIVE_RNA_ASSETS


def test_missing_spot_tables_fail_with_a_clear_error(data_root, acq):
    _prepare(data_root, acq, timepoints=[0, 1, 3])
    result = _run(data_root, use_embedding=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "missing for timepoint(s) [2]" in str(failure.event_specific_data.error)
    assert not spot_tracks_path(data_root, EXP).exists()
