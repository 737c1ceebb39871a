"""Shared helpers for the benchmark scripts: timing, machine description, output files."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    from classreg.backend import thread_count, versions

    info = {"cpu_count": os.cpu_count(), "numba_threads": thread_count(), "processor": platform.processor(),
            "machine": platform.machine(), "versions": versions()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for var in ("OPENBLAS_CORETYPE", "NUMBA_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS"):
        if var in os.environ:
            info.setdefault("env", {})[var] = os.environ[var]
    return info


def timeit(fn, *, repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> dict:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs (JIT compile, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeat or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_outputs(name: str, payload: dict, table: str, out_dir=None) -> tuple[Path, Path]:
    """Write ``<name>-<UTC date>.json`` and ``.md`` into ``out_dir`` (default benchmarks/results/)."""
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    payload = dict(payload, benchmark=name, date=stamp, machine=machine())
    jpath = out / f"{name}-{stamp}.json"
    mpath = out / f"{name}-{stamp}.md"
    jpath.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    mpath.write_text(table + "\n")
    return jpath, mpath


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns`` = [(key, header), ...]; floats printed with 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
