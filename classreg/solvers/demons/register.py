"""``register_demons``: symmetric log-domain diffeomorphic demons, with large deformations as a broken geodesic.

Inner solver (one "piece", :mod:`.step`): the symmetric log-domain demons of Vercauteren et al. (MICCAI 2008): the
transformation is ``exp(v)`` for a stationary velocity field ``v``, updated by forward and backward forces combined
with the Baker-Campbell-Hausdorff formula and smoothed.

Outer loop (the broken geodesic): up to ``max_pieces`` stationary-velocity pieces, each registering the moving image
warped by the composition of the previous pieces (resampled once from the original image), until a piece no longer
lowers the energy. The registration metric is the path length ``Σ_i ‖v_i‖``.
"""
from __future__ import annotations

import time

import numpy as np

from ... import terms
from ...backend import placement, to_device, to_numpy
from ...image import Image, as_mask
from ...kernels._backend import get_array_module
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
    normalise_intensities,
    resolve_auto_metric,
    tiny_like,
    warm_key,
    warp_through,
)
from .options import OPTIONS
from .step import one_piece, velocity_norm

__all__ = ["register_demons"]


#: metric="mi": histogram bins of the Mattes MI (elastix's and ANTs' usual 32) and the default velocity σ in
#: multiples of the smallest spacing (chosen from the benchmark sweep: docs/notes/demons.md, session 18)
MI_BINS = 32
MI_VELOCITY_SIGMA = 2.0


