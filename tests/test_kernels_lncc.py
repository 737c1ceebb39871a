"""kernels.lncc: LNCC value/gradient and the demons LNCC force (reference = classreg.terms.lncc)."""
import numpy as np
import pytest
from conftest import backend_params

import classreg as cr
from classreg.terms import measures as mt
from classreg.kernels import lncc as kl

TOL = {np.float32: 1e-5, np.float64: 1e-10}

CASES = [
    # shape, radius (voxels per axis), masked
    ((13, 17, 11), (2, 1, 3), False),
    ((13, 17, 11), (2, 1, 3), True),
    ((21, 19), (3, 1), True),
    ((22, 15), (2, 4), False),
    ((70, 9, 13), (2, 1, 3), True),  # several slabs along axis 0
    ((67, 41), (4, 2), True),
    ((40, 6, 5), (1, 7, 2), True),  # window wider than axis 1
    ((9, 33, 8), (12, 1, 1), False),  # window wider than axis 0
]


def backend_dtype_params():
    """backend × dtype; numba at float64 runs with ``-m slow``: compiling the LNCC sweep takes 60-80 s per dtype on a
    cold numba cache (CI), and float32, the default working precision, runs the same code."""
    out = []
    for b in backend_params():
        for dt in (np.float32, np.float64):
            slow = b.values[0] == "numba" and dt is np.float64
            out.append(pytest.param(b.values[0], dt, id=f"{dt.__name__}-{b.id}",
                                    marks=[*b.marks, *([pytest.mark.slow] if slow else [])]))
    return out


def _pair(shape, dtype, rng, masked):
    F = rng.standard_normal(shape)
    M = 0.7 * F + 0.5 * rng.standard_normal(shape) + 3.0  # offset: the centring must not matter
    mask = rng.random(shape) > 0.3 if masked else None
    return F.astype(dtype), M.astype(dtype), mask


def _rel(out, ref):
    scale = max(float(np.abs(ref).max()), 1e-300)
    return float(np.abs(np.asarray(out, dtype=np.float64) - ref).max()) / scale


@pytest.mark.parametrize("backend, dtype", backend_dtype_params())
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradient_matches_metrics_lncc(backend, dtype, case, rng):
    shape, r, masked = CASES[case]
    F, M, mask = _pair(shape, dtype, rng, masked)
    F0, M0 = F.copy(), M.copy()
    v_ref, g_ref = mt.lncc(F, M, radius=np.array(r, float), spacing=1.0, mask=mask, gradient=True)
    v, g = kl.lncc_gradient(F, M, radius=r, mask=mask, backend=backend)
    assert g.shape == shape and g.dtype == dtype and g_ref.dtype == dtype
    assert abs(v - v_ref) <= 1e-10 * abs(v_ref)
    assert _rel(g, g_ref.astype(np.float64)) <= TOL[dtype]
    if backend == "numpy":  # the reference is terms.lncc line by line
        assert v == v_ref
        np.testing.assert_array_equal(g, g_ref)
    np.testing.assert_array_equal(F, F0)
    np.testing.assert_array_equal(M, M0)


def test_radius_conversion_and_radius_zero(rng):
    assert kl.window_radius(4.0, (2.0, 1.0, 3.0), 3) == mt._window_radius(4.0, (2.0, 1.0, 3.0), 3) == (2, 4, 1)
    assert kl.window_radius((0.1, 5.0), 2.0, 2) == (1, 2)
    F, M, mask = _pair((31, 12, 9), np.float64, rng, True)
    v_ref, g_ref = kl.lncc_gradient(F, M, radius=(0, 2, 1), mask=mask, backend="numpy")
    v, g = kl.lncc_gradient(F, M, radius=(0, 2, 1), mask=mask, backend="numba")
    assert v == pytest.approx(v_ref, rel=1e-12)
    assert _rel(g, g_ref) <= 1e-10


