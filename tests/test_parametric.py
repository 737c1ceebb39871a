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


def _phantom(ndim, shape=None, seed=0, spacing=None, sigma=2.5):
    rng = np.random.default_rng(seed)
    shape = shape or ((48, 52) if ndim == 2 else (24, 26, 22))
    a = smooth_image(shape, rng, sigma=sigma)
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


def test_random_coordinate_draws_and_the_large_draw_size():
    """The hot draw scales in place by a per-row copy of the box (rebuilt when the count changes): the same numbers
    as ``rng.random((n, ndim)) * hi``. The level's large draw (gain estimation, final metric) takes ten iterations'
    samples within [20 000, 100 000]."""
    from types import SimpleNamespace

    from classreg.solvers.parametric.register import _Engine

    shape = (40, 30)
    smp = Sampler("random_coordinate", 500, shape)
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    for n in (None, 2000, None, 7, 7):
        got = smp.draw(rng, n)
        assert np.array_equal(got, ref.random((500 if n is None else n, 2)) * (np.asarray(shape) - 1.0))
    def count(samples):
        return _Engine.exact_count(SimpleNamespace(samples=samples))

    assert count(2048) == 20480 and count(1000) == 20000 and count(20000) == 100000


# ------------------------------------------------------------------------------------------------ recovery
FAST = {"shrink_factors": (2, 1), "iterations": (80, 120), "samples": 1024}


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


@pytest.mark.slow  # a 3-D registration (~6 s with a cold numba cache)
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


@pytest.mark.parametrize("optimiser", ["gd", "rsgd", "lbfgs"])
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
    with pytest.raises(ValueError, match="do not overlap in physical space"):
        cr.register_affine(fixed, far, init="identity", **FAST)
    edge = cr.Image(fixed.data, fixed.spacing, origin=(45.0, 0.0))   # overlaps, but < 25 % of samples inside
    with pytest.raises(ValueError, match="outside the moving image"):
        cr.register_affine(fixed, edge, init="identity", **FAST)
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


# ------------------------------------------------------------------------------------------------ B-spline
def _bspline_pair(seed=0, amplitude=2.0):
    """A smooth phantom and the same phantom warped by a known smooth B-spline map (fixed → moving)."""
    fixed = _phantom(2, shape=(64, 64), seed=seed)
    truth = cr.BSplineTransform.on_image(fixed, 16.0)
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=amplitude, size=truth.coefficients.shape)
    truth = truth.with_coefficients(c)
    moving = cr.resample(fixed, truth.inverse(reference=fixed), reference=fixed, interpolation="bspline")
    return fixed, moving, truth


@pytest.mark.parametrize("kind", ["mi", "ssd"])
def test_bspline_gradient_matches_central_differences(kind):
    from classreg.solvers.parametric.bspline import BSplineModel

    # a smoother phantom than above: the interpolated central-difference gradient of the image converges to the
    # derivative as O(h²/σ²); at σ = 4 voxels the chain rule through the B-spline is checked to 6 %
    big = _phantom(2, shape=(64, 68), seed=1, sigma=4.0)
    fixed = cr.Image(big.data[8:-8, 8:-8], big.spacing, origin=(8.0, 8.0))
    mdl = BSplineModel.over(fixed, cr.Affine.identity(2), (12.0, 12.0), bending_weight=0.5)
    rng = np.random.default_rng(0)
    obj = LevelObjective(fixed, big, None, None, model=mdl, pre=cr.Affine.identity(2), metric=kind,
                         sampler=Sampler("random_coordinate", 3000, fixed.shape), rng=rng, bins=16)
    p = rng.normal(scale=0.3, size=mdl.size)
    draw = obj.draw()
    _, g = obj.evaluate(p, samples=draw)
    idx = np.argsort(-np.abs(g))[:6]  # the coefficients that matter most
    fd = []
    for k in idx:
        e = np.zeros_like(p)
        e[k] = 1e-4
        fd.append((obj.evaluate(p + e, samples=draw)[0] - obj.evaluate(p - e, samples=draw)[0]) / 2e-4)
    assert np.linalg.norm(g[idx] - fd) <= 0.06 * np.linalg.norm(fd), (g[idx], fd)


