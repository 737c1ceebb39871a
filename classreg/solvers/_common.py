"""Helpers shared by the image solvers: argument checks, intensity scaling, the init-affine index map, the parameters
every Result records, and the one finalisation of a dense map (field + inverse + chain with ``init`` + warped image)."""
from __future__ import annotations

import contextlib
import logging

import numpy as np

from ..image import Image
from ..transforms import Affine, Chain

__all__ = [
    "backend_name",
    "check_init",
    "check_masks",
    "check_memory",
    "check_not_constant",
    "check_overlap",
    "check_pair",
    "common_params",
    "field_result",
    "index_map",
    "mean_sq",
    "normalise_intensities",
    "one_blas_thread",
    "tiny_like",
    "tiny_pair",
    "warm_key",
    "warp_through",
]


@contextlib.contextmanager
def one_blas_thread():
    """The BLAS thread pool limited to one thread (threadpoolctl, when installed) for the duration.

    The solvers' BLAS calls are small (an optimiser's vector products, LDDMM's band-limited matrix products, BCPD's
    M×K by K×K products, the (N, ndim) point maps of a result) and alternate with numba-parallel kernels; a
    multi-threaded OpenBLAS then competes with numba's OpenMP workers, which spin after every parallel region, and
    the small products become several times slower (measured: 0.3 ms → 7-46 ms per band-limited product on 2 cores;
    docs/notes/points.md, docs/notes/parametric.md). One thread also makes the sums independent of the thread count.
    The controller (which lists the loaded libraries, ~1 ms) is made once per process.
    """
    try:
        if not _BLAS_CONTROLLER:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER.append(ThreadpoolController())
        ctx = _BLAS_CONTROLLER[0].limit(limits=1, user_api="blas")
    except Exception:  # noqa: BLE001 - threadpoolctl missing or failing (any error): run unchanged
        ctx = contextlib.nullcontext()
    with ctx:
        yield


_BLAS_CONTROLLER = []


def backend_name(backend) -> str:
    """The kernel backend that ``backend`` resolves to (recorded in ``Result.params``)."""
    from ..kernels._backend import resolve_backend

    return resolve_backend(backend)


def common_params(*, init: Affine | None, dtype, seed, backend) -> dict:
    """The entries every image solver's ``Result.params`` holds besides its own options (``init`` as a homogeneous
    matrix, omitted for a solver that takes none)."""
    from ..backend import versions

    out = {"dtype": str(np.dtype(dtype)), "seed": seed, "backend": backend_name(backend), "versions": versions()}
    if init is not None:
        out["init"] = init.homogeneous.tolist()
    return out


def mean_sq(f, w, mask) -> float:
    """Mean squared difference of two arrays over ``mask`` (all voxels if None), in float64, on their device."""
    from ..kernels._backend import get_array_module

    xp = get_array_module(f, w)
    d = xp.asarray(f, dtype=np.float64) - xp.asarray(w, dtype=np.float64)
    if mask is not None:
        d = d[xp.asarray(mask)]
    return float(xp.mean(d * d))


def field_result(fixed: Image, moving: Image, init: Affine, forward, inverse, **result_fields):
    """The :class:`~classreg.Result` of a dense-map solver.

    ``forward`` is the array-frame displacement (mm, on the fixed grid) of the fixed → moving map estimated on top
    of ``init``, ``inverse`` that of its inverse (from the flow, not a numerical inversion). The transform is the
    field, chained with ``init`` unless it is the identity; ``warped`` is ``moving`` resampled through it.
    """
    from ..resample import resample
    from ..result import Result
    from ..transforms import DisplacementField

    field = DisplacementField.from_array_frame(forward, fixed)
    field_inv = DisplacementField.from_array_frame(inverse, fixed, inverse=field)
    field = DisplacementField(field.image, inverse=field_inv)
    if np.allclose(init.homogeneous, np.eye(fixed.ndim + 1)):
        transform, inv = field, field_inv
    else:
        transform, inv = Chain([field, init]), Chain([init.inverse(), field_inv])
    warped = resample(moving, transform, reference=fixed)
    return Result(transform=transform, inverse=inv, warped=warped, reference=fixed, **result_fields)


