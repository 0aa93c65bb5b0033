"""``cellrna sql "SELECT ..." [--format table|csv|parquet] [--out FILE]``: read-only SQL."""

from __future__ import annotations

import argparse
import sys

from cellrna_pipeline.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sql",
        help="query the warehouse (read-only SQL)",
        description="Run one read-only SQL query "
        "against $CELLRNA_HOME/warehouse.duckdb. Tables: volumes, cells, nuclei, spots, tracks, "
        "lineage, cell_behavior, rna_localization, colocalization, experiment_summary (docs/tables.md).",
    )
    p.add_argument("query", help='e.g. "SELECT cell_id, n_spots FROM rna_localization LIMIT 5"')
    p.add_argument("--format", choices=("table", "csv", "parquet"), default="table")
    p.add_argument("--out", help="write the result to this file (required for parquet)")
    p.add_argument("--home", help="data root (default: $CELLRNA_HOME, else ./cellrna_home)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import polars as pl

    from cellrna_pipeline.core.io import atomic_path
    from cellrna_pipeline.core.paths import DataRoot
    from cellrna_pipeline.integrations.warehouse import query

    if args.format == "parquet" and not args.out:
        raise InputError("--format parquet needs --out FILE")
    result = query(DataRoot.from_env(args.home), args.query)
    if args.out:
        out = Path(args.out)
        if not out.parent.exists():
            raise InputError(f"folder {out.parent} does not exist")
        with atomic_path(out) as tmp:
            if args.format == "parquet":
                result.write_parquet(tmp)
            else:
                result.write_csv(tmp)
        print(f"wrote {result.height} rows to {out}")
    elif args.format == "csv":
        sys.stdout.write(result.write_csv())
    else:
        with pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=160):
            print(result)
    return 0
