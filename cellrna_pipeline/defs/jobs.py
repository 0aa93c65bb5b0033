"""Jobs: one per partitions definition, selecting the assets a sensor or user runs."""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from cellrna_pipeline.defs.assets.ingest import raw_volume
from cellrna_pipeline.defs.partitions import volumes_partitions

ingest_job = define_asset_job(
    "ingest_job",
    selection=AssetSelection.assets(raw_volume),
    partitions_def=volumes_partitions,
    description="Copy one timepoint of a registered acquisition into raw/<experiment>.ome.zarr.",
)
