"""Membership inference and the NeurIPS 2023 forgetting score.

Independent references: a hand-computed ε/score case, ``train.fit`` for the vmapped ensemble,
and the retrain oracle vs "do nothing" on a model that overfits (an MLP trained long on 400
MNIST-1D examples: train accuracy 100 %, test far lower, so doing nothing leaks membership).
"""

import jax
import numpy as np
import pytest

from unlearn import data, methods, mia, models, train
from unlearn.methods.base import Unlearner, next_weights, params_result, prepare_params
from unlearn.metrics import flat


def nothing() -> Unlearner:
    """'Unlearning' that returns the original params unchanged."""

    def forget(state, ids, key):
        _, w = next_weights(state, ids)
        return params_result(state.problem, state.params, {}), state._replace(weights=w)

    return Unlearner("nothing", prepare_params, forget)


# ----------------------------------------------------------------------------- hand-computed


def test_forgetting_score_hand_computed():
    # One forget example, N = 4 models each. Unlearned outputs u, retrained outputs r:
    u = np.array([[1.0], [2.0], [3.0], [4.0]])
    r = np.array([[0.0], [1.0], [1.5], [2.5]])
    # Thresholds t ∈ {0, 1, 1.5, 2, 2.5, 3, 4}. Attack "unlearned iff v ≥ t",
    # FPR = #{r ≥ t}/4, FNR = #{u < t}/4, ε_t = max(log((1-δ-FPR)/FNR), log((1-δ-FNR)/FPR)):
    #   t=0, 1:  FNR = 0 (no u below) -> skipped
    #   t=1.5:   FPR = 2/4, FNR = 1/4 -> max(log(2 - 4δ), log(1.5 - 2δ)) = log(2 - 4δ)
    #   t=2:     FPR = 1/4, FNR = 1/4 -> log(3 - 4δ)            <- the maximum
    #   t=2.5:   FPR = 1/4, FNR = 2/4 -> log(2 - 4δ)
    #   t=3, 4:  FPR = 0 -> skipped
    # The reversed attacks ("unlearned iff v ≤ t") have FPR + FNR ≥ 1 here, so their ε ≤ 0.
    # Hence ε = log(3 - 4δ) ≈ 1.0986; bucket = digitize(1.0986, [0, .5, 1, 1.5, ...]) = 3,
    # H = 2 / 2^3 = 0.25.
    delta = 1e-5
    eps = mia.example_epsilon(u[:, 0], r[:, 0], delta)
    assert eps == pytest.approx(np.log(3 - 4 * delta), rel=1e-12)
    out = mia.score_from_outputs(u, r, retain_acc_u=0.9, retain_acc_r=1.0, test_acc_u=0.8,
                                 test_acc_r=0.7)
    # score = H · min(1, 0.9/1.0) · min(1, 0.8/0.7) = 0.25 · 0.9 · 1
    assert out["forget_quality"] == pytest.approx(0.25)
    assert out["score"] == pytest.approx(0.25 * 0.9)


def test_epsilon_edge_cases():
    # Identical outputs: every threshold gives FPR = 1 - FNR, ε ≤ log((1-δ-x)/(1-x)) < 0 → 0.
    same = np.array([0.0, 1.0, 2.0, 3.0])
    assert mia.example_epsilon(same, same) == 0.0
    assert mia.bucket_score(np.array([0.0]))[0] == 1.0
    # Perfect separation: a threshold with FPR = FNR = 0 → ε = ∞ → the last bucket, 2/2^13.
    eps = mia.example_epsilon(np.array([5.0, 6.0]), np.array([0.0, 1.0]))
    assert eps == np.inf
    assert mia.bucket_score(np.array([eps]))[0] == pytest.approx(2.0 / 2**13)
    # Bucket edges: [0, .5) → 1, [.5, 1) → 1/2, [1, 1.5) → 1/4.
    np.testing.assert_allclose(mia.bucket_score(np.array([0.49, 0.5, 1.0, 1.49])),
                               [1.0, 0.5, 0.25, 0.25])


def test_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        mia.loss_threshold_auc(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match=r"\(N, m\)"):
        mia.score_from_outputs(np.zeros((4, 2)), np.zeros((4, 3)), retain_acc_u=1,
                               retain_acc_r=1, test_acc_u=1, test_acc_r=1)


