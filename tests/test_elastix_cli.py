"""classreg-elastix: elastix's command line (ELASTIX.md §2, §8): argument rules, exit codes, output files."""
import io
import os
import shutil
import subprocess

import numpy as np
import pytest
from phantoms import blobs

import classreg as cr
from classreg.elastix.registration import main, parse_arguments

HAVE_ELASTIX = shutil.which("elastix") is not None and shutil.which("transformix") is not None

AFFINE_FILE = """
(Registration "MultiResolutionRegistration")
(FixedImagePyramid "FixedSmoothingImagePyramid")
(MovingImagePyramid "MovingSmoothingImagePyramid")
(Interpolator "BSplineInterpolator")
(Metric "AdvancedMattesMutualInformation")
(Optimizer "AdaptiveStochasticGradientDescent")
(ResampleInterpolator "FinalBSplineInterpolator")
(Resampler "DefaultResampler")
(Transform "{transform}")
(ImageSampler "RandomCoordinate")
(NumberOfResolutions 2)
(MaximumNumberOfIterations 200)
(NumberOfSpatialSamples 2048)
(NewSamplesEveryIteration "true")
(AutomaticTransformInitialization "true")
(AutomaticScalesEstimation "true")
(ErodeMask "false")
(ResultImagePixelType "float")
(ResultImageFormat "mhd")
"""

BSPLINE_FILE = """
(Registration "MultiResolutionRegistration")
(FixedImagePyramid "FixedSmoothingImagePyramid")
(MovingImagePyramid "MovingSmoothingImagePyramid")
(Metric "AdvancedMattesMutualInformation")
(Optimizer "AdaptiveStochasticGradientDescent")
(Transform "BSplineTransform")
(ImageSampler "RandomCoordinate")
(NumberOfResolutions 2)
(FinalGridSpacingInPhysicalUnits 12)
(MaximumNumberOfIterations 150)
(NumberOfSpatialSamples 2048)
(NewSamplesEveryIteration "true")
(ErodeMask "false")
(ResultImagePixelType "float")
"""


@pytest.fixture
def pair(tmp_path):
    fixed = cr.Image(blobs(), spacing=(1.0, 1.0))
    moving = cr.Image(blobs(shift=(3.0, -2.0), angle=5.0), spacing=(1.0, 1.0))
    f, m = tmp_path / "fixed.mha", tmp_path / "moving.mha"
    cr.save(fixed, f)
    cr.save(moving, m)
    return f, m


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_help_version_and_hint():
    assert run([])[:2] == (0, 'Use "elastix --help" for information about elastix-usage.\n')
    code, out, _ = run(["--version"])
    assert code == 0 and out.startswith("elastix version: ")
    code, out, _ = run(["--help"])
    assert code == 0 and "-p        parameter file" in out
    assert run(["-whatever"])[0] == 0


def test_pairwise_parsing_rules():
    err = io.StringIO()
    args, params = parse_arguments(["-p", "a.txt", "-out", "o", "-p", "b.txt", "-f", "x", "-f", "y", "-odd"], err)
    assert params == ["a.txt", "b.txt"] and args["-out"] == "o/" and args["-f"] == "x"
    assert err.getvalue() == "WARNING!\nArgument -fis only required once.\nArguments -f yare ignored\n"


@pytest.mark.parametrize("argv, code, message", [
    (["-f", "f.mha", "-out", "{tmp}"], 255, 'No CommandLine option "-p" given'),
    (["-f", "f.mha", "-p", "p.txt"], 254, 'No CommandLine option "-out" given'),
    (["-f", "f.mha", "-p", "p.txt", "-out", "{tmp}/missing"], 254, "does not exist"),
    (["-f", "f.mha"], 254, 'No CommandLine option "-p" given'),             # -p missing, -out absent: 254
    (["-f", "f.mha", "-out", "{tmp}/missing"], 255, "does not exist"),      # -p missing, -out missing: -1|-2
])
def test_exit_codes_of_missing_arguments(tmp_path, argv, code, message):
    got, _, err = run([a.format(tmp=tmp_path) for a in argv])
    assert got == code and message in err
    assert not (tmp_path / "missing").exists()                             # elastix never creates -out


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_runtime_errors_exit_1_and_leave_only_the_log(tmp_path, pair):
    f, m = pair
    out = tmp_path / "out"
    out.mkdir()
    bad = write(tmp_path, "bad.txt", AFFINE_FILE.format(transform="NoSuchTransform"))
    code, _, err = run(["-f", f, "-m", m, "-p", bad, "-out", out])
    assert code == 1 and "NoSuchTransform" in err
    assert sorted(os.listdir(out)) == ["elastix.log"]
    assert "ERROR:" in (out / "elastix.log").read_text()
    code, _, err = run(["-f", tmp_path / "nope.mha", "-m", m, "-p", write(tmp_path, "ok.txt", AFFINE_FILE.format(
        transform="EulerTransform")), "-out", out])
    assert code == 1 and "nope.mha" in err
    code, _, err = run(["-f", f, "-m", m, "-p", write(tmp_path, "p.par", "(Transform \"EulerTransform\")"),
                        "-out", out])
    assert code == 1 and "should be a text file" in err


