"""Helpers shared by the image solvers: argument checks, intensity scaling, the init-affine index map, the parameters
every Result records, and the one finalisation of a dense map (field + inverse + chain with ``init`` + warped image)."""
from __future__ import annotations

import numpy as np

from ..image import Image
from ..transforms import Affine, Chain

__all__ = [
    "backend_name",
    "check_init",
    "check_masks",
    "check_pair",
    "common_params",
    "field_result",
    "index_map",
    "mean_sq",
    "normalise_intensities",
    "warp_through",
]


def backend_name(backend) -> str:
    """The kernel backend that ``backend`` resolves to (recorded in ``Result.params``)."""
    from ..kernels._backend import resolve_backend

    return resolve_backend(backend)


def common_params(*, init: Affine | None, dtype, seed, backend) -> dict:
    """The entries every image solver's ``Result.params`` holds besides its own options (``init`` as a homogeneous
    matrix, omitted for a solver that takes none)."""
    from ..backend import versions

    out = dict(dtype=str(np.dtype(dtype)), seed=seed, backend=backend_name(backend), versions=versions())
    if init is not None:
        out["init"] = init.homogeneous.tolist()
    return out


def mean_sq(f, w, mask) -> float:
    """Mean squared difference of two arrays over ``mask`` (all voxels if None), in float64."""
    d = np.asarray(f, dtype=np.float64) - np.asarray(w, dtype=np.float64)
    if mask is not None:
        d = d[np.asarray(mask)]
    return float(np.mean(d * d))


def field_result(fixed: Image, moving: Image, init: Affine, forward, inverse, **result_fields):
    """The :class:`~classreg.Result` of a dense-map solver.

    ``forward`` is the array-frame displacement (mm, on the fixed grid) of the fixed → moving map estimated on top
    of ``init``, ``inverse`` that of its inverse (from the flow, not a numerical inversion). The transform is the
    field, chained with ``init`` unless it is the identity; ``warped`` is ``moving`` resampled through it.
    """
    from ..resample import resample
    from ..result import Result
    from ..transforms import DisplacementField

    field = DisplacementField.from_array_frame(forward, fixed)
    field_inv = DisplacementField.from_array_frame(inverse, fixed, inverse=field)
    field = DisplacementField(field.image, inverse=field_inv)
    if np.allclose(init.homogeneous, np.eye(fixed.ndim + 1)):
        transform, inv = field, field_inv
    else:
        transform, inv = Chain([field, init]), Chain([init.inverse(), field_inv])
    warped = resample(moving, transform, reference=fixed)
    return Result(transform=transform, inverse=inv, warped=warped, reference=fixed, **result_fields)


def check_pair(fixed, moving) -> None:
    """Both are scalar :class:`Image` objects of the same dimension."""
    for name, img in (("fixed", fixed), ("moving", moving)):
        if not isinstance(img, Image):
            raise TypeError(f"{name} must be a classreg.Image, got {type(img).__name__}")
        if img.is_vector:
            raise ValueError(f"{name} must be a scalar image, got {img.ncomponents} components")
    if fixed.ndim != moving.ndim:
        raise ValueError(f"dimension mismatch: fixed is {fixed.ndim}-D, moving is {moving.ndim}-D")


def check_masks(fixed: Image, moving: Image, fixed_mask, moving_mask):
    """Both masks as boolean arrays on their images' grids (or None); an empty mask is an error."""
    from ..image import as_mask

    fmask = as_mask(fixed_mask, fixed, "fixed_mask")
    mmask = as_mask(moving_mask, moving, "moving_mask")
    for name, m in (("fixed_mask", fmask), ("moving_mask", mmask)):
        if m is not None and not bool(np.asarray(m).any()):
            raise ValueError(f"{name} is empty; give a mask with at least one voxel inside, or None")
    return fmask, mmask


def check_init(init, ndim: int) -> Affine:
    """``init`` as one :class:`Affine` (identity if None); a Chain of affines is merged."""
    if init is None:
        return Affine.identity(ndim)
    if isinstance(init, Chain):
        init = init.simplified()
    if not isinstance(init, Affine):
        raise TypeError(f"init must be an Affine (or a Chain of affines), got {type(init).__name__}")
    if init.ndim != ndim:
        raise ValueError(f"init is {init.ndim}-D but the images are {ndim}-D")
    return init


def normalise_intensities(fixed: Image, moving: Image, fmask, intensity: str, dtype):
    """Both images on one intensity scale: [0, 1] by the fixed image's 0.5-99.5 percentiles (inside its mask),
    after histogram matching of the moving image when ``intensity == "match"`` (SimpleITK ``HistogramMatching``,
    1024 levels, 7 match points, thresholded at the mean, as in ITK's demons examples)."""
    f = np.asarray(fixed.numpy(), dtype=np.float64)
    m = np.asarray(moving.numpy(), dtype=np.float64)
    for name, a in (("fixed", f), ("moving", m)):
        if a.max() <= a.min():
            raise ValueError(f"{name} is a constant image; there is nothing to register")
    if intensity == "match":
        import SimpleITK as sitk

        matched = sitk.HistogramMatching(moving.astype(np.float32).to_sitk(), fixed.astype(np.float32).to_sitk(),
                                         numberOfHistogramLevels=1024, numberOfMatchPoints=7,
                                         thresholdAtMeanIntensity=True)
        m = sitk.GetArrayFromImage(matched).astype(np.float64)
    sample = f[np.asarray(fmask)] if fmask is not None else f
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        raise ValueError("fixed is constant inside fixed_mask; there is nothing to register")
    scale = 1.0 / (hi - lo)
    return (fixed.like(((f - lo) * scale).astype(dtype)), moving.like(((m - lo) * scale).astype(dtype)))


def index_map(moving: Image, reference: Image, init: Affine):
    """``(matrix, offset, disp_matrix)`` taking (reference index i, array-frame displacement d in mm) to the moving
    index of ``init(x_i + d)`` — the arguments of :func:`classreg.kernels.warp.warp`."""
    n = reference.ndim
    left = moving.inverse_affine @ init.homogeneous
    total = left @ reference.affine
    disp_matrix = left[:n, :n] @ reference.direction_matrix[:, ::-1]
    return total[:n, :n], total[:n, n], disp_matrix


def warp_through(image: Image, reference: Image, init: Affine, disp, backend, *, cval=0.0, order=1):
    """``image`` sampled at ``init(x + disp(x))`` for every voxel x of ``reference`` (array-frame mm ``disp``)."""
    from ..kernels.warp import warp

    m, off, dm = index_map(image, reference, init)
    return warp(image.data, disp, matrix=m, offset=off, disp_matrix=dm, out_shape=reference.shape, order=order,
                mode="itk", cval=cval, backend=backend)
