"""Local normalised cross-correlation (ANTs "CC") value and gradient: numpy reference and a fused numba CPU path.

The cost is the one of :func:`classreg.terms.lncc` (same windows, same regulariser, same masked box sums):
with the mask ``w`` (voxels that count), ``N = |w|``, the images centred by their masked means and zeroed outside
the mask (``f = w (F - mean F)``, ``m = w (M - mean M)``), the box sum ``S`` of half-width ``r_i`` voxels per axis
(zero padded, so windows are truncated at the image and at the mask border) and ``n = S w``,

    A = S(fm) - S f S m / n,  B = max(S(f²) - (S f)² / n, 0),  C = max(S(m²) - (S m)² / n, 0),
    D = B C + eps_total,      cost = -(1/N) Σ_w A² / D,

    eps_total = eps (n_W² var_F) var_M + tiny,   n_W = Π (2 r_i + 1),   var = masked variance,

    dcost/dM = w [ -(2/N) (f Sα - S(α f̄) - m Sβ + S(β m̄)) + γ eps (n_W² var_F) (2/N) m ],
    α = w A / D,  β = w A² B / D²,  γ = (1/N) Σ_w A² / D²,  f̄ = S f / n,  m̄ = S m / n.

:func:`lncc_gradient` returns ``(cost, dcost/dM)``; :func:`lncc_force` returns the descent force
``-dcost/dM · ∇M`` of the demons solver (with the mask built in the same pass from the displacement, as
:func:`classreg.kernels.demons.esm_force` does), the cost, ``N`` and the largest force length.

Backends
--------
``"numpy"``
    The reference (the test oracle): :func:`scipy.ndimage.uniform_filter` sums, the arithmetic of
    :func:`classreg.terms.lncc` line by line (bitwise equal to it).
``"numba"``
    Separable running box sums (O(1) per voxel and axis, whatever the radius) accumulated in float64, in three
    parallel passes and no full-size float64 temporary but one scalar field:

    1. per axis-0 slice: the valid mask (inside the other grid after ``disp``, masks) and the masked sums that
       give ``N``, the means and the variances (the regulariser needs them before any window);
    2. the sweep, parallel over fixed slabs of axis-0 slices: each slab slides along axis 0 keeping only planes --
       the running axis-0 sums of the six moments ``w, f, m, f², m², fm`` (updated by the entering and leaving
       slices, computed on the fly from the inputs); per position, streamed row by row, their axis-1 and axis-2
       running sums, ``A, B, C, D``, the four fields ``α, α f̄, β, β m̄`` and *their* axis-2 and axis-1 box
       sums, kept in a ring of ``2 r0 + 2`` planes whose running axis-0 sum gives, ``r0`` positions behind, the
       fully boxed fields and the bracket ``f Sα - S(α f̄) - m Sβ + S(β m̄)`` of the gradient (one float64 field);
    3. per axis-0 slice: ``dcost/dM`` (the regulariser term needs γ, a global sum of pass 2) or the force
       ``-dcost/dM ∇M`` and its largest length.

    Slab boundaries depend on the shape and radius only, and every reduction is summed in a fixed order, so the
    result does not depend on the thread count. Per thread the planes hold ``(14 + 4 (2 r0 + 2)) s1 s2`` float64.
``"cuda"``
    No numba.cuda kernel yet: the reference runs with the arrays' module (CuPy + ``cupyx.scipy.ndimage`` for CuPy
    arrays, so the data stay on the device; numpy + scipy for host arrays, e.g. under the CUDA simulator).
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from . import _backend

__all__ = ["lncc_force", "lncc_gradient", "window_radius", "LNCC_EPS"]

#: Default relative regulariser (as :data:`classreg.terms.measures.LNCC_EPS`).
LNCC_EPS = 1e-5
_TINY = np.finfo(np.float64).tiny

prange = range


def window_radius(radius, spacing, ndim):
    """Half-widths in voxels ``max(1, round(radius_i / spacing_i))`` (the rule of :func:`classreg.terms.lncc`)."""
    rad = np.broadcast_to(np.asarray(radius, dtype=float), (ndim,))
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,))
    return tuple(max(1, int(round(float(r) / float(h)))) for r, h in zip(rad, sp))


# ----------------------------------------------------------------------------------------------------------------
# numba CPU path. Every array is seen as 3-D (s0, s1, s2); a 2-D image (s0, s1) is viewed as (s0, 1, s1) with
# r = (r0, 0, r1), so that the slabs along axis 0 still split it between threads.
# ----------------------------------------------------------------------------------------------------------------
def _mask_stats(F, M, disp, i0, i1, i2, mask, mvalid, use_disp, use_mask, use_mvalid, shF, shM, w,
                stats):
    """Pass 1, parallel over axis-0 slices: the combined mask ``w`` and per-slice (Σw, Σf, Σm, Σf², Σm²) of
    ``f = w (F - shF)``, ``m = w (M - shM)`` (``sh*``: rough means, so the variances do not cancel).

    ``w`` = ``mask`` & ``mvalid`` & (every ``index_k + disp_k * i_k`` (``i_k``: inverse voxel size) lies less than
    half a voxel outside the grid; a 2-D ``disp`` has no column for view axis 1)."""
    S0, S1, S2 = F.shape
    lo = -0.5
    hi0 = S0 - 0.5
    hi1 = S1 - 0.5
    hi2 = S2 - 0.5
    for c0 in prange(S0):
        z = np.zeros((5, S2))  # per-column partial sums: vectorisable, fixed order
        z0 = z[0]
        z1 = z[1]
        z2 = z[2]
        z3 = z[3]
        z4 = z[4]
        for c1 in range(S1):
            wl = w[c0, c1]
            if use_mask:
                ml = mask[c0, c1]
                for c2 in range(S2):
                    wl[c2] = ml[c2]
            else:
                for c2 in range(S2):
                    wl[c2] = True
            if use_mvalid:
                ml = mvalid[c0, c1]
                for c2 in range(S2):
                    wl[c2] = wl[c2] & ml[c2]
            if use_disp:
                p0 = (c0 * S1 + c1) * S2
                dl = disp[p0:p0 + S2]
                if dl.shape[1] == 3:  # literal columns: interleaved loads vectorise, a runtime column would not
                    for c2 in range(S2):
                        x0 = c0 + dl[c2, 0] * i0
                        x1 = c1 + dl[c2, 1] * i1
                        x2 = c2 + dl[c2, 2] * i2
                        wl[c2] = (wl[c2] & (x0 >= lo) & (x0 < hi0) & (x1 >= lo) & (x1 < hi1) & (x2 >= lo)
                                  & (x2 < hi2))
                else:  # 2-D image seen as (s0, 1, s1): columns 0 and 1 belong to view axes 0 and 2
                    for c2 in range(S2):
                        x0 = c0 + dl[c2, 0] * i0
                        x2 = c2 + dl[c2, 1] * i2
                        wl[c2] = wl[c2] & (x0 >= lo) & (x0 < hi0) & (x2 >= lo) & (x2 < hi2)
            Fl = F[c0, c1]
            Ml = M[c0, c1]
            for c2 in range(S2):
                v = 1.0 if wl[c2] else 0.0
                f = (Fl[c2] - shF) * v
                m = (Ml[c2] - shM) * v
                z0[c2] += v
                z1[c2] += f
                z2[c2] += m
                z3[c2] += f * f
                z4[c2] += m * m
        for q in range(5):
            s = 0.0
            zq = z[q]
            for c2 in range(S2):
                s += zq[c2]
            stats[c0, q] = s


def _run6(b0, b1, b2, b3, b4, b5, r, o0, o1, o2, o3, o4, o5):
    """Box sums of half-width ``r`` (zero padded) of six lines at once: independent chains, one dependent add per
    sample (the entering-minus-leaving difference is formed off the chain)."""
    S = b0.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    s5 = 0.0
    for i in range(min(r, S)):
        s0 += b0[i]
        s1 += b1[i]
        s2 += b2[i]
        s3 += b3[i]
        s4 += b4[i]
        s5 += b5[i]
    # c in [0, S): enters c + r (if < S), leaves c - r - 1 (if >= 0)
    e1 = min(r + 1, S)  # first c that has a leaving sample
    e2 = max(S - r, 0)  # first c without an entering sample
    lo = min(e1, e2)
    hi = max(e1, e2)
    for c in range(lo):  # entering only
        s0 += b0[c + r]
        s1 += b1[c + r]
        s2 += b2[c + r]
        s3 += b3[c + r]
        s4 += b4[c + r]
        s5 += b5[c + r]
        o0[c] = s0
        o1[c] = s1
        o2[c] = s2
        o3[c] = s3
        o4[c] = s4
        o5[c] = s5
    if e1 <= e2:
        for c in range(lo, hi):  # entering and leaving
            s0 += b0[c + r] - b0[c - r - 1]
            s1 += b1[c + r] - b1[c - r - 1]
            s2 += b2[c + r] - b2[c - r - 1]
            s3 += b3[c + r] - b3[c - r - 1]
            s4 += b4[c + r] - b4[c - r - 1]
            s5 += b5[c + r] - b5[c - r - 1]
            o0[c] = s0
            o1[c] = s1
            o2[c] = s2
            o3[c] = s3
            o4[c] = s4
            o5[c] = s5
    else:
        for c in range(lo, hi):  # neither (window wider than the line)
            o0[c] = s0
            o1[c] = s1
            o2[c] = s2
            o3[c] = s3
            o4[c] = s4
            o5[c] = s5
    for c in range(hi, S):  # leaving only
        s0 -= b0[c - r - 1]
        s1 -= b1[c - r - 1]
        s2 -= b2[c - r - 1]
        s3 -= b3[c - r - 1]
        s4 -= b4[c - r - 1]
        s5 -= b5[c - r - 1]
        o0[c] = s0
        o1[c] = s1
        o2[c] = s2
        o3[c] = s3
        o4[c] = s4
        o5[c] = s5


def _run4(b0, b1, b2, b3, r, o0, o1, o2, o3):
    """:func:`_run6` for four lines."""
    S = b0.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for i in range(min(r, S)):
        s0 += b0[i]
        s1 += b1[i]
        s2 += b2[i]
        s3 += b3[i]
    e1 = min(r + 1, S)
    e2 = max(S - r, 0)
    lo = min(e1, e2)
    hi = max(e1, e2)
    for c in range(lo):
        s0 += b0[c + r]
        s1 += b1[c + r]
        s2 += b2[c + r]
        s3 += b3[c + r]
        o0[c] = s0
        o1[c] = s1
        o2[c] = s2
        o3[c] = s3
    if e1 <= e2:
        for c in range(lo, hi):
            s0 += b0[c + r] - b0[c - r - 1]
            s1 += b1[c + r] - b1[c - r - 1]
            s2 += b2[c + r] - b2[c - r - 1]
            s3 += b3[c + r] - b3[c - r - 1]
            o0[c] = s0
            o1[c] = s1
            o2[c] = s2
            o3[c] = s3
    else:
        for c in range(lo, hi):
            o0[c] = s0
            o1[c] = s1
            o2[c] = s2
            o3[c] = s3
    for c in range(hi, S):
        s0 -= b0[c - r - 1]
        s1 -= b1[c - r - 1]
        s2 -= b2[c - r - 1]
        s3 -= b3[c - r - 1]
        o0[c] = s0
        o1[c] = s1
        o2[c] = s2
        o3[c] = s3


def _slide_moments(Z, F, M, w, ip, kp, im, km, mF, mM):
    """``Z (s1, 6, s2) += kp * R(ip) - km * R(im)``, ``R(i)`` = the moments (w, f, m, f², m², fm) of slice ``i``,
    ``f = w (F - mF)``, ``m = w (M - mM)``; ``kp``, ``km`` are 0 or 1."""
    S1 = Z.shape[0]
    S2 = Z.shape[2]
    for c1 in range(S1):
        Fp = F[ip, c1]
        Mp = M[ip, c1]
        wp = w[ip, c1]
        Fm = F[im, c1]
        Mm = M[im, c1]
        wm = w[im, c1]
        z0 = Z[c1, 0]
        z1 = Z[c1, 1]
        z2 = Z[c1, 2]
        z3 = Z[c1, 3]
        z4 = Z[c1, 4]
        z5 = Z[c1, 5]
        for c2 in range(S2):
            op = wp[c2]
            om = wm[c2]
            vp = kp if op else 0.0
            vm = km if om else 0.0
            fp = (Fp[c2] - mF) * vp
            mp = (Mp[c2] - mM) * vp
            fm = (Fm[c2] - mF) * vm
            mm = (Mm[c2] - mM) * vm
            z0[c2] += vp - vm
            z1[c2] += fp - fm
            z2[c2] += mp - mm
            z3[c2] += fp * fp - fm * fm
            z4[c2] += mp * mp - mm * mm
            z5[c2] += fp * mp - fm * mm


def _plane_step(Z, wj, r1, r2, eps_total, acc6, mom, row, cb, acc4, slot, Y, old, has_old, F, M, w, c, bracket,
                mF, mM, G, count, zcc, zg):
    """One axis-0 position ``j`` of the sweep, streamed row by row along axis 1.

    From the moment plane ``Z`` (already summed along axis 0): axis-1 running sums (``acc6``), axis-2 running sums
    (``mom``), the per-voxel A, B, C, D and the fields (α, α f̄, β, β m̄) (``row``), their axis-2 box (``cb``)
    and axis-1 box, stored in the ring ``slot``; at once ``Y += slot - old`` (``old``: the plane leaving the
    axis-0 window, if ``has_old``) and, if ``bracket``, the gradient bracket of slice ``c`` into ``G[c]``.
    Adds cc and A²/D² of the mask voxels of ``j`` to ``zcc``, ``zg`` when ``count``."""
    S1 = Z.shape[0]
    S2 = Z.shape[2]
    for k in range(6):
        a = acc6[k]
        for c2 in range(S2):
            a[c2] = 0.0
        for i in range(min(r1, S1)):
            zk = Z[i, k]
            for c2 in range(S2):
                a[c2] += zk[c2]
    for k in range(4):
        a = acc4[k]
        for c2 in range(S2):
            a[c2] = 0.0
    e0 = mom[0]
    e1 = mom[1]
    e2 = mom[2]
    e3 = mom[3]
    e4 = mom[4]
    e5 = mom[5]
    q0 = row[0]
    q1 = row[1]
    q2 = row[2]
    q3 = row[3]
    for c1 in range(S1 + r1):
        if c1 < S1:
            # axis-1 running sums of the moments
            ip = c1 + r1
            im = c1 - r1 - 1
            for k in range(6):
                a = acc6[k]
                if ip < S1:
                    zk = Z[ip, k]
                    for c2 in range(S2):
                        a[c2] += zk[c2]
                if im >= 0:
                    zk = Z[im, k]
                    for c2 in range(S2):
                        a[c2] -= zk[c2]
            b0 = acc6[0]
            b1 = acc6[1]
            b2 = acc6[2]
            b3 = acc6[3]
            b4 = acc6[4]
            b5 = acc6[5]
            _run6(b0, b1, b2, b3, b4, b5, r2, e0, e1, e2, e3, e4, e5)
            wl = wj[c1]
            for c2 in range(S2):  # per-voxel coefficients (vectorised)
                sf = e1[c2]
                sm = e2[c2]
                ninv = 1.0 / max(e0[c2], 1.0)  # n is an exact count; 0 only where every weight is 0
                fbar = sf * ninv
                mbar = sm * ninv
                A = e5[c2] - sf * mbar
                B = max(e3[c2] - sf * fbar, 0.0)
                C = max(e4[c2] - sm * mbar, 0.0)
                Dinv = 1.0 / (B * C + eps_total)
                cc = A * A * Dinv
                inside = wl[c2]
                alpha = A * Dinv if inside else 0.0
                beta = cc * B * Dinv if inside else 0.0
                q0[c2] = alpha
                q1[c2] = alpha * fbar
                q2[c2] = beta
                q3[c2] = beta * mbar
                if count:
                    zcc[c2] += cc if inside else 0.0
                    zg[c2] += cc * Dinv if inside else 0.0
            _run4(q0, q1, q2, q3, r2, cb[c1, 0], cb[c1, 1], cb[c1, 2], cb[c1, 3])
        # axis-1 box of the coefficient rows: output row co = c1 - r1 (rows co - r1 .. co + r1 of cb)
        co = c1 - r1
        if co >= 0:
            if co == 0:  # rows 0 .. r1 - 1 were produced before the first output row: add them once
                for i in range(min(r1, S1)):
                    for k in range(4):
                        a = acc4[k]
                        ck = cb[i, k]
                        for c2 in range(S2):
                            a[c2] += ck[c2]
            if c1 < S1:
                for k in range(4):
                    a = acc4[k]
                    ck = cb[c1, k]
                    for c2 in range(S2):
                        a[c2] += ck[c2]
            im = co - r1 - 1
            if im >= 0:
                for k in range(4):
                    a = acc4[k]
                    ck = cb[im, k]
                    for c2 in range(S2):
                        a[c2] -= ck[c2]
            for k in range(4):
                a = acc4[k]
                sk = slot[co, k]
                yk = Y[co, k]
                if has_old:
                    ok = old[co, k]
                    for c2 in range(S2):
                        sk[c2] = a[c2]
                        yk[c2] += a[c2] - ok[c2]
                else:
                    for c2 in range(S2):
                        sk[c2] = a[c2]
                        yk[c2] += a[c2]
            if bracket:
                _bracket_row(F, M, w, c, co, mF, mM, Y, G)


def _bracket_row(F, M, w, c, c1, mF, mM, Y, G):
    """``G[c, c1] = w (f Sα - S(α f̄) - m Sβ + S(β m̄))`` from the fully boxed coefficients ``Y[c1]``."""
    S2 = Y.shape[2]
    Fl = F[c, c1]
    Ml = M[c, c1]
    wl = w[c, c1]
    y0 = Y[c1, 0]
    y1 = Y[c1, 1]
    y2 = Y[c1, 2]
    y3 = Y[c1, 3]
    gl = G[c, c1]
    for c2 in range(S2):
        f = Fl[c2] - mF
        m = Ml[c2] - mM
        g = f * y0[c2] - y1[c2] - m * y2[c2] + y3[c2]
        gl[c2] = g if wl[c2] else 0.0


def _plane_tail(Y, old, F, M, w, c, mF, mM, G):
    """A sweep position past the last slice: ``Y -= old``, then the bracket of slice ``c``."""
    S1 = Y.shape[0]
    S2 = Y.shape[2]
    for c1 in range(S1):
        for k in range(4):
            yk = Y[c1, k]
            ok = old[c1, k]
            for c2 in range(S2):
                yk[c2] -= ok[c2]
        _bracket_row(F, M, w, c, c1, mF, mM, Y, G)


def _lncc_sweep(F, M, w, mF, mM, r0, r1, r2, eps_total, starts, G, slab_cc, slab_g):
    """Pass 2, parallel over slabs of axis-0 slices ``[starts[s], starts[s + 1])``; each slab slides along axis 0:
    running axis-0 sums ``Z`` of the moments; per position the plane coefficients boxed along axes 1 and 2 (kept
    in a ring of ``2 r0 + 2`` planes) and their running axis-0 sums ``Y``; the bracket ``G`` of the gradient
    ``r0`` positions behind. Per-slab sums of cc and A²/D² over the mask in ``slab_cc``, ``slab_g``. Only planes
    live in memory; slab boundaries depend on the shape alone, so results do not depend on the thread count."""
    S0, S1, S2 = F.shape
    R = 2 * r0 + 2
    nslab = starts.shape[0] - 1
    for s in prange(nslab):
        a = starts[s]
        b = starts[s + 1]
        Z = np.zeros((S1, 6, S2))
        cb = np.empty((S1, 4, S2))
        ring = np.empty((R, S1, 4, S2))
        Y = np.zeros((S1, 4, S2))
        acc6 = np.empty((6, S2))
        acc4 = np.empty((4, S2))
        mom = np.empty((6, S2))
        row = np.empty((4, S2))
        zcc = np.zeros(S2)
        zg = np.zeros(S2)
        j0 = max(a - r0, 0)  # first axis-0 position whose coefficients this slab needs
        for i in range(max(j0 - r0, 0), min(j0 + r0, S0)):
            _slide_moments(Z, F, M, w, i, 1.0, i, 0.0, mF, mM)
        for j in range(j0, b + r0):
            i = j - 2 * r0 - 1  # coefficient plane leaving the axis-0 window of output c = j - r0
            has_old = i >= j0
            old = ring[max(i, 0) % R]
            c = j - r0
            if j < S0:
                ip = j + r0
                im = j - r0 - 1
                kp = 1.0 if ip < S0 else 0.0
                km = 1.0 if (j > j0 and im >= 0) else 0.0
                _slide_moments(Z, F, M, w, min(ip, S0 - 1), kp, max(im, 0), km, mF, mM)
                _plane_step(Z, w[j], r1, r2, eps_total, acc6, mom, row, cb, acc4, ring[j % R], Y, old, has_old,
                            F, M, w, c, c >= a, mF, mM, G, (j >= a) and (j < b), zcc, zg)
            elif c >= a:
                if has_old:
                    _plane_tail(Y, old, F, M, w, c, mF, mM, G)
                else:
                    for c1 in range(S1):
                        _bracket_row(F, M, w, c, c1, mF, mM, Y, G)
        scc = 0.0
        sg = 0.0
        for c2 in range(S2):
            scc += zcc[c2]
            sg += zg[c2]
        slab_cc[s] = scc
        slab_g[s] = sg


def _finish(M, w, G, gM, mM, cgrad, ceps, want_force, force, grad, row_max):
    """Pass 3, parallel over axis-0 slices: dcost/dM = w (cgrad G + ceps (M - mM)) into ``grad``, or the force
    ``-dcost/dM ∇M`` into ``force`` with the per-slice largest squared length in ``row_max``."""
    S0, S1, S2 = M.shape
    nd = gM.shape[1]
    for c0 in prange(S0):
        zmax = np.zeros(S2)
        for c1 in range(S1):
            Ml = M[c0, c1]
            wl = w[c0, c1]
            Gl = G[c0, c1]
            p0 = (c0 * S1 + c1) * S2
            if not want_force:
                for c2 in range(S2):
                    gv = cgrad * Gl[c2] + ceps * (Ml[c2] - mM)
                    grad[p0 + c2] = gv if wl[c2] else 0.0
            elif nd == 3:
                fl = force[p0:p0 + S2]
                gl = gM[p0:p0 + S2]
                for c2 in range(S2):
                    gv = cgrad * Gl[c2] + ceps * (Ml[c2] - mM)
                    gv = -gv if wl[c2] else 0.0
                    fl[c2, 0] = gv * gl[c2, 0]
                    fl[c2, 1] = gv * gl[c2, 1]
                    fl[c2, 2] = gv * gl[c2, 2]
                    v0 = float(fl[c2, 0])
                    v1 = float(fl[c2, 1])
                    v2 = float(fl[c2, 2])
                    zmax[c2] = max(zmax[c2], v0 * v0 + v1 * v1 + v2 * v2)
            else:
                fl = force[p0:p0 + S2]
                gl = gM[p0:p0 + S2]
                for c2 in range(S2):
                    gv = cgrad * Gl[c2] + ceps * (Ml[c2] - mM)
                    gv = -gv if wl[c2] else 0.0
                    fl[c2, 0] = gv * gl[c2, 0]
                    fl[c2, 1] = gv * gl[c2, 1]
                    v0 = float(fl[c2, 0])
                    v1 = float(fl[c2, 1])
                    zmax[c2] = max(zmax[c2], v0 * v0 + v1 * v1)
        mx = 0.0
        for c2 in range(S2):
            mx = max(mx, zmax[c2])
        row_max[c0] = mx


_CPU_HELPERS = (_run6, _run4, _slide_moments, _bracket_row, _plane_step, _plane_tail)
_CPU_LOOPS = (_mask_stats, _lncc_sweep, _finish)


_rebind = _backend.rebind  # each function is compiled for one target only, so cache entries never collide


@functools.cache
def _numba_kernels():
    import numba

    ns = dict(globals())
    ns["prange"] = numba.prange
    for f in _CPU_HELPERS:
        ns[f.__name__] = _backend.njit(error_model="numpy", inline="always")(_rebind(f, ns))
    return {f.__name__: _backend.njit(parallel=True, error_model="numpy")(_rebind(f, ns)) for f in _CPU_LOOPS}


def _shift(a):
    """A cheap estimate of the mean (strided sample), subtracted before the variance sums (rounding only)."""
    step = max(1, int(round((a.size / 4096.0) ** (1.0 / a.ndim))))
    return float(np.mean(a[(slice(None, None, step),) * a.ndim], dtype=np.float64))


def _slabs(S0, r0):
    """Slab boundaries along axis 0 for the sweep: ~max(16, 8 r0) slices each, an even count (two-core machines),
    a function of the shape and radius only."""
    L0 = max(16, 8 * r0)
    ns = max(1, int(round(S0 / L0)))
    if ns > 1 and ns % 2:
        ns += 1
    ns = min(ns, S0)
    return np.array([(i * S0) // ns for i in range(ns + 1)], dtype=np.int64)


def _lncc_numba(F, M, w_in, mvalid, disp, h, r, eps, gM, out_dtype):
    """numba path; ``gM`` None -> gradient. Returns (out, value, count, max_norm) with out None when N == 0."""
    k = _numba_kernels()
    ndim = F.ndim
    shape = F.shape
    if ndim == 2:  # (s0, s1) -> (s0, 1, s1)
        v3 = (shape[0], 1, shape[1])
        r3 = (r[0], 0, r[1])
        inv = (1.0 / h[0], 0.0, 1.0 / h[1])
    else:
        v3 = tuple(shape)
        r3 = tuple(r)
        inv = tuple(1.0 / x for x in h)
    fdt = np.float32 if (F.dtype == np.float32 and M.dtype == np.float32) else np.float64
    Fv = np.ascontiguousarray(F, dtype=fdt).reshape(v3)
    Mv = np.ascontiguousarray(M, dtype=fdt).reshape(v3)
    dummy_b = np.zeros((1, 1, 1), dtype=bool)
    use_mask, use_mv, use_disp = w_in is not None, mvalid is not None, disp is not None
    mk = np.ascontiguousarray(w_in, dtype=bool).reshape(v3) if use_mask else dummy_b
    mv = np.ascontiguousarray(mvalid, dtype=bool).reshape(v3) if use_mv else dummy_b
    dp = np.ascontiguousarray(disp, dtype=fdt).reshape(-1, ndim) if use_disp else np.zeros((1, ndim), dtype=fdt)
    S0 = v3[0]
    shF, shM = _shift(Fv), _shift(Mv)
    w = np.empty(v3, dtype=bool)
    st = np.empty((S0, 5))
    k["_mask_stats"](Fv, Mv, dp, inv[0], inv[1], inv[2], mk, mv, use_disp, use_mask,
                     use_mv, shF, shM, w, st)
    tot = st.sum(axis=0)
    N = float(tot[0])
    if N == 0:
        return None, 0.0, 0, 0.0
    df, dm = tot[1] / N, tot[2] / N
    mF, mM = shF + df, shM + dm  # masked means
    varF = max(float(tot[3]) / N - df * df, 0.0)
    varM = max(float(tot[4]) / N - dm * dm, 0.0)
    nw = float(np.prod([2 * ri + 1 for ri in r]))
    epsk = float(eps) * nw * nw * varF
    eps_total = epsk * varM + _TINY
    starts = _slabs(S0, r3[0])
    G = np.empty(v3)
    scc, sg = np.empty(starts.size - 1), np.empty(starts.size - 1)
    k["_lncc_sweep"](Fv, Mv, w, mF, mM, r3[0], r3[1], r3[2], eps_total, starts, G, scc, sg)
    value = -float(np.sum(scc)) / N
    gamma = float(np.sum(sg)) / N
    cgrad = -2.0 / N
    ceps = gamma * epsk * (2.0 / N)
    rmax = np.empty(S0)
    nvox = int(np.prod(shape))
    if gM is None:
        grad = np.empty(nvox, dtype=out_dtype)
        k["_finish"](Mv, w, G, np.zeros((1, ndim), dtype=fdt), mM, cgrad, ceps, False,
                     np.zeros((1, ndim), dtype=out_dtype), grad, rmax)
        return grad.reshape(shape), value, int(N), 0.0
    g = np.ascontiguousarray(gM, dtype=fdt).reshape(-1, ndim)
    force = np.empty((nvox, ndim), dtype=out_dtype)
    k["_finish"](Mv, w, G, g, mM, cgrad, ceps, True, force, np.zeros(1, dtype=out_dtype), rmax)
    return force.reshape(shape + (ndim,)), value, int(N), float(np.sqrt(np.max(rmax)))


# ----------------------------------------------------------------------------------------------------------------
# reference (numpy + scipy.ndimage; CuPy + cupyx.scipy.ndimage for device arrays)
# ----------------------------------------------------------------------------------------------------------------
def _valid_reference(xp, shape, w_in, mvalid, disp, h):
    valid = xp.ones(shape, dtype=bool)
    if disp is not None:
        idx = xp.indices(shape, dtype=np.float64)
        for k in range(len(shape)):
            x = idx[k] + disp[..., k] / h[k]
            valid &= (x >= -0.5) & (x < shape[k] - 0.5)
    if w_in is not None:
        valid &= xp.asarray(w_in, dtype=bool)
    if mvalid is not None:
        valid &= xp.asarray(mvalid, dtype=bool)
    return valid


def _lncc_reference(F, M, w, r, eps, out_dtype):
    """:func:`classreg.terms.lncc` (value, dcost/dM) line by line, for either array module."""
    xp = _backend.get_array_module(F, M)
    if xp is np:
        from scipy import ndimage
    else:  # pragma: no cover - needs CuPy
        from cupyx.scipy import ndimage
    size = tuple(2 * ri + 1 for ri in r)
    nw = float(np.prod(size))
    wf = w.astype(np.float64)
    N = float(xp.count_nonzero(w))

    def S(a):
        return ndimage.uniform_filter(a, size=size, mode="constant", cval=0.0) * nw

    F = F.astype(np.float64, copy=True)
    M = M.astype(np.float64, copy=True)
    F = (F - F[w].mean()) * wf
    M = (M - M[w].mean()) * wf
    varF = float(xp.dot(F[w], F[w])) / N
    varM = float(xp.dot(M[w], M[w])) / N
    epsk = float(eps) * nw * nw * varF
    eps_total = epsk * varM + _TINY
    n = xp.rint(S(wf))
    ninv = xp.zeros_like(n)
    pos = n > 0
    ninv[pos] = 1.0 / n[pos]
    sF, sM = S(F), S(M)
    fbar, mbar = sF * ninv, sM * ninv
    A = S(F * M) - sF * mbar
    B = xp.maximum(S(F * F) - sF * fbar, 0.0)
    C = xp.maximum(S(M * M) - sM * mbar, 0.0)
    D = B * C + eps_total
    Dinv = 1.0 / D
    cc = A * A * Dinv
    value = -float(cc[w].sum()) / N
    alpha = wf * A * Dinv
    beta = wf * A * A * B * Dinv * Dinv
    g = F * S(alpha) - S(alpha * fbar) - M * S(beta) + S(beta * mbar)
    grad = (-2.0 / N) * wf * g
    gamma = float((wf * A * A * Dinv * Dinv).sum()) / N
    grad += gamma * epsk * (2.0 / N) * M
    return value, grad.astype(out_dtype, copy=False), int(N)


# ----------------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------------
def _check(fixed, warped, radius, eps, others):
    shape = tuple(fixed.shape)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ValueError(f"fixed must be 2-D or 3-D, got shape {shape}")
    if tuple(warped.shape) != shape:
        raise ValueError(f"warped must have the shape of fixed {shape}, got {tuple(warped.shape)}")
    for name, a, want in others:
        if a is not None and tuple(a.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
    for a, name in ((fixed, "fixed"), (warped, "warped")):
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    rad = (radius,) * ndim if np.ndim(radius) == 0 else tuple(radius)
    if len(rad) != ndim or not all(isinstance(x, numbers.Integral) for x in rad):
        raise ValueError(f"radius must be an integer or {ndim} integers (voxels), got {radius!r}")
    r = tuple(int(x) for x in rad)
    if any(x < 0 for x in r):
        raise ValueError(f"radius must be >= 0 voxels, got {radius!r}")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return shape, ndim, r


def _out_dtype(warped):
    return warped.dtype if warped.dtype.kind == "f" else np.dtype(np.float64)


def lncc_gradient(fixed, moving, *, radius, mask=None, eps=LNCC_EPS, backend=None):
    """LNCC cost and its gradient with respect to ``moving``: :func:`classreg.terms.lncc` with the radius in voxels.

    Parameters
    ----------
    fixed, moving : ndarray (*spatial)
        2-D or 3-D images on one grid.
    radius : int or sequence of int
        Window half-width in voxels per axis (``classreg.terms.lncc`` uses :func:`window_radius` of its mm radius).
    mask : bool ndarray (*spatial), optional
        Voxels that count; windows only read voxels inside it. ``None``: all.
    eps : float
        Relative regulariser (see the module docstring).
    backend : {None, "numpy", "numba", "cuda"}

    Returns
    -------
    value : float
        The cost in [-1, 0] (0.0 when the mask is empty).
    grad : ndarray (*spatial)
        ``dcost/dM``, dtype of ``moving`` (float64 for integer input); zeros when the mask is empty.
    """
    shape, ndim, r = _check(fixed, moving, radius, eps, (("mask", mask, tuple(fixed.shape)),))
    odt = _out_dtype(moving)
    be = _backend.resolve_backend(backend, fixed, moving)
    xp = _backend.get_array_module(fixed, moving)
    if be == "numba":
        grad, value, _, _ = _lncc_numba(fixed, moving, mask, None, None, (1.0,) * ndim, r, eps, None, odt)
        return value, (np.zeros(shape, dtype=odt) if grad is None else grad)
    w = _valid_reference(xp, shape, mask, None, None, None)
    if not bool(w.any()):
        return 0.0, xp.zeros(shape, dtype=odt)
    value, grad, _ = _lncc_reference(xp.asarray(fixed), xp.asarray(moving), w, r, eps, odt)
    return value, grad


def lncc_force(fixed, warped, grad_warped, disp=None, *, radius, spacing=1.0, mask=None, moving_valid=None,
               eps=LNCC_EPS, backend=None):
    """Demons LNCC force ``-dcost/dM · ∇M`` moving ``warped`` towards ``fixed``, with the cost of
    :func:`lncc_gradient` evaluated over the valid voxels.

    The valid voxels (the LNCC mask) are those of ``mask`` and ``moving_valid`` whose sample ``index + disp/spacing``
    lies less than half a voxel outside the grid (as :func:`classreg.kernels.demons.esm_force`); the force is 0
    elsewhere.

    Parameters
    ----------
    fixed, warped : ndarray (*spatial)
        The target and the moving image through the current map (2-D or 3-D, same grid).
    grad_warped : ndarray (*spatial, ndim)
        Gradient of ``warped`` (physical units, array frame).
    disp : ndarray (*spatial, ndim), optional
        Displacement (array frame, mm) through which ``warped`` was sampled; only used for the validity test.
    radius : int or sequence of int
        Window half-width in voxels per axis.
    spacing : float or sequence of float
        Voxel size per array axis (mm), for ``disp``.
    mask, moving_valid : bool ndarray (*spatial), optional
    eps : float
    backend : {None, "numpy", "numba", "cuda"}

    Returns
    -------
    force : ndarray (*spatial, ndim)
        ``-dcost/dM · grad_warped``, dtype of ``warped`` (float64 for integer input).
    value : float
        The LNCC cost over the valid voxels (0.0 when there are none).
    count : int
        Number of valid voxels.
    max_norm : float
        Largest ``|force|``.
    """
    shape, ndim, r = _check(fixed, warped, radius, eps,
                            (("grad_warped", grad_warped, tuple(fixed.shape) + (fixed.ndim,)),
                             ("disp", disp, tuple(fixed.shape) + (fixed.ndim,)),
                             ("mask", mask, tuple(fixed.shape)), ("moving_valid", moving_valid, tuple(fixed.shape))))
    h = tuple(float(x) for x in np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,)))
    odt = _out_dtype(warped)
    be = _backend.resolve_backend(backend, fixed, warped)
    xp = _backend.get_array_module(fixed, warped)
    if be == "numba":
        force, value, count, mx = _lncc_numba(fixed, warped, mask, moving_valid, disp, h, r, eps, grad_warped, odt)
        if force is None:
            return np.zeros(shape + (ndim,), dtype=odt), 0.0, 0, 0.0
        return force, value, count, mx
    w = _valid_reference(xp, shape, mask, moving_valid, disp, h)
    if not bool(w.any()):
        return xp.zeros(shape + (ndim,), dtype=odt), 0.0, 0, 0.0
    value, grad, count = _lncc_reference(xp.asarray(fixed), xp.asarray(warped), w, r, eps, odt)
    force = -(grad[..., None] * grad_warped)
    force[~w] = 0.0
    force = force.astype(odt, copy=False)
    mx = float(xp.sqrt(xp.max(xp.sum(force.astype(np.float64) ** 2, axis=-1))))
    return force, value, count, mx
