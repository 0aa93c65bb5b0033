"""OME-Zarr images and label images with axes ``t, c, z, y, x`` and a multiscale pyramid.

Layout of one container (NGFF 0.4 on zarr v2 unless ``ngff_version="0.5"``)::

    <image>.ome.zarr/
      .zgroup .zattrs            multiscales (axes, per-level scale/translation), omero channels
      0/ 1/ 2/                   pyramid levels, dataset paths read from the metadata
      .cellrna/                  zarr group with the writer's settings (attributes)
        t000000/ t000001/ ...    one tiny zarr group per *completely written* timepoint
      labels/
        .zgroup .zattrs          {"labels": ["cells", ...]}
        cells/                   same structure: multiscales + image-label, levels, .cellrna/

Chunks are ``(1, 1, z, <=256, <=256)``: one timepoint of one channel never shares a chunk
file with another timepoint, so a partition (one ``t``) writes only its own files, and two
processes writing different timepoints of one image never touch the same file. See
``docs/storage.md`` for the reasons and the atomicity guarantees.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.storage import LocalStore

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.faults import checkpoint
from cellrna_pipeline.core.io._validate import (
    cast_safely,
    check_label_dtype,
    check_pixel_dtype,
    one_line,
)
from cellrna_pipeline.core.io.atomic import atomic_dir, atomic_write_text, discard
from cellrna_pipeline.core.io.units import length_to_um, time_to_s
from cellrna_pipeline.core.types import AXES_TCZYX, ImageMeta, VoxelSize

if TYPE_CHECKING:
    import dask.array

__all__ = [
    "DEFAULT_CHUNK_YX",
    "DEFAULT_MIN_SIZE_YX",
    "NGFF_VERSION",
    "READABLE_NGFF_VERSIONS",
    "auto_chunks_zyx",
    "create_image",
    "create_labels",
    "list_labels",
    "open_image",
    "preview_level",
    "read_image_meta",
    "read_label_timepoint",
    "read_timepoint",
    "timepoint_stats",
    "timepoints_written",
    "write_image",
    "write_label_timepoint",
    "write_timepoint",
]

NGFF_VERSION = "0.4"
"""NGFF version written by default (zarr v2): the one most viewers read today."""
READABLE_NGFF_VERSIONS = ("0.4", "0.5")
DEFAULT_CHUNK_YX = 256
DEFAULT_MIN_SIZE_YX = 64
STATUS_GROUP = ".cellrna"
LAYOUT_VERSION = 1

ZarrFormat = Literal[2, 3]

_MARKER_RE = re.compile(r"^t(\d{6,})$")
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHANNEL_COLORS = ("0000FF", "00FF00", "FF00FF", "FF0000", "FFFF00", "00FFFF", "FFFFFF")


def auto_chunks_zyx(
    shape_zyx: Sequence[int],
    itemsize: int,
    *,
    target_chunk_mib: float = 8.0,
    max_slab_mib: float = 128.0,
    chunk_yx: int = DEFAULT_CHUNK_YX,
) -> tuple[int, int, int]:
    """Chunk shape ``(z, y, x)`` for a container of large volumes.

    y and x are ``chunk_yx`` (clipped to the image); z takes as many planes as fit
    ``target_chunk_mib`` per chunk, but no more than fit ``max_slab_mib`` for a slab of
    whole planes (``z x y x x``): a file laid out plane by plane (TIFF) is copied one
    slab at a time, so the slab bounds the memory of a copy. Small volumes get one chunk
    along z, as :func:`create_image` does by default.

    Examples
    --------
    >>> auto_chunks_zyx((32, 256, 256), 2)
    (32, 256, 256)
    >>> auto_chunks_zyx((256, 2048, 2048), 2)
    (16, 256, 256)
    """
    z, y, x = (int(s) for s in shape_zyx)
    cy, cx = min(y, chunk_yx), min(x, chunk_yx)
    per_chunk = int(target_chunk_mib * 2**20 // max(1, cy * cx * int(itemsize)))
    per_slab = int(max_slab_mib * 2**20 // max(1, y * x * int(itemsize)))
    return (max(1, min(z, per_chunk, per_slab)), cy, cx)


# --------------------------------------------------------------------------- metadata model


@dataclass(frozen=True)
class _Multiscale:
    """One multiscale group (an image or a label image) as read from its metadata."""

    root: Path
    ngff_version: str
    zarr_format: ZarrFormat
    axes: tuple[str, ...]
    axes_meta: tuple[dict[str, Any], ...]
    paths: tuple[str, ...]
    scales: tuple[tuple[float, ...], ...]  # effective per level (dataset x global)
    shapes: tuple[tuple[int, ...], ...]
    chunks: tuple[tuple[int, ...], ...]
    dtype: np.dtype
    ome: dict[str, Any]  # the OME attributes ("multiscales", "omero", "image-label", ...)

    @property
    def n_timepoints(self) -> int:
        return self.shapes[0][self.axes.index("t")] if "t" in self.axes else 1

    def array(self, level: int, *, write: bool = False) -> zarr.Array:
        if not 0 <= level < len(self.paths):
            raise InputError(
                f"{self.root}: no pyramid level {level} (levels 0..{len(self.paths) - 1})"
            )
        store = LocalStore(self.root, read_only=not write)
        return zarr.open_array(store=store, path=self.paths[level], mode="r+" if write else "r")

    def has_status(self) -> bool:
        status = self.root / STATUS_GROUP
        return (status / ".zgroup").exists() or (status / "zarr.json").exists()


def _ome_block(attrs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The OME attributes and their version: NGFF 0.5 nests them under ``"ome"``."""
    ome = attrs.get("ome")
    if isinstance(ome, dict):
        return ome, ome.get("version")
    return attrs, None


