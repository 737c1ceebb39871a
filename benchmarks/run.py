"""Side-by-side benchmark harness: classreg's solvers against ANTs, elastix, SimpleITK, DIPY, FireANTs and probreg.

    python -m benchmarks.run [--cases CASE ...] [--tools TOOL ...] [--threads 2] [--repeat 2] [--quick] [--slow]
                             [--sweep] [--device {cpu,cuda}] [--out DIR] [--docs PATH | --no-docs]
    python -m benchmarks.run --judge RESULT.json [RESULT.json ...]

Tools marked slow on 3-D (classreg LDDMM on the full grid, ANTs SyNCC and antsRegistrationSyN[s], the elastix CLI, FireANTs on the
CPU) run on 3-D cases only with ``--slow``; the page lists them as not run.

Every (case, tool, repeat) runs in its own worker process with the same thread settings (``NUMBA_NUM_THREADS``,
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, ``OMP_NUM_THREADS``, BLAS threads, ``torch.set_num_threads``; elastix
``-threads``), one after another, so tools never compete for the cores. Only the registration call is timed (for the
elastix CLI: the elastix process, including start-up and file I/O); classreg's first-call JIT/cache load happens in
an untimed warm-up on a tiny pair and is reported separately. Peak memory is the worker's VmHWM right after the
registration call (includes the Python and library baseline, reported as ``rss_before``).

Every tool's output is turned into a classreg transform (``benchmarks.tools``), and every metric is computed by
``classreg.evaluate`` on that transform, identically for all tools: Dice and HD95 per label, NCC, % det J ≤ 0,
NDV/NDA and SDlogJ (inside the evaluation mask, away from voxels whose sample left the moving image), endpoint error
where the truth is known; TRE for rigid and similarity cases; Dice/HD95 and NCC for affine cases (no pre-alignment:
every tool starts from its own initialisation); correspondence error and Chamfer distance for point sets. Each metric
is the median over ``--repeat`` runs. Ratios (classreg time / peer time, quality differences) are computed pairwise
per case.

Writes ``benchmarks/results/<UTC date>.json`` (all runs, versions, machine, threads, seeds) and ``.md``, every
classreg image tool's QC figure into ``qc-<UTC date>/<case>-<tool>.png`` beside them (not with ``--quick``), and with
``--docs`` (default for full runs: docs/benchmarks.md) the markdown page with the tables and a figure next to it.
``--quick`` runs small cases with classreg and the cheap peers in a couple of minutes (the test suite runs it).
``--sweep`` adds each deformable classreg solver's sweep of its one regularisation parameter
(``benchmarks.tools.SWEEPS``); the page then lists, per case, the peers that dominate each classreg default on
(accuracy, SDlogJ) and whether its min det J stays above the floor, with the accuracy-against-smoothness figure
``<page>-tradeoff.png`` (sweeps as lines, defaults starred, peers as points). ``--judge`` runs nothing: it applies
that test (and issue #22's EPE ≤ ANTs SyN where the deformation is known) to every default and sweep point of stored
result JSONs, a later file's rows replacing an earlier one's (a rerun of one case laid over a full run), and prints
per candidate the cases it meets.
A peer that is not installed is skipped with a note, never a failure.

``--device cuda`` (issue #26) adds a GPU row ``<tool>_cuda`` after every chosen tool with a GPU path
(``benchmarks.tools.GPU_TOOLS``: classreg demons SSD/LNCC, LDDMM, VP, rigid, points; FireANTs Greedy on torch's GPU):
the same run with ``device="cuda"``, its warm-up on the device too, the clock stopped after synchronising the device,
and the allocator's GPU memory high-water mark as ``gpu_peak_mb``. Without ``--cases`` it runs the 3-D deformable
cases (``inter3d``, ``synth3d`` and ``synth3d_1mm``, synth3d's deformation on the 1 mm template, which no CPU-only
run includes by default). The page gives each GPU row's time against its CPU row and pairs classreg's GPU rows with
the peers' GPU rows (CPU rows with CPU peers, as before). Where CuPy or a GPU is missing the GPU rows are skipped with
the reason (``payload["skipped"]``) and the CPU rows run as usual.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._common import page_head
from .cases import CASES, DEFAULT_CASES, GPU_CASES, QUICK_CASES, build_case, load_case
from .tools import GPU_TOOLS, SWEEPS, TOOLS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
#: the peers ``--quick`` runs next to classreg (each a few seconds on the quick cases)
QUICK_PEERS = ("sitk_diffeo_demons", "sitk_mi", "probreg_cpd")
SEED = 0  # every classreg solver and ANTs (random_seed=1) run with fixed seeds; the cases use seed 0


# =============================================================================================== worker
def _worker(tool: str, case_dir: Path, result: Path, threads: int, quick: bool, rep: int, qc_dir=None) -> int:
    """Run one tool once on one built case; write its output (transform as a dense field / mapped points) and a JSON
    record next to ``result``; a classreg tool's QC figure (:func:`classreg.qc.qc_figure`) into ``qc_dir`` as
    ``<case>-<tool>.png`` (first repeat only)."""
    from . import tools as T

    case = load_case(case_dir)
    rss_before = T.status_mb("VmRSS")
    out = TOOLS[tool].run(case, threads, quick)
    rec = {"tool": tool, "case": case["info"]["name"], "repeat": rep, "seconds": out["seconds"],
           "first_call_s": out.get("first_call_s"), "params": out.get("params", {}),
           "rss_before_mb": rss_before, "peak_rss_mb": T.PEAKS[-1] if T.PEAKS else T.status_mb("VmHWM")}
    if T.GPU_PEAKS:
        rec["gpu_peak_mb"] = T.GPU_PEAKS[-1]
    stem = result.with_suffix("")
    if "mapped" in out:
        np.save(f"{stem}-points.npy", np.asarray(out["mapped"], dtype=np.float64))
        rec["points"] = f"{stem}-points.npy"
    else:
        import classreg as cr
        from classreg.evaluate import dense_displacement

        fixed = case["fixed"]
        tx = out["transform"]
        if not (isinstance(tx, cr.DisplacementField) and tx.image.same_grid(fixed)):
            u, _ = dense_displacement(tx, fixed)
            tx = cr.DisplacementField.from_array_frame(u, fixed)
        tx.save(f"{stem}-field.nii")  # uncompressed: gzip costs seconds at 1 mm (8.7 M voxels); a temporary file
        rec["field"] = f"{stem}-field.nii"
        if qc_dir is not None and rep == 0 and out.get("result") is not None:
            try:
                from classreg.qc import qc_figure
            except ImportError:  # matplotlib is optional
                qc_figure = None
            if qc_figure is not None:
                png = Path(qc_dir) / f"{case['info']['name']}-{tool}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                qc_figure(out["result"], case["moving"], png, fixed=case["fixed"],
                          title=f"{TOOLS[tool].label} on {case['info']['name']}")
                rec["qc_png"] = str(png)
        valid = out.get("valid")
        if valid is not None:
            np.save(f"{stem}-valid.npy", np.asarray(valid, bool))
            rec["valid"] = f"{stem}-valid.npy"
    result.write_text(json.dumps(rec, default=float))
    return 0


# =============================================================================================== evaluation
def _median(values):
    vals = [v for v in values if isinstance(v, (int, float)) and v is not None and np.isfinite(v)]
    return statistics.median(vals) if vals else None


def evaluate_before(case) -> dict:
    """The metrics of the identity (after the shared affine pre-alignment for deformable cases)."""
    import classreg as cr

    info = case["info"]
    if info["kind"] == "points":
        return evaluate_points(case, case["source"])
    if info["kind"] in ("rigid", "affine"):
        ident = cr.Affine.identity(case["fixed"].ndim)
        return evaluate_rigid(case, ident) if info["kind"] == "rigid" else evaluate_image(case, ident, None,
                                                                                          jacobian=False)
    return evaluate_image(case, cr.DisplacementField.identity(case["fixed"]), None, jacobian=False)


def evaluate_image(case, field, valid, *, jacobian: bool = True) -> dict:
    from scipy import ndimage

    import classreg as cr
    from classreg import evaluate as ev

    fixed, moving = case["fixed"], case["moving"]
    flab, mlab = case["fixed_labels"], case["moving_labels"]
    mask = case["mask"].data > 0
    warped_lab = cr.resample(mlab, field, reference=fixed, interpolation="label")
    labels = [int(v) for v in np.unique(flab.data) if v != 0]
    dice = ev.dice(flab, warped_lab, labels=labels)
    hd = ev.hd95(flab, warped_lab, labels=labels)
    warped = cr.resample(moving, field, reference=fixed)
    out = {"dice": {str(k): float(v) for k, v in dice.items()}, "mean_dice": float(np.nanmean(list(dice.values()))),
           "hd95_mm": {str(k): float(v) for k, v in hd.items()},
           "mean_hd95_mm": float(np.nanmean([v for v in hd.values() if np.isfinite(v)] or [np.nan])),
           "ncc": float(-cr.terms.ncc(fixed.data, warped.data, mask=mask)) + 0.0}  # + 0.0: no "-0"
    if valid is not None:
        out["percent_outside"] = float(100.0 * (~valid[mask]).mean())
    if jacobian:
        jm = mask.copy()
        if valid is not None:  # away from voxels whose sample left the moving image (2 voxels)
            jm &= ndimage.binary_erosion(valid, iterations=2)
        jac = ev.jacobian_stats(field, mask=jm)
        out.update(percent_det_nonpositive=jac["percent_nonpositive"], min_det=jac["min_det"],
                   max_det=jac["max_det"], sdlogj=jac["sdlogj_l2r"],
                   ndv_percent=jac.get("ndv_percent", jac.get("nda_percent")))
    if "truth" in case:
        # where the tool's map is known: a map read back through coordinate images (elastix, transformix) has no
        # value where it leaves the moving image (their share is percent_outside, reported next to it)
        known = mask if valid is None else mask & valid
        pts = fixed.grid_points()[known]
        e = np.linalg.norm(field.map_points(pts) - case["truth"].map_points(pts), axis=1)
        out.update(epe_mm=float(e.mean()), epe_p95_mm=float(np.percentile(e, 95)))
    return out


def evaluate_rigid(case, transform) -> dict:
    fixed = case["fixed"]
    pts = fixed.grid_points()[case["mask"].data > 0]
    e = np.linalg.norm(transform.map_points(pts) - case["truth"].map_points(pts), axis=1)
    return {"tre_mm": float(e.mean()), "tre_p95_mm": float(np.percentile(e, 95)), "success": bool(e.mean() < 2.0)}


def evaluate_points(case, mapped) -> dict:
    from scipy.spatial import cKDTree

    tgt = case["target"]
    if not np.all(np.isfinite(mapped)):
        return {"corr_err_mm": None, "note": "non-finite output"}
    e = np.linalg.norm(mapped - tgt, axis=1)
    return {"corr_err_mm": float(e.mean()), "corr_err_p95_mm": float(np.percentile(e, 95)),
            "chamfer_mm": float(cKDTree(tgt).query(mapped)[0].mean())}


def evaluate_run(case, rec) -> dict:
    import classreg as cr

    kind = case["info"]["kind"]
    if kind == "points":
        return evaluate_points(case, np.load(rec["points"]))
    field = cr.load_transform(rec["field"])
    if kind == "rigid":
        return evaluate_rigid(case, field)
    valid = np.load(rec["valid"]) if rec.get("valid") else None
    # an affine map has one constant det J: the Jacobian statistics are for deformable cases
    return evaluate_image(case, field, valid, jacobian=kind == "deformable")


# =============================================================================================== reporting
#: the headline quality number per case kind: (key, label, higher is better)
QUALITY = {"deformable": ("mean_dice", "mean Dice", True), "rigid": ("tre_mm", "TRE mm", False),
           "affine": ("mean_dice", "mean Dice", True), "points": ("corr_err_mm", "corr. error mm", False)}


def ratios(rows: list[dict]) -> list[dict]:
    """classreg tool vs every peer on the same case and device (CPU rows with CPU peers, GPU rows with GPU peers):
    time ratio and quality difference (plus EPE when known)."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case and r.get("seconds")]
        key = QUALITY[rs[0]["kind"]][0] if rs else None
        for c in (r for r in rs if TOOLS[r["tool"]].classreg):
            for p in (r for r in rs if not TOOLS[r["tool"]].classreg
                      and TOOLS[r["tool"]].device == TOOLS[c["tool"]].device):
                row = {"case": case, "classreg": c["tool"], "peer": p["tool"],
                       "time_ratio": c["seconds"] / p["seconds"], "metric": QUALITY[c["kind"]][1]}
                if c.get(key) is not None and p.get(key) is not None:
                    row["quality_diff"] = c[key] - p[key]
                if c.get("epe_mm") is not None and p.get("epe_mm") is not None:
                    row["epe_diff_mm"] = c["epe_mm"] - p["epe_mm"]
                if c.get("peak_rss_mb") and p.get("peak_rss_mb"):
                    row["memory_ratio"] = c["peak_rss_mb"] / p["peak_rss_mb"]
                out.append(row)
    return out


