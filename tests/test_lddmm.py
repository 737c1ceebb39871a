"""register_lddmm: adjoint gradient, geodesic property, recovery of a shot target, outputs, determinism, errors."""
import functools
import importlib
import itertools
import math

import numpy as np
import pytest
from classreg.kernels.adjoint import (
    add_sample_adjoint,
    det_cofactor,
    gradient_transpose,
    jacobian_norm_max,
    momentum_adjoint,
    sample_linear,
    splat_linear,
    velocity_adjoint,
)
from classreg.kernels.diff import gradient, jacobian_determinant, jacobian_matrix
from conftest import backend_params
from scipy import ndimage

import classreg as cr
from classreg import evaluate
from classreg.solvers.lddmm import GeodesicShooting, LNCCTerm, SSDTerm, kernel_operator
from classreg.solvers.lddmm import step as lddmm_step
from classreg.solvers.lddmm.objective import data_term

_CPU = [p for p in backend_params() if p.id != "cuda"]


# ------------------------------------------------------------------------------------------------ helpers
def _smooth(shape, rng, s):
    a = ndimage.gaussian_filter(rng.normal(size=shape), s)
    return (a - a.min()) / (a.max() - a.min())


def _phantom(shape, h, smooth=2.5):
    """An ellipsoid and a smaller brighter blob, smoothed; plus a P₀ window vanishing near the border."""
    nd = len(shape)
    c = np.indices(shape) * np.asarray(h, dtype=float).reshape((nd,) + (1,) * nd)
    ext = np.asarray(shape) * np.asarray(h)
    r2 = sum(((c[i] - ext[i] / 2) / (0.3 * ext[i])) ** 2 for i in range(nd))
    blob = sum((c[i] - f * ext[i]) ** 2 for i, f in zip(range(nd), (0.3, 0.7, 0.5))) < (0.12 * ext[0]) ** 2
    img = ndimage.gaussian_filter((r2 < 1).astype(float), smooth) + 0.5 * ndimage.gaussian_filter(
        blob.astype(float), smooth)
    return img / img.max(), np.exp(-(r2 ** 4) / 2)


def _shot_pair(shape=(48, 48), h=(1.5, 1.25), kernel_sigma=5.0, n_steps=20, max_disp=3.0, seed=0):
    I0, win = _phantom(shape, h)
    P0 = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0) * win
    op = kernel_operator(shape, h, kernel_sigma=kernel_sigma)
    sh = GeodesicShooting(I0, h, op, n_steps)
    P0 *= max_disp / np.abs(sh.forward(P0).u[-1] * np.asarray(h)).max()
    return I0, P0, sh


def _fd_check(sh, data, P0, rng, n_dir=4, eps=1e-5):
    _, g, _, _ = sh.energy_and_gradient(P0, data)
    errs = []
    for _ in range(n_dir):
        d = rng.normal(size=P0.shape)
        fd = (sh.energy(P0 + eps * d, data)[0] - sh.energy(P0 - eps * d, data)[0]) / (2 * eps)
        an = float(np.sum(g * d))
        errs.append(abs(fd - an) / abs(an))
    return max(errs)


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("backend", _CPU)
@pytest.mark.parametrize("nd", [2, 3])
def test_sample_splat_parity_derivative_and_adjoint(backend, nd):
    rng = np.random.default_rng(nd)
    shape = (7, 9, 6)[:nd]
    img = rng.normal(size=shape + (2,))
    pts = rng.uniform(-1.5, np.asarray(shape) + 0.5, size=(5, 4, nd))
    v, g = sample_linear(img, pts, gradient=True, backend=backend)
    v0, g0 = sample_linear(img, pts, gradient=True, backend="numpy")
    np.testing.assert_allclose(v, v0, atol=1e-12)
    np.testing.assert_allclose(g, g0, atol=1e-12)
    for a in range(nd):  # exact derivative of the interpolant w.r.t. the sample position
        d = np.zeros(nd)
        d[a] = 1e-6
        fd = (sample_linear(img, pts + d, backend=backend) - sample_linear(img, pts - d, backend=backend)) / 2e-6
        np.testing.assert_allclose(fd, g[..., a], atol=1e-7)
    w = rng.normal(size=(5, 4, 2))
    s = splat_linear(w, pts, shape, backend=backend)
    np.testing.assert_allclose(s, splat_linear(w, pts, shape, backend="numpy"), atol=1e-12)
    assert abs(np.sum(sample_linear(img, pts, backend=backend) * w) - np.sum(img * s)) < 1e-10
    # integer points reproduce the samples exactly (also the last one)
    grid = np.stack(np.indices(shape), -1).astype(float)
    np.testing.assert_array_equal(sample_linear(img, grid, backend=backend), img)
    # float32 stays float32
    assert sample_linear(img.astype(np.float32), pts.astype(np.float32), backend=backend).dtype == np.float32


