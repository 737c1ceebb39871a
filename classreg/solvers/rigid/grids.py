"""Working grids of the CSNGF search and the images of each pyramid level on them.

Both images are resampled onto isotropic *working grids* whose axes follow the fixed image's direction cosines:
the fixed grid covers the fixed image, the moving grid is a cube as wide as the moving image's largest physical
extent, both centred on the fixed image's physical centre ``c_F``; at shrink factor d their spacing is d times the
working spacing. :class:`WorkingPyramid` is the level hook of :func:`classreg.pyramid.multiresolution`: for each
level it smooths the intensity-normalised images (Gaussian σ in mm on their own grids) and gives the driver

* the fixed image resampled (linear, replicate border) on the level's fixed working grid, with its mask: the fixed
  mask ∧ the image domain (linear > 0.999), eroded by one voxel;
* the smoothed moving image on its *own* grid, with its mask: the search resamples it once per candidate rotation
  onto the moving working grid (:class:`classreg.solvers.rigid.search.Evaluator`), so the moving image is
  interpolated once, not twice.
"""
from __future__ import annotations

import time

import numpy as np

from ...image import Image
from ...pyramid import LevelImages
from .._common import backend_name

__all__ = ["WorkingPyramid", "erode", "extent_in_frame", "normalised", "working_grid"]


def extent_in_frame(img: Image, frame: np.ndarray) -> np.ndarray:
    """Physical extent (x, y[, z] of ``frame``'s axes) of the box spanned by ``img``'s voxels (size × spacing)."""
    edges = img.direction_matrix @ np.diag(np.asarray(img.size) * np.asarray(img.spacing))
    return np.abs(frame.T @ edges).sum(axis=1)


def working_grid(extent, spacing: float, frame: np.ndarray, centre: np.ndarray) -> Image:
    """Isotropic grid (spacing mm, axes = ``frame``'s columns) covering ``extent`` (x-first), centred on ``centre``."""
    size = np.maximum(2, np.round(np.asarray(extent) / spacing)).astype(int)  # x-first; gradients need 2 samples
    origin = centre - frame @ (spacing * (size - 1) / 2.0)
    shape = tuple(int(s) for s in size[::-1])
    return Image(np.zeros(shape, dtype=np.uint8), (spacing,) * len(size), tuple(origin), frame.ravel())


def erode(mask):
    """Binary erosion by one voxel (face neighbours); the mask itself if erosion would empty it. A CuPy mask is
    eroded on its device (``cupyx.scipy.ndimage``; one scalar read)."""
    from scipy import ndimage

    from ...kernels._backend import is_cupy_array

    if is_cupy_array(mask):  # the default structure is the same face-neighbour cross (and needs no upload)
        from cupyx.scipy import ndimage as cndimage

        out = cndimage.binary_erosion(mask, border_value=0)
    else:
        st = ndimage.generate_binary_structure(mask.ndim, 1)
        out = ndimage.binary_erosion(mask, structure=st, border_value=0)
    return out if out.any() else mask


def normalised(img: Image, mask, dtype) -> np.ndarray:
    """Intensities scaled to [0, 1] by their min/max (inside ``mask`` if given), as ``dtype``."""
    a = np.asarray(img.numpy(), dtype=np.float64)
    sel = a[np.asarray(mask)] if mask is not None else a
    lo, hi = float(sel.min()), float(sel.max())
    if hi <= lo:
        what = " inside its mask" if mask is not None else ""
        raise ValueError(f"the image is constant{what}; there is nothing to register")
    return ((a - lo) / (hi - lo)).astype(dtype)


