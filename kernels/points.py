"""Point-cloud kernels for BCPD / multi-organ BCPD (METHODS.md §4): the E-step and Gaussian-process kernel sums.

Plain arrays in, arrays out; nothing here knows about transforms or solvers.

* :func:`estep` -- the BCPD E-step (METHODS §4.2 step 2) without ever forming the M×N matching matrix:
  ``φ_mn = b_m · U[lx_n, ly_m] · exp(-|x_n - y_m|² / (2σ²))``, ``p_mn = φ_mn / (c + Σ_m' φ_m'n)`` and returns
  ``ν_m = Σ_n p_mn``, ``ν'_n = Σ_m p_mn`` and ``PX_m = Σ_n p_mn x_n``.  Pairs whose Gaussian factor is below
  ``truncation`` are treated as exactly zero (``truncation=0`` keeps every pair).
  The ``"numpy"`` reference (also runs on CuPy arrays) works in column blocks of at most ``block_bytes``; the
  ``"numba"`` path runs two parallel passes over spatial blocks of points (pass 1 over target blocks computes the
  denominators, pass 2 over source blocks the sums), skips block pairs whose bounding boxes are farther apart than
  the truncation radius or whose labels cannot match (``U = 0``), and gives bitwise-identical results for any
  thread count (every output is summed by one thread in a fixed order).
* :func:`kernel_matrix` -- the multi-organ Gaussian kernel ``G_ij = amp[l_i, l_j] exp(-|a_i - b_j|² / den[l_i, l_j])``
  (dense, for one block).
* :func:`kernel_apply` -- ``out_i = Σ_j G(q_i, z_j) coef_j`` in blocks (Gaussian-process interpolation, eq. 5),
  numpy reference and numba parallel path.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _backend

__all__ = ["estep", "kernel_matrix", "kernel_apply", "spatial_order"]

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
def estep(x, y, b, sigma2, c, *, lx=None, ly=None, U=None, truncation=0.0, backend=None, block=128,
          block_bytes=64 * 2**20):
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
        :func:`spatial_order`, for the block pruning to help).
    block_bytes : int
        Memory budget of one (M × chunk) block of the reference path.

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
        return _estep_numba(np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y, dtype=np.float64),
                            np.ascontiguousarray(b, dtype=np.float64), float(sigma2), float(c), lx_h, ly_h,
                            np.ascontiguousarray(U_h), cut2, int(block))
    return _estep_ref(xp, x, y, b, float(sigma2), float(c), lx_h, ly_h, U_h, cut2, int(block_bytes))


def _backend_to_host(a):
    return a.get() if _backend.is_cupy_array(a) else a


def _estep_ref(xp, x, y, b, sigma2, c, lx, ly, U, cut2, block_bytes):
    """Array reference: blocks of target columns, each block an (M, chunk) matrix of at most ``block_bytes``."""
    x = xp.asarray(x, dtype=xp.float64)
    y = xp.asarray(y, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    n, d = x.shape
    m = y.shape[0]
    chunk = max(1, int(block_bytes // (8 * 4 * max(m, 1))))
    lx_d = xp.asarray(lx)
    ly_d = xp.asarray(ly)
    U_d = xp.asarray(U)
    nu = xp.zeros(m)
    px = xp.zeros((m, d))
    nu_x = xp.zeros(n)
    yy = (y * y).sum(1)
    for s in range(0, n, chunk):
        xs = x[s:s + chunk]
        d2 = yy[:, None] + (xs * xs).sum(1)[None, :] - 2.0 * (y @ xs.T)
        d2 = xp.maximum(d2, 0.0)
        phi = xp.exp(-d2 / (2.0 * sigma2)) * U_d[lx_d[s:s + chunk][None, :], ly_d[:, None]] * b[:, None]
        phi = xp.where(d2 <= cut2, phi, 0.0)
        den = xp.maximum(phi.sum(0) + c, DEN_FLOOR)
        p = phi / den[None, :]
        nu += p.sum(1)
        px += p @ xs
        nu_x[s:s + chunk] = p.sum(0)
    return nu, nu_x, px


def _boxes(a, block):
    n, d = a.shape
    nb = (n + block - 1) // block
    pad = nb * block - n
    if pad:
        a = np.concatenate([a, np.repeat(a[-1:], pad, axis=0)])
    r = a.reshape(nb, block, d)
    return np.ascontiguousarray(r.min(1)), np.ascontiguousarray(r.max(1))


def _block_labels(lab, block):
    n = lab.shape[0]
    nb = (n + block - 1) // block
    out = np.empty(nb, dtype=np.int64)
    for i in range(nb):
        seg = lab[i * block:(i + 1) * block]
        out[i] = seg[0] if np.all(seg == seg[0]) else -1
    return out


def _estep_numba(x, y, b, sigma2, c, lx, ly, U, cut2, block):
    xlo, xhi = _boxes(x, block)
    ylo, yhi = _boxes(y, block)
    bx = _block_labels(lx, block)
    by = _block_labels(ly, block)
    pass1, pass2 = _numba_estep()
    inv2s2 = 1.0 / (2.0 * sigma2)
    q = np.empty(x.shape[0])
    nu_x = np.empty(x.shape[0])
    pass1(x, y, b, lx, ly, U, xlo, xhi, ylo, yhi, bx, by, inv2s2, c, cut2, block, q, nu_x)
    nu = np.empty(y.shape[0])
    px = np.empty_like(y)
    pass2(x, y, b, lx, ly, U, xlo, xhi, ylo, yhi, bx, by, inv2s2, cut2, block, q, nu, px)
    return nu, nu_x, px


def _box_d2(alo, ahi, blo, bhi, i, j):
    s = 0.0
    for k in range(alo.shape[1]):
        g = blo[j, k] - ahi[i, k]
        h = alo[i, k] - bhi[j, k]
        if h > g:
            g = h
        if g > 0.0:
            s += g * g
    return s


@functools.cache
def _numba_estep():
    import numba

    njit = _backend.njit
    box_d2 = njit(inline="always")(_box_d2)

    @njit(parallel=True, fastmath=True)
    def pass1(x, y, b, lx, ly, U, xlo, xhi, ylo, yhi, bx, by, inv2s2, c, cut2, block, q, nu_x):
        n, d = x.shape
        m = y.shape[0]
        nbx = xlo.shape[0]
        nby = ylo.shape[0]
        for ib in numba.prange(nbx):
            n0 = ib * block
            n1 = min(n, n0 + block)
            acc = np.zeros(n1 - n0)
            for jb in range(nby):
                if bx[ib] >= 0 and by[jb] >= 0 and U[bx[ib], by[jb]] == 0.0:
                    continue
                if box_d2(xlo, xhi, ylo, yhi, ib, jb) > cut2:
                    continue
                m0 = jb * block
                m1 = min(m, m0 + block)
                for i in range(n0, n1):
                    li = lx[i]
                    s = 0.0
                    for j in range(m0, m1):
                        u = U[li, ly[j]]
                        if u == 0.0:
                            continue
                        d2 = 0.0
                        for k in range(d):
                            t = x[i, k] - y[j, k]
                            d2 += t * t
                        if d2 <= cut2:
                            s += b[j] * u * np.exp(-d2 * inv2s2)
                    acc[i - n0] += s
            for i in range(n0, n1):
                den = acc[i - n0] + c
                if den < 1e-300:
                    den = 1e-300
                q[i] = 1.0 / den
                nu_x[i] = acc[i - n0] / den

    @njit(parallel=True, fastmath=True)
    def pass2(x, y, b, lx, ly, U, xlo, xhi, ylo, yhi, bx, by, inv2s2, cut2, block, q, nu, px):
        n, d = x.shape
        m = y.shape[0]
        nbx = xlo.shape[0]
        nby = ylo.shape[0]
        for jb in numba.prange(nby):
            m0 = jb * block
            m1 = min(m, m0 + block)
            acc = np.zeros((m1 - m0, d + 1))
            for ib in range(nbx):
                if bx[ib] >= 0 and by[jb] >= 0 and U[bx[ib], by[jb]] == 0.0:
                    continue
                if box_d2(xlo, xhi, ylo, yhi, ib, jb) > cut2:
                    continue
                n0 = ib * block
                n1 = min(n, n0 + block)
                for j in range(m0, m1):
                    lj = ly[j]
                    bj = b[j]
                    for i in range(n0, n1):
                        u = U[lx[i], lj]
                        if u == 0.0:
                            continue
                        d2 = 0.0
                        for k in range(d):
                            t = x[i, k] - y[j, k]
                            d2 += t * t
                        if d2 <= cut2:
                            p = bj * u * np.exp(-d2 * inv2s2) * q[i]
                            acc[j - m0, d] += p
                            for k in range(d):
                                acc[j - m0, k] += p * x[i, k]
            for j in range(m0, m1):
                nu[j] = acc[j - m0, d]
                for k in range(d):
                    px[j, k] = acc[j - m0, k]

    return pass1, pass2


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
    blocks of at most ``block_bytes``; the numba path is parallel over queries (deterministic).
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
        out = np.empty((q.shape[0], coef.shape[1]))
        _numba_kernel_apply()(q, lq, z, lz, coef, amp, den, out)
        return out
    out = np.empty((q.shape[0], coef.shape[1]))
    rows = max(1, int(block_bytes // (8 * 3 * max(z.shape[0], 1))))
    for s in range(0, q.shape[0], rows):
        g = kernel_matrix(q[s:s + rows], lq[s:s + rows], z, lz, amp, den)
        out[s:s + rows] = g @ coef
    return out


@functools.cache
def _numba_kernel_apply():
    import numba

    @_backend.njit(parallel=True, fastmath=True)
    def apply(q, lq, z, lz, coef, amp, den, out):
        p, d = q.shape
        nz = z.shape[0]
        nc = coef.shape[1]
        for i in numba.prange(p):
            li = lq[i]
            acc = np.zeros(nc)
            for j in range(nz):
                a = amp[li, lz[j]]
                if a == 0.0:
                    continue
                d2 = 0.0
                for k in range(d):
                    t = q[i, k] - z[j, k]
                    d2 += t * t
                w = a * np.exp(-d2 / den[li, lz[j]])
                for k in range(nc):
                    acc[k] += w * coef[j, k]
            for k in range(nc):
                out[i, k] = acc[k]

    return apply


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
