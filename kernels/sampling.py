"""Per-sample kernels of the parametric engine: linear interpolation of a channels-last stack at scattered points
(value and gradient channels in one pass, with an inside test), and Mattes mutual information of paired samples
with its per-sample derivative (the Parzen joint histogram, numpy, and the fused numba pass).

Each has a numpy reference (the test oracle: ``linear_at(backend="numpy")``, :func:`parzen_mi` inside
``classreg.terms.measures.mattes_mi_samples(backend="numpy")``) and a numba version. The numba versions are serial:
a parametric registration evaluates a few thousand samples per iteration, where launching threads costs more than
the work (measured on 2 cores: ~0.2 ms per parallel launch against ~20 µs of work).
"""
from __future__ import annotations

import math

import numpy as np

from . import _backend

__all__ = ["bspline_at", "bspline_coefficients", "bspline_kernel", "linear_at", "linear_grad_at", "linear_grad_kernel", "linear_kernel", "mattes_mi_fused", "mattes_mi_kernel", "parzen_mi"]


# ------------------------------------------------------------------------------------------- linear interpolation
def _linear_at_numpy(stack, points):
    n = points.shape[1]
    shape = np.asarray(stack.shape[:n])
    inside = np.all((points >= 0.0) & (points <= shape - 1.0), axis=1)
    p = points[inside]
    base = np.clip(np.floor(p).astype(np.intp), 0, np.maximum(shape - 2, 0))
    t = p - base
    out = np.zeros((len(p), stack.shape[-1]))
    for corner in range(2 ** n):
        bits = [(corner >> (n - 1 - d)) & 1 for d in range(n)]
        w = np.ones(len(p))
        idx = []
        for d, b in enumerate(bits):
            w = w * (t[:, d] if b else 1.0 - t[:, d])
            idx.append(np.minimum(base[:, d] + b, shape[d] - 1))
        out += w[:, None] * stack[tuple(idx)]
    return out, inside


def _linear_gradient_numpy(image, points):
    """The exact gradient (index units) of the multilinear interpolant of ``image`` (*shape) at ``points`` (M, ndim)
    inside its voxel-centre box, with :func:`linear_at`'s cells (the last cell holds the far edge): piecewise
    constant along each axis, as ITK/elastix's linear interpolators differentiate."""
    n = points.shape[1]
    shape = np.asarray(image.shape)
    base = np.clip(np.floor(points).astype(np.intp), 0, np.maximum(shape - 2, 0))
    t = points - base
    g = np.zeros((len(points), n))
    for corner in range(2 ** n):
        bits = [(corner >> (n - 1 - d)) & 1 for d in range(n)]
        v = image[tuple(np.minimum(base[:, d] + b, shape[d] - 1) for d, b in enumerate(bits))]
        for d in range(n):
            w = np.full(len(points), 1.0 if bits[d] else -1.0)
            for e, b in enumerate(bits):
                if e != d:
                    w = w * (t[:, e] if b else 1.0 - t[:, e])
            g[:, d] += w * v
    return g


def _linear_grad_at_numpy(stack, points):
    vals, inside = _linear_at_numpy(stack, points)
    grad = _linear_gradient_numpy(stack[..., 0], points[inside])
    return np.concatenate([vals[:, :1], grad, vals[:, 1:]], axis=1), inside


def _linear_at2(stack, points, out, inside):
    n0, n1, nc = stack.shape
    count = 0
    for j in range(points.shape[0]):
        c0, c1 = points[j, 0], points[j, 1]
        if not (c0 >= 0.0 and c0 <= n0 - 1.0 and c1 >= 0.0 and c1 <= n1 - 1.0):
            inside[j] = False
            continue
        inside[j] = True
        i0 = min(int(c0), max(n0 - 2, 0))
        i1 = min(int(c1), max(n1 - 2, 0))
        t0, t1 = c0 - i0, c1 - i1
        j0, j1 = min(i0 + 1, n0 - 1), min(i1 + 1, n1 - 1)
        w00, w01 = (1.0 - t0) * (1.0 - t1), (1.0 - t0) * t1
        w10, w11 = t0 * (1.0 - t1), t0 * t1
        for c in range(nc):
            out[count, c] = (w00 * stack[i0, i1, c] + w01 * stack[i0, j1, c] + w10 * stack[j0, i1, c]
                             + w11 * stack[j0, j1, c])
        count += 1
    return count


def _linear_at3(stack, points, out, inside):
    n0, n1, n2, nc = stack.shape
    count = 0
    for j in range(points.shape[0]):
        c0, c1, c2 = points[j, 0], points[j, 1], points[j, 2]
        if not (c0 >= 0.0 and c0 <= n0 - 1.0 and c1 >= 0.0 and c1 <= n1 - 1.0 and c2 >= 0.0
                and c2 <= n2 - 1.0):
            inside[j] = False
            continue
        inside[j] = True
        i0 = min(int(c0), max(n0 - 2, 0))
        i1 = min(int(c1), max(n1 - 2, 0))
        i2 = min(int(c2), max(n2 - 2, 0))
        t0, t1, t2 = c0 - i0, c1 - i1, c2 - i2
        j0, j1, j2 = min(i0 + 1, n0 - 1), min(i1 + 1, n1 - 1), min(i2 + 1, n2 - 1)
        for c in range(nc):
            a = ((1.0 - t2) * stack[i0, i1, i2, c] + t2 * stack[i0, i1, j2, c]) * (1.0 - t1) + \
                ((1.0 - t2) * stack[i0, j1, i2, c] + t2 * stack[i0, j1, j2, c]) * t1
            b = ((1.0 - t2) * stack[j0, i1, i2, c] + t2 * stack[j0, i1, j2, c]) * (1.0 - t1) + \
                ((1.0 - t2) * stack[j0, j1, i2, c] + t2 * stack[j0, j1, j2, c]) * t1
            out[count, c] = (1.0 - t0) * a + t0 * b
        count += 1
    return count


