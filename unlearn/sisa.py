"""SISA training and exact unlearning (Bourtoule et al. 2021, "Machine Unlearning", IEEE S&P).

**Sharded**: the training set is split into ``S`` disjoint shards; one model per shard.
**Isolated**: shards never share data or parameters. **Sliced**: each shard's data is split into
``R`` slices and trained incrementally; a checkpoint is kept after each slice. **Aggregated**:
the ensemble predicts by majority vote or by the mean of the shard models' probabilities.

Plan (:func:`make_layout`). Each example gets a shard and a slice once, from the *original*
dataset, the key and the id hashes, and the layout is stored with the model — forgetting never
moves an example. ``uniform``: ids sorted by a key-seeded hash priority are dealt round-robin to
the shards (sizes differ by at most one). ``class_balanced``: the same, class by class, with the
dealing continued across classes so every shard gets ⌊n_c/S⌋ or ⌈n_c/S⌉ of each class c. Inside
shard s the ids sorted by a second priority are cut into R contiguous windows (slices).

Incremental training (paper §IV-B, "slicing"). Stage r = 1..R trains the shard model on the
union of slices 1..r, starting from the checkpoint of stage r−1 (stage 0 = initial params),
for e_r epochs. The paper uses e_r = 2e/(R+1) for every stage, which makes the number of
example-gradients Σ_r (r/R)·n_s·e_r equal to e full passes over the shard. With integer epochs
the exact rule used here (:func:`slice_epochs`) is: e_r = max(1, ⌊2e/(R+1)⌋) for all r, then,
for r = R, R−1, ..., 1, add one epoch to stage r while Σ_r r·e_r + r ≤ e·R. So the total cost
is at most e passes over the shard (equal to e whenever 2e/(R+1) is an integer, e.g. e=20,
R=4 → 8 epochs per stage, 8·(1+2+3+4)/4 = 20 passes) and never below one epoch per stage.

Overlap. ``overlap=o`` makes the R slices overlapping windows of length L = n_s/(R − (R−1)o)
with stride (1 − o)L (the seed tutorial's "2 slices, 50% overlap" for tiny data). Because stage
r trains on the *union* of slices 1..r, an example's earliest window is what matters: overlap
only moves slice boundaries earlier (R=2, o=0.5 gives slices of 2/3 and 1/3 of the shard).
Exactness is kept; we document that the tutorial's overlap has no other effect under the
paper's incremental rule.

Exactness. The order of examples in epoch j of stage r of shard s is
``train.epoch_order(hashes, seed, j, s, r)`` over the ids present: a function of
(key, shard, slice, epoch) and the ids present only. ``forget(U)`` retrains each affected shard
from the checkpoint before its earliest affected slice, so the result equals training on D∖U
from scratch with the same layout (a test). All shards advance together in one vmapped step;
a shard whose stage needs fewer batches gets *no-op* steps: ``jnp.where(active, new, old)`` on
params and optimiser state, so Adam's moments and step count are untouched.

Execution strategies. ``vmap``: one jitted ``lax.scan`` over the steps of an epoch of a
``vmap``-ed masked step (dense models; every model on GPU). ``unroll``: XLA's CPU backend turns
a vmapped convolution into a slow grouped convolution and runs convolutions inside loops ~20×
slower, so for conv nets on CPU the shard axis is unrolled at trace time inside ONE jitted step
(S independent convolutions in one program) and the steps run as a Python loop. ``auto`` picks
``unroll`` for conv models on CPU and ``vmap`` otherwise. A ``jax.sharding.Mesh`` places the
stacked shard axis on a mesh axis (``NamedSharding``) so shards train in parallel on devices.

Persistent model: ``python -m unlearn.sisa train|forget|predict|verify|status`` over a model
directory (orbax checkpoints, an append-only JSON-lines deletion ledger, a ``CURRENT`` pointer);
see :func:`cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import data as data_lib
from unlearn import models as models_lib
from unlearn.data import Dataset, stable_hash
from unlearn.models import Model
from unlearn.train import (
    TrainConfig,
    batch_indices,
    bucket,
    cast,
    epoch_order,
    key_seed,
    make_optimizer,
    make_step,
)

Params = Any
_SALT_SHARD = 0x5348415244  # "SHARD"
_SALT_SLICE = 0x534C494345  # "SLICE"
_SALT_INIT = 7919


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """S shards × R slices; ``assignment`` ``uniform`` or ``class_balanced``; slice ``overlap``
    in [0, 1) (see the module docstring)."""

    shards: int = 4
    slices: int = 1
    assignment: str = "uniform"
    overlap: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.shards, int) and self.shards >= 1):
            raise ValueError(f"shards={self.shards!r}: pass an integer ≥ 1.")
        if not (isinstance(self.slices, int) and self.slices >= 1):
            raise ValueError(f"slices={self.slices!r}: pass an integer ≥ 1.")
        if self.assignment not in ("uniform", "class_balanced"):
            raise ValueError(f"assignment={self.assignment!r}: choose 'uniform' or "
                             "'class_balanced'.")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap={self.overlap}: pass a fraction in [0, 1).")


class Layout(NamedTuple):
    """The fixed assignment of every original id to a shard and its earliest slice (0-based),
    with the ids' stable hashes (the data order's only input besides the key)."""

    ids: np.ndarray
    shard: np.ndarray
    slice: np.ndarray
    hashes: np.ndarray

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the layout holding ``ids``; ids outside the layout are an error."""
        ids = np.asarray(ids, str)
        if ids.shape == self.ids.shape and np.array_equal(ids, self.ids):
            return np.arange(len(ids))  # the layout's own dataset (every request does this)
        order = np.argsort(self.ids)
        at = np.minimum(np.searchsorted(self.ids, ids, sorter=order), len(order) - 1)
        pos = order[at]
        found = self.ids[pos] == ids
        if not found.all():
            raise KeyError(f"ids {ids[~found][:10].tolist()} are not in the SISA layout (the "
                           "plan was made on another dataset); retrain with `train` to add "
                           "data.")
        return pos

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, slice) of each id; ids outside the layout are an error."""
        pos = self.positions(ids)
        return self.shard[pos], self.slice[pos]


def slice_epochs(epochs: int, slices: int) -> list[int]:
    """Epochs e_r per stage (see the module docstring for the exact rule)."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: pass at least 1.")
    base = max(1, (2 * epochs) // (slices + 1))
    e = [base] * slices
    for r in range(slices, 0, -1):
        if sum((i + 1) * v for i, v in enumerate(e)) + r <= epochs * slices:
            e[r - 1] += 1
    return e


def make_layout(plan: Plan, ds: Dataset, key: jax.Array) -> Layout:
    """Assign every example of ``ds`` to a shard and a slice (seeded by ``key``)."""
    n = len(ds)
    if plan.shards > n:
        raise ValueError(f"shards={plan.shards} is larger than the data ({n} examples): "
                         "use at most one shard per example (far fewer in practice).")
    seed = key_seed(key)
    h = stable_hash(ds.ids)
    shard = np.zeros(n, np.int64)
    if plan.assignment == "uniform":
        order = epoch_order(h, seed, 0, _SALT_SHARD)
        shard[order] = np.arange(n) % plan.shards
    else:
        offset = 0
        for c in range(ds.num_classes):
            rows = np.nonzero(ds.y == c)[0]
            rows = rows[epoch_order(h[rows], seed, 0, _SALT_SHARD, c)]
            shard[rows] = (offset + np.arange(len(rows))) % plan.shards
            offset += len(rows)
    sl = np.zeros(n, np.int64)
    R, o = plan.slices, plan.overlap
    for s in range(plan.shards):
        rows = np.nonzero(shard == s)[0]
        rows = rows[epoch_order(h[rows], seed, 0, _SALT_SLICE, s)]
        ns = len(rows)
        length = ns / (R - (R - 1) * o)
        ends = np.array([round((1 - o) * length * r + length) for r in range(R)])
        ends[-1] = ns
        sl[rows] = np.searchsorted(ends, np.arange(ns), side="right")
    return Layout(np.asarray(ds.ids, str), shard, np.minimum(sl, R - 1), h)


# ----------------------------------------------------------------------------- state


class SisaState(NamedTuple):
    """A trained SISA ensemble.

    ``ckpts`` is ``(params, opt_state)`` stacked with leading axes (R+1, S): index r is the
    state after stage r (0 = initial). ``alive`` marks the examples of ``data`` not forgotten.
    """

    model: Model
    cfg: TrainConfig
    plan: Plan
    key: jax.Array
    data: Dataset
    layout: Layout
    alive: np.ndarray
    ckpts: Any
    strategy: str
    mesh: Any = None

    @property
    def params(self) -> Params:
        """The served shard models: params stacked over shards (leading axis S)."""
        return jax.tree.map(lambda a: a[-1], self.ckpts[0])

    def shard_sizes(self) -> np.ndarray:
        """Alive examples per shard."""
        return np.bincount(self.layout.lookup(self.data.ids)[0][self.alive],
                           minlength=self.plan.shards)


def resolve_strategy(model: Model, strategy: str = "auto") -> str:
    """``vmap`` or ``unroll`` (see the module docstring); ``auto`` picks by model and backend."""
    if strategy in ("vmap", "unroll"):
        return strategy
    if strategy != "auto":
        raise ValueError(f"strategy={strategy!r}: choose 'auto', 'vmap' or 'unroll'.")
    return "unroll" if (model.has_conv and jax.default_backend() == "cpu") else "vmap"


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _take(tree: Any, idx) -> Any:
    return jax.tree.map(lambda a: a[idx], tree)


def _host(tree: Any) -> Any:
    """A writable NumPy copy of every leaf (checkpoints live on the host)."""
    return jax.tree.map(lambda a: np.array(a), tree)


def _init_stack(model: Model, ds: Dataset, cfg: TrainConfig, key, shards: int):
    """Initial params and optimiser state of every shard, stacked; shard s is initialised as
    ``train.init_params(model, ds, fold_in(key, 7919 + s))`` (one jitted, vmapped init)."""
    opt = make_optimizer(cfg)
    keys = jnp.stack([jax.random.fold_in(key, _SALT_INIT + s) for s in range(shards)])
    k = ("init", model.init, cfg.optimizer, cfg.lr, cfg.dtype)
    if k not in _CACHE:
        def one(kk, x1):
            p = cast(model.init(jax.random.fold_in(kk, 0), x1), cfg.dtype)
            return p, opt.init(p)

        _CACHE[k] = jax.jit(jax.vmap(one, in_axes=(0, None)))
    return _CACHE[k](keys, cast(jnp.asarray(ds.x[:1]), cfg.dtype))


# ----------------------------------------------------------------------------- compiled steps

_CACHE: dict = {}


def _masked_step(apply, cfg: TrainConfig):
    step = make_step(apply, make_optimizer(cfg), cfg.l2)

    def f(params, opt_state, xb, yb, wb, active):
        new_p, new_s, loss = step(params, opt_state, xb, yb, wb)
        keep = lambda n, o: jnp.where(active, n, o)  # a no-op step leaves everything as it was
        return jax.tree.map(keep, new_p, params), jax.tree.map(keep, new_s, opt_state), loss

    return f


def _compiled(model: Model, cfg: TrainConfig, strategy: str):
    k = (model.apply, cfg.optimizer, cfg.lr, cfg.l2, strategy)
    if k in _CACHE:
        return _CACHE[k]
    mstep = _masked_step(model.apply, cfg)
    if strategy == "vmap":
        vstep = jax.vmap(mstep)

        def epoch(params, opt_state, x, y, idx, msk, active):
            def body(carry, b):
                i, m, a = b
                p, s, loss = vstep(*carry, x[i], y[i], m.astype(x.dtype), a)
                return (p, s), loss

            (params, opt_state), losses = jax.lax.scan(body, (params, opt_state),
                                                       (idx, msk, active))
            return params, opt_state, losses

        fn = jax.jit(epoch)
    else:

        def step(params, opt_state, x, y, idx, msk, active):
            outs = []
            for s in range(idx.shape[0]):  # unrolled at trace time: S independent programs
                p, o = _take(params, s), _take(opt_state, s)
                outs.append(mstep(p, o, x[idx[s]], y[idx[s]], msk[s].astype(x.dtype),
                                  active[s]))
            return _stack([a for a, _, _ in outs]), _stack([b for _, b, _ in outs]), \
                jnp.stack([c for _, _, c in outs])

        fn = jax.jit(step)
    _CACHE[k] = fn
    return fn


def _predict_fn(model: Model, strategy: str):
    k = ("predict", model.apply, strategy)
    if k not in _CACHE:
        if strategy == "vmap":
            f = jax.vmap(model.apply, in_axes=(0, None))
        else:
            def f(params, x):
                n = jax.tree.leaves(params)[0].shape[0]
                return jnp.stack([model.apply(_take(params, s), x) for s in range(n)])
        _CACHE[k] = jax.jit(f)
    return _CACHE[k]


# ----------------------------------------------------------------------------- schedule


def _stage_schedule(state_parts, shards: np.ndarray, active_shard: np.ndarray, stage: int,
                    epochs: int, batch_size: int):
    """Batches of every epoch of ``stage`` for the given shards, padded to a common length.

    Returns per epoch ``(idx (T, k, B), msk (T, k, B), active (T, k))``; a shard that is not
    active in this stage, or has no data in it, gets only no-op steps.
    """
    hashes, seed, shard_of, slice_of, alive = state_parts
    out = []
    for j in range(epochs):
        per = []
        for s, act in zip(shards.tolist(), active_shard.tolist(), strict=True):
            present = np.nonzero((shard_of == s) & (slice_of <= stage) & alive)[0]
            if not act or len(present) == 0:
                per.append(None)
                continue
            order = epoch_order(hashes[present], seed, j, s, stage)
            per.append(batch_indices(present, order, batch_size))
        nb = max([len(p[0]) for p in per if p is not None], default=0)
        if nb == 0:
            continue
        k = len(shards)
        idx = np.zeros((nb, k, batch_size), np.int32)
        msk = np.zeros((nb, k, batch_size), np.float32)
        act = np.zeros((nb, k), bool)
        for c, p in enumerate(per):
            if p is None:
                continue
            idx[: len(p[0]), c], msk[: len(p[0]), c] = p
            act[: len(p[0]), c] = True
        out.append((idx, msk, act))
    return out


def _place(tree, mesh, axis: int = 0):
    """Put the shard axis (``axis``) of every leaf on the mesh's first axis."""
    if mesh is None:
        return tree
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(mesh.devices, mesh.axis_names)  # automatic (GSPMD) axes, whatever was passed
    name = mesh.axis_names[0]

    def put(a):
        spec = [None] * np.ndim(a)
        spec[axis] = name
        return jax.device_put(a, NamedSharding(mesh, P(*spec)))

    return jax.tree.map(put, tree)


CHUNK = 16  # steps per compiled scan call; a stage's steps are padded with no-ops to a multiple


def _run_stages(state: SisaState, shards: np.ndarray, start: np.ndarray, x, y):
    """Retrain ``shards`` from stage ``start[i]`` on (0-based); returns the new checkpoints.

    Shards are batched through one compiled step. The batch is padded with dummy slots (never
    active, never written back) to a power of two, and with a mesh to a multiple of the device
    count, so a handful of programs serve every request; a stage's steps are padded with no-op
    steps to a multiple of ``CHUNK`` for the same reason.
    """
    model, cfg, plan = state.model, state.cfg, state.plan
    R = plan.slices
    real = len(shards)
    k = bucket(real)
    if state.mesh is not None:
        ndev = state.mesh.devices.size
        k = max(k, ndev) + (-max(k, ndev)) % ndev
    shards = np.concatenate([shards, np.repeat(shards[:1], k - real)])
    start = np.concatenate([start, np.full(k - real, R)])
    lay = state.layout
    pos = lay.positions(state.data.ids)
    parts = (lay.hashes[pos], key_seed(state.key), lay.shard[pos], lay.slice[pos], state.alive)
    fn = _compiled(model, cfg, state.strategy)
    ckpts = _host(state.ckpts)  # a copy: the input state is never mutated
    r0 = int(start.min())
    work = _place(_take(_at_stage(ckpts, r0), shards), state.mesh)
    e_r = slice_epochs(cfg.epochs, R)
    steps = 0
    for r in range(r0, R):
        if r > r0 and (start == r).any():  # shards whose retraining begins here load ckpt r
            work = _place(_select(start == r, _take(_at_stage(ckpts, r), shards), work),
                          state.mesh)
        sched = _stage_schedule(parts, shards, start <= r, r, e_r[r], cfg.batch_size)
        if sched:
            idx, msk, act = (np.concatenate(a) for a in zip(*sched, strict=True))
            steps += int(act.sum())
            if state.strategy == "vmap":
                pad = (-len(idx)) % CHUNK
                idx, msk, act = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
                                 for a in (idx, msk, act))
                for c in range(0, len(idx), CHUNK):
                    chunk = (_place(a[c: c + CHUNK], state.mesh, axis=1)
                             for a in (idx, msk, act))
                    p, o, _ = fn(*work, x, y, *chunk)
                    work = (p, o)
            else:
                for t in range(len(idx)):
                    p, o, _ = fn(*work, x, y, idx[t], msk[t], act[t])
                    work = (p, o)
        upd = np.nonzero(start[:real] <= r)[0]
        if len(upd):
            ckpts = _write_ckpt(ckpts, r + 1, shards[upd], _take(_host(work), upd))
    return ckpts, steps


