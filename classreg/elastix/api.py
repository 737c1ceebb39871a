"""itk-elastix-shaped Python calls on classreg's engine (ELASTIX.md §13).

The only edit a script needs is the import::

    import classreg.elastix as itk          # instead of: import itk

    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("rigid"))
    result_image, result_parameters = itk.elastix_registration_method(fixed, moving, parameter_object=po)
    warped_labels = itk.transformix_filter(labels, result_parameters)

Images may be :class:`classreg.Image`, ``SimpleITK.Image``, ITK images or numpy arrays (unit spacing); results
are :class:`classreg.Image` (``.to_sitk()`` converts). As in itk-elastix's library mode the result image keeps
float pixels, and ``RandomSeed`` (default 121212) makes every call reproducible.
"""
from __future__ import annotations

import numpy as np

from ..image import Image
from .parameter_object import ParameterObject, as_parameter_maps

__all__ = ["elastix_registration_method", "transformix_filter", "transformix_deformation_field",
           "transformix_jacobian", "transformix_pointset"]


def _as_image(x, name: str) -> Image:
    if isinstance(x, Image):
        return x
    if isinstance(x, np.ndarray):
        return Image(x, spacing=1.0)
    mod = type(x).__module__
    if mod.startswith("SimpleITK"):
        return Image.from_sitk(x)
    if hasattr(x, "GetSpacing") and hasattr(x, "GetOrigin") and hasattr(x, "GetDirection"):  # an ITK image
        import itk

        arr = itk.array_from_image(x)
        d = np.asarray(itk.array_from_matrix(x.GetDirection()), dtype=float)
        return Image(arr, spacing=tuple(x.GetSpacing()), origin=tuple(x.GetOrigin()), direction=d)
    raise TypeError(f"{name} must be a classreg.Image, SimpleITK/ITK image or numpy array, got {type(x).__name__}")


def elastix_registration_method(fixed_image, moving_image, parameter_object=None, *, fixed_mask=None,
                                moving_mask=None, initial_transform_parameter_file_name=None,
                                number_of_threads=None, log_to_console: bool = False, log_to_file: bool = False,
                                log_file_name: str = "elastix.log", output_directory=None):
    """Register ``moving_image`` to ``fixed_image`` with elastix parameter maps (itk's
    ``elastix_registration_method``).

    Parameters
    ----------
    fixed_image, moving_image
        2-D or 3-D scalar images.
    parameter_object : ParameterObject, dict or list of dict
        One parameter map per stage (run in order, each starting from the previous stage's transform).
    fixed_mask, moving_mask : optional
        Masks (non-zero = inside).
    initial_transform_parameter_file_name : str, optional
        A TransformParameters file the first stage starts from (``-t0``).
    number_of_threads : int, optional
        CPU threads.
    log_to_console, log_to_file, log_file_name
        Where the elastix log goes (``log_to_file`` needs ``output_directory``).
    output_directory : str, optional
        Also write elastix's output files there (TransformParameters.<k>.txt, result.<k>.<fmt>, IterationInfo).

    Returns
    -------
    (Image, ParameterObject)
        The moving image resampled onto the fixed grid through all stages (float32), and the transform parameter
        maps of the stages (oldest first), which :func:`transformix_filter` applies.
    """
    import sys
    from pathlib import Path

    from .registration import Log, run_elastix
    from .transform_files import transform_file_from_maps
    from .transformix import transform_image

    if parameter_object is None:
        raise TypeError("elastix_registration_method() needs a parameter_object (a ParameterObject, a parameter map "
                        "dict or a list of them)")
    fixed = _as_image(fixed_image, "fixed_image").astype(np.float32)
    moving = _as_image(moving_image, "moving_image").astype(np.float32)
    fmask = None if fixed_mask is None else _as_image(fixed_mask, "fixed_mask")
    mmask = None if moving_mask is None else _as_image(moving_mask, "moving_mask")
    maps = [dict(m) for m in as_parameter_maps(parameter_object)]
    if not maps:
        raise ValueError("parameter_object holds no parameter map")
    if log_to_file and output_directory is None:
        raise ValueError("log_to_file=True needs an output_directory")
    if output_directory is not None and not Path(output_directory).is_dir():
        raise ValueError(f"output_directory {str(output_directory)!r} does not exist (elastix never creates it)")
    log = None
    if log_to_file or log_to_console:
        path = Path(output_directory) / log_file_name if log_to_file else None
        log = Log(path, "info", sys.stdout if log_to_console else None) if path else _ConsoleLog()
    try:
        stages = run_elastix(fixed, moving, maps, output_directory, fixed_mask=fmask, moving_mask=mmask,
                             initial_transform_file=initial_transform_parameter_file_name,
                             threads=number_of_threads, log=log)
    finally:
        if log is not None:
            log.close()
    out_maps = [s.parameter_map for s in stages]
    tf = transform_file_from_maps(out_maps, base_dir=output_directory)
    if initial_transform_parameter_file_name is not None:
        from ..transforms import Chain
        from .transform_files import read_transform_file

        tf.transform = Chain([read_transform_file(initial_transform_parameter_file_name).transform, tf.transform])
    result = transform_image(moving, tf, cast=False)
    return result, ParameterObject(out_maps)


