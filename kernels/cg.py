"""Preconditioned conjugate gradients on ``(S G S + c I) Z = R`` with G a sparse symmetric matrix in CSR arrays and
S = diag(s): one independent recurrence per column of Z (the columns share each pass over G), Jacobi preconditioner
``dinv``, a column stopping at its own relative residual. numpy reference (scipy.sparse), numba kernel and a device
variant (:func:`pcg_csr_device`: array-module code on a ``cupyx.scipy.sparse`` matrix, the numba kernel's recurrences).

Used by register_points' fine-scale v-update (classreg.solvers.points.sparse).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _backend

__all__ = ["pcg_csr", "pcg_csr_device"]


def pcg_csr(indptr, indices, data, s, c, dinv, rhs, Z, *, tol, max_iter, backend=None) -> int:
    """Solve ``(S G S + c I) Z = rhs`` in place in ``Z`` (the start, (m, k) float64, C-contiguous) and return the
    number of steps of the slowest column.

    Parameters
    ----------
    indptr, indices, data : ndarray
        G (m × m, symmetric) in CSR form.
    s, dinv : ndarray
        The diagonal of S and of the inverse preconditioner, (m,).
    c : float
        The shift c.
    rhs, Z : ndarray
        Right-hand sides and start (updated), (m, k).
    tol : float
        Relative residual ‖r‖ / ‖rhs‖ at which a column stops.
    max_iter : int
        Most steps.
    backend : {None, "numpy", "numba"}
    """
    be = _backend.resolve_backend(backend)
    if be == "numba":
        return int(_numba()(indptr, np.asarray(indices, dtype=np.int64), data, s, float(c), dinv,
                            np.ascontiguousarray(rhs), Z, float(tol), int(max_iter)))
    if be != "numpy":
        raise ValueError(f"pcg_csr runs on the CPU (numpy or numba), got backend={be!r}")
    return _pcg_numpy(indptr, indices, data, s, float(c), dinv, rhs, Z, float(tol), int(max_iter))


def pcg_csr_device(G, s, c, dinv, rhs, Z, *, tol, max_iter, check_every):
    """:func:`pcg_csr` on device arrays (CuPy): ``G`` a ``cupyx.scipy.sparse.csr_matrix``, the rest CuPy arrays;
    solves in place in ``Z`` and returns the number of steps of the slowest column as a 0-d device array (read it
    when convenient: no synchronisation here).

    The recurrences of the numba kernel, a column stopping at its own tolerance (or at ``rz <= 0``, ``pᵀAp <= 0``):
    a stopped column's update is masked to zero, so the host only has to learn when *all* columns have stopped.
    It asks every ``check_every`` steps (one scalar read each, at steps 0, check_every, 2 check_every, ...: at most
    ``ceil(max_iter / check_every)`` reads per call); the steps in between cost a sparse product each and change
    nothing once every column has stopped, so the result and the step count are those of checking at every step.

    Parameters
    ----------
    G : cupyx.scipy.sparse.csr_matrix
        The symmetric m × m matrix.
    s, dinv : cupy.ndarray
        The diagonal of S and of the inverse preconditioner, (m,).
    c : float
        The shift c.
    rhs, Z : cupy.ndarray
        Right-hand sides and start (updated), (m, k) float64.
    tol : float
        Relative residual ‖r‖ / ‖rhs‖ at which a column stops.
    max_iter : int
        Most steps.
    check_every : int
        Steps between the synchronising checks for "all columns stopped".
    """
    xp = _backend.get_array_module(Z)
    s2 = s[:, None]

    def op(X):
        return s2 * (G @ (s2 * X)) + c * X

    r = rhs - op(Z)
    z = dinv[:, None] * r
    p = z.copy()
    rz = (r * z).sum(0)
    rr = (r * r).sum(0)
    bn = xp.sqrt((rhs * rhs).sum(0))
    live = xp.ones(rhs.shape[1], dtype=bool)
    steps = xp.zeros((), dtype=xp.int64)
    for k in range(int(max_iter)):
        live &= ~((xp.sqrt(rr) <= tol * bn) | (rz <= 0.0))  # as the numba kernel (NaN keeps a column live)
        if k % check_every == 0 and not bool(live.any()):
            break
        steps += live.any()
        Ap = op(p)
        pap = (p * Ap).sum(0)
        live &= ~(pap <= 0.0)
        a = xp.where(live, rz / xp.where(live, pap, 1.0), 0.0)
        Z += a * p
        r -= a * Ap
        z = dinv[:, None] * r
        rz2 = (r * z).sum(0)
        beta = xp.where(live, rz2 / xp.where(live, rz, 1.0), 0.0)
        p = xp.where(live, z + beta * p, p)
        rz = xp.where(live, rz2, rz)
        rr = xp.where(live, (r * r).sum(0), rr)
    return steps


def _pcg_numpy(indptr, indices, data, s, c, dinv, rhs, Z, tol, max_iter):
    """numpy reference of the numba kernel (the same recurrences, columns stopping together at the last one)."""
    import scipy.sparse as sp

    m = len(s)
    G = sp.csr_matrix((data, indices, indptr), shape=(m, m))

    def op(X):
        return s[:, None] * (G @ (s[:, None] * X)) + c * X

    r = rhs - op(Z)
    z = dinv[:, None] * r
    p = z.copy()
    rz = (r * z).sum(0)
    bn = np.sqrt((rhs * rhs).sum(0))
    steps = 0
    for k in range(max_iter):
        if np.all(np.sqrt((r * r).sum(0)) <= tol * bn):
            break
        steps = k + 1
        Ap = op(p)
        pAp = (p * Ap).sum(0)
        a = np.where(pAp > 0, rz / np.where(pAp > 0, pAp, 1.0), 0.0)
        Z += a * p
        r -= a * Ap
        z = dinv[:, None] * r
        rz2 = (r * z).sum(0)
        p = z + np.where(rz > 0, rz2 / np.where(rz > 0, rz, 1.0), 0.0) * p
        rz = rz2
    return steps


def _pcg_body(indptr, indices, data, s, cv, dinv, rhs, Z, tol, maxit):
    """Numba PCG on ``(S G S + c_v I) Z = rhs`` (S = diag s, G in CSR), one recurrence per column of Z (the columns
    share each pass over G); a column stops at its own tolerance. Returns the number of steps of the slowest
    column."""
    m, nc = rhs.shape
    t = np.empty((m, nc))
    r = np.empty((m, nc))
    z = np.empty((m, nc))
    p = np.empty((m, nc))
    ap = np.empty((m, nc))
    bn = np.zeros(nc)
    rz = np.zeros(nc)
    rr = np.zeros(nc)
    pap = np.zeros(nc)
    live = np.ones(nc, dtype=np.bool_)
    for i in range(m):
        for c in range(nc):
            t[i, c] = s[i] * Z[i, c]
    for i in range(m):  # r = b - A Z
        for c in range(nc):
            acc = 0.0
            for k in range(indptr[i], indptr[i + 1]):
                acc += data[k] * t[indices[k], c]
            r[i, c] = rhs[i, c] - (s[i] * acc + cv * Z[i, c])
            z[i, c] = r[i, c] * dinv[i]
            p[i, c] = z[i, c]
            bn[c] += rhs[i, c] * rhs[i, c]
            rz[c] += r[i, c] * z[i, c]
            rr[c] += r[i, c] * r[i, c]
    steps = 0
    for it in range(maxit):
        n_live = 0
        for c in range(nc):
            if live[c] and (math.sqrt(rr[c]) <= tol * math.sqrt(bn[c]) or rz[c] <= 0.0):
                live[c] = False
            if live[c]:
                n_live += 1
        if n_live == 0:
            break
        steps = it + 1
        for i in range(m):
            for c in range(nc):
                t[i, c] = s[i] * p[i, c]
        for c in range(nc):
            pap[c] = 0.0
        for i in range(m):
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            for k in range(indptr[i], indptr[i + 1]):
                j = indices[k]
                g = data[k]
                a0 += g * t[j, 0]
                if nc > 1:
                    a1 += g * t[j, 1]
                if nc > 2:
                    a2 += g * t[j, 2]
            ap[i, 0] = s[i] * a0 + cv * p[i, 0]
            if nc > 1:
                ap[i, 1] = s[i] * a1 + cv * p[i, 1]
            if nc > 2:
                ap[i, 2] = s[i] * a2 + cv * p[i, 2]
            for c in range(nc):
                pap[c] += p[i, c] * ap[i, c]
        for c in range(nc):
            if not live[c]:
                continue
            if pap[c] <= 0.0:
                live[c] = False
                continue
            a = rz[c] / pap[c]
            rz2 = 0.0
            rr2 = 0.0
            for i in range(m):
                Z[i, c] += a * p[i, c]
                r[i, c] -= a * ap[i, c]
                z[i, c] = r[i, c] * dinv[i]
                rz2 += r[i, c] * z[i, c]
                rr2 += r[i, c] * r[i, c]
            beta = rz2 / rz[c]
            rz[c] = rz2
            rr[c] = rr2
            for i in range(m):
                p[i, c] = z[i, c] + beta * p[i, c]
    return steps


@functools.cache
def _numba():
    return _backend.njit(fastmath=False)(_pcg_body)
