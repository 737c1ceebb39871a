"""Geodesic shooting of the scalar momentum (EPDiff) on one grid, with the exact discrete adjoint.

Along the geodesic (t ∈ [0, 1]) the state is transported by the flow φ_t of the velocity v_t::

    m_t = P_t ∇I_t,   v_t = −K⋆m_t,   I_t = I₀∘φ_t⁻¹,   P_t = |Dφ_t⁻¹| (P₀∘φ_t⁻¹)

(F.-X. Vialard, L. Risser, D. Rueckert, C. J. Cotter, "Diffeomorphic 3D image registration via geodesic shooting
using an efficient adjoint calculation", IJCV 97:229-241, 2012, doi:10.1007/s11263-011-0481-8; M. I. Miller,
A. Trouvé, L. Younes, "Geodesic shooting for computational anatomy", J. Math. Imaging Vis. 24:209-228, 2006,
doi:10.1007/s10851-005-3624-0).

Discretisation: semi-Lagrangian with map composition. ``n_t`` steps of ``δt = 1/n_t``; the inverse map
``X_k = φ_k⁻¹`` is accumulated by composition, ``u_{k+1} = u_k∘(id − δt v_k) − δt v_k``, and ``I_k``, ``P_k`` are
resampled once from time 0 through ``X_k`` (no repeated-resampling blur). The gradient is the exact reverse sweep of
that discrete scheme (discretise-then-optimise), so it matches finite differences to rounding.

Stability: the transport is semi-Lagrangian, but the momentum update is explicit (``v_k`` from the state at the
start of step k). Each shot records the stability number ``max_k δt·max_x ‖Dv_k(x)‖_F`` (``id − δt v`` is invertible
when ``δt·Lip(v) < 1``); the optimiser of :mod:`.step` keeps it small by rejecting trial momenta and raising ``n_t``.

Intensity source (the metamorphosis hook): with ``source_mu = ν`` and weights ``W_k``,
``I_k = I₀∘X_k + R_k`` with ``R_{k+1} = R_k∘(id − δt v_k) + δt ν W_k P_k``, with its adjoint, and the cost of the
source ``½ ν ⟨P₀, W₀ P₀⟩`` added to the regularisation. This is weighted metamorphosis (A. François et al., WBIR
2022, Theorem 1) written in the image momentum P: its residual is ``z = (μ/ρ) P`` and ``ν = μ²/ρ``, so that
``½‖v₀‖²_V + ½ρ‖z₀‖²_{W₀} = ½⟨P₀∇I₀, K⋆(P₀∇I₀)⟩ + ½ν⟨P₀, W₀P₀⟩``. ``register_lddmm`` uses ν = 0.
"""
from __future__ import annotations

import math

import numpy as np

from .operators import small_grid

__all__ = ["GeodesicShooting"]


class _Path:
    """Stored forward pass: index-unit inverse maps ``u[k]`` (k = 0..n), velocities ``v[k]`` (mm/unit time, k < n),
    source residuals ``R[k]`` (with a source), final image; ``stability`` = max_k δt·max‖Dv_k‖_F, ``max_step`` =
    max_k δt·max|v_k|/h (voxels); ``aborted`` when the shooting stopped early at a stability limit (then ``I1`` is
    None)."""

    __slots__ = ("I1", "R", "X1", "aborted", "max_step", "stability", "u", "v", "v_end")

    def __init__(self):
        self.u, self.v, self.R = [], [], []
        self.I1 = self.X1 = self.v_end = None
        self.stability = self.max_step = 0.0
        self.aborted = False