def device_ratios(rows: list[dict]) -> list[dict]:
    """Every GPU row against its CPU row on the same case: GPU time / CPU time, quality difference GPU − CPU (plus
    EPE when known) and the GPU memory high-water mark; CPU time None where the CPU row did not run."""
    out = []
    for g in (r for r in rows if r.get("seconds") and TOOLS[r["tool"]].device_of):
        c = next((r for r in rows if r["case"] == g["case"] and r["tool"] == TOOLS[g["tool"]].device_of
                  and r.get("seconds")), None)
        key, metric, _ = QUALITY[g["kind"]]
        row = {"case": g["case"], "tool": g["tool"], "label": g["label"], "gpu_s": g["seconds"],
               "gpu_peak_mb": g.get("gpu_peak_mb"), "metric": metric, "cpu_s": c["seconds"] if c else None}
        if c is not None:
            row["time_ratio"] = g["seconds"] / c["seconds"]
            if g.get(key) is not None and c.get(key) is not None:
                row["quality_diff"] = g[key] - c[key]
            if g.get("epe_mm") is not None and c.get("epe_mm") is not None:
                row["epe_diff_mm"] = g["epe_mm"] - c["epe_mm"]
        out.append(row)
    return out


def _fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not np.isfinite(v):
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _table(rows, columns):
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows])


