"""Affine-family transform models: parameter vector ↔ ``T(y) = A(p) (y − c) + c + t(p)`` and ∂T/∂p.

The parameterisations are ITK's (and elastix's, ELASTIX.md §7), centre ``c`` fixed during the optimisation:

* ``translation``: ``[t]``;
* ``rigid`` (Euler): 2-D ``[θ, tx, ty]``; 3-D ``[θx, θy, θz, tx, ty, tz]`` with R = Rz · Rx · Ry (ITK's default);
* ``similarity``: 2-D ``[s, θ, tx, ty]`` (ITK ``Similarity2DTransform``); 3-D ``[θx, θy, θz, tx, ty, tz, s]``
  (Euler angles as above; ITK's ``Similarity3DTransform`` uses a versor instead: same maps, other coordinates);
* ``affine``: ``[a11 a12 … a_dd (row-major), t]``.

Each model gives the matrix and translation of a parameter vector and their exact derivatives ``dA/dp_k``
(P, n, n) and ``dt/dp_k`` (P, n), which is all the engine needs: for samples ``y_j`` with per-sample weights
``w_j = ∂C/∂m_j ∇M(T(y_j))`` the gradient is ``∂C/∂p_k = ⟨dA/dp_k, Σ_j w_j (y_j − c)ᵀ⟩ + ⟨dt/dp_k, Σ_j w_j⟩``.
"""
from __future__ import annotations

import numpy as np

from ...transforms import Affine, euler_angles

__all__ = ["MODELS", "AffineModel", "model"]

#: transform name -> number of parameters in 2-D and 3-D
MODELS = {"translation": (2, 3), "rigid": (3, 6), "similarity": (4, 7), "affine": (6, 12)}


def _rot2(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]]), np.array([[-s, -c], [c, -s]])


