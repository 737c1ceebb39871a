import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import oblique_image, smooth_field

import classreg as cr
from classreg.transforms import from_sitk_transform, rotation_matrix


def _sitk_points(tx, pts):
    return np.array([tx.TransformPoint(tuple(map(float, p))) for p in pts])


def random_affine(ndim, rng):
    a = rotation_matrix(rng.uniform(-0.5, 0.5, size=1 if ndim == 2 else 3)) @ np.diag(rng.uniform(0.8, 1.25, ndim))
    a = a + rng.normal(scale=0.05, size=(ndim, ndim))
    return cr.Affine(a, rng.uniform(-10, 10, ndim), rng.uniform(-20, 20, ndim))


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_matches_itk_and_inverts_exactly(rng, ndim):
    t = random_affine(ndim, rng)
    pts = rng.uniform(-50, 50, size=(40, ndim))
    np.testing.assert_allclose(t.map_points(pts), _sitk_points(t.to_sitk(), pts), atol=1e-9)
    np.testing.assert_allclose(t.inverse().map_points(t.map_points(pts)), pts, atol=1e-9)
    np.testing.assert_allclose(t.offset, t.to_sitk().GetOffset() if hasattr(t.to_sitk(), "GetOffset") else t.offset)
    h = t.homogeneous
    np.testing.assert_allclose(pts @ h[:ndim, :ndim].T + h[:ndim, ndim], t.map_points(pts), atol=1e-9)
    np.testing.assert_allclose(cr.Affine.from_homogeneous(h).map_points(pts), t.map_points(pts), atol=1e-9)


def test_constructors_match_itk(rng):
    ang, t, c = 0.3, np.array([2.0, -1.0]), np.array([5.0, 7.0])
    e2 = sitk.Euler2DTransform(tuple(c), ang, tuple(t))
    pts = rng.uniform(-30, 30, size=(20, 2))
    np.testing.assert_allclose(cr.Affine.euler(ang, translation=t, center=c).map_points(pts), _sitk_points(e2, pts),
                               atol=1e-9)
    angles = np.array([0.2, -0.4, 0.7])
    e3 = sitk.Euler3DTransform((1.0, 2.0, 3.0), *angles, (4.0, 5.0, 6.0))
    pts3 = rng.uniform(-30, 30, size=(20, 3))
    ours = cr.Affine.euler(angles, translation=(4, 5, 6), center=(1, 2, 3))
    np.testing.assert_allclose(ours.map_points(pts3), _sitk_points(e3, pts3), atol=1e-9)
    s3 = sitk.Similarity3DTransform()
    s3.SetMatrix(tuple(rotation_matrix(angles).ravel()))
    s3.SetScale(1.3)
    s3.SetCenter((1.0, -2.0, 0.5))
    s3.SetTranslation((3.0, 0.0, -1.0))
    sim = cr.Affine.similarity(1.3, angles, translation=(3, 0, -1), center=(1, -2, 0.5))
    np.testing.assert_allclose(sim.map_points(pts3), _sitk_points(s3, pts3), atol=1e-9)
    np.testing.assert_allclose(cr.Affine.from_translation([1, 2, 3]).map_points(pts3), pts3 + [1, 2, 3])
    with pytest.raises(ValueError, match="rotation"):
        cr.Affine.rigid(np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="scale"):
        cr.Affine.similarity(-1.0, angles)
    with pytest.raises(ValueError, match="singular"):
        cr.Affine(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="translation"):
        cr.Affine(np.eye(3), translation=(1.0, 2.0))


