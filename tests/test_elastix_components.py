"""elastix parameter maps → classreg solver options (classreg.elastix.components)."""
import pytest

from classreg.elastix.components import ComponentError, plan_stage
from classreg.elastix.parameters import (
    ParameterFileError,
    ParameterLookup,
    parse_parameter_text,
)

RIGID_MI = """
(FixedInternalImagePixelType "float")
(MovingInternalImagePixelType "float")
(FixedImageDimension 2)
(MovingImageDimension 2)
(Registration "MultiResolutionRegistration")
(Interpolator "BSplineInterpolator")
(ResampleInterpolator "FinalBSplineInterpolator")
(Resampler "DefaultResampler")
(FixedImagePyramid "FixedRecursiveImagePyramid")
(MovingImagePyramid "MovingRecursiveImagePyramid")
(Optimizer "AdaptiveStochasticGradientDescent")
(Transform "EulerTransform")
(Metric "AdvancedMattesMutualInformation")
(AutomaticScalesEstimation "true")
(AutomaticTransformInitialization "true")
(HowToCombineTransforms "Compose")
(NumberOfHistogramBins 32)
(ErodeMask "false")
(NumberOfResolutions 4)
(MaximumNumberOfIterations 250 500)
(NumberOfSpatialSamples 2048)
(NewSamplesEveryIteration "true")
(ImageSampler "RandomCoordinate")
(BSplineInterpolationOrder 1)
(FinalBSplineInterpolationOrder 3)
(DefaultPixelValue 0)
(WriteResultImage "true")
(ResultImagePixelType "short")
(ResultImageFormat "mhd")
"""

BSPLINE_BE = """
(Registration "MultiMetricMultiResolutionRegistration")
(Transform "BSplineTransform")
(Metric "AdvancedMattesMutualInformation" "TransformBendingEnergyPenalty")
(Metric0Weight 1.0)
(Metric1Weight 50.0)
(Optimizer "AdaptiveStochasticGradientDescent")
(ImageSampler "RandomCoordinate")
(FixedImagePyramid "FixedSmoothingImagePyramid")
(MovingImagePyramid "MovingSmoothingImagePyramid")
(NumberOfResolutions 3)
(FinalGridSpacingInVoxels 16)
(GridSpacingSchedule 4.0 2.0 1.0)
(MaximumNumberOfIterations 300)
(NumberOfSpatialSamples 3000)
"""


def plan(text, *, ndim=2, spacing=(1.0, 1.0), mask=False, initial=False):
    return plan_stage(ParameterLookup(parse_parameter_text(text)), ndim=ndim, spacing=spacing,
                      has_fixed_mask=mask, has_initial=initial)


def test_rigid_mi_file_maps_onto_register_affine():
    st = plan(RIGID_MI)
    assert st.solver == "affine" and st.transform == "EulerTransform"
    o = st.options
    assert o["transform"] == "rigid" and o["metric"] == "mi" and o["optimiser"] == "asgd"
    # elastix falls back to entry 0 for missing per-resolution entries: 250 500 250 250
    assert o["iterations"] == (250, 500, 250, 250)
    assert o["shrink_factors"] == (8.0, 4.0, 2.0, 1.0)          # recursive pyramid: 2^(n-1-r), downsampled
    assert o["smoothing_sigmas"] == (4.0, 2.0, 1.0, 0.0)        # σ = 0.5 · factor · spacing
    assert o["samples"] == 2048 and o["sampler"] == "random_coordinate" and o["new_samples"] is True
    assert o["seed"] == 121212                                  # elastix's default RandomSeed
    assert st.init_method == "geometry" and st.erode_masks == (False, False)
    assert st.output["pixel_type"] == "short" and st.output["format"] == "mhd"
    assert st.warnings == []
    # every name of this file was read by the mapping
    assert st.lookup.unused() == []


def test_automatic_initialisation_is_skipped_after_an_initial_transform():
    assert plan(RIGID_MI, initial=True).init_method is None


def test_bspline_with_bending_penalty_and_smoothing_pyramid():
    st = plan(BSPLINE_BE, spacing=(0.5, 0.5))
    o = st.options
    assert st.solver == "bspline" and o["folds"] == "allow"
    assert o["grid_spacing"] == (8.0, 8.0)                      # 16 voxels × 0.5 mm
    assert o["grid_schedule"] == (4.0, 2.0, 1.0)
    assert o["bending_weight"] == pytest.approx(50.0)
    assert o["shrink_factors"] == (1.0, 1.0, 1.0)               # smoothing pyramid: no downsampling
    assert o["smoothing_sigmas"] == (1.0, 0.5, 0.0)
    assert o["iterations"] == (300, 300, 300)
    assert st.erode_masks == (True, True)                       # elastix's default ErodeMask "true"


