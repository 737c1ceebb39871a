"""Quality-control figures of a registration, shown the way radiological viewers show images.

:func:`qc_figure` (images) and :func:`qc_points` (point sets) write one PNG each; the command line writes them as
``qc.png`` into every result folder (``--no-qc`` turns that off), :meth:`classreg.Result.save` on request
(``qc=True``). docs/qc.md explains how to read them.

Display conventions (those of ITK-SNAP and 3D Slicer):

* The image is reoriented by its direction matrix to the nearest anatomical axes before display (a permutation and
  flips of the array, no resampling), so that every image appears the same way whatever its storage order: axial
  view with the patient's right on the screen's left and anterior at the top; coronal with right on the left and
  superior at the top; sagittal with anterior on the left and superior at the top. Each view carries the
  orientation letters (R/L, A/P, S/I) on its edges. Physical points are ITK/LPS (+x = patient left, +y =
  posterior, +z = superior). A 2-D image is shown as ITK-SNAP shows one: as an axial slice (+x left, +y
  posterior).
* Pixels keep their physical proportions (anisotropic spacing is shown in mm, not in voxels).
* 3-D: three orthogonal slices through one point (``point``, default the centre of the fixed grid).
* Each image on its own robust intensity window (:func:`window`), so fixed and moving images with unrelated ranges
  are both readable; log det J on a diverging map centred at 0 (det J = 1).

The PNG carries its layout in a text chunk (:func:`read_layout`): the pixel box of every view of every panel and
the letters on its edges, so that tests (and scripts) can check a figure from its pixels.

Needs matplotlib (``pip install matplotlib``); the functions raise ``ImportError`` with that hint otherwise.
"""
from __future__ import annotations

import itertools
import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image import Image
from .io import atomic_output

__all__ = ["jacobian_title", "log_jacobian", "orientation_letters", "qc_figure", "qc_points", "read_layout",
           "window"]

#: resolution of the written PNGs (dots per inch)
DPI = 90
#: key of the PNG text chunk that holds the figure's layout
LAYOUT_KEY = "classreg-qc"
#: colour of the orientation letters (not grey, so that pixel checks of the grey panels can ignore them)
LETTER_COLOUR = "#ffd21f"
#: (negative end, positive end) of the physical LPS axes x, y, z
_ENDS = (("R", "L"), ("A", "P"), ("I", "S"))
#: the letters of a 2-D image by the plane it shows (its +x, +y read as: axial L, P (ITK-SNAP's reading of any 2-D
#: image); coronal L, I; sagittal P, I — row 0 at the top in every case)
_PLANE_LETTERS = {"axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
                  "coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
                  "sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"}}


# ================================================================================================ intensities
def _limits(a: np.ndarray, percentiles=(1.0, 99.0)) -> tuple:
    """The robust range of ``a``: the given percentiles of its finite non-zero values when those are more than 5 %
    of it (a zero background would pull the window down), else of all finite values; None if there are none."""
    a = np.asarray(a, dtype=float)
    finite = a[np.isfinite(a)]
    body = finite[finite != 0] if np.count_nonzero(finite) > 0.05 * max(finite.size, 1) else finite
    if body.size == 0:
        return None
    lo, hi = np.percentile(body, percentiles)
    return float(lo), float(hi)


def window(a: np.ndarray, percentiles=(1.0, 99.0), *, limits=None) -> np.ndarray:
    """``a`` scaled to [0, 1] on its own robust range (the 1st-99th percentiles of its non-zero voxels when it has
    any: a zero background would otherwise pull the window down), clipped outside it. ``limits`` (lo, hi) gives
    the range instead."""
    a = np.asarray(a, dtype=float)
    lim = _limits(a, percentiles) if limits is None else limits
    if lim is None:
        return np.zeros_like(a)
    lo, hi = lim
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


# ================================================================================================ orientation
def orientation_letters(direction) -> str:
    """The anatomical code of an image direction matrix as ITK-SNAP and ``SimpleITK.DICOMOrientImageFilter`` give
    it: for each index axis (x, y[, z]) the letter of the nearest LPS end it points *towards* (identity: "LPS";
    a NIfTI RAS+ image read by ITK: "LPS" too, ITK having converted it; a flipped x axis: "RPS").

    Parameters
    ----------
    direction : Image or array_like
        An image, or its (ndim, ndim) direction matrix (columns: physical directions of the index axes).
    """
    d = direction.direction_matrix if isinstance(direction, Image) else np.asarray(direction, dtype=float)
    n = d.shape[0]
    perm = _nearest_axes(d)
    return "".join(_ENDS[perm[k]][int(d[perm[k], k] > 0)] for k in range(n))


def _nearest_axes(d: np.ndarray) -> tuple:
    """``perm[k]``: the physical axis index axis k is nearest to (the permutation maximising Π |d[perm[k], k]|)."""
    n = d.shape[0]
    return max(itertools.permutations(range(n)), key=lambda p: np.prod([abs(d[p[k], k]) for k in range(n)]))


