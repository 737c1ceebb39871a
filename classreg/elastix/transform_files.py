"""elastix ``TransformParameters`` files: read a (chain of) file(s) into a classreg transform, write stage maps.

A transform parameter file describes **one stage**; the full fixed → moving transform follows
``InitialTransformParameterFileName`` (elastix ≥ 5.2) or the legacy ``InitialTransformParametersFileName`` back to
``"NoInitialTransform"`` and combines the stages with ``HowToCombineTransforms`` (ELASTIX.md §9–§11):

* ``Compose`` (default): ``T(x) = T_current(T_initial(x))``, i.e. ``Chain([T_initial, T_current])``;
* ``Add``: ``T(x) = T_current(x) + T_initial(x) − x`` (:class:`AddedTransform`).

Supported stages: ``TranslationTransform``, ``EulerTransform`` (2-D; 3-D with ``ComputeZYX``),
``SimilarityTransform`` (2-D ``[s, θ, t]``; 3-D ``[versor(3), t(3), s]``), ``AffineTransform``, ``BSplineTransform``
and ``RecursiveBSplineTransform`` (cubic, not cyclic), ``DeformationFieldTransform`` and ``(Transform "File")``
links to ITK transform files. ``Direction`` and ``GridDirection`` are listed column by column (column-major).

Writing: :func:`affine_stage_map`, :func:`bspline_stage_map`, :func:`displacement_stage_map` build the
transform part of one stage, :func:`geometry_map` and :func:`resample_map` the image and resampler parts, and
:func:`write_transform_file` writes them in elastix 5.2's layout plus the legacy initial-transform key that Debian's
elastix 5.0.1 needs (it silently ignores the new spelling).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..image import Image
from ..transforms import Affine, BSplineTransform, Chain, DisplacementField, Transform, euler_angles
from .parameters import (
    ParameterFileError,
    ParameterLookup,
    format_number,
    read_parameter_file,
    write_parameter_file,
)

__all__ = [
    "RESULT_PIXEL_TYPES",
    "SUPPORTED_TRANSFORMS",
    "TRANSFORM_FILE_BLOCKS",
    "AddedTransform",
    "NearestNeighbourDisplacementField",
    "OutputGrid",
    "ResampleSettings",
    "TransformFile",
    "affine_stage_map",
    "affine_stage_map_from_affine",
    "affine_to_elastix_parameters",
    "bspline_stage_map",
    "displacement_stage_map",
    "elastix_parameters_to_affine",
    "format_transform_file",
    "geometry_map",
    "read_transform_file",
    "resample_map",
    "stage_transform",
    "transform_file_from_maps",
    "write_transform_file",
]

#: Transform components read by :func:`read_transform_file`.
SUPPORTED_TRANSFORMS = ("TranslationTransform", "EulerTransform", "SimilarityTransform", "AffineTransform",
                        "BSplineTransform", "RecursiveBSplineTransform", "DeformationFieldTransform", "File")

#: classreg affine-family kinds -> elastix transform component names.
KIND_TO_ELASTIX = {"translation": "TranslationTransform", "rigid": "EulerTransform",
                   "similarity": "SimilarityTransform", "affine": "AffineTransform"}
ELASTIX_TO_KIND = {v: k for k, v in KIND_TO_ELASTIX.items()}

#: ``ResultImagePixelType`` values (elastix 5.2's list, spaces or underscores) -> numpy dtypes.
RESULT_PIXEL_TYPES = {
    "char": np.int8, "unsigned char": np.uint8, "short": np.int16, "ushort": np.uint16,
    "unsigned short": np.uint16, "int": np.int32, "unsigned int": np.uint32, "long": np.int64,
    "unsigned long": np.uint64, "float": np.float32, "double": np.float64,
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
    "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64,
}

#: ``ResampleInterpolator`` components understood (the Final* interpolators of elastix).
RESAMPLE_INTERPOLATORS = ("FinalBSplineInterpolator", "FinalBSplineInterpolatorFloat", "FinalLinearInterpolator",
                          "FinalNearestNeighborInterpolator")

#: The comment blocks of a 5.2-style ``TransformParameters`` file (everything else comes first, sorted).
TRANSFORM_FILE_BLOCKS = (
    ("ResampleInterpolator specific", ("ResampleInterpolator", "FinalBSplineInterpolationOrder")),
    ("Resampler specific", ("Resampler", "DefaultPixelValue", "ResultImageFormat", "ResultImagePixelType",
                            "CompressResultImage", "ResultImageName")),
)

_NO_INITIAL = "NoInitialTransform"


# ================================================================================================ small transforms
class AddedTransform(Transform):
    """elastix's ``HowToCombineTransforms "Add"``: ``x ↦ current(x) + initial(x) − x`` (displacements add).

    Parameters
    ----------
    current, initial : Transform
        The stage's own transform and the (combined) initial transform, same dimension.
    """

    def __init__(self, current: Transform, initial: Transform):
        for name, t in (("current", current), ("initial", initial)):
            if not isinstance(t, Transform):
                raise TypeError(f"{name} must be a classreg Transform, got {type(t).__name__}")
        if current.ndim != initial.ndim:
            raise ValueError(f"cannot add a {current.ndim}-D transform to a {initial.ndim}-D one")
        self.ndim = current.ndim
        self.current = current
        self.initial = initial

    def map_points(self, points) -> np.ndarray:
        """``current(x) + initial(x) − x`` for physical points (N, ndim), fixed → moving."""
        p = self._check_points(points)
        return self.current.map_points(p) + self.initial.map_points(p) - p

    def inverse(self):
        raise NotImplementedError(
            "an elastix 'Add' combination has no closed-form inverse; sample it on a grid (e.g. transformix "
            "-def all) and invert the DisplacementField")

    def to_sitk(self):
        raise NotImplementedError("an elastix 'Add' combination has no ITK transform equivalent")

    def save(self, path):
        raise NotImplementedError("an elastix 'Add' combination cannot be saved as an ITK transform; write it as "
                                  "TransformParameters files (classreg.elastix.transform_files) or sample it")

    def __repr__(self) -> str:
        return f"AddedTransform(current={self.current!r}, initial={self.initial!r})"


class NearestNeighbourDisplacementField(Transform):
    """A displacement field read with nearest-neighbour interpolation (elastix's
    ``DeformationFieldInterpolationOrder 0``, its default): ``x ↦ x + u(round(index(x)))``, ``u = 0`` outside the
    field (beyond half a voxel), as ITK's ``VectorNearestNeighborInterpolateImageFunction``.
    """

    def __init__(self, field: DisplacementField):
        if not isinstance(field, DisplacementField):
            raise TypeError(f"field must be a DisplacementField, got {type(field).__name__}")
        self.field = field
        self.ndim = field.ndim

    @property
    def image(self) -> Image:
        return self.field.image

    def map_points(self, points) -> np.ndarray:
        from ..kernels.warp import interpolate

        p = self._check_points(points)
        idx = self.field.image.world_to_index(p)
        u = interpolate(self.field.image.numpy(), idx, order=0, mode="itk", cval=0.0)
        return p + np.asarray(u, dtype=float)

    def inverse(self, **kwargs):
        return self.field.inverse(**kwargs)

    def to_sitk(self):
        raise NotImplementedError("ITK displacement-field transforms interpolate linearly; use .field for that")

    def save(self, path):
        return self.field.save(path)

    def __repr__(self) -> str:
        return f"NearestNeighbourDisplacementField({self.field.image!r})"


# ================================================================================================ grid / settings
@dataclass(frozen=True, eq=False)
class OutputGrid:
    """The output grid of a transform file (``Size``, ``Index``, ``Spacing``, ``Origin``, ``Direction``).

    Indices are ITK's: x first and absolute (index ``Index`` is the first voxel); a point is
    ``origin + D · diag(spacing) · index``. With ``UseDirectionCosines "false"`` elastix computes with an identity
    direction and writes the file's direction into the output images: :attr:`compute_direction` is the one used for
    points, :attr:`direction` the one written.
    """

    size: tuple
    index: tuple
    spacing: tuple
    origin: tuple
    direction: np.ndarray  # (ndim, ndim), columns are the axis directions
    use_direction_cosines: bool = True

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple:
        """Array (numpy) shape of an image on this grid: ``reversed(size)``."""
        return tuple(reversed(self.size))

    @property
    def compute_direction(self) -> np.ndarray:
        return self.direction if self.use_direction_cosines else np.eye(self.ndim)

    def _lin(self, direction) -> np.ndarray:
        return np.asarray(direction, dtype=float) @ np.diag(self.spacing)

    def index_to_point(self, index) -> np.ndarray:
        """Physical points (N, ndim) of ITK indices (N, ndim), x first (continuous indices allowed)."""
        idx = np.atleast_2d(np.asarray(index, dtype=float))
        return idx @ self._lin(self.compute_direction).T + np.asarray(self.origin)

    def point_to_index(self, points) -> np.ndarray:
        """Continuous ITK indices (N, ndim), x first, of physical points (N, ndim)."""
        p = np.atleast_2d(np.asarray(points, dtype=float))
        return (p - np.asarray(self.origin)) @ np.linalg.inv(self._lin(self.compute_direction)).T

    def reference(self, *, written: bool = False) -> Image:
        """An :class:`~classreg.Image` on this grid (its data is a zero-size broadcast; use its geometry only).

        ``written=True`` gives the direction written to output files, else the one used for computing.
        """
        d = self.direction if written else self.compute_direction
        first = np.asarray(self.origin) + self._lin(d) @ np.asarray(self.index, dtype=float)
        data = np.broadcast_to(np.zeros((), dtype=np.uint8), self.shape)
        return Image(data, self.spacing, first, d)

    def with_written_geometry(self, image: Image) -> Image:
        """``image`` (computed on :meth:`reference`) with the geometry elastix writes (original direction)."""
        ref = self.reference(written=True)
        return Image(image.data, ref.spacing, ref.origin, ref.direction, vector=image.is_vector)


@dataclass(frozen=True)
class ResampleSettings:
    """How transformix resamples and writes ``result.<fmt>`` (from the top transform file)."""

    interpolator: str = "FinalBSplineInterpolator"
    order: int = 3
    default_pixel_value: float = 0.0
    pixel_type: str = "short"
    format: str = "mhd"
    compress: bool = False
    name: str = "result"
    resampler: str = "DefaultResampler"

    @property
    def dtype(self):
        """numpy dtype of ``ResultImagePixelType``."""
        return RESULT_PIXEL_TYPES[_pixel_key(self.pixel_type)]

    @property
    def interpolation(self) -> str:
        """classreg's interpolation name when one matches exactly ("nearest", "linear", "bspline"), else
        ``"bspline<order>"`` (B-spline orders 1, 2, 4, 5 use the mirror boundary of ITK's B-spline interpolator)."""
        if self.interpolator == "FinalNearestNeighborInterpolator":
            return "nearest"
        if self.interpolator == "FinalLinearInterpolator":
            return "linear"
        if self.order == 0:
            return "nearest"
        if self.order == 3:
            return "bspline"
        return f"bspline{self.order}"


def _pixel_key(name: str) -> str:
    key = name.replace("_", " ")
    if key not in RESULT_PIXEL_TYPES:
        raise ParameterFileError(
            f'ERROR: Unable to cast result image: ResultImagePixelType must be one of "char", "unsigned char", '
            f'"short", "ushort", "unsigned short", "int", "unsigned int", "long", "unsigned long", "float", '
            f'"double", or a fixed width type ("intN", "uintN", or "floatN" for a type of \'N\' bits), but was '
            f'"{name}".')
    return key


@dataclass
class TransformFile:
    """A transform parameter file with its chain of initial transforms, as transformix reads it.

    Attributes
    ----------
    transform : Transform
        The full fixed → moving transform (all stages combined).
    parameters : dict
        The top (newest) file's parameter map.
    path : Path or None
        The top file (None for in-memory maps).
    chain : list of Path
        The files of the chain, oldest → newest (in-memory maps are absent).
    maps : list of dict
        The parameter maps of the chain, oldest → newest.
    stages : list of Transform
        Each stage's own transform, oldest → newest.
    ndim : int
    image : Image or None
        The image used to fill a missing grid (library mode), if any.
    """

    transform: Transform
    parameters: dict
    path: Path | None
    chain: list
    maps: list
    stages: list
    ndim: int
    image: Image | None = None
    _lookup: ParameterLookup | None = field(default=None, repr=False)

    @property
    def lookup(self) -> ParameterLookup:
        if self._lookup is None:
            self._lookup = ParameterLookup(self.parameters, str(self.path or ""))
        return self._lookup

    @property
    def use_direction_cosines(self) -> bool:
        return self.lookup.get("UseDirectionCosines", bool, True)

    def grid(self) -> OutputGrid:
        """The output grid of the top file (``Size``/``Index``/``Spacing``/``Origin``/``Direction``).

        A file without ``Size`` takes the geometry of :attr:`image` (library mode, as itk-elastix's transformix
        does); without either, a :class:`ParameterFileError`.
        """
        lk, n = self.lookup, self.ndim
        udc = self.use_direction_cosines
        if "Size" not in lk:
            if self.image is None:
                raise ParameterFileError(
                    "ERROR: One or more image sizes are 0 or unspecified! (the transform parameter file has no "
                    "\"Size\"; give an input image to take the output grid from)")
            img = self.image
            return OutputGrid(tuple(img.size), (0,) * n, tuple(img.spacing), tuple(img.origin),
                              img.direction_matrix, udc)
        size, index, spacing, origin, direction = _geometry(lk, "", n, str(self.path or ""))
        if any(s <= 0 for s in size):
            raise ParameterFileError(f"ERROR: One or more image sizes are 0 or unspecified! (Size {size})")
        return OutputGrid(size, index, spacing, origin, direction, udc)

    def reference(self) -> Image:
        """The output grid as an :class:`~classreg.Image` (geometry used for computing)."""
        return self.grid().reference()

    def resample_settings(self) -> ResampleSettings:
        """``ResampleInterpolator``, ``FinalBSplineInterpolationOrder``, ``DefaultPixelValue``,
        ``ResultImagePixelType``, ``ResultImageFormat``, ``CompressResultImage``, ``ResultImageName``."""
        lk = self.lookup
        interp = lk.get("ResampleInterpolator", str, "FinalBSplineInterpolator")
        if interp not in RESAMPLE_INTERPOLATORS:
            raise ParameterFileError(
                f"ERROR: The following component could not be created: {interp} (ResampleInterpolator; classreg "
                f"supports {', '.join(RESAMPLE_INTERPOLATORS)})")
        order = lk.get("FinalBSplineInterpolationOrder", int, 3) if interp.startswith("FinalBSpline") else 1
        if not 0 <= order <= 5:
            raise ParameterFileError(f"ERROR: FinalBSplineInterpolationOrder must be 0..5, got {order}")
        resampler = lk.get("Resampler", str, "DefaultResampler")
        if resampler not in ("DefaultResampler", "OpenCLResampler"):
            raise ParameterFileError(f"ERROR: The following component could not be created: {resampler} "
                                     "(Resampler; classreg supports DefaultResampler)")
        pixel = lk.get("ResultImagePixelType", str, "short")  # checked when the result image is cast
        return ResampleSettings(
            interpolator=interp, order=order,
            default_pixel_value=lk.get("DefaultPixelValue", float, 0.0),
            pixel_type=pixel, format=lk.get("ResultImageFormat", str, "mhd"),
            compress=lk.get("CompressResultImage", bool, False),
            name=(lk.values("ResultImageName") or ("result",))[0], resampler=resampler)


def _check_list_lengths(lk: ParameterLookup, expected: Mapping, source) -> None:
    for name, n in expected.items():
        vals = lk.parameters.get(name)
        if vals is not None and len(vals) < n:
            raise ParameterFileError(f"ERROR: \"{name}\" needs {n} values, got {len(vals)}"
                                     + (f" in {source}" if source else ""))


# ================================================================================================ reading
def _initial_name(pm: Mapping) -> str:
    """The initial-transform file name of a map: the 5.2 spelling first, then the legacy one ("" if none)."""
    for key in ("InitialTransformParameterFileName", "InitialTransformParametersFileName"):
        vals = pm.get(key)
        if vals and vals[0] != "":
            return vals[0]
    return ""


def _is_absolute(name: str) -> bool:
    return name[:1] in ("/", "\\") or (len(name) > 1 and name[0].isalpha() and name[1] == ":")


def _resolve_initial(name: str, referring: str) -> str:
    """elastix 5.2's rule (``TransformBase::ReadFromFile``): absolute → as is; relative → as is if the referring
    file has no directory part or the name exists relative to the CWD; else relative to the referring file's
    directory."""
    sep = max(referring.rfind("/"), referring.rfind("\\"))
    if _is_absolute(name) or sep < 0 or os.path.exists(name):
        return name
    return referring[: sep + 1] + name


def _resolve_linked(name: str, referring: str) -> str:
    """A ``TransformFileName`` / ``DeformationFieldFileName``: absolute → as is; else relative to the referring
    file's directory (elastix's rule for "File" links), falling back to the CWD for deformation fields (elastix
    5.0.1 reads those relative to the CWD)."""
    if _is_absolute(name) or ":" in name:
        return name
    sep = max(referring.rfind("/"), referring.rfind("\\"))
    candidate = (referring[: sep + 1] if sep >= 0 else "") + name
    if os.path.exists(candidate) or not os.path.exists(name):
        return candidate
    return name


def _follow_chain(path) -> tuple:
    """Read ``path`` and its initial transforms; returns (paths, maps), oldest → newest."""
    paths, maps = [], []
    seen = set()
    current = os.fspath(path)
    while True:
        pm = read_parameter_file(current)
        key = os.path.realpath(current)
        if key in seen:
            raise ParameterFileError(
                f"ERROR: the chain of initial transforms loops back to {current!r} (an infinite loop is not "
                "allowed)")
        seen.add(key)
        paths.append(Path(current))
        maps.append(pm)
        name = _initial_name(pm)
        if not name or name == _NO_INITIAL:
            break
        if os.path.abspath(name) == os.path.abspath(current) or (
                os.path.realpath(_resolve_initial(name, current)) == key):
            raise ParameterFileError(
                f"ERROR: The InitialTransformParameterFileName is identical to the current TransformParameters "
                f"filename! An infinite loop is not allowed. ({current})")
        resolved = _resolve_initial(name, current)
        if not os.path.exists(resolved):
            raise ParameterFileError(
                f"ERROR: Reading initial transform parameters failed: {resolved} (named by "
                f"InitialTransformParameterFileName {name!r} in {current}: the file does not exist)")
        current = resolved
    return paths[::-1], maps[::-1]


def read_transform_file(path, *, image: Image | None = None, require_dimension: bool = False) -> TransformFile:
    """Read a transform parameter file and its chain of initial transforms.

    Parameters
    ----------
    path : str or os.PathLike
        The (top, newest) ``TransformParameters`` file.
    image : Image, optional
        Library mode: fills a missing dimension and a missing output grid (``Size`` …), as itk-elastix does with
        its input image.
    require_dimension : bool
        Command-line mode: the top file must contain ``FixedImageDimension`` and ``MovingImageDimension``
        (transformix exits 1 without them).

    Returns
    -------
    TransformFile

    Raises
    ------
    ParameterFileError
        Unreadable/invalid files, an unknown transform (the message lists the supported ones), inconsistent
        parameter counts, a self-referencing or looping chain.
    """
    paths, maps = _follow_chain(path)
    return transform_file_from_maps(maps, paths=paths, image=image, require_dimension=require_dimension)


def transform_file_from_maps(maps: Sequence[Mapping], *, paths: Sequence | None = None, image: Image | None = None,
                             require_dimension: bool = False, base_dir=None) -> TransformFile:
    """Build a :class:`TransformFile` from parameter maps ordered oldest → newest (e.g. an itk ``ParameterObject``).

    The chain is the list order (as elastix uses a multi-map parameter object); ``InitialTransformParameterFileName``
    values inside the maps are ignored. Relative ``DeformationFieldFileName``/``TransformFileName`` values resolve
    against the map's file (``paths``) or ``base_dir`` (default: the CWD).
    """
    maps = [{k: tuple(v) if not isinstance(v, str) else (v,) for k, v in m.items()} for m in maps]
    if not maps:
        raise ParameterFileError("no transform parameter maps given")
    if paths is None:
        ref = os.path.join(os.fspath(base_dir), "x") if base_dir is not None else "x"
        refs = [ref] * len(maps)
        paths_out = []
    else:
        refs = [os.fspath(p) for p in paths]
        paths_out = [Path(p) for p in paths]
        if len(refs) != len(maps):
            raise ValueError("paths must have one entry per parameter map")
    top = maps[-1]
    top_lk = ParameterLookup(top, refs[-1] if paths is not None else "")
    ndim = _dimension(top, top_lk, image, require_dimension, refs[-1])
    udc = top_lk.get("UseDirectionCosines", bool, True)
    stages = []
    total = None
    for pm, ref in zip(maps, refs):
        lk = ParameterLookup(pm, ref if paths is not None else "")
        if "FixedImageDimension" in lk and lk.get("FixedImageDimension", int) != ndim:
            raise ParameterFileError(
                f"ERROR: the transform files of a chain have different dimensions ({ref}: "
                f"FixedImageDimension {lk.get('FixedImageDimension', int)}, top file: {ndim})")
        stage = stage_transform(pm, ndim=ndim, referring=ref, use_direction_cosines=udc,
                                source=ref if paths is not None else "")
        stages.append(stage)
        if total is None:
            total = stage
        else:
            how = lk.get("HowToCombineTransforms", str, "Compose")
            if how == "Compose":
                total = Chain([total, stage])
            elif how == "Add":
                total = AddedTransform(stage, total)
            else:
                raise ParameterFileError(f'ERROR: HowToCombineTransforms must be "Compose" or "Add", got "{how}"'
                                         + (f" in {ref}" if paths is not None else ""))
    return TransformFile(transform=total, parameters=dict(top), path=paths_out[-1] if paths_out else None,
                         chain=paths_out, maps=maps, stages=stages, ndim=ndim, image=image)


def _dimension(pm, lk: ParameterLookup, image, required: bool, source) -> int:
    fixed = lk.get("FixedImageDimension", int) if "FixedImageDimension" in lk else None
    moving = lk.get("MovingImageDimension", int) if "MovingImageDimension" in lk else None
    if required:
        if moving is None or moving == 0:
            raise ParameterFileError("ERROR: The MovingImageDimension is not given.")
        if fixed is None or fixed == 0:
            raise ParameterFileError("ERROR: The FixedImageDimension is not given.")
    if fixed is not None and moving is not None and fixed != moving:
        raise ParameterFileError(f"ERROR: FixedImageDimension {fixed} and MovingImageDimension {moving} differ; "
                                 "classreg supports equal dimensions only")
    n = fixed if fixed is not None else moving
    if n is None and image is not None:
        n = image.ndim
    if n is None:
        n = _infer_dimension(pm, lk, source)
    if n not in (2, 3):
        raise ParameterFileError(f"ERROR: image dimension {n} is not supported (2 or 3)" +
                                 (f" ({source})" if source else ""))
    if image is not None and image.ndim != n:
        raise ParameterFileError(f"ERROR: the transform is {n}-D but the image is {image.ndim}-D")
    return n


_PARAMS_TO_DIM = {"TranslationTransform": {2: 2, 3: 3}, "EulerTransform": {3: 2, 6: 3},
                  "SimilarityTransform": {4: 2, 7: 3}, "AffineTransform": {6: 2, 12: 3}}


def _infer_dimension(pm, lk: ParameterLookup, referring: str) -> int:
    if pm.get("Transform") == ("File",) and pm.get("TransformFileName"):
        from ..transforms import load_transform

        try:
            return load_transform(_resolve_linked(pm["TransformFileName"][0], referring)).ndim
        except (ValueError, OSError) as exc:
            raise ParameterFileError(f"ERROR: could not read the ITK transform file "
                                     f"{pm['TransformFileName'][0]!r}: {exc}") from None
    for key in ("Size", "Spacing", "Origin", "CenterOfRotationPoint", "GridSize", "GridSpacing"):
        if key in pm and len(pm[key]) in (2, 3):
            return len(pm[key])
    name = pm.get("Transform", ("",))[0] if pm.get("Transform") else ""
    vals = pm.get("ITKTransformParameters") or pm.get("TransformParameters") or ()
    count = len(vals)
    if name in _PARAMS_TO_DIM and count in _PARAMS_TO_DIM[name]:
        return _PARAMS_TO_DIM[name][count]
    raise ParameterFileError(
        "ERROR: cannot tell the image dimension: the transform parameter file has no FixedImageDimension/"
        "MovingImageDimension, Size or CenterOfRotationPoint; add (FixedImageDimension n) (MovingImageDimension n) "
        "or pass the image")


def _parameters(lk: ParameterLookup, name: str, expected: int | None, source: str) -> np.ndarray:
    """``TransformParameters`` (or ``ITKTransformParameters``) checked against ``NumberOfParameters``."""
    where = f" ({source})" if source else ""
    if "ITKTransformParameters" in lk:
        p = np.asarray(lk.get_list("ITKTransformParameters", float), dtype=float)
    else:
        if "NumberOfParameters" in lk:
            declared = lk.get("NumberOfParameters", int)
        else:
            declared = None
        vals = lk.get_list("TransformParameters", float)
        if vals is None:
            raise ParameterFileError(f"ERROR: the {name} stage has no TransformParameters{where}")
        if declared is not None and declared != len(vals):
            raise ParameterFileError(
                f"\nERROR: Invalid transform parameter file!\nThe number of parameters in \"TransformParameters\" is "
                f"{len(vals)}, which does not match the number specified in \"NumberOfParameters\" ({declared}).\n"
                f"The transform parameters should be specified as:\n  (TransformParameters num num ... num)\n"
                f"with {declared} parameters.{where}")
        p = np.asarray(vals, dtype=float)
    if expected is not None and p.size != expected:
        raise ParameterFileError(f"ERROR: this {name} needs {expected} parameters, got {p.size}{where}")
    return p


def _center(lk: ParameterLookup, n: int, source: str) -> np.ndarray:
    if "CenterOfRotationPoint" in lk:
        c = lk.get_list("CenterOfRotationPoint", float)
        if len(c) < n:
            raise ParameterFileError(f"ERROR: CenterOfRotationPoint needs {n} values, got {len(c)}")
        return np.asarray(c[:n], dtype=float)
    if "ITKTransformFixedParameters" in lk:
        return np.asarray(lk.get_list("ITKTransformFixedParameters", float)[:n], dtype=float)
    raise ParameterFileError("ERROR: No center of rotation is specified in the transform parameter file"
                             + (f" ({source})" if source else "") + "\nTransform parameter file is corrupt.")


def stage_transform(pm: Mapping, *, ndim: int, referring: str = "", use_direction_cosines: bool = True,
                    source: str = "") -> Transform:
    """The classreg transform of one stage's parameter map (no initial transform applied).

    Parameters
    ----------
    pm : mapping
        The stage's parameter map.
    ndim : int
        Image dimension.
    referring : str
        Path of the file the map came from (resolves relative ``TransformFileName``/``DeformationFieldFileName``).
    use_direction_cosines : bool
        ``False`` replaces a deformation field's direction by the identity (as elastix does).
    source : str
        Name used in messages.
    """
    lk = ParameterLookup(pm, source)
    vals = lk.values("Transform")
    if not vals:
        raise ParameterFileError("ERROR: the transform parameter file has no \"Transform\" entry"
                                 + (f" ({source})" if source else ""))
    name = vals[0]
    n = ndim
    if name == "File":
        fname = lk.get("TransformFileName", str, "")
        if not fname:
            raise ParameterFileError('ERROR: (Transform "File") needs (TransformFileName "...")'
                                     + (f" ({source})" if source else ""))
        from ..transforms import load_transform

        target = _resolve_linked(fname, referring)
        try:
            t = load_transform(target)
        except (ValueError, OSError) as exc:
            raise ParameterFileError(f"ERROR: could not read the ITK transform file {target!r}: {exc}") from None
        if t.ndim != n:
            raise ParameterFileError(f"ERROR: {target!r} holds a {t.ndim}-D transform, expected {n}-D")
        return t
    if name in ELASTIX_TO_KIND:
        kind = ELASTIX_TO_KIND[name]
        expected = {"translation": n, "rigid": 3 if n == 2 else 6, "similarity": 4 if n == 2 else 7,
                    "affine": n * n + n}[kind]
        p = _parameters(lk, name, expected, source)
        if kind == "translation":
            return Affine(np.eye(n), p, np.zeros(n))
        center = _center(lk, n, source)
        zyx = False
        if kind == "rigid" and n == 3:
            zyx = lk.get("ComputeZYX", str, "false") == "true"
            fixed = lk.get_list("ITKTransformFixedParameters", float) if "ITKTransformFixedParameters" in lk else []
            if "ComputeZYX" not in lk and len(fixed) > 3:
                zyx = bool(fixed[3])
        return elastix_parameters_to_affine(kind, p, center, compute_zyx=zyx)
    if name in ("BSplineTransform", "RecursiveBSplineTransform"):
        return _bspline_stage(lk, name, n, source)
    if name == "DeformationFieldTransform":
        return _field_stage(lk, n, referring, use_direction_cosines, source)
    raise ParameterFileError(
        f"ERROR: The following component could not be created: {name} (Transform). classreg supports the "
        f"transforms {', '.join(SUPPORTED_TRANSFORMS)}" + (f" ({source})" if source else ""))


def _geometry(lk: ParameterLookup, prefix: str, n: int, source: str) -> tuple:
    """``<prefix>Size``, ``Index``, ``Spacing``, ``Origin`` and ``Direction`` (written column-major) of a map: the
    image grid (prefix "") or a B-spline control grid ("Grid"); missing index/spacing/origin/direction are 0/1/0/I."""
    def values(key, kind, default):
        return tuple(lk.get(prefix + key, kind, entry=i) if prefix + key in lk else default for i in range(n))

    size, index = values("Size", int, 0), values("Index", int, 0)
    spacing, origin = values("Spacing", float, 1.0), values("Origin", float, 0.0)
    _check_list_lengths(lk, {prefix + k: n for k in ("Size", "Spacing", "Origin", "Index")}, source)
    direction = np.eye(n)
    if prefix + "Direction" in lk:
        vals = lk.get_list(prefix + "Direction", float)
        if len(vals) < n * n:
            raise ParameterFileError(f"ERROR: {prefix}Direction needs {n * n} values (column-major), got {len(vals)}"
                                     + (f" ({source})" if source else ""))
        direction = np.asarray(vals[: n * n]).reshape(n, n).T
    return size, index, spacing, origin, direction


def _bspline_stage(lk: ParameterLookup, name: str, n: int, source: str) -> BSplineTransform:
    where = f" ({source})" if source else ""
    order = lk.get("BSplineTransformSplineOrder", int, 3)
    if order != 3:
        raise ParameterFileError(f"ERROR: {name} with BSplineTransformSplineOrder {order} is not supported: "
                                 f"classreg reads cubic (order 3) B-spline transforms only{where}")
    if lk.get("UseCyclicTransform", bool, False):
        raise ParameterFileError(f"ERROR: {name} with UseCyclicTransform \"true\" is not supported{where}")
    if "GridSize" in lk:
        size, index, spacing, origin, direction = _geometry(lk, "Grid", n, source)
    elif "ITKTransformFixedParameters" in lk:
        f = lk.get_list("ITKTransformFixedParameters", float)
        if len(f) < 3 * n + n * n:
            raise ParameterFileError(f"ERROR: ITKTransformFixedParameters of a B-spline needs {3 * n + n * n} "
                                     f"values{where}")
        size = [round(v) for v in f[:n]]
        index = [0] * n
        origin, spacing = f[n:2 * n], f[2 * n:3 * n]
        direction = np.asarray(f[3 * n:3 * n + n * n]).reshape(n, n)  # ITK: row-major
    else:
        raise ParameterFileError(f"ERROR: the {name} stage has no GridSize{where}")
    count = n * int(np.prod(size))
    p = _parameters(lk, name, count, source)
    # elastix's coefficient image region starts at GridIndex; classreg's control point 0 is the region's first.
    origin_eff = np.asarray(origin, dtype=float) + direction @ (np.asarray(spacing) * np.asarray(index, float))
    coeffs = np.moveaxis(p.reshape(n, *reversed(size)), 0, -1)
    try:
        return BSplineTransform(size, origin_eff, spacing, direction, coeffs)
    except ValueError as exc:
        raise ParameterFileError(f"ERROR: invalid {name} grid: {exc}{where}") from None


def _field_stage(lk: ParameterLookup, n: int, referring: str, udc: bool, source: str) -> Transform:
    from ..io import load

    where = f" ({source})" if source else ""
    fname = lk.get("DeformationFieldFileName", str, "")
    if not fname:
        raise ParameterFileError('ERROR: the entry (DeformationFieldFileName "...") is missing in the transform '
                                 f"parameter file!{where}")
    order = lk.get("DeformationFieldInterpolationOrder", int, 0)
    if order not in (0, 1):
        raise ParameterFileError("Error while reading DeformationFieldInterpolationOrder from the parameter file\n"
                                 f"DeformationFieldInterpolationOrder can only be 0 or 1!{where}")
    target = _resolve_linked(fname, referring)
    try:
        img = load(target)
    except (ValueError, OSError) as exc:
        raise ParameterFileError(f"ERROR: could not read the deformation field {target!r}: {exc}\nError occurred "
                                 f"while reading the deformationField image.") from None
    if not img.is_vector or img.ncomponents != n or img.ndim != n:
        raise ParameterFileError(f"ERROR: the deformation field {target!r} must be a {n}-D image with {n} vector "
                                 f"components, got {img!r}")
    img = img.astype(np.float64)
    if not udc:
        img = Image(img.data, img.spacing, img.origin, None, vector=True)
    field_ = DisplacementField(img)
    return field_ if order == 1 else NearestNeighbourDisplacementField(field_)


# ================================================================================================ parameter maths
def _rot2(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _rot3(angles, zyx: bool) -> np.ndarray:
    ax, ay, az = angles
    cx, cy, cz = np.cos([ax, ay, az])
    sx, sy, sz = np.sin([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx if zyx else rz @ rx @ ry


def _versor_matrix(v) -> np.ndarray:
    """ITK's ``VersorRigid3DTransform::SetParameters`` + ``Versor::GetMatrix`` for the versor's vector part."""
    v = np.asarray(v, dtype=float)
    norm = float(np.sqrt(v @ v))
    eps = 1e-10
    if norm >= 1.0 - eps:
        v = v / (norm + eps * norm)
    x, y, z = v
    w = float(np.sqrt(max(0.0, 1.0 - v @ v)))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _matrix_versor(r) -> np.ndarray:
    """The versor (vector part, w >= 0) of a rotation matrix (Shepperd's method)."""
    r = np.asarray(r, dtype=float)
    tr = np.trace(r)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        w, x, y, z = 0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
        w, x, y, z = (r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s
    elif r[1, 1] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
        w, x, y, z = (r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s
    else:
        s = 2.0 * np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
        w, x, y, z = (r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s
    q = np.array([w, x, y, z])
    q /= np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return q[1:]


def elastix_parameters_to_affine(kind: str, parameters, center, *, compute_zyx: bool = False) -> Affine:
    """The :class:`~classreg.Affine` of elastix parameters of ``kind`` about ``center``.

    Parameters
    ----------
    kind : {"translation", "rigid", "similarity", "affine"} or the elastix component name
        Translation ``[t]``; Euler 2-D ``[θ, t]``, 3-D ``[θx, θy, θz, t]`` (R = Rz·Rx·Ry, or Rz·Ry·Rx with
        ``compute_zyx``); Similarity 2-D ``[s, θ, t]``, 3-D ``[versor(3), t, s]``; Affine ``[A row-major, t]``.
    parameters : array_like
    center : array_like
        ``CenterOfRotationPoint`` (mm).
    """
    kind = ELASTIX_TO_KIND.get(kind, kind)
    p = np.asarray(parameters, dtype=float).ravel()
    c = np.asarray(center, dtype=float).ravel()
    n = c.size
    if kind == "translation":
        return Affine(np.eye(n), p[:n], c)
    if kind == "rigid":
        if n == 2:
            return Affine(_rot2(p[0]), p[1:3], c)
        return Affine(_rot3(p[:3], compute_zyx), p[3:6], c)
    if kind == "similarity":
        if n == 2:
            return Affine(p[0] * _rot2(p[1]), p[2:4], c)
        return Affine(p[6] * _versor_matrix(p[:3]), p[3:6], c)
    if kind == "affine":
        return Affine(p[: n * n].reshape(n, n), p[n * n: n * n + n], c)
    raise ValueError(f"kind must be one of {sorted(KIND_TO_ELASTIX)}, got {kind!r}")


def affine_to_elastix_parameters(affine: Affine, kind: str, *, center=None, atol: float = 1e-6,
                                 compute_zyx: bool = False) -> np.ndarray:
    """elastix parameters of ``kind`` that reproduce ``affine`` about ``center`` (default ``affine.center``).

    The inverse of :func:`elastix_parameters_to_affine`.

    Raises
    ------
    ValueError
        If ``affine`` is not of that kind (e.g. a shear written as "rigid"): the largest point error on the unit
        cube around the centre exceeds ``atol`` mm.
    """
    if not isinstance(affine, Affine):
        raise TypeError(f"affine must be a classreg Affine, got {type(affine).__name__}")
    kind = ELASTIX_TO_KIND.get(kind, kind)
    if kind not in KIND_TO_ELASTIX:
        raise ValueError(f"kind must be one of {sorted(KIND_TO_ELASTIX)}, got {kind!r}")
    n = affine.ndim
    c = np.asarray(affine.center if center is None else center, dtype=float).reshape(n)
    a = np.asarray(affine.matrix, dtype=float)
    t = affine.map_points(c[None])[0] - c
    if kind == "translation":
        p = affine.map_points(np.zeros((1, n)))[0]
        c = np.zeros(n)
    elif kind == "affine":
        p = np.concatenate([a.ravel(), t])
    else:
        u, sv, vt = np.linalg.svd(a)
        r = u @ vt
        if np.linalg.det(r) < 0:
            raise ValueError(f"cannot write a reflection as an elastix {KIND_TO_ELASTIX[kind]}")
        s = float(np.mean(sv))
        if n == 2:
            theta = float(np.arctan2(r[1, 0], r[0, 0]))
            p = np.array([theta, *t]) if kind == "rigid" else np.array([s, theta, *t])
        elif kind == "rigid":
            p = np.concatenate([euler_angles(r, zyx=compute_zyx), t])
        else:
            p = np.concatenate([_matrix_versor(r), t, [s]])
    back = elastix_parameters_to_affine(kind, p, c, compute_zyx=compute_zyx)
    probe = c + np.array(np.meshgrid(*[[-1.0, 1.0]] * n, indexing="ij")).reshape(n, -1).T
    err = float(np.abs(back.map_points(probe) - affine.map_points(probe)).max())
    if err > atol:
        raise ValueError(f"the affine is not a {kind} transform (representing it as elastix "
                         f"{KIND_TO_ELASTIX[kind]} moves points by up to {err:.3g} mm); use kind='affine'")
    return p


# ================================================================================================ writing
def _nums(values) -> tuple:
    return tuple(format_number(v) for v in np.asarray(values, dtype=float).ravel())


def _ints(values) -> tuple:
    return tuple(str(int(v)) for v in np.asarray(values).ravel())


def affine_stage_map(kind: str, parameters, center=None) -> dict:
    """The transform part of an elastix stage for classreg affine-family parameters.

    Parameters
    ----------
    kind : {"translation", "rigid", "similarity", "affine"}
        Written as ``TranslationTransform``, ``EulerTransform`` (3-D: ``ComputeZYX "false"``),
        ``SimilarityTransform``, ``AffineTransform``.
    parameters : array_like
        The parameters of :class:`classreg.solvers.parametric.models.AffineModel` (ITK order). They equal
        elastix's except for 3-D similarity, whose Euler angles are converted to elastix's versor.
    center : array_like, optional
        Centre of rotation (mm); required except for "translation".

    Returns
    -------
    dict
        ``Transform``, ``NumberOfParameters``, ``TransformParameters`` [, ``CenterOfRotationPoint``,
        ``ComputeZYX``].
    """
    if kind not in KIND_TO_ELASTIX:
        raise ValueError(f"kind must be one of {sorted(KIND_TO_ELASTIX)}, got {kind!r}")
    p = np.asarray(parameters, dtype=float).ravel()
    if kind == "translation":
        n = p.size
        if n not in (2, 3):
            raise ValueError(f"a translation needs 2 or 3 parameters, got {p.size}")
        return {"Transform": ("TranslationTransform",), "NumberOfParameters": (str(n),),
                "TransformParameters": _nums(p)}
    if center is None:
        raise ValueError(f"center (the centre of rotation, mm) is required for kind={kind!r}")
    c = np.asarray(center, dtype=float).ravel()
    n = c.size
    from ..solvers.parametric.models import AffineModel

    model = AffineModel(kind, n, c)
    if p.size != model.size:
        raise ValueError(f"a {n}-D {kind} transform has {model.size} parameters, got {p.size}")
    if kind == "similarity" and n == 3:
        p = affine_to_elastix_parameters(model.to_affine(p), "similarity", center=c, atol=1e-6)
    return _affine_map(kind, p, c)


def _affine_map(kind: str, p, c) -> dict:
    n = len(c)
    pm = {"Transform": (KIND_TO_ELASTIX[kind],), "NumberOfParameters": (str(len(p)),),
          "TransformParameters": _nums(p)}
    if kind != "translation":
        pm["CenterOfRotationPoint"] = _nums(c)
    if kind == "rigid" and n == 3:
        pm["ComputeZYX"] = ("false",)
    return pm


def affine_stage_map_from_affine(affine: Affine, kind: str = "affine", *, atol: float = 1e-6) -> dict:
    """The transform part of an elastix stage reproducing any classreg :class:`~classreg.Affine` (about its
    centre); ``kind`` narrower than "affine" must represent it within ``atol`` mm (else ValueError)."""
    p = affine_to_elastix_parameters(affine, kind, atol=atol)
    c = np.zeros(affine.ndim) if kind == "translation" else np.asarray(affine.center)
    return _affine_map(kind, p, c)


def bspline_stage_map(bspline: BSplineTransform, *, recursive: bool = False) -> dict:
    """The transform part of an elastix ``BSplineTransform`` stage (``RecursiveBSplineTransform`` with
    ``recursive``): grid size/index/spacing/origin/direction (column-major), order 3, coefficients."""
    if not isinstance(bspline, BSplineTransform):
        raise TypeError(f"bspline must be a classreg BSplineTransform, got {type(bspline).__name__}")
    p = bspline.parameters
    n = bspline.ndim
    return {"Transform": ("RecursiveBSplineTransform" if recursive else "BSplineTransform",),
            "NumberOfParameters": (str(p.size),), "TransformParameters": _nums(p),
            "GridSize": _ints(bspline.grid_size), "GridIndex": ("0",) * n,
            "GridSpacing": _nums(bspline.grid_spacing), "GridOrigin": _nums(bspline.grid_origin),
            "GridDirection": _nums(np.asarray(bspline.grid_direction).T), "BSplineTransformSplineOrder": ("3",),
            "UseCyclicTransform": ("false",)}


def displacement_stage_map(field: DisplacementField, field_path, *, file_name: str | None = None,
                           interpolation_order: int = 1) -> dict:
    """Write ``field`` to ``field_path`` (float64 vector image, atomically) and return the transform part of an
    elastix ``DeformationFieldTransform`` stage.

    Parameters
    ----------
    field : DisplacementField
    field_path : str or os.PathLike
        Where the field image goes (.mhd, .nii.gz, .mha, .nrrd).
    file_name : str, optional
        The ``DeformationFieldFileName`` written into the map; default ``str(field_path)``. elastix 5.0.1 resolves a
        relative name against the CWD, classreg also against the transform file's folder: write an absolute path
        for files that travel.
    interpolation_order : {0, 1}
        ``DeformationFieldInterpolationOrder`` (elastix's default when absent is 0, nearest neighbour).
    """
    from ..io import save

    if not isinstance(field, DisplacementField):
        raise TypeError(f"field must be a classreg DisplacementField, got {type(field).__name__}")
    if interpolation_order not in (0, 1):
        raise ValueError(f"interpolation_order must be 0 or 1, got {interpolation_order!r}")
    save(field.image.astype(np.float64), field_path)
    return {"Transform": ("DeformationFieldTransform",), "NumberOfParameters": ("0",),
            "DeformationFieldFileName": (file_name if file_name is not None else os.fspath(field_path),),
            "DeformationFieldInterpolationOrder": (str(interpolation_order),)}


def geometry_map(fixed, internal_pixel_types=("float", "float"), *, use_direction_cosines: bool = True) -> dict:
    """The image part of a transform file for the fixed image (or an :class:`OutputGrid`).

    ``Size``, ``Index``, ``Spacing``, ``Origin``, ``Direction`` (column-major), ``Fixed/MovingImageDimension``,
    ``Fixed/MovingInternalImagePixelType``, ``UseDirectionCosines``.
    """
    if isinstance(fixed, OutputGrid):
        size, index, spacing, origin, d = fixed.size, fixed.index, fixed.spacing, fixed.origin, fixed.direction
    elif isinstance(fixed, Image):
        size, index, spacing, origin, d = fixed.size, (0,) * fixed.ndim, fixed.spacing, fixed.origin, \
            fixed.direction_matrix
    else:
        raise TypeError(f"fixed must be a classreg Image or an OutputGrid, got {type(fixed).__name__}")
    n = len(size)
    fixed_type, moving_type = internal_pixel_types
    return {"FixedImageDimension": (str(n),), "MovingImageDimension": (str(n),),
            "FixedInternalImagePixelType": (fixed_type,), "MovingInternalImagePixelType": (moving_type,),
            "Size": _ints(size), "Index": _ints(index), "Spacing": _nums(spacing), "Origin": _nums(origin),
            "Direction": _nums(np.asarray(d).T), "UseDirectionCosines": ("true" if use_direction_cosines else "false",)}


def resample_map(*, interpolator: str = "FinalBSplineInterpolator", order: int = 3, default_pixel_value: float = 0.0,
                 result_format: str = "mhd", result_pixel_type: str = "short", compress: bool = False,
                 resampler: str = "DefaultResampler", result_image_name: str | None = None) -> dict:
    """The resampling part of a transform file: ``ResampleInterpolator``, ``FinalBSplineInterpolationOrder``,
    ``Resampler``, ``DefaultPixelValue``, ``ResultImageFormat``, ``ResultImagePixelType``, ``CompressResultImage``
    [, ``ResultImageName`` (5.1+)]. Debian's elastix 5.0.1 knows only the B-spline resample interpolators."""
    if interpolator not in RESAMPLE_INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {RESAMPLE_INTERPOLATORS}, got {interpolator!r}")
    _pixel_key(result_pixel_type)
    pm = {"ResampleInterpolator": (interpolator,), "Resampler": (resampler,),
          "DefaultPixelValue": (format_number(default_pixel_value),), "ResultImageFormat": (result_format,),
          "ResultImagePixelType": (result_pixel_type,), "CompressResultImage": ("true" if compress else "false",)}
    if interpolator.startswith("FinalBSpline"):
        pm["FinalBSplineInterpolationOrder"] = (str(int(order)),)
    if result_image_name is not None:
        pm["ResultImageName"] = (result_image_name,)
    return pm


def _complete(pm: Mapping, initial, combine: str) -> dict:
    if combine not in ("Compose", "Add"):
        raise ValueError(f"combine must be 'Compose' or 'Add', got {combine!r}")
    out = {k: (tuple(v) if not isinstance(v, str) else (v,)) for k, v in pm.items()}
    init = os.fspath(initial) if initial is not None else _NO_INITIAL
    out["InitialTransformParameterFileName"] = (init,)
    out["InitialTransformParametersFileName"] = (init,)
    out["HowToCombineTransforms"] = (combine,)
    return out


def format_transform_file(pm: Mapping, *, initial="NoInitialTransform", combine: str = "Compose") -> str:
    """The text :func:`write_transform_file` writes."""
    from .parameters import format_parameter_map

    return format_parameter_map(_complete(pm, initial, combine), blocks=TRANSFORM_FILE_BLOCKS)


def write_transform_file(pm: Mapping, path, *, initial="NoInitialTransform", combine: str = "Compose") -> Path:
    """Write one stage's transform parameter file atomically, in elastix 5.2's layout.

    ``pm`` is the union of a stage map (:func:`affine_stage_map`, :func:`bspline_stage_map`,
    :func:`displacement_stage_map`), :func:`geometry_map` and :func:`resample_map`. The initial transform
    ``initial`` (a path, or ``"NoInitialTransform"``) is written under both ``InitialTransformParameterFileName``
    (5.2+) and the legacy ``InitialTransformParametersFileName`` (Debian's 5.0.1 ignores the new spelling and would
    silently apply only the last stage of a chain). ``combine`` is ``HowToCombineTransforms``.

    A relative ``initial`` is resolved by elastix 5.2 (and classreg) against the CWD and then the folder of this
    file, by elastix 5.0.1 against the CWD only: write an absolute path for chains that 5.0.1 must read from
    anywhere.
    """
    return write_parameter_file(_complete(pm, initial, combine), path, blocks=TRANSFORM_FILE_BLOCKS)
