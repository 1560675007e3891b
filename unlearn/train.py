"""Deterministic training of the regularised objective, and the retrain oracle.

The objective (DESIGN.md "Core shapes") is

    L(θ; D, w) = Σ_i w_i ℓ(f_θ(x_i), y_i) / max(Σ_i w_i, 1) + (λ/2) ‖θ‖²

with ℓ the softmax cross-entropy and ``w`` a per-example weight/mask. "D without U" is the same
compiled function with ``w = 0`` on U: no recompiles, no reshaping, and retraining is exactly
the training code path.

Two trainers:

* ``solver="sgd"``: optax minibatch training. The order of examples in epoch ``e`` is a
  function of ``(key, e)`` and the **ids present** only (each id gets a pseudo-random priority
  from a hash of the id, the key and the epoch; rows sort by priority), so removing ids leaves
  the relative order of the others unchanged. Batches are padded with zero weights to a fixed
  batch size. Per epoch the steps run either as one jitted ``lax.scan`` (dense models) or as a
  Python loop of jitted steps (convolutions on CPU, where XLA runs a conv inside a loop ~20×
  slower; see ``benchmarks/train_epoch.py``).
* ``solver="lbfgs"``: full-batch optax L-BFGS inside one ``lax.while_loop`` until
  ‖∇L‖ ≤ ``tol`` — the exact oracle for convex models (use float64).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from unlearn.data import Dataset, stable_hash
from unlearn.models import Model
from unlearn.objective import example_losses, l2_norm_sq, objective  # noqa: F401 (re-exported)

Params = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (all keyword arguments of :func:`fit`).

    solver: ``sgd`` (optax minibatches) or ``lbfgs`` (full batch, to ``tol``).
    optimizer: optax optimizer name for ``sgd`` (``adam``, ``sgd``, ``momentum``).
    strategy: per-epoch loop for ``sgd``: ``scan``, ``loop`` or ``auto`` (loop for conv models
      on CPU, scan otherwise).
    dtype: ``float32`` or ``float64`` (the latter needs ``jax_enable_x64``).
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


class Fit(NamedTuple):
    """Trained params and what the trainer reports (steps, final grad norm / loss)."""

    params: Params
    info: dict


# ----------------------------------------------------------------------------- objective


# ----------------------------------------------------------------------------- data order


def key_seed(key: jax.Array) -> int:
    """A Python int derived from a JAX key (typed or raw)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = np.asarray(data, dtype=np.uint64).reshape(-1)
    out = 0
    for v in data.tolist():
        out = (out * 0x9E3779B97F4A7C15 + int(v)) % (1 << 64)
    return out


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def epoch_order(id_hashes: np.ndarray, seed: int, epoch: int, *salt: int) -> np.ndarray:
    """Positions of the given examples sorted by a priority that depends only on
    ``(seed, epoch, *salt)`` and each example's id hash.

    Dropping examples leaves the relative order of the rest unchanged, which is what makes
    retraining without U (and SISA's forget) reproduce training on D∖U exactly.
    """
    s = np.uint64(seed % (1 << 64))
    for v in (epoch, *salt):
        s = _splitmix64(np.asarray(s ^ np.uint64(v % (1 << 64)), dtype=np.uint64))
    prio = _splitmix64(np.asarray(id_hashes, dtype=np.uint64) ^ s)
    return np.argsort(prio, kind="stable")


def batch_indices(present: np.ndarray, order: np.ndarray, batch_size: int):
    """(num_batches, batch_size) row indices and weights; the tail batch is zero-padded."""
    rows = present[order]
    nb = max(1, math.ceil(len(rows) / batch_size))
    idx = np.zeros(nb * batch_size, dtype=np.int32)
    msk = np.zeros(nb * batch_size, dtype=np.float32)
    idx[: len(rows)] = rows
    msk[: len(rows)] = 1.0
    return idx.reshape(nb, batch_size), msk.reshape(nb, batch_size)


def bucket(k: int) -> int:
    """Next power of two ≥ k: pad a variable-length batch to this many rows (zero weights) so
    a handful of compiled programs serve every size."""
    return 1 << (max(k, 1) - 1).bit_length()


