"""Image similarity measures: value and gradient with respect to the moving image's intensities.

Every measure compares a fixed image ``F`` with a moving image ``M`` that has already been resampled on the fixed
grid (same shape, numpy axis order, 2-D or 3-D) and returns a **cost to minimise**. With ``gradient=True`` it also
returns ``dcost/dM(x)``, one number per voxel (the array a demons/LDDMM/metamorphosis solver multiplies by ``grad M``
to get a force), exactly the derivative of the returned value (checked against finite differences in
``tests/test_terms.py``).

* ``ssd``: ``(1/N) sum_Omega (M - F)^2 / 2``; optimum 0.
* ``ncc``: ``-NCC`` over ``Omega`` (Pearson correlation); optimum -1.
* ``lncc``: ``-(1/N) sum_Omega cc(x)`` with ``cc`` the squared local correlation in a box window (ANTs "CC");
  optimum about -1 on textured images.
* ``mi``: ``-MI`` (nats) of the Mattes/elastix Parzen joint histogram; optimum ``-MI(F, F)``.
* ``ngf``: ``(1/N) sum_Omega 1 - <n_F, n_M>^2`` (normalised gradient fields); optimum 0 up to the edge parameter.

(``Omega`` = the voxels of ``mask``, ``N = |Omega|``.)

Conventions shared by all functions

* ``fixed``, ``moving``: real arrays of the same shape, 2-D or 3-D; computed in float64. Never modified.
* ``mask``: optional boolean array (same shape) of the voxels that count; ``None`` = all voxels. Voxels outside the
  mask have no influence on the value (neighbourhood measures only read voxels inside the mask) and get gradient 0.
* ``spacing``: mm per voxel in **array-axis order** (``a[z, y, x]`` -> ``(sz, sy, sx)``), scalar broadcasts. It only
  matters for ``lncc`` (window radius in mm) and ``ngf`` (gradients in physical units); ``ssd``, ``ncc`` and
  ``mattes_mi`` accept and check it so that solvers can call every measure the same way.
* ``gradient=False`` -> the value as a Python ``float``; ``gradient=True`` -> ``(value, grad)`` where ``grad`` has the
  moving image's shape and its dtype if that is floating point (float32 stays float32), else float64.
* Errors: ``ValueError`` naming the argument for NaN/Inf, shape mismatch (both shapes are quoted), wrong
  dimensionality, an empty mask, non-positive spacing or radius.

Everything is vectorised numpy/scipy (no Python loop over voxels). :func:`classreg.terms.get` maps the names
``"ssd"``, ``"ncc"``, ``"lncc"``, ``"mi"``, ``"ngf"`` to data-term objects built on these functions.

References
----------
.. [Mattes2003] D. Mattes, D. R. Haynor, H. Vesselle, T. K. Lewellen, W. Eubank, "PET-CT image registration in the
   chest using free-form deformations", IEEE Trans. Med. Imaging 22(1):120-128, 2003.
.. [Thevenaz2000] P. Thevenaz, M. Unser, "Optimization of mutual information for multiresolution image
   registration", IEEE Trans. Image Process. 9(12):2083-2099, 2000.
.. [Avants2008] B. B. Avants, C. L. Epstein, M. Grossman, J. C. Gee, "Symmetric diffeomorphic image registration
   with cross-correlation: evaluating automated labeling of elderly and neurodegenerative brain", Med. Image Anal.
   12(1):26-41, 2008.
.. [Haber2006] E. Haber, J. Modersitzki, "Intensity gradient based registration and fusion of multi-modal images",
   MICCAI 2006, LNCS 4191:726-733 (also Methods Inf. Med. 46(3):292-299, 2007).
.. [Klein2010] S. Klein, M. Staring, K. Murphy, M. A. Viergever, J. P. W. Pluim, "elastix: a toolbox for
   intensity-based medical image registration", IEEE Trans. Med. Imaging 29(1):196-205, 2010.
"""
from __future__ import annotations

import numbers

import numpy as np

from .._checks import check_spacing

__all__ = [
    "intensity_limits",
    "lncc",
    "mattes_mi",
    "mattes_mi_samples",
    "ncc",
    "ngf",
    "ssd",
]

#: Relative regulariser of LNCC: eps = LNCC_EPS * (n sigma_F^2) * (n sigma_M^2) (see :func:`lncc`).
LNCC_EPS = 1e-5
#: Default LNCC window radius in mm (ANTs ``CC[fixed, moving, 1, 4]`` at 1 mm voxels).
LNCC_RADIUS = 4.0
#: Default NGF edge parameter relative to the RMS gradient magnitude (see :func:`ngf`).
NGF_ETA = 0.1
#: elastix ``FixedLimitRangeRatio`` / ``MovingLimitRangeRatio`` default.
LIMIT_RANGE_RATIO = 0.01
#: elastix threshold below which a histogram bin contributes nothing to MI.
_PDF_TINY = 1e-16
_TINY = np.finfo(np.float64).tiny

