"""Each solver's options, declared once.

A solver declares its keyword options as a :class:`Declaration` (a tuple of :class:`Option`: name, default, unit,
one-line help, valid range or choices) and decorates its ``register_*`` function with :func:`declared`. Everything
else reads that declaration:

* the Python signature is checked against it when the module is imported (same keyword-only names, same defaults,
  same order), so the two cannot drift apart;
* every call is validated against it before any work starts (choices, ranges, types), with errors that name the
  option, the value and what is allowed;
* ``Result.params`` records every declared option (the solver's resolved values, e.g. a default that depends on the
  metric, take precedence over the values passed);
* ``classreg register <solver>`` is built from it (:mod:`classreg.cli`): one flag per option, spelt
  ``--shrink-factors`` for ``shrink_factors``, with the unit and the default in its help;
* later the elastix parameter-file mapping and the batch CSV columns.

Options that mean the same thing in several solvers are declared once here (:data:`SHARED`) and reused, so they
have the same name, unit and help everywhere: ``init``, ``fixed_mask``/``moving_mask``, ``shrink_factors``,
``smoothing_sigmas`` (mm), ``iterations``, ``metric``, ``dtype``, ``seed``, ``threads``, ``device``, ``backend``,
``progress``, ``callback``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SHARED", "SOLVERS", "Declaration", "Option", "declared", "shared", "thread_context"]

#: value kinds an option can have; the CLI and the validation read them
KINDS = ("float", "int", "bool", "str", "floats", "ints", "image", "transform", "dtype", "object", "int_or_str",
         "device", "array")

#: the modules whose import declares the solvers (``classreg`` imports them on first use)
SOLVER_MODULES = ("demons", "lddmm", "metamorphosis", "parametric", "points", "rigid", "vp")


class _Registry(dict):
    """solver name -> (declaration, public function). Filled by :func:`declared` as each solver module is imported;
    any look-up first imports every module of :data:`SOLVER_MODULES` (``import classreg`` does not, for a fast start),
    so the registry always lists every solver."""

    _loaded = False

    def _load(self):
        if not self._loaded:
            type(self)._loaded = True
            import importlib

            for name in SOLVER_MODULES:
                importlib.import_module(f"classreg.solvers.{name}")

    def __getitem__(self, key):
        self._load()
        return super().__getitem__(key)

    def __contains__(self, key):
        self._load()
        return super().__contains__(key)

    def __iter__(self):
        self._load()
        return super().__iter__()

    def __len__(self):
        self._load()
        return super().__len__()

    def get(self, key, default=None):
        self._load()
        return super().get(key, default)

    def keys(self):
        self._load()
        return super().keys()

    def values(self):
        self._load()
        return super().values()

    def items(self):
        self._load()
        return super().items()


#: solver name -> (declaration, public function) of every solver (see :class:`_Registry`)
SOLVERS: dict = _Registry()


@dataclass(frozen=True)
class Option:
    """One keyword option of a solver.

    Attributes
    ----------
    name : str
        The keyword (``shrink_factors``); the CLI flag is ``--shrink-factors``.
    default
        The Python default. ``None`` means "resolved by the solver" and ``default_text`` says how.
    help : str
        One line: what it does (no unit, no default: they are added where shown).
    unit : str
        Physical unit of a length or similar ("mm", "mm²", "degrees"); empty for plain numbers.
    kind : str
        One of :data:`KINDS`: scalar ``float``/``int``/``bool``/``str``, per-level sequences ``floats``/``ints``
        (a scalar is accepted where the solver repeats it), ``image`` (an :class:`~classreg.Image`, a path on the
        CLI), ``transform`` (an initial transform, a transform file on the CLI), ``dtype``, ``object`` (Python
        only, e.g. a callback) and ``int_or_str`` (an integer or one of ``choices``).
    choices : tuple
        Allowed values of a ``str`` or number option (the words allowed besides integers for ``int_or_str``).
    low, high : float, optional
        Inclusive bounds of a number (each element of a sequence); ``low_open``/``high_open`` make them strict.
    default_text : str
        How a ``None`` default is resolved, shown in the CLI help and the docs.
    cli : bool
        Whether ``classreg register`` offers it (``callback`` and ``progress`` are Python-side only; the CLI has
        ``--quiet``).
    cli_parse : callable, optional
        Converts the command-line string to the Python value where the kind's rule does not fit.
    """

    name: str
    default: object
    help: str
    unit: str = ""
    kind: str = "float"
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    default_text: str = ""
    cli: bool = True
    cli_parse: object = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name!r}: unknown kind {self.kind!r} (one of {KINDS})")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe_default(self) -> str:
        if self.default_text:
            return self.default_text
        d = self.default
        if isinstance(d, (tuple, list)):
            return " ".join(_fmt(v) for v in d)
        if self.kind == "dtype":
            return np.dtype(d).name
        return _fmt(d)

    def same_default(self, value) -> bool:
        """Whether ``value`` (a signature default) equals this option's default."""
        a, b = self.default, value
        if self.kind == "dtype":
            return np.dtype(a) == np.dtype(b)
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
            return isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and tuple(a) == tuple(b)
        return a == b

    def check(self, value, solver: str = ""):
        """Raise a ValueError/TypeError naming the option if ``value`` is not allowed; return it unchanged."""
        if value is None:
            if self.default is None or self.kind in ("image", "transform", "object", "array"):
                return value
            raise TypeError(f"{_who(solver)}{self.name} must not be None")
        k = self.kind
        if k in ("image", "transform", "object", "array"):
            return value
        if k == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{_who(solver)}{self.name} must be True or False, got {value!r}")
            return value
        if k == "dtype":
            try:
                dt = np.dtype(value)
            except TypeError:
                dt = None
            if dt not in (np.float32, np.float64):
                raise ValueError(f"{_who(solver)}{self.name} must be float32 or float64, got {value!r}")
            return value
        if k == "str":
            return self._choice(value, solver)
        if k == "device":
            if not (value in ("cpu", "cuda") or (isinstance(value, str) and value.startswith("cuda:")
                                                 and value[5:].isdigit())):
                raise ValueError(f"{_who(solver)}{self.name} must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
            return value
        if k == "int_or_str":
            if isinstance(value, str):
                if value not in self.choices:
                    raise ValueError(f"{_who(solver)}{self.name} must be an integer or one of "
                                     f"{', '.join(map(repr, self.choices))}, got {value!r}")
                return value
            self._number(value, int, solver)
            return value
        if k in ("floats", "ints"):
            cast = int if k == "ints" else float
            items = np.ravel(np.asarray(value, dtype=object)) if not isinstance(value, numbers.Number) else [value]
            if len(items) == 0:
                if isinstance(self.default, (tuple, list)) and len(self.default) == 0:
                    return value  # an empty default means "none" (e.g. rigid's polish stages)
                raise ValueError(f"{_who(solver)}{self.name} must not be empty")
            for v in items:
                self._number(v, cast, solver, whole=value)
            return value
        self._number(value, int if k == "int" else float, solver)
        return self._choice(value, solver)

    def _choice(self, value, solver):
        if self.choices and value not in self.choices:
            shown = map(repr if self.kind == "str" else str, self.choices)
            raise ValueError(f"{_who(solver)}{self.name} must be one of {', '.join(shown)}, got {value!r}")
        return value

    def _number(self, v, cast, solver, whole=None):
        """Check one number ``v`` (an element of the sequence ``whole`` if given) against the kind and range."""
        shown = repr(v if whole is None else whole)
        if whole is None:
            what = "an integer" if cast is int else "a number"
        else:
            what = "integers" if cast is int else "numbers"
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or \
                (cast is int and not float(v).is_integer()):
            raise TypeError(f"{_who(solver)}{self.name} must be {what}{_unit(self.unit)}, got {shown}")
        x = float(v)
        if math.isnan(x) or (math.isinf(x) and not (self.high is None and x > 0 and self.kind == "float")):
            raise ValueError(f"{_who(solver)}{self.name} must be finite{_unit(self.unit)}, got {shown}")
        lo_bad = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        hi_bad = self.high is not None and (x >= self.high if self.high_open else x > self.high)
        if lo_bad or hi_bad:
            raise ValueError(f"{_who(solver)}{self.name} must be {self.range_text()}{_unit(self.unit)}, got {shown}")

    def range_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_fmt(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_fmt(self.high)}")
        return " and ".join(parts)


def _fmt(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return str(v)


def _who(solver: str) -> str:
    return f"{solver}: " if solver else ""


def _unit(unit: str) -> str:
    return f" ({unit})" if unit else ""


@dataclass(frozen=True)
class Declaration:
    """A solver's options, in signature order, with what its command line needs.

    Attributes
    ----------
    name : str
        The solver name: ``classreg register <name>``, ``register_<name>``.
    summary : str
        One line for ``classreg register --help``.
    options : tuple of Option
    inputs : tuple of str
        The two positional arguments (``("fixed", "moving")`` or ``("source", "target")``).
    description : str
        Paragraph for the sub-command's ``--help`` (what is written into the output folder).
    report : callable, optional
        ``report(result) -> str``: the one line the command line prints after a run.
    """

    name: str
    summary: str
    options: tuple
    inputs: tuple = ("fixed", "moving")
    description: str = ""
    report: object = None
    _index: dict = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        idx = {}
        for o in self.options:
            if o.name in idx:
                raise ValueError(f"{self.name}: option {o.name!r} declared twice")
            idx[o.name] = o
        object.__setattr__(self, "_index", idx)

    def __getitem__(self, name) -> Option:
        return self._index[name]

    def __contains__(self, name) -> bool:
        return name in self._index

    def __iter__(self):
        return iter(self.options)

    @property
    def names(self) -> tuple:
        return tuple(o.name for o in self.options)

    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options}

    def check(self, values: dict) -> dict:
        """Validate ``values`` (name -> value); unknown names raise a TypeError listing the declared ones."""
        for key, value in values.items():
            if key not in self._index:
                raise TypeError(f"register_{self.name}() got an unexpected keyword argument {key!r}; its options "
                                f"are: {', '.join(self.names)}")
            self._index[key].check(value, f"register_{self.name}")
        return values


# ================================================================================================ shared options
SHARED = {o.name: o for o in (
    Option("init", None, "initial fixed → moving transform (an Affine or Chain of affines; a transform file on the "
                         "command line); the solver estimates its transform on top of it", kind="transform",
           default_text="identity"),
    Option("fixed_mask", None, "where the data term is evaluated on the fixed image (an Image or array on its grid)",
           kind="image", default_text="whole image"),
    Option("moving_mask", None, "where the data term is evaluated on the moving image (on its own grid)",
           kind="image", default_text="whole image"),
    Option("shrink_factors", (4, 2, 1), "pyramid shrink factors, coarsest first, relative to the smallest spacing",
           kind="floats", low=1),
    Option("smoothing_sigmas", None, "Gaussian smoothing σ per pyramid level", unit="mm", kind="floats", low=0,
           default_text="half the shrink factor × the smallest spacing, 0 at full resolution"),
    Option("iterations", None, "iteration cap per pyramid level", kind="ints", low=0),
    Option("metric", "ssd", "data term", kind="str", choices=("ssd", "lncc")),
    Option("dtype", np.float32, "working precision", kind="dtype"),
    Option("seed", 0, "seed of every random choice (same inputs + seed + threads ⇒ the same output)", kind="int",
           low=0),
    Option("threads", None, "CPU threads for the numba kernels during this call", kind="int", low=1,
           default_text="numba's setting (NUMBA_NUM_THREADS or all cores)"),
    Option("memory_limit", None, "memory the call may use; a larger estimate (from the image sizes, measured per "
                                 "solver) is refused before any work", unit="MB", kind="float", low=0, low_open=True,
           default_text="the memory available now"),
    Option("time_limit", None, "wall-clock limit of the call: the registration stops at the first iteration past it "
                               "and returns its current estimate (stop_reason says so)", unit="s", kind="float",
           low=0, low_open=True, default_text="none"),
    Option("device", None, "where to compute: 'cpu', 'cuda' or 'cuda:N'", kind="device",
           default_text="from the data (CuPy arrays: cuda)"),
    Option("backend", None, "kernel implementation", kind="str", choices=("numpy", "numba", "cuda"),
           default_text="numba on the CPU when installed, cuda for CuPy data"),
    Option("progress", False, "show a tqdm progress bar (the command line shows one unless --quiet)", kind="bool",
           cli=False),
    Option("callback", None, "receives classreg.Event objects; raise classreg.StopRegistration to stop early",
           kind="object", cli=False),
)}


def shared(name: str, **changes) -> Option:
    """The shared option ``name``, with solver-specific ``changes`` (a default, choices, help). A new ``default``
    without a ``default_text`` drops the shared one (the help then shows the solver's own default)."""
    if "default" in changes:
        changes.setdefault("default_text", "")
    return dataclasses.replace(SHARED[name], **changes)


# ================================================================================================ the decorator
@contextlib.contextmanager
def thread_context(threads):
    """numba's thread count set to ``threads`` for the duration (nothing changes for None or without numba)."""
    from .kernels._backend import HAVE_NUMBA

    if threads is None or not HAVE_NUMBA:
        yield
        return
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _device_backend(device, backend, solver):
    """``backend`` from ``device`` ("cpu" keeps the CPU kernels, "cuda[:N]" selects the CUDA kernels)."""
    if device is None:
        return backend
    from .backend import resolve_device

    dev = resolve_device(device)
    if dev == "cpu":
        if backend == "cuda":
            raise ValueError(f"register_{solver}: device='cpu' contradicts backend='cuda'")
        return backend
    if backend not in (None, "cuda"):
        raise ValueError(f"register_{solver}: device={device!r} contradicts backend={backend!r}")
    if ":" in str(device):
        import cupy

        cupy.cuda.Device(int(str(device).split(":")[1])).use()
    return "cuda"


def _recorded(option: Option, value):
    """What ``Result.params`` records for a value passed by the user (objects are not serialised here)."""
    if option.kind in ("image", "array"):
        return value is not None
    if option.kind == "dtype":
        return np.dtype(value).name
    if option.kind in ("transform", "object"):
        return None if value is None else type(value).__name__
    return value


def declared(declaration: Declaration):
    """Decorate a ``register_*`` function with its option declaration.

    The function must take the declaration's inputs positionally and every declared option keyword-only, in
    declaration order, with the declared default (checked now, at import). Each call is validated against the
    declaration, runs with ``threads`` numba threads and with the backend that ``device`` selects, and its
    ``Result.params`` gets every declared option (the solver's own resolved entries win) plus ``threads``.
    """
    def wrap(func):
        sig = inspect.signature(func)
        params = list(sig.parameters.values())
        pos = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        kw = [p for p in params if p.kind == p.KEYWORD_ONLY]
        if tuple(pos) != tuple(declaration.inputs):
            raise TypeError(f"{func.__name__}: positional arguments {pos} differ from the declared inputs "
                            f"{list(declaration.inputs)}")
        if tuple(p.name for p in kw) != declaration.names:
            raise TypeError(f"{func.__name__}: keyword-only arguments {[p.name for p in kw]} differ from the "
                            f"declaration {list(declaration.names)}")
        for p in kw:
            if not declaration[p.name].same_default(p.default):
                raise TypeError(f"{func.__name__}: default of {p.name} is {p.default!r} in the signature but "
                                f"{declaration[p.name].default!r} in the declaration")

        @functools.wraps(func)
        def solver(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            declaration.check({k: v for k, v in bound.arguments.items() if k not in declaration.inputs})
            bound.apply_defaults()
            values = dict(bound.arguments)
            if "device" in declaration and "backend" in declaration:
                values["backend"] = _device_backend(values["device"], values["backend"], declaration.name)
            with thread_context(values.get("threads")):
                result = func(**values)
                threads = _thread_count()
            recorded = {o.name: _recorded(o, values[o.name]) for o in declaration if o.kind != "object"}
            recorded.update(result.params)
            recorded["threads"] = threads
            return dataclasses.replace(result, params=recorded)

        solver.declaration = declaration
        SOLVERS[declaration.name] = (declaration, solver)
        return solver

    return wrap


def _thread_count() -> int:
    from .backend import thread_count

    return thread_count()
