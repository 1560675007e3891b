"""SISA training, exact forgetting and prediction (Bourtoule et al. 2021), on the engine.

See the package docstring (:mod:`unlearn.sisa`) for incremental training and exactness. The
S shard models are the members of one :mod:`unlearn.engine` ensemble: every stage of every
shard is a call of the engine's jitted epoch with per-shard schedules (a shard with fewer
batches, or not retrained by a request, takes no-op steps). The engine's strategy is chosen
by model and backend (``scan`` — the shards looped inside one program — for dense models,
``fused`` — the im2col form, unrolled — for the plain CNN on CPU, ``loop`` — the shard axis
unrolled inside one jitted step — for other convolutions on CPU, ``vmap`` on GPU); SISA's
historical name ``unroll`` means ``loop``. A ``jax.sharding.Mesh`` lays the shard axis on
devices.

Exactness in float32: the engine's members are independent (no operation spans the member
axis), so a shard's result does not depend on which shards share its program, how many slots
it has or which slot the shard sits in: ``forget`` (the affected shards, padded to a power of
two), a scratch ``train`` (all shards), ``train_loop`` (each shard alone) and the store's
``verify`` (shards regrouped by request) give bit-identical checkpoints.

Checkpoints are ``(variables, opt_state)`` stacked (R+1, S): ``variables`` carries the
parameters and the model state (BatchNorm statistics), so the exactness check covers both.
Randomness (dropout, augmentation) is keyed on the shard's key, the (stage, epoch) tag and the
batch number within the shard's epoch: retraining a shard replays it exactly.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import distributed, engine
from unlearn.data import Dataset, stable_hash
from unlearn.models import Model
from unlearn.sisa.plan import (
    _SALT_INIT,
    Layout,
    Plan,
    check_config,
    check_model,
    make_layout,
    slice_epochs,
)
from unlearn.train import TrainConfig, augmentation, bucket, cast, key_seed

Params = Any


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


def _take(tree: Any, idx) -> Any:
    return jax.tree.map(lambda a: a[idx], tree)


def _host(tree: Any) -> Any:
    """A writable NumPy copy of every leaf (checkpoints live on the host)."""
    return jax.tree.map(np.array, distributed.gather(tree))


def _shard_keys(key, shards: int) -> jax.Array:
    return jnp.stack([jax.random.fold_in(key, _SALT_INIT + s) for s in range(shards)])


def _init_stack(model: Model, ds: Dataset, cfg: TrainConfig, key, shards: int):
    """Initial ``(variables, opt_state)`` of every shard, stacked; shard s is initialised as
    ``train.init_params(model, ds, fold_in(key, 7919 + s))`` (one jitted, vmapped init)."""
    v = engine.init_variables(model, cast(jnp.asarray(ds.x[:1]), cfg.dtype),
                              _shard_keys(key, shards), cfg.dtype)
    return v, engine.init_members(v, cfg.optimizer, cfg.lr).opt_state


def _members(work) -> engine.Members:
    v, o = work
    params, state = engine.split_variables(v)
    return engine.Members(params, o, state)


# ----------------------------------------------------------------------------- schedule

EPOCH_TAG = 1 << 16  # the engine's epoch tag of epoch j of stage r is r·2¹⁶ + j


def _stage_schedule(state_parts, shards: np.ndarray, active_shard: np.ndarray, stage: int,
                    epochs: int, batch_size: int) -> engine.Schedule | None:
    """The engine schedule of every epoch of ``stage`` for the given shards (members), each
    epoch padded to its longest shard; a shard that is not active in this stage, or has no
    data in it, gets only no-op steps. None when no shard has anything to do."""
    hashes, seed, shard_of, slice_of, alive = state_parts
    out = []
    for j in range(epochs):
        per = []
        for s, act in zip(shards.tolist(), active_shard.tolist(), strict=True):
            present = np.nonzero((shard_of == s) & (slice_of <= stage) & alive)[0]
            if not act or len(present) == 0:
                per.append(None)
                continue
            per.append((engine.member_batches(present, hashes[present], seed, j, batch_size,
                                              s, stage),))
        if any(p is not None for p in per):
            out.append(engine.stack_schedules(per, batch_size, epoch=stage * EPOCH_TAG + j))
    return engine.concat_schedules(out) if out else None


CHUNK = 16  # steps per compiled scan call; a stage's steps are padded with no-ops to a multiple


def _run_stages(state: SisaState, shards: np.ndarray, start: np.ndarray, x, y):
    """Retrain ``shards`` from stage ``start[i]`` on (0-based); returns the new checkpoints.

    Shards are the members of one engine call per stage. The member axis is padded with dummy
    slots (never active, never written back) to a power of two, and with a mesh to a multiple
    of the device count, so a handful of programs serve every request; a stage's steps are
    padded with no-op steps to a multiple of ``CHUNK`` for the same reason (``scan``, where
    no-op steps are skipped). Neither padding nor grouping changes a shard's result.
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
    data = engine.Data(x, y, engine.hash32(lay.hashes[pos]))
    keys = _shard_keys(state.key, plan.shards)[shards]
    aux = {"l2": jnp.full((k,), cfg.l2, engine.float_dtype(x, dtype=cfg.dtype))}
    run = dict(keys=keys, aux=aux, optimizer=cfg.optimizer, dtype=cfg.dtype,
               strategy=state.strategy, augment=augmentation(cfg), mesh=state.mesh)
    ckpts = _host(state.ckpts)  # a copy: the input state is never mutated
    r0 = int(start.min())
    work = engine.place(_take(_at_stage(ckpts, r0), shards), state.mesh)
    e_r = slice_epochs(cfg.epochs, R)
    steps = 0
    for r in range(r0, R):
        if r > r0 and (start == r).any():  # shards whose retraining begins here load ckpt r
            work = engine.place(_select(start == r, _take(_at_stage(ckpts, r), shards), work),
                                state.mesh)
        sched = _stage_schedule(parts, shards, start <= r, r, e_r[r], cfg.batch_size)
        if sched is not None:
            steps += int(sched.active.sum())
            mem = _members(work)
            chunk = CHUNK if state.strategy == "scan" else sched.steps
            for c in range(0, sched.steps, chunk):
                mem, _ = engine.run(model, mem, data, sched.steps_slice(c, c + chunk), **run)
            work = (mem.variables(), mem.opt_state)
        upd = np.nonzero(start[:real] <= r)[0]
        if len(upd):
            ckpts = _write_ckpt(ckpts, r + 1, shards[upd], _take(_host(work), upd))
    return ckpts, steps


