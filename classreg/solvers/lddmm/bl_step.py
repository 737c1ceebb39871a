"""One pyramid level of band-limited register_lddmm: L-BFGS on the whitened initial velocity ``z``.

The same control as the full-grid solver (:mod:`.step`): monotone L-BFGS with backtracking and a trust region on the
change of the initial velocity (voxels of the level), trial shots whose stability number ``δt·max‖Dv_k‖_F`` exceeds
:data:`STABILITY_LIMIT` rejected, and more time steps when an accepted shot exceeds :data:`STABILITY_TARGET`. Trial
shots whose voxel-grid map has det J at or below the floor ``min_det_j`` (default 0.05) are rejected too: every
step ``id − δt v_k`` is invertible when ``δt·Lip(v_k) < 1``, but the map is traced on the coarser map grid and
interpolated linearly to the voxels, and where the flow compresses strongly that interpolant can fold although the
continuous flow does not; the data term would then be evaluated through a non-invertible map, which the optimiser
can exploit. ``z`` is carried
between levels through its Fourier coefficients (the coarse grids of all levels sample one periodic box), so no
interpolation error is introduced.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ...kernels._backend import get_array_module
from ...optimise import Restart, minimise
from ...progress import similarity
from .bandlimited import (
    BandLimitedShooting,
    Coefficients,
    level_offset,
    resize_coefficients,
)
from .objective import data_term
from .step import refined_steps

__all__ = ["STABILITY_LIMIT", "STABILITY_TARGET", "level_step_bandlimited", "make_shooter"]

#: accepted paths get more time steps until δt·max‖Dv_k‖_F ≤ STABILITY_TARGET
STABILITY_TARGET = 0.3
#: trial shots above this stability number are rejected by the line search
STABILITY_LIMIT = 0.6


def make_shooter(opts, fixed, level_fixed, template, n_steps, *, finest=True):
    """The :class:`BandLimitedShooting` of a level (``level_fixed`` its fixed image, ``template`` I₀ there); a
    coarse level (``finest=False``) keeps only the frequencies its grid resolves well."""
    h = tuple(level_fixed.spacing_array_order)
    return BandLimitedShooting(opts["domain"], template, h, level_offset(fixed, level_fixed), n_steps,
                               band=opts["domain"].band(None if finest else h), map_spacing=opts["map_spacing"],
                               dtype=opts["dtype"], backend=opts["backend"])


class _Problem:
    def __init__(self, shooter, data, scale, hmin, det_floor):
        self.shooter, self.data, self.scale, self.hmin, self.det_floor = shooter, data, scale, hmin, det_floor
        self.limited = False

    def value(self, x):
        s = self.shooter
        res = s.evaluate(x.reshape((s.nd, *s.nc)), self.data, stability_limit=STABILITY_LIMIT,
                         det_floor=self.det_floor)
        if res[3] is None:
            self.limited = True
        return res[0] * self.scale, res

    def gradient(self, x, res):
        s = self.shooter
        return self.gradient_of(x.reshape((s.nd, *s.nc)), res)

    def gradient_of(self, z, res):
        return self.shooter.gradient(z, res[3], res[4]).ravel() * self.shooter.dtype.type(self.scale)

    def step_norm(self, d):
        s = self.shooter
        return float(np.max(np.abs(s.velocity(d.reshape((s.nd, *s.nc)))))) / self.hmin


def _stable(make, z, data, n, n_max, det_floor):
    """Shoot ``z`` with ``n`` steps, raising ``n`` until the path is stable (or ``n_max``); a ``z`` that even
    ``n_max`` cannot shoot, or whose voxel-grid map has det J ≤ ``det_floor`` somewhere, is scaled down (v is linear
    in z) by bisection. Returns ``(shooter, n, z, result, evaluations)``."""
    evals = 0
    while True:
        shooter = make(n)
        res = shooter.evaluate(z, data)
        evals += 1
        stab = math.inf if res[3] is None else res[3].stability
        n_new = refined_steps(n, stab, n_max, STABILITY_TARGET)
        if n_new == n:
            break
        n = n_new
    if not (res[3] is not None and res[3].stability <= STABILITY_LIMIT and res[3].min_det > det_floor
            and math.isfinite(res[0])):
        lo, hi = 0.0, 1.0
        for _ in range(10):
            c = 0.5 * (lo + hi)
            if shooter.forward(z * z.dtype.type(c), stability_limit=STABILITY_LIMIT, det_floor=det_floor) is None:
                hi = c
            else:
                lo = c
            evals += 1
        z = z * z.dtype.type(lo)
        res = shooter.evaluate(z, data)
        evals += 1
    return shooter, n, z, res, evals


def unfolded(shooter, z, data, res, det_floor):
    """The result's φ₁⁻¹ for ``z`` (shot as ``res``), traced at every voxel, and ``(z, res)`` scaled down if its
    det J is at or below ``det_floor`` somewhere.

    The optimisation sees the map traced on the map grid and interpolated to the voxels, which the line search
    keeps above ``det_floor``; the result's map is the same flow traced from every voxel centre
    (:meth:`.BandLimitedShooting.inverse_map`). Where the flow compresses a region ~100× the two differ at the voxel
    scale and the traced one can fold although the interpolated one does not (brain2d with ``cutoff=0.3``: one voxel,
    det J −0.16). Then ``z`` is replaced by its largest multiple (bisection, 10 halvings) whose traced map has
    det J > ``det_floor`` everywhere. Returns ``(z, res, φ₁⁻¹)``."""
    from ...kernels.diff import jacobian_determinant

    h = tuple(shooter.h)

    def ok(r):
        if r[3] is None:
            return None
        inv = shooter.inverse_map(r[3])
        return inv if float(np.min(jacobian_determinant(inv, spacing=h, backend=shooter.backend))) > det_floor \
            else None

    inv = ok(res)
    if inv is not None:
        return z, res, inv
    lo, hi = 0.0, 1.0
    best = (shooter.evaluate(z * z.dtype.type(0), data, gradient=False),
            shooter.xp.zeros(shooter.shape + (shooter.nd,), dtype=shooter.dtype))
    for _ in range(10):
        c = 0.5 * (lo + hi)
        r = shooter.evaluate(z * z.dtype.type(c), data, gradient=False)
        inv = ok(r)
        if inv is None:
            hi = c
        else:
            lo, best = c, (r, inv)
    return z * z.dtype.type(lo), best[0], best[1]


def level_step_bandlimited(level, state, progress, opts, fixed):
    """L-BFGS on ``z`` at one pyramid level; keeps ``state["z"]`` (a :class:`Coefficients`) at the last accepted
    iterate and ``state["n_steps"]``. Returns the level's summary."""
    t0 = time.perf_counter()
    dtype = opts["dtype"]
    xp = get_array_module(level.fixed.data)
    F = xp.asarray(level.fixed.data, dtype=dtype)
    M = xp.asarray(level.moving.data, dtype=dtype)
    h = tuple(level.fixed.spacing_array_order)
    data = data_term(opts, F, level.fixed_mask, level.moving_mask, h, template=M)
    n_max = opts["max_steps"]
    n_min = opts["n_steps"] if level.is_finest else max(2, (opts["n_steps"] + 1) // 2)
    n = min(n_max, max(n_min, int(state.get("n_steps", 0))))

    def make(n_):
        return make_shooter(opts, fixed, level.fixed, M, n_, finest=level.is_finest)

    probe = make(n)
    carried = state.get("z")
    z = probe.zeros() if carried is None else resize_coefficients(carried.z.astype(dtype), probe.nc)
    info = {"level": level.index, "iterations": 0, "evaluations": 0, "converged": True, "message": "no iterations",
            "seconds": 0.0, "n_steps": n, "refinements": 0, "band": list(probe.band), "coarse_shape": list(probe.nc),
            "map_shape": list(probe.M)}
    state["z"] = Coefficients(z)
    if level.iterations <= 0:
        state["n_steps"] = n
        return info
    shooter, n, z, res, ev = _stable(make, z, data, n, n_max, opts["min_det_j"])
    info["evaluations"] += ev
    state["z"] = Coefficients(z)
    E = res[0]
    if not math.isfinite(E):
        info.update(converged=False, message="non-finite energy at the starting velocity", n_steps=n)
        state["n_steps"] = n
        return info
    problem = _Problem(shooter, data, 1.0 / abs(E) if E != 0 else 1.0, min(h), opts["min_det_j"])
    shape = z.shape

    def accepted(it):
        Et, regt, datt, patht, _ = it.payload
        zt = it.x.reshape(shape)
        state["z"] = Coefficients(zt)
        progress.emit("iteration", level=level.index, iteration=it.iteration, metric=datt, regularization=regt,
                      similarity=similarity(F, patht.I1, mask=level.fixed_mask), step=it.step, energy=Et,
                      time_steps=problem.shooter.n)
        n_new = refined_steps(problem.shooter.n, patht.stability, n_max, STABILITY_TARGET)
        if n_new == problem.shooter.n:
            return None
        sh, _, zr, r, ev2 = _stable(make, zt, data, n_new, n_max, opts["min_det_j"])
        info["refinements"] += 1
        problem.shooter = sh
        state["z"] = Coefficients(zr)
        return Restart(zr.ravel(), r[0] * problem.scale, problem.gradient_of(zr, r), evaluations=ev2)

    out = minimise(problem, z.ravel().copy(), E * problem.scale, problem.gradient_of(z, res),
                   iterations=int(level.iterations), tol=opts["tol"], max_evaluations=int(2 * level.iterations + 10),
                   evaluations=info["evaluations"], on_accept=accepted)
    state["n_steps"] = problem.shooter.n
    info.update(iterations=out.iterations, evaluations=out.evaluations, converged=out.converged,
                message=out.message, n_steps=problem.shooter.n, seconds=time.perf_counter() - t0)
    return info
