"""The options of ``register_metamorphosis``, declared once (see :mod:`classreg.options`)."""
from __future__ import annotations

from ...options import Declaration, Option, shared


def _report(res) -> str:
    m = res.metrics
    return (f"metamorphosis: SSD {m['ssd_before']:.4g} → {m['ssd_after']:.4g} (deformation only "
            f"{m['ssd_deformation']:.4g}), added intensity {m['added_intensity']:.3g}, min det J {m['min_det']:.3g}, "
            f"{m['time_steps']} time steps, {res.timings['total']:.1f} s; {res.stop_reason}")


OPTIONS = Declaration(
    name="metamorphosis",
    summary="weighted metamorphosis: LDDMM plus an intensity source inside a (growing) mask",
    description="Register MOVING (e.g. a healthy template) to FIXED (e.g. a scan with a lesion) with "
                "register_metamorphosis: a geodesic deformation plus intensity added only where the mask M_t is "
                "set (no mask: classical metamorphosis, everywhere). Writes the deformation (fixed → moving "
                "displacement field, chained with --init) and its inverse, the deformation-only warped image, "
                "final_image, added_intensity and the residuals z_t, params.json, history.csv, result.json and a QC "
                "PNG with the trajectory into OUT.",
    report=_report,
    options=(
        shared("init", help="initial fixed → moving transform (an Affine or Chain of affines; a transform file on the "
                            "command line); the deformation is estimated on top of it"),
        Option("mask", None, "where intensity may be added (the lesion), on the fixed image's grid; values in [0, 1] "
                             "(None: everywhere, classical metamorphosis)", kind="image"),
        Option("mask_evolution", "grow", "how the mask evolves along the geodesic: 'grow' (M_t from an LDDMM "
                                         "registration of a small ball at the mask's centre to the mask, as François "
                                         "et al.), 'constant' (M_t = mask), or (Python) a sequence of masks, "
                                         "M_0 ... M_1 evenly spaced in time", kind="object", cli_parse=str),
        Option("mu", 0.2, "μ: weight of the intensity source in ∂I/∂t = −⟨∇I, v⟩ + μ M_t z (0: LDDMM)", low=0),
        Option("rho", 1.0, "ρ: weight of the residual norm ρ‖z‖²_M against ‖v‖²_V; the path depends on ρ/μ², the "
                           "cost of adding intensity (smaller: more intensity, less deformation)", unit="mm²",
               low=0, low_open=True),
        shared("fixed_mask", help="the data term counts only inside this mask of the fixed image"),
        shared("moving_mask", help="the data term counts only where this mask of the moving image, sampled through "
                                   "the map, is set"),
        shared("metric", default="ssd", help="data term: 'ssd' ((1/2σ²)‖I₁ − J‖², the method's) or 'lncc'"),
        shared("shrink_factors"),
        shared("smoothing_sigmas"),
        shared("iterations", default=(40, 40, 30), help="L-BFGS iterations per pyramid level"),
        Option("kernel_sigma", None, "σ of the Gaussian kernel K of the velocity; several σ: the multi-scale "
                                     "kernel, their equally weighted sum (Risser et al. 2011; the paper's toy: 5 15)",
               unit="mm", kind="floats", low=0, low_open=True, default_text="3 × the largest spacing"),
        Option("data_sigma", 0.05, "σ of the data term (ssd: normalised intensities); smaller: closer matching",
               low=0, low_open=True),
        Option("n_steps", 10, "time steps of the geodesic at the finest level (the minimum: raised while "
                              "δt·max‖Dv‖ exceeds 0.1)", kind="int", low=1),
        Option("max_steps", None, "upper bound of the adaptive time steps (at least n_steps)", kind="int", low=1,
               default_text="4 × n_steps"),
        Option("tol", 1e-5, "a level stops when the relative energy decrease of an iteration is at most tol", low=0),
        Option("intensity", "auto", "'joint': both images scaled by the fixed image's 0.5-99.5 percentiles; 'match': "
                                    "histogram-match the moving image first; 'auto': 'joint' when both are on one "
                                    "intensity scale, else 'match'", kind="str", choices=("auto", "match", "joint")),
        Option("return_trajectory", False, "keep the images I_t (t = k/n_t) in the result's extras", kind="bool"),
        shared("dtype"),
        shared("seed", help="recorded for reproducibility (the algorithm is deterministic: P₀ starts at 0)"),
        shared("threads"),
        shared("memory_limit"),
        shared("time_limit"),
        shared("device", help="where to compute ('cuda': the data stay on the GPU)"),
        shared("backend"),
        shared("progress"),
        shared("callback"),
    ),
)
