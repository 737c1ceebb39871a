"""``pip install .`` and ``pip install -e .`` must both provide ``classreg.kernels`` (kernels/ is mapped by
``package_dir``; setuptools' auto-discovery would miss it, pypa/setuptools#4248)."""
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pytest

try:
    import fcntl
except ImportError:  # not POSIX: no lock (run these tests without xdist there)
    fcntl = None

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "setup.cfg").is_file(), reason="needs the source tree")


def _pip(*args, cwd):
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed",
           "--quiet", *args]
    # one install at a time: two pytest-xdist workers building the same tree race in its build/ folder
    # ("No such file or directory: build/bdist.../entry_points.txt")
    with open(Path(tempfile.gettempdir()) / "classreg-install-tests.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _import_from(site_dir, cwd):
    # -S: no site processing, so only `site_dir` (and numpy's folder, for the dependencies) is visible; the
    # .pth files of an editable install are processed by site.addsitedir.
    deps = str(Path(np.__file__).resolve().parents[1])
    code = ("import sys, site; sys.path.append(%r); site.addsitedir(%r); import classreg, classreg.kernels as k; "
            "from classreg.kernels import _backend; print(k.__file__)" % (deps, str(site_dir)))
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def test_regular_install_provides_classreg_kernels(tmp_path):
    target = tmp_path / "site"
    _pip("--target", str(target), str(ROOT), cwd=tmp_path)
    where = _import_from(target, tmp_path)
    assert where == target / "classreg" / "kernels" / "__init__.py"


def test_clone_root_imports_the_same_after_a_regular_install(tmp_path):
    """In the clone's root the source folder classreg/ shadows the installed package; it must still provide
    classreg.kernels (from the top-level kernels/ folder) and run the CLI, as the README's commands assume."""
    target = tmp_path / "site"
    _pip("--target", str(target), str(ROOT), cwd=tmp_path)
    where = _import_from(target, ROOT)
    assert where.resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    deps = str(Path(np.__file__).resolve().parents[1])
    code = ("import sys, site; sys.path.append(%r); site.addsitedir(%r); sys.argv = ['classreg', 'info']; "
            "import runpy; runpy.run_module('classreg', run_name='__main__')" % (deps, str(target)))
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and "backends:" in proc.stdout, proc.stderr


def test_editable_install_provides_classreg_kernels(tmp_path):
    prefix = tmp_path / "prefix"
    _pip("--prefix", str(prefix), "-e", str(ROOT), cwd=tmp_path)
    site_dir = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    where = _import_from(site_dir, tmp_path)
    assert where.resolve() == (ROOT / "kernels" / "__init__.py").resolve()
