"""FFT cross-correlation for exhaustive shift searches (the global rigid search of Cross-Sim-NGF [1]_).

``(a ⋆ b)(χ) = Σ_x a(x + χ) b(x)`` for every integer shift χ, summed over channel pairs, computed as one inverse real
FFT of ``Σ_k rfftn(a_k) · conj(rfftn(b_k))`` with explicit sizes (odd sizes are handled: without ``s=``, ``irfftn``
returns an even last axis, which is no longer the circular correlation of an odd-length grid).

Output indexing (``mode``):

* ``"full"`` (default): every shift with any overlap, ``χ_j = -(n_b,j - 1) .. n_a,j - 1``; output shape
  ``n_a + n_b - 1``, ``out[i] ↔ χ = i - (n_b - 1)`` (like ``scipy.signal.correlate(a, b, "full")``).
* ``"valid"``: shifts where b lies fully inside a, ``χ_j = 0 .. n_a,j - n_b,j``; ``out[i] ↔ χ = i``.
* ``"circular"``: circular correlation on the grid ``out_shape`` (a and b zero-padded at the end of each axis),
  ``out[i] ↔ χ ≡ i (mod out_shape)`` -- the convention of the Cross-Sim-NGF reference code (MIDA-group/cross_sim_ngf).

:func:`correlation_shifts` returns the χ of each output index per axis. The numpy backend uses :mod:`scipy.fft`
(``workers``), CuPy arrays use :mod:`cupy.fft`; there are no per-voxel kernels here, so ``"numba"`` and ``"numpy"`` run
the same code.

References
----------
.. [1] J. Öfverstedt, J. Lindblad, N. Sladoje, "Cross-Sim-NGF: FFT-based global rigid multimodal alignment of image
   volumes using normalized gradient fields", WBIR 2022 (arXiv:2110.10156).
"""
from __future__ import annotations

import numpy as np

from . import _backend
from .smooth import _as_real_array, _result_dtype

__all__ = ["CachedCorrelator", "correlation_shifts", "cross_correlate"]

_CORR_MODES = ("full", "valid", "circular")


def _channels(x, name):
    """A list of arrays from a list/tuple of arrays or a single array (= one channel)."""
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name} must contain at least one array")
        return list(x)
    if isinstance(x, np.ndarray) or _backend.is_cupy_array(x):
        return [x]
    raise TypeError(f"{name} must be an array or a list/tuple of arrays, got {type(x).__name__}")


def _shape_tuple(shape, name):
    try:
        out = tuple(int(n) for n in shape)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {shape!r}") from None
    if any(n < 1 for n in out):
        raise ValueError(f"{name} must have positive entries, got {shape!r}")
    return out


def _plan(a_shape, b_shape, mode, out_shape):
    """(fft_shape, output shape, per-axis index arrays into the circular result or None)."""
    from scipy.fft import next_fast_len

    if mode not in _CORR_MODES:
        raise ValueError(f"mode must be one of {_CORR_MODES}, got {mode!r}")
    if len(a_shape) != len(b_shape):
        raise ValueError(f"a and b must have the same number of dimensions, got {a_shape} and {b_shape}")
    if mode != "circular" and out_shape is not None:
        raise ValueError("out_shape is only used with mode='circular'")
    if mode == "full":
        fshape = tuple(next_fast_len(na + nb - 1, real=True) for na, nb in zip(a_shape, b_shape))
        oshape = tuple(na + nb - 1 for na, nb in zip(a_shape, b_shape))
        take = [(np.arange(no) - (nb - 1)) % nf for no, nb, nf in zip(oshape, b_shape, fshape)]
        return fshape, oshape, take
    if mode == "valid":
        if any(nb > na for na, nb in zip(a_shape, b_shape)):
            raise ValueError(f"mode='valid' needs b no larger than a on every axis, got a {a_shape}, b {b_shape}")
        # circular correlation on N >= n_a is wrap-free for χ in [0, n_a - n_b]
        fshape = tuple(next_fast_len(na, real=True) for na in a_shape)
        oshape = tuple(na - nb + 1 for na, nb in zip(a_shape, b_shape))
        return fshape, oshape, None
    if out_shape is None:
        out_shape = tuple(max(na, nb) for na, nb in zip(a_shape, b_shape))
    out_shape = _shape_tuple(out_shape, "out_shape")
    if len(out_shape) != len(a_shape) or any(n < max(na, nb) for n, na, nb in zip(out_shape, a_shape, b_shape)):
        raise ValueError(f"out_shape {out_shape} must be at least as large as a {a_shape} and b {b_shape} per axis")
    return out_shape, out_shape, None


