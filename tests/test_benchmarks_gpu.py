"""``python -m benchmarks.run --device cuda`` (issue #26) without a GPU: the tool and case lists, the GPU rows skipped
with a reason where no GPU is usable, the device passed to each solver, the synchronised timing and GPU memory record,
the rendering of GPU rows against their CPU rows, and the 1 mm synth3d case."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

import classreg as cr
from benchmarks import run as R
from benchmarks import tools as T
from benchmarks.cases import CASES, DEFAULT_CASES, GPU_CASES
from classreg.data import DataNotFoundError


def _selection(*argv):
    return R.selection(R.parser().parse_args(list(argv)))


def test_device_cuda_adds_a_gpu_row_after_each_tool_with_a_gpu_path():
    cases, tools = _selection("--device", "cuda", "--tools", "classreg_demons", "fireants_greedy", "ants_syn")
    assert tools == ["classreg_demons", "classreg_demons_cuda", "fireants_greedy", "fireants_greedy_cuda", "ants_syn"]
    assert cases == list(GPU_CASES) == ["inter3d", "synth3d", "synth3d_1mm"]
    # a GPU row asked for by name is not doubled
    assert _selection("--device", "cuda", "--tools", "classreg_vp", "classreg_vp_cuda")[1] == ["classreg_vp",
                                                                                              "classreg_vp_cuda"]
    # the default tools: each one with a GPU path is followed by its GPU row, nothing else changes
    default = _selection()[1]
    with_gpu = _selection("--device", "cuda")[1]
    assert [t for t in with_gpu if not t.endswith("_cuda")] == default
    for t in default:
        if t in T.GPU_TOOLS:
            assert with_gpu[with_gpu.index(t) + 1] == f"{t}_cuda"
    assert {t for t in with_gpu if t.endswith("_cuda")} == {f"{t}_cuda" for t in T.GPU_TOOLS if t in default}
    with pytest.raises(SystemExit):
        R.parser().parse_args(["--device", "tpu"])


def test_cpu_runs_are_unchanged_by_the_gpu_rows():
    """Without --device the lists hold no GPU row and no 1 mm case; the GPU rows come after every CPU tool."""
    for argv in ((), ("--quick",), ("--sweep",), ("--cases", "inter3d")):
        cases, tools = _selection(*argv)
        assert not any(T.TOOLS[t].device == "cuda" for t in tools)
        assert "synth3d_1mm" not in cases or "--cases" in argv
    assert _selection()[0] == list(DEFAULT_CASES) == [c for c in CASES if c != "synth3d_1mm"]
    names = list(T.TOOLS)
    first_gpu = min(names.index(f"{t}_cuda") for t in T.GPU_TOOLS)
    assert all(T.TOOLS[t].device == "cpu" for t in names[:first_gpu])


def test_gpu_rows_are_declared_once_from_their_cpu_tools():
    for base, api in T.GPU_TOOLS.items():
        cpu, gpu = T.TOOLS[base], T.TOOLS[f"{base}_cuda"]
        assert (gpu.device, gpu.device_of, gpu.default, gpu.quick, gpu.slow_3d) == ("cuda", base, False, False, "")
        assert gpu.kinds == cpu.kinds and gpu.classreg == cpu.classreg and api in gpu.requires
        assert gpu.run.func is cpu.run and gpu.run.keywords == {"device": "cuda"}
        assert gpu.label.endswith("[GPU]") or gpu.label.endswith("(GPU)")
        assert cpu.device == "cpu" and not cpu.device_of
    assert T.TOOLS["fireants_greedy_cuda"].label == "FireANTs Greedy (GPU)"
    # no GPU row for the tools whose solvers compute on the CPU
    for name in ("classreg_bspline", "classreg_affine", "classreg_elastix_cli", "ants_syn"):
        assert f"{name}_cuda" not in T.TOOLS


def test_gpu_usable_says_why_not(monkeypatch):
    import classreg.backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "cupy" else real(n, *a))
    ok, why = T.gpu_usable("cupy")
    assert not ok and "'cupy' not installed" in why
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "cupy" else real(n, *a))
    monkeypatch.setattr(classreg.backend, "gpu_available", lambda: False)
    ok, why = T.gpu_usable("cupy")
    assert not ok and "no CUDA device" in why
    monkeypatch.setattr(classreg.backend, "gpu_available", lambda: True)
    assert T.gpu_usable("cupy") == (True, "")


def test_gpu_rows_are_skipped_with_the_reason_and_the_run_completes(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "gpu_usable", lambda api="cupy": (False, f"no GPU run: test ({api})"))
    try:
        payload = R.run(["circle2d"], ["classreg_demons_cuda", "fireants_greedy_cuda"], repeat=1, quick=True,
                        out_dir=tmp_path, log=lambda s: None)
    except DataNotFoundError as exc:  # pragma: no cover - dipy data
        pytest.skip(str(exc))
    demons = T.TOOLS["classreg_demons"].label
    assert payload["skipped"] == [f"{demons} [GPU] (classreg_demons_cuda): no GPU run: test (cupy)",
                                  "FireANTs Greedy (GPU) (fireants_greedy_cuda): no GPU run: test (torch)"]
    assert payload["rows"] == [] and payload["device_ratios"] == []
    assert "gpus" in payload["machine"]
    saved = json.loads((tmp_path / f"{payload['date']}.json").read_text())
    assert saved["skipped"] == payload["skipped"]
    assert "## Not run" in (tmp_path / f"{payload['date']}.md").read_text()


class _FakeCupy(types.ModuleType):
    """What ``_timed`` uses of CuPy, recording the order of events."""

    def __init__(self, events):
        super().__init__("cupy")
        held = {"bytes": 5 * 2**20}

        class Pool:
            def free_all_blocks(self):
                events.append("free")
                held["bytes"] = 0

            def total_bytes(self):
                return held["bytes"]

        class Device:
            def synchronize(self):
                events.append("sync")

        pool = Pool()
        self.get_default_memory_pool = lambda: pool
        self.cuda = types.SimpleNamespace(Device=Device)
        self.held = held


def test_timed_synchronises_before_the_clock_stops_and_records_gpu_memory(monkeypatch):
    events = []
    fake = _FakeCupy(events)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    ticks = iter(range(100))
    monkeypatch.setattr(T.time, "perf_counter", lambda: (events.append("clock"), float(next(ticks)))[1])

    def fn():
        events.append("fn")
        fake.held["bytes"] = 3 * 2**20  # what the pool holds after the call
        return "out"

    monkeypatch.setattr(T, "GPU_PEAKS", [])
    assert T._timed(fn, "cuda") == ("out", 1.0)
    # the pool is emptied before the clock starts; the device is synchronised before the clock stops
    assert events == ["sync", "free", "clock", "fn", "sync", "clock"]
    assert T.GPU_PEAKS == [3.0]
    events.clear()
    assert T._timed(fn)[0] == "out" and events == ["clock", "fn", "clock"] and T.GPU_PEAKS == [3.0]


class _Metrics(dict):
    def __missing__(self, key):
        return 0


class _FakeResult:
    def __init__(self, fixed):
        self.transform = cr.DisplacementField.identity(fixed)
        self.metrics = _Metrics()
        self.params = _Metrics(method="bandlimited", time_steps=4)

    def apply_points(self, pts):
        return pts


_SOLVERS = {"classreg_demons": "register_demons", "classreg_demons_cc": "register_demons",
            "classreg_demons_mi": "register_demons", "classreg_lddmm": "register_lddmm",
            "classreg_lddmm_full": "register_lddmm", "classreg_vp": "register_vp", "classreg_rigid": "register_rigid",
            "classreg_points": "register_points"}


@pytest.mark.parametrize("base", list(_SOLVERS))
def test_gpu_row_passes_device_cuda_to_the_solver(base, monkeypatch):
    """Warm-up and timed call of a GPU row both get ``device="cuda"``; the CPU row passes no device."""
    assert set(_SOLVERS) == {t for t, api in T.GPU_TOOLS.items() if api == "cupy"}
    calls = []

    def solver(a, b, **kw):
        calls.append(kw)
        return _FakeResult(a if isinstance(a, cr.Image) else cr.Image(np.zeros((4, 4), np.float32), (1.0, 1.0)))

    monkeypatch.setattr(cr, _SOLVERS[base], solver)
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy([]))
    rng = np.random.default_rng(0)
    if base == "classreg_points":
        case = {"source": rng.random((30, 2)), "target": rng.random((30, 2))}
    else:
        img = cr.Image(rng.random((12, 12), dtype=np.float32), (1.0, 1.0))
        case = {"fixed": img, "moving": img}
    T.TOOLS[base].run(case, 1, False)
    assert calls and all("device" not in kw for kw in calls)
    calls.clear()
    out = T.TOOLS[f"{base}_cuda"].run(case, 1, False)
    assert len(calls) == 2 and all(kw.get("device") == "cuda" for kw in calls)
    assert out["params"]["device"] == "cuda"


def test_fireants_gpu_row_runs_fireants_on_cuda():
    gpu = T.TOOLS["fireants_greedy_cuda"]
    assert gpu.run.func is T.run_fireants_greedy and gpu.run.keywords == {"device": "cuda"}
    assert T.TOOLS["fireants_greedy"].slow_3d and gpu.slow_3d == ""  # the CPU row stays gated by --slow


def test_gpu_rows_are_rendered_against_their_cpu_rows():
    def row(tool, sec, dice, epe, **kw):
        return dict(case="synth3d_1mm", kind="deformable", tool=tool, label=T.TOOLS[tool].label, seconds=sec,
                    mean_dice=dice, epe_mm=epe, sdlogj=0.1, min_det=0.3, **kw)

    rows = [row("classreg_demons", 40.0, 0.80, 0.50), row("classreg_demons_cuda", 2.0, 0.81, 0.49, gpu_peak_mb=900.0),
            row("fireants_greedy_cuda", 4.0, 0.79, 0.60, gpu_peak_mb=2000.0),
            {"case": "synth3d_1mm", "kind": "deformable", "tool": "fireants_greedy", "label": "FireANTs Greedy (CPU)",
             "note": "not run on 3-D cases without --slow"}]
    dev = R.device_ratios(rows)
    assert [(d["tool"], d["cpu_s"]) for d in dev] == [("classreg_demons_cuda", 40.0), ("fireants_greedy_cuda", None)]
    assert dev[0]["time_ratio"] == pytest.approx(0.05) and dev[0]["quality_diff"] == pytest.approx(0.01)
    assert dev[0]["epe_diff_mm"] == pytest.approx(-0.01) and "time_ratio" not in dev[1]
    # classreg's GPU row is paired with FireANTs' GPU row only, its CPU row with no GPU peer
    pairs = {(r["classreg"], r["peer"]): r["time_ratio"] for r in R.ratios(rows)}
    assert pairs == {("classreg_demons_cuda", "fireants_greedy_cuda"): pytest.approx(0.5)}
    payload = {"rows": rows, "cases": {"synth3d_1mm": {"kind": "deformable", "description": "d", "provenance": "p"}},
               "machine": {"cpu_count": 16, "gpus": [{"id": "cuda:0", "name": "NVIDIA H200", "memory_gib": 139.8}]},
               "command": "c", "date": "d", "threads": 16, "repeat": 1, "versions": {}, "ratios": R.ratios(rows),
               "device_ratios": dev, "dominance": []}
    md = R.render_markdown(payload, None)
    assert "GPU NVIDIA H200 (139.8 GiB)" in md and "## GPU rows against their CPU rows" in md
    table = md.split("## synth3d_1mm")[1].split("\n\n")[2]
    assert "| GPU MB | GPU/CPU time | runs |" in table.splitlines()[0]
    assert "| 900 | 0.05 |" in table and "| 2000 |  |" in table


@pytest.mark.slow  # builds both synth3d cases (~25 s on 2 cores, most of it the 1 mm truth's inversion)
def test_synth3d_1mm_is_synth3d_at_1mm(tmp_path):
    from benchmarks.cases import build_case, load_case

    if importlib.util.find_spec("nilearn") is None:
        pytest.skip("nilearn not installed")
    try:
        info = build_case("synth3d_1mm", tmp_path / "s1")
        build_case("synth3d", tmp_path / "s2")
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    assert info["spacing"] == [1.0, 1.0, 1.0] and np.prod(info["shape"]) > 8e6 and info["has_truth"]
    c1, c2 = load_case(tmp_path / "s1"), load_case(tmp_path / "s2")
    pts = c1["fixed"].grid_points()[c1["mask"].data > 0]
    # the same physical deformation: the 1 mm truth (inverted on the 1 mm grid) agrees with synth3d's (2 mm) to a
    # small fraction of a 1 mm voxel in the brain (measured: mean 0.006 mm, max 0.03 mm)
    d = np.linalg.norm(c1["truth"].map_points(pts) - c2["truth"].map_points(pts), axis=1)
    assert d.mean() < 0.02 and d.max() < 0.1
    # and it is a large deformation (max 8 mm per component), not the identity
    e = np.linalg.norm(c1["truth"].map_points(pts) - pts, axis=1)
    assert 1.0 < e.mean() and e.max() <= 8.0 * np.sqrt(3)
