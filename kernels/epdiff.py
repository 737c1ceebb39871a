"""The per-time-step work of band-limited geodesic shooting (EPDiff), fused: the co-adjoint products, their
transposes, and the tracing of the inverse map through a sequence of velocity fields with its reverse sweep.

They serve ``classreg.solvers.lddmm.bandlimited`` (M. Zhang, P. T. Fletcher, IJCV 127:61-73, 2019,
doi:10.1007/s11263-018-1099-x), where a 2-D time step costs a few hundred microseconds and numpy's per-call overhead
(one temporary per product, one call per step) was a large part of it.

* :func:`ad_star` -- ``B(v, m)_i = Σ_j ∂_i v_j m_j + Σ_j ∂_j m_i v_j + m_i ∇·v`` (``ad*_v m``, the right-hand side of
  EPDiff) and the largest ``‖Dv‖²_F`` over the grid (the stability number's ingredient), in one pass.
* :func:`ad_star_transpose` -- the transposes of B with respect to ``v`` (A) and to ``m`` (B') applied to ``μ``
  (given ``μ`` and its spectral Jacobian), with the derivatives moved onto ``μ`` by the product rule:
  ``A_j = −(∇·μ) m_j − Σ_i μ_i ∂_i m_j − Σ_i (∂_j μ_i) m_i``,  ``B'_j = Σ_i μ_i ∂_i v_j − Σ_i v_i ∂_i μ_j``
  (exact on periodic fields whose products stay below the grid's Nyquist frequency).
* :func:`trace_back` -- ``Z ← Z − δt w_k(Z)`` for k = n−1..0 (the inverse map
  ``φ₁⁻¹ = (id − δt w₀)∘…∘(id − δt w_{n−1})`` at the start points), ``w_k`` sampled by
  :func:`classreg.kernels.adjoint.sample_linear`'s interpolant; optionally the positions where each ``w_k`` was
  sampled.
* :func:`trace_back_adjoint` -- the exact reverse sweep of :func:`trace_back` with respect to the fields ``w_k``,
  given the cotangent of the end points.

Arrays: fields ``(d, *n)`` channels-first (``Dv[j, c] = ∂_j v_c``) for the products; velocity stacks ``(n_t, *M, d)``
channels-last in index units and points ``(*P, d)`` for the tracing. The numpy functions are the references (test
oracles); the numba paths compile the same arithmetic. The tracing runs each point's path in one go (parallel over
points); its reverse sweep scatters, so it is a sequential loop (no write races, independent of the thread count).
"""
from __future__ import annotations

import functools
import types

import numpy as np

from . import _backend
from .adjoint import _axis_scalar, sample_linear, splat_linear

__all__ = ["ad_star", "ad_star_transpose", "trace_back", "trace_back_adjoint"]


def _backend_for(backend, *arrays):
    b = _backend.resolve_backend(backend, *arrays)
    if b == "cuda":
        raise ValueError("kernels.epdiff has no CUDA path; use backend='numpy' or 'numba'")
    return b


# ----------------------------------------------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------------------------------------------
def _ad_star_np(v, m, Dv, Dm):
    div = sum(Dv[j, j] for j in range(len(v)))
    B = (Dv * m[None]).sum(axis=1) + (Dm * v[:, None]).sum(axis=0) + m * div
    return B, float(np.max((Dv * Dv).sum(axis=(0, 1))))


def _ad_star_transpose_np(mu, Dmu, v, m, Dv, Dm, out):
    d = len(mu)
    A, B = out[:d], out[d:2 * d]
    np.multiply(sum(Dmu[j, j] for j in range(d)), m, out=A)
    np.negative(A, out=A)
    B[...] = 0
    for i in range(d):
        A -= mu[i] * Dm[i]
        A -= Dmu[:, i] * m[i]
        B += mu[i] * Dv[i]
        B -= v[i] * Dmu[i]


def _trace_back_np(w, pts, dt, zs):
    Z = pts
    for k in range(w.shape[0] - 1, -1, -1):
        if zs is not None:
            zs[k] = Z
        Z = Z - dt * sample_linear(w[k], Z, backend="numpy")
    return Z


