"""Cell Tracking Challenge I/O: masks and track files, round trips, validation, the fixture."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import polars as pl
import pytest
import tifffile

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io.ctc import (
    check_ctc_result,
    ctc_mask_name,
    list_ctc_frames,
    list_ctc_images,
    read_ctc_frame,
    read_ctc_tracks,
    write_ctc_result,
    write_ctc_tracks,
)
from cellrna_pipeline.core.tracking import ctc_tracks, track_labels
from cellrna_pipeline.core.types import VoxelSize
from cellrna_pipeline_tests.conftest import SHARED_DATA

FIXTURE = SHARED_DATA / "ctc_metric_fixture_tiny"


def _tracks(rows: list[tuple[int, int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows, schema=["label", "begin_t", "end_t", "parent_label"], orient="row"
    ).cast({"label": pl.UInt32, "begin_t": pl.Int32, "end_t": pl.Int32, "parent_label": pl.UInt32})


def _frames(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Track 1 in frames 0-2 divides into 2 and 3 in frame 3."""
    frames = [np.zeros(shape, np.uint32) for _ in range(4)]
    for t in range(3):
        frames[t][..., 2:5, 2:5] = 1
    frames[3][..., 1:3, 2:5] = 2
    frames[3][..., 4:6, 2:5] = 3
    return frames


@pytest.mark.parametrize("shape", [(8, 8), (3, 8, 8)])
def test_result_round_trip_2d_and_3d(tmp_path, shape):
    tracks = _tracks([(1, 0, 2, 0), (2, 3, 3, 1), (3, 3, 3, 1)])
    out = write_ctc_result(tmp_path / "01_RES", _frames(shape), tracks, n_frames=4)
    assert sorted(p.name for p in out.iterdir()) == [
        "mask000.tif",
        "mask001.tif",
        "mask002.tif",
        "mask003.tif",
        "res_track.txt",
    ]
    assert (out / "res_track.txt").read_text() == "1 0 2 0\n2 3 3 1\n3 3 3 1\n"
    assert read_ctc_tracks(out / "res_track.txt").equals(tracks)
    frames = list_ctc_frames(out)
    assert frames.kind == "mask" and frames.frames == [0, 1, 2, 3]
    first = frames.read(0)
    assert first.shape == (1, *shape) if len(shape) == 2 else shape
    assert tifffile.imread(out / "mask000.tif").dtype == np.uint16
    assert np.array_equal(first.reshape(shape), _frames(shape)[0])
    assert check_ctc_result(out) == []


def test_check_ctc_result_finds_inconsistencies(tmp_path):
    frames = _frames((8, 8))
    out = write_ctc_result(
        tmp_path / "r", frames, _tracks([(1, 0, 3, 0), (2, 3, 3, 1), (3, 3, 3, 1)]), n_frames=4
    )
    problems = check_ctc_result(out)
    assert any("track(s) [1] missing from the mask" in p for p in problems)
    assert any("ends at or after" in p for p in problems)
    write_ctc_tracks(out / "res_track.txt", _tracks([(1, 0, 2, 0), (2, 3, 3, 9)]))
    problems = check_ctc_result(out)
    assert any("[3] not in res_track.txt" in p for p in problems)
    assert any("parent 9 is not a track" in p for p in problems)


def test_rewrite_replaces_a_result_but_never_a_foreign_folder(tmp_path):
    tracks = _tracks([(1, 0, 2, 0), (2, 3, 3, 1), (3, 3, 3, 1)])
    out = write_ctc_result(tmp_path / "r", _frames((8, 8)), tracks, n_frames=4)
    write_ctc_result(out, _frames((8, 8))[:3], _tracks([(1, 0, 2, 0)]), n_frames=3)
    assert sorted(p.name for p in out.iterdir())[-1] == "res_track.txt"
    assert len(list(out.glob("mask*.tif"))) == 3
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not CTC results"):
        write_ctc_result(out, _frames((8, 8)), tracks, n_frames=4)
    assert (out / "notes.txt").read_text() == "mine"
    # a failed write leaves nothing behind
    with pytest.raises(InputError, match="65535"):
        big = [np.full((4, 4), 70000, np.uint32)]
        write_ctc_result(tmp_path / "big", big, _tracks([(70000, 0, 0, 0)]), n_frames=1)
    with pytest.raises(InputError, match="frames given"):
        write_ctc_result(tmp_path / "few", _frames((8, 8))[:2], tracks, n_frames=4)
    assert not (tmp_path / "few").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_mask_names_have_four_digits_beyond_999_frames():
    assert ctc_mask_name(7, 10) == "mask007.tif"
    assert ctc_mask_name(7, 1001) == "mask0007.tif"
    assert ctc_mask_name(3, 5, "man_track") == "man_track003.tif"


