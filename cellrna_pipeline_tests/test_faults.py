"""Crash safety: a process SIGKILLed in the middle of a write leaves the previous state
visible, and a rerun completes with the same result as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import polars as pl

from cellrna_pipeline.core.faults import ENV
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.integrations.warehouse import (
    load_experiment,
    query,
    read_partitions,
    write_partition,
)


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


def test_unknown_fault_names_do_nothing(tmp_path):
    assert _run(WRITE_5, tmp_path, "no.such.point") == 0
    assert read_partitions(DataRoot(tmp_path), "lineage", "e1").height == 5