class _Orientation:
    """The permutation and flips that bring an image's array into the canonical display order: array axes
    (S, P, L) in 3-D, (P, L) in 2-D, each increasing towards that end, i.e. the array of the nearest image with an
    identity direction matrix."""

    def __init__(self, image: Image):
        d = image.direction_matrix
        n = image.ndim
        perm = _nearest_axes(d)                                  # index axis k -> physical axis
        self.ndim = n
        self.shape_in = tuple(image.shape)
        self.source = [0] * n                                    # canonical axis c <- array axis source[c]
        self.flip = [False] * n
        for k in range(n):
            a, c = n - 1 - k, n - 1 - perm[k]                    # array axis of index axis k; its canonical axis
            self.source[c] = a
            self.flip[c] = bool(d[perm[k], k] < 0)
        sp = image.spacing_array_order
        self.spacing = tuple(float(sp[self.source[c]]) for c in range(n))
        self.shape = tuple(self.shape_in[self.source[c]] for c in range(n))
        cos = [abs(d[perm[k], k]) for k in range(n)]
        self.oblique_deg = float(np.degrees(np.arccos(np.clip(min(cos), -1.0, 1.0))))

    def array(self, a: np.ndarray) -> np.ndarray:
        """A spatial array (trailing component axes kept) in canonical order."""
        a = np.asarray(a)
        out = np.transpose(a, tuple(self.source) + tuple(range(self.ndim, a.ndim)))
        flips = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        return out[flips]

    def vectors(self, u: np.ndarray) -> np.ndarray:
        """An array-frame vector field (components along the array axes) in canonical order, with components along
        the canonical axes."""
        u = self.array(u)
        comps = [(-1.0 if self.flip[c] else 1.0) * u[..., self.source[c]] for c in range(self.ndim)]
        return np.stack(comps, axis=-1)

    def index(self, idx) -> np.ndarray:
        """A continuous array index in canonical order."""
        idx = np.asarray(idx, dtype=float)
        out = np.array([idx[self.source[c]] for c in range(self.ndim)])
        for c in range(self.ndim):
            if self.flip[c]:
                out[c] = self.shape[c] - 1 - out[c]
        return out


@dataclass
class _View:
    """One 2-D view of a panel: which slice, its pixel size (mm), where it sits in the panel (mm), its letters."""

    name: str
    take: object          # canonical array -> 2-D display array (row 0 at the top)
    in_plane: object      # canonical vector array (mm) -> (d_row, d_col) 2-D arrays in mm, display orientation
    pixel: tuple          # (row, column) size in mm
    letters: dict         # edge -> letter
    x0: float = 0.0
    y0: float = 0.0

    def size(self, shape) -> tuple:
        """(width, height) in mm of this view of a canonical array of ``shape``."""
        rows, cols = self.take(np.empty(shape, dtype=np.uint8)).shape[:2]
        return cols * self.pixel[1], rows * self.pixel[0]


