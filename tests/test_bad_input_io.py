"""Bad image files never give a silent wrong answer: each case is refused with an error naming the file and the
problem (truncated data, NaN/Inf voxels, complex pixels, zero spacing, empty, a directory, not an image), and valid
files of every format still load bit for bit as ``SimpleITK.ReadImage`` reads them."""
from __future__ import annotations

import gzip
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import oblique_direction

import classreg as cr

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------ helpers
def _array(dtype=np.float32, shape=(6, 7, 8), seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.random(shape) * 100 + 1).astype(dtype)
    return rng.integers(1, 120, size=shape).astype(dtype)


def _sitk_image(a, *, vector=False, seed=0):
    rng = np.random.default_rng(seed + 100)
    img = sitk.GetImageFromArray(a, isVector=vector)
    n = img.GetDimension()
    img.SetSpacing(tuple(rng.uniform(0.5, 2.5, n)))
    img.SetOrigin(tuple(rng.uniform(-50, 50, n)))
    img.SetDirection(tuple(oblique_direction(n, rng).ravel()))
    return img


def _write(tmp_path, name, a=None, *, vector=False, compress=None):
    p = tmp_path / name
    a = _array() if a is None else a
    compress = name.endswith(".gz") if compress is None else compress
    sitk.WriteImage(_sitk_image(a, vector=vector), str(p), compress)
    return p


def _cut(path, keep):
    """Truncate ``path`` to a fraction (float) or a number of bytes (int) of its length."""
    b = Path(path).read_bytes()
    n = int(len(b) * keep) if isinstance(keep, float) else keep
    Path(path).write_bytes(b[:n])


def _nan_array(dtype=np.float32, values=(np.nan,)):
    a = _array(dtype)
    flat = a.reshape(-1)
    for k, v in enumerate(values):
        flat[7 + 13 * k] = v
    return a


def _nib_save(path, a, header=None):
    """``a`` in numpy (z, y, x) order, saved with nibabel (which wants x first)."""
    nib.save(nib.Nifti1Image(np.transpose(a, (2, 1, 0)), np.diag([1.5, 2.0, 2.5, 1.0]), header), str(path))
    return path


# ------------------------------------------------------------------------------------------------- bad-file builders
def truncated(name, keep, dtype=np.float32, *, data_file=None, compress=None):
    def build(tmp_path):
        p = _write(tmp_path, name, _array(dtype), compress=compress)
        _cut(tmp_path / data_file if data_file else p, keep)
        return p
    return build


def truncated_zeros(name, keep):
    """Mostly-zero uint8 data (like a brain template's background): compresses well."""
    def build(tmp_path):
        a = np.zeros((20, 22, 24), np.uint8)
        a[5:15, 6:16, 7:17] = 200
        p = _write(tmp_path, name, a)
        _cut(p, keep)
        return p
    return build


def missing_data_file(name, data_file):
    def build(tmp_path):
        p = _write(tmp_path, name)
        (tmp_path / data_file).unlink()
        return p
    return build


def corrupt_gzip(name, dtype):
    def build(tmp_path):
        p = _write(tmp_path, name, _array(dtype))
        b = bytearray(p.read_bytes())
        mid = int(len(b) * 0.8)  # well past the header
        b[mid:mid + 64] = bytes(64)
        p.write_bytes(bytes(b))
        return p
    return build


def with_nonfinite(name, dtype=np.float32, values=(np.nan,), *, vector=False):
    def build(tmp_path):
        a = _nan_array(dtype, values)
        if vector:
            a = np.stack([a, a + 1, a + 2], axis=-1)
        return _write(tmp_path, name, a, vector=vector)
    return build


def nib_nonfinite(name, dtype, endian="<", values=(np.nan,)):
    def build(tmp_path):
        a = _nan_array(dtype, values).astype(np.dtype(dtype).newbyteorder(endian))
        return _nib_save(tmp_path / name, a, nib.Nifti1Header(endianness=endian))
    return build


def scaled_nonfinite(name):
    """A float32 NIfTI with scl_slope = 2 (ITK rescales, so nifticlib's NaN -> 0 becomes 0 * 2 + 1)."""
    def build(tmp_path):
        p = _write(tmp_path, name.replace(".gz", ""), _nan_array(np.float32, (np.nan, 0.0)), compress=False)
        b = bytearray(p.read_bytes())
        struct.pack_into("<2f", b, 112, 2.0, 1.0)
        if name.endswith(".gz"):
            p.unlink()
            p = tmp_path / name
            p.write_bytes(gzip.compress(bytes(b)))
        else:
            p.write_bytes(bytes(b))
        return p
    return build


