"""Every solver on a real GPU (CuPy + numba.cuda): the device run against the CPU run of the same registration.

tests/test_device_residency.py proves without a GPU (numba's CUDA simulator and a stand-in ``cupy``) that nothing
but scalars crosses the bus inside the loops. These tests run the same solvers on real CuPy arrays and real CUDA
kernels, where the stand-in cannot reach: cuFFT instead of pocketfft, CuPy's reductions and ``cupyx.scipy`` routines,
GPU atomics, the device's float rounding (fused multiply-adds). Each checks that the run stays on the device
(``params["backend"] == "cuda"``), that the ``Result`` holds host arrays, that it registered, and that it agrees
with the CPU run within a stated tolerance. They carry the ``gpu`` marker: skipped without a usable GPU (and under
the simulator); run them with ``python -m pytest -m gpu`` on a machine with one.

With ``CLASSREG_GPU_REPORT=<file>`` each test appends what it measured (device-CPU differences, run-to-run
differences of the device) as a JSON line to that file, for docs/notes/gpu.md.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from classreg.kernels._backend import cuda_simulator
from test_device_residency import _point_pair  # the 2-D contour pair of the stand-in tests, any size

import classreg as cr
from classreg.backend import gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cuda_simulator() or not gpu_available(), reason="needs a real CUDA GPU with CuPy"),
]


def report(test: str, **values) -> None:
    path = os.environ.get("CLASSREG_GPU_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"test": test, **{k: float(v) for k, v in values.items()}}) + "\n")


def _phantom(ndim: int, n: int):
    """A smooth blob pair on an anisotropic grid: the moving blob shifted by about a voxel and squeezed."""
    g = np.indices((n,) * ndim, dtype=np.float64)
    c = (n - 1) / 2.0
    r2f = sum((gi - c) ** 2 for gi in g)
    r2m = sum(((gi - c - 0.08 * n * (k == ndim - 1)) * (1.15 if k == 0 else 1.0)) ** 2 for k, gi in enumerate(g))
    s2 = 2.0 * (n / 4.5) ** 2
    spacing = (1.0, 1.2, 0.9)[:ndim]
    f = cr.Image((np.exp(-r2f / s2) + 0.2 * np.exp(-r2f / (0.2 * s2))).astype(np.float32), spacing)
    m = cr.Image((np.exp(-r2m / s2) + 0.2 * np.exp(-r2m / (0.2 * s2))).astype(np.float32), spacing)
    return f, m


def _field(res) -> np.ndarray:
    tx = res.transform.transforms[0] if hasattr(res.transform, "transforms") else res.transform
    return np.asarray(tx.image.numpy())


def _on_host(res) -> None:
    """The Result is the CPU's: numpy arrays, nothing left on the device."""
    assert res.params["backend"] == "cuda"
    assert type(_field(res)) is np.ndarray
    if res.warped is not None:
        assert type(res.warped.data) is np.ndarray


def _masks(shape):
    mask = np.ones(shape, dtype=bool)
    mask[0] = False
    return dict(fixed_mask=mask, moving_mask=mask[::-1].copy())


# ------------------------------------------------------------------------------------------------ the device
def test_the_gpu_is_found_and_listed():
    from classreg.backend import gpu_devices

    devs = gpu_devices()
    assert devs and devs[0]["id"] == "cuda:0" and devs[0]["memory_gib"] > 0, devs


# ------------------------------------------------------------------------------------------------ register_demons
DEMONS = dict(shrink_factors=(2, 1), max_pieces=2, piece_tol=0.0, intensity="joint")


