"""Compiled loops of the spot detector (numba): the band-pass's separable passes
(:mod:`._candidates`), the cluster decomposition's smoothing, flood fill and matching
pursuit (:mod:`.decompose`), and the joint Gaussian fit (:mod:`.fit`) one spot or window
at a time, with its overlap look-ups.

The fit works on thousands of windows of 75-405 voxels; as batched numpy its time went
to per-call overhead and temporaries. Kernels compile on first use (about 19 s for all,
once) and are cached next to this module, in ``NUMBA_CACHE_DIR`` or in numba's user-wide
cache; where no cache directory is writable they compile in memory each run.

Windows: spot ``i``'s window is the product grid ``centres[i] + (-r_a .. r_a)`` per axis
``a`` (``reach`` ``r``), flattened in C order (voxel ``q = (iz * ly + iy) * lx + ix``);
``slot[i, q]`` is the voxel's index into the image values ``vals`` and the summed model
``model``, and ``weight[i, q]`` is 1 inside the volume and 0 outside. A unit Gaussian
centred at ``p`` is the product of three 1-D factors ``exp(-u_a^2 inv2_a / 2)``, ``u_a =
v_a - p_a`` (``inv2_a = 1 / sigma_a^2``, 0 on an axis without extent); its derivative in
``p_a`` is the Gaussian times ``u_a inv2_a``. The fit computes in float64; the filter
passes keep the float32 / float64 arithmetic of the numpy and ``scipy.ndimage`` passes
they replaced (bit-identical results).
"""

from __future__ import annotations

import math

import numba
import numpy as np

EPS = 1e-9


def _probe() -> None:
    """A function to find out whether numba can cache compiled code for this module."""


try:  # numba raises at decoration when no cache directory is writable (a read-only
    # install without a writable home): then the kernels compile in memory each run
    numba.njit(cache=True)(_probe)
    _CACHE = True
except RuntimeError:
    _CACHE = False
_TWO = 9  # parameters of a two-spot fit: [a1, z1, y1, x1, a2, z2, y2, x2, background]


@numba.njit(cache=_CACHE, nogil=True)
def _factors(
    p: np.ndarray, centre: np.ndarray, reach: np.ndarray, inv2: np.ndarray, e: np.ndarray,
    d: np.ndarray,
) -> None:  # fmt: skip
    """1-D factors of the Gaussian at ``p`` on the window at ``centre``: ``e[a, j]`` and
    ``d[a, j] = u inv2`` at offset ``j - reach[a]`` of axis ``a``."""
    for a in range(3):
        for j in range(2 * reach[a] + 1):
            u = centre[a] + (j - reach[a]) - p[a]
            e[a, j] = math.exp(-0.5 * inv2[a] * u * u)
            d[a, j] = u * inv2[a]


