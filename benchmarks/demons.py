"""register_demons side by side with SimpleITK demons, DIPY SyN (CC) and ANTs (antspyx SyN, SyNCC), in one run.

    python -m benchmarks.demons [--cases inter3d synth3d brain2d circle2d] [--tools ...] [--threads 2]

Cases (all data ships inside installed packages; see ``classreg.data``):

* ``inter3d``: nilearn MNI152 2 mm (fixed) ← ITK's real T1 subject ``KmeansTest_T1UCharRaw`` (moving), both
  skull-stripped; one affine pre-alignment (SimpleITK Mattes MI, deterministic) shared by every tool; Dice of
  CSF/GM/WM (template GM/WM argmax vs the shipped k-means labels).
* ``synth3d``: MNI152 2 mm warped by a known smooth diffeomorphism (seed 0, max 8 mm): mean endpoint error in the
  brain and Dice of the template's own labels.
* ``brain2d``: dipy's real T1 coronal slice ← an MNI152 coronal slice (affine pre-aligned), Dice of 3 classes.
* ``circle2d``: dipy's circle → C (large deformation): SSD after registration.

Every tool registers the affinely pre-aligned moving image (resampled once onto the fixed grid) to the fixed image;
its output is converted to a classreg transform by warping *coordinate images* with the tool's own resampler (so no
convention of the tool is trusted), and all metrics are computed by ``classreg.evaluate`` on that transform: Dice,
% det J ≤ 0 and NDV (of the deformable part), wall time, peak RSS of the process that ran the tool (each tool runs in
its own subprocess; RSS includes the libraries' baseline). Threads: ``--threads`` for numba, ITK and OpenMP.
Writes JSON and a markdown table into ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = ("inter3d", "synth3d", "brain2d", "circle2d")
TOOLS = ("classreg_demons", "sitk_diffeo_demons", "dipy_syn_cc", "ants_syn", "ants_syncc")


# ------------------------------------------------------------------------------------------------ cases
def make_case(name: str, workdir: Path) -> dict:
    """Build the case once (fixed, pre-aligned moving on the fixed grid, labels, truth) and save it to workdir."""
    import classreg as cr
    from classreg.demo import _brain_pair_2d, affine_prealign

    workdir.mkdir(parents=True, exist_ok=True)
    info = {"name": name}
    if name == "inter3d":
        from classreg.data import brain_pair_3d

        c = brain_pair_3d(resolution=2.0)
        aff = affine_prealign(c["fixed"], c["moving"], fixed_mask=c["fixed_mask"])
        fixed, moving, flab = c["fixed"], cr.resample(c["moving"], aff, reference=c["fixed"]), c["fixed_labels"]
        mlab = cr.resample(c["moving_labels"], aff, reference=c["fixed"], interpolation="label")
        info["provenance"] = c["provenance"]
    elif name == "synth3d":
        from scipy import ndimage

        from classreg.data import brain_pair_3d

        c = brain_pair_3d(resolution=2.0)
        fixed, flab = c["fixed"], c["fixed_labels"]
        rng = np.random.default_rng(0)
        u = np.stack([ndimage.gaussian_filter(rng.normal(size=fixed.shape), 6.0) for _ in range(3)], -1)
        u *= 8.0 / np.abs(u).max()
        psi = cr.DisplacementField.from_array_frame(u.astype(np.float32), fixed)
        moving = cr.resample(fixed, psi, reference=fixed)
        mlab = cr.resample(flab, psi, reference=fixed, interpolation="label")
        truth = psi.inverse()
        truth.save(workdir / "truth.nii.gz")
        info["provenance"] = "MNI152 2 mm warped by Gaussian-smoothed noise (σ 6 voxels, seed 0, max 8 mm)"
    elif name == "brain2d":
        c = _brain_pair_2d()
        aff = affine_prealign(c["fixed"], c["moving"], fixed_mask=c["fixed_mask"])
        fixed, flab = c["fixed"], c["fixed_labels"]
        moving = cr.resample(c["moving"], aff, reference=fixed)
        mlab = cr.resample(c["moving_labels"], aff, reference=fixed, interpolation="label")
        info["provenance"] = c["provenance"]
    elif name == "circle2d":
        from classreg.data import dipy_file

        fixed = cr.Image(np.load(dipy_file("C.npy")).astype(np.float32), (1.0, 1.0))
        moving = cr.Image(np.load(dipy_file("circle.npy")).astype(np.float32), (1.0, 1.0))
        flab = fixed.like((fixed.data > 0.5).astype(np.uint8))
        mlab = moving.like((moving.data > 0.5).astype(np.uint8))
        info["provenance"] = "dipy circle.npy -> C.npy (synthetic)"
    else:
        raise ValueError(f"unknown case {name!r}; choose from {CASES}")
    for key, img in (("fixed", fixed), ("moving", moving), ("fixed_labels", flab), ("moving_labels", mlab)):
        cr.save(img, workdir / f"{key}.nii.gz")
    (workdir / "case.json").write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------------------ tools
def _coords(img):
    """World coordinate images (one per axis) of ``img``'s grid."""
    return [img.like(np.ascontiguousarray(img.grid_points()[..., k])) for k in range(img.ndim)]


