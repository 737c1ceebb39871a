"""register_points: BCPD / multi-organ BCPD (Hirose, TPAMI 2021; MO-BCPD, WBIR 2022), its kernels, transforms,
helpers and CLI."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from classreg.kernels import _backend
from classreg.kernels import points as kp

import classreg
from classreg import Image, StopRegistration, register_points
from classreg.solvers import points
from classreg.solvers.points import bcpd
from classreg.transforms import Affine, rotation_matrix

# ------------------------------------------------------------------------------------------------ phantoms
# Four organ-like ellipsoids (centre, radii in mm) packed with 5-10 mm gaps, as in an abdomen.
ORGANS = [
    (np.array([-32.0, 0.0, 0.0]), np.array([30.0, 22.0, 18.0])),
    (np.array([18.0, 8.0, 0.0]), np.array([16.0, 14.0, 14.0])),
    (np.array([0.0, -30.0, 3.0]), np.array([14.0, 10.0, 16.0])),
    (np.array([-8.0, 20.0, 24.0]), np.array([16.0, 12.0, 10.0])),
]
# independent motion per organ: neighbours slide past each other by up to 20 mm
TRANSLATIONS = np.array([[0.0, 10.0, 0.0], [0.0, -10.0, 2.0], [8.0, 0.0, -6.0], [-6.0, -4.0, 8.0]])


def _ellipsoid_surface(k, n, rng):
    c, r = ORGANS[k]
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    th = np.pi * (1 + 5**0.5) * i + rng.uniform(0, 2 * np.pi)
    u = np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], 1)
    u = u + rng.normal(scale=0.02, size=u.shape)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return c + u * r


def _motions(rng):
    out = []
    for k, (c, _) in enumerate(ORGANS):
        R = rotation_matrix(rng.uniform(-1, 1, 3) * np.radians(8))
        cen = c + rng.normal(scale=10, size=(6, 3))
        amp = rng.normal(scale=1.5, size=(6, 3))
        out.append((R, TRANSLATIONS[k], c, cen, amp))
    return out


def _warp(p, cen, amp):
    return (np.exp(-((p[:, None, :] - cen[None]) ** 2).sum(-1) / (2 * 15.0**2))) @ amp


def _apply_motion(p, lab, mots):
    out = np.empty_like(p)
    for k, (R, t, c, cen, amp) in enumerate(mots):
        m = lab == k
        q = p[m] + _warp(p[m], cen, amp)  # smooth deformation of the organ, then its own rigid motion
        out[m] = (q - c) @ R.T + c + t
    return out


def _inside_target_organ(q, k, mots, margin=1.0):
    R, t, c, cen, amp = mots[k]
    base = (q - c - t) @ R + c
    p = base.copy()
    for _ in range(30):  # invert the smooth warp by fixed-point iteration
        p = base - _warp(p, cen, amp)
    r = ORGANS[k][1]
    return np.linalg.norm((p - c) / r, axis=1) < 1 - margin / r.max()


def make_organs():
    """The synthetic four-organ case (fixed seed); also used by benchmarks/points.py."""
    rng = np.random.default_rng(0)
    mots = _motions(rng)
    ns, nt = 200, 220
    Y = np.concatenate([_ellipsoid_surface(k, ns, rng) for k in range(4)])
    ly = np.repeat(np.arange(4), ns)
    X0 = np.concatenate([_ellipsoid_surface(k, nt, rng) for k in range(4)])  # different samples of the surfaces
    lx = np.repeat(np.arange(4), nt)
    X = _apply_motion(X0, lx, mots)
    lm, llm = [], []
    for k, (c, r) in enumerate(ORGANS):  # held-out landmarks inside the organs
        u = rng.normal(size=(25, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        lm.append(c + u * r * rng.uniform(0.2, 0.8, (25, 1)))
        llm.append(np.full(25, k))
    lm, llm = np.concatenate(lm), np.concatenate(llm)
    lx_bad = lx.copy()
    bad = rng.choice(len(lx), len(lx) // 10, replace=False)
    lx_bad[bad] = (lx[bad] + rng.integers(1, 4, len(bad))) % 4
    return {"Y": Y, "ly": ly, "X": X, "lx": lx, "lx_bad": lx_bad, "lm": lm, "llm": llm,
            "lm_t": _apply_motion(lm, llm, mots), "mots": mots}


@pytest.fixture(scope="module")
def organs():
    return make_organs()


MO_KW = {"deformation": 100.0, "bandwidth": 30.0, "max_iter": 200, "tol": 1e-3}


def _tre(res, o, labels=True):
    pred = res.inverse.map_points(o["lm"], o["llm"] if labels else None)
    return float(np.linalg.norm(pred - o["lm_t"], axis=1).mean())


def _interpenetration(res, o):
    W = res.apply_points(o["Y"])
    return max(float(_inside_target_organ(W[o["ly"] == a], b, o["mots"]).mean())
               for a in range(4) for b in range(4) if a != b)


# ------------------------------------------------------------------------------------------------ tests
def test_multi_organ_beats_bcpd_and_recovers_from_label_noise(organs):
    o = organs
    before = float(np.linalg.norm(o["lm"] - o["lm_t"], axis=1).mean())
    plain = register_points(o["Y"], o["X"], **MO_KW)
    omc = register_points(o["Y"], o["X"], source_labels=o["ly"], target_labels=o["lx"], coherence="organ", **MO_KW)
    tre_plain, tre_omc = _tre(plain, o, labels=False), _tre(omc, o)
    assert omc.params["method"] == "OMC-MO-BCPD" and plain.params["method"] == "BCPD"
    assert tre_omc < 0.3 * before
    assert tre_omc <= 0.7 * tre_plain, (tre_omc, tre_plain)
    assert _interpenetration(omc, o) <= 0.01
    # 10 % of the target labels corrupted: U = Id is misled, a matching U recovers
    noisy_id = register_points(o["Y"], o["X"], source_labels=o["ly"], target_labels=o["lx_bad"], **MO_KW)
    noisy_u = register_points(o["Y"], o["X"], source_labels=o["ly"], target_labels=o["lx_bad"],
                              label_transition=points.label_transition_matrix(4, 0.1), **MO_KW)
    tre_id, tre_u = _tre(noisy_id, o), _tre(noisy_u, o)
    assert tre_u <= 1.2 * tre_omc, (tre_u, tre_omc)
    assert tre_id > tre_u
    assert noisy_u.params["label_transition"][0][1] == pytest.approx(0.1 / 3)


def test_similarity_mode_recovers_known_similarity():
    rng = np.random.default_rng(1)
    Y = rng.normal(size=(200, 3)) * 20 + 40
    R = rotation_matrix([0.2, -0.3, 0.4])
    s, t = 1.1, np.array([5.0, -3.0, 2.0])
    X = (s * Y @ R.T + t)[rng.permutation(200)]
    res = register_points(Y, X, mode="similarity", tol=1e-9, max_iter=300)
    f = res.inverse
    assert np.linalg.norm(f.matrix - s * R) / np.linalg.norm(s * R) < 1e-3
    assert np.linalg.norm(f.translation - t) / np.linalg.norm(t) < 1e-3
    assert res.metrics["scale"] == pytest.approx(s, rel=1e-3)
    assert res.converged
    np.testing.assert_allclose(res.apply_points(Y), s * Y @ R.T + t, atol=1e-3)
    # target -> source (the fixed -> moving pull-back) is the inverse
    np.testing.assert_allclose(res.transform.map_points(s * Y @ R.T + t), Y, atol=1e-3)
    rig = register_points(Y, (Y @ R.T + t)[::-1], mode="rigid", tol=1e-9, max_iter=300)
    assert np.abs(rig.inverse.matrix - R).max() < 1e-3 and rig.metrics["scale"] == 1.0


def test_2d_and_history_and_params():
    rng = np.random.default_rng(2)
    Y = rng.uniform(-30, 30, size=(120, 2))
    X = Y @ rotation_matrix(0.1).T + [2.0, 1.0] + 0.5 * np.sin(Y / 15.0)
    res = register_points(Y, X, max_iter=60, min_iter=5, tol=1e-3)
    assert res.history and {"sigma", "scale", "n_hat", "sigma_change"} <= set(res.history[0])
    assert res.history[-1]["sigma"] < res.history[0]["sigma"]
    for key in ("deformation_mm2", "bandwidth_mm", "tol_mm", "seed", "backend", "rank", "gamma", "omega", "kappa",
                "lambda_convention", "sigma_init_mm", "versions", "threads"):
        assert key in res.params
    assert np.linalg.norm(res.apply_points(Y) - X, axis=1).mean() < 0.5


def test_deterministic_bitwise():
    rng = np.random.default_rng(3)
    Y = rng.normal(size=(300, 3)) * 10
    X = Y * 1.02 + np.sin(Y / 8.0) + 1.0
    kw = {"max_iter": 40, "min_iter": 40, "rank": 30, "lowrank": "nystrom", "nystrom_samples": 100, "seed": 7}
    a = register_points(Y, X, **kw)
    b = register_points(Y, X, **kw)
    assert np.array_equal(a.apply_points(Y), b.apply_points(Y))
    assert [h["sigma"] for h in a.history] == [h["sigma"] for h in b.history]
    c = register_points(Y, X, **dict(kw, seed=8))
    assert not np.array_equal(a.apply_points(Y), c.apply_points(Y))


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("truncation", [0.0, 1e-12])
def test_estep_numba_matches_numpy_reference(labelled, truncation):
    x, y, b, lx, ly, U = _estep_case(labelled, seed=4, n=300, m=250, scale=1.0)
    for sigma2 in (2.0, 0.05):
        ref = kp.estep(x, y, b, sigma2, 1e-3, lx=lx, ly=ly, U=U, truncation=truncation, backend="numpy",
                       block_bytes=50_000)
        fast = kp.estep(x, y, b, sigma2, 1e-3, lx=lx, ly=ly, U=U, truncation=truncation, backend="numba", block=32)
        for r_, f_ in zip(ref, fast):
            np.testing.assert_allclose(f_, r_, rtol=1e-10, atol=1e-13)


def test_polynomial_exp_accuracy():
    # the vectorisable exp of the numba kernels (kernels/points.py: _fexp64 / _fexp32)
    t = np.linspace(0.0, 700.0, 200_001)
    f64 = np.array([kp._fexp64(v) for v in t[::50]])
    np.testing.assert_allclose(f64, np.exp(-t[::50]), rtol=2e-10)
    t32 = np.linspace(0.0, 87.0, 20_001).astype(np.float32)
    f32 = np.array([kp._fexp32(v) for v in t32], dtype=np.float64)
    np.testing.assert_allclose(f32, np.exp(-t32.astype(np.float64)), rtol=3e-5)


def _estep_case(labelled, seed=14, n=400, m=350, scale=1.1):
    """n target / m source points (spatially ordered), optional labels with a transition matrix U."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 3)), rng.normal(size=(m, 3)) * scale
    lx = ly = U = None
    if labelled:
        lx, ly = rng.integers(0, 3, n), rng.integers(0, 3, m)
        U = np.full((3, 3), 0.05) + 0.85 * np.eye(3)
        U[2, 0] = 0.0
    ox, oy = kp.spatial_order(x, lx), kp.spatial_order(y, ly)
    x, y = x[ox], y[oy]
    if labelled:
        lx, ly = lx[ox], ly[oy]
    b = rng.uniform(0.5, 1.0, m) / m
    return x, y, b, lx, ly, U


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("labelled", [False, True])
def test_estep_float32_and_truncation_against_reference(labelled):
    x, y, b, lx, ly, U = _estep_case(labelled)
    for sigma2 in (3.0, 0.3, 0.02):
        exact = kp.estep(x, y, b, sigma2, 1e-3, lx=lx, ly=ly, U=U, truncation=0.0, backend="numpy")
        for trunc in (1e-12, 1e-6):
            for prec, rtol in (("float64", 1e-10), ("float32", 1e-4)):
                fast = kp.estep(x, y, b, sigma2, 1e-3, lx=lx, ly=ly, U=U, truncation=trunc, backend="numba",
                                precision=prec, block=32)
                # dropped Gaussian mass per pair < truncation (relative to the largest source weight)
                tol = rtol + 50 * trunc
                for r_, f_ in zip(exact, fast):
                    np.testing.assert_allclose(f_, r_, rtol=tol, atol=tol * np.abs(r_).max())
    # 2-D points take the same path (zero z coordinate)
    r2 = kp.estep(x[:, :2], y[:, :2], b, 0.3, 0.0, lx=lx, ly=ly, U=U, truncation=1e-12, backend="numpy")
    f2 = kp.estep(x[:, :2], y[:, :2], b, 0.3, 0.0, lx=lx, ly=ly, U=U, truncation=1e-12, backend="numba",
                  precision="float32")
    for r_, f_ in zip(r2, f2):
        np.testing.assert_allclose(f_, r_, rtol=1e-4, atol=1e-4 * np.abs(r_).max())


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
def test_estep_numba_bitwise_independent_of_thread_count(monkeypatch):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    x, y, b, lx, ly, U = _estep_case(True)
    monkeypatch.setattr(kp, "PARALLEL_MIN_WORK", 0)  # run the parallel regions even for this small case
    outs = []
    for nt in (1, 2):
        numba.set_num_threads(nt)
        try:
            outs.append(kp.estep(x, y, b, 0.3, 1e-3, lx=lx, ly=ly, U=U, truncation=1e-8, precision="float32"))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, c in zip(*outs):
        assert np.array_equal(a, c)


