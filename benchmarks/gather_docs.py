"""Rebuild ``docs/benchmarks.md`` from the per-stage files in ``docs/benchmarks/``.

Each benchmark script writes (or its results are copied into) its stage's file; this
script puts them together in pipeline order under one header::

    .venv/bin/python benchmarks/gather_docs.py
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
STAGES = ("preprocess", "spots", "cells", "tracking", "warehouse")
HEADER = (
    "# Benchmarks\n\n"
    "Every figure comes from a script under `benchmarks/` that runs our method and the peer "
    "side by side in the same process; the command is given with each table. Machine: the "
    "project's 2-core, no-GPU machine, shared with other jobs while these ran (times are "
    "pessimistic; ratios are from the same run). Peers are in the `bench` extra: "
    "`pip install -e '.[dev,bench]'`. This file is gathered from `docs/benchmarks/*.md` by "
    "`benchmarks/gather_docs.py`.\n"
)


def main() -> int:
    parts = [HEADER] + [
        (DOCS / "benchmarks" / f"{s}.md").read_text().strip() + "\n" for s in STAGES
    ]
    out = DOCS / "benchmarks.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n\n".join(parts))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
