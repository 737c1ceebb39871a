"""Differentiable linear sampling and the transposes that adjoint (reverse-sweep) gradients need.

They serve the exact discrete adjoint of LDDMM geodesic shooting (Vialard et al., IJCV 2012) integrated by a
semi-Lagrangian scheme with map composition: the reverse sweep of that discrete step, a chain of elementary transposes.

* :func:`sample_linear` -- (multi)linear interpolation of a scalar or channels-last image at per-voxel continuous
  indices, with the coordinate clamped to the grid ("border" extension), and optionally the **exact** derivative of
  that interpolant with respect to the sample position (a resampled finite difference is not the derivative of the
  interpolant and makes the gradient inexact).
* :func:`splat_linear` -- its transpose with respect to the image: scatter-add of values with the same weights.
* :func:`gradient_transpose` -- the exact transpose of :func:`classreg.kernels.diff.gradient` (central differences
  inside, one-sided at the borders: ``numpy.gradient`` with ``edge_order=1``), i.e. ``-div`` with the matching
  border rows, so that ``<gradient(f), g> == <f, gradient_transpose(g)>`` to rounding.

Boundary rule of the interpolant along each axis of length ``n >= 2``: the coordinate is clamped to ``[0, n - 1]``;
``j = min(floor(c), n - 2)``, ``t = c - j``, value ``(1 - t) f[j] + t f[j + 1]``; the derivative is
``f[j + 1] - f[j]`` for ``0 < c < n - 1`` and 0 outside (where the clamped interpolant is constant). At integer
coordinates the value equals the sample exactly.

The numpy functions are the references (test oracles); the ``"numba"`` paths compile the same arithmetic (gathers
parallel over the first axis; the scatter is a sequential loop, so there are no write races and the result does not
depend on the thread count). :func:`sample_linear` and :func:`splat_linear` also have a numba.cuda path (one thread
per point, the same per-point bodies; the scatter adds atomically); on the GPU the other kernels here run their
numpy reference as array-module (CuPy) code.
"""
from __future__ import annotations

import functools
import math
import types

import numpy as np

from . import _backend

__all__ = ["sample_linear", "splat_linear", "gradient_transpose", "det_cofactor", "jacobian_norm_max",
           "velocity_adjoint", "momentum_adjoint", "add_sample_adjoint"]


# ----------------------------------------------------------------------------------------------------------------
# argument handling
# ----------------------------------------------------------------------------------------------------------------
def _backend_for(backend, *arrays):
    return _backend.resolve_backend(backend, *arrays)


def _float(a, name):
    if not _backend.is_cupy_array(a):
        a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a


def _dtype(*arrays):
    return np.dtype(np.float64) if all(a.dtype == np.float64 for a in arrays) else np.dtype(np.float32)


def _check_coords(coords, spatial):
    nd = len(spatial)
    if coords.ndim < 2 or coords.shape[-1] != nd:
        raise ValueError(f"coords must have shape (*out_shape, {nd}) (continuous indices, array-axis order), "
                         f"got {coords.shape}")
    if any(n < 2 for n in spatial):
        raise ValueError(f"every spatial axis needs at least 2 samples, got spatial shape {tuple(spatial)}")


# ----------------------------------------------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------------------------------------------
def _axis_np(c, n):
    inside = (c > 0) & (c < n - 1)
    cc = np.clip(c, 0, n - 1)
    j = np.minimum(np.floor(cc), n - 2).astype(np.intp)
    t = cc - j
    return j, t.astype(c.dtype, copy=False), inside


def _sample_np(img, pts, grad):
    """img (*spatial, C), pts (N, nd) -> values (N, C) [, grads (N, C, nd)]."""
    nd = pts.shape[1]
    spatial = img.shape[:nd]
    axes = [_axis_np(pts[:, a], spatial[a]) for a in range(nd)]
    val = 0
    dv = [0] * nd
    for corner in range(2 ** nd):
        bits = [(corner >> (nd - 1 - a)) & 1 for a in range(nd)]
        idx = tuple(axes[a][0] + bits[a] for a in range(nd))
        f = img[idx]  # (N, C)
        w = 1
        for a in range(nd):
            t = axes[a][1]
            w = w * (t if bits[a] else 1 - t)
        val = val + w[:, None] * f
        if grad:
            for a in range(nd):
                wa = 1
                for b in range(nd):
                    if b != a:
                        t = axes[b][1]
                        wa = wa * (t if bits[b] else 1 - t)
                sgn = 1 if bits[a] else -1
                dv[a] = dv[a] + (sgn * wa)[:, None] * f
    if not grad:
        return val, None
    g = np.stack([dv[a] * axes[a][2][:, None] for a in range(nd)], axis=-1)
    return val, g


def _splat_np(vals, pts, spatial):
    """vals (N, C), pts (N, nd) -> (*spatial, C) scatter-add with the interpolation weights."""
    nd = pts.shape[1]
    C = vals.shape[1]
    axes = [_axis_np(pts[:, a], spatial[a]) for a in range(nd)]
    size = int(np.prod(spatial))
    out = np.zeros((size, C), dtype=vals.dtype)
    for corner in range(2 ** nd):
        bits = [(corner >> (nd - 1 - a)) & 1 for a in range(nd)]
        idx = tuple(axes[a][0] + bits[a] for a in range(nd))
        flat = np.ravel_multi_index(idx, spatial)
        w = 1
        for a in range(nd):
            t = axes[a][1]
            w = w * (t if bits[a] else 1 - t)
        for c in range(C):
            out[:, c] += np.bincount(flat, weights=w * vals[:, c], minlength=size).astype(vals.dtype, copy=False)
    return out.reshape(tuple(spatial) + (C,))


