"""Monotone L-BFGS with a backtracking Armijo line search and a trust region on the step size.

The problem is an object with

* ``value(x) -> (f, payload)``: the objective at the flat vector ``x``; ``f`` may be ``inf`` or ``nan`` (an
  infeasible trial point, e.g. an unstable integration: it is rejected), ``payload`` is whatever the gradient needs
  (a stored forward pass) and is handed back unchanged;
* ``gradient(x, payload) -> g``: ∇f at an accepted point (same shape and dtype as ``x``);
* optionally ``step_norm(d) -> float``: the size of the unit step along ``d`` in the unit of the trust region
  (``register_lddmm``: the largest change of the initial velocity in voxels); default ``max |d|``.

Each iteration (J. Nocedal, S. J. Wright, *Numerical Optimization*, 2nd ed., Springer 2006,
doi:10.1007/978-0-387-40065-5):

1. direction ``d = −H g`` by the two-loop recursion with ``H₀ = (sᵀy / yᵀy) I`` and the last ``memory`` pairs
   (Algorithm 7.4); if ``gᵀd ≥ 0`` the memory is dropped and ``d = −g``;
2. first trial step ``α = min(1, Δ / ‖d‖)`` (``α = Δ / ‖d‖`` while the memory is empty: the steepest-descent
   direction has no natural scale), ``‖·‖`` the problem's ``step_norm`` and ``Δ`` the trust radius;
3. backtracking until the Armijo condition ``f(x + αd) ≤ f(x) + c₁ α gᵀd`` holds (Algorithm 3.1), by safeguarded
   quadratic interpolation ``α ← min(max(α_q, 0.1 α), 0.5 α)`` (§3.5), ``α ← α/4`` after a non-finite value;
4. ``Δ ← max(Δ, 2 α ‖d‖)`` if the first trial was accepted, else ``Δ ← α ‖d‖``; the pair ``(s, y)`` is stored
   when ``sᵀy > 10⁻¹⁰ yᵀy`` (curvature condition, keeps ``H`` positive definite).

Accepted values never increase. The run stops after ``iterations`` accepted steps, when the relative decrease
``(f_k − f_{k+1}) / max(|f_k|, |f_{k+1}|, 1)`` is at most ``tol`` (scipy's ``ftol`` convention), when the line
search finds no decrease or the evaluation budget is spent. A hook ``on_accept(iterate)`` sees every accepted point
and may replace the objective's discretisation: it returns a :class:`Restart` with the new point, value and
gradient, and the memory is dropped.

Vectors stay in the dtype of ``x`` (float32 halves the memory traffic of the two-loop recursion); inner products,
values and step lengths are Python floats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Iterate", "LBFGSMemory", "LBFGSResult", "LineSearch", "Restart", "TrustRegion", "backtrack", "minimise",
           "relative_decrease"]


class LBFGSMemory:
    """The last ``size`` curvature pairs ``(s, y)`` and the two-loop recursion.

    Parameters
    ----------
    size : int
        Number of pairs kept (the oldest is dropped).
    curvature_tol : float
        A pair is stored only if ``sᵀy > curvature_tol · yᵀy``.
    """

    def __init__(self, size: int = 10, curvature_tol: float = 1e-10):
        self.size = int(size)
        self.curvature_tol = float(curvature_tol)
        self.S, self.Y, self.rho = [], [], []

    def __len__(self) -> int:
        return len(self.S)

    def reset(self) -> None:
        """Forget every pair (the next direction is steepest descent)."""
        self.S.clear(), self.Y.clear(), self.rho.clear()

    def direction(self, g):
        """``−H g`` by the two-loop recursion (Nocedal & Wright, Algorithm 7.4), ``H₀ = (sᵀy / yᵀy) I``."""
        q = g.copy()
        alpha = []
        for s, y, r in zip(reversed(self.S), reversed(self.Y), reversed(self.rho)):
            a = r * float(np.dot(s, q))
            q -= a * y
            alpha.append(a)
        if self.S:
            q *= float(np.dot(self.S[-1], self.Y[-1])) / float(np.dot(self.Y[-1], self.Y[-1]))
        for (s, y, r), a in zip(zip(self.S, self.Y, self.rho), reversed(alpha)):
            b = r * float(np.dot(y, q))
            q += (a - b) * s
        return -q

    def descent_direction(self, g, dtype):
        """``(d, gᵀd)``: the quasi-Newton direction in ``dtype``, or ``−g`` (memory dropped) if it does not
        descend."""
        d = self.direction(g).astype(dtype, copy=False)
        gtd = float(np.dot(g, d))
        if not gtd < 0.0:  # not a descent direction (should not happen): restart from steepest descent
            self.reset()
            d = -g
            gtd = -float(np.dot(g, g))
        return d, gtd

    def update(self, s, y) -> bool:
        """Store the pair if it satisfies the curvature condition; returns whether it was stored."""
        sy = float(np.dot(s, y))
        if not sy > self.curvature_tol * float(np.dot(y, y)):
            return False
        self.S.append(s), self.Y.append(y), self.rho.append(1.0 / sy)
        if len(self.S) > self.size:
            self.S.pop(0), self.Y.pop(0), self.rho.pop(0)
        return True


class TrustRegion:
    """A bound ``Δ`` on the size of a step (in the problem's ``step_norm``), adapted to the accepted steps."""

    def __init__(self, radius: float = 1.0):
        self.radius = float(radius)

    def initial_step(self, rate: float, have_memory: bool) -> float:
        """First trial step length along a direction whose unit step has size ``rate``."""
        return min(1.0, self.radius / rate) if have_memory else self.radius / rate

    def update(self, alpha: float, rate: float, first: bool) -> None:
        """Doubled (at least) after a step accepted at the first trial, else the size of the accepted step."""
        self.radius = max(self.radius, 2.0 * alpha * rate) if first else alpha * rate


@dataclass
class LineSearch:
    """Outcome of :func:`backtrack`: the accepted point (``x``, ``f``, ``payload``; None if not ``accepted``), its
    step length ``alpha``, whether the first trial was accepted and the number of evaluations."""

    accepted: bool
    alpha: float
    x: object = None
    f: float = math.inf
    payload: object = None
    first: bool = False
    evaluations: int = 0


def backtrack(value, x, f: float, d, gtd: float, alpha: float, *, c1: float = 1e-4, max_trials: int = 30,
              max_evaluations: float = math.inf) -> LineSearch:
    """Backtracking Armijo line search from ``x`` along ``d`` (``gtd = gᵀd < 0``), first trial ``alpha``.

    Trials ``x + α d`` (in ``x``'s dtype) until ``value`` returns a finite ``f_t ≤ f + c1 α gᵀd``; after a failed
    trial ``α`` is the minimiser of the quadratic through ``f``, ``gᵀd`` and ``f_t``, kept in ``[0.1 α, 0.5 α]``
    (``α/4`` after a non-finite value). At most ``max_trials`` trials and ``max_evaluations`` evaluations.
    """
    evals = 0
    for trial in range(max_trials):
        if evals >= max_evaluations:
            break
        xt = x + x.dtype.type(alpha) * d
        ft, payload = value(xt)
        evals += 1
        if math.isfinite(ft) and ft <= f + c1 * alpha * gtd:
            return LineSearch(True, alpha, xt, ft, payload, trial == 0, evals)
        if not math.isfinite(ft):
            alpha *= 0.25
        else:  # safeguarded quadratic backtracking
            curv = 2.0 * (ft - f - alpha * gtd)
            aq = -gtd * alpha * alpha / curv if curv > 0 else 0.5 * alpha
            alpha = min(max(aq, 0.1 * alpha), 0.5 * alpha)
    return LineSearch(False, alpha, evaluations=evals)


def relative_decrease(f_old: float, f_new: float) -> float:
    """``(f_old − f_new) / max(|f_old|, |f_new|, 1)``: the stopping test's measure."""
    return (f_old - f_new) / max(abs(f_old), abs(f_new), 1.0)


@dataclass
class Iterate:
    """An accepted point, as :func:`minimise` shows it to ``on_accept``: its index (0 for the first accepted step),
    the point, value and gradient, the largest component of the step ``max |s|`` and the ``value`` payload."""

    iteration: int
    x: object
    f: float
    g: object
    step: float
    payload: object


@dataclass
class Restart:
    """Returned by ``on_accept`` to continue from a new point of a changed objective (memory dropped);
    ``evaluations`` is what computing it cost (counted against the budget)."""

    x: object
    f: float
    g: object
    evaluations: int = 0


@dataclass
class LBFGSResult:
    """The last accepted point, value and gradient, accepted ``iterations``, total ``evaluations`` (including
    the ``evaluations`` passed in), whether a stopping test (not a limit) ended the run, and why it ended."""

    x: object
    f: float
    g: object
    iterations: int
    evaluations: int
    converged: bool
    message: str


def minimise(problem, x, f: float, g, *, iterations: int, tol: float = 0.0, max_evaluations: float = math.inf,
             evaluations: int = 0, memory: int = 10, radius: float = 1.0, c1: float = 1e-4, max_trials: int = 30,
             on_accept=None) -> LBFGSResult:
    """Minimise ``problem`` from ``x`` (flat vector; value ``f`` and gradient ``g`` already computed).

    Parameters
    ----------
    problem
        Has ``value(x) -> (f, payload)``, ``gradient(x, payload) -> g`` and optionally ``step_norm(d)`` (see the
        module docstring).
    x, f, g
        The starting point, its value and gradient.
    iterations : int
        Iteration cap (every accepted step counts, also one followed by a restart).
    tol : float
        Stop when the relative decrease of an accepted step is at most ``tol``.
    max_evaluations : float
        Budget of ``value`` calls, including the ``evaluations`` already spent before the call.
    evaluations : int
        Evaluations spent before (e.g. computing ``f``), counted against the budget and in the result.
    memory : int
        L-BFGS pairs kept.
    radius : float
        Initial trust radius, in the unit of ``step_norm``.
    c1 : float
        Armijo constant.
    max_trials : int
        Line-search trials per iteration.
    on_accept : callable, optional
        ``on_accept(Iterate) -> Restart | None``, called after every accepted step (it may raise to stop).

    Returns
    -------
    LBFGSResult
    """
    mem = LBFGSMemory(memory)
    region = TrustRegion(radius)
    step_norm = getattr(problem, "step_norm", None) or (lambda d: float(np.max(np.abs(d))))
    message, converged, done = "iteration limit reached", False, 0
    for _ in range(int(iterations)):
        d, gtd = mem.descent_direction(g, x.dtype)
        if gtd == 0.0:
            message, converged = "zero gradient", True
            break
        rate = step_norm(d)
        if not (math.isfinite(rate) and rate > 0.0):
            message, converged = "zero search direction", True
            break
        ls = backtrack(problem.value, x, f, d, gtd, region.initial_step(rate, len(mem) > 0), c1=c1,
                       max_trials=max_trials, max_evaluations=max_evaluations - evaluations)
        evaluations += ls.evaluations
        if not ls.accepted:
            message = ("function evaluation limit reached" if evaluations >= max_evaluations
                       else "line search failed to decrease the energy")
            converged = message.startswith("line search")
            break
        region.update(ls.alpha, rate, ls.first)
        gt = problem.gradient(ls.x, ls.payload)
        s = ls.x - x
        mem.update(s, gt - g)
        rel = relative_decrease(f, ls.f)
        x, f, g = ls.x, ls.f, gt
        restart = None if on_accept is None else on_accept(Iterate(done, x, f, g, float(np.max(np.abs(s))),
                                                                    ls.payload))
        done += 1
        if restart is not None:
            x, f, g = restart.x, restart.f, restart.g
            evaluations += restart.evaluations
            mem.reset()
            continue
        if rel <= tol:
            message, converged = "relative energy decrease below tol", True
            break
    return LBFGSResult(x, f, g, done, evaluations, converged, message)
