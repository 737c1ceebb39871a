"""classreg.elastix's itk-elastix-shaped calls: the same script lines run on classreg's engine."""
import numpy as np
import pytest
from phantoms import blobs

import classreg as cr
import classreg.elastix as itk  # the one edit an itk-elastix script needs


@pytest.fixture
def images():
    fixed = cr.Image(blobs(), spacing=(1.0, 1.0))
    moving = cr.Image(blobs(shift=(4.0, -3.0)), spacing=(1.0, 1.0))
    return fixed, moving


def test_registration_and_transformix_like_itk(tmp_path, images):
    fixed, moving = images
    po = itk.ParameterObject.New()
    pm = po.GetDefaultParameterMap("translation", 2)
    pm["MaximumNumberOfIterations"] = ["100"]
    po.AddParameterMap(pm)
    result, tpo = itk.elastix_registration_method(fixed.to_sitk(), moving.to_sitk(), parameter_object=po,
                                                  log_to_console=False, number_of_threads=2,
                                                  output_directory=str(tmp_path))
    assert tpo.GetNumberOfParameterMaps() == 1
    t = np.array([float(v) for v in tpo.GetParameter(0, "TransformParameters")])
    assert np.allclose(t, [4.0, -3.0], atol=0.1)                  # moving = fixed shifted by (4, -3) mm
    assert result.shape == fixed.shape and result.dtype == np.float32
    inner = (slice(8, -8),) * 2
    assert np.corrcoef(result.numpy()[inner].ravel(), fixed.numpy()[inner].ravel())[0, 1] > 0.99
    assert (tmp_path / "TransformParameters.0.txt").exists()
    # transformix on the returned maps reproduces the result image; the field is the translation everywhere
    again = itk.transformix_filter(moving, tpo)
    assert np.allclose(again.numpy(), result.numpy(), atol=1e-3)
    field = itk.transformix_deformation_field(moving, tpo).numpy()
    assert np.allclose(field[..., 0], t[0], atol=1e-5) and np.allclose(field[..., 1], t[1], atol=1e-5)
    full, det = itk.transformix_jacobian(moving, tpo)
    assert np.allclose(det.numpy(), 1.0, atol=1e-6)
    pts = tmp_path / "pts.txt"
    pts.write_text("point\n2\n10 20\n30.5 40\n")
    out = itk.transformix_pointset(moving, tpo, fixed_point_set_file_name=str(pts), output_directory=str(tmp_path))
    assert np.allclose(out, [[10 + t[0], 20 + t[1]], [30.5 + t[0], 40 + t[1]]], atol=1e-6)
    assert (tmp_path / "outputpoints.txt").read_text().startswith("Point\t0\t; InputIndex = [ 10 20 ]")


def test_a_plain_dict_is_a_parameter_map_and_seeds_make_calls_repeatable(images):
    fixed, moving = images
    pm = {"Transform": "TranslationTransform", "Metric": "AdvancedMeanSquares",
          "Optimizer": "AdaptiveStochasticGradientDescent", "ImageSampler": "RandomCoordinate",
          "NumberOfResolutions": 2, "MaximumNumberOfIterations": 50, "NumberOfSpatialSamples": 1000,
          "NewSamplesEveryIteration": True}
    a = itk.elastix_registration_method(fixed, moving, parameter_object=pm)[1]
    b = itk.elastix_registration_method(fixed, moving, parameter_object=pm)[1]
    assert a.GetParameter(0, "TransformParameters") == b.GetParameter(0, "TransformParameters")
    with pytest.raises(TypeError, match="parameter_object"):
        itk.elastix_registration_method(fixed, moving)
