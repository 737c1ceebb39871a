"""kernels.sampling: the per-sample kernels of the parametric engine, numba against the numpy reference."""
import numpy as np
import pytest

from classreg.kernels import _backend
from classreg.kernels.sampling import linear_at, parzen_mi

needs_numba = pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")


@needs_numba
@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_at_matches_reference(ndim):
    rng = np.random.default_rng(ndim)
    shape = (13, 11, 9)[:ndim]
    stack = rng.normal(size=(*shape, 3))
    pts = rng.uniform(-1.5, np.asarray(shape) + 0.5, size=(500, ndim))
    pts[:3] = 0.0
    pts[3:6] = np.asarray(shape) - 1.0  # the far edge is inside
    ref, ins_ref = linear_at(stack, pts, backend="numpy")
    out, ins = linear_at(stack, pts, backend="numba")
    assert np.array_equal(ins, ins_ref) and ins[:6].all() and not ins.all()
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_at_is_exact_for_linear_images(ndim):
    rng = np.random.default_rng(0)
    shape = (7, 8, 9)[:ndim]
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), -1)
    coef = rng.normal(size=ndim)
    stack = (grid @ coef + 2.0)[..., None]
    pts = rng.uniform(0, np.asarray(shape) - 1.0, size=(200, ndim))
    vals, inside = linear_at(stack, pts)
    assert inside.all()
    np.testing.assert_allclose(vals[:, 0], pts @ coef + 2.0, rtol=1e-12)


def test_parzen_histogram_windows_sum_to_one():
    rng = np.random.default_rng(1)
    fidx = rng.integers(0, 32, size=3000)
    xi = rng.uniform(0.0, 31.0, size=3000)
    xi[:5] = [0.0, 0.3, 30.999, 31.0, 1.0]
    h, gather = parzen_mi(fidx, xi, 32, 32)
    np.testing.assert_allclose(h.sum(axis=1), np.bincount(fidx, minlength=32), rtol=1e-12)  # one per sample
    assert gather(np.ones((32, 32))) == pytest.approx(np.zeros(3000), abs=1e-12)  # derivative of a constant


@needs_numba
@pytest.mark.parametrize("normalised,eps", [(False, 0.0), (True, 0.0), (False, 1e-4), (False, 1e-2)],
                         ids=["mi", "nmi", "smoothed-1e-4", "smoothed-1e-2"])
def test_fused_mattes_mi_matches_the_reference(normalised, eps):
    """The one-pass numba kernel against the numpy reference: elastix's MI, the normalised MI and the smoothed MI
    (eps > 0, register_lddmm's data term)."""
    from classreg.terms.measures import mattes_mi_samples

    rng = np.random.default_rng(2)
    f = rng.random(2500)
    m = np.sin(3 * f) + 0.2 * rng.random(2500)
    m[:10] = [-5.0, 5.0, 0, 0, 0, 0, 0, 0, 0, 0]  # outside the limits: the exponential limiter acts
    kw = dict(bins=(24, 30), gradient=True, fixed_limits=(0.0, 1.0), moving_limits=(-1.0, 1.5),
              normalised=normalised, eps=eps)
    v_ref, g_ref = mattes_mi_samples(f, m, backend="numpy", **kw)
    v, g = mattes_mi_samples(f, m, backend="numba", **kw)
    assert abs(v - v_ref) <= 1e-12 * abs(v_ref)
    np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-15 * np.abs(g_ref).max())


@needs_numba
@pytest.mark.parametrize("shape", [(37, 41), (30, 29, 27)])  # the 3-D case spans two blocks of the kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_dense_mi_descent_matches_the_reference(monkeypatch, shape, dtype, masked):
    """register_demons(metric="mi")'s dense kernel against DataTerm.descent with the numpy mattes_mi."""
    import numba

    from classreg import terms
    from classreg.kernels.sampling import dense_mi_descent
    from classreg.terms import measures

    rng = np.random.default_rng(len(shape))
    f = (100.0 * rng.random(shape)).astype(dtype)
    w = (np.sin(f / 30.0) + 0.3 * rng.random(shape)).astype(dtype)
    g = rng.normal(size=(*shape, len(shape))).astype(dtype)
    mask = rng.random(shape) > 0.3 if masked else None
    monkeypatch.setattr(measures, "_use_fused", lambda backend: False)
    u_ref, v_ref = terms.DataTerm.descent(terms.MattesMI(bins=(24, 30)), f, w, g, spacing=1.0, mask=mask)
    monkeypatch.undo()
    v, u = dense_mi_descent(f, w, g, mask=mask, bins=(24, 30))
    assert u.dtype == dtype and u.shape == g.shape
    assert abs(v - v_ref) <= 1e-12 * abs(v_ref)
    tol = 1e-6 if dtype == np.float32 else 1e-10  # float32: the product with g rounded once more
    np.testing.assert_allclose(u, u_ref, rtol=tol, atol=tol * np.abs(u_ref).max())
    if masked:
        assert not u[~mask].any()
    # the MattesMI term takes this path on host arrays; the result does not depend on the thread count
    u_term, v_term = terms.MattesMI().descent(f, w, g, spacing=1.0, mask=mask)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        u_one, v_one = terms.MattesMI().descent(f, w, g, spacing=1.0, mask=mask)
    finally:
        numba.set_num_threads(threads)
    assert v_one == v_term and np.array_equal(u_one, u_term)


