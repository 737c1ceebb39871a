"""``register_vp``: registration with prescribed Jacobian determinant and curl (variational principle).

Zhou & Liao (WBIR 2022; METHODS.md §6): the map ``φ = id + u`` solves ``Δu = ∇f − ∇×g`` with ``u = 0`` on the
boundary (DST-I), ``f = j_min + f̂²`` controls the Jacobian determinant and ``g`` the curl. The discrete loss
``½ Π h Σ w (I_m∘φ − I_f)²`` and its exact gradient w.r.t. ``(f̂, g)`` are :func:`classreg.kernels.vp.vp_loss_grad`;
across intensity scales (``metric="auto"``) the data term is mutual information instead (:class:`_MIData`).

Optimiser: L-BFGS (scipy's L-BFGS-B without bounds) on ``(f̂, g)`` with the exact gradient; its line search
(Moré-Thuente) is a safeguarded backtracking search, and a trial point whose map folds on the grid is given a loss
larger than the current one, so the search shrinks the step. A round ends when min det J drops below
``regrid_det``; then the map is composed into ``Φ_total`` (regridding), the moving image is resampled through it and
the controls are reset (METHODS.md §6.2 step 7). Coarse-to-fine on :func:`classreg.pyramid.multiresolution`.
``Φ_total`` is kept on the padded grid of the level, where every round's map is a bijection of the padded box.

On the GPU (``device="cuda"`` or CuPy images) the same code runs as array-module code on the device, with the
shared L-BFGS of :func:`classreg.optimise.minimise` in place of scipy's (whose iterate lives on the host); only
scalars cross inside the loop (docs/gpu.md).

Inverse: each round's map is inverted on its padded box by damped Newton iteration
(:func:`classreg.kernels.vp.invert_newton`), composed into ``Ψ ← φ_r⁻¹ ∘ Ψ`` and Newton-corrected against
``Φ_total`` (docs/solvers/vp.md says why this and not the paper's VP construction of the inverse, §6.2 step 9).
"""
from __future__ import annotations

import time

import numpy as np

from ...backend import placement, to_device, to_numpy
from ...image import Image, as_mask
from ...kernels._backend import get_array_module
from ...options import declared
from ...progress import Progress, StopRegistration, similarity
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
    resolve_auto_metric,
    warp_through,
)
from ..lddmm.objective import MI_EPS
from .options import OPTIONS

__all__ = ["register_vp"]

#: Default ``det_floor``: trial points whose map (this round's or the composed one) has min det J at or below this
#: are rejected. 0.05 is the plausibility floor of issue #22 (no voxel compressed more than 20-fold), the floor of
#: register_demons and register_lddmm too; any floor > 0 also keeps the float32 result at det J > 0 (with a floor of 0
#: the J-to-V benchmark ended with two nodes at det J = -6e-6, docs/notes/vp.md).
DET_FLOOR = 0.05

#: Default L-BFGS iterations per pyramid level and ``control_sigma`` (in units of the smallest input spacing), per
#: data term. VP's loss has no smoothness term: the Gaussian preconditioning of the controls sets the scale of each
#: update and the iteration count how far the map goes. These are the settings of the sweep in
#: docs/notes/tradeoff.md (session 24) that no peer dominates on any of the page's cases: SSD (the one-scale cases,
#: synth3d's smooth known deformation among them) needs the smoothing; MI (the inter-subject cases across intensity
#: scales) loses Dice with it. The paper's experiments (benchmarks/vp.py) give their own, longer schedules.
ITERATIONS = {"ssd": 15, "mi": 10}
CONTROL_SIGMA = {"ssd": 3.0, "mi": 0.0}

#: Fixed-point passes of the VP-constructed inverse (``inverse="vp"``): the prescribed det and curl are evaluated at
#: the previous pass's inverse estimate; and the L-BFGS iterations of the grid generator per pass.
VP_INVERSE_PASSES = 4
#: Parzen bins of the "mi" data term (its entropy smoothing is register_lddmm's MI_EPS)
MI_BINS = 32
VP_INVERSE_ITERATIONS = 150

#: Newton tolerance (voxels, per-node residual |φ(x + w) − x| / h) of the per-round and the final inversions.
INVERSE_TOL = 1e-3


#: The L-BFGS of host (numpy) data: "scipy" (L-BFGS-B, the default) or "shared" (:func:`classreg.optimise.minimise`,
#: what device data always use: scipy's needs the iterate on the host). "shared" on the CPU computes what the device
#: computes (the residency tests compare the two).
HOST_OPTIMISER = "scipy"

#: Initial trust radius (largest change of a control f̂ or g in one step) of the shared L-BFGS.
SHARED_RADIUS = 0.05


def _vp_backend(backend):
    return "numpy" if backend == "numpy" else None


def _ndimage(xp):
    """scipy.ndimage for numpy data, cupyx.scipy.ndimage for CuPy data."""
    if xp is np:
        import scipy.ndimage as ndi
    else:
        import cupyx.scipy.ndimage as ndi
    return ndi


