"""Newton removal (Guo et al. 2020) against converged retraining on digits, float64.

θ* and the retrain oracle θ_r come from ``train.fit`` with L-BFGS to ‖∇L‖ ≤ 1e-10; the
distance ‖θ_u − θ_r‖/‖θ* − θ_r‖ is the median over 5 random requests. Bars from the issue
(measured there with a dense solve): one step ≤ 5e-3 / 3e-2 / 6e-2 for k = 1 / 10 / 100, a second
step ≤ 1e-3 for every k, whichever solver. The Woodbury downdate is compared with a direct dense
solve of the retained Hessian.
"""

import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn import data, inverse, methods, models, removal, train
from unlearn.metrics import relative_distance

L2 = 1e-3
ONE_STEP_BAR = {1: 5e-3, 10: 3e-2, 100: 6e-2}
TWO_STEP_BAR = 1e-3
REQUESTS = 5


@pytest.fixture(scope="module")
def digits64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        tr = data.load("digits").train
        cfg = train.TrainConfig(solver="lbfgs", l2=L2, tol=1e-10, max_iter=5000, dtype="float64")
        problem = train.Problem(models.logreg(10), tr, cfg, jax.random.key(0))
        trained = train.train(problem)
        assert trained.info["converged"]
        yield problem, trained, {}
    finally:
        jax.config.update("jax_enable_x64", old)


def _requests(digits64, k):
    """5 random forget sets of size k and their converged retrains (cached per k)."""
    problem, trained, cache = digits64
    if k not in cache:
        out = []
        for seed in range(REQUESTS):
            ids = data.select_forget(problem.train, count=k, seed=100 + seed)
            oracle = train.retrain(problem, ids)
            assert oracle.info["converged"]
            out.append((ids, oracle.params))
        cache[k] = out
    return cache[k]


def _median_distances(digits64, k, solver):
    problem, trained, _ = digits64
    out = {}
    for steps in (1, 2):
        m = methods.get("newton", solver=solver, steps=steps)
        state = m.prepare(problem, trained)
        d = []
        for ids, oracle in _requests(digits64, k):
            res, _ = m.forget(state, ids, jax.random.key(0))
            assert res.stats["converged"]
            d.append(relative_distance(res.params, oracle, trained.params))
        out[steps] = float(np.median(d))
    return out


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.parametrize("k", [1, 10, pytest.param(100, marks=pytest.mark.slow)])
def test_newton_distance_to_retrain(digits64, k, solver):
    d = _median_distances(digits64, k, solver)
    print(f"k={k} {solver}: one step {d[1]:.3g}, two steps {d[2]:.3g}")
    assert d[1] <= ONE_STEP_BAR[k]
    assert d[2] <= TWO_STEP_BAR
    assert d[2] < d[1]


@pytest.mark.parametrize("k", [1, 7, 40, 70])  # 70 × K = 700 ≥ p = 650: the direct branch
def test_woodbury_equals_dense_solve(digits64, k):
    problem, trained, _ = digits64
    apply, tr = problem.model.apply, problem.train
    x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)
    n = len(tr)
    damping = 0.0 if k != 7 else 1e-2  # also exercise the damped form
    curv = inverse.Curvature(apply, trained.params, x, y, L2, jnp.ones(n))
    fac = removal.newton_factor(curv, damping)
    pos = np.random.default_rng(k).choice(n, size=k, replace=False)
    w = np.ones(n)
    w[pos] = 0.0
    g = jax.random.normal(jax.random.key(k), (fac.evals.shape[0],), jnp.float64)
    v = removal.removed_curvature_factor(apply, trained.params, x[pos])
    res = removal.woodbury_solve(fac, v, k, g)
    # Independent: the dense retained Hessian by jax.hessian (chunked), solved directly.
    from unlearn import curvature

    h_r = curvature.hessian(apply, trained.params, x, y, jnp.asarray(w), L2)
    direct = np.linalg.solve(np.asarray(h_r) + damping * np.eye(h_r.shape[0]), np.asarray(g))
    np.testing.assert_allclose(np.asarray(res.x), direct, rtol=1e-10,
                               atol=1e-10 * np.abs(direct).max())
    assert float(res.residual) < 1e-12 and bool(res.converged)
    assert int(res.iterations) == 0  # a direct solve: no shift-correction iterations


def test_removed_curvature_factor_is_the_hessian_of_removed_losses(digits64):
    problem, trained, _ = digits64
    apply, tr = problem.model.apply, problem.train
    x, y = jnp.asarray(tr.x[:3]), jnp.asarray(tr.y[:3])
    v = removal.removed_curvature_factor(apply, trained.params, x)
    from unlearn import curvature

    # Hessian of the *sum* of the 3 losses = 3 × mean-objective Hessian with l2 = 0.
    h = 3.0 * curvature.hessian(apply, trained.params, x, y, jnp.ones(3), 0.0)
    np.testing.assert_allclose(np.asarray(v @ v.T), np.asarray(h), atol=1e-12)