def _rot3(angles):
    """R = Rz Rx Ry and its three partial derivatives w.r.t. (θx, θy, θz)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    drx = np.array([[0, 0, 0], [0, -sx, -cx], [0, cx, -sx]])
    dry = np.array([[-sy, 0, cy], [0, 0, 0], [-cy, 0, -sy]])
    drz = np.array([[-sz, -cz, 0], [cz, -sz, 0], [0, 0, 0]])
    return rz @ rx @ ry, (rz @ drx @ ry, rz @ rx @ dry, drz @ rx @ ry)


class AffineModel:
    """One affine-family parameterisation about a fixed centre.

    Parameters
    ----------
    kind : {"translation", "rigid", "similarity", "affine"}
    ndim : {2, 3}
    center : array_like, shape (ndim,)
        The centre of rotation c (mm).
    """

    def __init__(self, kind: str, ndim: int, center):
        if kind not in MODELS:
            raise ValueError(f"unknown transform {kind!r}; valid: {', '.join(MODELS)}")
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.kind = kind
        self.ndim = ndim
        self.center = np.asarray(center, dtype=float).reshape(ndim)
        self.size = MODELS[kind][ndim - 2]

    def identity(self) -> np.ndarray:
        """The parameters of the identity map."""
        p = np.zeros(self.size)
        n = self.ndim
        if self.kind == "similarity":
            p[0 if n == 2 else 6] = 1.0
        elif self.kind == "affine":
            p[: n * n] = np.eye(n).ravel()
        return p

    def _translation_slice(self) -> slice:
        n = self.ndim
        start = {"translation": 0, "rigid": 1 if n == 2 else 3, "similarity": 2 if n == 2 else 3,
                 "affine": n * n}[self.kind]
        return slice(start, start + n)

    def matrix(self, p, *, derivatives: bool = False):
        """``A(p)``, ``t(p)`` and, with ``derivatives``, ``dA/dp`` (P, n, n) and ``dt/dp`` (P, n)."""
        p = np.asarray(p, dtype=float)
        n, k = self.ndim, self.kind
        ts = self._translation_slice()
        t = p[ts].copy()
        dA = np.zeros((self.size, n, n))
        dt = np.zeros((self.size, n))
        dt[ts] = np.eye(n)
        if k == "translation":
            a = np.eye(n)
        elif k == "affine":
            a = p[: n * n].reshape(n, n).copy()
            dA[: n * n] = np.eye(n * n).reshape(n * n, n, n)
        elif n == 2:
            theta = p[0] if k == "rigid" else p[1]
            r, dr = _rot2(theta)
            s = 1.0 if k == "rigid" else p[0]
            a = s * r
            if k == "rigid":
                dA[0] = dr
            else:
                dA[0], dA[1] = r, s * dr
        else:
            r, drs = _rot3(p[:3])
            s = 1.0 if k == "rigid" else p[6]
            a = s * r
            for i in range(3):
                dA[i] = s * drs[i]
            if k == "similarity":
                dA[6] = r
        return (a, t, dA, dt) if derivatives else (a, t)

    def to_affine(self, p) -> Affine:
        """The :class:`~classreg.Affine` of ``p`` (about :attr:`center`)."""
        a, t = self.matrix(p)
        return Affine(a, t, self.center)

    def from_affine(self, transform: Affine) -> np.ndarray:
        """Parameters of the model closest to ``transform`` re-centred at :attr:`center` (exact when it is
        representable; for rigid/similarity the rotation is the polar factor of the matrix)."""
        n = self.ndim
        a = np.asarray(transform.matrix, dtype=float)
        t = transform.map_points(self.center[None])[0] - self.center  # T(c) = c + t
        p = self.identity()
        p[self._translation_slice()] = t
        if self.kind == "affine":
            p[: n * n] = a.ravel()
        elif self.kind in ("rigid", "similarity"):
            u, sv, vt = np.linalg.svd(a)
            r = u @ vt
            if np.linalg.det(r) < 0:
                u[:, -1] *= -1
                r = u @ vt
            angles = euler_angles(r)
            if n == 2:
                if self.kind == "rigid":
                    p[0] = angles[0]
                else:
                    p[0], p[1] = float(np.mean(sv)), angles[0]
            else:
                p[:3] = angles
                if self.kind == "similarity":
                    p[6] = float(np.mean(sv))
        return p

    def scales(self, points) -> np.ndarray:
        """elastix's ``AutomaticScalesEstimation``: the mean over ``points`` of ``‖∂T/∂p_k‖²`` per parameter."""
        _, _, dA, dt = self.matrix(self.identity(), derivatives=True)
        y = np.asarray(points, dtype=float) - self.center
        mean = y.mean(axis=0)
        second = (y.T @ y) / len(y)
        out = (np.einsum("kij,jl,kil->k", dA, second, dA) + 2.0 * np.einsum("ki,kij,j->k", dt, dA, mean)
               + np.einsum("ki,ki->k", dt, dt))
        return np.maximum(out, 1e-12)

    def gradient(self, p, points, weights, valid=None) -> np.ndarray:
        """``Σ_j weights_j · ∂T/∂p (points_j)`` over the ``valid`` points: the chain rule for per-sample
        ``weights`` (one row ∂C/∂T(y_j) per valid point)."""
        y = np.asarray(points if valid is None else points[valid], dtype=float) - self.center
        return self.gradient_from_sums(p, weights.T @ y, weights.sum(axis=0))

    def gradient_from_sums(self, p, g_mat, g_vec, *, derivatives=None) -> np.ndarray:
        """The chain rule from the two sums ``g_mat = Σ_j w_j (y_j − c)ᵀ`` (n, n) and ``g_vec = Σ_j w_j`` (n,):
        ``Σ_ab ∂A_ab/∂p g_mat_ab + ∂t/∂p · g_vec`` (what :func:`classreg.kernels.affine.affine_mi_kernel` returns).
        ``derivatives``: ``(dA/dp, dt/dp)`` at ``p`` when the caller has them (:meth:`matrix`)."""
        dA, dt = self.matrix(p, derivatives=True)[2:] if derivatives is None else derivatives
        return dA.reshape(self.size, -1) @ np.asarray(g_mat).ravel() + dt @ g_vec

    def displacement(self, p, dp, points) -> np.ndarray:
        """``∂T/∂p(p) · dp`` at ``points`` (N, n): how far a small parameter step moves each point (mm)."""
        _, _, dA, dt = self.matrix(p, derivatives=True)
        y = np.asarray(points, dtype=float) - self.center
        m = np.einsum("k,kij->ij", dp, dA)
        return y @ m.T + dt.T @ dp

    def map(self, p, points) -> np.ndarray:
        """``T_p(points)``."""
        a, t = self.matrix(p)
        return (np.asarray(points, dtype=float) - self.center) @ a.T + self.center + t

    def penalty(self, p):
        """No regulariser on an affine map: ``(0, 0)``."""
        return 0.0, None


def model(kind: str, ndim: int, center) -> AffineModel:
    """The model ``kind`` about ``center``."""
    return AffineModel(kind, ndim, center)
