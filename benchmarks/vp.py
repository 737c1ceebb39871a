"""The two 2-D experiments of Zhou & Liao (METHODS.md §6.4) on comparable data: ``python -m benchmarks.vp``.

* ``jtov``: the letter J (fixed) and V (moving) rendered at 128² with matplotlib's bundled DejaVu Sans text path
  (no download, no randomness), multi-resolution. Dice of the binary masks (> 0.5).
* ``brain``: the brain2d pair (dipy T1 coronal slice ← MNI152 1 mm coronal slice, SimpleITK affine pre-alignment;
  DATA.md) shrunk to 128² (2× block mean), regridding. Dice of the foregrounds (> 2 % of each image's maximum).

Prints one JSON object per case: loss ratio, min det J, % det J ≤ 0, Dice before/after; the inverse's own loss ratio,
min det J and Dice (the fixed image warped onto the moving one) and the inverse-composition errors.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def letter(ch: str, n: int = 128) -> np.ndarray:
    """Binary image of the glyph ``ch`` (DejaVu Sans, bundled with matplotlib) filling ~70 % of an n² grid."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath

    tp = TextPath((0, 0), ch, size=1.0, prop=FontProperties(family="DejaVu Sans", weight="bold"))
    v = tp.vertices
    lo, hi = v.min(0), v.max(0)
    scale = 0.7 * n / (hi - lo).max()
    centre = (lo + hi) / 2
    path = Path((v - centre) * scale + n / 2, tp.codes)
    yy, xx = np.mgrid[:n, :n]
    pts = np.stack([xx.ravel() + 0.5, (n - 1 - yy.ravel()) + 0.5], axis=1)  # y up in the glyph, down in the array
    return path.contains_points(pts).reshape(n, n).astype(np.float32)


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2 * np.sum(a & b) / max(1, a.sum() + b.sum()))


def _report(name, fixed, moving, res, fg, t):
    import classreg as cr
    from classreg.evaluate import jacobian_stats

    warped = cr.resample(moving, res.transform, reference=fixed).data
    # inverse composition: the fixed image sent to the moving grid by the inverse and back by the transform
    back = cr.resample(cr.resample(fixed, res.inverse, reference=moving), res.transform, reference=fixed).data
    # the inverse on its own (METHODS.md §6.4, "inverse φ⁻¹" rows): the fixed image warped onto the moving one
    inv_warped = cr.resample(fixed, res.inverse, reference=moving).data
    inv_jac = jacobian_stats(res.inverse, reference=moving)
    ssd0 = float(np.sum((fixed.data - moving.data) ** 2))
    m = res.metrics
    out = dict(case=name, loss_ratio=m["loss_ratio"], min_det_j=m["min_det_j"],
               pct_det_j_nonpositive=m["pct_det_j_nonpositive"], sd_log_j=m["sd_log_j"], regrids=m["regrids"],
               dice_before=dice(fg(fixed.data), fg(moving.data)), dice_after=dice(fg(fixed.data), fg(warped)),
               inverse_loss_ratio=float(np.sum((inv_warped - moving.data) ** 2)) / max(1e-12, ssd0),
               inverse_min_det_j=inv_jac["min_det"], inverse_pct_det_j_nonpositive=inv_jac["percent_nonpositive"],
               inverse_dice=dice(fg(moving.data), fg(inv_warped)),
               inverse_consistency_mm=m["inverse_consistency_mm"],
               inverse_left_consistency_mm=m["inverse_left_consistency_mm"],
               inverse_roundtrip_rms=float(np.sqrt(np.mean((back - fixed.data) ** 2)) /
                                           max(1e-12, float(fixed.data.max() - fixed.data.min()))),
               seconds=round(t, 2), stop_reason=res.stop_reason)
    print(json.dumps(out))
    return out


def run_jtov(**kw):
    import classreg as cr

    fixed = cr.Image(letter("J"), spacing=(1.0, 1.0))
    moving = cr.Image(letter("V"), spacing=(1.0, 1.0))
    t = time.perf_counter()
    kw.setdefault("control_sigma", 0.0)  # the paper's controls, not the library's smoothed ones
    res = cr.register_vp(fixed, moving, shrink_factors=(8, 4, 2, 1), iterations=(200, 200, 200, 200),
                          metric="ssd", intensity="joint", **kw)  # binary, same scale; the paper's SSD
    return _report("jtov", fixed, moving, res, lambda a: a > 0.5, time.perf_counter() - t)


def run_brain(**kw):
    import classreg as cr
    from classreg.demo import _brain_pair_2d, affine_prealign

    c = _brain_pair_2d()
    aff = affine_prealign(c["fixed"], c["moving"], fixed_mask=c["fixed_mask"])
    moving = cr.resample(c["moving"], aff, reference=c["fixed"])

    def shrink(img):
        a = np.asarray(img.data, dtype=np.float32)
        a = a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2]
        a = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean(axis=(1, 3))
        return cr.Image(a / max(1e-12, float(a.max())), spacing=(2.0, 2.0))

    fixed, moving = shrink(c["fixed"]), shrink(moving)

    def fg(a):
        return a > 0.02 * float(a.max())

    t = time.perf_counter()
    # The paper asks only det J > 0: its loss ratio (≤ 0.0605) needs compressions the library's default floor (0.05,
    # issue #22's plausibility floor) refuses — 0.110 with it, 0.057 with 0.02 (docs/notes/vp.md, session 21).
    kw.setdefault("det_floor", 0.02)
    kw.setdefault("control_sigma", 0.0)  # the paper's controls, not the library's smoothed ones
    res = cr.register_vp(fixed, moving, shrink_factors=(2, 1), iterations=(200, 400),
                          metric="ssd", intensity="joint", **kw)  # both scaled to max 1 above; the paper's SSD
    return _report("brain", fixed, moving, res, fg, time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=["jtov", "brain"], choices=["jtov", "brain"])
    args = ap.parse_args(argv)
    for name in args.cases:
        {"jtov": run_jtov, "brain": run_brain}[name]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