def test_gradient_transpose_is_exact():
    rng = np.random.default_rng(0)
    for shape, h in (((7, 9), (0.7, 1.3)), ((5, 6, 4), (1.0, 2.0, 0.5)), ((2, 5), (1.0, 1.0))):
        f = rng.normal(size=shape)
        g = rng.normal(size=shape + (len(shape),))
        lhs = np.sum(gradient(f, spacing=h, backend="numpy") * g)
        assert abs(lhs - np.sum(f * gradient_transpose(g, spacing=h))) < 1e-10
    with pytest.raises(ValueError, match="shape"):
        gradient_transpose(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="backend"):
        sample_linear(np.zeros((4, 4)), np.zeros((2, 2)), backend="cuda")


@pytest.mark.parametrize("backend", _CPU)
@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 4), (2, 5), (48, 40, 36)])
def test_reverse_sweep_kernels_match_numpy(backend, shape):
    """Fused kernels of the reverse sweep vs their numpy references (the last shape runs the parallel variants)."""
    rng = np.random.default_rng(3)
    nd = len(shape)
    h = (0.7, 1.3, 2.0)[:nd]
    f, w = rng.normal(size=shape), rng.normal(size=shape)
    g, G = rng.normal(size=shape + (nd,)), rng.normal(size=shape + (3, nd))
    # gradient_transpose: exact transpose of the gradient stencil, with channels and a fused weight
    assert abs(np.sum(gradient(f, spacing=h, backend="numpy") * g)
               - np.sum(f * gradient_transpose(g, spacing=h, backend=backend))) < 1e-9 * np.sqrt(f.size)
    ref = np.stack([gradient_transpose(G[..., c, :] * w[..., None], spacing=h, backend="numpy") for c in range(3)],
                   -1)
    np.testing.assert_allclose(gradient_transpose(G, spacing=h, ndim=nd, weight=w, backend=backend), ref,
                               atol=1e-12)
    # det_cofactor: determinant of the map's Jacobian and its derivative
    u = 0.3 * rng.normal(size=shape + (nd,))
    det, cof = det_cofactor(u, backend=backend)
    A = jacobian_matrix(u, spacing=1.0, of_map=True, backend="numpy")
    np.testing.assert_allclose(det, np.linalg.det(A), atol=1e-12)
    np.testing.assert_allclose(np.einsum("...ij,...kj->...ik", A, cof), det[..., None, None] * np.eye(nd),
                               atol=1e-12)  # A cofᵀ = det I
    np.testing.assert_allclose(jacobian_norm_max(u, spacing=h, backend=backend),
                               np.sqrt(np.max(np.sum(jacobian_matrix(u, spacing=h, of_map=False,
                                                                     backend="numpy") ** 2, axis=(-2, -1)))))
    du, c = rng.normal(size=shape + (nd, nd)), rng.normal(size=nd)
    np.testing.assert_allclose(velocity_adjoint(g, du, c, backend=backend),
                               (g + np.einsum("...c,...cj->...j", g, du)) * c, atol=1e-12)
    m, Q = rng.normal(size=shape + (nd,)), rng.normal(size=shape)
    for a, b in zip(momentum_adjoint(g, m, det, Q, backend=backend),
                    (np.sum(g * m, -1), np.sum(g * m, -1) * det, np.sum(g * m, -1) * Q)):
        np.testing.assert_allclose(a, b, atol=1e-12)
    ds = rng.normal(size=shape + (2, nd))
    out = add_sample_adjoint(g.copy(), f, w, ds, backend=backend)
    np.testing.assert_allclose(out, g + f[..., None] * ds[..., 1, :] + w[..., None] * ds[..., 0, :], atol=1e-12)