@pytest.mark.parametrize("ndim,n,metric", [(2, 64, "ssd"), (2, 64, "lncc"), (3, 32, "ssd"), (3, 32, "lncc")])
def test_demons_on_the_gpu_matches_the_cpu(ndim, n, metric):
    fixed, moving = _phantom(ndim, n)
    kw = dict(DEMONS, metric=metric, iterations=(20, 10))
    if metric == "lncc":
        kw.update(_masks(fixed.shape), lncc_radius=2.0)
    cpu = cr.register_demons(fixed, moving, **kw)
    dev = cr.register_demons(fixed, moving, device="cuda", **kw)
    again = cr.register_demons(fixed.to("cuda"), moving.to("cuda"), **kw)  # CuPy images run on their device
    _on_host(dev)
    _on_host(again)
    diff = np.abs(_field(dev) - _field(cpu)).max()
    rerun = np.abs(_field(again) - _field(dev)).max()
    report(f"demons_{ndim}d_{metric}", device_vs_cpu_mm=diff, rerun_mm=rerun)
    # the GPU warp and forces compute in float64 on float32 data, the CPU's fast paths in float32: ~1e-6 relative
    # per step, carried over 30 iterations and two pieces (5e-7 mm in the simulator). 1e-3 mm, 1/1000 of a voxel,
    # leaves room for the GPU's fused multiply-adds and is far below any registration accuracy
    assert diff <= 1e-3, diff
    np.testing.assert_allclose(dev.metrics["ssd_after"], cpu.metrics["ssd_after"], rtol=1e-3)
    # no atomics in demons' kernels: the device run repeats itself bit for bit
    assert rerun == 0.0, rerun
    assert dev.metrics["ssd_after"] < 0.5 * dev.metrics["ssd_before"]


@pytest.mark.parametrize("ndim,n", [(2, 64), (3, 32)])
def test_demons_mi_on_the_gpu_matches_the_cpu(ndim, n):
    """metric="mi" with masks: the Mattes MI histogram and descent kernels of kernels/mattes_cuda.py inside the
    demons loop, against the CPU's numba run."""
    fixed, moving = _phantom(ndim, n)
    kw = dict(DEMONS, metric="mi", iterations=(20, 10), **_masks(fixed.shape))
    cpu = cr.register_demons(fixed, moving, **kw)
    dev = cr.register_demons(fixed, moving, device="cuda", **kw)
    again = cr.register_demons(fixed.to("cuda"), moving.to("cuda"), **kw)
    _on_host(dev)
    _on_host(again)
    diff = np.abs(_field(dev) - _field(cpu)).max()
    rerun = np.abs(_field(again) - _field(dev)).max()
    report(f"demons_{ndim}d_mi", device_vs_cpu_mm=diff, rerun_mm=rerun,
           mi_rel=abs(dev.metrics["mi_after"] / cpu.metrics["mi_after"] - 1.0))
    # as for SSD and LNCC: the GPU's float32 warps round differently from the CPU's (~1e-6 relative per step), and
    # the histogram is rounded to fixed point (below 1e-13 per weight). On the CPU the numba and numpy backends of
    # this run end 2.9e-6 mm (2-D) and 2.4e-6 mm (3-D) apart, the device 3.6e-7 mm from the CPU in the simulator
    # (12², tests/test_device_residency.py): 1e-3 mm, 1/1000 of a voxel, bounds that
    assert diff <= 1e-3, diff
    # the fixed-point histogram adds exactly, in any order, and the other kernels have no atomics: bit for bit
    assert rerun == 0.0, rerun
    np.testing.assert_allclose(dev.metrics["mi_after"], cpu.metrics["mi_after"], rtol=1e-4)
    # and it registered: the MI rose (CPU: 1.03 -> 1.97 nats in 2-D, 0.85 -> 1.58 in 3-D)
    assert dev.metrics["mi_after"] > 1.5 * dev.metrics["mi_before"]


# ------------------------------------------------------------------------------------------------ register_lddmm
LDDMM = dict(shrink_factors=(2, 1), iterations=(10, 10), intensity="joint")


