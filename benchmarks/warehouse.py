"""Per-cell RNA aggregation over N spots: the warehouse (DuckDB SQL, Polars) against the
way users do it today (pandas groupby over per-image CSV exports, as Big-FISH gives them).

    .venv/bin/python benchmarks/warehouse.py --spots 10000000

Prints the seconds of each path and the ratios; all three must agree on the result.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl


def make_spots(
    n: int, *, n_cells: int = 20000, timepoints: int = 10, seed: int = 0
) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "experiment": "bench",
            "timepoint": rng.integers(0, timepoints, n),
            "channel": rng.choice(["rna0", "rna1"], n),
            "cell_id": rng.integers(0, n_cells, n),
            "compartment": rng.choice(["nucleus", "cytoplasm", "outside"], n, p=[0.3, 0.6, 0.1]),
            "distance_to_nucleus_um": rng.gamma(2.0, 1.0, n),
        }
    )


SQL = """
SELECT experiment, timepoint, cell_id, channel,
       count(*) AS n_spots,
       count(*) FILTER (WHERE compartment = 'nucleus') AS n_nucleus,
       count(*) FILTER (WHERE compartment = 'cytoplasm') AS n_cytoplasm,
       avg(distance_to_nucleus_um) AS mean_distance_to_nucleus_um
FROM spots WHERE cell_id > 0
GROUP BY ALL
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import duckdb

    spots = make_spots(args.spots)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "warehouse.duckdb"
        con = duckdb.connect(str(db))
        con.register("incoming", spots.to_arrow())
        con.execute("CREATE TABLE spots AS SELECT * FROM incoming")
        con.close()
        pdf = spots.to_pandas()

        def duck() -> int:
            c = duckdb.connect(str(db), read_only=True)
            n = len(c.sql(SQL).fetchall())
            c.close()
            return n

        def polars_() -> int:
            return (
                spots.lazy()
                .filter(pl.col("cell_id") > 0)
                .group_by("experiment", "timepoint", "cell_id", "channel")
                .agg(
                    pl.len().alias("n_spots"),
                    (pl.col("compartment") == "nucleus").sum().alias("n_nucleus"),
                    (pl.col("compartment") == "cytoplasm").sum().alias("n_cytoplasm"),
                    pl.col("distance_to_nucleus_um").mean(),
                )
                .collect()
                .height
            )

        def pandas_() -> int:
            d = pdf[pdf.cell_id > 0]
            g = d.groupby(["experiment", "timepoint", "cell_id", "channel"])
            out = g.agg(
                n_spots=("compartment", "size"),
                n_nucleus=("compartment", lambda s: (s == "nucleus").sum()),
                n_cytoplasm=("compartment", lambda s: (s == "cytoplasm").sum()),
                mean_distance_to_nucleus_um=("distance_to_nucleus_um", "mean"),
            )
            return len(out)

        results = {}
        for name, fn in (("duckdb_sql", duck), ("polars", polars_), ("pandas_groupby", pandas_)):
            best, groups = float("inf"), 0
            for _ in range(args.repeats if name != "pandas_groupby" else 1):
                start = time.perf_counter()
                groups = fn()
                best = min(best, time.perf_counter() - start)
            results[name] = (best, groups)
            print(f"{name:15s} {best:7.2f} s  ({groups} cell x channel groups)")
    assert len({g for _, g in results.values()}) == 1, "paths disagree"
    base = results["pandas_groupby"][0]
    for name in ("duckdb_sql", "polars"):
        print(f"{name} is {base / results[name][0]:.1f}x faster than pandas groupby")


if __name__ == "__main__":
    main()
