"""The one training engine: a jitted epoch over a stacked ensemble axis.

Every minibatch trainer of the project is a call of this module — plain training
(:func:`unlearn.train.fit`, S = 1), SISA's shards, the shadow / reference ensembles of the
membership-inference attacks, the loop-based unlearning methods and learning-rate grids. The
state of S ≥ 1 models is stacked on a leading *member* axis:

    Members(params (S, ...), opt_state (S, ...), model_state (S, ...))

(``model_state`` holds non-trainable collections such as BatchNorm statistics; ``{}`` for
stateless models). One step of member s on the weighted minibatches ``b_1..b_k`` of its
schedule is

    (ℓ, new_state), g = value_and_grad(loss)(θ_s; aux_s, progress, b_1, …, b_k)
    θ_s, o_s = optax.update(g ⊙ mask_s, o_s, θ_s)        (mask only where a method sets one)

with ``loss`` by default the project objective (:func:`unlearn.objective.objective`,
``L = Σ w_i ℓ_i / max(Σ w_i, 1) + (λ/2)‖θ‖²``). A member whose schedule is shorter than the
others' gets *no-op* steps: ``jnp.where(active, new, old)`` on params, optimiser state and
model state, so Adam's moments and step count are untouched.

**Schedules.** The order of examples in epoch ``e`` is :func:`epoch_order`: a function of the
seed (from the key), the epoch, optional salts and the **ids present** only (each id gets a
pseudo-random priority from its hash; rows sort by priority), so dropping ids leaves the
relative order of the others unchanged — retraining without U *is* training on D∖U, and
SISA's ``forget(train(D), U) == train(D∖U)`` holds exactly. :func:`batch_indices` cuts the
order into fixed-size batches (zero weights pad the tail); :func:`stack_schedules` pads the
members' batch lists to a common length with inactive steps.

**Hyperparameters on the member axis.** The optimiser is ``optax.inject_hyperparams`` of the
named optax transformation, so the learning rate lives in each member's optimiser state, and
the weight decay λ in each member's ``aux``: a grid of learning rates trains as ONE ensemble
(:func:`train_members` with ``hparams``; :func:`unlearn.train.train_grid`), and a new learning
rate never recompiles.

**Strategies** (measured in ``benchmarks/train_epoch.py``; see docs/architecture.md):

* ``scan``: one jitted program looping over the members, each through a loop over its steps
  (dense models on any backend);
* ``loop``: a Python loop of jitted steps, the member axis unrolled at trace time inside the
  one jitted step (S independent convolutions in one program, each member on its own
  buffers): XLA's CPU backend runs a convolution inside any loop ~20× slower and a
  ``vmap``-ed convolution as a slow grouped convolution (conv nets on CPU);
* ``fused``: ``loop`` with the plain CNN's convolutions written as im2col patches times
  kernels (:func:`unlearn.models.im2col_apply`, convolution-free);
* ``vmap``: the ``loop`` program (the name is kept for conv nets on GPU/TPU; the member axis
  is no longer ``vmap``-ed, see below).

``auto`` picks ``fused`` for the plain CNN on CPU, ``loop`` for other conv models on CPU
(dropout, BatchNorm ResNets), ``vmap`` for conv models elsewhere, ``scan`` otherwise. On a
device mesh every strategy runs the ``scan`` loop body on each device's members.

**Member independence.** No operation spans the member axis, so in every strategy a member's
result is a function of its own data, key and hyperparameters only: bit-identical in float32
whatever the other members are, how many there are and in which slot it sits (see
:func:`_program` for what a ``vmap``-ed member axis did). SISA's forget therefore equals
training on D∖U exactly in float32, and a grid point equals ``fit`` at that point.

**One compile cache** (:func:`_program`), keyed on static configuration only: the model's
hashable identity (:func:`model_key`: its name and linen module, never a fresh closure), the
optimiser name, strategy, dtype, loss function and augmentation. Learning rate, λ, the data
and the schedules are runtime arguments, so a CLI command or an experiment compiles each
program once (``cache_info()`` counts the traces).

**Scale-out.** ``mesh`` (:func:`run`, :func:`train_members`, SISA's ``mesh``) lays the member
axis on the first axis of a device mesh under ``shard_map``: one process's devices, or — after
:func:`unlearn.runtime.initialize` — every device of every process
(:func:`unlearn.distributed.global_mesh`), each process running the same call. Arguments are
made global arrays (every process passes the same host values), each program is compiled
before a barrier (gloo's 30 s collective timeout), and the results are all-gathered so that
host code runs unchanged; member independence makes the result equal to the one-process run
bit for bit (``tests/test_distributed.py``).

**Mixed precision.** ``compute_dtype='bfloat16'`` (or ``float16``) keeps float32 master
weights and optimiser state and runs the forward/backward pass in the low precision
(:func:`check_compute_dtype` states what stays exact).

**Model state and randomness.** For models with state (``model.has_state``) the train-mode
forward is ``apply(variables, x, train=True, rng=r)`` returning ``(logits, new_state)``; the
per-step key ``r = fold_in(fold_in(key_s, epoch), b)`` depends only on the member's key, the
epoch tag and the batch number within the member's epoch, so retraining replays the same
dropout masks. Augmentation
(``augment``) is applied to each batch inside the step from (key, epoch, id hash) only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn import distributed, models
from unlearn.objective import objective

Params = Any

STRATEGIES = ("auto", "scan", "loop", "vmap", "fused")
OPTIMIZERS = ("adam", "sgd", "momentum")


# ----------------------------------------------------------------------------- data order


def _fold_words(words: Sequence[int]) -> int:
    out = 0
    for v in words:
        out = (out * 0x9E3779B97F4A7C15 + int(v)) % (1 << 64)
    return out


def _key_words(keys: jax.Array) -> np.ndarray:
    data = jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) \
        else keys
    return np.asarray(data, dtype=np.uint64)


def key_seed(key: jax.Array) -> int:
    """A Python int derived from a JAX key (typed or raw)."""
    return _fold_words(_key_words(key).reshape(-1).tolist())


def key_seeds(keys: jax.Array) -> list[int]:
    """:func:`key_seed` of every key of a stacked (S,) key array (typed, or raw (S, 2)), read
    from the device in one transfer instead of one per member."""
    return [_fold_words(row) for row in _key_words(keys).reshape(len(keys), -1).tolist()]


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective 64-bit mixing function."""
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


