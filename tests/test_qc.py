"""classreg.qc: the QC figures every solver's command line writes, checked from their pixels.

Each image case has an oblique-free but non-trivial direction matrix (2-D: x flipped; 3-D: a coronal-like
permutation with flips), so a figure that ignored the direction matrix would put the orientation marker — a bright
blob on the patient's left and anterior (2-D) or left and superior (3-D) — on the wrong side.
"""
import json

import numpy as np
import pytest
from phantoms import smooth_image

import classreg as cr
from classreg.qc import (
    jacobian_title,
    log_jacobian,
    orientation_letters,
    qc_figure,
    qc_points,
    read_layout,
    window,
)
from classreg.transforms import rotation_matrix

#: 2-D: index x points to the patient's right (array column 0 is the patient's left), index y posterior
DIR_2D = (-1.0, 0.0, 0.0, 1.0)
#: 3-D: index x -> right, index y -> superior, index z -> anterior (a coronal stack stored as NIfTI often reads so)
DIR_3D = (-1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)


def _phantom(ndim, seed=0):
    """Fixed and moving images (moving: shifted by one voxel, intensities ×200) with a bright marker on the
    patient's left-anterior (2-D) / left-superior (3-D) corner of the body; returns them and the marker (mm)."""
    rng = np.random.default_rng(seed)
    shape, spacing, direction = ((40, 36), (1.0, 1.2), DIR_2D) if ndim == 2 else \
        ((18, 22, 20), (1.0, 1.2, 1.5), DIR_3D)
    body = np.zeros(shape, np.float32)
    inner = tuple(slice(3, s - 3) for s in shape)
    body[inner] = 0.2 + 0.6 * smooth_image(tuple(s - 6 for s in shape), rng)
    img = cr.Image(body, spacing, direction=direction)
    world = img.grid_points()
    # the body voxel furthest to the patient's left and anterior (2-D: +x, -y) or left and superior (3-D: +x, +z)
    score = world[..., 0] - world[..., 1] if ndim == 2 else world[..., 0] + world[..., 2]
    corner = np.unravel_index(np.argmax(np.where(body > 0, score, -np.inf)), shape)
    c = [min(max(int(v), 4), s - 5) for v, s in zip(corner, shape)]  # the 3-voxel marker stays inside the body
    body[tuple(slice(v - 1, v + 2) for v in c)] = 3.0
    fixed = cr.Image(body, spacing, direction=direction)
    moving = fixed.like((200.0 * np.roll(body, 1, axis=-1)).astype(np.float32))
    return fixed, moving, fixed.index_to_world(np.asarray(c, float)[None])[0]


def _grey_view(png, box):
    """The grey pixels (0-255; letters and colour excluded) of one view's pixel box, as a masked array."""
    c0, r0, c1, r1 = box
    sub = (png[r0 + 1:r1 - 1, c0 + 1:c1 - 1, :3] * 255).round().astype(int)  # inside the frame line
    grey = (sub[..., 0] == sub[..., 1]) & (sub[..., 1] == sub[..., 2])
    return np.ma.masked_array(sub[..., 0], mask=~grey)


