"""OME-Zarr writer/reader: round trips checked with ome-zarr's own reader, per-timepoint
isolation, concurrent writers, completeness markers, validation."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io import (
    create_image,
    create_labels,
    list_labels,
    open_image,
    read_image_meta,
    read_label_timepoint,
    read_timepoint,
    timepoints_written,
    write_image,
    write_label_timepoint,
    write_timepoint,
)
from cellrna_pipeline.core.io import omezarr as omezarr_module
from cellrna_pipeline.core.types import ImageMeta, VoxelSize

VOXEL = VoxelSize(0.5, 0.104, 0.104)


def make_meta(shape_tczyx, dtype="uint16", frame_interval_s=30.0, voxel=VOXEL) -> ImageMeta:
    names = tuple(["nucleus", "cytoplasm", "rna0"][: shape_tczyx[1]])
    return ImageMeta(tuple(shape_tczyx), dtype, voxel, names, frame_interval_s)


def random_data(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape, dtype=np.float32).astype(dtype) * 100
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def ome_zarr_nodes(path: Path):
    """Nodes as ome-zarr's reader sees them (the reference implementation)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path)))())


def expected_scales(meta: ImageMeta, n_levels: int) -> list[list[float]]:
    t = meta.frame_interval_s or 1.0
    z, y, x = meta.voxel_size.as_tuple()
    return [[t, 1.0, z, y * 2**k, x * 2**k] for k in range(n_levels)]


# (shape, chunks_zyx, expected number of levels)
ROUND_TRIP_SHAPES = [
    pytest.param((1, 1, 4, 40, 72), None, 1, id="t1-c1-4x40x72"),
    pytest.param((2, 3, 4, 40, 72), (2, 32, 32), 1, id="t2-c3-chunk-non-multiple"),
    pytest.param((2, 2, 3, 130, 140), None, 2, id="t2-c2-two-levels"),
]


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize(("shape", "chunks_zyx", "n_levels"), ROUND_TRIP_SHAPES)
def test_round_trip_read_by_ome_zarr(tmp_path, shape, chunks_zyx, n_levels, dtype):
    path = tmp_path / "img.ome.zarr"
    meta = make_meta(shape, dtype)
    data = random_data(shape, dtype)
    write_image(path, data, meta, chunks_zyx=chunks_zyx)

    image = ome_zarr_nodes(path)[0]
    assert [a["name"] for a in image.metadata["axes"]] == ["t", "c", "z", "y", "x"]
    units = {a["name"]: a.get("unit") for a in image.metadata["axes"]}
    assert units == {
        "t": "second",
        "c": None,
        "z": "micrometer",
        "y": "micrometer",
        "x": "micrometer",
    }
    assert len(image.data) == n_levels
    scales = [tr[0]["scale"] for tr in image.metadata["coordinateTransformations"]]
    np.testing.assert_allclose(scales, expected_scales(meta, n_levels))
    assert image.metadata["channel_names"] == list(meta.channel_names)
    np.testing.assert_array_equal(np.asarray(image.data[0]), data)
    assert image.data[0].dtype == np.dtype(dtype)

    # Our own reader agrees.
    got = read_image_meta(path)
    assert got.shape_tczyx == shape
    assert got.dtype == dtype
    assert got.voxel_size == meta.voxel_size
    assert got.channel_names == meta.channel_names
    assert got.frame_interval_s == pytest.approx(30.0)
    assert got.extra["ngff_version"] == "0.4"
    assert len(got.extra["levels"]) == n_levels
    for t in range(shape[0]):
        np.testing.assert_array_equal(read_timepoint(path, t), data[t])
    np.testing.assert_array_equal(open_image(path).compute(), data)
    assert timepoints_written(path) == list(range(shape[0]))