def num_batches(n: int, batch_size: int) -> int:
    """Batches of one member's epoch over ``n`` rows (at least one: an empty member takes a
    no-op step)."""
    return max(1, math.ceil(n / batch_size))


def batch_indices(present: np.ndarray, order: np.ndarray, batch_size: int):
    """(num_batches, batch_size) row indices and weights; the tail batch is padded with
    weight-0 repeats of its own rows.

    Padding rows never weigh in the loss; they repeat the tail batch's rows (not a fixed row
    of the data) so that the padded batch, and with it anything a train-mode forward pass
    computes over the batch (BatchNorm statistics of a model without a ``mask`` argument), is
    a function of the ids present only.
    """
    rows = present[order]
    nb = num_batches(len(rows), batch_size)
    idx = np.zeros(nb * batch_size, dtype=np.int32)
    msk = np.zeros(nb * batch_size, dtype=np.float32)
    idx[: len(rows)] = rows
    msk[: len(rows)] = 1.0
    pad = nb * batch_size - len(rows)
    if pad and len(rows):
        tail = rows[(nb - 1) * batch_size:]
        idx[len(rows):] = tail[np.arange(pad) % len(tail)]
    return idx.reshape(nb, batch_size), msk.reshape(nb, batch_size)


def bucket(k: int) -> int:
    """Next power of two ≥ k: pad a variable-length batch to this many rows (zero weights) so
    a handful of compiled programs serve every size."""
    return 1 << (max(k, 1) - 1).bit_length()


def member_batches(present: np.ndarray, hashes: np.ndarray, seed: int, epoch: int,
                   batch_size: int, *salt: int) -> tuple[np.ndarray, np.ndarray]:
    """The batches of one member in one epoch: rows ``present`` (positions in the data, with
    their id ``hashes``) in :func:`epoch_order`, cut by :func:`batch_indices`."""
    return batch_indices(present, epoch_order(hashes, seed, epoch, *salt), batch_size)


class Schedule(NamedTuple):
    """Per-member step schedule of one engine call, leading axes (S, T).

    ``idx``/``w``: one (S, T, B) int32 row-index array and one (S, T, B) weight array per
    *stream* (plain training has one stream; NegGrad+-style losses a retain and a forget
    stream). ``active`` (S, T): False marks a no-op step. ``progress`` (S, T): the fraction of
    the run done before the step (for decaying schedules). ``epoch``/``batch`` (S, T) int32:
    the step's epoch tag and its batch number within the member's epoch; the step's random key
    is ``fold_in(fold_in(key_s, epoch), batch)`` and augmentation is keyed on (key_s, epoch,
    id), so a step's randomness never depends on how members are batched together.
    """

    idx: tuple[np.ndarray, ...]
    w: tuple[np.ndarray, ...]
    active: np.ndarray
    progress: np.ndarray
    epoch: np.ndarray
    batch: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.active.shape[1])

    def steps_slice(self, start: int, stop: int) -> Schedule:
        """Steps ``start:stop`` of every member (padded with no-op steps past the end)."""
        T = self.steps
        pad = max(0, stop - T)

        def cut(a):
            a = a[:, start:min(stop, T)]
            return np.concatenate([a, np.zeros((a.shape[0], pad, *a.shape[2:]), a.dtype)], 1)

        return Schedule(tuple(cut(i) for i in self.idx), tuple(cut(w) for w in self.w),
                        cut(self.active), cut(self.progress), cut(self.epoch), cut(self.batch))


def concat_schedules(scheds: Sequence[Schedule]) -> Schedule:
    """Steps of several schedules (same members, same streams) one after the other."""
    cat = lambda xs: np.concatenate(xs, axis=1)  # noqa: E731
    return Schedule(tuple(cat(a) for a in zip(*(s.idx for s in scheds))),
                    tuple(cat(a) for a in zip(*(s.w for s in scheds))),
                    cat([s.active for s in scheds]), cat([s.progress for s in scheds]),
                    cat([s.epoch for s in scheds]), cat([s.batch for s in scheds]))


def stack_schedules(parts: Sequence[Sequence[tuple[np.ndarray, np.ndarray]] | None],
                    batch_size: int, progress: np.ndarray | None = None,
                    epoch: int = 0, steps: int | None = None) -> Schedule:
    """Stack per-member batch lists into one :class:`Schedule`, padded with no-op steps.

    ``parts[s]`` is a tuple of ``(idx (T_s, B), w (T_s, B))`` per stream (all streams of a
    member have the same T_s), or None for a member with nothing to do in this call; ``epoch``
    is the epoch tag of every step, batches are numbered 0..T_s−1 per member. ``steps``: the
    number of steps T (default the longest member's T_s; it must be at least that).
    """
    S = len(parts)
    T = max([p[0][0].shape[0] for p in parts if p is not None], default=0)
    if steps is not None:
        if steps < T:
            raise ValueError(f"steps={steps} is below the longest member's {T} batches.")
        T = steps
    k = max([len(p) for p in parts if p is not None], default=1)
    idx = [np.zeros((S, T, batch_size), np.int32) for _ in range(k)]
    w = [np.zeros((S, T, batch_size), np.float32) for _ in range(k)]
    act = np.zeros((S, T), bool)
    for s, p in enumerate(parts):
        if p is None:
            continue
        for j, (i, m) in enumerate(p):
            idx[j][s, : len(i)], w[j][s, : len(m)] = i, m
        act[s, : len(p[0][0])] = True
    prog = np.zeros((S, T), np.float32) if progress is None else np.asarray(progress, np.float32)
    ep = np.full((S, T), epoch, np.int32)
    bt = np.broadcast_to(np.arange(T, dtype=np.int32), (S, T)).copy()
    return Schedule(tuple(idx), tuple(w), act, prog, ep, bt)