def _host(value):
    """``value`` with every CuPy array in it (dicts and lists included) copied to the host."""
    if isinstance(value, dict):
        return {k: _host(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_host(v) for v in value]
    return value if value is None or isinstance(value, (int, float, str, tuple)) else to_numpy(value)


def _compose_inverse(psi, v_pad, h, pad):
    """``φ_r⁻¹ ∘ Ψ`` on the level grid: ``Ψ(y) + v(y + Ψ(y))``, ``v`` (the round's inverse) on the padded grid."""
    return psi + _sample(v_pad, psi, h, pad)


@declared(OPTIONS)
def register_vp(fixed: Image, moving: Image, *, init: Transform | None = None, fixed_mask=None,
                metric: str = "auto", shrink_factors=(4, 2, 1), smoothing_sigmas=None, iterations=None,
                j_min: float = 0.5,
                regrid_det: float = 0.5, det_floor: float = DET_FLOOR, control_sigma: float | None = None,
                inverse: str = "newton",
                max_regrids: int = 30, pad: int = 8, tol: float = 1e-6,
                intensity: str = "match", dtype=np.float32, seed: int = 0, threads: int | None = None,
                memory_limit: float | None = None, time_limit: float | None = None, device: str | None = None,
                backend=None, progress: bool = False, callback=None) -> Result:
    """Register ``moving`` to ``fixed`` with the variational principle (prescribed Jacobian determinant and curl).

    Parameters
    ----------
    fixed, moving : Image
        2-D or 3-D scalar images in physical space (any grids, spacings and orientations).
    init : Affine or Chain, optional
        Initial fixed → moving transform; the deformation is estimated on top of it.
    fixed_mask : Image or array, optional
        The loss is summed only inside this mask (every level).
    metric : {"auto", "ssd", "mi"}
        Data term: "ssd", the paper's ``½ Π h Σ (I_m∘φ − I_f)²`` of the normalised images; "mi", ``Π h N (log B −
        MI(I_f, I_m∘φ))``, Mattes mutual information (``B`` = 32 bins, elastix's Parzen windows, histogram limits
        fixed per regridding round, entropies smoothed as register_lddmm's; D. Mattes et al., IEEE TMI
        22(1):120-128, 2003) below its largest possible value ``log B``, so the loss stays ≥ 0 as the SSD's;
        "auto" (default): "ssd" when the two images are on one intensity scale
        (:func:`classreg.solvers._common.same_intensity_scale`), else "mi"; on the device, which has no MI term,
        "ssd". VP has no data weight to set: each round minimises the loss relative to its start.
    shrink_factors, smoothing_sigmas, iterations
        The pyramid (coarsest first); ``iterations``: L-BFGS iterations per level over all its regridding rounds
        (default ``ITERATIONS``: 15 per level with "ssd", 10 with "mi").
    control_sigma : float, optional
        σ (mm at full resolution; scales with the level's shrink factor) of the Gaussian ``K`` that preconditions
        the controls: the optimiser works on ``c`` with ``f̂ = f̂₀ + K c_f`` and ``g = K c_g``, so every update of
        the controls is smooth on the scale σ (a Sobolev-type gradient, the exact gradient w.r.t. ``c`` being ``K``
        times the controls' gradient; ``K`` is symmetric, zero extension). Default ``CONTROL_SIGMA`` × the
        smallest spacing: 3 with "ssd", 0 with "mi"; 0 optimises the controls themselves (the paper's).
    j_min : float
        Lower bound of the control ``f = j_min + f̂²`` (0 ≤ j_min < 1; the paper's 0.5). It bounds ∇·φ's control,
        not det J itself (METHODS.md §6.6), so det J is monitored and the map regridded.
    regrid_det : float
        A round ends, and the map is regridded, when its min det J (central differences) falls below this.
    det_floor : float
        The min det J (central differences, mm) the result keeps: a trial step whose map, or whose composition with
        the map so far, has min det J at or below this is rejected by the line search, and at a level transfer the
        coarser levels' rounds are re-composed on the finer grid, dropping the trailing rounds whose composition
        falls to it there (``metrics["dropped_rounds"]``).
    inverse : {"newton", "vp"}
        How ``Result.inverse`` is built: "newton" (default) the per-round Newton inverses, Newton-corrected against
        the final map; "vp" the paper's construction (METHODS.md §6.2 step 9): the VP grid generator
        (:func:`classreg.kernels.vp.vp_grid_loss_grad`) fits a VP map to the prescribed Jacobian determinant
        ``1 / det Dφ`` and curl of ``(Dφ)⁻¹``, both evaluated at the current inverse estimate, in
        ``VP_INVERSE_PASSES`` fixed-point passes (docs/solvers/vp.md; figures in docs/notes/vp.md).
    max_regrids : int
        Regridding rounds per level at most.
    pad : int
        Nodes of edge-replicated padding on every side of the level grid; the Dirichlet boundary (u = 0) lies on
        the padded grid's ring, and the padding is excluded from the loss.
    tol : float
        L-BFGS ``ftol`` (relative loss decrease) of a round.
    intensity : {"match", "joint"}
        "match" (default, as register_demons): histogram matching of the moving image first, then both scaled by the
        fixed image's 0.5-99.5 percentiles to [0, 1]; "joint": only that common scaling (images already on one
        scale). With "joint" on a pair whose brightness differs, SSD is lowered by shrinking the brighter structures
        (det J down to the floor), not by aligning them.
    dtype : {numpy.float32, numpy.float64}
        Storage precision of the fields; the optimisation runs in float64 (the line search needs the loss to more
        digits than float32 holds).
    seed : int
        Recorded (the algorithm is deterministic).
    device : {None, "cpu", "cuda", "cuda:N"}
        Where the registration runs (docs/gpu.md): "cuda", or CuPy-backed images with None, keep every field on the
        GPU (array-module code; the L-BFGS is then :func:`classreg.optimise.minimise` instead of scipy's L-BFGS-B,
        so the result differs from the CPU run by what the two optimisers do differently); the final inverse
        correction and the metrics are computed on the host from the result.
    threads, memory_limit, time_limit, backend, progress, callback
        As for the other solvers; ``backend`` selects the warp kernel ("numpy" or "numba"; "cuda" with a GPU).

    Returns
    -------
    Result
        ``transform`` (fixed → moving), ``inverse`` (composed per-round Newton inverses, Newton-corrected against
        the composed map; see the docs page),
        ``history`` (level, iteration, metric = loss / initial loss of the level, min det J as ``step``),
        ``metrics``: ``loss_ratio`` (SSD after / before, full resolution, in the mask), ``min_det_j``, ``max_det_j``,
        ``pct_det_j_nonpositive``, ``sd_log_j``, ``regrids``, ``dropped_rounds`` (coarse rounds dropped at level
        transfers), ``inverse_consistency_mm`` (mean, 99th percentile and max of |φ∘φ⁻¹ − id| over the nodes, φ
        on its padded grid), ``inverse_left_consistency_mm`` (mean and max of |φ⁻¹∘φ − id| over the nodes whose
        image lies in the grid, and their percentage ``pct_nodes``);
        ``extras``: ``f`` and ``g`` (the controls of the last round of the finest level) and ``controls_note``.

    References
    ----------
    Z. Zhou, G. Liao, "Construction of diffeomorphisms with prescribed Jacobian determinant and curl",
    WBIR 2022 (the variational principle and its gradients).
    """
    from ...kernels.diff import jacobian_determinant
    from ...kernels.vp import invert_newton

    t_start = time.perf_counter()
    check_pair(fixed, moving)
    if fixed.ndim not in (2, 3):
        raise ValueError(f"register_vp needs 2-D or 3-D images, got {fixed.ndim}-D")
    dev, backend = placement(device, backend, fixed.data, moving.data)
    fixed, moving = fixed.to("cpu"), moving.to("cpu")  # the host sees the inputs once (no copy for numpy data)
    host_backend = None if dev == "cuda" else backend  # after the loop: the result is built on the host
    if inverse not in ("newton", "vp"):
        raise ValueError(f"inverse must be 'newton' or 'vp', got {inverse!r}")
    if not 0.0 <= float(j_min) < 1.0:
        raise ValueError(f"j_min must be in [0, 1), got {j_min!r}")
    init = check_init(init, fixed.ndim)
    check_overlap(fixed, moving, init)
    memory_mb = check_memory("vp", fixed, moving, dtype, memory_limit)
    dtype = np.dtype(dtype)
    if control_sigma is not None and not float(control_sigma) >= 0:
        raise ValueError(f"control_sigma must be >= 0 (mm), got {control_sigma!r}")
    fmask = as_mask(fixed_mask, fixed, "fixed_mask")
    metric = _resolve_metric(metric, fixed, moving, fmask, dev)
    sigma_mm = CONTROL_SIGMA[metric] * min(fixed.spacing) if control_sigma is None else float(control_sigma)
    its = (ITERATIONS[metric],) * len(tuple(shrink_factors)) if iterations is None else iterations
    schedule = dict(zip(("shrink_factors", "smoothing_sigmas", "iterations"),
                        check_schedule(shrink_factors, smoothing_sigmas, its, fixed.spacing)))
    fixed_n, moving_n = normalise_intensities(fixed, moving, fmask, intensity, dtype)
    moving_on_fixed = fixed_n.like(np.asarray(warp_through(moving_n, fixed_n, init, None, host_backend),
                                              dtype=dtype))
    fixed_w, moving_w, fmask_w = fixed_n, moving_on_fixed, fmask
    if dev == "cuda":  # the working images go to the device once; the loop keeps everything there
        fixed_w, moving_w = fixed_n.to(dev), moving_on_fixed.to(dev)
        fmask_w = None if fmask is None else to_device(fmask, dev)
    opts = {"metric": metric, "j_min": float(j_min), "regrid_det": float(regrid_det), "det_floor": float(det_floor),
            "inverse": inverse, "max_regrids": int(max_regrids), "pad": int(pad), "tol": float(tol), "backend": backend,
            "full_shape": tuple(fixed.shape), "control_sigma": sigma_mm,
            "control_sigma_vox": tuple(sigma_mm / float(x) for x in fixed.spacing_array_order)}
    prog = Progress("vp", callback=callback, progress=progress, time_limit=time_limit,
                    total=int(sum(schedule["iterations"])))
    acc = {"regrids": 0, "dropped_rounds": 0}
    stopped = False
    stop_reason = "completed the schedule"
    h = tuple(fixed.spacing_array_order)
    try:
        prog.emit("start", metric=1.0)

        def step(level, state, progress):
            return _level_step(level, state, progress, opts, dtype, acc)

        state, stopped = multiresolution(fixed_w, moving_w, step, fixed_mask=fmask_w, progress=prog,
                                         backend=backend, **schedule)
        if stopped:
            stop_reason = prog.stop_reason
        else:
            prog.emit("done", metric=acc.get("last_ratio"))
    except StopRegistration:
        state, stopped, stop_reason = acc.get("state", {}), True, prog.stop_reason
    finally:
        prog.close()
    # the result comes to the host once (numpy data: no copy); the final inverse and the metrics are built there
    keys = ["phi", "phi_inv", "vp_pad"]
    if state.get("vp_pad") is None or tuple(state["vp_pad"]["shape"]) != tuple(fixed.shape):
        keys.append("vp_rounds")  # the schedule ended above full resolution: the rounds make the result
    state = _host({k: state[k] for k in keys if k in state})
    acc["f"], acc["g"] = _host(acc.get("f")), _host(acc.get("g"))
    phi = state.get("phi")
    if phi is None or phi.shape[:fixed.ndim] != fixed.shape:
        phi = np.zeros((*fixed.shape, fixed.ndim), dtype=dtype)
    psi = state.get("phi_inv")
    if psi is None or psi.shape != phi.shape:
        psi = -np.asarray(phi, dtype=np.float64)
    saved = state.get("vp_pad")
    if saved is not None and tuple(saved["shape"]) == tuple(fixed.shape):
        phi_full, shift = np.asarray(saved["phi"], dtype=np.float64), int(saved["pad"])  # Φ_total, padded grid
    elif state.get("vp_rounds"):  # the schedule ended above full resolution: transferred to the input grid
        phi_full, psi, kept = _transfer(state["vp_rounds"], saved, psi, fixed_n, opts["pad"], opts["det_floor"],
                                        host_backend)
        acc["dropped_rounds"] += len(state["vp_rounds"]) - kept
        shift = opts["pad"]
        phi = phi_full[tuple(slice(shift, shift + n) for n in fixed.shape)]
    else:  # nothing accepted: the identity
        phi_full, shift = np.asarray(phi, dtype=np.float64), 0
    nodes = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in fixed.shape], indexing="ij"), -1)
    # Newton correction of the composed per-round inverses against the final map (the level transfers resample
    # Φ_total and Ψ separately, so Ψ is only close to Φ_total⁻¹ when the last level starts)
    if inverse == "vp":  # the paper's construction (METHODS.md §6.2 step 9) instead of the Newton inverse
        crop = tuple(slice(shift, shift + n) for n in fixed.shape)
        phi_inv = _vp_inverse(phi_full, h, opts["j_min"], opts["det_floor"])[crop]
    else:
        phi_inv, _ = invert_newton(phi_full, spacing=h, at=nodes + shift, init=np.asarray(psi, dtype=np.float64),
                                   tol=INVERSE_TOL, backend=_vp_backend(host_backend))
    phi = np.asarray(phi, dtype=dtype)
    phi_inv = np.asarray(phi_inv, dtype=dtype)
    psi64, phi64 = phi_inv.astype(np.float64), phi.astype(np.float64)
    # φ∘φ⁻¹ − id at every node y: Φ_total(y + Ψ(y)) + Ψ(y) (Φ_total on its padded grid)
    ic = np.linalg.norm(_sample(phi_full, psi64, h, shift) + psi64, axis=-1)
    # φ⁻¹∘φ − id at the nodes x whose image φ(x) lies in the grid (Ψ is known on the grid only)
    target = nodes + phi64 / np.asarray(h)
    inside = np.all((target >= 0) & (target <= np.asarray(fixed.shape) - 1), axis=-1)
    ic_left = np.linalg.norm(_sample(psi64, phi64, h, 0) + phi64, axis=-1)[inside]
    if ic_left.size == 0:
        ic_left = np.zeros(1)
    det = np.asarray(jacobian_determinant(phi, spacing=h, backend=host_backend), dtype=np.float64)
    warped = warp_through(moving_n, fixed_n, init, phi, host_backend)
    before = mean_sq(fixed_n.data, moving_on_fixed.data, fmask)
    after = mean_sq(fixed_n.data, warped, fmask)
    logj = np.log(np.clip(det, 1e-12, None))
    metrics = {"loss_ratio": after / before if before > 0 else 0.0, "ssd_before": before, "ssd_after": after,
               "min_det_j": float(det.min()), "max_det_j": float(det.max()),
               "pct_det_j_nonpositive": 100.0 * float(np.mean(det <= 0)),
               "sd_log_j": float(np.std(logj[det > 0])) if np.any(det > 0) else float("nan"),
               "regrids": acc["regrids"], "dropped_rounds": acc["dropped_rounds"],
               "inverse_consistency_mm": {"mean": float(ic.mean()), "p99": float(np.percentile(ic, 99)),
                                          "max": float(ic.max())},
               "inverse_left_consistency_mm": {"mean": float(ic_left.mean()), "max": float(ic_left.max()),
                                               "pct_nodes": 100.0 * float(np.mean(inside))},
               "similarity_after": similarity(fixed_n.data, warped, mask=fmask)}
    params = dict(**schedule, **{k: v for k, v in opts.items()
                                  if k not in ("backend", "full_shape", "control_sigma_vox")},
                  memory_estimate_mb=memory_mb,
                  **common_params(init=init, dtype=dtype, seed=seed, backend=backend))
    extras = {"f": acc.get("f"), "g": acc.get("g"),
              "controls_note": "f = j_min + f̂² and g of the last regridding round of the finest level (padded grid)"}
    return field_result(fixed, moving, init, phi, phi_inv, history=prog.history, converged=not stopped,
                        stop_reason=stop_reason, params=params, metrics=metrics,
                        timings={"total": time.perf_counter() - t_start, **prog.timings}, extras=extras)


