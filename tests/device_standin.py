"""A stand-in GPU for tests: a numpy-backed "device array module" installed as ``cupy`` that counts host transfers.

classreg finds device data the way CuPy code does: ``kernels._backend.is_cupy_array`` looks at the array type's
module, ``get_array_module`` imports ``cupy``, ``classreg.backend.gpu_available`` allocates through it. The
:func:`installed` context puts :class:`StandinCupy` into ``sys.modules["cupy"]``, so the library's device code paths
(and ``cupyx.scipy.ndimage``, on scipy's; ``cupyx.scipy.sparse.csr_matrix`` as :class:`CsrMatrix`) run unchanged,
without a GPU, on :class:`DeviceArray` — a wrapper around a numpy array that behaves like a
``cupy.ndarray`` where it matters for residency:

* implicit conversion to numpy (``numpy.asarray(x)``, ``x.__array__``, a numpy ufunc mixing device and host arrays)
  raises ``TypeError`` as CuPy does, and is recorded;
* explicit transfers are counted with their sizes: ``x.get()`` / ``cupy.asnumpy(x)`` / ``x.tolist()`` (downloads),
  ``cupy.asarray(host)`` and friends (uploads), ``float(x)`` / ``int(x)`` / ``bool(x)`` / ``x.item()`` (a synchronising
  read of one value);
* reductions return 0-d device arrays (reading their value is a counted scalar read), as in CuPy;
* under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) a DeviceArray passed to a ``numba.cuda`` kernel is
  handed to the simulated kernel as device memory without a copy (numba's ``ArgHint`` protocol), while every *host*
  numpy array passed to a kernel is counted: on a GPU numba copies it up before the launch and back after it.

So a solver run with ``device="cuda"`` inside :func:`installed` executes its numba.cuda kernels in the simulator on
the stand-in's memory, and :class:`Transfers` says what crossed the bus. Small inputs only: the simulator runs every
GPU thread in Python. Any solver can be wrapped the same way (see tests/test_device_residency.py).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import sys
import types
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CsrMatrix", "DeviceArray", "StandinCupy", "Transfers", "installed", "run_counted", "SCALAR_ELEMENTS"]

#: A download of at most this many elements counts as a scalar read (a synchronisation returning a few numbers,
#: e.g. an energy, a voxel count and a largest step), not as an array transfer.
SCALAR_ELEMENTS = 8

# Functions of the device module that take host data and copy it to the device (everything else refuses host
# arrays, as CuPy's functions do).
_UPLOADS = frozenset({"asarray", "array", "ascontiguousarray", "asanyarray", "asfortranarray"})


@dataclass
class Transfers:
    """What crossed between host and stand-in device: a list of ``(kind, elements, where)`` records.

    kinds: ``"upload"``, ``"download"``, ``"scalar"`` (a read of at most :data:`SCALAR_ELEMENTS` values),
    ``"kernel_host_arg"`` (a host array given to a numba.cuda kernel: copied up and back by numba on a GPU),
    ``"implicit"`` (a refused implicit conversion to numpy).
    """

    log: list = field(default_factory=list)

    def record(self, kind: str, elements: int) -> None:
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename == __file__ or "numba" in frame.f_code.co_filename):
            frame = frame.f_back
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
        self.log.append((kind, int(elements), where))

    def mark(self) -> int:
        """Position in the log (for counting what happened between two marks)."""
        return len(self.log)

    def between(self, start: int, stop: int | None = None, kinds=None) -> list:
        """The records from mark ``start`` to mark ``stop`` (default: now), optionally only those of ``kinds``."""
        out = self.log[start:stop]
        return out if kinds is None else [r for r in out if r[0] in kinds]


class DeviceArray(np.lib.mixins.NDArrayOperatorsMixin):
    """A numpy array standing in for a ``cupy.ndarray`` (see the module docstring)."""

    __module__ = "cupy"  # what is_cupy_array looks at: the type's top-level module
    __array_priority__ = 100

    def __init__(self, a: np.ndarray, transfers: Transfers):
        self._a = a
        self._t = transfers

    # ---------------------------------------------------------------------------------------------- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: self._wrap(self._a.T))
    real = property(lambda self: self._wrap(self._a.real))

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"

    def __len__(self) -> int:
        return len(self._a)

    def _wrap(self, value):
        return _wrap(value, self._t)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(self._a, name)
        if callable(value):
            def method(*args, **kwargs):
                return _wrap(value(*_unwrap_all(args, self._t), **_unwrap_all(kwargs, self._t)), self._t)

            return method
        return _wrap(value, self._t)

    def __getitem__(self, key):
        return self._wrap(self._a[_unwrap(key, self._t, what="an index")])

    def __setitem__(self, key, value):
        self._a[_unwrap(key, self._t, what="an index")] = _unwrap(value, self._t)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # ---------------------------------------------------------------------------------------------- transfers
    def get(self, stream=None, order="C", out=None):
        """Explicit download (counted)."""
        self._t.record("download" if self.size > SCALAR_ELEMENTS else "scalar", self.size)
        return np.array(self._a, copy=True)

    def tolist(self):
        self._t.record("download" if self.size > SCALAR_ELEMENTS else "scalar", self.size)
        return self._a.tolist()

    def item(self, *args):
        self._t.record("scalar", 1)
        return self._a.item(*args)

    def _scalar(self, cast):
        if self.size != 1:
            raise TypeError(f"only size-1 device arrays convert to Python scalars, got shape {self.shape}")
        self._t.record("scalar", 1)
        return cast(self._a.reshape(()))

    def __float__(self):
        return self._scalar(float)

    def __int__(self):
        return self._scalar(int)

    def __index__(self):
        return self._scalar(int)

    def __bool__(self):
        return self._scalar(bool)

    def __array__(self, dtype=None, copy=None):
        self._t.record("implicit", self.size)
        raise TypeError("Implicit conversion to a NumPy array is not allowed (stand-in device array); "
                        "use .get() to copy it to the host explicitly")

    # ---------------------------------------------------------------------------------------------- numpy protocols
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.pop("out", None)
        kwargs = _unwrap_all(kwargs, self._t)
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o, self._t) for o in out)
        result = getattr(ufunc, method)(*_unwrap_all(inputs, self._t), **kwargs)
        if out is not None and len(out) == 1:
            return out[0]  # the DeviceArray given as out
        return _wrap(result, self._t)

    def __array_function__(self, func, types, args, kwargs):
        return _wrap(func(*_unwrap_all(args, self._t), **_unwrap_all(kwargs, self._t)), self._t)

    # ---------------------------------------------------------------------------------------------- numba.cuda
    def to_device(self, retr, stream=0):
        """numba's ``ArgHint`` protocol: the simulated kernel works on this memory, no copy (it is on the device)."""
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(self._a)


