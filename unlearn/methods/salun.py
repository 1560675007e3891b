"""SalUn: saliency-masked random-label unlearning (Fan et al. 2024, "SalUn: Empowering machine
unlearning via gradient-based weight saliency in image classification and generation", ICLR).

Weight saliency is the magnitude of the forget-loss gradient at the current params,
``s = |∇_θ mean_{i∈U} ℓ_i(θ)|``; the mask keeps the most salient weights,
``m = 1[s ≥ quantile_{1−ratio}(s)]`` over all parameters of the network (Eq. 5–6 of the paper;
``ratio`` = 0.5 is their default hard threshold at the median). Then random-label fine-tuning
(:mod:`unlearn.methods.random_labels`) updates only the masked weights:
``θ ← θ − η m ⊙ ∇[L(θ; D∖U) + (|U|/|D∖U|) mean_{i∈U} ℓ(f_θ(x_i), ỹ_i)]``.
Fan et al. run 10 epochs of RL on CIFAR-10; the default here is a quarter of the training epochs
at the training optimiser and learning rate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import engine
from unlearn.methods.base import Unlearner
from unlearn.methods.loops import loop_unlearner
from unlearn.methods.random_labels import relabel_loss
from unlearn.train import Problem, objective


@functools.partial(jax.jit, static_argnames=("apply",))
def _forget_grad(apply, params, x, y):
    """∇_θ mean_i ℓ_i(θ); ``apply`` is :func:`unlearn.engine.static_apply` (compiled once per
    model configuration, not per closure)."""
    return jax.grad(lambda p: objective(apply, p, x, y, jnp.ones(y.shape), 0.0))(params)


def saliency_mask(problem: Problem, params, forget_rows: np.ndarray, ratio: float):
    """0/1 mask of the ``ratio`` fraction of weights with the largest |∇ forget loss|."""
    x = jnp.asarray(problem.train.x[forget_rows], jax.tree.leaves(params)[0].dtype)
    y = jnp.asarray(problem.train.y[forget_rows])
    g = _forget_grad(engine.static_apply(problem.model), params, x, y)
    mags = jnp.concatenate([jnp.abs(a).ravel() for a in jax.tree.leaves(g)])
    thresh = jnp.quantile(mags, 1.0 - ratio)
    return jax.tree.map(lambda a: (jnp.abs(a) >= thresh).astype(a.dtype), g)


def salun(ratio: float = 0.5, epochs: int | None = None, lr: float | None = None) -> Unlearner:
    """Random-label fine-tuning restricted to the salient weights (see module doc)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio} (fraction of weights updated) must lie in (0, 1].")

    def mask_fn(problem, params, forget_rows, labels):
        return saliency_mask(problem, params, forget_rows, ratio)

    return loop_unlearner("salun", relabel_loss, driver="retain", epochs=epochs, lr=lr,
                          hparams={"ratio": ratio}, relabel=True, mask_fn=mask_fn)
