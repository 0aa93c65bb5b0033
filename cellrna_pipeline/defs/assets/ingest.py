"""``raw_volume``: one timepoint of an ingested acquisition, copied into OME-Zarr."""

import time

import dask
import numpy as np
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from cellrna_pipeline.core.io import (
    auto_chunks_zyx,
    create_image,
    open_source,
    preview_level,
    read_timepoint,
    timepoint_stats,
    write_timepoint,
)
from cellrna_pipeline.core.preview import composite_mip, markdown_image
from cellrna_pipeline.defs.partitions import parse_volume_key, volumes_partitions
from cellrna_pipeline.defs.resources import DataRootResource


@asset(
    partitions_def=volumes_partitions,
    group_name="ingestion",
    kinds={"ome-zarr"},
    description="One timepoint (c, z, y, x) of the acquisition in raw/<experiment>.ome.zarr, "
    "with physical voxel sizes and a multiscale pyramid.",
)
def raw_volume(context: AssetExecutionContext, data_root: DataRootResource) -> MaterializeResult:
    experiment, t = parse_volume_key(context.partition_key)
    record = data_root.experiment(experiment)
    start = time.perf_counter()
    path = data_root.root.raw(experiment)
    meta = record.image_meta
    chunks = auto_chunks_zyx(meta.shape_zyx, np.dtype(meta.dtype).itemsize)
    create_image(path, meta, chunks_zyx=chunks)
    # Block-wise copy: slabs of chunks[0] planes, never the whole timepoint in memory. An
    # open TIFF cannot be pickled to other processes, hence local threads.
    with (
        open_source(record.source, voxel_size=record.voxel_size) as source,
        dask.config.set(scheduler="threads"),
    ):
        write_timepoint(path, t, source.timepoint_dask(t, chunk_z=chunks[0]))
    stats = timepoint_stats(path, t)
    small = read_timepoint(path, t, level=preview_level(path))
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "timepoint": t,
            "shape_czyx": str(tuple(meta.shape_tczyx[1:])),
            "voxel_size_um": str(record.voxel_size_um),
            "channels": ", ".join(record.channel_names),
            "mean_per_channel": str(np.round(stats["mean"], 2).tolist()),
            "seconds": round(time.perf_counter() - start, 3),
            "preview": MetadataValue.md(markdown_image(composite_mip(small), "raw MIP")),
        }
    )
