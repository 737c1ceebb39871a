"""Device residency without a GPU: solvers run on the stand-in device of tests/device_standin.py (a numpy-backed
``cupy`` that refuses implicit conversion and counts every host transfer), their numba.cuda kernels under numba's
CUDA simulator. The tests assert that nothing but a few synchronising scalar reads crosses the bus between the first
and the last iteration event, that the inputs come to the host once and the result once, and that the device run
computes the CPU run's result.

The ``cudasim`` tests run in the simulator process of tests/test_cudasim.py (or directly on a machine with a GPU
and ``NUMBA_ENABLE_CUDASIM=1``); the others run everywhere.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from classreg.kernels._backend import get_array_module, is_cupy_array
from device_standin import DeviceArray, installed, only_scalar_reads, run_counted

import classreg as cr
from classreg.backend import placement, resolve_device


def _phantom(ndim: int, n: int):
    """A smooth blob pair on an anisotropic grid: the moving blob shifted by about a voxel and squeezed."""
    g = np.indices((n,) * ndim, dtype=np.float64)
    c = (n - 1) / 2.0
    r2f = sum((gi - c) ** 2 for gi in g)
    r2m = sum(((gi - c - 0.8 * (k == ndim - 1)) * (1.15 if k == 0 else 1.0)) ** 2 for k, gi in enumerate(g))
    s2 = 2.0 * (n / 4.5) ** 2
    spacing = (1.0, 1.2, 0.9)[:ndim]
    f = cr.Image((np.exp(-r2f / s2) + 0.2 * np.exp(-r2f / (0.2 * s2))).astype(np.float32), spacing)
    m = cr.Image((np.exp(-r2m / s2) + 0.2 * np.exp(-r2m / (0.2 * s2))).astype(np.float32), spacing)
    return f, m


# ------------------------------------------------------------------------------------------------ the harness itself
def test_standin_is_device_data_and_counts_transfers(monkeypatch):
    with installed(monkeypatch) as cp:
        host = np.arange(24.0).reshape(4, 6)
        a = cp.asarray(host)
        assert isinstance(a, DeviceArray) and is_cupy_array(a) and get_array_module(a) is cp
        assert resolve_device(None, a) == "cuda" and placement(None, None, a) == ("cuda", "cuda")
        assert cp.transfers.between(0, kinds=("upload",)) == [("upload", 24, cp.transfers.log[0][2])]
        s = cp.sum(a * 2.0)  # a reduction stays on the device (0-d array) until read
        assert isinstance(s, DeviceArray) and cp.transfers.mark() == 1
        assert float(s) == 552.0 and cp.transfers.log[-1][:2] == ("scalar", 1)
        with pytest.raises(TypeError, match="Implicit conversion"):
            np.asarray(a)
        with pytest.raises(TypeError, match="host numpy array"):
            a + host  # mixing host and device data is refused, as CuPy does
        np.testing.assert_array_equal(a.get(), host)
        kinds = [r[0] for r in cp.transfers.log]
        assert kinds.count("implicit") == 2 and kinds[-1] == "download"
        img = cr.Image(host, 1.0).to("cuda")
        assert isinstance(img.data, DeviceArray)


def test_placement_rules(monkeypatch):
    with installed(monkeypatch) as cp:
        a = cp.zeros((4, 4))
        assert placement("cpu", None, a) == ("cpu", None)  # device="cpu": the solver copies CuPy data to the host
        assert placement(None, "cuda", np.zeros(3)) == ("cuda", "cuda")  # backend="cuda" with a GPU: data go up
        with pytest.raises(ValueError, match="data are on the GPU"):
            placement(None, "numba", a)
        # a CuPy mask of a host image comes to the host, explicitly (one download)
        start = cp.transfers.mark()
        m = cr.image.as_mask(cp.asarray(np.eye(4)), cr.Image(np.zeros((4, 4)), 1.0), "fixed_mask")
        assert type(m) is np.ndarray and m.dtype == bool and m.sum() == 4
        assert [r[0] for r in cp.transfers.between(start)] == ["upload", "download"]


# ------------------------------------------------------------------------------------------------ register_demons
DEMONS = {"shrink_factors": (2, 1), "max_pieces": 2, "piece_tol": 0.0, "intensity": "joint"}


@pytest.mark.cudasim
@pytest.mark.parametrize("how,ndim,n,metric", [
    ("device", 2, 12, "ssd"),
    ("cupy_image", 2, 12, "ssd"),  # CuPy-backed images with device=None run on their device
    ("device", 2, 12, "lncc"),  # with masks too
    ("device", 2, 12, "mi"),  # with masks too: the Mattes MI kernels of kernels/mattes_cuda.py
    pytest.param("device", 3, 8, "ssd", marks=pytest.mark.slow),  # ~20 s in the simulator
])
def test_demons_stays_on_device(monkeypatch, how, ndim, n, metric):
    fixed, moving = _phantom(ndim, n)
    kw = dict(DEMONS, metric=metric, iterations=(3, 2) if ndim == 2 else (2, 1))
    if how == "cupy_image":  # with an initial affine too
        kw["init"] = cr.Affine(np.eye(ndim) * 1.02, translation=0.3)
    if metric != "ssd":
        mask = np.ones(fixed.shape, dtype=bool)
        mask[0] = False
        kw.update(fixed_mask=mask, moving_mask=mask[::-1].copy())
    if metric == "lncc":
        kw.update(lncc_radius=2.0)
    cpu = cr.register_demons(fixed, moving, **kw)
    with installed(monkeypatch) as cp:
        if how == "device":
            res, marks = run_counted(cp.transfers, cr.register_demons, fixed, moving, device="cuda", **kw)
        else:
            res, marks = run_counted(cp.transfers, cr.register_demons, fixed.to("cuda"), moving.to("cuda"), **kw)
    log = cp.transfers
    assert res.params["backend"] == "cuda"
    assert len(marks) == len(res.history) >= sum(kw["iterations"])  # at least the first piece's two levels ran
    # nothing but scalar reads inside the loop (a synchronisation returning a few numbers, no array); no implicit
    # conversion anywhere. Per iteration (measured 5.9 for SSD, 13.9 for LNCC, 8.2 for MI in 2-D): one read per force
    # evaluation (energy, valid count, largest step; forward and backward), one for the similarity, one for the
    # squaring count of exp(v), plus per level and piece the Image checks, the fold check and the piece's energy;
    # LNCC's array-module force (kernels/lncc.py, the reference on CuPy) reads 7 numbers per evaluation; MI's force
    # reads its cost and count together, whether the direction is zero, and its largest vector after the smoothing
    only_scalar_reads(log, marks, {"ssd": 8, "lncc": 16, "mi": 10}[metric])
    # the inputs once: the normalised images and the masks go up (CuPy images went up in the test's .to("cuda") and
    # come down once, for the intensity normalisation); the only other uploads are the smoothing taps, once per σ
    voxels = fixed.data.size
    before = log.between(0, marks[0], kinds=("upload", "download"))
    images = [r[0] for r in before if r[1] >= voxels]
    ups = ["upload"] * (2 if metric == "ssd" else 4)
    assert images == {"device": ups, "cupy_image": ["upload"] * 2 + ["download"] * 2 + ups}[how], before
    assert all("kernels/smooth.py" in r[2] for r in before if r[1] < voxels), before
    # the result once: the forward and inverse displacement and each piece's velocity
    after = log.between(marks[-1], kinds=("upload", "download"))
    assert [r[0] for r in after] == ["download"] * (2 + res.metrics["pieces"]), after
    # the same registration as on the CPU: float64 arithmetic inside the GPU warp and force vs the CPU's float32
    # fast paths (~1e-6 relative per step), compounded over the iterations and pieces (measured at most 5e-7 mm);
    # 1e-4 mm, 1/10 000 of a voxel, is far below any registration accuracy and far above that rounding
    d_cpu = cpu.transform.transforms[0] if hasattr(cpu.transform, "transforms") else cpu.transform
    d_dev = res.transform.transforms[0] if hasattr(res.transform, "transforms") else res.transform
    assert res.metrics["pieces"] == cpu.metrics["pieces"]
    diff = np.abs(d_dev.image.numpy() - d_cpu.image.numpy()).max()
    assert diff <= 1e-4, diff
    np.testing.assert_allclose(res.metrics["ssd_after"], cpu.metrics["ssd_after"], rtol=1e-4)
    # and it registered: the SSD of the normalised intensities at least halved (for either metric)
    assert res.metrics["ssd_after"] < res.metrics["ssd_before"] - 0.5 * abs(res.metrics["ssd_before"])


# ------------------------------------------------------------------------------------------------ the kernels
def _kernel_calls(rng):
    """(name, call(arrays) -> outputs, host inputs) for each kernel register_demons runs on the device."""
    from classreg.kernels.demons import esm_force
    from classreg.kernels.diff import gradient, jacobian_determinant, lie_bracket
    from classreg.kernels.fields import compose, expmap
    from classreg.kernels.smooth import gaussian
    from classreg.kernels.warp import warp

    shape, h = (6, 7, 5), (1.0, 1.2, 0.9)
    img = rng.random(shape).astype(np.float32)
    u = (0.6 * rng.standard_normal(shape + (3,))).astype(np.float32)
    v = (0.6 * rng.standard_normal(shape + (3,))).astype(np.float32)
    mask = rng.random(shape) > 0.2
    inv_h = np.diag(1.0 / np.asarray(h))
    mat, off = np.array([[1.0, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.1]]), np.array([0.3, -0.2, 0.1])
    be = {"backend": "cuda"}
    return [
        ("warp", lambda a, d: warp(a, d, matrix=mat, offset=off, disp_matrix=inv_h, order=1, mode="itk", **be),
         (img, u)),
        ("warp_affine", lambda a: warp(a, None, matrix=mat, offset=off, out_shape=(4, 5, 3), mode="border", **be),
         (img,)),
        ("gaussian", lambda a: gaussian(a, 1.3, spacing=h, ndim=3, **be), (u,)),
        ("gradient", lambda a: gradient(a, spacing=h, **be), (img,)),
        ("jacobian_determinant", lambda a: jacobian_determinant(a, spacing=h, **be), (u,)),
        ("lie_bracket", lambda a, b: lie_bracket(a, b, spacing=h, **be), (u, v)),
        ("compose", lambda a, b: compose(a, b, spacing=h, **be), (u, v)),
        ("expmap", lambda a: expmap(a, spacing=h, **be), (u,)),
        ("esm_force", lambda f, m, g, d, k: esm_force(f, m, g, g, d, spacing=h, max_step=1.5, mask=k, **be),
         (img, img[::-1].copy(), u, v, mask)),
    ]


@pytest.mark.cudasim
def test_kernels_take_and_return_device_arrays_without_transfers(monkeypatch):
    # each kernel's CUDA path on device arrays: the result stays on the device, nothing is copied either way (a
    # kernel that returns numbers reads them as scalars), and it is the CUDA path's result on host arrays bit for
    # bit (the same simulated kernels; the host-array path is checked against the numpy references in
    # tests/test_kernels_*.py)
    calls = _kernel_calls(np.random.default_rng(7))
    with installed(monkeypatch) as cp:
        for name, call, inputs in calls:
            host = call(*inputs)
            dev_in = [cp.asarray(a) for a in inputs]
            moving = ("upload", "download", "kernel_host_arg", "implicit")
            start = cp.transfers.mark()
            call(*dev_in)  # the first call may upload constants: the Gaussian taps, once per σ
            assert all("kernels/smooth.py" in r[2] for r in cp.transfers.between(start, kinds=moving)), name
            start = cp.transfers.mark()
            dev = call(*dev_in)
            moved = cp.transfers.between(start, kinds=moving)
            assert not moved, (name, moved)
            host, dev = (host, dev) if isinstance(host, tuple) else ((host,), (dev,))
            for h_out, d_out in zip(host, dev):
                if isinstance(h_out, np.ndarray):
                    assert isinstance(d_out, DeviceArray), name
                    np.testing.assert_array_equal(d_out.get(), h_out, err_msg=name)
                else:
                    assert d_out == h_out, name


def test_info_shows_the_device(monkeypatch, capsys):
    from classreg.cli import main

    with installed(monkeypatch):
        assert main(["info", "--json"]) == 0
        import json

        info = json.loads(capsys.readouterr().out)
        assert info["backends"]["gpu"] is True
        assert info["devices"] == [{"id": "cuda:0", "name": "stand-in device", "memory_gib": 1.0}]
        assert main(["info"]) == 0
        assert "cuda:0: stand-in device, 1 GiB" in capsys.readouterr().out


def test_demons_device_cpu_brings_cupy_images_to_the_host(monkeypatch):
    # device="cpu" with CuPy images: the inputs come down once and the CPU run is the numpy-image run bit for bit
    fixed, moving = _phantom(2, 12)
    kw = dict(DEMONS, iterations=(2, 1))
    ref = cr.register_demons(fixed, moving, **kw)
    with installed(monkeypatch) as cp:
        f_dev, m_dev = fixed.to("cuda"), moving.to("cuda")
        start = cp.transfers.mark()
        res = cr.register_demons(f_dev, m_dev, device="cpu", **kw)
        assert [r[0] for r in cp.transfers.between(start) if r[1] >= fixed.data.size] == ["download"] * 2
    assert res.params["backend"] == ref.params["backend"] != "cuda"
    np.testing.assert_array_equal(res.warped.numpy(), ref.warped.numpy())
    for key in ("ssd_after", "path_length"):
        assert res.metrics[key] == ref.metrics[key]


def _cli_on_cpu_and_device(monkeypatch, tmp_path, solver, fixed, moving, options):
    """``classreg register <solver>`` on the CPU and with ``--device cuda`` on the stand-in device: no implicit
    conversion and no host array handed to a kernel, something uploaded (it ran there), the recorded placement.
    Returns the two loaded results."""
    from classreg.cli import main

    cr.save(fixed, tmp_path / "f.nii.gz")
    cr.save(moving, tmp_path / "m.nii.gz")
    args = ["register", solver, str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), *options, "--quiet",
            "--no-qc"]
    assert main(args + ["-o", str(tmp_path / "cpu")]) == 0
    with installed(monkeypatch) as cp:
        assert main(args + ["-o", str(tmp_path / "gpu"), "--device", "cuda"]) == 0
        assert not cp.transfers.between(0, kinds=("implicit", "kernel_host_arg"))
        assert cp.transfers.between(0, kinds=("upload",))  # it did run on the stand-in device
    cpu, gpu = cr.load_result(tmp_path / "cpu"), cr.load_result(tmp_path / "gpu")
    assert gpu.params["device"] == "cuda" and gpu.params["backend"] == "cuda" and cpu.params["backend"] != "cuda"
    return cpu, gpu


@pytest.mark.cudasim
def test_cli_device_cuda_runs_demons_on_the_device(monkeypatch, tmp_path):
    cpu, gpu = _cli_on_cpu_and_device(monkeypatch, tmp_path, "demons", *_phantom(2, 12),
                                      ["--shrink-factors", "2", "1", "--iterations", "2", "1", "--max-pieces", "1",
                                       "--intensity", "joint"])
    diff = np.abs(gpu.transform.image.numpy() - cpu.transform.image.numpy()).max()
    assert diff <= 1e-4, diff  # as in test_demons_stays_on_device


# ================================================================================================ gpu-b: rigid, points
# register_rigid and register_points on the stand-in device (issue #26); kept apart from the other solvers' sections.
def _rotated_pair(n: int = 24, angle_deg: float = 30.0):
    """An asymmetric 2-D phantom and its copy rotated by ``angle_deg`` about the centre (1 mm grid)."""
    from scipy import ndimage

    g = np.indices((n, n), dtype=np.float64)
    img = (np.exp(-((g[0] - 0.4 * n) ** 2 / (0.1 * n * n) + (g[1] - 0.55 * n) ** 2 / (0.2 * n * n)))
           + 0.7 * np.exp(-((g[0] - 0.68 * n) ** 2 + (g[1] - 0.3 * n) ** 2) / (0.02 * n * n)))
    moving = ndimage.rotate(img, angle_deg, reshape=False, order=1)
    return cr.Image(img.astype(np.float32), 1.0), cr.Image(moving.astype(np.float32), 1.0)


RIGID = {"shrink_factors": (2, 1), "smoothing_sigmas": (1.0, 0.5), "samples": (24, 6), "perturbation": (5.0,),
         "keep": (2,)}


@pytest.mark.cudasim
@pytest.mark.parametrize("how,local_refine,masks", [
    ("device", "none", False),
    ("cupy_image", "mi", False),
    pytest.param("device", "none", True, marks=pytest.mark.slow),  # ~10 s more in the simulator
])
def test_rigid_stays_on_device(monkeypatch, how, local_refine, masks):
    fixed, moving = _rotated_pair()
    kw = dict(RIGID, local_refine=local_refine)
    if masks:
        mask = np.ones(fixed.shape, dtype=bool)
        mask[:3] = False
        kw.update(fixed_mask=mask, moving_mask=mask[::-1].copy())
    cpu = cr.register_rigid(fixed, moving, **kw)
    with installed(monkeypatch) as cp:
        calls = _counting_device_evaluations(monkeypatch, cp.transfers)
        if how == "device":
            res, marks = run_counted(cp.transfers, cr.register_rigid, fixed, moving, device="cuda", **kw)
        else:
            res, marks = run_counted(cp.transfers, cr.register_rigid, fixed.to("cuda"), moving.to("cuda"), **kw)
    log = cp.transfers
    assert res.params["backend"] == "cuda"
    assert len(marks) == len(res.history) == sum(RIGID["samples"]) + RIGID["keep"][0]
    # inside the search only scalar reads, and at the level change the Gaussian taps of the new σ (kernels/smooth.py,
    # a few numbers per σ); no implicit conversion, no host array handed to a kernel anywhere. Per evaluated rotation
    # (measured 7.4): the moving-mask checks (2), the finiteness check of the rotated image, the overlap maximum, the
    # arg-max and its score, and the NCC of a new best candidate (its sums, ~5 reads)
    only_scalar_reads(log, marks, 12, allowed=lambda r: "kernels/smooth.py" in r[2])
    # the inputs once: the normalised images and the fixed mask (and a moving mask) go up (CuPy images come down
    # once first); the other uploads before the loop are Gaussian taps
    voxels = fixed.data.size
    before = log.between(0, marks[0], kinds=("upload", "download"))
    images = [r[0] for r in before if r[1] >= voxels]
    ups = ["upload"] * (4 if masks else 3)
    assert images == {"device": ups, "cupy_image": ["upload"] * 2 + ["download"] * 2 + ups}[how], before
    assert all("kernels/smooth.py" in r[2] for r in before if r[1] < voxels), before
    # the result: the search's answer is a few numbers (scalar reads: the sub-voxel peak fit); the warped image runs
    # on the host copy of the moving image, so without the refinement nothing else crosses; the MI refinement's
    # evaluations run on the device (_check_mi_refinement)
    if local_refine == "mi":
        _check_mi_refinement(log, calls, marks[-1])
    else:
        after = log.between(marks[-1], kinds=("upload", "download", "kernel_host_arg", "implicit"))
        assert not after and not calls, after
    # the same search as on the CPU: the same rotations are sampled (the host's seeded generator) and the device
    # scores differ from the CPU's only by rounding (float64 warp on the device vs the CPU's float32 fast path, ~1e-6
    # relative), so the same candidates win; the sub-voxel fit through those scores moves by far less than 1e-3 mm
    np.testing.assert_allclose(res.extras["scores"], cpu.extras["scores"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(res.extras["rotations"], cpu.extras["rotations"])
    # (with the MI refinement: each evaluation agrees to ~1e-15, test_device_affine_mi_matches_the_cpu_kernel, and
    # 300 ASGD iterations with an adaptive gain amplify that: measured 2.4e-7 in the matrix, 4.8e-7 mm; 1e-5 in the
    # matrix is 6e-4°, far below the refinement's own 0.05° error)
    np.testing.assert_allclose(res.transform.matrix, cpu.transform.matrix, atol=1e-6 if local_refine == "none" else 1e-5)
    np.testing.assert_allclose(res.transform.translation, cpu.transform.translation, atol=1e-3)
    # and it found the rotation (the fixed -> moving map turns by -30°): within the search's resolution (15° samples
    # perturbed by ±5°; measured 1.3°), within 0.2° after the MI refinement (measured 0.05°)
    err = abs(res.metrics["angles_deg"][0] + 30.0)
    assert err <= (0.2 if local_refine == "mi" else 3.0), res.metrics["angles_deg"]


@pytest.mark.cudasim
@pytest.mark.parametrize("ndim,masked", [(2, False), (2, True), (3, True)])
@pytest.mark.parametrize("image_gradient", ["smoothed", "exact"])
def test_device_affine_mi_matches_the_cpu_kernel(monkeypatch, ndim, masked, image_gradient):
    """One evaluation of the parametric engine's device path (classreg/solvers/parametric/device.py) against the CPU
    fused kernel (kernels/affine.py) on the same samples, with either image gradient: value, gradient, correlation
    and valid fraction."""
    from scipy import ndimage

    from classreg.solvers.parametric.engine import LevelObjective
    from classreg.solvers.parametric.models import AffineModel
    from classreg.solvers.parametric.sampling import Sampler

    rng = np.random.default_rng(5)
    shape = (20, 22) if ndim == 2 else (12, 13, 11)
    fixed = cr.Image(ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32), 1.0)
    moving = cr.Image(ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32), 1.0)
    mask = None
    if masked:
        mask = np.ones(shape, dtype=bool)
        mask[:3] = False
    center = (np.asarray(shape) - 1.0) / 2.0
    p = np.array([0.2, 0.4, -0.6]) if ndim == 2 else np.array([0.1, -0.2, 0.15, 0.5, -0.3, 0.4])

    def objective(device):
        return LevelObjective(fixed, moving, None, mask, model=AffineModel("rigid", ndim, center), pre=None,
                              metric="mi", sampler=Sampler("random_coordinate", 512, shape),
                              rng=np.random.default_rng(1), device=device, image_gradient=image_gradient)

    cpu = objective("cpu")
    assert cpu._fused is not None  # the reference is the fused kernel the CPU run uses
    value, grad = cpu.evaluate(p, 0)
    with installed(monkeypatch) as cp:
        dev = objective("cuda")
        dev.predraw([0])
        assert dev.on_device
        start = cp.transfers.mark()
        value_d, grad_d = dev.evaluate(p, 0)
        # one read of count, value, correlation, g (n) and G (n × n); nothing else crosses
        assert cp.transfers.between(start) == [("download" if 3 + ndim + ndim**2 > 8 else "scalar",
                                                3 + ndim + ndim**2, cp.transfers.log[-1][2])]
    # the same samples (the CPU's random sequence) and formulas; the sums run in another order (bincount, tree
    # reductions): agreement to float64 rounding (measured 6e-16 relative in the value, 1.5e-15 in the gradient)
    assert dev.last_valid == cpu.last_valid
    np.testing.assert_allclose(value_d, value, rtol=1e-12)
    np.testing.assert_allclose(grad_d, grad, rtol=0, atol=1e-12 * np.abs(grad).max())
    np.testing.assert_allclose(dev.last_similarity, cpu.last_similarity, rtol=1e-12)


@pytest.mark.cudasim
@pytest.mark.parametrize("metric,image_gradient", [("mi", "smoothed"), ("mi", "exact"), ("ncc", "smoothed")])
def test_affine_on_the_device_or_the_cpu(monkeypatch, caplog, metric, image_gradient):
    """register_affine(device="cuda"): Mattes MI runs its evaluations on the device (the CPU result to rounding),
    with either image gradient; a metric the device path does not cover (NCC) logs a line and is the CPU run, with
    nothing crossing."""
    fixed, moving = _rotated_pair(16, 10.0)
    kw = {"transform": "affine", "metric": metric, "shrink_factors": (1,), "smoothing_sigmas": (0.0,),
          "iterations": (20,), "samples": 256, "image_gradient": image_gradient}
    cpu = cr.register_affine(fixed, moving, **kw)
    with installed(monkeypatch) as cp, caplog.at_level("INFO", logger="classreg"):
        res = cr.register_affine(fixed, moving, device="cuda", **kw)
    if metric == "ncc":
        assert "running on the CPU" in caplog.text and res.params["backend"] != "cuda"
        assert not cp.transfers.log
        np.testing.assert_array_equal(res.transform.homogeneous, cpu.transform.homogeneous)
    else:
        assert res.params["backend"] == "cuda"
        assert {r[0] for r in cp.transfers.log} == {"upload", "download"}  # samples and stack up, results down
        # about 30 evaluations, each equal to the CPU's to ~1e-15 (test_device_affine_mi_matches_the_cpu_kernel):
        # measured 1.8e-14 apart (affine, 20 ASGD iterations)
        np.testing.assert_allclose(res.transform.homogeneous, cpu.transform.homogeneous, atol=1e-9)


@pytest.mark.cudasim
@pytest.mark.parametrize("ndim,masked,prior,bending,image_gradient", [
    (2, False, False, 0.0, "exact"),  # register_bspline's default level (no prior: its first level)
    (2, True, True, 50.0, "exact"),  # a later fold-free level, a moving mask, the bending energy
    (2, False, True, 0.0, "smoothed"),
    (3, True, True, 50.0, "exact"),
])
def test_device_bspline_mi_matches_the_cpu_kernel(monkeypatch, ndim, masked, prior, bending, image_gradient):
    """One evaluation of the B-spline level on the device (classreg/solvers/parametric/device.py,
    DeviceBSplineMI) against the CPU's (the fused kernel kernels/bspline.py mi_step with the exact image gradient,
    the step-by-step path with the smoothed one) on the same samples: value (with the bending energy), gradient in
    the coefficients, correlation and valid fraction; one read of five numbers per evaluation."""
    from scipy import ndimage

    from classreg.solvers.parametric.bspline import BSplineModel
    from classreg.solvers.parametric.engine import LevelObjective
    from classreg.solvers.parametric.sampling import Sampler

    rng = np.random.default_rng(5)
    shape = (20, 22) if ndim == 2 else (12, 13, 11)
    fixed = cr.Image(ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32), (1.0, 1.2, 0.9)[:ndim])
    moving = cr.Image(ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32), (1.0, 1.2, 0.9)[:ndim])
    mask = None
    if masked:
        mask = np.ones(shape, dtype=bool)
        mask[:3] = False
    model = BSplineModel.over(fixed, None, 4.0, bending_weight=bending, bound=0.4)
    p = 0.6 * rng.standard_normal(model.size)  # mm: moves samples across voxels, some out of the moving image
    if prior:  # a smooth displacement of earlier pieces, mm, on the fixed grid
        model.set_prior(ndimage.gaussian_filter(rng.standard_normal(shape + (ndim,)), (2.0,) * ndim + (0,)),
                        fixed.inverse_affine)

    def objective(device):
        return LevelObjective(fixed, moving, None, mask, model=model, pre=None, metric="mi",
                              sampler=Sampler("random_coordinate", 512, shape), rng=np.random.default_rng(1),
                              device=device, image_gradient=image_gradient)

    cpu = objective("cpu")
    assert (cpu._bspline_step is not None) == (image_gradient == "exact")  # the CPU run's own evaluation
    value, grad = cpu.evaluate(p, 0)
    with installed(monkeypatch) as cp:
        dev = objective("cuda")
        dev.predraw([0])
        assert dev.on_device
        coeffs = dev.resident(p)
        dev.evaluate(coeffs, 0)  # the first evaluation uploads the prior (once per level or fold-free restart)
        start = cp.transfers.mark()
        value_d, grad_d = dev.evaluate(coeffs, 0)
        # one read of count, value, correlation, the gradient's norm and finiteness; nothing else crosses: the
        # coefficients and the gradient stay on the device
        assert cp.transfers.between(start) == [("scalar", 5, cp.transfers.log[-1][2])]
        assert isinstance(grad_d, DeviceArray)
        grad_d = grad_d.get()
    # the same samples (the CPU's random sequence) and formulas; the sums run in another order (bincount, the 4ⁿ
    # taps summed at once, tree reductions), so they agree to float64 rounding: 1e-12 relative leaves ~100x room
    # over what a few thousand rounded terms give (measured: 7.4e-15 in the value, 2.9e-15 of the largest gradient
    # entry, 1e-16 in the correlation)
    assert dev.last_valid == cpu.last_valid < 1.0  # some samples left the moving image (or its mask)
    np.testing.assert_allclose(value_d, value, rtol=1e-12)
    np.testing.assert_allclose(grad_d, grad, rtol=0, atol=1e-12 * np.abs(grad).max())
    np.testing.assert_allclose(dev.last_gradient_norm, np.linalg.norm(grad), rtol=1e-12)
    np.testing.assert_allclose(dev.last_similarity, cpu.last_similarity, rtol=1e-12)


@pytest.mark.cudasim
@pytest.mark.parametrize("kind,ndim,masked,prior,image_gradient", [
    ("bspline", 2, False, False, "exact"),  # register_bspline's default level
    ("bspline", 2, True, True, "exact"),  # a later fold-free level with a moving mask (and the bending energy)
    ("bspline", 2, False, True, "smoothed"),
    ("bspline", 3, True, True, "exact"),
    ("affine", 2, True, False, "smoothed"),
    ("affine", 3, False, False, "exact"),
])
def test_fused_device_mi_matches_the_array_module_path(monkeypatch, kind, ndim, masked, prior, image_gradient):
    """The fused numba.cuda evaluation (kernels/mattes_cuda.py: two kernel launches, the table in CuPy; what a GPU
    runs) against the array-module evaluation of DeviceBSplineMI / DeviceAffineMI (the reference; what the
    simulator runs by default), on the same device objective and samples: value, gradient, correlation, valid
    fraction, and still one read per evaluation with no host array handed to a kernel."""
    from classreg.kernels import _backend
    from scipy import ndimage

    from classreg.solvers.parametric.bspline import BSplineModel
    from classreg.solvers.parametric.engine import LevelObjective
    from classreg.solvers.parametric.models import AffineModel
    from classreg.solvers.parametric.sampling import Sampler

    rng = np.random.default_rng(5)
    shape = (20, 22) if ndim == 2 else (12, 13, 11)
    spacing = (1.0, 1.2, 0.9)[:ndim]
    fixed = cr.Image(ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32), spacing)
    moving = cr.Image(ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32), spacing)
    mask = None
    if masked:
        mask = np.ones(shape, dtype=bool)
        mask[:3] = False
    if kind == "bspline":
        model = BSplineModel.over(fixed, None, 4.0, bending_weight=50.0 if masked else 0.0, bound=0.4)
        p = 0.6 * rng.standard_normal(model.size)  # mm: moves samples across voxels, some out of the moving image
        if prior:
            model.set_prior(ndimage.gaussian_filter(rng.standard_normal(shape + (ndim,)), (2.0,) * ndim + (0,)),
                            fixed.inverse_affine)
    else:
        model = AffineModel("rigid", ndim, (np.asarray(shape) - 1.0) / 2.0)
        p = np.array([0.2, 0.4, -0.6]) if ndim == 2 else np.array([0.1, -0.2, 0.15, 0.5, -0.3, 0.4])
    launches = []
    monkeypatch.setattr(_backend, "launch", lambda kernel, n, *a, launch=_backend.launch: (
        launches.append(n), launch(kernel, n, *a))[1])
    with installed(monkeypatch) as cp:
        # 256 samples: the simulator runs each thread in Python (~1 s per evaluation here)
        dev = LevelObjective(fixed, moving, None, mask, model=model, pre=None, metric="mi",
                             sampler=Sampler("random_coordinate", 256, shape), rng=np.random.default_rng(1),
                             device="cuda", image_gradient=image_gradient)
        dev.predraw([0])
        assert dev.on_device and not dev._device.fused  # the simulator's default: the array-module path
        x = dev.resident(p)
        out = []
        for fused in (False, True):
            dev._device.fused = fused
            dev.evaluate(x, 0)  # uploads the prior once
            start = cp.transfers.mark()
            value, grad = dev.evaluate(x, 0)
            reads = cp.transfers.between(start)
            assert len(reads) == 1 and reads[0][0] in ("scalar", "download"), reads  # the evaluation's one read
            out.append((value, grad.get() if kind == "bspline" else grad, dev.last_similarity, dev.last_valid))
        assert not cp.transfers.between(0, kinds=("implicit", "kernel_host_arg"))
    assert launches == [256] * 4  # two evaluations, two passes each, one thread per sample
    (value, grad, ncc, valid), (value_f, grad_f, ncc_f, valid_f) = out
    assert valid_f == valid < 1.0  # some samples left the moving image (or its mask)
    # the same formulas; atomic additions (and bincount, tree reductions) sum in other orders, so the two agree to
    # float64 rounding: 1e-12 relative leaves ~100x room (measured in the simulator: at most 6.2e-16 in the value,
    # 1.3e-14 of the largest gradient entry (affine 3-D), 2.1e-15 in the correlation; a GPU's atomics add in a
    # varying order, which changes the rounding, not its size)
    np.testing.assert_allclose(value_f, value, rtol=1e-12)
    np.testing.assert_allclose(grad_f, grad, rtol=0, atol=1e-12 * np.abs(grad).max())
    np.testing.assert_allclose(ncc_f, ncc, rtol=1e-12)


BSPLINE = {"grid_spacing": 6.0, "shrink_factors": (2, 1), "smoothing_sigmas": (1.0, 0.0), "iterations": (60, 60),
           "samples": 256, "folds": "compose", "bending_weight": 0.0}  # no penalty: its Gram matrices would add uploads


@pytest.mark.cudasim
@pytest.mark.parametrize("how,restart", [
    ("device", False), ("cupy_image", False), ("device", True),
    # the fused kernels of a GPU run (kernels/mattes_cuda.py), each thread in Python: 113 s in the simulator
    pytest.param("fused", False, marks=pytest.mark.slow),
])
def test_bspline_stays_on_device(monkeypatch, how, restart):
    """register_bspline(device="cuda") with fold-free pieces (Mattes MI, linear interpolation with the exact
    image gradient, ASGD): inside each level's iterations only scalar reads cross (the
    coefficients and gradients stay on the device), and it computes the CPU run. With ``restart`` every
    saturation check starts a new fold-free piece, which composes the map on the host. ``fused``: the evaluations
    in the fused numba.cuda kernels, as on a GPU (the simulator's default is the array-module path)."""
    from classreg.solvers.parametric import device, register
    from classreg.solvers.parametric.register import GAIN_DRAWS, RESTART_EVERY

    if restart:
        monkeypatch.setattr(register, "RESTART_SATURATION", 0.0)
    if how == "fused":
        monkeypatch.setattr(device, "fused_available", lambda: True)
        how = "device"
    fixed, moving = _rotated_pair(24, 6.0)
    cpu = cr.register_bspline(fixed, moving, **BSPLINE)
    with installed(monkeypatch) as cp:
        if how == "device":
            res, marks = run_counted(cp.transfers, cr.register_bspline, fixed, moving, device="cuda", **BSPLINE)
        else:
            res, marks = run_counted(cp.transfers, cr.register_bspline, fixed.to("cuda"), moving.to("cuda"),
                                     **BSPLINE)
    log = cp.transfers
    assert res.params["backend"] == "cuda"
    n_it = BSPLINE["iterations"][0]
    levels = [h["level"] if isinstance(h, dict) else h.level for h in res.history]
    assert levels == [0] * n_it + [1] * n_it and len(marks) == len(levels)
    assert res.metrics["pieces"] == cpu.metrics["pieces"] == (4 if restart else 2)
    for level in (0, 1):
        level_marks = [marks[i] for i, lv in enumerate(levels) if lv == level]
        # per iteration: the evaluation's one read (count, value, correlation, gradient norm, finiteness) and
        # ASGD's inner product of successive gradients; every RESTART_EVERY iterations the saturation of the
        # injectivity bound. A restart (a rare event: 0.1 % of the coefficients on the bound) brings the
        # coefficients down, composes the piece onto the map on the host and sends the new piece's zero
        # coefficients and the composed prior displacement up.
        piece = lambda r: r[0] in ("upload", "download") and any(
            f in r[2] for f in ("classreg/backend.py", "optimise/asgd.py", "parametric/device.py"))
        per_iteration = only_scalar_reads(log, level_marks, 2 + 1.0 / (RESTART_EVERY - 1),
                                          allowed=piece if restart else lambda r: False)
        # exactly: n_it - 1 evaluations and inner products between the level's first and last event, one
        # saturation check (after iteration RESTART_EVERY - 1), no inner product in the iteration after a restart
        assert per_iteration == (2 * (n_it - 1) + 1 - restart) / (n_it - 1)
        inside = log.between(level_marks[0], level_marks[-1], kinds=("upload", "download"))
        assert len(inside) == (3 if restart else 0), inside
    # outside the loops, per level: the moving stack, the ASGD scales, the pre-drawn samples (y, f), the gain
    # estimation's large draw (y, f), the level's starting coefficients and those of the gain's trial step (8), and
    # on the second fold-free level the prior go up; at the end the final metric's draw and coefficients (3); a
    # restart sends the new piece's coefficients and prior (2). The gain estimation's gradients (GAIN_DRAWS
    # stochastic, one on the large draw, one at the trial step) and the level's final coefficients come down (and
    # CuPy images come down once after their upload by Image.to)
    images = [fixed.data.size] * 2 if how == "cupy_image" else []
    assert len(log.between(0, kinds=("upload",))) == len(images) + 2 * 8 + 1 + 3 + 2 * 2 * restart
    sizes = [int(np.prod(g)) * 2 for g in res.metrics["grid_size"]]  # coefficients per level
    downloads = sorted(r[1] for r in log.between(0, kinds=("download",)))
    assert downloads == sorted(images + [n for n in sizes for _ in range(GAIN_DRAWS + 3 + restart)]), downloads
    # the same samples and formulas as on the CPU; each evaluation agrees to ~1e-15
    # (test_device_bspline_mi_matches_the_cpu_kernel) and 2 × 60 ASGD iterations amplify that: measured 2.2e-10 mm
    # in the coefficients (of up to 2.2 mm). 1e-6 mm is far below any registration error; in runs whose first ASGD
    # steps oscillate (no injectivity bound, a strong bending penalty) the rounding grows ~3x per iteration for a
    # while, as any change of rounding would on the CPU (docs/notes/gpu.md)
    for a, b in zip(_bspline_coefficients(res), _bspline_coefficients(cpu), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.warped.data), np.asarray(cpu.warped.data), rtol=0, atol=1e-5)
    np.testing.assert_allclose(res.metrics["metric"], cpu.metrics["metric"], rtol=1e-9)
    assert res.metrics["min_det"] > 0 and res.metrics["percent_det_nonpositive"] == 0