def two_stage(tmp_path, pair, transform):
    """classreg-elastix with ``transform`` then a B-spline; returns the output folder (and asserts exit 0)."""
    f, m = pair
    out = tmp_path / "out"
    out.mkdir()
    first = write(tmp_path, "first.txt", AFFINE_FILE.format(transform=transform))
    bspl = write(tmp_path, "bspline.txt", BSPLINE_FILE)
    code, _, err = run(["-f", f, "-m", m, "-p", first, "-p", bspl, "-out", out, "-threads", "2"])
    assert code == 0, err
    return out


def test_two_stage_run_writes_elastix_outputs(tmp_path, pair):
    f, m = pair
    out = two_stage(tmp_path, pair, "EulerTransform")
    rigid = tmp_path / "first.txt"
    names = sorted(os.listdir(out))
    assert names == ["IterationInfo.0.R0.txt", "IterationInfo.0.R1.txt", "IterationInfo.1.R0.txt",
                     "IterationInfo.1.R1.txt", "TransformParameters.0.txt", "TransformParameters.1.txt",
                     "elastix.log", "result.0.mhd", "result.0.raw", "result.1.mhd", "result.1.raw"]
    from classreg.elastix.parameters import read_parameter_file

    tp0 = read_parameter_file(out / "TransformParameters.0.txt")
    tp1 = read_parameter_file(out / "TransformParameters.1.txt")
    assert tp0["Transform"] == ("EulerTransform",) and tp1["Transform"] == ("BSplineTransform",)
    assert tp0["InitialTransformParameterFileName"] == ("NoInitialTransform",)
    for key in ("InitialTransformParameterFileName", "InitialTransformParametersFileName"):
        assert tp1[key] == (f"{out}/TransformParameters.0.txt",)
    # the rigid stage recovers the known motion: moving = fixed rotated 5° about the centre and shifted (3, -2)
    theta, tx, ty = map(float, tp0["TransformParameters"])
    assert abs(np.rad2deg(theta) - 5.0) < 0.3 and abs(tx - 3.0) < 0.3 and abs(ty + 2.0) < 0.3
    log = (out / "elastix.log").read_text()
    assert "start of ParameterFile" in log and "Total time elapsed" in log
    header = (out / "IterationInfo.0.R0.txt").read_text().splitlines()
    assert header[0].startswith("1:ItNr\t2:Metric") and len(header) == 201
    # a second run into the same folder moves the first run's files aside: nothing mixes, nothing is lost
    code, _, err = run(["-f", f, "-m", m, "-p", rigid, "-out", out])
    assert code == 0, err
    assert not (out / "TransformParameters.1.txt").exists()
    prev = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("previous-run-")]
    assert len(prev) == 1 and (prev[0] / "TransformParameters.1.txt").exists()


