import logging

import numpy as np
import pytest

import classreg as cr
from classreg.progress import Progress


def test_events_history_and_logging(caplog):
    seen = []
    with caplog.at_level(logging.DEBUG, logger="classreg"), Progress("demo", callback=seen.append) as p:
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


def test_similarity_is_pearson_correlation():
    from classreg.progress import similarity

    rng = np.random.default_rng(0)
    a = rng.random((30, 40)).astype(np.float32)
    b = a + 0.5 * rng.random((30, 40)).astype(np.float32)
    assert similarity(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-6)
    assert similarity(a, 5.0 * a + 2.0) == pytest.approx(1.0) and similarity(a, -a) == pytest.approx(-1.0)
    mask = a > 0.5
    assert similarity(a, b, mask=mask) == pytest.approx(np.corrcoef(a[mask], b[mask])[0, 1], abs=1e-6)
    assert np.isnan(similarity(a, np.ones_like(a))) and np.isnan(similarity(a[:1, :1], b[:1, :1]))
    # point coordinates: each column centred on its own, so a shift along one axis is no dissimilarity
    p = rng.normal(size=(50, 3))
    assert similarity(p, p + [100.0, -3.0, 0.0], columns=True) == pytest.approx(1.0)
    w = rng.random(50)
    q = p + 0.3 * rng.normal(size=(50, 3))
    pc, qc = p - np.average(p, 0, w), q - np.average(q, 0, w)
    ref = np.sum(w[:, None] * pc * qc) / np.sqrt(np.sum(w[:, None] * pc**2) * np.sum(w[:, None] * qc**2))
    assert similarity(p, q, weights=w, columns=True) == pytest.approx(ref)
    with pytest.raises(ValueError, match="shape"):
        similarity(a, b[:, :3])


def test_warm_up_runs_before_the_bar_once_per_key(monkeypatch, capsys):
    """The kernels' step runs first, is shown on its own, is skipped for a key already warmed, and does not count
    against time_limit."""
    import time

    from classreg import progress

    monkeypatch.setattr(progress, "_WARMED", set())
    calls = []

    def warm():
        calls.append(time.perf_counter())
        time.sleep(0.3)

    pytest.importorskip("tqdm")
    with Progress("demo", progress=True, total=2, warm_up=warm, warm_key=("k", 1), time_limit=0.2) as p:
        started = time.perf_counter()
        time.sleep(0.15)                                                 # past tqdm's redraw interval
        p.emit("iteration", iteration=0, metric=1.0, similarity=0.5)   # 0.3 s of warm-up: not over the limit
    err = capsys.readouterr().err
    assert len(calls) == 1 and calls[0] < started and p.timings["kernels"] >= 0.3
    assert "demo: compiling kernels (first run only)" in err and "similarity=0.500" in err
    assert err.index("compiling kernels") < err.index("similarity=")
    assert p.history[0]["similarity"] == 0.5
    with Progress("demo", progress=True, total=2, warm_up=warm, warm_key=("k", 1)) as p:
        pass
    assert len(calls) == 1 and "kernels" not in p.timings                  # warmed in this process: skipped
    with Progress("demo", progress=False, warm_up=warm, warm_key=("k", 2)) as p:
        pass
    assert len(calls) == 1                                                  # no bar, no warm-up


def _pair():
    from phantoms import smooth_image

    rng = np.random.default_rng(5)
    a = np.zeros((40, 40), np.float32)
    a[6:34, 6:34] = 0.2 + 0.6 * smooth_image((28, 28), rng)
    return cr.Image(a, 1.0), cr.Image(np.roll(a, 2, axis=1) * 150.0, 1.0)


@pytest.mark.parametrize("solver", ["demons", "lddmm", "affine", "bspline", "rigid", "points", "vp", "metamorphosis"])
def test_every_solver_records_the_same_similarity(solver):
    """history's similarity: NCC in [-1, 1] of the current estimate; it rises over a run, and for a plain
    intensity solver its last value is the NCC of the result (within sampling / level differences)."""
    from classreg.progress import similarity

    f, m = _pair()
    if solver == "points":
        rng = np.random.default_rng(2)
        # points on an ellipsoid (a surface: a volumetric Gaussian blob collapses in scale with either kernel,
        # docs/notes/points.md), moved rigidly
        u = rng.normal(size=(120, 3))
        y = 10.0 * u / np.linalg.norm(u, axis=1, keepdims=True) * [1.0, 0.8, 0.6]
        res = cr.register_points(y, y @ np.array([[0.96, -0.28, 0], [0.28, 0.96, 0], [0, 0, 1]]).T + 3.0,
                                 max_iter=40, min_iter=5)
    else:
        kw = {"demons": {"max_pieces": 1}, "lddmm": {"iterations": (10, 10, 10)},
              "affine": {"iterations": (30, 30, 30)}, "bspline": {"iterations": (30, 30, 30)},
              "rigid": {"samples": (60, 20, 5, 0), "max_angle": 20.0, "workers": 1},
              # the pair is on two intensity scales (× 150), where VP's auto metric is MI, which does not raise the
              # NCC monotonically (full resolution 0.985 after 0.993 on the coarsest level); SSD here, as the paper's
              "vp": {"iterations": (10, 10, 10), "metric": "ssd"},
              "metamorphosis": {"iterations": (10, 10, 10)}}[solver]
        res = getattr(cr, f"register_{solver}")(f, m, **kw)
    sims = [h["similarity"] for h in res.history]
    assert all(s is not None and -1.0 <= s <= 1.0 for s in sims)
    assert sims[-1] > 0.8
    if solver == "metamorphosis":
        # painting intensity on a smoothed coarse level reaches a higher NCC than the full resolution can at first
        # (0.997 at the first coarse iterate here), so the rise is checked within each level
        for level in {h["level"] for h in res.history}:
            s = [h["similarity"] for h in res.history if h["level"] == level]
            assert s[-1] > s[0] - 1e-9
        # the similarity is that of the end of the path I₁ (deformation and added intensity)
        assert sims[-1] == pytest.approx(similarity(f.numpy(), res.extras["final_image"].numpy()), abs=0.1)
    else:
        assert sims[-1] > sims[0] - 1e-9
    if solver in ("demons", "lddmm", "affine", "bspline", "vp"):
        assert sims[-1] == pytest.approx(similarity(f.numpy(), res.warped.numpy()), abs=0.1)


def test_solver_shows_its_kernel_step_before_the_bar(monkeypatch, capsys):
    from classreg import progress

    pytest.importorskip("tqdm")
    monkeypatch.setattr(progress, "_WARMED", set())
    f, m = _pair()
    res = cr.register_affine(f, m, iterations=(10, 10, 10), progress=True)
    err = capsys.readouterr().err
    assert "affine: compiling kernels (first run only)" in err and "kernels" in res.timings
    assert err.index("compiling kernels") < err.index("affine:   0%")          # before the bar starts
    res = cr.register_affine(f, m, iterations=(10, 10, 10), progress=True)
    assert "compiling kernels" not in capsys.readouterr().err and "kernels" not in res.timings
