"""register_rigid (CSNGF, Öfverstedt et al., WBIR 2022): the FFT measure against the direct loop, known rigid
transforms in 2-D and 3-D (oblique, anisotropic grids), real multimodal data (ITK T1/PD slices, MNI152 T1 vs a
tissue-map contrast), determinism, progress/stop, the pyramid driver's events, CLI and input errors."""
import json
import time

import numpy as np
import pytest
from phantoms import oblique_direction
from scipy import ndimage

import classreg as cr
from classreg.data import DataNotFoundError
from classreg.solvers.rigid import (
    PAPER_SCHEDULE,
    CrossSimilarityNGF,
    csngf_direct,
    euler_angles,
    normalised_gradient_field,
    sample_rotations,
)
from classreg.transforms import rotation_matrix

# light explicit schedules (explicit search entries run the search alone, without the local refinement)
FAST_2D = {"shrink_factors": (4, 2, 2, 1), "samples": (360, 200, 60, 0), "perturbation": (10, 3, 0),
           "keep": (20, 3, 1)}
TINY = {"shrink_factors": (2, 1), "samples": (24, 8), "perturbation": (5,), "keep": (3,),
        "smoothing_sigmas": (2.0, 1.0)}


# ------------------------------------------------------------------------------------------------ helpers

def _itk_pair():
    from classreg.data import itk_example_image

    try:
        fixed = itk_example_image("BrainT1SliceBorder20.png", dtype=np.float32)
        pd = itk_example_image("BrainProtonDensitySliceBorder20.png", dtype=np.float32)
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    return fixed, pd


def _centre(img):
    return img.index_to_world(np.array([[(s - 1) / 2.0 for s in img.shape]]))[0]


def _corners(img):
    sh = img.shape
    idx = np.array(np.meshgrid(*[(0, s - 1) for s in sh], indexing="ij")).reshape(len(sh), -1).T
    return img.index_to_world(idx.astype(float))


def corner_error(est, truth, grid):
    """Mean displacement (mm) of the image-block corners between two fixed → moving transforms (paper's d_E)."""
    c = _corners(grid)
    return float(np.linalg.norm(est.map_points(c) - truth.map_points(c), axis=1).mean())


def _moved(image, truth):
    """``image`` moved by ``truth`` (fixed → moving map): ``moved(truth(x)) = image(x)``, on ``image``'s grid."""
    return cr.resample(image, truth.inverse(), reference=image)


def _blobs(points, centres, widths, values):
    out = np.zeros(len(points))
    for c, w, v in zip(centres, widths, values):
        out += v * np.exp(-np.sum((points - c) ** 2, axis=1) / (2 * w * w))
    return out


def _phantom(ndim, rng, n_blobs=7, radius=18.0):
    centres = rng.uniform(-radius, radius, size=(n_blobs, ndim))
    widths = rng.uniform(2.5, 6.0, size=n_blobs)
    values = rng.uniform(0.3, 1.0, size=n_blobs)
    return centres, widths, values


# ------------------------------------------------------------------------------------------------ the measure
@pytest.mark.parametrize("sa,sb", [((13, 17), (9, 11)), ((12, 10), (15, 7)), ((7, 9, 8), (5, 6, 7)),
                                   ((6, 5, 7), (7, 5, 3))])
@pytest.mark.parametrize("squared", [True, False])
def test_fft_measure_equals_direct(sa, sb, squared):
    rng = np.random.default_rng(len(sa) * 100 + sa[0])
    a = ndimage.gaussian_filter(rng.random(sa), 1.0)
    b = ndimage.gaussian_filter(rng.random(sb), 1.0)
    ma = rng.random(sa) > 0.3
    mb = rng.random(sb) > 0.3
    ref = csngf_direct(a, b, a_mask=ma, b_mask=mb, squared=squared, overlap=0.5)
    assert ref.valid.sum() > 0
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-5)):
        fft = CrossSimilarityNGF(a, b.shape, a_mask=ma, squared=squared, overlap=0.5, dtype=dtype)(b, mb)
        assert fft.score.shape == ref.score.shape
        np.testing.assert_array_equal(fft.valid, ref.valid)
        np.testing.assert_array_equal(fft.count, ref.count)
        np.testing.assert_allclose(fft.score[ref.valid], ref.score[ref.valid], atol=tol, rtol=0)
        assert np.all(fft.score[~ref.valid] == -1)