_COLUMNS = {
    "deformable": [("label", "tool"), ("mean_dice", "mean Dice"), ("dice_str", "Dice per label"),
                   ("mean_hd95_mm", "HD95 mm"), ("epe_mm", "EPE mm"), ("percent_outside", "% outside moving"),
                   ("ncc", "NCC"), ("percent_det_nonpositive", "% det J ≤ 0"), ("ndv_percent", "NDV %"), ("sdlogj", "SDlogJ"),
                   ("seconds", "time s"), ("peak_rss_mb", "peak RSS MB"), ("runs", "runs")],
    "rigid": [("label", "tool"), ("tre_mm", "TRE mm"), ("tre_p95_mm", "TRE p95 mm"), ("success", "TRE < 2 mm"),
              ("seconds", "time s"), ("peak_rss_mb", "peak RSS MB"), ("runs", "runs")],
    "affine": [("label", "tool"), ("mean_dice", "mean Dice"), ("dice_str", "Dice per label"),
               ("mean_hd95_mm", "HD95 mm"), ("ncc", "NCC"), ("percent_outside", "% outside moving"),
               ("seconds", "time s"), ("peak_rss_mb", "peak RSS MB"), ("runs", "runs")],
    "points": [("label", "tool"), ("corr_err_mm", "corr. error mm"), ("corr_err_p95_mm", "p95 mm"),
               ("chamfer_mm", "Chamfer mm"), ("seconds", "time s"), ("peak_rss_mb", "peak RSS MB"), ("runs", "runs")],
}


