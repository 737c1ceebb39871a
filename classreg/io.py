"""Reading and writing images through SimpleITK, so a file means the same as in ITK, ANTs and elastix.

NIfTI is read by SimpleITK (RAS on disk → LPS in memory, qform/sform handled by ITK), so ``classreg.load(path)``
gives exactly the geometry ``SimpleITK.ReadImage(path)`` gives.  Every write goes to a temporary name in the target
folder and is renamed into place, so an interrupted run never leaves a truncated file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .image import Image

__all__ = ["load", "save", "load_points", "save_points", "IMAGE_EXTENSIONS", "atomic_output", "image_extension"]

#: File extensions read and written (PNG for 2-D 8/16-bit images only).
IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".png")


class ImageFileNotFoundError(FileNotFoundError, ValueError):
    """A path given to classreg does not exist (both a ``FileNotFoundError`` and a ``ValueError``)."""


def image_extension(path) -> str:
    """The image extension of ``path`` (``.nii.gz`` counts as one), lower case; raises for unknown ones."""
    name = Path(path).name.lower()
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    raise ValueError(
        f"path {str(path)!r}: unknown image file extension; use one of {', '.join(IMAGE_EXTENSIONS)}"
    )


def _check_readable(path, name="path") -> Path:
    p = Path(os.fspath(path))
    if not p.exists():
        raise ImageFileNotFoundError(2, f"{name}: no such file", str(p))
    if p.is_dir():
        raise ValueError(f"{name} {str(p)!r} is a directory, not an image file")
    return p


def load(path, *, dtype=None) -> Image:
    """Read an image file (.nii, .nii.gz, .mha, .mhd, .nrrd, .png) into an :class:`~classreg.Image`.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Geometry (spacing, origin, direction) is taken exactly as SimpleITK reads it.
    dtype : numpy dtype, optional
        Convert the pixel data (e.g. ``np.float32``); by default the file's pixel type is kept.

    Raises
    ------
    FileNotFoundError
        (also a ``ValueError``) if ``path`` does not exist.
    ValueError
        Unknown extension, unreadable or corrupt file, or NaN/Inf pixels.
    """
    import SimpleITK as sitk

    p = _check_readable(path)
    image_extension(p)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ValueError(f"path {str(p)!r}: SimpleITK could not read it ({_first_line(exc)})") from None
    out = Image.from_sitk(img)
    if dtype is not None:
        out = out.astype(dtype)
    return out


def save(image: Image, path, *, compress: bool | None = None) -> Path:
    """Write ``image`` to ``path`` atomically (temporary name, then rename). Returns the path.

    The format follows the extension (.nii, .nii.gz, .mha, .mhd, .nrrd, .png). PNG holds 2-D 8/16-bit integer
    images only; floating data whose values are integers in [0, 255] is stored as 8-bit, anything else raises.
    ``compress`` defaults to True for .nii.gz and False otherwise.
    """
    import SimpleITK as sitk

    if not isinstance(image, Image):
        raise TypeError(f"image must be a classreg.Image, got {type(image).__name__}")
    ext = image_extension(path)
    if ext == ".png":
        image = _png_ready(image)
    sitk_img = image.to_sitk()
    if compress is None:
        compress = ext == ".nii.gz"
    with atomic_output(path) as tmp:
        sitk.WriteImage(sitk_img, str(tmp), bool(compress))
    return Path(path)


def _png_ready(image: Image) -> Image:
    if image.ndim != 2:
        raise ValueError("PNG holds 2-D images only; use .nii.gz, .mha or .nrrd for 3-D data")
    data = image.numpy()
    if data.dtype in (np.uint8, np.uint16) or data.dtype == np.bool_:
        return image.like(data.astype(np.uint8) if data.dtype == np.bool_ else data)
    if data.size and np.all(np.mod(data, 1) == 0) and data.min() >= 0 and data.max() <= 255:
        return image.like(data.astype(np.uint8))
    raise ValueError(
        f"PNG stores 8/16-bit unsigned integers; this image is {data.dtype} with values in "
        f"[{data.min()}, {data.max()}]: rescale and cast it, or save as .nii.gz/.mha"
    )


@contextlib.contextmanager
def atomic_output(path):
    """Context manager yielding a temporary path; on success the file(s) are renamed to ``path``.

    The temporary file lives in a private folder next to ``path`` with the *final* file name, so formats that write
    a header plus a data file (.mhd + .raw, .nhdr + .raw) reference the right data file name; data files are moved
    first and the header last, so ``path`` appears only once complete. On error nothing is left behind.
    """
    final = Path(os.fspath(path))
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.exists():
        raise ValueError(f"cannot write {str(final)!r}: folder {str(parent)!r} does not exist")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmpdir / final.name
        produced = sorted(tmpdir.iterdir(), key=lambda f: f.name == final.name)  # header/main file last
        if not any(f.name == final.name for f in produced):
            raise RuntimeError(f"writer produced no file {final.name!r}")
        for f in produced:
            os.replace(f, parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    for line in text:
        line = line.strip()
        if line and not line.startswith("/"):
            return line
    return text[-1] if text else exc.__class__.__name__


def load_points(path):
    """Read points (and optional labels) from .npy, .npz, .csv or .txt (BCPD's tab/comma/space-separated N×D).

    A .csv/.txt file with D+1 columns holds the label in its last column; a header line is skipped. A .npz may
    hold ``points`` and ``labels``. Returns ``(points, labels or None)``.
    """
    p = Path(os.fspath(path))
    if not p.is_file():
        raise FileNotFoundError(f"point file {str(p)!r} does not exist")
    name = p.name.lower()
    labels = None
    if name.endswith(".npy"):
        a = np.load(p, allow_pickle=False)
    elif name.endswith(".npz"):
        with np.load(p, allow_pickle=False) as z:
            a = z["points"]
            labels = z["labels"] if "labels" in z.files else None
        return a, labels
    elif name.endswith((".txt", ".csv", ".xyz", ".tsv")):
        text = p.read_text().replace(",", " ").replace("\t", " ").splitlines()
        rows = []
        for line in text:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                rows.append([float(v) for v in line.split()])
            except ValueError:
                if rows:
                    raise ValueError(f"{str(p)!r}: non-numeric line {line!r}") from None
                continue  # header
        if not rows:
            raise ValueError(f"{str(p)!r} holds no points")
        if len({len(r_) for r_ in rows}) != 1:
            raise ValueError(f"{str(p)!r}: rows have different numbers of columns")
        a = np.array(rows)
    else:
        raise ValueError(f"{str(p)!r}: unknown point-file extension; use .txt, .csv, .npy or .npz")
    a = np.asarray(a, dtype=float)
    if a.ndim == 2 and a.shape[1] == 4:
        labels = a[:, 3].astype(np.int64)
        a = a[:, :3]
    return a, labels


def save_points(path, pts) -> Path:
    """Write an (N, D) array of points atomically: .npy, or text (.csv comma-, otherwise tab-separated)."""
    p = Path(os.fspath(path))
    with atomic_output(p) as tmp:
        if p.name.lower().endswith(".npy"):
            with open(tmp, "wb") as fh:
                np.save(fh, pts)
        else:
            sep = "," if p.name.lower().endswith(".csv") else "\t"
            np.savetxt(tmp, pts, delimiter=sep, fmt="%.9g")
    return p
