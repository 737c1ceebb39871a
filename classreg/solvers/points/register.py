"""``register_points``: Bayesian Coherent Point Drift and multi-organ BCPD on labelled point clouds.

The call checks its inputs, normalises the coordinates (:func:`_frame`), builds the kernel blocks
(:func:`.kernel.kernel_blocks`), runs the VB loop (:func:`_vb_loop`, one :func:`.bcpd.vb_iteration` per step) and
turns the posterior into transforms in mm (:func:`_transforms`) and a :class:`~classreg.Result`.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ...backend import placement, to_device, to_numpy, versions
from ...image import Image
from ...kernels import points as kp
from ...kernels._backend import is_cupy_array
from ...options import declared
from ...progress import Progress, StopRegistration, similarity
from ...result import Result
from .._common import backend_name, one_blas_thread
from .bcpd import EStep, initial_state, rotation_angle, vb_iteration
from .kernel import Kernel, interp_coef, kernel_blocks
from .labels import coherence_matrix, organ_indices, per_label, transition_matrix
from .options import OPTIONS
from .transform import PointDeformation, PointDeformationInverse

__all__ = ["register_points"]

logger = logging.getLogger("classreg")


@declared(OPTIONS)
def register_points(source, target, *, source_labels=None, target_labels=None, mode="nonrigid",
                    deformation="auto", bandwidth="auto", fine_deformation="auto", fine_bandwidth="auto",
                    coherence="organ", label_transition=None,
                    lambda_convention="variance", omega=0.0, kappa=math.inf, gamma=1.0, tol=None,
                    max_iter=500, min_iter=30, rank="auto", lowrank=None, nystrom_samples=None,
                    posterior_covariance=True, truncation=1e-12, estep="auto", estep_landmarks=300,
                    estep_tol=1e-2, estep_precision="float32", pd_guard="jitter", normalize=True,
                    memory_budget_mb=2048, reference=None, seed=0, threads=None, time_limit=None, device=None,
                    backend=None, progress=False, callback=None) -> Result:
    r"""Register a labelled source point cloud onto a target with (multi-organ) Bayesian Coherent Point Drift.

    Implements the variational-Bayes BCPD of Hirose (model of Sec. 4, VB updates of Algorithm 1; see
    :mod:`classreg.solvers.points.bcpd`), with the multi-organ prior of MO-BCPD: the label-aware likelihood with
    transition matrix U (eq. 3), the kernel
    :math:`G_{ij} = f(Λ_{l_i}, Λ_{l_j}) S_{l_i l_j} \exp(-|y_i-y_j|^2 / (2 B_{l_i} B_{l_j}))` (eq. 4) and the
    Gaussian-process interpolation of the displacement to any labelled point (eqs. 5-6). Plain BCPD is the one-organ
    case (``G = λ⁻¹ exp(-|y_i-y_j|²/(2β²))`` with ``deformation = 1/λ``, ``bandwidth = β``).

    Convention: ``source`` is the **moving** point set, ``target`` the **fixed** one. The estimated map
    ``T(y) = s R (y + v(y)) + t`` takes source points into target space; ``result.apply_points(source_points)``
    evaluates it (exact GP interpolation), ``result.transform`` is the fixed→moving pull-back ``T⁻¹`` (fixed-point
    inverse, error in ``metrics["inversion_error_mm"]``) and ``result.apply(image)`` warps a source-space image onto
    the ``reference`` grid (target space).

    Parameters
    ----------
    source, target : array_like (M, D), (N, D)
        Points in mm (D = 2 or 3), one per row, x first.
    source_labels, target_labels : array_like of int, optional
        Organ label of every point. Both or neither. Without labels every point belongs to one organ (plain BCPD).
    mode : {"nonrigid", "similarity", "rigid"}
        "similarity" estimates s, R, t only (no v); "rigid" also fixes s = 1.
    deformation : "auto", float, sequence or dict {label: value}
        Λ_l, the deformation magnitude per organ: prior variance of each displacement coordinate (mm²; the paper
        writes mm; MO-BCPD used 10, i.e. BCPD's λ = 0.1). "auto" (default): (0.2 r)², r the source's RMS radius.
    bandwidth : "auto", float, sequence or dict
        B_l, coherence bandwidth per organ in mm (BCPD's β; MO-BCPD used 30 mm). "auto" (default): r.
    fine_deformation, fine_bandwidth : "auto" or float
        Λ_f (mm²) and β_f (mm) of the fine scale added to the kernel: ``Λ_f S exp(-d²/(2β_f²)) ψ(d/(4β_f))``
        with the Wendland taper ψ (positive definite, compactly supported; :mod:`classreg.solvers.points.sparse`).
        "auto": Λ_f = h², β_f = 1.5 h (h: the source's mean nearest-neighbour spacing) when ``deformation`` and
        ``bandwidth`` are "auto" too, else no fine scale (one-scale BCPD). ``fine_deformation=0``: none. The fine
        scale enters once σ < 0.5 β_f (coarse to fine).
    coherence : {"organ", "global"} or array (L, L)
        Inter-organ coherence S: "organ" = identity (OMC-MO-BCPD: organs deform independently, block-diagonal
        kernel), "global" = all ones (GMC-MO-BCPD), or a symmetric matrix in [0, 1] with unit diagonal
        (ordered like the sorted label values).
    label_transition : array (L, L) or float, optional
        U[l, l'] = P(target label l | source organ l'), columns over source organs. A float e is shorthand for
        :func:`~classreg.solvers.points.label_transition_matrix` (uniform label noise e). Default identity
        (error-free labels).
    lambda_convention : {"variance", "product"}
        How Λ enters the kernel: "variance" uses sqrt(Λ_iΛ_j) (G_ii = Λ, reproduces BCPD with λ = 1/Λ — the
        paper's stated equivalence Λ = 10 ↔ λ = 0.1); "product" uses Λ_iΛ_j exactly as printed in eq. 4.
    omega : float in [0, 1)
        Outlier probability ω (uniform outlier density 1/V, V = bounding-box volume of the target).
    kappa : float
        Dirichlet concentration κ of the mixing weights; ``inf`` (default) keeps α_m = 1/M.
    gamma : float
        Scale of the initial σ: ``σ₀ = γ sqrt(Σ_mn |x_n - y_m|² / (MND))``.
    tol : float, optional
        Convergence tolerance in mm: stop when σ < tol or |Δσ| < tol (after ``min_iter``). Default
        max(1e-4 × the target's RMS radius (BCPD's default in its normalised units), 1e-2 × the source's mean
        nearest-neighbour spacing).
    max_iter, min_iter : int
        VB loop bounds (BCPD: 500 / 30).
    rank : "auto", "full" or int
        Rank K of the kernel approximation per kernel block: "full" solves with the exact M×M kernel (Cholesky);
        an int uses the top-K eigenpairs and the Woodbury identity (O(MK²) per iteration). "auto": full rank for
        blocks of ≤ 1500 points, else K = 100; with a fine scale, full rank up to 500 points, else K = 50 Nyström
        eigenpairs of the coarse scale, the fine scale solved as a sparse matrix by conjugate gradients (mean-field
        update of the two scales; the fine scale's posterior variances are taken as 0).
    lowrank : {"eigsh", "nystrom"}, optional
        How the top-K eigenpairs are found: Lanczos (scipy ``eigsh``, on the dense block if it fits the memory
        budget) or a Nyström estimate from ``nystrom_samples`` random points (BCPD's ``-K/-J``). Default: "eigsh"
        up to 3000 points per block, else "nystrom".
    nystrom_samples : int, optional
        Landmarks of the Nyström estimate (default max(300, 3K)).
    posterior_covariance : bool
        Use the posterior variances σ_m² of v in the updates (the paper's algorithm; BCPD's C code ``-a``).
    truncation : float in [0, 1)
        E-step: Gaussian factors exp(-d²/2σ²) below this are treated as zero (0 = exact), i.e. only pairs within
        ``σ sqrt(2 ln(1/truncation))`` (7.4σ for the default) are summed.
    estep : {"auto", "exact"}
        How the E-step sums are computed. "exact": the truncated sums over all pairs (numba, spatially blocked,
        deterministic). "auto" (default): while σ is large, an approximation checked every iteration against the
        exact sums on 64 random probe target and source points; once its error exceeds ``estep_tol`` (relative
        error of the denominators Σ_m φ_mn and of ν_m, and error of x̂_m in units of σ), that iteration and all
        later ones do without it (BCPD's ``-A`` likewise switches to a KD-tree neighbour search once σ is small).
        First choice, in every iteration where it costs less than a quarter of the exact sums (its cost falls with
        σ^D): the grid estimate :func:`classreg.kernels.points.estep_grid` (splat onto cells of σ/2, Gaussian
        filter, interpolate; relative errors ~2e-3; numba backend only). Else, where M N ≥ 4 J (M + N), the Nyström estimate of BCPD's
        acceleration (Hirose 2021, Sec. 5; the C code's ``-J`` option; :func:`classreg.kernels.points.estep_nystrom`)
        with ``estep_landmarks`` random landmarks from X ∪ Ŷ redrawn every iteration. Else the exact sums.
    estep_landmarks : int
        J, Nyström landmarks of the E-step (BCPD's ``-J``, default 300).
    estep_tol : float
        Largest probe error accepted from the grid or Nyström E-step (default 0.01).
    estep_precision : {"float32", "float64"}
        Arithmetic of the exact E-step's pair loop (sums across blocks are float64 either way). float32 (default)
        is faster; its Gaussian factors have relative error < 3e-5 and the E-step outputs agree with
        float64 to ~1e-5 relative (float64 is used anyway once σ < 1e-4 × the point-set extent). float64 gives
        1e-12.
    pd_guard : {"jitter", "raise"}
        If the kernel is not positive semi-definite (possible when S has off-diagonal mass and B varies between
        organs): add the smallest diagonal jitter that fixes it (recorded in ``params``) or raise.
    normalize : bool
        Work internally on coordinates centred on the target centroid and divided by its RMS radius (lengths
        converted accordingly; the result is the same up to rounding, reported in mm).
    memory_budget_mb : float
        Largest dense array (kernel block, E-step block) allowed; a full-rank kernel that does not fit raises
        ValueError suggesting ``rank=K``.
    reference : Image, optional
        A target-space image grid; stored as ``result.reference`` so that ``result.apply(source_image)`` works.
    seed : int
        Seed of every random choice (Nyström landmarks, probes, eigsh start vector).
    threads : int, optional
        CPU threads of the numba kernels during the call.
    time_limit : float, optional
        Seconds of wall-clock time; the first iteration past it stops the run, which returns its current estimate
        with ``stop_reason`` "time limit of ... s reached".
    device : {None, "cpu", "cuda", "cuda:N"}
        Where the VB loop runs. "cuda" (also CuPy ``source``/``target`` with ``device=None``, or ``backend="cuda"``
        on a machine with a GPU): the point sets, the posterior and the kernel blocks go to the GPU once and stay
        there for every iteration — the exact E-step (the blocked float64 array code, CuPy), the v-update
        (``cupy.linalg`` Cholesky / eigh, ``cupyx.scipy.linalg`` solves), the α, similarity and σ² updates — with
        only scalars read back; the posterior comes back once at the end, where the transform is built. The fine
        scale of low-rank blocks (point sets above the full-rank size with the two-scale kernel) runs there too: its
        CSR matrix goes up once (``cupyx.scipy.sparse``), its conjugate gradients read one scalar every few steps.
        Not on the device: the grid and Nyström E-steps (the exact one runs instead); organ labels cost an upload
        of the label indices per iteration. Needs the ``gpu`` extra and a CUDA device.
    backend : {None, "numpy", "numba", "cuda"}
        E-step backend (default numba when installed). ``"cuda"`` computes the E-step sums with CuPy in float64.
    progress : bool
        tqdm progress bar.
    callback : callable, optional
        ``callback(event)`` per VB iteration (``metric`` = σ in mm, ``step`` = |Δσ|); raise
        :class:`classreg.StopRegistration` to stop.

    Returns
    -------
    Result
        ``transform`` (target → source, :class:`~classreg.solvers.points.PointDeformationInverse`), ``inverse``
        (source → target, :class:`~classreg.solvers.points.PointDeformation`), ``history`` (per VB iteration:
        sigma, scale, n_hat, ...), ``converged``, ``stop_reason``, ``params`` (every resolved parameter, lengths in
        mm), ``metrics``, ``timings``.

    Raises
    ------
    ValueError
        Wrong shapes, NaN/Inf, empty sets, a single or only coincident points in a set, coordinates beyond ±1e100 mm
        or a target radius below 1e-100 mm (normalize=False: beyond [1e-15, 1e15] mm), point sets whose sizes or
        positions differ by ~1e10 or more, mismatched label lengths, a target label without source points, option
        values out of range, memory budget exceeded, a run whose scale collapses to 0.
    TypeError
        Non-numeric points or labels, non-integer labels, option values of the wrong type.

    Notes
    -----
    Point sets of any size within those limits are registered in the normalised frame (``normalize=True``), so a
    10 µm cloud works as well as a 10 cm one; the kernel parameters stay in mm, and a bandwidth far larger than the
    cloud makes the displacement prior practically a translation plus a linear field (a warning says so). A source
    organ without target points follows the similarity (and, with ``coherence``, the other organs), with a warning.

    References
    ----------
    O. Hirose, "A Bayesian formulation of coherent point drift", IEEE TPAMI 43(7):2269-2286, 2021,
    doi:10.1109/TPAMI.2020.2971687.
    "Multi-organ Bayesian coherent point drift" (MO-BCPD), WBIR 2022 (eqs. 3-6).
    """
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it receives classreg.Event objects), got "
                        f"{type(callback).__name__}")
    with one_blas_thread():
        t_start = time.perf_counter()
        dev, backend = placement(device, backend, source, target)
        # the host sees CuPy inputs once (anything else is checked as given)
        source, target = (to_numpy(a) if is_cupy_array(a) else a for a in (source, target))
        fr = _frame(source, target, source_labels, target_labels, reference, normalize, tol, mode)
        n_org = len(fr.values)
        two_scale = _two_scale(mode, deformation, bandwidth, fine_deformation)

        def warm_up():  # the same kernels on tiny clouds, before the bar (progress=True only)
            _warm_up(fr, mode=mode, rank=rank, lowrank=lowrank, label_transition=label_transition,
                     lambda_convention=lambda_convention, omega=omega, kappa=kappa,
                     posterior_covariance=posterior_covariance, estep=estep, estep_precision=estep_precision,
                     normalize=normalize, backend=backend, two_scale=two_scale)

        prog = Progress("register_points", callback=callback, progress=progress, total=int(max_iter),
                        time_limit=time_limit, warm_up=warm_up,
                        warm_key=(fr.x.shape[1], n_org > 1, mode, estep, estep_precision, str(backend),
                                  _warm_rank(fr, rank, lowrank, two_scale)))
        scales = _auto_scales(fr, deformation, bandwidth, fine_deformation, fine_bandwidth)
        lam = per_label(scales["deformation"], fr.values.tolist(), "deformation")
        bw = per_label(scales["bandwidth"], fr.values.tolist(), "bandwidth")
        S, U = coherence_matrix(coherence, n_org), transition_matrix(label_transition, n_org)
        be = backend_name(backend)
        budget = float(memory_budget_mb) * 2**20
        fine = (scales["fine_deformation"], scales["fine_bandwidth"]) if mode == "nonrigid" else None
        kern_mm = Kernel(lam, bw, S, lambda_convention, fine=fine)
        t_setup = time.perf_counter()
        blocks, ranks, jitter = [], [], 0.0
        kern_n = kern_mm.scaled(fr.r) if mode == "nonrigid" else None
        if mode == "nonrigid" and float(bw.min()) > WIDE_BANDWIDTH * fr.radius:
            logger.warning("register_points: bandwidth %s mm is %.3g× the target's RMS radius (%.3g mm): over the "
                           "cloud the displacement prior is practically a translation plus a linear field; give "
                           "bandwidth (mm) and deformation (mm²) on the scale of the points for a non-rigid fit",
                           bw.tolist(), float(bw.min()) / fr.radius, fr.radius)
        if mode == "nonrigid" and kern_n.check_scale(lam, fr.radius):
            blocks, ranks, jitter = kernel_blocks(
                kern_n, fr.y, fr.ly_s, rank=rank, lowrank=lowrank, nystrom_samples=nystrom_samples,
                budget=budget, pd_guard=pd_guard, rng=np.random.default_rng(seed), r=fr.r)
        elif mode == "nonrigid":
            logger.warning("register_points: the displacement prior (deformation %s mm²) is negligible for point "
                           "sets of RMS radius %.3g mm; only the similarity is estimated", lam.tolist(), fr.radius)
        t_setup = time.perf_counter() - t_setup
        st = initial_state(fr.y, fr.x, gamma, len(blocks))
        params = _params(fr, lam, bw, S, U, st, rank=ranks, jitter_mm2=jitter, backend=be,
                         fine_deformation_mm2=scales["fine_deformation"], fine_bandwidth_mm=scales["fine_bandwidth"],
                         mean_spacing_mm=scales["spacing"], source_radius_mm=scales["source_radius"])
        e_step = EStep(fr.x, fr.lx_s, fr.ly_s, U, omega=omega, volume=fr.volume, truncation=truncation,
                       precision=estep_precision, mode=estep, landmarks=estep_landmarks, tol=estep_tol, seed=seed,
                       backend=be, budget=budget)
        if dev == "cuda":
            # the device-resident loop runs the exact E-step (the Nyström and grid ones are not ported)
            e_step.nystrom_on = e_step.grid_on = False
        t_loop = time.perf_counter()
        it, converged, stop_reason = _vb_loop(st, e_step, blocks, fr, prog, params["method"], mode=mode, kappa=kappa,
                                              posterior_covariance=posterior_covariance, max_iter=max_iter,
                                              min_iter=min_iter, device=dev)
        t_loop = time.perf_counter() - t_loop
        if converged:
            _warn_if_collapsed(st, fr)
        t_fin = time.perf_counter()
        fwd, inv, interp = _transforms(fr, blocks, st, kern_mm, mode, seed)
        t_fin = time.perf_counter() - t_fin
        metrics = _metrics(fr, st, it, e_step.n_nystrom, interp, inv)
        metrics["grid_estep_iterations"] = e_step.n_grid
        metrics["fine_cg_steps"] = int(sum(kb.get("cg_steps", 0) for kb in blocks))
        timings = {"total": time.perf_counter() - t_start, "kernel_setup": t_setup, "vb_loop": t_loop,
                   "finalize": t_fin, "per_iteration": t_loop / max(it, 1), **prog.timings}
        _close(prog, metrics["sigma_mm"], stop_reason)
        return Result(transform=inv, inverse=fwd, warped=None, history=list(prog.history), converged=converged,
                      stop_reason=stop_reason, params=params, metrics=metrics, timings=timings, reference=reference)


# ================================================================================================ automatic scales
#: ``deformation="auto"``: (AUTO_DEFORMATION × the source's RMS radius)²
AUTO_DEFORMATION = 0.2
#: ``bandwidth="auto"``: AUTO_BANDWIDTH × the source's RMS radius
AUTO_BANDWIDTH = 1.0
#: ``fine_deformation="auto"``: (AUTO_FINE_DEFORMATION × h)², h the source's mean nearest-neighbour spacing
AUTO_FINE_DEFORMATION = 1.0
#: ``fine_bandwidth="auto"``: AUTO_FINE_BANDWIDTH × h
AUTO_FINE_BANDWIDTH = 1.5


def _is_auto(v) -> bool:
    return isinstance(v, str) and v == "auto"


def _auto_scales(fr: _Frame, deformation, bandwidth, fine_deformation, fine_bandwidth) -> dict:
    """The kernel scales in mm, with every ``"auto"`` replaced by its rule (docs/solvers/points.md, "Defaults"):
    Λ = (0.2 r)², B = r with r the source's RMS radius (the coarse scale: smooth motion of the whole cloud and its
    extrapolation inside it); Λ_f = h², β_f = 1.5 h with h the mean distance of a source point to its nearest
    other source point (the fine scale: the finest deformation the sampling resolves). The fine scale is on by
    default only when deformation and bandwidth are automatic too (explicit Λ, B give one-scale BCPD)."""
    Y = fr.Y
    r_src = _centre_radius(Y)[1]
    h = fr.spacing
    if not h > 0:
        h = r_src / max(len(Y), 1) ** (1.0 / 3.0)  # only duplicates: the spacing of as many points in the radius
    all_auto = _is_auto(deformation) and _is_auto(bandwidth)
    out = {"deformation": (AUTO_DEFORMATION * r_src) ** 2 if _is_auto(deformation) else deformation,
           "bandwidth": AUTO_BANDWIDTH * r_src if _is_auto(bandwidth) else bandwidth,
           "spacing": h, "source_radius": r_src}
    if _is_auto(fine_deformation):
        fine_deformation = (AUTO_FINE_DEFORMATION * h) ** 2 if all_auto else 0.0
    fine_bandwidth = AUTO_FINE_BANDWIDTH * h if _is_auto(fine_bandwidth) else fine_bandwidth
    for name, v in (("fine_deformation", fine_deformation), ("fine_bandwidth", fine_bandwidth)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"register_points: {name} must be a number or 'auto', got {v!r}") from None
        if not (math.isfinite(v) and v >= 0) or (name == "fine_bandwidth" and v == 0):
            raise ValueError(f"register_points: {name} must be finite and {'positive' if name == 'fine_bandwidth' else '>= 0'}"
                             f", got {v!r}")
        out[name] = v
    return out


# ================================================================================================ kernel warm-up
def _warm_rank(fr, rank, lowrank, two_scale=False):
    """``(rank, lowrank)`` that selects, on tiny clouds, the kernel-block path the real call takes (full rank up to
    1500 source points per organ, else low rank by eigsh up to 3000, else Nyström; with a fine scale full rank up to
    500, else Nyström; see the ``rank`` option)."""
    per_block = int(np.bincount(fr.ly_s).max()) if len(fr.ly_s) else 0
    if rank == "full" or (rank == "auto" and per_block <= (500 if two_scale else 1500)):
        return "full", None
    return 3, lowrank or ("eigsh" if per_block <= 3000 and not two_scale else "nystrom")


def _two_scale(mode, deformation, bandwidth, fine_deformation) -> bool:
    """Whether the call's kernel gets a fine scale (see :func:`_auto_scales`)."""
    if mode != "nonrigid":
        return False
    if _is_auto(fine_deformation):
        return _is_auto(deformation) and _is_auto(bandwidth)
    try:
        return float(fine_deformation) > 0
    except (TypeError, ValueError):
        return False


def _warm_up(fr, *, mode, rank, lowrank, label_transition, estep, backend, two_scale=False, **same):
    """:func:`register_points` on tiny clouds (60 source and 48 target points, 2 organs if the real call has
    labels) with the options that select kernels: its compiled kernels are the real call's."""
    D = fr.x.shape[1]
    rng = np.random.default_rng(0)
    y = rng.normal(scale=30.0, size=(60, D))
    x = 1.05 * y[:48] + 2.0
    labelled = len(fr.values) > 1
    ly = (y[:, 0] > 0).astype(np.int64) if labelled else None
    lx = ly[:48] if labelled else None
    if labelled:
        ly[0], ly[1], lx[0], lx[1] = 0, 1, 0, 1  # both organs present on both sides
    wr, wl = _warm_rank(fr, rank, lowrank, two_scale)
    register_points(y, x, fine_deformation="auto" if two_scale else 0.0, source_labels=ly, target_labels=lx, mode=mode, rank=wr, lowrank=wl, nystrom_samples=20,
                    label_transition=label_transition if np.ndim(label_transition) == 0 else None, estep=estep,
                    estep_landmarks=4, max_iter=3, min_iter=5, backend=backend, **same)


# ================================================================================================ inputs
@dataclass
class _Frame:
    """The two point sets in mm (input order) and in the normalised, spatially ordered frame of the VB loop:
    ``y = (Y[oy] - c0) / r``, ``x = (X[ox] - c0) / r``, organ indices ``ly_s``/``lx_s`` in that order, the
    tolerance in mm and normalised, and the target's bounding-box volume V (normalised, the outlier density)."""

    Y: np.ndarray
    X: np.ndarray
    ly: np.ndarray
    values: np.ndarray
    oy: np.ndarray
    y: np.ndarray
    x: np.ndarray
    ly_s: np.ndarray
    lx_s: np.ndarray
    c0: np.ndarray
    r: float
    tol_mm: float
    tol_n: float
    volume: float
    radius: float = 1.0
    spacing: float = 0.0


def _frame(source, target, source_labels, target_labels, reference, normalize, tol, mode="nonrigid") -> _Frame:
    """Check the points, labels and reference; centre on the target centroid and divide by its RMS radius (when
    ``normalize``); order both sets spatially (per organ) for the blocked E-step."""
    Y = _check_points(source, "source")
    X = _check_points(target, "target")
    D = Y.shape[1]
    if X.shape[1] != D:
        raise ValueError(f"source and target must have the same dimension, got {D}-D source and {X.shape[1]}-D target")
    if mode == "nonrigid" and len(Y) < 3:
        raise ValueError(f"source has only {len(Y)} points: mode='nonrigid' needs at least 3 (with 2 the displacement "
                         "prior absorbs the similarity and the scale collapses); use mode='similarity' or 'rigid'")
    if reference is not None and not isinstance(reference, Image):
        raise TypeError(f"reference must be a classreg.Image (a target-space grid), got {type(reference).__name__}")
    if reference is not None and reference.ndim != D:
        raise ValueError(f"reference is {reference.ndim}-D but the points are {D}-D")
    values, ly, lx = organ_indices(source_labels, target_labels, len(Y), len(X))
    c0, rad = _centre_radius(X)
    if rad < MIN_RADIUS:
        raise ValueError(f"target has an RMS radius of {rad:.3g} mm, below the {MIN_RADIUS:.0e} mm that "
                         "register_points computes with (squared distances underflow float64); rescale the points")
    r = rad if normalize else 1.0
    if not r > 0:
        r = 1.0
    if not normalize:
        c0 = np.zeros(D)
    spacing = _mean_spacing(Y)
    tol_mm = max(TOL_RADIUS * float(rad or 1.0), TOL_SPACING * spacing) if tol is None else float(tol)
    oy = kp.spatial_order(Y, ly)
    ox = kp.spatial_order(X, lx)
    y = (Y[oy] - c0) / r
    x = (X[ox] - c0) / r
    _check_frame(y, x, Y, X, c0, rad, normalize)
    span = x.max(0) - x.min(0)
    volume = float(np.prod(np.where(span > 0, span, 1.0)))
    return _Frame(Y=Y, X=X, ly=ly, values=values, oy=oy, y=y, x=x, ly_s=ly[oy], lx_s=lx[ox], c0=c0, r=r,
                  tol_mm=tol_mm, tol_n=tol_mm / r, volume=volume, radius=rad, spacing=spacing)


#: default tolerance: TOL_RADIUS × the target's RMS radius (BCPD's 1e-4 in its normalised units) or TOL_SPACING ×
#: the source's mean nearest-neighbour spacing, whichever is larger (σ a hundredth of the spacing: every target
#: point is explained by one source point and the correspondences no longer change)
TOL_RADIUS = 1e-4
TOL_SPACING = 1e-2


def _mean_spacing(P) -> float:
    """Mean distance of a point of ``P`` to its nearest other point (0 when all coincide)."""
    from scipy.spatial import cKDTree

    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        d = cKDTree(P).query(P, 2)[0][:, 1]
    d = d[np.isfinite(d)]
    return float(d.mean()) if d.size else 0.0


#: |coordinates| accepted, mm: squares (and the mm-space kernel of the GP interpolation) stay finite in float64
MAX_COORDINATE = 1e100
#: smallest RMS radius of the target accepted, mm (squared distances stay normal float64 numbers)
MIN_RADIUS = 1e-100
#: the working frame (normalised, or mm with normalize=False) must keep coordinates within [-FRAME_MAX, FRAME_MAX]
#: and each set's RMS radius above 1 / FRAME_MAX: squared distances over σ² then stay finite and normal in the
#: float32 pair loop of the E-step (float64 sums)
FRAME_MAX = 1e15
#: with normalize=True the source's RMS radius must exceed this fraction of its largest coordinate in the target's
#: frame (else its shape is lost to rounding: sizes or positions differing by ~1e10 or more)
FRAME_PRECISION = 1e-10


def _centre_radius(P):
    """Centroid and RMS radius of the points ``P``: the plain float64 formula, and for extents whose squares
    overflow or underflow (radius outside [1e-140, 1e140]) the same computed on the points scaled by a power of
    two (exact), so that the radius is right (and error messages quote it) at any scale."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        c0 = P.mean(0)
        rad = float(np.sqrt(((P - c0) ** 2).sum(1).mean()))
    if np.all(np.isfinite(c0)) and 1e-140 < rad < 1e140:
        return c0, rad
    big = float(np.abs(P).max())
    if not 0 < big < math.inf:
        return c0, rad
    p = 2.0 ** math.floor(math.log2(big))
    Ps = P / p
    cs = Ps.mean(0)
    rad = float(np.sqrt(((Ps - cs) ** 2).sum(1).mean())) * p
    return cs * p, rad


def _check_frame(y, x, Y, X, c0, rad_x, normalize):
    """Refuse point sets whose working-frame coordinates would overflow or underflow (see :data:`FRAME_MAX`), and
    a source whose shape is lost to rounding in the target's frame."""
    ymax, xmax = float(np.abs(y).max()), float(np.abs(x).max())
    rad_y = _centre_radius(y)[1]
    if not normalize:
        if max(ymax, xmax) > FRAME_MAX:
            name, big = ("source", ymax) if ymax >= xmax else ("target", xmax)
            raise ValueError(f"{name} has coordinates up to {big:.3g} mm, beyond the {FRAME_MAX:.0e} mm that "
                             "normalize=False supports (squared distances overflow); use normalize=True (the default)")
        small = min(rad_y, rad_x)
        if small < 1 / FRAME_MAX:
            name = "source" if rad_y <= small else "target"
            raise ValueError(f"{name} has an RMS radius of {small:.3g} mm, below the {1 / FRAME_MAX:.0e} mm that "
                             "normalize=False supports (squared distances underflow); use normalize=True (the "
                             "default)")
        return
    if not (ymax <= FRAME_MAX and rad_y >= 1 / FRAME_MAX and rad_y > FRAME_PRECISION * ymax):
        cy, rad_src = _centre_radius(Y)
        with np.errstate(over="ignore"):
            dist = float(np.sqrt((((cy - c0) / rad_x) ** 2).sum())) * rad_x
        raise ValueError(f"source and target differ too much in size or position to be registered (source RMS "
                         f"radius {rad_src:.3g} mm, target RMS radius {rad_x:.3g} mm, centroids {dist:.3g} mm "
                         "apart): are they in the same units?")


def _check_points(a, name):
    if a is None:
        raise TypeError(f"{name} must be an (N, 2) or (N, 3) array of points in mm, got None")
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an (N, 2) or (N, 3) array of points in mm (one point per row); it cannot "
                         f"be read as an array: {exc}") from None
    if arr.dtype.kind == "O":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real numeric array of points, got dtype object with non-numeric "
                            "entries") from None
    if arr.dtype.kind not in "iuf":
        what = " (a mask? points are coordinates in mm)" if arr.dtype.kind == "b" else ""
        raise TypeError(f"{name} must be a real numeric array of points, got dtype {arr.dtype}{what}")
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(f"{name} must have shape (N, 2) or (N, 3) (one point per row, x first), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty; it needs at least one point")
    with np.errstate(over="ignore"):
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = int((~np.isfinite(arr).all(1)).sum())
        raise ValueError(f"{name} contains {bad} point(s) with NaN or Inf coordinates; remove them first")
    big = float(np.abs(arr).max())
    if big > MAX_COORDINATE:
        raise ValueError(f"{name} has coordinates up to {big:.3g} mm, beyond the ±{MAX_COORDINATE:.0e} mm that "
                         "register_points accepts (their squares would overflow float64 sums); rescale the points")
    if arr.shape[0] == 1:
        raise ValueError(f"{name} has a single point; register_points needs at least 2 distinct points in each set "
                         "(scale and rotation are undefined for one point)")
    if np.all(arr == arr[0]):
        raise ValueError(f"{name}: all {arr.shape[0]} points coincide (zero extent); register_points needs at least "
                         "2 distinct points in each set")
    return arr


def _params(fr: _Frame, lam, bw, S, U, st, **resolved) -> dict:
    """``Result.params`` entries resolved or derived from the data (lengths in mm); the options as passed are
    recorded by the declaration (:func:`classreg.options.declared`)."""
    n_org, r, D = len(fr.values), fr.r, fr.x.shape[1]
    try:
        volume_mm3 = fr.volume * r**D
    except OverflowError:  # point sets beyond ~1e100 mm
        volume_mm3 = math.inf
    block_diag = np.allclose(S, np.eye(n_org))
    method = ("OMC-MO-BCPD" if (n_org > 1 and block_diag) else "GMC-MO-BCPD" if n_org > 1 and np.allclose(S, 1)
              else "MO-BCPD" if n_org > 1 else "BCPD")
    return dict(
        solver="register_points", method=method,
        convention="source = moving, target = fixed; transform: target -> source (T^-1); "
                   "inverse/apply_points: source -> target (T)",
        n_source=len(fr.Y), n_target=len(fr.X), ndim=D, labels=fr.values.tolist(), deformation=lam.tolist(),
        bandwidth=bw.tolist(), deformation_mm2=lam.tolist(), bandwidth_mm=bw.tolist(), coherence=S.tolist(),
        label_transition=U.tolist(), bcpd_lambda=(1.0 / lam).tolist(), tol_mm=fr.tol_mm,
        normalization_center_mm=fr.c0.tolist(), normalization_scale_mm=r, sigma_init_mm=math.sqrt(st.sigma2) * r,
        volume_mm3=volume_mm3, dtype="float64", versions=versions(), **resolved)


# ================================================================================================ the VB loop
def _vb_loop(st, estep, blocks, fr: _Frame, prog, method, *, mode, kappa, posterior_covariance, max_iter, min_iter,
             device="cpu"):
    """Iterate :func:`.bcpd.vb_iteration` until σ or |Δσ| falls below the tolerance (after ``min_iter``), σ or s
    stop being finite, ``max_iter`` or the callback's StopRegistration. Returns ``(iterations, converged,
    stop_reason)``; ``st`` holds the posterior (on the host).

    ``device="cuda"``: the point sets, the posterior and the kernel blocks go to the device once, before the first
    iteration, and the posterior and the blocks come back once, after the last; in between only scalars are read."""
    converged = False
    stop_reason = f"max_iter={max_iter} reached"
    r, tol_n = fr.r, fr.tol_n
    sigma = math.sqrt(st.sigma2)
    x, y, c0 = fr.x, fr.y, fr.c0
    if device == "cuda":
        x, y, c0 = estep.x_dev, to_device(y, device), to_device(c0, device)
        _state_to(st, blocks, device)
    near = _NearestTarget(fr.x, len(fr.y), x)
    it = 0
    try:
        prog.emit("start", extra={"n_source": len(fr.y), "n_target": len(fr.x), "method": method})
        prog.emit("level_start", level=0)
        for it in range(1, int(max_iter) + 1):
            used = vb_iteration(st, estep, blocks, x, y, mode=mode, kappa=kappa,
                                posterior_covariance=posterior_covariance, it=it)
            old, sigma = sigma, math.sqrt(st.sigma2)
            diff = abs(sigma - old)
            sim = near.similarity(st.yhat)
            prog.emit("iteration", level=0, iteration=it, metric=sigma * r, similarity=sim, step=diff * r,
                      extra=_record(st, fr, sigma, diff, used, c0))
            if st.s == 0:
                raise ValueError(f"register_points diverged at iteration {it}: the scale collapsed to 0 (no source "
                                 "point kept a correspondence). Check that source and target overlap (they are "
                                 "centred on the target's centroid, not each on its own) and that gamma, deformation "
                                 "(mm²) and bandwidth (mm) suit their size")
            if it > min_iter and (sigma < tol_n or diff < tol_n):
                converged = True
                stop_reason = (f"converged: sigma {sigma * r:.3g} mm < tol {fr.tol_mm:.3g} mm" if sigma < tol_n else
                               f"converged: |Δσ| = {diff * r:.3g} mm < tol {fr.tol_mm:.3g} mm")
                break
            if not np.isfinite(st.sigma2) or not np.isfinite(st.s):
                stop_reason = "diverged (non-finite sigma or scale)"
                break
        prog.emit("level_end", level=0)
    except StopRegistration:
        stop_reason = prog.stop_reason
        converged = False
    finally:
        if device == "cuda":  # the result once
            _state_to(st, blocks, "cpu")
    return it, converged, stop_reason


#: the array-valued entries of the State and of a kernel block the VB loop updates or reads
_STATE_ARRAYS = ("R", "t", "yhat", "uhat", "vhat", "alpha", "sig_m2")
_BLOCK_ARRAYS = ("G", "Gf", "Q", "Q32", "lam")


def _state_to(st, blocks, device) -> None:
    """Move the posterior and the kernel blocks to ``device`` ("cuda": each array up once, the blocks' point
    indices as ``idx_dev``, a fine-scale CSR matrix as ``fine_dev``, a ``cupyx.scipy.sparse.csr_matrix``; "cpu":
    each array down once, the device copies of the indices and the fine matrix dropped, the CG step count read), in
    place."""
    move = (lambda a: to_device(a, "cuda")) if device == "cuda" else to_numpy
    for name in _STATE_ARRAYS:
        setattr(st, name, move(getattr(st, name)))
    st.coef = [None if W is None else (tuple(move(w) for w in W) if isinstance(W, tuple) else move(W))
               for W in st.coef]
    for kb in blocks:
        for name in _BLOCK_ARRAYS:
            if name in kb:
                kb[name] = move(kb[name])
        if kb.get("vf") is not None:
            kb["vf"] = move(kb["vf"])
        if device == "cuda":
            kb["idx_dev"] = move(kb["idx"])
            if "fine" in kb:
                from cupyx.scipy.sparse import csr_matrix

                kb["fine_dev"] = csr_matrix(kb["fine"])
        else:
            kb.pop("idx_dev", None)
            kb.pop("fine_dev", None)
            if "cg_steps" in kb:
                kb["cg_steps"] = int(kb["cg_steps"])


class _NearestTarget:
    """The normalised similarity of a VB iterate (:func:`classreg.progress.similarity`, the one every solver
    reports): NCC of deformed source points and their nearest target points, each coordinate centred — the point-set
    counterpart of the NCC of fixed and warped intensities. Evaluated on at most :data:`SIMILARITY_POINTS` source
    points spread over the (spatially ordered) set, against a k-d tree of all targets built once."""

    def __init__(self, x, m, x_dev=None):
        from scipy.spatial import cKDTree

        self.x = x
        self.sub = np.unique(np.linspace(0, m - 1, min(m, SIMILARITY_POINTS)).astype(np.intp))
        if x_dev is None or x_dev is x:
            self.tree = cKDTree(x)
        else:  # on the device: brute-force nearest targets, in blocks (no tree, nothing copied)
            self.tree, self.x = None, x_dev
            self.sub = to_device(self.sub, "cuda")
            self.xx = (x_dev * x_dev).sum(1)

    def similarity(self, yhat) -> float:
        y = yhat[self.sub]
        if self.tree is None:
            return self._similarity_device(y)
        if not np.all(np.isfinite(y)):
            return float("nan")
        _, nn = self.tree.query(y)
        return similarity(y, self.x[nn], columns=True)

    def _similarity_device(self, y) -> float:
        from ...kernels._backend import get_array_module

        xp = get_array_module(y)
        if not xp.all(xp.isfinite(y)):
            return float("nan")
        step = max(1, (1 << 22) // max(len(self.x), 1))  # (step × N) distances per block
        nn = xp.concatenate([xp.argmin(self.xx[None, :] - 2.0 * (y[i:i + step] @ self.x.T), axis=1)
                             for i in range(0, len(y), step)])
        return similarity(y, self.x[nn], columns=True)


#: source points on which the similarity of each VB iteration is evaluated (a progress figure; a k-d tree query
#: of this many points per iteration)
SIMILARITY_POINTS = 500


def _warn_if_collapsed(st, fr: _Frame) -> None:
    """Log a warning when a converged run ends with σ at a sizeable fraction of the target's RMS radius: the target
    points are then explained as noise around a shrunken source (BCPD's scale collapse, e.g. point sets that
    hardly overlap), not matched."""
    sigma_mm = math.sqrt(st.sigma2) * fr.r
    if sigma_mm > COLLAPSE_SIGMA * fr.radius:
        logger.warning("register_points: σ ended at %.3g mm, %.0f%% of the target's RMS radius (scale %.3g): the "
                       "source did not settle onto the target and the result is probably not a registration; check "
                       "that the point sets overlap and use the same units, or start with mode='similarity'",
                       sigma_mm, 100 * sigma_mm / fr.radius, st.s)


#: a bandwidth above this multiple of the target's RMS radius gets a warning (the kernel is nearly constant)
WIDE_BANDWIDTH = 1e3
#: σ above this fraction of the target's RMS radius at the end of the VB loop is reported as a failed registration
COLLAPSE_SIGMA = 0.25


def _record(st, fr: _Frame, sigma, diff, used, c0=None) -> dict:
    """The history entry of one iteration (lengths in mm; ``c0``: the frame's centre on the posterior's device)."""
    r, c0 = fr.r, fr.c0 if c0 is None else c0
    return {"sigma": sigma * r, "sigma_change": diff * r, "scale": st.s, "n_hat": st.n_hat, "estep": used,
            "rotation_deg": float(np.degrees(rotation_angle(st.R))),
            "mean_displacement": float(np.sqrt((st.vhat**2).sum(1)).mean() * r),
            "translation": (st.t * r + c0 - st.s * st.R @ c0).tolist()}


def _close(prog, sigma_mm, stop_reason) -> None:
    try:
        prog.emit("done", metric=sigma_mm, extra={"stop_reason": stop_reason})
    except StopRegistration:
        pass
    prog.close()


# ================================================================================================ the result
def _transforms(fr: _Frame, blocks, st, kern_mm: Kernel, mode, seed):
    """``(T, T⁻¹, interpolation residual)``: the source → target map in mm (similarity + GP interpolation of v̂
    through each block's anchors), its fixed-point inverse (evaluated once on up to :data:`INVERSION_POINTS`
    target points, so that
    ``last_error`` holds the inversion error) and the GP interpolation residual at up to 5000 source points (0 up
    to rounding for full rank / eigsh)."""
    r, c0, D = fr.r, fr.c0, fr.x.shape[1]
    anchors, alabels, coefs = np.zeros((0, D)), np.zeros(0, dtype=np.int64), np.zeros((0, D))
    fine = {}
    if mode == "nonrigid" and st.coef and st.coef[0] is not None:
        parts = [interp_coef(kb, W, fr.y, fr.ly_s) for kb, W in zip(blocks, st.coef)]
        anchors = np.concatenate([za * r + c0 for za, _, _, _ in parts])
        alabels = np.concatenate([la for _, la, _, _ in parts])
        coefs = np.concatenate([ca / r for _, _, ca, _ in parts])
        if kern_mm.fine is not None:
            amp_f, den_f, theta = kern_mm.fine
            fparts = [(fr.y[kb["idx"]] * r + c0, fr.ly_s[kb["idx"]], fc / r) for kb, (_, _, _, fc) in
                      zip(blocks, parts) if fc is not None]
            if fparts:
                fine = {"fine_anchors": np.concatenate([a for a, _, _ in fparts]),
                        "fine_anchor_labels": np.concatenate([la for _, la, _ in fparts]),
                        "fine_coef": np.concatenate([c for _, _, c in fparts]), "fine_amp": amp_f,
                        "fine_den": den_f, "fine_taper": theta}
    A = st.s * st.R
    t_mm = st.t * r + c0 - A @ c0
    deformed = (st.yhat * r + c0)[np.argsort(fr.oy)]
    fwd = PointDeformation(A, t_mm, anchors, alabels, coefs, kern_mm.amp, kern_mm.den, fr.Y, fr.ly, deformed,
                           label_values=fr.values, **fine)
    M, N = len(fr.Y), len(fr.X)
    ev = np.arange(M) if M <= 5000 else np.random.default_rng(seed).choice(M, 5000, replace=False)
    interp = np.sqrt(((fwd.map_points(fr.Y[ev], fr.values[fr.ly[ev]]) - deformed[ev]) ** 2).sum(1))
    inv = PointDeformationInverse(fwd)
    ex = np.arange(N) if N <= INVERSION_POINTS else np.sort(np.random.default_rng(seed).choice(N, INVERSION_POINTS,
                                                                                                replace=False))
    inv.map_points(fr.X[ex])
    return fwd, inv, interp


#: target points (all up to this many, else a seeded random subset) on which the inversion error is measured
INVERSION_POINTS = 500


def _metrics(fr: _Frame, st, it, n_nystrom, interp, inv) -> dict:
    r, c0 = fr.r, fr.c0
    A = st.s * st.R
    return {"sigma_mm": math.sqrt(st.sigma2) * r, "scale": st.s, "rotation": st.R.tolist(),
            "translation_mm": (st.t * r + c0 - A @ c0).tolist(),
            "rotation_deg": float(np.degrees(rotation_angle(st.R))),
            "n_hat": float(st.n_hat) if it else 0.0, "iterations": it, "nystrom_estep_iterations": n_nystrom,
            "interpolation_error_mm": {"max": float(interp.max()), "mean": float(interp.mean())},
            "inversion_error_mm": inv.last_error,
            "mean_displacement_mm": float(np.sqrt((st.vhat**2).sum(1)).mean() * r)}
