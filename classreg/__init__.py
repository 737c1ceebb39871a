"""classreg: classical, optimisation-based image and point-cloud registration.

Conventions (docs/conventions.md): arrays are indexed like numpy (``data[z, y, x]``); physical points are
(x, y[, z]) in mm in the ITK/LPS world; a registration transform maps fixed-image points to moving-image points
(the pull-back used to resample the moving image); every length a user sets is in mm.
"""


def _map_source_kernels():
    """In a source checkout ``kernels/`` sits beside ``classreg/`` and is installed as ``classreg.kernels``
    (setup.cfg ``package_dir``). When Python imports ``classreg`` from the checkout itself (the repository root is
    the working directory, installed or not), map that folder to ``classreg.kernels`` so the clone imports the same
    as an installation. An installed tree has ``classreg/kernels/`` and is left alone."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    init = os.path.join(os.path.dirname(here), "kernels", "__init__.py")
    if "classreg.kernels" in sys.modules or os.path.isdir(os.path.join(here, "kernels")) or not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("classreg.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["classreg.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["classreg.kernels"]
        raise
    globals()["kernels"] = module


_map_source_kernels()

from . import evaluate, terms
from ._version import __version__
from .batch import batch
from .image import Image
from .io import load, load_points, save, save_points
from .progress import Event, StopRegistration
from .resample import resample
from .result import Result, load_result
from .solvers.demons import register_demons
from .solvers.lddmm import register_lddmm
from .solvers.metamorphosis import register_metamorphosis
from .solvers.parametric import register_affine, register_bspline
from .solvers.points import register_points
from .solvers.rigid import register_rigid
from .solvers.vp import register_vp
from .transforms import Affine, BSplineTransform, Chain, DisplacementField, Transform, load_transform

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
