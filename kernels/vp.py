"""Kernels of the variational-principle (VP) registration of Zhou & Liao (METHODS.md §6): the control-to-field map
``F = ∇f − ∇×g``, its exact adjoint, the multilinear warp with the derivative of its own interpolant, and the discrete
loss with its exact gradient w.r.t. ``(f̂, g)`` (§6.1).

Conventions
-----------
* Node-centred grids in numpy axis order, spacing ``h`` per array axis (mm). A displacement ``u`` has shape
  ``(*spatial, ndim)`` in mm; ``φ(x) = x + u(x)``, so node ``i`` maps to index coordinate ``i + u/h``.
* Curl in the "physical" convention of :func:`kernels.diff.curl` (x is the last array axis). 2-D: g is scalar and
  ``∇×g := (∂_y g, −∂_x g)``, i.e. in array order ``(−∂_1 g, ∂_0 g)``; 3-D: g is ``(*spatial, 3)`` in array order.
* ``F`` uses central differences on the interior nodes (its boundary ring is ignored by the Dirichlet solve); the
  adjoints are the negative central differences of the zero-extended field on every node, boundary ring included —
  exactly the transpose, which is what makes the FD gradient check pass (§6.1 (iii)).
* Gradients are w.r.t. the inner product ``Π h_j Σ_nodes`` (the plain array gradient is ``Π h_j`` times them).
* Out-of-grid sample points are clamped to the grid (edge extension); the interpolant's derivative is 0 there.
"""
from __future__ import annotations

import functools

import numpy as np

from ._backend import get_array_module, is_cupy_array
from .diff import poisson_dirichlet

__all__ = ["vp_field", "vp_adjoint", "warp_linear_grad", "vp_loss_grad", "curl_terms", "invert_newton",
           "jacobian_matrix", "det_curl", "vp_grid_loss_grad"]


def curl_terms(nd: int):
    """``(out_component, g_component, axis, sign)`` of ``∇×g`` in array order (g_component 0 for the 2-D scalar)."""
    if nd == 2:
        return ((0, 0, 1, -1.0), (1, 0, 0, 1.0))
    if nd == 3:
        return ((0, 1, 2, 1.0), (0, 2, 1, -1.0), (1, 2, 0, 1.0), (1, 0, 2, -1.0), (2, 0, 1, 1.0), (2, 1, 0, -1.0))
    raise ValueError(f"VP needs 2 or 3 spatial dimensions, got {nd}")


def _dc(a, ax, h):
    """Central difference along ``ax`` on nodes interior along ``ax`` (0 on the two end slices)."""
    out = get_array_module(a).zeros_like(a)
    n = a.shape[ax]
    sl = lambda s: tuple(s if d == ax else slice(None) for d in range(a.ndim))  # noqa: E731
    out[sl(slice(1, n - 1))] = (a[sl(slice(2, n))] - a[sl(slice(0, n - 2))]) / (2 * h)
    return out


def _dc_adj(b, ax, h):
    """Transpose of :func:`_dc` (for a ``b`` that is 0 on the boundary ring): ``(b[i−1] − b[i+1]) / (2h)`` of the
    zero-extended ``b`` on every node."""
    n = b.shape[ax]
    pad = [(0, 0)] * b.ndim
    pad[ax] = (1, 1)
    e = get_array_module(b).pad(b, pad)
    sl = lambda s: tuple(s if d == ax else slice(None) for d in range(b.ndim))  # noqa: E731
    return (e[sl(slice(0, n))] - e[sl(slice(2, n + 2))]) / (2 * h)


def _gvec(g, nd):
    return g[..., None] if nd == 2 else g


def vp_field(f, g, spacing):
    """``F = ∇f − ∇×g`` (central differences, interior nodes; 0 on the boundary ring), shape ``(*f.shape, nd)``."""
    xp = get_array_module(f)
    f = xp.asarray(f)
    nd = f.ndim
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    gv = _gvec(xp.asarray(g), nd)
    F = xp.stack([_dc(f, j, h[j]) for j in range(nd)], axis=-1)
    for o, c, ax, s in curl_terms(nd):
        F[..., o] -= s * _dc(gv[..., c], ax, h[ax])
    ring = xp.ones(f.shape, dtype=bool)
    ring[tuple(slice(1, n - 1) for n in f.shape)] = False
    F[ring] = 0
    return F