# ----------------------------------------------------------------------------------------------------------------
# numba paths: module-level templates compiled lazily by `_numba_kernels` (numba caches them on disk; a closure
# over compiled helpers inside the builder would get a new cache key in every process and recompile each time).
# `prange` and `_ax` are rebound to numba.prange and the compiled axis helper when compiling.
# ----------------------------------------------------------------------------------------------------------------
prange = range
# Float type of the per-point bodies: float64 on the CPU (its arithmetic for float32 data too), the data's type in the
# numba.cuda kernels (`_cuda_kernels`).
ft = np.float64


def _axis_scalar(c, n):
    inside = (c > ft(0.0)) and (c < ft(n) - ft(1.0))
    cc = c if c > ft(0.0) else ft(0.0)
    cc = cc if cc < ft(n) - ft(1.0) else ft(n) - ft(1.0)
    j = int(math.floor(cc))
    if j > n - 2:
        j = n - 2
    return j, cc - ft(j), inside


_ax = _axis_scalar
_at = None  # the per-point body a driver loops over (rebound when compiling)
cuda = None  # numba.cuda in the GPU drivers (rebound when compiling; the simulator swaps in its own module)


def _add_cpu(out, idx, x):
    out[idx] += x


def _add_cuda(out, idx, x):
    cuda.atomic.add(out, idx, x)


_add = _add_cpu


def _sample2_at(img, pts, val, grd, want, p):
    n0, n1, C = img.shape
    j0, t0, i0 = _ax(pts[p, 0], n0)
    j1, t1, i1 = _ax(pts[p, 1], n1)
    s0 = ft(1) - t0
    s1 = ft(1) - t1
    for c in range(C):
        v00 = img[j0, j1, c]
        v01 = img[j0, j1 + 1, c]
        v10 = img[j0 + 1, j1, c]
        v11 = img[j0 + 1, j1 + 1, c]
        val[p, c] = s0 * (s1 * v00 + t1 * v01) + t0 * (s1 * v10 + t1 * v11)
        if want:
            grd[p, c, 0] = (s1 * (v10 - v00) + t1 * (v11 - v01)) if i0 else ft(0.0)
            grd[p, c, 1] = (s0 * (v01 - v00) + t0 * (v11 - v10)) if i1 else ft(0.0)


def _sample2(img, pts, val, grd, want):
    for p in prange(pts.shape[0]):
        _at(img, pts, val, grd, want, p)


def _sample3_at(img, pts, val, grd, want, p):
    n0, n1, n2, C = img.shape
    j0, t0, i0 = _ax(pts[p, 0], n0)
    j1, t1, i1 = _ax(pts[p, 1], n1)
    j2, t2, i2 = _ax(pts[p, 2], n2)
    s0 = ft(1) - t0
    s1 = ft(1) - t1
    s2 = ft(1) - t2
    for c in range(C):
        v000 = img[j0, j1, j2, c]
        v001 = img[j0, j1, j2 + 1, c]
        v010 = img[j0, j1 + 1, j2, c]
        v011 = img[j0, j1 + 1, j2 + 1, c]
        v100 = img[j0 + 1, j1, j2, c]
        v101 = img[j0 + 1, j1, j2 + 1, c]
        v110 = img[j0 + 1, j1 + 1, j2, c]
        v111 = img[j0 + 1, j1 + 1, j2 + 1, c]
        a0 = s1 * (s2 * v000 + t2 * v001) + t1 * (s2 * v010 + t2 * v011)
        a1 = s1 * (s2 * v100 + t2 * v101) + t1 * (s2 * v110 + t2 * v111)
        val[p, c] = s0 * a0 + t0 * a1
        if want:
            grd[p, c, 0] = (a1 - a0) if i0 else ft(0.0)
            b0 = s2 * v000 + t2 * v001
            b1 = s2 * v010 + t2 * v011
            b2 = s2 * v100 + t2 * v101
            b3 = s2 * v110 + t2 * v111
            grd[p, c, 1] = (s0 * (b1 - b0) + t0 * (b3 - b2)) if i1 else ft(0.0)
            e0 = s1 * v000 + t1 * v010
            e1 = s1 * v001 + t1 * v011
            e2 = s1 * v100 + t1 * v110
            e3 = s1 * v101 + t1 * v111
            grd[p, c, 2] = (s0 * (e1 - e0) + t0 * (e3 - e2)) if i2 else ft(0.0)


def _sample3(img, pts, val, grd, want):
    for p in prange(pts.shape[0]):
        _at(img, pts, val, grd, want, p)


def _splat2_at(vals, pts, out, p):
    n0, n1, C = out.shape
    j0, t0, i0 = _ax(pts[p, 0], n0)
    j1, t1, i1 = _ax(pts[p, 1], n1)
    s0 = ft(1) - t0
    s1 = ft(1) - t1
    for c in range(C):
        a = vals[p, c]
        _add(out, (j0, j1, c), s0 * s1 * a)
        _add(out, (j0, j1 + 1, c), s0 * t1 * a)
        _add(out, (j0 + 1, j1, c), t0 * s1 * a)
        _add(out, (j0 + 1, j1 + 1, c), t0 * t1 * a)


def _splat2(vals, pts, out):
    for p in range(pts.shape[0]):
        _at(vals, pts, out, p)


def _splat3_at(vals, pts, out, p):
    n0, n1, n2, C = out.shape
    j0, t0, i0 = _ax(pts[p, 0], n0)
    j1, t1, i1 = _ax(pts[p, 1], n1)
    j2, t2, i2 = _ax(pts[p, 2], n2)
    s0 = ft(1) - t0
    s1 = ft(1) - t1
    s2 = ft(1) - t2
    for c in range(C):
        a = vals[p, c]
        _add(out, (j0, j1, j2, c), s0 * s1 * s2 * a)
        _add(out, (j0, j1, j2 + 1, c), s0 * s1 * t2 * a)
        _add(out, (j0, j1 + 1, j2, c), s0 * t1 * s2 * a)
        _add(out, (j0, j1 + 1, j2 + 1, c), s0 * t1 * t2 * a)
        _add(out, (j0 + 1, j1, j2, c), t0 * s1 * s2 * a)
        _add(out, (j0 + 1, j1, j2 + 1, c), t0 * s1 * t2 * a)
        _add(out, (j0 + 1, j1 + 1, j2, c), t0 * t1 * s2 * a)
        _add(out, (j0 + 1, j1 + 1, j2 + 1, c), t0 * t1 * t2 * a)


