"""kernels/mattes_cuda.py's voxel-wise Mattes MI (``register_demons(metric="mi")`` on the GPU) against the host's
:class:`classreg.terms.MattesMI`: its numpy reference (``classreg.terms.measures.mattes_mi_samples``, backend "numpy")
and the numba kernel the CPU runs. Both paths compile the same per-sample bodies (``kernels.sampling._mi_window``,
``_mi_grad``), and both are tested against that one numpy reference.

The ``cudasim`` tests run the numba.cuda kernels in numba's CUDA simulator (tests/test_cudasim.py) or, on a machine
with a GPU, as real kernels on host arrays (numba copies them). The PTX of the kernels is checked in
tests/test_ptx.py, the whole registration on the device in tests/test_device_residency.py and tests/test_gpu.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from classreg.kernels.diff import gradient
from scipy import ndimage

from classreg.terms import MattesMI


def _pair(shape, dtype, seed=0):
    """A smooth fixed image and a warped moving image with another contrast (a nonlinear map of the fixed one plus
    noise), both with a zero background on one border: exact repeated values, as in masked or binary images."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.random(shape), 1.0)
    w = np.sin(6.0 * f) ** 2 + 0.1 * ndimage.gaussian_filter(rng.random(shape), 0.7)
    f[:2] = 0.0
    w[-2:] = 0.0
    return f.astype(dtype), w.astype(dtype)


def _host(monkeypatch, backend, F, W, gW, h, mask):
    """``MattesMI.descent`` on the host with the numpy reference or the numba kernel: ``(u, cost)``."""
    monkeypatch.setenv("CLASSREG_BACKEND", backend)
    out = MattesMI(bins=BINS).descent(F, W, gW, spacing=h, mask=mask)
    monkeypatch.delenv("CLASSREG_BACKEND")
    return out


BINS = 32


