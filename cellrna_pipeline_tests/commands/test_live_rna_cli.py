"""Live-RNA on the command line: ``synth --live-rna``, ``ingest --live-rna``,
``train spot-embedding``."""

from __future__ import annotations

import polars as pl

from cellrna_pipeline.cli import main
from cellrna_pipeline.core.experiment import load_experiment, register_experiment
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.core.synth import read_manifest


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_live_rna_and_its_registration(tmp_path, capsys):
    out = tmp_path / "live"
    code, _, err = _run(
        capsys, "synth", out, "--timepoints", 3, "--shape", 8, 64, 64, "--cells", 3, "--live-rna"
    )
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["live_rna"] is True and manifest["frame_interval_s"] == 2.0
    spots = pl.read_csv(out / "ground_truth" / "spots.csv")
    assert "track_id" in spots.columns and spots["track_id"].min() >= 1
    # ingestion reads the flag from the manifest
    root = DataRoot(tmp_path / "home").ensure()
    assert register_experiment(root, "live", out).live_rna
    assert load_experiment(root, "live").live_rna


def test_ingest_flag_marks_a_static_acquisition_live(tmp_path, tiny_acquisition_dir):
    root = DataRoot(tmp_path / "home").ensure()
    assert not register_experiment(root, "e1", tiny_acquisition_dir).live_rna
    # the same acquisition re-registered with the flag: the record follows it
    assert register_experiment(root, "e1", tiny_acquisition_dir, live_rna=True).live_rna
    assert load_experiment(root, "e1").live_rna


def test_train_spot_embedding_writes_a_model_folder(tmp_path, capsys, monkeypatch):
    import cellrna_pipeline.core.tracking.embedding_train as train_module

    real = train_module.train_spot_embedding
    seen = {}

    def shrunk(config, out, **kwargs):
        seen["config"] = config
        small = config.model_copy(
            update={
                "train_sequences": 1,
                "validation_sequences": 1,
                "timepoints": 3,
                "shape_zyx": (8, 96, 96),
                "anchors_per_step": 16,
            }
        )
        return real(small, out, **kwargs)

    monkeypatch.setattr(train_module, "train_spot_embedding", shrunk)
    monkeypatch.setenv("CELLRNA_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    code, out, err = _run(capsys, "train", "spot-embedding", "--steps", 2, "--out", model)
    assert code == 0, err
    assert seen["config"].steps == 2 and seen["config"].seed == 0
    for name in ("weights.pt", "config.json", "metrics.json", "model_card.md"):
        assert (model / name).exists()
    assert "cellrna train spot-embedding --steps 2" in (model / "model_card.md").read_text()
    assert "validation top-1 position" in out

    from cellrna_pipeline.core.tracking import load_spot_embedder

    assert load_spot_embedder(model, device="cpu").config.dim == 16


def test_train_spot_embedding_bad_options(capsys):
    assert _run(capsys, "train", "spot-embedding", "--steps", 0)[0] == 2
    assert _run(capsys, "train", "spot-embedding", "--promote")[0] == 2
