"""elastix parameter files: the line grammar, typed look-ups and writing (ELASTIX.md §4, §9).

A parameter map is a ``dict[str, tuple[str, ...]]``: every value is a string, as in elastix (``"4"`` and ``4`` are
the same). :func:`parse_parameter_text` reproduces ``itk::ParameterFileParser`` (elastix 5.x) line by line, quirks
included, so a file means here what it means to elastix. :class:`ParameterLookup` reads typed values with elastix's
rules: per-resolution entries fall back to entry 0 (not to the last one), a component-prefixed name
(``Metric1Weight``) wins over the plain one, and every name read is recorded so that the names a run never used
(typos such as ``FinalGridSpacingInVoxel``) can be reported.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["ParameterFileError", "parse_parameter_text", "read_parameter_file", "format_parameter_map",
           "write_parameter_file", "ParameterLookup", "is_number", "format_number", "to_bool", "to_int",
           "to_float"]

ParameterMap = dict  # dict[str, tuple[str, ...]]


class ParameterFileError(ValueError):
    """A parameter file that elastix would reject (elastix exits 1 on these)."""


# ------------------------------------------------------------------------------------------------ grammar
# itk::ParameterFileParser's name check is the itksys regex "[.,:;!@#$%^&-+|<>?]", in which "&-+" is a range:
# & ' ( ) * + are invalid too, while "-" and "_" are allowed.
_INVALID_NAME = re.compile(r"[.,:;!@#$%^&'()*+|<>?]")
_TWO_WORDS = re.compile(r"[ ]+[^ ]+")


def _invalid(line: str, hint: str, source: str) -> ParameterFileError:
    return ParameterFileError(
        f"ERROR: the following line in your parameter file is invalid: \n\"{line}\"\n{hint}\n"
        f"Please correct you parameter file!" + (f" ({source})" if source else "")
    )


def _split(full: str, line: str, source: str) -> list:
    if line.count('"') % 2:
        raise _invalid(full, 'This line has an odd number of quotes (").', source)
    parts = [""]
    quotes = 0
    for ch in line:
        if ch == '"':
            parts.append("")
            quotes += 1
        elif ch == " " and quotes % 2 == 0:
            parts.append("")
        else:
            parts[-1] += ch
    return parts


def parse_parameter_text(text: str, source: str = "") -> dict:
    """Parse the text of an elastix parameter file into ``{name: (value, ...)}``, exactly as elastix 5.x does.

    Per line: tabs become spaces; everything from the first ``//`` on is dropped (even inside quotes); blank lines
    are skipped; the rest must be ``(Name value ...)``. Values are split at spaces outside quotes and at every
    quote; empty tokens are dropped (so ``""`` gives no value). Names with any of ``.,:;!@#$%^&'()*+|<>?`` and names
    given twice are errors. ``source`` (a file name) is added to error messages.

    Raises
    ------
    ParameterFileError
        With elastix's message for the first invalid line.
    """
    out: dict = {}
    for raw in text.split("\n"):
        if raw.endswith("\r"):  # itksys::SystemTools::GetLineFromStream drops the CR of CRLF
            raw = raw[:-1]
        line = raw.replace("\t", " ")
        cut = line.find("//")
        if cut >= 0:
            line = line[:cut]
        line = line.lstrip(" ").rstrip(" \t")
        if not line.strip(" "):
            continue
        if not (line.startswith("(") and line.endswith(")")):
            raise _invalid(raw, 'Line is not between brackets: "(...)".', source)
        line = line[1:-1]
        if not _TWO_WORDS.search(line):
            raise _invalid(raw, "Line does not contain a parameter name and value.", source)
        parts = _split(raw, line, source)
        name = parts[0].replace(" ", "")
        values = tuple(v for v in parts[1:] if v)
        if _INVALID_NAME.search(name):
            raise _invalid(raw, f'The parameter "{name}" contains invalid characters (.,:;!@#$%^&-+|<>?).', source)
        if name in out:
            raise _invalid(raw, f'The parameter "{name}" is specified more than once.', source)
        out[name] = values
    return out


def _parse_toml(text: str, source: str) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        try:
            import tomli as tomllib  # the same parser, for Python 3.10
        except ImportError:
            raise ParameterFileError(f"cannot read the TOML parameter file {source!r}: Python < 3.11 needs the "
                                     "'tomli' package (pip install tomli)") from None

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ParameterFileError(f"TOML parse error: {exc} (while parsing {source!r})") from None

    def value(v, key):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, str)):
            return str(v)
        if isinstance(v, float):
            return format_number(v)
        raise ParameterFileError(f"{source}: TOML value of {key!r} has unsupported type {type(v).__name__}")

    return {k: tuple(value(x, k) for x in (v if isinstance(v, list) else [v])) for k, v in data.items()}


def read_parameter_file(path) -> dict:
    """Read an elastix parameter file (``.txt``; ``.toml`` as elastix 5.2) into ``{name: (value, ...)}``.

    Raises
    ------
    ParameterFileError
        Missing file, a directory, another extension, or an invalid line — with elastix's wording.
    """
    p = Path(os.fspath(path))
    if not str(path):
        raise ParameterFileError("ERROR: FileName has not been set.")
    if not p.exists():
        raise ParameterFileError(f"ERROR: the file {path} does not exist.")
    if p.is_dir():
        raise ParameterFileError(f"ERROR: the file {path} is a directory.")
    if p.suffix not in (".txt", ".toml"):
        raise ParameterFileError(f"ERROR: the file {path} should be a text file (*.txt) or a TOML file (*.toml).")
    data = p.read_bytes().decode("utf-8", errors="surrogateescape")
    if p.suffix == ".toml":
        return _parse_toml(data, str(path))
    return parse_parameter_text(data, str(path))


# ------------------------------------------------------------------------------------------------ numbers
_INT = re.compile(r"\s*[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?inf")
_SCI_TAIL = re.compile(r"(?:\.[0-9]+)?e[+-][0-9]+")


def is_number(s: str) -> bool:
    """elastix's ``Conversion::IsNumber``: the values written without quotes (``-1.5``, ``3``, ``1.2e-07``)."""
    t = s[1:] if s.startswith("-") else s
    if not t or not (t[0].isascii() and t[0].isdigit() and t[-1].isascii() and t[-1].isdigit()):
        return False
    rest = t[1:]
    digits = sum(c in "0123456789" for c in rest)
    if digits == len(rest) or ("." in rest and digits == len(rest) - 1):
        return True
    return _SCI_TAIL.fullmatch(rest) is not None