@pytest.mark.cudasim
@pytest.mark.parametrize("shape", [(14, 12), (7, 6, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_dense_mattes_mi_matches_the_host(monkeypatch, shape, dtype, masked):
    from classreg.kernels.mattes_cuda import dense_mattes_mi

    from classreg.terms.measures import _PDF_TINY, LIMIT_RANGE_RATIO

    F, W = _pair(shape, dtype)
    h = (1.0, 1.2, 0.9)[:len(shape)]
    gW = gradient(W, spacing=h, backend="numpy")
    mask = (np.random.default_rng(1).random(shape) > 0.3) if masked else None
    cost, u = dense_mattes_mi(F, W, bins=(BINS, BINS), limit_range_ratio=LIMIT_RANGE_RATIO, tiny=_PDF_TINY,
                              mask=mask, grad_warped=gW)
    assert u.dtype == dtype and u.shape == gW.shape
    if masked:
        assert np.all(u[~mask] == 0)
    # the histogram's float64 sums run in another order (per-block shared-memory atomics, then one atomic addition
    # per bin and block, against the host's sequential loop or bincount): ~1e-16 relative, carried through the log
    # table into ∂C/∂W (measured 0 to 7e-16). The host rounds ∂C/∂W to the images' type before multiplying by ∇W,
    # as the kernel does, so a float32 direction differs by at most one rounding of a float32 value: two ulps of
    # the largest entry bound that; float64 directions agree to 1e-12 of the largest entry
    tol = 2.0 ** -22 if dtype == np.float32 else 1e-12
    for backend in ("numpy", "numba"):
        u_ref, cost_ref = _host(monkeypatch, backend, F, W, gW, h, mask)
        assert abs(cost - cost_ref) <= 1e-12 * abs(cost_ref), (backend, cost, cost_ref)
        np.testing.assert_allclose(u, u_ref, rtol=0, atol=tol * np.abs(u_ref).max(), err_msg=backend)
        assert np.abs(u_ref).max() > 0
    # the cost alone (the energy a demons piece must lower), without the descent kernel
    value = dense_mattes_mi(F, W, bins=(BINS, BINS), limit_range_ratio=LIMIT_RANGE_RATIO, tiny=_PDF_TINY, mask=mask)
    assert value == cost


@pytest.mark.cudasim
def test_dense_mattes_mi_does_not_depend_on_the_summation_order():
    """The histogram is summed in fixed point: the voxels in another order (another order of the atomic additions,
    other blocks) give the same cost and direction bit for bit, so a demons run repeats itself on the GPU."""
    from classreg.kernels.mattes_cuda import dense_mattes_mi

    F, W = _pair((9, 8, 7), np.float32, seed=5)
    gW = gradient(W, spacing=1.0, backend="numpy")
    mask = np.random.default_rng(6).random(F.shape) > 0.2
    perm = np.random.default_rng(7).permutation(F.size)
    kw = dict(bins=(BINS, BINS), limit_range_ratio=0.01, tiny=1e-16)
    cost, u = dense_mattes_mi(F, W, mask=mask, grad_warped=gW, **kw)
    flat = [a.reshape(F.size, -1)[perm].reshape(F.shape + a.shape[3:]) for a in (F, W, mask, gW)]
    cost_p, u_p = dense_mattes_mi(*flat[:2], mask=flat[2], grad_warped=flat[3], **kw)
    assert cost_p == cost
    np.testing.assert_array_equal(u_p.reshape(F.size, 3), u.reshape(F.size, 3)[perm])


@pytest.mark.cudasim
def test_dense_mattes_mi_with_other_bins_the_smoothed_mi_and_an_empty_mask():
    from classreg.kernels.mattes_cuda import dense_mattes_mi

    from classreg.terms.measures import _PDF_TINY, mattes_mi_samples

    F, W = _pair((12, 13), np.float64, seed=3)
    mask = np.ones(F.shape, bool)
    mask[:, :3] = False
    kw = dict(bins=(24, 30), limit_range_ratio=0.05, tiny=_PDF_TINY)
    cost, u = dense_mattes_mi(F, W, mask=mask, grad_warped=np.ones(F.shape + (2,)), **kw)
    ref, d = mattes_mi_samples(F[mask], W[mask], bins=(24, 30), gradient=True, limit_range_ratio=0.05,
                               backend="numpy")
    assert abs(cost - ref) <= 1e-12 * abs(ref)
    np.testing.assert_allclose(-u[mask][:, 0], d, rtol=0, atol=1e-12 * np.abs(d).max())
    # the smoothed MI (eps > 0, register_lddmm's): another table, the same kernels
    cost, u = dense_mattes_mi(F, W, mask=mask, grad_warped=np.ones(F.shape + (2,)), **dict(kw, eps=1e-4))
    ref, d = mattes_mi_samples(F[mask], W[mask], bins=(24, 30), gradient=True, limit_range_ratio=0.05, eps=1e-4,
                               backend="numpy")
    assert abs(cost - ref) <= 1e-12 * abs(ref)
    np.testing.assert_allclose(-u[mask][:, 0], d, rtol=0, atol=1e-12 * np.abs(d).max())
    with pytest.raises(ValueError, match="no voxel counts"):
        dense_mattes_mi(F, W, mask=np.zeros(F.shape, bool), **kw)
    with pytest.raises(ValueError, match="at most 6144 bins"):
        dense_mattes_mi(F, W, **dict(kw, bins=(64, 128)))


def test_mattes_mi_on_the_device_refuses_what_it_does_not_cover(monkeypatch):
    from device_standin import installed

    F, W = _pair((8, 9), np.float32)
    with installed(monkeypatch) as cp:
        f, w = cp.asarray(F), cp.asarray(W)
        for params in (dict(fixed_limits=(0.0, 1.0)), dict(moving_limits=(0.0, 1.0))):
            with pytest.raises(ValueError, match="bins, limit_range_ratio and eps only"):
                MattesMI(**params).value(f, w)
        with pytest.raises(ValueError, match="eps must be"):
            MattesMI(eps=-1.0).value(f, w)
