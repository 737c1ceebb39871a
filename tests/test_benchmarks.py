"""The benchmark harness (benchmarks/run.py): conversion of peers' outputs to classreg transforms, skipping of missing
peers, the ``--quick`` smoke run, and the kernel benchmark (so the harnesses cannot rot)."""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import classreg as cr
from benchmarks import tools as T
from benchmarks.cases import kmeans_labels
from classreg.data import DataNotFoundError, itk_example


def _grids():
    """A fixed grid and a differently sampled, oblique moving grid, and a rigid fixed → moving map."""
    fixed = cr.Image(np.zeros((40, 50), np.float32), (1.0, 1.2), (-3.0, 4.0))
    th = np.radians(20.0)
    direction = (np.cos(th), -np.sin(th), np.sin(th), np.cos(th))
    moving = cr.Image(np.zeros((45, 42), np.float32), (1.1, 1.3), (-8.0, 2.0), direction)
    aff = cr.Affine.euler([np.radians(7.0)], translation=(2.5, -1.5), center=(20.0, 25.0))
    return fixed, moving, aff


def _check_field(fixed, moving, aff, field, valid, atol):
    pts = fixed.grid_points()
    expect = aff.map_points(pts.reshape(-1, 2)).reshape(pts.shape)
    idx = moving.world_to_index(expect.reshape(-1, 2)).reshape(pts.shape)
    # points mapped beyond the moving image's half-voxel border are flagged invalid (ITK-based tools sample up to
    # half a voxel outside by clamping); interior points (one voxel from the border) are valid and exact
    outside = np.any((idx < -0.5) | (idx > np.array(moving.shape) - 0.5), axis=-1)
    interior = np.all((idx >= 1) & (idx <= np.array(moving.shape) - 2), axis=-1)
    assert interior.sum() > 0.3 * interior.size and outside.sum() > 0.1 * outside.size
    assert valid[interior].all()
    assert not valid[outside].any()
    got = field.map_points(pts[interior])
    np.testing.assert_allclose(got, expect[interior], atol=atol, rtol=0)


def test_sitk_coordinate_conversion_recovers_a_known_transform():
    fixed, moving, aff = _grids()
    case = {"fixed": fixed, "moving": moving}
    field, valid = T._sitk_resample_coords(case, aff.to_sitk())
    _check_field(fixed, moving, aff, field, valid, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("ants") is None, reason="antspyx not installed (bench extra)")
def test_ants_coordinate_conversion_recovers_a_known_transform(tmp_path):
    fixed, moving, aff = _grids()
    path = aff.save(tmp_path / "aff.mat")  # ITK binary .mat, as ANTs writes its affines
    field, valid = T._ants_field({"fixed": fixed, "moving": moving}, [str(path)])
    _check_field(fixed, moving, aff, field, valid, atol=5e-3)  # float32 coordinate images (~1e-3 mm at OFFSET)


@pytest.mark.skipif(importlib.util.find_spec("dipy") is None, reason="dipy not installed")
def test_dipy_coordinate_conversion_recovers_a_known_transform():
    from dipy.align.imaffine import AffineMap

    fixed, moving, aff = _grids()
    amap = AffineMap(aff.homogeneous, domain_grid_shape=fixed.shape, domain_grid2world=fixed.affine,
                     codomain_grid_shape=moving.shape, codomain_grid2world=moving.affine)
    warped = [amap.transform(c.data, interpolation="linear") for c in T.coordinate_images(moving)]
    field, valid = T.field_from_coordinates(fixed, warped)
    _check_field(fixed, moving, aff, field, valid, atol=1e-6)


def test_kmeans_labels_orders_classes_by_intensity():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(m, 0.05, 500) for m in (0.9, 0.2, 0.5)])
    lab = kmeans_labels(v, np.ones(v.shape, bool))
    assert [int(np.bincount(lab[i * 500:(i + 1) * 500]).argmax()) for i in range(3)] == [3, 1, 2]
    assert np.array_equal(lab, kmeans_labels(v, np.ones(v.shape, bool)))  # deterministic
    with pytest.raises(ValueError, match="fewer than"):
        kmeans_labels(v, np.zeros(v.shape, bool))


