"""``Result``: the one return type of every classreg solver."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .image import Image
from .io import atomic_output, load, save
from .transforms import (
    Affine,
    BSplineTransform,
    Chain,
    DisplacementField,
    Transform,
    load_transform,
)

__all__ = ["Result", "ResultExistsError", "check_result_folder", "load_result", "publish_folder"]

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
        ``extras.npz``. Values that are :class:`Image` objects are outputs on a grid (e.g. metamorphosis' final
        image) and are always saved, as ``<key>.nii.gz``.
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
    def save(self, directory, *, warped: bool = True, extras: bool = False, qc: bool = False,
             moving: Image | None = None, overwrite: bool = False) -> Path:
        """Write the result as the folder ``directory``, which appears only once complete.

        What is written, by kind of transform (``transform.<ext>`` maps fixed → moving points, ``inverse.<ext>``
        moving → fixed; every file is readable by SimpleITK, ANTs and ITK-SNAP):

        ========================================  ==========================================================
        result                                    transform / inverse files
        ========================================  ==========================================================
        affine, rigid (:class:`Affine`)           ``.tfm`` (ITK text; a few hundred bytes each)
        demons, LDDMM without ``init``            ``.nii.gz``: ITK displacement-field image (x, y[, z]
                                                  components in mm, float32, gzip)
        demons, LDDMM with ``init`` (a Chain)     ``.h5``: ITK composite (displacement field + affine; the
                                                  field float32, HDF5 shuffle + gzip)
        B-spline without ``init``                 ``transform.tfm`` (ITK B-spline); no inverse file
        B-spline with ``init`` (a Chain)          ``transform.h5`` (affine + B-spline); no inverse file
        points (:func:`register_points`)          ``.npz`` (classreg's point deformation; GP coefficients)
        ========================================  ==========================================================

        Besides: ``warped.nii.gz`` (the moving image on the fixed grid, its own dtype, gzip; unless
        ``warped=False``), ``params.json`` (every resolved option, seed, backend, versions), ``history.csv``
        (one row per iteration: level, iteration, metric, similarity, step, elapsed, solver extras),
        ``result.json`` (convergence, metrics, timings, the fixed grid's geometry and the list of files: the
        manifest, written last), ``<key>.nii.gz`` for every Image in ``extras``, ``qc.png`` with ``qc=True`` and
        ``extras.npz`` (the other extras) with ``extras=True``.
        Dense fields are written as float32 (4 bytes × ndim per voxel before compression) when the registration
        ran in float32 (``params["dtype"]``, the default); a registration run with ``dtype=np.float64`` keeps them
        float64 unless float32 holds them exactly. Either way they are compressed and read by SimpleITK's ``ReadTransform`` / ``ReadImage``,
        ITK and ANTs as any ITK transform or displacement-field image (the ``.h5`` keeps ITK's
        ``DisplacementFieldTransform_double`` entry; its compression needs h5py, without which the ``.h5`` is
        SimpleITK's float64, uncompressed). Sizes are dominated by the dense fields (measured with ``classreg
        demo``, docs/notes/qc.md): the 2-D demo (256 × 256 pixels) writes 1.37 MB, of which ``transform.h5`` and
        ``inverse.h5`` are 0.42 MB each; the 3-D demo (94 × 116 × 98 voxels at 2 mm) 23.6 MB, of which the two
        ``.h5`` files are 10.0 MB each (about 9.4 bytes per voxel; a smooth field compresses to ~80 % of its raw
        float32 size, far less where it is zero); ``qc.png`` 0.4-0.5 MB; everything else below 1.2 MB.

        Everything is written into a hidden ``.<name>.partial-<pid>-*`` folder beside ``directory`` that is renamed
        into place at the end, so a result folder never mixes two runs and an interrupted run leaves only a hidden
        partial folder (removed by the next save once its process is gone), never a folder that looks complete.

        Parameters
        ----------
        directory : str or os.PathLike
            The result folder: new, empty, or (with ``overwrite``) holding an earlier classreg result.
        warped : bool
            Also write the warped moving image.
        extras : bool
            Also write ``extras.npz`` (solver internals such as demons' stationary velocities or LDDMM's initial
            momentum: often larger than the transform itself, so opt-in).
        qc : bool
            Also write ``qc.png``, the QC figure of :func:`classreg.qc.qc_figure` (needs matplotlib; about 1 s).
            Off by default in Python — a library call writes what it is asked to — while the command line writes it
            unless ``--no-qc``. Point-set results: use :func:`classreg.qc.qc_points`.
        moving : Image, optional
            The moving image, for the QC figure's "before" panels (without it they are left empty).
        overwrite : bool
            Replace an earlier classreg result in ``directory`` (the whole set). A folder holding other files is
            never replaced.

        Raises
        ------
        ResultExistsError
            ``directory`` holds a result and ``overwrite`` is False, or holds files that are not a classreg result.
        ImportError
            ``qc=True`` without matplotlib (raised before anything is written).
        """
        if qc:
            if self.reference is None:
                raise ValueError("qc=True needs an image registration's result (this one has no fixed grid); for "
                                 "point sets use classreg.qc.qc_points(result, source, target, path)")
            from .qc import _pyplot

            _pyplot()  # ImportError naming the fix, before any file is written
        return publish_folder(directory, lambda d: _fill(self, d, warped, extras, qc=qc, moving=moving),
                              overwrite=overwrite)


class ResultExistsError(FileExistsError, ValueError):
    """The target folder of :meth:`Result.save` already holds a result (or other files)."""


def check_result_folder(directory, *, overwrite: bool = False) -> Path:
    """Check before any work that ``directory`` can receive a result; returns it as a Path.

    A new or empty folder is fine; one holding a classreg result needs ``overwrite``; one holding other files, or a
    path under a file, or a parent that cannot be created is refused with the reason.
    """
    d = Path(os.fspath(directory))
    if d.exists() and not d.is_dir():
        raise ResultExistsError(f"cannot write a result to {str(d)!r}: it is a file, not a folder")
    if d.is_dir():
        entries = [p.name for p in d.iterdir()]
        if entries and not (d / "result.json").is_file():
            raise ResultExistsError(
                f"folder {str(d)!r} holds files that are not a classreg result ({', '.join(sorted(entries)[:5])}"
                f"{', ...' if len(entries) > 5 else ''}); choose a new or empty folder")
        if entries and not overwrite:
            raise ResultExistsError(f"folder {str(d)!r} already holds a classreg result; pass overwrite=True "
                                    f"(--overwrite on the command line) to replace it, or choose another folder")
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ResultExistsError(f"cannot write a result to {str(d)!r}: a part of its parent path is a file") from None
    if not os.access(d.parent, os.W_OK):
        raise PermissionError(f"cannot write a result to {str(d)!r}: folder {str(d.parent)!r} is not writable")
    return d


def publish_folder(directory, fill, *, overwrite: bool = False) -> Path:
    """Create the result folder ``directory`` complete or not at all: ``fill(tmp)`` writes the files into a hidden
    ``.<name>.partial-<pid>-*`` folder beside it, which is then renamed into place (replacing, with ``overwrite``,
    an earlier classreg result as a whole). Checks as :func:`check_result_folder`."""
    final = check_result_folder(directory, overwrite=overwrite)
    _remove_stale_partials(final)
    d = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        fill(d)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(d, 0o777 & ~umask)  # mkdtemp's 0700 would make the result private
        if final.exists() and any(final.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.replaced-{os.getpid()}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(d, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(d, final)  # a missing or empty folder is replaced by the complete one
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return final


def _remove_stale_partials(final: Path) -> None:
    """Remove the hidden partial folders of interrupted saves to ``final`` whose process has ended."""
    for p in final.parent.glob(f".{final.name}.partial-*"):
        try:
            pid = int(p.name[len(final.name) + 10:].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


def _fill(result: "Result", d: Path, warped: bool, extras: bool = False, *, qc: bool = False, moving=None) -> None:
    """Write the files of a result into the (private, empty) folder ``d``; result.json last."""
    # dense fields on disk: float32 when the registration ran in float32, else as precise as the field is
    fdt = np.float32 if str((result.params or {}).get("dtype", "")) == "float32" else None
    files = {"transform": _save_transform(result.transform, d / "transform", fdt)}
    if result.inverse is not None:
        files["inverse"] = _save_transform(result.inverse, d / "inverse", fdt)
    if warped and result.warped is not None:
        save(result.warped, d / "warped.nii.gz")
        files["warped"] = "warped.nii.gz"
    images = {k: v for k, v in (result.extras or {}).items() if isinstance(v, Image)}
    for key, img in images.items():  # solver outputs on a grid (e.g. metamorphosis' final image): always written
        save(img, d / f"{key}.nii.gz")
        files[f"image:{key}"] = f"{key}.nii.gz"
    arrays = {k: v for k, v in (result.extras or {}).items() if k not in images}
    if extras and arrays:
        files["extras"] = _save_extras(d / "extras.npz", arrays)
    _write_text(d / "params.json", json.dumps(_jsonable(result.params), indent=2, sort_keys=True))
    _write_history(d / "history.csv", result.history)
    files["params"] = "params.json"
    files["history"] = "history.csv"
    if qc:
        from .qc import qc_figure

        qc_figure(result, moving, d / "qc.png")
        files["qc"] = "qc.png"
    meta = {
        "format": _FORMAT,
        "converged": bool(result.converged),
        "stop_reason": result.stop_reason,
        "metrics": _jsonable(result.metrics),
        "timings": _jsonable(result.timings),
        "files": files,
        "reference": _geometry(result.reference),
    }
    _write_text(d / "result.json", json.dumps(meta, indent=2, sort_keys=True))


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
    missing = [name for name in files.values() if not (d / name).is_file()]
    if missing:
        raise ValueError(f"directory {str(d)!r} holds an incomplete classreg result: {', '.join(missing)} missing")
    transform = load_transform(d / files["transform"])
    inverse = load_transform(d / files["inverse"]) if "inverse" in files else None
    if isinstance(transform, DisplacementField) and isinstance(inverse, DisplacementField):
        transform = DisplacementField(transform.image, inverse=inverse)
    warped = load(d / files["warped"]) if "warped" in files else None
    params = json.loads((d / files["params"]).read_text())
    history = _read_history(d / files["history"])
    extras = _load_extras(d / files["extras"]) if "extras" in files else {}
    for key, name in files.items():
        if key.startswith("image:"):
            extras[key[len("image:"):]] = load(d / name)
    ref = meta.get("reference")
    reference = None
    if ref is not None:
        # geometry only: the fixed image's data is not saved (its grid is what apply() needs)
        reference = Image(np.zeros(ref["shape"], dtype=np.uint8), ref["spacing"], ref["origin"], ref["direction"])
    return Result(transform=transform, inverse=inverse, warped=warped, history=history,
                  converged=meta["converged"], stop_reason=meta["stop_reason"], params=params,
                  metrics=meta["metrics"], timings=meta["timings"], reference=reference, extras=extras)


# ---------------------------------------------------------------------------------------------- helpers
def _save_transform(t: Transform, stem: Path, field_dtype=None) -> str:
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
    if isinstance(t, (DisplacementField, Chain)):
        t.save(stem.parent / name, dtype=field_dtype)
    else:
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
