"""Differentiable linear sampling and the transposes that adjoint (reverse-sweep) gradients need (METHODS.md §1.2.4).

* :func:`sample_linear` -- (multi)linear interpolation of a scalar or channels-last image at per-voxel continuous
  indices, with the coordinate clamped to the grid ("border" extension), and optionally the **exact** derivative of
  that interpolant with respect to the sample position (not a resampled finite difference, METHODS §1.6).
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
depend on the thread count). No numba.cuda path yet: ``backend="cuda"`` is rejected (the GPU port would use atomics
for the scatter, METHODS §1.6).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _backend

__all__ = ["sample_linear", "splat_linear", "gradient_transpose"]


# ----------------------------------------------------------------------------------------------------------------
# argument handling
# ----------------------------------------------------------------------------------------------------------------
def _backend_for(backend, *arrays):
    b = _backend.resolve_backend(backend, *arrays)
    if b == "cuda":
        raise ValueError("kernels.adjoint has no CUDA path yet; use backend='numpy' or 'numba'")
    return b


def _float(a, name):
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
# numba paths
# ----------------------------------------------------------------------------------------------------------------
def _axis_scalar(c, n):
    inside = (c > 0.0) and (c < n - 1.0)
    cc = c if c > 0.0 else 0.0
    cc = cc if cc < n - 1.0 else n - 1.0
    j = int(math.floor(cc))
    if j > n - 2:
        j = n - 2
    return j, cc - j, inside


@functools.cache
def _numba_kernels():
    import numba

    njit = _backend.njit
    ax = njit(inline="always")(_axis_scalar)

    @njit(parallel=True)
    def sample2(img, pts, val, grd, want):
        n0, n1, C = img.shape
        N = pts.shape[0]
        for p in numba.prange(N):
            j0, t0, i0 = ax(pts[p, 0], n0)
            j1, t1, i1 = ax(pts[p, 1], n1)
            s0 = 1 - t0
            s1 = 1 - t1
            for c in range(C):
                v00 = img[j0, j1, c]
                v01 = img[j0, j1 + 1, c]
                v10 = img[j0 + 1, j1, c]
                v11 = img[j0 + 1, j1 + 1, c]
                val[p, c] = s0 * (s1 * v00 + t1 * v01) + t0 * (s1 * v10 + t1 * v11)
                if want:
                    grd[p, c, 0] = (s1 * (v10 - v00) + t1 * (v11 - v01)) if i0 else 0.0
                    grd[p, c, 1] = (s0 * (v01 - v00) + t0 * (v11 - v10)) if i1 else 0.0

    @njit(parallel=True)
    def sample3(img, pts, val, grd, want):
        n0, n1, n2, C = img.shape
        N = pts.shape[0]
        for p in numba.prange(N):
            j0, t0, i0 = ax(pts[p, 0], n0)
            j1, t1, i1 = ax(pts[p, 1], n1)
            j2, t2, i2 = ax(pts[p, 2], n2)
            s0 = 1 - t0
            s1 = 1 - t1
            s2 = 1 - t2
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
                    grd[p, c, 0] = (a1 - a0) if i0 else 0.0
                    b0 = s2 * v000 + t2 * v001
                    b1 = s2 * v010 + t2 * v011
                    b2 = s2 * v100 + t2 * v101
                    b3 = s2 * v110 + t2 * v111
                    grd[p, c, 1] = (s0 * (b1 - b0) + t0 * (b3 - b2)) if i1 else 0.0
                    e0 = s1 * v000 + t1 * v010
                    e1 = s1 * v001 + t1 * v011
                    e2 = s1 * v100 + t1 * v110
                    e3 = s1 * v101 + t1 * v111
                    grd[p, c, 2] = (s0 * (e1 - e0) + t0 * (e3 - e2)) if i2 else 0.0

    @njit
    def splat2(vals, pts, out):
        n0, n1, C = out.shape
        for p in range(pts.shape[0]):
            j0, t0, i0 = ax(pts[p, 0], n0)
            j1, t1, i1 = ax(pts[p, 1], n1)
            s0 = 1 - t0
            s1 = 1 - t1
            for c in range(C):
                a = vals[p, c]
                out[j0, j1, c] += s0 * s1 * a
                out[j0, j1 + 1, c] += s0 * t1 * a
                out[j0 + 1, j1, c] += t0 * s1 * a
                out[j0 + 1, j1 + 1, c] += t0 * t1 * a

    @njit
    def splat3(vals, pts, out):
        n0, n1, n2, C = out.shape
        for p in range(pts.shape[0]):
            j0, t0, i0 = ax(pts[p, 0], n0)
            j1, t1, i1 = ax(pts[p, 1], n1)
            j2, t2, i2 = ax(pts[p, 2], n2)
            s0 = 1 - t0
            s1 = 1 - t1
            s2 = 1 - t2
            for c in range(C):
                a = vals[p, c]
                out[j0, j1, j2, c] += s0 * s1 * s2 * a
                out[j0, j1, j2 + 1, c] += s0 * s1 * t2 * a
                out[j0, j1 + 1, j2, c] += s0 * t1 * s2 * a
                out[j0, j1 + 1, j2 + 1, c] += s0 * t1 * t2 * a
                out[j0 + 1, j1, j2, c] += t0 * s1 * s2 * a
                out[j0 + 1, j1, j2 + 1, c] += t0 * s1 * t2 * a
                out[j0 + 1, j1 + 1, j2, c] += t0 * t1 * s2 * a
                out[j0 + 1, j1 + 1, j2 + 1, c] += t0 * t1 * t2 * a

    return sample2, sample3, splat2, splat3


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
    backend : {None, "numpy", "numba"}

    Returns
    -------
    values : ndarray, shape ``(*out_shape)`` or ``(*out_shape, C)``
    grad : ndarray, shape ``(*out_shape, nd)`` or ``(*out_shape, C, nd)`` (only with ``gradient=True``)
        float64 when both inputs are float64, float32 otherwise.
    """
    image = _float(image, "image")
    coords = _float(coords, "coords")
    b = _backend_for(backend, image, coords)
    nd = coords.shape[-1] if coords.ndim >= 2 else -1
    if nd not in (2, 3) or image.ndim not in (nd, nd + 1):
        raise ValueError(f"image must have shape (*spatial) or (*spatial, C) with nd = coords.shape[-1] in (2, 3) "
                         f"spatial axes; got image {image.shape}, coords {coords.shape}")
    spatial = image.shape[:nd]
    _check_coords(coords, spatial)
    dt = _dtype(image, coords)
    scalar = image.ndim == nd
    img = np.ascontiguousarray(image, dtype=dt)
    if scalar:
        img = img[..., None]
    C = img.shape[-1]
    out_shape = coords.shape[:-1]
    pts = np.ascontiguousarray(coords, dtype=dt).reshape(-1, nd)
    if b == "numpy":
        val, grd = _sample_np(img, pts, gradient)
        val = val.astype(dt, copy=False)
    else:
        s2, s3, _, _ = _numba_kernels()
        val = np.empty((pts.shape[0], C), dtype=dt)
        grd = np.empty((pts.shape[0], C, nd) if gradient else (1, 1, nd), dtype=dt)
        (s2 if nd == 2 else s3)(img, pts, val, grd, bool(gradient))
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
    backend : {None, "numpy", "numba"}

    Returns
    -------
    ndarray, shape ``(*shape)`` or ``(*shape, C)``
        ``<sample_linear(f, coords), values> == <f, splat_linear(values, coords, f.shape)>`` to rounding.
    """
    values = _float(values, "values")
    coords = _float(coords, "coords")
    b = _backend_for(backend, values, coords)
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
    vals = np.ascontiguousarray(values, dtype=dt).reshape(int(np.prod(out_shape)), -1)
    pts = np.ascontiguousarray(coords, dtype=dt).reshape(-1, nd)
    if b == "numpy":
        out = _splat_np(vals, pts, shape)
    else:
        _, _, p2, p3 = _numba_kernels()
        out = np.zeros(shape + (vals.shape[1],), dtype=dt)
        (p2 if nd == 2 else p3)(vals, pts, out)
    return out[..., 0] if scalar else out


def _gradT_axis(g, axis, h):
    """Transpose of the numpy.gradient stencil (edge_order=1, spacing h) along ``axis``."""
    n = g.shape[axis]
    g = np.moveaxis(g, axis, 0)
    out = np.zeros_like(g)
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
    return np.moveaxis(out, 0, axis)


def gradient_transpose(g, *, spacing=1.0):
    """Exact transpose of :func:`classreg.kernels.diff.gradient` for a scalar image: ``Σ_d D_dᵀ g[..., d]``.

    Parameters
    ----------
    g : ndarray, shape ``(*spatial, nd)``
        One component per spatial axis (array order), e.g. the adjoint of an image gradient.
    spacing : float or sequence of float
        Spacing per array axis (as passed to ``gradient``).

    Returns
    -------
    ndarray, shape ``(*spatial)``
        ``<gradient(f, spacing=h), g> == <f, gradient_transpose(g, spacing=h)>``; inside the grid this is
        ``-divergence(g)``; the first two and last two rows of every axis carry the one-sided border stencils.
    """
    g = _float(g, "g")
    nd = g.ndim - 1
    if nd < 1 or g.shape[-1] != nd:
        raise ValueError(f"g must have shape (*spatial, nd) with nd = g.ndim - 1, got {g.shape}")
    if any(n < 2 for n in g.shape[:-1]):
        raise ValueError(f"every spatial axis needs at least 2 samples, got {g.shape}")
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    if not np.all(np.isfinite(h)) or np.any(h <= 0):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    dt = _dtype(g)
    g = g.astype(dt, copy=False)
    out = _gradT_axis(g[..., 0], 0, float(h[0]))
    for d in range(1, nd):
        out += _gradT_axis(g[..., d], d, float(h[d]))
    return out
