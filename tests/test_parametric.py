"""register_affine / register_bspline and the parametric engine: gradients of every metric × transform against
central differences, samplers (seeded, reproducible, inside the mask), recovery of known transforms in 2-D and 3-D,
the global start for large rotations, determinism, masks, progress/stop and input errors."""
import numpy as np
import pytest
from phantoms import smooth_image

import classreg as cr
from classreg.solvers.parametric.engine import LevelObjective, sample_metric
from classreg.solvers.parametric.models import MODELS, AffineModel
from classreg.solvers.parametric.sampling import Sampler


def _phantom(ndim, shape=None, seed=0, spacing=None):
    rng = np.random.default_rng(seed)
    shape = shape or ((48, 52) if ndim == 2 else (24, 26, 22))
    a = smooth_image(shape, rng, sigma=2.5)
    a = (a - a.min()) / (a.max() - a.min())
    return cr.Image(a.astype(np.float32), spacing or (1.0,) * ndim)


def _tre(fixed, t, truth):
    pts = fixed.grid_points().reshape(-1, fixed.ndim)
    return float(np.linalg.norm(t.map_points(pts) - truth.map_points(pts), axis=1).mean())


def _center(img):
    return img.index_to_world(((np.asarray(img.shape, float) - 1) / 2)[None])[0]


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("metric", ["mi", "nmi", "ncc", "ssd"])
def test_gradient_matches_central_differences(ndim, kind, metric):
    """The analytic gradient (model chain rule × interpolated image gradient × metric derivative) against central
    differences of the sampled cost. The image gradient is ITK's central difference interpolated linearly, the
    derivative of the cost only up to the discretisation of a smooth image (σ 2.5 voxels: ~3 % low): 6 % of the
    gradient's norm."""
    big = _phantom(ndim, shape=(64, 68) if ndim == 2 else (34, 36, 32), seed=1)
    crop = tuple(slice(8, s - 8) for s in big.shape)  # the moving image extends 8 voxels beyond the fixed one
    fixed = cr.Image(big.data[crop], big.spacing, origin=(8.0,) * ndim)
    moving = big.like(np.asarray(big.data) ** 1.5) if metric in ("mi", "nmi") else big
    mdl = AffineModel(kind, ndim, _center(fixed))
    rng = np.random.default_rng(3)
    smp = Sampler("random_coordinate", 3000, fixed.shape)
    obj = LevelObjective(fixed, moving, None, None, model=mdl, pre=cr.Affine.identity(ndim), metric=metric,
                         sampler=smp, rng=rng, bins=16)
    scales = mdl.scales(obj.draw(5000)[0])
    p = mdl.identity() + rng.normal(scale=0.6, size=mdl.size) / np.sqrt(scales)
    draw = obj.draw()
    _, g = obj.evaluate(p, samples=draw)
    h = 1e-4 / np.sqrt(scales)
    fd = np.array([(obj.evaluate(p + h[k] * e, samples=draw)[0] - obj.evaluate(p - h[k] * e, samples=draw)[0])
                   / (2 * h[k]) for k, e in enumerate(np.eye(mdl.size))])
    gs, fds = g / np.sqrt(scales), fd / np.sqrt(scales)  # compare in the scaled parameters
    assert np.linalg.norm(gs - fds) <= 0.06 * np.linalg.norm(fds), (gs, fds)


@pytest.mark.parametrize("metric", ["mi", "nmi", "ncc", "ssd"])
def test_sample_metric_derivative_is_exact(metric):
    rng = np.random.default_rng(0)
    f = rng.random(400)
    m = 0.7 * f ** 2 + 0.1 * rng.random(400)
    lim = ((f.min() - 0.05, f.max() + 0.05), (m.min() - 0.05, m.max() + 0.05))
    _, g = sample_metric(metric, f, m, bins=16, fixed_limits=lim[0], moving_limits=lim[1])
    for j in (0, 17, 123):
        e = np.zeros_like(m)
        e[j] = 1e-6
        fd = (sample_metric(metric, f, m + e, bins=16, fixed_limits=lim[0], moving_limits=lim[1])[0]
              - sample_metric(metric, f, m - e, bins=16, fixed_limits=lim[0], moving_limits=lim[1])[0]) / 2e-6
        assert abs(fd - g[j]) <= 1e-6 * max(1.0, np.abs(g).max() * len(m)), (j, fd, g[j])


