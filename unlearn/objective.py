"""The training objective, the per-example losses and the influence measurements, written once.

    L(θ; D, w) = Σ_i w_i ℓ(f_θ(x_i), y_i) / max(Σ_i w_i, 1) + (λ/2) ‖θ‖²

with ℓ the task's per-example loss (:class:`Loss`; softmax cross-entropy unless the task says
otherwise) and ``w`` a per-example weight/mask: "D without U" is the same compiled function
with ``w = 0`` on U, so retraining is exactly the training code path. Every module (training,
curvature, certified removal, methods) calls :func:`objective` with this one argument order:
``(apply, params, x, y, w, l2)``.

**Which loss.** An eval-mode ``apply`` built from a :class:`unlearn.task.Task` (``task.apply``,
``models.frozen_apply(task, state)``) carries the task's :class:`Loss` and :class:`Measure`
(:func:`loss_of`, :func:`measure_of`), so every layer that receives ``apply`` computes the
task's loss. A bare function of ``(params, x)`` is a classifier with the cross-entropy.

A :class:`Loss` knows its per-example value and, for the Gauss–Newton matrix and K-FAC, its
Hessian with respect to the model outputs (``output_hvp``, ``output_root`` with
``C Cᵀ = ∇²_z ℓ``); a user loss gets both by autodiff (exact, slower).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Params = Any
Array = jax.Array


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy ``logsumexp(z) − z_y`` for integer labels ``y``.

    Computed in at least float32 (float64 stays float64).
    """
    logits = logits.astype(jnp.result_type(logits, jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def squared_error(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example ``½‖f(x) − y‖²`` summed over every trailing axis (``y`` the shape of
    ``outputs``; a 1-output model may take ``y`` of shape ``(n,)``)."""
    outputs = outputs.astype(jnp.result_type(outputs, jnp.float32))
    y = jnp.asarray(y, outputs.dtype).reshape(outputs.shape)
    r = (outputs - y).reshape(outputs.shape[0], -1)
    return 0.5 * jnp.sum(r * r, axis=1)


def sequence_cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sequence mean token cross-entropy for logits ``(n, T, V)`` and targets ``(n, T)``;
    a negative target marks padding (the token is not counted: PyTorch's ``ignore_index``
    convention with any negative value). A sequence of padding only has loss 0."""
    mask = (y >= 0)
    tok = cross_entropy(logits, jnp.where(mask, y, 0))
    mask = mask.astype(tok.dtype)
    return jnp.sum(tok * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def _ce_output_hvp(logits, y, v):
    p = jax.nn.softmax(logits.astype(v.dtype), axis=-1)
    return p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)


def _ce_output_root(logits, y, dtype):
    p = jax.nn.softmax(logits.astype(dtype), axis=-1)
    sp = jnp.sqrt(p)
    return jax.vmap(jnp.diag)(sp) - p[:, :, None] * sp[:, None, :]


def _token_weights(y, dtype):
    """``m_t / max(Σ_t m_t, 1)`` per token (``m_t = 1[y_t ≥ 0]``): each token's weight in the
    per-sequence mean of :func:`sequence_cross_entropy`, shape ``(n, T)``."""
    mask = (y >= 0).astype(dtype)
    return mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)


def _seq_ce_output_hvp(logits, y, v):
    r"""``(∇²_z ℓ_i) v_i`` for :func:`sequence_cross_entropy`: the output Hessian is
    block-diagonal over tokens, :math:`H_t = (m_t/c)(\operatorname{diag}p_t - p_tp_t^\top)`
    with :math:`c = \max(\sum_t m_t, 1)`, applied token by token."""
    p = jax.nn.softmax(logits.astype(v.dtype), axis=-1)
    hv = p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)
    return hv * _token_weights(y, v.dtype)[..., None]


def sequence_output_root(logits: Array, y: Array, dtype) -> Array:
    r"""Per-token roots of the output Hessian of :func:`sequence_cross_entropy`, shape
    ``(n, T, V, V)``: :math:`C_t = \sqrt{m_t/c}\,(\operatorname{diag}\sqrt{p_t} -
    p_t\sqrt{p_t}^\top)`, so :math:`C_tC_t^\top = (m_t/c)(\operatorname{diag}p_t -
    p_tp_t^\top) = H_t` (:math:`m_t = 1[y_t \ge 0]`, :math:`c = \max(\sum_t m_t, 1)`).

    The Hessian of the per-sequence mean token cross-entropy in the logits ``(T, V)`` is
    block-diagonal over tokens (each token's loss depends on its own logits only), so these
    ``T`` blocks are the whole of it; its flat ``(T·V, T·V)`` root would be mostly zeros.
    Used by :mod:`unlearn.kfac` for token models (Grosse et al. 2023, §3). The blocks depend
    on the targets through the padding mask, so ``y`` is required.
    """
    p = jax.nn.softmax(logits.astype(dtype), axis=-1)
    sp = jnp.sqrt(p)
    eye = jnp.eye(p.shape[-1], dtype=dtype)
    r = sp[..., None, :] * eye - p[..., :, None] * sp[..., None, :]
    return r * jnp.sqrt(_token_weights(y, dtype))[..., None, None]


def _se_output_hvp(outputs, y, v):
    return v


def _se_output_root(outputs, y, dtype):
    k = outputs.reshape(outputs.shape[0], -1).shape[1]
    return jnp.broadcast_to(jnp.eye(k, dtype=dtype), (outputs.shape[0], k, k))


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-example loss ``fn(outputs, y) -> (n,)`` and its curvature in the outputs.

    ``output_hvp(outputs, y, v)``: ``(∇²_z ℓ_i) v_i`` per example (same shape as ``outputs``);
    ``output_root(outputs, y, dtype)``: ``(n, K, K)`` with ``C_i C_iᵀ = ∇²_z ℓ_i`` for flat
    outputs of width K. Both default to autodiff of ``fn`` (exact; the root by an eigen-
    decomposition, clipped at 0 — the Gauss–Newton matrix keeps only the PSD part of a
    non-convex output loss). ``classes``: the targets are integer class labels (accuracy,
    random relabelling, the softmax-based methods apply). Hashable by ``name`` and ``fn``:
    equal losses share compiled programs, different functions never do.
    """

    name: str
    fn: Callable[[Array, Array], Array]
    classes: bool = False
    hvp: Callable | None = dataclasses.field(default=None, compare=False)
    root: Callable | None = dataclasses.field(default=None, compare=False)

    def __call__(self, outputs: Array, y: Array) -> Array:
        return self.fn(outputs, y)

    def output_hvp(self, outputs: Array, y: Array, v: Array) -> Array:
        if self.hvp is not None:
            return self.hvp(outputs, y, v)
        g = lambda z: jax.grad(lambda zz: jnp.sum(self.fn(zz, y)))(z)  # noqa: E731
        return jax.jvp(g, (outputs.astype(v.dtype),), (v,))[1]

    def output_root(self, outputs: Array, y: Array, dtype) -> Array:
        if self.root is not None:
            return self.root(outputs, y, dtype)
        n = outputs.shape[0]
        flat = outputs.reshape(n, -1).astype(dtype)

        def one(z, yi):
            h = jax.hessian(lambda zz: self.fn(zz.reshape((1,) + outputs.shape[1:]),
                                               yi[None])[0])(z)
            e, q = jnp.linalg.eigh(0.5 * (h + h.T))
            return q * jnp.sqrt(jnp.maximum(e, 0.0))[None, :]

        return jax.vmap(one)(flat, y)


CROSS_ENTROPY = Loss("cross_entropy", cross_entropy, classes=True, hvp=_ce_output_hvp,
                     root=_ce_output_root)
SQUARED_ERROR = Loss("squared_error", squared_error, hvp=_se_output_hvp, root=_se_output_root)
# No flat ``root``: the sequence loss's output Hessian depends on the targets (the padding
# mask); its per-token blocks are :func:`sequence_output_root`.
SEQUENCE_CROSS_ENTROPY = Loss("sequence_cross_entropy", sequence_cross_entropy,
                              hvp=_seq_ce_output_hvp)
LOSSES = {loss.name: loss for loss in (CROSS_ENTROPY, SQUARED_ERROR, SEQUENCE_CROSS_ENTROPY)}


def as_loss(loss: str | Loss | Callable) -> Loss:
    """A :class:`Loss` from a name in :data:`LOSSES`, a :class:`Loss`, or a user function
    ``fn(outputs, y) -> (n,)`` (its curvature then comes from autodiff)."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is unknown; choose one of {sorted(LOSSES)}, or pass "
                             "a function fn(outputs, y) -> per-example losses (n,).")
        return LOSSES[loss]
    if callable(loss):
        return Loss(getattr(loss, "__name__", "user_loss"), loss)
    raise TypeError(f"loss must be a name, a Loss or a function fn(outputs, y); got {loss!r}.")