def _at_stage(ckpts, r: int):
    return jax.tree.map(lambda a: a[r], ckpts)


def _select(mask: np.ndarray, new, old):
    """Per shard slot: ``new`` where ``mask`` else ``old`` (on the host)."""
    return jax.tree.map(
        lambda f, w: np.where(mask.reshape((-1,) + (1,) * (np.ndim(w) - 1)), f, np.asarray(w)),
        new, old)


def _write_ckpt(ckpts, r: int, shards: np.ndarray, src):
    def put(c, w):
        c[r, shards] = np.asarray(w)
        return c

    return jax.tree.map(put, ckpts, src)


def _data_arrays(state: SisaState):
    x = cast(jnp.asarray(state.data.x), state.cfg.dtype)
    return x, jnp.asarray(state.data.y)


def _cost(state: SisaState, shards, start) -> int:
    """Example-gradients of retraining ``shards`` from ``start`` (the paper's retraining cost)."""
    shard_of, slice_of = state.layout.lookup(state.data.ids)
    e_r = slice_epochs(state.cfg.epochs, state.plan.slices)
    tot = 0
    for s, r0 in zip(np.asarray(shards).tolist(), np.asarray(start).tolist(), strict=True):
        for r in range(r0, state.plan.slices):
            tot += e_r[r] * int(((shard_of == s) & (slice_of <= r) & state.alive).sum())
    return tot