def _read_group_attrs(root: Path) -> tuple[dict[str, Any], ZarrFormat]:
    if not root.exists():
        raise InputError(f"{root}: no such OME-Zarr image")
    if not root.is_dir():
        raise InputError(f"{root}: not an OME-Zarr directory")
    try:
        group = zarr.open_group(store=LocalStore(root, read_only=True), mode="r")
        attrs = group.attrs.asdict()
        zarr_format: ZarrFormat = 2 if group.metadata.zarr_format == 2 else 3
    except Exception as exc:
        raise InputError(f"{root}: cannot read OME-Zarr metadata ({one_line(exc)})") from exc
    return attrs, zarr_format


def _scale_translation(transforms: Any, ndim: int) -> tuple[list[float], list[float]]:
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for tr in transforms or []:
        if tr.get("type") == "scale":
            scale = [float(v) for v in tr["scale"]]
        elif tr.get("type") == "translation":
            translation = [float(v) for v in tr["translation"]]
    if len(scale) != ndim or len(translation) != ndim:
        raise ValueError(f"transform of length {len(scale)} for {ndim} axes")
    return scale, translation


def _read_multiscale(root: Path) -> _Multiscale:
    """Parse the multiscales metadata of the group at ``root`` (NGFF 0.4 or 0.5)."""
    attrs, zarr_format = _read_group_attrs(root)
    ome, version = _ome_block(attrs)
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        raise InputError(f"{root}: not an OME-Zarr image (no 'multiscales' metadata)")
    try:
        ms = multiscales[0]
        version = str(version or ms.get("version") or "")
        if version not in READABLE_NGFF_VERSIONS:
            raise InputError(
                f"{root}: unsupported NGFF version {version or 'unknown'!r} "
                f"(readable: {', '.join(READABLE_NGFF_VERSIONS)})"
            )
        axes_meta = tuple(a if isinstance(a, dict) else {"name": a} for a in ms["axes"])
        axes = tuple(str(a["name"]).lower() for a in axes_meta)
        if list(axes) != [a for a in AXES_TCZYX if a in axes] or axes[-2:] != ("y", "x"):
            raise InputError(
                f"{root}: unsupported axes {list(axes)} (expected a subset of t,c,z,y,x "
                "in that order, ending with y,x)"
            )
        global_scale, _ = _scale_translation(ms.get("coordinateTransformations"), len(axes))
        paths, scales = [], []
        for ds in ms["datasets"]:
            paths.append(str(ds["path"]))
            scale, _ = _scale_translation(ds.get("coordinateTransformations"), len(axes))
            scales.append(tuple(s * g for s, g in zip(scale, global_scale, strict=True)))
        if not paths:
            raise ValueError("no datasets")
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise InputError(
            f"{root}: malformed OME-Zarr multiscales metadata ({one_line(exc)})"
        ) from exc
    shapes, chunks, dtype = [], [], None
    store = LocalStore(root, read_only=True)
    for path in paths:
        try:
            arr = zarr.open_array(store=store, path=path, mode="r")
        except Exception as exc:
            raise InputError(
                f"{root}: cannot open pyramid level {path!r} ({one_line(exc)})"
            ) from exc
        if arr.ndim != len(axes):
            raise InputError(f"{root}: level {path!r} has {arr.ndim} dims for axes {list(axes)}")
        shapes.append(tuple(int(s) for s in arr.shape))
        chunks.append(tuple(int(c) for c in arr.chunks))
        dtype = arr.dtype if dtype is None else dtype
    return _Multiscale(
        root=root,
        ngff_version=version,
        zarr_format=zarr_format,
        axes=axes,
        axes_meta=axes_meta,
        paths=tuple(paths),
        scales=tuple(scales),
        shapes=tuple(shapes),
        chunks=tuple(chunks),
        dtype=np.dtype(dtype),
        ome=ome,
    )


def _to_tczyx_shape(shape: Sequence[int], axes: Sequence[str]) -> tuple[int, int, int, int, int]:
    full = {a: 1 for a in AXES_TCZYX}
    full.update(zip(axes, shape, strict=True))
    return (full["t"], full["c"], full["z"], full["y"], full["x"])


def _meta_from_multiscale(ms: _Multiscale) -> ImageMeta:
    units = {str(a["name"]).lower(): a.get("unit") for a in ms.axes_meta}
    scale0 = dict(zip(ms.axes, ms.scales[0], strict=True))
    shape = _to_tczyx_shape(ms.shapes[0], ms.axes)
    try:
        # A 2-D image has no z spacing: 1 um is a placeholder that nothing depends on.
        zyx_um = [
            length_to_um(scale0[a], units.get(a), what=f"axis {a}") if a in scale0 else 1.0
            for a in ("z", "y", "x")
        ]
        voxel = VoxelSize(*zyx_um)
        frame_interval = None
        if "t" in scale0 and units.get("t"):
            frame_interval = time_to_s(scale0["t"], units["t"], what="axis t")
    except InputError as exc:
        raise InputError(f"{ms.root}: {exc}") from exc
    names = _channel_names_from_omero(ms.ome.get("omero"), shape[1])
    return ImageMeta(
        shape_tczyx=shape,
        dtype=ms.dtype.name,
        voxel_size=voxel,
        channel_names=names,
        frame_interval_s=frame_interval,
        extra={
            "levels": list(ms.paths),
            "ngff_version": ms.ngff_version,
            "axes": list(ms.axes),
            "level_shapes_tczyx": [_to_tczyx_shape(s, ms.axes) for s in ms.shapes],
            "chunks": list(ms.chunks[0]),
            "voxel_size_from_metadata": all(units.get(a) for a in ("y", "x") if a in units),
        },
    )


def _channel_names_from_omero(omero: Any, n_channels: int) -> tuple[str, ...]:
    default = tuple(f"c{i}" for i in range(n_channels))
    try:
        names = [str(ch.get("label") or "") for ch in omero["channels"]]
    except (TypeError, KeyError, AttributeError):
        return default
    if len(names) != n_channels or "" in names or len(set(names)) != n_channels:
        return default
    return tuple(names)


# --------------------------------------------------------------------------- writing helpers


