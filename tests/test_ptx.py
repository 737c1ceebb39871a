"""The numba.cuda kernels compute float32 data in float32: their PTX, compiled without a GPU, has no float64.

Every numba.cuda kernel of classreg.kernels (warp, smooth, demons, diff, adjoint) is compiled to PTX for
compute capability 8.0 with the argument types the library launches it with: the public functions run with
``backend="cuda"`` on host arrays while ``_backend.launch`` is replaced by a recorder that compiles instead of
launching. For float32 data no PTX instruction may carry the ``.f64`` type (arithmetic, comparisons, selects,
conversions, loads, stores, parameters); for float64 data every kernel must contain float64 arithmetic, so the scan
can fail. The fused passes of the parametric Mattes-MI evaluation (``mattes_cuda``, float64 by design) are compiled
with the signatures the device evaluations launch them with (on the stand-in device of tests/device_standin.py).
Needs numba's CUDA target with NVVM (numba's own ``numba.cuda`` with a CUDA toolkit, or numba-cuda with
its NVVM wheels), not a GPU; skipped without them and under the simulator.
"""
from __future__ import annotations

import importlib
import re
import types
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.ptx
numba = pytest.importorskip("numba")

MODULES = ("warp", "smooth", "demons", "diff", "adjoint")
CC = (8, 0)
_F64 = re.compile(r"\.f64\b")
_F64_ARITH = re.compile(r"^\s*(add|sub|mul|fma|div|rcp|sqrt)(\.[a-z]+)*\.f64\b", re.M)


def _mods():
    return types.SimpleNamespace(**{m: importlib.import_module("classreg.kernels." + m) for m in MODULES})


def _builders(k):
    return (k.warp._cuda_kernels, k.smooth._cuda_gaussian, k.demons._cuda_kernel, k.diff._cuda_driver,
            k.adjoint._cuda_kernels)


@pytest.fixture(scope="module")
def ptx_compile():
    """``compile(pyfunc, signature) -> ptx`` for CC 8.0, or skip where numba's CUDA target or NVVM is missing."""
    from classreg.kernels import _backend

    if _backend.cuda_simulator():
        pytest.skip("the CUDA simulator compiles no PTX")
    try:
        from numba import cuda
        from numba.cuda import dispatcher
    except Exception as exc:  # pragma: no cover - depends on the installation
        pytest.skip(f"numba's CUDA target does not import: {exc}")

    def compile_ptx(pyfunc, sig):
        # Device functions are compiled for the current device's compute capability; there is none here, so the
        # dispatchers get CC 8.0 too, for this compilation only.
        saved = dispatcher.get_current_device
        dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)
        try:
            return cuda.compile_ptx(pyfunc, sig, device=False, cc=CC)[0]
        finally:
            dispatcher.get_current_device = saved

    def probe(a, x):
        a[0] = x * 2.0

    try:
        compile_ptx(probe, "void(float32[::1], float32)")
    except Exception as exc:  # pragma: no cover - depends on the installation
        pytest.skip(f"cannot compile PTX (NVVM missing?): {type(exc).__name__}: {exc}")
    return compile_ptx


def _run_all(k, dtype, shapes):
    """Call every public function that launches a numba.cuda kernel with ``dtype`` data of each shape."""
    rng = np.random.default_rng(0)
    for shp in shapes:
        nd = len(shp)
        img = rng.normal(size=shp).astype(dtype)
        disp = rng.normal(size=shp + (nd,)).astype(dtype)
        k.warp.warp(img, disp, order=1, backend="cuda")
        k.warp.interpolate(img, rng.normal(size=(7, nd)).astype(dtype), order=3, backend="cuda")
        k.smooth.gaussian(img, 1.0, backend="cuda")
        k.demons.esm_force(img, img, disp, disp, disp, spacing=1.0, max_step=1.0, mask=np.ones(shp, bool),
                           backend="cuda")
        k.diff.gradient(img, spacing=1.0, backend="cuda")
        for f in (k.diff.divergence, k.diff.jacobian_matrix, k.diff.jacobian_determinant, k.diff.curl):
            f(disp, spacing=1.0, backend="cuda")
        k.diff.lie_bracket(disp, disp, spacing=1.0, backend="cuda")
        k.adjoint.sample_linear(img, disp, gradient=True, backend="cuda")
        k.adjoint.splat_linear(img, disp, shp, backend="cuda")


