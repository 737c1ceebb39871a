"""The elastix / transformix drop-in: parameter files, TransformParameters files, command lines, Python API.

``classreg-elastix`` and ``classreg-transformix`` (also ``python -m classreg.elastix`` and
``python -m classreg.elastix.transformix``) take elastix's flags and files; this package offers itk-elastix's
Python calls, so ``import classreg.elastix as itk`` is the only edit an itk-elastix script needs. See
``docs/migration-elastix.md``.
"""
from .api import (
                  elastix_registration_method,
                  transformix_deformation_field,
                  transformix_filter,
                  transformix_jacobian,
                  transformix_pointset,
)
from .parameter_object import ParameterObject
from .parameters import ParameterFileError, read_parameter_file, write_parameter_file
from .transform_files import read_transform_file

__all__ = ["ParameterFileError", "ParameterObject", "elastix_registration_method", "read_parameter_file",
           "read_transform_file", "transformix_deformation_field", "transformix_filter", "transformix_jacobian",
           "transformix_pointset", "write_parameter_file"]
