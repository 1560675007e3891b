"""The evaluation harness: every method against the retrain oracle, by the same code, in the
papers' metrics, with tuned baselines.

``evaluate`` trains θ* once, retrains the oracle without U, runs each method's
``prepare``/``forget`` (timed, blocking on results) and reports per method the metrics of the
approximate-unlearning papers (Jia et al. 2023 "l1-sparse", Fan et al. 2024 SalUn, Kurmanji et
al. 2023 SCRUB; :mod:`unlearn.metrics`): **UA** = 100 (1 − forget accuracy), **RA**, **TA**,
**MIA-efficacy** (the SVC attack, :func:`unlearn.mia.mia_efficacy`), **RTE** (seconds of the
``forget`` call) and **Avg. Gap** = mean |·| − retrain's over (UA, RA, TA, MIA-efficacy), in
percentage points; also the fractional accuracies, relative parameter distance
‖θ_u − θ_r‖/‖θ* − θ_r‖, KL and disagreement to the oracle. A method that raises or returns
non-finite outputs is reported as failed, not a crash of the whole comparison.

**Tuning protocol** (:func:`tune`): for each approximate method a small grid over its main
hyperparameters (:data:`TUNING_GRIDS`: the learning rate as multiples of the training learning
rate, and γ / β / α where the papers tune them), every point run on a *validation* forget set
disjoint from the reported one (:func:`validation_forget`), chosen by Avg. Gap to the
validation oracle. Chosen values per setting are cached in ``unlearn/tuned_hparams.json``
(written by ``python -m experiments.compare_methods --config tune``) and used by
:func:`evaluate` when ``hparams="tuned"``.
"""

from __future__ import annotations

import itertools
import json
import math
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unlearn import metrics
from unlearn.data import Split
from unlearn.methods import Result, Unlearner
from unlearn.methods import get as get_method
from unlearn.task import is_classifier
from unlearn.train import Fit, Problem, TrainConfig, retrain, train

GAP_KEYS = metrics.GAP_METRICS
TUNED_PATH = Path(__file__).resolve().parent / "tuned_hparams.json"
# The grids: "lr" entries are multiples of the training learning rate (cfg.lr); other entries
# are absolute. Jia et al. 2023 tune the learning rate of FT/GA/RL and γ of l1-sparse, Fan et
# al. 2024 the learning rate of SalUn, Kurmanji et al. 2023 SCRUB's learning rate; NegGrad+'s
# β is Kurmanji et al.'s; Fisher forgetting's α is Golatkar et al.'s noise scale.
TUNING_GRIDS: dict[str, dict[str, tuple]] = {
    "finetune": {"lr": (0.3, 1.0, 3.0, 10.0)},
    "neggrad": {"lr": (0.03, 0.1, 0.3, 1.0)},
    "neggrad_plus": {"lr": (0.3, 1.0, 3.0), "beta": (0.9, 0.99)},
    "random_labels": {"lr": (0.3, 1.0, 3.0)},
    "scrub": {"lr": (0.3, 1.0, 3.0)},
    "l1_sparse": {"lr": (0.3, 1.0, 3.0), "gamma": (1e-4, 5e-4)},
    "salun": {"lr": (0.3, 1.0, 3.0)},
    "fisher": {"alpha": (1e-8, 1e-7, 1e-6, 1e-5)},
}

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
    if not is_classifier(problem.model):  # e.g. regression: losses, output distance
        out = metrics.task_losses(result.logits, problem.model.apply.loss, retain, forget,
                                  split.test)
        out.update(metrics.output_distance(result.logits, oracle.logits, forget, split.test))
        if result.params is not None and oracle.params is not None:
            out["rel_distance"] = metrics.relative_distance(result.params, oracle.params,
                                                            trained.params)
        return out
    out = metrics.split_accuracies(result.logits, retain, forget, split.test)
    out.update(metrics.ua_ra_ta(result.logits, retain, forget, split.test))
    from unlearn import mia

    out.update(mia.mia_efficacy_of(result.logits, retain, split.test, forget))
    out.update(metrics.compare_to_oracle(result.logits, oracle.logits, forget, split.test))
    if result.params is not None and oracle.params is not None:
        out["rel_distance"] = metrics.relative_distance(result.params, oracle.params,
                                                        trained.params)
    return out


def avg_gap(row: dict, oracle_row: dict, keys: Sequence[str] = GAP_KEYS) -> float:
    """Avg. Gap (Jia et al. 2023): mean |metric − oracle metric| over UA, RA, TA and
    MIA-efficacy (percentage points; for a task that is not a classifier, over the mean task
    losses on the forget, retain and test sets); NaN if a row lacks one or it is not
    finite."""
    try:
        return metrics.avg_gap(row, oracle_row, keys)
    except ValueError:
        return float("nan")


def grid_points(name: str, cfg: TrainConfig, grids: dict = TUNING_GRIDS) -> list[dict]:
    """The hyperparameter points of ``name``'s grid as constructor kwargs ("lr" multiples
    turned into absolute learning rates)."""
    g = grids.get(name, {})
    keys = list(g)
    if not keys:
        return []
    out = []
    for vals in itertools.product(*(g[k] for k in keys)):
        hp = dict(zip(keys, vals, strict=True))
        if "lr" in hp:
            hp["lr"] = float(hp["lr"] * cfg.lr)
        out.append(hp)
    return out


