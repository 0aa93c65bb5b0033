"""statistics_tables + warehouse on a processed container made from generator ground truth."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from cellrna_pipeline.defs.assets.reports import experiment_report, qc_preview
from cellrna_pipeline.defs.assets.tables import statistics_tables, warehouse
from cellrna_pipeline.defs.partitions import EXPERIMENTS
from cellrna_pipeline.defs.resources import DataRootResource
from cellrna_pipeline.integrations.warehouse import query
from cellrna_pipeline_tests.conftest import seed_processed_from_truth


@pytest.fixture
def processed_from_truth(data_root, tiny_acquisition_dir):
    """The tiny acquisition registered as exp1 with a processed container whose labels and
    spots are the ground truth (as if every stage were perfect)."""
    return seed_processed_from_truth(data_root, tiny_acquisition_dir, "exp1")


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