def render_markdown(payload: dict, figure: str | None) -> str:
    rows, cases = payload["rows"], payload["cases"]
    m = payload["machine"]
    generated, machine_line = page_head(payload["command"], payload["date"], m)
    lines = [
        "# Benchmarks",
        "",
        generated,
        "",
        machine_line
        + ("".join(f", GPU {g['name']} ({g['memory_gib']} GiB)" for g in m["gpus"]) if m.get("gpus") else "")
        + f"; {payload['threads']} threads for every tool; median of {payload['repeat']} run(s) per tool; seeds: "
        f"cases {SEED}, classreg seed {SEED}, "
        "ANTs random_seed 1. Versions: " + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()) + ".",
        "",
        "Time is the registration call only (classreg's one-off JIT/cache load is excluded and listed in the JSON as "
        "`first_call_s`); peak RSS is the worker process's high-water mark and includes the libraries' baseline. "
        "Deformable cases start from one shared affine pre-alignment, so they compare the deformable part. Jacobian "
        "statistics are inside the evaluation mask, excluding voxels within 2 voxels of samples that left the moving "
        "image; EPE is over the evaluation mask where the map is known (a map read back through coordinate images, "
        "as for elastix and transformix, is unknown where it leaves the moving image: `% outside moving`). "
        "Rigid/similarity and affine cases are not pre-aligned: every tool starts from its own initialisation "
        "(the centring named per case). How each number is computed: benchmarks/run.py; how each tool is run and "
        "with which settings: benchmarks/tools.py (and each row's `params` in the JSON).",
        "",
    ]
    for name, info in cases.items():
        kind = info["kind"]
        lines += [f"## {name} — {info['description']}", "", f"Data: {info['provenance']}.", ""]
        before = info.get("before", {})
        crow = [dict(label="before (after the shared affine)" if info.get("prealigned") else "before", runs=None,
                     **{k: v for k, v in before.items() if not isinstance(v, dict)},
                     dice_str=_per_label(before.get("dice")))]
        crow += [dict(r, dice_str=_per_label(r.get("dice"))) for r in rows if r["case"] == name and r.get("seconds")]
        columns = _COLUMNS[kind]
        gpu = {d["tool"]: d.get("time_ratio") for d in payload.get("device_ratios", []) if d["case"] == name}
        if gpu:  # GPU rows: their memory and their time against their CPU row
            crow = [dict(r, gpu_cpu=gpu.get(r.get("tool"))) for r in crow]
            columns = columns[:-1] + [("gpu_peak_mb", "GPU MB"), ("gpu_cpu", "GPU/CPU time")] + columns[-1:]
        lines += [_table(crow, columns), ""]
        for r in rows:
            if r["case"] == name and r.get("seconds") and TOOLS[r["tool"]].show_params and r.get("params"):
                lines.append(f"* {r['label']} settings: " + ", ".join(f"{k}={_fmt_param(v)}"
                                                                       for k, v in r["params"].items()))
        for r in rows:
            if r["case"] == name and not r.get("seconds"):
                lines.append(f"* {r['label']}: {r['note']}")
        lines.append("")
    if payload.get("device_ratios"):
        lines += ["## GPU rows against their CPU rows (per case)", "",
                  "time ratio = GPU time / CPU time of the same tool (< 1: the GPU is faster; the GPU clock stops "
                  "after synchronising the device); difference = GPU − CPU; GPU MB = the allocator's device memory "
                  "high-water mark of the registration call (CuPy's pool, torch's reserved memory).", "",
                  _table(payload["device_ratios"], [("case", "case"), ("label", "tool"), ("gpu_s", "GPU s"),
                                                    ("cpu_s", "CPU s"), ("time_ratio", "time ratio"),
                                                    ("metric", "quality"), ("quality_diff", "difference"),
                                                    ("epe_diff_mm", "EPE diff mm"), ("gpu_peak_mb", "GPU MB")]),
                  ""]
    rat = payload["ratios"]
    if rat:
        lines += ["## classreg vs each peer (pairwise, per case)", "",
                  "time ratio = classreg time / peer time (< 1: classreg faster); quality difference = classreg − "
                  "peer (Dice: higher is better; TRE/error: lower is better)."
                  + (" GPU rows are paired with the peers' GPU rows." if payload.get("device_ratios") else ""), "",
                  _table(rat, [("case", "case"), ("classreg", "classreg"), ("peer", "peer"),
                               ("time_ratio", "time ratio"), ("metric", "quality"),
                               ("quality_diff", "difference"), ("epe_diff_mm", "EPE diff mm"),
                               ("memory_ratio", "memory ratio")]), ""]
    if payload.get("dominance"):
        lines += ["## Accuracy against smoothness (classreg defaults)", "",
                  f"A default is dominated when a peer has both better accuracy (higher mean Dice; lower EPE where "
                  f"the deformation is known) and a lower SDlogJ on the same case; min det J must stay ≥ "
                  f"{DET_FLOOR:g}, and where the deformation is known the EPE must not exceed "
                  f"{TOOLS[EPE_REFERENCE].label}'s. Each dominating peer is listed with the margins by which it is "
                  "better on both. Sweeps of the one regularisation parameter per solver (`--sweep`) are drawn "
                  "with the peers in the trade-off figure.", "",
                  _table(payload["dominance"], [("case", "case"), ("label", "classreg default"),
                                                ("quality", "accuracy"), ("sdlogj", "SDlogJ"),
                                                ("min_det", "min det J"), ("dominated_by", "dominated by"),
                                                ("floor_ok", f"min det J ≥ {DET_FLOOR:g}"),
                                                ("epe_ok", f"EPE ≤ {TOOLS[EPE_REFERENCE].label}")]), ""]
        if payload.get("tradeoff_figure"):
            lines += [f"![accuracy against SDlogJ and min det J, sweeps and peers]({payload['tradeoff_figure']})",
                      ""]
    if figure:
        lines += [f"![Dice per label, time and folding per case]({figure})", ""]
    if payload.get("skipped"):
        lines += ["## Not run", ""] + [f"* {s}" for s in payload["skipped"]] + [""]
    return "\n".join(lines)


