"""The bad-input matrix: every command and the ingestion path, one case per mistake.

Each case runs ``cellrna`` in-process (``cli.main``) against a copy of a data root that
already holds an ingested experiment and a warehouse, and checks what a user meets:
exit code 2, exactly one error line on stderr that names the problem (progress lines
``[HH:MM:SS] ...`` of work done before the problem showed are allowed before it), no
traceback, and not one stored byte changed (hash of the data root before and after; the
Dagster run history, which records the failed run, excepted). A few cases run the real
entry point in a subprocess. Every message's needle appears in docs/troubleshooting.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tifffile

from cellrna_pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
TROUBLESHOOTING = REPO / "docs" / "troubleshooting.md"
PROGRESS = re.compile(r"^\[\d\d:\d\d:\d\d\] ")
VOXEL = ["--voxel-size-nm", "600", "150", "150"]


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    needle: str  # a stable part of the message, also found in docs/troubleshooting.md
    doc: str | None = None  # the docs' spelling of the needle where the message has values

    @property
    def doc_needle(self) -> str:
        return self.doc or self.needle


def _case(id: str, argv: str, needle: str, doc: str | None = None) -> Case:
    return Case(id, tuple(shlex.split(argv)), needle, doc)


CASES = [
    # --- argparse (every command shares the parser) ---
    _case("args-missing", "ingest {inp}/plain.tif", "the following arguments are required"),
    _case(
        "args-voxel-2-values",
        "ingest {inp}/plain.tif --experiment e2 --voxel-size-nm 1 2",
        "expected 3 arguments",
    ),
    _case("args-unknown-command", "frobnicate", "invalid choice"),
    _case("args-not-an-int", "materialize --experiment e1 --timepoint abc", "invalid int value"),
    # --- ingest: files ---
    _case("ingest-nonexistent", "ingest {inp}/nope.tif --experiment e2", "no such file"),
    _case(
        "ingest-empty-file",
        "ingest {inp}/empty.tif --experiment e2 " + " ".join(VOXEL),
        "empty file",
    ),
    _case(
        "ingest-corrupt-tiff",
        "ingest {inp}/corrupt.tif --experiment e2 " + " ".join(VOXEL),
        "corrupt or unreadable TIFF",
    ),
    _case(
        "ingest-truncated-tiff",
        "ingest {inp}/truncated.tif --experiment e2 " + " ".join(VOXEL),
        "truncated TIFF",
    ),
    _case(
        "ingest-wrong-ndim",
        "ingest {inp}/onedim.tif --experiment e2 " + " ".join(VOXEL),
        "1-D image, expected 2-D (y, x) to 5-D",
        "-D image, expected 2-D (y, x) to 5-D",
    ),
    _case(
        "ingest-wrong-dtype",
        "ingest {inp}/complex.tif --experiment e2 " + " ".join(VOXEL),
        "unsupported dtype complex64",
        "unsupported dtype",
    ),
    _case(
        "ingest-nan",
        "ingest {inp}/nan.tif --experiment e2 " + " ".join(VOXEL),
        "1 NaN or infinite value(s)",
        "NaN or infinite value(s)",
    ),
    _case(
        "ingest-inf",
        "ingest {inp}/inf.tif --experiment e2 " + " ".join(VOXEL),
        "2 NaN or infinite value(s)",
        "NaN or infinite value(s)",
    ),
    _case(
        "ingest-no-voxel-size",
        "ingest {inp}/plain.tif --experiment e2",
        "has no physical voxel size in its metadata",
    ),
    _case(
        "ingest-zero-voxel",
        "ingest {inp}/plain.tif --experiment e2 --voxel-size-nm 0 150 150",
        "voxel size must be positive and finite",
    ),
    _case(
        "ingest-negative-voxel",
        "ingest {inp}/plain.tif --experiment e2 --voxel-size-nm 600 -150 150",
        "voxel size must be positive and finite",
    ),
    _case(
        "ingest-name-escapes-root",
        "ingest {inp}/plain.tif --experiment ../evil " + " ".join(VOXEL),
        "invalid experiment name",
    ),
    _case(
        "ingest-name-taken",
        "ingest {inp}/plain.tif --experiment e1 " + " ".join(VOXEL),
        "is already registered from",
    ),
    _case(
        "ingest-corrupt-omezarr-metadata",
        "ingest {inp}/badmeta.ome.zarr --experiment e2",
        "cannot read OME-Zarr metadata",
    ),
    _case(
        "ingest-omezarr-missing-level",
        "ingest {inp}/nolevel.ome.zarr --experiment e2",
        "cannot open pyramid level",
    ),
    _case(
        "ingest-folder-not-an-image",
        "ingest {inp} --experiment e2",
        "a directory that is not an OME-Zarr image",
    ),
    _case(
        "ingest-channel-names-count",
        "ingest {inp}/plain.tif --experiment e2 --channel-names a b " + " ".join(VOXEL),
        "1 channel(s) but 2 channel name(s)",
        "channel(s) but",
    ),
    _case(
        "ingest-unwritable-root",
        "ingest {inp}/plain.tif --experiment e2 --home {inp}/afile/home " + " ".join(VOXEL),
        "is not writable",
    ),
    # --- materialize ---
    _case(
        "materialize-unknown-experiment",
        "materialize --experiment ghost",
        "unknown experiment 'ghost'",
        "unknown experiment",
    ),
    _case(
        "materialize-name-escapes-root", "materialize --experiment ../e1", "invalid experiment name"
    ),
    _case(
        "materialize-timepoint-out-of-range",
        "materialize --experiment e1 --timepoint 9",
        "has timepoints 0-1, not 9",
        "has timepoints 0-",
    ),
    _case(
        "materialize-unknown-asset",
        "materialize --experiment e1 --select nope",
        "unknown asset(s) ['nope']",
        "unknown asset(s)",
    ),
    _case(
        "materialize-missing-channel",
        "materialize --experiment nonuc --select cell_masks",
        "has no channel 'nucleus'",
        "has no channel",
    ),
    _case(
        "materialize-corrupt-stored-zarr",
        "materialize --experiment broken --select raw_volume",
        "cannot read OME-Zarr metadata",
    ),
    _case(
        "materialize-empty-root", "materialize --home {inp}/emptyhome", "no experiments registered"
    ),
    # --- sql ---
    _case(
        "sql-missing-table",
        'sql "SELECT * FROM ghosts"',
        "Table with name ghosts does not exist",
        "Table with name",
    ),
    _case("sql-write-statement", 'sql "DELETE FROM lineage"', "the warehouse is read-only here"),
    _case(
        "sql-write-after-select",
        'sql "SELECT 1; DROP TABLE lineage"',
        "the warehouse is read-only here",
    ),
    _case("sql-syntax-error", 'sql "SELEC 1"', "Parser Error"),
    _case("sql-unknown-column", 'sql "SELECT nope FROM lineage"', "Binder Error"),
    _case("sql-no-warehouse", 'sql "SELECT 1" --home {inp}/emptyhome', "no warehouse at"),
    _case(
        "sql-out-folder-missing",
        'sql "SELECT 1" --out {out}/no/such/folder/x.csv',
        "does not exist",
        "folder ... does not exist",
    ),
    _case(
        "sql-parquet-without-out",
        'sql "SELECT 1" --format parquet',
        "--format parquet needs --out FILE",
    ),
    # --- spots detect ---
    _case(
        "spots-nonexistent",
        "spots detect {inp}/nope.tif --out {out}/s.csv " + " ".join(VOXEL),
        "no such file",
    ),
    _case(
        "spots-several-channels",
        "spots detect {inp}/hyper.tif --out {out}/s.csv " + " ".join(VOXEL),
        "expected one channel (z, y, x) or (y, x)",
    ),
    _case(
        "spots-nan",
        "spots detect {inp}/nan.tif --out {out}/s.csv " + " ".join(VOXEL),
        "NaN or infinite value(s)",
    ),
    _case(
        "spots-zero-voxel",
        "spots detect {inp}/plain.tif --out {out}/s.csv --voxel-size-nm 600 0 150",
        "voxel size must be positive and finite",
    ),
    _case(
        "spots-out-is-a-folder",
        "spots detect {inp}/plain.tif --out {out} " + " ".join(VOXEL),
        "is a directory; give a file name",
    ),
    _case(
        "spots-bad-radius",
        "spots detect {inp}/plain.tif --out {out}/s.csv --spot-radius-nm 1 -2 3 " + " ".join(VOXEL),
        "spot_radius_nm",
        "spot_radius_nm",
    ),
    # --- cells segment ---
    _case(
        "cells-corrupt-tiff",
        "cells segment {inp}/corrupt.tif --out {out}/seg",
        "corrupt or unreadable TIFF",
    ),
    _case(
        "cells-missing-channel",
        "cells segment {inp}/twochan.tif --out {out}/seg --cell-channel 5",
        "--cell-channel 5 is out of range",
        "is out of range",
    ),
    _case(
        "cells-negative-diameter",
        "cells segment {inp}/plain.tif --out {out}/seg --diameter-px -3",
        "--diameter-px must be positive",
    ),
    _case(
        "cells-zero-voxel",
        "cells segment {inp}/plain.tif --out {out}/seg --voxel-size-nm 600 150 0",
        "voxel size must be positive and finite",
    ),
    # --- track ---
    _case("track-no-folder", "track --ctc-masks {inp}/nowhere --out {out}/res", "no such folder"),
    _case(
        "track-no-masks", "track --ctc-masks {inp}/ctc_empty --out {out}/res", "no CTC label files"
    ),
    _case(
        "track-shapes-differ", "track --ctc-masks {inp}/ctc_shapes --out {out}/res", "frame 0 has"
    ),
    _case(
        "track-float-masks",
        "track --ctc-masks {inp}/ctc_float --out {out}/res",
        "label images must be integers",
    ),
    _case(
        "track-out-is-input",
        "track --ctc-masks {inp}/ctc_ok --out {inp}/ctc_ok",
        "is the input folder",
    ),
    # --- synth ---
    _case("synth-zero-timepoints", "synth {out}/acq --timepoints 0", "bad generator setting"),
    _case("synth-negative-snr", "synth {out}/acq --timepoints 2 --snr -1", "bad generator setting"),
    _case("synth-out-not-empty", "synth {inp} --timepoints 2", "already exists and is not empty"),
    # --- train ---
    _case("train-zero-steps", "train cells --steps 0", "--steps must be >= 1"),
    _case("train-promote-without-register", "train cells --promote", "--promote needs --register"),
    _case("train-zero-volumes", "train cells --volumes 0", "--volumes must be >= 1"),
    _case(
        "train-cells-option-for-embedding",
        "train spot-embedding --recipe x.json",
        "--recipe: for cells only, not for spot-embedding",
    ),
    # --- demo, view, ui ---
    _case("demo-foreign-root", "demo", "holds data that the demo did not make"),
    _case(
        "view-unknown-experiment", "view ghost", "unknown experiment 'ghost'", "unknown experiment"
    ),
    _case("ui-bad-port", "ui --port 70000", "--port must be 1-65535"),
    _case("ui-unwritable-root", "ui --home {inp}/afile/home", "is not writable"),
]
SUBPROCESS_CASES = {"ingest-nan", "sql-write-statement", "spots-several-channels"}


# --------------------------------------------------------------------------- fixtures


def _tree_hash(home: Path) -> dict[str, str]:
    """sha256 of every stored file (and a marker for every folder) under the data root,
    the Dagster instance (run history) excepted."""
    out: dict[str, str] = {}
    for path in sorted(home.rglob("*")):
        rel = path.relative_to(home)
        if rel.parts[0] == "dagster":
            continue
        out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def seeded_home(tmp_path_factory, tiny_acquisition_dir) -> Path:
    """A data root with experiment e1 ingested (raw OME-Zarr of 2 timepoints), a
    warehouse, an experiment without a 'nucleus' channel and one whose stored image has
    corrupt metadata."""
    from cellrna_pipeline.core.experiment import register_experiment
    from cellrna_pipeline.core.paths import DataRoot
    from cellrna_pipeline.core.types import VoxelSize
    from cellrna_pipeline.integrations.warehouse import load_experiment, write_partition

    base = tmp_path_factory.mktemp("seeded")
    home = base / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home / "dagster"))
        assert (
            main(["ingest", str(tiny_acquisition_dir), "--experiment", "e1", "--home", str(home)])
            == 0
        )
        root = DataRoot(home)
        lineage = pl.DataFrame(
            {"track_id": [1, 2], "begin": [0, 0], "end": [1, 1], "parent_track_id": [0, 0]}
        )
        write_partition(root, "lineage", "e1", lineage)
        load_experiment(root, "e1")
        plain = base / "c0.tif"
        tifffile.imwrite(plain, np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16))
        register_experiment(root, "nonuc", plain, voxel_size=VoxelSize(0.6, 0.15, 0.15))
        register_experiment(root, "broken", tiny_acquisition_dir)
        shutil.copytree(root.raw("e1"), root.raw("broken"))
        (root.raw("broken") / ".zattrs").write_text("{ not json")
    return home


def _inputs(folder: Path) -> Path:
    """Every bad (and a few good) input file the cases name, tiny and seeded."""
    from cellrna_pipeline.core.io import write_image
    from cellrna_pipeline.core.types import ImageMeta, VoxelSize

    folder.mkdir()
    rng = np.random.default_rng(0)
    plain = rng.integers(100, 200, (4, 16, 16)).astype(np.uint16)  # z, y, x
    tifffile.imwrite(folder / "plain.tif", plain, photometric="minisblack")
    (folder / "empty.tif").write_bytes(b"")
    (folder / "corrupt.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    tifffile.imwrite(folder / "full.tif", rng.integers(0, 100, (4, 64, 64)).astype(np.uint16))
    data = (folder / "full.tif").read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 2])
    (folder / "full.tif").unlink()
    tifffile.imwrite(folder / "onedim.tif", np.zeros(8, np.uint16))
    tifffile.imwrite(folder / "complex.tif", np.zeros((3, 8, 8), np.complex64))
    nan = plain.astype(np.float32)
    nan[1, 2, 3] = np.nan
    tifffile.imwrite(folder / "nan.tif", nan, photometric="minisblack")
    inf = plain.astype(np.float32)
    inf[0, 1, 1], inf[2, 3, 3] = np.inf, -np.inf
    tifffile.imwrite(folder / "inf.tif", inf, photometric="minisblack")
    tifffile.imwrite(folder / "hyper.tif", np.zeros((2, 3, 4, 16, 16), np.uint16), imagej=True)
    tifffile.imwrite(
        folder / "twochan.tif", np.zeros((2, 16, 16), np.uint16), metadata={"axes": "CYX"}
    )
    meta = ImageMeta((1, 1, 2, 16, 16), "uint16", VoxelSize(0.6, 0.15, 0.15), ("c0",))
    for name in ("badmeta", "nolevel"):
        write_image(folder / f"{name}.ome.zarr", np.zeros((1, 1, 2, 16, 16), np.uint16), meta)
    (folder / "badmeta.ome.zarr" / ".zattrs").write_text('{"multiscales": [')
    shutil.rmtree(folder / "nolevel.ome.zarr" / "0")
    (folder / "afile").write_text("a file where a folder is expected")
    (folder / "emptyhome").mkdir()
    ctc = {
        "ctc_ok": [np.eye(8, dtype=np.uint16)] * 2,
        "ctc_shapes": [np.eye(8, dtype=np.uint16), np.eye(9, dtype=np.uint16)],
        "ctc_float": [np.eye(8, dtype=np.float32)] * 2,
        "ctc_empty": [],
    }
    for name, frames in ctc.items():
        (folder / name).mkdir()
        for t, frame in enumerate(frames):
            tifffile.imwrite(folder / name / f"mask{t:03d}.tif", frame)
    return folder


def _argv(case: Case, inp: Path, out: Path) -> list[str]:
    return [a.format(inp=inp, out=out) for a in case.argv]


@pytest.fixture
def world(tmp_path, seeded_home, monkeypatch):
    """A private copy of the seeded data root, the input files and an output folder."""
    home = tmp_path / "home"
    shutil.copytree(seeded_home, home)
    monkeypatch.setenv("CELLRNA_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))

    def no_exec(*args, **kwargs):
        raise AssertionError(f"would have started {args[0]}")

    monkeypatch.setattr(os, "execvpe", no_exec)  # `cellrna ui` must fail before exec
    out = tmp_path / "out"
    out.mkdir()
    return home, _inputs(tmp_path / "inputs"), out


def _check(code: int, err: str, case: Case) -> None:
    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err and "Stack Trace" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    problems = [ln for ln in lines if not PROGRESS.match(ln)]
    assert len(problems) == 1, f"expected one error line, got:\n{err}"
    assert problems[0].startswith("cellrna") and "error" in problems[0], problems[0]
    assert case.needle in problems[0], f"{case.needle!r} not in {problems[0]!r}"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, capfd):
    home, inp, out = world
    before = _tree_hash(home)
    outputs_before = sorted(out.rglob("*"))
    try:
        code = main(_argv(case, inp, out))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    captured = capfd.readouterr()
    _check(code, captured.err, case)
    assert captured.out == "", captured.out
    assert _tree_hash(home) == before, "the data root changed"
    assert sorted(out.rglob("*")) == outputs_before, "an output was written"


@pytest.mark.parametrize("case_id", sorted(SUBPROCESS_CASES))
def test_bad_input_through_the_real_entry_point(case_id, world):
    home, inp, out = world
    case = next(c for c in CASES if c.id == case_id)
    before = _tree_hash(home)
    env = {**os.environ, "CELLRNA_HOME": str(home), "PYTHONWARNINGS": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "cellrna_pipeline.cli", *_argv(case, inp, out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    _check(proc.returncode, proc.stderr, case)
    assert proc.stdout == ""
    assert _tree_hash(home) == before


INBOX_CASES = [
    ("empty.tif", "empty file"),
    ("corrupt.tif", "corrupt or unreadable TIFF"),
    ("truncated.tif", "truncated TIFF"),
    ("onedim.tif", "-D image, expected 2-D (y, x) to 5-D"),
    ("complex.tif", "unsupported dtype"),
    ("plain.tif", "has no physical voxel size in its metadata"),
    ("badmeta.ome.zarr", "cannot read OME-Zarr metadata"),
    ("nolevel.ome.zarr", "cannot open pyramid level"),
]


@pytest.mark.parametrize(("name", "needle"), INBOX_CASES, ids=[c[0] for c in INBOX_CASES])
def test_bad_acquisition_dropped_in_the_inbox(name, needle, world):
    """The ingestion path: the sensor names the problem in its tick, registers nothing
    and changes nothing stored."""
    from dagster import DagsterInstance

    from cellrna_pipeline.core.paths import DataRoot
    from cellrna_pipeline.defs.runner import tick_inbox_sensor

    home, inp, _ = world
    root = DataRoot(home)
    before = _tree_hash(home)
    drop = root.inbox / name
    (shutil.copytree if (inp / name).is_dir() else shutil.copy)(inp / name, drop)
    for path in [drop, *drop.rglob("*")] if drop.is_dir() else [drop]:
        os.utime(path, (path.stat().st_mtime - 60,) * 2)  # settled
    instance = DagsterInstance.get()
    first = tick_inbox_sensor(instance, root)  # first sighting: not yet known to be stable
    result = tick_inbox_sensor(instance, root, first.cursor)
    assert not result.run_requests
    reason = result.skip_reason.skip_message
    assert reason.startswith(f"cannot ingest {name}: ") and needle in reason, reason
    assert len(reason.splitlines()) == 1 and "Traceback" not in reason
    after = {k: v for k, v in _tree_hash(home).items() if not k.startswith("inbox/")}
    assert after == before


def test_every_message_is_in_the_troubleshooting_guide():
    text = TROUBLESHOOTING.read_text()
    missing = sorted({c.doc_needle for c in CASES if c.doc_needle not in text})
    assert not missing, f"add these messages to {TROUBLESHOOTING.name}: {missing}"


def test_matrix_covers_every_command():
    from cellrna_pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = set(sub.choices)  # type: ignore[arg-type]
    covered = {c.argv[0] for c in CASES}
    assert commands <= covered, f"no bad-input case for {sorted(commands - covered)}"
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    json.dumps([c.id for c in CASES])  # ids are plain strings
