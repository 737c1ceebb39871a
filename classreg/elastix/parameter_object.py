"""An itk-elastix-shaped ``ParameterObject``: a list of elastix parameter maps (ELASTIX.md §13).

Mirrors ``itk.ParameterObject`` of itk-elastix 0.25.4, i.e. elastix's ``Core/Main/elxParameterObject.cxx``
(commit 0c0b19f), so that code written for ``import itk`` runs after changing the import line::

    from classreg.elastix.parameter_object import ParameterObject

    po = ParameterObject.New()
    po.AddParameterMap(ParameterObject.GetDefaultParameterMap("rigid"))
    po.AddParameterFile("bspline.txt")
    po.SetParameter(1, "FinalGridSpacingInPhysicalUnits", "8")
    print(po)

A parameter map is a ``dict[str, tuple[str, ...]]``, keys sorted like elastix's ``std::map``. Maps go in and out as
copies (as in itk-elastix, where changing a map returned by ``GetParameterMap`` does not change the object).
Values may be given as ``str``, ``bool``, ``int``, ``float`` or sequences of those; they are converted as
itk-elastix 0.25.4's ``convert_to_parameter_value`` does (``True`` -> ``"true"``, ``3`` -> ``"3"``,
``10.0`` -> ``"10.0"``, ``1e-07`` -> ``"1e-07"``: Python's ``str``; elastix reads all of these).

Deliberate differences from itk-elastix 0.25.4, each where itk-elastix fails or misbehaves:

* ``SetParameter``/``AddParameterMap``/``SetParameterMaps`` accept bool/int/float values and plain dicts (SWIG
  raises ``TypeError``); a ``str`` is one value (SWIG's map ``__setitem__`` splits ``"abc"`` into ``a``, ``b``,
  ``c``; ``ReadParameterFiles("p.txt")`` reads the file ``p``).
* ``GetParameterMaps`` returns a list of dicts (itk-elastix returns an unusable ``SwigPyObject``).
* ``WriteParameterFile(pm, path)`` and ``WriteParameterFiles(...)`` work on an instance as well as on the class
  (itk-elastix binds them as static methods only, so ``po.WriteParameterFiles()`` raises ``TypeError``).
* ``WriteParameterFiles`` gives a later transform map without ``InitialTransformParameterFileName`` that entry (elastix
  writes through ``[0]`` of an empty vector: undefined behaviour, a segmentation fault in 0.25.4).
* TOML output escapes ``"`` and ``\\`` and quotes keys that need it (elastix writes them raw: unreadable TOML).
* ``ReadParameterFiles`` is all-or-nothing: on an error the object keeps its previous maps.
* ``ReadParameterFile`` also takes a list of files (as older itk-elastix releases did).
* snake_case aliases, ``len``, indexing, iteration and ``==``.

Errors are :class:`ParameterObjectError` (a ``RuntimeError``, as itk's exceptions are in Python) with elastix's
message; the subclasses are also ``IndexError`` (map index out of range), ``KeyError`` (no such parameter) or
:class:`~classreg.elastix.parameters.ParameterFileError` (a file elastix would not read).
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
import os
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .parameters import (
    ParameterFileError,
    format_number,
    format_parameter_map,
    is_number,
    read_parameter_file,
)

__all__ = ["DEFAULT_PARAMETER_MAP_NAMES", "ParameterMap", "ParameterObject", "ParameterObjectError",
           "as_parameter_map", "as_parameter_maps", "format_parameter_map_toml"]

#: The names :meth:`ParameterObject.GetDefaultParameterMap` knows (elxParameterObject.cxx).
DEFAULT_PARAMETER_MAP_NAMES = ("translation", "rigid", "affine", "bspline", "spline", "groupwise")

_CLOCK = itertools.count(1)  # stands in for ITK's global modification time stamp


# ------------------------------------------------------------------------------------------------ errors
class ParameterObjectError(RuntimeError):
    """An error elastix's ``ParameterObject`` raises (``RuntimeError`` in itk-elastix), with elastix's message."""


class _IndexError(ParameterObjectError, IndexError):
    pass


class _KeyError(ParameterObjectError, KeyError):
    def __str__(self):  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class _FileError(ParameterObjectError, ParameterFileError):
    pass


class _ValueError(ParameterObjectError, ValueError):
    pass


# ------------------------------------------------------------------------------------------------ conversion
def _value_text(value, key) -> str:
    """One parameter value as a string, as itk-elastix's ``convert_to_parameter_value`` (ElastixPython.py)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (numbers.Integral, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(value)
    if isinstance(value, numbers.Real):
        return str(float(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"parameter {key!r}: cannot use a {type(value).__name__} ({value!r}) as an elastix parameter "
                    "value; give str, bool, int or float, or a list of them")


def _values(value, key) -> tuple:
    """A parameter's values as a tuple of strings: one value, or a list/tuple/1-D array of values."""
    if isinstance(value, np.ndarray):
        if value.ndim > 1:
            raise TypeError(f"parameter {key!r}: a {value.ndim}-D array is not a list of values (flatten it)")
        value = value.tolist() if value.ndim else value.item()
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, Iterable) or isinstance(value, Mapping):
        if isinstance(value, bytes):
            raise TypeError(f"parameter {key!r}: give text, not bytes ({value!r})")
        return (_value_text(value, key),)
    out = []
    for v in value:
        if isinstance(v, np.ndarray) and v.ndim == 0:
            v = v.item()
        if not isinstance(v, (str, os.PathLike)) and isinstance(v, Iterable):
            raise TypeError(f"parameter {key!r}: a value list cannot contain a list ({v!r})")
        out.append(_value_text(v, key))
    return tuple(out)


