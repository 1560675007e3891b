"""SISA exact unlearning as a registered method (Bourtoule et al. 2021, IEEE S&P).

``prepare`` trains the S-shard × R-slice ensemble (the single trained model θ* is not used:
SISA replaces it); ``forget`` retrains only the affected shards from their last unaffected
checkpoint (:func:`unlearn.sisa.forget`). ``Result.params`` is ``None`` (an ensemble) and
``Result.logits`` is the aggregate (mean probability or majority vote; the mean output for a
task that is not a classifier, e.g. squared-error regression). Defaults: 4 shards,
2 slices, uniform assignment, mean-probability aggregation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from unlearn import sisa as sisa_lib
from unlearn.data import as_ids
from unlearn.methods.base import Result, Unlearner
from unlearn.task import is_classifier
from unlearn.train import Fit, Problem


class SisaMethodState(NamedTuple):
    """The problem and the trained ensemble."""

    problem: Problem
    ensemble: sisa_lib.SisaState


def sisa(shards: int = 4, slices: int = 2, assignment: str = "uniform",
         aggregation: str = "mean_prob", strategy: str = "auto",
         groups: Callable[[np.ndarray], np.ndarray] | None = None) -> Unlearner:
    """SISA with ``shards`` × ``slices``, aggregated by ``mean_prob`` or ``vote``.

    ``groups``: a function of the training ids giving each one's group (e.g.
    ``unlearn.people.Benchmark.person_of``: SISA over persons) — whole groups are dealt to
    shards and slices (:func:`unlearn.sisa.make_layout`), so forgetting a person retrains one
    shard."""
    plan = sisa_lib.Plan(shards, slices, assignment)
    if aggregation not in ("mean_prob", "vote"):
        raise ValueError(f"aggregation={aggregation!r}: choose 'mean_prob' or 'vote'.")
    if groups is not None and not callable(groups):
        raise ValueError(f"groups={groups!r}: pass a function ids -> group keys (or None).")

    def prepare(problem: Problem, trained: Fit) -> SisaMethodState:
        del trained  # SISA trains its own ensemble in place of θ*
        layout = None if groups is None else sisa_lib.make_layout(
            plan, problem.train, problem.key, groups(np.asarray(problem.train.ids)))
        ens = sisa_lib.train(problem.model, problem.train, problem.cfg, plan, problem.key,
                             strategy=strategy, layout=layout)
        return SisaMethodState(problem, ens)

    def forget(state: SisaMethodState, forget_ids, key):
        del key  # exact unlearning: a function of the problem's key only
        ens, stats = sisa_lib.forget(state.ensemble, as_ids(forget_ids, "forget_ids"))
        result = Result(logits=lambda x: _predict(state.problem, ens, x, aggregation),
                        params=None, stats=stats)
        return result, state._replace(ensemble=ens)

    return Unlearner("sisa", prepare, forget)


def _predict(problem: Problem, ens: sisa_lib.SisaState, x, aggregation: str):
    """Classifiers: the ``aggregation`` of the shard probabilities; any other task (e.g.
    squared-error regression): the mean of the non-empty shards' outputs."""
    if is_classifier(problem.model):
        return sisa_lib.predict(ens, x, aggregation)
    out = sisa_lib.shard_logits(ens, x)
    w = jnp.asarray(ens.shard_sizes() > 0, out.dtype)
    return jnp.tensordot(w / jnp.maximum(w.sum(), 1.0), out, axes=1)