def test_measure_peaks_at_the_true_shift_and_is_contrast_invariant():
    rng = np.random.default_rng(3)
    big = ndimage.gaussian_filter(rng.random((40, 44)), 2.0)
    a = big[5:35, 6:40]
    b = 1.0 - big[9:29, 4:30] ** 2  # another "modality": inverted, non-linear, same edges
    m = CrossSimilarityNGF(a, b.shape)(b)
    idx = np.unravel_index(np.argmax(m.score), m.score.shape)
    chi = CrossSimilarityNGF(a, b.shape).shift_of(idx)
    # b(x) = big(x + (9, 4)) and a(y) = big(y + (5, 6)): a(x + χ) = b(x) for χ = (4, -2)
    np.testing.assert_array_equal(chi, [4, -2])
    assert m.score[idx] > 0.95


def test_overlap_threshold_limits_the_shifts():
    rng = np.random.default_rng(0)
    a, b = rng.random((10, 12)), rng.random((8, 8))
    for gamma in (0.25, 0.5, 0.9):
        m = CrossSimilarityNGF(a, b.shape, overlap=gamma)(b)
        assert np.all(m.count[m.valid] >= gamma * m.count.max())
        assert np.all(m.count[~m.valid] < gamma * m.count.max())


def test_normalised_gradient_field_is_a_unit_field_where_the_image_varies():
    ramp = np.tile(0.01 * np.arange(12.0), (9, 1))  # grows along the last array axis
    n = normalised_gradient_field(ramp, epsilon=1e-5, backend="numpy")
    assert n.shape == (9, 12, 2)
    np.testing.assert_allclose(n[..., 1], 1.0 / np.sqrt(1.0 + 1e-6), rtol=1e-12)  # |∇| = 0.01 against ε = 1e-5
    np.testing.assert_array_equal(n[..., 0], 0.0)
    np.testing.assert_array_equal(normalised_gradient_field(np.zeros((5, 6))), 0.0)


# ------------------------------------------------------------------------------------------------ rotations
def test_euler_angles_roundtrip_itk_convention():
    import SimpleITK as sitk

    rng = np.random.default_rng(1)
    for _ in range(20):
        ang = rng.uniform(-np.pi, np.pi, 3)
        ang[0] = rng.uniform(-1.5, 1.5)
        np.testing.assert_allclose(euler_angles(rotation_matrix(ang)), ang, atol=1e-10)
        tx = sitk.Euler3DTransform()
        tx.SetRotation(*ang)
        np.testing.assert_allclose(np.reshape(tx.GetMatrix(), (3, 3)), rotation_matrix(ang), atol=1e-12)
    np.testing.assert_allclose(euler_angles(rotation_matrix([2.5])), [2.5])


@pytest.mark.parametrize("zyx", [False, True])
def test_euler_angles_rebuild_the_matrix_in_both_orders_and_at_gimbal_lock(zyx):
    """classreg.transforms.euler_angles (ITK's Rz·Rx·Ry, or Rz·Ry·Rx as Euler3DTransform's ComputeZYX): the angles
    rebuild the matrix, also where the middle angle is ±90° (gimbal lock: one of the outer angles is then free)."""
    import SimpleITK as sitk

    def build(ang):
        tx = sitk.Euler3DTransform()
        tx.SetComputeZYX(zyx)
        tx.SetRotation(*ang)
        return np.reshape(tx.GetMatrix(), (3, 3))

    rng = np.random.default_rng(3)
    mid = 1 if zyx else 0  # the angle whose cosine vanishes at gimbal lock
    for k in range(24):
        ang = rng.uniform(-np.pi, np.pi, 3)
        ang[mid] = rng.uniform(-1.5, 1.5) if k < 20 else (-1) ** k * np.pi / 2
        r = build(ang)
        got = euler_angles(r, zyx=zyx)
        np.testing.assert_allclose(build(got), r, atol=1e-12)
        if k < 20:
            np.testing.assert_allclose(got, ang, atol=1e-10)


