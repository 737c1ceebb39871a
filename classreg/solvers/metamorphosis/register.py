"""``register_metamorphosis``: weighted metamorphosis by geodesic shooting of the initial momentum.

The image path is a deformation plus an intensity source restricted by a time-varying weight ``M_t ∈ [0, 1]``
(A. François et al., WBIR 2022, Theorem 1)::

    v_t = −K⋆(P_t ∇I_t),   ∂_t P_t = −∇·(P_t v_t),   ∂_t I_t = −⟨∇I_t, v_t⟩ + ν M_t P_t,   ν = μ²/ρ

written in the image momentum ``P`` (the paper's residual is ``z = (μ/ρ) P``, so ``μ M z = ν M P`` and
``½‖v‖²_V + ½ρ‖z‖²_M = ½⟨P∇I, K⋆(P∇I)⟩ + ½ν⟨P, M P⟩``). The shooting, its exact adjoint, the pyramid level with
L-BFGS and adaptive time steps are register_lddmm's full-grid engine (:mod:`..lddmm.shooting`, :mod:`..lddmm.step`)
with its intensity-source hook; this module builds the mask schedule (:mod:`.masks`), runs the pyramid, shoots the
result once more at full resolution and builds the :class:`~classreg.Result`.
"""
from __future__ import annotations

import time

import numpy as np

from ...backend import placement, to_device, to_numpy
from ...image import Image, as_mask
from ...options import declared
from ...progress import Progress, StopRegistration
from ...pyramid import check_schedule
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
    tiny_like,
    warm_key,
)
from ..lddmm.objective import data_term
from ..lddmm.operators import kernel_operator
from ..lddmm.register import (
    _resolve,
    _resolve_intensity,
    _run_levels,
    _template,
    result_metrics,
)
from ..lddmm.shooting import GeodesicShooting
from ..lddmm.step import STABILITY_TARGET, stable_start
from .masks import MaskSchedule
from .options import OPTIONS

__all__ = ["register_metamorphosis"]

#: the times of the images kept in ``extras["trajectory"]`` (and shown by the QC figure)
TRAJECTORY_TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)