# ----------------------------------------------------------------------------- public API


def train(model: Model, ds: Dataset, cfg: TrainConfig, plan: Plan, key: jax.Array, *,
          weights: np.ndarray | None = None, layout: Layout | None = None,
          strategy: str = "auto", mesh=None) -> SisaState:
    """Train all S shard models through R incremental stages, checkpointing after each.

    ``weights`` (0/1 per example) marks examples absent from the start; ``layout`` reuses an
    earlier plan (e.g. that of the full dataset, to train on D∖U "from scratch"); ``mesh``
    places the shard axis on the first axis of a ``jax.sharding.Mesh``.
    """
    if cfg.solver != "sgd":
        raise ValueError(f"solver={cfg.solver!r}: SISA trains with minibatch SGD; "
                         "pass TrainConfig(solver='sgd').")
    if layout is None:
        layout = make_layout(plan, ds, key)
    alive = np.ones(len(ds), bool) if weights is None else np.asarray(weights) > 0
    if alive.shape != (len(ds),):
        raise ValueError(f"weights must have shape ({len(ds)},), got {alive.shape}.")
    if not alive.any():
        raise ValueError("weights are all zero: nothing to train on.")
    if mesh is not None and plan.shards % mesh.devices.size:
        raise ValueError(f"shards={plan.shards} must be a multiple of the mesh size "
                         f"{mesh.devices.size} to lay the shard axis on the mesh.")
    strategy = resolve_strategy(model, strategy)
    p0, o0 = _init_stack(model, ds, cfg, key, plan.shards)
    R = plan.slices
    ckpts = jax.tree.map(lambda a: np.broadcast_to(a, (R + 1, *a.shape)), (p0, o0))
    st = SisaState(model, cfg, plan, key, ds, layout, alive, ckpts, strategy, mesh)
    x, y = _data_arrays(st)
    shards = np.arange(plan.shards)
    ckpts, _ = _run_stages(st, shards, np.zeros(plan.shards, np.int64), x, y)
    return st._replace(ckpts=ckpts)


