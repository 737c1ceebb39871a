"""Low-rank and Nyström approximations of BCPD: the top-K eigenpairs of a kernel block (Lanczos or a Nyström
estimate, BCPD's ``-K``/``-J`` acceleration) and the Nyström E-step checked against exact sums on probe points.

Reference: O. Hirose, "A Bayesian formulation of coherent point drift", IEEE TPAMI 43(7):2269-2286, 2021,
doi:10.1109/TPAMI.2020.2971687 (Sec. 5, acceleration: low-rank kernel and Nyström approximation of the E-step sums).
"""
from __future__ import annotations

import math

import numpy as np

from ...backend import to_numpy
from ...kernels import points as kp

__all__ = ["estep_nystrom_checked", "lowrank_eigenpairs", "probe_error"]

#: a dense block of mb points with K ≥ mb / EIGH_RATIO wanted eigenpairs is decomposed with eigh, not Lanczos
EIGH_RATIO = 10
#: eigenvalues below this fraction of the largest are rounding noise of the float64 kernel; they are dropped when
#: the +1e-9 λ_max regularisation would give their (noise) eigenvectors a prior variance above NOISE_VARIANCE × the
#: block's mean squared radius (only for kernels far wider and stronger than the cloud, e.g. a 10 µm cloud with the
#: default 30 mm bandwidth)
NOISE_EIGENVALUE = 1e-12
NOISE_VARIANCE = 1e-2


def lowrank_eigenpairs(kern, yb, lb, K, method, nys, rng, budget, pd_guard):
    """Top-K eigenpairs of a kernel block: ``G ≈ Q diag(lam) Qᵀ``, Q orthonormal (M×K).

    ``method`` "eigsh" (Lanczos, on the dense block when it fits ``budget`` bytes, else matrix-free) or "nystrom"
    (from ``nys`` random landmarks, default max(300, 3K)). Returns ``(block, jitter)``: a dict with ``kind``, ``Q``,
    ``Q32`` (Q in float32), ``lam``, ``K`` (and the Nyström factors needed by the interpolation), and the jitter
    that would make the landmark kernel PSD (0 if it is).
    """
    if method == "eigsh":
        return _eigsh_pairs(kern, yb, lb, K, rng, budget, pd_guard), 0.0
    return _nystrom_pairs(kern, yb, lb, K, nys, rng, pd_guard)


def _eigsh_pairs(kern, yb, lb, K, rng, budget, pd_guard):
    from scipy.sparse.linalg import LinearOperator, eigsh

    mb = len(yb)
    v0 = rng.standard_normal(mb)
    if 8.0 * mb * mb <= budget:
        G = kern.matrix(yb, lb)
        op = G
    else:
        def mv(v):
            v = np.asarray(v).reshape(mb, -1)
            return kp.kernel_apply(yb, lb, yb, lb, v, kern.amp, kern.den)
        op = LinearOperator((mb, mb), matvec=mv, dtype=np.float64)
    if isinstance(op, np.ndarray) and EIGH_RATIO * K >= mb:
        # many eigenpairs of a dense block: a full symmetric eigendecomposition is much faster than Lanczos
        lam, Q = np.linalg.eigh(G)
        lam, Q = lam[-K:], Q[:, -K:]
    else:
        lam, Q = eigsh(op, k=K, which="LA", v0=v0)
    order = np.argsort(lam)[::-1]
    lam, Q = lam[order], Q[:, order]
    if lam[-1] < 0:
        if pd_guard == "raise":
            raise ValueError("the kernel has negative eigenvalues among its top K; use coherence='organ' or "
                             "equal bandwidths, or pd_guard='jitter'")
        keep = lam > 0
        lam, Q = lam[keep], Q[:, keep]
    if lam.size == 0 or not lam[0] > 0 or not np.all(np.isfinite(lam)):
        raise ValueError("the kernel block has no positive eigenvalue; check deformation (mm²) and bandwidth (mm)")
    rad2 = float(((yb - yb.mean(0)) ** 2).sum(1).mean())
    if lam[-1] <= NOISE_EIGENVALUE * lam[0] and 1e-9 * lam[0] > NOISE_VARIANCE * rad2:
        # eigenvalues at the float64 rounding level of the kernel (a bandwidth and prior variance far larger than
        # the cloud): their eigenvectors are noise, and the regularisation below would give them a prior variance
        # of 1e-9 λ_max, a sizeable fraction of the cloud's squared radius: drop them
        keep = lam > NOISE_EIGENVALUE * lam[0]
        lam, Q = lam[keep], Q[:, keep]
    lam = lam + 1e-9 * lam[0]
    Q = np.ascontiguousarray(Q)
    return {"kind": "eigsh", "Q": Q, "Q32": Q.astype(np.float32), "lam": lam, "K": len(lam)}


