"""Weighted metamorphosis (François et al., WBIR 2022) next to classical metamorphosis and LDDMM:
``python -m benchmarks.metamorphosis [--cases toy mni2d inter2d mni3d] [--toy-size 300]``.

Cases (everything from shipped data or synthetic with a fixed seed):

* ``toy``: the paper's Fig. 2 toy — four ovals (moving) pushed outward by a triangle that appears in the fixed image,
  ``--toy-size`` pixels of 1 mm (paper: 300), defaults (kernel σ 3 px; the paper's multi-scale kernel σ ∈ {5, 15}
  px is ``--kernel-sigma 5 15``, not the default here: at 300² it leaves the ovals 12.7 px short, see
  docs/notes/metamorphosis.md). Mask = the
  triangle dilated by 2 px. Reported: the mean distance from
  each target oval to the nearest oval of the *deformation-only* image (the ovals must be moved by the deformation,
  not repainted), SSD of the final and of the deformation-only image, added intensity outside the mask.
* ``mni2d``: the paper's BraTS experiment rebuilt from the nilearn MNI152 2009a template (2 mm). Moving: the healthy
  axial slice at z = +18 mm (the bodies of the lateral ventricles). Fixed: the same slice with a seeded
  glioblastoma-like lesion beside a ventricle (:func:`tumour_case`: necrotic core, rim, oedema, texture) pasted over
  tissue pushed outward by an area-preserving mass effect that displaces the ventricle. Ventricle labels = the CSF
  (1 − GM − WM > 0.5) deeper than 12 mm inside the brain, pushed by the same map in the fixed image. Mask for
  weighted metamorphosis = the lesion (blob > 0.05) dilated by 2 mm. Reported: ventricle Dice after warping the
  moving labels by the *deformation only*, SSD(final), SSD(deformation-only), min det J, time; five seeded lesions
  (``--seeds``), each row and their mean.
* ``inter2d``: the inter-subject version of ``mni2d`` (:func:`inter_case`), as in the paper (SRI24 template →
  BraTS patient). Moving: the healthy MNI152 slice of ``mni2d``. Fixed: **another subject** -- ITK's T1 subject
  (KmeansTest_T1UCharRaw, skull-stripped with its shipped mask) affinely registered to the template
  (``register_affine``, MI, defaults), intensities scaled so that its white-matter median is the template's, the
  same axial slice, with the same seeded lesion and mass effect as ``mni2d`` (:func:`_lesion`, placed by the same
  rule beside the subject's own ventricles). Ventricle labels: the template's as in ``mni2d``; the subject's from
  its shipped k-means CSF label (3×3×3 majority vote against the label's noise) restricted the same way
  (:func:`_ventricles`), pushed by the same map.
* ``mni3d``: the same in 3-D on the whole 2 mm template (a ball, first seed), with register_lddmm's default
  (band-limited) timed in the same run.

Runs: ``lddmm`` = weighted metamorphosis' engine with μ = 0 (register_lddmm(method="full"), the paper's baseline),
``lddmm_default`` = register_lddmm's default method (band-limited), ``cm`` = classical metamorphosis (no mask),
``wm`` = weighted metamorphosis (mask grown from a ball, the default). Every run uses the solvers' defaults, except
``--rho`` (cm, wm), ``--data-sigma`` (every run) and ``--kernel-sigma`` (every run but ``lddmm_default``).
``--paper-settings`` instead gives each run the settings of the paper's brain notebook mapped to classreg's cost
(:data:`PAPER_SETTINGS`); ``--iterations`` sets the L-BFGS iterations per level of every run.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
from scipy import ndimage

from ._common import markdown_table, peak_rss_mb, write_outputs


# ------------------------------------------------------------------------------------------------ the toy
def toy(n: int = 64, push: float = 5.0):
    """François et al.'s toy (Fig. 2): four ovals (moving) pushed ``push`` px outward by a triangle of intensity 0.8
    that appears in the fixed image. Returns ``(fixed, moving, triangle)`` (Images of 1 mm pixels, boolean array)."""
    from matplotlib.path import Path

    import classreg as cr

    y, x = np.mgrid[0:n, 0:n].astype(float)
    c = n / 2

    def ovals(r):
        img = np.zeros((n, n))
        for ang in (0, 90, 180, 270):
            a = np.deg2rad(ang)
            dy, dx = y - (c + r * np.sin(a)), x - (c + r * np.cos(a))
            rad, tan = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
            img[(rad / (0.045 * n)) ** 2 + (tan / (0.08 * n)) ** 2 <= 1] = 1.0
        return img

    R = 0.2 * n
    verts = [(c + R * np.cos(np.deg2rad(a)), c + R * np.sin(np.deg2rad(a))) for a in (90, 210, 330)]
    tri = Path(verts).contains_points(np.c_[x.ravel(), y.ravel()]).reshape(n, n)
    S = ndimage.gaussian_filter(ovals(0.26 * n), 1.0)
    T = ndimage.gaussian_filter(np.maximum(ovals(0.26 * n + push), 0.8 * tri), 1.0)
    return cr.Image(T.astype(np.float32), (1.0, 1.0)), cr.Image(S.astype(np.float32), (1.0, 1.0)), tri


def oval_centroid_error(img, target, tri) -> float:
    """Mean distance (pixels) from each oval of ``target`` (outside the dilated triangle) to the nearest blob of
    ``img`` (> 0.5)."""
    def cents(a):
        lab, k = ndimage.label(a > 0.5)
        return np.array(ndimage.center_of_mass(a > 0.5, lab, range(1, k + 1))).reshape(-1, 2)

    ct, cw = cents(np.where(ndimage.binary_dilation(tri, iterations=2), 0, target)), cents(img)
    if len(ct) != 4:
        raise ValueError(f"the target should show 4 ovals outside the triangle, found {len(ct)}")
    if len(cw) == 0:
        return float("inf")
    return float(np.mean([np.min(np.hypot(*(cw - p).T)) for p in ct]))


# ------------------------------------------------------------------------------------------------ the tumour
def _ventricles(csf: np.ndarray, brain: np.ndarray, h: float) -> np.ndarray:
    """The lateral ventricles: connected components of CSF > 0.5 deeper than 12 mm inside the brain (which excludes
    the sulcal CSF and the interhemispheric fissure's surface), keeping components of at least 10 % of the largest."""
    deep = ndimage.distance_transform_edt(brain) * h > 12.0
    lab, k = ndimage.label((csf > 0.5) & deep)
    if k == 0:
        raise ValueError("no ventricle found")
    sizes = ndimage.sum(np.ones_like(lab), lab, range(1, k + 1))
    keep = [i + 1 for i, s in enumerate(sizes) if s >= 0.1 * sizes.max()]
    return np.isin(lab, keep)


def _lesion(t: np.ndarray, vent: np.ndarray, gm: np.ndarray, wm: np.ndarray, h: float, *, seed: int) -> dict:
    """Paste a seeded glioblastoma-like lesion with its mass effect into the healthy image ``t`` (2-D or 3-D, pixels
    of ``h`` mm) beside its ventricles ``vent``; ``gm``, ``wm``: boolean masks of ``t``'s grey and white matter.

    The seed draws (BraTS: periventricular, necrotic core, enhancing rim, oedema) the side, a direction within ±40°
    of lateral, the radius of the tumour R ~ U(10, 18) mm, an oedema ring of U(3, 7) mm and the gap between the
    oedema and the ventricle U(2, 10) mm; the lesion is placed along that direction from the centroid of the
    ventricle on that side, past its edge. Intensities (T1): core at the ventricles' median, rim at 0.85 × grey
    matter's, oedema halfway between grey and white matter, ±8 % smooth texture. Returns ``fixed`` (the lesion over
    the pushed tissue), ``fixed_labels`` (``vent`` pushed by the same map), ``mask`` (lesion dilated by 2 mm) and
    ``description``.
    """
    n = t.ndim
    rng = np.random.default_rng(seed)
    side = 1.0 if rng.random() < 0.5 else -1.0
    radius, oedema, gap = rng.uniform(10, 18), rng.uniform(3, 7), rng.uniform(2, 10)
    ang = np.deg2rad(rng.uniform(-40, 40))
    grid = np.stack(np.meshgrid(*[np.arange(s) * h for s in t.shape], indexing="ij"))
    # from the centroid of the ventricle on that side, march along the direction to the ventricle's edge
    mid = 0.5 * (t.shape[-1] - 1) * h
    half = vent & (side * (grid[-1] - mid) > 0)
    p = np.array(ndimage.center_of_mass(half)) * h
    direction = np.zeros(n)
    direction[-1], direction[-2] = side * np.cos(ang), np.sin(ang)
    while ndimage.map_coordinates(half.astype(float), (p / h)[:, None], order=0)[0] > 0.5:
        p = p + 0.5 * h * direction
    outer = radius + oedema
    centre = p + (gap + outer) * direction
    d = grid - centre.reshape((-1,) + (1,) * n)
    r = np.sqrt((d ** 2).sum(0))
    # mass effect: tissue at r0 moves to r = (r0^n + R^n)^(1/n) (area/volume kept outside the lesion), tapered with
    # distance; the fixed image samples the healthy one at r0 = r - s(r)
    s = np.maximum(r - np.power(np.maximum(r ** n - outer ** n, 0.0), 1.0 / n), 0.0)
    s *= np.exp(-0.5 * (np.maximum(r - outer, 0.0) / 25.0) ** 2)
    src = grid - s * d / np.maximum(r, 1e-6)
    pushed = ndimage.map_coordinates(t, src / h, order=1, mode="nearest")
    vent_f = ndimage.map_coordinates(vent.astype(float), src / h, order=0, mode="nearest") > 0.5
    level = {k: float(np.median(t[m])) for k, m in (("csf", vent), ("gm", gm), ("wm", wm))}
    texture = ndimage.gaussian_filter(rng.normal(size=t.shape), 1.5)
    texture /= np.abs(texture).max()
    soft = lambda edge: 1.0 / (1.0 + np.exp((r - edge) / (0.5 * h)))  # noqa: E731
    core_r = 0.55 * radius
    inten = (soft(core_r) * level["csf"] + (soft(radius) - soft(core_r)) * 0.85 * level["gm"]
             + (1 - soft(radius)) * 0.5 * (level["gm"] + level["wm"])) * (1 + 0.08 * texture)
    blob = soft(outer)
    fixed = (1.0 - blob) * pushed + blob * inten
    mask = ndimage.binary_dilation(blob > 0.05, iterations=max(1, int(round(2.0 / h))))
    desc = (f"seed {seed}: tumour radius {radius:.1f} mm, oedema {oedema:.1f} mm, gap to the ventricle {gap:.1f} mm, "
            f"side {'+x' if side > 0 else '-x'}, {np.rad2deg(ang):+.0f}° from lateral")
    return {"fixed": fixed, "fixed_labels": vent_f, "mask": mask, "description": desc}


def _template(resolution: float) -> dict:
    """The MNI152 2009a T1 at ``resolution`` mm (``image``; float64 array ``t``), its ventricles (:func:`_ventricles`
    of the CSF map 1 − GM − WM), grey/white matter masks (GM > 0.7, WM > 0.9) and pixel size ``h``."""
    from classreg.data import mni152

    t1 = mni152("t1", resolution=resolution)
    gm = mni152("gm", resolution=resolution).data / 255.0
    wm = mni152("wm", resolution=resolution).data / 255.0
    t = t1.data.astype(np.float64)
    brain = t > 0.02 * t.max()
    csf = np.where(brain, 1.0 - gm - wm, 0.0)
    h = float(t1.spacing[0])
    return {"image": t1, "t": t, "vent": _ventricles(csf, brain, h), "gm": gm > 0.7, "wm": wm > 0.9, "h": h}


def _axial(image, z_mm: float = 18.0) -> int:
    """Index (first array axis) of the axial slice at MNI z = ``z_mm`` (+18 mm: the bodies of the lateral
    ventricles)."""
    return round((z_mm - float(image.origin[2])) / float(image.spacing[2]))


def tumour_case(ndim: int = 2, *, seed: int = 0, resolution: float = 2.0) -> dict:
    """The MNI152 tumour pair (module docstring): ``fixed`` (tumour, mass effect), ``moving`` (healthy), their
    ventricle labels, the tumour ``mask`` (fixed grid), ``provenance``. The lesion: :func:`_lesion`."""
    import classreg as cr
    from classreg.data import mni152_file

    tp = _template(resolution)
    t, vent, gm, wm, h = tp["t"], tp["vent"], tp["gm"], tp["wm"], tp["h"]
    if ndim == 2:
        z = _axial(tp["image"])
        t, vent, gm, wm = t[z], vent[z], gm[z], wm[z]
    les = _lesion(t, vent, gm, wm, h, seed=seed)
    where = f", axial slice z={z}" if ndim == 2 else ""
    prov = f"nilearn {mni152_file('t1').name} ({resolution} mm{where}); {les['description']}"
    sp = (h,) * t.ndim
    return {"fixed": cr.Image(les["fixed"].astype(np.float32), sp), "moving": cr.Image(t.astype(np.float32), sp),
            "fixed_labels": les["fixed_labels"], "moving_labels": vent, "mask": les["mask"].astype(np.float32),
            "provenance": prov}


@functools.lru_cache(maxsize=2)
def _subject_on_template(resolution: float = 2.0) -> dict:
    """ITK's T1 subject (``classreg.data.brain_pair_3d``: KmeansTest_T1UCharRaw skull-stripped with its shipped
    mask, k-means labels 4/5/6 → CSF/GM/WM) brought onto the MNI152 grid by ``register_affine`` (Mattes MI, its
    defaults; template fixed, subject moving), with the template's arrays (:func:`_template`). The subject's
    intensities are scaled by one factor so that its white-matter median equals the template's; its ventricles are
    its CSF label (3×3×3 majority vote) restricted by :func:`_ventricles` within its own brain mask; its grey and
    white matter masks are the GM and WM labels. Cached per process (the affine registration takes a few CPU
    seconds)."""
    import classreg as cr
    from classreg.data import brain_pair_3d

    c = brain_pair_3d(resolution=resolution)
    tp = _template(resolution)
    aff = cr.register_affine(c["fixed"], c["moving"])
    moved = cr.resample(c["moving"], aff.transform, reference=c["fixed"]).data.astype(np.float64)
    lab = cr.resample(c["moving_labels"], aff.transform, reference=c["fixed"], interpolation="label").data
    brain = cr.resample(c["moving_mask"], aff.transform, reference=c["fixed"], interpolation="label").data > 0
    gm, wm = (lab == 2) & brain, (lab == 3) & brain
    moved = np.where(brain, moved, 0.0) * (np.median(tp["t"][tp["wm"]]) / np.median(moved[wm]))
    # the shipped k-means CSF label is noisy: a 3×3×3 majority vote first, else sulcal and fissure CSF connect to the
    # ventricles through isolated voxels (largest deep component 7121 voxels against the template's 4517 ventricle
    # voxels, the interhemispheric fissure included; 4893 after the vote)
    csf = ndimage.median_filter(((lab == 1) & brain).astype(np.uint8), size=3) > 0
    vent = _ventricles(csf.astype(float), brain, tp["h"])
    return {"template": tp, "t": moved, "vent": vent, "gm": gm, "wm": wm, "provenance": c["provenance"]}


def inter_case(*, seed: int = 0, resolution: float = 2.0) -> dict:
    """The inter-subject tumour pair (module docstring, ``inter2d``): ``moving`` = the healthy MNI152 slice,
    ``fixed`` = the same axial slice of another subject (:func:`_subject_on_template`) with :func:`_lesion`'s seeded
    lesion and mass effect; ventricle labels of both, the tumour ``mask`` (fixed grid), ``provenance``."""
    import classreg as cr

    sub = _subject_on_template(resolution)
    tp = sub["template"]
    z = _axial(tp["image"])
    les = _lesion(sub["t"][z], sub["vent"][z], sub["gm"][z], sub["wm"][z], tp["h"], seed=seed)
    sp = (tp["h"],) * 2
    prov = (f"moving: MNI152 2009a T1 {resolution} mm, axial slice z={z}; fixed: the same slice of "
            f"{sub['provenance'].split('moving: ')[1].split(';')[0]}, affinely registered to the template "
            f"(register_affine, MI, defaults), white-matter median matched; {les['description']}")
    return {"fixed": cr.Image(les["fixed"].astype(np.float32), sp),
            "moving": cr.Image(tp["t"][z].astype(np.float32), sp), "fixed_labels": les["fixed_labels"],
            "moving_labels": tp["vent"][z], "mask": les["mask"].astype(np.float32), "provenance": prov}


# ------------------------------------------------------------------------------------------------ runs
def _dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2 * np.sum(a & b) / max(1, a.sum() + b.sum()))