class WorkingPyramid:
    """The working grids of every level and the level images (the driver's ``level_images`` hook).

    Parameters
    ----------
    fixed, moving : Image
        The pair.
    fmask, mmask : bool ndarray or None
        Masks on each image's own grid.
    schedule : Schedule
        Shrink factors and rotation counts per level (:mod:`.schedule`).
    spacing : float
        Working spacing (mm) at shrink factor 1.
    dtype, backend
        Working precision and kernel backend.
    device : {"cpu", "cuda"}
        Where the level images live: with "cuda" the normalised images and the masks go to the device once, here,
        and every level is built there.

    Attributes
    ----------
    c_f, c_m : ndarray
        Physical centres of the fixed and moving images (the rotation centres).
    grids : list of (Image, Image)
        Per level: the fixed and the moving working grid.
    started : dict
        ``perf_counter()`` when each level's images were built (for the per-level times).
    """

    def __init__(self, fixed: Image, moving: Image, fmask, mmask, schedule, spacing: float, dtype, backend, *,
                 device: str = "cpu"):
        from ...backend import to_device

        self.fixed, self.moving = fixed, moving
        self.dtype, self.backend = dtype, backend
        self.fixed_n = normalised(fixed, fmask, dtype)
        self.moving_n = normalised(moving, mmask, dtype)
        self.fmask = np.ones(fixed.shape, dtype=dtype) if fmask is None else np.asarray(fmask, dtype=dtype)
        self.mmask = mmask
        if device == "cuda":  # the working data go to the device once; every level is built there
            self.fixed_n, self.moving_n, self.fmask = (to_device(a, device) for a in (self.fixed_n, self.moving_n,
                                                                                        self.fmask))
            self.mmask = None if mmask is None else to_device(np.asarray(mmask, dtype=bool), device)
        frame = fixed.direction_matrix
        self.c_f, self.c_m = fixed.center, moving.center
        ext_f = extent_in_frame(fixed, frame)
        side = float(np.max(extent_in_frame(moving, frame)))
        self.spacings = [spacing * float(f) for f in schedule.shrink_factors]
        self.grids = [(working_grid(ext_f, h, frame, self.c_f),
                       working_grid(np.full(fixed.ndim, side), h, frame, self.c_f)) for h in self.spacings]
        self.rotations = schedule.rotations
        self.started = {}

    def _blur(self, img: Image, data, sigma):
        """Gaussian σ (mm) on the image's own grid. Once per level and image: the scipy reference is fast enough
        here and avoids a numba compile per process."""
        from ...kernels.smooth import gaussian

        if sigma <= 0:
            return data
        blur_backend = "cuda" if backend_name(self.backend) == "cuda" else "numpy"
        return gaussian(data, sigma, spacing=img.spacing_array_order, ndim=img.ndim, backend=blur_backend)

    def __call__(self, index: int, shrink: float, sigma_mm: float) -> LevelImages:
        """The images of level ``index`` (see the module docstring)."""
        from ...kernels.warp import warp

        self.started[index] = time.perf_counter()
        fixed, dtype, backend, n = self.fixed, self.dtype, self.backend, self.fixed.ndim
        grid_a, grid_b = self.grids[index]
        tot = fixed.inverse_affine @ grid_a.affine
        a = warp(self._blur(fixed, self.fixed_n, sigma_mm), None, matrix=tot[:n, :n], offset=tot[:n, n],
                 out_shape=grid_a.shape, order=1, mode="border", backend=backend)
        ma = warp(self.fmask, None, matrix=tot[:n, :n], offset=tot[:n, n], out_shape=grid_a.shape, order=1, mode="zero",
                  backend=backend) > 0.999
        if not ma.any():
            raise ValueError(f"the fixed mask has no voxel on the level-{index} working grid "
                             f"({self.spacings[index]:g} mm); use smaller shrink_factors or a larger mask")
        moving = self.moving.like(self._blur(self.moving, self.moving_n, sigma_mm).astype(dtype))
        info = {"spacing_mm": self.spacings[index], "fixed_shape": grid_a.shape, "moving_shape": grid_b.shape,
                "rotations": self.rotations[index]}
        return LevelImages(grid_a.like(a.astype(dtype, copy=False)), moving, erode(ma), self.mmask, info)
