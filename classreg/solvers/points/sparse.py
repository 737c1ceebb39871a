r"""The fine scale of the two-scale displacement prior: a compactly supported (tapered) Gaussian kernel, its sparse
matrix, the conjugate-gradient v-update and the GP interpolation with it.

Kernel. ``G^f_ij = Λ_f S_{l_i l_j} exp(-|y_i - y_j|² / (2 β_f²)) ψ(|y_i - y_j| / θ)`` with the Wendland function
``ψ(r) = (1 - r)⁴₊ (4r + 1)`` (positive definite in up to 3 dimensions; H. Wendland, Adv. Comput. Math. 4:389-396,
1995) and ``θ = TAPER × β_f``. A product of positive semi-definite kernels is positive semi-definite (Schur product
theorem), so the tapered kernel is a valid GP covariance whose matrix is sparse ("covariance tapering": R. Furrer,
M. G. Genton, D. Nychka, J. Comput. Graph. Stat. 15(3):502-523, 2006).

v-update. With the displacement split ``v = v_c + v_f`` into independent coarse and fine GP priors (the prior
covariance of v is then ``G_c + G_f``, the two-scale kernel) and a mean-field factor per scale, the VB update of the
fine factor given the coarse mean is BCPD's v-update (Hirose 2021, Algorithm 1) with ``G_f`` and the residual
``E - v̂_c``: ``v̂_f = G_f W``, ``(G_f + c_v diag(ν)⁻¹) W = E - v̂_c``. It is solved in the symmetric form
``(N^½ G_f N^½ + c_v I) Z = N^½ (E - v̂_c)``, ``W = N^½ Z`` (N = diag ν; no division by a floored ν) by
Jacobi-preconditioned conjugate gradients, started from the previous iteration's solution
(``Z₀ = N^½ (E - v̂_c - v̂_f^{prev}) / c_v``, exact at a fixed point) and stopped at a relative residual of
:data:`CG_TOL` or :data:`CG_MAX_ITER` steps: an inexact M-step that still lowers its quadratic objective
(generalised EM). The posterior variances of the fine factor are not computed (taken as 0, as BCPD's C code does
for all of v by default).
"""
from __future__ import annotations

import numpy as np

from ...kernels import points as kp
from ...kernels._backend import get_array_module
from ...kernels.cg import pcg_csr, pcg_csr_device

__all__ = ["TAPER", "fine_apply", "fine_index", "fine_matrix", "fine_solve"]

#: taper radius θ of the fine kernel in units of its bandwidth β_f: the Gaussian is below 3.4e-4 of its peak there
TAPER = 4.0
#: relative residual at which the fine v-update's conjugate gradients stop
CG_TOL = 1e-4
#: most conjugate-gradient steps per fine v-update (warm-started; an inexact M-step)
CG_MAX_ITER = 50
#: on the device, CG steps between the scalar reads that ask whether every column has stopped (at most
#: ceil(CG_MAX_ITER / CG_CHECK_EVERY) = 10 reads per fine v-update; the result does not depend on it)
CG_CHECK_EVERY = 5


def wendland(r):
    """``ψ(r) = (1 - r)⁴₊ (4r + 1)`` (Wendland ψ_{3,1}), r = distance / θ."""
    r = np.minimum(np.asarray(r, dtype=float), 1.0)
    return (1.0 - r) ** 4 * (4.0 * r + 1.0)


