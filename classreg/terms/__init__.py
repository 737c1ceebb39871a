"""Data terms: the image similarity a solver minimises, behind one small interface.

A term compares the fixed image ``F`` with the moving image already brought onto the fixed grid (``W = M∘φ``) on
one pyramid level and offers

* :meth:`DataTerm.value` — the cost (lower is better) over the mask;
* :meth:`DataTerm.gradient` — the cost and ``∂cost/∂W(x)``, one number per voxel: what a variational solver
  (LDDMM, metamorphosis) feeds its adjoint, and what times ``∇W`` gives a force;
* :meth:`DataTerm.force` — a displacement update on the level (array frame, mm), the step a demons iteration adds:
  by default the normalised descent direction ``−∂cost/∂W · ∇W`` scaled so that its longest vector is
  ``max_step``; SSD overrides it with the ESM demons force (Vercauteren et al. 2008, eq. 8) and LNCC with the fused
  kernel :func:`classreg.kernels.lncc.lncc_force`.

Every term takes the same masks: ``mask`` (voxels of the fixed image that count) and, for the force,
``moving_valid`` (voxels whose warped moving sample lies inside the moving mask). The functional forms
(``ssd``, ``ncc``, ``lncc``, ``mattes_mi``, ``ngf``; :mod:`classreg.terms.measures`) are exact derivatives checked
against finite differences.

:func:`get` maps ``"ssd"``, ``"ncc"``, ``"lncc"``, ``"mi"``, ``"ngf"`` to a term instance.
"""
from __future__ import annotations

import numpy as np

from . import measures
from .measures import (
    LNCC_EPS,
    LNCC_RADIUS,
    intensity_limits,
    lncc,
    mattes_mi,
    ncc,
    ngf,
    ssd,
)

__all__ = [
    "LNCC",
    "NCC",
    "NGF",
    "SSD",
    "TERMS",
    "DataTerm",
    "MattesMI",
    "get",
    "intensity_limits",
    "lncc",
    "mattes_mi",
    "measures",
    "ncc",
    "ngf",
    "ssd",
]


class DataTerm:
    """Base class: a cost ``E(F, W)`` over a mask, its per-voxel derivative and a demons-style force.

    Subclasses set :attr:`name` and :attr:`_measure` (a function of :mod:`classreg.terms.measures`) and may
    override :meth:`force`. Parameters of the measure (a window radius, a bin count) are given to the constructor.
    """

    name = ""
    _measure = None

    def __init__(self, **params):
        self.params = params

    def value(self, fixed, warped, *, mask=None, spacing=1.0) -> float:
        """The cost over ``mask`` (all voxels if None); ``spacing`` in mm per array axis."""
        return type(self)._measure(fixed, warped, mask=mask, spacing=spacing, **self.params)

    def gradient(self, fixed, warped, *, mask=None, spacing=1.0):
        """``(cost, ∂cost/∂W)``: the derivative has ``warped``'s shape and is 0 outside ``mask``."""
        return type(self)._measure(fixed, warped, mask=mask, spacing=spacing, gradient=True, **self.params)

    def force(self, fixed, warped, grad_fixed, grad_warped, disp, *, spacing, max_step, mask=None,
              moving_valid=None, backend=None):
        """Update ``u`` (array frame, mm) moving ``warped`` towards ``fixed``: ``(u, cost, largest |u|)``.

        ``grad_fixed``/``grad_warped`` are the images' gradients (physical units, array frame); ``disp`` is the
        displacement through which ``warped`` was sampled (array frame, mm; only the validity test reads it).
        The default is :meth:`descent` scaled so that its longest vector is ``max_step``.
        """
        u, cost = self.descent(fixed, warped, grad_warped, spacing=spacing, mask=mask, moving_valid=moving_valid)
        norm = float(np.sqrt(np.max(np.sum(u * u, axis=-1)))) if u.size else 0.0
        if norm > 0:
            u *= max_step / norm
        return u, cost, max_step if norm > 0 else 0.0

    def descent(self, fixed, warped, grad_warped, *, spacing, mask=None, moving_valid=None):
        """The unscaled steepest-descent direction ``(−∂cost/∂W · ∇W, cost)`` over ``mask & moving_valid``
        (array frame, units of the cost per mm; zero outside): the first variation of the cost under
        ``W = M∘(id + disp)`` is ``Σ ∂cost/∂W · ∇W · δdisp``, so this field is its negative gradient per voxel.
        A solver scales it (:meth:`force` by its largest vector; ``register_demons(metric="mi")`` after smoothing).
        """
        cost, d = self.gradient(fixed, warped, mask=_counted(mask, moving_valid), spacing=spacing)
        u = -np.asarray(d)[..., None] * grad_warped
        return u.astype(np.asarray(warped).dtype, copy=False), float(cost)


class SSD(DataTerm):
    """Mean squared difference ``(1/N) Σ (W − F)² / 2``; its force is the ESM demons force (eq. 8 of
    T. Vercauteren et al., "Symmetric log-domain diffeomorphic registration: a demons-based approach", MICCAI 2008),
    whose returned cost is the mean squared difference ``(1/N) Σ (W − F)²`` over the valid voxels."""

    name = "ssd"
    _measure = staticmethod(ssd)

    def force(self, fixed, warped, grad_fixed, grad_warped, disp, *, spacing, max_step, mask=None,
              moving_valid=None, backend=None):
        from ..kernels.demons import esm_force

        u, ssd_sum, count, step = esm_force(fixed, warped, grad_fixed, grad_warped, disp, spacing=spacing,
                                            max_step=max_step, mask=mask, moving_valid=moving_valid,
                                            backend=backend)
        return u, ssd_sum / max(count, 1), step


