"""Consistency checks of stored tracking tables (used by the asset checks and the tests)."""

from __future__ import annotations

import numpy as np
import polars as pl

__all__ = ["division_problems", "track_jumps"]


def track_jumps(
    tracks: pl.DataFrame, lineage: pl.DataFrame, *, max_displacement_um: float
) -> pl.DataFrame:
    """Links that move farther than the gate allows.

    A link within a track spanning ``dt`` frames may move ``dt * max_displacement_um``; a
    division link (parent's last position to a daughter's first) ``max_displacement_um``.

    Parameters
    ----------
    tracks : one row per detection with ``track_id``, ``t``, ``z_um``, ``y_um``, ``x_um``
        (e.g. :func:`~cellrna_pipeline.core.tracking.tracks_table`).
    lineage : ``track_id``, ``parent_track_id`` (0 = none).
    max_displacement_um : the gate, um per frame.

    Returns
    -------
    polars.DataFrame with ``track_id``, ``t_from``, ``t_to``, ``distance_um``,
    ``allowed_um``, one row per violating link (empty when none).
    """
    d = tracks.sort("track_id", "t")
    tid = d["track_id"].to_numpy().astype(np.int64)
    t = d["t"].to_numpy().astype(np.int64)
    pos = d.select("z_um", "y_um", "x_um").to_numpy().astype(np.float64)
    same = tid[1:] == tid[:-1]
    src = np.flatnonzero(same)
    dst = src + 1
    allowed = (t[dst] - t[src]) * max_displacement_um
    # division links: parent's last detection -> each daughter's first
    first = np.flatnonzero(np.r_[True, ~same])
    last = np.r_[first[1:] - 1, len(tid) - 1] if len(tid) else first
    first_of = dict(zip(tid[first].tolist(), first.tolist(), strict=True))
    last_of = dict(zip(tid[last].tolist(), last.tolist(), strict=True))
    par = lineage.filter(pl.col("parent_track_id") > 0)
    div_src, div_dst = [], []
    for child, parent in par.select("track_id", "parent_track_id").iter_rows():
        if int(child) in first_of and int(parent) in last_of:
            div_src.append(last_of[int(parent)])
            div_dst.append(first_of[int(child)])
    src = np.r_[src, np.asarray(div_src, np.int64)]
    dst = np.r_[dst, np.asarray(div_dst, np.int64)]
    allowed = np.r_[allowed, np.full(len(div_src), max_displacement_um)]
    dist = np.sqrt(((pos[dst] - pos[src]) ** 2).sum(axis=1)) if len(src) else np.zeros(0)
    bad = dist > allowed * (1 + 1e-9)
    return pl.DataFrame(
        {
            "track_id": tid[dst[bad]].astype(np.uint32),
            "t_from": t[src[bad]].astype(np.int32),
            "t_to": t[dst[bad]].astype(np.int32),
            "distance_um": dist[bad],
            "allowed_um": allowed[bad],
        }
    )


def division_problems(lineage: pl.DataFrame) -> list[str]:
    """Divisions that are not one parent -> two daughters beginning right after it ends.

    Parameters
    ----------
    lineage : ``track_id``, ``begin_t``, ``end_t``, ``parent_track_id`` (0 = none).

    Returns
    -------
    One line per problem (empty when every division is well formed).
    """
    problems: list[str] = []
    spans = {
        int(r[0]): (int(r[1]), int(r[2]))
        for r in lineage.select("track_id", "begin_t", "end_t").iter_rows()
    }
    children = (
        lineage.filter(pl.col("parent_track_id") > 0)
        .group_by("parent_track_id")
        .agg(pl.col("track_id"), pl.col("begin_t"))
        .sort("parent_track_id")
    )
    for parent, kids, begins in children.iter_rows():
        if len(kids) != 2:
            problems.append(f"track {parent} has {len(kids)} daughter(s) {sorted(kids)}")
        if int(parent) not in spans:
            problems.append(f"track {parent} is a parent but not a track")
            continue
        end = spans[int(parent)][1]
        late = [k for k, b in zip(kids, begins, strict=True) if b != end + 1]
        if late:
            problems.append(f"daughter(s) {late} of track {parent} do not begin at frame {end + 1}")
    return problems