@pytest.mark.parametrize("backend", _CPU)
def test_multiscale_gaussian_kernel(backend):
    """K = (1/n) Σ G_σᵢ (Risser et al. 2011): the mean of the single Gaussians, symmetric (the adjoint needs
    Kᵀ = K), unit sum in the interior; one σ (a number or a one-element list) is the single Gaussian itself."""
    from classreg.solvers.lddmm import GaussianKernel, MultiGaussianKernel

    rng = np.random.default_rng(3)
    shape, h = (48, 36), (1.0, 1.5)
    u, w = rng.normal(size=shape + (2,)), rng.normal(size=shape + (2,))
    K = kernel_operator(shape, h, kernel_sigma=(2.0, 5.0), backend=backend)
    assert isinstance(K, MultiGaussianKernel) and K.sigmas == (2.0, 5.0)
    singles = [GaussianKernel(shape, h, s, backend=backend).apply(u) for s in (2.0, 5.0)]
    np.testing.assert_allclose(K.apply(u), 0.5 * (singles[0] + singles[1]), rtol=1e-12, atol=1e-12)
    assert abs(np.sum(K.apply(u) * w) - np.sum(u * K.apply(w))) < 1e-9 * np.abs(u).sum()
    delta = np.zeros(shape)
    delta[24, 18] = 1.0
    assert abs(K.apply(delta).sum() - 1.0) < 1e-6  # 4σ of the largest σ fits inside the grid around the impulse
    for one in (3.0, [3.0], np.array([3.0])):
        assert type(kernel_operator(shape, h, kernel_sigma=one, backend=backend)) is GaussianKernel


@pytest.mark.parametrize("value, error, match", [
    ((2.0, 0.0), ValueError, "> 0"), ((2.0, -1.0), ValueError, "> 0"), ((2.0, np.inf), ValueError, "finite"),
    ((2.0, np.nan), ValueError, "finite"), ((), ValueError, "empty"), (("a",), TypeError, "numbers")])
def test_kernel_sigma_is_validated(value, error, match):
    fixed = moving = cr.Image(np.zeros((8, 8), np.float32), (1.0, 1.0))  # refused before any work
    for solver in (cr.register_metamorphosis, functools.partial(cr.register_lddmm, method="full")):
        with pytest.raises(error, match=match):
            solver(fixed, moving, kernel_sigma=value, iterations=(1, 1, 1))


def test_multiscale_kernel_needs_the_full_grid_gaussian_engine():
    fixed = moving = cr.Image(np.zeros((8, 8), np.float32), (1.0, 1.0))  # refused before any work
    for kw in ({}, {"method": "bandlimited"}, {"method": "full", "kernel": "sobolev"}):
        with pytest.raises(ValueError, match="method='full'"):
            cr.register_lddmm(fixed, moving, kernel_sigma=(2.0, 4.0), iterations=(1, 1, 1), **kw)


# ------------------------------------------------------------------------------------------------ gradient check
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("backend", _CPU)
def test_adjoint_gradient_matches_finite_differences(nd, backend):
    rng = np.random.default_rng(1)
    shape = (20, 18) if nd == 2 else (10, 12, 11)
    h = (1.2, 0.9) if nd == 2 else (1.5, 1.0, 1.2)
    I0, J = _smooth(shape, rng, 2.0), _smooth(shape, rng, 2.0)
    sh = GeodesicShooting(I0, h, kernel_operator(shape, h, kernel_sigma=2.0), 8, backend=backend)
    data = SSDTerm(J, 0.01, np.prod(h), fixed_weight=(_smooth(shape, rng, 3) > 0.3).astype(float),
                   backend=backend)
    P0 = ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * 60.0  # displacements of ~1-2 voxels
    assert np.abs(sh.forward(P0).u[-1]).max() > 0.5
    assert _fd_check(sh, data, P0, rng) <= 1e-4