@declared(OPTIONS)
def register_metamorphosis(fixed: Image, moving: Image, *, init: Transform | None = None, mask=None,
                           mask_evolution="grow", mu: float = 0.2, rho: float = 1.0, fixed_mask=None,
                           moving_mask=None, metric: str = "ssd", shrink_factors=(4, 2, 1), smoothing_sigmas=None,
                           iterations=(40, 40, 30), kernel_sigma=None, data_sigma: float = 0.05,
                           n_steps: int = 10, max_steps: int | None = None, tol: float = 1e-5,
                           intensity: str = "auto", return_trajectory: bool = False, dtype=np.float32, seed: int = 0,
                           threads: int | None = None, memory_limit: float | None = None,
                           time_limit: float | None = None, device: str | None = None, backend=None,
                           progress: bool = False, callback=None) -> Result:
    """Register ``moving`` (e.g. a healthy template) to ``fixed`` (e.g. a scan with a lesion) by weighted
    metamorphosis: a diffeomorphism plus intensity added only where the weight ``M_t`` is set.

    The geodesic (t ∈ [0, 1], I₀ the moving image through ``init`` on the fixed grid) follows Theorem 1 of François
    et al. (2022)::

        v_t = −(ρ/μ) K⋆(z_t ∇I_t),   ∂_t z_t = −∇·(z_t v_t),   ∂_t I_t = −⟨∇I_t, v_t⟩ + μ M_t z_t

    shot from the initial residual z₀ (optimised as the momentum ``P₀ = (ρ/μ) z₀``). The energy minimised is
    ``E = ½‖v₀‖²_V + ½ρ‖z₀‖²_{M₀} + D(I₁)`` with ``D = (1/2σ²)‖I₁ − J‖²`` (J the fixed image) and every norm a
    physical integral (voxel sums times Π h): λ, ρ and σ do not depend on the resolution. ``M ≡ 1`` (no ``mask``)
    is classical metamorphosis (Trouvé & Younes 2005); ``mu = 0`` is LDDMM (``register_lddmm(method="full")``).
    Only ρ/μ² enters the path: the cost of adding intensity against deforming.

    Parameters
    ----------
    fixed, moving : Image
        2-D or 3-D scalar images in physical space.
    init : Affine or Chain of affines, optional
        Initial fixed → moving transform; the deformation is estimated on top of it.
    mask : Image or array, optional
        Where intensity may be added (e.g. the lesion and its oedema), on the fixed image's grid, values in [0, 1]
        (binary masks are fine). None: everywhere (classical metamorphosis).
    mask_evolution : {"grow", "constant"} or sequence of masks
        "grow" (default): ``M_t`` are the images along the LDDMM geodesic from a small smoothed ball at the mask's
        centroid to the mask (the paper's construction: the lesion grows from a seed); "constant": ``M_t = mask``;
        a sequence of masks (with ``mask=None``): ``M(t_j)`` at evenly spaced ``t_j = j/(F − 1)``, linear between.
    mu : float
        μ ≥ 0, weight of the intensity source (dimensionless; 0 gives LDDMM).
    rho : float
        ρ > 0 in mm², weight of the residual norm ``ρ‖z‖²_M``. The path depends on ρ/μ² (mm²): the price of adding
        intensity. Adding a full-contrast change ΔI = 1 over a volume V costs about ``½ (ρ/μ²) V``; leaving it costs
        ``½ V/σ²`` of data term, so ρ/μ² well below 1/σ² lets the source explain what deformation cannot.
    fixed_mask, moving_mask : Image or array, optional
        The data term counts only inside them (as in ``register_lddmm``).
    metric : {"ssd", "lncc"}
        Data term (the method's is SSD).
    shrink_factors, smoothing_sigmas, iterations
        Pyramid (coarsest first) and L-BFGS iterations per level. The mask schedule is resampled on each level.
    kernel_sigma : float or sequence of float, optional
        σ of the Gaussian kernel K in mm (default 3 × the largest spacing of ``fixed``). A sequence of σ gives the
        multi-scale kernel K = (1/n) Σᵢ G_σᵢ, an equally weighted sum of unit-sum Gaussians (L. Risser et al.,
        "Simultaneous multi-scale registration using large deformation diffeomorphic metric mapping", IEEE TMI
        30(10):1746-1759, 2011; the weights of François et al.'s code, whose 2-D toy uses σ ∈ {5, 15} px).
    data_sigma : float
        σ of the SSD in normalised intensity units ([0, 1] over the fixed image's 0.5-99.5 percentiles).
    n_steps, max_steps : int
        Time steps of the geodesic at the finest level (the minimum; raised while ``δt·max‖Dv‖_F > 0.1``) and their
        upper bound (default 4 × ``n_steps``).
    tol : float
        Relative energy decrease at or below which a level stops.
    intensity : {"auto", "joint", "match"}
        Intensity normalisation, as in ``register_lddmm``. "match" histogram-matches the moving image first.
    return_trajectory : bool
        Also keep ``I_t`` (t = k/n_t, normalised intensities) in ``extras["trajectory_images"]``.
    dtype, seed, threads, memory_limit, time_limit, device, backend, progress, callback
        As in ``register_lddmm`` (deterministic on the CPU). With ``device="cuda"`` (or CuPy images) the mask
        schedule is built on the host, its frames go to the device once with the normalised images, and the
        pyramid, shootings with the source, adjoint sweeps and L-BFGS stay there (docs/gpu.md);
        ``return_trajectory`` is CPU-only.

    Returns
    -------
    Result
        ``transform`` = φ₁⁻¹ (the deformation only, fixed → moving, chained with ``init``), ``inverse`` = φ₁, both
        from the flow; ``warped`` = the moving image through the deformation only; ``extras``: ``final_image`` (the
        end of the metamorphosis path I₁, deformation and added intensity), ``added_intensity`` (R₁ = I₁ − I₀∘φ₁⁻¹),
        ``residuals`` (z_t, t = k/n_t, as one vector image), ``mask_frames`` (M_t as used), ``trajectory`` (I_t at
        t = 0, ¼, ½, ¾, 1, one vector image; the QC figure shows them), all Images on the fixed
        grid in the moving image's intensity units (per unit time for z), saved by :meth:`Result.save`, and ``P0``;
        ``metrics``: ``ssd_before``, ``ssd_after`` (of I₁), ``ssd_deformation`` (of the deformation-only image; all
        mean squared normalised differences), ``added_intensity`` (RMS of R₁, normalised), ``added_outside_mask``
        (fraction of ∫|R₁| where M₁ < 0.05), ``geodesic_length`` ((‖v₀‖²_V + ρ‖z₀‖²_{M₀})^½), ``energy``,
        ``data_term``, ``regularization``, ``min_det``, ``inverse_error_voxels``, ``time_steps``, ``iterations``.

    References
    ----------
    A. François, M. Maillard, C. Oppenheim, J. Pallud, I. Bloch, P. Gori, J. Glaunès, "Weighted metamorphosis for
    registration of images with different topologies", WBIR 2022, LNCS 13386:8-17, doi:10.1007/978-3-031-11203-4_2
    (Theorem 1, eqs. 5-9).
    A. Trouvé, L. Younes, "Metamorphoses through Lie group action", Found. Comput. Math. 5:173-198, 2005,
    doi:10.1007/s10208-004-0128-z.
    F.-X. Vialard, L. Risser, D. Rueckert, C. J. Cotter, IJCV 97:229-241, 2012 (the shooting and its adjoint).
    """
    t_start = time.perf_counter()
    check_pair(fixed, moving)
    dev, backend = placement(device, backend, fixed.data, moving.data)
    if dev == "cuda" and return_trajectory:
        raise ValueError("register_metamorphosis: return_trajectory runs on the CPU only; use device='cpu'")
    fixed, moving = fixed.to("cpu"), moving.to("cpu")  # the host sees the inputs once (no copy for numpy data)
    host_backend = None if dev == "cuda" else backend  # what runs before the loop (the mask schedule, I₀)
    init = check_init(init, fixed.ndim)
    check_overlap(fixed, moving, init)
    memory_mb = check_memory("metamorphosis", fixed, moving, dtype, memory_limit,
                             fix=", use fewer time steps (n_steps)")
    dtype = np.dtype(dtype)
    if mask is None and isinstance(mask_evolution, str) and mask_evolution not in ("grow", "constant"):
        raise ValueError(f"mask_evolution must be 'grow', 'constant' or a sequence of masks, got {mask_evolution!r}")
    opts = _resolve(fixed, moving, metric=metric, kernel="gaussian", kernel_sigma=kernel_sigma, alpha=None,
                    order=2.0, data_sigma=data_sigma, n_steps=n_steps, max_steps=max_steps, tol=tol,
                    lncc_radius=None, dtype=dtype, backend=backend, method="full")
    schedule = dict(zip(("shrink_factors", "smoothing_sigmas", "iterations"),
                        check_schedule(shrink_factors, smoothing_sigmas, iterations, fixed.spacing)))
    fmask = as_mask(fixed_mask, fixed, "fixed_mask")
    mmask = as_mask(moving_mask, moving, "moving_mask")
    t_mask = time.perf_counter()
    masks = MaskSchedule.build(mask, mask_evolution, fixed, dtype=dtype, backend=host_backend)
    t_mask = time.perf_counter() - t_mask
    nu = float(mu) ** 2 / float(rho)
    intensity_used = _resolve_intensity(intensity, fixed, moving, fmask, mmask)
    fixed_n, template, mmask_t = _template(fixed, moving, init, fmask, mmask, intensity_used, dtype, host_backend)
    ssd_before = mean_sq(fixed_n.data, template.data, fmask)
    host_masks = masks
    if dev == "cuda":  # the working images and the mask frames go to the device once; the loop keeps them there
        fixed_n, template, masks = fixed_n.to(dev), template.to(dev), masks.to(dev)
        fmask = None if fmask is None else to_device(fmask, dev)
        mmask_t = None if mmask_t is None else to_device(mmask_t, dev)

    def source(level, n):
        if nu == 0.0:
            return {}
        return {"source_mu": nu, "source_weights": masks.weights(level.fixed, level.shrink, n, dtype)}

    def warm_up():  # the same kernels on a tiny pair, before the bar (progress=True only)
        f, m, fm, mm = tiny_like(fixed, moving)
        register_metamorphosis(f, m, mu=mu, rho=rho, fixed_mask=None if fixed_mask is None else fm,
                               moving_mask=None if moving_mask is None else mm, metric=metric, intensity=intensity,
                               dtype=dtype, backend=backend, shrink_factors=(2, 1), iterations=(2, 2), n_steps=4,
                               device=None if dev == "cpu" else dev)

    prog = Progress("metamorphosis", callback=callback, progress=progress, time_limit=time_limit,
                    total=int(sum(schedule["iterations"])), warm_up=warm_up,
                    warm_key=warm_key(fixed, moving, metric, intensity, dtype.name, backend, fixed_mask is None,
                                      moving_mask is None))
    run = _run_levels(fixed_n, template, fmask, mmask_t, schedule, opts, prog, ssd_before, source=source)
    t_fin = time.perf_counter()
    shooter, path, inv_mm, fwd_mm, metrics = _final(fixed, fixed_n, template, fmask, mmask_t, run, opts, masks, nu)
    metrics["ssd_before"] = ssd_before
    extras = _outputs(shooter, path, run["P0"], fixed, fixed_n, host_masks, mu, rho, return_trajectory)
    inv_mm, fwd_mm = to_numpy(inv_mm), to_numpy(fwd_mm)  # the result comes to the host once
    xp = shooter.xp  # the added-intensity metrics where R is (scalar reads)
    outside = masks.at(1.0) < 0.05
    absR = xp.abs(xp.asarray(path.R[-1], dtype=np.float64)) if path.R else xp.zeros(fixed.shape)
    metrics["added_intensity"] = float(xp.sqrt(xp.mean(absR ** 2)))
    metrics["added_outside_mask"] = float(absR[outside].sum() / absR.sum()) if absR.sum() > 0 else 0.0
    timings = {"total": time.perf_counter() - t_start, "mask_schedule": t_mask,
               "final_shooting": time.perf_counter() - t_fin, "levels": [i["seconds"] for i in run["levels"]],
               **prog.timings}
    params = _params(opts, schedule, run["levels"], masks, mask=mask, mask_evolution=mask_evolution, mu=mu, rho=rho,
                     nu=nu, intensity=intensity, intensity_used=intensity_used, return_trajectory=return_trajectory,
                     init=init, seed=seed)
    params["memory_estimate_mb"] = memory_mb
    if not run["stopped"]:
        try:
            prog.emit("done", metric=metrics["ssd_after"], regularization=metrics["regularization"],
                      extra={"ssd_deformation": metrics["ssd_deformation"]})
        except StopRegistration:
            pass
    prog.close()
    return field_result(fixed, moving, init, inv_mm, fwd_mm, history=prog.history, converged=run["converged"],
                        stop_reason=run["stop_reason"], params=params, metrics=metrics, timings=timings,
                        extras=extras)


