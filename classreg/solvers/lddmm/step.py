"""One pyramid level of register_lddmm: L-BFGS on the initial momentum P₀ with adaptive time steps.

The energy ``E(P₀)`` of :mod:`.objective` is minimised with :func:`classreg.optimise.minimise` (monotone L-BFGS,
backtracking Armijo line search, trust region on the change of the initial velocity, ``max |K⋆(ΔP₀ ∇I₀)| / h``
voxels). The time discretisation adapts to the flow: trial momenta whose shooting is unstable
(``δt·max‖Dv_k‖_F > STABILITY_LIMIT``) or whose energy is not finite are rejected by the line search, and ``n_t`` is
raised whenever an accepted path has ``δt·max‖Dv_k‖_F > STABILITY_TARGET`` (the objective then changes — a finer
discretisation of the same geodesic — so the optimiser restarts with an empty memory). A momentum that even
``max_steps`` cannot shoot stably is replaced by its largest stable multiple (``v`` is linear in ``P₀``).
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from ...kernels._backend import get_array_module
from ...optimise import Restart, minimise
from ...progress import similarity
from .objective import data_term
from .operators import kernel_operator
from .shooting import GeodesicShooting

__all__ = ["STABILITY_LIMIT", "STABILITY_TARGET", "level_step", "refined_steps", "scale_to_stable", "stable_start"]

_log = logging.getLogger("classreg")

#: accepted paths are refined (more time steps) until δt·max‖Dv_k‖_F ≤ STABILITY_TARGET (docs/notes/lddmm.md)
STABILITY_TARGET = 0.1
#: the line search rejects trial momenta whose shooting exceeds δt·max‖Dv_k‖_F = STABILITY_LIMIT
STABILITY_LIMIT = 0.25


def refined_steps(n, stability, n_max, target=STABILITY_TARGET):
    """Time steps that bring the stability number ``δt·max‖Dv‖`` of a path shot with ``n`` steps back to
    ``target`` (it scales like 1/n), capped at ``n_max``."""
    if not stability > target or n >= n_max:
        return n
    if not math.isfinite(stability):
        return min(n_max, 2 * n)
    return min(n_max, max(n + 1, math.ceil(n * stability / target)))


def stable_start(make, P0, data, n, n_max):
    """Shoot ``P0`` with ``n`` steps, refining ``n`` until the path is stable (or ``n_max``).

    Returns ``(shooter, n, (E, reg, dat, path, seed), evaluations)``.
    """
    shooter = make(n)
    evals = 0
    while True:
        res = shooter.evaluate(P0, data)
        evals += 1
        n_new = refined_steps(n, res[3].stability, n_max)
        if n_new == n:
            return shooter, n, res, evals
        n = n_new
        shooter = make(n)


def scale_to_stable(shooter, P0, data, *, bisections=10):
    """The largest multiple ``c·P0`` (0 ≤ c < 1, by bisection) whose shooting has stability ≤ STABILITY_TARGET.

    Used when even ``max_steps`` cannot integrate ``P0`` stably: a momentum carried from a coarser, smoother level,
    or an iterate whose coarser time discretisation hid a shock. ``v`` is linear in ``P₀``, so scaling it down
    always restores stability. Returns ``(c·P0, evaluate-result, evaluations)``.
    """
    lo, hi = 0.0, 1.0
    evals = 0
    for _ in range(bisections):
        c = 0.5 * (lo + hi)
        path = shooter.forward(P0 * P0.dtype.type(c), stability_limit=STABILITY_TARGET)
        evals += 1
        if path.aborted:
            hi = c
        else:
            lo = c
    P = P0 * P0.dtype.type(lo)
    return P, shooter.evaluate(P, data), evals + 1


class _LevelProblem:
    """The level's energy as :func:`classreg.optimise.minimise` sees it: flat P₀ ↦ E(P₀) / |E_start|.

    ``value`` shoots with the stability limit (an aborted shot has ``E = inf``; ``limited`` records that one was
    rejected), ``gradient`` is the adjoint sweep of that shot, ``step_norm`` the trust-region size of a unit step
    along ``d``: the largest change of the initial velocity ``|K⋆(d ∇I₀)|`` in voxels of the level. ``use``
    switches to a new shooter (a finer time discretisation).
    """

    def __init__(self, shooter, n, data, shape, scale, hmin):
        self.data, self.shape, self.scale, self.hmin = data, shape, scale, hmin
        self.limited = False
        self.use(shooter, n)

    def use(self, shooter, n):
        self.shooter, self.n = shooter, n

    def value(self, x):
        res = self.shooter.evaluate(x.reshape(self.shape), self.data, stability_limit=STABILITY_LIMIT)
        if res[3].aborted:
            self.limited = True
        return res[0] * self.scale, res

    def gradient(self, x, res):
        return self.gradient_of(x.reshape(self.shape), res)

    def gradient_of(self, P, res):
        """The scaled gradient (flat, working precision) at ``P`` from its :meth:`GeodesicShooting.evaluate`."""
        return self.shooter.gradient(P, res[3], res[4]).ravel() * self.shooter.dtype.type(self.scale)

    def step_norm(self, d):
        dv = self.shooter.K.apply(d.reshape(self.shape)[..., None] * self.shooter.g0)
        return float(np.max(np.abs(dv))) / self.hmin


def level_step(level, state, progress, opts, source=None):
    """L-BFGS on P₀ at one pyramid level; keeps ``state["P0"]`` at the last accepted iterate and ``state["n_steps"]``
    at the time steps used. Returns the level's summary (iterations, evaluations, message, time steps, ...).

    The number of time steps starts at ``state["n_steps"]`` (carried from the coarser level; coarse levels start
    from half of ``n_steps``: they only provide a starting momentum) and is refined as described in the module.
    ``source(level, n)``, optional, returns the intensity-source arguments of :class:`.GeodesicShooting`
    (``source_mu``, ``source_weights`` for ``n`` time steps on the level's grid): register_metamorphosis.
    """
    t0 = time.perf_counter()
    dtype = opts["dtype"]
    xp = get_array_module(level.fixed.data)  # the level's images are on the device for backend "cuda"
    F = xp.asarray(level.fixed.data, dtype=dtype)
    M = xp.asarray(level.moving.data, dtype=dtype)
    h = tuple(level.fixed.spacing_array_order)
    op = kernel_operator(F.shape, h, kernel=opts["kernel"], kernel_sigma=opts["kernel_sigma"], alpha=opts["alpha"],
                         order=opts["order"], backend=opts["backend"])

    def make(n):
        extra = {} if source is None else source(level, n)
        return GeodesicShooting(M, h, op, n, dtype=dtype, backend=opts["backend"], **extra)

    data = data_term(opts, F, level.fixed_mask, level.moving_mask, h, template=M)
    P0 = state.get("P0")
    if P0 is None or P0.shape != F.shape:
        P0 = xp.zeros(F.shape, dtype=dtype)
    state["P0"] = P0 = xp.asarray(P0, dtype=dtype)
    n_max = opts["max_steps"]
    n_min = opts["n_steps"] if level.is_finest else max(2, (opts["n_steps"] + 1) // 2)
    n = min(n_max, max(n_min, int(state.get("n_steps", 0))))
    info = {"level": level.index, "iterations": 0, "evaluations": 0, "converged": True, "message": "no iterations",
                "seconds": 0.0, "n_steps": n, "refinements": 0, "projections": 0}
    start = None if level.iterations <= 0 else _start(make, P0, data, n, n_max, state, info, level.index)
    if start is None:
        state["n_steps"] = info["n_steps"]
        info["seconds"] = time.perf_counter() - t0
        return info
    shooter, n, (E, _reg, _dat, _path, _seed) = start
    problem = _LevelProblem(shooter, n, data, F.shape, 1.0 / abs(E) if E != 0 else 1.0, min(h))
    problem.data_target, problem.data_mask = F, level.fixed_mask

    def accepted(it):
        return _accepted(it, problem, make, n_max, state, info, progress, level.index)

    res = minimise(problem, state["P0"].ravel().copy(), E * problem.scale, problem.gradient_of(state["P0"], start[2]),
                   iterations=int(level.iterations), tol=opts["tol"], max_evaluations=int(2 * level.iterations + 10),
                   evaluations=info["evaluations"], on_accept=accepted)
    if problem.limited and problem.n >= n_max:
        _log.info("lddmm level %d: steps limited by the stability bound at the maximum of %d time steps "
                  "(raise max_steps or kernel_sigma)", level.index, n_max)
    state["n_steps"] = problem.n
    info.update(iterations=res.iterations, evaluations=res.evaluations, converged=res.converged,
                message=res.message, n_steps=problem.n, seconds=time.perf_counter() - t0)
    return info


def _start(make, P0, data, n, n_max, state, info, index):
    """Shoot the carried momentum stably: more time steps, a restart from P₀ = 0 if its energy is not finite, its
    largest stable multiple if even ``n_max`` steps do not suffice. Returns ``(shooter, n, evaluate-result)``, or
    None (``info`` says why) when not even P₀ = 0 has a finite energy."""
    shooter, n, res, ev = stable_start(make, P0, data, n, n_max)
    info["evaluations"] += ev
    if not math.isfinite(res[0]):  # the transferred momentum does not shoot: restart this level from P₀ = 0
        _log.warning("lddmm level %d: the momentum from the coarser level gives a non-finite energy; restarting "
                     "from P0 = 0", index)
        state["P0"] = P0 = get_array_module(P0).zeros_like(P0)
        shooter, n, res, ev = stable_start(make, P0, data, n, n_max)
        info["evaluations"] += ev
        if not math.isfinite(res[0]):
            info.update(converged=False, message="non-finite energy at P0 = 0", n_steps=n)
            return None
    if not res[3].stability <= STABILITY_LIMIT:  # not even max_steps integrate the carried momentum stably
        state["P0"], res, ev = scale_to_stable(shooter, P0, data)
        info["evaluations"] += ev
        info["projections"] += 1
        _log.info("lddmm level %d: the carried momentum is too stiff for %d time steps; scaled it down to "
                  "stability %.3g", index, n, res[3].stability)
    return shooter, n, res


def _accepted(it, problem, make, n_max, state, info, progress, index):
    """After an accepted iterate: keep it, report it, and refine the time steps if its path is too stiff (then
    return the :class:`~classreg.optimise.Restart` on the finer discretisation)."""
    Et, regt, datt, patht, _ = it.payload
    P = it.x.reshape(problem.shape)
    state["P0"] = P
    progress.emit("iteration", level=index, iteration=it.iteration, metric=datt, regularization=regt,
                  similarity=similarity(problem.data_target, patht.I1, mask=problem.data_mask), step=it.step,
                  energy=Et, time_steps=problem.n)
    n_new = refined_steps(problem.n, patht.stability, n_max)
    if n_new == problem.n:
        return None
    _log.debug("lddmm level %d: stability %.3g with %d steps -> %d steps", index, patht.stability, problem.n, n_new)
    shooter, n, res, ev = stable_start(make, P, problem.data, n_new, n_max)
    info["refinements"] += 1
    if not res[3].stability <= STABILITY_LIMIT:
        # even max_steps cannot integrate this momentum stably (a near-singular flow whose coarser time
        # discretisation hid the shock): continue from the largest stable multiple of it
        P, res, ev2 = scale_to_stable(shooter, P, problem.data)
        ev += ev2
        info["projections"] += 1
        state["P0"] = P
    problem.use(shooter, n)
    return Restart(P.ravel(), res[0] * problem.scale, problem.gradient_of(P, res), evaluations=ev)
