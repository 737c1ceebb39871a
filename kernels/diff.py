"""Finite-difference operators on scalar images and channels-last vector fields, and a DST-I Dirichlet Poisson solve.

Conventions
-----------
* Arrays in numpy axis order; a vector field ``u`` has shape ``(*spatial, ndim)`` and component ``u[..., k]`` is the
  displacement along array axis ``k``, in the units of ``spacing`` (per array axis; a scalar broadcasts).
* Derivatives are in physical units: central differences ``(f[i+1] - f[i-1]) / (2h)`` inside, one-sided first-order
  differences ``(f[1] - f[0]) / h`` and ``(f[n-1] - f[n-2]) / h`` on the first/last sample -- exactly
  :func:`numpy.gradient` with ``edge_order=1`` (every spatial axis needs at least 2 samples).
* Per-voxel kernels have a numpy reference (the test oracle), a numba ``prange`` path and a numba.cuda path; both fast
  paths compile the same scalar bodies (``_dax``, ``_*_body`` below), except the CPU gradient of a scalar image, a
  row loop with the same arithmetic laid out for the vectoriser (``_grad_rows_cpu``). 2-D data run through the 3-D
  kernels as a ``(1, n0, n1)`` volume; no reductions cross threads, so results do not depend on the thread count.
"""
from __future__ import annotations

import functools
import numbers

import numpy as np

from . import _backend
from .smooth import _as_real_array, _cuda_device, _cuda_kernel, _numba_compile, _rebind, _spacing

__all__ = [
    "curl",
    "divergence",
    "gradient",
    "jacobian_determinant",
    "jacobian_matrix",
    "lie_bracket",
    "poisson_dirichlet",
]


# ----------------------------------------------------------------------------------------------------------------
# scalar bodies (plain Python; compiled by numba.njit for the CPU and numba.cuda.jit(device=True) for the GPU)
# canonical layout: a[i, j, k, c] (4-D); spatial axis d of the data is canonical axis d + off, off = 3 - ndim
# ----------------------------------------------------------------------------------------------------------------
def _dax(a, i, j, k, c, ax, h1, h2):
    """d a[..., c] / d x_ax at (i, j, k): central inside, one-sided at the ends (numpy.gradient, edge_order=1)."""
    if ax == 0:
        n = a.shape[0]
        if i == 0:
            return (a[1, j, k, c] - a[0, j, k, c]) / h1
        if i == n - 1:
            return (a[n - 1, j, k, c] - a[n - 2, j, k, c]) / h1
        return (a[i + 1, j, k, c] - a[i - 1, j, k, c]) / h2
    if ax == 1:
        n = a.shape[1]
        if j == 0:
            return (a[i, 1, k, c] - a[i, 0, k, c]) / h1
        if j == n - 1:
            return (a[i, n - 1, k, c] - a[i, n - 2, k, c]) / h1
        return (a[i, j + 1, k, c] - a[i, j - 1, k, c]) / h2
    n = a.shape[2]
    if k == 0:
        return (a[i, j, 1, c] - a[i, j, 0, c]) / h1
    if k == n - 1:
        return (a[i, j, n - 1, c] - a[i, j, n - 2, c]) / h1
    return (a[i, j, k + 1, c] - a[i, j, k - 1, c]) / h2


def _d(a, i, j, k, c, d, h1, h2):
    """Derivative of component ``c`` along *spatial* axis ``d`` (canonical axis ``d + 3 - ndim``).

    ``h1``/``h2`` are tuples (h_d, 2 h_d) of length ndim, so ndim is a compile-time constant of each specialisation.
    """
    return _dax(a, i, j, k, c, d + 3 - len(h1), h1[d], h2[d])


def _grad_body(a, b, i, j, k, h1, h2, p, one, out):
    nd = len(h1)
    if a.shape[3] == 1:  # scalar image: constant channel index lets LLVM fold the addressing
        for d in range(nd):
            out[i, j, k, 0, d] = _d(a, i, j, k, 0, d, h1, h2)
    else:
        for c in range(a.shape[3]):
            for d in range(nd):
                out[i, j, k, c, d] = _d(a, i, j, k, c, d, h1, h2)


