"""classreg batch on Dask against serial runs — the batch issue's benchmark and bitwise check:

    python -m benchmarks.batch [--work DIR] [--workers 2] [--threads 1] [--serial-threads 2] [--repeat 1] [--no-3d]
    python -m benchmarks.batch --check        # the bitwise check only (what tests/test_batch.py's slow test runs)

The 20 pairs: the six 2-D benchmark cases (brain2d, lung2d, circle2d with ``demons``; the multimodal mm2d,
mm2d_rot60 and sim2d with ``affine+demons``: rigid/similarity Mattes-MI, then LNCC demons), nine seeded variants of
the three deformable 2-D cases (the fixed image and its labels warped by a smooth random field drawn with
``numpy.random.default_rng(seed)``, seeds 1-3), three seeded variants of sim2d (``cases.similarity_draw(seed)``,
seeds 1-3), and the two 3-D pairs synth3d and inter3d (MNI152 2 mm, ``demons``). Labels give Dice where the case has
them.

What it measures, in one process each time, after a warm-up (numba's caches loaded everywhere):

1. serial: every pair through :func:`classreg.batch.run_pair` (read, register, evaluate, QC, publish) in this
   process with ``threads=--threads`` — the reference transforms;
2. serial with ``--serial-threads`` threads on the 2-D pairs: the throughput baseline;
3. ``classreg.batch`` with its embedded LocalCluster of ``--workers`` workers × ``--threads`` thread(s) on the 2-D
   pairs (wall time including the cluster's start), then on all 20 (the 2-D pairs are skipped: resumed), and the
   transforms of every pair compared bit for bit with step 1's;
4. per pair: the memory estimate against the measured peak (the solvers' part, on the batch's workers).

Writes benchmarks/results/batch-<date>.json and .md; prints the table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._common import machine, markdown_table, write_outputs

DEFORMABLE_2D = ("brain2d", "lung2d", "circle2d")
RIGID_2D = ("mm2d", "mm2d_rot60", "sim2d")
CASES_3D = ("synth3d", "inter3d")
SEEDS = (1, 2, 3)


# ------------------------------------------------------------------------------------------------ comparison
def transform_arrays(t) -> list:
    """Every array that defines transform ``t`` (the parts of a Chain in order; a field's displacement image; an
    affine's matrix, translation and centre; a B-spline's coefficients and grid)."""
    from classreg.transforms import Chain, DisplacementField

    if isinstance(t, Chain):
        return [a for part in t.transforms for a in transform_arrays(part)]
    if isinstance(t, DisplacementField):
        return [np.asarray(t.image.numpy())]
    return [np.asarray(v) for _, v in sorted(vars(t).items()) if isinstance(v, np.ndarray)]


def same_transform(a, b) -> bool:
    """Bitwise equality of two transforms: same type and structure, and every array the same bits (a float32 array
    read back as float64 is compared at float64: the conversion is exact)."""
    if type(a) is not type(b):
        return False
    xa, xb = transform_arrays(a), transform_arrays(b)
    if len(xa) != len(xb):
        return False
    for u, v in zip(xa, xb):
        if u.shape != v.shape:
            return False
        if u.dtype != v.dtype:
            wide = np.promote_types(u.dtype, v.dtype)
            u, v = u.astype(wide), v.astype(wide)
        if u.tobytes() != v.tobytes():
            return False
    return True


# ------------------------------------------------------------------------------------------------ the pairs
def _smooth_field(shape, seed: int, max_mm: float, sigma_vox: float):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma_vox) for _ in shape], -1)
    return (u * (max_mm / np.abs(u).max())).astype(np.float32)


def build_pairs(work, *, with_3d: bool = True) -> Path:
    """Build the cases and their seeded variants under ``work``; returns the pairs table ``work/pairs.csv``."""
    import csv

    import classreg as cr
    from classreg.data import itk_example_image

    from .cases import build_case, load_case, similarity_draw

    work = Path(work)
    rows = []
    for name in DEFORMABLE_2D + RIGID_2D + (CASES_3D if with_3d else ()):
        d = work / name
        if not (d / "case.json").is_file():
            build_case(name, d)
        c = load_case(d)
        row = {"id": name, "fixed": d / "fixed.nii.gz", "moving": d / "moving.nii.gz"}
        if "fixed_labels" in c:
            row.update(fixed_labels=d / "fixed_labels.nii.gz", moving_labels=d / "moving_labels.nii.gz")
        if name in RIGID_2D:
            row.update(solver="affine+demons", **{
                "affine.transform": "similarity" if name == "sim2d" else "rigid",
                "affine.init": "global" if name == "mm2d_rot60" else "geometry",
                "fixed_mask": d / "mask.nii.gz", "demons.metric": "lncc"})
        rows.append(row)
        if name in DEFORMABLE_2D:  # seeded variants: the fixed image and labels through a smooth random field
            fixed, flab = c["fixed"], c["fixed_labels"]
            for seed in SEEDS:
                v = work / f"{name}_s{seed}"
                v.mkdir(parents=True, exist_ok=True)
                if not (v / "moving.nii.gz").is_file():
                    u = _smooth_field(fixed.shape, seed, max_mm=4.0 * max(fixed.spacing), sigma_vox=8.0)
                    psi = cr.DisplacementField.from_array_frame(u, fixed)
                    cr.save(cr.resample(flab, psi, reference=fixed, interpolation="label"), v / "moving_labels.nii.gz")
                    cr.save(cr.resample(fixed, psi, reference=fixed), v / "moving.nii.gz")
                rows.append({"id": f"{name}_s{seed}", "fixed": d / "fixed.nii.gz", "moving": v / "moving.nii.gz",
                             "fixed_labels": d / "fixed_labels.nii.gz", "moving_labels": v / "moving_labels.nii.gz"})
    fixed_t1 = work / "sim2d" / "fixed.nii.gz"
    for seed in SEEDS:  # seeded variants of sim2d: the PD slice through similarity_draw(seed)
        v = work / f"sim2d_s{seed}"
        v.mkdir(parents=True, exist_ok=True)
        if not (v / "moving.nii.gz").is_file():
            fixed = cr.load(fixed_t1)
            pd = itk_example_image("BrainProtonDensitySliceBorder20.png", dtype=np.float32)
            centre = fixed.center
            angle, scale, shift = similarity_draw(seed)
            truth = cr.Affine.similarity(scale, [np.radians(angle)], translation=shift, center=centre)
            cr.save(cr.resample(pd, truth.inverse(), reference=pd), v / "moving.nii.gz")
            truth.save(v / "truth.tfm")
        rows.append({"id": f"sim2d_s{seed}", "fixed": fixed_t1, "moving": v / "moving.nii.gz",
                     "solver": "affine+demons", "affine.transform": "similarity", "affine.init": "geometry",
                     "fixed_mask": work / "sim2d" / "mask.nii.gz", "demons.metric": "lncc"})
    rows.sort(key=lambda r: r["id"] in CASES_3D)  # the 3-D pairs last
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    table = work / "pairs.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows({k: str(v) for k, v in r.items()} for r in rows)
    return table


# ------------------------------------------------------------------------------------------------ runs
def _tasks(table, out, threads: int, only=None):
    import dataclasses

    from classreg.batch import estimate_memory_mb, plan_pairs, read_pairs

    rows, base, source = read_pairs(table)
    tasks = plan_pairs(rows, base=base, out=out, threads_per_worker=threads, source=source)
    return [dataclasses.replace(t, **dict(zip(("solver_estimate_mb", "estimate_mb"), estimate_memory_mb(t))))
            for t in tasks if only is None or t.id in only]


def serial(table, out, *, threads: int, only=None) -> tuple:
    """Every pair of ``table`` (or those in ``only``) through ``run_pair`` in this process, one after the other:
    ``(records, wall seconds)``."""
    from classreg.batch import run_pair

    shutil.rmtree(out, ignore_errors=True)
    Path(out).mkdir(parents=True)
    t0 = time.perf_counter()
    recs = [run_pair(t) for t in _tasks(table, out, threads, only)]
    return recs, time.perf_counter() - t0


def warm_up(work: Path) -> None:
    """Load every kernel the pairs use (numba's on-disk cache; compiled on a cold one) in this process."""
    from classreg.batch import run_pair

    table = Path(work) / "pairs.csv"
    ids = ("lung2d", "sim2d")
    for t in _tasks(table, Path(work) / "warm", 1, ids):
        run_pair(t)
    shutil.rmtree(Path(work) / "warm", ignore_errors=True)


def _subset(table: Path, path: Path, ids) -> Path:
    """The rows of ``table`` whose id is in ``ids``, written to ``path``."""
    import csv

    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if r["id"] in ids]
        cols = reader.fieldnames
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def _ratio(a, b):
    return a / b if a is not None and b else None


