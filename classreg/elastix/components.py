"""elastix components → classreg solver options (ELASTIX.md §5–§7).

:func:`plan_stage` reads one parameter map (one ``-p`` file) with elastix's look-up rules and returns a
:class:`Stage`: which classreg solver runs it and with which keyword options, plus the output settings. Components
are checked before any work: an unknown name fails like elastix ("This component is not installed!"), a known
component classreg does not implement yet names itself and the supported alternatives. Settings classreg honours
only approximately (a per-level value that classreg keeps per run) are logged as ``WARNING:`` lines, never silently dropped.

``(Registration "classreg:<solver>")`` runs any image solver of classreg (demons, lddmm, rigid, affine, bspline)
with its options read from the same file, named in elastix's CamelCase (``ShrinkFactors`` for ``shrink_factors``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .parameters import ParameterFileError, ParameterLookup

__all__ = ["Stage", "plan_stage", "ComponentError", "TRANSFORMS", "METRICS", "OPTIMIZERS", "SAMPLERS"]


class ComponentError(ParameterFileError):
    """An elastix component that is unknown, obsolete or not (yet) implemented by classreg."""


#: elastix transform → register_affine's ``transform`` (None: register_bspline)
TRANSFORMS = {"TranslationTransform": "translation", "EulerTransform": "rigid", "SimilarityTransform": "similarity",
              "AffineTransform": "affine", "BSplineTransform": None, "RecursiveBSplineTransform": None}
#: elastix image metric → classreg metric
METRICS = {"AdvancedMattesMutualInformation": "mi", "NormalizedMutualInformation": "nmi",
           "AdvancedNormalizedCorrelation": "ncc", "AdvancedMeanSquares": "ssd"}
PENALTIES = ("TransformBendingEnergyPenalty",)
OPTIMIZERS = {"AdaptiveStochasticGradientDescent": "asgd", "StandardGradientDescent": "gd",
              "RegularStepGradientDescent": "rsgd", "QuasiNewtonLBFGS": "lbfgs"}
SAMPLERS = {"RandomCoordinate": "random_coordinate", "Random": "random", "RandomSparseMask": "random_sparse_mask",
            "Full": "full", "Grid": "grid"}
INTERPOLATORS = ("BSplineInterpolator", "BSplineInterpolatorFloat", "LinearInterpolator",
                 "NearestNeighborInterpolator")
#: elastix registration-time interpolation order (BSplineInterpolationOrder; Linear = 1, NearestNeighbor = 0) ->
#: the engine's ``interpolation`` option
INTERPOLATION_ORDERS = {0: "nearest", 1: "linear", 2: "bspline2", 3: "bspline3"}
RESAMPLE_INTERPOLATORS = ("FinalBSplineInterpolator", "FinalBSplineInterpolatorFloat", "FinalLinearInterpolator",
                          "FinalNearestNeighborInterpolator")
PYRAMIDS = ("SmoothingImagePyramid", "RecursiveImagePyramid", "ShrinkingImagePyramid")
REGISTRATIONS = ("MultiResolutionRegistration", "MultiMetricMultiResolutionRegistration")
CLASSREG_SOLVERS = ("demons", "lddmm", "rigid", "affine", "bspline")

#: components of elastix classreg knows of but does not implement (yet): exit 1 naming them, like elastix does for
#: components missing from its build
KNOWN_ELSEWHERE = {
    "Transform": ("BSplineStackTransform", "AffineLogStackTransform", "AffineLogTransform", "AffineDTITransform",
                  "WeightedCombinationTransform", "MultiBSplineTransformWithNormal", "SplineKernelTransform",
                  "DeformationFieldTransform", "EulerStackTransform", "TranslationStackTransform",
                  "BSplineTransformWithDiffusion", "File"),
    "Metric": ("DisplacementMagnitudePenalty", "VarianceOverLastDimensionMetric", "PCAMetric", "PCAMetric2",
               "KNNGraphAlphaMutualInformation", "CorrespondingPointsEuclideanDistanceMetric",
               "NormalizedGradientCorrelation", "GradientDifference", "PatternIntensity", "TransformRigidityPenalty",
               "StatisticalShapePenalty", "MissingStructurePenalty", "SumSquaredTissueVolumeDifference",
               "MattesMutualInformation", "PolydataDummyPenalty", "AdvancedKappaStatistic", "SumOfPairwiseCorrelation",
               "DistancePreservingRigidityPenalty", "AdvancedMeanSquaresMetric", "Impact"),
    "Optimizer": ("Powell", "CMAEvolutionStrategy", "ConjugateGradient", "ConjugateGradientFRPR", "Simplex",
                  "FullSearch", "FiniteDifferenceGradientDescent", "SimultaneousPerturbation", "RSGDEachParameterApart",
                  "PreconditionedStochasticGradientDescent", "AdaGrad", "QuasiNewtonLBFGS2",
                  "PreconditionedGradientDescent", "Rprop"),
    "ImageSampler": ("MultiInputRandomCoordinate",),
    "Interpolator": ("ReducedDimensionBSplineInterpolator", "RayCastInterpolator"),
    "Registration": ("MultiResolutionRegistrationWithFeatures",),
}


@dataclass
class Stage:
    """One elastix stage planned onto a classreg solver."""

    solver: str                 # "affine", "bspline", or another classreg solver name
    options: dict               # keyword options of classreg.register_<solver> (without images/masks/init)
    transform: str              # elastix Transform name written to TransformParameters
    init_method: str | None     # AutomaticTransformInitialization → "geometry"/"moments"/"origins"; None: identity
    erode_masks: tuple          # (fixed, moving): erode the mask before use (elastix ErodeMask)
    output: dict                # result-image settings (see _output)
    warnings: list = field(default_factory=list)
    lookup: ParameterLookup | None = None


def _component(lookup: ParameterLookup, kind: str, known, default=None, *, multi=False):
    names = lookup.get_list(kind, str, None)
    if not names:
        if default is None:
            raise ComponentError(f"ERROR: the following component has not been specified: {kind}")
        names = [default]
    for n in names:
        if n not in known:
            if n in KNOWN_ELSEWHERE.get(kind, ()):
                raise ComponentError(
                    f"ERROR: the {kind} component \"{n}\" is not supported by classreg yet; supported: "
                    f"{', '.join(known)}")
            raise ComponentError(f"ERROR: the {kind} component \"{n}\" could not be created: This component is not "
                                 f"installed! (classreg supports: {', '.join(known)})")
    return names if multi else names[0]


def _per_level(lookup: ParameterLookup, name: str, kind, default, levels: int, warnings: list, what: str):
    """One value per level (elastix fallback to entry 0); classreg keeps ``what`` per run: warn if they differ."""
    vals = [lookup.get(name, kind, default, entry=r) for r in range(levels)]
    if len(set(vals)) > 1:
        warnings.append(f"WARNING: {name} differs per resolution ({' '.join(map(str, vals))}); classreg uses one "
                        f"{what} for all levels: {vals[-1]} (the finest level's).")
    return vals[-1]


def _schedule(lookup: ParameterLookup, levels: int, ndim: int, warnings: list) -> list:
    """Pyramid shrink factor per level and dimension (elastix ImagePyramidSchedule rules)."""
    default = [[2.0 ** (levels - 1 - r)] * ndim for r in range(levels)]
    for name in ("FixedImagePyramidSchedule", "ImagePyramidSchedule"):
        vals = lookup.get_list(name, float, None)
        if vals is None:
            continue
        if len(vals) < levels * ndim:
            warnings.append(f"WARNING: {name} is not fully specified ({len(vals)} of {levels * ndim} values); the "
                            f"default schedule is used.")
            return default
        return [vals[r * ndim:(r + 1) * ndim] for r in range(levels)]
    return default


def _pyramid(lookup, levels, ndim, spacing, warnings):
    """shrink_factors and smoothing_sigmas (mm) of classreg's pyramid for elastix's pyramid components."""
    kinds = []
    for side in ("Fixed", "Moving"):
        names = lookup.get_list(f"{side}ImagePyramid", str, None) or [f"{side}SmoothingImagePyramid"]
        for n in names:
            base = n[len(side):] if n.startswith(side) else None
            if base not in PYRAMIDS:
                raise ComponentError(f"ERROR: the {side}ImagePyramid component \"{n}\" could not be created: This "
                                     f"component is not installed! (classreg supports: "
                                     f"{', '.join(side + p for p in PYRAMIDS)})")
            kinds.append(base)
    if len(set(kinds)) > 1:
        warnings.append(f"WARNING: the fixed and moving pyramids differ ({', '.join(kinds)}); classreg builds both "
                        f"as the fixed one ({kinds[0]}).")
    sched = _schedule(lookup, levels, ndim, warnings)
    if any(len(set(f)) > 1 for f in sched):
        warnings.append("WARNING: the pyramid schedule differs between axes; classreg shrinks every axis by the "
                        "level's largest factor, relative to the smallest voxel spacing.")
    factors = [max(f) for f in sched]
    h = float(min(spacing))
    if kinds[0] == "SmoothingImagePyramid":   # smooth only, σ = 0.5 · factor · spacing
        return [1.0] * levels, [0.5 * f * h if f > 1 else 0.0 for f in factors]
    if kinds[0] == "ShrinkingImagePyramid":   # downsample only
        return factors, [0.0] * levels
    return factors, [0.5 * f * h if f > 1 else 0.0 for f in factors]


def _output(lookup: ParameterLookup) -> dict:
    interp = lookup.get("ResampleInterpolator", str, "FinalBSplineInterpolator")
    if interp not in RESAMPLE_INTERPOLATORS:
        raise ComponentError(f"ERROR: the ResampleInterpolator component \"{interp}\" could not be created: This "
                             f"component is not installed! (classreg supports: {', '.join(RESAMPLE_INTERPOLATORS)})")
    lookup.get("Resampler", str, "DefaultResampler")
    order = (lookup.get("FinalBSplineInterpolationOrder", int, 3) if interp.startswith("FinalBSpline")
             else 1 if interp == "FinalLinearInterpolator" else 0)
    if order not in (0, 1, 3):
        raise ComponentError(f"ERROR: FinalBSplineInterpolationOrder {order} is not supported by classreg yet "
                             f"(0, 1 and 3 are)")
    return {
        "interpolator": interp,
        "order": order,
        "write_result": lookup.get("WriteResultImage", bool, True),
        "format": lookup.get("ResultImageFormat", str, "mhd"),
        "pixel_type": lookup.get("ResultImagePixelType", str, "short"),
        "compress": lookup.get("CompressResultImage", bool, False),
        "default_value": lookup.get("DefaultPixelValue", float, 0.0),
        "write_iteration_info": lookup.get("WriteIterationInfo", bool, True),
        "write_transform": lookup.get("WriteFinalTransformParameters", bool, True),
        "combine": lookup.get("HowToCombineTransforms", str, "Compose"),
    }


def _check_dimension(lookup: ParameterLookup, ndim: int):
    for name in ("FixedImageDimension", "MovingImageDimension"):
        d = lookup.get(name, int, None)
        if d is not None and d != ndim:
            raise ParameterFileError(
                f"ERROR: the parameter file says ({name} {d}) but the images are {ndim}-D. Note that from elastix 4.6 "
                f"the image dimensions are read from the images and {name} is not needed anymore.")
    for name in ("FixedInternalImagePixelType", "MovingInternalImagePixelType"):
        lookup.get(name, str, "float")  # echoed into the transform file; classreg computes in float32/float64


def plan_stage(parameters, *, ndim: int, spacing, has_fixed_mask: bool, has_initial: bool,
               source: str = "") -> Stage:
    """Map one elastix parameter map onto a classreg solver call.

    Parameters
    ----------
    parameters : mapping of str to sequence of str, or ParameterLookup
        The stage's parameter map.
    ndim : int
        Image dimension (from the fixed image header).
    spacing : sequence of float
        The fixed image's voxel spacing (mm): elastix's pyramid σ and FinalGridSpacingInVoxels are in voxels.
    has_fixed_mask : bool
        Whether ``-fMask`` was given (RandomSparseMask needs it).
    has_initial : bool
        Whether the stage starts from an initial transform (``-t0`` or a previous stage); elastix then skips
        AutomaticTransformInitialization.
    source : str
        The parameter file's name, for messages.

    Raises
    ------
    ComponentError
        A missing mandatory component, an unknown one, or one classreg does not implement.
    ParameterFileError
        A value that does not convert, or settings that contradict each other or the images.
    """
    lookup = parameters if isinstance(parameters, ParameterLookup) else ParameterLookup(parameters, source)
    warnings: list = []
    _check_dimension(lookup, ndim)
    reg = lookup.get("Registration", str, "MultiResolutionRegistration")
    if reg.startswith("classreg:"):
        return _plan_classreg(lookup, reg[len("classreg:"):], warnings=warnings)
    _component(lookup, "Registration", REGISTRATIONS, "MultiResolutionRegistration")
    transform = _component(lookup, "Transform", tuple(TRANSFORMS))
    metrics = _component(lookup, "Metric", tuple(METRICS) + PENALTIES, multi=True)
    optimiser = OPTIMIZERS[_component(lookup, "Optimizer", tuple(OPTIMIZERS))]
    levels = lookup.get("NumberOfResolutions", int, 3)
    if levels < 1:
        raise ParameterFileError(f"ERROR: NumberOfResolutions must be at least 1, got {levels}")

    # --- metrics and their weights (elastix: Metric<i>Weight, default 1 each) ---------------------------------
    image = [(i, m) for i, m in enumerate(metrics) if m in METRICS]
    penalty = [(i, m) for i, m in enumerate(metrics) if m in PENALTIES]
    if not image:
        raise ComponentError(f"ERROR: classreg registers with at least one image metric (plus an optional "
                             f"TransformBendingEnergyPenalty); the file gives {', '.join(metrics)}")
    if len(metrics) > 1 and reg != "MultiMetricMultiResolutionRegistration":
        raise ComponentError(f"ERROR: {len(metrics)} metrics need (Registration "
                             f"\"MultiMetricMultiResolutionRegistration\"), not \"{reg}\"")
    weights = [1.0] if len(metrics) == 1 else [
        _per_level(lookup, f"Metric{i}Weight", float, 1.0, levels, warnings, "metric weight")
        for i in range(len(metrics))]
    for i in range(len(metrics)):
        if not lookup.get(f"Metric{i}Use", bool, True):
            raise ComponentError(f"ERROR: Metric{i}Use \"false\" is not supported by classreg yet")
    for i, _ in image:
        if weights[i] <= 0:
            raise ParameterFileError(f"ERROR: Metric{i}Weight must be positive, got {weights[i]}")
    mi, mname = image[0]
    options = {"metric": METRICS[mname], "optimiser": optimiser}
    if len(image) > 1:  # a weighted sum on the one image pair, relative to the first image metric's weight
        summed = {}
        for i, m in image:
            summed[METRICS[m]] = summed.get(METRICS[m], 0.0) + weights[i] / weights[mi]
        if len(summed) < len(image):
            warnings.append("WARNING: the same image metric appears more than once; on one fixed/moving pair "
                            "classreg adds their weights (multi-channel input, -f0/-f1, is not supported).")
        options["metric_weights"] = tuple(summed.items())
    prefix = f"Metric{mi}"
    bins = [lookup.get(n, int, None, entry=levels - 1, prefix=prefix)
            for n in ("NumberOfFixedHistogramBins", "NumberOfMovingHistogramBins")]
    options["bins"] = _per_level(lookup, "NumberOfHistogramBins", int, 32, levels, warnings, "histogram size")
    if any(b is not None and b != options["bins"] for b in bins):
        warnings.append("WARNING: different fixed/moving histogram sizes are not supported; classreg uses "
                        f"NumberOfHistogramBins = {options['bins']} for both.")

    # --- sampler, interpolator, pyramid, iterations ------------------------------------------------------------
    sampler = SAMPLERS[_component(lookup, "ImageSampler", tuple(SAMPLERS))]
    if sampler == "random_sparse_mask" and not has_fixed_mask:
        raise ParameterFileError("ERROR: the RandomSparseMask image sampler needs a fixed mask (-fMask): "
                                 "do not call this function when no mask is supplied.")
    options["sampler"] = sampler
    options["samples"] = _per_level(lookup, "NumberOfSpatialSamples", int, 5000, levels, warnings, "sample count")
    options["new_samples"] = lookup.get("NewSamplesEveryIteration", bool, False)
    interp = _component(lookup, "Interpolator", INTERPOLATORS, "BSplineInterpolator")
    order = (_per_level(lookup, "BSplineInterpolationOrder", int, 1, levels, warnings, "interpolation order")
             if interp.startswith("BSpline") else 1 if interp == "LinearInterpolator" else 0)
    if order not in INTERPOLATION_ORDERS:
        raise ComponentError(f"ERROR: BSplineInterpolationOrder {order} is not supported by classreg yet "
                             f"(0, 1, 2 and 3 are)")
    options["interpolation"] = INTERPOLATION_ORDERS[order]
    if interp == "LinearInterpolator":  # elastix's returns the gradient of the linear interpolant itself
        options["image_gradient"] = "exact"
    shrink, sigmas = _pyramid(lookup, levels, ndim, spacing, warnings)
    options["shrink_factors"] = tuple(shrink)
    options["smoothing_sigmas"] = tuple(sigmas)
    options["iterations"] = tuple(lookup.get("MaximumNumberOfIterations", int, 500, entry=r) for r in range(levels))
    if optimiser in ("asgd", "lbfgs"):
        step = lookup.get("MaximumStepLength", float, None, entry=levels - 1)
        if step is not None:
            options["max_step"] = _per_level(lookup, "MaximumStepLength", float, step, levels, warnings,
                                             "maximum step length")
    if optimiser == "asgd" and not lookup.get("AutomaticParameterEstimation", bool, True):
        warnings.append("WARNING: AutomaticParameterEstimation \"false\" (fixed SP_a/SP_A/SP_alpha) is not "
                        "implemented; classreg estimates the ASGD gain automatically.")
    if lookup.values("Scales") is not None:
        warnings.append("WARNING: fixed Scales are not implemented; classreg estimates the parameter scales "
                        "(AutomaticScalesEstimation).")
    lookup.get("AutomaticScalesEstimation", bool, False)
    options["seed"] = lookup.get("RandomSeed", int, 121212)

    # --- transform ----------------------------------------------------------------------------------------------
    init_method = None
    if lookup.get("AutomaticTransformInitialization", bool, False) and not has_initial:
        method = lookup.get("AutomaticTransformInitializationMethod", str, "GeometricalCenter")
        methods = {"GeometricalCenter": "geometry", "CenterOfGravity": "moments", "Origins": "origins"}
        if method not in methods:
            raise ComponentError(f"ERROR: AutomaticTransformInitializationMethod \"{method}\" is not supported by "
                                 f"classreg yet; supported: {', '.join(methods)}")
        init_method = methods[method]
    family = TRANSFORMS[transform]
    if family is not None:
        solver = "affine"
        options["transform"] = family
        if penalty:
            warnings.append("WARNING: TransformBendingEnergyPenalty is zero for an affine transform; ignored.")
    else:
        solver = "bspline"
        if lookup.get("BSplineTransformSplineOrder", int, 3) != 3:
            raise ComponentError("ERROR: classreg implements cubic B-spline transforms only "
                                 "(BSplineTransformSplineOrder 3)")
        if lookup.get("UseCyclicTransform", bool, False):
            raise ComponentError("ERROR: UseCyclicTransform \"true\" is not supported by classreg yet")
        phys = lookup.get_list("FinalGridSpacingInPhysicalUnits", float, None)
        vox = lookup.get_list("FinalGridSpacingInVoxels", float, None)
        if phys is not None and vox is not None:
            raise ParameterFileError("ERROR: give FinalGridSpacingInPhysicalUnits or FinalGridSpacingInVoxels, "
                                     "not both")
        if vox is not None:
            grid = [vox[d if d < len(vox) else 0] * spacing[d] for d in range(ndim)]
        else:
            phys = phys or [8.0]
            grid = [phys[d if d < len(phys) else 0] for d in range(ndim)]
        options["grid_spacing"] = tuple(grid)
        sched = lookup.get_list("GridSpacingSchedule", float, None)
        if sched is not None:
            if len(sched) == levels:
                per = sched
            elif len(sched) == levels * ndim:
                rows = [sched[r * ndim:(r + 1) * ndim] for r in range(levels)]
                if any(len(set(r)) > 1 for r in rows):
                    warnings.append("WARNING: a GridSpacingSchedule that differs between axes is not supported; "
                                    "classreg uses each level's largest multiplier.")
                per = [max(r) for r in rows]
            else:
                raise ParameterFileError(f"ERROR: GridSpacingSchedule needs {levels} or {levels * ndim} values, got "
                                         f"{len(sched)}")
            options["grid_schedule"] = tuple(per)
        options["folds"] = "allow"  # one grid refined level to level, nothing against folds: elastix's method
        # elastix adds a penalty only where the file asks for one (register_bspline's own default is a weight > 0)
        options["bending_weight"] = weights[penalty[0][0]] / weights[mi] if penalty else 0.0
        if init_method is not None:
            warnings.append("WARNING: AutomaticTransformInitialization has no effect on a B-spline transform.")
            init_method = None
    erode = lookup.get("ErodeMask", bool, True)
    erode_masks = (lookup.get("ErodeFixedMask", bool, erode), lookup.get("ErodeMovingMask", bool, erode))
    out = _output(lookup)
    if out["combine"] not in ("Compose", "Add"):
        raise ParameterFileError(f"ERROR: HowToCombineTransforms must be \"Compose\" or \"Add\", got "
                                 f"\"{out['combine']}\"")
    if out["combine"] == "Add" and has_initial:
        raise ComponentError("ERROR: registering with HowToCombineTransforms \"Add\" after an initial transform is "
                             "not supported by classreg yet (transformix reads such files)")
    if not lookup.get("UseDirectionCosines", bool, True):
        warnings.append("WARNING: UseDirectionCosines \"false\" is not implemented; classreg always uses the "
                        "images' direction cosines.")
    return Stage(solver=solver, options=options, transform=transform, init_method=init_method,
                 erode_masks=erode_masks, output=out, warnings=warnings, lookup=lookup)


def _camel(name: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in name.split("_"))


def _plan_classreg(lookup: ParameterLookup, solver: str, *, warnings) -> Stage:
    """``(Registration "classreg:<solver>")``: the solver's declared options, in CamelCase, from the same file."""
    # the registry imports every solver module on its first look-up
    from ..options import SOLVERS

    if solver not in CLASSREG_SOLVERS:
        raise ComponentError(f"ERROR: the Registration component \"classreg:{solver}\" does not exist; classreg "
                             f"solvers for images: {', '.join('classreg:' + s for s in CLASSREG_SOLVERS)}")
    declaration, _ = SOLVERS[solver]
    skip = {"init", "fixed_mask", "moving_mask", "threads", "device", "backend", "progress", "callback", "dtype",
            "return_trajectory"}
    opts = {}
    for o in declaration:
        if o.name in skip:
            continue
        key = _camel(o.name)
        vals = lookup.values(key)
        if vals is None:
            continue
        if o.kind in ("floats", "ints"):
            conv = float if o.kind == "floats" else int
            v = tuple(lookup._convert(s, conv, key, i) for i, s in enumerate(vals))
            opts[o.name] = v
        elif o.kind in ("float", "int", "bool", "str"):
            v = lookup.get(key, {"float": float, "int": int, "bool": bool, "str": str}[o.kind])
            opts[o.name] = v
        else:
            raise ParameterFileError(f"ERROR: option {o.name!r} of classreg:{solver} cannot be set from a parameter "
                                     f"file")
        o.check(opts[o.name], f"register_{solver}")
    for name in ("Transform", "Metric", "Optimizer"):
        lookup.values(name)  # informative only for classreg solvers
    out = _output(lookup)
    transform = {"affine": "AffineTransform", "rigid": "EulerTransform", "bspline": "BSplineTransform"}.get(
        solver, "DeformationFieldTransform")
    if solver == "affine":
        transform = {"translation": "TranslationTransform", "rigid": "EulerTransform",
                     "similarity": "SimilarityTransform"}.get(opts.get("transform", "affine"), "AffineTransform")
    if solver == "bspline":
        opts.setdefault("folds", "allow")
        if opts["folds"] == "compose":  # a chain of B-splines: written as a displacement field
            transform = "DeformationFieldTransform"
    return Stage(solver=solver, options=opts, transform=transform, init_method=None, erode_masks=(False, False),
                 output=out, warnings=warnings, lookup=lookup)


def erode_mask(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """elastix ``ErodeMask``: drop the mask's border voxels, ``radius`` voxels deep.

    elastix erodes by the support radius of the registration interpolator at each pyramid level; classreg erodes
    once, at full resolution, by the support radius of its registration-time interpolation
    (:func:`erode_radius`), so samples never read outside the mask.
    """
    from scipy import ndimage

    m = np.asarray(mask) != 0
    return ndimage.binary_erosion(m, iterations=int(radius))


def erode_radius(interpolation: str) -> int:
    """Support radius in voxels of the engine's ``interpolation``: 1 (nearest, linear), 2 (B-spline order 2, 3)."""
    return 2 if interpolation in ("bspline2", "bspline3") else 1