class _ConsoleLog:
    def __init__(self):
        import sys

        self.stdout = sys.stdout

    def write(self, text, kind="info"):
        self.stdout.write(text + "\n")

    def close(self):
        pass


def _transform_file(moving: Image, transform_parameter_object):
    from .transform_files import transform_file_from_maps

    maps = [dict(m) for m in as_parameter_maps(transform_parameter_object)]
    return transform_file_from_maps(maps, image=moving)


def transformix_filter(moving_image, transform_parameter_object, *, output_directory=None,
                       log_to_console: bool = False):
    """Apply transform parameter maps to an image (itk's ``transformix_filter``): the result lies on the grid of
    the newest map, interpolated as its ``ResampleInterpolator``/``FinalBSplineInterpolationOrder`` say (0 for label
    maps), float32 pixels (SimpleElastix's behaviour); with ``output_directory`` also written as ``result.<fmt>``."""
    from .transformix import transform_image, write_image

    moving = _as_image(moving_image, "moving_image")
    tf = _transform_file(moving, transform_parameter_object)
    out = transform_image(moving, tf, cast=False)
    if output_directory is not None:
        s = tf.resample_settings()
        write_image(out, f"{output_directory}/{s.name}.{s.format}", compress=s.compress)
    return out


def transformix_deformation_field(moving_image, transform_parameter_object):
    """``T(x) − x`` (mm, physical x, y[, z] components) on the grid of the newest map (transformix ``-def all``)."""
    from .transformix import deformation_field

    moving = _as_image(moving_image, "moving_image")
    return deformation_field(_transform_file(moving, transform_parameter_object))


def transformix_jacobian(moving_image, transform_parameter_object):
    """``(full spatial Jacobian, its determinant)`` on the grid of the newest map (transformix ``-jacmat all``,
    ``-jac all``)."""
    from .transformix import spatial_jacobian

    moving = _as_image(moving_image, "moving_image")
    tf = _transform_file(moving, transform_parameter_object)
    return spatial_jacobian(tf, full=True), spatial_jacobian(tf)


def transformix_pointset(moving_image, transform_parameter_object, *, fixed_point_set_file_name,
                         output_directory=None):
    """Map the points of a transformix point file from fixed to moving space (transformix ``-def file``).

    Returns the output points (N, ndim) in mm; with ``output_directory`` also writes ``outputpoints.txt`` in
    elastix's exact layout.
    """
    from ..io import atomic_output
    from .points import read_point_file
    from .transformix import transform_points

    moving = _as_image(moving_image, "moving_image")
    tf = _transform_file(moving, transform_parameter_object)
    points, is_index = read_point_file(fixed_point_set_file_name, ndim=tf.ndim)
    res = transform_points(tf, points, is_index=is_index)
    if output_directory is not None:
        with atomic_output(f"{output_directory}/outputpoints.txt") as tmp, open(tmp, "w", newline="\n") as fh:
            fh.write(res.text())
    return res.output_point
