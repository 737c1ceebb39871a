"""``register_vp``: registration with prescribed Jacobian determinant and curl (variational principle, Zhou & Liao)."""
from .register import register_vp

__all__ = ["register_vp"]
