"""A resident start-up server for ``classreg-elastix`` and ``classreg-transformix``.

A Python process that registers one image pair spends about a second before its first iteration: importing numpy,
scipy, SimpleITK and numba, setting up numba's compiler and loading the cached kernels (docs/notes/elastix.md). A
compiled elastix starts in 0.1 s, so on a 2-D pair that second alone is as long as elastix's whole run. Scripts call
elastix in loops (one call per subject, per stage, per label map), so classreg pays that second once per machine
session instead of once per call, the way Gradle's daemon or ``dmypy`` do:

* the first command finds no server, runs in its own process as before (nothing is slower) and starts a server in the
  background, which waits for that command to end. The server imports everything, runs a few tiny registrations to
  load the kernels, and only then listens on a Unix socket in a private folder (``$XDG_RUNTIME_DIR/classreg-<uid>``
  or ``/tmp/classreg-<uid>``, mode 0700, its owner checked; the peer's uid checked on every connection);
* later commands connect, pass their standard input, output and error (the file descriptors themselves), working
  folder, umask, environment and arguments, and the server *forks*: the job runs in a fresh child process of the
  warmed-up server, with the caller's descriptors, folder and environment, and its exit status is sent back and
  returned. A job never shares a process with another job. Ctrl-C, SIGTERM and SIGHUP sent to the command are
  forwarded to the job; a job whose caller disappears is terminated;
* while no job runs, the next job's process is forked and *primed* ahead of the request (a tiny registration, see
  :func:`serve` and :func:`_prime`): a freshly forked process pays for every page it first writes (copy-on-write)
  and for starting its thread pools, ~0.1 s of a 2-D job that the caller would otherwise wait for;
* the socket's name is a hash of the Python executable, classreg's source files (path and modification time) and
  the environment variables read at import time (``NUMBA_*``, ``OMP_*``, ``OPENBLAS_*``, ``MKL_*``, ``CLASSREG_*``,
  ``PYTHONPATH``), so an edited or reinstalled classreg, or another configuration, never runs on a stale server;
* the server exits after ``CLASSREG_SERVER_IDLE`` seconds without a job (default 300), or when its socket is removed;
  ``python -m classreg.elastix.server --stop`` stops it. ``CLASSREG_SERVER=0`` turns the server off: every command
  then runs in its own process. It is off on platforms without ``fork`` and Unix sockets (Windows), and where
  ``NUMBA_THREADING_LAYER`` asks for OpenMP, which cannot fork: the server runs numba's TBB layer (a classreg
  dependency on Linux x86-64; ``pip install tbb`` elsewhere), else numba's ``workqueue``.

A job runs the same code on the same inputs with the same seeds and thread count: a 2-D run writes byte-identical
files either way (``tests/test_elastix_server.py`` compares them). A 3-D affine-family run differs in the last digits:
under TBB the parametric engine takes its parallel per-iteration kernel, whose sums run in another order than the
serial kernel's (``engine._tbb_layer``; affine3d: parameters equal to 1e-7 relative, the same Dice).
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import time

__all__ = ["run", "stop"]

PROGRAMS = {"elastix": "classreg.elastix.registration", "transformix": "classreg.elastix.transformix"}
IDLE_SECONDS = 300.0
_ENV_PREFIXES = ("NUMBA_", "OMP_", "OPENBLAS_", "MKL_", "CLASSREG_", "PYTHONPATH", "PYTHONHASHSEED")
_STARTING_STALE = 120.0  # seconds after which a server that never came up is assumed dead
_FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP")
FORK_SAFE = ("tbb", "workqueue")  # numba threading layers a forked job can use
_MAX_BASE = 60  # a Unix socket path holds 107 bytes at most; the socket's own name takes 35
_PROBE = None  # the server's compiled parallel probe kernel (_fork_safe_threading)


# ---------------------------------------------------------------------------------------------------------- client
def enabled() -> bool:
    """Whether commands use the server (``CLASSREG_SERVER`` not 0/off/false/no; fork and Unix sockets available;
    numba's threading layer not forced to one that cannot fork, such as ``omp``)."""
    if os.environ.get("CLASSREG_SERVER", "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    if not hasattr(os, "fork") or not hasattr(socket, "AF_UNIX") or not hasattr(socket, "send_fds"):
        return False
    return os.environ.get("NUMBA_THREADING_LAYER", "default") in ("default", "tbb", "workqueue", "forksafe", "safe")


def run(program: str, argv=None) -> int:
    """Run ``program`` (``"elastix"`` or ``"transformix"``) with ``argv`` (default ``sys.argv[1:]``) through the
    server when one is up, else in this process (starting a server for the next command); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if enabled():
        code = _via_server(program, argv)
        if code is not None:
            return code
    return _in_process(program, argv)


def elastix() -> None:
    """The ``classreg-elastix`` console script."""
    sys.exit(run("elastix"))


def transformix() -> None:
    """The ``classreg-transformix`` console script."""
    sys.exit(run("transformix"))


def _in_process(program: str, argv) -> int:
    import importlib

    return importlib.import_module(PROGRAMS[program]).main(argv)


def _folder():
    """The private socket folder, or None when it cannot be made safe (or its path is too long for a socket)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if len(base.encode()) > _MAX_BASE:
        base = tempfile.gettempdir()
    folder = os.path.join(base, f"classreg-{os.getuid()}")
    if len(folder.encode()) > _MAX_BASE + 20:
        return None
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(folder) or os.path.islink(folder):
        return None
    return folder


def _key() -> str:
    """A hash of what the server's imports depend on (see the module docstring)."""
    import classreg

    package = os.path.dirname(os.path.abspath(classreg.__file__))
    kernels = os.path.join(package, "kernels")  # installed; a source checkout has it beside the package
    kernels = kernels if os.path.isdir(kernels) else os.path.join(os.path.dirname(package), "kernels")
    h = hashlib.sha1()
    h.update(f"{sys.executable}\0{sys.version}\0{os.getuid()}\0".encode())
    for root in sorted({package, kernels}):
        for path, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    p = os.path.join(path, name)
                    h.update(f"{p}\0{os.stat(p).st_mtime_ns}\0".encode())
    for k in sorted(os.environ):
        if k.startswith(_ENV_PREFIXES) and not k.startswith("CLASSREG_SERVER"):
            h.update(f"{k}={os.environ[k]}\0".encode())
    return h.hexdigest()[:20]


def socket_path():
    """The socket this installation's server listens on (None when no safe folder exists)."""
    folder = _folder()
    return None if folder is None else os.path.join(folder, f"elastix-{_key()}.sock")


def _connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s


def _alive(path) -> bool:
    s = _connect(path)
    if s is None:
        return False
    s.close()
    return True


def _spawn(path) -> None:
    """Start a server for ``path`` in the background unless one is starting already."""
    marker = path + ".starting"
    try:
        if time.time() - os.stat(marker).st_mtime < _STARTING_STALE:
            return
        os.unlink(marker)
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        return  # another command is starting one
    import subprocess

    with open(os.devnull, "rb") as null_in, open(path + ".log", "wb") as log:
        subprocess.Popen([sys.executable, "-m", "classreg.elastix.server", "--serve", path, "--after",
                          str(os.getpid())],
                         stdin=null_in, stdout=log, stderr=log, start_new_session=True, close_fds=True)


def _via_server(program: str, argv):
    """The job's exit status from the server, or None when no server took the job (then nothing ran)."""
    path = socket_path()
    if path is None:
        return None
    s = _connect(path)
    if s is None:
        _spawn(path)
        return None
    with s, s.makefile("rb") as replies:
        mask = os.umask(0o022)
        os.umask(mask)
        request = json.dumps({"program": program, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "umask": mask}).encode()
        try:
            socket.send_fds(s, [struct.pack("!I", len(request)) + request], [0, 1, 2])
            reply = replies.readline().strip()
        except OSError:
            return None
        if not reply.startswith(b"r "):
            return None  # the server refused or died before starting the job: run it here
        previous = {}

        def forward(signum, frame):
            try:
                s.sendall(b"k %d\n" % signum)
            except OSError:
                pass

        for name in _FORWARDED:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, forward)
        try:
            reply = replies.readline().strip()
        except OSError:
            reply = b""
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    kind, _, value = reply.partition(b" ")
    if kind == b"x":
        return int(value)
    if kind == b"s":
        signum = int(value)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # end as the job ended: killed by the same signal
        return 128 + signum
    sys.stderr.write("classreg-elastix: the connection to the classreg server was lost while the job ran; "
                     "its outputs may be incomplete (set CLASSREG_SERVER=0 to run without the server)\n")
    return 1


def stop() -> bool:
    """Stop this installation's server; True when one was running."""
    path = socket_path()
    s = None if path is None else _connect(path)
    if s is None:
        return False
    with s, s.makefile("rb") as replies:
        socket.send_fds(s, [struct.pack("!I", 4) + b"stop"], [0, 1, 2])
        replies.readline()
    return True


# ---------------------------------------------------------------------------------------------------------- server
#: the warm-up's parameter map: the components of most real parameter files (ELASTIX.md §14 counts), few iterations
_WARM_UP_MAP = {
    "Registration": '"MultiResolutionRegistration"', "Metric": '"AdvancedMattesMutualInformation"',
    "Optimizer": '"AdaptiveStochasticGradientDescent"', "ImageSampler": '"RandomCoordinate"',
    "Interpolator": '"LinearInterpolator"', "ResampleInterpolator": '"FinalBSplineInterpolator"',
    "Resampler": '"DefaultResampler"', "FixedImagePyramid": '"FixedSmoothingImagePyramid"',
    "MovingImagePyramid": '"MovingSmoothingImagePyramid"', "FixedInternalImagePixelType": '"float"',
    "MovingInternalImagePixelType": '"float"', "NumberOfResolutions": "2", "MaximumNumberOfIterations": "3",
    "NewSamplesEveryIteration": '"true"', "NumberOfHistogramBins": "32",
    "AutomaticTransformInitialization": '"true"', "AutomaticScalesEstimation": '"true"',
    "FinalGridSpacingInVoxels": "8", "WriteResultImage": '"true"', "ResultImagePixelType": '"float"',
}


def _write_pair(folder, ndim: int, n: int, rng) -> tuple[str, str]:
    """A tiny fixed/moving pair (a noisy blob and its shift by one voxel), ``f<ndim>.nii.gz`` and ``m<ndim>.nii.gz``
    in ``folder``; returns their paths."""
    import numpy as np

    import classreg as cr

    g = np.indices((n,) * ndim, dtype=np.float32)
    r2 = sum((gi - n / 2) ** 2 for gi in g)
    f = (np.exp(-r2 / (0.1 * n * n)) + 0.05 * rng.random(r2.shape)).astype(np.float32)
    paths = []
    for name, img in (("f", f), ("m", np.roll(f, 1, axis=0))):
        paths.append(os.path.join(folder, f"{name}{ndim}.nii.gz"))
        cr.save(cr.Image(img, 1.0), paths[-1])
    return paths[0], paths[1]


def _write_map(path, transform: str, ndim: int) -> str:
    """The warm-up's parameter file for ``transform`` with elastix's usual sample count for ``ndim`` (so that the
    kernels chosen by the draw size, such as the parallel 3-D affine iteration, are the ones real jobs use)."""
    pmap = dict(_WARM_UP_MAP, Transform=f'"{transform}"', NumberOfSpatialSamples=str(512 << ndim))
    with open(path, "w") as fh:
        fh.write("".join(f"({k} {v})\n" for k, v in pmap.items()))
    return path


def _warm_up() -> None:
    """Load what typical jobs use: tiny 2-D and 3-D Euler, affine and B-spline registrations (Mattes MI, ASGD,
    random coordinates) and transformix on their results, in a scratch folder. Runs in the server process itself, so
    every job forked from it starts with the modules imported and the kernels loaded."""
    import contextlib
    import io

    import numpy as np

    from . import registration, transformix

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="classreg-server-") as tmp:
        for ndim, n in ((2, 48), (3, 20)):
            fixed, moving = _write_pair(tmp, ndim, n, rng)
            for transform in ("EulerTransform", "AffineTransform", "BSplineTransform"):
                out = os.path.join(tmp, f"{ndim}{transform}")
                os.mkdir(out)
                pfile = _write_map(os.path.join(out, "p.txt"), transform, ndim)
                sink = io.StringIO()
                code = registration.main(["-f", fixed, "-m", moving, "-p", pfile, "-out", out], stdout=sink,
                                         stderr=sink)
                if code == 0:
                    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                        code = transformix.main(["-in", moving, "-tp",
                                                 os.path.join(out, "TransformParameters.0.txt"), "-out", out])
                if code != 0:  # the server still serves (imports done); the log says what was not loaded
                    sys.stderr.write(f"warm-up {ndim}-D {transform} exited with {code}:\n{sink.getvalue()[-2000:]}\n")