def _label(name: str, hp: dict) -> str:
    return name + ("[" + ",".join(f"{k}={v:.3g}" for k, v in hp.items()) + "]" if hp else "")


def load_tuned(path: Path | None = None) -> dict:
    """The cached tuning results ``{setting: {method: {"chosen": {...}, ...}}}`` ({} if none);
    default path :data:`TUNED_PATH`."""
    path = TUNED_PATH if path is None else path
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def tuned_hparams(setting: str, path: Path | None = None) -> dict[str, dict]:
    """``{method: chosen hyperparameters}`` cached for ``setting`` (e.g.
    ``"digits/mlp random 10%"``); {} when the setting was never tuned."""
    return {m: v["chosen"] for m, v in load_tuned(path).get(setting, {}).items()
            if not m.startswith("_")}


def validation_forget(ds, kind: str, arg, seed: int, report_ids) -> np.ndarray:
    """A validation forget set disjoint from ``report_ids``: for ``random``, the same number
    of ids drawn (seeded) from the other examples; for ``class``, the next class
    ((arg + 1) mod K)."""
    from unlearn import data

    if kind == "class":
        return data.select_forget(ds, kind="class", cls=(int(arg) + 1) % ds.num_classes)
    if kind == "random":
        rest = ds.without(report_ids)
        return data.select_forget(rest, kind="random", count=len(report_ids),
                                  seed=seed + 7919)
    raise ValueError(f"kind={kind!r}: validation sets exist for 'random' and 'class'.")


def tune(problem: Problem, split: Split, val_ids, names: Sequence[str], key: jax.Array, *,
         trained: Fit, grids: dict = TUNING_GRIDS) -> dict[str, dict]:
    """The tuning protocol: every grid point of every method in ``names`` on the validation
    forget set ``val_ids``; per method ``{"grid": [{"hparams", "avg_gap", UA, RA, TA,
    MIA-efficacy}...], "chosen": hparams with the smallest Avg. Gap, "avg_gap": its gap}``.
    Methods without a grid are skipped. Points run one after another (the loop-based methods
    take the learning rate as a runtime value, so a grid compiles once)."""
    out = {}
    for name in names:
        pts = grid_points(name, problem.cfg, grids)
        if not pts:
            continue
        ms = {_label(name, hp): get_method(name, **hp) for hp in pts}
        res = evaluate(problem, split, val_ids, ms, key, trained=trained, warmup=False,
                       hparams=None)["rows"]
        grid = []
        for hp in pts:
            row = res[_label(name, hp)]
            grid.append({"hparams": hp, "avg_gap": row.get("avg_gap", float("nan")),
                         **{k: row.get(k) for k in GAP_KEYS},
                         **({"failed": row["failed"]} if "failed" in row else {})})
        ok = [g for g in grid if math.isfinite(g["avg_gap"])]
        best = min(ok, key=lambda g: g["avg_gap"]) if ok else None
        out[name] = {"grid": grid, "chosen": best["hparams"] if best else {},
                     "avg_gap": best["avg_gap"] if best else float("nan")}
    return out


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
    hparams: dict[str, dict] | str | None = "tuned",
    setting: str | None = None,
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
      hparams: for methods given by name, ``{method: constructor kwargs}``; ``"tuned"`` (the
        default) takes the values cached for ``setting`` (:func:`tuned_hparams`; the
        constructors' defaults where none are cached); ``None``: constructor defaults.
      setting: the key of the tuning cache, e.g. ``"digits/mlp random 10%"``.

    Returns:
      ``{"rows": {method: metrics...}, "train_time": s, "retrain_time": s}``; failed methods
      have ``{"failed": "<reason>"}``.
    """
    if isinstance(hparams, str):
        if hparams != "tuned":
            raise ValueError(f"hparams={hparams!r}: pass 'tuned', None or a dict.")
        hparams = tuned_hparams(setting) if setting is not None else {}
    hparams = hparams or {}
    used: dict[str, dict] = {}
    if not isinstance(methods, dict):
        used = {m: dict(hparams.get(m, {})) for m in methods}
        methods = {m: get_method(m, **used[m]) for m in methods}
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
        row.update({"time": t, "RTE": t, "prepare_time": t_prep, "hparams": used.get(name, {}),
                    "speedup": t_retrain / t if t > 0 else float("nan"),
                    "stats": {k: v for k, v in res.stats.items()
                              if isinstance(v, int | float | bool | str)}})
        rows[name] = row
    keys = GAP_KEYS if is_classifier(problem.model) else metrics.REGRESSION_GAP_METRICS
    for row in rows.values():
        if "failed" not in row:
            row["avg_gap"] = avg_gap(row, rows["retrain"], keys)
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


def relearn_extra(*, result: Result, problem: Problem, forget_ids, trained: Fit, **_) -> dict:
    """``extras=`` hook: relearn time (:func:`unlearn.metrics.relearn_time`) — Adam steps at the
    training learning rate on the forget set until its accuracy is back to θ*'s; needs params
    (NaN for methods without a single parameter vector, e.g. SISA)."""
    if result.params is None:
        return {"relearn_steps": float("nan")}
    tr = problem.train
    forget = tr.subset(tr.positions(forget_ids))
    apply = problem.model.apply
    target = metrics.accuracy(np.asarray(apply(trained.params, forget.x)), forget.y)
    steps = metrics.relearn_time(apply, result.params, forget, target, lr=problem.cfg.lr,
                                 batch_size=problem.cfg.batch_size)
    return {"relearn_steps": float(steps)}


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