def _check_image_figure(path, ndim):
    """Pixels of moving and warped not saturated; the marker on the patient's left (screen right) and anterior /
    superior (screen top) in the fixed, moving and warped panels."""
    from matplotlib.image import imread

    png = imread(path)
    layout = read_layout(path)
    views = ["2-D"] if ndim == 2 else ["axial", "coronal", "sagittal"]
    assert layout["kind"] == "image" and list(layout["panels"]["fixed"]) == views
    for panel in ("fixed", "moving", "warped"):
        for view in views:
            g = _grey_view(png, layout["panels"][panel][view])
            white = float(np.mean(g >= 254))
            body = float(np.mean((g > 12) & (g < 243)))
            assert white < 0.05, (panel, view, white)       # before: moving/warped all white (one shared window)
            assert body > 0.25, (panel, view, body)         # the body is shown in mid greys
            rows, cols = np.nonzero(~np.ma.getmaskarray(g) & (g.filled(0) >= 250))
            assert rows.size > 0, (panel, view)
            h, w = g.shape
            letters = layout["letters"][view]
            # the marker is on the patient's left (and anterior in 2-D, superior in 3-D)
            if view in ("2-D", "axial", "coronal"):
                assert letters["right"] == "L" and cols.mean() > 0.5 * w, (panel, view, cols.mean(), w)
            if view == "2-D":
                assert letters["top"] == "A" and rows.mean() < 0.5 * h, (panel, view)
            if view in ("coronal", "sagittal"):
                assert letters["top"] == "S" and rows.mean() < 0.5 * h, (panel, view, rows.mean(), h)
    return layout


SOLVER_FLAGS = {
    "demons": ["--shrink-factors", "2", "1", "--iterations", "5", "3", "--max-pieces", "1"],
    "lddmm": ["--shrink-factors", "1", "--iterations", "3", "--n-steps", "4"],
    "affine": ["--shrink-factors", "2", "1", "--iterations", "15", "15", "--samples", "512"],
    "bspline": ["--shrink-factors", "2", "1", "--iterations", "15", "15", "--samples", "512", "--grid-spacing",
                "8"],
    "rigid": ["--shrink-factors", "2", "1", "--smoothing-sigmas", "1", "0.5", "--samples", "40", "8",
              "--perturbation", "3", "--keep", "2", "--workers", "1", "--max-angle", "15"],
    "vp": ["--shrink-factors", "2", "1", "--iterations", "5", "5"],
    "metamorphosis": ["--shrink-factors", "1", "--iterations", "3", "--n-steps", "4"],
}


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("solver", sorted(SOLVER_FLAGS))
def test_every_solver_cli_writes_a_readable_oriented_qc_png(tmp_path, solver, ndim):
    from classreg.cli import main

    fixed, moving, marker = _phantom(ndim)
    cr.save(fixed, tmp_path / "f.nii.gz")
    cr.save(moving, tmp_path / "m.nii.gz")
    out = tmp_path / "out"
    point = ["--qc-point", *map(str, marker)] if ndim == 3 else []  # the three slices through the marker
    assert main(["register", solver, str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(out), "-q",
                 *SOLVER_FLAGS[solver], *point]) == 0
    layout = _check_image_figure(out / "qc.png", ndim)
    if ndim == 3:
        assert np.allclose(layout["point_mm"], marker)


def test_qc_figure_summary_with_labels_and_a_chosen_point(tmp_path):
    """Dice before/after from label maps, the slice point, and the Result.save switch (off by default)."""
    fixed, moving, marker = _phantom(3, seed=1)
    res = cr.register_affine(fixed, moving, shrink_factors=(2, 1), iterations=(15, 15), samples=512)
    labels = fixed.like((fixed.numpy() > 0.5).astype(np.uint8))
    mlabels = moving.like((moving.numpy() > 100).astype(np.uint8))
    qc_figure(res, moving, tmp_path / "qc.png", fixed=fixed, fixed_labels=labels, moving_labels=mlabels,
              point=marker)
    assert np.allclose(read_layout(tmp_path / "qc.png")["point_mm"], marker)
    res.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "qc.png").exists()
    res.save(tmp_path / "with_qc", qc=True, moving=moving)
    manifest = json.loads((tmp_path / "with_qc" / "result.json").read_text())["files"]
    assert manifest["qc"] == "qc.png" and read_layout(tmp_path / "with_qc" / "qc.png")["kind"] == "image"
    with pytest.raises(ValueError, match="point"):
        qc_figure(res, moving, tmp_path / "bad.png", fixed=fixed, point=(1.0, 2.0))


