"""Deterministic training of the regularised objective, and the retrain oracle.

The objective (:mod:`unlearn.objective`; docs/architecture.md) is

    L(θ; D, w) = Σ_i w_i ℓ(f_θ(x_i), y_i) / max(Σ_i w_i, 1) + (λ/2) ‖θ‖²

with ℓ the softmax cross-entropy and ``w`` a per-example weight/mask. "D without U" is the same
compiled function with ``w = 0`` on U: no recompiles, no reshaping, and retraining is exactly
the training code path.

Two trainers:

* ``solver="sgd"``: optax minibatch training through the one engine (:mod:`unlearn.engine`,
  one member). The order of examples in epoch ``e`` is a function of ``(key, e)`` and the
  **ids present** only (:func:`unlearn.engine.epoch_order`), so removing ids leaves the
  relative order of the others unchanged. Batches are padded with zero weights to a fixed
  batch size. The engine's strategy (``scan`` for dense models, a ``loop`` of jitted steps for
  convolutions on CPU) is chosen by measurement (``benchmarks/train_epoch.py``).
  :func:`train_grid` trains a grid of learning rates / weight decays as one ensemble.
* ``solver="lbfgs"``: full-batch optax L-BFGS inside one ``lax.while_loop`` until
  ‖∇L‖ ≤ ``tol`` — the exact oracle for convex models (use float64).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn import augment as augment_lib
from unlearn import engine
from unlearn.data import Dataset, stable_hash
from unlearn.engine import (  # noqa: F401 (the data-order rule lives in the engine; re-exported)
    batch_indices,
    bucket,
    cast,
    epoch_order,
    key_seed,
)
from unlearn.models import Model, frozen_apply
from unlearn.objective import example_losses, l2_norm_sq, objective  # noqa: F401 (re-exported)

Params = Any
SOLVERS = ("sgd", "lbfgs")
DTYPES = ("float32", "float64")
AUGMENTATIONS = ("none", "crop_flip", "crop_flip_reflect")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (all keyword arguments of :func:`fit`).

    solver: ``sgd`` (optax minibatches through the engine) or ``lbfgs`` (full batch, to ``tol``).
    optimizer: optax optimizer name for ``sgd`` (``adam``, ``sgd``, ``momentum``).
    strategy: the engine's epoch strategy: ``auto``, ``scan``, ``loop`` or ``vmap``
      (:func:`unlearn.engine.resolve_strategy`).
    dtype: ``float32`` or ``float64`` (the latter needs ``jax_enable_x64``).
    augment: ``none``, ``crop_flip`` (4-pixel zero padding, random crop, horizontal flip: the
      CIFAR ResNet-18 recipe) or ``crop_flip_reflect`` (reflection padding: DAWNBench
      ResNet-9), keyed on (key, epoch, id) (:mod:`unlearn.augment`); image inputs only.

    Invalid values raise ``ValueError`` naming the field at construction.
    """

    solver: str = "sgd"
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 64
    l2: float = 1e-3
    tol: float = 1e-6
    max_iter: int = 2000
    strategy: str = "auto"
    dtype: str = "float32"
    progress: bool = False
    augment: str = "none"

    def __post_init__(self):
        choices = {"solver": SOLVERS, "optimizer": engine.OPTIMIZERS,
                   "strategy": engine.STRATEGIES, "dtype": DTYPES, "augment": AUGMENTATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is unknown: "
                                 f"choose one of {allowed}.")
        for name in ("epochs", "batch_size", "max_iter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
                raise ValueError(f"TrainConfig.{name}={v!r}: pass a positive integer.")
        for name, low in (("lr", "> 0"), ("tol", "> 0"), ("l2", "≥ 0")):
            v = getattr(self, name)
            ok = isinstance(v, int | float | np.floating) and not isinstance(v, bool) \
                and math.isfinite(v) and (v > 0 if low == "> 0" else v >= 0)
            if not ok:
                raise ValueError(f"TrainConfig.{name}={v!r}: pass a finite number {low} "
                                 "(e.g. lr=1e-3).")


class Fit(NamedTuple):
    """Trained params and what the trainer reports (steps, final grad norm / loss)."""

    params: Params
    info: dict


# ----------------------------------------------------------------------------- engine glue


def _crop_flip(x, id_hashes, key, epoch):
    return augment_lib.augment(x, id_hashes, key, epoch)


def _crop_flip_reflect(x, id_hashes, key, epoch):
    return augment_lib.augment(x, id_hashes, key, epoch, mode="reflect")


def augmentation(cfg: TrainConfig):
    """The engine's augmentation hook named by ``cfg.augment`` (None for ``none``): a
    module-level function ``(x, id_hashes32, key, epoch) -> x`` (stable identity, so the
    engine's compile cache keys on it)."""
    return {"none": None, "crop_flip": _crop_flip,
            "crop_flip_reflect": _crop_flip_reflect}[cfg.augment]


# ----------------------------------------------------------------------------- fit


def init_params(model: Model, data: Dataset, key: jax.Array, dtype: str = "float32") -> Params:
    """Initial variables from ``model.init(fold_in(key, 0), x[:1])`` (the same for training,
    retraining and every ensemble member; :func:`unlearn.engine.init_variables`)."""
    x1 = cast(jnp.asarray(data.x[:1]), dtype)
    return engine.unstack(engine.init_variables(model, x1, jnp.stack([key]), dtype), 0)


def fit(
    model: Model,
    data: Dataset,
    cfg: TrainConfig,
    key: jax.Array,
    *,
    weights: np.ndarray | None = None,
    params: Params | None = None,
) -> Fit:
    """Minimise the objective on ``data`` with per-example ``weights`` (default ones).

    Examples with weight 0 are absent: they never enter the data order or a batch, so
    ``fit(data, weights=mask_without_U)`` equals ``fit(data.without(U))``. ``params`` warm-starts
    (otherwise :func:`init_params`).
    """
    w = np.ones(len(data), np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (len(data),):
        raise ValueError(f"weights must have shape ({len(data)},), got {w.shape}.")
    if not (w > 0).any():
        raise ValueError("weights are all zero: nothing to train on.")
    if params is None:
        params = init_params(model, data, key, cfg.dtype)
    params = cast(params, cfg.dtype)
    check_outputs(model, params, data, cfg.dtype)
    if cfg.solver == "lbfgs":
        return fit_lbfgs(model, data, cfg, params, w)
    return fit_sgd(model, data, cfg, key, params, w)


def check_outputs(model: Model, params: Params, data: Dataset, dtype: str = "float32") -> None:
    """A classifier must give one output per class of ``data``: otherwise ValueError naming
    the model's output width and ``data.num_classes`` (checked by shape inference, before any
    training; a wrong width would train to NaN and read as divergence). Models whose ``loss``
    is not the cross-entropy (e.g. squared error), and data whose targets are not classes, are
    not checked."""
    if getattr(data, "targets", "classes") != "classes":
        return
    loss = getattr(model, "loss", None)
    if loss is not None and (loss if isinstance(loss, str) else getattr(loss, "name", None)) \
            != "cross_entropy":
        return
    out = jax.eval_shape(model.apply, params, cast(jnp.asarray(data.x[:1]), dtype))
    width = out.shape[-1] if out.ndim == 2 else out.shape[1:]
    if width != data.num_classes:
        raise ValueError(f"model {model.name!r} outputs {width} values per example but the data "
                         f"{data.name!r} has num_classes={data.num_classes}: build the model "
                         f"with {data.num_classes} outputs (e.g. models.make(name, "
                         f"{data.num_classes})).")


def fit_sgd(model: Model, data: Dataset, cfg: TrainConfig, key, params, w) -> Fit:
    """Minibatch optax training: the engine with one member (see the module docstring)."""
    out = engine.train_members(
        model, data.x, data.y, stable_hash(data.ids), jnp.stack([key]), epochs=cfg.epochs,
        batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, l2=cfg.l2,
        dtype=cfg.dtype, strategy=cfg.strategy, weights=w[None],
        variables=engine.stack([params]), augment=augmentation(cfg), progress=cfg.progress,
        desc=f"train {model.name}")
    return Fit(engine.unstack(out.members.variables(), 0),
               {"epochs": cfg.epochs, "steps": out.info["steps"],
                "final_loss": float(out.info["final_loss"][0])})


def train_grid(model: Model, data: Dataset, cfg: TrainConfig, key: jax.Array, *,
               lr: Sequence[float] | None = None, l2: Sequence[float] | None = None,
               weights: np.ndarray | None = None) -> tuple[Params, np.ndarray]:
    """Train one model per hyperparameter point as ONE ensemble; returns stacked variables
    (leading axis G) and the (G, 2) grid of (lr, l2).

    Point g is exactly ``fit(model, data, replace(cfg, lr=lr[g], l2=l2[g]), key,
    weights=weights)``: the same init, the same data order, its own learning rate (an
    ``optax.inject_hyperparams`` state entry) and weight decay; ``lr`` and ``l2`` default to
    ``cfg``'s and, when both are given, must have the same length (zip them from
    ``itertools.product`` for a full grid). A point that diverges raises
    ``FloatingPointError`` naming its learning rate (drop it from the grid).
    For the tuning protocol of the evaluation: select the point by a validation metric, e.g.
    ``unlearn.mia.ensemble_logits(model.apply, stacked, x_val)``.
    """
    if cfg.solver != "sgd":
        raise ValueError(f"cfg.solver={cfg.solver!r}: train_grid trains with solver='sgd'.")
    lr = np.atleast_1d(np.asarray(cfg.lr if lr is None else lr, np.float64))
    l2 = np.atleast_1d(np.asarray(cfg.l2 if l2 is None else l2, np.float64))
    G = max(len(lr), len(l2))
    if len(lr) not in (1, G) or len(l2) not in (1, G):
        raise ValueError(f"lr ({len(lr)} values) and l2 ({len(l2)} values) must have the same "
                         "length (or one of them a single value).")
    lr, l2 = np.broadcast_to(lr, (G,)), np.broadcast_to(l2, (G,))
    for name, v in (("lr", lr), ("l2", l2)):
        if not np.all(np.isfinite(v)) or (name == "lr" and np.any(v <= 0)) or np.any(v < 0):
            raise ValueError(f"{name}={v.tolist()}: pass finite values (lr > 0, l2 ≥ 0).")
    w = np.ones(len(data), np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (len(data),):
        raise ValueError(f"weights must have shape ({len(data)},), got {w.shape}.")
    p0 = init_params(model, data, key, cfg.dtype)
    out = engine.train_members(
        model, data.x, data.y, stable_hash(data.ids), engine.repeat(key, G),
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=lr, l2=l2,
        dtype=cfg.dtype, strategy=cfg.strategy, weights=np.tile(w, (G, 1)),
        variables=engine.repeat(p0, G), augment=augmentation(cfg), progress=cfg.progress,
        desc=f"grid {model.name}")
    return out.members.variables(), np.stack([lr, l2], 1)


def lbfgs_loop(fun, params, tol, max_iter: int):
    """Minimise ``fun(params)`` with optax L-BFGS (zoom line search) in one ``while_loop``
    until ‖∇fun‖ ≤ ``tol`` or ``max_iter`` steps; returns (params, steps, grad norm).

    Call it inside a jitted function whose arguments carry the data that ``fun`` closes over.
    """
    opt = optax.lbfgs()
    vg = optax.value_and_grad_from_state(fun)

    def cond(c):
        _, _, it, gnorm = c
        return (it < max_iter) & (gnorm > tol)

    def body(c):
        p, s, it, _ = c
        value, g = vg(p, state=s)
        updates, s = opt.update(g, s, p, value=value, grad=g, value_fn=fun)
        p = optax.apply_updates(p, updates)
        # The zoom line search stores the gradient at the accepted point: its norm is the
        # stopping test for free (a fresh jax.grad here doubled the cost of an iteration).
        return p, s, it + 1, optax.tree.norm(optax.tree.get(s, "grad"))

    g0 = optax.tree.norm(jax.grad(fun)(params))
    p, _, it, gnorm = jax.lax.while_loop(cond, body, (params, opt.init(params), 0, g0))
    return p, it, gnorm


@functools.partial(jax.jit, static_argnames=("apply", "max_iter"))
def _lbfgs_run(apply, params, x, y, w, l2, tol, max_iter):
    """Jitted L-BFGS; ``apply`` is an :func:`unlearn.engine.static_apply` (hashed by model)."""
    fun = lambda p: objective(apply, p, x, y, w, l2)  # noqa: E731
    p, it, gnorm = lbfgs_loop(fun, params, tol, max_iter)
    return p, it, gnorm, fun(p)


def fit_lbfgs(model: Model, data: Dataset, cfg: TrainConfig, params, w) -> Fit:
    """Full-batch L-BFGS (optax, zoom line search) until ‖∇L‖ ≤ ``cfg.tol``.

    The loop runs the model's eval-mode apply; for the plain CNN on CPU that is the
    convolution-free form of :func:`unlearn.models.frozen_apply` (the same function up to float
    summation order; convolutions inside an XLA loop are ~20× slower on CPU)."""
    if engine.has_state(model):
        raise ValueError(f"solver='lbfgs' trains full batch in eval mode; {model.name} carries "
                         "BatchNorm statistics that only minibatch training updates: use "
                         "solver='sgd'.")
    x = cast(jnp.asarray(data.x), cfg.dtype)
    wj = cast(jnp.asarray(w), cfg.dtype)
    loop_apply = frozen_apply(model, {})
    apply = engine.static_apply(model) if loop_apply is model.apply else loop_apply
    p, it, gnorm, value = _lbfgs_run(apply, params, x,
                                     jnp.asarray(data.y), wj, cfg.l2, cfg.tol, cfg.max_iter)
    _check_finite(p, "L-BFGS")
    return Fit(p, {"iterations": int(it), "grad_norm": float(gnorm), "loss": float(value),
                   "converged": bool(gnorm <= cfg.tol)})


@functools.partial(jax.jit, static_argnames=("apply", "steps"))
def _descend_members(apply, params, x, y, weights, l2, lr, momentum, steps):
    def total(stacked):
        # Members are independent, so the gradient of the summed objectives is each member's
        # own gradient: the one objective, vmapped over the member axis (the data is shared).
        each = jax.vmap(lambda p, w: objective(apply, p, x, y, w, l2))(stacked, weights)
        return jnp.sum(each)

    def body(carry, _):
        p, v = carry
        g = jax.grad(total)(p)
        v = jax.tree.map(lambda vv, gg: momentum * vv - lr * gg, v, g)
        return (jax.tree.map(jnp.add, p, v), v), None

    init = (params, jax.tree.map(jnp.zeros_like, params))
    (p, _), _ = jax.lax.scan(body, init, None, length=steps)
    return p


def descend_members(model: Model, variables: Params, x, y, weights, *, l2: float,
                    lr: float, momentum: float, steps: int) -> Params:
    """S copies of one model, each run ``steps`` steps of full-batch heavy-ball gradient
    descent (``v ← momentum·v − lr·∇L_s``, ``θ ← θ + v``) on the objective with its own example
    weights ``weights[s]`` (shape ``(S, n)``), all from the same ``variables``; returns the
    stacked variables (leading axis S).

    Deterministic and smooth in the weights, so two members that differ by one zero weight
    differ only by that example's effect: Koh & Liang's (2017, §5.1) protocol for a non-convex
    model — leave one point out and *retrain from* θ̃ — with a control member (all weights 1)
    whose drift is subtracted. Members run as one batched program: :func:`objective` ``vmap``-ed
    over the member axis with the eval-mode :func:`unlearn.models.frozen_apply` (on CPU the plain
    CNN's im2col form, so the scan holds no convolution op). Models with BatchNorm are refused.
    """
    if engine.has_state(model):
        raise ValueError(f"descend_members trains full batch in eval mode; {model.name} carries "
                         "BatchNorm statistics: use train_members (minibatch) instead.")
    w = jnp.asarray(weights)
    if w.ndim != 2 or w.shape[1] != len(y):
        raise ValueError(f"weights must have shape (S, {len(y)}); got {tuple(w.shape)}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: pass a positive integer.")
    dtype = jax.tree.leaves(variables)[0].dtype
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (w.shape[0],) + a.shape), variables)
    apply = frozen_apply(model, {})
    apply = engine.static_apply(model) if apply is model.apply else apply
    out = _descend_members(apply, stacked, jnp.asarray(x, dtype),
                           jnp.asarray(y), w.astype(dtype), l2, lr, momentum, steps)
    _check_finite(out, "descend_members")
    return out


def _check_finite(params, what: str) -> None:
    if not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(params)):
        raise FloatingPointError(f"{what} produced non-finite params; lower the learning rate.")


# ----------------------------------------------------------------------------- problem


class Problem(NamedTuple):
    """Everything that defines a trained model: model, training data, config and seed key."""

    model: Model
    train: Dataset
    cfg: TrainConfig
    key: jax.Array


def train(problem: Problem) -> Fit:
    """Train on the whole training set."""
    return fit(problem.model, problem.train, problem.cfg, problem.key)


def retain_mask(problem: Problem, forget_ids) -> np.ndarray:
    """Weights 1 on retained examples, 0 on ``forget_ids`` (validated)."""
    w = np.ones(len(problem.train), np.float32)
    pos = problem.train.positions(forget_ids)
    if len(pos) == len(problem.train):
        raise ValueError(
            "forget_ids names every training example: nothing would be left to train on; "
            "forget a strict subset."
        )
    w[pos] = 0.0
    return w


def retrain(problem: Problem, forget_ids) -> Fit:
    """The exact-unlearning oracle: the same init key and data-order rule, minus the ids."""
    return fit(problem.model, problem.train, problem.cfg, problem.key,
               weights=retain_mask(problem, forget_ids))
