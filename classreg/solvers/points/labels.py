"""Organ labels of multi-organ BCPD: the labels of the two point sets as organ indices, the per-organ parameters
(Λ, B), the inter-organ coherence S and the label-transition matrix U, and surface points from a label map.

Reference: "Multi-organ Bayesian coherent point drift" (MO-BCPD), WBIR 2022: eq. 3 (the label-aware likelihood
with ``U``), eq. 4 (the kernel with ``Λ``, ``B`` and ``S``).
"""
from __future__ import annotations

import logging

import numpy as np

from ...image import Image

__all__ = ["coherence_matrix", "label_surface_points", "label_transition_matrix", "organ_indices", "per_label",
           "transition_matrix"]

logger = logging.getLogger("classreg")


def label_transition_matrix(labels, error_rate: float):
    """Label-transition matrix U for a segmentation that mislabels a fraction ``error_rate`` of points uniformly.

    ``U[l, l'] = P(target label l | source organ l')`` = ``1 - error_rate`` on the diagonal and
    ``error_rate / (L - 1)`` elsewhere (MO-BCPD: ``u_{l,l'} = Σ_k P(g=k | l') P(l | g=k)``).

    Parameters
    ----------
    labels : int or sequence
        The number of organs L, or the organ labels (their count is used).
    error_rate : float in [0, 1)
        Fraction of points whose label is replaced by one of the other L - 1 labels, uniformly.
    """
    n = len(labels) if not np.isscalar(labels) else int(labels)
    e = float(error_rate)
    if not 0 <= e < 1:
        raise ValueError(f"error_rate must be in [0, 1), got {error_rate!r}")
    if n == 1:
        return np.ones((1, 1))
    return np.full((n, n), e / (n - 1)) + (1 - e - e / (n - 1)) * np.eye(n)


