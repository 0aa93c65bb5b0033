"""Pictures and the HTML report of an experiment: QC overlays, trajectory maps, a rendered
3D view. Matplotlib with the non-interactive Agg backend; every function returns PNG bytes
or an RGB array, so callers decide where they go (asset metadata, report folder)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping

import numpy as np
import polars as pl

from cellrna_pipeline.core.preview import composite_mip
from cellrna_pipeline.core.types import VoxelSize


def _figure(width_in: float = 6.0, height_in: float = 6.0):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width_in, height_in), dpi=100)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def qc_overlay(
    image_czyx: np.ndarray,
    cells_zyx: np.ndarray,
    nuclei_zyx: np.ndarray | None = None,
    spots: pl.DataFrame | None = None,
    *,
    max_size: int = 384,
) -> np.ndarray:
    """Max projection of the image with cell outlines (white), nucleus outlines (cyan)
    and spot centres (yellow dots).

    Parameters
    ----------
    image_czyx : (c, z, y, x) image.
    cells_zyx, nuclei_zyx : (z, y, x) instance labels.
    spots : table with ``y``, ``x`` in voxels (optional).

    Returns
    -------
    uint8 (y', x', 3).
    """
    from skimage.segmentation import find_boundaries

    rgb = composite_mip(image_czyx, max_size=max_size).astype(np.float32) / 255
    step = max(1, int(np.ceil(max(image_czyx.shape[2:]) / max_size)))
    for labels, colour in ((cells_zyx, (1.0, 1.0, 1.0)), (nuclei_zyx, (0.0, 1.0, 1.0))):
        if labels is None:
            continue
        mip = labels.max(axis=0)[::step, ::step]
        edge = find_boundaries(mip, mode="inner")
        rgb[edge] = colour
    if spots is not None and spots.height:
        ys = np.clip((spots["y"].to_numpy() / step).round().astype(int), 0, rgb.shape[0] - 1)
        xs = np.clip((spots["x"].to_numpy() / step).round().astype(int), 0, rgb.shape[1] - 1)
        for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):  # a small plus per spot
            rgb[np.clip(ys + dy, 0, rgb.shape[0] - 1), np.clip(xs + dx, 0, rgb.shape[1] - 1)] = (
                1.0,
                0.9,
                0.1,
            )
    return (rgb * 255).astype(np.uint8)


def trajectory_map(tracks: pl.DataFrame, lineage: pl.DataFrame, *, title: str = "") -> bytes:
    """Tracks in the x-y plane (micrometres), one colour per lineage tree, divisions marked
    with a star at the parent's last position.

    Parameters
    ----------
    tracks : ``track_id``, ``timepoint``, ``centroid_y_um``, ``centroid_x_um``.
    lineage : ``track_id``, ``parent_track_id``.
    """
    import matplotlib.pyplot as plt

    parent = dict(
        zip(lineage["track_id"].to_list(), lineage["parent_track_id"].to_list(), strict=True)
    )

    def root_of(track_id: int) -> int:
        seen = set()
        while parent.get(track_id, 0) and track_id not in seen:
            seen.add(track_id)
            track_id = parent[track_id]
        return track_id

    roots = sorted({root_of(t) for t in tracks["track_id"].unique().to_list()})
    cmap = plt.get_cmap("tab20")
    colour = {r: cmap(i % 20) for i, r in enumerate(roots)}
    fig = _figure()
    ax = fig.add_subplot(111)
    for (track_id,), g in tracks.sort("timepoint").group_by(["track_id"], maintain_order=True):
        c = colour[root_of(int(track_id))]
        ax.plot(g["centroid_x_um"], g["centroid_y_um"], "-", color=c, lw=1.2)
        ax.plot(g["centroid_x_um"][0], g["centroid_y_um"][0], "o", color=c, ms=3)
    dividing = set(lineage.filter(pl.col("parent_track_id") > 0)["parent_track_id"].to_list())
    for track_id in dividing:
        g = tracks.filter(pl.col("track_id") == track_id).sort("timepoint")
        if g.height:
            ax.plot(g["centroid_x_um"][-1], g["centroid_y_um"][-1], "*", color="k", ms=10)
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_title(title or f"{len(roots)} lineages, {len(dividing)} divisions (★)")
    return _png(fig)


def view_3d(
    cells_zyx: np.ndarray,
    nuclei_zyx: np.ndarray,
    *,
    voxel_size: VoxelSize,
    spots: pl.DataFrame | None = None,
    tracks: pl.DataFrame | None = None,
    max_objects: int = 60,
) -> bytes:
    """A rendered 3D view: nucleus and cell surfaces (marching cubes on the anisotropic
    grid, in micrometres), spots as points, tracks as lines.

    Parameters
    ----------
    cells_zyx, nuclei_zyx : (z, y, x) labels of one timepoint.
    spots : ``z_um``, ``y_um``, ``x_um`` (optional).
    tracks : ``track_id``, ``timepoint``, ``centroid_*_um`` (optional).
    max_objects : draw at most this many cells (the largest), to keep it quick.
    """
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    from scipy import ndimage
    from skimage.measure import marching_cubes

    spacing = voxel_size.as_tuple()
    fig = _figure(7, 7)
    ax = fig.add_subplot(111, projection="3d")
    ids, counts = np.unique(cells_zyx[cells_zyx > 0], return_counts=True)
    keep = ids[np.argsort(-counts)[:max_objects]]
    slices = ndimage.find_objects(cells_zyx.astype(np.int64))
    for labels, colour, alpha in (
        (cells_zyx, (0.2, 0.8, 0.3), 0.12),
        (nuclei_zyx, (0.2, 0.4, 1.0), 0.35),
    ):
        for obj in keep:
            sl = slices[int(obj) - 1] if int(obj) - 1 < len(slices) else None
            if sl is None:
                continue
            mask = np.pad(labels[sl] == obj, 1)
            if mask.sum() < 8 or min(mask.shape) < 2:
                continue
            verts, faces, _, _ = marching_cubes(
                mask.astype(np.float32), 0.5, spacing=spacing, step_size=2
            )
            offset = np.array([(s.start - 1) * sp for s, sp in zip(sl, spacing, strict=True)])
            verts = verts + offset
            mesh = Poly3DCollection(
                verts[faces][:, :, ::-1], alpha=alpha, facecolor=colour, linewidth=0
            )
            ax.add_collection3d(mesh)
    if spots is not None and spots.height:
        ax.scatter(spots["x_um"], spots["y_um"], spots["z_um"], s=2, c="magenta", depthshade=False)
    if tracks is not None and tracks.height:
        for _, g in tracks.sort("timepoint").group_by(["track_id"]):
            ax.plot(g["centroid_x_um"], g["centroid_y_um"], g["centroid_z_um"], color="k", lw=1)
    zyx_um = [n * s for n, s in zip(cells_zyx.shape, spacing, strict=True)]
    ax.set_xlim(0, zyx_um[2])
    ax.set_ylim(0, zyx_um[1])
    ax.set_zlim(0, zyx_um[0])
    ax.set_box_aspect((zyx_um[2], zyx_um[1], zyx_um[0]))
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_zlabel("z (µm)")
    ax.view_init(elev=35, azim=-60)
    return _png(fig)


def histogram(values: np.ndarray, *, xlabel: str, title: str, bins: int = 30) -> bytes:
    """A plain histogram as PNG."""
    fig = _figure(5, 3.5)
    ax = fig.add_subplot(111)
    ax.hist(values[np.isfinite(values)], bins=bins, color="#3572a5")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    return _png(fig)


def html_report(title: str, sections: Mapping[str, str | bytes | pl.DataFrame]) -> str:
    """A self-contained HTML page: PNG bytes become inline images, frames become tables,
    strings are paragraphs (escaped)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, content in sections.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, bytes):
            parts.append(
                f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{base64.b64encode(content).decode()}'>"
            )
        elif isinstance(content, pl.DataFrame):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in content.columns)
            rows = "".join(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td>"
                    for v in r
                )
                + "</tr>"
                for r in content.head(50).rows()
            )
            parts.append(f"<table><tr>{head}</tr>{rows}</table>")
        else:
            parts.append(f"<p>{html.escape(content)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
