"""register_metamorphosis: weighted (and classical) metamorphosis on register_lddmm's full-grid shooting engine
with its intensity source (:mod:`.register`), the time-varying mask M_t (:mod:`.masks`), and its options declared
once (:mod:`.options`)."""
from .masks import MaskSchedule
from .options import OPTIONS
from .register import register_metamorphosis

__all__ = ["OPTIONS", "MaskSchedule", "register_metamorphosis"]