def _linear_grad_at2(stack, points, out, inside):
    """As :func:`_linear_at2` for a value (and mask) stack: ``out`` rows are the value, the exact gradient (index
    units) of the bilinear interpolant, and the interpolated mask when ``stack`` has a second channel."""
    n0, n1, nc = stack.shape
    count = 0
    for j in range(points.shape[0]):
        c0, c1 = points[j, 0], points[j, 1]
        if not (c0 >= 0.0 and c0 <= n0 - 1.0 and c1 >= 0.0 and c1 <= n1 - 1.0):
            inside[j] = False
            continue
        inside[j] = True
        i0 = min(int(c0), max(n0 - 2, 0))
        i1 = min(int(c1), max(n1 - 2, 0))
        t0, t1 = c0 - i0, c1 - i1
        j0, j1 = min(i0 + 1, n0 - 1), min(i1 + 1, n1 - 1)
        v00 = 1.0 * stack[i0, i1, 0]
        v01 = 1.0 * stack[i0, j1, 0]
        v10 = 1.0 * stack[j0, i1, 0]
        v11 = 1.0 * stack[j0, j1, 0]
        a0 = v00 + t1 * (v01 - v00)
        a1 = v10 + t1 * (v11 - v10)
        out[count, 0] = a0 + t0 * (a1 - a0)
        out[count, 1] = a1 - a0
        out[count, 2] = (1.0 - t0) * (v01 - v00) + t0 * (v11 - v10)
        if nc > 1:
            out[count, 3] = ((1.0 - t0) * (1.0 - t1) * stack[i0, i1, 1] + (1.0 - t0) * t1 * stack[i0, j1, 1]
                             + t0 * (1.0 - t1) * stack[j0, i1, 1] + t0 * t1 * stack[j0, j1, 1])
        count += 1
    return count


def _linear_grad_at3(stack, points, out, inside):
    """The 3-D :func:`_linear_grad_at2`."""
    n0, n1, n2, nc = stack.shape
    count = 0
    for j in range(points.shape[0]):
        c0, c1, c2 = points[j, 0], points[j, 1], points[j, 2]
        if not (c0 >= 0.0 and c0 <= n0 - 1.0 and c1 >= 0.0 and c1 <= n1 - 1.0 and c2 >= 0.0
                and c2 <= n2 - 1.0):
            inside[j] = False
            continue
        inside[j] = True
        i0 = min(int(c0), max(n0 - 2, 0))
        i1 = min(int(c1), max(n1 - 2, 0))
        i2 = min(int(c2), max(n2 - 2, 0))
        t0, t1, t2 = c0 - i0, c1 - i1, c2 - i2
        j0, j1, j2 = min(i0 + 1, n0 - 1), min(i1 + 1, n1 - 1), min(i2 + 1, n2 - 1)
        v000 = 1.0 * stack[i0, i1, i2, 0]
        v001 = 1.0 * stack[i0, i1, j2, 0]
        v010 = 1.0 * stack[i0, j1, i2, 0]
        v011 = 1.0 * stack[i0, j1, j2, 0]
        v100 = 1.0 * stack[j0, i1, i2, 0]
        v101 = 1.0 * stack[j0, i1, j2, 0]
        v110 = 1.0 * stack[j0, j1, i2, 0]
        v111 = 1.0 * stack[j0, j1, j2, 0]
        a00 = v000 + t2 * (v001 - v000)
        a01 = v010 + t2 * (v011 - v010)
        a10 = v100 + t2 * (v101 - v100)
        a11 = v110 + t2 * (v111 - v110)
        b0 = a00 + t1 * (a01 - a00)
        b1 = a10 + t1 * (a11 - a10)
        e0 = (v001 - v000) + t1 * ((v011 - v010) - (v001 - v000))
        e1 = (v101 - v100) + t1 * ((v111 - v110) - (v101 - v100))
        out[count, 0] = b0 + t0 * (b1 - b0)
        out[count, 1] = b1 - b0
        out[count, 2] = (1.0 - t0) * (a01 - a00) + t0 * (a11 - a10)
        out[count, 3] = e0 + t0 * (e1 - e0)
        if nc > 1:
            out[count, 4] = (((1.0 - t2) * stack[i0, i1, i2, 1] + t2 * stack[i0, i1, j2, 1]) * (1.0 - t1)
                             + ((1.0 - t2) * stack[i0, j1, i2, 1] + t2 * stack[i0, j1, j2, 1]) * t1) * (1.0 - t0) \
                + (((1.0 - t2) * stack[j0, i1, i2, 1] + t2 * stack[j0, i1, j2, 1]) * (1.0 - t1)
                   + ((1.0 - t2) * stack[j0, j1, i2, 1] + t2 * stack[j0, j1, j2, 1]) * t1) * t0
        count += 1
    return count


_COMPILED = {}


def _compiled(name, func):
    if name not in _COMPILED:
        _COMPILED[name] = _backend.njit(cache=True, fastmath=False)(func)
    return _COMPILED[name]


def linear_kernel(ndim: int):
    """The compiled serial kernel behind :func:`linear_at` for ``ndim`` spatial axes (needs numba):
    ``fn(stack, points, out, inside) -> count`` with C-contiguous ``stack`` (*spatial, C) float32/float64, ``points``
    (N, ndim) float64, ``out`` (N, C) float64 and ``inside`` (N,) bool preallocated; the first ``count`` rows of
    ``out`` hold the inside points' values. For hot loops that validated their arrays once (no checks here)."""
    return _compiled(f"linear{ndim}", _linear_at2 if ndim == 2 else _linear_at3)


def linear_grad_kernel(ndim: int):
    """The compiled serial kernel ``fn(stack, points, out, inside) -> count`` of :func:`linear_kernel`'s contract for
    a value (and mask) stack (*spatial, 1 or 2): each inside point's row of ``out`` (N, 1 + ndim [+ 1]) holds the
    linearly interpolated value, the exact gradient of that interpolant in index units (piecewise constant across
    voxel faces: the derivative elastix's linear interpolator returns) and the interpolated mask; the kernel behind
    :func:`linear_grad_at`. Reading one value channel instead of a value/gradient stack keeps the scattered reads in a
    quarter of the memory."""
    return _compiled(f"linear_grad{ndim}", _linear_grad_at2 if ndim == 2 else _linear_grad_at3)


def linear_at(stack, points, *, backend=None):
    """Linear interpolation of ``stack`` at the points inside its voxel-centre box.

    Parameters
    ----------
    stack : ndarray, shape (*spatial, C)
        Channels-last float32 or float64 image (2 or 3 spatial axes), e.g. an image and its gradient components
        (float32 halves the memory traffic of the scattered reads; the weights and sums are float64).
    points : ndarray, shape (N, ndim)
        Continuous indices in array-axis order.
    backend : {None, "numpy", "numba"}

    Returns
    -------
    values : ndarray, shape (M, C)
        The interpolated channels of the M points with ``0 <= points[:, d] <= shape[d] - 1`` on every axis, in
        their order.
    inside : ndarray of bool, shape (N,)
        Which points those are.
    """
    return _scattered(stack, points, backend, gradient=False)