@pytest.mark.parametrize("case", ["lncc", "sobolev", "moving_mask", "source"])
def test_adjoint_gradient_variants(case):
    """LNCC data term, Sobolev kernel, differentiated moving mask, and the intensity source of §2 (metamorphosis)."""
    rng = np.random.default_rng(2)
    nd = 3 if case == "source" else 2
    shape = (20, 18) if nd == 2 else (9, 10, 8)
    h = (1.2, 0.9) if nd == 2 else (1.5, 1.0, 1.2)
    I0, J = _smooth(shape, rng, 2.0), _smooth(shape, rng, 2.0)
    kern = {"kernel": "sobolev", "alpha": 1.0, "order": 2} if case == "sobolev" else {"kernel_sigma": 2.0}
    src = {"source_mu": 0.3, "source_weights": _smooth(shape, rng, 3.0)} if case == "source" else {}
    sh = GeodesicShooting(I0, h, kernel_operator(shape, h, **kern), 6, **src)
    if case == "lncc":
        data = LNCCTerm(J, 0.01, np.prod(h), radius=2.0, spacing=h)
    else:
        data = SSDTerm(J, 0.01, np.prod(h), moving_weight=_smooth(shape, rng, 3.0) if case == "moving_mask" else None)
    P0 = ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * 40.0
    assert _fd_check(sh, data, P0, rng, n_dir=3) <= 1e-4


# ------------------------------------------------------------------------------------------------ geodesic property
def test_shooting_conserves_the_velocity_norm():
    _, P0, sh = _shot_pair()
    norms = np.asarray(sh.velocity_norms(P0))
    assert len(norms) == sh.n + 1
    assert (norms.max() - norms.min()) / norms[0] < 0.02
    assert norms[0] == pytest.approx(sh.geodesic_length(P0), rel=1e-9)


def test_registration_recovers_a_shot_target_and_its_geodesic_length():
    h = (1.5, 1.25)
    I0, P0, sh = _shot_pair(h=h, n_steps=10)
    J = sh.forward(P0).I1
    length = sh.geodesic_length(P0)
    fixed, moving = cr.Image(J.astype(np.float32), h[::-1]), cr.Image(I0.astype(np.float32), h[::-1])
    r = cr.register_lddmm(fixed, moving, metric="ssd", kernel_sigma=5.0, data_sigma=5e-4, n_steps=10,
                          shrink_factors=(2, 1), iterations=(30, 120), tol=1e-10, dtype=np.float64, method="full")
    assert r.metrics["ssd_after"] < 0.01 * r.metrics["ssd_before"]
    assert r.metrics["geodesic_length"] == pytest.approx(length, rel=0.05)
    assert r.metrics["min_det"] > 0
    assert {h_["level"] for h_ in r.history} == {0, 1}
    # φ₁ and φ₁⁻¹ both come from the flow: inverse consistent to interpolation accuracy, no fixed-point inversion
    assert r.transform.inverse() is r.inverse
    assert r.metrics["inverse_error_voxels"] < 0.2
    ic = evaluate.inverse_consistency(r.transform, r.inverse, reference=fixed)
    assert ic["mean_voxels"] < 0.05
    assert evaluate.jacobian_stats(r.transform)["num_nonpositive"] == 0
    assert r.extras["P0"].shape == fixed.shape


def test_mutual_information_registers_a_non_monotone_intensity_pair():
    """metric="mi": the moving image is the shot pair's source through a non-monotone intensity map g (dark and
    bright both become bright), so no linear relation, local or global, links it to the target. Mattes MI brings
    the warped image close to g(target) — mean squared error 0.00074 against 0.0051 unregistered, measured — while
    LNCC (0.0098) and SSD (0.35) move it away: the case needs MI. Bound: ≤ ¼ of the unregistered error."""
    h = (1.5, 1.25)
    I0, P0, sh = _shot_pair(h=h, n_steps=10)
    J = sh.forward(P0).I1

    def g(img):
        return 4.0 * (img - 0.5) ** 2

    fixed, moving = cr.Image(J.astype(np.float32), h[::-1]), cr.Image(g(I0).astype(np.float32), h[::-1])
    before = float(np.mean((g(I0) - g(J)) ** 2))
    errors = {}
    for metric in ("mi", "lncc"):
        r = cr.register_lddmm(fixed, moving, metric=metric, shrink_factors=(2, 1), iterations=(30, 60))
        errors[metric] = float(np.mean((r.warped.data - g(J)) ** 2))
        assert r.metrics["min_det"] > 0
    assert r.params["metric"] == "lncc"
    assert errors["mi"] <= 0.25 * before
    assert errors["lncc"] > 0.5 * before  # the control: a correlation does not explain g


