"""classreg.qc: panels windowed per image, log det J with the plausibility figures in its title."""
import numpy as np
import pytest
from phantoms import smooth_image

import classreg as cr
from classreg.qc import jacobian_title, log_jacobian, qc_figure, window


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


@pytest.mark.parametrize("solver", ["demons", "affine", "lddmm"])
def test_figure_is_written_for_image_solvers(tmp_path, solver):
    rng = np.random.default_rng(1)
    f = cr.Image(smooth_image((48, 40), rng).astype(np.float32), spacing=1.0)
    m = cr.Image((200.0 * np.roll(f.numpy(), 2, axis=0)).astype(np.float32), spacing=1.0)
    res = getattr(cr, f"register_{solver}")(f, m)
    path = qc_figure(res, m, tmp_path / "qc.png", fixed=f, title=solver)
    from matplotlib.image import imread

    png = imread(path)
    assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 400


def test_3d_figure_shows_three_orthogonal_slices(tmp_path):
    from classreg.qc import _views

    a = np.zeros((6, 8, 10))
    a[5, :, :] = 1.0                                          # the last slice along the first axis ("superior")
    montage = _views(a, 3)
    assert montage.shape == (8, 10 + 2 + 10 + 2 + 8)           # axial 8x10 | coronal 6x10 | sagittal 6x8, padded
    coronal = montage[:, 12:22]
    assert coronal[1].max() == 1.0 and coronal[-1].max() == 0.0   # superior at the top (rows padded by 1)
    rng = np.random.default_rng(2)
    f = cr.Image(smooth_image((20, 24, 22), rng).astype(np.float32), spacing=(1.0, 1.0, 2.0))
    m = cr.Image(np.roll(f.numpy(), 1, axis=2), spacing=(1.0, 1.0, 2.0))
    res = cr.register_demons(f, m, iterations=(3, 2), shrink_factors=(2, 1))
    assert qc_figure(res, m, tmp_path / "qc3d.png", fixed=f).stat().st_size > 10_000
