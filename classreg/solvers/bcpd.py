"""``register_points``: Bayesian Coherent Point Drift and multi-organ BCPD on labelled point clouds (METHODS.md §4).

Direction convention (docs/solvers/points.md): the **source** point set is the *moving* side and the **target** the
*fixed* side.  BCPD estimates ``T(y) = s R (y + v(y)) + t`` that carries source points onto the target, so

* ``Result.apply_points(source_points)`` (moving → fixed) evaluates ``T`` exactly (:class:`PointDeformation`,
  ``Result.inverse``);
* ``Result.transform`` is the fixed → moving pull-back ``T⁻¹`` (:class:`PointDeformationInverse`, fixed-point
  inversion; its error is reported), so ``Result.apply(source_space_image)`` resamples a source-space image onto a
  target-space grid (pass ``reference=`` to :func:`register_points`, or use :func:`points_displacement_field`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from ..backend import thread_count, to_device, to_numpy, versions
from ..image import Image
from ..kernels import points as kp
from ..progress import Progress, StopRegistration
from ..result import Result
from ..transforms import DisplacementField, Transform, register_transform_format

__all__ = [
    "register_points",
    "PointDeformation",
    "PointDeformationInverse",
    "points_displacement_field",
    "label_surface_points",
    "label_transition_matrix",
    "read_points",
    "load_point_deformation",
    "add_cli",
]

logger = logging.getLogger("classreg")

_MODES = ("nonrigid", "similarity", "rigid")
_LOWRANK = ("auto", "full", "eigsh", "nystrom")


# ====================================================================================================== kernel
class _Kernel:
    """The multi-organ kernel of MO-BCPD in one set of units: ``G_ij = amp[l_i,l_j] exp(-|y_i-y_j|²/den[l_i,l_j])``.

    ``amp = f(Λ_i, Λ_j) S_ij`` with f = sqrt(Λ_iΛ_j) ("variance", G_ii = Λ) or Λ_iΛ_j ("product", as printed in
    the paper); ``den = 2 B_i B_j``.
    """

    def __init__(self, lam, bw, S, convention):
        lam = np.asarray(lam, dtype=float)
        bw = np.asarray(bw, dtype=float)
        S = np.asarray(S, dtype=float)
        pref = np.sqrt(np.outer(lam, lam)) if convention == "variance" else np.outer(lam, lam)
        self.amp = pref * S
        self.den = 2.0 * np.outer(bw, bw)
        self.lam, self.bw, self.S = lam, bw, S

    def scaled(self, r):
        """The same kernel for points divided by ``r`` (lengths / r, variances / r²)."""
        k = _Kernel.__new__(_Kernel)
        k.amp = self.amp / r**2
        k.den = self.den / r**2
        k.lam, k.bw, k.S = self.lam / r**2, self.bw / r, self.S
        return k

    def matrix(self, a, la, b=None, lb=None):
        if b is None:
            b, lb = a, la
        return kp.kernel_matrix(a, la, b, lb, self.amp, self.den)


# ============================================================================================== transforms
class PointDeformation(Transform):
    """The BCPD map from **source** (moving) space to **target** (fixed) space: ``T(y) = A (y + v(y)) + t``.

    ``A = sR`` is the similarity part and ``v`` the Gaussian-process posterior mean of the non-rigid displacement,
    interpolated to any point by the multi-organ kernel (MO-BCPD eq. 5-6):
    ``v(ỹ) = Σ_j G((ỹ, l), (z_j, l_j)) a_j`` over anchor points ``z_j`` (the source points, or the Nyström landmarks).
    A query point needs an organ label: pass ``labels=`` to :meth:`map_points`, otherwise the label of its nearest
    source point is used. Everything is in mm.

    In classreg's fixed→moving convention this is the *inverse* registration transform (``Result.inverse``);
    ``Result.apply_points`` uses it.
    """

    def __init__(self, matrix, translation, anchors, anchor_labels, coef, amp, den, source_points, source_labels,
                 deformed_source=None, label_values=None):
        self.matrix = np.asarray(matrix, dtype=float)
        self.translation = np.asarray(translation, dtype=float)
        self.ndim = self.matrix.shape[0]
        self.anchors = np.asarray(anchors, dtype=float)
        self.anchor_labels = np.asarray(anchor_labels, dtype=np.int64)
        self.coef = np.asarray(coef, dtype=float)
        self.amp = np.asarray(amp, dtype=float)
        self.den = np.asarray(den, dtype=float)
        self.source_points = np.asarray(source_points, dtype=float)
        self.source_labels = np.asarray(source_labels, dtype=np.int64)
        self.deformed_source = None if deformed_source is None else np.asarray(deformed_source, dtype=float)
        self.label_values = np.arange(self.amp.shape[0]) if label_values is None else np.asarray(label_values)
        self._tree = None
        self._tree_def = None

    # -- labels
    def _label_index(self, labels, n):
        lab = np.asarray(labels).ravel()
        if lab.shape != (n,):
            raise ValueError(f"labels must have one entry per point ({n}), got shape {np.shape(labels)}")
        lookup = {v: i for i, v in enumerate(self.label_values.tolist())}
        try:
            return np.array([lookup[v] for v in lab.tolist()], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"labels contain {exc.args[0]!r}, which is not one of the registration's organ labels "
                             f"{self.label_values.tolist()}") from None

    def nearest_source_labels(self, points):
        """Organ index of the nearest source point (the default label of a query point)."""
        from scipy.spatial import cKDTree

        if self._tree is None:
            self._tree = cKDTree(self.source_points)
        return self.source_labels[self._tree.query(points)[1]]

    def nearest_deformed_labels(self, points):
        """Organ index of the nearest *deformed* source point ``T(y_m)`` (default label in target space)."""
        from scipy.spatial import cKDTree

        if self._tree_def is None:
            ref = self.deformed_source if self.deformed_source is not None else self.map_points(self.source_points)
            self._tree_def = cKDTree(ref)
        return self.source_labels[self._tree_def.query(points)[1]]

    def displacement(self, points, labels=None, *, _index=None) -> np.ndarray:
        """Non-rigid displacement ``v`` (before the similarity) at source-space points, mm."""
        p = self._check_points(points)
        li = _index if _index is not None else (
            self.nearest_source_labels(p) if labels is None else self._label_index(labels, len(p)))
        if self.coef.size == 0 or not np.any(self.coef):
            return np.zeros_like(p)
        return kp.kernel_apply(p, li, self.anchors, self.anchor_labels, self.coef, self.amp, self.den)

    def map_points(self, points, labels=None) -> np.ndarray:
        """Map **source-space** points (N, ndim) mm into target space: ``sR (y + v(y)) + t``.

        ``labels`` (organ label values, one per point) select the organ kernel; default: nearest source point.
        """
        p = self._check_points(points)
        return (p + self.displacement(p, labels)) @ self.matrix.T + self.translation

    def inverse(self) -> "PointDeformationInverse":
        return PointDeformationInverse(self)

    def to_sitk(self):
        raise NotImplementedError("a BCPD point deformation has no ITK equivalent; sample it on a grid with "
                                  "classreg.points_displacement_field(...) and save that field")

    file_suffix = ".npz"

    def save(self, path, *, kind: str = "PointDeformation") -> Path:
        """Write the parameters to a ``.npz`` file (read back by :func:`load_point_deformation`)."""
        from ..io import atomic_output

        p = Path(os.fspath(path))
        if not p.name.endswith(".npz"):
            raise ValueError(f"path {str(path)!r}: a PointDeformation is saved as .npz")
        with atomic_output(p) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, kind=kind, **self._state())
        return p

    def _state(self):
        return dict(matrix=self.matrix, translation=self.translation, anchors=self.anchors,
                    anchor_labels=self.anchor_labels, coef=self.coef, amp=self.amp, den=self.den,
                    source_points=self.source_points, source_labels=self.source_labels,
                    deformed_source=self.deformed_source if self.deformed_source is not None else np.zeros((0, 0)),
                    label_values=self.label_values)

    def __repr__(self):
        return (f"PointDeformation(ndim={self.ndim}, anchors={len(self.anchors)}, organs={self.amp.shape[0]}, "
                f"scale={np.cbrt(abs(np.linalg.det(self.matrix))) if self.ndim == 3 else np.sqrt(abs(np.linalg.det(self.matrix))):.6g})")


class PointDeformationInverse(Transform):
    """``T⁻¹``: **target** (fixed) space → **source** (moving) space, the pull-back used by ``Result.apply``.

    Solved per point by the fixed-point iteration ``y ← A⁻¹(x - t) - v(y)`` (converges where ``|∇v| < 1``), with
    the organ label of the nearest deformed source point unless ``labels`` are given. After each call,
    ``last_error`` holds ``{"max_error", "mean_error"}`` = residual ``|T(y) - x|`` in mm and the iteration count.
    """

    def __init__(self, forward: PointDeformation, *, max_iter: int = 50, tol: float = 1e-6):
        self.forward = forward
        self.ndim = forward.ndim
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.last_error = None

    def map_points(self, points, labels=None) -> np.ndarray:
        """Map **target-space** points (N, ndim) mm into source space (approximate inverse, see class doc)."""
        f = self.forward
        x = self._check_points(points)
        li = f.nearest_deformed_labels(x) if labels is None else f._label_index(labels, len(x))
        base = (x - f.translation) @ np.linalg.inv(f.matrix).T
        y = base.copy()
        it = 0
        err = np.zeros(len(x))
        for it in range(1, self.max_iter + 1):
            v = f.displacement(y, _index=li)
            y_new = base - v
            step = np.sqrt(((y_new - y) ** 2).sum(1))
            y = y_new
            if step.size == 0 or step.max() <= self.tol:
                break
        if len(x):
            res = (y + f.displacement(y, _index=li)) @ f.matrix.T + f.translation - x
            err = np.sqrt((res**2).sum(1))
        self.last_error = {"max_error": float(err.max(initial=0.0)), "mean_error": float(err.mean()) if len(err) else 0.0,
                           "iterations": it}
        return y

    def inverse(self) -> PointDeformation:
        return self.forward

    def to_sitk(self):
        raise NotImplementedError("sample the inverse on a grid with classreg.points_displacement_field(...)")

    file_suffix = ".npz"

    def save(self, path) -> Path:
        """Write the forward transform's parameters marked as the inverse (.npz); :func:`load_point_deformation`
        reads it back as a :class:`PointDeformationInverse`."""
        return self.forward.save(path, kind="PointDeformationInverse")

    def __repr__(self):
        return f"PointDeformationInverse({self.forward!r})"


def load_point_deformation(path):
    """Read a :class:`PointDeformation` (or its :class:`PointDeformationInverse`) written by ``save``."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        kind = str(z["kind"]) if "kind" in z.files else ""
        if kind not in ("PointDeformation", "PointDeformationInverse"):
            raise ValueError(f"{str(path)!r} does not hold a PointDeformation")
        st = {k: z[k] for k in z.files if k != "kind"}
    if st["deformed_source"].size == 0:
        st["deformed_source"] = None
    forward = PointDeformation(**st)
    return forward if kind == "PointDeformation" else PointDeformationInverse(forward)