def test_sample_rotations_deterministic_and_uniform():
    r1 = sample_rotations(512, 3, seed=4)
    r2 = sample_rotations(512, 3, seed=4)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, sample_rotations(512, 3, seed=5))
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", r1, r1), np.broadcast_to(np.eye(3), r1.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r1), 1.0, atol=1e-12)
    assert np.abs(r1.mean(axis=0)).max() < 0.05  # uniform over SO(3): E[R] = 0
    a = np.array([euler_angles(r)[0] for r in sample_rotations(90, 2, seed=0)])
    assert np.all(np.abs(a) <= np.pi) and np.diff(np.sort(a)).max() < np.deg2rad(4.01 + 1e-9)
    small = sample_rotations(64, 3, max_angle=10.0, seed=0)
    assert np.all(np.abs(np.rad2deg([euler_angles(r) for r in small])) <= 10.0 + 1e-9)


# ------------------------------------------------------------------------------------------------ known transforms
def test_recovers_known_rigid_2d_multimodal_phantom():
    rng = np.random.default_rng(11)
    fixed = cr.Image(np.zeros((64, 72), np.float32), (1.0, 1.0), (-36.0, -32.0))
    pts = fixed.grid_points().reshape(-1, 2)
    blobs = _phantom(2, rng)
    fixed = fixed.like(_blobs(pts, *blobs).reshape(fixed.shape).astype(np.float32))
    truth = cr.Affine.euler([np.deg2rad(-131.0)], translation=(6.0, -4.0), center=_centre(fixed))
    # moving(q) = h(f(truth⁻¹ q)) with a non-monotone intensity map h (another "modality")
    q = truth.inverse().map_points(pts)
    f = _blobs(q, *blobs)
    moving = fixed.like((np.sin(2.5 * f) ** 2).reshape(fixed.shape).astype(np.float32))
    res = cr.register_rigid(fixed, moving, shrink_factors=(2, 1), samples=(180, 60), perturbation=(3,), keep=(5,),
                            smoothing_sigmas=(1.5, 0.5))
    assert isinstance(res.transform, cr.Affine)
    assert corner_error(res.transform, truth, fixed) < 1.0
    assert abs(res.metrics["angles_deg"][0] - (-131.0)) < 1.0
    np.testing.assert_allclose(res.transform.center, _centre(fixed))


def test_recovers_known_rigid_3d_oblique_anisotropic():
    """Fixed and moving on different oblique, anisotropic grids; analytic phantom, no resampling of the truth."""
    rng = np.random.default_rng(5)
    blobs = _phantom(3, rng, n_blobs=8, radius=14.0)
    fixed = cr.Image(np.zeros((20, 30, 26), np.float32), (1.5, 1.6, 2.1), (0.0, 0.0, 0.0),
                     oblique_direction(3, rng, flip=False).ravel())
    fixed = cr.Image(np.zeros(fixed.shape, np.float32), fixed.spacing,
                     -fixed.direction_matrix @ (np.asarray(fixed.spacing) * (np.asarray(fixed.size) - 1) / 2),
                     fixed.direction)
    moving = cr.Image(np.zeros((28, 22, 24), np.float32), (2.0, 1.7, 1.4), rng.uniform(-30, -20, 3),
                      oblique_direction(3, rng, flip=True).ravel())
    truth = cr.Affine.euler(np.deg2rad([25.0, -40.0, 70.0]), translation=(3.0, -2.0, 4.0), center=_centre(fixed))
    fpts = fixed.grid_points().reshape(-1, 3)
    fixed = fixed.like(_blobs(fpts, *blobs).reshape(fixed.shape).astype(np.float32))
    # put the phantom at the moving image's centre: moving(q) = 1 - f(truth⁻¹(q - c_M + c_F)) (inverted contrast)
    shift = _centre(moving) - _centre(fixed)
    truth = cr.Affine(truth.matrix, np.asarray(truth.translation) + shift, truth.center)
    mpts = moving.grid_points().reshape(-1, 3)
    moving = moving.like((1.0 - _blobs(truth.inverse().map_points(mpts), *blobs)).reshape(moving.shape)
                         .astype(np.float32))
    res = cr.register_rigid(fixed, moving, spacing=2.0, shrink_factors=(2, 1), samples=(600, 100),
                            perturbation=(8,), keep=(5,), smoothing_sigmas=(2.0, 1.0), polish=(2.0, 0.5), seed=1)
    err = corner_error(res.transform, truth, fixed)
    assert err < 1.5, (err, res.metrics["angles_deg"])
    assert sum(h["stage"] == "polish" for h in res.history) >= 12


