"""The fused per-iteration kernel of the parametric engine's affine-family models (translation, rigid, similarity,
affine) with linear interpolation and Mattes MI / normalised MI.

One call maps the iteration's samples ``y`` (mm) through the current affine map and the moving image's
world → index matrix, reads the moving value and index-space gradient (linear interpolation of the value/gradient
stack by the kernel behind :func:`classreg.kernels.sampling.linear_at`), drops the samples that fall outside the moving image or its
mask, evaluates Mattes MI with its per-sample derivative (the kernel behind
:func:`classreg.kernels.sampling.mattes_mi_fused`) and contracts the derivative with the world-space gradient into
the two sums the affine chain rule needs:

``G = Σ_j (∂C/∂m_j) ∇M(z_j) (y_j − c)ᵀ`` and ``g = Σ_j (∂C/∂m_j) ∇M(z_j)``,

so that ``∂C/∂p = Σ_ab ∂A_ab/∂p G_ab + ∂t/∂p · g`` (see ``AffineModel.gradient_from_sums``). It also returns the
Pearson correlation of the valid pairs (the normalised similarity every solver reports).

The numpy reference is the engine's unfused path, ``LevelObjective.evaluate`` with ``backend="numpy"`` (sampling,
MI and the model's chain rule as separate numpy steps); ``tests/test_kernels_affine.py`` checks the fused call against
it. Serial, like the other per-sample kernels: a few thousand samples per iteration cost less than a thread launch.
What it saves is the Python between the steps, which dominates an iteration of a few thousand samples
(docs/notes/parametric.md).
"""
from __future__ import annotations

import numpy as np

from . import _backend

__all__ = ["affine_mi_kernel"]


def _gather(stack, y, f, B, b, has_mask, mv, fv, gv, yv):
    """Samples ``y`` mapped to moving indices ``B y + b``, read by the linear-interpolation kernel; the valid ones
    (inside, and inside the mask channel when ``has_mask``) are packed into ``mv``, ``gv``, ``fv``, ``yv``."""
    npts, n = y.shape
    idx = np.empty((npts, n))
    for j in range(npts):
        for a in range(n):
            s = b[a]
            for k in range(n):
                s += B[a, k] * y[j, k]
            idx[j, a] = s
    vals = np.empty((npts, stack.shape[-1]))
    inside = np.empty(npts, dtype=np.bool_)
    _lin(stack, idx, vals, inside)
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


_lin = None  # rebound per dimension to the compiled linear-interpolation kernel in affine_mi_kernel
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
        from .sampling import linear_kernel, mattes_mi_kernel

        ns = {"np": np, "_lin": linear_kernel(ndim), "_mi": mattes_mi_kernel()}
        gather = _backend.njit(cache=True, fastmath=False)(_backend.rebind(_gather, ns, f"_{ndim}d"))
        body = _backend.rebind(_affine_mi, dict(ns, _gather=gather), f"_{ndim}d")
        _COMPILED[ndim] = _backend.njit(cache=True, fastmath=False)(body)
    return _COMPILED[ndim]