def test_pyramid_level_is_block_mean(tmp_path):
    from skimage.transform import downscale_local_mean

    path = tmp_path / "img.ome.zarr"
    shape = (1, 1, 2, 128, 132)
    data = random_data(shape, "uint16", seed=1)
    write_image(path, data, make_meta(shape))
    level1 = read_timepoint(path, 0, level=1)
    expected = np.rint(downscale_local_mean(data[0].astype(np.float64), (1, 1, 2, 2)))
    np.testing.assert_array_equal(level1, expected.astype(np.uint16))
    assert level1.shape == (1, 2, 64, 66)
    with pytest.raises(InputError, match="no pyramid level 2"):
        read_timepoint(path, 0, level=2)


def test_levels_stop_at_n_levels_and_min_size(tmp_path):
    shape = (1, 1, 1, 520, 600)
    create_image(tmp_path / "a.ome.zarr", make_meta(shape), n_levels=2)
    create_image(tmp_path / "b.ome.zarr", make_meta(shape))
    create_image(tmp_path / "c.ome.zarr", make_meta(shape), n_levels=10)
    levels = {
        k: read_image_meta(tmp_path / f"{k}.ome.zarr").extra["level_shapes_tczyx"] for k in "abc"
    }
    assert [s[3:] for s in levels["a"]] == [(520, 600), (260, 300)]
    assert [s[3:] for s in levels["b"]] == [(520, 600), (260, 300), (130, 150)]
    # 65 x 75 is the last level with y and x >= 64.
    assert [s[3:] for s in levels["c"]][-1] == (65, 75)
    assert all(s[2] == 1 for s in levels["c"])  # z never downsampled


@pytest.mark.parametrize("ngff_version", ["0.4", "0.5"])
def test_labels_found_by_ome_zarr(tmp_path, ngff_version):
    path = tmp_path / "img.ome.zarr"
    shape = (2, 2, 3, 130, 140)
    meta = make_meta(shape)
    create_image(path, meta, ngff_version=ngff_version)
    create_labels(path, "cells")
    create_labels(path, "spots", n_channels=2, dtype="uint16")
    rng = np.random.default_rng(2)
    cells = rng.integers(0, 50, size=(3, 130, 140)).astype(np.int64)  # zyx, safe cast
    spots = rng.integers(0, 9, size=(2, 3, 130, 140)).astype(np.uint16)
    write_label_timepoint(path, "cells", 1, cells)
    write_label_timepoint(path, "spots", 0, spots)

    assert list_labels(path) == ["cells", "spots"]
    nodes = ome_zarr_nodes(path)
    by_name = {
        n.metadata.get("name"): n
        for n in nodes
        if any(type(s).__name__ == "Label" for s in n.specs)
    }
    assert set(by_name) == {"cells", "spots"}
    cells_node = by_name["cells"]
    assert [a["name"] for a in cells_node.metadata["axes"]] == ["t", "c", "z", "y", "x"]
    assert cells_node.data[0].shape == (2, 1, 3, 130, 140)
    np.testing.assert_array_equal(np.asarray(cells_node.data[0][1, 0]), cells)
    assert by_name["spots"].data[0].dtype == np.uint16

    np.testing.assert_array_equal(read_label_timepoint(path, "cells", 1)[0], cells)
    np.testing.assert_array_equal(read_label_timepoint(path, "spots", 0), spots)
    # Pyramid levels keep exact ids (stride subsampling, no blending).
    level1 = read_label_timepoint(path, "cells", 1, level=1)
    np.testing.assert_array_equal(level1[0], cells[:, ::2, ::2])
    assert timepoints_written(path, label="cells") == [1]
    assert timepoints_written(path, label="spots") == [0]
    assert timepoints_written(path) == []
    # Labels never disturbed the image metadata.
    assert read_image_meta(path).channel_names == meta.channel_names