def _wrap(value, transfers):
    if isinstance(value, np.ndarray):
        return DeviceArray(value, transfers)
    if isinstance(value, np.generic):  # CuPy's reductions return 0-d device arrays, not host scalars
        return DeviceArray(np.asarray(value), transfers)
    if isinstance(value, tuple):
        return tuple(_wrap(v, transfers) for v in value)
    if isinstance(value, list):
        return [_wrap(v, transfers) for v in value]
    return value


def _unwrap(value, transfers, what="an argument"):
    if isinstance(value, DeviceArray):
        return value._a
    if isinstance(value, np.ndarray) and value.ndim > 0:
        transfers.record("implicit", value.size)
        raise TypeError(f"a host numpy array {value.shape} was given as {what} of a device operation "
                        "(CuPy refuses this: upload it with cupy.asarray first)")
    if isinstance(value, (tuple, list)):
        return type(value)(_unwrap(v, transfers, what) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, transfers, what) for k, v in value.items()}
    return value


def _unwrap_all(args, transfers):
    if isinstance(args, dict):
        return {k: _unwrap(v, transfers) for k, v in args.items()}
    return tuple(_unwrap(a, transfers) for a in args)


class _Namespace(types.ModuleType):
    """A device namespace mirroring a numpy namespace (``numpy``, ``numpy.fft``, ``numpy.linalg``)."""

    def __init__(self, name, host, transfers):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)
        self._host = host
        self._t = transfers

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(self._host, name)
        if isinstance(value, type) or not callable(value):
            return value  # dtypes and constants are numpy's, as in CuPy

        t = self._t

        def func(*args, **kwargs):
            if name in _UPLOADS and args and not isinstance(args[0], DeviceArray):
                host = np.asarray(args[0])
                t.record("upload" if host.size > SCALAR_ELEMENTS else "scalar", host.size)
                return _wrap(value(host, *args[1:], **_unwrap_all(kwargs, t)), t)
            return _wrap(value(*_unwrap_all(args, t), **_unwrap_all(kwargs, t)), t)

        func.__name__ = name
        return func


