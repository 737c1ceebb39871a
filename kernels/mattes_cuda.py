"""Fused numba.cuda passes of one parametric Mattes-MI evaluation on the GPU (issue #26): one thread per sample.

:class:`classreg.solvers.parametric.device.DeviceBSplineMI` and ``DeviceAffineMI`` evaluate the cost and its
gradient as whole-array CuPy operations (the reference, and the path under the simulator); each operation is one
kernel launch, ~400-600 per B-spline evaluation. On a GPU these two kernels do the per-sample work instead, with the
small (bins × bins) table between them left to CuPy:

* :func:`_pass1_cuda` maps a sample ``y`` (mm) through the dense prior of earlier pieces (linear, zero outside) and
  the cubic B-spline displacement of its 4ⁿ control points (zero outside ITK's valid region ``1 <= q_d <= g_d − 2``;
  D. Rueckert et al., IEEE TMI 18(8):712-721, 1999, eq. 3-4) — or, for the affine family, only through the affine
  map to moving indices — interpolates the moving value (/mask) and its index gradient linearly (the gradient
  channels, or the exact gradient of the interpolant), tests validity (inside the moving image, mask >= 0.5) and
  adds the sample's Parzen window (box fixed × cubic B-spline moving, P. Mattes et al., IEEE TMI 22(1):120-128,
  2003, eqs. 3-5, elastix's limiters) to the joint histogram with atomic additions; it keeps what pass 2 needs per
  sample in a work row.
* :func:`_pass2_cuda` gathers ``∂C/∂m_j`` from the log-ratio table (Mattes eq. 12), adds the centred correlation
  sums and scatters ``∂C/∂m_j ∇M(z_j) β³(q_j − k)`` to the control points (S. Klein et al., IJCV 81(3):227-239,
  2009, eq. 3) — or, affine, the sums ``g = Σ_j ∂C/∂m_j ∇M``, ``G = Σ_j ∂C/∂m_j ∇M (y_j − c)ᵀ`` — atomically.

Everything is float64 (coordinates, weights, histogram, sums), as the CPU kernels accumulate; the moving stack is
read as stored (float32). Atomic additions make the summation order vary from run to run: the result agrees with
the array-module evaluation to rounding (``tests/test_device_residency.py``: 1e-12 relative), not bit for bit.

The accumulator ``acc`` (float64) holds, at the offsets below: the valid count, Σ f and Σ m of the valid samples,
the correlation sums Σ δf δm, Σ δf², Σ δm², the affine sums ``g`` (n) and ``G`` (n × n, row-major), then the
histogram (nbf × nbm). Work rows (``work``, (N, :func:`work_columns`) float64): valid flag, moving value,
histogram cell ``fi·nbm + first``, window offset ``t``, the limiter's derivative, ``∇_z M`` (n), the grid
coordinates ``q`` (n; 0 for the affine family).
Matrices enter as flat tuples: rows of 4 (``[A | o]`` padded to 3 × 4), the moving image's world → index matrix as
3 × 3; shapes padded to 3 with 1.
"""
from __future__ import annotations

import functools
import math

from . import _backend

# elastix's exponential limiter: one scalar body compiled for the CPU (kernels.sampling) and the GPU (here)
from .sampling import _limit_numba

__all__ = ["ACC_COUNT", "ACC_FM", "ACC_CORR", "ACC_AFFINE", "ACC_HIST", "work_columns", "cuda_kernels"]

ACC_COUNT, ACC_FM, ACC_CORR, ACC_AFFINE, ACC_HIST = 0, 1, 3, 6, 18


def work_columns(n):
    """Columns of a work row for ``n`` spatial axes."""
    return 5 + 2 * n


# Rebound by the builder: numba.cuda, numba's float64 / int64 types (local arrays) and the number of spatial axes (a
# compile-time constant per variant: the loops over axes, corners and taps have constant trip counts).
cuda = None
f8 = None
i8 = None
NDIM = 3


# ------------------------------------------------------------------------------------------- scalar device bodies
# (``_lo``/``_hi`` instead of the builtins ``min``/``max``: numba's own CUDA target, which numba 0.68 still ships,
# fails to compile their float overload; numba-cuda compiles both)
def _lo(a, b):
    return a if a < b else b


def _hi(a, b):
    return a if a > b else b


def _affine_row(rows, a, p, n):
    """``rows[a] · [p; 1]`` (rows flat, 4 per row), summed left to right then the offset."""
    s = 0.0
    for k in range(n):
        s += rows[4 * a + k] * p[k]
    return s + rows[4 * a + n]