def check_pair(fixed, moving) -> None:
    """Both are scalar :class:`Image` objects of the same dimension."""
    for name, img in (("fixed", fixed), ("moving", moving)):
        if not isinstance(img, Image):
            raise TypeError(f"{name} must be a classreg.Image, got {type(img).__name__}")
        if img.is_vector:
            raise ValueError(f"{name} must be a scalar image, got {img.ncomponents} components")
    if fixed.ndim != moving.ndim:
        raise ValueError(f"dimension mismatch: fixed is {fixed.ndim}-D, moving is {moving.ndim}-D")
    for name, img in (("fixed", fixed), ("moving", moving)):
        if min(img.shape) < MIN_VOXELS:
            hint = " (a single slice: pass it as a 2-D image)" if img.ndim == 3 and min(img.shape) == 1 else ""
            raise ValueError(f"{name} has only {min(img.shape)} voxel(s) along an axis (shape {img.shape}); classreg "
                             f"registers images of at least {MIN_VOXELS} voxels per axis{hint}")


#: fewest voxels along any axis of an image a solver accepts
MIN_VOXELS = 4

#: smallest physical overlap of the two images, as a fraction of the smaller one's volume, that a solver accepts
MIN_OVERLAP = 0.01


def _extent(image: Image, transform=None) -> np.ndarray:
    """Physical bounding box (2, ndim) of an image's voxel-centre box, optionally mapped by ``transform``."""
    n = image.ndim
    corners = np.array(np.meshgrid(*[[0.0, s - 1.0] for s in image.shape], indexing="ij")).reshape(n, -1).T
    pts = image.index_to_world(corners)
    if transform is not None:
        pts = transform.map_points(pts)
    return np.stack([pts.min(axis=0), pts.max(axis=0)])


def check_overlap(fixed: Image, moving: Image, init=None, *, min_fraction: float = MIN_OVERLAP) -> float:
    """Refuse a pair that does not overlap in physical space (after ``init``, fixed → moving) before any work.

    The overlap is estimated on a coarse grid of fixed voxel centres (at most 16 per axis) mapped by ``init``: the
    fraction inside the moving image's voxel box, times the fixed volume, over the smaller of the two volumes. Below
    ``min_fraction`` (1 %: a gross origin/direction error such as a scanner origin metres away, while a partial
    field of view still passes) a ValueError names both physical extents. Returns the overlap fraction.
    """
    n = fixed.ndim
    axes = [np.linspace(0.0, s - 1.0, min(s, 16)) for s in fixed.shape]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, n)
    pts = fixed.index_to_world(idx)
    if init is not None:
        pts = init.map_points(pts)
    cidx = moving.world_to_index(pts)
    inside = np.all((cidx >= -0.5) & (cidx <= np.asarray(moving.shape, dtype=float) - 0.5), axis=1)
    vol_f = float(np.prod(np.asarray(fixed.shape) * np.asarray(fixed.spacing[::-1])))
    vol_m = float(np.prod(np.asarray(moving.shape) * np.asarray(moving.spacing[::-1])))
    fraction = float(inside.mean()) * vol_f / min(vol_f, vol_m)
    if fraction < min_fraction:
        ef, em = _extent(fixed, init), _extent(moving)

        def box(e):
            return " × ".join(f"[{a:.1f}, {b:.1f}]" for a, b in zip(e[0], e[1]))

        raise ValueError(
            f"the fixed and moving images do not overlap in physical space{' after init' if init is not None else ''}"
            f" ({100 * fraction:.2g} % of the smaller image; at least {100 * min_fraction:g} % needed): fixed "
            f"{'(mapped by init) ' if init is not None else ''}spans {box(ef)} mm, moving spans {box(em)} mm (x, y"
            f"{', z' if n == 3 else ''}). Check the images' origins and directions, or give init= (e.g. "
            f"classreg.register_affine(fixed, moving).transform or register_rigid for large misalignments)")
    return fraction


