"""``register_rigid``: global rigid multimodal alignment by FFT cross-similarity of normalised gradient fields.

The CSNGF method (Öfverstedt, Lindblad, Sladoje, WBIR 2022): the squared dot product of normalised gradient fields,
averaged over the mask overlap, is evaluated for **every integer shift at once** by FFT cross-correlation
(:mod:`.csngf`), and rotations are searched by quasi-random sampling and perturbation over a Gaussian pyramid
(:mod:`.search`) run by the one multi-resolution driver, :func:`classreg.pyramid.multiresolution`, on isotropic
working grids in the fixed image's frame (:mod:`.grids`).

A candidate rotation ``R`` (a physical rotation) is applied about the physical centres ``c_F``, ``c_M``; a peak at
shift χ gives the fixed → moving map ``T(x) = R (x - c_F) + c_M + R (o_B - o_A - L χ)`` (``o``: working-grid
origins, ``L``: the fixed working grid's index → mm matrix), returned as ITK's ``Euler`` parametrisation centred at
``c_F``. Anisotropic, oblique and flipped inputs therefore rotate about a physical point with true (not
grid-normalised) rotations.
"""
from __future__ import annotations

import time

import numpy as np

from ...backend import placement, thread_count
from ...image import Image
from ...options import declared
from ...progress import Progress, StopRegistration
from ...pyramid import multiresolution
from ...result import Result
from ...transforms import Affine
from .._common import (
    check_masks,
    check_memory,
    check_not_constant,
    check_pair,
    common_params,
    tiny_like,
    warm_key,
)
from .grids import WorkingPyramid
from .options import OPTIONS, PAPER_SCHEDULE, fast_schedule
from .rotations import euler_angles
from .schedule import resolve_schedule
from .search import SearchRecord, level_step, parabola_offsets

__all__ = ["register_rigid"]