def test_affine_composition_and_chain(rng):
    a, b = random_affine(3, rng), random_affine(3, rng)
    pts = rng.uniform(-40, 40, size=(30, 3))
    ab = a.compose(b)
    assert isinstance(ab, cr.Affine)
    np.testing.assert_allclose(ab.map_points(pts), a.map_points(b.map_points(pts)), atol=1e-9)
    chain = cr.Chain([b, a])
    np.testing.assert_allclose(chain.map_points(pts), ab.map_points(pts), atol=1e-9)
    np.testing.assert_allclose(chain.inverse().map_points(chain.map_points(pts)), pts, atol=1e-9)
    np.testing.assert_allclose(chain.simplified().map_points(pts), ab.map_points(pts), atol=1e-9)
    # SimpleITK's composite applies the last-added transform first: our to_sitk must agree
    np.testing.assert_allclose(_sitk_points(chain.to_sitk(), pts), chain.map_points(pts), atol=1e-9)
    with pytest.raises(ValueError, match="same dimension"):
        cr.Chain([a, random_affine(2, rng)])
    with pytest.raises(ValueError, match="empty"):
        cr.Chain([])


@pytest.mark.parametrize("ext", [".tfm", ".txt", ".mat", ".h5"])
def test_affine_save_load_readable_by_simpleitk(tmp_path, rng, ext):
    t = random_affine(3, rng)
    path = tmp_path / f"t{ext}"
    t.save(path)
    pts = rng.uniform(-40, 40, size=(10, 3))
    np.testing.assert_allclose(_sitk_points(sitk.ReadTransform(str(path)), pts), t.map_points(pts), atol=1e-9)
    back = cr.load_transform(path)
    assert isinstance(back, cr.Affine)
    np.testing.assert_allclose(back.map_points(pts), t.map_points(pts), atol=1e-9)
    np.testing.assert_allclose(back.center, t.center, atol=1e-12)


def test_read_itk_transform_families(tmp_path, rng):
    pts = rng.uniform(-40, 40, size=(10, 3))
    for tx in (sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, 0.2, 0.3, (4.0, 5.0, 6.0)),
               sitk.TranslationTransform(3, (1.0, -2.0, 3.0)),
               sitk.VersorRigid3DTransform((0.0, 0.0, np.sin(0.2), np.cos(0.2))),
               sitk.ScaleTransform(3, (1.1, 0.9, 1.2))):
        ours = from_sitk_transform(tx)
        np.testing.assert_allclose(ours.map_points(pts), _sitk_points(tx, pts), atol=1e-9)
    bs = sitk.BSplineTransformInitializer(sitk.Image([8, 8, 8], sitk.sitkFloat32), [3, 3, 3], 2)  # quadratic: unsupported
    params = np.array(bs.GetParameters())
    bs.SetParameters(tuple(rng.normal(size=params.size)))
    with pytest.raises(ValueError, match="unsupported ITK transform"):
        from_sitk_transform(bs)
    (tmp_path / "junk.tfm").write_text("not a transform")
    with pytest.raises(ValueError, match="not a readable ITK transform"):
        cr.load_transform(tmp_path / "junk.tfm")
    with pytest.raises(FileNotFoundError):
        cr.load_transform(tmp_path / "missing.tfm")


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_field_matches_simpleitk(tmp_path, rng, ndim):
    shape = (12, 13) if ndim == 2 else (9, 10, 11)
    grid = oblique_image(shape, rng)
    field = cr.DisplacementField.from_array(smooth_field(shape, rng, amplitude=3.0), grid)
    path = tmp_path / "field.nii.gz"
    field.save(path)
    sx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    # points inside the grid, near and beyond its border
    idx = rng.uniform(-1.5, np.array(shape) + 0.5, size=(200, ndim))
    pts = grid.index_to_world(idx)
    np.testing.assert_allclose(field.map_points(pts), _sitk_points(sx, pts), atol=1e-6)
    back = cr.load_transform(path)
    assert isinstance(back, cr.DisplacementField)
    np.testing.assert_allclose(back.map_points(pts), field.map_points(pts), atol=1e-6)
    with pytest.raises(ValueError, match="as an image"):
        field.save(tmp_path / "field.tfm")


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_field_inverse_round_trip(rng, ndim):
    shape = (40, 44) if ndim == 2 else (24, 26, 28)
    grid = oblique_image(shape, rng)
    h = np.array(grid.spacing_array_order)
    # smooth field of up to ~2 voxels, diffeomorphic (small gradient)
    u_arr = smooth_field(shape, rng, amplitude=2.0, sigma=5.0) * h  # array frame, mm
    field = cr.DisplacementField.from_array_frame(u_arr, grid)
    inv = field.inverse()
    assert inv.inversion_error["mean_error"] < 0.01
    # check on interior voxel centres, in voxel units
    inner = tuple(slice(4, n - 4) for n in shape)
    pts = grid.grid_points()[inner].reshape(-1, ndim)
    err_mm = field.map_points(inv.map_points(pts)) - pts
    err_vox = np.linalg.norm(grid.world_to_index(pts + err_mm) - grid.world_to_index(pts), axis=1)
    assert err_vox.mean() < 0.01
    assert field.inverse().inverse() is field  # every numerical inverse keeps a reference to its source
    assert inv.inverse() is field  # the inverse remembers its source


