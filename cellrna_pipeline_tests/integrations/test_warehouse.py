from __future__ import annotations

import multiprocessing as mp

import polars as pl
import pytest

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.integrations.warehouse import (
    TABLES,
    load_experiment,
    partition_path,
    query,
    read_partitions,
    write_partition,
)


def _lineage(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"track_id": range(1, n + 1), "begin": [0] * n, "end": [3] * n, "parent_track_id": [0] * n}
    )


def _spots(t: int, n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "channel": ["rna0"] * n,
            "spot_id": range(1, n + 1),
            "z_um": [1.0] * n,
            "y_um": [2.0] * n,
            "x_um": [3.0] * n,
            "cell_id": [1] * n,
            "compartment": ["nucleus"] * n,
            "extra_column": [0] * n,  # dropped by conform
        }
    )


def test_partitions_conform_to_schema(tmp_path):
    root = DataRoot(tmp_path)
    path = write_partition(root, "spots", "e1", _spots(2, 3), timepoint=2)
    assert path == partition_path(root, "spots", "e1", 2) and path.name == "t0002.parquet"
    df = pl.read_parquet(path)
    assert list(df.columns) == list(TABLES["spots"].schema)
    assert df["timepoint"].to_list() == [2, 2, 2] and df["intensity"].null_count() == 3
    with pytest.raises(ValueError):
        partition_path(root, "spots", "e1")  # per-volume table needs a timepoint
    with pytest.raises(InputError, match="unknown table"):
        partition_path(root, "nope", "e1")


def test_load_is_idempotent_and_replaces_only_its_experiment(tmp_path):
    root = DataRoot(tmp_path)
    write_partition(root, "lineage", "e1", _lineage(3))
    write_partition(root, "lineage", "e2", _lineage(5))
    for t in range(2):
        write_partition(root, "spots", "e1", _spots(t, 4), timepoint=t)
    load_experiment(root, "e1")
    load_experiment(root, "e2")
    load_experiment(root, "e1")
    counts = query(root, "SELECT experiment, count(*) AS n FROM lineage GROUP BY 1 ORDER BY 1")
    assert counts.rows() == [("e1", 3), ("e2", 5)]
    assert query(root, "SELECT count(*) FROM spots").item() == 8
    # A partition rewritten with fewer rows replaces the old ones on the next load.
    write_partition(root, "lineage", "e1", _lineage(1))
    load_experiment(root, "e1")
    assert (
        query(root, "SELECT count(*) FROM lineage WHERE experiment = $e", {"e": "e1"}).item() == 1
    )
    assert read_partitions(root, "cells", "e1").height == 0


def test_query_parameters_are_values_not_sql(tmp_path):
    root = DataRoot(tmp_path)
    write_partition(root, "lineage", "e1", _lineage(3))
    write_partition(root, "lineage", "e2", _lineage(5))
    load_experiment(root, "e1")
    load_experiment(root, "e2")
    sql = "SELECT count(*) FROM lineage WHERE experiment = $experiment"
    assert query(root, sql, {"experiment": "e2"}).item() == 5
    assert query(root, sql, {"experiment": "e1' OR '1'='1"}).item() == 0
    assert query(root, "SELECT count(*) FROM lineage WHERE experiment = ?", ["e1"]).item() == 3


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("SELECT * FROM nope", "nope"),
        ("DELETE FROM lineage", "read-only"),
        ("DROP TABLE lineage", "read-only"),
        ("WITH x AS (SELECT 1) INSERT INTO lineage SELECT 'a', 1, 1, 1, 1, 1", "read-only"),
        ("SELEC 1", "syntax"),
        ("", "empty"),
    ],
)
def test_bad_queries_are_input_errors(tmp_path, sql, match):
    root = DataRoot(tmp_path)
    write_partition(root, "lineage", "e1", _lineage(2))
    load_experiment(root, "e1")
    with pytest.raises(InputError, match=match):
        query(root, sql)
    assert query(root, "SELECT count(*) FROM lineage").item() == 2


def test_no_warehouse_yet(tmp_path):
    with pytest.raises(InputError, match="no warehouse"):
        query(DataRoot(tmp_path), "SELECT 1")


def _load(home: str, experiment: str) -> None:
    load_experiment(DataRoot.from_env(home), experiment)


def test_concurrent_loads_do_not_fail(tmp_path):
    root = DataRoot(tmp_path)
    for i in range(4):
        write_partition(root, "lineage", f"e{i}", _lineage(i + 1))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_load, args=(str(tmp_path), f"e{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert query(root, "SELECT count(*) FROM lineage").item() == 1 + 2 + 3 + 4


def test_docs_list_every_table_and_column():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "tables.md").read_text()
    for spec in TABLES.values():
        assert f"## `{spec.name}`" in doc
        for column in spec.schema:
            assert f"| `{column}` |" in doc
