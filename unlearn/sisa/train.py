"""SISA training, exact forgetting and prediction (Bourtoule et al. 2021).

See the package docstring (:mod:`unlearn.sisa`) for incremental training, exactness and the
execution strategies (``vmap`` / ``unroll``, device mesh).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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

