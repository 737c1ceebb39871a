"""The per-level rotation search of ``register_rigid``, run as the step of :func:`classreg.pyramid.multiresolution`.

On each level (working grids and images from :class:`~classreg.solvers.rigid.grids.WorkingPyramid`):

1. candidate rotations: level 0 samples ``samples[0]`` over the rotation space; level k > 0 takes the ``keep[k-1]``
   best candidates of level k-1 (passed in ``state["candidates"]``) unchanged plus ``samples[k]`` perturbations of
   them (:mod:`.rotations`);
2. each rotation R is scored (:class:`Evaluator`): the moving image is rotated about the physical centres and
   resampled on the moving working grid, and the CSNGF map over all shifts χ gives the best shift; with the
   working-grid origins ``o_A``, ``o_B`` and the index → mm matrix ``L`` of the fixed working grid, the peak is the
   fixed → moving map ``T(x) = R (x - c_F) + c_M + R (o_B - o_A - L χ)``;
3. at the last level an optional coordinate-wise parabolic pattern search on the Euler angles (``polish``);
4. the candidates are ranked (score, then evaluation order) for the next level.

Scores of different levels are not compared: the best candidate of the finest level reached is the result. Its
shift can be refined to sub-voxel precision by a parabola through the peak (:func:`parabola_offsets`).

Everything that passes between levels is grid-free and lives in the driver's ``state`` dict: ``"candidates"``
(the ranked ``(score, rotation, translation, index)`` of the last level) and ``"record"`` (a :class:`SearchRecord`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ...kernels._backend import get_array_module
from ...transforms import rotation_matrix
from .csngf import CrossSimilarityNGF, SimilarityMap
from .grids import erode
from .rotations import euler_angles, perturb_rotation, sample_rotations

__all__ = ["Evaluator", "SearchRecord", "level_step", "parabola_offsets"]


class Evaluator:
    """Scores rotations on one level: the cached fixed-side measure and the moving image with its mask channel.

    Parameters
    ----------
    level : classreg.pyramid.Level
        ``fixed`` on the fixed working grid with its eroded mask, ``moving`` (smoothed) on its own grid.
    grid_b : Image
        The level's moving working grid.
    c_f, c_m : ndarray
        Physical centres of the fixed and moving images (mm).
    measure : dict
        Keywords of :class:`CrossSimilarityNGF` (``epsilon``, ``overlap``, ``squared``, ``dtype``, ``workers``,
        ``backend``).
    """

    def __init__(self, level, grid_b, c_f, c_m, measure: dict):
        dtype = measure["dtype"]
        n = level.fixed.ndim
        self.grid_b = grid_b
        self.measure = CrossSimilarityNGF(level.fixed.data, grid_b.shape, a_mask=level.fixed_mask, **measure)
        xp = get_array_module(level.moving.data)  # the level's images live on the search's device
        mm = level.moving_mask
        mm = xp.ones(level.moving.shape, dtype=dtype) if mm is None else mm.astype(dtype)
        self.moving = xp.ascontiguousarray(xp.stack([level.moving.data, mm], axis=-1))
        self._inv_m = level.moving.inverse_affine
        aff_a, aff_b = level.fixed.affine, grid_b.affine
        self._lin_b, self._off_b = aff_b[:n, :n], aff_b[:n, n]
        self._c_f, self._c_m = c_f, c_m
        self._lin = aff_a[:n, :n]
        self._delta0 = self._off_b - aff_a[:n, n]  # o_B - o_A
        self._backend = measure["backend"]
        self._a = level.fixed.data
        self._ma = None if level.fixed_mask is None else level.fixed_mask.astype(bool)
        self._last = None

    def rotated_moving(self, r):
        """The moving image and its (eroded) mask on the moving working grid, rotated by ``r`` about the centres:
        the value at point ``p`` is ``moving(R (p - c_F) + c_M)``."""
        from ...kernels.warp import warp

        n = r.shape[0]
        inv = self._inv_m
        mat = inv[:n, :n] @ r @ self._lin_b
        off = inv[:n, :n] @ (r @ (self._off_b - self._c_f) + self._c_m) + inv[:n, n]
        w = warp(self.moving, None, matrix=mat, offset=off, out_shape=self.grid_b.shape, order=1, mode="zero",
                 backend=self._backend)
        mask = w[..., 1] > 0.999
        return w[..., 0], (erode(mask) if mask.any() else mask)

    def evaluate(self, r) -> SimilarityMap | None:
        """The CSNGF map of rotation ``r`` over all shifts (None if the rotated moving mask is empty)."""
        b, mb = self.rotated_moving(r)
        self._last = (b, mb)
        if not mb.any():
            return None
        return self.measure(b, mb)

    def similarity(self, index) -> float:
        """The normalised similarity (:func:`classreg.progress.similarity`, NCC) of the fixed working image and the
        last evaluated rotation's moving image shifted by the CSNGF map's ``index``, over their masks' overlap."""
        from ...progress import similarity

        b, mb = self._last
        a, ma = self._a, self._ma
        sa, sb = [], []
        for j, i in enumerate(index):
            chi = int(i) - (b.shape[j] - 1)  # B(x) meets A(x + χ)
            lo, hi = max(0, -chi), min(b.shape[j], a.shape[j] - chi)
            if hi <= lo:
                return float("nan")
            sb.append(slice(lo, hi))
            sa.append(slice(lo + chi, hi + chi))
        sa, sb = tuple(sa), tuple(sb)
        mask = mb[sb] if ma is None else (mb[sb] & ma[sa])
        return similarity(a[sa], b[sb], mask=mask)

    def translation(self, r, chi):
        """ITK translation (centre c_F) of ``T(x) = R (x - c_F) + c_M + R (o_B - o_A - L χ)``."""
        return self._c_m - self._c_f + r @ (self._delta0 - self._lin @ np.asarray(chi, dtype=float))


