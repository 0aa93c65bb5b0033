"""The DuckDB warehouse: per-partition Parquet files, loaded by one writer, read with SQL.

Tables and their columns are declared once here (:data:`TABLES`) and documented in
``docs/tables.md``. Writers produce Parquet per partition (atomically); ``load_experiment``
replaces an experiment's rows in ``warehouse.duckdb`` inside one transaction while holding
an exclusive file lock, so concurrent loads queue instead of failing. Readers open the
database read-only.
"""

from __future__ import annotations

import fcntl
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.faults import checkpoint
from cellrna_pipeline.core.io import atomic_path
from cellrna_pipeline.core.paths import DataRoot

_F: type[pl.DataType] = pl.Float64
_I: type[pl.DataType] = pl.Int64
_S: type[pl.DataType] = pl.Utf8
_CENTROID = {"centroid_z_um": _F, "centroid_y_um": _F, "centroid_x_um": _F}
_INTENSITY = {f"mean_intensity_{c}": _F for c in ("nucleus", "cytoplasm", "rna0", "rna1")}


@dataclass(frozen=True)
class TableSpec:
    """A warehouse table: per-volume tables are keyed by (experiment, timepoint)."""

    name: str
    per_volume: bool
    columns: dict[str, type[pl.DataType]]
    description: str
    aliases: dict[str, str] = field(default_factory=dict)
    """Column names of producers' Parquet files that mean one of ours (``t`` -> ``timepoint``)."""

    @property
    def schema(self) -> dict[str, type[pl.DataType]]:
        keys: dict[str, type[pl.DataType]] = {"experiment": _S}
        if self.per_volume:
            keys["timepoint"] = _I
        return {**keys, **self.columns}


TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in [
        TableSpec(
            "volumes",
            True,
            {
                "size_z": _I,
                "size_y": _I,
                "size_x": _I,
                "n_channels": _I,
                "voxel_z_um": _F,
                "voxel_y_um": _F,
                "voxel_x_um": _F,
                "drift_z_um": _F,
                "drift_y_um": _F,
                "drift_x_um": _F,
                "n_cells": _I,
                "n_spots": _I,
            },
            "one row per stored volume (experiment x timepoint)",
        ),
        TableSpec(
            "cells",
            True,
            {
                "cell_id": _I,
                "track_id": _I,
                **_CENTROID,
                "volume_um3": _F,
                "surface_um2": _F,
                "sphericity": _F,
                "nucleus_volume_um3": _F,
                "nucleus_to_cell_volume_ratio": _F,
                **_INTENSITY,
            },
            "one row per cell per timepoint",
        ),
        TableSpec(
            "nuclei",
            True,
            {
                "cell_id": _I,
                **_CENTROID,
                "volume_um3": _F,
                "surface_um2": _F,
                "sphericity": _F,
                "mean_intensity_nucleus": _F,
            },
            "one row per nucleus per timepoint (cell_id of its cell)",
        ),
        TableSpec(
            "spots",
            True,
            {
                "channel": _S,
                "spot_id": _I,
                "z": _F,
                "y": _F,
                "x": _F,
                "z_um": _F,
                "y_um": _F,
                "x_um": _F,
                "intensity": _F,
                "score": _F,
                "size_voxels": _I,
                "cell_id": _I,
                "compartment": _S,
                "distance_to_nucleus_um": _F,
            },
            "one row per RNA spot; compartment in 'nucleus' | 'cytoplasm' | 'outside'",
        ),
        TableSpec(
            "tracks",
            False,
            {
                "track_id": _I,
                "timepoint": _I,
                "cell_id": _I,
                **_CENTROID,
                "volume_um3": _F,
            },
            "one row per track per timepoint (napari-style points of each track)",
            aliases={
                "t": "timepoint",
                "label": "cell_id",
                "z_um": "centroid_z_um",
                "y_um": "centroid_y_um",
                "x_um": "centroid_x_um",
            },
        ),
        TableSpec(
            "lineage",
            False,
            {
                "track_id": _I,
                "begin": _I,
                "end": _I,
                "parent_track_id": _I,
                "n_detections": _I,
            },
            "one row per track, CTC res_track.txt semantics (parent 0 = none)",
            aliases={
                "begin_t": "begin",
                "end_t": "end",
                "label": "track_id",
                "parent_label": "parent_track_id",
            },
        ),
        TableSpec(
            "cell_behavior",
            False,
            {
                "track_id": _I,
                "n_frames": _I,
                "first_timepoint": _I,
                "last_timepoint": _I,
                "duration_min": _F,
                "path_length_um": _F,
                "displacement_um": _F,
                "mean_speed_um_per_min": _F,
                "straightness": _F,
                "msd_lag1_um2": _F,
                "msd_alpha": _F,
                "volume_change_per_frame": _F,
            },
            "motion and morphology change per track",
        ),
        TableSpec(
            "rna_localization",
            True,
            {
                "cell_id": _I,
                "channel": _S,
                "n_spots": _I,
                "n_nucleus": _I,
                "n_cytoplasm": _I,
                "nuclear_fraction": _F,
                "mean_distance_to_nucleus_um": _F,
                "median_distance_to_nucleus_um": _F,
                "polarization_index": _F,
                "dispersion_index": _F,
            },
            "RNA counts and localization per cell, channel and timepoint",
        ),
        TableSpec(
            "colocalization",
            True,
            {
                "cell_id": _I,
                "channel_a": _S,
                "channel_b": _S,
                "n_a": _I,
                "n_b": _I,
                "n_colocalized": _I,
                "fraction_a_colocalized": _F,
                "fraction_b_colocalized": _F,
                "expected_fraction_a_by_chance": _F,
                "enrichment": _F,
                "max_distance_um": _F,
            },
            "two-channel colocalization per cell and timepoint, with the chance level",
        ),
        TableSpec(
            "experiment_summary",
            False,
            {
                "n_timepoints": _I,
                "frame_interval_s": _F,
                "n_tracks": _I,
                "n_divisions": _I,
                "division_rate_per_cell_hour": _F,
                "cell_cycle_length_h": _F,
                "mean_cells": _F,
                "n_spots": _I,
                "mean_spots_per_cell": _F,
                "mean_nuclear_fraction": _F,
            },
            "one row per experiment",
        ),
    ]
}