def _splat3(vals, pts, out):
    for p in range(pts.shape[0]):
        _at(vals, pts, out, p)


def _nb_idx(i, n):
    """Neighbours and divisor (in samples) of the numpy.gradient stencil (edge_order=1) at index i of n >= 2."""
    lo = i - 1 if i > 0 else 0
    hi = i + 1 if i < n - 1 else n - 1
    return lo, hi, hi - lo


_nb = _nb_idx


def _jnorm2(v, inv_h, out):
    # out[i] = max over the row i of the squared Frobenius norm of Dv (numpy.gradient stencil, physical units)
    n0, n1, C = v.shape
    h0 = inv_h[0]
    h1 = inv_h[1]
    for i in prange(n0):
        lo0, hi0, k0 = _nb(i, n0)
        best = 0.0
        for j in range(n1):
            lo1, hi1, k1 = _nb(j, n1)
            acc = 0.0
            for c in range(C):
                a = (v[hi0, j, c] - v[lo0, j, c]) * (h0 / k0)
                b = (v[i, hi1, c] - v[i, lo1, c]) * (h1 / k1)
                acc += a * a + b * b
            if acc > best:
                best = acc
        out[i] = best


def _jnorm3(v, inv_h, out):
    n0, n1, n2, C = v.shape
    h0 = inv_h[0]
    h1 = inv_h[1]
    h2 = inv_h[2]
    for i in prange(n0):
        lo0, hi0, k0 = _nb(i, n0)
        best = 0.0
        for j in range(n1):
            lo1, hi1, k1 = _nb(j, n1)
            for k in range(n2):
                lo2, hi2, k2 = _nb(k, n2)
                acc = 0.0
                for c in range(C):
                    a = (v[hi0, j, k, c] - v[lo0, j, k, c]) * (h0 / k0)
                    b = (v[i, hi1, k, c] - v[i, lo1, k, c]) * (h1 / k1)
                    e = (v[i, j, hi2, c] - v[i, j, lo2, c]) * (h2 / k2)
                    acc += a * a + b * b + e * e
                if acc > best:
                    best = acc
        out[i] = best


def _gradT2(W, wgt, inv_h, out):
    # out[x, c] += sum_j (D_j^T (wgt W[..., c, j]))(x) * inv_h[j]; D_j the numpy.gradient stencil (edge_order=1)
    n0, n1, C, _ = W.shape
    for i in prange(n0):
        for j in range(n1):
            for c in range(C):
                acc = 0.0
                # axis 0
                if i >= 2 and i - 1 <= n0 - 2:
                    acc += 0.5 * W[i - 1, j, c, 0] * wgt[i - 1, j] * inv_h[0]
                if i + 1 <= n0 - 2 and i + 1 >= 1:
                    acc -= 0.5 * W[i + 1, j, c, 0] * wgt[i + 1, j] * inv_h[0]
                if i == 1:
                    acc += W[0, j, c, 0] * wgt[0, j] * inv_h[0]
                if i == 0:
                    acc -= W[0, j, c, 0] * wgt[0, j] * inv_h[0]
                if i == n0 - 1:
                    acc += W[n0 - 1, j, c, 0] * wgt[n0 - 1, j] * inv_h[0]
                if i == n0 - 2:
                    acc -= W[n0 - 1, j, c, 0] * wgt[n0 - 1, j] * inv_h[0]
                # axis 1
                if j >= 2 and j - 1 <= n1 - 2:
                    acc += 0.5 * W[i, j - 1, c, 1] * wgt[i, j - 1] * inv_h[1]
                if j + 1 <= n1 - 2 and j + 1 >= 1:
                    acc -= 0.5 * W[i, j + 1, c, 1] * wgt[i, j + 1] * inv_h[1]
                if j == 1:
                    acc += W[i, 0, c, 1] * wgt[i, 0] * inv_h[1]
                if j == 0:
                    acc -= W[i, 0, c, 1] * wgt[i, 0] * inv_h[1]
                if j == n1 - 1:
                    acc += W[i, n1 - 1, c, 1] * wgt[i, n1 - 1] * inv_h[1]
                if j == n1 - 2:
                    acc -= W[i, n1 - 1, c, 1] * wgt[i, n1 - 1] * inv_h[1]
                out[i, j, c] += acc


