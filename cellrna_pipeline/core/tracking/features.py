"""Per-object measurements that the tracker's costs use: position, volume, shape, intensity.

All positions and lengths are physical (micrometres, ``zyx`` order) so that anisotropic
voxels are handled once, here. A 2D frame is a ``(1, y, x)`` volume.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.types import VoxelSize

__all__ = ["DETECTION_SCHEMA", "detections_from_labels", "measure_objects"]

DETECTION_SCHEMA: dict[str, type[pl.DataType] | pl.DataType] = {
    "t": pl.Int32,
    "label": pl.UInt32,
    "z": pl.Float64,
    "y": pl.Float64,
    "x": pl.Float64,
    "z_um": pl.Float64,
    "y_um": pl.Float64,
    "x_um": pl.Float64,
    "volume_um3": pl.Float64,
    "equivalent_diameter_um": pl.Float64,
    "extent_major_um": pl.Float64,
    "extent_mid_um": pl.Float64,
    "extent_minor_um": pl.Float64,
    "mean_intensity": pl.Float64,
    "touches_border": pl.Boolean,
}
"""Columns of a detections table made from label images (one row per object and frame).

``z, y, x``: centroid in voxels; ``*_um``: the same in micrometres; ``volume_um3``: voxel
count times voxel volume (for a 2D frame: area times the z voxel size);
``equivalent_diameter_um``: diameter of the sphere (3D) or disc (2D) of that volume/area;
``extent_*_um``: 4 x the standard deviation of the object's voxels along its principal
axes, sorted (the full axis length of a filled ellipse); ``mean_intensity``: NaN without
an intensity image; ``touches_border``: the object reaches an image face (y/x faces, and
z faces of a stack).
"""


def _as_zyx(array: np.ndarray, *, what: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[np.newaxis]
    if a.ndim != 3:
        raise InputError(f"{what} must be 2D (y, x) or 3D (z, y, x), got shape {a.shape}")
    return a


def measure_objects(
    labels: np.ndarray,
    *,
    voxel_size: VoxelSize,
    intensity: np.ndarray | None = None,
    t: int = 0,
) -> pl.DataFrame:
    """Measure every labelled object of one frame.

    Parameters
    ----------
    labels : integer array ``(z, y, x)`` or ``(y, x)``; 0 is background, each other id one
        object.
    voxel_size : physical voxel size (um); only y and x matter for a 2D frame.
    intensity : optional image of the same shape (any real dtype) for ``mean_intensity``.
    t : frame index written into the ``t`` column.

    Returns
    -------
    polars.DataFrame with :data:`DETECTION_SCHEMA`, one row per label, sorted by label.

    Raises
    ------
    InputError
        Wrong dimensions, a non-integer or negative label image, a shape mismatch, or
        NaN/inf in the intensity image.
    """
    lab = _as_zyx(labels, what="labels")
    if lab.dtype.kind not in "ui":
        raise InputError(f"labels must be an integer array, got {lab.dtype}")
    if lab.dtype.kind == "i" and lab.size and int(lab.min()) < 0:
        raise InputError("labels must be >= 0 (0 = background)")
    img = None
    if intensity is not None:
        img = _as_zyx(intensity, what="intensity")
        if img.shape != lab.shape:
            raise InputError(f"intensity shape {img.shape} differs from labels shape {lab.shape}")
        if img.dtype.kind not in "uif":
            raise InputError(f"intensity must be a real-valued image, got {img.dtype}")
        if img.dtype.kind == "f" and not bool(np.isfinite(img).all()):
            raise InputError("intensity image holds NaN or infinite values")

    fg = np.flatnonzero(lab)
    ids, inverse = np.unique(lab.ravel()[fg], return_inverse=True)
    n = len(ids)
    if n == 0:
        return pl.DataFrame(schema=DETECTION_SCHEMA)
    zz, yy, xx = np.unravel_index(fg, lab.shape)
    count = np.bincount(inverse, minlength=n).astype(np.float64)
    coords = (zz.astype(np.float64), yy.astype(np.float64), xx.astype(np.float64))
    mean = np.stack([np.bincount(inverse, c, minlength=n) / count for c in coords], axis=1)
    # Second moments in um^2, plus the variance of a uniform voxel (size^2 / 12) so that
    # one-voxel objects and the single plane of a 2D frame get a finite extent.
    scale = np.array(voxel_size.as_tuple())
    cov = np.empty((n, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            s = np.bincount(inverse, coords[a] * coords[b], minlength=n) / count
            v = (s - mean[:, a] * mean[:, b]) * scale[a] * scale[b]
            cov[:, a, b] = v
            cov[:, b, a] = v
    cov[:, range(3), range(3)] += scale**2 / 12.0
    eig = np.clip(np.linalg.eigvalsh(cov)[:, ::-1], 0, None)
    extent = 4.0 * np.sqrt(eig)

    is_2d = lab.shape[0] == 1
    volume = count * float(np.prod(scale))
    if is_2d:
        area = count * scale[1] * scale[2]
        diameter = 2.0 * np.sqrt(area / np.pi)
    else:
        diameter = 2.0 * np.cbrt(3.0 * volume / (4.0 * np.pi))
    if img is not None:
        mean_int = np.bincount(inverse, img.ravel()[fg].astype(np.float64), minlength=n) / count
    else:
        mean_int = np.full(n, np.nan)
    border_ids: list[np.ndarray] = []
    for axis, size in enumerate(lab.shape):
        if size > 1:
            border_ids.append(np.take(lab, 0, axis=axis).ravel())
            border_ids.append(np.take(lab, size - 1, axis=axis).ravel())
    on_border = np.isin(ids, np.concatenate(border_ids)) if border_ids else np.zeros(n, bool)
    return pl.DataFrame(
        {
            "t": np.full(n, t, dtype=np.int32),
            "label": ids.astype(np.uint32),
            "z": mean[:, 0],
            "y": mean[:, 1],
            "x": mean[:, 2],
            "z_um": mean[:, 0] * scale[0],
            "y_um": mean[:, 1] * scale[1],
            "x_um": mean[:, 2] * scale[2],
            "volume_um3": volume,
            "equivalent_diameter_um": diameter,
            "extent_major_um": extent[:, 0],
            "extent_mid_um": extent[:, 1],
            "extent_minor_um": extent[:, 2],
            "mean_intensity": mean_int,
            "touches_border": on_border,
        },
        schema=DETECTION_SCHEMA,
    )


def detections_from_labels(
    labels_tzyx: Iterable[np.ndarray] | np.ndarray,
    *,
    voxel_size: VoxelSize,
    intensity_tzyx: Iterable[np.ndarray] | np.ndarray | None = None,
) -> pl.DataFrame:
    """Measure the objects of every frame (see :func:`measure_objects`).

    Parameters
    ----------
    labels_tzyx : ``(t, z, y, x)`` or ``(t, y, x)`` integer array, or an iterable of
        per-frame ``(z, y, x)`` / ``(y, x)`` arrays (read lazily, one frame at a time).
    voxel_size : physical voxel size (um).
    intensity_tzyx : optional images, one per frame, same shapes as the labels.

    Returns
    -------
    polars.DataFrame with :data:`DETECTION_SCHEMA`, sorted by ``t`` then ``label``.
    """
    frames = []
    intensities = iter(intensity_tzyx) if intensity_tzyx is not None else None
    shape = None
    for t, lab in enumerate(labels_tzyx):
        zyx = _as_zyx(lab, what=f"labels of frame {t}")
        if shape is not None and zyx.shape != shape:
            raise InputError(f"frame {t} has shape {zyx.shape}, frame 0 has {shape}")
        shape = zyx.shape
        img = None
        if intensities is not None:
            img = next(intensities, None)
            if img is None:
                raise InputError(f"intensity images end before the labels (frame {t})")
        frames.append(measure_objects(zyx, voxel_size=voxel_size, intensity=img, t=t))
    if not frames:
        raise InputError("no frames to measure")
    return pl.concat(frames, how="vertical")