# ----------------------------------------------------------------------------- models


def model_key(model) -> Hashable:
    """A hashable identity of a model for the compile cache, never a fresh closure.

    A :class:`unlearn.task.Task` (every package model and every user task) is keyed by its
    :attr:`~unlearn.task.Task.identity`: equal configurations share programs, different
    functions never do, whatever their ``name``. Anything else is keyed by its ``apply``
    function object.
    """
    identity = getattr(model, "identity", None)
    if identity is not None:
        return identity
    return (getattr(model, "name", ""), model.apply)


class _StaticApply:
    """``model.apply`` hashed and compared by :func:`model_key`: pass it as a static argument
    of ``jax.jit`` so equal models share the compiled program."""

    __slots__ = ("apply", "key")

    def __init__(self, model):
        self.apply, self.key = model.apply, model_key(model)

    def __call__(self, *args, **kwargs):
        return self.apply(*args, **kwargs)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _StaticApply) and self.key == other.key


def static_apply(model) -> Callable:
    """``model.apply`` as a hashable static jit argument keyed on :func:`model_key` (a
    task's own ``apply``, which carries its loss, already is one)."""
    if hasattr(model.apply, "derive"):
        return model.apply
    return _StaticApply(model)


def has_state(model) -> bool:
    """Whether the model carries non-trainable state (BatchNorm statistics)."""
    return bool(getattr(model, "has_state", False))


def _takes(apply: Callable, name: str) -> bool:
    """Whether ``apply`` has a keyword parameter ``name``."""
    try:
        return name in inspect.signature(apply).parameters
    except (TypeError, ValueError):
        return False


def split_variables(variables: Params) -> tuple[Params, Params]:
    """(trainable, state): flax ``{"params": …, other collections…}`` → ``{"params": …}`` and
    the other collections (``{}`` when there are none or the pytree is not a flax dict)."""
    if isinstance(variables, Mapping) and "params" in variables and len(variables) > 1:
        return ({"params": variables["params"]},
                {k: v for k, v in variables.items() if k != "params"})
    return variables, {}


def merge_variables(params: Params, state: Params) -> Params:
    """Inverse of :func:`split_variables`."""
    if not state:
        return params
    return {**params, **state}


# ----------------------------------------------------------------------------- optimisers


def make_optimizer(name: str, lr: float = 1e-3) -> optax.GradientTransformation:
    """The optax transformation ``name`` (``adam``, ``sgd``, ``momentum`` = SGD with 0.9) with
    its learning rate injected as state (``optax.inject_hyperparams``), so it can differ per
    member and change without recompiling."""
    if name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=lr)
    if name == "sgd":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
    if name == "momentum":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=0.9)
    raise ValueError(f"optimizer={name!r}: choose one of {OPTIMIZERS}.")


class Members(NamedTuple):
    """Stacked state of S models: trainable params, optimiser state, model state."""

    params: Params
    opt_state: Any
    model_state: Params

    @property
    def size(self) -> int:
        return int(jax.tree.leaves(self.params)[0].shape[0])

    def variables(self) -> Params:
        """Stacked full variables (params merged with model state) for eval-mode apply."""
        return merge_variables(self.params, self.model_state)


def stack(trees: Sequence[Params]) -> Params:
    """Stack pytrees along a new leading (member) axis."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def repeat(tree: Params, n: int) -> Params:
    """``n`` copies of one pytree on a new leading (member) axis: ``stack([tree] * n)`` as one
    broadcast per leaf."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), tree)


def unstack(tree: Params, i: int) -> Params:
    """Member ``i`` of a stacked pytree."""
    return jax.tree.map(lambda a: a[i], tree)


def take(tree: Params, idx) -> Params:
    """Members ``idx`` (an index array) of a stacked pytree, still stacked."""
    return jax.tree.map(lambda a: a[idx], tree)


def cast(tree, dtype: str):
    """Cast the floating leaves of a pytree to ``dtype``."""
    dt = jnp.dtype(dtype)
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs jax.config.update('jax_enable_x64', True).")
    return jax.tree.map(
        lambda a: jnp.asarray(a, dt) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a,
        tree,
    )


# ----------------------------------------------------------------------------- the step


class Batch(NamedTuple):
    """A weighted minibatch: inputs, labels, weights (0 marks padding)."""

    x: jax.Array
    y: jax.Array
    w: jax.Array


def train_loss(apply, params, aux, progress, batch: Batch) -> jax.Array:
    """The training objective on one batch: ``objective(apply, θ, x, y, w, aux["l2"])``."""
    return objective(apply, params, batch.x, batch.y, batch.w, aux["l2"])


@dataclasses.dataclass(frozen=True)
class Program:
    """The static configuration that defines one compiled program (the cache key)."""

    model: Hashable
    optimizer: str
    strategy: str
    dtype: str
    loss: Callable
    augment: Callable | None
    masked: bool
    mesh: Any = None
    compute: str | None = None


