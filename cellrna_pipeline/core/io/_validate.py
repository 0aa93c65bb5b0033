"""Checks shared by the readers and writers: supported dtypes, finite values, safe casts."""

from __future__ import annotations

import numpy as np

from cellrna_pipeline.core.errors import InputError

# Kinds of pixel data we store: unsigned/signed integers and floats. Not bool (ambiguous
# as an image), complex, object, strings or structured records.
_PIXEL_KINDS = frozenset("uif")


def one_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``, for wrapping library errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def check_pixel_dtype(dtype: np.dtype | str, *, where: str) -> np.dtype:
    """Return ``np.dtype(dtype)`` if it is a supported pixel type, else :class:`InputError`."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise InputError(f"{where}: unknown dtype {dtype!r}") from exc
    if dt.kind not in _PIXEL_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise InputError(
            f"{where}: unsupported dtype {dt} (expected unsigned/signed integers or floats)"
        )
    return dt


def check_label_dtype(dtype: np.dtype | str, *, where: str) -> np.dtype:
    """Return ``np.dtype(dtype)`` if it is an integer type, else :class:`InputError`."""
    dt = check_pixel_dtype(dtype, where=where)
    if dt.kind not in "ui":
        raise InputError(f"{where}: label images need an integer dtype, got {dt}")
    return dt


def check_finite(data: np.ndarray, *, where: str) -> None:
    """:class:`InputError` if a float array holds NaN or infinity."""
    if data.dtype.kind == "f" and not bool(np.isfinite(data).all()):
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"{where}: {n_bad} NaN or infinite value(s)")


def cast_safely(data: np.ndarray, dtype: np.dtype | str, *, where: str) -> np.ndarray:
    """Cast ``data`` to ``dtype`` if no value changes meaning, else :class:`InputError`.

    Allowed: any numpy "safe" cast; integers into a narrower integer type when every value
    fits; floats into an integer type when every value is integral and fits; floats into a
    narrower float type when every value fits (precision may drop). NaN/inf are always an
    error, and so are complex, object and string inputs.

    Parameters
    ----------
    data : array of any shape.
    dtype : target dtype.
    where : names the array in error messages (e.g. the file and timepoint).

    Returns
    -------
    np.ndarray of ``dtype``, same shape (``data`` itself when no cast is needed).
    """
    target = np.dtype(dtype)
    data = np.asarray(data)
    src = data.dtype
    if src.kind not in "buif":
        raise InputError(f"{where}: unsupported dtype {src}")
    check_finite(data, where=where)
    if src == target:
        return data
    if np.can_cast(src, target, casting="safe") or data.size == 0:
        return data.astype(target)
    if target.kind in "ui":
        info = np.iinfo(target)
        if src.kind == "f" and not bool((np.rint(data) == data).all()):
            raise InputError(f"{where}: non-integer values cannot be stored as {target}")
        lo, hi = data.min(), data.max()
        if lo < info.min or hi > info.max:
            raise InputError(
                f"{where}: values {lo}..{hi} do not fit {target} ({info.min}..{info.max})"
            )
        return data.astype(target)
    if target.kind == "f":
        finfo = np.finfo(target)
        if src.kind == "f" and float(np.abs(data).max()) > float(finfo.max):
            raise InputError(f"{where}: values too large for {target}")
        return data.astype(target)
    raise InputError(f"{where}: cannot store {src} as {target}")
