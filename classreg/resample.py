"""``classreg.resample``: bring moving-space data onto a reference grid through a transform."""
from __future__ import annotations

import numpy as np

from ._checks import keyword_choice
from .image import Image
from .kernels._backend import get_array_module
from .transforms import Affine, Chain, DisplacementField, Transform

__all__ = ["resample", "INTERPOLATIONS"]

INTERPOLATIONS = {"linear": 1, "nearest": 0, "bspline": 3, "label": None}


def resample(moving: Image, transform: Transform | None = None, *, reference: Image | None = None,
             interpolation: str = "linear", default_value: float = 0.0, backend=None) -> Image:
    """Resample ``moving`` onto ``reference``'s grid: ``out(x) = moving(T(x))`` for every reference voxel x.

    ``T`` maps reference (fixed) physical points to moving physical points — the registration transform, as in
    ITK's ``ResampleImageFilter`` and elastix/transformix.

    Parameters
    ----------
    moving : Image
        Scalar or vector image in moving space. Vector components are resampled independently (not reoriented).
    transform : Transform, optional
        Fixed → moving map; identity if None.
    reference : Image, optional
        The output grid (its data is not used). Defaults to ``moving``'s grid.
    interpolation : {"linear", "nearest", "bspline", "label"}
        "bspline" is cubic B-spline (prefiltered); "label" interpolates each label's indicator linearly and keeps
        the arg-max (smooth label boundaries, never invents a label value). Points whose continuous index lies
        beyond half a voxel outside the moving grid get ``default_value`` (ITK semantics).
    default_value : float
        Value outside the moving image.

    Returns
    -------
    Image
        On ``reference``'s grid. "linear"/"bspline" give float32 (float64 for float64 input); "nearest"/"label"
        keep the input dtype.
    """
    if not isinstance(moving, Image):
        raise TypeError(f"moving must be a classreg.Image, got {type(moving).__name__}")
    reference = moving if reference is None else reference
    if not isinstance(reference, Image):
        raise TypeError(f"reference must be a classreg.Image, got {type(reference).__name__}")
    if reference.ndim != moving.ndim:
        raise ValueError(f"dimension mismatch: moving is {moving.ndim}-D, reference is {reference.ndim}-D")
    keyword_choice(interpolation, INTERPOLATIONS, "interpolation")
    if transform is None:
        transform = Affine.identity(moving.ndim)
    if not isinstance(transform, Transform):
        raise TypeError(f"transform must be a classreg Transform or None, got {type(transform).__name__}")
    if transform.ndim != moving.ndim:
        raise ValueError(f"dimension mismatch: transform is {transform.ndim}-D, moving is {moving.ndim}-D")

    coords = _index_map(transform, moving, reference)
    if interpolation == "label":
        return reference.like(_resample_labels(moving, coords, default_value, backend), vector=moving.is_vector)

    data = moving.data
    if interpolation in ("linear", "bspline") and data.dtype != np.float64:
        data = data.astype(np.float32, copy=False)
    out = _warp(data, coords, INTERPOLATIONS[interpolation], default_value, backend)
    if interpolation == "nearest":
        out = out.astype(moving.dtype, copy=False)
    return reference.like(out, vector=moving.is_vector)


def _warp(data, coords, order, cval, backend):
    from .kernels.warp import warp

    return warp(data, coords["disp"], matrix=coords["matrix"], offset=coords["offset"],
                disp_matrix=coords["disp_matrix"], out_shape=coords["out_shape"], order=order, mode="itk",
                cval=cval, backend=backend)


def _resample_labels(moving: Image, coords, default_value, backend):
    if moving.is_vector:
        raise ValueError("interpolation='label' needs a scalar label image")
    xp = get_array_module(moving.data)
    labels = xp.unique(moving.data)
    best = None
    out = None
    dtype = np.float64 if coords["disp"] is not None and coords["disp"].dtype == np.float64 else np.float32
    for lab in labels.tolist():
        w = _warp((moving.data == lab).astype(dtype), coords, 1, 0.0, backend)
        if best is None:
            best = w
            out = xp.full(w.shape, lab, dtype=moving.dtype)
        else:
            take = w > best
            best = xp.where(take, w, best)
            out[take] = lab
    out[best <= 0] = default_value
    return out


def _index_map(transform: Transform, moving: Image, reference: Image) -> dict:
    """Express ``moving index = matrix @ i + offset + disp_matrix @ disp[i]`` for every reference index ``i``.

    Affine parts are folded into ``matrix``/``offset``; a displacement field on the reference grid is passed as
    ``disp`` (world mm) with ``disp_matrix`` taking world vectors to moving indices; anything else is evaluated
    point-wise (``disp`` = mapped points).
    """
    n = moving.ndim
    m_inv = moving.inverse_affine
    ref = reference.affine
    parts = list(transform.transforms) if isinstance(transform, Chain) else [transform]

    # trailing affines (applied last) fold into the world -> moving-index map
    post = np.eye(n + 1)
    while parts and isinstance(parts[-1], Affine):
        post = post @ parts.pop().homogeneous
    # leading affines (applied first) fold into the reference index -> world map
    pre = np.eye(n + 1)
    while parts and isinstance(parts[0], Affine):
        pre = parts.pop(0).homogeneous @ pre
    left = m_inv @ post

    if not parts:
        total = left @ pre @ ref
        return dict(disp=None, matrix=total[:n, :n], offset=total[:n, n], disp_matrix=None,
                    out_shape=reference.shape)
    if len(parts) == 1 and isinstance(parts[0], DisplacementField) and np.allclose(pre, np.eye(n + 1)):
        field = parts[0]
        disp = field.displacement
        if not field.image.same_grid(reference):
            disp = _field_on_grid(field, reference)
        total = left @ ref
        return dict(disp=disp, matrix=total[:n, :n], offset=total[:n, n], disp_matrix=left[:n, :n],
                    out_shape=reference.shape)
    # general case: map every reference point through the middle part
    pts = (reference.grid_points().reshape(-1, n) @ pre[:n, :n].T) + pre[:n, n]
    for t in parts:
        pts = t.map_points(pts)
    xp = get_array_module(moving.data)
    disp = xp.asarray(pts.reshape(*reference.shape, n))
    return dict(disp=disp, matrix=np.zeros((n, n)), offset=left[:n, n], disp_matrix=left[:n, :n],
                out_shape=reference.shape)


def _field_on_grid(field: DisplacementField, reference: Image):
    """The field's displacement sampled (linearly, zero outside) at ``reference``'s voxel centres."""
    from .kernels.warp import warp

    n = reference.ndim
    total = field.image.inverse_affine @ reference.affine
    return warp(field.displacement, None, matrix=total[:n, :n], offset=total[:n, n], out_shape=reference.shape,
                order=1, mode="itk", cval=0.0)
