import json

import numpy as np
import pytest
from scipy import ndimage

import classreg as cr
from classreg import evaluate
from classreg.pyramid import downsample
from phantoms import oblique_image, smooth_image


def _dipy_pair():
    from classreg.data import DataNotFoundError, dipy_file

    try:
        circle = np.load(dipy_file("circle.npy")).astype(np.float32)
        c = np.load(dipy_file("C.npy")).astype(np.float32)
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    # 2 mm grid: the classic 256² pair at half resolution keeps the test fast
    return downsample(cr.Image(c, (1.0, 1.0)), 2, 1.0), downsample(cr.Image(circle, (1.0, 1.0)), 2, 1.0)


def _texture(shape, rng):
    """Texture with structure at several scales (demons cannot see motion in flat regions: aperture problem)."""
    a = sum(smooth_image(shape, rng, sigma=s) for s in (1.0, 2.0, 4.0))
    return (a / 3.0).astype(np.float32)


def _known_pair(rng, shape=(72, 80), amplitude=4.0, spacing=(1.0, 1.0), scale=1.0, data=None):
    """fixed: textured image; moving = fixed∘ψ with ψ = id + scale·u (u smooth, max |u| = amplitude mm)."""
    fixed = cr.Image(_texture(shape, rng) if data is None else data, spacing)
    shape = fixed.shape
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 8.0) for _ in shape], -1)
    u *= amplitude / np.abs(u).max()
    psi = cr.DisplacementField.from_array_frame((scale * u).astype(np.float32), fixed)
    moving = cr.resample(fixed, psi, reference=fixed, interpolation="bspline")
    return fixed, moving, psi


def test_broken_geodesic_beats_a_single_piece_on_circle_to_c():
    """The broken-geodesic mechanism on its large-deformation case, with the settings that reach the C: the earlier
    default velocity σ (1.5 voxels, 3 mm here) and no det J floor (the match compresses the C's gap to det J ~0.01,
    measured 0.0098; with the defaults, min_det_j 0.05 stops it earlier: test_the_det_j_floor_holds)."""
    fixed, moving = _dipy_pair()
    kw = {"velocity_sigma": 3.0, "min_det_j": 0.0}
    one = cr.register_demons(fixed, moving, max_pieces=1, **kw)
    five = cr.register_demons(fixed, moving, max_pieces=5, **kw)
    assert one.metrics["pieces"] == 1 and five.metrics["pieces"] >= 2
    assert five.metrics["ssd_after"] < 0.2 * one.metrics["ssd_after"]
    assert five.metrics["ssd_after"] < 0.01 * five.metrics["ssd_before"]
    assert five.metrics["path_length"] > one.metrics["path_length"]
    assert {h["piece"] for h in five.history} == set(range(1, five.metrics["pieces"] + 1))
    stats = evaluate.jacobian_stats(five.transform)
    assert stats["min_det"] > 0  # diffeomorphic on the grid even for this large deformation


def test_the_det_j_floor_holds():
    """min_det_j: on circle → C with the earlier default σ (which reaches det J 0.0098 without a floor, above) the
    result keeps det J ≥ 0.05 on the grid (central differences, the solver's own check; evaluate.jacobian_stats uses
    the same stencil), still improves the match, and says where it stopped."""
    fixed, moving = _dipy_pair()
    r = cr.register_demons(fixed, moving, velocity_sigma=3.0)
    assert r.params["min_det_j"] == 0.05
    assert evaluate.jacobian_stats(r.transform)["min_det"] >= 0.05
    assert r.metrics["ssd_after"] < 0.5 * r.metrics["ssd_before"]  # measured 0.067 / 0.154
    assert "min_det_j" in r.stop_reason
    with pytest.raises(ValueError, match="min_det_j"):
        cr.register_demons(fixed, moving, min_det_j=1.0)


def test_path_length_grows_with_the_deformation(rng):
    lengths = []
    for scale in (0.5, 1.0, 2.0):
        fixed, moving, _ = _known_pair(np.random.default_rng(7), scale=scale)
        r = cr.register_demons(fixed, moving, max_pieces=3)
        lengths.append(r.metrics["path_length"])
    assert lengths[0] < lengths[1] < lengths[2]