def _div_body(a, b, i, j, k, h1, h2, p, one, out):
    nd = len(h1)
    s = _d(a, i, j, k, 0, 0, h1, h2)
    for d in range(1, nd):
        s += _d(a, i, j, k, d, d, h1, h2)
    out[i, j, k] = s


def _jac_body(a, b, i, j, k, h1, h2, p, one, out):
    # p = 1: Jacobian of the map x + u (adds the identity); p = 0: of u
    nd = len(h1)
    for r in range(nd):
        for d in range(nd):
            g = _d(a, i, j, k, r, d, h1, h2)
            if p == 1 and r == d:
                g = g + one
            out[i, j, k, r, d] = g


def _det_body(a, b, i, j, k, h1, h2, p, one, out):
    nd = len(h1)
    if nd == 1:
        out[i, j, k] = one + _d(a, i, j, k, 0, 0, h1, h2)
    elif nd == 2:
        a00 = one + _d(a, i, j, k, 0, 0, h1, h2)
        a01 = _d(a, i, j, k, 0, 1, h1, h2)
        a10 = _d(a, i, j, k, 1, 0, h1, h2)
        a11 = one + _d(a, i, j, k, 1, 1, h1, h2)
        out[i, j, k] = a00 * a11 - a01 * a10
    else:
        a00 = one + _d(a, i, j, k, 0, 0, h1, h2)
        a01 = _d(a, i, j, k, 0, 1, h1, h2)
        a02 = _d(a, i, j, k, 0, 2, h1, h2)
        a10 = _d(a, i, j, k, 1, 0, h1, h2)
        a11 = one + _d(a, i, j, k, 1, 1, h1, h2)
        a12 = _d(a, i, j, k, 1, 2, h1, h2)
        a20 = _d(a, i, j, k, 2, 0, h1, h2)
        a21 = _d(a, i, j, k, 2, 1, h1, h2)
        a22 = one + _d(a, i, j, k, 2, 2, h1, h2)
        out[i, j, k] = a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20) + a02 * (a10 * a21 - a11 * a20)


def _curl_body(a, b, i, j, k, h1, h2, p, one, out):
    # physical convention (p = 0): x = last array axis; p = 1: array axes taken as a right-handed frame (= -physical)
    if len(h1) == 2:
        x = _d(a, i, j, k, 0, 1, h1, h2)  # d u_0 / d x_1
        y = _d(a, i, j, k, 1, 0, h1, h2)  # d u_1 / d x_0
        out[i, j, k, 0] = x - y if p == 0 else y - x
    else:
        d21 = _d(a, i, j, k, 1, 2, h1, h2)
        d12 = _d(a, i, j, k, 2, 1, h1, h2)
        d02 = _d(a, i, j, k, 2, 0, h1, h2)
        d20 = _d(a, i, j, k, 0, 2, h1, h2)
        d10 = _d(a, i, j, k, 0, 1, h1, h2)
        d01 = _d(a, i, j, k, 1, 0, h1, h2)
        if p == 0:
            out[i, j, k, 0] = d21 - d12
            out[i, j, k, 1] = d02 - d20
            out[i, j, k, 2] = d10 - d01
        else:
            out[i, j, k, 0] = d12 - d21
            out[i, j, k, 1] = d20 - d02
            out[i, j, k, 2] = d01 - d10


def _lie_body(a, b, i, j, k, h1, h2, p, one, out):
    # [u, v]_c = sum_d (d_d u_c) v_d - (d_d v_c) u_d ; a = u, b = v
    nd = len(h1)
    for c in range(nd):
        s1 = _d(a, i, j, k, c, 0, h1, h2) * b[i, j, k, 0]
        s2 = _d(b, i, j, k, c, 0, h1, h2) * a[i, j, k, 0]
        for d in range(1, nd):
            s1 += _d(a, i, j, k, c, d, h1, h2) * b[i, j, k, d]
            s2 += _d(b, i, j, k, c, d, h1, h2) * a[i, j, k, d]
        out[i, j, k, c] = s1 - s2


