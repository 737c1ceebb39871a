"""register_demons: symmetric log-domain diffeomorphic demons with broken geodesics (:mod:`.register`), one piece
on the pyramid driver (:mod:`.step`), its options declared once (:mod:`.options`)."""
from .options import OPTIONS
from .register import register_demons

__all__ = ["OPTIONS", "register_demons"]
