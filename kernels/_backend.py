"""Backend selection shared by every kernel: numpy reference, numba CPU, numba.cuda GPU.

Rules:

* ``backend=None`` (the default of every public kernel) picks from the arrays: a CuPy array selects ``"cuda"``;
  otherwise ``"numba"`` when numba imports, else ``"numpy"``.  ``"numpy"`` is the plain reference (the test oracle).
* Setting the environment variable ``CLASSREG_BACKEND=numpy`` forces the reference path everywhere (debugging).
* numba and cupy are optional: nothing here imports them at module import time beyond a cheap ``find_spec``.
* Under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the ``"cuda"`` backend accepts numpy arrays, so GPU
  kernels are exercised without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys

import numpy as np

__all__ = [
    "BACKENDS",
    "HAVE_NUMBA",
    "cuda_simulator",
    "get_array_module",
    "is_cupy_array",
    "njit",
    "resolve_backend",
    "gpu_launch",
    "launch",
    "serial_below",
]

BACKENDS = ("numpy", "numba", "cuda")

HAVE_NUMBA = importlib.util.find_spec("numba") is not None

# OpenMP wait policy of numba's "omp" threading layer. The solvers launch many short parallel kernels per iteration,
# so what the workers do between launches matters. libgomp's default spins ~3 ms: with more runnable threads than
# cores (a shared machine, another job) the spinning workers steal the cores (3-D demons 23 s instead of 7 s, 2 cores,
# load 3). Passive workers sleep at once, but waking them costs ~80 us per launch on this 2-core VM: 20 % of a 256²
# demons run. A bounded spin of 5000 iterations (~50 us) keeps the workers awake across the short gaps between
# kernels. Measured on 2 cores, brain2d LNCC register_demons (median of 7, then of 3):
#   idle machine:         passive 0.437 s, spin 5000 0.359 s (spin 3000 0.397, 10000 0.352, unbounded-active 0.350)
#   one busy process too: passive 0.472 s, spin 5000 0.60 s  (spin 10000 0.69, active 1.04)
# 3-D pairs (2-3 ms kernels) are the same within noise either way (inter3d: +5 % under load). GOMP_SPINCOUNT is read by
# libgomp (Linux) only and overrides the wait policy's spin count; other OpenMP runtimes see OMP_WAIT_POLICY=PASSIVE.
# Both are read when the runtime loads (numba's first parallel launch); a user's own setting of either wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "5000"

# numba prefers TBB to OpenMP when both are installed; classreg installs TBB (Linux x86-64) for the start-up server
# of classreg.elastix, which forks its jobs and needs a layer that survives fork, and keeps OpenMP, tuned above,
# first everywhere else. A user's NUMBA_THREADING_LAYER(_PRIORITY) wins; read at numba's first parallel launch.
if "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ and "NUMBA_THREADING_LAYER" not in os.environ:
    os.environ["NUMBA_THREADING_LAYER_PRIORITY"] = "omp tbb workqueue"
    if "numba" in sys.modules:  # imported before classreg: its configuration is already read
        sys.modules["numba"].config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def rebind(func, namespace, suffix: str = ""):
    """A copy of the plain-Python body ``func`` whose globals are ``namespace``.

    This is how one body is compiled for several targets or bound to compiled helpers without closures: the code
    object is the same, so numba's on-disk cache key (qualified name, file, line) is stable across processes.
    Copies of one body bound to *different* helpers in the same target need distinct ``suffix`` values (appended to
    ``__qualname__``) or they would share cache entries.
    """
    import types

    new = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    new.__qualname__ = func.__qualname__ + suffix
    new.__module__ = func.__module__
    new.__doc__ = func.__doc__
    return new


def cuda_simulator() -> bool:
    """True when numba's CUDA simulator is switched on for this process."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def is_cupy_array(a) -> bool:
    """True for a ``cupy.ndarray`` (checked without importing cupy)."""
    return type(a).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays):
    """``cupy`` if any argument is a CuPy array, else ``numpy`` (the ``cupy.get_array_module`` rule)."""
    for a in arrays:
        if is_cupy_array(a):
            import cupy

            return cupy
    return np


