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

Two extensions serve the language-model methods (:mod:`unlearn.methods.lm_losses`):

* **Alternate inputs for the forget rows** (:class:`AltInputs`): a second version of each
  forget row (IdkDPO's "I don't know" answer to the same prompt). The loss then receives a
  third batch, ``loss(apply, params, aux, progress, retain, forget, alt)``, whose row ``j``
  is the alternate of the forget batch's row ``j`` (same weights).
* **Checkpoints** (``checkpoint_every=k``): the run is cut into engine calls of ``k`` steps
  and the params after each are kept, ``stats["checkpoints"] = [(step, params), ...]`` at
  steps k, 2k, ... and the last step (its params are the result's; the params before the
  request, step 0, are the caller's own), so a learning curve (forget quality against
  utility over the unlearning steps) needs one run, not one per length. The
  params at a checkpoint are those of a run stopped there (the steps, data order and
  optimiser state are the same; ``progress`` is still measured against the whole run).
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

__all__ = ["AltInputs", "Batch", "Phase", "Setup", "default_epochs", "descend",
           "loop_unlearner", "mean_ce", "random_labels"]


class AltInputs(NamedTuple):
    """Alternate inputs for forget rows: row ``j`` of ``x``/``y`` stands for training row
    ``rows[j]`` (token data may be wider than the training set's: both are padded to the
    wider width with id 0 / target ``-1``)."""

    rows: np.ndarray
    x: np.ndarray
    y: np.ndarray


class Setup(NamedTuple):
    """What a method computes per request before descending (:func:`loop_unlearner`'s
    ``setup``): extra ``aux`` values (traced), alternate forget inputs, and the loss to use
    when it depends on the problem (e.g. closed over the model; keep its identity stable per
    model so the engine's program cache hits)."""

    aux: dict = {}
    alt: AltInputs | None = None
    loss: Callable | None = None


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
                   driver: str, alt_index: np.ndarray | None = None) -> engine.Schedule:
    """One member's schedule for one epoch: the driver set's batches in the data order (salt
    1), the other set cycled alongside in its own order (salt 2); streams (retain, forget),
    plus (alt) when ``alt_index`` maps each training row to the data row of its alternate."""
    main, other = (retain_rows, forget_rows) if driver == "retain" else (forget_rows,
                                                                        retain_rows)
    idx, msk = engine.member_batches(main, hashes[main], seed, epoch, batch_size, 1)
    nb = len(idx)
    o = other[engine.epoch_order(hashes[other], seed, epoch, 2)]
    oidx, omsk = _cycled(o, nb, batch_size)
    streams = ((idx, msk), (oidx, omsk)) if driver == "retain" else ((oidx, omsk), (idx, msk))
    if alt_index is not None:
        fidx, fmsk = streams[1]
        streams = (*streams, (alt_index[fidx].astype(np.int32), fmsk))
    progress = (epoch * nb + np.arange(nb)) / max(1, total_epochs * nb)
    return engine.stack_schedules([streams], batch_size, progress[None], epoch=epoch)


def descend(problem: Problem, members: engine.Members, loss: Callable, aux: dict, *,
            retain_rows: np.ndarray, forget_rows: np.ndarray, labels: np.ndarray,
            epochs: range, total_epochs: int, key: jax.Array, driver: str = "retain",
            mask: Params | None = None, alt: AltInputs | None = None,
            checkpoint_every: int | None = None,
            on_checkpoint: Callable[[int, engine.Members], None] | None = None,
            ) -> tuple[engine.Members, int]:
    """Run ``epochs`` of optax steps minimising ``loss`` through the engine (one member);
    returns (members, steps).

    ``members`` carries the params, optimiser state (with its learning rate) and model state
    (:func:`start`); ``driver`` names the set whose batches make up an epoch (``retain`` or
    ``forget``); ``labels`` are the labels used for every training row (random labels replace
    the forget rows' labels for the relabelling methods); ``mask`` multiplies the gradient.
    ``alt`` adds a third stream, the alternates of the forget batch's rows (module doc).
    With ``checkpoint_every=k`` the steps of all ``epochs`` run in engine calls of ``k``
    steps and ``on_checkpoint(steps_done, members)`` is called after each (the last call at
    the total). Raises ``FloatingPointError`` if the params diverge.
    """
    if driver not in ("retain", "forget"):
        raise ValueError(f"driver={driver!r}: choose 'retain' or 'forget'.")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(
            checkpoint_every, int | np.integer) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every={checkpoint_every!r} must be a positive int "
                         "(steps between checkpoints) or None.")
    cfg = problem.cfg
    dtype = str(jax.tree.leaves(members.params)[0].dtype)
    x, y, alt_index = _with_alternates(np.asarray(problem.train.x), np.asarray(labels), alt,
                                       forget_rows)
    data = engine.device_data(x, y, None, dtype)
    hashes = stable_hash(problem.train.ids)
    seed = engine.key_seed(key)
    aux1 = jax.tree.map(lambda a: jnp.asarray(a)[None], aux)
    gmask = None if mask is None else jax.tree.map(
        lambda a: a[None], engine.split_variables(mask)[0])

    def run(sched):
        return engine.run(problem.model, members, data, sched, keys=jnp.stack([key]),
                          aux=aux1, optimizer=cfg.optimizer, dtype=dtype,
                          strategy=cfg.strategy, loss=loss, grad_mask=gmask)[0]

    scheds = [epoch_schedule(hashes, retain_rows, forget_rows, seed, e, total_epochs,
                             cfg.batch_size, driver, alt_index) for e in epochs]
    steps = sum(s.steps for s in scheds)
    if checkpoint_every is None:
        for sched in scheds:
            members = run(sched)
    elif scheds:
        whole = engine.concat_schedules(scheds)
        for start in range(0, steps, checkpoint_every):
            members = run(whole.steps_slice(start, start + checkpoint_every))
            if on_checkpoint is not None:
                on_checkpoint(min(start + checkpoint_every, steps), members)
    engine.check_finite(members, what="unlearning")
    return members, steps


