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