def linear_grad_at(stack, points, *, backend=None):
    """The linear interpolant of a value (and mask) stack and its exact gradient at the points inside its voxel-centre
    box.

    The gradient is the derivative of the multilinear interpolant itself (index units; piecewise constant across
    voxel faces), the derivative ITK's/elastix's ``LinearInterpolator`` returns (``EvaluateValueAndDerivative``),
    not an interpolation of central differences.

    Parameters
    ----------
    stack : ndarray, shape (*spatial, C)
        Channels-last float32 or float64 image (2 or 3 spatial axes), ``C`` = 1 (value) or 2 (value, mask).
    points : ndarray, shape (N, ndim)
        Continuous indices in array-axis order.
    backend : {None, "numpy", "numba"}

    Returns
    -------
    values : ndarray, shape (M, 1 + ndim [+ 1])
        For the M points inside (as :func:`linear_at`), in their order: the interpolated value, its gradient along
        each array axis, and the interpolated mask when ``C`` = 2.
    inside : ndarray of bool, shape (N,)
        Which points those are.
    """
    return _scattered(stack, points, backend, gradient=True)


def _scattered(stack, points, backend, *, gradient: bool):
    """:func:`linear_at` (``gradient=False``) or :func:`linear_grad_at`: checks, then the numpy reference or the
    compiled kernel."""
    stack = np.ascontiguousarray(stack, dtype=stack.dtype if stack.dtype in (np.float32, np.float64) else np.float64)
    points = np.ascontiguousarray(points, dtype=np.float64)
    n = points.shape[1] if points.ndim == 2 else -1
    if n not in (2, 3) or stack.ndim != n + 1 or (gradient and stack.shape[-1] not in (1, 2)):
        raise ValueError(f"points must be (N, 2|3) and stack (*spatial, {'1|2' if gradient else 'C'}) with that many "
                         f"spatial axes, got points {points.shape}, stack {stack.shape}")
    bk = _backend.resolve_backend(backend, stack, points)
    if bk == "numpy" or not _backend.HAVE_NUMBA:
        return (_linear_grad_at_numpy if gradient else _linear_at_numpy)(stack, points)
    out = np.empty((points.shape[0], (n if gradient else 0) + stack.shape[-1]))
    inside = np.empty(points.shape[0], dtype=np.bool_)
    count = (linear_grad_kernel if gradient else linear_kernel)(n)(stack, points, out, inside)
    return out[:count], inside


# ------------------------------------------------------------------------------------------- Parzen MI
def parzen_mi(fidx, xi_m, nbf, nbm):
    """The Parzen joint histogram of Mattes MI and a gatherer of its per-sample derivative (numpy; the reference of
    the fused kernel :func:`mattes_mi_fused`).

    Parameters
    ----------
    fidx : ndarray of int, shape (N,)
        Fixed bin of each sample (box window), in ``[0, nbf)``.
    xi_m : ndarray, shape (N,)
        Continuous moving bin coordinate of each sample (cubic B-spline window over bins ``floor(ξ) − 1 …
        floor(ξ) + 2``, clamped into ``[0, nbm)``).
    nbf, nbm : int
        Bin counts.

    Returns
    -------
    hist : ndarray, shape (nbf, nbm)
        Σ_j box · β³ (not normalised).
    gather : callable
        ``gather(table) -> (N,)``: ``Σ_i dβ³/dξ(bin_i) · table[fidx_j, bin_i]`` over each sample's four moving
        bins — the per-sample factor of ``∂MI/∂m_j`` for ``table = log(p / (p_F p_M))``.
    """
    fidx = np.asarray(fidx, dtype=np.intp)
    xi_m = np.asarray(xi_m, dtype=np.float64)
    base = np.floor(xi_m)
    first = np.clip(base.astype(np.intp) - 1, 0, nbm - 4)
    t = np.clip(xi_m - (first + 1), 0.0, 1.0)
    s = 1.0 - t
    t2, t3 = t * t, t * t * t
    w = np.stack([s * s * s / 6.0, (4.0 - 6.0 * t2 + 3.0 * t3) / 6.0, (1.0 + 3.0 * t + 3.0 * t2 - 3.0 * t3) / 6.0,
                  t3 / 6.0])
    dw = np.stack([-0.5 * s * s, -2.0 * t + 1.5 * t2, 0.5 + t - 1.5 * t2, 0.5 * t2])
    flat = ((fidx * nbm + first)[None, :] + np.arange(4)[:, None]).ravel()
    hist = np.bincount(flat, weights=w.ravel(), minlength=nbf * nbm).reshape(nbf, nbm)

    def gather(table):
        return np.sum(dw * table.ravel()[flat].reshape(4, -1), axis=0)
    return hist, gather


# ------------------------------------------------------------------------------------------- fused Mattes MI
def _limit_numba(x, lo_thr, hi_thr, lo_bnd, hi_bnd):
    """elastix's exponential limiter and its derivative (see classreg.terms.measures._exponential_limiter); a scalar
    body compiled for the CPU here and for the GPU by :mod:`.mattes_cuda` (``math``, not numpy)."""
    if x > hi_thr:
        k = hi_thr - hi_bnd
        if k < -1e-10:
            e = math.exp((x - hi_thr) / k)
            return hi_bnd + k * e, e
        return hi_bnd, 0.0
    if x < lo_thr:
        k = lo_thr - lo_bnd
        if k > 1e-10:
            e = math.exp((x - lo_thr) / k)
            return lo_bnd + k * e, e
        return lo_bnd, 0.0
    return x, 1.0


_limit = _limit_numba  # rebound to the compiled limiter in _compiled_mi


def _mi_setup(nbf, nbm, lof, hif, lom, him):
    """``(smallf, smallm, bsf, bsm)``: the bin offsets and widths of the fixed and moving histogram axes."""
    smallf = 0.001 * (hif - lof) / (nbf - 1)
    smallm = 0.001 * (him - lom) / (nbf - 3)  # elastix divides by the fixed bin count here
    bsf = min(max((hif - lof + 2.0 * smallf) / (nbf - 1), 1e-10), 1e10)
    bsm = min(max((him - lom + 2.0 * smallm) / (nbm - 3), 1e-10), 1e10)
    return smallf, smallm, bsf, bsm