@pytest.mark.parametrize("folds", ["project", "compose", "allow"])
def test_register_bspline_recovers_a_known_deformation(folds):
    fixed, moving, truth = _bspline_pair()
    pts = fixed.grid_points()[8:-8, 8:-8].reshape(-1, 2)
    before = np.linalg.norm(pts - truth.map_points(pts), axis=1).mean()
    res = cr.register_bspline(fixed, moving, grid_spacing=16.0, metric="ssd", folds=folds,
                              shrink_factors=(2, 1), iterations=(150, 200), samples=2048)
    err = np.linalg.norm(res.transform.map_points(pts) - truth.map_points(pts), axis=1).mean()
    assert err < 0.25 * before, (err, before)
    assert res.metrics["percent_det_nonpositive"] == 0.0 and res.params["folds"] == folds
    again = cr.register_bspline(fixed, moving, grid_spacing=16.0, metric="ssd", folds=folds,
                                shrink_factors=(2, 1), iterations=(150, 200), samples=2048)
    assert np.array_equal(again.transform.map_points(pts), res.transform.map_points(pts))  # same seed, same bits


@pytest.mark.slow  # two registrations with a large deformation
def test_fold_free_keeps_every_piece_injective_where_the_plain_grid_folds():
    """A large random deformation: the plain refined grid folds, the fold-free composition never does (every
    piece within Choi & Lee's bound)."""
    from classreg.solvers.parametric.register import CHOI_LEE_K

    fixed, moving, _ = _bspline_pair(seed=3, amplitude=8.0)
    kw = {"grid_spacing": 8.0, "metric": "ssd", "shrink_factors": (2, 1), "iterations": (100, 150), "samples": 1024,
              "max_step": 6.0}  # long first steps: the plain grid overshoots into folds (3 % of the image)
    plain = cr.register_bspline(fixed, moving, folds="allow", **kw)
    safe = cr.register_bspline(fixed, moving, folds="compose", **kw)
    assert plain.metrics["percent_det_nonpositive"] > 0.0
    assert safe.metrics["percent_det_nonpositive"] == 0.0 and safe.metrics["min_det"] > 0.0
    parts = [t for t in safe.transform.transforms if isinstance(t, cr.BSplineTransform)] \
        if isinstance(safe.transform, cr.Chain) else [safe.transform]
    for t in parts:
        limit = np.asarray(t.grid_spacing) / CHOI_LEE_K[2]
        assert np.all(np.abs(t.coefficients @ t.grid_direction) <= limit + 1e-12)


def test_projected_folds_keep_the_floor_where_the_plain_grid_folds():
    """A deformation on which the plain refined grid folds (1.6 % of the image): folds="project" keeps det J ≥
    min_det_j at every voxel centre — central differences (as reported) and the analytic det of the returned
    B-spline — with one grid, and still recovers the known map (the recovery bound of the test above)."""
    from classreg.solvers.parametric.bspline import BSplineModel
    from classreg.solvers.parametric.folds import FoldProjection

    fixed, moving, truth = _bspline_pair(seed=1, amplitude=6.0)
    kw = {"grid_spacing": 8.0, "metric": "ssd", "shrink_factors": (2, 1), "iterations": (100, 150), "samples": 1024}
    plain = cr.register_bspline(fixed, moving, folds="allow", **kw)
    res = cr.register_bspline(fixed, moving, folds="project", min_det_j=0.05, **kw)
    assert plain.metrics["percent_det_nonpositive"] > 0.5
    assert res.metrics["min_det"] >= 0.05 and res.metrics["fold_projections"] > 0
    t = res.transform.transforms[-1] if isinstance(res.transform, cr.Chain) else res.transform
    assert isinstance(t, cr.BSplineTransform)  # one grid, not a chain of pieces
    model = BSplineModel(t)
    pre = res.transform.transforms[0] if isinstance(res.transform, cr.Chain) else cr.Affine(np.eye(2))
    assert FoldProjection(model, fixed, pre, 0.05).dets(t.coefficients.ravel()).min() >= 0.05
    pts = fixed.grid_points()[8:-8, 8:-8].reshape(-1, 2)
    before = np.linalg.norm(pts - truth.map_points(pts), axis=1).mean()
    err = np.linalg.norm(res.transform.map_points(pts) - truth.map_points(pts), axis=1).mean()
    assert err < 0.25 * before, (err, before)


