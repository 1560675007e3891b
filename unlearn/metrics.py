"""Evaluation against the retrain oracle: accuracy by split, parameter distance, KL,
disagreement and wall time."""

from __future__ import annotations

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
