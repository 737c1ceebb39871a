"""The itk-elastix-shaped ParameterObject (classreg.elastix.parameter_object; ELASTIX.md §13).

Expected values come from elastix's ``Core/Main/elxParameterObject.cxx`` (commit 0c0b19f) and from running
itk-elastix 0.25.4. The tests marked ``slow`` compare with a live itk-elastix (``import itk`` takes ~10 s) and skip
cleanly when it is not installed.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from classreg.elastix.parameter_object import (
    DEFAULT_PARAMETER_MAP_NAMES,
    ParameterObject,
    ParameterObjectError,
    as_parameter_map,
    as_parameter_maps,
    format_parameter_map_toml,
)
from classreg.elastix.parameters import ParameterFileError, read_parameter_file

DATA = Path(__file__).parent / "data" / "elastix" / "parameters"
RIGID_TXT = DATA / "elastix" / "dox" / "exampleinput" / "parameters_Rigid.txt"
AFFINE_TXT = DATA / "elastix" / "dox" / "exampleinput" / "parameters_Affine.txt"
TRANSLATION_TP = DATA / "elastix" / "Testing" / "Data" / "Translation(1,-2)" / "TransformParameters.txt"

COMMON = {
    "AutomaticParameterEstimation": ("true",), "CheckNumberOfSamples": ("true",), "DefaultPixelValue": ("0",),
    "FinalBSplineInterpolationOrder": ("3",), "FixedImagePyramid": ("FixedSmoothingImagePyramid",),
    "ImageSampler": ("RandomCoordinate",), "Interpolator": ("LinearInterpolator",),
    "MaximumNumberOfIterations": ("256",), "MaximumNumberOfSamplingAttempts": ("8",),
    "MovingImagePyramid": ("MovingSmoothingImagePyramid",), "NewSamplesEveryIteration": ("true",),
    "NumberOfResolutions": ("4",), "NumberOfSamplesForExactGradient": ("4096",), "NumberOfSpatialSamples": ("2048",),
    "Optimizer": ("AdaptiveStochasticGradientDescent",), "ResampleInterpolator": ("FinalBSplineInterpolator",),
    "Resampler": ("DefaultResampler",), "ResultImageFormat": ("nii",), "WriteIterationInfo": ("false",),
    "WriteResultImage": ("true",),
}

# print(po) in itk-elastix 0.25.4 after AddParameterMap(rigid) and AddParameterMap(GetDefaultParameterMap("bspline",
# 3, 7.5)): everything after ITK's object header.
PRINTED_MAPS = """ParameterMap 0: 
  (AutomaticParameterEstimation "true")
  (AutomaticScalesEstimation "true")
  (CheckNumberOfSamples "true")
  (DefaultPixelValue 0)
  (FinalBSplineInterpolationOrder 3)
  (FixedImagePyramid "FixedSmoothingImagePyramid")
  (ImageSampler "RandomCoordinate")
  (Interpolator "LinearInterpolator")
  (MaximumNumberOfIterations 256)
  (MaximumNumberOfSamplingAttempts 8)
  (Metric "AdvancedMattesMutualInformation")
  (MovingImagePyramid "MovingSmoothingImagePyramid")
  (NewSamplesEveryIteration "true")
  (NumberOfResolutions 4)
  (NumberOfSamplesForExactGradient 4096)
  (NumberOfSpatialSamples 2048)
  (Optimizer "AdaptiveStochasticGradientDescent")
  (Registration "MultiResolutionRegistration")
  (ResampleInterpolator "FinalBSplineInterpolator")
  (Resampler "DefaultResampler")
  (ResultImageFormat "nii")
  (Transform "EulerTransform")
  (WriteIterationInfo "false")
  (WriteResultImage "true")
ParameterMap 1: 
  (AutomaticParameterEstimation "true")
  (CheckNumberOfSamples "true")
  (DefaultPixelValue 0)
  (FinalBSplineInterpolationOrder 3)
  (FinalGridSpacingInPhysicalUnits 7.500000)
  (FixedImagePyramid "FixedSmoothingImagePyramid")
  (GridSpacingSchedule 2 1.4142135623730951 1)
  (ImageSampler "RandomCoordinate")
  (Interpolator "LinearInterpolator")
  (MaximumNumberOfIterations 256)
  (MaximumNumberOfSamplingAttempts 8)
  (Metric "AdvancedMattesMutualInformation" "TransformBendingEnergyPenalty")
  (Metric0Weight 1.0)
  (Metric1Weight 1.0)
  (MovingImagePyramid "MovingSmoothingImagePyramid")
  (NewSamplesEveryIteration "true")
  (NumberOfResolutions 3)
  (NumberOfSamplesForExactGradient 4096)
  (NumberOfSpatialSamples 2048)
  (Optimizer "AdaptiveStochasticGradientDescent")
  (Registration "MultiMetricMultiResolutionRegistration")
  (ResampleInterpolator "FinalBSplineInterpolator")
  (Resampler "DefaultResampler")
  (ResultImageFormat "nii")
  (Transform "BSplineTransform")
  (WriteIterationInfo "false")
  (WriteResultImage "true")