def test_fold_projection_is_local_exact_and_idempotent():
    """FoldProjection on a folding grid under a rotated, scaled initial transform: its det J is the map's (central
    differences of T = B ∘ pre at the voxel centres, step 1e-4 mm), the projection meets the floor at every voxel,
    moves only control points near the voxels that were below the target, and leaves a feasible grid alone."""
    from classreg.solvers.parametric.bspline import BSplineModel
    from classreg.solvers.parametric.folds import FoldProjection

    fixed = cr.Image(np.zeros((40, 48)), spacing=(1.0, 1.5))
    a = 0.3
    pre = cr.Affine(1.1 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]), [2.0, -1.0])
    model = BSplineModel.over(fixed, pre, np.array([8.0, 8.0]))
    c = np.random.default_rng(0).normal(scale=6.0, size=model.shape)
    proj = FoldProjection(model, fixed, pre, 0.1)
    det = proj.dets(c.ravel())
    assert det.min() < 0  # the random grid folds
    chain = cr.Chain([pre, model.to_transform(c.ravel())])
    x = fixed.grid_points().reshape(-1, 2)[::7]
    h = 1e-4
    cols = [(chain.map_points(x + h * e) - chain.map_points(x - h * e)) / (2 * h) for e in np.eye(2)]
    fd = np.linalg.det(np.stack(cols, axis=-1))
    np.testing.assert_allclose(det[::7], fd, rtol=1e-5, atol=1e-6)
    new = proj(c.ravel())
    assert proj.dets(new).min() >= 0.1
    low = np.flatnonzero(det < proj.target)
    from classreg.kernels.bspline import taps

    lin, valid, _ = taps(proj._points(low), model.shape[:-1])
    moved = np.flatnonzero(np.any(new.reshape(-1, 2) != c.reshape(-1, 2), axis=1))
    assert set(moved) <= set(lin[valid].ravel())
    assert proj(new) is None


def test_register_bspline_rejects_bad_fold_options():
    fixed, moving, _ = _bspline_pair()
    with pytest.raises(ValueError, match="folds"):
        cr.register_bspline(fixed, moving, folds="never")
    with pytest.raises(ValueError, match="min_det_j"):
        cr.register_bspline(fixed, moving, min_det_j=1.0)


def test_bending_penalty_smooths_the_map():
    fixed, moving, _ = _bspline_pair(seed=2)
    kw = {"grid_spacing": 8.0, "shrink_factors": (2, 1), "iterations": (80, 100), "samples": 1024, "folds": "allow"}
    free = cr.register_bspline(fixed, moving, bending_weight=0.0, **kw)
    stiff = cr.register_bspline(fixed, moving, bending_weight=2000.0, **kw)  # BE here ~4e-4 mm⁻²: MI-sized at 2000
    assert stiff.metrics["bending_energy"] < 0.5 * free.metrics["bending_energy"]


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("rotated", [False, True])
def test_dense_map_equals_the_map_at_the_voxel_points(nd, rotated):
    """register_bspline's final map on the voxel grid by the grid kernel (_dense_map: separable for an axis-aligned
    init, the general kernel for a rotated one, the affine part broadcast) equals B(pre(x)) − x evaluated at the
    voxel points (1e-9 mm); a grid that does not cover the image falls back (None)."""
    from classreg.solvers.parametric.bspline import BSplineModel
    from classreg.solvers.parametric.register import _dense_map

    rng = np.random.default_rng(nd)
    shape = (20, 22, 18)[:nd]
    fixed = cr.Image(np.zeros(shape), (1.2, 0.9, 1.1)[:nd], origin=(3.0, -2.0, 1.0)[:nd])
    if rotated:
        t = 0.2
        rot = np.eye(nd)
        rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
        pre = cr.Affine(1.05 * rot, (0.7, -0.4, 0.3)[:nd], center=fixed.index_to_world([np.array(shape) / 2.0])[0])
    else:
        pre = cr.Affine(np.eye(nd), (0.7, -0.4, 0.3)[:nd])
    mdl = BSplineModel.over(fixed, pre, 6.0)
    p = rng.normal(scale=1.5, size=mdl.size)
    x = fixed.grid_points().reshape(-1, nd)
    ref = (mdl.map_nodes(p, pre.map_points(x)) - x).reshape(*shape, nd)
    got = _dense_map(mdl, p, fixed, pre)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    far = cr.Affine(np.eye(nd), (500.0,) * nd)
    assert _dense_map(mdl, p, fixed, far) is None


