"""The search schedule of ``register_rigid``: one entry per pyramid level or per level transition.

Level k (0 = coarsest) evaluates ``rotations[k]`` rotations: ``samples[0]`` spread over the rotation space at the
first level; at a later level the ``keep[k-1]`` best candidates of level k-1, unchanged, and ``samples[k]``
perturbations of them (uniform ±``perturbation[k-1]`` degrees per Euler angle, round robin).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ...pyramid import check_shrink_factors

__all__ = ["Schedule", "resolve_schedule"]


class Schedule(NamedTuple):
    """Per-level parameters (tuples): ``shrink_factors``, ``smoothing_sigmas`` (mm), ``samples`` (one per level);
    ``perturbation`` (degrees) and ``keep`` (one per level transition)."""

    shrink_factors: tuple
    smoothing_sigmas: tuple
    samples: tuple
    perturbation: tuple
    keep: tuple

    @property
    def levels(self) -> int:
        return len(self.shrink_factors)

    @property
    def rotations(self) -> tuple:
        """Rotations evaluated by the search at each level (the kept candidates plus the new samples)."""
        out = [self.samples[0]]
        for k in range(1, self.levels):
            out.append(min(self.keep[k - 1], out[-1]) + self.samples[k])
        return tuple(out)

    def evaluations(self, polish_steps: int, ndim: int) -> int:
        """Upper bound of the evaluations of a run (the progress bar's total): the search plus at most 12 per
        polish step and Euler angle."""
        s = self.samples
        return (s[0] + sum(s[k] + self.keep[k - 1] for k in range(1, self.levels))
                + 12 * polish_steps * (1 if ndim == 2 else 3))


def per_level(value, n, name, cast, *, minimum, allow_scalar=True) -> tuple:
    """``value`` as a tuple of ``n`` finite numbers >= ``minimum`` (a scalar is repeated if ``allow_scalar``)."""
    if np.ndim(value) == 0 and allow_scalar:
        value = (value,) * n
    try:
        out = tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of {n} numbers, got {value!r}") from None
    if len(out) != n:
        what = "level transition" if name in ("perturbation", "keep") else "pyramid level"
        raise ValueError(f"{name} must have {n} entries (one per {what}), got {len(out)}: {value!r}")
    for v in out:
        if not math.isfinite(v) or v < minimum:
            raise ValueError(f"{name} entries must be finite and >= {minimum}, got {value!r}")
    return out


def resolve_schedule(shrink_factors, smoothing_sigmas, samples, perturbation, keep) -> Schedule:
    """The :class:`Schedule`, with the checks that need the number of levels (the ranges are declared)."""
    shrink = check_shrink_factors(shrink_factors)
    nl = len(shrink)
    sigmas = per_level(smoothing_sigmas, nl, "smoothing_sigmas", float, minimum=0.0)
    samples = per_level(samples, nl, "samples", int, minimum=0, allow_scalar=False)
    if samples[0] < 1:
        raise ValueError(f"samples[0] (rotations sampled at the first level) must be >= 1, got {samples!r}")
    perturbation = per_level(perturbation, nl - 1, "perturbation", float, minimum=0.0)
    keep = per_level(keep, nl - 1, "keep", int, minimum=1)
    return Schedule(shrink, sigmas, samples, perturbation, keep)