def _numpy_alias_for_numba_cuda() -> None:
    """Give NumPy back the ``row_stack`` alias that numba-cuda needs to compile any kernel.

    numba-cuda (up to 0.30.4, the newest at the time of writing) registers ``overload(np.row_stack)`` in
    ``numba/cuda/np/arrayobj.py``, which it imports when it compiles its first kernel; NumPy 2.5 removed that
    deprecated alias of ``np.vstack``, so every kernel compilation fails with ``AttributeError: module 'numpy' has
    no attribute 'row_stack'`` (seen on an H200 machine with numpy 2.5.2 and numba 0.68). Only added when missing,
    only once the GPU is about to be used; the alias is the function NumPy 1.x-2.4 exposed under that name.
    """
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


@functools.lru_cache(maxsize=None)
def _cuda_usable() -> bool:
    if not HAVE_NUMBA:
        return False
    _numpy_alias_for_numba_cuda()
    if cuda_simulator():
        return True
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # pragma: no cover - depends on the machine
        return False


def resolve_backend(backend, *arrays) -> str:
    """Return the backend name to use for ``arrays``.

    Parameters
    ----------
    backend : {None, "auto", "numpy", "numba", "cuda"}
        ``None``/``"auto"`` choose from the array types and what is installed.
    """
    forced = os.environ.get("CLASSREG_BACKEND", "").strip().lower()
    if backend in (None, "auto"):
        if any(is_cupy_array(a) for a in arrays):
            return "cuda"
        if forced in BACKENDS and forced != "cuda":
            return forced
        return "numba" if HAVE_NUMBA else "numpy"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "numba" and not HAVE_NUMBA:
        raise ValueError("backend='numba' requested but numba is not installed (pip install numba)")
    if backend == "cuda" and not _cuda_usable():
        raise ValueError(
            "backend='cuda' requested but no CUDA device is usable (install the 'gpu' extra on a machine "
            "with an NVIDIA GPU, or set NUMBA_ENABLE_CUDASIM=1 to run the simulator)"
        )
    if backend != "cuda" and any(is_cupy_array(a) for a in arrays):
        raise TypeError(f"backend={backend!r} needs host (numpy) arrays, got a CuPy array")
    return backend


def njit(*args, **kwargs):
    """``numba.njit`` with ``cache=True`` by default; must only be called when numba is installed.

    Kernel modules decorate their numba paths lazily (inside a ``functools.cache``d builder), so that
    importing ``classreg.kernels`` never needs numba.
    """
    import numba

    kwargs.setdefault("cache", True)
    return numba.njit(*args, **kwargs)


def cuda_jit(func, *, device: bool = False):
    """``numba.cuda.jit`` of ``func``; kernels (not device functions, which are compiled into them) are cached on disk
    (``cache=True``), as :func:`njit` caches the CPU kernels: a new process loads their code instead of compiling it
    again (~7 s for a solver's kernels on first use). numba keys the cache by the function's qualified name, source
    line, bytecode and argument types, not by its globals: every kernel the builders bind to other helpers or float
    types carries a distinct suffix in its ``__qualname__`` (:func:`variant_suffix`), checked by
    tests/test_ptx.py. Must only be called when numba is installed."""
    from numba import cuda

    return cuda.jit(device=True)(func) if device else cuda.jit(cache=True)(func)


def variant_suffix(deps: dict) -> str:
    """A ``__qualname__`` suffix naming what ``deps`` binds, the same in every process: the qualified names of the
    compiled helpers (which carry their own suffixes), the names of types and modules, the ``repr`` of other values.
    Copies of one body bound to different helpers or float types thereby get distinct on-disk cache entries."""
    import hashlib

    parts = []
    for k in sorted(deps):
        v = deps[k]
        f = getattr(v, "py_func", None) or getattr(v, "fn", None)  # a numba.cuda dispatcher / simulator kernel
        name = getattr(f, "__qualname__", None) or getattr(v, "__name__", None) or repr(v)
        parts.append(f"{k}={name}")
    return "_" + hashlib.sha1(";".join(parts).encode()).hexdigest()[:12]