def _final(fixed, fixed_n, template, fmask, mmask_t, run, opts, masks, nu):
    """Shoot the result's P₀ once more at full resolution with the source: ``(shooter, path, φ₁⁻¹, φ₁, metrics)``,
    the maps as array-frame mm."""
    from ...kernels.adjoint import sample_linear

    dtype, backend, P0 = opts["dtype"], opts["backend"], run["P0"]
    h = tuple(fixed.spacing_array_order)
    op = kernel_operator(fixed.shape, h, kernel="gaussian", kernel_sigma=opts["kernel_sigma"], backend=backend)
    data = data_term(opts, fixed_n.data.astype(dtype), fmask, mmask_t, h)

    def make(n):
        src = {} if nu == 0.0 else {"source_mu": nu, "source_weights": masks.weights(fixed, 1.0, n, dtype)}
        return GeodesicShooting(template.data, h, op, n, dtype=dtype, backend=backend, **src)

    n_final = min(opts["max_steps"], max(opts["n_steps"], run["n_steps"]))
    shooter, n_final, (energy, reg, dat, path, _), _ = stable_start(make, P0, data, n_final, opts["max_steps"])
    inv_mm, fwd_mm = shooter.maps(P0, path)
    deformed = sample_linear(shooter.I0, path.X1, backend=backend)
    metrics = result_metrics(fixed_n, fmask, path.I1, inv_mm, fwd_mm, h, energy, reg, dat, n_final, path.stability,
                             path.max_step, run["levels"], backend)
    metrics.update(source_cost=shooter.source_cost(P0), ssd_deformation=mean_sq(fixed_n.data, deformed, fmask))
    return shooter, path, inv_mm, fwd_mm, metrics


