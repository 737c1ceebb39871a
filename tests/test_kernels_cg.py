"""kernels.cg: the numba PCG on CSR arrays against its numpy reference and against a dense solve."""
import numpy as np
import pytest
import scipy.sparse as sp

from classreg.kernels import _backend
from classreg.kernels.cg import pcg_csr


def _system(rng, m=200, k=3):
    A = sp.random(m, m, density=0.05, random_state=np.random.RandomState(1))
    G = (A @ A.T + sp.eye(m) * 0.1).tocsr()  # symmetric positive definite, sparse
    s = rng.uniform(0.0, 1.5, m)
    s[:5] = 0.0  # points without weight (ν = 0), as in the fine v-update
    c = 0.3
    dinv = 1.0 / (s * s * G.diagonal() + c)
    return G, s, c, dinv, rng.normal(size=(m, k))


@pytest.mark.parametrize("backend", ["numpy"] + (["numba"] if _backend.HAVE_NUMBA else []))
def test_pcg_solves_the_shifted_system(backend, rng):
    G, s, c, dinv, rhs = _system(rng)
    Z = np.zeros_like(rhs)
    steps = pcg_csr(G.indptr, G.indices, G.data, s, c, dinv, rhs, Z, tol=1e-10, max_iter=500, backend=backend)
    A = np.diag(s) @ G.toarray() @ np.diag(s) + c * np.eye(len(s))
    np.testing.assert_allclose(Z, np.linalg.solve(A, rhs), rtol=1e-7, atol=1e-9)
    assert 0 < steps < 500


@pytest.mark.skipif(not _backend.HAVE_NUMBA, reason="numba not installed")
def test_numba_matches_numpy_step_for_step(rng):
    G, s, c, dinv, rhs = _system(rng)
    out = {}
    for be in ("numpy", "numba"):
        Z = np.full_like(rhs, 0.1)  # a warm start, as the solver's
        out[be] = (pcg_csr(G.indptr, G.indices, G.data, s, c, dinv, rhs, Z, tol=1e-4, max_iter=7, backend=be), Z)
    assert out["numpy"][0] == out["numba"][0] == 7  # the step cap binds for both
    np.testing.assert_allclose(out["numba"][1], out["numpy"][1], rtol=1e-9, atol=1e-12)