def _mi_window(fv, mv, nbf, nbm, lof, hif, lom, him, tlo, thi, smallf, smallm, bsf, bsm):
    """One sample's Parzen window (the per-sample formula of Mattes MI, shared by the CPU kernels and the numba.cuda
    kernels of :mod:`.mattes_cuda`): its fixed bin ``fi`` (box window on the hard-limited fixed value), the first of
    its four moving bins ``b``, the window offset ``t`` in [0, 1] and the moving limiter's derivative ``d``."""
    f = min(max(fv, lof), hif)
    fi = int(math.floor((f - (lof - smallf)) / bsf + 0.5))
    fi = min(max(fi, 0), nbf - 1)
    m, d = _limit(mv, tlo, thi, lom, him)
    xim = (m - (lom - smallm)) / bsm + 1.0
    b = int(math.floor(xim)) - 1
    b = min(max(b, 0), nbm - 4)
    t = min(max(xim - (b + 1), 0.0), 1.0)
    return fi, b, t, d


def _mi_weights(t):
    """The cubic B-spline weights of the four moving bins ``b … b + 3`` at window offset ``t``."""
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    sixth = 1.0 / 6.0
    return (s * s * s * sixth, (4.0 - 6.0 * t2 + 3.0 * t3) * sixth, (1.0 + 3.0 * t + 3.0 * t2 - 3.0 * t3) * sixth,
            t3 * sixth)


def _mi_add(hist, fv, mv, nbf, nbm, lof, hif, lom, him, tlo, thi, smallf, smallm, bsf, bsm):
    """One sample into the Parzen histogram: returns its fixed bin, first moving bin, window offset ``t`` and the
    limiter's derivative."""
    fi, b, t, d = _mi_window(fv, mv, nbf, nbm, lof, hif, lom, him, tlo, thi, smallf, smallm, bsf, bsm)
    w0, w1, w2, w3 = _mi_weights(t)
    hist[fi, b] += w0
    hist[fi, b + 1] += w1
    hist[fi, b + 2] += w2
    hist[fi, b + 3] += w3
    return fi, b, t, d


def _mi_marginals(hist, n, nbf, nbm):
    """The joint histogram of ``n`` samples normalised, ``p``, and its marginals ``(p, p_F, p_M)``."""
    p = hist / n
    pf = np.zeros(nbf)
    pm = np.zeros(nbm)
    for i in range(nbf):
        for k in range(nbm):
            pf[i] += p[i, k]
            pm[k] += p[i, k]
    return p, pf, pm


def _mi_table(hist, n, nbf, nbm, normalised, tiny, bsm, table):
    """The cost of the histogram of ``n`` samples and the table of ``∂cost/∂hist`` gathered by :func:`_mi_grad`
    (filled into ``table``); returns ``(value, scale)``, ``scale = 0`` when the joint entropy vanishes (NMI)."""
    p, pf, pm = _mi_marginals(hist, n, nbf, nbm)
    table[:, :] = 0.0
    if normalised:
        hf = 0.0
        hm = 0.0
        hfm = 0.0
        lgm = np.zeros(nbm)
        for i in range(nbf):
            if pf[i] > tiny:
                hf -= pf[i] * np.log(pf[i])
        for k in range(nbm):
            if pm[k] > tiny:
                lgm[k] = np.log(pm[k])
                hm -= pm[k] * lgm[k]
        for i in range(nbf):
            for k in range(nbm):
                if p[i, k] > tiny:
                    lg = np.log(p[i, k])
                    hfm -= p[i, k] * lg
                    table[i, k] = lg
        if hfm <= 0.0:
            return -1.0, 0.0
        value = -(hf + hm) / hfm
        for i in range(nbf):
            for k in range(nbm):
                table[i, k] = -(-lgm[k] * hfm + (hf + hm) * table[i, k]) / (hfm * hfm)
        return value, 1.0 / (n * bsm)
    value = 0.0
    for i in range(nbf):
        for k in range(nbm):
            q = pf[i] * pm[k]
            if p[i, k] > tiny and q > tiny:
                table[i, k] = np.log(p[i, k] / q)
                value -= p[i, k] * table[i, k]
    return value, -1.0 / (n * bsm)


def _mi_grad(table, fi, b, t, d, scale):
    """``∂cost/∂m`` of one sample: the derivative of its moving window gathered from ``table``."""
    s = 1.0 - t
    t2 = t * t
    return scale * d * (-0.5 * s * s * table[fi, b] + (-2.0 * t + 1.5 * t2) * table[fi, b + 1]
                        + (0.5 + t - 1.5 * t2) * table[fi, b + 2] + 0.5 * t2 * table[fi, b + 3])


def _mi_pass(fv, mv, nbf, nbm, lof, hif, lom, him, tlo, thi):
    """The Parzen histogram of the samples and each sample's window: ``(hist, fidx, first, t, dlim, bsm)``."""
    n = fv.shape[0]
    smallf, smallm, bsf, bsm = _mi_setup(nbf, nbm, lof, hif, lom, him)
    fidx = np.empty(n, dtype=np.int64)
    first = np.empty(n, dtype=np.int64)
    tt = np.empty(n)
    dlim = np.empty(n)
    hist = np.zeros((nbf, nbm))
    for j in range(n):
        fidx[j], first[j], tt[j], dlim[j] = _mi_add(hist, fv[j], mv[j], nbf, nbm, lof, hif, lom, him, tlo, thi,
                                                    smallf, smallm, bsf, bsm)
    return hist, fidx, first, tt, dlim, bsm


def _mi_gather(table, fidx, first, tt, dlim, scale):
    """Every sample's ``∂cost/∂m`` (:func:`_mi_grad`)."""
    n = fidx.shape[0]
    grad = np.empty(n)
    for j in range(n):
        grad[j] = _mi_grad(table, fidx[j], first[j], tt[j], dlim[j], scale)
    return grad