register_transform_format(".npz", load_point_deformation)


def points_displacement_field(transform, reference: Image, *, labels=None, dtype=np.float32) -> DisplacementField:
    """Sample a point transform on ``reference``'s grid as a :class:`~classreg.DisplacementField` ``u(x) = T(x) - x``.

    Parameters
    ----------
    transform : PointDeformation or PointDeformationInverse
        ``result.transform`` (target → source; the field then warps source-space images onto ``reference``, a
        target-space grid, with ``classreg.resample(image, field, reference=reference)``) or ``result.inverse``.
    reference : Image
        The grid (physical geometry is used, data ignored).
    labels : Image or array, optional
        Organ label (one of the registration's label values) of every grid voxel; default: nearest (deformed)
        source point, which gives each organ's own motion in its Voronoi region.
    """
    if not isinstance(transform, (PointDeformation, PointDeformationInverse)):
        raise TypeError("transform must be a PointDeformation or PointDeformationInverse")
    if not isinstance(reference, Image):
        raise TypeError(f"reference must be a classreg.Image, got {type(reference).__name__}")
    pts = reference.grid_points().reshape(-1, reference.ndim)
    lab = None
    if labels is not None:
        lab = labels.numpy() if isinstance(labels, Image) else np.asarray(labels)
        lab = lab.reshape(-1)
    mapped = transform.map_points(pts, lab)
    disp = (mapped - pts).reshape(*reference.shape, reference.ndim).astype(dtype)
    return DisplacementField.from_array(disp, reference)


# =============================================================================================== helpers
def label_transition_matrix(labels, error_rate: float):
    """Label-transition matrix U for a segmentation that mislabels a fraction ``error_rate`` of points uniformly.

    ``U[l, l'] = P(target label l | source organ l')`` = ``1 - error_rate`` on the diagonal and
    ``error_rate / (L - 1)`` elsewhere (MO-BCPD: ``u_{l,l'} = Σ_k P(g=k | l') P(l | g=k)``).
    """
    n = len(labels) if not np.isscalar(labels) else int(labels)
    e = float(error_rate)
    if not 0 <= e < 1:
        raise ValueError(f"error_rate must be in [0, 1), got {error_rate!r}")
    if n == 1:
        return np.ones((1, 1))
    return np.full((n, n), e / (n - 1)) + (1 - e - e / (n - 1)) * np.eye(n)


def label_surface_points(label_image: Image, labels=None, *, n_points=None, seed=0, step_size=1):
    """Organ surface points from a label map (marching cubes, scikit-image), in physical mm.

    Parameters
    ----------
    label_image : Image
        Integer label map (3-D; 2-D uses contour tracing).
    labels : sequence of int, optional
        Label values to extract (default: every non-zero value).
    n_points : int or dict, optional
        Points kept per label (random subset, seeded); default all vertices.
    seed : int
        Seed of the subsampling.
    step_size : int
        Marching-cubes step (voxels); larger is coarser.

    Returns
    -------
    points : ndarray (P, ndim) physical (x, y[, z]) mm;  point_labels : ndarray (P,) label values.
    """
    try:
        from skimage import measure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("label_surface_points needs scikit-image (pip install scikit-image)") from exc
    if not isinstance(label_image, Image):
        raise TypeError(f"label_image must be a classreg.Image, got {type(label_image).__name__}")
    data = label_image.numpy()
    if labels is None:
        labels = [v for v in np.unique(data).tolist() if v != 0]
    rng = np.random.default_rng(seed)
    pts, labs = [], []
    for lab in labels:
        mask = np.pad((data == lab).astype(np.float32), 1)
        if not mask.any():
            raise ValueError(f"label {lab!r} does not occur in label_image")
        if label_image.ndim == 3:
            verts = measure.marching_cubes(mask, 0.5, step_size=step_size)[0]
        else:
            verts = np.concatenate(measure.find_contours(mask, 0.5))
        verts = verts - 1.0  # undo the padding: (z, y, x) continuous indices
        k = n_points.get(lab) if isinstance(n_points, dict) else n_points
        if k is not None and k < len(verts):
            verts = verts[np.sort(rng.choice(len(verts), int(k), replace=False))]
        pts.append(label_image.index_to_world(verts))
        labs.append(np.full(len(verts), lab))
    return np.concatenate(pts), np.concatenate(labs)


def _check_points(a, name):
    if a is None:
        raise TypeError(f"{name} must be an (N, 2) or (N, 3) array of points in mm, got None")
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array of points, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(f"{name} must have shape (N, 2) or (N, 3) (one point per row, x first), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty; it needs at least one point")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = int((~np.isfinite(arr).all(1)).sum())
        raise ValueError(f"{name} contains {bad} point(s) with NaN or Inf coordinates; remove them first")
    return arr