@declared(OPTIONS)
def register_demons(fixed: Image, moving: Image, *, init: Transform | None = None, fixed_mask=None,
                    moving_mask=None, metric: str = "auto", shrink_factors=(4, 2, 1), smoothing_sigmas=None,
                    iterations=None, velocity_sigma: float | None = None, update_sigma: float | None = None,
                    max_step: float | None = None, bch_terms: int = 2, symmetric: bool | None = None,
                    max_pieces: int = 5, piece_tol: float = 0.01, min_det_j: float = 0.05, tol: float = 1e-3,
                    lncc_radius: float | None = None, intensity: str = "match", dtype=np.float32, seed: int = 0,
                    threads: int | None = None, memory_limit: float | None = None, time_limit: float | None = None,
                    device: str | None = None, backend=None, progress: bool = False, callback=None) -> Result:
    """Register ``moving`` to ``fixed`` with symmetric log-domain diffeomorphic demons and broken geodesics.

    Parameters
    ----------
    fixed, moving : Image
        2-D or 3-D scalar images in physical space (any grids, spacings and orientations).
    init : Affine or Chain, optional
        Initial fixed → moving transform (e.g. the result of ``register_rigid``); the deformation is estimated on
        top of it, ``T = init ∘ exp(v_1) ∘ … ∘ exp(v_N)``.
    fixed_mask, moving_mask : Image or array, optional
        Forces are computed only inside the fixed mask and where the warped moving mask is set (every level).
    metric : {"auto", "ssd", "lncc", "mi"}
        "auto" (default): "ssd" when the two images are on one intensity scale, "mi" when they are not
        (:func:`classreg.solvers._common.same_intensity_scale`: the moving image's 0.5 and 99.5 percentiles
        within half and a quarter of the fixed image's range of the fixed ones; the choice is logged and recorded
        in ``Result.params["metric"]``).
        SSD, even after histogram matching, assumes that equal tissue has equal intensity; a pair from different
        scanners or file conventions breaks that, and MI does not need it (docs/notes/tradeoff.md, session 21).
        The rule looks at ranges only: for two modalities stored on one scale (T1 and T2 both in 0-255) pass "mi".
        "ssd": the ESM demons force (Vercauteren et al. 2008, eq. 8) on intensities scaled to [0, 1];
        "lncc": the gradient of local normalised correlation (ANTs "CC", window radius ``lncc_radius`` mm),
        scaled so that its largest step is ``max_step`` — for pairs whose intensities differ locally;
        "mi": the descent direction ``−∂C/∂W ∇W`` of the Mattes MI cost ``C = −MI`` (32 bins), smoothed by
        ``update_sigma`` and then scaled so that its largest step is ``max_step`` (the order of ANTs SyN: Avants
        et al., Med. Image Anal. 12(1):26-41, 2008), pieces accepted on the MI cost — for any intensity relation.
        All three are :mod:`classreg.terms` data terms and run on the CPU and the GPU.
    shrink_factors, smoothing_sigmas, iterations
        The pyramid (coarsest first): shrink factors relative to the smallest spacing, Gaussian σ in mm
        (default: half the shrink factor in voxels), iteration cap per level and piece (default for "ssd": 15, 10,
        5, ITK LogDomainDemons'; for "lncc" and "mi": 30, 20, 10, see ``symmetric``).
    velocity_sigma : float, optional
        σ (mm) of the Gaussian smoothing of the velocity after each update ("diffusion-like"); default 4.5 ×
        the smallest spacing for "ssd", 0.5 mm for "lncc", 2 × the smallest spacing for "mi". The "ssd" and "mi"
        defaults are the σ of the benchmark sweep whose maps are not dominated on (Dice or EPE, SDlogJ) by the
        peers on the most benchmark cases (ITK LogDomainDemons' 1.5 voxels reached min det J 0.0006 on brain2d;
        docs/notes/tradeoff.md, docs/notes/demons.md). Like
        ``update_sigma`` and ``max_step`` it is given at full resolution and scales with the level's shrink factor
        (constant in voxels, as in ITK and ANTs).
    update_sigma : float, optional
        σ (mm) of the "fluid-like" smoothing of each update; default 0 for "ssd" (ITK's default), the smallest
        spacing for "mi", 2 mm for "lncc"
        (mostly fluid, like ANTs SyN's update-field smoothing and DIPY's ``sigma_diff``; the choice is measured in
        docs/solvers/demons.md).
    max_step : float, optional
        Largest update length (mm); default 2 × the smallest spacing (ITK LogDomainDemons: 2 voxels), the
        smallest spacing for "mi" (a normalised gradient step: it sets the resolution the iteration can reach).
    bch_terms : {2, 3, 4}
        Terms of the BCH approximation (eq. 5): 2 → ``v + u``; 3 adds ``½[v, u]``; 4 adds ``1/12 [v, [v, u]]``.
    symmetric : bool, optional
        Symmetric forward/backward update ``v ← ½ (Z(v, u_f) − Z(−v, u_b))`` (Vercauteren 2008 §3); False uses the
        forward force only, at half the cost per iteration. Default True for "ssd", False for "lncc" and "mi": the
        ESM force is a Gauss–Newton step that converges in a few iterations, the LNCC and MI forces normalised
        gradient steps whose cost keeps falling at a near-constant rate per iteration, so twice the iterations of
        the one-sided force (30, 20, 10) beat the symmetric update at the same cost (docs/solvers/demons.md; for MI
        the symmetric update measured the same accuracy against smoothness, docs/notes/demons.md).
    max_pieces : int
        Maximal number of stationary-velocity pieces of the broken geodesic (1 = plain log-demons).
    piece_tol : float
        A further piece is kept only if it lowers the energy by more than this fraction.
    min_det_j : float
        Floor of the result's Jacobian determinant (central differences on the fixed grid), in [0, 1): a piece
        whose composition with the previous ones would bring det J below it is followed only part of the way,
        ``exp(t v)`` with the largest ``t ∈ (0, 1]`` that keeps the floor (bisection, 6 steps); a piece that cannot
        keep it at any tried length is dropped and the run stops. Default 0.05: no voxel compressed more than
        20-fold, the plausibility floor of the benchmark page (issue #22; docs/notes/tradeoff.md); 0 keeps only the
        diffeomorphism (det J > 0) on the grid.
    tol : float
        A level ends when the best energy seen fell by at most ``tol`` × the magnitude of its first value over the
        last 5 iterations (an oscillating energy ends the level too).
    lncc_radius : float, optional
        LNCC window radius in mm at full resolution (default 4 mm: ANTs' and DIPY's usual 4 voxels at 1 mm; at
        least one voxel); like the σs it stays constant in voxels across pyramid levels.
    intensity : {"match", "joint"}
        How intensities are made comparable: "match" (default) maps the moving image's histogram onto the fixed
        one (SimpleITK ``HistogramMatching``, 1024 levels, 7 match points, thresholded at the mean, as in ITK's
        demons examples), then both are scaled by the fixed image's robust range (0.5-99.5 percentiles) to [0, 1];
        "joint" only applies that common scaling (images already on one intensity scale).
    dtype : {numpy.float32, numpy.float64}
        Working precision.
    seed : int
        Recorded for reproducibility (the algorithm is deterministic).
    threads : int, optional
        CPU threads of the numba kernels during the call.
    memory_limit, time_limit : float, optional
        MB the call may use (default: the memory available now; a larger estimate is refused before any work and
        recorded in ``Result.params["memory_estimate_mb"]``); seconds after which the run stops with its estimate.
    device : {None, "cpu", "cuda", "cuda:N"}
        Where to compute (default: from the data).
    backend : {None, "numpy", "numba", "cuda"}
        Kernel implementation (default: from the data; numba on the CPU when installed).
    progress : bool
        Show a tqdm bar.
    callback : callable, optional
        Receives :class:`classreg.Event` objects; raise :class:`classreg.StopRegistration` to stop early.

    Returns
    -------
    Result
        ``transform`` (fixed → moving: ``Chain([field, init])`` or the field), ``inverse`` (from ``exp(−v)``, no
        numerical inversion), ``warped``, per-iteration ``history`` (piece, level, iteration, metric = the energy
        (mean squared difference of the normalised intensities, or the LNCC or MI cost) before the update,
        similarity = NCC of the level's fixed and warped moving images, step),
        ``metrics`` with ``path_length`` (Σ‖v_i‖, mm·mm^{d/2}: the L² norm ``sqrt(Σ_x |v(x)|² Π h)``),
        ``ssd_before``/``ssd_after`` (normalised intensities), ``pieces``, for "mi" also ``mi_before``/``mi_after``
        (nats); ``extras["velocities"]`` (array-frame velocity per piece, mm).

    References
    ----------
    T. Vercauteren, X. Pennec, A. Perchant, N. Ayache, "Symmetric log-domain diffeomorphic registration: a
    demons-based approach", MICCAI 2008, LNCS 5241:754-761, doi:10.1007/978-3-540-85988-8_90 (eqs. 5-8).
    H. Lombaert, L. Grady, X. Pennec, N. Ayache, F. Cheriet, "Spectral log-demons: diffeomorphic image registration
    with very large deformations", IJCV 107:254-271, 2014 (the log-demons reference implementation's rules).
    The broken-geodesic extension: "Diffeomorphic registration with broken geodesics", WBIR 2022 (eqs. 1-2).
    """
    t_start = time.perf_counter()
    check_pair(fixed, moving)
    dev, backend = placement(device, backend, fixed.data, moving.data)
    fixed, moving = fixed.to("cpu"), moving.to("cpu")  # the host sees the inputs once (no copy for numpy data)
    init = check_init(init, fixed.ndim)
    check_overlap(fixed, moving, init)
    memory_mb = check_memory("demons", fixed, moving, dtype, memory_limit, fix=", use fewer pieces (max_pieces)")
    dtype = np.dtype(dtype)
    fmask = as_mask(fixed_mask, fixed, "fixed_mask")
    mmask = as_mask(moving_mask, moving, "moving_mask")
    metric = resolve_auto_metric("demons", metric, "ssd", "mi", fixed, moving, fmask, mmask)[0]
    opts = _resolve(fixed, metric, iterations, velocity_sigma, update_sigma, max_step, symmetric, lncc_radius,
                    bch_terms=int(bch_terms), tol=float(tol), backend=backend)
    schedule = dict(zip(("shrink_factors", "smoothing_sigmas", "iterations"),
                        check_schedule(shrink_factors, smoothing_sigmas, opts.pop("iterations"), fixed.spacing)))
    fixed_n, moving_n = normalise_intensities(fixed, moving, fmask, intensity, dtype)
    mmask_img = None if mmask is None else moving.like(np.asarray(mmask, dtype=dtype))
    if dev == "cuda":  # the working images go to the device once; the loop keeps everything there
        fixed_n, moving_n = fixed_n.to(dev), moving_n.to(dev)
        fmask = None if fmask is None else to_device(fmask, dev)
        mmask_img = None if mmask_img is None else mmask_img.to(dev)
    def warm_up():  # the same kernels on a tiny pair, before the bar (progress=True only)
        f, m, fm, mm = tiny_like(fixed, moving)
        register_demons(f, m, fixed_mask=None if fixed_mask is None else fm,
                        moving_mask=None if moving_mask is None else mm, metric=metric, shrink_factors=(2, 1),
                        iterations=(2, 2), bch_terms=bch_terms, symmetric=opts["symmetric"], max_pieces=2,
                        intensity=intensity, dtype=dtype, device=None if dev == "cpu" else dev, backend=backend)

    prog = Progress("demons", callback=callback, progress=progress, time_limit=time_limit,
                    total=int(max_pieces) * int(sum(schedule["iterations"])), warm_up=warm_up,
                    warm_key=warm_key(fixed, moving, metric, opts["symmetric"], bch_terms, intensity, dtype.name,
                                      backend, fixed_mask is None, moving_mask is None))
    out = _broken_geodesic(fixed_n, moving_n, fmask, mmask_img, init, schedule, opts, prog, int(max_pieces),
                           float(piece_tol), float(min_det_j), dtype)
    for key in ("phi", "phi_inv"):  # the result comes to the host once
        out[key] = to_numpy(out[key])
    out["velocities"] = [to_numpy(v) for v in out["velocities"]]
    h = np.asarray(fixed.spacing_array_order)
    # the resolved entries (defaults that depend on the metric or the spacing); the declaration records the rest
    params = dict(**schedule, metric=metric,
                  **{k: v for k, v in opts.items() if k not in ("term", "backend", "scale_smoothed")},
                  memory_estimate_mb=memory_mb, **common_params(init=init, dtype=dtype, seed=seed, backend=backend))
    metrics = dict(path_length=out["path_length"], pieces=len(out["velocities"]), ssd_before=out["ssd0"],
                   ssd_after=out["ssd"], piece_norms=[velocity_norm(v, h) for v in out["velocities"]])
    if metric == "mi":
        metrics.update(mi_before=-out["energy0"], mi_after=-out["energy"])
    return field_result(fixed, moving, init, out["phi"], out["phi_inv"], history=prog.history,
                        converged=out["converged"], stop_reason=out["stop_reason"], params=params, metrics=metrics,
                        timings={"total": time.perf_counter() - t_start, **prog.timings},
                        extras={"velocities": out["velocities"]})


