"""Quality-control figure of a registration: fixed, moving, warped, checkerboard, deformation grid, det J map.

Needs matplotlib (``pip install matplotlib``); :func:`qc_figure` raises ``ImportError`` with that hint otherwise.
For 3-D images the middle slice along the first array axis is shown.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .image import Image
from .io import atomic_output

__all__ = ["qc_figure"]


def _slice(a: np.ndarray, ndim: int):
    return a[a.shape[0] // 2] if ndim == 3 else a


def qc_figure(result, moving: Image, path, *, fixed: Image | None = None, title: str | None = None,
              checker: int = 8) -> Path:
    """Write a PNG with six panels for ``result`` (a :class:`~classreg.Result` of an image registration).

    Panels: fixed; moving resampled onto the fixed grid by the initial (non-deformable) part, or as is; warped;
    a checkerboard of fixed and warped; the deformation grid and the Jacobian determinant (det J ≤ 0 in red) of the
    deformable part (the leading displacement field of a ``Chain``). ``fixed`` defaults to ``result.reference``
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
    f = _slice(fixed.numpy().astype(float), n)
    m = _slice(resample(moving, initial, reference=fixed).numpy().astype(float), n)
    w = _slice((result.warped if result.warped is not None else result.apply(moving)).numpy().astype(float), n)
    u, _ = dense_displacement(t, fixed)
    det = _slice(np.asarray(jacobian_determinant(u, spacing=fixed.spacing_array_order)), n)
    u2 = _slice(u, n)[..., -2:] / np.asarray(fixed.spacing_array_order[-2:])  # in-plane, voxels
    rng_f = np.percentile(f, [1, 99])

    def norm(a):
        return np.clip((a - rng_f[0]) / max(rng_f[1] - rng_f[0], 1e-12), 0, 1)

    yy, xx = np.indices(f.shape)
    cb = ((yy // checker + xx // checker) % 2).astype(bool)
    checkerboard = np.where(cb, norm(f), norm(w))
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.5))
    m_name = "moving after the initial transform" if initial is not None else "moving (on the fixed grid)"
    for ax, img, name in zip(axes[0], (f, m, w), ("fixed", m_name, "warped moving")):
        ax.imshow(norm(img), cmap="gray", origin="lower")
        ax.set_title(name)
    axes[1, 0].imshow(checkerboard, cmap="gray", origin="lower")
    axes[1, 0].set_title("checkerboard fixed / warped")
    ax = axes[1, 1]
    ax.imshow(norm(w), cmap="gray", origin="lower", alpha=0.5)
    step = max(1, min(f.shape) // 32)
    gy, gx = yy + u2[..., 0], xx + u2[..., 1]
    for k in range(0, f.shape[0], step):
        ax.plot(gx[k, :], gy[k, :], color="tab:blue", lw=0.5)
    for k in range(0, f.shape[1], step):
        ax.plot(gx[:, k], gy[:, k], color="tab:blue", lw=0.5)
    ax.set_xlim(0, f.shape[1] - 1)
    ax.set_ylim(0, f.shape[0] - 1)
    ax.set_title("deformation grid (in-plane)")
    ax = axes[1, 2]
    im = ax.imshow(det, cmap="viridis", origin="lower", vmin=0, vmax=max(2.0, float(np.percentile(det, 99))))
    bad = np.ma.masked_where(det > 0, det)
    ax.imshow(bad, cmap="autumn", origin="lower")
    ax.set_title(f"det J (min {det.min():.2f}; red: ≤ 0)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    p = Path(os.fspath(path))
    with atomic_output(p) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return p