@needs_numba
def test_dense_mi_descent_refuses_an_empty_mask_and_nan():
    from classreg import terms

    f = np.random.default_rng(0).random((20, 20))
    g = np.zeros((20, 20, 2))
    with pytest.raises(ValueError, match="mask is empty"):
        terms.MattesMI().descent(f, f, g, spacing=1.0, mask=np.zeros((20, 20), bool))
    bad = f.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        terms.MattesMI().descent(f, bad, g, spacing=1.0)


@needs_numba
def test_similarity_kernel_path_matches_numpy(monkeypatch):
    """progress.similarity on arrays of at least _KERNEL_SIZE entries (numba pearson_sums) against numpy's passes."""
    import classreg.progress as progress

    rng = np.random.default_rng(3)
    a = rng.random((300, 250)).astype(np.float32)
    b = (0.7 * a + rng.random(a.shape)).astype(np.float32)
    mask = rng.random(a.shape) > 0.4
    assert a.size >= progress._KERNEL_SIZE
    fast = [progress.similarity(a, b), progress.similarity(a, b, mask=mask)]
    monkeypatch.setattr(progress, "_KERNEL_SIZE", np.inf)
    slow = [progress.similarity(a, b), progress.similarity(a, b, mask=mask)]
    ref = [np.corrcoef(a.ravel(), b.ravel())[0, 1], np.corrcoef(a[mask], b[mask])[0, 1]]
    np.testing.assert_allclose(fast, ref, rtol=1e-12)
    np.testing.assert_allclose(slow, ref, rtol=1e-5)  # float32 centring and sums
    monkeypatch.undo()
    assert np.isnan(progress.similarity(a, np.ones_like(a), mask=mask))
    assert np.isnan(progress.similarity(a, b, mask=np.zeros(a.shape, bool)))


# ------------------------------------------------------------------------------------------- B-spline order 2/3
@needs_numba
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("order", [2, 3])
def test_bspline_at_matches_reference(ndim, order):
    """numba against the numpy reference: the same float64 arithmetic on the same float32 coefficients (1e-12)."""
    from classreg.kernels.sampling import bspline_at, bspline_coefficients

    rng = np.random.default_rng(10 * ndim + order)
    shape = (13, 11, 9)[:ndim]
    coef = bspline_coefficients(rng.normal(size=shape), order)
    pts = rng.uniform(-1.5, np.asarray(shape) + 0.5, size=(400, ndim))
    pts[:3] = 0.0
    pts[3:6] = np.asarray(shape) - 1.0  # both edges are inside; the taps beyond them are mirrored
    ref, ins_ref = bspline_at(coef, pts, order, backend="numpy")
    out, ins = bspline_at(coef, pts, order, backend="numba")
    assert np.array_equal(ins, ins_ref) and ins[:6].all() and not ins.all()
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("order", [2, 3])
def test_bspline_at_is_scipys_interpolant_and_its_exact_gradient(ndim, order):
    """Values equal scipy.ndimage.map_coordinates(order, mode="mirror") (ITK's boundary) up to the float32 rounding
    of the coefficients (|c| ≲ 10 here: 1e-5 absolute); the gradient equals central differences (h = 1e-4, error
    O(h²) + rounding/h ≈ 1e-6 in float64 of scipy's interpolant: 1e-4 absolute), edges included."""
    from scipy import ndimage

    from classreg.kernels.sampling import bspline_at, bspline_coefficients

    rng = np.random.default_rng(order)
    shape = (12, 10, 9)[:ndim]
    img = rng.normal(size=shape)
    pts = rng.uniform(0.0, np.asarray(shape) - 1.0, size=(300, ndim))
    pts[0] = 0.0
    vals, inside = bspline_at(bspline_coefficients(img, order), pts, order, backend="numpy")
    assert inside.all()
    np.testing.assert_allclose(vals[:, 0], ndimage.map_coordinates(img, pts.T, order=order, mode="mirror"),
                               atol=1e-5)
    h = 1e-4
    for d in range(ndim):
        e = np.zeros(ndim)
        e[d] = h
        fd = (ndimage.map_coordinates(img, (pts + e).T, order=order, mode="mirror")
              - ndimage.map_coordinates(img, (pts - e).T, order=order, mode="mirror")) / (2 * h)
        np.testing.assert_allclose(vals[1:, 1 + d], fd[1:], atol=1e-4)  # (the corner point: one-sided there)
