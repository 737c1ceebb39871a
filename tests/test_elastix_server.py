"""The start-up server of classreg-elastix / classreg-transformix (classreg.elastix.server), end to end in a private
socket folder: the first command runs in its own process and starts the server; later commands run in processes
forked from it and write the same files, exit codes and messages; Ctrl-C reaches the job and leaves no output under
a final name; ``--stop`` ends the server. Also the switches that keep it off."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import classreg as cr
from classreg.elastix import server

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "register_at_fork"),
                                reason="the server needs fork and Unix sockets")

PARAMS = """(Registration "MultiResolutionRegistration")
(Metric "AdvancedMattesMutualInformation")
(Optimizer "AdaptiveStochasticGradientDescent")
(ImageSampler "RandomCoordinate")
(Interpolator "LinearInterpolator")
(ResampleInterpolator "FinalBSplineInterpolator")
(Resampler "DefaultResampler")
(FixedImagePyramid "FixedSmoothingImagePyramid")
(MovingImagePyramid "MovingSmoothingImagePyramid")
(Transform "EulerTransform")
(NumberOfResolutions 2)
(MaximumNumberOfIterations {iterations})
(NumberOfSpatialSamples 512)
(AutomaticTransformInitialization "true")
(WriteResultImage "true")
(ResultImagePixelType "float")
"""


@pytest.fixture
def run_dir():
    """A private runtime folder with a short path (a socket's path is limited to 107 bytes)."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="crs-", dir="/tmp" if os.path.isdir("/tmp") else None)
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _env(run_dir, **extra):
    env = dict(os.environ, XDG_RUNTIME_DIR=str(run_dir), CLASSREG_SERVER="1", CLASSREG_SERVER_IDLE="60")
    env.pop("NUMBA_THREADING_LAYER", None)
    env.update(extra)
    return env


def _elastix(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "classreg.elastix", *args], env=env, capture_output=True, text=True,
                          **kw)


def _status(env) -> str:
    return subprocess.run([sys.executable, "-m", "classreg.elastix.server", "--status"], env=env,
                          capture_output=True, text=True).stdout


def _long_job(pair, out, env):
    """A long elastix command through the server, returned once its job iterates (its staging folder exists)."""
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "classreg.elastix", "-f", str(pair / "f.nii.gz"), "-m",
                             str(pair / "m.nii.gz"), "-p", str(pair / "long.txt"), "-out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(300):
        if any(p.name.startswith(".classreg-elastix-") for p in out.iterdir()):
            break
        time.sleep(0.05)
    time.sleep(0.5)
    return proc


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    g = np.indices((40, 44), dtype=np.float32)
    f = np.exp(-((g[0] - 20) ** 2 + (g[1] - 22) ** 2) / 120.0) + 0.02 * rng.random((40, 44))
    m = np.roll(f, (2, -1), axis=(0, 1))
    cr.save(cr.Image(f.astype(np.float32), (1.0, 1.2)), tmp_path / "f.nii.gz")
    cr.save(cr.Image(m.astype(np.float32), (1.0, 1.2)), tmp_path / "m.nii.gz")
    for name, iterations in (("p.txt", 60), ("long.txt", 200000)):
        (tmp_path / name).write_text(PARAMS.format(iterations=iterations))
    return tmp_path


def test_switches_keep_the_server_off(monkeypatch):
    monkeypatch.setenv("CLASSREG_SERVER", "0")
    assert not server.enabled()
    monkeypatch.setenv("CLASSREG_SERVER", "1")
    monkeypatch.setenv("NUMBA_THREADING_LAYER", "omp")  # OpenMP cannot fork: never through a server
    assert not server.enabled()
    for layer in ("workqueue", "tbb"):
        monkeypatch.setenv("NUMBA_THREADING_LAYER", layer)
        assert server.enabled()