@declared(OPTIONS)
def register_rigid(fixed: Image, moving: Image, *, schedule: str = "fast", local_refine: str = "auto",
                   fixed_mask=None, moving_mask=None, shrink_factors=None, smoothing_sigmas=None, samples=None,
                   perturbation=None, keep=None, overlap: float = 0.5,
                   epsilon: float = 1e-5, squared: bool = True, max_angle: float = 180.0, spacing=None,
                   refine: bool = True, polish=(), dtype=np.float32, seed: int = 0, workers=None,
                   threads: int | None = None, memory_limit: float | None = None,
                   time_limit: float | None = None, device: str | None = None,
                   backend=None, progress: bool = False,
                   callback=None) -> Result:
    """Global rigid alignment of ``moving`` to ``fixed`` by FFT cross-similarity of normalised gradient fields.

    Parameters
    ----------
    fixed, moving : Image
        2-D or 3-D scalar images in physical space (any spacing, origin and direction; different modalities).
    schedule : {"fast", "paper"}
        Where the search entries not given (``shrink_factors``, ``smoothing_sigmas``, ``samples``,
        ``perturbation``, ``keep``) come from. ``"fast"`` (default): a coarse search only, levels at shrink 8 and
        4, the first-level rotation step sized so the fixed image's corners move by 2 coarse voxels (2-D; 3-D: 500
        rotations over SO(3)), see :func:`~classreg.solvers.rigid.options.fast_schedule`. ``"paper"``: the
        published schedule (4, 2, 2, 1) with (5000, 3000, 300, 0) rotations. When any search entry is given, the
        missing ones come from the paper's schedule (the behaviour before the fast default; ``params["schedule"]``
        is then ``"custom"``), and ``shrink_factors`` of another depth without ``smoothing_sigmas`` gets
        σ = ½ × shrink × ``spacing`` mm per level.
    local_refine : {"auto", "mi", "none"}
        Local refinement after the search: ``"mi"``: :func:`classreg.register_affine` with ``transform="rigid"``
        (Mattes MI, ASGD, its default pyramid 4-2-1) started from the search's transform; ``"none"``: the
        search's result. ``"auto"`` (default): ``"mi"`` with ``schedule="fast"`` when no search entry is given,
        ``"none"`` otherwise (the paper's method and explicit search schedules run the search alone, as before).
    fixed_mask, moving_mask : Image or array, optional
        Regions that take part in the similarity (on each image's own grid).
    shrink_factors : sequence of float
        Pyramid downsampling d per level (coarsest first), relative to the working spacing ``spacing``.
        Paper: (4, 2, 2, 1).
    smoothing_sigmas : float or sequence of float
        Gaussian σ (mm) applied to both images before each level's resampling. Paper: (5, 3, 2, 1.5).
    samples : sequence of int
        Rotations evaluated per level, a: the first level samples them over the whole rotation space (within
        ``max_angle``), level k > 0 perturbs the ``keep[k-1]`` best of the previous level. Paper:
        (5000, 3000, 300, 0).
    perturbation : sequence of float
        Half-width u (degrees) of the uniform perturbation per Euler angle, one per level transition. Paper:
        (10, 3, 0).
    keep : sequence of int
        Number p of best candidates carried to the next level (re-evaluated unchanged there), one per level
        transition. Paper: (20, 3, 1).
    overlap : float
        Minimum overlap fraction γ ∈ (0, 1]: shifts with ``N(χ) < γ max N`` are not considered. Paper: 0.5.
    epsilon : float
        NGF ε for intensities normalised to [0, 1] (each image by its min/max inside its mask). Paper: 1e-5.
    squared : bool
        Squared NGF dot product (sign-invariant, for multimodal pairs; the paper's measure) or the signed one.
    max_angle : float
        First-level rotations are drawn within ±``max_angle`` degrees, in (0, 180] (2-D angle; 3-D: all of SO(3)
        at 180, else per Euler angle). Default 180: no prior on the rotation.
    spacing : float, optional
        Working-grid spacing in mm at shrink 1 (default: the coarser of the two images' finest spacings).
    refine : bool
        Sub-voxel refinement of the final shift by a parabola fit through the peak of the CSNGF map.
    polish : float or sequence of float
        Optional local rotation refinement at the last level (not in the paper; default none): for each step
        (degrees, e.g. ``(2.0, 0.5)``) and each Euler angle, the score at ±step is fitted with a parabola and its
        vertex is evaluated; the best candidate is kept, and a step is repeated (up to 4 rounds) while it improves
        the score. Costs 2-3 evaluations per step, angle and round at the finest level.
    dtype : {numpy.float32, numpy.float64}
        Precision of the measure.
    seed : int
        Seed of the rotation sampling and perturbations (same seed ⇒ same result).
    workers : int, optional
        Threads of the FFTs (None: the numba thread count, i.e. ``NUMBA_NUM_THREADS`` or all cores).
    threads : int, optional
        CPU threads of the numba kernels during the call.
    memory_limit, time_limit : float, optional
        MB the call may use (default: the memory available now; a larger estimate is refused before any work and
        recorded in ``Result.params["memory_estimate_mb"]``); seconds after which the run stops with its estimate.
    device : {None, "cpu", "cuda", "cuda:N"}
        Where to compute (selects the backend).
    backend : {None, "numpy", "numba", "cuda"}
        Kernel implementation of resampling, smoothing and gradients.
    progress : bool
        Show a tqdm bar (one step per evaluated rotation).
    callback : callable, optional
        Receives :class:`classreg.Event` objects (one ``iteration`` per evaluated rotation, ``metric`` = its best
        CSNGF score, higher is better; ``similarity`` = the NCC of the level's best candidate so far, the search's
        current estimate); raise :class:`classreg.StopRegistration` to stop and keep the best so far.

    Returns
    -------
    Result
        ``transform``: rigid :class:`~classreg.Affine` (fixed → moving physical points, centre = the fixed image's
        physical centre, ITK ``Euler2D/3DTransform``); ``inverse``; ``warped``; ``history`` with one row per
        evaluated rotation (level, iteration, metric = score, ``angle_*`` in degrees, ``tx, ty[, tz]`` in mm,
        ``stage`` search/polish); ``metrics``: ``score`` (CSNGF of the result at the finest level), ``angles_deg``,
        ``translation``, ``center``, ``subvoxel_offset``, ``evaluations``, ``levels`` (per-level grid, FFT shape,
        time, best score), ``best_candidates`` (top candidates per level); ``extras``: every evaluation's
        ``scores``, ``eval_levels``, ``rotations``, ``translations``.

    Notes
    -----
    Per evaluated rotation: one linear resampling of the moving image and its mask, one NGF, ``d(d+1)/2 + 1``
    forward FFTs and two inverse FFTs on the ``n_A + n_B - 1`` grid (the fixed spectra are cached per level), so
    the cost is linear in ``samples`` and dominated by the finer levels. The measure is invariant to contrast
    inversion (squared), not to non-monotone intensity maps that move edges. Measured times and success rates:
    docs/solvers/rigid.md and docs/notes/rigid.md.

    References
    ----------
    J. Öfverstedt, J. Lindblad, N. Sladoje, "Cross-Sim-NGF: FFT-based global rigid multimodal alignment of image
    volumes using normalized gradient fields", WBIR 2022 (eqs. 1-6; arXiv:2110.10156). E. Haber, J. Modersitzki,
    "Intensity gradient based registration and fusion of multi-modal images", MICCAI 2006, LNCS 4191:726-733,
    doi:10.1007/11866763_89 (NGF).
    """
    t_start = time.perf_counter()
    check_pair(fixed, moving)
    dev, backend = placement(device, backend, fixed.data, moving.data)
    fixed, moving = fixed.to("cpu"), moving.to("cpu")  # the host sees the inputs once (no copy for numpy data)
    # the search and the local refinement's evaluations run on ``dev``; the warped image on the CPU kernels
    host_backend = None if dev == "cuda" else backend
    memory_mb = check_memory("rigid", fixed, moving, dtype, memory_limit)
    fmask, mmask = check_masks(fixed, moving, fixed_mask, moving_mask)
    check_not_constant(fixed, "fixed", fmask)
    check_not_constant(moving, "moving", mmask)
    dtype = np.dtype(dtype)
    spacing = max(min(fixed.spacing), min(moving.spacing)) if spacing is None else float(spacing)
    given = {"shrink_factors": shrink_factors, "smoothing_sigmas": smoothing_sigmas, "samples": samples,
             "perturbation": perturbation, "keep": keep}
    explicit = any(v is not None for v in given.values())
    # explicit entries complete from the paper's schedule, as before the fast default ("custom" in params)
    base = PAPER_SCHEDULE if schedule == "paper" or explicit else fast_schedule(fixed, spacing)
    if shrink_factors is not None and smoothing_sigmas is None and np.ndim(shrink_factors) > 0 \
            and len(shrink_factors) != len(base["shrink_factors"]):
        # an explicit pyramid of another depth: σ = half the shrink factor × the working spacing per level
        given["smoothing_sigmas"] = tuple(0.5 * float(d) * spacing for d in shrink_factors)
    entries = {k: (base[k] if v is None else v) for k, v in given.items()}
    local = ("mi" if schedule == "fast" and not explicit else "none") if local_refine == "auto" else local_refine
    schedule_name = "custom" if explicit else schedule
    schedule = resolve_schedule(**entries)
    polish = tuple(float(p) for p in np.atleast_1d(polish))
    pyramid = WorkingPyramid(fixed, moving, fmask, mmask, schedule, spacing, dtype, backend, device=dev)
    workers = thread_count() if workers is None else int(workers)  # small FFTs lose time to threads when busy
    measure = {"backend": backend, "dtype": dtype, "epsilon": float(epsilon), "overlap": float(overlap),
               "squared": bool(squared), "workers": workers}
    def warm_up():  # the same kernels on a tiny pair, before the bar (progress=True only)
        f, m, fm, mm = tiny_like(fixed, moving)
        register_rigid(f, m, fixed_mask=None if fixed_mask is None else fm,
                       moving_mask=None if moving_mask is None else mm, shrink_factors=(2, 1),
                       smoothing_sigmas=(1.0, 0.5), samples=(3, 2), perturbation=(3.0,), keep=(1,),
                       local_refine="none",
                       epsilon=epsilon, squared=squared, refine=refine, polish=polish[:1], dtype=dtype,
                       workers=workers, device=None if dev == "cpu" else dev, backend=backend)

    prog = Progress("rigid", callback=callback, progress=progress, time_limit=time_limit,
                    total=schedule.evaluations(len(polish), fixed.ndim), warm_up=warm_up,
                    warm_key=warm_key(fixed, moving, squared, dtype.name, backend, bool(polish), bool(refine),
                                      fixed_mask is None, moving_mask is None))
    record, completed, stopped = _search(fixed, moving, pyramid, schedule, measure, polish, float(max_angle),
                                         int(seed), prog)
    transform, refined = _transform(record, pyramid, fixed.ndim, refine=bool(refine) and completed)
    # the resolved entries; the options as passed are recorded by the declaration
    params = {**schedule._asdict(), "schedule": schedule_name, "local_refine": local, "polish": polish, "workers": workers, "center": pyramid.c_f.tolist(),
              "moving_center": pyramid.c_m.tolist(),
              "memory_estimate_mb": memory_mb, **common_params(init=None, dtype=dtype, seed=int(seed), backend=backend)}
    local_info = None
    if local == "mi" and completed:
        transform, local_info = _refine_mi(fixed, moving, transform, fmask, mmask, int(seed), threads,
                                           host_backend, dev)
    return _result(fixed, moving, transform, refined, record, stopped, params, host_backend, t_start, prog.history,
                   reason=prog.stop_reason, kernel_seconds=prog.timings, local_info=local_info)