#: the paper's brain settings (Demeter@6164e83, ``brains_weightedMetamorphosis.ipynb``, the notebook of the paper's
#: BraTS figure): LDDMM σ 6 px, λ 1e-4; metamorphosis μ 1, ρ 30, σ 6 px, λ 1e-4; weighted metamorphosis μ 1, ρ 20,
#: σ 12 px, λ 1e-4 (1 mm pixels). Their cost is ½Σ(I₁ − T)² + λ[Σ (z₀∇S)·K⋆(z₀∇S) + ρ mean(M₀z₀²)] while their path
#: has v = −(ρ/μ)K⋆(z∇I): with classreg's momentum P = (ρ/μ)z it is λ(μ/ρ)²[⟨P₀∇S, K⋆(P₀∇S)⟩ + ...], so the exact
#: correspondence with classreg's (1/2σ²)∫(I₁ − T)² + ½‖v₀‖²_V is σ = (μ/ρ)√(2λ) (LDDMM: √(2λ)); the kernel's px are
#: mm; ν = μ²/ρ is the path's (their cost prices the residual with ρ/N instead, which classreg's consistent cost
#: cannot represent). docs/notes/metamorphosis.md, session 18.
PAPER_SETTINGS = {"lddmm": dict(mu=0.0, kernel_sigma=6.0, data_sigma=(2e-4) ** 0.5),
                  "cm": dict(mu=1.0, rho=30.0, kernel_sigma=6.0, data_sigma=(2e-4) ** 0.5 / 30.0),
                  "wm": dict(mu=1.0, rho=20.0, kernel_sigma=12.0, data_sigma=(2e-4) ** 0.5 / 20.0)}


