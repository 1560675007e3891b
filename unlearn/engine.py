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

* ``scan``: one jitted ``lax.scan`` over the steps of an epoch of the ``vmap``-ed member step
  (dense models on any backend);
* ``loop``: a Python loop of jitted steps, the member axis unrolled at trace time inside the
  one jitted step (S independent convolutions in one program): XLA's CPU backend runs a
  convolution inside any loop ~20× slower and a ``vmap``-ed convolution as a slow grouped
  convolution (conv nets on CPU);
* ``vmap``: a Python loop of jitted ``vmap``-ed steps (conv nets on GPU/TPU);
* ``fused``: ``vmap`` with the plain CNN's convolutions written as im2col patches times
  kernels (:func:`unlearn.models.frozen_apply`'s convolution-free form), so ``vmap`` turns
  each layer into ONE batched matmul over the member axis instead of a grouped convolution
  (the plain CNN on CPU: 1.2–1.3× ``loop`` in ``benchmarks/cnn_strategies.py``).

``auto`` picks ``fused`` for the plain CNN on CPU, ``loop`` for other conv models on CPU
(dropout, BatchNorm ResNets), ``vmap`` for conv models elsewhere, ``scan`` otherwise.

**One compile cache** (:func:`_program`), keyed on static configuration only: the model's
hashable identity (:func:`model_key`: its name and linen module, never a fresh closure), the
optimiser name, strategy, dtype, loss function and augmentation. Learning rate, λ, the data
and the schedules are runtime arguments, so a CLI command or an experiment compiles each
program once (``cache_info()`` counts the traces).

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

from unlearn import models
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


def batch_indices(present: np.ndarray, order: np.ndarray, batch_size: int):
    """(num_batches, batch_size) row indices and weights; the tail batch is padded with
    weight-0 repeats of its own rows.

    Padding rows never weigh in the loss; they repeat the tail batch's rows (not a fixed row
    of the data) so that the padded batch, and with it anything a train-mode forward pass
    computes over the batch (BatchNorm statistics of a model without a ``mask`` argument), is
    a function of the ids present only.
    """
    rows = present[order]
    nb = max(1, math.ceil(len(rows) / batch_size))
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
                    epoch: int = 0) -> Schedule:
    """Stack per-member batch lists into one :class:`Schedule`, padded with no-op steps.

    ``parts[s]`` is a tuple of ``(idx (T_s, B), w (T_s, B))`` per stream (all streams of a
    member have the same T_s), or None for a member with nothing to do in this call; ``epoch``
    is the epoch tag of every step, batches are numbered 0..T_s−1 per member.
    """
    S = len(parts)
    T = max([p[0][0].shape[0] for p in parts if p is not None], default=0)
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
    padded: bool
    shared: bool = False


_PROGRAMS: dict[Program, Callable] = {}
_TRACES: dict[Program, int] = {}


def cache_info() -> dict[str, int]:
    """Programs built and traces run (each trace is one compilation) since start."""
    return {"programs": len(_PROGRAMS), "traces": sum(_TRACES.values())}