def _refine_mi(fixed, moving, start, fmask, mmask, seed, threads, backend, device):
    """``register_affine(transform="rigid", metric="mi")`` from the search's transform, on ``device`` (its
    evaluations on the GPU, see :func:`classreg.register_affine`); returns the refined rigid :class:`Affine` (centre
    c_F, as the search's) and what the refinement did."""
    from ..parametric import register_affine

    t0 = time.perf_counter()
    try:
        res = register_affine(fixed, moving, transform="rigid", metric="mi", init=start, fixed_mask=fmask,
                              moving_mask=mmask, seed=seed, threads=threads, backend=backend, device=device)
    except ValueError as exc:  # e.g. too little overlap for the MI samples: the search's result stands
        return start, {"method": "mi", "skipped": str(exc), "seconds": time.perf_counter() - t0}
    t = res.transform
    t = t.simplified() if hasattr(t, "simplified") else t
    refined = _as_centred(t, start.center)
    before = np.rad2deg(euler_angles(start.matrix))
    after = np.rad2deg(euler_angles(refined.matrix))
    centre = np.asarray(start.center, float)
    moved = float(np.linalg.norm(refined.map_points(centre[None])[0] - start.map_points(centre[None])[0]))
    info = {"method": "mi", "matrix_before": np.asarray(start.matrix).tolist(), "angles_deg_before": before.tolist(), "angles_deg_after": after.tolist(),
            "translation_before": np.asarray(start.translation).tolist(),
            "translation_after": np.asarray(refined.translation).tolist(),
            "rotation_change_deg": float(np.rad2deg(np.arccos(np.clip(
                (np.trace(start.matrix.T @ refined.matrix) - (fixed.ndim - 2)) / 2.0, -1.0, 1.0)))),
            "centre_shift_mm": moved, "mi_after": float(res.metrics["metric"]),
            "iterations": len(res.history), "seconds": time.perf_counter() - t0}
    return refined, info