@pytest.mark.parametrize("ndim,n,method,metric", [
    (2, 48, "bandlimited", "ssd"),
    (2, 48, "bandlimited", "lncc"),
    (3, 24, "bandlimited", "ssd"),
    (2, 32, "full", "ssd"),
])
def test_lddmm_on_the_gpu_matches_the_cpu(ndim, n, method, metric):
    fixed, moving = _phantom(ndim, n)
    kw = dict(LDDMM, metric=metric)
    if method == "full":
        kw.update(method="full", n_steps=6)
    if metric == "lncc":
        kw.update(_masks(fixed.shape))
    cpu = cr.register_lddmm(fixed, moving, **kw)
    dev = cr.register_lddmm(fixed, moving, device="cuda", **kw)
    again = cr.register_lddmm(fixed.to("cuda"), moving.to("cuda"), **kw)
    _on_host(dev)
    diff = np.abs(_field(dev) - _field(cpu)).max()
    rerun = np.abs(_field(again) - _field(dev)).max()
    report(f"lddmm_{ndim}d_{method}_{metric}", device_vs_cpu_mm=diff, rerun_mm=rerun,
           ssd_rel=abs(dev.metrics["ssd_after"] / cpu.metrics["ssd_after"] - 1.0))
    # cuFFT vs pocketfft and the reverse sweeps' atomic scatters (float32 additions in the GPU's order) round
    # differently from the CPU; 20 L-BFGS iterations carry that along (1e-6 mm in the simulator, where the FFT is
    # numpy's). 1e-3 mm is 1/1000 of a voxel; the run-to-run difference of the device (atomics) is bounded alike
    assert diff <= 1e-3, diff
    assert rerun <= 1e-3, rerun
    np.testing.assert_allclose(dev.metrics["ssd_after"], cpu.metrics["ssd_after"], rtol=1e-3)
    # and it registered (LNCC does not minimise the SSD: measured 0.53 of the SSD before on the CPU)
    assert dev.metrics["min_det"] > 0
    assert dev.metrics["ssd_after"] < (0.5 if metric == "ssd" else 0.7) * dev.metrics["ssd_before"]


def test_metamorphosis_on_the_gpu_matches_the_cpu():
    fixed, moving = _phantom(2, 32)
    lesion = np.zeros(fixed.shape, dtype=bool)
    lesion[12:20, 12:20] = True
    kw = dict(LDDMM, metric="ssd", n_steps=6, mask=lesion)
    cpu = cr.register_metamorphosis(fixed, moving, **kw)
    dev = cr.register_metamorphosis(fixed, moving, device="cuda", **kw)
    _on_host(dev)
    diff = np.abs(_field(dev) - _field(cpu)).max()
    added = np.abs(dev.extras["added_intensity"].numpy() - cpu.extras["added_intensity"].numpy()).max()
    report("metamorphosis_2d", device_vs_cpu_mm=diff, added_intensity=added)
    assert diff <= 1e-3, diff  # as for LDDMM's full-grid engine
    assert added <= 1e-3, added  # intensities normalised to [0, 1]
    assert dev.metrics["ssd_after"] < 0.5 * dev.metrics["ssd_before"]


# ------------------------------------------------------------------------------------------------ register_vp
def test_vp_on_the_gpu_matches_the_cpu_with_the_same_optimiser(monkeypatch):
    import classreg.solvers.vp.register as vp

    fixed, moving = _phantom(2, 32)
    kw = dict(shrink_factors=(2, 1), iterations=(10, 10), regrid_det=0.9)
    scipy_cpu = cr.register_vp(fixed, moving, **kw)
    monkeypatch.setattr(vp, "HOST_OPTIMISER", "shared")  # the device's L-BFGS on the CPU (docs/gpu.md)
    cpu = cr.register_vp(fixed, moving, **kw)
    dev = cr.register_vp(fixed, moving, device="cuda", **kw)
    _on_host(dev)
    diff = max(np.abs(a.image.numpy() - b.image.numpy()).max()
               for a, b in ((dev.transform, cpu.transform), (dev.inverse, cpu.inverse)))
    report("vp_2d", device_vs_cpu_mm=diff, loss_ratio_dev=dev.metrics["loss_ratio"],
           loss_ratio_scipy=scipy_cpu.metrics["loss_ratio"])
    # cuFFT's DST-I and the device warp round differently (1.8e-7 mm in the simulator): 1e-3 mm as above
    assert diff <= 1e-3, diff
    np.testing.assert_allclose(dev.metrics["loss_ratio"], cpu.metrics["loss_ratio"], rtol=1e-3)
    assert dev.metrics["regrids"] == cpu.metrics["regrids"]
    assert dev.metrics["loss_ratio"] <= 1.2 * scipy_cpu.metrics["loss_ratio"] < 0.2
    assert dev.metrics["min_det_j"] > 0.02 and dev.metrics["pct_det_j_nonpositive"] == 0