def _key(key) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a parameter name must be a str, not {type(key).__name__} ({key!r})")
    return key


class ParameterMap(dict):
    """A parameter map: a plain ``dict[str, tuple[str, ...]]``, plus ``asdict()`` as itk-elastix's map proxy has."""

    __slots__ = ()

    def asdict(self) -> dict:
        """A plain ``dict`` copy (``mapstringvectorstring.asdict()`` in itk-elastix)."""
        return dict(self)


def _sorted(pm: dict) -> ParameterMap:
    """Keys in elastix's ``std::map<std::string, ...>`` order (byte-wise)."""
    return ParameterMap((k, pm[k]) for k in sorted(pm, key=lambda k: k.encode("utf-8", "surrogateescape")))


def as_parameter_map(mapping) -> ParameterMap:
    """A copy of one parameter map as ``dict[str, tuple[str, ...]]`` (keys sorted as elastix's ``std::map``).

    Parameters
    ----------
    mapping : mapping
        ``{name: value or [values]}``; values ``str``, ``bool``, ``int``, ``float`` (or numpy scalars, paths)
        converted as itk-elastix's ``convert_to_parameter_map``. Also an itk-elastix ``mapstringvectorstring``.

    Raises
    ------
    TypeError
        A non-mapping, a name that is not a str, or a value that is not one of the types above.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"a parameter map must be a mapping {{name: values}}, not {type(mapping).__name__}")
    return _sorted({_key(k): _values(v, k) for k, v in mapping.items()})


def as_parameter_maps(obj) -> list:
    """The parameter maps of anything that stands for a ParameterObject, as a list of new dicts.

    Parameters
    ----------
    obj : ParameterObject, itk.ParameterObject, mapping, or sequence of those
        A :class:`ParameterObject`; an itk-elastix ``ParameterObject`` (anything with ``GetNumberOfParameterMaps``
        and ``GetParameterMap``); one parameter map (a dict: one map); a list/tuple of maps or objects (their maps
        in order). Values are converted as in :func:`as_parameter_map`.

    Raises
    ------
    TypeError
        For anything else, e.g. a file name (read it with :meth:`ParameterObject.ReadParameterFile`) or a transform
        name (use :meth:`ParameterObject.GetDefaultParameterMap`).
    """
    if isinstance(obj, ParameterObject):
        return obj.GetParameterMaps()
    if hasattr(obj, "GetNumberOfParameterMaps") and hasattr(obj, "GetParameterMap"):
        return [as_parameter_map(obj.GetParameterMap(i)) for i in range(int(obj.GetNumberOfParameterMaps()))]
    if isinstance(obj, Mapping):
        return [as_parameter_map(obj)]
    if isinstance(obj, (str, bytes, os.PathLike)):
        raise TypeError(f"{obj!r} is not a parameter map: read a file with ParameterObject.ReadParameterFile(path), "
                        "or get a default map with ParameterObject.GetDefaultParameterMap(name)")
    if isinstance(obj, (list, tuple)):
        maps = []
        for item in obj:
            if isinstance(item, (list, tuple)) or not (isinstance(item, Mapping) or hasattr(item, "GetParameterMap")):
                raise TypeError(f"a list of parameter maps may hold maps (dicts) and ParameterObjects, "
                                f"not {type(item).__name__}")
            maps.extend(as_parameter_maps(item))
        return maps
    raise TypeError(f"expected a ParameterObject, a parameter map (dict) or a list of them, not {type(obj).__name__}")


# ------------------------------------------------------------------------------------------------ writing
_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:e[+-][0-9]+)?")


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: str) -> str:
    if value in ("true", "false") or (is_number(value) and _TOML_NUMBER.fullmatch(value)):
        return value
    return _toml_string(value)


def format_parameter_map_toml(parameters: Mapping) -> str:
    """A parameter map as elastix 5.2 writes a ``.toml`` parameter file (``Conversion::ParameterMapToString``).

    ``name = value`` for one value, ``name = [v1, v2]`` otherwise (``[]`` for none); ``true``/``false`` and numbers
    bare, other values as TOML strings; names sorted. Unlike elastix, ``"`` and ``\\`` in values are escaped and
    names that are not bare TOML keys are quoted, so that every map gives readable TOML.
    """
    lines = []
    for name, vals in _sorted(as_parameter_map(parameters)).items():
        key = name if _TOML_BARE_KEY.fullmatch(name) else _toml_string(name)
        text = _toml_value(vals[0]) if len(vals) == 1 else "[" + ", ".join(map(_toml_value, vals)) + "]"
        lines.append(f"{key} = {text}\n")
    return "".join(lines)


def _write_map(parameter_map, file_name) -> None:
    """elastix's ``ParameterObject::WriteParameterFile``: TOML for a ``.toml`` name, the legacy text otherwise."""
    from ..io import atomic_output

    pm = as_parameter_map(parameter_map)
    path = os.fspath(file_name)
    text = format_parameter_map_toml(pm) if Path(path).suffix == ".toml" else format_parameter_map(pm)
    try:
        with atomic_output(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape")
    except (OSError, ValueError) as exc:
        raise _FileError(f"Error opening parameter file {path!r}: {exc}") from exc


def _read_map(file_name) -> dict:
    try:
        return _sorted(read_parameter_file(file_name))
    except ParameterFileError as exc:
        raise _FileError(str(exc)) from None


def _std_to_string(x: float) -> str:
    """``std::to_string(double)``: printf ``%f`` (glibc spells NaN ``nan``/``-nan``, infinity ``inf``/``-inf``)."""
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    return format(x, "f")


class _hybridmethod:
    """A method usable on the class (``self`` is None) and on an instance, like itk-elastix's static writers."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, objtype=None):
        if obj is None:
            @functools.wraps(self.func)
            def on_class(*args):
                return self.func(None, *args)
            return on_class
        return types.MethodType(self.func, obj)


# ------------------------------------------------------------------------------------------------ the object
class ParameterObject:
    """A list of elastix parameter maps with itk-elastix's ``ParameterObject`` methods.

    Parameters
    ----------
    parameter_maps : optional
        Initial maps: anything :func:`as_parameter_maps` accepts (a dict, a list of dicts, another object).

    Notes
    -----
    Source: elastix ``Core/Main/elxParameterObject.cxx`` and itk-elastix 0.25.4 (observed). Method names are
    elastix's (``AddParameterMap``); each also has a snake_case alias (``add_parameter_map``).
    """

    def __init__(self, parameter_maps=None):
        self._maps: list = [] if parameter_maps is None else as_parameter_maps(parameter_maps)
        self._mtime = next(_CLOCK)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def New(cls, *args, **kwargs) -> ParameterObject:
        """A new, empty object; keyword arguments call the matching ``Set<Name>`` (``New(ParameterMap=pm)``)."""
        if args:
            raise TypeError("ParameterObject.New() takes no positional arguments (use keywords such as "
                            "ParameterMap=... or ParameterMaps=...)")
        obj = cls()
        for name, value in kwargs.items():
            setter = getattr(obj, "Set" + name, None)
            if setter is None:
                raise TypeError(f"ParameterObject.New(): no method Set{name} for the keyword {name!r}")
            setter(value)
        return obj

    def Clone(self) -> ParameterObject:
        """An independent copy."""
        return type(self)(self._maps)

    __copy__ = Clone

    def __deepcopy__(self, memo):
        return self.Clone()

    def _modified(self):
        self._mtime = next(_CLOCK)

    def _index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, (numbers.Integral, np.integer)):
            raise TypeError(f"a parameter map index must be an int, not {type(index).__name__} ({index!r})")
        index = int(index)
        if index < 0 or index >= len(self._maps):
            raise _IndexError(f"The index ({index}) is out of range! It must be less than the number of parameter "
                              f"maps ({len(self._maps)})")
        return index

    # -- maps -----------------------------------------------------------------------------------------------
    def SetParameterMap(self, *args) -> None:
        """``SetParameterMap(pm)``: replace all maps by ``pm``; ``SetParameterMap(i, pm)``: replace map ``i``."""
        if len(args) == 1:
            self.SetParameterMaps([args[0]] if isinstance(args[0], Mapping) else args[0])
        elif len(args) == 2:
            self._maps[self._index(args[0])] = as_parameter_map(args[1])
            self._modified()
        else:
            raise TypeError(f"SetParameterMap(parameterMap) or SetParameterMap(index, parameterMap); got {len(args)} "
                            "arguments")

    def SetParameterMaps(self, parameterMaps) -> None:
        """Replace all maps (a list of dicts, a dict, or another ParameterObject)."""
        self._maps = as_parameter_maps(parameterMaps)
        self._modified()

    def AddParameterMap(self, parameterMap) -> None:
        """Append one map."""
        self._maps.append(as_parameter_map(parameterMap))
        self._modified()

    def GetParameterMap(self, index) -> ParameterMap:
        """A copy of map ``index``."""
        return ParameterMap(self._maps[self._index(index)])

    def GetParameterMaps(self) -> list:
        """Copies of all maps, in order."""
        return [ParameterMap(pm) for pm in self._maps]

    def GetNumberOfParameterMaps(self) -> int:
        return len(self._maps)

    # -- single parameters ----------------------------------------------------------------------------------
    def SetParameter(self, *args) -> None:
        """``SetParameter(key, value)`` in every map, or ``SetParameter(index, key, value)`` in one.

        ``value`` is one value or a list of values (str, bool, int, float).
        """
        if len(args) == 2:
            key, values = _key(args[0]), _values(args[1], args[0])
            for i, pm in enumerate(self._maps):
                self._maps[i] = _sorted({**pm, key: values})
        elif len(args) == 3:
            i = self._index(args[0])
            key, values = _key(args[1]), _values(args[2], args[1])
            self._maps[i] = _sorted({**self._maps[i], key: values})
        else:
            raise TypeError(f"SetParameter(key, value) or SetParameter(index, key, value); got {len(args)} arguments")
        self._modified()

    def GetParameter(self, index, key) -> tuple:
        """The values of ``key`` in map ``index``."""
        pm = self._maps[self._index(index)]
        if key not in pm:
            raise _KeyError(f'There is no parameter named "{key}" in parameter map #{int(index)}!')
        return pm[key]

    def HasParameter(self, *args) -> bool:
        """``HasParameter(key)``: in any map; ``HasParameter(index, key)``: in map ``index`` (False if no such map)."""
        if len(args) == 1:
            return any(args[0] in pm for pm in self._maps)
        if len(args) == 2:
            index, key = args
            if isinstance(index, bool) or not isinstance(index, (numbers.Integral, np.integer)):
                raise TypeError(f"a parameter map index must be an int, not {type(index).__name__}")
            if index < 0:
                raise _IndexError(f"The index ({index}) is out of range: parameter map indices are not negative")
            return index < len(self._maps) and key in self._maps[index]
        raise TypeError(f"HasParameter(key) or HasParameter(index, key); got {len(args)} arguments")

    def RemoveParameter(self, *args) -> None:
        """``RemoveParameter(key)`` from every map, or ``RemoveParameter(index, key)``; a missing key is no error."""
        if len(args) == 1:
            for pm in self._maps:
                pm.pop(args[0], None)
        elif len(args) == 2:
            self._maps[self._index(args[0])].pop(args[1], None)
        else:
            raise TypeError(f"RemoveParameter(key) or RemoveParameter(index, key); got {len(args)} arguments")
        self._modified()

    # -- files ----------------------------------------------------------------------------------------------
    def ReadParameterFile(self, parameterFileName) -> None:
        """Replace all maps by the map read from one file (``.txt`` or ``.toml``); a list of files reads them all."""
        if isinstance(parameterFileName, (list, tuple)):
            self.ReadParameterFiles(parameterFileName)
            return
        self._maps = [_read_map(parameterFileName)]
        self._modified()

    def ReadParameterFiles(self, parameterFileNameVector) -> None:
        """Replace all maps by one map per file, in order."""
        names = ([parameterFileNameVector] if isinstance(parameterFileNameVector, (str, os.PathLike))
                 else list(parameterFileNameVector))
        if not names:
            raise _ValueError("Parameter filename container is empty.")
        for name in names:
            if not os.path.exists(os.fspath(name)):
                raise _FileError(f'Parameter file "{os.fspath(name)}" does not exist.')
        self._maps = [_read_map(name) for name in names]
        self._modified()

    def AddParameterFile(self, parameterFileName) -> None:
        """Append the map read from one file."""
        self._maps.append(_read_map(parameterFileName))
        self._modified()

    @_hybridmethod
    def WriteParameterFile(self, *args) -> None:
        """``WriteParameterFile(parameterMap, fileName)`` (also on the class) or ``WriteParameterFile(fileName)``.

        A ``.toml`` name gives TOML, any other the legacy ``(Name value ...)`` text; written atomically.
        The one-argument form needs exactly one map in the object.
        """
        if len(args) == 2:
            _write_map(args[0], args[1])
            return
        if len(args) != 1:
            raise TypeError(f"WriteParameterFile(parameterMap, fileName) or WriteParameterFile(fileName); got "
                            f"{len(args)} arguments")
        if self is None:
            raise TypeError("ParameterObject.WriteParameterFile(fileName) needs an object; on the class, call "
                            "WriteParameterFile(parameterMap, fileName)")
        if not self._maps:
            raise _ValueError("Error writing parameter map to disk: The parameter object is empty.")
        if len(self._maps) > 1:
            raise _ValueError(f"Error writing to disk: The number of parameter maps ({len(self._maps)}) does not "
                              "match the number of provided filenames (1). Please call WriteParameterFiles instead, "
                              "and provide a vector of filenames.")
        _write_map(self._maps[0], args[0])

    @_hybridmethod
    def WriteParameterFiles(self, *args) -> None:
        """Write several maps: ``()`` -> ``ParametersFile.<i>.txt``; ``(fileNames)``; ``(parameterMaps, fileNames)``.

        As elastix, each later map that has ``TransformParameters`` gets ``InitialTransformParameterFileName`` set
        to the previous file name, so the written files form a chain.
        """
        if len(args) == 2:
            maps, names = as_parameter_maps(args[0]), list(args[1])
        elif self is None:
            raise TypeError("ParameterObject.WriteParameterFiles(parameterMaps, fileNames) on the class needs both "
                            "arguments")
        elif len(args) == 1:
            maps = self._maps
            names = [args[0]] if isinstance(args[0], (str, os.PathLike)) else list(args[0])
        elif not args:
            maps = self._maps
            names = [f"ParametersFile.{i}.txt" for i in range(len(maps))]
        else:
            raise TypeError(f"WriteParameterFiles takes at most 2 arguments; got {len(args)}")
        if len(maps) != len(names):
            raise _ValueError(f"Error writing to disk: The number of parameter maps ({len(maps)}) does not match the "
                              f"number of provided filenames ({len(names)}).")
        for i, (pm, name) in enumerate(zip(maps, names)):
            pm = dict(pm)
            if i > 0 and "TransformParameters" in pm:
                previous = os.fspath(names[i - 1])
                rest = pm.get("InitialTransformParameterFileName", ())[1:]
                pm["InitialTransformParameterFileName"] = (previous, *rest)
            _write_map(pm, name)

    # -- defaults -------------------------------------------------------------------------------------------
    @staticmethod
    def GetDefaultParameterMap(transformName, numberOfResolutions=4,
                               finalGridSpacingInPhysicalUnits=10.0) -> ParameterMap:
        """elastix's default map for ``transformName`` (``elxParameterObject.cxx``, value strings exact).

        Parameters
        ----------
        transformName : {"translation", "rigid", "affine", "bspline", "spline", "groupwise"}
            ``"nonrigid"`` (an alias of ``"bspline"`` removed after elastix 5.2.0) is an error, as in elastix.
        numberOfResolutions : int
            ``NumberOfResolutions``, and the length of ``GridSpacingSchedule`` (``2**((n - 1 - r) / 2)`` for level
            ``r``, written in the shortest round-trip form) for ``bspline`` and ``groupwise``.
        finalGridSpacingInPhysicalUnits : float
            ``FinalGridSpacingInPhysicalUnits`` for ``bspline``/``groupwise``, written by ``std::to_string``
            (``"10.000000"``).
        """
        if not isinstance(transformName, str):
            raise TypeError(f"transformName must be a str, not {type(transformName).__name__}")
        if isinstance(numberOfResolutions, bool) or not isinstance(numberOfResolutions, (numbers.Integral,
                                                                                         np.integer)):
            raise TypeError(f"numberOfResolutions must be an int, not {type(numberOfResolutions).__name__}")
        n = int(numberOfResolutions)
        if not 0 <= n < 2**32:
            raise ValueError(f"numberOfResolutions must be an unsigned 32-bit int, not {n}")
        spacing = float(finalGridSpacingInPhysicalUnits)
        if transformName == "nonrigid":
            raise _ValueError(f'The transform name "{transformName}" is no longer supported, after elastix version '
                              '5.2.0. It was originally equivalent to "bspline" (which is the preferred transform '
                              'name).')
        if transformName not in DEFAULT_PARAMETER_MAP_NAMES:
            raise _ValueError(f'No default parameter map "{transformName}".')
        pm = {
            "FixedImagePyramid": ("FixedSmoothingImagePyramid",),
            "MovingImagePyramid": ("MovingSmoothingImagePyramid",),
            "Interpolator": ("LinearInterpolator",),
            "Optimizer": ("AdaptiveStochasticGradientDescent",),
            "Resampler": ("DefaultResampler",),
            "ResampleInterpolator": ("FinalBSplineInterpolator",),
            "FinalBSplineInterpolationOrder": ("3",),
            "NumberOfResolutions": (str(n),),
            "WriteIterationInfo": ("false",),
            "MaximumNumberOfIterations": ("256",),
            "ImageSampler": ("RandomCoordinate",),
            "NumberOfSpatialSamples": ("2048",),
            "CheckNumberOfSamples": ("true",),
            "MaximumNumberOfSamplingAttempts": ("8",),
            "NewSamplesEveryIteration": ("true",),
            "NumberOfSamplesForExactGradient": ("4096",),
            "DefaultPixelValue": ("0",),
            "AutomaticParameterEstimation": ("true",),
            "WriteResultImage": ("true",),
            "ResultImageFormat": ("nii",),
        }
        mattes = ("AdvancedMattesMutualInformation",)
        single = ("MultiResolutionRegistration",)
        if transformName == "translation":
            pm.update(Registration=single, Transform=("TranslationTransform",), Metric=mattes,
                      AutomaticTransformInitialization=("true",))
        elif transformName == "rigid":
            pm.update(Registration=single, Transform=("EulerTransform",), Metric=mattes,
                      AutomaticScalesEstimation=("true",))
        elif transformName == "affine":
            pm.update(Registration=single, Transform=("AffineTransform",), Metric=mattes,
                      AutomaticScalesEstimation=("true",))
        elif transformName == "bspline":
            pm.update(Registration=("MultiMetricMultiResolutionRegistration",), Transform=("BSplineTransform",),
                      Metric=mattes + ("TransformBendingEnergyPenalty",), Metric0Weight=("1.0",),
                      Metric1Weight=("1.0",))
        elif transformName == "spline":
            pm.update(Registration=single, Transform=("SplineKernelTransform",), Metric=mattes)
        else:  # groupwise
            pm.update(Registration=single, Transform=("BSplineStackTransform",),
                      Metric=("VarianceOverLastDimensionMetric",), Interpolator=("ReducedDimensionBSplineInterpolator",),
                      ResampleInterpolator=("FinalReducedDimensionBSplineInterpolator",))
        if transformName in ("bspline", "groupwise"):
            pm["GridSpacingSchedule"] = tuple(format_number(2.0 ** ((n - r - 1) / 2.0)) for r in range(n))
            pm["FinalGridSpacingInPhysicalUnits"] = (_std_to_string(spacing),)
        return _sorted(pm)

    # -- Python protocol ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._maps)

    def __getitem__(self, index):
        """Map ``index`` (negative indices count from the end); a slice gives a list of maps."""
        if isinstance(index, slice):
            return [ParameterMap(pm) for pm in self._maps[index]]
        if isinstance(index, (numbers.Integral, np.integer)) and not isinstance(index, bool) and index < 0:
            index += len(self._maps)
        return self.GetParameterMap(index)

    def __iter__(self):
        return iter(self.GetParameterMaps())

    def __eq__(self, other):
        if isinstance(other, ParameterObject):
            return self._maps == other._maps
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        transforms = ", ".join(pm.get("Transform", ("?",))[0] if pm.get("Transform") else "?" for pm in self._maps)
        count = f"{len(self._maps)} parameter map{'' if len(self._maps) == 1 else 's'}"
        return f"<ParameterObject: {count}{' (' + transforms + ')' if self._maps else ''}>"

    def __str__(self) -> str:
        """What ``print(po)`` shows in itk-elastix: ITK's object header, then ``ParameterMap <i>:`` blocks."""
        lines = [f"ParameterObject (0x{id(self):x})",
                 "  RTTI typeinfo:   elastix::ParameterObject",
                 "  Reference Count: 1",
                 f"  Modified Time: {self._mtime}",
                 "  Debug: Off",
                 "  Object Name: ",
                 "  Observers: ",
                 "    none"]
        for i, pm in enumerate(self._maps):
            lines.append(f"ParameterMap {i}: ")
            for name, vals in pm.items():
                lines.append("  (" + name + "".join(" " + (v if is_number(v) else f'"{v}"') for v in vals) + ")")
        return "\n".join(lines) + "\n"

    # -- snake_case aliases ---------------------------------------------------------------------------------
    new = New
    clone = Clone
    set_parameter_map = SetParameterMap
    set_parameter_maps = SetParameterMaps
    add_parameter_map = AddParameterMap
    get_parameter_map = GetParameterMap
    get_parameter_maps = GetParameterMaps
    get_number_of_parameter_maps = GetNumberOfParameterMaps
    set_parameter = SetParameter
    get_parameter = GetParameter
    has_parameter = HasParameter
    remove_parameter = RemoveParameter
    read_parameter_file = ReadParameterFile
    read_parameter_files = ReadParameterFiles
    add_parameter_file = AddParameterFile
    write_parameter_file = WriteParameterFile
    write_parameter_files = WriteParameterFiles
    get_default_parameter_map = GetDefaultParameterMap
