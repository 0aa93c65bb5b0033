"""Per-object morphology and intensity features of one labelled volume."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from scipy import ndimage

from cellrna_pipeline.core.types import VoxelSize


def _surface_area_um2(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Surface area of a binary object by marching cubes (padded so it closes)."""
    from skimage.measure import marching_cubes, mesh_surface_area

    padded = np.pad(mask, 1).astype(np.float32)
    if padded.shape[0] < 2 or mask.sum() == 0:
        return 0.0
    verts, faces, _, _ = marching_cubes(padded, level=0.5, spacing=spacing)
    return float(mesh_surface_area(verts, faces))


def cell_features(
    labels: np.ndarray,
    image: np.ndarray | None,
    *,
    voxel_size: VoxelSize,
    channel_names: Sequence[str] = (),
    id_column: str = "cell_id",
) -> pl.DataFrame:
    """Morphology and mean intensities of every labelled object in one volume.

    Parameters
    ----------
    labels : int array (z, y, x), 0 = background; each id one object.
    image : array (c, z, y, x) of the same volume, or None for no intensities.
    voxel_size : physical voxel size (micrometres).
    channel_names : names of the image channels (``mean_intensity_<name>`` columns).
    id_column : name of the id column.

    Returns
    -------
    One row per object: ``<id_column>``, ``centroid_z_um``, ``centroid_y_um``,
    ``centroid_x_um``, ``volume_um3``, ``surface_um2``, ``sphericity`` (1 for a sphere:
    ``pi^(1/3) (6V)^(2/3) / A``), ``n_voxels``, ``bbox_*`` in voxels, and one
    ``mean_intensity_<channel>`` per channel.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (z, y, x), got shape {labels.shape}")
    if image is not None and image.shape[1:] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in (z, y, x)")
    spacing = voxel_size.as_tuple()
    voxel_um3 = float(np.prod(spacing))
    ids = np.unique(labels)
    ids = ids[ids != 0]
    rows: list[dict[str, object]] = []
    slices = ndimage.find_objects(labels.astype(np.int64)) if ids.size else []
    for obj_id in ids:
        sl = slices[int(obj_id) - 1]
        mask = labels[sl] == obj_id
        coords = np.argwhere(mask).astype(np.float64)
        centroid = coords.mean(axis=0) + [s.start for s in sl]
        n = int(mask.sum())
        volume = n * voxel_um3
        area = _surface_area_um2(mask, spacing)
        row: dict[str, object] = {
            id_column: int(obj_id),
            "centroid_z_um": float(centroid[0] * spacing[0]),
            "centroid_y_um": float(centroid[1] * spacing[1]),
            "centroid_x_um": float(centroid[2] * spacing[2]),
            "volume_um3": volume,
            "surface_um2": area,
            "sphericity": float(np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area)
            if area > 0
            else float("nan"),
            "n_voxels": n,
            "bbox_z0": sl[0].start,
            "bbox_y0": sl[1].start,
            "bbox_x0": sl[2].start,
            "bbox_z1": sl[0].stop,
            "bbox_y1": sl[1].stop,
            "bbox_x1": sl[2].stop,
        }
        if image is not None:
            for c, name in enumerate(channel_names or [f"c{i}" for i in range(image.shape[0])]):
                row[f"mean_intensity_{name}"] = float(image[c][sl][mask].mean())
        rows.append(row)
    schema_cols = [id_column]
    if not rows:
        return pl.DataFrame(schema={id_column: pl.Int64})
    return pl.DataFrame(rows).with_columns(pl.col(schema_cols[0]).cast(pl.Int64))