def _solvers(case: dict, which, rhos=(None,), data_sigma=None, kernel_sigma=None, paper=False, iterations=None):
    """The runs, keyed ``run`` or ``run rho=R`` when ``rhos`` sweeps metamorphosis' ρ (mm²; None = the default);
    ``data_sigma`` (None = the solvers' default) is given to every run, ``kernel_sigma`` (mm, one σ or several:
    the multi-scale kernel) to every run of the full-grid engine (all but ``lddmm_default``). ``paper``: each run
    with :data:`PAPER_SETTINGS` instead (``rhos``, ``data_sigma``, ``kernel_sigma`` must then be unset).
    ``iterations`` (per pyramid level; None = the solvers' default) is given to every run."""
    import classreg as cr

    f, m, mask = case["fixed"], case["moving"], case["mask"]
    if paper:
        if rhos != (None,) or data_sigma is not None or kernel_sigma is not None or "lddmm_default" in which:
            raise ValueError("--paper-settings sets ρ, μ, data σ and kernel σ per run: no --rho, --data-sigma, "
                             "--kernel-sigma or lddmm_default with it")
        its = {} if iterations is None else {"iterations": tuple(iterations)}
        return {k: (lambda kw=dict(PAPER_SETTINGS[k], **its, **({"mask": mask} if k == "wm" else {})):
                    cr.register_metamorphosis(f, m, **kw)) for k in which}
    common = {} if data_sigma is None else {"data_sigma": data_sigma}
    if iterations is not None:
        common["iterations"] = tuple(iterations)
    full = dict(common) if kernel_sigma is None else {**common, "kernel_sigma": tuple(kernel_sigma)}
    out = {}
    for k in which:
        if k == "lddmm":
            out[k] = lambda: cr.register_metamorphosis(f, m, mu=0.0, **full)
        elif k == "lddmm_default":
            out[k] = lambda: cr.register_lddmm(f, m, **common)
        else:
            for rho in rhos:
                kw = dict(full) if rho is None else {"rho": rho, **full}
                if k == "wm":
                    kw["mask"] = mask
                out[k if rho is None else f"{k} rho={rho:g}"] = (lambda kw=kw: cr.register_metamorphosis(f, m, **kw))
    return out