def test_label_validation(tmp_path):
    path = tmp_path / "img.ome.zarr"
    create_image(path, make_meta((1, 1, 2, 20, 30)))
    create_labels(path, "cells")
    create_labels(path, "cells")  # same again: no-op
    with pytest.raises(InputError, match="already exists"):
        create_labels(path, "cells", dtype="uint16")
    with pytest.raises(InputError, match="integer dtype"):
        create_labels(path, "bad", dtype="float32")
    with pytest.raises(InputError, match="invalid label name"):
        create_labels(path, "../x")
    with pytest.raises(InputError, match="no label image 'nuclei'"):
        write_label_timepoint(path, "nuclei", 0, np.zeros((2, 20, 30), np.uint32))
    with pytest.raises(InputError, match="do not fit"):
        write_label_timepoint(path, "cells", 0, np.full((2, 20, 30), -1))
    with pytest.raises(InputError, match="must be integers"):
        write_label_timepoint(path, "cells", 0, np.zeros((2, 20, 30), np.float32))
    with pytest.raises(InputError, match="labels shape"):
        write_label_timepoint(path, "cells", 0, np.zeros((2, 20, 31), np.uint32))


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


def test_write_timepoint_touches_only_its_own_chunks(tmp_path):
    path = tmp_path / "img.ome.zarr"
    shape = (2, 2, 3, 130, 140)
    data = random_data(shape, "uint16", seed=3)
    create_image(path, make_meta(shape), chunks_zyx=(3, 64, 64))
    write_timepoint(path, 0, data[0])
    before = _files(path)

    write_timepoint(path, 1, data[1])
    after = _files(path)
    for rel, stamp in before.items():
        assert after[rel] == stamp, f"{rel} changed when writing t=1"
    new = set(after) - set(before)
    assert new, "t=1 wrote nothing"
    for rel in new:
        parts = Path(rel).parts
        # <level>/<t>/<c>/<z>/<y>/<x> chunk keys, or the t=1 completion marker.
        assert parts[1] == "1" or parts[:2] == (".cellrna", "t000001"), rel
    np.testing.assert_array_equal(read_timepoint(path, 0), data[0])
    np.testing.assert_array_equal(read_timepoint(path, 1), data[1])


def _concurrent_writer(path: str, t: int, seed: int) -> None:
    shape = (2, 2, 3, 40, 72)
    create_image(path, make_meta(shape), chunks_zyx=(3, 32, 32))  # races with the other process
    write_timepoint(path, t, random_data(shape, "uint16", seed=seed)[t])


def test_two_processes_write_different_timepoints(tmp_path):
    path = tmp_path / "img.ome.zarr"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_concurrent_writer, args=(str(path), t, 10 + t)) for t in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert timepoints_written(path) == [0, 1]
    for t in (0, 1):
        expected = random_data((2, 2, 3, 40, 72), "uint16", seed=10 + t)[t]
        np.testing.assert_array_equal(read_timepoint(path, t), expected)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_interrupted_write_is_not_complete_and_rerun_repairs(tmp_path, monkeypatch):
    path = tmp_path / "img.ome.zarr"
    shape = (2, 1, 2, 130, 140)
    data = random_data(shape, "uint8", seed=4)
    create_image(path, make_meta(shape, "uint8"))
    assert timepoints_written(path) == []
    write_timepoint(path, 0, data[0])
    assert timepoints_written(path) == [0]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing level 1")

    monkeypatch.setattr(omezarr_module, "_downsample", crash)
    with pytest.raises(KeyboardInterrupt):
        write_timepoint(path, 0, data[1])  # level 0 rewritten, level 1 not
    assert timepoints_written(path) == []
    monkeypatch.undo()
    # A writer killed inside zarr's chunk write leaves a '<key>.<uuid>.partial' file.
    debris = path / "0" / "0" / "0" / "0" / "0" / "0.0123abcd.partial"
    debris.parent.mkdir(parents=True, exist_ok=True)
    debris.write_bytes(b"half a chunk")

    write_timepoint(path, 0, data[1])
    assert timepoints_written(path) == [0]
    assert not debris.exists()
    np.testing.assert_array_equal(read_timepoint(path, 0), data[1])


