"""Cubic B-spline free-form deformation (FFD) kernels: evaluation, Jacobian, adjoint, dense fields, bending energy,
control-grid refinement, and the per-sample work of a parametric registration (:func:`samples`,
:func:`scatter_samples`, and :func:`mi_step`: one Mattes-MI iteration fused into a single pass).

Grid convention (plain arrays; nothing here knows about images or physical space):

* ``coeffs`` has shape ``(*gshape, C)``: a 2-D or 3-D control grid in numpy axis order, channels last, any ``C >= 1``.
* Points ``q`` have shape ``(N, ndim)`` in *continuous grid-index coordinates* (array axis order): control point
  ``k`` sits at ``q = k``.
* The FFD value is ``u(q) = Σ_k coeffs[k] · Π_d β3(q_d − k_d)`` with ``β3`` the centred cubic B-spline. For each
  point only ``k_d ∈ floor(q_d) − 1 … floor(q_d) + 2`` contribute; control points outside ``[0, gshape_d − 1]``
  contribute 0 (no clamping, no mirroring). ``u`` is therefore a C² piecewise cubic on all of R^n that vanishes for
  ``q_d <= −2`` or ``q_d >= gshape_d + 1``. Non-finite coordinates give ``u = 0``.
* The region where every contributing control point exists is ``Ω = Π_d [1, gshape_d − 2]`` (ITK's "valid region"
  of a ``BSplineTransform``); there the FFD reproduces cubic polynomials.

Every public function has a numpy reference (the test oracle) and, except :func:`weights`, :func:`bending_energy`
(small, O(grid) work) and :func:`det_gradient` (the few points near a fold), a numba CPU path (``parallel=True``,
on-disk cache, float64 accumulation whatever the input precision; :func:`taps` and :func:`det_shortfall`, for the few
points near a fold, and the per-iteration sample kernels are serial loops). The numba bodies are plain module-level
functions compiled lazily with their globals rebound to the compiled helpers (:func:`classreg.kernels._backend.rebind`),
so the cache key is stable across processes. All paths give the same result for any numba thread count: evaluation is
independent per point, and :func:`adjoint` groups the points by grid cell (a stable counting sort) and visits the
cells in 4^ndim colour classes whose control-point supports are disjoint, so every coefficient is accumulated by one
thread, in a fixed order.

Outputs are float32 for float32 coefficients (values) and float64 otherwise; points are always used in float64.

References
----------
.. [1] D. Rueckert, L. I. Sonoda, C. Hayes, D. L. G. Hill, M. O. Leach, D. J. Hawkes, "Nonrigid registration using
   free-form deformations: application to breast MR images", IEEE TMI 18(8):712-721, 1999 (FFD eq. 3-4, bending
   energy eq. 6).
.. [2] M. Unser, "Splines: a perfect fit for signal and image processing", IEEE Signal Processing Magazine
   16(6):22-38, 1999 (B-spline interpolation, two-scale relation).
"""
from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction

import numpy as np

from . import _backend
from .sampling import (
    _linear_at_numpy,
    _linear_gradient_numpy,
    _mi_add,
    _mi_fused_numba,
    _mi_grad,
    _mi_setup,
    _mi_table,
    mi_namespace,
)

__all__ = ["weights", "evaluate", "evaluate_with_jacobian", "adjoint", "dense", "dense_jacobian", "dense_det", "det_of",
           "taps", "det_gradient", "det_shortfall", "bending_energy", "refine", "samples",
           "scatter_samples", "sample_kernels", "mi_step", "mi_step_kernel", "mi_step_workspace"]

#: Voxels per block of the numpy reference of :func:`dense` for a non-diagonal matrix (bounds its memory).
_DENSE_BLOCK = 1 << 18

# Rebound by the numba builder to numba.prange; as plain Python the bodies below also run uncompiled.
prange = range


# ----------------------------------------------------------------------------------------------------------------------
# Scalar helpers (compiled for numba; plain arithmetic, so they also work elementwise on numpy arrays)
# ----------------------------------------------------------------------------------------------------------------------
def _w4(t):
    """Cubic B-spline weights of the taps ``floor(q) − 1 … floor(q) + 2`` for ``t = q − floor(q)``."""
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    sixth = 1.0 / 6.0  # a product, not four divisions: the sample kernels call this per point
    return (s * s * s * sixth, (3.0 * t3 - 6.0 * t2 + 4.0) * sixth, (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) * sixth,
            t3 * sixth)


def _dw4(t):
    """Derivatives of :func:`_w4` with respect to ``t`` (equivalently ``q``)."""
    s = 1.0 - t
    t2 = t * t
    return -0.5 * s * s, 1.5 * t2 - 2.0 * t, -1.5 * t2 + t + 0.5, 0.5 * t2


def _clampc(c, n):
    """A coordinate clamped to ``[−3, n + 2]`` (beyond, every tap is outside the grid); NaN -> −3 (u = 0)."""
    c = c if c == c else -3.0
    c = c if c > -3.0 else -3.0
    return c if c < n + 2.0 else n + 2.0


def _clamp_np(q, gshape):
    """Vectorised :func:`_clampc` over the columns of ``q`` (N, ndim)."""
    q = np.where(np.isnan(q), -3.0, q)
    hi = np.asarray(gshape, dtype=np.float64) + 2.0
    return np.minimum(np.maximum(q, -3.0), hi)


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------------
def _resolve(backend, *arrays) -> str:
    be = _backend.resolve_backend(backend, *arrays)
    if be == "cuda":
        raise ValueError("the B-spline kernels have 'numpy' and 'numba' paths only; pass host (numpy) arrays "
                         "(cupy.asnumpy) and backend=None, 'numpy' or 'numba'")
    return be


def _out_dtype(a):
    return np.float32 if np.asarray(a).dtype == np.float32 else np.float64


def _check_coeffs(coeffs, name="coeffs"):
    c = np.asarray(coeffs)
    if c.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape (*gshape, C) with a 2-D or 3-D grid, got shape {c.shape}")
    if c.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {c.dtype}")
    if 0 in c.shape:
        raise ValueError(f"{name} must not be empty, got shape {c.shape}")
    return c


def _check_points(q, ndim, name="q"):
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != ndim:
        raise ValueError(f"{name} must have shape (N, {ndim}) (grid-index coordinates, array axis order), "
                         f"got {q.shape}")
    return np.ascontiguousarray(q)


def _check_gshape(gshape, name="gshape"):
    try:
        g = tuple(int(v) for v in gshape)
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of 2 or 3 positive ints, got {gshape!r}") from exc
    if len(g) not in (2, 3) or any(v < 1 for v in g):
        raise ValueError(f"{name} must hold 2 or 3 positive ints (array axis order), got {gshape!r}")
    return g


