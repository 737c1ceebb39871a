import warnings

import numpy as np
import pytest

import classreg as cr
import classreg.image as image_mod
from phantoms import oblique_image


@pytest.mark.parametrize("shape", [(9, 11), (7, 9, 11)])
def test_index_to_world_matches_simpleitk(rng, shape):
    img = oblique_image(shape, rng)
    s = img.to_sitk()
    idx = rng.uniform(-3, 12, size=(50, len(shape)))  # continuous, some outside the grid
    ours = img.index_to_world(idx)
    ref = np.array([s.TransformContinuousIndexToPhysicalPoint(tuple(i[::-1])) for i in idx])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)
    back = img.world_to_index(ours)
    np.testing.assert_allclose(back, idx, rtol=0, atol=1e-9)
    ref_idx = np.array([s.TransformPhysicalPointToContinuousIndex(tuple(p))[::-1] for p in ref])
    np.testing.assert_allclose(back, ref_idx, atol=1e-9)


@pytest.mark.parametrize("shape", [(7, 10), (5, 6, 9)])
def test_center_is_the_midpoint_of_the_first_and_last_voxel_centres(rng, shape):
    """Image.center: ITK's geometric centre (the voxel-centre box's middle), also for an oblique grid."""
    img = oblique_image(shape, rng)
    s = img.to_sitk()
    last = tuple(int(n - 1) for n in shape[::-1])  # SimpleITK index order (x, y[, z])
    ends = np.array([s.TransformIndexToPhysicalPoint((0,) * len(shape)), s.TransformIndexToPhysicalPoint(last)])
    np.testing.assert_allclose(img.center, ends.mean(axis=0), rtol=0, atol=1e-9)


def test_geometry_is_reported_like_simpleitk(rng):
    img = oblique_image((5, 6, 7), rng)
    s = img.to_sitk()
    assert img.spacing == s.GetSpacing()
    assert img.origin == s.GetOrigin()
    assert img.direction == s.GetDirection()
    assert img.size == s.GetSize()
    back = cr.Image.from_sitk(s)
    np.testing.assert_array_equal(back.data, img.data)
    assert back.spacing == img.spacing and back.direction == img.direction


def test_affine_reverses_axis_order_once():
    data = np.zeros((4, 5, 6))
    img = cr.Image(data, spacing=(1.0, 2.0, 3.0), origin=(10.0, 20.0, 30.0))
    # array index (z=1, y=0, x=0) is one step along physical z (3 mm)
    np.testing.assert_allclose(img.index_to_world([[1, 0, 0]]), [[10, 20, 33]])
    np.testing.assert_allclose(img.index_to_world([[0, 0, 1]]), [[11, 20, 30]])
    assert img.shape == (4, 5, 6) and img.size == (6, 5, 4)
    assert img.spacing_array_order == (3.0, 2.0, 1.0)


def test_vector_image_and_grid_points(rng):
    img = oblique_image((4, 5, 6), rng, vector=True)
    assert img.is_vector and img.ncomponents == 3 and img.shape == (4, 5, 6)
    s = img.to_sitk()
    assert s.GetNumberOfComponentsPerPixel() == 3 and s.GetSize() == (6, 5, 4)
    g = img.grid_points()
    assert g.shape == (4, 5, 6, 3)
    np.testing.assert_allclose(g[1, 2, 3], s.TransformIndexToPhysicalPoint((3, 2, 1)), atol=1e-9)


def test_from_array_warns_once_without_spacing(monkeypatch):
    monkeypatch.setattr(image_mod, "_WARNED_NO_SPACING", False)
    with pytest.warns(UserWarning, match="spacing"):
        cr.Image.from_array(np.zeros((3, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cr.Image.from_array(np.zeros((3, 3)))
        cr.Image.from_array(np.zeros((3, 3)), spacing=0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spacing=(1.0, 0.0)), "spacing"),
        (dict(spacing=(1.0, -2.0)), "spacing"),
        (dict(spacing=(1.0, np.nan)), "spacing"),
        (dict(spacing=(1.0, 1.0, 1.0, 1.0)), "spacing"),
        (dict(spacing=1.0, direction=[[1.0, 0.5], [0.0, 1.0]]), "direction"),
        (dict(spacing=1.0, direction=[1.0, 0.0, 0.0]), "direction"),
        (dict(spacing=1.0, origin=(0.0, np.inf)), "origin"),
    ],
)
def test_bad_geometry_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cr.Image(np.zeros((4, 4)), **kwargs)


def test_bad_data_names_the_argument():
    a = np.zeros((4, 4))
    a[1, 1] = np.nan
    with pytest.raises(ValueError, match="data contains 1 NaN"):
        cr.Image(a, 1.0)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        cr.Image(np.zeros(5), 1.0)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        cr.Image(np.zeros((2, 2, 2, 2)), 1.0)
    with pytest.raises(TypeError, match="numeric"):
        cr.Image(np.array([["a", "b"], ["c", "d"]]), 1.0)
    with pytest.raises(ValueError, match="empty"):
        cr.Image(np.zeros((0, 4)), 1.0)


def test_image_never_copies_or_modifies_data():
    a = np.arange(12.0).reshape(3, 4)
    img = cr.Image(a, (1.0, 1.0))
    assert img.data is a
    np.testing.assert_array_equal(a, np.arange(12.0).reshape(3, 4))


def test_as_mask_checks(rng):
    img = cr.Image(np.zeros((4, 5)), 1.0)
    with pytest.raises(ValueError, match="fixed_mask is empty"):
        image_mod.as_mask(np.zeros((4, 5)), img, "fixed_mask")
    with pytest.raises(ValueError, match="fixed_mask has shape"):
        image_mod.as_mask(np.ones((5, 4)), img, "fixed_mask")
    m = image_mod.as_mask(img.like(np.ones((4, 5))), img, "m")
    assert m.dtype == bool and m.all()
