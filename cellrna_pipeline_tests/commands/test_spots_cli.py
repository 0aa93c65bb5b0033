"""``cellrna spots detect`` on 2-D and 3-D TIFFs, and its one-line errors (exit 2)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import tifffile

from cellrna_pipeline.cli import main
from cellrna_pipeline.core.spots import match_spots


def _spots_image(shape, centres, sigma, amp=150.0, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    img = np.full(shape, 100.0)
    for c in centres:
        r2 = sum(((g - ci) / s) ** 2 for g, ci, s in zip(grids, c, sigma, strict=True))
        img += amp * np.exp(-0.5 * r2)
    return np.rint(img + rng.normal(0, 10, shape)).astype(np.uint16)


CENTRES_3D = [[4.0, 12.3, 15.6], [6.2, 40.0, 20.0], [3.0, 30.5, 50.1], [7.0, 55.0, 44.0]]


@pytest.mark.parametrize("compressed", [False, True])
def test_detect_3d_tiff_writes_csv(tmp_path, capsys, compressed):
    img = _spots_image((10, 64, 64), CENTRES_3D, (350 / 600, 1.0, 1.0))
    path = tmp_path / "img.tif"
    # compressed tiles cannot be memory-mapped: read through tifffile's chunked store
    kw = {"compression": "zlib", "tile": (32, 32)} if compressed else {}
    tifffile.imwrite(path, img, **kw)
    out = tmp_path / "sub" / "spots.csv"
    rc = main(
        ["spots", "detect", str(path), "--voxel-size-nm", "600", "150", "150", "--out", str(out)]
    )
    assert rc == 0
    table = pl.read_csv(out)
    assert table.columns == ["z", "y", "x", "intensity", "score", "size_voxels"]
    m = match_spots(table.select(["z", "y", "x"]).to_numpy(), np.asarray(CENTRES_3D))
    assert m.tp == 4 and m.fp == 0
    assert "4 spots" in capsys.readouterr().out


def test_detect_2d_tiff_anisotropic_and_custom_radius(tmp_path):
    centres = [[10.0, 12.0], [30.4, 40.2]]
    img = _spots_image((48, 64), centres, (2.0, 1.5))
    path = tmp_path / "img2d.tif"
    tifffile.imwrite(path, img)
    out = tmp_path / "spots.csv"
    args = ["spots", "detect", str(path), "--voxel-size-nm", "1000", "100", "133.3"]
    rc = main([*args, "--spot-radius-nm", "500", "200", "200", "--out", str(out)])
    assert rc == 0
    table = pl.read_csv(out)
    assert table["z"].to_list() == [0.0, 0.0]
    m = match_spots(table.select(["y", "x"]).to_numpy(), np.asarray(centres))
    assert m.tp == 2


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda p: None, [], "no such file"),
        (lambda p: p.write_bytes(b""), [], "empty file"),
        (lambda p: p.write_bytes(b"II*\x00garbage"), [], "TIFF"),
        (
            lambda p: tifffile.imwrite(p, np.zeros((2, 3, 8, 16, 16), np.uint16), imagej=True),
            [],
            "one channel",
        ),
        (lambda p: tifffile.imwrite(p, np.zeros((8,), np.uint16)), [], "2-D"),
        (
            lambda p: tifffile.imwrite(
                p, np.full((4, 16, 16), np.nan, np.float32), photometric="minisblack"
            ),
            [],
            "NaN",
        ),
        (
            lambda p: tifffile.imwrite(p, np.zeros((4, 16, 16), np.uint16)),
            ["--spot-radius-nm", "1", "-2", "3"],
            "spot_radius",
        ),
    ],
)
def test_bad_input_exit_2_one_line(tmp_path, capsys, make, extra, message):
    path = tmp_path / "bad.tif"
    make(path)
    out = tmp_path / "spots.csv"
    rc = main(
        [
            "spots",
            "detect",
            str(path),
            "--voxel-size-nm",
            "600",
            "150",
            "150",
            *extra,
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert message in err[-1]
    assert not out.exists()


def test_out_must_be_a_csv_file(tmp_path, capsys):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, np.zeros((4, 16, 16), np.uint16))
    rc = main(
        [
            "spots",
            "detect",
            str(path),
            "--voxel-size-nm",
            "600",
            "150",
            "150",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2 and "directory" in capsys.readouterr().err


def test_voxel_size_is_required(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["spots", "detect", str(tmp_path / "x.tif"), "--out", str(tmp_path / "o.csv")])
    assert exc.value.code == 2


def test_maskrcnn_without_a_model_folder_is_exit_2(tmp_path, capsys):
    pytest.importorskip("torch")
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, np.zeros((6, 16, 16), np.uint16))
    args = ["spots", "detect", str(path), "--voxel-size-nm", "600", "150", "150"]
    rc = main(
        [
            *args,
            "--method",
            "maskrcnn",
            "--model-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o.csv"),
        ]
    )
    assert rc == 2 and "model folder" in capsys.readouterr().err
