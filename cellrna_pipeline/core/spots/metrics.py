"""Scoring detected spots against ground truth: one-to-one (Hungarian) matching in a radius.

Positions are ``(n, 3)`` ``zyx`` (or ``(n, 2)`` ``yx``) sub-voxel coordinates in voxels; a
``scale`` (e.g. the voxel size in um) turns voxel distances into physical ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from cellrna_pipeline.core.errors import InputError

__all__ = ["SpotMatch", "match_spots"]


@dataclass(frozen=True)
class SpotMatch:
    """Result of :func:`match_spots`.

    Attributes
    ----------
    pairs : ``(m, 2)`` int64 indices ``(predicted, true)`` of the matched pairs.
    distances : ``(m,)`` float64 distance of each pair (in the units of ``scale``).
    n_pred, n_true : number of predicted and true spots.
    """

    pairs: np.ndarray
    distances: np.ndarray
    n_pred: int
    n_true: int

    @property
    def tp(self) -> int:
        return len(self.pairs)

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else 1.0

    @property
    def f1(self) -> float:
        denom = self.n_pred + self.n_true
        return 2.0 * self.tp / denom if denom else 1.0

    @property
    def mean_error(self) -> float:
        """Mean distance of matched pairs (``nan`` when nothing matched)."""
        return float(self.distances.mean()) if len(self.distances) else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            "n_pred": self.n_pred,
            "n_true": self.n_true,
            "tp": self.tp,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "localization_error": self.mean_error,
        }


def _as_points(points: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, arr.shape[1] if arr.ndim == 2 else 3)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise InputError(f"{name} must be (n, 3) zyx or (n, 2) yx positions, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or inf")
    return arr


def match_spots(
    predicted: np.ndarray,
    true: np.ndarray,
    *,
    max_distance: float = 3.0,
    scale: Sequence[float] | None = None,
) -> SpotMatch:
    """Match predicted to true spots one-to-one, minimising the total distance.

    Only pairs closer than ``max_distance`` may match; among those, the Hungarian
    algorithm (``scipy.optimize.linear_sum_assignment``, run per connected group of
    candidate pairs) finds the maximum number of matches of least total distance.

    Parameters
    ----------
    predicted, true : ``(n, d)`` positions in voxels, ``d`` = 3 (``zyx``) or 2 (``yx``).
    max_distance : matching radius, in voxels, or in the units of ``scale``.
    scale : per-axis factor applied before measuring distances (e.g. the voxel size in
        um for a radius in um); default 1 (voxels).

    Returns
    -------
    SpotMatch with the pairs, their distances and precision / recall / F1.
    """
    p = _as_points(predicted, "predicted")
    t = _as_points(true, "true")
    if len(p) and len(t) and p.shape[1] != t.shape[1]:
        raise InputError(f"predicted has {p.shape[1]} coordinates per spot, true {t.shape[1]}")
    if not (np.isfinite(max_distance) and max_distance > 0):
        raise InputError(f"max_distance must be positive, got {max_distance!r}")
    if scale is not None:
        s = np.asarray(scale, dtype=np.float64)
        p, t = p * s[-p.shape[1] :], t * s[-t.shape[1] :]
    empty = SpotMatch(np.zeros((0, 2), np.int64), np.zeros(0), len(p), len(t))
    if not len(p) or not len(t):
        return empty
    near = cKDTree(p).query_ball_tree(cKDTree(t), max_distance)
    rows = np.repeat(np.arange(len(p)), [len(n) for n in near]).astype(np.int64)
    if not len(rows):
        return empty
    cols = np.concatenate([np.asarray(n, dtype=np.int64) for n in near if n])
    dist = np.linalg.norm(p[rows] - t[cols], axis=1)
    n_p = len(p)
    # Bipartite graph of candidate pairs: solve each connected group on its own.
    graph = coo_matrix((np.ones(len(rows)), (rows, cols + n_p)), shape=(n_p + len(t), n_p + len(t)))
    _, comp = connected_components(graph, directed=False)
    out_p, out_t, out_d = [], [], []
    order = np.argsort(comp[rows], kind="stable")
    rows, cols, dist = rows[order], cols[order], dist[order]
    bounds = np.flatnonzero(np.diff(comp[rows])) + 1
    for r, c, d in zip(
        np.split(rows, bounds), np.split(cols, bounds), np.split(dist, bounds), strict=True
    ):
        up, ip = np.unique(r, return_inverse=True)
        ut, it = np.unique(c, return_inverse=True)
        # Non-pairs cost more than any sum of real pairs, so the count of matches is maximal.
        big = max_distance * (min(len(up), len(ut)) + 1) + 1.0
        cost = np.full((len(up), len(ut)), big)
        cost[ip, it] = d
        ri, ci = linear_sum_assignment(cost)
        keep = cost[ri, ci] < big
        out_p.append(up[ri[keep]])
        out_t.append(ut[ci[keep]])
        out_d.append(cost[ri[keep], ci[keep]])
    return SpotMatch(
        np.stack([np.concatenate(out_p), np.concatenate(out_t)], axis=1).astype(np.int64),
        np.concatenate(out_d),
        len(p),
        len(t),
    )
