"""``register_demons``: symmetric log-domain diffeomorphic demons, with large deformations as a broken geodesic.

Inner solver (one "piece"): the symmetric log-domain demons of Vercauteren et al. (MICCAI 2008): the
transformation is ``exp(v)`` for a stationary velocity field ``v``; each iteration computes the ESM demons force
forward (moving towards fixed) and backward (fixed towards moving, through ``exp(-v)``), adds them to ``v`` with the
Baker-Campbell-Hausdorff approximation ``Z(v, u) ≈ v + u (+ ½[v, u] + 1/12 [v, [v, u]])`` and smooths ``v``
("diffusion-like" regularisation; ``update_sigma`` adds "fluid-like" smoothing of the update).

Outer loop (the broken geodesic of METHODS.md §3): up to ``max_pieces`` stationary-velocity pieces, each registering
the moving image warped by the composition of the previous pieces (resampled once from the original image), until a
piece no longer lowers the energy. The registration metric is the path length ``Σ_i ‖v_i‖``.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from .._checks import keyword_choice
from ..backend import thread_count, versions
from ..image import Image, as_mask
from ..progress import Progress, StopRegistration
from ..pyramid import default_sigmas, multiresolution
from ..result import Result
from ..transforms import Chain, DisplacementField, Transform
from ._common import backend_name, check_init, check_pair, normalise_intensities, warp_through

__all__ = ["register_demons"]

_METRICS = ("ssd", "lncc")
#: Scaling-and-squaring accuracy inside the iterations (voxels): the force only needs an approximate map of the
#: smooth velocity. Measured with benchmarks.demons: inter3d Dice 0.6631/0.6631/0.6632 for 0.5/1/2 voxels in
#: 7.0/5.9/5.0 s. Each piece's final exp(±v), which becomes the result, uses Lombaert's 0.5.
_ITER_EXP_STEP = 2.0


def register_demons(fixed: Image, moving: Image, *, init: Transform | None = None, metric: str = "ssd",
                    shrink_factors=(4, 2, 1), smoothing_sigmas=None, iterations=None,
                    velocity_sigma: float | None = None, update_sigma: float | None = None, max_step: float | None = None,
                    bch_terms: int = 2, symmetric: bool | None = None, max_pieces: int = 5, piece_tol: float = 0.01,
                    tol: float = 1e-3, lncc_radius: float | None = None, intensity: str = "match",
                    fixed_mask=None, moving_mask=None,
                    dtype=np.float32, seed: int = 0, progress: bool = False, callback=None,
                    backend=None) -> Result:
    """Register ``moving`` to ``fixed`` with symmetric log-domain diffeomorphic demons and broken geodesics.

    Parameters
    ----------
    fixed, moving : Image
        2-D or 3-D scalar images in physical space (any grids, spacings and orientations).
    init : Affine or Chain, optional
        Initial fixed → moving transform (e.g. the result of ``register_rigid``); the deformation is estimated on
        top of it, ``T = init ∘ exp(v_1) ∘ … ∘ exp(v_N)``.
    metric : {"ssd", "lncc"}
        "ssd": the ESM demons force of Vercauteren et al. 2008 (eq. 8) on intensities scaled to [0, 1];
        "lncc": the gradient of local normalised correlation (ANTs "CC", window radius ``lncc_radius`` mm),
        scaled so that its largest step is ``max_step`` — for pairs whose intensities differ locally.
    shrink_factors, smoothing_sigmas, iterations
        The pyramid (coarsest first): shrink factors relative to the smallest spacing, Gaussian σ in mm
        (default: half the shrink factor in voxels), iteration cap per level and piece (default for "ssd": 15, 10,
        5, ITK LogDomainDemons' — measured on the 3-D inter-subject benchmark pair, 60/40/20 gave the same Dice in
        2.5× the time; for "lncc": 30, 20, 10, see ``symmetric``).
    velocity_sigma : float, optional
        σ (mm) of the Gaussian smoothing of the velocity after each update ("diffusion-like"); default 1.5 ×
        the smallest spacing for "ssd" (ITK LogDomainDemons: 1.5 voxels), 0.5 mm for "lncc". Like
        ``update_sigma`` and ``max_step`` it is given at full resolution and scales with the level's shrink factor
        (constant in voxels, as in ITK and ANTs).
    update_sigma : float, optional
        σ (mm) of the "fluid-like" smoothing of each update; default 0 for "ssd" (ITK's default), 2 mm for "lncc".
        The "lncc" defaults (mostly fluid, like ANTs SyN's update-field smoothing and DIPY's ``sigma_diff``) were
        measured on the benchmark cases (docs/solvers/demons.md, docs/benchmarks.md): with the "ssd" smoothing
        (velocity 1.5 voxels, no update smoothing) LNCC reached a lower Dice than SSD on the 2-D brain pair
        (0.731 vs 0.747); with these it reaches 0.774 (3-D inter-subject: 0.681 vs 0.663).
    max_step : float, optional
        Largest update length (mm); default 2 × the smallest spacing (ITK LogDomainDemons: 2 voxels).
    bch_terms : {2, 3, 4}
        Terms of the BCH approximation: 2 → ``v + u``; 3 adds ``½[v, u]``; 4 adds ``1/12 [v, [v, u]]``.
    symmetric : bool, optional
        Symmetric forward/backward update ``v ← ½ (Z(v, u_f) − Z(−v, u_b))`` (Vercauteren 2008 §3); False uses the
        forward force only, at half the cost per iteration. Default True for "ssd", False for "lncc": the ESM force
        is a Gauss–Newton step that converges in a few iterations, the LNCC force a normalised gradient step whose
        cost keeps falling at a near-constant rate per iteration, so for LNCC twice the iterations of the one-sided
        force (30, 20, 10) beat the symmetric update (15, 10, 5) at the same cost on every real benchmark pair
        (tissue Dice: 2-D brain 0.7806 vs 0.7735, rat lungs 0.9358 vs 0.9347, 3-D inter-subject 0.690 vs 0.681;
        docs/solvers/demons.md).
    max_pieces : int
        Maximal number of stationary-velocity pieces of the broken geodesic (1 = plain log-demons).
    piece_tol : float
        A further piece is kept only if it lowers the energy by more than this fraction. A piece whose composition
        with the previous ones would fold the map on the grid (central-difference det J ≤ 0) is halved, up to three
        times, and otherwise dropped (the run then stops), so the result is always a diffeomorphism on the grid.
    tol : float
        A level ends when the energy changed by at most ``tol`` × the magnitude of its first value over the last 5
        iterations.
    lncc_radius : float, optional
        LNCC window radius in mm at full resolution (default 4 mm: ANTs' and DIPY's usual 4 voxels at 1 mm; at
        least one voxel); like the σs it stays constant in voxels across pyramid levels.
    intensity : {"match", "joint"}
        How intensities are made comparable before the SSD force: "match" (default) maps the moving image's
        histogram onto the fixed one (SimpleITK ``HistogramMatching``, 1024 levels, 7 match points, thresholded at
        the mean, as in ITK's demons examples), then both are scaled by the fixed image's robust range (0.5-99.5
        percentiles) to [0, 1]; "joint" only applies that common scaling (images already on one intensity scale).
    fixed_mask, moving_mask : Image or array, optional
        Forces are computed only inside the fixed mask and where the warped moving mask is set (every level).
    dtype : {numpy.float32, numpy.float64}
        Working precision.
    seed : int
        Recorded for reproducibility (the algorithm is deterministic).
    progress : bool
        Show a tqdm bar.
    callback : callable, optional
        Receives :class:`classreg.Event` objects; raise :class:`classreg.StopRegistration` to stop early.
    backend : {None, "numpy", "numba", "cuda"}
        Kernel implementation (default: from the data; numba on the CPU when installed).

    Returns
    -------
    Result
        ``transform`` (fixed → moving: ``Chain([field, init])`` or the field), ``inverse`` (from ``exp(−v)``, no
        numerical inversion), ``warped``, per-iteration ``history`` (piece, level, iteration, metric, step),
        ``metrics`` with ``path_length`` (Σ‖v_i‖, mm·mm^{d/2}: the L² norm ``sqrt(Σ_x |v(x)|² Π h)``),
        ``ssd_before``/``ssd_after`` (normalised intensities), ``pieces``; ``extras["velocities"]`` (array-frame
        velocity per piece, mm).

    References
    ----------
    T. Vercauteren, X. Pennec, A. Perchant, N. Ayache, "Symmetric log-domain diffeomorphic registration: a
    demons-based approach", MICCAI 2008 (eqs. 5-8). H. Lombaert et al., "Diffeomorphic log demons" (MATLAB).
    The broken-geodesic extension: WBIR 2022 (METHODS.md §3, eqs. 1-2).
    """
    t_start = time.perf_counter()
    check_pair(fixed, moving)
    keyword_choice(metric, _METRICS, "metric")
    keyword_choice(intensity, ("match", "joint"), "intensity")
    keyword_choice(bch_terms, (2, 3, 4), "bch_terms")
    init = check_init(init, fixed.ndim)
    if int(max_pieces) < 1:
        raise ValueError(f"max_pieces must be >= 1, got {max_pieces!r}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    h_min = min(fixed.spacing)
    fluid = metric == "lncc"
    if symmetric is None:
        symmetric = not fluid
    if iterations is None:
        iterations = (30, 20, 10) if fluid else (15, 10, 5)
    if velocity_sigma is None:
        velocity_sigma = 0.5 if fluid else 1.5 * h_min
    velocity_sigma = float(velocity_sigma)
    update_sigma = float((2.0 if fluid else 0.0) if update_sigma is None else update_sigma)
    max_step = 2.0 * h_min if max_step is None else float(max_step)
    lncc_radius = 4.0 if lncc_radius is None else float(lncc_radius)
    for name, val in (("velocity_sigma", velocity_sigma), ("update_sigma", update_sigma)):
        if not math.isfinite(val) or val < 0:
            raise ValueError(f"{name} must be a finite number >= 0 (mm), got {val!r}")
    if not math.isfinite(max_step) or max_step <= 0:
        raise ValueError(f"max_step must be a positive length in mm, got {max_step!r}")
    fmask = as_mask(fixed_mask, fixed, "fixed_mask")
    as_mask(moving_mask, moving, "moving_mask")

    fixed_n, moving_n = normalise_intensities(fixed, moving, fmask, intensity, dtype)
    mmask_img = None if moving_mask is None else moving.like(np.asarray(as_mask(moving_mask, moving, "moving_mask"),
                                                                          dtype=dtype))
    schedule = dict(shrink_factors=tuple(shrink_factors),
                    smoothing_sigmas=(default_sigmas(shrink_factors, fixed.spacing) if smoothing_sigmas is None
                                      else tuple(smoothing_sigmas)),
                    iterations=tuple(iterations) if np.ndim(iterations) else (int(iterations),) * len(shrink_factors))
    opts = dict(metric=metric, velocity_sigma=velocity_sigma, update_sigma=float(update_sigma), max_step=max_step,
                bch_terms=int(bch_terms), symmetric=bool(symmetric), tol=float(tol), lncc_radius=lncc_radius,
                h_min=h_min, backend=backend)
    prog = Progress("demons", callback=callback, progress=progress,
                    total=int(max_pieces) * int(sum(schedule["iterations"])))
    ref = fixed_n
    n = fixed.ndim
    h = np.asarray(fixed.spacing_array_order)
    phi = np.zeros((*fixed.shape, n), dtype=dtype)  # array-frame displacement of Φ (fixed grid), mm
    phi_inv = np.zeros_like(phi)
    velocities = []
    path_length = 0.0
    from ..kernels.diff import jacobian_determinant
    from ..kernels.fields import compose, expmap

    def warp_moving(disp):
        return warp_through(moving_n, ref, init, disp, backend)

    warped_prev = warp_moving(phi)  # S_{i-1}: kept from the acceptance test of the previous piece
    energy0 = _energy(fixed_n.data, warped_prev, fmask)
    energy = energy0
    stop_reason = f"reached max_pieces={max_pieces}"
    converged = True
    stopped = False
    try:
        prog.emit("start", metric=energy0, extra={"pieces": int(max_pieces)})
        for piece in range(1, int(max_pieces) + 1):
            # S_{i-1}: the original moving image through Φ_{i-1} (and init), resampled once, on the fixed grid
            s_prev = ref.like(warped_prev)
            s_mask = None
            if mmask_img is not None:
                s_mask = ref.like((warp_through(mmask_img, ref, init, phi, backend) > 0.5).astype(dtype))
            state, stopped, level_energy = _one_piece(fixed_n, s_prev, fmask, s_mask, schedule, opts, prog, piece,
                                                      dtype)
            v = state.get("v")
            if v is None:
                break
            # Φ_i = Φ_{i-1} ∘ exp(v_i); the piece is halved (at most 3 times) if the composed map would fold on the
            # grid (det J ≤ 0 by central differences): the broken geodesic stays a diffeomorphism.
            for _ in range(4):
                e_v, n_sq = expmap(v, spacing=h, backend=backend)
                new_phi = compose(phi, e_v, spacing=h, backend=backend)
                min_det = float(np.min(jacobian_determinant(new_phi, spacing=h, backend=backend)))
                if min_det > 0:
                    break
                v = 0.5 * v
            if min_det <= 0:
                stop_reason = f"piece {piece} would fold the map (min det J {min_det:.3g}); kept {piece - 1} piece(s)"
                break
            warped_new = warp_moving(new_phi)
            new_energy = _energy(fixed_n.data, warped_new, fmask)
            if piece > 1 and new_energy > energy * (1.0 - piece_tol):
                stop_reason = (f"piece {piece} lowered the energy by less than piece_tol={piece_tol} "
                               f"({energy:.4g} -> {new_energy:.4g}); kept {piece - 1} piece(s)")
                break
            e_minus, _ = expmap(-v, spacing=h, n_squarings=n_sq, backend=backend)
            new_inv = compose(e_minus, phi_inv, spacing=h, backend=backend)  # Φ_i⁻¹ = exp(−v_i) ∘ Φ_{i-1}⁻¹
            phi, phi_inv, energy = new_phi.astype(dtype), new_inv.astype(dtype), new_energy
            warped_prev = warped_new
            velocities.append(np.asarray(v))
            path_length += _v_norm(v, h)
            if stopped:
                stop_reason = "stopped by callback"
                converged = False
                break
        if not stopped:
            prog.emit("done", metric=energy, extra={"pieces": len(velocities), "path_length": path_length})
    except StopRegistration:
        stop_reason, converged = "stopped by callback", False
    finally:
        prog.close()

    field = DisplacementField.from_array_frame(phi, fixed)
    field_inv = DisplacementField.from_array_frame(phi_inv, fixed, inverse=field)
    field = DisplacementField(field.image, inverse=field_inv)
    is_identity = np.allclose(init.homogeneous, np.eye(n + 1))
    transform = field if is_identity else Chain([field, init])
    inverse = field_inv if is_identity else Chain([init.inverse(), field_inv])
    from ..resample import resample

    warped = resample(moving, transform, reference=fixed)
    timings = {"total": time.perf_counter() - t_start}
    params = dict(metric=metric, shrink_factors=schedule["shrink_factors"],
                  smoothing_sigmas=schedule["smoothing_sigmas"], iterations=schedule["iterations"],
                  velocity_sigma=velocity_sigma, update_sigma=float(update_sigma), max_step=max_step,
                  bch_terms=int(bch_terms), symmetric=bool(symmetric), max_pieces=int(max_pieces),
                  piece_tol=float(piece_tol), tol=float(tol), lncc_radius=lncc_radius, intensity=intensity,
                  dtype=str(dtype), seed=seed,
                  init=init.homogeneous.tolist(), backend=backend_name(backend), threads=thread_count(),
                  versions=versions(), masks={"fixed": fixed_mask is not None, "moving": moving_mask is not None})
    metrics = dict(path_length=path_length, pieces=len(velocities), ssd_before=energy0, ssd_after=energy,
                   piece_norms=[_v_norm(v, h) for v in velocities])
    return Result(transform=transform, inverse=inverse, warped=warped, history=prog.history, converged=converged,
                  stop_reason=stop_reason, params=params, metrics=metrics, timings=timings, reference=fixed,
                  extras={"velocities": velocities})


# ---------------------------------------------------------------------------------------------- helpers
def _energy(f, w, mask) -> float:
    d = (np.asarray(f, dtype=np.float64) - np.asarray(w, dtype=np.float64))
    if mask is not None:
        d = d[np.asarray(mask)]
    return float(np.mean(d * d))


def _v_norm(v, h) -> float:
    """L² norm of a velocity field in mm: ``sqrt(Σ_x |v(x)|² Π h)``."""
    return float(np.sqrt(np.sum(np.asarray(v, dtype=np.float64) ** 2) * float(np.prod(h))))


def _one_piece(fixed: Image, moving: Image, fmask, mmask, schedule, opts, prog, piece, dtype):
    """One stationary-velocity piece: multi-resolution symmetric log-demons of ``moving`` (on the fixed grid)."""
    best = {}

    def step(level, state, progress):
        _level_step(level, state, progress, opts, piece, dtype, best)

    state, stopped = multiresolution(fixed, moving, step, fixed_mask=fmask,
                                     moving_mask=None if mmask is None else mmask.data, progress=prog,
                                     backend=opts["backend"], **schedule)
    return state, stopped, best.get("energy")


def _level_step(level, state, progress, opts, piece, dtype, best):
    """Iterate symmetric log-demons on one pyramid level; keeps ``state["v"]`` (array frame, mm) current."""
    from ..kernels.diff import gradient
    from ..kernels.fields import expmap
    from ..kernels.smooth import gaussian

    backend = opts["backend"]
    F = np.asarray(level.fixed.data, dtype=dtype)
    M = np.asarray(level.moving.data, dtype=dtype)  # the moving image on the fixed grid (same shape)
    n = F.ndim
    h = tuple(level.fixed.spacing_array_order)
    scale = float(level.shrink)
    sig_v = opts["velocity_sigma"] * scale
    sig_u = opts["update_sigma"] * scale
    max_step = opts["max_step"] * scale
    fmask = level.fixed_mask
    mmask = level.moving_mask
    v = state.get("v")
    if v is None or v.shape[:n] != F.shape:
        v = np.zeros((*F.shape, n), dtype=dtype)
    side = dict(F=F, M=M, gF=gradient(F, spacing=h, backend=backend), h=h, max_step=max_step, fmask=fmask,
                mmask=mmask, metric=opts["metric"], lncc_radius=max(opts["lncc_radius"] * scale, max(h)),
                backend=backend, gM=gradient(M, spacing=h, backend=backend) if opts["symmetric"] else None)
    energies = []
    best_v, best_e = v, math.inf
    for it in range(level.iterations):
        e_v, n_sq = expmap(v, spacing=h, max_voxel_norm=_ITER_EXP_STEP, backend=backend)
        u_f, energy, step = _force(side, e_v, forward=True)
        energies.append(energy)
        if energy < best_e:
            best_e, best_v = energy, v
        if sig_u > 0:
            u_f = gaussian(u_f, sig_u, spacing=h, ndim=n, backend=backend)
        if opts["symmetric"]:
            e_m, _ = expmap(-v, spacing=h, n_squarings=n_sq, backend=backend)  # |−v| = |v|: same count
            u_b, _, _ = _force(side, e_m, forward=False)
            if sig_u > 0:
                u_b = gaussian(u_b, sig_u, spacing=h, ndim=n, backend=backend)
            if opts["bch_terms"] == 2:  # ½[(v + u_f) − (−v + u_b)] = v + ½(u_f − u_b), in place
                z = np.subtract(u_f, u_b, out=u_f)
                z *= 0.5
                z += v
            else:
                z = _bch(v, u_f, opts["bch_terms"], h, backend)
                z -= _bch(-v, u_b, opts["bch_terms"], h, backend)
                z *= 0.5
        else:
            z = _bch(v, u_f, opts["bch_terms"], h, backend)
        if sig_v > 0:
            z = gaussian(z, sig_v, spacing=h, ndim=n, backend=backend)
        v = z.astype(dtype, copy=False)
        state["v"] = v
        progress.emit("iteration", level=level.index, iteration=it, metric=energy, step=step, piece=piece)
        if len(energies) > 5 and abs(energies[-6] - energies[-1]) <= opts["tol"] * abs(energies[0]):
            break
    # the last update is evaluated too; the level keeps its best velocity (Lombaert's rule)
    e_v, _ = expmap(v, spacing=h, max_voxel_norm=_ITER_EXP_STEP, backend=backend)
    last = _force(side, e_v, forward=True)[1]
    if last <= best_e:
        best_e, best_v = last, v
    state["v"] = best_v
    best["energy"] = best_e


def _force(side, disp, *, forward):
    """Update moving ``M∘(id+disp)`` towards ``F`` (forward) or ``F∘(id+disp)`` towards ``M`` (backward).

    Returns ``(u, energy, step)``: the update (array frame, mm), the mean squared difference over the valid voxels
    before the update, and the largest update length (mm).
    """
    from ..kernels.demons import esm_force
    from ..kernels.diff import gradient
    from ..kernels.warp import warp

    h, backend = side["h"], side["backend"]
    inv_h = np.diag(1.0 / np.asarray(h))
    if forward:
        target, source, g_target, own_mask, other_mask = side["F"], side["M"], side["gF"], side["fmask"], side["mmask"]
    else:
        target, source, g_target, own_mask, other_mask = side["M"], side["F"], side["gM"], side["mmask"], side["fmask"]
    warped = warp(source, disp, disp_matrix=inv_h, order=1, mode="itk", cval=0.0, backend=backend)
    other_valid = None
    if other_mask is not None:
        other_valid = warp(other_mask.astype(target.dtype), disp, disp_matrix=inv_h, order=1, mode="itk", cval=0.0,
                           backend=backend) > 0.5
    g_warped = gradient(warped, spacing=h, backend=backend)
    if side["metric"] == "ssd":
        u, ssd, count, step = esm_force(target, warped, g_target, g_warped, disp, spacing=h,
                                        max_step=side["max_step"], mask=own_mask, moving_valid=other_valid,
                                        backend=backend)
        return u, ssd / max(count, 1), step
    return _lncc_force(target, warped, g_warped, disp, own_mask, other_valid, side)


def _lncc_force(target, warped, g_warped, disp, own_mask, other_valid, side):
    """Gradient step on local NCC (ANTs "CC"), scaled so that its longest vector is ``max_step``.

    One fused kernel (:func:`classreg.kernels.lncc.lncc_force`) builds the valid mask (inside the other grid after
    ``disp``, own mask, other mask), evaluates LNCC over it (windows truncated at its border) and returns the force
    ``-dcost/dM · ∇(M∘φ)``.
    """
    from ..kernels.lncc import lncc_force, window_radius

    h = side["h"]
    radius = window_radius(side["lncc_radius"], h, target.ndim)
    u, value, _, norm = lncc_force(target, warped, g_warped, disp, radius=radius, spacing=h, mask=own_mask,
                                   moving_valid=other_valid, backend=side["backend"])
    if norm > 0:
        u *= side["max_step"] / norm
    return u.astype(target.dtype, copy=False), float(value), min(norm, side["max_step"]) if norm else 0.0


def _bch(v, u, terms, h, backend):
    """Baker-Campbell-Hausdorff: log(exp(v)∘exp(u)) ≈ v + u (+ ½[v,u] + 1/12 [v,[v,u]]), Vercauteren 2008 eq. 5."""
    if terms == 2:
        return v + u
    from ..kernels.diff import lie_bracket

    vu = lie_bracket(v, u, spacing=h, backend=backend)
    z = v + u + 0.5 * vu
    if terms == 4:
        z = z + lie_bracket(v, vu, spacing=h, backend=backend) / 12.0
    return z


# ---------------------------------------------------------------------------------------------- command line
def add_cli(subparsers) -> None:
    """``classreg register demons FIXED MOVING -o OUT``."""
    p = subparsers.add_parser("demons", help="symmetric log-domain demons with broken geodesics",
                              description="Register MOVING to FIXED with register_demons and write the warped "
                                          "image, transforms, params.json, history.csv and a QC PNG into OUT.")
    p.add_argument("fixed", help="fixed image (.nii[.gz], .mha, .mhd, .nrrd, .png)")
    p.add_argument("moving", help="moving image")
    p.add_argument("-o", "--output", dest="out", required=True, help="output folder (created)")
    p.add_argument("--init", help="initial fixed→moving affine (ITK .tfm/.txt/.mat/.h5)")
    p.add_argument("--fixed-mask", help="fixed-image mask")
    p.add_argument("--moving-mask", help="moving-image mask")
    p.add_argument("--metric", choices=_METRICS, default="ssd")
    p.add_argument("--shrink", type=float, nargs="+", default=[4, 2, 1], help="shrink factors, coarsest first")
    p.add_argument("--iterations", type=int, nargs="+",
                   help="iterations per level (default: ssd 15 10 5, lncc 30 20 10)")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric forward/backward update (default: ssd yes, lncc no)")
    p.add_argument("--velocity-sigma", type=float,
                   help="velocity smoothing σ in mm (default: ssd 1.5 × spacing, lncc 0.5 mm)")
    p.add_argument("--update-sigma", type=float, help="update smoothing σ in mm (default: ssd 0, lncc 2 mm)")
    p.add_argument("--max-step", type=float, help="largest update in mm (default 2 × spacing)")
    p.add_argument("--max-pieces", type=int, default=5, help="pieces of the broken geodesic")
    p.add_argument("--intensity", choices=("match", "joint"), default="match")
    p.add_argument("--no-qc", action="store_true", help="do not write qc.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_run)


def _cli_run(args) -> int:
    from pathlib import Path

    from ..io import load
    from ..transforms import load_transform

    fixed = load(args.fixed)
    moving = load(args.moving)
    init = load_transform(args.init) if args.init else None
    fmask = load(args.fixed_mask) if args.fixed_mask else None
    mmask = load(args.moving_mask) if args.moving_mask else None
    if args.iterations is not None and len(args.iterations) != len(args.shrink):
        raise ValueError(f"--iterations needs {len(args.shrink)} numbers (one per --shrink level)")
    if args.iterations is None and len(args.shrink) != 3:
        raise ValueError(f"--shrink with {len(args.shrink)} levels needs --iterations (one number per level)")
    res = register_demons(fixed, moving, init=init, metric=args.metric, shrink_factors=tuple(args.shrink),
                          iterations=None if args.iterations is None else tuple(args.iterations),
                          symmetric=args.symmetric, velocity_sigma=args.velocity_sigma,
                          update_sigma=args.update_sigma, max_step=args.max_step, max_pieces=args.max_pieces,
                          intensity=args.intensity, fixed_mask=fmask, moving_mask=mmask, progress=not args.quiet)
    out = Path(args.out)
    res.save(out)
    if not args.no_qc:
        try:
            from ..qc import qc_figure

            qc_figure(res, moving, out / "qc.png", fixed=fixed,
                      title=f"demons: {Path(args.moving).name} → {Path(args.fixed).name}")
        except ImportError as exc:
            print(f"classreg: note: {exc}; no qc.png written")
    m = res.metrics
    print(f"demons: {m['pieces']} piece(s), SSD {m['ssd_before']:.4g} → {m['ssd_after']:.4g}, path length "
          f"{m['path_length']:.4g}, {res.timings['total']:.1f} s; {res.stop_reason}. Wrote {out}/")
    return 0
