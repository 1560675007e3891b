"""The one training loop shared by the approximate unlearning methods.

Every loop-based method (NegGrad, NegGrad+, random labels, SCRUB, l1-sparse, SalUn) is a
*loss* ``loss(apply, params, aux, progress, retain, forget) -> scalar`` over one retain batch
and one forget batch (:class:`Batch`, weighted like :func:`unlearn.train.objective`), plus an
optional 0/1 mask on the gradient (SalUn). One jitted optax step per (loss, model, optimiser)
is compiled once and cached; data are passed as jit arguments, never closed over.

An epoch iterates the batches of a *driver* set (the retained examples or the forget set), in
the project's data order (:func:`unlearn.train.epoch_order` then
:func:`unlearn.train.batch_indices`, so the order depends only on the key, the epoch and the
ids present); the other set is cycled in its own order alongside it. ``progress`` in [0, 1) is
the fraction of steps done (for schedules such as l1-sparse's decaying penalty).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn.data import stable_hash
from unlearn.methods.base import (
    ParamState,
    Unlearner,
    next_weights,
    params_result,
    prepare_params,
)
from unlearn.train import (
    Problem,
    TrainConfig,
    batch_indices,
    epoch_order,
    key_seed,
    make_optimizer,
    objective,
)

Params = Any


class Batch(NamedTuple):
    """A weighted minibatch: inputs, labels, weights (0 marks padding)."""

    x: jax.Array
    y: jax.Array
    w: jax.Array


def mean_ce(apply, params: Params, b: Batch, l2: float | jax.Array = 0.0) -> jax.Array:
    """Weighted mean cross-entropy of a batch plus (l2/2)‖θ‖² (``train.objective``)."""
    return objective(apply, params, b.x, b.y, b.w, l2)


@functools.cache
def _step(loss: Callable, apply: Callable, optimizer: str, lr: float, masked: bool):
    opt = make_optimizer(TrainConfig(optimizer=optimizer, lr=lr))

    def step(params, opt_state, aux, mask, progress, x, y, ri, rm, fi, fm):
        def f(p):
            return loss(apply, p, aux, progress, Batch(x[ri], y[ri], rm), Batch(x[fi], y[fi], fm))

        value, g = jax.value_and_grad(f)(params)
        if masked:
            g = jax.tree.map(jnp.multiply, g, mask)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step), opt


def _order(problem: Problem, rows: np.ndarray, seed: int, epoch: int, salt: int) -> np.ndarray:
    return rows[epoch_order(stable_hash(problem.train.ids[rows]), seed, epoch, salt)]


def _cycled(rows: np.ndarray, nb: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` repeated to fill ``nb`` batches of ``bs`` (all-zero weights if empty)."""
    if len(rows) == 0:
        return np.zeros((nb, bs), np.int32), np.zeros((nb, bs), np.float32)
    return np.resize(rows, nb * bs).astype(np.int32).reshape(nb, bs), np.ones((nb, bs),
                                                                              np.float32)


def descend(problem: Problem, params: Params, loss: Callable, aux: Any, *,
            retain_rows: np.ndarray, forget_rows: np.ndarray, labels: np.ndarray,
            epochs: range, total_epochs: int, lr: float, seed: int, driver: str = "retain",
            mask: Params | None = None, opt_state: Any = None) -> tuple[Params, Any, int]:
    """Run ``epochs`` of optax steps minimising ``loss``; returns (params, opt_state, steps).

    ``driver`` names the set whose batches make up an epoch (``retain`` or ``forget``);
    ``labels`` are the labels used for every training row (random labels replace the forget
    rows' labels for the relabelling methods).
    """
    if driver not in ("retain", "forget"):
        raise ValueError(f"driver={driver!r}: choose 'retain' or 'forget'.")
    cfg = problem.cfg
    step, opt = _step(loss, problem.model.apply, cfg.optimizer, float(lr), mask is not None)
    if opt_state is None:
        opt_state = opt.init(params)
    x = jnp.asarray(problem.train.x, params_leaf(params).dtype)
    y = jnp.asarray(labels)
    bs = cfg.batch_size
    steps = 0
    for e in epochs:
        main, other = (retain_rows, forget_rows) if driver == "retain" else (forget_rows,
                                                                            retain_rows)
        idx, msk = batch_indices(_order(problem, main, seed, e, 1), np.arange(len(main)), bs)
        oidx, omsk = _cycled(_order(problem, other, seed, e, 2), len(idx), bs)
        if driver == "forget":
            idx, msk, oidx, omsk = oidx, omsk, idx, msk
        nb = len(idx)
        for b in range(nb):
            progress = jnp.float32((e * nb + b) / max(1, total_epochs * nb))
            params, opt_state, _ = step(params, opt_state, aux, mask, progress, x, y,
                                        idx[b], msk[b], oidx[b], omsk[b])
        steps += nb
    return params, opt_state, steps


