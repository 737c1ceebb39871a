"""The parametric engine's affine-family Mattes MI evaluation on the GPU (issue #26): array-module (CuPy) code.

What :func:`classreg.kernels.affine.affine_mi_kernel` computes on the CPU, written as whole-array operations on the
device: the samples ``y`` (mm) mapped to moving indices ``B y + b``, the moving value/gradient stack interpolated
linearly there (2ⁿ corner gathers; with the exact gradient, the value (/mask) stack and the gradient of its linear
interpolant), the samples outside the moving image or its mask weighted 0, the Parzen joint
histogram (box fixed window × cubic B-spline moving window, P. Mattes et al., "PET-CT image registration in the
chest using free-form deformations", IEEE TMI 22(1):120-128, 2003, eqs. 3-5; elastix's limiters) by one weighted
``bincount``, the log-ratio table, the per-sample derivative gathered from it (Mattes eq. 12) and the two chain-rule
sums ``G = Σ_j (∂C/∂m_j) ∇M(z_j) (y_j − c)ᵀ``, ``g = Σ_j (∂C/∂m_j) ∇M(z_j)``, plus the Pearson correlation of the
valid pairs. Everything per sample stays on the device; one evaluation reads back ``3 + n + n²`` numbers (count,
cost, correlation, ``g``, ``G``) in one synchronising read.

The CPU kernel is the reference: the same formulas; the sums are taken in another order (``bincount``, tree
reductions), so the two agree to rounding, not bit for bit (``tests/test_device_residency.py``).
"""
from __future__ import annotations

import numpy as np

from ...kernels.sampling import _mi_setup

__all__ = ["DeviceAffineMI"]