def _member_step(prog: Program, model, opt, carry, aux, gmask, key, x, y, hashes, sched):
    """One optimiser step of one member (pure; vmapped, scanned or unrolled by the strategy).

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
    batches = []
    for i, w in zip(idxs, ws):
        xb = x[i]
        if prog.augment is not None:
            xb = prog.augment(xb, hashes[i], key, epoch)
        batches.append(Batch(xb, y[i], w.astype(x.dtype)))

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
    new = Members(optax.apply_updates(params, updates), new_opt, new_state)
    if prog.padded:
        new = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, Members(*carry))
    return new, value


def _with_loss(fwd: Callable, model) -> Callable:
    task_apply = getattr(model, "apply", None)
    return task_apply.derive(fwd) if hasattr(task_apply, "derive") else fwd


def _program(prog: Program, model) -> Callable:
    """The jitted program of ``prog`` (built once per static configuration).

    Signature ``(members, aux, grad_mask, keys, x, y, hashes, sched) -> (members, losses)``
    with ``sched`` the arrays of a :class:`Schedule` (steps first for ``scan``; one step for
    ``loop``/``vmap``; without the member axis when ``prog.shared``).
    """
    if prog in _PROGRAMS:
        return _PROGRAMS[prog]
    opt = make_optimizer(prog.optimizer)

    def step(carry, aux, gmask, key, x, y, hashes, sched):
        return _member_step(prog, model, opt, carry, aux, gmask, key, x, y, hashes, sched)

    # member axis: carry, aux, gmask, key and (unless every member has the same schedule,
    # e.g. a hyperparameter grid) the schedule; shared by all members: the data
    vstep = jax.vmap(step, in_axes=(0, 0, 0, 0, None, None, None, None if prog.shared else 0))
    pick = (lambda a, s: a) if prog.shared else (lambda a, s: a[s])

    def count():
        _TRACES[prog] = _TRACES.get(prog, 0) + 1

    if prog.strategy == "scan":
        def run(carry, aux, gmask, keys, x, y, hashes, sched):
            count()
            return jax.lax.scan(lambda c, st: vstep(c, aux, gmask, keys, x, y, hashes, st),
                                carry, sched)

    elif prog.strategy in ("vmap", "fused"):
        def run(carry, aux, gmask, keys, x, y, hashes, sched):
            count()
            return vstep(carry, aux, gmask, keys, x, y, hashes, sched)

    else:  # loop: members unrolled at trace time, S independent programs in one jit
        def run(carry, aux, gmask, keys, x, y, hashes, sched):
            count()
            outs = [step(unstack(carry, s), unstack(aux, s),
                         None if gmask is None else unstack(gmask, s), keys[s], x, y, hashes,
                         jax.tree.map(lambda a, s=s: pick(a, s), sched))
                    for s in range(keys.shape[0])]
            return stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])

    fn = jax.jit(run)
    _PROGRAMS[prog] = fn
    return fn


def _fusable(model) -> bool:
    return isinstance(model, models.Model) and models.has_im2col_form(model)


def resolve_strategy(model, strategy: str = "auto") -> str:
    """``scan``, ``loop``, ``vmap`` or ``fused`` (module docstring); ``auto`` picks by model
    and backend."""
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


def place(tree, mesh, axis: int = 0):
    """Put axis ``axis`` (the member axis) of every leaf on the first axis of a
    ``jax.sharding.Mesh`` (``NamedSharding``); identity without a mesh."""
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


def run(model, members: Members, data: Data, sched: Schedule, *, keys: jax.Array,
        aux: dict, optimizer: str, dtype: str, strategy: str = "auto",
        loss: Callable = train_loss, augment: Callable | None = None,
        grad_mask: Params | None = None, mesh=None) -> tuple[Members, jax.Array]:
    """Run the steps of ``sched`` for every member; returns (members, losses (S, T)).

    ``keys`` (S,) are the members' keys (dropout / augmentation randomness), ``aux`` a dict of
    stacked per-member values the loss reads (``l2`` at least), ``grad_mask`` an optional
    stacked 0/1 pytree multiplying the gradients, ``mesh`` lays the member axis of the
    schedule on a device mesh (place ``members`` with :func:`place`). Steps with
    ``active = False`` leave a member unchanged.
    """
    if sched.steps == 0:
        return members, jnp.zeros((members.size, 0))
    strategy = resolve_strategy(model, strategy)
    padded = not bool(sched.active.all())
    fdt = np.dtype(data.x.dtype)
    arrays = (tuple(sched.idx), tuple(np.asarray(w, fdt) for w in sched.w), sched.active,
              sched.progress.astype(fdt), sched.epoch, sched.batch)
    leaves = jax.tree.leaves(arrays)
    shared = mesh is None and len(sched.active) > 1 and all(
        (a[1:] == a[:1]).all() for a in leaves)
    prog = Program(model_key(model), optimizer, strategy, dtype, loss, augment,
                   grad_mask is not None, padded, shared)
    fn = _program(prog, model)
    if shared:  # one schedule for every member: drop the member axis
        arrays = jax.tree.map(lambda a: a[0], arrays)
    args = (members, aux, grad_mask, keys, data.x, data.y, data.hashes)
    if strategy == "scan":
        if not shared:  # (S, T, ...) -> (T, S, ...): steps first for the scan
            arrays = place(jax.tree.map(lambda a: np.swapaxes(a, 0, 1), arrays), mesh, 1)
        members, losses = fn(*args, arrays)
        return members, losses.T
    tax = 0 if shared else 1
    losses = []
    for t in range(sched.steps):
        st = jax.tree.map(lambda a, t=t: np.take(a, t, axis=tax), arrays)
        members, loss_t = fn(members, *args[1:], place(st, mesh, 0) if not shared else st)
        losses.append(loss_t)
    return members, jnp.stack(losses, 1)


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


def set_learning_rate(members: Members, lr) -> Members:
    """Members with their learning rates replaced (scalar or (S,))."""
    hp = dict(members.opt_state.hyperparams)
    old = hp["learning_rate"]
    hp["learning_rate"] = jnp.broadcast_to(jnp.asarray(lr, old.dtype), old.shape)
    return members._replace(opt_state=members.opt_state._replace(hyperparams=hp))


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
                  desc: str = "train") -> Trained:
    """Train S = ``len(keys)`` models at once; the engine's one minibatch trainer.

    Member s starts from ``variables[s]`` (stacked) or ``model.init(fold_in(keys[s], 0))``,
    trains on the rows with ``weights[s] > 0`` (default all) in the data order of
    ``seeds[s]`` (default ``key_seed(keys[s])``), at learning rate ``lr[s]`` with weight decay
    ``l2[s]`` (scalars broadcast). Members with fewer batches take no-op steps. Raises
    ``FloatingPointError`` when any member diverges.
    """
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
    data = device_data(x, y, ids_hash, dtype)
    if variables is None:
        variables = init_variables(model, data.x[:1], keys, dtype)
    variables = cast(variables, dtype)
    members = init_members(variables, optimizer, lr)
    fdt = data.x.dtype
    aux = {"l2": jnp.broadcast_to(jnp.asarray(l2, fdt), (S,))}
    seeds = key_seeds(keys) if seeds is None else list(seeds)
    present = [np.nonzero(w[s] > 0)[0] for s in range(S)]
    hashes = [np.asarray(ids_hash)[p] for p in present]
    losses = []
    group = {}  # members with the same seed and weights share one data order (grids)
    for s in range(S):
        group.setdefault((seeds[s], w[s].tobytes()), s)
    first = [group[(seeds[s], w[s].tobytes())] for s in range(S)]
    for e in tqdm(range(epochs), disable=not progress, desc=desc):
        parts = {s: member_batches(present[s], hashes[s], seeds[s], e, batch_size)
                 for s in set(first)}
        sched = stack_schedules([(parts[first[s]],) for s in range(S)], batch_size, epoch=e)
        members, ls = run(model, members, data, sched, keys=keys, aux=aux,
                          optimizer=optimizer, dtype=dtype, strategy=strategy,
                          augment=augment)
        losses.append(ls)
    last = losses[-1] if losses else None
    check_finite(members, last, "training",
                 {"lr": np.broadcast_to(np.asarray(lr), (S,))} if np.ndim(lr) else None)
    final = np.full(S, np.nan)
    if last is not None:
        final = (np.asarray(last) * sched.active).sum(1) / np.maximum(sched.active.sum(1), 1)
    info = {"epochs": epochs, "steps": int(epochs * sched.steps) if epochs else 0,
            "final_loss": final}
    return Trained(members, info)
