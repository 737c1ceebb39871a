"""register_demons side by side with SimpleITK demons, DIPY SyN (CC) and ANTs (SyN, SyNCC) — the demons issue's
benchmark, run by the shared harness (benchmarks/run.py; cases and tools are documented there and in
benchmarks/cases.py, benchmarks/tools.py):

    python -m benchmarks.demons [--cases inter3d synth3d brain2d lung2d circle2d] [--threads 2] [--repeat 2]

Any option of ``python -m benchmarks.run`` is accepted; ``--cases`` and ``--tools`` default to the demons set below.
Writes benchmarks/results/<date>.json and .md (not docs/benchmarks.md unless ``--docs`` is given).
"""
from __future__ import annotations

import sys

from .run import main as _run

CASES = ("inter3d", "synth3d", "brain2d", "lung2d", "circle2d")
TOOLS = ("classreg_demons", "classreg_demons_cc", "sitk_diffeo_demons", "dipy_syn_cc", "ants_syn", "ants_syncc")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--cases" not in argv:
        argv += ["--cases", *CASES]
    if "--tools" not in argv:
        argv += ["--tools", *TOOLS]
    if "--docs" not in argv:
        argv.append("--no-docs")
    return _run(argv)


if __name__ == "__main__":
    sys.exit(main())