_BODIES = {
    "gradient": _grad_body,
    "divergence": _div_body,
    "jacobian": _jac_body,
    "det": _det_body,
    "curl": _curl_body,
    "lie": _lie_body,
}


def _drive_cpu(a, b, h1, h2, p, one, out):
    """numba CPU driver template: parallel over (i, j) rows, sequential along the contiguous last axis."""
    n0 = a.shape[0]
    n1 = a.shape[1]
    n2 = a.shape[2]
    for ij in prange(n0 * n1):
        i = ij // n1
        j = ij - i * n1
        for k in range(n2):
            _body(a, b, i, j, k, h1, h2, p, one, out)


def _grad_rows_cpu(a, h1, h2, out):
    """numba CPU gradient of a scalar image (canonical ``(n0, n1, n2)``, ``out`` flat channels-last), row by row.

    The arithmetic of ``_grad_body`` (same differences, same divisors), laid out for the vectoriser: the border
    cases along axes 0 and 1 are per-row constants, the contiguous axis is a branch-free loop over its interior,
    and the ``nd`` components go to a planar row buffer before the strided store (a flat ``out`` makes the channel
    stride a compile-time constant; interleaved stores inside a parallel loop do not vectorise).
    """
    nd = len(h1)
    n0 = a.shape[0]
    n1 = a.shape[1]
    n2 = a.shape[2]
    nrows = n0 * n1
    nblk = (nrows + 15) // 16
    for blk in prange(nblk):
        gb = np.empty((nd, n2), out.dtype)
        for ij in range(blk * 16, min(nrows, blk * 16 + 16)):
            i = ij // n1
            j = ij - i * n1
            if nd == 3:  # axis 0 = canonical axis 0
                lo = i - 1 if i > 0 else 0
                hi = i + 1 if i < n0 - 1 else n0 - 1
                div = h2[0] if (i > 0) & (i < n0 - 1) else h1[0]
                for k in range(n2):
                    gb[0, k] = (a[hi, j, k] - a[lo, j, k]) / div
            if nd >= 2:  # spatial axis nd - 2 = canonical axis 1
                lo = j - 1 if j > 0 else 0
                hi = j + 1 if j < n1 - 1 else n1 - 1
                div = h2[nd - 2] if (j > 0) & (j < n1 - 1) else h1[nd - 2]
                for k in range(n2):
                    gb[nd - 2, k] = (a[i, hi, k] - a[i, lo, k]) / div
            # spatial axis nd - 1 = canonical axis 2 (contiguous)
            hk = h2[nd - 1]
            for k in range(1, n2 - 1):
                gb[nd - 1, k] = (a[i, j, k + 1] - a[i, j, k - 1]) / hk
            gb[nd - 1, 0] = (a[i, j, 1] - a[i, j, 0]) / h1[nd - 1]
            gb[nd - 1, n2 - 1] = (a[i, j, n2 - 1] - a[i, j, n2 - 2]) / h1[nd - 1]
            base = np.uint64(ij * n2 * nd)  # unsigned: no negative-index wrap per store
            for k in range(n2):
                for d in range(nd):
                    out[base + np.uint64(k * nd + d)] = gb[d, k]


def _drive_cuda(a, b, h1, h2, p, one, out):
    """numba.cuda driver template: one thread per voxel."""
    n0 = a.shape[0]
    n1 = a.shape[1]
    n2 = a.shape[2]
    t = cuda.grid(1)
    if t < n0 * n1 * n2:
        i = t // (n1 * n2)
        r = t - i * (n1 * n2)
        j = r // n2
        k = r - j * n2
        _body(a, b, i, j, k, h1, h2, p, one, out)