def _kernels_built(k, dtype):
    """Every numba.cuda kernel the library builds for ``dtype`` data."""
    name = np.dtype(dtype).name
    return ({*k.warp._cuda_kernels(name).values(), k.smooth._cuda_gaussian(), k.demons._cuda_kernel(name),
             *(k.diff._cuda_driver(op) for op in k.diff._BODIES), *vars(k.adjoint._cuda_kernels(name)).values()})


@pytest.fixture
def launched(monkeypatch, ptx_compile):
    """``collect(dtype) -> {kernel: [ptx, ...]}``: the PTX of every launch of the library's kernels for ``dtype``
    data (one per argument signature), compiled instead of launched."""
    from classreg.kernels import _backend

    k = _mods()
    for b in _builders(k):  # fresh dispatchers: nothing compiled here for CC 8.0 stays in the library's caches
        b.cache_clear()
    monkeypatch.setattr(_backend, "_cuda_usable", lambda: True)
    monkeypatch.setattr(_backend, "cuda_simulator", lambda: True)  # host arrays in, no CuPy
    seen = {}

    def record(kernel, n, *args, threads=256):
        sig = numba.types.void(*(numba.typeof(a) for a in args))
        if sig not in seen.setdefault(kernel, {}):
            seen[kernel][sig] = ptx_compile(kernel.py_func, sig)

    monkeypatch.setattr(_backend, "launch", record)

    def collect(dtype, shapes=((6, 5), (4, 5, 6))):
        seen.clear()
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nothing ran: the outputs are uninitialised memory
            _run_all(k, dtype, shapes)
        if len(shapes) == 2:
            missing = _kernels_built(k, dtype) - set(seen)
            assert not missing, f"kernels never launched: {[m.py_func.__qualname__ for m in missing]}"
        return {kern: list(v.values()) for kern, v in seen.items()}

    yield collect
    for b in _builders(k):
        b.cache_clear()


def _f64_lines(ptx):
    return [ln.strip() for ln in ptx.splitlines() if _F64.search(ln) and not ln.strip().startswith("//")]


def test_float32_kernels_have_no_float64_instructions(launched):
    bad = {}
    for kern, ptxs in launched(np.float32).items():
        for ptx in ptxs:
            lines = _f64_lines(ptx)
            if lines:
                bad[kern.py_func.__qualname__] = lines[:5]
    assert not bad, bad


def test_float64_kernels_compute_in_float64(launched):
    """The control: the same scan finds float64 arithmetic in every float64 kernel (2-D calls: every module, half
    the compilation time)."""
    kernels = launched(np.float64, shapes=((6, 5),))
    assert len(kernels) >= 12  # warp 2, gaussian 1, ESM 1, diff 6 (one driver each), adjoint 2
    for kern, ptxs in kernels.items():
        for ptx in ptxs:
            assert _F64_ARITH.search(ptx), kern.py_func.__qualname__


def test_every_kernel_has_its_own_disk_cache_entry():
    """numba caches a kernel on disk under its qualified name, source line, bytecode and argument types, not its
    globals (``_backend.cuda_jit``): two kernels built from one template with different helpers or float types and
    the same argument types would load each other's code in the next process. Every kernel the builders make, for
    both float types, must be cached and have a qualified name of its own. Needs numba's CUDA target (not a GPU)."""
    from classreg.kernels import _backend

    if _backend.cuda_simulator():
        pytest.skip("the CUDA simulator compiles and caches nothing")
    try:
        from numba import cuda  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the installation
        pytest.skip(f"numba's CUDA target does not import: {exc}")
    k = _mods()
    kernels = _kernels_built(k, np.float32) | _kernels_built(k, np.float64)
    names = [kern.py_func.__qualname__ for kern in kernels]
    assert len(kernels) >= 24, names  # warp 4 + ESM 1 + adjoint 4 per float type, gaussian 1, diff 6
    assert len(set(names)) == len(names), sorted(names)
    assert all(type(kern._cache).__name__ != "NullCache" for kern in kernels), names