def test_bspline_without_penalty_maps_to_no_bending():
    """elastix adds no penalty unless the file lists one; register_bspline's own default weight is > 0."""
    text = BSPLINE_BE.replace(' "TransformBendingEnergyPenalty"', "").replace(
        '"MultiMetricMultiResolutionRegistration"', '"MultiResolutionRegistration"').replace("(Metric1Weight 50.0)\n", "")
    o = plan(text).options
    assert o["metric"] == "mi" and o["bending_weight"] == 0.0


def test_per_level_sample_counts_are_reported_not_dropped():
    st = plan(RIGID_MI.replace("(NumberOfSpatialSamples 2048)", "(NumberOfSpatialSamples 1000 2000 3000 4000)"))
    assert st.options["samples"] == 4000
    assert any("NumberOfSpatialSamples differs per resolution" in w for w in st.warnings)


@pytest.mark.parametrize("line, message", [
    ('(Transform "BSplineStackTransform")', "not supported by classreg yet"),
    ('(Transform "NoSuchTransform")', "This component is not installed"),
    ('(Metric "KNNGraphAlphaMutualInformation")', "not supported by classreg yet"),
    ('(Optimizer "Powell")', "not supported by classreg yet"),
    ('(ImageSampler "Bogus")', "This component is not installed"),
])
def test_unknown_or_unsupported_components_name_themselves(line, message):
    key = line[1:].split()[0]
    text = "\n".join(ln for ln in RIGID_MI.splitlines() if not ln.startswith(f"({key} ")) + "\n" + line
    with pytest.raises(ComponentError, match=message) as info:
        plan(text)
    assert line.split('"')[1] in str(info.value)


def test_missing_mandatory_component():
    text = "\n".join(ln for ln in RIGID_MI.splitlines() if not ln.startswith("(Metric "))
    with pytest.raises(ComponentError, match="has not been specified: Metric"):
        plan(text)


def test_random_sparse_mask_needs_a_mask():
    text = RIGID_MI.replace('"RandomCoordinate"', '"RandomSparseMask"')
    with pytest.raises(ParameterFileError, match="needs a fixed mask"):
        plan(text)
    assert plan(text, mask=True).options["sampler"] == "random_sparse_mask"


def test_dimension_keys_are_compared_with_the_images():
    with pytest.raises(ParameterFileError, match="FixedImageDimension 2"):
        plan(RIGID_MI, ndim=3, spacing=(1, 1, 1))


def test_bad_values_name_the_parameter():
    with pytest.raises(ParameterFileError, match="NumberOfResolutions"):
        plan(RIGID_MI.replace("(NumberOfResolutions 4)", "(NumberOfResolutions 4.5)"))
    with pytest.raises(ParameterFileError, match="NewSamplesEveryIteration"):
        plan(RIGID_MI.replace('(NewSamplesEveryIteration "true")', '(NewSamplesEveryIteration "True")'))


def test_two_image_metrics_and_a_penalty_map_onto_a_weighted_sum():
    """Metric<i>Weight relative to the first image metric's (the ASGD gain is estimated automatically, so only the
    ratios matter); the bending weight likewise."""
    text = BSPLINE_BE.replace('"TransformBendingEnergyPenalty"',
                              '"AdvancedNormalizedCorrelation" "TransformBendingEnergyPenalty"').replace(
        "(Metric1Weight 50.0)", "(Metric1Weight 0.5)\n(Metric2Weight 50.0)").replace(
        "(Metric0Weight 1.0)", "(Metric0Weight 2.0)")
    st = plan(text)
    o = st.options
    assert o["metric"] == "mi" and o["metric_weights"] == (("mi", 1.0), ("ncc", 0.25))
    assert o["bending_weight"] == 25.0
    assert st.warnings == []
    # the engine takes the mapped options as they are
    from classreg.solvers.parametric.engine import metric_terms

    assert metric_terms(o["metric_weights"]) == [("mi", 1.0), ("ncc", 0.25)]


def test_a_file_without_an_image_metric_is_refused():
    text = BSPLINE_BE.replace('"AdvancedMattesMutualInformation" ', "").replace("(Metric1Weight 50.0)", "")
    with pytest.raises(ComponentError, match="at least one image metric"):
        plan(text)


def test_classreg_solver_from_a_parameter_file():
    st = plan('(Registration "classreg:demons")\n(ShrinkFactors 4 2 1)\n(Iterations 10 10 5)\n'
              '(VelocitySigma 1.5)\n(Symmetric "false")\n(ResultImagePixelType "float")')
    assert st.solver == "demons" and st.transform == "DeformationFieldTransform"
    assert st.options == {"shrink_factors": (4.0, 2.0, 1.0), "iterations": (10, 10, 5), "velocity_sigma": 1.5,
                          "symmetric": False}
    with pytest.raises(ValueError, match="velocity_sigma"):
        plan('(Registration "classreg:demons")\n(VelocitySigma -1)')
    with pytest.raises(ComponentError, match="classreg:demons"):
        plan('(Registration "classreg:nosuch")')