def margin(logits: Array, y: Array) -> Array:
    """Per-example margin ``z_y − max_{k≠y} z_k`` (the measurement of Ilyas et al. 2022 and
    TRAK): positive when the example is classified correctly."""
    logits = logits.astype(jnp.result_type(logits, jnp.float32))
    picked = jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return picked - jnp.max(others, axis=-1)


@dataclasses.dataclass(frozen=True)
class Measure:
    """What influence explains for a test example: ``fn(outputs, y) -> (n,)``, or ``None``
    for the task's own loss (the default: Koh & Liang's ``I_up,loss``)."""

    name: str
    fn: Callable[[Array, Array], Array] | None = None


LOSS_MEASURE = Measure("loss")
MEASURES = {"loss": LOSS_MEASURE, "margin": Measure("margin", margin)}


def as_measure(measure: str | Measure | Callable) -> Measure:
    """A :class:`Measure` from ``"loss"``, ``"margin"``, a :class:`Measure` or a function
    ``fn(outputs, y) -> (n,)``."""
    if isinstance(measure, Measure):
        return measure
    if isinstance(measure, str):
        if measure not in MEASURES:
            raise ValueError(f"measure={measure!r} is unknown; choose one of {sorted(MEASURES)} "
                             "or pass a function fn(outputs, y) -> (n,).")
        return MEASURES[measure]
    if callable(measure):
        return Measure(getattr(measure, "__name__", "user_measure"), measure)
    raise TypeError(f"measure must be a name, a Measure or a function; got {measure!r}.")


def loss_of(apply: Callable) -> Loss:
    """The :class:`Loss` an eval-mode ``apply`` carries (``Task``-built), else cross-entropy."""
    return getattr(apply, "loss", None) or CROSS_ENTROPY


def measure_of(apply: Callable) -> Callable[[Array, Array], Array]:
    """The measurement function of ``apply``'s task (its loss when none is declared)."""
    m = getattr(apply, "measure", None) or LOSS_MEASURE
    return m.fn if m.fn is not None else loss_of(apply).fn


def example_losses(apply: Callable, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """ℓ(f_θ(x_i), y_i) for every row (eval-mode ``apply``, the loss it carries)."""
    return loss_of(apply)(apply(params, x), y)


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