# ------------------------------------------------------------------------------------------------ real multimodal 2-D
def _itk_trials(n, seed=2022, **kw):
    fixed, pd = _itk_pair()
    rng = np.random.default_rng(seed)
    c = _centre(fixed)
    out = []
    for _ in range(n):
        ang, shift = rng.uniform(-180, 180), rng.uniform(-30, 30, 2)
        truth = cr.Affine.euler([np.deg2rad(ang)], translation=shift, center=c)
        moving = _moved(pd, truth)
        t0 = time.perf_counter()
        res = cr.register_rigid(fixed, moving, **kw)
        out.append({"angle": ang, "error": corner_error(res.transform, truth, fixed),
                    "seconds": time.perf_counter() - t0})
    return out


def test_itk_t1_pd_random_rigid_few_trials():
    trials = _itk_trials(3, **FAST_2D)
    errors = [t["error"] for t in trials]
    assert all(e < 5.0 for e in errors), trials


def test_itk_t1_pd_rot60_case():
    """DATA.md mm2d_rot60: PD rotated 60° about the centre and shifted (20, -15) mm; every local peer fails."""
    fixed, pd = _itk_pair()
    truth = cr.Affine.euler([np.deg2rad(60.0)], translation=(20.0, -15.0), center=_centre(fixed))
    res = cr.register_rigid(fixed, _moved(pd, truth), **FAST_2D)
    assert corner_error(res.transform, truth, fixed) < 2.0
    assert abs(res.metrics["angles_deg"][0] - 60.0) < 1.0


@pytest.mark.slow
def test_itk_t1_pd_random_rigid_50_trials_explicit_schedule():
    trials = _itk_trials(50, **FAST_2D)
    rate = np.mean([t["error"] < 5.0 for t in trials])
    assert rate >= 0.95, (rate, [t for t in trials if t["error"] >= 5.0])


@pytest.mark.slow
def test_itk_t1_pd_random_rigid_50_trials_defaults():
    """The issue's ±180° random-trial test with the defaults (fast search + MI refinement)."""
    trials = _itk_trials(50)
    print(f"defaults, 50 trials: success {np.mean([t['error'] < 5.0 for t in trials]):.2f}, median error "
          f"{np.median([t['error'] for t in trials]):.3f} mm, median {np.median([t['seconds'] for t in trials]):.2f} s")
    rate = np.mean([t["error"] < 5.0 for t in trials])
    assert rate >= 0.95, (rate, [t for t in trials if t["error"] >= 5.0])


# ------------------------------------------------------------------------------------------------ the defaults
# schedule="fast" + local_refine="mi". Tolerances: a quarter of the 1 mm pixel on the ITK pair (measured 0.05 mm at 10°,
# 0.09 mm at 60°, 0.06 mm at -150°: docs/notes/rigid.md) and half the 2 mm pixel on the MNI152 slice the defaults were
# not tuned on (measured 0.19 mm) — sub-voxel either way, which the search alone (4 mm grid) does not reach.
@pytest.mark.parametrize("angle, shift", [(10.0, (13.0, 17.0)), (-150.0, (5.0, -20.0))])
def test_default_fast_search_and_mi_refinement_itk_pair(angle, shift):
    fixed, pd = _itk_pair()
    truth = cr.Affine.euler([np.deg2rad(angle)], translation=shift, center=_centre(fixed))
    moving = _moved(pd, truth)
    res = cr.register_rigid(fixed, moving)
    assert res.params["schedule"] == "fast" and res.params["local_refine"] == "mi"
    # ceil(π r / 16 mm) = 34 for r = 169 mm, raised to the floor of 36 rotations
    assert res.params["shrink_factors"] == (8, 4) and res.params["samples"] == (36, 12)
    local = res.metrics["local_refine"]
    assert local["method"] == "mi" and local["seconds"] > 0
    before = cr.Affine(np.asarray(local["matrix_before"]), local["translation_before"], res.transform.center)
    assert corner_error(res.transform, truth, fixed) < 0.25
    assert corner_error(before, truth, fixed) > corner_error(res.transform, truth, fixed)  # the refinement helped
    again = cr.register_rigid(fixed, moving)
    np.testing.assert_array_equal(again.transform.matrix, res.transform.matrix)
    np.testing.assert_array_equal(again.transform.translation, res.transform.translation)


