"""``register_rigid``: global rigid multimodal alignment by FFT cross-similarity of normalised gradient fields.

Öfverstedt, Lindblad, Sladoje, "Fast computation of mutual information in the frequency domain with applications to
global multimodal image alignment" line of work; here the CSNGF method of WBIR 2022 (METHODS.md §5): the squared
dot product of normalised gradient fields (NGF, Haber & Modersitzki), averaged over the mask overlap, is evaluated
for **every integer shift at once** by FFT cross-correlation, and rotations are searched by random/quasi-random
sampling over a Gaussian pyramid.

The measure (METHODS §5.1, paper eqs. 1-6)::

    n(x; A)   = ∇A / sqrt(|∇A|² + ε²)
    CSNGF(χ)  = (1/N(χ)) Σ_x M_A(x + χ) M_B(x) <n(x + χ; A), n(x; B)>²,     N(χ) = (M_A ⋆ M_B)(χ)

The square expands into ``d(d+1)/2`` separable channel products (six in 3-D, three in 2-D): ``n_i(A)² n_i(B)²`` and
``2 n_i(A) n_j(A) · n_i(B) n_j(B)`` (i < j). Their cross-correlations are summed in the Fourier domain and brought
back with one inverse FFT (:class:`classreg.kernels.fft.CachedCorrelator`, fixed spectra cached, explicit output
sizes); a second correlator gives the overlap count ``N``. Shifts whose overlap is below ``overlap · max N`` get the
score -1. :func:`csngf_direct` is the loop-over-shifts reference used by the tests.

Geometry: both images are resampled onto isotropic *working grids* whose axes follow the fixed image's direction
cosines: the fixed grid covers the fixed image, the moving grid is a cube as wide as the moving image's largest
physical extent, and a candidate rotation ``R`` (a physical rotation) is applied about the physical centres:
the moving working image at point ``p`` holds ``moving(R (p - c_F) + c_M)``. A peak at shift χ then gives the
fixed → moving map ``T(x) = R (x - c_F) + c_M + R (o_B - o_A - L χ)`` (``o``: working-grid origins, ``L``: their
index → mm matrix), returned as ITK's ``Euler`` parametrisation centred at ``c_F``. Anisotropic and oblique inputs
therefore rotate about a physical point with true (not grid-normalised) rotations (METHODS §5.6).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import NamedTuple

import numpy as np

from ..backend import thread_count, versions
from ..image import Image, as_mask
from ..progress import Progress, StopRegistration
from ..pyramid import check_shrink_factors
from ..result import Result
from ..transforms import Affine, rotation_matrix
from ._common import check_pair

__all__ = ["register_rigid", "CrossSimilarityNGF", "SimilarityMap", "csngf_direct", "ngf", "sample_rotations",
           "euler_angles", "PAPER_SCHEDULE"]

#: The published schedule (METHODS §5.3): shrink factors d, rotations sampled per level a, perturbation half-widths
#: u (degrees), candidates kept p, Gaussian σ per level (mm).
PAPER_SCHEDULE = dict(shrink_factors=(4, 2, 2, 1), samples=(5000, 3000, 300, 0), perturbation=(10.0, 3.0, 0.0),
                      keep=(20, 3, 1), smoothing_sigmas=(5.0, 3.0, 2.0, 1.5))


# ================================================================================================ the measure
def ngf(image, *, epsilon: float = 1e-5, backend=None):
    """Normalised gradient field ``∇A / sqrt(|∇A|² + ε²)`` of a 2-D/3-D array, in voxel units.

    Central differences ``(f(x+1) - f(x-1))/2`` inside, one-sided at the array border
    (:func:`classreg.kernels.diff.gradient` with unit spacing). ``ε`` is relative to intensities in [0, 1]
    (paper default 1e-5). Returns ``(*shape, ndim)`` with components along the array axes.
    """
    from ..kernels.diff import gradient

    g = gradient(image, spacing=1.0, backend=backend)
    norm = np.sqrt(np.sum(g * g, axis=-1, keepdims=True) + g.dtype.type(epsilon) ** 2)
    return g / norm


def _channels(n, squared: bool, fixed_side: bool):
    """The separable channels of ``<n_A, n_B>²`` (or ``<n_A, n_B>`` when not squared) for one side."""
    d = n.shape[-1]
    if not squared:
        return [np.ascontiguousarray(n[..., i]) for i in range(d)]
    out = [n[..., i] * n[..., i] for i in range(d)]
    for i in range(d):
        for j in range(i + 1, d):
            c = n[..., i] * n[..., j]
            out.append(c * c.dtype.type(2.0) if fixed_side else c)
    return out


class SimilarityMap(NamedTuple):
    """CSNGF over all shifts: ``score`` (-1 where the overlap is too small), rounded overlap ``count`` (voxels),
    ``valid`` (overlap ≥ γ · max count). Index ``i`` along axis ``j`` is the shift ``χ_j = i - (n_b,j - 1)``."""

    score: np.ndarray
    count: np.ndarray
    valid: np.ndarray


def _overlap_threshold(count, overlap):
    top = float(count.max())
    return max(overlap * top, 1.0)


def _as_mask_array(mask, shape, dtype, name):
    if mask is None:
        return np.ones(shape, dtype=dtype)
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} has shape {m.shape}, expected {tuple(shape)}")
    return (m != 0).astype(dtype)


def _check_array(a, name):
    a = np.asarray(a)
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D or 3-D array, got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or Inf; fill or mask those voxels first")
    return a


class CrossSimilarityNGF:
    """CSNGF of one fixed image ``a`` against many moving images ``b`` for all integer shifts (METHODS §5.2).

    Everything about ``a`` (its NGF channels and the spectra of the channels and of its mask) is computed once; a
    call costs ``d(d+1)/2 + 1`` forward real FFTs of ``b``'s channels and mask and two inverse FFTs.

    Parameters
    ----------
    a : ndarray (2-D or 3-D)
        Reference image, intensities roughly in [0, 1].
    b_shape : tuple of int
        Shape of every ``b``.
    a_mask : ndarray, optional
        Where ``a`` counts (non-zero = inside). The NGF is computed from the unmasked image, then masked.
    epsilon : float
        NGF ε (intensity units; 1e-5 for [0, 1] data as in the paper).
    overlap : float
        Minimum overlap γ ∈ (0, 1]: shifts with ``N(χ) < γ · max N`` score -1.
    squared : bool
        ``<n_A, n_B>²`` (sign-invariant, the multimodal default) or the signed ``<n_A, n_B>``.
    dtype : numpy dtype
        float32 (default) or float64 for the whole computation.
    workers : int, optional
        :mod:`scipy.fft` threads (None: the numba thread count, ``NUMBA_NUM_THREADS`` or all cores).
    backend : {None, "numpy", "numba", "cuda"}
        Backend of the gradient kernel.
    """

    def __init__(self, a, b_shape, *, a_mask=None, epsilon: float = 1e-5, overlap: float = 0.5,
                 squared: bool = True, dtype=np.float32, workers=None, backend=None):
        from ..kernels.fft import CachedCorrelator

        a = _check_array(a, "a")
        self.dtype = _check_dtype(dtype)
        self.epsilon = _positive(epsilon, "epsilon")
        self.overlap = _overlap(overlap)
        self.squared = bool(squared)
        self.backend = backend
        b_shape = tuple(int(s) for s in b_shape)
        if len(b_shape) != a.ndim:
            raise ValueError(f"b_shape {b_shape} must have as many axes as a {a.shape}")
        workers = thread_count() if workers is None else int(workers)
        ma = _as_mask_array(a_mask, a.shape, self.dtype, "a_mask")
        if not ma.any():
            raise ValueError("a_mask is empty; give a mask with at least one voxel inside")
        na = ngf(a.astype(self.dtype, copy=False), epsilon=self.epsilon, backend=backend) * ma[..., None]
        self._corr = CachedCorrelator(_channels(na, self.squared, True), b_shape, mode="full", workers=workers)
        self._mcorr = CachedCorrelator(ma, b_shape, mode="full", workers=workers)
        self.a_shape = a.shape
        self.b_shape = b_shape
        self.shape = self._corr.shape
        self.shifts = self._corr.shifts

    def __call__(self, b, b_mask=None) -> SimilarityMap:
        """:class:`SimilarityMap` of ``b`` (masked by ``b_mask``) for every shift."""
        b = _check_array(b, "b")
        if b.shape != self.b_shape:
            raise ValueError(f"b must have shape {self.b_shape}, got {b.shape}")
        mb = _as_mask_array(b_mask, b.shape, self.dtype, "b_mask")
        nb = ngf(b.astype(self.dtype, copy=False), epsilon=self.epsilon, backend=self.backend) * mb[..., None]
        c = self._corr(_channels(nb, self.squared, False))
        count = np.rint(self._mcorr(mb))
        valid = count >= _overlap_threshold(count, self.overlap)
        score = c / np.maximum(count, 1e-7)
        score[~valid] = -1.0
        return SimilarityMap(score, count, valid)

    def shift_of(self, index):
        """Integer shift χ (array axis order) of a flat or multi-index into the map."""
        if np.ndim(index) == 0:
            index = np.unravel_index(int(index), self.shape)
        return np.array([s[i] for s, i in zip(self.shifts, index)], dtype=float)


def csngf_direct(a, b, *, a_mask=None, b_mask=None, epsilon: float = 1e-5, overlap: float = 0.5,
                 squared: bool = True) -> SimilarityMap:
    """Reference CSNGF by a loop over all shifts (float64), same layout as :class:`CrossSimilarityNGF`.

    For each χ the overlapping blocks of the masked NGFs are multiplied directly,
    ``Σ_x M_A(x+χ) M_B(x) <n_A(x+χ), n_B(x)>^{2 or 1}`` — no channel expansion, no FFT. Cost ``O(|A| |B|)``:
    meant for tests and the speed-up benchmark on small inputs.
    """
    a = _check_array(a, "a").astype(np.float64)
    b = _check_array(b, "b").astype(np.float64)
    if a.ndim != b.ndim:
        raise ValueError(f"a and b must have the same number of axes, got {a.shape} and {b.shape}")
    ma = _as_mask_array(a_mask, a.shape, np.float64, "a_mask")
    mb = _as_mask_array(b_mask, b.shape, np.float64, "b_mask")
    na = ngf(a, epsilon=epsilon, backend="numpy") * ma[..., None]
    nb = ngf(b, epsilon=epsilon, backend="numpy") * mb[..., None]
    shape = tuple(p + q - 1 for p, q in zip(a.shape, b.shape))
    s = np.zeros(shape)
    count = np.zeros(shape)
    for idx in np.ndindex(*shape):
        chi = [i - (q - 1) for i, q in zip(idx, b.shape)]
        # x ranges over b's indices with x + χ inside a
        sb = tuple(slice(max(0, -c), min(q, p - c)) for c, p, q in zip(chi, a.shape, b.shape))
        sa = tuple(slice(x.start + c, x.stop + c) for x, c in zip(sb, chi))
        dot = np.sum(na[sa] * nb[sb], axis=-1)
        w = ma[sa] * mb[sb]
        s[idx] = np.sum(w * (dot * dot if squared else dot))
        count[idx] = np.sum(w)
    valid = count >= _overlap_threshold(count, _overlap(overlap))
    score = s / np.maximum(count, 1e-7)
    score[~valid] = -1.0
    return SimilarityMap(score, count, valid)


# ================================================================================================ rotations
def euler_angles(matrix) -> np.ndarray:
    """ITK Euler angles (radians) of a rotation matrix: 2-D one angle; 3-D (θx, θy, θz) with R = Rz · Rx · Ry."""
    r = np.asarray(matrix, dtype=float)
    if r.shape == (2, 2):
        return np.array([math.atan2(r[1, 0], r[0, 0])])
    if r.shape == (3, 3):
        ax = math.asin(max(-1.0, min(1.0, r[2, 1])))
        if abs(math.cos(ax)) > 1e-9:
            ay = math.atan2(-r[2, 0], r[2, 2])
            az = math.atan2(-r[0, 1], r[1, 1])
        else:  # gimbal lock: put everything into θz
            ay = 0.0
            az = math.atan2(r[1, 0], r[0, 0])
        return np.array([ax, ay, az])
    raise ValueError(f"matrix must be 2x2 or 3x3, got shape {r.shape}")


def sample_rotations(n: int, ndim: int, *, max_angle: float = 180.0, seed=0) -> np.ndarray:
    """``n`` quasi-random rotation matrices, shape (n, ndim, ndim), deterministic for a given seed.

    2-D: angles ``-m + 2m (i + u)/n`` (a stratified grid with one random offset u; m = ``max_angle`` degrees).
    3-D with ``max_angle >= 180``: uniform over SO(3) — a scrambled Sobol sequence mapped to unit quaternions with
    Shoemake's method; smaller ``max_angle``: ITK Euler angles from a Sobol sequence in ``[-m, m]³``.
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


