"""Chunked I/O used by preprocessing and ingestion: block-wise OME-Zarr writes, lazy TIFF
timepoints, chunk sizes, streamed statistics."""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io import (
    auto_chunks_zyx,
    create_image,
    create_labels,
    open_source,
    preview_level,
    read_image_meta,
    read_label_timepoint,
    read_timepoint,
    timepoint_stats,
    timepoints_written,
    write_label_timepoint,
    write_timepoint,
)
from cellrna_pipeline.core.types import ImageMeta, VoxelSize

VOX = VoxelSize(0.5, 0.2, 0.2)


def _meta(dtype: str, shape=(2, 2, 7, 301, 263)) -> ImageMeta:
    return ImageMeta(shape, dtype, VOX, tuple(f"c{i}" for i in range(shape[1])), 10.0)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_blockwise_write_equals_in_memory_write_at_every_level(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    volume = (rng.random((2, 7, 301, 263)) * 1000).astype(dtype)
    for name in ("mem", "blocks"):
        create_image(tmp_path / name, _meta(dtype), chunks_zyx=(3, 64, 64))
    write_timepoint(tmp_path / "mem", 1, volume)
    # chunks deliberately misaligned with the container's (3, 64, 64)
    write_timepoint(tmp_path / "blocks", 1, da.from_array(volume, chunks=(1, 2, 50, 70)))
    levels = read_image_meta(tmp_path / "mem").extra["levels"]
    assert len(levels) == 3  # 301 -> 151 -> 76 (odd sizes: partial edge blocks)
    for level in range(len(levels)):
        np.testing.assert_array_equal(
            read_timepoint(tmp_path / "blocks", 1, level=level),
            read_timepoint(tmp_path / "mem", 1, level=level),
        )
    assert timepoints_written(tmp_path / "blocks") == [1]


def test_blockwise_write_validates_like_the_in_memory_one(tmp_path: Path) -> None:
    create_image(tmp_path / "img", _meta("uint16", (1, 1, 4, 32, 32)))
    with pytest.raises(InputError, match="volume shape"):
        write_timepoint(tmp_path / "img", 0, da.zeros((1, 4, 32, 31), dtype=np.uint16))
    bad = np.zeros((1, 4, 32, 32), np.float32)
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_timepoint(tmp_path / "img", 0, da.from_array(bad, chunks=(1, 2, 16, 16)))
    assert timepoints_written(tmp_path / "img") == []  # a failed write is never marked done
    big = da.full((1, 4, 32, 32), 70000.0, chunks=(1, 4, 32, 32))
    with pytest.raises(InputError, match="do not fit"):
        write_timepoint(tmp_path / "img", 0, big)


def test_blockwise_label_write(tmp_path: Path) -> None:
    create_image(tmp_path / "img", _meta("uint16", (1, 1, 5, 150, 140)), chunks_zyx=(2, 32, 32))
    create_labels(tmp_path / "img", "cells")
    labels = np.random.default_rng(1).integers(0, 50, (5, 150, 140)).astype(np.uint32)
    write_label_timepoint(tmp_path / "img", "cells", 0, da.from_array(labels, chunks=(3, 40, 40)))
    for level in range(2):
        expected = labels[:, :: 2**level, :: 2**level]
        np.testing.assert_array_equal(
            read_label_timepoint(tmp_path / "img", "cells", 0, level=level)[0], expected
        )


def test_lazy_tiff_timepoint_reads_planes_in_chunks(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    stack = rng.integers(0, 4000, (9, 40, 33), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)  # plain ZYX TIFF, no metadata
    hyper = rng.integers(0, 4000, (3, 5, 2, 24, 20), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "hyper.ome.tif",
        hyper,
        ome=True,
        metadata={
            "axes": "TZCYX",
            "PhysicalSizeX": 0.2,
            "PhysicalSizeY": 0.2,
            "PhysicalSizeZ": 0.5,
        },
    )
    with open_source(tmp_path / "stack.tif", voxel_size=VOX) as src:
        lazy = src.timepoint_dask(0, chunk_z=4)
        assert lazy.shape == (1, 9, 40, 33) and lazy.chunks[1] == (4, 4, 1)
        with dask.config.set(scheduler="threads"):
            np.testing.assert_array_equal(lazy.compute(), stack[None])
    with open_source(tmp_path / "hyper.ome.tif") as src:
        for t in range(3):
            lazy = src.timepoint_dask(t, chunk_z=2)
            np.testing.assert_array_equal(lazy.compute(), src.read_timepoint(t))
        with pytest.raises(InputError, match="out of range"):
            src.timepoint_dask(3)


def test_lazy_tiff_refuses_nan_when_computed(tmp_path: Path) -> None:
    data = np.ones((6, 16, 16), np.float32)  # (4 planes would read as RGBA samples)
    data[2, 3, 3] = np.inf
    tifffile.imwrite(tmp_path / "f.tif", data)
    with open_source(tmp_path / "f.tif", voxel_size=VOX) as src:
        lazy = src.timepoint_dask(0, chunk_z=1)
        assert lazy[:, :2].compute().sum() == 2 * 16 * 16
        with pytest.raises(InputError, match="NaN or infinite"):
            lazy.compute()


def test_ome_zarr_source_is_lazy_too(tmp_path: Path) -> None:
    volume = np.arange(2 * 7 * 301 * 263, dtype=np.uint16).reshape(2, 7, 301, 263) % 3000
    create_image(tmp_path / "img", _meta("uint16"), chunks_zyx=(3, 64, 64))
    write_timepoint(tmp_path / "img", 0, volume)
    with open_source(tmp_path / "img") as src:
        lazy = src.timepoint_dask(0, chunk_z=7)
        assert lazy.chunks[1] == (7,)
        np.testing.assert_array_equal(lazy.compute(), volume)
    stats = timepoint_stats(tmp_path / "img", 0)
    np.testing.assert_allclose(stats["mean"], volume.reshape(2, -1).mean(axis=1))
    np.testing.assert_allclose(stats["std"], volume.reshape(2, -1).std(axis=1))
    assert stats["saturated_fraction"].tolist() == [0.0, 0.0]
    assert preview_level(tmp_path / "img", max_size_yx=200) == 1
    assert preview_level(tmp_path / "img", max_size_yx=10) == 2


def test_auto_chunks_bound_chunk_and_slab_size() -> None:
    assert auto_chunks_zyx((32, 256, 256), 2) == (32, 256, 256)  # the demo: as before
    assert auto_chunks_zyx((256, 2048, 2048), 2) == (16, 256, 256)  # 128 MiB slabs
    assert auto_chunks_zyx((64, 1024, 1024), 4) == (32, 256, 256)
    assert auto_chunks_zyx((5, 40, 30), 8) == (5, 40, 30)