def test_default_on_a_pair_it_was_not_tuned_on_mni152_slice():
    t1, other = _mni_pair()
    k = t1.shape[2] // 2
    fixed = cr.Image(t1.numpy()[:, :, k].copy(), t1.spacing[:2])
    truth = cr.Affine.euler([np.deg2rad(100.0)], translation=(8.0, -12.0), center=_centre(fixed))
    res = cr.register_rigid(fixed, _moved(fixed.like(other.numpy()[:, :, k].copy()), truth))
    assert corner_error(res.transform, truth, fixed) < 1.0


def test_paper_schedule_is_kept_and_runs_the_search_alone():
    fixed, moving, _ = _small_pair()

    def stop(event):
        if event.stage == "iteration":
            raise cr.StopRegistration

    res = cr.register_rigid(fixed, moving, schedule="paper", callback=stop)
    for key, value in PAPER_SCHEDULE.items():
        assert tuple(res.params[key]) == tuple(value), key
    assert res.params["local_refine"] == "none" and "local_refine" not in res.metrics
    explicit = cr.register_rigid(fixed, moving, **TINY)  # explicit search entries: the search alone, as before
    assert explicit.params["local_refine"] == "none" and explicit.params["schedule"] == "custom"
    partial = cr.register_rigid(fixed, moving, samples=(24, 8, 4, 0))  # the rest from the paper's schedule
    assert partial.params["shrink_factors"] == PAPER_SCHEDULE["shrink_factors"]


@pytest.mark.slow
def test_paper_schedule_full_run_itk_pair():
    fixed, pd = _itk_pair()
    truth = cr.Affine.euler([np.deg2rad(10.0)], translation=(13.0, 17.0), center=_centre(fixed))
    res = cr.register_rigid(fixed, _moved(pd, truth), schedule="paper")
    assert res.metrics["evaluations"] >= 5000 + 3000
    assert corner_error(res.transform, truth, fixed) < 1.0


# ------------------------------------------------------------------------------------------------ real 3-D
def _mni_pair():
    from classreg.data import mni152

    try:
        t1 = mni152("t1", resolution=2.0)
        gm = mni152("gm", resolution=2.0).numpy() / 255.0  # the shipped maps are stored as 0-255
        wm = mni152("wm", resolution=2.0).numpy() / 255.0
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    brain = ndimage.binary_fill_holes(ndimage.binary_closing((gm + wm) > 0.05, iterations=2))
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    other = (1.0 * csf + 0.55 * gm + 0.2 * wm) * brain  # CSF bright, WM dark ("T2-like")
    return t1, t1.like(other.astype(np.float32))


MNI_SCHEDULE = {"shrink_factors": (8, 4, 2), "samples": (2000, 600, 60), "perturbation": (10, 3), "keep": (20, 3),
                "smoothing_sigmas": (8.0, 5.0, 3.0)}


