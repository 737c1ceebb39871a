"""register_lddmm benchmark: a 2-D growth toy (weighted-metamorphosis setting) with a QC PNG; same-subject 2-D brain
slices (the ITK proton-density slice and an MNI152 1 mm axial slice) under seeded smooth deformations of two
amplitudes; and nilearn's MNI152 at 2 mm against a known smooth deformation of itself. register_demons, and ANTs SyN
when antspyx is installed, run in the same process on the same pairs.

    NUMBA_NUM_THREADS=2 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 python -m benchmarks.lddmm [--cases toy2d slices2d mni]
        [--no-ants] [--ssd-too] [--full-too] [--out DIR]

Ground truth: the moving image is ``fixed∘ψ`` (ψ = id + u), so the fixed → moving map a registration estimates is
ψ⁻¹ (fixed-point inversion), not ψ. Before 2026-12-03 the MNI case compared the estimates with ψ: a perfect
registration scored about twice the no-registration error, which is why LDDMM looked no better than the identity
(docs/notes/lddmm.md). "SSD ceiling" is the SSD reduction of the true map with linear interpolation (the moving image
was made with cubic B-spline interpolation): no method that warps linearly does much better without overfitting.

Writes ``lddmm-<date>.json`` / ``.md`` and ``lddmm-toy2d-qc.png`` into benchmarks/results/ (or ``--out``).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

import classreg as cr
from classreg import evaluate

from ._common import RESULTS, markdown_table, peak_rss_mb, write_outputs


# ---------------------------------------------------------------------------------------------- data
def growth_toy(n=128, spacing=1.0):
    """Source: a small triangle surrounded by four ovals; target: the triangle grown ×1.7 and the ovals pushed
    outwards (the synthetic setting of the weighted-metamorphosis paper, at 128² instead of 300²)."""
    yy, xx = (np.indices((n, n)).astype(float) - (n - 1) / 2.0) / (n / 2.0)  # [-1, 1]

    def triangle(s):
        # equilateral triangle of "radius" s centred at 0
        a = np.zeros_like(xx, dtype=bool)
        inside = np.ones_like(a)
        for k in range(3):
            th = np.pi / 2 + 2 * np.pi * k / 3
            inside &= (xx * np.cos(th) + yy * np.sin(th)) >= -s / 2
        return inside.astype(float)

    def ovals(push):
        out = np.zeros_like(xx)
        for cy, cx in ((0.0, 0.55), (0.0, -0.55), (0.55, 0.0), (-0.55, 0.0)):
            r = np.hypot(cy, cx)
            cy2, cx2 = cy * (r + push) / r, cx * (r + push) / r
            ry, rx = (0.10, 0.16) if cy == 0 else (0.16, 0.10)
            out += (((yy - cy2) / ry) ** 2 + ((xx - cx2) / rx) ** 2 < 1).astype(float)
        return out

    def img(s, push):
        return ndimage.gaussian_filter(triangle(s) + 0.6 * ovals(push), 1.0).astype(np.float32)

    sp = (spacing, spacing)
    return cr.Image(img(0.55, 0.13), sp), cr.Image(img(0.32, 0.0), sp)  # fixed (target), moving (source)


def mni_known_deformation(amplitude=4.0, seed=0):
    """MNI152 2009a at 2 mm (fixed) and the same template warped by a smooth random field (moving = fixed∘ψ), with
    the GM/WM probability maps warped alike; returns fixed, moving, ψ (the true fixed → moving map is ψ⁻¹) and the
    tissue maps."""
    from classreg.data import mni152

    fixed = mni152("t1", resolution=2.0)
    gm, wm = mni152("gm", resolution=2.0), mni152("wm", resolution=2.0)
    rng = np.random.default_rng(seed)
    shape = fixed.shape
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 5.0) for _ in shape], -1)
    u *= amplitude / np.abs(u).max()
    psi = cr.DisplacementField.from_array_frame(u.astype(np.float32), fixed)
    moving = cr.resample(fixed, psi, reference=fixed, interpolation="bspline")
    gm_m = cr.resample(gm, psi, reference=fixed)
    wm_m = cr.resample(wm, psi, reference=fixed)
    return fixed, moving, psi, (gm, wm), (gm_m, wm_m)


def _labels(gm, wm):
    g, w = np.asarray(gm.data), np.asarray(wm.data)
    lab = np.zeros(g.shape, np.uint8)
    lab[(g > 0.5) & (g >= w)] = 1
    lab[(w > 0.5) & (w > g)] = 2
    return lab


# ---------------------------------------------------------------------------------------------- QC
def qc_png(path, fixed, moving, res, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional (bench extra)
        return None
    from classreg.kernels.diff import jacobian_determinant

    u = res.transform.displacement_array_frame()
    h = fixed.spacing_array_order
    det = jacobian_determinant(u, spacing=h)
    fig, ax = plt.subplots(2, 3, figsize=(12, 8))
    for a, (img, t) in zip(ax[0], ((moving.data, "source (moving)"), (fixed.data, "target (fixed)"),
                                   (res.warped.data, "source ∘ φ₁⁻¹ (LDDMM)"))):
        a.imshow(img, cmap="gray")
        a.set_title(t)
    traj = res.extras.get("trajectory_images")
    if traj:
        mid = traj[len(traj) // 2]
        ax[1, 0].imshow(mid, cmap="gray")
        ax[1, 0].set_title("geodesic at t = 1/2")
    ax[1, 1].imshow(res.warped.data, cmap="gray")
    step = max(1, fixed.shape[0] // 32)
    yy, xx = np.indices(fixed.shape).astype(float)
    gy, gx = yy + u[..., 0] / h[0], xx + u[..., 1] / h[1]
    for i in range(0, fixed.shape[0], step):
        ax[1, 1].plot(gx[i, :], gy[i, :], "r-", lw=0.5)
    for j in range(0, fixed.shape[1], step):
        ax[1, 1].plot(gx[:, j], gy[:, j], "r-", lw=0.5)
    ax[1, 1].set_title("φ₁⁻¹ grid (pull-back)")
    im = ax[1, 2].imshow(det, cmap="RdBu_r", vmin=0, vmax=2)
    ax[1, 2].set_title(f"det Dφ₁⁻¹ (min {det.min():.2f})")
    fig.colorbar(im, ax=ax[1, 2], fraction=0.046)
    for a in ax.ravel():
        a.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------------- cases
def run_toy(out_dir):
    fixed, moving = growth_toy()
    # warm-up (numba compile / cache load) on a tiny problem, untimed
    cr.register_lddmm(*growth_toy(24), shrink_factors=(1,), iterations=(2,))
    t0 = time.perf_counter()
    res = cr.register_lddmm(fixed, moving, metric="ssd", data_sigma=0.02, return_trajectory=True)
    wall = time.perf_counter() - t0
    stats = evaluate.jacobian_stats(res.transform)
    png = qc_png(Path(out_dir) / "lddmm-toy2d-qc.png", fixed, moving, res,
                 f"LDDMM growth toy: SSD {res.metrics['ssd_before']:.4f} → {res.metrics['ssd_after']:.4f}, "
                 f"geodesic length {res.metrics['geodesic_length']:.1f}, {wall:.1f} s")
    return [dict(case="toy2d 128² (growth)", method="register_lddmm (ssd)", wall_s=wall,
                 ssd_before=res.metrics["ssd_before"], ssd_after=res.metrics["ssd_after"],
                 geodesic_length=res.metrics["geodesic_length"], min_det=stats["min_det"],
                 det_nonpositive=stats["num_nonpositive"], inverse_error_voxels=res.metrics["inverse_error_voxels"],
                 iterations=res.metrics["iterations"], evaluations=res.metrics["evaluations"],
                 time_steps=res.params["time_steps"], qc_png=png)]


def _endpoint_error(transform, truth, reference, mask):
    """Mean |T(x) − T_true(x)| (mm) over ``mask``; ``truth`` the true fixed → moving displacement (array frame)."""
    est, _ = evaluate.dense_displacement(transform, reference)
    return float(np.linalg.norm(est - truth, axis=-1)[mask].mean())


def _plausibility(transform, reference, mask):
    """min det J and the count of det J ≤ 0 over the whole grid, SDlogJ inside ``mask``."""
    stats = evaluate.jacobian_stats(transform, reference=reference)
    inside = evaluate.jacobian_stats(transform, reference=reference, mask=mask)
    return dict(min_det=stats["min_det"], det_nonpositive=stats["num_nonpositive"], sdlogj=inside["sdlogj"])


def slices_2d():
    """Same-subject 2-D brain slices: the ITK example BrainProtonDensitySlice.png (Debian insighttoolkit5-examples)
    and nilearn's MNI152 2009a 1 mm axial slice 90, intensities scaled to [0, 1]."""
    from classreg.data import itk_example, mni152

    pd = cr.load(itk_example("BrainProtonDensitySlice.png"), dtype=np.float32)
    mni = mni152("t1", resolution=1.0).data[:, :, 90].astype(np.float32)
    return {"itk_pd": pd.like(pd.data / float(pd.data.max())),
            "mni_axial": cr.Image(np.ascontiguousarray(mni / mni.max()), (1.0, 1.0))}