def _history(res) -> list:
    return [{k: v for k, v in row.items() if k != "elapsed"} for row in res.history]


def compare(out_a, out_b, ids) -> dict:
    """id → whether the results in ``out_a/<id>`` and ``out_b/<id>`` have bitwise equal transforms and inverses
    (and the same iteration history, timings aside)."""
    import classreg as cr

    res = {}
    for i in ids:
        try:
            a, b = cr.load_result(Path(out_a) / i), cr.load_result(Path(out_b) / i)
        except (OSError, ValueError):
            res[i] = False
            continue
        res[i] = same_transform(a.transform, b.transform) and (
            (a.inverse is None and b.inverse is None) or same_transform(a.inverse, b.inverse)) and (
            _history(a) == _history(b))
    return res


def bitwise_check(work, *, workers: int = 2, threads: int = 1, with_3d: bool = True) -> dict:
    """The Done-when check: every pair through ``classreg.batch`` (LocalCluster, ``workers`` × ``threads``) and
    serially in this process with the same threads; returns ``{"equal": {id: bool}, ...}``."""
    import classreg as cr

    work = Path(work)
    table = build_pairs(work, with_3d=with_3d)
    ser, ser_s = serial(table, work / "serial", threads=threads)
    shutil.rmtree(work / "batch", ignore_errors=True)
    rep = cr.batch(table, work / "batch", workers=workers, threads_per_worker=threads)
    ids = [r["id"] for r in rep.rows]
    return {"equal": compare(work / "serial", work / "batch", ids), "serial": ser, "batch": rep.rows,
            "serial_seconds": ser_s, "batch_seconds": rep.seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="folder for the cases and outputs (default: a temporary folder, removed)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per worker (and of the reference serial run)")
    p.add_argument("--serial-threads", type=int, default=2, help="threads of the serial throughput baseline")
    p.add_argument("--no-3d", action="store_true", help="only the 18 2-D pairs")
    p.add_argument("--repeat", type=int, default=1, help="throughput runs of each mode (the fastest is reported)")
    p.add_argument("--check", action="store_true", help="the bitwise check only (no throughput runs)")
    p.add_argument("--out", help="folder for the JSON and markdown (default benchmarks/results)")
    args = p.parse_args(argv)

    import classreg as cr

    tmp = None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="classreg-batch-bench-"))
    if not args.work:
        tmp = work
    try:
        if args.check:
            chk = bitwise_check(work, workers=args.workers, threads=args.threads, with_3d=not args.no_3d)
            bad = [k for k, v in chk["equal"].items() if not v]
            print(f"{sum(chk['equal'].values())}/{len(chk['equal'])} pairs bitwise equal"
                  + (f"; different: {', '.join(bad)}" if bad else ""))
            return 1 if bad else 0
        load_before = os.getloadavg()
        table = build_pairs(work, with_3d=not args.no_3d)
        all_ids = [t.id for t in _tasks(table, work / "x", 1)]
        ids_2d = [i for i in all_ids if i not in CASES_3D]
        warm_up(work)
        # 1. serial reference (same threads as the workers), every pair
        ref, ref_s = serial(table, work / "serial", threads=args.threads)
        # 2./3. alternately (--repeat times: the machine may be shared): the serial throughput baseline, the 2-D
        # pairs with --serial-threads threads, and the batch of the 2-D pairs (its embedded cluster started by the
        # call); then the batch of all pairs (the 2-D ones resume)
        two_d = _subset(table, work / "pairs-2d.csv", ids_2d)
        base_runs, batch_runs = [], []
        for _ in range(args.repeat):
            base, base_s = serial(table, work / f"serial-t{args.serial_threads}", threads=args.serial_threads,
                                  only=set(ids_2d))
            base_runs.append(base_s)
            shutil.rmtree(work / "batch", ignore_errors=True)
            rep2 = cr.batch(two_d, work / "batch", workers=args.workers, threads_per_worker=args.threads)
            batch_runs.append((rep2.seconds, rep2.cluster_seconds))
        base_s = min(base_runs)
        rep2.seconds, rep2.cluster_seconds = min(batch_runs)
        rep = cr.batch(table, work / "batch", workers=args.workers, threads_per_worker=args.threads)
        equal = compare(work / "serial", work / "batch", all_ids)
        # 4. the table
        batch_rec = {r["id"]: r for r in rep2.rows}
        batch_rec.update({r["id"]: r for r in rep.rows if r["status"] == "ok"})
        ref_rec = {r["id"]: r for r in ref}
        base_rec = {r["id"]: r for r in base}
        rows = []
        for i in all_ids:
            b, s = batch_rec[i], ref_rec[i]
            fixed = cr.load(s["fixed"]) if s["fixed"] else None
            rows.append({
                "id": i, "solver": s["solver"], "shape": "×".join(map(str, fixed.shape)) if fixed else "",
                "status": b["status"], "bitwise": equal[i],
                "serial_s": s["seconds"], f"serial_t{args.serial_threads}_s": base_rec.get(i, {}).get("seconds"),
                "batch_s": b["seconds"], "solver_s": b["solver_seconds"], "serial_cpu_s": s["cpu_seconds"],
                "batch_cpu_s": b["cpu_seconds"],
                "solver_estimate_mb": b["solver_estimate_mb"], "solver_peak_mb": b["peak_memory_mb"],
                "solver_ratio": _ratio(b["peak_memory_mb"], b["solver_estimate_mb"]),
                "pair_estimate_mb": b["memory_estimate_mb"], "pair_peak_mb": b["pair_peak_mb"],
                "pair_ratio": _ratio(b["pair_peak_mb"], b["memory_estimate_mb"]),
                "evaluation_peak_mb": b["evaluation_peak_mb"], "worker": b["worker"], "worker_pair": b["worker_pair"],
                # the serial reference's peaks (one process): memory freed by earlier pairs stays resident there
                # (glibc's adaptive mmap threshold), so they understate; the workers' (dask sets
                # MALLOC_TRIM_THRESHOLD_) are the ones to read
                "serial_solver_peak_mb": s["peak_memory_mb"], "serial_pair_peak_mb": s["pair_peak_mb"],
                "dice_before": b["dice_before_mean"],
                "dice_after": b["dice_mean"], "percent_det_nonpositive": b["percent_det_nonpositive"],
            })
        n2 = len(ids_2d)
        summary = {
            "pairs": len(all_ids), "pairs_2d": n2, "bitwise_equal": sum(equal.values()),
            "different": [k for k, v in equal.items() if not v],
            "serial_reference_seconds": ref_s, "repeat": args.repeat,
            f"serial_t{args.serial_threads}_2d_seconds_runs": base_runs, "batch_2d_seconds_runs": batch_runs,
            f"serial_t{args.serial_threads}_2d_seconds": base_s,
            "batch_2d_seconds": rep2.seconds, "batch_2d_cluster_start_seconds": rep2.cluster_seconds,
            "batch_2d_seconds_after_start": rep2.seconds - rep2.cluster_seconds,
            "throughput_ratio": base_s / rep2.seconds,
            "throughput_ratio_after_start": base_s / (rep2.seconds - rep2.cluster_seconds),
            "batch_all_seconds": rep.seconds, "workers": args.workers, "threads_per_worker": args.threads,
            "serial_threads": args.serial_threads,
            f"solver_seconds_serial_t{args.serial_threads}_2d": sum(r["solver_seconds"] or 0 for r in base),
            "solver_seconds_batch_2d": sum(r["solver_seconds"] or 0 for r in rep2.rows),
            f"cpu_seconds_serial_t{args.serial_threads}_2d": sum(r["cpu_seconds"] or 0 for r in base),
            "cpu_seconds_batch_2d": sum(r["cpu_seconds"] or 0 for r in rep2.rows),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
        }
        cols = [("id", "pair"), ("solver", "solver"), ("shape", "shape"), ("bitwise", "bitwise ="),
                ("serial_s", f"serial {args.threads} thr s"), (f"serial_t{args.serial_threads}_s",
                                                               f"serial {args.serial_threads} thr s"),
                ("batch_s", "batch s"), ("worker_pair", "n-th on worker"), ("solver_estimate_mb", "solver est. MB"),
                ("solver_peak_mb", "solver peak MB"), ("solver_ratio", "peak/est."),
                ("pair_estimate_mb", "pair est. MB"), ("pair_peak_mb", "pair peak MB"), ("pair_ratio", "peak/est."),
                ("dice_before", "Dice before"), ("dice_after", "Dice after")]
        table_md = markdown_table(rows, cols)
        head = (f"{summary['bitwise_equal']}/{summary['pairs']} pairs bitwise equal to serial runs "
                f"({args.threads} thread(s)). 2-D throughput, {n2} pairs: serial with {args.serial_threads} "
                f"threads {base_s:.1f} s; batch {args.workers} workers × {args.threads} thread(s) "
                f"{rep2.seconds:.1f} s including the LocalCluster start ({rep2.cluster_seconds:.1f} s): ratio "
                f"{summary['throughput_ratio']:.2f} (after the start {summary['throughput_ratio_after_start']:.2f}). "
                f"1-min load average before the run {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}.")
        text = head + "\n\n" + table_md
        j, m = write_outputs("batch", {"summary": summary, "rows": rows, "machine": machine()}, text, args.out)
        print(text)
        print(f"\nwrote {j} and {m}")
        return 0 if not summary["different"] else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