def validate_forget(state: SisaState, forget_ids) -> np.ndarray:
    """Positions of ``forget_ids``; unknown, duplicate, empty or already-forgotten ids and
    requests that would leave no data are errors."""
    pos = state.data.positions(forget_ids)
    gone = ~state.alive[pos]
    if gone.any():
        raise ValueError(f"forget_ids {state.data.ids[pos[gone]].tolist()[:20]} were already "
                         "forgotten by an earlier request.")
    if state.alive.sum() == len(pos):
        raise ValueError("forget_ids names every remaining training example: nothing would be "
                         "left; forget a strict subset.")
    return pos


def forget(state: SisaState, forget_ids) -> tuple[SisaState, dict]:
    """Exact unlearning: retrain only the shards holding ``forget_ids``, each from the checkpoint
    before its earliest affected slice, all batched through the same compiled step.

    Stats: shards and slices retrained, ``points_retrained`` (example-gradients recomputed),
    ``full_retrain_points`` (the same for retraining every shard from scratch),
    ``examples_in_retrained_shards`` and wall time.
    """
    t0 = time.perf_counter()
    pos = validate_forget(state, forget_ids)
    alive = state.alive.copy()
    alive[pos] = False
    shard_of, slice_of = state.layout.lookup(state.data.ids[pos])
    shards = np.unique(shard_of)
    start = np.array([slice_of[shard_of == s].min() for s in shards], np.int64)
    new = state._replace(alive=alive)
    x, y = _data_arrays(new)
    ckpts, steps = _run_stages(new, shards, start, x, y)
    jax.block_until_ready(ckpts)
    all_shards = np.arange(state.plan.shards)
    sh_all, _ = state.layout.lookup(state.data.ids)
    stats = {
        "shards_retrained": int(len(shards)),
        "slices_retrained": int(sum(state.plan.slices - r for r in start.tolist())),
        "points_retrained": _cost(new, shards, start),
        "full_retrain_points": _cost(new, all_shards, np.zeros_like(all_shards)),
        "examples_in_retrained_shards": int(np.isin(sh_all, shards)[alive].sum()),
        "steps": steps,
        "time": time.perf_counter() - t0,
    }
    return new._replace(ckpts=ckpts), stats


