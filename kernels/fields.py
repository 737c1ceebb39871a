"""Displacement-field kernels: composition, exponential (scaling and squaring) and fixed-point inversion.

Fields are channels-last arrays ``(*spatial, ndim)`` (ndim = 2 or 3); component ``k`` is the displacement along
array axis ``k`` in physical units given ``spacing`` (array-axis order; ``spacing=1`` means voxel units).  A field
``u`` stands for the map ``phi(x) = x + u(x)``.  Every resampling goes through :func:`classreg.kernels.warp.warp`,
so the backends (numpy reference, numba CPU, numba.cuda GPU) are those of ``warp``; the remaining arithmetic is
element-wise on the array module of the inputs.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _backend
from .warp import _compose_numba, _squarings_numba, warp

__all__ = ["compose", "expmap", "invert"]


def _check_field(u, name):
    if not (_backend.is_cupy_array(u) or isinstance(u, np.ndarray)):
        u = np.asarray(u)
    if u.dtype.kind == "c" or u.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {u.dtype}")
    if u.ndim not in (3, 4) or u.shape[-1] != u.ndim - 1:
        raise ValueError(f"{name} must have shape (*spatial, ndim) with ndim = 2 or 3, got {u.shape}")
    if min(u.shape) < 1:
        raise ValueError(f"{name} must not be empty, got shape {u.shape}")
    return u


def _spacing(spacing, ndim):
    try:
        h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)).copy()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spacing must be a scalar or a sequence of {ndim} positive numbers, got {spacing!r}") from exc
    if not np.all(np.isfinite(h)) or np.any(h <= 0):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    return h


def _dtype(*arrays):
    return np.float64 if any(a.dtype == np.float64 for a in arrays) else np.float32


def _voxel_norm(u, h, xp):
    """Per-voxel Euclidean norm of ``u / spacing`` (in the field's own precision: it only picks a squaring count)."""
    acc = None
    for k in range(u.shape[-1]):
        comp = u[..., k] * u.dtype.type(1.0 / float(h[k])) if u.dtype.kind == "f" else u[..., k] / float(h[k])
        acc = comp * comp if acc is None else acc + comp * comp
    return xp.sqrt(acc)


def compose(u, v, *, spacing=1.0, order=1, mode="border", backend=None):
    """Displacement of the composed map: ``id + w = (id + u) o (id + v)``, i.e. ``w(x) = v(x) + u(x + v(x))``.

    Parameters
    ----------
    u, v : ndarray, shape (*spatial, ndim)
        Displacement fields on the same grid (physical units given ``spacing``); ``v`` is applied first.
    spacing : float or sequence of float
        Voxel size per array axis.
    order : {0, 1, 3}
        Interpolation order used to sample ``u`` at ``x + v(x)``.
    mode : {"border", "zero", "itk"}
        Boundary handling of ``u`` outside the grid (see :func:`classreg.kernels.warp.warp`); "border" extends
        ``u`` by its edge values, "zero" treats the map as the identity outside the grid.
    backend : {None, "numpy", "numba", "cuda"}
        Implementation of the resampling.

    Returns
    -------
    ndarray, shape (*spatial, ndim)
        float64 if either input is float64, else float32.

    Notes
    -----
    Compose maps, never add displacements: ``u + v`` approximates the composition only to first order.
    """
    u = _check_field(u, "u")
    v = _check_field(v, "v")
    if u.shape != v.shape:
        raise ValueError(f"u and v must have the same shape, got {u.shape} and {v.shape}")
    ndim = u.shape[-1]
    h = _spacing(spacing, ndim)
    xp = _backend.get_array_module(u, v)
    dt = _dtype(u, v)
    u = u.astype(dt, copy=False)
    v = v.astype(dt, copy=False)
    if order == 1 and mode == "border" and _backend.resolve_backend(backend, u, v) == "numba":
        return _compose_numba(u, v, np.diag(1.0 / h))  # the same arithmetic in one pass
    w = warp(u, v, disp_matrix=np.diag(1.0 / h), order=order, mode=mode, backend=backend)
    w += v if xp is _backend.get_array_module(w) else xp.asarray(v)
    return w


def _max_voxel_norm_cpu(v, inv_h):
    """Largest per-voxel Euclidean norm of ``v * inv_h`` over a flat channels-last array (template for numba;
    ``inv_h`` a tuple, so the channel count is a compile-time constant). Squared norms go through a block buffer
    (that loop vectorises; a max reduction does not), per-block maxima are combined in a fixed order, so the result
    does not depend on the thread count."""
    nd = len(inv_h)
    n = v.shape[0] // nd
    nblk = (n + 16383) // 16384
    part = np.zeros(nblk)
    for b in prange(nblk):
        p0 = b * 16384
        m = min(n, p0 + 16384) - p0
        buf = np.empty(m)
        vb = np.uint64(p0 * nd)  # unsigned: no negative-index wrap per load
        for p in range(m):
            acc = 0.0
            for k in range(nd):
                c = v[vb + np.uint64(p * nd + k)] * inv_h[k]
                acc += c * c
            buf[p] = acc
        mx = 0.0
        for p in range(m):
            mx = buf[p] if buf[p] > mx else mx
        part[b] = mx
    return math.sqrt(part.max()) if nblk else 0.0


prange = range


@functools.cache
def _numba_max_norm():
    import numba

    ns = dict(globals())
    ns["prange"] = numba.prange
    return _backend.njit(parallel=True)(_backend.rebind(_max_voxel_norm_cpu, ns))


def _max_voxel_norm(v, h, xp, backend):
    if xp is np and _backend.resolve_backend(backend, v) == "numba":
        return float(_numba_max_norm()(np.ascontiguousarray(v).reshape(-1), tuple(1.0 / np.asarray(h))))
    return float(xp.max(_voxel_norm(v, h, xp)))


def _inside_cpu(disp, h, shape, out):
    """``out[p]``: voxel ``p``'s sample ``index + disp / h`` lies within half a voxel of the grid (template for
    numba; ``shape`` and ``h`` tuples of 2 or 3, flat channels-last ``disp``)."""
    n0 = shape[0]
    n1 = shape[1]
    if len(shape) == 2:
        for i in prange(n0):
            for j in range(n1):
                p = i * n1 + j
                x0 = i + disp[2 * p] / h[0]
                x1 = j + disp[2 * p + 1] / h[1]
                out[p] = -0.5 <= x0 < n0 - 0.5 and -0.5 <= x1 < n1 - 0.5
    else:
        n2 = shape[-1]
        for i in prange(n0):
            for j in range(n1):
                for k in range(n2):
                    p = (i * n1 + j) * n2 + k
                    x0 = i + disp[3 * p] / h[0]
                    x1 = j + disp[3 * p + 1] / h[1]
                    x2 = k + disp[3 * p + 2] / h[-1]
                    out[p] = -0.5 <= x0 < n0 - 0.5 and -0.5 <= x1 < n1 - 0.5 and -0.5 <= x2 < n2 - 0.5


@functools.cache
def _numba_inside():
    import numba

    ns = dict(globals())
    ns["prange"] = numba.prange
    return _backend.njit(parallel=True)(_backend.rebind(_inside_cpu, ns))


def inside_grid(disp, h, *, backend=None):
    """Where ``index + disp / h`` lies inside the grid, within half a voxel of it (ITK's ``IsInsideBuffer``):
    a boolean array of the field's spatial shape. ``disp`` channels-last (array frame, mm), ``h`` the spacing."""
    xp = _backend.get_array_module(disp)
    shape = disp.shape[:-1]
    if xp is np and _backend.resolve_backend(backend, disp) == "numba":
        out = np.empty(int(np.prod(shape)), dtype=np.bool_)
        _numba_inside()(np.ascontiguousarray(disp).reshape(-1), tuple(float(x) for x in h),
                        tuple(int(x) for x in shape), out)
        return out.reshape(shape)
    ok = xp.ones(shape, dtype=bool)
    for k, n in enumerate(shape):
        idx = xp.arange(n, dtype=disp.dtype).reshape((n,) + (1,) * (len(shape) - 1 - k))
        x = idx + disp[..., k] / disp.dtype.type(h[k])
        ok &= (x >= -0.5) & (x < n - 0.5)
    return ok


def expmap(v, *, spacing=1.0, n_squarings=None, max_squarings=20, max_voxel_norm=0.5, backend=None):
    """Exponential of a stationary velocity field by scaling and squaring.

    Parameters
    ----------
    v : ndarray, shape (*spatial, ndim)
        Velocity field (physical units given ``spacing``).
    spacing : float or sequence of float
        Voxel size per array axis.
    n_squarings : int, optional
        Number of squarings; by default the smallest ``n >= 0`` with ``max |v / spacing| / 2**n <= 0.5`` voxel
        (Euclidean norm per voxel), capped at ``max_squarings``.
    max_squarings : int
        Upper bound of the automatic choice.
    max_voxel_norm : float
        The automatic choice makes ``max |v / spacing| / 2**n`` at most this (voxels); 0.5 is Lombaert's rule. A
        solver may use a coarser value where only an approximate map is needed (e.g. inside an iteration).
    backend : {None, "numpy", "numba", "cuda"}
        Implementation of the resampling.

    Returns
    -------
    u : ndarray, shape (*spatial, ndim)
        Displacement of ``exp(v)`` (same dtype rule as :func:`compose`).
    n : int
        Number of squarings used.

    Notes
    -----
    Scaling and squaring [1]_: ``u_0 = v / 2**n`` then ``n`` times ``u <- u + u o (id + u)`` (linear interpolation,
    border extension). The inverse map is ``exp(-v)``.

    References
    ----------
    .. [1] V. Arsigny, O. Commowick, X. Pennec, N. Ayache, "A Log-Euclidean framework for statistics on
       diffeomorphisms", MICCAI 2006.
    """
    v = _check_field(v, "v")
    ndim = v.shape[-1]
    h = _spacing(spacing, ndim)
    xp = _backend.get_array_module(v)
    if isinstance(max_squarings, bool) or not isinstance(max_squarings, (int, np.integer)) or max_squarings < 0:
        raise ValueError(f"max_squarings must be a non-negative int, got {max_squarings!r}")
    if n_squarings is None:
        vmax = _max_voxel_norm(v, h, xp, backend)
        if not math.isfinite(vmax):
            raise ValueError("v must be finite")
        n = 0
        while n < max_squarings and vmax / 2.0**n > max_voxel_norm:
            n += 1
    else:
        if isinstance(n_squarings, bool) or not isinstance(n_squarings, (int, np.integer)) or n_squarings < 0:
            raise ValueError(f"n_squarings must be a non-negative int or None, got {n_squarings!r}")
        n = int(n_squarings)
    dt = _dtype(v)
    u = v.astype(dt, copy=False) * dt(2.0**-n) if n else v.astype(dt, copy=True)  # one pass either way
    if n and xp is np and _backend.resolve_backend(backend, u) == "numba":
        return _squarings_numba(np.ascontiguousarray(u), n, np.diag(1.0 / h)), n  # the loop below, in place
    for _ in range(n):
        u = compose(u, u, spacing=h, order=1, mode="border", backend=backend)
    return u, n


def invert(u, *, spacing=1.0, max_iter=50, tol=1e-3, init=None, backend=None):
    """Inverse displacement by fixed-point iteration ``w <- -u(x + w(x))``.

    Parameters
    ----------
    u : ndarray, shape (*spatial, ndim)
        Displacement of the map to invert (physical units given ``spacing``).
    spacing : float or sequence of float
        Voxel size per array axis.
    max_iter : int
        Maximum number of updates.
    tol : float
        Stop when the residual ``|w + u o (id + w)|`` (voxels, per-voxel Euclidean norm) is ``<= tol`` everywhere.
    init : ndarray, optional
        Initial guess of the inverse displacement; default ``-u``.
    backend : {None, "numpy", "numba", "cuda"}
        Implementation of the resampling.

    Returns
    -------
    w : ndarray, shape (*spatial, ndim)
        Inverse displacement (``(id + u) o (id + w) ~ id``).
    info : dict
        ``max_error`` and ``mean_error`` of the residual of the returned ``w`` (voxels), ``iterations`` (number
        of updates made).

    Notes
    -----
    Converges where the map is a contraction (``|Du| < 1``); ``u`` is sampled with linear interpolation and border
    extension, so near the boundary the inverse is that of the edge-extended map.

    References
    ----------
    .. [1] M. Chen, W. Lu, Q. Chen, K. J. Ruchala, G. H. Olivera, "A simple fixed-point approach to invert a
       deformation field", Medical Physics 35(1), 2008.
    """
    u = _check_field(u, "u")
    ndim = u.shape[-1]
    h = _spacing(spacing, ndim)
    xp = _backend.get_array_module(u)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    try:
        tol = float(tol)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tol must be a number, got {tol!r}") from exc
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    dt = _dtype(u)
    u = u.astype(dt, copy=False)
    if init is None:
        w = -u
    else:
        init = _check_field(init, "init")
        if init.shape != u.shape:
            raise ValueError(f"init must have the shape of u {u.shape}, got {init.shape}")
        w = init.astype(dt, copy=True)
    dmat = np.diag(1.0 / h)
    it = 0
    while True:
        s = warp(u, w, disp_matrix=dmat, order=1, mode="border", backend=backend)
        err = _voxel_norm(w + s, h, xp)
        max_err = float(xp.max(err))
        if max_err <= tol or it >= max_iter:
            break
        w = -s
        it += 1
    return w, {"max_error": max_err, "mean_error": float(xp.mean(err)), "iterations": it}