# ------------------------------------------------------------------------------------------------ stability
def test_unstable_momentum_is_rejected_and_more_steps_restore_it():
    """A momentum too large for n_t steps: the explicit momentum update blows up (the velocity grows along a path
    that should conserve ‖v‖_V), the shooting is aborted at the stability limit, and the step count chosen by
    ``refined_steps`` brings δt·max‖Dv‖ back to the target with a folding-free map."""
    I0, P0, sh = _shot_pair(n_steps=10)
    J = sh.forward(P0).I1
    data = SSDTerm(J, 1e-4, sh.cell)
    big = 12.0 * P0
    path = sh.forward(big)
    assert path.stability > lddmm_step.STABILITY_LIMIT
    E, _, _, p2, seed = sh.evaluate(big, data, stability_limit=lddmm_step.STABILITY_LIMIT)
    assert E == math.inf and p2.aborted and seed is None and p2.I1 is None
    n = lddmm_step.refined_steps(10, path.stability, 1000)
    assert n > 10
    fine = GeodesicShooting(I0, sh.h, sh.K, n).forward(big)
    assert fine.stability <= 1.5 * lddmm_step.STABILITY_TARGET
    assert jacobian_determinant(fine.u[-1], spacing=1.0).min() > 0
    assert lddmm_step.refined_steps(10, 0.05, 40) == 10 and lddmm_step.refined_steps(10, math.inf, 40) == 20
    assert lddmm_step.refined_steps(30, 0.5, 40) == 40
    # at the step bound, the largest stable multiple of the momentum is used instead (carried momenta, shocks)
    P, (E, _, _, p3, seed), _ = lddmm_step.scale_to_stable(sh, big, data)
    assert math.isfinite(E) and seed is not None and p3.stability <= lddmm_step.STABILITY_TARGET
    c = float(np.sum(P * big) / np.sum(big * big))
    assert 0.05 < c < 1.0 and np.allclose(P, c * big)


@pytest.mark.parametrize("method", ["full", "bandlimited"])
def test_large_intensity_mismatch_does_not_fold(method):
    """Regression for the brain2d divergence: a moving image on a 100× larger intensity scale, registered by SSD with
    intensity="joint", made the optimiser accept momenta whose 10-step flow had δt·max‖Dv‖ ≫ 1 and folded the map
    (here min det J = −0.13, inverse error 18 voxels; brain2d: det J −1e10). Now every accepted energy is finite and
    non-increasing within a level, the stiff flow gets more time steps, and the map stays a diffeomorphism."""
    fixed, moving = _growth_pair((32, 32))
    moving = moving.like(moving.data * 100.0)
    r = cr.register_lddmm(fixed, moving, metric="ssd", intensity="joint", shrink_factors=(2, 1),
                          iterations=(10, 10), method=method)
    assert r.params["intensity_used"] == "joint"
    assert r.metrics["min_det"] > 0
    assert evaluate.jacobian_stats(r.transform)["num_nonpositive"] == 0
    control = lddmm_step if method == "full" else importlib.import_module("classreg.solvers.lddmm.bl_step")
    assert r.metrics["stability"] <= control.STABILITY_LIMIT
    if method == "full":  # the point-wise momentum's flow is stiff; the band-limited velocity's is not
        assert r.metrics["time_steps"] > r.params["n_steps"]  # the flow needed more than 10 steps
    assert r.metrics["ssd_after"] < 0.2 * r.metrics["ssd_before"]
    for level in (0, 1):  # energies never increase while the discretisation (level, time steps) is fixed
        rows = [h_ for h_ in r.history if h_["level"] == level]
        assert rows and all(math.isfinite(h_["energy"]) for h_ in rows)
        assert all(b["energy"] <= a["energy"] for a, b in itertools.pairwise(rows)
                   if a["time_steps"] == b["time_steps"])


@pytest.mark.parametrize("method", ["full", "bandlimited"])
def test_line_search_rejects_non_finite_energies(monkeypatch, method):
    """A data term that returns NaN once the SSD falls below half its initial value: no such point is accepted."""
    fixed, moving = _growth_pair((24, 24))

    def wrapped(*args, **kwargs):
        term = data_term(*args, **kwargs)
        first = []

        def call(I1, X, gradient=True):
            e, dI, dX = term(I1, X, gradient=gradient)
            first.append(e)
            return (math.nan if e < 0.5 * first[0] else e), dI, dX

        return call

    for module in ("step", "bl_step", "register"):  # the pyramid levels and the final shooting
        monkeypatch.setattr(importlib.import_module(f"classreg.solvers.lddmm.{module}"), "data_term", wrapped)
    r = cr.register_lddmm(fixed, moving, metric="ssd", shrink_factors=(1,), iterations=(15,), method=method)
    d = [h_["metric"] for h_ in r.history]
    assert d and all(math.isfinite(x) for x in d)
    assert min(d) >= 0.5 * d[0] * 0.5  # every accepted data term is above the NaN threshold (first iterate's half)
    assert all(b["energy"] <= a["energy"] for a, b in zip(r.history, r.history[1:])
               if a["time_steps"] == b["time_steps"])