def shard_logits(state: SisaState, x) -> jax.Array:
    """Logits of every shard model, shape (S, n, K)."""
    x = cast(jnp.asarray(x), state.cfg.dtype)
    return _predict_fn(state.model, state.strategy)(state.params, x)


def aggregate(logits: jax.Array, weights: jax.Array, how: str = "mean_prob") -> jax.Array:
    """Combine shard logits (S, n, K) into ensemble scores (n, K), shards weighted by ``weights``
    (1 for shards with data, 0 for emptied ones).

    ``mean_prob``: log of the mean of the shard softmax probabilities (a log-probability).
    ``vote``: log((votes + p̄)/(S' + 1)) with votes the number of shards whose arg-max is each
    class and p̄ the mean probability, so arg-max is the majority label with ties broken by p̄.
    """
    w = jnp.asarray(weights, logits.dtype)
    wn = w / jnp.maximum(w.sum(), 1e-12)
    probs = jax.nn.softmax(logits, -1)
    pbar = jnp.einsum("s,snk->nk", wn, probs)
    if how == "mean_prob":
        return jnp.log(jnp.maximum(pbar, 1e-30))
    if how == "vote":
        votes = jnp.einsum("s,snk->nk", w,
                           jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1]))
        return jnp.log((votes + pbar) / (w.sum() + 1.0))
    raise ValueError(f"aggregation={how!r}: choose 'mean_prob' or 'vote'.")


def predict(state: SisaState, x, how: str = "mean_prob") -> jax.Array:
    """Ensemble scores (n, K) of the served models; emptied shards are left out."""
    return aggregate(shard_logits(state, x), state.shard_sizes() > 0, how)