def _resolve_metric(metric, fixed, moving, fmask, dev) -> str:
    """``"auto"``: "ssd" on one intensity scale, else "mi" (:func:`resolve_auto_metric`); "mi" on the device is
    refused."""
    if metric not in ("auto", "ssd", "mi"):
        raise ValueError(f"register_vp: metric must be 'auto', 'ssd' or 'mi', got {metric!r}")
    if metric == "mi" and dev == "cuda":
        raise ValueError("register_vp: metric='mi' runs on the CPU only (the Mattes MI histogram is a host "
                         "computation); use device='cpu', or metric='ssd' on the GPU")
    return resolve_auto_metric("vp", metric, "ssd", "mi", fixed, moving, fmask, device=dev)[0]


class _MIData:
    """register_vp's "mi" data term on one regridding round: ``Π h N (log B − MI(F, W))`` over the voxels of weight
    > 0 (``N`` of them), the smoothed Mattes MI of :func:`classreg.terms.mattes_mi` with histogram limits fixed from
    the fixed image and the round's moving image (as elastix fixes them per resolution: constant under the line
    search). ``__call__(warped) -> (loss, ∂loss/∂warped)``, the ``data`` of :func:`classreg.kernels.vp.vp_loss_grad`."""

    def __init__(self, fixed, moving, weight, spacing):
        from ...terms import intensity_limits

        self.fixed = fixed
        self.mask = weight > 0
        self.scale = float(np.prod(spacing)) * int(self.mask.sum())
        self.limits = (intensity_limits(fixed[self.mask]), intensity_limits(moving[self.mask]))

    def __call__(self, warped):
        from ...terms import mattes_mi

        value, grad = mattes_mi(self.fixed, warped, bins=MI_BINS, mask=self.mask, gradient=True,
                                fixed_limits=self.limits[0], moving_limits=self.limits[1], eps=MI_EPS)
        return self.scale * (float(value) + np.log(MI_BINS)), self.scale * grad