def test_missing_peer_is_skipped_with_a_note(tmp_path, monkeypatch):
    from benchmarks import run as R

    fake = dataclasses.replace(R.TOOLS["sitk_diffeo_demons"], name="nopeer", label="No Peer",
                               requires=("classreg_no_such_module",))
    monkeypatch.setitem(R.TOOLS, "nopeer", fake)
    try:
        payload = R.run(["circle2d"], ["nopeer"], repeat=1, quick=True, out_dir=tmp_path, log=lambda s: None)
    except DataNotFoundError as exc:  # pragma: no cover - dipy data
        pytest.skip(str(exc))
    assert any("classreg_no_such_module" in s for s in payload["skipped"])
    assert payload["rows"] == []
    assert json.loads((tmp_path / f"{payload['date']}.json").read_text())["skipped"] == payload["skipped"]


def test_versions_record_the_git_commit(tmp_path, monkeypatch):
    from benchmarks import run as R

    root = Path(R.__file__).resolve().parent.parent
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert R.versions()["classreg git"].split("+")[0] == head
    monkeypatch.setattr(R, "__file__", str(tmp_path / "benchmarks" / "run.py"))  # outside any checkout
    assert "classreg git" not in R.versions()


@pytest.mark.slow  # every solver in its own worker process: 160 s on 2 cores with a cold numba cache
def test_quick_run_smoke(tmp_path):
    """``python -m benchmarks.run --quick``: every classreg solver runs next to a peer, metrics and the page are
    written (≈1 min on 2 cores)."""
    from benchmarks import run as R

    for need in ("RatLungSlice1.mha", "BrainT1SliceBorder20.png"):
        try:
            itk_example(need)
        except DataNotFoundError as exc:
            pytest.skip(str(exc))
    if importlib.util.find_spec("nilearn") is None:
        pytest.skip("nilearn not installed (fsaverage5 points)")
    docs = tmp_path / "benchmarks.md"
    assert R.main(["--quick", "--out", str(tmp_path), "--docs", str(docs)]) == 0
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {(r["case"], r["tool"]): r for r in payload["rows"]}
    before = {k: v["before"] for k, v in payload["cases"].items()}
    demons = rows[("lung2d", "classreg_demons")]
    assert demons["mean_dice"] > before["lung2d"]["mean_dice"] + 0.01
    assert demons["percent_det_nonpositive"] == 0.0 and demons["seconds"] > 0 and demons["peak_rss_mb"] > 0
    cc = rows[("lung2d", "classreg_demons_cc")]
    assert cc["mean_dice"] > before["lung2d"]["mean_dice"] + 0.01 and cc["percent_det_nonpositive"] == 0.0
    lddmm = rows[("lung2d", "classreg_lddmm")]
    assert lddmm["mean_dice"] > before["lung2d"]["mean_dice"] and lddmm["percent_det_nonpositive"] == 0.0
    assert rows[("mm2d_rot60", "classreg_rigid")]["tre_mm"] < 2.0 < before["mm2d_rot60"]["tre_mm"]
    assert rows[("points", "classreg_points")]["corr_err_mm"] < 0.5 * before["points"]["corr_err_mm"]
    peer = rows[("lung2d", "sitk_diffeo_demons")]
    assert peer["mean_dice"] > before["lung2d"]["mean_dice"]
    ratio = next(r for r in payload["ratios"]
                 if r["classreg"] == "classreg_demons" and r["peer"] == "sitk_diffeo_demons")
    assert ratio["time_ratio"] == pytest.approx(demons["seconds"] / peer["seconds"])
    assert ratio["quality_diff"] == pytest.approx(demons["mean_dice"] - peer["mean_dice"])
    assert payload["threads"] == 2 and "numpy" in payload["versions"] and payload["machine"]["cpu_count"]
    text = docs.read_text()
    assert "## lung2d" in text and f"| {T.TOOLS['classreg_demons'].label} |" in text and "classreg vs each peer" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert docs.with_suffix(".png").stat().st_size > 1000


