"""Resampling kernels: warp an image through ``index -> matrix @ index + offset + disp_matrix @ disp[index]``.

One kernel serves every resampling in classreg (index and physical-point conventions: docs/conventions.md):

* a displacement warp on one grid (``warp(image, disp)``, displacements in voxels, or in mm with
  ``disp_matrix = diag(1 / spacing)``);
* a pure affine resample between two grids (``warp(image, matrix=..., offset=..., out_shape=...)``);
* a physical-space field on another grid (the caller folds origin, direction and spacing into ``matrix``,
  ``offset`` and ``disp_matrix``).

:func:`interpolate` samples the same interpolants at arbitrary continuous indices.

The per-point interpolation code is written once as plain scalar Python functions (the ``_*_axis`` helpers and the
``_lin*``/``_near*``/``_cub*`` bodies below).  They are compiled twice, lazily, inside ``functools.cache``d
builders: with ``numba.njit`` for the CPU (outer loop ``prange``) and with ``numba.cuda.jit(device=True)`` for the GPU
(outer loop ``cuda.grid(1)``).  The builders rebind each function's globals to the compiled versions of the helpers
it calls, so the same source text is used for both targets and the CPU functions stay cacheable (``cache=True``).
The numpy reference (``_warp_numpy`` / ``_interpolate_numpy``) is a vectorised transcription of the same arithmetic,
in the same order, and is the oracle of the tests.

Two CPU loops are specialised (``_FLAT_LOOPS``), on one layout: flat arrays, arithmetic in the data's precision
(float32 is twice the SIMD width of float64), the neighbours at constant flat offsets, unsigned indices.
``_warp3_flat_cpu`` serves the solvers' moving-image warp (a scalar 3-D image, linear, modes "border" and "itk") and,
like its 2-D counterpart ``_warp2_field_cpu``, ndim-channel images (displacement fields) warped linearly in mode
"border" through a displacement field, i.e. field composition, the inner step of scaling and squaring (also used by
:func:`classreg.kernels.fields.compose` to add ``v`` in the same pass); the general loop's strided channel stores keep
LLVM from vectorising it for fields. For float64 they compute the general loop's values bit for bit; for float32 they
differ from them by the float32 rounding of coordinates and weights (~1e-6 relative).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _backend

__all__ = ["warp", "interpolate", "MODES", "ORDERS"]

#: Boundary modes accepted by :func:`warp` and :func:`interpolate` (name -> code used by the kernels).
MODES = {"zero": 0, "border": 1, "itk": 2}
#: Interpolation orders: 0 nearest neighbour, 1 (multi)linear, 3 cubic B-spline.
ORDERS = (0, 1, 3)

_ZERO, _BORDER, _ITK = 0, 1, 2
#: Padding (voxels) added before B-spline prefiltering in modes "zero" and "border", as scipy.ndimage does.
_NPAD = 12

# Names rebound by the builders: ``prange`` -> numba.prange (CPU), ``cuda`` -> numba.cuda (GPU).  As plain Python
# (``prange = range``) the CPU loops below also run uncompiled, which helps debugging.
prange = range
cuda = None
# Float type, index type and channel count of the flat-offset loops (``_FLAT_LOOPS``), rebound per compiled variant.
ft = np.float64
it = np.uint64
nch = 1


# ----------------------------------------------------------------------------------------------------------------------
# Scalar bodies (compiled for both targets; no numpy calls, no allocation).  The linear and nearest bodies are
# branch-free (conditional expressions on values that LLVM turns into selects; every load uses a clamped, valid
# index), so that the CPU loops over the last output axis vectorise (AVX2/AVX-512 gathers).
# ----------------------------------------------------------------------------------------------------------------------


def _clampi(j, n):
    """Clamp an integer index to ``[0, n - 1]``."""
    j = j if j > 0 else 0
    return j if j < n - 1 else n - 1


def _mirror_index(j, n):
    """Whole-sample symmetric extension (ITK's B-spline boundary): ``-j -> j``, ``n - 1 + j -> n - 1 - j``."""
    if n == 1:
        return 0
    period = 2 * n - 2
    j = abs(j) % period
    if j >= n:
        j = period - j
    return j


def _ext_index(j, n, mode):
    """Index of a B-spline neighbour after boundary extension, and whether it is inside (mode "zero")."""
    if mode == 0:
        jc = _clampi(j, n)
        return jc, jc == j
    if mode == 1:
        return _clampi(j, n), True
    return _mirror_index(j, n), True


def _bspline3_weights(t):
    """Cubic B-spline weights of the neighbours ``floor(c) - 1 .. floor(c) + 2`` for ``t = c - floor(c)``.

    Plain arithmetic: works on scalars (compiled kernels) and on numpy arrays (reference).
    """
    s = ft(1.0) - t
    t2 = t * t
    t3 = t2 * t
    w0 = s * s * s / ft(6.0)
    w1 = (ft(3.0) * t3 - ft(6.0) * t2 + ft(4.0)) / ft(6.0)
    w2 = (ft(-3.0) * t3 + ft(3.0) * t2 + ft(3.0) * t + ft(1.0)) / ft(6.0)
    w3 = t3 / ft(6.0)
    return w0, w1, w2, w3


def _inside(c, n, mode):
    """False for NaN, and in mode "itk" for ``c`` outside ``[-0.5, n - 0.5)`` (ITK's ``IsInsideBuffer``)."""
    return (c == c) & ((mode != 2) | ((c >= ft(-0.5)) & (c < ft(n) - ft(0.5))))


def _near_axis(c, n, mode):
    """Nearest sample ``floor(c + 0.5)`` along one axis: ``(j, valid, ok)``; ``j`` is always a valid index,
    ``valid = False`` marks a neighbour outside the grid (mode "zero"), ``ok = False`` a point that is cval."""
    ok = _inside(c, n, mode)
    c = c if ok else ft(0.0)
    c = c if c > ft(-1.0) else ft(-1.0)
    c = c if c < ft(n) else ft(n)
    j = int(math.floor(c + ft(0.5)))
    jc = _clampi(j, n)
    return jc, (jc == j) | (mode != 0), ok


def _cub_axis(c, n, mode):
    """Cubic B-spline neighbours along one axis: ``(j0..j3, valid0..valid3, w0..w3, ok)``.

    Outside modes "itk" the coordinate is first clamped to ``[-3, n + 2]`` (beyond, every neighbour is outside or
    clamped to the edge anyway); neighbours are then extended by mode: "zero" outside -> cval, "border" clamped,
    "itk" mirrored.
    """
    ok = _inside(c, n, mode)
    c = c if ok else ft(0.0)
    if mode != 2:
        c = c if c > ft(-3.0) else ft(-3.0)
        c = c if c < ft(n) + ft(2.0) else ft(n) + ft(2.0)
    f = math.floor(c)
    t = c - ft(f)
    j = int(f) - 1
    w0, w1, w2, w3 = _bspline3_weights(t)
    j0, v0 = _ext_index(j, n, mode)
    j1, v1 = _ext_index(j + 1, n, mode)
    j2, v2 = _ext_index(j + 2, n, mode)
    j3, v3 = _ext_index(j + 3, n, mode)
    return j0, j1, j2, j3, v0, v1, v2, v3, w0, w1, w2, w3, ok


def _pick2(img, j0, j1, ch, valid, cval):
    v = img[j0, j1, ch]
    return v if valid else cval


def _pick3(img, j0, j1, j2, ch, valid, cval):
    v = img[j0, j1, j2, ch]
    return v if valid else cval


def _near2_value(img, c0, c1, ch, mode, cval):
    j0, v0, ok0 = _near_axis(c0, img.shape[0], mode)
    j1, v1, ok1 = _near_axis(c1, img.shape[1], mode)
    return _pick2(img, j0, j1, ch, v0 & v1 & ok0 & ok1, cval)


def _near3_value(img, c0, c1, c2, ch, mode, cval):
    j0, v0, ok0 = _near_axis(c0, img.shape[0], mode)
    j1, v1, ok1 = _near_axis(c1, img.shape[1], mode)
    j2, v2, ok2 = _near_axis(c2, img.shape[2], mode)
    return _pick3(img, j0, j1, j2, ch, v0 & v1 & v2 & ok0 & ok1 & ok2, cval)


def _lin2_value(img, c0, c1, ch, mode, cval):
    # Written flat (no tuple-returning helper calls) so that the CPU loop over the last axis vectorises; the
    # arithmetic is that of the numpy reference ``_axis_numpy`` (order 1), in the same order.
    s0 = img.shape[0]
    s1 = img.shape[1]
    ok = (c0 == c0) & (c1 == c1)
    ok = ok & ((mode != 2) | ((c0 >= ft(-0.5)) & (c0 < ft(s0) - ft(0.5)) & (c1 >= ft(-0.5)) & (c1 < ft(s1) - ft(0.5))))
    lo = ft(-2.0) if mode == 0 else ft(0.0)
    hi0 = ft(s0) + ft(1.0) if mode == 0 else ft(s0) - ft(1.0)
    hi1 = ft(s1) + ft(1.0) if mode == 0 else ft(s1) - ft(1.0)
    c0 = c0 if ok else ft(0.0)
    c1 = c1 if ok else ft(0.0)
    c0 = c0 if c0 > lo else lo
    c0 = c0 if c0 < hi0 else hi0
    c1 = c1 if c1 > lo else lo
    c1 = c1 if c1 < hi1 else hi1
    f0 = math.floor(c0)
    f1 = math.floor(c1)
    t0 = c0 - ft(f0)
    t1 = c1 - ft(f1)
    j0 = int(f0)
    j1 = int(f1)
    a0 = _clampi(j0, s0)
    b0 = _clampi(j0 + 1, s0)
    a1 = _clampi(j1, s1)
    b1 = _clampi(j1 + 1, s1)
    va0 = (a0 == j0) | (mode != 0)
    vb0 = (b0 == j0 + 1) | (mode != 0)
    va1 = (a1 == j1) | (mode != 0)
    vb1 = (b1 == j1 + 1) | (mode != 0)
    v00 = img[a0, a1, ch]
    v01 = img[a0, b1, ch]
    v10 = img[b0, a1, ch]
    v11 = img[b0, b1, ch]
    v00 = v00 if (va0 & va1) else cval
    v01 = v01 if (va0 & vb1) else cval
    v10 = v10 if (vb0 & va1) else cval
    v11 = v11 if (vb0 & vb1) else cval
    s0w = ft(1.0) - t0
    s1w = ft(1.0) - t1
    v = s0w * (s1w * v00 + t1 * v01) + t0 * (s1w * v10 + t1 * v11)
    return v if ok else cval


def _lin3_value(img, c0, c1, c2, ch, mode, cval):
    # Flat like ``_lin2_value`` (vectorises on the CPU); same arithmetic as the numpy reference.
    s0 = img.shape[0]
    s1 = img.shape[1]
    s2 = img.shape[2]
    ok = (c0 == c0) & (c1 == c1) & (c2 == c2)
    ok = ok & ((mode != 2) | ((c0 >= ft(-0.5)) & (c0 < ft(s0) - ft(0.5)) & (c1 >= ft(-0.5)) & (c1 < ft(s1) - ft(0.5))
                             & (c2 >= ft(-0.5)) & (c2 < ft(s2) - ft(0.5))))
    lo = ft(-2.0) if mode == 0 else ft(0.0)
    hi0 = ft(s0) + ft(1.0) if mode == 0 else ft(s0) - ft(1.0)
    hi1 = ft(s1) + ft(1.0) if mode == 0 else ft(s1) - ft(1.0)
    hi2 = ft(s2) + ft(1.0) if mode == 0 else ft(s2) - ft(1.0)
    c0 = c0 if ok else ft(0.0)
    c1 = c1 if ok else ft(0.0)
    c2 = c2 if ok else ft(0.0)
    c0 = c0 if c0 > lo else lo
    c0 = c0 if c0 < hi0 else hi0
    c1 = c1 if c1 > lo else lo
    c1 = c1 if c1 < hi1 else hi1
    c2 = c2 if c2 > lo else lo
    c2 = c2 if c2 < hi2 else hi2
    f0 = math.floor(c0)
    f1 = math.floor(c1)
    f2 = math.floor(c2)
    t0 = c0 - ft(f0)
    t1 = c1 - ft(f1)
    t2 = c2 - ft(f2)
    j0 = int(f0)
    j1 = int(f1)
    j2 = int(f2)
    a0 = _clampi(j0, s0)
    b0 = _clampi(j0 + 1, s0)
    a1 = _clampi(j1, s1)
    b1 = _clampi(j1 + 1, s1)
    a2 = _clampi(j2, s2)
    b2 = _clampi(j2 + 1, s2)
    va0 = (a0 == j0) | (mode != 0)
    vb0 = (b0 == j0 + 1) | (mode != 0)
    va1 = (a1 == j1) | (mode != 0)
    vb1 = (b1 == j1 + 1) | (mode != 0)
    va2 = (a2 == j2) | (mode != 0)
    vb2 = (b2 == j2 + 1) | (mode != 0)
    v000 = img[a0, a1, a2, ch]
    v001 = img[a0, a1, b2, ch]
    v010 = img[a0, b1, a2, ch]
    v011 = img[a0, b1, b2, ch]
    v100 = img[b0, a1, a2, ch]
    v101 = img[b0, a1, b2, ch]
    v110 = img[b0, b1, a2, ch]
    v111 = img[b0, b1, b2, ch]
    v000 = v000 if (va0 & va1 & va2) else cval
    v001 = v001 if (va0 & va1 & vb2) else cval
    v010 = v010 if (va0 & vb1 & va2) else cval
    v011 = v011 if (va0 & vb1 & vb2) else cval
    v100 = v100 if (vb0 & va1 & va2) else cval
    v101 = v101 if (vb0 & va1 & vb2) else cval
    v110 = v110 if (vb0 & vb1 & va2) else cval
    v111 = v111 if (vb0 & vb1 & vb2) else cval
    s1w = ft(1.0) - t1
    s2w = ft(1.0) - t2
    r0 = s1w * (s2w * v000 + t2 * v001) + t1 * (s2w * v010 + t2 * v011)
    r1 = s1w * (s2w * v100 + t2 * v101) + t1 * (s2w * v110 + t2 * v111)
    v = (ft(1.0) - t0) * r0 + t0 * r1
    return v if ok else cval


def _blend3(img, a0, a1, a2, b0, b1, b2, t0, t1, t2, ch):
    """Trilinear blend of channel ``ch`` between neighbours ``a`` (floor) and ``b`` (next), same order as above."""
    s1w = ft(1.0) - t1
    s2w = ft(1.0) - t2
    r0 = s1w * (s2w * img[a0, a1, a2, ch] + t2 * img[a0, a1, b2, ch]) + t1 * (
        s2w * img[a0, b1, a2, ch] + t2 * img[a0, b1, b2, ch])
    r1 = s1w * (s2w * img[b0, a1, a2, ch] + t2 * img[b0, a1, b2, ch]) + t1 * (
        s2w * img[b0, b1, a2, ch] + t2 * img[b0, b1, b2, ch])
    return (ft(1.0) - t0) * r0 + t0 * r1


def _blend2(img, a0, a1, b0, b1, t0, t1, ch):
    """Bilinear blend of channel ``ch`` (as ``_lin2_value``)."""
    s1w = ft(1.0) - t1
    return (ft(1.0) - t0) * (s1w * img[a0, a1, ch] + t1 * img[a0, b1, ch]) + t0 * (s1w * img[b0, a1, ch]
                                                                             + t1 * img[b0, b1, ch])


def _cub_row2(img, i0, vi, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval):
    return (
        w0 * _pick2(img, i0, k0, ch, vi & u0, cval)
        + w1 * _pick2(img, i0, k1, ch, vi & u1, cval)
        + w2 * _pick2(img, i0, k2, ch, vi & u2, cval)
        + w3 * _pick2(img, i0, k3, ch, vi & u3, cval)
    )


def _cub_row3(img, i0, i1, vi, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval):
    return (
        w0 * _pick3(img, i0, i1, k0, ch, vi & u0, cval)
        + w1 * _pick3(img, i0, i1, k1, ch, vi & u1, cval)
        + w2 * _pick3(img, i0, i1, k2, ch, vi & u2, cval)
        + w3 * _pick3(img, i0, i1, k3, ch, vi & u3, cval)
    )


def _cub2_value(img, c0, c1, ch, mode, cval):
    a0, a1, a2, a3, p0, p1, p2, p3, x0, x1, x2, x3, ok0 = _cub_axis(c0, img.shape[0], mode)
    k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ok1 = _cub_axis(c1, img.shape[1], mode)
    v = (
        x0 * _cub_row2(img, a0, p0, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
        + x1 * _cub_row2(img, a1, p1, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
        + x2 * _cub_row2(img, a2, p2, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
        + x3 * _cub_row2(img, a3, p3, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
    )
    return v if (ok0 & ok1) else cval


def _cub_plane3(img, i0, vi, j0, j1, j2, j3, q0, q1, q2, q3, y0, y1, y2, y3, k0, k1, k2, k3, u0, u1, u2, u3,
                w0, w1, w2, w3, ch, cval):  # fmt: skip
    return (
        y0 * _cub_row3(img, i0, j0, vi & q0, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
        + y1 * _cub_row3(img, i0, j1, vi & q1, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
        + y2 * _cub_row3(img, i0, j2, vi & q2, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
        + y3 * _cub_row3(img, i0, j3, vi & q3, k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
    )


def _cub3_value(img, c0, c1, c2, ch, mode, cval):
    a0, a1, a2, a3, p0, p1, p2, p3, x0, x1, x2, x3, ok0 = _cub_axis(c0, img.shape[0], mode)
    j0, j1, j2, j3, q0, q1, q2, q3, y0, y1, y2, y3, ok1 = _cub_axis(c1, img.shape[1], mode)
    k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ok2 = _cub_axis(c2, img.shape[2], mode)
    v = (
        x0 * _cub_plane3(img, a0, p0, j0, j1, j2, j3, q0, q1, q2, q3, y0, y1, y2, y3,
                         k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
        + x1 * _cub_plane3(img, a1, p1, j0, j1, j2, j3, q0, q1, q2, q3, y0, y1, y2, y3,
                           k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
        + x2 * _cub_plane3(img, a2, p2, j0, j1, j2, j3, q0, q1, q2, q3, y0, y1, y2, y3,
                           k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
        + x3 * _cub_plane3(img, a3, p3, j0, j1, j2, j3, q0, q1, q2, q3, y0, y1, y2, y3,
                           k0, k1, k2, k3, u0, u1, u2, u3, w0, w1, w2, w3, ch, cval)
    )  # fmt: skip
    return v if (ok0 & ok1 & ok2) else cval


def _sample2(img, c0, c1, ch, order, mode, cval):
    if order == 1:
        return _lin2_value(img, c0, c1, ch, mode, cval)
    if order == 0:
        return _near2_value(img, c0, c1, ch, mode, cval)
    return _cub2_value(img, c0, c1, ch, mode, cval)


def _sample3(img, c0, c1, c2, ch, order, mode, cval):
    if order == 1:
        return _lin3_value(img, c0, c1, c2, ch, mode, cval)
    if order == 0:
        return _near3_value(img, c0, c1, c2, ch, mode, cval)
    return _cub3_value(img, c0, c1, c2, ch, mode, cval)


def _affine2(i0, i1, m, off):
    """``m @ i + off`` (``m`` flattened row-major), summed left to right."""
    return m[0] * ft(i0) + m[1] * ft(i1) + off[0], m[2] * ft(i0) + m[3] * ft(i1) + off[1]


def _affine3(i0, i1, i2, m, off):
    return (
        m[0] * ft(i0) + m[1] * ft(i1) + m[2] * ft(i2) + off[0],
        m[3] * ft(i0) + m[4] * ft(i1) + m[5] * ft(i2) + off[1],
        m[6] * ft(i0) + m[7] * ft(i1) + m[8] * ft(i2) + off[2],
    )


def _coord2(disp, p, i0, i1, m, off, dm):
    """Input continuous index of output voxel ``p = (i0, i1)``: ``(m @ i + off) + dm @ disp[p]``."""
    c0, c1 = _affine2(i0, i1, m, off)
    d0 = disp[p, 0]
    d1 = disp[p, 1]
    return c0 + (dm[0] * d0 + dm[1] * d1), c1 + (dm[2] * d0 + dm[3] * d1)


def _coord3(disp, p, i0, i1, i2, m, off, dm):
    c0, c1, c2 = _affine3(i0, i1, i2, m, off)
    d0 = disp[p, 0]
    d1 = disp[p, 1]
    d2 = disp[p, 2]
    return (
        c0 + (dm[0] * d0 + dm[1] * d1 + dm[2] * d2),
        c1 + (dm[3] * d0 + dm[4] * d1 + dm[5] * d2),
        c2 + (dm[6] * d0 + dm[7] * d1 + dm[8] * d2),
    )


_BODIES = (
    _clampi,
    _mirror_index,
    _ext_index,
    _bspline3_weights,
    _inside,
    _near_axis,
    _cub_axis,
    _pick2,
    _pick3,
    _near2_value,
    _near3_value,
    _lin2_value,
    _lin3_value,
    _blend3,
    _blend2,
    _cub_row2,
    _cub_row3,
    _cub_plane3,
    _cub2_value,
    _cub3_value,
    _sample2,
    _sample3,
    _affine2,
    _affine3,
    _coord2,
    _coord3,
)

# Helpers inlined at numba-IR level on the CPU: LLVM does not reliably inline numba's tuple-returning calls, and the
# linear/nearest loops only vectorise when their whole body is inlined.  The cubic helpers stay calls (inlining them
# too makes the first compilation take minutes).
_CPU_INLINE = frozenset(
    (
        "_clampi",
        "_inside",
        "_near_axis",
        "_pick2",
        "_pick3",
        "_near2_value",
        "_near3_value",
        "_lin2_value",
        "_lin3_value",
        "_blend3",
        "_blend2",
        "_affine2",
        "_affine3",
        "_coord2",
        "_coord3",
    )
)


# ----------------------------------------------------------------------------------------------------------------------
# Outer loops.  CPU: prange over the first output axis, channels outside the innermost loop so that it vectorises;
# one small loop per order.  GPU: one thread per output point.
# ----------------------------------------------------------------------------------------------------------------------


def _warp2_near_cpu(img, disp, out, n0, n1, m, off, dm, has_disp, mode, cval):
    for i0 in prange(n0):
        base = i0 * n1
        for ch in range(img.shape[2]):
            if has_disp:
                for i1 in range(n1):
                    c0, c1 = _coord2(disp, base + i1, i0, i1, m, off, dm)
                    out[base + i1, ch] = _near2_value(img, c0, c1, ch, mode, cval)
            else:
                for i1 in range(n1):
                    c0, c1 = _affine2(i0, i1, m, off)
                    out[base + i1, ch] = _near2_value(img, c0, c1, ch, mode, cval)


def _warp2_lin_cpu(img, disp, out, n0, n1, m, off, dm, has_disp, mode, cval):
    for i0 in prange(n0):
        base = i0 * n1
        for ch in range(img.shape[2]):
            if has_disp:
                for i1 in range(n1):
                    c0, c1 = _coord2(disp, base + i1, i0, i1, m, off, dm)
                    out[base + i1, ch] = _lin2_value(img, c0, c1, ch, mode, cval)
            else:
                for i1 in range(n1):
                    c0, c1 = _affine2(i0, i1, m, off)
                    out[base + i1, ch] = _lin2_value(img, c0, c1, ch, mode, cval)


def _warp2_cub_cpu(img, disp, out, n0, n1, m, off, dm, has_disp, mode, cval):
    for i0 in prange(n0):
        base = i0 * n1
        for i1 in range(n1):
            if has_disp:
                c0, c1 = _coord2(disp, base + i1, i0, i1, m, off, dm)
            else:
                c0, c1 = _affine2(i0, i1, m, off)
            for ch in range(img.shape[2]):
                out[base + i1, ch] = _cub2_value(img, c0, c1, ch, mode, cval)


def _warp2_field_cpu(img, disp, out, n0, n1, s0, s1, m, off, dm, cval, add_disp):
    # 2-D counterpart of ``_warp3_flat_cpu`` (below) for 2-channel fields, linear, mode "border".
    zero = ft(0.0)
    one = ft(1.0)
    cv = ft(cval)
    h0 = ft(s0 - 1)
    h1 = ft(s1 - 1)
    g0 = it(max(s0 - 2, 0))
    g1 = it(max(s1 - 2, 0))
    st0 = it(2 * s1 if s0 > 1 else 0)
    st1 = it(2 if s1 > 1 else 0)
    nch = it(2)
    mc0 = ft(m[1])
    mc1 = ft(m[3])
    of0 = ft(off[0])
    of1 = ft(off[1])
    e0 = ft(dm[0])
    e1 = ft(dm[1])
    e2 = ft(dm[2])
    e3 = ft(dm[3])
    q1 = np.uint64(1)
    for i0 in prange(n0):
        db = np.empty((2, n1), img.dtype)
        cb0 = np.empty(n1, img.dtype)
        cb1 = np.empty(n1, img.dtype)
        pb = np.empty(n1, it)
        okb = np.empty(n1, np.int32)
        ob = np.empty((2, n1), img.dtype)
        qb = np.uint64(2 * i0 * n1)
        r0 = ft(m[0] * i0)
        r1 = ft(m[2] * i0)
        for i1 in range(n1):
            q = qb + np.uint64(2 * i1)
            d0 = disp[q]
            d1 = disp[q + q1]
            db[0, i1] = d0
            db[1, i1] = d1
            cb0[i1] = ((r0 + mc0 * ft(i1)) + of0) + (e0 * d0 + e1 * d1)
            cb1[i1] = ((r1 + mc1 * ft(i1)) + of1) + (e2 * d0 + e3 * d1)
        for i1 in range(n1):
            c0 = cb0[i1]
            c1 = cb1[i1]
            ok = (c0 == c0) & (c1 == c1)
            c0 = min(max(c0 if ok else zero, zero), h0)
            c1 = min(max(c1 if ok else zero, zero), h1)
            a0 = min(it(c0), g0)
            a1 = min(it(c1), g1)
            cb0[i1] = c0 - ft(a0)
            cb1[i1] = c1 - ft(a1)
            pb[i1] = a0 * st0 + a1 * nch
            okb[i1] = 1 if ok else 0
        for i1 in range(n1):
            t0 = cb0[i1]
            t1 = cb1[i1]
            s0w = one - t0
            s1w = one - t1
            ok = okb[i1] != 0
            p = pb[i1]
            for ch in range(2):
                q = p + it(ch)
                v = s0w * (s1w * img[q] + t1 * img[q + st1]) + t0 * (s1w * img[q + st0] + t1 * img[q + st0 + st1])
                ob[ch, i1] = v if ok else cv
        if add_disp:
            for i1 in range(n1):
                q = qb + np.uint64(2 * i1)
                out[q] = ob[0, i1] + db[0, i1]
                out[q + q1] = ob[1, i1] + db[1, i1]
        else:
            for i1 in range(n1):
                q = qb + np.uint64(2 * i1)
                out[q] = ob[0, i1]
                out[q + q1] = ob[1, i1]


def _warp3_near_cpu(img, disp, out, n0, n1, n2, m, off, dm, has_disp, mode, cval):
    for i0 in prange(n0):
        for i1 in range(n1):
            base = (i0 * n1 + i1) * n2
            for ch in range(img.shape[3]):
                if has_disp:
                    for i2 in range(n2):
                        c0, c1, c2 = _coord3(disp, base + i2, i0, i1, i2, m, off, dm)
                        out[base + i2, ch] = _near3_value(img, c0, c1, c2, ch, mode, cval)
                else:
                    for i2 in range(n2):
                        c0, c1, c2 = _affine3(i0, i1, i2, m, off)
                        out[base + i2, ch] = _near3_value(img, c0, c1, c2, ch, mode, cval)


def _warp3_lin_cpu(img, disp, out, n0, n1, n2, m, off, dm, has_disp, mode, cval):
    for i0 in prange(n0):
        for i1 in range(n1):
            base = (i0 * n1 + i1) * n2
            for ch in range(img.shape[3]):
                if has_disp:
                    for i2 in range(n2):
                        c0, c1, c2 = _coord3(disp, base + i2, i0, i1, i2, m, off, dm)
                        out[base + i2, ch] = _lin3_value(img, c0, c1, c2, ch, mode, cval)
                else:
                    for i2 in range(n2):
                        c0, c1, c2 = _affine3(i0, i1, i2, m, off)
                        out[base + i2, ch] = _lin3_value(img, c0, c1, c2, ch, mode, cval)


def _warp3_flat_cpu(img, disp, out, n0, n1, n2, s0, s1, s2, m, off, dm, has_disp, itk, cval, add_disp):
    # Linear 3-D warp on flat arrays of ``nch`` channels (a global bound per compiled variant, as are ``ft``, the
    # image's float type, and ``it``, the index type: uint32 below 2**32 voxels, 1.4x faster than 64-bit for
    # float32). nch = 1: the solvers' moving-image warp, mode "border" (itk=False) or "itk" (itk=True), 2.5x
    # (float32) and 2x (float64) faster than the general loop at 128^3. nch = 3: a displacement field in mode
    # "border" through a displacement field, ``add_disp`` adding ``disp`` to the result (the composition of two
    # fields); 1.25-1.55x (float32) and 1.05-1.4x (float64) faster than the float64 field loop it replaced, itself
    # 2-2.5x faster than the general loop, whose strided channel stores keep LLVM from vectorising it.
    # Arithmetic is in ``ft``: for float64 the operations of ``_lin3_value`` in the same order (bitwise its values
    # for a finite image), for float32 twice the SIMD width (it differs from the float64 reference by the float32
    # rounding of coordinates and weights, ~5e-6 relative at 70 voxels). Each row runs as three loops that LLVM
    # vectorises: coordinates from the displacement row; their validity, neighbour index and weights; the gathers
    # (AVX2/AVX-512) and the blend (fusing the first two, or all three, was 20-35 % slower); the channels of a field
    # share the neighbours and weights and go to a planar row buffer before the strided store. Indices LLVM cannot
    # prove non-negative are unsigned: numba wraps negative signed indices (a compare and select per access), which
    # cost 1.3-1.4x and turned the stride-3 displacement read into gathers instead of shuffles. The lower neighbour
    # along an axis is clamped to ``s - 2`` (weight 1 on the upper one at the last sample instead of weight 0 past
    # it; the same value unless that neighbour is not finite), so that the eight neighbours sit at constant flat
    # offsets; an axis of length 1 gets offset 0.
    zero = ft(0.0)
    one = ft(1.0)
    lo = ft(-0.5)
    cv = ft(cval)
    h0 = ft(s0 - 1)
    h1 = ft(s1 - 1)
    h2 = ft(s2 - 1)
    u0 = ft(s0 - 0.5)
    u1 = ft(s1 - 0.5)
    u2 = ft(s2 - 0.5)
    g0 = it(max(s0 - 2, 0))
    g1 = it(max(s1 - 2, 0))
    g2 = it(max(s2 - 2, 0))
    st0 = it(nch * s1 * s2 if s0 > 1 else 0)
    st1 = it(nch * s2 if s1 > 1 else 0)
    st2 = it(nch if s2 > 1 else 0)
    stc = it(nch)
    mc0 = ft(m[2])
    mc1 = ft(m[5])
    mc2 = ft(m[8])
    of0 = ft(off[0])
    of1 = ft(off[1])
    of2 = ft(off[2])
    e0 = ft(dm[0])
    e1 = ft(dm[1])
    e2 = ft(dm[2])
    e3 = ft(dm[3])
    e4 = ft(dm[4])
    e5 = ft(dm[5])
    e6 = ft(dm[6])
    e7 = ft(dm[7])
    e8 = ft(dm[8])
    q1 = np.uint64(1)
    q2 = np.uint64(2)
    for i0 in prange(n0):
        db = np.empty((3, n2), img.dtype)
        cb0 = np.empty(n2, img.dtype)
        cb1 = np.empty(n2, img.dtype)
        cb2 = np.empty(n2, img.dtype)
        pb = np.empty(n2, it)
        okb = np.empty(n2, np.int32)  # an int32 flag: a bool buffer costs ~25 % more (its i8 loads and stores)
        ob = np.empty((nch, n2), img.dtype)
        for i1 in range(n1):
            base = (i0 * n1 + i1) * n2
            r0 = ft(m[0] * i0 + m[1] * i1)
            r1 = ft(m[3] * i0 + m[4] * i1)
            r2 = ft(m[6] * i0 + m[7] * i1)
            qd = np.uint64(3 * base)
            if has_disp:
                for i2 in range(n2):
                    q = qd + np.uint64(3 * i2)
                    d0 = disp[q]
                    d1 = disp[q + q1]
                    d2 = disp[q + q2]
                    if nch == 3:  # kept for ``add_disp``
                        db[0, i2] = d0
                        db[1, i2] = d1
                        db[2, i2] = d2
                    cb0[i2] = ((r0 + mc0 * ft(i2)) + of0) + (e0 * d0 + e1 * d1 + e2 * d2)
                    cb1[i2] = ((r1 + mc1 * ft(i2)) + of1) + (e3 * d0 + e4 * d1 + e5 * d2)
                    cb2[i2] = ((r2 + mc2 * ft(i2)) + of2) + (e6 * d0 + e7 * d1 + e8 * d2)
            else:
                for i2 in range(n2):
                    cb0[i2] = (r0 + mc0 * ft(i2)) + of0
                    cb1[i2] = (r1 + mc1 * ft(i2)) + of1
                    cb2[i2] = (r2 + mc2 * ft(i2)) + of2
            for i2 in range(n2):
                c0 = cb0[i2]
                c1 = cb1[i2]
                c2 = cb2[i2]
                ok = (c0 == c0) & (c1 == c1) & (c2 == c2)
                if nch == 1:  # fields are warped in mode "border" only
                    ok = ok & ((not itk) | ((c0 >= lo) & (c0 < u0) & (c1 >= lo) & (c1 < u1) & (c2 >= lo)
                                            & (c2 < u2)))
                c0 = min(max(c0 if ok else zero, zero), h0)
                c1 = min(max(c1 if ok else zero, zero), h1)
                c2 = min(max(c2 if ok else zero, zero), h2)
                a0 = min(it(c0), g0)
                a1 = min(it(c1), g1)
                a2 = min(it(c2), g2)
                cb0[i2] = c0 - ft(a0)
                cb1[i2] = c1 - ft(a1)
                cb2[i2] = c2 - ft(a2)
                pb[i2] = a0 * st0 + a1 * st1 + a2 * stc
                okb[i2] = 1 if ok else 0
            qo = np.uint64(base)
            for i2 in range(n2):
                t0 = cb0[i2]
                t1 = cb1[i2]
                t2 = cb2[i2]
                s0w = one - t0
                s1w = one - t1
                s2w = one - t2
                ok = okb[i2] != 0
                p = pb[i2]
                for ch in range(nch):  # (``q = p + ch`` with ``p`` loaded once: 1.4x faster than reloading ``pb[i2]``)
                    q = p + it(ch) if nch > 1 else p  # (nch is a compile-time constant)
                    r0v = s1w * (s2w * img[q] + t2 * img[q + st2]) + t1 * (s2w * img[q + st1] + t2 * img[q + st1 + st2])
                    q = q + st0
                    r1v = s1w * (s2w * img[q] + t2 * img[q + st2]) + t1 * (s2w * img[q + st1] + t2 * img[q + st1 + st2])
                    v = s0w * r0v + t0 * r1v
                    if nch == 1:  # the scalar warp stores directly
                        out[qo + np.uint64(i2)] = v if ok else cv
                    else:
                        ob[ch, i2] = v if ok else cv
            if nch == 3 and add_disp:
                for i2 in range(n2):
                    q = qd + np.uint64(3 * i2)
                    out[q] = ob[0, i2] + db[0, i2]
                    out[q + q1] = ob[1, i2] + db[1, i2]
                    out[q + q2] = ob[2, i2] + db[2, i2]
            elif nch == 3:
                for i2 in range(n2):
                    q = qd + np.uint64(3 * i2)
                    out[q] = ob[0, i2]
                    out[q + q1] = ob[1, i2]
                    out[q + q2] = ob[2, i2]


def _warp3_cub_cpu(img, disp, out, n0, n1, n2, m, off, dm, has_disp, mode, cval):
    for i0 in prange(n0):
        for i1 in range(n1):
            base = (i0 * n1 + i1) * n2
            for i2 in range(n2):
                if has_disp:
                    c0, c1, c2 = _coord3(disp, base + i2, i0, i1, i2, m, off, dm)
                else:
                    c0, c1, c2 = _affine3(i0, i1, i2, m, off)
                for ch in range(img.shape[3]):
                    out[base + i2, ch] = _cub3_value(img, c0, c1, c2, ch, mode, cval)


def _interp2_cpu(img, pts, out, off, order, mode, cval):
    for p in prange(pts.shape[0]):
        c0 = pts[p, 0] + off[0]
        c1 = pts[p, 1] + off[1]
        for ch in range(img.shape[2]):
            out[p, ch] = _sample2(img, c0, c1, ch, order, mode, cval)


def _interp3_cpu(img, pts, out, off, order, mode, cval):
    for p in prange(pts.shape[0]):
        c0 = pts[p, 0] + off[0]
        c1 = pts[p, 1] + off[1]
        c2 = pts[p, 2] + off[2]
        for ch in range(img.shape[3]):
            out[p, ch] = _sample3(img, c0, c1, c2, ch, order, mode, cval)


def _warp2_gpu(img, disp, out, n0, n1, m, off, dm, has_disp, order, mode, cval):
    p = cuda.grid(1)
    if p < n0 * n1:
        i1 = p % n1
        i0 = p // n1
        if has_disp:
            c0, c1 = _coord2(disp, p, i0, i1, m, off, dm)
        else:
            c0, c1 = _affine2(i0, i1, m, off)
        for ch in range(img.shape[2]):
            out[p, ch] = _sample2(img, c0, c1, ch, order, mode, cval)


def _warp3_gpu(img, disp, out, n0, n1, n2, m, off, dm, has_disp, order, mode, cval):
    p = cuda.grid(1)
    if p < n0 * n1 * n2:
        i2 = p % n2
        q = p // n2
        i1 = q % n1
        i0 = q // n1
        if has_disp:
            c0, c1, c2 = _coord3(disp, p, i0, i1, i2, m, off, dm)
        else:
            c0, c1, c2 = _affine3(i0, i1, i2, m, off)
        for ch in range(img.shape[3]):
            out[p, ch] = _sample3(img, c0, c1, c2, ch, order, mode, cval)


def _interp2_gpu(img, pts, out, off, order, mode, cval):
    p = cuda.grid(1)
    if p < pts.shape[0]:
        c0 = pts[p, 0] + off[0]
        c1 = pts[p, 1] + off[1]
        for ch in range(img.shape[2]):
            out[p, ch] = _sample2(img, c0, c1, ch, order, mode, cval)


def _interp3_gpu(img, pts, out, off, order, mode, cval):
    p = cuda.grid(1)
    if p < pts.shape[0]:
        c0 = pts[p, 0] + off[0]
        c1 = pts[p, 1] + off[1]
        c2 = pts[p, 2] + off[2]
        for ch in range(img.shape[3]):
            out[p, ch] = _sample3(img, c0, c1, c2, ch, order, mode, cval)


_CPU_LOOPS = (
    _warp2_near_cpu,
    _warp2_lin_cpu,
    _warp2_cub_cpu,
    _warp3_near_cpu,
    _warp3_lin_cpu,
    _warp3_cub_cpu,
    _interp2_cpu,
    _interp3_cpu,
)
#: Flat-offset loops -> their channel counts: the float type ``ft``, index type ``it`` and channel count ``nch`` are
#: globals, bound per compiled variant.
_FLAT_LOOPS = {_warp2_field_cpu: (2,), _warp3_flat_cpu: (1, 3)}
_GPU_LOOPS = (_warp2_gpu, _warp3_gpu, _interp2_gpu, _interp3_gpu)


_rebind = _backend.rebind  # each function is compiled for one target only, so cache entries never collide


@functools.cache
def _numba_kernels():
    """Compile (lazily, cached on disk) the CPU kernels; returns ``{name: dispatcher}``."""
    import numba

    ns = dict(globals())
    ns["prange"] = numba.prange
    for f in _BODIES:
        opts = {"inline": "always"} if f.__name__ in _CPU_INLINE else {}
        ns[f.__name__] = _backend.njit(error_model="numpy", **opts)(_rebind(f, ns))
    out = {f.__name__: _backend.njit(parallel=True, error_model="numpy")(_rebind(f, ns)) for f in _CPU_LOOPS}
    for f, nchs in _FLAT_LOOPS.items():  # one variant per (channels, float type, index type): compiled on first use
        for nch in nchs:
            for ft in (np.float32, np.float64):
                for it in (np.uint32, np.uint64):
                    key = f"{f.__name__}_{nch}_{np.dtype(ft).name}_{np.dtype(it).name}"
                    out[key] = _backend.njit(parallel=True, error_model="numpy")(
                        _rebind(f, dict(ns, ft=ft, it=it, nch=nch), suffix="_" + key))
    return out


def _flat_kernel(name, img, nch):
    """The variant of flat-offset loop ``name`` for ``nch`` channels and ``img``'s dtype and size. Passing the types
    as arguments instead cost ~30 us per call (numba types a class argument slowly), a tenth of a 256² kernel."""
    it = np.uint32 if img.size < 2**32 else np.uint64  # numba wraps negative signed indices; 32 bits gather faster
    return _numba_kernels()[f"{name}_{nch}_{img.dtype.name}_{np.dtype(it).name}"]


def _field_numba(img, disp, out, out_shape, m, off, dm, cval, add_disp):
    """Linear, mode "border" warp of an ndim-channel image (a field; C-contiguous, channels-last) through ``disp``
    into ``out`` (C-contiguous), plus ``disp`` when ``add_disp``: the flat field loops."""
    ndim = len(out_shape)
    args = (img.reshape(-1), disp.reshape(-1), out.reshape(-1), *out_shape, *img.shape[:ndim], _flat(m), _flat(off),
            _flat(dm))
    if ndim == 3:
        _flat_kernel("_warp3_flat_cpu", img, 3)(*args, True, False, float(cval), add_disp)
    else:
        _flat_kernel("_warp2_field_cpu", img, 2)(*args, float(cval), add_disp)


@functools.cache
def _cuda_kernels(dtype="float64"):
    """Compile (lazily) the numba.cuda kernels for data of ``dtype`` ("float32" or "float64"); returns
    ``{name: kernel}``.

    The float type ``ft`` of the scalar bodies is ``dtype``: for float32 data every literal, coordinate, weight and
    sum is float32 (the kernels take ``matrix``, ``offset``, ``disp_matrix`` and ``cval`` as float32 scalars, see
    :func:`_params`), as PyTorch's ``grid_sample`` and FireANTs compute; consumer GPUs run float64 at 1/32-1/64 of
    the float32 rate. Each float32 operation on a coordinate rounds it by up to half an ulp of its magnitude:
    3.8e-6 voxel below index 128, 3e-5 at index 1000, 5e-4 at 16000 (a handful of such roundings per point; the
    displacement it adds is float32 data anyway). That is far below the sub-voxel accuracy of registration on the
    grids classreg handles (a few hundred voxels per axis: < 1e-4 voxel, tests/test_gpu_float32.py), so float64
    coordinates are not kept. Index arithmetic stays integer.
    """
    from numba import cuda as nb_cuda

    ns = dict(globals(), cuda=nb_cuda, ft=np.dtype(dtype).type)
    sfx = "" if dtype == "float64" else "_" + dtype
    for f in _BODIES:
        ns[f.__name__] = _backend.cuda_jit(_rebind(f, ns, sfx), device=True)
    return {f.__name__: _backend.cuda_jit(_rebind(f, ns, sfx)) for f in _GPU_LOOPS}


# ----------------------------------------------------------------------------------------------------------------------
# numpy reference (the test oracle): the same arithmetic in the same order, vectorised over points
# ----------------------------------------------------------------------------------------------------------------------


def _axis_numpy(c, n, order, mode):
    """Vectorised ``_near_axis`` / linear / ``_cub_axis``: (index arrays, validity arrays, weights, ok)."""
    ok = c == c
    if mode == _ITK:
        ok &= (c >= -0.5) & (c < n - 0.5)
    c = np.where(ok, c, 0.0)
    if order == 0:
        c = np.clip(c, -1.0, float(n))
        j = np.floor(c + 0.5).astype(np.intp)
        jc = np.clip(j, 0, n - 1)
        return [jc], [(jc == j) | (mode != _ZERO)], None, ok
    if order == 1:
        lo, hi = (-2.0, n + 1.0) if mode == _ZERO else (0.0, n - 1.0)
        c = np.clip(c, lo, hi)
        f = np.floor(c)
        t = c - f
        j = f.astype(np.intp)
        js = [j, j + 1]
    else:
        if mode != _ITK:
            c = np.clip(c, -3.0, n + 2.0)
        f = np.floor(c)
        t = c - f
        j = f.astype(np.intp) - 1
        js = [j + q for q in range(4)]
    if mode == _ITK and order == 3:
        if n == 1:
            jcs = [np.zeros_like(jq) for jq in js]
        else:
            period = 2 * n - 2
            jcs = [np.abs(jq) % period for jq in js]
            jcs = [np.where(jq >= n, period - jq, jq) for jq in jcs]
        valid = [np.ones(jq.shape, bool) for jq in js]
    else:
        jcs = [np.clip(jq, 0, n - 1) for jq in js]
        valid = [(jc == jq) | (mode != _ZERO) for jc, jq in zip(jcs, js)]
    return jcs, valid, (t if order == 1 else _bspline3_weights(t)), ok


def _sample_numpy(img, coords, order, mode, cval):
    """Reference sampler. ``img`` (*spatial, C); ``coords`` list of ndim float64 arrays (N,) -> float64 (N, C)."""
    ndim = len(coords)
    axes = [_axis_numpy(np.asarray(coords[k], dtype=np.float64), img.shape[k], order, mode) for k in range(ndim)]
    ok = np.logical_and.reduce([a[3] for a in axes])

    def fetch(sel):
        js = tuple(axes[k][0][sel[k]] for k in range(ndim))
        valid = np.logical_and.reduce([axes[k][1][sel[k]] for k in range(ndim)])
        return np.where(valid[:, None], img[js].astype(np.float64), cval)

    def blend(k, sel):
        if k == ndim:
            return fetch(sel)
        if order == 1:
            t = axes[k][2][:, None]
            return (1.0 - t) * blend(k + 1, sel + (0,)) + t * blend(k + 1, sel + (1,))
        w = axes[k][2]
        acc = w[0][:, None] * blend(k + 1, sel + (0,))
        for q in range(1, 4):
            acc = acc + w[q][:, None] * blend(k + 1, sel + (q,))
        return acc

    out = fetch((0,) * ndim) if order == 0 else blend(0, ())
    return np.where(ok[:, None], out, cval)


def _warp_numpy(img, disp, out_shape, m, off, dm, order, mode, cval):
    ndim = len(out_shape)
    grid = np.indices(out_shape, dtype=np.float64).reshape(ndim, -1)
    coords = []
    for k in range(ndim):
        acc = m[k, 0] * grid[0]
        for j in range(1, ndim):
            acc = acc + m[k, j] * grid[j]
        coords.append(acc + off[k])
    if disp is not None:
        d = disp.astype(np.float64)
        for k in range(ndim):
            acc = dm[k, 0] * d[:, 0]
            for j in range(1, ndim):
                acc = acc + dm[k, j] * d[:, j]
            coords[k] = coords[k] + acc
    return _sample_numpy(img, coords, order, mode, cval).astype(img.dtype)


def _interpolate_numpy(img, pts, off, order, mode, cval):
    coords = [pts[:, k] + off[k] for k in range(pts.shape[1])]
    return _sample_numpy(img, coords, order, mode, cval).astype(img.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# numba CPU and numba.cuda paths
# ----------------------------------------------------------------------------------------------------------------------


def _flat(a):
    return tuple(float(x) for x in np.ravel(a))


def _params(a, dtype):
    """The host matrix or scalar ``a`` as a tuple of ``dtype`` scalars: the arguments of the numba.cuda kernel
    variant for data of ``dtype`` (float32 scalars type the float32 variant's arguments as float32)."""
    return tuple(dtype.type(x) for x in np.ravel(a))


_ORDER_NAME = {0: "near", 1: "lin", 3: "cub"}


def _warp_numba(img, disp, out_shape, m, off, dm, order, mode, cval):
    ndim = len(out_shape)
    out = np.empty((math.prod(out_shape), img.shape[-1]), dtype=img.dtype)
    if order == 1 and mode == _BORDER and disp is not None and img.shape[-1] == ndim:
        _field_numba(img, disp, out, out_shape, m, off, dm, cval, False)
        return out
    has_disp = disp is not None
    if order == 1 and mode in (_BORDER, _ITK) and img.shape[-1] == 1 and ndim == 3:
        _flat_kernel("_warp3_flat_cpu", img, 1)(
            img.reshape(-1), disp.reshape(-1) if has_disp else np.zeros(ndim, img.dtype), out.reshape(-1),
            *out_shape, *img.shape[:ndim], _flat(m), _flat(off), _flat(dm), has_disp, mode == _ITK, float(cval),
            False)
        return out
    kern = _numba_kernels()[f"_warp{ndim}_{_ORDER_NAME[order]}_cpu"]
    if not has_disp:
        disp = np.zeros((1, ndim), dtype=img.dtype)
    kern(img, disp, out, *out_shape, _flat(m), _flat(off), _flat(dm), has_disp, mode, float(cval))
    return out


def _compose_numba(u, v, disp_matrix, out=None):
    """``warp(u, v, disp_matrix=disp_matrix, order=1, mode="border") + v`` in one pass (numba CPU; 2-D or 3-D fields
    of the same shape and dtype, channels-last): the composition of displacement fields used by
    :func:`classreg.kernels.fields.compose`. The sum is rounded like ``numpy``'s (sample rounded to the dtype, then
    added in the dtype), so the result is bit-identical to the two-step form. ``out``: a C-contiguous array of
    ``u``'s shape and dtype to write into (not ``u`` or ``v``)."""
    u = np.ascontiguousarray(u)
    v = np.ascontiguousarray(v, dtype=u.dtype)
    ndim = u.shape[-1]
    shape = u.shape[:ndim]
    out = np.empty_like(u) if out is None else out
    _field_numba(u, v, out, shape, np.eye(ndim), np.zeros(ndim), disp_matrix, 0.0, True)
    return out


def _squarings_numba(u, n, disp_matrix):
    """``n`` times ``u <- compose(u, u)`` (numba CPU, order 1, mode "border"): the squaring steps of
    :func:`classreg.kernels.fields.expmap`, ping-ponging between ``u`` (C-contiguous, overwritten: pass a scratch
    array) and one more buffer instead of a new array and a checked ``compose`` call per step; bitwise the same."""
    a, b = u, (np.empty_like(u) if n else None)
    for _ in range(n):
        a, b = _compose_numba(a, a, disp_matrix, out=b), a
    return a


def _interpolate_numba(img, pts, off, order, mode, cval):
    kern = _numba_kernels()[f"_interp{pts.shape[1]}_cpu"]
    out = np.empty((pts.shape[0], img.shape[-1]), dtype=img.dtype)
    if pts.shape[0]:
        kern(img, pts, out, _flat(off), order, mode, float(cval))
    return out


def _warp_cuda(img, disp, out_shape, m, off, dm, order, mode, cval):
    xp = _backend.get_array_module(img)
    ndim = len(out_shape)
    n = math.prod(out_shape)
    dt = img.dtype
    kern = _cuda_kernels(dt.name)[f"_warp{ndim}_gpu"]
    out = xp.empty((n, img.shape[-1]), dtype=dt)
    has_disp = disp is not None
    if not has_disp:
        disp = xp.zeros((1, ndim), dtype=dt)
    _backend.launch(kern, n, img, disp, out, *out_shape, _params(m, dt), _params(off, dt), _params(dm, dt), has_disp,
                    order, mode, dt.type(cval))
    return out


def _interpolate_cuda(img, pts, off, order, mode, cval):
    xp = _backend.get_array_module(img)
    n = pts.shape[0]
    dt = img.dtype
    kern = _cuda_kernels(dt.name)[f"_interp{pts.shape[1]}_gpu"]
    out = xp.empty((n, img.shape[-1]), dtype=dt)
    if n:
        _backend.launch(kern, n, img, pts, out, _params(off, dt), order, mode, dt.type(cval))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Argument handling shared by warp() and interpolate()
# ----------------------------------------------------------------------------------------------------------------------


def _work_dtype(dtype, name):
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise TypeError(f"{name} must be real-valued, got complex dtype {dtype}")
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must have a numeric dtype, got {dtype}")
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _as_array(a, name):
    if _backend.is_cupy_array(a) or isinstance(a, np.ndarray):
        return a
    try:
        return np.asarray(a)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be an array, got {type(a).__name__}") from exc


def _host_matrix(a, name, shape):
    if a is None:
        return None
    if _backend.is_cupy_array(a):
        a = a.get()
    try:
        a = np.array(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real numeric array") from exc
    if a.ndim == 0 and len(shape) == 1:
        a = np.full(shape, float(a))
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _check_order_mode(order, mode):
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or int(order) not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    return int(order), MODES[mode]


def _check_cval(cval):
    try:
        return float(cval)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cval must be a real number, got {cval!r}") from exc


def _xp_for(backend, *arrays):
    """Array module for a resolved backend, and whether results must be copied back to the host: device inputs
    stay on their device (no copy either way); host inputs of backend "cuda" go up and come back (on a GPU; the
    simulator takes host arrays)."""
    if any(_backend.is_cupy_array(a) for a in arrays if a is not None):
        return _backend.get_array_module(*arrays), False
    if backend == "cuda" and not _backend.cuda_simulator():
        import cupy

        return cupy, True
    return np, False


def _to_xp(a, xp, dtype):
    if a is None:
        return None
    if xp is np:
        return np.ascontiguousarray(a, dtype=dtype)
    return xp.ascontiguousarray(xp.asarray(a), dtype=dtype)


def _spline_coefficients(img, ndim, mode, cval, xp):
    """Cubic B-spline coefficients of ``img`` (*spatial, C) along the spatial axes, as scipy.ndimage does.

    Mode "itk": ``spline_filter1d(mode="mirror")`` (ITK's boundary).  Modes "zero"/"border": pad by 12 voxels with
    ``cval`` / edge values then filter with scipy's mode ("grid-constant"/"nearest"), exactly like
    ``scipy.ndimage.map_coordinates``.  Returns (coefficients in the working dtype, padding).
    """
    if xp is np:
        from scipy.ndimage import spline_filter1d
    else:  # pragma: no cover - needs a GPU
        from cupyx.scipy.ndimage import spline_filter1d
    if mode == _ITK:
        coef, npad, fmode = img, 0, "mirror"
    else:
        pad = ((_NPAD, _NPAD),) * ndim + ((0, 0),)
        if mode == _ZERO:
            coef, fmode = xp.pad(img, pad, mode="constant", constant_values=cval), "grid-constant"
        else:
            coef, fmode = xp.pad(img, pad, mode="edge"), "nearest"
        npad = _NPAD
    for ax in range(ndim):
        coef = spline_filter1d(coef, 3, axis=ax, mode=fmode, output=np.float64)
    return xp.ascontiguousarray(coef, dtype=img.dtype), npad


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


def warp(
    image,
    disp=None,
    *,
    matrix=None,
    offset=None,
    disp_matrix=None,
    out_shape=None,
    order=1,
    mode="zero",
    cval=0.0,
    prefiltered=False,
    backend=None,
):
    """Resample ``image`` at ``c(i) = matrix @ i + offset + disp_matrix @ disp[i]`` for every output index ``i``.

    Parameters
    ----------
    image : ndarray, shape (*spatial) or (*spatial, C)
        Scalar image (2-D or 3-D) or channels-last vector image (each channel is sampled at the same points,
        e.g. a displacement field). numpy array, or CuPy array for the GPU.
    disp : ndarray, shape (*out_shape, ndim), optional
        Displacement field on the output grid (channels-last, component ``k`` along array axis ``k``), in the
        units that ``disp_matrix`` maps to input voxels (voxels when ``disp_matrix`` is None).
    matrix : array_like, shape (ndim, ndim), optional
        Linear part of the output-index -> input-index map. Default identity.
    offset : array_like, shape (ndim,) or scalar, optional
        Translation of that map, in input voxels. Default 0.
    disp_matrix : array_like, shape (ndim, ndim), optional
        Maps a displacement vector to an input-index increment, e.g. ``diag(1 / spacing)`` for a field in mm, or
        ``diag(1 / spacing) @ direction.T`` for a world-axes field. Default identity.
    out_shape : tuple of int, optional
        Output spatial shape; defaults to ``disp.shape[:-1]``, else the image's spatial shape.
    order : {0, 1, 3}
        0 nearest neighbour (``floor(c + 0.5)``, round half up as ITK), 1 (bi/tri)linear, 3 cubic B-spline.
    mode : {"zero", "border", "itk"}
        Out-of-grid handling. ``"zero"``: neighbours outside the grid contribute ``cval`` (scipy
        ``mode="grid-constant"``). ``"border"``: neighbours clamped to the grid (scipy ``mode="nearest"``; for
        order 0/1 the same as clamping the coordinate). ``"itk"``: a point whose continuous index lies outside
        ``[-0.5, n - 0.5)`` on any axis is ``cval``; inside, neighbours are clamped to the grid (orders 0, 1) or
        mirrored (order 3), as ``SimpleITK.Resample`` does.
    cval : float
        Value outside the grid (modes "zero" and "itk"). NaN coordinates give ``cval`` in every mode.
    prefiltered : bool
        Order 3 only: ``image`` already holds B-spline coefficients (no prefilter, no padding).
    backend : {None, "numpy", "numba", "cuda"}
        Implementation; None picks from the array types (see :func:`classreg.kernels._backend.resolve_backend`).

    Returns
    -------
    ndarray, shape (*out_shape) or (*out_shape, C)
        float64 for a float64 image, float32 otherwise; same array type as ``image``.

    Notes
    -----
    On the numpy and numba CPU paths coordinates, weights and sums are computed in float64 (float32 data are
    converted on load and rounded once on store), except on the numba CPU path for ``order=1`` with a scalar 3-D
    image in mode "border" or "itk" (the solvers' warp) or with a displacement field in mode "border"
    (composition): there they are computed in the image's precision, which for float32 is about twice as fast and
    differs from the float64 result by the float32 rounding of coordinates and weights (~1e-6 relative). The
    "cuda" path computes in the image's precision throughout (float32 coordinates, weights and sums for float32
    data, as PyTorch's ``grid_sample``; docs/gpu.md, "Precision on the GPU"). The result does not depend on the
    thread count. For order 3 without ``prefiltered``, coefficients are computed with
    ``scipy.ndimage.spline_filter1d`` along the spatial axes: mode "itk" filters with mirror boundaries (ITK's
    ``BSplineDecompositionImageFilter``); modes "zero" and "border" first pad 12 voxels (``cval`` / edge), exactly
    as ``scipy.ndimage.map_coordinates`` does, so the result matches scipy's ``grid-constant`` / ``nearest`` modes.

    References
    ----------
    .. [1] M. Unser, "Splines: a perfect fit for signal and image processing", IEEE Signal Processing Magazine
       16(6), 1999.
    .. [2] ITK ``ResampleImageFilter``, ``LinearInterpolateImageFunction``, ``BSplineInterpolateImageFunction``.
    """
    backend = _backend.resolve_backend(backend, image, disp)
    image = _as_array(image, "image")
    wdt = _work_dtype(image.dtype, "image")
    order, mcode = _check_order_mode(order, mode)
    cval = _check_cval(cval)
    if disp is not None:
        disp = _as_array(disp, "disp")
        _work_dtype(disp.dtype, "disp")
        if disp.ndim not in (3, 4) or disp.shape[-1] != disp.ndim - 1:
            raise ValueError(
                f"disp must have shape (*out_shape, ndim) with ndim = 2 or 3 components, got {disp.shape}"
            )
        ndim = disp.shape[-1]
    elif matrix is not None:
        ndim = np.shape(matrix)[0] if np.ndim(matrix) == 2 else -1
    elif out_shape is not None:
        ndim = len(tuple(out_shape))
    else:
        ndim = image.ndim
    if ndim not in (2, 3):
        raise ValueError(f"spatial dimension must be 2 or 3, got {ndim} (from disp, matrix, out_shape or image)")
    if image.ndim not in (ndim, ndim + 1):
        raise ValueError(
            f"image must have shape (*spatial) or (*spatial, C) with {ndim} spatial axes, got {image.shape}"
        )
    if min(image.shape[:ndim]) < 1 or (image.ndim == ndim + 1 and image.shape[-1] < 1):
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    if out_shape is None:
        out_shape = tuple(disp.shape[:-1]) if disp is not None else tuple(image.shape[:ndim])
    else:
        try:
            out_shape = tuple(int(s) for s in out_shape)
        except TypeError as exc:
            raise TypeError(f"out_shape must be a tuple of ints, got {out_shape!r}") from exc
        if len(out_shape) != ndim or min(out_shape) < 1:
            raise ValueError(f"out_shape must be {ndim} positive ints, got {out_shape}")
        if disp is not None and tuple(disp.shape[:-1]) != out_shape:
            raise ValueError(f"disp.shape[:-1] = {disp.shape[:-1]} does not match out_shape = {out_shape}")
    m = _host_matrix(matrix, "matrix", (ndim, ndim))
    off = _host_matrix(offset, "offset", (ndim,))
    dm = _host_matrix(disp_matrix, "disp_matrix", (ndim, ndim))
    if prefiltered and order != 3:
        raise ValueError("prefiltered=True is only meaningful with order=3")

    xp, to_host = _xp_for(backend, image, disp)
    img = _to_xp(image, xp, wdt)
    if img.ndim == ndim:
        img = img[..., None]
    d = None if disp is None else _to_xp(disp, xp, wdt).reshape(-1, ndim)

    npad = 0
    if order == 3 and not prefiltered:
        img, npad = _spline_coefficients(img, ndim, mcode, cval, xp)
    eye = np.eye(ndim)
    m = eye if m is None else m
    off = (np.zeros(ndim) if off is None else off) + npad
    dm = eye if dm is None else dm

    impl = {"numpy": _warp_numpy, "numba": _warp_numba, "cuda": _warp_cuda}[backend]
    out = impl(img, d, out_shape, m, off, dm, order, mcode, cval)
    out = out.reshape(out_shape + (img.shape[-1],))
    if image.ndim == ndim:
        out = out[..., 0]
    if to_host:  # pragma: no cover - needs a GPU
        out = out.get()
    return out


def interpolate(image, points, *, order=1, mode="zero", cval=0.0, prefiltered=False, backend=None):
    """Sample ``image`` at continuous indices ``points`` (same interpolants and modes as :func:`warp`).

    Parameters
    ----------
    image : ndarray, shape (*spatial) or (*spatial, C)
        Scalar or channels-last image; ``ndim = points.shape[1]`` spatial axes (2 or 3).
    points : ndarray, shape (N, ndim)
        Continuous indices in array-axis order (voxel units; index ``k`` is the centre of voxel ``k``).
    order : {0, 1, 3}
        Interpolation order, see :func:`warp`.
    mode : {"zero", "border", "itk"}
        Out-of-grid handling, see :func:`warp`.
    cval : float
        Value outside the grid.
    prefiltered : bool
        Order 3 only: ``image`` already holds B-spline coefficients.
    backend : {None, "numpy", "numba", "cuda"}
        Implementation; None picks from the array types.

    Returns
    -------
    ndarray, shape (N,) or (N, C)
        float64 for a float64 image, float32 otherwise.

    Notes
    -----
    Points are used in float64, except on the "cuda" path with a float32 image, which rounds them to float32 and
    computes in float32 (:func:`warp`'s Notes). See :func:`warp` for the boundary modes and the B-spline
    prefilter.
    """
    backend = _backend.resolve_backend(backend, image, points)
    image = _as_array(image, "image")
    points = _as_array(points, "points")
    wdt = _work_dtype(image.dtype, "image")
    _work_dtype(points.dtype, "points")
    order, mcode = _check_order_mode(order, mode)
    cval = _check_cval(cval)
    if points.ndim != 2 or points.shape[1] not in (2, 3):
        raise ValueError(f"points must have shape (N, ndim) with ndim = 2 or 3, got {points.shape}")
    ndim = points.shape[1]
    if image.ndim not in (ndim, ndim + 1):
        raise ValueError(
            f"image must have shape (*spatial) or (*spatial, C) with {ndim} spatial axes, got {image.shape}"
        )
    if min(image.shape) < 1:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    if prefiltered and order != 3:
        raise ValueError("prefiltered=True is only meaningful with order=3")

    xp, to_host = _xp_for(backend, image, points)
    img = _to_xp(image, xp, wdt)
    if img.ndim == ndim:
        img = img[..., None]
    pts = _to_xp(points, xp, wdt if backend == "cuda" else np.float64)  # the GPU computes in the data's precision
    npad = 0
    if order == 3 and not prefiltered:
        img, npad = _spline_coefficients(img, ndim, mcode, cval, xp)
    off = np.full(ndim, float(npad))
    impl = {"numpy": _interpolate_numpy, "numba": _interpolate_numba, "cuda": _interpolate_cuda}[backend]
    out = impl(img, pts, off, order, mcode, cval)
    if image.ndim == ndim:
        out = out[:, 0]
    if to_host:  # pragma: no cover - needs a GPU
        out = out.get()
    return out
