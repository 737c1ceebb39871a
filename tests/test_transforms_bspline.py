"""classreg.transforms.BSplineTransform: the physical convention of ITK's BSplineTransform (checked point by point
against SimpleITK), file round trips, dense fields, elastix's grid layout and argument errors."""
import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import oblique_direction, oblique_image

import classreg as cr
from classreg.transforms import BSplineTransform, from_sitk_transform


def _sitk_points(tx, pts):
    return np.array([tx.TransformPoint(tuple(map(float, p))) for p in pts])


def random_bspline(rng, ndim, *, size=None, amplitude=3.0, flip=True):
    size = size or (7, 6, 5)[:ndim]
    return BSplineTransform(
        size,
        rng.uniform(-30, 30, ndim),
        rng.uniform(2.0, 9.0, ndim),  # anisotropic
        oblique_direction(ndim, rng, flip=flip),
        rng.normal(scale=amplitude, size=(*reversed(size), ndim)),
    )


def grid_to_world(t, q):
    """Physical points of continuous grid indices q (array order)."""
    lin = (t.grid_direction @ np.diag(t.grid_spacing))[:, ::-1]
    return q @ lin.T + np.asarray(t.grid_origin)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("flip", [True, False])
def test_map_points_matches_simpleitk(rng, ndim, flip):
    t = random_bspline(rng, ndim, flip=flip)
    tx = t.to_sitk()
    g = np.asarray(t.grid_shape)
    inside = grid_to_world(t, rng.uniform(1.0, g - 2.0, size=(300, ndim)))
    np.testing.assert_allclose(t.map_points(inside), _sitk_points(tx, inside), atol=1e-9)
    assert np.abs(t.map_points(inside) - inside).max() > 0.5
    # around and beyond the valid region: ITK returns the point unchanged there, and so does classreg
    near = grid_to_world(t, rng.uniform(-1.0, g, size=(300, ndim)))
    np.testing.assert_allclose(t.map_points(near), _sitk_points(tx, near), atol=1e-9)
    far = grid_to_world(t, np.array([[-0.5] * ndim, list(g - 1.5)]))
    np.testing.assert_array_equal(t.map_points(far), far)


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_fixed_parameters_and_parameter_order(rng, ndim):
    t = random_bspline(rng, ndim)
    tx = t.to_sitk()
    n = ndim
    fixed = np.asarray(tx.GetFixedParameters())
    np.testing.assert_array_equal(fixed[:n], t.grid_size)
    np.testing.assert_allclose(fixed[n:2 * n], t.grid_origin, rtol=1e-15)
    np.testing.assert_allclose(fixed[2 * n:3 * n], t.grid_spacing, rtol=1e-15)
    np.testing.assert_allclose(fixed[3 * n:].reshape(n, n), t.grid_direction, rtol=1e-15)  # row-major
    np.testing.assert_allclose(tx.GetParameters(), t.parameters, rtol=1e-15)
    for k, img in enumerate(tx.GetCoefficientImages()):  # coefficient image k = component k, array (z, y, x)
        np.testing.assert_allclose(sitk.GetArrayFromImage(img), t.coefficients[..., k], rtol=1e-15)
        assert img.GetSize() == t.grid_size
        np.testing.assert_allclose(img.GetOrigin(), t.grid_origin, rtol=1e-12)
        np.testing.assert_allclose(img.GetSpacing(), t.grid_spacing, rtol=1e-12)
        np.testing.assert_allclose(np.reshape(img.GetDirection(), (n, n)), t.grid_direction, atol=1e-12)
    back = from_sitk_transform(tx)
    assert isinstance(back, BSplineTransform)
    np.testing.assert_array_equal(back.coefficients, t.coefficients)