@functools.cache
def _numba_driver(op):
    import numba

    dax = _numba_compile(_dax)  # left to LLVM (numba-IR inlining of all 9 derivative calls compiles slowly)
    d = _numba_compile(_d, inline="always", _dax=dax)
    body = _numba_compile(_BODIES[op], inline="always", _d=d)
    return _numba_compile(_drive_cpu, "_" + op, parallel=True, _body=body, prange=numba.prange)


@functools.cache
def _numba_grad_rows():
    import numba

    return _backend.njit(parallel=True, error_model="numpy")(_rebind(_grad_rows_cpu, prange=numba.prange))


@functools.cache
def _cuda_driver(op):
    dax = _cuda_device(_dax)
    d = _cuda_device(_d, _dax=dax)
    body = _cuda_device(_BODIES[op], _d=d)
    return _cuda_kernel(_drive_cuda, _body=body)


# ----------------------------------------------------------------------------------------------------------------
# argument handling and dispatch
# ----------------------------------------------------------------------------------------------------------------
def _check_spatial(shape, nd, name):
    for n in shape[:nd]:
        if n < 2:
            raise ValueError(f"{name} needs at least 2 samples along every spatial axis, got shape {tuple(shape)}")


def _field(u, name, xp, *, dims=(1, 2, 3)):
    """Validate a channels-last field ``(*spatial, ndim)``; returns (array, ndim)."""
    u = _as_real_array(u, name, xp)
    nd = u.ndim - 1
    if nd not in dims or u.shape[-1] != nd:
        raise ValueError(
            f"{name} must be a channels-last vector field of shape (*spatial, ndim) with ndim in {dims}, "
            f"got shape {u.shape}"
        )
    _check_spatial(u.shape, nd, name)
    return u, nd


def _canon(a, nd):
    """View a ``(*spatial, C)`` array as the canonical 4-D ``(n0, n1, n2, C)`` (leading singleton axes)."""
    shp = a.shape
    return a.reshape((1,) * (3 - nd) + tuple(shp[:nd]) + (int(np.prod(shp[nd:], dtype=np.int64)),))


def _run(op, backend, xp, a, b, nd, h, p, out_tail):
    """Run ``op`` on the fast path ``backend``; returns the output of shape ``(*spatial, *out_tail)``."""
    dt = a.dtype
    h1 = tuple(dt.type(x) for x in h)
    h2 = tuple(dt.type(2.0 * x) for x in h)
    one = dt.type(1)
    ac = _canon(xp.ascontiguousarray(a), nd)
    bc = ac if b is None else _canon(xp.ascontiguousarray(b), nd)
    cshape = ac.shape[:3] + tuple(out_tail)
    out = xp.empty(cshape, dtype=dt)
    if backend == "numba":
        _numba_driver(op)(ac, bc, h1, h2, p, one, out)
    else:
        kern = _cuda_driver(op)
        _backend.launch(kern, ac.shape[0] * ac.shape[1] * ac.shape[2], ac, bc, h1, h2, p, one, out)
    return out.reshape(tuple(a.shape[:nd]) + tuple(out_tail))


def _np_grad(f, h, axis):
    """numpy.gradient along one axis (edge_order=1), spacing a Python float."""
    return np.gradient(f, float(h), axis=axis)


def _np_jac(u, nd, h):
    """(*spatial, nd, nd) with [..., r, d] = d u_r / d x_d (reference)."""
    return np.stack([np.stack([_np_grad(u[..., r], h[d], d) for d in range(nd)], axis=-1) for r in range(nd)], axis=-2)