# ------------------------------------------------------------------------------------------------ register_rigid
def _rotated_pair(n: int, angle_deg: float = 30.0, ndim: int = 2):
    from scipy import ndimage

    g = np.indices((n,) * ndim, dtype=np.float64)
    img = (np.exp(-((g[0] - 0.4 * n) ** 2 / (0.1 * n * n) + (g[1] - 0.55 * n) ** 2 / (0.2 * n * n)))
           + 0.7 * np.exp(-((g[0] - 0.68 * n) ** 2 + (g[1] - 0.3 * n) ** 2) / (0.02 * n * n)))
    if ndim == 3:
        img = img * np.exp(-((g[2] - 0.45 * n) ** 2) / (0.15 * n * n))
    moving = ndimage.rotate(img, angle_deg, axes=(1, 0), reshape=False, order=1)
    return cr.Image(img.astype(np.float32), 1.0), cr.Image(moving.astype(np.float32), 1.0)


@pytest.mark.parametrize("local_refine", ["none", "mi"])
def test_rigid_on_the_gpu_matches_the_cpu(local_refine):
    fixed, moving = _rotated_pair(64)
    kw = dict(local_refine=local_refine, seed=0)
    cpu = cr.register_rigid(fixed, moving, **kw)
    dev = cr.register_rigid(fixed, moving, device="cuda", **kw)
    assert dev.params["backend"] == "cuda"
    dm = np.abs(dev.transform.matrix - cpu.transform.matrix).max()
    dt = np.abs(np.asarray(dev.transform.translation) - np.asarray(cpu.transform.translation)).max()
    report(f"rigid_2d_{local_refine}", matrix=dm, translation_mm=dt,
           angle_error_deg=abs(dev.metrics["angles_deg"][0] + 30.0))
    # the same rotations are sampled (the host's seeded generator); cuFFT's correlations round differently from
    # scipy's (~1e-6 relative), so the same candidates win
    np.testing.assert_array_equal(dev.extras["rotations"], cpu.extras["rotations"])
    np.testing.assert_allclose(dev.extras["scores"], cpu.extras["scores"], rtol=1e-4, atol=1e-5)
    # the MI refinement's evaluations agree to float64 rounding; 300 ASGD steps amplify it (2.4e-7 in the simulator)
    assert dm <= 1e-5 and dt <= 1e-3, (dm, dt)
    assert abs(dev.metrics["angles_deg"][0] + 30.0) <= (0.5 if local_refine == "mi" else 3.0)


def test_affine_mi_on_the_gpu_matches_the_cpu_in_3d():
    fixed, moving = _rotated_pair(32, angle_deg=8.0, ndim=3)
    kw = dict(transform="affine", metric="mi", seed=0)
    cpu = cr.register_affine(fixed, moving, **kw)
    dev = cr.register_affine(fixed, moving, device="cuda", **kw)
    dm = np.abs(dev.transform.matrix - cpu.transform.matrix).max()
    report("affine_3d_mi", matrix=dm)
    assert dm <= 1e-5, dm  # as for the rigid refinement


def test_bspline_mi_on_the_gpu_matches_the_cpu_in_3d():
    from classreg.evaluate import dense_displacement

    fixed, moving = _phantom(3, 32)
    kw = dict(seed=0)  # the default configuration: Mattes MI, exact image gradient, projected folds, ASGD
    cpu = cr.register_bspline(fixed, moving, **kw)
    dev = cr.register_bspline(fixed, moving, device="cuda", **kw)
    rerun = cr.register_bspline(fixed, moving, device="cuda", **kw)
    assert dev.params["backend"] == "cuda" and type(dev.warped.data) is np.ndarray
    u_cpu, u_dev, u_rerun = (dense_displacement(r.transform, fixed)[0] for r in (cpu, dev, rerun))
    diff, rediff = np.abs(u_dev - u_cpu).max(), np.abs(u_rerun - u_dev).max()
    report("bspline_3d_mi", device_vs_cpu_mm=diff, device_rerun_mm=rediff, pieces=dev.metrics["pieces"],
           min_det=dev.metrics["min_det"])
    # each evaluation equals the CPU's to float64 rounding, but the gradient's and the histogram's bincounts add
    # with GPU atomics (another order on every run), and this run is that sensitive to rounding itself: the CPU run
    # with every gradient scaled by 1 + 2⁻⁵² ends 0.016 mm away (the first steps of the middle level oscillate and
    # amplify any change), the stand-in device run (numpy's sums) 0.017-0.024 mm (docs/notes/gpu.md); 0.1 mm, a
    # tenth of a voxel, bounds that with room
    assert diff <= 0.1 and rediff <= 0.1, (diff, rediff)
    assert dev.metrics["min_det"] >= 0.05 and dev.metrics["percent_det_nonpositive"] == 0  # the floor, as on the CPU
    np.testing.assert_allclose(dev.metrics["metric"], cpu.metrics["metric"], rtol=1e-3)  # stand-in: 0.9e-4 to 1.5e-4