def _mi_fused_numba(fv, mv, nbf, nbm, lof, hif, lom, him, tlo, thi, normalised, tiny):
    hist, fidx, first, tt, dlim, bsm = _mi_pass(fv, mv, nbf, nbm, lof, hif, lom, him, tlo, thi)
    table = np.empty((nbf, nbm))
    value, scale = _mi_table(hist, fv.shape[0], nbf, nbm, normalised, tiny, bsm, table)
    return value, _mi_gather(table, fidx, first, tt, dlim, scale)


def _mi_table_smooth(hist, n, nbf, nbm, eps, bsm, table):
    """:func:`_mi_table` of the smoothed MI, ``−MI = H_FM − H_F − H_M`` with every entropy ``H(q) = −Σ q log(q +
    eps)`` over all bins (:func:`classreg.terms.measures.mattes_mi_samples` with ``eps > 0``): ``table`` is
    ``−(H'(p) − H'(p_M))`` with ``H'(q) = −log(q + eps) − q / (q + eps)``, gathered with the scale ``−1 / (n ·
    binsize_M)`` as :func:`_mi_table`'s (``p_F`` does not move with the moving values; the device twin is
    :func:`classreg.kernels.mattes_cuda.mi_table`)."""
    p, pf, pm = _mi_marginals(hist, n, nbf, nbm)
    value = 0.0
    dm = np.empty(nbm)
    for i in range(nbf):
        value += pf[i] * np.log(pf[i] + eps)
    for k in range(nbm):
        value += pm[k] * np.log(pm[k] + eps)
        dm[k] = np.log(pm[k] + eps) + pm[k] / (pm[k] + eps)
    for i in range(nbf):
        for k in range(nbm):
            q = p[i, k]
            lg = np.log(q + eps)
            value -= q * lg
            table[i, k] = lg + q / (q + eps) - dm[k]
    return value, -1.0 / (n * bsm)


def _mi_smooth_numba(fv, mv, nbf, nbm, lof, hif, lom, him, tlo, thi, eps):
    """:func:`_mi_fused_numba` of the smoothed MI (:func:`_mi_table_smooth`)."""
    hist, fidx, first, tt, dlim, bsm = _mi_pass(fv, mv, nbf, nbm, lof, hif, lom, him, tlo, thi)
    table = np.empty((nbf, nbm))
    value, scale = _mi_table_smooth(hist, fv.shape[0], nbf, nbm, eps, bsm, table)
    return value, _mi_gather(table, fidx, first, tt, dlim, scale)


#: the Mattes MI helpers, compiled inline into the fused kernels (here and in classreg.kernels.bspline)
MI_HELPERS = ("_limit", "_mi_setup", "_mi_window", "_mi_weights", "_mi_add", "_mi_marginals", "_mi_table",
              "_mi_table_smooth", "_mi_grad", "_mi_pass", "_mi_gather")


def mi_namespace(ns):
    """``ns`` with the Mattes MI helpers bound to their compiled versions (for bodies that use them)."""
    ns = dict(ns)
    ns["np"] = np
    ns["math"] = math
    ns["_limit"] = _compiled("limit", _limit_numba)
    for name in MI_HELPERS[1:]:
        ns[name] = _backend.njit(inline="always")(_backend.rebind(globals()[name], ns))
    return ns


def _compiled_mi(smooth=False):
    key = "mi_smooth" if smooth else "mi"
    if key not in _COMPILED:
        body = _mi_smooth_numba if smooth else _mi_fused_numba
        _COMPILED[key] = _backend.njit(cache=True)(_backend.rebind(body, mi_namespace(globals())))
    return _COMPILED[key]


def mattes_mi_kernel():
    """The compiled kernel behind :func:`mattes_mi_fused` (needs numba): ``fn(fv, mv, nbf, nbm, lof, hif, lom, him,
    tlo, thi, normalised, tiny) -> (value, grad)`` with contiguous float64 ``fv``, ``mv``; no checks."""
    return _compiled_mi()


def mattes_mi_fused(fv, mv, nbf, nbm, fixed_limits, moving_limits, thresholds, *, normalised=False, tiny=1e-16,
                    eps=0.0):
    """Negative Mattes (or normalised) mutual information of paired samples and its per-sample derivative, in one
    numba pass: elastix's limiters, the box x cubic B-spline Parzen histogram, the marginals, the log-ratio table and
    the gather. The numpy reference is :func:`classreg.terms.measures.mattes_mi_samples` with
    ``backend="numpy"`` (same formulas, documented there); ``eps > 0`` is its smoothed MI (not with
    ``normalised``).

    Parameters
    ----------
    fv, mv : ndarray, shape (N,)
        Fixed and moving intensities.
    nbf, nbm : int
        Bin counts (>= 4).
    fixed_limits, moving_limits : (float, float)
        Histogram limits.
    thresholds : (float, float)
        Where the moving exponential limiter starts.

    Returns
    -------
    (float, ndarray)
        The cost and ``∂cost/∂mv``.
    """
    args = (np.ascontiguousarray(fv, dtype=np.float64), np.ascontiguousarray(mv, dtype=np.float64), int(nbf),
            int(nbm), float(fixed_limits[0]), float(fixed_limits[1]), float(moving_limits[0]),
            float(moving_limits[1]), float(thresholds[0]), float(thresholds[1]))
    if eps > 0:
        if normalised:
            raise ValueError("eps (the smoothed MI) is not defined for the normalised MI")
        value, grad = _compiled_mi(smooth=True)(*args, float(eps))
    else:
        value, grad = _compiled_mi()(*args, bool(normalised), float(tiny))
    return float(value), grad


#: voxels per block of the dense Mattes MI kernel: its per-block minima, maxima and histograms are combined in block
#: order, so the result does not depend on the thread count
DENSE_MI_BLOCK = 16384

prange = range  # numba.prange when compiled (_compiled_dense_mi)


def _dense_window(fv, wv, nbf, nbm, offf, invf, offm, invm):
    """:func:`_mi_window` for the dense kernel, whose limits come from the counted voxels themselves: every value lies
    between the limiters' thresholds (no clamp, no limiter, ``d = 1``), and the bin widths enter by their reciprocals
    (``invf``, ``invm``; ``off*`` = lower limit − small). Returns ``(fi, b, t)``."""
    fi = min(max(int((fv - offf) * invf + 0.5), 0), nbf - 1)
    xim = (wv - offm) * invm + 1.0
    b = min(max(int(xim) - 1, 0), nbm - 4)
    t = min(max(xim - (b + 1), 0.0), 1.0)
    return fi, b, t


