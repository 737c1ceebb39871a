"""Tests of classreg.kernels.fields (compose, expmap, invert)."""
import numpy as np
import pytest
from conftest import backend_params
from scipy import ndimage as ndi

from classreg.kernels import _backend
from classreg.kernels.fields import compose, expmap, invert


def _smooth_field(rng, shape, amp, sigma=4.0):
    ndim = len(shape)
    f = np.stack([ndi.gaussian_filter(rng.normal(size=shape), sigma, mode="nearest") for _ in range(ndim)], axis=-1)
    return f * (amp / np.abs(f).max())


def _shape(backend, ndim):
    if backend == "cuda":
        return (5, 6, 7) if ndim == 3 else (6, 7)
    return (12, 13, 14) if ndim == 3 else (24, 26)


def _brute_compose(u, v, h):
    """w(x) = v(x) + u(x + v(x)) by scipy map_coordinates (linear, nearest = border), per component."""
    ndim = u.shape[-1]
    coords = np.indices(u.shape[:-1], dtype=np.float64) + np.moveaxis(v / h, -1, 0)
    return v + np.stack(
        [ndi.map_coordinates(u[..., k], coords, order=1, mode="nearest") for k in range(ndim)], axis=-1
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compose_brute_force_and_parity(backend, ndim, dtype):
    rng = np.random.default_rng(ndim)
    shape = _shape(backend, ndim)
    h = np.array([0.8, 1.3, 1.1][:ndim])
    u = (rng.normal(size=shape + (ndim,)) * 1.5).astype(dtype)
    v = (rng.normal(size=shape + (ndim,)) * 1.5).astype(dtype)
    w = compose(u, v, spacing=h, backend=backend)
    assert w.dtype == dtype and w.shape == u.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(w, _brute_compose(u.astype(np.float64), v.astype(np.float64), h), **tol)
    np.testing.assert_allclose(w, compose(u, v, spacing=h, backend="numpy"), **tol)


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float64), (np.float32, np.float64)])
def test_compose_numba_one_pass_is_bitwise_the_two_step_form(ndim, dtypes):
    """The numba compose (sample and add in one pass) rounds like ``warp(u, v) + v``: bitwise the same, also for a
    non-contiguous input and points far outside the grid."""
    from classreg.kernels.warp import warp

    rng = np.random.default_rng(5)
    h = np.array([0.8, 1.3, 1.1])[:ndim]
    shape = (9, 12, 10)[:ndim] + (ndim,)
    u = (rng.normal(size=shape) * 3.0).astype(dtypes[0])
    v = (rng.normal(size=shape) * 3.0).astype(dtypes[1])
    v.reshape(-1, ndim)[0] = [np.nan, 0.0, 0.0][:ndim]
    v.reshape(-1, ndim)[1] = [0.0, 1e6, 0.0][:ndim]
    u_t = np.asfortranarray(u)
    dt = np.result_type(u, v)
    two_step = warp(u.astype(dt), v.astype(dt), disp_matrix=np.diag(1.0 / h), order=1, mode="border",
                    backend="numba") + v.astype(dt)
    for uu in (u, u_t):
        w = compose(uu, v, spacing=h, backend="numba")
        assert w.dtype == dt
        np.testing.assert_array_equal(w, two_step)


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_expmap_numba_squarings_are_bitwise_the_compose_loop(ndim, dtype):
    """The numba expmap squares in two ping-pong buffers: bitwise the same as ``n`` calls of ``compose(u, u)``."""
    rng = np.random.default_rng(11)
    h = np.array([0.8, 1.3, 1.1])[:ndim]
    v = ndi.gaussian_filter(rng.normal(size=(12, 9, 10)[:ndim] + (ndim,)) * 20.0, [2.0] * ndim + [0]).astype(dtype)
    assert expmap(v, spacing=h, backend="numba")[1] >= 2  # the automatic count squares too
    for n_sq in (None, 1, 2, 3):
        e, n = expmap(v, spacing=h, n_squarings=n_sq, backend="numba")
        u = v * dtype(2.0**-n)
        for _ in range(n):
            u = compose(u, u, spacing=h, backend="numba")
        assert e.dtype == dtype
        np.testing.assert_array_equal(e, u)


