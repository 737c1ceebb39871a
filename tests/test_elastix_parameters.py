"""elastix parameter files: parity of :mod:`classreg.elastix.parameters` with the real elastix parser.

``tests/data/elastix/parameters/expected.json`` holds, for every file in that folder (elastix's own test and
example parameter files plus hand-made edge cases, ELASTIX.md §4), the parse by the REAL parser of itk-elastix
0.25.4 (``make_expected.py`` there regenerates it). The typed-read, writer and number-format cases are taken from
elastix's GTest ``Common/GTesting/elxConversionGTest.cxx`` (commit 0c0b19f). The live comparison with itk-elastix
(and, with ``CLASSREG_ELASTIX_ZOO=<folder>``, with every ``.txt`` of a local ElastixModelZoo checkout) is marked
``slow`` and skips without itk-elastix.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import struct
import sys
from pathlib import Path

import pytest

from classreg.elastix.parameters import (
    ParameterFileError,
    ParameterLookup,
    format_number,
    format_parameter_map,
    is_number,
    parse_parameter_text,
    read_parameter_file,
    to_bool,
    to_float,
    to_int,
    write_parameter_file,
)

DATA = Path(__file__).parent / "data" / "elastix" / "parameters"
EXPECTED = json.loads((DATA / "expected.json").read_text())
FILES = sorted(EXPECTED)


def _as_lists(pm) -> dict:
    return {k: list(v) for k, v in pm.items()}


def _ours(path: Path) -> dict:
    try:
        return {"ok": True, "map": _as_lists(read_parameter_file(path))}
    except ParameterFileError as exc:
        return {"ok": False, "error": str(exc)}


# ------------------------------------------------------------------------------------------------ corpus parity
def test_corpus_is_complete():
    """expected.json covers exactly the parameter files in the folder (regenerate it after adding one)."""
    on_disk = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*")
                     if p.is_file() and p.suffix in (".txt", ".toml", ".par"))
    assert on_disk == FILES
    assert sum(f.startswith("elastix/") for f in FILES) == 49
    assert sum(f.startswith("edge/") for f in FILES) >= 25


@pytest.mark.parametrize("rel", FILES)
def test_parse_matches_real_elastix(rel):
    """Same accept/reject decision, same names, same value strings (in order) as itk-elastix's parser."""
    exp = EXPECTED[rel]
    got = _ours(DATA / rel)
    assert got["ok"] == exp["ok"], got.get("error", "")
    if exp["ok"]:
        assert got["map"] == exp["map"]
        assert list(got["map"]) == list(exp["map"]) or sorted(got["map"]) == list(exp["map"])
        return
    if rel.endswith(".toml"):  # TOML syntax messages come from different TOML libraries; the decision is what counts
        return
    # elastix's wording, line for line (our message adds the file name at the end)
    exp_lines = exp["error"].replace("edge/", str(DATA / "edge") + "/").split("\n")
    for line in exp_lines:
        assert line in got["error"], (line, got["error"])


def test_unicode_file_name(tmp_path):
    """elastix's test file names with German and Chinese characters (renamed in the repository) read the same."""
    for ascii_name, original in [
        ("Parameter-filename-with-special-chars.txt",
         "Parameter filename with German äüößÄÖÜ and Chinese 的一了是我 chars👍.txt"),
        ("Transform-parameter-filename-with-special-chars.txt",
         "Transform parameter filename with German äüößÄÖÜ and Chinese 的一了是我 chars👍.txt"),
    ]:
        target = tmp_path / original
        shutil.copyfile(DATA / "elastix" / "Testing" / "Data" / ascii_name, target)
        assert _as_lists(read_parameter_file(target)) == EXPECTED[f"elastix/Testing/Data/{ascii_name}"]["map"]


def test_file_level_errors(tmp_path):
    with pytest.raises(ParameterFileError, match="does not exist"):
        read_parameter_file(tmp_path / "missing.txt")
    with pytest.raises(ParameterFileError, match="is a directory"):
        (tmp_path / "d.txt").mkdir()
        read_parameter_file(tmp_path / "d.txt")
    with pytest.raises(ParameterFileError, match="FileName has not been set"):
        read_parameter_file("")
    with pytest.raises(ParameterFileError, match=r"should be a text file \(\*\.txt\) or a TOML file"):
        read_parameter_file(DATA / "edge" / "params.par")