def test_ssd_on_images_of_different_intensity_scales_warns(caplog):
    """Mean squares on a pair whose intensity spreads differ 100× logs a warning naming both; MI, or SSD on a pair of
    one scale, does not."""
    fixed, moving, _ = _bspline_pair(seed=2)
    bright = cr.Image.from_array(100.0 * moving.numpy(), spacing=moving.spacing, origin=moving.origin)
    kw = {"shrink_factors": (1,), "iterations": (2,), "samples": 256}
    with caplog.at_level("WARNING", logger="classreg"):
        cr.register_affine(fixed, moving, metric="ssd", **kw)
        cr.register_affine(fixed, bright, metric="mi", **kw)
        assert "ssd" not in caplog.text
        cr.register_affine(fixed, bright, metric="ssd", **kw)
        cr.register_bspline(fixed, bright, metric_weights={"mi": 1.0, "ssd": 0.1}, **kw)
    warned = [r.getMessage() for r in caplog.records if "metric 'ssd' compares raw intensities" in r.getMessage()]
    assert len(warned) == 2 and "register_affine" in warned[0] and "register_bspline" in warned[1]
    ratio = 100.0 * moving.numpy().std() / fixed.numpy().std()
    assert f"differ by {ratio:.0f}×" in warned[0]


def test_default_bending_weight_per_metric():
    """None resolves per metric (BENDING_DEFAULTS), SSD's in units of the fixed intensities' variance (inside the
    mask), a weighted sum to the weighted sum; the resolved weight is what the run used and records."""
    from classreg.solvers.parametric.register import BENDING_DEFAULTS, default_bending_weight

    fixed, moving, _ = _bspline_pair(seed=2)
    a = fixed.numpy().astype(np.float64)
    mask = np.zeros(fixed.shape, bool)
    mask[8:40, 10:50] = True
    assert default_bending_weight("mi", fixed) == BENDING_DEFAULTS["mi"] == 30.0
    assert default_bending_weight("ssd", fixed) == pytest.approx(BENDING_DEFAULTS["ssd"] * a.var())
    assert default_bending_weight("ssd", fixed, mask) == pytest.approx(BENDING_DEFAULTS["ssd"] * a[mask].var())
    scaled = cr.Image.from_array(10.0 * a, spacing=fixed.spacing, origin=fixed.origin)
    assert default_bending_weight("ssd", scaled) == pytest.approx(100 * default_bending_weight("ssd", fixed))
    assert default_bending_weight({"mi": 1.0, "nmi": 0.5}, fixed) == pytest.approx(30.0 + 0.5 * 10.0)
    kw = {"grid_spacing": 8.0, "shrink_factors": (2, 1), "iterations": (20, 20), "samples": 512}
    res = cr.register_bspline(fixed, moving, **kw)
    same = cr.register_bspline(fixed, moving, bending_weight=30.0, **kw)
    assert res.params["bending_weight"] == 30.0
    np.testing.assert_array_equal(res.transform.parameters, same.transform.parameters)
    with pytest.raises(ValueError, match="unknown metric"):
        default_bending_weight("cc", fixed)


def test_command_line_affine_and_bspline(tmp_path):
    from classreg.cli import main

    fixed, moving, _ = _bspline_pair()
    cr.save(fixed, tmp_path / "f.nii.gz")
    cr.save(moving, tmp_path / "m.nii.gz")
    assert main(["register", "affine", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
                 str(tmp_path / "a"), "--transform", "rigid", "--iterations", "20", "20", "20", "--quiet",
                 "--no-qc", "--metric-weights", "mi=1,ncc=0.5", "--interpolation", "bspline3"]) == 0
    a = cr.load_result(tmp_path / "a")
    assert isinstance(a.transform, cr.Affine) and a.params["transform"] == "rigid"
    assert a.params["metric"] == "1*mi+0.5*ncc" and a.params["interpolation"] == "bspline3"
    assert main(["register", "bspline", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
                 str(tmp_path / "b"), "--init", str(tmp_path / "a" / "transform.tfm"), "--grid-spacing", "16",
                 "--iterations", "20", "20", "20", "--quiet", "--no-qc"]) == 0
    b = cr.load_result(tmp_path / "b")
    pts = fixed.grid_points()[10:-10:7, 10:-10:7].reshape(-1, 2)
    res_b = cr.load_transform(next((tmp_path / "b").glob("transform.*")))
    np.testing.assert_allclose(res_b.map_points(pts), b.transform.map_points(pts))
    assert b.params["init"] == "transform"


