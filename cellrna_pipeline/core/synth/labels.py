"""Instance label rendering: touching cells, nuclei strictly inside them, spot ellipsoids.

Cells are rendered with provisional ids (index in the population list + 1); the caller
maps them to track labels once it knows which cells are in view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from cellrna_pipeline.core.synth.population import Cell
from cellrna_pipeline.core.synth.shapes import Ellipsoid, bounding_box, normalized_distance2

Box = tuple[slice, slice, slice]
_CROSS = ndi.generate_binary_structure(3, 1)


def _keep_largest(mask: np.ndarray) -> np.ndarray:
    """``mask`` reduced to its largest 6-connected component (one id, one object)."""
    lbl, n = ndi.label(mask, structure=_CROSS)
    if n <= 1:
        return mask
    sizes = np.bincount(lbl.ravel())
    sizes[0] = 0
    return lbl == int(np.argmax(sizes))


def cell_centre_vox(
    cell: Cell, drift_um: np.ndarray, voxel_um: tuple[float, float, float]
) -> np.ndarray:
    """Cell centre in the voxels of a frame with global drift ``drift_um``."""
    return (cell.centre_um + drift_um) / np.asarray(voxel_um)


def nucleus_centre_vox(
    cell: Cell, drift_um: np.ndarray, voxel_um: tuple[float, float, float]
) -> np.ndarray:
    """Nucleus centre in the voxels of a frame with global drift ``drift_um``."""
    return (cell.centre_um + cell.nucleus_offset_um * cell.growth + drift_um) / np.asarray(voxel_um)


def render_cells(
    cells: Sequence[Cell],
    drift_um: np.ndarray,
    voxel_um: tuple[float, float, float],
    shape_zyx: tuple[int, int, int],
) -> tuple[np.ndarray, list[Box | None], np.ndarray]:
    """Cell instances of one frame (:func:`render_shapes` of the cells' outlines).

    Returns
    -------
    labels : ``(z, y, x)`` uint32, ``i + 1`` for ``cells[i]``, one connected piece each.
    boxes : per cell, its clipped bounding box (``None`` when out of the volume).
    own_voxels : ``(n,)`` voxels of each cell's own shape inside the volume, before the
        split with neighbours (for the visible fraction).
    """
    return render_shapes(
        [cell.shape for cell in cells],
        [cell_centre_vox(cell, drift_um, voxel_um) for cell in cells],
        [cell.growth for cell in cells],
        voxel_um,
        shape_zyx,
    )


def render_shapes(
    shapes: Sequence[Ellipsoid],
    centres_vox: Sequence[np.ndarray],
    scales: Sequence[float],
    voxel_um: tuple[float, float, float],
    shape_zyx: tuple[int, int, int],
) -> tuple[np.ndarray, list[Box | None], np.ndarray]:
    """Instance labels of overlapping shapes that share borders where they overlap.

    A voxel inside several shapes goes to the smallest normalized distance ``d`` (a
    weighted Voronoi split), so overlapping neighbours touch along a common border; each
    shape keeps only its largest 6-connected piece.

    Parameters
    ----------
    shapes, centres_vox, scales : per object its outline, ``(z, y, x)`` centre in
        (sub-)voxels and size factor.
    voxel_um : voxel size ``(z, y, x)`` in micrometres.
    shape_zyx : volume shape in voxels.

    Returns
    -------
    labels : ``(z, y, x)`` uint32, ``i + 1`` for ``shapes[i]``, one connected piece each.
    boxes : per shape, its clipped bounding box (``None`` when out of the volume).
    own_voxels : ``(n,)`` voxels of each shape inside the volume before the split.
    """
    best = np.full(shape_zyx, np.inf, dtype=np.float32)
    labels = np.zeros(shape_zyx, dtype=np.uint32)
    boxes: list[Box | None] = []
    own = np.zeros(len(shapes), dtype=np.int64)
    for i, (shape, centre, scale) in enumerate(zip(shapes, centres_vox, scales, strict=True)):
        box = bounding_box(shape, centre, scale, voxel_um, shape_zyx)
        boxes.append(box)
        if box is None:
            continue
        d2 = normalized_distance2(shape, centre, scale, voxel_um, box)
        inside = d2 <= 1.0
        own[i] = int(np.count_nonzero(inside))
        if own[i] == 0:
            continue
        best_view = best[box]
        wins = inside & (d2 < best_view)
        best_view[wins] = d2[wins]
        labels[box][wins] = i + 1
    del best
    for i, box in enumerate(boxes):
        if box is None or own[i] == 0:
            continue
        region = labels[box]
        mine = region == i + 1
        kept = _keep_largest(mine)
        if kept is not mine:
            region[mine & ~kept] = 0
    return labels, boxes, own


def render_nuclei(
    cells: Sequence[Cell],
    cell_labels: np.ndarray,
    drift_um: np.ndarray,
    voxel_um: tuple[float, float, float],
    visible: np.ndarray,
) -> np.ndarray:
    """Nucleus instances (same provisional ids as ``cell_labels``), ``(z, y, x)`` uint32.

    Each nucleus is its irregular ellipsoid intersected with its cell's mask eroded by one
    voxel (6-connectivity), so it is strictly inside the cell; only the largest piece is
    kept.
    """
    shape_zyx = cell_labels.shape
    nuclei = np.zeros(shape_zyx, dtype=np.uint32)
    for i, cell in enumerate(cells):
        if not visible[i]:
            continue
        centre = nucleus_centre_vox(cell, drift_um, voxel_um)
        box = bounding_box(cell.nucleus, centre, cell.growth, voxel_um, shape_zyx, pad=1)
        if box is None:
            continue
        in_cell = cell_labels[box] == i + 1
        if not in_cell.any():
            continue
        # border_value=1: beyond the image edge the cell goes on, so no margin there
        core = ndi.binary_erosion(in_cell, structure=_CROSS, border_value=1)
        mask = (
            normalized_distance2(cell.nucleus, centre, cell.growth, voxel_um, box) <= 1.0
        ) & core
        if not mask.any():
            continue
        nuclei[box][_keep_largest(mask)] = i + 1
    return nuclei


def render_spot_labels(
    centres_vox: np.ndarray,
    sigma_vox: tuple[float, float, float],
    shape_zyx: tuple[int, int, int],
) -> np.ndarray:
    """Spot instances ``(z, y, x)`` uint32: spot ``i`` is label ``i + 1``.

    Each spot covers the voxels within one PSF sigma (normalized distance <= 1) of its
    centre; where spots overlap the nearer centre wins; the voxel at a spot's rounded
    centre always carries its label, so no spot is empty. Centres must be distinct
    voxels after rounding.
    """
    labels = np.zeros(shape_zyx, dtype=np.uint32)
    if len(centres_vox) == 0:
        return labels
    best = np.full(shape_zyx, np.inf, dtype=np.float32)
    nz, ny, nx = shape_zyx
    sz, sy, sx = sigma_vox
    for i, (cz, cy, cx) in enumerate(centres_vox):
        z0, z1 = max(math.floor(cz - sz), 0), min(math.ceil(cz + sz) + 1, nz)
        y0, y1 = max(math.floor(cy - sy), 0), min(math.ceil(cy + sy) + 1, ny)
        x0, x1 = max(math.floor(cx - sx), 0), min(math.ceil(cx + sx) + 1, nx)
        d2 = (
            (((np.arange(z0, z1) - cz) / sz) ** 2)[:, None, None]
            + (((np.arange(y0, y1) - cy) / sy) ** 2)[None, :, None]
            + (((np.arange(x0, x1) - cx) / sx) ** 2)[None, None, :]
        ).astype(np.float32)
        best_view = best[z0:z1, y0:y1, x0:x1]
        wins = (d2 <= 1.0) & (d2 < best_view)
        best_view[wins] = d2[wins]
        labels[z0:z1, y0:y1, x0:x1][wins] = i + 1
    rz, ry, rx = np.rint(centres_vox).astype(np.int64).T
    labels[rz, ry, rx] = np.arange(1, len(centres_vox) + 1, dtype=np.uint32)
    return labels