def _prime_inputs(folder) -> list:
    """The spare job's priming command (:func:`_prime`) on a tiny 2-D pair written into ``folder``: its arguments
    without ``-out``."""
    import numpy as np

    fixed, moving = _write_pair(folder, 2, 48, np.random.default_rng(0))
    return ["-f", fixed, "-m", moving, "-p", _write_map(os.path.join(folder, "p.txt"), "EulerTransform", 2)]


def _prime(folder, argv) -> None:
    """Make a freshly forked spare job process ready for work before its request comes: run the priming command
    (a tiny 2-D Euler registration with elastix's outputs) and launch numba's parallel layer once.

    A forked process shares its memory with the server until it writes to it: every page the job writes first (the
    reference counts of the objects it uses, the allocator's free lists, the arrays it fills) is copied then, a page
    fault each. On the 2-core test machine (a virtual machine) such a fault costs ~20-45 us, and an mm2d job made
    ~3 300 of them (~0.07 s of 0.25 s). The process also starts without the worker threads of numba's TBB layer and
    of OpenBLAS (threadpoolctl's limit re-creates OpenBLAS's, which then spin ~0.1 s). The priming run makes those
    pages private and starts those threads here, while no caller waits (docs/notes/elastix.md, session 17)."""
    import io
    import shutil

    import numpy as np

    from . import registration

    if _PROBE is not None:
        _PROBE(np.ones(4))
    out = tempfile.mkdtemp(prefix="prime-", dir=folder)
    try:
        sink = io.StringIO()
        code = registration.main([*argv, "-out", out], stdout=sink, stderr=sink)
        if code != 0:
            sys.stderr.write(f"spare priming exited with {code}:\n{sink.getvalue()[-2000:]}\n")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _fork_safe_threading() -> str:
    """Select a numba threading layer that survives ``fork`` (GNU OpenMP does not): TBB when numba can load it (as
    fast as OpenMP here), else numba's own ``workqueue``, whose per-launch cost makes the parametric engine keep its
    serial per-iteration kernel (``engine._tbb_layer``). A tiny parallel kernel launches the layer, so that it is
    chosen here, before the warm-up, and reported."""
    import numba
    import numpy as np

    from ..kernels._backend import njit, rebind

    global _PROBE
    probe = njit(parallel=True)(rebind(_probe_body, {"prange": numba.prange}))
    layers = ["workqueue"] if os.environ.get("NUMBA_THREADING_LAYER") == "workqueue" else ["tbb", "workqueue"]
    for layer in layers:
        # the environment too: numba re-reads its configuration from it (reload_config) when it compiles
        os.environ["NUMBA_THREADING_LAYER"] = numba.config.THREADING_LAYER = layer
        try:
            probe(np.ones(4))
        except (ValueError, ImportError, OSError):  # numba: "No threading layer could be loaded"
            continue
        _PROBE = probe
        return numba.threading_layer()
    raise RuntimeError("no fork-safe numba threading layer could be loaded")


