"""The shared test list every registered unlearning method must pass (like optax contrib's
``_common_test.py``): a new method earns its place by passing these unchanged.
"""

import jax
import numpy as np
import pytest

from unlearn import data, methods, models, train
from unlearn.metrics import flat

NAMES = sorted(methods.REGISTRY)


@pytest.fixture(scope="module")
def setting():
    s = data.load("digits")
    tr = s.train.subset(np.arange(400))
    cfg = train.TrainConfig(epochs=4, batch_size=64, lr=3e-3)
    out = {}
    for convex in (False, True):
        m = models.logreg(10) if convex else models.mlp(10, (32,))
        problem = train.Problem(m, tr, cfg, jax.random.key(0))
        out[convex] = (problem, train.train(problem), s.test)
    return out


def _get(setting, name):
    problem, trained, test = setting[methods.REGISTRY[name].convex_only]
    return methods.get(name), problem, trained, test


@pytest.mark.parametrize("name", NAMES)
def test_forget_returns_finite_predictions(setting, name):
    m, problem, trained, test = _get(setting, name)
    ids = data.select_forget(problem.train, count=8, seed=0)
    state = m.prepare(problem, trained)
    res, state2 = m.forget(state, ids, jax.random.key(1))
    logits = np.asarray(res.logits(test.x[:50]))
    assert logits.shape == (50, 10) and np.isfinite(logits).all()
    if res.params is not None:
        assert jax.tree.structure(res.params) == jax.tree.structure(trained.params)
        assert np.isfinite(flat(res.params)).all()
    assert isinstance(res.stats, dict)


@pytest.mark.parametrize("name", NAMES)
def test_forget_is_deterministic_given_key(setting, name):
    m, problem, trained, test = _get(setting, name)
    ids = data.select_forget(problem.train, count=5, seed=2)
    state = m.prepare(problem, trained)
    a, _ = m.forget(state, ids, jax.random.key(3))
    b, _ = m.forget(state, ids, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a.logits(test.x[:20])),
                                  np.asarray(b.logits(test.x[:20])))


@pytest.mark.parametrize("name", NAMES)
def test_forget_does_not_mutate_inputs(setting, name):
    m, problem, trained, _ = _get(setting, name)
    before = flat(trained.params).copy()
    state = m.prepare(problem, trained)
    m.forget(state, data.select_forget(problem.train, count=3, seed=4), jax.random.key(0))
    np.testing.assert_array_equal(before, flat(trained.params))


@pytest.mark.parametrize("name", NAMES)
def test_sequential_requests_and_refusals(setting, name):
    m, problem, trained, _ = _get(setting, name)
    ids = problem.train.ids
    state = m.prepare(problem, trained)
    _, state = m.forget(state, ids[:3], jax.random.key(0))
    _, state = m.forget(state, ids[3:6], jax.random.key(1))
    with pytest.raises(ValueError, match="already forgotten"):
        m.forget(state, ids[1:2], jax.random.key(2))
    with pytest.raises(KeyError, match="not in dataset"):
        m.forget(state, ["no-such-id"], jax.random.key(2))
    with pytest.raises(ValueError, match="duplicate"):
        m.forget(state, [ids[9], ids[9]], jax.random.key(2))
    with pytest.raises(ValueError, match="empty"):
        m.forget(state, [], jax.random.key(2))


def test_retrain_method_is_the_oracle(setting):
    problem, trained, _ = setting[False]
    ids = data.select_forget(problem.train, count=6, seed=5)
    res, _ = methods.get("retrain").forget(methods.get("retrain").prepare(problem, trained),
                                           ids, jax.random.key(0))
    oracle = train.fit(problem.model, problem.train.without(ids), problem.cfg, problem.key)
    np.testing.assert_allclose(flat(res.params), flat(oracle.params), rtol=1e-6, atol=1e-7)


def test_unknown_method():
    with pytest.raises(ValueError, match="not registered"):
        methods.get("no-such-method")
