"""The ``Unlearner`` interface (modelled on ``optax.GradientTransformation``).

An unlearning method is a NamedTuple of two pure functions whose hyperparameters are captured by
its constructor::

    state = unlearner.prepare(problem, trained)            # precompute (factor, checkpoints, ...)
    result, state = unlearner.forget(state, forget_ids, key)

``result`` predicts through ``result.logits(x)``, carries ``params`` where a single parameter
vector exists (``None`` for ensembles) and ``stats`` (iterations, residuals, points retrained).
The returned state has the ids removed, so requests can be chained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from unlearn.task import is_classifier
from unlearn.train import Fit, Problem, retain_mask

Params = Any


class Result(NamedTuple):
    """What a forget request returns: predictions, params (if any) and stats."""

    logits: Callable[[jax.Array], jax.Array]
    params: Params | None
    stats: dict


class Unlearner(NamedTuple):
    """``prepare(problem, trained) -> state``; ``forget(state, ids, key) -> (Result, state)``."""

    name: str
    prepare: Callable[[Problem, Fit], Any]
    forget: Callable[[Any, Any, jax.Array], tuple[Result, Any]]


class ParamState(NamedTuple):
    """The common state of single-model methods: problem, current params, retained weights."""

    problem: Problem
    params: Params
    weights: np.ndarray


def prepare_params(problem: Problem, trained: Fit) -> ParamState:
    """State for methods that start from the trained params and need nothing precomputed."""
    return ParamState(problem, trained.params, np.ones(len(problem.train), np.float32))


def next_weights(state: ParamState, forget_ids) -> tuple[np.ndarray, np.ndarray]:
    """Validated forget positions and the retained weights after removing them.

    Raises for unknown, duplicate or empty ids, for ids forgotten by an earlier request, and
    for a request that would leave no training data.
    """
    pos = state.problem.train.positions(forget_ids)
    gone = state.weights[pos] == 0
    if gone.any():
        ids = state.problem.train.ids[pos[gone]].tolist()
        raise ValueError(f"forget_ids {ids[:20]} were already forgotten by an earlier request.")
    w = state.weights.copy()
    w[pos] = 0.0
    if not (w > 0).any():
        raise ValueError(
            "forget_ids names every remaining training example: nothing would be left; "
            "forget a strict subset."
        )
    return pos, w


def check_convex(problem: Problem, method: str = "newton") -> None:
    """Raise a clear error for a model whose objective is not known to be strictly convex."""
    if not problem.model.convex:
        raise ValueError(
            f"method {method!r} needs a strictly convex model (model.convex=True, e.g. "
            f"unlearn.models.logreg or binary_logreg); got model {problem.model.name!r}: it "
            "relies on a positive-definite Hessian. For non-convex models use an approximate "
            "method (e.g. 'finetune' or 'influence'), 'newton' with solver='cg' and damping > 0 "
            "(damped Gauss-Newton), or exact retraining ('retrain')."
        )


def check_classes(problem: Problem, method: str) -> None:
    """Raise a clear error unless the task is a classifier (integer class labels and a loss
    on class probabilities): methods that relabel or compare softmax outputs need one."""
    loss = getattr(problem.model.apply, "loss", None)
    if not is_classifier(problem.model, problem.train):
        raise ValueError(
            f"method {method!r} needs a classification task (integer class labels and a "
            f"cross-entropy loss: it relabels examples or compares class probabilities); got "
            f"targets={getattr(problem.train, 'targets', 'classes')!r} and loss "
            f"{getattr(loss, 'name', 'cross_entropy')!r}. Use 'finetune', 'neggrad', "
            "'neggrad_plus', 'l1_sparse', 'influence', 'newton' or 'retrain'.")


def prepare_classifier(method: str) -> Callable[[Problem, Fit], ParamState]:
    """:func:`prepare_params` for methods that need a classification task."""

    def prepare(problem: Problem, trained: Fit) -> ParamState:
        check_classes(problem, method)
        return prepare_params(problem, trained)

    return prepare


def params_result(problem: Problem, params: Params, stats: dict) -> Result:
    """A :class:`Result` that predicts with ``problem.model.apply(params, x)``."""
    apply = problem.model.apply
    return Result(logits=lambda x: apply(params, x), params=params, stats=stats)


__all__ = ["ParamState", "Result", "Unlearner", "check_classes", "check_convex", "next_weights",
           "params_result", "prepare_classifier", "prepare_params", "retain_mask"]