def nib_complex(name, dtype):
    def build(tmp_path):
        a = (_array(np.float64) + 1j * _array(np.float64, seed=1)).astype(dtype)
        return _nib_save(tmp_path / name, a)
    return build


def zero_spacing(name):
    def build(tmp_path):
        p = _write(tmp_path, name)
        text = p.read_bytes()  # .mha / .mhd / .nrrd: a text header (binary data after it, for .mha / .nrrd)
        if name.endswith((".mha", ".mhd")):
            text = re.sub(rb"ElementSpacing = \S+", b"ElementSpacing = 0", text, count=1)
        else:
            text = re.sub(rb"space directions: \([^)]*\)", b"space directions: (0,0,0)", text, count=1)
        p.write_bytes(text)
        return p
    return build


def empty(name):
    def build(tmp_path):
        p = tmp_path / name
        p.write_bytes(b"")
        return p
    return build


def directory(name):
    def build(tmp_path):
        p = tmp_path / name
        p.mkdir()
        return p
    return build


def text_file(name):
    def build(tmp_path):
        p = tmp_path / name
        p.write_text("subject,age\nsub-01,34\nsub-02,29\n" * 20)
        return p
    return build


def missing(name):
    return lambda tmp_path: tmp_path / name


TRUNCATED = "truncated"
NONFINITE = "NaN/Inf"
COMPLEX = "complex"
SPACING = "zero/negative spacing"
UNREADABLE = "could not read"