"""


def _read_expected(rel):
    return {k: tuple(v) for k, v in json.loads((DATA / "expected.json").read_text())[rel]["map"].items()}


# ------------------------------------------------------------------------------------------------ default maps
def test_default_rigid_map_exact():
    pm = ParameterObject.GetDefaultParameterMap("rigid")
    assert pm == {**COMMON, "Registration": ("MultiResolutionRegistration",), "Transform": ("EulerTransform",),
                  "Metric": ("AdvancedMattesMutualInformation",), "AutomaticScalesEstimation": ("true",)}
    assert list(pm) == sorted(pm)  # std::map order


def test_default_bspline_map_exact():
    pm = ParameterObject.GetDefaultParameterMap("bspline")
    assert pm == {**COMMON, "Registration": ("MultiMetricMultiResolutionRegistration",),
                  "Transform": ("BSplineTransform",),
                  "Metric": ("AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"),
                  "Metric0Weight": ("1.0",), "Metric1Weight": ("1.0",),
                  "GridSpacingSchedule": ("2.8284271247461903", "2", "1.4142135623730951", "1"),
                  "FinalGridSpacingInPhysicalUnits": ("10.000000",)}
    pm = ParameterObject.GetDefaultParameterMap("bspline", 6, 0.1)
    assert pm["GridSpacingSchedule"] == ("5.656854249492381", "4", "2.8284271247461903", "2", "1.4142135623730951",
                                         "1")
    assert pm["FinalGridSpacingInPhysicalUnits"] == ("0.100000",) and pm["NumberOfResolutions"] == ("6",)
    pm = ParameterObject.GetDefaultParameterMap("bspline", numberOfResolutions=0, finalGridSpacingInPhysicalUnits=1e20)
    assert pm["GridSpacingSchedule"] == () and pm["FinalGridSpacingInPhysicalUnits"] == ("100000000000000000000.000000",)
    assert ParameterObject.GetDefaultParameterMap("bspline", 2, 1e-7)["FinalGridSpacingInPhysicalUnits"] == ("0.000000",)
    assert ParameterObject.GetDefaultParameterMap("bspline", 2, 4)["FinalGridSpacingInPhysicalUnits"] == ("4.000000",)
    assert ParameterObject.GetDefaultParameterMap("bspline", 2, math.nan)["FinalGridSpacingInPhysicalUnits"] == ("nan",)


def test_default_maps_per_name():
    keys = {"translation": 24, "rigid": 24, "affine": 24, "bspline": 27, "spline": 23, "groupwise": 25}
    transforms = {"translation": "TranslationTransform", "rigid": "EulerTransform", "affine": "AffineTransform",
                  "bspline": "BSplineTransform", "spline": "SplineKernelTransform",
                  "groupwise": "BSplineStackTransform"}
    assert set(DEFAULT_PARAMETER_MAP_NAMES) == set(keys)
    for name in DEFAULT_PARAMETER_MAP_NAMES:
        pm = ParameterObject().GetDefaultParameterMap(name, 3)  # on an instance too
        assert len(pm) == keys[name] and pm["Transform"] == (transforms[name],)
        assert pm["NumberOfResolutions"] == ("3",)
    assert ParameterObject.GetDefaultParameterMap("translation")["AutomaticTransformInitialization"] == ("true",)
    assert "AutomaticScalesEstimation" not in ParameterObject.GetDefaultParameterMap("spline")
    gw = ParameterObject.GetDefaultParameterMap("groupwise", 5, 16)
    assert gw["Interpolator"] == ("ReducedDimensionBSplineInterpolator",)
    assert gw["ResampleInterpolator"] == ("FinalReducedDimensionBSplineInterpolator",)
    assert gw["Metric"] == ("VarianceOverLastDimensionMetric",) and gw["FinalGridSpacingInPhysicalUnits"] == ("16.000000",)
    assert gw["GridSpacingSchedule"] == ("4", "2.8284271247461903", "2", "1.4142135623730951", "1")


def test_default_map_errors():
    with pytest.raises(ParameterObjectError, match='"nonrigid" is no longer supported, after elastix version 5.2.0'):
        ParameterObject.GetDefaultParameterMap("nonrigid")
    with pytest.raises(ParameterObjectError, match='No default parameter map "Rigid".'):
        ParameterObject.GetDefaultParameterMap("Rigid")
    with pytest.raises(ValueError):
        ParameterObject.GetDefaultParameterMap("foo")
    with pytest.raises(ValueError, match="unsigned"):
        ParameterObject.GetDefaultParameterMap("bspline", -1)
    with pytest.raises(TypeError):
        ParameterObject.GetDefaultParameterMap("bspline", 2.0)
    with pytest.raises(TypeError):
        ParameterObject.GetDefaultParameterMap(3)


# ------------------------------------------------------------------------------------------------ maps and values
def test_new_and_maps():
    po = ParameterObject.New()
    assert len(po) == po.GetNumberOfParameterMaps() == 0 and po.GetParameterMaps() == []
    po.AddParameterMap(ParameterObject.GetDefaultParameterMap("rigid"))
    po.AddParameterMap({"Transform": "AffineTransform"})
    assert po.GetNumberOfParameterMaps() == 2
    assert po.GetParameterMap(1) == {"Transform": ("AffineTransform",)}
    po.SetParameterMap(0, {"B": ["x"]})
    assert po.GetParameterMap(0) == {"B": ("x",)} and len(po) == 2
    po.SetParameterMap({"Q": ["1"]})  # one map replaces all
    assert po.GetParameterMaps() == [{"Q": ("1",)}]
    po.SetParameterMaps([{"C": ["1"]}, {"D": ["2"]}])
    assert [pm for pm in po] == [{"C": ("1",)}, {"D": ("2",)}]
    assert ParameterObject.New(ParameterMap={"A": ["1"]}).GetParameterMaps() == [{"A": ("1",)}]
    assert ParameterObject.New(ParameterMaps=[{"A": "1"}, {"B": "2"}]).GetNumberOfParameterMaps() == 2
    with pytest.raises(TypeError):
        ParameterObject.New(Nonsense=1)


def test_maps_are_copies():
    pm = {"Transform": ["EulerTransform"]}
    po = ParameterObject.New()
    po.AddParameterMap(pm)
    pm["Transform"] = ["AffineTransform"]
    got = po.GetParameterMap(0)
    got["Transform"] = ("BSplineTransform",)
    po.GetParameterMaps()[0]["X"] = ("1",)
    assert po.GetParameterMap(0) == {"Transform": ("EulerTransform",)}
    clone = po.Clone()
    clone.SetParameter("Transform", "AffineTransform")
    assert po.GetParameter(0, "Transform") == ("EulerTransform",)
    assert copy.deepcopy(po) == po and copy.copy(po) == po and clone != po
    assert isinstance(got, dict) and type(got.asdict()) is dict and got.asdict() == got  # itk's map has asdict()


def test_value_conversion_like_itk_elastix():
    """itk-elastix 0.25.4 ``convert_to_parameter_map``: str as is, bools true/false, other scalars str()."""
    pm = as_parameter_map({"A": [1, 2.5, True, "x"], "B": 10.0, "C": 1e-7, "D": False, "E": 3, "F": "one value",
                           "G": (), "H": np.float32(0.1), "I": np.int64(7), "J": np.bool_(True),
                           "K": np.array([1.5, 2]), "L": Path("a/b.txt"), "M": np.float64(0.25)})
    assert pm == {"A": ("1", "2.5", "true", "x"), "B": ("10.0",), "C": ("1e-07",), "D": ("false",), "E": ("3",),
                  "F": ("one value",), "G": (), "H": ("0.1",), "I": ("7",), "J": ("true",), "K": ("1.5", "2.0"),
                  "L": ("a/b.txt",), "M": ("0.25",)}
    assert list(pm) == sorted(pm)
    for bad in ({"A": None}, {"A": [[1, 2]]}, {"A": {"x": 1}}, {"A": b"bytes"}, {1: "x"}, {"A": np.zeros((2, 2))}):
        with pytest.raises(TypeError):
            as_parameter_map(bad)
    with pytest.raises(TypeError):
        as_parameter_map([("A", "1")])


def test_set_get_has_remove():
    po = ParameterObject.New()
    po.SetParameter("K", "v")  # no maps: nothing to set, no error
    assert not po.HasParameter("K")
    po.RemoveParameter("K")
    po.AddParameterMap(ParameterObject.GetDefaultParameterMap("rigid"))
    po.AddParameterMap(ParameterObject.GetDefaultParameterMap("affine"))
    po.SetParameter("X", ["a", "b"])
    assert po.GetParameter(0, "X") == po.GetParameter(1, "X") == ("a", "b")
    po.SetParameter(1, "Y", "v")
    assert po.GetParameter(1, "Y") == ("v",) and not po.HasParameter(0, "Y") and po.HasParameter("Y")
    po.SetParameter(0, "E", [])
    po.SetParameter(0, "F", "")
    assert po.GetParameter(0, "E") == () and po.GetParameter(0, "F") == ("",)
    po.SetParameter("N", 1.5)
    po.SetParameter(0, "B", True)
    assert po.GetParameter(1, "N") == ("1.5",) and po.GetParameter(0, "B") == ("true",)
    assert list(po.GetParameterMap(0)) == sorted(po.GetParameterMap(0))
    assert po.HasParameter(9, "Transform") is False
    po.RemoveParameter("X")
    assert not po.HasParameter("X")
    po.RemoveParameter(0, "Nope")  # a missing key is no error
    po.RemoveParameter(1, "Y")
    assert not po.HasParameter("Y")


def test_errors_name_the_problem():
    po = ParameterObject.New()
    po.AddParameterMap({"Transform": "EulerTransform"})
    po.AddParameterMap({"Transform": "AffineTransform"})
    oob = re.escape("The index (5) is out of range! It must be less than the number of parameter maps (2)")
    for call in (lambda: po.SetParameter(5, "Y", "v"), lambda: po.GetParameter(5, "Transform"),
                 lambda: po.GetParameterMap(5), lambda: po.RemoveParameter(5, "Y"),
                 lambda: po.SetParameterMap(5, {"B": "x"})):
        with pytest.raises(ParameterObjectError, match=oob) as info:
            call()
        assert isinstance(info.value, IndexError) and isinstance(info.value, RuntimeError)
    with pytest.raises(KeyError, match='There is no parameter named "Nope" in parameter map #0!') as info:
        po.GetParameter(0, "Nope")
    assert isinstance(info.value, ParameterObjectError)
    assert str(info.value) == 'There is no parameter named "Nope" in parameter map #0!'
    with pytest.raises(IndexError):
        po.GetParameterMap(-1)
    with pytest.raises(IndexError):
        po.HasParameter(-1, "Transform")
    with pytest.raises(TypeError):
        po.GetParameterMap("0")
    with pytest.raises(TypeError):
        po.SetParameter("A", "B", "C", "D")
    with pytest.raises(TypeError):
        po.SetParameter(True, "A", "1")


# ------------------------------------------------------------------------------------------------ files
def test_read_files():
    po = ParameterObject.New()
    po.ReadParameterFile(RIGID_TXT)
    expected = _read_expected("elastix/dox/exampleinput/parameters_Rigid.txt")
    assert po.GetParameterMaps() == [expected] and list(po[0]) == sorted(expected)
    po.ReadParameterFile(str(RIGID_TXT))  # replaces
    assert len(po) == 1
    po.AddParameterFile(AFFINE_TXT)
    assert len(po) == 2 and po[1]["Transform"] == ("AffineTransform",)
    po.ReadParameterFiles([RIGID_TXT, AFFINE_TXT, TRANSLATION_TP])
    assert [pm["Transform"][0] for pm in po] == ["EulerTransform", "AffineTransform", "TranslationTransform"]
    po.ReadParameterFile([str(AFFINE_TXT), RIGID_TXT])  # a list, as older itk-elastix releases accepted
    assert [pm["Transform"][0] for pm in po] == ["AffineTransform", "EulerTransform"]
    po.ReadParameterFiles(str(TRANSLATION_TP))  # one name is one file (itk-elastix would iterate its characters)
    assert len(po) == 1
    po.ReadParameterFile(DATA / "edge" / "params.toml")
    assert po[0] == _read_expected("edge/params.toml")


def test_read_errors_keep_the_object():
    po = ParameterObject.New()
    po.ReadParameterFile(RIGID_TXT)
    before = po.GetParameterMaps()
    with pytest.raises(ParameterObjectError, match="Parameter filename container is empty."):
        po.ReadParameterFiles([])
    with pytest.raises(ParameterObjectError, match='Parameter file "nope.txt" does not exist.') as info:
        po.ReadParameterFiles([RIGID_TXT, "nope.txt"])
    assert isinstance(info.value, ParameterFileError) and isinstance(info.value, RuntimeError)
    with pytest.raises(ParameterObjectError, match="is specified more than once"):
        po.ReadParameterFiles([RIGID_TXT, DATA / "edge" / "duplicate.txt"])
    with pytest.raises(ParameterFileError, match="does not exist"):
        po.AddParameterFile("nope.txt")
    with pytest.raises(ParameterFileError, match="should be a text file"):
        po.ReadParameterFile(DATA / "edge" / "params.par")
    assert po.GetParameterMaps() == before


def test_write_parameter_file(tmp_path):
    pm = {"A": ["x"], "B": ["1", "2"], "C": ["true"], "D": [], "E": ["2.5"], "N": ["1e-7", "1.0", "abc def", "-0",
                                                                                  "+3", ".5", "1.5e+05"]}
    ParameterObject.WriteParameterFile(pm, tmp_path / "p.txt")  # on the class, as itk-elastix's static method
    assert (tmp_path / "p.txt").read_text() == ('(A "x")\n(B 1 2)\n(C "true")\n(D)\n(E 2.5)\n'
                                                '(N 1e-7 1.0 "abc def" -0 "+3" ".5" 1.5e+05)\n')
    po = ParameterObject.New()
    po.WriteParameterFile({"A": ["x"], "B": ["1", "2"], "C": ["true"], "D": [], "E": ["2.5"]}, tmp_path / "p.toml")
    assert (tmp_path / "p.toml").read_text() == 'A = "x"\nB = [1, 2]\nC = true\nD = []\nE = 2.5\n'
    po.ReadParameterFile(tmp_path / "p.toml")
    assert po[0] == {"A": ("x",), "B": ("1", "2"), "C": ("true",), "D": (), "E": ("2.5",)}
    po.WriteParameterFile(tmp_path / "q.txt")  # the object's one map
    assert (tmp_path / "q.txt").read_text() == '(A "x")\n(B 1 2)\n(C "true")\n(D)\n(E 2.5)\n'
    with pytest.raises(ParameterFileError, match="does not contain a parameter name"):  # as elastix: "(D)"
        read_parameter_file(tmp_path / "q.txt")
    with pytest.raises(ParameterObjectError, match="The parameter object is empty."):
        ParameterObject.New().WriteParameterFile(tmp_path / "x.txt")
    po.AddParameterMap({"A": "1"})
    with pytest.raises(ParameterObjectError, match=r"number of parameter maps \(2\) does not match the number of "
                                                   r"provided filenames \(1\)\. Please call WriteParameterFiles"):
        po.WriteParameterFile(tmp_path / "x.txt")
    with pytest.raises(ParameterObjectError, match="Error opening parameter file"):
        ParameterObject.WriteParameterFile({"A": "x"}, tmp_path / "missing" / "y.txt")
    with pytest.raises(TypeError):
        ParameterObject.WriteParameterFile(tmp_path / "x.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml", "p.txt", "q.txt"]


def test_toml_output_is_always_readable(tmp_path):
    pm = {"Path": ['C:\\Data\\"x".mhd'], "Tab": ["a\tb"], "": ["empty name"], "Odd": ["1.", "01", "1e5", "-1.5e-07"]}
    text = format_parameter_map_toml(pm)
    assert '"" = "empty name"' in text and "Odd = [\"1.\", \"01\", \"1e5\", -1.5e-07]" in text
    (tmp_path / "p.toml").write_text(text)
    assert read_parameter_file(tmp_path / "p.toml") == {"": ("empty name",), "Odd": ("1.", "01", "1e5", "-1.5e-7"),
                                                        "Path": ('C:\\Data\\"x".mhd',), "Tab": ("a\tb",)}


def test_write_parameter_files_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    po = ParameterObject.New()
    po.AddParameterMap({"Transform": ["TranslationTransform"], "TransformParameters": ["1.5", "-2"],
                        "InitialTransformParameterFileName": ["NoInitialTransform"]})
    po.AddParameterMap({"Transform": ["EulerTransform"], "TransformParameters": ["0", "0", "0"],
                        "InitialTransformParameterFileName": ["NoInitialTransform"]})
    po.AddParameterMap({"Transform": ["AffineTransform"], "TransformParameters": ["1"],
                        "InitialTransformParameterFileName": ["x", "y"]})
    po.AddParameterMap({"Transform": ["BSplineTransform"], "TransformParameters": ["0"]})  # elastix: UB/segfault
    po.AddParameterMap({"Metric": ["X"]})  # not a transform map: left alone
    po.WriteParameterFiles()
    names = [f"ParametersFile.{i}.txt" for i in range(5)]
    assert sorted(os.listdir(tmp_path)) == names
    got = [read_parameter_file(n) for n in names]
    assert got[0]["InitialTransformParameterFileName"] == ("NoInitialTransform",)
    assert got[1]["InitialTransformParameterFileName"] == ("ParametersFile.0.txt",)
    assert got[2]["InitialTransformParameterFileName"] == ("ParametersFile.1.txt", "y")
    assert got[3]["InitialTransformParameterFileName"] == ("ParametersFile.2.txt",)
    assert got[4] == {"Metric": ("X",)}
    assert po[1]["InitialTransformParameterFileName"] == ("NoInitialTransform",)  # the object is unchanged
    po.WriteParameterFiles(["a.txt", "b.txt", "c.txt", "d.txt", "e.toml"])
    assert read_parameter_file("b.txt")["InitialTransformParameterFileName"] == ("a.txt",)
    assert (tmp_path / "e.toml").read_text() == 'Metric = "X"\n'
    ParameterObject.WriteParameterFiles([{"A": "x"}, {"B": "y"}], ["s0.txt", "s1.txt"])  # on the class
    assert (tmp_path / "s1.txt").read_text() == '(B "y")\n'
    with pytest.raises(ParameterObjectError, match=r"The number of parameter maps \(5\) does not match the number of "
                                                   r"provided filenames \(1\)\."):
        po.WriteParameterFiles(["a.txt"])
    with pytest.raises(TypeError):
        ParameterObject.WriteParameterFiles()


# ------------------------------------------------------------------------------------------------ Python protocol
def test_print_like_itk_elastix():
    po = ParameterObject.New()
    assert str(po).endswith("  Observers: \n    none\n")
    po.AddParameterMap(ParameterObject.GetDefaultParameterMap("rigid"))
    po.AddParameterMap(ParameterObject.GetDefaultParameterMap("bspline", 3, 7.5))
    text = str(po)
    assert text.startswith("ParameterObject (0x") and "  RTTI typeinfo:   elastix::ParameterObject\n" in text
    assert text.split("    none\n", 1)[1] == PRINTED_MAPS
    po2 = ParameterObject({"E": [], "S": ["a b"], "N": ["-1.5e-07"]})
    assert str(po2).split("    none\n", 1)[1] == 'ParameterMap 0: \n  (E)\n  (N -1.5e-07)\n  (S "a b")\n'
    assert repr(po) == "<ParameterObject: 2 parameter maps (EulerTransform, BSplineTransform)>"
    assert repr(ParameterObject()) == "<ParameterObject: 0 parameter maps>"


def test_python_protocol_and_aliases():
    po = ParameterObject([{"Transform": "EulerTransform"}, {"Transform": "AffineTransform"}])
    assert len(po) == 2 and po[-1] == po[1] == {"Transform": ("AffineTransform",)}
    assert po[0:1] == [{"Transform": ("EulerTransform",)}]
    assert [pm["Transform"] for pm in po] == [("EulerTransform",), ("AffineTransform",)]
    assert po == ParameterObject(po) and po != ParameterObject()
    with pytest.raises(IndexError):
        po[2]
    camel = [n for n in dir(ParameterObject) if re.fullmatch(r"[A-Z][A-Za-z]+", n)]
    assert len(camel) >= 18
    for name in camel:
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        assert hasattr(po, snake), snake
    assert po.get_parameter(0, "Transform") == ("EulerTransform",)
    assert ParameterObject.get_default_parameter_map("rigid") == ParameterObject.GetDefaultParameterMap("rigid")
    assert ParameterObject.new().get_number_of_parameter_maps() == 0


def test_as_parameter_maps():
    class FakeItkObject:  # duck-typed itk-elastix ParameterObject
        def GetNumberOfParameterMaps(self):
            return 2

        def GetParameterMap(self, i):
            return {"Transform": ("EulerTransform", "AffineTransform")[i]}

    po = ParameterObject({"A": 1})
    assert as_parameter_maps({"A": 1}) == [{"A": ("1",)}]
    assert as_parameter_maps([{"A": 1}, {"B": [True, 2.0]}]) == [{"A": ("1",)}, {"B": ("true", "2.0")}]
    assert as_parameter_maps(po) == [{"A": ("1",)}] and as_parameter_maps(()) == []
    assert as_parameter_maps([po, {"B": "x"}]) == [{"A": ("1",)}, {"B": ("x",)}]
    assert as_parameter_maps(FakeItkObject()) == [{"Transform": ("EulerTransform",)}, {"Transform": ("AffineTransform",)}]
    for bad in ("rigid", RIGID_TXT, None, 3, ["rigid"], [[{"A": 1}]]):
        with pytest.raises(TypeError):
            as_parameter_maps(bad)


# ------------------------------------------------------------------------------------------------ live itk-elastix
ITK_WARNINGS = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")  # SWIG, on import itk


@pytest.fixture(scope="module")
def itk():
    itk = pytest.importorskip("itk", reason="itk-elastix is not installed")
    if not hasattr(itk, "ParameterObject"):
        pytest.skip("itk is installed without elastix (pip install itk-elastix)")
    return itk


def _itk_maps(itk_po) -> list:
    return [{k: tuple(v) for k, v in itk_po.GetParameterMap(i).items()}
            for i in range(itk_po.GetNumberOfParameterMaps())]


def _itk_message(exc) -> str:
    text = str(exc).split("ITK ERROR: ", 1)[-1]
    return re.sub(r"^ParameterObject\(0x[0-9a-f]+\): ", "", text).strip()


@pytest.mark.slow
@ITK_WARNINGS
def test_default_maps_match_itk_elastix(itk):
    cases = [(4, 10.0), (1, 10.0), (0, 10.0), (3, 7.5), (6, 0.1), (2, 1e-7), (5, 16), (3, 1e20), (3, -2.5), (8, 3.3),
             (12, 0.625)]
    for name in DEFAULT_PARAMETER_MAP_NAMES:
        ref = {k: tuple(v) for k, v in itk.ParameterObject.GetDefaultParameterMap(name).items()}
        assert ParameterObject.GetDefaultParameterMap(name) == ref
        assert list(ParameterObject.GetDefaultParameterMap(name)) == list(ref)
        for n, spacing in cases:
            ref = {k: tuple(v) for k, v in itk.ParameterObject.GetDefaultParameterMap(name, n, spacing).items()}
            assert ParameterObject.GetDefaultParameterMap(name, n, spacing) == ref, (name, n, spacing)
    for name in ("nonrigid", "foo", "Rigid"):
        with pytest.raises(RuntimeError) as ref_info:
            itk.ParameterObject.GetDefaultParameterMap(name)
        with pytest.raises(ParameterObjectError) as info:
            ParameterObject.GetDefaultParameterMap(name)
        assert str(info.value) == _itk_message(ref_info.value)


@pytest.mark.slow
@ITK_WARNINGS
def test_operations_match_itk_elastix(itk):
    """The same calls on both objects leave the same maps and raise the same messages."""
    ours, ref = ParameterObject.New(), itk.ParameterObject.New()
    calls = [
        ("SetParameter", ("K", "v")), ("AddParameterMap", (itk.ParameterObject.GetDefaultParameterMap("rigid"),)),
        ("AddParameterMap", ({"A": ["1"], "B": ("x", "y")},)), ("SetParameter", ("X", ["a", "b"])),
        ("SetParameter", (1, "Y", "v")), ("SetParameter", (0, "E", [])), ("SetParameter", (0, "F", "")),
        ("SetParameter", (5, "Y", "v")), ("GetParameter", (0, "Nope")), ("GetParameter", (7, "Transform")),
        ("GetParameterMap", (7,)), ("RemoveParameter", (9, "Y")), ("RemoveParameter", (0, "Nope")),
        ("RemoveParameter", ("X",)), ("SetParameterMap", (0, {"B": ["x"]})), ("SetParameterMap", (50, {"B": ["x"]})),
        ("AddParameterFile", (str(RIGID_TXT),)), ("ReadParameterFiles", ([],)),
        ("AddParameterFile", (str(TRANSLATION_TP),)), ("AddParameterFile", ("/nonexistent/p.txt",)),
    ]
    for method, args in calls:
        try:
            expected, expected_error = getattr(ref, method)(*args), None
        except RuntimeError as exc:
            expected, expected_error = None, _itk_message(exc)
        try:
            got, got_error = getattr(ours, method)(*args), None
        except ParameterObjectError as exc:
            got, got_error = None, str(exc)
        assert got_error == expected_error, method
        if isinstance(expected, tuple):
            assert got == expected
        assert ours.GetParameterMaps() == _itk_maps(ref), (method, args)
    for args in (("Transform",), ("Y",), (0, "F"), (1, "F"), (9, "A")):
        assert ours.HasParameter(*args) == ref.HasParameter(*args)
    ref_text, our_text = str(ref), str(ours)
    assert our_text.split("    none\n", 1)[1] == ref_text.split("    none\n", 1)[1]
    # Deliberate difference: elastix clears the maps before it finds a file missing; we keep them.
    with pytest.raises(RuntimeError) as ref_info:
        ref.ReadParameterFiles([str(RIGID_TXT), "/nonexistent/p.txt"])
    with pytest.raises(ParameterObjectError) as info:
        ours.ReadParameterFiles([str(RIGID_TXT), "/nonexistent/p.txt"])
    assert str(info.value) == _itk_message(ref_info.value)
    assert ref.GetNumberOfParameterMaps() == 1 and len(ours) == 4


@pytest.mark.slow
@ITK_WARNINGS
def test_print_matches_itk_elastix(itk):
    maps = [itk.ParameterObject.GetDefaultParameterMap("rigid"),
            itk.ParameterObject.GetDefaultParameterMap("bspline", 3, 7.5),
            {"E": [], "S": ["a b"], "N": ["-1.5e-07", "1.0", "1e+21", "x y", "true", "-0", "+3", ".5"]}]
    ref = itk.ParameterObject.New()
    for pm in maps:
        ref.AddParameterMap(pm)
    ours = ParameterObject(maps)
    assert str(ours).split("    none\n", 1)[1] == str(ref).split("    none\n", 1)[1]
    assert str(ours).split("    none\n", 1)[1].startswith(PRINTED_MAPS)


@pytest.mark.slow
@ITK_WARNINGS
def test_writing_matches_itk_elastix(itk, tmp_path, monkeypatch):
    maps = [{"Transform": ["TranslationTransform"], "TransformParameters": ["1.5", "-2"], "Empty": [],
             "N": ["1e-7", "1.0", "abc def", "true", "-0", "+3", ".5", "1.", "1e5", "1E+5", "1.5e+05"]},
            {"Transform": ["EulerTransform"], "TransformParameters": ["0", "0", "0"],
             "InitialTransformParameterFileName": ["NoInitialTransform"]},
            {"Transform": ["AffineTransform"], "TransformParameters": ["1"],
             "InitialTransformParameterFileName": ["x", "y"]},
            {"Metric": ["X"], "Numbers": ["1", "2"], "Flag": ["false"], "None": []}]
    for i, pm in enumerate(maps):
        for ext in ("txt", "toml"):
            itk.ParameterObject.WriteParameterFile(pm, str(tmp_path / f"itk{i}.{ext}"))
            ParameterObject.WriteParameterFile(pm, tmp_path / f"ours{i}.{ext}")
            assert (tmp_path / f"ours{i}.{ext}").read_bytes() == (tmp_path / f"itk{i}.{ext}").read_bytes()
    ref = itk.ParameterObject.New()
    for pm in maps:
        ref.AddParameterMap(pm)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "itk").mkdir()
    (tmp_path / "ours").mkdir()
    itk.ParameterObject.WriteParameterFiles(ref, [f"itk/p{i}.txt" for i in range(4)])  # the only call that works
    ParameterObject(maps).WriteParameterFiles([f"ours/p{i}.txt" for i in range(4)])
    for i in range(4):
        ours_text = (tmp_path / f"ours/p{i}.txt").read_text().replace("ours/", "itk/")
        assert ours_text == (tmp_path / f"itk/p{i}.txt").read_text()


@pytest.mark.slow
@ITK_WARNINGS
def test_dict_conversion_matches_itk_elastix(itk):
    d = {"A": [1, 2.5, True, "x"], "B": 10.0, "C": 1e-7, "D": False, "E": 3, "F": "one value", "G": [0.1, -0.0]}
    assert as_parameter_maps(d) == _itk_maps(itk.dict_to_parameter_object(d))
    ds = [{"A": 1}, {"B": 2.5}, {"C": [True, False]}]
    assert as_parameter_maps(ds) == _itk_maps(itk.dict_to_parameter_object(ds))
    assert ParameterObject(ds).GetParameterMaps() == _itk_maps(itk.dict_to_parameter_object(ds))
    itk_po = itk.dict_to_parameter_object(ds)
    assert as_parameter_maps(itk_po) == _itk_maps(itk_po)  # an itk ParameterObject is accepted too