def test_model_round_trip_and_scales():
    for ndim in (2, 3):
        c = np.arange(ndim) + 3.0
        for kind in MODELS:
            mdl = AffineModel(kind, ndim, c)
            rng = np.random.default_rng(ndim)
            p = mdl.identity() + 0.05 * rng.normal(size=mdl.size)
            back = mdl.from_affine(mdl.to_affine(p))
            np.testing.assert_allclose(mdl.to_affine(back).homogeneous, mdl.to_affine(p).homogeneous, atol=1e-10)
            pts = rng.normal(size=(50, ndim)) * 20
            s = mdl.scales(pts)
            jac = np.stack([mdl.displacement(mdl.identity(), e, pts) for e in np.eye(mdl.size)], -1)
            np.testing.assert_allclose(s, np.mean(np.sum(jac ** 2, axis=1), axis=0), rtol=1e-10)


# ------------------------------------------------------------------------------------------------ samplers
def test_samplers_are_seeded_and_respect_the_mask():
    shape = (40, 30)
    mask = np.zeros(shape, bool)
    mask[5:20, 10:25] = True
    for kind in ("random_coordinate", "random", "random_sparse_mask"):
        a = Sampler(kind, 1000, shape, mask).draw(np.random.default_rng(7))
        b = Sampler(kind, 1000, shape, mask).draw(np.random.default_rng(7))
        assert np.array_equal(a, b) and a.shape == (1000, 2)
        near = np.rint(a).astype(int)
        assert mask[near[:, 0], near[:, 1]].all(), kind
    pts = Sampler("random_coordinate", 20000, shape).draw(np.random.default_rng(0))
    # uniform on the voxel-centre box: mean at the centre, variance L²/12 (4 standard errors)
    for d, n in enumerate(shape):
        assert abs(pts[:, d].mean() - (n - 1) / 2) < 4 * (n - 1) / np.sqrt(12 * len(pts))
        assert abs(pts[:, d].var() - (n - 1) ** 2 / 12) < 0.05 * (n - 1) ** 2 / 12
    vox = Sampler("random", 5000, shape).draw(np.random.default_rng(0))
    assert np.array_equal(vox, np.rint(vox))
    assert len(Sampler("full", 0, shape, mask).draw(None)) == mask.sum()
    assert len(Sampler("grid", 0, shape, None, grid_step=3).draw(None)) == 14 * 10
    with pytest.raises(ValueError, match="fixed mask"):
        Sampler("random_sparse_mask", 100, shape)


# ------------------------------------------------------------------------------------------------ recovery
FAST = dict(shrink_factors=(2, 1), iterations=(80, 120), samples=1024)


@pytest.mark.parametrize("kind", ["translation", "rigid", "similarity", "affine"])
def test_register_affine_recovers_known_2d_transforms(kind):
    fixed = _phantom(2, shape=(64, 60), spacing=(1.2, 0.9))
    c = _center(fixed)
    truth = {"translation": cr.Affine.from_translation((2.5, -1.8)),
             "rigid": cr.Affine.euler([np.radians(8)], translation=(2.0, -1.0), center=c),
             "similarity": cr.Affine.similarity(1.06, [np.radians(-6)], translation=(1.0, 1.5), center=c),
             "affine": cr.Affine(np.array([[1.05, 0.06], [-0.04, 0.95]]), (1.5, -1.0), c)}[kind]
    moving = cr.resample(fixed, truth.inverse(), reference=fixed, interpolation="bspline")
    res = cr.register_affine(fixed, moving, transform=kind, metric="ncc", **FAST)
    assert _tre(fixed, res.transform, truth) < 0.1, res.metrics
    assert res.params["transform"] == kind and len(res.history) == sum(FAST["iterations"])
    assert isinstance(res.transform, cr.Affine)


def test_register_affine_3d_mi_with_a_different_contrast():
    fixed = _phantom(3, shape=(32, 34, 30), spacing=(1.0, 1.1, 1.3))
    c = _center(fixed)
    truth = cr.Affine.euler(np.radians([4.0, -3.0, 5.0]), translation=(1.5, -1.0, 2.0), center=c)
    moving = cr.resample(fixed, truth.inverse(), reference=fixed)
    moving = moving.like(1.0 - np.asarray(moving.data) ** 2)  # non-linear, inverted contrast
    res = cr.register_affine(fixed, moving, transform="rigid", metric="mi", **FAST)
    assert _tre(fixed, res.transform, truth) < 0.15, res.metrics


