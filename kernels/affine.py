"""The fused per-iteration kernel of the parametric engine's affine-family models (translation, rigid, similarity,
affine) with linear interpolation and Mattes MI / normalised MI.

One call maps the iteration's samples ``y`` (mm) through the current affine map and the moving image's
world → index matrix, reads the moving value and index-space gradient, drops the samples that fall outside the
moving image or its mask, evaluates Mattes MI with its per-sample derivative (the kernel behind
:func:`classreg.kernels.sampling.mattes_mi_fused`) and contracts the derivative with the world-space gradient into
the two sums the affine chain rule needs:

``G = Σ_j (∂C/∂m_j) ∇M(z_j) (y_j − c)ᵀ`` and ``g = Σ_j (∂C/∂m_j) ∇M(z_j)``,

so that ``∂C/∂p = Σ_ab ∂A_ab/∂p G_ab + ∂t/∂p · g`` (see ``AffineModel.gradient_from_sums``). It also returns the
Pearson correlation of the valid pairs (the normalised similarity every solver reports).

The moving gradient is one of two (the engine's ``image_gradient`` option): the linear interpolation of
central-difference gradient channels (a value/gradient (/mask) stack read by the kernel behind
:func:`classreg.kernels.sampling.linear_at`), or, with ``exact_gradient``, the exact gradient of the linear
interpolant of a value (/mask) stack (the kernel behind :func:`classreg.kernels.sampling.linear_grad_at`, the
derivative elastix's ``LinearInterpolator`` returns; its scattered reads touch a quarter of the memory in 3-D).

The numpy reference is the engine's unfused path, ``LevelObjective.evaluate`` with ``backend="numpy"`` (sampling,
MI and the model's chain rule as separate numpy steps, with the same image gradient); ``tests/test_kernels_affine.py``
checks the fused call against it. Serial, like the other per-sample kernels: a few thousand samples per iteration
cost less than a thread launch. What it saves is the Python between the steps, which dominates an iteration of a few thousand samples
(docs/notes/parametric.md).
"""
from __future__ import annotations

import numpy as np

from . import _backend

__all__ = ["affine_mi_kernel", "affine_mi_sampled_kernel"]


def _gather(stack, y, f, B, b, has_mask, mv, fv, gv, yv):
    """Samples ``y`` mapped to moving indices ``B y + b``, read by the moving image's kernel (rows: value, index
    gradient, mask); the valid ones (inside, and inside the mask when ``has_mask``) are packed into ``mv``, ``gv``,
    ``fv``, ``yv``."""
    npts, n = y.shape
    idx = np.empty((npts, n))
    for j in range(npts):
        for a in range(n):
            s = b[a]
            for k in range(n):
                s += B[a, k] * y[j, k]
            idx[j, a] = s
    vals = np.empty((npts, 2 + n))  # value, n gradient components, mask (when has_mask)
    inside = np.empty(npts, dtype=np.bool_)
    _lin_moving(stack, idx, vals, inside)
    row = 0
    count = 0
    for j in range(npts):
        if not inside[j]:
            continue
        row += 1
        if has_mask and not vals[row - 1, n + 1] >= 0.5:
            continue
        mv[count] = vals[row - 1, 0]
        for a in range(n):
            gv[count, a] = vals[row - 1, 1 + a]
            yv[count, a] = y[j, a]
        fv[count] = f[j]
        count += 1
    return count


_lin = None  # rebound per dimension to the compiled linear-interpolation kernel (the fixed image's samples)
_lin_moving = None  # rebound to linear_kernel (value/gradient stack) or linear_grad_kernel (value stack, exact)
_mi = None  # rebound to the compiled Mattes MI kernel in affine_mi_kernel
prange = range  # rebound to numba.prange (and the MI helpers below to their compiled versions) by the builders
_mi_setup = _mi_add = _mi_table = _mi_grad = None


def _affine_mi(stack, y, f, B, b, has_mask, m_lin, center, nbf, nbm, lof, hif, lom, him, tlo, thi, normalised, tiny,
               mv, fv, gv, yv, G, g):
    n = y.shape[1]
    count = _gather(stack, y, f, B, b, has_mask, mv, fv, gv, yv)
    G[:, :] = 0.0
    g[:] = 0.0
    if count < 2:
        return count, 0.0, np.nan
    value, dm = _mi(fv[:count], mv[:count], nbf, nbm, lof, hif, lom, him, tlo, thi, normalised, tiny)
    sf = 0.0
    sm = 0.0
    for j in range(count):
        sf += fv[j]
        sm += mv[j]
    sf /= count
    sm /= count
    sab = 0.0
    saa = 0.0
    sbb = 0.0
    gw = np.empty(n)
    for j in range(count):
        da = fv[j] - sf
        db = mv[j] - sm
        sab += da * db
        saa += da * da
        sbb += db * db
        for a in range(n):  # ∇_z M = (∂idx/∂z)ᵀ ∇_idx M
            s = 0.0
            for k in range(n):
                s += gv[j, k] * m_lin[k, a]
            gw[a] = dm[j] * s
        for a in range(n):
            g[a] += gw[a]
            for c in range(n):
                G[a, c] += gw[a] * (yv[j, c] - center[c])
    ncc = np.nan
    if saa > 0.0 and sbb > 0.0:
        ncc = min(max(sab / np.sqrt(saa * sbb), -1.0), 1.0)
    return count, value, ncc


