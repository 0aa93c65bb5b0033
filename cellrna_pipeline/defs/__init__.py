"""Dagster layer: partitions, resources, assets by stage, checks, sensors, jobs.

Kept thin: assets read their partition, call one ``core`` function, write, and attach
metadata.
"""

from __future__ import annotations

from dagster import Definitions

from cellrna_pipeline.defs.assets.ingest import raw_volume
from cellrna_pipeline.defs.checks import check_raw_volume_has_signal
from cellrna_pipeline.defs.jobs import ingest_job
from cellrna_pipeline.defs.resources import DataRootResource
from cellrna_pipeline.defs.sensors import inbox_sensor

ASSETS = [raw_volume]
CHECKS = [check_raw_volume_has_signal]


def build_definitions(home: str = "") -> Definitions:
    """All definitions, with the data root at ``home`` (empty: ``$CELLRNA_HOME``)."""
    return Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        jobs=[ingest_job],
        sensors=[inbox_sensor],
        resources={"data_root": DataRootResource(home=home)},
    )
