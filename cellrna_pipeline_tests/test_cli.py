"""The command line: success paths, and ingestion as all or nothing (the bad-input matrix
of every command is in ``test_bad_input.py``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import tifffile

from cellrna_pipeline.cli import main
from cellrna_pipeline.core.io import read_image_meta


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _stored(root):
    """Every stored data file and folder (the Dagster run history may record a failed run)."""
    return sorted(
        p.relative_to(root.home)
        for p in root.home.rglob("*")
        if p.relative_to(root.home).parts[0] != "dagster"
    )


def test_help_is_instant_and_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "cellrna_pipeline.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for cmd in ("demo", "synth", "ingest", "materialize", "ui"):
        assert cmd in out


def test_synth_then_ingest(capsys, tmp_path, data_root):
    code, out, _ = _run(
        capsys,
        "synth",
        str(tmp_path / "acq"),
        "--timepoints",
        "2",
        "--shape",
        "8",
        "48",
        "48",
        "--cells",
        "3",
    )
    assert code == 0 and "wrote" in out
    assert (tmp_path / "acq" / "manifest.json").exists()
    code, _, err = _run(capsys, "synth", str(tmp_path / "acq"), "--timepoints", "2")
    assert code == 2 and "not empty" in err

    code, out, _ = _run(capsys, "ingest", str(tmp_path / "acq"), "--experiment", "e1")
    assert code == 0, out
    assert (data_root.raw("e1") / "zarr.json").exists() or (
        data_root.raw("e1") / ".zattrs"
    ).exists()
    # Same name, other acquisition: refused, nothing changed.
    tifffile.imwrite(tmp_path / "other.tif", np.ones((3, 16, 16), np.uint16))
    code, _, err = _run(
        capsys,
        "ingest",
        str(tmp_path / "other.tif"),
        "--experiment",
        "e1",
        "--voxel-size-nm",
        "500",
        "100",
        "100",
    )
    assert code == 2 and "already registered" in err


def _tree(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root.home)): p.read_bytes()
        for p in sorted(root.home.rglob("*"))
        if p.is_file() and p.relative_to(root.home).parts[0] != "dagster"
    }


def _partitions(home) -> tuple[list[str], list[str]]:
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    return (
        sorted(instance.get_dynamic_partitions("experiments")),
        sorted(instance.get_dynamic_partitions("volumes")),
    )


def test_ingest_is_all_or_nothing(capsys, tmp_path, data_root):
    from cellrna_pipeline.integrations.warehouse import load_experiment, query, write_partition

    good = tmp_path / "good.tif"
    tifffile.imwrite(
        good, np.arange(2 * 4 * 3 * 16 * 16, dtype=np.uint16).reshape(2, 4, 3, 16, 16), imagej=True
    )
    voxel = ["--voxel-size-nm", "600", "150", "150"]
    names = ["--channel-names", "nucleus", "cytoplasm", "rna0"]
    assert _run(capsys, "ingest", str(good), "--experiment", "e1", *voxel, *names)[0] == 0
    # derived data of e1, as later stages would leave it
    write_partition(
        data_root,
        "lineage",
        "e1",
        pl.DataFrame({"track_id": [1], "begin": [0], "end": [1], "parent_track_id": [0]}),
    )
    load_experiment(data_root, "e1")
    (data_root.reports / "e1").mkdir(parents=True)
    (data_root.reports / "e1" / "report.html").write_text("old")
    before, parts = _tree(data_root), _partitions(data_root.home)
    assert parts == (["e1"], ["e1__t0000", "e1__t0001"])

    # A new experiment whose data turn out bad half-way: nothing registered, nothing stored.
    bad = np.ones((2, 4, 16, 16), np.float32)
    bad[1, 1, 1, 1] = np.nan
    tifffile.imwrite(tmp_path / "bad.tif", bad, imagej=True, metadata={"axes": "TZYX"})
    code, _, err = _run(capsys, "ingest", str(tmp_path / "bad.tif"), "--experiment", "e2", *voxel)
    assert code == 2 and "t=1: 1 NaN" in err, err
    assert _tree(data_root) == before and _partitions(data_root.home) == parts

    # Overwriting e1 with it: refused half-way, and e1 is back as it was.
    code, _, err = _run(
        capsys, "ingest", str(tmp_path / "bad.tif"), "--experiment", "e1", *voxel, "--overwrite"
    )
    assert code == 2 and "NaN" in err
    assert _tree(data_root) == before and _partitions(data_root.home) == parts
    assert not [p for p in data_root.home.rglob(".tmp-*")]

    # Overwriting with a good acquisition of another shape: nothing of the old one remains.
    other = tmp_path / "other.tif"
    tifffile.imwrite(
        other, np.ones((1, 4, 16, 16), np.uint16), imagej=True, metadata={"axes": "TZYX"}
    )
    code, _, err = _run(capsys, "ingest", str(other), "--experiment", "e1", *voxel, "--overwrite")
    assert code == 0, err
    assert read_image_meta(data_root.raw("e1")).shape_tczyx == (1, 1, 4, 16, 16)
    assert (
        not (data_root.reports / "e1").exists() and not data_root.tables("lineage", "e1").exists()
    )
    assert query(data_root, "SELECT count(*) FROM lineage").item() == 0
    assert _partitions(data_root.home) == (["e1"], ["e1__t0000"])
