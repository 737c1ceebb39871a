"""Parametric registration (translation → affine → cubic B-spline), the engine the elastix front end maps onto."""
from .register import register_affine, register_bspline

__all__ = ["register_affine", "register_bspline"]