#: peak memory above the baseline of an imported classreg, in copies of the larger image at the working precision,
#: measured with ``ru_maxrss`` on smooth 96³ and 144³ float32 pairs with the default schedules (docs/notes/memory.md):
#: demons 52.5 / 54.7, LDDMM band-limited 87.8 / 89.5 (method="full": 793 / 642), affine 21.3 / 21.3, B-spline
#: 82.0 / 79.0; rigid 123.3 at 64³ only (rounded up)
#: metamorphosis: estimated as method="full" plus the source residual R_k stored per time step (not measured yet)
#: vp: 757 at 64³ and 635 at 96³ (the padded grid's float64 fields and L-BFGS pairs; more copies on small images,
#: where the 8-node padding is a larger share; docs/notes/vp.md)
MEMORY_COPIES = {"demons": 56.0, "lddmm": 92.0, "lddmm_full": 800.0, "metamorphosis": 900.0, "affine": 22.0,
                 "bspline": 84.0, "rigid": 124.0, "vp": 760.0}


class MemoryLimitError(MemoryError, ValueError):
    """The estimated memory of a registration exceeds what it may use."""


def available_memory_mb() -> float | None:
    """MemAvailable of /proc/meminfo (Linux) or psutil's figure, in MB; None if neither is known."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:
        return None


def check_memory(solver: str, fixed: Image, moving: Image, dtype, memory_limit=None, *, fix: str = "") -> float:
    """Estimate a call's memory (MB) from the image sizes and refuse it, before any work, if it exceeds
    ``memory_limit`` (MB; default: the memory available now). Returns the estimate (recorded in Result.params)."""
    itemsize = np.dtype(dtype).itemsize if solver in ("demons", "lddmm", "lddmm_full", "metamorphosis", "rigid") else 4  # parametric: float32
    voxels = max(int(np.prod(fixed.shape)), int(np.prod(moving.shape)))
    estimate = MEMORY_COPIES[solver] * voxels * itemsize / 2**20
    limit = available_memory_mb() if memory_limit is None else float(memory_limit)
    if limit is not None and estimate > limit:
        raise MemoryLimitError(
            f"register_{solver.split('_')[0]} on {' × '.join(map(str, fixed.shape))} voxels would need about {estimate:,.0f} MB "
            f"(measured: ~{MEMORY_COPIES[solver]:g} copies of the larger image at {np.dtype(dtype).name if itemsize == np.dtype(dtype).itemsize else 'float32'}),"
            f" more than the {limit:,.0f} MB {'allowed (memory_limit)' if memory_limit is not None else 'available'}."
            f" Crop the images to the region of interest, resample them to a coarser spacing"
            f"{', use dtype=float32' if itemsize == 8 else ''}{fix}, or raise memory_limit if more memory is free")
    return float(estimate)


def check_masks(fixed: Image, moving: Image, fixed_mask, moving_mask):
    """Both masks as boolean arrays on their images' grids (or None); an empty mask is an error."""
    from ..image import as_mask

    fmask = as_mask(fixed_mask, fixed, "fixed_mask")
    mmask = as_mask(moving_mask, moving, "moving_mask")
    for name, m in (("fixed_mask", fmask), ("moving_mask", mmask)):
        if m is not None and not bool(np.asarray(m).any()):
            raise ValueError(f"{name} is empty; give a mask with at least one voxel inside, or None")
    return fmask, mmask


def check_not_constant(image: Image, name: str, mask=None) -> None:
    """``image`` takes more than one value (inside ``mask``, a boolean array on its grid, when given): a constant
    image has nothing to register; every metric would stay flat and the solver would return its start."""
    a = np.asarray(image.numpy())
    values = a[np.asarray(mask, dtype=bool)] if mask is not None else a
    if not values.size or values.max() <= values.min():
        where = f" inside {name}_mask" if mask is not None else ""
        raise ValueError(f"{name} is a constant image{where}; there is nothing to register")


def check_init(init, ndim: int) -> Affine:
    """``init`` as one :class:`Affine` (identity if None); a Chain of affines is merged."""
    if init is None:
        return Affine.identity(ndim)
    if isinstance(init, Chain):
        init = init.simplified()
    if not isinstance(init, Affine):
        raise TypeError(f"init must be an Affine (or a Chain of affines), got {type(init).__name__}")
    if init.ndim != ndim:
        raise ValueError(f"init is {init.ndim}-D but the images are {ndim}-D")
    return init