def test_recovers_known_deformation_of_a_real_slice_and_is_inverse_consistent(rng):
    """dipy's real T1 coronal slice (at 2 mm, anisotropic grid 2 x 1.6 mm) warped by a known smooth map."""
    from classreg.data import DataNotFoundError, dipy_file

    try:
        t1 = np.load(dipy_file("t1_coronal_slice.npy")).astype(np.float32)
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    data = downsample(cr.Image(t1, (1.0, 1.0)), 2, 1.0).data
    fixed, moving, psi = _known_pair(rng, amplitude=6.0, spacing=(2.0, 1.6), data=data)
    r = cr.register_demons(fixed, moving, intensity="joint")
    truth = psi.inverse()  # the registration transform maps fixed points to moving points: T = ψ⁻¹
    brain = ndimage.binary_erosion(fixed.data > 0.1 * fixed.data.max(), iterations=2)
    pts = fixed.grid_points()[brain].reshape(-1, 2)
    epe = np.linalg.norm(r.transform.map_points(pts) - truth.map_points(pts), axis=1)
    epe0 = np.linalg.norm(pts - truth.map_points(pts), axis=1)
    assert epe.mean() < 0.35 * epe0.mean() and epe.mean() < 1.0  # mm; voxels are 1.6-2 mm
    ic = evaluate.inverse_consistency(r.transform, r.inverse, reference=fixed)
    assert ic["mean_voxels"] < 0.1
    assert evaluate.jacobian_stats(r.transform)["min_det"] > 0
    assert r.warped.same_grid(fixed) and r.metrics["ssd_after"] < 0.2 * r.metrics["ssd_before"]


def test_oblique_3d_with_affine_init_and_masks(rng):
    fixed = oblique_image((28, 30, 32), rng, dtype=np.float32)
    t = cr.Affine.from_translation([1.5, -1.0, 0.5])
    moving = cr.resample(fixed, t.inverse(), reference=fixed, interpolation="bspline")  # moving(y) = fixed(t⁻¹ y)
    mask = np.zeros(fixed.shape, bool)
    mask[3:-3, 3:-3, 3:-3] = True
    r = cr.register_demons(fixed, moving, init=t, fixed_mask=mask, iterations=(20, 10), shrink_factors=(2, 1),
                           max_pieces=2, intensity="joint")
    assert isinstance(r.transform, cr.Chain)
    assert r.metrics["ssd_after"] <= r.metrics["ssd_before"] + 1e-6
    pts = fixed.grid_points()[mask].reshape(-1, 3)
    # with the right init, the deformable part should stay close to the identity
    assert np.linalg.norm(r.transform.map_points(pts) - t.map_points(pts), axis=1).mean() < 0.3


def test_deterministic_and_callback_stop(rng):
    fixed, moving, _ = _known_pair(rng, shape=(48, 52))
    a = cr.register_demons(fixed, moving, max_pieces=2)
    b = cr.register_demons(fixed, moving, max_pieces=2)
    np.testing.assert_array_equal(a.transform.displacement, b.transform.displacement)
    events = []

    def cb(ev):
        events.append(ev.stage)
        if ev.stage == "iteration" and len(events) > 6:
            raise cr.StopRegistration

    c = cr.register_demons(fixed, moving, callback=cb)
    assert not c.converged and c.stop_reason == "stopped by callback"
    assert events[0] == "start" and "done" not in events