def test_kernel_targets_are_checked_against_the_rows():
    from benchmarks.kernels import target_lines

    rows = [{"kernel": "warp linear 3-D (disp)", "size": 128, "speedup": 4.9, "x_copy_bound": 6.5},
            {"kernel": "warp linear 3-D (disp)", "size": 192, "speedup": 5.1, "x_copy_bound": 4.3},
            {"kernel": "gaussian σ=2 vox", "size": 128, "speedup": 2.0}]
    lines = target_lines(rows)
    assert len(lines) == 5
    assert "map_coordinates" in lines[0] and lines[0].endswith("**not met**")  # 4.9 < 5
    assert lines[1].endswith("— met")
    assert lines[2].startswith("* Gaussian") and lines[2].endswith("— met")  # 2.0 ≥ 2
    assert "copy bound, 128³: 6.5×" in lines[3] and lines[3].endswith("**not met**")
    assert lines[4].endswith("— met")  # 4.3 ≤ 5


@pytest.mark.slow  # 20-40 s on a cold numba cache, nearly all of it compiling 3-D kernel variants
@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
def test_kernel_benchmark_smoke(tmp_path):
    """A tiny run writes the JSON, the table and the docs page with every kernel row and the target checks."""
    from benchmarks.kernels import main

    page = tmp_path / "page.md"
    assert main(["--sizes", "12", "--repeat", "1", "--threads", "1", "--out", str(tmp_path), "--docs", str(page)]) == 0
    rec = json.loads(next(tmp_path.glob("kernels-*.json")).read_text())
    kernels = [r["kernel"] for r in rec["rows"]]
    assert kernels[0] == "memory copy (bound)" and "expmap (scaling & squaring)" in kernels and len(kernels) == 9
    assert all(r["ours_s"] > 0 and r["x_copy_bound"] > 0 for r in rec["rows"])
    text = page.read_text()
    assert "python -m benchmarks.kernels --sizes 12" in text and text.count("12³:") == 4
    assert "| warp linear 3-D (disp) | 12 |" in text


# --------------------------------------------------------------------------------------------- parametric rows
def _need(*names):
    for need in names:
        try:
            itk_example(need)
        except DataNotFoundError as exc:
            pytest.skip(str(exc))


def test_sim2d_case_is_a_seeded_similarity(tmp_path):
    """sim2d: the truth is the similarity drawn by default_rng(0) (recorded in case.json), and the moving image is the
    PD slice seen through it."""
    from benchmarks import run as R
    from benchmarks.cases import SIM2D_RANGES, build_case, load_case, similarity_draw

    _need("BrainT1SliceBorder20.png", "BrainProtonDensitySliceBorder20.png")
    info = build_case("sim2d", tmp_path, quick=True)
    angle, scale, shift = similarity_draw(0)
    rng = np.random.default_rng(0)
    assert (angle, scale) == (rng.uniform(-20, 20), rng.uniform(0.9, 1.1)) and shift == tuple(rng.uniform(-15, 15, 2))
    lo, hi = SIM2D_RANGES["shift_mm"]
    assert -20 <= angle <= 20 and 0.9 <= scale <= 1.1 and all(lo <= v <= hi for v in shift)
    assert info["kind"] == "rigid" and info["transform"] == "similarity" and info["seed"] == 0
    assert (info["truth_angle_deg"], info["truth_scale"], info["truth_shift_mm"]) == (angle, scale, list(shift))
    case = load_case(tmp_path)
    truth = case["truth"]
    a = np.asarray(truth.matrix)
    assert np.allclose(a.T @ a, scale ** 2 * np.eye(2)) and np.isclose(np.degrees(np.arctan2(a[1, 0], a[0, 0])), angle)
    assert R.evaluate_rigid(case, truth)["tre_mm"] == 0.0
    assert R.evaluate_before(case)["tre_mm"] > 5.0
    # moving(truth(x)) = PD(x): the moving image pulled back through the truth is the PD slice again
    from benchmarks.cases import _shrink
    from classreg.data import itk_example_image

    pd = _shrink(itk_example_image("BrainProtonDensitySliceBorder20.png", dtype=np.float32), 2)
    pulled = cr.resample(case["moving"], truth, reference=case["fixed"])
    m = case["mask"].data > 0
    assert np.corrcoef(pulled.data[m], pd.data[m])[0, 1] > 0.97
    assert np.corrcoef(case["moving"].data[m], pd.data[m])[0, 1] < 0.7


