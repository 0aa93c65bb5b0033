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


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    from cellrna_pipeline.cli import main

    monkeypatch.setenv("CELLRNA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    assert main(["demo", "--timepoints", "2"]) == 0
    out = capsys.readouterr().out
    assert "cellrna demo: summary" in out and "all succeeded" in out
    # A second demo in the same root replaces the previous one.
    assert main(["demo", "--timepoints", "2"]) == 0