def params_leaf(params: Params) -> jax.Array:
    """The first leaf of a params pytree (for its dtype)."""
    return jax.tree.leaves(params)[0]


def random_labels(y: np.ndarray, rows: np.ndarray, num_classes: int, key: jax.Array
                  ) -> np.ndarray:
    """Labels with each row in ``rows`` replaced by a uniformly random *different* class."""
    out = np.asarray(y).copy()
    shift = np.asarray(jax.random.randint(key, (len(rows),), 1, num_classes))
    out[rows] = (out[rows] + shift) % num_classes
    return out


def default_epochs(problem: Problem, epochs: int | None) -> int:
    """``epochs`` or, by default, a quarter of the training epochs (at least 1)."""
    return epochs if epochs is not None else max(1, problem.cfg.epochs // 4)


class Phase(NamedTuple):
    """One stage of a method's run: its loss, driver set and epoch numbers."""

    loss: Callable
    driver: str
    epochs: range


def loop_unlearner(name: str, loss: Callable | None, *, driver: str, epochs: int | None,
                   lr: float | None, hparams: dict, relabel: bool = False,
                   mask_fn: Callable | None = None,
                   plan: Callable[[int], list[Phase]] | None = None,
                   lr_scale: float = 1.0) -> Unlearner:
    """An :class:`Unlearner` that runs :func:`descend` with ``loss`` from the current params.

    ``hparams`` become ``aux`` (traced, so changing them does not recompile), together with
    ``l2`` (the training weight decay), ``teacher`` (the params before this request) and
    ``forget_ratio`` = |U| / |D∖U|.
    ``relabel`` replaces the forget labels by random other classes; ``mask_fn(problem, params,
    forget_rows, labels)`` returns a 0/1 gradient mask (SalUn). ``plan(epochs)`` lists the
    phases (loss, driver, epochs) to run in order, sharing one optimiser state (SCRUB's
    alternating max/min steps); by default one phase of ``loss`` over every epoch. Without
    ``lr`` the learning rate is ``lr_scale`` × the training learning rate.
    """
    if plan is None:
        plan = lambda n: [Phase(loss, driver, range(n))]  # noqa: E731

    def forget(state: ParamState, forget_ids, key):
        pos, w = next_weights(state, forget_ids)
        p = state.problem
        n_ep = default_epochs(p, epochs)
        k_lab, k_ord = jax.random.split(key)
        labels = (random_labels(p.train.y, pos, p.train.num_classes, k_lab) if relabel
                  else np.asarray(p.train.y))
        aux = {"l2": jnp.float32(p.cfg.l2), "teacher": state.params,
               "forget_ratio": jnp.float32(len(pos) / max(1.0, float(w.sum()))),
               **{k: jnp.float32(v) for k, v in hparams.items()}}
        mask = mask_fn(p, state.params, pos, labels) if mask_fn is not None else None
        params, opt_state, steps, seed = state.params, None, 0, key_seed(k_ord)
        for ph in plan(n_ep):
            params, opt_state, k = descend(
                p, params, ph.loss, aux, retain_rows=np.nonzero(w > 0)[0], forget_rows=pos,
                labels=labels, epochs=ph.epochs, total_epochs=n_ep,
                lr=lr if lr is not None else lr_scale * p.cfg.lr, seed=seed, driver=ph.driver,
                mask=mask, opt_state=opt_state)
            steps += k
        stats = {"epochs": n_ep, "steps": steps, **hparams}
        return params_result(p, params, stats), state._replace(params=params, weights=w)

    return Unlearner(name, prepare_params, forget)

