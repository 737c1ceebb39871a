"""kernels.demons: the ESM demons force, fast paths against the numpy reference (and the reference against eq. 8)."""
import numpy as np
import pytest
from conftest import backend_params

from classreg.kernels import demons as kd

# float32, relative to the largest value: the "cuda" path computes float32 data in float32 (position, denominator,
# step: a few roundings of 6e-8 relative each), the CPU loop in float64 before rounding the update to float32
TOL = {np.float32: 1e-5, np.float64: 1e-10}
SHAPES = [(7, 9), (33, 20), (5, 6, 7), (20, 17, 31)]


def _simulated() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def _case(shape, dtype, rng, masked):
    nd = len(shape)
    F = rng.random(shape).astype(dtype)
    M = rng.random(shape).astype(dtype)
    gF = (rng.random(shape + (nd,)) - 0.5).astype(dtype)
    gM = (rng.random(shape + (nd,)) - 0.5).astype(dtype)
    disp = ((rng.random(shape + (nd,)) - 0.5) * 8.0).astype(dtype)  # some samples fall outside the grid
    kw = dict(mask=rng.random(shape) > 0.3, moving_valid=rng.random(shape) > 0.2) if masked else {}
    return (F, M, gF, gM, disp), kw


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_esm_force_matches_reference(backend, dtype, masked, shape, rng):
    if backend == "cuda" and shape == SHAPES[-1] and (dtype, masked) != (np.float32, True) and _simulated():
        pytest.skip("the simulator runs every thread in Python: the multi-block 3-D shape once (float32, masked)")
    args, kw = _case(shape, dtype, rng, masked)
    before = [a.copy() for a in args]
    h = tuple(rng.uniform(0.5, 2.0, len(shape)))
    u_ref, e_ref, n_ref, m_ref = kd.esm_force(*args, spacing=h, max_step=1.5, backend="numpy", **kw)
    u, e, n, m = kd.esm_force(*args, spacing=h, max_step=1.5, backend=backend, **kw)
    assert u.shape == shape + (len(shape),) and u.dtype == dtype
    scale = float(np.abs(u_ref).max())
    assert float(np.abs(np.asarray(u, np.float64) - u_ref).max()) <= TOL[dtype] * scale
    assert n == n_ref
    assert abs(e - e_ref) <= TOL[dtype] * e_ref
    assert abs(m - m_ref) <= TOL[dtype] * m_ref
    for a, b in zip(args, before):  # inputs untouched
        np.testing.assert_array_equal(a, b)


def test_reference_is_vercauteren_eq8(rng):
    """u = 2 d g / (|g|² + d²/N) where valid, 0 elsewhere; |u| ≤ max_step; energy and count over the valid
    voxels."""
    shape = (6, 8, 5)
    (F, M, gF, gM, disp), kw = _case(shape, np.float64, rng, True)
    disp[0, 0, 0] = (-5.0, 0.0, 0.0)  # sample half a voxel or more outside: no force there
    u, e, n, m = kd.esm_force(F, M, gF, gM, disp, spacing=(1.0, 2.0, 0.5), max_step=0.7, backend="numpy", **kw)
    idx = np.indices(shape)
    inside = np.all([(idx[k] + disp[..., k] / (1.0, 2.0, 0.5)[k] >= -0.5)
                     & (idx[k] + disp[..., k] / (1.0, 2.0, 0.5)[k] < shape[k] - 0.5) for k in range(3)], axis=0)
    valid = inside & kw["mask"] & kw["moving_valid"]
    assert not valid[0, 0, 0]
    d = F - M
    g = gF + gM
    expect = 2 * d[..., None] * g / (np.sum(g * g, -1) + d * d / 0.49)[..., None]
    expect[~valid | (np.abs(d) < 1e-3)] = 0.0
    np.testing.assert_allclose(u, expect, rtol=1e-12, atol=0)
    assert n == valid.sum() and np.isclose(e, np.sum(d[valid] ** 2), rtol=1e-12)
    assert m <= 0.7 and np.isclose(m, np.sqrt(np.sum(u * u, -1)).max(), rtol=1e-12)