# ------------------------------------------------------------------------------------------------ interpolation
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("interpolation", ["bspline2", "bspline3"])
@pytest.mark.parametrize("metric", ["mi", "ssd"])
def test_bspline_interpolation_gradient_is_exact(ndim, interpolation, metric):
    """With B-spline interpolation the image gradient is the exact derivative of the interpolant, so the analytic
    gradient of the sampled cost equals its central differences up to O(h²) and rounding (h = 1e-4 in scaled
    parameters): 1e-3 of the norm, against 6 % for the linear path (test above), with a moving mask on."""
    big = _phantom(ndim, shape=(64, 68) if ndim == 2 else (34, 36, 32), seed=1)
    crop = tuple(slice(8, s - 8) for s in big.shape)
    fixed = cr.Image(big.data[crop], big.spacing, origin=(8.0,) * ndim)
    moving = big.like(np.asarray(big.data) ** 1.5) if metric == "mi" else big
    mmask = np.ones(big.shape, bool)
    mmask[: big.shape[0] // 3] = False  # a slab across the fixed image's first rows
    mdl = AffineModel("affine", ndim, _center(fixed))
    rng = np.random.default_rng(3)
    obj = LevelObjective(fixed, moving, None, mmask, model=mdl, pre=cr.Affine.identity(ndim), metric=metric,
                         sampler=Sampler("random_coordinate", 3000, fixed.shape), rng=rng, bins=16,
                         interpolation=interpolation)
    scales = mdl.scales(obj.draw(5000)[0])
    p = mdl.identity() + rng.normal(scale=0.6, size=mdl.size) / np.sqrt(scales)
    draw = obj.draw()
    _, g = obj.evaluate(p, samples=draw)
    assert obj.last_valid < 1.0  # the mask dropped some samples
    h = 1e-4 / np.sqrt(scales)
    fd = np.array([(obj.evaluate(p + h[k] * e, samples=draw)[0] - obj.evaluate(p - h[k] * e, samples=draw)[0])
                   / (2 * h[k]) for k, e in enumerate(np.eye(mdl.size))])
    gs, fds = g / np.sqrt(scales), fd / np.sqrt(scales)
    assert np.linalg.norm(gs - fds) <= 1e-3 * np.linalg.norm(fds), (gs, fds)


def test_bspline_interpolation_numpy_and_numba_agree_in_the_engine():
    """The engine's numpy path (backend="numpy") and its compiled path give the same cost and gradient."""
    pytest.importorskip("numba")
    fixed = _phantom(2, shape=(40, 44))
    mdl = AffineModel("rigid", 2, _center(fixed))
    out = []
    for backend in ("numpy", None):
        obj = LevelObjective(fixed, fixed, None, None, model=mdl, pre=cr.Affine.identity(2), metric="ssd",
                             sampler=Sampler("random_coordinate", 500, fixed.shape),
                             rng=np.random.default_rng(0), interpolation="bspline3", backend=backend)
        out.append(obj.evaluate(mdl.identity() + 0.05)[:2])
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-12)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("interpolation", ["nearest", "bspline3"])
def test_register_affine_with_other_interpolators(interpolation):
    """Nearest (gradient of the nearest voxel) and cubic B-spline interpolation both recover a rigid transform; the
    same seed gives the same bits."""
    fixed = _phantom(2, shape=(64, 60), spacing=(1.2, 0.9))
    truth = cr.Affine.euler([np.radians(8)], translation=(2.0, -1.0), center=_center(fixed))
    moving = cr.resample(fixed, truth.inverse(), reference=fixed, interpolation="bspline")
    res = cr.register_affine(fixed, moving, transform="rigid", metric="ssd", interpolation=interpolation, **FAST)
    # nearest: the sampled cost is piecewise constant, the nearest-voxel gradient only approximates its trend
    assert _tre(fixed, res.transform, truth) < (0.3 if interpolation == "nearest" else 0.1), res.metrics
    assert res.params["interpolation"] == interpolation
    again = cr.register_affine(fixed, moving, transform="rigid", metric="ssd", interpolation=interpolation, **FAST)
    assert np.array_equal(again.transform.matrix, res.transform.matrix)


