"""The options of ``register_vp``, declared once (see :mod:`classreg.options`)."""
from __future__ import annotations

from ...options import Declaration, Option, shared


def _report(res) -> str:
    m = res.metrics
    return (f"vp: loss ratio {m['loss_ratio']:.4g}, min det J {m['min_det_j']:.3g}, {m['regrids']} regrid(s), "
            f"{res.timings['total']:.1f} s; {res.stop_reason}")


OPTIONS = Declaration(
    name="vp",
    summary="variational principle: deformation with prescribed Jacobian determinant and curl (Zhou & Liao)",
    description="Register MOVING to FIXED with register_vp (Δφ = ∇f − ∇×g, f = j_min + f̂²) and write the warped "
                "image, the transform and its inverse, params.json, history.csv, result.json and a QC PNG into OUT.",
    report=_report,
    options=(
        shared("init"),
        shared("fixed_mask", help="the loss is summed only inside this mask of the fixed image"),
        shared("metric", default="auto", choices=("auto", "ssd", "mi"),
               help="data term: 'ssd' (the paper's), 'mi' (Mattes mutual information below its largest value log "
                    "32; CPU only) or 'auto': 'ssd' when both images are on one intensity scale, else 'mi' ('ssd' "
                    "on the device)"),
        shared("shrink_factors"),
        shared("smoothing_sigmas"),
        shared("iterations", help="L-BFGS iteration cap per pyramid level (over all regridding rounds)",
               default_text="ssd: 15 15 15; mi: 10 10 10"),
        Option("j_min", 0.5, "lower bound of the Jacobian-determinant control f = j_min + f̂² (not of det J itself)",
               low=0),
        Option("regrid_det", 0.5, "regrid (compose the map, reset the controls) when min det J of the current "
                                  "round falls below this", low=0, low_open=True),
        Option("det_floor", 0.05, "min det J (central differences) the result keeps: a trial step or a level "
                                  "transfer whose composed map has min det J at or below this is rejected",
               low=0, low_open=True),
        Option("control_sigma", None, "σ of the Gaussian K that preconditions the controls (f̂ = f̂₀ + K c_f, "
                                      "g = K c_g; the optimiser works on c): the smoothness of the map; 0 turns "
                                      "it off; scales with the level's shrink factor", unit="mm", low=0,
               default_text="ssd: 3 × the smallest spacing; mi: 0"),
        Option("inverse", "newton", "how the inverse is built: 'newton' (per-round Newton inverses, corrected "
                                    "against the final map) or 'vp' (the paper's VP grid generator on the "
                                    "prescribed det J and curl of the inverse)", kind="str", choices=("newton", "vp")),
        Option("max_regrids", 30, "regridding rounds per level at most", kind="int", low=0),
        Option("pad", 8, "nodes of edge-replicated padding on every side (the pinned Dirichlet boundary is moved "
                         "off the anatomy)", kind="int", low=1),
        Option("tol", 1e-6, "L-BFGS stops when the relative loss decrease per iteration is below tol", low=0),
        Option("intensity", "match", "'match': map the moving histogram onto the fixed one, then scale both by the "
                                     "fixed image's 0.5-99.5 percentiles; 'joint': only that common scaling",
               kind="str", choices=("match", "joint")),
        shared("dtype"),
        shared("seed", help="recorded for reproducibility (the algorithm is deterministic)"),
        shared("threads"),
        shared("memory_limit"),
        shared("time_limit"),
        shared("device"),
        shared("backend"),
        shared("progress"),
        shared("callback"),
    ),
)