def _outputs(shooter, path, P0, fixed, fixed_n, masks, mu, rho, return_trajectory) -> dict:
    """The extras: final image, added intensity, residuals z_t and the mask frames as Images on the fixed grid, in
    the moving image's intensity units (the normalisation undone), and P₀."""
    from ...kernels.adjoint import sample_linear
    from ...kernels.diff import jacobian_determinant

    xp = shooter.xp  # the path is on the shooter's device: each extra comes to the host once, as it is stored
    f = np.asarray(fixed.numpy(), dtype=np.float64)
    fn = xp.asarray(fixed_n.data, dtype=np.float64)
    span = float(np.ptp(f)) / float(xp.ptp(fn))  # original units per normalised unit
    lo = float(f.min()) - float(fn.min()) * span
    dtype = shooter.dtype
    R1 = path.R[-1] if path.R else xp.zeros(fixed.shape, dtype=dtype)
    residuals = []
    for k, u in enumerate(path.u):
        if k == 0:
            P = xp.asarray(P0, dtype=dtype)
        else:
            det = jacobian_determinant(u, spacing=1.0, backend=shooter.backend)
            P = det * sample_linear(xp.asarray(P0, dtype=dtype), shooter.x + u, backend=shooter.backend)
        residuals.append((float(mu) / float(rho)) * span * P)
    out = {"final_image": fixed.like((np.asarray(to_numpy(path.I1), np.float64) * span + lo).astype(np.float32)),
           "added_intensity": fixed.like((np.asarray(to_numpy(R1), np.float64) * span).astype(np.float32)),
           "residuals": fixed.like(to_numpy(xp.stack(residuals, axis=-1)).astype(np.float32), vector=True),
           "mask_frames": fixed.like(np.stack(masks.frames, axis=-1).astype(np.float32), vector=True),
           "P0": to_numpy(P0)}
    def image_at(k):  # I_{t_k} = I₀∘φ_{t_k}⁻¹ + R_{t_k}, normalised units
        Ik = sample_linear(shooter.I0, shooter.x + path.u[k], backend=shooter.backend)
        return Ik + path.R[k] if path.R else Ik

    n_t = len(path.u) - 1
    picks = sorted({int(round(q * n_t)) for q in TRAJECTORY_TIMES})
    out["trajectory"] = fixed.like(np.stack([np.asarray(to_numpy(image_at(k)), np.float64) * span + lo
                                             for k in picks], axis=-1).astype(np.float32), vector=True)
    if return_trajectory:
        out["trajectory_images"] = [image_at(k) for k in range(n_t + 1)]
    return out


