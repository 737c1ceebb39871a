"""classreg.kernels._backend: the OpenMP wait settings made on import (see the comment there for the timings). They are
read when the OpenMP runtime loads, at numba's first parallel launch, which always follows the import of the kernels."""
import json
import os
import subprocess
import sys

import pytest

_PROBE = ("import json, os, classreg.kernels; "
          "print(json.dumps({k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}))")


@pytest.mark.parametrize(
    "user,expected",
    [
        ({}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "5000"}),  # the bounded spin
        ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}),  # sleep at once
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None}),
        ({"GOMP_SPINCOUNT": "100"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "100"}),
    ],
)
def test_openmp_wait_settings_on_import_leave_a_users_own_alone(user, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_numpy_row_stack_alias_for_numba_cuda(monkeypatch):
    # numba-cuda compiles an overload of np.row_stack, which NumPy 2.5 removed: the alias comes back (as np.vstack)
    # when missing, and an existing one is left alone
    import numpy as np

    from classreg.kernels import _backend

    monkeypatch.delattr(np, "row_stack", raising=False)
    _backend._numpy_alias_for_numba_cuda()
    assert np.row_stack is np.vstack
    own = object()
    monkeypatch.setattr(np, "row_stack", own)
    _backend._numpy_alias_for_numba_cuda()
    assert np.row_stack is own


def test_launch_hands_cupy_arrays_to_numba_without_stream_syncs(monkeypatch):
    # numba synchronises the stream a __cuda_array_interface__ names (CuPy names its current one) for every array
    # argument of every launch unless asked not to: _backend.launch converts CuPy arrays with sync=False and launches
    # on CuPy's current stream (the mechanics, with numba.cuda and CuPy replaced by recorders; a real GPU runs it in
    # tests/test_gpu.py through every solver)
    import numpy as np
    from numba import cuda

    from classreg.kernels import _backend

    DeviceLike = type("ndarray", (), {"__module__": "cupy"})  # what is_cupy_array looks at
    dev, host = DeviceLike(), np.zeros(3)
    converted = []
    monkeypatch.setattr(cuda, "as_cuda_array", lambda a, sync=True: converted.append((a, sync)) or ("view", a),
                        raising=False)
    monkeypatch.setattr(_backend, "cuda_simulator", lambda: False)
    monkeypatch.setattr(_backend, "_cupy_stream_ptr", lambda: 1234)
    monkeypatch.setattr(_backend, "_numba_stream", lambda ptr: f"stream {ptr}")
    launched = []

    class Kernel:
        def __getitem__(self, config):
            return lambda *args: launched.append((config, args))

    _backend.launch(Kernel(), 1000, dev, host, 2.0, (1, 2))
    assert converted == [(dev, False)]
    assert launched == [((4, 256, "stream 1234"), (("view", dev), host, 2.0, (1, 2)))]
    _backend.launch(Kernel(), 10, host, 3)  # no device array: numba's own launch, default stream
    assert launched[-1] == ((1, 256), (host, 3)) and len(converted) == 1


def test_fft_workers_single_thread_below_the_threshold():
    """Host FFTs below FFT_PARALLEL_MIN elements get one worker (pocketfft starts its threads per call, which costs
    more than a second thread saves there); at or above it the caller's count, all cores (-1) by default."""
    from classreg.kernels._backend import FFT_PARALLEL_MIN, fft_workers

    assert fft_workers(60 * 64) == 1 and fft_workers(FFT_PARALLEL_MIN - 1, 4) == 1
    assert fft_workers(FFT_PARALLEL_MIN) == -1 and fft_workers(4 * FFT_PARALLEL_MIN, 3) == 3
