"""SISA plan: shards, slices and the fixed layout of every example (Bourtoule et al. 2021).

Plan (:func:`make_layout`). Each example gets a shard and a slice once, from the *original*
dataset, the key and the id hashes, and the layout is stored with the model — forgetting never
moves an example. ``uniform``: ids sorted by a key-seeded hash priority are dealt round-robin to
the shards (sizes differ by at most one). ``class_balanced``: the same, class by class, with the
dealing continued across classes so every shard gets ⌊n_c/S⌋ or ⌈n_c/S⌉ of each class c. Inside
shard s the ids sorted by a second priority are cut into R contiguous windows (slices).

Epochs per stage: :func:`slice_epochs` (rule in the package docstring, :mod:`unlearn.sisa`).
Overlap: see the package docstring.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn.data import Dataset, as_ids, stable_hash
from unlearn.train import epoch_order, key_seed

_SALT_SHARD = 0x5348415244  # "SHARD"
_SALT_SLICE = 0x534C494345  # "SLICE"
_SALT_INIT = 7919



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
        ids = as_ids(ids, "ids")
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


def _check_groups(groups, ds: Dataset, plan: Plan) -> np.ndarray:
    g = np.asarray(groups)
    if g.shape != (len(ds),):
        raise ValueError(f"groups must hold one key per example, shape ({len(ds)},); got "
                         f"{g.shape}.")
    if g.dtype.kind not in "UO" or not all(isinstance(v, str) and v for v in g.tolist()):
        raise ValueError("groups must be non-empty strings (e.g. the person each example is "
                         "about); got " + repr(g[:5].tolist()))
    if plan.assignment != "uniform":
        raise ValueError(f"groups are dealt uniformly to shards; assignment="
                         f"{plan.assignment!r} cannot also balance classes: pass "
                         "assignment='uniform'.")
    if plan.overlap:
        raise ValueError(f"groups with overlap={plan.overlap}: overlapping slices would split "
                         "a group across slices; pass overlap=0.")
    return g.astype(str)


def _grouped_layout(plan: Plan, ds: Dataset, seed: int, h: np.ndarray,
                    groups: np.ndarray) -> Layout:
    """Whole groups dealt round-robin to shards and cut into slices (the group-level analogue
    of ``uniform``): every example of a group shares one shard and one slice, so forgetting a
    group (a person) retrains one shard from one slice."""
    keys, inverse = np.unique(groups, return_inverse=True)
    if plan.shards > len(keys):
        raise ValueError(f"shards={plan.shards} is larger than the number of groups "
                         f"({len(keys)}): use at most one shard per group.")
    gh = stable_hash(keys)
    shard_g = np.zeros(len(keys), np.int64)
    shard_g[epoch_order(gh, seed, 0, _SALT_SHARD)] = np.arange(len(keys)) % plan.shards
    slice_g = np.zeros(len(keys), np.int64)
    R = plan.slices
    for s in range(plan.shards):
        rows = np.nonzero(shard_g == s)[0]
        rows = rows[epoch_order(gh[rows], seed, 0, _SALT_SLICE, s)]
        ends = np.array([round(len(rows) * (r + 1) / R) for r in range(R)])
        slice_g[rows] = np.searchsorted(ends, np.arange(len(rows)), side="right")
    return Layout(np.asarray(ds.ids, str), shard_g[inverse], np.minimum(slice_g, R - 1)[inverse],
                  h)


def make_layout(plan: Plan, ds: Dataset, key: jax.Array, groups=None) -> Layout:
    """Assign every example of ``ds`` to a shard and a slice (seeded by ``key``).

    ``groups`` (optional, one string per example, e.g. the person a question is about): whole
    groups are dealt to shards and slices instead of single examples, so that forgetting
    every example of a group touches one shard (SISA over persons)."""
    n = len(ds)
    if plan.shards > n:
        raise ValueError(f"shards={plan.shards} is larger than the data ({n} examples): "
                         "use at most one shard per example (far fewer in practice).")
    seed = key_seed(key)
    h = stable_hash(ds.ids)
    if groups is not None:
        return _grouped_layout(plan, ds, seed, h, _check_groups(groups, ds, plan))
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



# ----------------------------------------------------------------------------- input checks


def check_config(cfg) -> None:
    """Clear errors for training settings that cannot train: ``epochs``/``batch_size`` must be
    integers ≥ 1, ``lr`` finite and > 0, ``l2`` finite and ≥ 0."""
    import math

    for name, flag in (("epochs", "--epochs"), ("batch_size", "--batch-size")):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r} ({flag}): pass an integer ≥ 1.")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr={cfg.lr!r} (--lr): pass a finite learning rate > 0, e.g. 1e-3.")
    if not (math.isfinite(cfg.l2) and cfg.l2 >= 0):
        raise ValueError(f"l2={cfg.l2!r}: pass a finite weight decay ≥ 0.")


def check_model(model, ds: Dataset, dtype: str = "float32") -> None:
    """The model must give one logit per class of ``ds`` (checked by shape inference only, no
    compilation); fewer outputs than classes would train to a NaN loss."""
    x1 = jax.ShapeDtypeStruct((1, *np.shape(ds.x)[1:]), jnp.dtype(dtype))
    params = jax.eval_shape(model.init, jax.random.key(0), x1)
    out = jax.eval_shape(model.apply, params, x1)
    k = out.shape[-1] if out.ndim else 0
    # one logit per class per example; for token targets one per vocabulary entry per position
    ndim = 3 if getattr(ds, "targets", "classes") == "tokens" else 2
    if out.ndim != ndim or k != ds.num_classes:
        raise ValueError(f"model outputs shape {out.shape[1:]} per example but the data has "
                         f"{ds.num_classes} classes: build the model with num_classes="
                         f"{ds.num_classes} (e.g. models.make(name, {ds.num_classes})).")


def check_finite(ckpts, where: str = "training") -> None:
    """Error if any checkpoint holds NaN/inf (diverged training): nothing is saved."""
    bad = [a for a in jax.tree.leaves(ckpts)
           if np.issubdtype(np.asarray(a).dtype, np.floating) and not np.isfinite(a).all()]
    if bad:
        raise FloatingPointError(f"SISA {where} diverged (NaN/inf parameters); nothing was "
                                 "saved. Lower the learning rate (--lr) or check the data.")
