"""Array-module and device selection for classreg (CPU: numpy/numba; GPU: CuPy + numba.cuda).

The rule is CuPy's: data that lives on the GPU (a ``cupy.ndarray``) is processed on the GPU, everything else on
the CPU.  CuPy may be importable on a machine where no GPU works (the first allocation raises
``CUDARuntimeError``); :func:`gpu_available` detects that once, logs it, and classreg falls back to the CPU.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import sys

import numpy as np

from .kernels._backend import HAVE_NUMBA, get_array_module, is_cupy_array

__all__ = ["get_array_module", "gpu_available", "to_device", "to_numpy", "versions", "resolve_device"]

logger = logging.getLogger("classreg")


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    """True if CuPy is installed *and* a CUDA device accepts an allocation (checked once per process)."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        cupy.zeros(1)
        return True
    except Exception as exc:  # CUDARuntimeError, ImportError of a CUDA library, ...
        logger.info("cupy is installed but no usable CUDA device was found (%s); using the CPU", exc)
        return False


def gpu_devices() -> list:
    """The CUDA devices CuPy can use: ``[{"id": "cuda:N", "name": ..., "memory_gib": ...}, ...]`` (empty without a
    usable GPU)."""
    if not gpu_available():
        return []
    import cupy

    out = []
    for i in range(cupy.cuda.runtime.getDeviceCount()):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        name = props["name"]
        out.append({"id": f"cuda:{i}", "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_gib": round(props["totalGlobalMem"] / 2**30, 1)})
    return out


def resolve_device(device, *arrays) -> str:
    """Return ``"cpu"`` or ``"cuda"`` from ``device`` (None/"auto"/"cpu"/"cuda"/"gpu") and the data."""
    if device in (None, "auto"):
        return "cuda" if any(is_cupy_array(a) for a in arrays) else "cpu"
    dev = str(device).lower()
    if dev in ("gpu", "cuda") or dev.startswith("cuda:"):
        if not gpu_available():
            raise ValueError(
                f"device={device!r} requested but no usable CUDA GPU was found "
                "(install classreg[gpu] on a machine with an NVIDIA GPU, or use device='cpu')"
            )
        return "cuda"
    if dev == "cpu":
        return "cpu"
    raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")


def placement(device, backend, *arrays) -> tuple:
    """Where a solver keeps its data and which kernels run there: ``(device, backend)``, device "cpu" or "cuda".

    "cuda" when ``device`` asks for it, when ``device`` is None and the data are CuPy arrays, or when
    ``backend="cuda"`` on a machine with a usable GPU; the backend is then "cuda". The solver moves its working
    arrays there once (:func:`to_device`) and keeps them there until it returns.
    """
    dev = resolve_device(device, *arrays)
    if dev == "cpu" and device in (None, "auto") and backend == "cuda" and gpu_available():
        dev = "cuda"
    if dev == "cuda":
        if backend not in (None, "cuda"):
            raise ValueError(f"backend={backend!r} runs on the CPU but the data are on the GPU (CuPy arrays): use "
                             "backend=None or 'cuda', or device='cpu' to copy the images to the host first")
        backend = "cuda"
    return dev, backend


def to_device(a, device):
    """Return ``a`` on ``device`` ("cpu" → numpy, "cuda" → cupy); no copy if it is already there."""
    if resolve_device(device) == "cuda":
        import cupy

        return cupy.asarray(a)
    return to_numpy(a)


def to_numpy(a):
    """Host copy of ``a`` as a numpy array (``a`` itself if it already is one)."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def versions() -> dict:
    """Versions of classreg and of the libraries that change results (recorded in every ``Result.params``)."""
    from ._version import __version__

    out = {
        "classreg": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    for name in ("scipy", "SimpleITK", "numba", "cupy", "tqdm"):
        if importlib.util.find_spec(name) is None:
            out[name] = None
            continue
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", None)
        except Exception as exc:  # pragma: no cover - broken installs
            out[name] = f"unimportable ({exc.__class__.__name__})"
    return out


def thread_count() -> int:
    """Number of CPU threads numba kernels use (``NUMBA_NUM_THREADS`` or all cores)."""
    if HAVE_NUMBA:
        import numba

        return int(numba.get_num_threads())
    return int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1))