@dataclass
class SearchRecord:
    """Every evaluation of a run and the best candidate so far (kept in the driver's state)."""

    scores: list = field(default_factory=list)
    levels: list = field(default_factory=list)
    rotations: list = field(default_factory=list)
    translations: list = field(default_factory=list)
    best: tuple | None = None   # (score, rotation, translation, level) of the finest level reached
    final: tuple | None = None  # (SimilarityMap, peak index, Evaluator) of the best candidate at the last level
    level_info: list = field(default_factory=list)
    best_candidates: list = field(default_factory=list)


class _LevelSearch:
    """Evaluates rotations on one level, records them and keeps the level's best candidate."""

    def __init__(self, level, evaluator: Evaluator, record: SearchRecord, progress):
        self.level, self.evaluator, self.record, self.progress = level, evaluator, record, progress
        self.best = None  # (score, rotation, translation, level)
        self.best_similarity = None  # NCC of the level's best candidate (its similarity in the history)

    def run(self, r, i, stage):
        """Score rotation ``r`` (its best shift), record it, emit an ``iteration`` event; ``(score, translation)``."""
        k, ev, rec = self.level.index, self.evaluator, self.record
        n = r.shape[0]
        smap = ev.evaluate(r)
        if smap is None:
            score, chi, idx = -1.0, np.zeros(n), None
        else:
            xp = get_array_module(smap.score)
            idx = np.unravel_index(int(xp.argmax(smap.score)), smap.score.shape)
            score = float(smap.score[idx])
            chi = ev.measure.shift_of(idx)
        t = ev.translation(r, chi)
        rec.scores.append(score)
        rec.levels.append(k)
        rec.rotations.append(r)
        rec.translations.append(t)
        if self.best is None or score > self.best[0]:
            self.best = (score, r, t, k)
            # the search's current estimate is its best candidate: its NCC, computed on improvements only
            self.best_similarity = None if smap is None else ev.similarity(idx)
            if self.level.is_finest and smap is not None:
                rec.final = (smap, idx, ev)
        rec.best = self.best  # the finest level reached decides (coarser scores are not comparable)
        ang = np.rad2deg(euler_angles(r))
        extra = {f"angle_{a}": float(v) for a, v in zip(("x", "y", "z") if n == 3 else ("z",), ang)}
        extra.update({f"t{a}": float(v) for a, v in zip("xyz", t)})
        extra["stage"] = stage
        self.progress.emit("iteration", level=k, iteration=i, metric=score, similarity=self.best_similarity,
                           extra=extra)
        return score, t

    def polish(self, steps, first_iteration):
        """Coordinate-wise parabolic pattern search on the Euler angles around the level's best rotation: for each
        step (degrees) and angle, score ±step, evaluate the parabola's vertex if it is a maximum inside the
        bracket; repeat a step (up to 4 rounds) while it improves the best score."""
        it = first_iteration
        n_ang = 1 if self.best[1].shape[0] == 2 else 3
        for step in steps:
            for _round in range(4):
                start = self.best[0]
                for ax in range(n_ang):
                    r0, s0 = self.best[1], self.best[0]
                    e = np.zeros(n_ang)
                    e[ax] = np.deg2rad(step)
                    s_m, _ = self.run(r0 @ rotation_matrix(-e), it, "polish")
                    s_p, _ = self.run(r0 @ rotation_matrix(e), it + 1, "polish")
                    it += 2
                    den = s_m - 2.0 * s0 + s_p
                    if den < 0:
                        frac = float(np.clip(0.5 * (s_m - s_p) / den, -1.0, 1.0))
                        if abs(frac) > 1e-3 and abs(abs(frac) - 1.0) > 1e-6:
                            self.run(r0 @ rotation_matrix(frac * e), it, "polish")
                            it += 1
                if self.best[0] <= start:
                    break