def _old_demons_force(target, warped, g_warped, disp, own_mask, other_valid, h, radius_mm):
    """The demons LNCC force before the kernel: classreg.terms.lncc on the valid voxels."""
    n = target.ndim
    idx = np.indices(target.shape, dtype=np.float64)
    valid = np.ones(target.shape, bool)
    for k in range(n):
        x = idx[k] + disp[..., k] / h[k]
        valid &= (x >= -0.5) & (x < target.shape[k] - 0.5)
    if own_mask is not None:
        valid &= own_mask
    if other_valid is not None:
        valid &= other_valid
    value, dcost = mt.lncc(target, warped, radius=radius_mm, spacing=h, mask=valid, gradient=True)
    u = -(dcost[..., None] * g_warped)
    u[~valid] = 0.0
    norm = float(np.sqrt(np.max(np.sum(u.astype(np.float64) ** 2, axis=-1))))
    return u, value, int(valid.sum()), norm


@pytest.mark.parametrize("backend, dtype", backend_dtype_params())
@pytest.mark.parametrize("shape", [(37, 14, 11), (45, 26)])
def test_force_matches_the_metrics_based_force(backend, dtype, shape, rng):
    n = len(shape)
    h = (2.0, 1.5, 1.0)[:n]
    F, M, mask = _pair(shape, dtype, rng, True)
    mvalid = rng.random(shape) > 0.1
    gM = rng.standard_normal(shape + (n,)).astype(dtype)
    disp = (3.0 * rng.standard_normal(shape + (n,))).astype(dtype)  # pushes border voxels outside the grid
    r = kl.window_radius(3.0, h, n)
    u_ref, v_ref, cnt_ref, nrm_ref = _old_demons_force(F, M, gM, disp, mask, mvalid, h, 3.0)
    u, v, cnt, nrm = kl.lncc_force(F, M, gM, disp, radius=r, spacing=h, mask=mask, moving_valid=mvalid,
                                   backend=backend)
    assert u.shape == shape + (n,) and u.dtype == dtype
    assert cnt == cnt_ref and 0 < cnt < F.size
    assert abs(v - v_ref) <= 1e-10 * abs(v_ref)
    assert _rel(u, u_ref.astype(np.float64)) <= TOL[dtype]
    assert nrm == pytest.approx(nrm_ref, rel=TOL[dtype])


def test_force_without_displacement_or_masks(rng):
    F, M, _ = _pair((33, 10, 12), np.float64, rng, False)
    gM = rng.standard_normal(F.shape + (3,))
    v_ref, g_ref = mt.lncc(F, M, radius=2.0, gradient=True)
    u, v, cnt, nrm = kl.lncc_force(F, M, gM, radius=2, backend="numba")
    assert cnt == F.size and v == pytest.approx(v_ref, rel=1e-12)
    assert _rel(u, -g_ref[..., None] * gM) <= 1e-10
    assert nrm == pytest.approx(float(np.sqrt(np.max(np.sum(u**2, axis=-1)))), rel=1e-14)


def test_integer_input_and_empty_mask(rng):
    F = rng.integers(0, 200, (34, 9, 10)).astype(np.uint8)
    M = rng.integers(0, 200, (34, 9, 10)).astype(np.int16)
    v_ref, g_ref = mt.lncc(F, M, radius=1.0, gradient=True)
    v, g = kl.lncc_gradient(F, M, radius=1, backend="numba")
    assert g.dtype == np.float64 and v == pytest.approx(v_ref, rel=1e-10) and _rel(g, g_ref) <= 1e-10
    empty = np.zeros(F.shape, bool)
    for be in ("numpy", "numba"):
        v, g = kl.lncc_gradient(F.astype(np.float32), M.astype(np.float32), radius=1, mask=empty, backend=be)
        assert v == 0.0 and g.dtype == np.float32 and not g.any()
        u, v, cnt, nrm = kl.lncc_force(F, M, np.ones(F.shape + (3,)), radius=1, mask=empty, backend=be)
        assert (v, cnt, nrm) == (0.0, 0, 0.0) and not u.any()


