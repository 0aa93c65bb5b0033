"""TIFF ingestion: OME-TIFF, ImageJ hyperstacks and plain TIFF, read lazily per timepoint.

Axes come from the file (OME series, ImageJ hyperstack, or tifffile's ``shaped``
metadata); a plain TIFF without axis names is read as ``YX`` or ``ZYX`` (one extra axis),
or as channels for RGB; anything else is ambiguous and refused. Voxel sizes come from
the OME-XML ``PhysicalSize*`` (nm/um/mm converted to um) or the ImageJ
``spacing``/resolution (when the unit is a length); a plain TIFF needs them given.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io._base import Source, build_meta
from cellrna_pipeline.core.io._validate import check_finite, one_line
from cellrna_pipeline.core.io.units import length_to_um, time_to_s
from cellrna_pipeline.core.types import VoxelSize

__all__ = ["TiffSource", "open_tiff"]

_CANONICAL = "TCZYX"
# tifffile logs (instead of raising) when it skips a broken IFD or tag; those mean a
# truncated or corrupt file, which we refuse rather than ingest half of.
_CORRUPT_LOG = re.compile(r"invalid|corrupt|truncat|raised|beyond|EOF", re.IGNORECASE)


class _LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors(path: Path) -> Iterator[None]:
    """Turn tifffile's exceptions and 'skipped broken structure' log records into InputError."""
    log = logging.getLogger("tifffile")
    handler = _LogCollector()
    log.addHandler(handler)
    previous = log.propagate
    log.propagate = False  # collected here; re-raised below as one clear error
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: corrupt or unreadable TIFF ({one_line(exc)})") from exc
    finally:
        log.removeHandler(handler)
        log.propagate = previous
    bad = [m for m in handler.messages if _CORRUPT_LOG.search(m)]
    if bad:
        first = bad[0].strip().splitlines()[0] if bad[0].strip() else "broken structure"
        raise InputError(f"{path}: corrupt or truncated TIFF ({first})")


@dataclass(frozen=True)
class _AxisPlan:
    """How to turn the series array into ``(c, z, y, x)`` for one timepoint."""

    series_axes: str  # as tifffile names them, one letter per series dim
    canonical: str  # same length: T C Z Y X for kept axes, "-" for dropped size-1 axes

    def index_for(self, t: int) -> tuple[Any, ...]:
        return tuple(t if c == "T" else (0 if c == "-" else slice(None)) for c in self.canonical)

    def to_czyx(self, data: np.ndarray) -> np.ndarray:
        kept = [c for c in self.canonical if c not in "T-"]
        order = [kept.index(c) for c in "CZYX" if c in kept]
        data = np.transpose(data, order)
        for i, c in enumerate("CZYX"):
            if c not in kept:
                data = np.expand_dims(data, i)
        return data


