r"""The linear datamodeling score (LDS): how well attribution scores predict the outputs of
models retrained on random subsets of the training data.

Park, Georgiev, Ilyas, Leclerc & Madry 2023, "TRAK: Attributing Model Behavior at Scale",
ICML, §2 (the LDS, eq. (4)). For a training set :math:`D = \{z_1, \dots, z_n\}`, draw
:math:`M` random subsets :math:`S_1, \dots, S_M \subset D` of size :math:`\lfloor\alpha n\rceil`
(:func:`subset_masks`), train one model :math:`\theta^*(S_s)` on each and measure
:math:`f(z_t; \theta^*(S_s))` on every test example :math:`z_t` (:func:`subset_outputs`; here
:math:`f` is the task's measurement, :func:`unlearn.objective.measure_of`: its loss by default,
or the margin). An attribution :math:`\tau(z_t)\in\mathbb R^n` predicts the output of the model
trained on :math:`S` additively,

.. math::

    g_\tau(z_t, S) = \sum_{i\in S}\tau(z_t)_i ,

and the LDS of test example :math:`z_t` is the Spearman rank correlation over the subsets

.. math::

    \mathrm{LDS}(\tau, z_t) = \rho_{\text{Spearman}}\bigl(
    \{f(z_t;\theta^*(S_s))\}_{s=1}^M,\ \{g_\tau(z_t, S_s)\}_{s=1}^M\bigr),

averaged over the test examples (:func:`score`). 1 means the attribution orders the subset
models' outputs perfectly, 0 is a random attribution.

**Sign convention.** ``scores[t, i]`` must be *positively* related to the measurement: a
positive score means that including :math:`z_i` in training raises :math:`f(z_t)`. The scores
of :func:`unlearn.influence.influence_up_loss` have that sign as they are:
:math:`\mathcal I_{\text{up}}(z_i, z_t) = -\nabla f(z_t)^\top(H+\lambda_d I)^{-1}
\nabla\ell(z_i) = \mathrm d f(z_t)/\mathrm d\epsilon` when :math:`z_i` is up-weighted by
:math:`\epsilon` (Koh & Liang 2017, eq. (2)). Training on :math:`S` instead of :math:`D`
changes the per-example weights of the mean-normalised objective (:mod:`unlearn.objective`)
from :math:`1/n` to :math:`\mathbb 1[i\in S]/|S|`, so to first order around :math:`\theta^*`

.. math::

    f(z_t;\theta^*(S)) \approx f(z_t;\theta^*) + \frac1{|S|}\sum_{i\in S}\mathcal I_{ti}
    - \frac1n\sum_{i}\mathcal I_{ti},

an increasing affine function of :math:`g_\tau(z_t, S)` with :math:`\tau = \mathcal I` (every
subset has the same size, so :math:`1/|S|` and the last term are the same for all :math:`s`).
Spearman's ρ is invariant to increasing affine maps, so ``score(influence.scores, ...)`` is the
LDS with no rescaling. (Passing :func:`unlearn.influence.loo_test_loss_change`, the change of the
loss when :math:`z_i` is *removed*, would flip the sign: negate it first.)

**Confidence interval.** :func:`score` reports the mean over test examples with a Student-t
95 % interval, :math:`\bar\rho \pm t_{0.975,\,k-1}\, s_\rho/\sqrt k` over the :math:`k` test
examples whose ρ is defined — conditional on the :math:`M` subsets drawn (it treats the test
examples as the sample; the per-example values share the subset models, so it is somewhat
optimistic about that source of variance).

**Training the subset models.** The :math:`M` models are the library's own training runs: model
:math:`s` is ``train.fit(model, data, cfg, fold_in(key, s), weights=masks[s])``. With
``cfg.solver="sgd"`` they train as ONE engine ensemble (:func:`unlearn.mia.train_ensemble`);
with ``"lbfgs"`` (the convex case, float64) as one ``vmap``-ed L-BFGS
(:func:`unlearn.train.lbfgs_loop`) run to the same ``cfg.tol``.
"""