def _perturb(r, u_deg, rng):
    n = r.shape[0]
    k = 1 if n == 2 else 3
    return r @ rotation_matrix(np.deg2rad(rng.uniform(-u_deg, u_deg, size=k)))


# ================================================================================================ geometry
def _centre(img: Image) -> np.ndarray:
    return img.index_to_world(np.array([[(s - 1) / 2.0 for s in img.shape]]))[0]


def _extent_in_frame(img: Image, frame: np.ndarray) -> np.ndarray:
    """Physical extent (x, y[, z] of ``frame``'s axes) of the box spanned by ``img``'s voxels (size × spacing)."""
    edges = img.direction_matrix @ np.diag(np.asarray(img.size) * np.asarray(img.spacing))
    return np.abs(frame.T @ edges).sum(axis=1)


def _working_grid(extent, spacing: float, frame: np.ndarray, centre: np.ndarray) -> Image:
    """Isotropic grid (spacing mm, axes = ``frame``'s columns) covering ``extent`` (x-first), centred on ``centre``."""
    size = np.maximum(1, np.round(np.asarray(extent) / spacing)).astype(int)  # x-first
    origin = centre - frame @ (spacing * (size - 1) / 2.0)
    shape = tuple(int(s) for s in size[::-1])
    return Image(np.zeros(shape, dtype=np.uint8), (spacing,) * len(size), tuple(origin), frame.ravel())


