from __future__ import annotations

import polars as pl

from cellrna_pipeline.cli import main
from cellrna_pipeline.integrations.warehouse import load_experiment, write_partition


def _warehouse(data_root):
    lineage = pl.DataFrame(
        {"track_id": [1, 2], "begin": [0, 1], "end": [3, 4], "parent_track_id": [0, 1]}
    )
    write_partition(data_root, "lineage", "e1", lineage)
    load_experiment(data_root, "e1")


def test_sql_formats(data_root, capsys, tmp_path):
    _warehouse(data_root)
    assert main(["sql", "SELECT track_id FROM lineage ORDER BY 1", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["track_id", "1", "2"]
    assert main(["sql", "SELECT * FROM lineage"]) == 0
    assert "parent_track_id" in capsys.readouterr().out
    out = tmp_path / "x.parquet"
    assert main(["sql", "SELECT * FROM lineage", "--format", "parquet", "--out", str(out)]) == 0
    assert pl.read_parquet(out).height == 2


def test_sql_errors_exit_2(data_root, capsys, tmp_path):
    assert main(["sql", "SELECT 1"]) == 2  # no warehouse yet
    assert "no warehouse" in capsys.readouterr().err
    _warehouse(data_root)
    for sql, needle in [("SELECT * FROM ghosts", "ghosts"), ("DELETE FROM lineage", "read-only")]:
        assert main(["sql", sql]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
    assert main(["sql", "SELECT 1", "--format", "parquet"]) == 2
    assert main(["sql", "SELECT 1", "--out", str(tmp_path / "no" / "x.csv")]) == 2
