"""Held-out check of the deformable defaults (issue #22): cases built from inter3d that no default was chosen on.

The defaults of the deformable solvers were chosen on the benchmark page's five cases; "defaults must work on data
they were not tuned on". This builds, from inter3d (MNI152 2 mm ← ITK's KmeansTest T1 subject, one shared affine
pre-alignment, real tissue labels on both sides; ``benchmarks.cases``):

* six 2-D cross-scale cases: axial, coronal and sagittal slices at two positions each (:data:`SLICES`), every image,
  label map and mask cut from the pre-aligned volumes on the fixed grid;
* two 3-D one-scale cases with a known deformation (:data:`WARP_SEEDS`): the subject warped by synth3d's kind of
  smooth field with other seeds — another image and other deformations than synth3d's, scored by EPE.

Each tool runs once per case in the page's worker (``python -m benchmarks.run --worker``, the same thread settings),
its map is scored like the page's (mean tissue Dice or EPE, SDlogJ, min det J of the dense field) and every classreg
default goes through the page's test (:func:`benchmarks.run.dominance`: not dominated on (accuracy, SDlogJ) by a
peer, min det J ≥ 0.05, EPE ≤ ANTs SyN's where the deformation is known).

Run ``python -m benchmarks.heldout [--tools ...] [--threads 2] [--out DIR] [--docs docs/benchmarks-heldout.md]``; it
writes ``heldout-<stamp>.json`` and ``.md`` into benchmarks/results/, prints the per-slice table and the summary,
and with ``--docs`` renders the generated page. About 10 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ._common import markdown_table, page_head, write_outputs

#: (array axis, position as a fraction of that axis) of each held-out slice
SLICES = ((0, 0.40), (0, 0.60), (1, 0.45), (1, 0.60), (2, 0.45), (2, 0.60))
#: seeds of the held-out known deformations: inter3d's subject (ITK's KmeansTest T1, pre-aligned onto the 2 mm MNI152
#: grid) warped by synth3d's kind of smooth field (benchmarks.cases.synth_deformation) drawn with these seeds
WARP_SEEDS = (1, 2)
#: the classreg defaults under test and the peers of the page's deformable rows (FireANTs and DIPY when installed)
TOOLS = ("classreg_demons", "classreg_lddmm", "classreg_bspline", "classreg_vp", "ants_syn", "ants_synonly",
         "ants_syncc", "ants_syn_full", "sitk_diffeo_demons", "sitk_fastsym_demons", "dipy_syn_cc", "elastix_bspline",
         "fireants_greedy")
#: the images of a built case that are cut (every one lies on the fixed grid of a pre-aligned case)
PARTS = ("fixed", "moving", "fixed_labels", "moving_labels", "mask")


def slice_case(src: Path, axis: int, frac: float, out_root: Path) -> Path:
    """Cut the 2-D case ``<source>_a<axis>_<index>`` out of the built 3-D case in ``src`` (all of :data:`PARTS` on
    one grid, as inter3d's) at ``index = round(frac · n_axis)``; returns its folder."""
    import classreg as cr

    info = json.loads((src / "case.json").read_text())
    if not info.get("prealigned"):
        raise ValueError(f"{src}: slices need a pre-aligned case (every image on the fixed grid)")
    images = {k: cr.load(src / f"{k}.nii.gz") for k in PARTS}
    grid = images["fixed"]
    if any(not im.same_grid(grid) for im in images.values()):
        raise ValueError(f"{src}: the images are not all on the fixed grid")
    index = int(round(frac * grid.shape[axis]))
    name = f"{info['name']}_a{axis}_{index}"
    wd = out_root / name
    wd.mkdir(parents=True, exist_ok=True)
    spacing = [float(s) for d, s in enumerate(grid.spacing_array_order) if d != axis][::-1]  # (x, y) order
    for key, im in images.items():
        plane = np.ascontiguousarray(np.take(np.asarray(im.numpy()), index, axis=axis))
        cr.save(cr.Image.from_array(plane, spacing=spacing), wd / f"{key}.nii.gz")
    (wd / "case.json").write_text(json.dumps({
        "name": name, "kind": "deformable", "ndim": 2, "shape": list(plane.shape), "spacing": spacing,
        "prealigned": True, "has_truth": False, "quick": False,
        "description": f"held-out 2-D slice of {info['name']}: array axis {axis}, index {index}",
        "provenance": f"cut from {info['name']} ({info.get('description', '')})"}, indent=1))
    return wd


def warped_case(src: Path, seed: int, out_root: Path) -> Path:
    """The 3-D case ``<source>_warp<seed>``: the moving image of the built pre-aligned case in ``src`` (inter3d's
    subject, on the fixed grid) as the fixed image, the same image through a known smooth deformation ψ
    (:func:`benchmarks.cases.synth_deformation` with ``seed``) as the moving one, ψ⁻¹ the truth (as synth3d), its
    label map warped with it; the mask is where the subject's labels are set. One intensity scale, known EPE."""
    import classreg as cr

    from .cases import synth_deformation

    info = json.loads((src / "case.json").read_text())
    subject, labels = cr.load(src / "moving.nii.gz"), cr.load(src / "moving_labels.nii.gz")
    psi = synth_deformation(subject, seed=seed)
    name = f"{info['name']}_warp{seed}"
    wd = out_root / name
    wd.mkdir(parents=True, exist_ok=True)
    parts = {"fixed": subject, "moving": cr.resample(subject, psi, reference=subject), "fixed_labels": labels,
             "moving_labels": cr.resample(labels, psi, reference=subject, interpolation="label"),
             "mask": labels.like((np.asarray(labels.numpy()) > 0).astype(np.uint8))}
    for key, im in parts.items():
        cr.save(im, wd / f"{key}.nii.gz")
    psi.inverse().save(wd / "truth.nii.gz")
    (wd / "case.json").write_text(json.dumps({
        "name": name, "kind": "deformable", "ndim": 3, "shape": list(subject.shape),
        "spacing": list(subject.spacing), "prealigned": True, "has_truth": True, "quick": False,
        "description": f"held-out known deformation: {info['name']}'s subject warped by a smooth field (seed {seed})",
        "provenance": f"the moving image of {info['name']} ({info.get('description', '')}) warped by "
                      f"benchmarks.cases.synth_deformation(seed={seed}); truth ψ⁻¹"}, indent=1))
    return wd


def run(tools=TOOLS, *, threads=2, out_dir=None, docs=None, slow=False, log=print) -> dict:
    """Build inter3d and the held-out cases (:data:`SLICES`, :data:`WARP_SEEDS`), run ``tools`` on each, judge the
    classreg defaults; returns the payload that is written (and rendered into ``docs``, a markdown path, when given).
    Peers that take minutes per 3-D pair run on the 3-D cases only with ``slow`` (the page's ``--slow``); the classreg
    defaults always run."""
    from . import run as bench
    from .cases import build_case, load_case
    from .tools import TOOLS as ALL

    avail = [t for t in tools if ALL[t].available()[0]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="classreg-heldout-") as tmp:
        src = Path(tmp) / "inter3d"
        build_case("inter3d", src)
        dirs = [slice_case(src, axis, frac, Path(tmp)) for axis, frac in SLICES]
        dirs += [warped_case(src, seed, Path(tmp)) for seed in WARP_SEEDS]
        for wd in dirs:
            case = load_case(wd)
            for tool in avail:
                if ALL[tool].slow_3d and not ALL[tool].classreg and case["info"]["ndim"] == 3 and not slow:
                    continue  # as the page: peers that take minutes per 3-D pair (ANTs SyNCC, FireANTs) need --slow
                res = wd / f"{tool}.json"
                cmd = [sys.executable, "-m", "benchmarks.run", "--worker", tool, "--case-dir", str(wd), "--result",
                       str(res), "--threads", str(threads), "--rep", "0"]
                proc = subprocess.run(cmd, env=dict(os.environ, **bench._thread_env(threads)), capture_output=True,
                                      text=True, cwd=bench.ROOT)
                row = {"case": case["info"]["name"], "kind": "deformable", "tool": tool, "label": ALL[tool].label}
                if proc.returncode != 0:
                    row["note"] = f"failed: {bench._error_line((proc.stderr or proc.stdout).splitlines())[:200]}"
                else:
                    rec = json.loads(res.read_text())
                    row.update(bench.evaluate_run(case, rec), seconds=rec["seconds"])
                rows.append(row)
                acc = f"EPE {row['epe_mm']:.3f} mm" if row.get("epe_mm") is not None else \
                    f"Dice {row.get('mean_dice', float('nan')):.4f}"
                log(f"{row['case']} {tool}: " + (row.get("note") or f"{acc}, SDlogJ {row['sdlogj']:.4f}, min det J "
                                                  f"{row['min_det']:.3f}"))
    verdicts = bench.dominance(rows)
    per_case = markdown_table(verdicts, [("case", "case"), ("label", "default"), ("quality", "accuracy"),
                                         ("sdlogj", "SDlogJ"), ("min_det", "min det J"),
                                         ("dominated_by", "dominated by"), ("floor_ok", "floor"),
                                         ("epe_ok", "EPE ≤ ANTs SyN's"), ("below_all_peers", "below every peer")])
    table = "\n\n".join([per_case, markdown_table(bench.summarise(verdicts), [
        ("label", "default"), ("met", "cases met"), ("failed", "failed on"),
        ("lowest", "accuracy below every peer on")])])
    command = "python -m benchmarks.heldout " + " ".join(sys.argv[1:])
    payload = {"command": command.strip(), "commit": bench._git_commit(), "threads": threads,
               "slices": [list(s) for s in SLICES], "warp_seeds": list(WARP_SEEDS), "rows": rows,
               "verdicts": verdicts}
    jpath, mpath = write_outputs("heldout", payload, table, out_dir)
    log("\n" + table + f"\n\nwritten: {jpath}, {mpath}")
    if docs is not None:
        stored = json.loads(jpath.read_text())
        page = render_page(stored, table, markdown_table(rows, [
            ("case", "case"), ("label", "tool"), ("mean_dice", "mean Dice"), ("epe_mm", "EPE mm"),
            ("sdlogj", "SDlogJ"), ("min_det", "min det J"), ("seconds", "time s"), ("note", "note")]))
        Path(docs).write_text(page)
        log(f"wrote {docs}")
    return payload


def render_page(payload: dict, verdicts_table: str, rows_table: str) -> str:
    """The generated markdown page of a held-out run (its stored JSON, the verdict tables, every tool's row)."""
    generated, machine_line = page_head(payload["command"], payload["date"], payload["machine"])
    return "\n".join([
        "# Benchmarks — held-out cases built from inter3d",
        "",
        generated,
        "",
        f"{machine_line}; {payload['threads']} threads for every tool; one run per tool and slice; classreg at commit "
        f"{payload.get('commit')}.",
        "",
        "The deformable defaults were chosen on the cases of [benchmarks.md](benchmarks.md); these cases were not used "
        "to choose anything: six 2-D slices of its inter3d pair (array axis and index in each name; two intensity "
        "scales) and inter3d's subject warped by two known smooth deformations (`_warp<seed>`; one scale, scored by "
        "EPE). A default meets a case when no peer is better on both accuracy and SDlogJ, its min det J is at least "
        "0.05 and, where the deformation is known, its EPE is at most ANTs SyN's (`benchmarks.run.dominance`, the "
        "page's test). How the cases are built and scored: benchmarks/heldout.py.",
        "",
        verdicts_table,
        "",
        "## Every tool",
        "",
        rows_table,
        "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--tools", nargs="+", default=list(TOOLS), help="tools to run (benchmarks.tools names)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for the JSON and markdown (default benchmarks/results/)")
    p.add_argument("--docs", default=None, help="also render the generated page here (docs/benchmarks-heldout.md)")
    p.add_argument("--slow", action="store_true", help="also run the peers that take minutes per 3-D pair there")
    args = p.parse_args(argv)
    run(args.tools, threads=args.threads, out_dir=args.out, docs=args.docs, slow=args.slow)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
