"""``cellrna track``: CTC masks in, CTC result out; bad input exits 2 and changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cellrna_pipeline.cli import main
from cellrna_pipeline.core.io.ctc import check_ctc_result, list_ctc_frames, read_ctc_tracks
from cellrna_pipeline.core.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def acq():
    # 6 frames, 5 cells, frequent divisions, no border crossings: every track is clear
    return synthesize(
        SynthConfig(
            seed=4,
            timepoints=6,
            shape_zyx=(10, 96, 96),
            voxel_size_um=(0.6, 0.3, 0.3),
            n_cells=5,
            cell_radius_um=4.0,
            division_probability=0.25,
            enter_leave=False,
            calibration_images=False,
        )
    )


@pytest.fixture
def masks_dir(tmp_path, acq):
    folder = tmp_path / "01_SEG"
    folder.mkdir()
    for t, frame in enumerate(acq.cells):
        tifffile.imwrite(folder / f"mask{t:03d}.tif", frame.astype(np.uint16))
    return folder


def test_track_writes_a_valid_ctc_result(tmp_path, masks_dir, acq, capsys):
    out = tmp_path / "01_RES"
    code = main(
        [
            "track",
            "--ctc-masks",
            str(masks_dir),
            "--out",
            str(out),
            "--voxel-size-nm",
            "600",
            "300",
            "300",
        ]
    )
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    assert check_ctc_result(out) == []
    frames = list_ctc_frames(out)
    assert frames.frames == list(range(acq.cells.shape[0]))
    tracks = read_ctc_tracks(out / "res_track.txt")
    # same tracks and divisions as the ground truth, up to relabelling
    assert tracks.height == acq.lineage.height
    assert int((tracks["parent_label"] > 0).sum()) == int((acq.lineage["parent_label"] > 0).sum())
    for t, gt in enumerate(acq.cells):
        res = frames.read(t)
        pairs = {(int(a), int(b)) for a, b in zip(gt.ravel(), res.ravel(), strict=True) if a}
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def test_track_result_passes_the_ctc_scorer(tmp_path, masks_dir, acq):
    """py-ctcmetrics (the field's scorer) finds the result valid and perfect against the
    generator's CTC ground truth (``ground_truth/TRA``: man_track masks and lineage)."""
    import contextlib
    import io
    import warnings

    from cellrna_pipeline.core.synth import write_acquisition

    ctc = pytest.importorskip("ctc_metrics.scripts.evaluate")
    gt = write_acquisition(acq, tmp_path / "acq") / "ground_truth"
    out = tmp_path / "01_RES"
    args = ["track", "--ctc-masks", str(masks_dir), "--out", str(out)]
    assert main([*args, "--voxel-size-nm", "600", "300", "300"]) == 0
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = ctc.evaluate_sequence(str(out), str(gt), ["Valid", "DET", "TRA"], threads=1)
    assert (scores["Valid"], scores["DET"], scores["TRA"]) == (1, 1.0, 1.0)


def test_track_with_images_and_2d_masks(tmp_path, acq):
    masks, images = tmp_path / "seg", tmp_path / "img"
    masks.mkdir()
    images.mkdir()
    mid = acq.cells.shape[1] // 2
    for t, frame in enumerate(acq.cells):
        tifffile.imwrite(masks / f"man_seg{t:03d}.tif", frame[mid].astype(np.uint16))
        tifffile.imwrite(images / f"t{t:03d}.tif", acq.image[t, 0, mid])
    out = tmp_path / "res"
    assert (
        main(["track", "--ctc-masks", str(masks), "--out", str(out), "--image-dir", str(images)])
        == 0
    )
    assert check_ctc_result(out) == []
    assert tifffile.imread(out / "mask000.tif").ndim == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ctc-masks", "{tmp}/nowhere"], "no such folder"),
        (["--ctc-masks", "{masks}", "--voxel-size-nm", "0", "300", "300"], "positive"),
        (["--ctc-masks", "{masks}", "--image-dir", "{tmp}"], "no CTC image files"),
    ],
)
def test_bad_input_exits_2(tmp_path, masks_dir, capsys, args, message):
    out = tmp_path / "out"
    argv = ["track", *[a.format(tmp=tmp_path, masks=masks_dir) for a in args], "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_refuses_to_overwrite_inputs_or_foreign_folders(tmp_path, masks_dir, capsys):
    before = sorted(p.name for p in masks_dir.iterdir())
    assert main(["track", "--ctc-masks", str(masks_dir), "--out", str(masks_dir)]) == 2
    assert "input folder" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["track", "--ctc-masks", str(masks_dir), "--out", str(other)]) == 2
    assert "not CTC results" in capsys.readouterr().err
    assert sorted(p.name for p in masks_dir.iterdir()) == before
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_empty_masks_and_help(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    tifffile.imwrite(folder / "mask000.tif", np.zeros((8, 8), np.uint16))
    assert main(["track", "--ctc-masks", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["track", "--help"])
    assert exc.value.code == 0
    assert "--ctc-masks" in capsys.readouterr().out