_PROGRAMS: dict[Program, Callable] = {}
_TRACES: dict[Program, int] = {}


def cache_info() -> dict[str, int]:
    """Programs built and traces run (each trace is one compilation) since start."""
    return {"programs": len(_PROGRAMS), "traces": sum(_TRACES.values())}


def _member_step(prog: Program, model, opt, carry, aux, gmask, key, x, y, hashes, sched):
    """One optimiser step of one member (pure; run by :func:`_guarded` under its step's
    ``active`` flag, looped or unrolled over the members by the strategy).

    ``sched`` = (idxs, ws, active, progress, epoch, batch) of this member at this step.
    """
    idxs, ws, active, progress, epoch, batch = sched
    params, opt_state, mstate = carry
    rng = jax.random.fold_in(jax.random.fold_in(key, epoch), batch)
    # fused: the plain CNN's im2col apply; it has no dropout and no state, so its eval mode
    # (the only one it takes) is its train mode
    apply = models.im2col_apply(model) if prog.strategy == "fused" else model.apply
    stateful = bool(mstate) or _takes(apply, "train")
    with_mask = stateful and _takes(apply, "mask")
    if prog.compute is not None:  # after the signature checks: the wrapper takes **kwargs
        apply = _mixed(apply, prog.compute, float_dtype(x, aux))
    batches = []
    for i, w in zip(idxs, ws):
        xb = x[i]
        if prog.augment is not None:
            xb = prog.augment(xb, hashes[i], key, epoch)
        batches.append(Batch(xb, y[i], w.astype(float_dtype(x, aux))))

    def f(p):
        states = []

        def fwd(pp, xx):
            if pp is p and stateful:  # the trained member, train mode: update its state
                kw = {}
                if with_mask:  # padding rows (weight 0) stay out of batch statistics
                    kw["mask"] = next((b.w > 0 for b in batches if b.x is xx), None)
                out = apply(merge_variables(pp, mstate), xx, train=True, rng=rng, **kw)
                if isinstance(out, tuple):
                    out, new = out
                    states.append(new)
                return out
            return apply(merge_variables(pp, mstate) if pp is p else pp, xx)

        # fwd carries the task's loss (unlearn.objective.loss_of), like model.apply does
        value = prog.loss(_with_loss(fwd, model), p, aux, progress, *batches)
        return value, (states[-1] if states else mstate)

    (value, new_state), g = jax.value_and_grad(f, has_aux=True)(params)
    if gmask is not None:
        g = jax.tree.map(jnp.multiply, g, gmask)
    updates, new_opt = opt.update(g, opt_state, params)
    return Members(optax.apply_updates(params, updates), new_opt, new_state), value


COMPUTE_DTYPES = ("bfloat16", "float16")


def _mixed(apply: Callable, compute: str, master) -> Callable:
    """Mixed precision (Micikevicius et al. 2018, "Mixed Precision Training"): the forward
    pass — and with it, by the chain rule, the backward pass through it — in ``compute``
    (parameters and floating inputs cast down), the outputs (logits, and new model state such
    as BatchNorm statistics) cast back to the ``master`` dtype, so the loss, its reduction,
    the gradient accumulated into the float32 parameters and the optimiser update stay in
    float32."""

    def mixed(variables, x, *args, **kwargs):
        out = apply(cast(variables, compute), cast(x, compute), *args, **kwargs)
        return cast(out, master)

    return mixed


def _with_loss(fwd: Callable, model) -> Callable:
    task_apply = getattr(model, "apply", None)
    return task_apply.derive(fwd) if hasattr(task_apply, "derive") else fwd