def test_newton_on_nonconvex_model_needs_cg_and_damping():
    # Non-convex models are handled by CG on the damped Gauss-Newton matrix only: an exact
    # solve or zero damping would divide by a merely positive semi-definite curvature.
    tr = data.load("digits").train.subset(np.arange(100))
    problem = train.Problem(models.mlp(10, (8,)), tr, train.TrainConfig(epochs=1),
                            jax.random.key(0))
    trained = train.Fit(train.init_params(problem.model, tr, problem.key), {})
    with pytest.raises(ValueError, match="strictly convex model.*logreg"):
        methods.get("newton", solver="exact").prepare(problem, trained)
    with pytest.raises(ValueError, match="needs damping > 0"):
        methods.get("newton", damping=0.0).prepare(problem, trained)


def test_newton_bad_arguments():
    with pytest.raises(ValueError, match="solver='qr'"):
        methods.get("newton", solver="qr")
    with pytest.raises(ValueError, match="steps=3"):
        methods.get("newton", steps=3)


def test_cg_nonconvergence_is_reported_and_warned(digits64):
    problem, trained, _ = digits64
    m = methods.get("newton", solver="cg", maxiter=3)
    state = m.prepare(problem, trained)
    ids = data.select_forget(problem.train, count=5, seed=0)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res, _ = m.forget(state, ids, jax.random.key(0))
    assert res.stats["converged"] is False
    assert res.stats["iterations"] == 3
    assert res.stats["residual"] > 1e-8


def test_sequential_requests_track_retrain(digits64):
    """Two requests in a row (cached factor at θ*) stay close to retraining without both."""
    problem, trained, _ = digits64
    m = methods.get("newton", solver="exact", steps=2)
    state = m.prepare(problem, trained)
    ids = data.select_forget(problem.train, count=10, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, state = m.forget(state, ids[:5], jax.random.key(0))
        res, state = m.forget(state, ids[5:], jax.random.key(1))
    oracle = train.retrain(problem, ids)
    assert relative_distance(res.params, oracle.params, trained.params) < TWO_STEP_BAR
    assert res.stats["grad_norm"] < 1e-6


def test_projected_curvature_and_downdated_gradient_match_direct(digits64):
    """The per-request shortcuts equal what they replace: Z = Qᵀ V (V from vjps) and the
    retained gradient at θ* from a full pass over D∖U."""
    problem, trained, _ = digits64
    apply, tr = problem.model.apply, problem.train
    x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)
    n = len(tr)
    fac = removal.newton_factor(inverse.Curvature(apply, trained.params, x, y, L2,
                                                  jnp.ones(n)))
    pos = np.random.default_rng(3).choice(n, size=6, replace=False)
    z = removal.projected_removed_curvature(apply, trained.params, x[pos], fac.evecs)
    v = removal.removed_curvature_factor(apply, trained.params, x[pos])
    np.testing.assert_allclose(np.asarray(z), np.asarray(fac.evecs.T @ v), atol=1e-12)
    # The generic path (any pytree: here the same model over one flat vector) agrees too.
    theta, unravel = jax.flatten_util.ravel_pytree(trained.params)
    flat_apply = lambda t, xx: apply(unravel(t), xx)  # noqa: E731
    z_generic = removal.projected_removed_curvature(flat_apply, theta, x[pos], fac.evecs)
    np.testing.assert_allclose(np.asarray(z_generic), np.asarray(z), atol=1e-12)
    # Zero-weight padding rows (how the method buckets request sizes) add only zero columns.
    padded = np.concatenate([pos, pos[:2]])
    wpad = jnp.asarray([1.0] * 6 + [0.0] * 2)
    for f, a, p0 in ((apply, trained.params, z), (flat_apply, theta, z_generic)):
        zp = removal.projected_removed_curvature(f, a, x[padded], fac.evecs, wpad)
        np.testing.assert_allclose(np.asarray(zp[:, :60]), np.asarray(p0), atol=1e-12)
        assert float(jnp.abs(zp[:, 60:]).max()) == 0.0
    w = np.ones(n)
    w[pos] = 0.0
    g = removal.downdated_gradient(apply, trained.params, fac.grad_sum, x[pos], y[pos],
                                     jnp.ones(6), jnp.asarray(n - 6.0), jnp.asarray(L2))
    direct = removal.retained_gradient(apply, trained.params, x, y, jnp.asarray(w), L2)
    np.testing.assert_allclose(np.asarray(g), np.asarray(direct), rtol=1e-9,
                               atol=1e-12 * float(jnp.abs(direct).max()))


def test_factor_of_a_singular_hessian_asks_for_damping(digits64):
    """Without L2 the softmax-regression Hessian is singular (adding a constant to every
    class's logit changes nothing); the factor refuses and names a damping that works."""
    problem, trained, _ = digits64
    apply, tr = problem.model.apply, problem.train
    x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)
    with pytest.raises(ValueError, match="not positive definite.*damping="):
        removal.newton_factor(inverse.Curvature(apply, trained.params, x, y, 0.0,
                                                jnp.ones(len(tr))))
    fac = removal.newton_factor(inverse.Curvature(apply, trained.params, x, y, 0.0,
                                                  jnp.ones(len(tr))), damping=1e-3)
    assert float(fac.evals[0]) >= 1e-3 * (1 - 1e-9)
