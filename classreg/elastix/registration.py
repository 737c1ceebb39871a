"""``classreg-elastix``: elastix's command line on classreg's engine (ELASTIX.md §2, §7, §8).

Arguments are read as elastix reads them (pairs ``-key value``, ``-p`` repeatable, the first of any other key wins),
the exit codes are elastix's (0 ok, 1 runtime error, 255 no ``-p``, 254 no or missing ``-out``) and so are the
output files: ``TransformParameters.<k>.txt``, ``result.<k>.<fmt>``, ``IterationInfo.<k>.R<r>.txt`` and
``elastix.log``. Two things differ on purpose: every output is written to a private folder inside ``-out`` and
moved to its final name only when complete, and outputs of an earlier run found in ``-out`` are moved into a
``previous-run-<time>`` sub-folder first, so a result folder never mixes two runs and nothing is lost.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._version import __version__
from .components import Stage, erode_mask, erode_radius, plan_stage
from .parameters import ParameterFileError, ParameterLookup, read_parameter_file

__all__ = ["main", "run_elastix", "StageResult", "ELASTIX_VERSION"]

#: the elastix release whose behaviour classreg-elastix reproduces (ELASTIX.md)
ELASTIX_VERSION = "5.2.0"

HINT = 'Use "elastix --help" for information about elastix-usage.'
HELP = f"""elastix version: {ELASTIX_VERSION} (classreg {__version__} drop-in)

elastix registers a moving image to a fixed image.
The registration-process is specified in the parameter file.
  --help, -h displays this message and exit
  --version  output version information and exit
  --extended-version  output extended version information and exit

Call elastix from the command line with mandatory arguments:
  -f        fixed image
  -m        moving image
  -out      output directory
  -p        parameter file, elastix handles 1 or more "-p"

Optional extra commands:
  -fMask    mask for fixed image
  -mMask    mask for moving image
  -t0       parameter file for initial transform
  -loglevel set the log level to "off", "error", "warning", or "info" (default),
  -priority set the process priority (accepted, no effect)
  -threads  set the maximum number of threads of elastix

The parameter-file must contain all the information necessary for elastix to run properly. classreg runs the
components of its engine (see docs/migration-elastix.md); an unsupported component stops the run with exit code 1,
naming it.
"""
LOG_LEVELS = ("off", "error", "warning", "info")
OUTPUT_PREFIXES = ("TransformParameters.", "result.", "IterationInfo.", "elastix.log", "deformationField.")


class ElastixError(RuntimeError):
    """A run-time error of classreg-elastix (exit code 1)."""


@dataclass
class StageResult:
    """What one ``-p`` stage produced."""

    index: int
    stage: Stage
    result: object                    # classreg.Result
    transform: object                 # the total fixed → moving transform after this stage (chain included)
    parameter_map: dict               # the TransformParameters map written for this stage
    files: list = field(default_factory=list)


# ================================================================================================ argument parsing
def parse_arguments(argv, stderr) -> tuple[dict, list]:
    """elastix's pairwise parsing: ``({key: value}, [parameter files])``; a trailing odd argument is ignored."""
    args: dict = {}
    params: list = []
    for i in range(0, len(argv) - 1, 2):
        key, value = argv[i], argv[i + 1]
        if key == "-p":
            params.append(value)
            continue
        if key == "-out" and not value.endswith(("/", "\\")):
            value += "/"
        if key in args:
            stderr.write(f"WARNING!\nArgument {key}is only required once.\nArguments {key} {value}are ignored\n")
        else:
            args[key] = value
    return args, params


def first_image_argument(args: dict, key: str):
    """``-f0`` if given, else ``-f`` (elastix's rule for image arguments)."""
    return args.get(f"{key}0", args.get(key))


# ================================================================================================ the log
class Log:
    """elastix.log (and stdout, as elastix echoes its log): plain text with elastix's markers and prefixes."""

    def __init__(self, path: Path, level: str = "info", stdout=None):
        self.path = path
        self.level = level
        self.stdout = stdout
        self._f = open(path, "w", encoding="utf-8")

    def write(self, text: str, kind: str = "info") -> None:
        self._f.write(text + "\n")
        self._f.flush()
        rank = {"error": 1, "warning": 2, "info": 3}[kind]
        if self.stdout is not None and rank <= LOG_LEVELS.index(self.level):
            self.stdout.write(text + "\n")

    def close(self) -> None:
        self._f.close()