def test_socket_folder_must_be_private(run_dir, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
    folder = run_dir / f"classreg-{os.getuid()}"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    assert server.socket_path() is None  # others could connect: no server
    os.chmod(folder, 0o700)
    assert server.socket_path().startswith(str(folder))


def test_commands_through_the_server(pair, tmp_path, run_dir):
    env = _env(run_dir)
    args = ["-f", str(pair / "f.nii.gz"), "-m", str(pair / "m.nii.gz"), "-p", str(pair / "p.txt")]
    outs = []
    try:
        # 1. the first command runs in its own process and starts a server
        (tmp_path / "o0").mkdir()
        r = _elastix([*args, "-out", str(tmp_path / "o0")], env)
        assert r.returncode == 0, r.stderr
        outs.append(tmp_path / "o0")
        for _ in range(120):  # the warm-up takes a few seconds
            if _status(env).startswith("up"):
                break
            time.sleep(0.5)
        else:
            log = list(run_dir.rglob("*.log"))
            pytest.fail(f"the server did not come up: {log[0].read_text() if log else 'no log'}")
        # 2. the same command through the server: the same files, byte for byte
        (tmp_path / "o1").mkdir()
        r = _elastix([*args, "-out", str(tmp_path / "o1")], env)
        assert r.returncode == 0, r.stderr
        assert "Total time elapsed" in r.stdout or "elastix" in r.stdout  # its output reached our pipe
        outs.append(tmp_path / "o1")
        log = next(run_dir.rglob("elastix-*.sock.log")).read_text()
        assert "job" in log and str(tmp_path / "o1") in log and str(tmp_path / "o0") not in log  # o1 ran there
        # in the spare job process the server primed before it listened (the files below: the same as a cold run's)
        assert re.search(r"job \d+: elastix .*o1 .*\[primed\]", log), log
        name = "TransformParameters.0.txt"
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
        info = [[line.split("\t")[:-1] for line in (o / "IterationInfo.0.R1.txt").read_text().splitlines()]
                for o in outs]
        assert info[0] == info[1] and len(info[0]) == 61  # every column but the time
        assert (outs[0] / "result.0.raw").read_bytes() == (outs[1] / "result.0.raw").read_bytes()
        # elastix's exit codes and messages through the server (missing -out: 254, missing output folder)
        r = _elastix([*args], env)
        assert r.returncode == 254 and 'No CommandLine option "-out" given' in r.stderr
        # transformix through the server, relative paths resolved in the caller's folder
        (tmp_path / "t").mkdir()
        r = subprocess.run([sys.executable, "-m", "classreg.elastix.transformix", "-def", "all", "-out", "t",
                            "-tp", "o1/TransformParameters.0.txt"], env=env, cwd=tmp_path, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        assert list((tmp_path / "t").glob("deformationField.*"))
        # 3. Ctrl-C reaches the job: the command ends by SIGINT and no output appears under a final name
        proc = _long_job(pair, tmp_path / "o2", env)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        assert proc.returncode in (-signal.SIGINT, 130, 1)
        assert not list((tmp_path / "o2").glob("TransformParameters*")) and not list((tmp_path / "o2").glob("result*"))
        # 4. a caller killed outright: the server sees its connection close and stops the job
        proc = _long_job(pair, tmp_path / "o3", env)
        proc.kill()
        proc.communicate(timeout=60)
        log = next(run_dir.rglob("elastix-*.sock.log")).read_text()
        job = int(re.findall(r"job (\d+): elastix .*o3", log)[-1])
        for _ in range(200):
            try:
                os.kill(job, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the job {job} of a killed caller still runs")
        assert not list((tmp_path / "o3").glob("TransformParameters*"))
    finally:
        stop = subprocess.run([sys.executable, "-m", "classreg.elastix.server", "--stop"], env=env,
                              capture_output=True, text=True)
    assert stop.stdout.startswith("stopped")
    for _ in range(100):
        if not _status(env).startswith("up"):
            break
        time.sleep(0.1)
    assert _status(env).startswith("not running")
    assert not list(run_dir.rglob("*.sock"))