def _check_affine(matrix, offset, ndim):
    m = np.asarray(matrix, dtype=np.float64)
    o = np.asarray(offset, dtype=np.float64)
    if m.shape != (ndim, ndim):
        raise ValueError(f"matrix must have shape ({ndim}, {ndim}), got {m.shape}")
    if o.shape != (ndim,):
        raise ValueError(f"offset must have shape ({ndim},), got {o.shape}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(o))):
        raise ValueError("matrix and offset must be finite")
    return np.ascontiguousarray(m), np.ascontiguousarray(o)


def _is_diagonal(m) -> bool:
    return not np.any(m - np.diag(np.diagonal(m)))


# ----------------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------------
def weights(q):
    """Per-axis cubic B-spline weights of the four contributing control points.

    Parameters
    ----------
    q : array_like, shape (N, ndim)
        Finite points in continuous grid-index coordinates (array axis order).

    Returns
    -------
    start : ndarray (N, ndim) intp
        ``floor(q) − 1``: the first of the four taps ``start … start + 3`` along each axis.
    w : ndarray (N, ndim, 4) float64
        ``w[n, d, a] = β3(q_d − start_d − a)``; the four weights sum to 1.
    dw : ndarray (N, ndim, 4) float64
        ``∂w[n, d, a] / ∂q_d``.
    """
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2:
        raise ValueError(f"q must have shape (N, ndim), got {q.shape}")
    f = np.floor(q)
    t = q - f
    start = f.astype(np.intp) - 1
    return start, np.stack(_w4(t), axis=-1), np.stack(_dw4(t), axis=-1)


# ----------------------------------------------------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------------------------------------------------
def _taps_numpy(q, gshape, jac):
    """Yield ``(lin, valid, wprod, dprods)`` per tap offset (lexicographic), for the references."""
    nd = len(gshape)
    start, w, dw = weights(_clamp_np(q, gshape))
    g = np.asarray(gshape)
    for offs in itertools.product(range(4), repeat=nd):
        idx = start + np.asarray(offs)
        valid = np.all((idx >= 0) & (idx < g), axis=1)
        lin = np.ravel_multi_index(tuple(np.clip(idx, 0, g - 1).T), gshape)
        wp = w[:, 0, offs[0]]
        for d in range(1, nd):
            wp = wp * w[:, d, offs[d]]
        dps = None
        if jac:
            dps = []
            for d in range(nd):
                p = dw[:, 0, offs[0]] if d == 0 else w[:, 0, offs[0]]
                for e in range(1, nd):
                    p = p * (dw[:, e, offs[e]] if e == d else w[:, e, offs[e]])
                dps.append(p)
        yield lin, valid, wp, dps


def _evaluate_numpy(coeffs, q, jac):
    gshape = coeffs.shape[:-1]
    nc = coeffs.shape[-1]
    flat = coeffs.reshape(-1, nc).astype(np.float64)
    n = q.shape[0]
    out = np.zeros((n, nc))
    du = np.zeros((n, nc, len(gshape))) if jac else None
    for lin, valid, wp, dps in _taps_numpy(q, gshape, jac):
        cv = np.where(valid[:, None], flat[lin], 0.0)
        out += wp[:, None] * cv
        if jac:
            for d, p in enumerate(dps):
                du[:, :, d] += p[:, None] * cv
    return out, du


def _adjoint_numpy(q, values, gshape):
    nc = values.shape[1]
    out = np.zeros((int(np.prod(gshape)), nc))
    for lin, valid, wp, _ in _taps_numpy(q, gshape, False):
        np.add.at(out, lin[valid], wp[valid, None] * values[valid])
    return out.reshape(*gshape, nc)


@functools.lru_cache(maxsize=64)
def _axis_table(n_out, scale, shift, g, derivative=False):
    """Separable weight table of one axis for ``q = scale · i + shift``: clipped tap indices (n_out, 4) int64 and
    weights (n_out, 4) with 0 for taps outside ``[0, g − 1]`` (with ``derivative``: the weights' derivatives with
    respect to ``q``). Cached (read-only): a registration evaluates the same grids again and again."""
    c = _clamp_np((scale * np.arange(n_out, dtype=np.float64) + shift)[:, None], (g,))[:, 0]
    f = np.floor(c)
    w = np.stack((_dw4 if derivative else _w4)(c - f), axis=-1)
    idx = f.astype(np.int64)[:, None] - 1 + np.arange(4)
    valid = (idx >= 0) & (idx < g)
    idx, w = np.ascontiguousarray(np.clip(idx, 0, g - 1)), np.ascontiguousarray(np.where(valid, w, 0.0))
    idx.setflags(write=False)
    w.setflags(write=False)
    return idx, w


def _contract_numpy(inp, idx, w):
    """``out[p, i, r] = Σ_a w[i, a] · inp[p, idx[i, a], r]`` (same arithmetic order as the numba body)."""
    out = w[None, :, 0, None] * inp[:, idx[:, 0], :]
    for a in range(1, 4):
        out = out + w[None, :, a, None] * inp[:, idx[:, a], :]
    return out


def _grid_coords(i_cols, m, o):
    """``q_d = ((m_d0 i_0 + m_d1 i_1) [+ m_d2 i_2]) + o_d`` in the numba bodies' order; i_cols: list of (N,) arrays."""
    nd = len(i_cols)
    q = np.empty((i_cols[0].shape[0], nd))
    for d in range(nd):
        s = m[d, 0] * i_cols[0]
        for e in range(1, nd):
            s = s + m[d, e] * i_cols[e]
        q[:, d] = s + o[d]
    return q


# ----------------------------------------------------------------------------------------------------------------------
# numba bodies
# ----------------------------------------------------------------------------------------------------------------------
def _acc2(coeffs, x0, x1, row):
    """``row += u(x)`` (row: (C,) float64) for a 2-D grid."""
    n0 = coeffs.shape[0]
    n1 = coeffs.shape[1]
    nc = coeffs.shape[2]
    c0 = _clampc(x0, n0)
    c1 = _clampc(x1, n1)
    f0 = math.floor(c0)
    f1 = math.floor(c1)
    s0 = int(f0) - 1
    s1 = int(f1) - 1
    w0 = _w4(c0 - f0)
    w1 = _w4(c1 - f1)
    for a in range(4):
        j0 = s0 + a
        if j0 < 0 or j0 >= n0:
            continue
        for b in range(4):
            j1 = s1 + b
            if j1 < 0 or j1 >= n1:
                continue
            wab = w0[a] * w1[b]
            for ch in range(nc):
                row[ch] += wab * coeffs[j0, j1, ch]


def _acc3(coeffs, x0, x1, x2, row):
    """``row += u(x)`` (row: (C,) float64) for a 3-D grid."""
    n0 = coeffs.shape[0]
    n1 = coeffs.shape[1]
    n2 = coeffs.shape[2]
    nc = coeffs.shape[3]
    c0 = _clampc(x0, n0)
    c1 = _clampc(x1, n1)
    c2 = _clampc(x2, n2)
    f0 = math.floor(c0)
    f1 = math.floor(c1)
    f2 = math.floor(c2)
    s0 = int(f0) - 1
    s1 = int(f1) - 1
    s2 = int(f2) - 1
    w0 = _w4(c0 - f0)
    w1 = _w4(c1 - f1)
    w2 = _w4(c2 - f2)
    for a in range(4):
        j0 = s0 + a
        if j0 < 0 or j0 >= n0:
            continue
        for b in range(4):
            j1 = s1 + b
            if j1 < 0 or j1 >= n1:
                continue
            wab = w0[a] * w1[b]
            for c in range(4):
                j2 = s2 + c
                if j2 < 0 or j2 >= n2:
                    continue
                wabc = wab * w2[c]
                for ch in range(nc):
                    row[ch] += wabc * coeffs[j0, j1, j2, ch]


def _eval2_body(coeffs, q, out):
    for p in prange(q.shape[0]):
        _acc2(coeffs, q[p, 0], q[p, 1], out[p])


def _eval3_body(coeffs, q, out):
    for p in prange(q.shape[0]):
        _acc3(coeffs, q[p, 0], q[p, 1], q[p, 2], out[p])


def _jacacc2(coeffs, x0, x1, row, drow):
    """``row += u(x)``, ``drow[c, d] += ∂u_c/∂q_d`` for a 2-D grid."""
    n0 = coeffs.shape[0]
    n1 = coeffs.shape[1]
    nc = coeffs.shape[2]
    c0 = _clampc(x0, n0)
    c1 = _clampc(x1, n1)
    f0 = math.floor(c0)
    f1 = math.floor(c1)
    s0 = int(f0) - 1
    s1 = int(f1) - 1
    w0 = _w4(c0 - f0)
    w1 = _w4(c1 - f1)
    d0 = _dw4(c0 - f0)
    d1 = _dw4(c1 - f1)
    for a in range(4):
        j0 = s0 + a
        if j0 < 0 or j0 >= n0:
            continue
        for b in range(4):
            j1 = s1 + b
            if j1 < 0 or j1 >= n1:
                continue
            wab = w0[a] * w1[b]
            g0 = d0[a] * w1[b]
            g1 = w0[a] * d1[b]
            for ch in range(nc):
                cv = coeffs[j0, j1, ch]
                row[ch] += wab * cv
                drow[ch, 0] += g0 * cv
                drow[ch, 1] += g1 * cv


def _jacacc3(coeffs, x0, x1, x2, row, drow):
    """``row += u(x)``, ``drow[c, d] += ∂u_c/∂q_d`` for a 3-D grid."""
    n0 = coeffs.shape[0]
    n1 = coeffs.shape[1]
    n2 = coeffs.shape[2]
    nc = coeffs.shape[3]
    c0 = _clampc(x0, n0)
    c1 = _clampc(x1, n1)
    c2 = _clampc(x2, n2)
    f0 = math.floor(c0)
    f1 = math.floor(c1)
    f2 = math.floor(c2)
    s0 = int(f0) - 1
    s1 = int(f1) - 1
    s2 = int(f2) - 1
    w0 = _w4(c0 - f0)
    w1 = _w4(c1 - f1)
    w2 = _w4(c2 - f2)
    d0 = _dw4(c0 - f0)
    d1 = _dw4(c1 - f1)
    d2 = _dw4(c2 - f2)
    for a in range(4):
        j0 = s0 + a
        if j0 < 0 or j0 >= n0:
            continue
        for b in range(4):
            j1 = s1 + b
            if j1 < 0 or j1 >= n1:
                continue
            wab = w0[a] * w1[b]
            gab0 = d0[a] * w1[b]
            gab1 = w0[a] * d1[b]
            for c in range(4):
                j2 = s2 + c
                if j2 < 0 or j2 >= n2:
                    continue
                wabc = wab * w2[c]
                g0 = gab0 * w2[c]
                g1 = gab1 * w2[c]
                g2 = wab * d2[c]
                for ch in range(nc):
                    cv = coeffs[j0, j1, j2, ch]
                    row[ch] += wabc * cv
                    drow[ch, 0] += g0 * cv
                    drow[ch, 1] += g1 * cv
                    drow[ch, 2] += g2 * cv


def _jac2_body(coeffs, q, out, du):
    for p in prange(q.shape[0]):
        _jacacc2(coeffs, q[p, 0], q[p, 1], out[p], du[p])


def _jac3_body(coeffs, q, out, du):
    for p in prange(q.shape[0]):
        _jacacc3(coeffs, q[p, 0], q[p, 1], q[p, 2], out[p], du[p])


def _dense_gen2_body(coeffs, m, o, n1, out):
    """Non-separable dense evaluation, 2-D: out (n0 * n1, C) zero-initialised, q = m @ (i0, i1) + o."""
    npts = out.shape[0]
    for p in prange(npts):
        i0 = p // n1
        i1 = p - i0 * n1
        x0 = (m[0, 0] * i0 + m[0, 1] * i1) + o[0]
        x1 = (m[1, 0] * i0 + m[1, 1] * i1) + o[1]
        _acc2(coeffs, x0, x1, out[p])


def _dense_gen3_body(coeffs, m, o, n1, n2, out):
    """Non-separable dense evaluation, 3-D: out (n0 * n1 * n2, C) zero-initialised, q = m @ (i0, i1, i2) + o."""
    npts = out.shape[0]
    for p in prange(npts):
        i0 = p // (n1 * n2)
        r = p - i0 * (n1 * n2)
        i1 = r // n2
        i2 = r - i1 * n2
        x0 = ((m[0, 0] * i0 + m[0, 1] * i1) + m[0, 2] * i2) + o[0]
        x1 = ((m[1, 0] * i0 + m[1, 1] * i1) + m[1, 2] * i2) + o[1]
        x2 = ((m[2, 0] * i0 + m[2, 1] * i1) + m[2, 2] * i2) + o[2]
        _acc3(coeffs, x0, x1, x2, out[p])


def _contract_body(inp, idx, w, out):
    """``out[p, i, r] = Σ_a w[i, a] · inp[p, idx[i, a], r]`` for inp (P, G, R), out (P, n, R)."""
    npre = inp.shape[0]
    n = idx.shape[0]
    nr = inp.shape[2]
    for t in prange(npre * n):
        p = t // n
        i = t - p * n
        k0 = idx[i, 0]
        k1 = idx[i, 1]
        k2 = idx[i, 2]
        k3 = idx[i, 3]
        v0 = w[i, 0]
        v1 = w[i, 1]
        v2 = w[i, 2]
        v3 = w[i, 3]
        for r in range(nr):
            out[p, i, r] = v0 * inp[p, k0, r] + v1 * inp[p, k1, r] + v2 * inp[p, k2, r] + v3 * inp[p, k3, r]


def _det_body(p0, p1, p2, frame, out):
    """``out[p] = det(I + du_p @ frame)`` with ``du_p[c, d] = p_d[p, c]``, for the derivatives along each grid axis
    p_d (N, n), n = 2 (``p2`` unused) or 3: the separable path's per-axis outputs as they come, or the axis-d
    views ``du[:, :, d]`` of an (N, n, n) array."""
    n = p0.shape[1]
    for p in prange(p0.shape[0]):
        if n == 2:
            a00 = 1.0 + p0[p, 0] * frame[0, 0] + p1[p, 0] * frame[1, 0]
            a01 = p0[p, 0] * frame[0, 1] + p1[p, 0] * frame[1, 1]
            a10 = p0[p, 1] * frame[0, 0] + p1[p, 1] * frame[1, 0]
            a11 = 1.0 + p0[p, 1] * frame[0, 1] + p1[p, 1] * frame[1, 1]
            out[p] = a00 * a11 - a01 * a10
        else:
            u00, u01, u02 = p0[p, 0], p1[p, 0], p2[p, 0]
            u10, u11, u12 = p0[p, 1], p1[p, 1], p2[p, 1]
            u20, u21, u22 = p0[p, 2], p1[p, 2], p2[p, 2]
            a00 = 1.0 + u00 * frame[0, 0] + u01 * frame[1, 0] + u02 * frame[2, 0]
            a01 = u00 * frame[0, 1] + u01 * frame[1, 1] + u02 * frame[2, 1]
            a02 = u00 * frame[0, 2] + u01 * frame[1, 2] + u02 * frame[2, 2]
            a10 = u10 * frame[0, 0] + u11 * frame[1, 0] + u12 * frame[2, 0]
            a11 = 1.0 + u10 * frame[0, 1] + u11 * frame[1, 1] + u12 * frame[2, 1]
            a12 = u10 * frame[0, 2] + u11 * frame[1, 2] + u12 * frame[2, 2]
            a20 = u20 * frame[0, 0] + u21 * frame[1, 0] + u22 * frame[2, 0]
            a21 = u20 * frame[0, 1] + u21 * frame[1, 1] + u22 * frame[2, 1]
            a22 = 1.0 + u20 * frame[0, 2] + u21 * frame[1, 2] + u22 * frame[2, 2]
            out[p] = (a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20)
                      + a02 * (a10 * a21 - a11 * a20))


def _cell_ids(q, gshape, cell):
    """Cell id per point: ``floor(q_d) + 2`` raveled over cells ``(gshape_d + 3)``; points that reach no control
    point (a ``floor(q_d)`` outside ``[−2, gshape_d]``) get the id ``Π (gshape_d + 3)``."""
    nd = q.shape[1]
    ncell = 1
    for d in range(nd):
        ncell *= gshape[d] + 3
    for p in prange(q.shape[0]):
        lin = 0
        ok = True
        for d in range(nd):
            f = math.floor(_clampc(q[p, d], gshape[d]))
            ok = ok and f >= -2 and f <= gshape[d]
            lin = lin * (gshape[d] + 3) + (f + 2)
        cell[p] = lin if ok else ncell


def _cellsort(cell, ncell, order, starts):
    """Stable counting sort of points by cell id (``cell == ncell``: contributes nothing). Fills ``order`` (N,) and
    ``starts`` (ncell + 1,): the points of cell ``b`` are ``order[starts[b]:starts[b + 1]]``."""
    counts = np.zeros(ncell + 2, dtype=np.int64)
    for p in range(cell.shape[0]):
        counts[cell[p] + 1] += 1
    for b in range(ncell + 1):
        counts[b + 1] += counts[b]
    for b in range(ncell + 1):
        starts[b] = counts[b]
    for p in range(cell.shape[0]):
        b = cell[p]
        order[counts[b]] = p
        counts[b] += 1


def _scatter_cell2(q, values, order, lo, hi, s0, s1, out):
    """Scatter the points ``order[lo:hi]`` of one cell (taps start at ``s0, s1``) into a 2-D ``out``."""
    g0 = out.shape[0]
    g1 = out.shape[1]
    nc = out.shape[2]
    for pp in range(lo, hi):
        p = order[pp]
        c0 = _clampc(q[p, 0], g0)
        c1 = _clampc(q[p, 1], g1)
        w0 = _w4(c0 - math.floor(c0))
        w1 = _w4(c1 - math.floor(c1))
        for a in range(4):
            j0 = s0 + a
            if j0 < 0 or j0 >= g0:
                continue
            for b in range(4):
                j1 = s1 + b
                if j1 < 0 or j1 >= g1:
                    continue
                wab = w0[a] * w1[b]
                for ch in range(nc):
                    out[j0, j1, ch] += wab * values[p, ch]


def _scatter_cell3(q, values, order, lo, hi, s0, s1, s2, out):
    """Scatter the points ``order[lo:hi]`` of one cell (taps start at ``s0, s1, s2``) into a 3-D ``out``."""
    g0 = out.shape[0]
    g1 = out.shape[1]
    g2 = out.shape[2]
    nc = out.shape[3]
    for pp in range(lo, hi):
        p = order[pp]
        c0 = _clampc(q[p, 0], g0)
        c1 = _clampc(q[p, 1], g1)
        c2 = _clampc(q[p, 2], g2)
        w0 = _w4(c0 - math.floor(c0))
        w1 = _w4(c1 - math.floor(c1))
        w2 = _w4(c2 - math.floor(c2))
        for a in range(4):
            j0 = s0 + a
            if j0 < 0 or j0 >= g0:
                continue
            for b in range(4):
                j1 = s1 + b
                if j1 < 0 or j1 >= g1:
                    continue
                wab = w0[a] * w1[b]
                for c in range(4):
                    j2 = s2 + c
                    if j2 < 0 or j2 >= g2:
                        continue
                    wabc = wab * w2[c]
                    for ch in range(nc):
                        out[j0, j1, j2, ch] += wabc * values[p, ch]