def deformed_2d(fixed, seed, amplitude, correlation=8.0):
    """``fixed∘ψ`` for ψ = id + u, u Gaussian-smoothed white noise (σ ``correlation`` voxels, seeded) scaled to a
    largest component of ``amplitude`` mm; returns the moving image, the true fixed → moving displacement ψ⁻¹ − id
    (array frame, mm) and the evaluation mask (the slice's foreground, dilated by 3 voxels)."""
    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=fixed.shape), correlation) for _ in range(2)], -1)
    u *= amplitude / np.abs(u).max()
    psi = cr.DisplacementField.from_array_frame(u.astype(np.float32), fixed)
    moving = cr.resample(fixed, psi, reference=fixed, interpolation="bspline")
    truth, _ = evaluate.dense_displacement(psi.inverse(), fixed)
    return moving, truth, ndimage.binary_dilation(fixed.data > 0.05, iterations=3)


def run_slices(full_too=False):
    """Every slice × (seed 1, 3 mm), (seed 2, 6 mm): register_lddmm (and the full-grid method with ``full_too``)
    next to register_demons; SSD reduction, the ceiling, endpoint error, plausibility, time."""
    rows = []
    imgs = slices_2d()
    methods = [("register_lddmm", lambda f, m: cr.register_lddmm(f, m)),
               ("register_demons", lambda f, m: cr.register_demons(f, m))]
    if full_too:
        methods.insert(1, ("register_lddmm (full)", lambda f, m: cr.register_lddmm(f, m, method="full")))
    for _, run in methods:  # warm-up: kernels load from numba's cache (or compile), untimed
        run(*[imgs["itk_pd"]] * 2)
    for name, fixed in imgs.items():
        for seed, amp in ((1, 3.0), (2, 6.0)):
            moving, truth, mask = deformed_2d(fixed, seed, amp)
            s0 = float(np.mean((fixed.data - moving.data)[mask] ** 2))
            ideal = cr.resample(moving, cr.DisplacementField.from_array_frame(truth.astype(np.float32), fixed),
                                reference=fixed)
            ceiling = 1.0 - float(np.mean((fixed.data - ideal.data)[mask] ** 2)) / s0
            case = f"{name} {fixed.shape[1]}×{fixed.shape[0]}, seed {seed}, {amp:g} mm"
            rows.append(dict(case=case, method="(none)", wall_s=0.0, ssd_reduction=0.0, ssd_ceiling=ceiling,
                             epe_mm=float(np.linalg.norm(truth, axis=-1)[mask].mean())))
            for label, run in methods:
                t0 = time.perf_counter()
                res = run(fixed, moving)
                wall = time.perf_counter() - t0
                s1 = float(np.mean((fixed.data - np.asarray(res.warped.data))[mask] ** 2))
                rows.append(dict(case=case, method=label, wall_s=wall, ssd_reduction=1.0 - s1 / s0,
                                 ssd_ceiling=ceiling, epe_mm=_endpoint_error(res.transform, truth, fixed, mask),
                                 **_plausibility(res.transform, fixed, mask)))
    return rows