# Mattes/elastix defaults: zero-order (box) Parzen window for the fixed image, cubic B-spline for the moving image.
_FIXED_KERNEL_ORDER = 0
_MOVING_KERNEL_ORDER = 3


# ----------------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------------


def _as_image(a, name: str) -> np.ndarray:
    if a is None:
        raise ValueError(f"{name} must be a 2-D or 3-D array, got None")
    if type(a).__module__.split(".")[0] == "cupy":
        raise TypeError(f"{name} is a CuPy array; classreg.terms works on host arrays (use cupy.asnumpy)")
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2-D or 3-D, got an array of shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(
            f"{name} contains {bad} NaN or Inf value(s); replace them (e.g. numpy.nan_to_num) or mask them out"
        )
    return arr


def _prepare(fixed, moving, mask):
    """Validated float64 copies of the images, the boolean mask (all True if None) and the gradient dtype."""
    f = _as_image(fixed, "fixed")
    m = _as_image(moving, "moving")
    if f.shape != m.shape:
        raise ValueError(
            f"fixed and moving must have the same shape (resample moving onto the fixed grid first): "
            f"fixed.shape={f.shape}, moving.shape={m.shape}"
        )
    if mask is None:
        w = np.ones(f.shape, dtype=bool)
    else:
        w = np.asarray(mask)
        if w.shape != f.shape:
            raise ValueError(f"mask must have the images' shape {f.shape}, got mask.shape={w.shape}")
        if w.dtype != bool:
            if w.dtype.kind not in "biuf" or not np.all((w == 0) | (w == 1)):
                raise ValueError(f"mask must be a boolean array (or 0/1 values), got dtype {w.dtype}")
            w = w != 0
        if not w.any():
            raise ValueError("mask is empty (no voxel is True): pass mask=None to use every voxel")
    out_dtype = m.dtype if m.dtype.kind == "f" else np.dtype(np.float64)
    return f.astype(np.float64, copy=True), m.astype(np.float64, copy=True), w, out_dtype


def _check_spacing(spacing, ndim: int) -> tuple:
    return check_spacing(spacing, ndim, "spacing", axes="array-axis order")