@pytest.mark.slow  # builds the 3-D case (~10 s)
def test_affine3d_case_is_not_prealigned(tmp_path):
    from benchmarks import run as R
    from benchmarks.cases import build_case, load_case

    if importlib.util.find_spec("nilearn") is None:
        pytest.skip("nilearn not installed (MNI152 template)")
    _need("KmeansTest_T1UCharRaw.nii.gz", "KmeansTest_T1KmeansPrelimSegmentation.nii.gz")
    info = build_case("affine3d", tmp_path, quick=True)
    assert info["kind"] == "affine" and info["transform"] == "affine" and not info["prealigned"]
    assert info["moving_shape"] == [62, 128, 128] and info["moving_spacing"] == [2.0, 2.0, 3.0]
    case = load_case(tmp_path)
    fixed, moving = case["fixed"], case["moving"]
    assert fixed.spacing == (4.0, 4.0, 4.0) and not fixed.same_grid(moving)  # quick: the template at 4 mm
    for lab in (case["fixed_labels"], case["moving_labels"]):
        assert set(np.unique(lab.data)) == {0, 1, 2, 3}
    # the raw subject is far from the template: the identity overlaps little
    before = R.evaluate_before(case)
    assert set(before["dice"]) == {"1", "2", "3"} and before["mean_dice"] < 0.3


def _affine_case():
    """A synthetic affine-kind case: label blobs on a fixed grid, the moving image/labels on another grid related by a
    known affine ``aff`` (fixed → moving)."""
    fixed = cr.Image(np.zeros((40, 44, 36), np.float32), (2.0, 2.0, 2.0), (-40.0, -44.0, -36.0))
    aff = cr.Affine(np.array([[1.1, 0.05, 0.0], [-0.04, 0.95, 0.02], [0.0, 0.03, 1.05]]), (6.0, -4.0, 3.0))
    moving = cr.Image(np.zeros((30, 50, 40), np.float32), (3.0, 2.0, 2.5), (-50.0, -60.0, -50.0))
    p = moving.grid_points()
    r = np.linalg.norm(p / np.array([30.0, 34.0, 26.0]), axis=-1)
    lab = np.where(r < 0.4, 3, np.where(r < 0.7, 2, np.where(r < 1.0, 1, 0))).astype(np.uint8)
    mlab = moving.like(lab)
    flab = cr.resample(mlab, aff, reference=fixed, interpolation="label")
    return {"info": {"name": "toy", "kind": "affine"}, "fixed": cr.resample(mlab.astype(np.float32), aff,
                                                                             reference=fixed),
            "moving": mlab.astype(np.float32), "fixed_labels": flab, "moving_labels": mlab,
            "mask": flab.like((flab.data > 0).astype(np.uint8))}, aff


def test_affine_kind_evaluation(tmp_path):
    """The affine kind: Dice/HD95/NCC of the moving labels through the tool's map (saved as the worker saves it), no
    Jacobian statistics, higher Dice is better in the pairwise table."""
    from benchmarks import run as R
    from classreg.evaluate import dense_displacement

    case, aff = _affine_case()
    u, _ = dense_displacement(aff, case["fixed"])
    cr.DisplacementField.from_array_frame(u, case["fixed"]).save(tmp_path / "f.nii.gz")
    good = R.evaluate_run(case, {"field": str(tmp_path / "f.nii.gz")})
    assert good["mean_dice"] > 0.97 and good["ncc"] > 0.97 and good["mean_hd95_mm"] <= 2.0
    assert "percent_det_nonpositive" not in good
    before = R.evaluate_before(case)
    assert before["mean_dice"] < good["mean_dice"] - 0.1
    assert R.QUALITY["affine"] == ("mean_dice", "mean Dice", True)
    rows = [dict(case="toy", kind="affine", tool="classreg_affine", seconds=1.0, **good),
            dict(case="toy", kind="affine", tool="ants_affine", seconds=4.0, **before)]
    (ratio,) = R.ratios(rows)
    assert ratio["time_ratio"] == 0.25 and ratio["quality_diff"] == pytest.approx(good["mean_dice"]
                                                                                  - before["mean_dice"])
    text = R.render_markdown({"rows": [dict(r, label=R.TOOLS[r["tool"]].label, runs=1) for r in rows],
                              "cases": {"toy": {"kind": "affine", "description": "toy", "provenance": "test",
                                                "before": before}},
                              "machine": {"cpu_count": 2}, "threads": 2, "repeat": 1, "versions": {},
                              "command": "test", "date": "now", "ratios": [ratio]}, None)
    assert "| ANTs Affine | " in text and "% outside moving" in text


