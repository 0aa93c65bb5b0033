"""Dagster layer: partitions, resources, assets by stage, checks, sensors, schedules, jobs.

Kept thin: assets read their partition, call one ``core`` function, write, and attach
metadata.
"""

from __future__ import annotations

from dagster import Definitions

from cellrna_pipeline.defs.assets.cells import (
    cell_masks,
    cell_segmentation_model,
    check_cell_masks_count_in_range,
    check_cell_masks_not_empty,
    check_cell_masks_nuclei_inside_cells,
    check_cell_segmentation_model_beats_champion,
)
from cellrna_pipeline.defs.assets.ingest import raw_volume
from cellrna_pipeline.defs.assets.preprocess import (
    camera_calibration,
    check_camera_calibration_plausible,
    check_drift_shifts_converged,
    check_preprocessed_volume_registration_residual,
    drift_shifts,
    preprocessed_volume,
)
from cellrna_pipeline.defs.assets.reports import experiment_report, qc_preview
from cellrna_pipeline.defs.assets.spots import check_rna_spots_density, rna_spots
from cellrna_pipeline.defs.assets.tables import statistics_tables, warehouse
from cellrna_pipeline.defs.assets.tracking import (
    cell_tracks,
    check_cell_tracks_divisions_two_daughters,
    check_cell_tracks_no_jump_beyond_gate,
    check_spot_tracks_every_spot_once,
    check_spot_tracks_no_jump_beyond_gate,
    spot_tracks,
)
from cellrna_pipeline.defs.checks import check_raw_volume_has_signal
from cellrna_pipeline.defs.jobs import ingest_job, tables_job
from cellrna_pipeline.defs.resources import DaskResource, DataRootResource
from cellrna_pipeline.defs.schedules import warehouse_refresh_schedule
from cellrna_pipeline.defs.sensors import inbox_sensor

# Topological order: the runner (`cellrna materialize`, the demo) walks this list.
ASSETS = [
    raw_volume,
    camera_calibration,
    drift_shifts,
    preprocessed_volume,
    cell_segmentation_model,
    cell_masks,
    rna_spots,
    cell_tracks,
    spot_tracks,
    statistics_tables,
    warehouse,
    qc_preview,
    experiment_report,
]
TRAINING_ASSETS = [cell_segmentation_model]
"""Trained only on request (`cellrna train`, or from the UI); the runner skips them by default."""
LIVE_RNA_ASSETS = [spot_tracks]
"""Only for live-RNA experiments: the runner skips them by default for the others."""

CHECKS = [
    check_raw_volume_has_signal,
    check_camera_calibration_plausible,
    check_drift_shifts_converged,
    check_preprocessed_volume_registration_residual,
    check_cell_masks_not_empty,
    check_cell_masks_count_in_range,
    check_cell_masks_nuclei_inside_cells,
    check_cell_segmentation_model_beats_champion,
    check_rna_spots_density,
    check_cell_tracks_no_jump_beyond_gate,
    check_cell_tracks_divisions_two_daughters,
    check_spot_tracks_no_jump_beyond_gate,
    check_spot_tracks_every_spot_once,
]


def resources(home: str = "") -> dict[str, object]:
    """The resources every asset may ask for, with the data root at ``home``."""
    return {"data_root": DataRootResource(home=home), "dask": DaskResource()}


def build_definitions(home: str = "") -> Definitions:
    """All definitions, with the data root at ``home`` (empty: ``$CELLRNA_HOME``)."""
    return Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        jobs=[ingest_job, tables_job],
        sensors=[inbox_sensor],
        schedules=[warehouse_refresh_schedule],
        resources=resources(home),
    )
