"""kernels.bspline: cubic B-spline FFD evaluation, Jacobian, adjoint, dense fields, bending energy, refinement.

The numpy reference is checked against brute-force sums over every control point (an independent β3 formula), the
numba path against the reference (1e-12 relative, float64)."""
import itertools

import numpy as np
import pytest
from classreg.kernels import _backend
from classreg.kernels import bspline as bs

NEEDS_NUMBA = pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
BACKENDS = ["numpy", pytest.param("numba", marks=NEEDS_NUMBA)]
GSHAPE = {2: (6, 7), 3: (5, 6, 4)}


def beta3(x, r=0):
    """The centred cubic B-spline (r = 0) and its first / second derivative, piecewise, vectorised."""
    ax = np.abs(x)
    inner, outer = ax < 1, (ax >= 1) & (ax < 2)
    if r == 0:
        return np.where(inner, 2 / 3 - ax**2 + ax**3 / 2, np.where(outer, (2 - ax) ** 3 / 6, 0.0))
    if r == 1:
        return np.sign(x) * np.where(inner, -2 * ax + 1.5 * ax**2, np.where(outer, -((2 - ax) ** 2) / 2, 0.0))
    return np.where(inner, -2 + 3 * ax, np.where(outer, 2 - ax, 0.0))


def brute(coeffs, q, orders=None):
    """Σ_k coeffs[k] Π_d β3^(orders_d)(q_d − k_d) over every control point."""
    gshape = coeffs.shape[:-1]
    orders = orders or [0] * len(gshape)
    out = np.zeros((q.shape[0], coeffs.shape[-1]))
    for k in itertools.product(*[range(n) for n in gshape]):
        w = np.ones(q.shape[0])
        for d, kd in enumerate(k):
            w = w * beta3(q[:, d] - kd, orders[d])
        out += w[:, None] * coeffs[k]
    return out


def close(a, b, rtol=1e-12):
    scale = max(float(np.abs(b).max()), 1e-300)
    err = float(np.abs(np.asarray(a, dtype=np.float64) - b).max()) / scale
    assert err <= rtol, err


def points(rng, gshape, n, lo=-3.5, hi=2.5):
    """Random points over the whole support and beyond (plus a NaN and an infinite one)."""
    q = rng.uniform(lo, np.asarray(gshape) + hi, size=(n, len(gshape)))
    q[0, 0] = np.nan
    q[1, -1] = np.inf
    return q