def _adj2_body(q, values, order, starts, out):
    """Adjoint on a 2-D grid: cells of one colour class (cell index mod 4 per axis) in parallel, colours in order."""
    m0 = out.shape[0] + 3
    m1 = out.shape[1] + 3
    for r0 in range(4):
        for r1 in range(4):
            k0 = (m0 - r0 + 3) // 4
            k1 = (m1 - r1 + 3) // 4
            for t in prange(k0 * k1):
                u0 = t // k1
                ci0 = r0 + 4 * u0
                ci1 = r1 + 4 * (t - u0 * k1)
                b = ci0 * m1 + ci1
                _scatter_cell2(q, values, order, starts[b], starts[b + 1], ci0 - 3, ci1 - 3, out)


def _adj3_body(q, values, order, starts, out):
    """Adjoint on a 3-D grid: cells of one colour class (cell index mod 4 per axis) in parallel, colours in order."""
    m0 = out.shape[0] + 3
    m1 = out.shape[1] + 3
    m2 = out.shape[2] + 3
    for r0 in range(4):
        for r1 in range(4):
            for r2 in range(4):
                k0 = (m0 - r0 + 3) // 4
                k1 = (m1 - r1 + 3) // 4
                k2 = (m2 - r2 + 3) // 4
                for t in prange(k0 * k1 * k2):
                    u0 = t // (k1 * k2)
                    rem = t - u0 * (k1 * k2)
                    u1 = rem // k2
                    ci0 = r0 + 4 * u0
                    ci1 = r1 + 4 * u1
                    ci2 = r2 + 4 * (rem - u1 * k2)
                    b = (ci0 * m1 + ci1) * m2 + ci2
                    _scatter_cell3(q, values, order, starts[b], starts[b + 1], ci0 - 3, ci1 - 3, ci2 - 3, out)


def _pts2_body(coeffs, q, values, out, adjoint):
    """Serial evaluation (``values[p] += u(q_p)``) or scatter (``out += values[p] ⊗ weights``) on a 2-D grid: the path
    for a few thousand points (a parametric registration's samples), where a parallel launch costs more than the
    work. Point order is the summation order, so the result does not depend on the thread count either."""
    grid = out if adjoint else coeffs
    n0 = grid.shape[0]
    n1 = grid.shape[1]
    nc = values.shape[1]
    for p in range(q.shape[0]):
        c0 = _clampc(q[p, 0], n0)
        c1 = _clampc(q[p, 1], n1)
        f0 = math.floor(c0)
        f1 = math.floor(c1)
        s0 = int(f0) - 1
        s1 = int(f1) - 1
        w0 = _w4(c0 - f0)
        w1 = _w4(c1 - f1)
        for a in range(4):
            j0 = s0 + a
            if j0 < 0 or j0 >= n0:
                continue
            for b in range(4):
                j1 = s1 + b
                if j1 < 0 or j1 >= n1:
                    continue
                wab = w0[a] * w1[b]
                if adjoint:
                    for ch in range(nc):
                        out[j0, j1, ch] += wab * values[p, ch]
                else:
                    for ch in range(nc):
                        values[p, ch] += wab * coeffs[j0, j1, ch]


def _pts3_body(coeffs, q, values, out, adjoint):
    """3-D :func:`_pts2_body`."""
    grid = out if adjoint else coeffs
    n0 = grid.shape[0]
    n1 = grid.shape[1]
    n2 = grid.shape[2]
    nc = values.shape[1]
    for p in range(q.shape[0]):
        c0 = _clampc(q[p, 0], n0)
        c1 = _clampc(q[p, 1], n1)
        c2 = _clampc(q[p, 2], n2)
        f0 = math.floor(c0)
        f1 = math.floor(c1)
        f2 = math.floor(c2)
        s0 = int(f0) - 1
        s1 = int(f1) - 1
        s2 = int(f2) - 1
        w0 = _w4(c0 - f0)
        w1 = _w4(c1 - f1)
        w2 = _w4(c2 - f2)
        for a in range(4):
            j0 = s0 + a
            if j0 < 0 or j0 >= n0:
                continue
            for b in range(4):
                j1 = s1 + b
                if j1 < 0 or j1 >= n1:
                    continue
                wab = w0[a] * w1[b]
                for c in range(4):
                    j2 = s2 + c
                    if j2 < 0 or j2 >= n2:
                        continue
                    wabc = wab * w2[c]
                    if adjoint:
                        for ch in range(nc):
                            out[j0, j1, j2, ch] += wabc * values[p, ch]
                    else:
                        for ch in range(nc):
                            values[p, ch] += wabc * coeffs[j0, j1, j2, ch]


def _taps_body(q, gshape, lin, valid, der):
    """Serial :func:`taps`: per point the clamped taps in lexicographic order (last axis fastest)."""
    n = q.shape[1]
    start = np.empty(n, dtype=np.int64)
    w = np.empty((n, 4))
    dw = np.empty((n, 4))
    for j in range(q.shape[0]):
        for d in range(n):
            c = _clampc(q[j, d], gshape[d])
            f = math.floor(c)
            start[d] = int(f) - 1
            w[d, 0], w[d, 1], w[d, 2], w[d, 3] = _w4(c - f)
            dw[d, 0], dw[d, 1], dw[d, 2], dw[d, 3] = _dw4(c - f)
        for t in range(lin.shape[1]):
            flat = 0
            ok = True
            for d in range(n):
                i = start[d] + ((t >> (2 * (n - 1 - d))) & 3)
                ok = ok and 0 <= i < gshape[d]
                flat = flat * gshape[d] + min(max(i, 0), gshape[d] - 1)
            lin[j, t] = flat
            valid[j, t] = ok
            for d in range(n):
                p = 1.0
                for e in range(n):
                    a = (t >> (2 * (n - 1 - e))) & 3
                    p *= dw[e, a] if e == d else w[e, a]
                der[j, t, d] = p


#: below this many point-taps (N × 4^ndim) evaluate/adjoint run the serial loops :func:`_pts2_body`/`_pts3_body`
SERIAL_TAPS = 1 << 20


@functools.cache
def _numba():
    """Compile (lazily, cached on disk) the numba kernels: small parallel loops over serial per-point helpers."""
    import numba

    njit = _backend.njit
    rb = _backend.rebind
    ns = dict(globals())
    ns["prange"] = numba.prange
    for name in ("_w4", "_dw4", "_clampc", "_acc2", "_acc3", "_jacacc2", "_jacacc3", "_cellsort", "_scatter_cell2",
                 "_scatter_cell3"):
        ns[name] = njit(rb(globals()[name], ns))
    bodies = ("_eval2_body", "_eval3_body", "_jac2_body", "_jac3_body", "_dense_gen2_body", "_dense_gen3_body",
              "_contract_body", "_cell_ids", "_adj2_body", "_adj3_body", "_det_body")
    kernels = {name: njit(parallel=True)(rb(globals()[name], ns)) for name in bodies}
    kernels["_cellsort"] = ns["_cellsort"]
    for name in ("_pts2_body", "_pts3_body", "_taps_body"):
        kernels[name] = njit(rb(globals()[name], ns))
    return kernels


def _adjoint_numba(q, values, gshape):
    """Group the points by cell (parallel cell ids, serial stable counting sort), then scatter colour by colour."""
    k = _numba()
    cell = np.empty(q.shape[0], dtype=np.int64)
    k["_cell_ids"](q, np.asarray(gshape, dtype=np.int64), cell)
    ncell = int(np.prod([g + 3 for g in gshape]))
    order = np.empty(q.shape[0], dtype=np.int64)
    starts = np.empty(ncell + 1, dtype=np.int64)
    k["_cellsort"](cell, ncell, order, starts)
    out = np.zeros((*gshape, values.shape[1]))
    k["_adj2_body" if len(gshape) == 2 else "_adj3_body"](q, values, order, starts, out)
    return out


def _f64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Public kernels
# ----------------------------------------------------------------------------------------------------------------------
def evaluate(coeffs, q, *, backend=None):
    """The FFD ``u(q) = Σ_k coeffs[k] Π_d β3(q_d − k_d)`` at points ``q``.

    Parameters
    ----------
    coeffs : ndarray (*gshape, C)
        Control-point coefficients (2-D or 3-D grid, channels last).
    q : ndarray (N, ndim)
        Points in continuous grid-index coordinates (array axis order). Non-finite points give 0.
    backend : {None, "numpy", "numba"}
        ``None`` picks numba when installed.

    Returns
    -------
    ndarray (N, C)
        float32 for float32 ``coeffs``, else float64 (accumulated in float64).
    """
    coeffs = _check_coeffs(coeffs)
    nd = coeffs.ndim - 1
    q = _check_points(q, nd)
    be = _resolve(backend, coeffs, q)
    dt = _out_dtype(coeffs)
    if be == "numba" and q.shape[0] * 4 ** nd < SERIAL_TAPS:
        out = np.zeros((q.shape[0], coeffs.shape[-1]))
        unused = np.zeros((1,) * (nd + 1))  # the scatter target, not written when evaluating
        _numba()["_pts2_body" if nd == 2 else "_pts3_body"](_f64(coeffs), q, out, unused, False)
    elif be == "numba":
        out = np.zeros((q.shape[0], coeffs.shape[-1]))
        with _backend.serial_below(q.shape[0] * 4 ** nd):
            _numba()["_eval2_body" if nd == 2 else "_eval3_body"](_f64(coeffs), q, out)
    else:
        out, _ = _evaluate_numpy(coeffs, q, False)
    return out.astype(dt, copy=False)


def evaluate_with_jacobian(coeffs, q, *, backend=None):
    """The FFD and its derivatives with respect to the grid-index coordinates.

    Parameters
    ----------
    coeffs : ndarray (*gshape, C)
    q : ndarray (N, ndim)
        Points in grid-index coordinates (array axis order).
    backend : {None, "numpy", "numba"}

    Returns
    -------
    u : ndarray (N, C)
    du : ndarray (N, C, ndim)
        ``du[:, c, d] = ∂u_c / ∂q_d`` in grid-index units (divide by the grid spacing along ``d`` for mm).
    """
    coeffs = _check_coeffs(coeffs)
    nd = coeffs.ndim - 1
    q = _check_points(q, nd)
    be = _resolve(backend, coeffs, q)
    dt = _out_dtype(coeffs)
    if be == "numba":
        out = np.zeros((q.shape[0], coeffs.shape[-1]))
        du = np.zeros((q.shape[0], coeffs.shape[-1], nd))
        with _backend.serial_below(q.shape[0] * 4 ** nd):
            _numba()["_jac2_body" if nd == 2 else "_jac3_body"](_f64(coeffs), q, out, du)
    else:
        out, du = _evaluate_numpy(coeffs, q, True)
    return out.astype(dt, copy=False), du.astype(dt, copy=False)


def adjoint(q, values, gshape, *, backend=None):
    """Adjoint of :func:`evaluate` with respect to the coefficients: the scatter of B-spline weights.

    ``adjoint(q, v, gshape)[k] = Σ_j v[j] Π_d β3(q_jd − k_d)``, the gradient of ``Σ_j <v[j], u(q_j)>`` with respect to
    ``coeffs[k]`` (so ``<adjoint(q, v), c> = Σ_j <v[j], evaluate(c, q)[j]>``).

    Parameters
    ----------
    q : ndarray (N, ndim)
        Points in grid-index coordinates (array axis order); non-finite points contribute nothing.
    values : ndarray (N, C)
    gshape : sequence of int
        Control-grid shape (array axis order).
    backend : {None, "numpy", "numba"}
        The numba path is deterministic and gives the same bits for any thread count: below :data:`SERIAL_TAPS`
        point-taps it is one serial loop in point order; above, points are grouped by grid cell (stable counting
        sort) and the cells are visited in 4^ndim colour classes (cell index mod 4 per axis) whose control-point
        supports are disjoint, so each coefficient is summed by one thread in a fixed order.

    Returns
    -------
    ndarray (*gshape, C)
        float32 for float32 ``values``, else float64 (accumulated in float64).
    """
    gshape = _check_gshape(gshape)
    nd = len(gshape)
    q = _check_points(q, nd)
    v = np.asarray(values)
    if v.ndim != 2 or v.shape[0] != q.shape[0]:
        raise ValueError(f"values must have shape (N, C) with N = {q.shape[0]} (one row per point), got {v.shape}")
    be = _resolve(backend, q, v)
    dt = _out_dtype(v)
    v64 = _f64(v)
    if be == "numba" and q.shape[0] * 4 ** nd < SERIAL_TAPS:
        out = np.zeros((*gshape, v64.shape[1]))
        _numba()["_pts2_body" if nd == 2 else "_pts3_body"](np.zeros((1,) * (nd + 1)), q, v64, out, True)
    elif be == "numba":
        with _backend.serial_below(q.shape[0] * 4 ** nd):
            out = _adjoint_numba(q, v64, gshape)
    else:
        out = _adjoint_numpy(q, v64, gshape)
    return out.astype(dt, copy=False)