def _level_step(level, state, progress, opts, dtype, acc):
    """L-BFGS rounds with regridding on one level; keeps ``state["phi"]`` (Φ_total, array frame, mm) current.

    Array-module code: with CuPy level images every field stays on their device and only scalars are read (the
    loss, min det J, the optimiser's inner products, the progress similarity, the Newton inversions' active-set
    sizes)."""
    from scipy.optimize import OptimizeResult

    from ...kernels.diff import jacobian_determinant
    from ...kernels.fields import compose
    from ...kernels.vp import invert_newton, vp_loss_grad

    backend = opts["backend"]
    xp = get_array_module(level.fixed.data)  # numpy, or cupy for data on the GPU
    Fi = xp.asarray(level.fixed.data, dtype=np.float64)
    M = xp.asarray(level.moving.data, dtype=np.float64)  # the moving image, on the fixed level grid
    nd = Fi.ndim
    h = tuple(float(x) for x in level.fixed.spacing_array_order)
    p = opts["pad"]
    phi = state.get("phi")
    if phi is None or phi.shape[:nd] != Fi.shape:
        phi = xp.zeros((*Fi.shape, nd), dtype=dtype)
    phi = xp.asarray(phi, dtype=np.float64)
    psi = state.get("phi_inv")
    psi = xp.zeros_like(phi) if psi is None or psi.shape != phi.shape else xp.asarray(psi, dtype=np.float64)
    inner = tuple(slice(p, p + n) for n in Fi.shape)
    # Φ_total is kept on the padded grid: each round's φ is a bijection of the padded box (u = 0 on its ring), so
    # Φ_total ∘ φ needs Φ_total where φ sends the image's nodes, which may be in the padding (large moves at a coarse
    # level); the edge-extended cropped map would make Φ_total differ from the composition of the rounds there.
    nodes = xp.stack(xp.meshgrid(*[xp.arange(n, dtype=np.float64) for n in Fi.shape], indexing="ij"), -1)
    rounds = list(state.get("vp_rounds", ()))
    saved = state.get("vp_pad")
    if saved is not None and tuple(saved["shape"]) == Fi.shape and np.allclose(saved["affine"], level.fixed.affine):
        phi_p = xp.asarray(saved["phi"], dtype=np.float64)
    elif rounds:  # a finer level: the coarser levels' map, or the longest prefix of their rounds, that does not fold
        phi_p, psi, kept = _transfer(rounds, saved, psi, level.fixed, p, opts["det_floor"], backend)
        acc["dropped_rounds"] += len(rounds) - kept
        rounds = rounds[:kept]
        phi = phi_p[inner]
    else:
        phi_p = xp.pad(phi, [(p, p)] * nd + [(0, 0)], mode="edge")
    keep_rounds = not (level.is_finest and Fi.shape == opts["full_shape"])  # needed by a finer grid later
    weight = xp.zeros(tuple(n + 2 * p for n in Fi.shape))
    weight[inner] = 1.0 if level.fixed_mask is None else xp.asarray(level.fixed_mask, dtype=np.float64)
    Fp = xp.pad(Fi, p, mode="edge")
    shape_p = Fp.shape
    n_ctl = Fp.size
    g_shape = shape_p if nd == 2 else shape_p + (3,)
    fhat0 = np.sqrt(1.0 - opts["j_min"])
    kw = {"weight": weight, "backend": "numpy" if backend == "numpy" else None}
    budget = level.iterations
    sim_mask = None if level.fixed_mask is None else xp.asarray(level.fixed_mask, dtype=bool)
    it_total = 0
    last_ratio = 1.0
    floor = opts["det_floor"]

    def precondition(c):
        return _precondition(c, shape_p, g_shape, opts["control_sigma_vox"], kw["backend"])

    for rnd in range(opts["max_regrids"] + 1):
        has_phi = bool(xp.any(phi_p))
        Mp = _sample(M, phi_p, h, -p) if has_phi else xp.pad(M, p, mode="edge")  # M ∘ Φ_total, clamped
        if opts["metric"] == "mi":
            kw["data"] = _MIData(Fp, Mp, weight, h)
        loss0 = vp_loss_grad(xp.full(shape_p, fhat0), xp.zeros(g_shape), Fp, Mp, opts["j_min"], h, **kw)[0]
        if loss0 <= 0 or budget - it_total <= 0:
            break
        cache = {}

        def fun(c):
            x = x0 + precondition(c)  # the controls (f̂, g); c are the optimiser's variables
            fh = x[:n_ctl].reshape(shape_p)
            g = x[n_ctl:].reshape(g_shape)
            loss, gf, gg, u, warped = vp_loss_grad(fh, g, Fp, Mp, opts["j_min"], h, **kw)
            mdet = float(xp.min(jacobian_determinant(u, spacing=h)))
            total = mdet
            if has_phi and mdet > 0:  # the composed map Φ_total ∘ φ must not fold on the grid either
                total = float(xp.min(jacobian_determinant(compose(phi_p, u, spacing=h)[inner], spacing=h)))
            vol = float(np.prod(h))
            grad = precondition(xp.concatenate([gf.ravel(), gg.ravel()])) * (vol / loss0)  # K self-adjoint
            val = loss / loss0
            if min(mdet, total) <= floor:  # a (nearly) folding trial point: larger than any accepted loss,
                val = 1.0 + abs(val) + 1e3 * (floor - min(mdet, total) + 1e-3)  # so the line search backtracks
            cache["x"], cache["u"], cache["mdet"], cache["val"] = c.copy(), u, mdet, val
            cache["warped"], cache["x_seen"], cache["ctl"] = warped[inner], c, x
            return val, grad

        rec = {"mdet": 1.0}

        def cb(intermediate_result):
            nonlocal it_total
            x = intermediate_result.x
            if not isinstance(intermediate_result, OptimizeResult):  # the shared L-BFGS: the point it evaluated last
                if cache.get("x_seen") is not x:
                    fun(x)
            elif cache.get("x") is None or not np.array_equal(cache["x"], x):
                fun(x)
            rec["x"], rec["u"], rec["mdet"], rec["val"] = cache["ctl"], cache["u"], cache["mdet"], cache["val"]
            progress.emit("iteration", level=level.index, iteration=it_total, metric=rec["val"] * last_ratio,
                          similarity=similarity(Fi, cache["warped"], mask=sim_mask), step=rec["mdet"],
                          extra={"round": rnd})
            it_total += 1
            if rec["mdet"] < opts["regrid_det"] or it_total >= budget:
                raise StopIteration

        x0 = xp.concatenate([xp.full(n_ctl, fhat0), xp.zeros(int(np.prod(g_shape)))])
        _lbfgs_round(fun, xp.zeros_like(x0), cb, iterations=max(1, budget - it_total), tol=opts["tol"])
        if "u" not in rec or rec["val"] > 1.0:  # no accepted step, or only folding ones
            break
        phi_p = xp.asarray(compose(phi_p, rec["u"], spacing=h), dtype=np.float64) if has_phi else rec["u"].copy()
        phi = phi_p[inner]
        # the inverse of this round's VP map on its own (padded) box, where it is a bijection (u = 0 on the
        # boundary), then Ψ ← φ_r⁻¹ ∘ Ψ, so that Ψ stays the inverse of Φ_total = Φ_total ∘ φ_r
        v_pad, _ = invert_newton(rec["u"], spacing=h, tol=INVERSE_TOL, backend=_vp_backend(backend))
        psi = _compose_inverse(psi, v_pad, h, p)
        # Newton correction against Φ_total itself: the composition interpolates each round's inverse between nodes
        # (measured up to ~1.5 voxels off where a round compresses), and would accumulate over rounds and levels
        psi, _ = invert_newton(phi_p, spacing=h, at=nodes + p, init=psi, tol=INVERSE_TOL,
                               backend=_vp_backend(backend))
        if keep_rounds:
            rounds.append({"u": rec["u"].astype(dtype), "v": v_pad.astype(dtype), "affine": level.fixed.affine,
                           "pad": p})
        acc["regrids"] += 1 if rnd > 0 else 0
        last_ratio *= rec["val"]
        x = rec["x"]
        acc["f"] = xp.asarray(opts["j_min"] + x[:n_ctl].reshape(shape_p) ** 2, dtype=dtype)
        acc["g"] = xp.asarray(x[n_ctl:].reshape(g_shape), dtype=dtype)
        state["phi"] = phi.astype(dtype)
        state["phi_inv"] = psi.astype(dtype)
        state["vp_pad"] = {"phi": phi_p.astype(dtype), "affine": level.fixed.affine, "pad": p, "shape": Fi.shape,
                           "h": h}
        state["vp_rounds"] = list(rounds)
        acc["state"] = dict(state)
        acc["last_ratio"] = last_ratio
        if rec["mdet"] >= opts["regrid_det"] or it_total >= budget:
            break  # the round converged (or ran out of iterations) without needing a regrid
    state["phi"] = phi.astype(dtype)
    state["phi_inv"] = psi.astype(dtype)
    state["vp_pad"] = {"phi": phi_p.astype(dtype), "affine": level.fixed.affine, "pad": p, "shape": Fi.shape,
                       "h": h}
    state["vp_rounds"] = rounds
    return last_ratio


