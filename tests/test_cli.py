import json
import subprocess
import sys

from classreg.cli import main


def test_help_and_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: classreg" in out and "info" in out


def test_info_reports_versions_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["numpy"] and info["backends"]["numpy"] is True
    from classreg.backend import gpu_available
    from classreg.kernels._backend import HAVE_NUMBA

    assert info["backends"]["gpu"] is gpu_available()  # what the machine has, not just "a boolean"
    assert info["backends"]["numba"] is HAVE_NUMBA
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "numba" in out and "GPU" in out


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "classreg", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("classreg ")


def test_apply_resamples_through_saved_transforms_as_the_result_does(tmp_path, capsys):
    """``classreg apply`` on a result's saved transform reproduces ``Result.apply`` (affine: transform.tfm; demons:
    the composite transform.h5 with labels), composes several -t in the order a reference point travels, and never
    writes over an input or an existing file without --overwrite."""
    import numpy as np
    from phantoms import smooth_field, smooth_image

    import classreg as cr

    rng = np.random.default_rng(4)
    fixed = cr.Image(smooth_image((40, 44), rng).astype(np.float32), spacing=(1.0, 1.2), origin=(3.0, -2.0))
    truth = cr.DisplacementField(fixed.like(smooth_field((40, 44), rng, amplitude=1.5)))
    moving = cr.resample(fixed, cr.Chain([cr.Affine.euler([0.1], translation=[1.5, -1.0]), truth]), reference=fixed)
    labels = fixed.like((fixed.data > np.median(fixed.data)).astype(np.uint8) + 1)
    paths = {n: tmp_path / f"{n}.nii.gz" for n in ("fixed", "moving", "labels")}
    for n, img in (("fixed", fixed), ("moving", moving), ("labels", labels)):
        cr.save(img, paths[n])

    aff = cr.register_affine(fixed, moving, iterations=(20, 20, 20), samples=512)
    aff.save(tmp_path / "aff")
    dem = cr.register_demons(fixed, moving, init=aff.transform, iterations=(5, 5), shrink_factors=(2, 1))
    dem.save(tmp_path / "dem")

    def apply(*extra):
        return main(["apply", str(paths["moving"]), "-r", str(paths["fixed"]), *extra])

    assert apply("-t", str(tmp_path / "aff" / "transform.tfm"), "-o", str(tmp_path / "a.nii.gz")) == 0
    np.testing.assert_allclose(cr.load(tmp_path / "a.nii.gz").data, aff.apply(moving).data, atol=1e-5)
    assert main(["apply", str(paths["labels"]), "-r", str(paths["fixed"]), "-t", str(tmp_path / "dem" / "transform.h5"),
                 "--interpolation", "label", "-o", str(tmp_path / "l.nii.gz")]) == 0
    np.testing.assert_array_equal(cr.load(tmp_path / "l.nii.gz").data,
                                  dem.apply(labels, interpolation="label").data)
    # two files: x ↦ B(A(x)); the shift A (2 mm along x) first, then the affine B
    shift = cr.Affine.from_translation([2.0, 0.0])
    shift.save(tmp_path / "shift.tfm")
    assert apply("-t", str(tmp_path / "shift.tfm"), "-t", str(tmp_path / "aff" / "transform.tfm"),
                 "-o", str(tmp_path / "c.nii.gz")) == 0
    want = cr.resample(moving, cr.Chain([shift, aff.transform]), reference=fixed).data
    np.testing.assert_allclose(cr.load(tmp_path / "c.nii.gz").data, want, atol=1e-5)

    capsys.readouterr()
    assert apply("-t", str(tmp_path / "aff" / "transform.tfm"), "-o", str(tmp_path / "a.nii.gz")) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    before = paths["moving"].read_bytes()
    assert apply("-t", str(tmp_path / "aff" / "transform.tfm"), "-o", str(paths["moving"]), "--overwrite") == 1
    assert "is one of the inputs" in capsys.readouterr().err and paths["moving"].read_bytes() == before