def _level_shapes_zyx(
    shape_zyx: tuple[int, int, int], n_levels: int, min_size_yx: int
) -> list[tuple[int, int, int]]:
    """Halve y and x per level (z kept: voxels are anisotropic) while both stay >= min."""
    shapes = [shape_zyx]
    while len(shapes) < n_levels:
        z, y, x = shapes[-1]
        ny, nx = -(-y // 2), -(-x // 2)
        if ny < min_size_yx or nx < min_size_yx:
            break
        shapes.append((z, ny, nx))
    return shapes


def _axes_meta(frame_interval_s: float | None) -> list[dict[str, Any]]:
    t_axis: dict[str, Any] = {"name": "t", "type": "time"}
    if frame_interval_s is not None:
        t_axis["unit"] = "second"
    return [
        t_axis,
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]


def _write_group_json(directory: Path, zarr_format: int, attrs: dict[str, Any]) -> None:
    """A zarr group holding only attributes (used for the status group and markers)."""
    directory.mkdir(parents=True, exist_ok=True)
    if zarr_format == 2:
        atomic_write_text(directory / ".zgroup", json.dumps({"zarr_format": 2}), fsync=False)
        atomic_write_text(directory / ".zattrs", json.dumps(attrs, indent=2), fsync=False)
    else:
        doc = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
        atomic_write_text(directory / "zarr.json", json.dumps(doc, indent=2), fsync=False)


def _zarr_format_of(ngff_version: str) -> ZarrFormat:
    if ngff_version == "0.4":
        return 2
    if ngff_version == "0.5":
        return 3
    raise InputError(f"cannot write NGFF version {ngff_version!r} (choose '0.4' or '0.5')")


def _build_multiscale(
    directory: Path,
    *,
    ngff_version: str,
    name: str,
    shapes: Sequence[tuple[int, ...]],
    dtype: np.dtype,
    chunks_zyx: tuple[int, int, int],
    scales: Sequence[Sequence[float]],
    translations: Sequence[Sequence[float]],
    axes_meta: Sequence[dict[str, Any]],
    downscale_type: str,
    extra_ome: dict[str, Any],
    status_attrs: dict[str, Any],
) -> None:
    """Create empty pyramid arrays plus metadata in ``directory`` (a fresh temp dir)."""
    zarr_format = _zarr_format_of(ngff_version)
    group = zarr.open_group(store=LocalStore(directory), mode="w", zarr_format=zarr_format)
    prefix = "" if zarr_format == 2 else "s"  # 0, 1, ... (0.4 habit) or s0, s1, ... (0.18 habit)
    datasets = []
    for level, shape in enumerate(shapes):
        path = f"{prefix}{level}"
        chunks = (1, 1, *(min(c, s) for c, s in zip(chunks_zyx, shape[2:], strict=True)))
        kwargs: dict[str, Any]
        if zarr_format == 2:
            from numcodecs import Blosc

            kwargs = {
                "compressors": Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
                "chunk_key_encoding": {"name": "v2", "separator": "/"},
            }
        else:
            kwargs = {"dimension_names": list(AXES_TCZYX)}
        group.create_array(path, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, **kwargs)
        datasets.append(
            {
                "path": path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": [float(v) for v in scales[level]]},
                    {"type": "translation", "translation": [float(v) for v in translations[level]]},
                ],
            }
        )
    multiscale: dict[str, Any] = {
        "name": name,
        "axes": list(axes_meta),
        "datasets": datasets,
        "type": downscale_type,
        "metadata": {
            "description": f"y and x halved per level by {downscale_type}; z and t kept",
            "writer": "cellrna-pipeline",
        },
    }
    if zarr_format == 2:
        multiscale["version"] = ngff_version
        image_label = extra_ome.get("image-label")
        if image_label is not None:
            extra_ome = {**extra_ome, "image-label": {"version": ngff_version, **image_label}}
        if "omero" in extra_ome:
            extra_ome = {**extra_ome, "omero": {"version": ngff_version, **extra_ome["omero"]}}
        group.attrs.update({"multiscales": [multiscale], **extra_ome})
    else:
        group.attrs.update(
            {"ome": {"version": ngff_version, "multiscales": [multiscale], **extra_ome}}
        )
    _write_group_json(directory / STATUS_GROUP, zarr_format, status_attrs)
    checkpoint("zarr.create.before_rename")


def _marker_dir(ms_root: Path, t: int) -> Path:
    return ms_root / STATUS_GROUP / f"t{t:06d}"


def _remove_marker(ms_root: Path, t: int) -> None:
    discard(_marker_dir(ms_root, t))  # atomic: the timepoint stops counting as written at once


