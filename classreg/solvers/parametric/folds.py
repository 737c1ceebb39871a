"""Fold control of the B-spline by projection: keep ``det ∇T ≥ min_det_j`` at the voxel centres of the image grid.

``register_bspline(folds="project")`` optimises one control grid refined level to level, as elastix does, and every
:data:`PROJECT_EVERY` iterations (and once at the end) maps the coefficients onto the set where the map's Jacobian
determinant is at least the floor at every voxel centre of the level's fixed image (the full-resolution grid at the
end): projected stochastic gradient descent. The projection is computed where it is needed only:

1. ``det ∇T`` at every voxel (:func:`classreg.kernels.bspline.dense_det`; separable when the grid and the
   initial transform are axis-aligned);
2. if some voxel is below ``target = (1 + MARGIN) · min_det_j``, the control points whose support holds one are
   freed, and the voxels that depend on them with ``det`` below ``BAND · target`` are the constraints;
3. the nearest coefficients (Euclidean norm of the change, mm) that meet them, by a quadratic penalty
   ``½‖c − c₀‖² + μ Σ (target − det)₊²`` minimised with L-BFGS for μ = 100, 1000, … (a penalty method: J. Nocedal,
   S. J. Wright, *Numerical Optimization*, 2nd ed., 2006, §17.1), with the exact gradient of ``det`` in the
   coefficients (:func:`classreg.kernels.bspline.det_shortfall`);
4. again from 1 until every voxel is at or above ``min_det_j`` (at most :data:`ROUNDS` rounds; along the
   optimisation one round, unchecked: only the final projection must meet the floor).

Correcting folds of a B-spline FFD by moving the control points around the folded voxels is NiftyReg's
(M. Modat et al., "Fast free-form deformation using graphics processing units", Comput. Methods Programs Biomed.
98(3):278-284, 2010; ``reg_f3d``'s folding correction); here it is a minimum-norm projection, applied along the
optimisation rather than only after it, so the metric keeps optimising under the constraint. The guarantee is at the
voxel centres (where det J is reported and evaluated), not between them; ``folds="compose"`` is injective everywhere.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation
from scipy.optimize import minimize

from ...kernels.bspline import dense_det, det_shortfall, taps

__all__ = ["PROJECT_EVERY", "PROJECT_STRIDE", "FoldProjection"]

#: iterations between projections within a level
PROJECT_EVERY = 25
#: along the optimisation the full-resolution level is checked on every PROJECT_STRIDE-th voxel per axis (the final
#: projection checks every voxel)
PROJECT_STRIDE = 2
#: the projection aims at (1 + MARGIN) × the floor, so that the L-BFGS penalty solution clears the floor itself
MARGIN = 0.1
#: voxels depending on a freed control point join the constraints when their det is below BAND × target
BAND = 3.0
#: projection rounds (check, solve) before giving up; the result's min det J then reports the shortfall
ROUNDS = 10
#: the penalty weight's first value, growth factor and last value, and L-BFGS's relative decrease tolerance
MU_START, MU_GROWTH, MU_MAX, FTOL = 100.0, 10.0, 1e8, 1e-6


class FoldProjection:
    """The projection onto ``det ∇T ≥ min_det_j`` at the voxel centres of an image grid, for one B-spline model.

    Parameters
    ----------
    model : BSplineModel
        The control grid (no prior: one refined grid, not fold-free pieces).
    image : Image
        The grid whose voxel centres carry the constraint (a pyramid level's fixed image or the fixed image).
    pre : Affine
        The initial transform (``T = B ∘ pre``).
    min_det_j : float
        The floor of ``det ∇T``.
    stride : int
        Every ``stride``-th voxel along each axis only (a cheaper check along the optimisation).
    """

    def __init__(self, model, image, pre, min_det_j: float, *, stride: int = 1):
        n = image.ndim
        self.model, self.shape = model, tuple(-(-s // int(stride)) for s in image.shape)
        # voxel index -> grid index (array order); every voxel centre lies in the grid's valid region
        # (BSplineModel.over lays the grid over the mapped image extent), so det ∇T is the B-spline's everywhere
        self.matrix, self.offset, covered = model.voxel_map(image, pre, stride)
        if not covered:
            raise ValueError("the B-spline grid does not cover the image: fold projection needs a grid laid over it")
        self.frame = np.asarray(model._w2i)  # ∂q/∂y
        self.scale = float(np.linalg.det(pre.homogeneous[:n, :n]))  # det ∇T = det ∇B · det(pre)
        self.floor = float(min_det_j)
        self.target = (1.0 + MARGIN) * self.floor
        self.backend = "numpy" if model.backend == "numpy" else None  # the kernels' numpy reference, or numba
        self.projections = 0  # projections that changed the coefficients
        self.mu = MU_START

    def raise_floor(self, factor: float) -> None:
        """Multiply the floor (and the target above it) by ``factor``."""
        self.floor *= float(factor)
        self.target = (1.0 + MARGIN) * self.floor

    def dets(self, p) -> np.ndarray:
        """``det ∇T`` at every voxel centre (the flat voxel order of the image)."""
        return dense_det(np.asarray(p, dtype=np.float64).reshape(self.model.shape), self.shape, self.matrix,
                         self.offset, self.frame, backend=self.backend) * self.scale

    def _points(self, flat) -> np.ndarray:
        idx = np.stack(np.unravel_index(flat, self.shape), axis=1).astype(np.float64)
        return idx @ self.matrix.T + self.offset

    def __call__(self, p, *, exact: bool = True):
        """The projected coefficients, or None when every voxel already meets the floor. ``exact=False`` (along the
        optimisation) solves one round and does not check its result; the final projection is exact."""
        c = np.array(p, dtype=np.float64)
        det = self.dets(c)
        if det.min() >= self.floor:
            return None
        for _ in range(ROUNDS):
            c = self._solve(c, det)
            if not exact:
                break
            det = self.dets(c)
            if det.min() >= self.floor:
                break
        self.projections += 1
        return c

    def _solve(self, c, det):
        """One round: the minimum-norm change of the control points around the voxels below the target."""
        n = self.model.ndim
        gshape = self.model.shape[:-1]
        low = np.flatnonzero(det < self.target)
        lin, valid, _ = taps(self._points(low), gshape, backend=self.backend)
        free = np.unique(lin[valid])  # the control points whose support holds a voxel below the target
        # voxels that depend on a freed control point: within 2 grid cells of one (the cubic support)
        near = np.zeros(gshape, dtype=bool)
        near[np.unravel_index(free, gshape)] = True
        near = binary_dilation(near, iterations=2, structure=np.ones((3,) * n, dtype=bool))
        cand = np.flatnonzero(det < BAND * self.target)
        q = self._points(cand)
        cell = np.clip(np.round(q).astype(int), 0, np.asarray(gshape) - 1)
        keep = near[tuple(cell.T)]
        q = q[keep]
        table = taps(q, gshape, backend=self.backend)
        flat = c.reshape(-1, n)
        x0 = flat[free].ravel()
        trial = flat.copy()
        backend = self.backend

        def objective(x):
            trial[free] = x.reshape(-1, n)
            value, _, g = det_shortfall(trial.reshape(self.model.shape), q, self.frame, self.target, scale=self.scale,
                                        tap_table=table, backend=backend)
            dx = x - x0
            return 0.5 * float(dx @ dx) + mu * value, dx + mu * g.reshape(-1, n)[free].ravel()

        x, mu = x0.copy(), self.mu
        while True:
            x = minimize(objective, x, jac=True, method="L-BFGS-B",
                         options={"maxiter": 1000, "gtol": 1e-10, "ftol": FTOL}).x
            out = flat.copy()
            out[free] = x.reshape(-1, n)
            d = det_shortfall(out.reshape(self.model.shape), q, self.frame, self.target, tap_table=table,
                              backend=backend)[1]
            if d.min() * self.scale >= self.floor or mu >= MU_MAX:
                self.mu = mu  # the next projection starts from the weight this one needed
                return out.ravel()
            mu *= MU_GROWTH