def correlation_shifts(a_shape, b_shape, *, mode="full", out_shape=None):
    """Shift χ_j of every output index along each axis, for :func:`cross_correlate` with the same arguments.

    Returns
    -------
    tuple of 1-D int ndarray
        ``shifts[j][i]`` is the shift along axis j of output index i (``"circular"``: the representative
        ``0 .. out_shape_j - 1`` of χ mod out_shape_j).
    """
    a_shape = _shape_tuple(a_shape, "a_shape")
    b_shape = _shape_tuple(b_shape, "b_shape")
    _, oshape, _ = _plan(a_shape, b_shape, mode, out_shape)
    if mode == "full":
        return tuple(np.arange(no) - (nb - 1) for no, nb in zip(oshape, b_shape))
    return tuple(np.arange(no) for no in oshape)


class CachedCorrelator:
    """Cross-correlation of fixed channels ``a_k`` with many ``b`` (one rfftn per ``b_k`` and one irfftn per call).

    The Cross-Sim-NGF rigid search (Öfverstedt et al., WBIR 2022) correlates thousands of rotated B against one
    reference A: the spectra ``rfftn(a_k, s=fft_shape)`` are computed once here.

    Parameters
    ----------
    a : array or sequence of arrays
        Fixed channels (equal shapes; 1-D to 3-D); a single array is one channel.
    b_shape : tuple of int
        Shape of every ``b_k`` that will be correlated.
    mode : {"full", "valid", "circular"}, optional
        Output indexing, see the module docstring and :func:`correlation_shifts`.
    out_shape : tuple of int, optional
        Grid of the circular correlation (``mode="circular"`` only; default the larger of both shapes).
    workers : int, optional
        Threads for :mod:`scipy.fft` (None: all cores); FFT grids under
        :data:`classreg.kernels._backend.FFT_PARALLEL_MIN` elements use one. Ignored for CuPy arrays.
    backend : {None, "numpy", "numba", "cuda"}, optional
        Validated and recorded; the array module follows the arrays (CuPy -> cupy.fft).

    Attributes
    ----------
    fft_shape, shape, shifts
        FFT grid (2,3,5-smooth for "full"/"valid"), output shape, and :func:`correlation_shifts`.
    """

    def __init__(self, a, b_shape, *, mode="full", out_shape=None, workers=None, backend=None):
        chans = _channels(a, "a")
        self.backend = _backend.resolve_backend(backend, *chans)
        xp = _backend.get_array_module(*chans)
        chans = [_as_real_array(c, f"a[{k}]", xp) for k, c in enumerate(chans)]
        shp = chans[0].shape
        if not 1 <= len(shp) <= 3:
            raise ValueError(f"a must be 1-D to 3-D, got shape {shp}")
        for k, c in enumerate(chans):
            if c.shape != shp:
                raise ValueError(f"all a channels must have the same shape, a[0] {shp} vs a[{k}] {c.shape}")
        self.a_shape = shp
        self.b_shape = _shape_tuple(b_shape, "b_shape")
        self.mode = mode
        self.fft_shape, self.shape, self._take = _plan(shp, self.b_shape, mode, out_shape)
        self.shifts = correlation_shifts(shp, self.b_shape, mode=mode, out_shape=out_shape)
        self.n_channels = len(chans)
        self.dtype = _result_dtype(*chans)
        self._xp = xp
        # small FFTs (the coarse levels of a search) run on one thread: see _backend.FFT_PARALLEL_MIN
        self._workers = _backend.fft_workers(int(np.prod(self.fft_shape)), workers)
        self._spectra = [self._rfftn(c.astype(self.dtype, copy=False)) for c in chans]
        if xp is not np and self._take is not None:  # the same indices, built on the device (no upload)
            self._take = [(xp.arange(no) - (nb - 1)) % nf
                          for no, nb, nf in zip(self.shape, self.b_shape, self.fft_shape)]

    def _rfftn(self, x):
        axes = tuple(range(len(self.fft_shape)))
        if self._xp is np:
            import scipy.fft as sfft

            return sfft.rfftn(x, s=self.fft_shape, axes=axes, workers=self._workers)
        return self._xp.fft.rfftn(x, s=self.fft_shape, axes=axes)

    def _irfftn(self, f):
        axes = tuple(range(len(self.fft_shape)))
        if self._xp is np:
            import scipy.fft as sfft

            return sfft.irfftn(f, s=self.fft_shape, axes=axes, workers=self._workers)
        return self._xp.fft.irfftn(f, s=self.fft_shape, axes=axes)

    def correlate(self, b):
        """``Σ_k (a_k ⋆ b_k)`` for all shifts of this correlator's mode; ``b`` has as many channels as ``a``.

        Returns an array of shape :attr:`shape` (float32 unless every a and b channel is float64).
        """
        chans = _channels(b, "b")
        if len(chans) != self.n_channels:
            raise ValueError(f"b must have {self.n_channels} channels (as many as a), got {len(chans)}")
        xp = self._xp
        if _backend.get_array_module(*chans) is not xp:
            raise TypeError("a and b must both be numpy arrays or both CuPy arrays")
        chans = [_as_real_array(c, f"b[{k}]", xp) for k, c in enumerate(chans)]
        for k, c in enumerate(chans):
            if c.shape != self.b_shape:
                raise ValueError(f"b[{k}] must have shape {self.b_shape}, got {c.shape}")
        dtype = self.dtype if all(c.dtype == np.float64 for c in chans) else np.dtype(np.float32)
        acc = None
        for fa, c in zip(self._spectra, chans):
            fb = self._rfftn(c.astype(dtype, copy=False))
            if fa.dtype != fb.dtype:
                fa = fa.astype(fb.dtype)
            prod = fa * xp.conj(fb)
            if acc is None:
                acc = prod
            else:
                acc += prod
        out = self._irfftn(acc)
        if self._take is not None:
            for ax, idx in enumerate(self._take):
                out = xp.take(out, idx, axis=ax)
        else:
            out = out[tuple(slice(0, n) for n in self.shape)]
        return xp.ascontiguousarray(out, dtype=dtype)

    __call__ = correlate


