"""``cell_tracks`` [experiment]: cell tracks with lineage from every timepoint's ``cells`` labels;
``spot_tracks`` [experiment]: RNA spot tracks of live-RNA experiments.

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

``spot_tracks`` reads every timepoint's spot table (``rna_spots``) and, for the appearance
embedding, the RNA channels of the processed image; it tracks each RNA channel with
:func:`cellrna_pipeline.core.tracking.track_spots` and writes
``tables/spot_tracks/<experiment>/spot_tracks.parquet`` (``experiment, track_id, t, z, y,
x, channel, z_um, y_um, x_um, spot_id, intensity``; settings in the schema metadata).
It runs only for experiments registered as live-RNA (``live_rna`` in the experiment
record; run config ``force`` overrides); otherwise it is skipped (not materialized).
Checks: ``check_spot_tracks_no_jump_beyond_gate``, ``check_spot_tracks_every_spot_once``.
"""

import json
import os
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
from cellrna_pipeline.core.experiment import load_experiment
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
    LINEAGE_SCHEMA,
    SPOT_APPEARANCE_SIGMA,
    TrackingConfig,
    ctc_tracks,
    division_problems,
    relabel_frame,
    spot_tracking_config,
    track_jumps,
    track_labels,
    track_spots,
    tracks_table,
)
from cellrna_pipeline.defs.assets.spots import spots_table_path
from cellrna_pipeline.defs.partitions import experiments_partitions
from cellrna_pipeline.defs.resources import DataRootResource

TRACKS_TABLE = "tracks"
LINEAGE_TABLE = "lineage"
SPOT_TRACKS_TABLE = "spot_tracks"
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


# ---------------------------------------------------------------------- spot tracks


class SpotTracksConfig(Config):
    """Run config of ``spot_tracks`` (see ``TrackingConfig`` / ``spot_tracking_config``).

    ``max_displacement_um``: the gate (um per frame). ``use_intensity``: the spots'
    intensity as a cue. ``use_embedding``: the learnt appearance embedding (the shipped
    ``model_registry/spot-embedding``, or ``embedding_model``, a model folder).
    ``force``: track even if the experiment is not registered as live-RNA.
    """

    max_displacement_um: float = 1.5
    max_gap_frames: int = 2
    use_intensity: bool = True
    use_embedding: bool = True
    embedding_model: str | None = None
    force: bool = False


def spot_tracks_path(root: DataRoot, experiment: str):
    return root.tables(SPOT_TRACKS_TABLE, experiment) / "spot_tracks.parquet"


def _read_spot_tables(root: DataRoot, experiment: str, n_frames: int) -> pl.DataFrame:
    resource = DataRootResource(home=str(root.home))
    paths = [spots_table_path(resource, experiment, t) for t in range(n_frames)]
    missing = [t for t, p in enumerate(paths) if not p.exists()]
    if missing:
        raise InputError(
            f"{experiment}: rna_spots missing for timepoint(s) {missing[:10]}; "
            "materialize them first"
        )
    return pl.concat([pl.read_parquet(p) for p in paths], how="vertical_relaxed")


def _with_embeddings(spots: pl.DataFrame, path, meta, embedder, n_frames: int) -> pl.DataFrame:
    """Add each spot's appearance embedding, from its channel of the processed image."""
    parts = []
    for t in range(n_frames):
        rows = spots.filter(pl.col("timepoint") == t)
        if rows.height == 0:
            continue
        volume = read_timepoint(path, t)
        for channel in rows["channel"].unique(maintain_order=True).to_list():
            sub = rows.filter(pl.col("channel") == channel)
            vectors = embedder.embed(
                volume[meta.channel_index(channel)], sub.select("z", "y", "x").to_numpy()
            )
            parts.append(sub.with_columns(pl.Series("embedding", vectors)))
    return pl.concat(parts)


