"""The map tracing of band-limited geodesic shooting and its reverse sweep, fused over the time steps.

They serve ``classreg.solvers.lddmm.bandlimited`` (M. Zhang, P. T. Fletcher, IJCV 127:61-73, 2019,
doi:10.1007/s11263-018-1099-x), where the inverse map is traced along characteristics through the velocities of all
time steps, ``φ₁⁻¹ = (id − δt w₀)∘…∘(id − δt w_{n−1})``.

* :func:`trace_back` -- ``Z ← Z − δt w_k(Z)`` for k = n−1..0 at the start points, ``w_k`` sampled by
  :func:`classreg.kernels.adjoint.sample_linear`'s interpolant; optionally the positions where each ``w_k`` was
  sampled.
* :func:`trace_back_adjoint` -- the exact reverse sweep of :func:`trace_back` with respect to the fields ``w_k``,
  given the cotangent of the end points: per step the transposed interpolation (a scatter) and the transposed
  Jacobian of the step. The numba kernel follows each point through all steps in one call (per step and point:
  scatter, gather of ``Dw_k``, update of the cotangent), instead of three kernel calls and an ``einsum`` per step.

Arrays: velocity stacks ``(n_t, *M, d)`` channels-last in index units of the grid ``M``, points ``(*P, d)``. The
numpy functions are the references (test oracles). The reverse sweep scatters, so its numba kernel is a sequential
loop (no write races; the result does not depend on the thread count). On the GPU (``backend="cuda"``) both run as a
loop over the steps of the CUDA sampling and scattering kernels of :mod:`classreg.kernels.adjoint`.
"""
from __future__ import annotations

import functools
import types

import numpy as np

from . import _backend
from .adjoint import _axis_scalar, sample_linear, splat_linear

__all__ = ["trace_back", "trace_back_adjoint"]


def _backend_for(backend, *arrays):
    return _backend.resolve_backend(backend, *arrays)


# ----------------------------------------------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------------------------------------------
def _trace_back(w, pts, dt, zs, backend):
    # one gather per step with kernels.adjoint.sample_linear (its numba kernel; a fused loop over the steps per
    # point measured no faster: the gathers dominate)
    Z = pts
    for k in range(w.shape[0] - 1, -1, -1):
        if zs is not None:
            zs[k] = Z
        Z = Z - dt * sample_linear(w[k], Z, backend=backend)
    return Z


def _trace_back_adjoint_np(w, zs, zbar, dt, backend="numpy", xp=np):
    # also the CUDA path (backend "cuda", xp the device module): per step one gather with the gradient and one
    # atomic scatter, the cotangent update an array expression (the fused sequential numba loop has no parallel form)
    n, M = w.shape[0], w.shape[1:-1]
    wbar = xp.empty_like(w)
    for k in range(n):  # the reverse of the tracing loop k = n−1..0
        _, dw = sample_linear(w[k], zs[k], gradient=True, backend=backend)
        xp.multiply(splat_linear(zbar, zs[k], M, backend=backend), -dt, out=wbar[k])
        zbar = zbar - dt * xp.einsum("pc,pcj->pj", zbar, dw)
    return wbar


# ----------------------------------------------------------------------------------------------------------------
# numba paths: module-level templates compiled lazily (numba caches them on disk). `_ax` is rebound.
# ----------------------------------------------------------------------------------------------------------------
_ax = _axis_scalar


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


@functools.cache
def _numba_kernels():
    from .smooth import _numba_compile

    ax = _backend.njit(inline="always")(_axis_scalar)
    return types.SimpleNamespace(trace_adj2=_numba_compile(_trace_adj2, _ax=ax),
                                 trace_adj3=_numba_compile(_trace_adj3, _ax=ax))


# ----------------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------------
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
    backend : {None, "numpy", "numba", "cuda"}

    Returns
    -------
    Z : ndarray, shape ``(*P, d)``
        The end points (``φ₁⁻¹`` at ``points``).
    zs : ndarray, shape ``(n_t, *P, d)`` (only with ``positions``)
        ``zs[k]`` = the points before step k was applied (the sample positions of ``w_k``).
    """
    b = _backend_for(backend, w, points)
    xp = _backend.get_array_module(w, points) if b == "cuda" else np
    d = w.shape[-1]
    P = points.shape[:-1]
    pts = xp.ascontiguousarray(points, dtype=w.dtype).reshape(-1, d)
    zs = xp.empty((w.shape[0], pts.shape[0], d), dtype=w.dtype) if positions else None
    Z = _trace_back(w, pts, w.dtype.type(dt), zs, b)
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
    backend : {None, "numpy", "numba", "cuda"}
        "cuda": per step :func:`~classreg.kernels.adjoint.sample_linear` and the atomic
        :func:`~classreg.kernels.adjoint.splat_linear` on the device (agrees with the CPU paths to rounding).

    Returns
    -------
    ndarray, shape ``(n_t, *M, d)``
        ``Σ_p ∂⟨zbar, Z⟩/∂w_k`` (``<trace_back(w + εδ) − trace_back(w), zbar> / ε → <δ, result>``).
    """
    b = _backend_for(backend, w, zs, zbar)
    xp = _backend.get_array_module(w, zs, zbar) if b == "cuda" else np
    d = w.shape[-1]
    dt = w.dtype.type(dt)
    zs = xp.ascontiguousarray(zs, dtype=w.dtype).reshape(w.shape[0], -1, d)
    zb = xp.array(zbar, dtype=w.dtype).reshape(-1, d)  # a copy: the kernel updates it in place
    if b != "numba":
        return _trace_back_adjoint_np(w, zs, zb, dt, b, xp)
    wbar = np.zeros_like(w)
    k = _numba_kernels()
    (k.trace_adj2 if d == 2 else k.trace_adj3)(np.ascontiguousarray(w), zs, zb, dt, wbar)
    return wbar
