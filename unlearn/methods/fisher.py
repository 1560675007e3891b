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

from unlearn.methods.base import (
    ParamState,
    Unlearner,
    next_weights,
    params_result,
    prepare_params,
)
from unlearn.train import Problem, batch_indices


@functools.cache
def _fisher_chunk(apply):
    def per_example(params, x):
        logp = lambda p: jax.nn.log_softmax(apply(p, x[None])[0])  # noqa: E731
        jac = jax.jacrev(logp)(params)  # (K, *shape) per leaf
        prob = jnp.exp(logp(params))
        return jax.tree.map(lambda j: jnp.tensordot(prob, j**2, axes=1), jac)

    def chunk(params, x, idx, msk):
        f = jax.vmap(per_example, in_axes=(None, 0))(params, x[idx])
        return jax.tree.map(lambda a: jnp.tensordot(msk, a, axes=1), f)

    return jax.jit(chunk)


def diagonal_fisher(problem: Problem, params, rows: np.ndarray) -> object:
    """Diagonal of the true Fisher of ``params`` averaged over the training ``rows``."""
    fn = _fisher_chunk(problem.model.apply)
    x = jnp.asarray(problem.train.x, jax.tree.leaves(params)[0].dtype)
    idx, msk = batch_indices(rows, np.arange(len(rows)), problem.cfg.batch_size)
    total = jax.tree.map(jnp.zeros_like, params)
    for i, m in zip(idx, msk):
        total = jax.tree.map(jnp.add, total, fn(params, x, i, jnp.asarray(m, x.dtype)))
    return jax.tree.map(lambda a: a / len(rows), total)


def fisher(alpha: float = 1e-6, max_var: float = 1e3) -> Unlearner:
    """Add N(0, α·min(F⁻¹, v_max)) noise, F the retained data's diagonal Fisher (module doc)."""
    if alpha < 0 or max_var <= 0:
        raise ValueError(f"alpha={alpha} must be ≥ 0 and max_var={max_var} > 0.")

    def forget(state: ParamState, forget_ids, key):
        pos, w = next_weights(state, forget_ids)
        p = state.problem
        f = diagonal_fisher(p, state.params, np.nonzero(w > 0)[0])
        leaves, tree = jax.tree.flatten(f)
        keys = jax.random.split(key, len(leaves))
        noise = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype)
                                          for k, a in zip(keys, leaves)])
        params = jax.tree.map(
            lambda t, fj, n: t + jnp.sqrt(alpha * jnp.minimum(1.0 / (fj + 1e-8), max_var)) * n,
            state.params, f, noise)
        stats = {"alpha": alpha, "fisher_mean": float(np.mean([float(jnp.mean(a))
                                                                for a in leaves]))}
        return params_result(p, params, stats), state._replace(params=params, weights=w)

    return Unlearner("fisher", prepare_params, forget)