def _probe_body(a):
    s = 0.0
    for i in prange(a.shape[0]):  # noqa: F821 - numba.prange, bound by rebind in _fork_safe_threading
        s += a[i]
    return s


def serve(path: str, idle: float, after: int | None = None) -> int:
    """The server loop (see the module docstring); returns when idle for ``idle`` seconds or told to stop. The
    warm-up waits for process ``after`` (the command that started the server) to end, so as not to slow it.

    While no job runs the server keeps a *spare*: a monitor process forked ahead of the next request, whose job
    process is forked and primed too (:func:`_prime`), so that a request finds a process ready to run it. A request
    that comes while the spare still primes waits for the rest of the priming (at most the ~0.1 s of a tiny
    registration; a job forked then would cost about as much again, and compete with the priming for the CPU); one
    that comes while another job runs gets a monitor and a job forked then, as the spare is only made when no job
    runs (its priming would slow the running job)."""
    import shutil

    os.chdir("/")  # hold no caller's folder (each job changes to its own)
    sys.stderr.write(f"numba threading layer: {_fork_safe_threading()}\n")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    marker = path + ".starting"
    scratch = tempfile.mkdtemp(prefix="classreg-server-")
    listener = spare = inode = None
    children = {}  # job monitors: pid -> a process descriptor (None where the kernel has none)
    spares = True  # False after a spare ended unused (then no more: never a loop of failing spares)
    try:
        try:
            while after is not None and _running(after):
                time.sleep(0.05)
            _warm_up()
            prime = _prime_inputs(scratch)
            import numba

            if numba.threading_layer() not in FORK_SAFE:  # never fork a process running GNU OpenMP
                sys.stderr.write(f"numba runs the {numba.threading_layer()} layer, which cannot fork: not serving\n")
                return 1
            if _alive(path):
                return 0  # another server is already up
            spare = _Spare(None, scratch, prime)  # primed before the socket appears: the first job finds it ready
            if select.select([spare.sock], [], [], _STARTING_STALE)[0] and not spare.sock.recv(1):
                _ended_unused(spare, children)
                spare, spares = None, False
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(64)
            inode = os.stat(path).st_ino
        finally:
            try:
                os.unlink(marker)
            except FileNotFoundError:
                pass
        last = time.monotonic()
        while True:
            if spare is None and spares and not children:
                spare = _Spare(listener, scratch, prime)
            waits = [listener] + [fd for fd in children.values() if fd is not None]
            ready, _, _ = select.select(waits + ([spare.sock] if spare is not None else []), [], [], 1.0)
            _reap(children)
            if spare is not None and spare.sock in ready and not spare.sock.recv(1):  # (else "R": primed)
                _ended_unused(spare, children)
                spare, spares = None, False
            if children:
                last = time.monotonic()
            if listener in ready:
                conn, _ = listener.accept()
                if hasattr(socket, "SO_PEERCRED"):  # elsewhere the 0700 folder alone keeps other users out
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    if struct.unpack("3i", creds)[1] != os.getuid():
                        conn.close()
                        continue
                last = time.monotonic()
                waiting = _request_waiting(conn) if spare is not None else None
                if waiting is False:  # closed without a request (a --status probe): nothing to run
                    conn.close()
                    continue
                if waiting and spare.take(conn):
                    children[spare.pid] = _pidfd(spare.pid)
                    spare = None
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    os._exit(_monitor(conn))
                conn.close()
                children[pid] = _pidfd(pid)
                continue
            try:
                if os.stat(path).st_ino != inode:
                    break  # replaced by another server
            except FileNotFoundError:
                break
            if not children and time.monotonic() - last > idle:
                break
    finally:
        if spare is not None:
            spare.sock.close()  # its monitor and job process end on this
        if listener is not None:
            listener.close()
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _ended_unused(spare, children) -> None:
    sys.stderr.write("the spare process ended before it was used; no more spares\n")
    children[spare.pid] = _pidfd(spare.pid)  # reaped with the job monitors
    spare.sock.close()


