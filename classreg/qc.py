"""Quality-control figure of a registration: fixed, moving, warped, checkerboard, deformation grid, det J map.

Needs matplotlib (``pip install matplotlib``); :func:`qc_figure` raises ``ImportError`` with that hint otherwise.
For 3-D images each panel shows the three central orthogonal slices (axial, coronal, sagittal).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .image import Image
from .io import atomic_output

__all__ = ["jacobian_title", "log_jacobian", "qc_figure", "window"]


def _slice(a: np.ndarray, ndim: int):
    """The middle slice along the first array axis (axial for a standard 3-D image); a 2-D image as is."""
    return a[a.shape[0] // 2] if ndim == 3 else a


def _views(a: np.ndarray, ndim: int, pad: float = 0.0) -> np.ndarray:
    """2-D: the image. 3-D: its three central orthogonal slices side by side — axial (first array axis), coronal and
    sagittal with the first array axis upwards (superior at the top for the usual LPS directions) — padded to one
    height with ``pad``."""
    if ndim != 3:
        return a
    z, y, x = (s // 2 for s in a.shape[:3])
    views = [a[z], np.flipud(a[:, y, :]), np.flipud(a[:, :, x])]
    h = max(v.shape[0] for v in views)
    out = []
    for v in views:
        block = np.full((h, v.shape[1]) + v.shape[2:], pad, dtype=float)
        block[(h - v.shape[0]) // 2:(h - v.shape[0]) // 2 + v.shape[0]] = v
        out.append(block)
        out.append(np.full((h, 2) + v.shape[2:], pad, dtype=float))
    return np.concatenate(out[:-1], axis=1)


def window(a: np.ndarray, percentiles=(1.0, 99.0)) -> np.ndarray:
    """``a`` scaled to [0, 1] on its own robust range (the 1st-99th percentiles of its non-zero voxels when it has
    any: a zero background would otherwise pull the window down), clipped outside it."""
    a = np.asarray(a, dtype=float)
    finite = a[np.isfinite(a)]
    body = finite[finite != 0] if np.count_nonzero(finite) > 0.05 * max(finite.size, 1) else finite
    if body.size == 0:
        return np.zeros_like(a)
    lo, hi = np.percentile(body, percentiles)
    return np.clip((a - lo) / max(hi - lo, 1e-12 * max(abs(hi), 1.0)), 0.0, 1.0)


def log_jacobian(det: np.ndarray) -> tuple:
    """``log det J`` for display (det J ≤ 0, where the log is undefined, at the negative end) and a symmetric colour
    limit that shows a 2× compression or expansion at least."""
    det = np.asarray(det, dtype=float)
    tiny = 1e-6
    logdet = np.log(np.maximum(det, tiny))
    lim = max(np.log(2.0), float(np.percentile(np.abs(logdet), 99.5)))
    return logdet, lim


def jacobian_title(det: np.ndarray) -> str:
    """min, max, % det J ≤ 0 and % < 0.1 (strong compression) — what a reader needs to judge plausibility."""
    det = np.asarray(det, dtype=float)
    return (f"det J: min {det.min():.3g}, max {det.max():.3g}\n"
            f"{100.0 * np.mean(det <= 0):.3g} % ≤ 0 (black), {100.0 * np.mean(det < 0.1):.3g} % < 0.1")


def _summary(result, f, m, w, det) -> str:
    """The text panel: similarity before/after on the shown slice, plausibility, stop reason and time."""
    def ncc(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / max(np.sqrt((a * a).sum() * (b * b).sum()), 1e-30))

    total = (result.timings or {}).get("total")
    lines = ["NCC on the slice(s) shown, det J on the whole grid:", f"NCC fixed/moving  {ncc(f, m):.3f}", f"NCC fixed/warped  {ncc(f, w):.3f}",
             f"det J min         {det.min():.3g}", f"det J <= 0        {100.0 * np.mean(det <= 0):.3g} %",
             f"det J < 0.1       {100.0 * np.mean(det < 0.1):.3g} %"]
    if total is not None:
        lines.append(f"time              {total:.2f} s")
    lines += ["", "stop: " + str(result.stop_reason)[:60]]
    return "\n".join(lines)


def qc_figure(result, moving: Image, path, *, fixed: Image | None = None, title: str | None = None,
              checker: int = 8) -> Path:
    """Write a PNG with nine panels for ``result`` (a :class:`~classreg.Result` of an image registration).

    Panels: fixed; moving resampled onto the fixed grid by the initial (non-deformable) part, or as is; warped;
    a checkerboard of fixed and warped; the deformation grid and log det J (det J ≤ 0 in black) of the deformable
    part (the leading displacement field of a ``Chain``); the differences to fixed before and after; a summary
    (NCC before/after on the shown slice, det J figures, time, stop reason). Each image is shown on its own robust
    intensity window, array row 0 at the top. ``fixed`` defaults to ``result.reference``
    (pass it for a result read back by :func:`classreg.load_result`, which keeps only the fixed grid).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("the QC figure needs matplotlib (pip install matplotlib)") from exc
    from .evaluate import dense_displacement
    from .kernels.diff import jacobian_determinant
    from .resample import resample

    from .transforms import Chain, DisplacementField

    fixed = result.reference if fixed is None else fixed
    n = fixed.ndim
    # split "deformable first, then the initial (affine) part": the grid and det J show the deformable part only
    t = result.transform
    initial = None
    if isinstance(t, Chain) and isinstance(t.transforms[0], DisplacementField):
        rest = t.transforms[1:]
        t, initial = t.transforms[0], (rest[0] if len(rest) == 1 else Chain(rest))
    f3 = fixed.numpy().astype(float)
    m3 = resample(moving, initial, reference=fixed).numpy().astype(float)
    w3 = (result.warped if result.warped is not None else result.apply(moving)).numpy().astype(float)
    u, _ = dense_displacement(t, fixed)
    det3 = np.asarray(jacobian_determinant(u, spacing=fixed.spacing_array_order))
    # 3-D: three orthogonal slices per panel; the deformation grid shows the axial slice's in-plane motion
    f, m, w, det = _views(f3, n), _views(m3, n), _views(w3, n), _views(det3, n, pad=1.0)
    u2 = _slice(u, n)[..., -2:] / np.asarray(fixed.spacing_array_order[-2:])  # in-plane, voxels
    # each image on its own robust window: fixed and moving often have unrelated ranges (0-1 against 0-255), and
    # one shared window turned the moving and warped panels into white silhouettes
    nf, nm, nw = window(f), window(m), window(w)
    yy, xx = np.indices(f.shape)
    cb = ((yy // checker + xx // checker) % 2).astype(bool)
    checkerboard = np.where(cb, nf, nw)
    grid_bg = window(_slice(w3, n))
    gyy, gxx = np.indices(grid_bg.shape)
    fig, axes = plt.subplots(3, 3, figsize=(12, 12.5))
    m_name = "moving after the initial transform" if initial is not None else "moving (on the fixed grid)"
    # row 0 of the array at the top, as image viewers show it
    for ax, img, name in zip(axes[0], (nf, nm, nw), ("fixed", m_name, "warped moving")):
        ax.imshow(img, cmap="gray", origin="upper", vmin=0, vmax=1)
        ax.set_title(name)
    axes[1, 0].imshow(checkerboard, cmap="gray", origin="upper", vmin=0, vmax=1)
    axes[1, 0].set_title("checkerboard fixed / warped")
    ax = axes[1, 1]
    ax.imshow(grid_bg, cmap="gray", origin="upper", alpha=0.5, vmin=0, vmax=1)
    step = max(1, min(grid_bg.shape) // 32)
    gy, gx = gyy + u2[..., 0], gxx + u2[..., 1]
    for k in range(0, grid_bg.shape[0], step):
        ax.plot(gx[k, :], gy[k, :], color="tab:blue", lw=0.5)
    for k in range(0, grid_bg.shape[1], step):
        ax.plot(gx[:, k], gy[:, k], color="tab:blue", lw=0.5)
    ax.set_xlim(0, grid_bg.shape[1] - 1)
    ax.set_ylim(grid_bg.shape[0] - 1, 0)
    ax.set_title("deformation grid (in-plane" + (", axial slice)" if n == 3 else ")"))
    ax = axes[1, 2]
    logdet, lim = log_jacobian(det)
    im = ax.imshow(logdet, cmap="RdBu_r", origin="upper", vmin=-lim, vmax=lim)
    bad = np.ma.masked_where(det > 0, np.ones_like(det))
    ax.imshow(bad, cmap="Greys", origin="upper", vmin=0, vmax=1)
    ax.set_title(jacobian_title(det3), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="log det J (0: volume kept; < 0 compressed)")
    # differences on the matched windows, before and after, and the figures a reader needs beside them
    before, after = nm - nf, nw - nf
    for ax, d, name in ((axes[2, 0], before, "moving − fixed (before)"), (axes[2, 1], after, "warped − fixed (after)")):
        ax.imshow(d, cmap="RdBu_r", origin="upper", vmin=-1, vmax=1)
        ax.set_title(f"{name}\nmean |difference| {np.mean(np.abs(d)):.3f} (windowed)", fontsize=9)
    ax = axes[2, 2]
    ax.axis("off")
    ax.text(0.0, 1.0, _summary(result, f, m, w, det3), va="top", ha="left", family="monospace", fontsize=8.5,
            transform=ax.transAxes)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    p = Path(os.fspath(path))
    with atomic_output(p) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return p
