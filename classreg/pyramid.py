"""The one multi-resolution driver used by every image solver.

A solver supplies only its per-level step::

    def step(level: Level, state: dict, progress: Progress) -> float | None:
        ...  # iterate on level.fixed / level.moving, keep `state` current, emit "iteration" events
        # optionally return the level's final metric: the driver reports it in the "level_end" event

:func:`multiresolution` builds the pyramids (shrink factors → physical spacing, Gaussian smoothing σ in mm),
carries the masks down, calls ``step`` from the coarsest level to the finest, and moves the state between levels:
every array in ``state`` that lives on the level grid (scalar or channels-last, e.g. a displacement or velocity
field in mm) is resampled onto the next, finer grid through physical space (mm-valued vectors need no rescaling);
grid-free entries (numbers, lists, objects) pass through unchanged.

A solver whose levels are not the images shrunk on their own grids (e.g. register_rigid's isotropic working grids in
the fixed image's frame) passes ``level_images``, a hook that builds each level's :class:`LevelImages`; the rest of
the driver (schedule checks, state transfer, events, stopping) is the same.

Shrink factors are relative to the *smallest* spacing of the image, so an anisotropic 1 × 1 × 3 mm image is not
shrunk along its coarse axis until the target spacing exceeds 3 mm (schedules counted in voxels on anisotropic data
are a known trap, ANTs#808/#1816).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .image import Image, as_mask
from .kernels._backend import serial_below
from .progress import Progress, StopRegistration

__all__ = ["Level", "LevelImages", "check_schedule", "default_sigmas", "downsample", "level_geometry",
           "multiresolution"]


@dataclass(frozen=True)
class Level:
    """Data of one pyramid level (index 0 = coarsest)."""

    index: int
    count: int
    shrink: float
    sigma_mm: float
    iterations: int
    fixed: Image
    moving: Image
    fixed_mask: object = None
    moving_mask: object = None

    @property
    def is_finest(self) -> bool:
        return self.index == self.count - 1


class LevelImages(NamedTuple):
    """The images of one level as a ``level_images`` hook of :func:`multiresolution` builds them.

    ``fixed``, ``moving``: Images (any grids); ``fixed_mask``, ``moving_mask``: boolean arrays on their grids or
    None; ``info``: extra values for the ``level_start`` event (e.g. grid shapes), or None.
    """

    fixed: Image
    moving: Image
    fixed_mask: object = None
    moving_mask: object = None
    info: dict | None = None


def default_sigmas(shrink_factors, spacing) -> tuple:
    """Default smoothing σ (mm) per level: half the shrink factor in units of the smallest spacing (ANTs' 4,2,1 →
    2,1,0 voxels), and none at full resolution."""
    h = min(spacing)
    return tuple(0.5 * f * h if f > 1 else 0.0 for f in shrink_factors)


def level_geometry(image: Image, shrink: float):
    """Per-axis integer shrink (x first), spacing, origin and array shape of ``image`` shrunk by ``shrink``."""
    h = np.asarray(image.spacing)
    target = float(shrink) * h.min()
    f = np.maximum(1, np.round(target / h)).astype(int)
    f = np.minimum(f, np.maximum(1, np.asarray(image.size) // 4))  # a level keeps at least 4 voxels per axis
    size = np.maximum(1, np.asarray(image.size) // f)
    spacing = h * f
    origin = np.asarray(image.origin) + image.direction_matrix @ (h * (f - 1) / 2.0)
    return f, spacing, origin, tuple(int(s) for s in size[::-1])


def downsample(image: Image, shrink: float, sigma_mm: float, *, backend=None) -> Image:
    """Smooth ``image`` with a Gaussian of ``sigma_mm`` and resample it on the grid shrunk by ``shrink``.

    The coarse grid follows ITK's ``ShrinkImageFilter``: spacing × f, size // f, the first coarse voxel centred on
    the first block of f fine voxels.
    """
    from .kernels.smooth import gaussian
    from .kernels.warp import warp

    data = image.data
    if data.dtype.kind != "f":
        data = data.astype(np.float32)
    if sigma_mm > 0:
        data = gaussian(data, sigma_mm, spacing=image.spacing_array_order, ndim=image.ndim, backend=backend)
    f, spacing, origin, shape = level_geometry(image, shrink)
    if np.all(f == 1):
        return image.like(data, vector=image.is_vector)
    coarse = Image(np.zeros(shape, dtype=np.uint8), tuple(spacing), tuple(origin), image.direction)
    total = image.inverse_affine @ coarse.affine
    n = image.ndim
    out = warp(data, None, matrix=total[:n, :n], offset=total[:n, n], out_shape=shape, order=1, mode="border",
               backend=backend)
    return coarse.like(out, vector=image.is_vector)


def _downsample_mask(mask, image: Image, level_image: Image):
    if mask is None:
        return None
    from .kernels.warp import warp

    n = image.ndim
    total = image.inverse_affine @ level_image.affine
    m = warp(mask.astype(np.float32), None, matrix=total[:n, :n], offset=total[:n, n], out_shape=level_image.shape,
             order=1, mode="zero")
    out = m > 0.5
    if not bool(out.any()):
        out = m > 0
    return out


def transfer_state(state: dict, coarse: Image, fine: Image, *, backend=None) -> dict:
    """Resample every array of ``state`` that lives on ``coarse``'s grid onto ``fine``'s grid (linear, border).

    Channels-last arrays are treated as vector fields with physical (mm) components: values are interpolated,
    not rescaled. Other entries are passed through unchanged.
    """
    from .kernels.warp import warp

    n = coarse.ndim
    total = coarse.inverse_affine @ fine.affine
    out = {}
    for key, value in state.items():
        shape = getattr(value, "shape", None)
        if shape is not None and tuple(shape[:n]) == coarse.shape and len(shape) in (n, n + 1):
            out[key] = warp(value, None, matrix=total[:n, :n], offset=total[:n, n], out_shape=fine.shape, order=1,
                            mode="border", backend=backend)
        else:
            out[key] = value
    return out


def check_shrink_factors(shrink_factors) -> tuple:
    """Pyramid shrink factors: numbers >= 1, coarsest first, never increasing."""
    try:
        shrink = tuple(float(f) for f in shrink_factors)
    except TypeError:
        raise TypeError(f"shrink_factors must be a sequence of numbers, got {shrink_factors!r}") from None
    if not shrink or any(not math.isfinite(f) or f < 1 for f in shrink):
        raise ValueError(f"shrink_factors must be numbers >= 1 (coarsest first), got {shrink_factors!r}")
    if any(b > a for a, b in zip(shrink, shrink[1:])):
        raise ValueError(f"shrink_factors must not increase from one level to the next, got {shrink_factors!r}")
    return shrink


def check_schedule(shrink_factors, smoothing_sigmas, iterations, spacing):
    """``(shrink_factors, smoothing_sigmas, iterations)`` as tuples, one entry per level: floats >= 1 never
    increasing, σ in mm >= 0 (default :func:`default_sigmas`), non-negative integers (a scalar is repeated)."""
    shrink = check_shrink_factors(shrink_factors)
    sig = default_sigmas(shrink, spacing) if smoothing_sigmas is None else tuple(float(s) for s in smoothing_sigmas)
    if len(sig) != len(shrink) or any(not math.isfinite(s) or s < 0 for s in sig):
        raise ValueError(f"smoothing_sigmas must be {len(shrink)} numbers >= 0 (mm), got {smoothing_sigmas!r}")
    if np.ndim(iterations) == 0:
        iterations = (int(iterations),) * len(shrink)
    its = tuple(int(i) for i in iterations)
    if len(its) != len(shrink) or any(i < 0 for i in its):
        raise ValueError(f"iterations must be {len(shrink)} non-negative integers (one per level), got {iterations!r}")
    return shrink, sig, its


def multiresolution(fixed: Image, moving: Image, step, *, shrink_factors=(4, 2, 1), smoothing_sigmas=None,
                    iterations=(100, 50, 25), fixed_mask=None, moving_mask=None, state=None, transfer=None,
                    progress: Progress | None = None, backend=None, level_images=None):
    """Run ``step`` coarse-to-fine and return ``(state, stopped)``.

    Parameters
    ----------
    fixed, moving : Image
        The pair; each is smoothed and shrunk on its own grid.
    step : callable
        ``step(level, state, progress)``; updates ``state`` (a dict) in place. It may return the level's final
        metric (a number), which the ``level_end`` event then carries.
    shrink_factors : sequence of float
        Coarsest first, relative to each image's smallest spacing.
    smoothing_sigmas : sequence of float, optional
        Gaussian σ per level in mm (default :func:`default_sigmas`).
    iterations : int or sequence of int
        Per-level iteration budget, available to ``step`` as ``level.iterations``.
    fixed_mask, moving_mask : Image or array, optional
        Carried down the pyramid (linear resampling, > 0.5, never emptied).
    state : dict, optional
        Initial state on the coarsest fixed grid, or grid-free entries.
    transfer : callable, optional
        ``transfer(state, coarse_fixed, fine_fixed) -> state``; default :func:`transfer_state`.
    progress : Progress, optional
        Receives ``level_start``/``level_end`` events; ``step`` emits ``iteration`` events through it.
    level_images : callable, optional
        ``level_images(index, shrink, sigma_mm) -> LevelImages``: builds a level's images instead of
        :func:`downsample` of each image on its own grid (``fixed_mask``/``moving_mask`` are then not used: the
        hook carries its own masks). Default: :func:`downsample` and the masks carried down.

    Returns
    -------
    state : dict
        The final state, its grid arrays resampled onto ``fixed``'s own grid if the last level run was coarser
        (a schedule ending above shrink 1, or a stop requested by a callback).
    stopped : bool
        True if a callback raised :class:`StopRegistration`.
    """
    if fixed.ndim != moving.ndim:
        raise ValueError(f"dimension mismatch: fixed is {fixed.ndim}-D, moving is {moving.ndim}-D")
    shrink, sigmas, its = check_schedule(shrink_factors, smoothing_sigmas, iterations, fixed.spacing)
    fmask = as_mask(fixed_mask, fixed, "fixed_mask")
    mmask = as_mask(moving_mask, moving, "moving_mask")
    progress = progress if progress is not None else Progress("registration")
    transfer = transfer if transfer is not None else (lambda s, a, b: transfer_state(s, a, b, backend=backend))
    state = {} if state is None else state
    previous = None
    for k, (f, sigma, n_it) in enumerate(zip(shrink, sigmas, its)):
        if level_images is None:
            fl = downsample(fixed, f, sigma, backend=backend)
            ml = downsample(moving, f, sigma, backend=backend)
            images = LevelImages(fl, ml, _downsample_mask(fmask, fixed, fl), _downsample_mask(mmask, moving, ml))
        else:
            images = level_images(k, f, sigma)
            fl = images.fixed
        level = Level(index=k, count=len(shrink), shrink=f, sigma_mm=sigma, iterations=n_it, fixed=fl,
                      moving=images.moving, fixed_mask=images.fixed_mask, moving_mask=images.moving_mask)
        if previous is not None:
            new = transfer(state, previous.fixed, fl)
            state.clear()
            state.update(new)
        previous = level
        try:
            progress.emit("level_start", level=k,
                          extra={"shrink": f, "sigma_mm": sigma, "shape": fl.shape, **(images.info or {})})
            with serial_below(math.prod(fl.shape)):  # small levels: one thread is faster (same result)
                metric = step(level, state, progress)
            progress.emit("level_end", level=k, metric=metric)
        except StopRegistration:
            return _to_input_grid(state, previous.fixed, fixed, transfer), True
    return _to_input_grid(state, previous.fixed, fixed, transfer), False


def _to_input_grid(state, level_fixed: Image, fixed: Image, transfer):
    """The state on ``fixed``'s own grid (after a stop at a coarse level, or a schedule ending above shrink 1)."""
    if level_fixed.same_grid(fixed):
        return state
    new = transfer(state, level_fixed, fixed)
    state.clear()
    state.update(new)
    return state