def test_auto_intensity_matches_histograms_only_for_different_scales():
    fixed, moving = _growth_pair((16, 16))
    kw = {"shrink_factors": (1,), "iterations": (0,)}
    assert cr.register_lddmm(fixed, moving, **kw).params["intensity_used"] == "joint"
    assert cr.register_lddmm(fixed, moving.like(moving.data * 227.0), **kw).params["intensity_used"] == "match"
    assert cr.register_lddmm(fixed, moving.like(moving.data * 227.0), intensity="joint",
                             **kw).params["intensity_used"] == "joint"


def test_auto_metric_lncc_on_one_scale_mi_across_scales_and_its_data_sigma(caplog):
    """metric="auto" (the default): LNCC (data σ 0.05) for a pair on one intensity scale, MI (data σ 0.11) when the
    moving image is stored at half the fixed image's range or in other units; logged, recorded, the same run as the
    explicit metric; an explicit data_sigma wins; on the device, which has no MI term, "auto" is LNCC."""
    import logging

    from classreg.solvers._common import same_intensity_scale
    from classreg.solvers.lddmm.register import _resolve_data

    fixed, moving = _growth_pair((16, 16))
    kw = {"shrink_factors": (1,), "iterations": (2,)}
    half = moving.like(moving.data * 0.5)  # inter3d's case: ITK's T1 at half MNI152's range
    assert same_intensity_scale(fixed, moving)[0] and not same_intensity_scale(fixed, half)[0]
    with caplog.at_level(logging.INFO, logger="classreg"):
        same = cr.register_lddmm(fixed, moving, **kw)
        across = cr.register_lddmm(fixed, half, **kw)
    assert (same.params["metric"], same.params["data_sigma"], same.params["intensity_used"]) == (
        "lncc", 0.05, "joint")
    assert (across.params["metric"], across.params["data_sigma"], across.params["intensity_used"]) == (
        "mi", 0.11, "match")
    assert "metric='auto' -> 'lncc'" in caplog.text and "metric='auto' -> 'mi'" in caplog.text
    explicit = cr.register_lddmm(fixed, half, metric="mi", data_sigma=0.11, **kw)
    np.testing.assert_array_equal(explicit.transform.displacement, across.transform.displacement)
    assert cr.register_lddmm(fixed, half, data_sigma=0.2, **kw).params["data_sigma"] == 0.2
    assert cr.register_lddmm(fixed, moving, metric="ssd", **kw).params["data_sigma"] == 0.05
    assert _resolve_data("auto", "auto", fixed, half, None, None, "cuda") == ("lncc", "match")
    assert _resolve_data("ssd", "auto", fixed, half, None, None, "cpu") == ("ssd", "match")


# ------------------------------------------------------------------------------------------------ solver behaviour
def _growth_pair(shape=(48, 48), spacing=(1.0, 1.0)):
    """A disc that grows and pushes two neighbours away (the weighted-metamorphosis toy, small)."""
    yy, xx = np.indices(shape).astype(float)
    cy, cx = shape[0] / 2, shape[1] / 2

    def img(r, push):
        a = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(float)
        a += 0.6 * (((yy - cy) ** 2 / 9 + (xx - cx + 14 + push) ** 2 / 16) < 1)
        a += 0.6 * (((yy - cy) ** 2 / 9 + (xx - cx - 14 - push) ** 2 / 16) < 1)
        return ndimage.gaussian_filter(a, 1.0).astype(np.float32)

    return cr.Image(img(8.0, 3.0), spacing), cr.Image(img(5.0, 0.0), spacing)