def test_parametric_tools_are_wired_to_the_cases():
    """Every case kind has a classreg tool and a peer; the parametric tools fit the issue's model per case."""
    from benchmarks import cases as C
    from benchmarks import run as R

    kinds = {k for k, _ in C.CASES.values()}
    assert {"rigid", "affine"} <= kinds and C.CASES["sim2d"][0] == "rigid" and C.CASES["affine3d"][0] == "affine"
    for kind in kinds:
        handled = [t for t in T.TOOLS.values() if t.handles(kind)]
        assert any(t.classreg for t in handled) and any(not t.classreg for t in handled), kind
    for t in T.TOOLS.values():
        assert set(t.kinds) <= kinds, t.name
        assert set(t.excludes) <= set(C.CASES), t.name
    assert T.TOOLS["classreg_affine"].kinds == ("rigid", "affine")
    assert T.TOOLS["sitk_mi"].handles("affine") and T.TOOLS["ants_affine"].kinds == ("affine",)
    assert T.TOOLS["elastix_affine"].kinds == ("affine",) and T.TOOLS["classreg_bspline"].kinds == ("deformable",)
    assert "sim2d" in T.TOOLS["classreg_rigid"].excludes
    assert "sitk_mi" in R.QUICK_PEERS

    def case(name):
        kind, _ = C.CASES[name]
        model = {"sim2d": "similarity", "affine3d": "affine"}.get(name, "rigid")
        return {"info": {"name": name, "kind": kind, "transform": model, "ndim": 3 if name == "affine3d" else 2,
                         "centre_init": "moments" if name == "affine3d" else "geometry"}}

    settings = {n: T.classreg_affine_settings(case(n)) for n in ("mm2d", "sim2d", "mm2d_rot60", "affine3d")}
    assert {n: (s["transform"], s["init"]) for n, s in settings.items()} == {
        "mm2d": ("rigid", "geometry"), "sim2d": ("similarity", "geometry"), "mm2d_rot60": ("rigid", "global"),
        "affine3d": ("affine", "moments")}
    assert all(s["metric"] == "mi" and s["seed"] == 0 for s in settings.values())
    assert settings["mm2d"]["samples"] == 2048 and settings["affine3d"]["samples"] == 4096
    # the peers fit the same model from the same kind of start
    assert T.elastix_parameters("similarity", 2)["Transform"] == "SimilarityTransform"
    a = T.elastix_parameters("affine", 3, init="moments")
    assert a["Transform"] == "AffineTransform" and a["AutomaticTransformInitializationMethod"] == "CenterOfGravity"
    assert T.elastix_parameters("euler", 2)["AutomaticTransformInitializationMethod"] == "GeometricalCenter"
    with pytest.raises(ValueError, match="unknown elastix"):
        T.elastix_parameters("bogus", 2)
    assert [type(T.sitk_transform(m, 2)).__name__ for m in ("rigid", "similarity", "affine")] == [
        "Euler2DTransform", "Similarity2DTransform", "AffineTransform"]
    assert T.ANTS_MODEL[T.case_model(case("sim2d"))] == "Similarity"
    # classreg B-spline: elastix's B-spline settings
    for ndim, grid in ((2, 8.0), (3, 10.0)):
        b = T.bspline_settings(ndim)
        assert b == {"grid_spacing": grid, "metric": "mi", "init": "identity", "shrink_factors": (4, 2, 1),
                     "iterations": 500, "bins": 32, "bending_weight": 0.0, "seed": 0}
    # the classreg settings are the solvers' keywords
    for fn, kw in ((getattr(cr, "register_affine", None), settings["affine3d"]), (getattr(cr, "register_bspline", None), T.bspline_settings(2))):
        if fn is not None:
            assert set(kw) <= set(inspect.signature(fn).parameters), fn


