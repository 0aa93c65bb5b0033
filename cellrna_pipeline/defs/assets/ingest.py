"""``raw_volume``: one timepoint of an ingested acquisition, copied into OME-Zarr."""

import time

import numpy as np
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from cellrna_pipeline.core.io import create_image, open_source, write_timepoint
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
    volume = open_source(record.source, voxel_size=record.voxel_size).read_timepoint(t)
    path = data_root.root.raw(experiment)
    create_image(path, record.image_meta)
    write_timepoint(path, t, volume)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "timepoint": t,
            "shape_czyx": str(volume.shape),
            "voxel_size_um": str(record.voxel_size_um),
            "channels": ", ".join(record.channel_names),
            "mean_per_channel": str(
                np.round(volume.reshape(volume.shape[0], -1).mean(1), 2).tolist()
            ),
            "seconds": round(time.perf_counter() - start, 3),
            "preview": MetadataValue.md(markdown_image(composite_mip(volume), "raw MIP")),
        }
    )
