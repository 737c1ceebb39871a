"""Parity and semantics tests of classreg.kernels.warp (warp, interpolate)."""
import numpy as np
import pytest
from conftest import backend_params
from scipy import ndimage as ndi

from classreg.kernels import _backend
from classreg.kernels.warp import interpolate, warp

SCIPY_MODE = {"zero": "grid-constant", "border": "nearest"}


def _tol(dtype):
    # float32: the result's rounding, the CPU fast paths' float32 arithmetic and the "cuda" path's float32 coordinates,
    # weights and sums (coordinates below 20 voxels here: a few roundings of <= 1e-6 voxel each, times O(1) slopes)
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


def _shape(backend, ndim):
    if backend == "cuda":
        return (5, 6, 7)[:ndim] if ndim == 3 else (6, 7)
    return (9, 10, 11)[:ndim] if ndim == 3 else (17, 19)


def _disp(rng, shape, scale=2.5, dtype=np.float64):
    return rng.normal(scale=scale, size=shape + (len(shape),)).astype(dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("mode", ["zero", "border", "itk"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_warp_parity(backend, ndim, order, mode, dtype):
    rng = np.random.default_rng(ndim * 100 + order * 10 + len(mode))
    shape = _shape(backend, ndim)
    img = rng.normal(size=shape).astype(dtype)
    disp = _disp(rng, shape, dtype=dtype)  # many points fall outside the grid
    img0, disp0 = img.copy(), disp.copy()
    ref = warp(img, disp, order=order, mode=mode, cval=0.25, backend="numpy")
    out = warp(img, disp, order=order, mode=mode, cval=0.25, backend=backend)
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_allclose(out, ref, **_tol(dtype))
    np.testing.assert_array_equal(img, img0)
    np.testing.assert_array_equal(disp, disp0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("mode", ["itk", "border"])
@pytest.mark.parametrize("nch", [2, 3])  # 3 channels in mode "border": the numba kernel for displacement fields
def test_warp_affine_disp_matrix_channels_parity(backend, order, mode, nch):
    rng = np.random.default_rng(7)
    shape = _shape(backend, 3)
    img = rng.normal(size=shape + (nch,))
    out_shape = (4, 5, 6) if backend == "cuda" else (7, 8, 9)
    A = np.eye(3) + rng.normal(scale=0.1, size=(3, 3))
    off = rng.normal(size=3)
    D = np.diag([1 / 0.8, 1 / 1.2, 1 / 2.0]) @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
    disp = _disp(rng, out_shape, scale=1.0)
    kw = dict(matrix=A, offset=off, disp_matrix=D, order=order, mode=mode, cval=-1.0)
    ref = warp(img, disp, backend="numpy", **kw)
    out = warp(img, disp, backend=backend, **kw)
    assert out.shape == out_shape + (nch,)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)
    # pure affine, other output grid
    ref = warp(img, matrix=A, offset=off, out_shape=out_shape, order=order, backend="numpy")
    out = warp(img, matrix=A, offset=off, out_shape=out_shape, order=order, backend=backend)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("mode", ["zero", "border", "itk"])
def test_interpolate_parity(backend, ndim, order, mode):
    rng = np.random.default_rng(3 + ndim + order)
    shape = _shape(backend, ndim)
    img = rng.normal(size=shape + (3,)).astype(np.float32)
    n = 40 if backend == "cuda" else 500
    pts = rng.uniform(-3, 1, size=(n, ndim)) * 0 + rng.uniform(-3, np.array(shape) + 2, size=(n, ndim))
    pts[0] = np.nan
    ref = interpolate(img, pts, order=order, mode=mode, cval=0.5, backend="numpy")
    out = interpolate(img, pts, order=order, mode=mode, cval=0.5, backend=backend)
    assert out.shape == (n, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, **_tol(np.float32))
    assert np.all(ref[0] == np.float32(0.5))  # NaN coordinate -> cval


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("mode", ["zero", "border"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("prefiltered", [False, True])
def test_reference_matches_scipy(ndim, order, mode, dtype, prefiltered):
    rng = np.random.default_rng(11)
    shape = (9, 10, 11)[:ndim] if ndim == 3 else (13, 14)
    img = rng.normal(size=shape).astype(dtype)
    if prefiltered and order == 1:
        pytest.skip("prefiltered applies to order 3")
    coeff = ndi.spline_filter(img, 3, mode="mirror").astype(dtype) if prefiltered else img
    disp = _disp(rng, shape, scale=3.0)
    coords = np.indices(shape, dtype=np.float64) + np.moveaxis(disp, -1, 0)
    exp = ndi.map_coordinates(
        coeff, coords, order=order, mode=SCIPY_MODE[mode], cval=0.3, prefilter=not prefiltered
    )
    out = warp(coeff, disp, order=order, mode=mode, cval=0.3, prefiltered=prefiltered, backend="numpy")
    np.testing.assert_allclose(out, exp, **_tol(dtype))


@pytest.mark.parametrize("mode", ["zero", "border", "itk"])
def test_nearest_round_half_up(mode):
    img = np.arange(1.0, 6.0)[None, :] * np.ones((3, 1))  # (3, 5)
    pts = np.array([[1, -0.6], [1, -0.5], [1, -0.4], [1, 0.5], [1, 1.5], [1, 2.49], [1, 3.5], [1, 4.4], [1, 4.5]])
    out = interpolate(img, pts, order=0, mode=mode, cval=-9.0, backend="numpy")
    j = np.floor(pts[:, 1] + 0.5).astype(int)
    inside = (j >= 0) & (j < 5)
    if mode == "zero":
        exp = np.where(inside, img[1, np.clip(j, 0, 4)], -9.0)
    elif mode == "border":
        exp = img[1, np.clip(j, 0, 4)]
    else:
        ok = (pts[:, 1] >= -0.5) & (pts[:, 1] < 4.5)
        exp = np.where(ok, img[1, np.clip(j, 0, 4)], -9.0)
    np.testing.assert_array_equal(out, exp)
    sc = ndi.map_coordinates(img, pts.T, order=0, mode="grid-constant", cval=-9.0)
    if mode == "zero":
        np.testing.assert_array_equal(out, sc)


@pytest.mark.parametrize("order,smode", [(0, "nearest"), (1, "nearest"), (3, "mirror")])
def test_itk_mode_inside_matches_scipy_and_outside_is_cval(order, smode):
    rng = np.random.default_rng(5)
    img = rng.normal(size=(8, 9, 10))
    pts = rng.uniform(-2, 11, size=(2000, 3))
    out = interpolate(img, pts, order=order, mode="itk", cval=7.0, backend="numpy")
    inside = np.all((pts >= -0.5) & (pts < np.array(img.shape) - 0.5), axis=1)
    assert 0 < inside.sum() < len(pts)
    np.testing.assert_array_equal(out[~inside], 7.0)
    exp = ndi.map_coordinates(img, pts[inside].T, order=order, mode=smode)
    np.testing.assert_allclose(out[inside], exp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order,interp", [(0, "sitkNearestNeighbor"), (1, "sitkLinear"), (3, "sitkBSpline")])
def test_itk_mode_matches_simpleitk_resample(order, interp):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(9)
    arr = ndi.gaussian_filter(rng.normal(size=(12, 13, 14)), 1.0).astype(np.float32)  # (z, y, x)
    spacing_xyz = (0.9, 1.1, 1.3)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin((1.0, -2.0, 0.5))
    ang = 0.2
    rot = np.array([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1.0]])
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(rot.ravel()))
    tx.SetTranslation((0.7, -1.2, 1.9))
    tx.SetCenter((6.0, 5.0, 9.0))
    res = sitk.Resample(img, img, tx, getattr(sitk, interp), -3.0, sitk.sitkFloat64)
    exp = sitk.GetArrayFromImage(res)
    # index (numpy order) -> world -> transformed world -> input index, folded into matrix/offset
    h = np.array(spacing_xyz[::-1])
    o = np.array(img.GetOrigin()[::-1])
    P = np.eye(3)[::-1]  # xyz <-> zyx
    A = P @ np.array(tx.GetMatrix()).reshape(3, 3) @ P
    c = P @ np.array(tx.GetCenter())
    t = P @ np.array(tx.GetTranslation())
    # x_out = o + h*i ; y = A (x_out - c) + c + t ; i_in = (y - o) / h
    M = np.diag(1 / h) @ A @ np.diag(h)
    off = np.diag(1 / h) @ (A @ (o - c) + c + t - o)
    out = warp(arr.astype(np.float64), matrix=M, offset=off, order=order, mode="itk", cval=-3.0, backend="numpy")
    inside = exp != -3.0
    assert 0.3 < inside.mean() < 1.0
    if order == 3:
        # ITK's B-spline decomposition converges to a slightly different tolerance; compare loosely
        np.testing.assert_allclose(out, exp, atol=1e-3)
    else:
        np.testing.assert_allclose(out, exp, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params())
def test_identity_and_integer_shift(backend):
    rng = np.random.default_rng(2)
    shape = _shape(backend, 3)
    img = rng.normal(size=shape).astype(np.float32)
    for order in (0, 1, 3):
        np.testing.assert_allclose(warp(img, order=order, backend=backend), img, atol=2e-6)
    disp = np.zeros(shape + (3,), np.float32)
    disp[..., 2] = 1.0
    out = warp(img, disp, mode="zero", backend=backend)
    np.testing.assert_array_equal(out[..., :-1], img[..., 1:])
    np.testing.assert_array_equal(out[..., -1], 0.0)


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("mode", ["zero", "border", "itk"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape,nch", [((9, 10, 11), 1), ((9, 10, 11), 3), ((1, 2, 5), 1), ((4, 1, 1), 2), ((3, 4, 2), 1)]
)
def test_linear3d_cpu_kernel_parity_edges(mode, dtype, shape, nch):
    """The 3-D linear CPU kernel against the reference: thin axes (length 1 and 2), channels, a displacement field
    with points far outside and non-finite entries, a pure affine map."""
    rng = np.random.default_rng(len(mode) * 10 + nch + shape[0])
    img = rng.normal(size=shape + ((nch,) if nch > 1 else ())).astype(dtype)
    disp = _disp(rng, shape, scale=2.0, dtype=dtype)
    special = np.array([[np.nan, 0, 0], [0, np.inf, 0], [-np.inf, 0, 0], [0, 0, 1e6]])
    flat = disp.reshape(-1, 3)
    flat[: len(special)] = special[: len(flat)]
    dm = np.diag([1 / 0.8, 1 / 1.2, 1 / 2.0])
    for kw in (dict(), dict(disp_matrix=dm, offset=(0.3, -0.7, 0.2))):
        with np.errstate(invalid="ignore"):  # 0 * inf in the reference's disp_matrix product
            ref = warp(img, disp, order=1, mode=mode, cval=-0.5, backend="numpy", **kw)
        out = warp(img, disp, order=1, mode=mode, cval=-0.5, backend="numba", **kw)
        np.testing.assert_allclose(out, ref, **_tol(dtype))
    A = np.eye(3) + rng.normal(scale=0.2, size=(3, 3))
    kw = dict(matrix=A, offset=rng.normal(size=3), out_shape=(5, 3, 4), order=1, mode=mode, cval=2.0)
    np.testing.assert_allclose(warp(img, backend="numba", **kw), warp(img, backend="numpy", **kw), **_tol(dtype))


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("mode", ["border", "itk"])
def test_scalar_linear3d_cpu_kernel_precision(mode):
    """The scalar linear 3-D CPU kernel (modes "border"/"itk") computes in the image's precision. float64: the
    reference's operations in the same order, so bitwise its values for a finite image (general matrix, offset and
    disp_matrix, points outside). float32: it differs from the float64 reference by the float32 rounding of coordinates
    up to ~70 voxels and of the weights, inside the 1e-5 parity tolerance. The uint64-index build (images of 2**32
    voxels and more) gives the uint32 build's values."""
    from classreg.kernels.warp import _flat, _numba_kernels

    rng = np.random.default_rng(11)
    shape = (40, 52, 70)
    img = ndi.gaussian_filter(rng.normal(size=shape), 1.0)
    disp = ndi.gaussian_filter(rng.normal(scale=8.0, size=shape + (3,)), (2, 2, 2, 0))
    A = np.eye(3) + rng.normal(scale=0.05, size=(3, 3))
    D = np.diag([1 / 0.8, 1 / 1.2, 1 / 2.0])
    kw = dict(matrix=A, offset=rng.normal(size=3), disp_matrix=D, order=1, mode=mode, cval=-0.5)
    ref = warp(img, disp, backend="numpy", **kw)
    if mode == "itk":
        assert 0.05 < np.mean(ref == -0.5) < 0.5
    np.testing.assert_array_equal(warp(img, disp, backend="numba", **kw), ref)
    img32, disp32 = img.astype(np.float32), disp.astype(np.float32)
    ref32 = warp(img32.astype(np.float64), disp32.astype(np.float64), backend="numpy", **kw)
    out32 = warp(img32, disp32, backend="numba", **kw)
    assert out32.dtype == np.float32
    err = np.abs(out32 - ref32)
    assert err.max() < 1e-5 * np.abs(ref32).max()  # measured 5e-6 relative to the largest value
    assert np.mean(err) < 1e-6  # measured 2e-7
    outs = []
    for it in ("uint32", "uint64"):
        out = np.empty(img32.size, np.float32)
        _numba_kernels()[f"_warp3_flat_cpu_1_float32_{it}"](
            img32.reshape(-1), disp32.reshape(-1), out, *shape, *shape, _flat(np.eye(3)), _flat(np.zeros(3)),
            _flat(D), True, mode == "itk", -0.5, False)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_field_cpu_kernel_parity(ndim, dtype):
    """ndim-channel images in mode "border" through a displacement field take the numba field kernel: the
    reference's values with a general matrix, offset and disp_matrix, thin axes, non-finite and far-away entries."""
    rng = np.random.default_rng(ndim + 10)
    for shape in ((9, 10, 11)[:ndim], (1, 2, 5)[:ndim], (4, 1, 3)[:ndim]):
        img = rng.normal(size=shape + (ndim,)).astype(dtype)
        disp = _disp(rng, shape, scale=2.0, dtype=dtype)
        flat = disp.reshape(-1, ndim)
        special = np.array([[np.nan, 0, 0], [0, np.inf, 0], [-np.inf, 0, 0], [0, 0, 1e6]])[:, :ndim]
        flat[: len(special)] = special[: len(flat)]
        A = np.eye(ndim) + rng.normal(scale=0.1, size=(ndim, ndim))
        D = np.diag([1 / 0.8, 1 / 1.2, 1 / 2.0][:ndim]) @ np.linalg.qr(rng.normal(size=(ndim, ndim)))[0]
        for kw in (dict(), dict(matrix=A, offset=rng.normal(size=ndim), disp_matrix=D)):
            with np.errstate(invalid="ignore"):  # 0 * inf in the reference's disp_matrix product
                ref = warp(img, disp, order=1, mode="border", cval=-0.5, backend="numpy", **kw)
            out = warp(img, disp, order=1, mode="border", cval=-0.5, backend="numba", **kw)
            np.testing.assert_allclose(out, ref, **_tol(dtype))


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("mode", ["zero", "itk", "border"])
@pytest.mark.parametrize("nch", [1, 3])
def test_linear3d_cpu_kernel_deterministic(mode, nch):
    """Bitwise the same result run to run and for 1 or 2 threads (every voxel is computed independently)."""
    import numba

    rng = np.random.default_rng(4)
    img = rng.normal(size=(23, 17, 29) + ((3,) if nch == 3 else ())).astype(np.float32)
    disp = _disp(rng, img.shape[:3], scale=3.0, dtype=np.float32)
    old = numba.get_num_threads()
    try:
        outs = []
        for nt in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(nt)
            outs.append(warp(img, disp, order=1, mode=mode, backend="numba"))
    finally:
        numba.set_num_threads(old)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_dtypes_and_no_input_modification():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 10, size=(6, 7)).astype(np.int16)
    out = warp(img, _disp(rng, (6, 7), 0.3))
    assert out.dtype == np.float32
    assert warp(img.astype(np.float64)).dtype == np.float64
    # non-contiguous views are accepted
    big = rng.normal(size=(12, 14))
    np.testing.assert_allclose(warp(big[::2, ::2], backend="numba"), big[::2, ::2], atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(order=2), ValueError, "order"),
        (dict(mode="wrap"), ValueError, "mode"),
        (dict(backend="torch"), ValueError, "backend"),
        (dict(matrix=np.eye(4)), ValueError, "spatial"),
        (dict(offset=[1.0, 2.0]), ValueError, "offset"),
        (dict(disp_matrix=np.eye(4)), ValueError, "disp_matrix"),
        (dict(out_shape=(4, 4, 0)), ValueError, "out_shape"),
        (dict(prefiltered=True), ValueError, "prefiltered"),
        (dict(cval="a"), TypeError, "cval"),
        (dict(matrix=np.full((3, 3), np.nan)), ValueError, "matrix"),
    ],
)
def test_warp_errors(kwargs, exc, match):
    img = np.zeros((5, 6, 7))
    with pytest.raises(exc, match=match):
        warp(img, **kwargs)


def test_warp_errors_disp_and_points():
    img = np.zeros((5, 6, 7))
    with pytest.raises(ValueError, match="disp"):
        warp(img, np.zeros((5, 6, 7, 2)))
    with pytest.raises(ValueError, match="out_shape"):
        warp(img, np.zeros((5, 6, 7, 3)), out_shape=(5, 6, 8))
    with pytest.raises(ValueError, match="image"):
        warp(np.zeros((5, 6, 7, 3, 2)), np.zeros((5, 6, 7, 3)))
    with pytest.raises(TypeError, match="image"):
        warp(np.zeros((5, 6), complex))
    with pytest.raises(ValueError, match="points"):
        interpolate(img, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="image"):
        interpolate(np.zeros((5, 6)), np.zeros((4, 3)))
