"""kernels.diff: finite differences, Jacobians, curl, Lie bracket, Dirichlet Poisson."""
import numpy as np
import pytest
from conftest import backend_params

from classreg.kernels import diff

TOL = {np.float32: 1e-5, np.float64: 1e-10}


def assert_parity(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(np.asarray(out, dtype=np.float64) - ref).max()) / scale
    assert err <= TOL[ref.dtype.type], err


SHAPES = [(5, 6), (5, 6, 7)]
SPACING = {2: (0.7, 1.3), 3: (0.7, 1.3, 0.9)}

OPS = {
    "gradient": lambda a, u, v, h, b: diff.gradient(a, spacing=h, backend=b),
    "gradient_channels": lambda a, u, v, h, b: diff.gradient(u, spacing=h, ndim=u.ndim - 1, backend=b),
    "divergence": lambda a, u, v, h, b: diff.divergence(u, spacing=h, backend=b),
    "jacobian_map": lambda a, u, v, h, b: diff.jacobian_matrix(u, spacing=h, backend=b),
    "jacobian_field": lambda a, u, v, h, b: diff.jacobian_matrix(u, spacing=h, of_map=False, backend=b),
    "det": lambda a, u, v, h, b: diff.jacobian_determinant(u, spacing=h, backend=b),
    "curl": lambda a, u, v, h, b: diff.curl(u, spacing=h, backend=b),
    "curl_array": lambda a, u, v, h, b: diff.curl(u, spacing=h, convention="array", backend=b),
    "lie": lambda a, u, v, h, b: diff.lie_bracket(u, v, spacing=h, backend=b),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_parity(backend, dtype, shape, op, rng):
    nd = len(shape)
    a = rng.standard_normal(shape).astype(dtype)
    u = rng.standard_normal(shape + (nd,)).astype(dtype)
    v = rng.standard_normal(shape + (nd,)).astype(dtype)
    copies = [x.copy() for x in (a, u, v)]
    ref = OPS[op](a, u, v, SPACING[nd], "numpy")
    out = OPS[op](a, u, v, SPACING[nd], backend)
    assert_parity(out, ref)
    for x, y in zip((a, u, v), copies):
        np.testing.assert_array_equal(x, y)


def test_gradient_1d_and_int_input(rng):
    a = rng.integers(0, 9, 11)
    out = diff.gradient(a, spacing=0.5, backend="numba")
    assert out.shape == (11, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], np.gradient(a.astype(np.float32), 0.5))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_gradient_equals_numpy_gradient(backend, rng):
    a = rng.standard_normal((6, 7, 8))
    h = (0.5, 1.0, 2.5)
    out = diff.gradient(a, spacing=h, backend=backend)
    for d, g in enumerate(np.gradient(a, *h)):
        np.testing.assert_array_equal(out[..., d], g)
    f = rng.standard_normal((6, 7, 2))
    out = diff.gradient(f, spacing=h[:2], ndim=2, backend=backend)
    assert out.shape == (6, 7, 2, 2)
    for c in range(2):
        for d, g in enumerate(np.gradient(f[..., c], *h[:2])):
            np.testing.assert_array_equal(out[..., c, d], g)


def _grid(shape, h):
    return np.stack(np.meshgrid(*[np.arange(n) * hh for n, hh in zip(shape, h)], indexing="ij"), axis=-1)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("nd", [2, 3])
