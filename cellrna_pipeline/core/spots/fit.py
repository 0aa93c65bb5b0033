"""Joint Gaussian fitting of detected spots and the split test that resolves close pairs.

Near the spots, the image is modelled as ``I(v) = b_i + sum_j a_j g(v - p_j)``: every spot
``j`` a Gaussian of the known PSF sigma (peak ``a_j`` at sub-voxel ``p_j``) over a local
background ``b_i``, constant in the window of spot ``i`` (``+-2 sigma`` per axis). The fit
follows crowded-field photometry (DAOPHOT's ALLSTAR and its successors):

1. **Refinement** (Gauss-Seidel): each spot's ``(a, b, p)`` gets a damped Gauss-Newton step
   on its window with every other spot's model subtracted, one spot after the other, so
   two overlapping spots never both claim the light they share (updated at once, as in
   Jacobi iterations, the fit oscillates). Spots in slabs along y whose windows cannot
   touch are swept on several threads at once, which is the same as one after the other.
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
not depend on chunking (spots are processed in position order). The per-spot and
per-window loops are numba kernels (:mod:`._kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from cellrna_pipeline.core.device import cpu_threads
from cellrna_pipeline.core.spots import _kernels as _k
from cellrna_pipeline.core.spots._threads import pieces, thread_map

__all__ = ["FitSettings", "SpotFit", "fit_spots", "gather"]

_WINDOW_SIGMAS = 2.0  # a spot's window: +-2 sigma per axis (at least one voxel)
_MAX_STEP_SIGMAS = 0.5  # one refinement step moves a spot at most this far per axis
_SPLIT_START_SIGMAS = 0.6  # the two halves start this far either side of the centre
_LM_ITERATIONS = 8
_LM_TOLERANCE = 0.05  # a split fit has converged when a step gains < 0.05 noise variances
_LM_HOPELESS_AFTER = 3
_DAMPING = 0.1  # Gauss-Newton steps of the refinement: Marquardt damping
_EPS = _k.EPS
_DENSE_POOL_VOXELS = 8_000_000  # in-memory images up to this size are used whole
_NOISE_MODEL_VOXELS = 4_000_000  # the noise model reads at most about this many voxels
_SPLIT_BATCH = 8192  # windows fitted together by the split test, at most (memory)
_SPLIT_PIECE = 128  # ... and at least, when they are spread over threads
_MAX_SLABS = 8  # sweeps: the spots fall into up to this many slabs along y ...
_SLAB_SPOTS = 256  # ... of at least this many spots (fewer: one sequential sweep)
_WINDOW_BATCH = 16384  # spots whose windows are looked up (and read) together
_GATHER_TILE = (32, 128, 2048)  # lazy slice-only arrays are read one such box at a time


_NONE = (np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros(0))  # no spots to add
# the per-spot arrays of :class:`_Model`, all in position order
_SPOT_ARRAYS = ("zyx", "amp", "bg", "floor", "centres", "slot", "weight")


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
    with ``vindex``) point-wise, chunk by chunk; any other array that supports basic
    slicing (a lazy file reader) one box per tile of ``_GATHER_TILE`` voxels that holds
    points (the box around that tile's points), so at most one tile is in memory.
    """
    idx = tuple(np.ascontiguousarray(zyx[:, a]) for a in range(3))
    if isinstance(vol, np.ndarray):
        return np.asarray(vol[idx], dtype=np.float64)
    if hasattr(vol, "vindex"):
        out = vol.vindex[idx]
        if hasattr(out, "compute"):
            out = out.compute()
        return np.asarray(out, dtype=np.float64)
    out = np.empty(len(zyx), dtype=np.float64)
    tile = np.ravel_multi_index(
        tuple((zyx // _GATHER_TILE).T),
        tuple(int(s) // t + 1 for s, t in zip(vol.shape, _GATHER_TILE, strict=True)),
    )
    order = np.argsort(tile, kind="stable")
    cuts = np.flatnonzero(np.diff(tile[order])) + 1
    for rows in np.split(order, cuts):
        pts = zyx[rows]
        lo, hi = pts.min(axis=0), pts.max(axis=0) + 1
        box = np.asarray(vol[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
        out[rows] = box[tuple((pts - lo).T)]
    return out


class _Pool:
    """Image values at the voxels under the windows, each voxel read once.

    A voxel's slot never changes once given (new voxels are appended); slot 0 is a dummy
    (value 0) standing for voxels outside the volume (their weight is 0). An in-memory
    image up to ``_DENSE_POOL_VOXELS`` is used whole (slot = flat index, no look-ups).
    """

    def __init__(self, vol: Any, shape: tuple[int, ...]) -> None:
        self.vol = vol
        self.shape = shape
        self.dense = isinstance(vol, np.ndarray) and int(np.prod(shape)) <= _DENSE_POOL_VOXELS
        if self.dense:  # slot = flat index; outside voxels read voxel 0 with weight 0
            self.vals = np.ascontiguousarray(vol).reshape(-1)
        else:
            self.vals = np.zeros(1)
            self.ids = np.array([-1], dtype=np.int64)  # flat voxel id of each slot
            self._sorted = self.ids.copy()
            self._order = np.zeros(1, dtype=np.int64)

    def slots(self, flat: np.ndarray) -> np.ndarray:
        """Slots of flat voxel ids (``-1``: outside, slot 0), reading new voxels."""
        if self.dense:
            return np.maximum(flat, 0)
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

    def __init__(self, vol: Any, sigma_vox: tuple[float, float, float], threads: int = 1) -> None:
        self.pool = _Pool(vol, tuple(int(s) for s in vol.shape))
        self.threads = threads  # for the sweeps (the result does not depend on it)
        self.sigma = np.asarray(sigma_vox, dtype=np.float64)
        # axes without extent (z of a 2-D image): the Gaussian does not depend on p_a
        self.inv2 = np.where(self.sigma > 0, 1.0 / np.maximum(self.sigma, _EPS) ** 2, 0.0)
        self.reach = np.array(
            [0 if s <= 0 else max(1, round(_WINDOW_SIGMAS * s)) for s in sigma_vox]
        )
        self.offsets = [np.arange(-r, r + 1) for r in self.reach]
        self.k = int(np.prod([len(o) for o in self.offsets]))  # voxels per window
        self.model = np.zeros(0)  # the summed model of all spots, per pool slot

    # --- state -----------------------------------------------------------------
    def set(
        self, zyx: np.ndarray, amp: np.ndarray, bg: np.ndarray, floor: np.ndarray
    ) -> np.ndarray:
        """Set all spots (stored in position order) and build the summed model from
        scratch (:meth:`replace` changes some); returns each input's row.

        ``floor``: the smallest fitted amplitude each spot may keep (its threshold).
        """
        order = np.lexsort((zyx[:, 2], zyx[:, 1], zyx[:, 0]))
        self.zyx = np.array(zyx[order], dtype=np.float64)
        self.amp = np.array(amp[order], dtype=np.float64)
        self.bg = np.array(bg[order], dtype=np.float64)
        self.floor = np.array(floor[order], dtype=np.float64)
        self.centres = np.rint(self.zyx).astype(np.int64)
        self.slot, self.weight = self._windows(self.centres)
        self.model = np.zeros(len(self.pool.vals))
        self._add(np.arange(len(self.zyx)), 1.0)
        rows = np.empty(len(order), dtype=np.int64)
        rows[order] = np.arange(len(order))
        return rows

    def replace(
        self,
        keep: np.ndarray,
        zyx: np.ndarray,
        amp: np.ndarray,
        bg: np.ndarray,
        floor: np.ndarray,
    ) -> np.ndarray:
        """Keep the spots where ``keep`` (bool ``(n,)``) and add new ones (``zyx`` ``(m,
        3)`` etc., as in :meth:`set`); the model changes only under the windows of the
        spots dropped and added. Returns the row of each kept spot, then of each new one
        (spots stay in position order)."""
        self._add(np.flatnonzero(~keep), -1.0)
        if not len(zyx):  # only removals: the kept spots stay in position order
            for name in _SPOT_ARRAYS:
                setattr(self, name, getattr(self, name)[keep])
            return np.arange(len(self.zyx))
        centres = np.rint(zyx).astype(np.int64)
        slot, weight = self._windows(centres)
        self._grow_model()
        new = (np.asarray(zyx, dtype=np.float64), amp, bg, floor, centres, slot, weight)
        all_zyx = np.concatenate([self.zyx[keep], new[0]])
        order = np.lexsort((all_zyx[:, 2], all_zyx[:, 1], all_zyx[:, 0]))
        for name, added in zip(_SPOT_ARRAYS, new, strict=True):
            setattr(self, name, np.concatenate([getattr(self, name)[keep], added])[order])
        rows = np.empty(len(order), dtype=np.int64)
        rows[order] = np.arange(len(order))
        self._add(rows[len(order) - len(zyx) :], 1.0)
        return rows

    def _windows(self, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pool slots ``(n, k)`` and in-volume weights ``(n, k)`` of windows at ``centres``
        (in batches of ``_WINDOW_BATCH`` spots: the look-ups and reads stay small)."""
        parts = [
            self._window_batch(centres[i : i + _WINDOW_BATCH])
            for i in range(0, max(len(centres), 1), _WINDOW_BATCH)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _window_batch(self, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(centres)
        shape = self.pool.shape
        strides = (shape[1] * shape[2], shape[2], 1)
        flat: np.ndarray = np.zeros((n, 1, 1, 1), dtype=np.int64)
        inside = np.ones((n, 1, 1, 1), dtype=bool)
        for a in range(3):
            v = centres[:, a, None] + self.offsets[a][None]
            sh = [n, 1, 1, 1]
            sh[a + 1] = len(self.offsets[a])
            flat = flat + (v * strides[a]).reshape(sh)
            inside = inside & ((v >= 0) & (v < shape[a])).reshape(sh)
        flat = np.where(inside, flat, -1).reshape(n, self.k)
        return self.pool.slots(flat), inside.reshape(n, self.k).astype(np.float64)

    def recentre(self) -> None:
        """New windows for the spots whose rounded centre changed (the model moves its
        Gaussians from their old windows to their new ones)."""
        centres = np.rint(self.zyx).astype(np.int64)
        moved = np.flatnonzero(np.any(centres != self.centres, axis=1))
        if not len(moved):
            return
        self._add(moved, -1.0)
        self.centres[moved] = centres[moved]
        self.slot[moved], self.weight[moved] = self._windows(centres[moved])
        self._grow_model()
        self._add(moved, 1.0)

    def _grow_model(self) -> None:
        """Zeros for the voxels the pool has read since the model was last sized."""
        if not len(self.model):
            self.model = np.zeros(len(self.pool.vals))
        elif len(self.model) < len(self.pool.vals):
            self.model = np.concatenate(
                [self.model, np.zeros(len(self.pool.vals) - len(self.model))]
            )

    def _add(self, rows: np.ndarray, sign: float) -> None:
        """Add (``sign`` 1) or subtract (-1) the spots ``rows`` to / from the summed model."""
        _k.add_spots(
            rows, sign, self.zyx, self.amp, self.centres, self.slot, self.weight,
            self.reach, self.inv2, self.model,
        )  # fmt: skip

    def window_data(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image minus every other spot on the windows of ``rows``, and the unit
        Gaussian, ``(n, k)`` float64 each."""
        return _k.window_data(
            rows, self.zyx, self.amp, self.centres, self.slot, self.weight,
            self.reach, self.inv2, self.pool.vals, self.model,
        )  # fmt: skip

    # --- refinement ----------------------------------------------------------------
    def slabs(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` in groups for a sweep: the spots inside each of up to ``_MAX_SLABS``
        slabs along y, then (last) those within ``reach`` of a cut between slabs. Windows
        of different slabs' inner spots are more than ``2 reach`` apart in y, so they never
        share a voxel: those groups may be swept at the same time. Position order within
        a group; the groups depend on the spots only, never on the thread count."""
        count = min(_MAX_SLABS, len(rows) // _SLAB_SPOTS)
        if count <= 1:
            return [rows[:0], rows]
        y = self.centres[rows, 1]
        lo, hi = int(y.min()), int(y.max())
        cuts = np.floor(lo + (hi - lo + 1) * np.arange(1, count) / count) - 0.5
        slab = np.searchsorted(cuts, y)
        near = np.abs(y[:, None] - cuts[None]).min(axis=1) <= self.reach[1]
        inner = [rows[(slab == k) & ~near] for k in range(count)]
        return [*inner, rows[near]]

    def sweep(self, order: np.ndarray) -> None:
        """One Gauss-Seidel sweep over the spots ``order``: a damped Gauss-Newton step
        on each spot's ``(a, b, p)``, on unchanged windows."""
        _k.sweep(
            order, self.zyx, self.amp, self.bg, self.centres, self.slot, self.weight,
            self.reach, self.inv2, _MAX_STEP_SIGMAS * self.sigma, _DAMPING,
            self.pool.vals, self.model,
        )  # fmt: skip

    def refine(self, rows: np.ndarray, sweeps: int) -> None:
        """Gauss-Seidel sweeps over ``rows``, the inner spots of the slabs on
        ``self.threads`` threads, then the spots near the cuts (:meth:`slabs`); the
        windows move to the spots' new centres after each sweep."""
        if not len(rows):
            return
        for _ in range(sweeps):
            *inner, near = self.slabs(rows)
            thread_map(self.sweep, [(g,) for g in inner if len(g)], self.threads)
            self.sweep(near)
            self.recentre()

    def neighbours(self, rows: np.ndarray) -> np.ndarray:
        """Spots whose windows overlap those of ``rows`` (``rows`` included)."""
        if not len(rows):
            return rows
        return np.unique(_k.overlapping(self.centres[rows], self.centres, 2 * self.reach)[:, 1])


def _split_start(model: _Model, rows: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Two-spot start per window, ``(n, 9)`` ``[a1, p1, a2, p2, b]``: either side of the
    centre along the principal axis of the window's light (in sigma units)."""
    pos, amp, bg = model.zyx[rows], model.amp[rows], model.bg[rows]
    cov = _k.light_covariance(
        data, bg, model.weight[rows], pos, model.centres[rows], model.reach, model.inv2,
        model.sigma,
    )  # fmt: skip
    axis = _k.principal_axes(cov)[1] * model.sigma
    return np.concatenate(
        [
            (0.55 * amp)[:, None],
            pos + _SPLIT_START_SIGMAS * axis,
            (0.55 * amp)[:, None],
            pos - _SPLIT_START_SIGMAS * axis,
            bg[:, None],
        ],
        axis=1,
    )


def fit_spots(
    vol: Any,
    zyx: np.ndarray,
    amplitude: np.ndarray,
    *,
    sigma_vox: tuple[float, float, float],
    min_amplitude: float | np.ndarray,
    settings: FitSettings | None = None,
    threads: int | None = None,
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
    threads : for the refinement's sweeps and the split test's fits (default
        :func:`~cellrna_pipeline.core.device.cpu_threads`); the result does not depend on
        it.

    Returns
    -------
    SpotFit, spots in position order.
    """
    cfg = settings or FitSettings()
    threads = threads or cpu_threads()
    if len(zyx) == 0:
        return SpotFit(np.zeros((0, 3)), np.zeros(0), np.zeros(0), 0, 0, float("nan"), float("nan"))
    model = _Model(vol, sigma_vox, threads)
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
        parts = thread_map(
            _split_fit,
            [
                (model, test[a:b], noise_var, gain, cfg.min_delta_chi2)
                for a, b in pieces(len(test), threads, _SPLIT_PIECE, _SPLIT_BATCH)
            ],
            threads,
        )
        two, chi2_one, chi2_two = (np.concatenate(p) for p in zip(*parts, strict=True))
        a1, p1, a2, p2 = two[:, 0], two[:, 1:4], two[:, 4], two[:, 5:8]
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
        rows = model.replace(
            keep,
            np.concatenate([p1[accept], p2[accept]]),
            np.concatenate([a1[accept], a2[accept]]),
            np.concatenate([model.bg[split], model.bg[split]]),
            np.concatenate([model.floor[split], model.floor[split]]),
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
        rows = model.replace(keep, *_NONE)
        kept = np.cumsum(keep) - 1  # index among the kept spots
        model.refine(rows[kept[touched[keep[touched]]]], 1)
    keep = model.amp >= model.floor
    if not keep.all():
        n_pruned += int((~keep).sum())
        model.replace(keep, *_NONE)
    return SpotFit(model.zyx, model.amp, model.floor, n_split, n_pruned, noise_var, gain)


def _split_fit(
    model: _Model, rows: np.ndarray, noise_var: float, gain: float, min_gain: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-spot fits of the windows of ``rows``: parameters ``(n, 9)`` and the weighted
    residual sums of squares of the one- and the two-spot fit ``(n,)`` each. Reads the
    model only (threads may fit other rows at the same time)."""
    data, g = model.window_data(rows)
    sqrt_w = _weights(model, rows, noise_var, gain)
    start = _split_start(model, rows, data)
    settings = (float(_LM_ITERATIONS), _LM_TOLERANCE, float(_LM_HOPELESS_AFTER), float(min_gain))
    return _k.split_fits(
        data, g, sqrt_w, start, model.centres[rows], model.reach, model.inv2, model.sigma,
        settings,
    )  # fmt: skip


def _weights(model: _Model, rows: np.ndarray, noise_var: float, gain: float) -> np.ndarray:
    """Square roots of the voxel weights ``1 / (noise_var + gain x signal)`` on the
    windows of ``rows`` (0 outside the volume): shot noise makes the centre of a bright
    spot noisier than the background around it."""
    signal = model.model[model.slot[rows]]
    return model.weight[rows] / np.sqrt(noise_var + gain * np.maximum(signal, 0.0))


def _noise_model(model: _Model) -> tuple[float, float]:
    """Noise variance as ``noise_var + gain x signal`` from the fitted windows.

    The squared residuals of all windows (of every m-th window where there are many)
    are binned by the model's signal at the voxel;
    a line through the bins' medians (over the median of chi-square with one degree of
    freedom, 0.455) gives the background variance and the shot-noise gain (>= 0).
    """
    rows = np.arange(len(model.zyx))
    rows = rows[:: max(1, len(rows) * model.k // _NOISE_MODEL_VOXELS)]  # many: every m-th
    data, g = model.window_data(rows)
    valid = model.weight[rows] > 0
    resid = (data - model.amp[rows, None] * g - model.bg[rows, None])[valid]
    signal = model.model[model.slot[rows]][valid]
    step = max(1, len(signal) // 20_000)  # a regular subsample is plenty for 20 bins
    signal, resid = signal[::step], resid[::step]
    order = np.argsort(signal)
    nbins = min(20, max(1, len(order) // 200))
    per = len(order) // nbins
    order = order[len(order) - nbins * per :].reshape(nbins, per)  # equal bins
    x = np.median(signal[order], axis=1)
    y = np.median(resid[order] ** 2, axis=1) / 0.455
    if nbins < 3 or np.ptp(x) <= 0:
        return max(float(np.median(y)), _EPS), 0.0
    # least-squares line y = noise_var + gain x (closed form: no LAPACK threads)
    xc = x - x.mean()
    gain = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    noise_var = float(y.mean() - gain * x.mean())
    noise_var = float(y[0]) if noise_var <= 0 else float(noise_var)
    return max(noise_var, _EPS), max(float(gain), 0.0)


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