@pytest.mark.cudasim
def test_bspline_projected_folds_on_device(monkeypatch):
    """The default folds="project" on the device: between projections only scalar reads cross; each projection
    (every PROJECT_EVERY iterations) downloads the coefficients and, when it moved them, uploads the projected
    ones; the run is the CPU run and keeps the floor. The plain run's min det J is 0.77: a floor of 0.9 makes the
    projections act (large first steps that fold the grid make this tiny run chaotic: device and CPU part by
    millimetres even without projections)."""
    from classreg.solvers.parametric.folds import PROJECT_EVERY

    fixed, moving = _rotated_pair(24, 6.0)
    kw = dict(BSPLINE, folds="project", min_det_j=0.9, grid_spacing=3.0)
    cpu = cr.register_bspline(fixed, moving, **kw)
    assert cpu.metrics["fold_projections"] > 0
    with installed(monkeypatch) as cp:
        res, marks = run_counted(cp.transfers, cr.register_bspline, fixed, moving, device="cuda", **kw)
    assert res.params["backend"] == "cuda" and res.metrics["fold_projections"] == cpu.metrics["fold_projections"]
    n_it = kw["iterations"][0]
    levels = [h["level"] if isinstance(h, dict) else h.level for h in res.history]
    for level in (0, 1):
        level_marks = [marks[i] for i, lv in enumerate(levels) if lv == level]
        inside = cp.transfers.between(level_marks[0], level_marks[-1], kinds=("upload", "download"))
        downloads = [r for r in inside if r[0] == "download"]
        # one coefficient download per projection inside the level's iterations, an upload only when it moved them
        assert len(downloads) == (n_it - 1) // PROJECT_EVERY, inside
        assert len(inside) - len(downloads) <= len(downloads)
    for a, b in zip(_bspline_coefficients(res), _bspline_coefficients(cpu), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert res.metrics["min_det"] >= 0.9 and cpu.metrics["min_det"] >= 0.9


def _bspline_coefficients(res):
    parts = res.transform.transforms if hasattr(res.transform, "transforms") else [res.transform]
    return [np.asarray(t.coefficients) for t in parts if hasattr(t, "coefficients")]


@pytest.mark.cudasim
@pytest.mark.parametrize("kw", [{"metric": "ncc"}, {"optimiser": "rsgd"}, {"interpolation": "bspline3"}])
def test_bspline_not_covered_runs_on_the_cpu(monkeypatch, caplog, kw):
    """A register_bspline configuration the device path does not cover: device="cuda" (or CuPy images) logs one
    line and is the CPU run, bit for bit."""
    fixed, moving = _rotated_pair(16, 4.0)
    kw = dict(kw, grid_spacing=6.0, shrink_factors=(1,), smoothing_sigmas=(0.0,), iterations=(10,), samples=256)
    cpu = cr.register_bspline(fixed, moving, **kw)
    with installed(monkeypatch) as cp, caplog.at_level("INFO", logger="classreg"):
        res = cr.register_bspline(fixed, moving, device="cuda", **kw)
        on_device = cr.register_bspline(fixed.to("cuda"), moving.to("cuda"), **kw)
    assert caplog.text.count("register_bspline: the GPU path covers") == 2
    assert caplog.text.count("running on the CPU") == 2
    for r in (res, on_device):
        assert r.params["backend"] != "cuda"
        np.testing.assert_array_equal(np.asarray(r.warped.data), np.asarray(cpu.warped.data))
    assert [r[0] for r in cp.transfers.log if r[0] != "scalar"].count("download") == 2  # the CuPy images, once


def _counting_device_evaluations(monkeypatch, transfers):
    """Record every device evaluation of the parametric engine: ``(objective, k, drawn, start, stop)`` (the
    objective itself, which keeps it alive: an id could be reused by the next level's)."""
    from classreg.solvers.parametric.engine import LevelObjective

    calls = []
    evaluate = LevelObjective._evaluate_device

    def counted(obj, p, k, samples, penalty):
        start = transfers.mark()
        out = evaluate(obj, p, k, samples, penalty)
        calls.append((obj, k, samples is None, start, transfers.mark()))
        return out

    monkeypatch.setattr(LevelObjective, "_evaluate_device", counted)
    return calls


def _check_mi_refinement(log, calls, start):
    """register_rigid's MI refinement (register_affine's rigid stage, ASGD) after mark ``start``, its evaluations
    on the device: inside each level's iteration loop only the evaluation's result crosses."""
    levels = list(dict.fromkeys(c[0] for c in calls))
    assert len(levels) == 3  # register_affine's default pyramid (4, 2, 1)
    result_read = 3 + 2 + 4  # count, value, correlation, g, G (2-D)
    default_iterations = inspect.signature(cr.register_affine).parameters["iterations"].default
    for level, n_it in zip(levels, default_iterations, strict=True):
        loop = [c for c in calls if c[0] is level and c[2] and c[1] >= 0]  # ASGD's iterations
        assert [c[1] for c in loop] == list(range(n_it))
        inside = log.between(loop[0][3], loop[-1][4])
        # nothing but one read of 9 numbers per evaluation between the level's first and last iteration: the
        # samples were drawn before the loop (the CPU's sequence) and uploaded at once; the parameters and ASGD
        # stay on the host and enter the device operations as scalars
        assert inside == [("download", result_read, inside[0][2])] * len(loop), inside[:5]
    refinement = log.between(start)
    assert not [r for r in refinement if r[0] in ("implicit", "kernel_host_arg")]
    # per level: the moving stack, the pre-drawn samples (y, f) and the gain estimation's large draw (y, f); after
    # the last level the final metric's draw (y, f); otherwise only the evaluations' reads
    ups = [r for r in refinement if r[0] == "upload"]
    assert len(ups) == 5 * len(levels) + 2 and all("parametric" in r[2] for r in ups), ups
    assert all(r[0] in ("upload", "scalar") or r == ("download", result_read, r[2]) for r in refinement)


def _point_pair(m: int = 200):
    """A 2-D source contour (an asymmetric closed curve, mm) and its target: rotated by 12°, scaled, shifted, bent
    smoothly, reordered and jittered by 0.05 mm (fixed seed); also the true position of each source point."""
    rng = np.random.default_rng(3)
    th = np.linspace(0.0, 2.0 * np.pi, m, endpoint=False)
    rad = 8.0 + 2.5 * np.cos(3.0 * th) + 1.5 * np.sin(th)
    y = np.stack([rad * np.cos(th), 0.7 * rad * np.sin(th)], axis=1)
    a = np.deg2rad(12.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    x = 1.05 * y @ rot.T + np.array([1.5, -0.8])
    x[:, 1] += 0.8 * np.sin(x[:, 0] / 4.0)
    return y, x[::-1] + 0.05 * rng.standard_normal(x.shape), x  # source, target (reordered, noisy), truth


POINTS = {"max_iter": 25, "min_iter": 25, "estep": "exact"}


@pytest.mark.cudasim
@pytest.mark.parametrize("how", ["device", "cupy_points"])
def test_points_stay_on_device(monkeypatch, how):
    source, target, truth = _point_pair()
    cpu = cr.register_points(source, target, backend="numpy", **POINTS)
    with installed(monkeypatch) as cp:
        if how == "device":
            res, marks = run_counted(cp.transfers, cr.register_points, source, target, device="cuda", **POINTS)
        else:
            res, marks = run_counted(cp.transfers, cr.register_points, cp.asarray(source), cp.asarray(target),
                                     **POINTS)
    log = cp.transfers
    assert res.params["backend"] == "cuda"
    assert len(marks) == len(res.history) == POINTS["max_iter"]
    # per VB iteration (measured 15): N̂, σ̄², det of the Procrustes rotation, the scale, the three σ² sums, the
    # Cholesky check, the Procrustes finiteness check, the similarity figure (finiteness, 4 sums), the history's
    # rotation (2), mean displacement and translation
    only_scalar_reads(log, marks, 20)
    # the inputs once (CuPy points come down once, for the frame); before the loop the working sets x, y, the
    # posterior (ŷ, û, v̂, α, σ_m²), the kernel block and its fine part, the block's indices and the similarity's
    # subset go up once (measured 11 point-sized uploads); the result comes down once: ŷ, û, v̂, α, σ_m², the GP
    # coefficients and the kernel block (measured 7)
    m = len(source)
    before = [r[0] for r in log.between(0, marks[0], kinds=("upload", "download")) if r[1] >= m]
    own = before if how == "device" else before[4:]
    assert before[:4] == ["upload"] * 2 + ["download"] * 2 or how == "device", before
    assert own == ["upload"] * len(own) and len(own) <= 11, before
    after = log.between(marks[-1], kinds=("upload", "download"))
    assert all(r[0] == "download" for r in after) and len(after) <= 7, after
    # the same posterior as the numpy E-step on the CPU: the device run executes the same float64 array code, the
    # only differences are the Cholesky solves (LAPACK cho_solve vs two triangular solves) compounded over 25
    # iterations (measured 2e-12 mm); 1e-6 mm is far below the 0.05 mm noise of the points
    diff = np.abs(res.transform.map_points(target) - cpu.transform.map_points(target)).max()
    assert diff <= 1e-6, diff
    np.testing.assert_allclose(res.metrics["sigma_mm"], cpu.metrics["sigma_mm"], rtol=1e-8)
    # and it registered: σ fell from 4.8 mm to 0.15 mm and the source points land within 0.3 mm of their true
    # positions on average (measured 0.19 mm after these 25 iterations; contour point spacing 0.26 mm)
    err = np.linalg.norm(res.inverse.map_points(source) - truth, axis=1).mean()
    assert res.metrics["sigma_mm"] < 0.3 and res.history[0]["sigma"] > 4.0 and err < 0.3, (
        res.history[0]["sigma"], res.metrics["sigma_mm"], err)


@pytest.mark.cudasim
def test_points_estep_on_device_arrays_without_transfers(monkeypatch):
    # the E-step sums of register_points (the array code of kernels/points.py, run by CuPy on the device) on device
    # arrays: device results, nothing copied, the numpy reference's sums bit for bit (the same operations)
    from classreg.kernels.points import estep

    rng = np.random.default_rng(5)
    x, y, b = rng.standard_normal((90, 3)), rng.standard_normal((70, 3)), rng.uniform(0.5, 1.0, 70) / 70
    ref = estep(x, y, b, 0.3, 1e-3, truncation=1e-12, backend="numpy")
    with installed(monkeypatch) as cp:
        dev_in = [cp.asarray(a) for a in (x, y, b)]
        start = cp.transfers.mark()
        out = estep(*dev_in, 0.3, 1e-3, truncation=1e-12, backend="cuda")
        assert not cp.transfers.between(start), cp.transfers.between(start)
        for r, o in zip(ref, out):
            assert isinstance(o, DeviceArray)
            np.testing.assert_array_equal(o.get(), r)


@pytest.mark.cudasim
def test_cli_device_cuda_runs_rigid_on_the_device(monkeypatch, tmp_path):
    cpu, gpu = _cli_on_cpu_and_device(monkeypatch, tmp_path, "rigid", *_rotated_pair(),
                                      ["--shrink-factors", "2", "1", "--smoothing-sigmas", "1", "0.5", "--samples",
                                       "12", "4", "--perturbation", "5", "--keep", "2", "--local-refine", "none"])
    # as in test_rigid_stays_on_device: the same candidates win, the sub-voxel fit moves by far less than 1e-3 mm
    np.testing.assert_allclose(gpu.transform.matrix, cpu.transform.matrix, atol=1e-6)
    np.testing.assert_allclose(gpu.transform.translation, cpu.transform.translation, atol=1e-3)


@pytest.mark.cudasim
def test_cli_device_cuda_runs_points_on_the_device(monkeypatch, tmp_path):
    from classreg.cli import main

    source, target, _ = _point_pair()
    np.savetxt(tmp_path / "s.csv", source, delimiter=",")
    np.savetxt(tmp_path / "t.csv", target, delimiter=",")
    args = ["register", "points", str(tmp_path / "s.csv"), str(tmp_path / "t.csv"), "--max-iter", "10",
            "--min-iter", "10", "--estep", "exact", "--backend", "numpy", "--quiet", "--no-qc"]
    with installed(monkeypatch) as cp:
        assert main(args + ["-o", str(tmp_path / "gpu"), "--device", "cuda"]) == 1  # the numpy backend is refused
        assert main(args[:-4] + ["--quiet", "--no-qc", "-o", str(tmp_path / "gpu"), "--device", "cuda"]) == 0
        assert not cp.transfers.between(0, kinds=("implicit", "kernel_host_arg"))
        assert cp.transfers.between(0, kinds=("upload",))  # it did run on the stand-in device
    assert main(args + ["-o", str(tmp_path / "cpu")]) == 0
    import json

    cpu, gpu = ({k: json.loads((tmp_path / d / "params.json").read_text())[k] for k in ("device", "backend")}
                for d in ("cpu", "gpu"))
    assert gpu == {"device": "cuda", "backend": "cuda"} and cpu["backend"] == "numpy", (gpu, cpu)
    # as in test_points_stay_on_device: the same float64 array code as the numpy backend (the CSV holds 9 digits)
    moved = [np.loadtxt(tmp_path / d / "moved_source.csv", delimiter=",") for d in ("cpu", "gpu")]
    diff = np.abs(moved[0] - moved[1]).max()
    assert moved[0].shape == source.shape and diff <= 1e-6, diff


def test_pcg_on_device_matches_the_numba_kernel_with_few_scalar_reads(monkeypatch, rng):
    # the fine v-update's conjugate gradients on the device (kernels/cg.py pcg_csr_device, a cupyx CSR matrix) run
    # the numba kernel's recurrences with its per-column stopping (a stopped column is masked, so checking for "all
    # stopped" every 5 steps changes nothing); columns of very different scale stop at different steps
    import scipy.sparse as sp
    from classreg.kernels.cg import pcg_csr, pcg_csr_device

    m = 300
    A = sp.random(m, m, density=0.03, random_state=np.random.RandomState(1))
    G = (A @ A.T + sp.eye(m) * 0.1).tocsr()  # symmetric positive definite, sparse
    s = rng.uniform(0.0, 1.5, m)
    s[:5] = 0.0  # points without weight (ν = 0), as in the fine v-update
    c = 0.3
    dinv = 1.0 / (s * s * G.diagonal() + c)
    rhs = rng.normal(size=(m, 3))
    rhs[:, 1] *= 1e-3
    rhs[:, 2] = rhs[:, 0] + 0.01 * rng.normal(size=m)
    for tol, max_iter in ((1e-4, 50), (1e-8, 50), (1e-4, 7)):  # converged, step cap, step cap before a check
        Z = np.full_like(rhs, 0.1)  # a warm start, as the solver's
        steps = pcg_csr(G.indptr, G.indices, G.data, s, c, dinv, rhs, Z, tol=tol, max_iter=max_iter)
        with installed(monkeypatch) as cp:
            from cupyx.scipy.sparse import csr_matrix

            dev = [csr_matrix(G)] + [cp.asarray(a) for a in (s, dinv, rhs)]
            Zd = cp.full(rhs.shape, 0.1)
            start = cp.transfers.mark()
            steps_d = pcg_csr_device(*dev[:2], c, *dev[2:], Zd, tol=tol, max_iter=max_iter, check_every=5)
            inside = cp.transfers.between(start)
            steps_d, Zd = int(steps_d), Zd.get()
        # only the "all columns stopped" checks: one scalar read at steps 0, 5, 10, ... (at most ceil(max_iter / 5))
        assert {r[0] for r in inside} == {"scalar"} and len(inside) <= -(-max_iter // 5), inside
        # the same recurrences: only the summation order of the dot products may differ (measured: bit for bit)
        assert steps_d == steps
        np.testing.assert_allclose(Zd, Z, rtol=1e-10, atol=1e-13 * np.abs(Z).max())


@pytest.mark.cudasim
def test_points_low_rank_fine_scale_stays_on_device(monkeypatch):
    # a low-rank coarse kernel with the fine scale (rank=20 here; the default above the full-rank size, e.g. on
    # fsaverage5): the fine v-update's CSR matrix goes up once (cupyx.scipy.sparse) and its conjugate gradients run
    # on the device; the loop reads only scalars, and the result is the numpy-backend one
    source, target, truth = _point_pair()
    kw = dict(POINTS, rank=20)
    cpu = cr.register_points(source, target, backend="numpy", **kw)
    with installed(monkeypatch) as cp:
        res, marks = run_counted(cp.transfers, cr.register_points, source, target, device="cuda", **kw)
    log = cp.transfers
    assert res.params["backend"] == "cuda" and "fine sparse" in res.params["rank"][0], res.params["rank"]
    assert res.metrics["fine_cg_steps"] > 0  # the fine scale was active (from iteration 14 here; 155 CG steps)
    # per VB iteration: the ≤ 20 of test_points_stay_on_device and the CG's "all columns stopped" checks, at most
    # ceil(CG_MAX_ITER / CG_CHECK_EVERY) = 10 per fine v-update (measured 16.6 on average, 38 CG checks in all)
    only_scalar_reads(log, marks, 30)
    # before the loop, point-sized uploads only: x, y, the posterior, the Nyström factor Q (and Q32), the indices,
    # the similarity's subset and the fine CSR matrix once (measured 12); after it the posterior, the coefficients
    # (coarse and fine) and Q come down once (measured 11); the fine matrix stays (its host copy is kept)
    m = len(source)
    before = [r for r in log.between(0, marks[0], kinds=("upload", "download")) if r[1] >= m]
    assert {r[0] for r in before} == {"upload"} and len(before) <= 13, before
    after = log.between(marks[-1], kinds=("upload", "download"))
    assert {r[0] for r in after} == {"download"} and len(after) <= 12, after
    # the same float64 code as the CPU run; the CG's per-column stopping test compares a residual with 1e-4 × the
    # right-hand side, and the Woodbury solves' rounding (LAPACK cho_solve vs two triangular solves, ~1e-13) can move
    # a residual sitting at that boundary across it: one CG step more or less in a solve changes it by ≲ CG_TOL of
    # the fine displacement. Measured 1.4e-5 mm (σ 9e-7 relative, at the last iteration); 1e-3 mm and 1e-5 are far
    # below the points' 0.05 mm noise and σ's 0.02 mm
    diff = np.abs(res.inverse.map_points(source) - cpu.inverse.map_points(source)).max()
    assert diff <= 1e-3, diff
    np.testing.assert_allclose(res.metrics["sigma_mm"], cpu.metrics["sigma_mm"], rtol=1e-5)
    err = np.linalg.norm(res.inverse.map_points(source) - truth, axis=1).mean()
    assert err < 0.3, err  # and it registered (measured as the CPU run)


# ------------------------------------------------------------------------------------ LDDMM kernels (gpu-a, issue #26)
# The CUDA paths of the kernels the band-limited LDDMM shooting calls: linear sampling with its gradient, its
# transpose (an atomic scatter) and the fused map tracing with its reverse sweep (kernels/adjoint.py, epdiff.py);
# and of the full-grid engine's adjoint pieces (the numpy references run as array-module code on the device).


def _lddmm_kernel_calls(rng, nd):
    from classreg.kernels.adjoint import sample_linear, splat_linear
    from classreg.kernels.epdiff import trace_back, trace_back_adjoint

    shape = (9, 7, 6)[:nd]
    img = rng.standard_normal(shape + (nd,)).astype(np.float32)
    scalar = rng.standard_normal(shape).astype(np.float32)
    # points inside, on and beyond the border (clamped), and on integer nodes
    pts = (rng.random((60, nd)) * (np.array(shape) + 1) - 1).astype(np.float32)
    pts[:5] = np.round(pts[:5])
    vals = rng.standard_normal((60, nd)).astype(np.float32)
    w = (0.4 * rng.standard_normal((3,) + shape + (nd,))).astype(np.float32)
    _, zs = trace_back(w, pts, 1 / 3, positions=True, backend="numpy")
    from classreg.kernels.adjoint import (
        add_sample_adjoint,
        det_cofactor,
        gradient_transpose,
        momentum_adjoint,
        velocity_adjoint,
    )

    h = (1.0, 1.2, 0.9)[:nd]
    u = (0.3 * rng.standard_normal(shape + (nd,))).astype(np.float32)
    du = rng.standard_normal(shape + (nd, nd)).astype(np.float32)
    ds = rng.standard_normal(shape + (2, nd)).astype(np.float32)
    gc = rng.standard_normal(shape + (2, nd)).astype(np.float32)
    # the kernels of the full-grid engine (their CUDA path is the numpy reference as array-module code)
    full_grid = [
        ("gradient_transpose", lambda be, g, wt: gradient_transpose(g, spacing=h, weight=wt, backend=be), (u, scalar)),
        ("gradient_transpose_channels", lambda be, g: gradient_transpose(g, spacing=h, ndim=nd, backend=be), (gc,)),
        ("det_cofactor", lambda be, a: det_cofactor(a, backend=be), (u,)),
        ("velocity_adjoint", lambda be, a, b: velocity_adjoint(a, b, [-0.1, 0.2, 0.3][:nd], backend=be), (u, du)),
        ("momentum_adjoint", lambda be, g, m, d, q: momentum_adjoint(g, m, d, q, backend=be), (u, img, scalar, scalar)),
        ("add_sample_adjoint", lambda be, a, q, i, d: add_sample_adjoint(a.copy(), q, i, d, backend=be),
         (u, scalar, scalar, ds)),
    ]
    return full_grid + [
        ("sample", lambda be, a, p: sample_linear(a, p, backend=be), (scalar, pts)),
        ("sample_gradient", lambda be, a, p: sample_linear(a, p, gradient=True, backend=be), (img, pts)),
        ("splat", lambda be, v, p: splat_linear(v, p, shape, backend=be), (vals, pts)),
        ("trace_back", lambda be, ww, p: trace_back(ww, p, 1 / 3, positions=True, backend=be), (w, pts)),
        ("trace_back_adjoint", lambda be, ww, z, zb: trace_back_adjoint(ww, z, zb, 1 / 3, backend=be),
         (w, zs, vals)),
    ]


@pytest.mark.cudasim
@pytest.mark.parametrize("nd", [2, 3])
def test_jacobian_norm_max_on_device_reads_one_scalar(monkeypatch, nd):
    from classreg.kernels.adjoint import jacobian_norm_max

    v = np.random.default_rng(5).standard_normal((9, 7, 6)[:nd] + (nd,)).astype(np.float32)
    with installed(monkeypatch) as cp:
        dv = cp.asarray(v)
        start = cp.transfers.mark()
        got = jacobian_norm_max(dv, spacing=(1.0, 1.2, 0.9)[:nd])
        assert [r[0] for r in cp.transfers.between(start)] == ["scalar"]
    assert got == jacobian_norm_max(v, spacing=(1.0, 1.2, 0.9)[:nd], backend="numpy")


@pytest.mark.cudasim
@pytest.mark.parametrize("nd", [2, 3])
def test_lddmm_kernels_on_device_match_the_reference(monkeypatch, nd):
    # on device arrays each kernel returns device arrays and copies nothing, and agrees with the numpy reference:
    # the gathers to float32 rounding of the same arithmetic (rtol 1e-6 covers the compiled vs numpy evaluation
    # order), the scatters to 1e-5 of the values' scale (atomic additions in a varying order: a few float32 ulps of
    # sums of ≤ 2^nd · 60 terms of magnitude ≤ ~3)
    calls = _lddmm_kernel_calls(np.random.default_rng(11), nd)
    with installed(monkeypatch) as cp:
        for name, call, inputs in calls:
            ref = call("numpy", *inputs)
            dev_in = [cp.asarray(a) for a in inputs]
            start = cp.transfers.mark()
            dev = call(None, *dev_in)  # the backend follows the data
            if name != "velocity_adjoint":
                moved = cp.transfers.between(start, kinds=("upload", "download", "kernel_host_arg", "implicit"))
                assert not moved, (name, moved)
            ref, dev = (ref, dev) if isinstance(ref, tuple) else ((ref,), (dev,))
            if name == "velocity_adjoint":  # its d coefficients go up as scalars (what a kernel argument is)
                assert not [r for r in cp.transfers.between(start) if r[0] != "scalar" or r[1] > nd], name
            for r, d in zip(ref, dev):
                assert isinstance(d, DeviceArray), name
                tol = 1e-5 if name in ("splat", "trace_back_adjoint") else 1e-6
                np.testing.assert_allclose(d.get(), r, rtol=tol, atol=tol, err_msg=name)


# ------------------------------------------------------------------------------------ register_lddmm (gpu-a, issue #26)
LDDMM = {"shrink_factors": (2, 1), "iterations": (3, 3), "intensity": "joint"}


@pytest.mark.cudasim
@pytest.mark.parametrize("how,metric", [
    ("device", "ssd"),
    ("cupy_image", "ssd"),  # CuPy-backed images with device=None run on their device
    ("device", "lncc"),  # with masks too
])
def test_lddmm_stays_on_device(monkeypatch, how, metric):
    # the default (band-limited) engine on a 16² phantom: pyramid, shootings, adjoint sweeps, cupy.fft transforms,
    # data term, L-BFGS vectors and fold checks on the stand-in device
    fixed, moving = _phantom(2, 16)
    kw = dict(LDDMM, metric=metric)
    if metric == "lncc":
        mask = np.ones(fixed.shape, dtype=bool)
        mask[0] = False
        kw.update(fixed_mask=mask, moving_mask=mask[::-1].copy())
    cpu = cr.register_lddmm(fixed, moving, **kw)
    with installed(monkeypatch) as cp:
        if how == "device":
            res, marks = run_counted(cp.transfers, cr.register_lddmm, fixed, moving, device="cuda", **kw)
        else:
            res, marks = run_counted(cp.transfers, cr.register_lddmm, fixed.to("cuda"), moving.to("cuda"), **kw)
    log = cp.transfers
    assert res.params["backend"] == "cuda"
    assert len(marks) == len(res.history) == sum(kw["iterations"])  # both levels ran all their iterations
    # nothing but scalar reads inside the loop, no implicit conversion anywhere. Per iteration: the L-BFGS two-loop
    # recursion reads ~2 numbers per stored pair (memory 10) plus the directional derivatives; each evaluation
    # (1-3 per iteration with the backtracking) reads the stability number (one read for all time steps), the
    # smallest det J, ½‖v₀‖² and the data term (LNCC: the mask's voxel count, the moving-mask test and the kernel's
    # sums too), and the progress event the similarity. Measured 17.2 (SSD) and 25.2 (LNCC) on this phantom; the
    # bound 48 leaves room for iterations with more backtracking steps; an array copy of even 9 values fails
    only_scalar_reads(log, marks, 48)
    # the inputs once: the normalised fixed image, I₀ (and the masks) go up before the loop (CuPy images come down
    # once first, for the intensity normalisation); the only other uploads are the pyramid's smoothing taps (once per
    # σ, as for demons); the shooters' constants are built on the device
    voxels = fixed.data.size
    before = log.between(0, marks[0], kinds=("upload", "download"))
    ups = ["upload"] * (4 if metric == "lncc" else 2)
    images = [r[0] for r in before if r[1] >= voxels]
    assert images == {"device": ups, "cupy_image": ["upload"] * 2 + ["download"] * 2 + ups}[how], before
    assert all("kernels/smooth.py" in r[2] for r in before if r[1] < voxels), before
    # the result once: φ₁⁻¹, φ₁ and the velocity coefficients z
    after = log.between(marks[-1], kinds=("upload", "download"))
    assert [r[0] for r in after] == ["download"] * 3, after
    # the CPU run's registration: cupy.fft (here numpy.fft) instead of pocketfft and the GPU sampling kernels round
    # differently in the last float32 bit, which the L-BFGS iterations carry along (measured 1.6e-6 mm SSD, 1.5e-6 mm
    # LNCC; SSD after within 2e-6 relative); 1e-4 mm is 1/10 000 of a voxel
    diff = np.abs(res.transform.image.numpy() - cpu.transform.image.numpy()).max()
    assert diff <= 1e-4, diff
    np.testing.assert_allclose(res.metrics["ssd_after"], cpu.metrics["ssd_after"], rtol=1e-3)
    assert res.metrics["min_det"] > 0 and res.metrics["iterations"] == cpu.metrics["iterations"]
    # and it registered: the SSD of the normalised intensities at least halved
    assert res.metrics["ssd_after"] < 0.5 * res.metrics["ssd_before"]


def test_lddmm_device_cpu_brings_cupy_images_to_the_host_and_trajectories_are_refused_on_the_device(monkeypatch):
    fixed, moving = _phantom(2, 12)
    kw = dict(LDDMM, iterations=(2, 1), metric="ssd")
    ref = cr.register_lddmm(fixed, moving, **kw)
    with installed(monkeypatch) as cp:
        f_dev, m_dev = fixed.to("cuda"), moving.to("cuda")
        start = cp.transfers.mark()
        res = cr.register_lddmm(f_dev, m_dev, device="cpu", **kw)
        assert [r[0] for r in cp.transfers.between(start) if r[1] >= fixed.data.size] == ["download"] * 2
        # the trajectory has no device path: refused before any work
        with pytest.raises(ValueError, match="return_trajectory"):
            cr.register_lddmm(f_dev, m_dev, **kw, return_trajectory=True)
        with pytest.raises(ValueError, match="return_trajectory"):
            cr.register_metamorphosis(f_dev, m_dev, **kw, return_trajectory=True)
    assert res.params["backend"] == ref.params["backend"] != "cuda"
    np.testing.assert_array_equal(res.warped.numpy(), ref.warped.numpy())
    assert res.metrics["ssd_after"] == ref.metrics["ssd_after"]


@pytest.mark.cudasim
def test_cli_device_cuda_runs_lddmm_on_the_device(monkeypatch, tmp_path):
    cpu, gpu = _cli_on_cpu_and_device(monkeypatch, tmp_path, "lddmm", *_phantom(2, 12),
                                      ["--shrink-factors", "2", "1", "--iterations", "2", "1", "--metric", "ssd",
                                       "--intensity", "joint"])
    diff = np.abs(gpu.transform.image.numpy() - cpu.transform.image.numpy()).max()
    assert diff <= 1e-4, diff  # as in test_lddmm_stays_on_device


@pytest.mark.cudasim
@pytest.mark.parametrize("solver,how", [
    ("lddmm_full", "device"),  # register_lddmm(method="full")
    ("metamorphosis", "device"),  # with a lesion mask (the grown schedule: 11 frames)
    pytest.param("metamorphosis", "cupy_image", marks=pytest.mark.slow),  # ~20 s in the simulator
])
def test_full_grid_engine_stays_on_device(monkeypatch, solver, how):
    # the full-grid engine: shootings of P₀ with the semi-Lagrangian scheme (and metamorphosis' intensity source),
    # their adjoint sweeps, the Gaussian kernel K, the mask weights, L-BFGS, on the stand-in device (12² phantom)
    fixed, moving = _phantom(2, 12)
    kw = dict(LDDMM, metric="ssd", iterations=(2, 2), n_steps=4)  # the simulator runs every GPU thread in Python
    if solver == "lddmm_full":
        run, kw["method"] = cr.register_lddmm, "full"
    else:
        lesion = np.zeros(fixed.shape, dtype=bool)
        lesion[4:8, 4:8] = True
        run, kw["mask"] = cr.register_metamorphosis, lesion
    cpu = run(fixed, moving, **kw)
    with installed(monkeypatch) as cp:
        if how == "device":
            res, marks = run_counted(cp.transfers, run, fixed, moving, device="cuda", **kw)
        else:
            res, marks = run_counted(cp.transfers, run, fixed.to("cuda"), moving.to("cuda"), **kw)
    log = cp.transfers
    assert res.params["backend"] == "cuda"
    assert len(marks) == len(res.history) == sum(kw["iterations"])
    inside = log.between(marks[0], marks[-1])
    # inside the loop: scalar reads, and on the second level the taps of K's Gaussian FIR for the level's σ in
    # voxels (one array of 2·⌈4σ⌉+1 numbers per axis, ≤ 64 here; on a GPU a copy of a few hundred bytes, like a
    # kernel's arguments) -- no image-sized array, no implicit conversion anywhere. Scalar reads per iteration:
    # per shot the largest step and the stability number of every time step (2-8 steps), ½⟨m₀, Km₀⟩ and the data
    # term, plus L-BFGS's inner products and the similarity; measured 25.0 (LDDMM) and 26.7 (metamorphosis), bound 48
    taps = [r for r in inside if r[0] == "upload" and "kernels/smooth.py" in r[2] and r[1] <= 64]
    assert len(taps) <= 2 * fixed.ndim, taps
    only_scalar_reads(log, marks, 48, allowed=lambda r: r in taps)
    # the inputs once: the normalised images (and the mask schedule's frames) before the loop
    voxels = fixed.data.size
    before = log.between(0, marks[0], kinds=("upload", "download"))
    frames = 0 if solver == "lddmm_full" else res.extras["mask_frames"].data.shape[-1]
    ups = ["upload"] * (2 + frames)
    images = [r[0] for r in before if r[1] >= voxels]
    assert images == {"device": ups, "cupy_image": ["upload"] * 2 + ["download"] * 2 + ups}[how], before
    assert all("kernels/smooth.py" in r[2] for r in before if r[1] < voxels), before
    # the result once: downloads only after the last iteration, each array of the result once (LDDMM: φ₁⁻¹, φ₁, P₀;
    # metamorphosis also I₁, R₁, the residuals z_t, the 5 trajectory images)
    after = log.between(marks[-1], kinds=("upload", "download"))
    assert {r[0] for r in after} == {"download"}, after
    assert len(after) == (3 if solver == "lddmm_full" else 11), after
    # the CPU run's registration (the GPU path smooths with the FIR where small CPU grids use the equal FFT
    # operator, ~1e-6 relative, and the scatters add in another order; measured 1.8e-7 mm): 1e-4 mm
    diff = np.abs(res.transform.image.numpy() - cpu.transform.image.numpy()).max()
    assert diff <= 1e-4, diff
    np.testing.assert_allclose(res.metrics["ssd_after"], cpu.metrics["ssd_after"], rtol=1e-3)
    assert res.metrics["iterations"] == cpu.metrics["iterations"] and res.metrics["min_det"] > 0
    assert res.metrics["ssd_after"] < 0.5 * res.metrics["ssd_before"]
    if solver == "metamorphosis":
        np.testing.assert_allclose(res.extras["added_intensity"].numpy(), cpu.extras["added_intensity"].numpy(),
                                   atol=1e-4)


# ---------------------------------------------------------------------------------------------- register_vp (issue #26)
# regrid_det 0.9 makes the coarse level regrid (rounds composed, Newton inverses per round) and the fine level start
# from the coarse rounds' transfer: every part of the VP loop runs (with the paper's controls, control_sigma 0; the
# smoothed controls' updates keep det J above 0.9 here, so the preconditioned run is checked without regrids)
VP = {"shrink_factors": (2, 1), "iterations": (4, 3), "regrid_det": 0.9, "control_sigma": 0.0}


@pytest.fixture
def shared_lbfgs_on_the_cpu(monkeypatch):
    """The CPU run with the L-BFGS the device uses (classreg.optimise.minimise instead of scipy's L-BFGS-B)."""
    import classreg.solvers.vp.register as vp

    monkeypatch.setattr(vp, "HOST_OPTIMISER", "shared")


@pytest.mark.cudasim
@pytest.mark.parametrize("how,masked,sigma", [
    ("device", False, 0.0),
    ("device", False, 1.0),  # the Gaussian preconditioner of the controls on the device
    pytest.param("cupy_image", True, 0.0, marks=pytest.mark.slow),  # CuPy images with device=None, and a mask; 12 s
])
def test_vp_stays_on_device(monkeypatch, how, masked, sigma):
    fixed, moving = _phantom(2, 12)
    kw = dict(VP, control_sigma=sigma)
    if masked:
        mask = np.ones(fixed.shape, dtype=bool)
        mask[:2] = False
        kw.update(fixed_mask=mask)
    scipy_cpu = cr.register_vp(fixed, moving, **kw)
    import classreg.solvers.vp.register as vp

    monkeypatch.setattr(vp, "HOST_OPTIMISER", "shared")
    cpu = cr.register_vp(fixed, moving, **kw)
    with installed(monkeypatch) as cp:
        if how == "device":
            res, marks = run_counted(cp.transfers, cr.register_vp, fixed, moving, device="cuda", **kw)
        else:
            res, marks = run_counted(cp.transfers, cr.register_vp, fixed.to("cuda"), moving.to("cuda"), **kw)
    log = cp.transfers
    assert res.params["backend"] == "cuda"
    assert len(marks) == len(res.history) == sum(kw["iterations"]) and (res.metrics["regrids"] >= 1 or sigma > 0)
    # nothing but scalar reads inside the loop (the regrids, the per-round Newton inverses and the level transfer
    # included), no implicit conversion anywhere. Per iteration: the two-loop recursion's inner products (~2 per
    # stored pair), per evaluation the loss, min det J of the round's map and of the composed one, per iteration
    # the progress similarity; per round the "is Φ_total the identity" test and the Newton inversions' residual
    # reads (the two inversions of each round and of the level transfer, ~20 reads each, spread over the 7
    # iterations here). Measured 31.3 (device) and 31.0 (masked); bound 48 as for LDDMM. (On a GPU the Newton
    # iterations' active-set sizes are one more synchronisation each, which the stand-in does not count.)
    only_scalar_reads(log, marks, 48)
    # the inputs once: the normalised fixed image and the moving image on the fixed grid (and the mask) go up
    # (CuPy images come down once first, for the intensity normalisation); the rest before the loop is the
    # pyramid's smoothing taps
    voxels = fixed.data.size
    before = log.between(0, marks[0], kinds=("upload", "download"))
    ups = ["upload"] * (3 if masked else 2)
    images = [r[0] for r in before if r[1] >= voxels]
    assert images == {"device": ups, "cupy_image": ["upload"] * 2 + ["download"] * 2 + ups}[how], before
    assert all("kernels/smooth.py" in r[2] for r in before if r[1] < voxels), before
    # the result once: φ, the composed inverse, Φ_total on the padded grid and the controls f, g
    after = log.between(marks[-1], kinds=("upload", "download"))
    assert [r[0] for r in after] == ["download"] * 5, after
    # the CPU run with the same L-BFGS: the device's DST-I by FFT, its array-module warp and its det J kernel round
    # differently in the last float64/float32 bits, which the iterations carry along (measured 1.8e-7 mm here);
    # 1e-4 mm is 1/10 000 of a voxel
    for a, b in ((res.transform, cpu.transform), (res.inverse, cpu.inverse)):
        diff = np.abs(a.image.numpy() - b.image.numpy()).max()
        assert diff <= 1e-4, diff
    np.testing.assert_allclose(res.metrics["loss_ratio"], cpu.metrics["loss_ratio"], rtol=1e-4)
    assert res.metrics["regrids"] == cpu.metrics["regrids"]
    # and against the default CPU run (scipy's L-BFGS-B): a different line search, so a different path, but as
    # good a registration (measured loss ratio 0.051 vs 0.063, masked 0.049 vs 0.055) and no folds
    assert res.metrics["loss_ratio"] <= 1.2 * scipy_cpu.metrics["loss_ratio"] < 0.1
    assert res.metrics["min_det_j"] > kw.get("det_floor", vp.DET_FLOOR) and res.metrics["pct_det_j_nonpositive"] == 0


def test_vp_kernels_on_device_match_the_reference(monkeypatch):
    # the VP loss and gradient (DST-I Poisson solves by cupy.fft, array-module warp) and the Newton inverse on
    # device arrays return device arrays without copying anything but scalars, and equal the numpy path to float64
    # rounding (the DST-I by FFT vs scipy's: 1e-12 of the values' scale)
    from classreg.kernels.vp import invert_newton, vp_loss_grad

    rng = np.random.default_rng(3)
    for shape in ((14, 12), (8, 9, 7)):
        nd = len(shape)
        h = (1.0, 1.2, 0.9)[:nd]
        fhat = 0.7 + 0.05 * rng.standard_normal(shape)
        g = 0.05 * rng.standard_normal(shape if nd == 2 else shape + (3,))
        fixed, moving = rng.random(shape), rng.random(shape)
        ref = vp_loss_grad(fhat, g, fixed, moving, 0.5, h, backend="numpy")
        u = ref[3]
        inv_ref, info_ref = invert_newton(u, spacing=h, tol=1e-6, backend="numpy")
        with installed(monkeypatch) as cp:
            args = [cp.asarray(a) for a in (fhat, g, fixed, moving, u)]
            start = cp.transfers.mark()
            dev = vp_loss_grad(*args[:4], 0.5, h)
            inv, info = invert_newton(args[4], spacing=h, tol=1e-6)
            moved = cp.transfers.between(start, kinds=("upload", "download", "implicit", "kernel_host_arg"))
            assert not moved, moved
            assert all(isinstance(a, DeviceArray) for a in (*dev[1:], inv))
            np.testing.assert_allclose(dev[0], ref[0], rtol=1e-12)
            for a, b in zip(dev[1:], ref[1:]):
                np.testing.assert_allclose(a.get(), b, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(inv.get(), inv_ref, atol=1e-10)
            assert info["iterations"] == info_ref["iterations"]


def test_vp_device_cpu_brings_cupy_images_to_the_host(monkeypatch):
    fixed, moving = _phantom(2, 12)
    kw = {"shrink_factors": (1,), "iterations": (3,)}
    ref = cr.register_vp(fixed, moving, **kw)
    with installed(monkeypatch) as cp:
        f_dev, m_dev = fixed.to("cuda"), moving.to("cuda")
        start = cp.transfers.mark()
        res = cr.register_vp(f_dev, m_dev, device="cpu", **kw)
        assert [r[0] for r in cp.transfers.between(start) if r[1] >= fixed.data.size] == ["download"] * 2
    assert res.params["backend"] == ref.params["backend"] != "cuda"
    np.testing.assert_array_equal(res.transform.image.numpy(), ref.transform.image.numpy())


@pytest.mark.cudasim
def test_cli_device_cuda_runs_vp_on_the_device(monkeypatch, tmp_path, shared_lbfgs_on_the_cpu):
    cpu, gpu = _cli_on_cpu_and_device(monkeypatch, tmp_path, "vp", *_phantom(2, 12),
                                      ["--shrink-factors", "2", "1", "--iterations", "3", "2"])
    diff = np.abs(gpu.transform.image.numpy() - cpu.transform.image.numpy()).max()
    assert diff <= 1e-4, diff  # as in test_vp_stays_on_device
