"""classreg.optimise: the shared L-BFGS with trust region and backtracking line search."""
import itertools
import math

import numpy as np


def test_shared_lbfgs_minimises_a_quadratic_and_restarts():
    """classreg.optimise.minimise (the optimiser of register_lddmm) on an ill-conditioned quadratic: monotone, exact
    minimiser, trust-region step cap, rejection of non-finite trial values, and a restart from on_accept."""
    from classreg.optimise import Restart, minimise

    a = np.array([1.0, 10.0, 100.0])
    b = np.array([1.0, -2.0, 0.5])

    class Quadratic:
        calls = rejected = 0

        def value(self, x):
            self.calls += 1
            if np.abs(x).max() > 50:  # an "unstable" trial: rejected by the line search
                self.rejected += 1
                return math.inf, None
            return 0.5 * float(np.sum(a * x * x)) - float(b @ x), None

        def gradient(self, x, payload):
            return a * x - b

    q, x0 = Quadratic(), np.zeros(3)
    seen = []

    def on_accept(it):
        seen.append((it.iteration, it.f, it.step))
        assert it.step <= 2.0 ** (it.iteration + 1) + 1e-12  # Δ starts at 1 and at most doubles per iteration

    res = minimise(q, x0, q.value(x0)[0], q.gradient(x0, None), iterations=100, tol=0.0, on_accept=on_accept)
    np.testing.assert_allclose(res.x, b / a, rtol=1e-6)
    assert [s[0] for s in seen] == list(range(res.iterations))
    assert all(f1 <= f0 for (_, f0, _), (_, f1, _) in itertools.pairwise(seen))
    assert res.evaluations == q.calls - 1 and res.converged
    restarted = []

    def restart_once(it):
        if not restarted:
            restarted.append(it.iteration)
            return Restart(x0, q.value(x0)[0], q.gradient(x0, None), evaluations=1)
        return None

    r2 = minimise(q, x0, q.value(x0)[0], q.gradient(x0, None), iterations=100, on_accept=restart_once)
    np.testing.assert_allclose(r2.x, b / a, rtol=1e-6)
    assert restarted == [0]
    r3 = minimise(q, x0, q.value(x0)[0], q.gradient(x0, None), iterations=100, max_evaluations=3)
    assert r3.message == "function evaluation limit reached" and not r3.converged and r3.evaluations == 3
    q4 = Quadratic()  # a first trial at 100 × the steepest-descent step has an infinite value: it is cut back
    r4 = minimise(q4, x0, q4.value(x0)[0], q4.gradient(x0, None), iterations=100, radius=100.0)
    assert q4.rejected >= 1 and np.isfinite(r4.f)
    np.testing.assert_allclose(r4.x, b / a, rtol=1e-6)
