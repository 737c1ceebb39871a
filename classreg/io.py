"""Reading and writing images through SimpleITK, so a file means the same as in ITK, ANTs and elastix.

NIfTI is read by SimpleITK (RAS on disk → LPS in memory, qform/sform handled by ITK), so ``classreg.load(path)``
gives exactly the geometry ``SimpleITK.ReadImage(path)`` gives.  Every write goes to a temporary name in the target
folder and is renamed into place, so an interrupted run never leaves a truncated file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .image import Image

logger = logging.getLogger(__name__)

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


def load(path, *, dtype=None, channel: int | None = None) -> Image:
    """Read an image file (.nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr, .png) into an :class:`~classreg.Image`.

    Data and geometry are exactly what ``SimpleITK.ReadImage`` gives, after checks that turn every silent misreading
    we know of into an error naming the file and the problem:

    * a file whose (decompressed) pixel data is shorter than its header promises (ITK's NIfTI reader fills the
      missing voxels with 0; the MetaImage reader reports "No such file or directory");
    * NaN/Inf voxels in a floating-point NIfTI file (ITK's NIfTI reader silently turns them into 0; they are
      detected in the file's own bytes);
    * complex-valued pixels, zero spacing, an empty file, a file that is not an image.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Geometry (spacing, origin, direction) is taken exactly as SimpleITK reads it.
    dtype : numpy dtype, optional
        Convert the pixel data (e.g. ``np.float32``); by default the file's pixel type is kept.
    channel : int, optional
        Read one component of a multi-component image. Without it a grey image stored as RGB/RGBA (identical colour
        channels, as ITK's example PNGs) is read as one channel, and a true colour image is an error.

    Returns
    -------
    Image

    Raises
    ------
    FileNotFoundError
        (also a ``ValueError``) if ``path`` (or the data file its header names) does not exist.
    ValueError
        Unknown extension, a directory, an empty, truncated, corrupt or unreadable file, NaN/Inf pixels,
        complex-valued pixels, or zero/negative spacing.

    Notes
    -----
    The checks cost little on a normal load: the NIfTI header is parsed (a few hundred bytes), and an uncompressed
    file's size or a gzip stream's length field is compared with it. Scalar float32/float64 NIfTI voxels are read
    by classreg (once, instead of by ITK: the same bytes, with NaN/Inf refused rather than zeroed) with the geometry
    from SimpleITK's own reader. The voxel data is read a second time only for rescaled or vector floating-point
    NIfTI data in which SimpleITK's result holds zeros, or when the gzip length field does not match the header
    (then the stream is decompressed and counted). A MetaImage payload's size is compared with its header (the
    file size, or ``CompressedDataSize``), since older SimpleITK releases read short data without an error. The
    NRRD and PNG readers refuse short data themselves; for those the checks only make the message name the file and
    the problem.
    """
    import SimpleITK as sitk

    p = _check_readable(path)
    ext = image_extension(p)
    if p.stat().st_size == 0:
        raise ValueError(f"path {str(p)!r}: the file is empty (0 bytes), not an image; re-create or re-copy it")
    gz, nifti = _nifti_head(p) if ext in (".nii", ".nii.gz") else (False, None)
    out = _load_nifti_float(p, gz, nifti) if nifti is not None else None
    if out is None:
        try:
            img = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise _read_error(p, ext, exc) from None
        if img.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
            raise ValueError(
                f"path {str(p)!r}: complex-valued pixels ({img.GetPixelIDTypeAsString()}) are not supported; "
                "classreg registers real-valued images: save the magnitude (numpy.abs) or the real part as a real "
                "image"
            )
        if nifti is not None:
            _check_nifti_payload(p, img, gz, nifti)
        if ext in (".mha", ".mhd"):
            problem = _meta_payload_problem(p, decompress=False)
            if problem is not None:
                raise problem
        try:
            out = Image.from_sitk(img)
        except ValueError as exc:
            raise _image_error(p, exc, img.GetSpacing()) from None
    out = _grey(out, p, channel)
    if dtype is not None:
        out = out.astype(dtype)
    return out


def _grey(image: Image, p: Path, channel) -> Image:
    """A colour (RGB/RGBA integer) image as one grey channel: ``channel`` if given; the common value when the colour
    channels are identical (grey pictures stored as RGB, e.g. ITK's example PNGs); else a ValueError naming the fix.
    Other vector images (displacement fields: floating point) are returned unchanged."""
    colour = image.is_vector and image.ncomponents in (3, 4) and np.issubdtype(image.dtype, np.integer)
    if channel is not None:
        if not image.is_vector or not 0 <= int(channel) < image.ncomponents:
            raise ValueError(f"path {str(p)!r}: channel={channel} but the image has "
                             f"{image.ncomponents if image.is_vector else 1} component(s)")
        return Image(np.ascontiguousarray(image.data[..., int(channel)]), image.spacing, image.origin,
                     image.direction)
    if not colour:
        return image
    data = image.data
    if all(np.array_equal(data[..., 0], data[..., c]) for c in (1, 2)):
        logger.info("%s: a grey image stored as %s; read as one channel", p, "RGBA" if image.ncomponents == 4 else "RGB")
        return Image(np.ascontiguousarray(data[..., 0]), image.spacing, image.origin, image.direction)
    raise ValueError(f"path {str(p)!r}: a colour image (RGB{'A' if image.ncomponents == 4 else ''} with different "
                     "channels); classreg registers grey images: pass channel=0, 1 or 2 to classreg.load (--channel 0, 1 "
                     "or 2 on the command line) to use one channel, or convert the file to grey first")


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


# ---------------------------------------------------------------------------------------------- read-error diagnosis
_FORMAT_NAMES = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".mha": "MetaImage", ".mhd": "MetaImage", ".nrrd": "NRRD",
                 ".nhdr": "NRRD", ".png": "PNG"}


def _itk_reason(exc) -> str:
    """The informative part of a SimpleITK/ITK exception text (no source locations, object addresses, or teem's
    chain of "trouble" lines)."""
    lines = []
    for line in str(exc).strip().splitlines():
        line = line.strip()
        if not line or line.startswith("Exception thrown in SimpleITK") or line.startswith("/"):
            continue
        line = re.sub(r"^ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", line)
        line = re.sub(r"^sitk::ERROR:\s*", "", line)
        if line.startswith("[nrrd]"):
            body = line.split(":", 1)[-1].strip()
            if not body or body.startswith("trouble"):
                continue
            line = body
        if re.match(r"^Read: Error reading .*:$", line):
            continue
        lines.append(line.rstrip(".").strip())
    return "; ".join(lines) if lines else _first_line(exc)


def _truncated_message(p: Path, promised: int, got: int, what: str = "the file") -> str:
    return (
        f"path {str(p)!r}: the file is truncated: its header promises {promised} bytes of pixel data but {what} "
        f"holds only {max(int(got), 0)}; it was cut short (interrupted copy, download or write?): re-create or "
        "re-copy it"
    )


def _read_error(p: Path, ext: str, exc) -> ValueError:
    """The exception to raise when SimpleITK cannot read ``p``: the file named, and the problem said."""
    reason = _itk_reason(exc)
    fmt = _FORMAT_NAMES.get(ext, ext)
    if "zero-valued spacing" in reason.lower():
        return ValueError(
            f"path {str(p)!r}: zero/negative spacing in the image header, which ITK refuses ({reason}); "
            "voxel sizes must be strictly positive (mm): fix the header"
        )
    if ext in (".mha", ".mhd"):
        problem = _meta_payload_problem(p)
        if problem is not None:
            return problem
    if ext in (".nii", ".nii.gz"):
        problem = _nifti_read_problem(p)
        if problem is not None:
            return problem
    if re.search(r"fread got only|expected \d+ bytes but received|data not read completely", reason):
        return ValueError(
            f"path {str(p)!r}: the file is truncated: its pixel data is shorter than its header promises "
            f"({reason}); it was cut short (interrupted copy, download or write?): re-create or re-copy it"
        )
    m = re.search(r"couldn't open \"([^\"]+)\"", reason)
    if m:
        return ImageFileNotFoundError(
            2, f"{fmt} header {str(p)!r} names the data file {m.group(1)!r}, which cannot be opened (missing?)",
            m.group(1),
        )
    if "Unable to determine ImageIO reader" in reason:
        return ValueError(
            f"path {str(p)!r}: SimpleITK could not read it: no reader recognises its contents as an image; it is "
            f"damaged (e.g. a truncated header) or not a {fmt} file despite its extension"
        )
    return ValueError(f"path {str(p)!r}: SimpleITK could not read it ({reason}); the file may be damaged or truncated")


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _meta_payload_problem(p: Path, *, decompress: bool = True):
    """For a MetaImage file: an exception saying which data is missing or short, or None. Called when ITK refused
    the file (to name the problem) and after ITK read it (older SimpleITK releases, e.g. 2.2, fill a short payload
    with zeros without a word); ``decompress=False``, the check after a successful read, compares a compressed
    payload's size with the header's ``CompressedDataSize`` instead of decompressing it again."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    fields, end = {}, None
    pos = 0
    for raw in head.splitlines(keepends=True):
        pos += len(raw)
        key, sep, value = raw.decode("latin-1").partition("=")
        if not sep:
            return None
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            end = pos
            break
    if end is None:
        return None
    try:
        dims = [int(v) for v in fields.get("dimsize", "").split()]
        itemsize = _MET_SIZES[fields.get("elementtype", "").upper()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields.get("headersize", "0"))
    except (KeyError, ValueError):
        return None
    if not dims:
        return None
    promised = int(np.prod(dims, dtype=np.int64)) * itemsize * channels
    compressed = fields.get("compresseddata", "false").lower() == "true"
    name = fields["elementdatafile"]
    if name.upper() == "LOCAL":
        data_file, start = p, end
    elif name.upper() == "LIST" or "%" in name or " " in name:
        return None
    else:
        data_file = p.parent / name
        start = max(header_size, 0)
        if not data_file.is_file():
            return ImageFileNotFoundError(
                2, f"MetaImage header {str(p)!r} names the data file {name!r} (ElementDataFile), which does not "
                "exist next to it", str(data_file),
            )
    what = "the file" if data_file == p else f"its data file {data_file.name!r}"
    if not compressed:
        size = data_file.stat().st_size
        if header_size == -1:  # data at the end of the file
            start = 0
        got = size - start
    elif not decompress:
        size = data_file.stat().st_size - (0 if header_size == -1 else start)
        try:
            stored = int(fields.get("compresseddatasize", "0"))
        except ValueError:
            return None
        if size < stored:
            return ValueError(_truncated_message(p, stored, size, what + " (compressed)"))
        return None
    else:
        got = 0
        with open(data_file, "rb") as fh:
            fh.seek(start)
            d = zlib.decompressobj(47)
            try:
                while not d.eof:
                    buf = fh.read(1 << 20)
                    if not buf:
                        break
                    while buf and not d.eof:
                        got += len(d.decompress(buf, 1 << 22))
                        buf = d.unconsumed_tail
                got += len(d.flush())
            except zlib.error:
                return ValueError(
                    f"path {str(p)!r}: the compressed pixel data in {what} is corrupt (zlib could not decompress it "
                    f"after {got} of {promised} bytes); re-create or re-copy the file"
                )
        what += " (decompressed)"
    if got < promised:
        return ValueError(_truncated_message(p, promised, got, what))
    return None


# ------------------------------------------------------------------------------------------------- NIfTI payload
#: NIfTI datatype code -> bytes per voxel (nifti1.h); floating types also give the numpy type to scan for NaN/Inf.
_NIFTI_SIZES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 1536: 16,
                1792: 16, 2048: 32, 2304: 4}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def _nifti_header_info(head: bytes):
    """``(offset, nbytes, float dtype or None, scaled)`` from the first bytes of a single-file NIfTI-1/2, or None
    when they are not such a header (ITK accepted the file, so there is then nothing we can add)."""
    if len(head) < 348:
        return None
    for bo in "<>":
        size = struct.unpack(bo + "i", head[:4])[0]
        if size in (348, 540):
            break
    else:
        return None
    if size == 348:
        if head[344:348] != b"n+1\x00":
            return None
        dim = struct.unpack(bo + "8h", head[40:56])
        datatype = struct.unpack(bo + "h", head[70:72])[0]
        vox_offset, slope, inter = struct.unpack(bo + "3f", head[108:120])
        min_offset = 352
    else:
        if len(head) < 540 or head[4:8] != b"n+2\x00":
            return None
        datatype = struct.unpack(bo + "h", head[12:14])[0]
        dim = struct.unpack(bo + "8q", head[16:80])
        vox_offset = struct.unpack(bo + "q", head[168:176])[0]
        slope, inter = struct.unpack(bo + "2d", head[176:192])
        min_offset = 544
    if not 1 <= dim[0] <= 7 or datatype not in _NIFTI_SIZES:
        return None
    nvox = 1
    for n in dim[1:dim[0] + 1]:
        nvox *= max(int(n), 1)  # nifticlib treats dim[i] < 1 as 1
    offset = int(vox_offset) if np.isfinite(vox_offset) and vox_offset >= min_offset else min_offset
    float_dtype = _NIFTI_FLOATS.get(datatype)
    if float_dtype is not None:
        float_dtype = np.dtype(bo + float_dtype)
    scaled = bool(np.isfinite(slope) and slope != 0 and np.isfinite(inter) and (slope != 1 or inter != 0))
    return offset, nvox * _NIFTI_SIZES[datatype], float_dtype, scaled


def _nifti_chunks(p: Path, gz: bool, chunk: int = 1 << 22):
    """The bytes of a NIfTI file in chunks, decompressed when ``gz`` (all gzip members; trailing non-gzip bytes are
    ignored, as zlib's gzread does). A truncated stream just ends early; corrupt data raises ``zlib.error``."""
    with open(p, "rb") as fh:
        if not gz:
            while True:
                buf = fh.read(chunk)
                if not buf:
                    return
                yield buf
        d = zlib.decompressobj(31)
        while True:
            buf = fh.read(chunk)
            if not buf:
                break
            while buf:
                out = d.decompress(buf, chunk)
                if out:
                    yield out
                buf = d.unconsumed_tail
                if d.eof:
                    rest = d.unused_data
                    if len(rest) < 2:
                        rest += fh.read(chunk)
                    if not rest.startswith(_GZIP_MAGIC):
                        return
                    d = zlib.decompressobj(31)
                    buf = rest
        out = d.flush()
        if out:
            yield out


def _nifti_head(p: Path):
    """``(gz, info)`` for a single-file NIfTI: whether it is gzip-compressed (by its bytes, as zlib's gzread decides,
    not by its name) and :func:`_nifti_header_info` of its header (None when that is not understood)."""
    try:
        with open(p, "rb") as fh:
            first = fh.read(4096)
        gz = first[:2] == _GZIP_MAGIC
        head = zlib.decompressobj(31).decompress(first, 544) if gz else first[:544]
    except (OSError, zlib.error):
        return False, None
    return gz, _nifti_header_info(head)


def _nifti_read_problem(p: Path):
    """For a NIfTI file SimpleITK refused: an exception when the file is cut inside its header, or its voxel data
    is short or its compressed stream corrupt (ITK then often just reports that no reader recognises the file)."""
    try:
        with open(p, "rb") as fh:
            first = fh.read(4096)
        gz = first[:2] == _GZIP_MAGIC
        d = zlib.decompressobj(31)
        head = d.decompress(first, 544) if gz else first[:544]
    except (OSError, zlib.error):
        return None
    if gz and len(head) < 348 and len(first) < 4096 and not d.eof:
        return ValueError(
            f"path {str(p)!r}: the file is truncated: its gzip stream ends after {len(head)} decompressed bytes, "
            "inside the 348-byte NIfTI header; re-create or re-copy it"
        )
    if 4 <= len(head) < 348 and (struct.unpack("<i", head[:4])[0] in (348, 540)
                                 or struct.unpack(">i", head[:4])[0] in (348, 540)):
        return ValueError(
            f"path {str(p)!r}: the file is truncated: it ends inside its NIfTI header ({len(head)} bytes"
            f"{' decompressed' if gz else ''}, the header alone needs 348); re-create or re-copy it"
        )
    info = _nifti_header_info(head)
    if info is None:
        return None
    offset, nbytes = info[0], info[1]
    try:
        got, _ = _read_nifti_voxels(p, gz, offset, nbytes, keep=False)
    except ValueError as exc:  # corrupt compressed data
        return exc
    if got < nbytes:
        return ValueError(_truncated_message(p, nbytes, got, "the decompressed file" if gz else "the file"))
    return None


def _read_nifti_voxels(p: Path, gz: bool, offset: int, nbytes: int, *, keep: bool):
    """Read the voxel bytes once: ``(bytes present, data)``; ``data`` is a writable uint8 array of the voxel bytes
    (those missing from a truncated file left unset) when ``keep``, else None."""
    if not gz and keep:
        with open(p, "rb") as fh:
            fh.seek(offset)
            raw = np.fromfile(fh, np.uint8, count=nbytes)
        return raw.size, (raw if raw.size == nbytes else None)
    out = np.empty(nbytes, np.uint8) if keep else None
    end = offset + nbytes
    pos = 0
    chunks = _nifti_chunks(p, gz)
    try:
        for c in chunks:
            lo, hi = max(offset - pos, 0), min(end - pos, len(c))
            if keep and hi > lo:
                out[pos + lo - offset:pos + hi - offset] = np.frombuffer(c, np.uint8, count=hi - lo, offset=lo)
            pos += len(c)
            if pos >= end:
                break
    except zlib.error as exc:
        raise ValueError(
            f"path {str(p)!r}: the compressed data is corrupt (zlib: {exc}); re-create or re-copy the file"
        ) from None
    finally:
        chunks.close()
    return max(min(pos, end) - offset, 0), out


def _nan_message(p: Path, bad: int) -> str:
    return (
        f"path {str(p)!r}: NaN/Inf pixels: the file holds {bad} NaN or Inf voxel value(s) (SimpleITK's NIfTI reader "
        "would silently turn them into 0); replace them (e.g. numpy.nan_to_num) or mask them out"
    )


def _count_nonfinite(a: np.ndarray) -> int:
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def _load_nifti_float(p: Path, gz: bool, info):
    """Read a scalar, unscaled float32/float64 NIfTI file without ITK's data path, or return None.

    ITK (nifticlib) reads such voxels as the file's bytes in native byte order, except that it replaces NaN/Inf by 0.
    Reading the bytes here gives the same array (NaN/Inf are refused instead of zeroed) at the cost of one read; the
    geometry comes from SimpleITK's reader itself (header information, then a one-voxel streamed read).
    """
    import SimpleITK as sitk

    offset, nbytes, float_dtype, scaled = info
    if float_dtype is None or scaled:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # the full read reports it
    expected_id = sitk.sitkFloat32 if float_dtype.itemsize == 4 else sitk.sitkFloat64
    size = tuple(int(n) for n in reader.GetSize())
    if (reader.GetPixelID() != expected_id or reader.GetNumberOfComponents() != 1 or len(size) not in (2, 3)
            or int(np.prod(size, dtype=np.int64)) * float_dtype.itemsize != nbytes):
        return None
    # The geometry: one voxel read through itk::ImageFileReader, so spacing/origin/direction are bit for bit those
    # of ReadImage (the reader also turns a negative spacing into a flipped direction column).
    reader.SetExtractSize([1] * len(size))
    try:
        geometry = reader.Execute()
    except RuntimeError:
        return None
    got, raw = _read_nifti_voxels(p, gz, offset, nbytes, keep=True)
    if got < nbytes:
        raise ValueError(_truncated_message(p, nbytes, got, "the decompressed file" if gz else "the file"))
    data = raw.view(float_dtype.newbyteorder("="))
    if not float_dtype.isnative:
        data.byteswap(inplace=True)
    # NaN/Inf: Image's own check, reported against the file by _image_from_header
    return _image_from_header(p, data.reshape(size[::-1]), geometry.GetSpacing(), geometry.GetOrigin(),
                              geometry.GetDirection())


def _image_from_header(p: Path, data, spacing, origin, direction) -> Image:
    """``Image(...)`` with any problem reported against the file ``p``."""
    try:
        return Image(data, spacing, origin, direction, vector=False)
    except ValueError as exc:
        raise _image_error(p, exc, spacing) from None


def _image_error(p: Path, exc, spacing) -> ValueError:
    text = str(exc)
    if text.startswith("spacing"):
        return ValueError(
            f"path {str(p)!r}: zero/negative spacing {tuple(spacing)} in the image header; voxel sizes must be "
            "strictly positive (mm): fix the header"
        )
    text = text[len("data "):] if text.startswith("data ") else text
    if "NaN or Inf" in text:
        return ValueError(f"path {str(p)!r}: NaN/Inf pixels: the image {text}")
    return ValueError(f"path {str(p)!r}: {text}")


def _check_nifti_payload(p: Path, img, gz: bool, info) -> None:
    """Refuse a NIfTI file read by ITK whose voxel data is shorter than its header promises, or holds NaN/Inf.

    ITK's NIfTI reader (nifticlib) fills missing voxels with 0 and replaces NaN/Inf floats with 0, both silently,
    so both are checked against the file's own bytes. Cheap checks first: the file size (.nii) or the gzip length
    field (.nii.gz) against the header; the voxel data is read again only for floating-point data (rescaled or
    vector) in which SimpleITK's result holds zeros, or when the gzip length field does not match.
    """
    import SimpleITK as sitk

    offset, nbytes, float_dtype, scaled = info
    total = offset + nbytes
    if float_dtype is not None and not scaled:  # (rescaled data: ITK maps nifticlib's 0 to ``inter``; always scan)
        view = sitk.GetArrayViewFromImage(img)
        if np.count_nonzero(view) == view.size:  # NaN/Inf would have become 0: none there
            float_dtype = None
    if float_dtype is None:
        size = p.stat().st_size
        if not gz:
            if size >= total:
                return
            raise ValueError(_truncated_message(p, nbytes, size - offset))
        if size >= 18:
            with open(p, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", fh.read(4))[0]
            if isize == total % (1 << 32):  # the gzip trailer's length field: a complete single-member stream
                return
        got, _ = _read_nifti_voxels(p, gz, offset, nbytes, keep=False)
        if got < nbytes:
            raise ValueError(_truncated_message(p, nbytes, got, "the decompressed file"))
        return
    got, raw = _read_nifti_voxels(p, gz, offset, nbytes, keep=True)
    if got < nbytes:
        raise ValueError(_truncated_message(p, nbytes, got, "the decompressed file" if gz else "the file"))
    bad = _count_nonfinite(raw.view(float_dtype))
    if bad:
        raise ValueError(_nan_message(p, bad))


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