def _resolve(fixed: Image, metric, iterations, velocity_sigma, update_sigma, max_step, symmetric, lncc_radius,
             **rest) -> dict:
    """The options whose defaults depend on the metric or the spacing, resolved (lengths in mm)."""
    h_min = min(fixed.spacing)
    ssd = metric == "ssd"
    # metric: (velocity σ, update σ, max_step) in mm
    lengths = {"ssd": (4.5 * h_min, 0.0, 2.0 * h_min), "lncc": (0.5, 2.0, 2.0 * h_min),
               "mi": (MI_VELOCITY_SIGMA * h_min, h_min, h_min)}[metric]
    opts = dict(symmetric=ssd if symmetric is None else bool(symmetric),
                iterations=((15, 10, 5) if ssd else (30, 20, 10)) if iterations is None else iterations,
                velocity_sigma=float(lengths[0] if velocity_sigma is None else velocity_sigma),
                update_sigma=float(lengths[1] if update_sigma is None else update_sigma),
                max_step=float(lengths[2] if max_step is None else max_step),
                lncc_radius=4.0 if lncc_radius is None else float(lncc_radius), **rest)
    opts["scale_smoothed"] = metric == "mi"
    if metric == "lncc":  # the window stays constant in voxels across levels, at least one voxel
        radius = opts["lncc_radius"]
        opts["term"] = lambda scale, h: terms.LNCC(radius=max(radius * scale, max(h)))
    elif metric == "mi":
        opts["term"] = lambda scale, h: terms.MattesMI(bins=MI_BINS)
    else:
        opts["term"] = lambda scale, h: terms.SSD()
    return opts