def run_mni(out_dir, use_ants=True, ssd_too=False, full_too=False):
    fixed, moving, psi, tissues_f, tissues_m = mni_known_deformation()
    lab_f = _labels(*tissues_f)
    brain = lab_f > 0
    truth, _ = evaluate.dense_displacement(psi.inverse(), fixed)
    rows = []

    def score(name, wall, transform, warped, extra=None):
        gm_w = cr.resample(tissues_m[0], transform, reference=fixed)
        wm_w = cr.resample(tissues_m[1], transform, reference=fixed)
        d = evaluate.dice(lab_f, _labels(gm_w, wm_w), labels=[1, 2])
        ssd_b = float(np.mean((fixed.data - moving.data)[brain] ** 2))
        ssd_a = float(np.mean((fixed.data - np.asarray(warped.data))[brain] ** 2))
        row = dict(case="MNI152 2 mm, known 4 mm field", method=name, wall_s=wall, dice_gm=d[1], dice_wm=d[2],
                   epe_mm=_endpoint_error(transform, truth, fixed, brain), ssd_ratio=ssd_a / ssd_b,
                   **_plausibility(transform, fixed, brain))
        row.update(extra or {})
        rows.append(row)

    d0 = evaluate.dice(lab_f, _labels(*tissues_m), labels=[1, 2])
    rows.append(dict(case="MNI152 2 mm, known 4 mm field", method="(none)", wall_s=0.0, dice_gm=d0[1],
                     dice_wm=d0[2], epe_mm=float(np.linalg.norm(truth, axis=-1)[brain].mean()), ssd_ratio=1.0))
    cr.register_lddmm(*growth_toy(24), shrink_factors=(1,), iterations=(2,))  # warm-up
    t0 = time.perf_counter()
    res = cr.register_lddmm(fixed, moving)
    wall = time.perf_counter() - t0
    score(f"register_lddmm ({res.params['metric']})", wall, res.transform, res.warped,
          dict(geodesic_length=res.metrics["geodesic_length"], iterations=res.metrics["iterations"],
               evaluations=res.metrics["evaluations"], inverse_error_voxels=res.metrics["inverse_error_voxels"],
               time_steps=res.params["time_steps"], level_s=[round(t, 1) for t in res.timings["levels"]]))
    extra_runs = ([("register_lddmm (ssd)", dict(metric="ssd"))] if ssd_too else []) + \
        ([("register_lddmm (full grid)", dict(method="full"))] if full_too else [])
    for label, kw in extra_runs:
        t0 = time.perf_counter()
        res = cr.register_lddmm(fixed, moving, **kw)
        wall = time.perf_counter() - t0
        score(label, wall, res.transform, res.warped,
              dict(geodesic_length=res.metrics["geodesic_length"], iterations=res.metrics["iterations"],
                   evaluations=res.metrics["evaluations"], inverse_error_voxels=res.metrics["inverse_error_voxels"],
                   time_steps=res.params["time_steps"], level_s=[round(t, 1) for t in res.timings["levels"]]))
    t0 = time.perf_counter()
    dem = cr.register_demons(fixed, moving)
    score("register_demons", time.perf_counter() - t0, dem.transform, dem.warped)
    if use_ants:
        try:
            import ants
        except ImportError:
            ants = None
        if ants is not None:
            with tempfile.TemporaryDirectory() as tmp:
                cr.save(fixed, Path(tmp) / "f.nii.gz")
                cr.save(moving, Path(tmp) / "m.nii.gz")
                f_a, m_a = ants.image_read(str(Path(tmp) / "f.nii.gz")), ants.image_read(str(Path(tmp) / "m.nii.gz"))
                t0 = time.perf_counter()
                reg = ants.registration(f_a, m_a, type_of_transform="SyNOnly", initial_transform="identity")
                wall = time.perf_counter() - t0
                field = cr.load_transform(reg["fwdtransforms"][0])
                warped_path = Path(tmp) / "w.nii.gz"
                ants.image_write(reg["warpedmovout"], str(warped_path))
                score("ANTs SyNOnly (antspyx)", wall, field, cr.load(warped_path))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["toy2d", "slices2d", "mni"], choices=["toy2d", "slices2d", "mni"])
    p.add_argument("--no-ants", action="store_true")
    p.add_argument("--ssd-too", action="store_true", help="MNI case: also run register_lddmm with metric='ssd'")
    p.add_argument("--full-too", action="store_true", help="also run register_lddmm(method='full')")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if "toy2d" in args.cases:
        rows += run_toy(out)
    if "slices2d" in args.cases:
        rows += run_slices(full_too=args.full_too)
    if "mni" in args.cases:
        rows += run_mni(out, use_ants=not args.no_ants, ssd_too=args.ssd_too, full_too=args.full_too)
    cols = [("case", "case"), ("method", "method"), ("wall_s", "wall (s)"), ("ssd_before", "SSD before"),
            ("ssd_after", "SSD after"), ("ssd_ratio", "SSD after/before"), ("ssd_reduction", "SSD reduction"),
            ("ssd_ceiling", "SSD ceiling"), ("dice_gm", "Dice GM"),
            ("dice_wm", "Dice WM"), ("epe_mm", "mean EPE (mm)"), ("geodesic_length", "geodesic length"),
            ("min_det", "min det J"), ("det_nonpositive", "det J ≤ 0 (voxels)"), ("sdlogj", "SDlogJ"),
            ("iterations", "L-BFGS its"),
            ("time_steps", "time steps per level"), ("level_s", "seconds per level")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    table = markdown_table(rows, cols)
    env = {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    jpath, mpath = write_outputs("lddmm", {"rows": rows, "env": env, "peak_rss_mb": peak_rss_mb()}, table, out)
    print(table)
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
