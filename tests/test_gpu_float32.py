"""Accuracy of the float32 numba.cuda kernel variants: float32 data are computed in float32 on the GPU (coordinates,
weights, sums; docs/gpu.md "Precision on the GPU"), checked against the float64 numpy reference at task-level
tolerances.
tests/test_ptx.py checks that the compiled float32 kernels contain no float64 instruction (the simulator, running the
kernels on NumPy scalars, cannot: NumPy's promotion is not numba's)."""
import numpy as np
import pytest
from classreg.kernels.adjoint import sample_linear, splat_linear
from classreg.kernels.warp import interpolate, warp

pytestmark = pytest.mark.cudasim

# Task-level tolerance on a sampling position: 1e-4 voxel, two orders below the sub-voxel accuracy registration
# reaches (0.01-0.1 voxel). A float32 coordinate below index 128 is rounded to 2**-17 = 7.6e-6 voxel per operation
# (affine row, offset, displacement, interpolated value: a handful of roundings), so the bound holds with margin.
VOXEL_TOL = 1e-4


def _ramp(n):
    """An image whose value is its index along axis 0: linear interpolation returns the coordinate itself."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)


def test_warp_float32_coordinates_within_task_tolerance():
    rng = np.random.default_rng(5)
    n = 128
    img = _ramp(n)
    disp = rng.uniform(-3.0, 3.0, size=(n, 3, 2)).astype(np.float32)
    kw = dict(matrix=[[0.97, 0.02], [0.01, 1.0]], offset=[1.3, 0.0], disp_matrix=[[1.1, 0.0], [0.0, 0.9]],
              order=1, mode="border")
    out = warp(img, disp, backend="cuda", **kw)
    ref = warp(img.astype(np.float64), disp.astype(np.float64), backend="numpy", **kw)
    assert out.dtype == np.float32
    assert 40.0 < float(ref.max()) and np.abs(out - ref).max() <= VOXEL_TOL  # positions up to index 127


def test_interpolate_float32_points_within_task_tolerance():
    rng = np.random.default_rng(6)
    n = 128
    pts = np.stack([rng.uniform(0.0, n - 1.0, 300), rng.uniform(0.0, 2.0, 300)], -1)  # float64 points
    out = interpolate(_ramp(n), pts, order=1, mode="border", backend="cuda")
    assert out.dtype == np.float32
    assert np.abs(out - pts[:, 0]).max() <= VOXEL_TOL  # the float32 variant rounds the points to float32 first


@pytest.mark.parametrize("nd", [2, 3])
def test_sample_and_splat_float32_match_float64_reference(nd):
    rng = np.random.default_rng(nd)
    shape = (7, 9, 6)[:nd]
    img = rng.normal(size=shape + (2,))
    pts = rng.uniform(-1.5, np.asarray(shape) + 0.5, size=(40, nd))
    w = rng.normal(size=(40, 2))
    v, g = sample_linear(img.astype(np.float32), pts.astype(np.float32), gradient=True, backend="cuda")
    v0, g0 = sample_linear(img, pts.astype(np.float32).astype(np.float64), gradient=True, backend="numpy")
    s = splat_linear(w.astype(np.float32), pts.astype(np.float32), shape, backend="cuda")
    s0 = splat_linear(w, pts.astype(np.float32).astype(np.float64), shape, backend="numpy")
    assert v.dtype == g.dtype == s.dtype == np.float32
    # float32 weights and sums of O(1) values: a few float32 roundings (6e-8 relative each) per output
    for a, b in ((v, v0), (g, g0), (s, s0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
