"""The RKHS kernel operator K of the LDDMM velocity space, ``v = −K⋆m``.

Two kernels, both with zero extension beyond the grid and symmetric (the discrete adjoint needs ``Kᵀ = K``):

* ``"gaussian"``: the unit-sum Gaussian of standard deviation ``kernel_sigma`` mm, truncated at 4σ
  (:class:`GaussianKernel`), or, for a sequence of σ, the equally weighted sum of such Gaussians
  (:class:`MultiGaussianKernel`, Risser et al. 2011; the full-grid engine only);
* ``"sobolev"``: ``(Id − αΔ_h)^{-s}`` with ``α`` in mm² and ``s`` = ``order``, by FFT on a zero-padded grid
  (:func:`classreg.kernels.smooth.sobolev_operator`).

The norm of the velocity space is ``‖v‖²_V = ⟨Lv, v⟩`` with ``L = K⁻¹``, every inner product a physical integral
(voxel sums times the voxel volume Π h).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["GaussianKernel", "MultiGaussianKernel", "check_kernel_sigma", "kernel_operator", "small_grid"]


def kernel_operator(shape, spacing, *, kernel="gaussian", kernel_sigma=None, alpha=None, order=None, backend=None):
    """The RKHS operator K on a grid of ``shape`` with ``spacing`` (mm per array axis), zero extension.

    ``kernel="gaussian"``: unit-sum Gaussian of standard deviation ``kernel_sigma`` mm truncated at 4σ
    (:class:`GaussianKernel`), or for a tuple of σ (see :func:`check_kernel_sigma`) their equally weighted sum
    (:class:`MultiGaussianKernel`); ``kernel="sobolev"``: ``(Id − αΔ_h)^{-s}`` with ``alpha`` in mm² and ``order`` = s
    (FFT, zero-padded). The returned object has ``shape`` and ``apply(v)`` for a scalar array or a channels-last
    field.
    """
    from ...kernels.smooth import sobolev_operator

    if kernel == "gaussian":
        kernel_sigma = check_kernel_sigma(kernel_sigma)
        if isinstance(kernel_sigma, tuple):
            return MultiGaussianKernel(shape, spacing, kernel_sigma, backend=backend)
        return GaussianKernel(shape, spacing, kernel_sigma, backend=backend)
    return sobolev_operator(shape, spacing, alpha, order, pad=True)


def check_kernel_sigma(kernel_sigma):
    """The Gaussian kernel's σ (mm) as given: a positive finite number, or a sequence of them.

    Returns a float for a number or a one-element sequence (the single Gaussian, bit-identical either way) and a
    tuple of floats for two or more σ (the multi-scale kernel :class:`MultiGaussianKernel`). Raises ``TypeError``
    for a non-number and ``ValueError`` for an empty sequence or a σ that is not positive and finite.
    """
    if isinstance(kernel_sigma, (str, bytes)) or not np.iterable(kernel_sigma):
        values = [kernel_sigma]
    else:
        values = list(np.ravel(np.asarray(kernel_sigma, dtype=object)))
        if not values:
            raise ValueError("kernel_sigma must be a positive number (mm) or a non-empty sequence of them, got "
                             f"{kernel_sigma!r}")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise TypeError(f"kernel_sigma must be a positive number (mm) or a sequence of them, got {kernel_sigma!r}")
        if not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"kernel_sigma must be positive and finite (mm), got {kernel_sigma!r}")
        out.append(float(v))
    return out[0] if len(out) == 1 else tuple(out)


def small_grid(shape) -> bool:
    """Whether a grid is below ``kernels.adjoint.PARALLEL_MIN`` voxels: there the stencils and K run single-threaded
    (numpy, one FFT worker), because the cost of a parallel region (thread wake-up and barrier) exceeds the work."""
    from ...kernels.adjoint import PARALLEL_MIN

    return int(np.prod(shape)) < PARALLEL_MIN


class GaussianKernel:
    """K⋆v: unit-sum Gaussian of ``sigma`` mm truncated at 4σ, zero extension (a symmetric matrix).

    With numba, the separable FIR of :func:`classreg.kernels.smooth.gaussian` (``mode="constant"``); with numpy or
    on small grids (:func:`small_grid`), the equal FFT operator of
    :func:`classreg.kernels.smooth.gaussian_kernel_operator` (``pad=True``, sampled symbol; the two agree to ~1e-6
    relative in float32). For the σ of a few voxels LDDMM uses the FIR is the faster of the two.
    """

    def __init__(self, shape, spacing, sigma, *, backend=None):
        from ...kernels import _backend
        from ...kernels.smooth import gaussian_kernel_operator

        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(x) for x in spacing)
        self.sigma = float(sigma)
        self.fourier = gaussian_kernel_operator(self.shape, self.spacing, self.sigma, pad=True)
        self.backend = _backend.resolve_backend(backend)
        self.small = small_grid(self.shape)

    def apply(self, v):
        """K⋆v for a scalar ``shape`` array or a channels-last ``shape + (C,)`` field."""
        from ...kernels.smooth import gaussian

        if self.backend == "cuda" or (self.backend == "numba" and not self.small):
            # on the GPU the FIR too: its taps (a few dozen numbers, once per σ) are the only upload, where the FFT
            # operator would upload its grid-sized symbol on every new level
            return gaussian(v, self.sigma, spacing=self.spacing, ndim=len(self.shape), mode="constant",
                            backend=self.backend)
        return self.fourier.apply(v, workers=1 if self.small else None)


class MultiGaussianKernel:
    """K⋆v = (1/n) Σᵢ G_σᵢ⋆v: the equally weighted sum of n unit-sum Gaussians (:class:`GaussianKernel` each).

    The multi-scale kernel of L. Risser, F.-X. Vialard, R. Wolz, M. Murgasova, D. D. Holm and D. Rueckert,
    "Simultaneous multi-scale registration using large deformation diffeomorphic metric mapping", IEEE TMI 30(10),
    1746-1759, 2011 (K = Σᵢ cᵢ K_σᵢ), with the weights cᵢ = 1/n of the multi-scale Gaussian RKHS of François et
    al.'s weighted metamorphosis code (Demeter, ``Multi_scale_GaussianRKHS``): a sum of unit-sum Gaussians, so K
    keeps unit sum, and a sum of symmetric operators, so ``Kᵀ = K`` as the adjoint needs. Small σ let the flow match
    fine detail, large σ move whole structures. Costs n Gaussian blurs per application.
    """

    def __init__(self, shape, spacing, sigmas, *, backend=None):
        self.parts = [GaussianKernel(shape, spacing, s, backend=backend) for s in sigmas]
        self.shape, self.spacing = self.parts[0].shape, self.parts[0].spacing
        self.sigmas = tuple(p.sigma for p in self.parts)

    def apply(self, v):
        """K⋆v for a scalar ``shape`` array or a channels-last ``shape + (C,)`` field."""
        out = self.parts[0].apply(v)
        for p in self.parts[1:]:
            out = out + p.apply(v)
        return out * (1.0 / len(self.parts))
