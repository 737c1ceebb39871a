"""The parametric engine: a sampled metric of ``M(T_p(pre(x)))`` against ``F(x)`` and its gradient in ``p``, and the
per-level optimisation shared by ``register_affine`` and ``register_bspline``.

At every iteration the sampler draws positions ``x_j`` on the fixed level image; ``y_j = pre(x_j)`` (the initial
transform, elastix's ``Compose``), ``z_j = T_p(y_j)``. The moving image and its gradient are read at ``z_j`` in one
pass (:data:`INTERPOLATIONS`; with linear interpolation the gradient is one of :data:`IMAGE_GRADIENTS`);
samples that leave the moving image or its mask are dropped (elastix: "Too many samples map outside moving image
buffer" below ``min_valid`` of them). With the metric's per-sample derivative ``∂C/∂m_j`` the gradient is the chain
rule ``∂C/∂p = Σ_j ∂C/∂m_j ∇M(z_j)ᵀ ∂T/∂p(y_j)``, done by the model (an affine family in closed form, the B-spline
grid by its adjoint kernel). Regularisers (the bending energy) are the model's ``penalty``.
"""
from __future__ import annotations

import numpy as np

from ...kernels._backend import is_cupy_array
from ...kernels.bspline import mi_step_kernel, mi_step_workspace
from ...kernels.sampling import linear_at, linear_grad_at
from ...progress import similarity
from ...terms.measures import intensity_limits, mattes_mi_samples
from .sampling import Sampler

__all__ = ["IMAGE_GRADIENTS", "INTERPOLATIONS", "METRICS", "LevelObjective", "metric_terms", "sample_metric"]

#: registration-time interpolation of the moving image -> (B-spline order, elastix Interpolator)
INTERPOLATIONS = {"nearest": (0, "NearestNeighborInterpolator"), "linear": (1, "LinearInterpolator"),
                  "bspline2": (2, "BSplineInterpolator, BSplineInterpolationOrder 2"),
                  "bspline3": (3, "BSplineInterpolator, BSplineInterpolationOrder 3")}

#: the moving image's gradient with linear interpolation -> what it is
IMAGE_GRADIENTS = {"smoothed": "central differences on the moving grid, interpolated linearly",
                   "exact": "the gradient of the linear interpolant (elastix LinearInterpolator)"}

#: metric name -> what it is (elastix name)
METRICS = {"mi": "AdvancedMattesMutualInformation", "nmi": "NormalizedMutualInformation",
           "ncc": "AdvancedNormalizedCorrelation", "ssd": "AdvancedMeanSquares"}


def sample_metric(name, f, m, *, bins=32, fixed_limits=None, moving_limits=None, backend=None):
    """``(cost, ∂cost/∂m)`` of paired samples ``f``, ``m`` (1-D float64 arrays).

    ``mi``/``nmi``: negative (normalised) Mattes mutual information (:func:`classreg.terms.measures.
    mattes_mi_samples`); ``ncc``: negative Pearson correlation (elastix ``AdvancedNormalizedCorrelation``,
    ``SubtractMean true``); ``ssd``: the mean squared difference ``(1/N) Σ (m − f)²`` (elastix
    ``AdvancedMeanSquares``).
    """
    n = f.size
    if name in ("mi", "nmi"):
        return mattes_mi_samples(f, m, bins=bins, gradient=True, fixed_limits=fixed_limits,
                                 moving_limits=moving_limits, normalised=name == "nmi", backend=backend)
    if name == "ssd":
        r = m - f
        return float(np.dot(r, r)) / n, 2.0 * r / n
    if name == "ncc":
        fc, mc = f - f.mean(), m - m.mean()
        a, b, c = float(np.dot(fc, mc)), float(np.dot(fc, fc)), float(np.dot(mc, mc))
        if b <= 0.0 or c <= 0.0:
            return 0.0, np.zeros(n)
        s = np.sqrt(b * c)
        return -a / s, -fc / s + (a / s) * mc / c
    raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")