def test_missing_classreg_solver_is_skipped_with_a_note(tmp_path, monkeypatch):
    """A classreg tool whose solver is not in the installed classreg is listed as not run, never a failure."""
    from benchmarks import run as R

    fake = dataclasses.replace(R.TOOLS["classreg_affine"], name="nosolver", classreg_api=("register_no_such",))
    monkeypatch.setitem(R.TOOLS, "nosolver", fake)
    ok, why = fake.available()
    assert not ok and "register_no_such" in why
    payload = R.run([], ["nosolver"], repeat=1, quick=True, out_dir=tmp_path, log=lambda s: None)
    assert any("register_no_such" in s for s in payload["skipped"]) and payload["rows"] == []


def test_sitk_similarity_row_on_sim2d(tmp_path):
    """End to end on the (quick, 2 mm) sim2d case: SimpleITK's Mattes-MI similarity recovers the seeded map."""
    from benchmarks import run as R

    _need("BrainT1SliceBorder20.png", "BrainProtonDensitySliceBorder20.png")
    payload = R.run(["sim2d"], ["sitk_mi", "classreg_rigid"], repeat=1, quick=True, out_dir=tmp_path,
                    log=lambda s: None)
    rows = {r["tool"]: r for r in payload["rows"]}
    assert rows["sitk_mi"]["params"]["transform"] == "similarity"
    assert rows["sitk_mi"]["tre_mm"] < 0.5 < payload["cases"]["sim2d"]["before"]["tre_mm"]
    assert "not run" in rows["classreg_rigid"]["note"]


def test_a_stopped_run_keeps_its_finished_rows(tmp_path, monkeypatch):
    """Each finished row is written at once (``<stamp>.partial.json``): a run stopped at a time limit (a device
    machine's, say) keeps what it measured; a finished run leaves only its final JSON."""
    from benchmarks import run as R

    _need("BrainT1SliceBorder20.png", "BrainProtonDensitySliceBorder20.png")
    aggregate, calls = R._aggregate, []

    def stop_at_the_second_row(*args):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return aggregate(*args)

    monkeypatch.setattr(R, "_aggregate", stop_at_the_second_row)
    with pytest.raises(KeyboardInterrupt):
        R.run(["sim2d"], ["sitk_mi", "sitk_mi_sampled"], repeat=1, quick=True, out_dir=tmp_path, log=lambda s: None)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.endswith(".partial.json"), files
    rows = json.loads(files[0].read_text())["rows"]
    assert [r["tool"] for r in rows] == ["sitk_mi"] and rows[0]["tre_mm"] < 0.5
    monkeypatch.setattr(R, "_aggregate", aggregate)
    payload = R.run(["sim2d"], ["sitk_mi"], repeat=1, quick=True, out_dir=tmp_path / "done", log=lambda s: None)
    assert [p.name for p in (tmp_path / "done").glob("*.json")] == [f"{payload['date']}.json"]


def test_failed_run_note_is_the_exception_line():
    from benchmarks.run import _error_line

    tb = ["Traceback (most recent call last):", "numba.core.errors.TypingError: Failed in nopython mode pipeline",
          "", "\x1b[0m\x1b[1mDuring: Pass nopython_type_inference\x1b[0m"]
    assert _error_line(tb) == "numba.core.errors.TypingError: Failed in nopython mode pipeline"
    assert _error_line(["timed out after 5 s"]) == "timed out after 5 s" and _error_line([]) == "?"


