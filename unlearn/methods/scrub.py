"""SCRUB (Kurmanji et al. 2023, "Towards unbounded machine unlearning", NeurIPS, Alg. 1).

A student initialised at the current params θ⁰ (the teacher, frozen) alternates

* **max steps** (the first ``msteps`` epochs), over the forget set: move *away* from the
  teacher, minimising ``−KL_T(teacher ‖ student)`` on U;
* **min steps** (every epoch), over the retained data: stay close to the teacher and fit the
  labels, minimising ``α · KL_T(teacher ‖ student) + γ · CE(student)`` on D∖U (plus the training
  weight decay),

where ``KL_T`` is the mean over examples of ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (the
distillation loss of their code). Defaults follow the paper's released CIFAR-10 configuration:
α = 0.001, γ = 0.99, T = 4, with max steps in the first epochs only; the number of epochs is
a quarter of the training epochs here (their runs use a handful of epochs) and ``msteps``
defaults to half of them (rounded up). Both phases share one optimiser state, as in their
code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unlearn.methods.base import Unlearner
from unlearn.methods.loops import Batch, Phase, loop_unlearner, mean_ce


def distill_kl(apply, params, teacher, b: Batch, temperature) -> jax.Array:
    """Weighted mean of T² KL(softmax(z_t/T) ‖ softmax(z_s/T)); the teacher is not trained."""
    zt = jax.lax.stop_gradient(apply(teacher, b.x)) / temperature
    zs = apply(params, b.x) / temperature
    lt, ls = jax.nn.log_softmax(zt), jax.nn.log_softmax(zs)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    return temperature**2 * jnp.sum(b.w * kl) / jnp.maximum(jnp.sum(b.w), 1e-12)


def _max_loss(apply, params, aux, progress, retain, forget):
    return -distill_kl(apply, params, aux["teacher"], forget, aux["temperature"])


def _min_loss(apply, params, aux, progress, retain, forget):
    kl = distill_kl(apply, params, aux["teacher"], retain, aux["temperature"])
    return aux["alpha"] * kl + aux["gamma"] * mean_ce(apply, params, retain, aux["l2"])


def scrub(alpha: float = 1e-3, gamma: float = 0.99, temperature: float = 4.0,
          epochs: int | None = None, msteps: int | None = None,
          lr: float | None = None) -> Unlearner:
    """SCRUB's alternating max (forget) / min (retain) teacher–student steps (see module doc)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")

    def plan(n_ep: int) -> list[Phase]:
        m = msteps if msteps is not None else (n_ep + 1) // 2
        out = []
        for e in range(n_ep):
            if e < m:
                out.append(Phase(_max_loss, "forget", range(e, e + 1)))
            out.append(Phase(_min_loss, "retain", range(e, e + 1)))
        return out

    return loop_unlearner("scrub", None, driver="retain", epochs=epochs, lr=lr,
                          hparams={"alpha": alpha, "gamma": gamma, "temperature": temperature},
                          plan=plan, classes_only=True)
