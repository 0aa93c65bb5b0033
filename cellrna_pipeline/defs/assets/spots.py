"""``rna_spots``: spot instance labels and the spot table of one volume (every RNA channel)."""

import time

import numpy as np
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from cellrna_pipeline.core.io import (
    atomic_path,
    create_labels,
    read_image_meta,
    read_label_timepoint,
    read_timepoint,
    write_label_timepoint,
)
from cellrna_pipeline.core.spots import DEFAULT_SPOT_RADIUS_NM, SpotDetectionConfig
from cellrna_pipeline.core.spots.volume import rna_channels, spots_for_volume
from cellrna_pipeline.defs.partitions import volumes_partitions
from cellrna_pipeline.defs.resources import DataRootResource

SPOTS_TABLE = "spots"
# Spot density check: more than this many spots per cubic micrometre of cell is not RNA
# (it is noise passing the threshold); fewer than this per cell in every channel of a
# volume with cells means the detector found (almost) nothing.
MAX_SPOTS_PER_UM3 = 0.5
MIN_SPOTS_PER_CELL = 0.05


class RnaSpotsConfig(Config):
    """Run config of ``rna_spots`` (units in the names)."""

    spot_radius_nm: list[float] = list(DEFAULT_SPOT_RADIUS_NM)  # noqa: RUF012 (pydantic copies it)
    threshold_sigma: float | None = None


def spots_table_path(data_root: DataRootResource, experiment: str, t: int):
    return data_root.root.tables(SPOTS_TABLE, experiment) / f"t{t:04d}.parquet"


@asset(
    partitions_def=volumes_partitions,
    deps=[AssetKey("preprocessed_volume"), AssetKey("cell_masks")],
    group_name="spots",
    kinds={"ome-zarr", "parquet"},
    description="RNA spots of one volume: instance labels 'spots' (one channel per RNA "
    "channel) in processed/<experiment>.ome.zarr and tables/spots/<experiment>/tNNNN.parquet "
    "(position in voxels and um, intensity, score, size, cell id, compartment, distance to "
    "the nucleus surface).",
)
def rna_spots(
    context: AssetExecutionContext, config: RnaSpotsConfig, data_root: DataRootResource
) -> MaterializeResult:
    experiment, t, path = data_root.processed_volume(context.partition_key)
    start = time.perf_counter()
    meta = read_image_meta(path)
    names = rna_channels(meta.channel_names)
    volume = read_timepoint(path, t)
    cells = read_label_timepoint(path, "cells", t)[0]
    nuclei = read_label_timepoint(path, "nuclei", t)[0]
    detector = SpotDetectionConfig(
        spot_radius_nm=tuple(config.spot_radius_nm),  # type: ignore[arg-type]
        threshold_sigma=config.threshold_sigma,
    )
    labels, table = spots_for_volume(
        volume,
        channel_names=meta.channel_names,
        cells_zyx=cells,
        nuclei_zyx=nuclei,
        voxel_size=meta.voxel_size,
        experiment=experiment,
        timepoint=t,
        config=detector,
        progress=context.log.info,
    )
    create_labels(path, "spots", n_channels=len(names))
    write_label_timepoint(path, "spots", t, labels)
    out = spots_table_path(data_root, experiment, t)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.write_parquet(tmp)
    counts = {n: int((table["channel"] == n).sum()) for n in names}
    by_comp = table.group_by("compartment").len().sort("compartment").rows()
    return MaterializeResult(
        metadata={
            "table": MetadataValue.path(str(out)),
            "labels": MetadataValue.path(str(path / "labels" / "spots")),
            "timepoint": t,
            "spots_per_channel": str(counts),
            "spots_per_compartment": str(dict(by_comp)),
            "n_spots": table.height,
            "seconds": round(time.perf_counter() - start, 3),
        }
    )


@asset_check(
    asset=rna_spots,
    description="Spot density is plausible: at most 0.5 spots per um^3 of cell in every RNA "
    "channel, and some spots where there are cells.",
)
def check_rna_spots_density(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    import polars as pl

    experiment, t, path = data_root.processed_volume(context.partition_key)
    meta = read_image_meta(path)
    cells = read_label_timepoint(path, "cells", t)[0]
    n_cells = len(np.unique(cells[cells > 0]))
    cell_um3 = float((cells > 0).sum()) * float(np.prod(meta.voxel_size.as_tuple()))
    table = pl.read_parquet(spots_table_path(data_root, experiment, t))
    per_channel = {}
    bad = []
    for name in rna_channels(meta.channel_names):
        sub = table.filter((pl.col("channel") == name) & (pl.col("cell_id") > 0))
        density = sub.height / cell_um3 if cell_um3 > 0 else 0.0
        per_cell = sub.height / n_cells if n_cells else 0.0
        per_channel[name] = {"per_um3": round(density, 4), "per_cell": round(per_cell, 2)}
        if density > MAX_SPOTS_PER_UM3:
            bad.append(f"{name}: {density:.3f} spots/um^3 in cells")
    if n_cells and all(v["per_cell"] < MIN_SPOTS_PER_CELL for v in per_channel.values()):
        bad.append("no spots in any cell")
    return AssetCheckResult(
        passed=not bad,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "density": str(per_channel),
            "cells": n_cells,
            "problems": "; ".join(bad) or "none",
        },
    )
