"""``Image``: an array in numpy axis order plus its physical geometry (spacing, origin, direction).

One convention, stated once (docs/conventions.md):

* ``data`` is indexed like numpy: a 3-D image is ``data[z, y, x]``; a vector image (e.g. a displacement field) has
  one trailing component axis, ``data[z, y, x, c]``.
* ``spacing``, ``origin`` and ``direction`` are exactly what SimpleITK's ``GetSpacing()``, ``GetOrigin()`` and
  ``GetDirection()`` report: tuples in (x, y[, z]) order, the direction as a flat row-major tuple whose *columns*
  are the physical directions of the x, y, z index axes.  Physical points are (x, y[, z]) in millimetres in the
  ITK/LPS world, as SimpleITK, ANTs and elastix report them.
* ``affine`` maps an index in *array axis order* (homogeneous) to a physical point:
  ``point = affine @ [i_z, i_y, i_x, 1]``.  It is the one place where the axis order is reversed.
"""
from __future__ import annotations

import warnings

import numpy as np

from ._checks import (
    as_float_tuple,
    check_direction,
    check_finite,
    check_ndim,
    check_spacing,
)
from .kernels._backend import get_array_module, is_cupy_array

__all__ = ["Image", "as_mask"]

_WARNED_NO_SPACING = False