def _dense_args(coeffs, out_shape, matrix, offset, backend):
    """The checked arguments of :func:`dense` and :func:`dense_jacobian`: coefficients, dimension, output shape,
    matrix, offset and backend."""
    coeffs = _check_coeffs(coeffs)
    nd = coeffs.ndim - 1
    shape = _check_gshape(out_shape, "out_shape")
    if len(shape) != nd:
        raise ValueError(f"out_shape must have {nd} entries (the control grid is {nd}-D), got {out_shape!r}")
    m, o = _check_affine(matrix, offset, nd)
    return coeffs, nd, shape, m, o, _resolve(backend, coeffs)


def dense(coeffs, out_shape, matrix, offset, *, backend=None):
    """The FFD at every voxel ``i`` of an image grid, ``q = matrix @ i + offset``.

    Parameters
    ----------
    coeffs : ndarray (*gshape, C)
    out_shape : sequence of int
        Output grid shape (array axis order), same dimension as the control grid.
    matrix : ndarray (ndim, ndim)
        Voxel index → grid-index map (array axis order). A diagonal matrix (off-diagonal entries exactly 0) takes the
        separable fast path: per-axis weight tables and one 4-tap contraction per axis.
    offset : ndarray (ndim,)
    backend : {None, "numpy", "numba"}

    Returns
    -------
    ndarray (*out_shape, C)
    """
    coeffs, nd, shape, m, o, be = _dense_args(coeffs, out_shape, matrix, offset, backend)
    dt = _out_dtype(coeffs)
    nc = coeffs.shape[-1]
    npts = int(np.prod(shape))
    if _is_diagonal(m):
        return _separable(_f64(coeffs), shape, m, o, be).astype(dt, copy=False)
    if be == "numba":
        out = np.zeros((npts, nc))
        with _backend.serial_below(npts * 4 ** nd):
            if nd == 2:
                _numba()["_dense_gen2_body"](_f64(coeffs), m, o, shape[1], out)
            else:
                _numba()["_dense_gen3_body"](_f64(coeffs), m, o, shape[1], shape[2], out)
        return out.reshape(*shape, nc).astype(dt, copy=False)
    out = np.empty((npts, nc))
    for s in range(0, npts, _DENSE_BLOCK):
        lin = np.arange(s, min(npts, s + _DENSE_BLOCK))
        i_cols = [c.astype(np.float64) for c in np.unravel_index(lin, shape)]
        out[lin] = _evaluate_numpy(coeffs, _grid_coords(i_cols, m, o), False)[0]
    return out.reshape(*shape, nc).astype(dt, copy=False)


def _separable(coeffs, shape, m, o, be, derivative=None):
    """:func:`dense` for a diagonal ``m``: one 4-tap contraction per axis, the last axis first (the derivative
    weights along axis ``derivative``, if given)."""
    cur = coeffs
    gshape = coeffs.shape[:-1]
    for d in reversed(range(len(shape))):
        idx, w = _axis_table(shape[d], m[d, d], o[d], gshape[d], derivative=d == derivative)
        pre = int(np.prod(cur.shape[:d]))
        post = int(np.prod(cur.shape[d + 1:]))
        inp = cur.reshape(pre, cur.shape[d], post)
        if be == "numba":
            res = np.empty((pre, shape[d], post))
            with _backend.serial_below(res.size * 4):
                _numba()["_contract_body"](inp, idx, w, res)
        else:
            res = _contract_numpy(inp, idx, w)
        cur = res.reshape(*cur.shape[:d], shape[d], *cur.shape[d + 1:])
    return cur


def dense_jacobian(coeffs, out_shape, matrix, offset, *, backend=None):
    """The FFD's derivatives ``∂u_c/∂q_d`` (grid-index units) at every voxel ``i`` of an image grid,
    ``q = matrix @ i + offset``.

    Parameters
    ----------
    coeffs, out_shape, matrix, offset, backend
        As in :func:`dense` (a diagonal ``matrix`` takes the separable path: ``ndim`` separable evaluations, each
        with the derivative weights along one axis).

    Returns
    -------
    ndarray (*out_shape, C, ndim), float64
    """
    coeffs, nd, shape, m, o, be = _dense_args(coeffs, out_shape, matrix, offset, backend)
    c = _f64(coeffs)
    if _is_diagonal(m):
        return np.stack([_separable(c, shape, m, o, be, derivative=d) for d in range(nd)], axis=-1)
    npts = int(np.prod(shape))
    out = np.empty((npts, c.shape[-1], nd))
    for s in range(0, npts, _DENSE_BLOCK):
        lin = np.arange(s, min(npts, s + _DENSE_BLOCK))
        q = _grid_coords([i.astype(np.float64) for i in np.unravel_index(lin, shape)], m, o)
        out[lin] = evaluate_with_jacobian(c, q, backend=be)[1]
    return out.reshape(*shape, c.shape[-1], nd)


def dense_det(coeffs, out_shape, matrix, offset, frame, *, backend=None):
    """``det(I + ∂u/∂q · frame)`` at every voxel ``i`` of an image grid, ``q = matrix @ i + offset``: the Jacobian
    determinant of ``y ↦ y + u(q(y))`` with ``frame[d, l] = ∂q_d/∂y_l``, as :func:`det_of` of
    :func:`dense_jacobian`; on the separable numba path the per-axis derivatives go to the determinant as they are,
    without the interleaved (N, C, ndim) copy (on a 1 mm brain, most of the time of the two calls).

    Returns
    -------
    ndarray (prod(out_shape),), float64, flat voxel order
    """
    coeffs, nd, shape, m, o, be = _dense_args(coeffs, out_shape, matrix, offset, backend)
    c = _f64(coeffs)
    frame = _f64(frame)
    if not (_is_diagonal(m) and be == "numba" and c.shape[-1] == nd):
        return det_of(dense_jacobian(c, shape, m, o, backend=be).reshape(-1, c.shape[-1], nd), frame, backend=be)
    npts = int(np.prod(shape))
    parts = [_separable(c, shape, m, o, be, derivative=d).reshape(npts, nd) for d in range(nd)]
    out = np.empty(npts)
    with _backend.serial_below(npts):
        _numba()["_det_body"](parts[0], parts[1], parts[-1], frame, out)
    return out


def det_of(du, frame, *, backend=None):
    """``det(I + du @ frame)`` per point: the Jacobian determinant of ``y ↦ y + u(q(y))`` from the FFD's derivatives
    ``du`` (N, ndim, ndim) in grid-index units (:func:`dense_jacobian`, flattened) and ``frame[d, l] = ∂q_d/∂y_l``.

    Returns
    -------
    ndarray (N,), float64
    """
    du = np.ascontiguousarray(du, dtype=np.float64)
    if du.ndim != 3 or du.shape[1] != du.shape[2] or du.shape[1] not in (2, 3):
        raise ValueError(f"du must have shape (N, ndim, ndim) with ndim 2 or 3, got {du.shape}")
    frame = _f64(frame)
    if _resolve(backend, du) == "numba":
        out = np.empty(du.shape[0])
        with _backend.serial_below(du.shape[0]):
            _numba()["_det_body"](du[:, :, 0], du[:, :, 1], du[:, :, -1], frame, out)
        return out
    jac = du @ frame
    for d in range(du.shape[1]):
        jac[:, d, d] += 1.0
    return np.linalg.det(jac)


def taps(q, gshape, *, backend=None):
    """The taps of points ``q`` (N, ndim) on a grid of shape ``gshape``, for :func:`det_gradient`: flat control-point
    index ``lin`` (N, 4^ndim) (clipped), ``valid`` (N, 4^ndim) and the weights' derivatives ``der`` (N, 4^ndim, ndim)
    with ``der[j, t, d] = ∂(Π_e β3(q_je − k_e))/∂q_d`` for tap ``t``'s control point ``k`` (taps in lexicographic
    order of their offsets, the last axis fastest; numba: one serial loop, for the few points near a fold)."""
    gshape = _check_gshape(gshape)
    q = _check_points(q, len(gshape))
    if _resolve(backend, q) == "numba":
        ntap = 4 ** len(gshape)
        lin = np.empty((len(q), ntap), dtype=np.int64)
        valid = np.empty((len(q), ntap), dtype=np.bool_)
        der = np.empty((len(q), ntap, len(gshape)))
        _numba()["_taps_body"](_f64(q), np.asarray(gshape, dtype=np.int64), lin, valid, der)
        return lin, valid, der
    lins, valids, ders = [], [], []
    for lin, valid, _, dps in _taps_numpy(q, gshape, True):
        lins.append(lin)
        valids.append(valid)
        ders.append(np.stack(dps, axis=-1))
    return np.stack(lins, 1), np.stack(valids, 1), np.stack(ders, 1)


def det_gradient(coeffs, q, frame, *, tap_table=None):
    """``det(I + ∂u/∂q · frame)`` at points ``q`` and its derivatives with respect to the coefficients, per tap
    (numpy: meant for the few points near a fold, see :mod:`classreg.solvers.parametric.folds`).

    With ``frame`` = ∂q/∂y (grid index per mm), ``I + ∂u/∂q · frame`` is the Jacobian of ``y ↦ y + u(q(y))``.

    Parameters
    ----------
    coeffs : ndarray (*gshape, ndim)
        Coefficients whose components are the displacement's (as many as spatial axes).
    q : ndarray (N, ndim)
        Points in grid-index coordinates (array axis order).
    frame : ndarray (ndim, ndim)
        ``frame[d, l] = ∂q_d/∂y_l``.
    tap_table : tuple, optional
        :func:`taps` of ``q`` (computed once when the same points are evaluated for many coefficients).

    Returns
    -------
    det : ndarray (N,)
    lin : ndarray (N, 4^ndim) int
        Flat control-point index of each tap (clipped; see ``grad``).
    grad : ndarray (N, 4^ndim, ndim)
        ``∂det_j / ∂coeffs[lin[j, t], c]`` (0 for taps outside the grid).
    """
    coeffs = _check_coeffs(coeffs)
    gshape = coeffs.shape[:-1]
    nd = len(gshape)
    if coeffs.shape[-1] != nd:
        raise ValueError(f"coeffs must have {nd} components (one per axis), got {coeffs.shape[-1]}")
    lin, valid, der = taps(q, gshape) if tap_table is None else tap_table
    frame = np.asarray(frame, dtype=np.float64)
    cv = np.where(valid[..., None], coeffs.reshape(-1, nd)[lin], 0.0)  # (N, T, c)
    derf = der @ frame  # (N, T, l): ∂β_t/∂y_l
    jac = np.matmul(np.swapaxes(cv, 1, 2), derf)  # (N, c, l) = Σ_t cv[t, c] derf[t, l]
    for d in range(nd):
        jac[:, d, d] += 1.0
    # ∂det/∂J = the cofactor matrix; J[c, l] depends on coeffs[k, c] through der[k, d] frame[d, l]
    if nd == 2:
        det = jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]
        cof = np.stack([np.stack([jac[:, 1, 1], -jac[:, 1, 0]], -1), np.stack([-jac[:, 0, 1], jac[:, 0, 0]], -1)], 1)
    else:
        r0, r1, r2 = jac[:, 0], jac[:, 1], jac[:, 2]
        cof = np.stack([np.cross(r1, r2), np.cross(r2, r0), np.cross(r0, r1)], 1)
        det = np.einsum("nl,nl->n", r0, cof[:, 0])
    grad = np.matmul(derf, np.swapaxes(cof, 1, 2))  # (N, T, c) = Σ_l derf[t, l] cof[c, l]
    grad *= valid[..., None]
    return det, lin, grad


def _shortfall_body(cflat, lin, valid, der, frame, target, scale, det, grad):
    """Serial: ``det[j] = det(I + Σ_t c[lin_jt] ⊗ der_jt · frame)``, the value ``Σ_j (target − scale det_j)₊²`` and
    its gradient accumulated into the zeroed ``grad`` (G, n), point by point in order."""
    n = frame.shape[0]
    jac = np.empty((3, 3))
    cof = np.empty((3, 3))
    dl = np.empty((lin.shape[1], 3))  # per tap: its weight derivative along the physical axes
    value = 0.0
    for j in range(lin.shape[0]):
        for a in range(n):
            for b in range(n):
                jac[a, b] = 1.0 if a == b else 0.0
        for t in range(lin.shape[1]):
            if not valid[j, t]:
                continue
            k = lin[j, t]
            for b in range(n):
                s = 0.0
                for d in range(n):
                    s += der[j, t, d] * frame[d, b]
                dl[t, b] = s
            for a in range(n):
                ca = cflat[k, a]
                for b in range(n):
                    jac[a, b] += ca * dl[t, b]
        if n == 2:
            dj = jac[0, 0] * jac[1, 1] - jac[0, 1] * jac[1, 0]
            cof[0, 0] = jac[1, 1]
            cof[0, 1] = -jac[1, 0]
            cof[1, 0] = -jac[0, 1]
            cof[1, 1] = jac[0, 0]
        else:
            for a in range(3):
                a1 = (a + 1) % 3
                a2 = (a + 2) % 3
                for b in range(3):
                    b1 = (b + 1) % 3
                    b2 = (b + 2) % 3
                    cof[a, b] = jac[a1, b1] * jac[a2, b2] - jac[a1, b2] * jac[a2, b1]
            dj = jac[0, 0] * cof[0, 0] + jac[0, 1] * cof[0, 1] + jac[0, 2] * cof[0, 2]
        det[j] = dj
        short = target - scale * dj
        if short <= 0.0:
            continue
        value += short * short
        f = -2.0 * scale * short
        for t in range(lin.shape[1]):
            if valid[j, t]:
                for a in range(n):
                    s = 0.0
                    for b in range(n):
                        s += dl[t, b] * cof[a, b]
                    grad[lin[j, t], a] += f * s
    return value


