"""The fused per-iteration kernel of the parametric engine's affine-family models (translation, rigid, similarity,
affine) with linear interpolation and Mattes MI / normalised MI.

One call maps the iteration's samples ``y`` (mm) through the current affine map and the moving image's
world → index matrix, reads the moving value and index-space gradient (linear interpolation of the value/gradient
stack, as :func:`classreg.kernels.sampling.linear_at`), drops the samples that fall outside the moving image or its
mask, evaluates Mattes MI with its per-sample derivative (the kernel behind
:func:`classreg.kernels.sampling.mattes_mi_fused`) and contracts the derivative with the world-space gradient into
the two sums the affine chain rule needs:

``G = Σ_j (∂C/∂m_j) ∇M(z_j) (y_j − c)ᵀ`` and ``g = Σ_j (∂C/∂m_j) ∇M(z_j)``,

so that ``∂C/∂p = Σ_ab ∂A_ab/∂p G_ab + ∂t/∂p · g`` (see ``AffineModel.gradient_from_sums``). It also returns the
Pearson correlation of the valid pairs (the normalised similarity every solver reports).

The numpy reference is the engine's unfused path, ``LevelObjective.evaluate`` with ``backend="numpy"`` (sampling,
MI and the model's chain rule as separate numpy steps); ``tests/test_parametric.py`` checks the fused call against
it. Serial, like the other per-sample kernels: a few thousand samples per iteration cost less than a thread launch.
What it saves is the Python between the steps, which dominates an iteration of a few thousand samples
(docs/notes/parametric.md).
"""
from __future__ import annotations

import numpy as np

from . import _backend

__all__ = ["affine_mi_kernel"]


def _gather2(stack, y, f, B, b, has_mask, mv, fv, gv, yv):
    n0, n1, nc = stack.shape
    count = 0
    for j in range(y.shape[0]):
        c0 = B[0, 0] * y[j, 0] + B[0, 1] * y[j, 1] + b[0]
        c1 = B[1, 0] * y[j, 0] + B[1, 1] * y[j, 1] + b[1]
        if not (c0 >= 0.0 and c0 <= n0 - 1.0 and c1 >= 0.0 and c1 <= n1 - 1.0):
            continue
        i0 = min(int(c0), max(n0 - 2, 0))
        i1 = min(int(c1), max(n1 - 2, 0))
        t0, t1 = c0 - i0, c1 - i1
        j0, j1 = min(i0 + 1, n0 - 1), min(i1 + 1, n1 - 1)
        w00, w01 = (1.0 - t0) * (1.0 - t1), (1.0 - t0) * t1
        w10, w11 = t0 * (1.0 - t1), t0 * t1
        if has_mask:
            mk = (w00 * stack[i0, i1, 3] + w01 * stack[i0, j1, 3] + w10 * stack[j0, i1, 3]
                  + w11 * stack[j0, j1, 3])
            if not mk >= 0.5:
                continue
        mv[count] = w00 * stack[i0, i1, 0] + w01 * stack[i0, j1, 0] + w10 * stack[j0, i1, 0] + w11 * stack[j0, j1, 0]
        for c in range(2):
            gv[count, c] = (w00 * stack[i0, i1, 1 + c] + w01 * stack[i0, j1, 1 + c] + w10 * stack[j0, i1, 1 + c]
                            + w11 * stack[j0, j1, 1 + c])
            yv[count, c] = y[j, c]
        fv[count] = f[j]
        count += 1
    return count


