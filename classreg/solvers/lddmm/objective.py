"""The data terms of the LDDMM energy, as the adjoint sweep needs them.

The energy minimised over the initial momentum ``P₀`` is ``E(P₀) = ½‖v₀‖²_V + D(I₁, φ₁⁻¹)``, where ``I₁`` is the
template shot to time 1 and ``X = φ₁⁻¹`` the final inverse map (index units). A data term is called as
``term(I1, X, gradient=True) -> (D, ∂D/∂I₁, ∂D/∂X or None)``; :class:`~.shooting.GeodesicShooting` turns the two
partial derivatives into ∇_{P₀}E. Both terms are scaled by ``1/σ²`` (``data_sigma``) and by the voxel volume, so
that with the regulariser (a physical integral too) the energy does not depend on the grid:

* :class:`SSDTerm`: ``D = (Π h / 2σ²) Σ_x w(x) W(X(x)) (I₁(x) − J(x))²`` (F.-X. Vialard, L. Risser, D. Rueckert,
  C. J. Cotter, "Diffeomorphic 3D image registration via geodesic shooting using an efficient adjoint
  calculation", IJCV 97:229-241, 2012, doi:10.1007/s11263-011-0481-8), with the fixed mask ``w`` and the moving
  mask ``W`` sampled through the map, whose dependence on the map is differentiated;
* :class:`LNCCTerm`: ``D = (vol / σ²) · C_lncc(J, I₁)`` with ``C_lncc`` the local normalised correlation cost of
  :class:`classreg.terms.LNCC` (B. B. Avants, C. L. Epstein, M. Grossman, J. C. Gee, "Symmetric diffeomorphic image
  registration with cross-correlation", Med. Image Anal. 12(1):26-41, 2008, doi:10.1016/j.media.2007.06.004) and
  ``vol`` the physical volume of the mask;
* :class:`MITerm`: ``D = (vol / σ²) · (−MI(J, I₁))``, Mattes mutual information (D. Mattes et al., "PET-CT image
  registration in the chest using free-form deformations", IEEE TMI 22(1):120-128, 2003; elastix's Parzen
  windows, :func:`classreg.terms.mattes_mi`, its entropies smoothed) over every mask voxel, its histogram limits
  fixed for the level from the fixed and the template image (as elastix fixes them per resolution), so that the
  cost is one smooth function of ``I₁`` and its gradient exact. Like the LNCC cost, −MI is of order one, so
  ``data_sigma`` weighs both on a comparable scale.

The SSD term keeps its own weighted form: :mod:`classreg.terms` takes boolean masks only, while here the moving
mask is a continuous weight sampled through the map and differentiated, and the residual is formed in the working
precision.
"""
from __future__ import annotations

import numpy as np

from ... import terms

__all__ = ["LNCCTerm", "MITerm", "SSDTerm", "data_term"]


class SSDTerm:
    """``D = (Π h / 2σ²) Σ_x w(x) W(X(x)) (I₁(x) − J(x))²``.

    Parameters
    ----------
    target : ndarray
        J, the fixed image (normalised intensities).
    sigma2 : float
        σ² of the data term (normalised intensities squared).
    cell : float
        Voxel volume Π h (mm^d).
    fixed_weight : ndarray, optional
        ``w``, the fixed mask as 0/1 weights (default 1).
    moving_weight : ndarray, optional
        ``W``, the moving mask on the template grid, sampled through the final inverse map ``X`` (default 1); its
        dependence on ``X`` is differentiated.
    backend : {None, "numpy", "numba"}
        Kernel implementation of the sampling.
    """

    def __init__(self, target, sigma2, cell, *, fixed_weight=None, moving_weight=None, backend=None):
        self.J = target
        self.scale = float(cell) / float(sigma2)
        self.w = fixed_weight
        self.W = moving_weight
        self.backend = backend

    def __call__(self, I1, X, gradient=True):
        """``(D, ∂D/∂I₁, ∂D/∂X)``; the derivatives are None without ``gradient`` (∂D/∂X also without ``W``)."""
        from ...kernels.adjoint import sample_linear

        r = I1 - self.J
        wt = None if self.w is None else self.w
        dX = None
        if self.W is not None:
            if gradient:
                Wx, dW = sample_linear(self.W, X, gradient=True, backend=self.backend)
            else:
                Wx = sample_linear(self.W, X, backend=self.backend)
            wt = Wx if wt is None else wt * Wx
        r64 = r.astype(np.float64)
        e = 0.5 * self.scale * float(np.sum(r64 * r64 if wt is None else wt * r64 * r64))
        if not gradient:
            return e, None, None
        dI = (self.scale * (r if wt is None else wt * r)).astype(I1.dtype, copy=False)
        if self.W is not None:
            f = r * r if self.w is None else self.w * r * r
            dX = (0.5 * self.scale * f)[..., None] * dW
        return e, dI, dX


