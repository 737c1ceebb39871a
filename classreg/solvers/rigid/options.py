"""The options of ``register_rigid``, declared once (see :mod:`classreg.options`)."""
from __future__ import annotations

import numpy as np

from ...options import Declaration, Option, shared

__all__ = ["FAST_3D", "OPTIONS", "PAPER_SCHEDULE", "fast_schedule"]

#: The published schedule (Öfverstedt et al., WBIR 2022): shrink factors d, rotations sampled per level a,
#: perturbation half-widths u (degrees), candidates kept p, Gaussian σ per level (mm). Used with schedule="paper".
PAPER_SCHEDULE = {"shrink_factors": (4, 2, 2, 1), "samples": (5000, 3000, 300, 0),
                  "perturbation": (10.0, 3.0, 0.0), "keep": (20, 3, 1), "smoothing_sigmas": (5.0, 3.0, 2.0, 1.5)}

#: The fast schedule in 3-D (``schedule="fast"``): two coarse levels (8 and 4 × the working spacing), 500 rotations
#: over SO(3), the 10 best perturbed by ±8° (60 rotations); the local refinement does the rest.
FAST_3D = {"shrink_factors": (8, 4), "samples": (500, 60), "perturbation": (8.0,), "keep": (10,),
           "smoothing_sigmas": (4.0, 2.0)}


def fast_schedule(fixed, spacing: float) -> dict:
    """The default search (``schedule="fast"``): a coarse search only, refined locally afterwards.

    2-D: levels at shrink 8 and 4 (σ 4, 2 mm); the first level samples the angle with a step that moves the
    fixed image's corners (radius r = half its diagonal, mm) by 4 coarse voxels (h = 8 × ``spacing``):
    ``samples[0] = ceil(π r / (2 h))``, clipped to [36, 360] (221×257 at 1 mm: 36 rotations, 10°); the 6 best are
    perturbed by ±5° (12 rotations) at shrink 4. The local refinement converges from anywhere within the ±5°
    of the first level's grid (docs/notes/rigid.md: 40 random ±180° trials, all within 0.11 mm, as with the
    earlier 2-voxel step and 24 perturbations, at half the search's time). 3-D: :data:`FAST_3D`.
    """
    if fixed.ndim == 3:
        return dict(FAST_3D)
    extent = np.asarray(fixed.shape, float) * np.asarray(fixed.spacing, float)
    radius = 0.5 * float(np.linalg.norm(extent))
    first = int(np.clip(np.ceil(np.pi * radius / (16.0 * spacing)), 36, 360))
    return {"shrink_factors": (8, 4), "samples": (first, 12), "perturbation": (5.0,), "keep": (6,),
            "smoothing_sigmas": (4.0, 2.0)}


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
        Option("schedule", "fast", "search schedule: fast (a coarse search sized to the image, then the local "
                                   "refinement local_refine) or paper (Öfverstedt et al.'s four levels, 5000 "
                                   "rotations first); shrink_factors, smoothing_sigmas, samples, perturbation and "
                                   "keep override its entries", kind="str", choices=("fast", "paper")),
        Option("local_refine", "auto", "local refinement after the search: mi (register_affine's rigid stage, "
                                       "Mattes MI + ASGD, from the search's transform), none (the search's result) "
                                       "or auto (mi with schedule fast and no search entry given, else none)",
               kind="str", choices=("auto", "mi", "none")),
        shared("fixed_mask", help="where the similarity is evaluated on the fixed image (an Image or array on its "
                                  "grid)"),
        shared("moving_mask", help="where the similarity is evaluated on the moving image (on its own grid)"),
        shared("shrink_factors", default=None, default_text="from schedule",
               help="pyramid shrink factors d, coarsest first, relative to the working spacing (see spacing)"),
        shared("smoothing_sigmas", default=None, default_text="from schedule",
               help="Gaussian σ applied to both images before each level's resampling (a scalar is repeated)"),
        Option("samples", None, "rotations sampled per level: the first level spreads them "
                                                     "over the rotations within max_angle, later levels perturb the "
                                                     "kept candidates (the first entry must be >= 1)",
               kind="ints", low=0, default_text="from schedule"),
        Option("perturbation", None, "half-width of the uniform perturbation of each "
                                                               "Euler angle, one per level transition",
               unit="degrees", kind="floats", low=0, default_text="from schedule"),
        Option("keep", None, "best candidates carried to the next level (re-evaluated there "
                             "unchanged), one per level transition", kind="ints", low=1, default_text="from schedule"),
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
        Option("workers", None, "threads of the FFTs (scipy.fft; FFT grids under 2^18 elements use one)",
               kind="int", low=1, default_text="the numba thread count (NUMBA_NUM_THREADS or all cores)"),
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