@pytest.mark.parametrize("lines, expected, gradient", [
    ("", "linear", None),                                                   # RIGID_MI: BSplineInterpolator, order 1
    ('(Interpolator "BSplineInterpolator")\n(BSplineInterpolationOrder 3)', "bspline3", None),
    ('(Interpolator "BSplineInterpolator")\n(BSplineInterpolationOrder 2)', "bspline2", None),
    ('(Interpolator "BSplineInterpolator")\n(BSplineInterpolationOrder 0)', "nearest", None),
    ('(Interpolator "LinearInterpolator")', "linear", "exact"),  # elastix's: the gradient of the interpolant
    ('(Interpolator "NearestNeighborInterpolator")', "nearest", None),
])
def test_registration_interpolator_maps_onto_the_engine(lines, expected, gradient):
    """Interpolator (and BSplineInterpolationOrder) -> the engine's interpolation; LinearInterpolator also sets
    image_gradient="exact" (elastix's returns the gradient of the linear interpolant); the others leave the solver's
    default image_gradient."""
    text = "\n".join(ln for ln in RIGID_MI.splitlines()
                     if not ln.startswith(("(Interpolator", "(BSplineInterpolationOrder")) or not lines)
    st = plan(text + "\n" + lines)
    assert st.options["interpolation"] == expected
    assert st.options.get("image_gradient") == gradient
    assert not any("nterpolat" in w for w in st.warnings)
    # the engine accepts what the mapping gives
    from classreg.solvers.parametric.options import AFFINE_OPTIONS

    opts = {o.name: o for o in AFFINE_OPTIONS.options}
    assert expected in opts["interpolation"].choices
    assert gradient is None or gradient in opts["image_gradient"].choices


def test_interpolation_orders_above_three_are_refused():
    text = RIGID_MI.replace("(BSplineInterpolationOrder 1)", "(BSplineInterpolationOrder 5)")
    with pytest.raises(ComponentError, match="BSplineInterpolationOrder 5"):
        plan(text)


def test_mask_erosion_follows_the_interpolators_support():
    """ErodeMask erodes by the registration interpolator's support radius: 1 voxel for nearest/linear, 2 for the
    B-spline orders 2/3 (taps floor(x)-1 .. floor(x)+2), so no sample's taps read outside the mask."""
    import numpy as np

    from classreg.elastix.components import INTERPOLATION_ORDERS, erode_mask, erode_radius

    mask = np.zeros((15, 15), bool)
    mask[2:13, 2:13] = True  # 11 x 11
    radii = {INTERPOLATION_ORDERS[o]: erode_radius(INTERPOLATION_ORDERS[o]) for o in INTERPOLATION_ORDERS}
    assert radii == {"nearest": 1, "linear": 1, "bspline2": 2, "bspline3": 2}
    assert erode_mask(mask, 1).sum() == 9 * 9 and erode_mask(mask, 2).sum() == 7 * 7


@pytest.mark.parametrize("transform, interpolator, expected", [
    ("EulerTransform", "LinearInterpolator", "exact"),
    ("EulerTransform", "BSplineInterpolator", "smoothed"),    # order 1: register_affine's default
    ("BSplineTransform", "BSplineInterpolator", "exact"),     # register_bspline's default
])
def test_the_runs_recorded_image_gradient(transform, interpolator, expected):
    """A parameter file run end to end records the image gradient it used in its Result.params: "exact" for
    (Interpolator "LinearInterpolator"), the solver's default otherwise."""
    import numpy as np
    from phantoms import smooth_image

    import classreg as cr
    from classreg.elastix.registration import run_elastix

    rng = np.random.default_rng(0)
    a = smooth_image((40, 44), rng, sigma=3.0).astype(np.float32)
    fixed, moving = cr.Image(a, 1.0), cr.Image(np.roll(a, 2, axis=1), 1.0)
    text = "\n".join(ln for ln in RIGID_MI.splitlines() if not ln.startswith(
        ("(Interpolator", "(Transform", "(NumberOfResolutions", "(MaximumNumberOfIterations", "(NumberOfSpatial")))
    text += (f'\n(Interpolator "{interpolator}")\n(Transform "{transform}")\n(NumberOfResolutions 1)\n'
             "(MaximumNumberOfIterations 5)\n(NumberOfSpatialSamples 512)\n(FinalGridSpacingInPhysicalUnits 10)")
    (stage,) = run_elastix(fixed, moving, [parse_parameter_text(text)], None)
    assert stage.result.params["image_gradient"] == expected
    assert stage.result.params["interpolation"] == "linear"