def _mi_dense_numba(f, w, g, mask, nbf, nbm, ratio, normalised, tiny, out):
    """Mattes MI of two flat images and the steepest-descent field ``out = −∂cost/∂W · g`` (``g`` the flat,
    channels-last gradient of ``w``; 0 where ``mask`` is 0), in three passes over blocks of voxels: the limits
    (:func:`classreg.terms.measures.intensity_limits` of each image over the mask, the moving limiter's thresholds
    at the true moving min/max), the Parzen histogram, and the gather. Returns ``(value, count)``; ``count = 0``
    when no voxel is counted (``out`` untouched). ``mask`` of length 0 counts every voxel."""
    n = f.shape[0]
    nd = g.shape[0] // n if n else 1
    use_mask = mask.shape[0] == n
    blk = DENSE_MI_BLOCK
    nblk = (n + blk - 1) // blk
    part = np.empty((nblk, 4))
    cnt = np.zeros(nblk, dtype=np.int64)
    for b in prange(nblk):
        lf, hf, lw, hw = np.inf, -np.inf, np.inf, -np.inf
        c = 0
        for p in range(b * blk, min(n, (b + 1) * blk)):
            if use_mask and mask[p] == 0:
                continue
            fv = f[p]
            wv = w[p]
            lf = fv if fv < lf else lf
            hf = fv if fv > hf else hf
            lw = wv if wv < lw else lw
            hw = wv if wv > hw else hw
            c += 1
        part[b, 0], part[b, 1], part[b, 2], part[b, 3] = lf, hf, lw, hw
        cnt[b] = c
    count = 0
    lf, hf, lw, hw = np.inf, -np.inf, np.inf, -np.inf
    for b in range(nblk):
        count += cnt[b]
        lf = min(lf, part[b, 0])
        hf = max(hf, part[b, 1])
        lw = min(lw, part[b, 2])
        hw = max(hw, part[b, 3])
    if count == 0:
        return 0.0, 0
    lof, hif = lf - ratio * (hf - lf), hf + ratio * (hf - lf)
    lom, him = lw - ratio * (hw - lw), hw + ratio * (hw - lw)
    smallf, smallm, bsf, bsm = _mi_setup(nbf, nbm, lof, hif, lom, him)
    offf, invf, offm, invm = lof - smallf, 1.0 / bsf, lom - smallm, 1.0 / bsm
    hists = np.zeros((nblk, nbf, nbm))
    for b in prange(nblk):
        hb = hists[b]
        for p in range(b * blk, min(n, (b + 1) * blk)):
            if use_mask and mask[p] == 0:
                continue
            fi, first, t = _dense_window(f[p], w[p], nbf, nbm, offf, invf, offm, invm)
            w0, w1, w2, w3 = _mi_weights(t)
            hb[fi, first] += w0
            hb[fi, first + 1] += w1
            hb[fi, first + 2] += w2
            hb[fi, first + 3] += w3
    hist = np.zeros((nbf, nbm))
    for b in range(nblk):
        hist += hists[b]
    table = np.empty((nbf, nbm))
    value, scale = _mi_table(hist, count, nbf, nbm, normalised, tiny, bsm, table)
    for b in prange(nblk):
        for p in range(b * blk, min(n, (b + 1) * blk)):
            q = p * nd
            if use_mask and mask[p] == 0:
                for k in range(nd):
                    out[q + k] = 0.0
                continue
            fi, first, t = _dense_window(f[p], w[p], nbf, nbm, offf, invf, offm, invm)
            gr = _mi_grad(table, fi, first, t, 1.0, scale)
            for k in range(nd):
                out[q + k] = -gr * g[q + k]
    return value, count


def _compiled_dense_mi():
    if "dense_mi" not in _COMPILED:
        import numba

        ns = mi_namespace(globals())
        ns["prange"] = numba.prange
        ns["DENSE_MI_BLOCK"] = DENSE_MI_BLOCK
        ns["_dense_window"] = _backend.njit(inline="always")(_dense_window)
        _COMPILED["dense_mi"] = _backend.njit(parallel=True, cache=True)(_backend.rebind(_mi_dense_numba, ns))
    return _COMPILED["dense_mi"]


def dense_mi_descent(fixed, warped, grad_warped, *, mask=None, bins=(32, 32), limit_range_ratio=0.01,
                     normalised=False, tiny=1e-16):
    """Negative Mattes (or normalised) MI of two images over ``mask`` and its steepest-descent field
    ``−∂cost/∂W · ∇W``, in one parallel numba kernel: the dense form of :func:`mattes_mi_fused` for
    ``register_demons(metric="mi")``, with the default limits of :func:`classreg.terms.measures.mattes_mi` (each
    image's min/max over the mask, widened by ``limit_range_ratio``). The numpy reference is
    :meth:`classreg.terms.DataTerm.descent` with :func:`classreg.terms.measures.mattes_mi`; the histogram is summed
    per block of :data:`DENSE_MI_BLOCK` voxels in block order (equal to the reference to rounding, independent of
    the thread count).

    Parameters
    ----------
    fixed, warped : ndarray
        Real arrays of one shape (2-D or 3-D).
    grad_warped : ndarray, shape (*fixed.shape, ndim)
        The gradient of ``warped`` (array frame, per mm).
    mask : ndarray of bool, optional
        Voxels that count (all if None); the field is 0 elsewhere.
    bins : (int, int)
        Fixed and moving bin counts (>= 4).

    Returns
    -------
    (float, ndarray)
        The cost (nats) and the field, of ``warped``'s dtype (float64 unless ``warped`` is float32).
    """
    f = np.ascontiguousarray(fixed).reshape(-1)
    w = np.ascontiguousarray(warped).reshape(-1)
    g = np.ascontiguousarray(grad_warped).reshape(-1)
    if f.size != w.size or g.size != w.size * np.ndim(warped):
        raise ValueError(f"fixed, warped and grad_warped do not match: {np.shape(fixed)}, {np.shape(warped)}, "
                         f"{np.shape(grad_warped)}")
    m = np.empty(0, dtype=np.uint8) if mask is None else np.ascontiguousarray(mask, dtype=bool).reshape(-1).view(
        np.uint8)
    if m.size not in (0, f.size):
        raise ValueError(f"mask must have the images' shape {np.shape(fixed)}, got {np.shape(mask)}")
    dtype = np.float32 if np.asarray(warped).dtype == np.float32 else np.float64
    out = np.empty(g.size, dtype=dtype)
    value, count = _compiled_dense_mi()(f, w, g, m, int(bins[0]), int(bins[1]), float(limit_range_ratio),
                                        bool(normalised), float(tiny), out)
    if count == 0:
        raise ValueError("mask is empty (no voxel is True): pass mask=None to use every voxel")
    if not np.isfinite(value):
        raise ValueError("image contains NaN or Inf values; replace them (e.g. numpy.nan_to_num) or mask them out")
    return float(value), out.reshape(np.shape(grad_warped))