class NCC(DataTerm):
    """Negative (global) normalised cross-correlation."""

    name = "ncc"
    _measure = staticmethod(ncc)


class LNCC(DataTerm):
    """Negative mean squared local normalised cross-correlation in a box of ``radius`` mm (ANTs "CC"; Avants et
    al., Med. Image Anal. 12(1):26-41, 2008). Its force is the fused kernel
    :func:`classreg.kernels.lncc.lncc_force` (valid voxels: inside the moving grid after ``disp``, ``mask``,
    ``moving_valid``), scaled so that its longest vector is ``max_step``."""

    name = "lncc"
    _measure = staticmethod(lncc)

    def __init__(self, *, radius: float = LNCC_RADIUS, eps: float = LNCC_EPS):
        super().__init__(radius=radius, eps=eps)

    def force(self, fixed, warped, grad_fixed, grad_warped, disp, *, spacing, max_step, mask=None,
              moving_valid=None, backend=None):
        from ..kernels.lncc import lncc_force, window_radius

        radius = window_radius(self.params["radius"], spacing, np.ndim(fixed))
        u, value, _, norm = lncc_force(fixed, warped, grad_warped, disp, radius=radius, spacing=spacing, mask=mask,
                                       moving_valid=moving_valid, eps=self.params["eps"], backend=backend)
        if norm > 0:
            u *= max_step / norm
        return u.astype(fixed.dtype, copy=False), float(value), min(norm, max_step) if norm else 0.0


class MattesMI(DataTerm):
    """Negative Mattes mutual information (elastix's ``AdvancedMattesMutualInformation``).

    :meth:`value` and :meth:`descent` also take CuPy arrays (``register_demons(metric="mi", device="cuda")``): then
    :func:`classreg.kernels.mattes_cuda.dense_mattes_mi` computes the same cost and direction on the device (the
    numba.cuda kernels compile the per-sample formula of the CPU's fused kernel), for the measure's default limits
    (from the counted voxels), any ``bins``, ``limit_range_ratio`` and ``eps`` (the smoothed MI); given limits are
    refused there.
    """

    name = "mi"
    _measure = staticmethod(mattes_mi)

    def value(self, fixed, warped, *, mask=None, spacing=1.0) -> float:
        if not _on_device(fixed, warped):
            return super().value(fixed, warped, mask=mask, spacing=spacing)
        return self._device(fixed, warped, mask)

    def descent(self, fixed, warped, grad_warped, *, spacing, mask=None, moving_valid=None):
        if _on_device(fixed, warped):
            cost, u = self._device(fixed, warped, _counted(mask, moving_valid), grad_warped)
            return u, cost
        if measures._use_fused(None) and set(self.params) <= {"bins", "limit_range_ratio"}:
            # the default limits, elastix's MI: one parallel numba kernel (kernels.sampling.dense_mi_descent)
            from ..kernels.sampling import dense_mi_descent

            measures._check_spacing(spacing, np.ndim(fixed))
            ratio = self.params.get("limit_range_ratio", measures.LIMIT_RANGE_RATIO)
            cost, u = dense_mi_descent(measures._as_image(fixed, "fixed"), measures._as_image(warped, "warped"),
                                       grad_warped, mask=_counted(mask, moving_valid),
                                       bins=measures._bins(self.params.get("bins", 32)), limit_range_ratio=ratio,
                                       tiny=measures._PDF_TINY)
            return u, cost
        return super().descent(fixed, warped, grad_warped, spacing=spacing, mask=mask, moving_valid=moving_valid)

    def _device(self, fixed, warped, mask, grad_warped=None):
        from ..kernels.mattes_cuda import dense_mattes_mi

        other = sorted(set(self.params) - {"bins", "limit_range_ratio", "eps"})
        if other:
            raise ValueError(f"MattesMI on the GPU takes bins, limit_range_ratio and eps only, not "
                             f"{', '.join(other)}; use host (numpy) arrays for the others")
        ratio = self.params.get("limit_range_ratio", measures.LIMIT_RANGE_RATIO)
        eps = self.params.get("eps", 0.0)
        if not (np.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        return dense_mattes_mi(fixed, warped, bins=measures._bins(self.params.get("bins", 32)),
                               limit_range_ratio=float(ratio), tiny=measures._PDF_TINY, eps=float(eps), mask=mask,
                               grad_warped=grad_warped)


class NGF(DataTerm):
    """Normalised gradient fields ``(1/N) Σ 1 − ⟨n_F, n_W⟩²`` (Haber & Modersitzki, MICCAI 2006)."""

    name = "ngf"
    _measure = staticmethod(ngf)


def _counted(mask, moving_valid):
    """The voxels a term counts: the fixed ``mask`` and ``moving_valid`` (either may be None: all voxels)."""
    return mask if moving_valid is None else (moving_valid if mask is None else mask & moving_valid)


def _on_device(*arrays) -> bool:
    from ..kernels._backend import is_cupy_array

    return any(is_cupy_array(a) for a in arrays)


#: name -> term class
TERMS = {cls.name: cls for cls in (SSD, NCC, LNCC, MattesMI, NGF)}


def get(name, **params) -> DataTerm:
    """A data term by name (``"ssd"``, ``"ncc"``, ``"lncc"``, ``"mi"``, ``"ngf"``; case and blanks ignored) with
    the measure's parameters; a :class:`DataTerm` instance is returned unchanged."""
    if isinstance(name, DataTerm):
        return name
    key = name.strip().lower() if isinstance(name, str) else name
    try:
        cls = TERMS[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown data term {name!r}; valid names are {', '.join(TERMS)}") from None
    return cls(**params)