def _fmt_param(v):
    if isinstance(v, (list, tuple)):
        return "/".join(_fmt_param(x) for x in v)
    return _fmt(v, 4) if isinstance(v, float) else str(v)


def _per_label(d):
    if not d:
        return None
    return " / ".join(f"{v:.3f}" for _, v in sorted(d.items(), key=lambda kv: int(kv[0])))


def _save_figure(fig, path: Path) -> bool:
    """Write ``fig`` as ``path`` atomically (a temporary file renamed into place) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def render_figure(payload: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = [c for c in payload["cases"] if any(r["case"] == c and r.get("seconds") for r in payload["rows"])]
    if not cases:
        return False
    fig, axes = plt.subplots(len(cases), 3, figsize=(15, 3.2 * len(cases)), squeeze=False)
    for ax_row, case in zip(axes, cases):
        kind = payload["cases"][case]["kind"]
        rs = [r for r in payload["rows"] if r["case"] == case and r.get("seconds")]
        names = [r["label"] for r in rs]
        colors = ["tab:red" if TOOLS[r["tool"]].classreg else "tab:gray" for r in rs]
        ax = ax_row[0]
        if kind in ("deformable", "affine"):
            labels = sorted({k for r in rs for k in (r.get("dice") or {})}, key=int)
            w = 0.8 / max(len(labels), 1)
            for j, lab in enumerate(labels):
                ax.bar(np.arange(len(rs)) + j * w, [(r.get("dice") or {}).get(lab, np.nan) for r in rs], w,
                       label=f"label {lab}")
            ax.set_ylabel("Dice")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        else:
            key, lab, _ = QUALITY[kind]
            ax.bar(range(len(rs)), [r.get(key) if r.get(key) is not None else np.nan for r in rs], color=colors)
            ax.set_ylabel(lab)
        ax.set_title(f"{case}: quality")
        ax_row[1].bar(range(len(rs)), [r["seconds"] for r in rs], color=colors)
        ax_row[1].set_yscale("log")
        ax_row[1].set_ylabel("wall time s")
        ax_row[1].set_title(f"{case}: time ({payload['threads']} threads)")
        if kind == "deformable":
            ax_row[2].bar(range(len(rs)), [r.get("percent_det_nonpositive") or 0.0 for r in rs], color=colors)
            ax_row[2].set_ylabel("% det J ≤ 0")
            ax_row[2].set_title(f"{case}: folding")
        else:
            ax_row[2].bar(range(len(rs)), [r.get("peak_rss_mb") or 0.0 for r in rs], color=colors)
            ax_row[2].set_ylabel("peak RSS MB")
            ax_row[2].set_title(f"{case}: memory")
        for ax in ax_row:
            ax.set_xticks(range(len(rs)))
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    return _save_figure(fig, path)


#: the documented floor of min det J for a default (issue #22)
DET_FLOOR = 0.05


def _accuracy(row) -> tuple:
    """(value, higher is better, name): EPE where the case knows its deformation, else mean Dice."""
    if row.get("epe_mm") is not None:
        return row["epe_mm"], False, "EPE mm"
    return row.get("mean_dice"), True, "mean Dice"


#: the peer whose EPE a default must not exceed where the deformation is known (issue #22)
EPE_REFERENCE = "ants_syn"


def _classreg(name: str) -> tuple[bool, bool]:
    """(a classreg tool, a sweep point) for a tool name, also one of a stored run that this version no longer has."""
    tool = TOOLS.get(name)
    if tool is None:
        return name.startswith("classreg"), "@" in name
    return tool.classreg, bool(tool.sweep_of)


def dominance(rows: list[dict], *, sweeps: bool = False) -> list[dict]:
    """Per deformable case and classreg default (and sweep point with ``sweeps``): the peers that dominate it on
    (accuracy, SDlogJ), each with the margins by which it is better on both (``"ANTs SyN (Dice +0.009, SDlogJ
    −0.014)"``, two significant digits), whether its min det J is above :data:`DET_FLOOR` (``floor_ok``), where the
    case knows its deformation whether its EPE is at most :data:`EPE_REFERENCE`'s (``epe_ok``; None elsewhere or
    without that peer's row), and whether it meets all of these (``ok``). ``below_all_peers``: its accuracy is worse
    than every peer's, which the test does not catch (a smooth enough map, the identity at the limit, is never
    dominated)."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case and r.get("seconds") and r["kind"] == "deformable"
              and r.get("sdlogj") is not None and _accuracy(r)[0] is not None]
        peers = [r for r in rs if not _classreg(r["tool"])[0]]
        ref = next((p for p in peers if p["tool"] == EPE_REFERENCE and p.get("epe_mm") is not None), None)
        for c in (r for r in rs if _classreg(r["tool"])[0] and (sweeps or not _classreg(r["tool"])[1])):
            q, higher, name = _accuracy(c)
            short = "Dice" if higher else "EPE"
            dom = []
            for p in peers:
                gain = (_accuracy(p)[0] - q) * (1 if higher else -1)
                if gain > 0 and p["sdlogj"] < c["sdlogj"]:
                    dom.append(f"{p['label']} ({short} {'+' if higher else '−'}{gain:.2g}, "
                               f"SDlogJ −{c['sdlogj'] - p['sdlogj']:.2g})")
            epe_ok = None if ref is None or c.get("epe_mm") is None else bool(c["epe_mm"] <= ref["epe_mm"])
            floor_ok = c.get("min_det") is not None and c["min_det"] >= DET_FLOOR
            lowest = bool(peers) and all((_accuracy(p)[0] - q) * (1 if higher else -1) > 0 for p in peers)
            out.append({"case": case, "tool": c["tool"], "label": c["label"], "quality": f"{name} {_fmt(q)}",
                        "sdlogj": c["sdlogj"], "min_det": c.get("min_det"), "dominated_by": ", ".join(dom) or "none",
                        "floor_ok": floor_ok, "epe_ok": epe_ok, "ok": not dom and floor_ok and epe_ok is not False,
                        "below_all_peers": lowest})
    return out


