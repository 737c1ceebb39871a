import json
import subprocess
import sys

from classreg.cli import main


def test_help_and_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: classreg" in out and "info" in out


def test_info_reports_versions_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["numpy"] and info["backends"]["numpy"] is True
    from classreg.backend import gpu_available
    from classreg.kernels._backend import HAVE_NUMBA

    assert info["backends"]["gpu"] is gpu_available()  # what the machine has, not just "a boolean"
    assert info["backends"]["numba"] is HAVE_NUMBA
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "numba" in out and "GPU" in out


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "classreg", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("classreg ")
