"""Optimisers shared by the solvers.

:mod:`classreg.optimise.asgd`: stochastic gradient descent for sampled costs — elastix's adaptive stochastic
gradient descent with automatic gain estimation (:func:`asgd`, :func:`estimate_gain`), standard and regular-step
gradient descent (the optimisers of ``register_affine`` and ``register_bspline``).

:mod:`classreg.optimise.lbfgs`: monotone limited-memory BFGS with a backtracking Armijo line search and a trust
region in a problem-defined step norm (the optimiser of ``register_lddmm``; written for metamorphosis and the
parametric engine too). Its pieces — :class:`LBFGSMemory` (the two-loop recursion), :func:`backtrack` (the line
search), :class:`TrustRegion` and :func:`relative_decrease` (the stopping test) — can be used on their own.
"""
from .asgd import SGDResult, asgd, estimate_gain, regular_step_gd, standard_gd
from .lbfgs import (
    Iterate,
    LBFGSMemory,
    LBFGSResult,
    LineSearch,
    Restart,
    TrustRegion,
    backtrack,
    minimise,
    relative_decrease,
)

__all__ = ["Iterate", "LBFGSMemory", "LBFGSResult", "LineSearch", "Restart", "SGDResult", "TrustRegion", "asgd",
           "backtrack", "estimate_gain", "minimise", "regular_step_gd", "relative_decrease", "standard_gd"]
