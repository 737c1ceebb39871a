"""Evaluation of registrations: overlap (Dice), surface distance (HD95), landmark error (TRE), Jacobian and folding
statistics (incl. the non-diffeomorphic volume of Liu et al. 2024), and inverse consistency.

All functions take classreg objects (``Image``, ``Transform``) or plain arrays and report in physical units (mm)
where a length is involved. Each function states its definition; where noted they follow the evaluation code of the
Learn2Reg challenge (Hering et al., IEEE TMI 2023).
"""
from __future__ import annotations

import itertools

import numpy as np

from .image import Image, as_mask
from .transforms import DisplacementField, Transform, world_to_array_vectors

__all__ = ["dice", "hd95", "tre", "jacobian_stats", "inverse_consistency", "dense_displacement"]


def _labels_pair(a, b):
    da = a.numpy() if isinstance(a, Image) else np.asarray(a)
    db = b.numpy() if isinstance(b, Image) else np.asarray(b)
    if da.shape != db.shape:
        raise ValueError(f"label maps must have the same shape, got a: {da.shape} and b: {db.shape}")
    if isinstance(a, Image) and isinstance(b, Image) and not a.same_grid(b, atol=1e-4):
        raise ValueError("label maps a and b are not on the same grid; resample one onto the other first")
    return da, db


def _label_list(da, db, labels, background):
    if labels is None:
        labels = np.union1d(np.unique(da), np.unique(db))
        labels = [lab for lab in labels.tolist() if lab != background]
    return list(labels)


def dice(a, b, *, labels=None, background=0) -> dict:
    """Dice overlap per label, ``2|A∩B| / (|A|+|B|)``.

    Parameters
    ----------
    a, b : Image or array
        Label maps on the same grid.
    labels : sequence, optional
        Labels to score (default: every label in either map except ``background``).
    background : int
        Label excluded by default.

    Returns
    -------
    dict
        label → Dice. A label absent from either map gets NaN (the Learn2Reg convention: excluded from means, use
        ``numpy.nanmean``).
    """
    da, db = _labels_pair(a, b)
    out = {}
    for lab in _label_list(da, db, labels, background):
        ma, mb = da == lab, db == lab
        na, nb = int(ma.sum()), int(mb.sum())
        out[lab] = float("nan") if na == 0 or nb == 0 else 2.0 * int((ma & mb).sum()) / (na + nb)
    return out


def _surface(mask):
    from scipy import ndimage  # imported on use: most classreg processes never need it (~0.2 s)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(a, b, *, spacing=None, labels=None, background=0, percentile=95.0) -> dict:
    """Robust Hausdorff distance per label in mm: the larger of the two directed ``percentile``-th percentiles of
    surface-to-surface distances (as DeepMind's ``compute_robust_hausdorff``, used by Learn2Reg).

    ``spacing`` (array-axis order, mm) is taken from ``a`` if it is an ``Image``; for arrays it defaults to 1.
    A label absent from either map gets NaN.
    """
    from scipy import ndimage  # imported on use: most classreg processes never need it (~0.2 s)
    da, db = _labels_pair(a, b)
    if spacing is None:
        spacing = a.spacing_array_order if isinstance(a, Image) else (1.0,) * da.ndim
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (da.ndim,))
    if np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    out = {}
    for lab in _label_list(da, db, labels, background):
        sa, sb = _surface(da == lab), _surface(db == lab)
        if not sa.any() or not sb.any():
            out[lab] = float("nan")
            continue
        dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
        dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
        out[lab] = float(max(np.percentile(dist_to_b[sa], percentile), np.percentile(dist_to_a[sb], percentile)))
    return out


def tre(transform: Transform, fixed_points, moving_points) -> np.ndarray:
    """Target registration error per landmark, ``|T(x_F) − x_M|`` in mm.

    ``transform`` maps fixed physical points to moving physical points (the registration transform), so the
    fixed landmarks are mapped and compared with their moving counterparts. Returns an array (N,).
    """
    xf = np.asarray(fixed_points, dtype=float)
    xm = np.asarray(moving_points, dtype=float)
    if xf.shape != xm.shape:
        raise ValueError(f"fixed_points {xf.shape} and moving_points {xm.shape} must have the same shape (N, ndim)")
    return np.linalg.norm(transform.map_points(xf) - xm, axis=1)