def _erode(mask):
    from scipy import ndimage

    st = ndimage.generate_binary_structure(mask.ndim, 1)
    out = ndimage.binary_erosion(mask, structure=st, border_value=0)
    return out if out.any() else mask


def _normalise(img: Image, mask, dtype):
    a = np.asarray(img.numpy(), dtype=np.float64)
    sel = a[np.asarray(mask)] if mask is not None else a
    lo, hi = float(sel.min()), float(sel.max())
    if hi <= lo:
        what = " inside its mask" if mask is not None else ""
        raise ValueError(f"the image is constant{what}; there is nothing to register")
    return ((a - lo) / (hi - lo)).astype(dtype)


class _Level:
    """Per-level data: working grids, the cached fixed measure, the smoothed moving image (+ mask channel)."""

    def __init__(self, k, shrink, sigma, s0, fixed, moving, fixed_n, moving_n, fmask, mmask, frame, c_f, c_m,
                 ext_f, ext_m, opts):
        from ..kernels.smooth import gaussian
        from ..kernels.warp import warp

        backend, dtype = opts["backend"], opts["dtype"]
        n = fixed.ndim
        self.index, self.shrink, self.sigma = k, float(shrink), float(sigma)
        self.spacing = s0 * float(shrink)
        self.grid_a = _working_grid(ext_f, self.spacing, frame, c_f)
        side = float(np.max(ext_m))
        self.grid_b = _working_grid(np.full(n, side), self.spacing, frame, c_f)

        # once per level and image: the scipy reference is fast enough here and avoids a numba compile per
        # process (the numba Gaussian currently misses its on-disk cache)
        blur_backend = "cuda" if _backend_name(backend) == "cuda" else "numpy"

        def blur(img, data):
            if sigma <= 0:
                return data
            return gaussian(data, sigma, spacing=img.spacing_array_order, ndim=n, backend=blur_backend)

        # fixed: image resampled with replicate borders, mask = fixed mask ∧ interior of the domain, eroded by 1
        tot = fixed.inverse_affine @ self.grid_a.affine
        a = warp(blur(fixed, fixed_n), None, matrix=tot[:n, :n], offset=tot[:n, n], out_shape=self.grid_a.shape,
                 order=1, mode="border", backend=backend)
        fm = np.ones(fixed.shape, dtype=dtype) if fmask is None else np.asarray(fmask, dtype=dtype)
        ma = warp(fm, None, matrix=tot[:n, :n], offset=tot[:n, n], out_shape=self.grid_a.shape, order=1,
                  mode="zero", backend=backend) > 0.999
        if not ma.any():
            raise ValueError(f"the fixed mask has no voxel on the level-{k} working grid "
                             f"({self.spacing:g} mm); use smaller shrink_factors or a larger mask")
        self.a, self.a_mask = a.astype(dtype, copy=False), _erode(ma)
        self.measure = CrossSimilarityNGF(self.a, self.grid_b.shape, a_mask=self.a_mask, epsilon=opts["epsilon"],
                                          overlap=opts["overlap"], squared=opts["squared"], dtype=dtype,
                                          workers=opts["workers"], backend=backend)
        mm = np.ones(moving.shape, dtype=dtype) if mmask is None else np.asarray(mmask, dtype=dtype)
        self.moving = np.ascontiguousarray(np.stack([blur(moving, moving_n).astype(dtype), mm], axis=-1))
        self._inv_m = moving.inverse_affine
        aff_b = self.grid_b.affine
        self._lin_b, self._off_b = aff_b[:n, :n], aff_b[:n, n]
        self._c_f, self._c_m = c_f, c_m
        self._lin = self.grid_a.affine[:n, :n]
        self._delta0 = self._off_b - self.grid_a.affine[:n, n]  # o_B - o_A
        self._backend = backend

    def rotated_moving(self, r):
        """The moving image and its (eroded) mask on the moving working grid, rotated by ``r`` about the centres."""
        from ..kernels.warp import warp

        n = r.shape[0]
        inv = self._inv_m
        mat = inv[:n, :n] @ r @ self._lin_b
        off = inv[:n, :n] @ (r @ (self._off_b - self._c_f) + self._c_m) + inv[:n, n]
        w = warp(self.moving, None, matrix=mat, offset=off, out_shape=self.grid_b.shape, order=1, mode="zero",
                 backend=self._backend)
        mask = w[..., 1] > 0.999
        return w[..., 0], (_erode(mask) if mask.any() else mask)

    def evaluate(self, r):
        b, mb = self.rotated_moving(r)
        if not mb.any():
            return None
        return self.measure(b, mb)

    def translation(self, r, chi):
        """ITK translation (centre c_F) of ``T(x) = R (x - c_F) + c_M + R (o_B - o_A - L χ)``."""
        return self._c_m - self._c_f + r @ (self._delta0 - self._lin @ np.asarray(chi, dtype=float))


