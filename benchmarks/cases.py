"""Benchmark cases built from data that ships inside installed packages (nothing is downloaded).

Every case is built once per run into a work folder (``build_case``) and read back by each tool's worker process
(``load_case``), so all tools see byte-identical inputs. Three kinds:

* ``deformable`` — fixed image, moving image *already affinely pre-aligned and resampled onto the fixed grid* (one
  deterministic SimpleITK Mattes-MI affine shared by every tool, so the comparison is about the deformable part),
  label maps of both (Dice), an evaluation mask, and a known truth transform where there is one;
* ``rigid`` — fixed and moving images on their own grids with an analytic ground-truth rigid or similarity transform
  (TRE); ``case.json`` names the transform model (``"transform"``) and the centring start the peers use;
* ``affine`` — fixed and moving images on their own grids, *not* pre-aligned, with label maps of both: every tool
  finds the whole affine map from its own start (tissue Dice / HD95 of the moving labels resampled through it, NCC);
* ``points`` — source and target point sets with known correspondences.

Provenance of every file is recorded in the case's ``case.json`` (and in docs/benchmarks.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: name -> (kind, one-line description)
CASES = {
    "inter3d": ("deformable", "3-D inter-subject: MNI152 2 mm ← ITK KmeansTest T1 subject (affine pre-aligned)"),
    "affine3d": ("affine", "3-D inter-subject affine: MNI152 2 mm ← the raw KmeansTest T1 subject (not pre-aligned)"),
    "synth3d": ("deformable", "3-D known deformation: MNI152 2 mm warped by smooth noise (seed 0, max 8 mm)"),
    "synth3d_1mm": ("deformable", "3-D known deformation at 1 mm: MNI152 1 mm warped by synth3d's deformation"),
    "brain2d": ("deformable", "2-D inter-subject: dipy T1 coronal slice ← MNI152 1 mm coronal slice (affine)"),
    "lung2d": ("deformable", "2-D rat lung: ITK RatLungSlice1 ← RatLungSlice2"),
    "circle2d": ("deformable", "2-D large deformation: dipy circle → C"),
    "mm2d": ("rigid", "2-D multimodal rigid: ITK T1 slice ← PD slice rotated 10°, shifted (13, 17) mm"),
    "mm2d_rot60": ("rigid", "2-D multimodal rigid: ITK T1 slice ← PD slice rotated 60°, shifted (20, -15) mm"),
    "sim2d": ("rigid", "2-D multimodal similarity: ITK T1 slice ← PD slice through a seeded similarity map (seed 0)"),
    "points": ("points", "fsaverage5 left pial → left white, shared vertices (correspondence known)"),
}
#: the cases of ``--quick`` (small, a couple of minutes for every tool together)
QUICK_CASES = ("lung2d", "mm2d_rot60", "points")
#: the cases of a run without ``--cases``: all but the 1 mm case (8.7 M voxels: for GPU runs and explicit requests)
DEFAULT_CASES = tuple(c for c in CASES if c != "synth3d_1mm")
#: the cases of ``--device cuda`` without ``--cases``: the 3-D deformable ones (issue #26's GPU targets)
GPU_CASES = ("inter3d", "synth3d", "synth3d_1mm")
#: synth3d's displacement: Gaussian-smoothed white noise (seed 0) with σ = SYNTH_SIGMA_MM (6 voxels at 2 mm),
#: scaled to a largest component of SYNTH_MAX_MM
SYNTH_SIGMA_MM, SYNTH_MAX_MM = 12.0, 8.0


def kmeans_labels(values: np.ndarray, mask: np.ndarray, k: int = 3, iterations: int = 50) -> np.ndarray:
    """Deterministic 1-D k-means of the intensities inside ``mask`` (quantile initialisation, Lloyd iterations);
    labels 1..k ordered by mean intensity, 0 outside the mask. The intensity-class proxy for tissue labels used
    where a case has no segmentation (DATA.md: brain2d, lung2d)."""
    v = np.asarray(values, dtype=np.float64)[mask]
    if v.size < k:
        raise ValueError(f"mask has {v.size} voxels, fewer than k={k}")
    centres = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        idx = np.argmin(np.abs(v[:, None] - centres[None]), axis=1)
        new = np.array([v[idx == j].mean() if np.any(idx == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres, rtol=0, atol=1e-12):
            break
        centres = new
    order = np.argsort(centres)
    centres = centres[order]
    lab = np.zeros(np.shape(values), np.uint8)
    lab[mask] = 1 + np.argmin(np.abs(v[:, None] - centres[None]), axis=1)
    return lab


def _save_images(workdir: Path, **images) -> None:
    import classreg as cr

    for key, img in images.items():
        if img is not None:
            cr.save(img, workdir / f"{key}.nii.gz")


def _shrink(img, factor):
    from classreg.pyramid import downsample

    """Shrink by the integer ``factor`` (ITK's grid rule) after a Gaussian of σ = factor / 2 voxels."""
    return img if factor <= 1 else downsample(img, float(factor), 0.5 * factor * max(img.spacing))


def build_case(name: str, workdir, *, quick: bool = False) -> dict:
    """Build case ``name`` into ``workdir``; returns its description (also written to ``case.json``).

    Raises ``classreg.data.DataNotFoundError`` (a FileNotFoundError) when the data package is not installed.
    """
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    kind, desc = CASES[name]
    info = {"name": name, "kind": kind, "description": desc, "quick": bool(quick), "prealigned": False}
    if kind == "deformable":
        info.update(_build_deformable(name, workdir, quick))
    elif kind == "rigid":
        info.update(_build_rigid(name, workdir, quick))
    elif kind == "affine":
        info.update(_build_affine(name, workdir, quick))
    else:
        info.update(_build_points(workdir, quick))
    (workdir / "case.json").write_text(json.dumps(info, indent=1))
    return info


def _build_deformable(name, workdir, quick):
    import classreg as cr
    from classreg.demo import _brain_pair_2d, affine_prealign

    truth, prealigned = None, False
    if name in ("inter3d", "synth3d", "synth3d_1mm"):
        from classreg.data import brain_pair_3d

        c = brain_pair_3d(resolution=1.0 if name == "synth3d_1mm" else 2.0)
        fixed, flab = c["fixed"], c["fixed_labels"]
        mask = c["fixed_mask"]
        if name == "inter3d":
            aff = affine_prealign(c["fixed"], c["moving"], fixed_mask=c["fixed_mask"])
            moving = cr.resample(c["moving"], aff, reference=fixed)
            mlab = cr.resample(c["moving_labels"], aff, reference=fixed, interpolation="label")
            prov = c["provenance"] + "; one SimpleITK Mattes-MI affine pre-alignment shared by all tools"
            prealigned = True
        else:
            psi = synth_deformation(fixed)
            moving = cr.resample(fixed, psi, reference=fixed)
            mlab = cr.resample(flab, psi, reference=fixed, interpolation="label")
            # moving = fixed∘ψ, so the fixed → moving map T with moving∘T = fixed is ψ⁻¹ (fixed-point inversion)
            truth = psi.inverse()
            if name == "synth3d":
                prov = ("nilearn MNI152 2009a T1 2 mm warped by ψ = id + u (moving = fixed∘ψ), u = "
                        "Gaussian-smoothed (σ 6 voxels) white noise, seed 0, max |u_c| = 8 mm; ground truth fixed → "
                        "moving map ψ⁻¹ (fixed-point inversion); labels CSF/GM/WM from the template's GM/WM maps")
            else:
                prov = ("nilearn MNI152 2009a T1 1 mm warped by synth3d's ψ = id + u (moving = fixed∘ψ): u = "
                        "Gaussian-smoothed (σ 12 mm) white noise drawn on the 2 mm grid, seed 0, max |u_c| = 8 mm, "
                        "interpolated linearly onto the 1 mm grid; ground truth fixed → moving map ψ⁻¹ "
                        "(fixed-point inversion on the 1 mm grid); labels CSF/GM/WM from the 1 mm template's GM/WM "
                        "maps")
    elif name == "brain2d":
        c = _brain_pair_2d()
        aff = affine_prealign(c["fixed"], c["moving"], fixed_mask=c["fixed_mask"])
        fixed = c["fixed"]
        moving = cr.resample(c["moving"], aff, reference=fixed)
        mask = c["fixed_mask"]
        fg_m = moving.data > 0.02 * float(moving.data.max())
        flab = fixed.like(kmeans_labels(fixed.data, mask.data > 0))
        mlab = moving.like(kmeans_labels(moving.data, fg_m))
        prealigned = True
        prov = (c["provenance"].split("; labels")[0] + "; one SimpleITK Mattes-MI affine pre-alignment; labels: "
                "3 intensity k-means classes (CSF/GM/WM proxy) of each image's foreground (DATA.md)")
    elif name == "lung2d":
        from classreg.data import itk_example

        fixed = cr.load(itk_example("RatLungSlice1.mha"), dtype=np.float32)
        moving = cr.load(itk_example("RatLungSlice2.mha"), dtype=np.float32)
        fixed, moving = fixed.like(fixed.data / 255.0), moving.like(moving.data / 255.0)
        mask = fixed.like(np.ones(fixed.shape, np.uint8))
        flab = fixed.like(kmeans_labels(fixed.data, np.ones(fixed.shape, bool)))
        mlab = moving.like(kmeans_labels(moving.data, np.ones(moving.shape, bool)))
        prov = ("ITK examples (Debian insighttoolkit5-examples) RatLungSlice1.mha (fixed) and RatLungSlice2.mha "
                "(moving), intensities /255; labels: 3 intensity k-means classes of each whole image (a weak proxy)")
    elif name == "circle2d":
        from classreg.data import dipy_file

        fixed = cr.Image(np.load(dipy_file("C.npy")).astype(np.float32), (1.0, 1.0))
        moving = cr.Image(np.load(dipy_file("circle.npy")).astype(np.float32), (1.0, 1.0))
        if quick:
            fixed, moving = _shrink(fixed, 2), _shrink(moving, 2)
        flab = fixed.like((fixed.data > 0.5).astype(np.uint8))
        mlab = moving.like((moving.data > 0.5).astype(np.uint8))
        mask = fixed.like(np.ones(fixed.shape, np.uint8))
        prov = "dipy data/files circle.npy (moving) → C.npy (fixed), synthetic; label: the shape (> 0.5)"
    else:  # pragma: no cover - guarded by CASES
        raise ValueError(name)
    _save_images(workdir, fixed=fixed, moving=moving, fixed_labels=flab, moving_labels=mlab,
                 mask=mask.astype(np.uint8))
    if truth is not None:
        truth.save(workdir / "truth.nii.gz")
    return {"provenance": prov, "ndim": fixed.ndim, "shape": list(fixed.shape), "spacing": list(fixed.spacing),
            "has_truth": truth is not None, "prealigned": prealigned}


def synth_deformation(fixed, seed=0):
    """synth3d's known deformation ψ = id + u on ``fixed``'s grid (a DisplacementField, float32).

    u is white noise drawn with ``numpy.random.default_rng(seed)`` (synth3d: 0; other seeds give the held-out
    deformations of benchmarks.heldout) on the 2 mm MNI152 grid, smoothed by a Gaussian of
    σ = :data:`SYNTH_SIGMA_MM` (6 voxels) and scaled so that its largest component is :data:`SYNTH_MAX_MM`. On the
    2 mm grid (synth3d) that is ψ itself; on any other grid (synth3d_1mm) it is the same field interpolated linearly
    (``classreg.evaluate.dense_displacement``): both cases have the same physical deformation.
    """
    from scipy import ndimage

    import classreg as cr
    from classreg.data import mni152
    from classreg.evaluate import dense_displacement

    grid = mni152("t1", resolution=2.0)
    rng = np.random.default_rng(seed)
    sigma = SYNTH_SIGMA_MM / min(grid.spacing)
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=grid.shape), sigma) for _ in range(3)], -1)
    u *= SYNTH_MAX_MM / np.abs(u).max()
    psi = cr.DisplacementField.from_array_frame(u.astype(np.float32), grid)
    if psi.image.same_grid(fixed):
        return psi
    u, _ = dense_displacement(psi, fixed)
    return cr.DisplacementField.from_array_frame(u.astype(np.float32), fixed)


