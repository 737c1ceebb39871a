"""The time-varying weight M_t of weighted metamorphosis: constant, grown from a ball, or given.

M_t ∈ [0, 1] lives in the fixed image's physical space (the Eulerian frame of the geodesic, where the lesion is).
A schedule is a list of frames M(t_j) at evenly spaced times t_j = j/(F − 1) (one frame: constant in time); the
shooting with n time steps uses ``W_k = M(k/n)``, linear in time between frames.

"grow" is the construction of A. François, M. Maillard, C. Oppenheim, J. Pallud, I. Bloch, P. Gori, J. Glaunès,
"Weighted metamorphosis for registration of images with different topologies", WBIR 2022, LNCS 13386, §3: a small
smoothed ball at the lesion's centre registered to the lesion mask by LDDMM; the images along that geodesic are M_t.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ...image import Image

__all__ = ["MaskSchedule", "ball_at_center", "grown_frames"]

_log = logging.getLogger("classreg")


def _check_mask(mask, fixed: Image, name: str) -> np.ndarray:
    """``mask`` as a float array on ``fixed``'s grid with values in [0, 1], or a ValueError naming the problem."""
    if isinstance(mask, Image):
        if mask.shape != fixed.shape or not mask.same_grid(fixed):
            raise ValueError(f"{name} must be on the fixed image's grid (shape {fixed.shape}, same spacing, origin "
                             f"and direction); got shape {mask.shape}: resample it onto the fixed image first")
        a = np.asarray(mask.numpy(), dtype=np.float64)
    else:
        a = np.asarray(mask, dtype=np.float64)
        if a.shape != fixed.shape:
            raise ValueError(f"{name} must have the fixed image's shape {fixed.shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or Inf")
    if a.min() < 0 or a.max() > 1:
        if a.min() >= 0 and np.all(a == np.round(a)) and a.max() > 1:
            raise ValueError(f"{name} holds values above 1 ({a.max():g}): pass a binary or [0, 1] weight, e.g. "
                             f"labels == k for one label")
        raise ValueError(f"{name} must take values in [0, 1], got [{a.min():g}, {a.max():g}]")
    return a


#: radius of the seed ball as a fraction of the mask's equivalent radius (a quarter of its area in 2-D, an eighth of
#: its volume in 3-D)
BALL_FRACTION = 0.5
#: the LDDMM of the ball to the mask: kernel σ as a fraction of the mask's largest extent, σ of the SSD (normalised
#: intensities), pyramid and L-BFGS iterations per level
GROW_KERNEL_FRACTION = 0.1
GROW_DATA_SIGMA = 0.02
GROW_SHRINK = (4, 2, 1)
GROW_ITERATIONS = (100, 100, 50)


def ball_at_center(mask: np.ndarray, spacing, *, fraction: float = BALL_FRACTION) -> np.ndarray:
    """A smoothed ball at the centroid of ``mask`` (array frame, ``spacing`` per array axis in mm) whose radius is
    ``fraction`` of the radius of the ball of the mask's volume (at least 1.5 voxels), smoothed by one voxel."""
    from scipy import ndimage

    h = np.asarray(spacing, dtype=np.float64)
    w = mask / mask.sum()
    idx = np.indices(mask.shape, dtype=np.float64)
    c = np.array([float(np.sum(w * idx[a])) for a in range(mask.ndim)])
    volume = float(mask.sum()) * float(np.prod(h))
    r_eq = (volume / math.pi) ** 0.5 if mask.ndim == 2 else (3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0)
    r = max(fraction * r_eq, 1.5 * float(h.max()))
    d2 = sum(((idx[a] - c[a]) * h[a]) ** 2 for a in range(mask.ndim))
    ball = (d2 <= r * r).astype(np.float64)
    return np.clip(ndimage.gaussian_filter(ball, 1.0), 0.0, 1.0)


def grown_frames(fixed: Image, mask: np.ndarray, *, n_frames: int = 11, dtype=np.float32, backend=None):
    """M_t for "grow": the images along the LDDMM geodesic from a ball at the mask's centre to the mask.

    The construction is the paper's (François et al. 2022, §3); the rule, the same for every mask, is ours: the seed
    is a ball at the mask's centroid of half the mask's equivalent radius (:data:`BALL_FRACTION`; the paper's code
    grows the radius until the ball's Dice with the mask reaches 0.06-0.1, about a quarter to a third of it),
    smoothed by one voxel; it is registered to the one-voxel smoothed mask by :func:`classreg.register_lddmm` on the full
    grid (``method="full"``: the band-limited parameterisation stops after a few iterations on this large growth),
    with a Gaussian kernel of σ = a tenth of the mask's largest extent (at least 2 voxels), a three-level pyramid,
    (100, 100, 50) L-BFGS iterations and a near-exact SSD (σ = 0.02, as the paper's λ = 10⁻⁴ growth). The
    registration runs on the mask's bounding box padded by 3 kernel σ (4 voxels at least; the kernel is
    zero-padded, so the box's border is far from the growth) and the frames are zero outside it. The trajectory,
    resampled to ``n_frames`` even times and clipped to [0, 1], is the schedule.

    Returns
    -------
    frames : list of ndarray
        M(t_j) on ``fixed``'s grid.
    coverage : float
        ∫ min(M₁, mask_s) / ∫ mask_s with mask_s the smoothed mask: how much of the mask the last frame reaches.
    """
    from scipy import ndimage

    from ..lddmm import register_lddmm

    h = np.asarray(fixed.spacing_array_order, dtype=np.float64)
    target = np.clip(ndimage.gaussian_filter(mask, 1.0), 0.0, 1.0)
    inside = np.nonzero(mask > 0.5)
    extent = max(float(np.ptp(ax) + 1) * hh for ax, hh in zip(inside, h))
    sigma = max(GROW_KERNEL_FRACTION * extent, 2.0 * float(h.max()))
    box = tuple(slice(max(0, int(ax.min()) - pad), min(n, int(ax.max()) + 1 + pad))
                for ax, n, pad in ((ax, n, max(4, int(math.ceil(3.0 * sigma / hh))))
                                   for ax, n, hh in zip(inside, mask.shape, h)))
    sub = Image(np.ascontiguousarray(target[box], dtype=np.float32), tuple(h[::-1]))
    ball = ball_at_center(mask[box] > 0.5, h)
    res = register_lddmm(sub, sub.like(ball.astype(np.float32)), metric="ssd", kernel_sigma=sigma,
                         data_sigma=GROW_DATA_SIGMA, intensity="joint", method="full", shrink_factors=GROW_SHRINK,
                         iterations=GROW_ITERATIONS, return_trajectory=True, dtype=dtype, backend=backend)
    path = [np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0) for a in res.extras["trajectory_images"]]
    coverage = float(np.sum(np.minimum(path[-1], target[box])) / max(np.sum(target), 1e-12))
    _log.info("metamorphosis: grown mask from a ball reaches %.0f %% of the mask (%d LDDMM time steps)",
              100 * coverage, len(path) - 1)
    frames = []
    for t in np.linspace(0.0, 1.0, n_frames):
        f = np.zeros(mask.shape)
        f[box] = _at_time(path, t)
        frames.append(f)
    return frames, coverage