def cross_correlate(a, b, *, mode="full", out_shape=None, workers=None, backend=None):
    """Summed cross-correlation ``C(χ) = Σ_k Σ_x a_k(x + χ) b_k(x)`` for all integer shifts.

    Parameters
    ----------
    a, b : array or sequence of arrays
        Channel pairs ``(a_k, b_k)``: equally many arrays, all ``a_k`` of one shape and all ``b_k`` of one shape
        (1-D to 3-D, any sizes, odd included). A single array counts as one channel.
    mode : {"full", "valid", "circular"}, optional
        ``"full"``: linear correlation, shifts ``-(n_b - 1) .. n_a - 1``, ``out[i] ↔ χ = i - (n_b - 1)``;
        ``"valid"``: shifts with b fully inside a, ``out[i] ↔ χ = i``; ``"circular"``: periodic on ``out_shape``.
        :func:`correlation_shifts` gives the shift of every output index.
    out_shape : tuple of int, optional
        Circular grid for ``mode="circular"``.
    workers : int, optional
        :mod:`scipy.fft` threads (None: all cores).
    backend : {None, "numpy", "numba", "cuda"}, optional
        Validated; the array module follows the arrays.

    Returns
    -------
    ndarray
        The correlation map (float32 unless every input is float64).

    Notes
    -----
    One forward rfftn per channel and a single irfftn of the summed products ``rfftn(a_k) · conj(rfftn(b_k))``,
    zero-padded to 2,3,5-smooth sizes (``scipy.fft.next_fast_len``) at least ``n_a + n_b - 1`` ("full") or
    ``n_a`` ("valid"), so the result is the linear, not circular, correlation. Use :class:`CachedCorrelator` when
    ``a`` is fixed and ``b`` varies.
    """
    bch = _channels(b, "b")
    b_shape = tuple(bch[0].shape)
    return CachedCorrelator(a, b_shape, mode=mode, out_shape=out_shape, workers=workers, backend=backend).correlate(bch)