# ================================================================================================ running
def _load_inputs(args: dict):
    from ..io import load

    fixed_path, moving_path = first_image_argument(args, "-f"), first_image_argument(args, "-m")
    if fixed_path is None or moving_path is None:
        raise ElastixError(f"ERROR: no {'fixed' if fixed_path is None else 'moving'} image given "
                           f"(-{'f' if fixed_path is None else 'm'})")
    for key in ("-f1", "-m1", "-fMask1", "-mMask1", "-fp", "-mp"):
        if key in args:
            raise ElastixError(f"ERROR: {key} (multi-image or point-set registration) is not supported by classreg "
                               f"yet")

    def read(path, what):
        try:
            return read_scalar_image(path) if "image" in what else load(path)
        except (OSError, ValueError) as exc:
            raise ElastixError(f"ERROR: could not read the {what} {path!r}: {exc}") from None

    fixed = read(fixed_path, "fixed image")
    moving = read(moving_path, "moving image")
    fmask = args.get("-fMask0", args.get("-fMask"))
    mmask = args.get("-mMask0", args.get("-mMask"))
    fmask = read(fmask, "fixed mask") if fmask else None
    mmask = read(mmask, "moving mask") if mmask else None
    if fixed.ndim != moving.ndim:
        raise ElastixError(f"ERROR: the fixed image is {fixed.ndim}-D and the moving image {moving.ndim}-D")
    return fixed, moving, fmask, mmask


def read_scalar_image(path):
    """Read an image as elastix does (ITK's reader into a float image): RGB(A) and other multi-component pixels
    become their luminance (ITK ``ConvertPixelBuffer``), so a colour PNG registers as it does in elastix."""
    import SimpleITK as sitk

    from ..image import Image
    from ..io import load

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        components = reader.GetNumberOfComponents()
    except RuntimeError:
        components = 1  # let classreg.load name the problem
    if components == 1:
        return load(path).astype(np.float32)
    try:  # classreg.load refuses true colour; elastix registers its luminance
        return Image.from_sitk(sitk.ReadImage(str(path), sitk.sitkFloat32))
    except RuntimeError as exc:
        raise ValueError(f"{path!r}: could not read it as a scalar image ({exc})") from None


def _masks(fixed, moving, fmask, mmask, erode, radius=1):
    from ..image import Image

    out = []
    for mask, image, name, er in ((fmask, fixed, "fixed", erode[0]), (mmask, moving, "moving", erode[1])):
        if mask is None:
            out.append(None)
            continue
        arr = np.asarray(mask.array) != 0
        if er:
            arr = erode_mask(arr, radius)
        if not arr.any():
            raise ElastixError(f"ERROR: the {name} mask is empty{' after erosion (ErodeMask)' if er else ''}: "
                               f"{int((np.asarray(mask.array) != 0).sum())} voxels before erosion; set "
                               f"(Erode{name.capitalize()}Mask \"false\") or give a larger mask")
        out.append(Image(arr.astype(np.uint8), spacing=mask.spacing, origin=mask.origin, direction=mask.direction))
    return out


def _initial_affine(total, stage: Stage, fixed, moving):
    """The ``init`` of register_affine/register_bspline for this stage."""
    from ..transforms import Affine, Chain

    if total is not None:
        t = total.simplified() if isinstance(total, Chain) else total
        if not isinstance(t, Affine):
            raise ElastixError("ERROR: classreg cannot yet start a registration stage from a non-affine initial "
                               f"transform ({type(t).__name__}); run the deformable stage last")
        return t
    if stage.init_method == "origins":
        return Affine.from_translation(np.asarray(moving.origin) - np.asarray(fixed.origin))
    return stage.init_method or "identity"


def _run_stage(stage: Stage, fixed, moving, fmask, mmask, total, threads):
    import classreg

    fm, mm = _masks(fixed, moving, fmask, mmask, stage.erode_masks,
                    erode_radius(stage.options.get("interpolation", "linear")))
    opts = dict(stage.options)
    if threads is not None:
        opts["threads"] = threads
    solver = getattr(classreg, f"register_{stage.solver}")
    if stage.solver in ("affine", "bspline"):
        init = _initial_affine(total, stage, fixed, moving)
        res = solver(fixed, moving, init=init, fixed_mask=fm, moving_mask=mm, **opts)
        return res, (None if isinstance(init, str) else init)
    if stage.solver == "rigid":
        if total is not None:
            raise ElastixError("ERROR: classreg:rigid runs a global search from scratch; it cannot follow an "
                               "initial transform")
        return solver(fixed, moving, fixed_mask=fm, moving_mask=mm, **opts), None
    return solver(fixed, moving, init=total, fixed_mask=fm, moving_mask=mm, **opts), total


