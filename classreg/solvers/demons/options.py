"""The options of ``register_demons``, declared once (see :mod:`classreg.options`)."""
from __future__ import annotations

from ...options import Declaration, Option, shared


def _report(res) -> str:
    m = res.metrics
    # the cost the pieces lowered: MI for metric "mi" (its SSD may rise where the contrasts differ), else the SSD
    data = (f"MI {m['mi_before']:.4g} → {m['mi_after']:.4g} nats" if "mi_after" in m
            else f"SSD {m['ssd_before']:.4g} → {m['ssd_after']:.4g}")
    return (f"demons: {m['pieces']} piece(s), {data}, path length {m['path_length']:.4g}, "
            f"{res.timings['total']:.1f} s; {res.stop_reason}")


OPTIONS = Declaration(
    name="demons",
    summary="symmetric log-domain diffeomorphic demons with broken geodesics",
    description="Register MOVING to FIXED with register_demons and write the warped image, the transform and its "
                "inverse (displacement fields, ITK), params.json, history.csv, result.json and a QC PNG into OUT.",
    report=_report,
    options=(
        shared("init"),
        shared("fixed_mask", help="forces are computed only inside this mask of the fixed image"),
        shared("moving_mask", help="forces are computed only where the warped moving mask is set"),
        shared("metric", default="auto", choices=("auto", "ssd", "lncc", "mi"),
               help="data term: 'auto' ('ssd' when both images are on one intensity scale, else 'mi'), 'ssd' (ESM "
                    "demons force on intensities scaled to [0, 1]), 'lncc' (local normalised correlation, for pairs "
                    "whose intensities differ locally) or 'mi' (Mattes mutual information, 32 bins, for any "
                    "monotone or multimodal intensity relation)"),
        shared("shrink_factors"),
        shared("smoothing_sigmas"),
        shared("iterations", help="iteration cap per pyramid level and piece",
               default_text="ssd: 15 10 5; lncc, mi: 30 20 10"),
        Option("velocity_sigma", None, "σ of the Gaussian smoothing of the velocity after each update "
                                       "(diffusion-like); scales with the level's shrink factor", unit="mm", low=0,
               default_text="ssd: 4.5 × the smallest spacing; lncc: 0.5 mm; mi: 2 × the smallest spacing"),
        Option("update_sigma", None, "σ of the smoothing of each update (fluid-like); scales with the shrink factor",
               unit="mm", low=0, default_text="ssd: 0; lncc: 2 mm; mi: the smallest spacing"),
        Option("max_step", None, "largest update length; scales with the shrink factor", unit="mm", low=0,
               low_open=True, default_text="ssd, lncc: 2 × the smallest spacing; mi: the smallest spacing"),
        Option("bch_terms", 2, "terms of the Baker-Campbell-Hausdorff approximation (2: v + u; 3: + ½[v, u]; "
                               "4: + 1/12 [v, [v, u]])", kind="int", choices=(2, 3, 4)),
        Option("symmetric", None, "symmetric forward/backward update (False: the forward force only, half the cost "
                                  "per iteration)", kind="bool", default_text="ssd: yes; lncc, mi: no"),
        Option("max_pieces", 5, "stationary-velocity pieces of the broken geodesic (1: plain log-demons)",
               kind="int", low=1),
        Option("piece_tol", 0.01, "a further piece is kept only if it lowers the energy by more than this fraction",
               low=0),
        Option("min_det_j", 0.05, "floor of the result's det J on the grid: a piece that would go below it is "
                                  "followed only as far as it keeps the floor (0: only no folding)", low=0, high=1,
               high_open=True),
        Option("tol", 1e-3, "a level ends when the best energy fell by at most tol × |first energy| over the last "
                            "5 iterations", low=0),
        Option("lncc_radius", None, "LNCC window radius at full resolution (at least one voxel)", unit="mm",
               low=0, low_open=True, default_text="4 mm"),
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