class StandinCupy(_Namespace):
    """The stand-in ``cupy`` module: numpy's namespace on :class:`DeviceArray` data, counting transfers."""

    def __init__(self, transfers: Transfers | None = None):
        transfers = Transfers() if transfers is None else transfers
        super().__init__("cupy", np, transfers)
        self.transfers = transfers
        self.ndarray = DeviceArray
        self.fft = _Namespace("cupy.fft", np.fft, transfers)
        self.linalg = _Namespace("cupy.linalg", np.linalg, transfers)
        self.cuda = types.SimpleNamespace(Device=_Device, runtime=types.SimpleNamespace(
            getDeviceCount=lambda: 1, getDeviceProperties=lambda i: {"name": b"stand-in device", "totalGlobalMem": 2**30}))
        self.__version__ = "stand-in"

    def asnumpy(self, a, stream=None, order="C", out=None):
        if isinstance(a, DeviceArray):
            return a.get()
        return np.asarray(a)

    def get_array_module(self, *args):
        return self if any(isinstance(a, DeviceArray) for a in args) else np


class CsrMatrix:
    """The stand-in ``cupyx.scipy.sparse.csr_matrix``: a scipy CSR matrix on the stand-in device. Built from a host
    matrix it counts one upload (data, indices, indptr); ``get()`` counts one download; ``G @ x`` takes and returns
    device arrays (a host operand is refused, as by CuPy)."""

    __module__ = "cupyx.scipy.sparse"

    def __init__(self, arg, transfers: Transfers):
        import scipy.sparse

        if isinstance(arg, CsrMatrix):
            self._m = arg._m.copy()
        else:
            self._m = scipy.sparse.csr_matrix(arg)
            size = 2 * self._m.nnz + len(self._m.indptr)
            transfers.record("upload" if size > SCALAR_ELEMENTS else "scalar", size)
        self._t = transfers

    shape = property(lambda self: self._m.shape)
    nnz = property(lambda self: self._m.nnz)
    dtype = property(lambda self: self._m.dtype)

    def diagonal(self, k=0):
        return DeviceArray(self._m.diagonal(k), self._t)

    def __matmul__(self, other):
        return _wrap(self._m @ _unwrap(other, self._t), self._t)

    def get(self, stream=None):
        """Explicit download (counted): a scipy CSR matrix."""
        self._t.record("download", 2 * self._m.nnz + len(self._m.indptr))
        return self._m.copy()


class _Device:
    def __init__(self, index=0):
        self.id = int(index)

    def use(self):
        return self


