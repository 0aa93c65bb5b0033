"""The :class:`Source` interface shared by the TIFF and OME-Zarr readers."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io._validate import check_finite, check_pixel_dtype
from cellrna_pipeline.core.types import ImageMeta, VoxelSize

NO_VOXEL_SIZE_HINT = "pass --voxel-size-nm Z Y X"


class Source(abc.ABC):
    """An acquisition opened for ingestion, read one timepoint at a time.

    Attributes
    ----------
    path : the file or directory.
    meta : shape ``(t, c, z, y, x)``, dtype, voxel size (um), channel names, frame interval
        (s); ``meta.extra["format"]`` names the format.

    Use as a context manager (or call :meth:`close`) to release the file.
    """

    path: Path
    meta: ImageMeta

    def read_timepoint(self, t: int) -> np.ndarray:
        """Read timepoint ``t`` as ``(c, z, y, x)`` of ``meta.dtype``, only that part of the file.

        Raises
        ------
        InputError
            ``t`` out of range, unreadable data, or NaN/inf in float data.
        """
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            raise InputError(f"{self.path}: timepoint must be an integer, got {t!r}")
        n_t = self.meta.n_timepoints
        if not 0 <= int(t) < n_t:
            raise InputError(f"{self.path}: timepoint {t} out of range 0..{n_t - 1}")
        data = self._read_timepoint(int(t))
        want = tuple(self.meta.shape_tczyx[1:])
        if data.shape != want:  # a reader bug rather than bad input
            raise RuntimeError(f"{self.path}: read {data.shape}, expected {want}")
        check_finite(data, where=f"{self.path} t={t}")
        return data

    @abc.abstractmethod
    def _read_timepoint(self, t: int) -> np.ndarray:
        """``(c, z, y, x)`` for a valid ``t``."""

    def channel_array(self, t: int = 0, c: int = 0) -> ChannelArray:
        """One channel of one timepoint as a lazy ``(z, y, x)`` array.

        Slicing it (``arr[z0:z1, y0:y1, x0:x1]``) reads only that region of the file; give
        it to ``dask.array.from_array`` (or any code that reads block by block) to process
        a volume larger than memory with the chunking of the consumer's choice.
        NaN/inf in float data raise :class:`InputError` when a region holding them is read.
        """
        t = self._check_t(t)
        n_c = self.meta.shape_tczyx[1]
        if isinstance(c, bool) or not isinstance(c, int | np.integer) or not 0 <= c < n_c:
            raise InputError(f"{self.path}: channel {c!r} out of range 0..{n_c - 1}")
        return ChannelArray(self, t, int(c))

    def _read_region(self, t: int, c: int, region_zyx: tuple[slice, slice, slice]) -> np.ndarray:
        """``(z, y, x)`` region of channel ``c`` at ``t``; the default reads the timepoint."""
        return self._read_timepoint(t)[c][region_zyx]

    def timepoint_dask(self, t: int, *, chunk_z: int | None = None) -> Any:
        """Timepoint ``t`` as a lazy dask array ``(c, z, y, x)`` of ``meta.dtype``.

        Nothing is read until the array is computed or stored; each chunk reads only its
        part of the file, so a timepoint larger than memory can be copied chunk by chunk.
        Chunks are ``(1, chunk_z, y, x)`` (whole planes, the way image files are laid
        out; default ``chunk_z``: all planes).

        The default reads the whole timepoint in one piece; the TIFF and OME-Zarr sources
        read by planes / chunks. Compute with the threaded scheduler for TIFF sources
        (an open file cannot be sent to other processes). NaN/inf in float data raise
        :class:`InputError` when the chunk holding them is computed.
        """
        import dask
        import dask.array as da

        self._check_t(t)
        shape = tuple(self.meta.shape_tczyx[1:])
        block = da.from_delayed(
            dask.delayed(self.read_timepoint)(int(t)), shape=shape, dtype=self.meta.dtype
        )
        return block if chunk_z is None else block.rechunk((1, int(chunk_z), *shape[2:]))

    def _check_t(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            raise InputError(f"{self.path}: timepoint must be an integer, got {t!r}")
        n_t = self.meta.n_timepoints
        if not 0 <= int(t) < n_t:
            raise InputError(f"{self.path}: timepoint {t} out of range 0..{n_t - 1}")
        return int(t)

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release open files."""

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"{type(self).__name__}({str(self.path)!r}, shape_tczyx={m.shape_tczyx}, "
            f"dtype={m.dtype}, voxel_size_um={m.voxel_size.as_tuple()})"
        )