def test_listing_and_reading_errors(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        list_ctc_frames(tmp_path / "missing")
    with pytest.raises(InputError, match="no CTC label files"):
        list_ctc_frames(tmp_path)
    for t in (0, 2):
        tifffile.imwrite(tmp_path / f"man_seg{t:03d}.tif", np.zeros((4, 4), np.uint16))
    with pytest.raises(InputError, match="missing for frame"):
        list_ctc_frames(tmp_path)
    assert list_ctc_frames(tmp_path, consecutive=False).frames == [0, 2]
    tifffile.imwrite(tmp_path / "man_seg0002.tif", np.zeros((4, 4), np.uint16))
    with pytest.raises(InputError, match="two files for frame 2"):
        list_ctc_frames(tmp_path, consecutive=False)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match="corrupt"):
        read_ctc_frame(tmp_path / "bad.tif")
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match="integers"):
        read_ctc_frame(tmp_path / "float.tif")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_ctc_frame(tmp_path / "empty.tif")
    with pytest.raises(InputError, match="no CTC image files"):
        list_ctc_images(tmp_path)
    tifffile.imwrite(tmp_path / "t000.tif", np.zeros((4, 4), np.uint16))
    assert list(list_ctc_images(tmp_path)) == [0]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1 0 2\n", "4 non-negative integers"),
        ("1 0 2 x\n", "4 non-negative integers"),
        ("1 0 2 0\n1 3 4 0\n", "repeated"),
        ("1 5 2 0\n", "ends before"),
    ],
)
def test_bad_track_files(tmp_path, text, match):
    (tmp_path / "res_track.txt").write_text(text)
    with pytest.raises(InputError, match=match):
        read_ctc_tracks(tmp_path / "res_track.txt")


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="shared reference data not available")
def test_fixture_reads_validates_and_tracks_to_itself(tmp_path):
    # The fixture's result is valid; tracking its ground-truth masks gives a result that
    # is the ground truth up to relabelling.
    assert check_ctc_result(FIXTURE / "res") == []
    gt = read_ctc_tracks(FIXTURE / "GT" / "TRA" / "man_track.txt")
    seg = list_ctc_frames(FIXTURE / "GT" / "SEG")
    masks = np.stack(list(seg))
    result = track_labels(masks, voxel_size=VoxelSize(1.0, 1.0, 1.0))
    assignment, tracks = ctc_tracks(result)
    assert tracks.height == gt.height and (tracks["parent_label"] == 0).all()
    frames = []
    for t, frame in enumerate(masks):
        rows = assignment.filter(pl.col("t") == t)
        lut = np.zeros(int(frame.max()) + 1, np.uint32)
        lut[rows["label"].to_numpy()] = rows["ctc_label"].to_numpy()
        frames.append(lut[frame])
    out = write_ctc_result(tmp_path / "RES", frames, tracks, n_frames=len(frames))
    assert check_ctc_result(out) == []
    # every SEG object keeps one CTC label over the whole sequence
    for label in np.unique(masks[0])[1:]:
        ids = {
            int(np.unique(np.asarray(frames[t])[masks[t] == label])[0]) for t in range(len(frames))
        }
        assert len(ids) == 1
    ctc = pytest.importorskip("ctc_metrics.scripts.evaluate")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = ctc.evaluate_sequence(
            str(out), str(FIXTURE / "GT"), ["Valid", "DET", "SEG", "TRA"], threads=1
        )
    assert (scores["Valid"], scores["SEG"], scores["DET"], scores["TRA"]) == (1, 1.0, 1.0, 1.0)