@pytest.mark.parametrize("metric", ["mi", "ssd"])
def test_register_affine_image_gradient_option(metric):
    """image_gradient: the default is "smoothed" (the same bits as passing it: the default run is main's, checked
    bit for bit against main when the option was added, docs/notes/elastix.md); "exact" (the gradient of the linear
    interpolant; the fused kernel with MI, the step-by-step path with SSD) is another run that recovers the same
    rigid transform, and is recorded in params."""
    fixed = _phantom(2, shape=(64, 60), spacing=(1.2, 0.9))
    truth = cr.Affine.euler([np.radians(8)], translation=(2.0, -1.0), center=_center(fixed))
    moving = cr.resample(fixed, truth.inverse(), reference=fixed, interpolation="bspline")
    kw = dict(transform="rigid", metric=metric, **FAST)
    runs = {g: cr.register_affine(fixed, moving, image_gradient=g, **kw) for g in ("smoothed", "exact")}
    default = cr.register_affine(fixed, moving, **kw)
    assert default.params["image_gradient"] == "smoothed" and runs["exact"].params["image_gradient"] == "exact"
    assert np.array_equal(default.transform.homogeneous, runs["smoothed"].transform.homogeneous)
    assert not np.array_equal(runs["exact"].transform.homogeneous, runs["smoothed"].transform.homogeneous)
    for res in runs.values():  # the tolerance of the other interpolators' test
        assert _tre(fixed, res.transform, truth) < 0.1, res.metrics
    with pytest.raises(ValueError, match="image_gradient"):
        cr.register_affine(fixed, moving, image_gradient="sobel", **kw)


# ------------------------------------------------------------------------------------------------ weighted metric sums
def test_weighted_sum_of_metrics_is_the_sum_and_its_gradient_is_exact():
    """A weighted sum over the same samples: value and gradient equal the weighted sums of the single-metric
    objectives' (to rounding, 1e-12), and the gradient matches central differences as tightly as a single metric's
    does with B-spline interpolation (1e-3, see test_bspline_interpolation_gradient_is_exact)."""
    big = _phantom(2, shape=(64, 68), seed=1)
    fixed = cr.Image(big.data[8:-8, 8:-8], big.spacing, origin=(8.0, 8.0))
    moving = big.like(np.asarray(big.data) ** 1.5)
    mdl = AffineModel("affine", 2, _center(fixed))
    terms = {"mi": 1.0, "ncc": 0.5, "ssd": 2.0}

    def objective(metric):
        return LevelObjective(fixed, moving, None, None, model=mdl, pre=cr.Affine.identity(2), metric=metric,
                              sampler=Sampler("random_coordinate", 3000, fixed.shape),
                              rng=np.random.default_rng(3), bins=16, interpolation="bspline3")
    obj = objective(terms)
    scales = mdl.scales(obj.draw(5000)[0])
    p = mdl.identity() + np.random.default_rng(4).normal(scale=0.6, size=mdl.size) / np.sqrt(scales)
    draw = obj.draw()
    v, g = obj.evaluate(p, samples=draw)
    parts = [objective(name).evaluate(p, samples=draw) for name in terms]
    assert v == pytest.approx(sum(w * pv for w, (pv, _) in zip(terms.values(), parts)), rel=1e-12)
    np.testing.assert_allclose(g, sum(w * pg for w, (_, pg) in zip(terms.values(), parts)), rtol=1e-10,
                               atol=1e-12 * np.abs(g).max())
    h = 1e-4 / np.sqrt(scales)
    fd = np.array([(obj.evaluate(p + h[k] * e, samples=draw)[0] - obj.evaluate(p - h[k] * e, samples=draw)[0])
                   / (2 * h[k]) for k, e in enumerate(np.eye(mdl.size))])
    gs, fds = g / np.sqrt(scales), fd / np.sqrt(scales)
    assert np.linalg.norm(gs - fds) <= 1e-3 * np.linalg.norm(fds), (gs, fds)


def test_register_affine_with_a_weighted_sum_and_bad_weights():
    fixed = _phantom(2, shape=(64, 60), spacing=(1.2, 0.9))
    truth = cr.Affine.euler([np.radians(8)], translation=(2.0, -1.0), center=_center(fixed))
    moving = cr.resample(fixed, truth.inverse(), reference=fixed, interpolation="bspline")
    res = cr.register_affine(fixed, moving, transform="rigid", metric_weights=[("mi", 1.0), ("ncc", 0.5)], **FAST)
    assert _tre(fixed, res.transform, truth) < 0.1, res.metrics
    assert res.params["metric"] == "1*mi+0.5*ncc"
    for bad, msg in (({"mi": -1.0}, "must be finite and > 0"), ({"foo": 1.0}, "unknown metric"),
                     ([("mi", 1.0), ("mi", 2.0)], "twice"), ({}, "empty")):
        with pytest.raises(ValueError, match=msg):
            cr.register_affine(fixed, moving, metric_weights=bad, **FAST)


