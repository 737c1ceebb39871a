"""register_points on bad and degenerate input: every case either raises a clear exception that names the argument
and the problem, or is handled and gives the right answer (issue "bad input never gives a silent wrong answer",
point-set part). Small clouds and few iterations: the whole file runs in seconds."""
from __future__ import annotations

import numpy as np
import pytest

from classreg import Image, register_points
from classreg.solvers.points import bcpd
from classreg.transforms import rotation_matrix

RNG = np.random.default_rng(8)
Y0 = RNG.normal(size=(20, 3)) * 10  # source, RMS radius ~17 mm
X0 = RNG.normal(size=(25, 3)) * 10  # target
LY, LX = np.zeros(20, int), np.zeros(25, int)
FAST = {"max_iter": 5, "min_iter": 0}


def _with(a, i, value):
    a = a.copy()
    a[i] = value
    return a


# (id, source, target, keyword arguments, exception type, regex the message must match: the argument and the problem)
RAISES = [
    # -- the points
    ("source_none", None, X0, {}, TypeError, r"source must be an \(N, 2\) or \(N, 3\) array.*got None"),
    ("source_string", "abc", X0, {}, TypeError, r"source must be a real numeric array of points, got dtype <U3"),
    ("source_ragged", [[1.0, 2.0, 3.0], [1.0, 2.0]], X0, {}, ValueError,
     r"source must be an \(N, 2\) or \(N, 3\) array .*cannot be read as an array"),
    ("source_object_strings", np.array([["a", 1, 2], ["b", 3, 4]], dtype=object), X0, {}, TypeError,
     r"source must be a real numeric array of points, got dtype object with non-numeric entries"),
    ("source_complex", Y0.astype(complex), X0, {}, TypeError, r"source must be a real numeric .*complex128"),
    ("source_bool_mask", Y0 > 0, X0, {}, TypeError, r"source must be a real numeric .*dtype bool"),
    ("source_shape_N", Y0[:, 0], X0, {}, ValueError, r"source must have shape \(N, 2\) or \(N, 3\).*got \(20,\)"),
    ("target_shape_N4", Y0, np.c_[X0, X0[:, :1]], {}, ValueError, r"target must have shape .*got \(25, 4\)"),
    ("source_shape_3d", Y0[None], X0, {}, ValueError, r"source must have shape .*got \(1, 20, 3\)"),
    ("dims_mismatch", Y0, X0[:, :2], {}, ValueError,
     r"source and target must have the same dimension.*3-D source and 2-D target"),
    ("source_empty", Y0[:0], X0, {}, ValueError, r"source is empty"),
    ("target_empty", Y0, np.zeros((0, 3)), {}, ValueError, r"target is empty"),
    ("target_nan", Y0, _with(X0, (4, 2), np.nan), {}, ValueError, r"target contains 1 point\(s\) with NaN or Inf"),
    ("source_inf", _with(Y0, (0, 0), np.inf), X0, {}, ValueError, r"source contains 1 point\(s\) with NaN or Inf"),
    ("source_single_point", Y0[:1], X0, {}, ValueError, r"source has a single point"),
    ("target_single_point", Y0, X0[:1], {}, ValueError, r"target has a single point"),
    ("single_points_both", Y0[:1], Y0[:1], {}, ValueError, r"source has a single point"),
    ("target_identical_points", Y0, np.ones((25, 3)), {}, ValueError, r"target: all 25 points coincide"),
    ("source_identical_points", np.full((20, 3), 7.0), X0, {}, ValueError, r"source: all 20 points coincide"),
    ("source_coordinates_1e154", Y0 * 1e153, X0 * 1e153, {}, ValueError,
     r"source has coordinates up to .*e\+154 mm, beyond the ±1e\+100 mm"),
    ("target_offset_1e154", Y0, X0 + 1e154, {}, ValueError, r"target has coordinates up to 1e\+154 mm"),
    ("target_radius_1e-150", Y0 * 1e-150, X0 * 1e-150, {}, ValueError,
     r"target has an RMS radius of .*e-149 mm, below the 1e-100 mm"),
    ("sizes_1e20_apart", Y0, X0 * 1e-20, {}, ValueError,
     r"source and target differ too much in size or position .*same units"),
    ("positions_lost_to_rounding", Y0 + 1e12, X0, {}, ValueError,
     r"source and target differ too much in size or position .*centroids 1\.7\de\+12 mm apart"),
    ("unnormalized_coordinates_1e20", Y0 * 1e19, X0 * 1e19, {"normalize": False}, ValueError,
     r"coordinates up to .* beyond the 1e\+15 mm that normalize=False supports"),
    ("unnormalized_radius_1e-20", Y0 * 1e-20, X0 * 1e-20, {"normalize": False}, ValueError,
     r"RMS radius of .* below the 1e-15 mm that normalize=False supports"),
    ("nonrigid_two_source_points", Y0[:2], X0, {}, ValueError,
     r"source has only 2 points: mode='nonrigid' needs at least 3"),
    # -- the labels
    ("labels_one_side", Y0, X0, {"source_labels": LY}, ValueError, r"both source_labels and target_labels"),
    ("source_labels_length", Y0, X0, {"source_labels": LY[:-1], "target_labels": LX}, ValueError,
     r"source_labels must have one label per source point \(20\), got \(19,\)"),
    ("target_labels_length", Y0, X0, {"source_labels": LY, "target_labels": np.zeros(30, int)}, ValueError,
     r"target_labels must have one label per target point \(25\), got \(30,\)"),
    ("source_labels_2d", Y0, X0, {"source_labels": LY.reshape(10, 2), "target_labels": LX}, ValueError,
     r"source_labels must have one label per source point \(20\), got \(10, 2\)"),
    ("target_labels_fractional", Y0, X0, {"source_labels": LY, "target_labels": LX + 0.5}, TypeError,
     r"target_labels must be integer organ labels, got 25 non-integer value\(s\) such as .*0\.5"),
    ("source_labels_nan", Y0, X0, {"source_labels": _with(LY.astype(float), 3, np.nan), "target_labels": LX},
     TypeError, r"source_labels must be integer organ labels, got 1 non-integer value\(s\) such as .*nan"),
    ("source_labels_strings", Y0, X0, {"source_labels": LY.astype(str), "target_labels": LX}, TypeError,
     r"source_labels must be integer organ labels, got dtype <U"),
    ("target_label_not_in_source", Y0, X0, {"source_labels": LY, "target_labels": _with(LX, 0, 5)}, ValueError,
     r"target_labels contain \[5\], which no source point has"),
    # -- the options (declared in classreg/solvers/points/options.py, checked by classreg/options.py)
    ("omega_string", Y0, X0, {"omega": "big"}, TypeError, r"omega must be a number, got 'big'"),
    ("omega_one", Y0, X0, {"omega": 1.0}, ValueError, r"omega must be >= 0 and < 1"),
    ("max_iter_none", Y0, X0, {"max_iter": None}, TypeError, r"max_iter must not be None"),
    ("max_iter_fraction", Y0, X0, {"max_iter": 2.5}, TypeError, r"max_iter must be an integer, got 2\.5"),
    ("rank_word", Y0, X0, {"rank": "low"}, ValueError, r"rank must be an integer or one of 'auto', 'full', got 'low'"),
    ("nystrom_samples_zero", Y0, X0, {"nystrom_samples": 0}, ValueError, r"nystrom_samples must be >= 1"),
    ("tol_string", Y0, X0, {"tol": "x"}, TypeError, r"tol must be a number \(mm\)"),
    ("normalize_string", Y0, X0, {"normalize": "yes"}, TypeError, r"normalize must be True or False"),
    ("mode_unknown", Y0, X0, {"mode": "affine"}, ValueError, r"mode must be one of"),
    ("unknown_option", Y0, X0, {"sigma": 1.0}, TypeError, r"unexpected keyword argument 'sigma'"),
    ("deformation_string", Y0, X0, {"deformation": "big"}, TypeError,
     r"deformation must be a positive number, a sequence .* got 'big'"),
    ("bandwidth_none", Y0, X0, {"bandwidth": None}, TypeError, r"bandwidth must be a positive number.* got None"),
    ("bandwidth_negative", Y0, X0, {"bandwidth": -1.0}, ValueError, r"bandwidth must be finite and positive"),
    ("bandwidth_per_label_length", Y0, X0, {"bandwidth": [1.0, 2.0]}, ValueError,
     r"bandwidth must be a scalar, a dict or have one entry per label \(1\)"),
    ("deformation_dict_missing_label", Y0, X0, {"source_labels": LY, "target_labels": LX, "deformation": {3: 1.0}},
     ValueError, r"deformation has no entry for label\(s\) \[0\]"),
    ("deformation_overflows", Y0, X0, {"deformation": 1e300}, ValueError,
     r"deformation=1e\+300 mm² is too large for point sets of RMS radius"),
    ("coherence_none", Y0, X0, {"coherence": None}, ValueError, r"coherence must be 'organ', 'global' or .* got None"),
    ("coherence_strings", Y0, X0, {"coherence": [["a"]]}, ValueError, r"coherence must be 'organ', 'global' or"),
    ("label_transition_string", Y0, X0, {"label_transition": "x"}, TypeError,
     r"label_transition must be a label-noise rate in \[0, 1\) or .* got 'x'"),
    ("label_transition_rate_2", Y0, X0, {"label_transition": 2.0}, ValueError,
     r"label_transition must be a label-noise rate in \[0, 1\).* got 2\.0"),
    ("label_transition_shape", Y0, X0, {"source_labels": LY, "target_labels": LX, "label_transition": np.ones((2, 2))},
     ValueError, r"label_transition must be a non-negative \(1, 1\) matrix, got an array of shape \(2, 2\)"),
    ("gamma_overflows", Y0, X0, {"gamma": 1e200}, ValueError, r"gamma=1e\+200 gives an initial σ² of inf"),
    ("callback_not_callable", Y0, X0, {"callback": 3}, TypeError, r"callback must be callable"),
    ("reference_not_image", Y0, X0, {"reference": 3}, TypeError, r"reference must be a classreg\.Image"),
    ("reference_wrong_dimension", Y0, X0, {"reference": Image(np.zeros((4, 4), np.float32), (1.0, 1.0))}, ValueError,
     r"reference is 2-D but the points are 3-D"),
    ("memory_budget", Y0, X0, {"rank": "full", "memory_budget_mb": 1e-6}, ValueError,
     r"a full-rank kernel block of 20 points needs 0\.00916 MB \(> memory_budget_mb=1e-06\); use rank=K"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in RAISES])
