"""Property tests (hypothesis): transform round trips and resampling against SimpleITK over generated geometries.

Each property is checked on a bounded number of generated examples (``max_examples``) with hypothesis' derandomised
search, so the run is reproducible and short.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import classreg as cr

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

angles = st.floats(-np.pi, np.pi, allow_nan=False, allow_subnormal=False)  # ITK's SVD rejects subnormal cosines
lengths = st.floats(-50.0, 50.0, allow_nan=False)
scales = st.floats(0.5, 2.0, allow_nan=False)


@st.composite
def affines(draw, ndim):
    """A well-conditioned affine: rotation × anisotropic scale × small shear, any translation and centre."""
    rot = cr.Affine.euler([draw(angles) for _ in range(1 if ndim == 2 else 3)]).matrix
    shear = np.eye(ndim)
    shear[0, 1] = draw(st.floats(-0.3, 0.3))
    matrix = rot @ np.diag([draw(scales) for _ in range(ndim)]) @ shear
    return cr.Affine(matrix, [draw(lengths) for _ in range(ndim)], [draw(lengths) for _ in range(ndim)])


def _points(ndim, seed):
    return np.random.default_rng(seed).uniform(-80, 80, (16, ndim))


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_inverse_and_composition_round_trip(ndim):
    @SETTINGS
    @given(affines(ndim), affines(ndim), st.integers(0, 2 ** 16))
    def check(a, b, seed):
        p = _points(ndim, seed)
        np.testing.assert_allclose(a.inverse().map_points(a.map_points(p)), p, atol=1e-8)
        # a.compose(b) = a ∘ b; a Chain applies its first transform first: Chain([b, a]) = a ∘ b too
        ab = a.compose(b)
        np.testing.assert_allclose(ab.map_points(p), a.map_points(b.map_points(p)), atol=1e-8)
        np.testing.assert_allclose(cr.Chain([b, a]).map_points(p), ab.map_points(p), atol=1e-8)
        np.testing.assert_allclose(ab.inverse().map_points(ab.map_points(p)), p, atol=1e-7)

    check()


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_file_and_simpleitk_round_trip(ndim, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfm")

    @SETTINGS
    @given(affines(ndim), st.sampled_from([".tfm", ".txt", ".mat", ".h5"]), st.integers(0, 2 ** 16))
    def check(a, ext, seed):
        p = _points(ndim, seed)
        path = folder / f"a{ext}"
        a.save(path)
        back = cr.load_transform(path)
        np.testing.assert_allclose(back.map_points(p), a.map_points(p), atol=1e-6)
        itk = sitk.ReadTransform(str(path))
        np.testing.assert_allclose([itk.TransformPoint(tuple(q)) for q in p], a.map_points(p), atol=1e-6)

    check()


@st.composite
def grids(draw, ndim):
    """A small image on an oblique, anisotropic grid."""
    shape = tuple(draw(st.integers(5, 12)) for _ in range(ndim))
    spacing = tuple(draw(st.floats(0.5, 3.0)) for _ in range(ndim))
    direction = cr.Affine.euler([draw(angles) for _ in range(1 if ndim == 2 else 3)]).matrix
    origin = tuple(draw(st.floats(-20, 20)) for _ in range(ndim))
    data = np.random.default_rng(draw(st.integers(0, 2 ** 16))).random(shape)
    return cr.Image(data, spacing, origin, tuple(direction.ravel()))


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_resample_matches_simpleitk(ndim):
    """classreg.resample and SimpleITK's Resample agree on any oblique grids and affine transform (linear
    interpolation, default value outside): the geometry conventions are ITK's."""
    @SETTINGS
    @given(grids(ndim), grids(ndim), affines(ndim))
    def check(moving, reference, t):
        # the reference grid centred on the moving image and a transform close to the identity about that centre,
        # so that most samples fall inside the moving image (the comparison is not one of zeros)
        centre = moving.index_to_world([(np.array(moving.shape) - 1) / 2.0])[0]
        fit = min(np.multiply(moving.size, moving.spacing)) / max(np.multiply(reference.size, reference.spacing))
        reference = cr.Image(reference.data, tuple(np.multiply(reference.spacing, fit)), reference.origin,
                             reference.direction)  # its extent now fits inside the moving image's
        shift = centre - reference.index_to_world([(np.array(reference.shape) - 1) / 2.0])[0]
        reference = cr.Image(reference.data, reference.spacing, np.asarray(reference.origin) + shift,
                             reference.direction)
        t = cr.Affine(np.eye(ndim) + 0.05 * (t.matrix - np.eye(ndim)), 0.02 * np.asarray(t.translation), centre)
        ours = cr.resample(moving, t, reference=reference, interpolation="linear").numpy()
        ref = sitk.GetArrayFromImage(sitk.Resample(moving.to_sitk(), reference.to_sitk(), t.to_sitk(),
                                                   sitk.sitkLinear, 0.0, sitk.sitkFloat64))
        assert np.count_nonzero(ref) >= 0.2 * ref.size
        np.testing.assert_allclose(ours, ref, atol=1e-5)

    check()