@pytest.mark.parametrize("kind", ["mi", "ssd"])
def test_bspline_model_gradient_through_cubic_interpolation_is_exact(kind):
    """The B-spline FFD's chain rule (its adjoint kernel) with the exact gradient of a cubic interpolant: central
    differences agree to 1e-3 of the norm over the six largest coefficients (the linear-path test above needs 6 %)."""
    from classreg.solvers.parametric.bspline import BSplineModel

    big = _phantom(2, shape=(64, 68), seed=1, sigma=4.0)
    fixed = cr.Image(big.data[8:-8, 8:-8], big.spacing, origin=(8.0, 8.0))
    mdl = BSplineModel.over(fixed, cr.Affine.identity(2), (12.0, 12.0), bending_weight=0.5)
    rng = np.random.default_rng(0)
    obj = LevelObjective(fixed, big, None, None, model=mdl, pre=cr.Affine.identity(2), metric=kind,
                         sampler=Sampler("random_coordinate", 3000, fixed.shape), rng=rng, bins=16,
                         interpolation="bspline3")
    p = rng.normal(scale=0.3, size=mdl.size)
    draw = obj.draw()
    _, g = obj.evaluate(p, samples=draw)
    idx = np.argsort(-np.abs(g))[:6]
    fd = []
    for k in idx:
        e = np.zeros_like(p)
        e[k] = 1e-4
        fd.append((obj.evaluate(p + e, samples=draw)[0] - obj.evaluate(p - e, samples=draw)[0]) / 2e-4)
    assert np.linalg.norm(g[idx] - fd) <= 1e-3 * np.linalg.norm(fd), (g[idx], fd)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("metric", ["mi", "nmi"])
def test_fused_bspline_mi_step_is_the_generic_path(ndim, metric):
    """B-spline + MI + linear interpolation with the exact image gradient (register_bspline's default) runs one fused
    kernel per iteration (classreg.kernels.bspline.mi_step); on the same samples it gives the cost, gradient, valid
    fraction and NCC of the generic numpy path with that gradient (model map, linear_grad_at, Mattes MI of
    classreg.terms.measures), with a moving mask and with a prior displacement (fold-free composition). Its gradient
    is the exact derivative of that cost (the gradient of the linear interpolant, as elastix's): central
    differences on a fixed draw. With the smoothed gradient the fused kernel is not taken."""
    pytest.importorskip("numba")
    from classreg.solvers.parametric.bspline import BSplineModel

    fixed = _phantom(ndim, seed=1, sigma=3.0)
    moving = _phantom(ndim, seed=2, sigma=3.0)
    mmask = np.ones(moving.shape, dtype=bool)
    mmask[..., :6] = False
    rng = np.random.default_rng(3)
    prior = 0.8 * np.stack([smooth_image(fixed.shape, rng, sigma=6.0) for _ in range(ndim)], -1)
    out = []
    for backend in (None, "numpy"):
        mdl = BSplineModel.over(fixed, cr.Affine.identity(ndim), 10.0, backend=backend)
        mdl.set_prior(prior, fixed.inverse_affine)
        kw = {"model": mdl, "pre": cr.Affine.from_translation([0.3] * ndim), "metric": metric,
                  "sampler": Sampler("random_coordinate", 1500, fixed.shape), "bins": 16, "new_samples": False,
                  "backend": backend}
        obj = LevelObjective(fixed, moving, None, mmask, rng=np.random.default_rng(0), image_gradient="exact", **kw)
        assert (obj._bspline_step is not None) == (backend is None)
        assert LevelObjective(fixed, moving, None, mmask, rng=np.random.default_rng(0), image_gradient="smoothed",
                              **kw)._bspline_step is None
        p = np.random.default_rng(4).normal(scale=0.5, size=mdl.size)
        value, grad = obj.evaluate(p, 0)
        out.append((value, grad, obj.last_valid, obj.last_similarity))
    (v, g, valid, sim), (v_ref, g_ref, valid_ref, sim_ref) = out
    assert 0.5 < valid == valid_ref < 1.0  # the mask dropped some samples
    assert v == pytest.approx(v_ref, rel=1e-10) and sim == pytest.approx(sim_ref, rel=1e-10)
    # the same sums in another order
    np.testing.assert_allclose(g, g_ref, rtol=1e-8, atol=1e-10 * np.abs(g_ref).max())
    if ndim == 2:  # the fused gradient is the derivative of the fused cost (same draw: new_samples=False)
        mdl = BSplineModel.over(fixed, cr.Affine.identity(ndim), 10.0)
        obj = LevelObjective(fixed, moving, None, None, model=mdl, pre=cr.Affine.identity(ndim), metric=metric,
                             sampler=Sampler("random_coordinate", 3000, fixed.shape), rng=np.random.default_rng(0),
                             bins=16, new_samples=False, image_gradient="exact")
        p = np.random.default_rng(5).normal(scale=0.3, size=mdl.size)
        _, g = obj.evaluate(p, 0)
        idx = np.argsort(-np.abs(g))[:6]
        fd = []
        for k in idx:
            e = np.zeros_like(p)
            e[k] = 1e-6
            fd.append((obj.evaluate(p + e, 0)[0] - obj.evaluate(p - e, 0)[0]) / 2e-6)
        # exact but for samples whose ±1e-6 mm step crosses a voxel edge (a kink of the linear interpolant) and the
        # differences' rounding (measured 5e-8 and 5e-7); the generic path's interpolated central differences
        # need 6 % in the tests above
        assert np.linalg.norm(g[idx] - fd) <= 1e-5 * np.linalg.norm(fd), (g[idx], fd)


