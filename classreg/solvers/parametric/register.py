"""``register_affine`` and ``register_bspline``: parametric registration as elastix does it.

Both run the one pyramid driver (:func:`classreg.pyramid.multiresolution`); on each level the engine
(:class:`.engine.LevelObjective`) draws seeded samples, and a stochastic optimiser (:mod:`classreg.optimise.asgd`)
moves the parameters of a model: an affine family (:mod:`.models`) or a cubic B-spline control grid
(:mod:`.bspline`), composed after an initial transform (elastix ``HowToCombineTransforms Compose``).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ...backend import placement, to_numpy
from ...image import Image
from ...kernels._backend import serial_below
from ...options import declared
from ...progress import Progress, StopRegistration
from ...pyramid import check_schedule, multiresolution
from ...result import Result
from ...transforms import Affine, Chain, DisplacementField, Transform
from .._common import (
    check_masks,
    check_memory,
    check_not_constant,
    check_overlap,
    check_pair,
    common_params,
    one_blas_thread,
    tiny_like,
    warm_key,
)
from .engine import INTERPOLATIONS, LevelObjective, metric_terms
from .folds import PROJECT_EVERY, PROJECT_STRIDE, FoldProjection
from .models import AffineModel
from .options import AFFINE_OPTIONS, BSPLINE_OPTIONS
from .sampling import Sampler

__all__ = ["register_affine", "register_bspline"]

logger = logging.getLogger("classreg")

#: gradients at the start of a level from which ASGD's gain is estimated (elastix's automatic parameter estimation
#: draws a few independent sample sets; one for a deterministic sampler)
GAIN_DRAWS = 5


# ================================================================================================ register_affine
@declared(AFFINE_OPTIONS)
def register_affine(fixed: Image, moving: Image, *, transform: str = "affine", metric: str = "mi",
                    init="geometry", fixed_mask=None, moving_mask=None, shrink_factors=(4, 2, 1),
                    smoothing_sigmas=None, iterations=(50, 50, 150), samples: int = 2048,
                    sampler: str = "random_coordinate", new_samples: bool = True, optimiser: str = "asgd",
                    max_step=None, bins: int = 32, interpolation: str = "linear", image_gradient: str = "smoothed",
                    metric_weights=None, seed: int = 0,
                    threads: int | None = None,
                    memory_limit: float | None = None, time_limit: float | None = None,
                    device: str | None = None, backend=None, progress: bool = False, callback=None) -> Result:
    """Translation, rigid, similarity or affine registration of ``moving`` to ``fixed`` (elastix's method).

    On each level of a Gaussian pyramid, ``samples`` positions are drawn on the fixed image (anew at every
    iteration), mapped through the initial transform and the current one, and the metric of the fixed and moving
    intensities there is decreased by adaptive stochastic gradient descent (Klein et al., IJCV 81(3):227-239,
    2009) with automatic step sizes and parameter scales (elastix ``AutomaticParameterEstimation`` and
    ``AutomaticScalesEstimation``). The estimated map is ``T = T_p ∘ init`` with ``T_p(y) = A (y − c) + c + t``
    about the (initially mapped) centre c of the fixed image.

    Parameters
    ----------
    fixed, moving : Image
        2-D or 3-D scalar images in physical space (any spacing, origin, direction; modalities may differ with
        ``metric="mi"``).
    transform : {"affine", "similarity", "rigid", "translation"}
        The family (ITK parameterisations, ELASTIX.md §7).
    metric : {"mi", "nmi", "ncc", "ssd"}
        Mattes mutual information (32-bin Parzen histogram, elastix ``AdvancedMattesMutualInformation``),
        normalised MI, normalised correlation, mean squared difference.
    init : {"geometry", "moments", "global", "identity"} or Affine
        Starting transform: centres of the images' extents aligned (elastix ``GeometricalCenter``), centres of
        mass, :func:`classreg.register_rigid`'s FFT search over all rotations (for misalignments of 60°-180°, where
        local methods fail), the identity, or a given fixed → moving affine.
    fixed_mask, moving_mask : Image or array, optional
        Samples are drawn inside the fixed mask; samples mapped outside the moving mask are dropped.
    shrink_factors, smoothing_sigmas
        The pyramid: shrink per level (coarsest first), Gaussian σ in mm (default half the shrink × spacing).
    iterations : int or sequence of int
        Optimiser iterations per level (elastix ``MaximumNumberOfIterations``).
    samples : int
        Samples per iteration (elastix ``NumberOfSpatialSamples``).
    sampler : {"random_coordinate", "random", "random_sparse_mask", "full", "grid"}
        elastix's image samplers (``RandomCoordinate``, ``Random``, ``RandomSparseMask``, ``Full``, ``Grid``).
    new_samples : bool
        New samples every iteration (elastix ``NewSamplesEveryIteration``).
    optimiser : {"asgd", "gd", "rsgd", "lbfgs"}
        Adaptive stochastic gradient descent, standard gradient descent (``a = 400, A = 20, α = 0.602`` in scaled
        parameters), regular-step gradient descent (ITK), or L-BFGS (elastix ``QuasiNewtonLBFGS``) on one fixed
        draw of samples per level with a trust region of ``max_step`` mm.
    max_step : float, optional
        The largest sample displacement of the first ASGD step, mm (elastix ``MaximumStepLength``; default the
        level's mean voxel spacing).
    bins : int
        Histogram bins of MI.
    interpolation : {"linear", "nearest", "bspline2", "bspline3"}
        How the moving image and its gradient are read at the samples during registration (elastix
        ``Interpolator``): linear (value and the gradient of ``image_gradient``), the nearest voxel's value and
        central-difference gradient, or a B-spline of order 2/3 and the exact gradient of that interpolant (elastix
        ``BSplineInterpolator``). The warped result is resampled linearly in every case.
    image_gradient : {"smoothed", "exact"}
        The moving image's gradient with ``interpolation="linear"`` (ignored otherwise). ``"smoothed"``: central
        differences on the moving grid, interpolated linearly at the samples — a smoother image derivative, with
        which the stochastic optimiser lands closer on the 2-D test pairs (docs/notes/elastix.md), hence this
        solver's default. ``"exact"``: the gradient of the linear interpolant itself (piecewise constant across
        voxel faces), so the chain rule gives the exact derivative of the sampled cost; it is what elastix's
        ``LinearInterpolator`` computes (the elastix front end maps that interpolator to it), and reads one value
        channel instead of value and gradient channels, which makes an iteration cheaper on large 3-D images.
    metric_weights : dict or sequence of (str, float), optional
        A weighted sum of image metrics that replaces ``metric``, e.g. ``{"mi": 1.0, "ncc": 0.5}`` (elastix
        ``Metric`` lists with ``Metric<i>Weight``): the cost and its per-sample derivative are the weighted sums of
        the terms' on the same samples. ``params["metric"]`` then reads ``"1*mi+0.5*ncc"``.
    seed : int
        Seeds the sampler (same inputs, seed and threads ⇒ the same result).
    threads, memory_limit, time_limit, device, backend, progress, callback
        As for every solver (memory_limit in MB, refused before any work; time_limit in seconds, stops the run).
        On ``device="cuda"`` each evaluation runs on the GPU (:mod:`.device`) for linear interpolation and one
        Mattes MI term (the pyramid, the sample draws and the optimiser stay on the host); other configurations run
        on the CPU (docs/gpu.md).

    Returns
    -------
    Result
        ``transform``: :class:`~classreg.Affine` fixed → moving (centre = the fixed image's centre mapped by
        ``init``); ``inverse``; ``warped``; ``history`` (one row per iteration: level, iteration, metric = sampled
        cost, similarity = NCC of that iteration's fixed and moving samples, step = gain); ``metrics``: ``metric`` (final cost on all samples of a fixed draw at the finest level),
        ``parameters`` (the model's, ITK order), ``init`` (the initial transform's matrix), ``samples``,
        ``valid_fraction``, ``levels``.
    """
    t0 = time.perf_counter()
    check_pair(fixed, moving)
    dev, backend = _placement("register_affine", device, backend, fixed, moving, metric, metric_weights,
                              interpolation)
    fixed, moving = fixed.to("cpu"), moving.to("cpu")  # the host sees the inputs once (no copy for numpy data)
    fmask, mmask = check_masks(fixed, moving, fixed_mask, moving_mask)
    memory_mb = check_memory("affine", fixed, moving, np.float32, memory_limit)
    check_not_constant(fixed, "fixed", fmask)
    check_not_constant(moving, "moving", mmask)
    pre, init_name = _initial(fixed, moving, init, fmask, mmask, seed, backend, progress=progress)
    check_overlap(fixed, moving, pre)
    _warn_ssd_scales("register_affine", metric if metric_weights is None else metric_weights, fixed, moving, fmask,
                     mmask)
    center = pre.map_points(fixed.center[None])[0]
    mdl = AffineModel(transform, fixed.ndim, center)
    engine = _Engine(fixed, moving, fmask, mmask, pre, metric=metric, samples=samples, sampler=sampler,
                     new_samples=new_samples, optimiser=optimiser, max_step=max_step, bins=bins, seed=seed,
                     interpolation=interpolation, image_gradient=image_gradient, metric_weights=metric_weights,
                     backend=backend, shrink_factors=shrink_factors, smoothing_sigmas=smoothing_sigmas,
                     iterations=iterations, device=dev)
    def warm_up():  # the same kernels on a tiny pair, before the bar (progress=True only)
        f, m, fm, mm = tiny_like(fixed, moving)
        register_affine(f, m, transform=transform, metric=metric, init="geometry",
                        fixed_mask=None if fixed_mask is None else fm, moving_mask=None if moving_mask is None else mm,
                        shrink_factors=(2, 1), iterations=(2, 2), samples=max(4 * int(bins), 128),
                        sampler=sampler, new_samples=new_samples, optimiser=optimiser, bins=bins, backend=backend,
                        interpolation=interpolation, image_gradient=image_gradient, metric_weights=metric_weights)

    prog = Progress(f"{transform}", callback=callback, progress=progress, total=sum(engine.iterations),
                    time_limit=time_limit, warm_up=warm_up,
                    warm_key=warm_key(fixed, moving, "affine", transform, metric, image_gradient, sampler, optimiser,
                                      backend, fixed_mask is None, moving_mask is None))
    state = {"p": mdl.identity()}
    stopped = engine.run(lambda level: mdl, state, prog)
    p = state["p"]
    est = mdl.to_affine(p)
    total = est.compose(pre)
    total = Affine(total.matrix, total.map_points(center[None])[0] - center, center)  # re-centred at c
    metric_value, valid = engine.final_metric(mdl, p)
    params = {"transform": transform, "metric": _metric_name(metric, metric_weights),
              "interpolation": interpolation, "image_gradient": image_gradient, "init": init_name,
              "init_matrix": pre.homogeneous.tolist(),
              "center": center.tolist(), "iterations": list(engine.iterations),
              "shrink_factors": list(engine.shrink), "smoothing_sigmas": list(engine.sigmas),
              "memory_estimate_mb": memory_mb,
              **common_params(init=None, dtype=np.float64, seed=int(seed),
                             backend="cuda" if dev == "cuda" else backend)}
    metrics = {"metric": metric_value, "parameters": p.tolist(), "samples": int(samples), "valid_fraction": valid,
               "levels": engine.level_info}
    return _result(fixed, moving, total, total.inverse(), prog, stopped, params, metrics, backend, t0)


# ================================================================================================ register_bspline
#: register_bspline's default bending weight (mm²) per unit weight of each metric; "ssd" per unit of the fixed
#: image's intensity variance. Chosen on the benchmark cases (brain2d, lung2d, circle2d, synth3d, inter3d; elastix's
#: grid, iterations and samples) as the smallest weight of the sweep that no peer dominates on (accuracy, SDlogJ)
#: on the most cases without falling below every peer (docs/notes/tradeoff.md, session 20). The metrics' gradients
#: differ in scale (NMI's is about MI's divided by the joint entropy), hence one value each.
BENDING_DEFAULTS = {"mi": 30.0, "nmi": 10.0, "ncc": 0.0, "ssd": 1.0}

#: register_bspline's default samples per iteration by dimension: elastix's 2048 in 2-D; in 3-D, where sampling noise
#: limits the map (inter3d Dice +0.0036 and synth3d EPE −0.007 mm over 4096 samples, seeds 0-2), 8192, which keeps
#: the benchmark's 3-D cases at about a third of itk-elastix's time (docs/notes/parametric.md, session 20)
BSPLINE_SAMPLES = {2: 2048, 3: 8192}


def default_bending_weight(metric, fixed: Image, fixed_mask=None) -> float:
    """register_bspline's default ``bending_weight`` (mm²) for ``metric`` (a name or a weighted sum, as
    :func:`~classreg.solvers.parametric.engine.metric_terms` reads it): Σ term weight × :data:`BENDING_DEFAULTS`,
    the ``"ssd"`` term also × the variance of ``fixed``'s intensities (inside ``fixed_mask``, a boolean array of
    its grid, when given)."""
    total = 0.0
    for name, weight in metric_terms(metric):
        scale = 1.0
        if name == "ssd":
            scale = float(np.var(_intensities(fixed, fixed_mask)))
        total += weight * BENDING_DEFAULTS[name] * scale
    return total


@declared(BSPLINE_OPTIONS)
def register_bspline(fixed: Image, moving: Image, *, grid_spacing=8.0, grid_schedule=None, metric: str = "mi",
                     bending_weight: float | None = None, folds: str = "project", min_det_j: float = 0.05,
                     init="geometry", fixed_mask=None,
                     moving_mask=None, shrink_factors=(4, 2, 1), smoothing_sigmas=None, iterations=(500, 500, 500),
                     samples: int | None = None, sampler: str = "random_coordinate", new_samples: bool = True,
                     optimiser: str = "asgd", max_step=None, bins: int = 32,
                     interpolation: str = "linear", image_gradient: str = "exact", metric_weights=None, seed: int = 0,
                     threads: int | None = None,
                    memory_limit: float | None = None, time_limit: float | None = None, device: str | None = None, backend=None, progress: bool = False,
                     callback=None) -> Result:
    """Cubic B-spline free-form deformation of ``moving`` onto ``fixed`` (Rueckert et al. 1999; elastix's method).

    ``T(x) = B(init(x))`` with ``B(y) = y + Σ_k c_k β³((y − o)/h − k)`` over a control grid of spacing ``h``
    (``grid_spacing`` × the level's ``grid_schedule`` entry) laid over the fixed image's extent mapped by ``init``
    (elastix's ``GridScheduleComputer``). The cost is the sampled metric plus ``bending_weight`` × the bending
    energy of ``B − id`` (Rueckert et al., IEEE TMI 18(8):712-721, 1999, eq. 6; computed exactly on the control
    grid). One grid is refined level to level by B-spline subdivision (elastix), and ``folds`` says how folding is
    prevented:

    * ``"project"`` (default): every :data:`~classreg.solvers.parametric.folds.PROJECT_EVERY` ASGD iterations and at
      the end (other optimisers: at the end only), the coefficients are projected (nearest in the Euclidean norm) onto
      ``det ∇T ≥ min_det_j`` at the voxel centres of the level's fixed image, every voxel of the fixed image at the
      end — projected stochastic gradient descent
      (:mod:`~classreg.solvers.parametric.folds`; folding corrected around the folded voxels as in NiftyReg, Modat
      et al., Comput. Methods Programs Biomed. 98(3):278-284, 2010);
    * ``"compose"``: each level — and each time 0.1 % of the coefficients reach the bound — starts a new B-spline
      composed after the previous ones, every coefficient held within Choi & Lee's injectivity bound
      ``|c_d| < h_d / K`` (Graph. Models 62(6):411-427, 2000): each piece is injective, so ``det ∇T > 0``
      everywhere, not only at voxel centres (Rueckert et al., MICCAI 2006, LNCS 4191:702-709). A new piece within a
      level continues the level's ASGD gain schedule; it converges more slowly than one grid;
    * ``"allow"``: nothing (elastix; folds possible).

    Optimiser, samplers and pyramid as in :func:`register_affine`.

    Parameters
    ----------
    fixed, moving : Image
        2-D or 3-D scalar images, usually already affinely aligned (pass that transform as ``init``).
    grid_spacing : float or sequence of float
        Final control-point spacing in mm (per axis x, y[, z] or one number).
    grid_schedule : sequence of float, optional
        Multiplier of ``grid_spacing`` per level (default ``2^(levels−1−level)``).
    metric, bending_weight
        The similarity and the weight of the bending-energy penalty in mm² (0: none, as in elastix's default file).
        The default (None) is the sum over the metric's terms of term weight × :data:`BENDING_DEFAULTS` (mm² per
        unit of the metric; for ``"ssd"`` per unit of the fixed image's intensity variance inside its mask, so that
        it does not depend on the intensity scale), chosen on the benchmark cases by issue #22's rule: the smallest
        weight whose maps no peer beats on both accuracy and smoothness (docs/notes/tradeoff.md).
    folds : {"project", "compose", "allow"}
        How folding is prevented (above).
    min_det_j : float
        ``folds="project"``: the floor of ``det ∇T`` at the voxel centres (0 < floor < 1).
    image_gradient : {"exact", "smoothed"}
        As in :func:`register_affine`; here ``"exact"`` is the default: with one Mattes MI (or NMI) term the whole
        iteration is one fused pass (:func:`classreg.kernels.bspline.mi_step`) that computes this gradient only;
        ``"smoothed"`` runs the step-by-step path.
    samples : int, optional
        Samples per iteration; default :data:`BSPLINE_SAMPLES` (2048 in 2-D, 8192 in 3-D).
    init, fixed_mask, moving_mask, shrink_factors, smoothing_sigmas, iterations, sampler, new_samples,
    optimiser, max_step, bins, interpolation, metric_weights, seed, threads, memory_limit, time_limit, device, backend,
    progress, callback
        As in :func:`register_affine`. On ``device="cuda"`` with linear interpolation, one Mattes MI term and ASGD
        each evaluation (B-spline map, moving value and gradient, histogram, gradient in the coefficients, bending
        energy) runs on the GPU and the coefficients stay there within a level (:class:`.device.DeviceBSplineMI`;
        the pyramid, the sample draws, the gain estimation and the composition of fold-free pieces run on the
        host); other configurations run on the CPU, with a log line (docs/gpu.md).

    Returns
    -------
    Result
        ``transform``: ``Chain([init, BSplineTransform])`` (``init`` applied first) or the
        :class:`~classreg.BSplineTransform` alone when ``init`` is the identity; ``inverse``: None (a B-spline map
        has no closed-form inverse; ``transform.inverse(reference=fixed)`` of the B-spline part inverts it
        numerically); ``warped``; ``metrics``: ``metric``, ``bending_energy``,
        ``grid_size`` per level, ``min_det``, ``max_det``, ``percent_det_nonpositive`` (of the whole map on the
        fixed grid), ``samples``, ``valid_fraction``.
    """
    from .bspline import BSplineModel

    t0 = time.perf_counter()
    check_pair(fixed, moving)
    dev, backend = _placement("register_bspline", device, backend, fixed, moving, metric, metric_weights,
                              interpolation, optimiser=optimiser)
    fixed, moving = fixed.to("cpu"), moving.to("cpu")  # CuPy images: one copy to the host
    fmask, mmask = check_masks(fixed, moving, fixed_mask, moving_mask)
    memory_mb = check_memory("bspline", fixed, moving, np.float32, memory_limit)
    check_not_constant(fixed, "fixed", fmask)
    check_not_constant(moving, "moving", mmask)
    pre, init_name = _initial(fixed, moving, init, fmask, mmask, seed, backend, progress=progress)
    check_overlap(fixed, moving, pre)
    terms = metric if metric_weights is None else metric_weights
    _warn_ssd_scales("register_bspline", terms, fixed, moving, fmask, mmask)
    if samples is None:
        samples = BSPLINE_SAMPLES[fixed.ndim]
    if bending_weight is None:
        bending_weight = default_bending_weight(terms, fixed, fmask)
    # no iterate averaging: many slowly converging coefficients, the average lags (measured: lower Dice)
    engine = _Engine(fixed, moving, fmask, mmask, pre, metric=metric, samples=samples, sampler=sampler,
                     new_samples=new_samples, optimiser=optimiser, max_step=max_step, bins=bins, seed=seed,
                     interpolation=interpolation, image_gradient=image_gradient, metric_weights=metric_weights,
                     backend=backend, shrink_factors=shrink_factors, smoothing_sigmas=smoothing_sigmas,
                     iterations=iterations, average=0.0, device=dev)
    levels = len(engine.shrink)
    schedule = _grid_schedule(grid_schedule, levels)
    spacing = np.broadcast_to(np.asarray(grid_spacing, dtype=float), (fixed.ndim,)).astype(float)
    if folds not in FOLDS:
        raise ValueError(f"folds must be one of {', '.join(map(repr, FOLDS))}, got {folds!r}")
    if folds == "project" and not 0.0 < float(min_det_j) < 1.0:
        raise ValueError(f"min_det_j must be in (0, 1) (a floor of det J below the identity's 1), got {min_det_j!r}")
    compose = folds == "compose"
    bound = 0.99 / CHOI_LEE_K[fixed.ndim] if compose else None
    # fold-free pieces move points by < bound × spacing each: later grids reach that far beyond the image
    margins = [float(np.max(spacing)) * sum(schedule[: k + 1]) * 0.5 if compose else 0.0
               for k in range(len(schedule))]
    models = [BSplineModel.over(fixed, pre, spacing * s, margin=m, bending_weight=float(bending_weight),
                                bound=bound, backend=backend) for s, m in zip(schedule, margins)]
    def warm_up():  # the same kernels on a tiny pair, before the bar (progress=True only)
        f, m, fm, mm = tiny_like(fixed, moving)
        register_bspline(f, m, grid_spacing=4.0, metric=metric, bending_weight=bending_weight, folds=folds,
                         init="geometry", fixed_mask=None if fixed_mask is None else fm,
                         moving_mask=None if moving_mask is None else mm, shrink_factors=(2, 1), iterations=(2, 2),
                         samples=max(4 * int(bins), 128), sampler=sampler, new_samples=new_samples,
                         optimiser=optimiser, bins=bins, backend=backend, interpolation=interpolation,
                         image_gradient=image_gradient, metric_weights=metric_weights)

    prog = Progress("bspline", callback=callback, progress=progress, total=sum(engine.iterations),
                    time_limit=time_limit, warm_up=warm_up,
                    warm_key=warm_key(fixed, moving, "bspline", metric, image_gradient, bool(bending_weight),
                                      folds, sampler, optimiser, backend, fixed_mask is None,
                                      moving_mask is None))
    state = {"p": models[0].identity(), "model": 0}
    done = []  # fold-free: (model, coefficients) of the B-splines composed so far
    cache = {}

    def grid_y():
        """The fixed grid's points mapped by ``pre`` ((N, ndim), array order), computed once: the nodes of every
        fold-free prior and of the final map."""
        if "y" not in cache:
            cache["y"] = pre.map_points(fixed.grid_points().reshape(-1, fixed.ndim))
        return cache["y"]

    def level_model(level):
        k = level.index
        state["level"] = level
        if state["model"] != k:
            prev = models[state["model"]]
            if compose:  # a new B-spline on top of the previous levels' maps
                done.append((prev, state["p"]))
                _set_prior(models[k], prev, state["p"], fixed, pre, grid_y())
                state["p"] = models[k].identity()
            else:  # elastix: refine the grid, keep the map
                state["p"] = models[k].refined_from(prev, state["p"])
            state["model"] = k
        return models[k]

    def restart(k, p):
        """Fold-free: once 0.1 % of the coefficients sit on the injectivity bound, compose the B-spline onto the map
        and continue with a new one (checked every RESTART_EVERY iterations)."""
        mdl = models[state["model"]]
        if (k + 1) % RESTART_EVERY or mdl.saturation(p) < RESTART_SATURATION:
            return None
        p = to_numpy(p)  # on the device: the composition onto the map runs on the host (a rare event)
        done.append((mdl, p))
        _set_prior(mdl, mdl, p, fixed, pre, grid_y())
        return mdl.identity()

    projections = {}  # folds="project": one projection per level (its fixed grid), then the final one

    def project(k, p):
        """folds="project": every PROJECT_EVERY iterations, the coefficients onto det ∇T ≥ min_det_j at the
        level's voxel centres (None: already there)."""
        if (k + 1) % PROJECT_EVERY:
            return None
        level = state["level"]
        if level.index not in projections:  # on every PROJECT_STRIDE-th voxel of the full-resolution level
            stride = PROJECT_STRIDE if level.fixed.same_grid(fixed) else 1
            projections[level.index] = FoldProjection(models[state["model"]], level.fixed, pre, min_det_j,
                                                      stride=stride)
        return projections[level.index](to_numpy(p), exact=False)

    if compose:
        engine.restart = restart
    elif folds == "project":
        engine.restart = project
    with one_blas_thread():  # the run and the dense maps of the result (see one_blas_thread)
        stopped = engine.run(level_model, state, prog)
        mdl = models[state["model"]]
        p = to_numpy(state["p"])  # a device iterate when a callback or the time limit stopped a device level

        def dense_field(p):
            """The whole map on the fixed grid, once, for its det J and the warped image: one B-spline on the voxel
            grid (:func:`_dense_map`), or, with fold-free pieces, the last model's prior holds the earlier pieces'
            composition at these very points, so it is one B-spline evaluation (not one per piece)."""
            u = _dense_map(mdl, p, fixed, pre) if mdl.prior is None else None
            if u is None:
                x = fixed.grid_points().reshape(-1, fixed.ndim)
                u = (mdl.map_nodes(p, grid_y()) - x).reshape(*fixed.shape, fixed.ndim)
            return DisplacementField.from_array(u, fixed)

        if folds == "project":  # the guarantee: the floor at every voxel centre of the fixed image
            final = projections["final"] = FoldProjection(mdl, fixed, pre, min_det_j)
            for _ in range(1 + FD_RETRIES):
                projected = final(p)
                p = p if projected is None else projected
                field = dense_field(p)
                # det J is reported from central differences of the field, which can sit below the analytic det at
                # a voxel centre where the map bends sharply: then the analytic floor is raised until both hold
                if _det_stats(field, fixed, None, backend)["min_det"] >= min_det_j:
                    break
                final.raise_floor(FD_RAISE)
            else:
                logger.warning("register_bspline: the fold projection did not bring det J to min_det_j=%g "
                               "everywhere; metrics['min_det'] reports the result", min_det_j)
        else:
            field = dense_field(p)
        pieces = [*done, (mdl, p)] if compose else [(mdl, p)]
        parts = [m.to_transform(c) for m, c in pieces]
        if not np.allclose(pre.homogeneous, np.eye(fixed.ndim + 1)):
            parts.insert(0, pre)
        total = parts[0] if len(parts) == 1 else Chain(parts)
        metric_value, valid = engine.final_metric(mdl, p)
        energy = float(sum(m.bending_energy(c) for m, c in pieces))
        det = _det_stats(field, fixed, fmask, backend)
        params = {"grid_spacing": spacing.tolist(), "grid_schedule": list(schedule),
                  "metric": _metric_name(metric, metric_weights),
                  "interpolation": interpolation, "image_gradient": image_gradient,
                  "bending_weight": float(bending_weight), "folds": folds, "min_det_j": float(min_det_j),
                  "samples": int(samples),
                  "init": init_name,
                  "init_matrix": pre.homogeneous.tolist(),
                  "iterations": list(engine.iterations), "shrink_factors": list(engine.shrink),
                  "smoothing_sigmas": list(engine.sigmas),
                  "memory_estimate_mb": memory_mb,
                  **common_params(init=None, dtype=np.float64, seed=int(seed),
                                 backend="cuda" if dev == "cuda" else backend)}
        metrics = {"metric": metric_value, "bending_energy": energy, "grid_size": [list(m.grid_size) for m in models],
                   "pieces": len(pieces), **det, "samples": int(samples), "valid_fraction": valid,
                   "fold_projections": sum(fp.projections for fp in projections.values()),
                   "levels": engine.level_info}
        return _result(fixed, moving, total, None, prog, stopped, params, metrics, backend, t0, through=field)


def _dense_map(model, p, fixed, pre):
    """``T(x) − x`` (mm, components x, y[, z]) at every voxel of ``fixed`` for ``T = B_p ∘ pre`` without a prior,
    by the grid kernel (:func:`classreg.kernels.bspline.dense`: separable when the grid and ``pre`` are
    axis-aligned) plus the affine part by broadcasting over the index axes — no (N, ndim) point arrays (on a 1 mm
    brain those took most of the final map's time). None when a voxel centre lies outside the grid's valid region
    (then the caller evaluates points)."""
    from ...kernels.bspline import dense

    n = fixed.ndim
    m, o, covered = model.voxel_map(fixed, pre)
    if not covered:
        return None
    u = dense(np.asarray(p, dtype=np.float64).reshape(model.shape), fixed.shape, m, o,
              backend="numpy" if model.backend == "numpy" else None)
    a = (pre.homogeneous - np.eye(n + 1)) @ fixed.affine  # pre(x) − x, per voxel index
    idx = np.ogrid[tuple(slice(0, s) for s in fixed.shape)]
    for c in range(n):
        u[..., c] += sum(a[c, d] * idx[d] for d in range(n)) + a[c, n]
    return u


def _det_stats(field, fixed, fmask, backend) -> dict:
    """det ∇T of the map given as a displacement field on the fixed grid (inside the fixed mask): min, max and
    % ≤ 0."""
    from ...kernels.diff import jacobian_determinant

    u = np.asarray(field.displacement_array_frame(), dtype=np.float64)
    det = np.asarray(jacobian_determinant(u, spacing=fixed.spacing_array_order, backend=backend))
    if fmask is not None:
        det = det[np.asarray(fmask, dtype=bool)]
    return {"min_det": float(det.min()), "max_det": float(det.max()),
            "percent_det_nonpositive": float(100.0 * np.mean(det <= 0))}


#: how register_bspline prevents folding (see its docstring)
FOLDS = ("project", "compose", "allow")
#: folds="project": times the analytic floor is raised (by FD_RAISE) when the central-difference det J of the final
#: map is still below min_det_j
FD_RETRIES, FD_RAISE = 3, 1.5
#: fold-free B-splines: how often (iterations) the saturation of the injectivity bound is checked
RESTART_EVERY = 50
#: fold-free B-splines: the fraction of coefficients near the bound that starts a new piece (a larger fraction leaves
#: the few coefficients where the largest deformation is needed clamped for the rest of a level; docs/notes)
RESTART_SATURATION = 0.001
#: Choi & Lee's injectivity constants: a cubic B-spline displacement with |c_d| < h_d / K is injective
CHOI_LEE_K = {2: 2.046392675, 3: 2.479472335}


def _set_prior(model, prev, p_prev, fixed, pre, y) -> None:
    """Give ``model`` the composition of the earlier levels (``prev`` with ``p_prev``, itself on top of its prior)
    as a dense displacement on ``fixed``'s grid (``y``: its points mapped by ``pre``, the nodes of every prior)."""
    disp = prev.map_nodes(p_prev, y) - y
    world_to_index = fixed.inverse_affine @ np.linalg.inv(pre.homogeneous)
    model.set_prior(disp.reshape(*fixed.shape, fixed.ndim), world_to_index)


def _grid_schedule(schedule, levels):
    if schedule is None:
        return tuple(float(2 ** (levels - 1 - k)) for k in range(levels))
    sched = tuple(float(s) for s in np.atleast_1d(schedule))
    if len(sched) != levels:
        raise ValueError(f"grid_schedule must have one entry per pyramid level ({levels}), got {schedule!r}")
    return sched


# ================================================================================================ shared machinery
#: fraction of the last ASGD iterations averaged into a level's estimate (affine family, random samplers)
AVERAGE = 0.3


def _intensities(image, mask=None) -> np.ndarray:
    """``image``'s values (float64), inside ``mask`` (a boolean array of its grid) when given."""
    values = np.asarray(to_numpy(image.data), dtype=np.float64)
    return values if mask is None else values[np.asarray(to_numpy(mask), dtype=bool)]


def _warn_ssd_scales(solver, metric, fixed, moving, fmask, mmask):
    """A warning when a mean-squares term compares images whose intensity spreads differ by more than 10× (inside
    the masks): mean squares assumes equal intensities for equal tissue, and on such a pair its minimum is a map
    that moves the darker image's bright parts onto the other's dark ones (measured: a T1 slice in [0, 1] against one
    in [0, 227], register_bspline's Dice 0.003)."""
    if "ssd" not in {n for n, _ in metric_terms(metric)}:
        return
    spreads = [float(np.std(_intensities(fixed, fmask))), float(np.std(_intensities(moving, mmask)))]
    lo, hi = sorted(spreads)
    if hi > 10.0 * lo:
        logger.warning("%s: metric 'ssd' compares raw intensities, but the intensity spreads (standard deviations) "
                       "of fixed (%.4g) and moving (%.4g) differ by %.0f×; rescale one image onto the other, or use "
                       "'mi' or 'ncc'", solver, spreads[0], spreads[1], hi / max(lo, 1e-300))


def _metric_name(metric, weights):
    """``metric``, or the weighted sum as ``"1*mi+0.5*ncc"``."""
    if weights is None:
        return metric
    return "+".join(f"{w:g}*{n}" for n, w in metric_terms(weights))


class _Engine:
    """The pyramid, the sampler, the optimiser and the bookkeeping shared by both solvers."""

    def __init__(self, fixed, moving, fmask, mmask, pre, *, metric, samples, sampler, new_samples, optimiser,
                 max_step, bins, seed, backend, shrink_factors, smoothing_sigmas, iterations, average=AVERAGE,
                 interpolation="linear", image_gradient="smoothed", metric_weights=None, device="cpu"):
        if metric_weights is not None:
            metric = metric_terms(metric_weights)  # checked here, before any work
        self.fixed, self.moving, self.fmask, self.mmask, self.pre = fixed, moving, fmask, mmask, pre
        self.metric, self.samples, self.sampler, self.new_samples = metric, int(samples), sampler, new_samples
        self.optimiser, self.max_step, self.bins, self.backend = optimiser, max_step, int(bins), backend
        self.rng = np.random.default_rng(int(seed))
        self.interpolation, self.image_gradient, self.device = interpolation, image_gradient, device
        self.shrink, self.sigmas, self.iterations = check_schedule(shrink_factors, smoothing_sigmas, iterations,
                                                                   fixed.spacing)
        if any(n in ("mi", "nmi") for n, _ in metric_terms(metric)) and sampler not in ("full", "grid") and self.samples < 4 * self.bins:
            raise ValueError(f"too few samples for mutual information: {self.samples} samples for a {self.bins}-bin "
                             f"joint histogram (at least 4 per bin: samples >= {4 * self.bins}); raise samples or "
                             "lower bins")
        if sampler == "random_sparse_mask" and fmask is None:
            raise ValueError("sampler 'random_sparse_mask' draws voxels inside the fixed mask: give fixed_mask, or "
                             "use sampler='random_coordinate'")
        self.level_info = []
        self.last = None
        self.average = float(average)  # fraction of the last ASGD iterates averaged (random samplers)
        self.restart = None  # a model's re-parameterisation hook (fold-free B-splines), see asgd

    def objective(self, level, model):
        smp = Sampler(self.sampler, self.samples, level.fixed.shape, level.fixed_mask)
        return LevelObjective(level.fixed, level.moving, level.fixed_mask, level.moving_mask, model=model,
                              pre=self.pre, metric=self.metric, sampler=smp, rng=self.rng, bins=self.bins,
                              new_samples=self.new_samples, backend=self.backend, interpolation=self.interpolation,
                              image_gradient=self.image_gradient,
                              device=self.device)

    def run(self, level_model, state, prog) -> bool:
        """Optimise coarse to fine; returns whether a callback stopped the run."""
        def step(level, st, progress):
            t_level = time.perf_counter()
            model = level_model(level)
            obj = self.objective(level, model)
            self.last = (level, obj)
            with serial_below(obj.parallel_work):  # per-iteration kernels this small run best on one thread
                value = self._optimise(obj, model, level, st, progress)
            self.level_info.append({"level": level.index, "shrink": level.shrink, "sigma_mm": level.sigma_mm,
                                    "shape": list(level.fixed.shape), "iterations": level.iterations,
                                    "metric": value, "valid_fraction": obj.last_valid,
                                    "seconds": time.perf_counter() - t_level})
            return value

        try:
            prog.emit("start", extra={"levels": len(self.shrink)})
            with one_blas_thread():
                _, stopped = multiresolution(self.fixed, self.moving, step, shrink_factors=self.shrink,
                                             smoothing_sigmas=self.sigmas, iterations=self.iterations,
                                             fixed_mask=self.fmask, moving_mask=self.mmask, state=state,
                                             transfer=lambda s, a, b: dict(s), progress=prog,
                                             backend=self.backend)
            if not stopped:
                prog.emit("done")
        except StopRegistration:
            stopped = True
        finally:
            prog.close()
        return stopped

    def _optimise(self, obj, model, level, state, progress):
        from ...optimise.asgd import asgd, estimate_gain, regular_step_gd, standard_gd

        p0 = state["p"]
        y_est, f_est = obj.draw(self.exact_count())
        scales = model.scales(y_est)
        delta = float(np.mean(level.fixed.spacing)) if self.max_step is None else float(self.max_step)
        k_level = level.index

        last = {"gradient": float("nan")}

        def evaluate(x, k):
            value, grad = obj.evaluate(x, k)
            # a device gradient's norm came with the evaluation's one read
            last["gradient"] = float(np.linalg.norm(grad)) if isinstance(grad, np.ndarray) else obj.last_gradient_norm
            return value, grad

        def on_iteration(k, x, value, gain):
            state["p"] = x
            progress.emit("iteration", level=k_level, iteration=k, metric=value, similarity=obj.last_similarity,
                          step=gain, extra=last)

        if level.iterations == 0:
            return float("nan")
        gain_draws = [-1 - i for i in range(1 if obj.sampler.deterministic else GAIN_DRAWS)]
        if obj.on_device and self.optimiser == "asgd":  # the draws asgd below asks for, in its order
            obj.predraw(gain_draws + list(range(level.iterations)))
        project = getattr(model, "project", None)
        displ = obj.displacements(p0, y_est[: 4 * self.samples])
        if self.optimiser == "asgd":
            # the gain estimation runs on the host, once per level: a device B-spline level's few gradients here
            # come down (to_numpy), its iterations then keep the coefficients on the device (obj.resident)
            x0 = obj.resident(p0)
            grads = [to_numpy(obj.evaluate(x0, k)[1]) for k in gain_draws]
            exact = None if obj.sampler.deterministic else to_numpy(obj.evaluate(x0, samples=(y_est, f_est))[1])
            big = (y_est, f_est) if exact is not None else None
            a, omega, fmin = estimate_gain(displ, grads, scales, exact=exact, max_step=delta,
                                           exact_at=lambda s: to_numpy(obj.evaluate(p0 + s, 0, samples=big)[1]))
            res = asgd(evaluate, x0, scales=scales, iterations=level.iterations, a=a, omega=omega,
                       fmin=fmin, average=self.average if not obj.sampler.deterministic else 0.0, project=project,
                       restart=self.restart, on_iteration=on_iteration)
        elif self.optimiser == "gd":
            res = standard_gd(evaluate, p0, scales=scales, iterations=level.iterations, project=project,
                              on_iteration=on_iteration)
        elif self.optimiser == "rsgd":
            res = regular_step_gd(evaluate, p0, scales=scales, iterations=level.iterations, max_step=delta,
                                  min_step=1e-3 * delta, displacements=displ, project=project,
                                  on_iteration=on_iteration)
        else:
            return self._lbfgs(obj, p0, scales, delta, level, state, progress)
        state["p"] = to_numpy(res.x)  # a device level's coefficients, once per level (the next level's setup)
        return res.value

    def _lbfgs(self, obj, p0, scales, delta, level, state, progress):
        """elastix ``QuasiNewtonLBFGS``: L-BFGS on one fixed draw of samples per level (a deterministic cost), in the
        scaled parameters, with a trust region on the largest sample displacement of a step (mm)."""
        from ...optimise.lbfgs import minimise

        samples = obj.samples(0) if obj.sampler.deterministic else obj.draw()
        root = np.sqrt(scales)
        pts = samples[0][: 4 * self.samples]
        project = getattr(obj.model, "project", None)

        class Problem:
            def value(self, x):
                p = x / root
                if project is not None:
                    p = project(p)
                value, grad = obj.evaluate(p, samples=samples)
                return value, grad / root

            def gradient(self, x, payload):
                return payload

            def step_norm(self, d):
                u = obj.model.displacement(p0, d / root, pts)
                return float(np.sqrt(np.max(np.sum(u * u, axis=1))))

        problem = Problem()
        x0 = p0 * root
        f0, g0 = problem.value(x0)

        def accept(it):
            state["p"] = it.x / root
            progress.emit("iteration", level=level.index, iteration=it.iteration, metric=it.f,
                          similarity=obj.last_similarity, step=it.step)

        res = minimise(problem, x0, f0, g0, iterations=level.iterations, tol=1e-9, radius=delta, on_accept=accept,
                       evaluations=1)
        p = res.x / root
        state["p"] = project(p) if project is not None else p
        return float(res.f)

    def exact_count(self) -> int:
        """Samples of the level's large draw (the gain estimation's "exact" gradient, the final metric): ten
        iterations' worth, 20 000 to 100 000 (elastix NumberOfSamplesForExactGradient: 100 000). Not capped at a
        small level's voxel count: random coordinates that many are far from the exact gradient (elastix samples
        such a level fully), and the gain estimation then starts with steps that oscillate (docs/notes/parametric.md,
        session 25)."""
        return min(max(10 * self.samples, 20000), 100000)

    def final_metric(self, model, p):
        """The cost (without penalty) on one fixed large draw at the last level run, and the valid fraction."""
        if self.last is None:
            return float("nan"), float("nan")
        _, obj = self.last
        draw = obj.draw(None if obj.sampler.deterministic else self.exact_count())
        value, _ = obj.evaluate(p, samples=draw, penalty=False)
        return value, obj.last_valid


def _placement(solver, device, backend, fixed, moving, metric, metric_weights, interpolation, optimiser=None):
    """``(device, backend)`` of :func:`register_affine` and :func:`register_bspline` (``optimiser`` given: ASGD
    only, whose iterates the B-spline path keeps on the device): on "cuda" the per-iteration evaluation runs on the
    GPU (:meth:`LevelObjective.device_covers`: linear interpolation and one Mattes MI term) and the host-side steps
    (pyramid, initial transform, gain estimation, result) on the CPU kernels; a configuration the device path does
    not cover runs on the CPU, with a log line."""
    dev, backend = placement(device, backend, fixed.data, moving.data)
    if dev != "cuda":
        return dev, backend
    terms = metric_terms(metric if metric_weights is None else metric_weights)
    if not LevelObjective.device_covers(INTERPOLATIONS.get(interpolation, (-1,))[0], terms):
        logger.info(f"{solver}: the GPU path covers linear interpolation with metric='mi'; running on the CPU")
        return "cpu", None
    if optimiser not in (None, "asgd"):
        logger.info(f"{solver}: the GPU path covers optimiser='asgd'; running on the CPU")
        return "cpu", None
    return dev, None


def _center_of_mass(img: Image, mask) -> np.ndarray:
    a = np.asarray(img.numpy(), dtype=np.float64)
    w = a - a.min()
    if mask is not None:
        w = np.where(np.asarray(mask), w, 0.0)
    total = float(w.sum())
    if not total > 0:
        raise ValueError("init='moments': the image is constant (inside its mask); use init='geometry'")
    # axis by axis: the weight profile along each axis against its indices (no index grid of the image's size)
    c_idx = np.array([np.arange(a.shape[k], dtype=float) @ w.sum(axis=tuple(j for j in range(a.ndim) if j != k))
                      for k in range(a.ndim)]) / total
    return img.index_to_world(c_idx[None])[0]


def _initial(fixed, moving, init, fmask, mmask, seed, backend, *, progress=False):
    """The initial fixed → moving :class:`Affine` and its name for ``Result.params`` (``init="global"`` shows its
    own bar with ``progress``)."""
    n = fixed.ndim
    if isinstance(init, str):
        if init == "identity":
            return Affine.identity(n), init
        if init == "geometry":
            return Affine.from_translation(moving.center - fixed.center), init
        if init == "moments":
            return Affine.from_translation(_center_of_mass(moving, mmask) - _center_of_mass(fixed, fmask)), init
        if init == "global":
            from ..rigid import register_rigid

            # register_rigid's default search without its local stage: the local optimisation here refines it
            res = register_rigid(fixed, moving, fixed_mask=fmask, moving_mask=mmask, seed=int(seed),
                                 backend=backend, progress=progress, local_refine="none")
            return res.transform, init
        raise ValueError(f"init must be 'geometry', 'moments', 'global', 'identity' or an Affine, got {init!r}")
    if isinstance(init, Chain):
        init = init.simplified()
    if not isinstance(init, Affine):
        kind = type(init).__name__ if isinstance(init, Transform) else repr(init)
        raise TypeError(f"init must be 'geometry', 'moments', 'global', 'identity' or an Affine, got {kind}")
    if init.ndim != n:
        raise ValueError(f"init is {init.ndim}-D but the images are {n}-D")
    return init, "transform"


def _result(fixed, moving, transform, inverse, prog, stopped, params, metrics, backend, t0, through=None) -> Result:
    """The Result; ``warped`` is resampled through ``through`` (``transform`` as a displacement field on the fixed
    grid) when given."""
    from ...resample import resample

    warped = resample(moving, transform if through is None else through, reference=fixed, backend=backend)
    return Result(transform=transform, inverse=inverse, warped=warped, history=prog.history, converged=not stopped,
                  stop_reason=prog.stop_reason if stopped else "completed the schedule", params=params,
                  metrics=metrics, timings={"total": time.perf_counter() - t0, **prog.timings}, reference=fixed)