def metric_terms(metric):
    """``[(name, weight), ...]`` of a metric given as a name of :data:`METRICS` (weight 1) or as a weighted sum: a
    mapping ``{name: weight}`` or a sequence of ``(name, weight)`` pairs (weights finite and > 0, names distinct)."""
    if isinstance(metric, str):
        pairs = [(metric, 1.0)]
    else:
        try:
            pairs = [(str(n), float(w)) for n, w in (metric.items() if hasattr(metric, "items") else metric)]
        except (TypeError, ValueError):
            raise ValueError(f"a metric is a name ({', '.join(METRICS)}) or a weighted sum such as "
                             f"{{'mi': 1.0, 'ncc': 0.5}}, got {metric!r}") from None
    if not pairs:
        raise ValueError("the weighted sum of metrics is empty")
    for name, w in pairs:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
        if not (np.isfinite(w) and w > 0):
            raise ValueError(f"the weight of metric {name!r} must be finite and > 0, got {w}")
    if len({n for n, _ in pairs}) != len(pairs):
        raise ValueError(f"a metric appears twice in the weighted sum {pairs}")
    return pairs


def _tbb_layer() -> bool:
    """Whether numba's parallel kernels run on its TBB layer (the classreg-elastix server selects it). Only there
    does the parallel per-iteration affine kernel pay: two launches per iteration of a fraction of a millisecond each.
    Under OpenMP both threads must be scheduled at every launch, so on a machine with more runnable threads than cores
    affine3d took 10.8-12.1 s instead of 1.7 s (load 2.5, 2 cores); numba's workqueue layer costs 2-3x the run in
    system time at any load. TBB's calling thread runs the slices itself when the worker is not scheduled."""
    import numba

    try:
        return numba.threading_layer() == "tbb"
    except ValueError:  # no parallel launch yet: the layer numba will choose
        return numba.config.THREADING_LAYER == "tbb"


