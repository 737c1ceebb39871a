"""CSNGF global rigid alignment (register_rigid, METHODS.md §5): FFT vs direct speed, and multimodal 2-D trials side
by side with SimpleITK's local MI rigid registration.

Run::

    NUMBA_NUM_THREADS=1 python -m benchmarks.rigid_ngf                # 50 trials
    NUMBA_NUM_THREADS=1 python -m benchmarks.rigid_ngf --trials 10 --paper-schedule

Part 1 — one full CSNGF shift map of a random side^d image pair with partial masks, side 16, 32, 64 (2-D) and 16
(3-D; 32 with ``--direct-3d-32``): the direct loop over shifts (:func:`classreg.solvers.rigid.csngf.csngf_direct`,
numpy, float64) against the FFT (:class:`~classreg.solvers.rigid.csngf.CrossSimilarityNGF`, float32) — per map with
the fixed spectra cached (what the rotation search pays) and including the fixed-side set-up; max |difference| over
valid shifts.

Part 2 — ITK's BrainT1SliceBorder20 (fixed) vs BrainProtonDensitySliceBorder20 moved by random rigid transforms
(rotation uniform in ±180°, shift uniform ±30 mm per axis, seed 2022), success = mean displacement of the 4 image
corners < 5 px (the paper's d_E): register_rigid (a short 2-D schedule, and the paper's schedule with
``--paper-schedule``) vs SimpleITK Euler2D + Mattes MI (50 bins, all pixels) + RegularStepGradientDescent, 3 levels
(shrink 4/2/1, σ 2/1/0 px), centred (geometry) initialiser — the elastix-style local method.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from ._common import markdown_table, peak_rss_mb, timeit, write_outputs

SHORT_2D = dict(shrink_factors=(4, 2, 2, 1), samples=(360, 200, 60, 0), perturbation=(10, 3, 0), keep=(20, 3, 1))


def speed(sides_2d=(16, 32, 64), sides_3d=(16,)):
    from scipy import ndimage

    from classreg.solvers.rigid.csngf import CrossSimilarityNGF, csngf_direct

    rows = []
    for ndim, sides in ((2, sides_2d), (3, sides_3d)):
        for side in sides:
            rng = np.random.default_rng(side)
            shape = (side,) * ndim
            a = ndimage.gaussian_filter(rng.random(shape), 1.0)
            b = ndimage.gaussian_filter(rng.random(shape), 1.0)
            ma, mb = rng.random(shape) > 0.2, rng.random(shape) > 0.2
            t0 = time.perf_counter()
            ref = csngf_direct(a, b, a_mask=ma, b_mask=mb)
            t_direct = time.perf_counter() - t0
            meas = CrossSimilarityNGF(a, shape, a_mask=ma)
            t_cached = timeit(lambda: meas(b, mb), repeat=7)["median_s"]
            t_setup = timeit(lambda: CrossSimilarityNGF(a, shape, a_mask=ma)(b, mb), repeat=5)["median_s"]
            got = meas(b, mb)
            rows.append(dict(ndim=ndim, side=side, shifts=int(np.prod(ref.score.shape)), direct_s=t_direct,
                             fft_s=t_cached, fft_with_setup_s=t_setup, speedup=t_direct / t_cached,
                             speedup_with_setup=t_direct / t_setup,
                             max_abs_diff=float(np.abs(got.score - ref.score)[ref.valid].max())))
            print(f"speed {ndim}-D side {side}: direct {t_direct:.3g} s, FFT {t_cached * 1e3:.3g} ms "
                  f"(x{t_direct / t_cached:.0f})", flush=True)
    return rows


def _corners(img):
    sh = img.shape
    idx = np.array(np.meshgrid(*[(0, s - 1) for s in sh], indexing="ij")).reshape(len(sh), -1).T
    return img.index_to_world(idx.astype(float))


def _sitk_mi_rigid(fixed, moving):
    """SimpleITK Euler2D, Mattes MI (50 bins, all pixels), regular-step GD, 3 levels, centred initialiser."""
    import SimpleITK as sitk

    f = fixed.to_sitk()
    m = moving.to_sitk()
    init = sitk.CenteredTransformInitializer(f, m, sitk.Euler2DTransform(),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=300,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    tx = reg.Execute(f, m)
    return lambda pts: np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in pts])


def trials_2d(n, seed=2022, paper=False):
    import classreg as cr
    from classreg.data import itk_example_image

    fixed = itk_example_image("BrainT1SliceBorder20.png", dtype=np.float32)
    pd = itk_example_image("BrainProtonDensitySliceBorder20.png", dtype=np.float32)
    c = fixed.index_to_world(np.array([[(s - 1) / 2.0 for s in fixed.shape]]))[0]
    corners = _corners(fixed)
    methods = {"CSNGF short (360/200/60/0)": lambda f, m: cr.register_rigid(f, m, **SHORT_2D).transform.map_points}
    if paper:
        methods["CSNGF paper (5000/3000/300/0)"] = lambda f, m: cr.register_rigid(f, m).transform.map_points
    methods["SimpleITK MI + RegularStepGD (local)"] = _sitk_mi_rigid
    rng = np.random.default_rng(seed)
    cr.register_rigid(fixed, pd, **SHORT_2D)  # warm-up: numba kernels load from cache / compile
    per = {k: [] for k in methods}
    for i in range(n):
        ang, shift = rng.uniform(-180, 180), rng.uniform(-30, 30, 2)
        truth = cr.Affine.euler([np.deg2rad(ang)], translation=shift, center=c)
        moving = cr.resample(pd, truth.inverse(), reference=pd)
        for name, fn in methods.items():
            t0 = time.perf_counter()
            mapper = fn(fixed, moving)
            dt = time.perf_counter() - t0
            err = float(np.linalg.norm(mapper(corners) - truth.map_points(corners), axis=1).mean())
            per[name].append(dict(trial=i, angle=float(ang), shift=shift.tolist(), error_px=err, seconds=dt))
        print(f"trial {i}: angle {ang:7.1f} " + "  ".join(f"{k.split()[0]}: {v[-1]['error_px']:.2f} px "
                                                           f"{v[-1]['seconds']:.2f} s" for k, v in per.items()),
              flush=True)
    rows = []
    for name, recs in per.items():
        err = np.array([r["error_px"] for r in recs])
        sec = np.array([r["seconds"] for r in recs])
        rows.append(dict(method=name, trials=len(recs), success=float(np.mean(err < 5.0)),
                         median_error_px=float(np.median(err)), median_s=float(np.median(sec)),
                         mean_s=float(np.mean(sec))))
    return rows, per


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=2022)
    p.add_argument("--paper-schedule", action="store_true", help="also run register_rigid's default schedule")
    p.add_argument("--direct-3d-32", action="store_true", help="also time the 3-D side-32 direct map (minutes)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--out", help="output folder (default benchmarks/results)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    speed_rows = [] if args.skip_speed else speed(sides_3d=(16, 32) if args.direct_3d_32 else (16,))
    trial_rows, per = trials_2d(args.trials, args.seed, args.paper_schedule) if args.trials > 0 else ([], {})
    table = ("## FFT vs direct CSNGF (one full shift map, partial masks)\n\n"
             + markdown_table(speed_rows, [("ndim", "dim"), ("side", "side"), ("shifts", "shifts"),
                                           ("direct_s", "direct s"), ("fft_s", "FFT s (cached fixed)"),
                                           ("fft_with_setup_s", "FFT s (incl. fixed set-up)"),
                                           ("speedup", "speed-up"), ("speedup_with_setup", "speed-up incl. set-up"),
                                           ("max_abs_diff", "max |FFT - direct|")])
             + f"\n\n## ITK T1 vs PD, {args.trials} random rigid trials (±180°, ±30 px, seed {args.seed}); "
               "success = mean corner displacement < 5 px\n\n"
             + markdown_table(trial_rows, [("method", "method"), ("trials", "trials"), ("success", "success rate"),
                                           ("median_error_px", "median corner error px"),
                                           ("median_s", "median s / alignment"), ("mean_s", "mean s")]))
    payload = dict(speed=speed_rows, trials=trial_rows, per_trial=per, wall_s=time.perf_counter() - t0,
                   peak_rss_mb=peak_rss_mb(), schedule_short=SHORT_2D, seed=args.seed)
    j, m = write_outputs("rigid_ngf", payload, table, args.out)
    print(table)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