def _per_label(value, values, name, positive=True):
    """Scalar, sequence (one per label in sorted order) or dict {label: value} → array over labels."""
    n = len(values)
    if isinstance(value, dict):
        missing = [v for v in values if v not in value]
        if missing:
            raise ValueError(f"{name} has no entry for label(s) {missing}")
        out = np.array([float(value[v]) for v in values])
    elif np.ndim(value) == 0:
        out = np.full(n, float(value))
    else:
        out = np.asarray(value, dtype=float).ravel()
        if out.shape != (n,):
            raise ValueError(f"{name} must be a scalar, a dict or have one entry per label ({n}), got {out.shape}")
    if not np.all(np.isfinite(out)) or (positive and np.any(out <= 0)):
        raise ValueError(f"{name} must be finite and positive, got {out.tolist()}")
    return out


def _similarity(xh, uh, nu, n_hat, sig_bar2, D, mode):
    xb = nu @ xh / n_hat
    ub = nu @ uh / n_hat
    xc = xh - xb
    uc = uh - ub
    Sxu = (xc * nu[:, None]).T @ uc
    Phi, _, PsiT = np.linalg.svd(Sxu)
    C = np.eye(D)
    C[-1, -1] = np.sign(np.linalg.det(Phi @ PsiT)) or 1.0
    R = Phi @ C @ PsiT
    if mode == "rigid":
        s = 1.0
    else:
        s = float(np.sum(R * Sxu) / (np.sum(nu * (uc**2).sum(1)) + n_hat * D * sig_bar2))
    t = xb - s * R @ ub
    return s, R, t


# ============================================================================================== the solver
_BLAS_CONTROLLER = []