def train_loop(model: Model, ds: Dataset, cfg: TrainConfig, plan: Plan, key: jax.Array, *,
               weights: np.ndarray | None = None, layout: Layout | None = None) -> Params:
    """Reference: a Python loop over shards, each trained alone with ``train.py``'s compiled
    single-model step (same data order, no padding). Returns the final params stacked (S, ...).
    Used to check the batched path and as the benchmark's loop baseline."""
    from unlearn.train import _compiled as single_compiled
    from unlearn.train import use_scan

    layout = make_layout(plan, ds, key) if layout is None else layout
    alive = np.ones(len(ds), bool) if weights is None else np.asarray(weights) > 0
    shard_of, slice_of = layout.lookup(ds.ids)
    hashes, seed = stable_hash(ds.ids), key_seed(key)
    comp = single_compiled(model, cfg)
    scan = use_scan(model, "auto")
    x = cast(jnp.asarray(ds.x), cfg.dtype)
    y = jnp.asarray(ds.y)
    w = jnp.ones(len(ds), x.dtype)
    e_r = slice_epochs(cfg.epochs, plan.slices)
    p0, _ = _init_stack(model, ds, cfg, key, plan.shards)
    out = []
    for s in range(plan.shards):
        params = _take(p0, s)
        opt_state = make_optimizer(cfg).init(params)
        for r in range(plan.slices):
            present = np.nonzero((shard_of == s) & (slice_of <= r) & alive)[0]
            if len(present) == 0:
                continue
            for j in range(e_r[r]):
                idx, msk = batch_indices(present, epoch_order(hashes[present], seed, j, s, r),
                                         cfg.batch_size)
                if scan:
                    params, opt_state, _ = comp.epoch(params, opt_state, x, y, w, idx, msk)
                else:
                    for i, m in zip(idx, msk, strict=True):
                        params, opt_state, _ = comp.step(params, opt_state, x[i], y[i],
                                                         w[i] * m)
        out.append(params)
    return _stack(out)


# ----------------------------------------------------------------------------- persistence

CURRENT = "CURRENT"
LEDGER = "ledger.jsonl"
CONFIG = "config.json"


class ModelDirError(RuntimeError):
    """A SISA model directory is missing, corrupt or inconsistent."""


def _crash_point(name: str) -> None:
    """Hook for failure-injection tests (monkeypatched to raise); does nothing otherwise."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_ledger(root: Path, entry: dict) -> None:
    """Append one JSON line atomically: copy the ledger to a temp file, append, fsync, rename."""
    path = root / LEDGER
    old = path.read_text() if path.exists() else ""
    _write_atomic(path, old + json.dumps(entry, sort_keys=True) + "\n")


def read_ledger(root: str | Path) -> list[dict]:
    """The deletion requests recorded in ``root``'s ledger, oldest first."""
    path = Path(root) / LEDGER
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ModelDirError(f"{path} line {n + 1} is not JSON ({e}); the ledger is "
                                "append-only: restore it from a backup.") from e
    return out


def _digest(leaves) -> str:
    h = hashlib.sha256()
    for a in leaves:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _save_version(root: Path, version: int, state: SisaState) -> None:
    import orbax.checkpoint as ocp

    final = root / "versions" / f"v{version:06d}"
    tmp = root / "versions" / f".v{version:06d}.tmp"
    for p in (tmp, final):  # leftovers of an interrupted request are not referenced: replace
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir(parents=True)
    leaves = [np.asarray(a) for a in jax.tree.leaves(state.ckpts)]
    ocp.PyTreeCheckpointer().save((tmp / "ckpt").resolve(),
                                  {f"l{i:04d}": a for i, a in enumerate(leaves)})
    meta = {"version": version, "digest": _digest(leaves),
            "forgotten": state.data.ids[~state.alive].tolist()}
    _write_atomic(tmp / "meta.json", json.dumps(meta))
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _load_ckpts(root: Path, version: int, template):
    import orbax.checkpoint as ocp

    d = root / "versions" / f"v{version:06d}"
    try:
        meta = json.loads((d / "meta.json").read_text())
        raw = ocp.PyTreeCheckpointer().restore((d / "ckpt").resolve())
        leaves = [np.asarray(raw[f"l{i:04d}"]) for i in range(len(raw))]
    except Exception as e:
        raise ModelDirError(f"checkpoint {d} is missing or corrupt ({type(e).__name__}: "
                            f"{str(e)[:200]}); nothing was changed. Restore the directory from a "
                            "backup or retrain with `python -m unlearn.sisa train`.") from e
    if _digest(leaves) != meta["digest"]:
        raise ModelDirError(f"checkpoint {d} is corrupt (checksum mismatch); nothing was "
                            "changed. Restore it from a backup or retrain.")
    treedef = jax.tree.structure(template)
    if treedef.num_leaves != len(leaves):
        raise ModelDirError(f"checkpoint {d} does not match the model in {CONFIG}.")
    return jax.tree.unflatten(treedef, leaves), meta


def _build(cfgd: dict, layout_ids: np.ndarray | None = None):
    """Model, train set, test set, config, plan and key of a model directory's config.

    With ``layout_ids`` the training set is exactly the examples of the trained layout that are
    still on disk (and the test set everything else), so deleting image files later does not
    move other examples between train and test.
    """
    split = data_lib.load(cfgd["data"], seed=cfgd["seed"])
    ds, test = split.train, split.test
    if layout_ids is not None:
        full = Dataset(np.concatenate([ds.x, test.x]), np.concatenate([ds.y, test.y]),
                       np.concatenate([ds.ids, test.ids]), ds.num_classes, ds.name)
        inside = np.isin(full.ids, layout_ids)
        ds, test = full.subset(inside), full.subset(~inside)
    model = models_lib.make(cfgd["model"], ds.num_classes, **cfgd.get("model_kwargs", {}))
    tc = TrainConfig(**cfgd["train"])
    plan = Plan(**cfgd["plan"])
    return model, ds, test, tc, plan, jax.random.key(cfgd["seed"])


