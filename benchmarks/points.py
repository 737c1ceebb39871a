"""Point-set registration benchmark: classreg.register_points (BCPD / MO-BCPD) side by side with probreg.

Cases (DATA.md "Point sets"; fsaverage5 from nilearn, nothing downloaded):

* P1  fsaverage5 left pial → left white, N points (shared vertex indices = ground-truth correspondence);
* P1r the other direction, left white → left pial (same points);
* P2  left pial → itself after a smooth RBF warp (20 centres, σ = 25 mm, max 6 mm), 10° about z, (3, -2, 1) mm;
* MO  four ellipsoidal organs with independent motions (tests/test_points.py): plain BCPD vs OMC-MO-BCPD, TRE on
      held-out interior landmarks;
* T5k 5000 points per side (P1 geometry), register_points' defaults: wall time (median and minimum of
      ``--t5k-repeat`` runs after a warm-up run; the 1-minute load average is recorded because the machine is shared),
      peak memory of the call (numpy allocations traced by tracemalloc in one extra run) and the process peak RSS;
      also with ``estep="exact"`` (no Nyström E-step phase) for comparison.

classreg runs with register_points' defaults (the two-scale kernel whose scales follow from the source's RMS radius
and mean point spacing, docs/solvers/points.md); its P1/P1r/P2 wall time is the median of ``--repeat`` runs after a
warm-up run. probreg (CPD rigid+nonrigid, CPD nonrigid, BCPD) runs on the same P1/P1r/P2 points when installed, in
coordinates normalised by the target centroid and RMS radius (as in DATA.md), with errors reported in mm.

Run ``python -m benchmarks.points [--n 2000] [--repeat 5] [--probreg-maxiter 500] [--skip-probreg-bcpd]
[--skip-probreg] [--only-t5k] [--t5k-repeat 5]``. classreg rows also give the median process CPU time of the
timed calls (less affected than wall time by other processes on a shared machine).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
import tracemalloc

import numpy as np

from ._common import markdown_table, peak_rss_mb, write_outputs


def _fsaverage(n, seed=0):
    from nilearn import datasets, surface

    fs = datasets.fetch_surf_fsaverage("fsaverage5")
    pial = np.asarray(surface.load_surf_mesh(fs["pial_left"])[0], float)
    white = np.asarray(surface.load_surf_mesh(fs["white_left"])[0], float)
    idx = np.sort(np.random.default_rng(seed).choice(len(pial), n, replace=False))
    return pial[idx], white[idx]


def _p2(pial, seed=0):
    from classreg.transforms import rotation_matrix

    rng = np.random.default_rng(seed)
    cen = pial[rng.choice(len(pial), 20, replace=False)]
    amp = rng.normal(size=(20, 3))
    w = np.exp(-((pial[:, None] - cen[None]) ** 2).sum(-1) / (2 * 25.0**2))
    disp = w @ amp
    disp *= 6.0 / np.linalg.norm(disp, axis=1).max()
    c = pial.mean(0)
    return (pial + disp - c) @ rotation_matrix([0, 0, np.radians(10)]).T + c + [3.0, -2.0, 1.0]


def _probreg_available():
    if importlib.util.find_spec("probreg") is None:
        return False, "probreg not installed (pip install probreg; it pulls open3d, ~0.9 GB)"
    try:
        import probreg  # noqa: F401  (imports open3d, which needs system libraries such as libusb-1.0)
    except Exception as exc:
        return False, f"probreg installed but not importable: {exc}"
    return True, ""


def _err(moved, truth):
    return float(np.linalg.norm(moved - truth, axis=1).mean())


def _run_classreg(src, tgt, cpu=None, **kw):
    """``(result, wall s)``; the process CPU time of the call is appended to the list ``cpu`` when given (the
    machine is shared: CPU time is less affected by other processes than wall time)."""
    from classreg import register_points

    c0, t0 = time.process_time(), time.perf_counter()
    res = register_points(src, tgt, **kw)
    wall = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return res, wall


def _probreg_runs(src, tgt, maxiter, skip_bcpd):
    from probreg import bcpd, cpd

    c = tgt.mean(0)
    r = float(np.sqrt(((tgt - c) ** 2).sum(1).mean()))
    s, t = (src - c) / r, (tgt - c) / r
    out = {}

    def nonrigid():
        tf = cpd.registration_cpd(s, t, tf_type_name="nonrigid", w=0, maxiter=maxiter, tol=1e-9, beta=2.0, lmd=2.0)
        return tf.transformation.transform(s)
    t0 = time.perf_counter()
    out["probreg CPD nonrigid"] = (nonrigid() * r + c, time.perf_counter() - t0)

    def rig_nonrigid():
        tr = cpd.registration_cpd(s, t, tf_type_name="rigid", w=0, maxiter=maxiter, tol=1e-9)
        s1 = tr.transformation.transform(s)
        tf = cpd.registration_cpd(s1, t, tf_type_name="nonrigid", w=0, maxiter=maxiter, tol=1e-9, beta=2.0, lmd=2.0)
        return tf.transformation.transform(s1)
    t0 = time.perf_counter()
    out["probreg CPD rigid+nonrigid"] = (rig_nonrigid() * r + c, time.perf_counter() - t0)
    if not skip_bcpd:
        t0 = time.perf_counter()
        try:
            tf = bcpd.registration_bcpd(s, t, w=0, maxiter=min(maxiter, 300), tol=1e-9)
            moved = tf.transform(s) * r + c
        except Exception as exc:  # probreg's BCPD is unstable (DATA.md)
            moved = np.full_like(src, np.nan)
            print("probreg BCPD failed:", exc)
        out["probreg BCPD"] = (moved, time.perf_counter() - t0)
    return out


_T5K_COLS = [("case", "case"), ("n", "N"), ("method", "method"), ("wall_s", "wall s (median)"),
             ("wall_min_s", "wall s (min)"), ("cpu_s", "CPU s (median)"), ("runs", "runs"), ("load_avg", "load avg"),
             ("per_iter_s", "s / iteration"), ("iterations", "iters"), ("grid_estep_iterations", "grid E-steps"),
             ("nystrom_estep_iterations", "Nyström E-steps"),
             ("before_mm", "err before mm"), ("after_mm", "err after mm"), ("call_peak_mb", "call peak MB (traced)"),
             ("peak_rss_mb", "process peak RSS MB")]


def _t5k_rows(repeat):
    """T5k: 5000 points per side, register_points' defaults; timed runs, then one traced run for the call's peak
    memory."""
    p5, w5 = _fsaverage(5000)
    kw5 = {}
    rows = []
    for name, extra in (("classreg BCPD (defaults)", {}),
                        ("classreg BCPD (defaults), estep='exact'", dict(estep="exact"))):
        kw = dict(kw5, **extra)
        _run_classreg(p5, w5, **kw)  # warm-up (JIT cache load, first-touch allocations)
        walls, loads, cpu = [], [], []
        for _ in range(repeat):
            res5, wall = _run_classreg(p5, w5, cpu, **kw)
            walls.append(wall)
            loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        tracemalloc.start()
        _run_classreg(p5, w5, **kw)
        traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        rows.append(dict(case="T5k pial→white", n=5000, method=name, wall_s=statistics.median(walls),
                         wall_min_s=min(walls), cpu_s=statistics.median(cpu), runs=repeat, load_avg=max(loads),
                         before_mm=_err(p5, w5), after_mm=_err(res5.apply_points(p5), w5),
                         iterations=res5.metrics["iterations"],
                         nystrom_estep_iterations=res5.metrics["nystrom_estep_iterations"],
                         grid_estep_iterations=res5.metrics["grid_estep_iterations"],
                         per_iter_s=res5.timings["per_iteration"], call_peak_mb=traced_peak,
                         peak_rss_mb=peak_rss_mb()))
    return rows, kw5


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="points per side for P1/P2 (DATA.md: 2000)")
    ap.add_argument("--probreg-maxiter", type=int, default=500)
    ap.add_argument("--skip-probreg-bcpd", action="store_true", help="probreg BCPD takes minutes at N=2000")
    ap.add_argument("--skip-probreg", action="store_true", help="classreg only (probreg takes minutes at N=2000)")
    ap.add_argument("--only-t5k", action="store_true", help="run only the T5k timing case")
    ap.add_argument("--t5k-repeat", type=int, default=5, help="timed T5k runs (median and minimum reported)")
    ap.add_argument("--repeat", type=int, default=5, help="timed classreg runs per P1/P1r/P2 case (median reported)")
    ap.add_argument("--out", help="output folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.only_t5k:
        rows, kw5 = _t5k_rows(args.t5k_repeat)
        table = markdown_table(rows, _T5K_COLS)
        j, m = write_outputs("points_t5k", {"rows": rows, "classreg_settings": {"T5k": kw5}}, table, args.out)
        print(table)
        print(f"wrote {j} and {m}")
        return

    rows, payload = [], {"cases": {}}
    have_probreg, note = (False, "probreg skipped (--skip-probreg)") if args.skip_probreg else _probreg_available()
    pial, white = _fsaverage(args.n)
    warped = _p2(pial)
    ckw = {}  # register_points' defaults
    for case, src, tgt in (("P1 pial→white", pial, white), ("P1r white→pial", white, pial),
                           ("P2 pial→warped pial", pial, warped)):
        before = _err(src, tgt)
        _run_classreg(src, tgt, **ckw)  # warm-up (JIT cache load, first-touch allocations)
        walls, loads, cpu = [], [], []
        for _ in range(max(1, args.repeat)):
            res, wall = _run_classreg(src, tgt, cpu, **ckw)
            walls.append(wall)
            loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        wall = statistics.median(walls)
        mem = peak_rss_mb()
        base = dict(case=case, n=args.n, before_mm=before)
        rows.append(dict(base, method="classreg BCPD (defaults)", wall_s=wall, wall_min_s=min(walls),
                         cpu_s=statistics.median(cpu), runs=len(walls),
                         load_avg=max(loads), after_mm=_err(res.apply_points(src), tgt),
                         iterations=res.metrics["iterations"], ratio=1.0, peak_rss_mb=mem))
        if have_probreg:
            for name, (moved, w) in _probreg_runs(src, tgt, args.probreg_maxiter, args.skip_probreg_bcpd).items():
                rows.append(dict(base, method=name, wall_s=w, after_mm=_err(moved, tgt), ratio=w / wall,
                                 load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
                                 peak_rss_mb=peak_rss_mb()))
    # multi-organ synthetic
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_points as tp

    o = tp.make_organs()
    before = float(np.linalg.norm(o["lm"] - o["lm_t"], axis=1).mean())
    for name, kw, lab in (("classreg BCPD", {}, False),
                          ("classreg OMC-MO-BCPD", dict(source_labels=o["ly"], target_labels=o["lx"]), True),
                          ("classreg GMC-MO-BCPD", dict(source_labels=o["ly"], target_labels=o["lx"],
                                                        coherence="global"), True),
                          ("classreg OMC, 10% labels wrong, U=Id", dict(source_labels=o["ly"],
                                                                      target_labels=o["lx_bad"]), True),
                          ("classreg OMC, 10% labels wrong, U(0.1)", dict(source_labels=o["ly"],
                                                                        target_labels=o["lx_bad"],
                                                                        label_transition=0.1), True)):
        res, wall = _run_classreg(o["Y"], o["X"], **tp.MO_KW, **kw)
        rows.append(dict(case="MO 4 organs (TRE)", n=len(o["Y"]), method=name, wall_s=wall, before_mm=before,
                         after_mm=tp._tre(res, o, lab), iterations=res.metrics["iterations"],
                         peak_rss_mb=peak_rss_mb()))
    # 5000 points, low-rank kernel
    t5k, kw5 = _t5k_rows(args.t5k_repeat)
    cols = [("case", "case"), ("n", "N"), ("method", "method"), ("wall_s", "wall s (classreg: median)"),
            ("wall_min_s", "wall s (min)"), ("cpu_s", "CPU s (median)"), ("runs", "runs"),
            ("ratio", "time / classreg"), ("load_avg", "load avg"),
            ("before_mm", "err before mm"), ("after_mm", "err after mm"), ("iterations", "iters"),
            ("peak_rss_mb", "peak RSS MB")]
    table = markdown_table(rows, cols) + "\n\n" + markdown_table(t5k, _T5K_COLS)
    rows = rows + t5k
    if note:
        table += f"\n\nNote: {note}"
    payload["rows"] = rows
    payload["note"] = note
    payload["classreg_settings"] = {"P1/P1r/P2": ckw or "defaults", "MO": tp.MO_KW, "T5k": kw5 or "defaults"}
    j, m = write_outputs("points", payload, table, args.out)
    print(table)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
