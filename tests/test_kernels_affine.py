"""The fused affine-family kernel (classreg.kernels.affine) against its reference, the parametric engine's
step-by-step path (backend="numpy": numpy sampling, numpy Mattes MI, the model's chain rule): value, gradient, the
share of valid samples and the reported NCC, for every affine-family model, 2-D and 3-D, with and without a moving
mask, samples partly outside the moving image, with either image gradient (interpolated central differences, or the
exact gradient of the linear interpolant, whose fused gradient is also checked against central differences of the
fused cost)."""
import numpy as np
import pytest
from classreg.kernels._backend import HAVE_NUMBA
from phantoms import smooth_image

import classreg as cr
from classreg.solvers.parametric.engine import LevelObjective
from classreg.solvers.parametric.models import MODELS, AffineModel
from classreg.solvers.parametric.sampling import Sampler

pytestmark = pytest.mark.skipif(not HAVE_NUMBA, reason="the fused kernel is numba-only")


def _pair(ndim, masked):
    rng = np.random.default_rng(ndim)
    shape = (40, 44) if ndim == 2 else (20, 22, 18)
    a = smooth_image(shape, rng, sigma=2.0)
    a = ((a - a.min()) / (a.max() - a.min())).astype(np.float32)
    fixed = cr.Image(a, (1.0,) * ndim)
    # the moving image is smaller and shifted: part of the samples fall outside it
    crop = tuple(slice(2, s - 1) for s in shape)
    moving = cr.Image(a[crop] ** 1.5, (1.0,) * ndim, origin=(2.0,) * ndim)
    mmask = None
    if masked:
        mmask = np.zeros(moving.shape, bool)
        mmask[tuple(slice(1, s - 1) for s in moving.shape)] = True
    return fixed, moving, mmask


def _objective(fixed, moving, mmask, kind, metric, backend, image_gradient="smoothed"):
    ndim = fixed.ndim
    c = fixed.index_to_world(((np.asarray(fixed.shape, float) - 1) / 2)[None])[0]
    return LevelObjective(fixed, moving, None, mmask, model=AffineModel(kind, ndim, c), pre=cr.Affine.identity(ndim),
                          metric=metric, sampler=Sampler("random_coordinate", 1500, fixed.shape),
                          rng=np.random.default_rng(0), bins=16, backend=backend, image_gradient=image_gradient)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("metric", ["mi", "nmi"])
@pytest.mark.parametrize("image_gradient", ["smoothed", "exact"])
def test_fused_matches_step_by_step_reference(ndim, kind, masked, metric, image_gradient):
    fixed, moving, mmask = _pair(ndim, masked)
    fast = _objective(fixed, moving, mmask, kind, metric, None, image_gradient)
    ref = _objective(fixed, moving, mmask, kind, metric, "numpy", image_gradient)
    assert fast._fused is not None and ref._fused is None
    # the exact gradient's stack holds the value (and mask) only
    assert fast.stack.shape[-1] == (1 if image_gradient == "exact" else 1 + ndim) + masked
    draw = ref.draw()
    rng = np.random.default_rng(5)
    scales = fast.model.scales(draw[0])
    p = fast.model.identity() + rng.normal(scale=0.3, size=fast.model.size) / np.sqrt(scales)
    v1, g1 = fast.evaluate(p, samples=draw)
    v0, g0 = ref.evaluate(p, samples=draw)
    # the same sums in another order (and the sample → index map as one matrix): rounding only
    assert abs(v1 - v0) <= 1e-10 * max(1.0, abs(v0))
    np.testing.assert_allclose(g1, g0, rtol=1e-8, atol=1e-10 * np.abs(g0).max())
    assert fast.last_valid == ref.last_valid and 0.3 < ref.last_valid < 1.0  # some samples were dropped
    assert abs(fast.last_similarity - ref.last_similarity) <= 1e-10
    if image_gradient == "exact":
        # the fused gradient is the derivative of the fused cost: central differences on the same draw, exact but for
        # samples whose ±h step crosses a voxel face (a kink of the linear interpolant) and the differences'
        # rounding (measured ≤ 6e-9 relative over these cases)
        fd = []
        for k in range(len(p)):
            e = np.zeros_like(p)
            e[k] = 1e-6 / np.sqrt(scales[k])
            fd.append((fast.evaluate(p + e, samples=draw)[0] - fast.evaluate(p - e, samples=draw)[0]) / (2 * e[k]))
        assert np.linalg.norm(g1 - fd) <= 1e-4 * np.linalg.norm(fd), (g1, fd)


def test_fused_path_is_not_taken_where_it_does_not_apply():
    fixed, moving, _ = _pair(2, False)
    assert _objective(fixed, moving, None, "rigid", "ncc", None)._fused is None
    assert _objective(fixed, moving, None, "rigid", {"mi": 1.0, "ncc": 0.5}, None)._fused is None