@pytest.mark.parametrize("labelled", [False, True])
def test_estep_nystrom_against_reference(labelled):
    # array-namespace code (numpy here; CuPy arrays take the same lines): with every point as a landmark the
    # Nyström estimate is exact up to the K_ZZ regularisation; with J random landmarks its error is small while σ is
    # large compared with the landmark spacing and grows as σ shrinks (what register_points' probe detects)
    x, y, b, lx, ly, U = _estep_case(labelled)
    rng = np.random.default_rng(15)
    for sigma2 in (4.0, 1.0):
        ref = kp.estep(x, y, b, sigma2, 1e-3, lx=lx, ly=ly, U=U, backend="numpy")
        allpts = np.concatenate([x, y])
        full = kp.estep_nystrom(x, y, b, sigma2, 1e-3, allpts, lx=lx, ly=ly, U=U, reg=1e-12, backend="numpy")
        for r_, f_ in zip(ref, full):
            np.testing.assert_allclose(f_, r_, rtol=1e-5, atol=1e-5 * np.abs(r_).max())
    errs = []
    for sigma2 in (9.0, 1.0, 0.05):
        ref = kp.estep(x, y, b, sigma2, 1e-3, lx=lx, ly=ly, U=U, backend="numpy")
        z = np.concatenate([x, y])[rng.choice(750, 100, replace=False)]
        nys = kp.estep_nystrom(x, y, b, sigma2, 1e-3, z, lx=lx, ly=ly, U=U)
        errs.append(float(np.max(np.abs(nys[0] - ref[0]) / ref[0].max())))
    assert errs[0] < 1e-3, errs
    assert errs[2] > errs[0]
    if _backend.HAVE_NUMBA:  # the landmark Gaussian matrices on numba give the same estimate
        z = np.concatenate([x, y])[:120]
        a = kp.estep_nystrom(x, y, b, 2.0, 0.0, z, lx=lx, ly=ly, U=U, backend="numpy")
        c = kp.estep_nystrom(x, y, b, 2.0, 0.0, z, lx=lx, ly=ly, U=U, backend="numba")
        for a_, c_ in zip(a, c):
            np.testing.assert_allclose(c_, a_, rtol=1e-6, atol=1e-8 * np.abs(a_).max())


