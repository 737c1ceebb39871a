"""Gaussian smoothing and Fourier-domain smoothing operators.

* :func:`gaussian` -- separable, truncated, unit-sum Gaussian FIR filter; the ``"numpy"`` reference *is*
  :func:`scipy.ndimage.gaussian_filter` (same radius rule ``r = int(truncate * sigma_vox + 0.5)``, same boundary
  modes), the ``"numba"`` path is a cache-friendly parallel separable FIR, the ``"cuda"`` path one numba.cuda thread
  per output sample.
* :class:`FourierOperator` with its builders :func:`gaussian_kernel_operator` and :func:`sobolev_operator` -- the
  smoothing kernel K of LDDMM (Gaussian RKHS or ``(Id - alpha Delta)^-s``) applied by real FFT.

All lengths (``sigma``, ``spacing``, ``alpha`` through the Laplacian) are in the units of ``spacing`` (physical units,
normally mm); ``spacing=1`` means voxel units.
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from . import _backend

__all__ = [
    "FourierOperator",
    "gaussian",
    "gaussian_kernel_operator",
    "gaussian_weights",
    "sobolev_operator",
]

_MODES = {"nearest": 0, "reflect": 1, "constant": 2}


# ----------------------------------------------------------------------------------------------------------------
# shared argument helpers (also used by kernels.fft and kernels.diff)
# ----------------------------------------------------------------------------------------------------------------
def _result_dtype(*arrays):
    """float64 if every array is float64, float32 otherwise (float32 -> float32, other -> float32)."""
    dts = [a.dtype for a in arrays]
    if dts and all(dt == np.float64 for dt in dts):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _as_real_array(a, name, xp=None):
    """Check ``a`` is a real numeric array (numpy or cupy) and return it with dtype float32/float64 (no copy when
    it already has one; the caller never writes into the result)."""
    if xp is None:
        xp = _backend.get_array_module(a)
    if not (isinstance(a, np.ndarray) or _backend.is_cupy_array(a)):
        a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    dt = np.dtype(np.float64) if a.dtype == np.float64 else np.dtype(np.float32)
    return xp.asarray(a, dtype=dt)


def _per_axis(value, ndim, name, *, positive=True, allow_zero=False):
    """Broadcast a scalar or check a length-``ndim`` sequence of finite numbers; returns a tuple of floats."""
    if isinstance(value, numbers.Real) or (np.ndim(value) == 0 and not isinstance(value, (str, bytes))):
        vals = (float(value),) * ndim
    else:
        vals = tuple(float(v) for v in value)
        if len(vals) != ndim:
            raise ValueError(f"{name} must be a scalar or have {ndim} entries (one per spatial axis), got {len(vals)}")
    for v in vals:
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if positive and (v < 0 or (v == 0 and not allow_zero)):
            kind = "non-negative" if allow_zero else "positive"
            raise ValueError(f"{name} must be {kind}, got {value!r}")
    return vals


def _spacing(spacing, ndim):
    return _per_axis(spacing, ndim, "spacing")


def _check_ndim(ndim, a, name="a", *, allowed=(1, 2, 3)):
    if ndim is None:
        ndim = a.ndim
    if not isinstance(ndim, numbers.Integral) or not 1 <= ndim <= a.ndim:
        raise ValueError(f"ndim must be an integer in [1, {name}.ndim={a.ndim}], got {ndim!r}")
    ndim = int(ndim)
    if allowed is not None and ndim not in allowed:
        raise ValueError(f"{name} must have {allowed} spatial dimensions, got ndim={ndim}")
    return ndim


# ----------------------------------------------------------------------------------------------------------------
# Gaussian FIR
# ----------------------------------------------------------------------------------------------------------------
def gaussian_weights(sigma_vox, truncate=4.0):
    """Normalised 1-D Gaussian taps ``w[-r..r]`` (float64), exactly as :func:`scipy.ndimage.gaussian_filter1d`.

    ``r = int(truncate * sigma_vox + 0.5)``, ``w_t = exp(-t^2 / (2 sigma_vox^2)) / sum``; unit sum.
    """
    sd = float(sigma_vox)
    r = int(truncate * sd + 0.5)
    x = np.arange(-r, r + 1)
    phi = np.exp(-0.5 / (sd * sd) * x**2)
    return phi / phi.sum()


def _boundary_index(j, n, mode):
    """Index of sample ``j`` (may lie outside ``[0, n)``) after the boundary rule; -1 means "zero" (constant mode).

    mode 0 = nearest (``aaa|abcd|ddd``), 1 = reflect (``dcba|abcd|dcba``, any distance), 2 = constant 0.
    Shared scalar body of the numba CPU and numba.cuda paths.
    """
    if 0 <= j < n:
        return j
    if mode == 0:
        if j < 0:
            return 0
        return n - 1
    if mode == 1:
        p = 2 * n
        j = j % p
        if j < 0:
            j += p
        if j >= n:
            j = p - 1 - j
        return j
    return -1


def _fir_at(src, o, x, c, w, r, mode):
    """One output sample of the symmetric FIR ``sum_t w[r+t] src[o, x+t, c]`` on a (outer, n, inner) view.

    Scalar body of the numba.cuda path (the CPU path vectorises the same sum over contiguous rows instead)."""
    n = src.shape[1]
    acc = w[r] * src[o, x, c]
    for t in range(1, r + 1):
        jm = _boundary_index(x - t, n, mode)
        jp = _boundary_index(x + t, n, mode)
        if jm >= 0 and jp >= 0:
            acc += w[r + t] * (src[o, jm, c] + src[o, jp, c])
        elif jm >= 0:
            acc += w[r + t] * src[o, jm, c]
        elif jp >= 0:
            acc += w[r + t] * src[o, jp, c]
    return acc


def _rebind(fn, _suffix="", **deps):
    """Copy of the plain-Python body ``fn`` whose global names ``deps`` point at compiled versions.

    This is how one scalar body is compiled for both targets: ``njit(_rebind(body, helper=njit(helper)))`` and
    ``cuda.jit(device=True)(_rebind(body, helper=<device helper>))``. numba's on-disk cache is keyed by qualified
    name and line, not by globals: copies of one template bound to *different* helpers must get distinct
    ``_suffix`` values (appended to ``__qualname__``) or they would share cache entries.
    """
    return _backend.rebind(fn, {**fn.__globals__, **deps}, _suffix)


def _cuda_device(fn, **deps):
    """``numba.cuda.jit(device=True)`` of the scalar body ``fn`` with its helper names rebound to ``deps``."""
    from numba import cuda

    return _backend.cuda_jit(_rebind(fn, _backend.variant_suffix(deps), cuda=cuda, **deps), device=True)


def _numba_compile(fn, _suffix="", parallel=False, inline="never", **deps):
    """``_backend.njit`` (cache=True) of ``fn`` with helper names rebound to the compiled ``deps``."""
    return _backend.njit(parallel=parallel, inline=inline)(_rebind(fn, _suffix, **deps))


def _cuda_kernel(fn, **deps):
    """``numba.cuda.jit`` of the module-level kernel template ``fn`` (global ``cuda`` bound to numba.cuda, which the
    simulator swaps for its fake module; helper names rebound to the device functions in ``deps``)."""
    from numba import cuda

    return _backend.cuda_jit(_rebind(fn, _backend.variant_suffix(deps), cuda=cuda, **deps))


# Templates of the numba CPU passes: module-level functions (numba caches them on disk; a closure over compiled
# helpers would get a new cache key in every process). `prange` and `_bidx` are rebound when compiling.
prange = range
_bidx = None


def _gauss_rows(src, dst, w, mode, n, inner, blk):
    # filter along axis 1 of an (outer, n, inner) array seen as 2-D (outer, n * inner) rows, for small `inner`
    # (inner = 1: the contiguous last axis). Each row is copied into a padded buffer (so the pass may run in
    # place), then all taps run over contiguous slices of the flattened row; blocks of rows per thread.
    nrows = src.shape[0]
    r = w.shape[0] // 2
    m = n * inner
    nblk = (nrows + blk - 1) // blk
    for b in prange(nblk):
        buf = np.empty((n + 2 * r) * inner, dtype=src.dtype)
        for row in range(b * blk, min(nrows, b * blk + blk)):
            s = src[row]
            bc = buf[r * inner : r * inner + m]
            for x in range(m):  # interior: one contiguous copy
                bc[x] = s[x]
            for t in range(r):  # the 2r boundary samples
                jl = _bidx(t - r, n, mode)
                jr = _bidx(n + t, n, mode)
                bl = buf[t * inner : (t + 1) * inner]
                br = buf[(n + r + t) * inner : (n + r + t + 1) * inner]
                for c in range(inner):
                    bl[c] = s[jl * inner + c] if jl >= 0 else 0
                    br[c] = s[jr * inner + c] if jr >= 0 else 0
            d = dst[row]
            w0 = w[r]
            bc = buf[r * inner : r * inner + m]
            for x in range(m):
                d[x] = w0 * bc[x]
            for t in range(1, r + 1):
                wt = w[r + t]
                # slices keep every loop index provably >= 0, so LLVM vectorises (no wraparound checks)
                bm = buf[(r - t) * inner : (r - t) * inner + m]
                bp = buf[(r + t) * inner : (r + t) * inner + m]
                for x in range(m):
                    d[x] += wt * (bm[x] + bp[x])



def _gauss_cols(src, dst, w, mode, cw):
    # filter along axis 1 of a 3-D (outer, n, inner) view with large `inner`: each task gathers an (n + 2r, cw)
    # column block (boundary rows included) into a contiguous buffer -- this avoids the cache-set conflicts of
    # reading 2r + 1 rows that are a large power-of-two-ish stride apart -- then filters it row by row.
    nout, n, inner = src.shape
    r = w.shape[0] // 2
    nch = (inner + cw - 1) // cw
    for task in prange(nout * nch):
        o = task // nch
        c0 = (task - o * nch) * cw
        c1 = min(inner, c0 + cw)
        m = c1 - c0
        buf = np.empty((n + 2 * r, m), dtype=src.dtype)
        for t in range(n + 2 * r):
            j = _bidx(t - r, n, mode)
            bt = buf[t]
            if j >= 0:
                sj = src[o, j, c0:c1]
                for c in range(m):
                    bt[c] = sj[c]
            else:
                for c in range(m):
                    bt[c] = 0
        w0 = w[r]
        for x in range(n):
            d = dst[o, x, c0:c1]
            b0 = buf[x + r]
            for c in range(m):
                d[c] = w0 * b0[c]
            for t in range(1, r + 1):
                wt = w[r + t]
                bm = buf[x + r - t]
                bp = buf[x + r + t]
                for c in range(m):
                    d[c] += wt * (bm[c] + bp[c])



@functools.cache
def _numba_gaussian():
    import numba

    bidx = _backend.njit(inline="always")(_boundary_index)
    rows = _numba_compile(_gauss_rows, parallel=True, prange=numba.prange, _bidx=bidx)
    cols = _numba_compile(_gauss_cols, parallel=True, prange=numba.prange, _bidx=bidx)
    return rows, cols


def _gauss_lines_kernel(src, dst, w, mode):
    """numba.cuda kernel template: one thread per output sample of a (outer, n, inner) view."""
    nout, n, inner = src.shape
    i = cuda.grid(1)
    if i < nout * n * inner:
        o = i // (n * inner)
        rem = i - o * n * inner
        x = rem // inner
        c = rem - x * inner
        dst[o, x, c] = _fir_at(src, o, x, c, w, w.shape[0] // 2, mode)


@functools.cache
def _cuda_gaussian():
    dev = _cuda_device
    fir = dev(_fir_at, _boundary_index=dev(_boundary_index))
    return _cuda_kernel(_gauss_lines_kernel, _fir_at=fir)


def _gaussian_numpy(a, sig_vox, truncate, mode):
    from scipy import ndimage

    return ndimage.gaussian_filter(a, sigma=sig_vox, truncate=truncate, mode=mode, cval=0.0, output=a.dtype)


def _passes(a, sig_vox, truncate):
    """(axis, weights) for the axes that are filtered, in scipy's order (0, 1, 2, ...)."""
    out = []
    for ax, s in enumerate(sig_vox):
        if s > 1e-15:
            out.append((ax, gaussian_weights(s, truncate)))
    return out


