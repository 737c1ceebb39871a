"""One stationary-velocity piece of register_demons: symmetric log-domain demons on the pyramid driver.

Each iteration computes the data term's force forward (moving towards fixed) and, for the symmetric update,
backward (fixed towards moving, through ``exp(−v)``), combines them with the Baker-Campbell-Hausdorff
approximation ``Z(v, u) ≈ v + u (+ ½[v, u] + 1/12 [v, [v, u]])`` and smooths the result (T. Vercauteren,
X. Pennec, A. Perchant, N. Ayache, "Symmetric log-domain diffeomorphic registration: a demons-based approach",
MICCAI 2008, LNCS 5241:754-761, doi:10.1007/978-3-540-85988-8_90, eqs. 5-8).
"""
from __future__ import annotations

import math

import numpy as np

from ...image import Image
from ...kernels._backend import get_array_module
from ...progress import similarity
from ...pyramid import multiresolution

__all__ = ["one_piece", "velocity_norm"]

#: Scaling-and-squaring accuracy inside the iterations (voxels): the force only needs an approximate map of the
#: smooth velocity (docs/notes/demons.md). Each piece's final exp(±v), which becomes the result, uses 0.5 voxels.
ITER_EXP_STEP = 2.0


def velocity_norm(v, h) -> float:
    """L² norm of a velocity field in mm: ``sqrt(Σ_x |v(x)|² Π h)``."""
    xp = get_array_module(v)
    return float(np.sqrt(float(xp.sum(xp.asarray(v, dtype=np.float64) ** 2)) * float(np.prod(h))))


def one_piece(fixed: Image, moving: Image, fmask, mmask, schedule, opts, prog, piece, dtype):
    """Multi-resolution symmetric log-demons of ``moving`` (already on the fixed grid).

    Returns ``(state, stopped, energy)``: ``state["v"]`` the velocity (array frame, mm) on the fixed grid,
    whether a callback stopped the run, and the finest level's best energy.
    """
    best = {}

    def step(level, state, progress):
        _level_step(level, state, progress, opts, piece, dtype, best)

    state, stopped = multiresolution(fixed, moving, step, fixed_mask=fmask,
                                     moving_mask=None if mmask is None else mmask.data, progress=prog,
                                     backend=opts["backend"], **schedule)
    return state, stopped, best.get("energy")


def _level_step(level, state, progress, opts, piece, dtype, best):
    """Iterate symmetric log-demons on one pyramid level; keeps ``state["v"]`` (array frame, mm) current."""
    from ...kernels.diff import gradient
    from ...kernels.fields import expmap

    backend = opts["backend"]
    xp = get_array_module(level.fixed.data)  # numpy, or cupy for data on the GPU
    F = xp.asarray(level.fixed.data, dtype=dtype)
    M = xp.asarray(level.moving.data, dtype=dtype)  # the moving image on the fixed grid (same shape)
    n = F.ndim
    h = tuple(level.fixed.spacing_array_order)
    scale = float(level.shrink)
    v = state.get("v")
    if v is None or v.shape[:n] != F.shape:
        v = xp.zeros((*F.shape, n), dtype=dtype)
    side = dict(F=F, M=M, gF=gradient(F, spacing=h, backend=backend), h=h, max_step=opts["max_step"] * scale,
                fmask=level.fixed_mask, mmask=level.moving_mask, term=opts["term"](scale, h), backend=backend,
                gM=gradient(M, spacing=h, backend=backend) if opts["symmetric"] else None,
                descent=opts["scale_smoothed"])
    energies, bests = [], []
    best_v, best_e = v, math.inf
    sim_mask = None if level.fixed_mask is None else xp.asarray(level.fixed_mask, dtype=bool)
    for it in range(level.iterations):
        e_v, n_sq = expmap(v, spacing=h, max_voxel_norm=ITER_EXP_STEP, backend=backend)
        u_f, energy, step = _force(side, e_v, forward=True)
        # the normalised similarity of the current estimate (classreg.progress.similarity), on the level's voxels
        warped, valid = side["seen"]
        mask = sim_mask if valid is None else (valid if sim_mask is None else sim_mask & valid)
        sim = similarity(F, warped, mask=mask)
        energies.append(energy)
        if energy < best_e:
            best_e, best_v = energy, v
        v = _update(v, u_f, n_sq, side, opts, scale, dtype)
        state["v"] = v
        progress.emit("iteration", level=level.index, iteration=it, metric=energy, similarity=sim, step=step,
                      piece=piece)
        bests.append(best_e)
        # the best energy seen fell by at most tol × |first| over the last 5 iterations: on the best, not the
        # current energy, so an energy that alternates between two values (measured: 4.71e-6 / 6.27e-6 for
        # 76 000 iterations) also ends the level
        if len(bests) > 5 and bests[-6] - bests[-1] <= opts["tol"] * abs(energies[0]):
            break
    # the last update is evaluated too; the level keeps its best velocity (Lombaert's rule)
    e_v, _ = expmap(v, spacing=h, max_voxel_norm=ITER_EXP_STEP, backend=backend)
    last = _force(side, e_v, forward=True)[1]
    if last <= best_e:
        best_e, best_v = last, v
    state["v"] = best_v
    best["energy"] = best_e