class Image:
    """An image (scalar or vector) with its physical-space geometry.

    Parameters
    ----------
    data : ndarray
        Pixel data in numpy axis order, shape ``(*spatial)`` or ``(*spatial, C)`` for a vector image. A numpy or a
        CuPy array (the latter keeps the image on the GPU). Not copied; classreg never writes into it.
    spacing : float or sequence of float
        Voxel size in mm along x, y[, z] (SimpleITK order). Must be strictly positive.
    origin : sequence of float, optional
        Physical position (mm, LPS) of the centre of the first voxel, (x, y[, z]). Default 0.
    direction : sequence of float or ndarray, optional
        Direction cosines as SimpleITK reports them (flat row-major) or as a matrix. Default identity.
    vector : bool, optional
        Whether the last axis of ``data`` is a component axis. Inferred when ``spacing`` is a sequence whose length
        is ``data.ndim - 1``.

    Raises
    ------
    ValueError
        Non-positive or non-finite spacing, non-orthonormal direction, NaN/Inf in the data, complex-valued data, or
        a dimension that is not 2-D or 3-D.
    TypeError
        Non-numeric data.
    """

    __slots__ = ("_data", "_spacing", "_origin", "_direction", "_vector")

    def __init__(self, data, spacing, origin=None, direction=None, *, vector=None):
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            data = np.asarray(data)
        if data.dtype.kind not in "biufc":
            raise TypeError(f"data must be a numeric array, got dtype {data.dtype}")
        if data.dtype.kind == "c":
            raise ValueError(
                f"data has complex dtype {data.dtype}; classreg registers real-valued images: pass the magnitude "
                "(numpy.abs(data)) or the real part (data.real)"
            )
        if vector is None:
            if np.ndim(spacing) == 1 and len(spacing) == data.ndim - 1:
                vector = True
            else:
                vector = False
        vector = bool(vector)
        ndim = data.ndim - 1 if vector else data.ndim
        check_ndim(ndim, "data")
        if vector and data.shape[-1] < 1:
            raise ValueError("data: a vector image needs at least one component on its last axis")
        if 0 in data.shape:
            raise ValueError(f"data must not be empty, got shape {data.shape}")
        self._spacing = check_spacing(spacing, ndim, "spacing")
        self._origin = as_float_tuple(0.0 if origin is None else origin, ndim, "origin")
        self._direction = check_direction(direction, ndim, "direction")
        check_finite(data, "data")
        self._data = data
        self._vector = vector

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_array(cls, data, *, spacing=None, origin=None, direction=None, vector=False) -> "Image":
        """Wrap an array. Without ``spacing``, 1 mm is assumed and a warning is issued once per process.

        Geometry is never dropped silently: pass ``spacing`` (and ``origin``/``direction``) whenever the array
        came from a scanner image.
        """
        global _WARNED_NO_SPACING
        if spacing is None:
            if not _WARNED_NO_SPACING:
                warnings.warn(
                    "Image.from_array: no spacing given, assuming 1 mm voxels; pass spacing=... (x, y[, z] in mm) "
                    "to keep results in physical units",
                    UserWarning,
                    stacklevel=2,
                )
                _WARNED_NO_SPACING = True
            spacing = 1.0
        return cls(data, spacing, origin, direction, vector=vector)

    @classmethod
    def from_sitk(cls, image) -> "Image":
        """Convert a ``SimpleITK.Image`` (geometry copied exactly)."""
        import SimpleITK as sitk

        data = sitk.GetArrayFromImage(image)
        vector = image.GetNumberOfComponentsPerPixel() > 1 or image.GetPixelID() in _SITK_VECTOR_IDS()
        return cls(data, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), vector=vector)

    def to_sitk(self):
        """A ``SimpleITK.Image`` with the same data and geometry (data copied to the host)."""
        import SimpleITK as sitk

        data = np.ascontiguousarray(self.numpy())
        if data.dtype == np.bool_:
            data = data.astype(np.uint8)
        img = sitk.GetImageFromArray(data, isVector=self._vector)
        img.SetSpacing(self._spacing)
        img.SetOrigin(self._origin)
        img.SetDirection(self._direction)
        return img

    def like(self, data, *, vector=None) -> "Image":
        """A new image with this image's geometry and ``data`` (same spatial shape)."""
        if vector is None:
            vector = data.ndim == self.ndim + 1
        img = Image(data, self._spacing, self._origin, self._direction, vector=vector)
        if img.shape != self.shape:
            raise ValueError(f"data has spatial shape {img.shape}, expected {self.shape}")
        return img

    def copy(self) -> "Image":
        return Image(self._data.copy(), self._spacing, self._origin, self._direction, vector=self._vector)

    def to(self, device) -> "Image":
        """This image on ``device`` ("cpu" or "cuda"); returns ``self`` if the data is already there."""
        from .backend import to_device

        data = to_device(self._data, device)
        if data is self._data:
            return self
        return Image(data, self._spacing, self._origin, self._direction, vector=self._vector)

    def numpy(self) -> np.ndarray:
        """The data as a host numpy array (no copy for numpy data)."""
        if is_cupy_array(self._data):
            return self._data.get()
        return np.asarray(self._data)

    def astype(self, dtype) -> "Image":
        return self.like(self._data.astype(dtype, copy=False), vector=self._vector)

    # ------------------------------------------------------------------ properties
    @property
    def data(self):
        return self._data

    @property
    def spacing(self) -> tuple:
        return self._spacing

    @property
    def origin(self) -> tuple:
        return self._origin

    @property
    def direction(self) -> tuple:
        return self._direction

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction cosines as an (ndim, ndim) matrix; column k is the physical direction of index axis k (x first)."""
        n = self.ndim
        return np.asarray(self._direction, dtype=float).reshape(n, n)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self._spacing)

    @property
    def shape(self) -> tuple:
        """Spatial shape in numpy axis order."""
        return tuple(self._data.shape[: self.ndim])

    @property
    def size(self) -> tuple:
        """Spatial size in SimpleITK (x, y[, z]) order."""
        return tuple(reversed(self.shape))

    @property
    def is_vector(self) -> bool:
        return self._vector

    @property
    def ncomponents(self) -> int:
        return int(self._data.shape[-1]) if self._vector else 1

    @property
    def dtype(self):
        return self._data.dtype

    @property
    def spacing_array_order(self) -> tuple:
        """Spacing in numpy axis order (z, y, x), the order kernels take."""
        return tuple(reversed(self._spacing))

    @property
    def affine(self) -> np.ndarray:
        """(ndim+1, ndim+1) matrix mapping a homogeneous index in numpy axis order to a physical point (x, y[, z])."""
        n = self.ndim
        lin = self.direction_matrix @ np.diag(self._spacing)  # acts on (x, y, z) indices
        a = np.eye(n + 1)
        a[:n, :n] = lin[:, ::-1]  # reorder columns to act on (z, y, x) indices
        a[:n, n] = self._origin
        return a

    @property
    def inverse_affine(self) -> np.ndarray:
        """Inverse of :attr:`affine`: physical point (x, y[, z]) → index in numpy axis order."""
        return np.linalg.inv(self.affine)

    # ------------------------------------------------------------------ coordinates
    def index_to_world(self, index) -> np.ndarray:
        """Physical points (N, ndim) in (x, y[, z]) mm for continuous indices (N, ndim) in numpy axis order."""
        idx = _points(index, self.ndim, "index")
        a = self.affine
        return idx @ a[:-1, :-1].T + a[:-1, -1]

    def world_to_index(self, points) -> np.ndarray:
        """Continuous indices (N, ndim) in numpy axis order for physical points (N, ndim) in (x, y[, z]) mm."""
        pts = _points(points, self.ndim, "points")
        a = self.inverse_affine
        return pts @ a[:-1, :-1].T + a[:-1, -1]

    @property
    def center(self) -> np.ndarray:
        """Physical centre (mm) of the voxel-centre box, (x, y[, z]): ITK/elastix's geometric centre."""
        return self.index_to_world(((np.asarray(self.shape, dtype=float) - 1.0) / 2.0)[None])[0]

    def grid_points(self) -> np.ndarray:
        """Physical coordinates of every voxel centre, shape (*spatial, ndim), components (x, y[, z])."""
        axes = [np.arange(n, dtype=float) for n in self.shape]
        idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        a = self.affine
        return idx @ a[:-1, :-1].T + a[:-1, -1]

    def same_grid(self, other: "Image", *, atol: float = 1e-6) -> bool:
        """True if ``other`` has the same spatial shape, spacing, origin and direction (within ``atol``)."""
        return (
            self.shape == other.shape
            and np.allclose(self._spacing, other.spacing, atol=atol, rtol=0)
            and np.allclose(self._origin, other.origin, atol=atol, rtol=0)
            and np.allclose(self._direction, other.direction, atol=atol, rtol=0)
        )

    def __repr__(self) -> str:
        kind = f"vector[{self.ncomponents}]" if self._vector else "scalar"
        dev = "cuda" if is_cupy_array(self._data) else "cpu"
        return (
            f"Image({kind}, shape={self.shape}, dtype={self.dtype}, spacing={self._spacing}, "
            f"origin={self._origin}, direction={self._direction}, device={dev})"
        )


