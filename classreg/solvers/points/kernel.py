"""The displacement prior of (multi-organ) BCPD: its kernel, the kernel blocks the v-update solves with (exact or
low-rank, per organ when organs are independent), and the GP interpolation coefficients of the solved blocks.

Kernel (MO-BCPD, WBIR 2022, eq. 4): ``G_ij = f(Λ_{l_i}, Λ_{l_j}) S_{l_i l_j} exp(-|y_i - y_j|² / (2 B_{l_i} B_{l_j}))``
with ``f = sqrt(Λ_i Λ_j)`` ("variance": ``G_ii = Λ``, BCPD's ``λ⁻¹ exp(-|y_i - y_j|²/(2β²))`` for one organ; Hirose,
TPAMI 2021) or ``Λ_i Λ_j`` ("product", as printed in the paper).
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ...kernels import points as kp
from .lowrank import lowrank_eigenpairs
from .sparse import TAPER, fine_matrix, wendland

__all__ = ["Kernel", "interp_coef", "kernel_blocks"]

logger = logging.getLogger("classreg")

#: blocks up to this many points are solved at full rank with rank="auto", larger ones with AUTO_RANK eigenpairs
AUTO_FULL_RANK_POINTS = 1500
AUTO_RANK = 100
#: with a fine scale (two-scale kernel), rank="auto" solves blocks up to this many points at full rank (a dense
#: Cholesky per iteration); larger ones split into AUTO_COARSE_RANK Nyström eigenpairs of the coarse scale (its
#: eigenvalues fall below 1e-4 of the largest by the 50th for a bandwidth equal to the cloud's RMS radius,
#: docs/notes/points.md) and the sparse fine scale
AUTO_FULL_RANK_POINTS_TWO_SCALE = 500
AUTO_COARSE_RANK = 50
#: blocks up to this many points find their eigenpairs with eigsh by default, larger ones with a Nyström estimate
AUTO_EIGSH_POINTS = 3000
#: smallest kernel denominator 2 B_i B_j (a bandwidth whose square underflows gives a delta kernel, not 0/0)
DEN_MIN = 1e-300
#: range of the normalised kernel amplitude (prior variance in units of the RMS radius²) that float64 handles:
#: above AMP_MAX the v-update overflows (a ValueError names ``deformation``), below AMP_MIN the prior is zero to
#: float64 precision and register_points estimates the similarity only
AMP_MAX = 1e100
AMP_MIN = 1e-200


def _fmt_list(a):
    a = np.ravel(a)
    return f"{a[0]:.3g}" if a.size == 1 else "[" + ", ".join(f"{v:.3g}" for v in a) + "]"


class Kernel:
    """The multi-organ kernel in one set of units: ``G_ij = amp[l_i,l_j] exp(-|y_i-y_j|²/den[l_i,l_j])``.

    ``amp = f(Λ_i, Λ_j) S_ij`` with f = sqrt(Λ_iΛ_j) ("variance", G_ii = Λ) or Λ_iΛ_j ("product", as printed in
    the paper); ``den = 2 B_i B_j``.
    """

    def __init__(self, lam, bw, S, convention, fine=None):
        lam = np.asarray(lam, dtype=float)
        bw = np.asarray(bw, dtype=float)
        S = np.asarray(S, dtype=float)
        with np.errstate(over="ignore", under="ignore"):
            pref = np.sqrt(np.outer(lam, lam)) if convention == "variance" else np.outer(lam, lam)
            if convention == "variance" and not np.all((pref > 0) & (pref < math.inf)):
                pref = np.outer(np.sqrt(lam), np.sqrt(lam))  # Λ_iΛ_j under- or overflows: same value, no square
            self.amp = pref * S
            # a bandwidth so small that 2 B_i B_j underflows is a delta kernel: keep the denominator positive
            self.den = np.maximum(2.0 * np.outer(bw, bw), DEN_MIN)
        self.lam, self.bw, self.S = lam, bw, S
        #: the fine scale (:mod:`.sparse`): ``(amp_f, den_f, θ)`` with ``amp_f = Λ_f S``, ``den_f = 2 β_f²`` and the
        #: taper radius θ, or None (one-scale BCPD)
        self.fine = None
        if fine is not None and fine[0] > 0:
            lam_f, bw_f = float(fine[0]), float(fine[1])
            self.fine = (lam_f * S, np.full_like(S, max(2.0 * bw_f * bw_f, DEN_MIN)), TAPER * bw_f)

    def scaled(self, r):
        """The same kernel for points divided by ``r`` (lengths / r, variances / r²)."""
        k = Kernel.__new__(Kernel)
        try:
            r2 = r**2
        except OverflowError:
            r2 = math.inf
        if not 0 < r2 < math.inf:  # r beyond ~1e±154: divide twice instead of by an overflowing/underflowing r²
            with np.errstate(over="ignore", under="ignore"):
                k.amp = self.amp / r / r
                k.den = np.maximum(self.den / r / r, DEN_MIN)
                k.lam, k.bw, k.S = self.lam / r / r, self.bw / r, self.S
                k.fine = None if self.fine is None else (self.fine[0] / r / r, np.maximum(self.fine[1] / r / r,
                                                                                        DEN_MIN), self.fine[2] / r)
            return k
        with np.errstate(over="ignore", under="ignore"):
            k.amp = self.amp / r2
            k.den = np.maximum(self.den / r2, DEN_MIN)
            k.lam, k.bw, k.S = self.lam / r2, self.bw / r, self.S
            k.fine = None if self.fine is None else (self.fine[0] / r2, np.maximum(self.fine[1] / r2, DEN_MIN),
                                                     self.fine[2] / r)
        return k

    def coarse(self):
        """This kernel without its fine scale."""
        if self.fine is None:
            return self
        k = Kernel.__new__(Kernel)
        k.__dict__.update(self.__dict__)
        k.fine = None
        return k

    def check_scale(self, lam_mm, r) -> bool:
        """Whether this normalised kernel (points divided by ``r`` mm) has a usable prior variance: raises a
        ValueError naming ``deformation`` (Λ = ``lam_mm``, mm²) when it is too large to compute with (above
        :data:`AMP_MAX` radius²), returns False when it is negligible (below :data:`AMP_MIN`: the displacement prior
        is zero to float64 precision, only the similarity can be estimated) and True otherwise."""
        amax = float(np.max(self.amp))
        if not amax <= AMP_MAX:
            raise ValueError(f"deformation={_fmt_list(lam_mm)} mm² is too large for point sets of RMS radius "
                             f"{r:.3g} mm (the v-update would overflow float64); give deformation in mm² on the "
                             "scale of the displacements (e.g. (radius / 10)²) or use mode='similarity'")
        return amax >= AMP_MIN

    def matrix(self, a, la, b=None, lb=None):
        """The dense kernel (both scales) between ``a`` and ``b``."""
        if b is None:
            b, lb = a, la
        G = kp.kernel_matrix(a, la, b, lb, self.amp, self.den)
        if self.fine is not None:
            amp_f, den_f, theta = self.fine
            d = np.sqrt(np.maximum(((np.asarray(a)[:, None, :] - np.asarray(b)[None, :, :]) ** 2).sum(-1), 0.0))
            G += kp.kernel_matrix(a, la, b, lb, amp_f, den_f) * wendland(d / theta)
        return G


def kernel_blocks(kern: Kernel, y, ly, *, rank, lowrank, nystrom_samples, budget, pd_guard, rng, r):
    """The kernel blocks of the v-update: one per organ when S is the identity (the kernel is block-diagonal), else
    one for all points.

    Each block is a dict with ``idx`` (its points) and ``kind``: "full" (``G``, the exact block, jittered if
    needed), "eigsh" or "nystrom" (``Q``, ``lam``: the top-K eigenpairs, see :func:`lowrank_eigenpairs`).
    ``y`` are the normalised source points (mm / ``r``), ``budget`` the memory budget in bytes. Returns
    ``(blocks, resolved_ranks, jitter)``, the jitter in mm² (0 when none was needed).
    """
    S = kern.S
    n_org = S.shape[0]
    block_diag = np.allclose(S, np.eye(n_org))
    groups = [np.nonzero(ly == label)[0] for label in range(n_org)] if block_diag else [np.arange(len(y))]
    # the product kernel is PSD when organs are independent or share one bandwidth under S = 1; otherwise check
    check_psd = not block_diag and not (np.allclose(S, 1) and np.allclose(kern.bw, kern.bw[0]))
    blocks, ranks, jitter = [], [], 0.0
    for idx in groups:
        k_b = _block_rank(rank, len(idx), kern.fine is not None)
        yb, lb = y[idx], ly[idx]
        if k_b == "full":
            kb, jit = _full_block(kern, yb, lb, budget, pd_guard, check_psd)
            ranks.append("full")
        else:
            method = lowrank or ("eigsh" if len(idx) <= AUTO_EIGSH_POINTS and kern.fine is None else "nystrom")
            kb, jit = lowrank_eigenpairs(kern.coarse(), yb, lb, k_b, method, nystrom_samples, rng, budget, pd_guard)
            ranks.append(f"{kb['K']} ({method})")
            if kern.fine is not None:
                if check_psd:
                    raise ValueError("the fine scale of the kernel (fine_deformation > 0) with a low-rank coarse "
                                     "kernel needs coherence 'organ' or 'global' with one bandwidth; use "
                                     "fine_deformation=0 or rank='full'")
                amp_f, den_f, theta = kern.fine
                kb["fine"] = fine_matrix(yb, lb, amp_f, den_f, theta)
                kb["fine_bw"] = math.sqrt(float(den_f.max()) / 2.0)
                kb["vf"] = None
                ranks[-1] += f" + fine sparse ({kb['fine'].nnz / max(len(idx), 1):.0f} per row)"
        jitter = max(jitter, jit * r**2)
        kb["idx"] = idx
        blocks.append(kb)
    return blocks, ranks, jitter


def _block_rank(rank, mb: int, two_scale: bool = False):
    """"full" or the number of eigenpairs K of a block of ``mb`` points (``two_scale``: the kernel has a fine
    scale, whose sparse part is solved apart from a low-rank coarse part)."""
    if rank == "auto":
        if two_scale:
            return "full" if mb <= AUTO_FULL_RANK_POINTS_TWO_SCALE else AUTO_COARSE_RANK
        return "full" if mb <= AUTO_FULL_RANK_POINTS else AUTO_RANK
    if rank == "full" or int(rank) >= mb:
        return "full"
    return int(rank)


def _full_block(kern: Kernel, yb, lb, budget, pd_guard, check_psd):
    """The exact kernel block, with the smallest diagonal jitter that makes it PSD when ``check_psd`` finds a
    negative eigenvalue (``pd_guard="jitter"``). Returns ``(block, jitter)`` (jitter in normalised units)."""
    mb = len(yb)
    need = 3 * 8.0 * mb * mb
    if need > budget:
        raise ValueError(f"a full-rank kernel block of {mb} points needs {need / 2**20:.3g} MB "
                         f"(> memory_budget_mb={budget / 2**20:g}); use rank=K (e.g. rank=100)")
    G = kern.coarse().matrix(yb, lb)
    jit = 0.0
    if check_psd:
        ev = float(np.linalg.eigvalsh(G)[0])
        if ev < -1e-10 * float(np.abs(np.diag(G)).max()):
            if pd_guard == "raise":
                raise ValueError(f"the multi-organ kernel is not positive semi-definite (smallest eigenvalue "
                                 f"{ev:.3g}); use coherence='organ' or equal bandwidths, or pd_guard='jitter'")
            jit = -ev * 1.01
            G = G + jit * np.eye(mb)
            logger.warning("register_points: kernel not PSD (min eigenvalue %.3g); added jitter %.3g", ev, jit)
    kb = {"kind": "full", "G": G}
    if kern.fine is not None:  # added to G once σ falls below the fine bandwidth (bcpd.v_update_block)
        amp_f, den_f, theta = kern.fine
        kb["Gf"] = fine_matrix(yb, lb, amp_f, den_f, theta).toarray()
        kb["fine_bw"] = math.sqrt(float(den_f.max()) / 2.0)
    return kb, jit


def interp_coef(kb, coef, y, ly):
    """Anchors, anchor labels and coefficients of the GP interpolation ``v(q) = Σ_j k(q, z_j) a_j`` (MO-BCPD
    eqs. 5-6) of one solved block, and the fine-scale coefficients at the block's source points (or None).

    ``coef`` is W = (G + c_v diag(ν)⁻¹)⁻¹ E (full rank), Qᵀ W (low rank) or the pair (Qᵀ W_c, W_f) of a low-rank
    block with a fine scale, from the v-update. A full-rank block solves with the two-scale kernel, so its one W
    weights both scales."""
    idx = kb["idx"]
    fine = None
    if isinstance(coef, tuple):
        coef, fine = coef
    active = kb.get("fine_active", False)
    if kb["kind"] == "full":
        return y[idx], ly[idx], coef, (coef if active else None)
    if kb["kind"] in ("eigsh", "eigh"):
        # a = Q Qᵀ W: with exact eigenvectors G Q Qᵀ W = Q Λ Qᵀ W = v̂ at the source points
        a = kb["Q"] @ coef
        if kb["kind"] == "eigh":  # the eigenpairs of a full block's G (both scales once the fine one is active)
            return y[idx], ly[idx], a, (a if active else None)
        return y[idx], ly[idx], a, (fine if active else None)
    # Nyström G ≈ F Fᵀ, F = C Uw diag(ew)^-1/2 = Q S^1/2 Vᵀ: a = Wj⁺ Cᵀ W = Uw diag(ew)^-1/2 Fᵀ W with
    # Fᵀ W = V S^1/2 Qᵀ W (the part of Cᵀ W outside the kept eigenvectors of Wj is projected out by Wj⁺)
    sel = kb["sel"]
    a = (kb["Uw"] / np.sqrt(kb["ew"])) @ (kb["FtQ"] @ coef)
    return y[idx][sel], ly[idx][sel], a, (fine if active else None)
