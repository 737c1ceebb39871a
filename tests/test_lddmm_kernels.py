"""kernels.epdiff: the fused per-step work of band-limited shooting against its numpy reference, and the reverse
sweep of the map tracing against central differences."""
from __future__ import annotations

import numpy as np
import pytest
from classreg.kernels import HAVE_NUMBA
from classreg.kernels import epdiff as E

needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
SHAPES = [(2, (30, 31)), (3, (9, 10, 11))]


def _fields(d, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    v, m = rng.normal(size=(2, d, *n)).astype(dtype)
    Dv, Dm = rng.normal(size=(2, d, d, *n)).astype(dtype)
    return v, m, Dv, Dm


def _tracing(d, n, dtype, seed=0):
    """Velocities on a grid 3 larger than ``n`` (index units, up to ~1.5 voxels) and points inside and just outside
    it (the clamped border is part of the interpolant)."""
    rng = np.random.default_rng(seed)
    M = tuple(x + 3 for x in n)
    w = (0.5 * rng.normal(size=(4, *M, d))).astype(dtype)
    pts = (rng.uniform(-1.05, 1.05, size=(7, 9, d)) * (np.array(M) - 1) / 2 + (np.array(M) - 1) / 2).astype(dtype)
    return w, pts


# float32: the numba kernels interpolate in float64 and round on store, the reference rounds every product
TOL = {np.float32: 1e-5, np.float64: 1e-12}


@needs_numba
@pytest.mark.parametrize("d,n", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ad_star_and_its_transpose_match_the_reference(d, n, dtype):
    v, m, Dv, Dm = _fields(d, n, dtype)
    B_ref, sq_ref = E.ad_star(v, m, Dv, Dm, backend="numpy")
    B, sq = E.ad_star(v, m, Dv, Dm, backend="numba")
    assert B.dtype == dtype and B.shape == v.shape
    scale = float(np.abs(B_ref).max())
    assert np.abs(B - B_ref).max() <= TOL[dtype] * scale
    assert abs(sq - sq_ref) <= TOL[dtype] * sq_ref
    # the transposes with respect to m and v, with the derivative of μ given: μ = v, Dμ = Dv here
    AB_ref = E.ad_star_transpose(v, Dv, m, v, Dm, Dv, backend="numpy")
    out = np.zeros((3 * d, *n), dtype=dtype)
    AB = E.ad_star_transpose(v, Dv, m, v, Dm, Dv, out=out, backend="numba")
    assert AB.shape == (2 * d, *n) and np.shares_memory(AB, out)
    assert np.abs(AB - AB_ref).max() <= TOL[dtype] * float(np.abs(AB_ref).max())


def test_ad_star_transpose_is_the_transpose_of_the_products():
    """B(v, m) is bilinear: <B(v, m), μ> = <v, A> (A: the transpose with respect to v) = <m, B'> (B': with respect
    to m). With spectral derivatives the product rule that moves ∂ onto μ is exact for periodic fields whose
    products stay below the Nyquist frequency (here |k| ≤ 3 each, ≤ 9 for the triple products, on 24×22), so the
    identities hold to rounding (float64)."""
    d, n = 2, (24, 22)
    rng = np.random.default_rng(3)
    k = [np.fft.fftfreq(s) * s for s in n]

    def smooth():  # a periodic field with frequencies |k| ≤ 3 and its exact spectral Jacobian
        F = np.zeros((d, *n), complex)
        F[:, :4, :4] = rng.normal(size=(d, 4, 4)) + 1j * rng.normal(size=(d, 4, 4))
        f = np.real(np.fft.ifft2(F)) * np.prod(n)  # amplitudes O(1)
        Fh = np.fft.fft2(f)
        D = np.stack([np.real(np.fft.ifft2(2j * np.pi * g / s * Fh)) for g, s in
                      zip(np.meshgrid(*k, indexing="ij"), n)])
        return f, D

    v, Dv = smooth()
    m, Dm = smooth()
    mu, Dmu = smooth()
    B, _ = E.ad_star(v, m, Dv, Dm, backend="numpy")
    A_B = E.ad_star_transpose(mu, Dmu, v, m, Dv, Dm, backend="numpy")
    lhs = float(np.sum(B * mu))
    assert abs(lhs) > 1e-3
    assert abs(lhs - float(np.sum(A_B[:d] * v))) <= 1e-10 * abs(lhs)
    assert abs(lhs - float(np.sum(A_B[d:] * m))) <= 1e-10 * abs(lhs)


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
