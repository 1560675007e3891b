"""Evaluation against the retrain oracle: accuracy by split, parameter distance, KL,
disagreement and wall time."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from unlearn.data import Dataset


def predict_logits(logits_fn: Callable, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Logits for ``x`` in batches (so big test sets fit in memory)."""
    outs = [np.asarray(logits_fn(jnp.asarray(x[i: i + batch_size])))
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0))


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Fraction of examples whose arg-max logit is the label (NaN for an empty set)."""
    if len(y) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, -1) == y))


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis."""
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_divergence(logits_ref: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(p_ref ‖ p) over examples, p = softmax(logits); ref is the retrained model."""
    lr, lq = log_softmax(np.asarray(logits_ref, np.float64)), log_softmax(
        np.asarray(logits, np.float64))
    return float(np.mean(np.sum(np.exp(lr) * (lr - lq), -1)))


def disagreement(logits_ref: np.ndarray, logits: np.ndarray) -> float:
    """Fraction of examples where the two models predict different classes."""
    return float(np.mean(np.argmax(logits_ref, -1) != np.argmax(logits, -1)))


def flat(params: Any) -> np.ndarray:
    """The params pytree as one float64 vector."""
    return np.asarray(ravel_pytree(params)[0], np.float64)


def relative_distance(params_u: Any, params_r: Any, params_star: Any) -> float:
    """‖θ_u − θ_r‖ / ‖θ* − θ_r‖: 0 is the retrained model, 1 is "did nothing"."""
    u, r, s = flat(params_u), flat(params_r), flat(params_star)
    den = np.linalg.norm(s - r)
    return float(np.linalg.norm(u - r) / den) if den > 0 else float("nan")


def timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """Call ``fn`` and return (output, wall seconds), blocking on every array it returns."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(jax.tree.leaves(out, is_leaf=lambda a: isinstance(a, jax.Array)))
    return out, time.perf_counter() - t0


def split_accuracies(logits_fn: Callable, retain: Dataset, forget: Dataset,
                     test: Dataset) -> dict[str, float]:
    """Accuracy on the retained, forgotten and test examples."""
    return {
        f"{name}_acc": accuracy(predict_logits(logits_fn, d.x), d.y)
        for name, d in (("retain", retain), ("forget", forget), ("test", test))
    }


def compare_to_oracle(logits_fn: Callable, oracle_fn: Callable, forget: Dataset,
                      test: Dataset) -> dict[str, float]:
    """KL(retrain ‖ method) and disagreement on the forget and test sets."""
    out = {}
    for name, d in (("forget", forget), ("test", test)):
        a, b = predict_logits(oracle_fn, d.x), predict_logits(logits_fn, d.x)
        out[f"kl_{name}"] = kl_divergence(a, b)
        out[f"disagree_{name}"] = disagreement(a, b)
    return out


# ----------------------------------------------------------------------------- the papers' metrics
#
# Jia et al. 2023 ("Model sparsity can simplify machine unlearning", NeurIPS; the "l1-sparse"
# paper), Fan et al. 2024 (SalUn, ICLR) and Kurmanji et al. 2023 (SCRUB) report, for an
# unlearned model, in percent:
#   UA  (unlearning accuracy) = 100 · (1 − accuracy on the forget set D_f),
#   RA  (remaining accuracy)  = 100 · accuracy on the retained set D_r,
#   TA  (testing accuracy)    = 100 · accuracy on the test set,
#   MIA-efficacy              = 100 · fraction of D_f an SVC membership attack calls non-member
#                               (unlearn.mia.mia_efficacy),
#   RTE (run-time efficiency) = wall time of the unlearning call (minutes there; seconds here),
# and Avg. Gap = mean over (UA, RA, TA, MIA-efficacy) of |metric − retrain's metric|.

GAP_METRICS = ("UA", "RA", "TA", "MIA-efficacy")


def ua_ra_ta(logits_fn: Callable, retain: Dataset, forget: Dataset,
             test: Dataset) -> dict[str, float]:
    """UA, RA, TA in percent (Jia et al. 2023, Sec. 5.1): UA = 100 (1 − Acc(D_f))."""
    return {"UA": 100.0 * (1.0 - accuracy(predict_logits(logits_fn, forget.x), forget.y)),
            "RA": 100.0 * accuracy(predict_logits(logits_fn, retain.x), retain.y),
            "TA": 100.0 * accuracy(predict_logits(logits_fn, test.x), test.y)}


def avg_gap(row: dict, retrain_row: dict, keys=GAP_METRICS) -> float:
    """Avg. Gap (Jia et al. 2023, Table 3): mean |row[k] − retrain_row[k]| over ``keys``
    (UA, RA, TA, MIA-efficacy, in percentage points). Every key must be present and finite."""
    missing = [k for k in keys if k not in row or k not in retrain_row]
    if missing:
        raise ValueError(f"avg_gap needs {list(keys)}; missing {missing}.")
    d = [abs(float(row[k]) - float(retrain_row[k])) for k in keys]
    if not all(np.isfinite(d)):
        raise ValueError(f"avg_gap: non-finite metric in {[row[k] for k in keys]} or "
                         f"{[retrain_row[k] for k in keys]}.")
    return float(np.mean(d))


REGRESSION_GAP_METRICS = ("forget_loss", "retain_loss", "test_loss")


def task_losses(logits_fn: Callable, loss: Callable, retain: Dataset, forget: Dataset,
                test: Dataset) -> dict[str, float]:
    """Mean per-example task ``loss(outputs, y)`` on the retained, forgotten and test
    examples: the counterpart of UA/RA/TA for a task that is not a classifier (e.g. squared
    error), where accuracy is undefined."""
    return {f"{name}_loss": float(np.mean(np.asarray(loss(
        jnp.asarray(predict_logits(logits_fn, d.x)), jnp.asarray(d.y)))))
        for name, d in (("retain", retain), ("forget", forget), ("test", test))}


def output_distance(logits_fn: Callable, oracle_fn: Callable, forget: Dataset,
                    test: Dataset) -> dict[str, float]:
    """Root-mean-square distance of the outputs to the retrained model's on the forget and
    test sets (the counterpart of the KL for non-classifiers)."""
    return {f"out_dist_{name}": float(np.sqrt(np.mean(
        (predict_logits(logits_fn, d.x) - predict_logits(oracle_fn, d.x)) ** 2)))
        for name, d in (("forget", forget), ("test", test))}


def margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Margin z_y − logsumexp_{k≠y} z_k per example (Rinberg et al. 2024, KLOM's statistic),
    any leading axes (e.g. (models, n, K) → (models, n)), float64."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(y)
    zy = np.take_along_axis(z, np.broadcast_to(y[..., None], z.shape[:-1] + (1,)), -1)[..., 0]
    other = z.copy()
    np.put_along_axis(other, np.broadcast_to(y[..., None], z.shape[:-1] + (1,)), -np.inf, -1)
    m = other.max(-1)
    return zy - (m + np.log(np.exp(other - m[..., None]).sum(-1)))


KLOM_BINS, KLOM_EPS, KLOM_CLIP = 20, 1e-5, 100.0
KLOM_REFERENCE = "RoyRin/data-unlearning-bench@021993084e08a150a159149f85ebed4c4df8ffe0 src/eval.py"


def binned_kl(p_samples: np.ndarray, q_samples: np.ndarray, *, bins: int = KLOM_BINS,
              eps: float = KLOM_EPS, clip: float = KLOM_CLIP) -> float:
    """KL(p ‖ q) of two 1-d samples by the KLOM estimator (Georgiev, Rinberg et al. 2024,
    App. E.1; the authors' ``compute_binned_KL_div``, :data:`KLOM_REFERENCE`).

    Clip both samples to [−100, 100]; ``bins`` equal-width bins e_0 < … < e_B spanning the
    pooled range [min(p ∪ q), max(p ∪ q)] (width 1 if all values are equal); bin i holds v with
    e_{i−1} ≤ v < e_i (``np.digitize``), so a value *equal to the pooled maximum* falls outside
    every bin and is dropped, as in the authors' code. With P_i, Q_i the normalised counts,
    Q_i ← max(Q_i, ε) where P_i > 0, Q̃ = Q / Σ Q, and

        KL = Σ_{i: P_i > 0} P_i log(P_i / Q̃_i)      (nats; ``scipy.stats.entropy``).

    **Undefined → NaN.** When every sample of p, or every sample of q, is dropped (all equal
    to the pooled maximum — e.g. N identical models whose margin exceeds every oracle margin),
    one histogram is empty and there is no KL to estimate. The authors' code returns NaN when
    p is empty (scipy normalises a zero vector) but 0 when q is empty (the ε floor, once
    renormalised, puts all of Q̃ on P's bins); both are returned as NaN here, never 0, so a
    distribution that sits entirely outside the other's range cannot score "indistinguishable".
    """
    p = np.clip(np.asarray(p_samples, np.float64), -clip, clip)
    q = np.clip(np.asarray(q_samples, np.float64), -clip, clip)
    lo, hi = min(p.min(), q.min()), max(p.max(), q.max())
    if lo >= hi:
        hi = lo + 1
    edges = np.linspace(lo, hi, bins + 1)

    def counts(v):
        return np.bincount(np.digitize(v, edges), minlength=bins + 2)[1: bins + 1]

    cp, cq = counts(p), counts(q)
    if cp.sum() == 0 or cq.sum() == 0:
        return float("nan")
    pp, qq = cp / cp.sum(), cq / cq.sum()
    qq = np.where(pp > 0, np.maximum(qq, eps), qq)
    qq = qq / qq.sum()
    keep = pp > 0
    return float(np.sum(pp[keep] * np.log(pp[keep] / qq[keep])))


def klom(unlearned_margins: np.ndarray, oracle_margins: np.ndarray) -> np.ndarray:
    """KLOM per example (Georgiev, Rinberg, Park, Garg, Ilyas, Mądry & Neel 2024,
    "Attribute-to-Delete: Machine Unlearning via Datamodel Matching", ICLR 2025, App. E.1):

        KLOM(x) = KL( margins of x under the N unlearned models ‖ under the N oracles ),

    unlearned first, as the authors' ``kl_from_margins`` calls ``compute_binned_KL_div(
    unlearned, oracle)``; estimated by :func:`binned_kl` (20 bins, ε = 1e-5, clip ±100). Inputs
    are (models, n) margins (:func:`margins`). The N unlearned models must come from N
    *different* original models, each unlearned once (the authors' protocol;
    :func:`unlearn.mia.klom_score`); N runs of a method from one original measure only the
    method's own randomness. 0 is perfect, larger is worse; NaN where the estimator is
    undefined (:func:`binned_kl`; count them with :func:`klom_summary`)."""
    u, o = np.asarray(unlearned_margins), np.asarray(oracle_margins)
    if u.ndim != 2 or u.shape != o.shape:
        raise ValueError(f"unlearned_margins and oracle_margins must be (models, n) of the same "
                         f"shape; got {u.shape} and {o.shape}.")
    return np.array([binned_kl(u[:, i], o[:, i]) for i in range(u.shape[1])])


def klom_summary(k: np.ndarray, prefix: str = "klom") -> dict[str, float | int]:
    """Mean and 95th percentile of per-example KLOM values over the examples where it is
    defined, and ``{prefix}_undefined``, the number of NaN examples (:func:`binned_kl`). The
    count is always reported next to the mean: an undefined example is one whose unlearned (or
    oracle) margins all sit at the top of the pooled range, i.e. a maximally separated case,
    so a mean over the rest alone would flatter the method. NaN mean / p95 if none is
    defined."""
    k = np.asarray(k, np.float64)
    ok = np.isfinite(k)
    mean = float(np.mean(k[ok])) if ok.any() else float("nan")
    p95 = float(np.percentile(k[ok], 95)) if ok.any() else float("nan")
    return {f"{prefix}_mean": mean, f"{prefix}_p95": p95, f"{prefix}_undefined": int((~ok).sum())}


@functools.cache
def _relearn_step(apply: Callable, optimizer: str, lr: float):
    import optax

    from unlearn.engine import make_optimizer
    from unlearn.objective import objective

    opt = make_optimizer(optimizer, lr)

    def step(params, state, x, y, w):
        g = jax.grad(lambda p: objective(apply, p, x, y, w, 0.0))(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step), opt


def relearn_time(apply: Callable, params: Any, forget: Dataset, target_acc: float, *,
                 lr: float, batch_size: int = 32, optimizer: str = "adam",
                 max_steps: int = 500) -> int:
    """Relearn time (Golatkar et al. 2020; Tarun et al. 2023): the number of optimiser steps of
    fine-tuning on the forget set alone (batches in a fixed cycle through D_f) until the
    forget-set accuracy reaches ``target_acc`` (usually the original model's). 0 if it already
    does; ``max_steps + 1`` if it never does within ``max_steps``. Fewer steps = more residual
    information about D_f."""
    x, y = jnp.asarray(forget.x), jnp.asarray(forget.y)

    def acc(p):
        return float(np.mean(np.argmax(np.asarray(apply(p, x)), -1) == forget.y))

    if acc(params) >= target_acc:
        return 0
    step, opt = _relearn_step(apply, optimizer, float(lr))
    state = opt.init(params)
    n = len(forget)
    for s in range(1, max_steps + 1):
        i = np.arange((s - 1) * batch_size, s * batch_size) % n
        params, state = step(params, state, x[i], y[i], jnp.ones(len(i), x.dtype))
        if acc(params) >= target_acc:
            return s
    return max_steps + 1