def _trace_back_adjoint_np(w, zs, zbar, dt):
    n, M = w.shape[0], w.shape[1:-1]
    wbar = np.empty_like(w)
    for k in range(n):  # the reverse of the tracing loop k = n−1..0
        _, dw = sample_linear(w[k], zs[k], gradient=True, backend="numpy")
        np.multiply(splat_linear(zbar, zs[k], M, backend="numpy"), -dt, out=wbar[k])
        zbar = zbar - dt * np.einsum("pc,pcj->pj", zbar, dw)
    return wbar


# ----------------------------------------------------------------------------------------------------------------
# numba paths: module-level templates compiled lazily (numba caches them on disk). `prange`, `_ax` are rebound.
# ----------------------------------------------------------------------------------------------------------------
prange = range
_ax = _axis_scalar


def _ad_star_k(v, m, Dv, Dm, out, chunk_max):
    # v, m, out (d, N); Dv, Dm (d, d, N); chunk_max (nc,) the largest |Dv|²_F of each chunk of points
    d, N = v.shape
    nch = chunk_max.shape[0]
    size = (N + nch - 1) // nch
    for c in prange(nch):
        best = 0.0
        for p in range(c * size, min(N, (c + 1) * size)):
            div = 0.0
            sq = 0.0
            for j in range(d):
                div += Dv[j, j, p]
                for i in range(d):
                    sq += Dv[j, i, p] * Dv[j, i, p]
            best = max(best, sq)
            for i in range(d):
                acc = m[i, p] * div
                for j in range(d):
                    acc += Dv[i, j, p] * m[j, p] + Dm[j, i, p] * v[j, p]
                out[i, p] = acc
        chunk_max[c] = best


def _ad_star_t_k(mu, Dmu, v, m, Dv, Dm, out):
    # out[:d] = A, out[d:2d] = B (see the module docstring); fields flattened to (d, N), Jacobians (d, d, N)
    d, N = mu.shape
    for p in prange(N):
        div = 0.0
        for j in range(d):
            div += Dmu[j, j, p]
        for j in range(d):
            a = -div * m[j, p]
            b = 0.0
            for i in range(d):
                a -= mu[i, p] * Dm[i, j, p] + Dmu[j, i, p] * m[i, p]
                b += mu[i, p] * Dv[i, j, p] - v[i, p] * Dmu[i, j, p]
            out[j, p] = a
            out[d + j, p] = b


def _trace2(w, pts, dt, zs, out, store):
    n, n0, n1, C = w.shape
    for p in prange(pts.shape[0]):
        out[p, 0] = pts[p, 0]
        out[p, 1] = pts[p, 1]
        for k in range(n - 1, -1, -1):
            z0 = out[p, 0]
            z1 = out[p, 1]
            if store:
                zs[k, p, 0] = z0
                zs[k, p, 1] = z1
            j0, t0, i0 = _ax(z0, n0)
            j1, t1, i1 = _ax(z1, n1)
            s0 = 1 - t0
            s1 = 1 - t1
            a0 = s0 * (s1 * w[k, j0, j1, 0] + t1 * w[k, j0, j1 + 1, 0]) + \
                t0 * (s1 * w[k, j0 + 1, j1, 0] + t1 * w[k, j0 + 1, j1 + 1, 0])
            a1 = s0 * (s1 * w[k, j0, j1, 1] + t1 * w[k, j0, j1 + 1, 1]) + \
                t0 * (s1 * w[k, j0 + 1, j1, 1] + t1 * w[k, j0 + 1, j1 + 1, 1])
            out[p, 0] = z0 - dt * a0
            out[p, 1] = z1 - dt * a1


def _trace3(w, pts, dt, zs, out, store):
    n, n0, n1, n2, C = w.shape
    for p in prange(pts.shape[0]):
        for c in range(3):
            out[p, c] = pts[p, c]
        for k in range(n - 1, -1, -1):
            z0 = out[p, 0]
            z1 = out[p, 1]
            z2 = out[p, 2]
            if store:
                zs[k, p, 0] = z0
                zs[k, p, 1] = z1
                zs[k, p, 2] = z2
            j0, t0, i0 = _ax(z0, n0)
            j1, t1, i1 = _ax(z1, n1)
            j2, t2, i2 = _ax(z2, n2)
            s0 = 1 - t0
            s1 = 1 - t1
            s2 = 1 - t2
            for c in range(3):
                a0 = s1 * (s2 * w[k, j0, j1, j2, c] + t2 * w[k, j0, j1, j2 + 1, c]) + \
                    t1 * (s2 * w[k, j0, j1 + 1, j2, c] + t2 * w[k, j0, j1 + 1, j2 + 1, c])
                a1 = s1 * (s2 * w[k, j0 + 1, j1, j2, c] + t2 * w[k, j0 + 1, j1, j2 + 1, c]) + \
                    t1 * (s2 * w[k, j0 + 1, j1 + 1, j2, c] + t2 * w[k, j0 + 1, j1 + 1, j2 + 1, c])
                out[p, c] = out[p, c] - dt * (s0 * a0 + t0 * a1)


