"""Regenerate ``expected.json``: every parameter file in this folder parsed by the REAL elastix parser.

The reference is itk-elastix (``pip install itk-elastix``; 0.25.4 was used, which embeds elastix 5.2.x):
``itk.ParameterObject.New().ReadParameterFile(path)`` then ``GetParameterMap(0)``. For every ``.txt``, ``.toml``
and ``.par`` file below this folder the output records::

    {relative_path: {"ok": true, "map": {name: [value, ...]}}}      # parsed
    {relative_path: {"ok": false, "error": "<elastix's message>"}}  # rejected

``error`` is the text after ``ITK ERROR: `` with this folder's absolute path removed, so the file is the same on
every machine. Run from anywhere::

    python tests/data/elastix/parameters/make_expected.py          # rewrites expected.json
    python tests/data/elastix/parameters/make_expected.py --check  # exit 1 if expected.json is stale

``import itk`` takes about 10 s. classreg's tests only read ``expected.json``; the live comparison in
``tests/test_elastix_parameters.py`` imports :func:`parse_with_itk` from here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected.json"
SUFFIXES = (".txt", ".toml", ".par")


def corpus_files(root: Path = HERE) -> list:
    """The parameter files below ``root`` (``.txt``, ``.toml``, ``.par``), sorted by relative POSIX path."""
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES),
                  key=lambda p: p.relative_to(root).as_posix())


def _clean_error(message: str, path: Path, root: Path) -> str:
    text = message.split("ITK ERROR: ", 1)[-1].strip()
    return text.replace(str(path), path.relative_to(root).as_posix()).replace(str(root) + "/", "")


def parse_with_itk(path, root: Path = HERE) -> dict:
    """``{"ok": True, "map": {...}}`` or ``{"ok": False, "error": "..."}`` from itk-elastix's parser."""
    import itk

    path = Path(path)
    po = itk.ParameterObject.New()
    try:
        po.ReadParameterFile(str(path))
    except RuntimeError as exc:
        return {"ok": False, "error": _clean_error(str(exc), path, root)}
    pm = po.GetParameterMap(0)
    return {"ok": True, "map": {k: list(pm[k]) for k in pm}}


def build(root: Path = HERE) -> dict:
    return {p.relative_to(root).as_posix(): parse_with_itk(p, root) for p in corpus_files(root)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = json.dumps(build(), indent=1, sort_keys=True, ensure_ascii=True) + "\n"
    if "--check" in argv:
        stale = not EXPECTED.exists() or EXPECTED.read_text() != text
        print("expected.json is stale" if stale else "expected.json is up to date")
        return int(stale)
    EXPECTED.write_text(text)
    print(f"wrote {EXPECTED} ({len(json.loads(text))} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