def _plan_axes(
    path: Path, axes: str, shape: Sequence[int], *, trusted: bool, rgb: bool
) -> _AxisPlan:
    """Map tifffile series axes to canonical letters; refuse what cannot be told apart.

    ``trusted``: the axis letters come from OME/ImageJ/explicit metadata.
    ``rgb``: the pages are RGB(A), so an ``S`` (samples) axis holds colour channels.
    """
    axes = axes.upper()
    if len(shape) < 2 or not (axes.endswith("YX") or axes.endswith("YXS")):
        raise InputError(
            f"{path}: needs at least 2 dimensions (y, x), has axes {axes or '?'} {tuple(shape)}"
        )
    canonical = list(axes)
    sizes = dict(zip(range(len(axes)), shape, strict=True))
    # Samples: colour channels for RGB, otherwise an unnamed extra axis.
    for i, a in enumerate(axes):
        if a == "S":
            if sizes[i] == 1:
                canonical[i] = "-"
            elif rgb or trusted:
                canonical[i] = "C"
            else:
                canonical[i] = "?"
    if "C" in axes and canonical.count("C") > 1:
        # A real C axis plus RGB samples: only fine if one of them is a singleton.
        ci = [i for i, c in enumerate(canonical) if c == "C"]
        singles = [i for i in ci if sizes[i] == 1]
        if len(ci) - len(singles) > 1:
            raise InputError(
                f"{path}: RGB samples and several channels at once are not supported ({axes} {tuple(shape)})"
            )
        for i in singles[: len(ci) - 1]:
            canonical[i] = "-"
    for i, a in enumerate(canonical):
        if a not in _CANONICAL and a not in "-?":
            canonical[i] = "-" if sizes[i] == 1 else "?"
    unknown = [i for i, a in enumerate(canonical) if a == "?"]
    if unknown:
        if trusted:
            bad = "".join(axes[i] for i in unknown)
            raise InputError(f"{path}: unsupported axis {bad!r} in {axes} {tuple(shape)}")
        # Plain TIFF: one unnamed axis besides y/x is z; more would be a guess.
        if len(unknown) == 1 and "Z" not in canonical:
            canonical[unknown[0]] = "Z"
        else:
            raise InputError(
                f"{path}: ambiguous axes {axes} {tuple(shape)}; save it as OME-TIFF or an "
                "ImageJ hyperstack (or a TIFF with axes metadata)"
            )
    kept = [a for a in canonical if a != "-"]
    if len(kept) != len(set(kept)):
        raise InputError(f"{path}: repeated axes in {axes} {tuple(shape)}")
    return _AxisPlan(series_axes=axes, canonical="".join(canonical))


def _shape_tczyx(plan: _AxisPlan, shape: Sequence[int]) -> tuple[int, int, int, int, int]:
    sizes = {c: int(s) for c, s in zip(plan.canonical, shape, strict=True) if c != "-"}
    t, c, z, y, x = (sizes.get(a, 1) for a in _CANONICAL)
    return (t, c, z, y, x)


