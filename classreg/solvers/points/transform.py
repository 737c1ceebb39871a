"""The BCPD transforms: the source → target map ``T(y) = sR (y + v(y)) + t`` and its inverse, their ``.npz`` file
format and their sampling on an image grid.

Direction convention (docs/solvers/points.md): the **source** point set is the *moving* side and the **target** the
*fixed* side. ``Result.apply_points(source_points)`` evaluates ``T`` exactly (:class:`PointDeformation`,
``Result.inverse``); ``Result.transform`` is the fixed → moving pull-back ``T⁻¹`` (:class:`PointDeformationInverse`,
a fixed-point inversion whose error is reported), so ``Result.apply(source_space_image)`` resamples a source-space
image onto a target-space grid.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...image import Image
from ...kernels import points as kp
from ...transforms import DisplacementField, Transform, register_transform_format

__all__ = ["PointDeformation", "PointDeformationInverse", "load_point_deformation", "points_displacement_field"]


class PointDeformation(Transform):
    """The BCPD map from **source** (moving) space to **target** (fixed) space: ``T(y) = A (y + v(y)) + t``.

    ``A = sR`` is the similarity part and ``v`` the Gaussian-process posterior mean of the non-rigid displacement,
    interpolated to any point by the multi-organ kernel (MO-BCPD, WBIR 2022, eqs. 5-6):
    ``v(ỹ) = Σ_j G((ỹ, l), (z_j, l_j)) a_j`` over anchor points ``z_j`` (the source points, or the Nyström landmarks).
    A query point needs an organ label: pass ``labels=`` to :meth:`map_points`, otherwise the label of its nearest
    source point is used. Everything is in mm.

    In classreg's fixed→moving convention this is the *inverse* registration transform (``Result.inverse``);
    ``Result.apply_points`` uses it.
    """

    def __init__(self, matrix, translation, anchors, anchor_labels, coef, amp, den, source_points, source_labels,
                 deformed_source=None, label_values=None, fine_anchors=None, fine_anchor_labels=None, fine_coef=None,
                 fine_amp=None, fine_den=None, fine_taper=0.0):
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
        # the fine scale of the two-scale prior (classreg.solvers.points.sparse): tapered Gaussian, taper radius
        # fine_taper mm (0: none)
        self.fine_taper = float(fine_taper)
        D = self.matrix.shape[0]
        self.fine_anchors = np.zeros((0, D)) if fine_anchors is None else np.asarray(fine_anchors, dtype=float)
        self.fine_anchor_labels = (np.zeros(0, dtype=np.int64) if fine_anchor_labels is None
                                   else np.asarray(fine_anchor_labels, dtype=np.int64))
        self.fine_coef = np.zeros((0, D)) if fine_coef is None else np.asarray(fine_coef, dtype=float)
        self.fine_amp = self.amp * 0 if fine_amp is None else np.asarray(fine_amp, dtype=float)
        self.fine_den = np.ones_like(self.den) if fine_den is None else np.asarray(fine_den, dtype=float)
        self._tree = None
        self._tree_def = None
        self._fine_index = None

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
        out = np.zeros_like(p)
        if self.coef.size and np.any(self.coef):
            out = kp.kernel_apply(p, li, self.anchors, self.anchor_labels, self.coef, self.amp, self.den)
        if self.fine_taper > 0 and self.fine_coef.size and np.any(self.fine_coef):
            from .sparse import fine_apply, fine_index

            if self._fine_index is None:  # built once: the inverse evaluates the map up to 50 times per call
                self._fine_index = fine_index(self.fine_anchors, self.fine_anchor_labels, self.fine_coef,
                                              self.fine_taper)
            out += fine_apply(p, li, self.fine_anchors, self.fine_anchor_labels, self.fine_coef, self.fine_amp,
                              self.fine_den, self.fine_taper, index=self._fine_index)
        return out

    def map_points(self, points, labels=None) -> np.ndarray:
        """Map **source-space** points (N, ndim) mm into target space: ``sR (y + v(y)) + t``.

        ``labels`` (organ label values, one per point) select the organ kernel; default: nearest source point.
        """
        p = self._check_points(points)
        return (p + self.displacement(p, labels)) @ self.matrix.T + self.translation

    def inverse(self) -> PointDeformationInverse:
        return PointDeformationInverse(self)

    def to_sitk(self):
        raise NotImplementedError("a BCPD point deformation has no ITK equivalent; sample it on a grid with "
                                  "classreg.solvers.points.points_displacement_field(...) and save that field")

    file_suffix = ".npz"

    def save(self, path, *, kind: str = "PointDeformation") -> Path:
        """Write the parameters to a ``.npz`` file (read back by :func:`load_point_deformation`)."""
        from ...io import atomic_output

        p = Path(os.fspath(path))
        if not p.name.endswith(".npz"):
            raise ValueError(f"path {str(path)!r}: a PointDeformation is saved as .npz")
        with atomic_output(p) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, kind=kind, **self._state())
        return p

    def _state(self):
        deformed = self.deformed_source if self.deformed_source is not None else np.zeros((0, 0))
        return {"matrix": self.matrix, "translation": self.translation, "anchors": self.anchors,
                "anchor_labels": self.anchor_labels, "coef": self.coef, "amp": self.amp, "den": self.den,
                "source_points": self.source_points, "source_labels": self.source_labels,
                "deformed_source": deformed, "label_values": self.label_values, "fine_anchors": self.fine_anchors,
                "fine_anchor_labels": self.fine_anchor_labels, "fine_coef": self.fine_coef, "fine_amp": self.fine_amp,
                "fine_den": self.fine_den, "fine_taper": np.float64(self.fine_taper)}

    def __repr__(self):
        det = abs(np.linalg.det(self.matrix))
        scale = np.cbrt(det) if self.ndim == 3 else np.sqrt(det)
        return (f"PointDeformation(ndim={self.ndim}, anchors={len(self.anchors)}, organs={self.amp.shape[0]}, "
                f"scale={scale:.6g})")


class PointDeformationInverse(Transform):
    """``T⁻¹``: **target** (fixed) space → **source** (moving) space, the pull-back used by ``Result.apply``.

    Solved per point by the fixed-point iteration ``y ← A⁻¹(x - t) - v(y)`` (converges where ``|∇v| < 1``; a point
    stops once its own step is at most ``tol`` mm, the others go on up to ``max_iter`` steps), with the organ label
    of the nearest deformed source point unless ``labels`` are given. After each call, ``last_error`` holds
    ``{"max_error", "mean_error"}`` = residual ``|T(y) - x|`` in mm and the iteration count.
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
        live = np.arange(len(x))  # points whose last step exceeded tol: only these are iterated further
        for it in range(1, self.max_iter + 1):
            y_new = base[live] - f.displacement(y[live], _index=li[live])
            step = np.sqrt(((y_new - y[live]) ** 2).sum(1))
            y[live] = y_new
            live = live[step > self.tol]
            if live.size == 0:
                break
        if len(x):
            res = (y + f.displacement(y, _index=li)) @ f.matrix.T + f.translation - x
            err = np.sqrt((res**2).sum(1))
        self.last_error = {"max_error": float(err.max(initial=0.0)),
                           "mean_error": float(err.mean()) if len(err) else 0.0, "iterations": it}
        return y

    def inverse(self) -> PointDeformation:
        return self.forward

    def to_sitk(self):
        raise NotImplementedError("sample the inverse on a grid with "
                                  "classreg.solvers.points.points_displacement_field(...)")

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
    if "fine_taper" in st:
        st["fine_taper"] = float(st["fine_taper"])
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
