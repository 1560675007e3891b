"""Method-specific checks of the approximate methods, and the comparison experiment's
handling of a broken method (beyond the shared list in ``test_methods.py``)."""

import json

import jax
import numpy as np
import pytest

from experiments import compare_methods, runner
from unlearn import data, methods, models, train
from unlearn.methods import loops
from unlearn.methods.base import Unlearner, next_weights, params_result, prepare_params
from unlearn.methods.salun import saliency_mask
from unlearn.metrics import flat


@pytest.fixture(scope="module")
def setting():
    s = data.load("digits")
    tr = s.train.subset(np.arange(300))
    problem = train.Problem(models.mlp(10, (32,)), tr,
                            train.TrainConfig(epochs=8, batch_size=64, lr=3e-3),
                            jax.random.key(0))
    return problem, train.train(problem), data.select_forget(tr, count=20, seed=0)


def _forget_loss(problem, params, ids):
    pos = problem.train.positions(ids)
    return float(train.objective(problem.model.apply, params, problem.train.x[pos],
                                 problem.train.y[pos], np.ones(len(pos)), 0.0))


def test_neggrad_raises_forget_loss(setting):
    problem, trained, ids = setting
    m = methods.get("neggrad")
    res, _ = m.forget(m.prepare(problem, trained), ids, jax.random.key(0))
    assert _forget_loss(problem, res.params, ids) > _forget_loss(problem, trained.params, ids)


def test_random_labels_are_other_classes():
    y = np.arange(50) % 10
    rows = np.arange(0, 50, 2)
    out = loops.random_labels(y, rows, 10, jax.random.key(0))
    assert (out[rows] != y[rows]).all() and (out[rows] < 10).all()
    np.testing.assert_array_equal(np.delete(out, rows), np.delete(y, rows))


def test_salun_updates_only_salient_weights(setting):
    problem, trained, ids = setting
    pos = problem.train.positions(ids)
    mask = saliency_mask(problem, trained.params, pos, 0.3)
    frac = flat(mask).mean()
    assert abs(frac - 0.3) < 0.01, frac  # the top-30 % of |∇ forget loss|
    m = methods.get("salun", ratio=0.3)
    res, _ = m.forget(m.prepare(problem, trained), ids, jax.random.key(0))
    moved = flat(res.params) != flat(trained.params)
    frozen = flat(mask) == 0
    assert not moved[frozen].any() and moved[~frozen].mean() > 0.9


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="beta"):
        methods.get("neggrad_plus", beta=1.5)
    with pytest.raises(ValueError, match="ratio"):
        methods.get("salun", ratio=0.0)
    with pytest.raises(ValueError, match="temperature"):
        methods.get("scrub", temperature=0.0)
    with pytest.raises(ValueError, match="gamma"):
        methods.get("l1_sparse", gamma=-1.0)


def _broken() -> Unlearner:
    """A method that returns NaN params."""

    def forget(state, ids, key):
        _, w = next_weights(state, ids)
        nan = jax.tree.map(lambda a: a * np.nan, state.params)
        return params_result(state.problem, nan, {}), state._replace(params=nan, weights=w)

    return Unlearner("broken", prepare_params, forget)


def test_broken_method_is_reported_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "broken", methods.Entry(_broken))
    path = runner.run_experiment(compare_methods, config="smoke", out=tmp_path,
                                 methods=("finetune", "broken"))
    res = json.loads(path.read_text())["results"]
    summary = res["results"][0]["summary"]
    assert "non-finite" in summary["broken"]["failed"]
    assert "failed" not in summary["finetune"] and "mia_auc" in summary["finetune"]
    assert "| broken | failed:" in res["table"]
    assert (tmp_path / "smoke" / "compare_methods.png").exists()


@pytest.mark.slow
def test_compare_methods_smoke_every_registered_method(tmp_path):
    path = runner.run_experiment(compare_methods, config="smoke", out=tmp_path)
    summary = json.loads(path.read_text())["results"]["results"][0]["summary"]
    for name, entry in methods.REGISTRY.items():
        if not entry.convex_only:
            assert name in summary and "failed" not in summary[name], (name, summary.get(name))
    # the oracle row is the oracle (its gap is 0 by construction); check it learned instead:
    # digits, 3 epochs of Adam — far above the 0.1 of chance
    assert summary["retrain"]["test_acc"]["mean"] > 0.5, summary["retrain"]
