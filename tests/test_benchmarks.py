"""The benchmark harness (benchmarks/run.py): conversion of peers' outputs to classreg transforms, skipping of missing
peers, the ``--quick`` smoke run, and the kernel benchmark (so the harnesses cannot rot)."""
from __future__ import annotations

import dataclasses
import importlib.util
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
    assert "## lung2d" in text and "| classreg demons (SSD) |" in text and "classreg vs each peer" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert docs.with_suffix(".png").stat().st_size > 1000


def test_kernel_targets_are_checked_against_the_rows():
    from benchmarks.kernels import target_lines

    rows = [dict(kernel="warp linear 3-D (disp)", size=128, speedup=4.9, x_copy_bound=6.5),
            dict(kernel="warp linear 3-D (disp)", size=192, speedup=5.1, x_copy_bound=4.3),
            dict(kernel="gaussian σ=2 vox", size=128, speedup=2.0)]
    lines = target_lines(rows)
    assert len(lines) == 5
    assert "map_coordinates" in lines[0] and lines[0].endswith("**not met**")  # 4.9 < 5
    assert lines[1].endswith("— met")
    assert lines[2].startswith("* Gaussian") and lines[2].endswith("— met")  # 2.0 ≥ 2
    assert "copy bound, 128³: 6.5×" in lines[3] and lines[3].endswith("**not met**")
    assert lines[4].endswith("— met")  # 4.3 ≤ 5


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