def judge(paths: list, log=print) -> list[dict]:
    """Issue #22's test of every classreg default and sweep point in stored result JSONs (a later file's row of the
    same case and tool replaces an earlier one, so a rerun of one case can be laid over a full run), without running
    anything: the per-case :func:`dominance` rows, then per candidate the cases it meets and the ones it fails."""
    merged = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            merged[r["case"], r["tool"]] = r
    out = dominance(list(merged.values()), sweeps=True)
    log(_table(out, [("case", "case"), ("label", "candidate"), ("quality", "accuracy"), ("sdlogj", "SDlogJ"),
                     ("min_det", "min det J"), ("dominated_by", "dominated by"), ("floor_ok", "floor"),
                     ("epe_ok", f"EPE ≤ {TOOLS[EPE_REFERENCE].label}"), ("below_all_peers", "below every peer")]))
    log("\n" + _table(summarise(out), [("label", "candidate"), ("met", "cases met"), ("failed", "failed on"),
                                        ("lowest", "accuracy below every peer on")]))
    return out


def summarise(verdicts: list[dict]) -> list[dict]:
    """Per candidate of :func:`dominance`'s rows: its label, the cases it meets (``"3 of 5"``), the ones it fails and
    the ones where its accuracy is below every peer's."""
    summary = []
    for tool in dict.fromkeys(d["tool"] for d in verdicts):
        ds = [d for d in verdicts if d["tool"] == tool]
        summary.append({"label": ds[0]["label"], "met": f"{sum(d['ok'] for d in ds)} of {len(ds)}",
                        "failed": ", ".join(d["case"] for d in ds if not d["ok"]) or "none",
                        "lowest": ", ".join(d["case"] for d in ds if d["below_all_peers"]) or "none"})
    return summary


