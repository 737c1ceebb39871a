"""The cubic B-spline model of ``register_bspline``: a control grid over the (initially mapped) fixed domain.

``B(y) = y + Σ_k c_k β³(q(y) − k)`` with ``q`` the continuous control-grid index of ``y`` (zero displacement outside
the grid's valid region, as in ITK). The parameters are the coefficients (mm, physical x, y[, z] components); the
chain rule of the engine is the kernel adjoint :func:`classreg.kernels.bspline.adjoint`, the bending energy is the
exact quadratic form :func:`classreg.kernels.bspline.bending_energy`, and a grid is refined to the next level's by
:func:`classreg.kernels.bspline.refine` (the map is kept).

Fold-free mode (``bound``): each level estimates a new B-spline ``B_k`` composed after the previous levels'
(``T = B_k ∘ … ∘ B_0 ∘ init``, their composition given to the model as a dense ``prior`` displacement), and every
coefficient is kept inside ``|c_d| < h_d / K`` along each grid axis d (``K = 2.046`` in 2-D, ``2.479`` in 3-D). By
Y. Choi, S. Lee, "Injectivity conditions of 2D and 3D uniform cubic B-spline functions", Graph. Models 62(6):
411-427, 2000 (Theorems 1 and 2), each ``B_k`` is then injective, so the composition has ``det ∇T > 0`` everywhere
— the diffeomorphic B-spline scheme of D. Rueckert, P. Aljabar, R. A. Heckemann, J. V. Hajnal, A. Hammers,
"Diffeomorphic registration using B-splines", MICCAI 2006, LNCS 4191:702-709.
"""
from __future__ import annotations

import math

import numpy as np

from ...kernels._backend import get_array_module, is_cupy_array
from ...transforms import BSplineTransform

__all__ = ["BSplineModel"]