def _finish(value, grad, gradient: bool, out_dtype):
    value = float(value)
    if not gradient:
        return value
    return value, np.asarray(grad, dtype=out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# SSD and NCC
# ----------------------------------------------------------------------------------------------------------------


def ssd(fixed, moving, *, mask=None, gradient=False, spacing=1.0):
    r"""Sum of squared differences, normalised: the mean over the mask of ``(M - F)^2 / 2``.

    .. math:: C(M) = \frac{1}{N} \sum_{x \in \Omega} \tfrac12 (M(x) - F(x))^2, \qquad
              \frac{\partial C}{\partial M(x)} = \frac{M(x) - F(x)}{N} \ (x \in \Omega), \ 0 \text{ elsewhere}.

    Multiply the gradient by ``N`` (the number of mask voxels) to get the per-voxel residual ``M - F`` that the
    classical demons force uses.

    Parameters
    ----------
    fixed, moving : ndarray
        Real 2-D or 3-D arrays of the same shape (moving already resampled on the fixed grid).
    mask : ndarray of bool, optional
        Voxels that count (``None``: all). Must not be empty.
    gradient : bool
        Also return ``dC/dM``.
    spacing : float or sequence, optional
        Accepted (and checked) for a uniform calling convention; SSD involves no lengths.

    Returns
    -------
    value : float
        The cost (0 for identical images).
    grad : ndarray
        Only with ``gradient=True``: ``dC/dM(x)``, shape and (floating) dtype of ``moving``.
    """
    F, M, w, odt = _prepare(fixed, moving, mask)
    _check_spacing(spacing, F.ndim)
    n = np.count_nonzero(w)
    r = np.where(w, M - F, 0.0)
    value = 0.5 * float(np.dot(r.ravel(), r.ravel())) / n
    return _finish(value, r / n if gradient else None, gradient, odt)


def ncc(fixed, moving, *, mask=None, gradient=False, spacing=1.0):
    r"""Negative normalised cross-correlation (Pearson correlation) over the mask.

    With :math:`f = F - \bar F`, :math:`m = M - \bar M` (means over the mask :math:`\Omega`),
    :math:`A = \sum_\Omega f m`, :math:`B = \sum_\Omega f^2`, :math:`C = \sum_\Omega m^2`:

    .. math:: \mathrm{cost} = -\frac{A}{\sqrt{B C}}, \qquad
              \frac{\partial\,\mathrm{cost}}{\partial M(x)} = -\frac{f(x)}{\sqrt{BC}} + \frac{A}{\sqrt{BC}}
              \frac{m(x)}{C} \quad (x\in\Omega).

    This is elastix's ``AdvancedNormalizedCorrelation`` with ``SubtractMean true`` evaluated on every mask voxel.
    If either image is constant over the mask (variance below ``1e-24`` of its mean square, i.e. zero up to
    rounding) the correlation is undefined; like elastix the cost is then 0 with a zero gradient.

    Parameters
    ----------
    fixed, moving : ndarray
        Real 2-D or 3-D arrays of the same shape.
    mask : ndarray of bool, optional
        Voxels that count (``None``: all).
    gradient : bool
        Also return ``dcost/dM``.
    spacing : float or sequence, optional
        Accepted (and checked) for a uniform calling convention; NCC involves no lengths.

    Returns
    -------
    value : float
        ``-NCC`` in [-1, 1]; -1 for ``M = a F + b`` with ``a > 0``.
    grad : ndarray
        Only with ``gradient=True``.
    """
    F, M, w, odt = _prepare(fixed, moving, mask)
    _check_spacing(spacing, F.ndim)
    fv, mv = F[w], M[w]
    f = fv - fv.mean()
    m = mv - mv.mean()
    A = float(np.dot(f, m))
    B = float(np.dot(f, f))
    C = float(np.dot(m, m))
    if B <= 1e-24 * float(np.dot(fv, fv)) or C <= 1e-24 * float(np.dot(mv, mv)) or B == 0.0 or C == 0.0:
        return _finish(0.0, np.zeros(F.shape), gradient, odt)
    s = np.sqrt(B * C)
    value = -A / s
    grad = None
    if gradient:
        grad = np.zeros(F.shape)
        grad[w] = -f / s + (A / s) * m / C
    return _finish(value, grad, gradient, odt)


# ----------------------------------------------------------------------------------------------------------------
# LNCC (ANTs "CC")
# ----------------------------------------------------------------------------------------------------------------


def _window_radius(radius, spacing, ndim):
    rad = check_spacing(radius, ndim, "radius", axes="array-axis order")
    return tuple(max(1, int(round(r / h))) for r, h in zip(rad, spacing))


def lncc(fixed, moving, *, radius=LNCC_RADIUS, spacing=1.0, mask=None, gradient=False, eps=LNCC_EPS):
    r"""Negative mean squared local normalised cross-correlation (ANTs "CC", Avants et al. 2008).

    For every voxel :math:`x` a box window :math:`W(x)` of half-width ``r_i = max(1, round(radius / spacing_i))``
    voxels per axis is intersected with the mask :math:`\Omega` (and the image). With the window sums
    :math:`n = |W\cap\Omega|`, :math:`\bar F, \bar M` the local means and

    .. math:: A = \sum_{W\cap\Omega} (F-\bar F)(M-\bar M),\quad B = \sum_{W\cap\Omega} (F-\bar F)^2,\quad
              C = \sum_{W\cap\Omega} (M-\bar M)^2,\quad cc(x) = \frac{A^2}{B C + \epsilon}

    the cost is :math:`-\frac{1}{N}\sum_{x\in\Omega} cc(x)` (:math:`N = |\Omega|`), in [-1, 0]. Local correlation
    is invariant to local affine intensity changes (Avants et al., Med. Image Anal. 12(1), 2008, eq. 5; ANTs
    ``CC`` metric, which uses the squared correlation too).

    The regulariser is :math:`\epsilon = \mathtt{eps}\cdot (n_W\sigma_F^2)(n_W\sigma_M^2) + \text{tiny}` with
    :math:`n_W = \prod_i (2 r_i + 1)` the full window size and :math:`\sigma^2` the variances of the images over
    the mask: it keeps the cost invariant to intensity scaling of either image, makes flat windows (local
    variance product below ~``eps`` times the global one) count as uncorrelated instead of dividing 0 by 0, and
    biases a perfectly correlated textured window by only ~``eps``. Its dependence on ``M`` (through
    :math:`\sigma_M^2`) is included in the gradient, so the gradient is exact.

    Window sums use ``scipy.ndimage.uniform_filter`` with zero padding (the window is truncated at the image
    border and at the mask border); the gradient uses that the box-sum operator is self-adjoint:

    .. math:: \frac{\partial\,\mathrm{cost}}{\partial M(y)} = -\frac{2}{N}\Big[F(y) S\alpha - S(\alpha\bar F)
              - M(y) S\beta + S(\beta\bar M)\Big] + \gamma\,\frac{\partial\epsilon}{\partial M(y)}, \quad
              \alpha = \frac{A}{BC+\epsilon},\ \beta = \frac{A^2 B}{(BC+\epsilon)^2},\
              \gamma = \frac1N\sum_\Omega \frac{A^2}{(BC+\epsilon)^2}

    (:math:`S` = masked box sum, :math:`\alpha,\beta` set to 0 outside the mask).

    Parameters
    ----------
    fixed, moving : ndarray
        Real 2-D or 3-D arrays of the same shape.
    radius : float or sequence of float
        Window radius in mm (default 4.0: ANTs' usual radius of 4 voxels at 1 mm), converted per axis with
        ``spacing`` and rounded, at least 1 voxel.
    spacing : float or sequence of float
        mm per voxel in array-axis order.
    mask : ndarray of bool, optional
        Voxels that count (``None``: all). Windows only read voxels inside the mask.
    gradient : bool
        Also return ``dcost/dM``.
    eps : float
        Relative regulariser (default ``1e-5``), see above. Must be >= 0.

    Returns
    -------
    value : float
        The cost in [-1, 0]; about -1 when ``M = a F + b`` on a textured image.
    grad : ndarray
        Only with ``gradient=True``.
    """
    F, M, w, odt = _prepare(fixed, moving, mask)
    sp = _check_spacing(spacing, F.ndim)
    r = _window_radius(radius, sp, F.ndim)
    if not (isinstance(eps, numbers.Real) and np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    from ..kernels.lncc import _lncc_reference  # the one implementation; also the fused kernel's test oracle

    value, grad, _ = _lncc_reference(F, M, w, r, eps, np.float64)
    return _finish(value, grad, gradient, odt)


# ----------------------------------------------------------------------------------------------------------------
# Mattes mutual information (elastix AdvancedMattesMutualInformation)
# ----------------------------------------------------------------------------------------------------------------


def intensity_limits(image, *, mask=None, ratio=LIMIT_RANGE_RATIO):
    """Histogram intensity limits as elastix computes them: ``[min - ratio*range, max + ratio*range]``.

    elastix (``AdvancedImageToImageMetric::InitializeLimiters``) takes min and max over the image (inside its mask
    when one is given) once per resolution level and widens them by ``Fixed/MovingLimitRangeRatio`` (default 0.01)
    of the range. Solvers that want elastix's behaviour compute the moving limits once from the moving image in
    its own space and pass them as ``moving_limits`` to :func:`mattes_mi` at every iteration.

    Parameters
    ----------
    image : ndarray
        Real array (any dimension).
    mask : ndarray of bool, optional
        Voxels to take min/max over.
    ratio : float
        ``LimitRangeRatio`` (>= 0).

    Returns
    -------
    (float, float)
        ``(min_limit, max_limit)``.
    """
    a = np.asarray(image)
    if a.dtype.kind not in "biuf" or a.size == 0:
        raise ValueError(f"image must be a non-empty real array, got dtype {a.dtype}, shape {a.shape}")
    if not (isinstance(ratio, numbers.Real) and np.isfinite(ratio) and ratio >= 0):
        raise ValueError(f"ratio must be a finite number >= 0, got {ratio!r}")
    if mask is not None:
        mk = np.asarray(mask)
        if mk.shape != a.shape:
            raise ValueError(f"mask must have the image's shape {a.shape}, got mask.shape={mk.shape}")
        mk = mk.astype(bool)
        if not mk.any():
            raise ValueError("mask is empty (no voxel is True): pass mask=None to use every voxel")
        a = a[mk]
    lo, hi = float(np.min(a)), float(np.max(a))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("image contains NaN or Inf values; replace them (e.g. numpy.nan_to_num) or mask them out")
    d = float(ratio) * (hi - lo)
    return lo - d, hi + d


def _check_limits(limits, name):
    try:
        lo, hi = (float(v) for v in limits)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a pair (min_limit, max_limit), got {limits!r}") from exc
    if not (np.isfinite(lo) and np.isfinite(hi) and hi >= lo):
        raise ValueError(f"{name} must be finite with min_limit <= max_limit, got {limits!r}")
    return lo, hi


def _exponential_limiter(x, lo_thr, hi_thr, lo_bnd, hi_bnd):
    """elastix ``ExponentialLimiterFunction``: identity on [lo_thr, hi_thr], saturating smoothly to the bounds.

    Above ``hi_thr``: ``y = hi_bnd + (hi_thr - hi_bnd) exp((x - hi_thr)/(hi_thr - hi_bnd))`` (C1 at the threshold,
    tends to ``hi_bnd``), symmetrically below ``lo_thr``. Returns ``(y, dy/dx)``.
    """
    y = x.copy()
    dy = np.ones_like(x)
    up = x > hi_thr
    if up.any():
        k = hi_thr - hi_bnd
        if k < -1e-10:
            e = np.exp((x[up] - hi_thr) / k)
            y[up] = hi_bnd + k * e
            dy[up] = e
        else:
            y[up] = hi_bnd
            dy[up] = 0.0
    lo = x < lo_thr
    if lo.any():
        k = lo_thr - lo_bnd
        if k > 1e-10:
            e = np.exp((x[lo] - lo_thr) / k)
            y[lo] = lo_bnd + k * e
            dy[lo] = e
        else:
            y[lo] = lo_bnd
            dy[lo] = 0.0
    return y, dy


def _bins(bins):
    if isinstance(bins, numbers.Integral) and not isinstance(bins, bool):
        nf = nm = int(bins)
    else:
        try:
            nf, nm = bins
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bins must be an int or a pair (fixed_bins, moving_bins), got {bins!r}") from exc
        if not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in (nf, nm)):
            raise ValueError(f"bins must be integers, got {bins!r}")
        nf, nm = int(nf), int(nm)
    if nf < 4 or nm < 4:
        raise ValueError(f"bins must be >= 4 (the cubic Parzen window pads the histogram), got {bins!r}")
    return nf, nm


def mattes_mi(fixed, moving, *, bins=32, mask=None, gradient=False, fixed_limits=None, moving_limits=None,
              limit_range_ratio=LIMIT_RANGE_RATIO, spacing=1.0, eps=0.0):
    r"""Negative Mattes mutual information, reproducing elastix's ``AdvancedMattesMutualInformation``.

    Joint histogram by Parzen windowing (Mattes et al., IEEE TMI 22(1):120-128, 2003, eqs. 6-9; Thevenaz & Unser
    2000): every mask voxel adds a zero-order B-spline (box) window in the fixed-intensity direction times a cubic
    B-spline window in the moving-intensity direction (elastix ``FixedKernelBSplineOrder 0``,
    ``MovingKernelBSplineOrder 3``), normalised by the number of voxels ``N``:

    .. math:: p(\iota,\kappa) = \frac1N\sum_{x\in\Omega} \beta^0\!\big(\iota - \xi_F(x)\big)\,
              \beta^3\!\big(\kappa - \xi_M(x)\big), \qquad
              \mathrm{cost} = -\sum_{\iota,\kappa} p \log\frac{p}{p_F\,p_M}

    in nats, where bins with ``p <= 1e-16`` or ``p_F p_M <= 1e-16`` are skipped (as in elastix). The bin
    coordinates follow ``itk::ParzenWindowHistogramImageToImageMetric::InitializeHistograms`` exactly: with limits
    ``[lo, hi]``, ``B`` bins, padding ``P = order // 2`` (0 fixed, 1 moving) and
    ``small = 0.001 (hi - lo) / (B_fixed - 2P - 1)`` (elastix uses the *fixed* bin count here for both images),

    .. math:: \mathrm{binsize} = \frac{hi - lo + 2\,\mathrm{small}}{B - 2P - 1}\ (\text{clamped to }
              [10^{-10}, 10^{10}]),\qquad \xi = \frac{v - (lo - \mathrm{small})}{\mathrm{binsize}} + P,

    the fixed bin is ``floor(xi_F + 0.5)`` and the moving window covers bins ``floor(xi_M) - 1 .. floor(xi_M) + 2``.
    Intensities go through elastix's limiters first: fixed values are clamped to ``fixed_limits`` (hard limiter),
    moving values pass an exponential limiter that is the identity between the thresholds and saturates smoothly
    towards ``moving_limits`` outside them (thresholds = the true min/max when the limits are computed here, or
    ``lo + r (hi - lo)/(1 + 2r)`` and ``hi - ...`` with ``r = limit_range_ratio`` when limits are given, i.e. the
    values elastix would have had).

    Exact gradient (the limits are constants, as in elastix where they are computed once per resolution):

    .. math:: \frac{\partial\,\mathrm{cost}}{\partial M(x)} = -\frac{\ell'(M(x))}{N\,\mathrm{binsize}_M}
              \sum_{i=0}^{3} \frac{\partial \beta^3}{\partial \xi}\big(\kappa_i - \xi_M(x)\big)\,
              \log\frac{p(\iota_x,\kappa_i)}{p_F(\iota_x)\,p_M(\kappa_i)}

    (``ell`` the moving limiter; elastix's ``pRatio`` array, Thevenaz & Unser eq. 23).

    Parameters
    ----------
    fixed, moving : ndarray
        Real 2-D or 3-D arrays of the same shape.
    bins : int or (int, int)
        ``NumberOfHistogramBins`` (default 32), or ``(NumberOfFixedHistogramBins, NumberOfMovingHistogramBins)``;
        each >= 4.
    mask : ndarray of bool, optional
        Voxels that count (elastix: the fixed-mask samples of a ``Full`` sampler). Also used for the default limits.
    gradient : bool
        Also return ``dcost/dM``.
    fixed_limits, moving_limits : (float, float), optional
        Histogram limits ``(MinLimit, MaxLimit)``. Default: :func:`intensity_limits` of the fixed/moving array over
        the mask with ``limit_range_ratio``. Pass them explicitly (e.g. computed once from the original moving
        image) to make the cost a smooth function of ``moving`` and to match elastix, whose limits are fixed for a
        resolution level.
    limit_range_ratio : float
        elastix ``Fixed/MovingLimitRangeRatio`` (default 0.01).
    spacing : float or sequence, optional
        Accepted (and checked) for a uniform calling convention; MI involves no lengths.
    eps : float
        0 (default): elastix's MI. ``eps > 0``: the smoothed MI of :func:`mattes_mi_samples` (every entropy
        ``H(q) = −Σ q log(q + eps)``).

    Returns
    -------
    value : float
        ``-MI`` in nats (<= 0).
    grad : ndarray
        Only with ``gradient=True``; zero outside the mask.

    Notes
    -----
    Deviations from elastix: every mask voxel is a sample (elastix's ``Full`` sampler; elastix's default
    ``Random``/``RandomCoordinate`` samplers draw ``NumberOfSpatialSamples``); the default moving limits come from
    the resampled moving image inside the mask, whereas elastix takes the moving image in its own space (pass
    ``moving_limits`` to reproduce that); the box kernel gives weight 1 on the half-open interval (ITK's kernel is
    0.5 exactly at ``|u| = 0.5``, a measure-zero difference); no ``ErodeMask``.
    """
    F, M, w, odt = _prepare(fixed, moving, mask)
    _check_spacing(spacing, F.ndim)
    out = mattes_mi_samples(F[w], M[w], bins=bins, gradient=gradient, fixed_limits=fixed_limits,
                            moving_limits=moving_limits, limit_range_ratio=limit_range_ratio, eps=eps)
    if not gradient:
        return out
    value, gs = out
    grad = np.zeros(F.shape)
    grad[w] = gs
    return _finish(value, grad, gradient, odt)


def _use_fused(backend) -> bool:
    from ..kernels._backend import HAVE_NUMBA, resolve_backend

    return HAVE_NUMBA and resolve_backend(backend) == "numba"


def mattes_mi_samples(fixed_values, moving_values, *, bins=32, gradient=False, fixed_limits=None,
                      moving_limits=None, limit_range_ratio=LIMIT_RANGE_RATIO, normalised=False, backend=None,
                      eps=0.0):
    r"""Negative Mattes mutual information of paired samples: the core of :func:`mattes_mi`.

    ``fixed_values[j]`` and ``moving_values[j]`` are the two images' intensities at sample ``j`` (any 1-D arrays of
    equal length, e.g. the samples a parametric registration draws); the histogram, limits and limiters are those
    of :func:`mattes_mi`, and the gradient is ``dcost/dmoving_values[j]``.

    With ``normalised=True`` the cost is the negative normalised mutual information of Studholme et al. (Pattern
    Recognit. 32(1):71-86, 1999), ``-(H_F + H_M) / H_FM`` of the same Parzen histogram (elastix
    ``NormalizedMutualInformation``; optimum ``-2`` for identical images, ``-1`` for independent ones), whose
    gradient follows from ``dH_M/dp_ik = -(log p_M(k) + 1)``, ``dH_FM/dp_ik = -(log p(i,k) + 1)`` and the same
    Parzen-window derivative.

    With ``eps > 0`` the cost is a smoothed MI, ``H_FM − H_F − H_M`` with every entropy ``H(q) = −Σ q log(q + eps)``
    over all bins: elastix's form skips empty bins, so a bin that empties or fills changes the gradient without
    bound (``d(p log p)/dp = log p + 1``); with ``eps`` the derivative ``−log(q + eps) − q/(q + eps)`` stays bounded
    and the cost is smooth enough for a line search (``register_lddmm(metric="mi")``). Not with ``normalised``.

    With numba (``backend`` None or "numba") the whole computation is one compiled pass,
    :func:`classreg.kernels.sampling.mattes_mi_fused`; ``backend="numpy"`` is this function's numpy code, the
    reference.

    Returns
    -------
    value : float
    grad : ndarray, float64, shape (N,)
        Only with ``gradient=True``.
    """
    from ..kernels.sampling import parzen_mi

    fv = np.asarray(fixed_values, dtype=np.float64).ravel()
    mv = np.asarray(moving_values, dtype=np.float64).ravel()
    if fv.shape != mv.shape:
        raise ValueError(f"fixed_values and moving_values must have the same length, got {fv.size} and {mv.size}")
    nbF, nbM = _bins(bins)
    N = fv.size
    if N == 0:
        raise ValueError("no samples: mutual information needs at least one pair of intensities")
    if not (isinstance(limit_range_ratio, numbers.Real) and np.isfinite(limit_range_ratio)
            and limit_range_ratio >= 0):
        raise ValueError(f"limit_range_ratio must be a finite number >= 0, got {limit_range_ratio!r}")
    r = float(limit_range_ratio)

    if fixed_limits is None:
        loF, hiF = intensity_limits(fv, ratio=r)
    else:
        loF, hiF = _check_limits(fixed_limits, "fixed_limits")
    if moving_limits is None:
        tlo, thi = float(mv.min()), float(mv.max())
        loM, hiM = intensity_limits(mv, ratio=r)
    else:
        loM, hiM = _check_limits(moving_limits, "moving_limits")
        d = r * (hiM - loM) / (1.0 + 2.0 * r)
        tlo, thi = loM + d, hiM - d

    if not (isinstance(eps, numbers.Real) and np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if eps > 0 and normalised:
        raise ValueError("eps (the smoothed MI) is not defined for the normalised MI")
    if _use_fused(backend):
        from ..kernels.sampling import mattes_mi_fused

        value, grad = mattes_mi_fused(fv, mv, nbF, nbM, (loF, hiF), (loM, hiM), (tlo, thi), normalised=normalised,
                                      tiny=_PDF_TINY, eps=eps)
        return (value, grad) if gradient else value
    fv = np.clip(fv, loF, hiF)  # HardLimiterFunction
    mv, dlim = _exponential_limiter(mv, tlo, thi, loM, hiM)

    padF, padM = _FIXED_KERNEL_ORDER // 2, _MOVING_KERNEL_ORDER // 2
    smallF = 0.001 * (hiF - loF) / (nbF - 2 * padF - 1)
    smallM = 0.001 * (hiM - loM) / (nbF - 2 * padM - 1)  # sic: elastix divides by the fixed bin count here
    bsF = min(max((hiF - loF + 2.0 * smallF) / (nbF - 2 * padF - 1), 1e-10), 1e10)
    bsM = min(max((hiM - loM + 2.0 * smallM) / (nbM - 2 * padM - 1), 1e-10), 1e10)
    xiF = (fv - (loF - smallF)) / bsF + padF
    xiM = (mv - (loM - smallM)) / bsM + padM

    fidx = np.clip(np.floor(xiF + 0.5).astype(np.intp), 0, nbF - 1)
    hist, gather = parzen_mi(fidx, xiM, nbF, nbM)
    p = hist / N
    pF = p.sum(axis=1)
    pM = p.sum(axis=0)
    if normalised:
        def entropy_terms(q):
            ok = q > _PDF_TINY
            lg = np.zeros_like(q)
            lg[ok] = np.log(q[ok])
            return -float(np.sum(q[ok] * lg[ok])), lg
        hF, _ = entropy_terms(pF)
        hM, lgM = entropy_terms(pM)
        hFM, lgFM = entropy_terms(p)
        if hFM <= 0.0:
            return (-1.0, np.zeros(N)) if gradient else -1.0
        value = -(hF + hM) / hFM
        if not gradient:
            return value
        # dcost/dp(i, k) = -(dH_M/dp (H_FM) - (H_F + H_M) dH_FM/dp) / H_FM^2 (constants cancel: sum of dp is 0)
        dcost_dp = -(-(lgM[None, :]) * hFM + (hF + hM) * lgFM) / (hFM * hFM)
        return value, (dlim / (N * bsM)) * gather(dcost_dp)
    if eps > 0:  # −MI = H_FM − H_F − H_M, H(q) = −Σ q log(q + eps); pF does not move with the moving values
        value = float(np.sum(pF * np.log(pF + eps)) + np.sum(pM * np.log(pM + eps)) - np.sum(p * np.log(p + eps)))
        if not gradient:
            return value

        def d_entropy(q):
            return -np.log(q + eps) - q / (q + eps)
        return value, (dlim / (N * bsM)) * gather(d_entropy(p) - d_entropy(pM)[None, :])
    pFpM = pF[:, None] * pM[None, :]
    ok = (p > _PDF_TINY) & (pFpM > _PDF_TINY)
    pratio = np.zeros_like(p)
    pratio[ok] = np.log(p[ok] / pFpM[ok])
    value = -float(np.sum(p[ok] * pratio[ok]))
    if not gradient:
        return value
    return value, -(dlim / (N * bsM)) * gather(pratio)


# ----------------------------------------------------------------------------------------------------------------
# NGF
# ----------------------------------------------------------------------------------------------------------------


def _slc(ndim, axis, s):
    out = [slice(None)] * ndim
    out[axis] = s
    return tuple(out)


def _diff_weights(inside, axis):
    """Weights (wf, wb) of the forward/backward differences at each voxel along ``axis``.

    Central difference where both neighbours are inside, one-sided where only one is, 0 where none is
    (``numpy.gradient``'s ``edge_order=1`` rule, with the mask border treated like the image border).
    """
    nd = inside.ndim
    fwd = np.zeros(inside.shape, dtype=bool)
    bwd = np.zeros(inside.shape, dtype=bool)
    both = inside[_slc(nd, axis, slice(None, -1))] & inside[_slc(nd, axis, slice(1, None))]
    fwd[_slc(nd, axis, slice(None, -1))] = both
    bwd[_slc(nd, axis, slice(1, None))] = both
    tot = fwd.astype(np.float64) + bwd
    wfw = np.zeros(inside.shape)
    wbw = np.zeros(inside.shape)
    np.divide(fwd, tot, out=wfw, where=tot > 0)
    np.divide(bwd, tot, out=wbw, where=tot > 0)
    return wfw, wbw


def _grad_axis(I, wfw, wbw, h, axis):
    """Derivative along ``axis``: ``wf[k] e[k] + wb[k] e[k-1]`` with ``e[k] = (I[k+1] - I[k]) / h``."""
    nd = I.ndim
    e = np.diff(I, axis=axis) / h
    g = np.zeros_like(I)
    g[_slc(nd, axis, slice(None, -1))] += wfw[_slc(nd, axis, slice(None, -1))] * e
    g[_slc(nd, axis, slice(1, None))] += wbw[_slc(nd, axis, slice(1, None))] * e
    return g


def _grad_axis_adjoint(v, wfw, wbw, h, axis):
    """Adjoint of :func:`_grad_axis` (a discrete ``-d/dx``)."""
    nd = v.ndim
    lo, hi = _slc(nd, axis, slice(None, -1)), _slc(nd, axis, slice(1, None))
    ge = (wfw[lo] * v[lo] + wbw[hi] * v[hi]) / h
    out = np.zeros_like(v)
    out[lo] -= ge
    out[hi] += ge
    return out


def _ngf_eps(eps):
    if eps is None:
        return None
    if isinstance(eps, numbers.Real):
        pair = (float(eps), float(eps))
    else:
        try:
            a, b = eps
            pair = (float(a), float(b))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"eps must be None, a number or a pair (eps_fixed, eps_moving), got {eps!r}") from exc
    if not all(np.isfinite(e) and e >= 0 for e in pair):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return pair


def ngf(fixed, moving, *, spacing=1.0, eps=None, mask=None, gradient=False):
    r"""Normalised gradient fields distance (Haber & Modersitzki, MICCAI 2006).

    .. math:: n_I = \frac{\nabla I}{\sqrt{|\nabla I|^2 + \epsilon_I^2}}, \qquad
              \mathrm{cost} = \frac1N \sum_{x\in\Omega} 1 - \langle n_F(x), n_M(x)\rangle^2

    in [0, 1]: 0 where the gradients are parallel or anti-parallel (sign-invariant, hence multi-modal), 1 where
    they are orthogonal or one vanishes. Gradients are central differences in physical units (``numpy.gradient``
    with ``spacing``, one-sided at the border); with a mask, differences only use mask voxels (one-sided at the
    mask border), so voxels outside the mask never influence the value.

    Edge parameter: ``eps=None`` (default) sets, per image, :math:`\epsilon_I^2 = \eta^2\,\frac1N
    \sum_\Omega |\nabla I|^2` with :math:`\eta = 0.1`, i.e. 10 % of the RMS gradient magnitude over the mask
    (Haber & Modersitzki tie epsilon to the typical gradient/noise level; a relative value keeps the cost
    invariant to intensity scaling of either image). Its dependence on ``M`` is included in the gradient. A number
    sets the same absolute epsilon (intensity/mm) for both images; a pair sets ``(eps_fixed, eps_moving)``.
    Because of epsilon, identical images give a small positive cost rather than exactly 0 (the voxels whose
    gradient magnitude is comparable to epsilon are down-weighted: a few percent with the default on smooth
    random images); pass a small absolute ``eps`` for a sharper optimum.

    Gradient: with :math:`g = \nabla M`, :math:`c = \langle n_F, g\rangle / \|g\|_\epsilon`,

    .. math:: \frac{\partial\,\mathrm{cost}}{\partial M} = \nabla^{\!*} v, \qquad
              v = -\frac{2}{N}\,\mathbb 1_\Omega\, \frac{c}{\|g\|_\epsilon}\Big(n_F - c\,\frac{g}{\|g\|_\epsilon}\Big)
              \;\Big[ + \frac{2\eta^2}{N^2}\,\mathbb 1_\Omega\, g \sum_\Omega \frac{c^2}{\|g\|^2_\epsilon}\Big]

    where :math:`\nabla^*` is the exact adjoint of the discrete gradient (a discrete :math:`-\mathrm{div}`) and the
    bracketed term comes from the relative epsilon.

    Parameters
    ----------
    fixed, moving : ndarray
        Real 2-D or 3-D arrays of the same shape.
    spacing : float or sequence of float
        mm per voxel in array-axis order.
    eps : None, float or (float, float)
        Edge parameter, see above.
    mask : ndarray of bool, optional
        Voxels that count (``None``: all).
    gradient : bool
        Also return ``dcost/dM``.

    Returns
    -------
    value : float
        The cost in [0, 1].
    grad : ndarray
        Only with ``gradient=True``.
    """
    F, M, w, odt = _prepare(fixed, moving, mask)
    sp = _check_spacing(spacing, F.ndim)
    pair = _ngf_eps(eps)
    nd = F.ndim
    N = float(np.count_nonzero(w))
    wf = w.astype(np.float64)
    weights = [_diff_weights(w, ax) for ax in range(nd)]
    gF = [_grad_axis(F, *weights[ax], sp[ax], ax) for ax in range(nd)]
    gM = [_grad_axis(M, *weights[ax], sp[ax], ax) for ax in range(nd)]
    sqF = sum(g * g for g in gF)
    sqM = sum(g * g for g in gM)
    if pair is None:
        eF2 = NGF_ETA ** 2 * float(sqF[w].sum()) / N
        eM2 = NGF_ETA ** 2 * float(sqM[w].sum()) / N
    else:
        eF2, eM2 = pair[0] ** 2, pair[1] ** 2
    normF = np.sqrt(sqF + eF2 + _TINY)
    normM = np.sqrt(sqM + eM2 + _TINY)
    nF = [g / normF for g in gF]
    c = sum(a * b for a, b in zip(nF, gM)) / normM
    value = float((1.0 - c * c)[w].sum()) / N
    grad = None
    if gradient:
        k = (-2.0 / N) * wf * c / normM
        v = [k * (a - c * b / normM) for a, b in zip(nF, gM)]
        if pair is None:
            kappa = float((c * c / (normM * normM))[w].sum()) / N
            s = kappa * NGF_ETA ** 2 * 2.0 / N
            v = [vi + s * wf * b for vi, b in zip(v, gM)]
        grad = sum(_grad_axis_adjoint(v[ax], *weights[ax], sp[ax], ax) for ax in range(nd))
    return _finish(value, grad, gradient, odt)