def test_bad_input_raises_clear_error(case):
    _, source, target, kw, exc, match = case
    with pytest.raises(exc, match=match):
        register_points(source, target, **{**FAST, **kw})


# ------------------------------------------------------------------------------------------------ handled cases
R_TRUE = rotation_matrix([0.1, -0.05, 0.08])
T_TRUE = np.array([2.0, -1.0, 1.5])


def _rigid_pair(k=1.0, n=60, seed=4):
    """A source cloud (RMS radius ~17 k mm) and its rigidly moved, shuffled copy; the true moved source."""
    rng = np.random.default_rng(seed)
    Y = rng.normal(size=(n, 3)) * 10
    moved = Y @ R_TRUE.T + T_TRUE
    return Y * k, moved[rng.permutation(n)] * k, moved * k


def _max_error(res, Y, truth, k=1.0):
    return float(np.linalg.norm(res.apply_points(Y) - truth, axis=1).max()) / k


def _unit_error(**kw):
    Y, X, truth = _rigid_pair()
    return _max_error(register_points(Y, X, max_iter=100, **kw), Y, truth)


def case_tiny_cloud_default_parameters():
    # a 1e-5 mm cloud (RMS radius 1.7e-5 mm) with the mm defaults (bandwidth 30 mm): the kernel is constant to
    # 1e-13 over the cloud; its v-update matrix is singular in float64 (Cholesky failed before): now solved through
    # the kernel's eigenpairs, the rigid motion is recovered at least as well as at unit scale
    k = 1e-6
    Y, X, truth = _rigid_pair(k)
    res = register_points(Y, X, max_iter=100)
    assert res.converged
    assert _max_error(res, Y, truth, k) <= _unit_error() + 1e-6


