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
