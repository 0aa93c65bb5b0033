"""Assign spots to cells and compartments, with the 3D distance to the nucleus surface."""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import ndimage as ndi

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.types import VoxelSize

__all__ = ["COMPARTMENTS", "assign_spots", "nucleus_surface_distance_um"]

COMPARTMENTS = ("nucleus", "cytoplasm", "outside")


def nucleus_surface_distance_um(nuclei_zyx: np.ndarray, voxel_size: VoxelSize) -> np.ndarray:
    """Signed anisotropic distance to the nearest nucleus surface, in micrometres.

    Parameters
    ----------
    nuclei_zyx : ``(z, y, x)`` integer nucleus labels (0 = background).
    voxel_size : voxel size (um); the distance transform uses it as ``sampling``.

    Returns
    -------
    float32 ``(z, y, x)``: positive outside nuclei (distance to the nearest nucleus
    voxel), negative inside (minus the distance to the nearest non-nucleus voxel), so
    the surface lies between -1 and +1 voxel spacings. ``inf`` everywhere when there is
    no nucleus.
    """
    inside = np.asarray(nuclei_zyx) > 0
    if not inside.any():
        return np.full(inside.shape, np.inf, dtype=np.float32)
    sampling = voxel_size.as_tuple()
    outside_d = ndi.distance_transform_edt(~inside, sampling=sampling)
    inside_d = ndi.distance_transform_edt(inside, sampling=sampling) if (~inside).any() else None
    out = outside_d.astype(np.float32)
    if inside_d is not None:
        out[inside] = -inside_d[inside].astype(np.float32)
    else:
        out[inside] = -np.inf
    return out


def assign_spots(
    table: pl.DataFrame,
    *,
    cells: np.ndarray,
    nuclei: np.ndarray,
    voxel_size: VoxelSize,
) -> pl.DataFrame:
    """Add ``cell_id``, ``compartment`` and ``distance_to_nucleus_um`` to a spot table.

    Parameters
    ----------
    table : spots with sub-voxel ``z, y, x`` columns (voxels).
    cells, nuclei : ``(z, y, x)`` integer labels of the same volume (a nucleus carries
        its cell's id, as written by the ``cell_masks`` asset and the generator).
    voxel_size : voxel size (um).

    Returns
    -------
    The table with ``cell_id`` (u32, 0 = outside every cell), ``compartment``
    (``"nucleus"`` where the rounded centre is in a nucleus, else ``"cytoplasm"`` inside
    a cell, else ``"outside"``) and ``distance_to_nucleus_um`` (f64): the anisotropic
    Euclidean distance from the spot's voxel to the nearest nucleus surface, positive
    outside nuclei and negative inside (``+inf`` without nuclei). Computed with
    ``scipy.ndimage.distance_transform_edt(sampling=voxel size)``.
    """
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    if cells.shape != nuclei.shape or cells.ndim != 3:
        raise InputError(
            f"cells and nuclei must be (z, y, x) of one shape, got {cells.shape} and {nuclei.shape}"
        )
    for name, arr in (("cells", cells), ("nuclei", nuclei)):
        if arr.dtype.kind not in "ui":
            raise InputError(f"{name} labels must be integers, got {arr.dtype}")
    n = table.height
    if n == 0:
        return table.with_columns(
            pl.Series("cell_id", [], dtype=pl.UInt32),
            pl.Series("compartment", [], dtype=pl.String),
            pl.Series("distance_to_nucleus_um", [], dtype=pl.Float64),
        )
    zyx = table.select(["z", "y", "x"]).to_numpy().astype(np.float64)
    vox = np.clip(np.rint(zyx).astype(np.int64), 0, np.array(cells.shape) - 1)
    idx = tuple(vox.T)
    cell_id = cells[idx].astype(np.uint32)
    in_nucleus = nuclei[idx] > 0
    # A nucleus voxel outside any cell mask (imperfect masks) still belongs to its nucleus' cell.
    cell_id = np.where((cell_id == 0) & in_nucleus, nuclei[idx].astype(np.uint32), cell_id)
    compartment = np.where(in_nucleus, "nucleus", np.where(cell_id > 0, "cytoplasm", "outside"))
    dist = nucleus_surface_distance_um(nuclei, voxel_size)[idx].astype(np.float64)
    return table.with_columns(
        pl.Series("cell_id", cell_id, dtype=pl.UInt32),
        pl.Series("compartment", compartment.astype(str), dtype=pl.String),
        pl.Series("distance_to_nucleus_um", dist, dtype=pl.Float64),
    )