def _pearson_numba(a, b, mask):
    """``(n, Σ a_c b_c, Σ a_c², Σ b_c²)`` of the centred pairs over ``mask`` (length 0: every entry), two passes over
    blocks of :data:`DENSE_MI_BLOCK` entries in float64, partial sums combined in block order."""
    n = a.shape[0]
    use_mask = mask.shape[0] == n
    blk = DENSE_MI_BLOCK
    nblk = (n + blk - 1) // blk
    part = np.zeros((nblk, 3))
    for b_ in prange(nblk):
        sa = 0.0
        sb = 0.0
        c = 0.0
        for p in range(b_ * blk, min(n, (b_ + 1) * blk)):
            if use_mask and mask[p] == 0:
                continue
            sa += a[p]
            sb += b[p]
            c += 1.0
        part[b_, 0], part[b_, 1], part[b_, 2] = sa, sb, c
    tot = np.zeros(3)
    for b_ in range(nblk):  # in block order: the sums do not depend on the thread count
        tot += part[b_]
    cnt = tot[2]
    if cnt == 0:
        return 0, 0.0, 0.0, 0.0
    ma = tot[0] / cnt
    mb = tot[1] / cnt
    for b_ in prange(nblk):
        sab = 0.0
        saa = 0.0
        sbb = 0.0
        for p in range(b_ * blk, min(n, (b_ + 1) * blk)):
            if use_mask and mask[p] == 0:
                continue
            x = a[p] - ma
            y = b[p] - mb
            sab += x * y
            saa += x * x
            sbb += y * y
        part[b_, 0], part[b_, 1], part[b_, 2] = sab, saa, sbb
    tot[:] = 0.0
    for b_ in range(nblk):
        tot += part[b_]
    return int(cnt), tot[0], tot[1], tot[2]


def pearson_sums(a, b, mask=None):
    """``(n, Σ (a − ā)(b − b̄), Σ (a − ā)², Σ (b − b̄)²)`` over the entries where ``mask`` is set (all if None), for
    :func:`classreg.progress.similarity` on large host arrays: one parallel numba kernel, float64 sums, independent
    of the thread count."""
    if "pearson" not in _COMPILED:
        import numba

        ns = dict(globals())
        ns["prange"] = numba.prange
        _COMPILED["pearson"] = _backend.njit(parallel=True, cache=True)(_backend.rebind(_pearson_numba, ns))
    m = np.empty(0, dtype=np.uint8) if mask is None else np.ascontiguousarray(mask, dtype=bool).reshape(-1).view(
        np.uint8)
    return _COMPILED["pearson"](np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1), m)


# ------------------------------------------------------------------------------------------- B-spline interpolation
# Moving-image interpolation of B-spline order 2 or 3 at scattered points: value and the exact gradient of the
# interpolant (elastix BSplineInterpolator / ITK BSplineInterpolateImageFunction::EvaluateValueAndDerivative). The
# coefficients come from scipy.ndimage.spline_filter(image, order, mode="mirror") (once per level); indices outside
# the grid are mirrored without repeating the edge sample, as ITK does (k < 0 -> -k, k > n-1 -> 2(n-1) - k).
def _bspline_weights(x, order, w, dw):
    """Taps of one axis: ``w[0:order+1]``, ``dw[...]`` (the derivative) and the first index, for coordinate ``x``."""
    if order == 3:
        first = int(np.floor(x)) - 1
        t = x - (first + 1)
        s = 1.0 - t
        t2 = t * t
        w[0] = s * s * s / 6.0
        w[1] = (4.0 - 6.0 * t2 + 3.0 * t2 * t) / 6.0
        w[2] = (1.0 + 3.0 * t + 3.0 * t2 - 3.0 * t2 * t) / 6.0
        w[3] = t2 * t / 6.0
        dw[0] = -0.5 * s * s
        dw[1] = -2.0 * t + 1.5 * t2
        dw[2] = 0.5 + t - 1.5 * t2
        dw[3] = 0.5 * t2
    else:  # order 2: centred on the nearest sample
        c = int(np.floor(x + 0.5))
        first = c - 1
        u = x - c
        w[0] = 0.5 * (0.5 - u) * (0.5 - u)
        w[1] = 0.75 - u * u
        w[2] = 0.5 * (0.5 + u) * (0.5 + u)
        dw[0] = u - 0.5
        dw[1] = -2.0 * u
        dw[2] = u + 0.5
    return first


def _mirror(k, n):
    if n == 1:
        return 0
    period = 2 * (n - 1)
    k = abs(k) % period
    return period - k if k > n - 1 else k


def _bspline_at_numpy(coef, points, order):
    n = points.shape[1]
    shape = np.asarray(coef.shape)
    inside = np.all((points >= 0.0) & (points <= shape - 1.0), axis=1)
    p = points[inside]
    taps = order + 1
    w = np.zeros((len(p), n, 4))
    dw = np.zeros((len(p), n, 4))
    first = np.zeros((len(p), n), dtype=np.intp)
    for j in range(len(p)):
        for d in range(n):
            first[j, d] = _bspline_weights(p[j, d], order, w[j, d], dw[j, d])
    out = np.zeros((len(p), 1 + n))
    for offs in np.ndindex(*(taps,) * n):
        idx = tuple(np.array([_mirror(int(first[j, d] + offs[d]), coef.shape[d]) for j in range(len(p))],
                             dtype=np.intp) for d in range(n))
        c = coef[idx].astype(np.float64)
        wt = np.ones(len(p))
        for d in range(n):
            wt = wt * w[:, d, offs[d]]
        out[:, 0] += wt * c
        for g in range(n):
            wg = np.ones(len(p))
            for d in range(n):
                wg = wg * (dw[:, d, offs[d]] if d == g else w[:, d, offs[d]])
            out[:, 1 + g] += wg * c
    return out, inside


