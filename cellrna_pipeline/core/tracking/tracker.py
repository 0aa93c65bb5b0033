"""Frame-to-frame tracking with motion prediction, morphology, gap closing and divisions.

One pass over the frames. At each frame ``f``:

1. every live track (seen at ``f - 1``, or up to ``max_gap_frames`` earlier) is predicted
   to ``f`` by a Kalman filter (position + velocity per axis, velocity persistence
   ``rho``), in drift-corrected coordinates;
2. candidate pairs (track, detection) are gated by the physical displacement since the
   track was last seen (``max_displacement_um`` per frame elapsed, KD-tree);
3. each pair gets a cost: Mahalanobis distance to the prediction (+ its log-determinant,
   so uncertain predictions are not favoured), ``ln`` volume, shape and intensity ratios
   over their spreads, and ``gap_cost_per_frame`` per missing frame;
4. one sparse LAP decides the links (a link only where it is cheaper than ending one track
   and starting another); with ``estimate_drift`` the predictions are first shifted by the
   median displacement to each track's nearest candidate (the stage drift) and, if the
   links' median residual is still off, shifted by it and the LAP solved again; with
   ``adapt_motion`` the links' residuals rescale the motion noise for the next frame;
5. divisions: a track seen at ``f - 1`` whose successor and a newly started detection (or
   two new detections) look like daughters - midpoint at the predicted position, volumes
   summing to the parent's, alike in size - ends there, and both daughters start tracks
   with it as parent;
6. Kalman update of the linked tracks; unlinked detections start tracks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy.spatial import cKDTree

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.tracking._assign import assign
from cellrna_pipeline.core.tracking.config import TrackingConfig
from cellrna_pipeline.core.tracking.features import detections_from_labels
from cellrna_pipeline.core.types import VoxelSize

__all__ = ["LINEAGE_SCHEMA", "TrackingResult", "track", "track_labels"]

LINEAGE_SCHEMA: dict[str, type[pl.DataType] | pl.DataType] = {
    "track_id": pl.UInt32,
    "begin_t": pl.Int32,
    "end_t": pl.Int32,
    "parent_track_id": pl.UInt32,
    "n_detections": pl.Int32,
}
"""Columns of the lineage table: one row per track, ``parent_track_id`` 0 = none.