@pytest.mark.parametrize("ndim", [2, 3])
def test_fused_mi_kernels_compile_to_ptx(monkeypatch, ptx_compile, ndim):
    """kernels/mattes_cuda.py: both passes compile for the B-spline (prior, mask, either image gradient) and affine
    evaluations of DeviceBSplineMI / DeviceAffineMI, run on the stand-in with the launches recorded; they compute
    in float64 with float64 atomics (the simulator cannot show that they compile: it runs Python), and each ndim
    variant is cached on disk under its own name."""
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
    ptx, kernels = {}, set()

    def record(kernel, n, *args, threads=256):
        host = [a._a if type(a).__module__ == "cupy" else a for a in args]  # the stand-in's numpy memory
        sig = numba.types.void(*(numba.typeof(a) for a in host))
        ptx.setdefault(kernel.py_func.__name__, {})[sig] = ptx_compile(kernel.py_func, sig)
        kernels.add(kernel)

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
    assert set(ptx) == {"_pass1_cuda", "_pass2_cuda"} and len(kernels) == 2
    assert {k.py_func.__qualname__ for k in kernels} == {f"_pass1_cuda_{ndim}d", f"_pass2_cuda_{ndim}d"}
    assert all(type(k._cache).__name__ != "NullCache" for k in kernels)
    for name, by_sig in ptx.items():
        for code in by_sig.values():
            # float64 atomics (histogram, sums, gradient) and float64 arithmetic, as documented
            assert "atom.global.add.f64" in code, name
            assert ".f64" in code and "fma.rn.f64" in code, name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_mi_kernels_compile_to_ptx(monkeypatch, ptx_compile, dtype):
    """kernels/mattes_cuda.py's voxel-wise Mattes MI (register_demons(metric="mi") on the GPU): the histogram and the
    descent kernels compile with the signatures ``dense_mattes_mi`` launches (2-D and 3-D, with and without a mask):
    the CPU's per-sample bodies (``kernels.sampling._mi_window``, ``_mi_grad``, with ``min``/``max`` bound to the
    device helpers), the shared-memory histogram with 64-bit integer atomics (fixed point), and each variant cached
    on disk under its own name."""
    from classreg.kernels import _backend
    from classreg.kernels import mattes_cuda as mc

    mc.dense_kernels.cache_clear()
    monkeypatch.setattr(_backend, "_cuda_usable", lambda: True)
    monkeypatch.setattr(_backend, "cuda_simulator", lambda: True)  # host arrays in
    ptx, kernels = {}, set()

    def record(kernel, n, *args, threads=256):
        sig = numba.types.void(*(numba.typeof(a) for a in args))
        ptx.setdefault(kernel.py_func.__name__, {})[sig] = ptx_compile(kernel.py_func, sig)
        kernels.add(kernel)

    monkeypatch.setattr(_backend, "launch", record)
    rng = np.random.default_rng(0)
    for shape in ((6, 5), (4, 5, 3)):
        f, w = rng.random(shape).astype(dtype), rng.random(shape).astype(dtype)
        g = rng.random(shape + (len(shape),)).astype(dtype)
        for mask in (None, rng.random(shape) > 0.3):
            with np.errstate(all="ignore"):  # nothing ran: the histogram holds zeros
                mc.dense_mattes_mi(f, w, bins=(32, 32), limit_range_ratio=0.01, tiny=1e-16, mask=mask,
                                   grad_warped=g)
    mc.dense_kernels.cache_clear()
    name = np.dtype(dtype).name
    assert {k.py_func.__qualname__ for k in kernels} == {f"_dense_hist_cuda_{name}_32x32",
                                                         f"_dense_descent_cuda_{name}_32x32"}
    assert all(type(k._cache).__name__ != "NullCache" for k in kernels)
    # one signature each: the kernels take flat voxel arrays (2-D or 3-D) and a bool array with or without a mask
    assert all(len(by_sig) == 1 for by_sig in ptx.values())
    for code in ptx["_dense_hist_cuda"].values():  # the fixed-point histogram: 64-bit integer atomics only
        assert "atom.shared.add.u64" in code and "atom.global.add.u64" in code and "atom.global.add.f" not in code
    for code in ptx["_dense_descent_cuda"].values():  # the derivative in float64, u stored in the images' type
        assert "fma.rn.f64" in code and f"st.global.{'f32' if dtype == np.float32 else 'f64'}" in code