def _pidfd(pid: int):
    """A process descriptor of ``pid`` (readable when it ends), or None where the kernel offers none (Linux < 5.3,
    other systems: the server then notices a job's end at its next one-second wake-up)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _reap(children: dict) -> None:
    """Collect the job monitors that ended (each by its pid: the spare, also a child, is not one of them)."""
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            fd = children.pop(pid)
            if fd is not None:
                os.close(fd)


def _request_waiting(conn, timeout: float = 0.2):
    """Whether a request is waiting on a new connection: True (data), False (closed without one, as a ``--status``
    probe does) or None (nothing within ``timeout`` seconds: the caller forks a monitor for it, as without spare)."""
    ready, _, _ = select.select([conn], [], [], timeout)
    if not ready:
        return None
    try:
        return bool(conn.recv(1, socket.MSG_PEEK))
    except OSError:
        return False


class _Spare:
    """The server's side of a spare (see :func:`serve`): a monitor process forked ahead of a request, which forks
    and primes its job process at once. ``sock`` reads "R" once the job process is primed, and the end of the file
    if the spare ended; :meth:`take` hands it a connection."""

    def __init__(self, listener, scratch, prime):
        self.sock, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            if listener is not None:
                listener.close()
            self.sock.close()
            code = 1
            try:
                code = _spare_monitor(theirs, scratch, prime)
            finally:  # never back into the server's loop
                os._exit(code)
        theirs.close()

    def take(self, conn) -> bool:
        """Hand ``conn`` to the spare's monitor; False when it could not be handed over."""
        try:
            socket.send_fds(self.sock, [b"c"], [conn.fileno()])
        except OSError:
            return False
        self.sock.close()
        return True