def test_attacks_on_separable_losses():
    fl, tl = np.linspace(0, 1, 20), np.linspace(2, 3, 40)
    assert mia.loss_threshold_auc(fl, tl) == 1.0
    kit = mia.kit_attack(fl, tl)
    assert kit["accuracy"] == 1.0 and kit["auc"] == 1.0
    np.testing.assert_allclose(mia.example_losses(np.log([[0.25, 0.75]]), np.array([1])),
                               [-np.log(0.75)])
    np.testing.assert_allclose(mia.logit_confidence(np.log([[0.2, 0.8]]), np.array([1])),
                               [np.log(0.8 / 0.2)])


# ----------------------------------------------------------------------------- ensembles


def test_train_ensemble_matches_fit():
    s = data.load("digits")
    tr = s.train.subset(np.arange(200))
    cfg = train.TrainConfig(epochs=5, batch_size=32, lr=3e-3)
    m = models.mlp(10, (16,))
    keys = [jax.random.key(i) for i in range(3)]
    w = np.ones((3, len(tr)), np.float32)
    w[1, :30] = 0.0  # a shorter epoch: padded with no-op steps in the ensemble
    ens = mia.train_ensemble(m, tr, cfg, keys, w)
    for i in range(3):
        ref = train.fit(m, tr, cfg, keys[i], weights=w[i]).params
        np.testing.assert_allclose(flat(mia.unstack(ens, i)), flat(ref), rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- retrain vs nothing


@pytest.fixture(scope="module")
def overfit():
    s = data.load("mnist1d")
    tr = s.train.subset(np.arange(400))
    cfg = train.TrainConfig(epochs=60, batch_size=64, lr=3e-3, l2=0.0)
    problem = train.Problem(models.mlp(10, (64,)), tr, cfg, jax.random.key(0))
    return problem, s, train.train(problem), data.select_forget(tr, count=40, seed=0)


def _attack(problem, split, trained, ids, method):
    res, _ = method.forget(method.prepare(problem, trained), ids, jax.random.key(1))
    tr = problem.train
    fl, tl = mia.forget_test_losses(res.logits, tr.subset(tr.positions(ids)), split.test)
    return mia.loss_threshold_auc(fl, tl), mia.kit_attack(fl, tl)["auc"]


def test_mia_auc_retrain_vs_nothing(overfit):
    problem, split, trained, ids = overfit
    auc_r, kit_r = _attack(problem, split, trained, ids, methods.get("retrain"))
    auc_n, kit_n = _attack(problem, split, trained, ids, nothing())
    # 40 forget vs 1000 test examples: the AUC's sampling s.d. is ≈ 0.05 under no leakage.
    assert abs(auc_r - 0.5) < 0.12, auc_r
    assert auc_n > 0.8 and auc_n > auc_r + 0.25, (auc_n, auc_r)
    assert kit_n > kit_r + 0.2, (kit_n, kit_r)


def test_forgetting_score_retrain_beats_nothing_fast(overfit):
    problem, split, _, ids = overfit
    kw = dict(n_models=16, key=jax.random.key(5))
    s_r = mia.forgetting_score(problem, split, ids, methods.get("retrain"), **kw)
    s_n = mia.forgetting_score(problem, split, ids, nothing(), **kw)
    assert s_r["score"] > s_n["score"] + 0.1, (s_r["score"], s_n["score"])
    assert s_r["retain_ratio"] > 0.95 and s_r["test_ratio"] > 0.95


@pytest.mark.slow
def test_forgetting_score_and_ulira_retrain_is_best_64_models(overfit):
    problem, split, trained, ids = overfit
    kw = dict(n_models=64, key=jax.random.key(5))
    scores = {name: mia.forgetting_score(problem, split, ids, m, **kw)["score"]
              for name, m in [("retrain", methods.get("retrain")), ("nothing", nothing()),
                              ("finetune", methods.get("finetune"))]}
    assert scores["retrain"] == max(scores.values()), scores
    assert scores["retrain"] > scores["nothing"] + 0.1, scores
    ul_r = mia.ulira(problem, methods.get("retrain"), problem.train.ids[:40], n_shadow=16,
                     key=jax.random.key(7))
    ul_n = mia.ulira(problem, nothing(), problem.train.ids[:40], n_shadow=16,
                     key=jax.random.key(7))
    assert abs(ul_r["auc"] - 0.5) < 0.05 and ul_n["auc"] > 0.8, (ul_r, ul_n)