def label_surface_points(label_image: Image, labels=None, *, n_points=None, seed=0, step_size=1):
    """Organ surface points from a label map (marching cubes in 3-D, contour tracing in 2-D; scikit-image), in mm.

    Parameters
    ----------
    label_image : Image
        Integer label map (2-D or 3-D).
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
    points : ndarray (P, ndim)
        Physical (x, y[, z]) mm, on the boundary of the label's region (the 0.5 level of its indicator).
    point_labels : ndarray (P,)
        The label value of each point.
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


def organ_indices(source_labels, target_labels, m: int, n: int):
    """``(values, ly, lx)``: the sorted organ label values and each source/target point's index into them.

    Without labels (both None) every point belongs to one organ (plain BCPD). Every target label must be one of the
    source labels; float labels with integer values are accepted. A source organ without target points is kept
    (MO-BCPD's likelihood: with U = identity no target point can come from it, so its points have no data term and
    follow the similarity and the other organs' coherence); a warning says so.
    """
    if (source_labels is None) != (target_labels is None):
        raise ValueError("give both source_labels and target_labels, or neither")
    if source_labels is None:
        return np.array([0]), np.zeros(m, dtype=np.int64), np.zeros(n, dtype=np.int64)
    sl = _check_labels(source_labels, m, "source_labels", "source")
    tl = _check_labels(target_labels, n, "target_labels", "target")
    values = np.unique(sl)
    extra = np.setdiff1d(np.unique(tl), values)
    if extra.size:
        raise ValueError(f"target_labels contain {extra.tolist()}, which no source point has; every target "
                         "label must be one of the source labels")
    missing = np.setdiff1d(values, tl)
    if missing.size:
        logger.warning("register_points: source organ(s) %s have no target points; they follow the similarity "
                       "(and, with a coherence S, the other organs) without a data term", missing.tolist())
    return values, np.searchsorted(values, sl), np.searchsorted(values, tl)


def _check_labels(labels, count: int, name: str, points: str):
    """One label per point as an integer array (int, bool, or float with integer values)."""
    try:
        raw = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be one integer label per {points} point; it cannot be read as an array: "
                         f"{exc}") from None
    lab = raw.ravel()
    if lab.shape != (count,) or raw.ndim > 2 or (raw.ndim == 2 and raw.shape[1] != 1):
        raise ValueError(f"{name} must have one label per {points} point ({count}), got {np.shape(labels)}")
    if lab.dtype.kind == "O":
        try:
            lab = lab.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be integer organ labels, got non-numeric entries") from None
    if lab.dtype.kind in "biu":
        return lab
    if lab.dtype.kind != "f":
        raise TypeError(f"{name} must be integer organ labels, got dtype {lab.dtype}")
    bad = ~np.isfinite(lab) | (lab != np.round(lab))
    if np.any(bad):
        raise TypeError(f"{name} must be integer organ labels, got {int(bad.sum())} non-integer value(s) such as "
                        f"{lab[bad][0]!r}")
    return lab.astype(np.int64)


def per_label(value, values, name, positive=True):
    """Scalar, sequence (one per label in sorted order) or dict {label: value} → array over labels."""
    n = len(values)
    what = f"{name} must be a positive number, a sequence with one per organ label or a dict {{label: value}}"
    try:
        if isinstance(value, dict):
            missing = [v for v in values if v not in value]
            if missing:
                raise ValueError(f"{name} has no entry for label(s) {missing}")
            out = np.array([float(value[v]) for v in values])
        elif isinstance(value, (str, bytes)) or value is None:
            raise TypeError(f"{what}, got {value!r}")
        elif np.ndim(value) == 0:
            out = np.full(n, float(value))
        else:
            out = np.asarray(value, dtype=float).ravel()
            if out.shape != (n,):
                raise ValueError(f"{name} must be a scalar, a dict or have one entry per label ({n}), got "
                                 f"{out.shape}")
    except (TypeError, ValueError) as exc:
        if str(exc).startswith(name):
            raise
        raise TypeError(f"{what}, got {value!r}") from None
    if not np.all(np.isfinite(out)) or (positive and np.any(out <= 0)):
        raise ValueError(f"{name} must be finite and positive, got {out.tolist()}")
    return out


def coherence_matrix(coherence, n: int) -> np.ndarray:
    """The inter-organ coherence S (n × n): "organ" → identity, "global" → ones, or a checked matrix."""
    if isinstance(coherence, str):
        if coherence not in ("organ", "global"):
            raise ValueError(f"coherence must be 'organ', 'global' or an (L, L) matrix, got {coherence!r}")
        return np.eye(n) if coherence == "organ" else np.ones((n, n))
    try:
        S = np.asarray(coherence, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"coherence must be 'organ', 'global' or a symmetric ({n}, {n}) matrix in [0, 1], got "
                         f"{coherence!r}") from None
    if S.shape != (n, n) or not np.allclose(S, S.T) or np.any(S < 0) or np.any(S > 1) or \
            not np.allclose(np.diag(S), 1):
        raise ValueError(f"coherence must be 'organ', 'global' or a symmetric ({n}, {n}) matrix in [0, 1] with unit "
                         f"diagonal, got {_short(coherence)}")
    return S


def transition_matrix(label_transition, n: int) -> np.ndarray:
    """The label-transition matrix U (n × n): identity for None, :func:`label_transition_matrix` for a rate, or a
    checked non-negative matrix."""
    if label_transition is None:
        return np.eye(n)
    what = f"label_transition must be a label-noise rate in [0, 1) or a non-negative ({n}, {n}) matrix"
    if isinstance(label_transition, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{what}, got {label_transition!r}")
    try:
        U = np.asarray(label_transition, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"{what}, got {_short(label_transition)}") from None
    if U.ndim == 0:
        if not 0 <= float(U) < 1:
            raise ValueError(f"{what}, got {label_transition!r}")
        return label_transition_matrix(n, float(label_transition))
    if U.shape != (n, n) or np.any(U < 0) or not np.all(np.isfinite(U)):
        raise ValueError(f"label_transition must be a non-negative ({n}, {n}) matrix, got {_short(label_transition)}")
    return U


def _short(value) -> str:
    """``value`` for an error message: its repr, or its shape for an array."""
    try:
        shape = np.shape(value) if not isinstance(value, (str, bytes)) else ()
    except (TypeError, ValueError):
        shape = ()
    return f"an array of shape {shape}" if len(shape) else repr(value)