def _update(v, u_f, n_sq, side, opts, scale, dtype):
    """The new velocity from the forward force ``u_f``: fluid smoothing, the symmetric BCH combination with the
    backward force (through ``exp(−v)``, same squaring count), diffusion smoothing."""
    from ...kernels.fields import expmap
    from ...kernels.smooth import gaussian

    h, backend, n = side["h"], side["backend"], v.ndim - 1
    sig_u = opts["update_sigma"] * scale
    sig_v = opts["velocity_sigma"] * scale

    def fluid(u):  # the update smoothing; a descent direction is scaled after it (ANTs SyN's order)
        if sig_u > 0:
            u = gaussian(u, sig_u, spacing=h, ndim=n, backend=backend)
        return _to_max_step(u, side["max_step"]) if side["descent"] else u

    u_f = fluid(u_f)
    if opts["symmetric"]:
        e_m, _ = expmap(-v, spacing=h, n_squarings=n_sq, backend=backend)  # |−v| = |v|: same count
        u_b = fluid(_force(side, e_m, forward=False)[0])
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
    return z.astype(dtype, copy=False)


def _force(side, disp, *, forward):
    """The data term's force moving ``M∘(id+disp)`` towards ``F`` (forward) or ``F∘(id+disp)`` towards ``M``
    (backward): ``(u, energy, step)``, the update (array frame, mm), the energy over the valid voxels before it
    and the largest update length (mm). A forward call leaves ``side["seen"]``: the warped image and where the
    other image's mask is set (None without one), for the iteration's similarity."""
    from ...kernels.diff import gradient
    from ...kernels.warp import warp

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
    if forward:
        side["seen"] = (warped, other_valid)
    g_warped = gradient(warped, spacing=h, backend=backend)
    if side["descent"]:  # the unscaled descent direction, over the samples inside the moving grid
        from ...kernels.fields import inside_grid

        inside = inside_grid(disp, h, backend=backend)  # ITK's IsInsideBuffer, as the ESM kernel tests it
        other_valid = inside if other_valid is None else other_valid & inside
        u, cost = side["term"].descent(target, warped, g_warped, spacing=h, mask=own_mask, moving_valid=other_valid)
        xp = get_array_module(u)
        return u, cost, side["max_step"] if bool(xp.any(u != 0)) else 0.0
    return side["term"].force(target, warped, g_target, g_warped, disp, spacing=h, max_step=side["max_step"],
                              mask=own_mask, moving_valid=other_valid, backend=backend)


def _to_max_step(u, max_step):
    """``u`` scaled so that its longest vector is ``max_step`` (unchanged if zero): ANTs SyN's update scaling,
    applied after the update smoothing (B. Avants et al., Med. Image Anal. 12(1):26-41, 2008, §2.4; ITK
    ``SyNImageRegistrationMethod``, whose update field is smoothed, then scaled to the learning rate)."""
    from ...kernels.fields import _max_voxel_norm

    norm = _max_voxel_norm(u, (1.0,) * (u.ndim - 1), get_array_module(u), None) if u.size else 0.0
    if norm > 0:
        u *= max_step / norm
    return u


def _bch(v, u, terms, h, backend):
    """Baker-Campbell-Hausdorff: log(exp(v)∘exp(u)) ≈ v + u (+ ½[v,u] + 1/12 [v,[v,u]]), Vercauteren 2008 eq. 5."""
    if terms == 2:
        return v + u
    from ...kernels.diff import lie_bracket

    vu = lie_bracket(v, u, spacing=h, backend=backend)
    z = v + u + 0.5 * vu
    if terms == 4:
        z = z + lie_bracket(v, vu, spacing=h, backend=backend) / 12.0
    return z
