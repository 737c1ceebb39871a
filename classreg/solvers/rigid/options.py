"""The options of ``register_rigid``, declared once (see :mod:`classreg.options`)."""
from __future__ import annotations

import numpy as np

from ...options import Declaration, Option, shared

__all__ = ["OPTIONS", "PAPER_SCHEDULE"]

#: The published schedule (Öfverstedt et al., WBIR 2022): shrink factors d, rotations sampled per level a,
#: perturbation half-widths u (degrees), candidates kept p, Gaussian σ per level (mm). It is the default.
PAPER_SCHEDULE = {"shrink_factors": (4, 2, 2, 1), "samples": (5000, 3000, 300, 0),
                  "perturbation": (10.0, 3.0, 0.0), "keep": (20, 3, 1), "smoothing_sigmas": (5.0, 3.0, 2.0, 1.5)}


def _report(res) -> str:
    m = res.metrics
    return (f"rigid: score {m['score']:.4f}; angles (deg) {np.round(m['angles_deg'], 3).tolist()}; translation (mm) "
            f"{np.round(m['translation'], 3).tolist()}; {m['evaluations']} rotations in {res.timings['total']:.1f} s; "
            f"{res.stop_reason}")


OPTIONS = Declaration(
    name="rigid",
    summary="global rigid (multimodal) alignment by FFT cross-similarity of normalised gradient fields",
    description="Search all rotations and shifts for the rigid transform of MOVING onto FIXED that maximises the "
                "CSNGF similarity (Öfverstedt et al., WBIR 2022) and write transform.tfm (fixed -> moving, ITK "
                "Euler), inverse.tfm, warped.nii.gz, params.json, history.csv (one row per evaluated rotation), "
                "extras.npz, result.json and a QC PNG into OUT.",
    report=_report,
    options=(
        shared("fixed_mask", help="where the similarity is evaluated on the fixed image (an Image or array on its "
                                  "grid)"),
        shared("moving_mask", help="where the similarity is evaluated on the moving image (on its own grid)"),
        shared("shrink_factors", default=PAPER_SCHEDULE["shrink_factors"],
               help="pyramid shrink factors d, coarsest first, relative to the working spacing (see spacing)"),
        shared("smoothing_sigmas", default=PAPER_SCHEDULE["smoothing_sigmas"], default_text="",
               help="Gaussian σ applied to both images before each level's resampling (a scalar is repeated)"),
        Option("samples", PAPER_SCHEDULE["samples"], "rotations sampled per level: the first level spreads them "
                                                     "over the rotations within max_angle, later levels perturb the "
                                                     "kept candidates (the first entry must be >= 1)",
               kind="ints", low=0),
        Option("perturbation", PAPER_SCHEDULE["perturbation"], "half-width of the uniform perturbation of each "
                                                               "Euler angle, one per level transition",
               unit="degrees", kind="floats", low=0),
        Option("keep", PAPER_SCHEDULE["keep"], "best candidates carried to the next level (re-evaluated there "
                                               "unchanged), one per level transition", kind="ints", low=1),
        Option("overlap", 0.5, "minimum overlap fraction γ: shifts whose mask overlap is below γ × its maximum are "
                               "not considered", low=0, low_open=True, high=1),
        Option("epsilon", 1e-5, "NGF ε for intensities scaled to [0, 1] (each image by its min/max inside its mask)",
               low=0, low_open=True),
        Option("squared", True, "squared NGF dot product (invariant to contrast inversion, for multimodal pairs); "
                                "off: the signed dot product", kind="bool"),
        Option("max_angle", 180.0, "first-level rotations within ± this angle (2-D: the angle; 3-D: all of SO(3) at "
                                   "180, else each Euler angle)", unit="degrees", low=0, low_open=True, high=180),
        Option("spacing", None, "working-grid spacing at shrink factor 1", unit="mm", low=0, low_open=True,
               default_text="the coarser of the two images' finest spacings"),
        Option("refine", True, "sub-voxel refinement of the final shift by a parabola through the peak of the "
                               "similarity map", kind="bool"),
        Option("polish", (), "steps of an optional parabolic pattern search on the Euler angles at the last level "
                             "(e.g. 2 0.5)", unit="degrees", kind="floats", low=0, low_open=True,
               default_text="none"),
        shared("dtype", help="precision of the similarity measure"),
        shared("seed", help="seed of the rotation sampling and perturbations (same inputs + seed ⇒ the same "
                            "result)"),
        Option("workers", None, "threads of the FFTs (scipy.fft)", kind="int", low=1,
               default_text="the numba thread count (NUMBA_NUM_THREADS or all cores)"),
        shared("threads"),
        shared("memory_limit"),
        shared("time_limit"),
        shared("device"),
        shared("backend", help="kernel implementation of resampling, smoothing and gradients"),
        shared("progress"),
        shared("callback", help="receives classreg.Event objects (one iteration per evaluated rotation, metric = "
                                "its best CSNGF score, higher is better); raise classreg.StopRegistration to stop "
                                "and keep the best so far"),
    ),
)
