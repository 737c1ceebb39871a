"""Synthetic test data with known answers (fixed seeds, no downloads)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

import classreg as cr


def oblique_direction(ndim: int, rng, *, flip: bool = True) -> np.ndarray:
    """A random proper rotation, times a reflection of the first axis when ``flip`` (det = -1)."""
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if flip:
        q[:, -1] = -q[:, -1]
    return q


def smooth_image(shape, rng, *, sigma=2.0, dtype=np.float64) -> np.ndarray:
    """Smooth random texture in [0, 1]."""
    a = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    a = (a - a.min()) / (a.max() - a.min())
    return a.astype(dtype)


def oblique_image(shape, rng, *, vector=False, dtype=np.float64, flip=True) -> cr.Image:
    """Image with anisotropic spacing, non-zero origin and an oblique, flipped direction."""
    ndim = len(shape)
    spacing = rng.uniform(0.6, 2.5, size=ndim)
    origin = rng.uniform(-60, 60, size=ndim)
    direction = oblique_direction(ndim, rng, flip=flip)
    data = smooth_image(shape, rng, dtype=dtype)
    if vector:
        data = np.stack([smooth_image(shape, rng, dtype=dtype) * 4 - 2 for _ in range(ndim)], axis=-1)
    return cr.Image(data, spacing, origin, direction.ravel(), vector=vector)


def smooth_field(shape, rng, *, amplitude=1.0, sigma=3.0) -> np.ndarray:
    """Smooth random displacement (*shape, ndim) scaled so that max |component| = amplitude."""
    ndim = len(shape)
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(ndim)], axis=-1)
    return u * (amplitude / np.abs(u).max())