def gradient(a, *, spacing=1.0, ndim=None, backend=None):
    """Gradient by central differences (one-sided first order at the borders), in physical units.

    Parameters
    ----------
    a : array_like, shape ``(*spatial)`` or ``(*spatial, C)``
        Scalar image, or channels-last data when ``ndim = a.ndim - 1``.
    spacing : float or sequence of float, optional
        Grid spacing per spatial axis.
    ndim : int, optional
        Number of spatial axes (1-3; default ``a.ndim``).
    backend : {None, "numpy", "numba", "cuda"}, optional

    Returns
    -------
    ndarray
        ``(*spatial, ndim)`` with ``[..., d] = ∂a/∂x_d`` (array-axis order), or ``(*spatial, C, ndim)`` for
        channels-last input. Equals ``numpy.gradient(a, *spacing)`` (``edge_order=1``) stacked on the last axis.
    """
    bk = _backend.resolve_backend(backend, a)
    xp = _backend.get_array_module(a)
    a = _as_real_array(a, "a", xp)
    nd = a.ndim if ndim is None else ndim
    if not isinstance(nd, numbers.Integral) or nd not in (1, 2, 3) or a.ndim not in (nd, nd + 1):
        raise ValueError(
            f"ndim must be 1, 2 or 3 and a.ndim must be ndim or ndim + 1, got ndim={ndim!r}, a.shape={a.shape}"
        )
    nd = int(nd)
    _check_spatial(a.shape, nd, "a")
    h = _spacing(spacing, nd)
    if bk == "numpy":
        return np.stack([_np_grad(a, h[d], d) for d in range(nd)], axis=-1)
    nc = a.shape[-1] if a.ndim > nd else 1
    if bk == "numba" and nc == 1:
        dt = a.dtype
        out = np.empty(a.shape[:nd] + (nd,), dtype=dt)
        _numba_grad_rows()(_canon(np.ascontiguousarray(a), nd)[..., 0], tuple(dt.type(x) for x in h),
                           tuple(dt.type(2.0 * x) for x in h), out.reshape(-1))
        return out.reshape(tuple(a.shape) + (nd,))
    out = _run("gradient", bk, xp, a, None, nd, h, 0, (nc, nd))
    return out.reshape(tuple(a.shape) + (nd,))


def divergence(u, *, spacing=1.0, backend=None):
    """Divergence ``Σ_d ∂u_d/∂x_d`` of a channels-last field ``(*spatial, ndim)``.

    Same stencil as :func:`gradient`; returns ``(*spatial)``.
    """
    bk = _backend.resolve_backend(backend, u)
    xp = _backend.get_array_module(u)
    u, nd = _field(u, "u", xp)
    h = _spacing(spacing, nd)
    if bk == "numpy":
        s = _np_grad(u[..., 0], h[0], 0)
        for d in range(1, nd):
            s = s + _np_grad(u[..., d], h[d], d)
        return s
    return _run("divergence", bk, xp, u, None, nd, h, 0, ())


def jacobian_matrix(u, *, spacing=1.0, of_map=True, backend=None):
    """Jacobian matrix of the map ``x + u(x)`` (``of_map=True``) or of ``u``.

    Parameters
    ----------
    u : array_like, shape ``(*spatial, ndim)``
        Displacement field, channels last, in the units of ``spacing``.
    spacing : float or sequence of float, optional
    of_map : bool, optional
        True: entries ``∂(x_i + u_i)/∂x_j = δ_ij + ∂u_i/∂x_j``; False: ``∂u_i/∂x_j``.
    backend : {None, "numpy", "numba", "cuda"}, optional

    Returns
    -------
    ndarray, shape ``(*spatial, ndim, ndim)``
        ``[..., i, j]`` = derivative of component i along array axis j. Exact for affine ``u`` (also at borders).
    """
    bk = _backend.resolve_backend(backend, u)
    xp = _backend.get_array_module(u)
    u, nd = _field(u, "u", xp)
    h = _spacing(spacing, nd)
    if bk == "numpy":
        J = _np_jac(u, nd, h)
        if of_map:
            for r in range(nd):
                J[..., r, r] += u.dtype.type(1)
        return J
    return _run("jacobian", bk, xp, u, None, nd, h, 1 if of_map else 0, (nd, nd))


