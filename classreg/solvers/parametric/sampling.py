"""Image samplers of the parametric engine (elastix ``ImageSampler``): where on the fixed image the metric is
evaluated at an iteration.

Every sampler returns continuous indices of the fixed level image (array order, shape (N, ndim)); random ones draw
from the one ``numpy.random.Generator`` of the run (seeded by ``seed``), so a run is reproducible.

* ``random_coordinate`` — N uniform continuous positions inside the image's voxel-centre box (elastix
  ``RandomCoordinate``; the fixed value is interpolated linearly there);
* ``random`` — N voxel centres drawn uniformly with replacement (elastix ``Random``);
* ``random_sparse_mask`` — N voxel centres drawn inside the fixed mask (elastix ``RandomSparseMask``; needs a mask);
* ``full`` — every voxel (of the mask); ``grid`` — every ``grid_step``-th voxel along each axis (elastix ``Full``,
  ``Grid``). These two are deterministic: the same samples at every iteration.

With a fixed mask, random positions outside it are redrawn (positions are tested at their nearest voxel), as
elastix does.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SAMPLERS", "Sampler"]

SAMPLERS = ("random_coordinate", "random", "random_sparse_mask", "full", "grid")


class Sampler:
    """Draws sample positions on one fixed level image.

    Parameters
    ----------
    kind : str
        One of :data:`SAMPLERS`.
    count : int
        Samples per draw (random samplers).
    shape : tuple of int
        The fixed level image's array shape.
    mask : ndarray of bool, optional
        Fixed mask on that grid.
    grid_step : int
        Voxel step of the ``grid`` sampler.
    """

    def __init__(self, kind: str, count: int, shape, mask=None, *, grid_step: int = 2):
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}; valid: {', '.join(SAMPLERS)}")
        if kind == "random_sparse_mask" and mask is None:
            raise ValueError("sampler 'random_sparse_mask' draws voxels inside the fixed mask: give fixed_mask, or "
                             "use sampler='random_coordinate'")
        self.kind = kind
        self.count = int(count)
        self.shape = tuple(int(s) for s in shape)
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        if self.mask is not None and not self.mask.any():
            raise ValueError("the fixed mask is empty on this pyramid level; give a mask with voxels inside")
        self.deterministic = kind in ("full", "grid")
        self._hi = np.asarray(self.shape, dtype=float) - 1.0  # the voxel-centre box of random coordinates
        self._hi_rows = self._hi[None]
        self._fixed_points = None
        if kind in ("full", "grid", "random_sparse_mask"):
            sel = np.ones(self.shape, dtype=bool) if self.mask is None else self.mask.copy()
            if kind == "grid":
                step = max(1, int(grid_step))
                keep = np.zeros(self.shape, dtype=bool)
                keep[tuple(slice(None, None, step) for _ in self.shape)] = True
                sel &= keep
                if not sel.any():
                    raise ValueError(f"the grid sampler with step {step} finds no voxel inside the fixed mask")
            self._fixed_points = np.argwhere(sel).astype(np.float64)

    @property
    def size(self) -> int:
        """Samples per draw."""
        return len(self._fixed_points) if self.deterministic else self.count

    def draw(self, rng: np.random.Generator, count: int | None = None) -> np.ndarray:
        """Continuous fixed indices (N, ndim) of one draw (``count`` overrides the sampler's own count)."""
        n = self.count if count is None else int(count)
        if self.deterministic:
            return self._fixed_points
        if self.kind == "random_sparse_mask":
            pick = rng.integers(0, len(self._fixed_points), size=n)
            return self._fixed_points[pick]
        hi = self._hi
        if self.mask is None and self.kind == "random_coordinate":  # the hot path: one draw, nothing rejected
            u = rng.random((n, len(self.shape)))
            if n != len(self._hi_rows):  # hi repeated per row: one flat product, not n inner loops of ndim
                self._hi_rows = np.broadcast_to(hi, u.shape).copy()
            u *= self._hi_rows
            return u
        out = np.empty((0, len(self.shape)))
        for _ in range(100):  # masks: redraw the rejected positions (elastix MaximumNumberOfSamplingAttempts)
            need = n - len(out)
            if self.kind == "random":
                pts = np.stack([rng.integers(0, s, size=need) for s in self.shape], axis=1).astype(np.float64)
            else:
                pts = rng.random((need, len(self.shape))) * hi
            if self.mask is not None:
                near = tuple(np.clip(np.rint(pts[:, d]).astype(np.intp), 0, self.shape[d] - 1)
                             for d in range(len(self.shape)))
                pts = pts[self.mask[near]]
            out = np.concatenate([out, pts]) if len(out) else pts
            if len(out) >= n:
                return out[:n]
        raise ValueError(f"could not draw {n} samples inside the fixed mask after 100 attempts "
                         f"({len(out)} found): the mask covers too little of the image")