@pytest.mark.parametrize("ext", [".tfm", ".h5"])
def test_save_load_round_trip(tmp_path, rng, ext):
    t = random_bspline(rng, 3)
    path = t.save(tmp_path / f"b{ext}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"b{ext}"]  # atomic: no temporary left behind
    back = cr.load_transform(path)
    assert isinstance(back, cr.BSplineTransform)
    assert back.grid_size == t.grid_size
    pts = grid_to_world(t, rng.uniform(0.5, np.asarray(t.grid_shape) - 1.5, size=(50, 3)))
    np.testing.assert_allclose(back.map_points(pts), t.map_points(pts), atol=1e-9)
    np.testing.assert_allclose(_sitk_points(sitk.ReadTransform(str(path)), pts), t.map_points(pts), atol=1e-9)


def test_chain_with_bspline_round_trip(tmp_path, rng):
    t = random_bspline(rng, 2)
    aff = cr.Affine(np.array([[1.1, 0.1], [-0.05, 0.95]]), (2.0, -3.0))
    chain = cr.Chain([t, aff])
    back = cr.load_transform(chain.save(tmp_path / "c.h5"))
    assert isinstance(back, cr.Chain) and isinstance(back.transforms[0], BSplineTransform)
    pts = grid_to_world(t, rng.uniform(1, np.asarray(t.grid_shape) - 2, size=(40, 2)))
    np.testing.assert_allclose(back.map_points(pts), chain.map_points(pts), atol=1e-9)
    np.testing.assert_allclose(_sitk_points(chain.to_sitk(), pts), chain.map_points(pts), atol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_on_matches_map_points(rng, ndim):
    t = random_bspline(rng, ndim)
    oblique = oblique_image((14, 12, 10)[:ndim], rng)
    g = np.asarray(t.grid_shape)
    centre = grid_to_world(t, (g - 1)[None] / 2.0)[0]
    oblique = cr.Image(oblique.data, oblique.spacing,
                       centre - oblique.direction_matrix @ (np.asarray(oblique.size) - 1) * oblique.spacing / 2,
                       oblique.direction)
    aligned = cr.Image(np.zeros((15, 13, 11)[:ndim]), (2.1, 1.7, 2.5)[:ndim],
                       grid_to_world(t, np.full((1, ndim), -0.3))[0], t.grid_direction)
    for ref in (oblique, aligned):  # non-separable and separable sampling
        field = t.displacement_on(ref)
        assert isinstance(field, cr.DisplacementField) and field.image.same_grid(ref)
        pts = ref.grid_points().reshape(-1, ndim)
        u = field.displacement.reshape(-1, ndim)
        np.testing.assert_allclose(pts + u, t.map_points(pts), atol=1e-9)
        assert np.any(u == 0) and np.any(u != 0)  # parts inside and outside the valid region


def test_inverse_needs_a_reference(rng):
    t = random_bspline(rng, 2, amplitude=0.8)
    with pytest.raises(ValueError, match="reference"):
        t.inverse()
    g = np.asarray(t.grid_shape)
    n = (g - 1)[::-1] * 6 + 1  # the whole control grid, 6 voxels per grid step (x, y order)
    ref = cr.Image(np.zeros(tuple((g - 1) * 6 + 1)), np.asarray(t.grid_spacing) / 6, t.grid_origin, t.grid_direction)
    assert ref.size == tuple(n)
    inv = t.inverse(ref)
    assert isinstance(inv, cr.DisplacementField) and inv.image.same_grid(ref)
    pts = grid_to_world(t, rng.uniform(2.0, g - 3.0, size=(30, 2)))
    np.testing.assert_allclose(inv.map_points(t.map_points(pts)), pts, atol=0.05)


def test_on_image_follows_elastix_grid_layout(rng):
    img = cr.Image(np.zeros((80, 100)), (1.0, 1.5))  # size (x, y) = (100, 80)
    t = cr.BSplineTransform.on_image(img, 16.0)
    # size = ceil(n s / g) + 3: x ceil(100/16) + 3 = 10, y ceil(120/16) + 3 = 11
    assert t.grid_size == (10, 11)
    # origin = image origin - ((size - 1) g - (n - 1) s) / 2
    np.testing.assert_allclose(t.grid_origin, (-(9 * 16 - 99) / 2, -(10 * 16 - 79 * 1.5) / 2))
    np.testing.assert_array_equal(t.coefficients, 0.0)
    img3 = oblique_image((9, 11, 13), rng)
    t3 = cr.BSplineTransform.on_image(img3, (7.0, 9.0, 11.0))
    np.testing.assert_allclose(t3.grid_direction, img3.direction_matrix)
    assert t3.grid_spacing == (7.0, 9.0, 11.0)
    n, s = np.asarray(img3.size), np.asarray(img3.spacing)
    np.testing.assert_array_equal(t3.grid_size, np.ceil(n * s / t3.grid_spacing).astype(int) + 3)
    # centred: the grid centre is the image centre (midpoint of the first and last voxel centres)
    img_centre = img3.index_to_world((np.asarray(img3.shape) - 1) / 2.0)[0]
    grid_centre = grid_to_world(t3, (np.asarray(t3.grid_shape) - 1)[None] / 2.0)[0]
    np.testing.assert_allclose(grid_centre, img_centre, atol=1e-9)
    # the whole image (± half a voxel) lies inside the valid region
    corners = img3.index_to_world(np.stack(np.meshgrid(*[[-0.5, k - 0.5] for k in img3.shape], indexing="ij"),
                                           -1).reshape(-1, 3))
    q = t3.grid_index(corners)
    assert np.all(q >= 1) and np.all(q <= np.asarray(t3.grid_shape) - 2)
    with pytest.raises(ValueError, match="order"):
        cr.BSplineTransform.on_image(img, 16.0, order=2)


def test_properties_and_repr(rng):
    t = random_bspline(rng, 3)
    assert t.ndim == 3 and t.grid_shape == tuple(reversed(t.grid_size))
    with pytest.raises(ValueError):
        t.coefficients[0, 0, 0, 0] = 1.0  # read-only
    t2 = t.with_coefficients(np.zeros_like(t.coefficients))
    pts = rng.uniform(-10, 10, size=(5, 3))
    np.testing.assert_array_equal(t2.map_points(pts), pts)
    assert "BSplineTransform(grid_size=(7, 6, 5)" in repr(t)
    assert np.array_equal(t.fixed_parameters, t.to_sitk().GetFixedParameters())


def test_argument_errors(tmp_path, rng):
    ok = {"grid_size": (5, 6), "grid_origin": (0, 0), "grid_spacing": (2, 3)}
    with pytest.raises(ValueError, match="grid_size"):
        BSplineTransform((3, 6), (0, 0), 1.0)
    with pytest.raises(ValueError, match="grid_size"):
        BSplineTransform((5,), (0,), 1.0)
    with pytest.raises(ValueError, match="grid_spacing"):
        BSplineTransform((5, 6), (0, 0), (1.0, 0.0))
    with pytest.raises(ValueError, match="grid_origin"):
        BSplineTransform((5, 6), (0, 0, 0), 1.0)
    with pytest.raises(ValueError, match="grid_direction"):
        BSplineTransform(**ok, grid_direction=[[1, 1], [0, 1]])
    with pytest.raises(ValueError, match=r"coefficients must have shape \(6, 5, 2\)"):
        BSplineTransform(**ok, coefficients=np.zeros((5, 6, 2)))
    bad = np.zeros((6, 5, 2))
    bad[1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        BSplineTransform(**ok, coefficients=bad)
    t = BSplineTransform(**ok)
    with pytest.raises(ValueError, match="points"):
        t.map_points(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\.tfm"):
        t.save(tmp_path / "b.nii.gz")
    with pytest.raises(ValueError, match="3-D"):
        t.displacement_on(cr.Image(np.zeros((4, 4, 4)), 1.0))
    with pytest.raises(ValueError, match="order 3"):
        from_sitk_transform(sitk.BSplineTransform(2, 2))
