"""Statistics tables [experiment] and their load into the DuckDB warehouse."""

import time
from collections.abc import Iterator

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from cellrna_pipeline.core.analysis.tables import experiment_tables, volume_tables
from cellrna_pipeline.core.io import (
    list_labels,
    read_image_meta,
    read_label_timepoint,
    read_timepoint,
)
from cellrna_pipeline.core.preview import markdown_table
from cellrna_pipeline.defs.partitions import experiments_partitions
from cellrna_pipeline.defs.resources import DataRootResource
from cellrna_pipeline.integrations.warehouse import (
    TABLES,
    conform,
    load_experiment,
    query,
    read_partitions,
    write_partition,
)

DERIVED_TABLES = (
    "volumes",
    "cells",
    "nuclei",
    "rna_localization",
    "colocalization",
    "cell_behavior",
    "experiment_summary",
)
_ALL_VOLUMES = AllPartitionMapping()
_UPSTREAM = [
    AssetDep(AssetKey("cell_tracks")),
    AssetDep(AssetKey("rna_spots"), partition_mapping=_ALL_VOLUMES),
    AssetDep(AssetKey("cell_masks"), partition_mapping=_ALL_VOLUMES),
    AssetDep(AssetKey("preprocessed_volume"), partition_mapping=_ALL_VOLUMES),
]


def _lineage(root, experiment: str) -> pl.DataFrame:
    """The tracker's lineage table with the warehouse's column names."""
    return conform("lineage", read_partitions(root, "lineage", experiment), experiment)


@multi_asset(
    specs=[
        AssetSpec(AssetKey(["tables", name]), deps=_UPSTREAM, description=TABLES[name].description)
        for name in DERIVED_TABLES
    ],
    partitions_def=experiments_partitions,
    group_name="statistics",
    name="statistics_tables",
)
def statistics_tables(
    context: AssetExecutionContext, data_root: DataRootResource
) -> Iterator[MaterializeResult]:
    """Per-cell features, RNA localization and colocalization per timepoint, then track
    behaviour and the experiment summary, as Parquet partitions under ``tables/``."""
    experiment = context.partition_key
    root = data_root.root
    record = data_root.experiment(experiment)
    path = root.processed(experiment)
    meta = read_image_meta(path)
    has_tracks = "tracks" in list_labels(path)
    spots_all = read_partitions(root, "spots", experiment)
    start = time.perf_counter()
    per_volume: dict[str, list[pl.DataFrame]] = {}
    for t in range(record.n_timepoints):
        tables = volume_tables(
            image=read_timepoint(path, t),
            cells=read_label_timepoint(path, "cells", t)[0],
            nuclei=read_label_timepoint(path, "nuclei", t)[0],
            tracks=read_label_timepoint(path, "tracks", t)[0] if has_tracks else None,
            spots=spots_all.filter(pl.col("timepoint") == t),
            voxel_size=meta.voxel_size,
            channel_names=meta.channel_names,
        )
        for name, df in tables.items():
            write_partition(root, name, experiment, df, timepoint=t)
            per_volume.setdefault(name, []).append(df.with_columns(pl.lit(t).alias("timepoint")))
    cells = pl.concat(per_volume["cells"], how="diagonal_relaxed")
    loc = pl.concat(per_volume["rna_localization"], how="diagonal_relaxed")
    exp_tables = experiment_tables(
        cells,
        _lineage(root, experiment),
        loc,
        n_timepoints=record.n_timepoints,
        frame_interval_s=record.frame_interval_s or 1.0,
    )
    for name, df in exp_tables.items():
        write_partition(root, name, experiment, df)
    seconds = round(time.perf_counter() - start, 2)
    for name in DERIVED_TABLES:
        rows = (
            sum(df.height for df in per_volume[name])
            if name in per_volume
            else exp_tables[name].height
        )
        yield MaterializeResult(
            asset_key=AssetKey(["tables", name]),
            metadata={
                "rows": rows,
                "path": MetadataValue.path(str(root.tables(name, experiment))),
                "seconds": seconds,
            },
        )


@asset(
    deps=[*[AssetKey(["tables", n]) for n in DERIVED_TABLES], *_UPSTREAM],
    partitions_def=experiments_partitions,
    group_name="statistics",
    kinds={"duckdb"},
    check_specs=[
        AssetCheckSpec(
            "check_warehouse_row_counts",
            asset="warehouse",
            description="cells rows per timepoint equal the labels in the masks",
        ),
        AssetCheckSpec(
            "check_warehouse_spots_in_known_cells",
            asset="warehouse",
            description="no spot assigned to a missing cell",
        ),
    ],
    description="All tables of the experiment loaded into warehouse.duckdb (one writer; "
    "the experiment's rows replaced in one transaction).",
)
def warehouse(context: AssetExecutionContext, data_root: DataRootResource) -> Iterator:
    experiment = context.partition_key
    root = data_root.root
    counts = load_experiment(root, experiment)
    by_experiment = {"experiment": experiment}
    summary = query(
        root, "SELECT * FROM experiment_summary WHERE experiment = $experiment", by_experiment
    )
    yield MaterializeResult(
        metadata={
            **{f"rows_{k}": v for k, v in counts.items()},
            "warehouse": MetadataValue.path(str(root.warehouse)),
            "summary": MetadataValue.md(markdown_table(summary)),
        }
    )
    # Checks read back from the warehouse what users will query.
    path = root.processed(experiment)
    record = data_root.experiment(experiment)
    rows = dict(
        query(
            root,
            "SELECT timepoint, count(*) FROM cells WHERE experiment = $experiment GROUP BY 1",
            by_experiment,
        ).rows()
    )
    mismatched = []
    for t in range(record.n_timepoints):
        labels = read_label_timepoint(path, "cells", t)[0]
        n = len(set(labels.ravel().tolist()) - {0})
        if rows.get(t, 0) != n:
            mismatched.append(f"t{t}: {rows.get(t, 0)} rows vs {n} labels")
    yield AssetCheckResult(
        check_name="check_warehouse_row_counts",
        passed=not mismatched,
        metadata={"mismatches": ", ".join(mismatched) or "none"},
    )
    orphans = query(
        root,
        """SELECT count(*) FROM spots s WHERE s.experiment = $experiment AND s.cell_id > 0
            AND NOT EXISTS (SELECT 1 FROM cells c WHERE c.experiment = s.experiment
                            AND c.timepoint = s.timepoint AND c.cell_id = s.cell_id)""",
        by_experiment,
    ).item()
    yield AssetCheckResult(
        check_name="check_warehouse_spots_in_known_cells",
        passed=orphans == 0,
        metadata={"orphan_spots": int(orphans)},
    )