def _spare_monitor(server, scratch, prime) -> int:
    """A spare's monitor (a child of the server): fork the spare job process, which primes itself and then waits for
    its request; wait for the connection from the server and monitor the job as :func:`_monitor` does. When the
    server ends first (the end of ``server``), end the spare job process too."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    mine, theirs = socket.socketpair()
    job = os.fork()
    if job == 0:
        mine.close()
        _spare_job(theirs, server, scratch, prime)  # never returns
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(server, 16, 1)
    except OSError:
        fds = []
    server.close()
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        mine.close()  # the spare job process reads the end of its socket and exits
        os.waitpid(job, 0)
        return 0
    return _monitor(socket.socket(fileno=fds[0]), spare=(job, mine))


def _spare_job(sock, server, scratch, prime) -> None:
    """A spare's job process: prime (:func:`_prime`), tell the server it is ready, then run the request its monitor
    forwards (:func:`_job`); exit when the monitor closes the socket instead."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # a signal before the request ends it as it would end the job
    try:
        _prime(scratch, prime)
    except Exception as exc:  # a failed priming costs time, not the job: the spare still serves
        sys.stderr.write(f"spare priming failed: {exc!r}\n")
    try:
        server.sendall(b"R")
    except OSError:
        pass
    server.close()
    try:
        request = _read_request(sock)
    except OSError:
        request = None
    sock.close()
    if request is None:
        os._exit(0)
    _job(*request)