def _precondition(c, shape, g_shape, sigma_vox, backend=None):
    """``K c`` for the stacked controls ``c = (f̂ on shape, g on g_shape)``: each field smoothed by the Gaussian of
    ``sigma_vox`` (voxels per axis) with zero extension, so that K is symmetric and the gradient w.r.t. the
    optimiser's variables is K times the gradient w.r.t. the controls; the identity when every σ is 0."""
    from ...kernels.smooth import gaussian

    if not any(sigma_vox):
        return c
    xp = get_array_module(c)
    n = int(np.prod(shape))
    smooth = [gaussian(part.reshape(s), sigma_vox, ndim=len(shape), mode="constant", backend=backend).ravel()
              for part, s in ((c[:n], shape), (c[n:], g_shape))]
    return xp.concatenate(smooth)


class _Evaluations:
    """The problem :func:`classreg.optimise.minimise` expects, around ``fun(x) -> (value, gradient)``."""

    def __init__(self, fun):
        self.fun = fun

    def value(self, x):
        return self.fun(x)

    def gradient(self, x, payload):
        return payload


def _lbfgs_round(fun, x0, callback, *, iterations, tol):
    """One L-BFGS round on ``fun(x) -> (value, gradient)`` from ``x0``; ``callback(iterate)`` (with ``.x``) after every
    iteration, which may raise StopIteration to end the round.

    numpy ``x0`` (with ``HOST_OPTIMISER = "scipy"``): scipy's L-BFGS-B (``maxcor=10``). CuPy ``x0``: the monotone
    L-BFGS of :func:`classreg.optimise.minimise` (Nocedal & Wright 2006, Algorithms 7.4 and 3.1: memory 10,
    backtracking Armijo search, trust radius ``SHARED_RADIUS`` on the largest control change), whose vectors stay on
    the device; its stopping test on the relative decrease is scipy's ``ftol``. Both reject a folding trial point
    through its larger value (see :func:`_level_step`).
    """
    if get_array_module(x0) is np and HOST_OPTIMISER == "scipy":
        from scipy.optimize import minimize

        minimize(fun, x0, jac=True, method="L-BFGS-B", callback=callback,
                 options={"maxiter": iterations, "ftol": tol, "gtol": 1e-12, "maxcor": 10})
        return
    from ...optimise import minimise

    f0, g0 = fun(x0)
    try:
        minimise(_Evaluations(fun), x0, f0, g0, iterations=iterations, tol=tol, evaluations=1, memory=10,
                 radius=SHARED_RADIUS, on_accept=callback)
    except StopIteration:
        pass