def vp_adjoint(b, spacing):
    """The transpose of :func:`vp_field` applied to ``b`` (0 on the boundary ring): ``(−∇·b, −∇×b)`` on every node
    (zero-extended central differences); in 2-D the second is the scalar ``−(∂_1 b_0 − ∂_0 b_1) = ∂_0 b_1 − ∂_1 b_0``
    (minus the physical-convention curl of b)."""
    xp = get_array_module(b)
    b = xp.asarray(b)
    nd = b.ndim - 1
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    df = sum(_dc_adj(b[..., j], j, h[j]) for j in range(nd))  # = −∇·b
    dg = xp.zeros(b.shape[:nd] + ((1,) if nd == 2 else (3,)), dtype=b.dtype)
    for o, c, ax, s in curl_terms(nd):
        dg[..., c] -= s * _dc_adj(b[..., o], ax, h[ax])
    return df, (dg[..., 0] if nd == 2 else dg)


# ----------------------------------------------------------------------------------------------------------------
# multilinear warp with the derivative of its interpolant
# ----------------------------------------------------------------------------------------------------------------
def _coords(u, h):
    xp = get_array_module(u)
    nd = u.shape[-1]
    shape = u.shape[:nd]
    grids = xp.meshgrid(*[xp.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return [grids[j] + u[..., j].astype(np.float64) / h[j] for j in range(nd)]


def _warp_linear_grad_numpy(img, u, h):
    return _interp_numpy(img, _coords(u, h), h)


def _interp_numpy(img, c, h):
    """The array-module path (numpy reference; CuPy data stay on the device)."""
    xp = get_array_module(img)
    nd = img.ndim
    i0, t, inside = [], [], []
    for j in range(nd):
        n = img.shape[j]
        cj = xp.clip(c[j], 0.0, n - 1.0)
        inside.append((c[j] >= 0.0) & (c[j] <= n - 1.0))
        ij = xp.minimum(xp.floor(cj).astype(np.intp), n - 2)
        i0.append(ij)
        t.append(cj - ij)
    val = xp.zeros(c[0].shape, dtype=np.float64)
    der = xp.zeros(c[0].shape + (nd,), dtype=np.float64)
    im = img.astype(np.float64)
    for corner in range(2 ** nd):
        bits = [(corner >> (nd - 1 - j)) & 1 for j in range(nd)]
        v = im[tuple(i0[j] + bits[j] for j in range(nd))]
        w = [t[j] if bits[j] else 1.0 - t[j] for j in range(nd)]
        val += functools.reduce(xp.multiply, w) * v
        for d in range(nd):
            wd = functools.reduce(xp.multiply, [w[j] for j in range(nd) if j != d], 1.0)
            der[..., d] += (1.0 if bits[d] else -1.0) * wd * v
    for d in range(nd):  # on a node (t = 0, not the first): the mean of the two cells' one-sided differences
        on = (t[d] == 0.0) & (i0[d] > 0)
        if xp is np and not on.any():  # (on the device no test: it would be a synchronising read)
            continue
        back = xp.zeros(c[0].shape, dtype=np.float64)
        for corner in range(2 ** nd):
            bits = [(corner >> (nd - 1 - j)) & 1 for j in range(nd)]
            if bits[d]:
                continue
            wd = functools.reduce(xp.multiply, [t[j] if bits[j] else 1.0 - t[j] for j in range(nd) if j != d], 1.0)
            hi = tuple(i0[j] + bits[j] for j in range(nd))
            lo = tuple(i0[j] - 1 if j == d else i0[j] + bits[j] for j in range(nd))  # -1 only where not `on`
            back += wd * (im[hi] - im[lo])
        der[..., d] = xp.where(on, 0.5 * (der[..., d] + back), der[..., d])
    for d in range(nd):
        der[..., d] *= inside[d] / h[d]
    return val, der


def _numba_warp():
    import numba

    @numba.njit(parallel=True, cache=True)
    def run(img, c, val, der, h):  # img (n0,n1,n2), c (N, 3) index coords; 2-D as (1, n0, n1) with c[:,0] = 0
        N = c.shape[0]
        for p in numba.prange(N):
            i0 = np.empty(3, np.int64)
            t = np.empty(3, np.float64)
            ins = np.empty(3, np.float64)
            dv = np.empty(3, np.float64)
            for j in range(3):
                n = img.shape[j]
                x = c[p, j]
                ins[j] = 1.0 if (x >= 0.0 and x <= n - 1.0) else 0.0
                x = min(max(x, 0.0), n - 1.0)
                k = min(int(np.floor(x)), max(n - 2, 0))
                i0[j] = k
                t[j] = x - k
            v = 0.0
            d0 = 0.0
            d1 = 0.0
            d2 = 0.0
            for b0 in range(2):
                if b0 == 1 and img.shape[0] == 1:
                    continue
                w0 = t[0] if b0 else 1.0 - t[0]
                s0 = 1.0 if b0 else -1.0
                for b1 in range(2):
                    w1 = t[1] if b1 else 1.0 - t[1]
                    s1 = 1.0 if b1 else -1.0
                    for b2 in range(2):
                        w2 = t[2] if b2 else 1.0 - t[2]
                        s2 = 1.0 if b2 else -1.0
                        a = img[i0[0] + b0, i0[1] + b1, i0[2] + b2]
                        v += w0 * w1 * w2 * a
                        d0 += s0 * w1 * w2 * a
                        d1 += w0 * s1 * w2 * a
                        d2 += w0 * w1 * s2 * a
            # on a node (t = 0, not the first): the mean of the two cells' one-sided differences
            dv[0], dv[1], dv[2] = d0, d1, d2
            for d in range(3):
                if t[d] != 0.0 or i0[d] == 0:
                    continue
                bk = 0.0
                for corner in range(8):
                    b = (corner >> 2, (corner >> 1) & 1, corner & 1)
                    if b[d] == 1 or (b[0] == 1 and img.shape[0] == 1):
                        continue
                    w = 1.0
                    for j in range(3):
                        if j != d:
                            w *= t[j] if b[j] else 1.0 - t[j]
                    hi0, hi1, hi2 = i0[0] + b[0], i0[1] + b[1], i0[2] + b[2]
                    bk += w * (img[hi0, hi1, hi2] - img[hi0 - (d == 0), hi1 - (d == 1), hi2 - (d == 2)])
                dv[d] = 0.5 * (dv[d] + bk)
            d0, d1, d2 = dv[0], dv[1], dv[2]
            val[p] = v
            der[p, 0] = d0 * ins[0] / h[0]
            der[p, 1] = d1 * ins[1] / h[1]
            der[p, 2] = d2 * ins[2] / h[2]

    return run


@functools.lru_cache(maxsize=None)
def _numba_warp_cached():
    return _numba_warp()


def warp_linear_grad(img, u, *, spacing=1.0, backend=None):
    """``(I∘φ, (∂I/∂x)∘φ)`` for ``φ = id + u`` with the bi/trilinear interpolant of ``img`` and its exact derivative
    (per physical axis, 1/mm): in the cell containing φ(x), the one-sided differences blended linearly in the other
    coordinates (§6.1 (ii)). float64 out. ``backend``: "numpy" (reference) or "numba" (default when installed);
    CuPy data run the numpy reference as array-module code on their device (``backend`` None or "cuda")."""
    if is_cupy_array(img):
        if backend not in (None, "cuda"):
            raise ValueError(f"backend={backend!r} runs on the CPU but img is a CuPy array")
        backend = "numpy"
    else:
        img = np.asarray(img)
    nd = img.ndim
    if nd not in (2, 3) or u.shape != img.shape + (nd,):
        raise ValueError(f"img must be 2-D/3-D and u of shape {img.shape + (nd,)}, got {img.shape}, {u.shape}")
    if any(n < 2 for n in img.shape):
        raise ValueError(f"img needs at least 2 nodes per axis, got {img.shape}")
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    if backend is None:
        try:
            import numba  # noqa: F401
            backend = "numba"
        except ImportError:
            backend = "numpy"
    if backend == "numpy":
        return _warp_linear_grad_numpy(img, u, h)
    if backend != "numba":
        raise ValueError(f"backend must be 'numpy' or 'numba', got {backend!r}")
    c = np.stack(_coords(u, h), axis=-1).reshape(-1, nd)
    val, der = _interp_points(img, c, h, "numba")
    return val.reshape(img.shape), der.reshape(img.shape + (nd,))


# ----------------------------------------------------------------------------------------------------------------
# loss and its exact gradient
# ----------------------------------------------------------------------------------------------------------------
def vp_displacement(fhat, g, j_min, spacing, *, workers=None):
    """``u`` solving ``Δu = ∇f − ∇×g``, ``u = 0`` on ∂Ω (DST-I), with ``f = j_min + f̂²``."""
    f = j_min + fhat * fhat
    F = vp_field(f, g, spacing)
    return poisson_dirichlet(F, spacing=tuple(np.broadcast_to(spacing, (f.ndim,))), ndim=f.ndim, workers=workers)


def vp_loss_grad(fhat, g, fixed, moving, j_min, spacing, *, weight=None, data=None, backend=None, workers=None):
    """Discrete loss ``½ Π h Σ w (I_m∘φ − I_f)²`` and its exact gradients ``(∂/∂f̂, ∂/∂g)`` w.r.t. ``Π h Σ``.

    ``data(warped) -> (loss, ∂loss/∂warped)``, optional, replaces the SSD loss by another data term of the warped
    image (``weight`` is then the data term's business: register_vp's mutual information).

    Returns ``(loss, grad_fhat, grad_g, u, warped)``; ``u`` the displacement (mm), ``warped`` = I_m∘φ.
    """
    nd = fixed.ndim
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    vol = float(np.prod(h))
    u = vp_displacement(fhat, g, j_min, h, workers=workers)
    warped, dI = warp_linear_grad(moving, u, spacing=h, backend=backend)
    if data is not None:
        loss, dW = data(warped)
        r = dW / vol  # the per-voxel factor of the SSD force below, whose loss derivative is vol · r
    else:
        r = warped - fixed
        if weight is not None:
            r = r * weight
        loss = 0.5 * vol * float(get_array_module(r).sum(r * (warped - fixed)))
    force = r[..., None] * dI
    b = poisson_dirichlet(force.astype(fhat.dtype, copy=False), spacing=tuple(h), ndim=nd, workers=workers)
    df, dg = vp_adjoint(b, h)
    return loss, 2.0 * fhat * df, dg, u, warped


# ----------------------------------------------------------------------------------------------------------------
# the VP grid generator: a map with prescribed Jacobian determinant and curl (the paper's construction of φ⁻¹)
# ----------------------------------------------------------------------------------------------------------------
def jacobian_matrix(u, spacing):
    """``Dφ = I + Du`` of ``φ = id + u`` by the central differences of :func:`vp_field` (interior nodes; on the ring
    the differences across the grid edge are 0), shape ``(*spatial, nd, nd)``, ``[..., k, d] = ∂φ_k/∂x_d``."""
    u = np.asarray(u, dtype=np.float64)
    nd = u.shape[-1]
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    A = np.stack([np.stack([_dc(u[..., k], d, h[d]) for d in range(nd)], -1) for k in range(nd)], -2)
    return A + np.eye(nd)


def _cofactor(A):
    """Cofactor matrix ``∂ det A / ∂A`` (2-D and 3-D, batched)."""
    if A.shape[-1] == 2:
        return np.stack([np.stack([A[..., 1, 1], -A[..., 1, 0]], -1), np.stack([-A[..., 0, 1], A[..., 0, 0]], -1)], -2)
    return np.stack([np.cross(A[..., 1, :], A[..., 2, :]), np.cross(A[..., 2, :], A[..., 0, :]),
                     np.cross(A[..., 0, :], A[..., 1, :])], -2)


#: ``(curl component, row k, column d, sign)``: the physical-convention curl of a map from its matrix ``Dφ``
#: (:func:`kernels.diff.curl`: 2-D ``∂_1 φ_0 − ∂_0 φ_1``; 3-D in array order).
_CURL = {2: ((0, 0, 1, 1.0), (0, 1, 0, -1.0)),
         3: ((0, 1, 2, 1.0), (0, 2, 1, -1.0), (1, 2, 0, 1.0), (1, 0, 2, -1.0), (2, 0, 1, 1.0), (2, 1, 0, -1.0))}


def det_curl(A):
    """``(det A, curl)`` of Jacobian matrices ``A`` (``(*spatial, nd, nd)``); the curl has 1 (2-D) or 3 components."""
    nd = A.shape[-1]
    c = np.zeros(A.shape[:-2] + (1 if nd == 2 else 3,))
    for o, k, d, s in _CURL[nd]:
        c[..., o] += s * A[..., k, d]
    det = np.sum(A[..., 0, :] * _cofactor(A)[..., 0, :], axis=-1)
    return det, c


def vp_grid_loss_grad(fhat, g, jd, curl, j_min, spacing, *, weight=None, curl_weight=1.0, workers=None):
    """The VP grid generator's loss ``½ Π h Σ w [(det Dφ − jd)² + curl_weight |curl φ − curl₀|²]`` for the VP map of
    the controls ``(f̂, g)`` and its exact gradient w.r.t. ``(f̂, g)`` (same ``Π h Σ`` convention as
    :func:`vp_loss_grad`): ``∂/∂Dφ`` is the cofactor (det) and the curl's signs, sent back through the transposed
    central differences, then the same adjoint Poisson solve and :func:`vp_adjoint` (Zhou & Liao, METHODS.md §6.2
    step 9). ``jd``: prescribed det, ``(*spatial)``; ``curl``: prescribed curl, ``(*spatial, 1 or 3)``.

    Returns ``(loss, grad_fhat, grad_g, u)``.
    """
    nd = fhat.ndim
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
    u = vp_displacement(fhat, g, j_min, h, workers=workers)
    A = jacobian_matrix(u, h)
    det, c = det_curl(A)
    rd = det - jd
    rc = c - curl
    if weight is not None:
        rd, rc = rd * weight, rc * weight[..., None]
    loss = 0.5 * float(np.prod(h)) * float(np.sum(rd * (det - jd)) + curl_weight * np.sum(rc * (c - curl)))
    dA = rd[..., None, None] * _cofactor(A)
    for o, k, d, s in _CURL[nd]:
        dA[..., k, d] += curl_weight * s * rc[..., o]
    for d in range(nd):  # _dc is 0 on the end slices along its axis: their entries of ∂/∂Dφ do not depend on u
        end = [slice(None)] * nd
        for sl in (0, -1):
            end[d] = sl
            dA[tuple(end) + (slice(None), d)] = 0.0
    force = np.stack([sum(_dc_adj(dA[..., k, d], d, h[d]) for d in range(nd)) for k in range(nd)], -1)
    b = poisson_dirichlet(force, spacing=tuple(h), ndim=nd, workers=workers)
    df, dg = vp_adjoint(b, h)
    return loss, 2.0 * fhat * df, dg, u


# ----------------------------------------------------------------------------------------------------------------
# inverse of a (multilinearly interpolated) map by damped Newton iteration
# ----------------------------------------------------------------------------------------------------------------
def _solve_small(J, r):
    """``J⁻¹ r`` per node for ``(…, n, n)`` matrices (n = 2, 3) by cofactors; ``None`` where ``|det J|`` is tiny."""
    xp = get_array_module(J)
    nd = r.shape[-1]
    if nd == 2:
        a, b, c, d = J[..., 0, 0], J[..., 0, 1], J[..., 1, 0], J[..., 1, 1]
        det = a * d - b * c
        x = xp.stack([d * r[..., 0] - b * r[..., 1], a * r[..., 1] - c * r[..., 0]], axis=-1)
    else:
        C = xp.empty_like(J)  # adjugate: C[i, j] = cofactor(j, i)
        for i in range(3):
            for j in range(3):
                i1, i2 = [k for k in range(3) if k != j]
                j1, j2 = [k for k in range(3) if k != i]
                C[..., i, j] = (-1.0) ** (i + j) * (J[..., i1, j1] * J[..., i2, j2] - J[..., i1, j2] * J[..., i2, j1])
        det = J[..., 0, 0] * C[..., 0, 0] + J[..., 0, 1] * C[..., 1, 0] + J[..., 0, 2] * C[..., 2, 0]
        x = xp.einsum("...ij,...j->...i", C, r)
    ok = xp.abs(det) > 1e-8
    return x / xp.where(ok, det, 1.0)[..., None], ok


def _interp_points(img, c, h, backend):
    """Multilinear interpolant of ``img`` and its exact derivative (1/mm) at index coordinates ``c`` (N, nd)."""
    nd = img.ndim
    if backend == "numpy" or is_cupy_array(img):
        return _interp_numpy(img, [c[:, j] for j in range(nd)], h)
    im = np.ascontiguousarray(img, dtype=np.float64)
    hh = np.asarray(h, dtype=np.float64)
    if nd == 2:
        im = im[None]
        c = np.concatenate([np.zeros((c.shape[0], 1)), c], axis=1)
        hh = np.concatenate([[1.0], hh])
    val = np.empty(c.shape[0])
    der = np.empty((c.shape[0], 3))
    _numba_warp_cached()(im, np.ascontiguousarray(c, dtype=np.float64), val, der, hh)
    return val, der[:, 3 - nd:]


def _map_residual(u, nodes, w, h, backend):
    """At the nodes ``nodes`` (N, nd; index coordinates) with inverse guesses ``w`` (N, nd; mm): ``r = w + u(x + w)``
    (mm) and ``J = I + Du(x + w)`` (N, nd, nd) with the exact derivative of the multilinear interpolant."""
    xp = get_array_module(u)
    nd = u.shape[-1]
    c = nodes + w / (h if xp is np else xp.asarray(h))
    vals, ders = zip(*(_interp_points(u[..., k], c, h, backend) for k in range(nd)))
    r = w + xp.stack(vals, axis=-1)
    J = xp.stack(ders, axis=-2)  # J[:, k, d] = ∂u_k/∂x_d
    for k in range(nd):
        J[:, k, k] += 1.0
    return r, J


def invert_newton(u, *, spacing=1.0, at=None, init=None, max_iter=30, tol=1e-4, max_halvings=8, backend=None):
    """Inverse displacement ``w`` of ``φ = id + u`` (``φ(y + w(y)) = y``) by damped Newton iteration.

    Solves ``r(w) = w + u(x + w) = 0`` node by node with ``w ← w − (I + Du(x + w))⁻¹ r``, where ``u`` is the
    multilinear interpolant of the node values (:func:`warp_linear_grad`, the interpolant the warp and
    :func:`kernels.fields.compose` use) and ``Du`` its exact derivative, so the iteration converges quadratically to
    the inverse of the interpolated map wherever it is invertible (det J > 0), unlike the fixed point
    ``w ← −u(x + w)``, which needs ``|Du| < 1`` (Chen et al. 2008). A node whose residual does not decrease has its
    step halved (at most ``max_halvings`` times); if it still does not decrease, it keeps its previous value.
    Outside the grid the map is edge-extended (clamped coordinates, derivative 0).

    Parameters
    ----------
    u : ndarray, shape (*spatial, ndim), ndim 2 or 3
        Displacement (mm).
    spacing : float or sequence of float
        Node spacing per array axis (mm).
    at : ndarray, shape (..., ndim), optional
        Index coordinates (in ``u``'s grid) of the points ``y`` to invert at; default every node of ``u``'s grid.
    init : ndarray, optional
        Initial guess of ``w`` (mm), shaped like ``at`` (or ``u``); default ``−u`` (0 when ``at`` is given).
    max_iter : int
        Newton iterations at most.
    tol : float
        Stop when ``max |r / h|`` (voxels, per-node Euclidean norm) is ``≤ tol``.
    max_halvings : int
        Step halvings per iteration for nodes whose residual grows.
    backend : {None, "numpy", "numba", "cuda"}
        Kernel of :func:`warp_linear_grad`. CuPy data (``u``, ``at``, ``init``) run the array-module path on their
        device; the loop then reads one number per iteration and halving (the active-set sizes are array shapes,
        which CuPy learns by a synchronisation) and two at the end.

    Returns
    -------
    w : ndarray (float64)
        The inverse displacement (mm) at every node (or at ``at``).
    info : dict
        ``max_error``, ``mean_error`` (voxels) of the final residual, ``iterations``.
    """
    xp = get_array_module(u)
    u = xp.asarray(u, dtype=np.float64)
    nd = u.shape[-1]
    if nd not in (2, 3) or u.ndim != nd + 1:
        raise ValueError(f"u must have shape (*spatial, ndim) with ndim 2 or 3, got {u.shape}")
    h = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,)).copy()
    if xp is not np:
        if backend not in (None, "cuda"):
            raise ValueError(f"backend={backend!r} runs on the CPU but u is a CuPy array")
        backend = "numpy"  # the array-module path, on the device
    if backend is None:
        try:
            import numba  # noqa: F401
            backend = "numba"
        except ImportError:
            backend = "numpy"
    if at is None:
        out_shape = u.shape
        nodes = xp.stack(xp.meshgrid(*[xp.arange(n, dtype=np.float64) for n in u.shape[:nd]], indexing="ij"), -1)
        w = -u if init is None else xp.asarray(init, dtype=np.float64)
    else:
        nodes = xp.asarray(at, dtype=np.float64)
        out_shape = nodes.shape
        w = xp.zeros(out_shape) if init is None else xp.asarray(init, dtype=np.float64)
    if w.shape != out_shape or out_shape[-1] != nd:
        raise ValueError(f"init (and at) must have shape {out_shape} with {nd} components, got {w.shape}")
    nodes = nodes.reshape(-1, nd)
    w = w.reshape(-1, nd).copy()
    hx = h if xp is np else xp.asarray(h)
    r, J = _map_residual(u, nodes, w, h, backend)
    err = xp.linalg.norm(r / hx, axis=-1)
    act = xp.flatnonzero(err > tol)  # the nodes still iterating
    r, J = r[act], J[act]
    it = 0
    while act.size and it < max_iter:
        it += 1
        delta, ok = _solve_small(J, -r)
        delta = xp.where(ok[:, None], delta, -r)  # a singular Jacobian: fall back to the fixed-point step
        w0, e0 = w[act], err[act]
        lam = xp.ones(act.size)
        w_new = w0 + delta
        r_new, J_new = _map_residual(u, nodes[act], w_new, h, backend)
        e_new = xp.linalg.norm(r_new / hx, axis=-1)
        for _ in range(max_halvings):
            bad = xp.flatnonzero(e_new > e0)
            if not bad.size:
                break
            lam[bad] *= 0.5
            w_new[bad] = w0[bad] + lam[bad, None] * delta[bad]
            r_new[bad], J_new[bad] = _map_residual(u, nodes[act[bad]], w_new[bad], h, backend)
            e_new[bad] = xp.linalg.norm(r_new[bad] / hx, axis=-1)
        better = e_new <= e0  # a node that still got worse keeps its value and leaves the iteration
        w[act[better]] = w_new[better]
        err[act[better]] = e_new[better]
        keep = better & (e_new > tol)
        act, r, J = act[keep], r_new[keep], J_new[keep]
    return w.reshape(out_shape), {"max_error": float(err.max()), "mean_error": float(err.mean()), "iterations": it}