from __future__ import annotations

import functools
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from unlearn import engine, inverse, models, objective
from unlearn import influence as inf
from unlearn import train as train_lib
from unlearn.data import Split
from unlearn.mia import train_ensemble
from unlearn.train import Fit, Problem, cast

Params = Any
CI_LEVEL = 0.95


# ----------------------------------------------------------------------------- subsets


def _positive_int(v, name: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
        raise ValueError(f"{name}={v!r}: pass an integer ≥ {low}.")
    return int(v)


def subset_size(n: int, alpha: float) -> int:
    """:math:`k = \\mathrm{round}(\\alpha n)` (Python's ``round``, half to even): the size of
    every subset; ``ValueError`` unless ``0 < alpha < 1`` and ``1 ≤ k ≤ n − 1``."""
    n = _positive_int(n, "n", 2)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.floating) \
            or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha={alpha!r}: pass the subset fraction, a number in (0, 1) "
                         "(TRAK uses 0.5).")
    k = int(round(float(alpha) * n))
    if not 1 <= k <= n - 1:
        raise ValueError(f"alpha={alpha} of n={n} gives subsets of {k} examples: choose alpha "
                         f"so that 1 ≤ round(alpha·n) ≤ n − 1.")
    return k


def subset_masks(n: int, m: int, alpha: float, key: jax.Array) -> np.ndarray:
    """``(m, n)`` float32 0/1 masks of ``m`` random subsets of ``{0, …, n−1}``, each of exactly
    :func:`subset_size` ``(n, alpha)`` elements, uniform among the subsets of that size.

    Row ``s`` is the first ``k`` entries of a permutation drawn by NumPy's
    ``default_rng((engine.key_seed(key), s))``: the masks are a function of ``key`` and each
    row of its own index only, so the first rows for a larger ``m`` are the masks of a smaller
    ``m`` (and nothing is compiled).
    """
    k = subset_size(n, alpha)
    m = _positive_int(m, "m", 2)
    seed = engine.key_seed(key)
    masks = np.zeros((m, n), np.float32)
    for s in range(m):
        masks[s, np.random.default_rng((seed, s)).permutation(n)[:k]] = 1.0
    return masks


def _check_masks(masks, n: int) -> np.ndarray:
    w = np.asarray(masks, np.float32)
    if w.ndim != 2 or w.shape[1] != n or w.shape[0] < 2:
        raise ValueError(f"masks must be (M, {n}) with M ≥ 2 (one row per subset, one column "
                         f"per training example); got shape {np.shape(masks)}.")
    if not np.all((w == 0) | (w == 1)):
        raise ValueError("masks must hold only 0 and 1 (subset membership).")
    if not (w > 0).any(axis=1).all():
        raise ValueError(f"masks: row(s) {np.nonzero(~(w > 0).any(axis=1))[0][:10].tolist()} "
                         "select no training example.")
    return w


# ----------------------------------------------------------------------------- subset models


@functools.partial(jax.jit, static_argnames=("apply", "max_iter"))
def _lbfgs_members(apply, variables, x, y, w, l2, tol, max_iter):
    """``train.fit_lbfgs``'s loop, ``vmap``-ed over (initial variables, weights) members."""

    def one(v, wi):
        fun = lambda p: objective.objective(apply, p, x, y, wi, l2)  # noqa: E731
        return train_lib.lbfgs_loop(fun, v, tol, max_iter)

    return jax.vmap(one)(variables, w)


def train_subset_models(problem: Problem, masks: np.ndarray, key: jax.Array) -> Params:
    """Stacked variables (leading axis M) of the models trained on each subset: model ``s`` is
    ``train.fit(problem.model, problem.train, problem.cfg, fold_in(key, s),
    weights=masks[s])``, all M trained at once (module docstring). L-BFGS members that stop at
    ``cfg.max_iter`` above ``cfg.tol`` are reported by a ``RuntimeWarning``."""
    w = _check_masks(masks, len(problem.train))
    return _train_members(problem, w, [jax.random.fold_in(key, s) for s in range(len(w))],
                          "subset")


