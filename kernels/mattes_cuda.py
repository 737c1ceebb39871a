"""Mattes MI on the GPU in numba.cuda kernels: the fused passes of one parametric evaluation (issue #26), and the
voxel-wise cost and descent direction of ``register_demons(metric="mi")`` (:func:`dense_mattes_mi`, issue #22).

Both compile the per-sample formula of the CPU kernels (``kernels.sampling``: ``_mi_window``, ``_mi_weights``,
``_mi_grad``, ``_mi_setup``, the limiter) as device functions; the numpy reference of all of them is
``classreg.terms.measures.mattes_mi_samples(backend="numpy")``.

The parametric passes (one thread per sample):

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

import numpy as np

from . import _backend

# the per-sample formula of Mattes MI (elastix's limiters, the Parzen window, the gather of the derivative): one
# scalar body each, compiled for the CPU there and as device functions here (:func:`_namespace`)
from .sampling import _limit_numba, _mi_grad, _mi_setup, _mi_weights, _mi_window

__all__ = ["ACC_COUNT", "ACC_FM", "ACC_CORR", "ACC_AFFINE", "ACC_HIST", "work_columns", "cuda_kernels", "dense_kernels",
           "dense_mattes_mi", "mi_table"]

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
# ... and, for the voxel-wise kernels, the float type of the descent direction and the bin counts
ft = np.float64
NBF = NBM = 32
NBINS = NBF * NBM


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
    fi, first, t, dlim = _mi_window(f[j], mv, nbf, nbm, lof, hif, lom, him, tlo, thi, smallf, smallm, bsf, bsm)
    cell = fi * nbm + first
    _add_window(acc, ACC_HIST + cell, t)
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
    fi = cell // table.shape[1]
    dm = _mi_grad(table, fi, cell - fi * table.shape[1], work[j, 3], work[j, 4], -1.0 / (cnt * bsm))
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


def _add_window(hist, cell, t):
    """A sample's four moving-bin weights (:func:`classreg.kernels.sampling._mi_weights`) added atomically to
    ``hist[cell … cell + 3]``."""
    w0, w1, w2, w3 = _mi_weights(t)
    cuda.atomic.add(hist, cell, w0)
    cuda.atomic.add(hist, cell + 1, w1)
    cuda.atomic.add(hist, cell + 2, w2)
    cuda.atomic.add(hist, cell + 3, w3)


# ------------------------------------------------------------------------- Mattes MI over the voxels of an image
# (register_demons(metric="mi")): every voxel of the fixed image F and the warped moving image W is a sample. The
# histogram limits come from the counted voxels (elastix's limits: classreg.terms.intensity_limits), so they are a
# device array ``lim`` = (lof, hif, lom, him, tlo, thi) computed by the caller and read by every thread.
def _dense_hist_cuda(f, w, valid, use_valid, lim, scale, hist):
    """The Parzen joint histogram of the counted voxels (``valid``, or all), in the ``(nbf, nbm)`` bins of the
    builder, into ``hist`` (flat int64, zeroed) in fixed point: each window weight (in [0, 1]) is rounded to an
    integer multiple of ``1 / scale`` (a power of two chosen by the caller so that no bin can overflow), so the
    additions are exact and their order does not matter: the histogram, hence the cost and the direction, are the
    same on every run, as the other demons kernels are (float atomics would sum in another order each run, and a
    piece that leaves the map unchanged could then be accepted or rejected at random). A grid-stride loop
    accumulates each block's histogram in shared memory, then adds it to ``hist`` (one atomic addition per bin and
    block instead of four per voxel on the same few addresses)."""
    sh = cuda.shared.array(NBINS, i8)
    tid = cuda.threadIdx.x
    for k in range(tid, NBINS, cuda.blockDim.x):
        sh[k] = 0
    cuda.syncthreads()
    smallf, smallm, bsf, bsm = _mi_setup(NBF, NBM, lim[0], lim[1], lim[2], lim[3])
    for p in range(cuda.grid(1), f.shape[0], cuda.gridsize(1)):
        if use_valid and not valid[p]:
            continue
        fi, b, t, d = _mi_window(f8(f[p]), f8(w[p]), NBF, NBM, lim[0], lim[1], lim[2], lim[3], lim[4], lim[5],
                                 smallf, smallm, bsf, bsm)
        w0, w1, w2, w3 = _mi_weights(t)
        cell = fi * NBM + b
        cuda.atomic.add(sh, cell, i8(w0 * scale + 0.5))
        cuda.atomic.add(sh, cell + 1, i8(w1 * scale + 0.5))
        cuda.atomic.add(sh, cell + 2, i8(w2 * scale + 0.5))
        cuda.atomic.add(sh, cell + 3, i8(w3 * scale + 0.5))
    cuda.syncthreads()
    for k in range(tid, NBINS, cuda.blockDim.x):
        if sh[k] != 0:
            cuda.atomic.add(hist, k, sh[k])


def _dense_descent_cuda(f, w, valid, use_valid, lim, table, cnt, gw, u):
    """Per voxel: ``∂C/∂W`` gathered from the log-ratio ``table`` (nbf, nbm) of ``cnt[0]`` counted voxels
    (:func:`classreg.kernels.sampling._mi_grad`), rounded to the images' float type as the host's ``mattes_mi``
    returns it, and the descent direction ``u = −∂C/∂W ∇W`` (0 at voxels that do not count)."""
    p = cuda.grid(1)
    if p >= f.shape[0]:
        return
    nd = gw.shape[1]
    if use_valid and not valid[p]:
        for a in range(nd):
            u[p, a] = ft(0.0)
        return
    smallf, smallm, bsf, bsm = _mi_setup(NBF, NBM, lim[0], lim[1], lim[2], lim[3])
    fi, b, t, d = _mi_window(f8(f[p]), f8(w[p]), NBF, NBM, lim[0], lim[1], lim[2], lim[3], lim[4], lim[5], smallf,
                             smallm, bsf, bsm)
    dm = ft(_mi_grad(table, fi, b, t, d, -1.0 / (cnt[0] * bsm)))
    for a in range(nd):
        u[p, a] = -dm * gw[p, a]


_BODIES = (_lo, _hi, _affine_row, _linear, _w4, _taps, _tap)
#: the per-sample formula of Mattes MI, one body each for the CPU kernels (kernels.sampling) and these
_MI_BODIES = (_limit_numba, _mi_setup, _mi_window, _mi_weights, _mi_grad)
_KERNELS = (_pass1_cuda, _pass2_cuda)
_DENSE_KERNELS = (_dense_hist_cuda, _dense_descent_cuda)


def _namespace(sfx, **consts):
    """This module's globals with numba.cuda, its types, ``consts`` and every scalar body compiled as a device
    function; the sampling helpers see ``_lo``/``_hi`` as ``min``/``max`` (numba's own CUDA target does not
    compile the builtins' float overload) and the limiter as ``_limit``."""
    import numba
    from numba import cuda as nb_cuda

    ns = dict(globals(), cuda=nb_cuda, f8=numba.float64, i8=numba.int64, math=math, **consts)
    for fn in _BODIES + (_add_window,):
        ns[fn.__name__] = _backend.cuda_jit(_backend.rebind(fn, ns, sfx), device=True)
    ns["min"], ns["max"] = ns["_lo"], ns["_hi"]
    for fn in _MI_BODIES:
        ns[fn.__name__] = _backend.cuda_jit(_backend.rebind(fn, ns, sfx), device=True)
    ns["_limit"] = ns["_limit_numba"]
    return ns


@functools.cache
def cuda_kernels(ndim: int):
    """Compile (lazily) the two passes for ``ndim`` (2 or 3) spatial axes; returns ``{"pass1": kernel, "pass2":
    kernel}``. The kernels are cached on disk (:func:`classreg.kernels._backend.cuda_jit`) under names that carry
    ``ndim`` (the only thing the variants bind differently)."""
    sfx = f"_{int(ndim)}d"
    ns = _namespace(sfx, NDIM=int(ndim))
    return {fn.__name__[1:6]: _backend.cuda_jit(_backend.rebind(fn, ns, sfx)) for fn in _KERNELS}


@functools.cache
def dense_kernels(dtype: str, nbf: int, nbm: int):
    """Compile (lazily) the voxel-wise histogram and descent kernels for images of ``dtype`` ("float32" or
    "float64", the float type of the descent direction) and ``nbf`` × ``nbm`` bins (compile-time constants: the
    shared-memory histogram); returns ``{"hist": kernel, "descent": kernel}``, cached on disk under names carrying
    all three."""
    sfx = f"_{dtype}_{int(nbf)}x{int(nbm)}"
    ns = _namespace(sfx, ft=np.dtype(dtype).type, NBF=int(nbf), NBM=int(nbm), NBINS=int(nbf) * int(nbm))
    return {fn.__name__[7:-5]: _backend.cuda_jit(_backend.rebind(fn, ns, sfx)) for fn in _DENSE_KERNELS}


def mi_table(hist, cnt, nbf, nbm, tiny, eps=0.0):
    """Mattes MI of the joint histogram ``hist`` (flat, ``nbf × nbm``) of ``cnt`` samples and the table of
    ``−∂cost/∂p`` that the kernels gather with the scale ``−1 / (cnt · binsize_M)`` (``_mi_grad``), in the array
    module of ``hist``: ``(cost, table (nbf, nbm))``, the cost a 0-d array. ``eps = 0``: elastix's MI, the table
    ``log(p / (p_F p_M))`` (0 where ``p`` or ``p_F p_M`` is at most ``tiny``; :func:`classreg.kernels.sampling.
    _mi_table`); ``eps > 0``: the smoothed MI of :func:`classreg.terms.measures.mattes_mi_samples`, every entropy
    ``H(q) = −Σ q log(q + eps)``, the table ``−(H'(p) − H'(p_M))`` with ``H'(q) = −log(q + eps) − q / (q + eps)``."""
    from ._backend import get_array_module

    xp = get_array_module(hist)
    p = (hist / cnt).reshape(nbf, nbm)
    if eps > 0:  # p_F does not move with the moving values
        pf, pm = p.sum(axis=1), p.sum(axis=0)
        value = (pf * xp.log(pf + eps)).sum() + (pm * xp.log(pm + eps)).sum() - (p * xp.log(p + eps)).sum()
        return value, xp.log(p + eps) + p / (p + eps) - (xp.log(pm + eps) + pm / (pm + eps))[None, :]
    q = p.sum(axis=1)[:, None] * p.sum(axis=0)[None, :]
    ok = (p > tiny) & (q > tiny)
    table = xp.where(ok, xp.log(xp.where(ok, p, 1.0) / xp.where(ok, q, 1.0)), 0.0)
    return -(p * table).sum(), table


#: threads of the histogram's grid-stride loop (at most): 256 blocks of 256 threads
DENSE_HIST_THREADS = 1 << 16
#: the most bins (fixed × moving) of the voxel-wise histogram: a block's int64 copy fits 48 KiB of shared memory
MAX_DENSE_BINS = 6144


def dense_mattes_mi(fixed, warped, *, bins, limit_range_ratio, tiny, eps=0.0, mask=None, grad_warped=None):
    """The Mattes MI cost ``C = −MI`` of the voxels of ``fixed`` and ``warped`` (``mask``, or all) and, with
    ``grad_warped``, its descent direction ``−∂C/∂W ∇W``, on the arrays' device (CuPy; numpy arrays under numba's
    CUDA simulator).

    What :meth:`classreg.terms.MattesMI.descent` computes on the host (:func:`classreg.terms.mattes_mi` with its
    default limits, elastix's, from the counted voxels): the minima and maxima by array reductions, the histogram
    and the per-voxel derivative by the two kernels of :func:`dense_kernels` (the per-sample formula of the CPU
    kernels, :func:`classreg.kernels.sampling._mi_window` and ``_mi_grad``), the table between them by
    :func:`mi_table`.

    Parameters
    ----------
    fixed, warped : array (*spatial)
        The fixed image and the moving image on its grid, one float type.
    bins : (int, int)
        Fixed and moving bin counts.
    limit_range_ratio : float
        elastix's ``LimitRangeRatio`` of both histograms' limits.
    tiny : float
        Probabilities at most this are skipped in the sum (elastix's 1e-16).
    eps : float
        0: elastix's MI; > 0: the smoothed MI of ``mattes_mi_samples`` (:func:`mi_table`).
    mask : bool array (*spatial), optional
        The voxels that count.
    grad_warped : array (*spatial, ndim), optional
        ``∇W`` (array frame, physical units).

    Returns
    -------
    cost : float
        ``−MI`` (nats); one synchronising read (the cost and the count together).
    u : array (*spatial, ndim)
        Only with ``grad_warped``: the descent direction, ``warped``'s float type, 0 where a voxel does not count.
    """
    from ._backend import get_array_module, launch

    xp = get_array_module(fixed, warped)
    nbf, nbm = (int(b) for b in bins)
    if nbf * nbm > MAX_DENSE_BINS:
        raise ValueError(f"bins={nbf}x{nbm}: the device histogram holds at most {MAX_DENSE_BINS} bins (a block's "
                         "copy lives in 48 KiB of shared memory); use fewer bins or host (numpy) arrays")
    shape = tuple(warped.shape)
    dt = np.dtype(warped.dtype)
    F = xp.ascontiguousarray(fixed, dtype=dt).reshape(-1)
    W = xp.ascontiguousarray(warped).reshape(-1)
    use_valid = mask is not None
    if use_valid:
        valid = xp.ascontiguousarray(mask, dtype=bool).reshape(-1)
        inf = dt.type(np.inf)
        ext = [op(xp.where(valid, a, s * inf)) for a in (F, W) for op, s in ((xp.min, 1), (xp.max, -1))]
        cnt = xp.sum(valid, dtype=np.float64)
    else:
        valid = xp.zeros(1, dtype=bool)
        ext = [op(a) for a in (F, W) for op in (xp.min, xp.max)]
        cnt = xp.asarray(float(F.size))
    lo, hi = xp.stack(ext).astype(np.float64).reshape(2, 2).T  # (fixed, moving) minima and maxima
    d = limit_range_ratio * (hi - lo)  # classreg.terms.intensity_limits: [min − r·range, max + r·range]
    lim = xp.stack([lo[0] - d[0], hi[0] + d[0], lo[1] - d[1], hi[1] + d[1], lo[1], hi[1]])
    kernels = dense_kernels(dt.name, nbf, nbm)
    hist = xp.zeros(nbf * nbm, dtype=np.int64)
    # the fixed-point unit: the four weights of a voxel sum to 1, so a bin holds at most F.size / scale ≤ 2^62
    # units; the rounding of each weight, at most 2^-(63 - bits(F.size)) (1.1e-13 for a million voxels), is below
    # what float64 sums of that many terms carry (~1e-16 · N)
    scale = 2.0 ** (62 - int(F.size).bit_length())
    launch(kernels["hist"], min(F.size, DENSE_HIST_THREADS), F, W, valid, use_valid, lim, scale, hist)
    value, table = mi_table(hist * (1.0 / scale), xp.maximum(cnt, 1.0), nbf, nbm, tiny, eps)
    u = None
    if grad_warped is not None:
        gw = xp.ascontiguousarray(grad_warped, dtype=dt).reshape(F.size, len(shape))
        u = xp.empty_like(gw)
        launch(kernels["descent"], F.size, F, W, valid, use_valid, lim, table, xp.reshape(cnt, (1,)), gw, u)
        u = u.reshape(shape + (len(shape),))
    value, count = (float(v) for v in xp.stack([value, cnt]).tolist())  # the one read
    if count == 0:
        raise ValueError("no voxel counts for mutual information (the mask and the warped moving image's valid "
                         "region do not overlap)")
    return value if u is None else (value, u)
