import numpy as np
import pytest

import classreg as cr
from classreg import terms
from classreg.kernels import _backend
from classreg.progress import Progress
from classreg.pyramid import default_sigmas, downsample, level_geometry, multiresolution, transfer_state
from phantoms import oblique_image, smooth_image


def test_level_geometry_follows_itk_shrink_and_physical_factors(rng):
    img = cr.Image(np.zeros((30, 64, 64)), spacing=(1.0, 1.0, 3.0), origin=(5.0, -2.0, 7.0))
    f, spacing, origin, shape = level_geometry(img, 4)
    assert tuple(f) == (4, 4, 1)  # 4 mm target: the 3 mm axis is already close (round(4/3) = 1)
    assert shape == (30, 16, 16)
    np.testing.assert_allclose(spacing, (4.0, 4.0, 3.0))
    np.testing.assert_allclose(origin, (5.0 + 1.5, -2.0 + 1.5, 7.0))  # centre of the first 4x4 block
    assert default_sigmas((4, 2, 1), img.spacing) == (2.0, 1.0, 0.0)


def test_downsample_preserves_physical_position(rng):
    img = oblique_image((32, 36, 40), rng)
    coarse = downsample(img, 2, 0.0)
    f = level_geometry(img, 2)[0]  # per-axis factors (x first); spacings differ per axis here
    assert f.max() > 1
    # the first coarse voxel centre sits in the middle of its block of fine voxels
    first_block = np.array([np.zeros(3), (f - 1)[::-1]], dtype=float)
    np.testing.assert_allclose(coarse.index_to_world([[0, 0, 0]])[0], img.index_to_world(first_block).mean(axis=0),
                               atol=1e-9)
    # a linear intensity ramp in world coordinates is reproduced exactly by linear resampling
    g = img.grid_points()
    ramp = img.like(g @ np.array([0.3, -0.2, 0.1]))
    c = downsample(ramp, 2, 0.0)
    inner = (slice(0, -1),) * 3
    np.testing.assert_allclose(c.data[inner], (c.grid_points() @ np.array([0.3, -0.2, 0.1]))[inner], atol=1e-9)


def test_transfer_state_interpolates_fields_in_mm(rng):
    fine = oblique_image((20, 22, 24), rng)
    coarse = downsample(fine, 2, 0.0)
    a = np.array([[0.01, 0.02, -0.01], [0.0, 0.03, 0.01], [-0.02, 0.0, 0.02]])
    field = coarse.grid_points() @ a.T  # a linear vector field: interpolation is exact
    state = {"v": field, "scalar": 3.0, "other": np.zeros(5)}
    out = transfer_state(state, coarse, fine)
    inner = tuple(slice(1, -2) for _ in range(3))
    np.testing.assert_allclose(out["v"][inner], (fine.grid_points() @ a.T)[inner], atol=1e-9)
    assert out["scalar"] == 3.0 and out["other"] is state["other"]


def _translation_step(level, state, progress):
    """Toy solver: gradient descent on a translation with SSD, on the level images."""
    t = state.setdefault("t", np.zeros(level.fixed.ndim))
    fixed = level.fixed
    for it in range(level.iterations):
        warped = cr.resample(level.moving, cr.Affine.from_translation(t), reference=fixed)
        value, grad = terms.ssd(fixed.data, warped.data, mask=level.fixed_mask, gradient=True)
        g_arr = np.stack(np.gradient(warped.data, *fixed.spacing_array_order), axis=-1)
        g_world = (g_arr[..., ::-1] @ fixed.direction_matrix.T)  # array-axis gradient -> world vector
        d = (grad[..., None] * g_world).reshape(-1, fixed.ndim).sum(axis=0) * grad.size
        t = t - 2.0 * d / max(np.abs(d).max(), 1e-12) * min(1.0, 0.5 ** (it / 10)) * level.shrink
        state["t"] = t
        progress.emit("iteration", level=level.index, iteration=it, metric=value)


