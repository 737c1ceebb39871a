import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import oblique_image, smooth_field
from test_transforms import random_affine

import classreg as cr


def _result(rng, transform, fixed, moving):
    warped = cr.resample(moving, transform, reference=fixed)
    return cr.Result(
        transform=transform, inverse=transform.inverse(), warped=warped,
        history=[{"level": 0, "iteration": i, "metric": 1.0 / (i + 1), "piece": 1} for i in range(4)],
        converged=True, stop_reason="relative change below tol", params={"seed": 0, "sigma": np.float32(1.5),
                                                                        "shrink": (4, 2, 1)},
        metrics={"ssd": np.float64(0.25), "nan": float("nan")}, timings={"total": 1.5}, reference=fixed)


def test_result_is_frozen_and_checks_types(rng):
    img = oblique_image((6, 7, 8), rng)
    r = _result(rng, cr.Affine.identity(3), img, img)
    with pytest.raises(AttributeError):
        r.converged = False
    with pytest.raises(TypeError, match="transform"):
        cr.Result(transform=np.eye(4))


def test_apply_and_apply_points_directions(rng):
    fixed = oblique_image((10, 11, 12), rng)
    moving = oblique_image((10, 11, 12), rng)
    t = random_affine(3, rng)
    r = _result(rng, t, fixed, moving)
    np.testing.assert_allclose(r.apply(moving).data, cr.resample(moving, t, reference=fixed).data)
    x_fixed = rng.uniform(-20, 20, size=(5, 3))
    x_moving = t.map_points(x_fixed)  # the transform maps fixed -> moving
    np.testing.assert_allclose(r.apply_points(x_moving), x_fixed, atol=1e-9)  # apply_points: moving -> fixed
    labels = moving.like((moving.data * 3).astype(np.uint8))
    assert r.apply(labels, interpolation="label").dtype == np.uint8


@pytest.mark.parametrize("kind", ["affine", "field", "chain"])
def test_save_and_load_round_trip(tmp_path, rng, kind):
    fixed = oblique_image((8, 9, 10), rng, dtype=np.float32)
    moving = oblique_image((8, 9, 10), rng, dtype=np.float32)
    field = cr.DisplacementField.from_array(smooth_field(fixed.shape, rng, amplitude=1.5), fixed)
    t = {"affine": random_affine(3, rng), "field": field, "chain": cr.Chain([field, random_affine(3, rng)])}[kind]
    r = _result(rng, t, fixed, moving)
    r.save(tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"params.json", "history.csv", "result.json", "warped.nii.gz"} <= set(names)
    assert not [n for n in names if n.startswith(".")]
    ext = {"affine": ".tfm", "field": ".nii.gz", "chain": ".h5"}[kind]
    assert f"transform{ext}" in names and f"inverse{ext}" in names
    sitk.ReadTransform(str(tmp_path / "out" / f"transform{ext}")) if ext != ".nii.gz" else None
    back = cr.load_result(tmp_path / "out")
    pts = fixed.index_to_world(rng.uniform(1, 7, size=(20, 3)))
    np.testing.assert_allclose(back.transform.map_points(pts), t.map_points(pts), atol=1e-6)
    np.testing.assert_allclose(back.apply(moving).data, r.apply(moving).data, atol=1e-5)
    assert back.converged and back.stop_reason == r.stop_reason
    assert back.params == {"seed": 0, "sigma": 1.5, "shrink": [4, 2, 1]}
    assert back.metrics["ssd"] == 0.25 and back.metrics["nan"] == "nan"
    assert back.history[2] == {"level": 0, "iteration": 2, "metric": 1 / 3, "piece": 1}
    with open(tmp_path / "out" / "history.csv") as fh:
        assert next(csv.reader(fh)) == ["level", "iteration", "metric", "piece"]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["reference"]["shape"] == [8, 9, 10]


def test_load_result_errors(tmp_path):
    with pytest.raises(ValueError, match="result.json missing"):
        cr.load_result(tmp_path)
    (tmp_path / "result.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="unknown result format"):
        cr.load_result(tmp_path)


@pytest.mark.parametrize("kind", ["field", "chain"])
def test_save_writes_fields_float32_compressed(tmp_path, rng, kind):
    """A registration run in float32 (params['dtype']) saves its dense fields as float32, compressed, even where
    they are held as float64 in memory; the folder reads back through load_result and SimpleITK."""
    if kind == "chain":
        pytest.importorskip("h5py")  # the .h5 compression; without h5py it stays SimpleITK's float64 file
    shape = (24, 26, 28)
    fixed = oblique_image(shape, rng, dtype=np.float32)
    field = cr.DisplacementField.from_array(smooth_field(shape, rng, amplitude=2.0), fixed)  # float64 values
    t = field if kind == "field" else cr.Chain([field, random_affine(3, rng)])
    r = cr.Result(transform=t, inverse=t.inverse(), params={"dtype": "float32", "seed": 0}, reference=fixed)
    r.save(tmp_path / "out", warped=False)
    ext = ".nii.gz" if kind == "field" else ".h5"
    raw64 = field.displacement.size * 8
    for name in ("transform", "inverse"):
        path = tmp_path / "out" / f"{name}{ext}"
        assert path.stat().st_size < 0.5 * raw64  # float32 (4 bytes) and compressed, not 8 bytes per component
        if kind == "field":
            assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkVectorFloat32
    back = cr.load_result(tmp_path / "out")
    pts = fixed.index_to_world(rng.uniform(1, 22, size=(40, 3)))
    np.testing.assert_allclose(back.transform.map_points(pts), t.map_points(pts), rtol=0, atol=1e-5)
    sx = (sitk.ReadTransform(str(tmp_path / "out" / "transform.h5")) if kind == "chain" else
          sitk.DisplacementFieldTransform(sitk.ReadImage(str(tmp_path / "out" / "transform.nii.gz"),
                                                         sitk.sitkVectorFloat64)))
    mapped = np.array([sx.TransformPoint(tuple(map(float, p))) for p in pts])
    np.testing.assert_allclose(mapped, t.map_points(pts), rtol=0, atol=1e-5)