def _trace_adj2(w, zs, zbar, dt, wbar):
    # zbar (N, 2) is updated in place (the cotangent of the points, step by step); wbar (n, n0, n1, 2) zeroed
    n, n0, n1, C = w.shape
    g = np.zeros((2, 2))
    for p in range(zs.shape[1]):
        for k in range(n):
            j0, t0, i0 = _ax(zs[k, p, 0], n0)
            j1, t1, i1 = _ax(zs[k, p, 1], n1)
            s0 = 1 - t0
            s1 = 1 - t1
            b0 = zbar[p, 0]
            b1 = zbar[p, 1]
            for c in range(2):
                a = -dt * zbar[p, c]
                wbar[k, j0, j1, c] += s0 * s1 * a
                wbar[k, j0, j1 + 1, c] += s0 * t1 * a
                wbar[k, j0 + 1, j1, c] += t0 * s1 * a
                wbar[k, j0 + 1, j1 + 1, c] += t0 * t1 * a
                v00 = w[k, j0, j1, c]
                v01 = w[k, j0, j1 + 1, c]
                v10 = w[k, j0 + 1, j1, c]
                v11 = w[k, j0 + 1, j1 + 1, c]
                g[c, 0] = (s1 * (v10 - v00) + t1 * (v11 - v01)) if i0 else 0.0
                g[c, 1] = (s0 * (v01 - v00) + t0 * (v11 - v10)) if i1 else 0.0
            zbar[p, 0] = b0 - dt * (b0 * g[0, 0] + b1 * g[1, 0])
            zbar[p, 1] = b1 - dt * (b0 * g[0, 1] + b1 * g[1, 1])


def _trace_adj3(w, zs, zbar, dt, wbar):
    n, n0, n1, n2, C = w.shape
    g = np.zeros((3, 3))
    for p in range(zs.shape[1]):
        for k in range(n):
            j0, t0, i0 = _ax(zs[k, p, 0], n0)
            j1, t1, i1 = _ax(zs[k, p, 1], n1)
            j2, t2, i2 = _ax(zs[k, p, 2], n2)
            s0 = 1 - t0
            s1 = 1 - t1
            s2 = 1 - t2
            for c in range(3):
                a = -dt * zbar[p, c]
                wbar[k, j0, j1, j2, c] += s0 * s1 * s2 * a
                wbar[k, j0, j1, j2 + 1, c] += s0 * s1 * t2 * a
                wbar[k, j0, j1 + 1, j2, c] += s0 * t1 * s2 * a
                wbar[k, j0, j1 + 1, j2 + 1, c] += s0 * t1 * t2 * a
                wbar[k, j0 + 1, j1, j2, c] += t0 * s1 * s2 * a
                wbar[k, j0 + 1, j1, j2 + 1, c] += t0 * s1 * t2 * a
                wbar[k, j0 + 1, j1 + 1, j2, c] += t0 * t1 * s2 * a
                wbar[k, j0 + 1, j1 + 1, j2 + 1, c] += t0 * t1 * t2 * a
                v000 = w[k, j0, j1, j2, c]
                v001 = w[k, j0, j1, j2 + 1, c]
                v010 = w[k, j0, j1 + 1, j2, c]
                v011 = w[k, j0, j1 + 1, j2 + 1, c]
                v100 = w[k, j0 + 1, j1, j2, c]
                v101 = w[k, j0 + 1, j1, j2 + 1, c]
                v110 = w[k, j0 + 1, j1 + 1, j2, c]
                v111 = w[k, j0 + 1, j1 + 1, j2 + 1, c]
                a0 = s1 * (s2 * v000 + t2 * v001) + t1 * (s2 * v010 + t2 * v011)
                a1 = s1 * (s2 * v100 + t2 * v101) + t1 * (s2 * v110 + t2 * v111)
                g[c, 0] = (a1 - a0) if i0 else 0.0
                e0 = s2 * v000 + t2 * v001
                e1 = s2 * v010 + t2 * v011
                e2 = s2 * v100 + t2 * v101
                e3 = s2 * v110 + t2 * v111
                g[c, 1] = (s0 * (e1 - e0) + t0 * (e3 - e2)) if i1 else 0.0
                f0 = s1 * v000 + t1 * v010
                f1 = s1 * v001 + t1 * v011
                f2 = s1 * v100 + t1 * v110
                f3 = s1 * v101 + t1 * v111
                g[c, 2] = (s0 * (f1 - f0) + t0 * (f3 - f2)) if i2 else 0.0
            b0 = zbar[p, 0]
            b1 = zbar[p, 1]
            b2 = zbar[p, 2]
            for j in range(3):
                zbar[p, j] = zbar[p, j] - dt * (b0 * g[0, j] + b1 * g[1, j] + b2 * g[2, j])