def test_gauss_matrix_backends():
    rng = np.random.default_rng(16)
    a, z = rng.normal(size=(50, 3)), rng.normal(size=(40, 3))
    ref = np.exp(-((a[:, None] - z[None]) ** 2).sum(-1) / (2 * 0.7))
    np.testing.assert_allclose(kp.gauss_matrix(a, z, 0.7, backend="numpy"), ref, rtol=1e-12)
    if _backend.HAVE_NUMBA:
        np.testing.assert_allclose(kp.gauss_matrix(a, z, 0.7, backend="numba"), ref, rtol=1e-9)
        np.testing.assert_allclose(kp.gauss_matrix(a[:, :2], z[:, :2], 0.7, backend="numba"),
                                   np.exp(-((a[:, None, :2] - z[None, :, :2]) ** 2).sum(-1) / 1.4), rtol=1e-9)


def test_nystrom_estep_then_exact_matches_exact_registration():
    # estep="auto": Nyström E-steps while σ is large (checked on probe points), exact ones after; the result
    # stays within a small fraction of the point spacing of the all-exact registration
    rng = np.random.default_rng(17)
    Y = _ellipsoid_surface(0, 600, rng)
    X = _ellipsoid_surface(0, 600, rng)
    X = X + 2.0 * np.sin(X / 12.0) + [2.0, -1.0, 1.0]
    kw = {"bandwidth": 15.0, "max_iter": 60, "tol": 1e-3, "estep_landmarks": 75, "seed": 3}
    auto = register_points(Y, X, **kw)
    exact = register_points(Y, X, estep="exact", **kw)
    used = [h["estep"] for h in auto.history]
    assert used[0] == "nystrom" and used[-1] == "exact" and auto.metrics["nystrom_estep_iterations"] >= 1
    assert {h["estep"] for h in exact.history} == {"exact"}
    d = np.linalg.norm(auto.apply_points(Y) - exact.apply_points(Y), axis=1)
    assert d.mean() < 0.05 and d.max() < 0.5, (d.mean(), d.max())
    assert auto.params["estep"] == "auto" and auto.params["estep_precision"] == "float32"
    with pytest.raises(ValueError, match="estep must be"):
        register_points(Y, X, estep="nystrom")


