import logging

import numpy as np
import pytest

import classreg as cr
from classreg.progress import Progress


def test_events_history_and_logging(caplog):
    seen = []
    with caplog.at_level(logging.DEBUG, logger="classreg"):
        with Progress("demo", callback=seen.append) as p:
            p.emit("start")
            p.emit("level_start", level=0)
            for i in range(3):
                p.emit("iteration", level=0, iteration=i, metric=np.float32(3 - i), step=0.1, piece=2)
            p.emit("level_end", level=0, metric=1.0)
            p.emit("done", metric=1.0)
    assert [e.stage for e in seen] == ["start", "level_start", "iteration", "iteration", "iteration", "level_end",
                                       "done"]
    assert isinstance(seen[2], cr.Event) and seen[2].extra == {"piece": 2} and seen[2].metric == 3.0
    assert [h["iteration"] for h in p.history] == [0, 1, 2]
    assert p.history[0]["piece"] == 2 and p.history[0]["metric"] == 3.0
    assert any("demo" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="stage"):
        p.emit("middle")


def test_callback_can_stop():
    def cb(ev):
        if ev.stage == "iteration" and ev.iteration == 1:
            raise cr.StopRegistration

    p = Progress("demo", callback=cb)
    p.emit("iteration", iteration=0)
    with pytest.raises(cr.StopRegistration):
        p.emit("iteration", iteration=1)
    assert p.stopped


def test_bad_callback_and_tqdm_bar(capsys):
    with pytest.raises(TypeError, match="callback"):
        Progress("x", callback=3)
    pytest.importorskip("tqdm")
    with Progress("bar", progress=True, total=2) as p:
        p.emit("iteration", iteration=0, metric=1.0)
        p.emit("iteration", iteration=1, metric=0.5)
    assert capsys.readouterr().out == ""  # the bar writes to stderr, never stdout
