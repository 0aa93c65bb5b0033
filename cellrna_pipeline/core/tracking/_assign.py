"""Sparse linear assignment with the option to leave rows and columns unmatched.

The frame-to-frame problem (tracks x detections) is solved as one sparse LAP on the
augmented matrix of Jaqaman et al. (2008):

    [ links C (gated pairs)    | "end track" diagonal   ]
    [ "start track" diagonal   | C^T pattern (auxiliary) ]

with scipy's ``min_weight_full_bipartite_matching`` (LAPJVsp), so the cost grows with the
number of gated pairs, not with the square of the number of objects.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

__all__ = ["assign"]


def assign(
    rows: np.ndarray,
    cols: np.ndarray,
    cost: np.ndarray,
    *,
    max_cost: float,
) -> np.ndarray:
    """Minimum-cost one-to-one matching of candidate pairs; pairs may stay unmatched.

    A pair is matched only if that lowers the total cost, i.e. only pairs with
    ``cost < max_cost`` are ever used (leaving a row and a column unmatched costs
    ``max_cost / 2`` each).

    Parameters
    ----------
    rows, cols : int arrays ``(n_pairs,)``: the candidate pairs (any non-negative ids; each
        (row, col) at most once).
    cost : float array ``(n_pairs,)``: costs (may be negative; NaN/inf never match).
    max_cost : the price of leaving one row and one column unmatched.

    Returns
    -------
    int array: indices into the pair arrays of the matched pairs, ascending.
    """
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    cost = np.asarray(cost, dtype=np.float64)
    idx = np.flatnonzero(np.isfinite(cost) & (cost < max_cost))
    if len(idx) == 0:
        return idx.astype(np.int64)
    # Pairs whose row and column take part in no other pair are matched outright (the
    # common case of well separated objects); only the rest goes to the solver.
    _, r = np.unique(rows[idx], return_inverse=True)
    _, c = np.unique(cols[idx], return_inverse=True)
    alone = (np.bincount(r)[r] == 1) & (np.bincount(c)[c] == 1)
    chosen = [idx[alone]]
    idx = idx[~alone]
    if len(idx):
        chosen.append(_solve(rows[idx], cols[idx], cost[idx], idx, max_cost))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _solve(
    rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, idx: np.ndarray, max_cost: float
) -> np.ndarray:
    _, r = np.unique(rows, return_inverse=True)
    _, c = np.unique(cols, return_inverse=True)
    n, m = int(r.max()) + 1, int(c.max()) + 1
    half = max_cost / 2.0
    # Shift every weight to be positive: a full matching uses n + m entries whatever it
    # is, so a constant offset does not change the optimum, and scipy's sparse formats
    # would drop explicit zeros.
    offset = 1.0 - min(float(cost.min()), 0.0)
    ar = np.arange(n)
    ac = np.arange(m)
    data = np.concatenate(
        [
            cost + offset,  # links
            np.full(n, half + offset),  # row i unmatched
            np.full(m, half + offset),  # column j unmatched
            np.full(len(r), offset),  # auxiliary block: lets dummy rows meet dummy columns
        ]
    )
    ii = np.concatenate([r, ar, n + ac, n + c])
    jj = np.concatenate([c, m + ar, ac, m + r])
    matrix = coo_matrix((data, (ii, jj)), shape=(n + m, m + n)).tocsr()
    row_ind, col_ind = min_weight_full_bipartite_matching(matrix)
    real = (row_ind < n) & (col_ind < m)
    # Back from (row, column) to the pair index: pairs are unique, so their keys are too.
    keys = r.astype(np.int64) * m + c
    order = np.argsort(keys)
    found = np.searchsorted(keys[order], row_ind[real].astype(np.int64) * m + col_ind[real])
    return idx[order[found]]