def test_toy_solver_recovers_translation_through_the_driver(rng):
    data = smooth_image((48, 52), rng, sigma=4.0)
    fixed = cr.Image(data, (1.0, 1.2), origin=(3.0, -4.0))
    shift = np.array([3.7, -2.4])
    moving = cr.resample(fixed, cr.Affine.from_translation(-shift), reference=fixed, interpolation="bspline")
    events = []
    interior = np.zeros(fixed.shape, bool)
    interior[8:-8, 8:-8] = True  # keep the zero-filled border band out of the metric
    state, stopped = multiresolution(fixed, moving, _translation_step, shrink_factors=(4, 2, 1),
                                     iterations=(30, 20, 20), fixed_mask=interior,
                                     progress=Progress("toy", callback=events.append))
    assert not stopped
    np.testing.assert_allclose(state["t"], shift, atol=0.3)
    stages = [(e.stage, e.level) for e in events if e.stage != "iteration"]
    assert stages == [("level_start", 0), ("level_end", 0), ("level_start", 1), ("level_end", 1),
                      ("level_start", 2), ("level_end", 2)]
    assert events[0].extra["shape"] == (16, 13)  # 4 mm target: y (1.2 mm) shrinks by 3, x (1 mm) by 4


def test_masks_are_carried_down_and_callback_stops(rng):
    fixed = oblique_image((24, 26, 28), rng)
    mask = np.zeros(fixed.shape, bool)
    mask[10:12, 10:12, 10:12] = True  # tiny mask: must not vanish at coarse levels
    seen = []

    def step(level, state, progress):
        seen.append((level.fixed_mask.shape, int(level.fixed_mask.sum()), level.moving_mask))
        state["n"] = state.get("n", 0) + 1
        progress.emit("iteration", level=level.index, iteration=0)

    def stop_at_second_level(ev):
        if ev.stage == "level_start" and ev.level == 1:
            raise cr.StopRegistration

    state, stopped = multiresolution(fixed, fixed, step, shrink_factors=(4, 1), iterations=1, fixed_mask=mask,
                                     progress=Progress("t", callback=stop_at_second_level))
    assert stopped and state["n"] == 1
    assert seen[0][1] >= 1 and seen[0][2] is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(shrink_factors=(2, 4)), "must not increase"),
    (dict(shrink_factors=(0.5,)), ">= 1"),
    (dict(shrink_factors=(4, 2), smoothing_sigmas=(1.0,)), "smoothing_sigmas"),
    (dict(shrink_factors=(4, 2), iterations=(1, 2, 3)), "iterations"),
    (dict(fixed_mask=np.zeros((8, 9))), "fixed_mask is empty"),
])
def test_schedule_errors(rng, kwargs, match):
    img = oblique_image((8, 9), rng)
    with pytest.raises(ValueError, match=match):
        multiresolution(img, img, lambda *a: None, **kwargs)
    with pytest.raises(ValueError, match="dimension mismatch"):
        multiresolution(img, oblique_image((4, 5, 6), rng), lambda *a: None)


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="needs numba")
def test_small_levels_run_on_one_thread_with_the_same_result(monkeypatch):
    """The driver runs levels below ``SERIAL_BELOW`` voxels with one numba thread (faster there), restores the
    thread count afterwards, and the registration does not depend on it (bitwise)."""
    import numba

    seen = []
    rng = np.random.default_rng(3)
    fixed = cr.Image(smooth_image((40, 44), rng, sigma=3.0, dtype=np.float32), (1.0, 1.0))
    moving = fixed.like(np.roll(fixed.data, 2, axis=0))

    def step(level, state, progress):
        seen.append((level.fixed.size, numba.get_num_threads()))

    before = numba.get_num_threads()
    multiresolution(fixed, moving, step, shrink_factors=(2, 1), iterations=1)
    assert numba.get_num_threads() == before
    assert all(nt == 1 for _, nt in seen)  # 40 x 44 is far below the default threshold
    results = []
    for threshold in (0, 1 << 30):  # never / always one thread
        monkeypatch.setattr(_backend, "SERIAL_BELOW", threshold)
        seen.clear()
        multiresolution(fixed, moving, step, shrink_factors=(2, 1), iterations=1)
        assert all(nt == (1 if threshold else before) for _, nt in seen)
        res = cr.register_demons(fixed, moving, iterations=(5, 5), shrink_factors=(2, 1), max_pieces=2)
        results.append(np.asarray(res.transform.image.data))
    np.testing.assert_array_equal(results[0], results[1])
