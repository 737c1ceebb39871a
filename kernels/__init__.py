"""Array-in/array-out compute kernels of classreg (installed as ``classreg.kernels``).

Nothing here knows about images, transforms or solvers: arrays in numpy axis order, spacing as plain numbers.
Every kernel has a numpy reference implementation (the test oracle), a numba CPU path and a numba.cuda GPU path,
chosen by :func:`classreg.kernels._backend.resolve_backend` from the array type (``backend=`` overrides).
"""
from ._backend import BACKENDS, HAVE_NUMBA, get_array_module, resolve_backend

__all__ = ["BACKENDS", "HAVE_NUMBA", "get_array_module", "resolve_backend"]
from .warp import interpolate, warp  # noqa: E402
from .fields import compose, expmap, invert  # noqa: E402

__all__ += ["warp", "interpolate", "compose", "expmap", "invert"]
from .smooth import FourierOperator, gaussian, gaussian_kernel_operator, sobolev_operator  # noqa: E402
from .fft import CachedCorrelator, correlation_shifts, cross_correlate  # noqa: E402
from .diff import (  # noqa: E402
    curl,
    divergence,
    gradient,
    jacobian_determinant,
    jacobian_matrix,
    lie_bracket,
    poisson_dirichlet,
)

__all__ += ["FourierOperator", "gaussian", "gaussian_kernel_operator", "sobolev_operator"]
__all__ += ["CachedCorrelator", "correlation_shifts", "cross_correlate"]
__all__ += ["curl", "divergence", "gradient", "jacobian_determinant", "jacobian_matrix", "lie_bracket"]
__all__ += ["poisson_dirichlet"]
from .lncc import lncc_force, lncc_gradient  # noqa: E402

__all__ += ["lncc_force", "lncc_gradient"]