def run_tool(tool: str, workdir: Path, threads: int) -> dict:
    """Run one tool on the saved case; returns its timing and the path of the fixed-grid displacement it produced."""
    import classreg as cr

    fixed = cr.load(workdir / "fixed.nii.gz", dtype=np.float32)
    moving = cr.load(workdir / "moving.nii.gz", dtype=np.float32)
    warmup = None
    if tool == "classreg_demons":  # numba kernels load from the on-disk cache (or compile) on first use: not timed
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        a = rng.random((24,) * fixed.ndim, dtype=np.float32)
        cr.register_demons(cr.Image(a, fixed.spacing), cr.Image(np.roll(a, 1, axis=0), fixed.spacing),
                           iterations=(2, 2, 2), max_pieces=2)
        warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    if tool == "classreg_demons":
        res = cr.register_demons(fixed, moving)
        field = res.transform
        extra = {"pieces": res.metrics["pieces"], "path_length": res.metrics["path_length"]}
    elif tool == "sitk_diffeo_demons":
        import SimpleITK as sitk

        f, m = fixed.to_sitk(), moving.to_sitk()
        m = sitk.HistogramMatching(m, f, 1024, 7, True)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(100)
        demons.SetStandardDeviations(1.5)
        demons.SetSmoothDisplacementField(True)
        demons.SetUseGradientType(demons.Symmetric)
        disp = _sitk_multires(demons, f, m, shrink=(4, 2, 1))
        field = cr.DisplacementField(cr.Image.from_sitk(disp))
        extra = {"iterations": "100 per level, shrink 4/2/1"}
    elif tool == "dipy_syn_cc":
        from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
        from dipy.align.metrics import CCMetric

        sdr = SymmetricDiffeomorphicRegistration(CCMetric(fixed.ndim), level_iters=[100, 50, 25])
        mapping = sdr.optimize(fixed.data, moving.data, static_grid2world=fixed.affine,
                               moving_grid2world=fixed.affine)
        warped_coords = [mapping.transform(c.data, interpolation="linear") for c in _coords(fixed)]
        field = _field_from_coords(fixed, warped_coords)
        extra = {}
    elif tool in ("ants_syn", "ants_syncc"):
        import ants

        f, m = _to_ants(fixed), _to_ants(moving)
        kind = "SyN" if tool == "ants_syn" else "SyNCC"
        out = ants.registration(fixed=f, moving=m, type_of_transform=kind, random_seed=1)
        warped_coords = [ants.apply_transforms(fixed=f, moving=_to_ants(c), transformlist=out["fwdtransforms"],
                                               interpolator="linear").numpy().T for c in _coords(fixed)]
        field = _field_from_coords(fixed, warped_coords)
        extra = {"type_of_transform": kind}
    else:
        raise ValueError(f"unknown tool {tool!r}")
    seconds = time.perf_counter() - t0
    path = workdir / f"{tool}_field.nii.gz"
    field.save(path)
    if warmup is not None:
        extra["first_call_overhead_s"] = warmup
    return {"seconds": seconds, "field": str(path), **extra}


def _sitk_multires(demons, f, m, shrink):
    """SimpleITK demons with a simple coarse-to-fine wrapper (the filters are single-resolution)."""
    import SimpleITK as sitk

    disp = None
    for s in shrink:
        fs = sitk.Shrink(sitk.SmoothingRecursiveGaussian(f, 0.5 * s), [s] * f.GetDimension()) if s > 1 else f
        ms = sitk.Shrink(sitk.SmoothingRecursiveGaussian(m, 0.5 * s), [s] * f.GetDimension()) if s > 1 else m
        if disp is not None:
            disp = sitk.Resample(disp, fs, sitk.Transform(), sitk.sitkLinear, 0.0, disp.GetPixelID())
            disp = demons.Execute(fs, ms, disp)
        else:
            disp = demons.Execute(fs, ms)
    return disp


def _to_ants(img):
    import ants

    return ants.from_numpy(np.ascontiguousarray(img.numpy().astype(np.float32).T), origin=list(img.origin),
                           spacing=list(img.spacing), direction=img.direction_matrix)


