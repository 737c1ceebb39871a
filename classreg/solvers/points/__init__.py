"""register_points: Bayesian Coherent Point Drift and multi-organ BCPD on (labelled) point clouds.

* :mod:`.register`: ``register_points`` (inputs, normalisation, the VB loop, the Result);
* :mod:`.bcpd`: the variational-Bayes updates (E-step, v, α, similarity, σ²);
* :mod:`.kernel`, :mod:`.lowrank`: the multi-organ kernel, its exact and low-rank blocks, the Nyström E-step;
* :mod:`.labels`: organ labels, the label-transition matrix, surface points from a label map;
* :mod:`.transform`: the resulting transforms, their file format and their sampling on a grid;
* :mod:`.options`: the options, declared once.
"""
from .labels import label_surface_points, label_transition_matrix
from .options import OPTIONS
from .register import register_points
from .transform import (
    PointDeformation,
    PointDeformationInverse,
    load_point_deformation,
    points_displacement_field,
)

__all__ = ["OPTIONS", "PointDeformation", "PointDeformationInverse", "label_surface_points", "label_transition_matrix",
           "load_point_deformation", "points_displacement_field", "register_points"]