@pytest.mark.parametrize("metric", ["ssd", "lncc", "mi"])
def test_a_level_stops_when_its_energy_stalls(metric, rng):
    """Identical images: with the symmetric update (forward and backward forces cancel) the energy cannot change,
    so every level ends after the 6 iterations the test needs (the LNCC energy is negative: the relative tolerance
    must use its magnitude). The one-sided LNCC step (normalised to ``max_step``) does move, but each level keeps its
    best velocity, so the result is still the identity (for MI: a map near it of no lower MI)."""
    img = cr.Image(_texture((40, 44), rng), (1.0, 1.0))
    r = cr.register_demons(img, img, metric=metric, symmetric=True, iterations=(20, 20, 20), max_pieces=1)
    per_level = {}
    for h in r.history:
        if "iteration" in h:
            per_level[h["level"]] = per_level.get(h["level"], 0) + 1
    assert per_level == {0: 6, 1: 6, 2: 6}
    one_sided = cr.register_demons(img, img, metric=metric, symmetric=False, max_pieces=2)
    if metric != "mi":
        assert np.abs(one_sided.transform.displacement).max() == 0.0
    else:  # identity is not the Parzen MI's maximum: a small move may raise it (measured 0.32 mm), never lower it
        assert np.abs(one_sided.transform.displacement).max() < 0.5
        assert one_sided.metrics["mi_after"] >= one_sided.metrics["mi_before"]


