"""The embedded MLflow registry: register model folders, aliases, first-use import of the
shipped models (cell and RNA folders alike), promotion, and loading ``models:/...@champion``."""

from __future__ import annotations

import json
import os

import pytest

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.integrations.mlflow_registry import (
    CELL_MODEL,
    CHALLENGER,
    CHAMPION,
    RNA_MODEL,
    MlflowRegistry,
)


def _folder(path, kind: str, marker: str):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"kind": kind, "marker": marker}))
    (path / "weights.pt").write_bytes(marker.encode() * 10)
    (path / "metrics.json").write_text(
        json.dumps({"val_ap50": 0.5, "nested": {"iou": 0.7}, "note": "x"})
    )
    (path / "model_card.md").write_text(f"# {kind} {marker}\n")
    return path


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    _folder(root / "cell-maskrcnn", CELL_MODEL, "shipped-cell")
    _folder(root / "rna-maskrcnn", RNA_MODEL, "shipped-rna")
    return root


@pytest.fixture(scope="module")
def registry(tmp_path_factory, shipped):
    mp = pytest.MonkeyPatch()
    mp.setenv("CELLRNA_MODEL_REGISTRY", str(shipped))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("CELLRNA_MLFLOW_TRACKING_URI", raising=False)
    yield MlflowRegistry(tmp_path_factory.mktemp("home") / "mlruns")
    mp.undo()


def test_first_use_imports_the_shipped_champion_for_cells_and_rna(registry):
    assert registry.get_version(CELL_MODEL) is None
    for name, marker in ((CELL_MODEL, "shipped-cell"), (RNA_MODEL, "shipped-rna")):
        loaded = registry.load_model_folder(name)
        assert json.loads((loaded.path / "config.json").read_text())["marker"] == marker
        assert (loaded.path / "weights.pt").read_bytes() == marker.encode() * 10
        assert CHAMPION in loaded.version.aliases and loaded.version.version == "1"
    # second use: no new import, same version
    assert registry.ensure_champion(CELL_MODEL).version == "1"
    run = registry.client.get_run(registry.get_version(CELL_MODEL).run_id)
    assert run.data.metrics["val_ap50"] == 0.5 and run.data.metrics["nested.iou"] == 0.7
    assert (registry.root / "mlflow.db").exists() and (registry.root / "artifacts").is_dir()


def test_challenger_promotion_and_models_uri(registry, tmp_path):
    registry.ensure_champion(CELL_MODEL)
    folder = _folder(tmp_path / "new", CELL_MODEL, "trained")
    run_id = registry.start_run(
        "cellrna-cell-training", run_name="test", params={"steps": 3, "model": {"fpn": 8}}
    )
    version = registry.log_model_folder(folder, CELL_MODEL, run_id=run_id, aliases=(CHALLENGER,))
    assert registry.get_version(CELL_MODEL, CHALLENGER).version == version.version
    assert registry.load_model_folder(CELL_MODEL).read_config()["marker"] == "shipped-cell"
    registry.promote(CELL_MODEL, version.version)
    assert registry.get_version(CELL_MODEL).version == version.version
    assert registry.get_version(CELL_MODEL, "previous-champion").version == "1"
    assert registry.get_version(CELL_MODEL, CHALLENGER) is None
    assert registry.load_model_folder(CELL_MODEL).read_config()["marker"] == "trained"

    import mlflow.pyfunc

    with registry.active_uris():
        pyfunc = mlflow.pyfunc.load_model(f"models:/{CELL_MODEL}@{CHAMPION}")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow's side effect is undone
    wrapper = pyfunc.unwrap_python_model()
    assert json.loads((wrapper.folder / "config.json").read_text())["marker"] == "trained"


def test_errors_are_one_line_input_errors(registry, tmp_path):
    with pytest.raises(InputError, match="no model version"):
        registry.load_model_folder(CELL_MODEL, alias="nope")
    with pytest.raises(InputError, match="not a model folder"):
        registry.log_model_folder(tmp_path, CELL_MODEL)


def _first_use(root: str) -> str:
    return MlflowRegistry(root).ensure_champion(CELL_MODEL).version


@pytest.mark.slow
def test_concurrent_first_use_imports_once(tmp_path, shipped, monkeypatch):
    """Two processes loading the champion of a fresh store: one import, one version."""
    import multiprocessing

    monkeypatch.setenv("CELLRNA_MODEL_REGISTRY", str(shipped))
    monkeypatch.delenv("CELLRNA_MLFLOW_TRACKING_URI", raising=False)
    root = str(tmp_path / "mlruns")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        versions = pool.map(_first_use, [root, root])
    assert versions == ["1", "1"]
    registry = MlflowRegistry(root)
    assert len(registry.client.search_model_versions(f"name='{CELL_MODEL}'")) == 1