def _train_members(problem: Problem, w: np.ndarray, keys: list, what: str) -> Params:
    """Stacked variables of ``train.fit(problem.model, problem.train, problem.cfg, keys[s],
    weights=w[s])`` for every row ``s``: one engine ensemble (SGD) or one ``vmap``-ed L-BFGS."""
    model, data, cfg = problem.model, problem.train, problem.cfg
    if cfg.solver == "sgd":
        return train_ensemble(model, data, cfg, keys, w)
    if engine.has_state(model):
        raise ValueError(f"problem.cfg.solver='lbfgs' trains full batch in eval mode; "
                         f"{model.name} carries BatchNorm statistics: use solver='sgd'.")
    x = cast(jnp.asarray(data.x), cfg.dtype)
    init = engine.init_variables(model, x[:1], jnp.stack(keys), cfg.dtype)
    loop_apply = models.frozen_apply(model, {})
    apply = engine.static_apply(model) if loop_apply is model.apply else loop_apply
    out, _, gnorm = _lbfgs_members(apply, init, x, jnp.asarray(data.y),
                                   cast(jnp.asarray(w), cfg.dtype), cfg.l2, cfg.tol,
                                   cfg.max_iter)
    gnorm = np.asarray(gnorm)
    if not np.all(np.isfinite(gnorm)):
        raise FloatingPointError(f"L-BFGS produced non-finite params for {what} model(s) "
                                 f"{np.nonzero(~np.isfinite(gnorm))[0][:10].tolist()}.")
    if np.any(gnorm > cfg.tol):
        warnings.warn(f"{int(np.sum(gnorm > cfg.tol))} of {len(w)} {what} models stopped at "
                      f"max_iter={cfg.max_iter} with gradient norm up to {gnorm.max():.2e} > "
                      f"tol={cfg.tol:g}", RuntimeWarning, stacklevel=2)
    return out


def stacked_measure(model, stacked: Params, x_test, y_test, dtype: str) -> np.ndarray:
    """``(M, n_test)`` float64: the task's measurement (``objective.measure_of(model.apply)``)
    of every stacked model on every test example, eval mode."""
    out = engine.stacked_apply(model, stacked, cast(jnp.asarray(x_test), dtype))
    fn = objective.measure_of(model.apply)
    y = jnp.asarray(y_test)
    return np.asarray(jax.vmap(lambda o: fn(o, y))(out), np.float64)


def subset_outputs(problem: Problem, masks: np.ndarray, x_test, y_test,
                   key: jax.Array) -> np.ndarray:
    """``(M, n_test)``: :math:`f(z_t;\\theta^*(S_s))`, the task's measurement (its loss, margin,
    ... — :func:`unlearn.objective.measure_of`) of the model trained on subset ``s`` (row ``s``
    of ``masks``, :func:`train_subset_models` with ``key``) on test example ``t``."""
    if len(x_test) != len(y_test) or len(x_test) == 0:
        raise ValueError(f"x_test and y_test must be non-empty with one row per example; got "
                         f"{len(x_test)} and {len(y_test)} rows.")
    stacked = train_subset_models(problem, masks, key)
    return stacked_measure(problem.model, stacked, x_test, y_test, problem.cfg.dtype)