def test_bad_input():
    img = cr.Image(np.random.default_rng(0).random((20, 20)).astype(np.float32), 1.0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        cr.register_demons(img, cr.Image(np.zeros((5, 5, 5)), 1.0))
    with pytest.raises(ValueError, match="metric"):
        cr.register_demons(img, img, metric="nmi")
    with pytest.raises(ValueError, match="constant"):
        cr.register_demons(img, img.like(np.zeros((20, 20), np.float32)))
    with pytest.raises(ValueError, match="fixed_mask is empty"):
        cr.register_demons(img, img, fixed_mask=np.zeros((20, 20)))
    with pytest.raises(ValueError, match="max_step"):
        cr.register_demons(img, img, max_step=0.0)
    with pytest.raises(TypeError, match="init"):
        cr.register_demons(img, img, init=np.eye(3))


def _multimodal_pair(rng, shape=(64, 72), amplitude=3.0):
    """fixed: texture in [0, 1]; moving: a non-monotone intensity map of it (a bright band in the middle of the
    range, dark at both ends: no single linear or monotone relation), warped by a known smooth map."""
    fixed, _, psi = _known_pair(rng, shape=shape, amplitude=amplitude)
    f = (fixed.data - fixed.data.min()) / np.ptp(fixed.data)
    fixed = fixed.like(f.astype(np.float32))
    other = fixed.like(np.exp(-((f - 0.5) / 0.2) ** 2).astype(np.float32))
    return fixed, cr.resample(other, psi, reference=fixed, interpolation="bspline"), psi


def test_mi_update_is_a_descent_direction(rng):
    """The "mi" update u (the MI descent direction −∂C/∂W ∇W, smoothed, scaled to max_step) lowers the Mattes MI
    cost C = −MI. (1) The first variation Σ ∂C/∂W δ with δ = ∇W·u is negative and matches central differences of
    C(W + ε δ) to 1e-3 (ε = 1e-3: the exact derivative of the histogram cost). (2) Along the warp itself,
    C(M∘(id + ε u)) falls too, at ε = ±0.05 mm and for a finite step (its slope is not compared with (1): linear
    interpolation and the central-difference image gradient differ by 10-35 % on this fine texture)."""
    from classreg.kernels.diff import gradient
    from classreg.kernels.smooth import gaussian
    from classreg.kernels.warp import warp

    from classreg.solvers.demons.step import _to_max_step
    from classreg.terms import MattesMI

    fixed, moving, _ = _multimodal_pair(rng)
    F, M = fixed.data.astype(np.float64), moving.data.astype(np.float64)
    h = (1.0, 1.0)
    # limits fixed once (as on a solver's level), so that C is a smooth function of the warped image
    term = MattesMI(bins=32, fixed_limits=(F.min(), F.max()), moving_limits=(M.min() - 0.1, M.max() + 0.1))
    g = gradient(M, spacing=h)
    u, cost = term.descent(F, M, g, spacing=h)
    u = _to_max_step(gaussian(u, 2.0, spacing=h, ndim=2), 1.0)
    assert np.sqrt((u ** 2).sum(-1)).max() == pytest.approx(1.0)
    _, dcost = term.gradient(F, M, spacing=h)
    delta = np.sum(g * u, axis=-1)
    slope = float(np.sum(dcost * delta))
    eps = 1e-3
    fd = (term.value(F, M + eps * delta) - term.value(F, M - eps * delta)) / (2 * eps)
    assert slope < 0
    assert fd == pytest.approx(slope, rel=1e-3)

    def c(e):
        return term.value(F, warp(M, e * u, order=1, mode="border"))

    assert (c(0.05) - c(-0.05)) / 0.1 < 0
    assert c(0.5) < cost


def test_mi_registers_a_multimodal_pair_deterministically(rng):
    """metric="mi" on a pair whose intensities are related by a non-monotone map: the known deformation is
    recovered to well under its size, the MI rises, the map keeps the det J floor; two runs are bitwise equal."""
    fixed, moving, psi = _multimodal_pair(rng)
    a = cr.register_demons(fixed, moving, metric="mi")
    b = cr.register_demons(fixed, moving, metric="mi")
    np.testing.assert_array_equal(a.transform.displacement, b.transform.displacement)
    p = a.params
    assert (p["symmetric"], tuple(p["iterations"]), p["update_sigma"], p["max_step"]) == (False, (30, 20, 10), 1, 1)
    truth = psi.inverse()
    inner = np.zeros(fixed.shape, bool)
    inner[8:-8, 8:-8] = True
    pts = fixed.grid_points()[inner].reshape(-1, 2)
    epe = np.linalg.norm(a.transform.map_points(pts) - truth.map_points(pts), axis=1).mean()
    epe0 = np.linalg.norm(pts - truth.map_points(pts), axis=1).mean()
    assert epe < 0.2 * epe0  # mm; measured 0.084 of 1.15 mm (SSD: 7.5 mm, it diverges)
    assert a.metrics["mi_after"] > a.metrics["mi_before"]
    assert evaluate.jacobian_stats(a.transform)["min_det"] >= 0.05
    ssd = cr.register_demons(fixed, moving, metric="ssd", intensity="joint")  # the SSD force cannot use this relation
    epe_ssd = np.linalg.norm(ssd.transform.map_points(pts) - truth.map_points(pts), axis=1).mean()
    assert epe < 0.5 * epe_ssd


def test_same_intensity_scale_bounds():
    """The rule behind every "auto" choice: the 99.5 percentiles within a quarter of the fixed range (a moving image at
    0.8 × the fixed intensities passes, at 0.7 × or 0.5 × — inter3d's case — it does not), the 0.5 percentiles within
    half (zeros padded into a copy of a fixed image whose low end is 0.3, 44 % of its range, pass)."""
    from classreg.solvers._common import SAME_SCALE_TOLERANCE, same_intensity_scale

    assert SAME_SCALE_TOLERANCE == {"low": 0.5, "high": 0.25}
    ramp = np.linspace(0.0, 1.0, 4000, dtype=np.float32).reshape(40, 100)
    fixed = cr.Image(ramp, (1.0, 1.0))
    assert [same_intensity_scale(fixed, fixed.like(ramp * s))[0] for s in (1.0, 0.8, 0.7, 0.5, 3.0)] == [
        True, True, False, False, False]
    lifted = 0.3 + 0.7 * ramp  # percentiles 0.3035 and 0.9965
    padded = lifted.copy()
    padded[:, :5] = 0.0  # 5 % of the voxels: the moving 0.5 percentile is 0
    fixed = cr.Image(lifted, (1.0, 1.0))
    assert same_intensity_scale(fixed, fixed.like(padded))[0]
    assert not same_intensity_scale(fixed, fixed.like(0.5 * padded))[0]


def test_auto_metric_picks_ssd_on_one_scale_and_mi_across_scales(rng, caplog):
    """metric="auto" (the default): SSD for a pair on one intensity scale, MI for the same pair with the moving image
    stored in other units (×250 + 40, as a 0-255 file against a [0, 1] one); the choice is logged and recorded, an
    explicit metric is kept, and the MI run is the explicit MI run."""
    import logging

    from classreg.solvers._common import same_intensity_scale

    fixed, moving, _ = _known_pair(rng, shape=(40, 44), amplitude=2.0)
    other_units = moving.like((250.0 * moving.data + 40.0).astype(np.float32))
    assert same_intensity_scale(fixed, moving)[0] and not same_intensity_scale(fixed, other_units)[0]
    kw = {"iterations": (4, 4, 4), "max_pieces": 2}
    with caplog.at_level(logging.INFO, logger="classreg"):
        same = cr.register_demons(fixed, moving, **kw)
        across = cr.register_demons(fixed, other_units, **kw)
    assert same.params["metric"] == "ssd" and across.params["metric"] == "mi"
    assert "metric='auto' -> 'ssd'" in caplog.text and "metric='auto' -> 'mi'" in caplog.text
    assert across.params["velocity_sigma"] == 2.0 and across.params["symmetric"] is False  # MI's own defaults
    mi = cr.register_demons(fixed, other_units, metric="mi", **kw)
    np.testing.assert_array_equal(mi.transform.displacement, across.transform.displacement)
    assert cr.register_demons(fixed, other_units, metric="ssd", **kw).params["metric"] == "ssd"


def test_mi_masks(rng):
    """The MI descent is zero outside ``mask & moving_valid`` and its cost is the MI over that set; in a run the
    fixed mask is where the forces and the energy are computed: the reported MI is the mask's, and far from the
    mask (28 voxels beyond it) the map moves less than without the mask (only the smoothing reaches there; ratio
    measured 0.01-0.22 over seeds 0-3 and the fixture's)."""
    from classreg.kernels.diff import gradient

    from classreg.terms import MattesMI

    fixed, moving, _ = _multimodal_pair(rng)
    F, M = fixed.data, moving.data
    mask = np.zeros(F.shape, bool)
    mask[:, :24] = True
    valid = np.ones(F.shape, bool)
    valid[:10] = False
    term = MattesMI(bins=32)
    u, cost = term.descent(F, M, gradient(M, spacing=(1.0, 1.0)), spacing=(1.0, 1.0), mask=mask,
                           moving_valid=valid)
    assert np.all(u[~(mask & valid)] == 0) and np.abs(u[mask & valid]).max() > 0
    assert cost == pytest.approx(term.value(F, M, mask=mask & valid))
    free = cr.register_demons(fixed, moving, metric="mi", intensity="joint")
    held = cr.register_demons(fixed, moving, metric="mi", fixed_mask=mask, intensity="joint")
    # intensity="joint" scales both images by one affine map, which leaves the Parzen MI unchanged
    assert held.metrics["mi_before"] == pytest.approx(-term.value(F, M, mask=mask), rel=1e-4)
    far = (slice(None), slice(52, None))
    d_free = np.linalg.norm(free.transform.displacement[far], axis=-1).mean()
    d_held = np.linalg.norm(held.transform.displacement[far], axis=-1).mean()
    assert d_held < 0.5 * d_free


def test_mi_bad_input():
    img = cr.Image(np.random.default_rng(0).random((20, 20)).astype(np.float32), 1.0)
    with pytest.raises(ValueError, match="update_sigma"):
        cr.register_demons(img, img, metric="mi", update_sigma=-1.0)


@pytest.mark.slow
def test_mni152_known_deformation_3d():
    """Acceptance check: MNI152 2 mm warped by a smooth diffeomorphism (max 8 mm, seed 0): EPE < 1 mm in the brain."""
    from classreg.data import DataNotFoundError, mni152

    try:
        fixed = mni152("t1", resolution=2.0)
        brain = (mni152("gm", resolution=2.0).data + mni152("wm", resolution=2.0).data) > 0.5 * 255  # maps are 0-255
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    rng = np.random.default_rng(0)
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=fixed.shape), 6.0) for _ in range(3)], -1)
    u *= 8.0 / np.abs(u).max()
    psi = cr.DisplacementField.from_array_frame(u.astype(np.float32), fixed)
    moving = cr.resample(fixed, psi, reference=fixed)
    r = cr.register_demons(fixed, moving)
    truth = psi.inverse()
    pts = fixed.grid_points()[brain]
    epe = np.linalg.norm(r.transform.map_points(pts) - truth.map_points(pts), axis=1)
    assert epe.mean() < 1.0
    assert evaluate.jacobian_stats(r.transform)["min_det"] > 0


