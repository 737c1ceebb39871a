"""The options of ``register_lddmm``, declared once (see :mod:`classreg.options`)."""
from __future__ import annotations

from ...options import Declaration, Option, shared


def _report(res) -> str:
    m = res.metrics
    return (f"lddmm: geodesic length {m['geodesic_length']:.4g}, SSD {m['ssd_before']:.4g} → {m['ssd_after']:.4g}, "
            f"min det J {m['min_det']:.3g}, {m['time_steps']} time steps, {res.timings['total']:.1f} s; "
            f"{res.stop_reason}")


OPTIONS = Declaration(
    name="lddmm",
    summary="LDDMM by geodesic shooting of the initial momentum (adjoint gradient, L-BFGS)",
    description="Register MOVING to FIXED with register_lddmm and write the warped image, the transform (fixed → "
                "moving displacement field, chained with --init) and its inverse (both integrated along the flow), "
                "extras.npz (the initial momentum P0), params.json, history.csv, result.json and a QC PNG into OUT.",
    report=_report,
    options=(
        shared("init", help="initial fixed → moving transform (an Affine or Chain of affines; a transform file on the "
                            "command line); the deformation is estimated on top of it, T = init ∘ φ₁⁻¹"),
        shared("fixed_mask", help="the data term counts only inside this mask of the fixed image"),
        shared("moving_mask", help="the data term counts only where this mask of the moving image, sampled through "
                                   "the map, is set (differentiated with ssd)"),
        shared("metric", default="auto", choices=("auto", "lncc", "ssd", "mi"),
               help="data term: 'lncc' (local normalised correlation, (vol/σ²)·cost), 'ssd' ((1/2σ²)‖I₁ − J‖², "
                    "same-contrast pairs), 'mi' (Mattes mutual information, (vol/σ²)·(−MI), any contrasts; CPU only) "
                    "or 'auto': 'lncc' when both images are on one intensity scale, else 'mi' ('lncc' on the "
                    "device)"),
        shared("shrink_factors"),
        shared("smoothing_sigmas"),
        shared("iterations", default=(40, 30, 20), help="L-BFGS iterations per pyramid level"),
        Option("kernel", "gaussian", "RKHS kernel K: unit-sum Gaussian of kernel_sigma, or the Sobolev kernel "
                                     "(Id − alpha Δ)^(−order)", kind="str", choices=("gaussian", "sobolev")),
        Option("kernel_sigma", None, "σ of the Gaussian kernel; several σ (method 'full' only): the multi-scale "
                                     "kernel, their equally weighted sum (Risser et al. 2011)", unit="mm",
               kind="floats", low=0, low_open=True,
               default_text="4.5 × the largest spacing ('bandlimited'), 3 × ('full')"),
        Option("alpha", None, "α of the Sobolev kernel", unit="mm²", low=0, low_open=True,
               default_text="(2 × the largest spacing)²"),
        Option("order", 2.0, "power s of the Sobolev kernel", low=0, low_open=True),
        Option("data_sigma", None, "σ of the data term (ssd: normalised intensities; lncc, mi: units of the "
                                   "correlation cost, of MI in nats); smaller: closer matching, longer geodesic, "
                                   "stiffer flow", low=0, low_open=True,
               default_text="per metric: lncc and ssd 0.05, mi 0.11"),
        Option("n_steps", None, "time steps of the geodesic at the finest level (the minimum: raised while "
                                "δt·max‖Dv‖ exceeds 0.3 ('bandlimited') or 0.1 ('full'); coarse levels start from "
                                "half)", kind="int", low=1, default_text="5 ('bandlimited'), 10 ('full')"),
        Option("max_steps", None, "upper bound of the adaptive time steps (at least n_steps)", kind="int", low=1,
               default_text="4 × n_steps"),
        Option("tol", 1e-5, "a level stops when the relative energy decrease of an iteration is at most tol", low=0),
        Option("lncc_radius", None, "LNCC window radius (at least one voxel of each level)", unit="mm", low=0,
               low_open=True, default_text="2 × the largest spacing"),
        Option("intensity", "auto", "'joint': both images scaled by the fixed image's 0.5-99.5 percentiles; 'match': "
                                    "histogram-match the moving image first; 'auto': 'joint' when both are on one "
                                    "intensity scale, else 'match'", kind="str", choices=("auto", "match", "joint")),
        Option("method", "bandlimited", "'bandlimited': the initial velocity on the low Fourier frequencies where "
                                        "K̂ ≥ cutoff, EPDiff integrated there (FLASH), the map traced on the map grid; "
                                        "'full': the scalar momentum P₀ on the voxel grid", kind="str",
               choices=("bandlimited", "full")),
        Option("cutoff", 0.2, "bandlimited: frequencies where the kernel's Fourier transform is below this fraction "
                               "of its peak are dropped", low=0, high=1, low_open=True, high_open=True),
        Option("map_spacing", None, "bandlimited: spacing of the grid on which the map is traced", unit="mm", low=0,
               low_open=True, default_text="kernel_sigma (Gaussian), √alpha (Sobolev); never below the voxel"),
        Option("min_det_j", 0.05, "bandlimited: floor of the det J of the map on the voxel grid: trial shots that "
                                  "go below it are rejected by the line search, a result below it is scaled down "
                                  "(0: only no folding)", low=0, high=1, high_open=True),
        Option("return_trajectory", False, "keep the geodesic I_t and v_t (t = k/n_t) in the result's extras",
               kind="bool"),
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