def test_dice_and_similarity_in_the_summary_text():
    from classreg.qc import _summary

    class R:
        history, timings, stop_reason = [], {"total": 1.5, "kernels": 0.4}, "completed the schedule"
        transform = None

    f = np.arange(24.0).reshape(4, 6)
    text = _summary(R(), f, f[::-1], f, np.ones((4, 6)), fixed=cr.Image(f, (1.0, 1.0)),
                    dice=({1: 0.5, 2: 0.7}, {1: 0.8, 2: 0.9}))
    assert "after   1.000" in text and "Dice (mean of 2 labels)" in text and "0.600" in text and "0.850" in text
    assert "time 1.50 s (kernels 0.4 s)" in text and "affine map" not in text


def test_an_affine_result_far_from_the_fixed_image_keeps_its_grid_in_view(tmp_path):
    """A pure affine result draws its linear part about the fixed centre: with a 300 mm shift the full map's grid
    lay outside every view (an empty panel)."""
    from PIL import Image as PILImage

    fixed = cr.Image(smooth_image((40, 48), np.random.default_rng(0)).astype(np.float32), spacing=1.0)
    centre = fixed.index_to_world(np.array([[19.5, 23.5]]))[0]
    tx = cr.Affine(rotation_matrix([np.deg2rad(15.0)]), translation=[300.0, -200.0], center=centre)
    moving = cr.Image(fixed.data, spacing=1.0, origin=(300.0, -200.0))
    res = cr.Result(transform=tx, reference=fixed, warped=fixed)
    path = qc_figure(res, moving, tmp_path / "qc.png", fixed=fixed)
    (box,) = read_layout(path)["panels"]["grid"].values()  # 2-D: one view
    rgb = np.asarray(PILImage.open(path).convert("RGB"), dtype=int)[box[1]:box[3], box[0]:box[2]]
    cyan = (rgb[..., 2] > 150) & (rgb[..., 1] > 120) & (rgb[..., 0] < 100)
    assert cyan.mean() > 0.02, cyan.mean()  # measured 0.044 (the full map: 0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_an_affine_result_shows_its_rotation_stretches_and_centre_shift(ndim):
    """The summary of an affine result reads its parameters back: the Euler angles of R and the singular values
    of A = R S, and where the map sends the fixed image's centre (mm); a reflection is named, not given angles."""
    from classreg.qc import _summary

    angles = [np.deg2rad(12.5)] if ndim == 2 else np.deg2rad([5.0, -20.0, 33.0])
    stretch = np.array([1.2, 0.9, 1.05][:ndim])
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(ndim, ndim)))  # S = Q diag(stretch) Qᵀ: a stretch along oblique axes
    a = rotation_matrix(angles) @ q @ np.diag(stretch) @ q.T
    fixed = cr.Image(np.zeros((20,) * ndim), spacing=(2.0,) * ndim, origin=(-5.0,) * ndim)
    centre = fixed.index_to_world(np.full((1, ndim), 9.5))[0]
    tx = cr.Affine(a, translation=[3.0, -4.0, 7.0][:ndim], center=centre)

    class R:
        history, timings, stop_reason, transform = [], {}, "completed the schedule", tx

    f = np.zeros((20,) * ndim)
    text = _summary(R(), f, f, f, np.ones(f.shape), fixed=fixed)
    want = ("rotation 12.50°" if ndim == 2 else "rotation x 5.00° y -20.00° z 33.00°")
    assert want in text, text
    assert "stretches " + " ".join(f"{v:.4f}" for v in sorted(stretch, reverse=True)) in text
    assert "centre shift (" + ", ".join(f"{v:.2f}" for v in [3.0, -4.0, 7.0][:ndim]) + ") mm" in text

    R.transform = cr.Affine(np.diag([-1.0] + [1.0] * (ndim - 1)))
    text = _summary(R(), f, f, f, np.ones(f.shape), fixed=fixed)
    assert "with a reflection" in text and "rotation" not in text