#: the parallel kernel's fixed split of the samples: its sums do not depend on the thread count
NCHUNK = 8


def _affine_mi_par(stack, fdata, fidx, ylin, yoff, B, b, has_mask, m_lin, center, nbf, nbm, lof, hif, lom, him, tlo,
                   thi, normalised, tiny, work, ok, hist, G, g):
    """The parallel variant of :func:`_affine_mi` that also samples the fixed image (``fidx``: continuous fixed
    indices inside the fixed grid, ``y = fidx ylin + yoff``). Phase 1 maps, samples and bins each of ``NCHUNK``
    slices of the samples into its own Parzen histogram; the histograms are merged, the MI table computed once;
    phase 2 gathers each valid sample's derivative into per-slice sums, merged in slice order."""
    npts, n = fidx.shape
    hist[:, :, :] = 0.0
    cnt = np.zeros(NCHUNK, dtype=np.int64)
    sums = np.zeros((NCHUNK, 2))
    smallf, smallm, bsf, bsm = _mi_setup(nbf, nbm, lof, hif, lom, him)
    for c in prange(NCHUNK):
        lo = c * npts // NCHUNK
        hi = (c + 1) * npts // NCHUNK
        m = hi - lo
        zidx = np.empty((m, n))
        for j in range(m):
            for a in range(n):
                s = yoff[a]
                for k in range(n):
                    s += fidx[lo + j, k] * ylin[k, a]
                work[lo + j, 6 + n + a] = s - center[a]
            for a in range(n):
                s = b[a]
                for k in range(n):
                    s += B[a, k] * (work[lo + j, 6 + n + k] + center[k])
                zidx[j, a] = s
        fv = np.empty((m, 1))
        fin = np.empty(m, dtype=np.bool_)
        _lin(fdata, fidx[lo:hi], fv, fin)  # the draw lies inside the fixed grid: every row is filled
        vals = np.empty((m, 2 + n))  # value, n gradient components, mask (when has_mask)
        inside = np.empty(m, dtype=np.bool_)
        _lin_moving(stack, zidx, vals, inside)
        row = 0
        for j in range(m):
            ok[lo + j] = False
            if not inside[j]:
                continue
            row += 1
            if has_mask and not vals[row - 1, n + 1] >= 0.5:
                continue
            ok[lo + j] = True
            f = fv[j, 0]
            mv = vals[row - 1, 0]
            fi, first, t, d = _mi_add(hist[c], f, mv, nbf, nbm, lof, hif, lom, him, tlo, thi, smallf, smallm, bsf,
                                      bsm)
            w = work[lo + j]
            w[0] = fi
            w[1] = first
            w[2] = t
            w[3] = d
            w[4] = f
            w[5] = mv
            for a in range(n):  # ∇_z M = (∂idx/∂z)ᵀ ∇_idx M
                s = 0.0
                for k in range(n):
                    s += vals[row - 1, 1 + k] * m_lin[k, a]
                w[6 + a] = s
            cnt[c] += 1
            sums[c, 0] += f
            sums[c, 1] += mv
    count = 0
    sf = 0.0
    sm = 0.0
    for c in range(NCHUNK):
        count += cnt[c]
        sf += sums[c, 0]
        sm += sums[c, 1]
    G[:, :] = 0.0
    g[:] = 0.0
    if count < 2:
        return count, 0.0, np.nan
    total = hist[0].copy()
    for c in range(1, NCHUNK):
        total += hist[c]
    table = np.empty((nbf, nbm))
    value, scale = _mi_table(total, count, nbf, nbm, normalised, tiny, bsm, table)
    sf /= count
    sm /= count
    part = np.zeros((NCHUNK, n * n + n + 3))
    for c in prange(NCHUNK):
        lo = c * npts // NCHUNK
        hi = (c + 1) * npts // NCHUNK
        acc = part[c]
        for j in range(lo, hi):
            if not ok[j]:
                continue
            w = work[j]
            dm = _mi_grad(table, int(w[0]), int(w[1]), w[2], w[3], scale)
            da = w[4] - sf
            db = w[5] - sm
            acc[n * n + n] += da * db
            acc[n * n + n + 1] += da * da
            acc[n * n + n + 2] += db * db
            for a in range(n):
                gw = dm * w[6 + a]
                acc[n * n + a] += gw
                for k in range(n):
                    acc[a * n + k] += gw * w[6 + n + k]
    sab = 0.0
    saa = 0.0
    sbb = 0.0
    for c in range(NCHUNK):
        for a in range(n):
            g[a] += part[c, n * n + a]
            for k in range(n):
                G[a, k] += part[c, a * n + k]
        sab += part[c, n * n + n]
        saa += part[c, n * n + n + 1]
        sbb += part[c, n * n + n + 2]
    ncc = np.nan
    if saa > 0.0 and sbb > 0.0:
        ncc = min(max(sab / np.sqrt(saa * sbb), -1.0), 1.0)
    return count, value, ncc