def _sample(img, disp, h, shift, at=None):
    """``img`` (on its own grid, edge-extended) at index ``at + shift + disp / h`` (``at``: the nodes of ``disp``'s
    grid by default); multilinear, as the warp; vector images per component."""
    xp = get_array_module(disp)
    map_coordinates = _ndimage(xp).map_coordinates
    nd = disp.shape[-1]
    if at is None:
        at = xp.stack(xp.meshgrid(*[xp.arange(n, dtype=np.float64) for n in disp.shape[:nd]], indexing="ij"), -1)
    coords = xp.stack([at[..., j] + shift + disp[..., j] / h[j] for j in range(nd)])
    if img.ndim == nd:
        return map_coordinates(img, coords, order=1, mode="nearest")
    return xp.stack([map_coordinates(img[..., c], coords, order=1, mode="nearest") for c in range(nd)], -1)


def _affine_points(y, total, shift):
    """``y @ A.T + t + shift`` for index points ``y`` (…, nd) and the host matrix ``total`` = [A t]; on the device
    with the matrix's entries as Python numbers (nothing to upload)."""
    xp = get_array_module(y)
    nd = y.shape[-1]
    if xp is np:
        return y @ total[:nd, :nd].T + total[:nd, nd] + shift
    return xp.stack([sum(y[..., j] * float(total[i, j]) for j in range(nd)) + (float(total[i, nd]) + shift)
                     for i in range(nd)], -1)


