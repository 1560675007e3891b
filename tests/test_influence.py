"""Influence functions (Koh & Liang 2017) on digits softmax regression, float64: the definition
against a dense solve, CG against exact, and predicted vs actual leave-one-out retraining."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn import data, influence, inverse, models, train


@pytest.fixture
def digits(x64):
    tr = data.load("digits").train
    te = data.load("digits").test
    cfg = train.TrainConfig(solver="lbfgs", l2=1e-3, tol=1e-10, max_iter=5000, dtype="float64")
    problem = train.Problem(models.logreg(10), tr, cfg, jax.random.key(0))
    return problem, train.train(problem), te


def test_influence_definition_and_cg_match_dense(digits):
    problem, star, te = digits
    m, tr = problem.model, problem.train
    x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)
    xt, yt = jnp.asarray(te.x[:2]), jnp.asarray(te.y[:2])
    infl = influence.influence_up_loss(inverse.Curvature(m.apply, star.params, x, y, 1e-3),
                                       xt, yt).scores
    # Independent: jax.hessian of the mean objective, dense solve, per-example grads by jax.grad.
    theta, unravel = jax.flatten_util.ravel_pytree(star.params)
    obj = lambda t: train.objective(m.apply, unravel(t), x, y, jnp.ones(len(tr)), 1e-3)  # noqa
    h = jax.jit(jax.hessian(obj))(theta)
    loss1 = lambda t, a, b: train.example_losses(m.apply, unravel(t), a[None], b[None])[0]  # noqa
    g_tr = jax.vmap(jax.grad(loss1), (None, 0, 0))(theta, x[:50], y[:50])
    g_te = jax.vmap(jax.grad(loss1), (None, 0, 0))(theta, xt, yt)
    expect = -(np.linalg.solve(np.asarray(h), np.asarray(g_te).T).T @ np.asarray(g_tr).T)
    np.testing.assert_allclose(np.asarray(infl[:, :50]), expect, rtol=1e-8, atol=1e-10)
    out_cg = influence.influence_up_loss(inverse.Curvature(m.apply, star.params, x, y, 1e-3),
                                         xt, yt, inverse.CG())
    assert out_cg.solution.method == "block-cg" and out_cg.solution.iterations.shape == (2,)
    infl_cg = out_cg.scores
    np.testing.assert_allclose(np.asarray(infl_cg), np.asarray(infl), rtol=1e-6,
                               atol=1e-8 * float(jnp.abs(infl).max()))


def test_predicted_loo_change_matches_retraining(digits):
    """Pearson r ≥ 0.95 between predicted and actual leave-one-out test-loss changes."""
    problem, star, te = digits
    m, tr = problem.model, problem.train
    x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)
    losses = np.asarray(train.example_losses(m.apply, star.params, jnp.asarray(te.x),
                                             jnp.asarray(te.y)))
    t = int(np.argmax(losses))
    xt, yt = jnp.asarray(te.x[t:t + 1]), jnp.asarray(te.y[t:t + 1])
    pred = np.asarray(influence.loo_test_loss_change(
        inverse.Curvature(m.apply, star.params, x, y, 1e-3), xt, yt))[0]
    top = np.argsort(-np.abs(pred))[:8]
    base = float(train.example_losses(m.apply, star.params, xt, yt)[0])
    actual = []
    for i in top:
        w = np.ones(len(tr))
        w[i] = 0.0
        loo = train.fit(m, tr, problem.cfg, problem.key, weights=w, params=star.params)
        assert loo.info["converged"]
        actual.append(float(train.example_losses(m.apply, loo.params, xt, yt)[0]) - base)
    r = np.corrcoef(actual, pred[top])[0, 1]
    assert r >= 0.95
    # The sign and scale are right, not only the correlation.
    np.testing.assert_allclose(pred[top], actual, rtol=0.2, atol=0.05 * np.abs(actual).max())


@pytest.fixture
def tiny_mlp(x64):
    """A trained 6-8-3 MLP (p = 83) on 120 points, float64."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 6))
    y = (x[:, 0] + x[:, 1] ** 2 > 1).astype(int) + (x[:, 2] > 0.5)
    ds = data.make(x[:120], y[:120], num_classes=3, name="tiny")
    cfg = train.TrainConfig(solver="lbfgs", l2=1e-2, tol=1e-10, max_iter=3000, dtype="float64")
    problem = train.Problem(models.mlp(3, (8,)), ds, cfg, jax.random.key(0))
    star = train.train(problem)
    return problem, star, jnp.asarray(x[120:]), jnp.asarray(y[120:])


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_every_backend_against_dense_float64(tiny_mlp, kind):
    """Exact backends (exact, cg, pcg, pcg-ekfac) equal a dense float64 solve of the damped
    curvature built independently (jax.hessian / jacobians); approximate ones are checked by
    their own theory: Arnoldi with rank = p is exact, LiSSA to its contraction bound, EK-FAC
    (GGN, block-diagonal) correlates with the exact scores."""
    problem, star, xt, yt = tiny_mlp
    m, tr, l2, damping = problem.model, problem.train, 1e-2, 1e-2
    x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)
    theta, unravel = jax.flatten_util.ravel_pytree(star.params)
    p = theta.size
    if kind == "hessian":
        obj = lambda t: train.objective(m.apply, unravel(t), x, y, jnp.ones(len(tr)), l2)  # noqa
        h = jax.jit(jax.hessian(obj))(theta)
    else:
        jac = jax.jacobian(lambda t: m.apply(unravel(t), x))(theta)  # (n, K, p)
        pr = jax.nn.softmax(m.apply(star.params, x))
        hout = jax.vmap(jnp.diag)(pr) - pr[:, :, None] * pr[:, None, :]
        h = jnp.einsum("nkp,nkl,nlq->pq", jac, hout, jac) / len(tr) + l2 * jnp.eye(p)
    a = np.asarray(h) + damping * np.eye(p)
    assert np.linalg.eigvalsh(a)[0] > 0  # the damped system is PD, so every solver applies
    g_te = influence.example_gradients(m.apply, star.params, xt, yt)
    ref_s = np.linalg.solve(a, np.asarray(g_te).T).T
    g_tr = influence.example_gradients(m.apply, star.params, x, y)
    ref = -ref_s @ np.asarray(g_tr).T
    curv = inverse.Curvature(m.apply, star.params, x, y, l2, kind=kind)
    opts = dict(tol=1e-11, key=jax.random.PRNGKey(0))
    cond = np.linalg.cond(a)
    for backend in ("exact", "cg", "pcg", "pcg-ekfac"):
        if backend == "exact" and kind == "ggn":
            continue  # the dense path builds the GGN from the same products as ggn_vp
        out = influence.influence_up_loss(curv, xt, yt, inverse.backend(backend, rank=20, **opts),
                                          damping=damping)
        err = np.abs(np.asarray(out.scores) - ref).max() / np.abs(ref).max()
        assert err < cond * 1e-11, (backend, err)
        assert bool(jnp.all(out.solution.converged)), backend
    # Arnoldi with the full Krylov space: exact up to Lanczos' rounding (cond * eps).
    full = influence.influence_up_loss(curv, xt, yt, inverse.Arnoldi(rank=p, key=opts["key"]),
                                       damping=damping)
    assert np.abs(np.asarray(full.scores) - ref).max() / np.abs(ref).max() < 1e-6
    # LiSSA (deterministic, full batch): error <= (1 - lambda_min / s)^depth relative.
    ev = np.linalg.eigvalsh(a)
    depth = 3000
    out = influence.influence_up_loss(curv, xt, yt, inverse.LiSSA(depth=depth, key=opts["key"]),
                                      damping=damping)
    bound = (1 - ev[0] / (1.5 * ev[-1] * 1.05)) ** depth
    err = np.abs(np.asarray(out.s_test) - ref_s).max() / np.abs(ref_s).max()
    assert err < max(10 * bound, 1e-8)
    # EK-FAC approximates the GGN: agreement, not equality (block-diagonal, eigen-corrected).
    ek = influence.influence_up_loss(curv, xt, yt, inverse.EKFAC(), damping=damping)
    assert np.corrcoef(np.asarray(ek.scores).ravel(), ref.ravel())[0, 1] > 0.5