def _at_stage(ckpts, r: int):
    return jax.tree.map(lambda a: a[r], ckpts)


def _select(mask: np.ndarray, new, old):
    """Per shard slot: ``new`` where ``mask`` else ``old`` (on the host)."""
    return jax.tree.map(
        lambda f, w: np.where(mask.reshape((-1,) + (1,) * (np.ndim(w) - 1)), f,
                              distributed.gather(w)),
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
    check_config(cfg), check_model(model, ds, cfg.dtype)  # clear errors before any compile
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
    strategy = engine.resolve_strategy(model, strategy)
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
    return engine.stacked_apply(state.model, state.params, x, state.strategy)


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
    """Reference: a Python loop over shards, each trained alone as a one-member engine call
    per epoch (same data order, no padding, no other shard in the program). Returns the final
    variables stacked (S, ...). Used to check the batched path and as the benchmark's loop
    baseline."""
    layout = make_layout(plan, ds, key) if layout is None else layout
    alive = np.ones(len(ds), bool) if weights is None else np.asarray(weights) > 0
    shard_of, slice_of = layout.lookup(ds.ids)
    hashes, seed = stable_hash(ds.ids), key_seed(key)
    data = engine.device_data(ds.x, ds.y, hashes, cfg.dtype)
    e_r = slice_epochs(cfg.epochs, plan.slices)
    v0, o0 = _init_stack(model, ds, cfg, key, plan.shards)
    keys = _shard_keys(key, plan.shards)
    out = []
    for s in range(plan.shards):
        mem = _members((_take(v0, slice(s, s + 1)), _take(o0, slice(s, s + 1))))
        for r in range(plan.slices):
            present = np.nonzero((shard_of == s) & (slice_of <= r) & alive)[0]
            if len(present) == 0:
                continue
            for j in range(e_r[r]):
                b = engine.member_batches(present, hashes[present], seed, j, cfg.batch_size,
                                          s, r)
                sched = engine.stack_schedules([(b,)], cfg.batch_size,
                                               epoch=r * EPOCH_TAG + j)
                l2 = jnp.full((1,), cfg.l2, engine.float_dtype(data.x, dtype=cfg.dtype))
                mem, _ = engine.run(model, mem, data, sched, keys=keys[s: s + 1],
                                    aux={"l2": l2},
                                    optimizer=cfg.optimizer, dtype=cfg.dtype,
                                    strategy=cfg.strategy, augment=augmentation(cfg))
        out.append(engine.unstack(mem.variables(), 0))
    return engine.stack(out)