class ChannelArray:
    """A lazy ``(z, y, x)`` view of one channel of a :class:`Source` (see
    :meth:`Source.channel_array`): ``shape``, ``dtype``, ``ndim`` and basic slicing."""

    def __init__(self, source: Source, t: int, c: int) -> None:
        self._source = source
        self._t, self._c = t, c
        self.shape: tuple[int, int, int] = tuple(source.meta.shape_tczyx[2:])  # type: ignore[assignment]
        self.dtype = np.dtype(source.meta.dtype)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or any(not isinstance(k, int | np.integer | slice) for k in key):
            raise TypeError(f"unsupported index {key!r}: integers and slices only")
        key = key + (slice(None),) * (3 - len(key))
        # Read the bounding slices (step 1), then apply steps and integer picks here.
        bounds: list[slice] = []
        rest: list[slice | int] = []
        for k, n in zip(key, self.shape, strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:
                    bounds.append(slice(0, n))
                    rest.append(k)
                else:
                    bounds.append(slice(start, max(start, stop)))
                    rest.append(slice(None, None, step))
            else:
                i = int(k) % n if -n <= int(k) < n else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for size {n}")
                bounds.append(slice(i, i + 1))
                rest.append(0)
        z, y, x = bounds
        region = self._source._read_region(self._t, self._c, (z, y, x))
        check_finite(region, where=f"{self._source.path} t={self._t}")
        return region[tuple(rest)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[:, :, :]
        return data if dtype is None else data.astype(dtype)


def build_meta(
    path: Path,
    *,
    shape_tczyx: tuple[int, int, int, int, int],
    dtype: np.dtype | str,
    metadata_voxel_size: VoxelSize | None,
    voxel_size: VoxelSize | None,
    metadata_channel_names: Sequence[str] | None,
    channel_names: Sequence[str] | None,
    frame_interval_s: float | None,
    extra: dict[str, Any],
    voxel_size_required: bool = True,
) -> ImageMeta:
    """Combine what a file says with what the user gave (the user wins) and validate.

    ``voxel_size_required=False`` accepts a file without any voxel size: the meta then
    holds a 1 um placeholder and ``extra["voxel_size_known"]`` is false.

    Raises
    ------
    InputError
        Unsupported dtype, no voxel size anywhere (when required), bad channel names.
    """
    dt = check_pixel_dtype(dtype, where=str(path))
    if voxel_size is not None and not isinstance(voxel_size, VoxelSize):
        raise InputError(f"voxel_size must be a VoxelSize, got {voxel_size!r}")
    voxel = voxel_size if voxel_size is not None else metadata_voxel_size
    known = voxel is not None
    if voxel is None:
        if voxel_size_required:
            raise InputError(
                f"{path} has no physical voxel size in its metadata; {NO_VOXEL_SIZE_HINT}"
            )
        voxel = VoxelSize(1.0, 1.0, 1.0)
    n_c = shape_tczyx[1]
    if channel_names is not None:
        names = (channel_names,) if isinstance(channel_names, str) else tuple(channel_names)
        check_channel_names(names, n_c, where=str(path))
    else:
        names = tuple(f"c{i}" for i in range(n_c))
        if metadata_channel_names is not None:
            candidate = tuple(str(n) for n in metadata_channel_names)
            try:
                check_channel_names(candidate, n_c, where=str(path))
            except InputError:
                extra = {**extra, "metadata_channel_names": list(candidate)}
            else:
                names = candidate
    return ImageMeta(
        shape_tczyx=shape_tczyx,
        dtype=dt.name,
        voxel_size=voxel,
        channel_names=names,
        frame_interval_s=frame_interval_s,
        extra={
            **extra,
            "voxel_size_from_metadata": voxel_size is None and known,
            "voxel_size_known": known,
        },
    )


def check_channel_names(names: Sequence[str], n_channels: int, *, where: str) -> None:
    """:class:`InputError` unless ``names`` are ``n_channels`` unique non-empty strings."""
    if len(names) != n_channels:
        raise InputError(
            f"{where}: {n_channels} channel(s) but {len(names)} channel name(s) given: {list(names)}"
        )
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise InputError(f"{where}: missing (empty) channel name in {list(names)}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if list(names).count(n) > 1})
        raise InputError(f"{where}: duplicate channel name(s) {dupes}")
