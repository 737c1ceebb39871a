"""kernels.fft: FFT cross-correlation (as in the Cross-Sim-NGF rigid search) vs brute-force sums over shifts."""
import itertools

import numpy as np
import pytest
from conftest import backend_params

from classreg.kernels import fft as kfft


def brute(a_list, b_list, mode, out_shape=None):
    """Σ_k Σ_x a_k(x + χ) b_k(x) by explicit loops over shifts (zero outside a; periodic for 'circular')."""
    sa, sb = a_list[0].shape, b_list[0].shape
    shifts = kfft.correlation_shifts(sa, sb, mode=mode, out_shape=out_shape)
    out = np.zeros([len(s) for s in shifts])
    for idx in itertools.product(*[range(len(s)) for s in shifts]):
        chi = np.array([shifts[j][i] for j, i in enumerate(idx)])
        tot = 0.0
        for a, b in zip(a_list, b_list):
            if mode == "circular":
                ap = np.zeros(out_shape)
                ap[tuple(slice(0, n) for n in sa)] = a
                bp = np.zeros(out_shape)
                bp[tuple(slice(0, n) for n in sb)] = b
                tot += np.sum(np.roll(ap, tuple(-chi), axis=tuple(range(len(sa)))) * bp)
                continue
            for x in itertools.product(*[range(n) for n in sb]):
                y = tuple(np.array(x) + chi)
                if all(0 <= yy < n for yy, n in zip(y, sa)):
                    tot += a[y] * b[x]
        out[idx] = tot
    return out


SHAPES = [((7, 5), (3, 4)), ((5, 6, 7), (3, 3, 5)), ((9,), (4,)), ((6, 5), (6, 5))]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["full", "valid"])
@pytest.mark.parametrize("shapes", SHAPES)
def test_correlation_vs_brute_force(backend, mode, shapes, rng):
    sa, sb = shapes
    a = [rng.standard_normal(sa) for _ in range(3)]
    b = [rng.standard_normal(sb) for _ in range(3)]
    a0 = [x.copy() for x in a]
    out = kfft.cross_correlate(a, b, mode=mode, backend=backend)
    ref = brute(a, b, mode)
    assert out.shape == ref.shape and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, atol=1e-10 * np.abs(ref).max())
    for x, y in zip(a, a0):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("backend", backend_params())
def test_circular(backend, rng):
    a = [rng.standard_normal((5, 4)), rng.standard_normal((5, 4))]
    b = [rng.standard_normal((3, 4)), rng.standard_normal((3, 4))]
    out = kfft.cross_correlate(a, b, mode="circular", out_shape=(7, 5), backend=backend)
    np.testing.assert_allclose(out, brute(a, b, "circular", (7, 5)), atol=1e-12)


def test_float32_single_channel(rng):
    a = rng.standard_normal((9, 7, 5)).astype(np.float32)
    b = rng.standard_normal((4, 3, 5)).astype(np.float32)
    out = kfft.cross_correlate(a, b)
    assert out.dtype == np.float32
    ref = brute([a.astype(float)], [b.astype(float)], "full")
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


def test_matches_scipy_signal_full(rng):
    signal = pytest.importorskip("scipy.signal")
    a = rng.standard_normal((11, 13))
    b = rng.standard_normal((5, 8))
    np.testing.assert_allclose(kfft.cross_correlate(a, b), signal.correlate(a, b, "full", method="direct"), atol=1e-11)
    np.testing.assert_allclose(
        kfft.cross_correlate(a, b, mode="valid"), signal.correlate(a, b, "valid", method="direct"), atol=1e-11
    )


def test_shift_recovery():
    # b is a crop of a at offset (3, 2): the "valid" peak sits at χ = (3, 2), the "full" peak at index χ + n_b - 1
    rng = np.random.default_rng(7)
    a = rng.standard_normal((15, 13))
    b = a[3:10, 2:11].copy()
    c = kfft.cross_correlate(a, b, mode="valid")
    assert np.unravel_index(np.argmax(c), c.shape) == (3, 2)
    f = kfft.cross_correlate(a, b, mode="full")
    sh = kfft.correlation_shifts(a.shape, b.shape)
    i, j = np.unravel_index(np.argmax(f), f.shape)
    assert (sh[0][i], sh[1][j]) == (3, 2)


def test_cached_correlator_reuse(rng):
    a = [rng.standard_normal((9, 8, 7)) for _ in range(2)]
    corr = kfft.CachedCorrelator(a, (4, 5, 3), mode="valid")
    assert corr.shape == (6, 4, 5)
    assert all(n >= m for n, m in zip(corr.fft_shape, (9, 8, 7)))
    for _ in range(3):
        b = [rng.standard_normal((4, 5, 3)) for _ in range(2)]
        np.testing.assert_allclose(corr(b), kfft.cross_correlate(a, b, mode="valid"), atol=1e-12)
    np.testing.assert_array_equal(corr.shifts[0], np.arange(6))


def test_shifts_helper():
    s = kfft.correlation_shifts((5, 4), (3, 2))
    np.testing.assert_array_equal(s[0], np.arange(-2, 5))
    np.testing.assert_array_equal(s[1], np.arange(-1, 4))
    s = kfft.correlation_shifts((5, 4), (3, 2), mode="circular", out_shape=(6, 6))
    np.testing.assert_array_equal(s[1], np.arange(6))


def test_fft_errors(rng):
    a = rng.standard_normal((5, 4))
    with pytest.raises(ValueError, match="channels"):
        kfft.cross_correlate([a, a], [a])
    with pytest.raises(ValueError, match="valid"):
        kfft.cross_correlate(a[:3], a, mode="valid")
    with pytest.raises(ValueError, match="out_shape"):
        kfft.cross_correlate(a, a, out_shape=(8, 8))
    with pytest.raises(ValueError, match="mode"):
        kfft.cross_correlate(a, a, mode="same")
    with pytest.raises(ValueError, match="same number of dimensions"):
        kfft.cross_correlate(a, a[0])
    with pytest.raises(ValueError, match=r"b\[0\] must have shape"):
        kfft.CachedCorrelator(a, (3, 3)).correlate([a])
    with pytest.raises(TypeError, match="a must be"):
        kfft.cross_correlate("abc", a)
