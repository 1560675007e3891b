"""A user's own model factory and data loaders, importable as ``tests.byo_factory`` from the
repository root: ``python -m unlearn.sisa train DIR --model tests.byo_factory:tiny_mlp``.

Written the way a user would, against the public contract only: a flax linen module wrapped
as an :class:`unlearn.models.Model` (``init``, ``apply`` in eval and train mode, ``name``)."""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from unlearn import data as data_lib
from unlearn.models import Model


class _TinyMLP(nn.Module):
    hidden: int
    outputs: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.outputs)(nn.tanh(nn.Dense(self.hidden)(x)))


def tiny_mlp(hidden: int = 8, outputs: int = 3) -> Model:
    """A one-hidden-layer tanh MLP with ``outputs`` logits."""
    module = _TinyMLP(hidden, outputs)

    def init(key, x):
        return dict(module.init(key, x[:1]))

    def apply(variables, x, *, train=False, rng=None):
        out = module.apply(variables, x)
        return (out, {}) if train else out

    return Model(init=init, apply=apply, name="byo_tiny_mlp",
                 spec=("byo_tiny_mlp", (("hidden", hidden), ("outputs", outputs))))


def not_a_model(**kwargs):
    """Returns something that is not a Model."""
    return {"init": None, "apply": None, **kwargs}


def broken(**kwargs):
    """A factory that fails when called."""
    raise RuntimeError("the weights file is missing")


NOT_CALLABLE = 3


def arrays(n: int = 36, d: int = 5, classes: int = 3, seed: int = 0):
    """Separable Gaussian blobs: ``(x float32 (n, d), y int (n,), ids str (n,))``."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    means = rng.normal(size=(classes, d)) * 3
    x = (means[y] + rng.normal(size=(n, d))).astype(np.float32)
    ids = np.array([f"user-{i:03d}" for i in range(n)])
    return x, y, ids


def loader_split() -> data_lib.Split:
    """A loader returning its own train/test Split."""
    x, y, ids = arrays()
    ds = data_lib.make(x, y, ids=ids, num_classes=3, name="byo")
    return data_lib.split(ds, test_fraction=0.25, seed=1)


def loader_dataset() -> data_lib.Dataset:
    """A loader returning one Dataset (the store splits it)."""
    x, y, ids = arrays()
    return data_lib.make(x, y, ids=ids, num_classes=3, name="byo")