def loo_outputs(problem: Problem, positions: Sequence[int], x_test,
                y_test) -> tuple[np.ndarray, np.ndarray]:
    r"""Leave-one-out retraining as one ensemble: ``(actual, full)``.

    Member ``k`` is the exact-unlearning oracle without training example ``positions[k]``,
    :func:`unlearn.train.retrain` ``(problem, [ids[positions[k]]])`` — the same key, hence the
    same initialisation and data-order rule (dropping an id keeps the relative order of the
    rest), so the removed point is the only difference; one more member trains on all of
    ``problem.train`` (``train.train(problem)``, the control). All ``K + 1`` train at once
    (:func:`_train_members`: one engine ensemble for SGD, one ``vmap``-ed L-BFGS otherwise).

    Returns ``actual`` ``(K, n_test)`` float64, :math:`f(z_t;\theta^*(D\setminus z_{i_k}))
    - f(z_t;\theta^*(D))` (the task's measurement, eval mode), and ``full`` ``(n_test,)``, the
    control's :math:`f(z_t;\theta^*(D))`. To first order (Koh & Liang 2017, §2.1) ``actual[k,
    t]`` :math:`\approx -\mathcal I_{\text{up}}(z_{i_k}, z_t)/n` — minus the scores of
    :func:`unlearn.influence.influence_up_loss` over ``n``. With SGD on a non-convex model the
    removal also shifts every later batch by one example, so ``actual`` carries training noise
    of the same order as the effect (Bae et al. 2022, "If influence functions are the answer,
    then what is the question?").
    """
    n = len(problem.train)
    pos = np.asarray(positions)
    if pos.ndim != 1 or len(pos) == 0 or not np.issubdtype(pos.dtype, np.integer) \
            or pos.min() < 0 or pos.max() >= n or len(np.unique(pos)) != len(pos):
        raise ValueError(f"positions must be distinct integer rows of problem.train in [0, {n}); "
                         f"got {np.asarray(positions)!r}.")
    if n < 2:
        raise ValueError("problem.train needs at least 2 examples to leave one out.")
    if len(x_test) != len(y_test) or len(x_test) == 0:
        raise ValueError(f"x_test and y_test must be non-empty with one row per example; got "
                         f"{len(x_test)} and {len(y_test)} rows.")
    w = np.ones((len(pos) + 1, n), np.float32)
    w[np.arange(len(pos)), pos] = 0.0  # the last member keeps every example: the control
    stacked = _train_members(problem, w, [problem.key] * len(w), "leave-one-out")
    out = stacked_measure(problem.model, stacked, x_test, y_test, problem.cfg.dtype)
    return out[:-1] - out[-1], out[-1]


# ----------------------------------------------------------------------------- the score


def rank_average(a: np.ndarray) -> np.ndarray:
    """Ranks 1…M down axis 0 of ``a`` (M, T), ties sharing their average rank: the rank of
    value v in a column is #{< v} + (#{= v} + 1)/2."""
    a = np.asarray(a, np.float64)
    out = np.empty_like(a)
    for t in range(a.shape[1]):
        col = np.sort(a[:, t])
        lo = np.searchsorted(col, a[:, t], "left")
        hi = np.searchsorted(col, a[:, t], "right")
        out[:, t] = (lo + hi + 1) / 2.0
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ between the columns of ``a`` and ``b`` (both (M, T), M ≥ 2): the Pearson
    correlation of their average ranks (:func:`rank_average`); NaN for a column that is
    constant in ``a`` or ``b``. Returns (T,)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"spearman needs two (M, T) arrays of the same shape with M ≥ 2; got "
                         f"{a.shape} and {b.shape}.")
    ra, rb = rank_average(a), rank_average(b)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(0) / np.where(den > 0, den, 1.0), np.nan)


class LDS(NamedTuple):
    """``mean`` LDS over the test examples with a defined ρ, its ``ci`` (low, high) at
    :data:`CI_LEVEL` (Student t over test examples), ``per_example`` (T,) ρ (NaN where the
    predicted or the measured outputs are constant over the subsets) and ``n_defined``."""

    mean: float
    ci: tuple[float, float]
    per_example: np.ndarray
    n_defined: int


