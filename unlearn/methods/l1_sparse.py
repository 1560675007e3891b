"""l1-sparse unlearning (Jia et al. 2023, "Model sparsity can simplify machine unlearning",
NeurIPS, Eq. 4 "ℓ1-sparse MU").

Fine-tune on the retained data with an ℓ1 penalty whose weight decays linearly to zero:
``min_θ L(θ; D∖U) + γ_t ‖θ‖₁`` with ``γ_t = γ (1 − t/T)`` over the T steps of the run (the
paper's "linearly decaying" schedule; their best γ on CIFAR-10 is 5e-4 over 10 epochs of SGD).
The default here is γ = 5e-4 and a quarter of the training epochs at the training optimiser
and learning rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unlearn.methods.base import Unlearner
from unlearn.methods.loops import loop_unlearner, mean_ce


def _l1_loss(apply, params, aux, progress, retain, forget):
    l1 = sum(jnp.sum(jnp.abs(a)) for a in jax.tree.leaves(params))
    return mean_ce(apply, params, retain, aux["l2"]) + aux["gamma"] * (1.0 - progress) * l1


def l1_sparse(gamma: float = 5e-4, epochs: int | None = None,
              lr: float | None = None) -> Unlearner:
    """Fine-tune on D∖U with a linearly decaying ℓ1 penalty γ_t ‖θ‖₁ (see module doc)."""
    if gamma < 0:
        raise ValueError(f"gamma={gamma} (l1 penalty weight) must be ≥ 0.")
    return loop_unlearner("l1_sparse", _l1_loss, driver="retain", epochs=epochs, lr=lr,
                          hparams={"gamma": gamma})