def _gradT3(W, wgt, inv_h, out):
    n0, n1, n2, C, _ = W.shape
    for i in prange(n0):
        for j in range(n1):
            for k in range(n2):
                for c in range(C):
                    acc = 0.0
                    if i >= 2 and i - 1 <= n0 - 2:
                        acc += 0.5 * W[i - 1, j, k, c, 0] * wgt[i - 1, j, k] * inv_h[0]
                    if i + 1 <= n0 - 2 and i + 1 >= 1:
                        acc -= 0.5 * W[i + 1, j, k, c, 0] * wgt[i + 1, j, k] * inv_h[0]
                    if i == 1:
                        acc += W[0, j, k, c, 0] * wgt[0, j, k] * inv_h[0]
                    if i == 0:
                        acc -= W[0, j, k, c, 0] * wgt[0, j, k] * inv_h[0]
                    if i == n0 - 1:
                        acc += W[n0 - 1, j, k, c, 0] * wgt[n0 - 1, j, k] * inv_h[0]
                    if i == n0 - 2:
                        acc -= W[n0 - 1, j, k, c, 0] * wgt[n0 - 1, j, k] * inv_h[0]
                    if j >= 2 and j - 1 <= n1 - 2:
                        acc += 0.5 * W[i, j - 1, k, c, 1] * wgt[i, j - 1, k] * inv_h[1]
                    if j + 1 <= n1 - 2 and j + 1 >= 1:
                        acc -= 0.5 * W[i, j + 1, k, c, 1] * wgt[i, j + 1, k] * inv_h[1]
                    if j == 1:
                        acc += W[i, 0, k, c, 1] * wgt[i, 0, k] * inv_h[1]
                    if j == 0:
                        acc -= W[i, 0, k, c, 1] * wgt[i, 0, k] * inv_h[1]
                    if j == n1 - 1:
                        acc += W[i, n1 - 1, k, c, 1] * wgt[i, n1 - 1, k] * inv_h[1]
                    if j == n1 - 2:
                        acc -= W[i, n1 - 1, k, c, 1] * wgt[i, n1 - 1, k] * inv_h[1]
                    if k >= 2 and k - 1 <= n2 - 2:
                        acc += 0.5 * W[i, j, k - 1, c, 2] * wgt[i, j, k - 1] * inv_h[2]
                    if k + 1 <= n2 - 2 and k + 1 >= 1:
                        acc -= 0.5 * W[i, j, k + 1, c, 2] * wgt[i, j, k + 1] * inv_h[2]
                    if k == 1:
                        acc += W[i, j, 0, c, 2] * wgt[i, j, 0] * inv_h[2]
                    if k == 0:
                        acc -= W[i, j, 0, c, 2] * wgt[i, j, 0] * inv_h[2]
                    if k == n2 - 1:
                        acc += W[i, j, n2 - 1, c, 2] * wgt[i, j, n2 - 1] * inv_h[2]
                    if k == n2 - 2:
                        acc -= W[i, j, n2 - 1, c, 2] * wgt[i, j, n2 - 1] * inv_h[2]
                    out[i, j, k, c] += acc


def _detcof2(u, det, cof):
    # Jacobian A = I + Du of the map (index units, numpy.gradient stencil), its determinant and cofactor matrix
    n0, n1, _ = u.shape
    for i in prange(n0):
        lo0, hi0, k0 = _nb(i, n0)
        for j in range(n1):
            lo1, hi1, k1 = _nb(j, n1)
            a00 = 1.0 + (u[hi0, j, 0] - u[lo0, j, 0]) / k0
            a01 = (u[i, hi1, 0] - u[i, lo1, 0]) / k1
            a10 = (u[hi0, j, 1] - u[lo0, j, 1]) / k0
            a11 = 1.0 + (u[i, hi1, 1] - u[i, lo1, 1]) / k1
            det[i, j] = a00 * a11 - a01 * a10
            cof[i, j, 0, 0] = a11
            cof[i, j, 0, 1] = -a10
            cof[i, j, 1, 0] = -a01
            cof[i, j, 1, 1] = a00


def _detcof3(u, det, cof):
    n0, n1, n2, _ = u.shape
    for i in prange(n0):
        lo0, hi0, k0 = _nb(i, n0)
        for j in range(n1):
            lo1, hi1, k1 = _nb(j, n1)
            for k in range(n2):
                lo2, hi2, k2 = _nb(k, n2)
                a00 = 1.0 + (u[hi0, j, k, 0] - u[lo0, j, k, 0]) / k0
                a01 = (u[i, hi1, k, 0] - u[i, lo1, k, 0]) / k1
                a02 = (u[i, j, hi2, 0] - u[i, j, lo2, 0]) / k2
                a10 = (u[hi0, j, k, 1] - u[lo0, j, k, 1]) / k0
                a11 = 1.0 + (u[i, hi1, k, 1] - u[i, lo1, k, 1]) / k1
                a12 = (u[i, j, hi2, 1] - u[i, j, lo2, 1]) / k2
                a20 = (u[hi0, j, k, 2] - u[lo0, j, k, 2]) / k0
                a21 = (u[i, hi1, k, 2] - u[i, lo1, k, 2]) / k1
                a22 = 1.0 + (u[i, j, hi2, 2] - u[i, j, lo2, 2]) / k2
                c00 = a11 * a22 - a12 * a21
                c01 = a12 * a20 - a10 * a22
                c02 = a10 * a21 - a11 * a20
                cof[i, j, k, 0, 0] = c00
                cof[i, j, k, 0, 1] = c01
                cof[i, j, k, 0, 2] = c02
                cof[i, j, k, 1, 0] = a21 * a02 - a22 * a01
                cof[i, j, k, 1, 1] = a22 * a00 - a20 * a02
                cof[i, j, k, 1, 2] = a20 * a01 - a21 * a00
                cof[i, j, k, 2, 0] = a01 * a12 - a02 * a11
                cof[i, j, k, 2, 1] = a02 * a10 - a00 * a12
                cof[i, j, k, 2, 2] = a00 * a11 - a01 * a10
                det[i, j, k] = a00 * c00 + a01 * c01 + a02 * c02


def _vbar_k(ubar, du, coef, out):
    # out[p, j] = coef[j] * (ubar[p, j] + sum_c ubar[p, c] du[p, c, j])
    N, d = ubar.shape
    for p in prange(N):
        for j in range(d):
            acc = ubar[p, j]
            for c in range(d):
                acc += ubar[p, c] * du[p, c, j]
            out[p, j] = coef[j] * acc


def _pbar_k(g, mbar, det, Q, Pbar, Qbar, detbar):
    # Pbar = g . mbar, Qbar = Pbar det, detbar = Pbar Q
    N, d = g.shape
    for p in prange(N):
        acc = 0.0
        for j in range(d):
            acc += g[p, j] * mbar[p, j]
        Pbar[p] = acc
        Qbar[p] = acc * det[p]
        detbar[p] = acc * Q[p]


