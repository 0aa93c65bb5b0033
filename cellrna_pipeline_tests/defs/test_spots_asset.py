"""``rna_spots`` materialized into a tmp data root from a processed container made here."""

from __future__ import annotations

import numpy as np
import polars as pl
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
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.core.spots import match_spots
from cellrna_pipeline.core.spots.volume import SPOT_TABLE_SCHEMA
from cellrna_pipeline.core.synth import SynthConfig, synthesize
from cellrna_pipeline.defs.assets.spots import check_rna_spots_density, rna_spots
from cellrna_pipeline.defs.partitions import VOLUMES, volume_key
from cellrna_pipeline.defs.resources import DataRootResource


@pytest.fixture(scope="module")
def acquisition():
    cfg = SynthConfig(
        seed=2,
        timepoints=2,
        shape_zyx=(12, 80, 80),
        n_cells=3,
        cell_radius_um=4.0,
        n_rna_channels=2,
        snr=10.0,
    )
    return synthesize(cfg)


def _processed_root(tmp_path, acq) -> DataRoot:
    """What preprocessed_volume and cell_masks would have written (ground-truth labels)."""
    root = DataRoot(tmp_path / "home").ensure()
    path = root.processed("exp1")
    create_image(path, acq.meta)
    create_labels(path, "cells")
    create_labels(path, "nuclei")
    for t in range(acq.meta.n_timepoints):
        write_timepoint(path, t, acq.image[t])
        write_label_timepoint(path, "cells", t, acq.cells[t])
        write_label_timepoint(path, "nuclei", t, acq.nuclei[t])
    return root


def test_rna_spots_writes_labels_table_and_passes_density_check(tmp_path, acquisition):
    acq = acquisition
    root = _processed_root(tmp_path, acq)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(VOLUMES, [volume_key("exp1", 0), volume_key("exp1", 1)])
    result = materialize(
        [rna_spots, check_rna_spots_density],
        partition_key=volume_key("exp1", 1),
        instance=instance,
        resources={"data_root": DataRootResource(home=str(root.home))},
    )
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 1 and checks[0].passed

    table = pl.read_parquet(root.tables("spots", "exp1") / "t0001.parquet")
    assert dict(table.schema) == SPOT_TABLE_SCHEMA
    assert set(table["channel"]) == {"rna0", "rna1"}
    assert set(table["compartment"]) <= {"nucleus", "cytoplasm", "outside"}
    assert (table["experiment"] == "exp1").all() and (table["timepoint"] == 1).all()
    assert np.allclose(table["y_um"].to_numpy(), table["y"].to_numpy() * acq.voxel_size.y_um)

    path = root.processed("exp1")
    assert "spots" in list_labels(path)
    assert timepoints_written(path, label="spots") == [1]
    labels = read_label_timepoint(path, "spots", 1)
    assert labels.shape == (2, *acq.cells.shape[1:])
    for r, name in enumerate(("rna0", "rna1")):
        sub = table.filter(pl.col("channel") == name)
        ids = np.unique(labels[r])
        assert set(ids[ids > 0]) <= set(sub["spot_id"].to_list())
        # the spot's label sits at its rounded centre, and the table's cell id agrees with cells
        zyx = np.rint(sub.select(["z", "y", "x"]).to_numpy()).astype(int)
        assert (labels[r][tuple(zyx.T)] == sub["spot_id"].to_numpy()).mean() > 0.95
        assert (acq.cells[1][tuple(zyx.T)] == sub["cell_id"].to_numpy()).all()
        truth = acq.spot_table.filter((pl.col("timepoint") == 1) & (pl.col("channel") == name))
        m = match_spots(
            sub.select(["z", "y", "x"]).to_numpy(), truth.select(["z", "y", "x"]).to_numpy()
        )
        assert m.f1 > 0.75, (name, m.as_dict())
        # compartments agree with the ground truth for matched spots
        pairs = m.pairs
        agree = (
            sub["compartment"].to_numpy()[pairs[:, 0]]
            == truth["compartment"].to_numpy()[pairs[:, 1]]
        )
        assert agree.mean() > 0.9


def test_rna_spots_without_processed_image_fails_cleanly(tmp_path):
    root = DataRoot(tmp_path / "home").ensure()
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(VOLUMES, [volume_key("nothing", 0)])
    result = materialize(
        [rna_spots],
        partition_key=volume_key("nothing", 0),
        instance=instance,
        resources={"data_root": DataRootResource(home=str(root.home))},
        raise_on_error=False,
    )
    assert not result.success
    assert not (root.home / "tables").exists()
