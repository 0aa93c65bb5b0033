"""Shared fixtures: tiny seeded acquisitions and isolated data roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "true")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_config():
    """A 2-timepoint, 8x64x64 acquisition with a handful of cells (seeded)."""
    from cellrna_pipeline.core.synth import SynthConfig

    return SynthConfig(seed=3, timepoints=2, shape_zyx=(8, 64, 64), n_cells=4, cell_radius_um=3.0)


@pytest.fixture(scope="session")
def tiny_acquisition_dir(tmp_path_factory, tiny_config) -> Path:
    """The tiny acquisition written as a complete folder (manifest last)."""
    from cellrna_pipeline.core.synth import synthesize, write_acquisition

    out = tmp_path_factory.mktemp("acq") / "tiny"
    write_acquisition(synthesize(tiny_config), out)
    return out


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An empty data root in tmp_path, also exported as CELLRNA_HOME."""
    from cellrna_pipeline.core.paths import DataRoot

    home = tmp_path / "home"
    monkeypatch.setenv("CELLRNA_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    return DataRoot(home).ensure()


def seed_processed_from_truth(root, acquisition_dir: Path, experiment: str):
    """Register ``acquisition_dir`` as ``experiment`` (unless it is) and write what every
    stage up to tracking would, from the generator's ground truth (as if each were
    perfect): the processed image with labels ``cells``, ``nuclei``, ``tracks``, the spot
    tables, and the tracker's ``tracks`` and ``lineage`` tables. Returns the ground truth."""
    import polars as pl

    from cellrna_pipeline.core.analysis import cell_features
    from cellrna_pipeline.core.experiment import register_experiment
    from cellrna_pipeline.core.io import (
        create_image,
        create_labels,
        write_label_timepoint,
        write_timepoint,
    )
    from cellrna_pipeline.core.synth import load_ground_truth
    from cellrna_pipeline.integrations.warehouse import write_partition

    record = register_experiment(root, experiment, acquisition_dir)
    truth = load_ground_truth(acquisition_dir)
    path = root.processed(experiment)
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
        write_partition(root, "spots", experiment, spots, timepoint=t)
    lineage = truth.lineage.rename(
        {"label": "track_id", "begin_t": "begin", "end_t": "end", "parent_label": "parent_track_id"}
    )
    write_partition(root, "lineage", experiment, lineage)
    # The tracker's tables, in its own column names (t, label, z_um ...), as cell_tracks writes them.
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
    folder = root.tables("tracks", experiment)
    folder.mkdir(parents=True, exist_ok=True)
    points.write_parquet(folder / "tracks.parquet")
    return truth