def _field_from_coords(fixed, warped_coords):
    import classreg as cr

    mapped = np.stack([np.asarray(c, dtype=np.float64) for c in warped_coords], axis=-1)
    return cr.DisplacementField.from_array(mapped - fixed.grid_points(), fixed)


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(tool_out: dict, workdir: Path) -> dict:
    import classreg as cr
    from classreg import evaluate as ev

    fixed = cr.load(workdir / "fixed.nii.gz", dtype=np.float32)
    moving = cr.load(workdir / "moving.nii.gz", dtype=np.float32)
    flab = cr.load(workdir / "fixed_labels.nii.gz")
    mlab = cr.load(workdir / "moving_labels.nii.gz")
    field = cr.load_transform(tool_out["field"])
    warped_lab = cr.resample(mlab, field, reference=fixed, interpolation="label")
    labels = [int(v) for v in np.unique(flab.data) if v != 0]
    dice = ev.dice(flab, warped_lab, labels=labels)
    brain = flab.data > 0
    jac = ev.jacobian_stats(field, mask=brain)
    warped = cr.resample(moving, field, reference=fixed)
    out = {"dice": {str(k): v for k, v in dice.items()}, "mean_dice": float(np.nanmean(list(dice.values()))),
           "ncc": -cr.metrics.ncc(fixed.data, warped.data, mask=brain), "percent_det_nonpositive":
           jac["percent_nonpositive"], "ndv_percent": jac.get("ndv_percent", jac.get("nda_percent")),
           "min_det": jac["min_det"]}
    if (workdir / "truth.nii.gz").is_file():
        truth = cr.load_transform(workdir / "truth.nii.gz")
        pts = fixed.grid_points()[brain]
        out["epe_mm"] = float(np.linalg.norm(field.map_points(pts) - truth.map_points(pts), axis=1).mean())
    return out


# ------------------------------------------------------------------------------------------------ driver
def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def _child(args) -> int:
    out = run_tool(args.tool, Path(args.workdir), args.threads)
    out["peak_rss_mb"] = _peak_rss_mb()
    Path(args.result).write_text(json.dumps(out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--child-tool", dest="tool", help=argparse.SUPPRESS)
    p.add_argument("--child-workdir", dest="workdir", help=argparse.SUPPRESS)
    p.add_argument("--child-result", dest="result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tool:
        return _child(args)
    from ._common import markdown_table, write_outputs

    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads),
               OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    rows = []
    with tempfile.TemporaryDirectory(prefix="classreg-bench-") as tmp:
        for case in args.cases:
            wd = Path(tmp) / case
            try:
                info = make_case(case, wd)
            except FileNotFoundError as exc:
                print(f"skip case {case}: {exc}", file=sys.stderr)
                continue
            for tool in args.tools:
                res_path = wd / f"{tool}.json"
                cmd = [sys.executable, "-m", "benchmarks.demons", "--child-tool", tool, "--child-workdir", str(wd),
                       "--child-result", str(res_path), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                    print(f"  {case}/{tool}: failed or unavailable ({tail[0]})", file=sys.stderr)
                    rows.append({"case": case, "tool": tool, "note": f"failed: {tail[0][:120]}"})
                    continue
                out = json.loads(res_path.read_text())
                out.update(evaluate(out, wd))
                out.update(case=case, tool=tool, provenance=info.get("provenance"))
                out.pop("field", None)
                rows.append(out)
                print(f"  {case}/{tool}: {out['seconds']:.1f} s, mean Dice {out['mean_dice']:.3f}, "
                      f"det<=0 {out['percent_det_nonpositive']:.4f} %", file=sys.stderr)
    # ratios against ANTs SyN per case
    for case in args.cases:
        ref = next((r for r in rows if r["case"] == case and r["tool"] == "ants_syn" and "seconds" in r), None)
        for r in rows:
            if r["case"] == case and ref is not None and "seconds" in r:
                r["time_vs_ants_syn"] = r["seconds"] / ref["seconds"]
                r["dice_minus_ants_syn"] = r["mean_dice"] - ref["mean_dice"]
    table = markdown_table(rows, [("case", "case"), ("tool", "tool"), ("mean_dice", "mean Dice"),
                                  ("epe_mm", "EPE mm"), ("ncc", "NCC"), ("percent_det_nonpositive", "% det J ≤ 0"),
                                  ("ndv_percent", "NDV %"), ("seconds", "time s"),
                                  ("time_vs_ants_syn", "time / ANTs SyN"), ("peak_rss_mb", "peak RSS MB"),
                                  ("note", "note")])
    jpath, mpath = write_outputs("demons", {"threads": args.threads, "rows": rows}, table, args.out)
    print(table)
    print(f"\nwrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