def _write_marker(ms: _Multiscale, t: int) -> None:
    attrs = {
        "t": t,
        "complete": True,
        "levels": list(ms.paths),
        "written_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    with atomic_dir(_marker_dir(ms.root, t), exist_ok=True) as tmp:
        _write_group_json(tmp, ms.zarr_format, attrs)


def _downsample(
    volume_czyx: np.ndarray, factors_zyx: tuple[int, int, int], *, labels: bool
) -> np.ndarray:
    """Block mean (images) or stride subsampling (labels) by integer factors per z, y, x.

    Output shape is ``ceil(n / f)`` per axis. For the mean, an incomplete edge block is
    averaged over its real voxels only (edge padding repeats them).
    """
    fz, fy, fx = factors_zyx
    if labels:
        return volume_czyx[:, ::fz, ::fy, ::fx]
    pad = [(0, 0)] + [
        (0, (-n) % f) for n, f in zip(volume_czyx.shape[1:], factors_zyx, strict=True)
    ]
    vol = np.pad(volume_czyx, pad, mode="edge") if any(p[1] for p in pad) else volume_czyx
    c, z, y, x = vol.shape
    wide = volume_czyx.dtype.itemsize > 2 or volume_czyx.dtype == np.float64
    work = np.float64 if wide else np.float32
    mean = vol.reshape(c, z // fz, fz, y // fy, fy, x // fx, fx).mean(axis=(2, 4, 6), dtype=work)
    if volume_czyx.dtype.kind in "ui":
        np.rint(mean, out=mean)
    return mean.astype(volume_czyx.dtype)


def _level_factors(
    shape_from: Sequence[int], shape_to: Sequence[int], where: Path
) -> tuple[int, int, int]:
    factors = []
    for a, b in zip(shape_from[-3:], shape_to[-3:], strict=True):
        f = -(-a // b)
        if -(-a // f) != b:
            raise InputError(
                f"{where}: pyramid level shapes {shape_from} -> {shape_to} are not an integer downsampling"
            )
        factors.append(f)
    return (factors[0], factors[1], factors[2])


def _require_tczyx(ms: _Multiscale) -> None:
    if ms.axes != AXES_TCZYX:
        raise InputError(
            f"{ms.root}: can only write into t,c,z,y,x images, this one has axes {list(ms.axes)}"
        )


def _check_t(ms: _Multiscale, t: int) -> int:
    if isinstance(t, bool) or not isinstance(t, int | np.integer):
        raise InputError(f"{ms.root}: timepoint must be an integer, got {t!r}")
    if not 0 <= int(t) < ms.n_timepoints:
        raise InputError(f"{ms.root}: timepoint {t} out of range 0..{ms.n_timepoints - 1}")
    return int(t)


def _write_pyramid_timepoint(
    ms: _Multiscale, t: int, data_czyx: np.ndarray, *, labels: bool
) -> None:
    """Write one timepoint into every level; mark it complete only after the last chunk."""
    track = ms.has_status()
    if track:
        _remove_marker(ms.root, t)
    level_data = np.ascontiguousarray(data_czyx)
    for level in range(len(ms.paths)):
        if level > 0:
            factors = _level_factors(ms.shapes[level - 1], ms.shapes[level], ms.root)
            level_data = _downsample(level_data, factors, labels=labels)
        array = ms.array(level, write=True)
        array[t] = level_data
        _remove_partial_chunks(ms.root / ms.paths[level], array, t)
        if level == 0:
            checkpoint("zarr.timepoint.partial")
    if track:
        _write_marker(ms, t)


def _cast_block(block: np.ndarray, target: np.dtype, where: str) -> np.ndarray:
    return cast_safely(block, target, where=where)


def _downsample_block(block: np.ndarray, factors: tuple[int, int, int], labels: bool) -> np.ndarray:
    return _downsample(block, factors, labels=labels)


STORE_BAND_BYTES = 64 * 2**20
"""A dask array is stored in bands of about this many bytes, one ``compute`` each."""


def _bands(
    shape_czyx: Sequence[int],
    chunks_czyx: Sequence[int],
    itemsize: int,
    *,
    source_rows: int = 1,
) -> list[tuple[slice, ...]]:
    """Chunk-aligned ``(c, z, y, x)`` regions of about :data:`STORE_BAND_BYTES`.

    Storing a dask array band by band bounds what its graph keeps alive: inside one big
    ``compute`` the scheduler may read input chunks far ahead of the tasks that consume
    them (and an overlap filter keeps each until all its neighbours are done), so memory
    grows with the volume. A band holds all channels, some z chunks and some rows of
    y chunks, always the whole x extent, and at least ``source_rows`` rows of y chunks
    (so that a source chunk spanning several rows, e.g. a whole TIFF plane, is read once).
    """
    c, z, y, x = (int(v) for v in shape_czyx)
    _, cz, cy, _ = (int(v) for v in chunks_czyx)
    row_bytes = max(1, c * cz * cy * x * itemsize)  # one z chunk x one y chunk row
    rows_per_band = max(1, STORE_BAND_BYTES // row_bytes, int(source_rows))
    rows = [(z0, y0) for z0 in range(0, z, cz) for y0 in range(0, y, cy)]
    bands: list[tuple[slice, ...]] = []
    for i in range(0, len(rows), rows_per_band):
        group = rows[i : i + rows_per_band]
        z_starts = sorted({z0 for z0, _ in group})
        if len(z_starts) == 1:
            y_lo, y_hi = group[0][1], min(y, group[-1][1] + cy)
            bands.append(
                (
                    slice(None),
                    slice(z_starts[0], min(z, z_starts[0] + cz)),
                    slice(y_lo, y_hi),
                    slice(None),
                )
            )
        else:  # whole z chunks (each row group spans every y row of its z chunks)
            for z0 in z_starts:
                ys = [y0 for zz, y0 in group if zz == z0]
                bands.append(
                    (
                        slice(None),
                        slice(z0, min(z, z0 + cz)),
                        slice(ys[0], min(y, ys[-1] + cy)),
                        slice(None),
                    )
                )
    return bands


def _write_pyramid_timepoint_dask(ms: _Multiscale, t: int, data_czyx: Any, *, labels: bool) -> None:
    """Block-wise :func:`_write_pyramid_timepoint` of a dask ``(c, z, y, x)`` array.

    Level 0 is stored chunk-aligned (each task writes whole zarr chunks); level ``k`` is
    computed from the *stored* level ``k - 1`` in blocks of ``factor x chunk``, which
    gives exactly the values of the in-memory downsampling (a partial block only occurs
    at the far edge, where the in-memory version pads the same way).
    """
    import dask.array as da

    track = ms.has_status()
    if track:
        _remove_marker(ms.root, t)
    where = f"{ms.root} t={t}"
    data = data_czyx.map_blocks(
        _cast_block, target=ms.dtype, where=where, dtype=ms.dtype, meta=np.empty((0,) * 4, ms.dtype)
    )
    for level in range(len(ms.paths)):
        array = ms.array(level, write=True)
        chunks = ms.chunks[level][1:]  # (1, z, y, x)
        if level > 0:
            factors = _level_factors(ms.shapes[level - 1], ms.shapes[level], ms.root)
            previous = da.from_zarr(ms.array(level - 1))[t]
            block = (1, *(c * f for c, f in zip(chunks[1:], factors, strict=True)))
            previous = previous.rechunk(block)
            out_chunks = (previous.chunks[0],) + tuple(
                tuple(-(-n // f) for n in axis_chunks)
                for axis_chunks, f in zip(previous.chunks[1:], factors, strict=True)
            )
            data = previous.map_blocks(
                _downsample_block,
                factors=factors,
                labels=labels,
                chunks=out_chunks,
                dtype=ms.dtype,
                meta=np.empty((0,) * 4, ms.dtype),
            )
        source_rows = -(-max(data.chunks[2]) // chunks[2])  # y chunks per source chunk
        data = data.rechunk(chunks)
        for band in _bands(data.shape, chunks, data.dtype.itemsize, source_rows=source_rows):
            region = (slice(t, t + 1), *band)
            da.store(data[band][None], array, regions=region, lock=False)  # type: ignore[arg-type]
        _remove_partial_chunks(ms.root / ms.paths[level], array, t)
        if level == 0:
            checkpoint("zarr.timepoint.partial")
    if track:
        _write_marker(ms, t)


def _remove_partial_chunks(array_dir: Path, array: zarr.Array, t: int) -> None:
    """Delete ``*.partial`` temporaries that a killed writer of timepoint ``t`` left behind.

    zarr's LocalStore writes each chunk to ``<key>.<uuid>.partial`` and renames it; a
    process killed in between leaves the temporary. Only this timepoint's chunk folder
    is scanned (nested chunk keys ``<t>/...`` or ``c/<t>/...``).
    """
    key = array.metadata.encode_chunk_key((t,) + (0,) * (array.ndim - 1))
    parts = key.split("/")
    if len(parts) < array.ndim:  # flat keys ("1.0.0.0.0"): no per-timepoint folder
        return
    t_dir = array_dir.joinpath(*parts[: len(parts) - (array.ndim - 1)])
    for dirpath, _, names in os.walk(t_dir):
        for name in names:
            if name.endswith(".partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive advisory lock (flock) on a directory, across processes on this host."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _to_czyx(data: np.ndarray, axes: Sequence[str]) -> np.ndarray:
    """Insert size-1 axes so that ``data`` with ``axes`` (no t) becomes ``(c, z, y, x)``."""
    present = [a for a in axes if a != "t"]
    for i, a in enumerate("czyx"):
        if a not in present:
            data = np.expand_dims(data, i)
    return data


def _read_t(ms: _Multiscale, t: int, level: int) -> np.ndarray:
    t = _check_t(ms, t)
    arr = ms.array(level)
    index = tuple(t if a == "t" else slice(None) for a in ms.axes)
    return _to_czyx(np.asarray(arr[index]), ms.axes)


def _validate_meta(meta: ImageMeta) -> np.dtype:
    shape = tuple(meta.shape_tczyx)
    if len(shape) != 5 or not all(isinstance(s, int | np.integer) and s >= 1 for s in shape):
        raise InputError(f"image shape must be 5 positive sizes (t,c,z,y,x), got {shape}")
    dtype = check_pixel_dtype(meta.dtype, where="image")
    names = tuple(meta.channel_names)
    if len(names) != shape[1]:
        raise InputError(f"{shape[1]} channel(s) but {len(names)} channel name(s): {list(names)}")
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise InputError(f"channel names must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        raise InputError(f"duplicate channel names: {list(names)}")
    fi = meta.frame_interval_s
    if fi is not None and not (math.isfinite(fi) and fi > 0):
        raise InputError(f"frame interval must be positive, got {fi} s")
    return dtype


def _differences(existing: ImageMeta, wanted: ImageMeta) -> list[str]:
    diffs = []
    if tuple(existing.shape_tczyx) != tuple(wanted.shape_tczyx):
        diffs.append(f"shape {existing.shape_tczyx} (wanted {tuple(wanted.shape_tczyx)})")
    if np.dtype(existing.dtype) != np.dtype(wanted.dtype):
        diffs.append(f"dtype {existing.dtype} (wanted {np.dtype(wanted.dtype).name})")
    if not np.allclose(
        existing.voxel_size.as_tuple(), wanted.voxel_size.as_tuple(), rtol=1e-6, atol=0
    ):
        diffs.append(
            f"voxel size {existing.voxel_size.as_tuple()} um (wanted {wanted.voxel_size.as_tuple()})"
        )
    if tuple(existing.channel_names) != tuple(wanted.channel_names):
        diffs.append(
            f"channels {list(existing.channel_names)} (wanted {list(wanted.channel_names)})"
        )
    a, b = existing.frame_interval_s, wanted.frame_interval_s
    if (a is None) != (b is None) or (
        a is not None and b is not None and not math.isclose(a, b, rel_tol=1e-6)
    ):
        diffs.append(f"frame interval {a} s (wanted {b})")
    return diffs


# --------------------------------------------------------------------------- public API


def create_image(
    path: str | os.PathLike[str],
    meta: ImageMeta,
    *,
    chunks_zyx: Sequence[int] | None = None,
    n_levels: int = 3,
    min_size_yx: int = DEFAULT_MIN_SIZE_YX,
    ngff_version: str = NGFF_VERSION,
    exist_ok: bool = True,
) -> None:
    """Create an empty OME-Zarr image (all levels, metadata), safely against concurrent creators.

    The container is built in a hidden temporary sibling directory and renamed into place,
    so other processes see either nothing or a complete container.

    Parameters
    ----------
    path : directory of the container, e.g. ``raw/exp1.ome.zarr``.
    meta : full-resolution shape ``(t, c, z, y, x)``, dtype, voxel size (um), channel
        names (one per channel, unique) and frame interval (s, or ``None`` if unknown).
    chunks_zyx : chunk size along ``(z, y, x)``; default ``(z, 256, 256)`` clipped to the
        image. Chunks are always 1 along ``t`` and ``c``.
    n_levels : maximum number of pyramid levels (level 0 = full resolution).
    min_size_yx : a level is added only if its y and x are both at least this size.
    ngff_version : ``"0.4"`` (zarr v2, default) or ``"0.5"`` (zarr v3).
    exist_ok : if the container exists: ``True`` accepts it when shape, dtype, voxel size,
        channel names and frame interval match (``InputError`` naming the difference
        otherwise); ``False`` raises ``InputError``.

    Raises
    ------
    InputError
        Invalid ``meta`` or settings, or an existing container that differs.
    """
    root = Path(path)
    dtype = _validate_meta(meta)
    if not isinstance(n_levels, int) or n_levels < 1:
        raise InputError(f"n_levels must be a positive integer, got {n_levels!r}")
    zarr_format = _zarr_format_of(ngff_version)
    shape = tuple(int(s) for s in meta.shape_tczyx)
    chunks = (
        (shape[2], DEFAULT_CHUNK_YX, DEFAULT_CHUNK_YX) if chunks_zyx is None else tuple(chunks_zyx)
    )
    if len(chunks) != 3 or not all(isinstance(c, int | np.integer) and c >= 1 for c in chunks):
        raise InputError(f"chunks_zyx must be 3 positive integers, got {chunks_zyx!r}")
    if root.exists():
        if not exist_ok:
            raise InputError(f"{root} already exists")
        _check_same_image(root, meta)
        return

    level_zyx = _level_shapes_zyx((shape[2], shape[3], shape[4]), n_levels, min_size_yx)
    vz, vy, vx = meta.voxel_size.as_tuple()
    t_scale = float(meta.frame_interval_s) if meta.frame_interval_s is not None else 1.0
    scales, translations = [], []
    for level in range(len(level_zyx)):
        f = 2.0**level
        scales.append([t_scale, 1.0, vz, vy * f, vx * f])
        # Block-mean voxel centres sit half a block in from the level-0 voxel centres.
        translations.append([0.0, 0.0, 0.0, (f - 1) / 2 * vy, (f - 1) / 2 * vx])
    omero = {
        "name": root.name,
        "channels": [
            {
                "label": name,
                "color": _CHANNEL_COLORS[i % len(_CHANNEL_COLORS)],
                "active": True,
                "coefficient": 1.0,
                "family": "linear",
                "inverted": False,
            }
            for i, name in enumerate(meta.channel_names)
        ],
        "rdefs": {"model": "color", "defaultT": 0, "defaultZ": shape[2] // 2},
    }
    with atomic_dir(root, exist_ok=True) as tmp:
        _build_multiscale(
            tmp,
            ngff_version=ngff_version,
            name=root.name,
            shapes=[(shape[0], shape[1], *zyx) for zyx in level_zyx],
            dtype=dtype,
            chunks_zyx=(int(chunks[0]), int(chunks[1]), int(chunks[2])),
            scales=scales,
            translations=translations,
            axes_meta=_axes_meta(meta.frame_interval_s),
            downscale_type="local_mean",
            extra_ome={"omero": omero},
            status_attrs={
                "layout_version": LAYOUT_VERSION,
                "writer": "cellrna-pipeline",
                "kind": "image",
                "zarr_format": zarr_format,
            },
        )
    # A concurrent creator may have won the rename with different settings.
    _check_same_image(root, meta)


def _check_same_image(root: Path, meta: ImageMeta) -> None:
    existing = _meta_from_multiscale(_read_multiscale(root))
    diffs = _differences(existing, meta)
    if diffs:
        raise InputError(f"{root} already exists with a different " + "; ".join(diffs))


def write_timepoint(path: str | os.PathLike[str], t: int, volume_czyx: np.ndarray) -> None:
    """Write one timepoint (all channels) at full resolution and every pyramid level.

    Only the chunk files of timepoint ``t`` are written. The timepoint is marked complete
    (see :func:`timepoints_written`) after its last chunk is stored; a rewrite first removes
    the mark, so an interrupted write never counts as done and a rerun overwrites it.

    Parameters
    ----------
    path : an image made by :func:`create_image`.
    t : timepoint index, ``0 <= t < n_timepoints``.
    volume_czyx : array ``(c, z, y, x)`` matching the image; any dtype that casts to the
        image dtype without changing values (see ``cast_safely``). NaN/inf are refused.
        A **dask array** is written block-wise: level 0 chunk by chunk as the dask
        scheduler in use computes it, then each coarser level from the stored finer one
        (blocks of ``factor x chunk``), so memory stays at a few chunks per worker
        whatever the volume size. Values are identical to an in-memory write.

    Raises
    ------
    InputError
        Missing image, wrong shape, unsafe cast, NaN/inf, ``t`` out of range.
    """
    ms = _read_multiscale(Path(path))
    _write_image_t(ms, t, volume_czyx)


def _is_dask(data: Any) -> bool:
    return hasattr(data, "dask") and hasattr(data, "chunks") and hasattr(data, "compute")


def _write_image_t(ms: _Multiscale, t: int, volume_czyx: Any) -> None:
    _require_tczyx(ms)
    t = _check_t(ms, t)
    if _is_dask(volume_czyx):
        want = ms.shapes[0][1:]
        if tuple(volume_czyx.shape) != want:
            raise InputError(
                f"{ms.root} t={t}: volume shape {tuple(volume_czyx.shape)}, expected (c,z,y,x) {want}"
            )
        _write_pyramid_timepoint_dask(ms, t, volume_czyx, labels=False)
        return
    data = np.asarray(volume_czyx)
    want = ms.shapes[0][1:]
    if data.shape != want:
        raise InputError(f"{ms.root} t={t}: volume shape {data.shape}, expected (c,z,y,x) {want}")
    data = cast_safely(data, ms.dtype, where=f"{ms.root} t={t}")
    _write_pyramid_timepoint(ms, t, data, labels=False)


def read_timepoint(path: str | os.PathLike[str], t: int, *, level: int = 0) -> np.ndarray:
    """Read one timepoint.

    Parameters
    ----------
    path : an OME-Zarr image (NGFF 0.4 or 0.5).
    t : timepoint index.
    level : pyramid level (0 = full resolution).

    Returns
    -------
    np.ndarray ``(c, z, y, x)`` of the image dtype (missing axes have size 1). Unwritten
    chunks read as 0.
    """
    return _read_t(_read_multiscale(Path(path)), t, level)


def read_image_meta(path: str | os.PathLike[str]) -> ImageMeta:
    """Metadata of an OME-Zarr image (NGFF 0.4 or 0.5).

    Returns
    -------
    ImageMeta with the level-0 shape as ``(t, c, z, y, x)`` (missing axes size 1), voxel
    size in um (from the level-0 scale and the axis units), channel names from ``omero``
    (``c0, c1, ...`` if absent), frame interval in s (if the t axis has a unit), and
    ``extra``: ``levels`` (dataset paths, from the metadata), ``ngff_version``, ``axes``,
    ``level_shapes_tczyx``, ``chunks`` (level 0), ``voxel_size_from_metadata``.
    """
    return _meta_from_multiscale(_read_multiscale(Path(path)))


def open_image(path: str | os.PathLike[str], *, level: int = 0) -> dask.array.Array:
    """Lazy ``(t, c, z, y, x)`` dask array of one pyramid level (chunks = zarr chunks)."""
    import dask.array as da

    ms = _read_multiscale(Path(path))
    arr = da.from_zarr(ms.array(level))
    for i, a in enumerate(AXES_TCZYX):
        if a not in ms.axes:
            arr = da.expand_dims(arr, i)
    return arr


def preview_level(path: str | os.PathLike[str], *, max_size_yx: int = 512) -> int:
    """The finest pyramid level whose y and x are both at most ``max_size_yx`` (else the
    coarsest): cheap to read whole for previews and summaries."""
    shapes: list[tuple[int, ...]] = list(read_image_meta(path).extra["level_shapes_tczyx"])  # type: ignore[call-overload]
    for level, shape in enumerate(shapes):
        if max(shape[3], shape[4]) <= max_size_yx:
            return level
    return len(shapes) - 1


def timepoint_stats(path: str | os.PathLike[str], t: int) -> dict[str, np.ndarray]:
    """Per-channel statistics of timepoint ``t`` at full resolution, read chunk by chunk.

    Returns
    -------
    dict of ``(c,)`` float64 arrays: ``mean``, ``std``, ``min``, ``max`` and, for integer
    images, ``saturated_fraction`` (share of voxels at the dtype's maximum). Memory stays
    at a few chunks whatever the volume size.
    """
    import dask.array as da

    ms = _read_multiscale(Path(path))
    t = _check_t(ms, t)
    lazy = open_image(path, level=0)[t].astype(np.float64)
    axes = (1, 2, 3)
    parts = [lazy.mean(axis=axes), lazy.std(axis=axes), lazy.min(axis=axes), lazy.max(axis=axes)]
    names = ["mean", "std", "min", "max"]
    if ms.dtype.kind in "ui":
        top = float(np.iinfo(ms.dtype).max)
        parts.append((lazy == top).mean(axis=axes))
        names.append("saturated_fraction")
    values = da.compute(*parts)
    return {n: np.asarray(v, dtype=np.float64) for n, v in zip(names, values, strict=True)}


def timepoints_written(path: str | os.PathLike[str], *, label: str | None = None) -> list[int]:
    """Timepoints whose every chunk (all levels) has been stored.

    Parameters
    ----------
    path : the image.
    label : a label image name to ask about that label image instead.

    Returns
    -------
    Sorted timepoint indices. For a container not written by this package (no
    ``.cellrna`` status group), every timepoint counts as written.
    """
    root = Path(path)
    ms = _read_multiscale(root / "labels" / label if label is not None else root)
    if not ms.has_status():
        return list(range(ms.n_timepoints))
    done = []
    for entry in os.scandir(ms.root / STATUS_GROUP):
        m = _MARKER_RE.match(entry.name)
        if m and entry.is_dir() and int(m.group(1)) < ms.n_timepoints:
            done.append(int(m.group(1)))
    return sorted(done)


def write_image(
    path: str | os.PathLike[str],
    data_tczyx: Any,
    meta: ImageMeta,
    *,
    chunks_zyx: Sequence[int] | None = None,
    n_levels: int = 3,
    min_size_yx: int = DEFAULT_MIN_SIZE_YX,
    ngff_version: str = NGFF_VERSION,
    exist_ok: bool = True,
) -> None:
    """Create the image (see :func:`create_image`) and write every timepoint.

    Parameters
    ----------
    data_tczyx : array (numpy or dask) of shape ``meta.shape_tczyx``; read one timepoint
        at a time.
    Other parameters as in :func:`create_image`.
    """
    shape = tuple(getattr(data_tczyx, "shape", ()))
    if shape != tuple(meta.shape_tczyx):
        raise InputError(f"data shape {shape} differs from meta shape {tuple(meta.shape_tczyx)}")
    create_image(
        path,
        meta,
        chunks_zyx=chunks_zyx,
        n_levels=n_levels,
        min_size_yx=min_size_yx,
        ngff_version=ngff_version,
        exist_ok=exist_ok,
    )
    ms = _read_multiscale(Path(path))
    for t in range(shape[0]):
        _write_image_t(ms, t, np.asarray(data_tczyx[t]))


# --------------------------------------------------------------------------- labels


def _check_label_name(name: str) -> None:
    if not isinstance(name, str) or not _LABEL_NAME_RE.match(name):
        raise InputError(
            f"invalid label name {name!r} (letters, digits, '_', '-', '.'; not starting with '.')"
        )


def _register_label(root: Path, name: str, zarr_format: ZarrFormat) -> None:
    """Add ``name`` to ``labels/`` metadata; a lock serialises the read-modify-write."""
    labels_dir = root / "labels"
    with _locked(root):
        group = zarr.open_group(store=LocalStore(labels_dir), mode="a", zarr_format=zarr_format)
        attrs: dict[str, Any] = dict(group.attrs.asdict())
        if zarr_format == 2:
            names = list(attrs.get("labels", []))
            if name not in names:
                group.attrs["labels"] = [*names, name]
        else:
            ome = dict(attrs.get("ome", {}))
            names = list(ome.get("labels", []))
            if name not in names:
                ome.update({"version": ome.get("version", "0.5"), "labels": [*names, name]})
                group.attrs["ome"] = ome


def create_labels(
    path: str | os.PathLike[str],
    name: str,
    *,
    n_channels: int = 1,
    dtype: str = "uint32",
    exist_ok: bool = True,
) -> None:
    """Create an empty label image ``labels/<name>`` of an image (race-safe, like the image).

    The label image has axes ``t, c, z, y, x``, the image's t, z, y, x sizes, scales and
    pyramid shapes, ``n_channels`` channels (e.g. one per RNA channel) and chunks
    ``(1, 1, z, y, x)`` like the image. Pyramid levels are stride-subsampled so label
    ids stay exact.

    Parameters
    ----------
    path : the parent image.
    name : label image name, e.g. ``"cells"``, ``"nuclei"``, ``"spots"``.
    n_channels : number of label channels.
    dtype : integer dtype of the ids.
    exist_ok : accept an existing label image with the same shape and dtype.

    Raises
    ------
    InputError
        No parent image, bad name or dtype, or an existing label image that differs.
    """
    root = Path(path)
    ms = _read_multiscale(root)
    _require_tczyx(ms)
    _check_label_name(name)
    dt = check_label_dtype(dtype, where=f"{root} labels {name!r}")
    if isinstance(n_channels, bool) or not isinstance(n_channels, int) or n_channels < 1:
        raise InputError(f"n_channels must be a positive integer, got {n_channels!r}")
    label_root = root / "labels" / name
    shapes = [(s[0], n_channels, *s[2:]) for s in ms.shapes]
    if label_root.exists():
        if not exist_ok:
            raise InputError(f"{label_root} already exists")
    else:
        chunks0 = ms.chunks[0]
        with atomic_dir(label_root, exist_ok=True) as tmp:
            _build_multiscale(
                tmp,
                ngff_version=ms.ngff_version,
                name=name,
                shapes=shapes,
                dtype=dt,
                chunks_zyx=(chunks0[2], chunks0[3], chunks0[4]),
                scales=ms.scales,
                translations=[[0.0] * 5 for _ in ms.scales],  # stride keeps voxel 0 in place
                axes_meta=[dict(a) for a in ms.axes_meta],
                downscale_type="nearest",
                extra_ome={"image-label": {"source": {"image": "../../"}}},
                status_attrs={
                    "layout_version": LAYOUT_VERSION,
                    "writer": "cellrna-pipeline",
                    "kind": "labels",
                    "zarr_format": ms.zarr_format,
                },
            )
    existing = _read_multiscale(label_root)
    if existing.shapes[0] != shapes[0] or existing.dtype != dt:
        raise InputError(
            f"{label_root} already exists with shape {existing.shapes[0]} {existing.dtype} "
            f"(wanted {shapes[0]} {dt})"
        )
    _register_label(root, name, ms.zarr_format)


def _label_multiscale(root: Path, name: str) -> _Multiscale:
    _check_label_name(name)
    label_root = root / "labels" / name
    if not label_root.exists():
        raise InputError(f"{root}: no label image {name!r}; create it with create_labels")
    return _read_multiscale(label_root)


def write_label_timepoint(
    path: str | os.PathLike[str], name: str, t: int, labels_czyx_or_zyx: np.ndarray
) -> None:
    """Write one timepoint of a label image (all pyramid levels), then mark it complete.

    Parameters
    ----------
    path : the parent image.
    name : the label image (made by :func:`create_labels`).
    t : timepoint index.
    labels_czyx_or_zyx : integer ids ``(c, z, y, x)``, or ``(z, y, x)`` for a one-channel
        label image; values must fit the label dtype (negative ids are refused for
        unsigned dtypes). A dask array is written block-wise (see
        :func:`write_timepoint`).
    """
    ms = _label_multiscale(Path(path), name)
    t = _check_t(ms, t)
    if _is_dask(labels_czyx_or_zyx):
        lazy = labels_czyx_or_zyx
        if lazy.ndim == 3 and ms.shapes[0][1] == 1:
            lazy = lazy[None]
        if tuple(lazy.shape) != ms.shapes[0][1:] or np.dtype(lazy.dtype).kind == "f":
            raise InputError(
                f"{ms.root} t={t}: labels {tuple(lazy.shape)} {lazy.dtype}, expected integer "
                f"(c,z,y,x) {ms.shapes[0][1:]}"
            )
        _write_pyramid_timepoint_dask(ms, t, lazy, labels=True)
        return
    data = np.asarray(labels_czyx_or_zyx)
    want = ms.shapes[0][1:]
    if data.ndim == 3 and want[0] == 1:
        data = data[np.newaxis]
    where = f"{ms.root} t={t}"
    if data.shape != want:
        raise InputError(f"{where}: labels shape {data.shape}, expected (c,z,y,x) {want}")
    if data.dtype.kind == "f":
        raise InputError(f"{where}: labels must be integers, got {data.dtype}")
    data = cast_safely(data, ms.dtype, where=where)
    _write_pyramid_timepoint(ms, t, data, labels=True)


def read_label_timepoint(
    path: str | os.PathLike[str], name: str, t: int, *, level: int = 0
) -> np.ndarray:
    """Read one timepoint of a label image as ``(c, z, y, x)`` integer ids (0 = background)."""
    return _read_t(_label_multiscale(Path(path), name), t, level)


def list_labels(path: str | os.PathLike[str]) -> list[str]:
    """Names of the label images listed in ``labels/`` metadata that exist on disk."""
    root = Path(path)
    _read_multiscale(root)  # validates the image
    labels_dir = root / "labels"
    if not labels_dir.is_dir():
        return []
    try:
        attrs, _ = _read_group_attrs(labels_dir)
    except InputError:
        return []  # a labels folder without group metadata yet (creation in progress)
    names = _ome_block(attrs)[0].get("labels", [])
    return [n for n in names if isinstance(n, str) and (labels_dir / n).is_dir()]
