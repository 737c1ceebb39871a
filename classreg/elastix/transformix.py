"""``transformix`` drop-in: apply elastix transform parameter files to images and points (ELASTIX.md §3, §11, §12).

Command line (``classreg-transformix``, or ``python -m classreg.elastix.transformix``), exactly as transformix::

    transformix -tp TransformParameters.0.txt -out outdir/ [-in moving.mhd] [-def all|points.txt] [-jac all]
                [-jacmat all] [-threads n] [-priority p] [-loglevel off|error|warning|info]

Arguments are read strictly in pairs (a trailing odd one is ignored); a repeated key keeps its first value.
Exit status: 0 ok; 255 no ``-tp`` or no action (``-in``/``-def``/``-jac``/``-jacmat``); 254 ``-out`` missing or not
an existing folder (never created); 1 a runtime error (unreadable files, unknown components, resampling). Errors while
transforming points or computing Jacobians are logged and transformix continues, as elastix does.

Outputs in ``-out``: ``result.<fmt>`` (moving image resampled on the transform file's grid, cast to
``ResultImagePixelType`` by C++ ``static_cast``, i.e. truncation toward zero), ``deformationField.<fmt>`` (float
vectors ``T(x) − x``), ``spatialJacobian.<fmt>`` (det ∂T/∂x, float), ``fullSpatialJacobian.<fmt>`` (∂T_i/∂x_j, float,
dim² components, row-major per voxel), ``outputpoints.txt``, ``transformix.log``. Every file is written to a
temporary name and renamed.

The library functions (:func:`transform_image`, :func:`deformation_field`, :func:`spatial_jacobian`,
:func:`transform_points`) take a :class:`~classreg.elastix.transform_files.TransformFile`.
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._version import __version__
from ..image import Image
from ..transforms import Affine, BSplineTransform, Chain, DisplacementField, Transform
from .parameters import ParameterFileError
from .points import format_output_points, read_point_file, round_index
from .transform_files import (
    RESULT_PIXEL_TYPES,
    AddedTransform,
    NearestNeighbourDisplacementField,
    TransformFile,
    _pixel_key,
    read_transform_file,
)

__all__ = [
    "ELASTIX_COMPAT_VERSION",
    "PointsResult",
    "cast_pixels",
    "deformation_field",
    "main",
    "spatial_jacobian",
    "spatial_jacobian_points",
    "transform_image",
    "transform_points",
    "write_image",
]

#: The elastix release whose transformix behaviour this drop-in follows (reported by ``--version``).
ELASTIX_COMPAT_VERSION = "5.2.0"

#: Points per block when a transform is evaluated on a whole grid (bounds the memory of big 3-D grids).
_BLOCK = 1 << 20

_HELP = (
    "transformix version: " + ELASTIX_COMPAT_VERSION + "\n\n"
    "transformix applies a transform on an input image and/or generates a deformation field.\n"
    "The transform is specified in the transform-parameter file.\n"
    "  --help, -h displays this message and exit\n"
    "  --version  output version information and exit\n\n"
    "Call transformix from the command line with mandatory arguments:\n"
    "  -out      output directory\n"
    "  -tp       transform-parameter file, only 1\n\n"
    "Optional extra commands:\n"
    "  -in       input image to deform\n"
    "  -def      file containing input-image points; the point are transformed\n"
    "            according to the specified transform-parameter file\n"
    "            use \"-def all\" to transform all points from the input-image, which\n"
    "            effectively generates a deformation field.\n"
    "  -jac      use \"-jac all\" to generate an image with the determinant of the\n"
    "            spatial Jacobian\n"
    "  -jacmat   use \"-jacmat all\" to generate an image with the spatial Jacobian\n"
    "            matrix at each voxel\n"
    "  -loglevel set the log level to \"off\", \"error\", \"warning\", or \"info\" (default),\n"
    "  -priority set the process priority to high, abovenormal, normal (default),\n"
    "            belownormal, or idle (Windows only option)\n"
    "  -threads  set the maximum number of threads of transformix\n"
    "\nAt least one of the options \"-in\", \"-def\", \"-jac\", or \"-jacmat\" should be given.\n\n"
    "The transform-parameter file must contain all the information necessary for transformix to run properly. "
    "That includes which transform to use, with which parameters, etc. For a usable transform-parameter file, "
    "run elastix, and inspect the output file \"TransformParameters.0.txt\".\n\n"
    "This transformix is classreg-transformix (classreg " + __version__ + "), a re-implementation of elastix's "
    "transformix in Python; see docs/migration-elastix.md."
)
_HINT = 'Use "transformix --help" for information about transformix-usage.'
_LEVELS = {"info": 0, "warning": 1, "error": 2, "off": 3}


# ================================================================================================ library
def _blocks(shape: tuple):
    """Slices along the first array axis holding about ``_BLOCK`` voxels each."""
    per = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    step = max(1, _BLOCK // max(per, 1))
    for s in range(0, shape[0], step):
        yield slice(s, min(s + step, shape[0]))


def _grid_points(ref: Image, rows: slice) -> np.ndarray:
    """Physical points (k, …, ndim) of the voxels ``rows`` (first array axis) of ``ref``."""
    axes = [np.arange(rows.start, rows.stop, dtype=float)] + [np.arange(n, dtype=float) for n in ref.shape[1:]]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    a = ref.affine
    return idx @ a[:-1, :-1].T + a[:-1, -1]


def deformation_field(tf: TransformFile) -> Image:
    """``T(x) − x`` (mm, float32 vectors, components x, y[, z]) on the transform file's output grid.

    The image carries the geometry transformix writes (the file's direction even with
    ``UseDirectionCosines "false"``).
    """
    grid = tf.grid()
    ref = grid.reference()
    n = grid.ndim
    out = np.empty((*ref.shape, n), dtype=np.float32)
    for rows in _blocks(ref.shape):
        pts = _grid_points(ref, rows)
        flat = pts.reshape(-1, n)
        out[rows] = (tf.transform.map_points(flat) - flat).reshape(pts.shape)
    return grid.with_written_geometry(Image(out, ref.spacing, ref.origin, ref.direction, vector=True))


def _numeric_jacobian(t: Transform, p: np.ndarray, h: float) -> np.ndarray:
    n = p.shape[1]
    jac = np.empty((p.shape[0], n, n))
    for k in range(n):
        e = np.zeros(n)
        e[k] = h
        jac[:, :, k] = (t.map_points(p + e) - t.map_points(p - e)) / (2.0 * h)
    return jac


def _bspline_jacobian(t: BSplineTransform, p: np.ndarray) -> np.ndarray:
    from ..kernels.bspline import evaluate_with_jacobian

    n = t.ndim
    lin = (np.asarray(t.grid_direction) @ np.diag(t.grid_spacing))[:, ::-1]  # array-order grid index -> world
    w2i = np.linalg.inv(lin)
    q = (p - np.asarray(t.grid_origin)) @ w2i.T
    _, du = evaluate_with_jacobian(t.coefficients, q)  # du[:, c, d] = ∂u_c / ∂q_d
    jac = np.eye(n) + np.asarray(du, dtype=float) @ w2i
    g = np.asarray(t.grid_shape, dtype=float)
    top = g - 2.0 + 4.0 * np.spacing(g - 2.0)
    inside = np.all((q >= 1.0) & (q <= top), axis=1)
    jac[~inside] = np.eye(n)
    return jac


def spatial_jacobian_points(transform: Transform, points) -> np.ndarray:
    """∂T_i/∂x_j (N, ndim, ndim) of a fixed → moving transform at physical points (N, ndim).

    Exact for affines (the matrix) and cubic B-splines (derivative of the basis; the identity outside the valid
    region, where elastix's B-spline returns the point unchanged); chains multiply (``J_2(T_1(x)) · J_1(x)``) and
    elastix's "Add" combinations add (``J_cur + J_init − I``), as elastix's ``AdvancedCombinationTransform``.
    Displacement fields (which elastix cannot differentiate: its transformix fails on them) use central
    differences with a step of one voxel of the field grid (the smallest spacing): at the field's voxel centres this
    is the usual centred difference of the samples, and it spans the kink of linear interpolation symmetrically.
    Any other transform uses central differences with a 1e-3 mm step.
    """
    p = np.atleast_2d(np.asarray(points, dtype=float))
    n = p.shape[1]
    if isinstance(transform, Affine):
        return np.broadcast_to(transform.matrix, (p.shape[0], n, n)).copy()
    if isinstance(transform, BSplineTransform):
        return _bspline_jacobian(transform, p)
    if isinstance(transform, Chain):
        jac = None
        q = p
        parts = transform.transforms
        for k, t in enumerate(parts):
            if isinstance(t, Affine):
                jac = np.broadcast_to(t.matrix, (p.shape[0], n, n)) if jac is None else t.matrix @ jac
            else:
                jt = spatial_jacobian_points(t, q)
                jac = jt if jac is None else jt @ jac
            if k + 1 < len(parts):
                q = t.map_points(q)
        return np.array(jac)
    if isinstance(transform, AddedTransform):
        return (spatial_jacobian_points(transform.current, p) + spatial_jacobian_points(transform.initial, p)
                - np.eye(n))
    if isinstance(transform, (DisplacementField, NearestNeighbourDisplacementField)):
        return _numeric_jacobian(transform, p, float(min(transform.image.spacing)))
    return _numeric_jacobian(transform, p, 1e-3)


def spatial_jacobian(tf: TransformFile, *, full: bool = False) -> Image:
    """The spatial Jacobian of the transform on the output grid (float32).

    ``full=False``: its determinant (transformix ``-jac all``, ``spatialJacobian``); ``full=True``: the matrix
    ∂T_i/∂x_j per voxel as ndim² components in row-major order (``-jacmat all``, ``fullSpatialJacobian``).
    """
    grid = tf.grid()
    ref = grid.reference()
    n = grid.ndim
    out = np.empty((*ref.shape, n * n) if full else ref.shape, dtype=np.float32)
    for rows in _blocks(ref.shape):
        pts = _grid_points(ref, rows)
        jac = spatial_jacobian_points(tf.transform, pts.reshape(-1, n))
        if full:
            out[rows] = jac.reshape(*pts.shape[:-1], n * n)
        else:
            out[rows] = np.linalg.det(jac).reshape(pts.shape[:-1])
    img = Image(out, ref.spacing, ref.origin, ref.direction, vector=full)
    return grid.with_written_geometry(img)


def cast_pixels(values, pixel_type: str) -> np.ndarray:
    """Cast like elastix's result writer: ``static_cast<T>`` from float, i.e. truncation toward zero for integer
    types; out-of-range values wrap through a 64-bit integer as on x86 (in C++ they are undefined)."""
    dt = np.dtype(RESULT_PIXEL_TYPES[_pixel_key(pixel_type)])
    v = np.asarray(values)
    if dt.kind == "f":
        return v.astype(dt)
    t = np.trunc(v.astype(np.float64))
    t = np.clip(t, -9.2e18, 9.2e18)
    return t.astype(np.int64).astype(dt)


def _bspline_order_resample(moving: Image, transform: Transform, ref: Image, order: int, cval: float) -> np.ndarray:
    """B-spline interpolation of order 1, 2, 4 or 5 (ITK's ``BSplineInterpolateImageFunction``: mirror boundary,
    values only for continuous indices inside ``[-0.5, size − 0.5)``)."""
    from scipy import ndimage

    n = moving.ndim
    data = np.asarray(moving.numpy(), dtype=np.float64)
    coeffs = ndimage.spline_filter(data, order=order, mode="mirror") if order > 1 else data
    out = np.empty(ref.shape, dtype=np.float64)
    size = np.asarray(moving.shape, dtype=float)
    for rows in _blocks(ref.shape):
        pts = _grid_points(ref, rows)
        mapped = transform.map_points(pts.reshape(-1, n))
        idx = moving.world_to_index(mapped)
        inside = np.all((idx >= -0.5) & (idx < size - 0.5), axis=1)
        vals = np.full(idx.shape[0], cval, dtype=np.float64)
        if inside.any():
            vals[inside] = ndimage.map_coordinates(coeffs, idx[inside].T, order=order, mode="mirror",
                                                   prefilter=False)
        out[rows] = vals.reshape(pts.shape[:-1])
    return out


def transform_image(moving: Image, tf: TransformFile, *, cast: bool = True) -> Image:
    """Resample ``moving`` with the transform file as transformix ``-in`` does.

    The output grid, interpolator (``ResampleInterpolator``/``FinalBSplineInterpolationOrder``), outside value
    (``DefaultPixelValue``) come from the top file; the moving image is read as ``MovingInternalImagePixelType``
    (float), interpolated in double precision, stored as float (elastix's resampler output) and, with ``cast``,
    cast to ``ResultImagePixelType`` (default "short") by truncation toward zero.

    Returns
    -------
    Image
        On the output grid, with the geometry transformix writes.
    """
    from ..resample import resample

    if not isinstance(moving, Image):
        raise TypeError(f"moving must be a classreg.Image, got {type(moving).__name__}")
    if moving.is_vector:
        raise ValueError("transformix resamples scalar images; resample each component separately")
    if moving.ndim != tf.ndim:
        raise ValueError(f"the input image is {moving.ndim}-D but the transform is {tf.ndim}-D")
    settings = tf.resample_settings()
    grid = tf.grid()
    ref = grid.reference()
    internal = tf.lookup.get("MovingInternalImagePixelType", str, "float")
    data = moving.numpy()
    if internal.replace("_", " ") in RESULT_PIXEL_TYPES and np.dtype(
            RESULT_PIXEL_TYPES[internal.replace("_", " ")]).kind != "f":
        data = cast_pixels(data, internal)
    data = np.asarray(data, dtype=np.float32).astype(np.float64)
    direction = moving.direction if tf.use_direction_cosines else None
    mov = Image(data, moving.spacing, moving.origin, direction)
    cval = float(np.float32(settings.default_pixel_value))
    interp = settings.interpolation
    if interp in ("nearest", "linear", "bspline"):
        out = resample(mov, tf.transform, reference=ref, interpolation=interp, default_value=cval).numpy()
    else:
        out = _bspline_order_resample(mov, tf.transform, ref, settings.order, cval)
    out = np.asarray(out, dtype=np.float32)
    if cast:
        out = cast_pixels(out, settings.pixel_type)
    return grid.with_written_geometry(Image(out, ref.spacing, ref.origin, ref.direction))


@dataclass
class PointsResult:
    """Transformed points with the fields of ``outputpoints.txt`` (indices are ITK's, x first)."""

    input_index: np.ndarray
    input_point: np.ndarray
    output_index_fixed: np.ndarray
    output_point: np.ndarray
    deformation: np.ndarray
    output_index_moving: np.ndarray | None = None

    def text(self) -> str:
        """The ``outputpoints.txt`` text."""
        return format_output_points(self.input_index, self.input_point, self.output_index_fixed,
                                    self.output_point, deformation=self.deformation,
                                    output_index_moving=self.output_index_moving)


def transform_points(tf: TransformFile, points, *, is_index: bool = False, moving: Image | None = None
                     ) -> PointsResult:
    """Map fixed-space points to moving space as transformix ``-def <file>`` does.

    Parameters
    ----------
    tf : TransformFile
    points : array_like, shape (N, ndim)
        Physical points (mm), or with ``is_index`` indices of the output grid (rounded first, like elastix).
    moving : Image, optional
        The ``-in`` image: adds ``output_index_moving``.
    """
    grid = tf.grid()
    p = np.asarray(points, dtype=float).reshape(-1, grid.ndim)
    if is_index:
        input_index = round_index(p)
        input_point = grid.index_to_point(input_index) if len(p) else p
    else:
        input_point = p
        input_index = round_index(grid.point_to_index(p)) if len(p) else p.astype(np.int64)
    if len(p):
        out = tf.transform.map_points(input_point)
        out_fixed = round_index(grid.point_to_index(out))
    else:
        out, out_fixed = p.copy(), p.astype(np.int64)
    out_moving = None
    if moving is not None:
        m = moving if tf.use_direction_cosines else Image(
            np.broadcast_to(np.zeros((), np.uint8), moving.shape), moving.spacing, moving.origin)
        out_moving = round_index(m.world_to_index(out)[:, ::-1]) if len(p) else out_fixed.copy()
    deformation = (out - input_point).astype(np.float32)
    return PointsResult(np.asarray(input_index), np.asarray(input_point, dtype=float), np.asarray(out_fixed),
                        np.asarray(out, dtype=float), deformation, out_moving)


def write_image(image: Image, path, *, compress: bool = False) -> Path:
    """Write an output image atomically through SimpleITK (any format ITK writes: mhd, mha, nii[.gz], nrrd, …)."""
    from ..io import atomic_output, image_extension, save

    try:
        image_extension(path)
    except ValueError:
        import SimpleITK as sitk

        with atomic_output(path) as tmp:
            sitk.WriteImage(image.to_sitk(), str(tmp), bool(compress))
        return Path(os.fspath(path))
    return save(image, path, compress=compress)


# ================================================================================================ command line
class _Log:
    """transformix.log plus the console: info/warnings to stdout, errors to stderr (with ``ERROR:``)."""

    def __init__(self, level: str = "info"):
        self.level = _LEVELS[level]
        self.lines: list = []
        self.path: str | None = None

    def _emit(self, text: str, severity: int, stream) -> None:
        if severity < self.level or self.level == _LEVELS["off"]:
            return
        self.lines.append(text)
        print(text, file=stream, flush=True)

    def info(self, text: str) -> None:
        self._emit(text, 0, sys.stdout)

    def warning(self, text: str) -> None:
        self._emit(text, 1, sys.stdout)

    def error(self, text: str) -> None:
        if not text.startswith("ERROR"):
            text = "ERROR: " + text
        self._emit(text, 2, sys.stderr)

    def flush(self) -> bool:
        """Write the log file (atomically); False if that failed."""
        if self.path is None:
            return True
        from ..io import atomic_output

        try:
            with atomic_output(self.path) as tmp:
                Path(tmp).write_text("\n".join(self.lines) + ("\n" if self.lines else ""))
        except (OSError, ValueError, RuntimeError) as exc:  # reported, never raised
            print(f"ERROR while writing the log file {self.path}: {exc}", file=sys.stderr)
            return False
        return True


def _set_threads(value: str, log: _Log) -> None:
    try:
        n = int(value)
    except ValueError:
        log.warning(f"WARNING: -threads {value!r} is not an integer; ignored.")
        return
    if n < 1:
        log.warning(f"WARNING: -threads {n} is not positive; ignored.")
        return
    try:
        import numba

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    except ImportError:  # pragma: no cover - numba is a dependency
        pass


def _now() -> str:
    return datetime.datetime.now().strftime("%a %b %d %H:%M:%S %Y")


def _parse(args: list) -> tuple:
    """elastix's pairwise parsing: returns (argument map, last -out folder or None, log level or None on error)."""
    argmap: dict = {}
    out_folder = None
    level = "info"
    for i in range(0, len(args) - 1, 2):
        key, value = args[i], args[i + 1]
        if key == "-loglevel":
            if value not in _LEVELS:
                supported = ", ".join(f'"{k}"' for k in _LEVELS)
                print(f'ERROR: The specified log level ("{value}") is not supported. Supported levels: '
                      f'{supported}.', file=sys.stderr)
                return argmap, out_folder, None
            level = value
        elif key == "-out":
            if value and value[-1] not in "/\\":
                value += "/"
            out_folder = value
        if key not in argmap:
            argmap[key] = value
        else:
            print(f"WARNING!\nArgument {key}is only required once.\nArguments {key} {value}are ignored",
                  file=sys.stderr)
    return argmap, out_folder, level


def main(argv=None) -> int:
    """Run the transformix command line (``argv`` without the program name; default ``sys.argv[1:]``).

    Returns the exit status (0, 1, 254, 255) as elastix's transformix.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_HINT)
        return 0
    if len(args) == 1:
        if args[0] in ("-help", "--help", "-h"):
            print(_HELP)
        elif args[0] == "--version":
            print(f"transformix version: {ELASTIX_COMPAT_VERSION}")
        elif args[0] == "--extended-version":
            print(f"transformix version: {ELASTIX_COMPAT_VERSION}\nclassreg version: {__version__} "
                  f"(classreg-transformix, a drop-in re-implementation)\nPython version: {platform.python_version()}\n"
                  f"Memory address size: {64 if sys.maxsize > 2 ** 32 else 32}-bit")
        else:
            print(_HINT)
        return 0

    argmap, out_folder, level = _parse(args)
    if level is None:
        return 1
    code = 0
    if "-tp" not in argmap:
        print('ERROR: No CommandLine option "-tp" given!', file=sys.stderr)
        code |= -1
    if not any(k in argmap for k in ("-in", "-ipp", "-def", "-jac", "-jacmat")):
        print('ERROR: At least one of the CommandLine options "-in", "-def", "-jac", or "-jacmat" should be given!',
              file=sys.stderr)
        code |= -1
    log = _Log(level)
    if out_folder is not None:
        if not out_folder or not os.path.isdir(out_folder):
            print(f'ERROR: the output directory "{out_folder}" does not exist.\nYou are responsible for creating it.',
                  file=sys.stderr)
            code |= -2
        else:
            # elastix sets up (truncates) the log here, even when it then stops with 255; the log goes to the
            # first -out given, the existence check above used the last one (as in elastix)
            log.path = argmap["-out"] + "transformix.log"
            if not log.flush():
                print("ERROR while setting up the log system.", file=sys.stderr)
                code |= 1
    else:
        code = -2
        print('ERROR: No CommandLine option "-out" given!', file=sys.stderr)
    if code:
        return code & 0xFF
    try:
        return _run(argmap, log)
    finally:
        log.flush()


def _run(argmap: dict, log: _Log) -> int:
    out = argmap["-out"]
    start = time.perf_counter()
    log.info("")
    log.info(f"transformix is started at {_now()}.\n")
    log.info(f"which transformix:   {sys.argv[0] if sys.argv else 'transformix'}\n"
             f"  transformix version: {ELASTIX_COMPAT_VERSION} (classreg {__version__})\n"
             "Command line options from ElastixBase:\n"
             + "".join(f"{k}  {v}\n" for k, v in argmap.items()))
    log.info(f"transformix runs at: {socket.gethostname()}\n  {platform.system()} {platform.release()} "
             f"({platform.machine()}), with {os.cpu_count()} cores.")
    if "-threads" in argmap:
        _set_threads(argmap["-threads"], log)
    tp = argmap["-tp"]
    log.info(f'Running transformix with parameter file "{tp}".\n')
    log.info("Reading the elastix parameters from file ...\n")

    # -- set-up errors: exit 1 -----------------------------------------------------------------------------------
    try:
        tf = read_transform_file(tp, require_dimension=True)
        tf.resample_settings()  # the ResampleInterpolator and Resampler components are created in every run
        for w in tf.lookup.warnings:
            log.warning(w)
    except Exception as exc:  # noqa: BLE001 - whatever fails while setting up is elastix's exit 1
        log.error(f"{exc}".strip() or type(exc).__name__)
        log.error("ERROR: Errors occurred")
        return 1
    moving = None
    if "-in" in argmap:
        log.info("\nReading input image ...")
        try:
            from ..io import load

            moving = load(argmap["-in"])
            if moving.ndim != tf.ndim:
                raise ValueError(f"the input image {argmap['-in']!r} is {moving.ndim}-D but the transform is "
                                 f"{tf.ndim}-D")
            if moving.is_vector:
                raise ValueError(f"the input image {argmap['-in']!r} is a vector image; transformix resamples "
                                 "scalar images")
        except Exception as exc:  # noqa: BLE001 - an unreadable input image is an exit-1 error
            log.error(f"ERROR: could not read the input image: {exc}")
            log.error("ERROR: Errors occurred")
            return 1
        log.info(f"  Reading input image {argmap['-in']} done.")
    if len(tf.chain) > 1:
        log.info("  The transform is a chain of " + str(len(tf.chain)) + " transform parameter files:\n"
                 + "".join(f"    {p}\n" for p in tf.chain))

    # -- points and fields: errors are logged, transformix continues -----------------------------------------
    log.info("Transforming points ...")
    try:
        _points_step(argmap, tf, moving, out, log)
    except Exception as exc:  # noqa: BLE001 - elastix logs any failure here and continues
        log.error(f"ERROR: {exc}\nHowever, transformix continues anyway.")
    log.info("Compute determinant of spatial Jacobian ...")
    jac = argmap.get("-jac")
    if jac is None:
        log.info('  The command-line option "-jac" is not used, so no det(dT/dx) computed.')
    elif jac != "all":
        log.info(f'  WARNING: The command-line option "-jac" should be used as "-jac all",\n'
                 f'    but is specified as "-jac {jac}"\n    Therefore det(dT/dx) is not computed.')
    else:
        try:
            settings_fmt = tf.lookup.get("ResultImageFormat", str, "mhd")
            write_image(spatial_jacobian(tf), f"{out}spatialJacobian.{settings_fmt}")
            log.info("  Computing and writing the spatial Jacobian determinant done.")
        except Exception as exc:  # noqa: BLE001
            log.error(f"ERROR: {exc}\nError occurred while writing spatial Jacobian determinant image.\n"
                      "However, transformix continues anyway.")
    log.info("Compute spatial Jacobian (full matrix) ...")
    if argmap.get("-jacmat") != "all":
        log.info('  The command-line option "-jacmat" is not used, so no dT/dx computed.')
    else:
        try:
            settings_fmt = tf.lookup.get("ResultImageFormat", str, "mhd")
            write_image(spatial_jacobian(tf, full=True), f"{out}fullSpatialJacobian.{settings_fmt}")
            log.info("  Computing and writing the spatial Jacobian done.")
        except Exception as exc:  # noqa: BLE001
            log.error(f"ERROR: {exc}\nError occurred while writing the spatial Jacobian image.\n"
                      "However, transformix continues anyway.")

    # -- resampling: errors fail the run -----------------------------------------------------------------------
    if moving is not None:
        log.info("Resampling image and writing to disk ...")
        try:
            settings = tf.resample_settings()
            result = transform_image(moving, tf)
            path = f"{out}{settings.name}.{settings.format}"
            write_image(result, path, compress=settings.compress)
            log.info(f"  Resampling took {time.perf_counter() - start:.2f} s")
        except Exception as exc:  # noqa: BLE001 - any failure of the resampler is an exit-1 error
            log.error(f"ERROR: {exc}\nError occurred while writing resampled image.")
            log.error("ERROR: Errors occurred")
            return 1
    log.info(f"\ntransformix has finished at {_now()}.\nTotal time elapsed: "
             f"{time.perf_counter() - start:.1f}s.\n")
    return 0


def _points_step(argmap: dict, tf: TransformFile, moving, out: str, log: _Log) -> None:
    ipp = argmap.get("-ipp", "")
    d = argmap.get("-def", "")
    if d and ipp:
        raise ParameterFileError('ERROR: Can not use both "-def" and "-ipp"!\n  "-ipp" is deprecated, use only '
                                 '"-def".\n')
    if not d and ipp:
        d = ipp
    if not d:
        log.info('  The command-line option "-def" is not used, so no points are transformed')
        return
    fmt = tf.lookup.get("ResultImageFormat", str, "mhd")
    if d == "all":
        log.info("  The transform is evaluated on all points. The result is a deformation field.")
        write_image(deformation_field(tf), f"{out}deformationField.{fmt}")
        log.info("  Computing and writing the deformation field done.")
        return
    if d.endswith((".vtk", ".VTK")):
        raise ParameterFileError(f"VTK point files are not supported yet ({d}); write the points as a transformix "
                                 "point file (point/index, count, coordinates)")
    log.info("  The transform is evaluated on some points, specified in the input point file.")
    log.info(f"  Reading input point file: {d}")
    points, is_index = read_point_file(d, ndim=tf.ndim)
    log.info("  Input points are specified as image indices." if is_index else
             "  Input points are specified in world coordinates.")
    log.info(f"  Number of specified input points: {len(points)}")
    res = transform_points(tf, points, is_index=is_index, moving=moving)
    from ..io import atomic_output

    path = f"{out}outputpoints.txt"
    with atomic_output(path) as tmp, open(tmp, "w", newline="\n") as fh:
        fh.write(res.text())
    log.info(f"  The transformed points are saved in: {path}")


if __name__ == "__main__":  # pragma: no cover
    from classreg.elastix.server import run

    sys.exit(run("transformix"))
