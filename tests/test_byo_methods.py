"""Every registered method on models the package has never seen (the shared rows of
``tests/test_methods.py`` for user tasks): a flax linen module (LayerNorm + GELU), a flax NNX
module, a linear head on fixed random features (convex, with the parameter shapes of softmax
regression — the shape the old Hessian guess got wrong) and a squared-error linear regression.

A method either runs — finite outputs of the task's width, the variables' structure kept, the
same key giving the same result, ``retrain`` equal to a fit on the rebuilt data — or refuses at
``prepare`` with a ValueError that says why (``certified``'s bounds are proved for logistic and
softmax regression only; relabelling and softmax-comparing methods need a classifier).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from unlearn import data, methods, task, train

NAMES = sorted(methods.REGISTRY)
N = 120


class LNGelu(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.LayerNorm()(nn.Dense(16)(x.reshape(x.shape[0], -1))))
        return nn.Dense(10)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(64, 16, rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)
        self.b = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.gelu(self.ln(self.a(x.reshape(x.shape[0], -1)))))


_FEATURES = np.random.default_rng(0).normal(size=(64, 24)).astype(np.float32) / 8.0


class Head(nn.Module):
    """A trained linear layer on fixed random tanh features."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(jnp.tanh(x.reshape(x.shape[0], -1) @ _FEATURES))


def _tasks():
    digits = data.load("digits").train.subset(np.arange(N))
    rng = np.random.default_rng(1)
    xr = rng.normal(size=(N, 8)).astype(np.float32)
    reg = data.make(xr, xr @ rng.normal(size=(8, 2)) + 0.1 * rng.normal(size=(N, 2)),
                    targets="real")
    return {
        "linen": (task.from_linen(LNGelu()), digits),
        "nnx": (task.from_nnx(NNXNet), digits),
        "linear_head": (task.from_linen(Head(), convex=True), digits),
        "regression": (task.from_linen(nn.Dense(2), loss="squared_error", convex=True,
                                       name="linreg"), reg),
    }


# Methods that must refuse a task, and why (the match of the error message).
REFUSALS = {
    ("certified", "linen"): "strictly convex", ("certified", "nnx"): "strictly convex",
    ("certified", "linear_head"): "bounds", ("certified", "regression"): "bounds",
    **{(m, "regression"): "classification task"
       for m in ("random_labels", "salun", "scrub", "fisher")},
    # the language-model methods need token data (sequences with per-token targets)
    **{(m, k): "token" for m, e in methods.REGISTRY.items() if e.tokens_only
       for k in ("linen", "nnx", "linear_head", "regression")},
}


@pytest.fixture(scope="module")
def settings():
    cfg = train.TrainConfig(epochs=3, batch_size=64, lr=3e-3)
    out = {}
    for name, (t, ds) in _tasks().items():
        problem = train.Problem(t, ds, cfg, jax.random.key(0))
        out[name] = (problem, train.train(problem))
    return out


@pytest.mark.parametrize("kind", ["linen", "nnx", "linear_head", "regression"])
def test_every_method_on_a_user_task(settings, kind):
    problem, trained = settings[kind]
    ids = problem.train.ids[:6]
    x = problem.train.x[:10]
    width = 2 if kind == "regression" else 10
    for name in NAMES:
        m = methods.get(name)
        if (name, kind) in REFUSALS:
            with pytest.raises(ValueError, match=REFUSALS[name, kind]):
                m.prepare(problem, trained)
            continue
        state = m.prepare(problem, trained)
        a, state2 = m.forget(state, ids, jax.random.key(1))
        b, _ = m.forget(state, ids, jax.random.key(1))
        out = np.asarray(a.logits(x))
        assert out.shape == (10, width) and np.isfinite(out).all(), name
        np.testing.assert_array_equal(out, np.asarray(b.logits(x)), err_msg=name)
        if a.params is not None:
            assert jax.tree.structure(a.params) == jax.tree.structure(trained.params), name
        with pytest.raises(ValueError, match="already forgotten"):
            m.forget(state2, ids[:1], jax.random.key(2))


