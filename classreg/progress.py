"""Progress plumbing shared by every solver: logging, callback events, an optional tqdm bar.

A solver never prints.  It reports through a :class:`Progress` object, which

* logs to ``logging.getLogger("classreg")`` (level INFO for start/level/done, DEBUG for iterations),
* calls the user's ``callback(event)`` with an :class:`Event` — a callback ends the run early by raising
  :class:`StopRegistration` (the solver then returns its current estimate with ``stop_reason="stopped by
  callback"``),
* shows a tqdm bar when ``progress=True`` (the CLI turns it on; tqdm is optional),
* keeps the per-iteration history that ends up in ``Result.history``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

__all__ = ["Event", "StopRegistration", "Progress", "STAGES"]

logger = logging.getLogger("classreg")

#: Event stages, in the order a run emits them.
STAGES = ("start", "level_start", "iteration", "level_end", "done")


class StopRegistration(Exception):
    """Raise from a callback to end a registration early; the current estimate is returned."""


@dataclass(frozen=True)
class Event:
    """One progress event.

    Attributes
    ----------
    stage : {"start", "level_start", "iteration", "level_end", "done"}
    level : int or None
        Pyramid level, 0 = coarsest.
    iteration : int or None
        Iteration within the level.
    metric : float or None
        Current similarity cost.
    regularization : float or None
        Current regularisation energy.
    step : float or None
        Size of the last update (solver-specific units, documented by the solver).
    elapsed : float
        Seconds since the start of the run.
    extra : dict
        Solver-specific values (e.g. ``piece`` for broken-geodesic demons).
    """

    stage: str
    level: int | None = None
    iteration: int | None = None
    metric: float | None = None
    regularization: float | None = None
    step: float | None = None
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)


class Progress:
    """Dispatches events to the log, the callback and a tqdm bar; records the iteration history.

    Parameters
    ----------
    name : str
        Solver name used in log lines and the bar.
    callback : callable, optional
        ``callback(event)``; raise :class:`StopRegistration` to stop.
    progress : bool
        Show a tqdm bar (silently skipped if tqdm is not installed).
    total : int, optional
        Total number of iterations for the bar.
    time_limit : float, optional
        Seconds after which the first iteration event stops the run (:class:`StopRegistration`), with
        :attr:`stop_reason` saying so.
    """

    def __init__(self, name: str, *, callback=None, progress: bool = False, total: int | None = None,
                 time_limit: float | None = None):
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        self.name = name
        self.callback = callback
        self.history: list[dict] = []
        self.stopped = False
        self.stop_reason = "stopped by callback"
        self.time_limit = None if time_limit is None else float(time_limit)
        self._t0 = time.perf_counter()
        self._bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=name, unit="it", leave=False)
            except ImportError:  # pragma: no cover - tqdm is optional
                logger.info("progress=True but tqdm is not installed (pip install tqdm)")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def emit(self, stage: str, **values) -> Event:
        """Build and dispatch an event; raises :class:`StopRegistration` if the callback asks to stop."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        extra = dict(values.pop("extra", None) or {})
        known = {k: values.pop(k) for k in ("level", "iteration", "metric", "regularization", "step") if k in values}
        extra.update(values)
        known = {k: (float(v) if k in ("metric", "regularization", "step") and v is not None else v)
                 for k, v in known.items()}
        ev = Event(stage=stage, elapsed=self.elapsed, extra=extra, **known)
        if stage == "iteration":
            row = {"level": ev.level, "iteration": ev.iteration, "metric": ev.metric,
                   "regularization": ev.regularization, "step": ev.step, "elapsed": ev.elapsed, **extra}
            self.history.append(row)
            logger.debug("%s level %s it %s metric %s", self.name, ev.level, ev.iteration, ev.metric)
            if self._bar is not None:
                self._bar.update(1)
                if ev.metric is not None:
                    self._bar.set_postfix(level=ev.level, metric=f"{ev.metric:.4g}", refresh=False)
        else:
            logger.info("%s %s level=%s metric=%s (%.2f s)", self.name, stage, ev.level, ev.metric, ev.elapsed)
        if stage == "iteration" and self.time_limit is not None and not self.stopped and ev.elapsed > self.time_limit:
            self.stopped = True
            self.stop_reason = f"time limit of {self.time_limit:g} s reached"
            logger.info("%s stopped: %s (level %s, iteration %s)", self.name, self.stop_reason, ev.level, ev.iteration)
            raise StopRegistration(self.stop_reason)
        if self.callback is not None and not self.stopped:
            try:
                self.callback(ev)
            except StopRegistration:
                self.stopped = True
                logger.info("%s stopped by callback at %s (level %s, iteration %s)", self.name, stage, ev.level,
                            ev.iteration)
                raise
        return ev

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