def _stage_transform(stage: Stage, result, total, init):
    """The transform of this stage alone (what its TransformParameters file holds) and the new total.

    The solvers return ``T_stage ∘ init`` (a Chain starting with the parts of ``init``, the transform object they
    were given, or one Affine when everything is affine); the stage's own part is what follows ``init``.
    """
    from ..transforms import Affine, Chain

    t = result.transform
    if stage.solver in ("affine", "rigid"):
        full = t.simplified() if isinstance(t, Chain) else t
        if total is None:
            return full, full
        init = total.simplified() if isinstance(total, Chain) else total
        own = full.compose(init.inverse())
        own = own.simplified() if isinstance(own, Chain) else own
        if not isinstance(own, Affine):  # pragma: no cover - affine solvers compose affines
            raise ElastixError(f"ERROR: the {stage.solver} stage did not produce an affine transform")
        return own, Chain([total, own])
    parts = list(t.transforms) if isinstance(t, Chain) else [t]
    before = [] if init is None else (list(init.transforms) if isinstance(init, Chain) else [init])
    if len(before) == 1 and isinstance(before[0], Affine) and (len(parts) == 1 or parts[0] is not before[0]) and \
            np.allclose(before[0].homogeneous, np.eye(before[0].ndim + 1)):
        before = []  # register_bspline leaves an identity initial transform out of its result
    if len(parts) <= len(before) or any(a is not b for a, b in zip(parts, before)):
        raise ElastixError(f"ERROR: the {stage.solver} stage merged its initial transform into its result; it "
                           "cannot be written as one elastix stage after that initial transform")
    rest = parts[len(before):]
    own = rest[0] if len(rest) == 1 else Chain(rest)
    return own, own if total is None else Chain([total, own])


def _dense(transform, fixed):
    """Any transform as a displacement field on the fixed grid (for DeformationFieldTransform files)."""
    from ..transforms import DisplacementField

    if isinstance(transform, DisplacementField) and transform.image.shape[:fixed.ndim] == fixed.shape:
        return transform
    pts = fixed.grid_points().reshape(-1, fixed.ndim)
    disp = transform.map_points(pts) - pts
    return DisplacementField.from_array(disp.reshape(*fixed.shape, fixed.ndim).astype(np.float32), fixed)


def _stage_map(stage: Stage, own, fixed, lookup: ParameterLookup, field_path, field_name) -> dict:
    """The TransformParameters map of one stage: transform part, fixed-image geometry and resample settings."""
    from ..transforms import Affine, BSplineTransform
    from .transform_files import affine_stage_map_from_affine as affine_map
    from .transform_files import (
        bspline_stage_map,
        displacement_stage_map,
        geometry_map,
        resample_map,
    )

    if isinstance(own, Affine):
        kind = {"TranslationTransform": "translation", "EulerTransform": "rigid",
                "SimilarityTransform": "similarity"}.get(stage.transform, "affine")
        pm = affine_map(own, kind)
    elif isinstance(own, BSplineTransform):
        pm = bspline_stage_map(own, recursive=stage.transform == "RecursiveBSplineTransform")
    else:
        if field_path is None:
            raise ElastixError("ERROR: a dense (DeformationFieldTransform) result needs an output folder")
        pm = displacement_stage_map(_dense(own, fixed), field_path, file_name=field_name)
    o = stage.output
    types = tuple(lookup.get(f"{s}InternalImagePixelType", str, "float") for s in ("Fixed", "Moving"))
    pm.update(geometry_map(fixed, types))
    pm.update(resample_map(interpolator=o["interpolator"], order=o["order"], default_pixel_value=o["default_value"],
                           result_format=o["format"], result_pixel_type=o["pixel_type"], compress=o["compress"]))
    return pm


def _write_result(moving, total, pm: dict, path: Path, compress: bool) -> Path:
    """result.<k>.<fmt>: the moving image through the whole chain, exactly as transformix -in would write it."""
    from .transform_files import TransformFile
    from .transformix import transform_image, write_image

    tf = TransformFile(transform=total, parameters=pm, path=None, chain=[], maps=[pm], stages=[total],
                       ndim=moving.ndim)
    return write_image(transform_image(moving, tf), path, compress=compress)