def test_scores_stream_without_per_example_gradients(tiny_mlp):
    problem, star, xt, yt = tiny_mlp
    m, tr = problem.model, problem.train
    x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)
    s = jax.random.normal(jax.random.key(1), (4, 83), jnp.float64)
    ref = np.asarray(s @ influence.example_gradients(m.apply, star.params, x, y).T)
    for chunk in (7, 50, 1000):  # uneven last chunk, several chunks, one chunk
        out = np.asarray(influence.influence_scores(m.apply, star.params, x, y, s, chunk))
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


def test_exact_backend_refuses_huge_p():
    big = {"params": {"Dense_0": {"bias": jnp.zeros(10), "kernel": jnp.zeros((4500, 10))}}}
    with pytest.raises(ValueError, match="40000 parameters use backend='pcg'"):
        inverse.Exact().prepare(inverse.Curvature(models.logreg(10).apply, big,
                                                  jnp.ones((3, 4500)), jnp.zeros(3, jnp.int32),
                                                  1e-3))
    # All-zero inputs: every kernel weight decouples, only the 10 bias coordinates remain.
    inv = inverse.Exact().prepare(inverse.Curvature(models.logreg(10).apply, big,
                                                    jnp.zeros((3, 4500)),
                                                    jnp.zeros(3, jnp.int32), 1e-3))
    assert inv.state.cholesky.factor.shape == (10, 10)


