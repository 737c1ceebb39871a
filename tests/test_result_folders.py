"""Result folders never mix two runs, appear only complete, and refuse what is not theirs (bad-input issue)."""
import json
import os

import numpy as np
import pytest

import classreg as cr
from classreg.result import ResultExistsError


def _result(shift=1.0):
    fixed = cr.Image(np.zeros((6, 7), np.float32), spacing=(1.0, 1.0))
    t = cr.Affine.from_translation([shift, 0.0])
    return cr.Result(transform=t, inverse=t.inverse(), warped=fixed, history=[], converged=True, stop_reason="test",
                     params={"shift": shift}, metrics={}, timings={}, reference=fixed)


def test_a_second_result_needs_overwrite_and_then_replaces_the_whole_set(tmp_path):
    out = tmp_path / "out"
    _result(1.0).save(out)
    (out / "qc.png").write_bytes(b"from the first run")            # a file only the first run wrote
    with pytest.raises(ResultExistsError, match="overwrite=True"):
        _result(2.0).save(out)
    assert json.loads((out / "params.json").read_text())["shift"] == 1.0   # untouched by the refusal
    _result(2.0).save(out, overwrite=True)
    assert json.loads((out / "params.json").read_text())["shift"] == 2.0
    assert not (out / "qc.png").exists()                           # nothing of the first run is left
    assert [p.name for p in tmp_path.iterdir()] == ["out"]          # no partial or replaced folders remain


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("mine")), "not a classreg result"),
    (lambda d: d.write_text("a file"), "it is a file"),
    (lambda d: (d.parent / "blocker").write_text("x"), "parent path is a file"),
])
def test_folders_that_are_not_a_result_are_never_replaced(tmp_path, setup, message):
    target = tmp_path / "out"
    setup(target)
    if message == "parent path is a file":
        target = tmp_path / "blocker" / "out"
    with pytest.raises(ResultExistsError, match=message):
        _result().save(target, overwrite=True)


def test_an_interrupted_save_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    import classreg.result as result

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(result, "_write_history", boom)
    with pytest.raises(KeyboardInterrupt):
        _result().save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_folders_of_ended_processes_are_removed(tmp_path):
    import subprocess
    import sys

    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                         text=True, check=True).stdout.strip()                  # a process that has ended
    stale = tmp_path / f".out.partial-{pid}-abc"
    stale.mkdir()
    (stale / "transform.tfm").write_text("half")
    _result().save(tmp_path / "out")
    assert not stale.exists() and (tmp_path / "out" / "result.json").exists()


def test_load_result_refuses_an_incomplete_folder(tmp_path):
    out = _result().save(tmp_path / "out")
    cr.load_result(out)
    os.remove(out / "history.csv")
    with pytest.raises(ValueError, match="incomplete classreg result: history.csv missing"):
        cr.load_result(out)


def test_cli_checks_the_output_folder_before_the_run(tmp_path, capsys, monkeypatch):
    from classreg import options
    from classreg.cli import main

    (tmp_path / "blocker").write_text("x")
    f = tmp_path / "f.nii.gz"
    cr.save(cr.Image(np.random.default_rng(0).random((16, 16)).astype(np.float32), 1.0), f)
    calls = []
    declaration, solver = options.SOLVERS["affine"]
    monkeypatch.setitem(options.SOLVERS, "affine", (declaration, lambda *a, **k: calls.append(1) or solver(*a, **k)))
    rc = main(["register", "affine", str(f), str(f), "-o", str(tmp_path / "blocker" / "out"), "-q", "--no-qc"])
    assert rc != 0 and "a part of its parent path is a file" in capsys.readouterr().err
    assert calls == []                                               # refused before the registration ran
    rc = main(["register", "affine", str(f), str(f), "-o", str(tmp_path / "ok"), "-q", "--no-qc",
               "--iterations", "2", "--shrink-factors", "1"])
    assert rc == 0 and calls == [1]