class BSplineModel:
    """A cubic B-spline FFD on a fixed control grid (see the module docstring).

    Parameters
    ----------
    grid : BSplineTransform
        The control grid (its coefficients are ignored).
    bending_weight : float
        Weight of the bending-energy penalty (0: none).
    backend : str or None
        Kernel backend.
    """

    def __init__(self, grid: BSplineTransform, *, bending_weight: float = 0.0, bound: float | None = None,
                 backend=None):
        self.grid = grid.with_coefficients(None)
        self.ndim = grid.ndim
        self.shape = (*grid.grid_shape, grid.ndim)
        self.size = int(np.prod(self.shape))
        self.bending_weight = float(bending_weight)
        self.backend = backend
        self._origin = np.asarray(grid.grid_origin)
        self._w2i = self.grid._world_to_index
        self._i2w = self.grid._index_to_world
        self._top = np.asarray(grid.grid_shape, dtype=float) - 2.0
        self._last = None
        self._off = np.ascontiguousarray(-self._w2i @ self._origin)
        self._w2i = np.ascontiguousarray(self._w2i)
        self._kernels = None  # the compiled sample kernels, called without checks in the hot loop
        from ...kernels._backend import HAVE_NUMBA

        if HAVE_NUMBA and backend != "numpy":
            from ...kernels.bspline import sample_kernels

            self._kernels = sample_kernels(self.ndim)
        self.prior = None
        self._limit = None
        if bound is not None:  # |c| along each grid axis (x first) below bound × spacing
            self._limit = float(bound) * np.asarray(self.grid.grid_spacing)
            self._frame = self.grid.grid_direction  # columns: grid axes in the world
            self._aligned = bool(np.array_equal(self._frame, np.eye(self.ndim)))

    def set_prior(self, stack, world_to_index) -> None:
        """The composition of the earlier levels as a dense displacement ``stack`` (*shape, ndim; world mm) on a
        grid whose (N, ndim) indices are ``y @ world_to_index[:n, :n].T + world_to_index[:n, n]``; linear
        interpolation, zero outside."""
        n = self.ndim
        self.prior = (np.ascontiguousarray(stack, dtype=np.float64), world_to_index[:n, :n], world_to_index[:n, n])
        self.prior_map = np.array(world_to_index[:n], dtype=np.float64)
        self._last = None

    def grid_map(self) -> np.ndarray:
        """``[M | o]`` (ndim, ndim + 1): world point → continuous control-grid index (array axis order)."""
        return np.concatenate([self._w2i, self._off[:, None]], axis=1)

    def voxel_map(self, image, pre, stride: int = 1):
        """``(matrix, offset, covered)``: every ``stride``-th voxel index of ``image`` (array order) → continuous
        grid index of ``B ∘ pre`` (``q = matrix @ i + offset``), and whether every such voxel centre lies in the
        grid's valid region ``[1, g − 2]`` (a box, and the map affine: checked at the image's corners)."""
        n = image.ndim
        g = self.grid_map() @ pre.homogeneous @ image.affine
        matrix, offset = g[:, :n] * float(stride), g[:, n]
        shape = [-(-s // int(stride)) for s in image.shape]
        corners = np.array([[(s - 1.0) * ((c >> k) & 1) for k, s in enumerate(shape)] for c in range(2 ** n)])
        q = corners @ matrix.T + offset
        covered = bool(np.all((q >= 1.0) & (q <= np.asarray(self.shape[:-1], dtype=float) - 2.0)))
        return matrix, offset, covered

    def _prior_map(self, y):
        y = np.asarray(y, dtype=float)
        if self.prior is None:
            return y
        from ...kernels.sampling import linear_at

        stack, lin, off = self.prior
        vals, inside = linear_at(stack, y @ lin.T + off, backend="numpy" if self.backend == "numpy" else None)
        out = y.copy()
        out[inside] += vals
        return out

    def saturation(self, p) -> float:
        """Fraction of coefficient components within 5 % of the injectivity bound (0 without one; device
        coefficients: one scalar read)."""
        if self._limit is None:
            return 0.0
        if is_cupy_array(p):
            near = sum((abs(c) >= 0.95 * lim).sum() for c, lim in zip(self._along_grid(p), self._limit))
            return float(near) / p.size
        c = np.abs(np.asarray(p).reshape(-1, self.ndim) @ self._frame)
        return float(np.mean(c >= 0.95 * self._limit))

    def project(self, p) -> np.ndarray:
        """``p`` with every coefficient inside the injectivity box (fold-free mode; unchanged otherwise; device
        coefficients stay on the device)."""
        if self._limit is None:
            return p
        if is_cupy_array(p):
            xp, n, f = get_array_module(p), self.ndim, self._frame
            c = [xp.clip(c, -float(lim), float(lim)) for c, lim in zip(self._along_grid(p), self._limit)]
            return xp.stack([sum(c[k] * float(f[j, k]) for k in range(n)) for j in range(n)], axis=1).ravel()
        if self._aligned:  # the grid axes are the world's: the components themselves (two products fewer)
            return np.clip(np.asarray(p).reshape(-1, self.ndim), -self._limit, self._limit).ravel()
        c = np.asarray(p).reshape(-1, self.ndim) @ self._frame  # components along the grid axes
        np.clip(c, -self._limit, self._limit, out=c)
        return (c @ self._frame.T).ravel()

    def _along_grid(self, p):
        """The components of device coefficients along the grid axes (one array per axis; the frame's entries enter
        as scalars, so nothing is uploaded)."""
        n, f = self.ndim, self._frame
        c = p.reshape(-1, n)
        return [sum(c[:, j] * float(f[j, k]) for j in range(n)) for k in range(n)]

    @classmethod
    def over(cls, fixed, pre, spacing, *, margin: float = 0.0, **kwargs) -> "BSplineModel":
        """A grid of ``spacing`` mm (x first) over ``fixed``'s extent mapped by ``pre``, elastix's
        ``GridScheduleComputer``: per axis of the fixed image's direction frame, the mapped extent (the voxel-centre
        box ± half a voxel, plus ``margin`` mm on each side) is covered by ``ceil(L / g) + 3`` control points centred
        on it. A fold-free piece composed after others needs the margin: points its predecessors moved outwards
        must stay inside its valid region, where the map is continuous."""
        n = fixed.ndim
        d = fixed.direction_matrix
        hi = np.asarray(fixed.shape, dtype=float) - 1.0
        corners = np.array([[hi[k] if (c >> k) & 1 else 0.0 for k in range(n)] for c in range(2 ** n)])
        world = fixed.index_to_world(corners)
        mapped = pre.map_points(world) if pre is not None else world
        frame = mapped @ d  # coordinates along the fixed image's axes (x first)
        lo, top = frame.min(axis=0), frame.max(axis=0)
        extent = top - lo + np.asarray(fixed.spacing) + 2.0 * float(margin)  # plus half a voxel at both ends
        g = np.broadcast_to(np.asarray(spacing, dtype=float), (n,))
        size = [int(math.ceil(extent[k] / g[k] - 1e-9)) + 3 for k in range(n)]
        centre = d @ ((lo + top) / 2.0)
        origin = centre - d @ ((np.asarray(size) - 1) * g / 2.0)
        return cls(BSplineTransform(size, origin, g, d), **kwargs)

    @property
    def grid_size(self) -> tuple:
        return self.grid.grid_size

    def identity(self) -> np.ndarray:
        return np.zeros(self.size)

    def _eval(self, c, y):
        """``(y', u, q, inside)``: ``y`` through the prior, the B-spline with coefficients ``c`` there, its grid
        indices and the valid-region flags (the last call for the same ``y`` array is remembered for the
        gradient)."""
        from ...kernels.bspline import samples

        if self._last is not None and self._last[0] is y:
            y1 = self._last[1]
        else:
            y1 = self._prior_map(y)
        if self._kernels is not None:
            n = len(y1)
            u, q, inside = np.empty((n, self.ndim)), np.empty((n, self.ndim)), np.empty(n, dtype=np.bool_)
            self._kernels[0](np.ascontiguousarray(c, dtype=np.float64).reshape(self.shape), y1, self._w2i,
                             self._off, u, q, inside)
        else:
            u, q, inside = samples(np.asarray(c).reshape(self.shape), y1, self._w2i, self._off,
                                   backend=self.backend)
        self._last = (y, y1, q, inside)
        return y1, u, q, inside

    def map_nodes(self, p, y) -> np.ndarray:
        """:meth:`map` at the prior's grid nodes ``y`` ((N, ndim), in the order of its stack; any points when there
        is no prior): the prior is read at its nodes (no interpolation), the B-spline by the sample kernel, and the
        step cache of :meth:`_eval` is left alone."""
        from ...kernels.bspline import samples

        y1 = y if self.prior is None else y + self.prior[0].reshape(-1, self.ndim)
        if self._kernels is None:
            u = samples(np.asarray(p).reshape(self.shape), y1, self._w2i, self._off, backend=self.backend)[0]
        else:
            u, q, inside = np.empty_like(y1), np.empty_like(y1), np.empty(len(y1), dtype=np.bool_)
            self._kernels[0](np.ascontiguousarray(p, dtype=np.float64).reshape(self.shape), y1, self._w2i, self._off,
                             u, q, inside)
        return y1 + u

    def map(self, p, points) -> np.ndarray:
        """``B_p(prior(points))``."""
        y1, u, _, _ = self._eval(p, points)
        return y1 + u

    def gradient(self, p, points, weights, valid) -> np.ndarray:
        """``Σ_j weights_j · ∂B/∂c (points_j)`` over the ``valid`` points (``weights`` has one row per valid
        point)."""
        from ...kernels.bspline import scatter_samples

        if self._last is None or self._last[0] is not points:
            self._eval(p, points)
        _, _, q, inside = self._last
        use = valid & inside
        w = np.ascontiguousarray(weights[inside[valid]], dtype=np.float64)
        if self._kernels is not None:
            g = np.zeros(self.shape)
            self._kernels[1](q, use, w, g)
        else:
            g = scatter_samples(q, use, w, self.shape[:-1], backend=self.backend)
        return np.asarray(g, dtype=float).ravel()

    def displacement(self, p, dp, points) -> np.ndarray:
        return self._eval(dp, points)[1]

    def scales(self, points) -> np.ndarray:
        """All ones, as elastix (a coefficient moves points by at most its own length)."""
        return np.ones(self.size)

    def penalty(self, p):
        if self.bending_weight <= 0:
            return 0.0, None
        value, grad = self._bending(p, gradient=True)
        return self.bending_weight * value, self.bending_weight * np.asarray(grad).ravel()

    def _bending(self, p, gradient=False):
        from ...kernels.bspline import bending_energy

        return bending_energy(np.asarray(p).reshape(self.shape), tuple(reversed(self.grid.grid_spacing)),
                              gradient=gradient)

    def bending_energy(self, p) -> float:
        """The (unweighted) bending energy of the map, mm⁻² (mean over the grid domain)."""
        return float(self._bending(p))

    def refined_from(self, other: "BSplineModel", p) -> np.ndarray:
        """Coefficients on this grid of the map ``other`` has with ``p`` (B-spline refinement; the map is kept)."""
        from ...kernels.bspline import refine

        matrix = other._w2i @ self._i2w
        offset = other._w2i @ (self._origin - other._origin)
        c = refine(np.asarray(p).reshape(other.shape), self.shape[:-1], matrix, offset, backend=self.backend)
        return np.asarray(c, dtype=float).ravel()

    def to_transform(self, p) -> BSplineTransform:
        return self.grid.with_coefficients(np.asarray(p, dtype=float).reshape(self.shape))
