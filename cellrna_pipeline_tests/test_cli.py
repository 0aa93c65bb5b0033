"""The command line: success paths and bad input (exit 2, one line, nothing changed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from cellrna_pipeline.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_bad_input(capsys, *argv, match: str):
    with pytest.raises(SystemExit) as exc:  # argparse errors
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


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


def test_argparse_errors_are_one_line(capsys):
    _assert_bad_input(capsys, "synth", match="required")
    _assert_bad_input(capsys, "ingest", "x.tif", match="--experiment")
    _assert_bad_input(
        capsys,
        "ingest",
        "x.tif",
        "--experiment",
        "e",
        "--voxel-size-nm",
        "1",
        "2",
        match="expected 3",
    )


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["ingest", "{tmp}/nope.tif", "--experiment", "e1"], "no such file"),
        (["ingest", "{tmp}/empty.tif", "--experiment", "e1"], "empty"),
        (["ingest", "{tmp}/plain.tif", "--experiment", "e1"], "voxel size"),
        (
            [
                "ingest",
                "{tmp}/plain.tif",
                "--experiment",
                "../evil",
                "--voxel-size-nm",
                "500",
                "100",
                "100",
            ],
            "invalid experiment name",
        ),
        (
            [
                "ingest",
                "{tmp}/plain.tif",
                "--experiment",
                "e1",
                "--voxel-size-nm",
                "0",
                "100",
                "100",
            ],
            "positive",
        ),
        (
            [
                "ingest",
                "{tmp}/nan.tif",
                "--experiment",
                "e1",
                "--voxel-size-nm",
                "500",
                "100",
                "100",
            ],
            "NaN",
        ),
        (["materialize", "--experiment", "ghost"], "unknown experiment"),
        (["synth", "{tmp}/s", "--timepoints", "0"], "timepoints"),
    ],
)
def test_bad_input_exit_2_one_line(capsys, tmp_path, data_root, argv, match):
    (tmp_path / "empty.tif").write_bytes(b"")
    tifffile.imwrite(tmp_path / "plain.tif", np.ones((3, 16, 16), np.uint16))
    nan = np.ones((3, 16, 16), np.float32)
    nan[1, 2, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    before = _stored(data_root)
    code, _, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and match.lower() in errors[0].lower(), err
    assert "Traceback" not in err and "Stack Trace" not in err
    assert _stored(data_root) == before


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