@pytest.mark.slow
def test_mni152_t1_vs_tissue_contrast_20_random_rigid():
    from scipy.spatial.transform import Rotation

    fixed, other = _mni_pair()
    rng = np.random.default_rng(2022)
    c = _centre(fixed)
    errors, times = [], []
    for _ in range(20):
        truth = cr.Affine(Rotation.random(random_state=rng).as_matrix(), rng.uniform(-20, 20, 3), c)
        t0 = time.perf_counter()
        res = cr.register_rigid(fixed, _moved(other, truth), **MNI_SCHEDULE)
        times.append(time.perf_counter() - t0)
        errors.append(corner_error(res.transform, truth, fixed))
    rate = np.mean(np.asarray(errors) < 10.0)  # 5 voxels of 2 mm
    print(f"MNI152 3-D: success {rate:.2f}, median corner error {np.median(errors):.2f} mm, "
          f"{np.median(times):.1f} s per alignment")
    assert rate >= 0.9, errors


@pytest.mark.slow
def test_mni152_t1_vs_tissue_contrast_defaults_5_random_rigid():
    """3-D defaults: ±180° (all of SO(3)) and ±20 mm, multimodal; sub-voxel and the time recorded."""
    from scipy.spatial.transform import Rotation

    fixed, other = _mni_pair()
    rng = np.random.default_rng(7)
    c = _centre(fixed)
    errors, times = [], []
    for _ in range(5):
        truth = cr.Affine(Rotation.random(random_state=rng).as_matrix(), rng.uniform(-20, 20, 3), c)
        t0 = time.perf_counter()
        res = cr.register_rigid(fixed, _moved(other, truth))
        times.append(time.perf_counter() - t0)
        errors.append(corner_error(res.transform, truth, fixed))
    print(f"MNI152 3-D defaults: corner errors {np.round(errors, 3).tolist()} mm, median "
          f"{np.median(times):.1f} s per alignment")
    assert max(errors) < 1.0, errors  # half a 2 mm voxel


# ------------------------------------------------------------------------------------------------ result, API
def _small_pair(seed=0, shape=(40, 44)):
    rng = np.random.default_rng(seed)
    fixed = cr.Image(np.zeros(shape, np.float32), (1.0, 1.0))
    pts = fixed.grid_points().reshape(-1, 2) - _centre(fixed)
    blobs = _phantom(2, rng, radius=10.0)
    fixed = fixed.like(_blobs(pts, *blobs).reshape(shape).astype(np.float32))
    truth = cr.Affine.euler([0.5], translation=(2.0, -1.0), center=_centre(fixed))
    return fixed, _moved(fixed, truth), truth


def test_result_contents_and_determinism():
    fixed, moving, truth = _small_pair()
    events = []
    r1 = cr.register_rigid(fixed, moving, **TINY, callback=events.append)
    r2 = cr.register_rigid(fixed, moving, **TINY)
    np.testing.assert_array_equal(r1.transform.homogeneous, r2.transform.homogeneous)
    assert [h["metric"] for h in r1.history] == [h["metric"] for h in r2.history]
    assert r1.params["samples"] == (24, 8) and r1.params["seed"] == 0 and r1.params["overlap"] == 0.5
    for key in ("shrink_factors", "perturbation", "keep", "smoothing_sigmas", "epsilon", "spacing", "versions",
                "threads", "backend", "squared", "max_angle"):
        assert key in r1.params
    n_eval = 24 + 8 + 3
    assert r1.metrics["evaluations"] == n_eval == len(r1.history) == len(r1.extras["scores"])
    assert r1.extras["rotations"].shape == (n_eval, 2, 2)
    assert r1.metrics["score"] == pytest.approx(max(h["metric"] for h in r1.history if h["level"] == 1))
    assert len(r1.metrics["best_candidates"]) == 2 and len(r1.metrics["levels"]) == 2
    assert [e.stage for e in events][:2] == ["start", "level_start"] and events[-1].stage == "done"
    assert r1.warped.same_grid(fixed)
    assert corner_error(r1.transform, truth, fixed) < 1.5
    r3 = cr.register_rigid(fixed, moving, **TINY, seed=1)
    assert [h["angle_z"] for h in r3.history[:5]] != [h["angle_z"] for h in r1.history[:5]]