def _as_centred(transform, centre):
    """``transform`` (an affine map) as an :class:`Affine` about ``centre``."""
    centre = np.asarray(centre, float)
    a = np.asarray(transform.matrix, float)
    y = transform.map_points(centre[None])[0]
    return Affine(a, y - centre, centre)




def _search(fixed, moving, pyramid, schedule, measure, polish, max_angle, seed, prog):
    """Run the per-level search on the pyramid driver; returns ``(record, completed, stopped)``."""
    rng = np.random.default_rng(seed)
    state = {"record": SearchRecord()}
    record = state["record"]

    def step(level, state, progress):
        return level_step(level, state, progress, pyramid=pyramid, schedule=schedule, measure=measure,
                          polish=polish, max_angle=max_angle, rng=rng)

    completed = stopped = False
    try:
        prog.emit("start", extra={"levels": schedule.levels,
                                  "evaluations": schedule.evaluations(len(polish), fixed.ndim)})
        state, stopped = multiresolution(fixed, moving, step, shrink_factors=schedule.shrink_factors,
                                         smoothing_sigmas=schedule.smoothing_sigmas, iterations=schedule.samples,
                                         state=state, progress=prog, backend=measure["backend"],
                                         level_images=pyramid)
        completed = not stopped
        if completed:
            prog.emit("done", metric=record.best[0],
                      extra={"angles_deg": np.rad2deg(euler_angles(record.best[1])).tolist()})
    except StopRegistration:
        stopped = True
    finally:
        prog.close()
    return record, completed, stopped