@contextlib.contextmanager
def installed(monkeypatch):
    """Install a fresh :class:`StandinCupy` as ``cupy`` with pytest's ``monkeypatch`` (undone at the test's end) and
    reset classreg's GPU detection; yields the module.

    Inside, ``Image(...).to("cuda")``, ``device="cuda"`` and CuPy-typed data all go to the stand-in. Under numba's
    CUDA simulator, host arrays passed to numba.cuda kernels are counted (``"kernel_host_arg"``).
    """
    from classreg.kernels import _backend

    from classreg import backend

    if _backend._cuda_usable() and not _backend.cuda_simulator():
        # a real GPU: its numba.cuda kernels cannot take the stand-in's host memory; tests/test_gpu.py runs the
        # solvers on real CuPy arrays there
        import pytest

        pytest.skip("the stand-in device needs numba's CUDA simulator or no GPU; tests/test_gpu.py covers a real one")
    mod = StandinCupy()
    mp = monkeypatch
    mp.setitem(sys.modules, "cupy", mod)
    for name, host in (("cupyx", None), ("cupyx.scipy", None), ("cupyx.scipy.ndimage", "scipy.ndimage"),
                       ("cupyx.scipy.linalg", "scipy.linalg"), ("cupyx.scipy.special", "scipy.special")):
        sub = _Namespace(name, importlib.import_module(host) if host else types.SimpleNamespace(), mod.transfers)
        mp.setitem(sys.modules, name, sub)
        if "." in name:
            parent, leaf = name.rsplit(".", 1)
            setattr(sys.modules[parent], leaf, sub)
    sparse = types.ModuleType("cupyx.scipy.sparse")
    sparse.csr_matrix = lambda arg, **kwargs: CsrMatrix(arg, mod.transfers)
    mp.setitem(sys.modules, "cupyx.scipy.sparse", sparse)
    mp.setattr(sys.modules["cupyx.scipy"], "sparse", sparse, raising=False)
    if _backend.cuda_simulator():
        from numba.cuda.args import ArgHint
        from numba.cuda.simulator import kernel as sim_kernel
        from numba.cuda.simulator.kernel import FakeCUDAKernel

        if hasattr(ArgHint, "register"):  # numba's numba.cuda: an abstract base class
            ArgHint.register(DeviceArray)
        else:  # numba-cuda (0.30): a plain class; the simulator's isinstance check is given the stand-in too
            mp.setattr(sim_kernel, "ArgHint", (ArgHint, DeviceArray))
        launch = FakeCUDAKernel.__call__

        def counted_launch(kernel, *args):
            if not kernel._device:
                for a in args:
                    if isinstance(a, np.ndarray) and a.ndim > 0:
                        mod.transfers.record("kernel_host_arg", a.size)
            return launch(kernel, *args)

        mp.setattr(FakeCUDAKernel, "__call__", counted_launch)
    backend.gpu_available.cache_clear()
    try:
        yield mod
    finally:
        backend.gpu_available.cache_clear()


def run_counted(transfers: Transfers, solver, *args, **kwargs):
    """``solver(*args, callback=..., **kwargs)`` with a callback that marks ``transfers`` at every iteration event:
    ``(result, marks)``; ``transfers.between(marks[0], marks[-1])`` is what crossed inside the iteration loop."""
    marks = []

    def callback(event):
        if event.stage == "iteration":
            marks.append(transfers.mark())

    return solver(*args, callback=callback, **kwargs), marks


def only_scalar_reads(transfers: Transfers, marks, bound: float, allowed=lambda record: False) -> float:
    """Assert that inside the iteration loop of a :func:`run_counted` run (between its first and last mark) only
    scalar reads crossed, besides the records ``allowed`` accepts, at most ``bound`` of them per iteration on average,
    and that nowhere in the run an array was converted implicitly or a host array handed to a kernel. Returns the
    scalar reads per iteration."""
    inside = transfers.between(marks[0], marks[-1])
    assert not [r for r in inside if r[0] != "scalar" and not allowed(r)], inside
    assert not transfers.between(0, kinds=("implicit", "kernel_host_arg")), transfers.between(0, kinds=("implicit",))
    per_iteration = len([r for r in inside if r[0] == "scalar"]) / (len(marks) - 1)
    assert per_iteration <= bound, per_iteration
    return per_iteration