@pytest.mark.parametrize("labelled", [False, True])
def test_estep_grid_against_reference(labelled):
    # splat, blur, slice (kernels.points.estep_grid) at 2 cells per σ: the composite B-spline kernel has the
    # Gaussian's mass and variance, and the sums come within ~2e-3 of their largest value (measured 0.6-2e-3 here,
    # 1.4-2.4e-3 on fsaverage5); x̂ within 1e-2 σ (measured < 4e-3) where ν is not tiny. register_points checks
    # every grid E-step on probes against estep_tol = 1e-2.
    x, y, b, lx, ly, U = _estep_case(labelled)
    for d in (3, 2):
        xx, yy = np.ascontiguousarray(x[:, :d]), np.ascontiguousarray(y[:, :d])
        for sigma2 in (4.0, 1.0):
            ref = kp.estep(xx, yy, b, sigma2, 1e-3, lx=lx, ly=ly, U=U, backend="numpy")
            nu, nu_x, px, den = kp.estep_grid(xx, yy, b, sigma2, 1e-3, lx=lx, ly=ly, U=U)
            assert np.abs(nu - ref[0]).max() < 3e-3 * ref[0].max()
            assert np.abs(nu_x - ref[1]).max() < 3e-3 * ref[1].max()
            np.testing.assert_allclose(nu_x, den / (den + 1e-3))
            ok = ref[0] > 0.1 * np.median(ref[0])
            dx = np.linalg.norm(px[ok] / nu[ok, None] - ref[2][ok] / ref[0][ok, None], axis=1)
            assert dx.max() < 1e-2 * np.sqrt(sigma2), (d, sigma2, dx.max())
    # its cost and memory fall with σ (cells ∝ σ^-D); the cost stays above (M + N) 3^D for large σ
    costs = [kp.estep_grid_cost(x, y, s2) for s2 in (0.05, 1.0, 100.0)]
    assert costs[0][0] > costs[1][0] > costs[2][0] > 27 * (len(x) + len(y))
    assert costs[0][1] > costs[1][1] > costs[2][1] > 0


def test_grid_estep_then_exact_matches_exact_registration():
    # estep="auto" on 1200 points: grid E-steps while σ is large (each checked on probe points), exact ones once the
    # grid costs more than a quarter of the exact sums; the result stays within a small fraction of the point
    # spacing (~1.7 mm) of the all-exact registration. The numpy reference backend does not use the grid.
    if not _backend.HAVE_NUMBA:
        pytest.skip("the grid E-step runs with the numba backend")
    rng = np.random.default_rng(18)
    Y = _ellipsoid_surface(0, 1200, rng)
    X = _ellipsoid_surface(0, 1200, rng)
    X = X + 2.0 * np.sin(X / 12.0) + [2.0, -1.0, 1.0]
    kw = {"bandwidth": 15.0, "rank": 60, "max_iter": 60, "tol": 1e-3, "seed": 3}  # low rank: a fast v-update
    auto = register_points(Y, X, **kw)
    exact = register_points(Y, X, estep="exact", **kw)
    used = [h["estep"] for h in auto.history]
    assert used[0] == "grid" and used[-1] == "exact", used
    assert auto.metrics["grid_estep_iterations"] == used.count("grid") >= 1
    d = np.linalg.norm(auto.apply_points(Y) - exact.apply_points(Y), axis=1)
    assert d.mean() < 0.05 and d.max() < 0.5, (d.mean(), d.max())
    ref = register_points(Y, X, backend="numpy", max_iter=3, min_iter=0, **{k: kw[k] for k in ("bandwidth", "rank")})
    assert ref.metrics["grid_estep_iterations"] == 0


def _points_case(n=300, seed=21):
    rng = np.random.default_rng(seed)
    Y = _ellipsoid_surface(0, n, rng)
    X = _ellipsoid_surface(0, n + 37, rng)  # sizes differ: uploads of X and Y can be told apart
    return Y, X + 2.0 * np.sin(X / 12.0) + [2.0, -1.0, 1.0]


def test_cuda_backend_routes_estep_through_device_arrays(monkeypatch):
    # backend="cuda" without a GPU: a stand-in device (host copies) checks the plumbing: the E-step inputs go up
    # (the target points once), the sums come back to the host, and the result is that of the array reference
    # (backend="numpy") bit for bit; the real-GPU run is test_cuda_backend_matches_cpu_on_gpu
    uploads = []

    def fake_to_device(a, device):
        assert device == "cuda"
        uploads.append(a)
        return np.array(a, copy=True)

    monkeypatch.setattr(_backend, "_cuda_usable", lambda: True)
    monkeypatch.setattr(bcpd, "to_device", fake_to_device)
    Y, X = _points_case()
    kw = {"bandwidth": 15.0, "max_iter": 25, "seed": 3}
    for estep in ("exact", "auto"):
        uploads.clear()
        dev = register_points(Y, X, backend="cuda", estep=estep, estep_landmarks=30, **kw)
        ref = register_points(Y, X, backend="numpy", estep=estep, estep_landmarks=30, **kw)
        assert dev.params["backend"] == "cuda"
        np.testing.assert_array_equal(dev.apply_points(Y), ref.apply_points(Y))
        assert sum(1 for a in uploads if a.shape == X.shape) == 1  # the target points once
        assert (dev.metrics["nystrom_estep_iterations"] >= 1) == (estep == "auto")
        assert len(uploads) >= 2 * len(dev.history)


@pytest.mark.gpu
def test_cuda_backend_matches_cpu_on_gpu():
    Y, X = _points_case(1500)
    kw = {"bandwidth": 15.0, "max_iter": 40, "seed": 3, "estep": "exact"}
    gpu = register_points(Y, X, backend="cuda", **kw)
    cpu = register_points(Y, X, backend="numpy", **kw)
    d = np.linalg.norm(gpu.apply_points(Y) - cpu.apply_points(Y), axis=1)
    assert d.max() < 1e-6, d.max()  # float64 on both; only summation order differs