#: rigid cases: (angle in degrees, translation in mm) of the ground-truth fixed → moving map about the image centre
_RIGID = {"mm2d": (10.0, (13.0, 17.0)), "mm2d_rot60": (60.0, (20.0, -15.0))}
#: the seeded similarity case: ranges of the drawn rotation (degrees), isotropic scale and shift (mm, per axis)
SIM2D_RANGES = {"angle_deg": (-20.0, 20.0), "scale": (0.9, 1.1), "shift_mm": (-15.0, 15.0)}


def similarity_draw(seed: int = 0) -> tuple[float, float, tuple[float, float]]:
    """sim2d's truth parameters: ``numpy.random.default_rng(seed)`` draws the rotation (degrees), then the scale,
    then the 2 shift components (mm), uniformly in :data:`SIM2D_RANGES`."""
    rng = np.random.default_rng(seed)
    angle = float(rng.uniform(*SIM2D_RANGES["angle_deg"]))
    scale = float(rng.uniform(*SIM2D_RANGES["scale"]))
    shift = tuple(float(v) for v in rng.uniform(*SIM2D_RANGES["shift_mm"], size=2))
    return angle, scale, shift


def _build_rigid(name, workdir, quick):
    import classreg as cr
    from classreg.data import itk_example_image

    fixed = itk_example_image("BrainT1SliceBorder20.png", dtype=np.float32)
    pd = itk_example_image("BrainProtonDensitySliceBorder20.png", dtype=np.float32)
    if quick:
        fixed, pd = _shrink(fixed, 2), _shrink(pd, 2)
    centre = fixed.center
    extra = {}
    if name == "sim2d":
        angle, scale, shift = similarity_draw(0)
        truth = cr.Affine.similarity(scale, [np.radians(angle)], translation=shift, center=centre)
        model = "similarity"
        what = (f"similarity map ({angle:.4f}° and scale {scale:.5f} about the image centre, shift ({shift[0]:.4f}, "
                f"{shift[1]:.4f}) mm; drawn by numpy default_rng(0) in ±20°, [0.9, 1.1], ±15 mm)")
        extra = {"truth_scale": scale, "seed": 0, "ranges": SIM2D_RANGES}
    else:
        angle, shift = _RIGID[name]
        truth = cr.Affine.euler([np.radians(angle)], translation=shift, center=centre)
        model, what = "rigid", f"rigid map ({angle}° about the image centre, shift {shift} mm)"
    # the moving image is the PD slice seen through the inverse map: moving(truth(x)) = pd(x)
    moving = cr.resample(pd, truth.inverse(), reference=pd)
    fg = fixed.data > 0.05 * float(fixed.data.max())
    _save_images(workdir, fixed=fixed, moving=moving, mask=fixed.like(fg.astype(np.uint8)))
    truth.save(workdir / "truth.tfm")
    return dict({"provenance": "ITK examples BrainT1SliceBorder20.png (fixed) and BrainProtonDensitySliceBorder20.png "
                               f"resampled by an analytic {what} (moving); the truth is that map; TRE over the fixed "
                               "image's foreground",
                 "ndim": 2, "shape": list(fixed.shape), "spacing": list(fixed.spacing), "has_truth": True,
                 "transform": model, "centre_init": "geometry", "truth_angle_deg": angle,
                 "truth_shift_mm": list(shift), "truth_center_mm": [float(v) for v in centre]}, **extra)