def test_toml_without_tomllib(monkeypatch):
    """Python 3.10 has no tomllib: a .toml file still reads (tomli) or fails with a ParameterFileError, not an
    ImportError."""
    monkeypatch.setitem(sys.modules, "tomllib", None)
    try:
        import tomli  # noqa: F401
    except ImportError:
        with pytest.raises(ParameterFileError, match="tomli"):
            read_parameter_file(DATA / "edge" / "params.toml")
    else:
        assert _as_lists(read_parameter_file(DATA / "edge" / "params.toml")) == EXPECTED["edge/params.toml"]["map"]


def test_gtest_convert_text_to_parameter_map():
    """``ParameterFileParser.ConvertTextToParameterMap`` in elxConversionGTest.cxx."""
    assert parse_parameter_text("") == {}
    assert parse_parameter_text("(Numbers 0 1)\n") == {"Numbers": ("0", "1")}
    assert parse_parameter_text('(Letters "a" "z")\n') == {"Letters": ("a", "z")}
    assert parse_parameter_text(GTEST_TEXT) == GTEST_MAP


# ------------------------------------------------------------------------------------------------ typed reads
def test_to_bool_exact_lower_case():
    assert to_bool("true") is True and to_bool("false") is False
    for bad in ("True", "FALSE", "1", "0", "yes", "", " true"):
        with pytest.raises(ValueError):
            to_bool(bad)


def test_to_int():
    assert to_int("6") == 6 and to_int("-3") == -3 and to_int("+5") == 5
    assert to_int("6.000000") == 6  # Par0063's NumberOfResolutions "6.000000"
    for value in (-2**63, -2**63 + 1, 0, 1, 2**63 - 2, 2**63 - 1):  # GTest: decimal point and 0-2 trailing zeros
        for zeros in range(3):
            assert to_int(f"{value}." + "0" * zeros) == value
    for bad in ("6.5", "1e3", "0x10", "", "abc", "1 ", ".0", "1.5x"):
        with pytest.raises(ValueError):
            to_int(bad)
    for value in (-2**31, 0, 1, 2**31 - 1):  # GTest: non-zero trailing characters after the decimal point
        for trail in (" ", " 0", "1", "10", "A", "F"):
            with pytest.raises(ValueError):
                to_int(f"{value}.{trail}")
    assert to_int("7", unsigned=True) == 7
    for bad in ("-1", "-128", str(-2**63)):  # GTest: negative values can not be read as unsigned
        with pytest.raises(ValueError):
            to_int(bad, unsigned=True)


def test_to_float():
    for text, value in [("1e-7", 1e-7), ("-.5", -0.5), ("+3", 3.0), ("1.", 1.0), ("2.5E+3", 2500.0),
                        ("Infinity", math.inf), ("-Infinity", -math.inf), ("inf", math.inf), ("-inf", -math.inf)]:
        assert to_float(text) == value
    assert math.isnan(to_float("NaN"))
    for bad in ("1.5x", "", ".", "1e", "nan", "0x10", " 1", "1 ", "e5", "--1"):
        with pytest.raises(ValueError):
            to_float(bad)


def test_float_round_trip_through_text():
    """GTest ``LosslessRoundTripOfParameterValue`` for double: ToString then read back gives the same value."""
    tiny = 5e-324
    for value in (0.0, tiny, sys.float_info.min, sys.float_info.epsilon, 1.0, sys.float_info.max, math.inf):
        for v in (value, -value):
            assert to_float(format_number(v)) == v
    assert math.isnan(to_float(format_number(math.nan)))


# ------------------------------------------------------------------------------------------------ look-ups
def test_lookup_per_resolution_falls_back_to_entry_0():
    lookup = ParameterLookup({"MaximumNumberOfIterations": ("250", "500")})
    assert [lookup.get("MaximumNumberOfIterations", int, 256, entry=r) for r in range(4)] == [250, 500, 250, 250]
    assert lookup.warnings == []