def _broken_geodesic(fixed_n: Image, moving_n: Image, fmask, mmask_img, init, schedule, opts, prog, max_pieces,
                     piece_tol, min_det_j, dtype) -> dict:
    """Up to ``max_pieces`` pieces Φ_i = Φ_{i-1} ∘ exp(v_i), each registering the moving image through Φ_{i-1};
    returns the array-frame displacements of Φ and Φ⁻¹ (mm), the velocities, energies and the stop reason."""
    from ...kernels.fields import compose, expmap

    backend = opts["backend"]
    xp = get_array_module(fixed_n.data)
    ref = fixed_n
    h = np.asarray(fixed_n.spacing_array_order)
    phi = xp.zeros((*fixed_n.shape, fixed_n.ndim), dtype=dtype)  # array-frame displacement of Φ (fixed grid), mm
    phi_inv = xp.zeros_like(phi)
    velocities = []
    path_length = 0.0

    def warp_moving(disp):
        return warp_through(moving_n, ref, init, disp, backend)

    def energy_of(warped):  # what a piece must lower: the MI cost for "mi", else the mean squared difference
        if opts["scale_smoothed"]:
            return opts["term"](1.0, tuple(h)).value(fixed_n.data, warped, mask=fmask)
        return mean_sq(fixed_n.data, warped, fmask)

    warped_prev = warp_moving(phi)  # S_{i-1}: kept from the acceptance test of the previous piece
    warped0 = warped_prev
    energy0 = energy = energy_of(warped_prev)
    stop_reason = f"reached max_pieces={max_pieces}"
    converged = True
    stopped = False
    try:
        prog.emit("start", metric=energy0, extra={"pieces": max_pieces})
        for piece in range(1, max_pieces + 1):
            # S_{i-1}: the original moving image through Φ_{i-1} (and init), resampled once, on the fixed grid
            s_prev = ref.like(warped_prev)
            s_mask = None
            if mmask_img is not None:
                s_mask = ref.like((warp_through(mmask_img, ref, init, phi, backend) > 0.5).astype(dtype))
            state, stopped, _ = one_piece(fixed_n, s_prev, fmask, s_mask, schedule, opts, prog, piece, dtype)
            v = state.get("v")
            if v is None:
                break
            new_phi, v, n_sq, t = _compose_floored(phi, v, h, backend, min_det_j)
            if t == 0.0:
                stop_reason = (f"piece {piece} would bring det J below min_det_j={min_det_j:g} at any length; "
                               f"kept {piece - 1} piece(s)")
                break
            warped_new = warp_moving(new_phi)
            new_energy = energy_of(warped_new)
            if piece > 1 and not _lowers(new_energy, energy, piece_tol):
                stop_reason = (f"piece {piece} lowered the energy by less than piece_tol={piece_tol} "
                               f"({energy:.4g} -> {new_energy:.4g}); kept {piece - 1} piece(s)")
                break
            e_minus, _ = expmap(-v, spacing=h, n_squarings=n_sq, backend=backend)
            new_inv = compose(e_minus, phi_inv, spacing=h, backend=backend)  # Φ_i⁻¹ = exp(−v_i) ∘ Φ_{i-1}⁻¹
            phi, phi_inv, energy = new_phi.astype(dtype), new_inv.astype(dtype), new_energy
            warped_prev = warped_new
            velocities.append(v)
            path_length += velocity_norm(v, h)
            if stopped:
                stop_reason = prog.stop_reason
                converged = False
                break
        if not stopped:
            prog.emit("done", metric=energy, extra={"pieces": len(velocities), "path_length": path_length})
    except StopRegistration:
        stop_reason, converged = prog.stop_reason, False
    finally:
        prog.close()
    ssd0, ssd = energy0, energy
    if opts["scale_smoothed"]:
        ssd0, ssd = mean_sq(fixed_n.data, warped0, fmask), mean_sq(fixed_n.data, warped_prev, fmask)
    return dict(phi=phi, phi_inv=phi_inv, velocities=velocities, path_length=path_length, energy0=energy0,
                energy=energy, ssd0=ssd0, ssd=ssd, stop_reason=stop_reason, converged=converged)


