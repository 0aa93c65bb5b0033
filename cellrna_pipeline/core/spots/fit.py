"""Joint Gaussian fitting of detected spots and the split test that resolves close pairs.

Near the spots, the image is modelled as ``I(v) = b_i + sum_j a_j g(v - p_j)``: every spot
``j`` a Gaussian of the known PSF sigma (peak ``a_j`` at sub-voxel ``p_j``) over a local
background ``b_i``, constant in the window of spot ``i`` (``+-2 sigma`` per axis). The fit
follows crowded-field photometry (DAOPHOT's ALLSTAR and its successors):

1. **Refinement** (Gauss-Seidel): each spot's ``(a, b, p)`` gets a damped Gauss-Newton step
   on its window with every other spot's model subtracted. Spots whose windows overlap are
   never updated together (lattice colouring): updated at once (Jacobi), two overlapping
   spots both claim the light they share and the fit oscillates.
2. **Split test** (likelihood ratio with a noise variance estimated from all windows):
   two Gaussians are fitted to each tested window (Levenberg-Marquardt, started either
   side of the centre along the principal axis of the window's light) and replace the one
   when the residual sum of squares drops by at least ``min_delta_chi2`` noise variances
   and both halves are plausible spots (at least ``min_child_fraction`` of the median
   spot, and each above the detection threshold on its own). This resolves pairs closer
   than the PSF and the weaker spot on a brighter one's flank. The halves are tested
   again in the next round (triples, small clusters).
3. **Pruning**: spots whose fitted amplitude fell below the detection threshold (two
   spots sharing one, a noise peak on a bright spot's flank) are removed, the weakest
   of neighbours first, and their neighbours refitted.

Everything works on the image values under the windows, read point-wise from the (maybe
lazy, chunked) volume, so memory is bounded by the number of spots and the result does
not depend on chunking (spots are processed in position order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["FitSettings", "SpotFit", "fit_spots", "gather"]

_WINDOW_SIGMAS = 2.0  # a spot's window: +-2 sigma per axis (at least one voxel)
_MAX_STEP_SIGMAS = 0.5  # one refinement step moves a spot at most this far per axis
_SPLIT_START_SIGMAS = 0.6  # the two halves start this far either side of the centre
_LM_ITERATIONS = 8
_DAMPING = 0.1  # Gauss-Newton steps of the refinement: Marquardt damping
_EPS = 1e-9


@dataclass(frozen=True)
class FitSettings:
    """Parameters of :func:`fit_spots` (see the module docstring).

    Attributes
    ----------
    min_delta_chi2 : split when the residual sum of squares drops by this many noise
        variances (two Gaussians have 4 more parameters than one).
    min_child_fraction : each half of a split is at least this share of the median spot.
    split_rounds : rounds of split tests (round ``k`` tests the halves of round ``k-1``).
    refine_sweeps : Gauss-Seidel sweeps at the start and after each split round.
    prune_rounds : rounds of removing spots below the threshold and refitting.
    """

    min_delta_chi2: float = 10.0
    min_child_fraction: float = 0.4
    split_rounds: int = 3
    refine_sweeps: int = 2
    prune_rounds: int = 2


@dataclass(frozen=True)
class SpotFit:
    """Result of :func:`fit_spots`.

    Attributes
    ----------
    zyx : ``(n, 3)`` float64 fitted sub-voxel centres (voxels; ``z`` 0 for 2-D), in
        position order.
    amplitude : ``(n,)`` float64 fitted peak amplitude above the local background.
    min_amplitude : ``(n,)`` float64 each spot's threshold (inherited by split halves).
    n_split : spots added by split tests.
    n_pruned : spots removed by pruning.
    noise_var : background noise variance per voxel (image units squared).
    gain : noise variance per unit of signal (shot noise; image units).
    """

    zyx: np.ndarray
    amplitude: np.ndarray
    min_amplitude: np.ndarray
    n_split: int
    n_pruned: int
    noise_var: float
    gain: float


def gather(vol: Any, zyx: np.ndarray) -> np.ndarray:
    """Values of ``vol`` at the integer voxels ``zyx`` ``(m, 3)``, as float64 ``(m,)``.

    numpy arrays and memory maps are indexed directly; zarr and dask arrays (anything
    with ``vindex``) point-wise, chunk by chunk.
    """
    idx = tuple(np.ascontiguousarray(zyx[:, a]) for a in range(3))
    if isinstance(vol, np.ndarray):
        return np.asarray(vol[idx], dtype=np.float64)
    out = vol.vindex[idx]
    if hasattr(out, "compute"):
        out = out.compute()
    return np.asarray(out, dtype=np.float64)


class _Pool:
    """Image values at the voxels under the windows, each voxel read once.

    A voxel's slot never changes once given (new voxels are appended); slot 0 is a dummy
    (value 0) standing for voxels outside the volume.
    """

    def __init__(self, vol: Any, shape: tuple[int, ...]) -> None:
        self.vol = vol
        self.shape = shape
        self.ids = np.array([-1], dtype=np.int64)  # flat voxel id of each slot
        self.vals = np.zeros(1)
        self._sorted = self.ids.copy()
        self._order = np.zeros(1, dtype=np.int64)

    def slots(self, flat: np.ndarray) -> np.ndarray:
        """Slots of flat voxel ids (``-1``: outside, slot 0), reading new voxels."""
        pos = np.minimum(np.searchsorted(self._sorted, flat), len(self._sorted) - 1)
        missing = self._sorted[pos] != flat
        if missing.any():
            new = np.sort(flat[missing])
            new = new[np.r_[True, new[1:] != new[:-1]]]
            zyx = np.stack(np.unravel_index(new, self.shape), axis=1)
            self.vals = np.concatenate([self.vals, gather(self.vol, zyx)])
            self.ids = np.concatenate([self.ids, new])
            self._order = np.argsort(self.ids, kind="stable")
            self._sorted = self.ids[self._order]
            pos = np.searchsorted(self._sorted, flat)
        return self._order[pos]


class _Model:
    """Spots (centre, amplitude, background), their windows and the summed model.

    A window is the product grid ``centre + offsets_z x offsets_y x offsets_x`` around
    the spot's rounded centre, so its Gaussian is an outer product of three 1-D ones.
    """

    def __init__(self, vol: Any, sigma_vox: tuple[float, float, float]) -> None:
        self.pool = _Pool(vol, tuple(int(s) for s in vol.shape))
        self.sigma = np.asarray(sigma_vox, dtype=np.float64)
        self.inv2 = np.where(self.sigma > 0, 1.0 / np.maximum(self.sigma, _EPS) ** 2, 0.0)
        self.reach = np.array(
            [0 if s <= 0 else max(1, round(_WINDOW_SIGMAS * s)) for s in sigma_vox]
        )
        self.offsets = [np.arange(-r, r + 1) for r in self.reach]
        self.grid = tuple(len(o) for o in self.offsets)
        self.k = int(np.prod(self.grid))

    # --- state -----------------------------------------------------------------
    def set(
        self, zyx: np.ndarray, amp: np.ndarray, bg: np.ndarray, floor: np.ndarray
    ) -> np.ndarray:
        """Replace the spots (stored in position order); returns each input's row.

        ``floor``: the smallest fitted amplitude each spot may keep (its threshold).
        """
        order = np.lexsort((zyx[:, 2], zyx[:, 1], zyx[:, 0]))
        self.zyx = np.array(zyx[order], dtype=np.float64)
        self.amp = np.array(amp[order], dtype=np.float64)
        self.bg = np.array(bg[order], dtype=np.float64)
        self.floor = np.array(floor[order], dtype=np.float64)
        self.centres = np.rint(self.zyx).astype(np.int64)
        self.slot, self.weight = self._windows(self.centres)
        self.render()
        rows = np.empty(len(order), dtype=np.int64)
        rows[order] = np.arange(len(order))
        return rows

    def _windows(self, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pool slots ``(n, k)`` and in-volume weights ``(n, k)`` of windows at ``centres``."""
        n = len(centres)
        shape = self.pool.shape
        strides = (shape[1] * shape[2], shape[2], 1)
        flat = np.zeros((n, 1, 1, 1), dtype=np.int64)
        inside = np.ones((n, 1, 1, 1), dtype=bool)
        for a in range(3):
            v = centres[:, a, None] + self.offsets[a][None]
            sh = [n, 1, 1, 1]
            sh[a + 1] = len(self.offsets[a])
            flat = flat + (v * strides[a]).reshape(sh)
            inside = inside & ((v >= 0) & (v < shape[a])).reshape(sh)
        flat = np.where(inside, flat, -1).reshape(n, self.k)
        return self.pool.slots(flat), inside.reshape(n, self.k).astype(np.float64)

    def render(self) -> None:
        """The summed model of all spots on the pool's voxels, from scratch."""
        g = self.gauss(np.arange(len(self.zyx)))[0]
        self.model = np.bincount(
            self.slot.ravel(),
            weights=(self.amp[:, None] * g * self.weight).ravel(),
            minlength=len(self.pool.vals),
        )

    def recentre(self) -> None:
        """New windows for spots whose rounded centre changed; model from scratch."""
        centres = np.rint(self.zyx).astype(np.int64)
        moved = np.flatnonzero(np.any(centres != self.centres, axis=1))
        if len(moved):
            self.centres[moved] = centres[moved]
            self.slot[moved], self.weight[moved] = self._windows(centres[moved])
        self.render()

    # --- Gaussians on windows ----------------------------------------------------
    def _axis_terms(self, zyx: np.ndarray, centres: np.ndarray) -> list[np.ndarray]:
        """Per axis ``v - p`` ``(n, K_a)`` (voxel minus centre)."""
        return [centres[:, a, None] + self.offsets[a][None] - zyx[:, a, None] for a in range(3)]

    def _expand(self, a: int, x: np.ndarray) -> np.ndarray:
        sh = [len(x), 1, 1, 1]
        sh[a + 1] = x.shape[1]
        return x.reshape(sh)

    def gauss_at(
        self, zyx: np.ndarray, centres: np.ndarray, derivatives: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Unit Gaussians at ``zyx`` on the windows at ``centres``: ``g`` ``(n, k)`` and,
        if asked, ``dg/dp_a / g`` per axis ``(n, k)`` (zero along a 2-D z)."""
        u = self._axis_terms(zyx, centres)
        g4 = np.ones((len(zyx), 1, 1, 1))
        for a in range(3):
            g4 = g4 * self._expand(a, np.exp(-0.5 * self.inv2[a] * u[a] * u[a]))
        g = np.broadcast_to(g4, (len(zyx), *self.grid)).reshape(len(zyx), self.k)
        if not derivatives:
            return g, []
        shape = (len(zyx), *self.grid)
        d = [
            np.broadcast_to(self._expand(a, u[a] * self.inv2[a]), shape).reshape(len(zyx), self.k)
            for a in range(3)
        ]
        return g, d

    def gauss(
        self, rows: np.ndarray, derivatives: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.gauss_at(self.zyx[rows], self.centres[rows], derivatives)

    def window_data(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image minus every other spot on the windows of ``rows``, and the unit Gaussian."""
        g = self.gauss(rows)[0]
        own = self.amp[rows, None] * g * self.weight[rows]
        slot = self.slot[rows]
        return self.pool.vals[slot] - self.model[slot] + own, g

    # --- refinement ----------------------------------------------------------------
    def colours(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` in classes whose windows do not overlap (greedy colouring of the
        overlap graph in position order)."""
        scale = 1.0 / np.maximum(2 * self.reach, 1)
        pairs = cKDTree(self.centres[rows] * scale).query_pairs(
            r=1.0, p=np.inf, output_type="ndarray"
        )
        if not len(pairs):
            return [rows]
        both = np.concatenate([pairs, pairs[:, ::-1]])
        both = both[np.argsort(both[:, 0], kind="stable")]
        starts = np.searchsorted(both[:, 0], np.arange(len(rows) + 1))
        nbr = both[:, 1].tolist()
        colour = [-1] * len(rows)
        for i in range(len(rows)):
            used = {colour[j] for j in nbr[starts[i] : starts[i + 1]]}
            c = 0
            while c in used:
                c += 1
            colour[i] = c
        col = np.asarray(colour)
        by = np.argsort(col, kind="stable")
        return np.split(rows[by], np.flatnonzero(np.diff(col[by])) + 1)

    def sweep(self, rows: np.ndarray) -> None:
        """One Gauss-Seidel sweep over ``rows``: a damped Gauss-Newton step on each
        spot's ``(a, b, p)``, colour class by colour class, on unchanged windows."""
        lim = _MAX_STEP_SIGMAS * self.sigma
        for cls in self.colours(rows):
            g, d = self.gauss(cls, derivatives=True)
            wt = self.weight[cls]
            slot = self.slot[cls]
            a, b = self.amp[cls], self.bg[cls]
            self.model[slot] -= a[:, None] * g * wt  # disjoint windows: no repeated slot
            resid = (self.pool.vals[slot] - self.model[slot] - a[:, None] * g - b[:, None]) * wt
            ag = np.maximum(a, _EPS)[:, None] * g * wt
            jac = np.stack([g * wt, wt, ag * d[0], ag * d[1], ag * d[2]], axis=1)
            step = _damped_step(jac, resid, _DAMPING)
            self.amp[cls] = np.maximum(a + step[:, 0], 0.0)
            self.bg[cls] = b + step[:, 1]
            self.zyx[cls] += np.clip(step[:, 2:], -lim, lim)
            g = self.gauss(cls)[0]
            self.model[slot] += self.amp[cls, None] * g * wt

    def refine(self, rows: np.ndarray, sweeps: int) -> None:
        for _ in range(sweeps):
            if len(rows):
                self.sweep(rows)
            self.recentre()

    def neighbours(self, rows: np.ndarray) -> np.ndarray:
        """Spots whose windows overlap those of ``rows`` (``rows`` included)."""
        if not len(rows):
            return rows
        scale = 1.0 / np.maximum(2 * self.reach, 1)
        hits = cKDTree(self.centres * scale).query_ball_point(
            self.centres[rows] * scale, r=1.0, p=np.inf
        )
        return np.unique(np.concatenate([np.asarray(h, dtype=np.int64) for h in hits]))


def _damped_step(jac: np.ndarray, resid: np.ndarray, damping: np.ndarray | float) -> np.ndarray:
    """Levenberg-Marquardt steps for a batch: ``jac`` ``(n, m, k)``, ``resid`` ``(n, k)``."""
    jtj = jac @ jac.transpose(0, 2, 1)
    jtr = (jac @ resid[..., None])[..., 0]
    diag = np.einsum("nii->ni", jtj)
    damp = np.asarray(damping, dtype=np.float64).reshape(-1, 1) * diag + _EPS
    jtj = jtj + damp[:, :, None] * np.eye(jac.shape[1])
    return np.linalg.solve(jtj, jtr[..., None])[..., 0]


def _split_fit(
    model: _Model, rows: np.ndarray, data: np.ndarray, wt: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two Gaussians and a background per window (Levenberg-Marquardt).

    ``wt`` ``(n, k)``: square roots of the voxels' weights (0 outside the volume).
    Returns the centres ``p1, p2`` ``(n, 3)``, amplitudes ``a1, a2`` ``(n,)`` and the
    weighted residual sums of squares ``(n,)``.
    """
    sigma = model.sigma
    centres = model.centres[rows]
    pos, amp, bg = model.zyx[rows], model.amp[rows], model.bg[rows]
    # start along the principal axis of the window's light (in sigma units)
    light = np.maximum(data - bg[:, None], 0.0) * model.weight[rows]
    total = light.sum(axis=1) + _EPS
    u = model._axis_terms(pos, centres)
    shape = (len(rows), *model.grid)
    coords = np.stack(
        [
            np.broadcast_to(model._expand(a, u[a]) * np.sqrt(model.inv2[a]), shape).reshape(
                len(rows), model.k
            )
            for a in range(3)
        ],
        axis=1,
    )  # (n, 3, k) in sigma units
    mean = (coords * light[:, None]).sum(axis=2) / total[:, None]
    cc = (coords - mean[..., None]) * np.sqrt(light)[:, None]
    cov = cc @ cc.transpose(0, 2, 1) / total[:, None, None]
    axis = np.linalg.eigh(cov + _EPS * np.eye(3))[1][:, :, -1] * sigma
    p1, p2 = pos + _SPLIT_START_SIGMAS * axis, pos - _SPLIT_START_SIGMAS * axis
    a1, a2, b = 0.55 * amp, 0.55 * amp, bg.copy()
    lim = np.r_[np.inf, sigma, np.inf, sigma, np.inf]

    def residual(
        p1: np.ndarray, p2: np.ndarray, a1: np.ndarray, a2: np.ndarray, b: np.ndarray
    ) -> np.ndarray:
        g1 = model.gauss_at(p1, centres)[0]
        g2 = model.gauss_at(p2, centres)[0]
        return (data - a1[:, None] * g1 - a2[:, None] * g2 - b[:, None]) * wt

    cost = (residual(p1, p2, a1, a2, b) ** 2).sum(axis=1)
    lam = np.full(len(rows), 1e-2)
    active = np.arange(len(rows))
    for _ in range(_LM_ITERATIONS):
        if not len(active):
            break
        i = active
        g1, d1 = model.gauss_at(p1[i], centres[i], derivatives=True)
        g2, d2 = model.gauss_at(p2[i], centres[i], derivatives=True)
        w = wt[i]
        r = (data[i] - a1[i, None] * g1 - a2[i, None] * g2 - b[i, None]) * w
        ag1, ag2 = a1[i, None] * g1 * w, a2[i, None] * g2 * w
        jac = np.stack(
            [g1 * w, ag1 * d1[0], ag1 * d1[1], ag1 * d1[2]]
            + [g2 * w, ag2 * d2[0], ag2 * d2[1], ag2 * d2[2], w],
            axis=1,
        )
        step = np.clip(_damped_step(jac, r, lam[i]), -lim, lim)
        t1, t2 = p1[i] + step[:, 1:4], p2[i] + step[:, 5:8]
        ta1, ta2, tb = a1[i] + step[:, 0], a2[i] + step[:, 4], b[i] + step[:, 8]
        sub = model.gauss_at(t1, centres[i])[0], model.gauss_at(t2, centres[i])[0]
        tr = (data[i] - ta1[:, None] * sub[0] - ta2[:, None] * sub[1] - tb[:, None]) * w
        new = (tr * tr).sum(axis=1)
        ok = new < cost[i]
        better = i[ok]
        p1[better], p2[better] = t1[ok], t2[ok]
        a1[better], a2[better], b[better] = ta1[ok], ta2[ok], tb[ok]
        gain = cost[i] - np.where(ok, new, cost[i])
        cost[better] = new[ok]
        lam[i] = np.where(ok, lam[i] * 0.3, lam[i] * 10.0)
        # converged: the last step gained less than a thousandth of the cost
        active = i[~(ok & (gain < 1e-3 * cost[i])) & (lam[i] < 1e6)]
    return p1, p2, a1, a2, cost


def fit_spots(
    vol: Any,
    zyx: np.ndarray,
    amplitude: np.ndarray,
    *,
    sigma_vox: tuple[float, float, float],
    min_amplitude: float | np.ndarray,
    settings: FitSettings | None = None,
) -> SpotFit:
    """Fit all spots jointly, split unresolved pairs, drop spots below the threshold.

    Parameters
    ----------
    vol : ``(z, y, x)`` image (numpy, memory map, zarr or dask; read point-wise).
    zyx : ``(n, 3)`` starting sub-voxel centres (voxels).
    amplitude : ``(n,)`` starting peak amplitudes above background (image units).
    sigma_vox : PSF sigma in voxels (``z`` 0 for a 2-D image).
    min_amplitude : the detection threshold as a fitted amplitude (image units), one for
        all spots or ``(n,)``: every half of a split and every spot kept must reach it.
    settings : split and pruning parameters.

    Returns
    -------
    SpotFit, spots in position order.
    """
    cfg = settings or FitSettings()
    if len(zyx) == 0:
        return SpotFit(np.zeros((0, 3)), np.zeros(0), np.zeros(0), 0, 0, float("nan"), float("nan"))
    model = _Model(vol, sigma_vox)
    floor = np.broadcast_to(np.asarray(min_amplitude, dtype=np.float64), (len(zyx),))
    model.set(np.asarray(zyx, dtype=np.float64), np.asarray(amplitude), np.zeros(len(zyx)), floor)
    model.refine(np.arange(len(model.zyx)), cfg.refine_sweeps)
    reference = float(np.median(model.amp))
    noise_var, gain = _noise_model(model)

    n_split = 0
    test = np.arange(len(model.zyx))
    for _ in range(cfg.split_rounds):
        if not len(test):
            break
        data, g = model.window_data(test)
        # voxel weights 1 / (noise variance + gain x expected signal): shot noise makes
        # the centre of a bright spot noisier than the background around it
        sqrt_w = model.weight[test] / np.sqrt(noise_var + gain * model.model[model.slot[test]])
        chi2_one = _one_spot_chi2(data, g, sqrt_w)
        p1, p2, a1, a2, chi2_two = _split_fit(model, test, data, sqrt_w)
        # misfit beyond the noise model (texture, a wrong PSF) scales the test up
        scale = np.maximum(1.0, chi2_two / np.maximum(model.weight[test].sum(axis=1) - 9, 1))
        accept = (chi2_one - chi2_two >= cfg.min_delta_chi2 * scale) & (
            np.minimum(a1, a2) >= np.maximum(cfg.min_child_fraction * reference, model.floor[test])
        )
        for p in (p1, p2):  # both halves in the window, else one is a neighbour's light
            accept &= np.all(np.abs(p - model.centres[test]) <= model.reach + 0.5, axis=1)
        if not accept.any():
            break
        split = test[accept]
        n_split += len(split)
        keep = np.ones(len(model.zyx), dtype=bool)
        keep[split] = False
        n_keep = int(keep.sum())
        rows = model.set(
            np.concatenate([model.zyx[keep], p1[accept], p2[accept]]),
            np.concatenate([model.amp[keep], a1[accept], a2[accept]]),
            np.concatenate([model.bg[keep], model.bg[split], model.bg[split]]),
            np.concatenate([model.floor[keep], model.floor[split], model.floor[split]]),
        )
        test = rows[n_keep:]
        model.refine(model.neighbours(test), cfg.refine_sweeps)

    n_pruned = 0
    for _ in range(cfg.prune_rounds):
        weak = np.flatnonzero(model.amp < model.floor)
        if not len(weak):
            break
        drop = _weakest_of_neighbours(model, weak)
        touched = model.neighbours(drop)
        keep = np.ones(len(model.zyx), dtype=bool)
        keep[drop] = False
        n_pruned += len(drop)
        rows = model.set(model.zyx[keep], model.amp[keep], model.bg[keep], model.floor[keep])
        kept = np.cumsum(keep) - 1  # index among the kept spots
        model.refine(rows[kept[touched[keep[touched]]]], 1)
    keep = model.amp >= model.floor
    if not keep.all():
        n_pruned += int((~keep).sum())
        model.set(model.zyx[keep], model.amp[keep], model.bg[keep], model.floor[keep])
    return SpotFit(model.zyx, model.amp, model.floor, n_split, n_pruned, noise_var, gain)


def _noise_model(model: _Model) -> tuple[float, float]:
    """Noise variance as ``noise_var + gain x signal`` from the fitted windows.

    The squared residuals of all windows are binned by the model's signal at the voxel;
    a line through the bins' medians (over the median of chi-square with one degree of
    freedom, 0.455) gives the background variance and the shot-noise gain (>= 0).
    """
    rows = np.arange(len(model.zyx))
    data, g = model.window_data(rows)
    valid = model.weight > 0
    resid = (data - model.amp[:, None] * g - model.bg[:, None])[valid]
    signal = model.model[model.slot][valid]
    order = np.argsort(signal, kind="stable")
    bins = np.array_split(order, min(20, max(1, len(order) // 200)))
    x = np.array([np.median(signal[b]) for b in bins])
    y = np.array([np.median(resid[b] ** 2) / 0.455 for b in bins])
    if len(bins) < 3 or np.ptp(x) <= 0:
        return max(float(np.median(y)), _EPS), 0.0
    gain, noise_var = np.polyfit(x, y, 1)
    noise_var = float(y[0]) if noise_var <= 0 else float(noise_var)
    return max(noise_var, _EPS), max(float(gain), 0.0)


def _one_spot_chi2(data: np.ndarray, g: np.ndarray, sqrt_w: np.ndarray) -> np.ndarray:
    """Weighted residual sum of squares of one Gaussian (at its fitted centre) plus a
    background, amplitude and background re-solved under the weights."""
    jac = np.stack([g * sqrt_w, sqrt_w], axis=1)
    y = data * sqrt_w
    jtj = jac @ jac.transpose(0, 2, 1) + _EPS * np.eye(2)
    coef = np.linalg.solve(jtj, (jac @ y[..., None]))[..., 0]
    r = y - (coef[:, :, None] * jac).sum(axis=1)
    return (r * r).sum(axis=1)


def _weakest_of_neighbours(model: _Model, weak: np.ndarray) -> np.ndarray:
    """The weak spots weaker than every other weak spot whose window overlaps theirs
    (ties: position order), so that two spots sharing one are not both dropped."""
    scale = 1.0 / np.maximum(2 * model.reach, 1)
    pts = model.centres[weak] * scale
    hits = cKDTree(pts).query_ball_point(pts, r=1.0, p=np.inf)
    amp = model.amp[weak]
    return np.asarray(
        [weak[i] for i, h in enumerate(hits) if all((amp[i], i) <= (amp[j], j) for j in h)],
        dtype=np.int64,
    )
