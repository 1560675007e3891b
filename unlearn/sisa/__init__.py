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
from scratch with the same layout, bit for bit in float32 (max |Δθ| = 0; a test). All shards
advance together in one engine program; a shard whose stage needs fewer batches gets *no-op*
steps that leave params, model state and optimiser state (Adam's moments and step count)
untouched. The engine's members are independent — no operation spans the shard axis — so a
shard's float32 result does not depend on which shards share its program, how many slots it
has or the shard's slot: the groupings of ``forget``, of a scratch ``train`` and of the
store's ``verify`` all agree.

Execution strategies (:mod:`unlearn.engine`). ``scan``: one jitted program looping over the
shards, each through its steps (dense models). ``unroll`` (``loop``): XLA's CPU backend turns
a vmapped convolution into a slow grouped convolution and runs convolutions inside loops ~20×
slower, so for conv nets on CPU the shard axis is unrolled at trace time inside ONE jitted step
(S independent convolutions in one program, each shard on its own buffers) and the steps run
as a Python loop. ``fused``: the plain CNN on CPU in its im2col form, unrolled the same way.
``auto`` picks ``fused`` for the plain CNN on CPU, ``unroll`` for other conv models on CPU and
``scan`` for dense models. A ``jax.sharding.Mesh`` places the stacked shard axis on a mesh
axis so shards train in parallel on devices (each device loops over its own shards).

Persistent model: ``python -m unlearn.sisa train|forget|predict|verify|status`` over a model
directory (one orbax checkpoint per shard and stage, an append-only JSON-lines deletion ledger,
an OS writer lock and a purge of everything trained on forgotten data);
see :mod:`unlearn.sisa.store` and :func:`cli`. Launched in several processes with
``$UNLEARN_COORDINATOR``, ``$UNLEARN_NUM_PROCESSES`` and ``$UNLEARN_PROCESS_ID`` (one
``jax.distributed`` program), the shards train on every device of every process and process 0
alone writes the directory (the store's "Several processes").

Layout of the package: :mod:`~unlearn.sisa.plan` (plan, layout, epochs per slice),
:mod:`~unlearn.sisa.train` (the compiled stages, ``train``, ``forget``, ``predict``),
:mod:`~unlearn.sisa.store` (the persistent model directory) and :mod:`~unlearn.sisa.cli`
(``python -m unlearn.sisa``).
"""

from unlearn.sisa.cli import cli
from unlearn.sisa.plan import (
    Layout,
    Plan,
    check_config,
    check_finite,
    check_model,
    make_layout,
    slice_epochs,
)
from unlearn.sisa.store import (
    CONFIG,
    LEDGER,
    ModelDirError,
    create,
    forget_persistent,
    load,
    open_dir,
    read_ledger,
    resolve_ids,
    status,
    verify,
)
from unlearn.sisa.train import (
    SisaState,
    aggregate,
    forget,
    predict,
    shard_logits,
    train,
    train_loop,
    validate_forget,
)

__all__ = [
    "CONFIG", "LEDGER", "Layout", "ModelDirError", "Plan", "SisaState", "aggregate",
    "check_config", "check_finite", "check_model", "cli", "create", "forget",
    "forget_persistent", "load", "make_layout", "open_dir", "predict", "read_ledger",
    "resolve_ids", "shard_logits", "slice_epochs", "status", "train",
    "train_loop", "validate_forget", "verify",
]
