"""The fused numba.cuda passes of the parametric Mattes-MI evaluation (kernels/mattes_cuda.py) compile to PTX
without a GPU, with the argument types the device evaluations launch them with.

Their values are checked against the array-module evaluation under the simulator
(tests/test_device_residency.py::test_fused_device_mi_matches_the_array_module_path); the simulator runs Python,
not PTX, so this test is what catches code that numba's CUDA target cannot compile (types, tuples indexed in loops,
local arrays, atomics). The evaluations run on the stand-in device with ``_backend.launch`` replaced by a recorder
that compiles instead of launching (nothing is computed). Needs numba's CUDA target with NVVM, not a GPU; skipped
without it and under the simulator.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

numba = pytest.importorskip("numba")

CC = (8, 0)


@pytest.fixture(scope="module")
def compile_ptx():
    from classreg.kernels import _backend

    if _backend.cuda_simulator():
        pytest.skip("the CUDA simulator compiles no PTX")
    try:
        from numba import cuda
        from numba.cuda import dispatcher
    except Exception as exc:  # pragma: no cover - depends on the installation
        pytest.skip(f"numba's CUDA target does not import: {exc}")

    def compile(pyfunc, sig):
        # device functions are compiled for the current device's compute capability: there is none, so CC 8.0
        saved = dispatcher.get_current_device
        dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)
        try:
            return cuda.compile_ptx(pyfunc, sig, device=False, cc=CC)[0]
        finally:
            dispatcher.get_current_device = saved

    def probe(a, x):
        a[0] = x * 2.0

    try:
        compile(probe, "void(float64[::1], float64)")
    except Exception as exc:  # pragma: no cover - depends on the installation
        pytest.skip(f"cannot compile PTX (NVVM missing?): {type(exc).__name__}: {exc}")
    return compile


@pytest.mark.parametrize("ndim", [2, 3])
def test_fused_mi_kernels_compile_to_ptx(monkeypatch, compile_ptx, ndim):
    from classreg.kernels import _backend
    from classreg.kernels import mattes_cuda as mc
    from device_standin import installed
    from scipy import ndimage

    import classreg as cr
    from classreg.solvers.parametric.bspline import BSplineModel
    from classreg.solvers.parametric.engine import LevelObjective
    from classreg.solvers.parametric.models import AffineModel
    from classreg.solvers.parametric.sampling import Sampler

    rng = np.random.default_rng(0)
    shape = (10, 11, 9)[:ndim]
    fixed = cr.Image(ndimage.gaussian_filter(rng.random(shape), 1.0).astype(np.float32), 1.0)
    moving = cr.Image(ndimage.gaussian_filter(rng.random(shape), 1.0).astype(np.float32), 1.0)
    bspline = BSplineModel.over(fixed, None, 4.0, bending_weight=0.0, bound=0.4)
    bspline.set_prior(np.zeros(shape + (ndim,)), fixed.inverse_affine)
    affine = AffineModel("rigid", ndim, (np.asarray(shape) - 1.0) / 2.0)
    mc.cuda_kernels.cache_clear()  # fresh dispatchers: nothing compiled here for CC 8.0 stays in the cache
    ptx = {}

    def record(kernel, n, *args, threads=256):
        host = [a._a if type(a).__module__ == "cupy" else a for a in args]  # the stand-in's numpy memory
        sig = numba.types.void(*(numba.typeof(a) for a in host))
        ptx.setdefault(kernel.py_func.__name__, {})[sig] = compile_ptx(kernel.py_func, sig)

    monkeypatch.setattr(_backend, "launch", record)
    with installed(monkeypatch):
        for model, mask, gradient in ((bspline, True, "exact"), (bspline, False, "smoothed"), (affine, False, "exact")):
            obj = LevelObjective(fixed, moving, None, np.ones(shape, bool) if mask else None, model=model, pre=None,
                                 metric="mi", sampler=Sampler("random_coordinate", 16, shape),
                                 rng=np.random.default_rng(1), device="cuda", image_gradient=gradient)
            dev = obj._device
            dev.fused = True
            y, f = obj._device_samples(0, None)
            with np.errstate(all="ignore"):  # nothing ran: the accumulators hold zeros
                if model is bspline:
                    dev.use_prior(bspline.prior[0], bspline.prior_map)
                    dev.evaluate(y, f, obj.resident(np.zeros(bspline.size)).reshape(bspline.shape))
                else:
                    dev.evaluate(y, f, np.eye(ndim), np.zeros(ndim), affine.center)
    mc.cuda_kernels.cache_clear()
    assert set(ptx) == {"_pass1_cuda", "_pass2_cuda"}
    for name, by_sig in ptx.items():
        for code in by_sig.values():
            # float64 atomics (histogram, sums, gradient) and float64 arithmetic, as documented
            assert "atom.global.add.f64" in code, name
            assert ".f64" in code and "fma.rn.f64" in code, name