def jacobian_determinant(u, *, spacing=1.0, backend=None):
    """Determinant of the Jacobian of ``φ = id + u``.

    2-D: ``(1 + ∂_0u_0)(1 + ∂_1u_1) - ∂_1u_0 ∂_0u_1``; 3-D: cofactor expansion along the first row of
    ``I + Du``; derivatives as in :func:`gradient`. Returns ``(*spatial)``; values ≤ 0 mean folding.
    """
    bk = _backend.resolve_backend(backend, u)
    xp = _backend.get_array_module(u)
    u, nd = _field(u, "u", xp)
    h = _spacing(spacing, nd)
    if bk == "numpy":
        A = _np_jac(u, nd, h)
        one = u.dtype.type(1)
        for r in range(nd):
            A[..., r, r] = one + A[..., r, r]
        if nd == 1:
            return A[..., 0, 0]
        if nd == 2:
            return A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0]
        return (
            A[..., 0, 0] * (A[..., 1, 1] * A[..., 2, 2] - A[..., 1, 2] * A[..., 2, 1])
            - A[..., 0, 1] * (A[..., 1, 0] * A[..., 2, 2] - A[..., 1, 2] * A[..., 2, 0])
            + A[..., 0, 2] * (A[..., 1, 0] * A[..., 2, 1] - A[..., 1, 1] * A[..., 2, 0])
        )
    return _run("det", bk, xp, u, None, nd, h, 0, ())


def curl(u, *, spacing=1.0, convention="physical", backend=None):
    """Curl of a 2-D or 3-D channels-last field (the ∇× of the variational-principle (VP) registration of Zhou & Liao).

    Parameters
    ----------
    u : array_like, shape ``(*spatial, ndim)``, ndim 2 or 3
        Component ``u[..., k]`` along array axis ``k``.
    spacing : float or sequence of float, optional
    convention : {"physical", "array"}, optional
        ``"physical"`` (default): the array axes are read as ``(z, y, x)`` / ``(y, x)`` -- x is the *last* array axis,
        as in ``data[z, y, x]`` of docs/conventions.md -- and the curl is the right-handed one in (x, y, z):
        2-D scalar ``∂_x u_y - ∂_y u_x = ∂_1 u_0 - ∂_0 u_1``;
        3-D vector (returned in array-axis order, i.e. ``(c_z, c_y, c_x)``)
        ``(∂_2 u_1 - ∂_1 u_2,  ∂_0 u_2 - ∂_2 u_0,  ∂_1 u_0 - ∂_0 u_1)``, where ``∂_j`` is along array axis j.
        ``"array"``: the array axes (0, 1, 2) are taken as a right-handed frame, e.g. 2-D ``∂_0 u_1 - ∂_1 u_0``;
        this is exactly the negative of ``"physical"``.
    backend : {None, "numpy", "numba", "cuda"}, optional

    Returns
    -------
    ndarray
        ``(*spatial)`` in 2-D, ``(*spatial, 3)`` in 3-D.
    """
    if convention not in ("physical", "array"):
        raise ValueError(f"convention must be 'physical' or 'array', got {convention!r}")
    bk = _backend.resolve_backend(backend, u)
    xp = _backend.get_array_module(u)
    u, nd = _field(u, "u", xp, dims=(2, 3))
    h = _spacing(spacing, nd)
    p = 0 if convention == "physical" else 1
    if bk == "numpy":
        D = _np_jac(u, nd, h)  # D[..., r, d] = d u_r / d x_d

        def diff(r, d, rr, dd):  # D[r, d] - D[rr, dd], sign per convention
            return D[..., r, d] - D[..., rr, dd] if p == 0 else D[..., rr, dd] - D[..., r, d]

        if nd == 2:
            return diff(0, 1, 1, 0)
        return np.stack([diff(1, 2, 2, 1), diff(2, 0, 0, 2), diff(0, 1, 1, 0)], axis=-1)
    out = _run("curl", bk, xp, u, None, nd, h, p, (1 if nd == 2 else 3,))
    return out.reshape(u.shape[:nd]) if nd == 2 else out