#: below this many points (or grid samples) the gathers run serially (see kernels.adjoint.PARALLEL_MIN)
PARALLEL_MIN = 1 << 16
#: chunks of the reduction in :func:`ad_star` (fixed, so that the result does not depend on the thread count)
_CHUNKS = 64


@functools.cache
def _numba_kernels(parallel=True):
    import numba

    from .smooth import _numba_compile

    ax = _backend.njit(inline="always")(_axis_scalar)
    par = dict(parallel=True, prange=numba.prange) if parallel else dict(_suffix="_serial")
    return types.SimpleNamespace(
        ad_star=_numba_compile(_ad_star_k, **par),
        ad_star_t=_numba_compile(_ad_star_t_k, **par),
        trace2=_numba_compile(_trace2, _ax=ax, **par),
        trace3=_numba_compile(_trace3, _ax=ax, **par),
        trace_adj2=_numba_compile(_trace_adj2, _ax=ax),
        trace_adj3=_numba_compile(_trace_adj3, _ax=ax),
    )


def _kern(size):
    return _numba_kernels(size >= PARALLEL_MIN)


# ----------------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------------
def ad_star(v, m, Dv, Dm, *, backend=None):
    """``ad*_v m`` and the largest squared Frobenius norm of ``Dv`` over the grid.

    Parameters
    ----------
    v, m : ndarray, shape ``(d, *n)``
        Velocity and momentum (channels first, one dtype).
    Dv, Dm : ndarray, shape ``(d, d, *n)``
        Their Jacobians, ``Dv[j, c] = ∂_j v_c``.
    backend : {None, "numpy", "numba"}

    Returns
    -------
    B : ndarray, shape ``(d, *n)``
        ``B_i = Σ_j ∂_i v_j m_j + Σ_j ∂_j m_i v_j + m_i ∇·v``.
    max_sq : float
        ``max_x Σ_{j,c} (∂_j v_c)²``.
    """
    b = _backend_for(backend, v)
    if b == "numpy":
        return _ad_star_np(v, m, Dv, Dm)
    d, N = v.shape[0], int(np.prod(v.shape[1:]))
    out = np.empty(v.shape, dtype=v.dtype)
    cm = np.zeros(_CHUNKS, dtype=np.float64)
    _kern(N).ad_star(*(np.ascontiguousarray(a).reshape(*a.shape[:k], N) for a, k in ((v, 1), (m, 1), (Dv, 2),
                                                                                    (Dm, 2))),
                     out.reshape(d, N), cm)
    return out, float(cm.max())