def case_tiny_cloud_scaled_parameters():
    # the same pair at unit scale and at 1e-6 scale with bandwidth/deformation scaled alike: the same registration
    k = 1e-6
    Y, X, truth = _rigid_pair(k)
    res = register_points(Y, X, max_iter=100, bandwidth=30.0 * k, deformation=10.0 * k * k)
    assert res.converged
    assert _max_error(res, Y, truth, k) <= 1.5 * _unit_error()


def case_tiny_cloud_unnormalized():
    k = 1e-6
    Y, X, truth = _rigid_pair(k)
    res = register_points(Y, X, max_iter=100, bandwidth=30.0 * k, deformation=10.0 * k * k, normalize=False)
    assert _max_error(res, Y, truth, k) <= 1.5 * _unit_error(normalize=False)


def case_tiny_cloud_similarity():
    k = 1e-6
    Y, X, truth = _rigid_pair(k)
    res = register_points(Y, X, max_iter=100, mode="similarity")
    assert res.converged and _max_error(res, Y, truth, k) < 1e-9
    assert res.metrics["scale"] == pytest.approx(1.0, abs=1e-9)


def case_small_cloud_cholesky():
    # a 0.17 mm cloud with the defaults: "28-th leading minor of the array is not positive definite" before; the
    # normalised problem is the unit-scale one, so the errors agree up to rounding (seen: 2e-15 relative above it)
    k = 1e-2
    Y, X, truth = _rigid_pair(k)
    res = register_points(Y, X, max_iter=100)
    assert res.converged and _max_error(res, Y, truth, k) <= _unit_error() * (1 + 1e-9)


