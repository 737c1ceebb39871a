import numpy as np
import pytest
import SimpleITK as sitk

import classreg as cr
from phantoms import oblique_image

EXTS = [".nii", ".nii.gz", ".mha", ".mhd", ".nrrd"]


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("shape", [(13, 17), (7, 9, 11)])
@pytest.mark.parametrize("vector", [False, True])
def test_round_trip_matches_simpleitk(tmp_path, rng, ext, shape, vector):
    img = oblique_image(shape, rng, vector=vector, dtype=np.float32)
    path = tmp_path / f"img{ext}"
    cr.save(img, path)
    ours = cr.load(path)
    ref = sitk.ReadImage(str(path))
    # identical to SimpleITK's reading of the same file
    np.testing.assert_array_equal(ours.data, sitk.GetArrayFromImage(ref))
    assert ours.spacing == ref.GetSpacing()
    assert ours.origin == ref.GetOrigin()
    assert ours.direction == ref.GetDirection()
    assert ours.is_vector == vector
    # and equal to what was written (NIfTI stores geometry in float32)
    np.testing.assert_array_equal(ours.data, img.data)
    tol = 1e-5 if ext.startswith(".nii") else 1e-12
    np.testing.assert_allclose(ours.spacing, img.spacing, rtol=tol)
    np.testing.assert_allclose(ours.origin, img.origin, atol=tol * 100)
    np.testing.assert_allclose(ours.direction, img.direction, atol=tol * 10)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_png_round_trip(tmp_path, rng):
    data = rng.integers(0, 255, size=(20, 30)).astype(np.uint8)
    img = cr.Image(data, (1.0, 1.0))
    cr.save(img, tmp_path / "a.png")
    back = cr.load(tmp_path / "a.png")
    np.testing.assert_array_equal(back.data, data)
    with pytest.raises(ValueError, match="PNG"):
        cr.save(cr.Image(data / 300.0, 1.0), tmp_path / "b.png")
    with pytest.raises(ValueError, match="2-D"):
        cr.save(cr.Image(np.zeros((3, 3, 3), np.uint8), 1.0), tmp_path / "c.png")


def test_load_dtype_and_integer_data(tmp_path, rng):
    img = cr.Image(rng.integers(0, 9, size=(4, 5, 6)).astype(np.int16), (1.0, 2.0, 3.0))
    cr.save(img, tmp_path / "lab.nii.gz")
    back = cr.load(tmp_path / "lab.nii.gz")
    assert back.dtype == np.int16
    assert cr.load(tmp_path / "lab.nii.gz", dtype=np.float32).dtype == np.float32


def test_missing_unknown_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        cr.load(tmp_path / "nope.nii.gz")
    with pytest.raises(ValueError, match="no such file"):  # also a ValueError
        cr.load(tmp_path / "nope.nii.gz")
    (tmp_path / "x.xyz").write_text("hello")
    with pytest.raises(ValueError, match="unknown image file extension"):
        cr.load(tmp_path / "x.xyz")
    with pytest.raises(ValueError, match="unknown image file extension"):
        cr.save(cr.Image(np.zeros((3, 3)), 1.0), tmp_path / "out.jpeg2")
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really a nifti")
    with pytest.raises(ValueError, match="could not read"):
        cr.load(tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="does not exist"):
        cr.save(cr.Image(np.zeros((3, 3)), 1.0), tmp_path / "no_dir" / "a.nii")
    with pytest.raises(TypeError, match="classreg.Image"):
        cr.save(np.zeros((3, 3)), tmp_path / "a.nii")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "img.nii.gz"
    cr.save(cr.Image(np.ones((6, 6), np.float32), 1.0), path)
    before = path.read_bytes()

    def broken_write(image, name, *args):
        with open(name, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        cr.save(cr.Image(np.zeros((6, 6), np.float32), 1.0), path)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["img.nii.gz"]  # no temporary left behind


def test_mhd_header_references_final_data_file(tmp_path, rng):
    img = oblique_image((5, 6, 7), rng)
    cr.save(img, tmp_path / "vol.mhd")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["vol.mhd", "vol.raw"] or names == ["vol.mhd", "vol.zraw"]
    header = (tmp_path / "vol.mhd").read_text()
    assert "ElementDataFile = vol." in header
    np.testing.assert_array_equal(cr.load(tmp_path / "vol.mhd").data, img.data)


def _itk(name):
    from classreg.data import DataNotFoundError, itk_example

    try:
        return itk_example(name)
    except DataNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", ["BrainProtonDensitySliceBorder20DirectionPlus30.mhd",
                                  "BrainProtonDensitySliceBorder20DirectionPlus30.nhdr",
                                  "RatLungSlice1.mha", "KmeansTest_T1UCharRaw.nii.gz"])
def test_real_itk_files_read_like_simpleitk(name):
    path = _itk(name)
    ours = cr.load(path)
    ref = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(ours.data, sitk.GetArrayFromImage(ref))
    assert (ours.spacing, ours.origin, ours.direction) == (ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())


def test_real_oblique_slice_resamples_like_simpleitk():
    """ITK ships the PD slice with a +30° direction: resampling it onto the axis-aligned slice's grid."""
    oblique = cr.load(_itk("BrainProtonDensitySliceBorder20DirectionPlus30.mhd"), dtype=np.float32)
    plain = cr.load(_itk("BrainProtonDensitySliceBorder20.mhd"), dtype=np.float32)
    assert not np.allclose(oblique.direction, plain.direction)
    ours = cr.resample(oblique, reference=plain).data
    ref = sitk.GetArrayFromImage(sitk.Resample(oblique.to_sitk(), plain.to_sitk(), sitk.Transform(), sitk.sitkLinear,
                                               0.0, sitk.sitkFloat32))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_missing_optional_data_says_what_to_install(monkeypatch):
    from classreg import data

    monkeypatch.setattr(data, "ITK_EXAMPLES_DIRS", ())
    with pytest.raises(data.DataNotFoundError, match="insighttoolkit5-examples"):
        data.itk_example("RatLungSlice1.mha")
    with pytest.raises(ValueError, match="kind"):
        data.mni152_file("pd")