def test_kernel_apply_numba_matches_numpy():
    rng = np.random.default_rng(5)
    q, z, c = rng.normal(size=(90, 3)), rng.normal(size=(70, 3)), rng.normal(size=(70, 3))
    lq, lz = rng.integers(0, 2, 90), rng.integers(0, 2, 70)
    amp = np.array([[2.0, 0.5], [0.5, 1.0]])
    den = np.array([[2.0, 3.0], [3.0, 4.5]])
    a = kp.kernel_apply(q, lq, z, lz, c, amp, den, backend="numpy", block_bytes=10_000)
    if _backend.HAVE_NUMBA:
        # polynomial exp: < 2e-10 relative per term (kernels/points.py)
        np.testing.assert_allclose(kp.kernel_apply(q, lq, z, lz, c, amp, den, backend="numba"), a, rtol=1e-9,
                                   atol=1e-9 * np.abs(a).max())
    np.testing.assert_allclose(a, kp.kernel_matrix(q, lq, z, lz, amp, den) @ c, rtol=1e-12)


def test_woodbury_lowrank_update_equals_full_rank():
    rng = np.random.default_rng(6)
    m = 60
    y = rng.normal(size=(m, 3))
    G = np.exp(-((y[:, None] - y[None]) ** 2).sum(-1) / 2.0) * 3.0
    lam, Q = np.linalg.eigh(G)
    keep = lam > 1e-12 * lam.max()
    full = {"kind": "full", "G": G, "idx": np.arange(m)}
    low = {"kind": "eigsh", "Q": Q[:, keep], "lam": lam[keep], "K": int(keep.sum()), "idx": np.arange(m)}
    E, nu = rng.normal(size=(m, 3)), rng.uniform(0.1, 2.0, m)
    nu[:5] = 1e-20  # floored responsibilities
    for cv in (1e-3, 0.3, 5.0):
        v1, s1, _ = bcpd.v_update_block(full, E, nu, cv, True)
        v2, s2, _ = bcpd.v_update_block(low, E, nu, cv, True)
        np.testing.assert_allclose(v2, v1, rtol=1e-6, atol=1e-9 * np.abs(v1).max())
        np.testing.assert_allclose(s2, s1, rtol=1e-6, atol=1e-9 * s1.max())


def test_lowrank_registration_matches_full_rank():
    rng = np.random.default_rng(7)
    Y = rng.normal(size=(150, 3)) * 15
    X = Y + 3.0 * np.sin(Y / 20.0) + 1.0
    kw = {"max_iter": 50, "min_iter": 50, "bandwidth": 40.0}
    full = register_points(Y, X, rank="full", **kw)
    low = register_points(Y, X, rank=100, lowrank="eigsh", **kw)
    nys = register_points(Y, X, rank=100, lowrank="nystrom", nystrom_samples=150, **kw)
    ref = full.apply_points(Y)
    assert np.abs(low.apply_points(Y) - ref).max() < 1e-3
    assert np.abs(nys.apply_points(Y) - ref).max() < 1e-3
    assert low.metrics["interpolation_error_mm"]["max"] < 1e-3
    assert nys.metrics["interpolation_error_mm"]["max"] < 1e-3


def _fsaverage5(n):
    pytest.importorskip("nilearn")
    from nilearn import datasets, surface

    fs = datasets.fetch_surf_fsaverage("fsaverage5")
    pial = np.asarray(surface.load_surf_mesh(fs["pial_left"])[0], float)
    white = np.asarray(surface.load_surf_mesh(fs["white_left"])[0], float)
    idx = np.sort(np.random.default_rng(0).choice(len(pial), n, replace=False))
    return pial[idx], white[idx]


@pytest.mark.parametrize("direction", ["pial_to_white", "white_to_pial"])
def test_fsaverage5_defaults_both_directions(direction):
    # issue #22: the same defaults (scales from the source's RMS radius and mean spacing) in both directions; the
    # bar is the 1.2 mm (probreg CPD: 1.69 mm at 2000 points, DATA.md); 1000 points keep it to ~1 s
    pial, white = _fsaverage5(1000)
    src, tgt = (pial, white) if direction == "pial_to_white" else (white, pial)
    before = np.linalg.norm(src - tgt, axis=1).mean()
    res = register_points(src, tgt)
    err = np.linalg.norm(res.apply_points(src) - tgt, axis=1).mean()
    assert before > 2.0
    assert err <= 1.2, err
    h = res.params["mean_spacing_mm"]
    assert res.params["fine_bandwidth_mm"] == pytest.approx(1.5 * h)
    assert res.params["fine_deformation_mm2"] == pytest.approx(h * h)
    assert res.params["bandwidth_mm"] == pytest.approx([res.params["source_radius_mm"]])
    assert res.metrics["interpolation_error_mm"]["max"] < 1e-3  # the GP interpolation reproduces v̂ (both scales)


def test_fsaverage5_known_warp_defaults():
    # P2 of benchmarks/points.py on 1000 points: pial → its own smooth warp + 10° + shift; bar: the 1.2 mm
    # (the best peer, probreg CPD, left 2.40 mm at 2000 points, DATA.md)
    import benchmarks.points as bp

    pial, _ = _fsaverage5(1000)
    warped = bp._p2(pial)
    res = register_points(pial, warped)
    assert np.linalg.norm(pial - warped, axis=1).mean() > 5.0
    assert np.linalg.norm(res.apply_points(pial) - warped, axis=1).mean() <= 1.2


def test_multi_organ_defaults(organs):
    # the automatic scales on the four-organ case: the criteria of the explicit-parameter test above
    o = organs
    before = float(np.linalg.norm(o["lm"] - o["lm_t"], axis=1).mean())
    plain = register_points(o["Y"], o["X"])
    omc = register_points(o["Y"], o["X"], source_labels=o["ly"], target_labels=o["lx"])
    tre_plain, tre_omc = _tre(plain, o, labels=False), _tre(omc, o)
    assert tre_omc < 0.3 * before
    assert tre_omc <= 0.7 * tre_plain, (tre_omc, tre_plain)
    assert _interpenetration(omc, o) <= 0.01


