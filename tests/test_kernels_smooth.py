"""kernels.smooth: Gaussian FIR (reference = scipy.ndimage) and the Fourier operators of LDDMM."""
import numpy as np
import pytest
from conftest import backend_params
from scipy import ndimage

from classreg.kernels import smooth

TOL = {np.float32: 1e-5, np.float64: 1e-10}


def assert_parity(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(np.asarray(out, dtype=np.float64) - ref).max()) / scale
    assert err <= TOL[ref.dtype.type], err


CASES = [
    # shape, sigma, spacing, ndim
    ((5, 6, 7), (1.0, 0.0, 2.5), 1.0, None),
    ((7, 9), 0.7, (1.0, 2.0), None),
    ((6, 5, 4, 3), (1.5, 0.8, 3.0), (1.0, 0.5, 2.0), 3),  # channels-last field
    ((9,), 2.0, 1.0, None),
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["nearest", "reflect", "constant"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gaussian_parity(backend, dtype, mode, case, rng):
    shape, sigma, spacing, ndim = CASES[case]
    a = rng.standard_normal(shape).astype(dtype)
    a0 = a.copy()
    ref = smooth.gaussian(a, sigma, spacing=spacing, ndim=ndim, mode=mode, backend="numpy")
    out = smooth.gaussian(a, sigma, spacing=spacing, ndim=ndim, mode=mode, backend=backend)
    assert_parity(out, ref)
    np.testing.assert_array_equal(a, a0)  # input untouched


def test_reference_is_scipy(rng):
    a = rng.standard_normal((8, 10, 12)).astype(np.float32)
    out = smooth.gaussian(a, 2.0, spacing=(1.0, 2.0, 0.5), mode="reflect", truncate=3.0, backend="numpy")
    ref = ndimage.gaussian_filter(a, (2.0, 1.0, 4.0), mode="reflect", truncate=3.0)
    np.testing.assert_array_equal(out, ref)
    f = rng.standard_normal((8, 10, 3))
    out = smooth.gaussian(f, (1.0, 2.0), ndim=2, backend="numpy")
    np.testing.assert_array_equal(out, ndimage.gaussian_filter(f, (1.0, 2.0, 0.0), mode="nearest"))


def test_weights_match_scipy_rule():
    for s in (0.3, 1.0, 2.7):
        w = smooth.gaussian_weights(s, 4.0)
        assert w.size == 2 * int(4.0 * s + 0.5) + 1
        assert abs(w.sum() - 1.0) < 1e-15
        imp = np.zeros(41)
        imp[20] = 1.0
        r = w.size // 2
        np.testing.assert_allclose(ndimage.gaussian_filter1d(imp, s)[20 - r : 21 + r], w, atol=1e-16)


@pytest.mark.parametrize("mode", ["nearest", "reflect", "constant"])
def test_large_sigma_small_array(mode, rng):
    # radius far beyond the array: repeated reflections must follow scipy
    a = rng.standard_normal((4, 5))
    ref = smooth.gaussian(a, 6.0, mode=mode, backend="numpy")
    assert_parity(smooth.gaussian(a, 6.0, mode=mode, backend="numba"), ref)


def test_gaussian_dtypes_and_constant(rng):
    a = rng.integers(0, 10, (6, 7))
    out = smooth.gaussian(a, 1.0, backend="numba")
    assert out.dtype == np.float32
    c = np.full((6, 7, 5), 3.0)
    np.testing.assert_allclose(smooth.gaussian(c, 2.0, mode="nearest", backend="numba"), 3.0, rtol=1e-14)
    np.testing.assert_array_equal(smooth.gaussian(c, 0.0, backend="numba"), c)


def test_gaussian_thread_count_bitwise(rng):
    numba = pytest.importorskip("numba")
    a = rng.standard_normal((17, 19, 23)).astype(np.float32)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = smooth.gaussian(a, 1.5, backend="numba")
    finally:
        numba.set_num_threads(n)
    np.testing.assert_array_equal(one, smooth.gaussian(a, 1.5, backend="numba"))


def test_gaussian_errors(rng):
    a = rng.standard_normal((5, 6))
    with pytest.raises(ValueError, match="mode"):
        smooth.gaussian(a, 1.0, mode="wrap")
    with pytest.raises(ValueError, match="sigma"):
        smooth.gaussian(a, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        smooth.gaussian(a, (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="spacing"):
        smooth.gaussian(a, 1.0, spacing=0.0)
    with pytest.raises(ValueError, match="ndim"):
        smooth.gaussian(a, 1.0, ndim=3)
    with pytest.raises(TypeError, match="a must be"):
        smooth.gaussian(a.astype(complex), 1.0)
    with pytest.raises(ValueError, match="backend"):
        smooth.gaussian(a, 1.0, backend="torch")


# ---------------------------------------------------------------------------------------------------------------
# Fourier operators
# ---------------------------------------------------------------------------------------------------------------
def test_gaussian_operator_constant_preserved():
    op = smooth.gaussian_kernel_operator((12, 9, 7), (1.0, 1.5, 0.8), 2.0, pad=False)
    assert op.periodic
    assert abs(op.symbol[0, 0, 0] - 1.0) < 1e-15  # unit-sum normalisation
    np.testing.assert_allclose(op.apply(np.full((12, 9, 7), 3.0)), 3.0, rtol=1e-13)
    f = np.full((12, 9, 7, 3), -2.0, dtype=np.float32)
    out = op.apply(f)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, -2.0, rtol=1e-6)


@pytest.mark.parametrize("shape,spacing", [((20, 17, 9), (1.0, 1.5, 0.8)), ((15, 11), 1.0)])
def test_gaussian_operator_padded_equals_constant_mode(shape, spacing, rng):
    v = rng.standard_normal(shape)
    op = smooth.gaussian_kernel_operator(shape, spacing, 2.0)
    assert not op.periodic
    ref = smooth.gaussian(v, 2.0, spacing=spacing, mode="constant", backend="numpy")
    np.testing.assert_allclose(op.apply(v), ref, atol=1e-13)
    # channels-last fields are filtered per channel
    f = rng.standard_normal(shape + (2,))
    out = op.apply(f)
    for c in range(2):
        np.testing.assert_allclose(out[..., c], op.apply(f[..., c]), atol=1e-14)


def test_gaussian_operator_periodic_is_circular(rng):
    v = rng.standard_normal((16, 13))
    op = smooth.gaussian_kernel_operator(v.shape, 1.0, 1.2, pad=False)
    ref = ndimage.gaussian_filter(v, 1.2, mode="wrap")
    np.testing.assert_allclose(op.apply(v), ref, atol=1e-13)


def test_gaussian_operator_symbols_and_inverse():
    sampled = smooth.gaussian_kernel_operator((32, 30), (1.0, 0.7), 2.0, pad=False)
    cont = smooth.gaussian_kernel_operator((32, 30), (1.0, 0.7), 2.0, pad=False, symbol="continuous")
    np.testing.assert_allclose(sampled.symbol, cont.symbol, atol=1e-3)
    eps = sampled.params["eps"]
    assert np.abs(sampled.inverse_symbol).max() <= 1 / (2 * np.sqrt(eps)) * (1 + 1e-12)
    big = sampled.symbol > 0.1
    np.testing.assert_allclose(sampled.inverse_symbol[big], 1 / sampled.symbol[big], rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sobolev_periodic_inverse(dtype, rng):
    shape = (10, 9, 7)
    op = smooth.sobolev_operator(shape, (1.0, 1.5, 0.8), 2.0, 2, pad=False)
    v = rng.standard_normal(shape + (3,)).astype(dtype)
    back = op.apply_inverse(op.apply(v))
    assert back.dtype == dtype
    assert_parity(back, v)
    np.testing.assert_allclose(op.apply(np.full(shape, 1.5)), 1.5, rtol=1e-13)


def test_sobolev_symbol_is_discrete_laplacian(rng):
    # s = 1, periodic: apply_inverse is (Id - alpha * 5-point Laplacian) with wrap-around
    h = (0.8, 1.3)
    alpha = 0.7
    v = rng.standard_normal((11, 8))
    op = smooth.sobolev_operator(v.shape, h, alpha, 1, pad=False)
    lap = sum((np.roll(v, 1, j) - 2 * v + np.roll(v, -1, j)) / h[j] ** 2 for j in range(2))
    np.testing.assert_allclose(op.apply_inverse(v), v - alpha * lap, atol=1e-12)
    # padded: zero extension, exact once the pad >= s
    opp = smooth.sobolev_operator(v.shape, h, alpha, 1, pad=True)
    vp = np.pad(v, 1)
    lapp = sum(
        (np.roll(vp, 1, j) - 2 * vp + np.roll(vp, -1, j)) / h[j] ** 2 for j in range(2)
    )[1:-1, 1:-1]
    np.testing.assert_allclose(opp.apply_inverse(v), v - alpha * lapp, atol=1e-12)


def test_padded_operators_self_adjoint(rng):
    for op in (
        smooth.gaussian_kernel_operator((9, 8, 7), (1.0, 0.5, 2.0), 1.5),
        smooth.sobolev_operator((9, 8, 7), 1.0, 1.0, 2),
    ):
        x = rng.standard_normal(op.shape)
        y = rng.standard_normal(op.shape)
        assert abs(np.vdot(op.apply(x), y) - np.vdot(x, op.apply(y))) < 1e-12 * np.abs(x).sum()


def test_operator_errors(rng):
    op = smooth.gaussian_kernel_operator((6, 5), 1.0, 1.0)
    with pytest.raises(ValueError, match="v must have shape"):
        op.apply(np.zeros((5, 6)))
    with pytest.raises(ValueError, match="alpha"):
        smooth.sobolev_operator((6, 5), 1.0, -1.0, 2)
    with pytest.raises(ValueError, match="s must"):
        smooth.sobolev_operator((6, 5), 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="pad"):
        smooth.sobolev_operator((6, 5), 1.0, 1.0, 1, pad=(1, 2, 3))
    with pytest.raises(ValueError, match="symbol"):
        smooth.gaussian_kernel_operator((6, 5), 1.0, 1.0, symbol="exact")