def _at_time(frames, t: float) -> np.ndarray:
    """The schedule's frame at time ``t`` ∈ [0, 1], linear between evenly spaced frames."""
    if len(frames) == 1:
        return frames[0]
    s = t * (len(frames) - 1)
    j = min(int(math.floor(s)), len(frames) - 2)
    a = s - j
    return frames[j] if a == 0 else (1.0 - a) * frames[j] + a * frames[j + 1]


class MaskSchedule:
    """M_t on the fixed grid and on every pyramid level, as the shooting's ``source_weights`` for n time steps.

    Parameters
    ----------
    frames : list of ndarray
        M(t_j) at t_j = j/(F − 1) on the fixed grid (one frame: constant in time).
    fixed : Image
        The fixed image (the frames' grid).
    """

    def __init__(self, frames, fixed: Image):
        self.frames = [np.asarray(f, dtype=np.float64) for f in frames]
        self.fixed = fixed
        self._levels = {}
        self.coverage = None  # "grow": the fraction of the mask reached by the last frame

    @classmethod
    def build(cls, mask, evolution, fixed: Image, *, dtype=np.float32, backend=None) -> "MaskSchedule":
        """The schedule of ``register_metamorphosis``'s ``mask``/``mask_evolution`` (None mask: M ≡ 1)."""
        if mask is None:
            if not isinstance(evolution, str):
                return cls([_check_mask(m, fixed, f"mask_evolution[{j}]") for j, m in enumerate(evolution)], fixed)
            return cls([np.ones(fixed.shape)], fixed)
        m = _check_mask(mask, fixed, "mask")
        if not np.any(m > 0):
            raise ValueError("mask is empty (no voxel > 0): pass the lesion's mask, or mask=None for classical "
                             "metamorphosis")
        if isinstance(evolution, str):
            if evolution == "constant":
                return cls([m], fixed)
            if evolution == "grow":
                if not np.any(m > 0.5):
                    raise ValueError("mask_evolution='grow' needs a mask with voxels above 0.5 (the lesion)")
                frames, coverage = grown_frames(fixed, m, dtype=dtype, backend=backend)
                out = cls(frames, fixed)
                out.coverage = coverage
                return out
            raise ValueError(f"mask_evolution must be 'grow', 'constant' or a sequence of masks, got {evolution!r}")
        raise ValueError("pass either mask (with mask_evolution 'grow' or 'constant') or a sequence of masks as "
                         "mask_evolution, not both")

    def to(self, device) -> "MaskSchedule":
        """The schedule with its frames on ``device`` ("cpu" or "cuda"): uploaded once; the levels' frames and the
        weights are then computed there."""
        from ...backend import to_device

        out = MaskSchedule([], self.fixed)
        out.frames = [to_device(f, device) for f in self.frames]
        out.coverage = self.coverage
        return out

    def weights(self, level_fixed: Image, shrink: float, n: int, dtype) -> list:
        """``W_k = M(k/n)``, k = 0..n−1, on ``level_fixed``'s grid: the pyramid level of the fixed image shrunk by
        ``shrink`` (the frames are resampled as the pyramid resamples the image, without smoothing)."""
        from ...kernels._backend import get_array_module
        from ...pyramid import downsample

        xp = get_array_module(self.frames[0])  # on the frames' device (resampled there, no upload)
        key = (level_fixed.shape, tuple(level_fixed.spacing))
        if key not in self._levels:
            if level_fixed.same_grid(self.fixed):
                self._levels[key] = self.frames
            else:
                self._levels[key] = [xp.clip(xp.asarray(downsample(self.fixed.like(f.astype(np.float32)), shrink,
                                                                    0.0).data, dtype=np.float64), 0.0, 1.0)
                                     for f in self.frames]
                if self._levels[key][0].shape != level_fixed.shape:  # pragma: no cover - the pyramid's own geometry
                    raise RuntimeError("mask schedule and pyramid level disagree on the grid")
        frames = self._levels[key]
        if len(frames) == 1:
            return [frames[0].astype(dtype)] * n
        return [_at_time(frames, k / n).astype(dtype) for k in range(n)]

    def at(self, t: float) -> np.ndarray:
        """M(t) on the fixed grid."""
        return _at_time(self.frames, t)
