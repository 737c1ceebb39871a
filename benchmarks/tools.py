"""The tools the harness runs: classreg's solvers and the peers, each reduced to one function.

A tool function gets the loaded case (``benchmarks.cases.load_case``), the thread count and the quick flag, and
returns ``{"seconds": wall time of the registration call only, "transform": classreg Transform fixed → moving}`` for
image cases or ``{"seconds": ..., "mapped": source points moved onto the target}`` for point cases, plus the settings
it used under ``"params"``.

Peers' outputs are converted to classreg transforms without trusting any of their conventions: the tool's own
resampler warps *coordinate images* (the world coordinates of the moving grid, plus ``OFFSET`` so that samples from
outside the moving image are recognisable), which gives T(x) at every fixed voxel (``field_from_coordinates``). This
conversion is tested in tests/test_benchmarks.py against known transforms.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: added to coordinate images: a tool that samples outside the moving image returns 0 (or a blend with 0), which
#: maps far outside every image (background), and such voxels are flagged invalid for the Jacobian statistics
OFFSET = 10000.0


@dataclass(frozen=True)
class Tool:
    name: str
    kind: str | tuple  # the case kind(s) it runs on: "deformable", "rigid", "affine" or "points"
    label: str
    run: Callable
    requires: tuple = ()  # importable modules
    distributions: tuple = ()  # installed distributions (when the module name does not tell, e.g. itk-elastix)
    executables: tuple = ()  # programs on PATH
    classreg_api: tuple = ()  # public classreg functions the tool calls (skipped with a note while they are missing)
    default: bool = True  # in the default tool list
    classreg: bool = False
    quick: bool = True  # a classreg tool that ``--quick`` runs (the smoke test)
    slow_3d: str = ""  # why the tool is skipped on 3-D cases unless --slow is given ("" = never skipped)
    excludes: dict = field(default_factory=dict)  # case name -> why the tool is not run on it
    show_params: bool = False  # list the run's settings under the case's table
    params: dict = field(default_factory=dict)
    sweep_of: tuple = ()  # (base tool, parameter, factor): a point of the base tool's regularisation sweep
    device: str = "cpu"  # "cuda": a GPU row (device_tools), skipped with a note where no GPU is usable
    device_of: str = ""  # a GPU row's CPU tool (its time ratio is against that row)

    @property
    def kinds(self) -> tuple:
        return (self.kind,) if isinstance(self.kind, str) else tuple(self.kind)

    def handles(self, kind: str) -> bool:
        return kind in self.kinds

    def available(self) -> tuple[bool, str]:
        if self.device == "cuda":
            ok, why = gpu_usable("torch" if "torch" in self.requires else "cupy")
            if not ok:
                return False, why
        if self.classreg_api:
            import classreg

            missing = [f for f in self.classreg_api if not callable(getattr(classreg, f, None))]
            if missing:
                return False, f"classreg.{missing[0]} is not in this classreg version"
        for mod in self.requires:
            if importlib.util.find_spec(mod) is None:
                return False, f"python module {mod!r} not installed (pip install \".[bench]\")"
        for dist in self.distributions:
            try:
                importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                return False, f"{dist!r} not installed (pip install \".[bench]\")"
        for exe in self.executables:
            if shutil.which(exe) is None:
                return False, f"program {exe!r} not on PATH (Debian: apt install {exe})"
        return True, ""


# --------------------------------------------------------------------------------------------- conversion helpers
def coordinate_images(grid, dtype=np.float64):
    """World coordinates (+ OFFSET) of every voxel of ``grid``, one Image per component (x, y[, z])."""
    pts = grid.grid_points()
    return [grid.like(np.ascontiguousarray(pts[..., k] + OFFSET, dtype=dtype)) for k in range(grid.ndim)]


def field_from_coordinates(fixed, warped):
    """Displacement field on ``fixed``'s grid from warped coordinate images (arrays in numpy order), and the mask
    of voxels whose sample came from inside the moving image."""
    import classreg as cr

    mapped = np.stack([np.asarray(c, dtype=np.float64) for c in warped], axis=-1) - OFFSET
    valid = np.all(np.stack([np.asarray(c) for c in warped], -1) > 0.5 * OFFSET, axis=-1)
    return cr.DisplacementField.from_array(mapped - fixed.grid_points(), fixed), valid


def status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


#: the process's memory high-water mark right after each timed registration call (before any conversion work)
PEAKS: list = []
#: each timed GPU call's device memory high-water mark in MB (the ``gpu_peak_mb`` of its record)
GPU_PEAKS: list = []


def gpu_usable(api: str = "cupy") -> tuple[bool, str]:
    """(True, "") if ``api`` ("cupy": classreg's device paths, "torch": FireANTs) can compute on a CUDA GPU here, else
    (False, why)."""
    if importlib.util.find_spec(api) is None:
        extra = 'pip install "classreg[gpu]"' if api == "cupy" else "pip install torch"
        return False, f"no GPU run: python module {api!r} not installed ({extra})"
    if api == "cupy":
        from classreg.backend import gpu_available

        if not gpu_available():
            return False, "no GPU run: CuPy is installed but no CUDA device accepted an allocation"
        return True, ""
    try:
        import torch

        if torch.cuda.is_available():
            return True, ""
    except Exception as exc:  # a broken CUDA install
        return False, f"no GPU run: torch.cuda failed ({exc.__class__.__name__}: {exc})"
    return False, "no GPU run: torch sees no CUDA device"


def _timed(fn, device: str = "cpu", api: str = "cupy"):
    """``(fn(), wall seconds)``; PEAKS gets the process's VmHWM after it. ``device="cuda"``: the device is
    synchronised before the clock stops (kernels are asynchronous), and GPU_PEAKS gets the allocator's device memory
    high-water mark of the call in MB: CuPy's memory pool is emptied before the call and keeps every block it
    allocates, so the bytes it holds after the call are its high-water mark; torch: ``max_memory_reserved`` after
    ``empty_cache`` and ``reset_peak_memory_stats`` (the same quantity: memory held by the caching allocator)."""
    if device == "cuda":
        if api == "torch":
            import torch

            sync, peak = torch.cuda.synchronize, torch.cuda.max_memory_reserved
            sync()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            import cupy

            sync, peak = cupy.cuda.Device().synchronize, cupy.get_default_memory_pool().total_bytes
            sync()
            cupy.get_default_memory_pool().free_all_blocks()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        sync()
    sec = time.perf_counter() - t0
    PEAKS.append(status_mb("VmHWM"))
    if device == "cuda":
        GPU_PEAKS.append(peak() / 2**20)
    return out, sec


def _on(device: str, kw: dict) -> dict:
    """A classreg solver's keywords on ``device``: a GPU row adds ``device="cuda"``; a CPU row passes no device (the
    solver's default, as before GPU rows existed)."""
    return kw if device == "cpu" else dict(kw, device=device)


# --------------------------------------------------------------------------------------------- classreg
def _warm_up(solver, ndim, **kw):
    """numba kernels load from the on-disk cache (or compile) on the first call: done untimed, on a tiny pair."""
    import classreg as cr

    rng = np.random.default_rng(0)
    a = rng.random((24,) * ndim, dtype=np.float32)
    t0 = time.perf_counter()
    solver(cr.Image(a, (1.0,) * ndim), cr.Image(np.roll(a, 1, axis=0), (1.0,) * ndim), **kw)
    return time.perf_counter() - t0


def _classreg_demons(**kw):
    """register_demons with its defaults for ``metric`` (the same settings on every case)."""
    def run(case, threads, quick, device="cpu"):
        import classreg as cr

        kwd = _on(device, kw)
        warm = _warm_up(cr.register_demons, case["fixed"].ndim, iterations=(2, 2, 2), max_pieces=2, **kwd)
        res, sec = _timed(lambda: cr.register_demons(case["fixed"], case["moving"], **kwd), device)
        return {"seconds": sec, "transform": res.transform, "result": res, "first_call_s": warm,
                "params": dict(kwd, defaults=True, pieces=res.metrics["pieces"],
                               path_length=res.metrics["path_length"])}
    return run


def _classreg_vp(**kw):
    """register_vp with its defaults (the same settings on every case)."""
    def run(case, threads, quick, device="cpu"):
        import classreg as cr

        kwd = _on(device, kw)
        warm = _warm_up(cr.register_vp, case["fixed"].ndim, **dict(kwd, shrink_factors=(2, 1), iterations=(2, 2)))
        res, sec = _timed(lambda: cr.register_vp(case["fixed"], case["moving"], **kwd), device)
        return {"seconds": sec, "transform": res.transform, "result": res, "first_call_s": warm,
                "params": dict(kwd, defaults=not kw, regrids=res.metrics["regrids"],
                               min_det_j=res.metrics["min_det_j"], loss_ratio=res.metrics["loss_ratio"])}
    return run


def _classreg_lddmm(**kw):
    def run(case, threads, quick, device="cpu"):
        import classreg as cr

        kwd = _on(device, kw)
        warm = _warm_up(cr.register_lddmm, case["fixed"].ndim, iterations=(2, 2, 2), **kwd)
        res, sec = _timed(lambda: cr.register_lddmm(case["fixed"], case["moving"], **kwd), device)
        return {"seconds": sec, "transform": res.transform, "result": res, "first_call_s": warm,
                "params": dict(kwd, defaults=not kw, method=res.params["method"],
                               geodesic_length=res.metrics.get("geodesic_length"),
                               time_steps=res.params["time_steps"], iterations=res.metrics["iterations"])}
    return run


def run_classreg_rigid(case, threads, quick, device="cpu"):
    """register_rigid with its defaults (schedule="fast": a coarse CSNGF search + the MI local refinement)."""
    import classreg as cr

    kw = _on(device, {})
    # the first call on the case itself (the MI refinement cannot start on _warm_up's random pair: no overlap)
    warm = _warm_up(lambda f, m: cr.register_rigid(case["fixed"], case["moving"], **kw), case["fixed"].ndim)
    res, sec = _timed(lambda: cr.register_rigid(case["fixed"], case["moving"], **kw), device)
    return {"seconds": sec, "transform": res.transform, "result": res, "first_call_s": warm,
            "params": dict(kw, defaults=True)}


# --------------------------------------------------------------------------------------------- parametric settings
#: random samples per iteration (per level) of every sampled parametric run — classreg, the sampled SimpleITK variant
#: and elastix (DATA.md: 2048 in 2-D, 4096 in 3-D), so that the timings compare the same sampling
PARAMETRIC_SAMPLES = {2: 2048, 3: 4096}
#: classreg_affine per case (the issue's rows), every one with Mattes-style MI; cases not listed fit their own model
#: (case.json ``transform``) from their own centring (case.json ``centre_init``)
CLASSREG_AFFINE = {"mm2d": {"transform": "rigid"}, "sim2d": {"transform": "similarity"},
                   "mm2d_rot60": {"transform": "rigid", "init": "global"},
                   "affine3d": {"transform": "affine", "init": "moments"}}


def case_model(case) -> str:
    """The transform model a parametric tool fits on ``case``: "rigid", "similarity" or "affine" (``case.json``'s
    ``transform``; rigid-kind cases default to rigid, affine-kind cases to affine)."""
    info = case["info"]
    return info.get("transform") or ("affine" if info["kind"] == "affine" else "rigid")


def case_centring(case) -> str:
    """How the peers centre their start on ``case``: "geometry" (image centres) or "moments" (centres of mass)."""
    return case["info"].get("centre_init", "geometry")


def classreg_affine_settings(case) -> dict:
    ndim = case["info"].get("ndim") or case["fixed"].ndim
    kw = dict(CLASSREG_AFFINE.get(case["info"]["name"], {"transform": case_model(case)}))
    kw.setdefault("init", case_centring(case))
    kw.update(metric="mi", samples=PARAMETRIC_SAMPLES[ndim], seed=0)
    return kw


def bspline_settings(ndim: int) -> dict:
    """register_bspline with elastix's B-spline settings (``elastix_parameters("bspline", ndim)``): 3 levels, final
    grid 8 mm (2-D) / 10 mm (3-D) (coarser levels ×4/×2, elastix's default grid schedule, which is also
    register_bspline's), 500 iterations per level, random samples drawn anew every iteration (register_bspline's
    default count: 2048 in 2-D as elastix's, 8192 in 3-D where elastix's map has 4096), Mattes MI with 32 bins, no
    bending penalty (elastix's map has none; register_bspline's default is a weight > 0, which the
    ``classreg_bspline`` row uses), started from the identity (the deformable cases are pre-aligned; elastix's
    ``AutomaticTransformInitialization`` is off)."""
    p = elastix_parameters("bspline", ndim)
    levels = int(p["NumberOfResolutions"])
    return {"grid_spacing": float(p["FinalGridSpacingInPhysicalUnits"]), "metric": "mi", "init": "identity",
            "shrink_factors": tuple(2 ** k for k in reversed(range(levels))),
            "iterations": int(p["MaximumNumberOfIterations"]), "bins": int(p["NumberOfHistogramBins"]),
            "bending_weight": 0.0, "seed": 0}


def _resolved(res, keys) -> dict:
    """The solver's own record of the settings it resolved (``Result.params``), for the JSON."""
    return {k: res.params[k] for k in keys if k in getattr(res, "params", {})}


#: a short schedule for the untimed warm-up (kernels compile / load from the cache)
_WARM = {"shrink_factors": (2, 1), "iterations": 2, "samples": 256}


def run_classreg_affine(case, threads, quick):
    """register_affine with the issue's per-case model (CLASSREG_AFFINE) and the shared sampling."""
    import classreg as cr

    kw = dict(classreg_affine_settings(case), threads=threads)
    warm = _warm_up(cr.register_affine, case["fixed"].ndim, **dict(kw, **_WARM))
    res, sec = _timed(lambda: cr.register_affine(case["fixed"], case["moving"], **kw))
    return {"seconds": sec, "transform": res.transform, "result": res, "first_call_s": warm,
            "params": dict(kw, **_resolved(res, ("shrink_factors", "smoothing_sigmas", "iterations", "optimiser",
                                                 "sampler")))}


def _classreg_bspline(**extra):
    """register_bspline with elastix's B-spline settings (bspline_settings) and ``extra``."""
    def run(case, threads, quick):
        return run_classreg_bspline(case, threads, quick, **extra)
    return run


def run_classreg_bspline(case, threads, quick, **extra):
    """register_bspline with elastix's B-spline settings (bspline_settings)."""
    import classreg as cr

    ndim = case["fixed"].ndim
    kw = dict(bspline_settings(ndim), threads=threads, **extra)
    warm = _warm_up(cr.register_bspline, ndim, **dict(kw, **_WARM))
    res, sec = _timed(lambda: cr.register_bspline(case["fixed"], case["moving"], **kw))
    return {"seconds": sec, "transform": res.transform, "result": res, "first_call_s": warm,
            "params": dict(kw, **_resolved(res, ("bending_weight", "samples", "folds", "min_det_j", "grid_schedule",
                                                 "smoothing_sigmas", "optimiser", "sampler")))}


#: register_points settings: its defaults (kernel scales from the data, docs/solvers/points.md "Defaults")
POINTS_KW = {}


def run_classreg_points(case, threads, quick, device="cpu"):
    import classreg as cr

    src, tgt = case["source"], case["target"]
    kw = _on(device, dict(POINTS_KW))
    t0 = time.perf_counter()
    cr.register_points(src[:100], tgt[:100], max_iter=2, **_on(device, {}))
    warm = time.perf_counter() - t0
    res, sec = _timed(lambda: cr.register_points(src, tgt, **kw), device)
    return {"seconds": sec, "mapped": res.apply_points(src), "first_call_s": warm,
            "params": dict(kw, iterations=res.metrics["iterations"])}


# --------------------------------------------------------------------------------------------- ANTs (antspyx)
def _to_ants(img):
    import ants

    return ants.from_numpy(np.ascontiguousarray(img.numpy().T), origin=list(img.origin), spacing=list(img.spacing),
                           direction=img.direction_matrix)


def _ants_field(case, transformlist):
    import ants

    f = _to_ants(case["fixed"].astype(np.float32))
    warped = [ants.apply_transforms(fixed=f, moving=_to_ants(c), transformlist=transformlist, interpolator="linear",
                                    defaultvalue=0).numpy().T
              for c in coordinate_images(case["moving"], np.float32)]  # float32: ~1e-3 mm steps at OFFSET
    return field_from_coordinates(case["fixed"], warped)


#: the ANTs transform per case model, for the parametric ANTs tools (``ants_rigid`` fits a similarity on sim2d)
ANTS_MODEL = {"rigid": "Rigid", "similarity": "Similarity", "affine": "Affine"}


def _ants(kind, **kw):
    """ANTs ``type_of_transform=kind`` with its defaults; ``kind=None``: the case's model (ANTS_MODEL)."""
    def run(case, threads, quick):
        import ants

        tt = kind or ANTS_MODEL[case_model(case)]
        f, m = _to_ants(case["fixed"].astype(np.float32)), _to_ants(case["moving"].astype(np.float32))
        out, sec = _timed(lambda: ants.registration(fixed=f, moving=m, type_of_transform=tt, random_seed=1, **kw))
        tx, valid = _ants_field(case, out["fwdtransforms"])
        return {"seconds": sec, "transform": tx, "valid": valid,
                "params": dict(type_of_transform=tt, random_seed=1, **kw)}
    return run


# --------------------------------------------------------------------------------------------- SimpleITK
def _sitk_resample_coords(case, transform):
    import SimpleITK as sitk

    ref = case["fixed"].to_sitk()
    warped = [sitk.GetArrayFromImage(sitk.Resample(c.to_sitk(), ref, transform, sitk.sitkLinear, 0.0,
                                                   sitk.sitkFloat64)) for c in coordinate_images(case["moving"])]
    return field_from_coordinates(case["fixed"], warped)


def _sitk_affine(transform, ndim: int):
    """A linear SimpleITK transform (Euler/Similarity/Affine, or a composite of them) as a classreg Affine: the images
    of the origin and of the unit vectors determine it exactly. Unlike resampled coordinate images it stays defined
    where the fixed foreground maps outside the moving image (mm2d_rot60's corners)."""
    import classreg as cr

    p0 = np.asarray(transform.TransformPoint((0.0,) * ndim))
    cols = [np.asarray(transform.TransformPoint(tuple(float(i == j) for i in range(ndim)))) - p0 for j in range(ndim)]
    return cr.Affine(np.stack(cols, axis=1), translation=p0)


def _sitk_demons(filter_name):
    """SimpleITK demons (single-resolution filters) in a coarse-to-fine wrapper, histogram matching first; settings
    of DATA.md: shrink 4/2/1, 100/50/25 iterations, field σ 1.5 voxels."""
    def run(case, threads, quick):
        import SimpleITK as sitk

        def register():
            f, m = case["fixed"].to_sitk(), case["moving"].to_sitk()
            m = sitk.HistogramMatching(m, f, 1024, 7, True)
            demons = getattr(sitk, filter_name)()
            demons.SetStandardDeviations(1.5)
            demons.SetSmoothDisplacementField(True)
            if hasattr(demons, "SetUseGradientType"):
                demons.SetUseGradientType(demons.Symmetric)
            disp = None
            for s, its in ((4, 100), (2, 50), (1, 25)):
                demons.SetNumberOfIterations(its)
                fs = sitk.Shrink(sitk.SmoothingRecursiveGaussian(f, 0.5 * s), [s] * f.GetDimension()) if s > 1 else f
                ms = sitk.Shrink(sitk.SmoothingRecursiveGaussian(m, 0.5 * s), [s] * f.GetDimension()) if s > 1 else m
                if disp is not None:
                    disp = sitk.Resample(disp, fs, sitk.Transform(), sitk.sitkLinear, 0.0, disp.GetPixelID())
                    disp = demons.Execute(fs, ms, disp)
                else:
                    disp = demons.Execute(fs, ms)
            return disp

        disp, sec = _timed(register)
        tx, valid = _sitk_resample_coords(case, sitk.DisplacementFieldTransform(sitk.Cast(disp,
                                                                                          sitk.sitkVectorFloat64)))
        return {"seconds": sec, "transform": tx, "valid": valid,
                "params": {"filter": filter_name, "shrink": [4, 2, 1], "iterations": [100, 50, 25], "sigma_vox": 1.5,
                           "histogram_matching": True}}
    return run


def sitk_transform(model: str, ndim: int):
    """The SimpleITK transform of a case model: Euler (rigid), Similarity or Affine."""
    import SimpleITK as sitk

    if model == "affine":
        return sitk.AffineTransform(ndim)
    name = {"rigid": "Euler", "similarity": "Similarity"}[model]
    return getattr(sitk, f"{name}{ndim}DTransform")()


#: SimpleITK regular-step GD per model: (learning rate, iterations). Rigid/similarity: DATA.md's Euler run; affine: the
#: settings of classreg.demo.affine_prealign (which built inter3d's pre-alignment from this pair)
SITK_STEPS = {"rigid": (2.0, 300), "similarity": (2.0, 300), "affine": (1.0, 200)}


#: SimpleITK's global angle search before the local run (``_sitk_mi(search=True)``, DATA.md's "SITK Exhaustive angle
#: search (5°, shrink 4)+Euler"): 2-D rotations over the full circle in 5° steps, Mattes MI on the 4× shrunk pair
SITK_SEARCH_STEP_DEG, SITK_SEARCH_SHRINK = 5.0, 4


def _sitk_mi(sampling: str, *, search: bool = False):
    """SimpleITK Mattes MI (32 bins), regular-step gradient descent, shrink 4/2/1 with σ 2/1/0 voxels, physical-shift
    scales, centred start (case.json ``centre_init``: geometry or moments); the transform is the case's model (Euler for
    mm2d/mm2d_rot60, Similarity for sim2d, Affine for affine3d). ``sampling="all"``: every voxel (DATA.md);
    ``"random"``: PARAMETRIC_SAMPLES random voxels per level (fixed seed), the sampling of classreg and elastix.
    ``search`` (2-D rigid/similarity only): first SimpleITK's Exhaustive optimiser over the rotation angle (full circle,
    SITK_SEARCH_STEP_DEG steps, shrink SITK_SEARCH_SHRINK, every voxel) about the centres of mass (the search needs the
    shift roughly right: from the geometric centres it picks a wrong angle on mm2d_rot60), the way a SimpleITK user
    handles a large rotation; the local run starts from the best angle. The search is inside the timed call. With
    ``sampling="random"`` (``sitk_mi_search_sampled``) it is the SimpleITK counterpart of ``register_affine(...,
    init="global")`` with the same sampling."""
    def run(case, threads, quick):
        import SimpleITK as sitk

        f, m = case["fixed"].to_sitk(), case["moving"].to_sitk()
        dim = f.GetDimension()
        model = case_model(case)
        lr, its = SITK_STEPS[model]
        shrink = (4, 2, 1)
        centring = case_centring(case)
        params = {"transform": model, "metric": "MattesMI(32)", "optimizer": "RegularStepGradientDescent",
                  "learning_rate": lr, "iterations": its, "shrink": list(shrink), "sigmas_vox": [2, 1, 0],
                  "init": centring}
        if sampling == "random":
            n = PARAMETRIC_SAMPLES[dim]
            pct = [min(1.0, n / float(np.prod([max(1, s // k) for s in case["fixed"].shape]))) for k in shrink]
            params.update(sampling=f"random {n} per level (seed 1)", sampling_percentage=pct)
        else:
            params["sampling"] = "all voxels"

        if search:
            if dim != 2 or model == "affine":
                raise ValueError("the SimpleITK angle search is set up for 2-D rigid/similarity cases")
            n_angles = round(360.0 / SITK_SEARCH_STEP_DEG)
            params.update(search=f"Exhaustive over the angle, {SITK_SEARCH_STEP_DEG:g}° steps, full circle, "
                                 f"shrink {SITK_SEARCH_SHRINK}, MattesMI(32), every voxel", init="moments")

        def register():
            init = sitk.CenteredTransformInitializer(
                f, m, sitk_transform(model, dim), sitk.CenteredTransformInitializerFilter.MOMENTS
                if centring == "moments" or search else sitk.CenteredTransformInitializerFilter.GEOMETRY)
            if search:
                ex = sitk.ImageRegistrationMethod()
                ex.SetMetricAsMattesMutualInformation(32)
                ex.SetMetricSamplingStrategy(ex.NONE)
                ex.SetInterpolator(sitk.sitkLinear)
                # the angle only: parameters (angle, tx, ty) for Euler, (scale, angle, tx, ty) for Similarity
                steps = [n_angles // 2, 0, 0] if model == "rigid" else [0, n_angles // 2, 0, 0]
                ex.SetOptimizerAsExhaustive(steps)
                ex.SetOptimizerScales([np.deg2rad(SITK_SEARCH_STEP_DEG) if s else 1.0 for s in steps])
                ex.SetShrinkFactorsPerLevel([SITK_SEARCH_SHRINK])
                ex.SetSmoothingSigmasPerLevel([SITK_SEARCH_SHRINK / 2.0])
                ex.SetInitialTransform(init, inPlace=True)
                ex.Execute(f, m)
            reg = sitk.ImageRegistrationMethod()
            reg.SetMetricAsMattesMutualInformation(32)
            if sampling == "random":
                reg.SetMetricSamplingStrategy(reg.RANDOM)
                reg.SetMetricSamplingPercentagePerLevel(pct, 1)
            else:
                reg.SetMetricSamplingStrategy(reg.NONE)
            reg.SetInterpolator(sitk.sitkLinear)
            reg.SetOptimizerAsRegularStepGradientDescent(learningRate=lr, minStep=1e-4, numberOfIterations=its)
            reg.SetOptimizerScalesFromPhysicalShift()
            reg.SetShrinkFactorsPerLevel(list(shrink))
            reg.SetSmoothingSigmasPerLevel([2, 1, 0])
            reg.SetInitialTransform(init, inPlace=False)
            return reg.Execute(f, m)

        tx, sec = _timed(register)
        return {"seconds": sec, "transform": _sitk_affine(tx, dim), "params": params}
    return run



# --------------------------------------------------------------------------------------------- DIPY
def run_dipy_syn_cc(case, threads, quick):
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    fixed, moving = case["fixed"], case["moving"]
    sdr = SymmetricDiffeomorphicRegistration(CCMetric(fixed.ndim, sigma_diff=2.0, radius=4),
                                             level_iters=[100, 50, 25])
    mapping, sec = _timed(lambda: sdr.optimize(fixed.data, moving.data, static_grid2world=fixed.affine,
                                               moving_grid2world=moving.affine))
    warped = [mapping.transform(c.data, interpolation="linear") for c in coordinate_images(moving)]
    tx, valid = field_from_coordinates(fixed, warped)
    return {"seconds": sec, "transform": tx, "valid": valid,
            "params": {"metric": "CC r=4", "sigma_diff": 2.0, "level_iters": [100, 50, 25]}}


# --------------------------------------------------------------------------------------------- elastix
#: elastix transform per kind of ``elastix_parameters`` (and per case model)
ELASTIX_TRANSFORMS = {"euler": "EulerTransform", "rigid": "EulerTransform", "similarity": "SimilarityTransform",
                      "affine": "AffineTransform"}


def elastix_parameters(kind: str, ndim: int, *, init: str = "geometry") -> dict:
    """The parameter maps of DATA.md: B-spline (AdvancedMattesMI, 3 resolutions, ASGD 500 iterations, final grid 8 mm
    in 2-D / 10 mm in 3-D, 2048/4096 random coordinates) or Euler / similarity / affine (same metric, optimiser and
    sampling; automatic initialisation at the geometrical centres, or centres of gravity for ``init="moments"``)."""
    p = {
        "FixedImageDimension": str(ndim), "MovingImageDimension": str(ndim),
        "FixedInternalImagePixelType": "float", "MovingInternalImagePixelType": "float",
        "Registration": "MultiResolutionRegistration", "Metric": "AdvancedMattesMutualInformation",
        "NumberOfHistogramBins": "32", "Optimizer": "AdaptiveStochasticGradientDescent",
        "MaximumNumberOfIterations": "500", "NumberOfResolutions": "3",
        "FixedImagePyramid": "FixedSmoothingImagePyramid", "MovingImagePyramid": "MovingSmoothingImagePyramid",
        "ImageSampler": "RandomCoordinate", "NumberOfSpatialSamples": "2048" if ndim == 2 else "4096",
        "NewSamplesEveryIteration": "true", "Interpolator": "LinearInterpolator",
        "ResampleInterpolator": "FinalBSplineInterpolator", "FinalBSplineInterpolationOrder": "1",
        "Resampler": "DefaultResampler",
        "DefaultPixelValue": "0", "WriteResultImage": "false", "ResultImagePixelType": "double",
        "HowToCombineTransforms": "Compose", "AutomaticTransformInitialization": "true",
        "AutomaticScalesEstimation": "true",
    }
    if kind == "bspline":
        p.update(Transform="BSplineTransform", FinalGridSpacingInPhysicalUnits="8" if ndim == 2 else "10",
                 AutomaticTransformInitialization="false")
    elif kind in ELASTIX_TRANSFORMS:
        p.update(Transform=ELASTIX_TRANSFORMS[kind], AutomaticTransformInitializationMethod="CenterOfGravity"
                 if init == "moments" else "GeometricalCenter")
    else:
        raise ValueError(f"unknown elastix transform kind {kind!r}")
    return p


def _itk_image(img):
    import itk

    out = itk.image_from_array(np.ascontiguousarray(img.data, dtype=np.float64 if img.data.dtype == np.float64
                                                    else np.float32))
    out.SetSpacing(list(img.spacing))
    out.SetOrigin(list(img.origin))
    out.SetDirection(itk.matrix_from_array(np.asarray(img.direction_matrix, dtype=np.float64)))
    return out


def _itk_elastix(kind):
    """itk-elastix with ``elastix_parameters(kind)``; ``kind=None``: the case's model (Euler on rigid cases,
    Similarity on sim2d) and centring."""
    def run(case, threads, quick):
        import itk

        fixed, moving = case["fixed"].astype(np.float32), case["moving"].astype(np.float32)
        params = elastix_parameters(kind or case_model(case), fixed.ndim, init=case_centring(case)) \
            if kind != "bspline" else elastix_parameters(kind, fixed.ndim)
        pobj = itk.ParameterObject.New()
        pobj.AddParameterMap({k: [v] for k, v in params.items()})
        (_, tp), sec = _timed(lambda: itk.elastix_registration_method(
            _itk_image(fixed), _itk_image(moving), parameter_object=pobj, log_to_console=False,
            number_of_threads=threads))
        tp.SetParameter("ResultImagePixelType", "double")
        warped = [np.asarray(itk.transformix_filter(_itk_image(c), tp, log_to_console=False))
                  for c in coordinate_images(case["moving"], np.float64)]
        tx, valid = field_from_coordinates(case["fixed"], warped)
        return {"seconds": sec, "transform": tx, "valid": valid, "params": params}
    return run


def _write_elastix_params(p: dict, path: Path) -> Path:
    lines = []
    for k, v in p.items():
        val = v if v.replace(".", "", 1).lstrip("-").isdigit() or v in ("true", "false") else f'"{v}"'
        lines.append(f"({k} {val})")
    path.write_text("\n".join(lines) + "\n")
    return path


#: the elastix and transformix programs: Debian's real ones, and classreg's drop-in run the same way (new process):
#: "classreg" each command in its own process (CLASSREG_SERVER=0: the cold start every call pays without the
#: server), "classreg_server" through the start-up server of classreg.elastix.server, warmed up before the timing
#: (what every call after a session's first pays)
_CLASSREG_CLI = ([sys.executable, "-m", "classreg.elastix"], [sys.executable, "-m", "classreg.elastix.transformix"])
ELASTIX_PROGRAMS = {"elastix": (["elastix"], ["transformix"]), "classreg": _CLASSREG_CLI,
                    "classreg_server": _CLASSREG_CLI}


def _program_env(programs: str) -> dict:
    return dict(os.environ, CLASSREG_SERVER="1" if programs == "classreg_server" else "0")


def _start_classreg_server(cmd, env) -> None:
    """Untimed: run ``cmd`` once (it starts the server) and wait until the server is up (its warm-up done)."""
    status = [sys.executable, "-m", "classreg.elastix.server", "--status"]
    if subprocess.run(status, env=env, capture_output=True, text=True, check=False).stdout.startswith("up"):
        return
    subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for _ in range(240):
        if subprocess.run(status, env=env, capture_output=True, text=True, check=False).stdout.startswith("up"):
            return
        time.sleep(0.5)
    raise RuntimeError("the classreg-elastix server did not come up within 2 minutes")


def _byte_compile_classreg():
    """Byte-compile classreg's modules, untimed, as ``pip install`` does: a development checkout run with
    PYTHONDONTWRITEBYTECODE=1 (as on these machines) would otherwise compile every module from source in each new
    process (~0.3 s of a 2-D run), which an installed classreg never does."""
    import compileall

    import classreg.kernels

    compileall.compile_dir(str(Path(classreg.__file__).parent), quiet=1)
    compileall.compile_dir(str(Path(classreg.kernels.__file__).parent), quiet=1)


def _elastix_cli(programs: str, kind: str | None):
    """The elastix command line with ``elastix_parameters(kind)`` (``None``: the case's model and centring), timed
    including process start and file I/O, as a user runs it; the map is read back through transformix ``-in`` on
    coordinate images, so both programs are measured by the same route."""
    def run(case, threads, quick):
        import classreg as cr

        elastix, transformix = ELASTIX_PROGRAMS[programs]
        env = _program_env(programs)
        if programs != "elastix":
            _byte_compile_classreg()
        fixed = case["fixed"].astype(np.float32)
        params = elastix_parameters(kind, fixed.ndim) if kind == "bspline" else \
            elastix_parameters(kind or case_model(case), fixed.ndim, init=case_centring(case))
        with tempfile.TemporaryDirectory(prefix="classreg-elastix-") as tmp:
            tmp = Path(tmp)
            cr.save(fixed, tmp / "f.nii.gz")
            cr.save(case["moving"].astype(np.float32), tmp / "m.nii.gz")
            pfile = _write_elastix_params(params, tmp / "params.txt")
            cmd = elastix + ["-f", str(tmp / "f.nii.gz"), "-m", str(tmp / "m.nii.gz"), "-p", str(pfile),
                             "-out", str(tmp), "-threads", str(threads)]
            if programs == "classreg_server":
                (tmp / "warm").mkdir()
                _start_classreg_server(cmd[:-3] + [str(tmp / "warm")] + cmd[-2:], env)
            proc, sec = _timed(lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, check=False))
            if proc.returncode != 0:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-400:]}")
            warped = []
            for k, c in enumerate(coordinate_images(case["moving"], np.float64)):
                cdir = tmp / f"c{k}"
                cdir.mkdir()
                cr.save(c, cdir / "c.nii.gz")
                r = subprocess.run(transformix + ["-in", str(cdir / "c.nii.gz"), "-tp",
                                                  str(tmp / "TransformParameters.0.txt"), "-out", str(cdir),
                                                  "-threads", str(threads)],
                                   capture_output=True, text=True, env=env, check=False)
                if r.returncode != 0:
                    raise RuntimeError(f"transformix exited with {r.returncode}: {(r.stdout + r.stderr)[-400:]}")
                res = next(cdir.glob("result.*"))
                warped.append(cr.load(res, dtype=np.float64).data)
        tx, valid = field_from_coordinates(case["fixed"], warped)
        return {"seconds": sec, "transform": tx, "valid": valid, "params": params}
    return run


run_elastix_cli = _elastix_cli("elastix", "bspline")


# --------------------------------------------------------------------------------------- FireANTs (CPU, GPU)
def run_fireants_greedy(case, threads, quick, device="cpu"):
    """FireANTs Greedy (torch): CC kernel 5, Adam lr 0.5, scales 4/2/1, iterations 200/100/50 (DATA.md), on the CPU
    or (``device="cuda"``) the GPU; there an untimed run of 1 iteration per scale first starts CUDA and loads the
    kernels, as classreg's warm-up does."""
    import torch
    from fireants.io import BatchedImages
    from fireants.io import Image as FImage
    from fireants.registration.greedy import GreedyRegistration

    torch.set_num_threads(threads)
    fixed, moving = case["fixed"].astype(np.float32), case["moving"].astype(np.float32)
    fb = BatchedImages([FImage(fixed.to_sitk(), device=device)])
    mb = BatchedImages([FImage(moving.to_sitk(), device=device)])

    def register(iterations=(200, 100, 50)):
        reg = GreedyRegistration(scales=[4, 2, 1], iterations=list(iterations), fixed_images=fb, moving_images=mb,
                                 cc_kernel_size=5, optimizer_lr=0.5, loss_type="cc", deformation_type="compositive")
        reg.optimize()
        return reg

    warm = None
    if device != "cpu":
        t0 = time.perf_counter()
        register((1, 1, 1))
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
    reg, sec = _timed(register, device, api="torch")
    warped = []
    with torch.no_grad():
        for c in coordinate_images(case["moving"], np.float32):
            cb = BatchedImages([FImage(c.to_sitk(), device=device, dtype=torch.float64)])
            warped.append(reg.evaluate(fb, cb).squeeze().double().cpu().numpy())
    tx, valid = field_from_coordinates(case["fixed"], warped)
    out = {"seconds": sec, "transform": tx, "valid": valid,
           "params": {"scales": [4, 2, 1], "iterations": [200, 100, 50], "cc_kernel_size": 5, "lr": 0.5}}
    if warm is not None:
        out.update(first_call_s=warm, params=dict(out["params"], device=device))
    return out


# --------------------------------------------------------------------------------------------- probreg
def _probreg(method):
    """probreg on coordinates normalised by the target centroid and RMS radius (DATA.md settings)."""
    def run(case, threads, quick):
        from probreg import bcpd, cpd

        src, tgt = case["source"], case["target"]
        c = tgt.mean(0)
        r = float(np.sqrt(((tgt - c) ** 2).sum(1).mean()))
        s, t = (src - c) / r, (tgt - c) / r
        maxiter = 100 if quick else 500

        def register():
            if method == "cpd_nonrigid":
                tf = cpd.registration_cpd(s, t, tf_type_name="nonrigid", w=0, maxiter=maxiter, tol=1e-9,
                                          beta=2.0, lmd=2.0)
                return tf.transformation.transform(s)
            tf = bcpd.registration_bcpd(s, t, w=0, maxiter=min(maxiter, 300), tol=1e-9)
            return tf.transform(s)

        moved, sec = _timed(register)
        return {"seconds": sec, "mapped": np.asarray(moved) * r + c,
                "params": {"method": method, "maxiter": maxiter, "normalised": True}}
    return run


TOOLS = {t.name: t for t in [
    Tool("classreg_demons", "deformable", "classreg demons (default: SSD, MI across intensity scales)",
         _classreg_demons(), classreg=True),
    Tool("classreg_demons_ssd", "deformable", "classreg demons (SSD)", _classreg_demons(metric="ssd"),
         classreg=True, quick=False),
    Tool("classreg_demons_cc", "deformable", "classreg demons (LNCC)", _classreg_demons(metric="lncc"),
         classreg=True),
    Tool("classreg_demons_mi", "deformable", "classreg demons (MI)", _classreg_demons(metric="mi"),
         classreg=True),
    Tool("classreg_lddmm", "deformable", "classreg LDDMM (band-limited; default: LNCC, MI across intensity scales)",
         _classreg_lddmm(), classreg=True),
    Tool("classreg_lddmm_full", "deformable", "classreg LDDMM (full grid, the earlier default)",
         _classreg_lddmm(method="full"), classreg=True, quick=False,
         slow_3d="minutes per 3-D pair on 2 cores (the band-limited default replaced it)"),
    Tool("classreg_vp", "deformable", "classreg VP (prescribed det J and curl; default: SSD, MI across intensity "
                                      "scales)", _classreg_vp(), classreg=True,
         slow_3d="35-50 s per 3-D pair on 2 idle cores at 10 iterations per level (inter3d 34 s, synth3d "
                 "50 s; docs/notes/vp.md)"),
    Tool("ants_syn", "deformable", "ANTs SyN", _ants("SyN"), requires=("ants",)),
    Tool("ants_synonly", "deformable", "ANTs SyNOnly", _ants("SyNOnly"), requires=("ants",)),
    Tool("ants_syncc", "deformable", "ANTs SyNCC", _ants("SyNCC"), requires=("ants",),
         slow_3d="minutes per 3-D pair on 2 cores"),
    Tool("ants_syn_full", "deformable", "ANTs antsRegistrationSyN[s]", _ants("antsRegistrationSyN[s]"),
         requires=("ants",), slow_3d="minutes per 3-D pair on 2 cores (full-resolution stages)"),
    Tool("sitk_diffeo_demons", "deformable", "SimpleITK DiffeomorphicDemons",
         _sitk_demons("DiffeomorphicDemonsRegistrationFilter"), requires=("SimpleITK",)),
    Tool("sitk_fastsym_demons", "deformable", "SimpleITK FastSymmetricForcesDemons",
         _sitk_demons("FastSymmetricForcesDemonsRegistrationFilter"), requires=("SimpleITK",)),
    Tool("dipy_syn_cc", "deformable", "DIPY SyN (CC)", run_dipy_syn_cc, requires=("dipy",)),
    Tool("classreg_bspline", "deformable", "classreg B-spline (MI, default bending 30 mm², folds projected)",
         _classreg_bspline(bending_weight=None), classreg=True, classreg_api=("register_bspline",), quick=False,
         show_params=True),
    Tool("classreg_bspline_nobending", "deformable", "classreg B-spline (MI, no bending penalty, folds projected)",
         _classreg_bspline(), classreg=True, classreg_api=("register_bspline",), quick=False, show_params=True),
    Tool("classreg_bspline_compose", "deformable", "classreg B-spline (MI, injective pieces composed)",
         _classreg_bspline(folds="compose"), classreg=True, classreg_api=("register_bspline",), quick=False,
         show_params=True),
    Tool("classreg_bspline_grid", "deformable", "classreg B-spline (MI, elastix's refined grid)",
         _classreg_bspline(folds="allow"), classreg=True, classreg_api=("register_bspline",), quick=False,
         show_params=True),
    Tool("elastix_bspline", "deformable", "itk-elastix B-spline (MI)", _itk_elastix("bspline"),
         requires=("itk",), distributions=("itk-elastix",)),
    Tool("elastix_cli", "deformable", "elastix CLI B-spline (MI)", run_elastix_cli,
         executables=("elastix", "transformix"), slow_3d="same maps as itk-elastix plus process and file I/O"),
    Tool("classreg_elastix_cli", "deformable", "classreg-elastix CLI B-spline (MI), same parameter file",
         _elastix_cli("classreg", "bspline"), classreg=True, quick=False, default=False),
    Tool("classreg_elastix_cli_server", "deformable",
         "classreg-elastix CLI B-spline (MI), same parameter file, through its warm start-up server",
         _elastix_cli("classreg_server", "bspline"), classreg=True, quick=False, default=False),
    Tool("elastix_cli_affine", ("rigid", "affine"), "elastix CLI Euler / Affine (MI)", _elastix_cli("elastix", None),
         executables=("elastix", "transformix"), default=False,
         excludes={"sim2d": "Debian's elastix 5.0.1 has no SimilarityTransform"}),
    Tool("classreg_elastix_cli_affine", ("rigid", "affine"), "classreg-elastix CLI Euler / Affine (MI), same file",
         _elastix_cli("classreg", None), classreg=True, quick=False, default=False),
    Tool("classreg_elastix_cli_affine_server", ("rigid", "affine"),
         "classreg-elastix CLI Euler / Affine (MI), same file, through its warm start-up server",
         _elastix_cli("classreg_server", None), classreg=True, quick=False, default=False),
    Tool("fireants_greedy", "deformable", "FireANTs Greedy (CPU)", run_fireants_greedy,
         requires=("fireants", "torch"), slow_3d="27-52 s per 3-D pair on 2 CPU cores (DATA.md)"),
    Tool("classreg_rigid", "rigid", "classreg rigid (CSNGF + MI refine)", run_classreg_rigid, classreg=True,
         excludes={"sim2d": "rigid-only solver; the case has a scale"}),
    Tool("classreg_affine", ("rigid", "affine"), "classreg affine (MI)", run_classreg_affine, classreg=True,
         classreg_api=("register_affine",), quick=False, show_params=True),
    Tool("ants_rigid", "rigid", "ANTs Rigid / Similarity", _ants(None), requires=("ants",)),
    Tool("ants_affine", "affine", "ANTs Affine", _ants("Affine"), requires=("ants",)),
    Tool("sitk_mi", ("rigid", "affine"), "SimpleITK Euler/Similarity/Affine (MI, all voxels)", _sitk_mi("all"),
         requires=("SimpleITK",), show_params=True),
    Tool("sitk_mi_sampled", ("rigid", "affine"), "SimpleITK Euler/Similarity/Affine (MI, 2048/4096 samples)",
         _sitk_mi("random"), requires=("SimpleITK",), show_params=True),
    Tool("sitk_mi_search", "rigid", "SimpleITK angle search (Exhaustive, 5°) + Euler/Similarity (MI, all voxels)",
         _sitk_mi("all", search=True), requires=("SimpleITK",), show_params=True),
    Tool("sitk_mi_search_sampled", "rigid",
         "SimpleITK angle search (Exhaustive, 5°) + Euler/Similarity (MI, 2048 samples)",
         _sitk_mi("random", search=True), requires=("SimpleITK",), show_params=True),
    Tool("elastix_euler", "rigid", "itk-elastix Euler / Similarity (MI)", _itk_elastix(None), requires=("itk",),
         distributions=("itk-elastix",)),
    Tool("elastix_affine", "affine", "itk-elastix Affine (MI)", _itk_elastix("affine"), requires=("itk",),
         distributions=("itk-elastix",)),
    Tool("classreg_points", "points", "classreg BCPD", run_classreg_points, classreg=True),
    Tool("probreg_cpd", "points", "probreg CPD nonrigid", _probreg("cpd_nonrigid"), requires=("probreg",)),
    Tool("probreg_bcpd", "points", "probreg BCPD", _probreg("bcpd"), requires=("probreg",), default=False),
]}


# --------------------------------------------------------------------------------------------- regularisation sweeps
#: the one regularisation parameter that matters per deformable classreg solver (issue #22: accuracy against
#: smoothness): (parameter, unit, values, the default's value, which the base tool's own row gives). Units: "min" /
#: "max": multiples of the case's smallest / largest spacing (demons SSD's velocity σ, default 4.5 × the smallest;
#: LDDMM's kernel σ, default 4.5 × the largest; the earlier defaults 1.5 × and 3 × are sweep points); "mm2": the value
#: itself (the B-spline bending weight, default 30 for MI).
#: register_vp's loss has no smoothness term: the σ of the Gaussian preconditioning of its controls (× the smallest
#: spacing; default 3 with SSD, 0 with MI, where the 0 point is the default's) sets the smoothness of its updates.
#: docs/notes/tradeoff.md has the measured sweeps and the rule that chose the defaults.
SWEEPS = {
    "classreg_demons_ssd": ("velocity_sigma", "min", (0.5, 1.0, 1.5, 2.25, 3.0, 6.0), 4.5),
    "classreg_demons_mi": ("velocity_sigma", "min", (0.5, 1.0, 1.5, 3.0, 4.5), 2.0),
    "classreg_lddmm": ("kernel_sigma", "max", (1.5, 2.0, 3.0, 6.0), 4.5),
    "classreg_bspline": ("bending_weight", "mm2", (0.0, 10.0, 100.0, 300.0), 30.0),
    "classreg_vp": ("control_sigma", "min", (0.0, 1.0, 2.0, 6.0), 3.0),
}


def _swept(base: str, param: str, which: str, factor: float):
    """``base``'s run with ``param`` = factor × the case's smallest/largest spacing (mm), or = factor ("mm2")."""
    factories = {"classreg_lddmm": _classreg_lddmm, "classreg_bspline": _classreg_bspline, "classreg_vp": _classreg_vp,
                 "classreg_demons_ssd": lambda **kw: _classreg_demons(metric="ssd", **kw),
                 "classreg_demons_mi": lambda **kw: _classreg_demons(metric="mi", **kw)}

    def run(case, threads, quick):
        sp = case["fixed"].spacing
        value = float(factor) * (1.0 if which == "mm2" else float(min(sp) if which == "min" else max(sp)))
        out = factories[base](**{param: value})(case, threads, quick)
        out["params"] = dict(out.get("params") or {}, sweep_factor=float(factor))
        return out
    return run


def sweep_tools() -> dict:
    """The sweep points as tools (not in the default list; ``python -m benchmarks.run --sweep`` adds them)."""
    out = {}
    for base, (param, which, factors, _default) in SWEEPS.items():
        unit = {"mm2": "mm²"}.get(which, "× spacing")
        for f in factors:
            name = f"{base}@{param}={f:g}"
            out[name] = Tool(name, "deformable", f"{TOOLS[base].label}, {param} {f:g} {unit}",
                             _swept(base, param, which, f), classreg=True, quick=False, default=False,
                             slow_3d=TOOLS[base].slow_3d, sweep_of=(base, param, float(f)))
    return out


TOOLS.update(sweep_tools())


# --------------------------------------------------------------------------------------------- GPU rows
#: the tools with a GPU path (their run functions take ``device``) and the array library that path runs on, which
#: times and measures it (:func:`_timed`); ``--device cuda`` runs each twice: its CPU row and a ``<name>_cuda`` row.
#: B-spline, affine and the elastix programs compute on the CPU even with ``device="cuda"`` (docs/gpu.md)
GPU_TOOLS = {"classreg_demons": "cupy", "classreg_demons_cc": "cupy", "classreg_demons_mi": "cupy",
             "classreg_lddmm": "cupy", "classreg_lddmm_full": "cupy", "classreg_vp": "cupy", "classreg_rigid": "cupy",
             "classreg_points": "cupy", "fireants_greedy": "torch"}


def device_tools() -> dict:
    """The GPU rows, ``<name>_cuda`` for each of :data:`GPU_TOOLS`: the CPU tool's run with ``device="cuda"``
    (warm-up and timed call on the device), labelled "[GPU]" (FireANTs: "(GPU)"), not in the default list, never
    gated by ``slow_3d`` (the reasons given there are CPU times)."""
    out = {}
    for base, api in GPU_TOOLS.items():
        t = TOOLS[base]
        label = t.label.replace("(CPU)", "(GPU)") if t.label.endswith("(CPU)") else f"{t.label} [GPU]"
        out[f"{base}_cuda"] = dataclasses.replace(
            t, name=f"{base}_cuda", label=label, run=functools.partial(t.run, device="cuda"),
            requires=tuple(dict.fromkeys(t.requires + (api,))), default=False, quick=False, slow_3d="",
            device="cuda", device_of=base)
    return out


TOOLS.update(device_tools())