#: the one-scale kernel these cases were written for (the defaults before the two-scale kernel of issue #22)
ONE_SCALE = {"deformation": 10.0, "bandwidth": 30.0}


def case_tiny_cloud_lowrank():
    # low rank (eigsh, K = 10) on a 1e-5 mm cloud: the kernel's eigenvalues beyond the first are rounding noise;
    # they are dropped instead of getting a prior variance of 1e-9 λ_max (the scale collapsed to 1e-40 before)
    k = 1e-6
    Y, X, truth = _rigid_pair(k)
    res = register_points(Y, X, max_iter=100, rank=10, lowrank="eigsh", **ONE_SCALE)
    assert res.converged and res.metrics["scale"] == pytest.approx(1.0, abs=1e-6)
    assert _max_error(res, Y, truth, k) <= 1e-6


def case_exact_similarity_sigma_floor():
    # noise-free data in similarity mode: σ² used to underflow to 1e-300 before min_iter (every Gaussian factor 0,
    # the scale collapsed, then "Singular matrix"); σ² now stops at (1e-14 × the target's radius)²
    Y, X, truth = _rigid_pair()
    for normalize in (True, False):
        res = register_points(Y, X, max_iter=100, mode="similarity", normalize=normalize)
        assert res.converged and _max_error(res, Y, truth) < 1e-9


def case_rank_above_point_count():
    Y, X, _ = _rigid_pair(n=30)
    a = register_points(Y, X, rank=50, **FAST)
    b = register_points(Y, X, rank="full", **FAST)
    assert a.params["rank"] == ["full"] and np.array_equal(a.apply_points(Y), b.apply_points(Y))


def case_nystrom_samples_above_point_count():
    Y, X, _ = _rigid_pair(n=30)
    kw = {"rank": 5, "lowrank": "nystrom", **FAST}
    a = register_points(Y, X, nystrom_samples=100, **kw)
    b = register_points(Y, X, nystrom_samples=30, **kw)
    assert np.array_equal(a.apply_points(Y), b.apply_points(Y))


def case_estep_landmarks_above_point_count():
    rng = np.random.default_rng(3)
    Y = rng.normal(size=(400, 3)) * 10
    X = Y + 1.0
    kw = {"max_iter": 3, "min_iter": 0, "rank": 20}
    a = register_points(Y, X, estep_landmarks=1000, **kw)
    b = register_points(Y, X, estep="exact", **kw)
    assert all(h["estep"] == "exact" for h in a.history)
    assert np.array_equal(a.apply_points(Y), b.apply_points(Y))


def _two_organs():
    rng = np.random.default_rng(5)

    def ellipsoid(n, c, r):
        u = rng.normal(size=(n, 3))
        return c + u / np.linalg.norm(u, axis=1, keepdims=True) * r

    A = ellipsoid(100, np.array([0.0, 0.0, 0.0]), np.array([20.0, 14.0, 10.0]))
    B = ellipsoid(60, np.array([40.0, 0.0, 0.0]), np.array([10.0, 8.0, 8.0]))
    return A, B, (lambda p: p @ rotation_matrix([0.05, -0.04, 0.06]).T + [3.0, -2.0, 1.0]), rng


def case_source_organ_absent_from_target():
    # MO-BCPD (U = identity): no target point can come from organ 1, so its points have no data term; organ 0 is
    # registered, organ 1 follows the similarity (v = 0 there with independent organs), with a warning
    A, B, f, rng = _two_organs()
    Y = np.r_[A, B]
    ly = np.r_[np.zeros(len(A), int), np.ones(len(B), int)]
    X = f(A)[rng.permutation(len(A))]
    kw = {"source_labels": ly, "target_labels": np.zeros(len(A), int), "max_iter": 100, **ONE_SCALE}
    res = register_points(Y, X, **kw)
    fwd = res.inverse
    assert np.linalg.norm(fwd.map_points(A, labels=np.zeros(len(A), int)) - f(A), axis=1).max() < 1e-3
    np.testing.assert_allclose(fwd.displacement(B, labels=np.ones(len(B), int)), 0.0, atol=1e-6)
    np.testing.assert_allclose(fwd.map_points(B, labels=np.ones(len(B), int)), B @ fwd.matrix.T + fwd.translation,
                               atol=1e-9)
    sim = register_points(Y, X, mode="similarity", **kw)  # rigid truth: both organs exact
    np.testing.assert_allclose(sim.apply_points(Y), f(Y), atol=1e-6)