def create(root: str | Path, *, data: str, model: str = "mlp", shards: int = 4, slices: int = 2,
           assignment: str = "uniform", overlap: float = 0.0, epochs: int = 20,
           lr: float = 1e-3, batch_size: int = 32, l2: float = 1e-4, seed: int = 0,
           model_kwargs: dict | None = None) -> SisaState:
    """Train a SISA model on dataset ``data`` and save it as version 0 of directory ``root``."""
    root = Path(root)
    if (root / CURRENT).exists():
        raise FileExistsError(f"{root} already holds a SISA model; pick a new directory or "
                              "delete it first.")
    cfgd = {"data": data, "model": model, "model_kwargs": model_kwargs or {}, "seed": seed,
            "plan": dataclasses.asdict(Plan(shards, slices, assignment, overlap)),
            "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "l2": l2}}
    m, ds, _, tc, plan, key = _build(cfgd)
    state = train(m, ds, tc, plan, key)
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / CONFIG, json.dumps(cfgd, indent=1))
    np.savez(root / "layout.npz", ids=state.layout.ids, shard=state.layout.shard,
             slice=state.layout.slice)
    _save_version(root, 0, state)
    _write_atomic(root / CURRENT, "0\n")
    return state


def _recover(root: Path) -> int:
    """The served version, rolling ``CURRENT`` forward if a request was logged but the pointer
    switch was interrupted (the ledger entry is the commit point)."""
    if not (root / CURRENT).exists():
        raise ModelDirError(f"{root} is not a SISA model directory (no {CURRENT}); create one "
                            "with `python -m unlearn.sisa train`.")
    cur = int((root / CURRENT).read_text().strip())
    led = read_ledger(root)
    if led and led[-1]["version"] > cur:
        v = led[-1]["version"]
        if not (root / "versions" / f"v{v:06d}" / "meta.json").exists():
            raise ModelDirError(f"ledger names version {v} but its checkpoint is missing.")
        _write_atomic(root / CURRENT, f"{v}\n")
        cur = v
    return cur


def load(root: str | Path) -> tuple[SisaState, int, Dataset]:
    """Open a model directory: ``(state, version, test set)``."""
    root = Path(root)
    version = _recover(root)
    try:
        cfgd = json.loads((root / CONFIG).read_text())
        lay = np.load(root / "layout.npz")
        ids = lay["ids"].astype(str)
        layout = Layout(ids, lay["shard"], lay["slice"], stable_hash(ids))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{root}: {CONFIG} or layout.npz is missing or corrupt ({e}); "
                            "restore them from a backup.") from e
    model, ds, test, tc, plan, key = _build(cfgd, layout.ids)
    forgotten = {i for e in read_ledger(root) if e["version"] <= version for i in e["ids"]}
    missing = set(layout.ids.tolist()) - set(ds.ids.tolist())
    if missing - forgotten:
        raise ModelDirError(f"examples {sorted(missing - forgotten)[:10]} of the trained model "
                            "are no longer in the dataset but were never forgotten: run "
                            "`forget --ids ...` on the original data first.")
    alive = ~np.isin(ds.ids, list(forgotten))
    template = _init_stack(model, ds.subset(np.arange(1)), tc, key, plan.shards)
    template = jax.tree.map(lambda a: np.broadcast_to(a, (plan.slices + 1, *a.shape)), template)
    ckpts, meta = _load_ckpts(root, version, template)
    present = set(ds.ids.tolist())
    if set(meta["forgotten"]) & present != forgotten & present:
        raise ModelDirError(f"version {version} does not match the ledger; restore from backup.")
    st = SisaState(model, tc, plan, key, ds, layout, alive, ckpts,
                   resolve_strategy(model, "auto"))
    return st, version, test


def resolve_ids(ds: Dataset, names: Sequence[str]) -> list[str]:
    """Map each name to a dataset id: an exact id, or a unique file name (``a.png`` for
    ``class/a.png``); unknown or ambiguous names are an error."""
    base: dict[str, list[str]] = {}
    for i in ds.ids.tolist():
        base.setdefault(os.path.basename(i), []).append(i)
    known = set(ds.ids.tolist())
    out, bad = [], []
    for n in names:
        if n in known:
            out.append(n)
        elif len(base.get(n, [])) == 1:
            out.append(base[n][0])
        else:
            bad.append(n)
    if bad:
        raise KeyError(f"--ids {bad[:10]} are not in the dataset (or name several files); "
                       f"ids look like {ds.ids[:3].tolist()}.")
    return out