def test_lookup_prefixed_name_wins():
    """elastix reads ``P`` then ``<ComponentLabel>P`` (itkParameterMapInterface.h: entry 0, entry r of the plain
    name, then entry 0, entry r of the prefixed one; the last successful read wins). ``Metric<i>Weight`` is not
    prefix-based in elastix: the multi-metric registration reads that full name directly."""
    pm = {"NumberOfHistogramBins": ("32", "16"), "Metric1NumberOfHistogramBins": ("64",),
          "Metric2NumberOfHistogramBins": (), "Metric0Weight": ("0.5",), "Metric1Weight": ("2",)}
    lookup = ParameterLookup(pm)
    bins = [[lookup.get("NumberOfHistogramBins", int, 32, entry=r, prefix=f"Metric{i}") for r in range(3)]
            for i in range(3)]
    assert bins[0] == [32, 16, 32]  # no Metric0NumberOfHistogramBins: the plain list
    assert bins[1] == [64, 64, 64]  # prefixed entry 0 beats the plain entry r
    assert bins[2] == [32, 16, 32]  # a prefixed name without values is not found: the plain list
    assert [lookup.get(f"Metric{i}Weight", float, 1.0) for i in range(2)] == [0.5, 2.0]
    assert lookup.unused() == []
    assert lookup.values("NumberOfHistogramBins", "Metric1") == ("64",)


def test_lookup_unused_names():
    pm = {"Transform": ("EulerTransform",), "FinalGridSpacingInVoxel": ("8",), "NumberOfResolutions": ("3",),
          "Metric0NumberOfHistogramBins": ("16",)}
    lookup = ParameterLookup(pm)
    lookup.get("Transform")
    lookup.get("NumberOfResolutions", int, 4)
    lookup.get("NumberOfHistogramBins", int, 32, prefix="Metric0")
    lookup.get("FinalGridSpacingInVoxels", float, 16.0)  # the real name; the file has a typo
    assert lookup.unused() == ["FinalGridSpacingInVoxel"]
    assert "FinalGridSpacingInVoxel" in lookup  # membership tests do not count as a read
    assert lookup.unused() == ["FinalGridSpacingInVoxel"]


def test_lookup_missing_parameter_warning_text():
    """The text of itkParameterMapInterface.h: the plain parameter name, the default as a C++ stream prints it."""
    lookup = ParameterLookup({})
    assert lookup.get("NumberOfHistogramBins", int, 32, entry=2, prefix="Metric0") == 32
    assert lookup.get("WriteResultImage", bool, True) is True
    assert lookup.get("DefaultPixelValue", float, 1.0) == 1.0
    assert lookup.get("SP_a", float, 0.00001) == 0.00001
    assert lookup.get("ResultImageFormat", str, "mhd") == "mhd"
    assert lookup.get("Quiet", int, None) is None  # no default: no warning
    assert lookup.warnings == [
        ('WARNING: The parameter "NumberOfHistogramBins", requested at entry number 2, does not exist at all.\n'
         '  The default value "32" is used instead.'),
        ('WARNING: The parameter "WriteResultImage", requested at entry number 0, does not exist at all.\n'
         '  The default value "true" is used instead.'),
        ('WARNING: The parameter "DefaultPixelValue", requested at entry number 0, does not exist at all.\n'
         '  The default value "1" is used instead.'),
        ('WARNING: The parameter "SP_a", requested at entry number 0, does not exist at all.\n'
         '  The default value "1e-05" is used instead.'),
        ('WARNING: The parameter "ResultImageFormat", requested at entry number 0, does not exist at all.\n'
         '  The default value "mhd" is used instead.'),
    ]


def test_lookup_cast_error_names_parameter_and_entry():
    lookup = ParameterLookup({"NumberOfResolutions": ("4.5",), "WriteResultImage": ("True",),
                              "MaximumNumberOfIterations": ("250", "abc")}, "p.txt")
    with pytest.raises(ParameterFileError, match=r'"NumberOfResolutions" \(entry 0\).*p\.txt'):
        lookup.get("NumberOfResolutions", int, 4)
    with pytest.raises(ParameterFileError, match='"WriteResultImage"'):
        lookup.get("WriteResultImage", bool, True)
    assert lookup.get("MaximumNumberOfIterations", int, 256, entry=0) == 250
    with pytest.raises(ParameterFileError, match=r"\(entry 1\)"):
        lookup.get("MaximumNumberOfIterations", int, 256, entry=1)
    assert lookup.get_list("MaximumNumberOfIterations", str) == ["250", "abc"]
    assert lookup.get_list("Missing", int, [1]) == [1]