def test_thread_count_bitwise(rng):
    numba = pytest.importorskip("numba")
    F, M, mask = _pair((70, 12, 9), np.float32, rng, True)
    gM = rng.standard_normal(F.shape + (3,)).astype(np.float32)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = kl.lncc_force(F, M, gM, radius=(2, 1, 2), mask=mask, backend="numba")
    finally:
        numba.set_num_threads(n)
    many = kl.lncc_force(F, M, gM, radius=(2, 1, 2), mask=mask, backend="numba")
    np.testing.assert_array_equal(one[0], many[0])
    assert one[1:] == many[1:]


def test_errors(rng):
    F, M, _ = _pair((8, 9, 10), np.float32, rng, False)
    with pytest.raises(ValueError, match="shape"):
        kl.lncc_gradient(F, M[:-1], radius=1)
    with pytest.raises(ValueError, match="radius"):
        kl.lncc_gradient(F, M, radius=(1, 2))
    with pytest.raises(ValueError, match="radius"):
        kl.lncc_gradient(F, M, radius=1.5)
    with pytest.raises(ValueError, match="radius"):
        kl.lncc_gradient(F, M, radius=-1)
    with pytest.raises(ValueError, match="eps"):
        kl.lncc_gradient(F, M, radius=1, eps=-1.0)
    with pytest.raises(ValueError, match="grad_warped"):
        kl.lncc_force(F, M, np.zeros(F.shape + (2,)), radius=1)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        kl.lncc_gradient(F[0, 0], M[0, 0], radius=1)
    with pytest.raises(TypeError, match="real"):
        kl.lncc_gradient(F.astype(complex), M, radius=1)


# ---------------------------------------------------------------------------------------------- demons
def _texture(shape, rng):
    from scipy import ndimage

    return sum(ndimage.gaussian_filter(rng.standard_normal(shape), s) * s for s in (1.0, 2.0)).astype(np.float32)


@pytest.mark.parametrize("shape, spacing", [((40, 44), (1.0, 1.2)), ((20, 22, 18), (2.0, 2.0, 2.5))])
def test_demons_lncc_unchanged_by_the_kernel(shape, spacing, rng, monkeypatch):
    """register_demons(metric="lncc") with the fused kernel equals the former terms.lncc-based force."""
    from scipy import ndimage

    from classreg import terms

    fixed = cr.Image(_texture(shape, rng), spacing)
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 4.0) for _ in shape], -1)
    u *= 2.0 / np.abs(u).max()
    moving = cr.resample(fixed, cr.DisplacementField.from_array_frame(u.astype(np.float32), fixed),
                         reference=fixed, interpolation="bspline")
    moving = moving.like(1.5 * moving.data + 10.0)  # LNCC is invariant to this, SSD is not
    mask = np.zeros(shape, bool)
    mask[(slice(2, -2),) * len(shape)] = True
    kw = dict(metric="lncc", max_pieces=2, fixed_mask=mask, update_sigma=1.0, iterations=(8, 4),
              shrink_factors=(2, 1))
    new = cr.register_demons(fixed, moving, **kw)

    def old_force(self, fixed, warped, grad_fixed, grad_warped, disp, *, spacing, max_step, mask=None,
                  moving_valid=None, backend=None):
        u, value, _, norm = _old_demons_force(fixed, warped, grad_warped, disp, mask, moving_valid, spacing,
                                              self.params["radius"])
        if norm > 0:
            u *= max_step / norm
        return u.astype(fixed.dtype, copy=False), float(value), min(norm, max_step) if norm else 0.0

    monkeypatch.setattr(terms.LNCC, "force", old_force)
    old = cr.register_demons(fixed, moving, **kw)
    assert new.metrics["pieces"] == old.metrics["pieces"]
    assert [h["metric"] for h in new.history] == pytest.approx([h["metric"] for h in old.history], rel=1e-6,
                                                               abs=1e-8)
    d_new, d_old = new.transform.displacement, old.transform.displacement
    assert np.abs(d_new - d_old).max() <= 1e-5 * np.abs(d_old).max()  # float32 round-off (seen: < 1e-6)