def _ubar_k(ubar, Qbar, Ibar, ds):
    # ubar[p, j] += Qbar[p] ds[p, 1, j] + Ibar[p] ds[p, 0, j]
    N, d = ubar.shape
    for p in prange(N):
        qb = Qbar[p]
        ib = Ibar[p]
        for j in range(d):
            ubar[p, j] += qb * ds[p, 1, j] + ib * ds[p, 0, j]


# Below this many samples the kernels run serially: a parallel region costs a thread-pool wake-up and barrier
# (~20 µs on an idle machine, but 5-15 ms per call on an oversubscribed 2-core machine, measured with the OpenMP
# layer), which dominates small grids (coarse pyramid levels, tests).
PARALLEL_MIN = 1 << 16


@functools.cache
def _numba_kernels(parallel=True):
    """The compiled kernels, parallel (``prange``) or serial variants (distinct cache keys via ``_suffix``)."""
    import numba

    from .smooth import _numba_compile

    ax = _backend.njit(inline="always")(_axis_scalar)
    nb = _backend.njit(inline="always")(_nb_idx)
    par = dict(parallel=True, prange=numba.prange) if parallel else dict(_suffix="_serial")
    add = _backend.njit(inline="always")(_add_cpu)
    at = {name: _numba_compile(fn, inline="always", _ax=ax, _add=add)
          for name, fn in (("s2", _sample2_at), ("s3", _sample3_at), ("p2", _splat2_at), ("p3", _splat3_at))}
    return types.SimpleNamespace(
        sample2=_numba_compile(_sample2, _at=at["s2"], **par),
        sample3=_numba_compile(_sample3, _at=at["s3"], **par),
        splat2=_numba_compile(_splat2, _at=at["p2"]),
        splat3=_numba_compile(_splat3, _at=at["p3"]),
        jnorm2=_numba_compile(_jnorm2, _nb=nb, **par),
        jnorm3=_numba_compile(_jnorm3, _nb=nb, **par),
        gradT2=_numba_compile(_gradT2, **par),
        gradT3=_numba_compile(_gradT3, **par),
        detcof2=_numba_compile(_detcof2, _nb=nb, **par),
        detcof3=_numba_compile(_detcof3, _nb=nb, **par),
        vbar=_numba_compile(_vbar_k, **par),
        pbar=_numba_compile(_pbar_k, **par),
        ubar=_numba_compile(_ubar_k, **par),
    )


def _sample_cuda(img, pts, val, grd, want):
    p = cuda.grid(1)
    if p < pts.shape[0]:
        _at(img, pts, val, grd, want, p)


def _splat_cuda(vals, pts, out):
    p = cuda.grid(1)
    if p < pts.shape[0]:
        _at(vals, pts, out, p)


@functools.cache
def _cuda_kernels(dtype="float64"):
    """The numba.cuda drivers for data of ``dtype``: one thread per sample point, the same per-point bodies as the
    CPU kernels with arithmetic in ``dtype`` (the CPU computes positions and weights in float64 for float32 data
    too); the scatter adds with ``cuda.atomic.add`` (the order of the additions into a voxel, hence the rounding,
    varies)."""
    from .smooth import _cuda_device, _cuda_kernel

    ft = np.dtype(dtype).type
    ax = _cuda_device(_axis_scalar, ft=ft)
    add = _cuda_device(_add_cuda)
    return types.SimpleNamespace(
        sample2=_cuda_kernel(_sample_cuda, _at=_cuda_device(_sample2_at, _ax=ax, ft=ft)),
        sample3=_cuda_kernel(_sample_cuda, _at=_cuda_device(_sample3_at, _ax=ax, ft=ft)),
        splat2=_cuda_kernel(_splat_cuda, _at=_cuda_device(_splat2_at, _ax=ax, _add=add, ft=ft)),
        splat3=_cuda_kernel(_splat_cuda, _at=_cuda_device(_splat3_at, _ax=ax, _add=add, ft=ft)),
    )


def _kern(size):
    """Kernel namespace for a problem of ``size`` samples (serial below :data:`PARALLEL_MIN`)."""
    return _numba_kernels(size >= PARALLEL_MIN)


# ----------------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------------
def sample_linear(image, coords, *, gradient=False, backend=None):
    """Linear interpolation of ``image`` at continuous indices ``coords`` (border-clamped), optionally with the
    exact derivative of the interpolant with respect to the sample position.

    Parameters
    ----------
    image : ndarray, shape ``(*spatial)`` or ``(*spatial, C)``
        Scalar or channels-last image; ``nd = coords.shape[-1]`` spatial axes (2 or 3), each with ≥ 2 samples.
    coords : ndarray, shape ``(*out_shape, nd)``
        Continuous indices in array-axis order (index k = centre of voxel k).
    gradient : bool
        Also return ``∂ value / ∂ coords`` (per index unit).
    backend : {None, "numpy", "numba", "cuda"}

    Returns
    -------
    values : ndarray, shape ``(*out_shape)`` or ``(*out_shape, C)``
    grad : ndarray, shape ``(*out_shape, nd)`` or ``(*out_shape, C, nd)`` (only with ``gradient=True``)
        float64 when both inputs are float64, float32 otherwise.
    """
    image = _float(image, "image")
    coords = _float(coords, "coords")
    b = _backend_for(backend, image, coords)
    xp = _backend.get_array_module(image, coords) if b == "cuda" else np
    nd = coords.shape[-1] if coords.ndim >= 2 else -1
    if nd not in (2, 3) or image.ndim not in (nd, nd + 1):
        raise ValueError(f"image must have shape (*spatial) or (*spatial, C) with nd = coords.shape[-1] in (2, 3) "
                         f"spatial axes; got image {image.shape}, coords {coords.shape}")
    spatial = image.shape[:nd]
    _check_coords(coords, spatial)
    dt = _dtype(image, coords)
    scalar = image.ndim == nd
    img = xp.ascontiguousarray(image, dtype=dt)
    if scalar:
        img = img[..., None]
    C = img.shape[-1]
    out_shape = coords.shape[:-1]
    pts = xp.ascontiguousarray(coords, dtype=dt).reshape(-1, nd)
    if b == "numpy":
        val, grd = _sample_np(img, pts, gradient)
        val = val.astype(dt, copy=False)
    elif b == "cuda":
        val = xp.empty((pts.shape[0], C), dtype=dt)
        grd = xp.empty((pts.shape[0], C, nd) if gradient else (1, 1, nd), dtype=dt)
        k = _cuda_kernels(np.dtype(dt).name)
        _backend.launch(k.sample2 if nd == 2 else k.sample3, pts.shape[0], img, pts, val, grd, bool(gradient))
    else:
        nk = _kern(pts.shape[0])
        val = np.empty((pts.shape[0], C), dtype=dt)
        grd = np.empty((pts.shape[0], C, nd) if gradient else (1, 1, nd), dtype=dt)
        (nk.sample2 if nd == 2 else nk.sample3)(img, pts, val, grd, bool(gradient))
    if scalar:
        val = val.reshape(out_shape)
        if gradient:
            grd = grd.reshape(out_shape + (nd,))
    else:
        val = val.reshape(out_shape + (C,))
        if gradient:
            grd = grd.reshape(out_shape + (C, nd))
    if gradient:
        return val, grd.astype(dt, copy=False)
    return val