def _points(points, ndim: int, name: str) -> np.ndarray:
    p = np.asarray(points, dtype=float)
    if p.ndim == 1 and p.shape[0] == ndim:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != ndim:
        raise ValueError(f"{name} must have shape (N, {ndim}), got {np.shape(points)}")
    return p


def _SITK_VECTOR_IDS():
    import SimpleITK as sitk

    return {
        getattr(sitk, n)
        for n in dir(sitk)
        if n.startswith("sitkVector") and isinstance(getattr(sitk, n), int) and getattr(sitk, n) >= 0
    }


def as_mask(mask, reference: Image, name: str):
    """Validate a mask for ``reference``: an ``Image`` or array of the same spatial shape, not empty.

    Returns a boolean array (on the reference's device) or ``None``.
    """
    if mask is None:
        return None
    xp = get_array_module(reference.data)
    if isinstance(mask, Image):
        if mask.shape != reference.shape:
            raise ValueError(f"{name} has shape {mask.shape}, but the image it belongs to has shape {reference.shape}")
        if not np.allclose(mask.spacing, reference.spacing, rtol=1e-5) or not np.allclose(
            mask.origin, reference.origin, atol=1e-4
        ):
            raise ValueError(f"{name} is not on the same grid as its image (spacing/origin differ); resample it first")
        m = mask.data
    else:
        m = mask
    if xp is np:  # a CuPy mask of a host image comes to the host
        from .backend import to_numpy

        m = to_numpy(m)
    else:
        m = xp.asarray(m)
    if tuple(m.shape) != reference.shape:
        raise ValueError(f"{name} has shape {tuple(m.shape)}, but the image it belongs to has shape {reference.shape}")
    m = m != 0
    if not bool(m.any()):
        raise ValueError(f"{name} is empty (no non-zero voxel); pass None to use the whole image")
    return m