def forget_persistent(root: str | Path, names: Sequence[str]) -> dict:
    """Serve one deletion request on a model directory.

    Order: retrain into a new versioned directory; append the ledger entry (the commit point);
    switch ``CURRENT``. A crash before the ledger write leaves the old version served and the
    request repeatable; a crash after it is rolled forward on the next open. Ids forgotten by an
    earlier request are reported and skipped; a request of only such ids is a no-op.
    """
    root = Path(root)
    state, version, _ = load(root)
    ids = resolve_ids(state.data, names)
    pos = state.data.positions(ids, argname="--ids")
    already = [i for i, p in zip(ids, pos, strict=True) if not state.alive[p]]
    todo = [i for i in ids if i not in set(already)]
    if not todo:
        return {"noop": True, "already_forgotten": already, "version": version}
    new, stats = forget(state, todo)
    _save_version(root, version + 1, new)
    _crash_point("after_checkpoint")
    _append_ledger(root, {"version": version + 1, "ids": todo, "time": time.time(),
                          "shards_retrained": stats["shards_retrained"]})
    _crash_point("after_ledger")
    _write_atomic(root / CURRENT, f"{version + 1}\n")
    old = root / "versions" / f"v{version:06d}"
    if version > 0 and old.exists():  # keep v0 (as trained) and the served version
        shutil.rmtree(old)
    return {"noop": False, "already_forgotten": already, "forgotten": todo,
            "version": version + 1, **stats}


def verify(root: str | Path, *, atol: float = 1e-6) -> dict:
    """Retrain the affected shards from scratch without the ledger's ids and compare them with
    the served checkpoints (every stage). ``ok`` when the largest difference is ≤ ``atol``."""
    state, version, _ = load(Path(root))
    gone = state.data.ids[~state.alive]
    if len(gone) == 0:
        return {"ok": True, "version": version, "shards_checked": 0, "max_abs_diff": 0.0}
    shard_of, _ = state.layout.lookup(gone)
    shards = np.unique(shard_of)
    p0, o0 = _init_stack(state.model, state.data, state.cfg, state.key, state.plan.shards)
    fresh = jax.tree.map(lambda a: np.broadcast_to(a, (state.plan.slices + 1, *a.shape)),
                         (p0, o0))
    x, y = _data_arrays(state)
    ref, _ = _run_stages(state._replace(ckpts=fresh), shards, np.zeros_like(shards), x, y)
    diff = max(float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32)[:, shards]
                                     - jnp.asarray(b, jnp.float32)[:, shards])))
               for a, b in zip(jax.tree.leaves(ref[0]), jax.tree.leaves(state.ckpts[0]),
                               strict=True))
    return {"ok": diff <= atol, "version": version, "shards_checked": int(len(shards)),
            "max_abs_diff": diff}


def status(root: str | Path) -> dict:
    """Version served, ledger length, ids forgotten and per-shard sizes."""
    state, version, _ = load(Path(root))
    return {"version": version, "requests": len(read_ledger(root)),
            "forgotten": int((~state.alive).sum()), "shards": state.plan.shards,
            "slices": state.plan.slices, "shard_sizes": state.shard_sizes().tolist()}


def cli(argv: list[str] | None = None) -> int:
    """``python -m unlearn.sisa {train,forget,predict,verify,status} MODEL_DIR ...``"""
    ap = argparse.ArgumentParser(prog="python -m unlearn.sisa",
                                 description="A persistent SISA model (Bourtoule et al. 2021).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a new model directory")
    t.add_argument("dir")
    t.add_argument("--data", required=True, help="digits, mnist1d, folder:PATH, ...")
    t.add_argument("--model", default="mlp", choices=sorted(models_lib.REGISTRY))
    t.add_argument("--shards", type=int, default=4)
    t.add_argument("--slices", type=int, default=2)
    t.add_argument("--assignment", default="uniform", choices=["uniform", "class_balanced"])
    t.add_argument("--overlap", type=float, default=0.0)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("forget", help="forget examples by id (file name for image folders)")
    f.add_argument("dir")
    f.add_argument("--ids", nargs="+", required=True)
    p = sub.add_parser("predict", help="test accuracy of the served ensemble")
    p.add_argument("dir")
    p.add_argument("--how", default="mean_prob", choices=["mean_prob", "vote"])
    for name in ("verify", "status"):
        sub.add_parser(name).add_argument("dir")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "train":
            kw = {"features": (16, 32), "dense": 64} if a.model == "cnn" else {}
            st = create(a.dir, data=a.data, model=a.model, shards=a.shards, slices=a.slices,
                        assignment=a.assignment, overlap=a.overlap, epochs=a.epochs, lr=a.lr,
                        batch_size=a.batch_size, seed=a.seed, model_kwargs=kw)
            out = {"trained": a.dir, "examples": len(st.data),
                   "shard_sizes": st.shard_sizes().tolist()}
        elif a.cmd == "forget":
            out = forget_persistent(a.dir, a.ids)
        elif a.cmd == "predict":
            st, v, test = load(a.dir)
            acc = float(np.mean(np.argmax(np.asarray(predict(st, test.x, a.how)), -1) == test.y))
            out = {"version": v, "test_accuracy": acc, "aggregation": a.how}
        elif a.cmd == "verify":
            out = verify(a.dir)
        else:
            out = status(a.dir)
    except (ModelDirError, KeyError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str))
    return 0 if out.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(cli())