CASES = [
    # truncated .nii.gz: several cut points, float (classreg's own voxel read) and integer (ITK + length checks)
    ("nii.gz-f32-cut0.1", truncated("a.nii.gz", 0.1), ValueError, TRUNCATED),
    ("nii.gz-f32-cut0.25", truncated("a.nii.gz", 0.25), ValueError, TRUNCATED),
    ("nii.gz-f32-cut0.5", truncated("a.nii.gz", 0.5), ValueError, TRUNCATED),
    ("nii.gz-f32-cut0.75", truncated("a.nii.gz", 0.75), ValueError, TRUNCATED),
    ("nii.gz-f32-cut0.95", truncated("a.nii.gz", 0.95), ValueError, TRUNCATED),
    ("nii.gz-i16-cut0.25", truncated("a.nii.gz", 0.25, np.int16), ValueError, TRUNCATED),
    ("nii.gz-i16-cut0.5", truncated("a.nii.gz", 0.5, np.int16), ValueError, TRUNCATED),
    ("nii.gz-i16-cut0.9", truncated("a.nii.gz", 0.9, np.int16), ValueError, TRUNCATED),
    ("nii.gz-u8-zeros-cut0.5", truncated_zeros("a.nii.gz", 0.5), ValueError, TRUNCATED),
    ("nii.gz-u8-zeros-cut0.9", truncated_zeros("a.nii.gz", 0.9), ValueError, TRUNCATED),
    ("nii.gz-f64-cut0.5", truncated("a.nii.gz", 0.5, np.float64), ValueError, TRUNCATED),
    ("nii.gz-header-cut", truncated("a.nii.gz", 60), ValueError, TRUNCATED + ".*header"),
    ("nii.gz-corrupt-f32", corrupt_gzip("a.nii.gz", np.float32), ValueError, "corrupt"),
    ("nii.gz-corrupt-i16", corrupt_gzip("a.nii.gz", np.int16), ValueError, "corrupt"),
    # truncated .nii
    ("nii-f32-cut0.5", truncated("a.nii", 0.5), ValueError, TRUNCATED),
    ("nii-f32-1byte", truncated("a.nii", 352 + 6 * 7 * 8 * 4 - 1), ValueError, TRUNCATED),
    ("nii-i16-cut0.75", truncated("a.nii", 0.75, np.int16), ValueError, TRUNCATED),
    ("nii-u8-cut0.6", truncated("a.nii", 0.6, np.uint8), ValueError, TRUNCATED),
    # MetaImage: .mha (raw and compressed), .mhd + .raw / .zraw, and a missing data file
    ("mha-cut0.5", truncated("a.mha", 0.5), ValueError, TRUNCATED),
    ("mha-i16-cut0.9", truncated("a.mha", 0.9, np.int16), ValueError, TRUNCATED),
    ("mha-zlib-cut0.5", truncated("a.mha", 0.5, compress=True), ValueError, TRUNCATED),
    ("mhd-raw-cut0.5", truncated("a.mhd", 0.5, data_file="a.raw"), ValueError, TRUNCATED),
    ("mhd-zraw-cut0.5", truncated("a.mhd", 0.5, data_file="a.zraw", compress=True), ValueError, TRUNCATED),
    ("mhd-raw-missing", missing_data_file("a.mhd", "a.raw"), FileNotFoundError, "does not exist"),
    # NRRD: .nrrd (raw and gzip), .nhdr + .raw, and a missing data file
    ("nrrd-cut0.5", truncated("a.nrrd", 0.5), ValueError, TRUNCATED),
    ("nrrd-gzip-cut0.5", truncated("a.nrrd", 0.5, compress=True), ValueError, TRUNCATED),
    ("nhdr-raw-cut0.5", truncated("a.nhdr", 0.5, data_file="a.raw"), ValueError, TRUNCATED),
    ("nhdr-raw-missing", missing_data_file("a.nhdr", "a.raw"), FileNotFoundError, "cannot be opened"),
    ("png-cut0.5", truncated("a.png", 0.5, np.uint8), ValueError, "could not read.*truncated"),
    # NaN / Inf voxels (ITK's NIfTI reader turns them into 0)
    ("nii-f32-nan", with_nonfinite("a.nii"), ValueError, NONFINITE),
    ("nii-f32-inf", with_nonfinite("a.nii", values=(np.inf,)), ValueError, NONFINITE),
    ("nii-f64-neginf", with_nonfinite("a.nii", np.float64, (-np.inf,)), ValueError, NONFINITE),
    ("nii.gz-f32-nan", with_nonfinite("a.nii.gz"), ValueError, NONFINITE),
    ("nii.gz-f32-inf-neginf", with_nonfinite("a.nii.gz", values=(np.inf, -np.inf)), ValueError, NONFINITE),
    ("nii.gz-f64-nan", with_nonfinite("a.nii.gz", np.float64), ValueError, NONFINITE),
    ("nii-bigendian-nan", nib_nonfinite("a.nii", np.float32, ">"), ValueError, NONFINITE),
    ("nii.gz-bigendian-inf", nib_nonfinite("a.nii.gz", np.float64, ">", (np.inf,)), ValueError, NONFINITE),
    ("nii-vector-nan", with_nonfinite("a.nii", vector=True), ValueError, NONFINITE),
    ("nii.gz-vector-inf", with_nonfinite("a.nii.gz", values=(np.inf,), vector=True), ValueError, NONFINITE),
    ("nii-scaled-nan", scaled_nonfinite("a.nii"), ValueError, NONFINITE),
    ("nii.gz-scaled-nan", scaled_nonfinite("a.nii.gz"), ValueError, NONFINITE),
    ("mha-nan", with_nonfinite("a.mha"), ValueError, NONFINITE),
    ("mha-inf", with_nonfinite("a.mha", values=(-np.inf,)), ValueError, NONFINITE),
    ("mhd-nan", with_nonfinite("a.mhd"), ValueError, NONFINITE),
    ("nrrd-inf", with_nonfinite("a.nrrd", values=(np.inf,)), ValueError, NONFINITE),
    # complex-valued pixels
    ("nii-complex64", nib_complex("a.nii", np.complex64), ValueError, COMPLEX),
    ("nii.gz-complex128", nib_complex("a.nii.gz", np.complex128), ValueError, COMPLEX),
    # zero spacing (ITK's own message is cut off after the file name)
    ("mha-zero-spacing", zero_spacing("a.mha"), ValueError, SPACING),
    ("mhd-zero-spacing", zero_spacing("a.mhd"), ValueError, SPACING),
    ("nrrd-zero-spacing", zero_spacing("a.nrrd"), ValueError, SPACING),
    # empty files, directories, text files with an image extension, a missing file
    ("empty-nii.gz", empty("a.nii.gz"), ValueError, "empty"),
    ("empty-nii", empty("a.nii"), ValueError, "empty"),
    ("empty-mha", empty("a.mha"), ValueError, "empty"),
    ("empty-nrrd", empty("a.nrrd"), ValueError, "empty"),
    ("empty-png", empty("a.png"), ValueError, "empty"),
    ("dir-nii.gz", directory("a.nii.gz"), ValueError, "directory"),
    ("dir-mha", directory("a.mha"), ValueError, "directory"),
    ("text-nii", text_file("a.nii"), ValueError, UNREADABLE + ".*not a NIfTI"),
    ("text-nii.gz", text_file("a.nii.gz"), ValueError, UNREADABLE + ".*not a NIfTI"),
    ("text-mha", text_file("a.mha"), ValueError, UNREADABLE + ".*not a MetaImage"),
    ("text-mhd", text_file("a.mhd"), ValueError, UNREADABLE + ".*not a MetaImage"),
    ("text-nrrd", text_file("a.nrrd"), ValueError, UNREADABLE + ".*not a NRRD"),
    ("text-png", text_file("a.png"), ValueError, UNREADABLE + ".*not a PNG"),
    ("missing-nii.gz", missing("a.nii.gz"), FileNotFoundError, "no such file"),
]