def lie_bracket(u, v, *, spacing=1.0, backend=None):
    """Lie bracket of vector fields ``[u, v] = Jac(u)·v - Jac(v)·u`` (Jac = ∂u_i/∂x_j, not of the map).

    Sign convention of Vercauteren et al., "Symmetric log-domain diffeomorphic registration: a demons-based
    approach", MICCAI 2008, LNCS 5241:754-761, doi:10.1007/978-3-540-85988-8_90, whose BCH approximation reads
    ``log(exp(v) ∘ exp(u)) = Z(v, u) ≈ v + u + ½[v, u]`` -- i.e. ``v + u + 0.5 * lie_bracket(v, u)`` here.
    Some authors (e.g. Bossa et al.) use the opposite sign.

    Parameters
    ----------
    u, v : array_like, shape ``(*spatial, ndim)``
        Channels-last fields of the same shape, in the units of ``spacing``.
    spacing : float or sequence of float, optional
    backend : {None, "numpy", "numba", "cuda"}, optional

    Returns
    -------
    ndarray, shape ``(*spatial, ndim)``
    """
    bk = _backend.resolve_backend(backend, u, v)
    xp = _backend.get_array_module(u, v)
    u, nd = _field(u, "u", xp)
    v, _ = _field(v, "v", xp)
    if v.shape != u.shape:
        raise ValueError(f"u and v must have the same shape, got {u.shape} and {v.shape}")
    if u.dtype != v.dtype:
        u = u.astype(np.float32)
        v = v.astype(np.float32)
    h = _spacing(spacing, nd)
    if bk == "numpy":
        Ju = _np_jac(u, nd, h)
        Jv = _np_jac(v, nd, h)
        out = np.empty_like(u)
        for c in range(nd):
            s1 = Ju[..., c, 0] * v[..., 0]
            s2 = Jv[..., c, 0] * u[..., 0]
            for d in range(1, nd):
                s1 = s1 + Ju[..., c, d] * v[..., d]
                s2 = s2 + Jv[..., c, d] * u[..., d]
            out[..., c] = s1 - s2
        return out
    return _run("lie", bk, xp, u, v, nd, h, 0, (nd,))


# ----------------------------------------------------------------------------------------------------------------
# Poisson with homogeneous Dirichlet boundary (DST-I)
# ----------------------------------------------------------------------------------------------------------------
def _dst1_fft(x, axis, xp):
    """Unnormalised DST-I along ``axis`` (``y_k = 2 Σ_n x_n sin(π(k+1)(n+1)/(N+1))``, scipy's definition) by one
    real FFT of the odd extension ``[0, x, 0, -x[::-1]]`` (length 2(N+1)); used where no dstn is available."""
    x = xp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    z = xp.zeros(x.shape[:-1] + (1,), dtype=x.dtype)
    ext = xp.concatenate([z, x, z, -x[..., ::-1]], axis=-1)
    y = -xp.fft.rfft(ext, axis=-1).imag[..., 1 : n + 1]
    return xp.moveaxis(xp.ascontiguousarray(y.astype(x.dtype)), -1, axis)


def _dstn(x, axes, xp, workers, inverse=False):
    if xp is np:
        import scipy.fft as sfft

        f = sfft.idstn if inverse else sfft.dstn
        return f(x, type=1, axes=axes, workers=workers)
    try:  # CuPy >= 13 has DST-I in cupyx.scipy.fft
        import cupyx.scipy.fft as cfft

        f = cfft.idstn if inverse else cfft.dstn
        return f(x, type=1, axes=axes)
    except (ImportError, AttributeError, NotImplementedError, ValueError):
        y = x
        for ax in axes:
            y = _dst1_fft(y, ax, xp)
            if inverse:
                y = y / (2 * (x.shape[ax] + 1))
        return y