@pytest.mark.skipif(not HAVE_ELASTIX, reason="Debian's elastix/transformix not installed")
def test_real_transformix_applies_classreg_elastix_files(tmp_path, pair):
    """Interoperability: real transformix 5.0.1 maps points with classreg-elastix's chain as classreg does."""
    out = two_stage(tmp_path, pair, "AffineTransform")
    pts = tmp_path / "pts.txt"
    rng = np.random.default_rng(3)
    p = rng.uniform(5, 58, size=(20, 2))
    pts.write_text("point\n20\n" + "\n".join(f"{a:.6f} {b:.6f}" for a, b in p) + "\n")
    real = tmp_path / "real"
    real.mkdir()
    r = subprocess.run(["transformix", "-def", str(pts), "-out", str(real), "-tp",
                        str(out / "TransformParameters.1.txt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]
    from classreg.elastix.transform_files import read_transform_file

    ours = read_transform_file(out / "TransformParameters.1.txt").transform.map_points(p)
    theirs = np.array([[float(v) for v in line.split("OutputPoint = [")[1].split("]")[0].split()]
                       for line in (real / "outputpoints.txt").read_text().splitlines()])
    # outputpoints.txt prints 6 decimals
    assert np.max(np.abs(ours - theirs)) < 1e-4


def test_elastix_shims_run_unchanged_scripts(tmp_path, pair):
    """`classreg elastix-shims DIR`: a script calling plain `elastix` runs classreg's drop-in with DIR on PATH."""
    from classreg.cli import main as classreg_main

    shims = tmp_path / "bin"
    assert classreg_main(["elastix-shims", str(shims)]) == 0
    assert classreg_main(["elastix-shims", str(shims)]) == 1                 # never overwrites without --force
    env = dict(os.environ, PATH=f"{shims}{os.pathsep}{os.environ['PATH']}")
    f, m = pair
    out = tmp_path / "out"
    out.mkdir()
    rigid = write(tmp_path, "rigid.txt", AFFINE_FILE.format(transform="TranslationTransform").replace(
        "(MaximumNumberOfIterations 200)", "(MaximumNumberOfIterations 20)"))
    r = subprocess.run(["sh", "-c", f"elastix -f {f} -m {m} -p {rigid} -out {out} && transformix -def all "
                        f"-tp {out}/TransformParameters.0.txt -out {out}"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "TransformParameters.0.txt").exists() and (out / "deformationField.mhd").exists()
    assert "classreg" in (out / "elastix.log").read_text()


def test_an_interrupted_run_leaves_no_partial_output(tmp_path, pair, monkeypatch):
    """Stopped during stage 1: stage 0's complete files and the log are kept (as elastix keeps them), nothing of
    stage 1 appears under a final name and no private staging folder is left behind."""
    import classreg.elastix.registration as reg

    f, m = pair
    out = tmp_path / "out"
    out.mkdir()
    real = reg._run_stage
    calls = []

    def stage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reg, "_run_stage", stage)
    rigid = write(tmp_path, "rigid.txt", AFFINE_FILE.format(transform="EulerTransform"))
    code, _, err = run(["-f", f, "-m", m, "-p", rigid, "-p", rigid, "-out", out])
    assert code == 130 and "interrupted" in err
    assert sorted(os.listdir(out)) == ["IterationInfo.0.R0.txt", "IterationInfo.0.R1.txt",
                                       "TransformParameters.0.txt", "elastix.log", "result.0.mhd", "result.0.raw"]


def test_classreg_solver_from_a_parameter_file_writes_a_field_real_transformix_applies(tmp_path, pair):
    """(Registration "classreg:demons"): the dense result becomes an elastix DeformationFieldTransform."""
    f, m = pair
    out = tmp_path / "out"
    out.mkdir()
    p = write(tmp_path, "demons.txt", '(Registration "classreg:demons")\n(ShrinkFactors 2 1)\n(Iterations 20 10)\n'
              '(ResultImagePixelType "float")\n')
    code, _, err = run(["-f", f, "-m", m, "-p", p, "-out", out])
    assert code == 0, err
    from classreg.elastix.parameters import read_parameter_file
    from classreg.elastix.transform_files import read_transform_file

    tp = read_parameter_file(out / "TransformParameters.0.txt")
    assert tp["Transform"] == ("DeformationFieldTransform",)
    assert tp["DeformationFieldFileName"] == (f"{out}/deformationField.0.nii.gz",)
    assert (out / "deformationField.0.nii.gz").exists()
    if not HAVE_ELASTIX:
        pytest.skip("Debian's transformix not installed")
    real = tmp_path / "real"
    real.mkdir()
    r = subprocess.run(["transformix", "-def", "all", "-out", str(real), "-tp", str(out / "TransformParameters.0.txt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]
    theirs = cr.load(real / "deformationField.mhd").numpy()
    tf = read_transform_file(out / "TransformParameters.0.txt")
    grid = cr.load(f)
    pts = grid.grid_points().reshape(-1, 2)
    ours = (tf.transform.map_points(pts) - pts).reshape(theirs.shape)
    # elastix evaluates the field in single precision at the voxel centres it was written on
    assert np.max(np.abs(ours - theirs)) < 1e-3


def test_two_image_metrics_and_cubic_interpolation_run_end_to_end(tmp_path, pair):
    """A multi-metric Euler file (Mattes MI weight 1 + normalised correlation weight 0.5, BSplineInterpolationOrder 3)
    runs on the engine's weighted sum with cubic B-spline interpolation and recovers the known motion (5°,
    (3, -2) mm; the same 0.3 tolerance as the single-metric run above)."""
    f, m = pair
    out = tmp_path / "out"
    out.mkdir()
    text = (AFFINE_FILE.format(transform="EulerTransform")
            .replace('(Registration "MultiResolutionRegistration")',
                     '(Registration "MultiMetricMultiResolutionRegistration")')
            .replace('(Metric "AdvancedMattesMutualInformation")',
                     '(Metric "AdvancedMattesMutualInformation" "AdvancedNormalizedCorrelation")\n'
                     '(Metric0Weight 1.0)\n(Metric1Weight 0.5)\n(BSplineInterpolationOrder 3)'))
    code, _, err = run(["-f", f, "-m", m, "-p", write(tmp_path, "multi.txt", text), "-out", out, "-threads", "2"])
    assert code == 0, err
    from classreg.elastix.parameters import read_parameter_file

    theta, tx, ty = map(float, read_parameter_file(out / "TransformParameters.0.txt")["TransformParameters"])
    assert abs(np.rad2deg(theta) - 5.0) < 0.3 and abs(tx - 3.0) < 0.3 and abs(ty + 2.0) < 0.3
    log = (out / "elastix.log").read_text()
    # the log lists the options the stage ran with
    assert "metric_weights=(('mi', 1.0), ('ncc', 0.5))" in log and "interpolation='bspline3'" in log, log[-2000:]