class _Layout:
    """The views of every image panel (2-D: one; 3-D: axial, coronal, sagittal through ``point``) side by side in
    one axes whose data coordinates are mm, y downwards."""

    def __init__(self, fixed: Image, point=None, plane: str = "axial"):
        if plane not in _PLANE_LETTERS:
            raise ValueError(f"plane must be one of {', '.join(_PLANE_LETTERS)}, got {plane!r}")
        self.orient = o = _Orientation(fixed)
        n = fixed.ndim
        if point is None:
            idx = (np.asarray(fixed.shape, dtype=float) - 1.0) / 2.0
        else:
            p = np.asarray(point, dtype=float).reshape(-1)
            if p.size != n:
                raise ValueError(f"point must have {n} coordinates (x, y{', z' if n == 3 else ''}) in mm, got {p.size}")
            idx = fixed.world_to_index(p[None])[0]
        c = np.clip(np.rint(o.index(idx)).astype(int), 0, np.asarray(o.shape) - 1)
        self.index = c                                           # canonical voxel the slices go through
        back = np.array([c[o.source.index(a)] for a in range(n)], dtype=float)
        for a in range(n):                                       # the voxel in the fixed image's own array order
            k = o.source.index(a)
            if o.flip[k]:
                back[a] = o.shape[k] - 1 - c[k]
        self.point_mm = fixed.index_to_world(back[None])[0]
        sp = o.spacing
        if n == 2:
            self.views = [_View("2-D", lambda a: a, lambda u: (u[..., 0], u[..., 1]), (sp[0], sp[1]),
                                dict(_PLANE_LETTERS[plane]))]
        else:
            k, j, i = (int(v) for v in c)
            self.views = [
                _View("axial", lambda a: a[k], lambda u: (u[k][..., 1], u[k][..., 2]), (sp[1], sp[2]),
                      {"left": "R", "right": "L", "top": "A", "bottom": "P"}),
                _View("coronal", lambda a: a[:, j, :][::-1], lambda u: (-u[:, j, :, 0][::-1], u[:, j, :, 2][::-1]),
                      (sp[0], sp[2]), {"left": "R", "right": "L", "top": "S", "bottom": "I"}),
                _View("sagittal", lambda a: a[:, :, i][::-1], lambda u: (-u[:, :, i, 0][::-1], u[:, :, i, 1][::-1]),
                      (sp[0], sp[1]), {"left": "A", "right": "P", "top": "S", "bottom": "I"}),
            ]
        sizes = [v.size(o.shape) for v in self.views]
        self.height = max(h for _, h in sizes)
        gap = 0.04 * self.height
        x = 0.0
        for v, (w, h) in zip(self.views, sizes):
            v.x0, v.y0 = x, (self.height - h) / 2.0
            x += w + gap
        self.width = x - gap
        self.sizes = sizes

    def slices(self, a3: np.ndarray) -> list:
        """The 2-D display arrays of a spatial array of the fixed image (its own array order)."""
        can = self.orient.array(a3)
        return [np.asarray(v.take(can)) for v in self.views]

    def extent(self, k) -> tuple:
        v, (w, h) = self.views[k], self.sizes[k]
        return (v.x0, v.x0 + w, v.y0 + h, v.y0)

    def show(self, ax, arrays, **kw) -> list:
        """imshow each view's array at its place (row 0 at the top)."""
        return [ax.imshow(a, extent=self.extent(k), origin="upper", **kw) for k, a in enumerate(arrays)]

    def frame(self, ax, *, background="black") -> None:
        """Limits in mm, equal aspect, no ticks, and the orientation letters on every view's edges."""
        ax.set_xlim(0, self.width)
        ax.set_ylim(self.height, 0)
        ax.set_aspect("equal")
        ax.set_facecolor(background)
        ax.set_xticks([])
        ax.set_yticks([])
        for k, v in enumerate(self.views):
            x0, x1, y1, y0 = self.extent(k)
            pad = 0.02 * self.height
            xm, ym = (x0 + x1) / 2.0, (y0 + y1) / 2.0
            for edge, (x, y, ha, va) in {"left": (x0 + pad, ym, "left", "center"),
                                         "right": (x1 - pad, ym, "right", "center"),
                                         "top": (xm, y0 + pad, "center", "top"),
                                         "bottom": (xm, y1 - pad, "center", "bottom")}.items():
                ax.text(x, y, v.letters[edge], color=LETTER_COLOUR, fontsize=7, fontweight="bold", ha=ha, va=va)

    def boxes(self, ax, height_px: int) -> dict:
        """Pixel box [col0, row0, col1, row1] of every view in the written PNG."""
        ax.apply_aspect()
        out = {}
        for k, v in enumerate(self.views):
            x0, x1, y1, y0 = self.extent(k)
            (c0, r1), (c1, r0) = ax.transData.transform([(x0, y1), (x1, y0)])
            out[v.name] = [int(round(c0)), int(round(height_px - r0)), int(round(c1)), int(round(height_px - r1))]
        return out

    def letters(self) -> dict:
        return {v.name: dict(v.letters) for v in self.views}


# ================================================================================================ image figure
def _split(transform, fixed: Image):
    """``(deformable, initial)``: the deformable part of a registration's map expressed on the fixed grid (for the
    grid and det J panels) and its initial affine part (None if there is none).

    ``Chain([field, init])`` (dense solvers: ``init ∘ φ``): the field and ``init``. ``Chain([init, B, ...])``
    (B-spline: ``B ∘ init``): ``init⁻¹ ∘ B ∘ init`` (same det J as B at ``init(x)``) and ``init``.
    """
    from .transforms import Affine, Chain, DisplacementField

    if isinstance(transform, Chain):
        ts = transform.transforms
        if isinstance(ts[0], DisplacementField) and all(isinstance(t, Affine) for t in ts[1:]):
            rest = ts[1:]
            return ts[0], (rest[0] if len(rest) == 1 else Chain(rest))
        if isinstance(ts[0], Affine) and not all(isinstance(t, Affine) for t in ts):
            return Chain([*ts, ts[0].inverse()]), ts[0]
    return transform, None


def _affine_lines(transform, fixed: Image) -> list:
    """For an affine map (fixed → moving): its rotation (ITK Euler angles), principal stretches (singular values of
    the matrix) and where it moves the fixed image's centre, from the polar decomposition A = R S."""
    from .transforms import Affine, euler_angles

    if not isinstance(transform, Affine):
        return []
    a = transform.matrix
    u, stretch, vt = np.linalg.svd(a)
    r = u @ vt
    lines = ["", "affine map (fixed → moving)"]
    if np.linalg.det(r) < 0:
        lines.append("  with a reflection (det < 0)")
    else:
        ang = np.rad2deg(euler_angles(r))
        lines.append(f"  rotation {ang[0]:.2f}°" if a.shape[0] == 2 else
                     "  rotation x {:.2f}° y {:.2f}° z {:.2f}°".format(*ang))
    lines.append("  stretches " + " ".join(f"{v:.4f}" for v in stretch))
    c = fixed.center
    shift = transform.map_points(c[None])[0] - c
    lines.append("  centre shift (" + ", ".join(f"{v:.2f}" for v in shift) + ") mm")
    return lines


