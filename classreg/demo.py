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

__all__ = ["affine_prealign", "docs_figures", "run_demo"]


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
            "moving_mask": None, "plane": "coronal",
            "provenance": "fixed: dipy t1_coronal_slice.npy (treated as 1 mm); moving: nilearn MNI152 2009a 1 mm "
                          f"coronal slice {k}; labels: MNI GM/WM argmax vs intensity tertiles of the dipy slice"}


def run_demo(out_dir, *, prefer_3d: bool = True, progress: bool = True, max_pieces: int = 5, qc: bool = True) -> dict:
    """Run the demo registration and write its outputs into ``out_dir``; returns the summary dict.

    Writes ``qc.png`` (:func:`classreg.qc.qc_figure` with the tissue labels, so its summary shows Dice before and
    after; not with ``qc=False``), ``warped.nii.gz``, the transforms, ``params.json``, ``history.csv``,
    ``result.json``, ``fixed.nii.gz``, ``moving_affine.nii.gz`` and ``demo_summary.json`` (which also lists the
    size of every file written).
    """
    from . import evaluate, register_affine, register_demons, terms  # the public API, like any script
    from .io import save
    from .resample import resample
    from .result import _fill, check_result_folder, publish_folder

    out = Path(out_dir)
    check_result_folder(out, overwrite=True)  # a re-run replaces the previous demo's folder, never other files
    case = _pair(prefer_3d)
    fixed, moving = case["fixed"], case["moving"]
    t0 = time.perf_counter()
    aff = register_affine(fixed, moving, progress=progress).transform
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
    want_qc, qc = qc, None

    def fill(d):
        nonlocal qc
        _fill(res, d, True)
        save(fixed, d / "fixed.nii.gz")
        save(resample(moving, aff, reference=fixed), d / "moving_affine.nii.gz")
        if want_qc:
            try:
                from .qc import qc_figure

                qc = qc_figure(res, moving, d / "qc.png", fixed=fixed, fixed_labels=case["fixed_labels"],
                               moving_labels=case["moving_labels"], plane=case.get("plane", "axial"),
                               title=f"classreg demo ({summary['case']}): demons after affine")
            except ImportError as exc:
                logger.warning("no QC figure: %s", exc)
        summary["qc_png"] = str(out / "qc.png") if qc else None
        summary["file_bytes"] = {f.name: f.stat().st_size for f in sorted(d.iterdir())}
        summary["total_bytes"] = sum(summary["file_bytes"].values())
        (d / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    summary = {
        "case": "3-D inter-subject" if fixed.ndim == 3 else "2-D inter-subject",
        "provenance": case["provenance"],
        "dice_affine": dice_aff, "dice_demons": dice_def,
        "mean_dice_affine": float(np.nanmean(list(dice_aff.values()))),
        "mean_dice_demons": float(np.nanmean(list(dice_def.values()))),
        "ncc_affine": float(ncc_aff), "ncc_demons": float(ncc_def),
        "mask": "brain mask" if fixed.ndim == 3 else "head's foreground",  # where NCC and det J are measured
        "seconds_affine": t_aff, "seconds_demons": t_def,
        "pieces": res.metrics["pieces"], "path_length": res.metrics["path_length"],
        "min_det_j": jac["min_det"], "percent_det_j_nonpositive": jac["percent_nonpositive"],
        "ndv_percent": jac.get("ndv_percent", jac.get("nda_percent")),
        "outputs": str(out), "qc_png": None,
    }
    publish_folder(out, fill, overwrite=True)
    return summary


def docs_figures(folder, *, max_bytes: int = 300_000) -> list:
    """Regenerate the QC figures that docs/qc.md shows: the 2-D and 3-D demos' ``qc.png`` (``qc-demo-2d.png``,
    ``qc-demo-3d.png``) and a point-set example (``qc-points.png``: a seeded synthetic pair, 3-D), each reduced to
    an adaptive 256-colour palette so that it stays below ``max_bytes``. Returns the written paths.

    Command: ``python -m classreg.demo --docs-figures docs/img``.
    """
    import shutil
    import tempfile

    from PIL import Image as PILImage

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def publish(png, name):
        out = folder / name
        with PILImage.open(png) as im:
            im.convert("RGB").quantize(256, method=PILImage.Quantize.MEDIANCUT).save(out, optimize=True)
        if out.stat().st_size > max_bytes:
            logger.warning("%s is %d bytes (more than %d)", out, out.stat().st_size, max_bytes)
        written.append(out)

    with tempfile.TemporaryDirectory() as tmp:
        for prefer_3d, name in ((False, "qc-demo-2d.png"), (True, "qc-demo-3d.png")):
            s = run_demo(Path(tmp) / name.removesuffix(".png"), prefer_3d=prefer_3d, progress=False)
            if prefer_3d and not s["case"].startswith("3-D"):
                logger.warning("the 3-D demo data is not installed (apt-get install insighttoolkit5-examples); "
                               "%s not written", name)
                continue
            publish(Path(s["qc_png"]), name)
        png = Path(tmp) / "points.png"
        _points_example(png)
        publish(png, "qc-points.png")
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _points_example(path) -> None:
    """A seeded synthetic point-set registration (a curved sheet and a blob, bent and shifted) and its QC figure."""
    from . import register_points
    from .qc import qc_points

    rng = np.random.default_rng(7)
    u, v = rng.uniform(-1, 1, (2, 600))
    sheet = np.column_stack([40 * u, 25 * v, 10 * np.sin(2 * u)])
    blob = rng.normal(scale=5.0, size=(200, 3)) + [30.0, 10.0, 25.0]  # on the patient's left, superior
    target = np.vstack([sheet, blob])
    source = target + np.column_stack([6 * np.sin(target[:, 1] / 15), 4 * np.cos(target[:, 0] / 20),
                                       np.full(len(target), 5.0)])
    source = source[rng.permutation(len(source))[:700]]
    res = register_points(source, target, deformation=20.0, bandwidth=15.0)
    qc_points(res, source, target, path, title="register_points: a bent sheet and a blob")


def main(argv=None) -> int:
    """``python -m classreg.demo --docs-figures DIR``: regenerate docs/qc.md's figures."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m classreg.demo", description=main.__doc__)
    p.add_argument("--docs-figures", metavar="DIR", required=True, help="folder for the PNGs (docs/img)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in docs_figures(args.docs_figures):
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
