"""Tests of classreg.terms (the measures and the DataTerm interface): gradients against finite differences, optima, hand-computed values, masks, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from classreg import terms
from classreg.terms import measures as mt

NAMES = ["ssd", "ncc", "lncc", "mi", "ngf"]
#: term name -> function of classreg.terms.measures
MEASURE = {"ssd": mt.ssd, "ncc": mt.ncc, "lncc": mt.lncc, "mi": mt.mattes_mi, "ngf": mt.ngf}
SHAPES = {2: (12, 14), 3: (7, 8, 9)}


def smooth(rng, shape, sigma=1.5):
    a = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return a / a.std()


def make_pair(seed, ndim, masked):
    rng = np.random.default_rng(seed)
    shape = SHAPES[ndim]
    F = smooth(rng, shape)
    M = 0.8 * F + 0.5 * smooth(rng, shape) + 0.1
    mask = smooth(rng, shape, 2.5) > -0.3 if masked else None
    return rng, F, M, mask


def kwargs_for(name, ndim):
    """Keywords that make each measure a smooth function of the moving image (fixed limits for MI)."""
    if name == "lncc":
        return {"radius": (2.0, 3.0) if ndim == 2 else 2.0, "spacing": (1.0, 1.5) if ndim == 2 else 1.0}
    if name == "mi":
        return {"fixed_limits": (-4.0, 4.0), "moving_limits": (-5.0, 5.0), "bins": 16}
    if name == "ngf":
        return {"spacing": (1.0, 0.7) if ndim == 2 else (1.2, 1.0, 0.8)}
    return {}


def fd_check(fn, F, M, mask, kw, rng, n_voxels=30, h=1e-5, tol=1e-4, voxels=None):
    value, grad = fn(F, M, mask=mask, gradient=True, **kw)
    assert grad.shape == M.shape and grad.dtype == np.float64
    assert value == pytest.approx(fn(F, M, mask=mask, **kw), abs=1e-14)
    scale = np.abs(grad).max()
    assert scale > 0
    support = np.ones(M.shape)
    if voxels is None:
        voxels = rng.choice(M.size, size=n_voxels, replace=False)
    else:  # only these voxels may move (e.g. not the extremes that set MI's default limits)
        support = np.zeros(M.shape)
        support.flat[voxels] = 1.0
    for i in voxels:
        Mp, Mm = M.copy(), M.copy()
        Mp.flat[i] += h
        Mm.flat[i] -= h
        fd = (fn(F, Mp, mask=mask, **kw) - fn(F, Mm, mask=mask, **kw)) / (2 * h)
        assert abs(fd - grad.flat[i]) <= tol * scale, (i, fd, grad.flat[i], scale)
    # two random directions: directional derivative, relative error
    for _ in range(2):
        d = rng.standard_normal(M.shape) * support
        fd = (fn(F, M + h * d, mask=mask, **kw) - fn(F, M - h * d, mask=mask, **kw)) / (2 * h)
        an = float(np.sum(grad * d))
        assert abs(fd - an) <= tol * max(abs(an), 1e-3 * scale * np.abs(d).sum()), (fd, an)
    return value, grad


# ------------------------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_finite_differences(name, ndim, masked):
    rng, F, M, mask = make_pair(100 + ndim + 10 * masked, ndim, masked)
    fn = MEASURE[name]
    _, grad = fd_check(fn, F, M, mask, kwargs_for(name, ndim), rng)
    if mask is not None:
        assert np.all(grad[~mask] == 0)


def test_mi_gradient_with_default_limits():
    # default limits come from min/max of the images: perturbing a non-extremal voxel leaves them unchanged
    rng, F, M, mask = make_pair(7, 2, True)
    inner = np.flatnonzero((M > M[mask].min() + 0.05) & (M < M[mask].max() - 0.05))
    voxels = rng.choice(inner, size=30, replace=False)
    fd_check(mt.mattes_mi, F, M, mask, {}, rng, voxels=voxels)


def test_smoothed_mi_gradient_and_limit():
    """eps > 0 (the smoothed MI, H(q) = −Σ q log(q + eps)): exact gradient through the limiter and a mask, elastix's
    MI as eps → 0, bad values refused."""
    rng, F, M, mask = make_pair(9, 2, True)
    lo, hi = np.percentile(M[mask], [5, 95])
    kw = {"moving_limits": (lo, hi), "fixed_limits": (float(F.min()), float(F.max())), "eps": 1e-4}
    fd_check(mt.mattes_mi, F, M, mask, kw, rng)
    plain = mt.mattes_mi(F, M, mask=mask, moving_limits=kw["moving_limits"], fixed_limits=kw["fixed_limits"])
    tiny = mt.mattes_mi(F, M, mask=mask, **dict(kw, eps=1e-14))
    assert tiny == pytest.approx(plain, abs=1e-8)
    with pytest.raises(ValueError, match="eps"):
        mt.mattes_mi(F, M, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        mt.mattes_mi_samples(F.ravel(), M.ravel(), eps=1e-4, normalised=True)


def test_mi_gradient_through_exponential_limiter():
    # moving limits narrower than the data: the elastix exponential limiter is active on the tails
    rng, F, M, _ = make_pair(8, 2, False)
    lo, hi = np.percentile(M, [10, 90])
    kw = {"moving_limits": (lo, hi), "bins": (20, 24)}
    outside = np.flatnonzero((M < lo) | (M > hi))
    inside = np.flatnonzero((M > lo + 0.1) & (M < hi - 0.1))
    voxels = np.concatenate([rng.choice(outside, 15, replace=False), rng.choice(inside, 15, replace=False)])
    fd_check(mt.mattes_mi, F, M, None, kw, rng, voxels=voxels)


def test_ngf_gradient_with_absolute_eps_pair():
    rng, F, M, mask = make_pair(9, 3, True)
    fd_check(mt.ngf, F, M, mask, {"eps": (0.05, 0.2), "spacing": (2.0, 1.0, 1.0)}, rng)


def test_lncc_gradient_without_regulariser_on_textured_image():
    rng, F, M, mask = make_pair(10, 2, True)
    fd_check(mt.lncc, F, M, mask, {"radius": 1.0, "eps": 0.0}, rng)


@pytest.mark.parametrize("name", NAMES)
def test_float32_and_integer_inputs(name):
    _, F, M, _ = make_pair(11, 2, False)
    kw = kwargs_for(name, 2)
    v64, _g64 = MEASURE[name](F, M, gradient=True, **kw)
    v32, g32 = MEASURE[name](F.astype(np.float32), M.astype(np.float32), gradient=True, **kw)
    assert g32.dtype == np.float32 and isinstance(v32, float)
    assert v32 == pytest.approx(v64, rel=1e-4, abs=1e-5)
    Fi = np.round(F * 50).astype(np.int16)
    Mi = np.round(M * 50).astype(np.int32)
    vi, gi = MEASURE[name](Fi, Mi, gradient=True, **({} if name == "mi" else kw))
    assert gi.dtype == np.float64 and np.isfinite(vi) and np.all(np.isfinite(gi))


# ------------------------------------------------------------------------------------------------------------------
# optima and hand-computed values
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_identical_images_give_the_optimum(ndim):
    rng = np.random.default_rng(20 + ndim)
    shape = (24, 26) if ndim == 2 else (10, 11, 12)
    F = smooth(rng, shape, 0.8)  # textured: every window has contrast
    assert mt.ssd(F, F) == 0.0
    _, g = mt.ssd(F, F, gradient=True)
    assert np.all(g == 0)
    assert mt.ncc(F, F) == pytest.approx(-1.0, abs=1e-12)
    _, g = mt.ncc(F, F, gradient=True)
    assert np.abs(g).max() < 1e-12  # stationary point
    assert -1.0 <= mt.lncc(F, F, radius=2.0) < -0.999
    assert mt.lncc(F, F, radius=2.0, eps=0.0) == pytest.approx(-1.0, abs=1e-9)
    assert mt.ngf(F, F, eps=1e-6) == pytest.approx(0.0, abs=1e-6)
    other = smooth(rng, shape, 0.8)
    assert mt.ngf(F, F) < 0.1 < mt.ngf(F, other)
    assert mt.mattes_mi(F, F) < mt.mattes_mi(F, other) < 0.0


def test_stationary_at_identity_for_ngf_and_lncc_without_regulariser():
    rng = np.random.default_rng(5)
    F = smooth(rng, (16, 18), 0.8)
    _, g = mt.lncc(F, F, radius=2.0, eps=0.0, gradient=True)
    assert np.abs(g).max() < 1e-9
    _, g = mt.ngf(F, F, eps=0.0, gradient=True)
    assert np.abs(g).max() < 1e-9


def test_ssd_hand_computed():
    F = np.array([[0.0, 1.0], [2.0, 3.0]])
    M = np.array([[1.0, 1.0], [2.0, 5.0]])
    v, g = mt.ssd(F, M, gradient=True)
    assert v == pytest.approx((1 + 4) / 2 / 4)  # 0.625
    np.testing.assert_allclose(g, [[0.25, 0.0], [0.0, 0.5]])
    mask = np.array([[True, False], [False, False]])
    assert mt.ssd(F, M, mask=mask) == pytest.approx(0.5)


def test_ncc_hand_computed():
    F = np.array([[1.0, 2.0], [3.0, 4.0]])
    M = np.array([[1.0, 3.0], [2.0, 4.0]])
    # f = m-permutation of (-1.5, -.5, .5, 1.5): sum fm = 4, sum f^2 = sum m^2 = 5
    assert mt.ncc(F, M) == pytest.approx(-0.8)
    assert mt.ncc(F, 2 * F + 1) == pytest.approx(-1.0)
    assert mt.ncc(F, -F) == pytest.approx(1.0)
    # constant image: correlation undefined -> 0, zero gradient (elastix convention)
    v, g = mt.ncc(F, np.full_like(F, 3.3), gradient=True)
    assert v == 0.0 and np.all(g == 0)


def test_lncc_hand_computed_whole_image_window():
    F = np.array([[1.0, 2.0], [3.0, 4.0]])
    M = np.array([[1.0, 3.0], [2.0, 4.0]])
    # radius 1 voxel: every window covers the whole 2x2 image, so cc = NCC^2 = 0.64 everywhere
    assert mt.lncc(F, M, radius=1.0, eps=0.0) == pytest.approx(-0.64, abs=1e-12)
    assert mt.lncc(F, M, radius=1.0) == pytest.approx(-0.64, rel=1e-4)


def _lncc_reference(F, M, mask, r, eps):
    """Brute-force LNCC with explicit loops (test oracle only)."""
    w = np.ones(F.shape, bool) if mask is None else mask
    Fm, Mm = F[w], M[w]
    nw = np.prod([2 * ri + 1 for ri in r])
    e = eps * nw * nw * Fm.var() * Mm.var()
    total = 0.0
    for idx in zip(*np.nonzero(w)):
        sl = tuple(slice(max(0, i - ri), i + ri + 1) for i, ri in zip(idx, r))
        ww = w[sl]
        f, m = F[sl][ww], M[sl][ww]
        f, m = f - f.mean(), m - m.mean()
        total += np.dot(f, m) ** 2 / (np.dot(f, f) * np.dot(m, m) + e + np.finfo(float).tiny)
    return -total / w.sum()


@pytest.mark.parametrize("masked", [False, True])
def test_lncc_matches_brute_force_and_converts_radius_per_axis(masked):
    _, F, M, mask = make_pair(30, 2, masked)
    # radius 2 mm with spacing (1, 2) mm -> half-widths (2, 1) voxels
    v = mt.lncc(F, M, radius=2.0, spacing=(1.0, 2.0), mask=mask)
    assert v == pytest.approx(_lncc_reference(F, M, mask, (2, 1), mt.LNCC_EPS), rel=1e-10)
    # a radius smaller than a voxel still gives at least one voxel
    v = mt.lncc(F, M, radius=0.1, spacing=(1.0, 2.0), mask=mask)
    assert v == pytest.approx(_lncc_reference(F, M, mask, (1, 1), mt.LNCC_EPS), rel=1e-10)
    _, F, M, mask = make_pair(31, 3, masked)
    v = mt.lncc(F, M, radius=(1.0, 2.0, 3.0), mask=mask)
    assert v == pytest.approx(_lncc_reference(F, M, mask, (1, 2, 3), mt.LNCC_EPS), rel=1e-10)


def test_mi_hand_computed_discrete_cases():
    # With two or three distinct intensities the cubic moving windows (4 bins wide) are ~14-27 bins apart and
    # never overlap, and the fixed box windows are disjoint: the Parzen MI equals the discrete MI of the values.
    F = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert mt.mattes_mi(F, F) == pytest.approx(-math.log(2.0), abs=1e-12)
    assert mt.mattes_mi(F, np.array([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(0.0, abs=1e-12)
    M = np.array([[0.0, 0.0], [0.0, 1.0]])
    # P(0,0)=1/2, P(1,0)=1/4, P(1,1)=1/4, P_F=(1/2,1/2), P_M=(3/4,1/4)
    expected = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    assert mt.mattes_mi(F, M) == pytest.approx(-expected, abs=1e-12)
    F3 = np.array([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])
    assert mt.mattes_mi(F3, 7 - 3 * F3, bins=(8, 32)) == pytest.approx(-math.log(3.0), abs=1e-12)


def test_mi_bin_geometry_matches_elastix_formulas():
    # one moving intensity exactly at the lower limit: term = small/binsize + 1 (elastix InitializeHistograms)
    lo, hi, nb = -1.0, 3.0, 32
    small = 0.001 * (hi - lo) / (nb - 3)
    bs = (hi - lo + 2 * small) / (nb - 3)
    t = small / bs  # fractional part of the Parzen term; window = bins 0..3
    w = [(1 - t) ** 3 / 6, (4 - 6 * t**2 + 3 * t**3) / 6, (1 + 3 * t + 3 * t**2 - 3 * t**3) / 6, t**3 / 6]
    # fixed binary and moving = [lo, hi] values: p(f, .) = w / 2 for the low sample; MI = log 2 regardless of w
    F = np.array([[0.0, 1.0]])
    F = np.vstack([F, F])
    M = np.array([[lo, hi], [lo, hi]])
    assert mt.mattes_mi(F, M, moving_limits=(lo, hi)) == pytest.approx(-math.log(2.0), abs=1e-12)
    # a mixed pair: moving values near each other share bins; compare with an explicit histogram
    Mv = np.array([[lo, lo + 0.5 * bs], [lo + 0.25 * bs, lo]])
    xi = (Mv.ravel() - (lo - small)) / bs + 1
    p = np.zeros((32, 32))
    fb = [0, 31, 0, 31]  # fixed limits [0, 1] (ratio 0): 0 -> bin 0, 1 -> bin 31
    for k in range(4):
        b0 = int(np.floor(xi[k])) - 1
        tt = xi[k] - np.floor(xi[k])
        ww = [(1 - tt) ** 3 / 6, (4 - 6 * tt**2 + 3 * tt**3) / 6, (1 + 3 * tt + 3 * tt**2 - 3 * tt**3) / 6,
              tt**3 / 6]
        for i in range(4):
            p[fb[k], b0 + i] += ww[i] / 4
    pf, pm = p.sum(1), p.sum(0)
    nz = p > 0
    expected = np.sum(p[nz] * np.log(p[nz] / np.outer(pf, pm)[nz]))
    F2 = np.array([[0.0, 1.0], [0.0, 1.0]])
    # limit_range_ratio=0: the limiter thresholds equal the limits, so the values at ``lo`` pass unchanged
    # (with the default ratio they would lie below the threshold lo + 0.01 (hi - lo) / 1.02 and be limited)
    assert mt.mattes_mi(F2, Mv, moving_limits=(lo, hi), limit_range_ratio=0.0) == pytest.approx(-expected, abs=1e-12)
    assert mt.mattes_mi(F2, Mv, moving_limits=(lo, hi)) != pytest.approx(-expected, abs=1e-6)
    assert sum(w) == pytest.approx(1.0)


def test_ngf_hand_computed_ramps():
    y, x = np.mgrid[0:6, 0:7].astype(float)
    # orthogonal gradients -> 1 everywhere
    assert mt.ngf(2.0 * x, 3.0 * y) == pytest.approx(1.0)
    # parallel ramps, slopes 1 and 2 per mm (spacing 2 mm along x), eps = 1:
    # n_F = 1/sqrt(2), n_M = 2/sqrt(5) -> <n_F, n_M>^2 = 0.4 -> cost 0.6
    assert mt.ngf(2.0 * x, 4.0 * x, spacing=(1.0, 2.0), eps=1.0) == pytest.approx(0.6)
    # sign invariance (multi-modal): anti-parallel gradients are as good as parallel ones
    assert mt.ngf(2.0 * x, -4.0 * x, spacing=(1.0, 2.0), eps=1.0) == pytest.approx(0.6)


def test_ngf_differences_are_numpy_gradient():
    rng = np.random.default_rng(40)
    a = rng.standard_normal((5, 6, 7))
    inside = np.ones(a.shape, bool)
    for ax, h in enumerate((0.5, 1.0, 2.5)):
        wf, wb = mt._diff_weights(inside, ax)
        np.testing.assert_allclose(mt._grad_axis(a, wf, wb, h, ax), np.gradient(a, h, axis=ax), atol=1e-14)
        # exact adjoint: <D a, v> == <a, D* v>, also with a mask
        v = rng.standard_normal(a.shape)
        mask = rng.random(a.shape) > 0.3
        for ins in (inside, mask):
            wf, wb = mt._diff_weights(ins, ax)
            lhs = np.sum(mt._grad_axis(a, wf, wb, h, ax) * v)
            rhs = np.sum(a * mt._grad_axis_adjoint(v, wf, wb, h, ax))
            assert lhs == pytest.approx(rhs, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# mutual information properties
# ------------------------------------------------------------------------------------------------------------------


def test_mi_self_beats_noise_and_affine_invariance():
    rng = np.random.default_rng(50)
    F = smooth(rng, (40, 40), 2.0)
    M = np.tanh(F) + 0.3 * smooth(rng, (40, 40), 2.0)
    noise = rng.standard_normal(F.shape)
    assert mt.mattes_mi(F, F) < mt.mattes_mi(F, M) < mt.mattes_mi(F, noise) < 0.0
    # unrelated images: only the finite-sample bias of the 32x32 histogram (~(B-1)^2 / 2N nats) remains
    assert mt.mattes_mi(F, noise) > 0.1 * mt.mattes_mi(F, F)
    # an increasing affine map of either image moves the default limits with it: the bins are the same
    base = mt.mattes_mi(F, M)
    assert mt.mattes_mi(3.0 * F + 7.0, M) == pytest.approx(base, rel=1e-10)
    assert mt.mattes_mi(F, 0.2 * M - 5.0) == pytest.approx(base, rel=1e-10)


@pytest.mark.parametrize("shape", [(48, 48), (16, 18, 20)])
def test_mi_nearly_invariant_to_monotone_map_of_fixed(shape):
    # True MI is invariant to any invertible map of one variable; the binned estimate is exactly invariant only to
    # maps that keep the equal-width bin partition (affine ones, tested above). A mild non-linear monotone map
    # (slope varying by a factor 2-3 over the intensity range) moves voxels between neighbouring bins; over 6 seeds
    # and both shapes these maps changed the estimate by at most 3 %. Strongly non-linear maps change it a lot
    # (x + 0.05 x^3: up to 7 %, exp: 40 %) because most voxels then share a few bins. 5 % bounds the
    # discretisation effect for mild maps with margin.
    rng = np.random.default_rng(60)
    F = smooth(rng, shape, 2.0)
    M = np.tanh(F) + 0.3 * smooth(rng, shape, 2.0)
    base = mt.mattes_mi(F, M)
    for g in (lambda a: np.tanh(0.5 * a), np.arcsinh, lambda a: np.sqrt(a - a.min() + 0.1)):
        assert mt.mattes_mi(g(F), M) == pytest.approx(base, rel=0.05)


def test_mi_agrees_with_itk_mattes_within_binning_differences():
    sitk = pytest.importorskip("SimpleITK")
    # ITKv4's MattesMutualInformation (what SimpleITK wraps) uses the same Parzen scheme but pads the histogram by
    # 2 bins without elastix's LimitRangeRatio widening, so the bins differ slightly; values agree to ~2 %.
    rng = np.random.default_rng(70)
    F = smooth(rng, (48, 48), 2.0)
    M = np.tanh(F) + 0.3 * smooth(rng, (48, 48), 2.0)
    R = sitk.ImageRegistrationMethod()
    R.SetMetricAsMattesMutualInformation(32)
    R.SetMetricSamplingStrategy(R.NONE)
    R.SetInterpolator(sitk.sitkNearestNeighbor)
    R.SetInitialTransform(sitk.TranslationTransform(2))
    itk_value = R.MetricEvaluate(sitk.GetImageFromArray(F), sitk.GetImageFromArray(M))
    assert mt.mattes_mi(F, M) == pytest.approx(itk_value, rel=0.05)


def test_intensity_limits_and_constant_images():
    a = np.array([[1.0, 2.0], [5.0, 9.0]])
    assert mt.intensity_limits(a) == pytest.approx((1.0 - 0.08, 9.0 + 0.08))
    assert mt.intensity_limits(a, mask=a < 6, ratio=0.0) == pytest.approx((1.0, 5.0))
    # constant images: degenerate bins, MI 0 and a finite gradient
    v, g = mt.mattes_mi(np.full((4, 4), 2.0), np.full((4, 4), 1000.0), gradient=True)
    assert v == pytest.approx(0.0, abs=1e-12) and np.all(np.isfinite(g))


# ------------------------------------------------------------------------------------------------------------------
# masks, invariances, inputs untouched
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_mask_really_restricts(name, ndim):
    rng, F, M, mask = make_pair(80 + ndim, ndim, True)
    fn = MEASURE[name]
    kw = {"radius": 2.0} if name == "lncc" else {}  # default MI limits: taken inside the mask
    v, g = fn(F, M, mask=mask, gradient=True, **kw)
    F2, M2 = F.copy(), M.copy()
    F2[~mask] = 100.0 * rng.standard_normal(np.count_nonzero(~mask))
    M2[~mask] = -50.0 + 10.0 * rng.standard_normal(np.count_nonzero(~mask))
    v2, g2 = fn(F2, M2, mask=mask, gradient=True, **kw)
    assert v2 == pytest.approx(v, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(g2, g, rtol=1e-9, atol=1e-12 * np.abs(g).max())
    assert np.all(g[~mask] == 0)
    # and the mask matters: the unmasked value differs
    assert fn(F2, M2, **kw) != pytest.approx(v, rel=1e-6)


@pytest.mark.parametrize("name", ["ncc", "lncc", "mi", "ngf"])
def test_invariant_to_positive_affine_intensity_change_of_moving(name):
    _, F, M, mask = make_pair(90, 2, True)
    fn = MEASURE[name]
    assert fn(F, 4.0 * M + 3.0, mask=mask) == pytest.approx(fn(F, M, mask=mask), rel=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_not_modified_and_gradient_flag(name):
    _, F, M, mask = make_pair(95, 3, True)
    F32 = F.astype(np.float32)
    copies = (F32.copy(), M.copy(), mask.copy())
    fn = MEASURE[name]
    v = fn(F32, M, mask=mask)
    assert isinstance(v, float)
    out = fn(F32, M, mask=mask, gradient=True)
    assert isinstance(out, tuple) and len(out) == 2 and out[0] == v
    for a, b in zip((F32, M, mask), copies):
        np.testing.assert_array_equal(a, b)


def test_registry_and_term_interface():
    """terms.get builds the term; value/gradient are exactly the measure's, with its parameters."""
    for name in NAMES:
        assert isinstance(terms.get(name), terms.TERMS[name])
        assert terms.get(name).name == name
    assert isinstance(terms.get(" NCC "), terms.NCC)
    t = terms.LNCC(radius=2.0)
    assert terms.get(t) is t
    with pytest.raises(ValueError, match="ssd, ncc, lncc, mi, ngf"):
        terms.get("cc")
    _, F, M, mask = make_pair(97, 2, True)
    for name in NAMES:
        kw = {"radius": 2.0} if name == "lncc" else {}
        term = terms.get(name, **kw)
        assert term.value(F, M, mask=mask) == MEASURE[name](F, M, mask=mask, **kw)
        v, g = term.gradient(F, M, mask=mask)
        v0, g0 = MEASURE[name](F, M, mask=mask, gradient=True, **kw)
        assert v == v0
        np.testing.assert_array_equal(g, g0)


