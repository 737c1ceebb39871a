"""Optimisers shared by the solvers.

:mod:`classreg.optimise.lbfgs`: monotone limited-memory BFGS with a backtracking Armijo line search and a trust
region in a problem-defined step norm (the optimiser of ``register_lddmm``; written for metamorphosis and the
parametric engine too). Its pieces — :class:`LBFGSMemory` (the two-loop recursion), :func:`backtrack` (the line
search), :class:`TrustRegion` and :func:`relative_decrease` (the stopping test) — can be used on their own.
"""
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

__all__ = ["Iterate", "LBFGSMemory", "LBFGSResult", "LineSearch", "Restart", "TrustRegion", "backtrack", "minimise",
           "relative_decrease"]
