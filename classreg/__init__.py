"""classreg: classical, optimisation-based image and point-cloud registration.

Conventions (docs/conventions.md): arrays are indexed like numpy (``data[z, y, x]``); physical points are
(x, y[, z]) in mm in the ITK/LPS world; a registration transform maps fixed-image points to moving-image points
(the pull-back used to resample the moving image); every length a user sets is in mm.
"""
from . import evaluate, terms
from ._version import __version__
from .image import Image
from .io import load, load_points, save, save_points
from .progress import Event, StopRegistration
from .resample import resample
from .result import Result, load_result
from .solvers.demons import register_demons
from .solvers.lddmm import register_lddmm
from .solvers.rigid import register_rigid
from .solvers.bcpd import (PointDeformation, PointDeformationInverse, label_surface_points,
                           label_transition_matrix, load_point_deformation, points_displacement_field,
                           register_points)
from .transforms import Affine, Chain, DisplacementField, Transform, load_transform

__all__ = [
    "__version__",
    "evaluate",
    "terms",
    "Image",
    "load",
    "save",
    "load_points",
    "save_points",
    "Transform",
    "Affine",
    "DisplacementField",
    "Chain",
    "load_transform",
    "resample",
    "Result",
    "load_result",
    "register_demons",
    "register_lddmm",
    "register_rigid",
    "Event",
    "StopRegistration",
    "register_points",
    "PointDeformation",
    "PointDeformationInverse",
    "points_displacement_field",
    "label_surface_points",
    "label_transition_matrix",
    "load_point_deformation",
]