def test_compose_identity_and_errors():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(6, 7, 2))
    z = np.zeros_like(u)
    np.testing.assert_allclose(compose(u, z), u, atol=1e-12)
    np.testing.assert_allclose(compose(z, u), u, atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        compose(u, u[:-1])
    with pytest.raises(ValueError, match="u must have shape"):
        compose(u[..., :1], u[..., :1])
    with pytest.raises(ValueError, match="spacing"):
        compose(u, u, spacing=(1.0, -1.0))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("ndim", [2, 3])
def test_expmap_inverse_and_parity(backend, ndim):
    rng = np.random.default_rng(10 + ndim)
    shape = _shape(backend, ndim)
    h = np.array([1.2, 0.9, 1.0][:ndim])
    v = _smooth_field(rng, shape, 1.0) * h
    u, n = expmap(v, spacing=h, backend=backend)
    ui, ni = expmap(-v, spacing=h, backend=backend)
    assert n == ni >= 2
    res = compose(u, ui, spacing=h, backend=backend) / h
    err = np.linalg.norm(res, axis=-1)
    assert err.mean() < (0.05 if backend == "cuda" else 0.01)  # the simulator's grids are tiny
    ref, nref = expmap(v, spacing=h, backend="numpy")
    assert nref == n
    np.testing.assert_allclose(u, ref, rtol=1e-10, atol=1e-10)


def test_expmap_squaring_count():
    v = np.zeros((8, 9, 2))
    assert expmap(v)[1] == 0
    v[3, 4] = (3.0, 4.0)  # |v| = 5 voxels -> 5 / 2**n <= 0.5 -> n = 4
    assert expmap(v)[1] == 4
    v[3, 4] = (0.3, 0.4)  # 0.5 exactly -> n = 0
    assert expmap(v)[1] == 0
    v[3, 4] = (6.0, 8.0)  # |v| = 10 mm, spacing 2 -> 5 voxels -> 4
    assert expmap(v, spacing=2.0)[1] == 4
    assert expmap(v, spacing=(2.0, 1.0))[1] == 5  # (3, 8) voxels -> 8.54 -> n = 5
    assert expmap(v, max_squarings=2)[1] == 2
    u, n = expmap(v, n_squarings=0)
    assert n == 0
    np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="n_squarings"):
        expmap(v, n_squarings=-1)


def test_expmap_small_field_is_first_order():
    rng = np.random.default_rng(4)
    v = _smooth_field(rng, (16, 17), 0.05)
    u, n = expmap(v)
    assert n == 0
    np.testing.assert_array_equal(u, v)
    u8, _ = expmap(v, n_squarings=8)
    assert np.abs(u8 - v).max() < 0.01


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("ndim", [2, 3])
def test_invert_residual(backend, ndim):
    rng = np.random.default_rng(20 + ndim)
    shape = _shape(backend, ndim)
    h = np.array([1.0, 1.5, 0.7][:ndim])
    u = _smooth_field(rng, shape, 1.0) * h
    w, info = invert(u, spacing=h, backend=backend)
    assert set(info) == {"max_error", "mean_error", "iterations"}
    assert info["mean_error"] < 0.01
    assert info["max_error"] <= 1e-3 or info["iterations"] == 50
    res = np.linalg.norm(compose(u, w, spacing=h, backend=backend) / h, axis=-1)
    assert res.mean() < 0.01
    wr, inr = invert(u, spacing=h, backend="numpy")
    assert inr["iterations"] == info["iterations"]
    np.testing.assert_allclose(w, wr, rtol=1e-9, atol=1e-9)


def test_invert_options_and_errors():
    rng = np.random.default_rng(3)
    u = _smooth_field(rng, (10, 11, 2)[:2], 0.8)
    w, info = invert(u, max_iter=0)
    np.testing.assert_array_equal(w, -u)
    assert info["iterations"] == 0
    w2, info2 = invert(u, init=w, tol=1e-6)
    assert info2["max_error"] <= 1e-6
    with pytest.raises(ValueError, match="init"):
        invert(u, init=u[:-1])
    with pytest.raises(ValueError, match="max_iter"):
        invert(u, max_iter=-2)
    with pytest.raises(TypeError, match="u must be"):
        invert(u.astype(complex))


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("shape,h", [((30, 41), (2.0, 1.5)), ((20, 31, 17), (2.0, 1.5, 1.0))])
def test_inside_grid_numba_matches_numpy(shape, h):
    """register_demons' "sample inside the grid" test (ITK IsInsideBuffer, half a voxel): numba against numpy, with
    samples placed exactly on the half-voxel edges of the first axis."""
    from classreg.kernels.fields import inside_grid

    rng = np.random.default_rng(len(shape))
    d = (rng.normal(size=(*shape, len(shape))) * 8).astype(np.float32)
    d[0, ..., 0] = -0.5 * h[0]  # index 0 - 0.5: inside along axis 0
    d[0, ..., 1:] = 0.0
    d[-1, ..., 0] = 0.5 * h[0]  # index n-1 + 0.5: outside
    ref = inside_grid(d, h, backend="numpy")
    out = inside_grid(d, h, backend="numba")
    assert out.dtype == bool and out.shape == shape
    assert np.array_equal(out, ref) and 0.2 < ref.mean() < 0.95
    assert ref[0].all() and not ref[-1].any()
