"""Jobs: one per partitions definition, selecting the assets a sensor, a schedule or a
user runs."""

from dagster import AssetKey, AssetSelection, define_asset_job

from cellrna_pipeline.defs.partitions import experiments_partitions, volumes_partitions

ingest_job = define_asset_job(
    "ingest_job",
    selection=AssetSelection.assets(AssetKey("raw_volume")),
    partitions_def=volumes_partitions,
    description="Copy one timepoint of a registered acquisition into raw/<experiment>.ome.zarr.",
)

tables_job = define_asset_job(
    "tables_job",
    selection=AssetSelection.groups("statistics")
    | AssetSelection.assets(AssetKey("experiment_report")),
    partitions_def=experiments_partitions,
    description="Statistics tables, the warehouse load and the experiment report of one experiment.",
)