def _ome_metadata(
    path: Path, xml: str, size_z: int
) -> tuple[VoxelSize | None, list[str] | None, float | None]:
    """Voxel size (um), channel names and frame interval (s) of the first OME Image."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InputError(f"{path}: corrupt OME-XML ({one_line(exc)})") from exc
    pixels = root.find("{*}Image/{*}Pixels")
    if pixels is None:
        return None, None, None
    names = [ch.get("Name") or "" for ch in pixels.findall("{*}Channel")]
    channel_names = names if names else None

    def size(axis: str) -> float | None:
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        unit = pixels.get(f"PhysicalSize{axis}Unit")
        return length_to_um(float(value), unit, what=f"PhysicalSize{axis}")

    frame_interval = None
    try:
        sx, sy, sz = size("X"), size("Y"), size("Z")
        increment = pixels.get("TimeIncrement")
        if increment is not None and float(increment) > 0:
            frame_interval = time_to_s(float(increment), pixels.get("TimeIncrementUnit"))
        voxel = None
        if sx is not None:
            sy = sx if sy is None else sy
            if sz is None and size_z == 1:
                sz = 1.0  # a single plane has no z spacing; placeholder
            if sz is not None:
                voxel = VoxelSize(sz, sy, sx)
    except (InputError, ValueError) as exc:
        raise InputError(f"{path}: bad OME-XML physical size ({exc})") from exc
    return voxel, channel_names, frame_interval


def _imagej_metadata(
    path: Path, ij: dict[str, Any], page: Any, size_z: int
) -> tuple[VoxelSize | None, float | None]:
    """Voxel size from ImageJ ``unit``/``spacing`` and the X/YResolution tags."""
    frame_interval = None
    finterval = ij.get("finterval")
    try:
        if finterval is not None and float(finterval) > 0:
            frame_interval = time_to_s(float(finterval), ij.get("tunit") or "s")
    except (InputError, ValueError):
        frame_interval = None
    unit = str(ij.get("unit") or "").strip()
    if not unit or unit.lower() in ("pixel", "pixels", "inch"):
        return None, frame_interval

    def pixel_size(tag: str) -> float | None:
        t = page.tags.get(tag)
        if t is None:
            return None
        num, den = t.value
        return den / num if num else None

    try:
        px, py = pixel_size("XResolution"), pixel_size("YResolution")
        if px is None:
            return None, frame_interval
        py = px if py is None else py
        spacing = ij.get("spacing")
        if spacing is None:
            if size_z > 1:
                return None, frame_interval
            sz = 1.0  # single plane: placeholder, in um already
        else:
            sz = length_to_um(float(spacing), unit, what="ImageJ spacing")
        voxel = VoxelSize(sz, length_to_um(py, unit), length_to_um(px, unit))
    except InputError as exc:
        raise InputError(f"{path}: bad ImageJ calibration ({exc})") from exc
    return voxel, frame_interval


def _check_extent(path: Path, tif: Any, series: Any) -> None:
    """Refuse a series whose image data reaches past the end of the file (truncated)."""
    size = os.path.getsize(path)
    if series.dataoffset is not None:
        if series.dataoffset + series.nbytes > size:
            raise InputError(f"{path}: truncated TIFF (data ends past the end of the file)")
        return
    for page in series.pages:
        if page is None or page.parent is not tif:
            continue  # a page from another file of a multi-file OME-TIFF
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n]
        if ends and max(ends) > size:
            raise InputError(f"{path}: truncated TIFF (data ends past the end of the file)")


class _ContiguousReader:
    """Array-like over uncompressed pixel data stored as one contiguous block of the file.

    Each ``__getitem__`` reads only the rows it needs, one ``os.pread`` per plane (the
    requested rows at full width), so memory holds the requested region and never the
    file. No memory map: pages of a mapping that has been read stay in the process's
    resident set until it is unmapped, so mapping a 2 GiB file and reading it chunk by
    chunk would count 2 GiB.
    """

    def __init__(self, path: Path, offset: int, shape: Sequence[int], dtype: np.dtype) -> None:
        self._path = path
        self._offset = int(offset)
        self.shape = tuple(int(n) for n in shape)
        self.ndim = len(self.shape)
        self._file_dtype = dtype  # byte order of the file
        self.dtype = dtype.newbyteorder("=")
        self._fd: int | None = os.open(path, os.O_RDONLY)

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._fd is None:
            raise ValueError(f"{self._path} is closed")
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim or any(not isinstance(k, int | np.integer | slice) for k in key):
            raise TypeError(f"unsupported index {key!r}: integers and slices only")
        key = key + (slice(None),) * (self.ndim - len(key))
        picks = [
            np.arange(*k.indices(n)) if isinstance(k, slice) else np.array([int(k) % n])
            for k, n in zip(key, self.shape, strict=True)
        ]
        out_shape = [len(ix) for ix in picks]
        out = np.empty(out_shape, dtype=self.dtype)
        if 0 in out_shape:
            return out[tuple(0 if isinstance(k, int | np.integer) else slice(None) for k in key)]
        n_y, n_x = self.shape[-2:]
        ys = picks[-2]
        y0, y1 = int(ys.min()), int(ys.max()) + 1
        row_bytes = n_x * self._file_dtype.itemsize
        x_key = key[-1] if isinstance(key[-1], slice) else picks[-1]
        lead = self.shape[:-2]
        for pos in np.ndindex(*out_shape[:-2]):
            plane = (
                int(
                    np.ravel_multi_index(
                        [ix[i] for ix, i in zip(picks[:-2], pos, strict=True)], lead
                    )
                )
                if lead
                else 0
            )
            want = (y1 - y0) * row_bytes
            buf = os.pread(self._fd, want, self._offset + (plane * n_y + y0) * row_bytes)
            if len(buf) != want:
                raise InputError(
                    f"{self._path}: truncated TIFF (data ends past the end of the file)"
                )
            rows = np.frombuffer(buf, dtype=self._file_dtype).reshape(y1 - y0, n_x)
            out[pos] = rows[ys - y0][:, x_key]
        return out[tuple(0 if isinstance(k, int | np.integer) else slice(None) for k in key)]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _CheckedReader:
    """Array-like that turns read errors into InputError and refuses NaN/inf."""

    def __init__(self, array: Any, path: Path, where: str | None = None) -> None:
        self._array = array
        self._path = path
        self._where = where or str(path)
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def read(self, key: Any) -> np.ndarray:
        """``array[key]`` with read errors as InputError (no NaN check)."""
        with _tifffile_errors(self._path):
            return np.asarray(self._array[key])

    def __getitem__(self, key: Any) -> np.ndarray:
        data = self.read(key)
        check_finite(data, where=self._where)
        return data


class TiffSource(Source):
    """A TIFF file read lazily: every read decodes only the pages (or, for uncompressed
    contiguous data, the rows) it needs.

    Create it with :func:`open_tiff` (or :func:`~cellrna_pipeline.core.io.open_source`).
    """

    def __init__(self, path: Path, tif: Any, series: Any, plan: _AxisPlan, meta: Any) -> None:
        self.path = path
        self.meta = meta
        self._tif = tif
        self._series = series
        self._plan = plan
        self._reader: _CheckedReader | None = None
        self._contiguous: _ContiguousReader | None = None

    def _series_array(self) -> _CheckedReader:
        """The whole series as a lazy array: rows read directly where the data is one
        uncompressed block in this file, else tifffile's zarr store (pages/tiles)."""
        if self._reader is None:
            with _tifffile_errors(self.path):
                series, tif = self._series, self._tif
                offset = series.dataoffset
                if offset is not None and all(
                    getattr(page, "parent", None) is tif for page in series.pages
                ):
                    dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
                    self._contiguous = _ContiguousReader(self.path, offset, series.shape, dtype)
                    array: Any = self._contiguous
                else:
                    import zarr

                    array = zarr.open(series.aszarr(level=0), mode="r")
            self._reader = _CheckedReader(array, self.path)
        return self._reader

    def _read_timepoint(self, t: int) -> np.ndarray:
        # NaN/inf are checked by the caller, which names the timepoint.
        return self._plan.to_czyx(self._series_array().read(self._plan.index_for(t)))

    def _read_region(self, t: int, c: int, region_zyx: tuple[slice, slice, slice]) -> np.ndarray:
        key: list[int | slice] = []
        spatial = dict(zip("ZYX", region_zyx, strict=True))
        for letter in self._plan.canonical:
            if letter == "T":
                key.append(t)
            elif letter == "C":
                key.append(c)
            elif letter == "-":
                key.append(0)
            else:
                key.append(spatial[letter])
        data = self._series_array().read(tuple(key))  # kept axes: z, y, x in file order
        if "Z" not in self._plan.canonical:
            data = data[np.newaxis][region_zyx[0]]
        return data

    def timepoint_dask(self, t: int, *, chunk_z: int | None = None) -> Any:
        """Lazy ``(c, z, y, x)`` dask array of timepoint ``t``; chunks read whole planes.

        Each chunk reads only its own planes (rows of an uncompressed file, else the
        pages/tiles through tifffile's zarr store), never the whole file and never through
        a memory map, so the memory of a copy is bounded by ``chunk_z`` planes per worker
        thread. Use the threaded (or synchronous) scheduler: the open file cannot be
        pickled to other processes.
        """
        import dask.array as da

        t = self._check_t(t)
        array = _CheckedReader(self._series_array()._array, self.path, f"{self.path} t={t}")
        shape = array.shape
        nz = self.meta.shape_tczyx[2]
        cz = nz if chunk_z is None else max(1, min(int(chunk_z), nz))
        chunks = tuple(
            1 if c in "T-" else (cz if c == "Z" else (1 if c == "C" else int(n)))
            for c, n in zip(self._plan.canonical, shape, strict=True)
        )
        lazy = da.from_array(
            array, chunks=chunks, asarray=True, meta=np.empty((0,) * len(shape), array.dtype)
        )
        return self._plan.to_czyx(lazy[self._plan.index_for(t)])

    def close(self) -> None:
        self._reader = None
        if self._contiguous is not None:
            self._contiguous.close()
            self._contiguous = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None