def test_fine_scale_kernels_match_reference():
    # the numba CG and tapered GP sum against their numpy references; the tapered kernel is PSD (Schur product)
    from classreg.solvers.points import sparse

    rng = np.random.default_rng(5)
    y = rng.normal(size=(300, 3)) * 10
    ly = np.zeros(300, dtype=np.int64)
    amp, den, theta = np.array([[4.0]]), np.array([[2 * 3.0**2]]), sparse.TAPER * 3.0
    G = sparse.fine_matrix(y, ly, amp, den, theta)
    assert np.linalg.eigvalsh(G.toarray())[0] > -1e-10 * 4.0
    nu = rng.uniform(0.0, 2.0, 300)
    nu[:10] = 1e-20
    E = rng.normal(size=(300, 3))
    v, W, _ = sparse.fine_solve(G, E, nu, 0.3, None)
    Gd = G.toarray()
    W_ref = np.linalg.solve(Gd + np.diag(0.3 / nu), E)
    assert np.abs(Gd @ W_ref - v).max() < 1e-3 * np.abs(v).max()
    q = rng.normal(size=(50, 3)) * 10
    ref = np.zeros((50, 3))
    d = np.sqrt(((q[:, None] - y[None]) ** 2).sum(-1))
    ref = (4.0 * np.exp(-d**2 / den[0, 0]) * sparse.wendland(d / theta)) @ W
    got = sparse.fine_apply(q, np.zeros(50, np.int64), y, ly, W, amp, den, theta)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_fine_apply_cell_list_matches_kdtree(monkeypatch):
    # the numba cell list (kernels.points.taper_apply) and the k-d tree path give the same sums, with organ labels,
    # in 2-D and 3-D, for queries inside and outside the anchors' box
    from classreg.solvers.points import sparse

    if not _backend.HAVE_NUMBA:
        pytest.skip("needs numba")
    rng = np.random.default_rng(7)
    amp, den = np.array([[1.0, 0.3], [0.3, 2.0]]), np.array([[50.0, 60.0], [60.0, 70.0]])
    for d in (3, 2):
        z, q = rng.normal(size=(800, d)) * 20, rng.normal(size=(120, d)) * 30
        lz, lq, coef = rng.integers(0, 2, 800), rng.integers(0, 2, 120), rng.normal(size=(800, d))
        fast = sparse.fine_apply(q, lq, z, lz, coef, amp, den, 12.0)
        with monkeypatch.context() as m:
            m.setattr(_backend, "HAVE_NUMBA", False)
            ref = sparse.fine_apply(q, lq, z, lz, coef, amp, den, 12.0)
        assert np.abs(ref).max() > 1.0 and np.count_nonzero(ref.any(1)) < len(q)  # some queries beyond θ of all
        np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


def test_two_scale_transform_save_load(tmp_path):
    # points on a sphere (a surface, like the cases the defaults are measured on), a smooth warp and a shift
    rng = np.random.default_rng(6)
    u = rng.normal(size=(700, 3))
    Y = 20.0 * u / np.linalg.norm(u, axis=1, keepdims=True)
    X = Y * 1.02 + 0.8 * np.sin(Y / 6.0) + [1.0, -2.0, 0.5]
    res = register_points(Y, X, max_iter=100)
    assert res.params["fine_deformation_mm2"] > 0 and "fine sparse" in res.params["rank"][0]
    res.inverse.save(tmp_path / "t.npz")
    from classreg.solvers.points.transform import load_point_deformation

    back = load_point_deformation(tmp_path / "t.npz")
    np.testing.assert_allclose(back.map_points(Y), res.apply_points(Y), atol=1e-10)
    assert np.linalg.norm(res.apply_points(Y) - X, axis=1).mean() < np.linalg.norm(Y - X, axis=1).mean() / 5


@pytest.mark.slow
def test_fsaverage5_pial_to_white():
    nilearn = pytest.importorskip("nilearn")  # noqa: F841
    from nilearn import datasets, surface

    fs = datasets.fetch_surf_fsaverage("fsaverage5")
    pial = surface.load_surf_mesh(fs["pial_left"])[0]
    white = surface.load_surf_mesh(fs["white_left"])[0]
    idx = np.sort(np.random.default_rng(0).choice(len(pial), 2000, replace=False))
    P, W = np.asarray(pial[idx], float), np.asarray(white[idx], float)
    before = np.linalg.norm(P - W, axis=1).mean()
    res = register_points(P, W, deformation=10.0, bandwidth=5.0, rank=400, max_iter=150, tol=1e-3)
    err = np.linalg.norm(res.apply_points(P) - W, axis=1).mean()
    assert before > 2.0
    assert err < 1.5, err


@pytest.mark.parametrize("case", ["nan", "shape", "dims", "empty", "labels_len", "labels_one", "label_extra",
                                  "mode", "coherence", "U", "budget"])
def test_bad_inputs_raise(case):
    rng = np.random.default_rng(8)
    Y, X = rng.normal(size=(20, 3)), rng.normal(size=(25, 3))
    ly, lx = np.zeros(20, int), np.zeros(25, int)
    kw = {}
    if case == "nan":
        Y[3, 1] = np.nan
        match = "source contains 1 point"
    elif case == "shape":
        Y = Y.ravel()
        match = "source must have shape"
    elif case == "dims":
        X = X[:, :2]
        match = "same dimension"
    elif case == "empty":
        X = X[:0]
        match = "target is empty"
    elif case == "labels_len":
        kw = {"source_labels": ly[:-1], "target_labels": lx}
        match = "source_labels must have one label per source point"
    elif case == "labels_one":
        kw = {"source_labels": ly}
        match = "both source_labels and target_labels"
    elif case == "label_extra":
        lx[0] = 5
        kw = {"source_labels": ly, "target_labels": lx}
        match = "target_labels contain"
    elif case == "mode":
        kw = {"mode": "affine"}
        match = "mode must be"
    elif case == "coherence":
        kw = {"coherence": "organs"}
        match = "coherence must be"
    elif case == "U":
        kw = {"source_labels": ly, "target_labels": lx, "label_transition": np.ones((2, 2))}
        match = "label_transition must be"
    else:
        kw = {"rank": "full", "memory_budget_mb": 0.001}
        match = "memory_budget_mb"
    with pytest.raises(ValueError, match=match):
        register_points(Y, X, **kw)


