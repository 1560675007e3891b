"""Certified removal (Guo et al. 2020): perturbed training, residual ≤ data-dependent bound ≤
worst-case bound, the (ε, δ) budget and the retrain it triggers; float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn import certified, data, models, train
from unlearn.methods.certified import certified as certified_method
from unlearn.metrics import flat


@pytest.fixture
def small(x64):
    tr = data.load("digits").train.subset(np.arange(300))
    cfg = train.TrainConfig(solver="lbfgs", l2=1e-2, tol=1e-10, max_iter=5000, dtype="float64")
    problem = train.Problem(models.logreg(10), tr, cfg, jax.random.key(0))
    return problem, train.train(problem)


def _sum_form_grad(problem, params, w, b):
    """Independent sum-form gradient: Σ w ℓ + λ Σw/2 ‖θ‖² + bᵀθ, by jax.grad."""
    x, y = jnp.asarray(problem.train.x), jnp.asarray(problem.train.y)
    theta, unravel = jax.flatten_util.ravel_pytree(params)

    def f(t):
        logits = problem.model.apply(unravel(t), x)
        ll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
        return jnp.sum(w * ll) + problem.cfg.l2 * jnp.sum(w) / 2 * t @ t + b @ t

    return jax.grad(f)(theta)


def test_budget_formula_and_bad_input():
    assert certified.budget(2.0, 0.5, 1e-4) == pytest.approx(
        2.0 * 0.5 / math.sqrt(2 * math.log(1.5e4)))
    for kw in (dict(sigma=0.0), dict(epsilon=-1.0), dict(delta=1.5)):
        args = {"sigma": 1.0, "epsilon": 1.0, "delta": 1e-4, **kw}
        with pytest.raises(ValueError, match=next(iter(kw))):
            certified.budget(**args)
    with pytest.raises(ValueError, match="bound="):
        certified_method(bound="median")


def test_softmax_hessian_lipschitz_constant():
    """‖J(z+u) − J(z)‖₂ ≤ γ‖u‖ for J = diag p − ppᵀ, γ = 1/√2, on adversarial-ish samples."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(2000):
        k = rng.integers(2, 11)
        z = rng.normal(size=k) * rng.uniform(0, 6)
        u = rng.normal(size=k) * 10 ** rng.uniform(-4, 0)
        jac = lambda z: np.diag(np.exp(z - np.logaddexp.reduce(z))) - np.outer(
            np.exp(z - np.logaddexp.reduce(z)), np.exp(z - np.logaddexp.reduce(z)))
        worst = max(worst, np.linalg.norm(jac(z + u) - jac(z), 2) / np.linalg.norm(u))
    assert worst <= certified.GAMMA_SOFTMAX
    assert worst > 0.1  # the constant is not vacuous


def test_perturbed_training_reaches_the_perturbed_optimum(small):
    problem, trained = small
    b = 0.5 * jax.random.normal(jax.random.key(1), flat(trained.params).shape, jnp.float64)
    fit = certified.fit_perturbed(problem, b, params=trained.params)
    assert fit.info["converged"]
    g = _sum_form_grad(problem, fit.params, jnp.ones(len(problem.train)), b)
    assert float(jnp.linalg.norm(g)) < 1e-10 * len(problem.train) * 1.01


@pytest.mark.parametrize("m", [1, 5, 20])
def test_residual_below_data_bound_below_worst_case(small, m):
    problem, trained = small
    u = certified_method(epsilon=1e6, sigma=1.0)  # a budget that never triggers a retrain
    state = u.prepare(problem, trained)
    ids = data.select_forget(problem.train, count=m, seed=m)
    res, state2 = u.forget(state, ids, jax.random.key(0))
    s = res.stats
    assert not s["retrained"]
    w = train.retain_mask(problem, ids).astype(np.float64)
    indep = float(jnp.linalg.norm(_sum_form_grad(problem, res.params, jnp.asarray(w), state.b)))
    assert s["residual_norm"] == pytest.approx(indep, rel=1e-6, abs=1e-12)
    assert 0 < s["residual_norm"] <= s["data_bound"] <= s["worst_bound"]
    # The removal really moved the model towards the retained optimum.
    before = float(jnp.linalg.norm(_sum_form_grad(problem, state.params, jnp.asarray(w),
                                                  state.b)))
    assert s["residual_norm"] < 0.1 * before
    assert state2.beta == pytest.approx(state.beta + s["data_bound"])


def test_budget_spent_triggers_retrain(small):
    problem, trained = small
    # Calibrate: the budget allows the first removal of 3 points but not the second.
    probe = certified_method(epsilon=1e6, sigma=1.0)
    st = probe.prepare(problem, trained)
    ids = problem.train.ids
    r1, st1 = probe.forget(st, ids[:3], jax.random.key(0))
    r2, _ = probe.forget(st1, ids[3:6], jax.random.key(0))
    c = math.sqrt(2 * math.log(1.5 / 1e-4))
    target = st1.beta + 0.5 * r2.stats["data_bound"]
    u = certified_method(epsilon=target * c / 1.0, delta=1e-4, sigma=1.0)
    state = u.prepare(problem, trained)
    a, state = u.forget(state, ids[:3], jax.random.key(0))
    assert not a.stats["retrained"] and state.retrains == 0
    b, state = u.forget(state, ids[3:6], jax.random.key(5))
    assert b.stats["retrained"] and state.retrains == 1
    assert state.beta < 1e-6  # reset to the fresh model's own (tiny) residual
    # The retrained model is the perturbed optimum on D' with fresh noise from the key.
    w = train.retain_mask(problem, ids[:6]).astype(np.float64)
    g = _sum_form_grad(problem, b.params, jnp.asarray(w), state.b)
    assert float(jnp.linalg.norm(g)) < 1e-6
    assert not np.allclose(np.asarray(state.b), np.asarray(st.b))
    # Budget accounting continues from the reset.
    c_, state = u.forget(state, ids[6:7], jax.random.key(6))
    assert state.beta == pytest.approx(b.stats["beta"] + c_.stats["data_bound"])


def test_certified_refuses_nonconvex():
    tr = data.load("digits").train.subset(np.arange(50))
    problem = train.Problem(models.mlp(10, (4,)), tr, train.TrainConfig(), jax.random.key(0))
    fit = train.Fit(train.init_params(problem.model, tr, problem.key), {})
    with pytest.raises(ValueError, match="strictly convex"):
        certified_method().prepare(problem, fit)