def open_tiff(
    path: str | os.PathLike[str],
    *,
    voxel_size: VoxelSize | None = None,
    channel_names: Sequence[str] | None = None,
    voxel_size_required: bool = True,
) -> TiffSource:
    """Open an OME-TIFF, ImageJ hyperstack or plain TIFF for lazy reading.

    Parameters
    ----------
    path : the file.
    voxel_size : overrides the file's voxel size (um); required if the file has none.
    channel_names : overrides the file's channel names (one per channel, unique).
    voxel_size_required : as in :func:`~cellrna_pipeline.core.io.open_source`.

    Returns
    -------
    TiffSource with ``meta.extra``: ``format`` (``"ome-tiff"``, ``"imagej-tiff"`` or
    ``"tiff"``), ``axes`` (as in the file), ``series`` (0).

    Raises
    ------
    InputError
        Missing/empty/corrupt/truncated file, unsupported dtype or axes, wrong number of
        dimensions, no voxel size, bad channel names.
    """
    import tifffile

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file")
    tif = None
    try:
        with _tifffile_errors(p):
            tif = tifffile.TiffFile(p)
            n_pages = len(tif.pages)  # walks the whole IFD chain: finds truncated chains
            if n_pages == 0 or not tif.series:
                raise InputError(f"{p}: corrupt or unreadable TIFF (no image in it)")
            series = tif.series[0]
            shape = tuple(int(s) for s in series.shape)
            axes = str(series.axes)
            kind = "ome" if tif.is_ome else ("imagej" if tif.is_imagej else "tiff")
            shaped_axes = bool(tif.is_shaped and (tif.shaped_metadata or [{}])[0].get("axes"))
            trusted = (
                kind in ("ome", "imagej")
                or shaped_axes
                or series.kind not in ("shaped", "generic", "uniform")
            )
            page0 = series.keyframe
            rgb = int(getattr(page0, "photometric", 1)) == 2
            _check_extent(p, tif, series)
            dtype = np.dtype(series.dtype)
        n_real = sum(1 for s in shape if s > 1)
        if len(shape) < 2:
            raise InputError(
                f"{p}: {len(shape)}-D image, expected 2-D (y, x) to 5-D (t, c, z, y, x)"
            )
        if n_real > 5:
            raise InputError(
                f"{p}: {n_real}-D image {shape} ({axes}), expected at most 5 dimensions"
            )
        plan = _plan_axes(p, axes, shape, trusted=trusted, rgb=rgb)
        shape_tczyx = _shape_tczyx(plan, shape)
        metadata_voxel, metadata_names, frame_interval = None, None, None
        if kind == "ome":
            metadata_voxel, metadata_names, frame_interval = _ome_metadata(
                p, tif.ome_metadata or "", shape_tczyx[2]
            )
        elif kind == "imagej":
            metadata_voxel, frame_interval = _imagej_metadata(
                p, tif.imagej_metadata or {}, page0, shape_tczyx[2]
            )
        meta = build_meta(
            p,
            shape_tczyx=shape_tczyx,
            dtype=dtype,
            metadata_voxel_size=metadata_voxel,
            voxel_size=voxel_size,
            metadata_channel_names=metadata_names,
            channel_names=channel_names,
            frame_interval_s=frame_interval
            if frame_interval and math.isfinite(frame_interval)
            else None,
            extra={
                "format": {"ome": "ome-tiff", "imagej": "imagej-tiff"}.get(kind, "tiff"),
                "axes": axes,
                "series": 0,
            },
            voxel_size_required=voxel_size_required,
        )
        return TiffSource(p, tif, series, plan, meta)
    except BaseException:
        if tif is not None:
            tif.close()
        raise
