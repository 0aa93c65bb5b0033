"""Ingestion sources: OME-TIFF, ImageJ hyperstacks, plain TIFF and OME-Zarr, with their
voxel sizes, channel names and every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io import TiffSource, open_source, write_image
from cellrna_pipeline.core.types import ImageMeta, VoxelSize

AXES_ORDER = "TCZYX"


def tczyx_data(shape_tczyx, dtype=np.uint16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=shape_tczyx).astype(dtype)


def to_axes(data_tczyx: np.ndarray, axes: str) -> np.ndarray:
    """Rearrange a full tczyx array into ``axes`` (dropping absent axes, which must be 1)."""
    dropped = tuple(i for i, a in enumerate(AXES_ORDER) if a not in axes)
    data = data_tczyx.squeeze(axis=dropped) if dropped else data_tczyx
    kept = [a for a in AXES_ORDER if a in axes]
    return np.transpose(data, [kept.index(a) for a in axes])


def write_ome(path, data, axes, **metadata):
    tifffile.imwrite(
        path, data, ome=True, photometric="minisblack", metadata={"axes": axes, **metadata}
    )


@pytest.mark.parametrize(
    ("axes", "shape_tczyx"),
    [
        ("TCZYX", (2, 3, 4, 16, 24)),
        ("TZCYX", (2, 2, 3, 16, 24)),
        ("CZYX", (1, 2, 3, 16, 24)),
        ("ZYX", (1, 1, 5, 16, 24)),
        ("YX", (1, 1, 1, 16, 24)),
    ],
)
def test_ome_tiff_axes_are_reordered_to_tczyx(tmp_path, axes, shape_tczyx):
    full = tczyx_data(shape_tczyx)
    path = tmp_path / "img.ome.tif"
    names = [f"ch{i}" for i in range(shape_tczyx[1])]
    write_ome(
        path,
        to_axes(full, axes),
        axes,
        PhysicalSizeX=0.11,
        PhysicalSizeY=0.12,
        PhysicalSizeZ=0.5,
        Channel={"Name": names},
    )
    with open_source(path) as src:
        assert isinstance(src, TiffSource)
        assert src.meta.shape_tczyx == shape_tczyx
        assert src.meta.extra["format"] == "ome-tiff"
        assert src.meta.channel_names == tuple(names)
        np.testing.assert_allclose(src.meta.voxel_size.as_tuple(), (0.5, 0.12, 0.11))
        for t in range(shape_tczyx[0]):
            np.testing.assert_array_equal(src.read_timepoint(t), full[t])
        with pytest.raises(InputError, match="out of range"):
            src.read_timepoint(shape_tczyx[0])


@pytest.mark.parametrize(
    ("unit", "value", "expected_um"),
    [("nm", 250.0, 0.25), ("µm", 0.25, 0.25), ("mm", 0.00025, 0.25)],
)
def test_ome_tiff_units_and_time(tmp_path, unit, value, expected_um):
    path = tmp_path / "img.ome.tif"
    data = tczyx_data((3, 1, 2, 8, 8))[:, 0]  # TZYX
    write_ome(
        path,
        data,
        "TZYX",
        PhysicalSizeX=value,
        PhysicalSizeXUnit=unit,
        PhysicalSizeY=value,
        PhysicalSizeYUnit=unit,
        PhysicalSizeZ=2 * value,
        PhysicalSizeZUnit=unit,
        TimeIncrement=1.5,
        TimeIncrementUnit="min",
    )
    with open_source(path) as src:
        np.testing.assert_allclose(
            src.meta.voxel_size.as_tuple(), (2 * expected_um, expected_um, expected_um)
        )
        assert src.meta.frame_interval_s == pytest.approx(90.0)
        assert src.meta.channel_names == ("c0",)


def test_given_voxel_size_and_channel_names_override_metadata(tmp_path):
    path = tmp_path / "img.ome.tif"
    write_ome(
        path,
        tczyx_data((1, 2, 2, 8, 8))[0],
        "CZYX",
        PhysicalSizeX=0.1,
        PhysicalSizeY=0.1,
        PhysicalSizeZ=0.3,
    )
    given = VoxelSize(1.0, 0.2, 0.2)
    with open_source(path, voxel_size=given, channel_names=["nucleus", "rna0"]) as src:
        assert src.meta.voxel_size == given
        assert src.meta.channel_names == ("nucleus", "rna0")
        assert src.meta.extra["voxel_size_from_metadata"] is False


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["a"], "2 channel"),
        (["a", "a"], "duplicate"),
        (["a", ""], "missing"),
        (["a", "b", "c"], "3 channel name"),
    ],
)
def test_bad_channel_names(tmp_path, names, match):
    path = tmp_path / "img.ome.tif"
    write_ome(path, tczyx_data((1, 2, 1, 8, 8))[0, :, 0], "CYX", PhysicalSizeX=0.1)
    with pytest.raises(InputError, match=match):
        open_source(path, channel_names=names)


def test_ome_tiff_zero_physical_size_is_refused(tmp_path):
    path = tmp_path / "img.ome.tif"
    write_ome(
        path,
        tczyx_data((1, 1, 2, 8, 8))[0, 0],
        "ZYX",
        PhysicalSizeX=0.0,
        PhysicalSizeY=0.1,
        PhysicalSizeZ=0.5,
    )
    with pytest.raises(InputError, match=r"img\.ome\.tif.*positive"):
        open_source(path)


@pytest.mark.parametrize("unit", ["um", "micron", "\\u00B5m"])
def test_imagej_hyperstack(tmp_path, unit):
    full = tczyx_data((2, 2, 3, 10, 12))
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path,
        to_axes(full, "TZCYX"),
        imagej=True,
        resolution=(1 / 0.2, 1 / 0.25),  # pixels per unit in x and y
        metadata={"axes": "TZCYX", "spacing": 0.8, "unit": unit, "finterval": 12.0},
    )
    with open_source(path) as src:
        assert src.meta.extra["format"] == "imagej-tiff"
        assert src.meta.shape_tczyx == (2, 2, 3, 10, 12)
        np.testing.assert_allclose(src.meta.voxel_size.as_tuple(), (0.8, 0.25, 0.2))
        assert src.meta.frame_interval_s == pytest.approx(12.0)
        np.testing.assert_array_equal(src.read_timepoint(1), full[1])


def test_imagej_without_unit_needs_a_voxel_size(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(InputError, match="no physical voxel size"):
        open_source(path)
    with open_source(path, voxel_size=VoxelSize.from_nm((300, 100, 100))) as src:
        assert src.meta.voxel_size.as_nm() == pytest.approx((300, 100, 100))


@pytest.mark.parametrize(
    ("array_shape", "shape_tczyx"),
    [((5, 16, 24), (1, 1, 5, 16, 24)), ((16, 24), (1, 1, 1, 16, 24))],
)
def test_plain_tiff_needs_voxel_size(tmp_path, array_shape, shape_tczyx):
    path = tmp_path / "plain.tif"
    data = np.arange(np.prod(array_shape), dtype=np.uint16).reshape(array_shape)
    tifffile.imwrite(path, data, photometric="minisblack")
    with pytest.raises(
        InputError, match="has no physical voxel size in its metadata; pass --voxel-size-nm Z Y X"
    ):
        open_source(path)
    voxel = VoxelSize(0.3, 0.1, 0.1)
    with open_source(path, voxel_size=voxel) as src:
        assert src.meta.extra["format"] == "tiff"
        assert src.meta.shape_tczyx == shape_tczyx
        assert src.meta.voxel_size == voxel
        np.testing.assert_array_equal(src.read_timepoint(0), data.reshape(shape_tczyx[1:]))


def test_plain_tiff_axes_from_tifffile_metadata(tmp_path):
    path = tmp_path / "czyx.tif"
    full = tczyx_data((1, 2, 3, 8, 8))
    tifffile.imwrite(
        path, to_axes(full, "ZCYX"), photometric="minisblack", metadata={"axes": "ZCYX"}
    )
    with open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1)) as src:
        assert src.meta.shape_tczyx == (1, 2, 3, 8, 8)
        np.testing.assert_array_equal(src.read_timepoint(0), full[0])


def test_plain_4d_without_axes_is_ambiguous(tmp_path):
    path = tmp_path / "4d.tif"
    tifffile.imwrite(path, np.zeros((2, 5, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(InputError, match="ambiguous axes"):
        open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1))


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((30,), np.uint8, "1-D"),
        ((2, 2, 2, 2, 8, 8), np.uint8, "6-D"),
        ((3, 8, 8), np.complex64, "unsupported dtype complex64"),
        ((3, 8, 8), np.bool_, "unsupported dtype bool"),
    ],
)
def test_unsupported_shapes_and_dtypes(tmp_path, shape, dtype, match):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(
        path, np.ones(shape, dtype), photometric="minisblack" if len(shape) > 1 else None
    )
    with pytest.raises(InputError, match=match):
        open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1))


def test_float_with_nan_is_refused_at_read(tmp_path):
    path = tmp_path / "f.tif"
    data = np.ones((2, 8, 8), np.float32)
    tifffile.imwrite(path, data, photometric="minisblack")
    with open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1)) as src:
        np.testing.assert_array_equal(src.read_timepoint(0)[0], data)
    data[1, 2, 3] = np.nan
    tifffile.imwrite(path, data, photometric="minisblack")
    with (
        open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1)) as src,
        pytest.raises(InputError, match=r"f\.tif t=0: 1 NaN"),
    ):
        src.read_timepoint(0)


def _ome_bytes(tmp_path) -> bytes:
    path = tmp_path / "good.ome.tif"
    write_ome(
        path, tczyx_data((2, 1, 3, 16, 16))[:, 0], "TZYX", PhysicalSizeX=0.1, PhysicalSizeZ=0.5
    )
    return path.read_bytes()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda good: b"", "empty file"),
        (lambda good: good[:100], "corrupt"),
        (lambda good: good[: len(good) // 2], "corrupt or truncated"),
        (lambda good: good[:-40], "corrupt or truncated"),
        (lambda good: b"II*\x00" + b"\xff" * 64, "corrupt"),
        (lambda good: b"not a tiff at all", "corrupt or unreadable TIFF"),
    ],
    ids=["empty", "header-only", "half", "tail-cut", "garbage-ifd", "not-tiff"],
)
def test_broken_files_are_input_errors(tmp_path, make, match):
    path = tmp_path / "broken.tif"
    path.write_bytes(make(_ome_bytes(tmp_path)))
    with pytest.raises(InputError, match=match) as info:
        open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1))
    message = str(info.value)
    assert "broken.tif" in message and "\n" not in message


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_source(tmp_path / "nope.tif")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file format"):
        open_source(tmp_path / "notes.txt")
    (tmp_path / "somedir").mkdir()
    with pytest.raises(InputError, match="not an OME-Zarr"):
        open_source(tmp_path / "somedir")


def test_omezarr_source(tmp_path):
    path = tmp_path / "img.ome.zarr"
    data = tczyx_data((2, 2, 3, 16, 24))
    meta = ImageMeta(
        (2, 2, 3, 16, 24), "uint16", VoxelSize(0.5, 0.1, 0.1), ("nucleus", "rna0"), 20.0
    )
    write_image(path, data, meta)
    with open_source(path) as src:
        assert src.meta.extra["format"] == "ome-zarr"
        assert src.meta.voxel_size == meta.voxel_size
        assert src.meta.channel_names == ("nucleus", "rna0")
        assert src.meta.frame_interval_s == pytest.approx(20.0)
        np.testing.assert_array_equal(src.read_timepoint(1), data[1])
    with open_source(path, voxel_size=VoxelSize(1, 0.2, 0.2), channel_names=("a", "b")) as src:
        assert src.meta.voxel_size == VoxelSize(1, 0.2, 0.2)
        assert src.meta.channel_names == ("a", "b")
    (path / ".zattrs").write_text("{broken")
    with pytest.raises(InputError, match=r"img\.ome\.zarr: cannot read OME-Zarr metadata"):
        open_source(path)


@pytest.mark.parametrize(
    ("write", "contiguous"),
    [
        (lambda p, d: tifffile.imwrite(p, d, photometric="minisblack"), True),
        (lambda p, d: tifffile.imwrite(p, d, photometric="minisblack", byteorder=">"), True),
        (lambda p, d: tifffile.imwrite(p, d, photometric="minisblack", compression="zlib"), False),
    ],
    ids=["uncompressed", "big-endian", "zlib"],
)
def test_channel_array_reads_only_what_is_sliced(tmp_path, write, contiguous):
    data = tczyx_data((1, 1, 7, 20, 24))[0, 0]
    path = tmp_path / "z.tif"
    write(path, data)
    with open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1)) as src:
        arr = src.channel_array(0, 0)
        assert arr.shape == data.shape and arr.dtype == np.uint16 and arr.ndim == 3
        for key in [
            (slice(None),) * 3,
            (slice(2, 5), slice(3, 17), slice(0, 9)),
            (slice(1, 7, 2), slice(None, None, 3), slice(5, None)),
            (4, slice(0, 1), slice(None)),
            (slice(0, 0), slice(None), slice(None)),
            (-1,),
        ]:
            np.testing.assert_array_equal(arr[key], data[key])
        assert (src._contiguous is not None) == contiguous  # type: ignore[attr-defined]
        # a timepoint's dask chunks read through the same reader
        np.testing.assert_array_equal(src.timepoint_dask(0, chunk_z=3).compute()[0], data)


def test_channel_array_of_a_hyperstack_and_of_ome_zarr(tmp_path):
    data = tczyx_data((2, 3, 4, 16, 20))
    path = tmp_path / "h.tif"
    tifffile.imwrite(path, to_axes(data, "TZCYX"), imagej=True, metadata={"axes": "TZCYX"})
    with open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1)) as src:
        np.testing.assert_array_equal(src.channel_array(1, 2)[1:3, 4:], data[1, 2, 1:3, 4:])
        with pytest.raises(InputError, match="channel 3 out of range"):
            src.channel_array(0, 3)
    meta = ImageMeta(data.shape, "uint16", VoxelSize(1, 0.1, 0.1), ("a", "b", "c"))
    write_image(tmp_path / "i.ome.zarr", data, meta)
    with open_source(tmp_path / "i.ome.zarr") as src:
        np.testing.assert_array_equal(src.channel_array(1, 0)[:, 5:9], data[1, 0, :, 5:9])


def test_channel_array_refuses_nan_in_the_region_read(tmp_path):
    data = np.ones((3, 8, 8), np.float32)
    data[2, 1, 1] = np.inf
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1)) as src:
        arr = src.channel_array()
        np.testing.assert_array_equal(arr[:2], data[:2])
        with pytest.raises(InputError, match="t=0: 1 NaN or infinite"):
            arr[1:]


def test_a_file_without_voxel_size_may_be_opened_with_a_placeholder(tmp_path):
    path = tmp_path / "p.tif"
    tifffile.imwrite(path, np.ones((3, 8, 8), np.uint16))
    with open_source(path, voxel_size_required=False) as src:
        assert src.meta.voxel_size.as_tuple() == (1.0, 1.0, 1.0)
        assert src.meta.extra["voxel_size_known"] is False
    with open_source(path, voxel_size=VoxelSize(1, 0.1, 0.1)) as src:
        assert src.meta.extra["voxel_size_known"] is True