def _with_alternates(x: np.ndarray, y: np.ndarray, alt: AltInputs | None,
                     forget_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The training arrays with ``alt``'s rows appended (both padded to the wider width) and
    the map from a training row to its alternate's row (``-1``: none)."""
    if alt is None:
        return x, y, None
    rows = np.asarray(alt.rows)
    ax, ay = np.asarray(alt.x), np.asarray(alt.y)
    if ax.ndim != 2 or ax.shape != ay.shape or len(ax) != len(rows):
        raise ValueError(f"alt: x {ax.shape} and y {ay.shape} must be (m, T') arrays with one "
                         f"row per entry of rows ({len(rows)}).")
    if x.ndim != 2 or ax.shape[1] < 1:
        raise ValueError("alt inputs need token data: x of shape (n, T).")
    missing = np.setdiff1d(forget_rows, rows)
    if len(missing):
        raise ValueError(f"alt has no alternate for training rows {missing[:20].tolist()}; "
                         "give one for every forget row.")
    width = max(x.shape[1], ax.shape[1])

    def pad(a, value):
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)

    index = np.full(len(x), -1, np.int64)
    index[rows] = len(x) + np.arange(len(rows))
    return (np.concatenate([pad(x, 0), pad(ax.astype(x.dtype), 0)]),
            np.concatenate([pad(y, -1), pad(ay.astype(y.dtype), -1)]), index)


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
                   lr_scale: float = 1.0, classes_only: bool = False,
                   setup: Callable[[ParamState, np.ndarray, jax.Array], Setup] | None = None,
                   checkpoint_every: int | None = None,
                   prepare: Callable | None = None) -> Unlearner:
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
    classifiers (:func:`unlearn.methods.base.check_classes`); ``prepare`` replaces the
    default preparation (e.g. :func:`unlearn.methods.lm_losses.prepare_tokens`).
    ``setup(state, forget_rows, key) -> Setup`` runs once per request (its key is
    ``fold_in(key, 1)``, so the other draws are unchanged): extra aux values, alternate forget
    inputs (:class:`AltInputs`) and/or the loss. ``checkpoint_every=k`` keeps the params
    every ``k`` steps in ``stats["checkpoints"]`` (module doc).
    """
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(
            checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every={checkpoint_every!r} must be a positive int "
                         "(steps between checkpoints) or None.")

    def forget(state: ParamState, forget_ids, key):
        pos, w = next_weights(state, forget_ids)
        p = state.problem
        n_ep = default_epochs(p, epochs)
        k_lab, k_ord = jax.random.split(key)
        labels = (random_labels(p.train.y, pos, p.train.num_classes, k_lab) if relabel
                  else np.asarray(p.train.y))
        extra = setup(state, pos, jax.random.fold_in(key, 1)) if setup else Setup()
        aux = {"l2": jnp.float32(p.cfg.l2), "teacher": state.params,
               "forget_ratio": jnp.float32(len(pos) / max(1.0, float(w.sum()))),
               **{k: jnp.float32(v) for k, v in hparams.items()}, **extra.aux}
        mask = mask_fn(p, state.params, pos, labels) if mask_fn is not None else None
        members = start(state.params, p.cfg.optimizer,
                        lr if lr is not None else lr_scale * p.cfg.lr)
        the_loss = extra.loss if extra.loss is not None else loss
        phases = (plan(n_ep) if plan is not None
                  else [Phase(the_loss, driver, range(n_ep))])
        checkpoints = []
        steps = 0
        for ph in phases:
            def keep(k, m, offset=steps):
                checkpoints.append((offset + k, variables(m)))

            members, k = descend(
                p, members, ph.loss, aux, retain_rows=np.nonzero(w > 0)[0], forget_rows=pos,
                labels=labels, epochs=ph.epochs, total_epochs=n_ep, key=k_ord,
                driver=ph.driver, mask=mask, alt=extra.alt, checkpoint_every=checkpoint_every,
                on_checkpoint=keep)
            steps += k
        params = variables(members)
        stats = {"epochs": n_ep, "steps": steps, **hparams}
        if checkpoint_every is not None:
            stats["checkpoints"] = checkpoints
        return params_result(p, params, stats), state._replace(params=params, weights=w)

    if prepare is None:
        prepare = prepare_classifier(name) if relabel or classes_only else prepare_params
    return Unlearner(name, prepare, forget)