def test_cli_register_demons_writes_outputs(tmp_path, rng):
    pytest.importorskip("matplotlib")
    from classreg.cli import main

    fixed, moving, _ = _known_pair(rng, shape=(40, 44))
    cr.save(fixed, tmp_path / "f.nii.gz")
    cr.save(moving, tmp_path / "m.nii.gz")
    rc = main(["register", "demons", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
               str(tmp_path / "out"), "--max-pieces", "2", "--quiet", "--save-extras"])
    assert rc == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"qc.png", "warped.nii.gz", "transform.nii.gz", "inverse.nii.gz", "params.json", "history.csv",
            "result.json", "extras.npz"} <= names
    back = cr.load_result(tmp_path / "out")
    assert len(back.extras["velocities"]) == back.metrics["pieces"]
    assert back.params["symmetric"] is True and tuple(back.params["iterations"]) == (15, 10, 5)  # ssd defaults
    assert main(["register", "demons", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
                 str(tmp_path / "cc"), "--metric", "lncc", "--max-pieces", "1", "--quiet", "--no-qc"]) == 0
    cc = cr.load_result(tmp_path / "cc")
    assert cc.params["symmetric"] is False and tuple(cc.params["iterations"]) == (30, 20, 10)  # lncc defaults
    assert main(["register", "demons", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
                 str(tmp_path / "cc2"), "--metric", "lncc", "--symmetric", "--iterations", "3", "2", "1",
                 "--max-pieces", "1", "--quiet", "--no-qc"]) == 0
    cc2 = cr.load_result(tmp_path / "cc2")
    assert cc2.params["symmetric"] is True and tuple(cc2.params["iterations"]) == (3, 2, 1)
    assert main(["register", "demons", str(tmp_path / "f.nii.gz"), str(tmp_path / "missing.nii.gz"), "-o",
                 str(tmp_path / "o2")]) == 1


