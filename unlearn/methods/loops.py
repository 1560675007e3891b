"""The loop-based approximate unlearning methods, as calls of the training engine.

Every loop-based method (NegGrad, NegGrad+, random labels, SCRUB, l1-sparse, SalUn) is a
*loss* ``loss(apply, params, aux, progress, retain, forget) -> scalar`` over one retain batch
and one forget batch (:class:`Batch`, weighted like :func:`unlearn.objective.objective`), plus an
optional 0/1 mask on the gradient (SalUn). The loss is the engine's loss
(:func:`unlearn.engine.run` with two streams): one program per (loss, model, optimiser,
strategy), compiled once by the engine's cache; the learning rate and ``aux`` are runtime
values, so a new request or hyperparameter never recompiles.

An epoch iterates the batches of a *driver* set (the retained examples or the forget set), in
the project's data order (:func:`unlearn.engine.member_batches`: the order depends only on the
key, the epoch and the ids present); the other set is cycled in its own order alongside it.
``progress`` in [0, 1) is the fraction of steps done (for schedules such as l1-sparse's
decaying penalty).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import engine
from unlearn.data import stable_hash
from unlearn.engine import Batch
from unlearn.methods.base import (
    ParamState,
    Unlearner,
    next_weights,
    params_result,
    prepare_classifier,
    prepare_params,
)
from unlearn.train import Problem, objective

Params = Any

__all__ = ["Batch", "Phase", "default_epochs", "descend", "loop_unlearner", "mean_ce",
           "random_labels"]


def mean_ce(apply, params: Params, b: Batch, l2: float | jax.Array = 0.0) -> jax.Array:
    """Weighted mean cross-entropy of a batch plus (l2/2)‖θ‖² (``objective``)."""
    return objective(apply, params, b.x, b.y, b.w, l2)


def _cycled(rows: np.ndarray, nb: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` repeated to fill ``nb`` batches of ``bs`` (all-zero weights if empty)."""
    if len(rows) == 0:
        return np.zeros((nb, bs), np.int32), np.zeros((nb, bs), np.float32)
    return np.resize(rows, nb * bs).astype(np.int32).reshape(nb, bs), np.ones((nb, bs),
                                                                              np.float32)


def epoch_schedule(hashes: np.ndarray, retain_rows: np.ndarray, forget_rows: np.ndarray,
                   seed: int, epoch: int, total_epochs: int, batch_size: int,
                   driver: str) -> engine.Schedule:
    """One member's schedule for one epoch: the driver set's batches in the data order (salt
    1), the other set cycled alongside in its own order (salt 2); streams (retain, forget)."""
    main, other = (retain_rows, forget_rows) if driver == "retain" else (forget_rows,
                                                                        retain_rows)
    idx, msk = engine.member_batches(main, hashes[main], seed, epoch, batch_size, 1)
    nb = len(idx)
    o = other[engine.epoch_order(hashes[other], seed, epoch, 2)]
    oidx, omsk = _cycled(o, nb, batch_size)
    streams = ((idx, msk), (oidx, omsk)) if driver == "retain" else ((oidx, omsk), (idx, msk))
    progress = (epoch * nb + np.arange(nb)) / max(1, total_epochs * nb)
    return engine.stack_schedules([streams], batch_size, progress[None], epoch=epoch)


def descend(problem: Problem, members: engine.Members, loss: Callable, aux: dict, *,
            retain_rows: np.ndarray, forget_rows: np.ndarray, labels: np.ndarray,
            epochs: range, total_epochs: int, key: jax.Array, driver: str = "retain",
            mask: Params | None = None) -> tuple[engine.Members, int]:
    """Run ``epochs`` of optax steps minimising ``loss`` through the engine (one member);
    returns (members, steps).

    ``members`` carries the params, optimiser state (with its learning rate) and model state
    (:func:`start`); ``driver`` names the set whose batches make up an epoch (``retain`` or
    ``forget``); ``labels`` are the labels used for every training row (random labels replace
    the forget rows' labels for the relabelling methods); ``mask`` multiplies the gradient.
    Raises ``FloatingPointError`` if the params diverge.
    """
    if driver not in ("retain", "forget"):
        raise ValueError(f"driver={driver!r}: choose 'retain' or 'forget'.")
    cfg = problem.cfg
    dtype = str(jax.tree.leaves(members.params)[0].dtype)
    data = engine.device_data(problem.train.x, labels, None, dtype)
    hashes = stable_hash(problem.train.ids)
    seed = engine.key_seed(key)
    aux1 = jax.tree.map(lambda a: jnp.asarray(a)[None], aux)
    gmask = None if mask is None else jax.tree.map(
        lambda a: a[None], engine.split_variables(mask)[0])
    steps = 0
    for e in epochs:
        sched = epoch_schedule(hashes, retain_rows, forget_rows, seed, e, total_epochs,
                               cfg.batch_size, driver)
        members, _ = engine.run(problem.model, members, data, sched, keys=jnp.stack([key]),
                                aux=aux1, optimizer=cfg.optimizer, dtype=dtype,
                                strategy=cfg.strategy, loss=loss, grad_mask=gmask)
        steps += sched.steps
    engine.check_finite(members, what="unlearning")
    return members, steps


def start(params: Params, optimizer: str, lr: float) -> engine.Members:
    """One engine member at ``params`` (variables) with a fresh optimiser state at ``lr``."""
    return engine.init_members(engine.stack([params]), optimizer, lr)


def variables(members: engine.Members) -> Params:
    """The (unstacked) variables of the single member."""
    return engine.unstack(members.variables(), 0)


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
                   lr_scale: float = 1.0, classes_only: bool = False) -> Unlearner:
    """An :class:`Unlearner` that runs :func:`descend` with ``loss`` from the current params.

    ``hparams`` become ``aux`` (traced, so changing them does not recompile), together with
    ``l2`` (the training weight decay), ``teacher`` (the params before this request) and
    ``forget_ratio`` = |U| / |D∖U|.
    ``relabel`` replaces the forget labels by random other classes; ``mask_fn(problem, params,
    forget_rows, labels)`` returns a 0/1 gradient mask (SalUn). ``plan(epochs)`` lists the
    phases (loss, driver, epochs) to run in order, sharing one optimiser state (SCRUB's
    alternating max/min steps); by default one phase of ``loss`` over every epoch. Without
    ``lr`` the learning rate is ``lr_scale`` × the training learning rate.
    ``classes_only`` (implied by ``relabel``): ``prepare`` refuses tasks that are not
    classifiers (:func:`unlearn.methods.base.check_classes`).
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
        members = start(state.params, p.cfg.optimizer,
                        lr if lr is not None else lr_scale * p.cfg.lr)
        steps = 0
        for ph in plan(n_ep):
            members, k = descend(
                p, members, ph.loss, aux, retain_rows=np.nonzero(w > 0)[0], forget_rows=pos,
                labels=labels, epochs=ph.epochs, total_epochs=n_ep, key=k_ord,
                driver=ph.driver, mask=mask)
            steps += k
        params = variables(members)
        stats = {"epochs": n_ep, "steps": steps, **hparams}
        return params_result(p, params, stats), state._replace(params=params, weights=w)

    prepare = prepare_classifier(name) if relabel or classes_only else prepare_params
    return Unlearner(name, prepare, forget)

