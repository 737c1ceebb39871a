"""Shared pytest fixtures and the backend parity harness.

Parity tests are parametrised over ``BACKENDS_UNDER_TEST``. Tests that run numba.cuda kernels carry the
``cudasim`` marker: in an ordinary run they execute only if a real CUDA device is usable; ``tests/test_cudasim.py``
re-runs ``pytest -m cudasim`` in a separate process with ``NUMBA_ENABLE_CUDASIM=1`` so the GPU code is checked
on every CI run without a GPU.
"""
from __future__ import annotations

import os

if os.environ.get("CLASSREG_TEST_NUMBA_CUDA", "0") not in ("", "0"):
    # Opt-in: run the CUDA tests on the numba-cuda package (what a GPU machine installs: its simulator under
    # NUMBA_ENABLE_CUDASIM=1, its PTX compiler for tests/test_ptx.py) instead of numba's built-in numba.cuda. A pip
    # install of numba-cuda does this itself through a .pth file; a copy on PYTHONPATH needs this import before
    # numba.cuda is first imported. tests/test_cudasim.py passes the variable on to its subprocess.
    import _numba_cuda_redirector  # noqa: F401

import numpy as np
import pytest

from classreg.kernels import _backend

# The elastix command lines run without their start-up server here (no background process outlives the tests);
# tests/test_elastix_server.py switches it on in a private folder.
os.environ.setdefault("CLASSREG_SERVER", "0")

CUDA_USABLE = _backend._cuda_usable()


def backend_params():
    """``pytest.param`` list over the backends: numpy (reference), numba, cuda (marked ``cudasim``)."""
    params = [pytest.param("numpy", id="numpy")]
    params.append(
        pytest.param(
            "numba",
            id="numba",
            marks=pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed"),
        )
    )
    params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cudasim))
    return params


def pytest_collection_modifyitems(config, items):
    if CUDA_USABLE:
        return
    skip = pytest.mark.skip(reason="no CUDA device and NUMBA_ENABLE_CUDASIM not set (run by tests/test_cudasim.py)")
    skip_gpu = pytest.mark.skip(reason="needs a real CUDA GPU")
    for item in items:
        if "cudasim" in item.keywords:
            item.add_marker(skip)
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    """A local, seeded generator (never the global RNG)."""
    return np.random.default_rng(12345)