def dense_displacement(transform: Transform, reference: Image | None = None) -> tuple[np.ndarray, Image]:
    """Displacement ``T(x) − x`` at every voxel of ``reference``, in the array frame (components along the array
    axes, mm). A :class:`DisplacementField` on its own grid needs no reference."""
    if reference is None:
        if not isinstance(transform, DisplacementField):
            raise ValueError("reference (the grid to evaluate on) is required unless transform is a DisplacementField")
        reference = transform.image
    if isinstance(transform, DisplacementField) and transform.image.same_grid(reference):
        return np.asarray(transform.displacement_array_frame(), dtype=np.float64), reference
    pts = reference.grid_points().reshape(-1, reference.ndim)
    u = (transform.map_points(pts) - pts).reshape(*reference.shape, reference.ndim)
    return world_to_array_vectors(u, reference), reference


def _det_columns(cols) -> np.ndarray:
    """Determinant of the 2 × 2 or 3 × 3 matrices whose columns are ``cols`` (arrays of shape ``(..., n)``, the
    rows on the last axis), by the cofactor expansion, element-wise: no stacked matrix array and no batched LU
    (``numpy.linalg.det``), which at 1 mm whole-brain size took most of an evaluation's time."""
    if len(cols) == 2:
        (a, c), (b, d) = (np.moveaxis(col, -1, 0) for col in cols)
        return a * d - b * c
    # the columns (a, d, g), (b, e, h), (c, f, i) of [[a, b, c], [d, e, f], [g, h, i]]
    (a, d, g), (b, e, h), (c, f, i) = (np.moveaxis(col, -1, 0) for col in cols)
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def _central_det_l2r(u_vox):
    """Learn2Reg's Jacobian determinant: central differences with zero padding, cropped by 2 voxels."""
    from scipy import ndimage  # imported on use: most classreg processes never need it (~0.2 s)
    n = u_vox.shape[-1]
    k = np.array([-0.5, 0.0, 0.5])
    jac = np.empty(u_vox.shape[:-1] + (n, n))
    for i in range(n):
        for j in range(n):
            shape = [1] * n
            shape[j] = 3
            jac[..., i, j] = ndimage.correlate(u_vox[..., i], k.reshape(shape), mode="constant", cval=0.0)
    jac += np.eye(n)
    crop = (slice(2, -2),) * n
    jac = jac[crop]
    return _det_columns([jac[..., :, j] for j in range(n)]), crop


def digital_jacobians(u_vox) -> list:
    """The finite-difference Jacobian determinants that decide digital diffeomorphism (Liu et al., IJCV 2024).

    3-D: the 8 one-sided combinations (forward/backward per axis) and the 2 central-tetrahedron determinants of the
    two 5-tetrahedra splittings of the voxel cube; 2-D: the 4 one-sided combinations. Computed on the map
    ``index + u_vox`` with edge-replicated padding. Returns a list of arrays with the spatial shape.
    """
    n = u_vox.shape[-1]
    # edge-replicate the displacement (not the map), then add the identity of the padded grid
    padded = np.pad(u_vox, [(1, 1)] * n + [(0, 0)], mode="edge")
    grid = np.stack(np.meshgrid(*[np.arange(-1.0, s + 1.0) for s in u_vox.shape[:-1]], indexing="ij"), axis=-1)
    phi = padded + grid
    core = tuple(slice(1, -1) for _ in range(n))

    def shifted(offset):
        return phi[tuple(slice(1 + o, phi.shape[k] - 1 + o) for k, o in enumerate(offset))]

    centre = phi[core]
    dets = []
    for signs in itertools.product((1, -1), repeat=n):
        cols = []
        for axis, s in enumerate(signs):
            off = [0] * n
            off[axis] = s
            cols.append((shifted(off) - centre) * s)  # forward: T(i+1)-T(i); backward: T(i)-T(i-1)
        dets.append(_det_columns(cols))
    if n == 3:
        for offsets in (((-1, -1, 0), (-1, 0, -1), (0, -1, -1)), ((1, 1, 0), (0, 1, 1), (1, 0, 1))):
            cols = [shifted(o) - centre for o in offsets]
            dets.append(_det_columns(cols))
    return dets


