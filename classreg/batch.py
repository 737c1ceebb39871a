"""Many registrations on Dask: :func:`batch` and ``classreg batch PAIRS.csv -o OUT``.

One task per row of a pairs table (CSV, a pandas DataFrame or a list of dicts). Columns:

``fixed``, ``moving`` (required)
    Image files; relative paths are read relative to the CSV file's folder (``base=`` for other tables).
``id`` (optional)
    Name of the row's result folder ``OUT/<id>/``; default ``<fixed stem>__<moving stem>``.
``solver`` (optional)
    A solver (``demons``) or a chain (``affine+demons``: each solver starts from the previous one's transform,
    passed as its ``init``); default the ``solver=`` argument.
``fixed_labels``, ``moving_labels`` (optional)
    Label maps: the evaluation reports Dice before and after.
any option of the row's solver(s)
    ``iterations``, ``fixed_mask``, ``init`` (a transform file), ``seed``, ...: the names, kinds and ranges of each
    solver's declaration (:mod:`classreg.options`), spelt as the Python keyword; empty cells keep the default.
    Lists take spaces, ``;`` or quoted commas (``4 2 1``). In a chain a plain column goes to every solver that
    declares it (``init`` to the first only); ``demons.iterations`` targets one solver.

Every cell is checked against the solver's declaration before any work; a bad cell raises
:class:`BatchTableError` naming the row and the column. Each pair then runs as one task, on a LocalCluster of this
machine (sized from its cores and memory) or on any Dask cluster (``client=`` or ``scheduler=``), and writes

* ``OUT/<id>/``: the :class:`~classreg.Result` (transform, inverse, warped image, params, history; published
  atomically by :func:`classreg.result.publish_folder`), ``qc.png``, ``evaluation.json`` (Dice with labels,
  folding, time, peak memory) and ``batch.json`` — the marker that the pair is finished, with a fingerprint of its
  inputs and options;
* ``OUT/summary.csv`` (and ``summary.parquet`` when pyarrow is installed): one line per row with its status
  (``ok``, ``skipped``: finished by an earlier run, ``failed`` with the error and traceback, ``refused``: does not
  fit in a worker's memory, ``not run``: the batch was stopped), the evaluation, the time and the memory estimate
  next to the measured peak.

A rerun skips every pair whose folder holds a finished result with the same fingerprint, so an interrupted batch
resumes where it stopped; a pair whose worker died is resubmitted up to ``retries`` times.

Needs ``dask.distributed`` (``pip install "classreg[dist]"``); this module imports without it.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io as _stdio
import json
import logging
import math
import os
import re
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from .options import SOLVERS

__all__ = ["BatchReport", "BatchTableError", "INSTALL_HINT", "PairTask", "SUMMARY_COLUMNS", "batch", "plan_cluster",
           "plan_pairs", "read_pairs", "run_pair"]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "classreg[dist]"  (or pip install "dask[distributed]")'

#: columns that are not solver options
RESERVED = ("id", "fixed", "moving", "solver", "fixed_labels", "moving_labels")
#: option kinds whose cell is a file (read in the worker)
FILE_KINDS = ("image", "transform", "array")
#: solvers whose transform is an affine map: only they can hand their result to a next solver as ``init``
LINEAR_SOLVERS = ("rigid", "affine")
#: resident memory of a worker process that has run a pair (classreg, its kernels, SimpleITK and matplotlib
#: loaded), MB: measured 390-400 MB on LocalCluster workers (docs/notes/batch.md), rounded up
WORKER_BASELINE_MB = 450.0
#: peak of a pair's evaluation (Jacobian/folding statistics in float64, label resampling, QC figure, saving) while
#: its result is held, in float32 copies of the fixed image: measured 122 on the 3-D benchmark pairs
#: (docs/notes/batch.md), rounded up; more than demons itself (56)
EVALUATION_COPIES = 125.0
#: the marker file of a finished pair
MARKER = "batch.json"
_MARKER_FORMAT = "classreg-batch-1"
_SUMMARY = ("summary.csv", "summary.parquet")

#: the summary table's columns, in order
SUMMARY_COLUMNS = (
    "row", "id", "status", "solver", "fixed", "moving", "output", "seconds", "cpu_seconds", "solver_seconds",
    "solver_estimate_mb",
    "peak_memory_mb", "memory_estimate_mb", "pair_peak_mb", "evaluation_peak_mb", "dice_mean", "dice_before_mean",
    "dice", "min_det",
    "percent_det_nonpositive", "nd_percent", "stop_reason", "converged", "attempts", "worker", "worker_pair", "qc",
    "error_column", "error_file", "error", "traceback",
)


class BatchTableError(ValueError):
    """The pairs table has bad cells: every problem is listed, each naming its row and column."""


class PairInputError(ValueError):
    """An input file of one row cannot be read (``column`` and ``path`` say which)."""

    def __init__(self, column: str, path: str, exc: BaseException):
        self.column, self.path = column, path
        if isinstance(exc, FileNotFoundError):
            message = f"no such file {path!r}"
        elif path in str(exc):
            message = str(exc)
        else:
            message = f"cannot read {path!r}: {exc}"
        super().__init__(f"column {column!r}: {message}")


@dataclass(frozen=True)
class PairTask:
    """One row of the table, checked and resolved: what a worker needs to run it.

    Attributes
    ----------
    row : int
        1-based data row of the table.
    id : str
        Name of the result folder.
    stages : tuple
        ``((solver, {option: value}), ...)``: one solver, or a chain.
    inputs : dict
        Column → absolute path of every file (fixed, moving, labels, masks, transform files).
    out : str
        The result folder (absolute).
    fingerprint : str
        SHA-256 of the solvers, options and inputs (path, size, modification time).
    """

    row: int
    id: str
    stages: tuple
    inputs: dict
    out: str
    fingerprint: str
    qc: bool = True
    save_extras: bool = False
    replace: bool = False
    estimate_mb: float | None = None
    solver_estimate_mb: float | None = None
    threads: int | None = None
    attempt: int = 1
    run_id: str = ""

    @property
    def solver(self) -> str:
        return "+".join(name for name, _ in self.stages)


@dataclass
class BatchReport:
    """What :func:`batch` did: one summary record per row (in table order) and where the summary was written.

    Attributes
    ----------
    rows : list of dict
        The summary records (keys :data:`SUMMARY_COLUMNS`).
    summary_csv, summary_parquet : Path or None
        The summary files (Parquet only when pyarrow is installed).
    workers : int
        Workers of the cluster the batch ran on (0 when nothing was run).
    seconds : float
        Wall time of the call; ``cluster_seconds`` of it starting the embedded cluster.
    stopped : bool
        The batch was stopped (callback or interrupt) before every pair ran.
    """

    rows: list
    summary_csv: Path | None = None
    summary_parquet: Path | None = None
    workers: int = 0
    seconds: float = 0.0
    cluster_seconds: float = 0.0
    stopped: bool = False

    def _count(self, status) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def ok(self) -> int:
        return self._count("ok")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def failed(self) -> list:
        """Records of the rows that did not produce a result (failed, refused, not run)."""
        return [r for r in self.rows if r["status"] not in ("ok", "skipped")]

    def text(self) -> str:
        """A short account for a terminal."""
        counts = {}
        for r in self.rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in counts.items())
        lines = [f"{len(self.rows)} pair(s): {parts} in {self.seconds:.1f} s on {self.workers} worker(s)"]
        for r in self.failed[:20]:
            lines.append(f"  row {r['row']} ({r['id']}): {r['status']}: {r['error']}")
        if len(self.failed) > 20:
            lines.append(f"  ... {len(self.failed) - 20} more")
        if self.summary_csv is not None:
            lines.append(f"summary: {self.summary_csv}")
        return "\n".join(lines)

    def to_pandas(self):
        """The summary as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(SUMMARY_COLUMNS))


