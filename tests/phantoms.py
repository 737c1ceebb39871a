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


def blobs(shift=(0.0, 0.0), angle=0.0, n=64):
    """A smooth 2-D test image (seeded), moved by a rotation about the centre and a shift (mm)."""
    rng = np.random.default_rng(7)
    base = ndimage.gaussian_filter(rng.standard_normal((n, n)), 3.0)
    base = (base - base.min()) / np.ptp(base) * 1000.0
    c = (n - 1) / 2
    th = np.deg2rad(angle)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    p = np.stack([xx.ravel() - c, yy.ravel() - c])
    q = rot.T @ p
    x = q[0] + c - shift[0]
    y = q[1] + c - shift[1]
    out = ndimage.map_coordinates(base, [y, x], order=3, mode="nearest").reshape(n, n)
    return out.astype(np.float32)