def test_create_image_is_idempotent_and_names_differences(tmp_path):
    path = tmp_path / "img.ome.zarr"
    meta = make_meta((2, 2, 3, 20, 30))
    create_image(path, meta)
    create_image(path, meta)  # same: no-op
    with pytest.raises(InputError, match=r"shape \(2, 2, 3, 20, 30\)"):
        create_image(path, make_meta((3, 2, 3, 20, 30)))
    with pytest.raises(InputError, match="dtype uint16"):
        create_image(path, make_meta((2, 2, 3, 20, 30), "uint8"))
    with pytest.raises(InputError, match="voxel size"):
        create_image(path, make_meta((2, 2, 3, 20, 30), voxel=VoxelSize(1.0, 0.1, 0.1)))
    with pytest.raises(InputError, match="frame interval"):
        create_image(path, make_meta((2, 2, 3, 20, 30), frame_interval_s=None))
    with pytest.raises(InputError, match="already exists"):
        create_image(path, meta, exist_ok=False)
    assert [p.name for p in tmp_path.iterdir()] == ["img.ome.zarr"]


def test_create_image_validates_meta(tmp_path):
    with pytest.raises(InputError, match="channel name"):
        create_image(tmp_path / "a", ImageMeta((1, 2, 1, 8, 8), "uint8", VOXEL, ("a",)))
    with pytest.raises(InputError, match="duplicate"):
        create_image(tmp_path / "a", ImageMeta((1, 2, 1, 8, 8), "uint8", VOXEL, ("a", "a")))
    with pytest.raises(InputError, match="unsupported dtype"):
        create_image(tmp_path / "a", ImageMeta((1, 1, 1, 8, 8), "complex64", VOXEL, ("a",)))
    with pytest.raises(InputError, match="5 positive"):
        create_image(tmp_path / "a", ImageMeta((1, 1, 0, 8, 8), "uint8", VOXEL, ("a",)))
    assert not (tmp_path / "a").exists()


def test_write_timepoint_validates_input(tmp_path):
    path = tmp_path / "img.ome.zarr"
    create_image(path, make_meta((2, 1, 2, 8, 8), "uint8"))
    good = np.ones((1, 2, 8, 8), np.uint8)
    with pytest.raises(InputError, match="NaN"):
        write_timepoint(path, 0, np.full((1, 2, 8, 8), np.nan, np.float32))
    with pytest.raises(InputError, match="non-integer"):
        write_timepoint(path, 0, good * 0.5)
    with pytest.raises(InputError, match="do not fit"):
        write_timepoint(path, 0, good.astype(np.int32) * 300)
    with pytest.raises(InputError, match="volume shape"):
        write_timepoint(path, 0, good[0])
    with pytest.raises(InputError, match="out of range"):
        write_timepoint(path, 2, good)
    with pytest.raises(InputError, match="no such OME-Zarr"):
        write_timepoint(tmp_path / "missing.ome.zarr", 0, good)
    assert timepoints_written(path) == []
    write_timepoint(path, 1, good.astype(np.int64) * 200)  # fits: value-safe cast
    np.testing.assert_array_equal(read_timepoint(path, 1), good * 200)


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_reads_images_written_by_ome_zarr(tmp_path, ngff):
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image as oz_write_image

    path = tmp_path / f"ext{ngff}.ome.zarr"
    data = random_data((2, 1, 3, 128, 128), "uint16", seed=5)
    fmt = FormatV04() if ngff == "0.4" else FormatV05()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    oz_write_image(
        data,
        group,
        fmt=fmt,
        axes="tczyx",
        scale_factors=(2,),
        scale={"t": 60.0, "c": 1.0, "z": 0.3, "y": 0.1, "x": 0.1},
        axes_units={"t": "millisecond", "z": "micrometer", "y": "micrometer", "x": "micrometer"},
        storage_options={"chunks": (1, 1, 3, 64, 64)},
    )
    meta = read_image_meta(path)
    assert meta.extra["ngff_version"] == ngff
    assert meta.extra["levels"] == ["s0", "s1"]  # read from the metadata, not assumed
    assert meta.shape_tczyx == (2, 1, 3, 128, 128)
    np.testing.assert_allclose(meta.voxel_size.as_tuple(), (0.3, 0.1, 0.1))
    assert meta.frame_interval_s == pytest.approx(0.06)
    np.testing.assert_array_equal(read_timepoint(path, 1), data[1])
    assert read_timepoint(path, 0, level=1).shape == (1, 3, 64, 64)
    assert timepoints_written(path) == [0, 1]  # foreign container: complete by definition


