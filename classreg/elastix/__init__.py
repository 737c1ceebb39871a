"""The elastix / transformix drop-in: parameter files, TransformParameters files, command lines, Python API.

``classreg-elastix`` and ``classreg-transformix`` (also ``python -m classreg.elastix`` and
``python -m classreg.elastix.transformix``) take elastix's flags and files; this package offers itk-elastix's
Python calls, so ``import classreg.elastix as itk`` is the only edit an itk-elastix script needs. See
``docs/migration-elastix.md``.
"""
_LAZY = {"elastix_registration_method": ".api", "transformix_deformation_field": ".api",
         "transformix_filter": ".api", "transformix_jacobian": ".api", "transformix_pointset": ".api",
         "ParameterObject": ".parameter_object", "ParameterFileError": ".parameters",
         "read_parameter_file": ".parameters", "write_parameter_file": ".parameters",
         "read_transform_file": ".transform_files"}


def __getattr__(name):  # imported on first use: the command lines' start-up server client stays light
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'classreg.elastix' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ParameterFileError", "ParameterObject", "elastix_registration_method", "read_parameter_file",
           "read_transform_file", "transformix_deformation_field", "transformix_filter", "transformix_jacobian",
           "transformix_pointset", "write_parameter_file"]