def _linear(flat, shape, c, n, exact, base, tt, out):
    """Linear interpolation of the channels of ``flat`` (voxels, C) of an image of ``shape`` (padded tuple) at the
    index coordinates ``c`` into ``out`` (the value/gradient stack layout: with ``exact`` the value, its index
    gradient (that of the interpolant, piecewise constant) and the other channels; else the channels); returns
    whether ``c`` is inside ``[0, shape − 1]`` on every axis (points outside are clamped, as the array path)."""
    inside = True
    for a in range(n):
        hi = shape[a] - 1.0
        ca = c[a]
        if not (ca >= 0.0 and ca <= hi):
            inside = False
        ca = ca if ca == ca else 0.0
        ca = _lo(_hi(ca, 0.0), hi)
        i = _lo(int(math.floor(ca)), _hi(shape[a] - 2, 0))
        base[a] = i
        tt[a] = ca - i
    nch = flat.shape[1]
    ncol = nch + n if exact else nch
    for k in range(ncol):
        out[k] = 0.0
    for corner in range(1 << n):
        w = 1.0
        idx = 0
        stride = 1
        for a in range(n - 1, -1, -1):
            bit = (corner >> (n - 1 - a)) & 1
            idx += _lo(base[a] + bit, shape[a] - 1) * stride
            stride *= shape[a]
            w *= tt[a] if bit else 1.0 - tt[a]
        if exact:
            v0 = flat[idx, 0]
            out[0] += w * v0
            for a in range(n):  # ∂w/∂c_a: the other axes' factors, ±1 along a
                d = 1.0
                for e in range(n):
                    bit = (corner >> (n - 1 - e)) & 1
                    if e == a:
                        d *= 1.0 if bit else -1.0
                    else:
                        d *= tt[e] if bit else 1.0 - tt[e]
                out[1 + a] += d * v0
            for ch in range(1, nch):
                out[n + ch] += w * flat[idx, ch]
        else:
            for ch in range(nch):
                out[ch] += w * flat[idx, ch]
    return inside


def _w4(t, w):
    """Cubic B-spline weights of the taps ``floor(q) − 1 … floor(q) + 2`` for ``t = q − floor(q)`` into ``w``
    (as :func:`classreg.kernels.bspline._w4`)."""
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    sixth = 1.0 / 6.0
    w[0] = s * s * s * sixth
    w[1] = (3.0 * t3 - 6.0 * t2 + 4.0) * sixth
    w[2] = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) * sixth
    w[3] = t3 * sixth


def _taps(q, gshape, n, start, wq):
    """The first tap ``r − 1`` and the four weights per axis (``wq`` (3, 4)) of grid point ``q``; False outside the
    valid region ``1 <= q_d <= g_d − 2`` (then no tap counts)."""
    for a in range(n):
        if not (q[a] >= 1.0 and q[a] <= gshape[a] - 2.0):
            return False
    for a in range(n):
        r = _lo(int(math.floor(q[a])), gshape[a] - 3)
        start[a] = r - 1
        _w4(q[a] - r, wq[a])
    return True


def _tap(k, n, gshape, start, wq):
    """Flat control-point index and weight of tap ``k`` (0 … 4ⁿ − 1, axis 0 slowest)."""
    idx = 0
    stride = 1
    w = 1.0
    for a in range(n - 1, -1, -1):
        o = (k >> (2 * (n - 1 - a))) & 3
        idx += (start[a] + o) * stride
        stride *= gshape[a]
        w *= wq[a, o]
    return idx, w


# ------------------------------------------------------------------------------------------------------- kernels
def _pass1_cuda(y, f, pflat, pshape, prows, has_prior, cflat, gshape, grows, has_grid, mflat, mshape, mrows, exact,
                has_mask, mlin, nbf, nbm, mi, work, acc):
    """Per sample: the map to the moving image, its value and gradient, validity, the Parzen histogram (see the
    module docstring). ``mi`` = (lof, hif, lom, him, tlo, thi, smallf, smallm, bsf, bsm)."""
    j = cuda.grid(1)
    if j >= y.shape[0]:
        return
    n = NDIM
    z = cuda.local.array(3, f8)
    c = cuda.local.array(3, f8)
    q = cuda.local.array(3, f8)
    tt = cuda.local.array(3, f8)
    base = cuda.local.array(3, i8)
    vals = cuda.local.array(5, f8)
    wq = cuda.local.array((3, 4), f8)
    for a in range(n):
        z[a] = y[j, a]
        q[a] = 0.0  # stays 0 without a grid (affine)
    if has_prior:  # the earlier pieces' displacement, linear, zero outside
        for a in range(n):
            c[a] = _affine_row(prows, a, z, n)
        if _linear(pflat, pshape, c, n, False, base, tt, vals):
            for a in range(n):
                z[a] += vals[a]
    if has_grid:  # the cubic B-spline displacement of the 4ⁿ control points
        for a in range(n):
            q[a] = _affine_row(grows, a, z, n)
        if _taps(q, gshape, n, base, wq):
            for a in range(n):
                c[a] = 0.0
            for k in range(1 << (2 * n)):
                idx, w = _tap(k, n, gshape, base, wq)
                for a in range(n):
                    c[a] += w * cflat[idx, a]
            for a in range(n):
                z[a] += c[a]
    for a in range(n):
        c[a] = _affine_row(mrows, a, z, n)
    valid = _linear(mflat, mshape, c, n, exact, base, tt, vals)
    if has_mask:
        valid = valid and vals[n + 1] >= 0.5
    if not valid:
        work[j, 0] = 0.0
        return
    lof, hif, lom, him, tlo, thi, smallf, smallm, bsf, bsm = mi
    mv = vals[0]
    fc = _lo(_hi(f[j], lof), hif)
    fi = _lo(_hi(int(math.floor((fc - (lof - smallf)) / bsf + 0.5)), 0), nbf - 1)
    m, dlim = _limit_numba(mv, tlo, thi, lom, him)
    xim = (m - (lom - smallm)) / bsm + 1.0
    first = _lo(_hi(int(math.floor(xim)) - 1, 0), nbm - 4)
    t = _lo(_hi(xim - (first + 1), 0.0), 1.0)
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    sixth = 1.0 / 6.0
    cell = fi * nbm + first
    cuda.atomic.add(acc, ACC_HIST + cell, s * s * s * sixth)
    cuda.atomic.add(acc, ACC_HIST + cell + 1, (4.0 - 6.0 * t2 + 3.0 * t3) * sixth)
    cuda.atomic.add(acc, ACC_HIST + cell + 2, (1.0 + 3.0 * t + 3.0 * t2 - 3.0 * t3) * sixth)
    cuda.atomic.add(acc, ACC_HIST + cell + 3, t3 * sixth)
    cuda.atomic.add(acc, ACC_COUNT, 1.0)
    cuda.atomic.add(acc, ACC_FM, f[j])
    cuda.atomic.add(acc, ACC_FM + 1, mv)
    work[j, 0] = 1.0
    work[j, 1] = mv
    work[j, 2] = cell
    work[j, 3] = t
    work[j, 4] = dlim
    for a in range(n):  # ∇_z M = m_linᵀ ∇_idx M
        g = 0.0
        for k in range(n):
            g += mlin[3 * k + a] * vals[1 + k]
        work[j, 5 + a] = g
        work[j, 5 + n + a] = q[a]