def candidate_rotations(level, state, schedule, rng, max_angle) -> list:
    """Level 0: ``level.iterations`` (= ``samples[0]``) rotations over the space within ``max_angle``; level k:
    the ``keep[k-1]`` best of ``state["candidates"]`` and ``samples[k]`` perturbations of them (round robin)."""
    k, n = level.index, level.fixed.ndim
    if k == 0:
        return list(sample_rotations(level.iterations, n, max_angle=max_angle, seed=rng))
    top = state["candidates"][:schedule.keep[k - 1]]
    rots = [c[1] for c in top]
    for i in range(level.iterations):
        rots.append(perturb_rotation(top[i % len(top)][1], schedule.perturbation[k - 1], rng))
    return rots


def level_step(level, state, progress, *, pyramid, schedule, measure, polish, max_angle, rng):
    """The driver step: search level ``level.index``, rank its candidates into ``state["candidates"]``, record the
    level in ``state["record"]``; returns the level's best score (the ``level_end`` metric)."""
    k = level.index
    record = state["record"]
    grid_b = pyramid.grids[k][1]
    evaluator = Evaluator(level, grid_b, pyramid.c_f, pyramid.c_m, measure)
    rots = candidate_rotations(level, state, schedule, rng, max_angle)
    search = _LevelSearch(level, evaluator, record, progress)
    cands = []
    for i, r in enumerate(rots):
        score, t = search.run(r, i, "search")
        cands.append((score, r, t, i))
    if level.is_finest and polish:
        search.polish(polish, len(rots))
    order = sorted(range(len(cands)), key=lambda j: (-cands[j][0], j))
    ranked = [cands[j] for j in order]
    state["candidates"] = ranked
    n_top = schedule.keep[k] if not level.is_finest else 1
    record.best_candidates.append([{"level": k, "score": c[0], "angles_deg": np.rad2deg(euler_angles(c[1])).tolist(),
                                    "translation": np.asarray(c[2]).tolist()} for c in ranked[:max(n_top, 1)]])
    record.level_info.append({"level": k, "shrink": level.shrink, "spacing_mm": pyramid.spacings[k],
                              "sigma_mm": level.sigma_mm, "fixed_shape": list(level.fixed.shape),
                              "moving_shape": list(grid_b.shape), "fft_shape": list(evaluator.measure.fft_shape),
                              "evaluations": int(sum(1 for lv in record.levels if lv == k)),
                              "best_score": search.best[0], "seconds": time.perf_counter() - pyramid.started[k]})
    return search.best[0]


def parabola_offsets(smap: SimilarityMap, index):
    """Sub-voxel offset of the peak per axis from a parabola through the peak and its two neighbours (0 at the
    border of the map, next to an invalid shift, or where the three scores are not concave), clipped to ±0.5."""
    score, valid = smap.score, smap.valid
    out = np.zeros(len(index))
    for ax in range(len(index)):
        i = index[ax]
        if i == 0 or i == score.shape[ax] - 1:
            continue
        lo = list(index)
        hi = list(index)
        lo[ax] -= 1
        hi[ax] += 1
        lo, hi = tuple(lo), tuple(hi)
        if not (valid[lo] and valid[hi]):
            continue
        s_m, s_0, s_p = float(score[lo]), float(score[index]), float(score[hi])
        den = s_m - 2.0 * s_0 + s_p
        if den < 0:
            out[ax] = float(np.clip(0.5 * (s_m - s_p) / den, -0.5, 0.5))
    return out