def case_labels_float_column_and_mixed_dtypes():
    Y, X, _ = _rigid_pair(n=30)
    ly = (Y[:, 0] > 0).astype(int)
    lx = (X[:, 0] > 2.0).astype(int)
    ref = register_points(Y, X, source_labels=ly, target_labels=lx, **FAST)
    for sl, tl in ((ly.astype(float), lx), (ly[:, None], lx.astype(np.float32)), (ly.tolist(), lx.astype(np.uint8))):
        res = register_points(Y, X, source_labels=sl, target_labels=tl, **FAST)
        assert np.array_equal(res.apply_points(Y), ref.apply_points(Y))


def case_points_int_object_and_lists():
    Y, X, _ = _rigid_pair(n=30)
    Yi, Xi = np.round(Y).astype(np.int64), np.round(X).astype(np.int64)
    ref = register_points(Yi.astype(float), Xi.astype(float), **FAST)
    for src, tgt in ((Yi, Xi), (Yi.astype(object), Xi.tolist())):
        assert np.array_equal(register_points(src, tgt, **FAST).apply_points(Y), ref.apply_points(Y))


def case_inputs_not_modified():
    Y, X, _ = _rigid_pair(n=30)
    Yc, Xc, ly = Y.copy(), X.copy(), np.zeros(30, int)
    register_points(Y, X, source_labels=ly, target_labels=ly.copy(), **FAST)
    assert np.array_equal(Y, Yc) and np.array_equal(X, Xc) and not ly.any()


def case_negligible_deformation_is_similarity():
    # a prior variance below float64's range against the cloud: only the similarity is estimated (with a warning)
    Y, X, _ = _rigid_pair(n=30)
    a = register_points(Y, X, deformation=1e-300, **FAST)
    b = register_points(Y, X, mode="similarity", **FAST)
    assert np.array_equal(a.apply_points(Y), b.apply_points(Y))


def case_planar_target():
    # a flat (zero extent along z) pair in 3-D is not degenerate: the translation is recovered
    rng = np.random.default_rng(6)
    Y = np.c_[rng.uniform(-20, 20, size=(80, 2)), np.zeros(80)]
    t = np.array([1.5, -1.0, 0.0])
    res = register_points(Y, (Y + t)[::-1], mode="rigid", max_iter=100)
    np.testing.assert_allclose(res.apply_points(Y), Y + t, atol=1e-6)


def case_delta_kernel_bandwidth():
    # a bandwidth whose square underflows (2 B² = 0) is a delta kernel, not 0/0 = NaN
    Y, X, _ = _rigid_pair(n=30)
    res = register_points(Y, X, bandwidth=1e-300, **FAST)
    assert np.all(np.isfinite(res.apply_points(Y))) and np.isfinite(res.metrics["sigma_mm"])


def case_cholesky_guard():
    # the v-update factorisation: a singular PSD matrix gets the smallest diagonal jitter that works; a non-finite
    # one raises a ValueError naming the parameters to check, never a bare LinAlgError
    c, _ = bcpd._cholesky(np.ones((5, 5)), "test", 1.0)
    assert np.all(np.isfinite(c))
    with pytest.raises(ValueError, match=r"not finite .*deformation \(mm²\) and bandwidth \(mm\)"):
        bcpd._cholesky(np.full((3, 3), np.nan), "test", 1.0)


def case_scale_collapse_raises():
    # BCPD without posterior covariances on this pair loses every correspondence (scale 0): a ZeroDivisionError
    # from deep inside before, now a ValueError that says so
    Y, X, _ = _rigid_pair()
    with pytest.raises(ValueError, match=r"diverged at iteration \d+: the scale collapsed to 0"):
        register_points(Y, X, max_iter=100, posterior_covariance=False, **ONE_SCALE)


HANDLED = [f for name, f in sorted(globals().items()) if name.startswith("case_")]


@pytest.mark.parametrize("case", HANDLED, ids=[f.__name__[5:] for f in HANDLED])
def test_degenerate_input_handled(case):
    case()