def test_runs_on_the_pyramid_driver_with_its_level_events(monkeypatch):
    import classreg.solvers.rigid.register as reg
    from classreg import pyramid

    calls = []

    def driver(*args, **kwargs):
        calls.append(kwargs)
        return pyramid.multiresolution(*args, **kwargs)

    monkeypatch.setattr(reg, "multiresolution", driver)
    fixed, moving, _ = _small_pair()
    events = []
    res = cr.register_rigid(fixed, moving, **TINY, callback=events.append)
    assert len(calls) == 1 and calls[0]["iterations"] == (24, 8) and callable(calls[0]["level_images"])
    starts = [e for e in events if e.stage == "level_start"]
    ends = [e for e in events if e.stage == "level_end"]
    assert [e.extra["rotations"] for e in starts] == [24, 3 + 8]
    for k, (start, end) in enumerate(zip(starts, ends)):
        info = res.metrics["levels"][k]
        assert list(start.extra["fixed_shape"]) == info["fixed_shape"]
        assert list(start.extra["moving_shape"]) == info["moving_shape"]
        assert start.extra["spacing_mm"] == info["spacing_mm"] == TINY["shrink_factors"][k] * 1.0
        assert end.metric == info["best_score"]
    assert res.metrics["score"] == ends[-1].metric


def test_callback_can_stop_and_the_best_so_far_is_returned():
    fixed, moving, _ = _small_pair()

    def cb(ev):
        if ev.stage == "iteration" and ev.iteration == 10:
            raise cr.StopRegistration

    res = cr.register_rigid(fixed, moving, **TINY, callback=cb)
    assert res.stop_reason == "stopped by callback" and not res.converged
    assert len(res.history) == 11
    assert res.metrics["score"] == pytest.approx(max(h["metric"] for h in res.history))


def test_recovers_the_known_transform_and_is_a_valid_init_for_demons():
    fixed, moving, truth = _small_pair()
    rigid = cr.register_rigid(fixed, moving, **TINY)
    # the known map: 0.5 rad about the fixed centre, then (2, -1) mm. Angle within 2°: a 2° error moves the image
    # corners (≈ 30 mm from the centre) by ≈ 1 mm, one working voxel, the resolution of the finest level. The
    # translation (ITK, centre c_F = the truth's centre) within half a voxel: the shift is refined sub-voxel.
    assert abs(rigid.metrics["angles_deg"][0] - np.rad2deg(0.5)) < 2.0
    np.testing.assert_allclose(rigid.transform.translation, truth.translation, atol=0.5)
    np.testing.assert_allclose(rigid.transform.center, _centre(fixed))
    res = cr.register_demons(fixed, moving, init=rigid.transform, shrink_factors=(1,), iterations=(3,),
                             max_pieces=1)
    # demons runs on top of the rigid map, T = init ∘ field = Chain([field, init]), and stays within half a voxel
    # of the truth where the phantom is (demons alone, 3 iterations, is ≈ 3 mm off there)
    assert isinstance(res.transform, cr.Chain)
    np.testing.assert_array_equal(res.transform.transforms[-1].homogeneous, rigid.transform.homogeneous)
    pts = fixed.grid_points().reshape(-1, 2)
    inner = pts[np.linalg.norm(pts - _centre(fixed), axis=1) < 12.0]
    err = np.linalg.norm(res.transform.map_points(inner) - truth.map_points(inner), axis=1)
    assert err.max() < 0.5, err.max()
    assert res.metrics["ssd_after"] < res.metrics["ssd_before"]


def test_save_and_cli(tmp_path, capsys):
    from classreg.cli import main

    fixed, moving, truth = _small_pair()
    cr.save(fixed, tmp_path / "f.nii.gz")
    cr.save(moving, tmp_path / "m.nii.gz")
    out = tmp_path / "out"
    rc = main(["register", "rigid", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(out),
               "--shrink-factors", "2,1", "--samples", "24 8", "--perturbation", "5", "--keep", "3",
               "--smoothing-sigmas", "2,1", "-q"])
    assert rc == 0
    assert "rotations" in capsys.readouterr().out
    for name in ("transform.tfm", "inverse.tfm", "warped.nii.gz", "params.json", "history.csv", "result.json"):
        assert (out / name).is_file(), name
    params = json.loads((out / "params.json").read_text())
    assert params["samples"] == [24, 8]
    t = cr.load_transform(out / "transform.tfm")
    assert corner_error(t, truth, fixed) < 1.5
    import SimpleITK as sitk

    tx = sitk.ReadTransform(str(out / "transform.tfm"))
    p = _centre(fixed) + 5.0
    np.testing.assert_allclose(tx.TransformPoint(tuple(p)), t.map_points(p[None])[0], atol=1e-6)


