"""Rotations for the CSNGF search: quasi-random samples over the rotation space, perturbations, ITK Euler angles.

Rotation matrices act on physical (x, y[, z]) coordinates. Euler angles follow ITK's ``Euler2DTransform`` (one
angle) and ``Euler3DTransform`` (``R = Rz · Rx · Ry``), in radians.
"""
from __future__ import annotations

import warnings

import numpy as np

from ...transforms import euler_angles, rotation_matrix

__all__ = ["euler_angles", "perturb_rotation", "sample_rotations"]


def sample_rotations(n: int, ndim: int, *, max_angle: float = 180.0, seed=0) -> np.ndarray:
    """``n`` quasi-random rotation matrices, shape (n, ndim, ndim), deterministic for a given seed.

    2-D: angles ``-m + 2m (i + u)/n`` (a stratified grid with one random offset u; m = ``max_angle`` degrees).
    3-D with ``max_angle >= 180``: uniform over SO(3) — a scrambled Sobol sequence mapped to unit quaternions with
    Shoemake's method (K. Shoemake, "Uniform random rotations", Graphics Gems III, 1992); smaller ``max_angle``:
    ITK Euler angles from a Sobol sequence in ``[-m, m]³``. ``seed`` is an int or a :class:`numpy.random.Generator`
    (which is advanced).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    m = float(max_angle)
    if ndim == 2:
        ang = np.deg2rad(-m + 2.0 * m * (np.arange(n) + rng.uniform()) / max(n, 1))
        c, s = np.cos(ang), np.sin(ang)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    if ndim != 3:
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if n == 0:
        return np.zeros((0, 3, 3))
    from scipy.stats import qmc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "balance properties" note for n not a power of 2
        u = qmc.Sobol(d=3, scramble=True, seed=rng).random(n)
    if m >= 180.0:
        from scipy.spatial.transform import Rotation

        a, b = np.sqrt(1.0 - u[:, 0]), np.sqrt(u[:, 0])
        q = np.stack([a * np.sin(2 * np.pi * u[:, 1]), a * np.cos(2 * np.pi * u[:, 1]),
                      b * np.sin(2 * np.pi * u[:, 2]), b * np.cos(2 * np.pi * u[:, 2])], -1)
        return Rotation.from_quat(q).as_matrix()
    ang = np.deg2rad(-m + 2.0 * m * u)
    return np.stack([rotation_matrix(t) for t in ang])


def perturb_rotation(r, half_width_deg: float, rng) -> np.ndarray:
    """``r`` composed with a random rotation whose Euler angles are uniform in ±``half_width_deg`` degrees
    (``r · R(δ)``; one angle in 2-D, three in 3-D), drawn from the generator ``rng``."""
    n = r.shape[0]
    k = 1 if n == 2 else 3
    return r @ rotation_matrix(np.deg2rad(rng.uniform(-half_width_deg, half_width_deg, size=k)))
