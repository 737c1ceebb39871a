"""classreg.options: each solver's options declared once, and the Python signature, the CLI, the validation and
Result.params all agree with that declaration."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import classreg as cr
from classreg import options
from classreg.cli import _cli_value, build_parser, main

SOLVERS = sorted(options.SOLVERS)


def test_every_public_solver_is_declared():
    public = sorted(name[len("register_"):] for name in cr.__all__ if name.startswith("register_"))
    assert SOLVERS == public
    for name in SOLVERS:
        decl, func = options.SOLVERS[name]
        assert getattr(cr, f"register_{name}") is func and func.declaration is decl


@pytest.mark.parametrize("name", SOLVERS)
def test_python_signature_matches_the_declaration(name):
    decl, func = options.SOLVERS[name]
    params = inspect.signature(func).parameters.values()
    kw = [p for p in params if p.kind == p.KEYWORD_ONLY]
    assert [p.name for p in kw] == list(decl.names)
    for p in kw:
        assert decl[p.name].same_default(p.default), p.name
    assert [p.name for p in params if p.kind != p.KEYWORD_ONLY] == list(decl.inputs)


@pytest.mark.parametrize("name", SOLVERS)
def test_cli_offers_every_option_with_the_same_default(name, capsys):
    """Every declared option (except the Python-only callback/progress) is a flag of ``classreg register NAME``
    whose parsed default, converted as the CLI converts it, equals the Python default; its help shows the unit."""
    decl, func = options.SOLVERS[name]
    args = build_parser().parse_args(["register", name, "a", "b", "-o", "out"])
    with pytest.raises(SystemExit):
        main(["register", name, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for o in decl:
        if not o.cli:
            assert o.name in ("progress", "callback"), o.name
            continue
        value = _cli_value(o, getattr(args, o.name))
        if o.kind == "dtype":
            assert np.dtype(value) == np.dtype(o.default)
        else:
            assert o.same_default(value), (o.name, value, o.default)
        assert o.flag in help_text
        if o.unit:
            assert f"[{o.unit}]" in help_text, o.name
        if isinstance(o.default, str):  # the help states that default (a shared text must not override it)
            assert o.describe_default().startswith(o.default), (o.name, o.describe_default())
            assert f"(default: {o.default}" in help_text, o.name


def test_shared_options_mean_the_same_everywhere():
    """A concept that several solvers have is spelt, united and explained the same way in each."""
    seen = {}
    for name in SOLVERS:
        decl, _ = options.SOLVERS[name]
        for o in decl:
            if o.name in options.SHARED:
                base = options.SHARED[o.name]
                assert (o.kind, o.unit) == (base.kind, base.unit), (name, o.name)
                seen.setdefault(o.name, set()).add(name)
    for common in ("seed", "threads", "device", "progress", "callback"):
        assert seen.get(common) == set(SOLVERS), common
    assert {"demons", "lddmm", "rigid"} <= seen.get("dtype", set())  # register_points computes in float64
    for image_option in ("shrink_factors", "smoothing_sigmas", "fixed_mask", "moving_mask"):
        assert {"demons", "lddmm", "rigid"} <= seen.get(image_option, set()), image_option
    assert {"demons", "lddmm"} <= seen.get("iterations", set())


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    a = ndimage.gaussian_filter(rng.random((24, 24)), 2.0).astype(np.float32)
    return cr.Image(a, (1.0, 1.0)), cr.Image(np.roll(a, 1, axis=1), (1.0, 1.0))


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(max_pieces=0), ValueError, ["max_pieces", ">= 1", "0"]),
    (dict(metric="cc"), ValueError, ["metric", "'ssd', 'lncc'", "'cc'"]),
    (dict(velocity_sigma=-1.0), ValueError, ["velocity_sigma", "(mm)"]),
    (dict(max_step=0.0), ValueError, ["max_step", "> 0"]),
    (dict(bch_terms=5), ValueError, ["bch_terms", "2, 3, 4"]),
    (dict(iterations=(5, 2.5, 1)), TypeError, ["iterations", "integers"]),
    (dict(shrink_factors=(4, 0.5)), ValueError, ["shrink_factors", ">= 1"]),
    (dict(symmetric="yes"), TypeError, ["symmetric", "True or False"]),
    (dict(dtype=np.int32), ValueError, ["dtype", "float32 or float64"]),
    (dict(threads=0), ValueError, ["threads", ">= 1"]),
    (dict(device="gpu0"), ValueError, ["device", "'cuda:N'"]),
    (dict(velocity_sigmas=1.0), TypeError, ["velocity_sigmas", "velocity_sigma"]),
])
def test_calls_are_validated_against_the_declaration(pair, kwargs, error, words):
    with pytest.raises(error) as info:
        cr.register_demons(*pair, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_params_record_every_declared_option_and_threads_apply(pair):
    import numba

    before = numba.get_num_threads()
    res = cr.register_demons(*pair, iterations=(2, 2, 2), max_pieces=1, threads=1)
    assert numba.get_num_threads() == before  # restored after the call
    decl = cr.register_demons.declaration
    assert set(decl.names) - {"callback"} <= set(res.params)
    assert res.params["threads"] == 1
    assert res.params["iterations"] == (2, 2, 2)
    assert res.params["velocity_sigma"] == pytest.approx(4.5)  # the resolved default (4.5 × 1 mm), not None
    assert res.params["fixed_mask"] is False and res.params["dtype"] == "float32"


def test_declared_rejects_a_signature_that_drifts():
    decl = options.Declaration("toy", "toy", (options.Option("alpha", 1.0, "a weight"),))

    def good(fixed, moving, *, alpha=1.0):
        return None

    options.declared(decl)(good)
    options.SOLVERS.pop("toy")

    def wrong_default(fixed, moving, *, alpha=2.0):
        return None

    def missing(fixed, moving, *, beta=1.0):
        return None

    for func in (wrong_default, missing):
        with pytest.raises(TypeError, match="alpha"):
            options.declared(decl)(func)
    assert "toy" not in options.SOLVERS


def test_open_bounds_are_enforced():
    """``high_open``: omega must stay below 1 (it is a probability of outliers), 0.999 is accepted by the check."""
    pts = np.random.default_rng(1).random((20, 3))
    with pytest.raises(ValueError, match=r"omega must be >= 0 and < 1, got 1.0"):
        cr.register_points(pts, pts, omega=1.0)
    decl = cr.register_points.declaration
    assert decl["omega"].check(0.999) == 0.999 and decl["truncation"].range_text() == ">= 0 and < 1"