def ad_star_transpose(mu, Dmu, v, m, Dv, Dm, *, out=None, backend=None):
    """The transposes of :func:`ad_star`'s ``B(v, m)`` with respect to ``v`` and to ``m``, applied to ``μ``:
    ``<B(v, m), μ> = <v, A> = <m, B'>``.

    Parameters
    ----------
    mu : ndarray, shape ``(d, *n)``
    Dmu : ndarray, shape ``(d, d, *n)``
        ``Dmu[i, j] = ∂_i μ_j``.
    v, m, Dv, Dm
        As in :func:`ad_star`.
    out : ndarray, shape ``(k, *n)`` with ``k ≥ 2d``, optional
        Written into ``out[:2d]`` (contiguous).
    backend : {None, "numpy", "numba"}

    Returns
    -------
    ndarray, shape ``(2d, *n)`` (a view of ``out`` when given)
        ``A`` then ``B'``: ``A_j = −(∇·μ) m_j − Σ_i μ_i ∂_i m_j − Σ_i (∂_j μ_i) m_i``,
        ``B'_j = Σ_i μ_i ∂_i v_j − Σ_i v_i ∂_i μ_j``.
    """
    b = _backend_for(backend, mu)
    d = mu.shape[0]
    if out is None:
        out = np.empty((2 * d, *mu.shape[1:]), dtype=mu.dtype)
    res = out[:2 * d]
    if b == "numpy":
        _ad_star_transpose_np(mu, Dmu, v, m, Dv, Dm, res)
        return res
    N = int(np.prod(mu.shape[1:]))
    _kern(N).ad_star_t(*(np.ascontiguousarray(a).reshape(*a.shape[:k], N)
                         for a, k in ((mu, 1), (Dmu, 2), (v, 1), (m, 1), (Dv, 2), (Dm, 2))),
                       res.reshape(2 * d, N))
    return res


def trace_back(w, points, dt, *, positions=False, backend=None):
    """The points carried backwards through the velocities: ``Z ← Z − δt w_k(Z)`` for k = n−1, …, 0.

    Parameters
    ----------
    w : ndarray, shape ``(n_t, *M, d)``
        Velocities in index units of the grid ``M`` (channels last), d = 2 or 3.
    points : ndarray, shape ``(*P, d)``
        Start points (continuous indices of ``M``).
    dt : float
        The time step δt.
    positions : bool
        Also return where each ``w_k`` was sampled (what :func:`trace_back_adjoint` needs).
    backend : {None, "numpy", "numba"}

    Returns
    -------
    Z : ndarray, shape ``(*P, d)``
        The end points (``φ₁⁻¹`` at ``points``).
    zs : ndarray, shape ``(n_t, *P, d)`` (only with ``positions``)
        ``zs[k]`` = the points before step k was applied (the sample positions of ``w_k``).
    """
    b = _backend_for(backend, w, points)
    d = w.shape[-1]
    dt = w.dtype.type(dt)
    P = points.shape[:-1]
    pts = np.ascontiguousarray(points, dtype=w.dtype).reshape(-1, d)
    zs = np.empty((w.shape[0], pts.shape[0], d), dtype=w.dtype) if positions else None
    if b == "numpy":
        Z = _trace_back_np(w, pts, dt, zs)
    else:
        Z = np.empty_like(pts)
        k = _kern(pts.shape[0])
        (k.trace2 if d == 2 else k.trace3)(np.ascontiguousarray(w), pts, dt,
                                           zs if positions else np.empty((1, 1, d), w.dtype), Z, positions)
    Z = Z.reshape(*P, d)
    return (Z, zs.reshape(w.shape[0], *P, d)) if positions else Z


def trace_back_adjoint(w, zs, zbar, dt, *, backend=None):
    """The reverse sweep of :func:`trace_back` with respect to ``w``: given ``zbar`` (the cotangent of the end
    points), the cotangent of every ``w_k``.

    Parameters
    ----------
    w : ndarray, shape ``(n_t, *M, d)``
    zs : ndarray, shape ``(n_t, *P, d)``
        The sample positions returned by ``trace_back(..., positions=True)``.
    zbar : ndarray, shape ``(*P, d)``
    dt : float
    backend : {None, "numpy", "numba"}

    Returns
    -------
    ndarray, shape ``(n_t, *M, d)``
        ``Σ_p ∂⟨zbar, Z⟩/∂w_k`` (``<trace_back(w + εδ) − trace_back(w), zbar> / ε → <δ, result>``).
    """
    b = _backend_for(backend, w, zs, zbar)
    d = w.shape[-1]
    dt = w.dtype.type(dt)
    zs = np.ascontiguousarray(zs, dtype=w.dtype).reshape(w.shape[0], -1, d)
    zb = np.array(zbar, dtype=w.dtype).reshape(-1, d)  # a copy: the kernel updates it in place
    if b == "numpy":
        return _trace_back_adjoint_np(w, zs, zb, dt)
    wbar = np.zeros_like(w)
    k = _numba_kernels(False)
    (k.trace_adj2 if d == 2 else k.trace_adj3)(np.ascontiguousarray(w), zs, zb, dt, wbar)
    return wbar