def _nystrom_pairs(kern, yb, lb, K, nys, rng, pd_guard):
    mb = len(yb)
    jit = 0.0
    J = min(mb, max(300, 3 * K) if nys is None else int(nys))
    sel = np.sort(rng.choice(mb, J, replace=False))
    C = kern.matrix(yb, lb, yb[sel], lb[sel])  # M × J
    Wj = C[sel]
    ew, Uw = np.linalg.eigh(Wj)
    if ew[0] < -1e-10 * ew[-1]:
        if pd_guard == "raise":
            raise ValueError(f"the multi-organ kernel is not positive semi-definite (min eigenvalue {ew[0]:.3g}); "
                             "use coherence='organ' or equal bandwidths, or pd_guard='jitter'")
        jit = -ew[0] * 1.01
    order = np.argsort(ew)[::-1][:K]
    ew, Uw = ew[order], Uw[:, order]
    keep = ew > 1e-10 * ew[0]  # the non-positive eigenvalues of the landmark kernel are dropped
    ew, Uw = ew[keep], Uw[:, keep]
    F = C @ (Uw / np.sqrt(ew))  # G ≈ F Fᵀ
    # eigenpairs of F Fᵀ from the K'×K' matrix Fᵀ F = V S Vᵀ: Q = F V S^-1/2, Λ = S (two GEMMs instead of a QR)
    S, V = np.linalg.eigh(F.T @ F)
    order = np.argsort(S)[::-1]
    S, V = S[order], V[:, order]
    keep = S > 1e-12 * S[0]
    S, V = S[keep], V[:, keep]
    Q = np.ascontiguousarray(F @ (V / np.sqrt(S)))
    lam = S + 1e-9 * S[0]
    # interpolation through the Nyström kernel k(q, Z) Wj⁺ k(Z, ·); F = Q S^1/2 Vᵀ (see kernel.interp_coef)
    return {"kind": "nystrom", "Q": Q, "Q32": Q.astype(np.float32), "lam": lam, "K": len(lam), "sel": sel,
            "Uw": Uw, "ew": ew, "FtQ": V * np.sqrt(S)}, jit


def estep_nystrom_checked(x, yhat, b, sigma2, c, lx, ly, U, J, probes, rng, be, dev=lambda a: a):
    """Nyström E-step (``J`` fresh random landmarks from X ∪ Ŷ) and its error on the probe points
    (:func:`probe_error`). ``dev`` moves an array to the E-step's device. Returns ``((nu, nu_x, px), error)``.
    """
    N, M = len(x), len(yhat)
    sel = rng.choice(M + N, J, replace=False)
    Z = np.concatenate([x[sel[sel < N]], yhat[sel[sel >= N] - N]])
    est = kp.estep_nystrom(dev(x), dev(yhat), dev(b), sigma2, c, dev(Z), lx=lx, ly=ly, U=U, backend=be,
                           return_denominator=True)
    est = tuple(to_numpy(a) for a in est)
    return est[:3], probe_error(x, yhat, b, sigma2, c, lx, ly, U, est, probes, be)


def probe_error(x, yhat, b, sigma2, c, lx, ly, U, est, probes, be) -> float:
    """Error of approximate E-step sums ``est = (nu, nu_x, px, den_raw)`` (host arrays) on the probe points: the
    largest of the relative errors of the denominators Σ_m φ_mn (probe targets) and of ν_m (probe sources, given the
    approximate q_n), and of the x̂_m error in units of σ. ``probes`` = (target indices, source indices)."""
    nu, _, px, den_raw = est
    pt, ps = probes
    err_den = _denominator_error(x, yhat, b, sigma2, c, lx, ly, U, den_raw, pt, be)
    err_src = _source_errors(x, yhat, b, sigma2, c, lx, ly, U, den_raw, nu, px, ps, be)
    return max(err_den, *err_src)


def _denominator_error(x, yhat, b, sigma2, c, lx, ly, U, den_raw, pt, be) -> float:
    """Largest relative error of the Nyström denominators at the probe targets ``pt``; the exact ones are
    Σ_l U[lx_n, l] Σ_{m: ly_m = l} b_m K(x_n, y_m)."""
    M, L = len(yhat), U.shape[0]
    by = np.zeros((M, L))
    by[np.arange(M), ly] = b
    per_label = kp.gauss_matrix(x[pt], yhat, sigma2, backend=be) @ by
    den_ex = (per_label * U[lx[pt]]).sum(1)
    return float(np.max(np.abs(den_raw[pt] - den_ex) / (den_ex + c + 1e-300)))


def _source_errors(x, yhat, b, sigma2, c, lx, ly, U, den_raw, nu, px, ps, be):
    """Relative error of ν and error of x̂ (in units of σ) at the probe sources ``ps``, against the exact sums
    given the Nyström q: Σ_l' U[l', ly_m] Σ_{lx_n = l'} K(y_m, x_n) q_n [1, x_n]. ``(inf,)`` if no probe source
    has a usable ν."""
    N, D = x.shape
    L = U.shape[0]
    den = den_raw + c
    q = np.where(den > kp.DEN_FLOOR, 1.0 / np.maximum(den, kp.DEN_FLOOR), 0.0)
    fx = np.zeros((N, L, D + 1))
    fx[np.arange(N), lx, 0] = q
    fx[np.arange(N), lx, 1:] = q[:, None] * x
    r = (kp.gauss_matrix(yhat[ps], x, sigma2, backend=be) @ fx.reshape(N, L * (D + 1))).reshape(len(ps), L, D + 1)
    s = (r * U[:, ly[ps]].T[:, :, None]).sum(1) * b[ps][:, None]
    nu_ex, px_ex = s[:, 0], s[:, 1:]
    ok = nu_ex > 0.1 * max(float(np.median(nu_ex)), 1e-300)
    if not np.any(ok):
        return (math.inf,)
    err_nu = float(np.max(np.abs(nu[ps][ok] - nu_ex[ok]) / nu_ex[ok]))
    xh = px[ps][ok] / np.where(nu[ps][ok] > 0, nu[ps][ok], 1e-300)[:, None]
    err_x = float(np.max(np.sqrt(((xh - px_ex[ok] / nu_ex[ok][:, None]) ** 2).sum(1)))) / math.sqrt(sigma2)
    return err_nu, err_x
