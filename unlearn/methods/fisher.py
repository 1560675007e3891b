"""Fisher forgetting (Golatkar et al. 2020, "Eternal sunshine of the spotless net: selective
forgetting in deep networks", CVPR, Sec. 4 "Fisher forgetting").

Noise shaped by the diagonal Fisher information of the *retained* data is added to the
weights, so directions the retained data pin down move little and the rest (where the forget
set's information can hide) are scrambled:

    F_j = (1/|D∖U|) Σ_{i∈D∖U} Σ_k p_θ(k|x_i) (∂_j log p_θ(k|x_i))²      (true Fisher, diagonal)
    θ'_j = θ_j + sqrt(α · min(1/(F_j + 1e-8), v_max)) · n_j,   n ~ N(0, I)

i.e. noise covariance α F⁻¹, the form of the authors' released code (their ``alpha``, with the
variance capped at ``v_max`` = 1e3 before scaling; the paper derives the same F⁻¹-shaped
optimal noise from a quadratic approximation of the loss). The default α = 1e-6 is the code's
order of magnitude and fits the small models here (std ≤ 0.03 per weight); the code's
class-forgetting special cases (zeroing the forgotten class's output row) are left out.
The Fisher is accumulated in chunks of ``batch_size`` examples with per-example, per-class
gradients by ``vmap`` inside one jitted function per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import engine
from unlearn.methods.base import (
    ParamState,
    Unlearner,
    next_weights,
    params_result,
    prepare_classifier,
)
from unlearn.train import Problem, batch_indices


@functools.partial(jax.jit, static_argnames=("apply",))
def _fisher_chunk(apply, params, state, x, idx, msk):
    """Σ_i msk_i Σ_k p(k|x_i) (∂ log p(k|x_i))² over the rows ``idx`` for the trainable
    ``params`` (model ``state`` frozen, eval mode); ``apply`` is
    :func:`unlearn.engine.static_apply` (one program per model configuration)."""
    def per_example(params, x):
        logp = lambda p: jax.nn.log_softmax(  # noqa: E731
            apply(engine.merge_variables(p, state), x[None])[0])
        jac = jax.jacrev(logp)(params)  # (K, *shape) per leaf
        prob = jnp.exp(logp(params))
        return jax.tree.map(lambda j: jnp.tensordot(prob, j**2, axes=1), jac)

    f = jax.vmap(per_example, in_axes=(None, 0))(params, x[idx])
    return jax.tree.map(lambda a: jnp.tensordot(msk, a, axes=1), f)


def diagonal_fisher(problem: Problem, params, rows: np.ndarray, state=None) -> object:
    """Diagonal of the true Fisher of the trainable ``params`` averaged over the training
    ``rows`` (model ``state``, e.g. BatchNorm statistics, frozen)."""
    apply = engine.static_apply(problem.model)
    state = {} if state is None else state
    x = jnp.asarray(problem.train.x, jax.tree.leaves(params)[0].dtype)
    idx, msk = batch_indices(rows, np.arange(len(rows)), problem.cfg.batch_size)
    total = jax.tree.map(jnp.zeros_like, params)
    for i, m in zip(idx, msk):
        part = _fisher_chunk(apply, params, state, x, i, jnp.asarray(m, x.dtype))
        total = jax.tree.map(jnp.add, total, part)
    return jax.tree.map(lambda a: a / len(rows), total)


def fisher(alpha: float = 1e-6, max_var: float = 1e3) -> Unlearner:
    """Add N(0, α·min(F⁻¹, v_max)) noise, F the retained data's diagonal Fisher (module doc)."""
    if alpha < 0 or max_var <= 0:
        raise ValueError(f"alpha={alpha} must be ≥ 0 and max_var={max_var} > 0.")

    def forget(state: ParamState, forget_ids, key):
        pos, w = next_weights(state, forget_ids)
        p = state.problem
        trainable, mstate = engine.split_variables(state.params)
        f = diagonal_fisher(p, trainable, np.nonzero(w > 0)[0], mstate)
        leaves, tree = jax.tree.flatten(f)
        keys = jax.random.split(key, len(leaves))
        noise = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype)
                                          for k, a in zip(keys, leaves)])
        params = jax.tree.map(
            lambda t, fj, n: t + jnp.sqrt(alpha * jnp.minimum(1.0 / (fj + 1e-8), max_var)) * n,
            trainable, f, noise)
        params = engine.merge_variables(params, mstate)
        stats = {"alpha": alpha, "fisher_mean": float(np.mean([float(jnp.mean(a))
                                                                for a in leaves]))}
        return params_result(p, params, stats), state._replace(params=params, weights=w)

    return Unlearner("fisher", prepare_classifier("fisher"), forget)
