"""The options of ``register_affine`` and ``register_bspline``, declared once (see :mod:`classreg.options`)."""
from __future__ import annotations

from ...options import Declaration, Option, shared
from .engine import IMAGE_GRADIENTS, INTERPOLATIONS, METRICS
from .models import MODELS
from .sampling import SAMPLERS

__all__ = ["AFFINE_OPTIONS", "BSPLINE_OPTIONS", "INIT_CHOICES", "OPTIMISERS", "parse_init", "parse_metric_weights"]

#: what ``init`` accepts besides a transform
INIT_CHOICES = ("geometry", "moments", "global", "identity")
OPTIMISERS = ("asgd", "gd", "rsgd", "lbfgs")


def parse_init(text: str):
    """Command line: one of :data:`INIT_CHOICES`, else a transform file."""
    if text in INIT_CHOICES:
        return text
    from ...transforms import load_transform

    return load_transform(text)


def parse_metric_weights(text: str):
    """Command line: ``mi=1,ncc=0.5`` -> ``(("mi", 1.0), ("ncc", 0.5))`` (checked by the engine)."""
    try:
        return tuple((n.strip(), float(w)) for n, w in (item.split("=") for item in text.split(",")))
    except ValueError:
        raise ValueError(f"--metric-weights takes NAME=WEIGHT pairs separated by commas, e.g. mi=1,ncc=0.5; got "
                         f"{text!r}") from None


def _report(kind):
    def report(res) -> str:
        m = res.metrics
        extra = ""
        if kind == "bspline":
            extra = f"; det J {m['min_det']:.3f}..{m['max_det']:.3f}, {m['percent_det_nonpositive']:.3g} % ≤ 0"
        return (f"{kind}: {res.params['metric']} {m['metric']:.4f} on {m['samples']} samples"
                f"{extra}; {res.timings['total']:.1f} s; {res.stop_reason}")
    return report


def _engine_options(iterations, image_gradient, samples=2048, samples_text=None):
    """Options shared by both solvers of the engine (after the transform-specific ones); ``iterations``,
    ``image_gradient`` and ``samples`` (with ``samples_text`` when it is None) are the solver's defaults."""
    return (
        shared("init", default="geometry", kind="transform", cli_parse=parse_init,
               help="initial fixed → moving transform, composed before the estimated one: 'geometry' (image "
                    "centres aligned, elastix GeometricalCenter), 'moments' (centres of mass), 'global' "
                    "(register_rigid's FFT search: any rotation), 'identity', or an Affine (a transform file on the "
                    "command line)"),
        shared("fixed_mask", help="where samples are drawn on the fixed image (an Image or array on its grid)"),
        shared("moving_mask", help="samples whose moving position falls outside it are dropped (on the moving "
                                   "image's grid)"),
        shared("shrink_factors", default=(4, 2, 1)),
        shared("smoothing_sigmas"),
        shared("iterations", default=iterations, help="optimiser iterations per pyramid level"),
        Option("samples", samples, "samples per iteration (elastix NumberOfSpatialSamples)", kind="int", low=16,
               default_text=samples_text),
        Option("sampler", "random_coordinate", "where samples are drawn (elastix ImageSampler): random continuous "
                                               "positions, random voxels, random voxels inside the fixed mask, every "
                                               "voxel, or a regular grid", kind="str", choices=SAMPLERS),
        Option("new_samples", True, "draw new samples at every iteration (elastix NewSamplesEveryIteration)",
               kind="bool"),
        Option("optimiser", "asgd", "adaptive stochastic gradient descent with automatic step sizes (elastix "
                                    "default), standard gradient descent a/(k+A+1)^α, regular-step gradient "
                                    "descent, or L-BFGS on one fixed draw of samples per level",
               kind="str", choices=OPTIMISERS),
        Option("max_step", None, "largest displacement of a sample in the first step (ASGD: elastix "
                                 "MaximumStepLength; rsgd: the initial step)", unit="mm", low=0, low_open=True,
               default_text="the level's mean voxel spacing"),
        Option("bins", 32, "histogram bins of MI/NMI (elastix NumberOfHistogramBins)", kind="int", low=4),
        Option("interpolation", "linear", "registration-time interpolation of the moving image (elastix "
                                          "Interpolator): nearest voxel, linear, or B-spline of order 2/3 with the "
                                          "exact gradient of the interpolant (BSplineInterpolator with "
                                          "BSplineInterpolationOrder 2/3)", kind="str",
               choices=tuple(INTERPOLATIONS)),
        Option("image_gradient", image_gradient, "the moving image's gradient with linear interpolation: "
                                                 "'smoothed' = central differences on the moving grid, interpolated "
                                                 "linearly (a smoother derivative); 'exact' = the gradient of the "
                                                 "linear interpolant itself, the derivative of the sampled cost "
                                                 "(what elastix's LinearInterpolator computes; one value channel "
                                                 "is read instead of value and gradient channels, so an iteration "
                                                 "costs less on large 3-D images). Other interpolations ignore it: "
                                                 "B-splines use their exact gradient, nearest the central "
                                                 "differences", kind="str", choices=tuple(IMAGE_GRADIENTS)),
        Option("metric_weights", None, "a weighted sum of image metrics instead of `metric`, e.g. {'mi': 1.0, "
                                       "'ncc': 0.5} (elastix Metric with Metric<i>Weight): values and gradients "
                                       "add up over the same samples; on the command line mi=1,ncc=0.5",
               kind="object", cli_parse=parse_metric_weights,
               default_text="none: `metric` alone"),
        shared("seed"),
        shared("threads"),
        shared("memory_limit"),
        shared("time_limit"),
        shared("device"),
        shared("backend", help="kernel implementation of interpolation and gradients"),
        shared("progress"),
        shared("callback", help="receives classreg.Event objects (one iteration per optimiser step, metric = the "
                                "sampled cost); raise classreg.StopRegistration to stop and keep the current "
                                "estimate"),
    )