def _row(name, run, res, seconds, case, extra) -> dict:
    import classreg as cr

    m = res.metrics
    labels = cr.Image(case["moving_labels"].astype(np.uint8), case["moving"].spacing)
    warped_lab = cr.resample(labels, res.transform, reference=case["fixed"], interpolation="label").data
    f_lab = case["fixed_labels"]
    fn = lambda a: (a - case["fixed"].data.min()) / np.ptp(case["fixed"].data)  # noqa: E731
    final = res.extras.get("final_image", res.warped).data if res.extras else res.warped.data
    row = dict(case=name, run=run, seconds=round(seconds, 2),
               dice_before=_dice(f_lab, case["moving_labels"]), dice=_dice(f_lab, warped_lab > 0),
               ssd_final=float(np.mean((fn(final) - fn(case["fixed"].data)) ** 2)),
               ssd_deformation=float(np.mean((fn(res.warped.data) - fn(case["fixed"].data)) ** 2)),
               min_det=m.get("min_det", m.get("min_det_j")), added_outside_mask=m.get("added_outside_mask"),
               mask_coverage=res.params.get("mask_growth_coverage"),
               time_steps=m.get("time_steps"), stop=res.stop_reason, peak_rss_mb=round(peak_rss_mb()))
    row.update(extra(res))
    return row