def _spec(table: str) -> TableSpec:
    if table not in TABLES:
        raise InputError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
    return TABLES[table]


def partition_path(
    root: DataRoot, table: str, experiment: str, timepoint: int | None = None
) -> Path:
    """Parquet file of one partition: ``tables/<table>/<experiment>/t0005.parquet`` for
    per-volume tables, ``.../<experiment>/all.parquet`` otherwise."""
    spec = _spec(table)
    if spec.per_volume != (timepoint is not None):
        raise ValueError(f"table {table} {'needs' if spec.per_volume else 'takes no'} timepoint")
    name = f"t{timepoint:04d}.parquet" if timepoint is not None else "all.parquet"
    return root.tables(table, experiment) / name


def conform(
    table: str, df: pl.DataFrame, experiment: str, timepoint: int | None = None
) -> pl.DataFrame:
    """Add the key columns and return exactly the table's columns in order and types
    (known aliases renamed, missing columns null, extra columns dropped). ``timepoint``
    overrides the frame's own ``timepoint`` column where given."""
    spec = _spec(table)
    renames = {a: c for a, c in spec.aliases.items() if a in df.columns and c not in df.columns}
    df = df.rename(renames).with_columns(pl.lit(experiment).alias("experiment"))
    if timepoint is not None:
        df = df.with_columns(pl.lit(timepoint).alias("timepoint"))
    return df.select(
        [
            (pl.col(c) if c in df.columns else pl.lit(None)).cast(dtype).alias(c)
            for c, dtype in spec.schema.items()
        ]
    )