def _parabola_offsets(smap: SimilarityMap, index):
    """Sub-voxel offset of the peak per axis from a parabola through the peak and its two neighbours."""
    score, valid = smap.score, smap.valid
    out = np.zeros(len(index))
    for ax in range(len(index)):
        i = index[ax]
        if i == 0 or i == score.shape[ax] - 1:
            continue
        lo = list(index)
        hi = list(index)
        lo[ax] -= 1
        hi[ax] += 1
        lo, hi = tuple(lo), tuple(hi)
        if not (valid[lo] and valid[hi]):
            continue
        s_m, s_0, s_p = float(score[lo]), float(score[index]), float(score[hi])
        den = s_m - 2.0 * s_0 + s_p
        if den < 0:
            out[ax] = float(np.clip(0.5 * (s_m - s_p) / den, -0.5, 0.5))
    return out


# ================================================================================================ checks
def _check_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _positive(value, name):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _overlap(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"overlap must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0):
        raise ValueError(f"overlap (minimum overlap fraction γ) must be in (0, 1], got {value!r}")
    return v


def _seq(value, n, name, cast, *, minimum, allow_scalar=True):
    if np.ndim(value) == 0 and allow_scalar:
        value = (value,) * n
    try:
        out = tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of {n} numbers, got {value!r}") from None
    if len(out) != n:
        what = "level transition" if name in ("perturbation", "keep") else "pyramid level"
        raise ValueError(f"{name} must have {n} entries (one per {what}), got {len(out)}: {value!r}")
    for v in out:
        if not math.isfinite(v) or v < minimum:
            raise ValueError(f"{name} entries must be finite and >= {minimum}, got {value!r}")
    return out


# ================================================================================================ the solver
def register_rigid(fixed: Image, moving: Image, *, fixed_mask=None, moving_mask=None,
                   shrink_factors=PAPER_SCHEDULE["shrink_factors"], samples=PAPER_SCHEDULE["samples"],
                   perturbation=PAPER_SCHEDULE["perturbation"], keep=PAPER_SCHEDULE["keep"],
                   smoothing_sigmas=PAPER_SCHEDULE["smoothing_sigmas"], overlap: float = 0.5,
                   epsilon: float = 1e-5, squared: bool = True, max_angle: float = 180.0, spacing=None,
                   refine: bool = True, polish=(), dtype=np.float32, seed: int = 0, workers=None,
                   progress: bool = False, callback=None, backend=None) -> Result:
    """Global rigid alignment of ``moving`` to ``fixed`` by FFT cross-similarity of normalised gradient fields.

    Parameters
    ----------
    fixed, moving : Image
        2-D or 3-D scalar images in physical space (any spacing, origin and direction; different modalities).
    fixed_mask, moving_mask : Image or array, optional
        Regions that take part in the similarity (on each image's own grid).
    shrink_factors : sequence of float
        Pyramid downsampling d per level (coarsest first), relative to the working spacing. Paper: (4, 2, 2, 1).
    samples : sequence of int
        Rotations evaluated per level, a: level 1 samples them over the whole rotation space (within
        ``max_angle``), level k > 1 perturbs the ``keep[k-2]`` best of the previous level. Paper:
        (5000, 3000, 300, 0).
    perturbation : sequence of float
        Half-width u (degrees) of the uniform perturbation per Euler angle, one per level transition. Paper:
        (10, 3, 0).
    keep : sequence of int
        Number p of best candidates carried to the next level (re-evaluated unchanged there), one per level
        transition. Paper: (20, 3, 1).
    smoothing_sigmas : sequence of float
        Gaussian σ (mm) applied to both images before each level's resampling. Paper: (5, 3, 2, 1.5).
    overlap : float
        Minimum overlap fraction γ: shifts with ``N(χ) < γ max N`` are not considered. Paper: 0.5.
    epsilon : float
        NGF ε for intensities normalised to [0, 1] (each image by its min/max inside its mask). Paper: 1e-5.
    squared : bool
        Squared NGF dot product (sign-invariant, for multimodal pairs; the paper's measure) or the signed one.
    max_angle : float
        Level-1 rotations are drawn within ±``max_angle`` degrees (2-D angle; 3-D: all of SO(3) at 180, else per
        Euler angle). Default 180: no prior on the rotation.
    spacing : float, optional
        Working-grid spacing in mm at shrink 1 (default: the coarser of the two images' finest spacings).
    refine : bool
        Sub-voxel refinement of the final shift by a parabola fit through the peak of the CSNGF map.
    polish : sequence of float
        Optional local rotation refinement at the last level (not in the paper; default none): for each step
        (degrees, e.g. ``(2.0, 0.5)``) and each Euler angle, the score at ±step is fitted with a parabola and its
        vertex is evaluated; the best candidate is kept, and a step is repeated (up to 4 rounds) while it improves
        the score. Costs 2-3 evaluations per step, angle and round at the finest level — a cheap substitute for
        many random perturbations when the schedule is short.
    dtype : {numpy.float32, numpy.float64}
        Precision of the measure.
    seed : int
        Seed of the rotation sampling and perturbations (same seed ⇒ same result).
    workers : int, optional
        Threads of the FFTs (None: the numba thread count, i.e. ``NUMBA_NUM_THREADS`` or all cores).
    progress : bool
        Show a tqdm bar (one step per evaluated rotation).
    callback : callable, optional
        Receives :class:`classreg.Event` objects (one ``iteration`` per evaluated rotation, ``metric`` = its best
        CSNGF score, higher is better); raise :class:`classreg.StopRegistration` to stop and keep the best so far.
    backend : {None, "numpy", "numba", "cuda"}
        Kernel implementation of resampling, smoothing and gradients.

    Returns
    -------
    Result
        ``transform``: rigid :class:`~classreg.Affine` (fixed → moving physical points, centre = the fixed image's
        physical centre, ITK ``Euler2D/3DTransform``); ``inverse``; ``warped``; ``history`` with one row per
        evaluated rotation (level, iteration, metric = score, ``angle_*`` in degrees, ``tx, ty[, tz]`` in mm);
        ``metrics``: ``score`` (CSNGF of the result at the finest level), ``angles_deg``, ``translation``,
        ``center``, ``evaluations``, ``levels`` (per-level grid, time, best score), ``best_candidates`` (top
        candidates per level); ``extras``: every evaluation's ``scores``, ``eval_levels``, ``rotations``,
        ``translations``.

    Notes
    -----
    Per evaluated rotation: one trilinear resampling of the moving image and its mask, one NGF, ``d(d+1)/2 + 1``
    forward FFTs and two inverse FFTs on the ``n_A + n_B - 1`` grid (the fixed spectra are cached per level).
    With the paper's schedule the work is dominated by levels 1-2 (8000 rotations); see docs/solvers/rigid.md
    for measured times. The measure is invariant to contrast inversion (squared), not to non-monotone intensity
    maps that move edges.

    References
    ----------
    J. Öfverstedt, J. Lindblad, N. Sladoje, "Cross-Sim-NGF: FFT-based global rigid multimodal alignment of image
    volumes using normalized gradient fields", WBIR 2022 (eqs. 1-6). E. Haber, J. Modersitzki, "Intensity gradient
    based registration and fusion of multi-modal images", MICCAI 2006 (NGF).
    """
    t_start = time.perf_counter()
    check_pair(fixed, moving)
    n = fixed.ndim
    shrink = check_shrink_factors(shrink_factors)
    nl = len(shrink)
    sigmas = _seq(smoothing_sigmas, nl, "smoothing_sigmas", float, minimum=0.0)
    samples = _seq(samples, nl, "samples", int, minimum=0, allow_scalar=False)
    if samples[0] < 1:
        raise ValueError(f"samples[0] (rotations sampled at the first level) must be >= 1, got {samples!r}")
    perturbation = _seq(perturbation, nl - 1, "perturbation", float, minimum=0.0)
    keep = _seq(keep, nl - 1, "keep", int, minimum=1)
    overlap = _overlap(overlap)
    epsilon = _positive(epsilon, "epsilon")
    max_angle = _positive(max_angle, "max_angle")
    polish = tuple(_positive(p, "polish") for p in (np.atleast_1d(polish) if np.ndim(polish) else [polish]))
    if max_angle > 180:
        raise ValueError(f"max_angle must be in (0, 180] degrees, got {max_angle!r}")
    dtype = _check_dtype(dtype)
    fmask = as_mask(fixed_mask, fixed, "fixed_mask")
    mmask = as_mask(moving_mask, moving, "moving_mask")
    for name, m in (("fixed_mask", fmask), ("moving_mask", mmask)):
        if m is not None and not bool(np.asarray(m).any()):
            raise ValueError(f"{name} is empty; give a mask with at least one voxel inside, or None")
    s0 = max(min(fixed.spacing), min(moving.spacing)) if spacing is None else _positive(spacing, "spacing")
    if seed is None or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")

    fixed_n = _normalise(fixed, fmask, dtype)
    moving_n = _normalise(moving, mmask, dtype)
    frame = fixed.direction_matrix
    c_f, c_m = _centre(fixed), _centre(moving)
    ext_f = _extent_in_frame(fixed, frame)
    ext_m = _extent_in_frame(moving, frame)
    if workers is None:
        workers = thread_count()  # NUMBA_NUM_THREADS; small FFTs lose time to threads on busy machines
    opts = dict(backend=backend, dtype=dtype, epsilon=epsilon, overlap=overlap, squared=bool(squared),
                workers=int(workers))
    rng = np.random.default_rng(seed)
    total = samples[0] + sum(samples[k] + keep[k - 1] for k in range(1, nl)) + 12 * len(polish) * (1 if n == 2 else 3)
    prog = Progress("rigid", callback=callback, progress=progress, total=total)

    ev_scores, ev_levels, ev_rot, ev_trans = [], [], [], []
    level_info, best_lists = [], []
    best = None       # (score, rotation, translation, level index)
    final_map = None  # (SimilarityMap, peak index, level) of the best candidate at the last level
    completed = False
    stop_reason = "completed the schedule"
    converged = True
    try:
        prog.emit("start", extra={"levels": nl, "evaluations": total})
        prev = None
        for k in range(nl):
            t_level = time.perf_counter()
            level = _Level(k, shrink[k], sigmas[k], s0, fixed, moving, fixed_n, moving_n, fmask, mmask, frame,
                           c_f, c_m, ext_f, ext_m, opts)
            if k == 0:
                rots = list(sample_rotations(samples[0], n, max_angle=max_angle, seed=rng))
            else:
                top = prev[:keep[k - 1]]
                rots = [c[1] for c in top]
                for i in range(samples[k]):
                    rots.append(_perturb(top[i % len(top)][1], perturbation[k - 1], rng))
            prog.emit("level_start", level=k, extra={"shrink": shrink[k], "spacing_mm": level.spacing,
                                                     "sigma_mm": sigmas[k], "fixed_shape": level.grid_a.shape,
                                                     "moving_shape": level.grid_b.shape, "rotations": len(rots)})
            cands = []
            level_best = None

            def run(r, i, stage):
                nonlocal level_best, best, final_map
                smap = level.evaluate(r)
                if smap is None:
                    score, chi, idx = -1.0, np.zeros(n), None
                else:
                    idx = np.unravel_index(int(np.argmax(smap.score)), smap.score.shape)
                    score = float(smap.score[idx])
                    chi = level.measure.shift_of(idx)
                t = level.translation(r, chi)
                ev_scores.append(score)
                ev_levels.append(k)
                ev_rot.append(r)
                ev_trans.append(t)
                if level_best is None or score > level_best[0]:
                    level_best = (score, r, t, k)
                    if k == nl - 1 and smap is not None:
                        final_map = (smap, idx, level)
                best = level_best  # the finest level reached decides (coarser scores are not comparable)
                ang = np.rad2deg(euler_angles(r))
                extra = {f"angle_{a}": float(v) for a, v in zip(("x", "y", "z") if n == 3 else ("z",), ang)}
                extra.update({f"t{a}": float(v) for a, v in zip("xyz", t)})
                extra["stage"] = stage
                prog.emit("iteration", level=k, iteration=i, metric=score, extra=extra)
                return score, t

            for i, r in enumerate(rots):
                score, t = run(r, i, "search")
                cands.append((score, r, t, i))
            if k == nl - 1 and polish:
                it = len(rots)
                n_ang = 1 if n == 2 else 3
                for step in polish:
                    for _round in range(4):  # pattern search: repeat a step while it improves the score
                        start = level_best[0]
                        for ax in range(n_ang):
                            r0, s0_ = level_best[1], level_best[0]
                            e = np.zeros(n_ang)
                            e[ax] = np.deg2rad(step)
                            s_m, _ = run(r0 @ rotation_matrix(-e), it, "polish")
                            s_p, _ = run(r0 @ rotation_matrix(e), it + 1, "polish")
                            it += 2
                            den = s_m - 2.0 * s0_ + s_p
                            if den < 0:
                                frac = float(np.clip(0.5 * (s_m - s_p) / den, -1.0, 1.0))
                                if abs(frac) > 1e-3 and abs(abs(frac) - 1.0) > 1e-6:
                                    run(r0 @ rotation_matrix(frac * e), it, "polish")
                                    it += 1
                        if level_best[0] <= start:
                            break
            order = sorted(range(len(cands)), key=lambda j: (-cands[j][0], j))
            prev = [cands[j] for j in order]
            n_top = keep[k] if k < nl - 1 else 1
            best_lists.append([dict(level=k, score=c[0], angles_deg=np.rad2deg(euler_angles(c[1])).tolist(),
                                    translation=np.asarray(c[2]).tolist()) for c in prev[:max(n_top, 1)]])
            level_info.append(dict(level=k, shrink=shrink[k], spacing_mm=level.spacing, sigma_mm=sigmas[k],
                                   fixed_shape=list(level.grid_a.shape), moving_shape=list(level.grid_b.shape),
                                   fft_shape=list(level.measure._corr.fft_shape),
                                   evaluations=int(sum(1 for lv in ev_levels if lv == k)),
                                   best_score=level_best[0], seconds=time.perf_counter() - t_level))
            prog.emit("level_end", level=k, metric=level_best[0])
        completed = True
        prog.emit("done", metric=best[0], extra={"angles_deg": np.rad2deg(euler_angles(best[1])).tolist()})
    except StopRegistration:
        stop_reason, converged = "stopped by callback", False
    finally:
        prog.close()

    if best is None:  # stopped before any evaluation: align the centres
        r_best, t_best, score_best = np.eye(n), c_m - c_f, float("nan")
    else:
        score_best, r_best, t_best = best[0], best[1], best[2]
    refined = np.zeros(n)
    if refine and final_map is not None and completed:
        smap, idx, lev = final_map
        refined = _parabola_offsets(smap, idx)
        t_best = lev.translation(r_best, lev.measure.shift_of(idx) + refined)
    transform = Affine(r_best, t_best, c_f)
    from ..resample import resample

    warped = resample(moving, transform, reference=fixed, backend=backend)
    angles = np.rad2deg(euler_angles(r_best))
    params = dict(shrink_factors=shrink, samples=samples, perturbation=perturbation, keep=keep,
                  smoothing_sigmas=sigmas, overlap=overlap, epsilon=epsilon, squared=bool(squared),
                  max_angle=max_angle, spacing=s0, refine=bool(refine), polish=polish, dtype=str(dtype), seed=int(seed),
                  workers=workers, backend=_backend_name(backend), threads=thread_count(), versions=versions(),
                  masks={"fixed": fixed_mask is not None, "moving": moving_mask is not None},
                  center=c_f.tolist(), moving_center=c_m.tolist())
    metrics = dict(score=score_best, angles_deg=angles.tolist(), translation=np.asarray(t_best).tolist(),
                   center=c_f.tolist(), subvoxel_offset=refined.tolist(), evaluations=len(ev_scores),
                   levels=level_info, best_candidates=best_lists)
    extras = dict(scores=np.asarray(ev_scores), eval_levels=np.asarray(ev_levels, dtype=np.int64),
                  rotations=np.asarray(ev_rot).reshape(-1, n, n), translations=np.asarray(ev_trans).reshape(-1, n))
    timings = {"total": time.perf_counter() - t_start}
    for info in level_info:
        timings[f"level{info['level']}"] = info["seconds"]
    return Result(transform=transform, inverse=transform.inverse(), warped=warped, history=prog.history,
                  converged=converged, stop_reason=stop_reason, params=params, metrics=metrics, timings=timings,
                  reference=fixed, extras=extras)


def _backend_name(backend):
    from ..kernels._backend import resolve_backend

    return resolve_backend(backend)


# ================================================================================================ CLI
def _floats(text):
    return [float(v) for v in text.replace(",", " ").split()]


def _cmd_rigid(args) -> int:
    from ..io import load

    fixed = load(args.fixed, dtype=np.float32)
    moving = load(args.moving, dtype=np.float32)
    kw = dict(seed=args.seed, progress=not args.quiet, overlap=args.overlap, epsilon=args.epsilon,
              max_angle=args.max_angle, squared=not args.signed, refine=not args.no_refine)
    for name in ("shrink_factors", "samples", "perturbation", "keep", "smoothing_sigmas"):
        v = getattr(args, name)
        if v is not None:
            vals = _floats(v)
            kw[name] = [int(x) for x in vals] if name in ("samples", "keep") else vals
    if args.spacing is not None:
        kw["spacing"] = args.spacing
    if args.fixed_mask:
        kw["fixed_mask"] = load(args.fixed_mask)
    if args.moving_mask:
        kw["moving_mask"] = load(args.moving_mask)
    res = register_rigid(fixed, moving, **kw)
    out = res.save(args.output)
    m = res.metrics
    print(f"score {m['score']:.4f}; angles (deg) {np.round(m['angles_deg'], 3).tolist()}; translation (mm) "
          f"{np.round(m['translation'], 3).tolist()}; {m['evaluations']} rotations in {res.timings['total']:.1f} s; "
          f"wrote {out}")
    return 0


def add_cli(subparsers):
    """``classreg register rigid FIXED MOVING -o OUT``."""
    p = subparsers.add_parser(
        "rigid", help="global rigid (multimodal) alignment by FFT cross-similarity of normalised gradient fields",
        description="Search all rotations and shifts for the rigid transform that maximises the CSNGF similarity "
                    "(Öfverstedt et al., WBIR 2022). Writes transform.tfm (fixed -> moving, ITK), inverse.tfm, "
                    "warped.nii.gz, params.json, history.csv (one row per rotation), extras.npz and result.json "
                    "into OUT. Lists accept spaces or commas, e.g. --samples '5000,3000,300,0'.")
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--fixed-mask", help="mask image on the fixed grid")
    p.add_argument("--moving-mask", help="mask image on the moving grid")
    p.add_argument("--shrink-factors", dest="shrink_factors", help="pyramid shrink factors (default 4,2,2,1)")
    p.add_argument("--samples", help="rotations per level (default 5000,3000,300,0)")
    p.add_argument("--perturbation", help="perturbation half-widths in degrees (default 10,3,0)")
    p.add_argument("--keep", help="candidates kept per level transition (default 20,3,1)")
    p.add_argument("--smoothing-sigmas", dest="smoothing_sigmas", help="Gaussian sigma per level, mm "
                                                                          "(default 5,3,2,1.5)")
    p.add_argument("--overlap", type=float, default=0.5, help="minimum overlap fraction (default 0.5)")
    p.add_argument("--epsilon", type=float, default=1e-5, help="NGF epsilon for [0,1] intensities (default 1e-5)")
    p.add_argument("--max-angle", dest="max_angle", type=float, default=180.0,
                   help="first-level rotations within +-this many degrees (default 180)")
    p.add_argument("--spacing", type=float, help="working spacing in mm at shrink 1")
    p.add_argument("--signed", action="store_true", help="unsquared (sign-sensitive) NGF dot product")
    p.add_argument("--no-refine", dest="no_refine", action="store_true", help="no sub-voxel shift refinement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_rigid)
    return p