def _build_affine(name, workdir, quick):
    """affine3d: the pair of ``classreg.data.brain_pair_3d`` (the labels of inter3d) without inter3d's pre-alignment:
    the moving subject stays on its own 2 × 2 × 3 mm grid and orientation, about 130 mm from the template."""
    from classreg.data import brain_pair_3d

    c = brain_pair_3d(resolution=2.0)
    fixed, moving, flab, mlab, mask = c["fixed"], c["moving"], c["fixed_labels"], c["moving_labels"], c["fixed_mask"]
    if quick:  # 4 mm template (labels by nearest-neighbour subsampling), the subject unchanged
        from classreg.resample import resample

        small = _shrink(fixed, 2)
        flab = resample(flab, reference=small, interpolation="label")
        mask = resample(mask.astype(np.uint8), reference=small, interpolation="nearest")
        fixed = small
    _save_images(workdir, fixed=fixed, moving=moving, fixed_labels=flab, moving_labels=mlab,
                 mask=mask.astype(np.uint8))
    prov = c["provenance"] + "; no pre-alignment (the moving subject on its own grid, skull-stripped with its mask)"
    return {"provenance": prov,
            "ndim": 3, "shape": list(fixed.shape), "spacing": list(fixed.spacing),
            "moving_shape": list(moving.shape), "moving_spacing": list(moving.spacing), "has_truth": False,
            "transform": "affine", "centre_init": "moments", "prealigned": False}


