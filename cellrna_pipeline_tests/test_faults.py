"""Crash safety: a process SIGKILLed in the middle of a write leaves the previous state
visible, and a rerun completes with the same result as an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from cellrna_pipeline.cli import main
from cellrna_pipeline.core.faults import ENV
from cellrna_pipeline.core.io import timepoints_written
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.integrations.warehouse import (
    load_experiment,
    query,
    read_partitions,
    write_partition,
)
from cellrna_pipeline_tests.conftest import seed_processed_from_truth


def _lineage(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"track_id": range(1, n + 1), "begin": [0] * n, "end": [1] * n, "parent_track_id": [0] * n}
    )


def _run(code: str, home, fault: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if fault:
        env[ENV] = fault
    script = (
        "import polars as pl\nfrom cellrna_pipeline.core.paths import DataRoot\n"
        + textwrap.dedent(code)
    )
    return subprocess.run(
        [sys.executable, "-c", script, str(home)], env=env, capture_output=True
    ).returncode


WRITE_5 = """
import sys
from cellrna_pipeline.integrations.warehouse import write_partition
df = pl.DataFrame({"track_id": range(1, 6), "begin": [0]*5, "end": [1]*5, "parent_track_id": [0]*5})
write_partition(DataRoot.from_env(sys.argv[1]), "lineage", "e1", df)
"""

LOAD = """
import sys
from cellrna_pipeline.integrations.warehouse import load_experiment
load_experiment(DataRoot.from_env(sys.argv[1]), "e1")
"""


def test_parquet_killed_before_rename_keeps_old_partition(tmp_path):
    root = DataRoot(tmp_path)
    write_partition(root, "lineage", "e1", _lineage(2))
    assert _run(WRITE_5, tmp_path, "parquet.before_rename") == -signal.SIGKILL
    assert read_partitions(root, "lineage", "e1").height == 2
    assert _run(WRITE_5, tmp_path, None) == 0
    assert read_partitions(root, "lineage", "e1").height == 5


def test_warehouse_killed_before_commit_keeps_old_rows(tmp_path):
    root = DataRoot(tmp_path)
    write_partition(root, "lineage", "e1", _lineage(2))
    load_experiment(root, "e1")
    write_partition(root, "lineage", "e1", _lineage(7))
    assert _run(LOAD, tmp_path, "warehouse.before_commit") == -signal.SIGKILL
    assert query(root, "SELECT count(*) FROM lineage").item() == 2  # the old rows, readable
    assert _run(LOAD, tmp_path, None) == 0
    assert query(root, "SELECT count(*) FROM lineage").item() == 7


CREATE = """
import sys
import numpy as np
from cellrna_pipeline.core.io import create_image, write_timepoint
from cellrna_pipeline.core.types import ImageMeta, VoxelSize
path = DataRoot.from_env(sys.argv[1]).raw("e1")
meta = ImageMeta((2, 1, 2, 8, 8), "uint16", VoxelSize(1, 0.5, 0.5), ("c0",))
create_image(path, meta)
for t in range(2):
    write_timepoint(path, t, np.full((1, 2, 8, 8), t + 1, np.uint16))