@pytest.mark.parametrize("name", ["ncc", "mi", "ngf"])
def test_default_force_moves_towards_fixed(name):
    """The generic force (−∂E/∂W · ∇W, longest vector = max_step) lowers the cost when added as a displacement."""
    from classreg.kernels.diff import gradient
    from classreg.kernels.warp import warp

    rng = np.random.default_rng(5)
    F = smooth(rng, (40, 44), sigma=3.0)
    shift = np.zeros((40, 44, 2))
    shift[..., 1] = 0.8  # the moving image is F shifted by 0.8 voxels along x
    M = warp(F, -shift, order=1, mode="border")
    term = terms.get(name)
    gF, gM = gradient(F, spacing=(1.0, 1.0)), gradient(M, spacing=(1.0, 1.0))
    u, cost, step = term.force(F, M, gF, gM, np.zeros_like(shift), spacing=(1.0, 1.0), max_step=0.2)
    assert cost == pytest.approx(term.value(F, M))
    assert step == pytest.approx(0.2)
    assert np.sqrt((u ** 2).sum(-1)).max() == pytest.approx(0.2, rel=1e-6)
    moved = warp(M, u, order=1, mode="border")
    assert term.value(F, moved) < cost



# ------------------------------------------------------------------------------------------------------------------
# error paths
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_common_errors(name):
    fn = MEASURE[name]
    a = np.zeros((5, 6))
    b = np.ones((5, 6))
    with pytest.raises(ValueError, match=r"\(5, 6\).*\(6, 5\)"):
        fn(a, np.zeros((6, 5)))
    bad = b.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="fixed"):
        fn(bad, b)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="moving"):
        fn(a, bad)
    with pytest.raises(ValueError, match="mask"):
        fn(a, b, mask=np.zeros((5, 6), bool))
    with pytest.raises(ValueError, match="mask"):
        fn(a, b, mask=np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="mask"):
        fn(a, b, mask=np.full((5, 6), 0.5))
    with pytest.raises(ValueError, match="fixed"):
        fn(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="moving"):
        fn(a, b.astype(complex))
    with pytest.raises(ValueError, match="spacing"):
        fn(a, b, spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="spacing"):
        fn(a, b, spacing=(1.0, 1.0, 1.0))


def test_specific_errors():
    a = np.zeros((5, 6))
    b = np.ones((5, 6))
    with pytest.raises(ValueError, match="radius"):
        mt.lncc(a, b, radius=0.0)
    with pytest.raises(ValueError, match="radius"):
        mt.lncc(a, b, radius=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="eps"):
        mt.lncc(a, b, eps=-1.0)
    with pytest.raises(ValueError, match="bins"):
        mt.mattes_mi(a, b, bins=3)
    with pytest.raises(ValueError, match="bins"):
        mt.mattes_mi(a, b, bins=(32, 32, 32))
    with pytest.raises(ValueError, match="moving_limits"):
        mt.mattes_mi(a, b, moving_limits=(2.0, 1.0))
    with pytest.raises(ValueError, match="fixed_limits"):
        mt.mattes_mi(a, b, fixed_limits=3.0)
    with pytest.raises(ValueError, match="limit_range_ratio"):
        mt.mattes_mi(a, b, limit_range_ratio=-0.1)
    with pytest.raises(ValueError, match="eps"):
        mt.ngf(a, b, eps=(1.0, np.nan))
    with pytest.raises(ValueError, match="mask"):
        mt.intensity_limits(a, mask=np.zeros((5, 6), bool))