@pytest.mark.parametrize("build, exc_type, problem", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_file_is_refused_with_a_clear_error(tmp_path, build, exc_type, problem):
    path = build(tmp_path)
    with pytest.raises(exc_type) as info:
        cr.load(path)
    message = str(info.value)
    assert str(path) in message, f"the error does not name the file: {message}"
    assert re.search(problem, message), f"the error does not say {problem!r}: {message}"
    assert "Exception thrown in SimpleITK" not in message and "0x" not in message  # no ITK noise


@pytest.mark.parametrize("make", [
    pytest.param(lambda: cr.Image(np.ones((5, 6), np.complex64), 1.0), id="Image-complex64"),
    pytest.param(lambda: cr.Image(np.ones((4, 5, 6), np.complex128), (1.0, 2.0, 3.0)), id="Image-complex128"),
    pytest.param(lambda: cr.Image(np.ones((4, 5, 2), np.complex64), (1.0, 1.0), vector=True), id="Image-vector"),
    pytest.param(lambda: cr.Image.from_array(np.ones((5, 6), complex), spacing=1.0), id="from_array"),
    pytest.param(lambda: cr.Image(np.ones((5, 6)), 1.0).like(np.ones((5, 6), np.complex64)), id="like"),
    pytest.param(lambda: cr.Image.from_sitk(sitk.GetImageFromArray(np.ones((5, 6), np.complex64))),
                 id="from_sitk"),  # the route SimpleITK images take into the solvers and the elastix API
])
def test_complex_arrays_are_refused(make):
    with pytest.raises(ValueError, match=r"complex dtype complex(64|128)"):
        make()


# ----------------------------------------------------------------------------------------------- command line
def test_cli_refuses_a_truncated_fixed_image(tmp_path):
    fixed = truncated("fixed.nii.gz", 0.5)(tmp_path)
    moving = _write(tmp_path, "moving.nii.gz")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "classreg", "register", "demons", str(fixed), str(moving), "-o", str(out), "-q"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode != 0
    assert str(fixed) in proc.stderr and "truncated" in proc.stderr, proc.stderr
    assert not (out / "result.json").exists()
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------------- valid files are unchanged
def _assert_same_as_sitk(path):
    ours = cr.load(path)
    ref = sitk.ReadImage(str(path))
    expected = sitk.GetArrayFromImage(ref)
    assert ours.data.dtype == expected.dtype
    assert ours.data.shape == expected.shape
    assert ours.data.tobytes() == expected.tobytes()  # bit for bit
    for got, want in [(ours.spacing, ref.GetSpacing()), (ours.origin, ref.GetOrigin()),
                      (ours.direction, ref.GetDirection())]:
        assert np.asarray(got, float).tobytes() == np.asarray(want, float).tobytes()  # incl. the sign of zeros


VALID = [(ext, dtype, ndim) for ext in (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
         for dtype in (np.float32, np.float64, np.int16, np.uint8) for ndim in (2, 3)]
VALID += [(".png", np.uint8, 2), (".png", np.uint16, 2)]


@pytest.mark.parametrize("ext, dtype, ndim", [pytest.param(e, d, n, id=f"{e}-{np.dtype(d).name}-{n}d")
                                              for e, d, n in VALID])
def test_valid_files_load_bit_identically_to_simpleitk(tmp_path, ext, dtype, ndim):
    shape = (6, 7, 8)[-ndim:]
    a = _array(dtype, shape, seed=ndim)
    if np.dtype(dtype).kind == "f":
        a.reshape(-1)[::5] = 0.0  # zeros where ITK's NIfTI reader would put a NaN
    p = tmp_path / f"a{ext}"
    img = _sitk_image(a, seed=ndim) if ext != ".png" else sitk.GetImageFromArray(a)
    sitk.WriteImage(img, str(p), ext.endswith(".gz"))
    _assert_same_as_sitk(p)


def _nib_big_endian(tmp_path):
    a = _array(np.float32).astype(">f4")
    return _nib_save(tmp_path / "be.nii", a, nib.Nifti1Header(endianness=">"))


def _nib_scaled(tmp_path):
    img = nib.Nifti1Image(np.transpose(_array(np.int16), (2, 1, 0)), np.diag([1.5, 2.0, 2.5, 1.0]))
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    return tmp_path / "scaled.nii.gz"


def _negative_pixdim(tmp_path):
    p = _write(tmp_path, "neg.nii", _array(np.float32))
    b = bytearray(p.read_bytes())
    struct.pack_into("<f", b, 80, -2.5)  # pixdim[1] < 0: ITK flips that axis' direction
    struct.pack_into("<h", b, 254, 0)  # sform_code = 0: the qform (with pixdim) gives the geometry
    p.write_bytes(bytes(b))
    return p


def _vector_float(tmp_path):
    a = np.stack([_array(np.float32), _array(np.float32, seed=1)], axis=-1)
    a[..., 0].reshape(-1)[::3] = 0.0
    return _write(tmp_path, "vec.nii.gz", a, vector=True)


def _multi_member_gzip(tmp_path):
    raw = _write(tmp_path, "m.nii", _array(np.int16)).read_bytes()
    p = tmp_path / "m.nii.gz"
    p.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))  # bgzip-style: several members
    return p