A track has a ``parent_track_id`` only when it is a daughter of a division, and a parent
then has exactly two daughters, both beginning at ``parent end_t + 1``. A track may miss
frames inside ``[begin_t, end_t]`` (gap closing): ``n_detections`` counts the frames where
it is present.
"""

# Defaults derived from the displacement gate when the config leaves them unset (chosen on
# the generator's tuning seeds, see benchmarks/tracking.py).
_MOTION_SIGMA_PER_GATE = 1 / 8
_POSITION_SIGMA_PER_GATE = 1 / 36
# Weight of the daughter-symmetry term when an object touches the border (cropped objects
# are not alike even when the cells are).
_BORDER_SYMMETRY_WEIGHT = 0.25
# ... and dropped where the smaller daughter is cut and the larger holds less than this
# share of the parent's volume (see _division_volume_cost).
_CUT_DIVISION_MAX_SHARE = 0.7
# Bounds of the adaptive scale of the motion noise (data faster than the prior: up to 16x).
_MOTION_SCALE_RANGE = (0.5, 16.0)
# Median of a chi-square variable with 2 and 3 degrees of freedom.
_CHI2_MEDIAN = {2: 1.386, 3: 2.366}
_EXTENT_COLUMNS = ("extent_major_um", "extent_mid_um", "extent_minor_um")


@dataclass(frozen=True)
class TrackingResult:
    """Output of :func:`track`.

    Attributes
    ----------
    detections : the input table sorted by ``t`` (stable), with ``track_id`` (u32, >= 1).
    lineage : one row per track, :data:`LINEAGE_SCHEMA`, sorted by ``track_id``.
    drift_zyx_um : ``(n_frames, 3)`` estimated cumulative stage drift in um (frame 0 = 0;
        zeros when ``estimate_drift`` is off).
    max_displacement_um : the displacement gate used (um per frame).
    config : the configuration used.
    """

    detections: pl.DataFrame
    lineage: pl.DataFrame
    drift_zyx_um: np.ndarray
    max_displacement_um: float
    config: TrackingConfig = field(repr=False)


@dataclass
class _Detections:
    """Columnar view of the detections, sorted by frame."""

    t: np.ndarray  # (N,) int
    pos: np.ndarray  # (N, 3) um, image coordinates
    log_volume: np.ndarray  # (N,) NaN when unknown
    log_extent: np.ndarray  # (N, 3) NaN when unknown
    log_intensity: np.ndarray  # (N,) NaN when unknown
    embedding: np.ndarray | None  # (N, k) unit vectors, None when there is no column
    border: np.ndarray  # (N,) bool
    starts: np.ndarray  # (n_frames + 1,) frame f is rows starts[f]:starts[f+1]
    ndim: int


def _column(df: pl.DataFrame, name: str, default: float) -> np.ndarray:
    if name in df.columns:
        return df[name].cast(pl.Float64).fill_null(np.nan).to_numpy().astype(np.float64)
    return np.full(df.height, default, dtype=np.float64)


def _safe_log(values: np.ndarray) -> np.ndarray:
    out = np.full(values.shape, np.nan)
    ok = np.isfinite(values) & (values > 0)
    out[ok] = np.log(values[ok])
    return out


def _prepare(detections: pl.DataFrame, n_frames: int | None) -> tuple[pl.DataFrame, _Detections]:
    if not isinstance(detections, pl.DataFrame):
        raise InputError(f"detections must be a polars DataFrame, got {type(detections).__name__}")
    missing = [c for c in ("t", "y_um", "x_um") if c not in detections.columns]
    if missing:
        raise InputError(f"detections lack column(s) {missing}; need t, y_um, x_um (z_um optional)")
    if detections.height == 0:
        raise InputError("no detections to track")
    if not detections["t"].dtype.is_integer():
        raise InputError(f"detections column t must be integer frames, got {detections['t'].dtype}")
    if detections["t"].null_count() or int(detections["t"].min()) < 0:  # type: ignore[arg-type]
        raise InputError("detections column t must be >= 0 and not null")
    df = detections.sort("t", maintain_order=True)
    t = df["t"].to_numpy().astype(np.int64)
    pos = np.stack([_column(df, c, 0.0) for c in ("z_um", "y_um", "x_um")], axis=1)
    if not np.isfinite(pos).all():
        raise InputError("detections hold NaN or infinite positions")
    last = int(t[-1]) + 1
    if n_frames is None:
        n_frames = last
    elif n_frames < last:
        raise InputError(f"n_frames={n_frames} but detections reach frame {last - 1}")
    starts = np.searchsorted(t, np.arange(n_frames + 1))
    extent = np.stack(
        [_column(df, c, np.nan) for c in _EXTENT_COLUMNS],
        axis=1,
    )
    border = (
        df["touches_border"].fill_null(False).to_numpy().astype(bool)
        if "touches_border" in df.columns
        else np.zeros(df.height, bool)
    )
    ndim = 2 if np.ptp(pos[:, 0]) == 0 else 3
    embedding = _embedding(df)
    log_extent = _safe_log(extent)
    if ndim == 2:
        log_extent[:, 2] = np.nan  # the single plane's thickness says nothing
    return df, _Detections(
        t=t,
        pos=pos,
        log_volume=_safe_log(_column(df, "volume_um3", np.nan)),
        log_extent=log_extent,
        log_intensity=_safe_log(_column(df, "mean_intensity", np.nan)),
        embedding=embedding,
        border=border,
        starts=starts,
        ndim=ndim,
    )


def _embedding(df: pl.DataFrame) -> np.ndarray | None:
    """The ``embedding`` column as ``(N, k)`` float64 unit vectors (``None`` without it)."""
    if "embedding" not in df.columns:
        return None
    column = df["embedding"]
    if not isinstance(column.dtype, pl.Array | pl.List) or column.null_count():
        raise InputError("detections column embedding must hold one float vector per row")
    try:
        emb = np.asarray(column.to_list(), dtype=np.float64)
    except ValueError:
        raise InputError("detections column embedding has vectors of different lengths") from None
    if emb.ndim != 2 or not np.isfinite(emb).all():
        raise InputError("detections column embedding must hold finite vectors of one length")
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norm > 0, norm, 1.0)


def _auto_gate(df: pl.DataFrame) -> float:
    """One typical object length: the median of the objects' longest extent."""
    if "extent_major_um" not in df.columns:
        raise InputError(
            "max_displacement_um must be set for detections without extent_major_um (point input)"
        )
    d = df["extent_major_um"].drop_nulls().drop_nans()
    if d.len() == 0:
        raise InputError("cannot derive max_displacement_um: no object sizes")
    gate = float(d.median())  # type: ignore[arg-type]
    if not np.isfinite(gate) or gate <= 0:
        raise InputError("cannot derive max_displacement_um: object sizes are not positive")
    return gate