def test_affine_field_exact(backend, nd, rng):
    shape = (6, 7, 5)[:nd]
    h = SPACING[nd]
    A = 0.1 * rng.standard_normal((nd, nd))
    x = _grid(shape, h)
    u = x @ A.T + rng.standard_normal(nd)
    J = diff.jacobian_matrix(u, spacing=h, backend=backend)
    np.testing.assert_allclose(J, np.broadcast_to(np.eye(nd) + A, J.shape), atol=1e-12)
    J0 = diff.jacobian_matrix(u, spacing=h, of_map=False, backend=backend)
    np.testing.assert_allclose(J0, np.broadcast_to(A, J0.shape), atol=1e-12)
    np.testing.assert_allclose(diff.jacobian_determinant(u, spacing=h, backend=backend), np.linalg.det(np.eye(nd) + A))
    np.testing.assert_allclose(diff.divergence(u, spacing=h, backend=backend), np.trace(A), atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_quadratic_interior_exact(backend, rng):
    # central differences are exact for quadratics inside the domain
    h = (0.7, 1.3, 0.9)
    x = _grid((6, 7, 5), h)
    u = np.stack([x[..., 0] ** 2 + x[..., 1] * x[..., 2], x[..., 1] ** 2, x[..., 0] * x[..., 2]], axis=-1)
    div = diff.divergence(u, spacing=h, backend=backend)
    np.testing.assert_allclose(div[1:-1, 1:-1, 1:-1], (2 * x[..., 0] + 2 * x[..., 1] + x[..., 0])[1:-1, 1:-1, 1:-1])
    c = diff.curl(u, spacing=h, backend=backend)
    # physical curl in array order: (d2 u1 - d1 u2, d0 u2 - d2 u0, d1 u0 - d0 u1)
    exp = np.stack([np.zeros_like(x[..., 0]), x[..., 2] - x[..., 1], x[..., 2]], axis=-1)
    np.testing.assert_allclose(c[1:-1, 1:-1, 1:-1], exp[1:-1, 1:-1, 1:-1], atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_curl_convention_rotation(backend):
    # counter-clockwise rotation in (x, y): u_x = -y, u_y = x  ->  physical curl = +2
    h = (0.5, 2.0)
    x = _grid((6, 5), h)  # x[..., 0] = y (array axis 0), x[..., 1] = x (array axis 1)
    u = np.stack([x[..., 1], -x[..., 0]], axis=-1)  # component 0 along axis 0 (= u_y), 1 along axis 1 (= u_x)
    np.testing.assert_allclose(diff.curl(u, spacing=h, backend=backend), 2.0)
    np.testing.assert_allclose(diff.curl(u, spacing=h, convention="array", backend=backend), -2.0)
    # 3-D: rotation about z, array axes (z, y, x): curl = (c_z, c_y, c_x) = (2, 0, 0)
    h3 = (1.0, 0.5, 2.0)
    x3 = _grid((4, 6, 5), h3)
    u3 = np.stack([np.zeros_like(x3[..., 0]), x3[..., 2], -x3[..., 1]], axis=-1)
    c3 = diff.curl(u3, spacing=h3, backend=backend)
    np.testing.assert_allclose(c3, np.broadcast_to([2.0, 0.0, 0.0], c3.shape), atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_lie_bracket_linear_fields(backend, rng):
    # u = A x, v = B x  =>  [u, v] = Jac(u) v - Jac(v) u = (A B - B A) x
    h = (0.7, 1.3, 0.9)
    x = _grid((5, 6, 4), h)
    A, B = rng.standard_normal((2, 3, 3))
    u, v = x @ A.T, x @ B.T
    out = diff.lie_bracket(u, v, spacing=h, backend=backend)
    np.testing.assert_allclose(out, x @ (A @ B - B @ A).T, atol=1e-12)
    np.testing.assert_allclose(diff.lie_bracket(v, u, spacing=h, backend=backend), -out, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Poisson
# ---------------------------------------------------------------------------------------------------------------
def _sparse_laplacian(shape, h):
    import scipy.sparse as sp

    L = None
    for j, n in enumerate(shape):
        d1 = sp.diags([np.ones(n - 1), -2 * np.ones(n), np.ones(n - 1)], [-1, 0, 1]) / h[j] ** 2
        terms = [sp.identity(m) for m in shape]
        terms[j] = d1
        K = terms[0]
        for t in terms[1:]:
            K = sp.kron(K, t)
        L = K if L is None else L + K
    return L.tocsc()


@pytest.mark.parametrize("shape,h", [((40, 48), (0.8, 1.3)), ((9, 8, 11), (1.0, 0.6, 1.7))])
def test_poisson_vs_sparse_lu(shape, h, rng):
    import scipy.sparse.linalg as spla

    r = rng.standard_normal(shape)
    w = diff.poisson_dirichlet(r, spacing=h)
    assert w.shape == shape and w.dtype == np.float64
    inner = tuple(slice(1, n - 1) for n in shape)
    ishape = tuple(n - 2 for n in shape)
    L = _sparse_laplacian(ishape, h)
    ref = spla.splu(L).solve(r[inner].ravel()).reshape(ishape)
    np.testing.assert_allclose(w[inner], ref, atol=1e-12 * np.abs(ref).max())
    resid = (L @ w[inner].ravel()).reshape(ishape) - r[inner]
    assert np.abs(resid).max() < 1e-12 * np.abs(r).max() * 10
    mask = np.ones(shape, bool)
    mask[inner] = False
    assert np.all(w[mask] == 0)


def test_poisson_interior_channels_float32(rng):
    r = rng.standard_normal((7, 9, 2))
    full = diff.poisson_dirichlet(r, spacing=0.5, ndim=2)
    for c in range(2):
        np.testing.assert_allclose(full[..., c], diff.poisson_dirichlet(r[..., c], spacing=0.5), atol=1e-14)
    inner = diff.poisson_dirichlet(r[1:-1, 1:-1], spacing=0.5, ndim=2, include_boundary=False)
    np.testing.assert_allclose(inner, full[1:-1, 1:-1], atol=1e-14)
    w32 = diff.poisson_dirichlet(r.astype(np.float32), spacing=0.5, ndim=2)
    assert w32.dtype == np.float32
    np.testing.assert_allclose(w32, full, atol=1e-5 * np.abs(full).max())


def test_dst1_fallback_matches_scipy(rng):
    import scipy.fft as sfft

    x = rng.standard_normal((4, 7, 5))
    for ax in range(3):
        np.testing.assert_allclose(diff._dst1_fft(x, ax, np), sfft.dst(x, type=1, axis=ax), atol=1e-12)


def test_diff_errors(rng):
    u = rng.standard_normal((5, 6, 2))
    with pytest.raises(ValueError, match="u must be a channels-last"):
        diff.divergence(rng.standard_normal((5, 6, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        diff.jacobian_determinant(rng.standard_normal((1, 6, 2)))
    with pytest.raises(ValueError, match="spacing"):
        diff.divergence(u, spacing=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="spacing"):
        diff.divergence(u, spacing=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        diff.lie_bracket(u, u[:4])
    with pytest.raises(ValueError, match="convention"):
        diff.curl(u, convention="left")
    with pytest.raises(ValueError, match="u must be"):
        diff.curl(rng.standard_normal((5, 1)))
    with pytest.raises(ValueError, match="ndim"):
        diff.gradient(u, ndim=1)
    with pytest.raises(ValueError, match="3 nodes"):
        diff.poisson_dirichlet(rng.standard_normal((2, 5)))
    with pytest.raises(TypeError, match="r must be"):
        diff.poisson_dirichlet(np.zeros((4, 4), complex))