def _gather3(stack, y, f, B, b, has_mask, mv, fv, gv, yv):
    n0, n1, n2, nc = stack.shape
    count = 0
    for j in range(y.shape[0]):
        c0 = B[0, 0] * y[j, 0] + B[0, 1] * y[j, 1] + B[0, 2] * y[j, 2] + b[0]
        c1 = B[1, 0] * y[j, 0] + B[1, 1] * y[j, 1] + B[1, 2] * y[j, 2] + b[1]
        c2 = B[2, 0] * y[j, 0] + B[2, 1] * y[j, 1] + B[2, 2] * y[j, 2] + b[2]
        if not (c0 >= 0.0 and c0 <= n0 - 1.0 and c1 >= 0.0 and c1 <= n1 - 1.0 and c2 >= 0.0
                and c2 <= n2 - 1.0):
            continue
        i0 = min(int(c0), max(n0 - 2, 0))
        i1 = min(int(c1), max(n1 - 2, 0))
        i2 = min(int(c2), max(n2 - 2, 0))
        t0, t1, t2 = c0 - i0, c1 - i1, c2 - i2
        j0, j1, j2 = min(i0 + 1, n0 - 1), min(i1 + 1, n1 - 1), min(i2 + 1, n2 - 1)
        if has_mask:
            a = ((1.0 - t2) * stack[i0, i1, i2, 4] + t2 * stack[i0, i1, j2, 4]) * (1.0 - t1) + \
                ((1.0 - t2) * stack[i0, j1, i2, 4] + t2 * stack[i0, j1, j2, 4]) * t1
            e = ((1.0 - t2) * stack[j0, i1, i2, 4] + t2 * stack[j0, i1, j2, 4]) * (1.0 - t1) + \
                ((1.0 - t2) * stack[j0, j1, i2, 4] + t2 * stack[j0, j1, j2, 4]) * t1
            if not (1.0 - t0) * a + t0 * e >= 0.5:
                continue
        for c in range(4):
            a = ((1.0 - t2) * stack[i0, i1, i2, c] + t2 * stack[i0, i1, j2, c]) * (1.0 - t1) + \
                ((1.0 - t2) * stack[i0, j1, i2, c] + t2 * stack[i0, j1, j2, c]) * t1
            e = ((1.0 - t2) * stack[j0, i1, i2, c] + t2 * stack[j0, i1, j2, c]) * (1.0 - t1) + \
                ((1.0 - t2) * stack[j0, j1, i2, c] + t2 * stack[j0, j1, j2, c]) * t1
            v = (1.0 - t0) * a + t0 * e
            if c == 0:
                mv[count] = v
            else:
                gv[count, c - 1] = v
        for c in range(3):
            yv[count, c] = y[j, c]
        fv[count] = f[j]
        count += 1
    return count


_gather = _gather2  # rebound per dimension to the compiled gather in affine_mi_kernel
_mi = None  # rebound to the compiled Mattes MI kernel in affine_mi_kernel


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


_COMPILED = {}


def affine_mi_kernel(ndim: int):
    """The compiled fused kernel for ``ndim`` spatial axes (needs numba)::

        fn(stack, y, f, B, b, has_mask, m_lin, center, nbf, nbm, lof, hif, lom, him, tlo, thi, normalised, tiny,
           mv, fv, gv, yv, G, g) -> (count, value, ncc)

    ``stack``: C-contiguous (*spatial, C) float32, channels value, index gradient (ndim) and, with ``has_mask``, the
    mask; ``y`` (N, ndim) float64 sample points (mm) and ``f`` (N,) their fixed values; ``B``, ``b``: sample point →
    moving index (the affine map followed by the moving image's world → index map); ``m_lin``: the moving image's
    world → index matrix; ``center``: the model's centre; the MI arguments as
    :func:`classreg.kernels.sampling.mattes_mi_kernel`; ``mv``, ``fv`` (N,), ``gv``, ``yv`` (N, ndim) scratch
    buffers; ``G`` (ndim, ndim) and ``g`` (ndim,) receive the sums of the module docstring. ``count``: the valid
    samples (the metric is not evaluated below 2: ``value`` 0, ``ncc`` NaN). No checks here: the engine validates
    its arrays once per level.
    """
    if ndim not in _COMPILED:
        from .sampling import mattes_mi_kernel

        gather = _backend.njit(cache=True, fastmath=False)(_gather2 if ndim == 2 else _gather3)
        body = _backend.rebind(_affine_mi, {"np": np, "_gather": gather, "_mi": mattes_mi_kernel()}, f"_{ndim}d")
        _COMPILED[ndim] = _backend.njit(cache=True, fastmath=False)(body)
    return _COMPILED[ndim]