class LevelObjective:
    """The sampled cost on one pyramid level.

    Parameters
    ----------
    fixed, moving : Image
        The level images.
    fixed_mask, moving_mask : ndarray of bool or None
        On the level grids.
    model
        Maps points (``map(p, y)``), chains gradients (``gradient(p, y, w)``), gives a ``penalty(p)``.
    pre : Affine or None
        Initial transform applied to the fixed points before the model.
    metric : str or weighted sum
        See :data:`METRICS` and :func:`metric_terms`: value and ``∂C/∂m_j`` are the weighted sums of the terms', on
        the same samples.
    sampler : Sampler
    rng : numpy.random.Generator
    bins : int
        Histogram bins of MI.
    min_valid : float
        Smallest fraction of samples that must land inside the moving image (and mask).
    new_samples : bool
        Draw new samples at every iteration (elastix ``NewSamplesEveryIteration``).
    backend : str or None
        Kernel backend of the interpolation.
    device : {"cpu", "cuda"}
        ``"cuda"``: the level's moving stack goes to the GPU once and each evaluation runs there
        (:class:`.device.DeviceAffineMI` for an affine-family model, :class:`.device.DeviceBSplineMI` for a
        B-spline one) when the level is on the device path's ground (linear interpolation, one Mattes MI term;
        :meth:`device_covers`); the samples go up once per level (:meth:`predraw`) or per explicit draw. A B-spline
        level's coefficients and gradients are device arrays there (:meth:`resident`). Otherwise, and on ``"cpu"``,
        the host path.
    interpolation : str
        See :data:`INTERPOLATIONS`. ``linear``: the value interpolated linearly and the gradient as
        ``image_gradient`` says; ``bspline2``/``bspline3``: value and the exact gradient of the
        B-spline interpolant (:func:`classreg.kernels.sampling.bspline_at`, coefficients once per level, mirror
        boundary as ITK); ``nearest``: the nearest voxel's value and central-difference gradient (elastix's non-B-spline
        interpolators take the gradient from the gradient image at the nearest voxel).
    image_gradient : str
        See :data:`IMAGE_GRADIENTS`; read with ``linear`` interpolation only. ``smoothed``: the stack holds the
        value, the central-difference gradient (index units) and the mask, all interpolated linearly
        (:func:`classreg.kernels.sampling.linear_at`); ``exact``: the stack holds the value and the mask, the
        gradient is that of the linear interpolant (:func:`classreg.kernels.sampling.linear_grad_at`; the fused
        B-spline iteration, :meth:`_bspline_setup`, computes only this one).
    """

    def __init__(self, fixed, moving, fixed_mask, moving_mask, *, model, pre, metric, sampler: Sampler, rng,
                 bins=32, min_valid=0.25, new_samples=True, backend=None,
                 interpolation="linear", image_gradient="smoothed", device="cpu"):
        from ...kernels._backend import HAVE_NUMBA
        from ...kernels.diff import gradient
        from ...terms.measures import LIMIT_RANGE_RATIO, _bins

        self._host_backend = "numpy" if backend == "numpy" else None
        # the hot loop calls the compiled kernels directly (arrays validated here, once)
        self._fast = HAVE_NUMBA and backend != "numpy"
        if self._fast:
            from ...kernels.sampling import linear_kernel, mattes_mi_kernel

            self._lin = linear_kernel(fixed.ndim)
            self._mi = mattes_mi_kernel()
        self.terms = metric_terms(metric)
        self.model, self.metric, self.sampler, self.rng = model, metric, sampler, rng
        self.bins, self.min_valid, self.new_samples, self.backend = bins, float(min_valid), new_samples, backend
        n = fixed.ndim
        self.ndim = n
        self.fdata = np.ascontiguousarray(fixed.numpy(), dtype=np.float32)[..., None]
        # fixed index -> y = pre(x): one matrix (the fixed grid's affine, then the initial transform)
        to_y = fixed.affine if pre is None else np.asarray(pre.homogeneous, dtype=float) @ fixed.affine
        self._y_lin, self._y_off = np.ascontiguousarray(to_y[:-1, :-1].T), to_y[:-1, -1].copy()
        m = np.asarray(moving.numpy(), dtype=np.float64)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        if image_gradient not in IMAGE_GRADIENTS:
            raise ValueError(f"unknown image_gradient {image_gradient!r}; valid: {', '.join(IMAGE_GRADIENTS)}")
        self.order = INTERPOLATIONS[interpolation][0]
        #: the gradient of the linear interpolant, from a value (/mask) stack (linear interpolation only)
        self.exact = self.order == 1 and image_gradient == "exact"
        # float32: the scattered reads of an iteration are memory-bound (values and sums stay float64); filled
        # channel by channel (no float64 stack of the image's size)
        ngrad = 0 if self.exact else n
        self.stack = np.empty(m.shape + (1 + ngrad + (moving_mask is not None),), dtype=np.float32)
        self.stack[..., 0] = m
        if ngrad:
            self.stack[..., 1:1 + n] = gradient(m, spacing=1.0, backend=backend)
        if moving_mask is not None:
            self.stack[..., -1] = np.asarray(moving_mask, dtype=np.float32)
        self.has_mmask = moving_mask is not None
        if self.order >= 2:
            from ...kernels.sampling import bspline_coefficients

            self.coef = bspline_coefficients(m, self.order)
            # the mask is still read linearly (>= 0.5 inside), as on the linear path
            self.mask_stack = (None if moving_mask is None else
                               np.ascontiguousarray(np.asarray(moving_mask, dtype=np.float32)[..., None]))
            if self._fast:
                from ...kernels.sampling import bspline_kernel

                self._bs = bspline_kernel(n)
        minv = moving.inverse_affine
        self.m_lin, self.m_off = minv[:n, :n], minv[:n, n]
        self.fixed_limits = intensity_limits(self.fdata[..., 0], mask=fixed_mask)
        self.moving_limits = intensity_limits(m, mask=moving_mask)
        lo, hi = self.moving_limits
        d = LIMIT_RANGE_RATIO * (hi - lo) / (1.0 + 2.0 * LIMIT_RANGE_RATIO)  # where the moving limiter starts
        self._mi_args = {nm: (*_bins(bins), *self.fixed_limits, lo, hi, lo + d, hi - d, nm == "nmi", 1e-16)
                         for nm in ("mi", "nmi")}
        self._cached = self._cached_points = None
        self._buffers = None
        self._fused = self._fused_setup()
        #: the scattered reads of one iteration, which decide whether its kernels get more than one thread
        #: (:func:`classreg.kernels._backend.serial_below`): B-spline taps, or linear corners × interpolated values
        #: (value, gradient, mask: read from channels or, with the exact gradient, computed from the value's corners)
        self.parallel_work = sampler.size * (4 ** n if hasattr(model, "grid_map") else
                                             2 ** n * (1 + n + self.has_mmask))
        self._sampled = self._sampled_setup()
        self._bspline_step = self._bspline_setup(model, to_y, minv)
        self._device = None
        from .models import AffineModel

        if device == "cuda" and self.device_covers(self.order, self.terms):
            from .device import DeviceAffineMI, DeviceBSplineMI

            kw = {"has_mask": self.has_mmask, "exact_gradient": self.exact, "m_lin": self.m_lin,
                  "mi_args": self._mi_args["mi"]}
            if isinstance(model, AffineModel):
                self._device = DeviceAffineMI(self.stack, **kw)
            elif hasattr(model, "grid_map"):
                bending = None if model.bending_weight <= 0 else (model.bending_weight,
                                                                   tuple(reversed(model.grid.grid_spacing)))
                self._device = DeviceBSplineMI(self.stack, m_off=self.m_off, grid_map=model.grid_map(),
                                               grid_shape=model.shape[:-1], bending=bending, **kw)
        if self._device is not None:
            self._sampled = self._bspline_step = None  # the host kernels are not used on the device
            self._bank, self._uploaded = {}, (None, None)
        #: the Euclidean norm of the last device gradient (read with the evaluation's numbers)
        self.last_gradient_norm = float("nan")
        self.last_valid = 1.0
        self.last_similarity = float("nan")

    # ------------------------------------------------------------------ samples
    def draw(self, count=None):
        """``(y, f)``: one draw of sample points mapped by ``pre`` (mm, (N, n)) and the fixed values there."""
        return self._points(self.sampler.draw(self.rng, count))

    def _points(self, idx):
        """``(y, f)`` of the fixed indices ``idx``."""
        if self.sampler.kind == "random_coordinate" and self._fast:
            out = np.empty((len(idx), 1))
            self._lin(self.fdata, idx, out, np.empty(len(idx), dtype=np.bool_))  # every sample is inside
            f = out[:, 0]
        elif self.sampler.kind == "random_coordinate":
            f = linear_at(self.fdata, idx, backend=self._host_backend)[0][:, 0]
        else:
            near = tuple(np.rint(idx[:, d]).astype(np.intp) for d in range(self.ndim))
            f = self.fdata[near][:, 0].astype(np.float64)
        return idx @ self._y_lin + self._y_off, f

    def indices(self, k):
        """The fixed indices of iteration ``k``'s draw (cached for deterministic samplers or ``new_samples=False``)."""
        if self.sampler.deterministic or not self.new_samples:
            if self._cached is None:
                self._cached = self.sampler.draw(self.rng)
            return self._cached
        return self.sampler.draw(self.rng)

    def samples(self, k):
        """The draw of iteration ``k`` as ``(y, f)`` (see :meth:`draw`)."""
        idx = self.indices(k)
        if idx is self._cached:
            if self._cached_points is None:
                self._cached_points = self._points(idx)
            return self._cached_points
        return self._points(idx)

    # ------------------------------------------------------------------ the device path
    @staticmethod
    def device_covers(order, terms) -> bool:
        """Whether :class:`.device.DeviceAffineMI` (an affine-family level) or :class:`.device.DeviceBSplineMI` (a
        B-spline level) evaluates a level with interpolation ``order`` and metric ``terms``: linear interpolation
        (either image gradient) and one Mattes MI term."""
        return order == 1 and len(terms) == 1 and terms[0][0] == "mi"

    @property
    def on_device(self) -> bool:
        return self._device is not None

    def resident(self, p):
        """``p`` where the optimiser keeps it: on the device for a B-spline level evaluated there (its thousands
        of coefficients then never cross inside the level), else ``p`` itself (the affine family's few parameters
        enter the device evaluation as scalars)."""
        if self._device is not None and hasattr(self._device, "use_prior") and not is_cupy_array(p):
            return self._device.xp.asarray(np.ascontiguousarray(p, dtype=np.float64))
        return p

    def predraw(self, keys):
        """Device path: draw the samples of iterations ``keys`` now, in that order (the order the optimiser asks
        for them, so the run's random sequence is the CPU's), and upload them at once: the evaluations of those
        iterations then read them on the device (nothing crosses per iteration but the result's numbers)."""
        if self._device is None or self.sampler.deterministic or not self.new_samples:
            return
        keys = list(keys)
        draws = [self._points(self.sampler.draw(self.rng)) for _ in keys]
        xp = self._device.xp
        ys, fs = xp.asarray(np.stack([d[0] for d in draws])), xp.asarray(np.stack([d[1] for d in draws]))
        self._bank = {k: (ys[i], fs[i]) for i, k in enumerate(keys)}

    def _device_samples(self, k, samples):
        """The device copy of iteration ``k``'s draw (pre-drawn) or of ``samples`` / an undrawn iteration's draw
        (uploaded once per draw)."""
        if samples is None and k in self._bank:
            return self._bank[k]
        y, f = self.samples(k) if samples is None else samples
        last = self._uploaded[0]
        if last is None or y is not last[0] or f is not last[1]:
            xp = self._device.xp
            self._uploaded = ((y, f), (xp.asarray(np.ascontiguousarray(y, dtype=np.float64)),
                                       xp.asarray(np.ascontiguousarray(f, dtype=np.float64))))
        return self._uploaded[1]

    def _evaluate_device(self, p, k, samples, penalty):
        """:meth:`evaluate` on the device: ``(value, gradient, finite)``. Affine family
        (:class:`.device.DeviceAffineMI`): the parameters and the chain rule's last step stay on the host, the
        gradient is a host array. B-spline (:class:`.device.DeviceBSplineMI`): the coefficients (``p``, uploaded
        if given on the host) and the gradient are device arrays; the host gets the value, the count, the
        correlation, the gradient's norm and whether it is finite. Both are the CPU fused kernels' value and
        gradient up to the order of the sums."""
        y, f = self._device_samples(k, samples)
        weight = self.terms[0][1]
        if hasattr(self._device, "use_prior"):
            mdl = self.model
            if mdl.prior is not None:  # the earlier fold-free pieces (may change inside a level)
                self._device.use_prior(mdl.prior[0], mdl.prior_map)
            count, value, ncc, grad, norm, finite = self._device.evaluate(
                y, f, self.resident(p).reshape(mdl.shape), weight=weight, penalty=penalty)
            self._check_valid(count, len(f))
            self.last_similarity, self.last_gradient_norm = ncc, norm
            return value, grad, finite
        B, b, c, _, _, d = self._affine_setup(p)
        count, value, ncc, G, g = self._device.evaluate(y, f, B, b, c)
        self._check_valid(count, len(f))
        self.last_similarity = ncc
        grad = weight * self.model.gradient_from_sums(p, G, g, derivatives=d)
        return weight * value, grad, np.all(np.isfinite(grad))

    # ------------------------------------------------------------------ cost
    def moving_at(self, z):
        """Moving values, world gradients and the validity of points ``z`` (mm)."""
        idx = z @ self.m_lin.T + self.m_off
        if self.order >= 2:
            return self._moving_bspline(idx)
        if self.order == 0:
            idx = np.floor(idx + 0.5)  # the nearest voxel (ties upwards); inside when it is in the image
        if self.exact:
            vals, inside = linear_grad_at(self.stack, idx, backend=self._host_backend)
        elif self._fast:
            vals = np.empty((len(idx), self.stack.shape[-1]))
            inside = np.empty(len(idx), dtype=np.bool_)
            vals = vals[: self._lin(self.stack, idx, vals, inside)]
        else:
            vals, inside = linear_at(self.stack, idx, backend=self._host_backend)
        valid = inside.copy()
        if self.has_mmask:
            ok = vals[:, -1] >= 0.5
            valid[inside] = ok
            vals = vals[ok]
        g_world = vals[:, 1:1 + self.ndim] @ self.m_lin  # ∇_z M = (∂idx/∂z)ᵀ ∇_idx M
        return vals[:, 0], g_world, valid

    def _moving_bspline(self, idx):
        if self._fast:
            vals = np.empty((len(idx), 1 + self.ndim))
            inside = np.empty(len(idx), dtype=np.bool_)
            vals = vals[: self._bs(self.coef, idx, self.order, vals, inside)]
        else:
            from ...kernels.sampling import bspline_at

            vals, inside = bspline_at(self.coef, idx, self.order, backend=self._host_backend)
        valid = inside.copy()
        if self.has_mmask:
            mk, _ = linear_at(self.mask_stack, idx[inside], backend=self._host_backend)
            ok = mk[:, 0] >= 0.5
            valid[inside] = ok
            vals = vals[ok]
        return vals[:, 0], vals[:, 1:] @ self.m_lin, valid

    def _fused_setup(self):
        """The fused affine kernel (:func:`classreg.kernels.affine.affine_mi_kernel`) when it covers this level:
        numba, linear interpolation, an affine-family model and one MI/NMI term; else None (the step-by-step path)."""
        from .models import AffineModel

        if not (self._fast and self.order == 1 and isinstance(self.model, AffineModel) and len(self.terms) == 1
                and self.terms[0][0] in ("mi", "nmi")):
            return None
        from ...kernels.affine import affine_mi_kernel

        return affine_mi_kernel(self.ndim, exact_gradient=self.exact)

    def _sampled_setup(self):
        """The fused kernel that also samples the fixed image
        (:func:`classreg.kernels.affine.affine_mi_sampled_kernel`) for random-coordinate draws on the fused path:
        its parallel build on numba's TBB layer for enough work (see :func:`_tbb_layer`; below ``SERIAL_BELOW`` one
        thread is as fast, docs/notes/elastix.md), else its serial build, which saves the Python of a separate
        fixed-image read per iteration."""
        from ...kernels._backend import SERIAL_BELOW

        if self._fused is None or self.sampler.kind != "random_coordinate":
            return None
        from ...kernels.affine import NCHUNK, affine_mi_sampled_kernel

        nbf, nbm = self._mi_args[self.terms[0][0]][:2]
        parallel = self.parallel_work >= SERIAL_BELOW and _tbb_layer()
        self._hist = np.empty((NCHUNK if parallel else 1, nbf, nbm))
        self._sampled_work = None
        return affine_mi_sampled_kernel(self.ndim, exact_gradient=self.exact, parallel=parallel)

    def _affine_setup(self, p):
        """The fused kernels' per-iteration inputs: sample point → moving index ``B y + b``, the model's centre,
        the two chain-rule sums ``G``, ``g`` to fill, and the model's derivatives at ``p`` (for
        ``gradient_from_sums``)."""
        a, t, dA, dt = self.model.matrix(p, derivatives=True)
        c = self.model.center
        n = self.ndim
        return (self.m_lin @ a, self.m_lin @ (c + t - a @ c) + self.m_off, c, np.empty((n, n)), np.empty(n),
                (dA, dt))

    def _evaluate_sampled(self, p, idx):
        """:meth:`evaluate` of the fixed indices ``idx`` (a random-coordinate draw) in one kernel call."""
        n, N = self.ndim, len(idx)
        if self._sampled_work is None or len(self._sampled_work[1]) < N:
            self._sampled_work = (np.empty((N, 6 + 2 * n)), np.empty(N, dtype=np.bool_))
        B, b, c, G, g, d = self._affine_setup(p)
        name, weight = self.terms[0]
        count, value, ncc = self._sampled(self.stack, self.fdata, np.ascontiguousarray(idx, dtype=np.float64),
                                          self._y_lin, self._y_off, B, b, self.has_mmask, self.m_lin, c,
                                          *self._mi_args[name], *(w[:N] for w in self._sampled_work), self._hist, G, g)
        self._check_valid(count, N)
        self.last_similarity = float(ncc)
        return weight * value, weight * self.model.gradient_from_sums(p, G, g, derivatives=d)

    def _evaluate_fused(self, p, y, f):
        """:meth:`evaluate` in one kernel call (same value and gradient up to rounding; see ``_fused_setup``)."""
        n, N = self.ndim, len(y)
        if self._buffers is None or len(self._buffers[0]) < N:
            self._buffers = (np.empty(N), np.empty(N), np.empty((N, n)), np.empty((N, n)))
        mv, fv, gv, yv = self._buffers
        B, b, c, G, g, d = self._affine_setup(p)
        name, weight = self.terms[0]
        count, value, ncc = self._fused(self.stack, np.ascontiguousarray(y, dtype=np.float64),
                                        np.ascontiguousarray(f, dtype=np.float64), B, b, self.has_mmask, self.m_lin,
                                        c, *self._mi_args[name], mv, fv, gv, yv, G, g)
        self._check_valid(count, N)
        self.last_similarity = float(ncc)
        return weight * value, weight * self.model.gradient_from_sums(p, G, g, derivatives=d)

    def _bspline_setup(self, model, to_y, minv):
        """The fused B-spline iteration (:func:`classreg.kernels.bspline.mi_step_kernel`) when it covers this level:
        numba, linear interpolation with its exact gradient, a B-spline model and one MI/NMI term; else None. Sets
        its constant inputs."""
        if not (self._fast and self.exact and hasattr(model, "grid_map") and len(self.terms) == 1
                and self.terms[0][0] in ("mi", "nmi")):
            return None
        n = self.ndim
        self._maps = np.zeros((4, n, n + 1))  # fixed index -> y, y -> prior index, y -> grid index, -> moving index
        self._maps[0] = to_y[:-1]
        self._maps[2] = model.grid_map()
        self._maps[3] = minv[:n]
        a = self._mi_args[self.terms[0][0]]
        self._flags = np.array([a[0], a[1], a[8], 0, self.has_mmask], dtype=np.int64)
        self._par = np.array([*a[2:8], a[9]], dtype=np.float64)
        self._no_prior = np.zeros((1,) * n + (n,))
        self._work = None
        return mi_step_kernel(n)

    def _evaluate_bspline(self, p, idx, penalty):
        """:meth:`evaluate` in one kernel call (the step-by-step path's value and gradient with the exact gradient of
        the linear interpolant, up to rounding), plus the model's penalty."""
        mdl, n = self.model, self.ndim
        flags, prior = self._flags, self._no_prior
        if mdl.prior is not None:  # the earlier fold-free pieces (may change inside a level)
            prior, self._maps[1] = mdl.prior[0], mdl.prior_map
            flags = flags.copy()
            flags[3] = 1
        if self._work is None or len(self._work) < len(idx):
            self._work = mi_step_workspace(len(idx), n)
        grad = np.empty(mdl.shape)
        value, nvalid, sim = self._bspline_step(self.fdata, idx, self._maps, prior,
                                                np.ascontiguousarray(p, dtype=np.float64).reshape(mdl.shape),
                                                self.stack, flags, self._par, self._work, grad)
        self._check_valid(nvalid, len(idx))
        self.last_similarity = float(sim)
        weight = self.terms[0][1]
        value, grad = weight * value, weight * grad.ravel()
        if penalty:
            pv, pg = mdl.penalty(p)
            if pg is not None:
                value += pv
                grad = grad + pg
        return value, grad

    def _check_valid(self, nvalid, total):
        self.last_valid = nvalid / max(total, 1)
        if nvalid < max(self.min_valid * total, 2):
            raise ValueError(
                f"too many samples map outside the moving image{' or its mask' if self.has_mmask else ''}: "
                f"{nvalid} of {total} valid (fewer than {self.min_valid:.0%}); the images do not overlap after "
                "the initial transform — check the physical origins/directions, or use init='geometry' or "
                "init='global'")

    def evaluate(self, p, k=0, *, samples=None, penalty=True):
        """``(cost, gradient)`` at parameters ``p`` with the samples of iteration ``k`` (or ``samples``); on a
        device B-spline level the gradient is a device array (``p`` may be either)."""
        if self._device is not None:
            value, grad, finite = self._evaluate_device(p, k, samples, penalty)
        else:
            if self._bspline_step is not None and samples is None:
                value, grad = self._evaluate_bspline(p, self.indices(k), penalty)
            elif self._sampled is not None and samples is None:
                value, grad = self._evaluate_sampled(p, self.indices(k))
            else:
                y, f = self.samples(k) if samples is None else samples
                if self._fused is not None:
                    value, grad = self._evaluate_fused(p, y, f)
                else:
                    value, grad = self._evaluate_steps(p, y, f, penalty)
            finite = np.all(np.isfinite(grad))
        if not finite or not np.isfinite(value):
            raise FloatingPointError("the metric gradient is not finite (NaN/Inf in the images or an overflow); "
                                     "check the inputs")
        return float(value), grad

    def _evaluate_steps(self, p, y, f, penalty):
        """:meth:`evaluate` step by step: map, sample, metric, chain rule, penalty (every model and metric)."""
        z = self.model.map(p, y)
        m, g_world, valid = self.moving_at(z)
        self._check_valid(int(valid.sum()), len(y))
        # the normalised similarity of this draw (classreg.progress.similarity: NCC of the paired samples)
        self.last_similarity = similarity(f[valid], m)
        fv, m = f[valid], np.ascontiguousarray(m)
        value, dm = 0.0, np.zeros(len(m))
        for name, weight in self.terms:  # a weighted sum over the same samples (elastix Metric<i>Weight)
            if self._fast and name in ("mi", "nmi"):
                v, d = self._mi(fv, m, *self._mi_args[name])
            else:
                v, d = sample_metric(name, fv, m, bins=self.bins, fixed_limits=self.fixed_limits,
                                     moving_limits=self.moving_limits, backend=self._host_backend)
            value += weight * v
            dm += weight * d
        grad = self.model.gradient(p, y, dm[:, None] * g_world, valid)
        if penalty:
            pv, pg = self.model.penalty(p)
            if pg is not None:
                value += pv
                grad = grad + pg
        return value, grad

    def displacements(self, p, points):
        """``dp -> (N, n)``: how far a parameter step moves ``points`` (for the step-size estimation)."""
        return lambda dp: self.model.displacement(p, dp, points)
