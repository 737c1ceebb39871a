"""register_rigid: global rigid multimodal alignment by FFT cross-similarity of normalised gradient fields (CSNGF).

Modules: :mod:`.register` (the solver), :mod:`.options` (its options, declared once), :mod:`.csngf` (the measure
over all shifts), :mod:`.rotations` (rotation sampling, perturbation, Euler angles), :mod:`.schedule` (per-level
parameters), :mod:`.grids` (working grids and level images for the pyramid driver), :mod:`.search` (the per-level
search step).
"""
from .csngf import (
    CrossSimilarityNGF,
    SimilarityMap,
    csngf_direct,
    normalised_gradient_field,
)
from .options import OPTIONS, PAPER_SCHEDULE
from .register import register_rigid
from .rotations import euler_angles, sample_rotations

__all__ = [
    "OPTIONS",
    "PAPER_SCHEDULE",
    "CrossSimilarityNGF",
    "SimilarityMap",
    "csngf_direct",
    "euler_angles",
    "normalised_gradient_field",
    "register_rigid",
    "sample_rotations",
]