def _mm(h, like):
    """The per-axis spacing ``h`` as an array next to ``like`` (numpy, or on ``like``'s device)."""
    xp = get_array_module(like)
    return np.asarray(h) if xp is np else xp.asarray(h, dtype=np.float64)


def _push(rounds, pts, affine, h, key, reverse):
    """Send index points ``pts`` of the grid ``affine`` (spacing ``h``) through the rounds' maps ``id + r[key]``,
    each the multilinear interpolant on its own padded grid (the map the round optimised, or its inverse; u = 0 on
    and beyond that grid's ring, so the edge extension is exact), the last round first when ``reverse``."""
    xp = get_array_module(pts)
    map_coordinates = _ndimage(xp).map_coordinates
    nd = pts.shape[-1]
    y = xp.array(pts, dtype=np.float64)
    for r in (reversed(rounds) if reverse else rounds):
        total = np.linalg.inv(r["affine"]) @ affine  # this grid's index → the round's level index
        c = xp.moveaxis(_affine_points(y, total, r["pad"]), -1, 0)
        y = y + xp.stack([map_coordinates(xp.asarray(r[key][..., k], dtype=np.float64), c, order=1, mode="nearest")
                          for k in range(nd)], -1) / _mm(h, y)
    return y


def _padded_nodes(shape, pad, xp=np):
    return xp.stack(xp.meshgrid(*[xp.arange(n + 2 * pad, dtype=np.float64) - pad for n in shape], indexing="ij"), -1)


def _transfer(rounds, saved, psi, fixed_level, pad, floor, backend):
    """Φ_total on ``fixed_level``'s padded grid and its inverse Ψ on the level grid, from the coarser levels' rounds,
    such that min det J (central differences, the level grid) stays above ``floor``.

    For k = K, K − 1, …, 1 leading rounds (K: all of them) two candidates are tried, the first that does not fall to
    the floor is taken: (a) the composition φ_1 ∘ … ∘ φ_k on the coarser level's padded grid (for k = K the map that
    level ended with), resampled multilinearly; (b) the composition evaluated at this level's nodes, each round with
    its own interpolant on its own grid (exact for the maps the optimiser accepted, but it shows the structure below
    the coarse grid's spacing). A coarse map that ends on the floor is not injective inside every cell, and either
    candidate can fold on the finer grid (brain2d: −0.42 at 256², docs/notes/vp.md); then rounds are dropped and the
    finer level redoes their part. Ψ: ``psi`` (the transferred inverse) for (a) with k = K, else the composition of
    the rounds' inverses; Newton-corrected against Φ_total. Returns ``(phi_p, psi, k)``.
    """
    from ...kernels.diff import jacobian_determinant
    from ...kernels.vp import invert_newton

    xp = get_array_module(saved["phi"])
    nd = fixed_level.ndim
    h = tuple(float(x) for x in fixed_level.spacing_array_order)
    shape = tuple(fixed_level.shape)
    nodes_p = _padded_nodes(shape, pad, xp)
    inner = tuple(slice(pad, pad + n) for n in shape)
    coarse_nodes = _padded_nodes(saved["shape"], saved["pad"], xp)
    chosen = None
    for k in range(len(rounds), 0, -1):
        coarse = saved["phi"] if k == len(rounds) else \
            (_push(rounds[:k], coarse_nodes, saved["affine"], saved["h"], "u", True) - coarse_nodes) \
            * _mm(saved["h"], coarse_nodes)
        resampled = _padded_map(dict(saved, phi=coarse), shape, fixed_level.affine, pad)
        for kind, make in (("resampled", lambda: resampled),
                           ("composed", lambda: (_push(rounds[:k], nodes_p, fixed_level.affine, h, "u", True)
                                                 - nodes_p) * _mm(h, nodes_p))):
            phi_p = make()
            if float(xp.min(jacobian_determinant(phi_p[inner], spacing=h))) > floor:
                chosen = kind
                break
        if chosen:
            break
    else:
        return xp.zeros(nodes_p.shape), xp.zeros((*shape, nd)), 0
    nodes = nodes_p[inner]
    if not (chosen == "resampled" and k == len(rounds) and psi is not None and psi.shape == nodes.shape):
        psi = (_push(rounds[:k], nodes, fixed_level.affine, h, "v", False) - nodes) * _mm(h, nodes)
    psi, _ = invert_newton(phi_p, spacing=h, at=nodes + pad, init=xp.asarray(psi, dtype=np.float64),
                           tol=INVERSE_TOL, backend=_vp_backend(backend))
    return phi_p, psi, k


