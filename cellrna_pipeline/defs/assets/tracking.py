"""``cell_tracks`` [experiment]: cell tracks with lineage from every timepoint's ``cells`` labels.

Reads the label image ``cells`` of ``processed/<experiment>.ome.zarr`` (written per
volume by ``cell_masks``) for every timepoint, tracks with
:func:`cellrna_pipeline.core.tracking.track_labels`, and writes

- the label image ``tracks`` (same container, ids = track ids, one timepoint at a time);
- ``tables/tracks/<experiment>/tracks.parquet``: one row per cell and timepoint
  (``experiment, track_id, t, z, y, x`` in voxels, ``z_um, y_um, x_um``, ``label`` in
  ``cells``, ``volume_um3``), napari-compatible; the tracking settings and the gate used
  are in the Parquet schema metadata (key ``cellrna.tracking``);
- ``tables/lineage/<experiment>/lineage.parquet``: one row per track (``experiment,
  track_id, begin_t, end_t, parent_track_id, n_detections``);
- ``ctc/<experiment>/``: a Cell Tracking Challenge result (``mask###.tif`` + ``res_track.txt``).

Checks: ``check_cell_tracks_no_jump_beyond_gate`` and
``check_cell_tracks_divisions_two_daughters``.
"""

import json
import time

import numpy as np
import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io import (
    atomic_path,
    create_labels,
    list_labels,
    read_image_meta,
    read_label_timepoint,
    read_timepoint,
    timepoints_written,
    write_label_timepoint,
)
from cellrna_pipeline.core.io.ctc import write_ctc_result
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.core.tracking import (
    TrackingConfig,
    ctc_tracks,
    division_problems,
    relabel_frame,
    track_jumps,
    track_labels,
    tracks_table,
)
from cellrna_pipeline.defs.partitions import experiments_partitions
from cellrna_pipeline.defs.resources import DataRootResource

TRACKS_TABLE = "tracks"
LINEAGE_TABLE = "lineage"
METADATA_KEY = b"cellrna.tracking"


class CellTracksConfig(Config):
    """Run config of ``cell_tracks`` (see ``TrackingConfig`` for the meaning).

    ``max_displacement_um``: the gate (um per frame; default: one median cell length).
    ``use_intensity``: add the mean intensity of the ``nucleus`` channel as a cue.
    """

    max_displacement_um: float | None = None
    max_gap_frames: int = 2
    divisions: bool = True
    use_intensity: bool = False


def tracks_path(root: DataRoot, experiment: str):
    return root.tables(TRACKS_TABLE, experiment) / "tracks.parquet"


def lineage_path(root: DataRoot, experiment: str):
    return root.tables(LINEAGE_TABLE, experiment) / "lineage.parquet"


def ctc_path(root: DataRoot, experiment: str):
    return root.home / "ctc" / experiment


