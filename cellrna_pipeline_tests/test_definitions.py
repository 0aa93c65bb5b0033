"""The whole Definitions object loads, validates and exposes the contract's names."""

from __future__ import annotations

from dagster import AssetKey, Definitions

from cellrna_pipeline.definitions import defs


def test_definitions_validate():
    Definitions.validate_loadable(defs)


def test_contract_names_present():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert "raw_volume" in keys
    assert defs.resolve_sensor_def("inbox_sensor") is not None
    assert graph.get(AssetKey("raw_volume")).partitions_def.name == "volumes"


def _table_hashes(home) -> dict[str, int]:
    """A hash of every warehouse table's sorted rows."""
    from cellrna_pipeline.core.paths import DataRoot
    from cellrna_pipeline.integrations.warehouse import TABLES, query

    root = DataRoot(home)
    hashes = {}
    for name in TABLES:
        df = query(root, f"SELECT * FROM {name}")
        hashes[name] = int(df.sort(df.columns).hash_rows().sum()) if df.height else 0
    return hashes


def test_demo_end_to_end_and_reproducible(tmp_path, monkeypatch, capsys):
    import os
    import subprocess
    import sys

    from cellrna_pipeline.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("CELLRNA_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    assert main(["demo", "--timepoints", "2"]) == 0
    out = capsys.readouterr().out
    assert "cellrna demo: summary" in out and "all succeeded" in out and "warehouse (SQL)" in out
    first = _table_hashes(home)
    assert first["cells"] and first["spots"] and first["lineage"]
    # A second demo (a new process, as a user runs it) replaces the first one in the same
    # root and produces identical tables.
    env = {**os.environ, "CELLRNA_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-m", "cellrna_pipeline.cli", "demo", "--timepoints", "2"],
        env=env,
        check=True,
        capture_output=True,
    )
    assert _table_hashes(home) == first