# ----------------------------------------------------------------------------- optimisers


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax transformation named by ``cfg.optimizer`` at learning rate ``cfg.lr``."""
    if cfg.optimizer == "adam":
        return optax.adam(cfg.lr)
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.lr)
    if cfg.optimizer == "momentum":
        return optax.sgd(cfg.lr, momentum=0.9)
    raise ValueError(f"optimizer={cfg.optimizer!r}: choose 'adam', 'sgd' or 'momentum'.")


def make_step(apply, opt: optax.GradientTransformation, l2: float):
    """One optimiser step on a weighted minibatch (pure; jit it or scan it)."""

    def step(params, opt_state, xb, yb, wb):
        loss, g = jax.value_and_grad(lambda p: objective(apply, p, xb, yb, wb, l2))(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def use_scan(model: Model, strategy: str) -> bool:
    """Whether an epoch runs as one ``lax.scan`` (True) or a loop of jitted steps."""
    if strategy == "scan":
        return True
    if strategy == "loop":
        return False
    if strategy != "auto":
        raise ValueError(f"strategy={strategy!r}: choose 'auto', 'scan' or 'loop'.")
    return not (model.has_conv and jax.default_backend() == "cpu")


class _Compiled(NamedTuple):
    step: Any
    epoch: Any


_CACHE: dict = {}


def _compiled(model: Model, cfg: TrainConfig) -> _Compiled:
    k = (model.apply, cfg.optimizer, cfg.lr, cfg.l2)
    if k not in _CACHE:
        step = make_step(model.apply, make_optimizer(cfg), cfg.l2)

        def epoch(params, opt_state, x, y, w, idx, msk):
            def body(carry, b):
                i, m = b
                p, s, loss = step(*carry, x[i], y[i], w[i] * m)
                return (p, s), loss

            (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (idx, msk))
            return params, opt_state, losses

        _CACHE[k] = _Compiled(jax.jit(step), jax.jit(epoch))
    return _CACHE[k]


def cast(tree, dtype: str):
    """Cast the floating leaves of a pytree to ``dtype``."""
    dt = jnp.dtype(dtype)
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs jax.config.update('jax_enable_x64', True).")
    return jax.tree.map(
        lambda a: jnp.asarray(a, dt) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a,
        tree,
    )


# ----------------------------------------------------------------------------- fit


def init_params(model: Model, data: Dataset, key: jax.Array, dtype: str = "float32") -> Params:
    """Initial params from ``fold_in(key, 0)`` (the same for training and retraining)."""
    return cast(model.init(jax.random.fold_in(key, 0), jnp.asarray(data.x[:1])), dtype)


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
    if cfg.solver == "lbfgs":
        return fit_lbfgs(model, data, cfg, params, w)
    if cfg.solver != "sgd":
        raise ValueError(f"solver={cfg.solver!r}: choose 'sgd' or 'lbfgs'.")
    return fit_sgd(model, data, cfg, key, params, w)


def fit_sgd(model: Model, data: Dataset, cfg: TrainConfig, key, params, w) -> Fit:
    """Minibatch optax training; see the module docstring for the data-order rule."""
    comp = _compiled(model, cfg)
    x = cast(jnp.asarray(data.x), cfg.dtype)
    y = jnp.asarray(data.y)
    wj = cast(jnp.asarray(w), cfg.dtype)
    present = np.nonzero(w > 0)[0]
    hashes = stable_hash(data.ids[present])
    seed = key_seed(key)
    opt_state = make_optimizer(cfg).init(params)
    scan = use_scan(model, cfg.strategy)
    losses = []
    for e in tqdm(range(cfg.epochs), disable=not cfg.progress, desc=f"train {model.name}"):
        idx, msk = batch_indices(present, epoch_order(hashes, seed, e), cfg.batch_size)
        if scan:
            params, opt_state, ls = comp.epoch(params, opt_state, x, y, wj, idx, msk)
            losses.append(float(jnp.mean(ls)))
        else:
            ls = []
            for i, m in zip(idx, msk, strict=True):
                params, opt_state, loss = comp.step(params, opt_state, x[i], y[i], wj[i] * m)
                ls.append(loss)
            losses.append(float(jnp.mean(jnp.stack(ls))))
    _check_finite(params, "training")
    return Fit(params, {"epochs": cfg.epochs, "steps": cfg.epochs * len(idx),
                        "final_loss": losses[-1] if losses else float("nan")})


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
        return p, s, it + 1, optax.tree.norm(jax.grad(fun)(p))

    g0 = optax.tree.norm(jax.grad(fun)(params))
    p, _, it, gnorm = jax.lax.while_loop(cond, body, (params, opt.init(params), 0, g0))
    return p, it, gnorm


@functools.partial(jax.jit, static_argnames=("apply", "max_iter"))
def _lbfgs_run(apply, params, x, y, w, l2, tol, max_iter):
    fun = lambda p: objective(apply, p, x, y, w, l2)  # noqa: E731
    p, it, gnorm = lbfgs_loop(fun, params, tol, max_iter)
    return p, it, gnorm, fun(p)


def fit_lbfgs(model: Model, data: Dataset, cfg: TrainConfig, params, w) -> Fit:
    """Full-batch L-BFGS (optax, zoom line search) until ‖∇L‖ ≤ ``cfg.tol``."""
    x = cast(jnp.asarray(data.x), cfg.dtype)
    wj = cast(jnp.asarray(w), cfg.dtype)
    p, it, gnorm, value = _lbfgs_run(model.apply, params, x, jnp.asarray(data.y), wj,
                                     cfg.l2, cfg.tol, cfg.max_iter)
    _check_finite(p, "L-BFGS")
    return Fit(p, {"iterations": int(it), "grad_norm": float(gnorm), "loss": float(value),
                   "converged": bool(gnorm <= cfg.tol)})


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
