import numpy as np
import pytest
import SimpleITK as sitk

import classreg as cr
from phantoms import oblique_image, smooth_field
from test_transforms import random_affine

SITK_INTERP = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


def sitk_resample(moving, reference, transform, interpolation, default=0.0):
    out = sitk.Resample(moving.to_sitk(), reference.to_sitk(), transform.to_sitk(), SITK_INTERP[interpolation],
                        default, sitk.sitkFloat64)
    return sitk.GetArrayFromImage(out)


def assert_close_rel(ours, ref, rel=1e-4):
    scale = max(np.abs(ref).max(), 1e-12)
    assert np.abs(ours - ref).max() <= rel * scale, np.abs(ours - ref).max() / scale


def _pair(rng, ndim):
    ms = (23, 27) if ndim == 2 else (15, 17, 19)
    rs = (21, 25) if ndim == 2 else (13, 16, 18)
    moving = oblique_image(ms, rng)
    reference = oblique_image(rs, rng)
    # put the reference where the moving image is, so that most samples fall inside
    centre_m = moving.index_to_world([np.array(ms) / 2.0])[0]
    centre_r = reference.index_to_world([np.array(rs) / 2.0])[0]
    reference = cr.Image(reference.data, reference.spacing, np.array(reference.origin) + centre_m - centre_r,
                         reference.direction)
    return moving, reference


def _small_affine(rng, ndim, center):
    t = random_affine(ndim, rng)
    return cr.Affine(np.eye(ndim) + 0.2 * (t.matrix - np.eye(ndim)), rng.uniform(-3, 3, ndim), center)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_affine_resample_matches_simpleitk(rng, ndim, interpolation):
    moving, reference = _pair(rng, ndim)
    t = _small_affine(rng, ndim, moving.index_to_world([np.array(moving.shape) / 2])[0])
    ours = cr.resample(moving, t, reference=reference, interpolation=interpolation, default_value=-1.0)
    ref = sitk_resample(moving, reference, t, interpolation, default=-1.0)
    assert ours.same_grid(reference)
    assert (ref == -1.0).any() and (ref != -1.0).sum() > ref.size // 3  # both inside and outside samples occur
    assert_close_rel(ours.data, ref)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
@pytest.mark.parametrize("field_grid", ["reference", "other"])
def test_field_and_chain_resample_match_simpleitk(rng, ndim, interpolation, field_grid):
    moving, reference = _pair(rng, ndim)
    grid = reference if field_grid == "reference" else oblique_image(reference.shape, rng)
    if field_grid == "other":  # overlapping, differently oriented field grid
        grid = cr.Image(grid.data, grid.spacing, reference.origin, grid.direction)
    field = cr.DisplacementField.from_array(smooth_field(grid.shape, rng, amplitude=3.0), grid)
    ours = cr.resample(moving, field, reference=reference, interpolation=interpolation)
    assert_close_rel(ours.data, sitk_resample(moving, reference, field, interpolation))
    chain = cr.Chain([field, _small_affine(rng, ndim, moving.origin)])
    ours = cr.resample(moving, chain, reference=reference, interpolation=interpolation)
    assert_close_rel(ours.data, sitk_resample(moving, reference, chain, interpolation))
    chain2 = cr.Chain([_small_affine(rng, ndim, moving.origin), field])
    ours = cr.resample(moving, chain2, reference=reference, interpolation=interpolation)
    assert_close_rel(ours.data, sitk_resample(moving, reference, chain2, interpolation))


def test_identity_resample_and_dtypes(rng):
    img = oblique_image((9, 10, 11), rng, dtype=np.float32)
    out = cr.resample(img)
    np.testing.assert_allclose(out.data, img.data, atol=1e-6)
    assert out.dtype == np.float32
    lab = img.like((img.data * 4).astype(np.int16))
    out = cr.resample(lab, interpolation="nearest")
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out.data, lab.data)
    assert cr.resample(img.astype(np.float64), interpolation="bspline").dtype == np.float64


def test_label_interpolation_keeps_label_values(rng):
    moving, reference = _pair(rng, 3)
    labels = moving.like((moving.data * 5).astype(np.uint8) * 10)  # values 0, 10, ..., 40 (50 rare)
    t = _small_affine(rng, 3, moving.index_to_world([np.array(moving.shape) / 2])[0])
    out = cr.resample(labels, t, reference=reference, interpolation="label", default_value=0)
    assert out.dtype == np.uint8
    assert set(np.unique(out.data)) <= set(np.unique(labels.data)) | {0}
    near = sitk_resample(labels, reference, t, "nearest")
    assert (out.data == near).mean() > 0.9  # agrees with nearest except along label borders


def test_bspline_close_to_linear_on_smooth_data(rng):
    img = oblique_image((20, 22, 24), rng)
    t = _small_affine(rng, 3, img.index_to_world([[10, 11, 12]])[0])
    lin = cr.resample(img, t, interpolation="linear").data
    bsp = cr.resample(img, t, interpolation="bspline").data
    inner = (slice(4, -4),) * 3
    assert np.abs(lin[inner] - bsp[inner]).max() < 0.05


def test_resample_argument_errors(rng):
    img2 = oblique_image((5, 6), rng)
    img3 = oblique_image((5, 6, 7), rng)
    with pytest.raises(ValueError, match="dimension mismatch"):
        cr.resample(img3, reference=img2)
    with pytest.raises(ValueError, match="dimension mismatch"):
        cr.resample(img3, cr.Affine.identity(2))
    with pytest.raises(ValueError, match="interpolation"):
        cr.resample(img3, interpolation="cubic")
    with pytest.raises(TypeError, match="moving"):
        cr.resample(img3.data)
    with pytest.raises(TypeError, match="transform"):
        cr.resample(img3, np.eye(3))


def test_resample_does_not_modify_inputs(rng):
    img = oblique_image((6, 7, 8), rng)
    before = img.data.copy()
    cr.resample(img, cr.Affine.from_translation([1.0, 2.0, 0.5]), interpolation="bspline")
    np.testing.assert_array_equal(img.data, before)