def format_number(x: float) -> str:
    """Shortest round-trip text of a float as elastix 5.2 writes it (``Conversion::ToString(double)``).

    That is ``itk::NumberToString<double>``: double-conversion's shortest digits in ECMAScript layout — fixed
    notation for decimal exponents -7 < e < 21 (``1``, ``0.1``, ``0.000001``, ``100000000000000000000``), otherwise
    ``1e-7``, ``1.5e+21`` (no zero padding of the exponent, unlike Python's ``1e-07``); ``-0`` is ``0``; ``NaN``,
    ``Infinity``, ``-Infinity``. Cases from elastix's ``Common/GTesting/elxConversionGTest.cxx``.
    """
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0"
    mantissa, _, exp = repr(abs(x)).partition("e")  # Python's repr gives the same shortest digits
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    point = len(whole) + int(exp or 0) - (len(whole + frac) - len(digits))  # x = 0.<digits> * 10**point
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= point <= 21:
        text = digits + "0" * (point - k)
    elif 0 < point <= 21:
        text = digits[:point] + "." + digits[point:]
    elif -6 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        e = point - 1
        text = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e >= 0 else "-") + str(abs(e))
    return "-" + text if x < 0 else text


def to_bool(s: str) -> bool:
    """``"true"``/``"false"`` exactly (elastix rejects ``"True"``)."""
    if s == "true":
        return True
    if s == "false":
        return False
    raise ValueError(f"{s!r} is not a boolean (elastix accepts exactly \"true\" or \"false\")")


def to_int(s: str, *, unsigned: bool = False) -> int:
    """A C++ stream integer: ``6`` and ``6.000000`` are 6; ``6.5``, ``1e3`` and ``0x10`` are errors."""
    t = s
    dot = t.find(".")
    if dot >= 0 and set(t[dot + 1:]) <= {"0"}:
        t = t[:dot]
    if (unsigned and s.startswith("-")) or not _INT.fullmatch(t):
        raise ValueError(f"{s!r} is not an {'unsigned ' if unsigned else ''}integer")
    return int(t)


def to_float(s: str) -> float:
    """double-conversion's parse (``1e-7``, ``-.5``, ``+3``, ``NaN``, ``Infinity``); trailing junk is an error."""
    if s == "NaN":
        return math.nan
    if s in ("Infinity", "-Infinity"):
        return math.inf if s[0] == "I" else -math.inf
    if not _FLOAT.fullmatch(s):
        raise ValueError(f"{s!r} is not a number")
    return float(s)


_CONVERT = {bool: to_bool, int: to_int, float: to_float, str: str}