class DeviceAffineMI:
    """One pyramid level's moving stack on the device and the evaluation of :meth:`evaluate`.

    Parameters
    ----------
    stack : ndarray, shape (*spatial, C)
        The host value / index-gradient (/ mask) stack of ``LevelObjective`` (float32), or its value (/ mask) stack
        with ``exact_gradient``; uploaded once, here.
    has_mask : bool
        Whether the last channel is the moving mask (a sample is valid where it is >= 0.5).
    exact_gradient : bool
        Take the gradient of the linear interpolant of the value channel (as
        :func:`classreg.kernels.sampling.linear_grad_at`) instead of interpolating gradient channels.
    m_lin : ndarray, shape (n, n)
        The moving image's world → index matrix (∇_z M = m_linᵀ ∇_idx M).
    mi_args : tuple
        ``(nbf, nbm, lof, hif, lom, him, tlo, thi, normalised, tiny)`` as for
        :func:`classreg.kernels.sampling.mattes_mi_kernel` (``normalised`` must be False: Mattes MI only).
    """

    def __init__(self, stack, *, has_mask, m_lin, mi_args, exact_gradient=False):
        import cupy

        self.xp = cupy
        n = stack.ndim - 1
        self.ndim, self.shape, self.channels = n, tuple(int(s) for s in stack.shape[:n]), int(stack.shape[-1])
        self.flat = cupy.asarray(np.ascontiguousarray(stack, dtype=np.float32)).reshape(-1, self.channels)
        self.strides = tuple(int(np.prod(self.shape[a + 1:])) for a in range(n))
        self.has_mask, self.exact = bool(has_mask), bool(exact_gradient)
        self.m_lin = [[float(v) for v in row] for row in np.asarray(m_lin, dtype=float)]
        nbf, nbm, lof, hif, lom, him, tlo, thi, normalised, tiny = mi_args
        if normalised:
            raise ValueError("the device evaluation covers Mattes MI, not normalised MI")
        self.nbf, self.nbm = int(nbf), int(nbm)
        self.lof, self.hif, self.lom, self.him = float(lof), float(hif), float(lom), float(him)
        self.tlo, self.thi, self.tiny = float(tlo), float(thi), float(tiny)
        self.smallf, self.smallm, self.bsf, self.bsm = _mi_setup(self.nbf, self.nbm, self.lof, self.hif, self.lom,
                                                                 self.him)

    def _interpolate(self, y, B, b):
        """The value, index gradient and mask at ``B y + b``: ``(vals (N, 1 + n [+ 1]), inside (N,))`` (as
        :func:`classreg.kernels.sampling.linear_at` of the value/gradient stack, or with the exact gradient as
        :func:`classreg.kernels.sampling.linear_grad_at`; points outside are clamped for the gathers and
        flagged)."""
        xp, n = self.xp, self.ndim
        inside = None
        base, frac = [], []
        for a in range(n):
            c = float(b[a]) + sum(float(B[a, k]) * y[:, k] for k in range(n))
            hi = self.shape[a] - 1.0
            ok = (c >= 0.0) & (c <= hi)
            inside = ok if inside is None else inside & ok
            c = xp.clip(c, 0.0, hi)
            i = xp.minimum(xp.floor(c).astype(xp.int64), max(self.shape[a] - 2, 0))
            base.append(i)
            frac.append(c - i)
        vals, grad = 0.0, [0.0] * n
        for corner in range(2 ** n):
            bits = [(corner >> (n - 1 - a)) & 1 for a in range(n)]
            factors = [frac[a] if bits[a] else 1.0 - frac[a] for a in range(n)]
            w, flat = 1.0, 0
            for a in range(n):
                w = w * factors[a]
                flat = flat + xp.minimum(base[a] + bits[a], self.shape[a] - 1) * self.strides[a]
            v = self.flat[flat]
            vals = vals + w[:, None] * v
            if self.exact:
                for a in range(n):  # ∂/∂c_a of the corner's weight: the other axes' factors, ±1 along a
                    wa = 1.0 if bits[a] else -1.0
                    for k in range(n):
                        if k != a:
                            wa = wa * factors[k]
                    grad[a] = grad[a] + wa * v[:, 0]
        if self.exact:  # value, gradient, mask: the column layout of the value/gradient stack
            vals = xp.stack([vals[:, 0], *grad] + ([vals[:, 1]] if self.has_mask else []), axis=1)
        return vals, inside

    def _limit(self, x):
        """elastix's exponential limiter of the moving values and its derivative (``kernels.sampling._limit``)."""
        xp = self.xp
        m, d = x, xp.ones_like(x)
        k = self.thi - self.him
        if k < -1e-10:
            e = xp.exp((xp.maximum(x, self.thi) - self.thi) / k)
            hv, hd = self.him + k * e, e
        else:
            hv, hd = self.him, 0.0
        m, d = xp.where(x > self.thi, hv, m), xp.where(x > self.thi, hd, d)
        k = self.tlo - self.lom
        if k > 1e-10:
            e = xp.exp((xp.minimum(x, self.tlo) - self.tlo) / k)
            lv, ld = self.lom + k * e, e
        else:
            lv, ld = self.lom, 0.0
        return xp.where(x < self.tlo, lv, m), xp.where(x < self.tlo, ld, d)

    def evaluate(self, y, f, B, b, center):
        """The cost and chain-rule sums of device samples ``y`` (N, n) mm and fixed values ``f`` (N,).

        ``B`` (n, n), ``b`` (n,): sample point → moving index; ``center``: the model's centre (host numbers, passed
        as scalars). Returns host ``(count, value, ncc, G, g)`` as :func:`classreg.kernels.affine.affine_mi_kernel`
        (one read of ``3 + n + n²`` numbers).
        """
        xp, n, nbf, nbm = self.xp, self.ndim, self.nbf, self.nbm
        vals, valid = self._interpolate(y, B, b)
        if self.has_mask:
            valid = valid & (vals[:, n + 1] >= 0.5)
        w = valid.astype(xp.float64)
        count = w.sum()
        cnt = xp.maximum(count, 1.0)
        mv = vals[:, 0]
        # the Parzen histogram (kernels.sampling._mi_add, every sample at once; invalid ones weigh 0)
        fc = xp.clip(f, self.lof, self.hif)
        fi = xp.clip(xp.floor((fc - (self.lof - self.smallf)) / self.bsf + 0.5).astype(xp.int64), 0, nbf - 1)
        m, dlim = self._limit(mv)
        xim = (m - (self.lom - self.smallm)) / self.bsm + 1.0
        first = xp.clip(xp.floor(xim).astype(xp.int64) - 1, 0, nbm - 4)
        t = xp.clip(xim - (first + 1), 0.0, 1.0)
        s = 1.0 - t
        t2 = t * t
        t3 = t2 * t
        sixth = 1.0 / 6.0
        win = (s * s * s * sixth, (4.0 - 6.0 * t2 + 3.0 * t3) * sixth, (1.0 + 3.0 * t + 3.0 * t2 - 3.0 * t3) * sixth,
               t3 * sixth)
        cell = fi * nbm + first
        hist = xp.bincount(xp.concatenate([cell + k for k in range(4)]),
                           weights=xp.concatenate([w * wk for wk in win]), minlength=nbf * nbm)
        # the table (kernels.sampling._mi_table, Mattes MI) and the per-sample derivative (_mi_grad)
        p = (hist / cnt).reshape(nbf, nbm)
        q = p.sum(axis=1)[:, None] * p.sum(axis=0)[None, :]
        ok = (p > self.tiny) & (q > self.tiny)
        table = xp.where(ok, xp.log(xp.where(ok, p, 1.0) / xp.where(ok, q, 1.0)), 0.0)
        value = -(p * table).sum()
        flat_table = table.reshape(-1)
        scale = -1.0 / (cnt * self.bsm)
        dm = scale * dlim * (-0.5 * s * s * flat_table[cell] + (-2.0 * t + 1.5 * t2) * flat_table[cell + 1]
                             + (0.5 + t - 1.5 * t2) * flat_table[cell + 2] + 0.5 * t2 * flat_table[cell + 3])
        dm = w * dm
        # the chain-rule sums (∇_z M = m_linᵀ ∇_idx M) and the correlation of the valid pairs
        g, G = [], []
        for a in range(n):
            gw = dm * sum(self.m_lin[k][a] * vals[:, 1 + k] for k in range(n))
            g.append(gw.sum())
            G.extend((gw * (y[:, c] - float(center[c]))).sum() for c in range(n))
        da = f - (w * f).sum() / cnt
        db = mv - (w * mv).sum() / cnt
        sab, saa, sbb = (w * da * db).sum(), (w * da * da).sum(), (w * db * db).sum()
        ncc = xp.where((saa > 0.0) & (sbb > 0.0), xp.clip(sab / xp.sqrt(xp.maximum(saa * sbb, 1e-300)), -1.0, 1.0),
                       xp.nan)
        out = xp.stack([count, value, ncc, *g, *G]).get()  # the one read of the evaluation
        count = int(out[0])
        if count < 2:  # as the CPU kernel: no metric below 2 samples
            return count, 0.0, float("nan"), np.zeros((n, n)), np.zeros(n)
        return count, float(out[1]), float(out[2]), out[3 + n:].reshape(n, n), out[3:3 + n].copy()
