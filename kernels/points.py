"""Point-cloud kernels for BCPD / multi-organ BCPD [1]_ [2]_: the E-step and Gaussian-process kernel sums.

Plain arrays in, arrays out; nothing here knows about transforms or solvers.

* :func:`estep` -- the BCPD E-step (update of the matching probabilities) without ever forming the M×N matching matrix:
  ``φ_mn = b_m · U[lx_n, ly_m] · exp(-|x_n - y_m|² / (2σ²))``, ``p_mn = φ_mn / (c + Σ_m' φ_m'n)`` and returns
  ``ν_m = Σ_n p_mn``, ``ν'_n = Σ_m p_mn`` and ``PX_m = Σ_n p_mn x_n``.  Pairs whose Gaussian factor is below
  ``truncation`` are treated as exactly zero (``truncation=0`` keeps every pair).
  The ``"numpy"`` reference (array-namespace code, also runs on CuPy arrays) works in column blocks of at most
  ``block_bytes``; the ``"numba"`` path runs two parallel passes over spatial blocks of points (pass 1 over target
  blocks computes the denominators, pass 2 over source blocks the sums), skips block pairs whose bounding boxes are
  farther apart than the truncation radius or whose labels cannot match (``U = 0``) and, inside a kept block pair,
  points farther than the radius from the other block's box; it evaluates ``exp`` with a vectorisable polynomial
  (relative error < 2e-10) and can run the pair loop in float32 (``precision="float32"``, < 3e-5 per factor,
  sums across blocks in float64). It gives bitwise-identical results for any thread count (every output is summed
  by one thread in a fixed order).
* :func:`estep_nystrom` -- the Nyström estimate of the same sums with J landmark points (BCPD's ``-J``
  acceleration), O((M + N) J); array-namespace code (numpy or CuPy).
* :func:`estep_grid` -- a grid estimate of the same sums for large σ (splat with quadratic B-spline weights onto
  σ/2 cells, separable Gaussian filter, interpolate), O((M + N) 3^D + cells × taps); host only.
* :func:`gauss_matrix` -- dense Gaussian affinities to a small point set (landmarks, probes).
* :func:`kernel_matrix` -- the multi-organ Gaussian kernel ``G_ij = amp[l_i, l_j] exp(-|a_i - b_j|² / den[l_i, l_j])``
  (dense, for one block).
* :func:`kernel_apply` -- ``out_i = Σ_j G(q_i, z_j) coef_j`` in blocks (Gaussian-process interpolation, eq. 5 of [2]_),
  numpy reference and numba parallel path.
* :func:`taper_apply` -- the same sum for the compactly supported (Wendland-tapered) Gaussian of the fine scale, over
  the anchors within the taper radius (a cell list; numba).

numba kernels are plain module-level functions compiled lazily with ``cache=True`` (their globals rebound to the
compiled helpers, so the on-disk cache key is stable across processes); small calls run on one thread
(:data:`PARALLEL_MIN_WORK`).

References
----------
.. [1] O. Hirose, "A Bayesian formulation of coherent point drift", IEEE TPAMI 43(7):2269-2286, 2021,
   doi:10.1109/TPAMI.2020.2971687.
.. [2] "Multi-organ Bayesian coherent point drift" (MO-BCPD), WBIR 2022 (Biomedical Image Registration, LNCS 13386).
"""
from __future__ import annotations

import contextlib
import functools
import math

import numpy as np

from . import _backend

__all__ = ["estep", "estep_grid", "estep_grid_cost", "estep_nystrom", "gauss_matrix", "kernel_matrix", "kernel_apply",
           "spatial_order", "taper_apply", "taper_cells"]

#: Smallest denominator of the E-step (keeps p finite when ω = 0 and a target point is far from every source).
DEN_FLOOR = 1e-300
#: Stand-in for an infinite squared cut-off radius (fastmath code must not see inf).
BIG = 1e300


def _cut2(sigma2, truncation):
    if truncation is None or truncation <= 0:
        return BIG
    if truncation >= 1:
        raise ValueError(f"truncation must be in [0, 1), got {truncation!r}")
    return float(2.0 * sigma2 * -math.log(truncation))


def _labels(lab, n, name):
    if lab is None:
        return np.zeros(n, dtype=np.int64)
    lab = np.asarray(lab)
    if lab.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {lab.shape}")
    return lab.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------------- E-step
def estep(x, y, b, sigma2, c, *, lx=None, ly=None, U=None, truncation=0.0, backend=None, block=32,
          block_bytes=64 * 2**20, precision="float64"):
    """BCPD E-step sums without materialising the M×N matrix.

    Parameters
    ----------
    x : ndarray (N, D)
        Target points.
    y : ndarray (M, D)
        Current deformed source points ŷ.
    b : ndarray (M,)
        Per-source prior weight ``α_m exp(-(D/2) s² σ_m² / σ²)``.
    sigma2 : float
        σ² (same units as the points, squared).
    c : float
        Outlier constant ``(2πσ²)^{D/2} ω / (V (1 - ω))``.
    lx, ly : int arrays (N,), (M,), optional
        Labels in ``[0, L)``; default all 0.
    U : ndarray (L, L), optional
        ``U[l_x, l_y]`` = P(target label | source label). Default identity (pairs with equal labels only).
    truncation : float in [0, 1)
        Gaussian factors below this value count as zero (cut-off radius ``σ sqrt(2 ln(1/truncation))``).
    backend : {None, "numpy", "numba", "cuda"}
        ``"cuda"`` runs the array reference on CuPy arrays.
    block : int
        Points per spatial block of the numba path (points should be in a spatially coherent order, see
        :func:`spatial_order`, for the pruning to help): block pairs whose bounding boxes are farther apart than the
        cut-off radius are skipped, and within a block pair every point farther than the radius from the other
        block's box.
    block_bytes : int
        Memory budget of one (M × chunk) block of the reference path.
    precision : {"float64", "float32"}
        Arithmetic of the numba path's pair loop (sums across blocks are always float64). The numba path evaluates
        ``exp`` with a vectorisable polynomial: relative error < 2e-10 per Gaussian factor in float64, < 3e-5 in
        float32 (then outputs agree with the reference to ~1e-4 relative). float32 is used only where the cut-off
        exponent fits (``truncation >= 1e-37``) and σ > 1e-4 × the extent of the points, otherwise float64; target
        points whose denominator is below 1e-30 of the largest source weight get their responsibilities scaled
        down (isolated outliers).

    Returns
    -------
    nu : (M,) ``Σ_n p_mn``;  nu_x : (N,) ``Σ_m p_mn``;  px : (M, D) ``Σ_n p_mn x_n``.
    """
    be = _backend.resolve_backend(backend, x, y, b)
    xp = _backend.get_array_module(x, y, b)
    n, d = x.shape
    m = y.shape[0]
    if y.shape[1] != d or b.shape != (m,):
        raise ValueError(f"shape mismatch: x {x.shape}, y {y.shape}, b {b.shape}")
    lx_h = _labels(None if lx is None else _backend_to_host(lx), n, "lx")
    ly_h = _labels(None if ly is None else _backend_to_host(ly), m, "ly")
    nl = int(max(lx_h.max(initial=0), ly_h.max(initial=0))) + 1
    if U is None:
        U_h = np.eye(nl)
    else:
        U_h = np.asarray(_backend_to_host(U), dtype=np.float64)
        if U_h.ndim != 2 or U_h.shape[0] < nl or U_h.shape[1] < nl:
            raise ValueError(f"U must be at least ({nl}, {nl}) for these labels, got {U_h.shape}")
    cut2 = _cut2(sigma2, truncation)
    if be == "numba":
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
        return _estep_numba(np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y, dtype=np.float64),
                            np.ascontiguousarray(b, dtype=np.float64), float(sigma2), float(c), lx_h, ly_h,
                            np.ascontiguousarray(U_h), cut2, int(block), precision)
    if lx is None and ly is None and U is None:  # no labels: the factor U[lx, ly] is 1 (and nothing is uploaded)
        lx_h = ly_h = U_h = None
    return _estep_ref(xp, x, y, b, float(sigma2), float(c), lx_h, ly_h, U_h, cut2, int(block_bytes))