def _params(opts, schedule, levels, masks, *, mask, mask_evolution, mu, rho, nu, intensity, intensity_used,
            return_trajectory, init, seed) -> dict:
    """``Result.params``: the resolved options, the mask schedule used, the time steps per level, the optimiser and
    integrator, and :func:`~classreg.solvers._common.common_params`."""
    evolution = mask_evolution if isinstance(mask_evolution, str) else f"sequence of {len(masks.frames)} masks"
    return dict(mask="given" if mask is not None else None,
                mask_evolution=evolution if (mask is not None or not isinstance(mask_evolution, str)) else None,
                mask_frames=len(masks.frames), mask_growth_coverage=masks.coverage, mu=float(mu), rho=float(rho),
                source_weight=nu,
                method="weighted metamorphosis" if (mask is not None or not isinstance(mask_evolution, str))
                else "classical metamorphosis", metric=opts["metric"], kernel="gaussian",
                kernel_sigma=opts["kernel_sigma"], data_sigma=opts["data_sigma"], n_steps=opts["n_steps"],
                max_steps=opts["max_steps"], time_steps=[int(i["n_steps"]) for i in levels], **schedule,
                tol=opts["tol"], intensity=intensity, intensity_used=intensity_used,
                return_trajectory=bool(return_trajectory),
                optimizer="L-BFGS (memory 10), monotone Armijo backtracking, trust region on the initial velocity "
                          "(classreg.optimise)",
                integrator="semi-Lagrangian, map composition, intensity source transported with the flow, adaptive "
                           f"time steps (dt*max|Dv| <= {STABILITY_TARGET})",
                **common_params(init=init, dtype=opts["dtype"], seed=seed, backend=opts["backend"]))
