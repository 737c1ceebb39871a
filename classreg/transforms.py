"""Spatial transforms in physical space: :class:`Affine`, :class:`DisplacementField`, :class:`BSplineTransform`,
:class:`Chain`.

Direction convention (as in ITK and elastix): a registration transform maps **fixed-image physical points to
moving-image physical points** — the pull-back used to resample the moving image onto the fixed grid.  Points are
(x, y[, z]) in mm in the ITK/LPS world, arrays of shape (N, ndim).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from ._checks import as_float_tuple, check_direction, check_ndim, check_spacing
from .image import Image, _points
from .io import _check_readable, atomic_output, image_extension, load, save

__all__ = ["Transform", "Affine", "DisplacementField", "BSplineTransform", "Chain", "load_transform",
           "TRANSFORM_EXTENSIONS", "register_transform_format"]

#: Extensions of ITK transform files (read/written through SimpleITK).
TRANSFORM_EXTENSIONS = (".tfm", ".txt", ".mat", ".h5", ".hdf5")

logger = logging.getLogger(__name__)


class Transform:
    """Base class: a map from fixed-image physical points to moving-image physical points."""

    ndim: int

    def map_points(self, points) -> np.ndarray:  # pragma: no cover - abstract
        """Map physical points (N, ndim), (x, y[, z]) mm, from fixed space to moving space."""
        raise NotImplementedError

    def inverse(self) -> "Transform":  # pragma: no cover - abstract
        """The transform mapping moving-space points back to fixed space."""
        raise NotImplementedError

    def to_sitk(self):  # pragma: no cover - abstract
        """The equivalent ``SimpleITK.Transform``."""
        raise NotImplementedError

    def save(self, path) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def compose(self, other: "Transform") -> "Transform":
        """``self ∘ other``: the transform ``x ↦ self(other(x))`` (``other`` is applied first)."""
        if not isinstance(other, Transform):
            raise TypeError(f"other must be a classreg Transform, got {type(other).__name__}")
        if other.ndim != self.ndim:
            raise ValueError(f"cannot compose a {self.ndim}-D transform with a {other.ndim}-D one")
        return Chain([other, self])

    def _check_points(self, points) -> np.ndarray:
        return _points(points, self.ndim, "points")


def _check_ndim_from(value, name) -> int:
    return check_ndim(int(value), name)


class Affine(Transform):
    """Affine transform ``x ↦ A (x − c) + c + t``, exactly ITK's ``AffineTransform`` (and its Euler/similarity kin).

    Parameters
    ----------
    matrix : array_like, shape (ndim, ndim)
        The linear part A, acting on physical (x, y[, z]) vectors.
    translation : float or array_like, shape (ndim,)
        t in mm. Default 0.
    center : float or array_like, shape (ndim,)
        Centre of rotation c in mm. Default 0. It changes the parametrisation, not the map, for a given offset.
    """

    def __init__(self, matrix, translation=0.0, center=0.0):
        a = np.array(matrix, dtype=float)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"matrix must be square (ndim, ndim), got shape {a.shape}")
        self.ndim = _check_ndim_from(a.shape[0], "matrix")
        if not np.all(np.isfinite(a)):
            raise ValueError("matrix must be finite")
        if abs(np.linalg.det(a)) < 1e-12:
            raise ValueError("matrix is singular; an affine registration transform must be invertible")
        a.setflags(write=False)
        self._matrix = a
        self._translation = np.array(as_float_tuple(translation, self.ndim, "translation"))
        self._center = np.array(as_float_tuple(center, self.ndim, "center"))
        self._translation.setflags(write=False)
        self._center.setflags(write=False)

    # -- constructors ----------------------------------------------------------------------------------------
    @classmethod
    def identity(cls, ndim: int) -> "Affine":
        return cls(np.eye(_check_ndim_from(ndim, "ndim")))

    @classmethod
    def from_translation(cls, translation) -> "Affine":
        """Pure translation by ``translation`` (mm, x first)."""
        t = np.asarray(translation, dtype=float).ravel()
        return cls(np.eye(_check_ndim_from(t.size, "translation")), t)

    @classmethod
    def euler(cls, angles, *, translation=0.0, center=0.0) -> "Affine":
        """Rigid transform from Euler angles in radians, as ITK's ``Euler2DTransform`` / ``Euler3DTransform``.

        2-D: one angle (counter-clockwise from x towards y). 3-D: (θx, θy, θz) with ITK's default composition
        R = Rz · Rx · Ry (``ComputeZYX`` off).
        """
        return cls(rotation_matrix(angles), translation, center)

    @classmethod
    def rigid(cls, rotation, *, translation=0.0, center=0.0) -> "Affine":
        """Rigid transform from a rotation matrix (checked orthonormal with det +1) or Euler angles (radians)."""
        r = _rotation(rotation)
        return cls(r, translation, center)

    @classmethod
    def similarity(cls, scale, rotation, *, translation=0.0, center=0.0) -> "Affine":
        """Similarity transform ``x ↦ s R (x − c) + c + t`` (isotropic scale ``s`` > 0)."""
        s = float(scale)
        if not np.isfinite(s) or s <= 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        return cls(s * _rotation(rotation), translation, center)

    @classmethod
    def from_homogeneous(cls, matrix) -> "Affine":
        """From an (ndim+1, ndim+1) homogeneous matrix acting on physical (x, y[, z], 1)."""
        h = np.asarray(matrix, dtype=float)
        if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] not in (3, 4):
            raise ValueError(f"matrix must be 3x3 (2-D) or 4x4 (3-D) homogeneous, got shape {h.shape}")
        if not np.allclose(h[-1], np.eye(h.shape[0])[-1]):
            raise ValueError("the last row of a homogeneous affine matrix must be (0, ..., 0, 1)")
        n = h.shape[0] - 1
        return cls(h[:n, :n], h[:n, n])

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def matrix(self) -> np.ndarray:
        return self._matrix

    @property
    def translation(self) -> np.ndarray:
        return self._translation

    @property
    def center(self) -> np.ndarray:
        return self._center

    @property
    def offset(self) -> np.ndarray:
        """o in ``x ↦ A x + o`` (ITK's ``GetOffset``)."""
        return self._center + self._translation - self._matrix @ self._center

    @property
    def homogeneous(self) -> np.ndarray:
        """(ndim+1, ndim+1) homogeneous matrix of the map."""
        h = np.eye(self.ndim + 1)
        h[: self.ndim, : self.ndim] = self._matrix
        h[: self.ndim, self.ndim] = self.offset
        return h

    # -- operations ------------------------------------------------------------------------------------------
    def map_points(self, points) -> np.ndarray:
        """Map physical points (N, ndim) from fixed space to moving space: ``A (x − c) + c + t``."""
        p = self._check_points(points)
        return (p - self._center) @ self._matrix.T + self._center + self._translation

    def inverse(self) -> "Affine":
        """Exact inverse ``y ↦ A⁻¹ (y − c − t) + c`` (same centre)."""
        ainv = np.linalg.inv(self._matrix)
        return Affine(ainv, -ainv @ self._translation, self._center)

    def compose(self, other: Transform) -> Transform:
        """``self ∘ other``; two affines compose exactly into one :class:`Affine` (centre of ``other``)."""
        if isinstance(other, Affine):
            if other.ndim != self.ndim:
                raise ValueError(f"cannot compose a {self.ndim}-D transform with a {other.ndim}-D one")
            h = self.homogeneous @ other.homogeneous
            c = other.center
            a = h[: self.ndim, : self.ndim]
            t = h[: self.ndim, self.ndim] + a @ c - c
            return Affine(a, t, c)
        return super().compose(other)

    def to_sitk(self):
        import SimpleITK as sitk

        tx = sitk.AffineTransform(self.ndim)
        tx.SetMatrix(tuple(self._matrix.ravel()))
        tx.SetCenter(tuple(self._center))
        tx.SetTranslation(tuple(self._translation))
        return tx

    def save(self, path) -> Path:
        """Write an ITK transform file (.tfm/.txt text, .mat binary, .h5), readable by SimpleITK, ANTs, elastix."""
        return _write_sitk_transform(self.to_sitk(), path)

    def __repr__(self) -> str:
        return (
            f"Affine(matrix={self._matrix.round(6).tolist()}, translation={self._translation.round(6).tolist()}, "
            f"center={self._center.round(6).tolist()})"
        )


class DisplacementField(Transform):
    """Dense displacement field ``x ↦ x + u(x)`` on its own grid (an ITK ``DisplacementFieldTransform``).

    Parameters
    ----------
    image : Image
        Vector image with data shape ``(*spatial, ndim)``: component k is the displacement along physical axis
        x, y, z (k = 0, 1, 2) in mm — exactly what SimpleITK gives for an ITK displacement field. ``u`` is
        interpolated linearly between voxel centres; outside the grid (beyond half a voxel) ``u = 0``, as in ITK.
    inverse : DisplacementField, optional
        A known inverse (e.g. from a diffeomorphic solver); then :meth:`inverse` costs nothing.
    """

    def __init__(self, image: Image, *, inverse: "DisplacementField | None" = None, inversion_error=None):
        if not isinstance(image, Image):
            raise TypeError(f"image must be a classreg.Image (vector), got {type(image).__name__}")
        if not image.is_vector or image.ncomponents != image.ndim:
            raise ValueError(
                f"image must be a vector image with {image.ndim} components (displacement in mm along x, y[, z]); "
                f"got {image!r}"
            )
        if image.dtype.kind != "f":
            image = image.astype(np.float64)
        self.ndim = image.ndim
        self._image = image
        if inverse is not None and not isinstance(inverse, DisplacementField):
            raise TypeError("inverse must be a DisplacementField")
        self._inverse = inverse
        self.inversion_error = inversion_error

    @classmethod
    def from_array(cls, displacement, reference: Image, **kwargs) -> "DisplacementField":
        """Field on ``reference``'s grid from an array ``(*reference.shape, ndim)`` of (x, y[, z]) mm components."""
        return cls(reference.like(displacement, vector=True), **kwargs)

    @classmethod
    def identity(cls, reference: Image, dtype=np.float32) -> "DisplacementField":
        return cls.from_array(np.zeros((*reference.shape, reference.ndim), dtype=dtype), reference)

    @property
    def image(self) -> Image:
        return self._image

    @property
    def displacement(self):
        """Displacement array ``(*spatial, ndim)``, components (x, y[, z]) in mm."""
        return self._image.data

    def displacement_array_frame(self):
        """Displacement with components along the array axes (z, y[, x]) in mm (the layout of ``classreg.kernels``)."""
        return world_to_array_vectors(self._image.data, self._image)

    @classmethod
    def from_array_frame(cls, displacement, reference: Image, **kwargs) -> "DisplacementField":
        """Inverse of :meth:`displacement_array_frame`: components along array axes (mm) → a field."""
        return cls.from_array(array_to_world_vectors(displacement, reference), reference, **kwargs)

    def map_points(self, points) -> np.ndarray:
        """Map physical points (N, ndim) from fixed space to moving space: ``x + u(x)``."""
        from .kernels.warp import interpolate

        p = self._check_points(points)
        idx = self._image.world_to_index(p)
        u = interpolate(self._image.numpy(), idx, order=1, mode="itk", cval=0.0)
        return p + np.asarray(u, dtype=float)

    def inverse(self, *, max_iter: int = 50, tol: float = 1e-3) -> "DisplacementField":
        """The inverse field on the same grid.

        The stored inverse if the field came with one; otherwise fixed-point iteration w ← −u∘(id + w)
        (Chen et al. 2008), stopping when the largest residual |w + u∘(id + w)| ≤ ``tol`` voxels. The returned
        field's ``inversion_error`` holds ``{"max_error", "mean_error"}`` in voxels and the iteration count.
        """
        if self._inverse is not None:
            return self._inverse
        from .kernels.fields import invert

        u = self.displacement_array_frame()
        w, info = invert(u, spacing=self._image.spacing_array_order, max_iter=max_iter, tol=tol)
        inv = DisplacementField.from_array_frame(w, self._image, inverse=self, inversion_error=dict(info))
        return inv

    def to_sitk(self):
        import SimpleITK as sitk

        img = self._image.astype(np.float64).to_sitk()
        return sitk.DisplacementFieldTransform(img)

    def save(self, path, *, dtype=None) -> Path:
        """Write the field as an ITK displacement-field image (vectors (x, y[, z]) in mm), compressed.

        ``.nii.gz`` (gzip), ``.mha``/``.nrrd``/``.mhd`` (zlib/gzip compressed pixel data) or ``.nii`` (the one
        uncompressed choice). Read back by :func:`load_transform`, SimpleITK/ITK
        (``DisplacementFieldTransform(ReadImage(path, sitkVectorFloat64))``), ANTs and nibabel.

        Parameters
        ----------
        dtype : {None, numpy.float32, numpy.float64}
            Precision on disk. Default: float32 (4 bytes × ndim per voxel before compression), or float64 when the
            field holds float64 values that float32 does not represent exactly (a field computed with
            ``dtype=np.float64``), so saving never loses precision the field has.
        """
        ext = _ext(path)
        if ext in TRANSFORM_EXTENSIONS:
            raise ValueError(
                f"path {str(path)!r}: save a DisplacementField as an image (.nii.gz, .mha, .nrrd), "
                "or wrap it in a Chain to write an ITK .h5 composite"
            )
        out = _field_dtype(self._image.numpy(), dtype)
        return save(self._image.astype(out), path, compress=ext != ".nii")

    def __repr__(self) -> str:
        return f"DisplacementField({self._image!r})"


class BSplineTransform(Transform):
    """Cubic B-spline free-form deformation ``x ↦ x + u(x)``, exactly ITK's ``itk::BSplineTransform`` (order 3).

    ``u(x) = Σ_k c_k Π_d β3(q_d(x) − k_d)`` with ``q(x)`` the continuous index of ``x`` in the control grid
    (``x = grid_origin + grid_direction · diag(grid_spacing) · index``, as for an ITK image). As in ITK, ``u = 0``
    (the point is returned unchanged) outside the grid's valid region ``1 <= index_d <= grid_size_d − 2``, where not
    every contributing control point exists; inside it the result equals SimpleITK's ``TransformPoint``.

    Parameters
    ----------
    grid_size : sequence of int
        Control points per axis, (x, y[, z]) order like ITK (``TransformDomainMeshSize + 3``); each >= 4.
    grid_origin : sequence of float
        Physical position (mm, x, y[, z]) of control point index 0.
    grid_spacing : float or sequence of float
        Control-point spacing in mm, x first.
    grid_direction : array_like, optional
        (ndim, ndim) direction cosines whose columns are the physical directions of the grid axes (like
        :attr:`classreg.Image.direction_matrix`), or SimpleITK's flat row-major tuple. Default identity.
    coefficients : array_like, optional
        ``(*grid shape in array order (z, y, x), ndim)``: control-point displacements along physical x, y[, z] in
        mm. Default zero (the identity).
    """

    def __init__(self, grid_size, grid_origin, grid_spacing, grid_direction=None, coefficients=None):
        try:
            size = tuple(int(s) for s in np.asarray(grid_size).ravel())
        except (TypeError, ValueError) as exc:
            raise TypeError(f"grid_size must be a sequence of 2 or 3 ints (x, y[, z]), got {grid_size!r}") from exc
        if not np.allclose(np.asarray(grid_size, dtype=float).ravel(), size):
            raise ValueError(f"grid_size must hold integers, got {grid_size!r}")
        self.ndim = check_ndim(len(size), "grid_size")
        if any(s < 4 for s in size):
            raise ValueError(f"grid_size must be >= 4 control points per axis (spline order 3 + 1), got {size}")
        self._size = size
        self._origin = np.array(as_float_tuple(grid_origin, self.ndim, "grid_origin"))
        self._spacing = np.array(check_spacing(grid_spacing, self.ndim, "grid_spacing"))
        self._direction = np.array(check_direction(grid_direction, self.ndim, "grid_direction")).reshape(
            self.ndim, self.ndim)
        shape = (*reversed(size), self.ndim)
        if coefficients is None:
            c = np.zeros(shape)
        else:
            c = np.array(coefficients, dtype=np.float64)
            if c.shape != shape:
                raise ValueError(
                    f"coefficients must have shape {shape} (grid shape in array order (z, y, x) for grid_size "
                    f"{size}, then {self.ndim} displacement components x, y[, z] in mm), got {c.shape}"
                )
            if not np.all(np.isfinite(c)):
                raise ValueError("coefficients contain NaN or Inf; replace them (e.g. numpy.nan_to_num)")
        c.setflags(write=False)
        self._coefficients = c
        # grid index in array order -> physical point, and back
        lin = (self._direction @ np.diag(self._spacing))[:, ::-1]
        self._index_to_world = lin
        self._world_to_index = np.linalg.inv(lin)

    # ------------------------------------------------------------------ construction
    @classmethod
    def on_image(cls, image: Image, grid_spacing_mm, *, order: int = 3) -> "BSplineTransform":
        """A zero (identity) control grid laid over ``image`` the way elastix's ``GridScheduleComputer`` does.

        Per axis d (x first): spacing ``g_d = grid_spacing_mm_d``; size ``ceil(n_d s_d / g_d) + 3`` (``n_d`` voxels of
        ``s_d`` mm: the full extent including the half voxels at both ends); the grid is centred on the image, i.e. on
        the centre of the segment from the first to the last voxel centre (the same centre as the extent ± half a
        voxel): ``origin = image.origin + D · (−((size_d − 1) g_d − (n_d − 1) s_d) / 2)_d``; direction D = the
        image's. (ITK's own ``BSplineTransformInitializer`` instead fits the mesh to the voxel-centre extent.)

        Parameters
        ----------
        image : Image
            The (fixed) image the transform is defined on.
        grid_spacing_mm : float or sequence of float
            Control-point spacing in mm (x first).
        order : int
            Spline order; only 3 is supported.
        """
        if order != 3:
            raise ValueError(f"order must be 3 (cubic B-splines), got {order!r}")
        if not isinstance(image, Image):
            raise TypeError(f"image must be a classreg.Image, got {type(image).__name__}")
        n = image.ndim
        gs = np.array(check_spacing(grid_spacing_mm, n, "grid_spacing_mm"))
        sizes = np.array(image.size, dtype=float)
        sp = np.array(image.spacing)
        gsize = [int(np.ceil(sizes[d] * sp[d] / gs[d])) + order for d in range(n)]
        shift = np.array([-((gsize[d] - 1) * gs[d] - (sizes[d] - 1) * sp[d]) / 2.0 for d in range(n)])
        origin = np.asarray(image.origin) + image.direction_matrix @ shift
        return cls(gsize, origin, gs, image.direction_matrix)

    def with_coefficients(self, coefficients) -> "BSplineTransform":
        """The same control grid with other coefficients (shape ``(*grid shape (z, y, x), ndim)``, mm)."""
        return BSplineTransform(self._size, self._origin, self._spacing, self._direction, coefficients)

    # ------------------------------------------------------------------ properties
    @property
    def grid_size(self) -> tuple:
        """Control points per axis, (x, y[, z])."""
        return self._size

    @property
    def grid_shape(self) -> tuple:
        """Control points per axis in array order (z, y[, x]): ``coefficients.shape[:-1]``."""
        return tuple(reversed(self._size))

    @property
    def grid_origin(self) -> tuple:
        return tuple(self._origin.tolist())

    @property
    def grid_spacing(self) -> tuple:
        return tuple(self._spacing.tolist())

    @property
    def grid_direction(self) -> np.ndarray:
        """(ndim, ndim) direction cosines; column k is the physical direction of grid axis k (x first)."""
        return self._direction.copy()

    @property
    def coefficients(self) -> np.ndarray:
        """Read-only ``(*grid shape (z, y, x), ndim)`` array of displacements along physical x, y[, z] in mm."""
        return self._coefficients

    @property
    def parameters(self) -> np.ndarray:
        """The coefficients in ITK/elastix parameter order: all x-components (x fastest), then y[, then z]."""
        return np.moveaxis(self._coefficients, -1, 0).ravel()

    @property
    def fixed_parameters(self) -> tuple:
        """ITK's fixed parameters: grid size, origin, spacing (x first), direction (row-major)."""
        return (tuple(float(s) for s in self._size) + self.grid_origin + self.grid_spacing
                + tuple(self._direction.ravel().tolist()))

    # ------------------------------------------------------------------ mapping
    def grid_index(self, points) -> np.ndarray:
        """Continuous control-grid indices (N, ndim) in array order (z, y[, x]) of physical points (N, ndim)."""
        p = self._check_points(points)
        return (p - self._origin) @ self._world_to_index.T

    def _inside(self, q) -> np.ndarray:
        """ITK's ``InsideValidRegion``: ``1 <= q_d`` and ``q_d < g_d − 2`` (4 ulp of slack at the top, like ITK)."""
        g = np.asarray(self.grid_shape, dtype=float)
        top = g - 2.0 + 4.0 * np.spacing(g - 2.0)
        return (q >= 1.0) & (q <= top)

    def map_points(self, points) -> np.ndarray:
        """Map physical points (N, ndim), (x, y[, z]) mm, from fixed to moving space: ``x + u(x)``."""
        from .kernels.bspline import evaluate

        p = self._check_points(points)
        q = self.grid_index(p)
        u = evaluate(self._coefficients, q)
        u[~np.all(self._inside(q), axis=1)] = 0.0
        return p + u

    def displacement_on(self, reference: Image) -> "DisplacementField":
        """The displacement ``u`` sampled at every voxel of ``reference`` (zero outside the valid region)."""
        from .kernels.bspline import dense

        if not isinstance(reference, Image):
            raise TypeError(f"reference must be a classreg.Image, got {type(reference).__name__}")
        if reference.ndim != self.ndim:
            raise ValueError(f"reference must be {self.ndim}-D like the transform, got {reference.ndim}-D")
        n = self.ndim
        a = reference.affine
        matrix = self._world_to_index @ a[:n, :n]
        offset = self._world_to_index @ (a[:n, n] - self._origin)
        diag = np.diag(np.diagonal(matrix))
        if np.all(np.abs(matrix - diag) <= 1e-12 * np.abs(matrix).max()):
            matrix = diag  # same axes up to rounding: separable fast path
        u = dense(self._coefficients, reference.shape, matrix, offset)
        axes = [np.arange(s, dtype=float) for s in reference.shape]
        inside = np.ones(reference.shape, dtype=bool)
        top = np.asarray(self.grid_shape, dtype=float) - 2.0
        top = top + 4.0 * np.spacing(top)
        for d in range(n):
            qd = offset[d]
            for e in range(n):
                if matrix[d, e] != 0.0:
                    qd = qd + matrix[d, e] * axes[e].reshape([-1 if k == e else 1 for k in range(n)])
            inside &= (qd >= 1.0) & (qd <= top[d])
        u[~inside] = 0.0
        return DisplacementField.from_array(u, reference)

    def inverse(self, reference: "Image | None" = None, **kwargs) -> "DisplacementField":
        """An inverse on ``reference``'s grid: :meth:`displacement_on` ``(reference).inverse(**kwargs)``.

        A B-spline FFD has no closed-form inverse, so a grid to represent it on is required.
        """
        if reference is None:
            raise ValueError(
                "a BSplineTransform has no closed-form inverse: pass reference=<Image> (e.g. the moving image) to "
                "get its inverse as a DisplacementField on that grid"
            )
        return self.displacement_on(reference).inverse(**kwargs)

    def to_sitk(self):
        """The equivalent ``SimpleITK.BSplineTransform`` (order 3)."""
        import SimpleITK as sitk

        tx = sitk.BSplineTransform(self.ndim, 3)
        tx.SetFixedParameters(self.fixed_parameters)
        tx.SetParameters(tuple(self.parameters.tolist()))
        return tx

    @classmethod
    def from_sitk(cls, tx) -> "BSplineTransform":
        """From a ``SimpleITK.BSplineTransform`` of order 3."""
        import SimpleITK as sitk

        b = sitk.BSplineTransform(tx)
        if b.GetOrder() != 3:
            raise ValueError(f"unsupported ITK transform: classreg reads cubic (order 3) BSplineTransforms only, got "
                             f"order {b.GetOrder()}")
        n = b.GetDimension()
        fixed = np.asarray(b.GetFixedParameters(), dtype=float)
        size = [int(round(s)) for s in fixed[:n]]
        coeffs = np.asarray(b.GetParameters(), dtype=float).reshape(n, *reversed(size))
        return cls(size, fixed[n:2 * n], fixed[2 * n:3 * n], fixed[3 * n:].reshape(n, n), np.moveaxis(coeffs, 0, -1))

    def save(self, path) -> Path:
        """Write an ITK transform file (.tfm/.txt text or .h5), readable by SimpleITK, ANTs and elastix."""
        if not Path(os.fspath(path)).name.lower().endswith((".tfm", ".txt", ".h5", ".hdf5")):
            raise ValueError(f"path {str(path)!r}: save a BSplineTransform as an ITK transform file (.tfm, .txt, .h5)")
        return _write_sitk_transform(self.to_sitk(), path)

    def __repr__(self) -> str:
        return (
            f"BSplineTransform(grid_size={self._size}, grid_origin={np.round(self._origin, 6).tolist()}, "
            f"grid_spacing={np.round(self._spacing, 6).tolist()}, "
            f"grid_direction={np.round(self._direction, 6).tolist()}, "
            f"max |coefficient|={float(np.abs(self._coefficients).max()):.6g} mm)"
        )


class Chain(Transform):
    """Several transforms applied in list order: ``Chain([t1, t2])`` maps ``x ↦ t2(t1(x))``.

    The first transform is applied first to the fixed-image points (e.g. ``[deformable, prealign_affine]`` for a
    deformable registration done after an affine one).
    """

    def __init__(self, transforms):
        ts = []
        for t in transforms:
            if isinstance(t, Chain):
                ts.extend(t.transforms)
            elif isinstance(t, Transform):
                ts.append(t)
            else:
                raise TypeError(f"transforms must be classreg Transforms, got {type(t).__name__}")
        if not ts:
            raise ValueError("transforms must not be empty")
        dims = {t.ndim for t in ts}
        if len(dims) != 1:
            raise ValueError(f"all transforms of a Chain must have the same dimension, got {sorted(dims)}")
        self.ndim = dims.pop()
        self._transforms = tuple(ts)

    @property
    def transforms(self) -> tuple:
        return self._transforms

    def map_points(self, points) -> np.ndarray:
        p = self._check_points(points)
        for t in self._transforms:
            p = t.map_points(p)
        return p

    def inverse(self) -> "Chain":
        return Chain([t.inverse() for t in reversed(self._transforms)])

    def simplified(self) -> Transform:
        """Merge consecutive affines; a chain of affines becomes one :class:`Affine`."""
        out = []
        for t in self._transforms:
            if out and isinstance(t, Affine) and isinstance(out[-1], Affine):
                out[-1] = t.compose(out[-1])
            else:
                out.append(t)
        return out[0] if len(out) == 1 else Chain(out)

    def to_sitk(self):
        import SimpleITK as sitk

        # ITK's CompositeTransform applies its *last* added transform first.
        ct = sitk.CompositeTransform(self.ndim)
        for t in reversed(self._transforms):
            ct.AddTransform(t.to_sitk())
        return ct

    def save(self, path, *, dtype=None) -> Path:
        """Write an ITK composite transform (.h5; .tfm/.txt only if every part is affine).

        Displacement fields in an ``.h5`` are stored as their ITK ``DisplacementFieldTransform_double_*``
        entries, but with the parameters dataset as float32 (``dtype`` as for :meth:`DisplacementField.save`)
        and compressed (HDF5 shuffle + gzip): SimpleITK's ``ReadTransform``, ITK and ANTs read it as before.
        Needs h5py for the compression; without it the file is SimpleITK's own (float64, uncompressed).
        """
        ext = _ext(path)
        if ext not in (".h5", ".hdf5") and not all(isinstance(t, Affine) for t in self._transforms):
            raise ValueError(f"path {str(path)!r}: a Chain holding a displacement field must be saved as .h5")
        return _write_sitk_transform(self.to_sitk(), path, field_dtype=dtype)

    def __repr__(self) -> str:
        return "Chain([" + ", ".join(type(t).__name__ for t in self._transforms) + "])"


# ---------------------------------------------------------------------------------------------- helpers
def rotation_matrix(angles) -> np.ndarray:
    """Rotation matrix from Euler angles in radians with ITK's conventions (see :meth:`Affine.euler`)."""
    a = np.atleast_1d(np.asarray(angles, dtype=float)).ravel()
    if a.size == 1:
        c, s = np.cos(a[0]), np.sin(a[0])
        return np.array([[c, -s], [s, c]])
    if a.size == 3:
        cx, cy, cz = np.cos(a)
        sx, sy, sz = np.sin(a)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        return rz @ rx @ ry
    raise ValueError(f"angles must hold 1 (2-D) or 3 (3-D) Euler angles in radians, got {a.size}")


def euler_angles(matrix, *, zyx: bool = False) -> np.ndarray:
    """Euler angles (radians) of a rotation matrix, the inverse of :func:`rotation_matrix`: 2-D one angle; 3-D
    ``(θx, θy, θz)`` with ITK's ``R = Rz · Rx · Ry`` (``Euler3DTransform``), or ``R = Rz · Ry · Rx`` with ``zyx``
    (its ``ComputeZYX``). At gimbal lock (cos θx = 0; cos θy = 0 with ``zyx``) the angle about y (x) is 0 and θz
    takes the rest."""
    r = np.asarray(matrix, dtype=float)
    if r.shape == (2, 2):
        return np.array([math.atan2(r[1, 0], r[0, 0])])
    if r.shape != (3, 3):
        raise ValueError(f"matrix must be 2x2 or 3x3, got shape {r.shape}")
    if zyx:  # R[2,0] = -sin θy, R[2,1] = cos θy sin θx, R[2,2] = cos θy cos θx, R[1,0] = sin θz cos θy
        ay = math.asin(max(-1.0, min(1.0, -r[2, 0])))
        if abs(math.cos(ay)) > 1e-9:
            return np.array([math.atan2(r[2, 1], r[2, 2]), ay, math.atan2(r[1, 0], r[0, 0])])
        return np.array([0.0, ay, math.atan2(-r[0, 1], r[1, 1])])
    # R[2,1] = sin θx, R[2,0] = -cos θx sin θy, R[2,2] = cos θx cos θy, R[0,1] = -sin θz cos θx,
    # R[1,1] = cos θz cos θx
    ax = math.asin(max(-1.0, min(1.0, r[2, 1])))
    if abs(math.cos(ax)) > 1e-9:
        return np.array([ax, math.atan2(-r[2, 0], r[2, 2]), math.atan2(-r[0, 1], r[1, 1])])
    return np.array([ax, 0.0, math.atan2(r[1, 0], r[0, 0])])


def _rotation(rotation) -> np.ndarray:
    r = np.asarray(rotation, dtype=float)
    if r.ndim == 2:
        if r.shape not in ((2, 2), (3, 3)):
            raise ValueError(f"rotation must be a 2x2 or 3x3 matrix, got shape {r.shape}")
        if not np.allclose(r.T @ r, np.eye(r.shape[0]), atol=1e-6) or np.linalg.det(r) < 0:
            raise ValueError("rotation must be a proper rotation matrix (orthonormal, det = +1)")
        return r
    return rotation_matrix(r)


def world_to_array_vectors(vectors, grid: Image):
    """Vector components (x, y[, z]) in the world → components along the array axes of ``grid`` (z, y[, x])."""
    r = (grid.direction_matrix.T)[::-1]  # (array axis k) <- world
    xp_vectors = vectors
    return _apply_matrix(xp_vectors, r)


def array_to_world_vectors(vectors, grid: Image):
    """Inverse of :func:`world_to_array_vectors`."""
    r = grid.direction_matrix[:, ::-1]  # world <- array axis
    return _apply_matrix(vectors, r)


def _apply_matrix(vectors, m):
    from .kernels._backend import get_array_module

    xp = get_array_module(vectors)
    if np.allclose(m, np.eye(len(m))[::-1]) or np.allclose(m, np.eye(len(m))):
        perm = [int(np.argmax(np.abs(row))) for row in m]
        return xp.ascontiguousarray(vectors[..., perm])
    mm = xp.asarray(m, dtype=vectors.dtype)
    return xp.ascontiguousarray(vectors @ mm.T)


def _ext(path) -> str:
    name = Path(os.fspath(path)).name.lower()
    for ext in TRANSFORM_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return image_extension(path)


def _field_dtype(values, dtype=None):
    """The on-disk precision of a dense field: ``dtype`` if given (float32 or float64); otherwise float32 unless the
    values are float64 that float32 does not hold exactly. ``values`` is an array or a callable yielding blocks."""
    if dtype is not None:
        out = np.dtype(dtype)
        if out not in (np.float32, np.float64):
            raise ValueError(f"dtype must be numpy.float32 or numpy.float64 (or None), got {dtype!r}")
        return out
    blocks = values() if callable(values) else (values,)
    for b in blocks:
        if b.dtype == np.float64 and not np.array_equal(b.astype(np.float32), b):
            return np.dtype(np.float64)
    return np.dtype(np.float32)


#: Elements per HDF5 chunk of a field's parameters (1 MiB of float32) and its gzip level.
_H5_CHUNK = 1 << 18
_H5_GZIP = 6


def _write_sitk_transform(tx, path, *, field_dtype=None) -> Path:
    import SimpleITK as sitk

    ext = _ext(path)
    if ext not in TRANSFORM_EXTENSIONS:
        raise ValueError(f"path {str(path)!r}: an affine/composite transform is written as {TRANSFORM_EXTENSIONS}")
    field_dtype = _field_dtype(None, field_dtype) if field_dtype is not None else None
    with atomic_output(path) as tmp:
        if ext in (".h5", ".hdf5") and _has_field(tx):
            raw = tmp.with_name(f".{tmp.name}.itk")  # SimpleITK's float64 file; never left in the output folder
            try:
                sitk.WriteTransform(tx, str(raw) + ext)
                _compact_h5_fields(Path(str(raw) + ext), tmp, field_dtype)
            finally:
                Path(str(raw) + ext).unlink(missing_ok=True)
        else:
            sitk.WriteTransform(tx, str(tmp))
    return Path(path)


def _has_field(tx) -> bool:
    """Whether a SimpleITK transform (or a composite's part) is a dense displacement field."""
    import SimpleITK as sitk

    if tx.GetName() == "CompositeTransform":
        ct = sitk.CompositeTransform(tx)
        return any(_has_field(ct.GetNthTransform(i)) for i in range(ct.GetNumberOfTransforms()))
    return tx.GetName() == "DisplacementFieldTransform"


def _compact_h5_fields(src: Path, dst: Path, dtype) -> None:
    """Copy the ITK HDF5 transform file ``src`` to ``dst`` with every displacement field's ``TransformParameters``
    stored as float32 (see :func:`_field_dtype`), chunked and compressed (shuffle + gzip, filters every HDF5
    build has). Everything else, ITK's type names (``..._double_3_3``) included, is copied unchanged: ITK's
    HDF5TransformIO reads float32 parameters into its double transform exactly (the float32 values)."""
    try:
        import h5py
    except ImportError:
        logger.info("h5py is not installed: %s keeps SimpleITK's float64, uncompressed displacement field "
                    "(pip install h5py for float32 + gzip, about 2.5x smaller)", dst.name)
        os.replace(src, dst)
        return
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        for name, obj in fin.items():
            if name != "TransformGroup":
                fin.copy(obj, fout, name=name)
                continue
            group_out = fout.create_group(name)
            for key, g in obj.items():
                kind = g["TransformType"][0] if "TransformType" in g else b""
                kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                if "DisplacementFieldTransform" not in kind or "TransformParameters" not in g:
                    obj.copy(g, group_out, name=key)
                    continue
                sub = group_out.create_group(key)
                for item in g:
                    if item != "TransformParameters":
                        g.copy(g[item], sub, name=item)
                params = g["TransformParameters"]
                n = params.shape[0]

                def blocks(params=params, n=n):
                    for i in range(0, n, _H5_CHUNK):
                        yield params[i:i + _H5_CHUNK]

                out = _field_dtype(blocks, dtype)
                ds = sub.create_dataset("TransformParameters", shape=params.shape, dtype=out,
                                        chunks=(min(n, _H5_CHUNK),) if n else None,
                                        compression="gzip" if n else None,
                                        compression_opts=_H5_GZIP if n else None, shuffle=bool(n))
                for i in range(0, n, _H5_CHUNK):
                    ds[i:i + _H5_CHUNK] = params[i:i + _H5_CHUNK].astype(out)


def from_sitk_transform(tx) -> Transform:
    """Convert a ``SimpleITK.Transform`` (affine family, translation, displacement field, cubic B-spline,
    composite)."""
    import SimpleITK as sitk

    name = tx.GetName()
    n = tx.GetDimension()
    if name == "CompositeTransform":
        ct = sitk.CompositeTransform(tx)
        parts = [from_sitk_transform(ct.GetNthTransform(i)) for i in range(ct.GetNumberOfTransforms())]
        return Chain(list(reversed(parts))) if len(parts) > 1 else parts[0]
    if name == "DisplacementFieldTransform":
        field = sitk.DisplacementFieldTransform(tx).GetDisplacementField()
        return DisplacementField(Image.from_sitk(field))
    if name == "IdentityTransform":
        return Affine.identity(n)
    if name == "BSplineTransform":
        return BSplineTransform.from_sitk(tx)
    fixed = tx.GetFixedParameters()
    center = np.asarray(fixed[:n], dtype=float) if len(fixed) >= n and name != "TranslationTransform" else np.zeros(n)
    base = np.asarray(tx.TransformPoint(tuple(center)))
    a = np.stack([np.asarray(tx.TransformPoint(tuple(center + e))) - base for e in np.eye(n)], axis=1)
    aff = Affine(a, base - center, center)
    probe = center + np.linspace(-37.0, 53.0, n)
    if not np.allclose(aff.map_points(probe)[0], tx.TransformPoint(tuple(probe)), atol=1e-6):
        raise ValueError(f"unsupported ITK transform type {name!r}: classreg reads affine-family, displacement-field "
                         "and composite transforms")
    return aff


#: Extra transform file formats: suffix -> loader(path), registered by modules that define their own Transform
#: subclasses (e.g. BCPD point deformations, ``.npz``). Such classes set ``file_suffix`` and implement ``save``.
_EXTRA_FORMATS: dict = {}


def register_transform_format(suffix: str, loader) -> None:
    """Let :func:`load_transform` read files ending in ``suffix`` with ``loader(path) -> Transform``."""
    _EXTRA_FORMATS[suffix.lower()] = loader


def load_transform(path) -> Transform:
    """Read a transform: ITK transform files (.tfm, .txt, .mat, .h5) or a displacement-field image.

    Displacement-field images (.nii.gz, .mha, .nrrd with ndim vector components in mm) give a
    :class:`DisplacementField`; ITK composites give a :class:`Chain` (in application order).
    """
    import SimpleITK as sitk

    p = _check_readable(path)
    for suffix, loader in _EXTRA_FORMATS.items():
        if p.name.lower().endswith(suffix):
            return loader(p)
    ext = _ext(p)
    if ext in TRANSFORM_EXTENSIONS:
        try:
            tx = sitk.ReadTransform(str(p))
        except RuntimeError as exc:
            raise ValueError(f"path {str(p)!r}: not a readable ITK transform file ({str(exc).strip().splitlines()[-1]})") from None
        return from_sitk_transform(tx)
    img = load(p)
    return DisplacementField(img)
