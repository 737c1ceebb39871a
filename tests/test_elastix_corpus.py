"""elastix's own parameter files (tests/data/elastix/parameters, Apache-2.0) run end to end through classreg-elastix.

Every registration file of the corpus either runs — on ITK's real 2-D brain slices or, for the 3-D files, on the
MNI152 template and ITK's real T1 subject, both reduced to 6 mm so the test stays short — or stops with exit code 1
naming a component classreg does not implement yet. Iterations are capped at 15 per level (the files' own values are
for real runs; the point here is that every component and setting of the file is read and runs).
"""
import io
from pathlib import Path

import numpy as np
import pytest

import classreg as cr
from classreg import data
from classreg.elastix.components import KNOWN_ELSEWHERE, ComponentError, plan_stage
from classreg.elastix.parameters import (
    ParameterFileError,
    format_parameter_map,
    read_parameter_file,
)
from classreg.elastix.registration import main
from classreg.elastix.transform_files import (
    affine_stage_map,
    geometry_map,
    read_transform_file,
    resample_map,
    write_transform_file,
)

CORPUS = Path(__file__).parent / "data" / "elastix" / "parameters" / "elastix"


def _registration_file(path) -> bool:
    """A parameter file that configures a registration (not a transform file, not a non-parameter .txt)."""
    try:
        pm = read_parameter_file(path)
    except ParameterFileError:
        return False
    return "Transform" in pm and "TransformParameters" not in pm


FILES = sorted(p for p in CORPUS.rglob("*.txt") if _registration_file(p)) if CORPUS.is_dir() else []
UNSUPPORTED = {n for names in KNOWN_ELSEWHERE.values() for n in names}


def _pairs(tmp_path_factory):
    """(fixed, moving) files per dimension: real data, reduced to a small grid."""
    out = {}
    tmp = tmp_path_factory.mktemp("corpus-images")
    try:
        f2 = cr.load(data.itk_example("BrainT1SliceBorder20.png"), dtype=np.float32)
        m2 = cr.load(data.itk_example("BrainProtonDensitySliceBorder20.png"), dtype=np.float32)
        out[2] = (f2, m2)
    except data.DataNotFoundError:
        pass
    try:
        f3 = cr.load(data.mni152_file("t1"), dtype=np.float32)
        m3 = cr.load(data.itk_example("KmeansTest_T1UCharRaw.nii.gz"), dtype=np.float32)
        out[3] = tuple(_coarse(im, 6.0) for im in (f3, m3))
    except data.DataNotFoundError:
        pass
    paths = {}
    for n, (f, m) in out.items():
        paths[n] = (tmp / f"fixed{n}.nii.gz", tmp / f"moving{n}.nii.gz", tmp / f"t0_{n}.txt")
        cr.save(f, paths[n][0])
        cr.save(m, paths[n][1])
        # -t0: the translation between the images' centres (the subject and the template do not overlap in
        # physical space otherwise; the B-spline files have no initialisation of their own)
        shift = _centre(m) - _centre(f)
        write_transform_file({**affine_stage_map("translation", shift), **geometry_map(f), **resample_map()},
                             paths[n][2])
    return paths


def _centre(image):
    corner = np.asarray(image.shape[::-1], float) - 1.0
    return 0.5 * (image.index_to_world(np.zeros((1, image.ndim)))[0]
                  + image.index_to_world(corner[::-1][None])[0])


def _coarse(image, spacing):
    shape = tuple(max(int(round(s * h / spacing)), 8) for s, h in zip(image.shape, image.spacing[::-1]))
    ref = cr.Image(np.zeros(shape, np.float32), spacing=(spacing,) * image.ndim, origin=image.origin,
                   direction=image.direction)
    from scipy import ndimage

    smooth = cr.Image(ndimage.gaussian_filter(image.numpy(), 0.5 * spacing / np.asarray(image.spacing[::-1])),
                      spacing=image.spacing, origin=image.origin, direction=image.direction)
    return cr.resample(smooth, reference=ref)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return _pairs(tmp_path_factory)


def test_the_corpus_is_there():
    assert len(FILES) >= 30


def _params():
    """One default-run file per (dimension, metric, transform, optimiser) of elastix's naming
    (``parameters.3D.NC.bspline.ASGD.001.txt``); its numbered variants run with ``-m slow``."""
    seen, out = set(), []
    for p in FILES:
        parts = p.name.split(".")
        key = tuple(parts[1:5]) if p.name.startswith("parameters.") and len(parts) > 5 else p.name
        out.append(pytest.param(p, id=str(p.relative_to(CORPUS)), marks=[pytest.mark.slow] if key in seen else []))
        seen.add(key)
    return out


@pytest.mark.parametrize("path", _params())
def test_file_runs_end_to_end_or_names_what_is_missing(path, pairs, tmp_path):
    pm = read_parameter_file(path)
    ndim = 3 if ".3D." in path.name or pm.get("FixedImageDimension", ("2",))[0] == "3" else 2
    try:
        plan_stage(pm, ndim=ndim, spacing=(1.0,) * ndim, has_fixed_mask=False, has_initial=False)
    except ComponentError as exc:
        assert any(f'"{name}"' in str(exc) for name in UNSUPPORTED) or "at least one image metric" in str(exc), exc
        return
    except ParameterFileError as exc:                      # e.g. RandomSparseMask needs a mask
        assert "mask" in str(exc), exc
        return
    if ndim not in pairs:
        pytest.skip(f"no real {ndim}-D pair installed")
    capped = dict(pm, MaximumNumberOfIterations=("15",))
    pfile = tmp_path / "params.txt"
    pfile.write_text(format_parameter_map(capped))
    out = tmp_path / "out"
    out.mkdir()
    fixed, moving, t0 = pairs[ndim]
    err = io.StringIO()
    code = main(["-f", str(fixed), "-m", str(moving), "-p", str(pfile), "-out", str(out), "-threads", "2",
                 "-t0", str(t0)], stdout=io.StringIO(), stderr=err)
    assert code == 0, err.getvalue()
    tf = read_transform_file(out / "TransformParameters.0.txt")
    assert tf.chain == [t0, out / "TransformParameters.0.txt"]
    assert tf.parameters["Transform"] == pm["Transform"] or (
        pm["Transform"] == ("RecursiveBSplineTransform",) and tf.parameters["Transform"] == ("BSplineTransform",))
    assert np.all(np.isfinite(tf.transform.map_points(np.zeros((1, ndim)))))
    log = (out / "elastix.log").read_text()
    assert "Total time elapsed" in log
