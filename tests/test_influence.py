"""Influence functions (Koh & Liang 2017) on digits softmax regression, float64: the definition
against a dense solve, CG against exact, and predicted vs actual leave-one-out retraining."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn import data, influence, models, train


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
    infl = influence.influence_up_loss(m.apply, star.params, x, y, xt, yt, 1e-3)
    # Independent: jax.hessian of the mean objective, dense solve, per-example grads by jax.grad.
    theta, unravel = jax.flatten_util.ravel_pytree(star.params)
    obj = lambda t: train.objective(m.apply, unravel(t), x, y, jnp.ones(len(tr)), 1e-3)  # noqa
    h = jax.hessian(obj)(theta)
    loss1 = lambda t, a, b: train.example_losses(m.apply, unravel(t), a[None], b[None])[0]  # noqa
    g_tr = jax.vmap(jax.grad(loss1), (None, 0, 0))(theta, x[:50], y[:50])
    g_te = jax.vmap(jax.grad(loss1), (None, 0, 0))(theta, xt, yt)
    expect = -(np.linalg.solve(np.asarray(h), np.asarray(g_te).T).T @ np.asarray(g_tr).T)
    np.testing.assert_allclose(np.asarray(infl[:, :50]), expect, rtol=1e-8, atol=1e-10)
    infl_cg = influence.influence_up_loss(m.apply, star.params, x, y, xt, yt, 1e-3, solver="cg")
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
    pred = np.asarray(influence.loo_test_loss_change(m.apply, star.params, x, y, xt, yt,
                                                     1e-3))[0]
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
