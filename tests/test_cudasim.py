"""Run every ``cudasim``-marked test under numba's CUDA simulator, in its own process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")


def test_cuda_kernels_under_simulator(request):
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        pytest.skip("already inside the simulator run")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    tests_dir = Path(__file__).resolve().parent
    # the outer run's "not slow" holds inside too (the simulator's 3-D solver runs are marked slow)
    marks = "cudasim and not slow" if "not slow" in (request.config.getoption("markexpr") or "") else "cudasim"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(tests_dir), "-m", marks, "-q", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode == 5:
        pytest.skip("no cudasim-marked tests collected yet")
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in out, out[-3000:]