@functools.cache
def _shortfall_kernel():
    return _backend.njit(_shortfall_body)


def det_shortfall(coeffs, q, frame, target, *, scale=1.0, tap_table=None, backend=None):
    """The fold penalty ``Σ_j (target − scale · det_j)₊²`` at points ``q`` and its gradient with respect to the
    coefficients, with ``det_j`` the determinant of :func:`det_gradient` (the objective of a fold projection,
    :mod:`classreg.solvers.parametric.folds`; serial, in point order: deterministic).

    Parameters
    ----------
    coeffs : ndarray (*gshape, ndim)
    q : ndarray (N, ndim)
        Points in grid-index coordinates.
    frame : ndarray (ndim, ndim)
        ``frame[d, l] = ∂q_d/∂y_l``.
    target : float
        The value below which ``scale · det`` is penalised.
    scale : float
        A constant factor of the determinant (``det ∇T = det ∇B · det(pre)`` for an initial affine ``pre``).
    tap_table : tuple, optional
        :func:`taps` of ``q``.
    backend : {None, "numpy", "numba"}

    Returns
    -------
    value : float
    det : ndarray (N,)
        ``det(I + ∂u/∂q · frame)`` (without ``scale``).
    grad : ndarray (*gshape, ndim)
        ``∂value/∂coeffs``.
    """
    coeffs = _check_coeffs(coeffs)
    gshape = coeffs.shape[:-1]
    nd = len(gshape)
    if coeffs.shape[-1] != nd:
        raise ValueError(f"coeffs must have {nd} components (one per axis), got {coeffs.shape[-1]}")
    lin, valid, der = taps(q, gshape, backend=backend) if tap_table is None else tap_table
    target, scale = float(target), float(scale)
    if _resolve(backend, coeffs) == "numpy":
        det, lin, g = det_gradient(coeffs, q, frame, tap_table=(lin, valid, der))
        short = np.maximum(0.0, target - scale * det)
        g = g * (-2.0 * scale * short)[:, None, None]
        grad = np.stack([np.bincount(lin.ravel(), weights=g[..., c].ravel(), minlength=int(np.prod(gshape)))
                         for c in range(nd)], axis=-1)
        return float(short @ short), det, grad.reshape(coeffs.shape)
    det = np.empty(lin.shape[0])
    grad = np.zeros((int(np.prod(gshape)), nd))
    value = _shortfall_kernel()(_f64(coeffs).reshape(-1, nd), np.ascontiguousarray(lin, dtype=np.int64),
                                np.ascontiguousarray(valid), _f64(der), _f64(frame), target, scale, det, grad)
    return float(value), det, grad.reshape(coeffs.shape)