def test_chain_with_field_saves_as_h5(tmp_path, rng):
    grid = oblique_image((8, 9, 10), rng)
    field = cr.DisplacementField.from_array(smooth_field((8, 9, 10), rng, amplitude=2.0), grid)
    chain = cr.Chain([field, random_affine(3, rng)])
    with pytest.raises(ValueError, match=r"\.h5"):
        chain.save(tmp_path / "c.tfm")
    chain.save(tmp_path / "c.h5")
    back = cr.load_transform(tmp_path / "c.h5")
    assert isinstance(back, cr.Chain) and isinstance(back.transforms[0], cr.DisplacementField)
    pts = grid.index_to_world(rng.uniform(0, 7, size=(30, 3)))
    np.testing.assert_allclose(back.map_points(pts), chain.map_points(pts), atol=1e-6)
    np.testing.assert_allclose(_sitk_points(sitk.ReadTransform(str(tmp_path / "c.h5")), pts), chain.map_points(pts),
                               atol=1e-6)


def test_field_vectors_frame_conversion(rng):
    grid = oblique_image((4, 5, 6), rng)
    v = rng.normal(size=(4, 5, 6, 3))
    f = cr.DisplacementField.from_array_frame(v, grid)
    np.testing.assert_allclose(f.displacement_array_frame(), v, atol=1e-12)
    # one voxel step along array axis 0 (z index) is spacing_z mm along the image's third direction column
    e = np.zeros((4, 5, 6, 3))
    e[..., 0] = grid.spacing[2]
    w = cr.DisplacementField.from_array_frame(e, grid).displacement[0, 0, 0]
    np.testing.assert_allclose(w, grid.index_to_world([[1, 0, 0]])[0] - grid.index_to_world([[0, 0, 0]])[0], atol=1e-9)


def test_field_argument_errors(rng):
    img = oblique_image((4, 5, 6), rng)
    with pytest.raises(ValueError, match="vector image with 3 components"):
        cr.DisplacementField(img)
    with pytest.raises(TypeError, match="classreg.Image"):
        cr.DisplacementField(np.zeros((4, 5, 6, 3)))
    f = cr.DisplacementField.identity(img)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        f.map_points(np.zeros((4, 2)))


def _ball_field(shape, rng):
    """A smooth float32 field (up to 3 mm) that vanishes outside a central ball, as a registration's field does
    outside the head: compressible, unlike noise."""
    centre = (np.array(shape) - 1) / 2
    r2 = sum(((np.indices(shape)[k] - centre[k]) / (0.35 * shape[k])) ** 2 for k in range(len(shape)))
    return (smooth_field(shape, rng, amplitude=3.0) * (r2 < 1)[..., None]).astype(np.float32)