def _read_request(conn):
    """``(request, fds)`` from a connection (the length-prefixed JSON request with the caller's three descriptors),
    ``("stop", [])`` for a stop request, or None when the connection ends or carries no valid request."""
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    if len(msg) < 4:
        for fd in fds:
            os.close(fd)
        return None
    size = struct.unpack("!I", msg[:4])[0]
    body = msg[4:]
    while len(body) < size:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        body += chunk
    if body == b"stop":
        for fd in fds:
            os.close(fd)
        return "stop", []
    try:
        request = json.loads(body)
    except ValueError:
        request = None
    if len(body) != size or not isinstance(request, dict) or request.get("program") not in PROGRAMS or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    return request, fds


def _monitor(conn, spare=None) -> int:
    """One connection, in a child of the server: read the request, start the job (fork it, or hand it to the
    ``spare`` job process ``(pid, socket)``), forward signals, report its end."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        try:
            request = _read_request(conn)
        except OSError:
            request = None
        if request is None or request[0] == "stop":
            if request is not None:
                os.kill(os.getppid(), signal.SIGTERM)
                conn.sendall(b"x 0\n")
            return 0
        request, fds = request
        primed = spare is not None
        if spare is not None:
            job, sock = spare
            body = json.dumps(request).encode()
            message = struct.pack("!I", len(body)) + body
            sent = socket.send_fds(sock, [message], fds)
            if sent < len(message):  # (never an empty sendall: the job may have read it all and closed already)
                sock.sendall(message[sent:])
            sock.close()
            spare = None
        else:
            job = os.fork()
            if job == 0:
                conn.close()
                _job(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        os.write(2, f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {job}: {request['program']} "
                    f"{' '.join(request['argv'])} (in {request['cwd']}){' [primed]' if primed else ''}\n".encode())
        conn.sendall(b"r %d\n" % job)
        # woken by the job's end itself where the kernel offers a process descriptor (Linux ≥ 5.3), else by polling
        # every 50 ms (up to 50 ms added to every job's time)
        pidfd = _pidfd(job)
        ended = [] if pidfd is None else [pidfd]
        caller = [conn]
        while True:
            pid, status = os.waitpid(job, os.WNOHANG)
            if pid:
                break
            ready, _, _ = select.select(caller + ended, [], [], None if ended else 0.05)
            if conn in ready:
                data = conn.recv(64)
                if not data:  # the caller is gone: stop its job, then only wait for its end
                    os.kill(job, signal.SIGTERM)
                    caller = []
                    continue
                for line in data.split(b"\n"):
                    if line.startswith(b"k "):
                        os.kill(job, int(line[2:]))
        if os.WIFSIGNALED(status):
            conn.sendall(b"s %d\n" % os.WTERMSIG(status))
        else:
            conn.sendall(b"x %d\n" % os.waitstatus_to_exitcode(status))
    except OSError:
        pass
    finally:
        if spare is not None:  # not used: its job process exits on the end of its socket
            job, sock = spare
            sock.close()
            os.waitpid(job, 0)
    return 0


def _job(request, fds) -> None:
    """The job process: the caller's descriptors, folder and environment, then the program's ``main``."""
    import importlib
    import io
    import traceback

    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=os.isatty(1),
                                      write_through=False)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # the caller's TMPDIR, not the one the server's warm-up cached
        program = request["program"]
        sys.argv = [f"classreg-{program}", *request["argv"]]
        code = importlib.import_module(PROGRAMS[program]).main(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    _flush()
    os._exit(int(code or 0) & 0xFF)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m classreg.elastix.server",
                                     description="The classreg-elastix start-up server (see its module docstring).")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--after", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stop", action="store_true", help="stop this installation's server")
    parser.add_argument("--status", action="store_true", help="say whether a server is up, and its socket")
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, float(os.environ.get("CLASSREG_SERVER_IDLE", IDLE_SECONDS)), args.after)
    if args.stop:
        print("stopped" if stop() else "no server was running")
        return 0
    path = socket_path()
    up = path is not None and _alive(path)
    print(f"{'up' if up else 'not running'}: {path}" + ("" if enabled() else " (disabled: CLASSREG_SERVER or "
                                                       "platform or NUMBA_THREADING_LAYER)"))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