def gpu_launch(n: int, threads: int = 256):
    """1-D launch configuration ``(blocks, threads)`` covering ``n`` work items."""
    if cuda_simulator():
        threads = min(threads, 32)
    blocks = max(1, (int(n) + threads - 1) // threads)
    return blocks, threads


def launch(kernel, n: int, *args, threads: int = 256) -> None:
    """Launch the ``numba.cuda`` kernel ``kernel`` over ``n`` work items (1-D grid, :func:`gpu_launch`) on CuPy's
    current stream.

    CuPy arrays among ``args`` are handed to numba as device arrays *without* the stream synchronisation that numba
    performs by default when it imports a ``__cuda_array_interface__`` naming a stream (CAI v3; CuPy names its
    current stream): one ``cuStreamSynchronize`` per array argument per launch, which drains the GPU's queue before
    every kernel and leaves the GPU idle while Python prepares the next one. Launching on the stream the CuPy
    operations use keeps their order, so nothing needs that synchronisation. Other arguments (scalars, tuples, host
    arrays, which numba copies) pass unchanged; under the CUDA simulator everything passes unchanged.
    """
    blocks, threads = gpu_launch(n, threads)
    if cuda_simulator() or not any(is_cupy_array(a) for a in args):
        kernel[blocks, threads](*args)
        return
    from numba import cuda

    args = tuple(cuda.as_cuda_array(a, sync=False) if is_cupy_array(a) else a for a in args)
    kernel[blocks, threads, _numba_stream(_cupy_stream_ptr())](*args)


def _cupy_stream_ptr() -> int:
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


@functools.lru_cache(maxsize=8)
def _numba_stream(ptr: int):
    """numba's handle of the CUDA stream ``ptr`` (0, CuPy's null stream, is the legacy default stream: numba's
    default too)."""
    from numba import cuda

    return cuda.default_stream() if ptr == 0 else cuda.external_stream(ptr)


#: Work sizes (voxels) below which :func:`serial_below` runs numba's parallel kernels on one thread. Waking the
#: passive OpenMP workers costs tens of microseconds per parallel launch; on grids this small that is more than the
#: second thread saves (measured on 2 cores: register_demons on a 128² pair 0.26 s with 2 threads vs 0.12 s with one,
#: the same result bit for bit).
SERIAL_BELOW = int(os.environ.get("CLASSREG_SERIAL_BELOW", 1 << 16))


#: scipy.fft / pocketfft calls on fewer elements than this run on one thread: pocketfft starts its threads per call,
#: which costs more than they save on small arrays (measured on 2 cores, one r2c pass: 12 × 60² fields 65 µs with one
#: thread, 188 µs with two; 12 × 120² 311 vs 536 µs; 3 × 30×36×30 90 vs 355 µs; 3 × 40×48×40 236 vs 225 µs; 12 × 250²
#: 2.4 vs 0.9 ms; an rfftn of 60×64 float32 16 vs 199 µs, 450×512 613 vs 717 µs)
FFT_PARALLEL_MIN = 1 << 18


def fft_workers(n_elements: int, workers: int | None = None) -> int:
    """The ``workers`` of a host FFT over ``n_elements`` (all cores for None): 1 below :data:`FFT_PARALLEL_MIN`."""
    return (-1 if workers is None else int(workers)) if n_elements >= FFT_PARALLEL_MIN else 1


@contextlib.contextmanager
def serial_below(n_items: int, threshold: int | None = None):
    """Context in which numba's parallel kernels use one thread if ``n_items < threshold`` (default
    :data:`SERIAL_BELOW`); otherwise, or without numba, nothing changes. The thread count is restored on exit.
    Every classreg kernel gives the same result for any thread count, so this only changes the time."""
    threshold = SERIAL_BELOW if threshold is None else threshold
    if not HAVE_NUMBA or n_items >= threshold:
        yield
        return
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(old)