@numba.njit(cache=_CACHE, nogil=True)
def _solve(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> None:
    """``x = a^-1 b`` for a damped normal matrix ``a`` (symmetric positive definite; its
    lower triangle is overwritten by the Cholesky factor)."""
    n = len(b)
    for j in range(n):
        s = a[j, j]
        for k in range(j):
            s -= a[j, k] * a[j, k]
        a[j, j] = math.sqrt(s)
        for i in range(j + 1, n):
            t = a[i, j]
            for k in range(j):
                t -= a[i, k] * a[j, k]
            a[i, j] = t / a[j, j]
    for i in range(n):  # L y = b
        t = b[i]
        for k in range(i):
            t -= a[i, k] * x[k]
        x[i] = t / a[i, i]
    for i in range(n - 1, -1, -1):  # L^T x = y
        t = x[i]
        for k in range(i + 1, n):
            t -= a[k, i] * x[k]
        x[i] = t / a[i, i]


@numba.njit(cache=_CACHE, nogil=True, fastmath={"reassoc", "contract"})
def _gram(jac: np.ndarray, r: np.ndarray, jtj: np.ndarray, jtr: np.ndarray) -> None:
    """Upper triangle of ``jac jac^T`` and ``jac r`` (``jac`` ``(m, k)``, ``r`` ``(k,)``);
    sums in any order (SIMD)."""
    m, k = jac.shape
    for u in range(m):
        s = 0.0
        for q in range(k):
            s += jac[u, q] * r[q]
        jtr[u] = s
        for v in range(u, m):
            s = 0.0
            for q in range(k):
                s += jac[u, q] * jac[v, q]
            jtj[u, v] = s


@numba.njit(cache=_CACHE, nogil=True)
def _damp(jtj: np.ndarray, lam: float) -> None:
    """Mirror the upper triangle and add Marquardt damping ``lam`` (plus ``EPS``)."""
    n = len(jtj)
    for r in range(n):
        for c in range(r):
            jtj[r, c] = jtj[c, r]
        jtj[r, r] += lam * jtj[r, r] + EPS


@numba.njit(cache=_CACHE, nogil=True)
def add_spots(
    rows: np.ndarray, sign: float, zyx: np.ndarray, amp: np.ndarray, centres: np.ndarray,
    slot: np.ndarray, weight: np.ndarray, reach: np.ndarray, inv2: np.ndarray,
    model: np.ndarray,
) -> None:  # fmt: skip
    """``model[slot] += sign * amp * g * weight`` on the windows of ``rows``."""
    lz, ly, lx = 2 * reach[0] + 1, 2 * reach[1] + 1, 2 * reach[2] + 1
    e = np.empty((3, max(lz, ly, lx)))
    d = np.empty_like(e)
    for i in rows:
        _factors(zyx[i], centres[i], reach, inv2, e, d)
        a = sign * amp[i]
        q = 0
        for iz in range(lz):
            for iy in range(ly):
                ezy = a * e[0, iz] * e[1, iy]
                for ix in range(lx):
                    w = weight[i, q]
                    if w != 0.0:
                        model[slot[i, q]] += ezy * e[2, ix] * w
                    q += 1


@numba.njit(cache=_CACHE, nogil=True)
def window_data(
    rows: np.ndarray, zyx: np.ndarray, amp: np.ndarray, centres: np.ndarray, slot: np.ndarray,
    weight: np.ndarray, reach: np.ndarray, inv2: np.ndarray, vals: np.ndarray,
    model: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Image minus every other spot on the windows of ``rows`` and the unit Gaussians,
    ``(n, k)`` float64 each."""
    lz, ly, lx = 2 * reach[0] + 1, 2 * reach[1] + 1, 2 * reach[2] + 1
    e = np.empty((3, max(lz, ly, lx)))
    d = np.empty_like(e)
    data = np.empty((len(rows), lz * ly * lx))
    gauss = np.empty_like(data)
    for r in range(len(rows)):
        i = rows[r]
        _factors(zyx[i], centres[i], reach, inv2, e, d)
        q = 0
        for iz in range(lz):
            for iy in range(ly):
                for ix in range(lx):
                    g = e[0, iz] * e[1, iy] * e[2, ix]
                    s = slot[i, q]
                    gauss[r, q] = g
                    data[r, q] = vals[s] - model[s] + amp[i] * g * weight[i, q]
                    q += 1
    return data, gauss


@numba.njit(cache=_CACHE, nogil=True)
def sweep(
    order: np.ndarray, zyx: np.ndarray, amp: np.ndarray, bg: np.ndarray, centres: np.ndarray,
    slot: np.ndarray, weight: np.ndarray, reach: np.ndarray, inv2: np.ndarray, lim: np.ndarray,
    damping: float, vals: np.ndarray, model: np.ndarray,
) -> None:  # fmt: skip
    """One Gauss-Seidel sweep over the spots ``order`` (class after class): a damped
    Gauss-Newton step on each spot's ``(a, b, p)`` against the residual of the whole
    model, then the model updated under its window. ``zyx``, ``amp``, ``bg`` and
    ``model`` change in place; a position moves at most ``lim`` per axis, ``a`` stays
    >= 0. The derivative in ``p`` is taken at amplitude ``max(a, EPS)``.

    Spots whose windows do not overlap touch different voxels of ``model``: two calls on
    such sets may run at the same time (see ``fit._Model.slabs``).
    """
    lz, ly, lx = 2 * reach[0] + 1, 2 * reach[1] + 1, 2 * reach[2] + 1
    e = np.empty((3, max(lz, ly, lx)))
    d = np.empty_like(e)
    k = lz * ly * lx
    g = np.empty(k)
    jac = np.empty((5, k))
    r = np.empty(k)
    jtj = np.empty((5, 5))
    jtr = np.empty(5)
    step = np.empty(5)
    for i in order:
        _factors(zyx[i], centres[i], reach, inv2, e, d)
        a, b = amp[i], bg[i]
        scale = max(a, EPS)
        q = 0
        for iz in range(lz):
            for iy in range(ly):
                for ix in range(lx):
                    w = weight[i, q]
                    gq = e[0, iz] * e[1, iy] * e[2, ix]
                    g[q] = gq
                    s = slot[i, q]
                    r[q] = (vals[s] - model[s] - b) * w
                    jac[0, q] = gq * w
                    jac[1, q] = w
                    sg = scale * gq * w
                    jac[2, q] = sg * d[0, iz]
                    jac[3, q] = sg * d[1, iy]
                    jac[4, q] = sg * d[2, ix]
                    q += 1
        _gram(jac, r, jtj, jtr)
        _damp(jtj, damping)
        _solve(jtj, jtr, step)
        new_a = max(a + step[0], 0.0)
        amp[i] = new_a
        bg[i] = b + step[1]
        for ax in range(3):
            zyx[i, ax] += min(max(step[2 + ax], -lim[ax]), lim[ax])
        _factors(zyx[i], centres[i], reach, inv2, e, d)
        q = 0
        for iz in range(lz):
            for iy in range(ly):
                for ix in range(lx):
                    w = weight[i, q]
                    if w != 0.0:
                        model[slot[i, q]] += (new_a * e[0, iz] * e[1, iy] * e[2, ix] - a * g[q]) * w
                    q += 1


@numba.njit(cache=_CACHE, nogil=True)
def _one_spot_chi2(data: np.ndarray, g: np.ndarray, sw: np.ndarray) -> float:
    """Weighted residual sum of squares of ``c0 g + c1`` with ``(c0, c1)`` solved under
    the weights ``sw^2`` (normal matrix plus ``EPS``)."""
    m = np.zeros((2, 2))
    rhs = np.zeros(2)
    for q in range(len(data)):
        j0, j1, y = g[q] * sw[q], sw[q], data[q] * sw[q]
        m[0, 0] += j0 * j0
        m[0, 1] += j0 * j1
        m[1, 1] += j1 * j1
        rhs[0] += j0 * y
        rhs[1] += j1 * y
    _damp(m, 0.0)
    coef = np.empty(2)
    _solve(m, rhs, coef)
    chi2 = 0.0
    for q in range(len(data)):
        r = (data[q] - coef[0] * g[q] - coef[1]) * sw[q]
        chi2 += r * r
    return chi2


@numba.njit(cache=_CACHE, nogil=True)
def _two_spot_resid(
    p: np.ndarray, data: np.ndarray, sw: np.ndarray, centre: np.ndarray, reach: np.ndarray,
    inv2: np.ndarray, e: np.ndarray, d: np.ndarray, resid: np.ndarray,
) -> float:  # fmt: skip
    """Weighted residuals of two Gaussians and a background ``p`` (``resid``, ``(k,)``),
    their 1-D factors ``e``, ``d`` ``(2, 3, l)``; returns the sum of squares."""
    lz, ly, lx = 2 * reach[0] + 1, 2 * reach[1] + 1, 2 * reach[2] + 1
    _factors(p[1:4], centre, reach, inv2, e[0], d[0])
    _factors(p[5:8], centre, reach, inv2, e[1], d[1])
    cost = 0.0
    q = 0
    for iz in range(lz):
        for iy in range(ly):
            for ix in range(lx):
                g0 = e[0, 0, iz] * e[0, 1, iy] * e[0, 2, ix]
                g1 = e[1, 0, iz] * e[1, 1, iy] * e[1, 2, ix]
                r = (data[q] - p[8] - p[0] * g0 - p[4] * g1) * sw[q]
                resid[q] = r
                cost += r * r
                q += 1
    return cost


@numba.njit(cache=_CACHE, nogil=True)
def split_fits(
    data: np.ndarray, g: np.ndarray, sw: np.ndarray, start: np.ndarray, centres: np.ndarray,
    reach: np.ndarray, inv2: np.ndarray, sigma: np.ndarray,
    settings: tuple[float, float, float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The split test's fits on ``n`` windows: one Gaussian (at its fitted centre) and
    two (Levenberg-Marquardt), each with a background.

    Parameters
    ----------
    data, g, sw : ``(n, k)`` float64: image minus the other spots, the one-spot unit
        Gaussian, square roots of the voxel weights (0 outside the volume).
    start : ``(n, 9)`` float64 two-spot starts ``[a1, p1, a2, p2, b]`` (voxels).
    centres : ``(n, 3)`` int64 window centres.
    sigma : ``(3,)`` PSF sigma (voxels): a step moves a position at most this far per axis.
    settings : ``(iterations, tolerance, hopeless_after, min_gain)``: at most
        ``iterations`` steps (``lam`` x0.3 after a step that lowers the cost, else x10);
        a window stops when a step gains less than ``tolerance`` or ``lam`` reaches 1e6,
        and after ``hopeless_after`` steps when its cost is less than a quarter of
        ``min_gain`` below the one-spot fit's.

    Returns
    -------
    params ``(n, 9)``, chi2_one ``(n,)``, chi2_two ``(n,)``: weighted residual sums of
    squares (in noise variances).
    """
    iterations, tolerance, hopeless_after, min_gain = settings
    n, k = data.shape
    lmax = 2 * max(reach[0], reach[1], reach[2]) + 1
    lim = np.full(_TWO, np.inf)
    for s in range(2):
        lim[4 * s + 1 : 4 * s + 4] = sigma
    params = start.copy()
    chi2_one = np.empty(n)
    chi2_two = np.empty(n)
    e = np.empty((2, 2, 3, lmax))  # [current / trial][spot][axis][offset]
    d = np.empty_like(e)
    resid = np.empty((2, k))
    jtj = np.empty((_TWO, _TWO))
    jtr = np.empty(_TWO)
    step = np.empty(_TWO)
    trial = np.empty(_TWO)
    jac = np.empty((_TWO, k))
    jtj0 = np.empty((_TWO, _TWO))
    jtr0 = np.empty(_TWO)
    lz, ly, lx = 2 * reach[0] + 1, 2 * reach[1] + 1, 2 * reach[2] + 1
    for i in range(n):
        ref = _one_spot_chi2(data[i], g[i], sw[i])
        chi2_one[i] = ref
        p = params[i]
        cur = 0
        cost = _two_spot_resid(p, data[i], sw[i], centres[i], reach, inv2, e[0], d[0], resid[0])
        lam = 1e-2
        fresh = False  # jtj0, jtr0 hold the current parameters' normal equations
        for it in range(int(iterations)):
            if not fresh:
                ec, dc = e[cur], d[cur]
                q = 0
                for iz in range(lz):
                    for iy in range(ly):
                        for ix in range(lx):
                            w = sw[i, q]
                            for s in range(2):
                                gs = ec[s, 0, iz] * ec[s, 1, iy] * ec[s, 2, ix] * w
                                jac[4 * s, q] = gs
                                ag = p[4 * s] * gs
                                jac[4 * s + 1, q] = ag * dc[s, 0, iz]
                                jac[4 * s + 2, q] = ag * dc[s, 1, iy]
                                jac[4 * s + 3, q] = ag * dc[s, 2, ix]
                            jac[8, q] = w
                            q += 1
                _gram(jac, resid[cur], jtj0, jtr0)
                fresh = True
            jtj[:] = jtj0
            jtr[:] = jtr0
            _damp(jtj, lam)
            _solve(jtj, jtr, step)
            for u in range(_TWO):
                trial[u] = p[u] + min(max(step[u], -lim[u]), lim[u])
            other = 1 - cur
            new = _two_spot_resid(
                trial, data[i], sw[i], centres[i], reach, inv2, e[other], d[other], resid[other]
            )
            ok = new < cost
            gain = cost - new if ok else 0.0
            if ok:
                fresh = False
                p[:] = trial
                cost = new
                cur = other
                lam *= 0.3
            else:
                lam *= 10.0
            if (ok and gain < tolerance) or lam >= 1e6:
                break
            if it + 1 >= hopeless_after and ref - cost < 0.25 * min_gain:
                break
        chi2_two[i] = cost
    return params, chi2_one, chi2_two


@numba.njit(cache=_CACHE, nogil=True)
def overlapping(a: np.ndarray, b: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Pairs ``(i, j)`` ``(m, 2)`` int64 with ``|a[i] - b[j]| <= span`` on every axis
    (``a`` ``(n, 3)``, ``b`` ``(p, 3)`` int64 voxels; ``span`` ``(3,)``), ``i`` ascending.

    ``b`` is binned into a grid of cells ``span`` wide per axis (coarser where the grid
    would have more than ``max(4 p, 2^20)`` cells: memory stays bounded by the points),
    so each ``a[i]`` looks at the 27 cells around its own only.
    """
    if len(a) == 0 or len(b) == 0:
        return np.empty((0, 2), np.int64)
    lo = np.empty(3, np.int64)
    size = np.empty(3, np.int64)
    dims = np.empty(3, np.int64)
    for ax in range(3):
        lo[ax] = min(a[:, ax].min(), b[:, ax].min())
        size[ax] = max(span[ax], 1)
    while True:
        for ax in range(3):
            dims[ax] = (max(a[:, ax].max(), b[:, ax].max()) - lo[ax]) // size[ax] + 1
        if dims[0] * dims[1] * dims[2] <= max(4 * len(b), 1 << 20):
            break
        size *= 2
    start = np.zeros(dims[0] * dims[1] * dims[2] + 1, np.int64)
    cell_b = np.empty(len(b), np.int64)
    for j in range(len(b)):
        c = ((b[j, 0] - lo[0]) // size[0] * dims[1] + (b[j, 1] - lo[1]) // size[1]) * dims[2] + (
            b[j, 2] - lo[2]
        ) // size[2]
        cell_b[j] = c
        start[c + 1] += 1
    for c in range(len(start) - 1):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    members = np.empty(len(b), np.int64)  # b's points cell by cell, ascending within one
    for j in range(len(b)):
        members[fill[cell_b[j]]] = j
        fill[cell_b[j]] += 1
    out = np.empty((max(16, 8 * len(a)), 2), np.int64)
    m = 0
    for i in range(len(a)):
        cz = (a[i, 0] - lo[0]) // size[0]
        cy = (a[i, 1] - lo[1]) // size[1]
        cx = (a[i, 2] - lo[2]) // size[2]
        for z in range(max(cz - 1, 0), min(cz + 2, dims[0])):
            for y in range(max(cy - 1, 0), min(cy + 2, dims[1])):
                row = (z * dims[1] + y) * dims[2]
                for t in range(start[row + max(cx - 1, 0)], start[row + min(cx + 2, dims[2])]):
                    j = members[t]
                    if (
                        abs(b[j, 0] - a[i, 0]) <= span[0]
                        and abs(b[j, 1] - a[i, 1]) <= span[1]
                        and abs(b[j, 2] - a[i, 2]) <= span[2]
                    ):
                        if m == len(out):
                            grown = np.empty((2 * m, 2), np.int64)
                            grown[:m] = out
                            out = grown
                        out[m, 0] = i
                        out[m, 1] = j
                        m += 1
    return out[:m].copy()


@numba.njit(cache=_CACHE, nogil=True)
def light_covariance(
    data: np.ndarray, bg: np.ndarray, weight: np.ndarray, zyx: np.ndarray, centres: np.ndarray,
    reach: np.ndarray, inv2: np.ndarray, sigma: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """Covariance ``(n, 3, 3)`` of the positions ``(v - p) / sigma`` (0 on an axis
    without extent) weighted by each window's light ``max(data - bg, 0) * weight``
    (``data``, ``weight`` ``(n, k)``; ``bg`` ``(n,)``; ``zyx`` ``(n, 3)`` the spots,
    ``centres`` ``(n, 3)`` the windows)."""
    n = len(data)
    lz, ly, lx = 2 * reach[0] + 1, 2 * reach[1] + 1, 2 * reach[2] + 1
    coord = np.empty((3, max(lz, ly, lx)))
    cov = np.zeros((n, 3, 3))
    mean = np.empty(3)
    for i in range(n):
        for a in range(3):
            for j in range(2 * reach[a] + 1):
                coord[a, j] = (centres[i, a] + (j - reach[a]) - zyx[i, a]) * inv2[a] * sigma[a]
        total = 0.0
        mean[:] = 0.0
        q = 0
        for iz in range(lz):
            for iy in range(ly):
                for ix in range(lx):
                    w = max(data[i, q] - bg[i], 0.0) * weight[i, q]
                    total += w
                    mean[0] += w * coord[0, iz]
                    mean[1] += w * coord[1, iy]
                    mean[2] += w * coord[2, ix]
                    q += 1
        total += EPS
        for a in range(3):
            mean[a] /= total
        q = 0
        for iz in range(lz):
            for iy in range(ly):
                for ix in range(lx):
                    w = max(data[i, q] - bg[i], 0.0) * weight[i, q]
                    c0 = coord[0, iz] - mean[0]
                    c1 = coord[1, iy] - mean[1]
                    c2 = coord[2, ix] - mean[2]
                    cov[i, 0, 0] += w * c0 * c0
                    cov[i, 0, 1] += w * c0 * c1
                    cov[i, 0, 2] += w * c0 * c2
                    cov[i, 1, 1] += w * c1 * c1
                    cov[i, 1, 2] += w * c1 * c2
                    cov[i, 2, 2] += w * c2 * c2
                    q += 1
        for a in range(3):
            for b in range(a, 3):
                cov[i, a, b] /= total
                cov[i, b, a] = cov[i, a, b]
    return cov


@numba.njit(cache=_CACHE, nogil=True)
def connected_to_centre(mask: np.ndarray, centre: tuple[int, ...]) -> np.ndarray:
    """Per window of ``mask`` ``(n, kz, ky, kx)`` bool, the 26-connected component holding
    ``centre`` (empty where ``mask`` is off there; a flood fill from the centre)."""
    n, kz, ky, kx = mask.shape
    out = np.zeros(mask.shape, np.bool_)
    stack = np.empty((kz * ky * kx, 3), np.int64)
    cz, cy, cx = centre
    for b in range(n):
        if not mask[b, cz, cy, cx]:
            continue
        out[b, cz, cy, cx] = True
        stack[0, 0], stack[0, 1], stack[0, 2] = cz, cy, cx
        top = 1
        while top:
            top -= 1
            z, y, x = stack[top, 0], stack[top, 1], stack[top, 2]
            for z2 in range(max(z - 1, 0), min(z + 2, kz)):
                for y2 in range(max(y - 1, 0), min(y + 2, ky)):
                    for x2 in range(max(x - 1, 0), min(x + 2, kx)):
                        if mask[b, z2, y2, x2] and not out[b, z2, y2, x2]:
                            out[b, z2, y2, x2] = True
                            stack[top, 0], stack[top, 1], stack[top, 2] = z2, y2, x2
                            top += 1
    return out


@numba.njit(cache=_CACHE, nogil=True)
def _rows_along(src: np.ndarray, w: np.ndarray, box: bool, step: int, dst: np.ndarray) -> None:
    """One float32 pass across the rows of ``src`` (row ``i`` of ``dst`` from its rows
    ``i + t step``, ``t = 0 .. 2 r``): ``w_c a_c`` plus ``(a_-i + a_+i) w_i`` from the
    outermost pair in, or (``box``) the plain sum of the ``len(w)`` rows times ``w[0]``."""
    n = len(w)
    r = n // 2
    for i in range(len(dst)):
        o = dst[i]
        if box:
            o[:] = src[i]
            for t in range(1, n):
                nxt = src[i + t * step]
                for x in range(len(o)):
                    o[x] += nxt[x]
            for x in range(len(o)):
                o[x] *= w[0]
        else:
            c = src[i + r * step]
            for x in range(len(o)):
                o[x] = c[x] * w[r]
            for t in range(r):
                lo, hi = src[i + t * step], src[i + (2 * r - t) * step]
                for x in range(len(o)):
                    o[x] += (lo[x] + hi[x]) * w[t]


@numba.njit(cache=_CACHE, nogil=True)
def separable_valid(
    a: np.ndarray, wz: np.ndarray, wy: np.ndarray, wx: np.ndarray, box: bool, out: np.ndarray
) -> None:
    """Separable filter of ``a`` ``(z, y, x)`` float32 with symmetric odd float32 kernels
    along z, y and x, only where they fit (each axis shrinks by its kernel's length - 1),
    into ``out`` (float32, that shape; planes ``z .. z + len(wz) - 1`` of ``a`` give plane
    ``z``), one output plane at a time (its intermediate planes stay in the CPU cache).

    The arithmetic of the numpy / ndimage passes it replaced, so band-passes are
    bit-identical (chunked and single-block runs agree): along z and y in float32 (see
    :func:`_rows_along`; ``box``: a mean, the sum times ``w[0] = 1 / size``), along x as
    ``ndimage.correlate1d`` does it (float64 sums from the outermost pair in, rounded to
    float32 once).
    """
    ry, rx = len(wy) // 2, len(wx) // 2
    ny, nx = a.shape[1], a.shape[2]
    flat = a.reshape(a.shape[0] * ny, nx)
    plane = np.empty((ny, nx), np.float32)
    rows = np.empty((ny - 2 * ry, nx), np.float32)
    m = nx - 2 * rx
    acc = np.empty(m)
    line = np.empty(nx)  # a row in float64 (exact), as ndimage's line buffer
    wd = wx.astype(np.float64)
    for z in range(len(out)):
        _rows_along(flat[z * ny :], wz, box, ny, plane)  # along z: rows ny apart
        _rows_along(plane, wy, box, 1, rows)
        for y in range(len(rows)):
            line[:] = rows[y]
            centre = line[rx : rx + m]
            for x in range(m):
                acc[x] = centre[x] * wd[rx]
            for t in range(rx):
                lo, hi = line[t : t + m], line[2 * rx - t : 2 * rx - t + m]
                for x in range(m):
                    acc[x] += (lo[x] + hi[x]) * wd[t]
            o = out[z, y]
            for x in range(m):
                o[x] = acc[x]


@numba.njit(cache=_CACHE, nogil=True)
def correlate_crop(a: np.ndarray, w: np.ndarray, start: int, count: int) -> np.ndarray:
    """``ndimage.correlate1d(a, w, axis=1)[:, start : start + count]`` for ``a`` ``(outer,
    n, inner)`` float32 and symmetric odd float64 ``w`` whose reach stays inside ``a``
    there (so the boundary mode never applies): the same float64 sums, in the same order
    (``w_c a_c``, then ``(a_-j + a_+j) w_j`` from the outermost pair in), rounded to
    float32 once."""
    outer, n, inner = a.shape
    r = len(w) // 2
    out = np.empty((outer, count, inner), np.float32)
    if inner == 1:  # along the last axis: sums over positions, vectorized along the row
        acc = np.empty(count)
        row = np.empty(n)
        for o in range(outer):
            row[:] = a[o, :, 0]
            for x in range(count):
                acc[x] = row[start + x] * w[r]
            for j in range(r, 0, -1):
                lo, hi = row[start - j : start - j + count], row[start + j : start + j + count]
                for x in range(count):
                    acc[x] += (lo[x] + hi[x]) * w[r - j]
            for x in range(count):
                out[o, x, 0] = acc[x]
        return out
    acc = np.empty(inner)
    for o in range(outer):
        for c in range(count):
            centre = a[o, start + c]
            for i in range(inner):
                acc[i] = np.float64(centre[i]) * w[r]
            for j in range(r, 0, -1):
                lo, hi = a[o, start + c - j], a[o, start + c + j]
                for i in range(inner):
                    acc[i] += (np.float64(lo[i]) + np.float64(hi[i])) * w[r - j]
            dst = out[o, c]
            for i in range(inner):
                dst[i] = acc[i]
    return out


@numba.njit(cache=_CACHE, nogil=True)
def matching_pursuit(
    residual: np.ndarray, n: np.ndarray, sigma: np.ndarray, ref_height: float, stop_level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n[b]`` spots per window of ``residual`` ``(nb, kz, ky, kx)`` float64
    (``-inf`` outside the blob; changed in place): take the brightest voxel not taken yet
    (the first in C order among equals), stop below ``stop_level x ref_height``, refine it
    to sub-voxel by a parabola through its axis neighbours (axes with ``sigma > 0``; an
    offset of at most 0.49), subtract ``ref_height`` times a Gaussian of ``sigma sqrt 2``
    there. Returns local positions ``(m, 3)`` and each one's window ``(m,)``, window by
    window in the order found."""
    nb, kz, ky, kx = residual.shape
    dims = (kz, ky, kx)
    smooth = np.sqrt(2.0) * sigma
    taken = np.zeros((kz, ky, kx), np.bool_)
    pos = np.empty((max(1, int(n.sum())), 3))
    owner = np.empty(len(pos), np.int64)
    f = np.empty((3, max(kz, ky, kx)))
    k = np.empty(3, np.int64)
    m = 0
    for b in range(nb):
        res = residual[b]
        taken[:] = False
        for _ in range(n[b]):
            best = -np.inf
            k[:] = 0
            for z in range(kz):
                for y in range(ky):
                    for x in range(kx):
                        if not taken[z, y, x] and res[z, y, x] > best:
                            best = res[z, y, x]
                            k[0], k[1], k[2] = z, y, x
            if not best >= stop_level * ref_height:
                break
            c = res[k[0], k[1], k[2]]
            for a in range(3):
                p = np.float64(k[a])
                if sigma[a] != 0:
                    lo = k.copy()
                    hi = k.copy()
                    lo[a] = max(k[a] - 1, 0)
                    hi[a] = min(k[a] + 1, dims[a] - 1)
                    va = res[lo[0], lo[1], lo[2]]
                    vb = res[hi[0], hi[1], hi[2]]
                    curv = va - 2 * c + vb
                    if 0 < k[a] < dims[a] - 1 and np.isfinite(curv) and curv < 0:
                        p += min(max(0.5 * (va - vb) / curv, -0.49), 0.49)
                pos[m, a] = p
            owner[m] = b
            taken[k[0], k[1], k[2]] = True
            for a in range(3):
                for j in range(dims[a]):
                    r = j - pos[m, a]
                    if smooth[a] > 0:
                        f[a, j] = np.exp(-0.5 * (r / smooth[a]) ** 2)
                    else:
                        f[a, j] = 1.0 if abs(r) < 0.5 else 0.0
            for z in range(kz):
                for y in range(ky):
                    for x in range(kx):
                        res[z, y, x] -= ref_height * (f[0, z] * f[1, y] * f[2, x])
            m += 1
    return pos[:m].copy(), owner[:m].copy()


@numba.njit(cache=_CACHE, nogil=True)
def spot_voxels(
    centres: np.ndarray, rounded: np.ndarray, shape: np.ndarray, inv: np.ndarray,
    reach: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The voxels of spot instance masks (see :mod:`.labels`): flat voxel ids ``(m,)``
    int64 (sorted) and the spot that owns each ``(m,)`` int64.

    ``centres`` ``(n, 3)`` float64 sub-voxel centres, ``rounded`` ``(n, 3)`` int64 their
    voxels (inside the volume), ``shape`` ``(3,)``, ``inv`` ``(3,)`` 1 / sigma (0 on an
    axis without extent), ``reach`` ``(3,)`` the box searched around ``rounded``. A voxel
    within one sigma (normalized distance ``<= 1``) belongs to the nearest centre (ties:
    the lower spot), and a spot's rounded voxel is its own (distance -1).
    """
    n = len(centres)
    box = (2 * reach[0] + 1) * (2 * reach[1] + 1) * (2 * reach[2] + 1)
    flat = np.empty(n * box, np.int64)
    owner = np.empty(n * box, np.int64)
    dist = np.empty(n * box)
    m = 0
    for i in range(n):
        for z in range(rounded[i, 0] - reach[0], rounded[i, 0] + reach[0] + 1):
            if z < 0 or z >= shape[0]:
                continue
            uz = (z - centres[i, 0]) * inv[0]
            for y in range(rounded[i, 1] - reach[1], rounded[i, 1] + reach[1] + 1):
                if y < 0 or y >= shape[1]:
                    continue
                uy = (y - centres[i, 1]) * inv[1]
                for x in range(rounded[i, 2] - reach[2], rounded[i, 2] + reach[2] + 1):
                    if x < 0 or x >= shape[2]:
                        continue
                    ux = (x - centres[i, 2]) * inv[2]
                    d = math.sqrt(uz * uz + uy * uy + ux * ux)
                    if z == rounded[i, 0] and y == rounded[i, 1] and x == rounded[i, 2]:
                        d = -1.0
                    elif d > 1.0:
                        continue
                    flat[m] = (z * shape[1] + y) * shape[2] + x
                    owner[m] = i
                    dist[m] = d
                    m += 1
    order = np.argsort(flat[:m])
    out_flat = np.empty(m, np.int64)
    out_owner = np.empty(m, np.int64)
    k = 0
    t = 0
    while t < m:
        best = order[t]
        v = flat[best]
        t += 1
        while t < m and flat[order[t]] == v:
            j = order[t]
            if dist[j] < dist[best] or (dist[j] == dist[best] and owner[j] < owner[best]):
                best = j
            t += 1
        out_flat[k] = v
        out_owner[k] = owner[best]
        k += 1
    return out_flat[:k].copy(), out_owner[:k].copy()


@numba.njit(cache=_CACHE, nogil=True)
def _cross(u: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
    """``out = u x v`` for 3-vectors."""
    out[0] = u[1] * v[2] - u[2] * v[1]
    out[1] = u[2] * v[0] - u[0] * v[2]
    out[2] = u[0] * v[1] - u[1] * v[0]


@numba.njit(cache=_CACHE, nogil=True)
def principal_axes(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest eigenvalue ``(n,)`` and a unit eigenvector of it ``(n, 3)`` of symmetric
    ``(n, 3, 3)`` matrices, in closed form (trigonometric eigenvalues; the eigenvector as
    the longest cross product of two rows of ``A - lambda I``). Where that eigenvalue is
    repeated any unit vector of its eigenspace is returned (``(0, 0, 1)`` for a multiple
    of the identity). No LAPACK call (its threads would spin on the other cores)."""
    n = len(cov)
    values = np.empty(n)
    vectors = np.zeros((n, 3))
    m = np.empty((3, 3))
    best = np.empty(3)
    c = np.empty(3)
    for i in range(n):
        a = cov[i]
        p1 = a[0, 1] ** 2 + a[0, 2] ** 2 + a[1, 2] ** 2
        q = (a[0, 0] + a[1, 1] + a[2, 2]) / 3.0
        if p1 == 0.0:
            lam = max(a[0, 0], a[1, 1], a[2, 2])
        else:
            p2 = (a[0, 0] - q) ** 2 + (a[1, 1] - q) ** 2 + (a[2, 2] - q) ** 2 + 2.0 * p1
            p = math.sqrt(p2 / 6.0)
            for r in range(3):
                for s in range(3):
                    m[r, s] = (a[r, s] - (q if r == s else 0.0)) / p
            det = (
                m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1])
                - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
                + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0])
            )
            lam = q + 2.0 * p * math.cos(math.acos(min(1.0, max(-1.0, det / 2.0))) / 3.0)
        values[i] = lam
        scale = 0.0
        for r in range(3):
            for s in range(3):
                m[r, s] = a[r, s] - (lam if r == s else 0.0)
                scale = max(scale, abs(m[r, s]))
        top = 0.0
        for r, s in ((0, 1), (0, 2), (1, 2)):
            _cross(m[r], m[s], c)
            norm = c[0] ** 2 + c[1] ** 2 + c[2] ** 2
            if norm > top:
                top = norm
                best[:] = c
        if top <= (1e-10 * scale * scale) ** 2:  # rank <= 1: lambda is repeated
            row, top = 0, 0.0
            for r in range(3):
                norm = m[r, 0] ** 2 + m[r, 1] ** 2 + m[r, 2] ** 2
                if norm > top:
                    row, top = r, norm
            if top <= (1e-12 * max(abs(lam), 1e-300)) ** 2:  # a multiple of the identity
                best[:] = 0.0
                best[2] = 1.0
            else:  # orthogonal to that row: its cross product with the axis least along it
                k = 0
                for s in range(3):
                    if abs(m[row, s]) < abs(m[row, k]):
                        k = s
                c[:] = 0.0
                c[k] = 1.0
                _cross(m[row], c, best)
        norm = math.sqrt(best[0] ** 2 + best[1] ** 2 + best[2] ** 2)
        for s in range(3):
            vectors[i, s] = best[s] / norm
    return values, vectors