def test_weights_sum_and_derivatives(rng):
    q = rng.uniform(-5, 15, size=(200, 3))
    q[:3] = [[0.0, 1.0, -2.0], [2.5, -0.5, 7.999999], [1e-12, -1e-12, 3.0]]
    start, w, dw = bs.weights(q)
    np.testing.assert_array_equal(start, np.floor(q).astype(np.intp) - 1)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-14)
    np.testing.assert_allclose(dw.sum(-1), 0.0, atol=1e-13)
    taps = start[..., None] + np.arange(4)
    np.testing.assert_allclose(w, beta3(q[..., None] - taps), atol=1e-14)
    np.testing.assert_allclose(dw, beta3(q[..., None] - taps, 1), atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("nc", [1, 3])
def test_evaluate_brute_force_and_parity(rng, backend, ndim, nc):
    g = GSHAPE[ndim]
    c = rng.normal(size=(*g, nc))
    q = points(rng, g, 300)
    ref = brute(c, np.nan_to_num(q, nan=-10.0, posinf=100.0))
    u = bs.evaluate(c, q, backend=backend)
    assert u.shape == (300, nc) and u.dtype == np.float64
    close(u, ref, 1e-13)
    close(u, bs.evaluate(c, q, backend="numpy"))
    u32 = bs.evaluate(c.astype(np.float32), q, backend=backend)
    assert u32.dtype == np.float32
    close(u32, ref, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_partition_of_unity_and_linear_reproduction(rng, backend, ndim):
    g = GSHAPE[ndim]
    q = rng.uniform(1, np.asarray(g) - 2, size=(200, ndim))  # the valid region Ω
    c = np.full((*g, 2), 3.25)
    np.testing.assert_allclose(bs.evaluate(c, q, backend=backend), 3.25, rtol=1e-14)
    k = np.stack(np.meshgrid(*[np.arange(n) for n in g], indexing="ij"), axis=-1).astype(float)
    a = rng.normal(size=(ndim, 2))
    np.testing.assert_allclose(bs.evaluate(k @ a + 1.0, q, backend=backend), q @ a + 1.0, rtol=1e-12, atol=1e-12)
    assert np.all(bs.evaluate(c, np.array([[-2.0] * ndim, [g[0] + 1.0] + [1.5] * (ndim - 1)]),
                              backend=backend) == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_finite_differences_and_parity(rng, backend, ndim):
    g = GSHAPE[ndim]
    c = rng.normal(size=(*g, 2))
    q = points(rng, g, 200)
    u, du = bs.evaluate_with_jacobian(c, q, backend=backend)
    assert du.shape == (200, 2, ndim)
    close(u, bs.evaluate(c, q, backend="numpy"))
    ur, dur = bs.evaluate_with_jacobian(c, q, backend="numpy")
    close(u, ur)
    close(du, dur)
    qf = q[2:]
    eps = 1e-6
    for d in range(ndim):
        e = np.zeros(ndim)
        e[d] = eps
        fd = (bs.evaluate(c, qf + e, backend="numpy") - bs.evaluate(c, qf - e, backend="numpy")) / (2 * eps)
        np.testing.assert_allclose(du[2:, :, d], fd, atol=1e-7)
    close(du[2:, :, 0], brute(c, qf, [1] + [0] * (ndim - 1)), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_adjoint_dot_product_and_parity(rng, backend, ndim):
    g = GSHAPE[ndim]
    q = points(rng, g, 400)
    v = rng.normal(size=(400, 3))
    c = rng.normal(size=(*g, 3))
    a = bs.adjoint(q, v, g, backend=backend)
    assert a.shape == (*g, 3) and a.dtype == np.float64
    lhs = float(np.sum(a * c))
    rhs = float(np.sum(v * bs.evaluate(c, q, backend="numpy")))
    assert abs(lhs - rhs) <= 1e-12 * np.abs(v).sum() * np.abs(c).max()
    close(a, bs.adjoint(q, v, g, backend="numpy"))
    assert bs.adjoint(q, v.astype(np.float32), g, backend=backend).dtype == np.float32


@NEEDS_NUMBA
@pytest.mark.parametrize("ndim", [2, 3])
def test_adjoint_numba_is_bitwise_independent_of_threads(rng, ndim):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has fewer than 2 threads")
    g = (14, 15) if ndim == 2 else (7, 8, 6)
    n = 30000 if ndim == 2 else 6000  # above serial_below's threshold: really parallel
    q = points(rng, g, n)
    v = rng.normal(size=(n, 2))
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = bs.adjoint(q, v, g, backend="numba")
        numba.set_num_threads(2)
        two = bs.adjoint(q, v, g, backend="numba")
        again = bs.adjoint(q, v, g, backend="numba")
    finally:
        numba.set_num_threads(old)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(two, again)
    close(two, bs.adjoint(q, v, g, backend="numpy"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("diagonal", [True, False])
def test_dense_matches_pointwise_and_parity(rng, backend, ndim, diagonal):
    g = GSHAPE[ndim]
    c = rng.normal(size=(*g, 2))
    shape = (11, 9, 8)[:ndim]
    m = np.diag(rng.uniform(0.3, 0.8, ndim))
    if not diagonal:
        m = m + rng.normal(scale=0.1, size=(ndim, ndim))
    o = rng.uniform(-2.5, 1.0, ndim)
    out = bs.dense(c, shape, m, o, backend=backend)
    assert out.shape == (*shape, 2)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, ndim)
    close(out.reshape(-1, 2), brute(c, idx @ m.T + o), 1e-13)
    close(out, bs.dense(c, shape, m, o, backend="numpy"))
    assert bs.dense(c.astype(np.float32), shape, m, o, backend=backend).dtype == np.float32


def test_gram_matrices_exact():
    g0, g1, g2 = (bs._gram(12, r) for r in range(3))
    np.testing.assert_allclose(g0[6, 3:10] * 5040, [1, 120, 1191, 2416, 1191, 120, 1], rtol=1e-14)
    np.testing.assert_allclose(g1[6, 3:10], [-1 / 120, -1 / 5, -1 / 8, 2 / 3, -1 / 8, -1 / 5, -1 / 120], rtol=1e-14)
    np.testing.assert_allclose(g2[6, 3:10], [1 / 6, 0, -3 / 2, 8 / 3, -3 / 2, 0, 1 / 6], rtol=1e-14, atol=1e-15)
    for g in (g0, g1, g2):
        np.testing.assert_array_equal(g, g.T)
        assert not np.any(np.triu(g, 4))  # 7 diagonals


def quadratic_field(rng, gshape, h, nc=2):
    """Coefficients of u_c(x) = ½ xᵀ A_c x (x_d = h_d q_d): c_k = p(k) − (1/6) Σ_d ∂²p/∂q_d², and the A_c."""
    nd = len(gshape)
    k = np.stack(np.meshgrid(*[np.arange(n) for n in gshape], indexing="ij"), axis=-1).astype(float)
    cs, mats = [], []
    for _ in range(nc):
        a = rng.normal(size=(nd, nd))
        a = a + a.T
        hq = a * np.outer(h, h)
        cs.append(0.5 * np.einsum("...i,ij,...j->...", k, hq, k) - np.trace(hq) / 6)
        mats.append(a)
    return np.stack(cs, axis=-1), mats


@pytest.mark.parametrize("ndim", [2, 3])
def test_bending_energy_affine_quadratic_and_gradient(rng, ndim):
    g = (7, 8, 6)[:ndim]
    h = np.array([1.3, 0.7, 2.0])[:ndim]
    k = np.stack(np.meshgrid(*[np.arange(n) for n in g], indexing="ij"), axis=-1).astype(float)
    lin = k @ rng.normal(size=(ndim, 3)) + rng.normal(size=3)
    e, grad = bs.bending_energy(lin, h, gradient=True)
    assert abs(e) < 1e-12 and np.abs(grad).max() < 1e-12
    c, mats = quadratic_field(rng, g, h)
    np.testing.assert_allclose(bs.bending_energy(c, h), sum(float((a**2).sum()) for a in mats), rtol=1e-12)
    c = rng.normal(size=(*g, 2))
    e, grad = bs.bending_energy(c, h, gradient=True)
    assert grad.shape == c.shape and e > 0
    assert bs.bending_energy(c, h) == e
    eps = 1e-6
    for idx in [(0,) * ndim + (0,), tuple(n // 2 for n in g) + (1,), tuple(n - 1 for n in g) + (1,)]:
        cp, cm = c.copy(), c.copy()
        cp[idx] += eps
        cm[idx] -= eps
        fd = (bs.bending_energy(cp, h) - bs.bending_energy(cm, h)) / (2 * eps)
        np.testing.assert_allclose(grad[idx], fd, rtol=1e-6, atol=1e-9)
    # a quadratic form: E(c) = ½ <grad(c), c>
    np.testing.assert_allclose(e, 0.5 * float(np.sum(grad * c)), rtol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_bending_energy_equals_quadrature(rng, ndim):
    """Gauss–Legendre (4 points per cell and axis: exact for these piecewise polynomials) over Ω of the brute-force
    second derivatives."""
    g = (6, 7) if ndim == 2 else (5, 5, 6)
    h = np.array([1.3, 0.7, 2.0])[:ndim]
    c = rng.normal(size=(*g, 2))
    x, wq = np.polynomial.legendre.leggauss(4)
    x, wq = (x + 1) / 2, wq / 2
    axes = [(np.arange(1, n - 2)[:, None] + x).ravel() for n in g]
    wts = [np.tile(wq, n - 3) for n in g]
    q = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, ndim)
    w = np.prod(np.stack(np.meshgrid(*wts, indexing="ij"), axis=-1).reshape(-1, ndim), axis=1)
    total = np.zeros(q.shape[0])
    for i in range(ndim):
        for j in range(ndim):
            orders = [int(d == i) + int(d == j) for d in range(ndim)]
            total += (brute(c, q, orders) ** 2).sum(1) / (h[i] ** 2 * h[j] ** 2)
    expected = float(np.sum(w * total)) / np.prod([n - 3 for n in g])
    np.testing.assert_allclose(bs.bending_energy(c, h), expected, rtol=1e-12)


def test_bending_energy_errors(rng):
    with pytest.raises(ValueError, match="at least 4"):
        bs.bending_energy(np.zeros((3, 6, 2)), 1.0)
    with pytest.raises(ValueError, match="spacing"):
        bs.bending_energy(np.zeros((5, 6, 2)), (1.0, -1.0))


def cubic_field(rng, gshape):
    """Coefficients (C = 1) of a random cubic polynomial p(q) of total degree 3 in grid coordinates, and p."""
    nd = len(gshape)
    b, e, f = rng.normal(size=nd), rng.normal(size=nd) * 0.02, rng.normal() * 0.05
    bq = rng.normal(size=(nd, nd)) * 0.1
    bq = bq + bq.T

    def p(x):
        return 0.3 + x @ b + np.einsum("...i,ij,...j->...", x, bq, x) + (x**3) @ e + f * x[..., 0] ** 2 * x[..., 1]

    def lap(x):
        return 2 * np.trace(bq) + (6 * x) @ e + 2 * f * x[..., 1]

    k = np.stack(np.meshgrid(*[np.arange(n) for n in gshape], indexing="ij"), axis=-1).astype(float)
    return (p(k) - lap(k) / 6)[..., None], p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_refine_dyadic_is_exact(rng, backend, ndim):
    g = (8, 9, 7)[:ndim]
    c = rng.normal(size=(*g, 2))
    m, o = np.eye(ndim) * 0.5, np.full(ndim, -1.0)  # new control point k at old q = k/2 - 1
    shape = tuple(2 * n + 1 for n in g)
    fine = bs.refine(c, shape, m, o, backend=backend)
    assert fine.shape == (*shape, 2)
    close(fine, bs.refine(c, shape, m, o, backend="numpy"))
    kq = rng.uniform(1, np.asarray(shape) - 2, size=(500, ndim))  # the new grid's valid region
    close(bs.evaluate(fine, kq), bs.evaluate(c, kq @ m.T + o), 1e-10)
    # odd offset (new knots at old half-integers shifted by one fine step): still nested, still exact
    fine = bs.refine(c, shape, m, np.full(ndim, -1.5), backend=backend)
    close(bs.evaluate(fine, kq), bs.evaluate(c, kq @ m.T - 1.5), 1e-10)


@pytest.mark.parametrize("ndim", [2, 3])
def test_refine_cubic_polynomial_exact_and_smooth_field_close(rng, ndim):
    g = (8, 9, 7)[:ndim]
    c, p = cubic_field(rng, g)
    th = 0.3
    rot = np.eye(ndim)
    rot[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    shape = (5, 6, 5)[:ndim]
    for m, o in [(np.diag([0.7, 0.6, 0.55][:ndim]), np.array([1.2, 1.5, 1.3][:ndim])),
                 (0.5 * rot, np.array([2.0, 2.3, 2.1][:ndim]))]:
        corners = np.stack(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij"), -1).reshape(-1, ndim) @ m.T + o
        assert corners.min() >= 1 and np.all(corners.max(0) <= np.asarray(g) - 2)  # inside the old Ω
        new = bs.refine(c, shape, m, o)
        kq = rng.uniform(1, np.asarray(shape) - 2, size=(300, ndim))
        close(bs.evaluate(new, kq)[:, 0], p(kq @ m.T + o), 1e-10)
    # elastix-like non-nested refinement (half spacing, knots offset by half a fine step) of a smooth field
    k = np.stack(np.meshgrid(*[np.arange(n) for n in g], indexing="ij"), axis=-1).astype(float)
    smooth = np.sin(0.4 * k @ np.arange(1, ndim + 1) / ndim)[..., None]
    m, o = np.eye(ndim) * 0.5, np.full(ndim, 0.75)
    shape = tuple(2 * n - 6 for n in g)
    new = bs.refine(smooth, shape, m, o)
    kq = rng.uniform(1, np.asarray(shape) - 2, size=(300, ndim))
    close(bs.evaluate(new, kq), bs.evaluate(smooth, kq @ m.T + o), 2e-3)


def test_argument_errors(rng):
    c = np.zeros((5, 6, 2))
    with pytest.raises(ValueError, match="q must have shape"):
        bs.evaluate(c, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="coeffs must have shape"):
        bs.evaluate(np.zeros((5, 6)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="values must have shape"):
        bs.adjoint(np.zeros((4, 2)), np.zeros((3, 2)), (5, 6))
    with pytest.raises(ValueError, match="out_shape"):
        bs.dense(c, (4, 4, 4), np.eye(2), np.zeros(2))
    with pytest.raises(ValueError, match="matrix"):
        bs.dense(c, (4, 4), np.eye(3), np.zeros(2))
    with pytest.raises(ValueError, match="new_shape"):
        bs.refine(c, (3, 8), np.eye(2), np.zeros(2))
    with pytest.raises(ValueError, match="backend"):
        bs.evaluate(c, np.zeros((1, 2)), backend="gpu")


@pytest.mark.parametrize("nd", [2, 3])
def test_sample_kernels_match_the_reference_and_are_adjoint(nd):
    """``samples`` (physical points, ITK valid region) against the numpy path and ``evaluate``; ``scatter_samples``
    is its adjoint over the used points."""
    samples, scatter_samples, evaluate = bs.samples, bs.scatter_samples, bs.evaluate
    have_numba = _backend.HAVE_NUMBA
    rng = np.random.default_rng(nd)
    gshape = (9, 8, 7)[:nd]
    c = rng.normal(size=(*gshape, nd))
    m = np.diag(rng.uniform(0.1, 0.3, nd)) + 0.01 * rng.normal(size=(nd, nd))
    o = rng.normal(size=nd)
    q_true = rng.uniform(-0.5, np.asarray(gshape) - 1.5, size=(400, nd))
    pts = np.linalg.solve(m, (q_true - o).T).T
    u_ref, q_ref, in_ref = samples(c, pts, m, o, backend="numpy")
    if have_numba:
        u, q, inside = samples(c, pts, m, o, backend="numba")
        np.testing.assert_array_equal(inside, in_ref)
        np.testing.assert_allclose(q, q_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(u, u_ref, rtol=1e-12, atol=1e-12)
    assert in_ref.any() and not in_ref.all()
    np.testing.assert_allclose(u_ref[in_ref], evaluate(c, q_ref[in_ref], backend="numpy"), rtol=1e-12)
    assert np.all(u_ref[~in_ref] == 0)
    use = in_ref & (rng.random(len(in_ref)) < 0.7)
    v = rng.normal(size=(int(use.sum()), nd))
    for be in (["numpy", "numba"] if have_numba else ["numpy"]):
        g = scatter_samples(q_ref, use, v, gshape, backend=be)
        assert np.isclose(np.sum(g * c), np.sum(v * u_ref[use]), rtol=1e-10)


@NEEDS_NUMBA
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_mi_step_numba_matches_the_reference(nd, with_prior, mask):
    """The fused iteration kernel against the composition of the reference kernels: same valid samples, cost,
    gradient and NCC (float64 sums in both; 1e-12 of the largest gradient entry). Oblique maps, a prior, a moving
    mask, points outside the grid's valid region and the moving image all occur."""
    rng = np.random.default_rng(10 * nd + 2 * with_prior + mask)
    fshape, mshape, gshape = (30, 34, 28)[:nd], (26, 31, 29)[:nd], (9, 8, 7)[:nd]
    fixed = rng.random((*fshape, 1)).astype(np.float32)
    moving = rng.random((*mshape, nd + 2)).astype(np.float32)  # value, gradient, mask channel
    c = rng.normal(scale=2.0, size=(*gshape, nd))
    maps = np.zeros((4, nd, nd + 1))
    for k in range(4):
        maps[k, :, :nd] = np.eye(nd) + 0.05 * rng.normal(size=(nd, nd))
        maps[k, :, nd] = rng.normal(size=nd)
    maps[2, :, :nd] *= 0.25  # world -> grid index: 4 voxels per control-point spacing
    pts = rng.random((3000, nd)) * (np.asarray(fshape) - 1)
    prior = rng.normal(size=(*fshape, nd)) if with_prior else None
    kw = dict(prior=prior, moving_mask=mask, bins=(16, 20), fixed_limits=(0.0, 1.0), moving_limits=(-0.1, 1.1),
              thresholds=(0.0, 1.0))
    v_ref, g_ref, n_ref, s_ref = bs.mi_step(fixed, pts, maps, c, moving, backend="numpy", **kw)
    v, g, n, s = bs.mi_step(fixed, pts, maps, c, moving, backend="numba", **kw)
    assert n == n_ref and 0.3 * len(pts) < n < len(pts)
    assert v == pytest.approx(v_ref, rel=1e-12) and s == pytest.approx(s_ref, rel=1e-10)
    close(g, g_ref)
    assert np.any(g != 0)
    # bitwise repeatable
    v2, g2, _, _ = bs.mi_step(fixed, pts, maps, c, moving, backend="numba", **kw)
    assert v2 == v and np.array_equal(g2, g)


# ---------------------------------------------------------------------------------------------------- fold projection
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_dense_jacobian_matches_the_pointwise_jacobian(nd, diagonal, backend):
    """The separable (diagonal matrix) and general paths of dense_jacobian against evaluate_with_jacobian at the same
    points (same arithmetic up to summation order: 1e-12)."""
    rng = np.random.default_rng(nd)
    c = rng.normal(size=(7,) * nd + (nd,))
    shape = (9, 8, 6)[:nd]
    m = np.diag(rng.uniform(0.3, 0.6, nd)) + (0.0 if diagonal else 0.05 * rng.normal(size=(nd, nd)))
    o = rng.uniform(0.5, 1.5, nd)
    got = bs.dense_jacobian(c, shape, m, o, backend=backend)
    idx = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), axis=1).astype(float)
    ref = bs.evaluate_with_jacobian(c, idx @ m.T + o, backend="numpy")[1].reshape(*shape, nd, nd)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_dense_det_is_det_of_the_dense_jacobian(nd, diagonal, backend):
    """dense_det (the separable numba path reads the per-axis derivatives directly) against numpy.linalg.det of
    I + dense_jacobian · frame at every voxel (1e-12)."""
    rng = np.random.default_rng(20 + nd)
    c = 0.3 * rng.normal(size=(7,) * nd + (nd,))
    shape = (9, 8, 6)[:nd]
    m = np.diag(rng.uniform(0.3, 0.6, nd)) + (0.0 if diagonal else 0.05 * rng.normal(size=(nd, nd)))
    o = rng.uniform(0.5, 1.5, nd)
    frame = rng.normal(size=(nd, nd))
    du = bs.dense_jacobian(c, shape, m, o, backend="numpy").reshape(-1, nd, nd)
    ref = np.linalg.det(np.eye(nd) + du @ frame)
    got = bs.dense_det(c, shape, m, o, frame, backend=backend)
    assert got.shape == (int(np.prod(shape)),)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("nd", [2, 3])
def test_det_of_and_det_gradient(nd):
    """det_of (numba and numpy) and det_gradient's determinant against numpy.linalg.det of I + ∂u/∂q · frame, and
    det_gradient's coefficient gradient against central differences (a cubic polynomial in the coefficients: the
    differences are exact up to rounding, 1e-6 relative)."""
    rng = np.random.default_rng(10 + nd)
    c = rng.normal(size=(7,) * nd + (nd,))
    q = rng.uniform(1.0, 5.0, size=(60, nd))
    frame = rng.normal(size=(nd, nd))
    du = bs.evaluate_with_jacobian(c, q, backend="numpy")[1]
    ref = np.linalg.det(np.eye(nd) + du @ frame)
    for backend in ("numpy", "numba"):
        np.testing.assert_allclose(bs.det_of(du, frame, backend=backend), ref, rtol=0, atol=1e-12)
    det, lin, grad = bs.det_gradient(c, q, frame)
    np.testing.assert_allclose(det, ref, rtol=0, atol=1e-12)
    w, d, h = rng.normal(size=len(q)), rng.normal(size=c.shape), 1e-6
    fd = (w @ bs.det_gradient(c + h * d, q, frame)[0] - w @ bs.det_gradient(c - h * d, q, frame)[0]) / (2 * h)
    analytic = np.sum(w[:, None, None] * grad * d.reshape(-1, nd)[lin])
    assert abs(analytic - fd) <= 1e-6 * abs(fd), (analytic, fd)
    with pytest.raises(ValueError, match="components"):
        bs.det_gradient(c[..., :1], q, frame)


@pytest.mark.parametrize("nd", [2, 3])
def test_taps_numba_matches_the_reference(nd):
    """taps: the numba loop gives the numpy reference's tap indices and validity exactly and its weight derivatives
    to rounding, for points inside, near and beyond the grid and a NaN (treated as far outside)."""
    rng = np.random.default_rng(20 + nd)
    gshape = (7, 8, 6)[:nd]
    q = rng.uniform(-4.0, 10.0, size=(300, nd))
    q[0, 0] = np.nan
    ref = bs.taps(q, gshape, backend="numpy")
    got = bs.taps(q, gshape, backend="numba")
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    assert got[1].any() and not got[1].all()
    np.testing.assert_allclose(got[2], ref[2], rtol=0, atol=1e-15)


@pytest.mark.parametrize("nd", [2, 3])
def test_det_shortfall_value_gradient_and_backends(nd):
    """det_shortfall: its determinant is det_gradient's; its value Σ (t − s·det)₊² and its gradient agree between the
    numba loop and the numpy reference (1e-12) and with central differences of the value (a piecewise polynomial
    of the coefficients; 1e-5 relative with h = 1e-6, away from the kink of (·)₊ for these random points)."""
    rng = np.random.default_rng(30 + nd)
    c = rng.normal(scale=0.6, size=(7,) * nd + (nd,))
    q = rng.uniform(1.0, 5.0, size=(120, nd))
    frame = rng.normal(size=(nd, nd))
    target, scale = 0.4, 1.3
    det = bs.det_gradient(c, q, frame)[0]
    short = scale * det < target
    assert 0.1 < short.mean() < 0.9  # both sides of the kink occur
    out = {be: bs.det_shortfall(c, q, frame, target, scale=scale, backend=be) for be in ("numpy", "numba")}
    for value, d, grad in out.values():
        np.testing.assert_allclose(d, det, rtol=0, atol=1e-12)
        assert value == pytest.approx(float(np.sum((target - scale * det[short]) ** 2)), rel=1e-12)
        assert grad.shape == c.shape
    close(out["numba"][2], out["numpy"][2])
    d, h = rng.normal(size=c.shape), 1e-6
    fd = (bs.det_shortfall(c + h * d, q, frame, target, scale=scale)[0]
          - bs.det_shortfall(c - h * d, q, frame, target, scale=scale)[0]) / (2 * h)
    analytic = float(np.sum(out["numba"][2] * d))
    assert abs(analytic - fd) <= 1e-5 * abs(fd), (analytic, fd)
