"""Open any supported acquisition (TIFF family or OME-Zarr) as a lazy :class:`Source`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io import omezarr
from cellrna_pipeline.core.io._base import Source, build_meta
from cellrna_pipeline.core.io.tiff import open_tiff
from cellrna_pipeline.core.types import ImageMeta, VoxelSize

__all__ = ["OmeZarrSource", "Source", "open_source"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


class OmeZarrSource(Source):
    """An existing OME-Zarr image (NGFF 0.4 or 0.5) read per timepoint at full resolution."""

    def __init__(self, path: Path, meta: ImageMeta) -> None:
        self.path = path
        self.meta = meta
        self._lazy: Any = None

    def _read_timepoint(self, t: int) -> np.ndarray:
        return omezarr.read_timepoint(self.path, t, level=0)

    def _read_region(self, t: int, c: int, region_zyx: tuple[slice, slice, slice]) -> np.ndarray:
        if self._lazy is None:
            self._lazy = omezarr.open_image(self.path, level=0)
        return np.asarray(self._lazy[(t, c, *region_zyx)])

    def timepoint_dask(self, t: int, *, chunk_z: int | None = None) -> Any:
        """Lazy ``(c, z, y, x)`` of timepoint ``t`` with the container's own chunks
        (rechunked in z to ``chunk_z`` planes if given)."""
        t = self._check_t(t)
        lazy = omezarr.open_image(self.path, level=0)[t]
        return lazy if chunk_z is None else lazy.rechunk({1: int(chunk_z)})


def _is_zarr_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (".zgroup", ".zattrs", "zarr.json"))


def open_source(
    path: str | os.PathLike[str],
    *,
    voxel_size: VoxelSize | None = None,
    channel_names: Sequence[str] | None = None,
    voxel_size_required: bool = True,
) -> Source:
    """Open an acquisition for ingestion without loading it.

    Supported: OME-TIFF, ImageJ hyperstack TIFF, plain TIFF (``YX``, ``ZYX``, RGB, or
    axes named in tifffile metadata), and OME-Zarr images (NGFF 0.4 or 0.5).

    Parameters
    ----------
    path : a file (TIFF) or a directory (OME-Zarr).
    voxel_size : physical voxel size (um, ``zyx``); overrides the file's metadata and is
        required when the file has none (plain TIFF), unless ``voxel_size_required`` is
        false: then such a file gets a 1 um placeholder and ``meta.extra["voxel_size_known"]``
        is false.
    channel_names : one unique name per channel; overrides the file's names (default
        from the metadata, else ``c0, c1, ...``).

    Returns
    -------
    Source with ``.meta`` (:class:`~cellrna_pipeline.core.types.ImageMeta`, shape
    ``(t, c, z, y, x)``) and ``.read_timepoint(t) -> (c, z, y, x)``. Close it (or use
    ``with``) when done.

    Raises
    ------
    InputError
        One line naming the file and the problem: missing or empty file, unknown format,
        corrupt or truncated TIFF, corrupt OME-Zarr metadata, unsupported dtype or axes,
        wrong number of dimensions, missing or non-positive voxel size, bad channel names.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_dir():
        if not _is_zarr_dir(p):
            raise InputError(f"{p}: a directory that is not an OME-Zarr image")
        return _open_omezarr(
            p,
            voxel_size=voxel_size,
            channel_names=channel_names,
            voxel_size_required=voxel_size_required,
        )
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic in _TIFF_MAGIC or p.suffix.lower() in (".tif", ".tiff", ".btf", ".tf8"):
        return open_tiff(
            p,
            voxel_size=voxel_size,
            channel_names=channel_names,
            voxel_size_required=voxel_size_required,
        )
    raise InputError(
        f"{p}: unsupported file format (expected TIFF/OME-TIFF or an OME-Zarr directory)"
    )


def _open_omezarr(
    path: Path,
    *,
    voxel_size: VoxelSize | None,
    channel_names: Sequence[str] | None,
    voxel_size_required: bool,
) -> OmeZarrSource:
    stored = omezarr.read_image_meta(path)
    from_metadata = bool(stored.extra.get("voxel_size_from_metadata"))
    meta = build_meta(
        path,
        shape_tczyx=stored.shape_tczyx,
        dtype=stored.dtype,
        metadata_voxel_size=stored.voxel_size if from_metadata else None,
        voxel_size=voxel_size,
        metadata_channel_names=stored.channel_names,
        channel_names=channel_names,
        frame_interval_s=stored.frame_interval_s,
        extra={**stored.extra, "format": "ome-zarr"},
        voxel_size_required=voxel_size_required,
    )
    return OmeZarrSource(path, meta)
