"""Flax linen models used functionally: ``init(key, x) -> params``, ``apply(params, x) -> logits``.

Downstream code never sees the module: params are plain pytrees, so ``ravel_pytree``,
``jax.hessian``, ``jax.vmap`` over stacked params and ``jax.sharding`` apply directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any


class Model(NamedTuple):
    """A model as two pure functions plus facts the trainers need.

    ``convex``: the L2-regularised cross-entropy objective is strictly convex in the params
    (softmax regression), so L-BFGS to a gradient tolerance reaches the unique optimum.
    ``has_conv``: contains convolutions (picks the CPU epoch strategy, see ``train.py``).
    """

    init: Callable[[jax.Array, jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    name: str
    convex: bool = False
    has_conv: bool = False


class _Logistic(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class _MLP(nn.Module):
    num_classes: int
    hidden: Sequence[int] = (128,)

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


class _CNN(nn.Module):
    """The seed tutorial's CNN (3 conv layers 32/64/128, dense 512), scaled to the input.

    Conv 3×3 (or width 3 in 1-d) + ReLU + 2× max-pool per layer, while the spatial size allows,
    then dense + ReLU and the output layer. 1-d inputs ``(n, L)`` use 1-d convolutions; 2-d
    images ``(n, H, W[, C])`` use 2-d ones; ``image_shape`` reshapes flat inputs first. Dropout
    of the tutorial is left out so ``apply`` stays deterministic.
    """

    num_classes: int
    features: Sequence[int] = (32, 64, 128)
    dense: int = 512
    image_shape: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x):
        n = x.shape[0]
        if self.image_shape is not None:
            x = x.reshape((n, *self.image_shape))
        if x.ndim == 2:
            x = x[..., None]
        elif x.ndim == 3 and self.image_shape is None:
            x = x[..., None]
        spatial = x.ndim - 2
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3,) * spatial, padding="SAME")(x))
            if min(x.shape[1:-1]) >= 2:
                x = nn.max_pool(x, (2,) * spatial, strides=(2,) * spatial)
        x = x.reshape((n, -1))
        x = nn.relu(nn.Dense(self.dense)(x))
        return nn.Dense(self.num_classes)(x)


def _wrap(module: nn.Module, name: str, **facts) -> Model:
    def init(key: jax.Array, x: jax.Array) -> Params:
        return module.init(key, jnp.asarray(x[:1]))

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return module.apply(params, x)

    return Model(init=init, apply=apply, name=name, **facts)


def logreg(num_classes: int) -> Model:
    """Softmax (multinomial logistic) regression: logits = W x + b."""
    return _wrap(_Logistic(num_classes), "logreg", convex=True)


def mlp(num_classes: int, hidden: Sequence[int] = (128,)) -> Model:
    """A ReLU multilayer perceptron with the given hidden widths."""
    return _wrap(_MLP(num_classes, tuple(hidden)), "mlp")


def cnn(
    num_classes: int,
    features: Sequence[int] = (32, 64, 128),
    dense: int = 512,
    image_shape: tuple[int, ...] | None = None,
) -> Model:
    """The seed material's 3-conv CNN, with widths scaled by ``features`` and ``dense``."""
    return _wrap(_CNN(num_classes, tuple(features), dense, image_shape), "cnn", has_conv=True)


REGISTRY: dict[str, Callable[..., Model]] = {"logreg": logreg, "mlp": mlp, "cnn": cnn}


def make(name: str, num_classes: int, **kwargs) -> Model:
    """Build a model by name (``logreg``, ``mlp``, ``cnn``)."""
    if name not in REGISTRY:
        raise ValueError(f"model={name!r} is unknown; choose one of {sorted(REGISTRY)}.")
    return REGISTRY[name](num_classes, **kwargs)


# ----------------------------------------------------------------------------- binary logistic


class _BinaryLogistic(nn.Module):
    """One linear score ``z = wᵀx + b`` returned as the two logits ``[0, z]``."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        z = nn.Dense(1)(x)
        return jnp.concatenate([jnp.zeros_like(z), z], axis=-1)


def binary_logreg(num_classes: int = 2) -> Model:
    r"""Binary logistic regression: :math:`P(y=1\mid x) = \sigma(z)`, :math:`z = w^\top x + b`.

    The logits are :math:`[0, z]`, so the project's one softmax cross-entropy of them is exactly
    the logistic loss :math:`\log(1 + e^{-\tilde y z})` (:math:`\tilde y = 2y - 1`) and accuracy
    and ``argmax`` work unchanged. Params: a ``(d, 1)`` kernel and a ``(1,)`` bias (p = d + 1);
    ``unlearn.curvature.binary_logistic_hessian`` is its closed-form Hessian. Used by Koh & Liang
    (2017) and Guo et al. (2020) on MNIST class pairs.
    """
    if num_classes != 2:
        raise ValueError(f"binary_logreg needs num_classes=2, got {num_classes}; use "
                         "models.logreg for softmax regression over more classes.")
    return _wrap(_BinaryLogistic(), "binary_logreg", convex=True)


REGISTRY["binary_logreg"] = binary_logreg