def _uncompressed_named_gz(tmp_path):
    p = _write(tmp_path, "plain.nii", _array(np.float32))
    q = tmp_path / "plain.nii.gz"
    os.replace(p, q)  # zlib's gzread (and ITK) read it as it is
    return q


def _singleton_slice(tmp_path):
    """A float NIfTI holding one z slice (dim = 3, nz = 1): ITK decides its dimension, classreg follows."""
    return _nib_save(tmp_path / "slice.nii.gz", _array(np.float32, (1, 7, 8)))


def _mni_template(tmp_path):
    from classreg import data

    try:
        return data.mni152_file("t1")
    except data.DataNotFoundError as exc:
        pytest.skip(str(exc))


def _mni_float_crop(tmp_path):
    p = _mni_template(tmp_path)
    img = sitk.Cast(sitk.ReadImage(str(p))[40:90, 50:110, 60:100], sitk.sitkFloat32)
    sitk.WriteImage(img, str(tmp_path / "mni_f32.nii.gz"), True)
    return tmp_path / "mni_f32.nii.gz"


@pytest.mark.parametrize("build", [
    pytest.param(_nib_big_endian, id="nii-big-endian-float"),
    pytest.param(_nib_scaled, id="nii.gz-scaled-int16"),
    pytest.param(_negative_pixdim, id="nii-negative-pixdim"),
    pytest.param(_vector_float, id="nii.gz-vector-float"),
    pytest.param(_multi_member_gzip, id="nii.gz-multi-member"),
    pytest.param(_uncompressed_named_gz, id="nii.gz-not-compressed"),
    pytest.param(_singleton_slice, id="nii.gz-one-slice-float"),
    pytest.param(_mni_template, id="mni152-t1"),
    pytest.param(_mni_float_crop, id="mni152-float32-crop"),
])
def test_special_valid_nifti_files_load_bit_identically(tmp_path, build):
    _assert_same_as_sitk(build(tmp_path))


def test_grey_pictures_stored_as_rgb_read_as_one_channel_and_colour_is_refused(tmp_path):
    """ITK's example PNGs are grey images stored as RGB: `classreg register demons` used to fail on them with
    'fixed must be a scalar image, got 3 components'."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (20, 24), dtype=np.uint8)
    rgb = sitk.GetImageFromArray(np.stack([grey] * 3, axis=-1), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "grey_rgb.png"))
    img = cr.load(tmp_path / "grey_rgb.png")
    assert not img.is_vector and np.array_equal(img.numpy(), grey)
    colour = np.stack([grey, grey[::-1], grey[:, ::-1]], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(tmp_path / "colour.png"))
    with pytest.raises(ValueError, match=r"colour\.png.*a colour image .*pass channel=0, 1 or 2"):
        cr.load(tmp_path / "colour.png")
    assert np.array_equal(cr.load(tmp_path / "colour.png", channel=1).numpy(), grey[::-1])
    with pytest.raises(ValueError, match="channel=5 but the image has 3 component"):
        cr.load(tmp_path / "colour.png", channel=5)


def test_itk_rgb_example_pngs_register_through_the_command_line(tmp_path):
    from classreg import data
    from classreg.cli import main

    try:
        t1 = data.itk_example("BrainT1SliceBorder20.png")
        pd = data.itk_example("BrainProtonDensitySliceBorder20.png")
    except data.DataNotFoundError as exc:
        pytest.skip(str(exc))
    rc = main(["register", "affine", str(t1), str(pd), "-o", str(tmp_path / "out"), "-q", "--no-qc",
               "--iterations", "5", "5", "--shrink-factors", "2", "1"])
    assert rc == 0 and (tmp_path / "out" / "result.json").exists()
