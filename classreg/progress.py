"""Progress plumbing shared by every solver: logging, callback events, an optional tqdm bar.

A solver never prints.  It reports through a :class:`Progress` object, which

* logs to ``logging.getLogger("classreg")`` (level INFO for start/level/done, DEBUG for iterations),
* calls the user's ``callback(event)`` with an :class:`Event` — a callback ends the run early by raising
  :class:`StopRegistration` (the solver then returns its current estimate with ``stop_reason="stopped by
  callback"``),
* shows a tqdm bar when ``progress=True`` (the CLI turns it on; tqdm is optional),
* keeps the per-iteration history that ends up in ``Result.history``.

Two conventions make every solver's bar and ``history.csv`` read the same:

* **Kernels first.** With ``progress=True`` a solver hands :class:`Progress` a *warm-up* (its own run on a tiny
  synthetic pair with the options that select kernels). It runs before the bar starts, shown as its own step
  ("compiling kernels (first run only)"): on a cold numba cache that is where the compile time goes (tens of
  seconds), so the bar's rate and ETA measure registration work only. Later runs load the kernels from numba's
  on-disk cache (about a second), and later calls in the same process skip the step.
* **One similarity.** Each ``iteration`` event carries ``similarity``: :func:`similarity`, the Pearson
  correlation (normalised cross-correlation, NCC) of the fixed-side and moving-side values the solver compared for
  its current estimate — intensities on a level's voxels or samples for the image solvers, matched coordinates
  for point sets. It is in [-1, 1], higher is better, 1 = identical up to brightness and contrast, whatever the
  solver optimises (SSD, LNCC, MI, NGF, BCPD's σ: that is ``metric``). The bar shows it and ``history.csv`` records
  it in the ``similarity`` column. For pairs of different modalities NCC can stay low (or negative, for inverted
  contrast) even when the alignment is right; the solver's own ``metric`` column is the one to read there.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Event", "StopRegistration", "Progress", "STAGES", "similarity"]

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
        The solver's own cost (its data term; see the solver's docstring for the definition and sign).
    similarity : float or None
        The normalised similarity of the current estimate, the same definition for every solver
        (:func:`similarity`: NCC in [-1, 1], higher is better); what the bar shows.
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
    similarity: float | None = None
    regularization: float | None = None
    step: float | None = None
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)


#: arrays of at least this many entries go through the numba kernel (kernels.sampling.pearson_sums) when it is
#: installed: below it numpy's own passes cost less than the call
_KERNEL_SIZE = 65536


def similarity(a, b, *, mask=None, weights=None, columns: bool = False) -> float:
    """The normalised similarity every solver reports: the Pearson correlation (NCC) of paired values.

    ``Σ (a - ā)(b - b̄) / sqrt(Σ (a - ā)² Σ (b - b̄)²)``, accumulated in float64 (float32 arrays are centred in
    float32 and their products summed by BLAS; large host arrays go through one parallel numba pass,
    :func:`classreg.kernels.sampling.pearson_sums`, with float64 sums throughout). 1: identical up to brightness and
    contrast; 0: unrelated; -1: inverted.

    Parameters
    ----------
    a, b : array_like
        Paired values of one shape (numpy or CuPy): the fixed-side and moving-side intensities of the voxels or
        samples a solver compared, or (with ``columns``) matched point coordinates (N, D).
    mask : array_like of bool, optional
        Only these entries (rows with ``columns``) take part.
    weights : array_like, optional
        Non-negative weight per entry (per row with ``columns``), e.g. BCPD's matching probabilities.
    columns : bool
        Centre each column on its own (weighted) mean and pool the columns: point coordinates, where a shared
        offset along one axis must not count as similarity.

    Returns
    -------
    float
        In [-1, 1]; NaN when fewer than two values take part or one side is constant.
    """
    from .kernels._backend import get_array_module

    xp = get_array_module(a, b)
    a, b = xp.asarray(a), xp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    if a.dtype.kind != "f" or b.dtype.kind != "f" or a.dtype != b.dtype:
        a, b = a.astype(xp.float64), b.astype(xp.float64)
    w = None if weights is None else xp.asarray(weights, dtype=xp.float64).reshape(-1)
    if (xp is np and w is None and not columns and a.size >= _KERNEL_SIZE and a.dtype.kind == "f"
            and (mask is None or np.size(mask) == a.size)):
        from .kernels._backend import HAVE_NUMBA

        if HAVE_NUMBA:  # the per-iteration similarity of a 3-D solver: one parallel pass, no masked copies
            from .kernels.sampling import pearson_sums

            count, sab, saa, sbb = pearson_sums(a, b, mask)
            if count < 2 or not (saa > 0 and sbb > 0 and np.isfinite(sab)):
                return float("nan")
            return float(np.clip(sab / np.sqrt(saa * sbb), -1.0, 1.0))
    if columns:
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    else:
        a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    if mask is not None:
        m = xp.asarray(mask, dtype=bool).reshape(-1)
        a, b = a[m], b[m]
        w = None if w is None else w[m]
    if a.shape[0] < 2:
        return float("nan")
    if w is None:
        ac = a - a.mean(axis=0, dtype=xp.float64).astype(a.dtype)
        bc = b - b.mean(axis=0, dtype=xp.float64).astype(b.dtype)
        ac, bc = ac.reshape(-1), bc.reshape(-1)
        # one read of the three sums (one synchronisation for data on a GPU)
        sab, saa, sbb = xp.stack([xp.dot(ac, bc), xp.dot(ac, ac), xp.dot(bc, bc)]).tolist()
    else:
        sw = float(w.sum())
        if not sw > 0:
            return float("nan")
        a, b = a.astype(xp.float64), b.astype(xp.float64)
        ac = a - (w[:, None] * a).sum(axis=0) / sw
        bc = b - (w[:, None] * b).sum(axis=0) / sw
        sab, saa, sbb = (float((w[:, None] * p * q).sum()) for p, q in ((ac, bc), (ac, ac), (bc, bc)))
    if not (saa > 0 and sbb > 0 and np.isfinite(sab)):
        return float("nan")
    return float(np.clip(sab / np.sqrt(saa * sbb), -1.0, 1.0))


#: warm-ups already run in this process (their keys): a later call skips the step
_WARMED: set = set()


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
        :attr:`stop_reason` saying so. Counted from the end of the warm-up.
    warm_up : callable, optional
        ``warm_up()`` compiles (or loads from numba's cache) the kernels the run will use, typically the solver on
        a tiny synthetic pair with the same kernel-selecting options. Run only with ``progress=True``, before the
        bar starts, shown as its own step; its seconds go to :attr:`timings` (``"kernels"``).
    warm_key : hashable, optional
        Identifies what ``warm_up`` compiles (solver, dimension, dtypes, options); a key already warmed in this
        process skips the step.
    """

    def __init__(self, name: str, *, callback=None, progress: bool = False, total: int | None = None,
                 time_limit: float | None = None, warm_up=None, warm_key=None):
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        self.name = name
        self.callback = callback
        self.history: list[dict] = []
        self.stopped = False
        self.stop_reason = "stopped by callback"
        self.time_limit = None if time_limit is None else float(time_limit)
        self.timings: dict = {}
        self._bar = None
        self._tqdm = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm
            except ImportError:  # pragma: no cover - tqdm is optional
                logger.info("progress=True but tqdm is not installed (pip install tqdm)")
        if progress and warm_up is not None:
            key = (name, warm_key) if warm_key is not None else None
            if key is None or key not in _WARMED:
                self.timings["kernels"] = self._warm_up(warm_up)
                if key is not None:
                    _WARMED.add(key)
        self._t0 = time.perf_counter()
        if self._tqdm is not None:
            self._bar = self._tqdm(total=total, desc=name, unit="it", leave=False)

    def _warm_up(self, warm_up) -> float:
        """Run ``warm_up`` as its own step (a one-line bar whose clock ticks while numba compiles)."""
        t0 = time.perf_counter()
        logger.info("%s: compiling kernels (first run only; later runs load them from numba's cache)", self.name)
        step = None
        if self._tqdm is not None:
            step = self._tqdm(total=1, desc=f"{self.name}: compiling kernels (first run only)",
                              bar_format="{desc} {elapsed}", leave=False)
        done = threading.Event()

        def tick():  # tqdm redraws on updates only: keep the clock moving while a compile blocks
            while not done.wait(0.5):
                step.refresh()

        ticker = threading.Thread(target=tick, daemon=True) if step is not None else None
        if ticker is not None:
            ticker.start()
        try:
            warm_up()
        finally:
            done.set()
            if ticker is not None:
                ticker.join()
            seconds = time.perf_counter() - t0
            if step is not None:
                step.bar_format = "{desc}"
                step.set_description_str(f"{self.name}: kernels ready in {seconds:.1f} s")
                step.leave = seconds >= 1.0  # a compile worth mentioning stays on screen
                step.update(1)
                step.close()
        logger.info("%s: kernels ready in %.2f s", self.name, seconds)
        return seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def emit(self, stage: str, **values) -> Event:
        """Build and dispatch an event; raises :class:`StopRegistration` if the callback asks to stop."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        extra = dict(values.pop("extra", None) or {})
        names = ("level", "iteration", "metric", "similarity", "regularization", "step")
        known = {k: values.pop(k) for k in names if k in values}
        extra.update(values)
        known = {k: (float(v) if k in ("metric", "similarity", "regularization", "step") and v is not None else v)
                 for k, v in known.items()}
        ev = Event(stage=stage, elapsed=self.elapsed, extra=extra, **known)
        if stage == "iteration":
            row = {"level": ev.level, "iteration": ev.iteration, "metric": ev.metric, "similarity": ev.similarity,
                   "regularization": ev.regularization, "step": ev.step, "elapsed": ev.elapsed, **extra}
            self.history.append(row)
            logger.debug("%s level %s it %s metric %s similarity %s", self.name, ev.level, ev.iteration, ev.metric,
                         ev.similarity)
            if self._bar is not None:
                if ev.similarity is not None and np.isfinite(ev.similarity):
                    self._bar.set_postfix(level=ev.level, similarity=f"{ev.similarity:.3f}", refresh=False)
                self._bar.update(1)
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