def _iteration_info(history: list, level: int) -> str:
    rows = [r for r in history if r.get("level") == level]
    lines = ["1:ItNr\t2:Metric\t3:StepSize\t4:||Gradient||\tTime[ms]"]
    prev = None
    for r in rows:
        ms = 0.0 if prev is None else 1000.0 * (r["elapsed"] - prev)
        prev = r["elapsed"]
        g = r.get("gradient", float("nan"))
        step = r.get("step")
        lines.append(f"{r['iteration']}\t{r['metric']:.6f}\t{(step if step is not None else float('nan')):.6f}\t"
                     f"{g:.6f}\t{ms:.1f}")
    return "\n".join(lines) + "\n"


def _move_previous_outputs(out: Path) -> Path | None:
    old = [p for p in out.iterdir() if p.is_file() and p.name.startswith(OUTPUT_PREFIXES)]
    if not old:
        return None
    dest = out / time.strftime("previous-run-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = out / (time.strftime("previous-run-%Y%m%d-%H%M%S") + f"-{n}")
        n += 1
    dest.mkdir()
    for p in old:
        os.replace(p, dest / p.name)
    return dest


def run_elastix(fixed, moving, parameter_maps, out: str | os.PathLike | None, *, fixed_mask=None, moving_mask=None,
                initial_transform_file=None, threads=None, log=None, parameter_sources=None,
                out_as_typed: str | None = None) -> list:
    """Run one elastix registration (one stage per parameter map) on classreg's engine.

    Parameters
    ----------
    fixed, moving : Image
        The images (physical space).
    parameter_maps : list of mapping
        One elastix parameter map per stage (``{name: (value, ...)}``).
    out : str or path, optional
        The output folder, written as by elastix (``TransformParameters.<k>.txt`` etc.); None writes nothing.
        The string is used as typed inside ``InitialTransformParameterFileName``.
    fixed_mask, moving_mask : Image, optional
        Non-zero = inside.
    initial_transform_file : str, optional
        ``-t0``: a TransformParameters file (possibly a chain) the first stage starts from.
    threads : int, optional
        CPU threads.
    log : Log, optional
        Where elastix.log lines go.
    parameter_sources : list of str, optional
        The parameter files' names (for messages and the log).
    out_as_typed : str, optional
        The folder as the user typed it, for the file references written into later stages (default ``out``);
        the command line writes into a private folder and passes its ``-out`` here.

    Returns
    -------
    list of StageResult
    """
    from .transform_files import read_transform_file, write_transform_file

    say = log.write if log is not None else (lambda text, kind="info": None)
    sources = parameter_sources or [f"parameter map {k}" for k in range(len(parameter_maps))]
    typed = str(out if out_as_typed is None else out_as_typed)
    prefix = None if out is None else (typed if typed.endswith(("/", "\\")) else f"{typed}/")
    total = None
    previous = "NoInitialTransform"
    if initial_transform_file is not None:
        total = read_transform_file(initial_transform_file).transform
        previous = str(initial_transform_file)
    results = []
    for k, pm in enumerate(parameter_maps):
        lookup = ParameterLookup(pm, sources[k])
        stage = plan_stage(lookup, ndim=fixed.ndim, spacing=fixed.spacing, has_fixed_mask=fixed_mask is not None,
                           has_initial=total is not None, source=sources[k])
        for w in stage.warnings:
            say(w, "warning")
        say(f"Running elastix stage {k} with classreg.register_{stage.solver} "
            f"({', '.join(f'{a}={b!r}' for a, b in stage.options.items())})")
        t0 = time.perf_counter()
        result, init = _run_stage(stage, fixed, moving, fixed_mask, moving_mask, total, threads)
        own, total = _stage_transform(stage, result, total, init)
        say(f"Stage {k} took {time.perf_counter() - t0:.2f} s; final metric {result.metrics.get('metric')}")
        files = []
        field_name = f"deformationField.{k}.nii.gz"
        pm_out = _stage_map(stage, own, fixed, lookup, None if out is None else Path(out) / field_name,
                            None if prefix is None else prefix + field_name)
        for w in lookup.warnings:
            say(w, "warning")
        unused = lookup.unused()
        if unused:
            say(f"WARNING: {len(unused)} unused parameter(s) found in {sources[k]}: {', '.join(unused)}", "warning")
        if out is not None:
            if stage.output["write_transform"]:
                tp = Path(out) / f"TransformParameters.{k}.txt"
                write_transform_file(pm_out, tp, initial=previous, combine=stage.output["combine"])
                files.append(tp)
                say(f"=============== start of TransformParameterFile ===============\n{tp.read_text()}"
                    f"=============== end of TransformParameterFile ===============")
            if stage.output["write_iteration_info"]:
                for r in range(len(stage.options.get("iterations", ())) or 1):
                    files.append(_write_text(Path(out) / f"IterationInfo.{k}.R{r}.txt",
                                             _iteration_info(result.history, r)))
            if stage.output["write_result"]:
                files.append(_write_result(moving, total, pm_out, Path(out) / f"result.{k}.{stage.output['format']}",
                                           stage.output["compress"]))
            previous = f"{prefix}TransformParameters.{k}.txt"
        results.append(StageResult(k, stage, result, total, pm_out, files))
    return results


def main(argv=None, *, stdout=None, stderr=None) -> int:
    """The ``classreg-elastix`` command (elastix's flags, outputs and exit codes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    if not argv:
        stdout.write(HINT + "\n")
        return 0
    if len(argv) == 1:
        a = argv[0]
        if a in ("--help", "-help", "-h"):
            stdout.write(HELP)
        elif a == "--version":
            stdout.write(f"elastix version: {ELASTIX_VERSION}\n")
        elif a == "--extended-version":
            stdout.write(f"elastix version: {ELASTIX_VERSION}\nclassreg version: {__version__} (classreg-elastix, "
                         f"the elastix drop-in of classreg)\n")
        else:
            stdout.write(HINT + "\n")
        return 0
    args, params = parse_arguments(argv, stderr)
    level = args.get("-loglevel", "info")
    if level not in LOG_LEVELS:
        stderr.write(f"ERROR: unsupported -loglevel \"{level}\"; use one of {', '.join(LOG_LEVELS)}\n")
        return 1
    code = 0
    if not params:
        stderr.write('ERROR: No CommandLine option "-p" given!\n')
        code |= -1
    out = args.get("-out")
    if out is None:
        code = -2
        stderr.write('ERROR: No CommandLine option "-out" given!\n')
    elif not os.path.isdir(out):
        stderr.write(f'ERROR: the output directory "{out}" does not exist.\nYou are responsible for creating it.\n')
        code |= -2
    if code:
        return code % 256
    out_dir = Path(out)
    stage_dir = Path(tempfile.mkdtemp(prefix=".classreg-elastix-", dir=out_dir))
    log = Log(stage_dir / "elastix.log", level, stdout)
    status = 1
    try:
        log.write(f"elastix is started at {time.ctime()}.\n\nelastix version: {ELASTIX_VERSION} (classreg "
                  f"{__version__})\nCommand line options from ElastixMain:\n" +
                  "\n".join(f"{k}  {v}" for k, v in args.items()) +
                  "".join(f"\n-p  {p}" for p in params))
        threads = None
        if "-threads" in args:
            try:
                threads = int(args["-threads"])
            except ValueError:
                raise ElastixError(f"ERROR: -threads must be an integer, got {args['-threads']!r}") from None
        maps = []
        for p in params:
            maps.append(read_parameter_file(p))
            log.write(f"=============== start of ParameterFile: {p} ===============\n"
                      f"{Path(p).read_text(errors='replace')}\n"
                      f"=============== end of ParameterFile: {p} ===============")
        fixed, moving, fmask, mmask = _load_inputs(args)
        t0 = time.perf_counter()
        run_elastix(fixed, moving, maps, stage_dir, fixed_mask=fmask, moving_mask=mmask,
                    initial_transform_file=args.get("-t0"), threads=threads, log=log, parameter_sources=params,
                    out_as_typed=out)
        log.write(f"Total time elapsed: {time.perf_counter() - t0:.1f}s")
        status = 0
    except (ParameterFileError, ElastixError, ValueError, OSError, TypeError) as exc:
        msg = str(exc) if str(exc).startswith("ERROR") else f"ERROR: {exc}"
        log.write(msg, "error")
        stderr.write(msg + "\n")
    except KeyboardInterrupt:
        log.write("ERROR: interrupted", "error")
        stderr.write("ERROR: interrupted\n")
        status = 130
    finally:
        log.close()
        _publish(stage_dir, out_dir)
    return status


def _write_text(path: Path, text: str) -> Path:
    from ..io import atomic_output

    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)
    return path


def _publish(stage_dir: Path, out_dir: Path) -> None:
    """Move the run's complete files to their final names (header files and the log last).

    Every file in ``stage_dir`` is complete (each was written atomically there); a file being written when the run
    stopped is still in a private sub-folder and is dropped. As in elastix, the files of the stages that finished
    before an error are kept.
    """
    try:
        _move_previous_outputs(out_dir)
        files = sorted((p for p in stage_dir.iterdir() if p.is_file()),
                       key=lambda p: (p.name == "elastix.log", p.suffix in (".mhd", ".nhdr")))
        for p in files:
            os.replace(p, out_dir / p.name)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