def write_partition(
    root: DataRoot, table: str, experiment: str, df: pl.DataFrame, timepoint: int | None = None
) -> Path:
    """Write one partition's rows as Parquet (temp file + rename). Returns the path."""
    path = partition_path(root, table, experiment, timepoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        conform(table, df, experiment, timepoint).write_parquet(tmp)
    return path


def read_partitions(root: DataRoot, table: str, experiment: str) -> pl.DataFrame:
    """All Parquet partitions of one experiment's table as their producers wrote them
    (empty frame with the schema if none); :func:`conform` gives the warehouse's columns."""
    folder = root.tables(table, experiment)
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    if not files:
        return pl.DataFrame(schema=_spec(table).schema)
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")


@contextmanager
def _writer_lock(root: DataRoot) -> Iterator[None]:
    """Exclusive lock for the single warehouse writer (blocks until free)."""
    lock_path = root.home / "warehouse.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ddl(spec: TableSpec) -> str:
    kinds = {_F: "DOUBLE", _I: "BIGINT", _S: "VARCHAR"}
    cols = ", ".join(f'"{c}" {kinds[t]}' for c, t in spec.schema.items())
    return f'CREATE TABLE IF NOT EXISTS "{spec.name}" ({cols})'


def _connect(path: Path, *, read_only: bool, timeout_s: float = 60.0):
    """Open DuckDB, retrying while another process holds the file lock."""
    import duckdb

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise InputError(f"warehouse {path} is busy: {str(exc).splitlines()[0]}") from None
            time.sleep(0.2)


def load_experiment(
    root: DataRoot, experiment: str, tables: list[str] | None = None
) -> dict[str, int]:
    """Replace an experiment's rows in ``warehouse.duckdb`` with its Parquet partitions.

    Idempotent: loading twice gives the same rows. One transaction for all tables, under
    an exclusive lock (one writer at a time). Returns rows loaded per table.
    """
    counts: dict[str, int] = {}
    with _writer_lock(root):
        con = _connect(root.warehouse, read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            for name in tables or list(TABLES):
                spec = TABLES[name]
                con.execute(_ddl(spec))
                con.execute(f'DELETE FROM "{name}" WHERE experiment = ?', [experiment])
                df = read_partitions(root, name, experiment)
                if df.height:
                    arrow = conform(name, df, experiment).to_arrow()
                    con.register("incoming", arrow)
                    con.execute(f'INSERT INTO "{name}" SELECT * FROM incoming')
                    con.unregister("incoming")
                counts[name] = df.height
            checkpoint("warehouse.before_commit")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
    return counts


_WRITE = re.compile(
    r"^\s*(insert|update|delete|create|drop|alter|attach|detach|copy|install|load|pragma|set|call|checkpoint|vacuum|export|import)\b",
    re.IGNORECASE,
)


READ_ONLY_MESSAGE = "the warehouse is read-only here: only SELECT / WITH / DESCRIBE / SHOW queries"


def query(
    root: DataRoot, sql: str, params: dict[str, object] | list[object] | None = None
) -> pl.DataFrame:
    """Run one read-only SQL statement against the warehouse and return the result.

    Parameters
    ----------
    root : the data root holding ``warehouse.duckdb``.
    sql : one statement; values come in as placeholders (``$experiment`` or ``?``), never
        formatted into the text.
    params : the placeholders' values (a dict for ``$name``, a list for ``?``).

    Examples
    --------
    >>> query(root, "SELECT * FROM cells WHERE experiment = $e", {"e": name})  # doctest: +SKIP

    Raises
    ------
    InputError : no warehouse yet, a write statement, an unknown table or column, a
        syntax error: one line naming the problem.
    """
    import duckdb

    if not sql.strip():
        raise InputError("empty SQL statement")
    if _WRITE.match(sql):
        raise InputError(READ_ONLY_MESSAGE)
    if not root.warehouse.exists():
        raise InputError(
            f"no warehouse at {root.warehouse}; run 'cellrna demo' or 'cellrna materialize' first"
        )
    con = _connect(root.warehouse, read_only=True)
    try:
        relation = con.sql(sql, params=params)
        if relation is None:  # a statement without a result
            return pl.DataFrame()
        return pl.DataFrame(pl.from_arrow(relation.to_arrow_table()))
    except duckdb.Error as exc:
        msg = str(exc).splitlines()[0]
        if "read-only" in msg.lower():  # e.g. a write after a SELECT in one string
            raise InputError(READ_ONLY_MESSAGE) from None
        if not isinstance(exc, duckdb.CatalogException):
            raise InputError(msg) from None
        if "Table with name" in msg:
            known = [r[0] for r in con.execute("SHOW TABLES").fetchall()]
            msg += f" (tables: {', '.join(known)})"
        raise InputError(msg) from None
    finally:
        con.close()


def table_doc_markdown() -> str:
    """The schema of every table as markdown (``docs/tables.md`` is generated from it)."""
    lines = []
    for spec in TABLES.values():
        key = "(experiment, timepoint)" if spec.per_volume else "(experiment)"
        lines += [f"## `{spec.name}`", "", f"{spec.description}; partition key {key}.", ""]
        lines += ["| column | type |", "|---|---|"]
        lines += [f"| `{c}` | {t} |" for c, t in spec.schema.items()]
        lines.append("")
    return "\n".join(lines)
