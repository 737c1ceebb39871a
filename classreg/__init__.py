"""classreg: classical, optimisation-based image and point-cloud registration.

Conventions (docs/conventions.md): arrays are indexed like numpy (``data[z, y, x]``); physical points are
(x, y[, z]) in mm in the ITK/LPS world; a registration transform maps fixed-image points to moving-image points
(the pull-back used to resample the moving image); every length a user sets is in mm.
"""


def _map_source_kernels():
    """In a source checkout ``kernels/`` sits beside ``classreg/`` and is installed as ``classreg.kernels``
    (setup.cfg ``package_dir``). When Python imports ``classreg`` from the checkout itself (the repository root is
    the working directory, installed or not), a finder maps that folder to ``classreg.kernels`` on its first import
    so the clone imports the same as an installation. An installed tree has ``classreg/kernels/`` and is left
    alone."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(here), "kernels")
    if os.path.isdir(os.path.join(here, "kernels")) or not os.path.isfile(os.path.join(folder, "__init__.py")):
        return

    class SourceKernels:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "classreg.kernels":
                return None
            import importlib.util

            return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])

    if not any(type(f).__name__ == "SourceKernels" for f in sys.meta_path):
        sys.meta_path.insert(0, SourceKernels())


def _bind_functions_over_modules():
    """``classreg.batch`` and ``classreg.resample`` are functions named after their modules. Importing such a
    submodule sets the package attribute to the module; this keeps the function there instead (as the eager
    ``from .batch import batch`` of a package ``__init__`` would), while both load on first use."""
    import sys
    import types

    class Package(types.ModuleType):
        def __setattr__(self, name, value):
            if name in ("batch", "resample") and isinstance(value, types.ModuleType):
                value = getattr(value, name)
            super().__setattr__(name, value)

    sys.modules[__name__].__class__ = Package


_map_source_kernels()
_bind_functions_over_modules()

from ._version import __version__

#: public name -> the module that defines it. Imported on first use (PEP 562), so that ``import classreg`` and the
#: command lines start without loading every solver and scipy (docs/notes/elastix.md: start-up time).
_LAZY = {
    "evaluate": ".evaluate", "terms": ".terms", "batch": ".batch", "resample": ".resample", "Image": ".image",
    "load": ".io", "load_points": ".io", "save": ".io", "save_points": ".io",
    "Event": ".progress", "StopRegistration": ".progress",
    "Result": ".result", "load_result": ".result",
    "register_demons": ".solvers.demons", "register_lddmm": ".solvers.lddmm",
    "register_metamorphosis": ".solvers.metamorphosis", "register_affine": ".solvers.parametric",
    "register_bspline": ".solvers.parametric", "register_points": ".solvers.points",
    "register_rigid": ".solvers.rigid", "register_vp": ".solvers.vp",
    "Affine": ".transforms", "BSplineTransform": ".transforms", "Chain": ".transforms",
    "DisplacementField": ".transforms", "Transform": ".transforms", "load_transform": ".transforms",
}


def __getattr__(name):
    import importlib

    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'classreg' has no attribute {name!r}")
    module = importlib.import_module(where, __name__)
    value = module if name in ("evaluate", "terms") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Affine",
    "BSplineTransform",
    "Chain",
    "DisplacementField",
    "Event",
    "Image",
    "Result",
    "StopRegistration",
    "Transform",
    "__version__",
    "batch",
    "evaluate",
    "load",
    "load_points",
    "load_result",
    "load_transform",
    "register_affine",
    "register_bspline",
    "register_demons",
    "register_lddmm",
    "register_metamorphosis",
    "register_points",
    "register_rigid",
    "register_vp",
    "resample",
    "save",
    "save_points",
    "terms",
]