def float_dtype(x, aux=None, dtype=None):
    """The floating dtype of a run: the inputs' when they are floating, else (integer token
    ids) the configured ``dtype`` or that of ``aux["l2"]`` — never an integer type, which
    would silently round the weights, λ and the losses (λ < 1 became 0)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x.dtype
    return jnp.dtype(dtype) if dtype is not None else aux["l2"].dtype


def _guarded(step: Callable, skip: bool) -> Callable:
    """``step`` gated by the step's ``active`` flag: an inactive (no-op) step returns the
    member unchanged (params, optimiser state — Adam's moments and count — and model state)
    with loss 0.

    ``skip``: under ``lax.cond``, so an inactive step costs nothing (the looped form);
    otherwise the step always runs and ``jnp.where(active, new, old)`` keeps or drops it (the
    unrolled form: on CPU a convolution inside a ``cond`` branch ran the ResNet-9 step 2×
    slower). Every step of a program runs through the same construct, so a member's
    arithmetic never depends on whether *other* members have no-op steps (a ``where``
    compiled only into programs with no-op steps changed the update's fusion: 3e-8–5e-8).
    """

    def guarded(carry, aux, gmask, key, x, y, hashes, sched):
        def active(c):
            new, value = step(c, aux, gmask, key, x, y, hashes, sched)
            return new, jnp.asarray(value, float_dtype(x, aux))

        def keep(c):
            return c, jnp.zeros((), float_dtype(x, aux))

        if skip:
            return jax.lax.cond(sched[2], active, keep, carry)
        return jax.tree.map(lambda n, o: jnp.where(sched[2], n, o), active(carry), keep(carry))

    return guarded


def _at(tree, i):
    """Entry ``i`` (traced) of the leading axis of every leaf."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _in_turn(step, counts, carry, aux, gmask, keys, x, y, hashes, sched):
    """The looped form (``scan``; every strategy on a mesh): the members one after the other
    (outer loop), each through its steps (inner loop); stacked arguments, ``sched`` leaves
    (S, T, ...). Both trip counts (``counts`` = members, steps) are run-time values, so XLA
    compiles ONE loop body, the member's step on its own arrays, whatever the number of
    members (a loop of known trip count 1 would be inlined and compiled differently)."""
    n_members, n_steps = counts
    S, T = sched[2].shape[:2]

    def member(s, state):
        allc, losses = state
        a, g, k, sc = _at(aux, s), _at(gmask, s), _at(keys, s), _at(sched, s)

        def one(t, st):
            c, ls = st
            c, v = step(c, a, g, k, x, y, hashes, _at(sc, t))
            return c, jax.lax.dynamic_update_index_in_dim(ls, v, t, 0)

        ls0 = jnp.zeros(T, float_dtype(x, aux))
        c, ls = jax.lax.fori_loop(0, n_steps, one, (_at(allc, s), ls0))
        allc = jax.tree.map(lambda A, v: jax.lax.dynamic_update_index_in_dim(A, v, s, 0),
                            allc, c)
        return allc, jax.lax.dynamic_update_index_in_dim(losses, ls, s, 0)

    return jax.lax.fori_loop(0, n_members, member, (carry, jnp.zeros((S, T), float_dtype(x, aux))))


def _unrolled(step, counts, carry, aux, gmask, keys, x, y, hashes, sched):
    """The unrolled form (``loop``/``fused``/``vmap``): one step of every member, the member
    axis unrolled at trace time (S independent member steps in one program). Every argument
    but the data is a tuple of per-member values (the schedule: this step's arrays, so one
    program serves every number of steps) and so is the result: each member reads and
    writes its own buffers. (Sliced from and restacked into stacked arrays inside the
    program, XLA fused the members' optimiser updates into one loop over the stacked output,
    and a member's result changed with its slot: ~6e-8; ``lax.optimization_barrier`` is
    expanded before fusion on CPU and did not prevent it.)"""
    outs = [step(carry[s], aux[s], None if gmask is None else gmask[s], keys[s], x, y,
                 hashes, sched[s]) for s in range(len(carry))]
    return tuple(o[0] for o in outs), tuple(o[1] for o in outs)


@jax.jit
def _split(tree) -> tuple:
    """A stacked pytree as a tuple of per-member pytrees (one dispatch)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return tuple(unstack(tree, s) for s in range(n))


@jax.jit
def _join(trees: tuple):
    """Inverse of :func:`_split`."""
    return stack(trees)


def _on_mesh(fn: Callable, mesh) -> Callable:
    """``fn`` (the looped form) under ``shard_map`` over the member axis: each device runs
    the same loop body on its own members, so a member's result does not depend on the mesh
    or on the members of other devices."""
    from jax.sharding import PartitionSpec as P

    m, r = P(mesh.axis_names[0]), P()
    return jax.shard_map(fn, mesh=mesh, in_specs=(r, m, m, m, m, r, r, r, m),
                         out_specs=(m, m), check_vma=False)


def _program(prog: Program, model) -> Callable:
    """The jitted program of ``prog`` (built once per static configuration).

    Signature ``(counts, members, aux, grad_mask, keys, x, y, hashes, sched) -> (members,
    losses)``. Looped form (``scan``, and every strategy on a mesh): stacked arguments,
    ``sched`` the arrays of a :class:`Schedule` (S, T, ...), ``counts`` the run-time trip
    counts (members per device, steps). Unrolled form (``loop``/``fused``/``vmap``): one
    step, every argument but the data a tuple of per-member values (:func:`_unrolled`).

    **Member independence.** No operation spans the member axis: XLA picks kernels and
    fusions from the whole program, so a ``vmap``-ed member axis made a member's float32
    result depend on the others (measured on CPU: the weight-gradient matmul of S = 1 runs
    on another kernel than the batched one of S ≥ 2; a sum over a (S, 64, 10) array is
    ordered differently at S = 8; a ``vmap``-ed convolution becomes a grouped convolution
    whose algorithm changes with S). Each member's step is the same computation in every
    program — the one loop body, or an unrolled copy on its own buffers — and is guarded the
    same way (:func:`_guarded`), so member s's parameters are bit-identical whatever the
    other members are, how many there are and in which slot it sits
    (``tests/test_engine.py``).
    """
    if prog in _PROGRAMS:
        return _PROGRAMS[prog]
    looped = _looped(prog)
    step = _guarded(functools.partial(_member_step, prog, model, make_optimizer(prog.optimizer)),
                    skip=looped)
    body = _in_turn if looped else _unrolled

    def run(*args):
        _TRACES[prog] = _TRACES.get(prog, 0) + 1
        return body(step, *args)

    fn = jax.jit(run if prog.mesh is None else _on_mesh(run, prog.mesh))
    _PROGRAMS[prog] = fn
    return fn


def _looped(prog: Program) -> bool:
    """Whether ``prog`` runs the looped form (:func:`_in_turn`) rather than the unrolled one:
    ``scan``, and every strategy on a device mesh (one member program per device;
    convolutions in loops are slow on CPU only, where meshes are virtual)."""
    return prog.strategy == "scan" or prog.mesh is not None


def _fusable(model) -> bool:
    return isinstance(model, models.Model) and models.has_im2col_form(model)


def resolve_strategy(model, strategy: str = "auto") -> str:
    """``scan``, ``loop``, ``vmap`` or ``fused`` (module docstring); ``auto`` picks by model
    and backend; ``unroll`` is SISA's old name for ``loop``. The one place strategies are
    resolved."""
    if strategy == "unroll":
        strategy = "loop"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: choose one of {STRATEGIES}.")
    if strategy == "fused" and not _fusable(model):
        raise ValueError(f"strategy='fused' needs the plain CNN (models.cnn without dropout); "
                         f"got {getattr(model, 'name', model)!r}. Use 'loop' or 'vmap'.")
    if strategy != "auto":
        return strategy
    if getattr(model, "has_conv", False):
        if jax.default_backend() != "cpu":
            return "vmap"
        return "fused" if _fusable(model) else "loop"
    return "scan"


# ----------------------------------------------------------------------------- running


class Data(NamedTuple):
    """Device arrays shared by every member: inputs, labels, id hashes (uint32)."""

    x: jax.Array
    y: jax.Array
    hashes: jax.Array


def hash32(ids_hash: np.ndarray) -> jax.Array:
    """64-bit id hashes folded to 32 bits (:func:`unlearn.augment.hash32`), on the device."""
    from unlearn.augment import hash32 as fold

    return jnp.asarray(fold(np.asarray(ids_hash, np.uint64)))


def device_data(x, y, ids_hash: np.ndarray | None, dtype: str) -> Data:
    """Cast the inputs to ``dtype`` and put the data on the device once per run."""
    h = hash32(np.zeros(len(y), np.uint64) if ids_hash is None else ids_hash)
    return Data(cast(jnp.asarray(x), dtype), jnp.asarray(y), h)


def check_compute_dtype(compute_dtype: str | None, dtype: str) -> None:
    """Validate the mixed-precision option: ``compute_dtype`` None (off), ``bfloat16`` or
    ``float16``, with float32 master weights (``dtype='float32'``).

    What stays exact with it: member independence (a member's result is bit-identical
    whatever the other members; same loop body), hence SISA's ``forget == train on D∖U``
    bit for bit, and run-to-run determinism. What does not: agreement with a float32 run —
    the forward/backward rounds to 8 (bfloat16) or 11 (float16) significant bits, so the
    parameters differ from float32 training by an amount that grows with the steps; no
    loss scaling is applied (float16 gradients may underflow; prefer bfloat16)."""
    if compute_dtype is None:
        return
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: choose None (off) or one of "
                         f"{COMPUTE_DTYPES}.")
    if dtype != "float32":
        raise ValueError(f"compute_dtype={compute_dtype!r} needs float32 master weights; got "
                         f"dtype={dtype!r}: pass dtype='float32'.")


def place(tree, mesh, axis: int = 0):
    """Put axis ``axis`` (the member axis) of every leaf on the first axis of a
    ``jax.sharding.Mesh`` (``NamedSharding``); identity without a mesh. On a mesh over the
    devices of several processes (:func:`unlearn.distributed.global_mesh`) every process
    passes the same values and keeps only its own devices' members
    (:func:`unlearn.distributed.shard_members`)."""
    if mesh is None:
        return tree
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(mesh.devices, mesh.axis_names)  # automatic (GSPMD) axes, whatever was passed
    if distributed.spans_processes(mesh):
        return distributed.shard_members(tree, mesh, axis)
    name = mesh.axis_names[0]

    def put(a):
        spec = [None] * np.ndim(a)
        spec[axis] = name
        return jax.device_put(a, NamedSharding(mesh, P(*spec)))

    return jax.tree.map(put, tree)


def run(model, members: Members, data: Data, sched: Schedule, *, keys: jax.Array,
        aux: dict, optimizer: str, dtype: str, strategy: str = "auto",
        loss: Callable = train_loss, augment: Callable | None = None,
        grad_mask: Params | None = None, mesh=None,
        replicated: bool = True, compute_dtype: str | None = None
        ) -> tuple[Members, jax.Array]:
    """Run the steps of ``sched`` for every member; returns (members, losses (S, T)).

    ``keys`` (S,) are the members' keys (dropout / augmentation randomness), ``aux`` a dict of
    stacked per-member values the loss reads (``l2`` at least), ``grad_mask`` an optional
    stacked 0/1 pytree multiplying the gradients, ``mesh`` lays the member axis of the
    schedule on a device mesh (place ``members`` with :func:`place`). Steps with
    ``active = False`` leave a member unchanged. On a mesh over several processes
    ``replicated=True`` all-gathers the results so that every process holds every member
    (host code such as checkpointing runs unchanged); ``False`` leaves them sharded (the
    next call's input, as in :func:`train_members`). ``compute_dtype`` (``bfloat16``,
    ``float16``): mixed precision (:func:`check_compute_dtype`).
    """
    check_compute_dtype(compute_dtype, dtype)
    if sched.steps == 0:
        return members, jnp.zeros((members.size, 0))
    strategy = resolve_strategy(model, strategy)
    fdt = np.dtype(float_dtype(data.x, dtype=dtype))
    arrays = (tuple(sched.idx), tuple(np.asarray(w, fdt) for w in sched.w), sched.active,
              sched.progress.astype(fdt), sched.epoch, sched.batch)
    if mesh is not None:
        from jax.sharding import Mesh

        mesh = Mesh(mesh.devices, mesh.axis_names)  # automatic axes, as in place()
    prog = Program(model_key(model), optimizer, strategy, dtype, loss, augment,
                   grad_mask is not None, mesh, compute_dtype)
    fn = _program(prog, model)
    S = len(sched.active)
    per_device = S // (1 if mesh is None else mesh.shape[mesh.axis_names[0]])
    counts = (np.int32(per_device), np.int32(sched.steps))
    data_args = (data.x, data.y, data.hashes)
    if distributed.spans_processes(mesh):
        # one program over every process's devices: all arguments global arrays (the same
        # host values on every process), the results all-gathered so that every process
        # holds every member (host code — checkpoints, np.asarray — runs unchanged)
        members, aux, grad_mask, keys = place((members, aux, grad_mask, keys), mesh, 0)
        counts, data_args = distributed.replicate((counts, data_args), mesh)
        out = distributed.call_together(fn, counts, members, aux, grad_mask, keys, *data_args,
                                        place(arrays, mesh, 0))
        return distributed.replicate(out, mesh) if replicated else out
    if _looped(prog):
        return fn(counts, members, aux, grad_mask, keys, *data_args, place(arrays, mesh, 0))
    # unrolled: per-member buffers in and out (see _unrolled), restacked once at the end
    mem, per = _split(members), _split((aux, grad_mask, keys))
    aux_s, gmask_s, keys_s = (tuple(p[j] for p in per) for j in range(3))
    losses = []
    for t in range(sched.steps):
        st = tuple(jax.tree.map(lambda a, s=s, t=t: a[s, t], arrays) for s in range(S))
        mem, loss_t = fn(counts, mem, aux_s, None if grad_mask is None else gmask_s, keys_s,
                         *data_args, st)
        losses.append(jnp.stack(loss_t))
    return _join(mem), jnp.stack(losses, 1)


# ----------------------------------------------------------------------------- predict


def _stacked_apply_impl(apply, unroll: bool, stacked, x):
    if unroll:  # conv nets on CPU: S independent programs, no grouped convolution
        n = jax.tree.leaves(stacked)[0].shape[0]
        return jnp.stack([apply(unstack(stacked, s), x) for s in range(n)])
    return jax.vmap(apply, in_axes=(0, None))(stacked, x)


_stacked_apply_jit = jax.jit(_stacked_apply_impl, static_argnums=(0, 1))


def stacked_apply(model_or_apply, stacked: Params, x: jax.Array, strategy: str = "auto"
                  ) -> jax.Array:
    """(S, n, K) eval-mode logits of every member of stacked variables, in one jitted call.

    Pass the model (its program is cached by :func:`model_key`) or a bare ``apply`` (cached by
    identity). ``strategy`` as in :func:`resolve_strategy`: ``loop`` unrolls the members
    (conv nets on CPU), anything else vmaps.
    """
    if hasattr(model_or_apply, "apply"):
        strategy = resolve_strategy(model_or_apply, strategy)
        unroll = strategy == "loop"
        fn = (models.im2col_apply(model_or_apply) if strategy == "fused"
              else static_apply(model_or_apply))
    else:
        unroll = strategy == "loop"
        fn = model_or_apply
    return _stacked_apply_jit(fn, unroll, stacked, x)


# ----------------------------------------------------------------------------- init


_INIT: dict[Hashable, Callable] = {}


def init_variables(model, x1, keys: jax.Array, dtype: str) -> Params:
    """Stacked initial variables of S members: member s from ``model.init(fold_in(keys[s], 0),
    x1)`` in one jitted, vmapped call (cached per model and dtype)."""
    k = (model_key(model), dtype, jnp.shape(x1), str(jnp.asarray(x1).dtype))
    if k not in _INIT:
        def one(key, x):
            return cast(model.init(jax.random.fold_in(key, 0), x), dtype)

        _INIT[k] = jax.jit(jax.vmap(one, in_axes=(0, None)))
    return _INIT[k](keys, jnp.asarray(x1))


@functools.cache
def _opt_init(optimizer: str) -> Callable:
    return jax.jit(jax.vmap(make_optimizer(optimizer).init))


def init_members(variables: Params, optimizer: str, lr) -> Members:
    """Members from stacked initial variables, optimiser state with per-member ``lr`` (S,)."""
    params, state = split_variables(variables)
    opt_state = _opt_init(optimizer)(params)
    leaf = jax.tree.leaves(params)[0]
    S = leaf.shape[0]
    lr = jnp.broadcast_to(jnp.asarray(lr, leaf.dtype), (S,))
    opt_state.hyperparams["learning_rate"] = lr
    return Members(params, opt_state, state)


@jax.jit
def _finite(tree, losses):
    ok = jnp.all(jnp.isfinite(losses), axis=1)
    for a in jax.tree.leaves(tree):
        ok = ok & jnp.all(jnp.isfinite(a).reshape(a.shape[0], -1), axis=1)
    return ok


def finite_members(members: Members, losses: jax.Array | None = None) -> np.ndarray:
    """(S,) bool: every leaf of params and model state finite (and the losses, if given)."""
    if losses is None or not losses.size:
        losses = jnp.zeros((members.size, 1))
    return np.asarray(_finite((members.params, members.model_state), losses))


def check_finite(members: Members, losses: jax.Array | None = None, what: str = "training",
                 hparams: dict | None = None) -> None:
    """Raise ``FloatingPointError`` naming the members whose params/state/loss diverged."""
    ok = finite_members(members, losses)
    if ok.all():
        return
    bad = np.nonzero(~ok)[0].tolist()
    extra = ""
    if hparams:
        extra = " (" + ", ".join(f"{k}={np.asarray(v)[bad].tolist()}" for k, v in
                                 hparams.items()) + ")"
    raise FloatingPointError(f"{what} diverged: non-finite params or loss for member(s) "
                             f"{bad[:20]}{extra}; lower the learning rate.")


# ----------------------------------------------------------------------------- train


class Trained(NamedTuple):
    """Stacked trained members and what the engine reports."""

    members: Members
    info: dict


def train_members(model, x, y, ids_hash: np.ndarray, keys: Sequence[jax.Array], *,
                  epochs: int, batch_size: int, optimizer: str, lr, l2, dtype: str,
                  strategy: str = "auto", weights: np.ndarray | None = None,
                  seeds: Sequence[int] | None = None, variables: Params | None = None,
                  augment: Callable | None = None, progress: bool = False,
                  desc: str = "train", mesh=None,
                  compute_dtype: str | None = None) -> Trained:
    """Train S = ``len(keys)`` models at once; the engine's one minibatch trainer.

    Member s starts from ``variables[s]`` (stacked) or ``model.init(fold_in(keys[s], 0))``,
    trains on the rows with ``weights[s] > 0`` (default all) in the data order of
    ``seeds[s]`` (default ``key_seed(keys[s])``), at learning rate ``lr[s]`` with weight decay
    ``l2[s]`` (scalars broadcast). Members with fewer batches take no-op steps. Raises
    ``FloatingPointError`` when any member diverges.

    ``mesh``: a ``jax.sharding.Mesh`` whose first axis takes the member axis — one process's
    devices, or every device of every process (:func:`unlearn.distributed.global_mesh`, after
    :func:`unlearn.runtime.initialize`; every process makes the same call). The member axis is
    padded with copies of member 0 to a multiple of the mesh size (dropped again); members are
    independent, so each member's result is the same as without a mesh (bit-identical in
    float32 and float64). On a multi-process mesh the result is replicated on every process.

    ``compute_dtype`` (``bfloat16``/``float16``): mixed precision — float32 master weights and
    optimiser state, the forward/backward pass in ``compute_dtype``
    (:func:`check_compute_dtype` states what stays exact).
    """
    check_compute_dtype(compute_dtype, dtype)
    from tqdm.auto import tqdm

    keys = jnp.stack([jnp.asarray(k) for k in keys]) if not isinstance(keys, jax.Array) \
        else keys
    S, n = keys.shape[0], len(y)
    w = np.ones((S, n), np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (S, n):
        raise ValueError(f"weights must have shape ({S}, {n}), got {w.shape}.")
    if not (w > 0).any(axis=1).all():
        bad = np.nonzero(~(w > 0).any(axis=1))[0].tolist()
        raise ValueError(f"weights are all zero for member(s) {bad[:20]}: nothing to train on.")
    seeds = key_seeds(keys) if seeds is None else list(seeds)
    if len(seeds) != S:
        raise ValueError(f"seeds has {len(seeds)} entries for {S} members; pass one per key.")
    if mesh is not None:
        pad = (-S) % int(np.asarray(mesh.devices).size)
        if pad:  # dummy copies of member 0 fill the last devices; dropped below
            rep = lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)])  # noqa: E731
            out = train_members(
                model, x, y, ids_hash, rep(keys), epochs=epochs, batch_size=batch_size,
                optimizer=optimizer, dtype=dtype, strategy=strategy, augment=augment,
                lr=rep(jnp.broadcast_to(jnp.asarray(lr), (S,))),
                l2=rep(jnp.broadcast_to(jnp.asarray(l2), (S,))),
                weights=np.concatenate([w, np.repeat(w[:1], pad, 0)]),
                seeds=seeds + seeds[:1] * pad,
                variables=None if variables is None else jax.tree.map(rep, variables),
                progress=progress, desc=desc, mesh=mesh, compute_dtype=compute_dtype)
            info = {**out.info, "final_loss": out.info["final_loss"][:S]}
            return Trained(take(out.members, np.arange(S)), info)
    data = device_data(x, y, ids_hash, dtype)
    if variables is None:
        variables = init_variables(model, data.x[:1], keys, dtype)
    variables = cast(variables, dtype)
    members = place(init_members(variables, optimizer, lr), mesh)
    fdt = float_dtype(data.x, dtype=dtype)
    aux = {"l2": jnp.broadcast_to(jnp.asarray(l2, fdt), (S,))}
    present = [np.nonzero(w[s] > 0)[0] for s in range(S)]
    hashes = [np.asarray(ids_hash)[p] for p in present]
    losses = []
    group = {}  # members with the same seed and weights share one data order (grids)
    for s in range(S):
        group.setdefault((seeds[s], w[s].tobytes()), s)
    first = [group[(seeds[s], w[s].tobytes())] for s in range(S)]
    # on a mesh over several processes each process orders and cuts the batches of its own
    # members only (the others' rows of the schedule are never read here); the step count
    # and the no-op mask are the same everywhere, from the members' batch counts
    mine = (distributed.local_members(S, mesh) if distributed.spans_processes(mesh)
            else np.ones(S, bool))
    nb = np.array([num_batches(len(p), batch_size) for p in present])
    for e in tqdm(range(epochs), disable=not progress, desc=desc):
        parts = {s: member_batches(present[s], hashes[s], seeds[s], e, batch_size)
                 for s in {first[s] for s in range(S) if mine[s]}}
        sched = stack_schedules([(parts[first[s]],) if mine[s] else None for s in range(S)],
                                batch_size, epoch=e, steps=int(nb.max()))
        sched = sched._replace(active=np.arange(sched.steps)[None, :] < nb[:, None])
        members, ls = run(model, members, data, sched, keys=keys, aux=aux,
                          optimizer=optimizer, dtype=dtype, strategy=strategy,
                          augment=augment, mesh=mesh, replicated=False,
                          compute_dtype=compute_dtype)
        losses.append(ls)
    last = losses[-1] if losses else None
    if distributed.spans_processes(mesh):  # every process gets every member, once
        members, last = distributed.replicate((members, last), mesh)
    check_finite(members, last, "training",
                 {"lr": np.broadcast_to(np.asarray(lr), (S,))} if np.ndim(lr) else None)
    final = np.full(S, np.nan)
    if last is not None:
        final = (np.asarray(last) * sched.active).sum(1) / np.maximum(sched.active.sum(1), 1)
    info = {"epochs": epochs, "steps": int(epochs * sched.steps) if epochs else 0,
            "final_loss": final}
    return Trained(members, info)