class GeodesicShooting:
    """Discrete geodesic shooting of the scalar momentum on one grid, with the exact adjoint gradient.

    Parameters
    ----------
    template : ndarray, shape (*spatial)
        I₀ (2-D or 3-D), on the grid of the target.
    spacing : sequence of float
        Voxel size per array axis (mm).
    operator : GaussianKernel or FourierOperator
        K (see :func:`.operators.kernel_operator`); must be symmetric.
    n_steps : int
        Number of time steps n_t (δt = 1/n_t).
    dtype : numpy dtype
        Working precision (float32 or float64).
    backend : {None, "numpy", "numba"}
        Kernel implementation.
    source_mu : float
        ν of an additive intensity source ``ν W_k P_k`` and of its cost ``½ ν ⟨P₀, W₀ P₀⟩`` (0: pure LDDMM).
    source_weights : array or sequence of n_t arrays, optional
        Weights W_k ∈ [0, 1] of the source at each step (one array: constant in time); required when μ ≠ 0.

    Notes
    -----
    Forward step k (x = grid indices, u₀ = 0, everything in the array frame; maps in voxel units, v in mm)::

        X_k = x + u_k,  I_k = I₀(X_k) [+ R_k],  Q_k = P₀(X_k),  det_k = det(Id + D u_k),  P_k = det_k Q_k
        g_k = ∇_h I_k,  v_k = −K⋆(P_k g_k),  Y_k = x − δt v_k/h,  u_{k+1} = u_k(Y_k) − δt v_k/h
        [R_{k+1} = R_k(Y_k) + δt μ W_k P_k]

    I₀(·), P₀(·), u_k(·) are border-clamped linear interpolation (:mod:`classreg.kernels.adjoint`), D and ∇_h the
    ``numpy.gradient`` stencil. The gradient is the reverse sweep of exactly these operations (transposed
    interpolation = scatter, exact derivative of the interpolant w.r.t. the sample point, transposed stencils,
    cofactors for the determinant); it stores u_k, v_k (and R_k) per step and recomputes the rest.

    Every forward pass records the stability number ``max_k δt·max_x ‖Dv_k(x)‖_F`` (``path.stability``) and the
    largest step in voxels (``path.max_step``). The explicit momentum update is only stable while the former is
    small (measurements: docs/notes/lddmm.md); ``forward(..., stability_limit=c)`` aborts a shot as soon as a step
    exceeds c.
    """

    def __init__(self, template, spacing, operator, n_steps, *, dtype=np.float64, backend=None, source_mu=0.0,
                 source_weights=None):
        from ...kernels._backend import get_array_module
        from ...kernels.diff import gradient

        self.dtype = np.dtype(dtype)
        self.xp = xp = get_array_module(template)  # everything below stays on the template's device
        self.I0 = xp.ascontiguousarray(template, dtype=self.dtype)
        self.nd = self.I0.ndim
        if self.nd not in (2, 3):
            raise ValueError(f"template must be 2-D or 3-D, got shape {self.I0.shape}")
        self.shape = self.I0.shape
        self.h = tuple(float(x) for x in spacing)
        self.K = operator
        if tuple(operator.shape) != self.shape:
            raise ValueError(f"operator shape {operator.shape} does not match the template {self.shape}")
        self.n = int(n_steps)
        if self.n < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps!r}")
        self.dt = 1.0 / self.n
        self.cell = float(np.prod(self.h))
        self.backend = backend
        # stencils (gradient, Jacobian determinant) of kernels.diff: numpy on small grids (see _small)
        self.stencil_backend = "numpy" if backend in (None, "auto", "numba") and small_grid(self.shape) else backend
        self.hv = xp.asarray(np.asarray(self.h, dtype=self.dtype))  # d numbers (scalar uploads on a device)
        self.x = xp.ascontiguousarray(xp.stack(xp.indices(self.shape, dtype=self.dtype), axis=-1))
        self.g0 = gradient(self.I0, spacing=self.h, backend=self.stencil_backend)
        self.mu = float(source_mu)
        self.W = None
        if self.mu != 0.0:
            if source_weights is None:
                raise ValueError("source_weights is required when source_mu != 0")
            if hasattr(source_weights, "shape") and source_weights.shape == self.shape:
                self.W = [xp.asarray(source_weights, dtype=self.dtype)] * self.n
            else:
                self.W = [xp.asarray(w, dtype=self.dtype) for w in source_weights]
                if len(self.W) != self.n or any(w.shape != self.shape for w in self.W):
                    raise ValueError(f"source_weights must be one array of shape {self.shape} or {self.n} of them")

    # ------------------------------------------------------------------ pieces
    def _velocity(self, P, I):
        from ...kernels.diff import gradient

        g = gradient(I, spacing=self.h, backend=self.stencil_backend)
        m = P[..., None] * g
        return -self.K.apply(m), m, g

    def _check_P0(self, P0):
        P0 = self.xp.asarray(P0)
        if P0.shape != self.shape:
            raise ValueError(f"P0 must have shape {self.shape}, got {P0.shape}")
        return self.xp.ascontiguousarray(P0, dtype=self.dtype)

    def forward(self, P0, *, end_velocity=False, stability_limit=None) -> _Path:
        """Shoot ``P0``; returns the stored path (maps, velocities, final image, stability numbers).

        ``stability_limit``: stop as soon as a step has ``δt · max‖Dv_k‖_F`` above it (or a non-finite velocity) and
        return the partial path with ``aborted = True`` (the caller treats such a ``P0`` as infeasible).
        """
        from ...kernels.adjoint import jacobian_norm_max, sample_linear
        from ...kernels.diff import jacobian_determinant

        xp = self.xp
        P0 = self._check_P0(P0)
        src = xp.ascontiguousarray(xp.stack([self.I0, P0], axis=-1))
        path = _Path()
        dt = self.dtype.type(self.dt)
        u = xp.zeros(self.shape + (self.nd,), dtype=self.dtype)
        R = xp.zeros(self.shape, dtype=self.dtype) if self.W is not None else None
        for k in range(self.n + (1 if end_velocity else 0)):
            if k == 0:
                Ik, Qk, det = self.I0, P0, None
            else:
                s = sample_linear(src, self.x + u, backend=self.backend)
                Ik, Qk = s[..., 0], s[..., 1]
                det = jacobian_determinant(u, spacing=1.0, backend=self.stencil_backend)
            if R is not None:
                Ik = Ik + R
            Pk = Qk if det is None else det * Qk
            v, _, _ = self._velocity(Pk, Ik)
            if k == self.n:
                path.v_end = v
                break
            step = v * (dt / self.hv)
            mstep = float(xp.max(xp.abs(step)))
            stab = self.dt * jacobian_norm_max(v, spacing=self.h, backend=self.backend)
            if not (math.isfinite(stab) and math.isfinite(mstep)):
                stab = math.inf
            path.stability = max(path.stability, stab)
            path.max_step = max(path.max_step, mstep)
            if stability_limit is not None and not stab <= stability_limit:
                path.aborted = True
                return path
            path.u.append(u)
            path.v.append(v)
            if k == 0:
                u_new = -step
            else:
                u_new = sample_linear(u, self.x - step, backend=self.backend) - step
            if R is not None:
                path.R.append(R)
                R_new = sample_linear(R, self.x - step, backend=self.backend) if k > 0 else xp.zeros_like(R)
                R = R_new + (dt * self.dtype.type(self.mu)) * self.W[k] * Pk
            u = u_new
        path.u.append(u)
        path.X1 = self.x + u
        I1 = sample_linear(self.I0, path.X1, backend=self.backend)
        if R is not None:
            path.R.append(R)
            I1 = I1 + R
        path.I1 = I1
        return path

    def regularization(self, P0, path=None) -> float:
        """½ ⟨m₀, K m₀⟩ (physical integral), m₀ = P₀∇I₀, plus the source's ½ ν ⟨P₀, W₀ P₀⟩ when ν ≠ 0."""
        P0 = self._check_P0(P0)
        v0 = path.v[0] if path is not None and path.v else -self.K.apply(P0[..., None] * self.g0)
        m0 = P0[..., None] * self.g0
        reg = -0.5 * self.cell * float(np.sum(m0.astype(np.float64) * v0))
        return reg + self.source_cost(P0)

    def source_cost(self, P0) -> float:
        """½ ν ⟨P₀, W₀ P₀⟩ (physical integral): the cost of the intensity source (0 without one)."""
        if self.W is None:
            return 0.0
        P = self.xp.asarray(P0, dtype=np.float64)
        return 0.5 * self.mu * self.cell * float(self.xp.sum(self.W[0] * P * P))

    def geodesic_length(self, P0) -> float:
        """‖v₀‖_V = ⟨P₀∇I₀, K⋆(P₀∇I₀)⟩^½ (physical integral): the length of the geodesic, a distance I₀ → I₁
        (with a source: ``(‖v₀‖²_V + ν⟨P₀, W₀P₀⟩)^½``, the metamorphosis distance)."""
        return math.sqrt(max(0.0, 2.0 * self.regularization(P0)))

    def evaluate(self, P0, data, *, gradient=True, stability_limit=None):
        """Shoot ``P0`` and evaluate the energy; the first half of :meth:`energy_and_gradient`.

        Returns ``(E, regularisation, data term, path, adjoint seed)``; ``E = inf`` when the shooting was aborted at
        ``stability_limit`` or produced a non-finite energy. Pass the result to :meth:`gradient` to get ∇E.
        """
        P0 = self._check_P0(P0)
        path = self.forward(P0, stability_limit=stability_limit)
        if path.aborted:
            return math.inf, math.nan, math.nan, path, None
        reg = self.regularization(P0, path)
        if gradient:
            dat, dI1, dX1 = data(path.I1, path.X1, gradient=True)
        else:
            dat, dI1, dX1 = data(path.I1, path.X1, gradient=False)
        E = reg + dat
        if not math.isfinite(E):
            return math.inf, reg, dat, path, None
        return E, reg, dat, path, (dI1, dX1)

    def energy(self, P0, data, *, stability_limit=None):
        """``(E, regularisation, data term, path)`` (``E = inf`` if aborted at ``stability_limit``)."""
        E, reg, dat, path, _ = self.evaluate(P0, data, gradient=False, stability_limit=stability_limit)
        return E, reg, dat, path

    def energy_and_gradient(self, P0, data):
        """``(E, ∇_{P₀}E, regularisation, data term)``; the gradient is w.r.t. the array ``P0`` (voxel values)."""
        E, reg, dat, path, seed = self.evaluate(P0, data)
        if seed is None:
            return E, None, reg, dat
        return E, self.gradient(P0, path, seed), reg, dat

    def gradient(self, P0, path, seed):
        """∇_{P₀}E by the exact reverse sweep of :meth:`forward`, from a stored ``path`` and the data-term seed
        ``(∂E/∂I₁, ∂E/∂X₁)`` returned by :meth:`evaluate`."""
        from ...kernels.adjoint import sample_linear

        xp = self.xp
        P0 = self._check_P0(P0)
        dI1, dX1 = seed
        src = xp.ascontiguousarray(xp.stack([self.I0, P0], axis=-1))
        _, dI0 = sample_linear(self.I0, path.X1, gradient=True, backend=self.backend)
        ubar = dI1[..., None] * dI0
        if dX1 is not None:
            ubar = ubar + dX1
        Rbar = dI1 if self.W is not None else None
        P0bar = xp.zeros(self.shape, dtype=self.dtype)
        for k in range(self.n - 1, -1, -1):
            ubar, Rbar = self._reverse_step(k, P0, src, path, ubar, Rbar, P0bar)
        P0bar -= self.dtype.type(self.cell) * xp.sum(self.g0 * path.v[0], axis=-1)
        if self.W is not None:
            P0bar += self.dtype.type(self.mu * self.cell) * self.W[0] * P0
        return P0bar

    def _reverse_step(self, k, P0, src, path, ubar, Rbar, P0bar):
        """Adjoint of forward step k: adds its contribution to ``P0bar`` (in place) and returns the adjoints
        ``(ū_k, R̄_k)`` of the map and the source residual from those of step k+1."""
        from ...kernels.adjoint import (
            add_sample_adjoint,
            det_cofactor,
            gradient_transpose,
            sample_linear,
            splat_linear,
        )
        from ...kernels.diff import gradient

        be = self.backend
        u, v = path.u[k], path.v[k]
        if k == 0:
            Ik, Qk, det = self.I0, P0, None
        else:
            X = self.x + u
            s, ds = sample_linear(src, X, gradient=True, backend=be)
            Ik, Qk = s[..., 0], s[..., 1]
            det, cof = det_cofactor(u, backend=be)
        if self.W is not None:
            Ik = Ik + path.R[k]
        Pk = Qk if det is None else det * Qk
        g = gradient(Ik, spacing=self.h, backend=self.stencil_backend)
        Y = self.x - v * (self.dtype.type(self.dt) / self.hv)
        mbar = self.K.apply(self._velocity_bar(k, u, Y, path, ubar, Rbar))
        mbar *= self.dtype.type(-1)
        Qbar, detbar = self._momentum_bar(k, g, mbar, det, Qk, Rbar)
        Ibar = gradient_transpose(mbar, spacing=self.h, weight=Pk, backend=be)
        if k == 0:
            P0bar += Qbar
            return ubar, Rbar
        P0bar += splat_linear(Qbar, X, self.shape, backend=be)
        ubar_new = splat_linear(ubar, Y, self.shape, backend=be)
        add_sample_adjoint(ubar_new, Qbar, Ibar, ds, backend=be)
        ubar_new += gradient_transpose(cof, ndim=self.nd, weight=detbar, backend=be)
        if self.W is not None:
            Rbar = splat_linear(Rbar, Y, self.shape, backend=be) + Ibar
        return ubar_new, Rbar

    def _velocity_bar(self, k, u, Y, path, ubar, Rbar):
        """v̄_k from ū_{k+1} (and R̄_{k+1}) through ``u_{k+1} = u_k(Y) − δt v_k/h`` [``R_{k+1} = R_k(Y) + …``]."""
        from ...kernels.adjoint import sample_linear, velocity_adjoint

        coef = -self.dtype.type(self.dt) / self.hv
        if k == 0:
            return ubar * coef
        be = self.backend
        _, du = sample_linear(u, Y, gradient=True, backend=be)
        if self.W is None:
            return velocity_adjoint(ubar, du, coef, backend=be)
        _, dR = sample_linear(path.R[k], Y, gradient=True, backend=be)
        return (ubar + self.xp.einsum("...c,...cj->...j", ubar, du) + Rbar[..., None] * dR) * coef

    def _momentum_bar(self, k, g, mbar, det, Qk, Rbar):
        """``(Q̄_k, dēt_k)`` from m̄_k through ``m_k = P_k g_k``, ``P_k = det_k Q_k`` [and the source term]."""
        from ...kernels.adjoint import momentum_adjoint

        if self.W is None and det is not None:
            _, Qbar, detbar = momentum_adjoint(g, mbar, det, Qk, backend=self.backend)
            return Qbar, detbar
        Pbar = self.xp.sum(g * mbar, axis=-1)
        if self.W is not None:
            Pbar += (self.dtype.type(self.dt) * self.dtype.type(self.mu)) * self.W[k] * Rbar
        return (Pbar if det is None else Pbar * det), (None if det is None else Pbar * Qk)

    def velocity_norms(self, P0):
        """‖v_t‖_V at t = k/n_t, k = 0..n_t (constant along an exact geodesic)."""
        P0 = self._check_P0(P0)
        path = self.forward(P0, end_velocity=True)
        out = []
        for k, v in enumerate(path.v + [path.v_end]):
            u = path.u[k]
            if k == 0:
                Ik, P = self.I0, P0
            else:
                from ...kernels.adjoint import sample_linear
                from ...kernels.diff import jacobian_determinant

                s = sample_linear(self.xp.stack([self.I0, P0], -1), self.x + u, backend=self.backend)
                Ik = s[..., 0] + (path.R[k] if self.W is not None else 0)
                P = jacobian_determinant(u, spacing=1.0, backend=self.backend) * s[..., 1]
            _, m, _ = self._velocity(P, Ik)
            out.append(math.sqrt(max(0.0, -self.cell * float(np.sum(m.astype(np.float64) * v)))))
        return out

    def maps(self, P0, path=None):
        """``(φ₁⁻¹, φ₁)`` as array-frame displacements in mm, both from the flow.

        φ₁⁻¹ is the accumulated ``u_{n_t}``; φ₁ accumulates the exact inverses of the small steps,
        ``φ_{k+1} = ψ_k∘φ_k`` with ``ψ_k = (id − δt v_k)⁻¹`` (fixed point of a contraction, to 1e-6 voxel), so the
        two maps are inverse to interpolation accuracy, not merely to O(δt).
        """
        from ...kernels.fields import compose, invert

        if path is None:
            path = self.forward(P0)
        h = np.asarray(self.h)
        inv_mm = path.u[-1] * self.hv
        fwd = self.xp.zeros_like(inv_mm)
        for v in path.v:
            s, _ = invert(-self.dt * v, spacing=h, tol=1e-6, max_iter=50, backend=self.backend)
            fwd = compose(s.astype(self.dtype), fwd, spacing=h, backend=self.backend)
        return inv_mm.astype(self.dtype, copy=False), fwd.astype(self.dtype, copy=False)