"""


def test_image_killed_before_it_is_in_place_is_invisible(tmp_path):
    assert _run(CREATE, tmp_path, "zarr.create.before_rename") == -signal.SIGKILL
    path = DataRoot(tmp_path).raw("e1")
    assert not path.exists() and [p.name[:5] for p in path.parent.iterdir()] == [".tmp-"]
    assert _run(CREATE, tmp_path, "zarr.timepoint.partial@2") == -signal.SIGKILL
    assert timepoints_written(path) == [0]  # t1 half-written: not counted
    assert _run(CREATE, tmp_path, None) == 0
    assert timepoints_written(path) == [0, 1]


def test_unknown_fault_names_do_nothing(tmp_path):
    assert _run(WRITE_5, tmp_path, "no.such.point") == 0
    assert read_partitions(DataRoot(tmp_path), "lineage", "e1").height == 5


# --------------------------------------------------------------------------- a real `cellrna materialize`, killed

SELECT = "raw_volume,statistics_tables,warehouse"


@pytest.fixture(scope="module")
def before_run(tmp_path_factory, tiny_acquisition_dir) -> Path:
    """A data root with e1 ingested and everything up to tracking stored (from ground truth)."""
    home = tmp_path_factory.mktemp("crash") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home / "dagster"))
        assert (
            main(["ingest", str(tiny_acquisition_dir), "--experiment", "e1", "--home", str(home)])
            == 0
        )
    seed_processed_from_truth(DataRoot(home), tiny_acquisition_dir, "e1")
    return home


def _copy(src: Path, dst: Path, monkeypatch) -> DataRoot:
    shutil.copytree(src, dst)
    monkeypatch.setenv("CELLRNA_HOME", str(dst))
    monkeypatch.setenv("DAGSTER_HOME", str(dst / "dagster"))
    return DataRoot(dst)


def _materialize(*args: str) -> int:
    return main(["materialize", "--experiment", "e1", *args])


def _killed(root: DataRoot, fault: str, *args: str) -> None:
    """`cellrna materialize --experiment e1 ARGS` in a child process, SIGKILLed at ``fault``."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(CELLRNA_HOME=str(root.home), **{ENV: fault})
    proc = subprocess.run(
        [sys.executable, "-m", "cellrna_pipeline.cli", "materialize", "--experiment", "e1", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _digest(root: DataRoot) -> dict[str, str]:
    """sha256 of the raw image's chunks and metadata (completion markers, which hold a
    time, excepted) and of every table file."""
    files = [p for p in root.raw("e1").rglob("*") if p.is_file() and ".cellrna" not in p.parts]
    files += list((root.home / "tables").glob("*/e1/*.parquet"))
    return {
        str(p.relative_to(root.home)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def _warehouse_counts(root: DataRoot) -> dict[str, int]:
    return {
        t: query(root, f'SELECT count(*) FROM "{t}"').item()
        for t in ("cells", "spots", "lineage", "experiment_summary")
    }


@pytest.fixture(scope="module")
def reference(before_run, tmp_path_factory):
    """The uninterrupted run: digest and warehouse row counts."""
    with pytest.MonkeyPatch.context() as mp:
        root = _copy(before_run, tmp_path_factory.mktemp("reference") / "home", mp)
        assert _materialize("--select", SELECT) == 0
        return root, _digest(root), _warehouse_counts(root)


@pytest.mark.slow
def test_killed_while_writing_a_timepoint(before_run, reference, tmp_path, monkeypatch):
    root = _copy(before_run, tmp_path / "home", monkeypatch)
    _killed(root, "zarr.timepoint.partial", "--timepoint", "1", "--select", "raw_volume")
    # t1 was being rewritten: it no longer counts as written, so nothing downstream reads it
    assert timepoints_written(root.raw("e1")) == [0]
    assert _materialize("--timepoint", "1", "--select", "raw_volume") == 0
    assert timepoints_written(root.raw("e1")) == [0, 1]
    raw = {k: v for k, v in reference[1].items() if k.startswith("raw")}
    assert {k: v for k, v in _digest(root).items() if k.startswith("raw")} == raw


@pytest.mark.slow
def test_killed_while_writing_tables(before_run, reference, tmp_path, monkeypatch):
    root = _copy(before_run, tmp_path / "home", monkeypatch)
    _killed(root, "parquet.before_rename@3", "--select", "statistics_tables")
    written = list((root.home / "tables").glob("*/e1/*.parquet"))
    for path in written:  # what readers see is complete
        pl.read_parquet(path)
    assert len(written) < len(reference[1]) and not root.warehouse.exists()
    assert _materialize("--select", "statistics_tables") == 0
    assert _digest(root) == reference[1]


@pytest.mark.slow
def test_killed_while_loading_the_warehouse(reference, tmp_path, monkeypatch):
    root = _copy(reference[0].home, tmp_path / "home", monkeypatch)
    # the tracker ran again and found one more track
    lineage = read_partitions(root, "lineage", "e1")
    extra = lineage.head(1).with_columns(pl.col("track_id") + 1000)
    write_partition(root, "lineage", "e1", pl.concat([lineage, extra], how="diagonal_relaxed"))
    _killed(root, "warehouse.before_commit", "--select", "warehouse")
    assert _warehouse_counts(root) == reference[2]  # the old rows, readable, no lock error
    assert _materialize("--select", "warehouse") == 0
    assert _warehouse_counts(root) == {**reference[2], "lineage": reference[2]["lineage"] + 1}
