"""``classreg demo``: a real inter-subject brain registration from data that ships inside installed packages.

3-D (preferred): nilearn's MNI152 template (2 mm) ← ITK's real T1 subject (:func:`classreg.data.brain_pair_3d`).
2-D (fallback when Debian's insighttoolkit5-examples is absent): dipy's real T1 coronal slice ← an MNI152 coronal
slice. The pair is aligned affinely first with :func:`classreg.register_affine` (Mattes MI, seeded), then
deformably with :func:`classreg.register_demons`; Dice of CSF/GM/WM and NCC before and after, timings, and the outputs (warped
image, transforms, params.json, history.csv, QC PNG) are written to the output folder.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from .image import Image
from .transforms import Affine

logger = logging.getLogger("classreg")

__all__ = ["affine_prealign", "run_demo"]


def affine_prealign(fixed: Image, moving: Image, *, fixed_mask: Image | None = None, seed: int = 0) -> Affine:
    """Affine fixed → moving transform by SimpleITK (Mattes MI, 32 bins, all voxels, regular-step gradient descent,
    geometry-centred start, shrink 4/2/1 with σ 2/1/0 voxels). Deterministic: no random sampling, one thread.

    A pre-alignment for the demo and benchmarks, not one of classreg's solvers.
    """
    import SimpleITK as sitk

    f = fixed.astype(np.float32).to_sitk()
    m = moving.astype(np.float32).to_sitk()
    dim = fixed.ndim
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(dim),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    # one thread: ITK's pool threader splits the metric sums dynamically, so with several threads the summation order,
    # and with it the result, changes from run to run (measured: brain2d affine entries differ in the 3rd digit,
    # tissue Dice after demons by 0.006); the benchmark cases must be the same in every run
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask.astype(np.uint8).to_sitk())
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # the metric and the pyramid filters
    try:
        out = reg.Execute(f, m)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    from .transforms import from_sitk_transform

    t = from_sitk_transform(out)
    return t.simplified() if hasattr(t, "simplified") else t


def _pair(prefer_3d: bool):
    from .data import DataNotFoundError, brain_pair_3d

    if prefer_3d:
        try:
            return brain_pair_3d(resolution=2.0)
        except DataNotFoundError as exc:
            logger.info("3-D demo data not available (%s); using the 2-D pair", exc)
    return _brain_pair_2d()


def _brain_pair_2d() -> dict:
    from .data import dipy_file, mni152

    t1 = np.load(dipy_file("t1_coronal_slice.npy")).astype(np.float32)
    fixed = Image(t1 / max(float(t1.max()), 1e-12), (1.0, 1.0))
    mni = mni152("t1", resolution=1.0)
    gm = mni152("gm", resolution=1.0).data / 255.0  # probability maps are stored as 0-255
    wm = mni152("wm", resolution=1.0).data / 255.0
    k = 124 if mni.shape[1] > 124 else mni.shape[1] // 2  # coronal slice (array axis 1 is y)
    sl = mni.data[:, k, :][::-1]
    moving = Image(np.ascontiguousarray(sl), (1.0, 1.0))
    lab = (np.argmax(np.stack([1.0 - gm - wm, gm, wm]), 0).astype(np.uint8) + 1)[:, k, :][::-1]
    mlab = np.where(sl > 0.02 * sl.max(), lab, 0).astype(np.uint8)
    # fixed labels: 3 intensity classes inside the slice's foreground (k-means free: tertiles), a weak proxy
    fg = fixed.data > 0.05
    q = np.quantile(fixed.data[fg], [1 / 3, 2 / 3])
    flab = np.where(fg, 1 + (fixed.data > q[0]).astype(np.uint8) + (fixed.data > q[1]).astype(np.uint8), 0)
    return {"fixed": fixed, "moving": moving, "fixed_labels": fixed.like(flab.astype(np.uint8)),
            "moving_labels": moving.like(np.ascontiguousarray(mlab)), "fixed_mask": fixed.like(fg.astype(np.uint8)),
            "moving_mask": None,
            "provenance": "fixed: dipy t1_coronal_slice.npy (treated as 1 mm); moving: nilearn MNI152 2009a 1 mm "
                          f"coronal slice {k}; labels: MNI GM/WM argmax vs intensity tertiles of the dipy slice"}


def run_demo(out_dir, *, prefer_3d: bool = True, progress: bool = True, max_pieces: int = 5) -> dict:
    """Run the demo registration and write its outputs into ``out_dir``; returns the summary dict."""
    from . import evaluate, register_affine, register_demons, terms  # the public API, like any script
    from .io import save
    from .resample import resample

    from .result import _fill, check_result_folder, publish_folder

    out = Path(out_dir)
    check_result_folder(out, overwrite=True)  # a re-run replaces the previous demo's folder, never other files
    case = _pair(prefer_3d)
    fixed, moving = case["fixed"], case["moving"]
    t0 = time.perf_counter()
    aff = register_affine(fixed, moving).transform
    t_aff = time.perf_counter() - t0
    res = register_demons(fixed, moving, init=aff, progress=progress, max_pieces=max_pieces)
    t_def = res.timings["total"]

    def scores(transform):
        warped_lab = resample(case["moving_labels"], transform, reference=fixed, interpolation="label")
        d = evaluate.dice(case["fixed_labels"], warped_lab, labels=[1, 2, 3])
        w = resample(moving, transform, reference=fixed)
        mask = case["fixed_mask"].data > 0
        return d, -terms.ncc(fixed.data, w.data, mask=mask)

    dice_aff, ncc_aff = scores(aff)
    dice_def, ncc_def = scores(res.transform)
    jac = evaluate.jacobian_stats(res.transform.transforms[0] if hasattr(res.transform, "transforms")
                                  else res.transform, reference=fixed, mask=case["fixed_mask"].data > 0)
    qc = None

    def fill(d):
        nonlocal qc
        _fill(res, d, True)
        save(fixed, d / "fixed.nii.gz")
        save(resample(moving, aff, reference=fixed), d / "moving_affine.nii.gz")
        try:
            from .qc import qc_figure

            qc = qc_figure(res, moving, d / "qc.png", fixed=fixed, title="classreg demo: demons after affine")
        except ImportError as exc:
            logger.warning("no QC figure: %s", exc)
        summary["qc_png"] = str(out / "qc.png") if qc else None
        (d / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    summary = {
        "case": "3-D inter-subject" if fixed.ndim == 3 else "2-D inter-subject",
        "provenance": case["provenance"],
        "dice_affine": dice_aff, "dice_demons": dice_def,
        "mean_dice_affine": float(np.nanmean(list(dice_aff.values()))),
        "mean_dice_demons": float(np.nanmean(list(dice_def.values()))),
        "ncc_affine": float(ncc_aff), "ncc_demons": float(ncc_def),
        "seconds_affine": t_aff, "seconds_demons": t_def,
        "pieces": res.metrics["pieces"], "path_length": res.metrics["path_length"],
        "min_det_j": jac["min_det"], "percent_det_j_nonpositive": jac["percent_nonpositive"],
        "ndv_percent": jac.get("ndv_percent", jac.get("nda_percent")),
        "outputs": str(out), "qc_png": None,
    }
    publish_folder(out, fill, overwrite=True)
    return summary