# ----------------------------------------------------------------------------------------------------------------------
# Bending energy
# ----------------------------------------------------------------------------------------------------------------------
def _poly_mul(a, b):
    out = [Fraction(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def _poly_der(a):
    return [i * a[i] for i in range(1, len(a))] or [Fraction(0)]


@functools.cache
def _local_gram(r):
    """``L[a, b] = ∫_0^1 w_a^(r)(t) w_b^(r)(t) dt`` for the four cubic pieces ``w_a`` (:func:`_w4`), integrated
    exactly in rational arithmetic; returns a read-only (4, 4) float64 array."""
    s = Fraction(1, 6)
    pieces = [[s, -3 * s, 3 * s, -s], [4 * s, 0, -6 * s, 3 * s], [s, 3 * s, 3 * s, -3 * s], [0, 0, 0, s]]
    pieces = [[Fraction(c) for c in p] for p in pieces]
    for _ in range(r):
        pieces = [_poly_der(p) for p in pieces]
    lg = np.empty((4, 4))
    for a in range(4):
        for b in range(4):
            prod = _poly_mul(pieces[a], pieces[b])
            lg[a, b] = float(sum(c / (i + 1) for i, c in enumerate(prod)))
    lg.setflags(write=False)
    return lg


@functools.cache
def _gram(n, r):
    """Gram matrix (n, n) of the r-th derivatives of the 1-D B-splines ``β3(q − k)``, ``k = 0 … n − 1``, over the
    valid interval ``q ∈ [1, n − 2]``: ``G[k, l] = ∫ β3^(r)(q − k) β3^(r)(q − l) dq`` (banded, 7 diagonals)."""
    g = np.zeros((n, n))
    lg = _local_gram(r)
    for m in range(1, n - 2):  # unit cells [m, m + 1]; their taps are m - 1 ... m + 2
        g[m - 1:m + 3, m - 1:m + 3] += lg
    g.setflags(write=False)
    return g


def bending_energy(coeffs, spacing, *, gradient=False):
    """Thin-plate bending energy of the FFD, exactly, as a quadratic form in the coefficients.

    ``E = (1/V) ∫_Ω Σ_c Σ_{i,j} (∂²u_c / ∂x_i ∂x_j)² dx`` with ``x_d = h_d q_d`` (mm), over the grid's valid region
    ``Ω = Π_d [1, gshape_d − 2]`` (grid-index coordinates; where every contributing control point exists and the FFD
    is fully determined, the region ITK evaluates a ``BSplineTransform`` on), ``V = Π_d (gshape_d − 3) h_d`` its
    volume: the mean squared second derivative, Rueckert et al. 1999 eq. 6 [1]_, the penalty of elastix's
    ``TransformBendingEnergyPenalty``. Affine fields (coefficients linear in k) have E = 0.

    Each term is ``(1/(h_i² h_j²)) cᵀ (⊗_d G_d^(r_d)) c`` with ``r_d`` the number of derivatives along axis d and
    ``G^(r)`` the banded (7 diagonals) 1-D Gram matrices of ``β3^(r)`` on ``[1, n − 2]``, integrated exactly from the
    cubic pieces.

    Parameters
    ----------
    coeffs : ndarray (*gshape, C)
        Every ``gshape_d >= 4``.
    spacing : float or sequence of float
        Grid spacing ``h`` (mm per grid step), array axis order.
    gradient : bool
        Also return ``dE/dcoeffs``.

    Returns
    -------
    E : float
    grad : ndarray (*gshape, C), only with ``gradient=True`` (float64)
    """
    coeffs = _check_coeffs(coeffs)
    gshape = coeffs.shape[:-1]
    nd = len(gshape)
    if any(g < 4 for g in gshape):
        raise ValueError(f"coeffs: every grid axis needs at least 4 control points (order + 1), got {gshape}")
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    if not np.all(np.isfinite(h)) or np.any(h <= 0):
        raise ValueError(f"spacing must be positive and finite (mm, array axis order), got {spacing!r}")
    c = np.asarray(coeffs, dtype=np.float64)  # read only: no copy needed
    inv_vol = 1.0 / float(np.prod([g - 3 for g in gshape]))  # (1/V) ∫ dx = (1/Π(g-3)) ∫ dq
    # H c = Σ_{i≤j} w_ij (⊗_d G_d^(r_d)) c, factorised axis by axis: the terms share their first axes' products
    # (3-D: 3 + 6 + 3 matrix products instead of 6 × 3; they dominate an ASGD iteration's penalty)
    terms = {}
    for i in range(nd):
        for j in range(i, nd):
            r = tuple(int(d == i) + int(d == j) for d in range(nd))
            terms[r] = (1.0 if i == j else 2.0) * inv_vol / (h[i] ** 2 * h[j] ** 2)
    hc = _gram_sum(c, terms, gshape)
    energy = float(np.sum(c * hc))
    return (energy, 2.0 * hc) if gradient else energy


def _along(g, x, d):
    """``g`` (n, n) applied along axis ``d`` of ``x`` (*gshape, C), as one (batched) matrix product."""
    shape = x.shape
    pre = int(np.prod(shape[:d]))
    if d == len(shape) - 2:  # the last spatial axis: one product over (points × components) rows, not tiny ones
        xt = np.ascontiguousarray(x.reshape(pre, shape[d], shape[-1]).transpose(0, 2, 1)).reshape(-1, shape[d])
        return (xt @ g.T).reshape(pre, shape[-1], shape[d]).transpose(0, 2, 1).reshape(shape)
    return np.matmul(g, x.reshape(pre, shape[d], -1)).reshape(shape)


def _gram_sum(c, terms, gshape):
    """``Σ_r w_r (⊗_d G_d^(r_d)) c`` for ``terms`` {r: w_r}: the partial products over the leading axes are computed
    once per distinct prefix of r, and the weights enter before the last axis's product."""
    nd = len(gshape)
    partial = {(): c}
    for d in range(nd - 1):
        prefixes = {r[:d + 1] for r in terms}
        partial = {p: _along(_gram(gshape[d], p[-1]), partial[p[:-1]], d) for p in sorted(prefixes)}
    out = None
    for last in sorted({r[-1] for r in terms}):
        mix = sum(w * partial[r[:-1]] for r, w in terms.items() if r[-1] == last)
        part = _along(_gram(gshape[-1], last), mix, nd - 1)
        out = part if out is None else out + part
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Refinement
# ----------------------------------------------------------------------------------------------------------------------
def _nested_knots(m, o):
    """``r_d`` per axis if every old knot (integer q) is a new knot (``q = m k + o``, diagonal m, ``1/m_dd`` and
    ``o_d / m_dd`` integers), else None."""
    if not _is_diagonal(m):
        return None
    rs = []
    for d in range(m.shape[0]):
        if m[d, d] <= 0:
            return None
        r = 1.0 / m[d, d]
        k0 = -o[d] * r
        if abs(r - round(r)) > 1e-9 * max(1.0, r) or abs(k0 - round(k0)) > 1e-9 * max(1.0, abs(k0)):
            return None
        rs.append(round(r))
    return rs


@functools.cache
def _interp_matrix(n, boundary):
    """The (n, n) cubic B-spline interpolation matrix ``s_j = Σ_k c_k β3(j − k)``; ``boundary`` "zero": ghosts
    ``c_{−1} = c_n = 0``; "not-a-knot": ghosts ``c_{−1} = 4c_0 − 6c_1 + 4c_2 − c_3`` (Δ⁴c = 0, i.e. no jump of the
    third derivative at knots 1 and n − 2; exact for cubic polynomials)."""
    a = np.zeros((n, n))
    for j in range(n):
        a[j, j] = 4.0 / 6.0
        if j > 0:
            a[j, j - 1] = 1.0 / 6.0
        if j < n - 1:
            a[j, j + 1] = 1.0 / 6.0
    if boundary == "not-a-knot":
        a[0, :4] += np.array([4.0, -6.0, 4.0, -1.0]) / 6.0
        a[n - 1, n - 4:] += np.array([-1.0, 4.0, -6.0, 4.0]) / 6.0
    a.setflags(write=False)
    return a


def _prefilter(samples, boundary):
    """B-spline coefficients interpolating ``samples`` (*shape, C) at the grid points, axis by axis (exact solve)."""
    c = samples
    for d in range(samples.ndim - 1):
        a = _interp_matrix(c.shape[d], boundary)
        moved = np.moveaxis(c, d, 0)
        sol = np.linalg.solve(a, moved.reshape(moved.shape[0], -1))
        c = np.moveaxis(sol.reshape(moved.shape), 0, d)
    return np.ascontiguousarray(c)


def refine(coeffs, new_shape, matrix, offset, *, backend=None):
    """Coefficients of a new (typically finer) control grid whose FFD interpolates the old one at its control points.

    New control point ``k`` sits at old grid-index coordinate ``q = matrix @ k + offset``. The old FFD is sampled at
    the new control points (:func:`dense`) and the samples are decomposed into cubic B-spline coefficients by an
    exact solve along each axis [2]_:

    * nested knots (``matrix`` diagonal, ``1/matrix_dd`` and ``offset_d/matrix_dd`` integers, e.g. the dyadic
      refinement ``matrix = I/2``): the old FFD is then exactly a spline on the new knots, supported on
      ``q ∈ (−2, gshape + 1)``. The samples are taken on the new grid extended to cover that support, where the
      coefficients outside vanish, so the zero boundary is exact and the refined FFD equals the old one everywhere
      (to rounding);
    * otherwise: samples on the new grid only, with the "not-a-knot" end condition (fourth difference of the
      coefficients zero at both ends), which is exact whenever the old FFD is a cubic polynomial over the new
      control points' positions (e.g. an affine or cubic field in the old valid region), and an O(h⁴) extrapolation
      elsewhere. (ITK's ``BSplineDecompositionImageFilter`` uses the mirror extension instead, exact only for
      fields symmetric about the end points.)

    Parameters
    ----------
    coeffs : ndarray (*gshape, C)
    new_shape : sequence of int
        New control-grid shape (array axis order), each >= 4.
    matrix : ndarray (ndim, ndim)
    offset : ndarray (ndim,)
    backend : {None, "numpy", "numba"}
        Backend of the sampling step.

    Returns
    -------
    ndarray (*new_shape, C)
    """
    coeffs = _check_coeffs(coeffs)
    nd = coeffs.ndim - 1
    shape = _check_gshape(new_shape, "new_shape")
    if len(shape) != nd:
        raise ValueError(f"new_shape must have {nd} entries, got {new_shape!r}")
    if any(n < 4 for n in shape):
        raise ValueError(f"new_shape: every axis needs at least 4 control points, got {shape}")
    m, o = _check_affine(matrix, offset, nd)
    dt = _out_dtype(coeffs)
    gshape = coeffs.shape[:-1]
    if _nested_knots(m, o) is not None:
        diag = np.diagonal(m)
        lo = [min(0, math.floor((-2.0 - o[d]) / diag[d])) for d in range(nd)]
        hi = [max(shape[d] - 1, math.ceil((gshape[d] + 1.0 - o[d]) / diag[d])) for d in range(nd)]
        ext = tuple(hi[d] - lo[d] + 1 for d in range(nd))
        samples = dense(coeffs, ext, m, o + diag * np.asarray(lo, dtype=np.float64), backend=backend)
        c = _prefilter(samples.astype(np.float64), "zero")
        crop = tuple(slice(-lo[d], -lo[d] + shape[d]) for d in range(nd))
        return np.ascontiguousarray(c[crop]).astype(dt, copy=False)
    samples = dense(coeffs, shape, m, o, backend=backend)
    return _prefilter(samples.astype(np.float64), "not-a-knot").astype(dt, copy=False)


# ----------------------------------------------------------------------------------------------------------------------
# Sample-level kernels of a parametric registration: scattered points in a physical frame, ITK's valid region
# ----------------------------------------------------------------------------------------------------------------------
def _dot4(coeffs, i, j, ch, w0, w1, w2, w3):
    """``Σ_t w_t coeffs[i, j + t, ch]`` (2-D grid): one row of four taps."""
    return (w0 * coeffs[i, j, ch] + w1 * coeffs[i, j + 1, ch] + w2 * coeffs[i, j + 2, ch]
            + w3 * coeffs[i, j + 3, ch])


def _dot4_3(coeffs, i, j, k, ch, w0, w1, w2, w3):
    """``Σ_t w_t coeffs[i, j, k + t, ch]`` (3-D grid)."""
    return (w0 * coeffs[i, j, k, ch] + w1 * coeffs[i, j, k + 1, ch] + w2 * coeffs[i, j, k + 2, ch]
            + w3 * coeffs[i, j, k + 3, ch])


def _add4(out, i, j, ch, v, w0, w1, w2, w3):
    """``out[i, j + t, ch] += v w_t`` (2-D grid)."""
    out[i, j, ch] += v * w0
    out[i, j + 1, ch] += v * w1
    out[i, j + 2, ch] += v * w2
    out[i, j + 3, ch] += v * w3


def _add4_3(out, i, j, k, ch, v, w0, w1, w2, w3):
    """``out[i, j, k + t, ch] += v w_t`` (3-D grid)."""
    out[i, j, k, ch] += v * w0
    out[i, j, k + 1, ch] += v * w1
    out[i, j, k + 2, ch] += v * w2
    out[i, j, k + 3, ch] += v * w3


def _samples2_body(coeffs, pts, m, o, u, q, inside):
    n0 = coeffs.shape[0]
    n1 = coeffs.shape[1]
    nc = coeffs.shape[2]
    for p in range(pts.shape[0]):
        x0 = pts[p, 0]
        x1 = pts[p, 1]
        q0 = m[0, 0] * x0 + m[0, 1] * x1 + o[0]
        q1 = m[1, 0] * x0 + m[1, 1] * x1 + o[1]
        q[p, 0] = q0
        q[p, 1] = q1
        ok = q0 >= 1.0 and q0 <= n0 - 2.0 and q1 >= 1.0 and q1 <= n1 - 2.0
        inside[p] = ok
        if not ok:
            for ch in range(nc):
                u[p, ch] = 0.0
            continue
        i0 = min(int(q0), n0 - 3)
        i1 = min(int(q1), n1 - 3)
        a0, a1, a2, a3 = _w4(q0 - i0)
        b0, b1, b2, b3 = _w4(q1 - i1)
        r = i0 - 1
        c = i1 - 1
        for ch in range(nc):
            u[p, ch] = (a0 * _dot4(coeffs, r, c, ch, b0, b1, b2, b3)
                        + a1 * _dot4(coeffs, r + 1, c, ch, b0, b1, b2, b3)
                        + a2 * _dot4(coeffs, r + 2, c, ch, b0, b1, b2, b3)
                        + a3 * _dot4(coeffs, r + 3, c, ch, b0, b1, b2, b3))


def _samples3_body(coeffs, pts, m, o, u, q, inside):
    n0 = coeffs.shape[0]
    n1 = coeffs.shape[1]
    n2 = coeffs.shape[2]
    nc = coeffs.shape[3]
    for p in range(pts.shape[0]):
        x0 = pts[p, 0]
        x1 = pts[p, 1]
        x2 = pts[p, 2]
        q0 = m[0, 0] * x0 + m[0, 1] * x1 + m[0, 2] * x2 + o[0]
        q1 = m[1, 0] * x0 + m[1, 1] * x1 + m[1, 2] * x2 + o[1]
        q2 = m[2, 0] * x0 + m[2, 1] * x1 + m[2, 2] * x2 + o[2]
        q[p, 0] = q0
        q[p, 1] = q1
        q[p, 2] = q2
        ok = (q0 >= 1.0 and q0 <= n0 - 2.0 and q1 >= 1.0 and q1 <= n1 - 2.0 and q2 >= 1.0
              and q2 <= n2 - 2.0)
        inside[p] = ok
        if not ok:
            for ch in range(nc):
                u[p, ch] = 0.0
            continue
        i0 = min(int(q0), n0 - 3)
        i1 = min(int(q1), n1 - 3)
        i2 = min(int(q2), n2 - 3)
        a0, a1, a2, a3 = _w4(q0 - i0)
        b0, b1, b2, b3 = _w4(q1 - i1)
        c0, c1, c2, c3 = _w4(q2 - i2)
        k = i2 - 1
        for ch in range(nc):
            acc = 0.0
            for rr in range(4):
                ar = a0 if rr == 0 else (a1 if rr == 1 else (a2 if rr == 2 else a3))
                r = i0 - 1 + rr
                s = i1 - 1
                acc += ar * (b0 * _dot4_3(coeffs, r, s, k, ch, c0, c1, c2, c3)
                             + b1 * _dot4_3(coeffs, r, s + 1, k, ch, c0, c1, c2, c3)
                             + b2 * _dot4_3(coeffs, r, s + 2, k, ch, c0, c1, c2, c3)
                             + b3 * _dot4_3(coeffs, r, s + 3, k, ch, c0, c1, c2, c3))
            u[p, ch] = acc


def _scatter2_body(q, use, values, out):
    n0 = out.shape[0]
    n1 = out.shape[1]
    nc = out.shape[2]
    k = 0
    for p in range(q.shape[0]):
        if not use[p]:
            continue
        q0 = q[p, 0]
        q1 = q[p, 1]
        i0 = min(int(q0), n0 - 3)
        i1 = min(int(q1), n1 - 3)
        a0, a1, a2, a3 = _w4(q0 - i0)
        b0, b1, b2, b3 = _w4(q1 - i1)
        r = i0 - 1
        c = i1 - 1
        for ch in range(nc):
            v = values[k, ch]
            _add4(out, r, c, ch, v * a0, b0, b1, b2, b3)
            _add4(out, r + 1, c, ch, v * a1, b0, b1, b2, b3)
            _add4(out, r + 2, c, ch, v * a2, b0, b1, b2, b3)
            _add4(out, r + 3, c, ch, v * a3, b0, b1, b2, b3)
        k += 1


def _scatter3_body(q, use, values, out):
    n0 = out.shape[0]
    n1 = out.shape[1]
    n2 = out.shape[2]
    nc = out.shape[3]
    k = 0
    for p in range(q.shape[0]):
        if not use[p]:
            continue
        q0 = q[p, 0]
        q1 = q[p, 1]
        q2 = q[p, 2]
        i0 = min(int(q0), n0 - 3)
        i1 = min(int(q1), n1 - 3)
        i2 = min(int(q2), n2 - 3)
        a0, a1, a2, a3 = _w4(q0 - i0)
        b0, b1, b2, b3 = _w4(q1 - i1)
        c0, c1, c2, c3 = _w4(q2 - i2)
        t = i2 - 1
        for ch in range(nc):
            v = values[k, ch]
            for rr in range(4):
                ar = a0 if rr == 0 else (a1 if rr == 1 else (a2 if rr == 2 else a3))
                r = i0 - 1 + rr
                s = i1 - 1
                _add4_3(out, r, s, t, ch, v * ar * b0, c0, c1, c2, c3)
                _add4_3(out, r, s + 1, t, ch, v * ar * b1, c0, c1, c2, c3)
                _add4_3(out, r, s + 2, t, ch, v * ar * b2, c0, c1, c2, c3)
                _add4_3(out, r, s + 3, t, ch, v * ar * b3, c0, c1, c2, c3)
        k += 1


# ----------------------------------------------------------------------------------------------------------------------
# One iteration of a B-spline registration with Mattes MI, fused: sample → FFD → moving value/gradient → Parzen
# histogram → MI and ∂MI/∂coefficients
# ----------------------------------------------------------------------------------------------------------------------
#: columns of the per-sample workspace of :func:`mi_step` before the world gradient, grid index and grid flag
_WORK_HEAD = 6


def _lin2(a, c0, c1):
    """Bilinear corners and weights of ``c`` in an image of shape ``a.shape[:2]``: the rule of
    :func:`classreg.kernels.sampling.linear_at` (the last cell holds the far edge)."""
    n0 = a.shape[0]
    n1 = a.shape[1]
    i0 = min(int(c0), max(n0 - 2, 0))
    i1 = min(int(c1), max(n1 - 2, 0))
    t0 = c0 - i0
    t1 = c1 - i1
    return i0, i1, min(i0 + 1, n0 - 1), min(i1 + 1, n1 - 1), t0, t1


def _at2(a, i0, i1, j0, j1, t0, t1, ch):
    w00, w01 = (1.0 - t0) * (1.0 - t1), (1.0 - t0) * t1
    w10, w11 = t0 * (1.0 - t1), t0 * t1
    return w00 * a[i0, i1, ch] + w01 * a[i0, j1, ch] + w10 * a[j0, i1, ch] + w11 * a[j0, j1, ch]


def _lin3(a, c0, c1, c2):
    n0 = a.shape[0]
    n1 = a.shape[1]
    n2 = a.shape[2]
    i0 = min(int(c0), max(n0 - 2, 0))
    i1 = min(int(c1), max(n1 - 2, 0))
    i2 = min(int(c2), max(n2 - 2, 0))
    return (i0, i1, i2, min(i0 + 1, n0 - 1), min(i1 + 1, n1 - 1), min(i2 + 1, n2 - 1), c0 - i0, c1 - i1,
            c2 - i2)


def _at3(a, i0, i1, i2, j0, j1, j2, t0, t1, t2, ch):
    x = ((1.0 - t2) * a[i0, i1, i2, ch] + t2 * a[i0, i1, j2, ch]) * (1.0 - t1) + \
        ((1.0 - t2) * a[i0, j1, i2, ch] + t2 * a[i0, j1, j2, ch]) * t1
    y = ((1.0 - t2) * a[j0, i1, i2, ch] + t2 * a[j0, i1, j2, ch]) * (1.0 - t1) + \
        ((1.0 - t2) * a[j0, j1, i2, ch] + t2 * a[j0, j1, j2, ch]) * t1
    return (1.0 - t0) * x + t0 * y


def _mi_finish(work, count, hist, nbf, nbm, normalised, tiny, bsm, sf, sm):
    """The MI value, the per-sample ``∂MI/∂m`` (into ``work[:, 0]``, the fixed value no longer needed) and the
    NCC of the samples (``sf``, ``sm``: sums of their fixed and moving values)."""
    table = np.empty((nbf, nbm))
    value, scale = _mi_table(hist, count, nbf, nbm, normalised, tiny, bsm, table)
    mf = sf / count
    mm = sm / count
    sab = 0.0
    saa = 0.0
    sbb = 0.0
    for k in range(count):
        fc = work[k, 0] - mf
        mc = work[k, 1] - mm
        sab += fc * mc
        saa += fc * fc
        sbb += mc * mc
        work[k, 0] = _mi_grad(table, int(work[k, 2]), int(work[k, 3]), work[k, 4], work[k, 5], scale)
    sim = sab / np.sqrt(saa * sbb) if saa > 0.0 and sbb > 0.0 else np.nan
    return value, sim


def _mi_step2_body(fdata, idx, maps, prior, coeffs, stack, flags, par, work, grad):
    nbf = flags[0]
    nbm = flags[1]
    normalised = flags[2] != 0
    has_prior = flags[3] != 0
    has_mask = flags[4] != 0
    lof, hif, lom, him, tlo, thi, tiny = par[0], par[1], par[2], par[3], par[4], par[5], par[6]
    smallf, smallm, bsf, bsm = _mi_setup(nbf, nbm, lof, hif, lom, him)
    n0 = coeffs.shape[0]
    n1 = coeffs.shape[1]
    p0 = prior.shape[0]
    p1 = prior.shape[1]
    s0 = stack.shape[0]
    s1 = stack.shape[1]
    hist = np.zeros((nbf, nbm))
    sf = 0.0
    sm = 0.0
    count = 0
    for j in range(idx.shape[0]):
        x0 = idx[j, 0]
        x1 = idx[j, 1]
        i0, i1, j0, j1, t0, t1 = _lin2(fdata, x0, x1)
        f = _at2(fdata, i0, i1, j0, j1, t0, t1, 0)
        y0 = x0 * maps[0, 0, 0] + x1 * maps[0, 0, 1] + maps[0, 0, 2]
        y1 = x0 * maps[0, 1, 0] + x1 * maps[0, 1, 1] + maps[0, 1, 2]
        if has_prior:
            c0 = y0 * maps[1, 0, 0] + y1 * maps[1, 0, 1] + maps[1, 0, 2]
            c1 = y0 * maps[1, 1, 0] + y1 * maps[1, 1, 1] + maps[1, 1, 2]
            if c0 >= 0.0 and c0 <= p0 - 1.0 and c1 >= 0.0 and c1 <= p1 - 1.0:
                i0, i1, j0, j1, t0, t1 = _lin2(prior, c0, c1)
                y0 += _at2(prior, i0, i1, j0, j1, t0, t1, 0)
                y1 += _at2(prior, i0, i1, j0, j1, t0, t1, 1)
        q0 = maps[2, 0, 0] * y0 + maps[2, 0, 1] * y1 + maps[2, 0, 2]
        q1 = maps[2, 1, 0] * y0 + maps[2, 1, 1] * y1 + maps[2, 1, 2]
        ingrid = q0 >= 1.0 and q0 <= n0 - 2.0 and q1 >= 1.0 and q1 <= n1 - 2.0
        z0 = y0
        z1 = y1
        if ingrid:
            r = min(int(q0), n0 - 3)
            c = min(int(q1), n1 - 3)
            a0, a1, a2, a3 = _w4(q0 - r)
            b0, b1, b2, b3 = _w4(q1 - c)
            r -= 1
            c -= 1
            z0 += (a0 * _dot4(coeffs, r, c, 0, b0, b1, b2, b3) + a1 * _dot4(coeffs, r + 1, c, 0, b0, b1, b2, b3)
                   + a2 * _dot4(coeffs, r + 2, c, 0, b0, b1, b2, b3)
                   + a3 * _dot4(coeffs, r + 3, c, 0, b0, b1, b2, b3))
            z1 += (a0 * _dot4(coeffs, r, c, 1, b0, b1, b2, b3) + a1 * _dot4(coeffs, r + 1, c, 1, b0, b1, b2, b3)
                   + a2 * _dot4(coeffs, r + 2, c, 1, b0, b1, b2, b3)
                   + a3 * _dot4(coeffs, r + 3, c, 1, b0, b1, b2, b3))
        c0 = z0 * maps[3, 0, 0] + z1 * maps[3, 0, 1] + maps[3, 0, 2]
        c1 = z0 * maps[3, 1, 0] + z1 * maps[3, 1, 1] + maps[3, 1, 2]
        if not (c0 >= 0.0 and c0 <= s0 - 1.0 and c1 >= 0.0 and c1 <= s1 - 1.0):
            continue
        i0, i1, j0, j1, t0, t1 = _lin2(stack, c0, c1)
        if has_mask and _at2(stack, i0, i1, j0, j1, t0, t1, stack.shape[2] - 1) < 0.5:
            continue
        m = _at2(stack, i0, i1, j0, j1, t0, t1, 0)
        # the exact gradient of the bilinear interpolant (ITK/elastix's linear interpolators), not the interpolated
        # central differences of the stack's gradient channels: the derivative of the cost being minimised
        v00 = 1.0 * stack[i0, i1, 0]  # float64 before the differences
        v01 = 1.0 * stack[i0, j1, 0]
        v10 = 1.0 * stack[j0, i1, 0]
        v11 = 1.0 * stack[j0, j1, 0]
        d0 = (1.0 - t1) * (v10 - v00) + t1 * (v11 - v01)
        d1 = (1.0 - t0) * (v01 - v00) + t0 * (v11 - v10)
        fi, b, t, dl = _mi_add(hist, f, m, nbf, nbm, lof, hif, lom, him, tlo, thi, smallf, smallm, bsf, bsm)
        work[count, 0] = f
        work[count, 1] = m
        work[count, 2] = fi
        work[count, 3] = b
        work[count, 4] = t
        work[count, 5] = dl
        work[count, 6] = d0 * maps[3, 0, 0] + d1 * maps[3, 1, 0]  # ∇_z M = (∂idx/∂z)ᵀ ∇_idx M
        work[count, 7] = d0 * maps[3, 0, 1] + d1 * maps[3, 1, 1]
        work[count, 8] = q0
        work[count, 9] = q1
        work[count, 10] = 1.0 if ingrid else 0.0
        sf += f
        sm += m
        count += 1
    grad[:] = 0.0
    if count < 2:
        return 0.0, count, np.nan
    value, sim = _mi_finish(work, count, hist, nbf, nbm, normalised, tiny, bsm, sf, sm)
    for k in range(count):
        if work[k, 10] == 0.0:
            continue
        q0 = work[k, 8]
        q1 = work[k, 9]
        r = min(int(q0), n0 - 3)
        c = min(int(q1), n1 - 3)
        a0, a1, a2, a3 = _w4(q0 - r)
        b0, b1, b2, b3 = _w4(q1 - c)
        r -= 1
        c -= 1
        for ch in range(2):
            v = work[k, 0] * work[k, 6 + ch]
            _add4(grad, r, c, ch, v * a0, b0, b1, b2, b3)
            _add4(grad, r + 1, c, ch, v * a1, b0, b1, b2, b3)
            _add4(grad, r + 2, c, ch, v * a2, b0, b1, b2, b3)
            _add4(grad, r + 3, c, ch, v * a3, b0, b1, b2, b3)
    return value, count, sim


def _mi_step3_body(fdata, idx, maps, prior, coeffs, stack, flags, par, work, grad):
    nbf = flags[0]
    nbm = flags[1]
    normalised = flags[2] != 0
    has_prior = flags[3] != 0
    has_mask = flags[4] != 0
    lof, hif, lom, him, tlo, thi, tiny = par[0], par[1], par[2], par[3], par[4], par[5], par[6]
    smallf, smallm, bsf, bsm = _mi_setup(nbf, nbm, lof, hif, lom, him)
    n0 = coeffs.shape[0]
    n1 = coeffs.shape[1]
    n2 = coeffs.shape[2]
    p0 = prior.shape[0]
    p1 = prior.shape[1]
    p2 = prior.shape[2]
    s0 = stack.shape[0]
    s1 = stack.shape[1]
    s2 = stack.shape[2]
    hist = np.zeros((nbf, nbm))
    sf = 0.0
    sm = 0.0
    count = 0
    y = np.empty(3)
    z = np.empty(3)
    g = np.empty(3)
    for j in range(idx.shape[0]):
        x0 = idx[j, 0]
        x1 = idx[j, 1]
        x2 = idx[j, 2]
        i0, i1, i2, j0, j1, j2, t0, t1, t2 = _lin3(fdata, x0, x1, x2)
        f = _at3(fdata, i0, i1, i2, j0, j1, j2, t0, t1, t2, 0)
        for d in range(3):
            y[d] = x0 * maps[0, d, 0] + x1 * maps[0, d, 1] + x2 * maps[0, d, 2] + maps[0, d, 3]
        if has_prior:
            c0 = y[0] * maps[1, 0, 0] + y[1] * maps[1, 0, 1] + y[2] * maps[1, 0, 2] + maps[1, 0, 3]
            c1 = y[0] * maps[1, 1, 0] + y[1] * maps[1, 1, 1] + y[2] * maps[1, 1, 2] + maps[1, 1, 3]
            c2 = y[0] * maps[1, 2, 0] + y[1] * maps[1, 2, 1] + y[2] * maps[1, 2, 2] + maps[1, 2, 3]
            if (c0 >= 0.0 and c0 <= p0 - 1.0 and c1 >= 0.0 and c1 <= p1 - 1.0 and c2 >= 0.0
                    and c2 <= p2 - 1.0):
                i0, i1, i2, j0, j1, j2, t0, t1, t2 = _lin3(prior, c0, c1, c2)
                for d in range(3):
                    y[d] += _at3(prior, i0, i1, i2, j0, j1, j2, t0, t1, t2, d)
        q0 = maps[2, 0, 0] * y[0] + maps[2, 0, 1] * y[1] + maps[2, 0, 2] * y[2] + maps[2, 0, 3]
        q1 = maps[2, 1, 0] * y[0] + maps[2, 1, 1] * y[1] + maps[2, 1, 2] * y[2] + maps[2, 1, 3]
        q2 = maps[2, 2, 0] * y[0] + maps[2, 2, 1] * y[1] + maps[2, 2, 2] * y[2] + maps[2, 2, 3]
        ingrid = (q0 >= 1.0 and q0 <= n0 - 2.0 and q1 >= 1.0 and q1 <= n1 - 2.0 and q2 >= 1.0
                  and q2 <= n2 - 2.0)
        for d in range(3):
            z[d] = y[d]
        if ingrid:
            r0 = min(int(q0), n0 - 3)
            r1 = min(int(q1), n1 - 3)
            r2 = min(int(q2), n2 - 3)
            a0, a1, a2, a3 = _w4(q0 - r0)
            b0, b1, b2, b3 = _w4(q1 - r1)
            e0, e1, e2, e3 = _w4(q2 - r2)
            k = r2 - 1
            for ch in range(3):
                acc = 0.0
                for rr in range(4):
                    ar = a0 if rr == 0 else (a1 if rr == 1 else (a2 if rr == 2 else a3))
                    r = r0 - 1 + rr
                    s = r1 - 1
                    acc += ar * (b0 * _dot4_3(coeffs, r, s, k, ch, e0, e1, e2, e3)
                                 + b1 * _dot4_3(coeffs, r, s + 1, k, ch, e0, e1, e2, e3)
                                 + b2 * _dot4_3(coeffs, r, s + 2, k, ch, e0, e1, e2, e3)
                                 + b3 * _dot4_3(coeffs, r, s + 3, k, ch, e0, e1, e2, e3))
                z[ch] += acc
        c0 = z[0] * maps[3, 0, 0] + z[1] * maps[3, 0, 1] + z[2] * maps[3, 0, 2] + maps[3, 0, 3]
        c1 = z[0] * maps[3, 1, 0] + z[1] * maps[3, 1, 1] + z[2] * maps[3, 1, 2] + maps[3, 1, 3]
        c2 = z[0] * maps[3, 2, 0] + z[1] * maps[3, 2, 1] + z[2] * maps[3, 2, 2] + maps[3, 2, 3]
        if not (c0 >= 0.0 and c0 <= s0 - 1.0 and c1 >= 0.0 and c1 <= s1 - 1.0 and c2 >= 0.0
                and c2 <= s2 - 1.0):
            continue
        i0, i1, i2, j0, j1, j2, t0, t1, t2 = _lin3(stack, c0, c1, c2)
        if has_mask and _at3(stack, i0, i1, i2, j0, j1, j2, t0, t1, t2, stack.shape[3] - 1) < 0.5:
            continue
        m = _at3(stack, i0, i1, i2, j0, j1, j2, t0, t1, t2, 0)
        a000 = 1.0 * stack[i0, i1, i2, 0]  # the exact gradient of the trilinear interpolant (see the 2-D body)
        a001 = 1.0 * stack[i0, i1, j2, 0]
        a010 = 1.0 * stack[i0, j1, i2, 0]
        a011 = 1.0 * stack[i0, j1, j2, 0]
        a100 = 1.0 * stack[j0, i1, i2, 0]
        a101 = 1.0 * stack[j0, i1, j2, 0]
        a110 = 1.0 * stack[j0, j1, i2, 0]
        a111 = 1.0 * stack[j0, j1, j2, 0]
        e00 = (1.0 - t2) * a000 + t2 * a001
        e01 = (1.0 - t2) * a010 + t2 * a011
        e10 = (1.0 - t2) * a100 + t2 * a101
        e11 = (1.0 - t2) * a110 + t2 * a111
        g[0] = (e10 * (1.0 - t1) + e11 * t1) - (e00 * (1.0 - t1) + e01 * t1)
        g[1] = (1.0 - t0) * (e01 - e00) + t0 * (e11 - e10)
        g[2] = ((1.0 - t0) * ((1.0 - t1) * (a001 - a000) + t1 * (a011 - a010))
                + t0 * ((1.0 - t1) * (a101 - a100) + t1 * (a111 - a110)))
        fi, b, t, dl = _mi_add(hist, f, m, nbf, nbm, lof, hif, lom, him, tlo, thi, smallf, smallm, bsf, bsm)
        work[count, 0] = f
        work[count, 1] = m
        work[count, 2] = fi
        work[count, 3] = b
        work[count, 4] = t
        work[count, 5] = dl
        for d in range(3):
            work[count, 6 + d] = g[0] * maps[3, 0, d] + g[1] * maps[3, 1, d] + g[2] * maps[3, 2, d]
        work[count, 9] = q0
        work[count, 10] = q1
        work[count, 11] = q2
        work[count, 12] = 1.0 if ingrid else 0.0
        sf += f
        sm += m
        count += 1
    grad[:] = 0.0
    if count < 2:
        return 0.0, count, np.nan
    value, sim = _mi_finish(work, count, hist, nbf, nbm, normalised, tiny, bsm, sf, sm)
    for k in range(count):
        if work[k, 12] == 0.0:
            continue
        q0 = work[k, 9]
        q1 = work[k, 10]
        q2 = work[k, 11]
        r0 = min(int(q0), n0 - 3)
        r1 = min(int(q1), n1 - 3)
        r2 = min(int(q2), n2 - 3)
        a0, a1, a2, a3 = _w4(q0 - r0)
        b0, b1, b2, b3 = _w4(q1 - r1)
        e0, e1, e2, e3 = _w4(q2 - r2)
        kk = r2 - 1
        for ch in range(3):
            v = work[k, 0] * work[k, 6 + ch]
            for rr in range(4):
                ar = a0 if rr == 0 else (a1 if rr == 1 else (a2 if rr == 2 else a3))
                r = r0 - 1 + rr
                s = r1 - 1
                _add4_3(grad, r, s, kk, ch, v * ar * b0, e0, e1, e2, e3)
                _add4_3(grad, r, s + 1, kk, ch, v * ar * b1, e0, e1, e2, e3)
                _add4_3(grad, r, s + 2, kk, ch, v * ar * b2, e0, e1, e2, e3)
                _add4_3(grad, r, s + 3, kk, ch, v * ar * b3, e0, e1, e2, e3)
    return value, count, sim


@functools.cache
def _sample_kernels():
    # the MI helpers come from kernels/sampling.py: numba's on-disk cache of these bodies is keyed on this file
    # only, so an edit there needs a touch here (or NUMBA_CACHE_DIR cleared) during development
    ns = mi_namespace(globals())
    for name in ("_w4", "_dot4", "_dot4_3", "_add4", "_add4_3", "_lin2", "_at2", "_lin3", "_at3", "_mi_finish"):
        ns[name] = _backend.njit(inline="always")(_backend.rebind(globals()[name], ns))
    return {name: _backend.njit(_backend.rebind(globals()[name], ns))
            for name in ("_samples2_body", "_samples3_body", "_scatter2_body", "_scatter3_body", "_mi_step2_body",
                         "_mi_step3_body")}


def sample_kernels(ndim: int):
    """``(forward, scatter)``: the compiled serial kernels behind :func:`samples` and :func:`scatter_samples` for
    hot loops that validated their arrays once (needs numba; no checks): ``forward(coeffs, points, matrix, offset,
    u, q, inside)`` fills the preallocated ``u`` (N, C), ``q`` (N, ndim), ``inside`` (N,); ``scatter(q, use,
    values, out)`` adds into the zeroed ``out`` (*gshape, C). All float64 and C-contiguous."""
    k = _sample_kernels()
    return (k["_samples2_body"], k["_scatter2_body"]) if ndim == 2 else (k["_samples3_body"], k["_scatter3_body"])


def samples(coeffs, points, matrix, offset, *, backend=None):
    """The FFD at scattered points of a physical frame, with ITK's valid region: the forward pass of a parametric
    registration's samples (one serial loop: a few thousand points, where a parallel launch costs more).

    Parameters
    ----------
    coeffs : ndarray (*gshape, C)
    points : ndarray (N, ndim)
        Points in any frame; their grid indices are ``q = points @ matrix.T + offset``.
    matrix, offset : ndarray
        The frame → grid-index map.
    backend : {None, "numpy", "numba"}

    Returns
    -------
    u : ndarray (N, C)
        The FFD at the points inside the valid region ``1 <= q_d <= gshape_d − 2`` (every tap exists), 0 outside
        (ITK's ``BSplineTransform`` convention).
    q : ndarray (N, ndim)
        The grid indices.
    inside : ndarray of bool (N,)
    """
    coeffs = _check_coeffs(coeffs)
    nd = coeffs.ndim - 1
    pts = _check_points(points, nd, "points")
    m, o = _check_affine(matrix, offset, nd)
    if _resolve(backend, coeffs, pts) == "numpy":
        q = pts @ m.T + o
        top = np.asarray(coeffs.shape[:-1], dtype=np.float64) - 2.0
        inside = np.all((q >= 1.0) & (q <= top), axis=1)
        u = np.zeros((len(q), coeffs.shape[-1]))
        if inside.any():
            u[inside] = _evaluate_numpy(coeffs, q[inside], False)[0]
        return u, q, inside
    u = np.empty((len(pts), coeffs.shape[-1]))
    q = np.empty_like(pts)
    inside = np.empty(len(pts), dtype=np.bool_)
    _sample_kernels()["_samples2_body" if nd == 2 else "_samples3_body"](_f64(coeffs), pts, m, o, u, q, inside)
    return u, q, inside


def scatter_samples(q, use, values, gshape, *, backend=None):
    """Adjoint of :func:`samples` over the points flagged ``use`` (which must be inside the valid region):
    ``out[k] = Σ_{j: use_j} values[i(j)] β³(q_j − k)`` with ``values`` holding one row per used point, in order.
    Serial, in point order: deterministic and independent of the thread count."""
    gshape = _check_gshape(gshape)
    nd = len(gshape)
    q = _check_points(q, nd)
    use = np.ascontiguousarray(use, dtype=np.bool_)
    v = _f64(values)
    if v.ndim != 2 or v.shape[0] != int(use.sum()):
        raise ValueError(f"values must have one row per used point ({int(use.sum())}), got shape {v.shape}")
    if _resolve(backend, q, v) == "numpy":
        return _adjoint_numpy(q[use], v, gshape)
    out = np.zeros((*gshape, v.shape[1]))
    _sample_kernels()["_scatter2_body" if nd == 2 else "_scatter3_body"](q, use, v, out)
    return out


def mi_step_workspace(n: int, ndim: int) -> np.ndarray:
    """The per-sample workspace of :func:`mi_step_kernel` for ``n`` samples (float64, (n, 7 + 2 ndim))."""
    return np.empty((n, _WORK_HEAD + 2 * ndim + 1))


def mi_step_kernel(ndim: int):
    """The compiled serial kernel behind :func:`mi_step` for hot loops that validated their arrays once (needs
    numba; no checks): ``fn(fixed, points, maps, prior, coeffs, moving, flags, par, work, grad) -> (value, nvalid,
    similarity)`` with the arrays of :func:`mi_step` (``prior`` a (1, …, 1, ndim) dummy without one), ``flags``
    int64 ``[nbf, nbm, normalised, has_prior, has_mask]``, ``par`` float64 ``[lof, hif, lom, him, tlo, thi, tiny]``,
    the workspace ``work`` (:func:`mi_step_workspace`) and ``grad`` (*gshape, ndim), float64, C-contiguous."""
    return _sample_kernels()["_mi_step2_body" if ndim == 2 else "_mi_step3_body"]


def mi_step(fixed, points, maps, coeffs, moving, *, prior=None, moving_mask=False, bins=(32, 32),
            fixed_limits, moving_limits, thresholds, normalised=False, tiny=1e-16, backend=None):
    """One iteration's samples of a B-spline registration with Mattes mutual information, in one pass: the cost
    and its gradient with respect to the FFD coefficients.

    For each sample ``x_j`` (fixed-image index): ``f_j = F(x_j)`` (linear), ``y_j = A₀ x_j + b₀`` (index → world,
    then the initial transform), ``y_j ← y_j + P(A₁ y_j + b₁)`` with a dense prior displacement ``P`` (linear, zero
    outside; optional), ``q_j = A₂ y_j + b₂`` (grid index), ``z_j = y_j + u(q_j)`` (the FFD, zero outside ITK's
    valid region ``1 <= q_d <= gshape_d − 2``), then at ``A₃ z_j + b₃`` the moving value ``m_j`` (linear, as
    :func:`classreg.kernels.sampling.linear_at`) and the exact gradient of that interpolant (piecewise constant
    across cells, as ITK/elastix's linear interpolators differentiate; the gradient channels of ``moving`` are not
    read), so the gradient below is the derivative of the cost. Samples outside the moving image (or, with
    ``moving_mask``, where its mask channel interpolates below 0.5) are dropped. The cost is the negative Mattes MI
    of the valid pairs (:func:`classreg.kernels.sampling.mattes_mi_fused`; Mattes et al., IEEE TMI 22(1):120-128,
    2003, eqs. 6-9) and the gradient the chain rule ``Σ_j ∂C/∂m_j ∇M(z_j)ᵀ ∂u/∂c (q_j)`` over the valid samples
    inside the grid (Klein et al., IJCV 81(3):227-239, 2009, eq. 3; the adjoint of :func:`samples`).

    Parameters
    ----------
    fixed : ndarray (*fshape, 1)
        Fixed image (float32 or float64); every point must lie inside its voxel-centre box.
    points : ndarray (N, ndim)
        Sample positions, fixed-image indices.
    maps : ndarray (4, ndim, ndim + 1)
        The affine maps ``[A_i | b_i]`` above: fixed index → world, world → prior index, world → grid index,
        world → moving index.
    coeffs : ndarray (*gshape, ndim)
        FFD coefficients (float64).
    moving : ndarray (*mshape, C)
        Moving value in channel 0; with ``moving_mask``, the mask in the last channel (the engine's stack: value and
        mask; channels between them are not read).
    prior : ndarray (*pshape, ndim), optional
        Dense prior displacement.
    bins, fixed_limits, moving_limits, thresholds, normalised, tiny
        As :func:`classreg.kernels.sampling.mattes_mi_fused` (``bins`` a pair).
    backend : {None, "numpy", "numba"}
        ``numpy``: the composition of the reference kernels (``linear_at``, :func:`samples`,
        :func:`scatter_samples`; the MI formulas of ``mattes_mi_fused`` run as plain Python).

    Returns
    -------
    value : float
        The cost (0 with fewer than two valid samples).
    grad : ndarray (*gshape, ndim)
    nvalid : int
    similarity : float
        NCC of the valid pairs (NaN when either side is constant).
    """
    fixed = np.ascontiguousarray(fixed)
    points = _check_points(points, fixed.ndim - 1, "points")
    nd = points.shape[1]
    coeffs = _f64(coeffs)
    maps = _f64(maps)
    if maps.shape != (4, nd, nd + 1) or coeffs.shape[-1] != nd or coeffs.ndim != nd + 1:
        raise ValueError(f"maps must be (4, {nd}, {nd + 1}) and coeffs (*gshape, {nd}), got {maps.shape}, "
                         f"{coeffs.shape}")
    moving = np.ascontiguousarray(moving)
    nbf, nbm = (int(b) for b in bins)
    par = np.array([*fixed_limits, *moving_limits, *thresholds, tiny], dtype=np.float64)
    if _resolve(backend, fixed, points, coeffs, moving) == "numba":
        flags = np.array([nbf, nbm, int(normalised), prior is not None, bool(moving_mask)], dtype=np.int64)
        pr = _f64(prior) if prior is not None else np.zeros((1,) * nd + (nd,))
        work = mi_step_workspace(len(points), nd)
        grad = np.empty(coeffs.shape)
        value, nvalid, sim = mi_step_kernel(nd)(fixed, points, maps, pr, coeffs, moving, flags, par, work, grad)
        return float(value), grad, int(nvalid), float(sim)
    def affine(k, a):
        return a @ maps[k, :, :nd].T + maps[k, :, nd]

    f = _linear_at_numpy(fixed, points)[0][:, 0]
    y = affine(0, points)
    if prior is not None:
        vals, inside = _linear_at_numpy(_f64(prior), affine(1, y))
        y[inside] += vals
    u, q, ingrid = samples(coeffs, y, maps[2, :, :nd], maps[2, :, nd], backend="numpy")
    vals, valid = _linear_at_numpy(moving, affine(3, y + u))
    if moving_mask:
        ok = vals[:, -1] >= 0.5
        valid[valid] = ok
        vals = vals[ok]
    if len(vals) < 2:
        return 0.0, np.zeros(coeffs.shape), len(vals), float("nan")
    fv, m = f[valid], vals[:, 0]
    value, dm = _mi_fused_numba(fv, m, nbf, nbm, *par[:6], bool(normalised), tiny)
    g_world = _linear_gradient_numpy(moving[..., 0], affine(3, y + u)[valid]) @ maps[3, :, :nd]
    use = valid & ingrid
    grad = scatter_samples(q, use, (dm[:, None] * g_world)[ingrid[valid]], coeffs.shape[:-1], backend="numpy")
    fc, mc = fv - fv.mean(), m - m.mean()
    den = float(np.dot(fc, fc)) * float(np.dot(mc, mc))
    return float(value), grad, len(m), float(np.dot(fc, mc) / np.sqrt(den)) if den > 0 else float("nan")