def _summary(result, f3, m3, w3, det, *, fixed: Image, dice=None, point=None) -> str:
    """The text panel: similarity before/after, Dice, the affine map's parameters when the result is one,
    plausibility, time, stop reason."""
    from .progress import similarity

    lines = ["similarity (NCC over the fixed grid)", f"  before  {similarity(f3, m3):.3f}",
             f"  after   {similarity(f3, w3):.3f}"]
    if dice is not None:
        before, after = dice
        mb = np.nanmean(list(before.values())) if before else float("nan")
        ma = np.nanmean(list(after.values())) if after else float("nan")
        lines += ["", f"Dice (mean of {len(after)} labels)", f"  before  {mb:.3f}", f"  after   {ma:.3f}"]
        for lab in list(after)[:6]:
            lines.append(f"  label {lab}: {before.get(lab, float('nan')):.3f} → {after[lab]:.3f}")
    lines += _affine_lines(result.transform, fixed)
    lines += ["", f"det J min {det.min():.3g}, max {det.max():.3g}",
              f"  ≤ 0: {100.0 * np.mean(det <= 0):.3g} %   < 0.1: {100.0 * np.mean(det < 0.1):.3g} %"]
    timings = result.timings or {}
    if timings.get("total") is not None:
        extra = f" (kernels {timings['kernels']:.1f} s)" if timings.get("kernels") else ""
        lines.append(f"time {timings['total']:.2f} s{extra}")
    if point is not None:
        lines.append("slices through (" + ", ".join(f"{v:.1f}" for v in point) + ") mm")
    lines += textwrap.wrap("stop: " + str(result.stop_reason), 46, subsequent_indent="  ")[:3]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("the QC figure needs matplotlib (pip install matplotlib)") from exc
    return plt