# ------------------------------------------------------------------------------------------------ writing
GTEST_MAP = {"Direction": ("0", "0", "0", "0"), "FixedImageDimension": ("2",), "FixedInternalImagePixelType": ("float",),
             "HowToCombineTransforms": ("Compose",), "Index": ("0", "0"),
             "InitialTransformParameterFileName": ("NoInitialTransform",), "MovingImageDimension": ("2",),
             "MovingInternalImagePixelType": ("float",), "NumberOfParameters": ("2",), "Origin": ("0", "0"),
             "Size": ("0", "0"), "Spacing": ("1", "1"), "Transform": ("TranslationTransform",),
             "TransformParameters": ("0", "0"), "UseDirectionCosines": ("true",)}
GTEST_TEXT = """(Direction 0 0 0 0)
(FixedImageDimension 2)
(FixedInternalImagePixelType "float")
(HowToCombineTransforms "Compose")
(Index 0 0)
(InitialTransformParameterFileName "NoInitialTransform")
(MovingImageDimension 2)
(MovingInternalImagePixelType "float")
(NumberOfParameters 2)
(Origin 0 0)
(Size 0 0)
(Spacing 1 1)
(Transform "TranslationTransform")
(TransformParameters 0 0)
(UseDirectionCosines "true")
"""


def test_format_parameter_map_matches_gtest():
    """``Conversion.ParameterMapToString`` in elxConversionGTest.cxx."""
    assert format_parameter_map({}) == ""
    assert format_parameter_map({"A": ()}) == "(A)\n"
    assert format_parameter_map({"Numbers": ("0", "1")}) == "(Numbers 0 1)\n"
    assert format_parameter_map({"Letters": ("a", "z")}) == '(Letters "a" "z")\n'
    assert format_parameter_map(dict(reversed(list(GTEST_MAP.items())))) == GTEST_TEXT


def test_is_number_matches_gtest():
    for text in ("", " ", "a", "A B C", "true", "false", "nan", "NaN", "-", "1e3", "+3", ".5", "1.", "1.5x",
                 "Infinity", "0x10", "1e+", "1..2"):
        assert not is_number(text), text
    for name in ("AffineDTITransform", "AffineLogStackTransform", "AffineLogTransform", "AffineTransform",
                 "BSplineStackTransform", "BSplineTransform", "BSplineTransformWithDiffusion",
                 "DeformationFieldTransform", "EulerStackTransform", "EulerTransform",
                 "MultiBSplineTransformWithNormal", "RecursiveBSplineTransform", "SimilarityTransform",
                 "SplineKernelTransform", "TranslationStackTransform", "TranslationTransform",
                 "WeightedCombinationTransform"):
        assert not is_number(name)
    for i in range(-10, 10):
        assert is_number(str(i))
    assert is_number("1e+21") and is_number("1e-7") and is_number("-1.5e-07") and is_number("12345.67890")
    d = -1.0
    while d < 1.0:  # the GTest's accumulated steps, e.g. -0.9999999999999999 and 1.3877787807814457e-16
        assert is_number(format_number(d)), format_number(d)
        d += 0.1
    for limit in (sys.float_info.min, sys.float_info.max, sys.float_info.epsilon, -sys.float_info.max, 5e-324):
        assert is_number(format_number(limit))


def test_format_number_matches_gtest():
    """``Conversion.ToString`` (itk::NumberToString, double-conversion's ECMAScript shortest form)."""
    cases = [(0.5, "0.5"), (0.0, "0"), (-0.0, "0"), (1.0, "1"), (-1.0, "-1"), (0.1, "0.1"),
             (1.0 / 3.0, "0." + "3" * 16), (1e21, "1e+21"), (1e-7, "1e-7"),
             (sys.float_info.epsilon, "2.220446049250313e-16"), (sys.float_info.min, "2.2250738585072014e-308"),
             (-sys.float_info.max, "-1.7976931348623157e+308"), (sys.float_info.max, "1.7976931348623157e+308"),
             (math.inf, "Infinity"), (-math.inf, "-Infinity"), (5e-324, "5e-324"), (-5e-324, "-5e-324"),
             (1e-6, "0.000001"), (123e-9, "1.23e-7"), (2.5, "2.5")]
    for value, text in cases:
        assert format_number(value) == text, value
    assert format_number(math.nan) == "NaN" and format_number(-math.nan) == "NaN"
    for exponent in range(20, 0, -1):  # +/- 1000...000
        power = 10.0 * float(10 ** (exponent - 1))
        assert format_number(power) == "1" + "0" * exponent
        assert format_number(-power) == "-1" + "0" * exponent
    for exponent in range(15, 0, -1):  # +/- 999...999
        power = float(10 ** exponent)
        assert format_number(power - 1) == "9" * exponent
        assert format_number(1 - power) == "-" + "9" * exponent
    for exponent in range(6, 0, -1):  # +/- 0.000...001
        power = 1.0 / float(10 ** exponent)
        assert format_number(power) == "0." + "0" * (exponent - 1) + "1"
        assert format_number(-power) == "-0." + "0" * (exponent - 1) + "1"
    for exponent in range(16, 0, -1):  # +/- 0.999...999
        power = 1.0 / float(10 ** exponent)
        assert format_number(1 - power) == "0." + "9" * exponent
        assert format_number(power - 1) == "-0." + "9" * exponent
    assert format_number(3) == "3" and format_number(True) == "1"


