"""The training objective and its cross-entropy, written once.

    L(θ; D, w) = Σ_i w_i ℓ(f_θ(x_i), y_i) / max(Σ_i w_i, 1) + (λ/2) ‖θ‖²

with ℓ the softmax cross-entropy ``logsumexp(z) − z_y`` and ``w`` a per-example weight/mask:
"D without U" is the same compiled function with ``w = 0`` on U, so retraining is exactly the
training code path. Every module (training, curvature, certified removal, methods) calls
:func:`objective` with this one argument order: ``(apply, params, x, y, w, l2)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Params = Any


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy ``logsumexp(z) − z_y`` for integer labels ``y``.

    Computed in at least float32 (float64 stays float64).
    """
    logits = logits.astype(jnp.result_type(logits, jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def example_losses(apply: Callable, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """ℓ(f_θ(x_i), y_i) for every row (eval-mode ``apply``)."""
    return cross_entropy(apply(params, x), y)


def l2_norm_sq(params: Params) -> jax.Array:
    """‖θ‖² over every leaf (biases included)."""
    return sum(jnp.vdot(p, p) for p in jax.tree.leaves(params))


def normaliser(w: jax.Array) -> jax.Array:
    """``max(Σ w, 1)``: the denominator of the weighted mean (never divides by zero)."""
    return jnp.maximum(jnp.sum(w), 1.0)


def objective(apply: Callable, params: Params, x, y, w, l2) -> jax.Array:
    """L(θ) = Σ w_i ℓ_i / max(Σ w_i, 1) + (l2/2)‖θ‖² (an all-zero mask gives the penalty only)."""
    w = jnp.asarray(w)
    losses = example_losses(apply, params, x, y)
    return jnp.sum(w * losses) / normaliser(w) + 0.5 * l2 * l2_norm_sq(params)