def test_cli_switches(tmp_path):
    from classreg.cli import main

    fixed, moving, truth = _small_pair()
    cr.save(fixed, tmp_path / "f.nii.gz")
    cr.save(moving, tmp_path / "m.nii.gz")
    out = tmp_path / "out"
    rc = main(["register", "rigid", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(out),
               "--shrink-factors", "2", "1", "--samples", "24,8", "--perturbation", "5", "--keep", "3",
               "--smoothing-sigmas", "2", "1", "--no-refine", "--polish", "1", "--max-angle", "90", "--seed", "3",
               "--workers", "1", "--no-qc", "-q"])
    assert rc == 0
    params = json.loads((out / "params.json").read_text())
    assert params["refine"] is False and params["squared"] is True and params["polish"] == [1.0]
    assert params["max_angle"] == 90.0 and params["seed"] == 3 and params["workers"] == 1
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["subvoxel_offset"] == [0.0, 0.0]
    assert corner_error(cr.load_transform(out / "transform.tfm"), truth, fixed) < 1.5
    rc = main(["register", "rigid", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(out),
               "--shrink-factors", "2,1", "--samples", "24,8", "--perturbation", "5", "--keep", "3",
               "--smoothing-sigmas", "2,1", "--no-squared", "--no-qc", "-q", "--overwrite"])
    assert rc == 0 and json.loads((out / "params.json").read_text())["squared"] is False


def test_bad_input_errors():
    fixed, moving, _ = _small_pair()
    with pytest.raises(TypeError, match="fixed"):
        cr.register_rigid(fixed.numpy(), moving)
    with pytest.raises(ValueError, match="dimension"):
        cr.register_rigid(fixed, cr.Image(np.zeros((5, 6, 7), np.float32), 1.0))
    with pytest.raises(ValueError, match="scalar"):
        cr.register_rigid(cr.Image(np.zeros((5, 6, 2), np.float32), (1.0, 1.0), vector=True), moving)
    with pytest.raises(ValueError, match="perturbation"):
        cr.register_rigid(fixed, moving, shrink_factors=(2, 1), samples=(4, 2), perturbation=(5, 3), keep=(2,),
                          smoothing_sigmas=(1, 0))
    with pytest.raises(ValueError, match="samples"):
        cr.register_rigid(fixed, moving, **dict(TINY, samples=(0, 4)))
    with pytest.raises(ValueError, match="overlap"):
        cr.register_rigid(fixed, moving, **TINY, overlap=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        cr.register_rigid(fixed, moving, **TINY, epsilon=0.0)
    with pytest.raises(ValueError, match="max_angle"):
        cr.register_rigid(fixed, moving, **TINY, max_angle=270.0)
    with pytest.raises(ValueError, match="shrink_factors"):
        cr.register_rigid(fixed, moving, **dict(TINY, shrink_factors=(2, 0.5)))
    with pytest.raises(ValueError, match="empty"):
        cr.register_rigid(fixed, moving, **TINY, fixed_mask=np.zeros(fixed.shape, bool))
    with pytest.raises(ValueError, match="constant"):
        cr.register_rigid(fixed, moving.like(np.ones(moving.shape, np.float32)), **TINY)
    with pytest.raises(ValueError, match="dtype"):
        cr.register_rigid(fixed, moving, **TINY, dtype=np.int32)
    with pytest.raises(ValueError, match="NaN"):
        CrossSimilarityNGF(np.full((4, 4), np.nan), (3, 3))
    with pytest.raises(ValueError, match="b must have shape"):
        CrossSimilarityNGF(np.ones((6, 6)), (3, 3))(np.ones((4, 4)))