# ================================================================================================ the table
def _require_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(f"classreg.batch runs on dask.distributed, which is not installed: {INSTALL_HINT}") from exc
    return distributed


_EMPTY = object()


def _is_empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def read_pairs(pairs, *, base=None) -> tuple:
    """The rows of a pairs table as dicts, and the folder relative paths are read from.

    Parameters
    ----------
    pairs : str, os.PathLike, pandas.DataFrame or sequence of dict
        A CSV file (header line, one pair per line; empty lines and lines starting with ``#`` are skipped), a
        DataFrame or a list of mappings.
    base : str or os.PathLike, optional
        Folder of relative paths (default: the CSV file's folder, else the working directory).

    Returns
    -------
    rows : list of dict
        Column → cell (strings from a CSV; typed values from a DataFrame or dicts).
    base : Path
    source : str
        How messages name the table (the CSV file name, or ``"pairs"``).
    """
    if isinstance(pairs, (str, os.PathLike)):
        path = Path(os.fspath(pairs))
        if not path.is_file():
            raise FileNotFoundError(f"pairs table {str(path)!r}: no such file")
        text = path.read_text(encoding="utf-8-sig")
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        reader = csv.DictReader(_stdio.StringIO("\n".join(lines)), skipinitialspace=True)
        if reader.fieldnames is None:
            raise BatchTableError(f"pairs table {str(path)!r} is empty: it needs a header line (fixed,moving,...)")
        rows = []
        for r in reader:
            if None in r:
                raise BatchTableError(f"{path.name} row {len(rows) + 1}: more cells than header columns "
                                      f"({', '.join(reader.fieldnames)}); quote cells that hold commas")
            rows.append({k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items()})
        base = path.parent if base is None else Path(os.fspath(base))
        return rows, base.resolve(), path.name
    if hasattr(pairs, "to_dict"):  # a pandas DataFrame
        rows = [dict(r) for r in pairs.to_dict("records")]
    else:
        rows = [dict(r) for r in pairs]
    return [{str(k).strip(): v for k, v in r.items()} for r in rows], Path(os.fspath(base or ".")).resolve(), "pairs"


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _cell(option, raw):
    """The Python value of a cell for ``option`` (a file cell stays its text); ``_EMPTY`` for an empty cell."""
    if _is_empty(raw):
        return _EMPTY
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str):
        if hasattr(raw, "item") and getattr(raw, "ndim", 1) == 0:  # numpy scalars from a DataFrame
            raw = raw.item()
        return tuple(raw) if isinstance(raw, list) else raw
    text = raw.strip()
    kind = option.kind
    if kind in FILE_KINDS:
        return text
    if option.cli_parse is not None:
        try:
            return option.cli_parse(text)
        except (TypeError, ValueError):
            return text
    if kind == "bool":
        low = text.lower()
        return True if low in _TRUE else False if low in _FALSE else text
    if kind in ("float", "int"):
        return _number(text)
    if kind in ("floats", "ints"):
        parts = [p for p in re.split(r"[\s,;]+", text.strip("()[] ")) if p]
        return tuple(_number(p) for p in parts)
    if kind == "int_or_str":
        n = _number(text)
        return text if isinstance(n, str) else n
    return text  # str, device, dtype


def _normalise(option, value):
    """Whole numbers of integer options as int (a DataFrame turns them into floats), sequences as tuples."""
    if option.kind == "int" and not isinstance(value, bool) and isinstance(value, float):
        return int(value)
    if option.kind == "ints" and isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    if option.kind == "ints" and isinstance(value, float):
        return int(value)
    if option.kind == "floats" and isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    return value


def _solver_names() -> list:
    return sorted(n for n, (d, _) in SOLVERS.items() if d.inputs == ("fixed", "moving"))


def _parse_chain(text: str) -> tuple:
    """``"affine+demons"`` → ``("affine", "demons")``; raises ValueError naming the problem."""
    names = tuple(p.strip().lower() for p in str(text).split("+"))
    known = _solver_names()
    for n in names:
        if n not in known:
            hint = difflib.get_close_matches(n, known, n=1)
            extra = (f"; did you mean {hint[0]!r}?" if hint else "") if n else ""
            raise ValueError(f"unknown solver {n!r} in {text!r} (image solvers: {', '.join(known)}{extra}); "
                             f"chain solvers with '+', e.g. 'affine+demons'")
    if len(set(names)) != len(names):
        raise ValueError(f"solver chain {text!r} names a solver twice")
    for i, n in enumerate(names[:-1]):
        if n not in LINEAR_SOLVERS:
            raise ValueError(f"in the chain {text!r}, {n} hands a non-affine transform to {names[i + 1]}: only "
                             f"{' and '.join(LINEAR_SOLVERS)} can come before another solver")
    for n in names[1:]:
        if "init" not in SOLVERS[n][0]:
            raise ValueError(f"in the chain {text!r}, {n} takes no init and can only come first")
    return names