@asset(
    partitions_def=experiments_partitions,
    group_name="tracking",
    kinds={"parquet"},
    deps=[AssetDep(AssetKey("rna_spots"), partition_mapping=AllPartitionMapping())],
    output_required=False,
    description="RNA spot tracks of a live-RNA experiment (spots that persist over frames): "
    "tables/spot_tracks/<experiment>/spot_tracks.parquet (track_id, t, z, y, x, channel, ...). "
    "Skipped for experiments not registered as live-RNA.",
)
def spot_tracks(
    context: AssetExecutionContext, config: SpotTracksConfig, data_root: DataRootResource
):
    experiment = context.partition_key
    root = data_root.root
    record = load_experiment(root, experiment)
    if not (record.live_rna or config.force):
        context.log.info(
            f"{experiment} is not a live-RNA experiment: no spot tracking (ingest with "
            "--live-rna, or run with force: true)"
        )
        return
    start = time.perf_counter()
    path = root.processed(experiment)
    meta = read_image_meta(path)
    n_frames = meta.n_timepoints
    spots = _read_spot_tables(root, experiment, n_frames)
    if spots.height == 0:
        raise InputError(f"{experiment}: no RNA spots in any timepoint; nothing to track")
    tracking_config = spot_tracking_config(
        max_displacement_um=config.max_displacement_um,
        max_gap_frames=config.max_gap_frames,
        intensity_log_sigma=spot_tracking_config().intensity_log_sigma
        if config.use_intensity
        else None,
    )
    model = None
    if config.use_embedding:
        from cellrna_pipeline.core.device import configure_cpu_threads
        from cellrna_pipeline.core.tracking import load_spot_embedder

        embedder = load_spot_embedder(config.embedding_model, device="cpu")
        configure_cpu_threads(min(2, len(os.sched_getaffinity(0))))
        spots = _with_embeddings(spots, path, meta, embedder, n_frames)
        tracking_config = tracking_config.model_copy(
            update={"appearance_sigma": SPOT_APPEARANCE_SIGMA}
        )
        model = str(config.embedding_model or "model_registry/spot-embedding")
    tracks = track_spots(spots, config=tracking_config, n_frames=n_frames).drop(
        "embedding", strict=False
    )
    table = tracks.select(pl.lit(experiment).alias("experiment"), pl.all())
    provenance = {
        "config": tracking_config.model_dump(mode="json"),
        "max_displacement_um": config.max_displacement_um,
        "embedding_model": model,
        "voxel_size_um": list(meta.voxel_size.as_tuple()),
        "n_frames": n_frames,
    }
    _write_parquet(table, spot_tracks_path(root, experiment), provenance)
    lengths = tracks.group_by("track_id").len()["len"]
    per_channel = dict(tracks.group_by("channel").agg(pl.col("track_id").n_unique()).rows())
    yield MaterializeResult(
        metadata={
            "table": MetadataValue.path(str(spot_tracks_path(root, experiment))),
            "n_timepoints": n_frames,
            "n_spots": tracks.height,
            "n_tracks": int(tracks["track_id"].n_unique()),
            "tracks_per_channel": str(per_channel),
            "mean_track_length_frames": round(float(lengths.mean() or 0.0), 2),  # type: ignore[arg-type]
            "embedding": model or "none",
            "seconds": round(time.perf_counter() - start, 3),
        }
    )


def evaluate_spot_jumps(root: DataRoot, experiment: str) -> AssetCheckResult:
    """The jump check on the stored spot tracks of one experiment."""
    path = spot_tracks_path(root, experiment)
    tracks = pl.read_parquet(path)
    gate = float(read_tracking_metadata(path)["max_displacement_um"])
    no_parents = pl.DataFrame(schema=LINEAGE_SCHEMA)
    jumps = track_jumps(tracks, no_parents, max_displacement_um=gate)
    return AssetCheckResult(
        passed=jumps.height == 0,
        metadata={"gate_um_per_frame": gate, "n_jumps": jumps.height},
    )


def evaluate_spot_coverage(root: DataRoot, experiment: str) -> AssetCheckResult:
    """Every spot of the spot tables is in exactly one track, once."""
    path = spot_tracks_path(root, experiment)
    tracks = pl.read_parquet(path)
    n_frames = int(read_tracking_metadata(path)["n_frames"])
    spots = _read_spot_tables(root, experiment, n_frames)
    keys = ["channel", "t", "spot_id"]
    stored = tracks.select(keys)
    expected = spots.select("channel", pl.col("timepoint").cast(pl.Int32).alias("t"), "spot_id")
    duplicated = stored.height - stored.unique().height
    missing = expected.join(stored, on=keys, how="anti").height
    extra = stored.join(expected, on=keys, how="anti").height
    return AssetCheckResult(
        passed=duplicated == 0 and missing == 0 and extra == 0,
        metadata={
            "spots": expected.height,
            "duplicated": duplicated,
            "missing": missing,
            "extra": extra,
        },
    )


@asset_check(
    asset=spot_tracks,
    description="No spot track moves farther than the gate (max_displacement_um per frame elapsed).",
)
def check_spot_tracks_no_jump_beyond_gate(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    return evaluate_spot_jumps(data_root.root, context.partition_key)


@asset_check(
    asset=spot_tracks,
    description="Every spot of the rna_spots tables is in exactly one spot track.",
)
def check_spot_tracks_every_spot_once(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    return evaluate_spot_coverage(data_root.root, context.partition_key)


SPOT_CHECKS = [check_spot_tracks_no_jump_beyond_gate, check_spot_tracks_every_spot_once]