@pytest.mark.parametrize("kind", ["nnx", "regression"])
def test_retrain_on_a_user_task_is_the_fit_without_the_ids(settings, kind):
    """Exactness does not depend on the model's origin: the ``retrain`` method equals a fit
    on a dataset rebuilt from the kept rows (independent of the weight mask), bit for bit."""
    problem, trained = settings[kind]
    ids = problem.train.ids[3:9]
    m = methods.get("retrain")
    res, _ = m.forget(m.prepare(problem, trained), ids, jax.random.key(0))
    tr = problem.train
    keep = ~np.isin(tr.ids, ids)
    rebuilt = data.Dataset(tr.x[keep], tr.y[keep], tr.ids[keep], tr.num_classes, tr.name,
                           targets=tr.targets)
    oracle = train.fit(problem.model, rebuilt, problem.cfg, problem.key)
    np.testing.assert_array_equal(ravel_pytree(res.params)[0], ravel_pytree(oracle.params)[0])


def test_newton_on_the_convex_user_tasks_tracks_retraining(x64):
    """Exact Newton removal (cached eigenfactor + Woodbury downdate with the task's own output
    curvature) on the two convex user tasks, trained to ‖∇L‖ ≤ 1e-10 in float64: one step
    lands far closer to the retrained optimum than θ* (the error is second order)."""
    cfg = train.TrainConfig(solver="lbfgs", dtype="float64", tol=1e-10, l2=1e-2)
    for kind in ("linear_head", "regression"):
        t, ds = _tasks()[kind]
        problem = train.Problem(t, ds, cfg, jax.random.key(0))
        star = train.train(problem)
        ids = ds.ids[:4]
        oracle = train.retrain(problem, ids)
        u = methods.get("newton", solver="exact")
        res, _ = u.forget(u.prepare(problem, star), ids, jax.random.key(0))
        t_star, t_new, t_re = (ravel_pytree(p)[0] for p in (star.params, res.params,
                                                             oracle.params))
        before = float(jnp.linalg.norm(t_star - t_re))
        after = float(jnp.linalg.norm(t_new - t_re))
        # squared error on a linear model: the objective is quadratic, one step is exact
        bound = 1e-8 * before if kind == "regression" else 0.05 * before
        assert after <= bound, (kind, before, after)


def test_evaluate_reports_losses_for_a_regression_task(settings):
    """``evaluate`` on a squared-error task: mean task losses (checked against numpy) and the
    output distance to the retrained model instead of accuracies; retrain's gap is 0."""
    from unlearn.evaluate import evaluate

    problem, trained = settings["regression"]
    split = data.Split(train=problem.train, test=problem.train.subset(np.arange(20)))
    ids = problem.train.ids[:6]
    out = evaluate(problem, split, ids, ["finetune"], jax.random.key(0), trained=trained,
                   warmup=False, hparams=None)
    rows = out["rows"]
    assert rows["retrain"]["avg_gap"] == 0.0 and np.isfinite(rows["finetune"]["avg_gap"])
    oracle = train.retrain(problem, ids)
    fx, fy = problem.train.x[:6], problem.train.y[:6]
    ref = 0.5 * np.mean(np.sum((np.asarray(problem.model.apply(oracle.params, fx)) - fy) ** 2,
                               axis=1))
    np.testing.assert_allclose(rows["retrain"]["forget_loss"], ref, rtol=1e-5)
    assert rows["retrain"]["out_dist_forget"] == 0.0 and rows["finetune"]["out_dist_forget"] > 0


def test_membership_scores_take_a_user_task(settings):
    """The NeurIPS 2023 forgetting score and KLOM train their ensembles through the engine for
    any task: on the user linen classifier, retraining beats doing nothing on the score; a
    regression task is refused by name (the scores read class probabilities)."""
    from unlearn import mia
    from unlearn.evaluate import do_nothing

    problem, _ = settings["linen"]
    split = data.Split(train=problem.train, test=data.load("digits").test.subset(np.arange(60)))
    ids = problem.train.ids[:12]
    kw = dict(n_models=8, key=jax.random.key(5))
    s_r = mia.forgetting_score(problem, split, ids, methods.get("retrain"), **kw)
    s_n = mia.forgetting_score(problem, split, ids, do_nothing(), **kw)
    assert s_r["score"] > s_n["score"], (s_r["score"], s_n["score"])
    # KLOM's ensembles run for the user task too (its ordering needs an overfit model and
    # more members: tests/test_mia.py); per-example values are defined and finite here
    k_r = mia.klom_score(problem, split, ids, methods.get("retrain"), **kw)
    assert k_r["klom_forget_undefined"] == 0 and np.isfinite(k_r["klom_forget"]).all()
    reg, _ = settings["regression"]
    with pytest.raises(ValueError, match="class probabilities.*squared_error"):
        mia.forgetting_score(reg, data.Split(reg.train, reg.train), reg.train.ids[:3],
                             methods.get("retrain"), **kw)