def test_reads_images_with_fewer_axes(tmp_path):
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image as oz_write_image

    path = tmp_path / "zyx.ome.zarr"
    data = random_data((3, 20, 30), "uint8", seed=6)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    oz_write_image(data, group, fmt=FormatV04(), axes="zyx", scale_factors=())
    meta = read_image_meta(path)
    assert meta.shape_tczyx == (1, 1, 3, 20, 30)
    np.testing.assert_array_equal(read_timepoint(path, 0), data[None])
    assert open_image(path).shape == (1, 1, 3, 20, 30)
    with pytest.raises(InputError, match="can only write into t,c,z,y,x"):
        write_timepoint(path, 0, data[None])


def test_corrupt_metadata_is_an_input_error(tmp_path):
    path = tmp_path / "img.ome.zarr"
    create_image(path, make_meta((1, 1, 1, 8, 8), "uint8"))
    attrs = path / ".zattrs"
    good = attrs.read_text()

    attrs.write_text("{not json")
    with pytest.raises(InputError, match="cannot read OME-Zarr metadata"):
        read_image_meta(path)
    attrs.write_text(json.dumps({"foo": 1}))
    with pytest.raises(InputError, match="no 'multiscales'"):
        read_image_meta(path)
    doc = json.loads(good)
    del doc["multiscales"][0]["datasets"]
    attrs.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="malformed"):
        read_timepoint(path, 0)
    with pytest.raises(InputError, match="no such OME-Zarr"):
        read_image_meta(tmp_path / "nothing.ome.zarr")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(InputError, match="cannot read OME-Zarr metadata"):
        read_image_meta(tmp_path / "plain_dir")


# --------------------------------------------------------------------------- atomic helpers


def test_atomic_dir_renames_on_success_and_cleans_on_failure(tmp_path):
    from cellrna_pipeline.core.io import atomic_dir

    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-out-")
        (tmp / "f").write_text("1")
    assert (final / "f").read_text() == "1"

    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "failed") as tmp:
        (tmp / "f").write_text("1")
        raise RuntimeError("boom")
    assert not (tmp_path / "failed").exists()

    # A concurrent creator got there first: ours is discarded, theirs kept.
    with atomic_dir(final, exist_ok=True) as tmp:
        (tmp / "f").write_text("2")
    assert (final / "f").read_text() == "1"
    with pytest.raises(FileExistsError), atomic_dir(final) as tmp:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_replace_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path):
    from cellrna_pipeline.core.io import atomic_dir

    final = tmp_path / "model"
    final.mkdir()
    (final / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final, replace=True) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed while writing")
    assert (final / "weights").read_text() == "old"
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "weights").write_text("new")
        assert (final / "weights").read_text() == "old"
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_file_writes(tmp_path):
    from cellrna_pipeline.core.io import atomic_path, atomic_write_bytes, atomic_write_text

    atomic_write_bytes(tmp_path / "sub" / "a.bin", b"abc")
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"abc"
    atomic_write_text(tmp_path / "sub" / "a.bin", "xyz")
    assert (tmp_path / "sub" / "a.bin").read_text() == "xyz"
    with atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("ok")
    assert (tmp_path / "b.txt").read_text() == "ok"
    with pytest.raises(ValueError), atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise ValueError
    assert (tmp_path / "b.txt").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt", "sub"]