def _pass2_cuda(y, f, work, table, bsm, gshape, has_grid, center, acc, grad):
    """Per valid sample: ``∂C/∂m_j`` from the table, the correlation sums and the chain rule, scattered atomically
    to the control points (``grad``, flat ``index · n + axis``) or, affine, to the sums ``g``, ``G`` in ``acc``."""
    j = cuda.grid(1)
    if j >= y.shape[0] or work[j, 0] == 0.0:
        return
    n = NDIM
    cnt = _hi(acc[ACC_COUNT], 1.0)
    mv = work[j, 1]
    cell = int(work[j, 2])
    t = work[j, 3]
    s = 1.0 - t
    t2 = t * t
    dm = (-1.0 / (cnt * bsm)) * work[j, 4] * (-0.5 * s * s * table[cell] + (-2.0 * t + 1.5 * t2) * table[cell + 1]
                                               + (0.5 + t - 1.5 * t2) * table[cell + 2] + 0.5 * t2 * table[cell + 3])
    da = f[j] - acc[ACC_FM] / cnt
    db = mv - acc[ACC_FM + 1] / cnt
    cuda.atomic.add(acc, ACC_CORR, da * db)
    cuda.atomic.add(acc, ACC_CORR + 1, da * da)
    cuda.atomic.add(acc, ACC_CORR + 2, db * db)
    if has_grid:
        q = cuda.local.array(3, f8)
        start = cuda.local.array(3, i8)
        wq = cuda.local.array((3, 4), f8)
        for a in range(n):
            q[a] = work[j, 5 + n + a]
        if _taps(q, gshape, n, start, wq):
            for k in range(1 << (2 * n)):
                idx, w = _tap(k, n, gshape, start, wq)
                for a in range(n):
                    cuda.atomic.add(grad, idx * n + a, w * (dm * work[j, 5 + a]))
        return
    for a in range(n):
        gw = dm * work[j, 5 + a]
        cuda.atomic.add(acc, ACC_AFFINE + a, gw)
        for k in range(n):
            cuda.atomic.add(acc, ACC_AFFINE + n + n * a + k, gw * (y[j, k] - center[k]))


_BODIES = (_lo, _hi, _affine_row, _linear, _w4, _taps, _tap, _limit_numba)
_KERNELS = (_pass1_cuda, _pass2_cuda)


@functools.cache
def cuda_kernels(ndim: int):
    """Compile (lazily) the two passes for ``ndim`` (2 or 3) spatial axes; returns ``{"pass1": kernel, "pass2":
    kernel}``. The kernels are cached on disk (:func:`classreg.kernels._backend.cuda_jit`) under names that carry
    ``ndim`` (the only thing the variants bind differently)."""
    import numba
    from numba import cuda as nb_cuda

    ns = dict(globals(), cuda=nb_cuda, f8=numba.float64, i8=numba.int64, NDIM=int(ndim))
    sfx = f"_{int(ndim)}d"
    for fn in _BODIES:
        ns[fn.__name__] = _backend.cuda_jit(_backend.rebind(fn, ns, sfx), device=True)
    return {fn.__name__[1:6]: _backend.cuda_jit(_backend.rebind(fn, ns, sfx)) for fn in _KERNELS}