#: how far (fractions of the fixed image's 0.5-99.5 percentile range) the moving image's 0.5 and 99.5 percentiles may
#: lie from the fixed ones for :func:`same_intensity_scale`. The high percentile (the brightest tissue) sets the
#: scale: the benchmark's same-scale pairs differ there by at most 4 % of the range (lung2d), the cross-scale ones by
#: 49-52 % (inter3d and its 2-D slices: ITK's T1 at half MNI152's range) or far more (brain2d), and 50 % called one
#: inter3d slice "one scale". The low percentile is the background, or the zeros that resampling pads a warped image
#: with (a warped texture: 42-67 % of the range), so it keeps the wider bound.
SAME_SCALE_TOLERANCE = {"low": 0.5, "high": 0.25}


def same_intensity_scale(fixed: Image, moving: Image, fmask=None, mmask=None):
    """Whether the two images are on one intensity scale: the moving image's 0.5 and 99.5 percentiles (inside its
    mask) lie within half and a quarter (:data:`SAME_SCALE_TOLERANCE`) of the fixed image's percentile range of the
    fixed ones. Returns ``(same, (lo_m, hi_m), (lo_f, hi_f))``. The rule behind ``intensity="auto"`` and
    ``metric="auto"`` (register_lddmm, register_demons): two scans of one protocol pass it, a pair from different
    scanners or file conventions (0-255 against raw units, or one at half the other's range) does not. It looks at
    ranges only: two modalities stored on one scale (T1 and T2 both in 0-255) pass."""
    f = np.asarray(fixed.numpy(), dtype=np.float64)
    m = np.asarray(moving.numpy(), dtype=np.float64)
    f = f[np.asarray(fmask)] if fmask is not None else f
    m = m[np.asarray(mmask)] if mmask is not None else m
    lo_f, hi_f = (float(x) for x in np.percentile(f, [0.5, 99.5]))
    lo_m, hi_m = (float(x) for x in np.percentile(m, [0.5, 99.5]))
    span = hi_f - lo_f if hi_f > lo_f else max(float(np.ptp(f)), 1e-30)
    tol = SAME_SCALE_TOLERANCE
    same = abs(lo_m - lo_f) <= tol["low"] * span and abs(hi_m - hi_f) <= tol["high"] * span
    return bool(same), (lo_m, hi_m), (lo_f, hi_f)


def resolve_auto_metric(solver, metric, one_scale, across, fixed, moving, fmask=None, mmask=None, device="cpu"):
    """``metric``, or for ``"auto"`` ``one_scale`` when the images are on one intensity scale
    (:func:`same_intensity_scale`) and ``across`` when not — ``one_scale`` on the device, which has no MI term —,
    logged as ``"<solver>: metric='auto' -> ..."``. Returns ``(metric, same)``, ``same`` None when not ``"auto"``."""
    if metric != "auto":
        return metric, None
    same, (lo_m, hi_m), (lo_f, hi_f) = same_intensity_scale(fixed, moving, fmask, mmask)
    chosen = one_scale if same or device == "cuda" else across
    logging.getLogger("classreg").info(
        "%s: metric='auto' -> '%s'%s (moving 0.5-99.5 %% range [%.4g, %.4g], fixed [%.4g, %.4g])", solver, chosen,
        " (the device has no MI term)" if not same and device == "cuda" else "", lo_m, hi_m, lo_f, hi_f)
    return chosen, same


def normalise_intensities(fixed: Image, moving: Image, fmask, intensity: str, dtype):
    """Both images on one intensity scale: [0, 1] by the fixed image's 0.5-99.5 percentiles (inside its mask),
    after histogram matching of the moving image when ``intensity == "match"`` (SimpleITK ``HistogramMatching``,
    1024 levels, 7 match points, thresholded at the mean, as in ITK's demons examples)."""
    check_not_constant(fixed, "fixed")
    check_not_constant(moving, "moving")
    f = np.asarray(fixed.numpy(), dtype=np.float64)
    m = np.asarray(moving.numpy(), dtype=np.float64)
    if intensity == "match":
        import SimpleITK as sitk

        matched = sitk.HistogramMatching(moving.astype(np.float32).to_sitk(), fixed.astype(np.float32).to_sitk(),
                                         numberOfHistogramLevels=1024, numberOfMatchPoints=7,
                                         thresholdAtMeanIntensity=True)
        m = sitk.GetArrayFromImage(matched).astype(np.float64)
    sample = f[np.asarray(fmask)] if fmask is not None else f
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        raise ValueError("fixed is a constant image inside fixed_mask; there is nothing to register")
    scale = 1.0 / (hi - lo)
    return (fixed.like(((f - lo) * scale).astype(dtype)), moving.like(((m - lo) * scale).astype(dtype)))


