"""The RKHS kernel operator K of the LDDMM velocity space, ``v = −K⋆m``.

Two kernels, both with zero extension beyond the grid and symmetric (the discrete adjoint needs ``Kᵀ = K``):

* ``"gaussian"``: the unit-sum Gaussian of standard deviation ``kernel_sigma`` mm, truncated at 4σ
  (:class:`GaussianKernel`);
* ``"sobolev"``: ``(Id − αΔ_h)^{-s}`` with ``α`` in mm² and ``s`` = ``order``, by FFT on a zero-padded grid
  (:func:`classreg.kernels.smooth.sobolev_operator`).

The norm of the velocity space is ``‖v‖²_V = ⟨Lv, v⟩`` with ``L = K⁻¹``, every inner product a physical integral
(voxel sums times the voxel volume Π h).
"""
from __future__ import annotations

import numpy as np

__all__ = ["GaussianKernel", "kernel_operator", "small_grid"]


def kernel_operator(shape, spacing, *, kernel="gaussian", kernel_sigma=None, alpha=None, order=None, backend=None):
    """The RKHS operator K on a grid of ``shape`` with ``spacing`` (mm per array axis), zero extension.

    ``kernel="gaussian"``: unit-sum Gaussian of standard deviation ``kernel_sigma`` mm truncated at 4σ
    (:class:`GaussianKernel`); ``kernel="sobolev"``: ``(Id − αΔ_h)^{-s}`` with ``alpha`` in mm² and ``order`` = s
    (FFT, zero-padded). The returned object has ``shape`` and ``apply(v)`` for a scalar array or a channels-last
    field.
    """
    from ...kernels.smooth import sobolev_operator

    if kernel == "gaussian":
        return GaussianKernel(shape, spacing, kernel_sigma, backend=backend)
    return sobolev_operator(shape, spacing, alpha, order, pad=True)


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
