"""Stochastic gradient descent for parametric registration: ASGD, standard and regular-step gradient descent.

The problem is a callable ``evaluate(x, k) -> (value, gradient)`` that may draw new random samples at every
iteration ``k`` (so the gradient is a noisy estimate), a positive per-parameter ``scales`` vector (the update is
``x ← x − γ_k g / scales``, elastix's ``Scales``/``AutomaticScalesEstimation``) and an iteration budget. Every
optimiser here runs its whole budget unless it stops for a reason it reports (a step below ``min_step`` for the
regular-step method, or a callback).

* :func:`asgd` — adaptive stochastic gradient descent (S. Klein, J. P. W. Pluim, M. Staring, M. A. Viergever,
  "Adaptive stochastic gradient descent optimisation for image registration", Int. J. Comput. Vis. 81(3):227-239,
  2009, eqs. 9-12): gain ``γ_k = a / (t_k + A)^α`` with an adaptive time ``t_{k+1} = max(0, t_k + f(−g̃_kᵀ g̃_{k−1}))``
  and the sigmoid ``f(x) = f_min + (f_max − f_min) / (1 − (f_max/f_min) e^{−x/ω})``: steps shrink when successive
  gradients point against each other (near the optimum, noise dominates) and grow back while they agree.
  :func:`estimate_gain` sets ``a`` (and ``ω``) automatically from a target displacement ``δ`` of the samples,
  elastix's ``AutomaticParameterEstimation``.
* :func:`standard_gd` — elastix's ``StandardGradientDescent``: ``γ_k = a / (k + A + 1)^α`` (Spall's gain sequence).
* :func:`regular_step_gd` — ITK's ``RegularStepGradientDescent``: steps of a fixed length along the scaled gradient,
  multiplied by ``relaxation`` each time the direction turns by more than 90°, until ``min_step``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..kernels._backend import get_array_module

__all__ = ["SGDResult", "asgd", "estimate_gain", "regular_step_gd", "sigmoid", "standard_gd"]

#: elastix defaults (ELASTIX.md §5)
SP_A = 20.0
SP_ALPHA_AUTO = 1.0
SIGMOID_MAX = 1.0
SIGMOID_MIN = -0.8


@dataclass
class SGDResult:
    """The final parameters, the last value, the iterations done and why the run stopped."""

    x: np.ndarray
    value: float
    iterations: int
    stop_reason: str


def sigmoid(x, *, fmax=SIGMOID_MAX, fmin=SIGMOID_MIN, omega=1.0):
    """The ASGD time-step function ``f(x) = f_min + (f_max − f_min) / (1 − (f_max/f_min) e^{−x/ω})`` (Klein et al.
    2009, eq. 12): ``f(0) = 0``, ``f → f_max`` for ``x → ∞``, ``f → f_min`` for ``x → −∞``."""
    z = min(max(-x / omega, -700.0), 700.0)
    return fmin + (fmax - fmin) / (1.0 - (fmax / fmin) * math.exp(z))


def estimate_gain(displacements, gradients, scales, *, exact=None, exact_at=None, max_step, A=SP_A,
                  alpha=SP_ALPHA_AUTO):
    """``a`` and ``ω`` of :func:`asgd` (elastix ``AutomaticParameterEstimation``, Klein et al. 2009, §4).

    ``gradients`` are a few stochastic gradients at the starting point (the samples of an iteration), ``exact`` the
    gradient there on many samples (elastix ``NumberOfSamplesForExactGradient``; default: their mean), and
    ``displacements(dx) -> (N, ndim)`` how far a parameter step ``dx`` moves each sample.

    * ``a_max``: the first step ``γ_0 g / scales`` (``γ_0 = a / A^α``) along the exact gradient moves the samples by
      ``max_step`` mm, the displacement measured as the mean + 2 standard deviations of ``‖J_j g‖`` over the
      samples: elastix's ``DisplacementDistribution`` estimate ("2sigma") of Y. Qiao, B. van Lew,
      B. P. F. Lelieveldt, M. Staring, IEEE TMI 35(2):391-403, 2016 (measured against the noisy gradients'
      displacements: inter3d B-spline Dice 0.675 → 0.683, brain2d 0.794 → 0.806);
    * noise compensation: ``a = a_max σ₁ / (σ₁ + σ₃)`` with ``σ₁ = ‖g‖²`` of the exact gradient and ``σ₃ =
      E‖g̃ − g‖²`` the sampling noise, both in the scaled metric ``diag(1/scales)``: near an optimum, where the
      stochastic gradient is mostly noise, the steps start small;
    * ``ω = 0.1 σ₃`` (elastix ``SigmoidScaleFactor`` 0.1): the scale of the inner products ``g̃_kᵀ g̃_{k−1}`` the
      sigmoid of the adaptive time compares; with a single (deterministic) gradient, 10 % of its squared norm;
    * curvature limit (not in elastix): with ``exact_at(x)`` (the exact gradient at another point ``x`` relative to
      the start, a callable), the curvature ``κ = sᵀ(g(s) − g) / ‖s‖²`` along the first step ``s`` bounds the
      gain by ``γ_0 ≤ 1/κ`` — the step of Newton's method along that line — so that a start near the optimum
      (the next pyramid level) does not begin with steps that overshoot it many times over.

    * ``f_min = −0.99 + 0.98 σ₁ / (σ₁ + σ₃)``, elastix's choice: when noise dominates, successive gradients that
      agree barely shorten the time, those that disagree lengthen it by up to 1.

    Returns ``(a, omega, fmin)``; ``a = 0`` when every gradient vanishes (nothing to do).
    """
    gradients = [np.asarray(g, dtype=float) for g in gradients]
    g_exact = np.mean(gradients, axis=0) if exact is None else np.asarray(exact, dtype=float)
    d = np.sqrt(np.sum(displacements(g_exact / scales) ** 2, axis=1))
    peak = float(d.mean() + 2.0 * d.std()) if len(d) else 0.0
    if not (peak > 0 and np.isfinite(peak)):
        return 0.0, 1.0, SIGMOID_MIN
    a = max_step * A ** alpha / peak
    sigma1 = float(np.dot(g_exact, g_exact / scales))
    sigma3 = float(np.mean([np.dot(g - g_exact, (g - g_exact) / scales) for g in gradients]))
    fmin = SIGMOID_MIN
    if sigma3 > 0 and len(gradients) > 1:
        noise = sigma1 / (sigma1 + sigma3)
        a *= noise
        omega = 0.1 * sigma3
        fmin = -0.99 + 0.98 * noise
    else:
        omega = 0.1 * max(sigma1, float(np.dot(gradients[0], gradients[0] / scales)))
    if exact_at is not None and sigma1 > 0:
        step = -(a / A ** alpha) * g_exact / scales
        dg = np.asarray(exact_at(step), dtype=float) - g_exact
        kappa = float(np.dot(step, dg)) / float(np.dot(step, step * scales))  # in the scaled metric
        if kappa > 0:
            a = min(a, A ** alpha / kappa)
    return a, max(omega, 1e-300), fmin


def asgd(evaluate, x0, *, scales, iterations, a, omega, A=SP_A, alpha=SP_ALPHA_AUTO, fmax=SIGMOID_MAX,
         fmin=SIGMOID_MIN, average=0.0, project=None, restart=None, on_iteration=None) -> SGDResult:
    """Adaptive stochastic gradient descent (Klein et al. 2009); see the module docstring.

    ``average`` > 0 returns the mean of the iterates of the last ``average`` fraction of the iterations instead of
    the last iterate (Polyak-Ruppert averaging: B. T. Polyak, A. B. Juditsky, SIAM J. Control Optim.
    30(4):838-855, 1992), which removes most of the sampling noise of the final estimate; 0 is elastix's behaviour.
    ``project(x)`` (optional) maps every update back onto a convex feasible set (projected gradient descent; the
    average of projected iterates stays feasible). ``restart(k, x)`` (optional) is asked after every update whether
    to continue from another point (it returns the new point, or None): a model that re-parameterises itself (a
    B-spline composed onto the map so far), or a projection too costly for every update (register_bspline's fold
    projection every few iterations), continues with the same gain schedule and a fresh average.
    ``on_iteration(k, x, value, gain)`` is called after every update (``value`` at the point before it).

    ``x0`` may be a CuPy array (``evaluate`` then returns device gradients): the iterates stay on the device, the
    host reads one number per iteration (the inner product of successive gradients, for the adaptive time).
    """
    xp = get_array_module(x0)
    x = xp.array(x0, dtype=float)
    scales = xp.asarray(scales, dtype=float)
    t, g_prev, value = 0.0, None, float("nan")
    n_it = int(iterations)
    start = n_it - int(round(float(average) * n_it)) if average > 0 else n_it
    total, count = xp.zeros_like(x), 0
    for k in range(n_it):
        value, g = evaluate(x, k)
        if g_prev is not None:
            t = max(0.0, t + sigmoid(-float(xp.dot(g, g_prev / scales)), fmax=fmax, fmin=fmin, omega=omega))
        gain = a / (t + A) ** alpha
        x = x - gain * g / scales
        if project is not None:
            x = project(x)
        g_prev = g
        if restart is not None:
            new = restart(k, x)
            if new is not None:
                x, g_prev = xp.array(new, dtype=float), None
                total[:], count = 0.0, 0
        if k >= start:
            total += x
            count += 1
        if on_iteration is not None:
            on_iteration(k, x, value, gain)
    if count:
        x = total / count
    return SGDResult(x, value, n_it, f"completed {n_it} iterations")


def standard_gd(evaluate, x0, *, scales, iterations, a=400.0, A=SP_A, alpha=0.602, project=None,
                on_iteration=None) -> SGDResult:
    """elastix ``StandardGradientDescent``: ``x ← x − a / (k + A + 1)^α · g / scales`` (``project`` as in
    :func:`asgd`)."""
    x = np.array(x0, dtype=float)
    scales = np.asarray(scales, dtype=float)
    value = float("nan")
    for k in range(int(iterations)):
        value, g = evaluate(x, k)
        gain = a / (k + A + 1.0) ** alpha
        x = x - gain * g / scales
        if project is not None:
            x = project(x)
        if on_iteration is not None:
            on_iteration(k, x, value, gain)
    return SGDResult(x, value, int(iterations), f"completed {int(iterations)} iterations")


def regular_step_gd(evaluate, x0, *, scales, iterations, max_step, min_step, displacements,
                    relaxation=0.5, project=None, on_iteration=None) -> SGDResult:
    """ITK ``RegularStepGradientDescent``: each step moves the samples by ``step`` mm at most (``displacements`` as
    in :func:`estimate_gain`) along ``−g / scales``; the step is multiplied by ``relaxation`` whenever the scaled
    gradient turns by more than 90°, and the run stops when it falls below ``min_step``."""
    x = np.array(x0, dtype=float)
    scales = np.asarray(scales, dtype=float)
    step, g_prev, value = float(max_step), None, float("nan")
    for k in range(int(iterations)):
        value, g = evaluate(x, k)
        if g_prev is not None and float(np.dot(g, g_prev / scales)) < 0:
            step *= relaxation
            if step < min_step:
                return SGDResult(x, value, k, f"step below min_step ({min_step:g} mm)")
        d = g / scales
        peak = float(np.sqrt(np.max(np.sum(displacements(d) ** 2, axis=1))))
        if not peak > 0:
            return SGDResult(x, value, k, "zero gradient")
        gain = step / peak
        x = x - gain * d
        if project is not None:
            x = project(x)
        g_prev = g
        if on_iteration is not None:
            on_iteration(k, x, value, gain)
    return SGDResult(x, value, int(iterations), f"completed {int(iterations)} iterations")