def test_dominance_and_tradeoff_figure(tmp_path):
    """The accuracy-against-smoothness summary: a default is dominated only by a peer better on both axes (Dice
    higher and SDlogJ lower; EPE lower where known), listed with both margins, the min det J floor and (where the
    deformation is known) the EPE against ANTs SyN's are checked, sweep points are not judged, and the figure draws
    every case."""
    from benchmarks import run as R

    sweep = next(t for t in T.TOOLS if t.startswith("classreg_demons_ssd@"))

    def row(case, tool, **kw):
        return {"case": case, "kind": "deformable", "tool": tool, "label": T.TOOLS[tool].label, "seconds": 1.0, **kw}

    rows = [row("a", "classreg_demons", mean_dice=0.80, sdlogj=0.10, min_det=0.20),
            row("a", sweep, mean_dice=0.70, sdlogj=0.05, min_det=0.30),
            row("a", "ants_syn", mean_dice=0.82, sdlogj=0.05, min_det=0.40),      # dominates
            row("a", "dipy_syn_cc", mean_dice=0.85, sdlogj=0.20, min_det=0.10),   # more accurate, rougher: no
            row("b", "classreg_demons", mean_dice=0.9, epe_mm=0.5, sdlogj=0.1, min_det=0.01),
            row("b", "ants_syn", mean_dice=0.95, epe_mm=0.6, sdlogj=0.05, min_det=0.3),  # EPE decides: no
            row("b", "classreg_lddmm", epe_mm=0.7, sdlogj=0.15, min_det=0.3),
            row("b", "dipy_syn_cc", epe_mm=0.4, sdlogj=0.12, min_det=0.3)]  # dominates lddmm, not demons
    d = {(r["case"], r["tool"]): r for r in R.dominance(rows)}
    assert set(d) == {("a", "classreg_demons"), ("b", "classreg_demons"), ("b", "classreg_lddmm")}
    assert d["a", "classreg_demons"]["dominated_by"] == T.TOOLS["ants_syn"].label + " (Dice +0.02, SDlogJ −0.05)"
    assert d["a", "classreg_demons"]["floor_ok"] is True and d["a", "classreg_demons"]["epe_ok"] is None
    assert d["b", "classreg_demons"]["dominated_by"] == "none" and d["b", "classreg_demons"]["floor_ok"] is False
    assert d["b", "classreg_demons"]["quality"].startswith("EPE") and d["b", "classreg_demons"]["epe_ok"] is True
    assert d["b", "classreg_lddmm"]["dominated_by"] == (T.TOOLS["ants_syn"].label + " (EPE −0.1, SDlogJ −0.1), "
                                                       + T.TOOLS["dipy_syn_cc"].label + " (EPE −0.3, SDlogJ −0.03)")
    assert d["b", "classreg_lddmm"]["epe_ok"] is False
    if importlib.util.find_spec("matplotlib") is not None:
        assert R.render_tradeoff({"rows": rows}, tmp_path / "t.png") and (tmp_path / "t.png").stat().st_size > 0
    # --judge: stored results, a later file's row replacing the earlier one; sweep points judged too
    (tmp_path / "1.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "2.json").write_text(json.dumps({"rows": [row("a", "ants_syn", mean_dice=0.78, sdlogj=0.05)]}))
    lines = []
    j = {(r["case"], r["tool"]): r for r in R.judge([tmp_path / "1.json", tmp_path / "2.json"], log=lines.append)}
    assert j["a", "classreg_demons"]["ok"] and j["a", "classreg_demons"]["dominated_by"] == "none"  # replaced
    assert j["a", sweep]["ok"] and not j["b", "classreg_demons"]["ok"] and not j["b", "classreg_lddmm"]["ok"]
    assert f"| {T.TOOLS['classreg_demons'].label} | 1 of 2 | b | none |" in lines[-1]
    assert j["a", sweep]["below_all_peers"] and not j["a", "classreg_demons"]["below_all_peers"]


def test_heldout_slices_keep_every_part_on_one_grid(tmp_path):
    """benchmarks.heldout cuts each part of a pre-aligned 3-D case at one index of one array axis: the 2-D images are
    those planes, with the other two axes' spacings (x, y order); a case that is not pre-aligned is refused."""
    from benchmarks.cases import load_case
    from benchmarks.heldout import PARTS, slice_case

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    vols = {k: rng.random((6, 7, 8)).astype(np.float32) if k in ("fixed", "moving")
            else rng.integers(0, 4, (6, 7, 8)).astype(np.uint8) for k in PARTS}
    for k, v in vols.items():
        cr.save(cr.Image(v, spacing=(1.0, 2.0, 3.0)), src / f"{k}.nii.gz")  # (x, y, z): array axes (z, y, x)
    info = {"name": "toy", "kind": "deformable", "prealigned": True}
    (src / "case.json").write_text(json.dumps(info))
    wd = slice_case(src, 1, 0.45, tmp_path)  # index round(0.45 · 7) = 3 of array axis 1 (y)
    case = load_case(wd)
    assert case["info"]["name"] == "toy_a1_3" and case["info"]["ndim"] == 2
    for k in PARTS:
        np.testing.assert_array_equal(case[k].numpy(), vols[k][:, 3, :])
        assert case[k].spacing == (1.0, 3.0)  # x kept, z kept
    (src / "case.json").write_text(json.dumps(dict(info, prealigned=False)))
    with pytest.raises(ValueError, match="pre-aligned"):
        slice_case(src, 0, 0.5, tmp_path)


def test_heldout_page_is_rendered_from_the_stored_run():
    """benchmarks.heldout's generated page: the command, date, machine and commit of the stored run, then the tables
    it is given."""
    from benchmarks.heldout import render_page

    payload = {"command": "python -m benchmarks.heldout --docs x.md", "date": "2026-12-05T000000Z", "threads": 2,
               "commit": "abc1234", "machine": {"cpu_model": "Some CPU", "cpu_count": 2}}
    page = render_page(payload, "| verdicts |", "| rows |")
    assert page.startswith("# Benchmarks — held-out cases built from inter3d")
    assert "*Generated by `python -m benchmarks.heldout --docs x.md` on 2026-12-05T000000Z" in page
    assert "Some CPU, 2 CPUs; 2 threads" in page and "commit abc1234" in page
    assert page.index("| verdicts |") < page.index("## Every tool") < page.index("| rows |")


def test_heldout_warped_case_has_its_known_deformation(tmp_path):
    """benchmarks.heldout's known-deformation case: the source case's moving image as the fixed one, its warp through
    synth_deformation(seed) as the moving one (moving = fixed∘ψ, labels warped alike), the truth ψ⁻¹; seeds give
    different fields. Needs the MNI152 grid (nilearn) for the field; a small subject image on it suffices."""
    from benchmarks.cases import load_case, synth_deformation
    from benchmarks.heldout import warped_case
    from classreg.data import mni152

    try:
        grid = mni152("t1", resolution=2.0)
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    subject = grid.like(np.asarray(grid.numpy(), np.float32))
    labels = grid.like((np.asarray(grid.numpy()) > 0).astype(np.uint8) * rng.integers(1, 4, grid.shape, np.uint8))
    cr.save(subject, src / "moving.nii.gz")
    cr.save(labels, src / "moving_labels.nii.gz")
    (src / "case.json").write_text(json.dumps({"name": "toy", "kind": "deformable", "prealigned": True}))
    case = load_case(warped_case(src, 1, tmp_path))
    assert case["info"]["name"] == "toy_warp1" and case["info"]["has_truth"]
    psi = synth_deformation(subject, seed=1)
    np.testing.assert_allclose(case["moving"].numpy(), cr.resample(subject, psi, reference=subject).numpy(),
                               atol=1e-3)
    np.testing.assert_array_equal(case["mask"].numpy() > 0, np.asarray(labels.numpy()) > 0)
    u_true = np.asarray(case["truth"].displacement)
    assert 5.0 < np.abs(u_true).max() < 9.0  # ψ⁻¹ of a field whose largest component is 8 mm
    assert not np.allclose(psi.displacement, synth_deformation(subject, seed=2).displacement)
