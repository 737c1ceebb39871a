"""``Result``: the one return type of every classreg solver."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .image import Image
from .io import atomic_output, load, save
from .transforms import Affine, BSplineTransform, Chain, DisplacementField, Transform, load_transform

__all__ = ["Result", "load_result"]

_FORMAT = "classreg-result-1"


@dataclass(frozen=True)
class Result:
    """Outcome of a registration (image or point set), identical in shape for every solver.

    Attributes
    ----------
    transform : Transform
        Fixed (reference) physical point → moving physical point: the pull-back used to resample the moving image
        onto the fixed grid (ITK/elastix convention).
    inverse : Transform or None
        Moving → fixed. Diffeomorphic solvers provide it from the flow; otherwise ``transform.inverse()``.
    warped : Image or None
        The moving image resampled onto the fixed grid.
    history : list of dict
        Per-iteration records (level, iteration, metric, regularization, step, elapsed and solver extras).
    converged : bool
        Whether the solver's own convergence test ended the run (not an iteration cap or a callback).
    stop_reason : str
        Human-readable reason the run ended.
    params : dict
        Every resolved parameter, including seed, backend, thread count and library versions.
    metrics : dict
        Final values: similarity, regulariser and solver-specific quantities (e.g. ``path_length``).
    timings : dict
        Seconds per phase (``total`` at least).
    reference : Image or None
        The fixed image (its grid is the output grid of :meth:`apply`).
    extras : dict
        Solver-specific arrays (e.g. the velocity of each demons piece, an LDDMM initial momentum); saved in
        ``extras.npz``.
    """

    transform: Transform
    inverse: Transform | None = None
    warped: Image | None = None
    history: list = field(default_factory=list)
    converged: bool = False
    stop_reason: str = ""
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    reference: Image | None = None
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.transform, Transform):
            raise TypeError(f"transform must be a classreg Transform, got {type(self.transform).__name__}")
        if self.inverse is not None and not isinstance(self.inverse, Transform):
            raise TypeError(f"inverse must be a classreg Transform or None, got {type(self.inverse).__name__}")

    def apply(self, image: Image, *, interpolation: str = "linear", default_value: float = 0.0) -> Image:
        """Bring moving-space data into fixed space (resampled on the fixed grid).

        Use ``interpolation="label"`` (or ``"nearest"``) for label maps.
        """
        from .resample import resample

        if self.reference is None:
            raise ValueError("this Result has no reference grid (a point-set registration?); use "
                             "classreg.resample(image, result.transform, reference=...)")
        return resample(image, self.transform, reference=self.reference, interpolation=interpolation,
                        default_value=default_value)

    def apply_points(self, points) -> np.ndarray:
        """Map **moving-space** physical points (N, ndim), (x, y[, z]) mm, into **fixed space**.

        This is the direction that matches :meth:`apply` (data follows the moving image onto the fixed image).
        It uses the inverse transform. To map fixed-space points into moving space (what transformix ``-def``
        does), call ``result.transform.map_points(points)``.
        """
        inv = self.inverse if self.inverse is not None else self.transform.inverse()
        return inv.map_points(points)

    # ------------------------------------------------------------------ persistence
    def save(self, directory, *, warped: bool = True) -> Path:
        """Write the result into ``directory`` (created if needed); every file is written atomically.

        Files: ``transform.<ext>`` and ``inverse.<ext>`` (ITK .tfm for an affine, a displacement-field .nii.gz,
        an ITK .h5 composite for a chain, ITK .tfm for a B-spline — all readable by SimpleITK/ANTs), ``warped.nii.gz``, ``params.json``,
        ``history.csv`` and ``result.json`` (convergence, metrics, timings, reference grid).
        """
        d = Path(os.fspath(directory))
        d.mkdir(parents=True, exist_ok=True)
        files = {"transform": _save_transform(self.transform, d / "transform")}
        if self.inverse is not None:
            files["inverse"] = _save_transform(self.inverse, d / "inverse")
        if warped and self.warped is not None:
            save(self.warped, d / "warped.nii.gz")
            files["warped"] = "warped.nii.gz"
        if self.extras:
            files["extras"] = _save_extras(d / "extras.npz", self.extras)
        _write_text(d / "params.json", json.dumps(_jsonable(self.params), indent=2, sort_keys=True))
        _write_history(d / "history.csv", self.history)
        files["params"] = "params.json"
        files["history"] = "history.csv"
        meta = {
            "format": _FORMAT,
            "converged": bool(self.converged),
            "stop_reason": self.stop_reason,
            "metrics": _jsonable(self.metrics),
            "timings": _jsonable(self.timings),
            "files": files,
            "reference": _geometry(self.reference),
        }
        _write_text(d / "result.json", json.dumps(meta, indent=2, sort_keys=True))
        return d


def load_result(directory) -> Result:
    """Read a result written by :meth:`Result.save`."""
    d = Path(os.fspath(directory))
    meta_path = d / "result.json"
    if not meta_path.is_file():
        raise ValueError(f"directory {str(d)!r} holds no classreg result (result.json missing)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{str(meta_path)!r}: unknown result format {meta.get('format')!r}")
    files = meta["files"]
    transform = load_transform(d / files["transform"])
    inverse = load_transform(d / files["inverse"]) if "inverse" in files else None
    if isinstance(transform, DisplacementField) and isinstance(inverse, DisplacementField):
        transform = DisplacementField(transform.image, inverse=inverse)
    warped = load(d / files["warped"]) if "warped" in files else None
    params = json.loads((d / files["params"]).read_text())
    history = _read_history(d / files["history"])
    extras = _load_extras(d / files["extras"]) if "extras" in files else {}
    ref = meta.get("reference")
    reference = None
    if ref is not None:
        # geometry only: the fixed image's data is not saved (its grid is what apply() needs)
        reference = Image(np.zeros(ref["shape"], dtype=np.uint8), ref["spacing"], ref["origin"], ref["direction"])
    return Result(transform=transform, inverse=inverse, warped=warped, history=history,
                  converged=meta["converged"], stop_reason=meta["stop_reason"], params=params,
                  metrics=meta["metrics"], timings=meta["timings"], reference=reference, extras=extras)


# ---------------------------------------------------------------------------------------------- helpers
def _save_transform(t: Transform, stem: Path) -> str:
    if isinstance(t, Affine):
        name = stem.name + ".tfm"
    elif isinstance(t, DisplacementField):
        name = stem.name + ".nii.gz"
    elif isinstance(t, BSplineTransform):
        name = stem.name + ".tfm"
    elif isinstance(t, Chain):
        name = stem.name + (".tfm" if all(isinstance(p, Affine) for p in t.transforms) else ".h5")
    elif getattr(t, "file_suffix", None):  # solver-defined transforms (see transforms.register_transform_format)
        name = stem.name + t.file_suffix
    else:
        raise TypeError(f"cannot save a {type(t).__name__}: it defines no file format")
    t.save(stem.parent / name)
    return name


def _save_extras(path: Path, extras: dict) -> str:
    """Arrays and lists of arrays go to one .npz (a list ``k`` is stored as ``k__0``, ``k__1``, ...)."""
    arrays = {}
    for key, value in extras.items():
        if isinstance(value, (list, tuple)):
            for i, a in enumerate(value):
                arrays[f"{key}__{i}"] = np.asarray(a)
        else:
            arrays[key] = np.asarray(value)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path.name


def _load_extras(path: Path) -> dict:
    out: dict = {}
    with np.load(path) as z:
        for key in z.files:
            if "__" in key:
                base, idx = key.rsplit("__", 1)
                out.setdefault(base, {})[int(idx)] = z[key]
            else:
                out[key] = z[key]
    return {k: [v[i] for i in sorted(v)] if isinstance(v, dict) else v for k, v in out.items()}


def _geometry(img: Image | None):
    if img is None:
        return None
    return {"shape": list(img.shape), "spacing": list(img.spacing), "origin": list(img.origin),
            "direction": list(img.direction)}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else str(v)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return repr(x)


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text + "\n")


def _write_history(path: Path, history) -> None:
    keys: list[str] = []
    for row in history:
        for k in row:
            if k not in keys:
                keys.append(k)
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for row in history:
                w.writerow({k: _jsonable(v) for k, v in row.items()})


def _read_history(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        out.append({k: _parse_cell(v) for k, v in row.items()})
    return out


def _parse_cell(v: str):
    if v == "":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(v, v)