AFFINE_OPTIONS = Declaration(
    name="affine",
    summary="translation, rigid, similarity or affine registration (Mattes MI / NCC / SSD, ASGD)",
    description="Estimate the affine-family transform of MOVING onto FIXED by stochastic gradient descent on a "
                "sampled metric over a Gaussian pyramid (elastix's method) and write transform.tfm (fixed -> moving, "
                "ITK), inverse.tfm, warped.nii.gz, params.json, history.csv, result.json and a QC PNG into OUT.",
    report=_report("affine"),
    options=(
        Option("transform", "affine", "the transform family (elastix Translation, Euler, Similarity, Affine)",
               kind="str", choices=tuple(MODELS)),
        shared("metric", default="mi", choices=tuple(METRICS),
               help="similarity: Mattes mutual information, normalised MI, normalised correlation, mean squares"),
        *_engine_options((50, 50, 150), "smoothed"),
    ),
)

BSPLINE_OPTIONS = Declaration(
    name="bspline",
    summary="cubic B-spline free-form deformation (Mattes MI / NCC / SSD, bending-energy penalty, ASGD)",
    description="Estimate a cubic B-spline FFD of MOVING onto FIXED (control grid refined coarse to fine) on top of "
                "an initial transform by stochastic gradient descent on a sampled metric plus a bending-energy "
                "penalty, and write transform.h5 (fixed -> moving, ITK), warped.nii.gz, params.json, history.csv, "
                "result.json and a QC PNG into OUT.",
    report=_report("bspline"),
    options=(
        Option("grid_spacing", 8.0, "control-point spacing at the finest level (elastix "
                                    "FinalGridSpacingInPhysicalUnits)", unit="mm", kind="floats", low=0,
               low_open=True),
        Option("grid_schedule", None, "grid spacing multiplier per level, coarsest first (elastix "
                                      "GridSpacingSchedule)", kind="floats", low=1,
               default_text="2^(levels-1-level): 4 2 1 for three levels"),
        shared("metric", default="mi", choices=tuple(METRICS),
               help="similarity: Mattes mutual information, normalised MI, normalised correlation, mean squares"),
        Option("bending_weight", None, "weight of the bending-energy penalty (elastix TransformBendingEnergyPenalty "
                                       "with Metric1Weight), added to the metric; 0: none", unit="mm²", low=0,
               default_text="per metric: mi 30, nmi 10, ncc 0, ssd 1 x the fixed image's intensity variance"),
        Option("folds", "project", "how folding is prevented: 'project' (the coefficients projected onto det J >= "
                                   "min_det_j at every voxel centre along the optimisation), 'compose' (one "
                                   "injective B-spline per level composed on the previous ones, Choi-Lee bound: "
                                   "det J > 0 everywhere), 'allow' (elastix: nothing)",
               kind="str", choices=("project", "compose", "allow")),
        Option("min_det_j", 0.05, "folds='project': floor of det J at the fixed image's voxel centres", low=0,
               high=1, low_open=True, high_open=True),
        *_engine_options((500, 500, 500), "exact", None, "2048 in 2-D, 8192 in 3-D"),
    ),
)

#: solver name -> its declaration
DECLARATIONS = {"affine": AFFINE_OPTIONS, "bspline": BSPLINE_OPTIONS}
