"""Membership inference against unlearned models, and the NeurIPS 2023 forgetting score.

* :func:`loss_threshold_auc` — the loss-threshold attack (Yeom et al. 2018): score = −loss,
  AUC of "member" (forget set) vs "non-member" (test set). A model that really forgot U scores
  ≈ 0.5, like a model retrained without U.
* :func:`kit_attack` — the NeurIPS 2023 Machine Unlearning challenge starting kit's attack:
  logistic regression on the per-example loss, forget (label 1) vs test (label 0), the larger
  set subsampled to the smaller's size, scored by stratified k-fold cross-validation
  (accuracy and AUC, mean over folds).
* :func:`ulira` — U-LiRA (Hayes et al. 2024, "Inexact unlearning needs more careful
  evaluations to avoid a false sense of privacy"): a per-example likelihood-ratio attack whose
  shadow models are *unlearned* with the method under test, against shadows retrained without
  the example; Gaussians on the logit-scaled confidence.
* :func:`forgetting_score` / :func:`score_from_outputs` — the challenge's forgetting-quality
  score (Triantafillou et al. 2024, "Are we making progress in unlearning? Findings from the
  first NeurIPS unlearning competition", Sec. 3), from N unlearned and N retrained models.

Shadow / reference models are trained as one ensemble of the training engine
(:func:`train_ensemble`, :mod:`unlearn.engine`), each model with its own key, weights and data
order (the engine's strategy per model and backend; see docs/architecture.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_validate

from unlearn import engine
from unlearn.data import Dataset, Split, stable_hash
from unlearn.methods.base import Unlearner
from unlearn.metrics import accuracy, log_softmax, predict_logits
from unlearn.train import Fit, Problem, TrainConfig, augmentation, key_seed, retain_mask

Params = Any
DELTA = 1e-5
BIN_WIDTH = 0.5
NUM_BINS = 13

# ----------------------------------------------------------------------------- per-example


def example_losses(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy −log softmax(z)_y per example (float64)."""
    lp = log_softmax(np.asarray(logits, np.float64))
    return -lp[np.arange(len(y)), np.asarray(y)]