class LNCCTerm:
    """``D = (vol / σ²) · C_lncc(J, I₁)``: the cost of :class:`classreg.terms.LNCC` (−mean squared local correlation
    in a box of ``radius`` mm over the mask, in [−1, 0]) times the physical volume of the mask over σ².

    The moving mask is applied as a (not differentiated) restriction of the mask to where the moving weight,
    sampled through the map, exceeds 0.5 (ignored if that leaves no voxel).
    """

    def __init__(self, target, sigma2, cell, *, radius, spacing, fixed_mask=None, moving_weight=None,
                 backend=None):
        self.J = target
        self.sigma2 = float(sigma2)
        self.cell = float(cell)
        self.radius = float(radius)
        self.spacing = tuple(spacing)
        self.mask = fixed_mask
        self.W = moving_weight
        self.backend = backend
        self.term = terms.LNCC(radius=self.radius)

    def __call__(self, I1, X, gradient=True):
        """``(D, ∂D/∂I₁, None)`` (derivative None without ``gradient``)."""
        mask, scale = _mask_and_scale(self, I1, X)
        if self.backend in (None, "auto", "numba", "cuda") and I1.dtype == np.float32:
            # the fused kernel (float32 sums in float64, parity with the reference: tests/test_kernels_lncc.py)
            from ...kernels.lncc import lncc_gradient, window_radius

            val, g = lncc_gradient(self.J, I1, radius=window_radius(self.radius, self.spacing, I1.ndim), mask=mask,
                                   eps=self.term.params["eps"], backend=self.backend)
        elif not gradient:
            return scale * self.term.value(self.J, I1, mask=mask, spacing=self.spacing), None, None
        else:
            val, g = self.term.gradient(self.J, I1, mask=mask, spacing=self.spacing)
        if not gradient:
            return scale * val, None, None
        return scale * val, (scale * g).astype(I1.dtype, copy=False), None


#: the smoothing of the MI entropies, H(q) = −Σ q log(q + eps) (bin probabilities; a bin of a 32 × 32 histogram
#: holds 1e-3 on average)
MI_EPS = 1e-4


class MITerm:
    """``D = (vol / σ²) · (−MI(J, I₁))``: Mattes mutual information (:func:`classreg.terms.mattes_mi`, ``bins``
    bins) over the mask, times the physical volume of the mask over σ².

    The MI is the smoothed one (``eps`` = :data:`MI_EPS`, :func:`classreg.terms.measures.mattes_mi_samples`):
    elastix's form, whose empty bins are skipped, has an unbounded derivative as a bin empties or fills, which made
    the L-BFGS path chaotic (docs/notes/tradeoff.md). The histogram limits are computed once, from ``target`` inside the fixed mask and from ``template`` (the moving
    image of the level), and held for every evaluation: recomputing them from ``I₁`` would change the cost under
    the line search (its gradient treats them as constants). The moving mask restricts the mask as in
    :class:`LNCCTerm`. The sums run on the host (``register_lddmm`` refuses "mi" on the device).
    """

    def __init__(self, target, sigma2, cell, *, template, bins=32, fixed_mask=None, moving_weight=None,
                 backend=None):
        self.J = target
        self.sigma2 = float(sigma2)
        self.cell = float(cell)
        self.bins = int(bins)
        self.mask = fixed_mask
        self.W = moving_weight
        self.backend = backend
        self.limits = (terms.intensity_limits(target, mask=fixed_mask), terms.intensity_limits(template))

    def __call__(self, I1, X, gradient=True):
        """``(D, ∂D/∂I₁, None)`` (derivative None without ``gradient``)."""
        mask, scale = _mask_and_scale(self, I1, X)
        out = terms.mattes_mi(self.J, I1, bins=self.bins, mask=mask, gradient=gradient, fixed_limits=self.limits[0],
                              moving_limits=self.limits[1], eps=MI_EPS)
        if not gradient:
            return scale * float(out), None, None
        val, g = out
        return scale * float(val), (scale * g).astype(I1.dtype, copy=False), None


def _mask_and_scale(term, I1, X):
    """The voxels ``term`` counts — its fixed mask restricted (not differentiated) to where its moving weight,
    sampled through the map ``X``, exceeds 0.5, unless that leaves no voxel — and its factor vol / σ²."""
    from ...kernels.adjoint import sample_linear

    mask = term.mask
    if term.W is not None:
        mw = sample_linear(term.W, X, backend=term.backend) > 0.5
        mask = mw if mask is None else (mask & mw)
        if not mask.any():
            mask = term.mask
    n = I1.size if mask is None else int(np.count_nonzero(mask))
    return mask, n * term.cell / term.sigma2


def data_term(opts, target, fixed_mask, moving_mask, spacing, template=None):
    """The data term of ``opts["metric"]`` on one pyramid level: ``target`` the fixed image, the masks on its grid
    (the moving one already brought onto it, as a weight), ``spacing`` mm per array axis, ``template`` the moving
    image of the level (MI's histogram limits; default ``target``). The LNCC window is at least one voxel of the
    level."""
    from ...kernels._backend import get_array_module

    xp = get_array_module(target)  # the masks live with the images (on the device for backend "cuda")
    cell = float(np.prod(spacing))
    fm = None if fixed_mask is None else xp.asarray(fixed_mask)
    W = None if moving_mask is None else xp.asarray(moving_mask, dtype=opts["dtype"])
    if opts["metric"] == "ssd":
        return SSDTerm(target, opts["sigma2"], cell, fixed_weight=None if fm is None else fm.astype(opts["dtype"]),
                       moving_weight=W, backend=opts["backend"])
    if opts["metric"] == "mi":
        return MITerm(target, opts["sigma2"], cell, template=target if template is None else template,
                      fixed_mask=fm, moving_weight=W, backend=opts["backend"])
    return LNCCTerm(target, opts["sigma2"], cell, radius=max(opts["lncc_radius"], max(spacing)), spacing=spacing,
                    fixed_mask=fm, moving_weight=W, backend=opts["backend"])
