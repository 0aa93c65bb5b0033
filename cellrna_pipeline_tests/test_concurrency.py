"""Partitions of one experiment run at the same time, as the queued run coordinator
launches them (one process per run): two ``cellrna materialize --timepoint`` processes
write the same OME-Zarr containers while a third loads the warehouse and this process
keeps querying it. Everything must succeed, no lock error may reach a user, and what is
stored must equal a run of one partition after the other."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cellrna_pipeline.cli import main
from cellrna_pipeline.core.io import list_labels, read_label_timepoint, timepoints_written
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.integrations.warehouse import load_experiment, query
from cellrna_pipeline_tests.conftest import seed_processed_from_truth

VOLUME_STAGES = "preprocessed_volume,cell_masks,rna_spots"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_acquisition_dir) -> Path:
    """e1 ingested with its experiment-level preprocessing done; w stored up to tracking
    (from ground truth) for the warehouse; a warehouse that already holds w's tracks."""
    home = tmp_path_factory.mktemp("concurrent") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home / "dagster"))
        mp.setenv("CELLRNA_HOME", str(home))
        assert main(["ingest", str(tiny_acquisition_dir), "--experiment", "e1"]) == 0
        select = "camera_calibration,drift_shifts"
        assert main(["materialize", "--experiment", "e1", "--select", select]) == 0
    root = DataRoot(home)
    seed_processed_from_truth(root, tiny_acquisition_dir, "w")
    load_experiment(root, "w", tables=["lineage"])
    return home


def _zarr_digest(path: Path) -> dict[str, str]:
    """sha256 of every chunk and metadata file (completion markers, which hold a time,
    excepted)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and ".cellrna" not in p.parts
    }


@pytest.mark.slow
def test_two_timepoints_and_a_warehouse_load_at_once(prepared, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(prepared, home)
    root = DataRoot(home)
    env = {**os.environ, "CELLRNA_HOME": str(home), "OMP_NUM_THREADS": "1"}
    commands = [
        ["materialize", "--experiment", "e1", "--timepoint", "0", "--select", VOLUME_STAGES],
        ["materialize", "--experiment", "e1", "--timepoint", "1", "--select", VOLUME_STAGES],
        ["materialize", "--experiment", "w", "--select", "statistics_tables,warehouse"],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cellrna_pipeline.cli", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in commands
    ]
    reads = 0
    while any(p.poll() is None for p in procs):  # a user querying meanwhile
        assert query(root, "SELECT count(*) FROM lineage").item() > 0
        reads += 1
        time.sleep(0.2)
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "lock" not in err.lower() and "Traceback" not in err, err[-3000:]
    assert reads > 0

    # The zarr: both timepoints complete in the image and every label image, each label
    # image listed once, and the same bytes as one partition after the other.
    processed = root.processed("e1")
    assert timepoints_written(processed) == [0, 1]
    labels = list_labels(processed)
    assert sorted(labels) == ["cells", "nuclei", "semantic", "spots"]
    for name in labels:
        assert timepoints_written(processed, label=name) == [0, 1]
    for t in (0, 1):
        assert read_label_timepoint(processed, "cells", t).max() > 0

    sequential = tmp_path / "sequential"
    shutil.copytree(prepared, sequential)
    monkeypatch.setenv("CELLRNA_HOME", str(sequential))
    monkeypatch.setenv("DAGSTER_HOME", str(sequential / "dagster"))
    assert main(["materialize", "--experiment", "e1", "--select", "preprocessed_volume"]) == 0
    one_by_one = _zarr_digest(DataRoot(sequential).processed("e1"))
    at_once = _zarr_digest(processed)
    image_files = {k for k in one_by_one if not k.startswith("labels")}
    assert image_files and {k: at_once[k] for k in image_files} == {
        k: one_by_one[k] for k in image_files
    }

    # The warehouse: w's rows match its masks; the rows loaded before are still there.
    rows = dict(
        query(
            root,
            "SELECT timepoint, count(*) FROM cells WHERE experiment = $e GROUP BY 1",
            {"e": "w"},
        ).rows()
    )
    for t in (0, 1):
        labels_t = read_label_timepoint(root.processed("w"), "cells", t)
        assert rows[t] == len(np.unique(labels_t)) - 1
    assert query(root, "SELECT count(DISTINCT experiment) FROM lineage").item() == 1