def test_growth_toy_registers_without_folding():
    fixed, moving = _growth_pair()
    r = cr.register_lddmm(fixed, moving, shrink_factors=(2, 1), iterations=(20, 20), data_sigma=0.02)
    assert r.metrics["ssd_after"] < 0.15 * r.metrics["ssd_before"]
    stats = evaluate.jacobian_stats(r.transform)
    assert stats["min_det"] > 0 and r.metrics["min_det"] > 0
    assert stats["min_det"] < 0.8 and stats["max_det"] > 1.2  # a large deformation: compression and expansion
    assert r.warped.shape == fixed.shape and r.warped.spacing == fixed.spacing


def test_3d_anisotropic_with_init_and_masks():
    h = (1.0, 1.5, 1.2)  # x, y, z
    I0, _ = _phantom((14, 16, 18), h[::-1], smooth=1.5)
    fixed = cr.Image(I0.astype(np.float32), h, origin=(3.0, -2.0, 5.0))
    shift = cr.Affine(np.eye(3), translation=(1.5, -1.0, 0.8))
    moving = cr.resample(fixed, shift.inverse(), reference=fixed)  # moving(x) = fixed(x - t)
    mask = np.ones(fixed.shape, bool)
    mask[:2] = False
    r0 = cr.register_lddmm(fixed, moving, init=shift, shrink_factors=(1,), iterations=(5,), fixed_mask=mask,
                           moving_mask=np.ones(moving.shape, bool))
    assert isinstance(r0.transform, cr.Chain) and isinstance(r0.inverse, cr.Chain)
    assert r0.metrics["ssd_before"] < 0.05 * cr.register_lddmm(fixed, moving, shrink_factors=(1,),
                                                                 iterations=(0,)).metrics["ssd_before"]
    r = cr.register_lddmm(fixed, moving, shrink_factors=(2, 1), iterations=(10, 10), kernel="sobolev",
                          return_trajectory=True)
    assert r.metrics["ssd_after"] < 0.6 * r.metrics["ssd_before"]
    assert r.metrics["min_det"] > 0
    traj_i, traj_v = r.extras["trajectory_images"], r.extras["trajectory_velocities"]
    assert len(traj_i) == len(traj_v) == r.params["n_steps"] + 1
    assert traj_v[0].shape == fixed.shape + (3,)
    np.testing.assert_allclose(traj_i[0], moving.data, atol=1e-5)


def test_params_history_progress_and_callback_stop(tmp_path):
    fixed, moving = _growth_pair((24, 24))
    events = []

    def cb(ev):
        events.append(ev)
        if ev.stage == "iteration" and ev.iteration == 2:
            raise cr.StopRegistration

    r = cr.register_lddmm(fixed, moving, shrink_factors=(1,), iterations=(10,), callback=cb, seed=5)
    assert not r.converged and r.stop_reason == "stopped by callback"
    assert [e.stage for e in events][:2] == ["start", "level_start"]
    assert sum(e.stage == "iteration" for e in events) == 3
    for key in ("kernel", "kernel_sigma", "data_sigma", "n_steps", "shrink_factors", "smoothing_sigmas",
                "iterations", "tol", "metric", "intensity", "dtype", "seed", "init", "backend", "threads",
                "versions", "fixed_mask", "moving_mask", "optimizer"):
        assert key in r.params, key
    assert r.params["seed"] == 5
    assert r.metrics["geodesic_length"] > 0
    assert r.params["method"] == "bandlimited" and r.params["cutoff"] == 0.2
    out = r.save(tmp_path / "res", extras=True)
    back = cr.load_result(out)
    z = r.extras["velocity_coefficients"]
    assert z.ndim == 3 and z.shape[0] == 2 and np.abs(z).max() > 0
    np.testing.assert_allclose(back.extras["velocity_coefficients"], z)


@pytest.mark.parametrize("method,key", [("full", "P0"), ("bandlimited", "velocity_coefficients")])
def test_deterministic_on_cpu(method, key):
    fixed, moving = _growth_pair((24, 24))
    kw = {"shrink_factors": (2, 1), "iterations": (4, 4), "method": method}
    a = cr.register_lddmm(fixed, moving, **kw)
    b = cr.register_lddmm(fixed, moving, **kw)
    np.testing.assert_array_equal(a.extras[key], b.extras[key])
    np.testing.assert_array_equal(a.transform.displacement, b.transform.displacement)