_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")


def _stem(path_text: str) -> str:
    name = Path(path_text).name
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip(".-") or "pair"


def _stat(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _jsonable(x):
    from .result import _jsonable as j

    return j(x)


def plan_pairs(rows, *, solver: str = "demons", options=None, base=".", out=".", threads_per_worker: int = 1,
               qc: bool = True, save_extras: bool = False, source: str = "pairs") -> list:
    """Check every cell of ``rows`` against the solvers' declarations and resolve each row into a :class:`PairTask`.

    Parameters
    ----------
    rows : list of dict
        From :func:`read_pairs`.
    solver : str
        Solver (or chain, ``"affine+demons"``) of rows without a ``solver`` cell.
    options : dict, optional
        Option values for every row whose own cell is empty (same names as the columns).
    base, out : path
        Folder of relative input paths; the batch's output folder.
    threads_per_worker : int
        CPU threads of each pair's solver (its ``threads``) unless the row sets ``threads``.

    Raises
    ------
    BatchTableError
        Listing every bad cell as ``<source> row R (id ...), column C: problem``.
    """
    base, out = Path(base), Path(out)
    options = dict(options or {})
    errors: list = []
    tasks: list = []
    try:
        default_chain = _parse_chain(solver)
    except ValueError as exc:
        raise BatchTableError(f"solver: {exc}") from None
    if not rows:
        raise BatchTableError(f"{source} holds no pairs")
    columns = []
    for r in rows:
        for c in r:
            if c not in columns:
                columns.append(c)
    for c in ("fixed", "moving"):
        if c not in columns:
            raise BatchTableError(f"{source} has no {c!r} column (columns: {', '.join(columns) or 'none'}); "
                                  f"the header needs at least fixed,moving")
    ids: dict = {}
    used_options: dict = {}
    for i, raw in enumerate(rows, start=1):
        where = f"{source} row {i}"
        cells = dict(raw)
        if not _is_empty(cells.get("id")):
            where += f" (id {str(cells['id']).strip()!r})"
        problems: list = []

        def bad(column, message):
            problems.append(f"{where}, column {column!r}: {message}")

        try:
            chain = _parse_chain(cells["solver"]) if not _is_empty(cells.get("solver")) else default_chain
        except ValueError as exc:
            bad("solver", exc)
            errors.extend(problems)
            continue
        inputs: dict = {}
        for c in ("fixed", "moving", "fixed_labels", "moving_labels"):
            v = cells.get(c)
            if _is_empty(v):
                if c in ("fixed", "moving"):
                    bad(c, "empty: every row needs a fixed and a moving image")
                continue
            inputs[c] = _resolve(base, str(v))
        if ("fixed_labels" in inputs) != ("moving_labels" in inputs):
            have = "fixed_labels" if "fixed_labels" in inputs else "moving_labels"
            bad(have, "Dice needs both fixed_labels and moving_labels; give the other one or neither")
        stage_opts = [{} for _ in chain]
        own = {k: v for k, v in cells.items() if k not in RESERVED and not _is_empty(v)}
        merged = {k: v for k, v in options.items() if not _is_empty(v) and _applies(k, chain)}
        used_options.update(merged)
        merged.update(own)
        for column, raw_value in merged.items():
            for k, name, opt in _targets(column, chain, bad):
                o = SOLVERS[name][0][opt]
                if not o.cli or o.kind == "object":
                    bad(column, f"{opt} is a Python-only option of register_{name}; it cannot be set from a table")
                    continue
                if opt == "init" and k > 0:
                    bad(column, f"{name} in the chain {'+'.join(chain)} starts from {chain[k - 1]}'s transform; "
                                f"set init for the first solver only")
                    continue
                value = _cell(o, raw_value)
                if o.kind in FILE_KINDS and isinstance(value, str):
                    path = _resolve(base, value)
                    if o.cli_parse is not None and not os.path.exists(path) and _word(o, value):
                        stage_opts[k][opt] = value  # a word such as affine's init='moments'
                    else:
                        stage_opts[k][opt] = path
                        inputs[column if "." in column else opt] = path
                    continue
                try:
                    SOLVERS[name][0].check({opt: value})
                except (TypeError, ValueError) as exc:
                    bad(column, exc)
                    continue
                stage_opts[k][opt] = _normalise(o, value)
        for k, name in enumerate(chain):
            if "threads" in SOLVERS[name][0] and "threads" not in stage_opts[k]:
                stage_opts[k]["threads"] = int(threads_per_worker)
        pid = str(cells["id"]).strip() if not _is_empty(cells.get("id")) else None
        if pid is not None and (not _ID.match(pid) or pid in _SUMMARY):
            bad("id", f"{pid!r} is not a usable folder name (letters, digits, '_', '-', '.', '+'; not starting "
                      f"with '.' or '-')")
        if problems:
            errors.extend(problems)
            continue
        if pid is None:
            pid = _safe(f"{_stem(inputs['fixed'])}__{_stem(inputs['moving'])}")
        if pid in ids:
            errors.append(f"{where}: its result folder {pid!r} is also row {ids[pid]}'s; give the rows distinct "
                          f"values in an 'id' column")
            continue
        ids[pid] = i
        stages = tuple((name, stage_opts[k]) for k, name in enumerate(chain))
        # threads and memory_limit change no result beyond float rounding / a refusal: a rerun with other threads
        # keeps the finished pairs
        finger = {"solver": "+".join(chain), "options": [
            [n, _jsonable({k: v for k, v in o.items() if k not in _NOT_FINGERPRINTED})] for n, o in stages],
                  "inputs": {c: [p, _stat(p)] for c, p in sorted(inputs.items())}}
        digest = hashlib.sha256(json.dumps(finger, sort_keys=True).encode()).hexdigest()
        threads = max((o["threads"] for _, o in stages if o.get("threads") is not None),
                      default=int(threads_per_worker))
        tasks.append(PairTask(row=i, id=pid, stages=stages, inputs=inputs, out=str((out / pid).resolve()),
                              fingerprint=digest, qc=bool(qc), save_extras=bool(save_extras), threads=threads))
    for key in options:
        if key not in used_options and not _is_empty(options[key]) and not errors:
            errors.append(f"option {key!r} (given for every row) is not an option of any row's solver")
    if errors:
        shown = errors[:30] + ([f"... and {len(errors) - 30} more"] if len(errors) > 30 else [])
        raise BatchTableError(f"{len(errors)} problem(s) in the pairs table (nothing was run):\n  " + "\n  ".join(shown))
    return tasks


_NOT_FINGERPRINTED = ("threads", "memory_limit")


def _applies(column: str, chain: tuple) -> bool:
    """Whether some solver of ``chain`` takes the option ``column`` (``name`` or ``solver.name``)."""
    if "." in column:
        name, opt = column.split(".", 1)
        return name.strip().lower() in chain and opt in SOLVERS[name.strip().lower()][0]
    return any(column in SOLVERS[n][0] for n in chain)


def _word(option, text: str) -> bool:
    """Whether ``text`` is a word that ``option.cli_parse`` takes instead of a file (affine's init='moments')."""
    try:
        return isinstance(option.cli_parse(text), str)
    except Exception:
        return False


def _resolve(base: Path, text: str) -> str:
    p = Path(os.path.expanduser(text))
    return os.path.abspath(p if p.is_absolute() else base / p)


def _targets(column: str, chain: tuple, bad) -> list:
    """``[(stage index, solver, option)]`` a column sets; reports an unknown column through ``bad``."""
    if "." in column:
        name, opt = column.split(".", 1)
        name = name.strip().lower()
        if name not in chain:
            bad(column, f"names solver {name!r}, which this row's solver {'+'.join(chain)} does not run")
            return []
        decl = SOLVERS[name][0]
        if opt not in decl:
            hint = difflib.get_close_matches(opt, decl.names, n=1)
            bad(column, f"register_{name} has no option {opt!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}")
            return []
        return [(chain.index(name), name, opt)]
    hits = [(k, n, column) for k, n in enumerate(chain) if column in SOLVERS[n][0]]
    if column == "init":
        hits = hits[:1] if hits and hits[0][0] == 0 else []
        if not hits:
            bad(column, f"register_{chain[0]} takes no init")
        return hits
    if not hits:
        names = sorted({o for n in chain for o in SOLVERS[n][0].names} | set(RESERVED))
        hint = difflib.get_close_matches(column, names, n=1)
        bad(column, f"not an option of register_{' or register_'.join(chain)} nor a batch column "
                    f"({', '.join(RESERVED)}){f'; did you mean {hint[0]!r}?' if hint else ''}")
    return hits


# ================================================================================================ sizing
def _image_shape(path: str):
    """Size of an image from its header (numpy order), or None if it cannot be read now (the worker reports it)."""
    try:
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(path)
        r.ReadImageInformation()
        return tuple(reversed(r.GetSize()))
    except Exception:
        return None


class _Shape:
    def __init__(self, shape):
        self.shape = shape


def estimate_memory_mb(task: PairTask) -> tuple:
    """Memory estimates of one pair from its images' headers (no voxel is read).

    Parameters
    ----------
    task : PairTask

    Returns
    -------
    solver_mb : float or None
        The registration: the largest of its solvers' estimates, their measured copies of the larger image
        (:data:`classreg.solvers._common.MEMORY_COPIES`), MB.
    pair_mb : float or None
        The whole pair above a worker's baseline: ``solver_mb`` or the evaluation's :data:`EVALUATION_COPIES`
        float32 copies of the fixed image, whichever is larger, MB.

    Both are None when a header cannot be read now (the worker then reports the file).
    """
    from .solvers._common import MEMORY_COPIES, check_memory

    shapes = [_image_shape(task.inputs["fixed"]), _image_shape(task.inputs["moving"])]
    if None in shapes:
        return None, None
    fixed, moving = _Shape(shapes[0]), _Shape(shapes[1])
    solver = []
    for name, opts in task.stages:
        if name in MEMORY_COPIES:
            decl = SOLVERS[name][0]
            dtype = opts.get("dtype", decl["dtype"].default if "dtype" in decl else "float32")
            solver.append(check_memory(name, fixed, moving, dtype, memory_limit=math.inf))
    solver_mb = float(max(solver)) if solver else None
    evaluation_mb = EVALUATION_COPIES * math.prod(shapes[0]) * 4 / 2**20
    return solver_mb, float(max(solver_mb or 0.0, evaluation_mb))


def estimate_pair_mb(task: PairTask) -> float | None:
    """The memory of the whole pair above a worker's baseline (MB): :func:`estimate_memory_mb`'s second value."""
    return estimate_memory_mb(task)[1]


def plan_cluster(*, cores: int, available_mb: float | None, pair_mb, n_pairs: int, workers: int | None = None,
                 threads_per_worker: int = 1, memory_per_worker: float | None = None) -> tuple:
    """Size the embedded LocalCluster.

    Workers × threads per worker never exceed ``cores``; without ``workers`` there are as many as the cores allow,
    no more than fit ``available_mb`` with the largest pair (:data:`WORKER_BASELINE_MB` + ``max(pair_mb)``
    each), and no more than ``n_pairs``.

    Parameters
    ----------
    cores : int
        CPU cores this process may use.
    available_mb : float or None
        Memory available now (MB); None if unknown (no memory cap).
    pair_mb : sequence of float or None
        Each pair's estimate above a worker's baseline (MB; :func:`estimate_memory_mb`), None where unknown.
    n_pairs : int
        Pairs to run.
    workers : int, optional
        Workers asked for (checked against the cores).
    threads_per_worker : int
        CPU threads of each worker's pair.
    memory_per_worker : float, optional
        MB per worker asked for; default an equal share of ``available_mb``.

    Returns
    -------
    workers : int
    memory_per_worker : float or None
        MB (None when ``available_mb`` is unknown and none was asked for).

    Raises
    ------
    ValueError
        workers × threads_per_worker exceed ``cores``, or a count or memory is not positive.
    """
    t = int(threads_per_worker)
    if t < 1:
        raise ValueError(f"threads_per_worker must be at least 1, got {threads_per_worker}")
    if t > cores:
        raise ValueError(f"threads_per_worker={t} exceeds the {cores} cores of this machine")
    if workers is not None:
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if int(workers) * t > cores:
            raise ValueError(f"workers={workers} × threads_per_worker={t} = {int(workers) * t} threads exceed the "
                             f"{cores} cores of this machine; use fewer workers or threads per worker")
        n = int(workers)
    else:
        n = max(1, cores // t)
        known = [m for m in pair_mb if m is not None]
        budget = memory_per_worker if memory_per_worker is not None else None
        if known and available_mb is not None and budget is None:
            n = min(n, max(1, int(available_mb // (WORKER_BASELINE_MB + max(known)))))
        n = max(1, min(n, max(int(n_pairs), 1)))
    if memory_per_worker is not None:
        mem = float(memory_per_worker)
        if mem <= 0:
            raise ValueError(f"memory_per_worker must be positive (MB), got {memory_per_worker}")
    else:
        mem = None if available_mb is None else float(available_mb) / n
    return n, mem


def _refusal(task: PairTask, memory_mb: float | None) -> str | None:
    if memory_mb is None or task.estimate_mb is None:
        return None
    need = WORKER_BASELINE_MB + task.estimate_mb
    if need <= memory_mb:
        return None
    return (f"the pair needs about {need:,.0f} MB ({task.estimate_mb:,.0f} MB estimated for {task.solver} + "
            f"{WORKER_BASELINE_MB:,.0f} MB per worker), more than the {memory_mb:,.0f} MB a worker has; use fewer "
            f"workers (--workers), give workers more memory (--memory-per-worker), or crop/resample the images")


# ================================================================================================ one pair
def _status_mb():
    """(VmRSS, VmHWM) of this process in MB from /proc (Linux), or None."""
    try:
        with open("/proc/self/status") as fh:
            text = fh.read()
    except OSError:
        return None
    vals = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, rest = line.split(":", 1)
            vals[key] = int(rest.split()[0]) / 1024.0
    if len(vals) != 2:
        return None
    return vals["VmRSS"], vals["VmHWM"]


def _rss_mb() -> float | None:
    s = _status_mb()
    if s is not None:
        return s[0]
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


class PeakMemory:
    """Peak resident memory of this process between :meth:`start` and :meth:`stop` (or in a ``with`` block), MB:
    ``peak_mb`` (absolute) and ``above_mb`` (above the resident memory at the start).

    On Linux the kernel's high-water mark is reset at the start (``/proc/self/clear_refs``) and read at the end:
    exact, and free. Elsewhere the resident memory is sampled every 5 ms. A worker running one pair at a time
    measures that pair; tasks sharing a process share the figure. Measurements must not overlap in one process.
    """

    def __init__(self):
        self.start_mb = self.peak_mb = self.above_mb = None
        self._exact = False
        self._stop = None
        self._running = False

    def start(self) -> "PeakMemory":
        self.start_mb = _rss_mb()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._exact = _status_mb() is not None
        except OSError:
            self._exact = False
        if not self._exact and self.start_mb is not None:
            self._stop = threading.Event()
            self._samples = [self.start_mb]

            def sample():
                while not self._stop.wait(0.005):
                    self._samples.append(_rss_mb())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        self._running = True
        return self

    def stop(self) -> "PeakMemory":
        if not self._running:
            return self
        self._running = False
        if self._exact:
            self.peak_mb = _status_mb()[1]
        elif self._stop is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._samples + [_rss_mb()])
        if self.peak_mb is not None and self.start_mb is not None:
            self.above_mb = max(self.peak_mb - self.start_mb, 0.0)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def _read_input(task: PairTask, column: str, reader):
    path = task.inputs[column]
    try:
        return reader(path)
    except Exception as exc:
        raise PairInputError(column, path, exc) from exc


def _option_value(task: PairTask, name: str, opt: str, value):
    """The value a solver gets: files read (an image, a transform), everything else as checked."""
    o = SOLVERS[name][0][opt]
    if o.kind not in FILE_KINDS or not isinstance(value, str):
        return value
    column = next((c for c, p in task.inputs.items() if p == value and c.split(".")[-1] == opt), opt)
    if o.cli_parse is not None:
        if value in task.inputs.values():
            return _read_input(task, column, o.cli_parse)
        return o.cli_parse(value)  # a word (affine's init='moments')
    from .cli import _cli_value

    return _read_input(task, column, lambda p: _cli_value(o, p))


def _record(task: PairTask) -> dict:
    rec = dict.fromkeys(SUMMARY_COLUMNS)
    rec.update(row=task.row, id=task.id, solver=task.solver, fixed=task.inputs.get("fixed"),
               moving=task.inputs.get("moving"), output=task.out, attempts=task.attempt,
               memory_estimate_mb=task.estimate_mb, solver_estimate_mb=task.solver_estimate_mb)
    return rec


#: pairs :func:`run_pair` started in this process (the first includes loading the kernels: time and memory)
_PAIRS_RUN = 0


def run_pair(task: PairTask) -> dict:
    """Run one row (what a worker does): read its files, run its solver(s), evaluate, and publish the result folder.

    Parameters
    ----------
    task : PairTask
        From :func:`plan_pairs`.

    Returns
    -------
    dict
        The row's summary record (keys :data:`SUMMARY_COLUMNS`). Never raises for a problem of the pair itself: the
        record then has ``status="failed"``, the error (naming the column and file of an unreadable input) and the
        traceback. A task whose result folder already holds its finished result returns that result's record.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    done = _finished(task)
    if done is not None:  # a re-execution (the scheduler recomputes results lost with a worker): already published
        return done
    from .options import thread_context

    global _PAIRS_RUN
    _PAIRS_RUN += 1
    rec = _record(task)
    rec["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    rec["worker_pair"] = _PAIRS_RUN
    try:
        # everything the pair does (the evaluation's and the QC figure's numba kernels too) on its threads, so
        # that workers x threads stay within the cores
        with thread_context(task.threads):
            rec.update(_compute(task, rec))
        rec["status"] = "ok"
        logger.info("pair %s (row %d): %s, %.1f s", task.id, task.row, rec["stop_reason"], time.perf_counter() - t0)
    except Exception as exc:
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                   error_column=getattr(exc, "column", None), error_file=getattr(exc, "path", None))
        logger.info("pair %s (row %d) failed: %s", task.id, task.row, rec["error"])
    rec["seconds"] = time.perf_counter() - t0
    rec["cpu_seconds"] = time.process_time() - c0  # this process's CPU: the pair's own in a one-pair worker
    return rec


def _compute(task: PairTask, rec: dict) -> dict:
    from .io import load
    from .result import check_result_folder, publish_folder

    t0 = time.perf_counter()
    check_result_folder(task.out, overwrite=task.replace)  # before any work
    start_mb = _rss_mb()
    fixed = _read_input(task, "fixed", load)
    moving = _read_input(task, "moving", load)
    labels = None
    if "fixed_labels" in task.inputs:
        labels = (_read_input(task, "fixed_labels", load), _read_input(task, "moving_labels", load))
    results = []
    with PeakMemory() as mem:
        t_solver = time.perf_counter()
        for k, (name, opts) in enumerate(task.stages):
            func = SOLVERS[name][1]
            kw = {opt: _option_value(task, name, opt, v) for opt, v in opts.items()}
            if k > 0:
                kw["init"] = results[-1].transform
            results.append(func(fixed, moving, **kw))
        solver_seconds = time.perf_counter() - t_solver
    res = results[-1]
    out = {"solver_seconds": solver_seconds, "peak_memory_mb": mem.above_mb, "stop_reason": res.stop_reason,
           "converged": bool(res.converged)}
    mem_eval = PeakMemory().start()  # the evaluation, the QC figure and writing the files
    try:
        evaluation = _evaluate(res, fixed, labels)
        out.update({k: evaluation.get(k) for k in ("dice_mean", "dice_before_mean", "min_det",
                                                    "percent_det_nonpositive", "nd_percent")})
        if "dice" in evaluation:
            out["dice"] = json.dumps(evaluation["dice"], sort_keys=True)

        def fill(d: Path):
            from .result import _fill

            _fill(res, d, True, task.save_extras)
            for k, (name, _) in enumerate(task.stages[:-1]):  # the earlier solvers of a chain, without images
                sub = d / "stages" / f"{k + 1}-{name}"
                sub.mkdir(parents=True)
                _fill(results[k], sub, False)
            qc = None
            if task.qc:
                try:
                    from .qc import qc_figure

                    qc_figure(res, moving, d / "qc.png", fixed=fixed,
                              title=f"{task.id}: {task.solver}, {Path(task.inputs['moving']).name} → "
                                    f"{Path(task.inputs['fixed']).name}")
                    qc = "qc.png"
                except ImportError as exc:
                    qc = f"no qc.png: {exc}"
            mem_eval.stop()
            peaks = [m for m in (mem.peak_mb, mem_eval.peak_mb) if m is not None]
            out.update(qc=qc, evaluation_peak_mb=mem_eval.above_mb, seconds=time.perf_counter() - t0,
                       pair_peak_mb=max(max(peaks) - start_mb, 0.0) if peaks and start_mb is not None else None)
            evaluation.update({k: out[k] for k in ("seconds", "solver_seconds", "peak_memory_mb", "pair_peak_mb",
                                                   "evaluation_peak_mb")},
                              solver_estimate_mb=task.solver_estimate_mb, memory_estimate_mb=task.estimate_mb,
                              peak_rss_mb=max(peaks) if peaks else None,
                              solver_timings=[r.timings for r in results])
            _write_json(d / "evaluation.json", evaluation)
            record = {k: v for k, v in dict(rec, **out, status="ok").items() if k != "traceback"}
            from ._version import __version__

            _write_json(d / MARKER, {"format": _MARKER_FORMAT, "fingerprint": task.fingerprint, "row": task.row,
                                     "id": task.id, "solver": task.solver, "stages": [[n, o] for n, o in task.stages],
                                     "inputs": task.inputs, "classreg": __version__, "attempt": task.attempt,
                                     "run": task.run_id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "record": record})

        publish_folder(task.out, fill, overwrite=task.replace)
    finally:
        mem_eval.stop()
    return out


def _write_json(path: Path, payload) -> None:
    from .result import _write_text

    _write_text(path, json.dumps(_jsonable(payload), indent=2, sort_keys=True))


def _evaluate(res, fixed, labels) -> dict:
    """Dice before/after (labels given), folding (Jacobian statistics of the final transform on the fixed grid)."""
    import numpy as np

    from .evaluate import dice, jacobian_stats
    from .resample import resample

    ev: dict = {}
    if labels is not None:
        fl, ml = labels
        if not fl.same_grid(fixed, atol=1e-4):
            fl = resample(fl, None, reference=fixed, interpolation="label")
        after = dice(res.apply(ml, interpolation="label"), fl)
        before = dice(resample(ml, None, reference=fixed, interpolation="label"), fl)
        ev["dice"] = {str(k): v for k, v in after.items()}
        ev["dice_before"] = {str(k): v for k, v in before.items()}
        with np.errstate(all="ignore"):
            ev["dice_mean"] = float(np.nanmean(list(after.values()))) if after else None
            ev["dice_before_mean"] = float(np.nanmean(list(before.values()))) if before else None
    js = jacobian_stats(res.transform, reference=fixed)
    ev["folding"] = js
    ev["min_det"] = js["min_det"]
    ev["percent_det_nonpositive"] = js["percent_nonpositive"]
    ev["nd_percent"] = js.get("ndv_percent", js.get("nda_percent"))
    return ev


# ================================================================================================ resuming
def _read_marker(folder: Path):
    try:
        m = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == _MARKER_FORMAT else None


def _finished(task: PairTask):
    """The record of ``task``'s result folder if it holds this very task's finished result (same fingerprint, and
    written by this batch call when the task replaces an earlier result), else None."""
    marker = _read_marker(Path(task.out)) if (Path(task.out) / "result.json").is_file() else None
    if marker is None or marker.get("fingerprint") != task.fingerprint:
        return None
    if task.replace and marker.get("run") != task.run_id:
        return None
    rec = dict.fromkeys(SUMMARY_COLUMNS)
    rec.update({k: v for k, v in (marker.get("record") or {}).items() if k in rec})
    rec.update(row=task.row, id=task.id, output=task.out,
               status="ok" if task.run_id and marker.get("run") == task.run_id else "skipped")
    return rec


def _disk_state(task: PairTask, overwrite: bool):
    """``("skip", record)`` for a finished pair, ``("run", replace)`` or ``("fail", message)``."""
    d = Path(task.out)
    if not d.exists():
        return "run", False
    if not d.is_dir():
        return "fail", f"{task.out!r} is a file, not a result folder"
    if not any(d.iterdir()):
        return "run", False
    if not (d / "result.json").is_file():
        return "fail", (f"folder {task.out!r} holds files that are not a classreg result; move them away or choose "
                        f"another output folder")
    marker = _read_marker(d)
    if marker is None:
        if overwrite:
            return "run", True
        return "fail", (f"folder {task.out!r} holds a classreg result that classreg batch did not write; pass "
                        f"overwrite=True (--overwrite) to replace it, or choose another output folder")
    if marker.get("fingerprint") == task.fingerprint and not overwrite:
        return "skip", _finished(task)
    if marker.get("fingerprint") != task.fingerprint:
        logger.info("pair %s: its inputs or options changed since %s; running it again", task.id,
                    marker.get("finished"))
    return "run", True


# ================================================================================================ summary
def _summary_value(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(_jsonable(v), sort_keys=True)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_summary(out: Path, rows: list) -> tuple:
    """Write ``out/summary.csv`` (and ``out/summary.parquet`` when pyarrow is installed), each atomically.

    Parameters
    ----------
    out : Path
        The batch's output folder.
    rows : list of dict
        Summary records (:data:`SUMMARY_COLUMNS`); dicts and lists are written as JSON text.

    Returns
    -------
    csv_path : Path
    parquet_path : Path or None
    """
    from .io import atomic_output

    clean = [{k: _summary_value(r.get(k)) for k in SUMMARY_COLUMNS} for r in rows]
    csv_path = out / _SUMMARY[0]
    with atomic_output(csv_path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(SUMMARY_COLUMNS))
            w.writeheader()
            w.writerows(clean)
    pq_path = None
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return csv_path, None
    cols = {}
    for k in SUMMARY_COLUMNS:
        vals = [r[k] for r in clean]
        kinds = {type(v) for v in vals if v is not None}
        if kinds <= {int, float} and float in kinds:
            vals = [None if v is None else float(v) for v in vals]
        elif len(kinds) > 1:
            vals = [None if v is None else str(v) for v in vals]
        cols[k] = vals
    pq_path = out / _SUMMARY[1]
    with atomic_output(pq_path) as tmp:
        pq.write_table(pa.table(cols), tmp)
    return csv_path, pq_path


# ================================================================================================ the batch
def batch(pairs, out, *, solver: str = "demons", options=None, client=None, scheduler: str | None = None,
          workers: int | None = None, threads_per_worker: int = 1, memory_per_worker: float | None = None,
          retries: int = 2, overwrite: bool = False, qc: bool = True, save_extras: bool = False, base=None,
          progress: bool = False, callback=None) -> BatchReport:
    """Register many pairs on Dask, one task per row, resumably.

    Parameters
    ----------
    pairs : str, os.PathLike, pandas.DataFrame or sequence of dict
        The pairs table (module docstring: columns ``fixed``, ``moving``, optional ``id``, ``solver``,
        ``fixed_labels``, ``moving_labels`` and solver options).
    out : str or os.PathLike
        Output folder (created): ``OUT/<id>/`` per pair, ``OUT/summary.csv`` (+ ``.parquet`` with pyarrow).
    solver : str
        Solver, or chain such as ``"affine+demons"``, of rows without a ``solver`` cell.
    options : dict, optional
        Option values (``{"iterations": (20, 10, 5)}``, or strings as in a cell) for rows whose cell is empty.
    client : distributed.Client, optional
        Run on this client's cluster (it is left running).
    scheduler : str, optional
        Address of a running scheduler (``"tcp://host:8786"``) to connect to instead.
    workers : int, optional
        Workers of the embedded LocalCluster (without ``client``/``scheduler``); default: as many as the cores
        allow at ``threads_per_worker`` each and the memory allows for the largest pair.
    threads_per_worker : int
        CPU threads each pair's solver uses (its ``threads`` option, unless a row sets it); the embedded cluster's
        workers run one pair at a time, and workers × threads never exceed the cores.
    memory_per_worker : float, optional
        MB each embedded worker may use (default: the available memory shared equally). A pair whose estimate
        (the solvers' measured copies of the larger image, plus :data:`WORKER_BASELINE_MB`) exceeds it is refused
        without running; on a given cluster the smallest worker memory limit is used.
    retries : int
        Times a pair is resubmitted after its worker died (killed, out of memory, node lost). An error of the
        registration itself is recorded, not retried.
    overwrite : bool
        Run every pair again, replacing earlier results (also results not written by a batch).
    qc : bool
        Write ``qc.png`` (needs matplotlib) into each result folder.
    save_extras : bool
        Also write each result's ``extras.npz``.
    base : str or os.PathLike, optional
        Folder of relative paths (default: the CSV file's folder, or the working directory).
    progress : bool
        Show a progress bar over the pairs (tqdm).
    callback : callable, optional
        Receives a :class:`classreg.Event` per finished pair (stage ``"iteration"``, ``extra`` with the row, id and
        status); raise :class:`classreg.StopRegistration` to stop the batch (finished pairs are kept).

    Returns
    -------
    BatchReport

    Raises
    ------
    ImportError
        dask.distributed is not installed (the message says how to install it).
    BatchTableError
        A cell does not fit its column (named with the row), before any work.
    ValueError
        workers × threads_per_worker exceed the cores, or ``out`` is a file.
    """
    from .progress import Progress, StopRegistration

    dist = _require_distributed()
    t_start = time.perf_counter()
    if int(retries) < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    out = Path(os.fspath(out))
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; give a folder for the results")
    rows, base_dir, source = read_pairs(pairs, base=base)
    tasks = plan_pairs(rows, solver=solver, options=options, base=base_dir, out=out,
                       threads_per_worker=threads_per_worker, qc=qc, save_extras=save_extras, source=source)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    records: dict = {}
    todo = []
    for t in tasks:
        state, info = _disk_state(t, overwrite)
        if state == "skip":
            records[t.row] = info
        elif state == "fail":
            records[t.row] = dict(_record(t), status="failed", error=f"ResultExistsError: {info}",
                                  error_column="id", error_file=t.out)
        else:
            todo.append(dataclasses.replace(t, replace=info, run_id=run_id))
    todo = [dataclasses.replace(t, **dict(zip(("solver_estimate_mb", "estimate_mb"), estimate_memory_mb(t))))
            for t in todo]
    logger.info("batch: %d pair(s), %d finished earlier, %d to run", len(tasks), len(records) - sum(
        r["status"] == "failed" for r in records.values()), len(todo))
    report = BatchReport(rows=[])
    own_client = own_cluster = None
    stopped = False
    prog = None
    try:
        if todo:
            t_cluster = time.perf_counter()
            if client is None and scheduler is not None:
                client = own_client = dist.Client(scheduler)
            if client is None:
                from .solvers._common import available_memory_mb

                n, mem = plan_cluster(cores=_cores(), available_mb=available_memory_mb(),
                                      pair_mb=[t.estimate_mb for t in todo], n_pairs=len(todo), workers=workers,
                                      threads_per_worker=threads_per_worker, memory_per_worker=memory_per_worker)
                runnable = [t for t in todo if _refusal(t, mem) is None]
                if runnable:
                    own_cluster, client = _start_cluster(dist, min(n, len(runnable)), mem)
                    own_client = client
                    report.workers = min(n, len(runnable))
            else:
                mem = _cluster_memory_mb(client) if memory_per_worker is None else float(memory_per_worker)
                report.workers = len(client.scheduler_info().get("workers", {}))
            report.cluster_seconds = time.perf_counter() - t_cluster
            for t in todo:
                why = _refusal(t, mem)
                if why is not None:
                    records[t.row] = dict(_record(t), status="refused", error=f"MemoryLimitError: {why}")
            todo = [t for t in todo if t.row not in records]
            prog = Progress("batch", callback=callback, progress=progress, total=len(todo))
            prog.emit("start", extra={"pairs": len(tasks), "to_run": len(todo), "workers": report.workers})
            stopped = _run_all(dist, client, todo, records, int(retries), prog, out, tasks,
                               window=report.workers if own_cluster is not None else None)
            if not stopped:
                prog.emit("done", extra={"pairs": len(tasks)})
    except StopRegistration:  # the callback stopped the batch at its start
        stopped = True
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        if prog is not None:
            prog.close()
        for t in tasks:
            if t.row not in records:
                records[t.row] = dict(_record(t), status="not run", error="the batch stopped before this pair ran")
        report.rows = [records[t.row] for t in tasks]
        report.summary_csv, report.summary_parquet = write_summary(out, report.rows)
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
        report.seconds = time.perf_counter() - t_start
        report.stopped = stopped
    return report


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cluster_memory_mb(client) -> float | None:
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info().get("workers", {}).values()]
    limits = [v for v in limits if v]
    return min(limits) / 2**20 if limits else None


def _start_cluster(dist, n: int, memory_mb):
    """A LocalCluster of ``n`` single-task worker processes: a pair never shares its process (its peak memory is
    its own), a worker holds no queued pair (a lost worker loses one pair) and reports the loss at once
    (``allowed-failures`` 0: :func:`batch` resubmits), memory is never spilled or paused, only capped, and no
    profiler samples the workers."""
    import dask

    cfg = {"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 1.0,
           "distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
           "distributed.worker.memory.pause": False,
           # a pair is one long call: the statistical profiler (a stack sample every 10 ms) only costs CPU there
           "distributed.worker.profile.enabled": False}
    with dask.config.set(cfg):
        cluster = dist.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                    memory_limit=int(memory_mb * 2**20) if memory_mb else 0)
        try:
            client = dist.Client(cluster)
        except BaseException:
            cluster.close()
            raise
    logger.info("batch: LocalCluster of %d worker(s)%s; dashboard %s", n,
                f", {memory_mb:,.0f} MB each" if memory_mb else "", client.dashboard_link)
    return cluster, client


def _run_all(dist, client, todo, records, retries, prog, out, tasks, window=None) -> bool:
    """Submit the tasks (at most ``window`` in flight, all at once without), collect the records as they finish and
    resubmit a pair whose worker died; True if the callback stopped the batch.

    A future is released as soon as its record is read, so that a worker lost later does not make the scheduler
    recompute a finished pair (which would find its result folder and return the marker's record anyway)."""
    from distributed import KilledWorker

    from .progress import StopRegistration

    def submit(task):
        return client.submit(run_pair, task, key=f"classreg-pair-{task.id}-{uuid.uuid4().hex[:8]}", pure=False)

    queue = list(todo)
    first = len(queue) if window is None else max(int(window), 1)
    pending = {}
    for t in queue[:first]:
        pending[submit(t)] = t
    queue = queue[first:]
    done_count = 0
    last_write = time.perf_counter()
    ac = dist.as_completed(list(pending))
    try:
        for fut in ac:
            task = pending.pop(fut)
            try:
                rec = fut.result()
            except KilledWorker as exc:
                rec = None
                if task.attempt <= retries:
                    logger.info("pair %s: its worker died (attempt %d); resubmitting", task.id, task.attempt)
                    queue.insert(0, dataclasses.replace(task, attempt=task.attempt + 1))
                else:
                    rec = dict(_record(task), status="failed",
                               error=f"KilledWorker: the worker running this pair died {task.attempt} time(s) "
                                     f"(killed, out of memory, or its machine lost): {exc}")
            except Exception as exc:  # the task could not run (cancelled, not serialisable, scheduler lost)
                rec = dict(_record(task), status="failed", error=f"{type(exc).__name__}: {exc}",
                           traceback="".join(traceback.format_exception(exc)))
            fut.release()
            del fut
            if queue and (window is None or len(pending) < first):
                t = queue.pop(0)
                nf = submit(t)
                pending[nf] = t
                ac.add(nf)
            if rec is None:
                continue
            records[task.row] = rec
            done_count += 1
            if time.perf_counter() - last_write > 5.0:
                write_summary(out, [records[t.row] for t in tasks if t.row in records])
                last_write = time.perf_counter()
            prog.emit("iteration", iteration=done_count,
                      extra={"row": task.row, "id": task.id, "status": rec["status"]})
    except StopRegistration:
        for f in pending:
            f.cancel()
        logger.info("batch stopped by the callback; %d pair(s) not run", len(pending) + len(queue))
        return True
    except BaseException:
        for f in pending:
            f.cancel()
        raise
    return False
