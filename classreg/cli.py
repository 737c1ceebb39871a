"""``classreg`` command line: ``classreg info``, ``classreg demo`` and ``classreg register <solver> ...``.

The ``register`` sub-commands are built from each solver's option declaration (:mod:`classreg.options`): one flag
per option, spelt like the Python keyword (``--shrink-factors`` for ``shrink_factors``), with the unit, the default
and the valid range in its help. Lists take spaces or commas (``--shrink-factors 4 2 1`` or ``4,2,1``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from ._version import __version__

__all__ = ["main"]


def _cmd_info(args) -> int:
    from .backend import gpu_available, gpu_devices, thread_count, versions
    from .kernels._backend import HAVE_NUMBA, _cuda_usable

    info = {
        "versions": versions(),
        "backends": {
            "numpy": True,
            "numba": HAVE_NUMBA,
            "cupy_installed": versions().get("cupy") is not None,
            "gpu": gpu_available(),
            "numba_cuda": bool(HAVE_NUMBA and _cuda_usable()),
        },
        "devices": gpu_devices(),
        "cpu_threads": thread_count(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"classreg {__version__}")
    for name, ver in info["versions"].items():
        if name != "classreg":
            print(f"  {name:<10} {ver if ver is not None else 'not installed'}")
    b = info["backends"]
    print("backends:")
    print(f"  CPU  numpy reference: yes; numba fast path: {'yes' if b['numba'] else 'no (pip install numba)'}")
    print(f"  GPU  cupy installed: {'yes' if b['cupy_installed'] else 'no'}; usable CUDA device: "
          f"{'yes' if b['gpu'] else 'no'}")
    for d in info["devices"]:
        print(f"       {d['id']}: {d['name']}, {d['memory_gib']:g} GiB (solvers: device='{d['id']}')")
    print(f"  CPU threads used by numba kernels: {info['cpu_threads']}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    s = run_demo(args.out, prefer_3d=not args.two_d, progress=not args.quiet)
    names = {1: "CSF", 2: "GM", 3: "WM"}

    def fmt(d):
        return ", ".join(f"{names.get(k, k)} {v:.3f}" for k, v in d.items())

    print(f"classreg demo ({s['case']})")
    print(f"  data: {s['provenance']}")
    # NCC and det J over the fixed image's mask (qc.png's figures are over its whole grid)
    print(f"  Dice after affine : {fmt(s['dice_affine'])}  (mean {s['mean_dice_affine']:.3f}); "
          f"NCC in the {s['mask']} {s['ncc_affine']:.3f}")
    print(f"  Dice after demons : {fmt(s['dice_demons'])}  (mean {s['mean_dice_demons']:.3f}); "
          f"NCC in the {s['mask']} {s['ncc_demons']:.3f}")
    print(f"  det J in the {s['mask']}: min {s['min_det_j']:.3f}, <= 0: {s['percent_det_j_nonpositive']:.4f} %")
    print(f"  time: affine {s['seconds_affine']:.1f} s, demons {s['seconds_demons']:.1f} s ({s['pieces']} piece(s))")
    print(f"  outputs: {s['outputs']}/ (qc.png, warped.nii.gz, transform.*, params.json, history.csv)")
    return 0


def _cmd_elastix_shims(args) -> int:
    import os
    import shlex
    from pathlib import Path

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    modules = {"elastix": "classreg.elastix", "transformix": "classreg.elastix.transformix"}
    for name in modules:
        if (folder / name).exists() and not args.force:
            print(f"classreg elastix-shims: {folder / name} exists; use --force to replace it", file=sys.stderr)
            return 1
    for name, module in modules.items():
        path = folder / name
        tmp = folder / f".{name}.tmp"
        tmp.write_text(f"#!/bin/sh\n# written by `classreg elastix-shims`: {name} runs classreg's drop-in\n"
                       f"exec {shlex.quote(sys.executable)} -m {module} \"$@\"\n")
        tmp.chmod(0o755)
        os.replace(tmp, path)
    print(f"wrote {folder / 'elastix'} and {folder / 'transformix'}; run: export PATH=\"{folder.resolve()}:$PATH\"")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="classreg",
        description="Classical, optimisation-based image and point-cloud registration (CPU: numpy/numba, GPU: CuPy).",
    )
    p.add_argument("--version", action="version", version=f"classreg {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, backends found (numba, cupy, GPU) and thread count")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="register a real inter-subject brain pair shipped in installed packages",
                          description="nilearn's MNI152 (2 mm) ← ITK's real T1 subject (Debian "
                                      "insighttoolkit5-examples), or a 2-D real pair when that is absent: affine "
                                      "pre-alignment, then register_demons; prints Dice/NCC before and after and "
                                      "writes the outputs and a QC PNG.")
    demo.add_argument("-o", "--output", dest="out", default="classreg-demo", help="output folder (default ./classreg-demo)")
    demo.add_argument("--2d", dest="two_d", action="store_true", help="use the 2-D pair")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)
    shims = sub.add_parser("elastix-shims", help="write elastix/transformix wrappers running classreg's drop-in",
                           description="Write executable 'elastix' and 'transformix' scripts into DIR that run "
                                       "classreg-elastix and classreg-transformix with this Python; put DIR first on "
                                       "PATH and unchanged elastix scripts run on classreg.")
    shims.add_argument("dir", help="folder for the two scripts (created if missing)")
    shims.add_argument("--force", action="store_true", help="replace existing files of those names")
    shims.set_defaults(func=_cmd_elastix_shims)
    reg = sub.add_parser("register", help="register a pair (images or point sets) with one of the solvers")
    solvers = reg.add_subparsers(dest="solver", metavar="SOLVER")
    for declaration, func in _solvers():
        _add_solver(solvers, declaration, func)
    _add_apply(sub)
    _add_batch(sub)
    return p


# ================================================================================================ apply
def _add_apply(sub) -> None:
    """``classreg apply MOVING -r REFERENCE -t TRANSFORM [-t ...] -o OUT``: :func:`classreg.resample` through saved
    transforms (what ``Result.apply`` does in Python, antsApplyTransforms on ANTs's command line)."""
    a = sub.add_parser(
        "apply", help="resample an image through saved transforms (a result's transform.h5, any ITK transform file)",
        description="Resample MOVING onto the grid of REFERENCE through the transforms given with -t, and write it to "
                    "OUT (written atomically; an existing file is kept unless --overwrite). A registration's "
                    "transform file maps fixed-image points to moving-image points, so '-r FIXED -t "
                    "RESULT/transform.h5' brings moving-space data into fixed space, as Result.apply does; with "
                    "RESULT/inverse.h5 and the roles swapped it goes the other way. Several -t compose in the order a "
                    "reference point travels: '-t A -t B' maps a point x of REFERENCE to B(A(x)) in MOVING. Label "
                    "images take --interpolation label. elastix TransformParameters files: classreg-transformix.")
    a.add_argument("moving", help="image to resample (.nii[.gz], .mha, .mhd, .nrrd, .png)")
    a.add_argument("-r", "--reference", required=True, help="image whose grid (and geometry) the output takes")
    a.add_argument("-t", "--transform", action="append", required=True, metavar="FILE",
                   help="ITK transform file (.tfm, .txt, .mat, .h5: affine, B-spline, displacement field or a "
                        "composite) or a displacement-field image (mm); repeatable")
    a.add_argument("-o", "--output", required=True, help="output image file")
    a.add_argument("--interpolation", choices=("linear", "nearest", "bspline", "label"), default="linear",
                   help="linear (default), nearest, bspline (cubic), or label (for segmentations: each label's "
                        "indicator interpolated linearly, the arg-max kept)")
    a.add_argument("--default-value", type=float, default=0.0,
                   help="value where REFERENCE's points map outside MOVING (default: 0)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a.set_defaults(func=_cmd_apply)


def _cmd_apply(args) -> int:
    from pathlib import Path

    from .io import load, save
    from .resample import resample
    from .transforms import Chain, load_transform

    out = Path(args.output)
    inputs = [Path(args.moving), Path(args.reference), *(Path(t) for t in args.transform)]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise ValueError(f"the output {str(out)!r} is one of the inputs; choose another file (inputs are never "
                         "modified)")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{str(out)!r} exists; pass --overwrite to replace it")
    moving, reference = load(args.moving), load(args.reference)
    transforms = [load_transform(t) for t in args.transform]
    transform = transforms[0] if len(transforms) == 1 else Chain(transforms)
    if transform.ndim != reference.ndim or moving.ndim != reference.ndim:
        raise ValueError(f"dimension mismatch: moving is {moving.ndim}-D, reference {reference.ndim}-D, the "
                         f"transform {transform.ndim}-D")
    warped = resample(moving, transform, reference=reference, interpolation=args.interpolation,
                      default_value=args.default_value)
    save(warped, out)
    print(f"Wrote {out}")
    return 0


# ================================================================================================ batch
def _add_batch(sub) -> None:
    """``classreg batch PAIRS.csv -o OUT ...``: :func:`classreg.batch.batch` (docs/batch.md)."""
    b = sub.add_parser(
        "batch", help="register many pairs from a CSV table on Dask (resumable)",
        description="One task per row of PAIRS.csv (columns fixed, moving; optional id, solver, fixed_labels, "
                    "moving_labels and any option of the solver, e.g. iterations or demons.iterations in a chain "
                    "such as affine+demons). Each pair's result, qc.png and evaluation go to OUT/<id>/, one line per "
                    "row to OUT/summary.csv; a rerun skips the pairs already finished. Runs on a LocalCluster of "
                    "this machine, or on a running Dask cluster with --scheduler. Needs dask.distributed "
                    "(pip install \"classreg[dist]\"). Exit status 1 if a pair failed.")
    b.add_argument("pairs", help="CSV table of pairs (relative paths are read from its folder)")
    b.add_argument("-o", "--output", required=True, help="output folder (created)")
    b.add_argument("--solver", default="demons",
                   help="solver or chain of rows without a solver cell, e.g. affine+demons (default: demons)")
    b.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="an option for every row whose cell is empty (repeatable), e.g. --option iterations=20,10,5")
    b.add_argument("--scheduler", metavar="ADDRESS", help="run on this Dask scheduler (tcp://host:8786)")
    b.add_argument("--workers", type=int, help="workers of the local cluster (default: from the cores and memory)")
    b.add_argument("--threads-per-worker", type=int, default=1,
                   help="CPU threads of each pair's solver; workers x threads <= cores (default: 1)")
    b.add_argument("--memory-per-worker", type=float, metavar="MB",
                   help="memory of each local worker [MB] (default: the available memory shared equally)")
    b.add_argument("--retries", type=int, default=2, help="resubmissions of a pair whose worker died (default: 2)")
    b.add_argument("--overwrite", action="store_true", help="run every pair again, replacing earlier results")
    b.add_argument("--no-qc", action="store_true", help="do not write qc.png")
    b.add_argument("--save-extras", action="store_true", help="also write each result's extras.npz")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_batch)