def logit_confidence(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Logit-scaled confidence φ = log(p_y / (1 − p_y)) (Carlini et al. 2022, LiRA), stably:
    z_y − logsumexp_{k≠y} z_k."""
    z = np.asarray(logits, np.float64)
    zy = z[np.arange(len(y)), np.asarray(y)]
    other = z.copy()
    other[np.arange(len(y)), np.asarray(y)] = -np.inf
    m = other.max(-1)
    return zy - (m + np.log(np.exp(other - m[:, None]).sum(-1)))


# ----------------------------------------------------------------------------- attacks


def loss_threshold_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the attack "member iff loss < t" over all t (sklearn ``roc_auc_score``)."""
    a, b = np.asarray(member_losses), np.asarray(nonmember_losses)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("member_losses and nonmember_losses must both be non-empty.")
    labels = np.r_[np.ones(len(a)), np.zeros(len(b))]
    return float(roc_auc_score(labels, -np.r_[a, b]))


def kit_attack(forget_losses: np.ndarray, test_losses: np.ndarray, *, n_splits: int = 10,
               seed: int = 0) -> dict[str, float]:
    """The challenge kit's MIA: logistic regression on losses, forget (1) vs test (0).

    The larger set is subsampled (seeded) to the size of the smaller; the mean accuracy and AUC
    over ``min(n_splits, size)`` stratified folds are returned. Fewer than 2 examples per
    class give NaNs.
    """
    rng = np.random.default_rng(seed)
    f, t = np.asarray(forget_losses, np.float64), np.asarray(test_losses, np.float64)
    n = min(len(f), len(t))
    if n < 2:
        return {"accuracy": float("nan"), "auc": float("nan")}
    f, t = rng.permutation(f)[:n], rng.permutation(t)[:n]
    x = np.r_[f, t][:, None]
    members = np.r_[np.ones(n), np.zeros(n)]
    cv = StratifiedKFold(n_splits=min(n_splits, n), shuffle=True, random_state=seed)
    out = cross_validate(LogisticRegression(), x, members, cv=cv,
                         scoring=("accuracy", "roc_auc"))
    return {"accuracy": float(np.mean(out["test_accuracy"])),
            "auc": float(np.mean(out["test_roc_auc"]))}


def forget_test_losses(logits_fn, forget: Dataset, test: Dataset) -> tuple[np.ndarray, ...]:
    """Per-example losses of a model on the forget and test sets."""
    return (example_losses(predict_logits(logits_fn, forget.x), forget.y),
            example_losses(predict_logits(logits_fn, test.x), test.y))


# ----------------------------------------------------------------------------- ensembles


def stack(trees: Sequence[Params]) -> Params:
    """Stack pytrees along a new leading (model) axis."""
    return engine.stack(trees)


def unstack(tree: Params, i: int) -> Params:
    """Model ``i`` of stacked params."""
    return engine.unstack(tree, i)


def train_ensemble(model, data: Dataset, cfg: TrainConfig, keys: Sequence[jax.Array],
                   weights: np.ndarray | None = None) -> Params:
    """Train ``len(keys)`` models as one engine ensemble; returns stacked variables.

    Model s is ``unlearn.train.fit(model, data, cfg, keys[s], weights=weights[s])`` (SGD): the
    same init and the same data order rule, with the batches of shorter epochs padded by no-op
    steps. ``weights`` is (S, n) 0/1 (default all ones).
    """
    if cfg.solver != "sgd":
        raise ValueError(f"cfg.solver={cfg.solver!r}: train_ensemble supports solver='sgd'.")
    out = engine.train_members(
        model, data.x, data.y, stable_hash(data.ids), jnp.stack(list(keys)),
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
        l2=cfg.l2, dtype=cfg.dtype, strategy=cfg.strategy, weights=weights,
        augment=augmentation(cfg), desc=f"ensemble {model.name}")
    return out.members.variables()


def ensemble_logits(apply, stacked: Params, x: np.ndarray) -> np.ndarray:
    """(S, n, K) logits of every model of a stacked ensemble (eval-mode ``apply``)."""
    return np.asarray(engine.stacked_apply(apply, stacked, jnp.asarray(x)))


def unstack_one(tree: Params, i: int) -> Params:
    """Model ``i`` of stacked params, kept stacked (leading axis of size 1)."""
    return engine.take(tree, slice(i, i + 1))


# ----------------------------------------------------------------------------- forgetting score


def epsilon_from_rates(fpr: np.ndarray, fnr: np.ndarray, delta: float = DELTA) -> float:
    """max over attacks of ε = max(log((1−δ−FPR)/FNR), log((1−δ−FNR)/FPR)), floored at 0.

    As in the challenge kit: an attack with FPR = FNR = 0 separates perfectly (ε = ∞); one with
    only FPR = 0 or only FNR = 0 is skipped; NaNs (1 − δ − rate < 0) are ignored.
    """
    eps = [0.0]
    for a, b in zip(np.asarray(fpr, np.float64), np.asarray(fnr, np.float64)):
        if a == 0 and b == 0:
            return float("inf")
        if a == 0 or b == 0:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            e1 = np.log(1 - delta - a) - np.log(b)
            e2 = np.log(1 - delta - b) - np.log(a)
        if not (np.isnan(e1) and np.isnan(e2)):
            eps.append(float(np.nanmax([e1, e2])))
    return float(max(eps))


def example_epsilon(unlearned: np.ndarray, retrained: np.ndarray,
                    delta: float = DELTA) -> float:
    """ε of one forget example from its N unlearned and N retrained outputs.

    Threshold attacks at every observed value t, in both directions: "unlearned iff v ≥ t"
    (FPR = #{r ≥ t}/N, FNR = #{u < t}/N) and "unlearned iff v ≤ t" (FPR = #{r ≤ t}/N,
    FNR = #{u > t}/N); ε is :func:`epsilon_from_rates` over all of them.
    """
    u, r = np.asarray(unlearned, np.float64), np.asarray(retrained, np.float64)
    t = np.unique(np.r_[u, r])[:, None]
    fpr = np.r_[(r >= t).mean(1), (r <= t).mean(1)]
    fnr = np.r_[(u < t).mean(1), (u > t).mean(1)]
    return epsilon_from_rates(fpr, fnr, delta)


def bucket_score(eps: np.ndarray, bin_width: float = BIN_WIDTH,
                 num_bins: int = NUM_BINS) -> np.ndarray:
    """H(ε) = 2 / 2^b with b = digitize(ε, [0, w, 2w, …, (B−1)w]) ∈ {1, …, B}:
    1 for ε < w, 1/2 for ε ∈ [w, 2w), …, 2^(1−B) for ε ≥ (B−1)w (and ε = ∞)."""
    b = np.digitize(np.asarray(eps, np.float64), np.arange(num_bins) * bin_width)
    return 2.0 / 2.0**b


def score_from_outputs(unlearned: np.ndarray, retrained: np.ndarray, *, retain_acc_u: float,
                       retain_acc_r: float, test_acc_u: float, test_acc_r: float,
                       delta: float = DELTA) -> dict[str, Any]:
    """The NeurIPS 2023 unlearning challenge score from (N, m) outputs on m forget examples.

        F = (1/m) Σ_i H(ε_i)
        score = F · min(1, RA_u / RA_r) · min(1, TA_u / TA_r)

    with ε_i from :func:`example_epsilon` on column i, H from :func:`bucket_score`, and RA / TA
    the retain / test accuracies averaged over the N unlearned (u) and retrained (r) models
    (Triantafillou et al. 2024, Sec. 3 and the challenge's evaluation code).
    """
    u, r = np.asarray(unlearned), np.asarray(retrained)
    if u.ndim != 2 or u.shape[1] != r.shape[1]:
        raise ValueError(f"unlearned and retrained must be (N, m) with the same m; got "
                         f"{u.shape} and {r.shape}.")
    eps = np.array([example_epsilon(u[:, i], r[:, i], delta) for i in range(u.shape[1])])
    f = float(np.mean(bucket_score(eps)))
    ra = min(1.0, retain_acc_u / retain_acc_r)
    ta = min(1.0, test_acc_u / test_acc_r)
    return {"score": f * ra * ta, "forget_quality": f, "retain_ratio": ra, "test_ratio": ta,
            "epsilons": eps.tolist()}


def _method_outputs(problem: Problem, method: Unlearner, originals: Params, keys, forget_ids,
                    key: jax.Array) -> list:
    """Logit functions of ``method`` applied to each original model (its key in ``keys``).

    ``retrain`` is run as one vmapped ensemble (:func:`train_ensemble`, the same models as
    ``fit`` up to float rounding) instead of one ``fit`` per model.
    """
    if method.name == "retrain":
        w = np.tile(retain_mask(problem, forget_ids), (len(keys), 1))
        ens = train_ensemble(problem.model, problem.train, problem.cfg, keys, w)
        apply = problem.model.apply
        return [functools.partial(lambda i, x: apply(unstack(ens, i), x), i)
                for i in range(len(keys))]
    out = []
    for s, k in enumerate(keys):
        p = problem._replace(key=k)
        state = method.prepare(p, Fit(unstack(originals, s), {}))
        res, _ = method.forget(state, forget_ids, jax.random.fold_in(key, s))
        out.append(res.logits)
    return out


def forgetting_score(problem: Problem, split: Split, forget_ids, method: Unlearner, *,
                     n_models: int = 64, key: jax.Array) -> dict[str, Any]:
    """The challenge score of ``method``: N originals (vmapped) each unlearned by the method vs
    N models retrained without U (vmapped, independent keys); outputs are the logit-scaled
    confidences on the forget examples (:func:`score_from_outputs`)."""
    tr = problem.train
    keys = [jax.random.fold_in(key, s) for s in range(2 * n_models)]
    originals = train_ensemble(problem.model, tr, problem.cfg, keys[:n_models])
    w = np.tile(retain_mask(problem, forget_ids), (n_models, 1))
    retrained = train_ensemble(problem.model, tr, problem.cfg, keys[n_models:], w)
    forget = tr.subset(tr.positions(forget_ids))
    retain = tr.without(forget_ids)
    fns = _method_outputs(problem, method, originals, keys[:n_models], forget_ids,
                          jax.random.fold_in(key, 1 << 20))
    u = np.stack([logit_confidence(predict_logits(f, forget.x), forget.y) for f in fns])
    ra_u = np.mean([accuracy(predict_logits(f, retain.x), retain.y) for f in fns])
    ta_u = np.mean([accuracy(predict_logits(f, split.test.x), split.test.y) for f in fns])
    apply = problem.model.apply
    r = np.stack([logit_confidence(z, forget.y)
                  for z in ensemble_logits(apply, retrained, forget.x)])
    ra_r = np.mean([accuracy(z, retain.y) for z in ensemble_logits(apply, retrained, retain.x)])
    ta_r = np.mean([accuracy(z, split.test.y)
                    for z in ensemble_logits(apply, retrained, split.test.x)])
    return score_from_outputs(u, r, retain_acc_u=ra_u, retain_acc_r=ra_r, test_acc_u=ta_u,
                              test_acc_r=ta_r)


# ----------------------------------------------------------------------------- U-LiRA


def _gauss_logpdf(v, mu, var):
    return -0.5 * (np.log(2 * np.pi * var) + (v - mu) ** 2 / var)


def ulira(problem: Problem, method: Unlearner, target_ids, *, n_shadow: int = 16,
          key: jax.Array, min_var: float = 1e-4) -> dict[str, float]:
    """U-LiRA (Hayes et al. 2024, Alg. 1), small-scale, scored leave-one-shadow-out.

    Shadow s (its own key) forgets a random half F_s of the m target examples: the *unlearned*
    shadow is ``method`` applied to a model trained on all of D; the *retrained* shadow is
    trained on D∖F_s with the same key (both ensembles vmapped). For each target i and shadow s
    with i ∈ F_s, Gaussians N(μ_u, σ_u²), N(μ_r, σ_r²) of the logit-scaled confidence φ_i are
    fitted on the *other* shadows that forgot i, and the attack scores an output v by the log
    likelihood ratio log N(v; μ_u, σ_u²) − log N(v; μ_r, σ_r²). The unlearned output of shadow
    s is a positive, its retrained output a negative; returns the attack's AUC and its accuracy
    at ratio 1. An exact method (retraining) gives AUC 0.5.
    """
    tr = problem.train
    pos = tr.positions(target_ids)
    m = len(pos)
    if m < 2 or n_shadow < 4:
        raise ValueError(f"ulira needs ≥ 2 target_ids (got {m}) and n_shadow ≥ 4 "
                         f"(got {n_shadow}).")
    rng = np.random.default_rng(key_seed(key))
    inside = np.zeros((n_shadow, m), bool)
    for s in range(n_shadow):
        inside[s, rng.permutation(m)[: m // 2]] = True
    keys = [jax.random.fold_in(key, s) for s in range(n_shadow)]
    w = np.ones((n_shadow, len(tr)), np.float32)
    for s in range(n_shadow):
        w[s, pos[inside[s]]] = 0.0
    originals = train_ensemble(problem.model, tr, problem.cfg, keys)
    retrained = train_ensemble(problem.model, tr, problem.cfg, keys, w)
    x, y = tr.x[pos], tr.y[pos]
    r = np.stack([logit_confidence(z, y) for z in ensemble_logits(problem.model.apply,
                                                                   retrained, x)])
    u = np.zeros_like(r)
    for s in range(n_shadow):
        fn = _method_outputs(problem, method, unstack_one(originals, s), [keys[s]],
                             tr.ids[pos[inside[s]]], jax.random.fold_in(key, 1 << 20 | s))[0]
        u[s] = logit_confidence(predict_logits(fn, x), y)
    scores, labels = [], []
    for s in range(n_shadow):
        for i in np.nonzero(inside[s])[0]:
            others = inside[:, i].copy()
            others[s] = False
            if others.sum() < 2:
                continue
            mu_u, var_u = u[others, i].mean(), max(u[others, i].var(), min_var)
            mu_r, var_r = r[others, i].mean(), max(r[others, i].var(), min_var)
            for v, lab in ((u[s, i], 1), (r[s, i], 0)):
                scores.append(_gauss_logpdf(v, mu_u, var_u) - _gauss_logpdf(v, mu_r, var_r))
                labels.append(lab)
    scores, labels = np.asarray(scores), np.asarray(labels)
    return {"auc": float(roc_auc_score(labels, scores)),
            "accuracy": float(np.mean((scores > 0) == (labels == 1)))}

