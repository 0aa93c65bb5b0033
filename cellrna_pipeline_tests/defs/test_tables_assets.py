"""statistics_tables + warehouse on a processed container made from generator ground truth."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from cellrna_pipeline.core.experiment import register_experiment
from cellrna_pipeline.core.io import (
    create_image,
    create_labels,
    write_label_timepoint,
    write_timepoint,
)
from cellrna_pipeline.core.synth import load_ground_truth
from cellrna_pipeline.defs.assets.reports import experiment_report, qc_preview
from cellrna_pipeline.defs.assets.tables import statistics_tables, warehouse
from cellrna_pipeline.defs.partitions import EXPERIMENTS
from cellrna_pipeline.defs.resources import DataRootResource
from cellrna_pipeline.integrations.warehouse import query, write_partition


@pytest.fixture
def processed_from_truth(data_root, tiny_acquisition_dir):
    """Register the tiny acquisition and write a processed container whose labels and
    spots are the ground truth (as if every stage were perfect)."""
    record = register_experiment(data_root, "exp1", tiny_acquisition_dir)
    truth = load_ground_truth(tiny_acquisition_dir)
    path = data_root.processed("exp1")
    create_image(path, record.image_meta)
    for name in ("cells", "nuclei", "tracks"):
        create_labels(path, name)
    for t in range(record.n_timepoints):
        write_timepoint(path, t, truth.image[t])
        write_label_timepoint(path, "cells", t, truth.cells[t])
        write_label_timepoint(path, "nuclei", t, truth.nuclei[t])
        write_label_timepoint(path, "tracks", t, truth.cells[t])  # GT labels are track ids
        spots = truth.spot_table.filter(pl.col("timepoint") == t).with_columns(
            pl.lit(0.0).alias("distance_to_nucleus_um")
        )
        write_partition(data_root, "spots", "exp1", spots, timepoint=t)
    lineage = truth.lineage.rename(
        {"label": "track_id", "begin_t": "begin", "end_t": "end", "parent_label": "parent_track_id"}
    )
    write_partition(data_root, "lineage", "exp1", lineage)
    # The tracker's tables, in its own column names (t, label, z_um ...), as cell_tracks writes them.
    from cellrna_pipeline.core.analysis import cell_features

    points = pl.concat(
        cell_features(truth.cells[t], None, voxel_size=truth.voxel_size).select(
            pl.col("cell_id").alias("track_id"),
            pl.lit(t).alias("t"),
            pl.col("cell_id").alias("label"),
            pl.col("centroid_z_um").alias("z_um"),
            pl.col("centroid_y_um").alias("y_um"),
            pl.col("centroid_x_um").alias("x_um"),
        )
        for t in range(record.n_timepoints)
    )
    folder = data_root.tables("tracks", "exp1")
    folder.mkdir(parents=True, exist_ok=True)
    points.write_parquet(folder / "tracks.parquet")
    return truth


def test_tables_and_warehouse_from_ground_truth(data_root, processed_from_truth):
    truth = processed_from_truth
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions(EXPERIMENTS, ["exp1"])
    result = materialize(
        [statistics_tables, warehouse],
        partition_key="exp1",
        instance=instance,
        resources={"data_root": DataRootResource(home=str(data_root.home))},
    )
    assert result.success
    checks = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert len(checks) == 2 and all(e.event_specific_data.passed for e in checks)

    # Per-cell nucleus/cytoplasm counts are exact against the generator's spot table.
    got = query(
        data_root,
        "SELECT timepoint, cell_id, channel, n_nucleus, n_cytoplasm FROM rna_localization WHERE n_spots > 0",
    )
    expected = (
        truth.spot_table.filter(pl.col("cell_id") > 0)
        .group_by("timepoint", "cell_id", "channel")
        .agg(
            (pl.col("compartment") == "nucleus").sum().cast(pl.Int64).alias("n_nucleus"),
            (pl.col("compartment") == "cytoplasm").sum().cast(pl.Int64).alias("n_cytoplasm"),
        )
    )
    key = ["timepoint", "cell_id", "channel"]
    assert got.sort(key).equals(expected.select(got.columns).sort(key))

    n_cells = sum(len(np.unique(c)) - 1 for c in truth.cells)
    assert query(data_root, "SELECT count(*) FROM cells").item() == n_cells
    assert query(data_root, "SELECT count(*) FROM cells WHERE track_id IS NULL").item() == 0
    assert query(data_root, "SELECT count(*) FROM lineage").item() == truth.lineage.height
    assert query(data_root, "SELECT count(*) FROM tracks WHERE centroid_x_um IS NULL").item() == 0
    assert query(data_root, "SELECT count(*) FROM tracks").item() == n_cells
    summary = query(data_root, "SELECT * FROM experiment_summary").row(0, named=True)
    assert summary["n_tracks"] == truth.lineage.height and summary["n_timepoints"] == 2

    # Re-materializing gives the same rows (idempotent load).
    before = query(data_root, "SELECT * FROM cells ORDER BY timepoint, cell_id")
    assert materialize(
        [statistics_tables, warehouse],
        partition_key="exp1",
        instance=instance,
        resources={"data_root": DataRootResource(home=str(data_root.home))},
    ).success
    assert query(data_root, "SELECT * FROM cells ORDER BY timepoint, cell_id").equals(before)


def test_reports(data_root, processed_from_truth):
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions(EXPERIMENTS, ["exp1"])
    instance.add_dynamic_partitions("volumes", ["exp1__t0000"])
    resources = {"data_root": DataRootResource(home=str(data_root.home))}
    assert materialize(
        [statistics_tables, warehouse], partition_key="exp1", instance=instance, resources=resources
    ).success
    assert materialize(
        [experiment_report], partition_key="exp1", instance=instance, resources=resources
    ).success
    assert materialize(
        [qc_preview], partition_key="exp1__t0000", instance=instance, resources=resources
    ).success
    folder = data_root.reports / "exp1"
    for name in ("report.html", "trajectory.png", "view3d.png", "qc_t0000.png"):
        assert (folder / name).stat().st_size > 1000
    page = (folder / "report.html").read_text()
    assert "data:image/png;base64" in page and "RNA per cell" in page


def test_view_layers_and_missing_napari(data_root, processed_from_truth, capsys):
    from cellrna_pipeline.cli import main
    from cellrna_pipeline.commands.view import napari_layers

    instance = DagsterInstance.get()
    instance.add_dynamic_partitions(EXPERIMENTS, ["exp1"])
    resources = {"data_root": DataRootResource(home=str(data_root.home))}
    assert materialize(
        [statistics_tables, warehouse], partition_key="exp1", instance=instance, resources=resources
    ).success
    layers = napari_layers(str(data_root.home), "exp1")
    kinds = [kind for _, _, kind in layers]
    assert (
        kinds.count("image") == 3
        and kinds.count("labels") == 3
        and "points" in kinds
        and "tracks" in kinds
    )
    image = layers[0][0]
    assert image.shape == processed_from_truth.image[:, 0].shape
    assert main(["view", "ghost"]) == 2 and "unknown experiment" in capsys.readouterr().err
    try:
        import napari  # noqa: F401
    except ImportError:
        assert main(["view", "exp1"]) == 2
        assert "napari is not installed" in capsys.readouterr().err