def test_write_empty_valued_parameter_is_unreadable():
    """elastix writes a parameter without values as ``(A)``, which its own reader rejects."""
    with pytest.raises(ParameterFileError, match="does not contain a parameter name and value"):
        parse_parameter_text(format_parameter_map({"A": ()}))


@pytest.mark.parametrize("rel", [f for f in FILES if EXPECTED[f]["ok"]])
def test_format_parse_round_trip(rel):
    """Writing a parsed map and reading it back gives the same map (maps with a value-less name excepted)."""
    pm = {k: tuple(v) for k, v in EXPECTED[rel]["map"].items()}
    text = format_parameter_map(pm)
    if any(not v for v in pm.values()):
        with pytest.raises(ParameterFileError):
            parse_parameter_text(text)
        return
    assert parse_parameter_text(text) == pm


def test_write_parameter_file(tmp_path):
    pm = {"Transform": ("EulerTransform",), "TransformParameters": ("0.1", "-2", "1e-7"), "Name": ("a b",)}
    out = write_parameter_file(pm, tmp_path / "p.txt")
    assert out.read_text() == '(Name "a b")\n(Transform "EulerTransform")\n(TransformParameters 0.1 -2 1e-7)\n'
    assert read_parameter_file(out) == pm
    assert [p.name for p in tmp_path.iterdir()] == ["p.txt"]


# ------------------------------------------------------------------------------------------------ live itk-elastix
def _make_expected():
    spec = importlib.util.spec_from_file_location("_classreg_make_expected", DATA / "make_expected.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")  # SWIG, on import itk
def test_live_parity_with_itk_elastix(tmp_path):
    """Our parse == itk-elastix's parse for every file of the test corpus, and for every ``.txt`` below
    ``$CLASSREG_ELASTIX_ZOO`` if set (e.g. a checkout of SuperElastix/ElastixModelZoo, which is not shipped)."""
    pytest.importorskip("itk", reason="itk-elastix is not installed")
    import itk

    if not hasattr(itk, "ParameterObject"):
        pytest.skip("itk is installed without elastix (pip install itk-elastix)")
    make_expected = _make_expected()
    targets = [(DATA, p) for p in make_expected.corpus_files(DATA)]
    zoo = os.environ.get("CLASSREG_ELASTIX_ZOO")
    if zoo and Path(zoo).is_dir():
        root = Path(zoo).resolve()
        targets += [(root, p) for p in sorted(root.rglob("*.txt"))]
    differences = []
    for root, path in targets:
        ref = make_expected.parse_with_itk(path, root)
        got = _ours(path)
        if got["ok"] != ref["ok"] or (ref["ok"] and got["map"] != ref["map"]):
            differences.append(path.relative_to(root).as_posix())
    assert differences == [], f"{len(differences)} of {len(targets)} files differ"

    # format_number == elastix's Conversion::ToString (itk::NumberToString), reached through TOML floats
    rng = random.Random(20260515)
    values = [struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(3000)]
    values += [rng.uniform(-1e4, 1e4) for _ in range(1000)] + [m * 10.0 ** e for m in (1, 1.5, 9.25)
                                                                for e in range(-12, 25)]
    values = [v for v in values if math.isfinite(v)]
    (tmp_path / "numbers.toml").write_text("V = [" + ", ".join(map(repr, values)) + "]\n")
    ref = make_expected.parse_with_itk(tmp_path / "numbers.toml", tmp_path)["map"]["V"]
    assert [format_number(v) for v in values] == ref