def test_orientation_letters_follow_the_direction_matrix():
    assert orientation_letters(np.eye(3)) == "LPS"
    assert orientation_letters(np.diag([-1.0, -1.0, 1.0])) == "RAS"
    assert orientation_letters(np.asarray(DIR_3D).reshape(3, 3)) == "RSA"
    assert orientation_letters(np.diag([-1.0, 1.0])) == "RP"
    a = np.deg2rad(20.0)                                      # 20° oblique: the nearest axes
    assert orientation_letters(np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])) == "LP"


def test_canonical_views_put_each_axis_where_viewers_do():
    """A voxel on the patient's left-posterior-superior appears at screen right (axial, coronal), bottom (axial:
    posterior), top (coronal, sagittal) and right (sagittal: posterior) — for any storage order."""
    from classreg.qc import _Layout

    for direction in (np.eye(3).ravel(), DIR_3D, np.diag([-1.0, -1.0, 1.0]).ravel()):
        img = cr.Image(np.zeros((10, 12, 14), np.float32), (1.0, 2.0, 3.0), direction=tuple(direction))
        pts = img.grid_points()
        lps = np.unravel_index(np.argmax(pts.sum(-1)), img.shape)  # max x + y + z: left, posterior, superior
        a = np.zeros(img.shape)
        a[lps] = 1.0
        lay = _Layout(img, point=pts[lps])
        axial, coronal, sagittal = lay.slices(a)
        for view, (row_end, col_end) in zip((axial, coronal, sagittal), ((-1, -1), (0, -1), (0, -1))):
            r, c = np.argwhere(view == 1.0)[0]
            assert (r, c) == (row_end % view.shape[0], col_end % view.shape[1])
        # physical proportions: each view spans its two physical axes' extents in mm
        dm = img.direction_matrix
        ext = {int(np.argmax(np.abs(dm[:, k]))): img.size[k] * img.spacing[k] for k in range(3)}
        assert lay.sizes == [(ext[0], ext[1]), (ext[0], ext[2]), (ext[1], ext[2])]


def test_points_figure_three_projections_and_orientation(tmp_path):
    """A target cloud on the patient's left and superior (one anchor point far right-inferior sets the limits):
    the drawn points sit on the right (axial, coronal) and at the top (coronal, sagittal) of every view; the CLI
    writes it as qc.png."""
    from matplotlib.image import imread

    from classreg.cli import main

    rng = np.random.default_rng(3)
    cloud = rng.uniform([5, -20, 5], [40, 20, 40], size=(150, 3))
    target = np.vstack([cloud, [[-40.0, 0.0, -40.0]]])
    source = target + [2.0, -1.0, 1.5] + 0.5 * np.sin(target / 10.0)
    np.savetxt(tmp_path / "s.txt", source)
    np.savetxt(tmp_path / "t.txt", target)
    out = tmp_path / "out"
    assert main(["register", "points", str(tmp_path / "s.txt"), str(tmp_path / "t.txt"), "-o", str(out), "-q",
                 "--max-iter", "30", "--min-iter", "5"]) == 0
    layout = read_layout(out / "qc.png")
    assert layout["kind"] == "points" and set(layout["panels"]) == {"before", "after"}
    png = (imread(out / "qc.png")[..., :3] * 255).round().astype(int)
    for row in ("before", "after"):
        for view in ("axial", "coronal", "sagittal"):
            c0, r0, c1, r1 = layout["panels"][row][view]
            sub = png[r0 + 2:r1 - 2, c0 + 2:c1 - 2]
            drawn = (sub.max(-1) - sub.min(-1) > 40) | (sub.max(-1) < 200)  # coloured or grey-dark: a point
            drawn[:, :12] = drawn[:, -12:] = drawn[:12] = drawn[-12:] = False  # the letters
            rows, cols = np.nonzero(drawn)
            h, w = drawn.shape
            if view != "sagittal":
                assert cols.mean() > 0.5 * w, (row, view)
            if view != "axial":
                assert rows.mean() < 0.5 * h, (row, view)
    # 2-D: one view per row
    res = cr.register_points(source[:, :2], target[:, :2], max_iter=10, min_iter=2)
    assert list(read_layout(qc_points(res, source[:, :2], target[:, :2], tmp_path / "p2.png"))
                ["panels"]["after"]) == ["2-D"]