def _stream_text(value) -> str:
    """``value`` as elastix prints a default in a warning: bools as true/false, doubles like ``std::ostream``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


# ------------------------------------------------------------------------------------------------ writing
def format_parameter_map(parameters: Mapping, *, blocks: Sequence[tuple[str, Sequence[str]]] = ()) -> str:
    """The text of a parameter map in elastix 5.2's layout: numbers bare, other values in double quotes.

    ``blocks`` groups names under ``// <title>`` comment lines, in that order; names in no block come first,
    and every group is sorted by name (as elastix 5.2 writes ``TransformParameters`` files).
    """
    def line(name):
        vals = parameters[name]
        if isinstance(vals, str):
            vals = (vals,)
        return "(" + name + "".join(" " + (v if is_number(v) else f'"{v}"') for v in map(str, vals)) + ")"

    grouped = {n for _, names in blocks for n in names}
    chunks = ["\n".join(line(n) for n in sorted(n for n in parameters if n not in grouped))]
    for title, names in blocks:
        present = sorted(n for n in names if n in parameters)
        if present:
            chunks.append(f"// {title}\n" + "\n".join(line(n) for n in present))
    text = "\n\n".join(c for c in chunks if c)
    return text + "\n" if text else ""  # an empty map is an empty text, as Conversion::ParameterMapToString


def write_parameter_file(parameters: Mapping, path, **kwargs) -> Path:
    """Write a parameter map (see :func:`format_parameter_map`) atomically to ``path``."""
    from ..io import atomic_output

    with atomic_output(path) as tmp:
        Path(tmp).write_text(format_parameter_map(parameters, **kwargs))
    return Path(os.fspath(path))


# ------------------------------------------------------------------------------------------------ look-ups
class ParameterLookup:
    """Typed reads from one parameter map with elastix's rules, recording every name that was read.

    Parameters
    ----------
    parameters : mapping of str to sequence of str
        The parameter map (not modified).
    source : str
        The file name, used in messages.
    """

    def __init__(self, parameters: Mapping, source: str = ""):
        self.parameters = {k: tuple(v) if not isinstance(v, str) else (v,) for k, v in parameters.items()}
        self.source = source
        self.used: set = set()
        self.warnings: list = []

    def __contains__(self, name: str) -> bool:
        return name in self.parameters

    def has(self, name: str, prefix: str = "") -> bool:
        return name in self.parameters or (bool(prefix) and prefix + name in self.parameters)

    def values(self, name: str, prefix: str = "") -> tuple | None:
        """The raw values of ``<prefix><name>`` if given with values, else of ``name``; None if neither exists.

        Both names count as read, as in elastix (``Configuration::AccessParameter``).
        """
        keys = ([prefix + name] if prefix else []) + [name]
        present = [k for k in keys if k in self.parameters]
        self.used.update(present)
        for key in present:
            if self.parameters[key]:
                return self.parameters[key]
        return self.parameters[present[0]] if present else None

    def get(self, name: str, kind=str, default=None, *, entry: int = 0, prefix: str = ""):
        """Entry ``entry`` of ``name`` (entry 0 if the list is shorter), converted to ``kind``.

        With ``prefix`` (a component label such as ``Metric1``), ``<prefix><name>`` wins over ``name``. This is
        ``itk::ParameterMapInterface::ReadParameter(value, name, prefix, entry, 0)``: it reads entry 0 and then
        entry ``entry`` of ``name``, then the same of ``<prefix><name>``; the last successful read wins and every
        value read must convert (``Common/ParameterFileParser/itkParameterMapInterface.h``).

        A missing parameter gives ``default`` and, if ``default`` is not None, elastix's warning (naming the plain
        ``name``, the default printed as a C++ stream prints it). A value that does not convert is a
        :class:`ParameterFileError` naming the parameter and the entry.
        """
        result, found = default, False
        for key in (name, prefix + name) if prefix else (name,):
            vals = self.parameters.get(key)
            if key in self.parameters:
                self.used.add(key)
            for k in (0, entry):
                if vals is not None and k < len(vals):
                    result, found = self._convert(vals[k], kind, key, k), True
        if not found and default is not None:
            self.warnings.append(f'WARNING: The parameter "{name}", requested at entry number {entry}, does not '
                                 f'exist at all.\n  The default value "{_stream_text(default)}" is used instead.')
        return result

    def get_list(self, name: str, kind=str, default=None, *, prefix: str = "") -> list | None:
        """All entries of ``name`` converted to ``kind`` (``default`` if absent)."""
        vals = self.values(name, prefix)
        if vals is None:
            return default
        return [self._convert(v, kind, name, i) for i, v in enumerate(vals)]

    def _convert(self, value: str, kind, name: str, entry: int):
        try:
            return _CONVERT[kind](value)
        except ValueError as exc:
            where = f" in {self.source}" if self.source else ""
            raise ParameterFileError(f'ERROR: the parameter "{name}" (entry {entry}) could not be read as '
                                     f'{kind.__name__}{where}: {exc}') from None

    def unused(self) -> list:
        """The names present in the map that no look-up read (sorted)."""
        return sorted(set(self.parameters) - self.used)