def qc_figure(result, moving: Image | None, path, *, fixed: Image | None = None, title: str | None = None,
              point=None, plane: str = "axial", fixed_labels: Image | None = None,
              moving_labels: Image | None = None, checker: int = 8, curl: bool | None = None) -> Path:
    """Write the QC PNG of an image registration ``result`` (a :class:`~classreg.Result`).

    Nine panels, all in fixed space and displayed as ITK-SNAP / 3D Slicer display the fixed image (see the module
    docstring): fixed; moving before the deformable part (resampled onto the fixed grid by the initial affine part
    of the map, or as it lies in physical space); warped moving; a checkerboard of fixed and warped; the deformation
    grid and log det J (det J ≤ 0 in black; min, max, % ≤ 0 and % < 0.1 of the whole grid in the title) of the
    deformable part; the differences to fixed before and after; a summary (similarity before and after —
    :func:`classreg.progress.similarity` over the fixed grid, and the first and last values of the history's
    ``similarity`` —, Dice when labels are given, an affine map's rotation, stretches and centre shift, det J
    figures, time, stop reason). A metamorphosis result
    (:func:`classreg.register_metamorphosis`) adds two rows: the path's images I_t at t = 0, ½, 1 with the contour of
    the weight M_t, then M₁, the added intensity and the final image's difference to fixed.

    Parameters
    ----------
    result : Result
        An image registration's result.
    moving : Image or None
        The moving image (None: the "before" panels say so; :meth:`Result.save` without ``moving``).
    path : str or os.PathLike
        The PNG to write (atomically).
    fixed : Image, optional
        The fixed image; default ``result.reference`` (pass it for a result read back by
        :func:`classreg.load_result`, which keeps only the fixed grid).
    title : str, optional
        Figure title.
    point : sequence of float, optional
        3-D: the physical point (x, y, z) mm the three slices go through; default the centre of the fixed grid.
    plane : {"axial", "coronal", "sagittal"}
        2-D: the plane the image shows, for its letters only (a 2-D file cannot say; default as ITK-SNAP reads
        any 2-D image: axial, +x left, +y posterior; "coronal": +y inferior; "sagittal": +x posterior, +y inferior).
    fixed_labels, moving_labels : Image, optional
        Label maps (fixed and moving space): Dice per label before and after in the summary.
    checker : int
        Squares per side of the checkerboard's largest view.
    curl : bool, optional
        Add a fourth row with the curl of the deformable part (2-D: the scalar ``∂_x u_y − ∂_y u_x``; 3-D: the
        component normal to each view's plane; 1/1, central differences of :func:`classreg.kernels.diff.curl`, x the
        last array axis) beside det J. Default: when the result's extras hold a curl control ``g``
        (:func:`classreg.register_vp`, which prescribes det J and curl).

    Returns
    -------
    pathlib.Path
        ``path``. Its layout (pixel boxes of every view, letters) is readable with :func:`read_layout`.
    """
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    from .evaluate import dense_displacement, dice
    from .kernels.diff import jacobian_determinant
    from .resample import resample
    from .transforms import Affine

    fixed = result.reference if fixed is None else fixed
    if fixed is None:
        raise ValueError("qc_figure needs the fixed image: pass fixed= (a point-set result? use qc_points)")
    lay = _Layout(fixed, point, plane)
    deformable, initial = _split(result.transform, fixed)
    f3 = fixed.numpy().astype(float)
    m3 = None if moving is None else resample(moving, initial, reference=fixed).numpy().astype(float)
    if result.warped is not None and result.warped.same_grid(fixed):
        w3 = result.warped.numpy().astype(float)
    elif moving is not None:
        w3 = resample(moving, result.transform, reference=fixed).numpy().astype(float)
    else:
        raise ValueError("qc_figure needs the moving image or a result with its warped image")
    u, _ = dense_displacement(deformable, fixed)
    det3 = np.asarray(jacobian_determinant(u, spacing=fixed.spacing_array_order))
    if curl is None:
        curl = "g" in (getattr(result, "extras", None) or {})
    dice_pair = None
    if fixed_labels is not None and moving_labels is not None:
        after = resample(moving_labels, result.transform, reference=fixed, interpolation="label")
        before = resample(moving_labels, initial, reference=fixed, interpolation="label")
        dice_pair = (dice(fixed_labels, before), dice(fixed_labels, after))

    f, w = lay.slices(f3), lay.slices(w3)
    m = lay.slices(m3) if m3 is not None else [np.zeros_like(a) for a in f]
    # each image on its own robust window (over the pixels shown): fixed and moving often have unrelated ranges
    # (0-1 against 0-255), and one shared window turned the moving and warped panels into white silhouettes
    def windowed(views):
        lim = _limits(np.concatenate([v.ravel() for v in views]))
        return [window(v, limits=lim) for v in views]

    nf, nm, nw = windowed(f), windowed(m), windowed(w)
    square = min(min(s) for s in lay.sizes) / max(checker / 2.0, 1.0)
    boards = []
    for v, a, b in zip(lay.views, nf, nw):
        rr, cc = np.indices(a.shape)
        cb = ((((rr + 0.5) * v.pixel[0]) // square + ((cc + 0.5) * v.pixel[1]) // square) % 2).astype(bool)
        boards.append(np.where(cb, a, b))
    grid_u, grid_title = u, "deformation grid (in-plane part)"
    if isinstance(deformable, Affine):  # a pure affine map: its linear part about the fixed centre (a shift of
        # 100 mm would carry the grid out of view; the summary gives the shift)
        ug, _ = dense_displacement(Affine(deformable.matrix, center=fixed.center), fixed)
        grid_u, grid_title = ug, "deformation grid (linear part about the centre)"
    uc = lay.orient.vectors(grid_u)
    dets = lay.slices(det3)

    path_views = _path_views(result, fixed)
    # rows as high as the views need (3-D: three views side by side, a wider figure), room for titles and text
    width = 12.0 if fixed.ndim == 2 else 15.0
    row_in = max(width / 3.4 * lay.height / lay.width + 0.8, 2.6)
    nrows = 3 + (0 if path_views is None else 2) + (1 if curl else 0)
    fig, axes = plt.subplots(nrows, 3, figsize=(width, nrows * row_in + 0.4), dpi=DPI)
    names = [["fixed", "moving", "warped"], ["checkerboard", "grid", "jacobian"], ["diff_before", "diff_after",
                                                                                   "summary"]]
    if path_views is not None:
        names += _draw_path(axes[3:5], lay, path_views, nf)
    if curl:
        _curl_panel(axes[len(names)], lay, u, fixed, det3)
        names.append(["curl", "", ""])
    grey = {"cmap": "gray", "vmin": 0, "vmax": 1}
    m_title = ("moving: not given" if m3 is None else
               "moving after the initial transform" if initial is not None else "moving (on the fixed grid)")
    if m3 is not None and not any(np.any(v) for v in m):
        m_title += "\nnot in these slices" if np.any(m3) else "\nnone of it inside the fixed image"
    for ax, views, name in zip(axes[0], (nf, nm, nw), ("fixed", m_title, "warped moving")):
        lay.show(ax, views, **grey)
        ax.set_title(name)
    lay.show(axes[1, 0], boards, **grey)
    axes[1, 0].set_title("checkerboard fixed / warped")
    ax = axes[1, 1]
    lay.show(ax, nw, alpha=0.5, **grey)
    segments = []
    for k, v in enumerate(lay.views):
        d_row, d_col = (np.asarray(a, dtype=float) for a in v.in_plane(uc))
        rows, cols = d_row.shape
        step = max(1, int(round(max(rows * v.pixel[0], cols * v.pixel[1]) / 24.0 / min(v.pixel))))
        yy = v.y0 + (np.arange(rows)[:, None] + 0.5) * v.pixel[0] + d_row
        xx = v.x0 + (np.arange(cols)[None, :] + 0.5) * v.pixel[1] + d_col
        segments += [np.column_stack([xx[r], yy[r]]) for r in range(0, rows, step)]
        segments += [np.column_stack([xx[:, c], yy[:, c]]) for c in range(0, cols, step)]
    ax.add_collection(LineCollection(segments, colors="tab:cyan", linewidths=0.5))
    ax.set_title(grid_title)
    ax = axes[1, 2]
    _, lim = log_jacobian(np.concatenate([d.ravel() for d in dets]))
    ims = lay.show(ax, [log_jacobian(d)[0] for d in dets], cmap="RdBu_r", vmin=-lim, vmax=lim)
    lay.show(ax, [np.ma.masked_where(d > 0, np.ones_like(d)) for d in dets], cmap="Greys", vmin=0, vmax=1)
    ax.set_title(jacobian_title(det3), fontsize=9)
    fig.colorbar(ims[0], ax=ax, fraction=0.046, label="log det J (0: volume kept; < 0 compressed)")
    # differences on the matched windows, before and after
    for ax, a, name in ((axes[2, 0], nm, "moving − fixed (before)"), (axes[2, 1], nw, "warped − fixed (after)")):
        diffs = [x - y for x, y in zip(a, nf)]
        lay.show(ax, diffs, cmap="RdBu_r", vmin=-1, vmax=1)
        mean = np.mean(np.abs(np.concatenate([d.ravel() for d in diffs])))
        ax.set_title(f"{name}\nmean |difference| {mean:.3f} (windowed)", fontsize=9)
    for row in axes[:3, :]:
        for ax in row:
            if ax is not axes[2, 2]:
                lay.frame(ax)
    ax = axes[2, 2]
    ax.axis("off")
    text = _summary(result, f3, m3 if m3 is not None else np.zeros_like(f3), w3, det3, fixed=fixed, dice=dice_pair,
                    point=lay.point_mm if fixed.ndim == 3 else None)
    ax.text(0.0, 1.0, text, va="top", ha="left", family="monospace", fontsize=8.5, transform=ax.transAxes)
    sup = title or ""
    if lay.orient.oblique_deg > 1.0:
        sup += f"{' — ' if sup else ''}oblique image ({lay.orient.oblique_deg:.0f}°): letters of the nearest axes"
    if sup:
        fig.suptitle(sup)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if sup else None)
    height = int(round(fig.get_size_inches()[1] * DPI))
    layout = {"kind": "image", "plane": plane if fixed.ndim == 2 else None, "ndim": fixed.ndim, "letters": lay.letters(),
              "panels": {name: lay.boxes(axes[r, c], height) for r, row in enumerate(names)
                         for c, name in enumerate(row) if name not in ("summary", "")},
              "point_mm": [float(v) for v in lay.point_mm]}
    return _save(fig, path, layout)


def _path_views(result, fixed: Image):
    """The metamorphosis path of a result (``extras`` ``trajectory``, ``mask_frames`` and ``added_intensity``, as
    register_metamorphosis keeps them): ``{"times", "images", "masks", "added"}`` as arrays of the fixed grid, or
    None for other results."""
    ex = getattr(result, "extras", None) or {}
    need = ("trajectory", "mask_frames", "added_intensity")
    if not all(isinstance(ex.get(k), Image) and ex[k].same_grid(fixed) for k in need):
        return None
    traj = np.asarray(ex["trajectory"].numpy(), dtype=float)
    frames = np.asarray(ex["mask_frames"].numpy(), dtype=float)
    if traj.ndim == fixed.ndim:
        traj = traj[..., None]
    if frames.ndim == fixed.ndim:
        frames = frames[..., None]
    pick = [0, traj.shape[-1] // 2, traj.shape[-1] - 1]
    times = [k / max(traj.shape[-1] - 1, 1) for k in pick]
    masks = []
    for t in times:  # the frames are evenly spaced in time, linear between (as the solver reads them)
        x = t * (frames.shape[-1] - 1)
        j = min(int(x), max(frames.shape[-1] - 2, 0))
        w = x - j
        masks.append(frames[..., j] if w == 0 else (1 - w) * frames[..., j] + w * frames[..., j + 1])
    return {"times": times, "images": [traj[..., k] for k in pick], "masks": masks,
            "added": np.asarray(ex["added_intensity"].numpy(), dtype=float)}


def _draw_path(axes, lay, pv, nf) -> list:
    """Two rows for a metamorphosis result: the images I_t along the path (t = 0, ½, 1) with the contour of the
    weight M_t = 0.5, then M₁ with the contours of M₀ and M_½, the added intensity R₁ and I₁ − fixed. Returns the
    rows' panel names."""
    grey = {"cmap": "gray", "vmin": 0, "vmax": 1}
    lim = _limits(np.concatenate([a.ravel() for a in pv["images"]]))

    def contour(ax, m, colour, style="solid"):
        for k, a in enumerate(lay.slices(m)):
            if a.min() < 0.5 < a.max():
                ax.contour(a, levels=[0.5], colors=colour, linewidths=0.8, linestyles=style, extent=lay.extent(k),
                           origin="upper")

    for ax, img, m, t in zip(axes[0], pv["images"], pv["masks"], pv["times"]):
        lay.show(ax, [window(v, limits=lim) for v in lay.slices(img)], **grey)
        contour(ax, m, "yellow")
        ax.set_title(f"metamorphosis path I_t, t = {t:g}\n(yellow: weight M_t = 0.5)", fontsize=9)
    ax = axes[1, 0]
    lay.show(ax, lay.slices(pv["masks"][-1]), cmap="viridis", vmin=0, vmax=1)
    contour(ax, pv["masks"][0], "white", "dotted")
    contour(ax, pv["masks"][1], "white", "dashed")
    ax.set_title("weight M₁ (dotted M₀, dashed M_½)", fontsize=9)
    ax = axes[1, 1]
    added = lay.slices(pv["added"])
    amax = max(float(np.max(np.abs(np.concatenate([a.ravel() for a in added])))), 1e-12)
    ims = lay.show(ax, added, cmap="RdBu_r", vmin=-amax, vmax=amax)
    ax.figure.colorbar(ims[0], ax=ax, fraction=0.046, label="moving's intensity units")
    ax.set_title("added intensity R₁ (final − deformation only)", fontsize=9)
    ax = axes[1, 2]
    final = [window(v, limits=lim) for v in lay.slices(pv["images"][-1])]
    diffs = [a - b for a, b in zip(final, nf)]
    lay.show(ax, diffs, cmap="RdBu_r", vmin=-1, vmax=1)
    mean = np.mean(np.abs(np.concatenate([d.ravel() for d in diffs])))
    ax.set_title(f"final I₁ − fixed\nmean |difference| {mean:.3f} (windowed)", fontsize=9)
    return [["path_start", "path_middle", "path_end"], ["weight", "added_intensity", "diff_final"]]


def _curl_panel(axes, lay, u, fixed: Image, det3) -> None:
    """The optional fourth row of :func:`qc_figure`: the curl of the deformable part (signed, diverging map) and,
    beside it, the det J histogram; the third axis is left empty."""
    from .kernels.diff import curl as curl_of

    c = np.asarray(curl_of(u, spacing=fixed.spacing_array_order), dtype=float)
    if fixed.ndim == 2:
        views = lay.slices(c)
        label = "curl ∂x uy − ∂y ux"
    else:  # the component normal to each view (axial, coronal, sagittal: canonical axes 0, 1, 2), i.e. the
        can = lay.orient.array(c)  # rotation within the plane the view shows; components in the array frame
        src = lay.orient.source
        views = [np.asarray(v.take(can[..., src[k]])) for k, v in enumerate(lay.views)]
        label = "curl ⊥ view"
    lim = max(float(np.percentile(np.abs(np.concatenate([v.ravel() for v in views])), 99.5)), 1e-6)
    ax = axes[0]
    ims = lay.show(ax, views, cmap="PuOr_r", vmin=-lim, vmax=lim)
    lay.frame(ax)
    ax.set_title(f"{label}\nmin {float(c.min()):.3g}, max {float(c.max()):.3g} (whole grid)", fontsize=9)
    ax.figure.colorbar(ims[0], ax=ax, fraction=0.046, label="curl (1; rotation ≈ curl / 2 rad)")
    ax = axes[1]
    d = np.asarray(det3, dtype=float).ravel()
    ax.hist(d, bins=60, color="tab:blue")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("det J")
    ax.set_title(f"det J histogram (min {d.min():.3g})", fontsize=9)
    axes[2].axis("off")


def _save(fig, path, layout) -> Path:
    plt = _pyplot()
    p = Path(os.fspath(path))
    try:
        with atomic_output(p) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png", metadata={LAYOUT_KEY: json.dumps(layout)})
    finally:
        plt.close(fig)
    return p


def read_layout(path) -> dict:
    """The layout a QC PNG carries: ``panels`` (panel → view → pixel box ``[col0, row0, col1, row1]``),
    ``letters`` (view → edge → letter), ``kind`` ("image" or "points"), ``ndim``."""
    from PIL import Image as PILImage

    with PILImage.open(os.fspath(path)) as im:
        text = im.text.get(LAYOUT_KEY)
    if text is None:
        raise ValueError(f"{str(path)!r} is not a classreg QC figure (no {LAYOUT_KEY!r} text chunk)")
    return json.loads(text)


# ================================================================================================ point sets
#: the projections of point sets: name, (screen x axis, screen y axis) as physical axes, whether screen y is
#: inverted (increasing downwards), letters — the axial, coronal and sagittal views of :class:`_Layout`
_PROJECTIONS = {
    2: [("2-D", (0, 1), True, {"left": "R", "right": "L", "top": "A", "bottom": "P"})],
    3: [("axial", (0, 1), True, {"left": "R", "right": "L", "top": "A", "bottom": "P"}),
        ("coronal", (0, 2), False, {"left": "R", "right": "L", "top": "S", "bottom": "I"}),
        ("sagittal", (1, 2), False, {"left": "A", "right": "P", "top": "S", "bottom": "I"})],
}


def qc_points(result, source, target, path, *, title: str | None = None) -> Path:
    """Write the QC PNG of a point-set registration (:func:`classreg.register_points`).

    Rows: before (the source as given) and after (``result.apply_points(source)``, the source mapped into target
    space), each over the target in grey; every source point coloured by its distance to the nearest target point
    (mm, one colour scale for both rows). Columns: 3-D: the axial (x-y), coronal (x-z) and sagittal (y-z)
    projections, oriented as the image figure's views (patient right on the left, anterior / superior at the top)
    with their orientation letters; 2-D: one view. A side panel gives the distances before and after (mean, median,
    95th percentile, max), σ, iterations, time and stop reason.

    Parameters
    ----------
    result : Result
        The point-set registration's result.
    source, target : array_like
        (N, ndim) and (M, ndim) physical points (x, y[, z]) mm: the moving and the fixed set.
    path : str or os.PathLike
        The PNG to write (atomically).
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
        ``path``; its layout is readable with :func:`read_layout`.
    """
    plt = _pyplot()
    from scipy.spatial import cKDTree

    src, tgt = np.asarray(source, dtype=float), np.asarray(target, dtype=float)
    n = tgt.shape[1]
    if n not in _PROJECTIONS or src.ndim != 2 or src.shape[1] != n:
        raise ValueError(f"source and target must be (N, 2) or (N, 3) point arrays of one dimension, got "
                         f"{src.shape} and {tgt.shape}")
    moved = np.asarray(result.apply_points(src), dtype=float)
    tree = cKDTree(tgt)
    err_before, err_after = tree.query(src)[0], tree.query(moved)[0]
    vmax = max(float(np.percentile(err_before, 95)), 1e-9)
    views = _PROJECTIONS[n]
    allp = np.vstack([src, tgt, moved])
    lo, hi = allp.min(0), allp.max(0)
    margin = 0.05 * max(float((hi - lo).max()), 1e-9)
    lo, hi = lo - margin, hi + margin
    cols = len(views) + 1
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 8.6), dpi=DPI, squeeze=False)
    panels = {}
    height = int(round(fig.get_size_inches()[1] * DPI))
    sc = None
    for r, (pts, err, name) in enumerate(((src, err_before, "before"), (moved, err_after, "after"))):
        for c, (view, (ax0, ax1), inverted, letters) in enumerate(views):
            ax = axes[r, c]
            ax.scatter(tgt[:, ax0], tgt[:, ax1], s=4, c="0.6", linewidths=0, label="target")
            sc = ax.scatter(pts[:, ax0], pts[:, ax1], s=6, c=err, cmap="plasma", vmin=0, vmax=vmax, linewidths=0,
                            label="source" if name == "before" else "moved source")
            ax.set_xlim(lo[ax0], hi[ax0])
            ax.set_ylim((hi[ax1], lo[ax1]) if inverted else (lo[ax1], hi[ax1]))
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            for edge, (x, y, ha, va) in {"left": (0.02, 0.5, "left", "center"), "right": (0.98, 0.5, "right", "center"),
                                         "top": (0.5, 0.98, "center", "top"),
                                         "bottom": (0.5, 0.02, "center", "bottom")}.items():
                ax.text(x, y, letters[edge], transform=ax.transAxes, color="#b07800", fontsize=8, fontweight="bold",
                        ha=ha, va=va)
            ax.set_title(f"{name}: {view}", fontsize=10)

    def stats(e):
        return (f"mean {np.mean(e):.3g}, median {np.median(e):.3g}\n    95 % {np.percentile(e, 95):.3g}, "
                f"max {np.max(e):.3g} mm")

    m = result.metrics or {}
    lines = [f"{len(src)} source, {len(tgt)} target points", "", "distance to the nearest target",
             "  before: " + stats(err_before), "  after:  " + stats(err_after), ""]
    sims = [h.get("similarity") for h in (result.history or []) if h.get("similarity") is not None]
    if sims:
        lines.append(f"similarity (NCC) {sims[0]:.3f} → {sims[-1]:.3f}")
    if m.get("sigma_mm") is not None:
        lines.append(f"σ {m['sigma_mm']:.3g} mm, {m.get('iterations', '?')} iterations")
    if (result.timings or {}).get("total") is not None:
        lines.append(f"time {result.timings['total']:.2f} s")
    lines += textwrap.wrap("stop: " + str(result.stop_reason), 40, subsequent_indent="  ")[:3]
    for r in range(2):
        axes[r, -1].axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles2, labels2 = axes[1, 0].get_legend_handles_labels()
    # right of the colour bar's label, which runs down the left edge of this column
    axes[1, -1].legend(handles + handles2[1:], labels + labels2[1:], loc="upper left", bbox_to_anchor=(0.15, 1.0),
                       fontsize=8, markerscale=2)
    axes[0, -1].text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8,
                     transform=axes[0, -1].transAxes)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.02, right=0.9, bottom=0.03, top=0.92 if title else 0.95, wspace=0.08, hspace=0.12)
    fig.colorbar(sc, ax=axes[:, :len(views)].ravel().tolist(), fraction=0.02,
                 label="distance to the nearest target point (mm)")
    for r, name in enumerate(("before", "after")):
        panels[name] = {}
        for c, (view, *_rest) in enumerate(views):
            ax = axes[r, c]
            ax.apply_aspect()
            (c0, r1), (c1, r0) = ax.transAxes.transform([(0, 0), (1, 1)])
            panels[name][view] = [int(round(c0)), int(round(height - r0)), int(round(c1)), int(round(height - r1))]
    layout = {"kind": "points", "ndim": n, "letters": {v[0]: dict(v[3]) for v in views}, "panels": panels}
    return _save(fig, path, layout)
