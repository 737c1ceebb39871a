"""transformix point files: the ``-def <file>`` input and ``outputpoints.txt`` (ELASTIX.md §12).

Input (elastix's ``itk::TransformixInputPointFileReader``): whitespace-separated tokens; the first is ``point``
(physical coordinates, mm) or ``index`` (voxel indices of the fixed/output grid); if it is neither it is read with C's
``atoi`` as the number of points and the points are indices. Then the number of points N (after ``point``/``index``),
then N·dim numbers; anything after them is ignored.

Output: one line per point, fields separated by TAB, coordinates space-separated, floats printed like C++
``std::fixed`` (6 decimals), indices as integers, the deformation in single precision (elastix stores it as
``itk::Vector<float>``)::

    Point	0	; InputIndex = [ 64 64 ]	; InputPoint = [ 64.000000 64.000000 ]	; OutputIndexFixed = [ 70 60 ]	; ...

``; OutputIndexMoving = [ … ]`` is appended only when a moving (``-in``) image is given.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .parameters import ParameterFileError

__all__ = ["format_output_points", "parse_point_text", "read_point_file", "round_index", "write_output_points"]

_ATOI = re.compile(r"[+-]?[0-9]+")


def _atoi(token: str) -> int:
    m = _ATOI.match(token)
    return int(m.group(0)) if m else 0


def parse_point_text(text: str, *, ndim: int | None = None, source: str = "") -> tuple:
    """Parse the text of a transformix point file; see :func:`read_point_file`."""
    where = f"Filename: {source}" if source else ""
    tokens = text.split()
    if not tokens:
        raise ParameterFileError(f"The point file is empty.\n{where}".rstrip())
    first = tokens[0]
    if first in ("point", "index"):
        is_index = first == "index"
        if len(tokens) < 2:
            raise ParameterFileError(f"The file is not large enough. \n{where}".rstrip())
        try:
            count = int(tokens[1])
        except ValueError:
            raise ParameterFileError(f"the number of points {tokens[1]!r} is not an integer\n{where}".rstrip()) \
                from None
        rest = tokens[2:]
    else:
        is_index = True
        count = _atoi(first)
        rest = tokens[1:]
    if count < 0:
        raise ParameterFileError(f"the number of points must not be negative, got {count}\n{where}".rstrip())
    if ndim is None:
        if count == 0:
            ndim = 2
        elif len(rest) % count == 0 and len(rest) // count in (2, 3):
            ndim = len(rest) // count
        else:
            raise ParameterFileError(
                f"cannot tell the dimension of {count} points from {len(rest)} numbers; pass ndim\n{where}".rstrip())
    need = count * ndim
    if len(rest) < need:
        raise ParameterFileError(f"The file is not large enough. \n{where}".rstrip())
    try:
        values = np.array([float(t) for t in rest[:need]], dtype=float)
    except ValueError as exc:
        raise ParameterFileError(f"the point file holds a token that is not a number ({exc})\n{where}".rstrip()) \
            from None
    return values.reshape(count, ndim), is_index


def read_point_file(path, *, ndim: int | None = None) -> tuple:
    """Read a transformix input point file.

    Parameters
    ----------
    path : str or os.PathLike
    ndim : int, optional
        The point dimension; inferred from the number of values when omitted.

    Returns
    -------
    points : ndarray, shape (N, ndim)
        Physical points (x, y[, z] in mm) or voxel indices (x first), as written in the file.
    is_index : bool
        True for indices (first token ``index`` or a number).

    Raises
    ------
    ParameterFileError
        Missing file, too few numbers ("The file is not large enough."), non-numeric values.
    """
    p = Path(os.fspath(path))
    if not p.is_file():
        raise ParameterFileError(f"ERROR: the input point file {os.fspath(path)} does not exist")
    return parse_point_text(p.read_text(errors="replace"), ndim=ndim, source=os.fspath(path))


def round_index(continuous) -> np.ndarray:
    """``itk::Math::Round`` (half-way cases up: 10.5 → 11, −0.5 → 0) of continuous indices, as int64."""
    return np.floor(np.asarray(continuous, dtype=float) + 0.5).astype(np.int64)


def _fmt_floats(row) -> str:
    return "".join(f"{float(v):f} " for v in row)


def _fmt_ints(row) -> str:
    return "".join(f"{int(v)} " for v in row)


def format_output_points(input_index, input_point, output_index_fixed, output_point, *, deformation=None,
                         output_index_moving=None) -> str:
    """The text of ``outputpoints.txt``, byte for byte as transformix writes it.

    Parameters
    ----------
    input_index, output_index_fixed : array_like of int, shape (N, ndim)
        ITK indices (x first) in the fixed/output grid.
    input_point, output_point : array_like, shape (N, ndim)
        Physical points (mm).
    deformation : array_like, shape (N, ndim), optional
        Default ``output_point − input_point``; printed in single precision like elastix.
    output_index_moving : array_like of int, shape (N, ndim), optional
        Indices in the moving (``-in``) image; the field is written only when given.
    """
    ii = np.atleast_2d(np.asarray(input_index))
    ip = np.atleast_2d(np.asarray(input_point, dtype=float))
    oi = np.atleast_2d(np.asarray(output_index_fixed))
    op = np.atleast_2d(np.asarray(output_point, dtype=float))
    n = ip.shape[0]
    if ip.size == 0:
        n = 0
    d = (op - ip) if deformation is None else np.atleast_2d(np.asarray(deformation, dtype=float))
    d = d.astype(np.float32)
    om = None if output_index_moving is None else np.atleast_2d(np.asarray(output_index_moving))
    arrays = [ii, oi, op, d] + ([om] if om is not None else [])
    if n and any(a.shape != ip.shape for a in arrays):
        raise ValueError("input_index, input_point, output_index_fixed, output_point, deformation and "
                         f"output_index_moving must all have shape {ip.shape}")
    lines = []
    for j in range(n):
        line = (f"Point\t{j}\t; InputIndex = [ {_fmt_ints(ii[j])}]\t; InputPoint = [ {_fmt_floats(ip[j])}]"
                f"\t; OutputIndexFixed = [ {_fmt_ints(oi[j])}]\t; OutputPoint = [ {_fmt_floats(op[j])}]"
                f"\t; Deformation = [ {_fmt_floats(d[j])}]")
        if om is not None:
            line += f"\t; OutputIndexMoving = [ {_fmt_ints(om[j])}]"
        lines.append(line + "\n")
    return "".join(lines)


def write_output_points(path, input_index, input_point, output_index_fixed, output_point, *, deformation=None,
                        output_index_moving=None) -> Path:
    """Write ``outputpoints.txt`` (see :func:`format_output_points`) atomically; returns the path."""
    from ..io import atomic_output

    text = format_output_points(input_index, input_point, output_index_fixed, output_point,
                                deformation=deformation, output_index_moving=output_index_moving)
    with atomic_output(path) as tmp, open(tmp, "w", newline="\n") as fh:
        fh.write(text)
    return Path(os.fspath(path))
