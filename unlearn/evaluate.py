"""The evaluation harness: every method against the retrain oracle, by the same code.

``evaluate`` trains θ* once, retrains the oracle without U, runs each method's
``prepare``/``forget`` (timed, blocking on results), and reports per method: accuracy on
retain/forget/test, relative parameter distance ‖θ_u − θ_r‖/‖θ* − θ_r‖ (where params exist),
KL and disagreement to the oracle on forget/test, wall time and speed-up over retraining, and
"Avg. Gap" (mean absolute difference to the oracle over retain/forget/test accuracy and, when
computed, MIA AUC — Jia et al. 2023). A method that raises or returns non-finite outputs is
reported as failed, not a crash of the whole comparison.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from unlearn import metrics
from unlearn.data import Split
from unlearn.methods import Result, Unlearner
from unlearn.methods import get as get_method
from unlearn.train import Fit, Problem, TrainConfig, retrain, train

GAP_KEYS = ("retain_acc", "forget_acc", "test_acc", "mia_auc")

Extra = Callable[..., dict]


def _finite_result(result: Result, x: np.ndarray) -> bool:
    if result.params is not None:
        leaves = jax.tree.leaves(result.params)
        if not all(np.all(np.isfinite(np.asarray(a))) for a in leaves):
            return False
    return bool(np.all(np.isfinite(metrics.predict_logits(result.logits, x[:256]))))


def method_metrics(result: Result, oracle: Result, problem: Problem, split: Split,
                   forget_ids, trained: Fit) -> dict[str, float]:
    """Accuracies, distance, KL and disagreement of one result against the oracle."""
    tr = problem.train
    forget = tr.subset(tr.positions(forget_ids))
    retain = tr.without(forget_ids)
    out = metrics.split_accuracies(result.logits, retain, forget, split.test)
    out.update(metrics.compare_to_oracle(result.logits, oracle.logits, forget, split.test))
    if result.params is not None and oracle.params is not None:
        out["rel_distance"] = metrics.relative_distance(result.params, oracle.params,
                                                        trained.params)
    return out


def avg_gap(row: dict, oracle_row: dict, keys: Sequence[str] = GAP_KEYS) -> float:
    """Mean |metric − oracle metric| over the keys both rows have (Jia et al. 2023)."""
    diffs = [abs(row[k] - oracle_row[k]) for k in keys
             if k in row and k in oracle_row and row[k] is not None
             and oracle_row[k] is not None and math.isfinite(row[k])]
    return float(np.mean(diffs)) if diffs else float("nan")


def evaluate(
    problem: Problem,
    split: Split,
    forget_ids,
    methods: dict[str, Unlearner] | Sequence[str],
    key: jax.Array,
    *,
    trained: Fit | None = None,
    extras: Sequence[Extra] = (),
    warmup: bool = True,
) -> dict[str, Any]:
    """Run every method on one forget request and measure it against retraining.

    Args:
      problem: model, training set, config, key (θ* = ``train(problem)``).
      split: for the test set.
      forget_ids: the ids to forget.
      methods: name -> Unlearner, or registered names. ``retrain`` is always included.
      key: randomness for the methods' ``forget``.
      trained: θ* if already trained.
      warmup: run each method (and the oracle) once untimed first, so times are steady-state
        and exclude XLA compilation (methods are pure, so the repeat is the same computation).
      extras: functions ``f(result=, oracle=, problem=, split=, forget_ids=, trained=) -> dict``
        adding metrics (e.g. membership inference) to each row.

    Returns:
      ``{"rows": {method: metrics...}, "train_time": s, "retrain_time": s}``; failed methods
      have ``{"failed": "<reason>"}``.
    """
    if not isinstance(methods, dict):
        methods = {m: get_method(m) for m in methods}
    problem.train.positions(forget_ids)  # validate before spending any compute
    if trained is None:
        trained, t_train = metrics.timed(train, problem)
    else:
        t_train = float("nan")
    if warmup:
        retrain(problem, forget_ids)
    oracle_fit, t_retrain = metrics.timed(retrain, problem, forget_ids)
    apply = problem.model.apply
    oracle = Result(lambda x: apply(oracle_fit.params, x), oracle_fit.params, oracle_fit.info)

    rows: dict[str, dict] = {}
    for name, m in {"retrain": None, **methods}.items():
        if name == "retrain":
            res, t = oracle, t_retrain
            t_prep = 0.0
        else:
            try:
                state, t_prep = metrics.timed(m.prepare, problem, trained)
                if warmup:
                    m.forget(state, forget_ids, key)
                (res, _), t = metrics.timed(m.forget, state, forget_ids, key)
                if not _finite_result(res, split.test.x):
                    raise FloatingPointError("method returned non-finite params or logits")
            except Exception as e:  # report, don't crash the comparison
                rows[name] = {"failed": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc(limit=3)}
                continue
        row = method_metrics(res, oracle, problem, split, forget_ids, trained)
        for extra in extras:
            row.update(extra(result=res, oracle=oracle, problem=problem, split=split,
                             forget_ids=forget_ids, trained=trained))
        row.update({"time": t, "prepare_time": t_prep,
                    "speedup": t_retrain / t if t > 0 else float("nan"),
                    "stats": {k: v for k, v in res.stats.items()
                              if isinstance(v, int | float | bool | str)}})
        rows[name] = row
    for row in rows.values():
        if "failed" not in row:
            row["avg_gap"] = avg_gap(row, rows["retrain"])
    return {"rows": rows, "train_time": t_train, "retrain_time": t_retrain}


def do_nothing() -> Unlearner:
    """The "Original" row of the papers' tables: returns θ* unchanged (a lower bound on
    forgetting; MIA and the forgetting score should tell it apart from retraining)."""
    from unlearn.methods.base import next_weights, params_result, prepare_params

    def forget(state, forget_ids, key):
        _, w = next_weights(state, forget_ids)
        return params_result(state.problem, state.params, {}), state._replace(weights=w)

    return Unlearner("original", prepare_params, forget)


def default_problem(dataset: str, model: str, *, seed: int = 0, model_kwargs: dict | None = None,
                    **train_kwargs) -> tuple[Problem, Split]:
    """A (Problem, Split) from names: the common first lines of every experiment."""
    from unlearn import data, models

    split = data.load(dataset, seed=seed)
    m = models.make(model, split.train.num_classes, **(model_kwargs or {}))
    cfg = TrainConfig(**train_kwargs)
    return Problem(m, split.train, cfg, jax.random.key(seed)), split


def mia_extra(*, result: Result, problem: Problem, split: Split, forget_ids, **_) -> dict:
    """``extras=`` hook: membership inference on forget vs test (``unlearn.mia``).

    ``mia_auc`` is the loss-threshold attack's AUC (so "Avg. Gap" includes it); ``mia_kit_auc``
    and ``mia_kit_acc`` are the NeurIPS 2023 challenge kit's logistic attack (cross-validated).
    """
    from unlearn import mia

    tr = problem.train
    fl, tl = mia.forget_test_losses(result.logits, tr.subset(tr.positions(forget_ids)),
                                    split.test)
    kit = mia.kit_attack(fl, tl)
    return {"mia_auc": mia.loss_threshold_auc(fl, tl), "mia_kit_auc": kit["auc"],
            "mia_kit_acc": kit["accuracy"]}


def mean_std_over_seeds(per_seed: Sequence[dict]) -> dict[str, dict]:
    """Per method, ``{metric: {"mean", "std", "n"}}`` over the seeds where it did not fail;
    a method that failed on every seed maps to ``{"failed": reason}``; ``failed_seeds`` counts
    the failures of the others."""
    out: dict[str, dict] = {}
    names = list(dict.fromkeys(n for rows in per_seed for n in rows))
    for name in names:
        rows = [r[name] for r in per_seed if name in r]
        ok = [r for r in rows if "failed" not in r]
        if not ok:
            out[name] = {"failed": rows[0]["failed"]}
            continue
        keys = [k for k, v in ok[0].items() if isinstance(v, int | float)
                and not isinstance(v, bool)]
        stats = {}
        for k in keys:
            vals = np.array([r[k] for r in ok if r.get(k) is not None], np.float64)
            stats[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                        "n": int(len(vals))}
        stats["failed_seeds"] = len(rows) - len(ok)
        out[name] = stats
    return out