def test_each_image_gets_its_own_window():
    """The measured failure: fixed in 0-1, moving in 0-226; the fixed image's window made the moving panel a white
    silhouette (every tissue pixel clipped at 1)."""
    rng = np.random.default_rng(0)
    body = np.zeros((64, 64))
    body[8:56, 8:56] = 0.2 + smooth_image((48, 48), rng) * 0.6 / 1.0
    fixed, moving = body / body.max(), body * 226.0 / body.max()
    old = np.clip((moving - np.percentile(fixed, 1)) / (np.percentile(fixed, 99) - np.percentile(fixed, 1)), 0, 1)
    assert np.mean(old[8:56, 8:56] >= 1.0) > 0.95                       # the old display: saturated
    for img in (fixed, moving):
        w = window(img)
        tissue = w[8:56, 8:56]
        assert np.mean(tissue >= 1.0) < 0.02 and np.mean(tissue <= 0.0) < 0.02
        assert 0.2 < np.median(tissue) < 0.8
    assert np.all(window(np.zeros((5, 5))) == 0) and np.all(np.isfinite(window(np.full((5, 5), 7.0))))


def test_log_jacobian_and_title_show_compression_and_folds():
    det = np.array([[1.0, 0.5, 2.0], [0.05, 0.0, -0.2]])
    logdet, lim = log_jacobian(det)
    assert np.all(np.isfinite(logdet)) and lim >= np.log(2.0)
    assert logdet[0, 0] == 0.0 and logdet[1, 1] < logdet[1, 0] < logdet[0, 1] < 0
    title = jacobian_title(det)
    assert "min -0.2" in title and "max 2" in title and "33.3 % ≤ 0" in title and "50 % < 0.1" in title


def test_colour_inputs_fail_naming_the_fix_and_register_with_channel(tmp_path, capsys):
    """A first-time user's colour PNG: the command line says what to do (--channel, or convert), and does it."""
    import SimpleITK as sitk

    from classreg.cli import main

    rng = np.random.default_rng(4)
    grey = (255 * smooth_image((32, 32), rng)).astype(np.uint8)
    colour = np.stack([grey, grey[::-1], grey[:, ::-1]], axis=-1)
    for name, rgb in (("a.png", colour), ("b.png", np.roll(colour, 1, axis=1))):
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / name))
    args = ["register", "affine", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-q", "--no-qc",
            "--iterations", "5", "5", "--shrink-factors", "2", "1"]
    assert main([*args, "-o", str(tmp_path / "o1")]) == 1
    err = capsys.readouterr().err
    assert "a colour image" in err and "--channel 0, 1 or 2" in err and "convert the file to grey" in err
    assert main([*args, "-o", str(tmp_path / "o2"), "--channel", "1"]) == 0
    with pytest.raises(ValueError, match="--channel 0, 1 or 2 on the command line"):
        cr.load(tmp_path / "a.png")


def test_itk_rgb_stored_example_pngs_register_through_the_api():
    from classreg import data

    try:
        t1 = cr.load(data.itk_example("BrainT1SliceBorder20.png"))
        pd = cr.load(data.itk_example("BrainProtonDensitySliceBorder20.png"))
    except data.DataNotFoundError as exc:
        pytest.skip(str(exc))
    assert not t1.is_vector and not pd.is_vector and t1.ndim == 2
    res = cr.register_affine(t1, pd, iterations=(5, 5), shrink_factors=(2, 1))
    assert res.warped.shape == t1.shape