def splat_linear(values, coords, shape, *, backend=None):
    """Transpose of :func:`sample_linear` with respect to the image: ``out[i] = Σ_p w_i(coords_p) values_p``.

    Parameters
    ----------
    values : ndarray, shape ``(*out_shape)`` or ``(*out_shape, C)``
    coords : ndarray, shape ``(*out_shape, nd)``
    shape : tuple of int
        Spatial shape of the image (nd entries, each ≥ 2).
    backend : {None, "numpy", "numba", "cuda"}
        "cuda" scatters with atomic additions: the order of the additions into a voxel varies, so the result
        agrees with the CPU paths to rounding, not bit for bit.

    Returns
    -------
    ndarray, shape ``(*shape)`` or ``(*shape, C)``
        ``<sample_linear(f, coords), values> == <f, splat_linear(values, coords, f.shape)>`` to rounding.
    """
    values = _float(values, "values")
    coords = _float(coords, "coords")
    b = _backend_for(backend, values, coords)
    xp = _backend.get_array_module(values, coords) if b == "cuda" else np
    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    if nd not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 entries, got {shape}")
    _check_coords(coords, shape)
    out_shape = coords.shape[:-1]
    if values.shape == out_shape:
        scalar = True
    elif values.ndim == len(out_shape) + 1 and values.shape[:-1] == out_shape:
        scalar = False
    else:
        raise ValueError(f"values must have shape {out_shape} or {out_shape + ('C',)}, got {values.shape}")
    dt = _dtype(values, coords)
    vals = xp.ascontiguousarray(values, dtype=dt).reshape(int(np.prod(out_shape)), -1)
    pts = xp.ascontiguousarray(coords, dtype=dt).reshape(-1, nd)
    if b == "numpy":
        out = _splat_np(vals, pts, shape)
    elif b == "cuda":
        out = xp.zeros(shape + (vals.shape[1],), dtype=dt)
        k = _cuda_kernels(np.dtype(dt).name)
        _backend.launch(k.splat2 if nd == 2 else k.splat3, pts.shape[0], vals, pts, out)
    else:
        nk = _kern(pts.shape[0])
        out = np.zeros(shape + (vals.shape[1],), dtype=dt)
        (nk.splat2 if nd == 2 else nk.splat3)(vals, pts, out)
    return out[..., 0] if scalar else out


def _gradT_axis(g, axis, h):
    """Transpose of the numpy.gradient stencil (edge_order=1, spacing h) along ``axis``."""
    xp = _backend.get_array_module(g)
    n = g.shape[axis]
    g = xp.moveaxis(g, axis, 0)
    out = xp.zeros_like(g)
    if n >= 3:
        half = g[1:-1] * g.dtype.type(0.5)
        out[2:] += half
        out[:-2] -= half
    out[1] += g[0]
    out[0] -= g[0]
    out[n - 1] += g[n - 1]
    out[n - 2] -= g[n - 1]
    if h != 1.0:
        out *= g.dtype.type(1.0 / h)
    return xp.moveaxis(out, 0, axis)