def _backend_to_host(a):
    return a.get() if _backend.is_cupy_array(a) else a


def _estep_ref(xp, x, y, b, sigma2, c, lx, ly, U, cut2, block_bytes):
    """Array reference: blocks of target columns, each block an (M, chunk) matrix of at most ``block_bytes``;
    ``lx = ly = U = None``: no label factor."""
    x = xp.asarray(x, dtype=xp.float64)
    y = xp.asarray(y, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    n, d = x.shape
    m = y.shape[0]
    chunk = max(1, int(block_bytes // (8 * 4 * max(m, 1))))
    labelled = U is not None
    if labelled:
        lx_d, ly_d, U_d = xp.asarray(lx), xp.asarray(ly), xp.asarray(U)
    nu = xp.zeros(m)
    px = xp.zeros((m, d))
    nu_x = xp.zeros(n)
    yy = (y * y).sum(1)
    for s in range(0, n, chunk):
        xs = x[s:s + chunk]
        d2 = yy[:, None] + (xs * xs).sum(1)[None, :] - 2.0 * (y @ xs.T)
        d2 = xp.maximum(d2, 0.0)
        phi = xp.exp(-d2 / (2.0 * sigma2))
        if labelled:
            phi = phi * U_d[lx_d[s:s + chunk][None, :], ly_d[:, None]]
        phi = phi * b[:, None]
        phi = xp.where(d2 <= cut2, phi, 0.0)
        den = xp.maximum(phi.sum(0) + c, DEN_FLOOR)
        p = phi / den[None, :]
        nu += p.sum(1)
        px += p @ xs
        nu_x[s:s + chunk] = p.sum(0)
    return nu, nu_x, px


def gauss_matrix(a, z, sigma2, *, backend=None):
    """Dense Gaussian affinities ``K_ij = exp(-|a_i - z_j|² / (2σ²))`` for a small second set (landmarks, probes).

    ``a`` (P, D), ``z`` (J, D); returns (P, J) float64. numba path: parallel over rows with the vectorised
    polynomial ``exp`` (relative error < 2e-10); the array path (numpy/CuPy) uses ``xp.exp``.
    """
    be = _backend.resolve_backend(backend, a, z)
    inv2s2 = 1.0 / (2.0 * float(sigma2))
    if be == "numba":
        a = np.asarray(a, dtype=np.float64)
        z = np.asarray(z, dtype=np.float64)
        d = a.shape[1]
        at = np.zeros((3, a.shape[0]))
        zt = np.zeros((3, z.shape[0]))
        at[:d] = a.T
        zt[:d] = z.T
        out = np.empty((a.shape[0], z.shape[0]))
        with _threads_for(out.size):
            _numba_misc()["gauss"](at, zt, inv2s2, out)
        return out
    xp = _backend.get_array_module(a, z)
    a = xp.asarray(a, dtype=xp.float64)
    z = xp.asarray(z, dtype=xp.float64)
    d2 = (a * a).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2.0 * (a @ z.T)
    return xp.exp(-xp.maximum(d2, 0.0) * inv2s2)


def _spd_solver(xp, a):
    """``rhs -> a⁻¹ rhs`` for a symmetric positive definite ``a`` (Cholesky; scipy on the host, xp.linalg else)."""
    if xp is np:
        from scipy.linalg import cho_factor, cho_solve

        cf = cho_factor(a, lower=True, check_finite=False)
        return lambda rhs: cho_solve(cf, rhs, check_finite=False)
    return lambda rhs: xp.linalg.solve(a, rhs)


def estep_nystrom(x, y, b, sigma2, c, landmarks, *, lx=None, ly=None, U=None, reg=1e-8, backend=None,
                  return_denominator=False):
    """Nyström estimate of the BCPD E-step sums (the ``-J`` acceleration of Hirose's BCPD, C function
    ``gaussprod``): every Gaussian product ``K_AB w`` is replaced by ``K_AZ (K_ZZ + reg·I)⁻¹ K_ZB w`` with the J
    ``landmarks`` Z (typically random points of X ∪ Y, redrawn every iteration). O((M + N) J + J³) instead of O(MN).

    Accurate while σ is large compared with the landmark spacing (the Gaussian matrix is then numerically low rank);
    for small σ the estimate degrades (denominators and ν can even turn negative: they are floored). Check it on a
    few probe points (as ``register_points`` does) before trusting it. Labels and a label-transition matrix U are
    handled exactly (one landmark set, per-label right-hand sides).

    Works on numpy or CuPy arrays (array-namespace code); the landmark Gaussian matrices use numba on the CPU.
    Returns ``(nu, nu_x, px)`` like :func:`estep` (and the denominators ``Σ_m φ_mn`` with
    ``return_denominator=True``).
    """
    xp = _backend.get_array_module(x, y, b, landmarks)
    be = "numba" if (xp is np and _backend.resolve_backend(backend) == "numba") else "numpy"
    x = xp.asarray(x, dtype=xp.float64)
    y = xp.asarray(y, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    z = xp.asarray(landmarks, dtype=xp.float64)
    n, d = x.shape
    m = y.shape[0]
    lx_h = _labels(None if lx is None else _backend_to_host(lx), n, "lx")
    ly_h = _labels(None if ly is None else _backend_to_host(ly), m, "ly")
    nl = int(max(lx_h.max(initial=0), ly_h.max(initial=0))) + 1
    U_h = np.eye(nl) if U is None else np.asarray(_backend_to_host(U), dtype=np.float64)[:nl, :nl]
    kxz = gauss_matrix(x, z, sigma2, backend=be)
    kyz = gauss_matrix(y, z, sigma2, backend=be)
    kzz = gauss_matrix(z, z, sigma2, backend=be)
    solve = _spd_solver(xp, kzz + reg * xp.eye(z.shape[0]))
    U_d = xp.asarray(U_h)
    if nl == 1:
        den_raw = float(U_h[0, 0]) * (kxz @ solve(kyz.T @ b))
    else:
        ly_d = xp.asarray(ly_h)
        lx_d = xp.asarray(lx_h)
        onehot_y = (ly_d[:, None] == xp.arange(nl)[None, :]) * b[:, None]  # M × L
        per_label = kxz @ solve(kyz.T @ onehot_y)  # N × L: Σ_{m in l} b_m K(x_n, y_m)
        den_raw = (per_label * U_d[lx_d]).sum(1)
    den = xp.maximum(den_raw + c, DEN_FLOOR)
    q = xp.where(den_raw + c > DEN_FLOOR, 1.0 / den, 0.0)
    nu_x = xp.maximum(den_raw, 0.0) * q
    f = xp.concatenate([q[:, None], q[:, None] * x], axis=1)  # N × (D+1)
    if nl == 1:
        out = float(U_h[0, 0]) * (kyz @ solve(kxz.T @ f))  # M × (D+1)
    else:
        fl = ((lx_d[:, None] == xp.arange(nl)[None, :])[:, :, None] * f[:, None, :]).reshape(n, nl * (d + 1))
        r = (kyz @ solve(kxz.T @ fl)).reshape(m, nl, d + 1)  # Σ_{n in l'} K(y_m, x_n) f_n
        out = (r * U_d[:, ly_d].T[:, :, None]).sum(1)  # Σ_l' U[l', ly_m] r[m, l']
    nu = b * out[:, 0]
    px = b[:, None] * out[:, 1:]
    if return_denominator:
        return nu, nu_x, px, den_raw
    return nu, nu_x, px


#: grid cells per σ of :func:`estep_grid`
GRID_CELLS_PER_SIGMA = 2.0
#: :func:`estep_grid` truncates its Gaussian filter at this many standard deviations (a tail mass of 6e-5 per axis)
GRID_TRUNCATE = 4.0


def _grid_geometry(x, y, sigma2, cells_per_sigma):
    """``(origin, cell size, grid shape, filter σ in cells, filter radius in cells)`` of :func:`estep_grid`."""
    d = x.shape[1]
    lo = np.minimum(x.min(0), y.min(0))
    hi = np.maximum(x.max(0), y.max(0))
    h = math.sqrt(sigma2) / cells_per_sigma
    shape = tuple(int(v) for v in np.floor((hi - lo) / h).astype(np.int64) + 4)  # one node of margin each side
    sb = math.sqrt(cells_per_sigma**2 - 0.5)  # in cells; see estep_grid
    return lo, h, shape[:d], sb, int(GRID_TRUNCATE * sb + 0.5)


def estep_grid_cost(x, y, sigma2, n_labels=1, cells_per_sigma=GRID_CELLS_PER_SIGMA):
    """``(operations, bytes)`` of :func:`estep_grid`: filter taps over the grid's cells and columns plus the points'
    3^D nodes, to compare with the ``2 M N`` pair evaluations of the exact E-step, and the size of its largest
    grid (the filter's input and output, float64)."""
    d = x.shape[1]
    _, _, shape, _, rad = _grid_geometry(x, y, sigma2, cells_per_sigma)
    cells = float(np.prod(np.asarray(shape, dtype=np.float64)))
    ops = cells * (2 * rad + 1) * d * n_labels * (d + 2) + 3.0**d * (x.shape[0] + y.shape[0]) * (d + 2)
    return ops, 2.0 * 8.0 * cells * n_labels * (d + 1)


def _grid_corners(p, lo, h, shape):
    """Per point and axis the nearest grid node i (P, D) and the quadratic B-spline weights (P, D, 3) of nodes
    i - 1, i, i + 1: ``(½ - t)²/2, ¾ - t², (½ + t)²/2`` (t = offset from node i, in cells), whose second moment
    about the point is ¼ cell² wherever the point lies. Also the C-order strides of the grid (D,)."""
    g = (p - lo) / h + 1.0
    i0 = np.floor(g + 0.5).astype(np.int64)
    t = g - i0
    w = np.stack([0.5 * (0.5 - t) ** 2, 0.75 - t * t, 0.5 * (0.5 + t) ** 2], axis=2)
    strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1].astype(np.int64)
    return i0, np.ascontiguousarray(w), np.ascontiguousarray(strides)


def _grid_transform(src, values, dst, shape, sb, rad):
    """``Σ_src K(dst, src) values_src`` for every column of ``values`` (P, C): B-spline splatting onto the grid,
    a separable Gaussian filter of ``sb`` cells (zero outside the grid), B-spline interpolation at the destination
    points (numba loops when installed); ``src``/``dst`` from :func:`_grid_corners`. The filter's normalisation is
    undone by the caller."""
    from scipy.ndimage import gaussian_filter

    cells = int(np.prod(shape))
    ncol = values.shape[1]
    values = np.ascontiguousarray(values, dtype=np.float64)
    grid = np.zeros((ncol, cells))
    out = np.zeros((dst[0].shape[0], ncol))
    fns = _numba_grid() if _backend.HAVE_NUMBA else {"splat": _grid_splat, "slice": _grid_slice}
    fns["splat"](src[0], src[1], src[2], values, grid)
    grid = gaussian_filter(grid.reshape((ncol,) + tuple(shape)), sigma=(0.0,) + (sb,) * len(shape), mode="constant",
                           truncate=rad / sb).reshape(ncol, cells)
    fns["slice"](np.ascontiguousarray(grid), dst[0], dst[1], dst[2], out)
    return out


def _grid_nodes(i0, w, strides, p, flat, wt):
    """The flat indices and weights of the 3^D grid nodes around point ``p`` into ``flat``, ``wt``; returns their count
    (D = 2 is the D = 3 loop with one node along the last axis)."""
    d = i0.shape[1]
    n3 = 3 if d == 3 else 1
    m = 0
    for o0 in range(3):
        f0 = (i0[p, 0] + o0 - 1) * strides[0]
        w0 = w[p, 0, o0]
        for o1 in range(3):
            f1 = f0 + (i0[p, 1] + o1 - 1) * strides[1]
            w1 = w0 * w[p, 1, o1]
            for o2 in range(n3):
                flat[m] = f1
                wt[m] = w1
                if d == 3:
                    flat[m] += (i0[p, 2] + o2 - 1) * strides[2]
                    wt[m] *= w[p, 2, o2]
                m += 1
    return m


def _grid_splat(i0, w, strides, values, grid):
    """``grid[k, node] += weight × values[p, k]`` over the 3^D nodes around every point p (serial, deterministic)."""
    flat = np.empty(27, dtype=np.int64)
    wt = np.empty(27)
    for p in range(i0.shape[0]):
        for j in range(_grid_nodes(i0, w, strides, p, flat, wt)):
            for k in range(values.shape[1]):
                grid[k, flat[j]] += wt[j] * values[p, k]


def _grid_slice(grid, i0, w, strides, out):
    """``out[p, k] = Σ weight × grid[k, node]`` over the 3^D nodes around every point p."""
    flat = np.empty(27, dtype=np.int64)
    wt = np.empty(27)
    for p in range(i0.shape[0]):
        for j in range(_grid_nodes(i0, w, strides, p, flat, wt)):
            for k in range(grid.shape[0]):
                out[p, k] += wt[j] * grid[k, flat[j]]


@functools.cache
def _numba_grid():
    """Compile (lazily, cached on disk) the splatting and interpolation loops of :func:`estep_grid`."""
    njit = _backend.njit
    ns = dict(globals())
    ns["_grid_nodes"] = njit(inline="always")(_rebind(_grid_nodes, ns))
    return {"splat": njit(_rebind(_grid_splat, ns)), "slice": njit(_rebind(_grid_slice, ns))}


def estep_grid(x, y, b, sigma2, c, *, lx=None, ly=None, U=None, cells_per_sigma=GRID_CELLS_PER_SIGMA):
    r"""Grid estimate of the BCPD E-step sums for large σ (host; numba loops when installed, scipy's filter): both
    Gauss transforms of :func:`estep` -- the denominators ``Σ_m b_m U K(x_n, y_m)`` and the sums
    ``Σ_n q_n U K(y_m, x_n) [1, x_n]`` -- by splatting the weighted points onto a regular grid with cells of
    ``Δ = σ / cells_per_sigma`` (quadratic B-spline weights on the 3^D nodes around each point), a separable
    Gaussian filter, and interpolation at the other set with the same weights ("splat, blur, slice": A. Adams,
    J. Baek, M. A. Davis, Comput. Graph. Forum 29(2):753-762, 2010, Sec. 2, the Gauss transform of bilateral
    filtering). O((M + N) 3^D + cells × taps), independent of M N; worthwhile while σ is large compared with the
    point spacing (:func:`estep_grid_cost`; memory: the grid, cells × L (D + 1) floats, twice).

    Accuracy: the quadratic B-spline weights have the second moment ``Δ²/4`` about the point wherever it lies in
    its cell (linear weights would give ``t(1 - t) Δ²``, position dependent), so splatting and interpolation add
    ``Δ²/2`` per axis to the filter's variance ``σ² - Δ²/2``: the composite kernel has the Gaussian's mass and
    variance at every position. What remains is its excess kurtosis (fourth cumulant ``-Δ⁴/20``, a relative
    error of order ``(Δ/σ)⁴/20`` near the peak: ~3e-3 at the default 2 cells per σ) and the filter's truncation at
    :data:`GRID_TRUNCATE` σ (a tail mass of 6e-5 per axis). Measured: within ~2e-3 of the largest ν on fsaverage5
    and on the tests' clouds. Check it on probe points before trusting it (as ``register_points`` does).

    Returns ``(nu, nu_x, px, den_raw)`` like :func:`estep_nystrom` with ``return_denominator=True``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n, d = x.shape
    m = y.shape[0]
    lx_h = _labels(lx, n, "lx")
    ly_h = _labels(ly, m, "ly")
    nl = int(max(lx_h.max(initial=0), ly_h.max(initial=0))) + 1
    U_h = np.eye(nl) if U is None else np.asarray(U, dtype=np.float64)[:nl, :nl]
    lo, h, shape, sb, rad = _grid_geometry(x, y, sigma2, cells_per_sigma)
    # the truncated discrete filter sums to 1 (it is exp(-k²/2sb²) / z per axis); the composite kernel (the splat
    # weights ∗ the filter ∗ the interpolation weights) has unit mass per axis, and the Gaussian of σ =
    # cells_per_sigma cells with peak 1 has mass sqrt(2π) cells_per_sigma ≈ z cells_per_sigma / sb: the scale
    k = np.arange(-rad, rad + 1, dtype=np.float64)
    z = float(np.exp(-k * k / (2 * sb * sb)).sum())
    scale = (z * cells_per_sigma / sb) ** d
    xg = _grid_corners(x, lo, h, shape)
    yg = _grid_corners(y, lo, h, shape)
    by = np.zeros((m, nl))
    by[np.arange(m), ly_h] = b
    per_label = scale * _grid_transform(yg, by, xg, shape, sb, rad)  # N × L
    den_raw = (per_label * U_h[lx_h]).sum(1)
    den = np.maximum(den_raw + c, DEN_FLOOR)
    q = np.where(den_raw + c > DEN_FLOOR, 1.0 / den, 0.0)
    nu_x = np.maximum(den_raw, 0.0) * q
    f = np.concatenate([q[:, None], q[:, None] * x], axis=1)  # N × (D+1)
    fl = np.zeros((n, nl, d + 1))
    fl[np.arange(n), lx_h] = f
    r = scale * _grid_transform(xg, fl.reshape(n, nl * (d + 1)), yg, shape, sb, rad)
    out = (r.reshape(m, nl, d + 1) * U_h[:, ly_h].T[:, :, None]).sum(1)
    nu = b * np.maximum(out[:, 0], 0.0)
    px = b[:, None] * out[:, 1:]
    return nu, nu_x, px, den_raw


#: Pair evaluations below which a numba kernel runs on one thread: waking the worker threads costs ~10 µs on an idle
#: machine but milliseconds when the cores are shared (measured here), while 1e6 pair evaluations take ~1 ms.
PARALLEL_MIN_WORK = 1_000_000


@contextlib.contextmanager
def _threads_for(work):
    """Run the enclosed numba kernels on one thread when ``work`` (pair evaluations) is small. Every kernel here
    gives the same bits for any thread count, so this changes only the speed."""
    if work >= PARALLEL_MIN_WORK:
        yield
        return
    import numba

    nt = numba.get_num_threads()
    if nt == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(nt)


#: float32 E-step: largest exponent t (exp(-t) stays a normal float32) and cap of the reciprocal denominators.
_T32_MAX = 87.0
_Q32_MAX = 1e30


def _estep_numba(x, y, b, sigma2, c, lx, ly, U, cut2, block, precision="float64"):
    """Two-pass blocked E-step (numba). Points are processed in 3-D (2-D points get a zero z coordinate)."""
    n, d = x.shape
    m = y.shape[0]
    inv2s2 = 1.0 / (2.0 * sigma2)
    tcut = cut2 * inv2s2 if cut2 < BIG else BIG
    # centre on the target centroid (distances unchanged; keeps float32 coordinates small), pad 2-D to 3-D
    shift = x.mean(0)
    extent = max(float(np.abs(x - shift).max(initial=0.0)), float(np.abs(y - shift).max(initial=0.0)))
    # float32 only where the cut-off exponent fits and σ is far above the coordinate rounding (6e-8 × extent)
    f32 = precision == "float32" and tcut <= _T32_MAX and sigma2 > (1e-4 * extent) ** 2
    ft = np.float32 if f32 else np.float64
    tclamp = min(tcut, _T32_MAX if f32 else 700.0)
    qmax = _Q32_MAX if f32 else BIG
    xt = np.zeros((3, n), dtype=ft)
    yt = np.zeros((3, m), dtype=ft)
    xt[:d] = (x - shift).T
    yt[:d] = (y - shift).T
    bmax = float(b.max()) if m else 1.0
    if not bmax > 0:
        bmax = 1.0
    bs = b / bmax  # weights scaled to <= 1 (the scale cancels in p)
    kern = _numba_estep(f32)
    nbx = (n + block - 1) // block
    nby = (m + block - 1) // block
    xlo = np.empty((nbx, 3))
    xhi = np.empty((nbx, 3))
    ylo = np.empty((nby, 3))
    yhi = np.empty((nby, 3))
    ucon = np.empty((nbx, nby))
    work = kern["table"](xt, yt, lx, ly, U, block, cut2, xlo, xhi, ylo, yhi, ucon)
    U_f = np.ascontiguousarray(U, dtype=ft)
    q = np.empty(n, dtype=ft)
    nu_x = np.empty(n)
    acc = np.empty((4, m))
    with _threads_for(2 * work):
        kern["pass1"](xt, yt, bs.astype(ft), lx, ly, U_f, ucon, xlo, xhi, ylo, yhi, ft(inv2s2), ft(tclamp),
                      ft(tcut), ft(0.0), cut2, c / bmax, qmax, block, q, nu_x)
        kern["pass2"](xt, yt, lx, ly, U_f, ucon, xlo, xhi, ylo, yhi, ft(inv2s2), ft(tclamp), ft(tcut), ft(0.0),
                      cut2, block, q, acc)
    nu = bs * acc[3]
    px = (acc[:d] * bs).T + nu[:, None] * shift[None, :]
    return nu, nu_x, np.ascontiguousarray(px)


# --- numba bodies: plain module-level functions, compiled lazily by _numba_estep / _numba_misc with their globals
# --- rebound to the compiled helpers (same code object => numba's on-disk cache key is stable across processes).
# --- Uncompiled (``prange = range``, ``_fexp = _fexp64``) they also run as plain Python, which helps debugging.
prange = range


def _fexp64(t):
    """``exp(-t)`` for ``0 <= t <= 700`` with relative error < 2e-10, branch-free so that loops vectorise: the
    degree-13 Taylor polynomial of ``exp(-t/1024)`` squared ten times."""
    u = t * 0.0009765625
    p = 1.0 - u * (1.0 - u * (0.5 - u * (_E3 - u * (_E4 - u * (_E5 - u * (_E6 - u * (_E7 - u * (
        _E8 - u * (_E9 - u * (_E10 - u * (_E11 - u * (_E12 - u * _E13))))))))))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return p


def _fexp32(t):
    """float32 ``exp(-t)`` for ``0 <= t <= 87`` (relative error < 3e-5): degree-9 Taylor polynomial of
    ``exp(-t/128)`` squared seven times."""
    u = t * _F_128
    p = _F0 - u * (_F0 - u * (_F2 - u * (_F3 - u * (_F4 - u * (_F5 - u * (_F6 - u * (_F7 - u * (_F8 - u * _F9))))))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return p


_E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10, _E11, _E12, _E13 = (1.0 / math.factorial(k) for k in range(3, 14))
_fexp = _fexp64
_F0, _F2, _F3, _F4, _F5, _F6, _F7, _F8, _F9 = (np.float32(1.0 / math.factorial(k)) for k in (0, 2, 3, 4, 5, 6, 7, 8, 9))
_F_128 = np.float32(1.0 / 128.0)


def _block_box(pts, lab, i0, i1, lo, hi):
    """Bounding box (lo, hi) of points i0:i1 of ``pts`` (3, n); returns their common label or -1."""
    lab0 = lab[i0]
    for a in range(3):
        lo[a] = pts[a, i0]
        hi[a] = pts[a, i0]
    for i in range(i0 + 1, i1):
        for a in range(3):
            v = pts[a, i]
            if v < lo[a]:
                lo[a] = v
            if v > hi[a]:
                hi[a] = v
        if lab[i] != lab0:
            lab0 = -1
    return lab0


def _block_table(xt, yt, lx, ly, U, block, cut2, xlo, xhi, ylo, yhi, ucon):
    """Block bounding boxes and the block-pair table (serial, O(N + M + blocks²)): ``ucon[ib, jb]`` = -2 skip
    (boxes farther apart than the cut-off radius, or U = 0 between the blocks' labels), -1 mixed labels (per-pair
    U), else the constant ``U[label_x, label_y]`` of two single-label blocks. Returns the number of point pairs in
    the kept block pairs (an upper bound of the work)."""
    n = xt.shape[1]
    m = yt.shape[1]
    nbx = xlo.shape[0]
    nby = ylo.shape[0]
    bx = np.empty(nbx, dtype=np.int64)
    by = np.empty(nby, dtype=np.int64)
    for ib in range(nbx):
        bx[ib] = _block_box(xt, lx, ib * block, min(n, ib * block + block), xlo[ib], xhi[ib])
    for jb in range(nby):
        by[jb] = _block_box(yt, ly, jb * block, min(m, jb * block + block), ylo[jb], yhi[jb])
    work = 0
    for ib in range(nbx):
        nb = min(n, ib * block + block) - ib * block
        for jb in range(nby):
            s = 0.0
            for a in range(3):
                g = max(ylo[jb, a] - xhi[ib, a], xlo[ib, a] - yhi[jb, a], 0.0)
                s += g * g
            if s > cut2:
                ucon[ib, jb] = -2.0
                continue
            if bx[ib] >= 0 and by[jb] >= 0:
                u = U[bx[ib], by[jb]]
                if u <= 0.0:
                    ucon[ib, jb] = -2.0
                    continue
                ucon[ib, jb] = u
            else:
                ucon[ib, jb] = -1.0
            work += nb * (min(m, jb * block + block) - jb * block)
    return work


def _pt_box_d2(p0, p1, p2, lo, hi, i):
    """Squared distance from the point (p0, p1, p2) to box i of (lo, hi)."""
    g0 = max(lo[i, 0] - p0, p0 - hi[i, 0], 0.0)
    g1 = max(lo[i, 1] - p1, p1 - hi[i, 1], 0.0)
    g2 = max(lo[i, 2] - p2, p2 - hi[i, 2], 0.0)
    return g0 * g0 + g1 * g1 + g2 * g2


def _estep_pass1(xt, yt, bs, lx, ly, U_f, ucon, xlo, xhi, ylo, yhi, inv2s2, tclamp, tcut, zero, cut2, c, qmax,
                 block, q, nu_x):
    """Denominators, parallel over target blocks: ``q_n = 1/(c + Σ_m φ_mn)`` and ``ν'_n = Σ_m p_mn``.

    For every target point of the block and every source block within the cut-off radius of it (``ucon``, see
    ``_block_table``), the pair loop runs over the source block (contiguous, vectorised, reduced in a register)."""
    n = xt.shape[1]
    m = yt.shape[1]
    nbx = xlo.shape[0]
    nby = ylo.shape[0]
    for ib in prange(nbx):
        n0 = ib * block
        n1 = min(n, n0 + block)
        nb = n1 - n0
        xs0 = xt[0, n0:n1]
        xs1 = xt[1, n0:n1]
        xs2 = xt[2, n0:n1]
        lxs = lx[n0:n1]
        acc = np.zeros(nb)
        for jb in range(nby):
            uconst = ucon[ib, jb]
            if uconst < -1.5:
                continue
            m0 = jb * block
            m1 = min(m, m0 + block)
            mb = m1 - m0
            ys0 = yt[0, m0:m1]
            ys1 = yt[1, m0:m1]
            ys2 = yt[2, m0:m1]
            bb = bs[m0:m1]
            lys = ly[m0:m1]
            for i in range(nb):
                a0 = xs0[i]
                a1 = xs1[i]
                a2 = xs2[i]
                if _pt_box_d2(a0, a1, a2, ylo, yhi, jb) > cut2:
                    continue
                s = zero
                if uconst >= 0.0:
                    for j in range(mb):
                        d0 = ys0[j] - a0
                        d1 = ys1[j] - a1
                        d2 = ys2[j] - a2
                        t = (d0 * d0 + d1 * d1 + d2 * d2) * inv2s2
                        e = _fexp(min(t, tclamp))
                        s += bb[j] * e if t <= tcut else zero
                    acc[i] += uconst * s
                else:
                    urow = U_f[lxs[i]]
                    for j in range(mb):
                        d0 = ys0[j] - a0
                        d1 = ys1[j] - a1
                        d2 = ys2[j] - a2
                        t = (d0 * d0 + d1 * d1 + d2 * d2) * inv2s2
                        e = _fexp(min(t, tclamp))
                        s += (bb[j] * urow[lys[j]]) * e if t <= tcut else zero
                    acc[i] += s
        for i in range(nb):
            den = acc[i] + c
            if den < 1e-300:
                den = 1e-300
            qi = 1.0 / den
            q[n0 + i] = min(qi, qmax)
            nu_x[n0 + i] = acc[i] * qi


def _estep_pass2(xt, yt, lx, ly, U_f, ucon, xlo, xhi, ylo, yhi, inv2s2, tclamp, tcut, zero, cut2, block, q,
                 acc_out):
    """Source sums, parallel over source blocks: ``acc[k, m] = Σ_n U e_mn q_n x_n[k]`` (k < 3) and
    ``acc[3, m] = Σ_n U e_mn q_n`` (the caller multiplies by the source weight)."""
    n = xt.shape[1]
    m = yt.shape[1]
    nbx = xlo.shape[0]
    nby = ylo.shape[0]
    for jb in prange(nby):
        m0 = jb * block
        m1 = min(m, m0 + block)
        mb = m1 - m0
        ys0 = yt[0, m0:m1]
        ys1 = yt[1, m0:m1]
        ys2 = yt[2, m0:m1]
        lys = ly[m0:m1]
        acc = np.zeros((4, mb))
        for ib in range(nbx):
            uconst = ucon[ib, jb]
            if uconst < -1.5:
                continue
            n0 = ib * block
            n1 = min(n, n0 + block)
            nb = n1 - n0
            xs0 = xt[0, n0:n1]
            xs1 = xt[1, n0:n1]
            xs2 = xt[2, n0:n1]
            qq = q[n0:n1]
            lxs = lx[n0:n1]
            for j in range(mb):
                a0 = ys0[j]
                a1 = ys1[j]
                a2 = ys2[j]
                if _pt_box_d2(a0, a1, a2, xlo, xhi, ib) > cut2:
                    continue
                s0 = zero
                s1 = zero
                s2 = zero
                s3 = zero
                if uconst >= 0.0:
                    for i in range(nb):
                        d0 = xs0[i] - a0
                        d1 = xs1[i] - a1
                        d2 = xs2[i] - a2
                        t = (d0 * d0 + d1 * d1 + d2 * d2) * inv2s2
                        e = _fexp(min(t, tclamp))
                        e = qq[i] * e if t <= tcut else zero
                        s3 += e
                        s0 += e * xs0[i]
                        s1 += e * xs1[i]
                        s2 += e * xs2[i]
                    w = uconst
                else:
                    lj = lys[j]
                    for i in range(nb):
                        d0 = xs0[i] - a0
                        d1 = xs1[i] - a1
                        d2 = xs2[i] - a2
                        t = (d0 * d0 + d1 * d1 + d2 * d2) * inv2s2
                        e = _fexp(min(t, tclamp))
                        e = (qq[i] * U_f[lxs[i], lj]) * e if t <= tcut else zero
                        s3 += e
                        s0 += e * xs0[i]
                        s1 += e * xs1[i]
                        s2 += e * xs2[i]
                    w = 1.0
                acc[0, j] += w * s0
                acc[1, j] += w * s1
                acc[2, j] += w * s2
                acc[3, j] += w * s3
        for k in range(4):
            for j in range(mb):
                acc_out[k, m0 + j] = acc[k, j]


_rebind = _backend.rebind  # the suffix gives the float32 and float64 variants distinct cache files


@functools.cache
def _numba_estep(f32=False):
    """Compile (lazily, cached on disk) the two E-step passes for float32 or float64 coordinates."""
    import numba

    njit = _backend.njit
    sfx = "_f32" if f32 else "_f64"
    ns = dict(globals())
    ns["prange"] = numba.prange
    ns["_pt_box_d2"] = njit(inline="always")(_rebind(_pt_box_d2, ns))
    ns["_block_box"] = njit(_rebind(_block_box, ns, sfx))
    ns["_fexp"] = njit(inline="always", fastmath=True)(_rebind(_fexp32 if f32 else _fexp64, ns))
    return {"table": njit(_rebind(_block_table, ns, sfx)),
            "pass1": njit(parallel=True, fastmath=True)(_rebind(_estep_pass1, ns, sfx)),
            "pass2": njit(parallel=True, fastmath=True)(_rebind(_estep_pass2, ns, sfx))}


# ---------------------------------------------------------------------------------------------- GP kernel sums
def kernel_matrix(a, la, b, lb, amp, den):
    """Dense multi-organ Gaussian kernel ``G_ij = amp[la_i, lb_j] · exp(-|a_i - b_j|² / den[la_i, lb_j])``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    np.maximum(d2, 0.0, out=d2)
    la = np.asarray(la, dtype=np.int64)
    lb = np.asarray(lb, dtype=np.int64)
    if amp.shape == (1, 1):
        return amp[0, 0] * np.exp(-d2 / den[0, 0])
    return amp[la[:, None], lb[None, :]] * np.exp(-d2 / den[la[:, None], lb[None, :]])


def kernel_apply(q, lq, z, lz, coef, amp, den, *, backend=None, block_bytes=64 * 2**20):
    """``out_i = Σ_j amp[lq_i, lz_j] exp(-|q_i - z_j|² / den[lq_i, lz_j]) coef_j`` (GP interpolation, eq. 5).

    ``q`` (P, D) query points, ``z`` (J, D) anchors, ``coef`` (J, C). Returns (P, C). The numpy path works in row
    blocks of at most ``block_bytes``; the numba path is parallel over queries (deterministic) and evaluates ``exp``
    with the vectorised polynomial of :func:`estep` (relative error < 2e-10 per term).
    """
    q = np.ascontiguousarray(q, dtype=np.float64)
    z = np.ascontiguousarray(z, dtype=np.float64)
    coef = np.ascontiguousarray(coef, dtype=np.float64)
    lq = np.ascontiguousarray(_labels(lq, q.shape[0], "lq"))
    lz = np.ascontiguousarray(_labels(lz, z.shape[0], "lz"))
    amp = np.ascontiguousarray(amp, dtype=np.float64)
    den = np.ascontiguousarray(den, dtype=np.float64)
    be = _backend.resolve_backend(backend, q)
    if be == "cuda":  # tiny cost compared with a registration; keep the host path
        be = "numba" if _backend.HAVE_NUMBA else "numpy"
    if be == "numba":
        d = q.shape[1]
        qt = np.zeros((3, q.shape[0]))
        zt = np.zeros((3, z.shape[0]))
        qt[:d] = q.T
        zt[:d] = z.T
        brk = np.flatnonzero(np.diff(lz)) + 1
        runs = np.concatenate([[0], brk, [len(lz)]]).astype(np.int64)
        out = np.empty((q.shape[0], coef.shape[1]))
        with _threads_for(q.shape[0] * z.shape[0]):
            _numba_misc()["apply"](qt, lq, zt, runs, np.ascontiguousarray(lz[runs[:-1]]),
                                   np.ascontiguousarray(coef.T), amp, 1.0 / den, out)
        return out
    out = np.empty((q.shape[0], coef.shape[1]))
    rows = max(1, int(block_bytes // (8 * 3 * max(z.shape[0], 1))))
    for s in range(0, q.shape[0], rows):
        g = kernel_matrix(q[s:s + rows], lq[s:s + rows], z, lz, amp, den)
        out[s:s + rows] = g @ coef
    return out


def _kernel_apply_body(q, lq, z, runs, run_label, coef, amp, invden, out):
    """``out_i = Σ_j amp[lq_i, lz_j] exp(-|q_i - z_j|² invden[lq_i, lz_j]) coef_j`` (points padded to 3-D,
    transposed, ``coef`` (C, J)); the anchors come in runs of equal label (``runs[r]:runs[r+1]`` has label
    ``run_label[r]``). Parallel over blocks of 64 queries, vectorised over the anchors of a run."""
    p = q.shape[1]
    nz = z.shape[1]
    nc = coef.shape[0]
    nrun = run_label.shape[0]
    nblk = (p + 63) // 64
    for ib in prange(nblk):
        w = np.empty(nz)
        for i in range(ib * 64, min(p, ib * 64 + 64)):
            li = lq[i]
            a0 = q[0, i]
            a1 = q[1, i]
            a2 = q[2, i]
            for r in range(nrun):
                j0 = runs[r]
                j1 = runs[r + 1]
                a = amp[li, run_label[r]]
                dinv = invden[li, run_label[r]]
                zs0 = z[0, j0:j1]
                zs1 = z[1, j0:j1]
                zs2 = z[2, j0:j1]
                ws = w[j0:j1]
                if a == 0.0:
                    for j in range(j1 - j0):
                        ws[j] = 0.0
                    continue
                for j in range(j1 - j0):
                    d0 = zs0[j] - a0
                    d1 = zs1[j] - a1
                    d2 = zs2[j] - a2
                    ws[j] = a * _fexp(min((d0 * d0 + d1 * d1 + d2 * d2) * dinv, 700.0))
            for k in range(nc):
                ck = coef[k]
                s = 0.0
                for j in range(nz):
                    s += w[j] * ck[j]
                out[i, k] = s


def _gauss_body(a, z, inv2s2, out):
    """``out_ij = exp(-|a_i - z_j|² inv2s2)`` (points padded to 3-D, transposed)."""
    p = a.shape[1]
    nz = z.shape[1]
    z0 = z[0]
    z1 = z[1]
    z2 = z[2]
    for i in prange(p):
        a0 = a[0, i]
        a1 = a[1, i]
        a2 = a[2, i]
        for j in range(nz):
            d0 = z0[j] - a0
            d1 = z1[j] - a1
            d2 = z2[j] - a2
            out[i, j] = _fexp(min((d0 * d0 + d1 * d1 + d2 * d2) * inv2s2, 700.0))


@functools.cache
def _numba_misc():
    """Compile (lazily, cached on disk) the GP kernel sum and the Gaussian matrix."""
    import numba

    njit = _backend.njit
    ns = dict(globals())
    ns["prange"] = numba.prange
    ns["_fexp"] = njit(inline="always", fastmath=True)(_rebind(_fexp64, ns))
    return {"apply": njit(parallel=True, fastmath=True)(_rebind(_kernel_apply_body, ns)),
            "gauss": njit(parallel=True, fastmath=True)(_rebind(_gauss_body, ns)),
            "taper": njit(parallel=True)(_rebind(_taper_body, ns))}


def taper_cells(z, lz, coef, theta):
    """The cell list of :func:`taper_apply` for the anchors ``z`` (labels ``lz``, coefficients ``coef``) and taper
    radius ``theta``: the anchors binned into cubic cells of side θ and sorted by cell. Build it once to apply the
    same anchors to many query sets. None when numba is not installed or the cell keys would overflow int64."""
    if not _backend.HAVE_NUMBA:
        return None
    z = np.asarray(z, dtype=np.float64)
    d = z.shape[1]
    if len(z) == 0:
        lo = np.zeros(d)
    else:
        lo = z.min(0)
        if float(np.prod((z.max(0) - lo) / theta + 1.0)) > 2.0**60:
            return None
    zc = np.floor((z - lo) / theta).astype(np.int64)
    dims = np.ones(3, dtype=np.int64)
    if len(z):
        dims[:d] = zc.max(0) + 1
    zc3 = np.zeros((len(z), 3), dtype=np.int64)
    zc3[:, :d] = zc
    key = (zc3[:, 0] * dims[1] + zc3[:, 1]) * dims[2] + zc3[:, 2]
    order = np.argsort(key, kind="stable")
    cells, start = np.unique(key[order], return_index=True)
    zt = np.zeros((3, len(z)))
    zt[:d] = (z[order] - lo).T
    return {"lo": lo, "theta": float(theta), "dims": dims, "cells": cells, "start": start.astype(np.int64),
            "stop": np.append(start[1:], len(z)).astype(np.int64), "zt": zt,
            "lz": np.ascontiguousarray(_labels(lz, len(z), "lz")[order]),
            "coef": np.ascontiguousarray(np.asarray(coef, dtype=np.float64)[order])}


def taper_apply(q, lq, z, lz, coef, amp, den, theta, cells=None):
    """``out_i = Σ_j amp[lq_i, lz_j] exp(-d²/den[lq_i, lz_j]) ψ(d/θ) coef_j`` over the anchors ``z`` closer than
    ``theta`` to each query (``d = |q_i - z_j|``, Wendland ``ψ(r) = (1 - r)⁴ (4r + 1)``): the GP interpolation with
    a compactly supported kernel. numba: the anchors are binned into cubic cells of side θ (``cells``: the
    :func:`taper_cells` of these anchors, built here when not given), each query scans the 3^D cells around its
    own, parallel over queries (deterministic); queries beyond θ of the anchors' box (or not finite) get 0.
    Returns (P, C), or None when numba is not installed or the cell keys would overflow (the caller then uses a
    k-d tree)."""
    if cells is None:
        cells = taper_cells(z, lz, coef, theta)
    if cells is None:
        return None
    q = np.asarray(q, dtype=np.float64)
    d = q.shape[1]
    out = np.zeros((q.shape[0], cells["coef"].shape[1]))
    if len(q) == 0 or cells["zt"].shape[1] == 0:
        return out
    qt = np.zeros((3, len(q)))
    qt[:d] = (q - cells["lo"]).T
    with _threads_for(len(q) * 64):
        _numba_misc()["taper"](qt, np.ascontiguousarray(_labels(lq, len(q), "lq")), cells["zt"], cells["lz"],
                               cells["coef"], np.ascontiguousarray(amp, dtype=np.float64),
                               np.ascontiguousarray(1.0 / np.asarray(den, dtype=np.float64)), cells["theta"],
                               cells["dims"], cells["cells"], cells["start"], cells["stop"], out)
    return out


def _taper_body(qt, lq, zt, lz, coef, amp, iden, theta, dims, cells, start, stop, out):
    """Numba body of :func:`taper_apply` (coordinates relative to the anchors' minimum corner)."""
    t2 = theta * theta
    dz_hi = 2 if dims[2] > 1 else 1
    dz_lo = -1 if dims[2] > 1 else 0
    for i in prange(qt.shape[1]):
        f0 = qt[0, i] / theta
        f1 = qt[1, i] / theta
        f2 = qt[2, i] / theta
        if not (-2.0 < f0 < dims[0] + 1.0 and -2.0 < f1 < dims[1] + 1.0 and -2.0 < f2 < dims[2] + 1.0):
            continue  # no anchor within θ (or not finite): the sum is 0
        c0 = int(math.floor(f0))
        c1 = int(math.floor(f1))
        c2 = int(math.floor(f2))
        li = lq[i]
        for a in range(-1, 2):
            x0 = c0 + a
            if x0 < 0 or x0 >= dims[0]:
                continue
            for bb in range(-1, 2):
                x1 = c1 + bb
                if x1 < 0 or x1 >= dims[1]:
                    continue
                for cc in range(dz_lo, dz_hi):
                    x2 = c2 + cc
                    if x2 < 0 or x2 >= dims[2]:
                        continue
                    key = (x0 * dims[1] + x1) * dims[2] + x2
                    pos = np.searchsorted(cells, key)
                    if pos >= cells.shape[0] or cells[pos] != key:
                        continue
                    for j in range(start[pos], stop[pos]):
                        e0 = zt[0, j] - qt[0, i]
                        e1 = zt[1, j] - qt[1, i]
                        e2 = zt[2, j] - qt[2, i]
                        d2 = e0 * e0 + e1 * e1 + e2 * e2
                        if d2 >= t2:
                            continue
                        r = math.sqrt(d2) / theta
                        lj = lz[j]
                        w = amp[li, lj] * math.exp(-d2 * iden[li, lj]) * (1.0 - r) ** 4 * (4.0 * r + 1.0)
                        for k in range(coef.shape[1]):
                            out[i, k] += w * coef[j, k]


# ---------------------------------------------------------------------------------------------- ordering
def spatial_order(points, labels=None, *, bits=10):
    """A deterministic permutation that groups points by label, then along a Morton (Z-order) curve.

    Consecutive points of the result are spatially close, so fixed-size blocks have small bounding boxes (what the
    numba E-step prunes on).
    """
    p = np.asarray(points, dtype=np.float64)
    n, d = p.shape
    lo = p.min(0)
    span = np.maximum(p.max(0) - lo, 1e-300)
    qz = np.minimum(((p - lo) / span * (2**bits - 1)).astype(np.int64), 2**bits - 1)
    code = np.zeros(n, dtype=np.int64)
    for bit in range(bits):
        for k in range(d):
            code |= ((qz[:, k] >> bit) & 1) << (bit * d + k)
    lab = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    return np.lexsort((code, lab))