def _padded_map(saved, shape, affine, pad):
    """The padded map ``saved["phi"]`` of a coarser level resampled (multilinear) onto the padded grid of the level
    ``shape``, ``affine`` (its padded box contains this one when the pad is counted in nodes and levels get finer)."""
    xp = get_array_module(saved["phi"])
    nd = len(shape)
    total = np.linalg.inv(saved["affine"]) @ affine  # this level's index → the saved level's index
    idx = _padded_nodes(shape, pad, xp)
    src = _affine_points(idx, total, saved["pad"])
    return _sample(xp.asarray(saved["phi"], dtype=np.float64), xp.zeros(idx.shape), np.ones(nd), 0.0, src)


def _vp_inverse(phi_p, h, j_min, floor, init=None):
    """The VP-constructed inverse of ``φ = id + phi_p`` on ``phi_p``'s grid (Zhou & Liao, METHODS.md §6.2 step 9).

    ψ = id + w is the VP map (``Δw = ∇f − ∇×g``, w = 0 on the ring) whose det and curl match, in the least-squares
    sense of :func:`classreg.kernels.vp.vp_grid_loss_grad`, those that φ⁻¹ must have: ``D(φ⁻¹)(y) = (Dφ)⁻¹(φ⁻¹(y))``,
    evaluated at the current estimate ψ_k(y) (``Dφ`` by central differences, sampled multilinearly), so
    ``det = 1 / det Dφ(ψ_k(y))`` and the curl of that matrix. Pass 0 evaluates them at ``y + init(y)`` (default
    ``y − phi_p(y)``);
    each pass runs L-BFGS on the grid generator's loss from the previous pass's controls; trial points whose map has
    min det J ≤ ``floor`` are rejected as in the registration. Returns ``w`` (mm, float64).
    """
    from scipy.ndimage import map_coordinates
    from scipy.optimize import minimize

    from ...kernels.vp import det_curl, jacobian_matrix, vp_grid_loss_grad

    nd = phi_p.shape[-1]
    shape = phi_p.shape[:nd]
    A = jacobian_matrix(phi_p, h).reshape(*shape, nd * nd)
    nodes = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), 0)
    weight = np.zeros(shape)
    weight[tuple(slice(1, n - 1) for n in shape)] = 1.0
    w = -np.asarray(phi_p, dtype=np.float64) if init is None else np.asarray(init, dtype=np.float64)
    n_ctl = int(np.prod(shape))
    g_shape = shape if nd == 2 else shape + (3,)
    x = np.concatenate([np.full(n_ctl, np.sqrt(1.0 - j_min)), np.zeros(int(np.prod(g_shape)))])
    for _ in range(VP_INVERSE_PASSES):
        c = nodes + np.moveaxis(w, -1, 0) / np.reshape(h, (nd,) + (1,) * nd)
        M = np.stack([map_coordinates(A[..., i], c, order=1, mode="nearest") for i in range(nd * nd)], -1)
        M = M.reshape(*shape, nd, nd)
        det_m = np.linalg.det(M)
        M[det_m <= floor] = np.eye(nd)  # no prescription where the sampled matrix is (nearly) singular
        jd, cu = det_curl(np.linalg.inv(M))
        loss0 = vp_grid_loss_grad(np.full(shape, np.sqrt(1.0 - j_min)), np.zeros(g_shape), jd, cu, j_min, h,
                                  weight=weight)[0]  # the identity's loss: the scale of every pass
        best = {}

        def fun(xx):
            loss, gf, gg, u = vp_grid_loss_grad(xx[:n_ctl].reshape(shape), xx[n_ctl:].reshape(g_shape), jd, cu,
                                                j_min, h, weight=weight)
            val = loss / loss0
            mdet = float(np.min(det_curl(jacobian_matrix(u, h))[0]))
            if mdet <= floor:
                val = 1.0 + abs(val) + 1e3 * (floor - mdet + 1e-3)
            elif val < best.get("val", np.inf):
                best.update(val=val, x=xx.copy(), u=u)
            return val, np.concatenate([gf.ravel(), gg.ravel()]) * (float(np.prod(h)) / loss0)

        minimize(fun, x, jac=True, method="L-BFGS-B",
                 options={"maxiter": VP_INVERSE_ITERATIONS, "ftol": 1e-9, "gtol": 1e-12, "maxcor": 10})
        if "x" not in best:
            break
        x, w = best["x"], best["u"]
    return w
