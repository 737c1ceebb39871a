"""kernels.epdiff: the map tracing of band-limited shooting and its fused reverse sweep against the numpy
reference, and the reverse sweep against central differences."""
from __future__ import annotations

import numpy as np
import pytest
from classreg.kernels import HAVE_NUMBA
from classreg.kernels import epdiff as E

needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
SHAPES = [(2, (30, 31)), (3, (9, 10, 11))]


def _tracing(d, n, dtype, seed=0):
    """Velocities on a grid 3 larger than ``n`` (index units, up to ~1.5 voxels) and points inside and just outside
    it (the clamped border is part of the interpolant)."""
    rng = np.random.default_rng(seed)
    M = tuple(x + 3 for x in n)
    w = (0.5 * rng.normal(size=(4, *M, d))).astype(dtype)
    pts = (rng.uniform(-1.05, 1.05, size=(7, 9, d)) * (np.array(M) - 1) / 2 + (np.array(M) - 1) / 2).astype(dtype)
    return w, pts


# float32: the numba kernel interpolates in float64 and rounds on store, the reference rounds every product
TOL = {np.float32: 1e-5, np.float64: 1e-12}


@needs_numba
@pytest.mark.parametrize("d,n", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tracing_and_its_reverse_sweep_match_the_reference(d, n, dtype):
    w, pts = _tracing(d, n, dtype)
    Z_ref, zs_ref = E.trace_back(w, pts, 0.25, positions=True, backend="numpy")
    Z, zs = E.trace_back(w, pts, 0.25, positions=True, backend="numba")
    assert Z.shape == pts.shape and zs.shape == (4, *pts.shape) and Z.dtype == dtype
    assert np.abs(Z - Z_ref).max() <= TOL[dtype] * 10  # index units, grids of ~10-30 samples
    assert np.abs(zs - zs_ref).max() <= TOL[dtype] * 10
    assert np.array_equal(E.trace_back(w, pts, 0.25, backend="numba"), Z)
    zbar = np.random.default_rng(2).normal(size=pts.shape).astype(dtype)
    wb_ref = E.trace_back_adjoint(w, zs_ref, zbar, 0.25, backend="numpy")
    wb = E.trace_back_adjoint(w, zs_ref, zbar, 0.25, backend="numba")
    assert wb.shape == w.shape
    assert np.abs(wb - wb_ref).max() <= TOL[dtype] * float(np.abs(wb_ref).max())


@pytest.mark.parametrize("d,n", SHAPES)
@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=needs_numba)])
def test_trace_back_adjoint_is_the_derivative_of_the_tracing(d, n, backend):
    """<∂Z/∂w · δ, zbar> = <δ, trace_back_adjoint(zbar)> against central differences (float64, ε = 1e-6; the
    interpolant is piecewise linear, so ε small enough that no point crosses a cell boundary)."""
    w, pts = _tracing(d, n, np.float64)
    pts = np.clip(pts, 0.2, np.array(w.shape[1:-1]) - 1.2)  # off the clamped border, where Z is not differentiable
    rng = np.random.default_rng(5)
    zbar = rng.normal(size=pts.shape)
    _, zs = E.trace_back(w, pts, 0.25, positions=True, backend=backend)
    wb = E.trace_back_adjoint(w, zs, zbar, 0.25, backend=backend)
    for _ in range(2):
        dw = rng.normal(size=w.shape)
        fd = float(np.sum((E.trace_back(w + 1e-6 * dw, pts, 0.25, backend=backend)
                           - E.trace_back(w - 1e-6 * dw, pts, 0.25, backend=backend)) * zbar)) / 2e-6
        assert abs(fd - float(np.sum(wb * dw))) <= 1e-6 * max(1.0, abs(fd))