def gradient_transpose(g, *, spacing=1.0, ndim=None, weight=None, backend=None):
    """Exact transpose of :func:`classreg.kernels.diff.gradient`: ``Σ_d D_dᵀ g[..., d]`` (per channel).

    Parameters
    ----------
    g : ndarray, shape ``(*spatial, nd)`` or ``(*spatial, C, nd)``
        One component per spatial axis (array order), e.g. the adjoint of an image gradient; with channels, each
        channel ``g[..., c, :]`` is transposed separately.
    spacing : float or sequence of float
        Spacing per array axis (as passed to ``gradient``).
    ndim : int, optional
        Number of spatial axes: ``g.ndim - 1`` (default; scalar result) or ``g.ndim - 2`` (channels).
    weight : ndarray, shape ``(*spatial)``, optional
        Transpose ``weight · g`` instead of ``g`` (fused, no temporary).
    backend : {None, "numpy", "numba", "cuda"}

    Returns
    -------
    ndarray, shape ``(*spatial)`` or ``(*spatial, C)``
        ``<gradient(f, spacing=h), g> == <f, gradient_transpose(g, spacing=h)>``; inside the grid this is
        ``-divergence(g)``; the first two and last two rows of every axis carry the one-sided border stencils.
    """
    g = _float(g, "g")
    nd = g.ndim - 1 if ndim is None else int(ndim)
    chan = g.ndim == nd + 2
    if nd < 1 or g.shape[-1] != nd or g.ndim not in (nd + 1, nd + 2):
        raise ValueError(f"g must have shape (*spatial, nd) or (*spatial, C, nd) with nd = ndim spatial axes, got "
                         f"{g.shape} (ndim={ndim!r})")
    spatial = g.shape[:nd]
    if any(n < 2 for n in spatial):
        raise ValueError(f"every spatial axis needs at least 2 samples, got {g.shape}")
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    if not np.all(np.isfinite(h)) or np.any(h <= 0):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    if weight is not None:
        weight = _float(weight, "weight")
        if weight.shape != spatial:
            raise ValueError(f"weight must have shape {spatial}, got {weight.shape}")
    b = _backend_for(backend, g) if nd in (2, 3) else "numpy"
    dt = _dtype(g) if weight is None else _dtype(g, weight)
    g = g.astype(dt, copy=False)
    if b == "numba":
        W = np.ascontiguousarray(g if chan else g[..., None, :])
        wgt = np.ones(spatial, dtype=dt) if weight is None else np.ascontiguousarray(weight, dtype=dt)
        out = np.zeros(spatial + (W.shape[-2],), dtype=dt)
        nk = _kern(int(np.prod(spatial)))
        (nk.gradT2 if nd == 2 else nk.gradT3)(W, wgt, np.asarray(1.0 / h, dtype=dt), out)
        return out if chan else out[..., 0]
    if weight is not None:
        g = g * (weight.astype(dt, copy=False)[..., None, None] if chan else weight.astype(dt, copy=False)[..., None])
    if chan:  # the reference, also the CUDA path (array-module code on the device)
        return _backend.get_array_module(g).stack([gradient_transpose(g[..., c, :], spacing=spacing, backend=b)
                                                   for c in range(g.shape[-2])], axis=-1)
    out = _gradT_axis(g[..., 0], 0, float(h[0]))
    for d in range(1, nd):
        out += _gradT_axis(g[..., d], d, float(h[d]))
    return out


def det_cofactor(u, *, backend=None):
    """Determinant and cofactor matrix (= ∂det/∂A) of ``A = I + Du`` for a displacement ``u`` in index units.

    ``Du`` uses the stencil of :func:`classreg.kernels.diff.gradient` with unit spacing (central inside, one-sided
    at the borders), as :func:`classreg.kernels.diff.jacobian_determinant` does.

    Parameters
    ----------
    u : ndarray, shape ``(*spatial, nd)``, nd = 2 or 3
    backend : {None, "numpy", "numba", "cuda"}

    Returns
    -------
    det : ndarray, shape ``(*spatial)``
    cof : ndarray, shape ``(*spatial, nd, nd)``
        ``cof[..., i, j] = ∂ det / ∂ A[..., i, j]``.
    """
    u = _float(u, "u")
    nd = u.ndim - 1
    if nd not in (2, 3) or u.shape[-1] != nd:
        raise ValueError(f"u must have shape (*spatial, nd) with nd = 2 or 3, got {u.shape}")
    if any(n < 2 for n in u.shape[:nd]):
        raise ValueError(f"every spatial axis needs at least 2 samples, got {u.shape}")
    b = _backend_for(backend, u)
    xp = _backend.get_array_module(u) if b == "cuda" else np
    dt = _dtype(u)
    u = xp.ascontiguousarray(u, dtype=dt)
    if b == "numba":
        nk = _kern(int(np.prod(u.shape[:nd])))
        det = np.empty(u.shape[:nd], dtype=dt)
        cof = np.empty(u.shape[:nd] + (nd, nd), dtype=dt)
        (nk.detcof2 if nd == 2 else nk.detcof3)(u, det, cof)
        return det, cof
    # the reference, also the CUDA path (array-module code on the device)
    A = xp.stack([xp.stack(xp.gradient(u[..., i], axis=tuple(range(nd))), axis=-1) for i in range(nd)], axis=-2)
    A = A.astype(dt, copy=False)
    for r in range(nd):
        A[..., r, r] += dt.type(1)
    if nd == 2:
        det = A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0]
        cof = xp.empty_like(A)
        cof[..., 0, 0] = A[..., 1, 1]
        cof[..., 0, 1] = -A[..., 1, 0]
        cof[..., 1, 0] = -A[..., 0, 1]
        cof[..., 1, 1] = A[..., 0, 0]
        return det, cof
    a0, a1, a2 = A[..., 0, :], A[..., 1, :], A[..., 2, :]
    cof = xp.stack([xp.cross(a1, a2), xp.cross(a2, a0), xp.cross(a0, a1)], axis=-2)
    det = xp.sum(a0 * cof[..., 0, :], axis=-1)
    return det, cof