def _cmd_batch(args) -> int:
    from .batch import batch

    options = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--option {item!r}: expected NAME=VALUE, e.g. iterations=20,10,5")
        options[name.strip()] = value
    try:
        report = batch(args.pairs, args.output, solver=args.solver, options=options, scheduler=args.scheduler,
                       workers=args.workers, threads_per_worker=args.threads_per_worker,
                       memory_per_worker=args.memory_per_worker, retries=args.retries, overwrite=args.overwrite,
                       qc=not args.no_qc, save_extras=args.save_extras, progress=not args.quiet)
    except ImportError as exc:
        print(f"classreg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"classreg batch: interrupted; finished pairs are kept in {args.output}/ (see summary.csv): run the "
              f"same command again to resume", file=sys.stderr)
        return 130
    print(report.text())
    return 1 if report.failed else 0


# ================================================================================================ register <solver>
def _solvers():
    """``(declaration, function)`` of every solver: importing this module imported the package ``classreg``, whose
    solver modules registered their declarations."""
    from . import options

    return [options.SOLVERS[name] for name in sorted(options.SOLVERS)]


def _number_list(cast):
    def parse(text):
        try:
            return [cast(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None
    return parse


def _help(o) -> str:
    unit = f" [{o.unit}]" if o.unit else ""
    rng = f"; {o.range_text()}" if o.range_text() else ""
    return f"{o.help}{unit} (default: {o.describe_default()}{rng})".replace("%", "%%")


def _add_solver(subparsers, declaration, func) -> None:
    """``classreg register NAME INPUT1 INPUT2 -o OUT [--option ...]``, one flag per declared option."""
    p = subparsers.add_parser(declaration.name, help=declaration.summary,
                              description=declaration.description or declaration.summary)
    a, b = declaration.inputs
    points = declaration.inputs == ("source", "target")
    p.add_argument(a, help="source point file (moving)" if points else "fixed image (.nii[.gz], .mha, .mhd, .nrrd, .png)")
    p.add_argument(b, help="target point file (fixed)" if points else "moving image")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    for o in declaration:
        if not o.cli:
            continue
        kw = {"dest": o.name, "default": o.default, "help": _help(o)}
        if o.cli_parse is not None:
            kw.update(type=o.cli_parse, metavar=o.name.upper())
        elif o.kind == "bool":
            kw.update(action=argparse.BooleanOptionalAction)
        elif o.kind in ("floats", "ints"):
            kw.update(type=_number_list(float if o.kind == "floats" else int), nargs="+", metavar="N")
        elif o.kind in ("float", "int"):
            kw.update(type=float if o.kind == "float" else int)
            if o.choices:
                kw.update(choices=o.choices)
        elif o.kind == "str":
            kw.update(choices=o.choices or None)
        elif o.kind == "dtype":
            kw.update(default=np.dtype(o.default).name, choices=("float32", "float64"))
        elif o.kind in ("image", "transform", "array"):
            kw.update(metavar="FILE")
        p.add_argument(o.flag, **kw)
    p.add_argument("--no-qc", action="store_true", help="do not write qc.png (the QC figure, docs/qc.md)")
    if points:
        p.add_argument("--no-labels", action="store_true", help="ignore label columns (plain BCPD)")
    else:
        p.add_argument("--qc-point", type=_number_list(float), nargs="+", metavar="MM", default=None,
                       help="qc.png of a 3-D pair: the physical point x y z (mm, LPS) its three slices go through "
                            "(default: the centre of the fixed image)")
        p.add_argument("--fixed-labels", metavar="FILE", default=None,
                       help="label map of the fixed image: qc.png then shows Dice before and after (with "
                            "--moving-labels)")
        p.add_argument("--moving-labels", metavar="FILE", default=None, help="label map of the moving image")
        p.add_argument("--channel", type=int, default=None, metavar="N",
                       help="colour (RGB/RGBA) inputs: register channel N (0 red, 1 green, 2 blue); grey images "
                            "stored as RGB need none")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier classreg result in the output folder (as a whole)")
    if not points:
        p.add_argument("--save-extras", action="store_true",
                       help="also write extras.npz (solver internals, e.g. demons' velocities; often large)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda args: _run(declaration, func, args))


def _cli_value(o, value):
    """The Python value of option ``o`` from its parsed command-line value (files are read here)."""
    if value is None or o.cli_parse is not None:
        return value
    if o.kind == "image":
        from .io import load

        return load(value)
    if o.kind == "transform":
        from .transforms import load_transform

        return load_transform(value)
    if o.kind == "array":
        from .io import load_points

        return load_points(value)[0].ravel()
    if o.kind in ("floats", "ints") and isinstance(value, list):
        flat = [v for part in value for v in (part if isinstance(part, list) else [part])]
        return tuple(flat)
    if o.kind == "int_or_str":
        return value if value in o.choices else int(value)
    return value


def _run(declaration, func, args) -> int:
    from pathlib import Path

    kw = {o.name: _cli_value(o, getattr(args, o.name)) for o in declaration if o.cli}
    a, b = declaration.inputs
    if declaration.inputs == ("source", "target"):
        return _run_points(declaration, func, getattr(args, a), getattr(args, b), Path(args.output), kw,
                           progress=not args.quiet, no_labels=args.no_labels, overwrite=args.overwrite,
                           qc=not args.no_qc)
    from .io import load
    from .result import check_result_folder, publish_folder

    out = Path(args.output)
    check_result_folder(out, overwrite=args.overwrite)  # before any work: a bad -o fails now, not after the run
    fixed, moving = load(getattr(args, a), channel=args.channel), load(getattr(args, b), channel=args.channel)
    labels = [None if f is None else load(f) for f in (args.fixed_labels, args.moving_labels)]
    point = None if args.qc_point is None else [v for part in args.qc_point for v in part]
    res = func(fixed, moving, progress=not args.quiet, **kw)

    def fill(d):
        from .result import _fill

        _fill(res, d, True, args.save_extras)
        if not args.no_qc:
            try:
                from .qc import qc_figure

                qc_figure(res, moving, d / "qc.png", fixed=fixed, point=point, fixed_labels=labels[0],
                          moving_labels=labels[1],
                          title=f"{declaration.name}: {Path(getattr(args, b)).name} → {Path(getattr(args, a)).name}")
            except ImportError as exc:
                print(f"classreg: note: {exc}; no qc.png written", file=sys.stderr)

    publish_folder(out, fill, overwrite=args.overwrite)
    _report(declaration, res, out)
    return 0


def _report(declaration, res, out) -> None:
    line = declaration.report(res) if declaration.report else f"{declaration.name}: {res.stop_reason}"
    print(f"{line}. Wrote {out}/")


def _run_points(declaration, func, source, target, out, kw, *, progress, no_labels, overwrite=False,
                qc=True) -> int:
    """Point sets from files (labels from a last column, ``--source-labels``/``--target-labels`` files, or none with
    ``--no-labels``); writes moved_source.<ext> (source mapped into target space), transform.npz, params.json,
    history.csv, result.json, qc.png (:func:`classreg.qc.qc_points`; not with ``--no-qc``) and, with
    ``--reference IMAGE``, field.nii.gz (the fixed → moving displacement sampled on that image's grid)."""
    from pathlib import Path

    from .io import load_points, save_points
    from .result import _jsonable, _write_history, _write_text, check_result_folder, publish_folder

    check_result_folder(out, overwrite=overwrite)
    src, sl = load_points(source)
    tgt, tl = load_points(target)
    sl = kw.pop("source_labels", None) if kw.get("source_labels") is not None else sl
    tl = kw.pop("target_labels", None) if kw.get("target_labels") is not None else tl
    if no_labels or sl is None or tl is None:
        sl = tl = None
    kw.update(source_labels=None if sl is None else np.asarray(sl).astype(np.int64),
              target_labels=None if tl is None else np.asarray(tl).astype(np.int64))
    res = func(src, tgt, progress=progress, **kw)
    ext = Path(source).suffix.lower()

    def fill(d):
        save_points(d / f"moved_source{ext if ext in ('.txt', '.csv', '.npy') else '.txt'}", res.apply_points(src))
        res.inverse.save(d / "transform.npz")
        if kw.get("reference") is not None:  # the deformation sampled on that grid, for image tools
            from .io import save
            from .solvers.points import points_displacement_field

            save(points_displacement_field(res.transform, kw["reference"]), d / "field.nii.gz")
        _write_text(d / "params.json", json.dumps(_jsonable(res.params), indent=2, sort_keys=True))
        _write_history(d / "history.csv", res.history)
        if qc:
            try:
                from .qc import qc_points

                qc_points(res, src, tgt, d / "qc.png", title=f"points: {Path(source).name} → {Path(target).name}")
            except ImportError as exc:
                print(f"classreg: note: {exc}; no qc.png written", file=sys.stderr)
        _write_text(d / "result.json", json.dumps(_jsonable({
            "converged": res.converged, "stop_reason": res.stop_reason, "metrics": res.metrics,
            "timings": res.timings}), indent=2, sort_keys=True))

    publish_folder(out, fill, overwrite=overwrite)
    _report(declaration, res, out)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as exc:
        print(f"classreg: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
