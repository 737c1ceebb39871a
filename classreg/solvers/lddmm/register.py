"""``register_lddmm``: image LDDMM by geodesic shooting of the initial scalar momentum (EPDiff), adjoint gradient.

The deformation is the end point of a geodesic of the group of diffeomorphisms, parameterised by the initial scalar
momentum ``P₀`` on the fixed grid (F.-X. Vialard, L. Risser, D. Rueckert, C. J. Cotter, IJCV 97, 2012). The
pieces: the kernel operator K (:mod:`.operators`), the data terms (:mod:`.objective`), the shooting and its adjoint
(:mod:`.shooting`), one pyramid level of L-BFGS with adaptive time steps (:mod:`.step`, on
:func:`classreg.optimise.minimise`). This module validates, runs the pyramid, shoots the result once more at full
resolution and builds the :class:`~classreg.Result`.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from ...backend import placement, to_device, to_numpy
from ...image import Image, as_mask
from ...kernels._backend import get_array_module
from ...options import declared
from ...progress import Progress, StopRegistration
from ...pyramid import check_schedule, multiresolution
from ...result import Result
from ...transforms import Transform
from .._common import (
    check_init,
    check_memory,
    check_overlap,
    check_pair,
    common_params,
    field_result,
    mean_sq,
    normalise_intensities,
    one_blas_thread,
    resolve_auto_metric,
    same_intensity_scale,
    tiny_like,
    warm_key,
    warp_through,
)
from .bl_step import level_step_bandlimited
from .objective import data_term
from .operators import check_kernel_sigma, kernel_operator
from .options import OPTIONS
from .shooting import GeodesicShooting
from .step import STABILITY_TARGET, level_step, stable_start

__all__ = ["register_lddmm"]

_log = logging.getLogger("classreg")


@declared(OPTIONS)
def register_lddmm(fixed: Image, moving: Image, *, init: Transform | None = None, fixed_mask=None, moving_mask=None,
                   metric: str = "auto", shrink_factors=(4, 2, 1), smoothing_sigmas=None, iterations=(40, 30, 20),
                   kernel: str = "gaussian", kernel_sigma=None, alpha: float | None = None,
                   order: float = 2.0, data_sigma: float | None = None, n_steps: int | None = None,
                   max_steps: int | None = None,
                   tol: float = 1e-5, lncc_radius: float | None = None, intensity: str = "auto",
                   method: str = "bandlimited", cutoff: float = 0.2, map_spacing: float | None = None,
                   min_det_j: float = 0.05, return_trajectory: bool = False, dtype=np.float32, seed: int = 0,
                   threads: int | None = None, memory_limit: float | None = None, time_limit: float | None = None,
                   device: str | None = None, backend=None, progress: bool = False, callback=None) -> Result:
    """Register ``moving`` to ``fixed`` by LDDMM geodesic shooting.

    Two parameterisations of the geodesic (``method``). "bandlimited" (default): the initial velocity lives on the
    low Fourier frequencies of a periodic box around the fixed image where the kernel's transform ``K̂ ≥ cutoff``;
    EPDiff (the geodesic equation of the vector momentum ``m = Lv``) is integrated there, and only the transport of
    the map runs on a spatial grid (M. Zhang, P. T. Fletcher, IJCV 127:61-73, 2019; :mod:`.bandlimited`). The
    energy is ``E(z) = ½ ‖v₀‖²_V + D(I₁)`` with ``v₀ = K^½ z``. "full": the scalar momentum on the voxel grid, as
    follows. Along the geodesic (t ∈ [0, 1]) ``m_t = P_t ∇I_t``, ``v_t = −K⋆m_t``, ``I_t = I₀∘φ_t⁻¹``,
    ``P_t = |Dφ_t⁻¹| (P₀∘φ_t⁻¹)``, with I₀ the moving image (through ``init``) on the fixed grid. The energy
    minimised over P₀ is ``E(P₀) = ½ ⟨P₀∇I₀, K⋆(P₀∇I₀)⟩ + D(I₁)`` with ``D = (1/2σ²) ‖I₁ − J‖²`` ("ssd"),
    ``(vol/σ²) · C_lncc(J, I₁)`` ("lncc") or ``(vol/σ²) · (−MI(J, I₁))`` ("mi"), J the fixed image and every inner product a physical integral (voxel sums
    times Π h), so that neither E nor P₀ depends on the grid.

    Parameters
    ----------
    fixed, moving : Image
        2-D or 3-D scalar images in physical space (any grids; at least 4 voxels per axis).
    init : Affine or Chain of affines, optional
        Initial fixed → moving transform (e.g. from ``register_rigid``); ``T = init ∘ φ₁⁻¹``.
    fixed_mask, moving_mask : Image or array, optional
        The data term counts only inside the fixed mask and where the moving mask, sampled through the current map,
        is set (with "ssd" a weight whose dependence on the map is differentiated).
    metric : {"auto", "lncc", "ssd", "mi"}
        Data term: local normalised correlation (:class:`classreg.terms.LNCC`, window ``lncc_radius`` mm; B. B.
        Avants et al. 2008), suited to pairs whose contrasts differ locally; the sum of squared differences (Vialard
        et al. 2012) for same-contrast pairs; or Mattes mutual information (32 bins, elastix's Parzen windows,
        histogram limits fixed per pyramid level, every entropy smoothed; D. Mattes et al., IEEE TMI
        22(1):120-128, 2003) for pairs whose intensities relate by any one-to-one or many-to-one mapping (other
        modalities, other scanners). "auto" (default): "lncc" when the two images are on one intensity scale (the
        rule of ``intensity="auto"``), else "mi" — on the device, which has no MI term, "lncc". The choice is
        recorded in ``params["metric"]``; docs/notes/tradeoff.md has the measurements behind it.
    shrink_factors, smoothing_sigmas, iterations
        Pyramid (coarsest first): shrink factors relative to the smallest spacing, Gaussian σ in mm (default: half
        the shrink factor in voxels, 0 at full resolution), L-BFGS iterations per level. P₀ is carried to the next
        level by linear interpolation without density rescaling (it is a function, the sums carry Π h).
    kernel : {"gaussian", "sobolev"}
        RKHS kernel K: unit-sum Gaussian of ``kernel_sigma`` mm, or ``(Id − αΔ)^{-order}`` (α in mm²); both with
        zero extension (no wrap-around).
    kernel_sigma : float or sequence of float, optional
        Gaussian kernel σ in mm (default 4.5 × the largest spacing of ``fixed`` for "bandlimited", 3 × for "full"):
        the band-limited default is the smallest σ of the benchmark sweep whose maps keep min det J ≥ 0.05 on every
        benchmark case and are not dominated on (Dice or EPE, SDlogJ) by the peers on most of them
        (docs/notes/tradeoff.md).
        With ``method="full"``, a sequence of σ gives the multi-scale kernel K = (1/n) Σᵢ G_σᵢ (L. Risser et al.,
        IEEE TMI 30(10):1746-1759, 2011; :class:`.operators.MultiGaussianKernel`); the band-limited engine takes
        one σ and rejects a sequence.
    alpha : float, optional
        Sobolev α in mm² (default (2 × the largest spacing)²).
    order : float
        Sobolev power s.
    data_sigma : float, optional
        σ of the data term: SSD in units of the normalised intensities ([0, 1] over the fixed image's 0.5-99.5
        percentile range), LNCC in units of the correlation cost (in [−1, 0]), MI in nats. Smaller: closer
        matching, longer geodesic, stiffer flow (more time steps). Default per metric (:data:`DATA_SIGMA`): 0.05
        for "lncc" and "ssd", 0.11 for "mi" (inside the window 0.11-0.12 where both cross-scale benchmark pairs are
        not dominated by a peer; 0.10-0.12 on the held-out slices of ``python -m benchmarks.heldout``).
    n_steps : int, optional
        Time steps n_t of the geodesic at the finest level (default 5 for "bandlimited", 10 for "full"), the
        minimum: n_t is raised, per level, while a path's stability number ``δt·max‖Dv‖_F`` exceeds 0.3
        ("bandlimited") or 0.1 ("full"; stiff flows: large momenta, small ``kernel_sigma``). Coarse levels start
        from half as many. ``metrics["time_steps"]`` is the count used for the result.
    max_steps : int, optional
        Upper bound of the adaptive n_t (default 4 × ``n_steps``). At the bound the stability limit acts as a
        trust region: momenta whose flow would need more steps are rejected.
    tol : float
        Relative energy decrease ``(E_k − E_{k+1}) / max(|E_k|, |E_{k+1}|, 1)`` at or below which a level stops
        (energies normalised by the level's initial energy).
    lncc_radius : float, optional
        LNCC window radius in mm (default 2 × the largest spacing; at least one voxel of each level).
    intensity : {"auto", "joint", "match"}
        "joint": both images scaled by the fixed image's 0.5-99.5 percentile range; "match": histogram-match the
        moving image to the fixed one first (SimpleITK, as ``register_demons``); "auto": "joint" when the moving
        image's 0.5 and 99.5 percentiles lie within half and a quarter of the fixed image's range of the fixed ones
        (:func:`classreg.solvers._common.same_intensity_scale`), else "match".
        The choice is recorded in ``params["intensity_used"]``.
    method : {"bandlimited", "full"}
        "bandlimited": velocities on the frequencies with ``K̂ ≥ cutoff`` (EPDiff dealiased by the 2/3 rule, the
        inverse map traced along characteristics on the map grid, explicit Euler in time); "full": the scalar
        momentum P₀ on the voxel grid, the image, momentum and map transported there (semi-Lagrangian).
    cutoff : float
        "bandlimited": the smallest kernel weight ``K̂(ξ)`` (relative to K̂(0) = 1) of a kept frequency. A mode of
        weight K̂ costs 1/K̂ times more regularisation per unit amplitude than the mean, so the optimum carries
        little energy where K̂ is small, while the band's volume grows like the cut-off frequency to the power d.
    map_spacing : float, optional
        "bandlimited": spacing (mm) of the grid on which the map is traced (default ``kernel_sigma`` for the
        Gaussian kernel, √alpha for the Sobolev one; never finer than the voxels); voxels interpolate it linearly.
    min_det_j : float
        "bandlimited": floor of the Jacobian determinant of φ₁⁻¹ on the voxel grid (central differences), in
        [0, 1). The line search rejects trial shots whose map (traced on the map grid, interpolated to the voxels)
        goes below it, a start or carried velocity below it is scaled down by bisection, and so is the result if
        its map traced from every voxel goes below it. Default 0.05: no voxel compressed more than 20-fold, the
        plausibility floor of the benchmark page (issue #22; docs/notes/tradeoff.md), as ``register_demons``'
        ``min_det_j``; 0 keeps only the diffeomorphism on the grid (det J > 0). Not used by "full" (no det J check:
        its semi-Lagrangian shooting is limited by the stability number only).
    return_trajectory : bool
        Store the geodesic ``I_t`` (moving intensities, t = k/n_t, k = 0..n_t) and ``v_t`` (array frame, mm per
        unit time) in ``extras["trajectory_images"]`` / ``extras["trajectory_velocities"]``.
    dtype : {numpy.float32, numpy.float64}
        Working precision of the shooting and of the L-BFGS vectors.
    seed : int
        Recorded for reproducibility (the algorithm is deterministic: P₀ starts at 0).
    threads : int, optional
        CPU threads of the numba kernels during the call.
    memory_limit, time_limit : float, optional
        MB the call may use (default: the memory available now; a larger estimate is refused before any work and
        recorded in ``Result.params["memory_estimate_mb"]``); seconds after which the run stops with its estimate.
    device : {None, "cpu", "cuda", "cuda:N"}
        Where to compute (default: from the data). On the GPU the normalised images go to the device once, the
        pyramid, shootings, adjoint sweeps, FFTs (cupy.fft), data terms, L-BFGS vectors and fold checks stay there,
        and the result comes back once (docs/gpu.md); ``return_trajectory`` is CPU-only.
    backend : {None, "numpy", "numba", "cuda"}
        Kernel implementation (default: from the data; numba on the CPU when installed).
    progress : bool
        Show a tqdm bar.
    callback : callable, optional
        Receives :class:`classreg.Event` objects (one ``iteration`` event per accepted L-BFGS iterate, with
        ``metric`` = data term, ``regularization`` = ½‖v₀‖²_V, ``step`` = max |ΔP₀|); raise
        :class:`classreg.StopRegistration` to stop and keep the current estimate.

    Returns
    -------
    Result
        ``transform`` = φ₁⁻¹ (fixed → moving, chained with ``init``), ``inverse`` = φ₁, both integrated along the
        flow (no numerical inversion); ``warped``; ``metrics``: ``geodesic_length`` ‖v₀‖_V =
        ⟨P₀∇I₀, K⋆(P₀∇I₀)⟩^½ = sqrt(2 · ``regularization``) (mm·mm^{d/2} per unit time, independent of the
        intensity scale), ``energy``, ``data_term``, ``regularization``, ``ssd_before``/``ssd_after`` (mean squared
        normalised difference), ``min_det`` (of φ₁⁻¹), ``inverse_error_voxels`` (max |φ₁∘φ₁⁻¹ − id|),
        ``time_steps`` (n_t of the result), ``stability`` (max_k δt·max‖Dv_k‖_F), ``max_step_voxels``,
        ``iterations``, ``evaluations``; ``extras["velocity_coefficients"]`` ("bandlimited": ``z`` on the coarse
        periodic grid, ``v₀ = K^½ z``) or ``extras["P0"]`` ("full": the initial momentum on the fixed grid, for the
        normalised intensities), and the trajectory on request.

    References
    ----------
    F.-X. Vialard, L. Risser, D. Rueckert, C. J. Cotter, "Diffeomorphic 3D image registration via geodesic
    shooting using an efficient adjoint calculation", IJCV 97:229-241, 2012, doi:10.1007/s11263-011-0481-8.
    M. I. Miller, A. Trouvé, L. Younes, "Geodesic shooting for computational anatomy", J. Math. Imaging Vis.
    24:209-228, 2006, doi:10.1007/s10851-005-3624-0.
    B. B. Avants, C. L. Epstein, M. Grossman, J. C. Gee, "Symmetric diffeomorphic image registration with
    cross-correlation", Med. Image Anal. 12(1):26-41, 2008, doi:10.1016/j.media.2007.06.004 (the LNCC metric).
    M. Zhang, P. T. Fletcher, "Fast diffeomorphic image registration via Fourier-approximated Lie algebras", IJCV
    127:61-73, 2019, doi:10.1007/s11263-018-1099-x (band-limited geodesic shooting, FLASH).
    J. Nocedal, S. J. Wright, "Numerical Optimization", 2nd ed., Springer, 2006 (L-BFGS, Alg. 7.4; backtracking,
    Alg. 3.1).
    """
    t_start = time.perf_counter()
    check_pair(fixed, moving)
    dev, backend = placement(device, backend, fixed.data, moving.data)
    if dev == "cuda" and return_trajectory:
        raise ValueError("register_lddmm: return_trajectory runs on the CPU only; use device='cpu'")
    fixed, moving = fixed.to("cpu"), moving.to("cpu")  # the host sees the inputs once (no copy for numpy data)
    init = check_init(init, fixed.ndim)
    check_overlap(fixed, moving, init)
    memory_mb = check_memory("lddmm" if method == "bandlimited" else "lddmm_full", fixed, moving, dtype, memory_limit,
                             fix=", use fewer time steps (n_steps)" if method == "full" else "")
    fmask = as_mask(fixed_mask, fixed, "fixed_mask")
    mmask = as_mask(moving_mask, moving, "moving_mask")
    metric, intensity_used = _resolve_data(metric, intensity, fixed, moving, fmask, mmask, dev)
    if dev == "cuda" and metric == "mi":
        raise ValueError("register_lddmm: metric='mi' runs on the CPU only (the Mattes MI histogram is a host "
                         "computation); use device='cpu', or metric='lncc' or 'ssd' on the GPU")
    dtype = np.dtype(dtype)
    opts = _resolve(fixed, moving, metric=metric, kernel=kernel, kernel_sigma=kernel_sigma, alpha=alpha, order=order,
                    data_sigma=DATA_SIGMA.get(metric) if data_sigma is None else data_sigma, n_steps=n_steps,
                    max_steps=max_steps, tol=tol, lncc_radius=lncc_radius,
                    dtype=dtype, backend=backend, method=method, cutoff=cutoff, map_spacing=map_spacing,
                    min_det_j=min_det_j)
    schedule = dict(zip(("shrink_factors", "smoothing_sigmas", "iterations"),
                        check_schedule(shrink_factors, smoothing_sigmas, iterations, fixed.spacing)))
    fixed_n, template, mmask_t = _template(fixed, moving, init, fmask, mmask, intensity_used, dtype,
                                           None if dev == "cuda" else backend)
    ssd_before = mean_sq(fixed_n.data, template.data, fmask)
    if dev == "cuda":  # the working images go to the device once; the levels and the final shot keep them there
        fixed_n, template = fixed_n.to(dev), template.to(dev)
        fmask = None if fmask is None else to_device(fmask, dev)
        mmask_t = None if mmask_t is None else to_device(mmask_t, dev)

    def warm_up():  # the same kernels on a tiny pair, before the bar (progress=True only)
        f, m, fm, mm = tiny_like(fixed, moving)
        register_lddmm(f, m, fixed_mask=None if fixed_mask is None else fm,
                       moving_mask=None if moving_mask is None else mm, metric=metric, kernel=kernel, method=method,
                       intensity=intensity, dtype=dtype, backend=backend, shrink_factors=(2, 1), iterations=(2, 2),
                       n_steps=4, device=None if dev == "cpu" else dev)

    prog = Progress("lddmm", callback=callback, progress=progress, time_limit=time_limit,
                    total=int(sum(schedule["iterations"])), warm_up=warm_up,
                    warm_key=warm_key(fixed, moving, metric, kernel, method, intensity, dtype.name, backend,
                                      fixed_mask is None, moving_mask is None))
    with one_blas_thread():
        run = _run_levels(fixed_n, template, fmask, mmask_t, schedule, opts, prog, ssd_before)
        t_fin = time.perf_counter()
        shooter, inv_mm, fwd_mm, metrics = _final_shooting(fixed, fixed_n, template, fmask, mmask_t, run, opts)
    inv_mm, fwd_mm, run["P0"] = to_numpy(inv_mm), to_numpy(fwd_mm), to_numpy(run["P0"])  # the result, once
    metrics["ssd_before"] = ssd_before
    extras = {"velocity_coefficients" if opts["method"] == "bandlimited" else "P0": run["P0"]}
    if return_trajectory and opts["method"] == "bandlimited":
        extras.update(_trajectory_bandlimited(shooter, run["P0"], moving, fixed, init, dtype, backend))
    elif return_trajectory:
        extras.update(_trajectory(shooter, run["P0"], moving, fixed, init, dtype, backend))
    timings = {"total": time.perf_counter() - t_start, "final_shooting": time.perf_counter() - t_fin,
               "levels": [i["seconds"] for i in run["levels"]], **prog.timings}
    params = _params(opts, schedule, run["levels"], intensity=intensity, intensity_used=intensity_used,
                     return_trajectory=return_trajectory, init=init, seed=seed)
    params["memory_estimate_mb"] = memory_mb
    if not run["stopped"]:
        try:
            prog.emit("done", metric=metrics["ssd_after"], regularization=metrics["regularization"],
                      extra={"geodesic_length": metrics["geodesic_length"]})
        except StopRegistration:
            pass
    prog.close()
    return field_result(fixed, moving, init, inv_mm, fwd_mm, history=prog.history, converged=run["converged"],
                        stop_reason=run["stop_reason"], params=params, metrics=metrics, timings=timings,
                        extras=extras)


def _resolve(fixed: Image, moving: Image, *, metric, kernel, kernel_sigma, alpha, order, data_sigma, n_steps,
             max_steps, tol, lncc_radius, dtype, backend, method="full", cutoff=0.2, map_spacing=None,
             min_det_j=None) -> dict:
    """The options that depend on each other or on the images, resolved (lengths in mm, σ² of the data term)."""
    if n_steps is None:
        n_steps = 5 if method == "bandlimited" else 10
    if max_steps is None:
        max_steps = 4 * int(n_steps)
    if max_steps < n_steps:
        raise ValueError(f"max_steps must be an integer >= n_steps ({n_steps}), got {max_steps!r}")
    for img, name in ((fixed, "fixed"), (moving, "moving")):
        if min(img.shape) < 4:
            raise ValueError(f"{name} must have at least 4 voxels along every axis, got shape {img.shape}")
    h_max = max(fixed.spacing)
    if kernel_sigma is not None:
        kernel_sigma = check_kernel_sigma(kernel_sigma)
        if isinstance(kernel_sigma, tuple) and (method == "bandlimited" or kernel != "gaussian"):
            raise ValueError(f"kernel_sigma: a sequence of σ {kernel_sigma} (the multi-scale Gaussian kernel) needs "
                             "kernel='gaussian' and method='full' (the band-limited method takes one σ)")
    opts = {"metric": metric, "kernel": kernel, "method": method, "cutoff": float(cutoff),
            "kernel_sigma": (4.5 if method == "bandlimited" else 3.0) * h_max if kernel_sigma is None
            else kernel_sigma,
            "alpha": (2.0 * h_max) ** 2 if alpha is None else float(alpha), "order": float(order),
            "data_sigma": float(data_sigma), "sigma2": float(data_sigma) ** 2, "n_steps": int(n_steps),
            "max_steps": int(max_steps), "tol": float(tol),
            "lncc_radius": 2.0 * h_max if lncc_radius is None else float(lncc_radius), "dtype": dtype,
            "backend": backend, "min_det_j": None if min_det_j is None else float(min_det_j)}
    if method == "bandlimited":
        from .bandlimited import SpectralDomain

        opts["map_spacing"] = (opts["kernel_sigma"] if kernel == "gaussian" else math.sqrt(opts["alpha"])) \
            if map_spacing is None else float(map_spacing)
        opts["domain"] = SpectralDomain(fixed.shape, fixed.spacing_array_order, kernel=kernel,
                                        sigma=opts["kernel_sigma"], alpha=opts["alpha"], order=order, cutoff=cutoff)
    return opts


#: the default ``data_sigma`` per data term (docs/notes/tradeoff.md, session 23)
DATA_SIGMA = {"lncc": 0.05, "ssd": 0.05, "mi": 0.11}


def _resolve_data(metric, intensity, fixed, moving, fmask, mmask, dev):
    """``(metric, intensity)`` with "auto" resolved (logged): one intensity scale -> "lncc" and "joint", else "mi"
    (the device: "lncc") and "match"."""
    metric, same = resolve_auto_metric("lddmm", metric, "lncc", "mi", fixed, moving, fmask, mmask, dev)
    if same is None or intensity != "auto":
        return metric, _resolve_intensity(intensity, fixed, moving, fmask, mmask)
    return metric, "joint" if same else "match"


def _resolve_intensity(intensity, fixed, moving, fmask, mmask) -> str:
    """``"auto"``: ``"joint"`` when the two images are on one intensity scale
    (:func:`classreg.solvers._common.same_intensity_scale`), else ``"match"``."""
    if intensity != "auto":
        return intensity
    same, (lo_m, hi_m), (lo_f, hi_f) = same_intensity_scale(fixed, moving, fmask, mmask)
    if not same:
        _log.info("lddmm: intensity='auto' -> 'match' (moving 0.5-99.5 %% range [%.4g, %.4g], fixed [%.4g, %.4g])",
                  lo_m, hi_m, lo_f, hi_f)
    return "joint" if same else "match"


def _template(fixed, moving, init, fmask, mmask, intensity, dtype, backend):
    """``(fixed_n, template, moving mask)``: the normalised fixed image, the normalised moving image through
    ``init`` on the fixed grid (I₀) and the moving mask brought there (boolean, or None)."""
    fixed_n, moving_n = normalise_intensities(fixed, moving, fmask, intensity, dtype)
    zero = np.zeros((*fixed.shape, fixed.ndim), dtype=dtype)
    template = fixed.like(warp_through(moving_n, fixed, init, zero, backend).astype(dtype))
    mmask_t = None
    if mmask is not None:
        mw = warp_through(moving.like(np.asarray(mmask, dtype=dtype)), fixed, init, zero, backend)
        mmask_t = mw > 0.5
        if not mmask_t.any():
            raise ValueError("moving_mask does not overlap the fixed image after init; check init or the mask")
    return fixed_n, template, mmask_t


def _run_levels(fixed_n, template, fmask, mmask_t, schedule, opts, prog, ssd_before, source=None) -> dict:
    """The pyramid: :func:`.step.level_step` on every level. Returns the final ``P0`` (fixed grid), the time steps
    reached, the levels' summaries, whether a callback stopped the run, convergence and the stop reason.
    ``source``: the intensity source of register_metamorphosis (see :func:`.step.level_step`; "full" only)."""
    levels = []
    stopped = False
    try:
        prog.emit("start", metric=ssd_before)

        def step(level, state, progress_):
            if opts["method"] == "bandlimited":
                levels.append(level_step_bandlimited(level, state, progress_, opts, fixed_n))
            else:
                levels.append(level_step(level, state, progress_, opts, source=source))

        state, stopped = multiresolution(fixed_n, template, step, fixed_mask=fmask, moving_mask=mmask_t,
                                         progress=prog, backend=opts["backend"], **schedule)
    except StopRegistration:  # raised by the "start" event
        state, stopped = {}, True
    stop_reason, converged = "", True
    if stopped:
        stop_reason, converged = prog.stop_reason, False
    elif levels:
        converged = bool(levels[-1]["converged"])
        stop_reason = f"finest level: {levels[-1]['message']}"
    P0 = state.get("P0")
    if opts["method"] == "bandlimited":
        P0 = state["z"].z if state.get("z") is not None else None
    elif P0 is None or P0.shape != fixed_n.shape:
        P0 = get_array_module(fixed_n.data).zeros(fixed_n.shape, dtype=opts["dtype"])
    return {"P0": P0 if P0 is None else get_array_module(P0).asarray(P0, dtype=opts["dtype"]),
            "n_steps": int(state.get("n_steps", opts["n_steps"])),
            "levels": levels, "stopped": stopped, "converged": converged, "stop_reason": stop_reason}


def _final_shooting(fixed, fixed_n, template, fmask, mmask_t, run, opts):
    """Shoot the result's P₀ once more at full resolution (with the finest level's time steps, refined only if P₀
    had to be carried up to this grid): ``(shooter, φ₁⁻¹, φ₁, metrics)``, the maps as array-frame mm."""

    dtype, backend, P0 = opts["dtype"], opts["backend"], run["P0"]
    h = tuple(fixed.spacing_array_order)
    if opts["method"] == "bandlimited":
        return _final_bandlimited(fixed, fixed_n, template, fmask, mmask_t, run, opts)
    op = kernel_operator(fixed.shape, h, kernel=opts["kernel"], kernel_sigma=opts["kernel_sigma"], alpha=opts["alpha"],
                         order=opts["order"], backend=backend)
    data = data_term(opts, fixed_n.data.astype(dtype), fmask, mmask_t, h, template=template.data)
    n_final = min(opts["max_steps"], max(opts["n_steps"], run["n_steps"]))
    shooter, n_final, (energy, reg, dat, path, _), _ = stable_start(
        lambda n: GeodesicShooting(template.data, h, op, n, dtype=dtype, backend=backend), P0, data, n_final,
        opts["max_steps"])
    inv_mm, fwd_mm = shooter.maps(P0, path)
    metrics = result_metrics(fixed_n, fmask, path.I1, inv_mm, fwd_mm, h, energy, reg, dat, n_final, path.stability,
                             path.max_step, run["levels"], backend)
    return shooter, inv_mm, fwd_mm, metrics


def result_metrics(fixed_n, fmask, I1, inv_mm, fwd_mm, h, energy, reg, dat, n_steps, stability, max_step, levels,
                   backend) -> dict:
    """The metrics of a shot result (LDDMM, both methods, and metamorphosis): energy terms, geodesic length, SSD of
    ``I1``, min det J of φ₁⁻¹, max |φ₁∘φ₁⁻¹ − id| in voxels, time steps, stability and the optimiser's counts."""
    from ...kernels.diff import jacobian_determinant
    from ...kernels.fields import compose

    back = compose(fwd_mm, inv_mm, spacing=np.asarray(h), backend=backend)  # φ₁∘φ₁⁻¹ − id
    xp = get_array_module(back)
    return {"geodesic_length": math.sqrt(max(0.0, 2.0 * reg)), "energy": energy, "data_term": dat,
            "regularization": reg, "ssd_after": mean_sq(fixed_n.data, I1, fmask),
            "min_det": float(np.min(jacobian_determinant(inv_mm, spacing=h, backend=backend))),
            "inverse_error_voxels": float(xp.max(xp.sqrt(xp.sum((back / xp.asarray(h)) ** 2, axis=-1)))),
            "time_steps": int(n_steps), "stability": float(stability), "max_step_voxels": float(max_step),
            "evaluations": int(sum(i["evaluations"] for i in levels)),
            "iterations": int(sum(i["iterations"] for i in levels))}


def _final_bandlimited(fixed, fixed_n, template, fmask, mmask_t, run, opts):
    """:func:`_final_shooting` of the band-limited method: the finest level's shooting of ``z``."""
    from ...kernels.adjoint import sample_linear
    from .bandlimited import resize_coefficients
    from .bl_step import _stable, make_shooter, unfolded

    dtype, backend = opts["dtype"], opts["backend"]
    h = tuple(fixed.spacing_array_order)
    data = data_term(opts, fixed_n.data.astype(dtype), fmask, mmask_t, h, template=template.data)

    def make(n):
        return make_shooter(opts, fixed_n, fixed_n, template.data, n)

    z = run["P0"]
    probe = make(opts["n_steps"])
    z = probe.zeros() if z is None else resize_coefficients(z, probe.nc)
    n_final = min(opts["max_steps"], max(opts["n_steps"], run["n_steps"]))
    shooter, n_final, z, res, _ = _stable(make, z, data, n_final, opts["max_steps"], opts["min_det_j"])
    z, (energy, reg, dat, path, _), inv_mm = unfolded(shooter, z, data, res, opts["min_det_j"])
    run["P0"] = z
    inv_mm, fwd_mm = shooter.maps(z, path, inverse=inv_mm)
    I1 = sample_linear(template.data.astype(dtype), shooter.x + inv_mm / shooter._h, backend=backend)
    step = max(float(np.max(np.abs(w))) for w in path.w) / n_final
    metrics = result_metrics(fixed_n, fmask, I1, inv_mm, fwd_mm, h, energy, reg, dat, n_final, path.stability, step,
                             run["levels"], backend)
    return shooter, inv_mm, fwd_mm, metrics


def _trajectory(shooter, P0, moving, fixed, init, dtype, backend) -> dict:
    """The geodesic: ``I_t`` (the moving image through ``init ∘ φ_t⁻¹``) and ``v_t`` for t = k/n_t, k = 0..n_t."""
    full = shooter.forward(P0, end_velocity=True)
    images = [np.asarray(warp_through(moving, fixed, init, (u * shooter.hv).astype(dtype), backend)) for u in full.u]
    return {"trajectory_images": images, "trajectory_velocities": list(full.v) + [full.v_end]}


def _trajectory_bandlimited(shooter, z, moving, fixed, init, dtype, backend) -> dict:
    """:func:`_trajectory` of the band-limited method."""
    maps, velocities = shooter.trajectory(z)
    images = [np.asarray(warp_through(moving, fixed, init, u.astype(dtype), backend)) for u in maps]
    return {"trajectory_images": images, "trajectory_velocities": velocities}


def _params(opts, schedule, levels, *, intensity, intensity_used, return_trajectory, init, seed) -> dict:
    """``Result.params``: the resolved options (kernel parameters only for the kernel used), the time steps per
    level, the optimiser and integrator, and :func:`~classreg.solvers._common.common_params`."""
    gaussian, sobolev = opts["kernel"] == "gaussian", opts["kernel"] == "sobolev"
    band = opts["method"] == "bandlimited"
    if band:
        from .bl_step import STABILITY_TARGET as target

        integrator = ("band-limited EPDiff (explicit Euler, spectral, 2/3-rule dealiasing) on the frequencies where "
                      f"K^ >= {opts['cutoff']}; inverse map traced along characteristics on the map grid; adaptive "
                      f"time steps (dt*max|Dv| <= {target})")
    else:
        integrator = f"semi-Lagrangian, map composition, adaptive time steps (dt*max|Dv| <= {STABILITY_TARGET})"
    return dict(metric=opts["metric"], kernel=opts["kernel"], kernel_sigma=opts["kernel_sigma"] if gaussian else None,
                alpha=opts["alpha"] if sobolev else None, order=opts["order"] if sobolev else None,
                data_sigma=opts["data_sigma"], n_steps=opts["n_steps"], max_steps=opts["max_steps"],
                method=opts["method"], cutoff=opts["cutoff"] if band else None,
                map_spacing=opts["map_spacing"] if band else None, min_det_j=opts["min_det_j"] if band else None,
                frequencies=[i.get("band") for i in levels] if band else None,
                time_steps=[int(i["n_steps"]) for i in levels], **schedule, tol=opts["tol"],
                lncc_radius=opts["lncc_radius"] if opts["metric"] == "lncc" else None, intensity=intensity,
                intensity_used=intensity_used, return_trajectory=bool(return_trajectory),
                optimizer="L-BFGS (memory 10), monotone Armijo backtracking, trust region on the initial velocity "
                          "(classreg.optimise)",
                integrator=integrator,
                **common_params(init=init, dtype=opts["dtype"], seed=seed, backend=opts["backend"]))
