"""``classreg`` command line: ``classreg info`` and (as solvers land) ``classreg register ...``."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ._version import __version__

__all__ = ["main"]


def _cmd_info(args) -> int:
    from .backend import gpu_available, thread_count, versions
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
    print(f"  CPU threads used by numba kernels: {info['cpu_threads']}")
    return 0


#: Modules that add a ``classreg register <solver>`` sub-command through ``add_cli(subparsers)``; each sub-command
#: sets ``func(args) -> int`` as its default.
SOLVER_CLIS: tuple[str, ...] = ("classreg.solvers.demons", "classreg.solvers.bcpd", "classreg.solvers.rigid",
                               "classreg.solvers.lddmm")


def _cmd_demo(args) -> int:
    from .demo import run_demo

    s = run_demo(args.out, prefer_3d=not args.two_d, progress=not args.quiet)
    names = {1: "CSF", 2: "GM", 3: "WM"}

    def fmt(d):
        return ", ".join(f"{names.get(k, k)} {v:.3f}" for k, v in d.items())

    print(f"classreg demo ({s['case']})")
    print(f"  data: {s['provenance']}")
    print(f"  Dice after affine : {fmt(s['dice_affine'])}  (mean {s['mean_dice_affine']:.3f}); NCC {s['ncc_affine']:.3f}")
    print(f"  Dice after demons : {fmt(s['dice_demons'])}  (mean {s['mean_dice_demons']:.3f}); NCC {s['ncc_demons']:.3f}")
    print(f"  time: affine {s['seconds_affine']:.1f} s, demons {s['seconds_demons']:.1f} s ({s['pieces']} piece(s)); "
          f"min det J {s['min_det_j']:.3f}, det J <= 0: {s['percent_det_j_nonpositive']:.4f} %")
    print(f"  outputs: {s['outputs']}/ (qc.png, warped.nii.gz, transform.*, params.json, history.csv)")
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
    if SOLVER_CLIS:
        import importlib

        reg = sub.add_parser("register", help="register a pair (images or point sets) with one of the solvers")
        solvers = reg.add_subparsers(dest="solver", metavar="SOLVER")
        for mod in SOLVER_CLIS:
            importlib.import_module(mod).add_cli(solvers)
    return p


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