@pytest.mark.parametrize("ext", [".h5", ".nii.gz"])
def test_saved_3d_field_is_float32_compressed_and_maps_like_itk(tmp_path, rng, ext):
    """Dense fields on disk: float32, compressed, and read back by classreg and SimpleITK mapping points as the
    in-memory transform does (to float32 rounding)."""
    shape = (40, 44, 48)
    grid = oblique_image(shape, rng, dtype=np.float32)
    field = cr.DisplacementField.from_array(_ball_field(shape, rng), grid)
    t = cr.Chain([field, random_affine(3, rng)]) if ext == ".h5" else field
    path = tmp_path / f"t{ext}"
    t.save(path)
    raw32 = field.displacement.size * 4
    if ext == ".h5":
        h5py = pytest.importorskip("h5py")  # without it the writer keeps SimpleITK's float64 file
        with h5py.File(path, "r") as h:
            kinds = {k: h[f"TransformGroup/{k}/TransformType"][0].decode() for k in h["TransformGroup"]}
            (key,) = [k for k, v in kinds.items() if v.startswith("DisplacementFieldTransform_double_3")]
            ds = h[f"TransformGroup/{key}/TransformParameters"]
            assert ds.dtype == np.float32 and ds.shape == (raw32 // 4,)  # (a) float32 on disk
            assert ds.compression == "gzip"
        sx = sitk.ReadTransform(str(path))
    else:
        img = sitk.ReadImage(str(path))
        assert img.GetPixelID() == sitk.sitkVectorFloat32  # (a)
        nib = pytest.importorskip("nibabel")
        assert nib.load(path).get_data_dtype() == np.float32
        sx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    assert path.stat().st_size < 0.4 * raw32  # (b) compressed: well below the raw float32 bytes
    # (c) the same map through classreg and through SimpleITK, points inside, near and beyond the grid
    pts = grid.index_to_world(rng.uniform(-1.5, np.array(shape) + 0.5, size=(300, 3)))
    want = t.map_points(pts)
    np.testing.assert_allclose(cr.load_transform(path).map_points(pts), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_sitk_points(sx, pts), want, rtol=0, atol=1e-5)


def test_field_precision_on_disk(tmp_path, rng, monkeypatch):
    """float64 stays float64 only where the field needs it (or dtype=np.float64 asks); a float32-valued field
    held as float64 (e.g. read back from an .h5) is written as float32; without h5py the .h5 is SimpleITK's own."""
    shape = (9, 10, 11)
    grid = oblique_image(shape, rng)
    u64 = smooth_field(shape, rng, amplitude=2.0)  # float64 values float32 cannot hold
    f64 = cr.DisplacementField.from_array(u64, grid)
    f32held64 = cr.DisplacementField.from_array(u64.astype(np.float32).astype(np.float64), grid)
    pixel = {}
    for name, f, kw in [("f64", f64, {}), ("exact", f32held64, {}), ("forced32", f64, {"dtype": np.float32}),
                        ("forced64", f32held64, {"dtype": np.float64})]:
        f.save(tmp_path / f"{name}.nii.gz", **kw)
        pixel[name] = sitk.ReadImage(str(tmp_path / f"{name}.nii.gz")).GetPixelID()
    assert pixel == {"f64": sitk.sitkVectorFloat64, "exact": sitk.sitkVectorFloat32,
                     "forced32": sitk.sitkVectorFloat32, "forced64": sitk.sitkVectorFloat64}
    pts = grid.index_to_world(rng.uniform(0, 8, size=(50, 3)))
    np.testing.assert_array_equal(cr.load_transform(tmp_path / "f64.nii.gz").displacement, u64)  # lossless
    with pytest.raises(ValueError, match="dtype"):
        f64.save(tmp_path / "bad.nii.gz", dtype=np.int16)
    chain = cr.Chain([f64, random_affine(3, rng)])
    chain.save(tmp_path / "c64.h5")
    np.testing.assert_array_equal(_sitk_points(sitk.ReadTransform(str(tmp_path / "c64.h5")), pts),
                                  _sitk_points(chain.to_sitk(), pts))  # lossless: bit-identical through ITK
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # h5py missing: SimpleITK's float64 file
    chain.save(tmp_path / "plain.h5")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    np.testing.assert_array_equal(_sitk_points(sitk.ReadTransform(str(tmp_path / "plain.h5")), pts),
                                  _sitk_points(chain.to_sitk(), pts))