def test_fused_refuses_too_few_valid_samples():
    fixed, moving, _ = _pair(2, False)
    obj = _objective(fixed, moving, None, "translation", "mi", None)
    far = obj.model.identity() + 1000.0  # every sample maps outside the moving image
    with pytest.raises(ValueError, match="too many samples map outside"):
        obj.evaluate(far)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", ["rigid", "affine"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("metric", ["mi", "nmi"])
@pytest.mark.parametrize("image_gradient", ["smoothed", "exact"])
def test_parallel_sampled_kernel_matches_the_serial_one(monkeypatch, ndim, kind, masked, metric, image_gradient):
    """The parallel kernel that also samples the fixed image (taken for random-coordinate draws whose scattered
    reads are many enough for two threads, on numba's TBB layer) against the serial fused kernel on the same draw:
    the same sums in another order, and the same bits for any thread count (its slices are fixed); its serial build
    (one slice: the engine's default path for random-coordinate draws) the same up to the order of the sums."""
    import numba

    from classreg.kernels import _backend
    from classreg.kernels.affine import affine_mi_sampled_kernel
    from classreg.solvers.parametric import engine

    monkeypatch.setattr(_backend, "SERIAL_BELOW", 0)
    monkeypatch.setattr(engine, "_tbb_layer", lambda: True)  # taken under TBB only (engine._tbb_layer)
    fixed, moving, mmask = _pair(ndim, masked)
    obj = _objective(fixed, moving, mmask, kind, metric, None, image_gradient)
    assert obj._sampled is not None and obj._fused is not None
    rng = np.random.default_rng(7)
    p = obj.model.identity() + rng.normal(scale=0.3, size=obj.model.size) / np.sqrt(obj.model.scales(obj.draw()[0]))
    idx = obj.indices(0)
    v0, g0 = obj._evaluate_fused(p, *obj._points(idx))
    valid0, sim0 = obj.last_valid, obj.last_similarity
    old = numba.get_num_threads()
    runs = []
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            runs.append((*obj._evaluate_sampled(p, idx), obj.last_valid, obj.last_similarity))
    finally:
        numba.set_num_threads(old)
    v1, g1, valid1, sim1 = runs[0]
    assert abs(v1 - v0) <= 1e-10 * max(1.0, abs(v0))
    np.testing.assert_allclose(g1, g0, rtol=1e-8, atol=1e-10 * np.abs(g0).max())
    assert valid1 == valid0 and 0.3 < valid0 < 1.0 and abs(sim1 - sim0) <= 1e-10
    for other in runs[1:]:
        assert other[0] == v1 and np.array_equal(other[1], g1) and other[3] == sim1
    monkeypatch.setattr(engine, "_tbb_layer", lambda: False)  # off numba's TBB layer: the serial build
    serial = _objective(fixed, moving, mmask, kind, metric, None, image_gradient)
    assert serial._sampled is affine_mi_sampled_kernel(ndim, exact_gradient=image_gradient == "exact", parallel=False)
    v2, g2 = serial._evaluate_sampled(p, idx)
    assert abs(v2 - v0) <= 1e-10 * max(1.0, abs(v0))
    np.testing.assert_allclose(g2, g0, rtol=1e-8, atol=1e-10 * np.abs(g0).max())
    assert serial.last_valid == valid0 and abs(serial.last_similarity - sim0) <= 1e-10


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_grad_at_numba_matches_numpy_and_central_differences(ndim):
    """classreg.kernels.sampling.linear_grad_at: the numba kernel against the numpy reference (value, gradient, mask;
    the same points inside), and the gradient against central differences of the interpolated value away from voxel
    faces (where the linear interpolant is smooth)."""
    from classreg.kernels.sampling import linear_at, linear_grad_at

    rng = np.random.default_rng(ndim)
    shape = (9, 8) if ndim == 2 else (7, 8, 6)
    stack = np.stack([rng.random(shape), (rng.random(shape) > 0.3).astype(float)], -1).astype(np.float32)
    pts = rng.uniform(-0.5, np.asarray(shape) - 0.5, size=(400, ndim))
    fast, inside = linear_grad_at(stack, pts, backend="numba")
    ref, inside_ref = linear_grad_at(stack, pts, backend="numpy")
    assert np.array_equal(inside, inside_ref) and 0.5 < inside.mean() < 1.0
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-12)  # the same weights in another order
    # value and mask as linear_at's
    np.testing.assert_allclose(fast[:, [0, ndim + 1]], linear_at(stack, pts, backend="numpy")[0], rtol=1e-12)
    p = pts[inside]
    keep = np.all(np.abs(p - np.round(p)) > 1e-3, axis=1) & np.all(p < np.asarray(shape) - 1 - 1e-3, axis=1)
    h = 1e-5
    for d in range(ndim):
        e = np.zeros(ndim)
        e[d] = h
        fd = (linear_at(stack, p[keep] + e)[0][:, 0] - linear_at(stack, p[keep] - e)[0][:, 0]) / (2 * h)
        # the interpolant is polynomial inside a cell: rounding of float64 differences only
        np.testing.assert_allclose(fast[keep, 1 + d], fd, rtol=0, atol=1e-8)