def _build_points(workdir, quick):
    from nilearn import datasets, surface

    n = 300 if quick else 2000
    fs = datasets.fetch_surf_fsaverage("fsaverage5")
    pial = np.asarray(surface.load_surf_mesh(fs["pial_left"])[0], float)
    white = np.asarray(surface.load_surf_mesh(fs["white_left"])[0], float)
    idx = np.sort(np.random.default_rng(0).choice(len(pial), n, replace=False))
    np.save(workdir / "source.npy", pial[idx])
    np.save(workdir / "target.npy", white[idx])
    return {"provenance": f"nilearn fsaverage5 left pial (source) and left white (target) surfaces, {n} vertices "
                          "drawn with seed 0; the shared vertex index is the ground-truth correspondence",
            "n_points": n, "has_truth": True}


def load_case(workdir) -> dict:
    """Read a built case: ``info`` plus Images (image cases) or arrays (points)."""
    import classreg as cr

    workdir = Path(workdir)
    info = json.loads((workdir / "case.json").read_text())
    out = {"info": info, "workdir": workdir}
    if info["kind"] == "points":
        out["source"] = np.load(workdir / "source.npy")
        out["target"] = np.load(workdir / "target.npy")
        return out
    for key in ("fixed", "moving", "fixed_labels", "moving_labels", "mask"):
        p = workdir / f"{key}.nii.gz"
        if p.is_file():
            out[key] = cr.load(p, dtype=np.float32 if key in ("fixed", "moving") else None)
    for t in ("truth.nii.gz", "truth.tfm"):
        if (workdir / t).is_file():
            out["truth"] = cr.load_transform(workdir / t)
    return out