def jacobian_norm_max(v, *, spacing=1.0, backend=None):
    """``max_x ‖Dv(x)‖_F``: the largest Frobenius norm of the Jacobian of a vector field (a Lipschitz bound).

    Derivatives use the stencil of :func:`classreg.kernels.diff.gradient` (central inside, one-sided at the
    borders) in the units of ``spacing``. LDDMM uses ``δt · max ‖Dv‖`` as the stability number of a semi-Lagrangian
    step ``id − δt v``: the step map is invertible when ``δt · Lip(v) < 1``.

    Parameters
    ----------
    v : ndarray, shape ``(*spatial, C)``
        Channels-last field with 2 or 3 spatial axes (each ≥ 2 samples); C components (usually C = nd).
    spacing : float or sequence of float
        Spacing per spatial axis.
    backend : {None, "numpy", "numba", "cuda"}

    Returns
    -------
    float
    """
    v = _float(v, "v")
    nd = v.ndim - 1
    if nd not in (2, 3):
        raise ValueError(f"v must have shape (*spatial, C) with 2 or 3 spatial axes, got {v.shape}")
    if any(n < 2 for n in v.shape[:nd]):
        raise ValueError(f"every spatial axis needs at least 2 samples, got {v.shape}")
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    if not np.all(np.isfinite(h)) or np.any(h <= 0):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    b = _backend_for(backend, v)
    xp = _backend.get_array_module(v) if b == "cuda" else np
    dt = _dtype(v)
    v = xp.ascontiguousarray(v, dtype=dt)
    if b != "numba":  # the reference, also the CUDA path (array-module code on the device; one scalar read)
        acc = xp.zeros(v.shape[:nd], dtype=np.float64)
        for c in range(v.shape[-1]):
            for a, g in enumerate(xp.gradient(v[..., c], *[float(x) for x in h], axis=tuple(range(nd)))
                                  if nd > 1 else [xp.gradient(v[..., c], float(h[0]))]):
                acc += g.astype(np.float64) ** 2
        return float(xp.sqrt(acc.max()))
    nk = _kern(int(np.prod(v.shape[:nd])))
    out = np.zeros(v.shape[0], dtype=np.float64)
    (nk.jnorm2 if nd == 2 else nk.jnorm3)(v, np.asarray(1.0 / h, dtype=np.float64), out)
    return float(np.sqrt(out.max()))


# ----------------------------------------------------------------------------------------------------------------
# fused elementwise pieces of the LDDMM reverse sweep (classreg.solvers.lddmm.GeodesicShooting.gradient); the numpy
# branches are the references
# ----------------------------------------------------------------------------------------------------------------
def _flat(a, tail):
    return np.ascontiguousarray(a).reshape((-1,) + tail)


def velocity_adjoint(ubar, du, coef, *, backend=None):
    """``v̄_j = coef_j (ū_j + Σ_c ū_c ∂u_c/∂Y_j)``: adjoint of ``u_{k+1} = u_k(Y) − δt v/h`` w.r.t. ``v`` (with
    ``Y = x − δt v/h`` and ``coef = −δt/h``).

    Parameters
    ----------
    ubar : ndarray, shape ``(*spatial, d)``
    du : ndarray, shape ``(*spatial, d, d)``
        ``∂u_c/∂Y_j`` (the gradient output of :func:`sample_linear` for the field u).
    coef : sequence of d floats
    backend : {None, "numpy", "numba", "cuda"}

    Returns
    -------
    ndarray, shape ``(*spatial, d)``
    """
    b = _backend_for(backend, ubar, du)
    d = ubar.shape[-1]
    dt = _dtype(ubar, du)
    if b == "cuda":  # array-module code on the device (d coefficients go up as scalars)
        xp = _backend.get_array_module(ubar, du)
        c = coef.astype(dt) if _backend.is_cupy_array(coef) else xp.asarray(np.asarray(coef, dtype=dt))
        return (ubar + xp.einsum("...c,...cj->...j", ubar, du)) * c
    c = np.asarray(coef, dtype=dt)
    if b == "numpy":
        return (ubar + np.einsum("...c,...cj->...j", ubar, du)) * c
    out = np.empty(ubar.shape, dtype=dt)
    _kern(ubar.size // d).vbar(_flat(ubar.astype(dt, copy=False), (d,)), _flat(du.astype(dt, copy=False), (d, d)), c,
                          out.reshape(-1, d))
    return out


def momentum_adjoint(g, mbar, det, Q, *, backend=None):
    """``P̄ = g·m̄``, ``Q̄ = P̄ det``, ``dēt = P̄ Q`` (adjoints of ``m = P g`` and ``P = det Q``).

    Parameters
    ----------
    g, mbar : ndarray, shape ``(*spatial, d)``
    det, Q : ndarray, shape ``(*spatial)``
    backend : {None, "numpy", "numba", "cuda"}

    Returns
    -------
    Pbar, Qbar, detbar : ndarray, shape ``(*spatial)``
    """
    b = _backend_for(backend, g, mbar)
    dt = _dtype(g, mbar, det, Q)
    if b != "numba":  # the reference, also the CUDA path (array-module code on the device)
        Pbar = (g * mbar).sum(axis=-1)
        return Pbar, Pbar * det, Pbar * Q
    d = g.shape[-1]
    shp = g.shape[:-1]
    Pbar, Qbar, detbar = (np.empty(shp, dtype=dt) for _ in range(3))
    _kern(int(np.prod(shp))).pbar(_flat(g.astype(dt, copy=False), (d,)), _flat(mbar.astype(dt, copy=False), (d,)),
                          _flat(det.astype(dt, copy=False), ()), _flat(Q.astype(dt, copy=False), ()),
                          Pbar.reshape(-1), Qbar.reshape(-1), detbar.reshape(-1))
    return Pbar, Qbar, detbar


def add_sample_adjoint(ubar, Qbar, Ibar, ds, *, backend=None):
    """In place ``ū += Q̄ ∂P₀/∂X + Ī ∂I₀/∂X`` with ``ds[..., 0, :] = ∂I₀/∂X``, ``ds[..., 1, :] = ∂P₀/∂X`` (the
    gradient output of :func:`sample_linear` for the stacked source ``(I₀, P₀)``); returns ``ubar``.

    ``ubar`` must be a C-contiguous ``(*spatial, d)`` array of the working dtype.
    """
    b = _backend_for(backend, ubar, ds)
    if b != "numba" or not ubar.flags.c_contiguous:  # the reference, also the CUDA path (array-module code)
        ubar += Qbar[..., None] * ds[..., 1, :] + Ibar[..., None] * ds[..., 0, :]
        return ubar
    d = ubar.shape[-1]
    dt = ubar.dtype
    _kern(ubar.size // d).ubar(ubar.reshape(-1, d), _flat(Qbar.astype(dt, copy=False), ()),
                          _flat(Ibar.astype(dt, copy=False), ()), _flat(ds.astype(dt, copy=False), (2, d)))
    return ubar