def test_pd_guard_for_non_psd_multi_organ_kernel():
    rng = np.random.default_rng(9)
    Y = np.concatenate([rng.normal(size=(40, 3)), rng.normal(size=(40, 3)) + [1.5, 0, 0]])
    ly = np.repeat([0, 1], 40)
    kw = {"source_labels": ly, "target_labels": ly, "coherence": np.array([[1.0, 0.99], [0.99, 1.0]]),
          "bandwidth": {0: 0.3, 1: 6.0}, "max_iter": 3, "min_iter": 0, "rank": "full"}
    with pytest.raises(ValueError, match="not positive semi-definite"):
        register_points(Y, Y + 0.1, pd_guard="raise", **kw)
    res = register_points(Y, Y + 0.1, pd_guard="jitter", **kw)
    assert res.params["jitter_mm2"] > 0


def test_callback_stop_and_progress_events():
    rng = np.random.default_rng(10)
    Y = rng.normal(size=(50, 3)) * 5
    seen = []

    def cb(ev):
        seen.append(ev.stage)
        if ev.stage == "iteration" and ev.iteration == 3:
            raise StopRegistration

    res = register_points(Y, Y + 1.0, callback=cb, max_iter=50)
    assert res.stop_reason == "stopped by callback" and not res.converged
    assert len(res.history) == 3 and seen[:2] == ["start", "level_start"] and seen.count("iteration") == 3


def test_dense_field_and_result_apply_warp_source_image_into_target_space():
    # similarity-only registration of two point sets; the dense field of result.transform (target -> source)
    # must resample a source-space image exactly like the known affine pull-back
    rng = np.random.default_rng(11)
    Y = rng.uniform(0, 40, size=(150, 3))
    R = rotation_matrix([0.0, 0.0, 0.15])
    t = np.array([2.0, -1.0, 0.5])
    X = Y @ R.T + t
    grid = Image(np.zeros((12, 14, 16), np.float32), spacing=(3.0, 3.0, 3.0))
    res = register_points(Y, X, mode="similarity", tol=1e-9, max_iter=200, reference=grid)
    img = Image(rng.normal(size=(12, 14, 16)).astype(np.float32), spacing=(3.0, 3.0, 3.0))
    pull = Affine(R, t).inverse()  # target -> source
    expect = classreg.resample(img, pull, reference=grid)
    np.testing.assert_allclose(res.apply(img).data, expect.data, atol=1e-3)
    field = points.points_displacement_field(res.transform, grid)
    np.testing.assert_allclose(classreg.resample(img, field, reference=grid).data, expect.data, atol=1e-3)


def test_nonrigid_inverse_and_labels_and_save(tmp_path):
    rng = np.random.default_rng(12)
    Y = np.concatenate([rng.normal(size=(80, 3)) * 8, rng.normal(size=(80, 3)) * 8 + [30, 0, 0]])
    ly = np.repeat([3, 7], 80)  # arbitrary label values
    X = Y + np.where(ly[:, None] == 3, [2.0, 0, 0], [-2.0, 1.0, 0])
    # the one-scale kernel (explicit Λ, B): exactly translated organs, an invertible map
    res = register_points(Y, X, source_labels=ly, target_labels=ly, max_iter=80, tol=1e-3, deformation=10.0,
                          bandwidth=30.0)
    f = res.inverse
    moved = f.map_points(Y, ly)
    np.testing.assert_allclose(moved, res.apply_points(Y), atol=1e-8)  # nearest-source labels = own labels
    back = res.transform.map_points(moved)
    assert np.abs(back - Y).max() < 1e-3 and res.metrics["inversion_error_mm"]["max_error"] < 1e-3
    with pytest.raises(ValueError, match="not one of the registration's organ labels"):
        f.map_points(Y[:2], [3, 4])
    path = f.save(tmp_path / "t.npz")
    g = points.load_point_deformation(path)
    np.testing.assert_array_equal(g.map_points(Y, ly), moved)


def _organs_next_to(points_mm, labels_image):
    """The labels of the 2^d voxels around each point (the grid cell that contains it)."""
    idx = labels_image.world_to_index(points_mm)
    lo = np.floor(idx).astype(int)
    corners = np.array(list(itertools.product((0, 1), repeat=labels_image.ndim)))
    cells = lo[:, None, :] + corners[None]  # (P, 2^d, d) voxel indices
    return labels_image.numpy()[tuple(np.moveaxis(cells, -1, 0))]


