"""Argument checks shared by the public API: every message names the argument and the fix."""
from __future__ import annotations

import numbers

import numpy as np

from .kernels._backend import get_array_module


def as_float_tuple(value, ndim: int, name: str, *, axes: str = "x first") -> tuple:
    """``value`` (scalar or sequence of length ``ndim``) as a tuple of finite floats; ``axes`` names the order in
    error messages ("x first" for SimpleITK-ordered geometry, "array-axis order" for kernel-side lengths)."""
    if isinstance(value, numbers.Number):
        out = (float(value),) * ndim
    else:
        try:
            out = tuple(float(v) for v in np.asarray(value, dtype=float).ravel())
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a number or a sequence of {ndim} numbers, got {value!r}") from exc
        if len(out) != ndim:
            raise ValueError(f"{name} must have {ndim} entries (one per spatial axis, {axes}), got {len(out)}: {value!r}")
    if not all(np.isfinite(out)):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def check_spacing(spacing, ndim: int, name: str = "spacing", *, axes: str = "x first") -> tuple:
    """Strictly positive finite lengths in mm (a spacing, a window radius), one per axis."""
    out = as_float_tuple(spacing, ndim, name, axes=axes)
    if any(h <= 0 for h in out):
        raise ValueError(f"{name} must be strictly positive (mm, {axes}), got {out}")
    return out


def check_direction(direction, ndim: int, name: str = "direction") -> tuple:
    """Direction cosines as SimpleITK's flat row-major tuple; must be orthonormal (rotation or reflection)."""
    if direction is None:
        return tuple(np.eye(ndim).ravel().tolist())
    try:
        d = np.asarray(direction, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a {ndim}x{ndim} matrix or a flat sequence of {ndim * ndim} numbers") from exc
    if d.size != ndim * ndim:
        raise ValueError(f"{name} must have {ndim * ndim} entries ({ndim}x{ndim} direction cosines), got {d.size}")
    d = d.reshape(ndim, ndim)
    if not np.all(np.isfinite(d)):
        raise ValueError(f"{name} must be finite, got {d.tolist()}")
    if not np.allclose(d.T @ d, np.eye(ndim), atol=1e-4):
        raise ValueError(
            f"{name} must be orthonormal (columns are unit axis directions, as in ITK/SimpleITK); got "
            f"{d.tolist()} with D^T D = {(d.T @ d).round(6).tolist()}"
        )
    return tuple(d.ravel().tolist())


def check_finite(data, name: str) -> None:
    """Raise ValueError if a floating/complex array holds NaN or Inf."""
    xp = get_array_module(data)
    if data.dtype.kind not in "fc":
        return
    finite = xp.isfinite(data)
    if not bool(finite.all()):
        bad = int(data.size - int(finite.sum()))
        raise ValueError(
            f"{name} contains {bad} NaN or Inf value(s); replace them (e.g. numpy.nan_to_num) or mask them out"
        )


def check_ndim(ndim: int, name: str) -> int:
    if ndim not in (2, 3):
        raise ValueError(f"{name} must be 2-D or 3-D, got {ndim} spatial dimension(s)")
    return ndim


def keyword_choice(value, choices, name: str):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value