def _compose_floored(phi, v, h, backend, floor, steps=6):
    """``Φ ∘ exp(t v)`` for the largest ``t`` found (1, else bisection of [0, 1] in ``steps`` halvings) for which the
    composed map's central-difference det J is at least ``floor`` (and above 0) everywhere on the grid: returns
    ``(Φ ∘ exp(t v), t v, squarings, t)``; ``t = 0`` when no tried length keeps the floor (the piece is dropped)."""
    from ...kernels.diff import jacobian_determinant
    from ...kernels.fields import compose, expmap

    def trial(s):
        e_v, n_sq = expmap(s * v, spacing=h, backend=backend)
        new_phi = compose(phi, e_v, spacing=h, backend=backend)
        min_det = float(jacobian_determinant(new_phi, spacing=h, backend=backend).min())
        return (new_phi, s * v, n_sq, s), (min_det > 0 and min_det >= floor)

    out, ok = trial(1.0)
    if ok:
        return out
    lo, hi, best = 0.0, 1.0, None
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        cand, ok = trial(mid)
        if ok:
            lo, best = mid, cand
        else:
            hi = mid
    return best if best is not None else (phi, 0.0 * v, 0, 0.0)


def _lowers(new: float, old: float, tol: float) -> bool:
    """Whether ``new`` lowers the energy ``old`` by more than the fraction ``tol`` of its size (MI costs are
    negative: ``old · (1 − tol)`` would accept a piece that raises them)."""
    return new <= old - tol * abs(old)