@pytest.mark.parametrize("folds", ["project", "compose", "allow"])
def test_register_bspline_same_seed_same_bits(folds):
    """The fused B-spline iterations are serial and seeded: the same seed gives the same coefficients bit for bit,
    another seed other ones."""
    fixed, moving, _ = _bspline_pair()
    kw = {"grid_spacing": 16.0, "shrink_factors": (2, 1), "iterations": (30, 30), "samples": 512, "folds": folds}
    runs = [cr.register_bspline(fixed, moving, seed=s, **kw) for s in (5, 5, 6)]
    pieces = [r.transform.transforms if isinstance(r.transform, cr.Chain) else [r.transform] for r in runs]
    assert len(pieces[0]) == (2 if folds == "compose" else 1)  # one B-spline per level when composed
    coef = [np.concatenate([t.coefficients.ravel() for t in ts]) for ts in pieces]
    assert np.array_equal(coef[0], coef[1]) and runs[0].metrics["metric"] == runs[1].metrics["metric"]
    assert not np.array_equal(coef[0], coef[2])


def test_fold_free_restarts_compose_pieces_and_report_the_whole_chain(monkeypatch):
    """Fold-free restarts (forced: every saturation check starts a new piece): the pieces are composed, the map stays fold-free, the same seed gives the same bits, and the result's det J
    statistics and warped image — computed from one dense evaluation on the fixed grid (the last prior plus the
    last piece) — are those of the returned Chain itself."""
    from classreg.kernels.diff import jacobian_determinant

    from classreg.evaluate import dense_displacement
    from classreg.solvers.parametric import register

    monkeypatch.setattr(register, "RESTART_SATURATION", 0.0)
    fixed, moving, _ = _bspline_pair(seed=2)
    kw = {"grid_spacing": 16.0, "shrink_factors": (2, 1), "iterations": (60, 60), "samples": 512, "folds": "compose"}
    res = cr.register_bspline(fixed, moving, **kw)
    assert res.metrics["pieces"] == 4  # one per level and one restart per level (after iteration RESTART_EVERY)
    u, _ = dense_displacement(res.transform, fixed)  # the Chain, piece by piece
    det = np.asarray(jacobian_determinant(u, spacing=fixed.spacing_array_order))
    # the two evaluations differ by rounding only (the priors are read at their nodes)
    np.testing.assert_allclose([res.metrics["min_det"], res.metrics["max_det"]], [det.min(), det.max()], rtol=1e-9)
    assert res.metrics["percent_det_nonpositive"] == 0.0 and det.min() > 0
    warped = cr.resample(moving, res.transform, reference=fixed)
    np.testing.assert_allclose(np.asarray(res.warped.data), np.asarray(warped.data), rtol=0, atol=1e-5)
    again = cr.register_bspline(fixed, moving, **kw)
    pts = fixed.grid_points().reshape(-1, 2)
    assert np.array_equal(again.transform.map_points(pts), res.transform.map_points(pts))