def _write_parquet(frame: pl.DataFrame, path, metadata: dict) -> None:
    import pyarrow.parquet as pq

    table = frame.to_arrow()
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_tracking_metadata(path) -> dict:
    """The ``cellrna.tracking`` schema metadata of a tracks/lineage Parquet file."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise InputError(f"{path}: no tracking metadata ({METADATA_KEY.decode()})")
    return json.loads(meta[METADATA_KEY])


@asset(
    partitions_def=experiments_partitions,
    group_name="tracking",
    kinds={"ome-zarr", "parquet"},
    deps=[AssetDep(AssetKey("cell_masks"), partition_mapping=AllPartitionMapping())],
    description="Cell tracks with divisions over all timepoints of an experiment: label image "
    "'tracks' in processed/<experiment>.ome.zarr, Parquet tables tracks and lineage, and a "
    "CTC result folder ctc/<experiment>/.",
)
def cell_tracks(
    context: AssetExecutionContext, config: CellTracksConfig, data_root: DataRootResource
) -> MaterializeResult:
    experiment = context.partition_key
    root = data_root.root
    path = root.processed(experiment)
    start = time.perf_counter()
    if not path.exists():
        raise InputError(f"no processed image for experiment {experiment!r} at {path}")
    if "cells" not in list_labels(path):
        raise InputError(f"{path}: no 'cells' labels yet; materialize cell_masks first")
    meta = read_image_meta(path)
    n_frames = meta.n_timepoints
    missing = sorted(set(range(n_frames)) - set(timepoints_written(path, label="cells")))
    if missing:
        raise InputError(
            f"{path}: cell_masks missing for timepoint(s) {missing[:10]}; materialize them first"
        )
    tracking_config = TrackingConfig(
        max_displacement_um=config.max_displacement_um,
        max_gap_frames=config.max_gap_frames,
        divisions=config.divisions,
        intensity_log_sigma=0.3 if config.use_intensity else None,
    )
    intensity = None
    if config.use_intensity:
        c = meta.channel_index("nucleus")
        intensity = (read_timepoint(path, t)[c] for t in range(n_frames))
    result = track_labels(
        (read_label_timepoint(path, "cells", t)[0] for t in range(n_frames)),
        voxel_size=meta.voxel_size,
        config=tracking_config,
        intensity_tzyx=intensity,
    )
    context.log.info(
        f"{result.detections.height} cells in {n_frames} timepoints -> {result.lineage.height} tracks"
    )

    # Label image 'tracks', one timepoint at a time.
    create_labels(path, "tracks", dtype="uint32")
    for t in range(n_frames):
        cells = read_label_timepoint(path, "cells", t)[0]
        write_label_timepoint(path, "tracks", t, relabel_frame(cells, result, t))

    # Tables, with the settings that made them.
    provenance = {
        "config": tracking_config.model_dump(mode="json"),
        "max_displacement_um": result.max_displacement_um,
        "voxel_size_um": list(meta.voxel_size.as_tuple()),
        "n_frames": n_frames,
    }
    table = tracks_table(result).select(pl.lit(experiment).alias("experiment"), pl.all())
    lineage = result.lineage.select(pl.lit(experiment).alias("experiment"), pl.all())
    _write_parquet(table, tracks_path(root, experiment), provenance)
    _write_parquet(lineage, lineage_path(root, experiment), provenance)

    # CTC export.
    assignment, ctc_lineage = ctc_tracks(result)

    def ctc_frames():
        for t in range(n_frames):
            rows = assignment.filter(pl.col("t") == t)
            cells = read_label_timepoint(path, "cells", t)[0]
            lut = np.zeros(int(max(cells.max(initial=0), rows["label"].max() or 0)) + 1, np.uint32)
            lut[rows["label"].to_numpy().astype(np.int64)] = rows["ctc_label"].to_numpy()
            yield lut[cells]

    ctc_dir = write_ctc_result(
        ctc_path(root, experiment), ctc_frames(), ctc_lineage, n_frames=n_frames
    )

    n_div = int((result.lineage["parent_track_id"] > 0).sum()) // 2
    lengths = result.lineage["end_t"] - result.lineage["begin_t"] + 1
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "tracks_table": MetadataValue.path(str(tracks_path(root, experiment))),
            "lineage_table": MetadataValue.path(str(lineage_path(root, experiment))),
            "ctc_folder": MetadataValue.path(str(ctc_dir)),
            "n_timepoints": n_frames,
            "n_cells": result.detections.height,
            "n_tracks": result.lineage.height,
            "n_divisions": n_div,
            "mean_track_length_frames": float(lengths.mean() or 0.0),  # type: ignore[arg-type]
            "max_displacement_um": round(result.max_displacement_um, 3),
            "max_drift_um": float(np.abs(result.drift_zyx_um).max(initial=0.0)),
            "seconds": round(time.perf_counter() - start, 3),
        }
    )


def _tables(root: DataRoot, experiment: str):
    tpath = tracks_path(root, experiment)
    return pl.read_parquet(tpath), pl.read_parquet(lineage_path(root, experiment)), tpath


def evaluate_jumps(root: DataRoot, experiment: str) -> AssetCheckResult:
    """The jump check on the stored tables of one experiment."""
    tracks, lineage, tpath = _tables(root, experiment)
    gate = float(read_tracking_metadata(tpath)["max_displacement_um"])
    jumps = track_jumps(tracks, lineage, max_displacement_um=gate)
    return AssetCheckResult(
        passed=jumps.height == 0,
        metadata={
            "gate_um_per_frame": gate,
            "n_jumps": jumps.height,
            "worst": str(jumps.sort("distance_um", descending=True).head(3).to_dicts()),
        },
    )


def evaluate_divisions(root: DataRoot, experiment: str) -> AssetCheckResult:
    """The division check on the stored lineage of one experiment."""
    _, lineage, _ = _tables(root, experiment)
    problems = division_problems(lineage)
    n_div = int((lineage["parent_track_id"] > 0).sum()) // 2
    return AssetCheckResult(
        passed=not problems,
        metadata={"n_divisions": n_div, "problems": "; ".join(problems[:5]) or "none"},
    )


@asset_check(
    asset=cell_tracks,
    description="No link moves farther than the gate (max_displacement_um per frame elapsed; "
    "one gate from a parent to its daughters).",
)
def check_cell_tracks_no_jump_beyond_gate(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    return evaluate_jumps(data_root.root, context.partition_key)


@asset_check(
    asset=cell_tracks,
    description="Every division has one parent and exactly two daughters that begin the frame "
    "after the parent ends.",
)
def check_cell_tracks_divisions_two_daughters(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    return evaluate_divisions(data_root.root, context.partition_key)


CHECKS = [check_cell_tracks_no_jump_beyond_gate, check_cell_tracks_divisions_two_daughters]