def test_demo_2d_runs_on_shipped_data(tmp_path):
    pytest.importorskip("matplotlib")
    from classreg.data import DataNotFoundError
    from classreg.demo import run_demo

    try:
        s = run_demo(tmp_path / "demo", prefer_3d=False, progress=False, max_pieces=2)
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    assert s["case"] == "2-D inter-subject" and (tmp_path / "demo" / "qc.png").is_file()
    assert s["ncc_demons"] > s["ncc_affine"] and s["percent_det_j_nonpositive"] == 0.0


def test_demo_command_names_where_it_measures(tmp_path, capsys):
    """``classreg demo`` prints NCC and det J over the fixed image's mask; qc.png shows them over the whole grid, so
    the printed lines name the region (the two figures differ and both are right)."""
    pytest.importorskip("matplotlib")
    from classreg.cli import main
    from classreg.data import DataNotFoundError

    try:
        rc = main(["demo", "--2d", "--quiet", "-o", str(tmp_path / "demo")])
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert rc == 0 and s["mask"] == "head's foreground"
    assert f"NCC in the head's foreground {s['ncc_demons']:.3f}" in out
    assert f"det J in the head's foreground: min {s['min_det_j']:.3f}" in out


def test_a_further_piece_must_lower_negative_energies_too():
    """piece_tol is a fraction of the energy's size: the MI cost (−MI) is negative, and a piece that raises it —
    even by less than piece_tol — is not kept (the rule used to be ``new > old · (1 − tol)``, which accepted that)."""
    from classreg.solvers.demons.register import _lowers

    assert _lowers(0.98, 1.0, 0.01) and not _lowers(0.995, 1.0, 0.01)  # SSD: > 1 % lower, < 1 % lower
    assert _lowers(-0.203, -0.2, 0.01) and not _lowers(-0.201, -0.2, 0.01)  # −MI: 1.5 % lower, 0.5 % lower
    assert not _lowers(-0.199, -0.2, 0.01)  # −MI raised by 0.5 %: refused (accepted by the old rule)