def render_tradeoff(payload: dict, path: Path) -> bool:
    """Accuracy against SDlogJ and against min det J per deformable case: each classreg solver's sweep as a line
    (its default starred), every peer as a labelled grey point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in payload["rows"] if r.get("seconds") and r["kind"] == "deformable"
            and r.get("sdlogj") is not None]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not cases:
        return False
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 4.2 * len(cases)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax_row, case in zip(axes, cases):
        rs = [r for r in rows if r["case"] == case]
        name = _accuracy(rs[0])[2]
        bases = list(dict.fromkeys(TOOLS[r["tool"]].sweep_of[0] if TOOLS[r["tool"]].sweep_of else r["tool"]
                                   for r in rs if TOOLS[r["tool"]].classreg))
        for ax, xkey, xlab in ((ax_row[0], "sdlogj", "SDlogJ (lower: smoother)"),
                               (ax_row[1], "min_det", "min det J (log)")):
            for k, base in enumerate(bases):
                pts = []
                for r in rs:
                    sw = TOOLS[r["tool"]].sweep_of
                    if r["tool"] == base:
                        pts.append((SWEEPS[base][3] if base in SWEEPS else None, r, True))
                    elif sw and sw[0] == base:
                        pts.append((sw[2], r, False))
                pts.sort(key=lambda p: p[0] if p[0] is not None else 0.0)
                xs = [max(p[1].get(xkey) or np.nan, 1e-4) if xkey == "min_det" else p[1].get(xkey) for p in pts]
                ys = [_accuracy(p[1])[0] for p in pts]
                ax.plot(xs, ys, "-o", color=colours(k), ms=4, label=TOOLS[base].label)
                for (f, _, is_default), x, y in zip(pts, xs, ys):
                    if is_default:
                        ax.plot([x], [y], "*", color=colours(k), ms=14)
                    if f is not None:
                        ax.annotate(f"{f:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            for r in rs:
                if not TOOLS[r["tool"]].classreg:
                    x = max(r.get(xkey) or np.nan, 1e-4) if xkey == "min_det" else r.get(xkey)
                    ax.plot([x], [_accuracy(r)[0]], "s", color="0.45", ms=5)
                    ax.annotate(r["label"], (x, _accuracy(r)[0]), fontsize=6, color="0.3", xytext=(3, -8),
                                textcoords="offset points")
            if xkey == "min_det":
                ax.set_xscale("log")
                ax.axvline(DET_FLOOR, color="k", ls=":", lw=0.8)
            ax.set_xlabel(xlab)
            ax.set_ylabel(name)
            ax.set_title(f"{case}: {name} against {xlab.split(' (')[0]}", fontsize=9)
        ax_row[0].legend(fontsize=6, loc="best")
    return _save_figure(fig, path)


# =============================================================================================== driver
def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for dist in ("classreg", "numpy", "scipy", "numba", "SimpleITK", "antspyx", "dipy", "itk-elastix", "fireants",
                 "torch", "probreg", "nilearn", "cupy", "cupy-cuda12x", "cupy-cuda13x", "numba-cuda"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    commit = _git_commit()
    if commit:
        out["classreg git"] = commit
    if shutil.which("elastix"):
        try:
            out["elastix CLI"] = subprocess.run(["elastix", "--version"], capture_output=True, text=True,
                                                timeout=30).stdout.strip().split()[-1]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return out


def _git_commit():
    """Short commit of the classreg checkout the benchmark runs from (``+dirty`` with uncommitted changes), or None
    outside a git checkout: results stay traceable to the code that produced them."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists() or not shutil.which("git"):
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _thread_env(threads: int) -> dict:
    t = str(threads)
    return dict(os.environ, NUMBA_NUM_THREADS=t, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=t, OMP_NUM_THREADS=t,
                OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t, PYTHONHASHSEED="0")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(cases, tools, *, threads=2, repeat=2, quick=False, slow=False, out_dir=None, docs=None, timeout=3600,
        command="python -m benchmarks.run", log=print) -> dict:
    """Run the benchmark; returns the payload written to JSON."""
    from ._common import machine

    env = _thread_env(threads)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    payload = {"command": command, "date": stamp, "threads": threads, "repeat": repeat, "quick": quick,
               "seed": SEED, "versions": versions(), "cases": {}, "rows": [], "runs": [], "skipped": []}
    out = Path(out_dir) if out_dir is not None else RESULTS
    # rewritten after every row, so a run stopped at a time limit keeps what it measured; removed at the end
    partial = out / f"{stamp}.partial.json"
    avail = {t: TOOLS[t].available() for t in tools}
    for t, (ok, why) in avail.items():
        if not ok:
            payload["skipped"].append(f"{TOOLS[t].label} ({t}): {why}")
            log(f"skip {t}: {why}")
    with tempfile.TemporaryDirectory(prefix="classreg-bench-") as tmp:
        for name in cases:
            wd = Path(tmp) / name
            try:
                info = build_case(name, wd, quick=quick)
            except (FileNotFoundError, ImportError) as exc:
                payload["skipped"].append(f"case {name}: data not installed ({exc})")
                log(f"skip case {name}: {exc}")
                continue
            case = load_case(wd)
            info["before"] = evaluate_before(case)
            payload["cases"][name] = info
            for tool in (t for t in tools if avail[t][0] and TOOLS[t].handles(info["kind"])):
                if name in TOOLS[tool].excludes:
                    payload["rows"].append(_aggregate(name, info["kind"], tool, [
                        {"note": f"not run: {TOOLS[tool].excludes[name]}"}]))
                    continue
                if TOOLS[tool].slow_3d and info.get("ndim") == 3 and not slow:
                    payload["rows"].append(_aggregate(name, info["kind"], tool, [
                        {"note": f"not run on 3-D cases without --slow: {TOOLS[tool].slow_3d}"}]))
                    continue
                runs = []
                for rep in range(repeat):
                    res = wd / f"{tool}-{rep}.json"
                    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", tool, "--case-dir", str(wd),
                           "--result", str(res), "--threads", str(threads), "--rep", str(rep)]
                    if not quick:
                        cmd += ["--qc-dir", str(Path(out_dir or RESULTS) / f"qc-{stamp}")]
                    if quick:
                        cmd.append("--quick")
                    t0 = time.perf_counter()
                    try:
                        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                                              cwd=ROOT)
                        err = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip().splitlines()
                    except subprocess.TimeoutExpired:
                        err = [f"timed out after {timeout} s"]
                    if err is not None:
                        runs = [{"note": f"failed: {_error_line(err)[:200]}"}]
                        log(f"  {name}/{tool}: {runs[0]['note']}")
                        break
                    rec = json.loads(res.read_text())
                    rec.update(evaluate_run(case, rec))
                    rec["process_s"] = time.perf_counter() - t0
                    for key in ("field", "valid", "points"):
                        rec.pop(key, None)
                    runs.append(rec)
                    payload["runs"].append(rec)
                    q = QUALITY[info["kind"]]
                    log(f"  {name}/{tool} run {rep + 1}/{repeat}: {rec['seconds']:.2f} s, {q[1]} "
                        f"{_fmt(rec.get(q[0]))}")
                payload["rows"].append(_aggregate(name, info["kind"], tool, runs))
                _atomic_write(partial, json.dumps(payload, indent=1, default=str) + "\n")
    payload["ratios"] = ratios(payload["rows"])
    payload["dominance"] = dominance(payload["rows"])
    payload["machine"] = machine()
    if any(TOOLS[t].device == "cuda" for t in tools):
        from classreg.backend import gpu_devices

        payload["device_ratios"] = device_ratios(payload["rows"])
        payload["machine"]["gpus"] = gpu_devices()
    _atomic_write(out / f"{stamp}.json", json.dumps(payload, indent=1, default=str) + "\n")
    partial.unlink(missing_ok=True)
    fig_name = None
    if docs is not None:
        docs = Path(docs)
        fig = docs.with_suffix(".png")
        if render_figure(payload, fig):
            fig_name = fig.name
        trade = docs.with_name(docs.stem + "-tradeoff.png")
        payload["tradeoff_figure"] = trade.name if render_tradeoff(payload, trade) else None
        _atomic_write(docs, render_markdown(payload, fig_name) + "\n")
    _atomic_write(out / f"{stamp}.md", render_markdown(payload, None) + "\n")
    payload["json"] = str(out / f"{stamp}.json")
    return payload


