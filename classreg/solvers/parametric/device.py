"""The parametric engine's Mattes MI evaluations on the GPU (issue #26): array-module (CuPy) code.

:class:`DeviceAffineMI` computes what :func:`classreg.kernels.affine.affine_mi_kernel` computes on the CPU, written as
whole-array operations on the device: the samples ``y`` (mm) mapped to moving indices ``B y + b``, the moving
value/gradient stack interpolated linearly there (2ⁿ corner gathers; with the exact gradient, the value (/mask) stack
and the gradient of its linear interpolant), the samples outside the moving image or its mask weighted 0, the Parzen
joint histogram (box fixed window × cubic B-spline moving window, P. Mattes et al., "PET-CT image registration in
the chest using free-form deformations", IEEE TMI 22(1):120-128, 2003, eqs. 3-5; elastix's limiters) by one
weighted ``bincount``, the log-ratio table, the per-sample derivative gathered from it (Mattes eq. 12) and the two
chain-rule sums ``G = Σ_j (∂C/∂m_j) ∇M(z_j) (y_j − c)ᵀ``, ``g = Σ_j (∂C/∂m_j) ∇M(z_j)``, plus the Pearson
correlation of the valid pairs. Everything per sample stays on the device; one evaluation reads back ``3 + n + n²``
numbers (count, cost, correlation, ``g``, ``G``) in one synchronising read.

:class:`DeviceBSplineMI` is :func:`classreg.kernels.bspline.mi_step` (the CPU's fused B-spline iteration) the same
way: the samples through the dense prior of earlier fold-free pieces (linear, zero outside), the cubic B-spline
displacement from the 4ⁿ control points of each sample (gathered from the device coefficients at once; zero outside
ITK's valid region), the moving value and gradient, the same Mattes MI, and the gradient in the coefficients
``Σ_j (∂C/∂m_j) ∇M(z_j) β³(q_j − k)`` scattered to the control points by one weighted ``bincount`` (D. Rueckert et
al., IEEE TMI 18(8):712-721, 1999; S. Klein et al., IJCV 81(3):227-239, 2009, eq. 3), plus the bending energy and
its gradient (the separable quadratic form of :func:`classreg.kernels.bspline.bending_energy`, Rueckert eq. 6). The
coefficients and the gradient stay on the device; one evaluation reads 5 numbers (count, cost, correlation, the
gradient's norm and finiteness).

On a GPU (numba.cuda usable, not its simulator: :func:`fused_available`) both classes do the per-sample work in two
fused numba.cuda kernels instead (:mod:`classreg.kernels.mattes_cuda`: the map, interpolation, validity and
histogram in one; the derivative and the chain-rule scatter in the other, atomic float64 additions), with the small
table between them in CuPy: 2 kernels and ~50 array operations per evaluation instead of 414-584 (docs/gpu.md).
The array-module code stays the reference and the path under the simulator (where the kernels run each thread in
Python).

The CPU kernels are the reference: the same formulas; the sums are taken in another order (``bincount``, tree
reductions, the 4ⁿ taps summed at once), so the two agree to rounding, not bit for bit
(``tests/test_device_residency.py``).
"""
from __future__ import annotations

import numpy as np

from ...kernels import _backend
from ...kernels.sampling import _mi_setup

__all__ = ["DeviceAffineMI", "DeviceBSplineMI", "fused_available"]


def fused_available() -> bool:
    """Whether the evaluations use the fused numba.cuda kernels (:mod:`classreg.kernels.mattes_cuda`): numba.cuda
    usable on a real GPU. Under numba's CUDA simulator the array-module path is used (the simulator runs every
    thread in Python: the kernels are checked there on small draws, not run for whole registrations)."""
    return _backend._cuda_usable() and not _backend.cuda_simulator()


def _rows4(rows):
    """An (n, n + 1) matrix ``[A | o]`` as the kernels' flat tuple of three rows of 4 (padded with 0)."""
    out = [0.0] * 12
    for a, row in enumerate(rows):
        out[4 * a:4 * a + len(row)] = [float(v) for v in row]
    return tuple(out)


def _pad3(shape):
    return tuple(int(s) for s in shape) + (1,) * (3 - len(shape))


