"""The options of ``register_points``, declared once (see :mod:`classreg.options`)."""
from __future__ import annotations

import math

from ...options import Declaration, Option, shared


def _auto_or_float(text):
    """Command-line value of a length or variance option: 'auto' or a number."""
    return "auto" if str(text).strip().lower() == "auto" else float(text)


def _report(res) -> str:
    m = res.metrics
    return (f"points ({res.params['method']}): sigma {m['sigma_mm']:.4g} mm after {m['iterations']} iterations, "
            f"{res.timings['total']:.1f} s; {res.stop_reason}")


OPTIONS = Declaration(
    name="points",
    summary="BCPD / multi-organ BCPD point-set registration (source = moving, target = fixed)",
    description="Register SOURCE points onto TARGET points with register_points. Point files: .txt/.csv as in BCPD "
                "(N rows of D tab-, comma- or space-separated mm coordinates; a 4th column holds an organ label), "
                ".npy, or .npz ('points', optional 'labels'). Writes moved_source.<ext> (the source mapped into "
                "target space), transform.npz, params.json, history.csv and result.json into OUT.",
    inputs=("source", "target"),
    report=_report,
    options=(
        Option("source_labels", None, "organ label of every source point (integers; give both label sets or "
                                      "neither); on the command line a point file whose rows are the labels",
               kind="array", default_text="the file's label column, else one organ (plain BCPD)"),
        Option("target_labels", None, "organ label of every target point (each one of the source labels)",
               kind="array", default_text="the file's label column, else one organ (plain BCPD)"),
        Option("mode", "nonrigid", "'nonrigid': s R (y + v(y)) + t; 'similarity': s R y + t; 'rigid': R y + t",
               kind="str", choices=("nonrigid", "similarity", "rigid")),
        Option("deformation", "auto", "Λ: prior variance of each displacement coordinate (BCPD's 1/λ); a number, or "
                                     "from Python one per organ (sorted label values) or a dict {label: value}; "
                                     "'auto': (0.2 r)², r the source's RMS radius", unit="mm²", kind="object",
               cli_parse=_auto_or_float, default_text="auto: (0.2 × the source's RMS radius)²"),
        Option("bandwidth", "auto", "B: coherence length of the displacement prior (BCPD's β); a number, or from "
                                   "Python one per organ or a dict {label: value}; 'auto': the source's RMS radius",
               unit="mm", kind="object", cli_parse=_auto_or_float, default_text="auto: the source's RMS radius"),
        Option("fine_deformation", "auto", "Λ_f: prior variance of the fine scale of the displacement (a second, "
                                           "tapered Gaussian kernel added to the first; 0: none); 'auto': h², h the "
                                           "source's mean nearest-neighbour spacing, when deformation and bandwidth "
                                           "are 'auto', else 0", unit="mm²", kind="object", cli_parse=_auto_or_float,
               default_text="auto: h² with automatic deformation and bandwidth, else 0"),
        Option("fine_bandwidth", "auto", "β_f: bandwidth of the fine scale; 'auto': 1.5 h", unit="mm", kind="object",
               cli_parse=_auto_or_float, default_text="auto: 1.5 × the source's mean nearest-neighbour spacing"),
        Option("coherence", "organ", "inter-organ coherence S: 'organ' (identity: organs deform independently), "
                                     "'global' (all ones) or, from Python, a symmetric (L, L) matrix in [0, 1] with "
                                     "unit diagonal",
               kind="object", cli_parse=str),
        Option("label_transition", None, "U[l, l'] = P(target label l | source organ l'): an (L, L) matrix, or a "
                                          "rate e in [0, 1) of uniform label noise (the command line takes e)",
               kind="object", cli_parse=float, default_text="identity (error-free labels)"),
        Option("lambda_convention", "variance", "how Λ enters the kernel: 'variance' sqrt(Λ_i Λ_j) (G_ii = Λ, "
                                                "BCPD with λ = 1/Λ), 'product' Λ_i Λ_j (as printed in MO-BCPD eq. 4)",
               kind="str", choices=("variance", "product")),
        Option("omega", 0.0, "outlier probability ω (uniform outliers over the target's bounding box)", low=0,
               high=1, high_open=True),
        Option("kappa", math.inf, "Dirichlet concentration κ of the mixing weights (inf: fixed weights 1/M)", low=0,
               low_open=True),
        Option("gamma", 1.0, "scale of the initial σ: σ₀ = γ × the RMS distance over all source-target pairs", low=0,
               low_open=True),
        Option("tol", None, "stop when σ < tol or |Δσ| < tol (after min_iter iterations)", unit="mm", low=0,
               low_open=True, default_text="max(1e-4 × the target's RMS radius, 1e-2 × the source's mean "
                                           "nearest-neighbour spacing)"),
        Option("max_iter", 500, "variational-Bayes iteration cap", kind="int", low=1),
        Option("min_iter", 30, "iterations before the convergence test applies", kind="int", low=0),
        Option("rank", "auto", "rank K of the kernel per kernel block ('full': exact M×M kernel, Cholesky; K: top-K "
                               "eigenpairs and the Woodbury identity; 'auto': full up to 1500 points per block, "
                               "else 100; with a fine scale full up to 500, else 50 Nyström eigenpairs of the coarse "
                               "scale plus the sparse fine scale)", kind="int_or_str", choices=("auto", "full"),
               low=1),
        Option("lowrank", None, "how the top-K eigenpairs are found: Lanczos ('eigsh') or a Nyström estimate",
               kind="str", choices=("eigsh", "nystrom"), default_text="eigsh up to 3000 points per block, else "
                                                                      "nystrom (with a fine scale: nystrom)"),
        Option("nystrom_samples", None, "landmarks of the Nyström eigenpair estimate", kind="int", low=1,
               default_text="max(300, 3K)"),
        Option("posterior_covariance", True, "use the posterior variances of v in the updates (BCPD's algorithm)",
               kind="bool"),
        Option("truncation", 1e-12, "E-step Gaussian factors below this count as zero (0: exact)", low=0, high=1,
               high_open=True),
        Option("estep", "auto", "E-step sums: 'exact' (truncated, all pairs) or 'auto' (checked grid or Nyström "
                                "estimates while σ is large, exact afterwards)", kind="str", choices=("auto", "exact")),
        Option("estep_landmarks", 300, "J, landmarks of the Nyström E-step (BCPD's -J)", kind="int", low=1),
        Option("estep_tol", 1e-2, "largest probe error accepted from a grid or Nyström E-step", low=0,
               low_open=True),
        Option("estep_precision", "float32", "arithmetic of the exact E-step's pair loop (sums in float64)",
               kind="str", choices=("float32", "float64")),
        Option("pd_guard", "jitter", "a kernel that is not positive semi-definite gets the smallest diagonal "
                                     "jitter that fixes it ('jitter') or raises ('raise')", kind="str",
               choices=("jitter", "raise")),
        Option("normalize", True, "work on coordinates centred on the target centroid and divided by its RMS radius",
               kind="bool"),
        Option("memory_budget_mb", 2048, "largest dense array allowed (kernel block, E-step block)", unit="MB",
               low=0, low_open=True),
        Option("reference", None, "a target-space image grid (an image file on the command line), kept as "
                                  "result.reference so that result.apply(image) resamples a source-space image onto "
                                  "it", kind="image", default_text="none"),
        shared("seed", help="seed of every random choice (kernel and E-step Nyström landmarks, probes, the eigsh "
                            "start vector): same inputs + seed ⇒ the same output, for any thread count"),
        shared("threads"),
        shared("time_limit"),
        shared("device", help="where the VB loop runs: 'cpu', 'cuda' or 'cuda:N' (E- and M-step on the device, "
                              "the posterior copied back once)"),
        shared("backend", help="E-step kernel implementation"),
        shared("progress"),
        shared("callback", help="receives classreg.Event objects, one per VB iteration (metric: σ in mm); raise "
                                "classreg.StopRegistration to stop early"),
    ),
)
