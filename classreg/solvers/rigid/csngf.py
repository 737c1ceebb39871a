"""The CSNGF measure: squared dot product of normalised gradient fields, for every integer shift at once by FFT.

For a fixed image A and a moving image B (both on working grids of the same spacing) with masks M_A, M_B
(Öfverstedt, Lindblad, Sladoje, WBIR 2022, eqs. 1-6)::

    n(x; A)   = ∇A / sqrt(|∇A|² + ε²)                      (normalised gradient field, Haber & Modersitzki 2006)
    CSNGF(χ)  = (1/N(χ)) Σ_x M_A(x + χ) M_B(x) <n(x + χ; A), n(x; B)>²,     N(χ) = (M_A ⋆ M_B)(χ)

The square expands into ``d(d+1)/2`` separable channel products (six in 3-D, three in 2-D): ``n_i(A)² n_i(B)²`` and
``2 n_i(A) n_j(A) · n_i(B) n_j(B)`` (i < j). Their cross-correlations are summed in the Fourier domain and brought
back with one inverse FFT (:class:`classreg.kernels.fft.CachedCorrelator`, fixed spectra cached, explicit output
sizes); a second correlator gives the overlap count ``N``. Shifts whose overlap is below ``overlap · max N`` get the
score -1. :func:`csngf_direct` is the loop-over-shifts reference.

The gradient field here is a vector field (:func:`normalised_gradient_field`); the NGF *similarity measure* of a
deformable registration is :class:`classreg.terms.NGF`.

References
----------
J. Öfverstedt, J. Lindblad, N. Sladoje, "Cross-Sim-NGF: FFT-based global rigid multimodal alignment of image volumes
using normalized gradient fields", WBIR 2022 (arXiv:2110.10156). E. Haber, J. Modersitzki, "Intensity gradient based
registration and fusion of multi-modal images", MICCAI 2006, LNCS 4191:726-733, doi:10.1007/11866763_89.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...backend import thread_count
from ...kernels._backend import get_array_module
from .options import OPTIONS

__all__ = ["CrossSimilarityNGF", "SimilarityMap", "csngf_direct", "normalised_gradient_field"]


def normalised_gradient_field(image, *, epsilon: float = 1e-5, backend=None):
    """Normalised gradient field ``∇A / sqrt(|∇A|² + ε²)`` of a 2-D/3-D array, in voxel units.

    Central differences ``(f(x+1) - f(x-1))/2`` inside, one-sided at the array border
    (:func:`classreg.kernels.diff.gradient` with unit spacing). ``ε`` is relative to intensities in [0, 1]
    (paper default 1e-5). Returns ``(*shape, ndim)`` with components along the array axes.
    """
    from ...kernels.diff import gradient

    g = gradient(image, spacing=1.0, backend=backend)
    xp = get_array_module(g)
    norm = xp.sqrt(xp.sum(g * g, axis=-1, keepdims=True) + g.dtype.type(epsilon) ** 2)
    return g / norm


def _channels(n, squared: bool, fixed_side: bool):
    """The separable channels of ``<n_A, n_B>²`` (or ``<n_A, n_B>`` when not squared) for one side."""
    d = n.shape[-1]
    if not squared:
        return [get_array_module(n).ascontiguousarray(n[..., i]) for i in range(d)]
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


def _as_mask_array(mask, shape, dtype, name, xp=np):
    if mask is None:
        return xp.ones(shape, dtype=dtype)
    m = xp.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} has shape {m.shape}, expected {tuple(shape)}")
    return (m != 0).astype(dtype)


def _check_array(a, name):
    """``a`` as an array of its module (CuPy data stay on their device; the finiteness check reads one scalar)."""
    xp = get_array_module(a)
    a = xp.asarray(a)
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D or 3-D array, got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if not xp.all(xp.isfinite(a)):
        raise ValueError(f"{name} contains NaN or Inf; fill or mask those voxels first")
    return a


def _check_measure(who, **values):
    """``epsilon``, ``overlap``, ``dtype`` checked against register_rigid's declaration (same ranges)."""
    for name, value in values.items():
        OPTIONS[name].check(value, who)


class CrossSimilarityNGF:
    """CSNGF of one fixed image ``a`` against many moving images ``b`` for all integer shifts.

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
        NGF ε (intensity units; 1e-5 for [0, 1] data as in the paper), > 0.
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
        from ...kernels.fft import CachedCorrelator

        a = _check_array(a, "a")
        _check_measure("CrossSimilarityNGF", epsilon=epsilon, overlap=overlap, dtype=dtype)
        self.dtype = np.dtype(dtype)
        self.epsilon = float(epsilon)
        self.overlap = float(overlap)
        self.squared = bool(squared)
        self.backend = backend
        b_shape = tuple(int(s) for s in b_shape)
        if len(b_shape) != a.ndim:
            raise ValueError(f"b_shape {b_shape} must have as many axes as a {a.shape}")
        workers = thread_count() if workers is None else int(workers)
        ma = _as_mask_array(a_mask, a.shape, self.dtype, "a_mask", get_array_module(a))
        if not ma.any():
            raise ValueError("a_mask is empty; give a mask with at least one voxel inside")
        na = normalised_gradient_field(a.astype(self.dtype, copy=False), epsilon=self.epsilon,
                                       backend=backend) * ma[..., None]
        self._corr = CachedCorrelator(_channels(na, self.squared, True), b_shape, mode="full", workers=workers)
        self._mcorr = CachedCorrelator(ma, b_shape, mode="full", workers=workers)
        self.a_shape = a.shape
        self.b_shape = b_shape
        self.shape = self._corr.shape
        self.shifts = self._corr.shifts

    @property
    def fft_shape(self) -> tuple:
        """Shape of the FFT grid (``n_A + n_B - 1`` rounded up to a fast size)."""
        return tuple(self._corr.fft_shape)

    def __call__(self, b, b_mask=None) -> SimilarityMap:
        """:class:`SimilarityMap` of ``b`` (masked by ``b_mask``) for every shift."""
        b = _check_array(b, "b")
        if b.shape != self.b_shape:
            raise ValueError(f"b must have shape {self.b_shape}, got {b.shape}")
        xp = get_array_module(b)
        mb = _as_mask_array(b_mask, b.shape, self.dtype, "b_mask", xp)
        nb = normalised_gradient_field(b.astype(self.dtype, copy=False), epsilon=self.epsilon,
                                       backend=self.backend) * mb[..., None]
        c = self._corr(_channels(nb, self.squared, False))
        count = xp.rint(self._mcorr(mb))
        valid = count >= _overlap_threshold(count, self.overlap)
        score = c / xp.maximum(count, 1e-7)
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
    _check_measure("csngf_direct", epsilon=epsilon, overlap=overlap)
    ma = _as_mask_array(a_mask, a.shape, np.float64, "a_mask")
    mb = _as_mask_array(b_mask, b.shape, np.float64, "b_mask")
    na = normalised_gradient_field(a, epsilon=epsilon, backend="numpy") * ma[..., None]
    nb = normalised_gradient_field(b, epsilon=epsilon, backend="numpy") * mb[..., None]
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
    valid = count >= _overlap_threshold(count, float(overlap))
    score = s / np.maximum(count, 1e-7)
    score[~valid] = -1.0
    return SimilarityMap(score, count, valid)
