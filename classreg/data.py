"""Locate the real data that ships inside installed packages (nothing is downloaded).

* ITK's example images from Debian's ``insighttoolkit5-examples`` (``apt-get install insighttoolkit5-examples``):
  2-D T1/PD brain slices, rat lung slices, the 3-D T1 subject ``KmeansTest_T1UCharRaw.nii.gz`` and its masks.
* nilearn's MNI152 2009a template (T1, GM and WM probability maps; ``pip install nilearn``) and fsaverage5 surfaces.
* dipy's sample files (``t1_coronal_slice.npy``, ``circle.npy``, ``C.npy``; ``pip install dipy``).

Each function returns a path (or data) or raises :class:`DataNotFoundError` (a ``FileNotFoundError``) saying what to
install. Tests use it to skip cleanly when optional data is missing.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["DataNotFoundError", "itk_example", "itk_example_image", "mni152_file", "dipy_file"]

ITK_EXAMPLES_DIRS = (
    Path(os.environ.get("CLASSREG_ITK_EXAMPLES", "/nonexistent")),
    Path("/usr/share/doc/insighttoolkit5-examples/examples/Data"),
    Path("/usr/share/doc/insighttoolkit4-examples/examples/Data"),
)


class DataNotFoundError(FileNotFoundError):
    """Optional data is not installed; the message says how to install it."""


def itk_example(name: str) -> Path:
    """Path of a file in ITK's examples/Data folder (Debian package ``insighttoolkit5-examples``)."""
    for d in ITK_EXAMPLES_DIRS:
        p = d / name
        if p.is_file():
            return p
    raise DataNotFoundError(
        f"ITK example file {name!r} not found; install Debian's insighttoolkit5-examples "
        "(apt-get install insighttoolkit5-examples) or set CLASSREG_ITK_EXAMPLES to its examples/Data folder"
    )


def itk_example_image(name: str, dtype=None):
    """An ITK example image as an :class:`~classreg.Image`; grey-level PNGs stored as RGB (e.g.
    ``BrainT1SliceBorder20.png``, whose three channels are equal) become scalar images."""
    import numpy as np

    from .image import Image
    from .io import load

    img = load(itk_example(name), dtype=dtype)
    if img.is_vector:
        d = img.numpy()
        if not all(np.array_equal(d[..., 0], d[..., k]) for k in range(1, d.shape[-1])):
            raise ValueError(f"{name} is a colour image; pick a channel from classreg.load() instead")
        img = Image(np.ascontiguousarray(d[..., 0]), img.spacing, img.origin, img.direction)
    return img


_MNI = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def mni152_file(kind: str = "t1") -> Path:
    """Path of nilearn's shipped 1 mm MNI152 2009a template file: ``kind`` in {"t1", "gm", "wm"}."""
    if kind not in _MNI:
        raise ValueError(f"kind must be one of {sorted(_MNI)}, got {kind!r}")
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("nilearn is not installed (pip install nilearn); it ships the MNI152 template")
    p = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / _MNI[kind]
    if not p.is_file():
        raise DataNotFoundError(f"{p} is missing from the nilearn installation")
    return p


def dipy_file(name: str) -> Path:
    """Path of a file shipped in ``dipy/data/files`` (e.g. ``t1_coronal_slice.npy``, ``circle.npy``, ``C.npy``)."""
    spec = importlib.util.find_spec("dipy")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("dipy is not installed (pip install dipy); it ships the sample slices")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "files" / name
    if not p.is_file():
        raise DataNotFoundError(f"{p} is missing from the dipy installation")
    return p


def mni152(kind: str = "t1", *, resolution: float = 2.0):
    """nilearn's MNI152 2009a template as an :class:`~classreg.Image` (float32), at ``resolution`` mm.

    The shipped 1 mm file is read with SimpleITK (LPS geometry) and, for ``resolution`` > 1, smoothed with σ =
    resolution/2 mm and shrunk by the pyramid's downsampling (ITK shrink grid).
    """
    import numpy as np

    from .io import load
    from .pyramid import downsample

    img = load(mni152_file(kind), dtype=np.float32)
    if resolution <= 1.0:
        return img
    return downsample(img, float(resolution), 0.5 * float(resolution))


def brain_pair_3d(*, resolution: float = 2.0) -> dict:
    """The real 3-D inter-subject pair that installs offline.

    fixed: nilearn's MNI152 2009a T1 template at ``resolution`` mm, tissue labels 1/2/3 = CSF/GM/WM from
    argmax(1 − gm − wm, gm, wm) inside the template's brain (T1 > 0). moving: the real T1 subject of ITK's examples
    (``KmeansTest_T1UCharRaw.nii.gz``, 2 × 2 × 3 mm) skull-stripped with its shipped mask
    (``KmeansTest_T1RawSkullStrip``), labels from the shipped preliminary k-means segmentation (4/5/6 →
    CSF/GM/WM = 1/2/3; noisy). Returns a dict with ``fixed``, ``moving``, ``fixed_labels``, ``moving_labels``,
    ``fixed_mask``, ``moving_mask`` (Images) and ``provenance`` (text).
    """
    import numpy as np

    from .io import load

    fixed = mni152("t1", resolution=resolution)
    gm = mni152("gm", resolution=resolution).data / 255.0  # the shipped probability maps are stored as 0-255
    wm = mni152("wm", resolution=resolution).data / 255.0
    brain = fixed.data > 0.02 * float(fixed.data.max())
    lab = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.uint8) + 1
    fixed_labels = fixed.like(np.where(brain, lab, 0).astype(np.uint8))
    t1 = load(itk_example("KmeansTest_T1UCharRaw.nii.gz"), dtype=np.float32)
    strip = load(itk_example("KmeansTest_T1RawSkullStrip.nii.gz")).data > 0
    seg = load(itk_example("KmeansTest_T1KmeansPrelimSegmentation.nii.gz")).data
    moving = t1.like(np.where(strip, t1.data, 0.0).astype(np.float32))
    mlab = np.zeros(seg.shape, np.uint8)
    for src, dst in ((4, 1), (5, 2), (6, 3)):
        mlab[(seg == src) & strip] = dst
    return {
        "fixed": fixed,
        "moving": moving,
        "fixed_labels": fixed_labels,
        "moving_labels": t1.like(mlab),
        "fixed_mask": fixed.like(brain.astype(np.uint8)),
        "moving_mask": t1.like(strip.astype(np.uint8)),
        "provenance": (
            f"fixed: nilearn {mni152_file('t1').name} (MNI152 2009a, shipped in the nilearn package), {resolution} mm; "
            f"moving: ITK examples (Debian insighttoolkit5-examples) {itk_example('KmeansTest_T1UCharRaw.nii.gz')} "
            "skull-stripped with KmeansTest_T1RawSkullStrip.nii.gz; labels CSF/GM/WM from nilearn GM/WM maps and "
            "KmeansTest_T1KmeansPrelimSegmentation.nii.gz (4/5/6)"
        ),
    }
