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
SOLVER_CLIS: tuple[str, ...] = ("classreg.solvers.bcpd",)


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