_COMPILED = {}


def _moving_reader(ndim, exact_gradient):
    """The moving image's interpolation kernel and the compiled copies' name suffix."""
    from .sampling import linear_grad_kernel, linear_kernel

    if exact_gradient:
        return linear_grad_kernel(ndim), f"_{ndim}d_exact"
    return linear_kernel(ndim), f"_{ndim}d"


def affine_mi_kernel(ndim: int, *, exact_gradient: bool = False):
    """The compiled fused kernel for ``ndim`` spatial axes (needs numba)::

        fn(stack, y, f, B, b, has_mask, m_lin, center, nbf, nbm, lof, hif, lom, him, tlo, thi, normalised, tiny,
           mv, fv, gv, yv, G, g) -> (count, value, ncc)

    ``stack``: C-contiguous (*spatial, C) float32, channels value, index gradient (ndim) and, with ``has_mask``, the
    mask; with ``exact_gradient``, value and (with ``has_mask``) mask, the gradient being that of the linear
    interpolant (see the module docstring); ``y`` (N, ndim) float64 sample points (mm) and ``f`` (N,) their fixed
    values; ``B``, ``b``: sample point → moving index (the affine map followed by the moving image's world → index map); ``m_lin``: the moving image's
    world → index matrix; ``center``: the model's centre; the MI arguments as
    :func:`classreg.kernels.sampling.mattes_mi_kernel`; ``mv``, ``fv`` (N,), ``gv``, ``yv`` (N, ndim) scratch
    buffers; ``G`` (ndim, ndim) and ``g`` (ndim,) receive the sums of the module docstring. ``count``: the valid
    samples (the metric is not evaluated below 2: ``value`` 0, ``ncc`` NaN). No checks here: the engine validates
    its arrays once per level.
    """
    key = (ndim, bool(exact_gradient))
    if key not in _COMPILED:
        from .sampling import mattes_mi_kernel

        reader, suffix = _moving_reader(ndim, exact_gradient)
        ns = {"np": np, "_lin_moving": reader, "_mi": mattes_mi_kernel()}
        gather = _backend.njit(cache=True, fastmath=False)(_backend.rebind(_gather, ns, suffix))
        body = _backend.rebind(_affine_mi, dict(ns, _gather=gather), suffix)
        _COMPILED[key] = _backend.njit(cache=True, fastmath=False)(body)
    return _COMPILED[key]


def affine_mi_sampled_kernel(ndim: int, *, exact_gradient: bool = False, parallel: bool = True):
    """The compiled kernel that also draws the fixed values (needs numba)::

        fn(stack, fdata, fidx, ylin, yoff, B, b, has_mask, m_lin, center, nbf, nbm, lof, hif, lom, him, tlo, thi,
           normalised, tiny, work, ok, hist, G, g) -> (count, value, ncc)

    ``fdata``: the fixed image as a C-contiguous (*spatial, 1) stack; ``fidx`` (N, ndim): continuous fixed indices
    inside its grid (a random-coordinate draw); ``ylin``, ``yoff``: fixed index → sample point (mm), ``y = fidx ylin
    + yoff``; ``work`` (N, 6 + 2 ndim) float64, ``ok`` (N,) bool and ``hist`` (NCHUNK, nbf, nbm) scratch; the other
    arguments (and ``exact_gradient``) as :func:`affine_mi_kernel`, which is its reference (the same value, gradient
    sums and correlation up to the order of the sums; ``tests/test_kernels_affine.py``). The samples are split into
    ``NCHUNK`` fixed slices, so the result does not depend on the number of threads (``hist`` has ``NCHUNK``
    histograms). ``parallel=False``: one slice on the calling thread (``hist`` (1, nbf, nbm)); the same value and
    gradient up to the order of the sums, 10 % faster than eight serial slices on 2048 2-D samples. That serial build
    is the engine's path for a few thousand samples, where it saves the Python of a separate fixed-image read
    (:meth:`classreg.solvers.parametric.engine.LevelObjective._sampled_setup`).
    """
    key = ("par" if parallel else "serial", ndim, bool(exact_gradient))
    if key not in _COMPILED:
        import numba

        from .sampling import MI_HELPERS, linear_kernel, mi_namespace

        reader, suffix = _moving_reader(ndim, exact_gradient)
        ns = mi_namespace({"np": np, "_lin": linear_kernel(ndim), "_lin_moving": reader,
                           "prange": numba.prange if parallel else range, "NCHUNK": NCHUNK if parallel else 1})
        assert all(h in ns for h in MI_HELPERS)
        body = _backend.rebind(_affine_mi_par, ns, suffix + ("" if parallel else "_serial"))
        _COMPILED[key] = _backend.njit(cache=True, fastmath=False, parallel=parallel)(body)
    return _COMPILED[key]