def fine_matrix(y, ly, amp, den, theta):
    """The tapered fine kernel on the points ``y`` (organ indices ``ly``) as a CSR matrix (scipy), diagonal
    included: ``amp[l_i, l_j] exp(-d²/den[l_i, l_j]) ψ(d/θ)`` for every pair closer than θ."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    m = len(y)
    tree = cKDTree(y)
    pairs = tree.query_pairs(theta, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    d2 = ((y[i] - y[j]) ** 2).sum(1)
    li, lj = ly[i], ly[j]
    val = amp[li, lj] * np.exp(-d2 / den[li, lj]) * wendland(np.sqrt(d2) / theta)
    keep = val != 0
    i, j, val = i[keep], j[keep], val[keep]
    diag = amp[ly, ly]
    rows = np.concatenate([i, j, np.arange(m)])
    cols = np.concatenate([j, i, np.arange(m)])
    vals = np.concatenate([val, val, diag])
    return sp.csr_matrix((vals, (rows, cols)), shape=(m, m))


def fine_solve(G, E, nu, cv, v_prev):
    """The fine v-update: ``(v̂_f, W, cg_steps)`` with ``(G + c_v diag(ν)⁻¹) W = E``, ``v̂_f = G W`` (G the CSR fine
    kernel), by preconditioned CG in the symmetric form of the module docstring, warm-started from ``v_prev``.

    On the device (CuPy ``E``, ``nu``, ``v_prev`` and G a ``cupyx.scipy.sparse.csr_matrix``) the same solve runs
    through :func:`classreg.kernels.cg.pcg_csr_device`; ``cg_steps`` is then a 0-d device array (not read here)."""
    xp = get_array_module(E)
    s = xp.sqrt(nu)
    rhs = s[:, None] * E
    Z = xp.ascontiguousarray(s[:, None] * (E - v_prev) / cv if v_prev is not None else xp.zeros(E.shape))
    dinv = 1.0 / (nu * G.diagonal() + cv)
    if xp is np:
        steps = int(pcg_csr(G.indptr, G.indices, G.data, s, cv, dinv, rhs, Z, tol=CG_TOL, max_iter=CG_MAX_ITER))
    else:
        steps = pcg_csr_device(G, s, cv, dinv, rhs, Z, tol=CG_TOL, max_iter=CG_MAX_ITER, check_every=CG_CHECK_EVERY)
    W = s[:, None] * Z
    return G @ W, W, steps


def fine_index(z, lz, coef, theta):
    """The neighbour index of the anchors ``z`` for :func:`fine_apply` (build it once to apply the same anchors to
    many query sets): the cell list of :func:`classreg.kernels.points.taper_cells` (numba), else a
    ``scipy.spatial.cKDTree`` of the anchors."""
    cells = kp.taper_cells(z, lz, coef, theta)
    if cells is not None:
        return cells
    from scipy.spatial import cKDTree

    return cKDTree(np.asarray(z, dtype=np.float64))


def fine_apply(q, lq, z, lz, coef, amp, den, theta, index=None):
    """GP interpolation with the fine kernel: ``Σ_j G^f(q_i, z_j) coef_j`` (P, C), in the units of the inputs.

    Only the anchor-query pairs closer than the taper radius θ contribute: with numba they are found through a cell
    list of the anchors (:func:`classreg.kernels.points.taper_apply`), else through a k-d tree of the anchors;
    ``index``: the :func:`fine_index` of these anchors, coefficients and θ to reuse."""
    from scipy.spatial import cKDTree

    if index is None:
        index = fine_index(z, lz, coef, theta)
    q = np.asarray(q, dtype=np.float64)
    if isinstance(index, dict):
        return kp.taper_apply(q, lq, z, lz, coef, amp, den, theta, cells=index)
    coef = np.asarray(coef, dtype=np.float64)
    out = np.zeros((len(q), coef.shape[1]))
    if len(q) == 0 or len(z) == 0:
        return out
    pairs = cKDTree(q).sparse_distance_matrix(index, theta, output_type="ndarray")
    i, j, d = pairs["i"], pairs["j"], pairs["v"]
    li, lj = np.asarray(lq, dtype=np.int64)[i], np.asarray(lz, dtype=np.int64)[j]
    w = amp[li, lj] * np.exp(-d * d / den[li, lj]) * wendland(d / theta)
    for c in range(coef.shape[1]):
        out[:, c] = np.bincount(i, weights=w * coef[j, c], minlength=len(q))
    return out