def test_label_surface_points_from_label_map():
    z, y, x = np.mgrid[:30, :32, :34]
    lab = np.zeros((30, 32, 34), np.uint8)
    lab[((x - 10) / 6.0) ** 2 + ((y - 16) / 8.0) ** 2 + ((z - 15) / 7.0) ** 2 < 1] = 1
    lab[((x - 24) / 6.0) ** 2 + ((y - 16) / 6.0) ** 2 + ((z - 15) / 6.0) ** 2 < 1] = 2
    img = Image(lab, spacing=(2.0, 1.5, 1.0), origin=(10.0, -5.0, 3.0))
    pts, labs = points.label_surface_points(img, n_points=150, seed=0)
    assert pts.shape == (300, 3) and set(labs.tolist()) == {1, 2}
    # each point lies on the boundary of the organ it is labelled with: a voxel of its cell has that label, and no
    # voxel of its cell belongs to the other organ (the organs are 2 voxels apart)
    near = _organs_next_to(pts, img)
    assert np.all((near == labs[:, None]).any(1))
    assert not np.any((near != 0) & (near != labs[:, None]))
    # organ 2 is a 12 x 9 x 6 mm-radius ellipsoid centred at index (24, 16, 15) -> world (58, 19, 18)
    c = np.array([10 + 2 * 24, -5 + 1.5 * 16, 3 + 1.0 * 15])
    rho = np.linalg.norm((pts[labs == 2] - c) / [12.0, 9.0, 6.0], axis=1)
    assert np.all(np.abs(rho - 1) < 0.25)
    # 2-D: contour tracing; a disc of label 3 (radius 8 voxels = 4 mm) next to a square of label 5
    yy, xx = np.mgrid[:40, :40]
    lab2 = np.zeros((40, 40), np.int16)
    lab2[(xx - 12) ** 2 + (yy - 20) ** 2 < 64] = 3
    lab2[14:27, 25:35] = 5
    img2 = Image(lab2, spacing=(0.5, 0.5))
    pts2, labs2 = points.label_surface_points(img2, labels=[3, 5])
    assert pts2.shape[1] == 2 and set(labs2.tolist()) == {3, 5}
    near2 = _organs_next_to(pts2, img2)
    assert np.all((near2 == labs2[:, None]).any(1)) and not np.any((near2 != 0) & (near2 != labs2[:, None]))
    radius = np.linalg.norm(pts2[labs2 == 3] - [6.0, 10.0], axis=1)
    assert np.all(np.abs(radius - 4.0) < 0.5)
    with pytest.raises(ValueError, match="does not occur"):
        points.label_surface_points(img2, labels=[4])


def test_load_points_and_cli(tmp_path):
    from classreg.cli import main

    rng = np.random.default_rng(13)
    Y = rng.normal(size=(60, 3)) * 10
    X = Y + [1.0, 2.0, -1.0]
    organ = np.repeat([2, 5, 9], 20)  # label values need not be 0..L-1
    np.savetxt(tmp_path / "y.txt", Y, delimiter="\t")
    np.savetxt(tmp_path / "x.csv", np.column_stack([X, organ]), delimiter=",", header="x,y,z,label")
    pts, lab = classreg.load_points(tmp_path / "x.csv")
    np.testing.assert_array_equal(pts, X)
    assert lab.dtype.kind == "i"
    np.testing.assert_array_equal(lab, organ)  # the last column, row by row
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "out"
    rc = main(["register", "points", str(tmp_path / "y.txt"), str(tmp_path / "x.npy"), "-o", str(out),
               "--max-iter", "40", "--min-iter", "5", "--deformation", "10", "--bandwidth", "30", "-q"])
    assert rc == 0
    moved = np.loadtxt(out / "moved_source.txt")
    assert np.abs(moved - X).max() < 0.05
    assert (out / "params.json").is_file() and (out / "history.csv").is_file() and (out / "transform.npz").is_file()
    assert main(["register", "points", str(tmp_path / "nope.txt"), str(tmp_path / "x.npy"), "-o", str(out)]) == 1


def test_cli_labels_label_noise_and_rank(tmp_path):
    import json

    from classreg.cli import main

    rng = np.random.default_rng(14)
    Y = rng.normal(size=(60, 3)) * 10
    X = Y + [1.0, 2.0, -1.0]
    organ = np.repeat([2, 5, 9], 20)
    np.savetxt(tmp_path / "y.csv", np.column_stack([Y, organ]), delimiter=",")
    np.savetxt(tmp_path / "x.csv", np.column_stack([X, organ]), delimiter=",")
    np.savetxt(tmp_path / "ly.txt", organ[:, None])
    common = ["--max-iter", "5", "--min-iter", "0", "-q"]

    def run(name, *args):
        out = tmp_path / name
        assert main(["register", "points", *args, "-o", str(out), *common]) == 0
        return json.loads((out / "params.json").read_text())

    # label columns of both files, a uniform label-noise rate and a full-rank kernel
    p = run("labels", str(tmp_path / "y.csv"), str(tmp_path / "x.csv"), "--label-transition", "0.1", "--rank",
            "full", "--bandwidth", "20", "--coherence", "global")
    assert p["labels"] == [2, 5, 9] and p["method"] == "GMC-MO-BCPD" and p["rank"] == ["full"]
    assert p["label_transition"][0] == pytest.approx([0.9, 0.05, 0.05]) and p["bandwidth_mm"] == [20.0] * 3
    # labels from separate files (the source's own column ignored), K eigenpairs per organ
    p = run("files", str(tmp_path / "y.csv"), str(tmp_path / "x.csv"), "--source-labels", str(tmp_path / "ly.txt"),
            "--target-labels", str(tmp_path / "ly.txt"), "--rank", "10", "--deformation", "10", "--bandwidth", "30")
    assert p["method"] == "OMC-MO-BCPD" and p["label_transition"][0] == [1.0, 0.0, 0.0]
    assert p["rank"] == ["10 (eigsh)"] * 3
    assert run("plain", str(tmp_path / "y.csv"), str(tmp_path / "x.csv"), "--no-labels")["method"] == "BCPD"
    assert main(["register", "points", str(tmp_path / "y.csv"), str(tmp_path / "x.csv"), "-o",
                 str(tmp_path / "bad"), "--coherence", "organs", *common]) == 1


def test_result_save_and_load_round_trip_point_deformation(tmp_path):
    rng = np.random.default_rng(3)
    src = rng.normal(size=(120, 3)) * 10
    tgt = src @ rotation_matrix([0.0, 0.0, 0.1]).T + [1.0, 2.0, 0.5]
    res = register_points(src, tgt, max_iter=40)
    res.save(tmp_path / "out")
    back = classreg.load_result(tmp_path / "out")
    assert type(back.transform) is type(res.transform) and type(back.inverse) is type(res.inverse)
    np.testing.assert_allclose(back.apply_points(src), res.apply_points(src), atol=1e-9)
    np.testing.assert_allclose(back.transform.map_points(tgt[:10]), res.transform.map_points(tgt[:10]), atol=1e-6)
