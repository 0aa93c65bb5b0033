"""Slicing volumes into 2-D sections (for slice-wise models) and stacking them back."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from cellrna_pipeline.core.errors import InputError

__all__ = ["from_sections", "section_indices", "to_sections"]

Axis = Literal["z", "y", "x"]
_AXES = {"z": 0, "y": 1, "x": 2}


def section_indices(n: int, *, step: int = 1, start: int = 0) -> np.ndarray:
    """Indices ``start, start + step, ...`` below ``n``."""
    if step < 1 or start < 0:
        raise InputError(f"step must be >= 1 and start >= 0, got step={step}, start={start}")
    return np.arange(start, n, step)


def to_sections(
    volume: Any, *, axis: Axis = "z", step: int = 1, start: int = 0
) -> tuple[Any, np.ndarray]:
    """Cut a ``(z, y, x)`` or ``(c, z, y, x)`` volume into 2-D sections along ``axis``.

    Parameters
    ----------
    volume : numpy or dask array, ``(z, y, x)`` or ``(c, z, y, x)``.
    axis : ``"z"`` (xy sections, the usual case), ``"y"`` (xz) or ``"x"`` (yz).
    step, start : keep every ``step``-th section from ``start``.

    Returns
    -------
    sections : ``(n, a, b)`` or ``(n, c, a, b)``: section first, then the channel if
        any, then the two in-plane axes in their original order (``y, x`` for z
        sections, ``z, x`` for y sections, ``z, y`` for x sections).
    indices : ``(n,)`` int, the position of each section along ``axis``.
    """
    if axis not in _AXES:
        raise InputError(f"axis must be one of {sorted(_AXES)}, got {axis!r}")
    ndim = getattr(volume, "ndim", 0)
    if ndim not in (3, 4):
        raise InputError(f"need a (z, y, x) or (c, z, y, x) volume, got {ndim} dimensions")
    offset = ndim - 3
    ax = _AXES[axis] + offset
    idx = section_indices(int(volume.shape[ax]), step=step, start=start)
    taken = volume[(slice(None),) * ax + (idx,)]
    # move the section axis first: (c, n, a, b) or (n, a, b)
    order = [ax, *[i for i in range(ndim) if i != ax]]
    moved = taken.transpose(order)
    return moved, idx


def from_sections(
    sections: np.ndarray,
    indices: np.ndarray,
    shape: tuple[int, ...],
    *,
    axis: Axis = "z",
    fill_value: float = 0,
) -> np.ndarray:
    """Inverse of :func:`to_sections`: put 2-D results back into a volume of ``shape``.

    Sections not given (``step > 1``) are filled with ``fill_value``.
    """
    if axis not in _AXES:
        raise InputError(f"axis must be one of {sorted(_AXES)}, got {axis!r}")
    arr = np.asarray(sections)
    ndim = len(shape)
    if ndim not in (3, 4) or arr.ndim != ndim or len(indices) != arr.shape[0]:
        raise InputError(f"sections {arr.shape} do not fit volume shape {shape}")
    offset = ndim - 3
    ax = _AXES[axis] + offset
    order = [ax, *[i for i in range(ndim) if i != ax]]
    out = np.full(shape, fill_value, dtype=arr.dtype)
    moved = out.transpose(order)  # a view in section-first order
    moved[np.asarray(indices)] = arr
    return out
