import numpy as np
import pytest

import classreg as cr
from classreg import evaluate
from classreg.evaluate import digital_jacobians
from phantoms import oblique_image, smooth_field
from test_transforms import random_affine


def test_dice_known_values_and_missing_labels():
    a = np.zeros((10, 10), int)
    b = np.zeros((10, 10), int)
    a[0:4, 0:5] = 1  # 20 voxels
    b[2:6, 0:5] = 1  # 20 voxels, 10 shared
    a[8, 8] = 2  # label 2 only in a
    b[9, 9] = 3
    d = evaluate.dice(a, b)
    assert d[1] == pytest.approx(0.5)
    assert np.isnan(d[2]) and np.isnan(d[3]) and 0 not in d
    assert evaluate.dice(a, a, labels=[1]) == {1: 1.0}
    with pytest.raises(ValueError, match="same shape"):
        evaluate.dice(a, b[:5])


def test_hd95_in_mm_with_anisotropic_spacing():
    a = np.zeros((30, 40), int)
    b = np.zeros((30, 40), int)
    a[10:20, 10:20] = 1
    b[10:20, 13:23] = 1  # shifted by 3 voxels along x
    assert evaluate.hd95(a, b)[1] == pytest.approx(3.0)
    img_a = cr.Image(a, spacing=(2.0, 0.5))  # x spacing 2 mm
    img_b = img_a.like(b)
    assert evaluate.hd95(img_a, img_b)[1] == pytest.approx(6.0)
    assert evaluate.hd95(a, a)[1] == 0.0


def test_tre_direction(rng):
    t = random_affine(3, rng)
    xf = rng.uniform(-30, 30, size=(6, 3))
    np.testing.assert_allclose(evaluate.tre(t, xf, t.map_points(xf)), 0.0, atol=1e-9)
    err = evaluate.tre(t, xf, t.map_points(xf) + [3.0, 4.0, 0.0])
    np.testing.assert_allclose(err, 5.0)


def test_jacobian_stats_of_affine_and_identity(rng):
    ref = oblique_image((12, 13, 14), rng)
    stats = evaluate.jacobian_stats(cr.Affine.similarity(1.2, [0.1, 0.2, 0.3]), reference=ref)
    assert stats["min_det"] == pytest.approx(1.2 ** 3) and stats["max_det"] == pytest.approx(1.2 ** 3)
    assert stats["percent_nonpositive"] == 0.0 and stats["ndv_percent"] == 0.0 and stats["num_non_digital"] == 0
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-9)
    assert stats["sdlogj_l2r"] == pytest.approx(0.0, abs=1e-9)
    ident = evaluate.jacobian_stats(cr.DisplacementField.identity(ref))
    assert ident["min_det"] == 1.0 and ident["ndv_percent"] == 0.0


def test_digital_jacobians_of_a_linear_map():
    a = np.array([[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.0]])
    grid = np.stack(np.meshgrid(*[np.arange(6.0)] * 3, indexing="ij"), axis=-1)
    u = grid @ a.T - grid
    dets = digital_jacobians(u)
    assert len(dets) == 10
    for j in dets[:8]:
        np.testing.assert_allclose(j[1:-1, 1:-1, 1:-1], np.linalg.det(a), rtol=1e-12)
    for j in dets[8:]:  # central tetrahedra of the two splittings have twice the unit volume
        np.testing.assert_allclose(j[1:-1, 1:-1, 1:-1], 2 * np.linalg.det(a), rtol=1e-12)
    assert len(digital_jacobians(u[:, :, 0, :2])) == 4


def test_ndv_zero_for_smooth_field_and_positive_for_planted_fold(rng):
    ref = oblique_image((16, 17, 18), rng)
    h = np.array(ref.spacing_array_order)
    u = smooth_field(ref.shape, rng, amplitude=1.0, sigma=4.0) * h
    smooth = evaluate.jacobian_stats(cr.DisplacementField.from_array_frame(u, ref))
    assert smooth["ndv_percent"] == 0.0 and smooth["percent_nonpositive"] == 0.0 and smooth["min_det"] > 0
    folded = u.copy()
    folded[8, 8, 8, 2] += 1.6 * h[2]  # one voxel jumps past its neighbour along x: a fold central differences miss
    stats = evaluate.jacobian_stats(cr.DisplacementField.from_array_frame(folded, ref))
    assert stats["ndv_percent"] > 0 and stats["num_non_digital"] > 0
    assert stats["percent_nonpositive"] == 0.0  # the classic central-difference count does not see it
    mask = np.zeros(ref.shape, bool)
    mask[:4] = True
    assert evaluate.jacobian_stats(cr.DisplacementField.from_array_frame(folded, ref), mask=mask)["ndv_percent"] == 0


def test_nda_2d_and_central_fold(rng):
    ref = cr.Image(np.zeros((20, 20)), (1.0, 1.0))
    grid = ref.grid_points()
    c = np.array([10.0, 10.0])
    r = np.linalg.norm(grid - c, axis=-1)
    u = np.zeros((20, 20, 2))
    u[..., 0] = -2.0 * (grid[..., 0] - c[0]) * np.exp(-(r / 3.0) ** 2)  # strong inward squeeze folds at the centre
    f = cr.DisplacementField.from_array(u, ref)
    stats = evaluate.jacobian_stats(f)
    assert stats["min_det"] < 0 and stats["percent_nonpositive"] > 0 and stats["nda_percent"] > 0


def test_inverse_consistency(rng):
    ref = oblique_image((6, 7, 8), rng)
    t = random_affine(3, rng)
    ic = evaluate.inverse_consistency(t, t.inverse(), reference=ref)
    assert ic["max_mm"] < 1e-9 and ic["mean_voxels"] < 1e-9
    bad = evaluate.inverse_consistency(t, cr.Affine.identity(3), reference=ref)
    assert bad["mean_mm"] > 1.0
    with pytest.raises(ValueError, match="reference"):
        evaluate.jacobian_stats(t)


def test_det_columns_is_numpy_det():
    # the element-wise cofactor expansion jacobian_stats uses instead of numpy.linalg.det on stacked matrices
    from classreg.evaluate import _det_columns

    rng = np.random.default_rng(4)
    for n in (2, 3):
        cols = [rng.normal(size=(6, 5, 4, n)) for _ in range(n)]
        np.testing.assert_allclose(_det_columns(cols), np.linalg.det(np.stack(cols, axis=-1)), rtol=1e-12, atol=1e-12)