def _single_threaded_blas(func):
    """Run ``func`` with the BLAS thread pool limited to one thread (threadpoolctl, when installed).

    The VB loop alternates numba-parallel E-steps with small BLAS calls (M×K by K×K products); a multi-threaded
    OpenBLAS then competes with numba's OpenMP workers, which spin after every parallel region: on 2 cores the
    BLAS calls became 5-10× slower (measured). One BLAS thread is as fast for these sizes.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            if not _BLAS_CONTROLLER:
                from threadpoolctl import ThreadpoolController

                _BLAS_CONTROLLER.append(ThreadpoolController())
            ctx = _BLAS_CONTROLLER[0].limit(limits=1, user_api="blas")
        except Exception:  # threadpoolctl missing or failing: run unchanged
            ctx = contextlib.nullcontext()
        with ctx:
            return func(*args, **kwargs)

    return wrapper


@_single_threaded_blas
def register_points(source, target, *, source_labels=None, target_labels=None, mode="nonrigid",
                    deformation=10.0, bandwidth=30.0, coherence="organ", label_transition=None,
                    lambda_convention="variance", omega=0.0, kappa=math.inf, gamma=1.0, tol=None,
                    max_iter=500, min_iter=30, rank="auto", lowrank=None, nystrom_samples=None,
                    posterior_covariance=True, truncation=1e-12, estep="auto", estep_landmarks=300,
                    estep_tol=1e-2, estep_precision="float32", pd_guard="jitter", normalize=True,
                    memory_budget_mb=2048, reference=None, seed=0, backend=None, callback=None, progress=False):
    r"""Register a labelled source point cloud onto a target with (multi-organ) Bayesian Coherent Point Drift.

    Implements the variational-Bayes BCPD of Hirose, "A Bayesian formulation of coherent point drift",
    IEEE TPAMI 43(7):2269-2286, 2021 (model eqs. 1-6 of its Sec. 4; VB updates of its Sec. 4.3 / Algorithm 1), with
    the multi-organ prior of "Multi-organ Bayesian coherent point drift" (MO-BCPD, WBIR 2022): eq. 3 the label-aware
    likelihood with transition matrix U, eq. 4 the kernel
    :math:`G_{ij} = Λ_{l_i}Λ_{l_j} S_{l_i l_j} \exp(-|y_i-y_j|^2 / (2 B_{l_i} B_{l_j}))`, eqs. 5-6 the Gaussian-process
    interpolation of the displacement to any labelled point. Plain BCPD is the one-organ case
    (``G = λ⁻¹ exp(-|y_i-y_j|²/(2β²))`` with ``deformation = 1/λ``, ``bandwidth = β``). See METHODS.md §4 and
    docs/solvers/points.md.

    Convention: ``source`` is the **moving** point set, ``target`` the **fixed** one. The estimated map
    ``T(y) = s R (y + v(y)) + t`` takes source points into target space; ``result.apply_points(source_points)``
    evaluates it (exact GP interpolation), ``result.transform`` is the fixed→moving pull-back ``T⁻¹`` (fixed-point
    inverse, error in ``metrics["inversion_error_mm"]``) and ``result.apply(image)`` warps a source-space image onto
    the ``reference`` grid (target space).

    Parameters
    ----------
    source, target : array_like (M, D), (N, D)
        Points in mm (D = 2 or 3), one per row, x first.
    source_labels, target_labels : array_like of int, optional
        Organ label of every point. Both or neither. Without labels every point belongs to one organ (plain BCPD).
    mode : {"nonrigid", "similarity", "rigid"}
        "similarity" estimates s, R, t only (no v); "rigid" also fixes s = 1.
    deformation : float, sequence or dict {label: value}
        Λ_l, the deformation magnitude per organ: prior variance of each displacement coordinate (mm², the paper
        calls it mm). Default 10 (MO-BCPD), i.e. BCPD's λ = 0.1.
    bandwidth : float, sequence or dict
        B_l, coherence bandwidth per organ in mm (BCPD's β). Default 30 mm (MO-BCPD).
    coherence : {"organ", "global"} or array (L, L)
        Inter-organ coherence S: "organ" = identity (OMC-MO-BCPD: organs deform independently, block-diagonal
        kernel), "global" = all ones (GMC-MO-BCPD), or a symmetric matrix in [0, 1] with unit diagonal
        (ordered like the sorted label values).
    label_transition : array (L, L) or float, optional
        U[l, l'] = P(target label l | source organ l'), columns over source organs. A float e is shorthand for
        :func:`label_transition_matrix` (uniform label noise e). Default identity (error-free labels).
    lambda_convention : {"variance", "product"}
        How Λ enters the kernel: "variance" uses sqrt(Λ_iΛ_j) (G_ii = Λ, reproduces BCPD with λ = 1/Λ — the
        paper's stated equivalence Λ = 10 ↔ λ = 0.1); "product" uses Λ_iΛ_j exactly as printed in eq. 4.
    omega : float in [0, 1)
        Outlier probability ω (uniform outlier density 1/V, V = bounding-box volume of the target).
    kappa : float
        Dirichlet concentration κ of the mixing weights; ``inf`` (default) keeps α_m = 1/M.
    gamma : float
        Scale of the initial σ: ``σ₀ = γ sqrt(Σ_mn |x_n - y_m|² / (MND))``.
    tol : float, optional
        Convergence tolerance in mm: stop when σ < tol or |Δσ| < tol (after ``min_iter``). Default
        1e-4 × the target's RMS radius (BCPD's default in its normalised units).
    max_iter, min_iter : int
        VB loop bounds (BCPD: 500 / 30).
    rank : "auto", "full" or int
        Rank K of the kernel approximation per kernel block: "full" solves with the exact M×M kernel (Cholesky);
        an int uses the top-K eigenpairs and the Woodbury identity (O(MK²) per iteration). "auto": full rank for
        blocks of ≤ 1500 points, else K = 100.
    lowrank : {"eigsh", "nystrom"}, optional
        How the top-K eigenpairs are found: Lanczos (scipy ``eigsh``, on the dense block if it fits the memory
        budget) or a Nyström estimate from ``nystrom_samples`` random points (BCPD's ``-K/-J``). Default: "eigsh"
        up to 3000 points per block, else "nystrom".
    nystrom_samples : int, optional
        Landmarks of the Nyström estimate (default max(300, 3K)).
    posterior_covariance : bool
        Use the posterior variances σ_m² of v in the updates (the paper's algorithm; BCPD's C code ``-a``).
    truncation : float in [0, 1)
        E-step: Gaussian factors exp(-d²/2σ²) below this are treated as zero (0 = exact), i.e. only pairs within
        ``σ sqrt(2 ln(1/truncation))`` (7.4σ for the default) are summed.
    estep : {"auto", "exact"}
        How the E-step sums (METHODS §4.2 step 2) are computed. "exact": the truncated sums over all pairs
        (numba, spatially blocked, deterministic). "auto" (default): while σ is large, the Nyström estimate of the
        sums used by BCPD's acceleration (Hirose, TPAMI 2021; the C code's ``-J`` option, function ``gaussprod``;
        :func:`classreg.kernels.points.estep_nystrom`) with ``estep_landmarks`` random landmarks from X ∪ Ŷ redrawn
        every iteration, checked every iteration against the exact sums on 64 random probe target and source
        points; once its error exceeds ``estep_tol`` (relative error of the denominators Σ_m φ_mn and of ν_m, and
        error of x̂_m in units of σ), that iteration and all later ones use the exact truncated sums (BCPD's ``-A``
        likewise switches to a KD-tree neighbour search once σ is small). Used only where it is at least 4× cheaper
        than the exact sums (M N ≥ 4 J (M + N)).
    estep_landmarks : int
        J, Nyström landmarks of the E-step (BCPD's ``-J``, default 300).
    estep_tol : float
        Largest probe error accepted from the Nyström E-step (default 0.01).
    estep_precision : {"float32", "float64"}
        Arithmetic of the exact E-step's pair loop (sums across blocks are float64 either way). float32 (default)
        is about twice as fast; its Gaussian factors have relative error < 3e-5 and the E-step outputs agree with
        float64 to ~1e-5 relative (float64 is used anyway once σ < 1e-4 × the point-set extent). float64 gives
        1e-12.
    pd_guard : {"jitter", "raise"}
        If the kernel is not positive semi-definite (possible when S has off-diagonal mass and B varies between
        organs, METHODS §4.6): add the smallest diagonal jitter that fixes it (recorded in ``params``) or raise.
    normalize : bool
        Work internally on coordinates centred on the target centroid and divided by its RMS radius (lengths
        converted accordingly; the result is the same up to rounding, reported in mm).
    memory_budget_mb : float
        Largest dense array (kernel block, E-step block) allowed; a full-rank kernel that does not fit raises
        ValueError suggesting ``rank=K``.
    reference : Image, optional
        A target-space image grid; stored as ``result.reference`` so that ``result.apply(source_image)`` works.
    seed : int
        Seed of every random choice (Nyström landmarks, eigsh start vector).
    backend : {None, "numpy", "numba", "cuda"}
        E-step backend (default numba when installed). ``"cuda"`` computes the E-step sums (exact: the blocked
        array reference; Nyström: its array code) on the GPU with CuPy, float64; the target points are uploaded
        once, the deformed source points each iteration, and the sums come back to the host, where the M-step
        (O(M·K) with the low-rank kernel) runs. Needs the ``gpu`` extra and a CUDA device.
    callback : callable, optional
        ``callback(event)`` per VB iteration (``metric`` = σ in mm, ``step`` = |Δσ|); raise
        :class:`classreg.StopRegistration` to stop.
    progress : bool
        tqdm progress bar.

    Returns
    -------
    Result
        ``transform`` (target → source, :class:`PointDeformationInverse`), ``inverse`` (source → target,
        :class:`PointDeformation`), ``history`` (per VB iteration: sigma, scale, n_hat, ...), ``converged``,
        ``stop_reason``, ``params`` (every resolved parameter, lengths in mm), ``metrics``, ``timings``.

    Raises
    ------
    ValueError
        Wrong shapes, NaN/Inf, empty sets, mismatched label lengths, unknown options, memory budget exceeded.
    """
    t_start = time.perf_counter()

    # ------------------------------------------------------------------ inputs
    Y = _check_points(source, "source")
    X = _check_points(target, "target")
    M, D = Y.shape
    N = X.shape[0]
    if X.shape[1] != D:
        raise ValueError(f"source and target must have the same dimension, got {D}-D source and {X.shape[1]}-D target")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if (source_labels is None) != (target_labels is None):
        raise ValueError("give both source_labels and target_labels, or neither")
    if source_labels is not None:
        sl = np.asarray(source_labels).ravel()
        tl = np.asarray(target_labels).ravel()
        if sl.shape != (M,):
            raise ValueError(f"source_labels must have one label per source point ({M}), got {np.shape(source_labels)}")
        if tl.shape != (N,):
            raise ValueError(f"target_labels must have one label per target point ({N}), got {np.shape(target_labels)}")
        if sl.dtype.kind not in "biu" or tl.dtype.kind not in "biu":
            if sl.dtype.kind == "f" and np.all(sl == np.round(sl)) and tl.dtype.kind == "f" and np.all(tl == np.round(tl)):
                sl, tl = sl.astype(np.int64), tl.astype(np.int64)
            else:
                raise TypeError("source_labels and target_labels must be integer organ labels")
        values = np.unique(sl)
        extra = np.setdiff1d(np.unique(tl), values)
        if extra.size:
            raise ValueError(f"target_labels contain {extra.tolist()}, which no source point has; every target "
                             "label must be one of the source labels")
        ly = np.searchsorted(values, sl)
        lx = np.searchsorted(values, tl)
    else:
        values = np.array([0])
        ly = np.zeros(M, dtype=np.int64)
        lx = np.zeros(N, dtype=np.int64)
    L = len(values)
    lam = _per_label(deformation, values.tolist(), "deformation")
    bw = _per_label(bandwidth, values.tolist(), "bandwidth")
    if isinstance(coherence, str):
        if coherence not in ("organ", "global"):
            raise ValueError(f"coherence must be 'organ', 'global' or an (L, L) matrix, got {coherence!r}")
        S = np.eye(L) if coherence == "organ" else np.ones((L, L))
    else:
        S = np.asarray(coherence, dtype=float)
        if S.shape != (L, L) or not np.allclose(S, S.T) or np.any(S < 0) or np.any(S > 1) or not np.allclose(np.diag(S), 1):
            raise ValueError(f"coherence must be a symmetric ({L}, {L}) matrix in [0, 1] with unit diagonal")
    if label_transition is None:
        U = np.eye(L)
    elif np.ndim(label_transition) == 0:
        U = label_transition_matrix(L, float(label_transition))
    else:
        U = np.asarray(label_transition, dtype=float)
        if U.shape != (L, L) or np.any(U < 0) or not np.all(np.isfinite(U)):
            raise ValueError(f"label_transition must be a non-negative ({L}, {L}) matrix")
    if lambda_convention not in ("variance", "product"):
        raise ValueError(f"lambda_convention must be 'variance' or 'product', got {lambda_convention!r}")
    if not 0 <= omega < 1:
        raise ValueError(f"omega must be in [0, 1), got {omega!r}")
    if not kappa > 0:
        raise ValueError(f"kappa must be positive (inf for fixed 1/M weights), got {kappa!r}")
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma!r}")
    if pd_guard not in ("jitter", "raise"):
        raise ValueError(f"pd_guard must be 'jitter' or 'raise', got {pd_guard!r}")
    if int(max_iter) < 1 or int(min_iter) < 0:
        raise ValueError("max_iter must be >= 1 and min_iter >= 0")
    if reference is not None and not isinstance(reference, Image):
        raise TypeError(f"reference must be a classreg.Image (a target-space grid), got {type(reference).__name__}")
    if reference is not None and reference.ndim != D:
        raise ValueError(f"reference is {reference.ndim}-D but the points are {D}-D")
    if not 0 <= truncation < 1:
        raise ValueError(f"truncation must be in [0, 1), got {truncation!r}")
    if estep not in ("auto", "exact"):
        raise ValueError(f"estep must be 'auto' or 'exact', got {estep!r}")
    if estep_precision not in ("float32", "float64"):
        raise ValueError(f"estep_precision must be 'float32' or 'float64', got {estep_precision!r}")
    if int(estep_landmarks) < 1 or not estep_tol > 0:
        raise ValueError(f"estep_landmarks must be a positive int and estep_tol positive, got {estep_landmarks!r}, "
                         f"{estep_tol!r}")
    be = kp._backend.resolve_backend(backend)

    # ------------------------------------------------------------------ normalisation & ordering
    c0 = X.mean(0)
    r = float(np.sqrt(((X - c0) ** 2).sum(1).mean())) if normalize else 1.0
    if not r > 0:
        r = 1.0
    if not normalize:
        c0 = np.zeros(D)
    tol_mm = 1e-4 * float(np.sqrt(((X - X.mean(0)) ** 2).sum(1).mean()) or 1.0) if tol is None else float(tol)
    if not tol_mm > 0:
        raise ValueError(f"tol must be positive (mm), got {tol!r}")
    oy = kp.spatial_order(Y, ly)
    ox = kp.spatial_order(X, lx)
    y = (Y[oy] - c0) / r
    x = (X[ox] - c0) / r
    ly_s = ly[oy]
    lx_s = lx[ox]
    kern_mm = _Kernel(lam, bw, S, lambda_convention)
    kern = kern_mm.scaled(r)
    tol_n = tol_mm / r

    # ------------------------------------------------------------------ kernel blocks
    t_setup = time.perf_counter()
    block_diag = np.allclose(S, np.eye(L))
    blocks = [np.nonzero(ly_s == l)[0] for l in range(L)] if block_diag else [np.arange(M)]
    budget = float(memory_budget_mb) * 2**20
    rng = np.random.default_rng(seed)
    resolved_rank = []
    jitter_used = 0.0
    kblocks = []
    if mode == "nonrigid":
        for idx in blocks:
            mb = len(idx)
            if rank == "auto":
                k_b = "full" if mb <= 1500 else 100
            elif rank == "full":
                k_b = "full"
            else:
                k_b = int(rank)
                if k_b < 1:
                    raise ValueError(f"rank must be 'auto', 'full' or a positive int, got {rank!r}")
                if k_b >= mb:
                    k_b = "full"
            if lowrank is not None and lowrank not in ("eigsh", "nystrom"):
                raise ValueError(f"lowrank must be 'eigsh' or 'nystrom', got {lowrank!r}")
            yb, lb = y[idx], ly_s[idx]
            if k_b == "full":
                need = 3 * 8.0 * mb * mb
                if need > budget:
                    raise ValueError(f"a full-rank kernel block of {mb} points needs {need / 2**20:.0f} MB "
                                     f"(> memory_budget_mb={memory_budget_mb}); use rank=K (e.g. rank=100)")
                G = kern.matrix(yb, lb)
                if not block_diag and not (np.allclose(S, 1) and np.allclose(kern.bw, kern.bw[0])):
                    ev = float(np.linalg.eigvalsh(G)[0])
                    if ev < -1e-10 * float(np.abs(np.diag(G)).max()):
                        if pd_guard == "raise":
                            raise ValueError(f"the multi-organ kernel is not positive semi-definite (smallest "
                                             f"eigenvalue {ev:.3g}); use coherence='organ' or equal bandwidths, "
                                             "or pd_guard='jitter'")
                        jit = -ev * 1.01
                        G = G + jit * np.eye(mb)
                        jitter_used = max(jitter_used, jit * r**2)
                        logger.warning("register_points: kernel not PSD (min eigenvalue %.3g); added jitter %.3g",
                                       ev, jit)
                kblocks.append(dict(idx=idx, kind="full", G=G))
                resolved_rank.append("full")
            else:
                method = lowrank or ("eigsh" if mb <= 3000 else "nystrom")
                kb, jit = _lowrank(kern, yb, lb, k_b, method, nystrom_samples, rng, budget, pd_guard)
                jitter_used = max(jitter_used, jit * r**2)
                kb["idx"] = idx
                kblocks.append(kb)
                resolved_rank.append(f"{kb['K']} ({method})")
    t_setup = time.perf_counter() - t_setup

    # ------------------------------------------------------------------ init
    s, R, t = 1.0, np.eye(D), np.zeros(D)
    yhat = y.copy()
    uhat = y.copy()
    vhat = np.zeros_like(y)
    alpha = np.full(M, 1.0 / M)
    sig_m2 = np.zeros(M)
    sum_xx = N * (y**2).sum() + M * (x**2).sum() - 2.0 * y.sum(0) @ x.sum(0)
    sigma2 = gamma**2 * max(sum_xx, 0.0) / (M * N * D)
    if not sigma2 > 0:
        raise ValueError("source and target are single identical points; nothing to register")
    span = x.max(0) - x.min(0)
    V = float(np.prod(np.where(span > 0, span, 1.0)))
    W_coef = [None] * len(kblocks)

    params = dict(
        solver="register_points", method=("OMC-MO-BCPD" if (L > 1 and block_diag) else "GMC-MO-BCPD"
                                          if L > 1 and np.allclose(S, 1) else "MO-BCPD" if L > 1 else "BCPD"),
        mode=mode, convention="source = moving, target = fixed; transform: target -> source (T^-1); "
                              "inverse/apply_points: source -> target (T)",
        n_source=M, n_target=N, ndim=D, labels=values.tolist(), deformation_mm2=lam.tolist(),
        bandwidth_mm=bw.tolist(), coherence=S.tolist(), label_transition=U.tolist(),
        lambda_convention=lambda_convention, bcpd_lambda=(1.0 / lam).tolist(), omega=float(omega),
        kappa=float(kappa), gamma=float(gamma), tol_mm=tol_mm, max_iter=int(max_iter), min_iter=int(min_iter),
        rank=resolved_rank, posterior_covariance=bool(posterior_covariance), truncation=float(truncation),
        estep=estep, estep_landmarks=int(estep_landmarks), estep_tol=float(estep_tol),
        estep_precision=estep_precision,
        pd_guard=pd_guard, jitter_mm2=jitter_used, normalize=bool(normalize), normalization_center_mm=c0.tolist(),
        normalization_scale_mm=r, sigma_init_mm=math.sqrt(sigma2) * r, volume_mm3=V * r**D,
        memory_budget_mb=float(memory_budget_mb), seed=int(seed), backend=be, threads=thread_count(),
        dtype="float64", versions=versions(),
    )

    # ------------------------------------------------------------------ VB loop
    prog = Progress("register_points", callback=callback, progress=progress, total=int(max_iter))
    converged = False
    stop_reason = f"max_iter={max_iter} reached"
    sigma = math.sqrt(sigma2)
    it = 0
    J_e = int(estep_landmarks)
    nys_on = estep == "auto" and M * N >= 4 * J_e * (M + N) and J_e < M + N
    rng_e = np.random.default_rng([int(seed), 1])
    probes = (np.sort(rng_e.choice(N, min(64, N), replace=False)), np.sort(rng_e.choice(M, min(64, M), replace=False)))
    n_nystrom = 0
    estep_used = "exact"
    # backend "cuda": the E-step sums (the O(MN) part) run on the GPU; the target points stay there, the deformed
    # source points and weights go up each iteration (O(M)) and the sums come back; the M-step stays on the host.
    x_dev = to_device(x, "cuda") if be == "cuda" else x

    def dev(a):
        if be != "cuda":
            return a
        return x_dev if a is x else to_device(a, "cuda")

    t_loop = time.perf_counter()
    try:
        prog.emit("start", extra=dict(n_source=M, n_target=N, method=params["method"]))
        prog.emit("level_start", level=0)
        for it in range(1, int(max_iter) + 1):
            # E-step (q2)
            c = (2 * math.pi * sigma2) ** (D / 2) * omega / (V * (1 - omega)) if omega > 0 else 0.0
            b = alpha * np.exp(-(D / 2) * s**2 * sig_m2 / sigma2)
            est = None
            if nys_on:
                est, est_err = _estep_nystrom_checked(x, yhat, b, sigma2, c, lx_s, ly_s, U, int(estep_landmarks),
                                                      probes, rng_e, be, dev)
                if est_err > estep_tol:
                    est = None
                    nys_on = False
                    logger.debug("register_points: Nyström E-step error %.3g > %.3g at iteration %d; exact from now",
                                 est_err, estep_tol, it)
            if est is None:
                # blocks of 64 points while the cut-off radius is large (fewer block pairs), 32 when it is small
                # (tighter pruning); measured on fsaverage5 5k: 10-15 % faster than either alone
                blk = 64 if 2.0 * sigma2 * -math.log(max(truncation, 1e-300)) > 0.0625 else 32
                est = kp.estep(dev(x), dev(yhat), dev(b), sigma2, c, lx=lx_s, ly=ly_s, U=U, truncation=truncation,
                               backend=be, block=blk, block_bytes=min(budget, 256 * 2**20), precision=estep_precision)
                est = tuple(to_numpy(a) for a in est)
                estep_used = "exact"
            else:
                estep_used = "nystrom"
                n_nystrom += 1
            nu, nu_x, px = est
            nu = np.maximum(nu, 1e-20)
            n_hat = float(nu.sum())
            xhat = px / nu[:, None]
            # v-update (q1)
            if mode == "nonrigid":
                xt = ((xhat - t) @ R) / s  # s⁻¹ Rᵀ (x̂ - t)
                E = xt - y
                cv = sigma2 / s**2
                for bi, kb in enumerate(kblocks):
                    idx = kb["idx"]
                    vb, sm, W = _v_update(kb, E[idx], nu[idx], cv, posterior_covariance)
                    vhat[idx] = vb
                    sig_m2[idx] = sm
                    W_coef[bi] = W
                uhat = y + vhat
            # α-update
            if math.isfinite(kappa):
                from scipy.special import digamma

                alpha = np.exp(digamma(kappa + nu) - digamma(kappa * M + n_hat))
            # similarity (q3)
            sig_bar2 = float(nu @ sig_m2 / n_hat)
            s, R, t = _similarity(xhat, uhat, nu, n_hat, sig_bar2, D, mode)
            yhat = (s * uhat) @ R.T + t
            # σ²
            old = sigma
            sigma2 = (float(nu_x @ (x**2).sum(1)) - 2.0 * float(np.sum(px * yhat)) + float(nu @ (yhat**2).sum(1))) \
                / (n_hat * D) + s**2 * sig_bar2
            sigma2 = abs(sigma2)  # BCPD issue #16: rounding can make it slightly negative
            sigma2 = max(sigma2, 1e-300)
            sigma = math.sqrt(sigma2)
            diff = abs(sigma - old)
            rec = dict(sigma=sigma * r, sigma_change=diff * r, scale=s, n_hat=n_hat, estep=estep_used,
                       rotation_deg=float(np.degrees(_rotation_angle(R))),
                       mean_displacement=float(np.sqrt((vhat**2).sum(1)).mean() * r),
                       translation=(t * r + c0 - s * R @ c0).tolist())
            prog.emit("iteration", level=0, iteration=it, metric=sigma * r, step=diff * r, extra=rec)
            if it > min_iter and (sigma < tol_n or diff < tol_n):
                converged = True
                stop_reason = (f"converged: sigma {sigma * r:.3g} mm < tol {tol_mm:.3g} mm" if sigma < tol_n else
                               f"converged: |Δσ| = {diff * r:.3g} mm < tol {tol_mm:.3g} mm")
                break
            if not np.isfinite(sigma2) or not np.isfinite(s):
                stop_reason = "diverged (non-finite sigma or scale)"
                break
        prog.emit("level_end", level=0)
    except StopRegistration:
        stop_reason = "stopped by callback"
        converged = False
    t_loop = time.perf_counter() - t_loop

    # ------------------------------------------------------------------ transforms in mm
    t_fin = time.perf_counter()
    anchors, alabels, coefs = [], [], []
    if mode == "nonrigid" and W_coef[0] is not None:
        for kb, W in zip(kblocks, W_coef):
            za, la_, ca = _interp_coef(kb, W, y, ly_s)
            anchors.append(za * r + c0)
            alabels.append(la_)
            coefs.append(ca / r)
    if anchors:
        anchors = np.concatenate(anchors)
        alabels = np.concatenate(alabels)
        coefs = np.concatenate(coefs)
    else:
        anchors, alabels, coefs = np.zeros((0, D)), np.zeros(0, dtype=np.int64), np.zeros((0, D))
    A = s * R
    t_mm = t * r + c0 - A @ c0
    inv_o = np.argsort(oy)
    deformed = (yhat * r + c0)[inv_o]
    fwd = PointDeformation(A, t_mm, anchors, alabels, coefs, kern_mm.amp, kern_mm.den, Y, ly, deformed,
                           label_values=values)
    # GP interpolation residual at the source points (0 up to rounding for full rank / eigsh)
    ev = np.arange(M) if M <= 5000 else np.random.default_rng(seed).choice(M, 5000, replace=False)
    interp = np.sqrt(((fwd.map_points(Y[ev], values[ly[ev]]) - deformed[ev]) ** 2).sum(1))
    inv = PointDeformationInverse(fwd)
    ex = np.arange(N) if N <= 2000 else np.random.default_rng(seed).choice(N, 2000, replace=False)
    inv.map_points(X[ex])
    t_fin = time.perf_counter() - t_fin

    metrics = dict(sigma_mm=sigma * r, scale=s, rotation=R.tolist(), translation_mm=t_mm.tolist(),
                   rotation_deg=float(np.degrees(_rotation_angle(R))), n_hat=float(n_hat) if it else 0.0,
                   iterations=it, nystrom_estep_iterations=n_nystrom,
                   interpolation_error_mm=dict(max=float(interp.max()), mean=float(interp.mean())),
                   inversion_error_mm=inv.last_error,
                   mean_displacement_mm=float(np.sqrt((vhat**2).sum(1)).mean() * r))
    timings = dict(total=time.perf_counter() - t_start, kernel_setup=t_setup, vb_loop=t_loop, finalize=t_fin,
                   per_iteration=t_loop / max(it, 1))
    try:
        prog.emit("done", metric=sigma * r, extra=dict(stop_reason=stop_reason))
    except StopRegistration:
        pass
    prog.close()
    return Result(transform=inv, inverse=fwd, warped=None, history=list(prog.history), converged=converged,
                  stop_reason=stop_reason, params=params, metrics=metrics, timings=timings, reference=reference)


def _rotation_angle(R):
    if R.shape[0] == 2:
        return math.atan2(R[1, 0], R[0, 0])
    return math.acos(max(-1.0, min(1.0, (np.trace(R) - 1) / 2)))


def _lowrank(kern, yb, lb, K, method, nys, rng, budget, pd_guard):
    """Top-K eigenpairs of a kernel block: ``G ≈ Q diag(lam) Qᵀ``, Q orthonormal (M×K)."""
    mb = len(yb)
    jit = 0.0
    if method == "eigsh":
        from scipy.sparse.linalg import LinearOperator, eigsh

        v0 = rng.standard_normal(mb)
        if 8.0 * mb * mb <= budget:
            G = kern.matrix(yb, lb)
            op = G
        else:
            def mv(v):
                v = np.asarray(v).reshape(mb, -1)
                return kp.kernel_apply(yb, lb, yb, lb, v, kern.amp, kern.den)
            op = LinearOperator((mb, mb), matvec=mv, dtype=np.float64)
        if isinstance(op, np.ndarray) and 10 * K >= mb:
            # many eigenpairs of a dense block: a full symmetric eigendecomposition is ~10× faster than Lanczos
            # (2000 points, K = 400: 1.3 s vs 14 s)
            lam, Q = np.linalg.eigh(G)
            lam, Q = lam[-K:], Q[:, -K:]
        else:
            lam, Q = eigsh(op, k=K, which="LA", v0=v0)
        order = np.argsort(lam)[::-1]
        lam, Q = lam[order], Q[:, order]
        if lam[-1] < 0:
            if pd_guard == "raise":
                raise ValueError("the kernel has negative eigenvalues among its top K; use coherence='organ' or "
                                 "equal bandwidths, or pd_guard='jitter'")
            keep = lam > 0
            lam, Q = lam[keep], Q[:, keep]
        lam = lam + 1e-9 * lam[0]
        Q = np.ascontiguousarray(Q)
        return dict(kind="eigsh", Q=Q, Q32=Q.astype(np.float32), lam=lam, K=len(lam)), jit
    # Nyström
    J = min(mb, max(300, 3 * K) if nys is None else int(nys))
    sel = np.sort(rng.choice(mb, J, replace=False))
    C = kern.matrix(yb, lb, yb[sel], lb[sel])  # M × J
    Wj = C[sel]
    ew, Uw = np.linalg.eigh(Wj)
    if ew[0] < -1e-10 * ew[-1]:
        if pd_guard == "raise":
            raise ValueError(f"the multi-organ kernel is not positive semi-definite (min eigenvalue {ew[0]:.3g}); "
                             "use coherence='organ' or equal bandwidths, or pd_guard='jitter'")
        jit = -ew[0] * 1.01
    order = np.argsort(ew)[::-1][:K]
    ew, Uw = ew[order], Uw[:, order]
    keep = ew > 1e-10 * ew[0]
    ew, Uw = ew[keep], Uw[:, keep]
    F = C @ (Uw / np.sqrt(ew))  # G ≈ F Fᵀ
    # eigenpairs of F Fᵀ from the K'×K' matrix Fᵀ F = V S Vᵀ: Q = F V S^-1/2, Λ = S (two GEMMs instead of a QR)
    S, V = np.linalg.eigh(F.T @ F)
    order = np.argsort(S)[::-1]
    S, V = S[order], V[:, order]
    keep = S > 1e-12 * S[0]
    S, V = S[keep], V[:, keep]
    Q = np.ascontiguousarray(F @ (V / np.sqrt(S)))
    lam = S + 1e-9 * S[0]
    # interpolation through the Nyström kernel k(q, Z) Wj⁺ k(Z, ·); F = Q S^1/2 Vᵀ (see _interp_coef)
    return dict(kind="nystrom", Q=Q, Q32=Q.astype(np.float32), lam=lam, K=len(lam), sel=sel, Uw=Uw, ew=ew,
                FtQ=V * np.sqrt(S)), jit


def _estep_nystrom_checked(x, yhat, b, sigma2, c, lx, ly, U, J, probes, rng, be, dev=lambda a: a):
    """Nyström E-step (fresh random landmarks from X ∪ Ŷ) and its error on the probe points: the largest of the
    relative errors of the denominators Σ_m φ_mn (probe targets) and of ν_m (probe sources, given the Nyström
    q_n), and of the x̂_m error in units of σ. Returns ((nu, nu_x, px), error)."""
    N, M = len(x), len(yhat)
    L = U.shape[0]
    sel = rng.choice(M + N, J, replace=False)
    Z = np.concatenate([x[sel[sel < N]], yhat[sel[sel >= N] - N]])
    est = kp.estep_nystrom(dev(x), dev(yhat), dev(b), sigma2, c, dev(Z), lx=lx, ly=ly, U=U, backend=be,
                           return_denominator=True)
    nu, nu_x, px, den_raw = (to_numpy(a) for a in est)
    pt, ps = probes
    # exact denominators at the probe targets: Σ_l U[lx_n, l] Σ_{m: ly_m = l} b_m K(x_n, y_m)
    by = np.zeros((M, L))
    by[np.arange(M), ly] = b
    per_label = kp.gauss_matrix(x[pt], yhat, sigma2, backend=be) @ by
    den_ex = (per_label * U[lx[pt]]).sum(1)
    err_den = float(np.max(np.abs(den_raw[pt] - den_ex) / (den_ex + c + 1e-300)))
    # exact ν and x̂ at the probe sources given the Nyström q: Σ_l' U[l', ly_m] Σ_{lx_n = l'} K(y_m, x_n) q_n [1, x_n]
    den = den_raw + c
    q = np.where(den > kp.DEN_FLOOR, 1.0 / np.maximum(den, kp.DEN_FLOOR), 0.0)
    D = x.shape[1]
    fx = np.zeros((N, L, D + 1))
    fx[np.arange(N), lx, 0] = q
    fx[np.arange(N), lx, 1:] = q[:, None] * x
    r = (kp.gauss_matrix(yhat[ps], x, sigma2, backend=be) @ fx.reshape(N, L * (D + 1))).reshape(len(ps), L, D + 1)
    s = (r * U[:, ly[ps]].T[:, :, None]).sum(1) * b[ps][:, None]
    nu_ex, px_ex = s[:, 0], s[:, 1:]
    ok = nu_ex > 0.1 * max(float(np.median(nu_ex)), 1e-300)
    if not np.any(ok):
        return (nu, nu_x, px), math.inf
    err_nu = float(np.max(np.abs(nu[ps][ok] - nu_ex[ok]) / nu_ex[ok]))
    xh = px[ps][ok] / np.where(nu[ps][ok] > 0, nu[ps][ok], 1e-300)[:, None]
    err_x = float(np.max(np.sqrt(((xh - px_ex[ok] / nu_ex[ok][:, None]) ** 2).sum(1)))) / math.sqrt(sigma2)
    return (nu, nu_x, px), max(err_den, err_nu, err_x)


def _v_update(kb, E, nu, cv, postcov):
    """Posterior mean v̂ (M_b×D), variances σ_m² and the GP coefficients of one kernel block: W = (G + c_v
    diag(ν)⁻¹)⁻¹ E for a full-rank block, Qᵀ W (K×D) for a low-rank one (all the interpolation needs)."""
    from scipy.linalg import cho_factor, cho_solve, solve_triangular

    if kb["kind"] == "full":
        G = kb["G"]
        A = G + np.diag(cv / nu)
        cf = cho_factor(A, lower=True, check_finite=False)
        W = cho_solve(cf, E, check_finite=False)
        v = G @ W
        if postcov:
            sm = cv * np.diag(cho_solve(cf, G, check_finite=False)) / nu
            sm = np.maximum(sm, 0.0)
        else:
            sm = np.zeros(len(nu))
        return v, sm, W
    # Woodbury (METHODS §4.2 step 3c): B = c_v Λ⁻¹ + Qᵀ N Q (N = diag ν), v̂ = Q B⁻¹ Qᵀ N E, σ_m² = c_v |L⁻¹ q_m|²
    # (B = L Lᵀ), and Qᵀ W = Λ⁻¹ B⁻¹ Qᵀ N E (from Qᵀ(G + c_v N⁻¹)⁻¹ = Λ⁻¹ B⁻¹ Qᵀ N; no cancellation, unlike
    # W = N (E - v̂) / c_v, and v̂ and Qᵀ W come from the same solve, so the GP interpolation reproduces v̂ at the
    # source points). B and v̂ stay float64 (B can be ill-conditioned where ν is floored); the posterior variances
    # only weight the E-step and σ̄², so their M×K×K product runs in float32 (relative error ~1e-6).
    Q, lam = kb["Q"], kb["lam"]
    K = len(lam)
    NQ = Q * nu[:, None]
    B = NQ.T @ Q
    B[np.diag_indices_from(B)] += cv / lam
    cf = cho_factor(B, lower=True, check_finite=False)
    BiQtNE = cho_solve(cf, Q.T @ (E * nu[:, None]), check_finite=False)
    v = Q @ BiQtNE
    if postcov:
        Q32 = kb["Q32"] if "Q32" in kb else Q.astype(np.float32)
        Linv = solve_triangular(cf[0], np.eye(K), lower=True, check_finite=False)
        Z = Q32 @ Linv.T.astype(np.float32)
        sm = cv * np.einsum("ij,ij->i", Z, Z).astype(np.float64)
        np.maximum(sm, 0.0, out=sm)
    else:
        sm = np.zeros(len(nu))
    return v, sm, BiQtNE / lam[:, None]


def _interp_coef(kb, coef, y, ly_s):
    """Anchors, anchor labels and coefficients of the GP interpolation ``v(q) = Σ_j k(q, z_j) a_j``.

    ``coef`` is W (full rank) or Qᵀ W (low rank, from :func:`_v_update`)."""
    idx = kb["idx"]
    if kb["kind"] == "full":
        return y[idx], ly_s[idx], coef
    if kb["kind"] == "eigsh":
        # a = Q Qᵀ W: with exact eigenvectors G Q Qᵀ W = Q Λ Qᵀ W = v̂ at the source points
        return y[idx], ly_s[idx], kb["Q"] @ coef
    # Nyström G ≈ F Fᵀ, F = C Uw diag(ew)^-1/2 = Q S^1/2 Vᵀ: a = Wj⁺ Cᵀ W = Uw diag(ew)^-1/2 Fᵀ W with
    # Fᵀ W = V S^1/2 Qᵀ W (the part of Cᵀ W outside the kept eigenvectors of Wj is projected out by Wj⁺)
    sel = kb["sel"]
    a = (kb["Uw"] / np.sqrt(kb["ew"])) @ (kb["FtQ"] @ coef)
    return y[idx][sel], ly_s[idx][sel], a


# ==================================================================================================== I/O
def read_points(path):
    """Read points (and optional labels) from .npy, .npz, .csv or .txt (BCPD's tab/comma/space-separated N×D).

    A .csv/.txt file with D+1 columns holds the label in its last column; a header line is skipped. A .npz may
    hold ``points`` and ``labels``. Returns ``(points, labels or None)``.
    """
    p = Path(os.fspath(path))
    if not p.is_file():
        raise FileNotFoundError(f"point file {str(p)!r} does not exist")
    name = p.name.lower()
    labels = None
    if name.endswith(".npy"):
        a = np.load(p, allow_pickle=False)
    elif name.endswith(".npz"):
        with np.load(p, allow_pickle=False) as z:
            a = z["points"]
            labels = z["labels"] if "labels" in z.files else None
        return a, labels
    elif name.endswith((".txt", ".csv", ".xyz", ".tsv")):
        text = p.read_text().replace(",", " ").replace("\t", " ").splitlines()
        rows = []
        for line in text:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                rows.append([float(v) for v in line.split()])
            except ValueError:
                if rows:
                    raise ValueError(f"{str(p)!r}: non-numeric line {line!r}") from None
                continue  # header
        if not rows:
            raise ValueError(f"{str(p)!r} holds no points")
        if len({len(r_) for r_ in rows}) != 1:
            raise ValueError(f"{str(p)!r}: rows have different numbers of columns")
        a = np.array(rows)
    else:
        raise ValueError(f"{str(p)!r}: unknown point-file extension; use .txt, .csv, .npy or .npz")
    a = np.asarray(a, dtype=float)
    if a.ndim == 2 and a.shape[1] == 4:
        labels = a[:, 3].astype(np.int64)
        a = a[:, :3]
    return a, labels


def _write_points(path, pts):
    from ..io import atomic_output

    p = Path(os.fspath(path))
    with atomic_output(p) as tmp:
        if p.name.lower().endswith(".npy"):
            with open(tmp, "wb") as fh:
                np.save(fh, pts)
        else:
            sep = "," if p.name.lower().endswith(".csv") else "\t"
            np.savetxt(tmp, pts, delimiter=sep, fmt="%.9g")
    return p


def _cmd_points(args) -> int:
    import json

    src, sl = read_points(args.source)
    tgt, tl = read_points(args.target)
    if args.source_labels:
        sl = read_points(args.source_labels)[0].ravel().astype(np.int64)
    if args.target_labels:
        tl = read_points(args.target_labels)[0].ravel().astype(np.int64)
    if args.no_labels or sl is None or tl is None:
        sl = tl = None
    kw = dict(mode=args.mode, deformation=args.deformation, bandwidth=args.bandwidth, coherence=args.coherence,
              omega=args.omega, gamma=args.gamma, tol=args.tol, max_iter=args.max_iter, min_iter=args.min_iter,
              seed=args.seed, progress=not args.quiet)
    if args.rank is not None:
        kw["rank"] = args.rank if args.rank == "full" else int(args.rank)
    if args.label_error is not None:
        kw["label_transition"] = args.label_error
    res = register_points(src, tgt, source_labels=sl, target_labels=tl, **kw)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    moved = res.apply_points(src)
    ext = Path(args.source).suffix.lower()
    ext = ext if ext in (".txt", ".csv", ".npy") else ".txt"
    _write_points(out / f"moved_source{ext}", moved)
    res.inverse.save(out / "transform.npz")
    from ..result import _jsonable, _write_history, _write_text

    _write_text(out / "params.json", json.dumps(_jsonable(res.params), indent=2, sort_keys=True))
    _write_history(out / "history.csv", res.history)
    _write_text(out / "result.json", json.dumps(_jsonable(dict(converged=res.converged, stop_reason=res.stop_reason,
                                                                metrics=res.metrics, timings=res.timings)),
                                                 indent=2, sort_keys=True))
    print(f"{res.stop_reason}; sigma {res.metrics['sigma_mm']:.4g} mm after {res.metrics['iterations']} iterations; "
          f"wrote {out}")
    return 0


def add_cli(subparsers):
    """``classreg register points SOURCE TARGET -o OUT``."""
    p = subparsers.add_parser(
        "points", help="BCPD / multi-organ BCPD point-set registration (source = moving, target = fixed)",
        description="Register SOURCE points onto TARGET points (.txt/.csv as in BCPD: N rows of D tab/comma "
                    "separated mm coordinates, an optional last label column when D=3; or .npy/.npz). Writes "
                    "moved_source.<ext> (source mapped into target space), transform.npz, params.json, "
                    "history.csv and result.json into OUT.")
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--source-labels", help="file with one organ label per source point")
    p.add_argument("--target-labels", help="file with one organ label per target point")
    p.add_argument("--no-labels", action="store_true", help="ignore label columns (plain BCPD)")
    p.add_argument("--mode", default="nonrigid", choices=_MODES)
    p.add_argument("--deformation", type=float, default=10.0, help="Λ, prior displacement variance (mm², default 10)")
    p.add_argument("--bandwidth", type=float, default=30.0, help="B (β), kernel bandwidth in mm (default 30)")
    p.add_argument("--coherence", default="organ", choices=("organ", "global"), help="OMC (organ) or GMC (global)")
    p.add_argument("--label-error", type=float, help="uniform label-noise rate for the transition matrix U")
    p.add_argument("--omega", type=float, default=0.0)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--tol", type=float, help="convergence tolerance in mm")
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--min-iter", type=int, default=30)
    p.add_argument("--rank", help="'full' or K for the low-rank kernel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_points)
    return p