def _bspline_at2(coef, points, order, out, inside):
    n0, n1 = coef.shape
    taps = order + 1
    w = np.zeros((2, 4))
    dw = np.zeros((2, 4))
    i0 = np.zeros(4, dtype=np.intp)
    i1 = np.zeros(4, dtype=np.intp)
    count = 0
    for j in range(points.shape[0]):
        c0, c1 = points[j, 0], points[j, 1]
        if not (c0 >= 0.0 and c0 <= n0 - 1.0 and c1 >= 0.0 and c1 <= n1 - 1.0):
            inside[j] = False
            continue
        inside[j] = True
        f0 = _bspline_weights(c0, order, w[0], dw[0])
        f1 = _bspline_weights(c1, order, w[1], dw[1])
        for k in range(taps):
            i0[k] = _mirror(f0 + k, n0)
            i1[k] = _mirror(f1 + k, n1)
        v = 0.0
        g0 = 0.0
        g1 = 0.0
        for a in range(taps):
            r = 0.0
            rd = 0.0
            for b in range(taps):
                c = coef[i0[a], i1[b]]
                r += w[1, b] * c
                rd += dw[1, b] * c
            v += w[0, a] * r
            g0 += dw[0, a] * r
            g1 += w[0, a] * rd
        out[count, 0] = v
        out[count, 1] = g0
        out[count, 2] = g1
        count += 1
    return count


def _bspline_at3(coef, points, order, out, inside):
    n0, n1, n2 = coef.shape
    taps = order + 1
    w = np.zeros((3, 4))
    dw = np.zeros((3, 4))
    i0 = np.zeros(4, dtype=np.intp)
    i1 = np.zeros(4, dtype=np.intp)
    i2 = np.zeros(4, dtype=np.intp)
    count = 0
    for j in range(points.shape[0]):
        c0, c1, c2 = points[j, 0], points[j, 1], points[j, 2]
        if not (c0 >= 0.0 and c0 <= n0 - 1.0 and c1 >= 0.0 and c1 <= n1 - 1.0 and c2 >= 0.0
                and c2 <= n2 - 1.0):
            inside[j] = False
            continue
        inside[j] = True
        f0 = _bspline_weights(c0, order, w[0], dw[0])
        f1 = _bspline_weights(c1, order, w[1], dw[1])
        f2 = _bspline_weights(c2, order, w[2], dw[2])
        for k in range(taps):
            i0[k] = _mirror(f0 + k, n0)
            i1[k] = _mirror(f1 + k, n1)
            i2[k] = _mirror(f2 + k, n2)
        v = 0.0
        g0 = 0.0
        g1 = 0.0
        g2 = 0.0
        for a in range(taps):
            ra = 0.0
            ra1 = 0.0
            ra2 = 0.0
            for b in range(taps):
                rb = 0.0
                rb2 = 0.0
                for e in range(taps):
                    c = coef[i0[a], i1[b], i2[e]]
                    rb += w[2, e] * c
                    rb2 += dw[2, e] * c
                ra += w[1, b] * rb
                ra1 += dw[1, b] * rb
                ra2 += w[1, b] * rb2
            v += w[0, a] * ra
            g0 += dw[0, a] * ra
            g1 += w[0, a] * ra1
            g2 += w[0, a] * ra2
        out[count, 0] = v
        out[count, 1] = g0
        out[count, 2] = g1
        out[count, 3] = g2
        count += 1
    return count


def bspline_kernel(ndim: int):
    """The compiled serial kernel behind :func:`bspline_at` (needs numba): ``fn(coef, points, order, out, inside)
    -> count`` with C-contiguous float32 ``coef``, float64 ``points`` (N, ndim), ``out`` (N, 1 + ndim) float64 and
    ``inside`` (N,) bool preallocated; no checks."""
    key = f"bspline{ndim}"
    if key not in _COMPILED:
        helpers = {"np": np, "_bspline_weights": _compiled("bspline_weights", _bspline_weights),
                   "_mirror": _compiled("mirror", _mirror)}
        body = _backend.rebind(_bspline_at2 if ndim == 2 else _bspline_at3, helpers)
        _COMPILED[key] = _backend.njit(cache=True, fastmath=False)(body)
    return _COMPILED[key]


def bspline_coefficients(image, order):
    """B-spline coefficients of ``image`` for :func:`bspline_at` (scipy ``spline_filter``, mirror boundary as ITK),
    float32 C-contiguous. Order 0/1 interpolate the samples themselves (the image is returned)."""
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float64)
    if order > 1:
        image = ndimage.spline_filter(image, order=order, mode="mirror", output=np.float64)
    return np.ascontiguousarray(image, dtype=np.float32)


def bspline_at(coef, points, order, *, backend=None):
    """B-spline interpolation of order 2 or 3 at the points inside the voxel-centre box: the value and the exact
    gradient (array-index units) of the interpolant.

    Parameters
    ----------
    coef : ndarray, shape (*spatial)
        Coefficients from :func:`bspline_coefficients` (2 or 3 axes; float32 — the numba kernel is compiled for it).
    points : ndarray, shape (N, ndim)
        Continuous indices in array-axis order.
    order : {2, 3}
    backend : {None, "numpy", "numba"}

    Returns
    -------
    values : ndarray, shape (M, 1 + ndim)
        Value then ∂/∂index_d of the M inside points, in their order.
    inside : ndarray of bool, shape (N,)
    """
    if order not in (2, 3):
        raise ValueError(f"bspline_at interpolates with order 2 or 3, got {order}")
    coef = np.ascontiguousarray(coef, dtype=np.float32)
    points = np.ascontiguousarray(points, dtype=np.float64)
    n = points.shape[1] if points.ndim == 2 else -1
    if n not in (2, 3) or coef.ndim != n:
        raise ValueError(f"points must be (N, 2|3) and coef have that many axes, got points {points.shape}, "
                         f"coef {coef.shape}")
    bk = _backend.resolve_backend(backend, coef, points)
    if bk == "numpy" or not _backend.HAVE_NUMBA:
        return _bspline_at_numpy(coef, points, order)
    out = np.empty((points.shape[0], 1 + n))
    inside = np.empty(points.shape[0], dtype=np.bool_)
    count = bspline_kernel(n)(coef, points, int(order), out, inside)
    return out[:count], inside
