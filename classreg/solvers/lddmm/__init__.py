"""register_lddmm: image LDDMM by geodesic shooting of the initial momentum (:mod:`.register`), on the RKHS kernel
operator (:mod:`.operators`), the σ²-scaled data terms (:mod:`.objective`), the shooting integrator with its exact
adjoint (:mod:`.shooting`) and one pyramid level of L-BFGS with adaptive time steps (:mod:`.step`); its options
declared once (:mod:`.options`).

:class:`GeodesicShooting` (with its intensity-source hook), :func:`kernel_operator` and the data terms are exported
for the metamorphosis solver and the tests.
"""
from .objective import LNCCTerm, SSDTerm
from .operators import GaussianKernel, MultiGaussianKernel, kernel_operator
from .options import OPTIONS
from .register import register_lddmm
from .shooting import GeodesicShooting

__all__ = ["OPTIONS", "GaussianKernel", "GeodesicShooting", "LNCCTerm", "MultiGaussianKernel", "SSDTerm",
           "kernel_operator", "register_lddmm"]
