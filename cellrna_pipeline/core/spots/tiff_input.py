"""Open a single-channel 2-D/3-D TIFF lazily (memory map, else tifffile's chunked zarr store).

Used by ``cellrna spots detect``: the detector reads the array chunk by chunk, so a TIFF
larger than memory is never loaded whole.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellrna_pipeline.core.errors import InputError

__all__ = ["open_single_channel_tiff"]

_SPATIAL = set("ZYXQI")  # tifffile: Q/I = unnamed axes


@contextlib.contextmanager
def open_single_channel_tiff(path: Path) -> Iterator[Any]:
    """Yield a lazy ``(z, y, x)`` or ``(y, x)`` array of the TIFF's first series.

    Singleton axes are dropped. A memory map is used when the pixel data is one
    uncompressed contiguous block; otherwise a dask array over tifffile's zarr store
    (tiles/strips read on demand). The file stays open until the block exits.

    Raises
    ------
    InputError
        Missing, empty or corrupt file; more than one channel, time point or sample;
        fewer than 2 or more than 3 spatial dimensions; a non-numeric dtype.
    """
    import tifffile

    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a TIFF file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    log = logging.getLogger("tifffile")
    previous = log.level
    log.setLevel(logging.ERROR)
    try:
        try:
            tf = tifffile.TiffFile(path)
        except Exception as exc:
            raise InputError(f"{path}: not a readable TIFF ({_one_line(exc)})") from None
        with tf:
            if not tf.series:
                raise InputError(f"{path}: TIFF holds no image")
            series = tf.series[0]
            shape, axes = tuple(series.shape), series.axes.upper()
            dtype = np.dtype(series.dtype)
            if dtype.kind not in "uif":
                raise InputError(
                    f"{path}: pixel type {dtype} is not supported (integers or floats)"
                )
            kept = [i for i, s in enumerate(shape) if s != 1]
            spatial = set(_SPATIAL)
            page: Any = tf.pages[0]
            if getattr(page, "photometric", None) != tifffile.PHOTOMETRIC.RGB:
                spatial.add("S")  # samples of a non-RGB page: an unnamed axis, not colour
            extra = [axes[i] for i in kept if axes[i] not in spatial]
            if extra:
                raise InputError(
                    f"{path}: expected one channel (z, y, x) or (y, x), got axes {axes} "
                    f"{shape}; split the {'/'.join(extra)} axis first"
                )
            if len(kept) not in (2, 3):
                raise InputError(
                    f"{path}: expected a 2-D (y, x) or 3-D (z, y, x) image, got shape {shape}"
                )
            squeeze = tuple(0 if s == 1 else slice(None) for s in shape)
            try:
                arr: Any = tifffile.memmap(path, mode="r", series=0)[squeeze]
            except Exception:
                import dask.array as da
                import zarr

                try:
                    store = tf.aszarr(series=0)
                    node: Any = zarr.open(store, mode="r")
                    if hasattr(node, "keys"):  # a pyramid group: level 0
                        node = node["0"]
                    arr = da.from_zarr(node)[squeeze]
                except Exception as exc:
                    raise InputError(f"{path}: cannot read pixel data ({_one_line(exc)})") from None
            yield arr
    finally:
        log.setLevel(previous)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
