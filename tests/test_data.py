"""The real data that installs offline is found where classreg.data looks for it.

Off CI every real-data test skips cleanly without the data; CI (``.ci/run``) installs it and sets
``CLASSREG_REQUIRE_DATA=1``, so that a missing file fails here instead of turning every real-data test into a skip.
"""
import os

import numpy as np
import pytest

from classreg import data

REQUIRED = os.environ.get("CLASSREG_REQUIRE_DATA") == "1"

FILES = [
    ("itk", lambda: data.itk_example("BrainT1SliceBorder20.png")),
    ("itk", lambda: data.itk_example("BrainProtonDensitySliceBorder20.png")),
    ("itk", lambda: data.itk_example("RatLungSlice1.mha")),
    ("itk", lambda: data.itk_example("KmeansTest_T1UCharRaw.nii.gz")),
    ("nilearn", lambda: data.mni152_file("t1")),
    ("nilearn", lambda: data.mni152_file("gm")),
    ("dipy", lambda: data.dipy_file("t1_coronal_slice.npy")),
    ("dipy", lambda: data.dipy_file("circle.npy")),
]


@pytest.mark.parametrize("source, locate", FILES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(FILES)])
def test_real_data_is_found(source, locate):
    try:
        path = locate()
    except data.DataNotFoundError as exc:
        if REQUIRED:
            pytest.fail(f"CI requires the real data but it is missing: {exc}")
        pytest.skip(str(exc))
    assert path.is_file() and path.stat().st_size > 0


def test_fsaverage5_surfaces_ship_with_nilearn():
    try:
        from nilearn import datasets
    except ImportError:
        if REQUIRED:
            pytest.fail("CI requires nilearn (fsaverage5 surfaces) but it is not installed")
        pytest.skip("nilearn not installed")
    fs = datasets.fetch_surf_fsaverage("fsaverage5")
    from nilearn import surface

    coords = surface.load_surf_mesh(fs["pial_left"])[0]
    assert np.asarray(coords).shape == (10242, 3)


@pytest.mark.parametrize("tool", ["elastix", "transformix"])
def test_real_elastix_is_installed(tool):
    """Debian's elastix 5.0.1: the real tools the drop-in's interoperability tests compare against."""
    import shutil
    import subprocess

    path = shutil.which(tool)
    if path is None:
        if REQUIRED:
            pytest.fail(f"CI requires Debian's elastix package ({tool}) but it is not installed")
        pytest.skip(f"{tool} not installed (apt-get install elastix)")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"{tool} version:" in out.stdout
