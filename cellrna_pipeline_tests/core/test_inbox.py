from __future__ import annotations

import os
import shutil

from cellrna_pipeline.core.inbox import experiment_name_for, scan_inbox
from cellrna_pipeline.core.paths import validate_experiment_name


def test_experiment_names_from_drops(tmp_path):
    for name, expected in [
        ("run 1.ome.tif", "run-1"),
        ("emb__2.ome.zarr", "emb_2"),
        ("..sneaky", "sneaky"),
        ("a.tiff", "a"),
    ]:
        got = experiment_name_for(tmp_path / name)
        assert got == expected
        validate_experiment_name(got)


def test_manifest_folder_ready_only_when_complete(tmp_path, tiny_acquisition_dir):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    acq = inbox / "acq1"
    shutil.copytree(tiny_acquisition_dir, acq)
    ready, _ = scan_inbox(inbox, {})
    assert [a.experiment for a in ready] == ["acq1"]

    # Truncate a listed file: the acquisition is still being written.
    image = acq / "image.ome.tif"
    image.write_bytes(image.read_bytes()[:100])
    ready, _ = scan_inbox(inbox, {})
    assert ready == []


def test_manifest_missing_means_wait_for_stable_size(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    f = inbox / "stack.tif"
    f.write_bytes(b"x" * 10)
    old = f.stat().st_mtime - 60
    os.utime(f, (old, old))
    ready, seen = scan_inbox(inbox, {})
    assert ready == []  # first sighting: not yet known to be stable
    ready, seen2 = scan_inbox(inbox, seen)
    assert [a.path.name for a in ready] == ["stack.tif"]

    with f.open("ab") as fh:  # grows: not ready again until stable
        fh.write(b"y")
    os.utime(f, (old + 1, old + 1))
    ready, _ = scan_inbox(inbox, seen2)
    assert ready == []


def test_recent_files_must_settle(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "fresh.tif").write_bytes(b"x")
    _, seen = scan_inbox(inbox, {})
    ready, _ = scan_inbox(inbox, seen, settle_s=3600)
    assert ready == []


def test_ignores_hidden_and_partial(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in (".hidden.tif", "x.tif.part", "notes.txt", "y.tmp"):
        (inbox / name).write_bytes(b"x")
    ready, seen = scan_inbox(inbox, {}, settle_s=0)
    ready, _ = scan_inbox(inbox, seen, settle_s=0)
    assert ready == []
    assert scan_inbox(tmp_path / "missing", {}) == ([], {})