@pytest.mark.parametrize("k", [10, 1])
def test_exact_backend_drops_decoupled_features(k):
    """Features that are zero on every weighted example decouple (their Hessian rows are zero
    off the diagonal): the reduced factorisation must equal a dense float64 solve with the
    full jax.hessian, for softmax (K = 10) and binary logistic regression (K = 1)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        n, d = 60, 12
        x = rng.normal(size=(n, d))
        x[:, [0, 5, 6]] = 0.0  # dead on every example
        x[:, 9] = 0.0
        x[3, 9] = 2.0  # alive only on an example of weight 0: decoupled too
        w = np.ones(n)
        w[3] = 0.0
        y = rng.integers(0, max(k, 2), n)
        m = models.logreg(10) if k == 10 else models.binary_logreg()
        params = jax.tree.map(lambda a: jnp.asarray(
            rng.normal(size=a.shape) * 0.3), m.init(jax.random.key(0), jnp.zeros((1, d))))
        theta, unravel = jax.flatten_util.ravel_pytree(params)
        xj, yj, wj = jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)
        l2, damping = 1e-2, 1e-3
        obj = lambda t: train.objective(m.apply, unravel(t), xj, yj, wj, l2)  # noqa: E731
        a = np.asarray(jax.hessian(obj)(theta)) + damping * np.eye(theta.size)
        g = np.asarray(influence.example_gradients(m.apply, params, xj[:7], yj[:7]))
        inv = inverse.Exact().prepare(inverse.Curvature(m.apply, params, xj, yj, l2, wj),
                                      damping)
        assert isinstance(inv.state, inverse.DecoupledCholesky)
        assert inv.state.index.size == (d - 4 + 1) * k
        sol = inv.apply(jnp.asarray(g))
        ref = np.linalg.solve(a, g.T).T
        assert np.abs(np.asarray(sol.x) - ref).max() / np.abs(ref).max() < 1e-12
        assert bool(jnp.all(sol.converged))
