"""Reports: QC previews per volume, and per experiment a trajectory map, a 3D view and an
HTML report, all visible in the Dagster UI through asset metadata."""

import polars as pl
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    asset,
)

from cellrna_pipeline.core import report
from cellrna_pipeline.core.io import (
    atomic_write_bytes,
    atomic_write_text,
    read_image_meta,
    read_label_timepoint,
    read_timepoint,
)
from cellrna_pipeline.core.preview import markdown_image, markdown_png, png_bytes
from cellrna_pipeline.defs.partitions import (
    experiments_partitions,
    parse_volume_key,
    volumes_partitions,
)
from cellrna_pipeline.defs.resources import DataRootResource
from cellrna_pipeline.integrations.warehouse import query, read_partitions


@asset(
    deps=[AssetKey("cell_masks"), AssetKey("rna_spots")],
    partitions_def=volumes_partitions,
    group_name="reports",
    description="Max projection with cell/nucleus outlines and spot centres (reports/<exp>/qc_tNNNN.png).",
)
def qc_preview(context: AssetExecutionContext, data_root: DataRootResource) -> MaterializeResult:
    experiment, t = parse_volume_key(context.partition_key)
    root = data_root.root
    path = root.processed(experiment)
    spots = read_partitions(root, "spots", experiment).filter(pl.col("timepoint") == t)
    rgb = report.qc_overlay(
        read_timepoint(path, t),
        read_label_timepoint(path, "cells", t)[0],
        read_label_timepoint(path, "nuclei", t)[0],
        spots,
    )
    out = root.reports / experiment / f"qc_t{t:04d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, png_bytes(rgb))
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(out)),
            "preview": MetadataValue.md(markdown_image(rgb, "QC")),
        }
    )


@asset(
    deps=[AssetKey("warehouse"), AssetDep(AssetKey("cell_masks"))],
    partitions_def=experiments_partitions,
    group_name="reports",
    description="Trajectory map, 3D view and a self-contained HTML report (reports/<exp>/report.html).",
)
def experiment_report(
    context: AssetExecutionContext, data_root: DataRootResource
) -> MaterializeResult:
    experiment = context.partition_key
    root = data_root.root
    where = "WHERE experiment = $experiment"
    params = {"experiment": experiment}
    tracks = query(root, f"SELECT * FROM tracks {where}", params)
    lineage = query(root, f"SELECT * FROM lineage {where}", params)
    summary = query(root, f"SELECT * FROM experiment_summary {where}", params)
    behavior = query(root, f"SELECT * FROM cell_behavior {where} ORDER BY track_id", params)
    per_cell = query(
        root,
        f"""SELECT channel, count(*) AS cells, avg(n_spots) AS mean_spots_per_cell,
                   avg(nuclear_fraction) AS mean_nuclear_fraction,
                   avg(mean_distance_to_nucleus_um) AS mean_distance_to_nucleus_um
            FROM rna_localization {where} GROUP BY channel ORDER BY channel""",
        params,
    )
    distances = query(
        root, f"SELECT distance_to_nucleus_um FROM spots {where} AND cell_id > 0", params
    )
    path = root.processed(experiment)
    meta = read_image_meta(path)
    t0_spots = query(root, f"SELECT * FROM spots {where} AND timepoint = 0", params)
    trajectory = report.trajectory_map(
        tracks, lineage, title=f"{experiment}: tracks coloured by lineage"
    )
    view = report.view_3d(
        read_label_timepoint(path, "cells", 0)[0],
        read_label_timepoint(path, "nuclei", 0)[0],
        voxel_size=meta.voxel_size,
        spots=t0_spots,
        tracks=tracks,
    )
    sections: dict[str, str | bytes | pl.DataFrame] = {
        "Summary": summary,
        "Trajectories": trajectory,
        "3D view (timepoint 0)": view,
        "RNA per cell": per_cell,
        "Distance of spots to the nucleus": report.histogram(
            distances["distance_to_nucleus_um"].to_numpy(),
            xlabel="distance to nucleus surface (µm)",
            title="spots in cells",
        ),
        "Cell behaviour (first 50 tracks)": behavior,
    }
    folder = root.reports / experiment
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "trajectory.png", trajectory)
    atomic_write_bytes(folder / "view3d.png", view)
    atomic_write_text(
        folder / "report.html", report.html_report(f"cellrna report: {experiment}", sections)
    )
    return MaterializeResult(
        metadata={
            "report": MetadataValue.path(str(folder / "report.html")),
            "trajectory_map": MetadataValue.md(markdown_png(trajectory, "trajectories")),
            "view_3d": MetadataValue.md(markdown_png(view, "3D view")),
        }
    )