def test_global_init_recovers_a_large_rotation():
    fixed = _phantom(2, shape=(64, 64), seed=4)
    truth = cr.Affine.euler([np.radians(130)], translation=(3.0, -2.0), center=_center(fixed))
    moving = cr.resample(fixed, truth.inverse(), reference=fixed)
    local = cr.register_affine(fixed, moving, transform="rigid", metric="ncc", **FAST)
    assert _tre(fixed, local.transform, truth) > 5.0  # a local method does not reach 130°
    res = cr.register_affine(fixed, moving, transform="rigid", metric="ncc", init="global", **FAST)
    assert _tre(fixed, res.transform, truth) < 0.2, res.metrics
    assert res.params["init"] == "global"


def test_same_seed_same_result_and_masks():
    fixed = _phantom(2, shape=(56, 56), seed=2)
    truth = cr.Affine.euler([np.radians(5)], translation=(1.0, 2.0), center=_center(fixed))
    moving = cr.resample(fixed, truth.inverse(), reference=fixed)
    a = cr.register_affine(fixed, moving, transform="rigid", seed=3, **FAST)
    b = cr.register_affine(fixed, moving, transform="rigid", seed=3, **FAST)
    assert np.array_equal(a.transform.homogeneous, b.transform.homogeneous)
    c = cr.register_affine(fixed, moving, transform="rigid", seed=4, **FAST)
    assert not np.array_equal(a.transform.homogeneous, c.transform.homogeneous)
    mask = np.zeros(fixed.shape, np.uint8)
    mask[8:48, 8:48] = 1
    m = cr.register_affine(fixed, moving, transform="rigid", fixed_mask=mask, moving_mask=mask,
                           sampler="random_sparse_mask", **FAST)
    assert _tre(fixed, m.transform, truth) < 0.1 and m.params["fixed_mask"] is True


@pytest.mark.parametrize("optimiser", ["gd", "rsgd"])
def test_other_optimisers_converge(optimiser):
    fixed = _phantom(2, shape=(56, 56), seed=5)
    truth = cr.Affine.from_translation((1.5, -2.0))
    moving = cr.resample(fixed, truth.inverse(), reference=fixed)
    kw = dict(FAST, sampler="full") if optimiser == "rsgd" else FAST
    res = cr.register_affine(fixed, moving, transform="translation", metric="ssd", optimiser=optimiser, **kw)
    assert _tre(fixed, res.transform, truth) < 0.1


def test_moments_init_and_initial_transform():
    yy, xx = np.mgrid[:50, :50]
    fixed = cr.Image(np.exp(-((yy - 22.0) ** 2 + (xx - 27.0) ** 2) / 60.0).astype(np.float32), (1.0, 1.0))
    shift = cr.Affine.from_translation((4.0, -3.0))
    moving = cr.resample(fixed, shift.inverse(), reference=fixed)
    res = cr.register_affine(fixed, moving, transform="translation", init="moments", iterations=0,
                             shrink_factors=(1,))
    assert _tre(fixed, res.transform, shift) < 0.05  # a blob on a blank background: the centres of mass match
    res = cr.register_affine(fixed, moving, transform="translation", init=shift, iterations=(0,),
                             shrink_factors=(1,))
    assert _tre(fixed, res.transform, shift) < 1e-9


def test_callback_stops_and_events():
    fixed = _phantom(2, seed=7)
    seen = []

    def cb(ev):
        seen.append(ev.stage)
        if ev.stage == "iteration" and ev.iteration == 5:
            raise cr.StopRegistration

    res = cr.register_affine(fixed, fixed, transform="rigid", callback=cb, **FAST)
    assert not res.converged and res.stop_reason == "stopped by callback"
    assert seen[:2] == ["start", "level_start"] and seen.count("iteration") == 6


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_gets_clear_errors():
    fixed = _phantom(2, seed=8)
    far = cr.Image(fixed.data, fixed.spacing, origin=(500.0, 500.0))
    with pytest.raises(ValueError, match="outside the moving image"):
        cr.register_affine(fixed, far, init="identity", **FAST)
    with pytest.raises(ValueError, match="fixed_mask is empty"):
        cr.register_affine(fixed, fixed, fixed_mask=np.zeros(fixed.shape, np.uint8))
    with pytest.raises(ValueError, match="too few samples"):
        cr.register_affine(fixed, fixed, samples=64)
    with pytest.raises(ValueError, match="fixed mask"):
        cr.register_affine(fixed, fixed, sampler="random_sparse_mask")
    with pytest.raises(ValueError, match="transform must be one of"):
        cr.register_affine(fixed, fixed, transform="bspline")
    with pytest.raises(TypeError, match="init must be"):
        cr.register_affine(fixed, fixed, init=cr.DisplacementField.identity(fixed))
    with pytest.raises(ValueError, match="init must be"):
        cr.register_affine(fixed, fixed, init="centre")