def run_toy(size: int, which, rhos=(None,), data_sigma=None, kernel_sigma=None, paper=False,
            iterations=None) -> list[dict]:
    fixed, moving, tri = toy(size, push=0.08 * size)
    mask = ndimage.binary_dilation(tri, iterations=2)
    case = {"fixed": fixed, "moving": moving, "mask": mask.astype(np.float32),
            "fixed_labels": np.zeros(tri.shape, bool), "moving_labels": np.zeros(tri.shape, bool)}
    T = fixed.data
    before = oval_centroid_error(moving.data, T, tri)
    rows = []
    for run, fn in _solvers(case, which, rhos, data_sigma, kernel_sigma, paper, iterations).items():
        t0 = time.perf_counter()
        res = fn()
        sec = time.perf_counter() - t0
        row = _row(f"toy{size}", run, res, sec, case,
                   lambda r: dict(oval_error_px=oval_centroid_error(r.warped.data, T, tri),
                                  oval_error_before_px=before))
        row.pop("dice"), row.pop("dice_before")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run_mni(name: str, which, seeds, rhos=(None,), data_sigma=None, kernel_sigma=None, paper=False,
            iterations=None) -> list[dict]:
    """The tumour cases ``mni2d``, ``mni3d`` (:func:`tumour_case`) and ``inter2d`` (:func:`inter_case`)."""
    rows = []
    for seed in seeds:
        case = inter_case(seed=seed) if name == "inter2d" else tumour_case(int(name[3]), seed=seed)
        for run, fn in _solvers(case, which, rhos, data_sigma, kernel_sigma, paper, iterations).items():
            t0 = time.perf_counter()
            res = fn()
            sec = time.perf_counter() - t0
            row = _row(f"{name} seed {seed}", run, res, sec, case, lambda r: {})
            row["provenance"] = case["provenance"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    if len(seeds) > 1:  # the mean over the seeds, per run
        keys = ("dice_before", "dice", "ssd_final", "ssd_deformation", "min_det", "seconds")
        for run in dict.fromkeys(r["run"] for r in rows):
            mine = [r for r in rows if r["run"] == run]
            rows.append(dict(case=f"{name} mean of {len(seeds)}", run=run,
                             **{k: float(np.mean([r[k] for r in mine])) for k in keys},
                             min_det_worst=float(np.min([r["min_det"] for r in mine]))))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["toy", "mni2d", "mni3d"],
                   choices=["toy", "mni2d", "inter2d", "mni3d"])
    p.add_argument("--runs", nargs="+", default=None, choices=["lddmm", "lddmm_default", "cm", "wm"],
                   help="default: lddmm, cm, wm (and lddmm_default on mni3d)")
    p.add_argument("--toy-size", type=int, default=300)
    p.add_argument("--rho", type=float, nargs="+", default=None,
                   help="sweep metamorphosis' rho (mm²) for the cm and wm runs (default: the solver's default)")
    p.add_argument("--data-sigma", type=float, default=None,
                   help="σ of the SSD for every run (normalised intensities; default: the solvers' default 0.05)")
    p.add_argument("--kernel-sigma", type=float, nargs="+", default=None,
                   help="kernel σ (mm) of every full-grid run (not lddmm_default); several: the multi-scale kernel "
                        "(default: the solvers' default)")
    p.add_argument("--paper-settings", action="store_true",
                   help="each run with the paper's brain settings mapped to classreg (PAPER_SETTINGS: LDDMM σ_K 6 "
                        "mm, data σ 0.0141; CM μ 1, ρ 30, σ_K 6, data σ 4.7e-4; WM μ 1, ρ 20, σ_K 12, data σ "
                        "7.1e-4)")
    p.add_argument("--iterations", type=int, nargs="+", default=None,
                   help="iterations per pyramid level of every run (default: the solvers' defaults; 40 40 1000 "
                        "runs the finest level to its tolerance on inter2d)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="tumours drawn for mni2d and inter2d (mni3d uses the first)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    rows = []
    for c in a.cases:
        which = a.runs or (["lddmm", "lddmm_default", "cm", "wm"] if c == "mni3d" else ["lddmm", "cm", "wm"])
        rhos = a.rho or (None,)
        rows += (run_toy(a.toy_size, which, rhos, a.data_sigma, a.kernel_sigma, a.paper_settings, a.iterations)
                 if c == "toy" else
                 run_mni(c, which, a.seeds[:1] if c == "mni3d" else a.seeds, rhos, a.data_sigma, a.kernel_sigma,
                         a.paper_settings, a.iterations))
    cols = [("case", "case"), ("run", "run"), ("dice_before", "ventricle Dice before"), ("dice", "Dice after"),
            ("oval_error_px", "oval error (px)"), ("ssd_final", "SSD final"),
            ("ssd_deformation", "SSD deformation only"), ("added_outside_mask", "added outside mask"),
            ("mask_coverage", "grown mask coverage"),
            ("min_det", "min det J"), ("seconds", "time (s)"), ("peak_rss_mb", "peak RSS (MB)")]
    table = markdown_table(rows, cols)
    print(table)
    write_outputs("metamorphosis", {"rows": rows, "args": vars(a)}, table, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