def t_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """:math:`\\bar v \\pm t_{(1+\\text{level})/2,\\,k-1}\\, s/\\sqrt k` (s the sample standard
    deviation, ddof 1) of the finite ``values``; NaNs when fewer than 2."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan"), float("nan")
    half = scipy.stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def predicted_outputs(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(M, T)`` :math:`g_\\tau(z_t, S_s) = \\sum_{i\\in S_s}\\tau(z_t)_i` = ``masks @
    scores.T`` (float64)."""
    return np.asarray(masks, np.float64) @ np.asarray(scores, np.float64).T


def score(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> LDS:
    """The LDS (module docstring) of attribution ``scores`` (T, n) — positive = including
    :math:`z_i` raises the measurement of :math:`z_t`, as ``influence_up_loss(...).scores`` —
    given the subsets ``masks`` (M, n) and the measured ``outputs`` (M, T) of the models trained
    on them (:func:`subset_outputs`)."""
    scores = np.asarray(scores, np.float64)
    outputs = np.asarray(outputs, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_test, n_train); got shape {scores.shape}.")
    w = _check_masks(masks, scores.shape[1])
    if outputs.shape != (len(w), scores.shape[0]):
        raise ValueError(f"outputs must be (M, n_test) = {(len(w), scores.shape[0])} (one row "
                         f"per subset model, one column per test example); got "
                         f"{outputs.shape}.")
    for name, a in (("scores", scores), ("outputs", outputs)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has non-finite entries.")
    rho = spearman(predicted_outputs(scores, w), outputs)
    ok = np.isfinite(rho)
    mean = float(rho[ok].mean()) if ok.any() else float("nan")
    return LDS(mean, t_interval(rho), rho, int(ok.sum()))


# ----------------------------------------------------------------------------- backends


def influence_curvature(problem: Problem, trained: Fit, curvature: str = "auto"
                        ) -> inverse.Curvature:
    """The curvature influence uses at :math:`\\theta^*`, chosen as influence unlearning does
    (:mod:`unlearn.methods.influence`): the Hessian for a declared-convex model, the
    Gauss–Newton matrix otherwise, eval mode with frozen model state."""
    if curvature not in ("auto", "hessian", "ggn"):
        raise ValueError(f"curvature={curvature!r}: choose 'auto', 'hessian' or 'ggn'.")
    model, cfg = problem.model, problem.cfg
    kind = curvature if curvature != "auto" else ("hessian" if model.convex else "ggn")
    params, mstate = engine.split_variables(cast(trained.params, cfg.dtype))
    return inverse.Curvature(models.frozen_apply(model, mstate), params,
                             cast(jnp.asarray(problem.train.x), cfg.dtype),
                             jnp.asarray(problem.train.y), cfg.l2, kind=kind)


def evaluate_backends(problem: Problem, trained: Fit, split: Split,
                      backends: Sequence[str | inverse.Backend] = ("exact",), *, m: int = 50,
                      alpha: float = 0.5, key: jax.Array, n_test: int | None = None,
                      damping: float | None = None, curvature: str = "auto",
                      options: dict | None = None, baseline: bool = True,
                      masks: np.ndarray | None = None,
                      outputs: np.ndarray | None = None) -> dict[str, dict]:
    """The LDS of influence scores at :math:`\\theta^*` (``trained``) for each inverse backend.

    ``m`` subsets of fraction ``alpha`` (:func:`subset_masks` with ``fold_in(key, 0)``) and
    their models' measurements on the first ``n_test`` examples of ``split.test`` (all by
    default; :func:`subset_outputs` with ``fold_in(key, 1)``) are computed once — or passed as
    ``masks`` and ``outputs`` to share them between calls. For each backend (a name of
    :data:`unlearn.inverse.BACKENDS`, built with ``options`` — default ``rank = min(50,
    p − 1)`` and ``key = fold_in(key, 2)`` — or a :class:`~unlearn.inverse.Backend`), the
    scores are :func:`unlearn.influence.influence_up_loss` on :func:`influence_curvature`
    with ``damping`` (default: 0 for a convex model, 1e-3 otherwise, as influence unlearning).
    ``baseline`` adds a row ``"random"``: i.i.d. N(0, 1) scores (``fold_in(key, 3)``), whose LDS
    is 0 in expectation.

    Returns ``{backend name: row}``; a row holds ``lds``, ``ci_low``, ``ci_high``,
    ``lds_per_example``, ``n_test``, ``n_defined``, ``seconds`` (the influence computation,
    compilation included), ``converged`` and ``residual`` (the solve's worst relative residual),
    ``curvature``, ``damping``, ``m``, ``alpha`` (the subsets' |S|/n), ``measure``; a
    backend that raises gives
    ``{"failed": "<reason>"}``.
    """
    test = split.test
    t = len(test) if n_test is None else _positive_int(n_test, "n_test", 1)
    if t > len(test):
        raise ValueError(f"n_test={n_test} exceeds the {len(test)} test examples of split.")
    x_test, y_test = np.asarray(test.x[:t]), np.asarray(test.y[:t])
    n = len(problem.train)
    if masks is None:
        masks = subset_masks(n, m, alpha, jax.random.fold_in(key, 0))
    masks = _check_masks(masks, n)
    if outputs is None:
        outputs = subset_outputs(problem, masks, x_test, y_test, jax.random.fold_in(key, 1))
    outputs = np.asarray(outputs, np.float64)
    if outputs.shape != (len(masks), t):
        raise ValueError(f"outputs must be (M, n_test) = {(len(masks), t)}; got "
                         f"{outputs.shape}.")
    convex = problem.model.convex
    lam = (0.0 if convex else 1e-3) if damping is None else float(damping)
    if lam < 0 or (not convex and lam == 0):
        raise ValueError(f"damping={damping!r}: pass a number ≥ 0 (> 0 for the non-convex "
                         f"model {problem.model.name!r}, whose curvature is only PSD).")
    curv = influence_curvature(problem, trained, curvature)
    p = curv.theta.size
    opts = {"rank": min(50, p - 1), "key": jax.random.fold_in(key, 2), **(options or {})}
    xt = cast(jnp.asarray(x_test), problem.cfg.dtype)
    yt = jnp.asarray(y_test)
    common = {"n_test": t, "curvature": curv.kind, "damping": lam, "m": int(len(masks)),
              "alpha": float(masks.sum(1).mean() / n), "measure": problem.model.measure.name}

    def row(scores, seconds, converged, residual):
        res = score(scores, masks, outputs)
        return {"lds": res.mean, "ci_low": res.ci[0], "ci_high": res.ci[1],
                "lds_per_example": res.per_example.tolist(), "n_defined": res.n_defined,
                "seconds": seconds, "converged": converged, "residual": residual, **common}

    rows: dict[str, dict] = {}
    for b in backends:
        name = b if isinstance(b, str) else b.name
        try:
            solver = inverse.backend(b, **opts) if isinstance(b, str) else b
            t0 = time.perf_counter()
            out = inf.influence_up_loss(curv, xt, yt, solver, damping=lam)
            scores = np.asarray(jax.block_until_ready(out.scores))
            seconds = time.perf_counter() - t0
            rows[name] = row(scores, seconds, bool(np.all(np.asarray(out.solution.converged))),
                             float(np.max(np.asarray(out.solution.residual))))
        except Exception as e:  # noqa: BLE001 — a failed backend is a row, not a crash
            rows[name] = {"failed": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc(limit=3)}
    if baseline:
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 3), (t, n)))
        rows["random"] = row(noise, 0.0, True, float("nan"))
    return rows


__all__ = ["CI_LEVEL", "LDS", "evaluate_backends", "influence_curvature", "predicted_outputs",
           "loo_outputs", "rank_average", "score", "spearman", "stacked_measure", "subset_masks",
           "subset_outputs", "subset_size", "t_interval", "train_subset_models"]