def jacobian_stats(transform: Transform, *, reference: Image | None = None, mask=None) -> dict:
    """Jacobian-determinant and folding statistics of ``transform`` on ``reference``'s grid.

    Values are **plain determinants** of the map ``x ↦ T(x)`` (not logs) unless the key says ``log``.

    Returns
    -------
    dict
        ``min_det``, ``max_det``, ``mean_det``: central-difference det J (numpy.gradient stencil, physical units)
        inside ``mask``; ``num_nonpositive`` and ``percent_nonpositive``: voxels with det J ≤ 0 (% of the mask);
        ``sdlogj``: std of log(det J) with det clipped at 1e-9 (plain); ``sdlogj_l2r``: the Learn2Reg value,
        std(log(clip(det + 3, 1e-9, 1e9))) on zero-padded central differences cropped by 2 voxels;
        ``ndv_percent`` (3-D) or ``nda_percent`` (2-D): non-diffeomorphic volume/area of Liu et al. (IJCV 2024) in %
        of the mask — Σ_k max(−J_k, 0)/12 over the 10 digital Jacobians in 3-D, /4 over the 4 one-sided ones in 2-D;
        ``num_non_digital``: voxels where any digital Jacobian is ≤ 0.

    References
    ----------
    Y. Liu et al., "On finite difference Jacobian computation in deformable image registration", IJCV 2024.
    """
    from .kernels.diff import jacobian_determinant

    u, reference = dense_displacement(transform, reference)
    h = np.asarray(reference.spacing_array_order)
    m = as_mask(mask, reference, "mask")
    m = np.ones(reference.shape, bool) if m is None else np.asarray(m)
    det = np.asarray(jacobian_determinant(u, spacing=tuple(h)), dtype=np.float64)
    d = det[m]
    u_vox = u / h
    l2r, crop = _central_det_l2r(u_vox)
    l2r_log = np.log(np.clip(l2r + 3.0, 1e-9, 1e9))[m[crop]]
    dig = digital_jacobians(u_vox)
    n = reference.ndim
    weight = 12.0 if n == 3 else 4.0
    ndv = sum(np.maximum(-j, 0.0) for j in dig) / weight
    non_digital = np.zeros(reference.shape, bool)
    for j in dig:
        non_digital |= j <= 0
    out = {
        "min_det": float(d.min()),
        "max_det": float(d.max()),
        "mean_det": float(d.mean()),
        "num_nonpositive": int((d <= 0).sum()),
        "percent_nonpositive": float(100.0 * (d <= 0).mean()),
        "sdlogj": float(np.log(np.clip(d, 1e-9, None)).std()),
        "sdlogj_l2r": float(l2r_log.std()) if l2r_log.size else float("nan"),
        ("ndv_percent" if n == 3 else "nda_percent"): float(100.0 * ndv[m].sum() / m.sum()),
        "num_non_digital": int(non_digital[m].sum()),
    }
    return out


def inverse_consistency(transform: Transform, inverse: Transform, *, reference: Image, mask=None) -> dict:
    """``|T⁻¹(T(x)) − x|`` over the voxel centres of ``reference`` (inside ``mask``): mean, max and 95th percentile
    in mm, and the mean in voxels (distance measured in index units of ``reference``)."""
    m = as_mask(mask, reference, "mask")
    pts = reference.grid_points()
    if m is not None:
        pts = pts[np.asarray(m)]
    pts = pts.reshape(-1, reference.ndim)
    back = inverse.map_points(transform.map_points(pts))
    err = np.linalg.norm(back - pts, axis=1)
    err_vox = np.linalg.norm(reference.world_to_index(back) - reference.world_to_index(pts), axis=1)
    return {"mean_mm": float(err.mean()), "max_mm": float(err.max()), "p95_mm": float(np.percentile(err, 95)),
            "mean_voxels": float(err_vox.mean())}