def _error_line(lines) -> str:
    """The exception line of a worker's traceback (numba and others print context after it), else its last line."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in lines or ["?"]]
    lines = [ln for ln in lines if ln] or ["?"]
    exc = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", ln)]
    return exc[-1] if exc else lines[-1]


def with_device_rows(tools) -> list:
    """``tools`` with each one's GPU row (``<name>_cuda``, benchmarks.tools.device_tools) right after it, for the
    tools that have a GPU path (benchmarks.tools.GPU_TOOLS)."""
    out = []
    for t in tools:
        out += [t] + ([f"{t}_cuda"] if t in GPU_TOOLS else [])
    return list(dict.fromkeys(out))


def _aggregate(case, kind, tool, runs) -> dict:
    row = {"case": case, "kind": kind, "tool": tool, "label": TOOLS[tool].label}
    good = [r for r in runs if "seconds" in r]
    if not good:
        row["note"] = runs[0]["note"] if runs else "not run"
        return row
    row["runs"] = len(good)
    row["times_s"] = [r["seconds"] for r in good]
    for key in good[0]:
        vals = [r.get(key) for r in good]
        if all(isinstance(v, bool) for v in vals):
            row[key] = all(vals)
        elif all(isinstance(v, (int, float)) or v is None for v in vals):
            row[key] = _median(vals)
        elif all(isinstance(v, dict) for v in vals) and key in ("dice", "hd95_mm"):
            row[key] = {k: _median([v.get(k) for v in vals]) for k in vals[0]}
    row["params"] = good[0].get("params")
    row.pop("repeat", None)
    return row


def selection(args) -> tuple[list, list]:
    """The cases and tools a parsed command line runs, in order: ``--cases`` or the default cases (``--quick``:
    QUICK_CASES, ``--device cuda``: GPU_CASES, else DEFAULT_CASES); ``--tools`` or the default tools, then the
    sweep points of the chosen solvers (``--sweep``), then with ``--device cuda`` each one's GPU row after it."""
    cases = args.cases or list(QUICK_CASES if args.quick else GPU_CASES if args.device == "cuda" else DEFAULT_CASES)
    if args.tools:
        tools = args.tools
    elif args.quick:
        tools = [t for t, tool in TOOLS.items() if (tool.classreg and tool.quick) or t in QUICK_PEERS]
    else:
        tools = [t for t, tool in TOOLS.items() if tool.default]
    if args.sweep:  # the sweep points of the solvers being run, after them
        tools = list(tools) + [t for t, tool in TOOLS.items() if tool.sweep_of and tool.sweep_of[0] in tools
                               and t not in tools]
    if args.device == "cuda":
        tools = with_device_rows(tools)
    return cases, list(tools)


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.run``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES),
                   help="default: all but synth3d_1mm (--quick: %s; --device cuda: %s)" % (" ".join(QUICK_CASES),
                                                                                       " ".join(GPU_CASES)))
    p.add_argument("--tools", nargs="+", choices=list(TOOLS), help="default: every default tool that is installed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=None, help="runs per tool and case (median); default 2, --quick 1")
    p.add_argument("--quick", action="store_true", help="small cases, classreg and the cheap peers (smoke test)")
    p.add_argument("--slow", action="store_true", help="also run the tools marked slow on 3-D cases")
    p.add_argument("--sweep", action="store_true",
                   help="also run each deformable classreg solver's regularisation sweep (benchmarks.tools.SWEEPS) "
                        "for the accuracy-against-smoothness figure")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: also run every chosen tool that has a GPU path on the GPU (a <tool>_cuda row after "
                        "its CPU row); skipped with a note where no GPU is usable")
    p.add_argument("--out", help="folder for the JSON/markdown results (default benchmarks/results)")
    p.add_argument("--docs", help="markdown page to (re)write, with a figure beside it (default for full runs: "
                                  "docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool run")
    p.add_argument("--judge", nargs="+", metavar="JSON",
                   help="run nothing: judge every classreg default and sweep point in these stored results (later "
                        "files' rows replace earlier ones) against issue #22's test and print the tables")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--case-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--qc-dir", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker, Path(args.case_dir), Path(args.result), args.threads, args.quick, args.rep,
                       args.qc_dir)
    if args.judge:
        judge(args.judge)
        return 0
    if args.threads < 1:
        p.error("--threads must be >= 1")
    cases, tools = selection(args)
    repeat = args.repeat or (1 if args.quick else 2)
    if repeat < 1:
        p.error("--repeat must be >= 1")
    docs = None if args.no_docs else (args.docs or (None if args.quick else DOCS))
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = run(cases, tools, threads=args.threads, repeat=repeat, quick=args.quick, slow=args.slow,
                  out_dir=args.out, docs=docs,
                  timeout=args.timeout, command=command.strip(), log=lambda s: print(s, file=sys.stderr))
    print(render_markdown(payload, None))
    print(f"\nwrote {payload['json']}" + (f" and {docs}" if docs else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