def index_map(moving: Image, reference: Image, init: Affine):
    """``(matrix, offset, disp_matrix)`` taking (reference index i, array-frame displacement d in mm) to the moving
    index of ``init(x_i + d)`` — the arguments of :func:`classreg.kernels.warp.warp`."""
    n = reference.ndim
    left = moving.inverse_affine @ init.homogeneous
    total = left @ reference.affine
    disp_matrix = left[:n, :n] @ reference.direction_matrix[:, ::-1]
    return total[:n, :n], total[:n, n], disp_matrix


def warp_through(image: Image, reference: Image, init: Affine, disp, backend, *, cval=0.0, order=1):
    """``image`` sampled at ``init(x + disp(x))`` for every voxel x of ``reference`` (array-frame mm ``disp``)."""
    from ..kernels.warp import warp

    m, off, dm = index_map(image, reference, init)
    return warp(image.data, disp, matrix=m, offset=off, disp_matrix=dm, out_shape=reference.shape, order=order,
                mode="itk", cval=cval, backend=backend)


# ------------------------------------------------------------------------------------------------ kernel warm-ups
def tiny_pair(ndim: int, fixed_dtype=np.float32, moving_dtype=np.float32, size: int | None = None):
    """A small smooth synthetic pair for kernel warm-ups (:class:`classreg.progress.Progress` ``warm_up``): a
    Gaussian blob on a ``size``^ndim grid of 1 mm and the same blob one voxel further along x, stored with the
    given dtypes (integer types scaled to 0-200), so that a solver run on it compiles the kernel signatures a run
    on real images of those dtypes uses.

    The default size (24 pixels in 2-D, 20 voxels in 3-D) exceeds 16 along x: the Gaussian kernel switches from its
    row to its column variant above 16 contiguous samples (kernels/smooth.py), and a smaller warm-up left that
    compile (5.6 s measured) inside the bar's first iteration."""
    from ..image import Image

    size = (24 if ndim == 2 else 20) if size is None else int(size)

    g = np.indices((size,) * ndim, dtype=np.float64)
    c = (size - 1) / 2.0
    f = np.exp(-sum((gi - c) ** 2 for gi in g) / (2.0 * (size / 5.0) ** 2))
    m = np.roll(f, 1, axis=-1)

    def cast(a, dt):
        dt = np.dtype(dt)
        return (a * (200.0 if dt.kind in "iu" else 1.0)).astype(dt)

    return Image(cast(f, fixed_dtype), 1.0), Image(cast(m, moving_dtype), 1.0)


def tiny_like(fixed: Image, moving: Image, size: int | None = None):
    """:func:`tiny_pair` with the dimension and dtypes of ``fixed`` and ``moving``, on their device, and the
    masks a warm-up passes where the real call has masks (all ones)."""
    from ..kernels._backend import is_cupy_array

    f, m = tiny_pair(fixed.ndim, fixed.dtype, moving.dtype, size)
    if is_cupy_array(fixed.data):
        f, m = f.to("cuda"), m.to("cuda")
    return f, m, f.like(np.ones(f.shape, dtype=np.uint8)), m.like(np.ones(m.shape, dtype=np.uint8))


def warm_key(fixed: Image, moving: Image, *options) -> tuple:
    """What a warm-up compiles: dimension, device and dtypes of the images, and the kernel-selecting options."""
    from ..kernels._backend import is_cupy_array

    return (fixed.ndim, is_cupy_array(fixed.data), str(fixed.dtype), str(moving.dtype), *map(repr, options))