class _DeviceMI:
    """One pyramid level's moving stack on the device and the per-sample Mattes MI of the parametric engine
    (shared by :class:`DeviceAffineMI` and :class:`DeviceBSplineMI`).

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
        #: whether :meth:`_fused` does the per-sample work (:func:`fused_available`)
        self.fused = fused_available()
        mlin = [0.0] * 9  # the kernels' arguments
        for k in range(n):
            mlin[3 * k:3 * k + n] = self.m_lin[k]
        self._mlin, self._mshape = tuple(mlin), _pad3(self.shape)
        self._mi = (self.lof, self.hif, self.lom, self.him, self.tlo, self.thi, self.smallf, self.smallm, self.bsf,
                    self.bsm)
        self._none = cupy.zeros((1, n))  # the unused prior / coefficient arguments

    def _interpolate(self, y, B, b):
        """The value, index gradient and mask at ``B y + b``: ``(vals (N, 1 + n [+ 1]), inside (N,))`` (as
        :func:`classreg.kernels.sampling.linear_at` of the value/gradient stack, or with the exact gradient as
        :func:`classreg.kernels.sampling.linear_grad_at`; points outside are clamped for the gathers and
        flagged)."""
        n = self.ndim
        coords = [float(b[a]) + sum(float(B[a, k]) * y[:, k] for k in range(n)) for a in range(n)]
        return self._linear(self.flat, self.shape, coords, self.exact)

    def _linear(self, flat, shape, coords, exact):
        """Linear interpolation of the channels ``flat`` (voxels, C) of an image of ``shape`` at the index
        coordinates ``coords`` (one (N,) array per axis): ``(vals, inside)``; with ``exact`` the columns are the
        value, its index gradient (that of the interpolant) and the remaining channels. The 2ⁿ corners of every
        point are gathered at once (corner weights and indices built axis by axis as outer products), so the number
        of array operations grows with n, not 2ⁿ."""
        xp, n = self.xp, len(shape)
        inside = weights = index = None
        dweights = []  # ∂(corner weight)/∂c_a: the other axes' factors, ±1 along a
        for a in range(n):
            c = coords[a]
            hi = shape[a] - 1.0
            ok = (c >= 0.0) & (c <= hi)
            inside = ok if inside is None else inside & ok
            c = xp.clip(c, 0.0, hi)
            i = xp.minimum(xp.floor(c).astype(xp.int64), max(shape[a] - 2, 0))
            t = c - i
            wa = xp.stack([1.0 - t, t], axis=1)
            ia = xp.stack([i, xp.minimum(i + 1, shape[a] - 1)], axis=1) * int(np.prod(shape[a + 1:]))
            if weights is None:
                weights, index = wa, ia
                if exact:
                    one = xp.ones_like(t)
                    dweights = [xp.stack([-one, one], axis=1)]
                continue
            outer = (len(t), -1)
            if exact:
                one = xp.ones_like(t)
                dweights = [(d[:, :, None] * wa[:, None, :]).reshape(outer) for d in dweights]
                dweights.append((weights[:, :, None] * xp.stack([-one, one], axis=1)[:, None, :]).reshape(outer))
            weights = (weights[:, :, None] * wa[:, None, :]).reshape(outer)
            index = (index[:, :, None] + ia[:, None, :]).reshape(outer)
        v = flat[index]  # (N, 2ⁿ, C)
        vals = (weights[:, :, None] * v).sum(axis=1)
        if exact:  # value, gradient, other channels (the mask): the column layout of the value/gradient stack
            grad = [(d * v[:, :, 0]).sum(axis=1) for d in dweights]
            vals = xp.stack([vals[:, 0], *grad] + [vals[:, c] for c in range(1, flat.shape[1])], axis=1)
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

    def _mattes(self, f, vals, valid):
        """Mattes MI of the fixed values ``f`` and the moving values ``vals[:, 0]`` of the ``valid`` samples:
        device ``(count, value, ncc, dm, g_world)`` with ``dm`` (N,) the per-sample derivative ``∂C/∂m_j`` (0 for
        invalid samples) and ``g_world`` the per-sample ``∇_z M`` (a list of n (N,) arrays, from the index gradient
        ``vals[:, 1:1 + n]``)."""
        xp, n, nbf, nbm = self.xp, self.ndim, self.nbf, self.nbm
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
        value, flat_table = self._table(hist, cnt)
        scale = -1.0 / (cnt * self.bsm)
        dm = scale * dlim * (-0.5 * s * s * flat_table[cell] + (-2.0 * t + 1.5 * t2) * flat_table[cell + 1]
                             + (0.5 + t - 1.5 * t2) * flat_table[cell + 2] + 0.5 * t2 * flat_table[cell + 3])
        dm = w * dm
        # the correlation of the valid pairs
        da = f - (w * f).sum() / cnt
        db = mv - (w * mv).sum() / cnt
        ncc = self._ncc((w * da * db).sum(), (w * da * da).sum(), (w * db * db).sum())
        g_world = [sum(self.m_lin[k][a] * vals[:, 1 + k] for k in range(n)) for a in range(n)]  # m_linᵀ ∇_idx M
        return count, value, ncc, dm, g_world

    def _table(self, hist, cnt):
        """Mattes MI of the joint histogram ``hist`` (flat, nbf × nbm) of ``cnt`` samples and the flat log-ratio
        table (:func:`classreg.kernels.mattes_cuda.mi_table`): ``(value, table)``."""
        from ...kernels.mattes_cuda import mi_table

        value, table = mi_table(hist, cnt, self.nbf, self.nbm, self.tiny)
        return value, table.reshape(-1)

    def _ncc(self, sab, saa, sbb):
        """The Pearson correlation from the centred sums (NaN when either variance vanishes)."""
        xp = self.xp
        return xp.where((saa > 0.0) & (sbb > 0.0), xp.clip(sab / xp.sqrt(xp.maximum(saa * sbb, 1e-300)), -1.0, 1.0),
                        xp.nan)

    def _fused(self, y, f, rows, *, prior=None, grid=None, center=(0.0, 0.0, 0.0)):
        """The per-sample work in the two kernels of :mod:`classreg.kernels.mattes_cuda` (one launch each), the
        table between them in CuPy. ``rows``: world point (after the B-spline) → moving index, (n, n + 1);
        ``prior``: ``(flat, shape, rows)`` of :meth:`DeviceBSplineMI.use_prior` or None; ``grid``: ``(cflat,
        gshape, grid rows)`` or None (affine: the sums ``g``, ``G`` about ``center`` instead of a gradient in
        coefficients). Returns device ``(acc, value, ncc, grad)``: the accumulator (count at ``ACC_COUNT``, affine
        sums at ``ACC_AFFINE``), the cost, the correlation and the coefficient gradient (flat; None for affine)."""
        from ...kernels import mattes_cuda as mc

        xp, n, count = self.xp, self.ndim, int(y.shape[0])
        kernels = mc.cuda_kernels(n)
        acc = xp.zeros(mc.ACC_HIST + self.nbf * self.nbm)
        work = xp.empty((count, mc.work_columns(n)))
        pflat, pshape, prows = (self._none, (1, 1, 1), ()) if prior is None else prior
        cflat, gshape, grows = (self._none, (1, 1, 1), ()) if grid is None else grid
        _backend.launch(kernels["pass1"], count, y, f, pflat, _pad3(pshape), _rows4(prows), prior is not None, cflat,
                        _pad3(gshape), _rows4(grows), grid is not None, self.flat, self._mshape, _rows4(rows),
                        self.exact, self.has_mask, self._mlin, self.nbf, self.nbm, self._mi, work, acc)
        value, table = mc.mi_table(acc[mc.ACC_HIST:], xp.maximum(acc[mc.ACC_COUNT], 1.0), self.nbf, self.nbm,
                                   self.tiny)
        grad = None if grid is None else xp.zeros(cflat.size)
        _backend.launch(kernels["pass2"], count, y, f, work, table, self.bsm, _pad3(gshape), grid is not None,
                        tuple(float(c) for c in center) + (0.0,) * (3 - n), acc,
                        self._none.reshape(-1) if grad is None else grad)
        return acc, value, self._ncc(acc[mc.ACC_CORR], acc[mc.ACC_CORR + 1], acc[mc.ACC_CORR + 2]), grad

    def _valid(self, vals, inside):
        """The samples inside the moving image and, with a mask, where it interpolates to >= 0.5."""
        return inside & (vals[:, self.ndim + 1] >= 0.5) if self.has_mask else inside


class DeviceAffineMI(_DeviceMI):
    """The affine-family evaluation (see the module docstring); parameters as :class:`_DeviceMI`."""

    def evaluate(self, y, f, B, b, center):
        """The cost and chain-rule sums of device samples ``y`` (N, n) mm and fixed values ``f`` (N,).

        ``B`` (n, n), ``b`` (n,): sample point → moving index; ``center``: the model's centre (host numbers, passed
        as scalars). Returns host ``(count, value, ncc, G, g)`` as :func:`classreg.kernels.affine.affine_mi_kernel`
        (one read of ``3 + n + n²`` numbers).
        """
        xp, n = self.xp, self.ndim
        if self.fused:
            from ...kernels import mattes_cuda as mc

            rows = [[*(float(v) for v in B[a]), float(b[a])] for a in range(n)]
            acc, value, ncc, _ = self._fused(y, f, rows, center=center)
            out = xp.concatenate([acc[mc.ACC_COUNT:mc.ACC_COUNT + 1], xp.stack([value, ncc]),
                                  acc[mc.ACC_AFFINE:mc.ACC_AFFINE + n + n * n]]).get()  # the one read
        else:
            vals, inside = self._interpolate(y, B, b)
            count, value, ncc, dm, g_world = self._mattes(f, vals, self._valid(vals, inside))
            # the chain-rule sums
            g, G = [], []
            for a in range(n):
                gw = dm * g_world[a]
                g.append(gw.sum())
                G.extend((gw * (y[:, c] - float(center[c]))).sum() for c in range(n))
            out = xp.stack([count, value, ncc, *g, *G]).get()  # the one read of the evaluation
        count = int(out[0])
        if count < 2:  # as the CPU kernel: no metric below 2 samples
            return count, 0.0, float("nan"), np.zeros((n, n)), np.zeros(n)
        return count, float(out[1]), float(out[2]), out[3 + n:].reshape(n, n), out[3:3 + n].copy()


class DeviceBSplineMI(_DeviceMI):
    """The cubic B-spline evaluation of :func:`classreg.kernels.bspline.mi_step` on the device (see the module
    docstring).

    Parameters
    ----------
    stack, has_mask, m_lin, mi_args, exact_gradient
        As :class:`_DeviceMI`.
    m_off : ndarray, shape (n,)
        The moving image's world → index offset.
    grid_map : ndarray, shape (n, n + 1)
        World point → continuous control-grid index ``[M | o]`` (:meth:`.bspline.BSplineModel.grid_map`).
    grid_shape : tuple of int
        The control grid (array axis order).
    bending : tuple (weight, spacing) or None
        The bending-energy penalty's weight and the grid spacing in mm (array axis order), or None for none.
    """

    def __init__(self, stack, *, has_mask, m_lin, m_off, mi_args, grid_map, grid_shape, bending=None,
                 exact_gradient=True):
        super().__init__(stack, has_mask=has_mask, m_lin=m_lin, mi_args=mi_args, exact_gradient=exact_gradient)
        n, xp = self.ndim, self.xp
        self.m_rows = [[*self.m_lin[a], float(m_off[a])] for a in range(n)]
        self.g_rows = [[float(v) for v in row] for row in np.asarray(grid_map, dtype=float)]
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.grid_strides = [int(np.prod(self.grid_shape[a + 1:])) for a in range(n)]
        self._prior = None
        self._bending = None
        if bending is not None:  # the Gram matrices of kernels.bspline.bending_energy, uploaded once
            from ...kernels.bspline import _gram

            weight, h = float(bending[0]), [float(v) for v in bending[1]]
            inv_vol = 1.0 / float(np.prod([g - 3 for g in self.grid_shape]))
            grams, terms = {}, []
            for i in range(n):
                for j in range(i, n):
                    r = [int(d == i) + int(d == j) for d in range(n)]
                    for d in range(n):
                        key = (self.grid_shape[d], r[d])
                        if key not in grams:
                            grams[key] = xp.asarray(_gram(*key))
                    terms.append(((1.0 if i == j else 2.0) * inv_vol / (h[i] ** 2 * h[j] ** 2),
                                  [grams[(self.grid_shape[d], r[d])] for d in range(n)]))
            self._bending = (weight, terms)

    @staticmethod
    def _coords(y, rows):
        """``rows @ [y; 1]`` as one (N,) array per output axis, summed in the CPU kernel's order."""
        n = len(rows)
        return [sum(rows[a][k] * y[:, k] for k in range(n)) + rows[a][n] for a in range(n)]

    def use_prior(self, stack, prior_map):
        """The dense prior displacement of the earlier fold-free pieces (host ``stack`` (*shape, n), mm, and its
        world → index ``prior_map`` (n, n + 1)); uploaded when it is not the one on the device already."""
        if self._prior is None or self._prior[0] is not stack:
            n = self.ndim
            flat = self.xp.asarray(np.ascontiguousarray(stack, dtype=np.float64)).reshape(-1, n)
            self._prior = (stack, flat, tuple(int(s) for s in stack.shape[:n]),
                           [[float(v) for v in row] for row in np.asarray(prior_map, dtype=float)])

    def _taps(self, y):
        """The control points and cubic B-spline weights of the points ``y`` (N, n) mm: flat grid indices and
        weights (N, 4ⁿ), 0 for points outside ITK's valid region ``1 <= q_d <= gshape_d − 2`` (as
        :func:`classreg.kernels.bspline.samples`)."""
        from ...kernels.bspline import _w4

        xp, n, gs = self.xp, self.ndim, self.grid_shape
        q = self._coords(y, self.g_rows)
        ingrid = None
        for a in range(n):
            ok = (q[a] >= 1.0) & (q[a] <= gs[a] - 2.0)
            ingrid = ok if ingrid is None else ingrid & ok
        weights = index = None
        for a in range(n):
            qa = xp.where(ingrid, q[a], 1.0)  # outside (or NaN): any cell, weight 0 below
            r = xp.minimum(xp.floor(qa).astype(xp.int64), gs[a] - 3)
            wa = xp.stack(_w4(qa - r), axis=1)
            ia = ((r - 1)[:, None] + xp.arange(4)) * self.grid_strides[a]
            if weights is None:
                weights, index = wa, ia
            else:
                weights = (weights[:, :, None] * wa[:, None, :]).reshape(len(r), -1)
                index = (index[:, :, None] + ia[:, None, :]).reshape(len(r), -1)
        return index, weights * ingrid[:, None]

    def bending(self, coeffs):
        """The weighted bending energy and its gradient (:func:`classreg.kernels.bspline.bending_energy`: the
        separable quadratic form, Rueckert et al. 1999, eq. 6) of device coefficients (*gshape, n)."""
        xp = self.xp
        weight, terms = self._bending
        energy, grad = 0.0, 0.0
        for w, mats in terms:
            gc = coeffs
            for d, g in enumerate(mats):
                gc = xp.moveaxis(xp.tensordot(g, gc, axes=([1], [d])), 0, d)
            energy = energy + w * (coeffs * gc).sum()
            grad = grad + (2.0 * w) * gc
        return weight * energy, weight * grad

    def evaluate(self, y, f, coeffs, *, weight=1.0, penalty=True):
        """The cost and its gradient in the coefficients for device samples ``y`` (N, n) mm (after the initial
        transform) and fixed values ``f`` (N,), with device coefficients ``coeffs`` (*gshape, n).

        ``y`` → (the prior, when :meth:`use_prior` gave one) → ``z = y + u(q)`` → the moving value and
        gradient → Mattes MI → ``∂C/∂c_k = Σ_j ∂C/∂m_j ∇M(z_j) β³(q_j − k)`` scattered to the control points (one
        weighted ``bincount``, or the fused kernels' atomic additions); times ``weight``, plus the bending energy
        with ``penalty``. Returns ``(count, value, ncc, grad, norm, finite)``: the gradient (a flat device array) and
        host numbers from one read (count, value, correlation, the gradient's Euclidean norm and whether it is
        finite).
        """
        xp, n = self.xp, self.ndim
        cflat = coeffs.reshape(-1, n)
        if self.fused:
            prior = None if self._prior is None else self._prior[1:]
            acc, value, ncc, grad = self._fused(y, f, self.m_rows, prior=prior,
                                                grid=(cflat, self.grid_shape, self.g_rows))
            count = acc[0]  # mattes_cuda.ACC_COUNT
        else:
            if self._prior is not None:  # linear, zero outside (kernels.sampling.linear_at)
                _, flat, shape, rows = self._prior
                vals, inside = self._linear(flat, shape, self._coords(y, rows), False)
                y = y + xp.where(inside[:, None], vals, 0.0)
            index, weights = self._taps(y)
            z = y + (weights[:, :, None] * cflat[index]).sum(axis=1)
            vals, inside = self._linear(self.flat, self.shape, self._coords(z, self.m_rows), self.exact)
            count, value, ncc, dm, g_world = self._mattes(f, vals, self._valid(vals, inside))
            # the adjoint: each sample's dm ∇M to its 4ⁿ control points, per channel (flat index × n + channel)
            contrib = weights[:, :, None] * xp.stack([dm * g for g in g_world], axis=1)[:, None, :]
            slots = index[:, :, None] * n + xp.arange(n)
            grad = xp.bincount(slots.reshape(-1), weights=contrib.reshape(-1), minlength=cflat.size)
        value, grad = weight * value, weight * grad
        if penalty and self._bending is not None:
            pv, pg = self.bending(coeffs)
            value, grad = value + pv, grad + pg.reshape(-1)
        out = xp.stack([count, value, ncc, xp.sqrt((grad * grad).sum()),
                        xp.isfinite(grad).all().astype(xp.float64)]).get()  # the one read of the evaluation
        return int(out[0]), float(out[1]), float(out[2]), grad, float(out[3]), bool(out[4])