def _gaussian_numba(a, sig_vox, truncate, mode):
    """Separable passes in scipy's axis order (0, 1, 2, ...). Both kernels copy what a task reads into a per-thread
    buffer before writing it, so only the first pass (which reads ``a``) is out of place: one array is allocated."""
    rows, cols = _numba_gaussian()
    passes = _passes(a, sig_vox, truncate)
    if not passes or a.size == 0:
        return a.copy()
    src = np.ascontiguousarray(a)
    out = np.empty_like(src)
    m = _MODES[mode]
    for ax, w in passes:
        w = w.astype(src.dtype)
        n = src.shape[ax]
        outer = int(np.prod(src.shape[:ax], dtype=np.int64))
        inner = int(np.prod(src.shape[ax + 1 :], dtype=np.int64))
        if inner <= 16:
            blk = max(1, min(16, 4096 // (n * inner)))
            rows(src.reshape(outer, n * inner), out.reshape(outer, n * inner), w, m, n, inner, blk)
        else:
            cols(src.reshape(outer, n, inner), out.reshape(outer, n, inner), w, m, 256)
        src = out
    return out


@functools.lru_cache(maxsize=64)
def _device_taps(xp, device, sig_vox, truncate, dtype):
    """The taps of :func:`gaussian_weights` on the GPU ``device`` of ``xp``, uploaded once per (σ, dtype): a solver
    smooths with a few σs many times, and every upload would be a synchronising host-to-device copy."""
    return xp.asarray(gaussian_weights(sig_vox, truncate).astype(dtype))


def _gaussian_cuda(a, sig_vox, truncate, mode):
    xp = _backend.get_array_module(a)
    lines = _cuda_gaussian()
    passes = _passes(a, sig_vox, truncate)
    if not passes or a.size == 0:
        return a.copy()
    src = xp.ascontiguousarray(a)
    m = _MODES[mode]
    device = xp.cuda.Device().id if xp is not np else None
    for ax, w in passes:
        dst = xp.empty_like(src)
        n = src.shape[ax]
        outer = int(np.prod(src.shape[:ax], dtype=np.int64))
        inner = int(np.prod(src.shape[ax + 1 :], dtype=np.int64))
        wd = w.astype(src.dtype) if xp is np else _device_taps(xp, device, float(sig_vox[ax]), truncate,
                                                                 src.dtype.str)
        _backend.launch(lines, src.size, src.reshape(outer, n, inner), dst.reshape(outer, n, inner), wd, m)
        src = dst
    return src


def gaussian(a, sigma, *, spacing=1.0, ndim=None, truncate=4.0, mode="nearest", backend=None):
    """Separable truncated Gaussian filter (also the Gaussian RKHS kernel K of LDDMM in spatial form).

    Parameters
    ----------
    a : array_like, shape ``(*spatial, *channels)``
        Scalar image or channels-last field (e.g. ``(*spatial, 3)``); only the leading ``ndim`` axes are smoothed.
    sigma : float or sequence of float
        Standard deviation per spatial axis, in the units of ``spacing`` (``sigma_vox = sigma / h``). An axis with
        sigma 0 is not filtered.
    spacing : float or sequence of float, optional
        Grid spacing per spatial axis (array-axis order); 1 means sigma is in voxels.
    ndim : int, optional
        Number of leading spatial axes (default ``a.ndim``: a scalar image); trailing axes are channels.
    truncate : float, optional
        Kernel radius ``r = int(truncate * sigma_vox + 0.5)`` taps, as in :func:`scipy.ndimage.gaussian_filter`.
    mode : {"nearest", "reflect", "constant"}, optional
        Boundary extension with scipy.ndimage's meaning (``"constant"`` extends with 0).
    backend : {None, "numpy", "numba", "cuda"}, optional
        ``"numpy"`` calls :func:`scipy.ndimage.gaussian_filter` (the reference); ``"numba"`` is a parallel
        separable FIR exploiting the kernel symmetry, each task staging its rows (last axis) or column blocks
        (other axes) in a padded contiguous buffer so every tap is a vectorised contiguous loop; float32 data are
        accumulated in float32, so it agrees with the reference to ~1e-6 relative, and the result does not depend
        on the thread count. ``"cuda"`` runs one numba.cuda thread per output sample and pass (CuPy arrays).

    Returns
    -------
    ndarray
        Same shape as ``a``; float32 unless ``a`` is float64. The taps are normalised to unit sum, so constants are
        preserved by every mode except ``"constant"``.
    """
    b = _backend.resolve_backend(backend, a)
    xp = _backend.get_array_module(a)
    a = _as_real_array(a, "a", xp)
    nd = _check_ndim(ndim, a, allowed=None)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
    if not (isinstance(truncate, numbers.Real) and truncate > 0):
        raise ValueError(f"truncate must be a positive number, got {truncate!r}")
    sig = _per_axis(sigma, nd, "sigma", allow_zero=True)
    h = _spacing(spacing, nd)
    sig_vox = tuple(s / hh for s, hh in zip(sig, h)) + (0.0,) * (a.ndim - nd)
    if b == "numpy":
        return _gaussian_numpy(a, sig_vox, truncate, mode)
    if b == "numba":
        return _gaussian_numba(a, sig_vox, truncate, mode)
    return _gaussian_cuda(a, sig_vox, truncate, mode)


# ----------------------------------------------------------------------------------------------------------------
# Fourier-domain operators
# ----------------------------------------------------------------------------------------------------------------
class FourierOperator:
    """A real, symmetric Fourier multiplier ``K`` on a (possibly zero-padded) periodic grid.

    ``apply(v)`` = crop( irfftn( K̂ · rfftn(v, s=fft_shape) ) ), ``apply_inverse(m)`` likewise with the inverse
    symbol. Build it with :func:`gaussian_kernel_operator` or :func:`sobolev_operator`.

    Attributes
    ----------
    shape : tuple of int
        Spatial shape of the fields it acts on.
    fft_shape : tuple of int
        Grid of the FFT (``shape`` when ``pad=False``, i.e. periodic; larger when zero-padded).
    symbol, inverse_symbol : ndarray
        Real half-spectrum multipliers, shape ``fft_shape[:-1] + (fft_shape[-1] // 2 + 1,)`` (float64, host).
    kind : str
        ``"gaussian"`` or ``"sobolev"``.
    """

    def __init__(self, shape, fft_shape, symbol, inverse_symbol, *, kind, params):
        self.shape = tuple(int(n) for n in shape)
        self.fft_shape = tuple(int(n) for n in fft_shape)
        self.ndim = len(self.shape)
        self.symbol = np.ascontiguousarray(symbol, dtype=np.float64)
        self.inverse_symbol = np.ascontiguousarray(inverse_symbol, dtype=np.float64)
        self.kind = kind
        self.params = dict(params)
        self._dev = {}

    @property
    def periodic(self):
        """True when no zero padding is used (``fft_shape == shape``)."""
        return self.fft_shape == self.shape

    def __repr__(self):
        p = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"FourierOperator({self.kind}, shape={self.shape}, fft_shape={self.fft_shape}, {p})"

    def _sym(self, which, xp, dtype):
        key = (which, xp.__name__, np.dtype(dtype).str)
        s = self._dev.get(key)
        if s is None:
            host = self.symbol if which == "fwd" else self.inverse_symbol
            s = xp.asarray(host.astype(dtype))
            self._dev[key] = s
        return s

    def _run(self, v, which, name, workers):
        xp = _backend.get_array_module(v)
        v = _as_real_array(v, name, xp)
        if v.shape == self.shape:
            chan = False
        elif v.ndim == self.ndim + 1 and v.shape[: self.ndim] == self.shape:
            chan = True
        else:
            raise ValueError(
                f"{name} must have shape {self.shape} (scalar) or {self.shape + ('C',)} (channels-last), got {v.shape}"
            )
        axes = tuple(range(self.ndim))
        sym = self._sym(which, xp, v.dtype)
        if chan:
            sym = sym[..., None]
        if xp is np:
            import scipy.fft as sfft

            w = _backend.fft_workers(int(np.prod(self.fft_shape)) * (v.shape[-1] if chan else 1), workers)
            f = sfft.rfftn(v, s=self.fft_shape, axes=axes, workers=w)
            f *= sym
            out = sfft.irfftn(f, s=self.fft_shape, axes=axes, workers=w)
        else:
            f = xp.fft.rfftn(v, s=self.fft_shape, axes=axes)
            f *= sym
            out = xp.fft.irfftn(f, s=self.fft_shape, axes=axes)
        if not self.periodic:
            out = out[tuple(slice(0, n) for n in self.shape)]
        return xp.ascontiguousarray(out, dtype=v.dtype)

    def apply(self, v, *, workers=None):
        """Apply K (the smoothing operator) to a scalar ``shape`` array or a channels-last ``shape + (C,)`` field.

        ``workers`` is passed to :mod:`scipy.fft` (None: all cores; one thread below
        :data:`classreg.kernels._backend.FFT_PARALLEL_MIN` elements); ignored for CuPy arrays.
        """
        return self._run(v, "fwd", "v", workers)

    def apply_inverse(self, m, *, workers=None):
        """Apply the inverse symbol (L = K⁻¹ for Sobolev, a Tikhonov-regularised inverse for the Gaussian)."""
        return self._run(m, "inv", "m", workers)


def _half_axes(fft_shape):
    """Per-axis integer frequency indices k_j (full for leading axes, half spectrum for the last), broadcastable."""
    nd = len(fft_shape)
    out = []
    for j, n in enumerate(fft_shape):
        k = np.arange(n // 2 + 1) if j == nd - 1 else np.arange(n)
        shp = [1] * nd
        shp[j] = k.size
        out.append(k.reshape(shp))
    return out


def _fft_shape(shape, pad):
    from scipy.fft import next_fast_len

    return tuple(n if p == 0 else next_fast_len(n + p, real=True) for n, p in zip(shape, pad))


def _check_shape(shape):
    try:
        shape = tuple(int(n) for n in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if not 1 <= len(shape) <= 3 or any(n < 1 for n in shape):
        raise ValueError(f"shape must have 1 to 3 positive entries, got {shape!r}")
    return shape


def _pad_widths(pad, auto, nd):
    if pad is True:
        return tuple(auto)
    if pad is False or pad is None:
        return (0,) * nd
    if isinstance(pad, numbers.Integral):
        pad = (int(pad),) * nd
    pad = tuple(int(p) for p in pad)
    if len(pad) != nd or any(p < 0 for p in pad):
        raise ValueError(f"pad must be True/False, a non-negative int or {nd} non-negative ints, got {pad!r}")
    return pad


def gaussian_kernel_operator(shape, spacing, sigma, *, pad=True, truncate=4.0, symbol="sampled", eps=1e-6):
    """Gaussian RKHS kernel ``K_sigma`` (the smoothing kernel of LDDMM) as a Fourier multiplier.

    Parameters
    ----------
    shape : tuple of int
        Spatial grid shape (1-3 axes).
    spacing : float or sequence of float
        Grid spacing per axis; ``sigma`` is in the same units.
    sigma : float or sequence of float
        Kernel standard deviation (per axis allowed; 0 on an axis = no smoothing along it).
    pad : bool, int or sequence of int, optional
        ``True`` zero-pads each axis by the kernel radius ``r_j = int(truncate sigma_j / h_j + 0.5)`` (rounded up to
        an FFT-friendly size), ``False`` works on the periodic grid ``shape``; integers give explicit pad widths.
    truncate : float, optional
        Truncation radius in standard deviations (``symbol="sampled"`` and the automatic padding).
    symbol : {"sampled", "continuous"}, optional
        ``"sampled"`` (default): K̂ is the DFT of the truncated, unit-sum sampled kernel of :func:`gaussian_weights`
        wrapped onto the FFT grid (separable product of 1-D DFTs). ``"continuous"``: ``K̂(ξ) = exp(-2π²σ²|ξ|²)``,
        ``ξ_j = k_j / (N_j h_j)`` (signed frequencies), which agrees with the sampled symbol to ~1e-4 for σ ≳ h.
    eps : float, optional
        Tikhonov parameter of the regularised inverse ``K̂ / (K̂² + eps)`` used by ``apply_inverse`` (the exact
        inverse ``1/K̂`` would amplify high frequencies by up to ``exp(2π²σ²/h²·d/4)``); its gain is bounded by
        ``1 / (2 sqrt(eps))`` and it equals ``1/K̂`` to relative ``eps/K̂²`` wherever K̂ ≫ sqrt(eps).

    Returns
    -------
    FourierOperator

    Notes
    -----
    Normalisation: unit sum (L1), so ``K̂(0) = 1`` and, with ``pad=False`` (periodic), ``apply`` maps a constant
    field to itself exactly (up to FFT rounding).

    Exactness: with ``pad=False``, ``apply`` is the *periodic* convolution with the kernel. With ``pad=True`` and
    ``symbol="sampled"``, ``apply(v)`` equals the linear convolution with zero extension, i.e.
    ``gaussian(v, sigma, spacing=spacing, truncate=truncate, mode="constant")`` to FFT rounding (no wrap-around,
    because the pad is at least the kernel radius). ``apply`` is symmetric (self-adjoint) in both cases, as the
    adjoint LDDMM gradient needs (it applies K where the transpose of K belongs).
    """
    shape = _check_shape(shape)
    nd = len(shape)
    h = _spacing(spacing, nd)
    sig = _per_axis(sigma, nd, "sigma", allow_zero=True)
    if symbol not in ("sampled", "continuous"):
        raise ValueError(f"symbol must be 'sampled' or 'continuous', got {symbol!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    sv = [s / hh for s, hh in zip(sig, h)]
    radii = [int(truncate * s + 0.5) if s > 1e-15 else 0 for s in sv]
    padw = _pad_widths(pad, radii, nd)
    fshape = _fft_shape(shape, padw)
    ks = _half_axes(fshape)
    sym = np.ones([k.size for k in ks], dtype=np.float64)
    for j, (n, s) in enumerate(zip(fshape, sv)):
        if s <= 1e-15:
            continue
        if symbol == "sampled":
            w = gaussian_weights(s, truncate)
            r = w.size // 2
            g = np.zeros(n)
            np.add.at(g, np.arange(-r, r + 1) % n, w)
            gh = np.fft.fft(g).real
            f1 = gh[: ks[j].size]
        else:
            xi = np.fft.rfftfreq(n, d=h[j]) if j == nd - 1 else np.fft.fftfreq(n, d=h[j])  # k_j / (N_j h_j)
            f1 = np.exp(-2.0 * np.pi**2 * sig[j] ** 2 * xi**2)
        sym = sym * f1.reshape(ks[j].shape)
    inv = sym / (sym * sym + eps)
    return FourierOperator(
        shape, fshape, sym, inv, kind="gaussian",
        params=dict(sigma=sig, spacing=h, pad=padw, truncate=truncate, symbol=symbol, eps=eps),
    )


def sobolev_operator(shape, spacing, alpha, s, *, pad=True):
    """Sobolev kernel ``K = (Id - αΔ_h)^-s`` with the periodic discrete Laplacian.

    Symbol ``L̂(k) = (1 + α Σ_j (2 - 2cos(2π k_j / N_j)) / h_j²)^s``, ``K̂ = 1/L̂``; ``apply`` is K (smoothing),
    ``apply_inverse`` is ``L = (Id - αΔ_h)^s`` (the momentum of a velocity).

    Parameters
    ----------
    shape : tuple of int
        Spatial grid shape (1-3 axes).
    spacing : float or sequence of float
        Grid spacing ``h_j``; ``alpha`` has units of length² in the same units (α is meaningless without the grid
        convention: the GAN-LDDMM paper's α = 0.0025 is for a unit domain, ``spacing = 1/N``).
    alpha : float
        Positive weight of the Laplacian.
    s : float
        Positive power.
    pad : bool, int or sequence of int, optional
        ``False``: periodic grid ``shape``; then ``apply_inverse(apply(v)) == v`` to FFT rounding.
        ``True``: zero-pad each axis by ``ceil(5 sqrt(2 α max(s, 1)) / h_j)`` voxels (the kernel's standard deviation
        is ``sqrt(2 α s)``; its tail beyond the pad is ≲1e-3 of its peak), integers give explicit widths. With padding
        ``apply`` is the convolution with the Green's function on the padded periodic grid, restricted to ``shape``
        (zero extension); for integer ``s`` ``apply_inverse`` is the local ``(2s+1)``-point stencil of ``(Id - αΔ_h)^s``
        with zero extension (exact once the pad ≥ s), so ``apply_inverse(apply(v))`` is no longer the identity near
        the border. Both stay symmetric.

    Returns
    -------
    FourierOperator
    """
    shape = _check_shape(shape)
    nd = len(shape)
    h = _spacing(spacing, nd)
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not (isinstance(s, numbers.Real) and math.isfinite(s) and s > 0):
        raise ValueError(f"s must be a positive number, got {s!r}")
    auto = [int(math.ceil(5.0 * math.sqrt(2.0 * alpha * max(s, 1.0)) / hh)) for hh in h]
    padw = _pad_widths(pad, auto, nd)
    fshape = _fft_shape(shape, padw)
    ks = _half_axes(fshape)
    lam = np.zeros([k.size for k in ks], dtype=np.float64)
    for j, (n, k) in enumerate(zip(fshape, ks)):
        lam = lam + (2.0 - 2.0 * np.cos(2.0 * np.pi * k / n)) / h[j] ** 2
    lsym = (1.0 + alpha * lam) ** s
    return FourierOperator(
        shape, fshape, 1.0 / lsym, lsym, kind="sobolev", params=dict(alpha=alpha, s=s, spacing=h, pad=padw)
    )