def _transform(record: SearchRecord, pyramid: WorkingPyramid, ndim: int, *, refine: bool):
    """The rigid :class:`Affine` of the best candidate (centre c_F), with the sub-voxel shift if ``refine``;
    the centres aligned if the run stopped before any evaluation. Returns ``(transform, sub-voxel offset)``."""
    if record.best is None:
        r_best, t_best = np.eye(ndim), pyramid.c_m - pyramid.c_f
    else:
        r_best, t_best = record.best[1], record.best[2]
    refined = np.zeros(ndim)
    if refine and record.final is not None:
        smap, idx, evaluator = record.final
        refined = parabola_offsets(smap, idx)
        t_best = evaluator.translation(r_best, evaluator.measure.shift_of(idx) + refined)
    return Affine(r_best, t_best, pyramid.c_f), refined


def _result(fixed, moving, transform, refined, record, stopped, params, backend, t_start, history, *,
            reason="stopped by callback", kernel_seconds=None, local_info=None) -> Result:
    """The :class:`Result`: warped image, metrics, per-evaluation extras and per-level timings."""
    from ...resample import resample

    n = fixed.ndim
    warped = resample(moving, transform, reference=fixed, backend=backend)
    score = float("nan") if record.best is None else record.best[0]
    metrics = {"score": score, "angles_deg": np.rad2deg(euler_angles(transform.matrix)).tolist(),
               "translation": np.asarray(transform.translation).tolist(), "center": params["center"],
               "subvoxel_offset": refined.tolist(), "evaluations": len(record.scores), "levels": record.level_info,
               "best_candidates": record.best_candidates}
    if local_info is not None:
        metrics["local_refine"] = local_info
    extras = {"scores": np.asarray(record.scores), "eval_levels": np.asarray(record.levels, dtype=np.int64),
              "rotations": np.asarray(record.rotations).reshape(-1, n, n),
              "translations": np.asarray(record.translations).reshape(-1, n)}
    timings = {"total": time.perf_counter() - t_start, **(kernel_seconds or {})}
    for info in record.level_info:
        timings[f"level{info['level']}"] = info["seconds"]
    if local_info is not None:
        timings["local_refine"] = local_info["seconds"]
    return Result(transform=transform, inverse=transform.inverse(), warped=warped, history=history,
                  converged=not stopped, stop_reason=reason if stopped else "completed the schedule",
                  params=params, metrics=metrics, timings=timings, reference=fixed, extras=extras)