def test_bad_input_errors():
    fixed, moving = _growth_pair((16, 16))
    with pytest.raises(TypeError, match="fixed must be a classreg.Image"):
        cr.register_lddmm(np.zeros((8, 8)), moving)
    with pytest.raises(ValueError, match="dimension mismatch"):
        cr.register_lddmm(fixed, cr.Image(np.ones((8, 8, 8), np.float32), (1, 1, 1)))
    with pytest.raises(ValueError, match="metric"):
        cr.register_lddmm(fixed, moving, metric="nmi")
    import classreg.solvers.lddmm.register as reg

    with pytest.MonkeyPatch.context() as mp:  # a device run: MI's histogram is host code, refused there
        mp.setattr(reg, "placement", lambda *a: ("cuda", "cuda"))
        with pytest.raises(ValueError, match="metric='mi' runs on the CPU only"):
            cr.register_lddmm(fixed, moving, metric="mi")
    with pytest.raises(ValueError, match="kernel"):
        cr.register_lddmm(fixed, moving, kernel="cauchy")
    with pytest.raises(ValueError, match="kernel_sigma"):
        cr.register_lddmm(fixed, moving, kernel_sigma=-1.0)
    with pytest.raises(ValueError, match="data_sigma"):
        cr.register_lddmm(fixed, moving, data_sigma=0.0)
    with pytest.raises(ValueError, match="n_steps"):
        cr.register_lddmm(fixed, moving, n_steps=0)
    with pytest.raises(ValueError, match="constant"):
        cr.register_lddmm(fixed, fixed.like(np.ones(fixed.shape, np.float32)))
    with pytest.raises(ValueError, match="fixed_mask is empty"):
        cr.register_lddmm(fixed, moving, fixed_mask=np.zeros(fixed.shape, bool))
    with pytest.raises(TypeError, match="init"):
        cr.register_lddmm(fixed, moving, init="identity")
    with pytest.raises(ValueError, match="dtype"):
        cr.register_lddmm(fixed, moving, dtype=np.int32)
    with pytest.raises(ValueError, match="at least 4 voxels"):
        cr.register_lddmm(cr.Image(np.random.rand(3, 8).astype(np.float32), (1, 1)), moving)
    with pytest.raises(ValueError, match="NaN|finite"):
        cr.register_lddmm(fixed, moving.like(np.full(moving.shape, np.nan, np.float32)))


def test_cli_register_lddmm(tmp_path):
    """The generated ``classreg register lddmm`` (``--n-steps``, not the old ``--steps``), and the reported geodesic
    length: sqrt(2 · regularisation), and ‖v₀‖_V = ⟨m₀, K⋆m₀⟩^½ (m₀ = P₀∇I₀, physical integral) recomputed here
    from the written P₀ and the normalised moving image with numpy.gradient and the kernel operator (float32
    operations in another order: rel 1e-5)."""
    from classreg.cli import main
    from classreg.solvers._common import normalise_intensities

    fixed, moving = _growth_pair((24, 24))
    cr.save(fixed, tmp_path / "f.nii.gz")
    cr.save(moving, tmp_path / "m.nii.gz")
    rc = main(["register", "lddmm", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
               str(tmp_path / "out"), "--shrink-factors", "1", "--iterations", "3", "--n-steps", "6", "--no-qc", "-q",
               "--save-extras", "--method", "full"])
    assert rc == 0
    res = cr.load_result(tmp_path / "out")
    assert isinstance(res.transform, cr.DisplacementField)
    assert res.params["n_steps"] == 6 and res.params["iterations"] == [3] and res.params["intensity_used"] == "joint"
    m, P0 = res.metrics, res.extras["P0"]
    assert np.abs(P0).max() > 0 and m["regularization"] > 0
    assert m["geodesic_length"] == pytest.approx(math.sqrt(2.0 * m["regularization"]), rel=1e-12)
    _, template = normalise_intensities(fixed, moving, None, "joint", np.float32)
    h = fixed.spacing_array_order
    m0 = P0[..., None] * np.stack(np.gradient(template.data, *h), axis=-1)
    K = kernel_operator(fixed.shape, h, kernel_sigma=3.0 * max(fixed.spacing))
    length = math.sqrt(np.prod(h) * float(np.sum(m0.astype(np.float64) * K.apply(m0))))
    assert m["geodesic_length"] == pytest.approx(length, rel=1e-5)