# ------------------------------------------------------------------------------------------------ register_points
@pytest.mark.parametrize("m,rank", [(400, None), (1500, 40)])
def test_points_on_the_gpu_match_the_numpy_backend(m, rank):
    source, target, truth = _point_pair(m)
    kw = dict(max_iter=40, min_iter=40, estep="exact")
    if rank is not None:
        kw["rank"] = rank  # low-rank coarse kernel + the fine scale's conjugate gradients on cupyx CSR
    cpu = cr.register_points(source, target, backend="numpy", **kw)
    dev = cr.register_points(source, target, device="cuda", **kw)
    assert dev.params["backend"] == "cuda"
    diff = np.abs(dev.inverse.map_points(source) - cpu.inverse.map_points(source)).max()
    err = np.linalg.norm(dev.inverse.map_points(source) - truth, axis=1).mean()
    report(f"points_{m}", device_vs_cpu_mm=diff, error_mm=err, sigma_mm=dev.metrics["sigma_mm"])
    # the same float64 code; cuBLAS/cuSOLVER round differently from LAPACK, and the fine scale's per-column CG
    # stopping test can move by a step (1.4e-5 mm in the simulator): 1e-3 mm, far below the 0.05 mm noise
    assert diff <= 1e-3, diff
    # and it registered: σ fell from ~5 mm to the noise level (CPU: 0.076 mm with 400 points, 0.052 with 1500);
    # the mean distance to the true positions includes sliding along the densely sampled contour (CPU: 0.35, 0.89)
    assert res_sigma_ok(dev) and err < 1.0, (dev.metrics["sigma_mm"], err)


def res_sigma_ok(res) -> bool:
    return res.history[0]["sigma"] > 4.0 and res.metrics["sigma_mm"] < 0.1


# ------------------------------------------------------------------------------------------------ the command line
def test_cli_device_cuda(tmp_path):
    from classreg.cli import main

    fixed, moving = _phantom(3, 24)
    cr.save(fixed, tmp_path / "f.nii.gz")
    cr.save(moving, tmp_path / "m.nii.gz")
    base = ["register", "demons", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--quiet", "--no-qc",
            "--iterations", "10", "5", "--shrink-factors", "2", "1"]
    assert main(base + ["-o", str(tmp_path / "cpu")]) == 0
    assert main(base + ["-o", str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    cpu, gpu = cr.load_result(tmp_path / "cpu"), cr.load_result(tmp_path / "gpu")
    diff = np.abs(gpu.transform.image.numpy() - cpu.transform.image.numpy()).max()
    assert gpu.params["backend"] == "cuda" and diff <= 1e-3, diff


_CACHE_PROBE = """
import cupy, numpy as np
from classreg.kernels import warp
img = cupy.asarray(np.random.default_rng(0).random((16, 17), dtype=np.float32))
warp.warp(img, cupy.zeros((16, 17, 2), np.float32), backend="cuda")
k = warp._cuda_kernels("float32")["_warp2_gpu"]
print(sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values()))
"""


def test_kernels_load_from_the_disk_cache_in_a_new_process(tmp_path):
    """The second process loads the warp kernel from numba's disk cache instead of compiling it (the ~7 s first call
    of every process before ``_backend.cuda_jit`` cached kernels)."""
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    counts = [subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True,
                             check=True).stdout.split() for _ in range(2)]
    report("kernel_disk_cache", hits_first=counts[0][0], hits_second=counts[1][0])
    assert counts[0] == ["0", "1"], counts  # compiled and saved
    assert counts[1] == ["1", "0"], counts  # loaded