class _Tracks:
    """Growing arrays of track state (Kalman filter per axis with a shared 2x2 covariance)."""

    def __init__(self, capacity: int) -> None:
        self.n = 0
        self.pos = np.zeros((capacity, 3))  # drift-corrected position (um)
        self.vel = np.zeros((capacity, 3))  # um / frame
        self.cov = np.zeros((capacity, 3))  # p00, p01, p11 per track (same for every axis)
        self.last_t = np.zeros(capacity, np.int64)
        self.last_det = np.zeros(capacity, np.int64)
        self.begin_t = np.zeros(capacity, np.int64)
        self.parent = np.full(capacity, -1, np.int64)
        self.alive = np.zeros(capacity, bool)

    def start(
        self, dets: np.ndarray, world: np.ndarray, t: int, parents: np.ndarray, init_cov: np.ndarray
    ) -> np.ndarray:
        k = len(dets)
        ids = np.arange(self.n, self.n + k)
        self.n += k
        self.pos[ids] = world
        self.vel[ids] = 0.0
        self.cov[ids] = init_cov
        self.last_t[ids] = t
        self.last_det[ids] = dets
        self.begin_t[ids] = t
        self.parent[ids] = parents
        self.alive[ids] = True
        return ids


def _predict(
    pos: np.ndarray, vel: np.ndarray, cov: np.ndarray, steps: np.ndarray, rho: float, q: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Propagate ``steps`` frames: x += rho v, v = rho v, P = F P F^T + Q with Q = q [[1,1],[1,1]]."""
    pos, vel, cov = pos.copy(), vel.copy(), cov.copy()
    for step in range(1, int(steps.max(initial=0)) + 1):
        m = steps >= step
        p00, p01, p11 = cov[m, 0], cov[m, 1], cov[m, 2]
        cov[m, 0] = p00 + 2 * rho * p01 + rho * rho * p11 + q
        cov[m, 1] = rho * p01 + rho * rho * p11 + q
        cov[m, 2] = rho * rho * p11 + q
        pos[m] += rho * vel[m]
        vel[m] *= rho
    return pos, vel, cov


def track(
    detections: pl.DataFrame,
    *,
    config: TrackingConfig | None = None,
    n_frames: int | None = None,
) -> TrackingResult:
    """Link detections into tracks with divisions.

    Parameters
    ----------
    detections : one row per object and frame: ``t`` (int frame), ``y_um``, ``x_um`` and
        optionally ``z_um`` (um, absent or constant for 2D+t), ``volume_um3``,
        ``extent_major_um``/``extent_mid_um``/``extent_minor_um``, ``mean_intensity``,
        ``touches_border``, ``equivalent_diameter_um`` (see
        :data:`~cellrna_pipeline.core.tracking.features.DETECTION_SCHEMA`; made by
        :func:`~cellrna_pipeline.core.tracking.features.detections_from_labels`). Other
        columns are carried through. Missing measurements are simply not used.
    config : tracking parameters (default :class:`TrackingConfig()`).
    n_frames : number of frames of the sequence (default: last frame with objects + 1).

    Returns
    -------
    TrackingResult

    Raises
    ------
    InputError
        Missing columns, no detections, NaN positions, negative frames, or no way to
        derive the displacement gate.
    """
    config = config or TrackingConfig()
    df, d = _prepare(detections, n_frames)
    gate = config.max_displacement_um or _auto_gate(df)
    n_frames = len(d.starts) - 1
    n_det = len(d.t)
    rho = config.velocity_persistence
    q = (config.motion_sigma_um or gate * _MOTION_SIGMA_PER_GATE) ** 2
    r = (config.position_sigma_um or gate * _POSITION_SIGMA_PER_GATE) ** 2
    v0 = q / max(1.0 - rho * rho, 0.25)  # velocity prior: the stationary variance
    init_cov = np.array([r, 0.0, v0])
    q_scale = 1.0
    use_volume = config.volume_log_sigma is not None and bool(np.isfinite(d.log_volume).any())
    use_shape = config.shape_log_sigma is not None and bool(np.isfinite(d.log_extent).any())
    use_intensity = config.intensity_log_sigma is not None and bool(
        np.isfinite(d.log_intensity).any()
    )
    if config.appearance_sigma is not None and d.embedding is None:
        raise InputError("appearance_sigma is set but the detections have no embedding column")
    use_appearance = config.appearance_sigma is not None
    det_volume = np.exp(d.log_volume)

    tracks = _Tracks(n_det)
    det_track = np.full(n_det, -1, np.int64)
    drift = np.zeros((n_frames, 3))
    max_k = config.max_gap_frames + 1

    first = np.arange(d.starts[0], d.starts[1])
    det_track[first] = tracks.start(first, d.pos[first], 0, np.full(len(first), -1), init_cov)

    for f in range(1, n_frames):
        dets = np.arange(d.starts[f], d.starts[f + 1])
        drift[f] = drift[f - 1]
        if len(dets) == 0:
            continue
        live = np.flatnonzero(tracks.alive[: tracks.n])
        k = f - tracks.last_t[live]
        eligible = (k <= max_k) & (
            (k == 1) | config.gap_closing_at_border | ~d.border[tracks.last_det[live]]
        )
        tracks.alive[live[k > max_k]] = False
        cand = live[eligible]
        k = k[eligible]

        # Gating by physical displacement since last seen (image coordinates).
        tree = cKDTree(d.pos[dets])
        pr, pc = [], []
        for kk in np.unique(k):
            sel = cand[k == kk]
            last_pos = d.pos[tracks.last_det[sel]]
            pairs = cKDTree(last_pos).sparse_distance_matrix(tree, gate * kk, output_type="ndarray")
            pr.append(sel[pairs["i"]])
            pc.append(pairs["j"])
        prow = np.concatenate(pr) if pr else np.empty(0, np.int64)
        pcol = np.concatenate(pc) if pc else np.empty(0, np.int64)

        # Prediction (drift-corrected coordinates) for every candidate track.
        q_f = q * q_scale
        pred_pos, pred_vel, pred_cov = _predict(
            tracks.pos[cand], tracks.vel[cand], tracks.cov[cand], k, rho, q_f
        )
        slot = np.full(tracks.n, -1, np.int64)
        slot[cand] = np.arange(len(cand))
        ps = slot[prow]
        gapk = k[ps]
        s_innov = pred_cov[ps, 0] + r
        jd = dets[pcol]
        base = d.ndim * np.log(s_innov / r) + config.gap_cost_per_frame * (gapk - 1)
        ld = tracks.last_det[prow]
        if use_volume:
            dv = d.log_volume[jd] - d.log_volume[ld]
            ok = np.isfinite(dv) & ~d.border[jd] & ~d.border[ld]
            base += np.where(ok, dv, 0.0) ** 2 / config.volume_log_sigma**2  # type: ignore[operator]
        if use_shape:
            de = d.log_extent[jd] - d.log_extent[ld]
            ok = np.isfinite(de) & ~d.border[jd, None] & ~d.border[ld, None]
            n_ok = np.maximum(ok.sum(axis=1), 1)
            base += (np.where(ok, de, 0.0) ** 2).sum(axis=1) / n_ok / config.shape_log_sigma**2  # type: ignore[operator]
        if use_intensity:
            di = d.log_intensity[jd] - d.log_intensity[ld]
            base += np.where(np.isfinite(di), di, 0.0) ** 2 / config.intensity_log_sigma**2  # type: ignore[operator]
        if use_appearance:
            de = d.embedding[jd] - d.embedding[ld]  # type: ignore[index]
            base += (de**2).sum(axis=1) / config.appearance_sigma**2  # type: ignore[operator]

        # Solve. With drift estimation, the predictions are first shifted by the median
        # displacement of each track's nearest candidate (robust while the stage moves
        # less than half the distance between objects), then refined by the median
        # residual of the links made.
        residual0 = d.pos[jd] - drift[f - 1] - pred_pos[ps]
        shift = np.zeros(3)
        if config.estimate_drift:
            shift = _nearest_median_shift(residual0, prow, gapk, d.ndim)
        for attempt in range(2):
            resid = residual0 - shift
            cost = base + (resid**2).sum(axis=1) / s_innov
            sel_pairs = assign(prow, pcol, cost, max_cost=config.max_link_cost)
            if attempt or not config.estimate_drift or len(sel_pairs) < 3:
                break
            refine = np.median(resid[sel_pairs], axis=0)
            if d.ndim == 2:
                refine[0] = 0.0
            if float((refine**2).sum()) <= r / 16.0:
                break
            shift = shift + refine
        drift[f] = drift[f - 1] + shift
        world_f = d.pos[dets] - drift[f]
        if config.adapt_motion:
            # Adapt the motion noise to the data: the median normalised innovation of this
            # frame's one-frame links against its expected value (chi-square median).
            one = sel_pairs[(gapk[sel_pairs] == 1) & ~d.border[jd[sel_pairs]]]
            if len(one) >= 5:
                z = (resid[one] ** 2).sum(axis=1) / s_innov[one]
                ratio = float(np.median(z)) / _CHI2_MEDIAN[d.ndim]
                q_scale = float(np.clip(q_scale * np.sqrt(max(ratio, 1e-3)), *_MOTION_SCALE_RANGE))

        link_track = prow[sel_pairs]  # track ids
        link_det = pcol[sel_pairs]  # local detection index in this frame
        succ = np.full(tracks.n, -1, np.int64)
        succ[link_track] = link_det
        pred_of = np.full(len(dets), -1, np.int64)
        pred_of[link_det] = link_track

        new_parent = np.full(len(dets), -1, np.int64)
        if config.divisions:
            _divisions(
                config=config,
                d=d,
                dets=dets,
                world_f=world_f,
                det_volume=det_volume,
                tracks=tracks,
                f=f,
                prow=prow,
                pcol=pcol,
                gapk=gapk,
                pred_pos=pred_pos,
                pred_cov=pred_cov,
                ps=ps,
                r=r,
                succ=succ,
                pred_of=pred_of,
                new_parent=new_parent,
            )

        # Kalman update of linked tracks.
        linked = np.flatnonzero(pred_of >= 0)
        tr = pred_of[linked]
        sl = slot[tr]
        p00, p01, p11 = pred_cov[sl, 0], pred_cov[sl, 1], pred_cov[sl, 2]
        s = p00 + r
        g0, g1 = p00 / s, p01 / s
        innov = world_f[linked] - pred_pos[sl]
        tracks.pos[tr] = pred_pos[sl] + g0[:, None] * innov
        tracks.vel[tr] = pred_vel[sl] + g1[:, None] * innov
        tracks.cov[tr, 0] = (1 - g0) * p00
        tracks.cov[tr, 1] = (1 - g0) * p01
        tracks.cov[tr, 2] = p11 - g1 * p01
        tracks.last_t[tr] = f
        tracks.last_det[tr] = dets[linked]
        det_track[dets[linked]] = tr

        fresh = np.flatnonzero(pred_of < 0)
        det_track[dets[fresh]] = tracks.start(
            dets[fresh], world_f[fresh], f, new_parent[fresh], init_cov * [1.0, 1.0, q_scale]
        )

    return _result(df, det_track, tracks, drift, gate, config)


def _nearest_median_shift(
    residual: np.ndarray, rows: np.ndarray, gapk: np.ndarray, ndim: int
) -> np.ndarray:
    """Median over tracks seen last frame of the residual to their nearest candidate."""
    one = np.flatnonzero(gapk == 1)
    if len(one) == 0:
        return np.zeros(3)
    d2 = (residual[one] ** 2).sum(axis=1)
    order = np.lexsort((d2, rows[one]))
    r = rows[one][order]
    first = order[np.r_[True, r[1:] != r[:-1]]]
    if len(first) < 3:
        return np.zeros(3)
    shift = np.median(residual[one][first], axis=0)
    if ndim == 2:
        shift[0] = 0.0
    return shift


def _divisions(
    *,
    config: TrackingConfig,
    d: _Detections,
    dets: np.ndarray,
    world_f: np.ndarray,
    det_volume: np.ndarray,
    tracks: _Tracks,
    f: int,
    prow: np.ndarray,
    pcol: np.ndarray,
    gapk: np.ndarray,
    pred_pos: np.ndarray,
    pred_cov: np.ndarray,
    ps: np.ndarray,
    r: float,
    succ: np.ndarray,
    pred_of: np.ndarray,
    new_parent: np.ndarray,
) -> None:
    """Find divisions among the gated pairs of tracks seen at ``f - 1``; edits links in place."""
    new = pred_of < 0
    # Candidate (parent, daughter) pairs: parent seen in the previous frame and old enough
    # (a daughter must reach division_min_age_frames before it divides again), daughter
    # either newly started or the parent's own successor.
    par = prow
    age = f - tracks.begin_t[par]
    mature = (tracks.parent[par] < 0) | (age >= config.division_min_age_frames)
    ok = (gapk == 1) & mature & (new[pcol] | (succ[par] == pcol))
    if not ok.any():
        return
    par, dau, slot = par[ok], pcol[ok], ps[ok]
    order = np.argsort(par, kind="stable")
    par, dau, slot = par[order], dau[order], slot[order]
    bounds = np.flatnonzero(np.diff(np.r_[-1, par, -1]))
    options = []  # (cost, parent, d1, d2)
    sigma = config.division_volume_log_sigma
    for a, b in itertools.pairwise(bounds):
        if b - a < 2:
            continue
        p = int(par[a])
        cands = dau[a:b]
        s_p = int(succ[p])
        sl = int(slot[a])
        s_mid = pred_cov[sl, 0] + r / 2
        pv = det_volume[tracks.last_det[p]]
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                d1, d2 = int(cands[i]), int(cands[j])
                if s_p >= 0 and s_p not in (d1, d2):
                    continue  # the parent's successor must be one of its daughters
                mid = 0.5 * (world_f[d1] + world_f[d2])
                cost = float(((mid - pred_pos[sl]) ** 2).sum() / s_mid)
                v1, v2 = det_volume[dets[d1]], det_volume[dets[d2]]
                if np.isfinite(pv) and np.isfinite(v1) and np.isfinite(v2):
                    border = (
                        bool(d.border[tracks.last_det[p]]),
                        bool(d.border[dets[d1]]),
                        bool(d.border[dets[d2]]),
                    )
                    cost += _division_volume_cost(pv, v1, v2, border, sigma)
                if cost < config.division_max_cost:
                    options.append((cost, p, d1, d2))
    used_p: set[int] = set()
    used_d: set[int] = set()
    for _, p, d1, d2 in sorted(options):
        if p in used_p or d1 in used_d or d2 in used_d:
            continue
        used_p.add(p)
        used_d.update((d1, d2))
        if succ[p] >= 0:
            pred_of[succ[p]] = -1
            succ[p] = -1
        new_parent[[d1, d2]] = p
        tracks.alive[p] = False


def _division_volume_cost(
    pv: float, v1: float, v2: float, border: tuple[bool, bool, bool], sigma: float
) -> float:
    """Volume terms of a division: the daughters' volumes sum to the parent's
    (``ln((v1 + v2) / pv)``, spread ``sigma``) and are alike (``ln(v1 / v2)``, spread
    ``2 sigma``). ``border``: parent, daughter 1, daughter 2 touch the image border.

    Objects cut by the border are not alike even when the cells are: the symmetry term
    is down-weighted there, and dropped when the smaller daughter is cut while the larger
    one holds clearly less than the parent (a division with one daughter mostly out of
    view, unlike a sliver entering next to a cell that carries on at full volume).
    """
    (bp, b1, b2), (small, large) = border, sorted((v1, v2))
    small_cut = b1 if v1 <= v2 else b2
    if small_cut and large < _CUT_DIVISION_MAX_SHARE * pv:
        weight = 0.0
    elif bp or b1 or b2:
        weight = _BORDER_SYMMETRY_WEIGHT
    else:
        weight = 1.0
    total = np.log((v1 + v2) / pv) ** 2 / sigma**2
    return float(total + weight * np.log(large / small) ** 2 / (2 * sigma) ** 2)


def _result(
    df: pl.DataFrame,
    det_track: np.ndarray,
    tracks: _Tracks,
    drift: np.ndarray,
    gate: float,
    config: TrackingConfig,
) -> TrackingResult:
    n = tracks.n
    ids = np.arange(1, n + 1, dtype=np.uint32)  # creation order = order of first appearance
    out = df.with_columns(pl.Series("track_id", ids[det_track], dtype=pl.UInt32))
    t = out["t"].to_numpy()
    begin = np.full(n, np.iinfo(np.int64).max)
    end = np.full(n, -1)
    np.minimum.at(begin, det_track, t)
    np.maximum.at(end, det_track, t)
    count = np.bincount(det_track, minlength=n)
    parent = tracks.parent[:n]
    lineage = pl.DataFrame(
        {
            "track_id": ids,
            "begin_t": begin.astype(np.int32),
            "end_t": end.astype(np.int32),
            "parent_track_id": np.where(parent >= 0, parent + 1, 0).astype(np.uint32),
            "n_detections": count.astype(np.int32),
        },
        schema=LINEAGE_SCHEMA,
    )
    return TrackingResult(
        detections=out,
        lineage=lineage,
        drift_zyx_um=drift,
        max_displacement_um=float(gate),
        config=config,
    )


def track_labels(
    labels_tzyx: Iterable[np.ndarray] | np.ndarray,
    *,
    voxel_size: VoxelSize,
    config: TrackingConfig | None = None,
    intensity_tzyx: Iterable[np.ndarray] | np.ndarray | None = None,
) -> TrackingResult:
    """Measure the objects of every frame and track them (one call for label images).

    Parameters
    ----------
    labels_tzyx : ``(t, z, y, x)`` / ``(t, y, x)`` integer labels, or an iterable of
        per-frame ``(z, y, x)`` / ``(y, x)`` arrays (read one at a time).
    voxel_size : physical voxel size (um); anisotropy is handled in physical units.
    config : tracking parameters.
    intensity_tzyx : optional images (same shapes) for the mean-intensity cue; used when
        ``config.intensity_log_sigma`` is set.

    Returns
    -------
    TrackingResult whose detections carry the input ``label`` of each object, for
    :func:`~cellrna_pipeline.core.tracking.relabel_frame`.
    """
    count = [0]

    def counted() -> Iterator[np.ndarray]:
        for frame in labels_tzyx:
            count[0] += 1
            yield frame

    detections = detections_from_labels(
        counted(), voxel_size=voxel_size, intensity_tzyx=intensity_tzyx
    )
    if detections.height == 0:
        raise InputError("every frame is empty; nothing to track")
    return track(detections, config=config, n_frames=count[0])