def poisson_dirichlet(r, *, spacing=1.0, ndim=None, include_boundary=True, workers=None, backend=None):
    """Solve the discrete Poisson problem ``Δ_h w = r`` with ``w = 0`` on the boundary, by DST-I.

    ``Δ_h`` is the (2·ndim + 1)-point Laplacian ``Σ_j (w[i+e_j] - 2w[i] + w[i-e_j]) / h_j²`` on the interior nodes;
    its eigenvalues are ``λ_k = Σ_j (2cos(π k_j/(n_j+1)) - 2)/h_j²``, ``k_j = 1..n_j`` (n_j interior nodes), all
    negative, so the solve is unique and symmetric (its own transpose, which makes VP's gradient ``∂Loss/∂F = b``
    exact).

    Parameters
    ----------
    r : array_like, shape ``(*spatial)`` or ``(*spatial, C)``
        Right-hand side; trailing channel axes (``ndim < r.ndim``) are solved independently (vector Poisson of VP).
    spacing : float or sequence of float, optional
    ndim : int, optional
        Number of leading spatial axes (1-3; default ``r.ndim``).
    include_boundary : bool, optional
        True (default): ``r`` and the result live on the full node grid, boundary ring included; the boundary values
        of ``r`` are ignored and those of the result are 0 (needs ≥ 3 nodes per axis). False: ``r`` holds only the
        interior nodes and the result has the same shape.
    workers : int, optional
        :mod:`scipy.fft` threads (None: all cores).
    backend : {None, "numpy", "numba", "cuda"}, optional
        Validated; CuPy arrays use ``cupyx.scipy.fft.dstn(type=1)`` when available, otherwise DST-I through
        ``cupy.fft.rfft`` of the odd extension (``_dst1_fft``; same result, ~2x the work).

    Returns
    -------
    ndarray
        ``w``, same shape and float dtype rule as everywhere (float32 unless ``r`` is float64).
    """
    _backend.resolve_backend(backend, r)
    xp = _backend.get_array_module(r)
    r = _as_real_array(r, "r", xp)
    nd = r.ndim if ndim is None else ndim
    if not isinstance(nd, numbers.Integral) or not 1 <= nd <= min(3, r.ndim):
        raise ValueError(f"ndim must be 1, 2 or 3 and at most r.ndim={r.ndim}, got {ndim!r}")
    nd = int(nd)
    h = _spacing(spacing, nd)
    if include_boundary:
        if any(n < 3 for n in r.shape[:nd]):
            raise ValueError(f"r needs at least 3 nodes per spatial axis with include_boundary=True, got {r.shape}")
        rin = r[tuple(slice(1, n - 1) for n in r.shape[:nd])]
    else:
        if any(n < 1 for n in r.shape[:nd]):
            raise ValueError(f"r must have at least one interior node per axis, got {r.shape}")
        rin = r
    lam = xp.zeros(rin.shape[:nd], dtype=np.float64)  # built where r lives (no grid-sized upload per solve)
    for j in range(nd):
        n = rin.shape[j]
        k = xp.arange(1, n + 1)
        shp = [1] * nd
        shp[j] = n
        lam = lam + ((2.0 * xp.cos(np.pi * k / (n + 1)) - 2.0) / h[j] ** 2).reshape(shp)
    lam = lam.astype(r.dtype).reshape(lam.shape + (1,) * (r.ndim - nd))
    axes = tuple(range(nd))
    w = -1 if workers is None else workers
    coef = _dstn(rin, axes, xp, w)
    coef = coef / lam
    win = _dstn(coef, axes, xp, w, inverse=True).astype(r.dtype, copy=False)
    if not include_boundary:
        return xp.ascontiguousarray(win)
    out = xp.zeros(r.shape, dtype=r.dtype)
    out[tuple(slice(1, n - 1) for n in r.shape[:nd])] = win
    return out
