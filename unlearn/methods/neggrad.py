"""Gradient ascent on the forget set (NegGrad) and NegGrad+.

* ``neggrad`` — "GA" in Thudi et al. 2022 ("Unrolling SGD") and Jia et al. 2023 ("Model sparsity
  can simplify machine unlearning", NeurIPS): maximise the forget loss,
  ``θ ← θ + η ∇ mean_{i∈U} ℓ_i(θ)``, epochs over U only. Jia et al. run 5 epochs with a
  learning rate tuned in [1e-6, 1e-4], far below the training rate of 0.1 (SGD, CIFAR-10
  ResNet-18); here the default is a quarter of the training epochs at the training optimiser
  and a tenth of the training learning rate, each epoch being the few batches of U (ascent at
  the full training rate destroys the small models within an epoch of a 10 % forget set).
* ``neggrad_plus`` — Kurmanji et al. 2023 ("Towards unbounded machine unlearning", NeurIPS,
  the NegGrad+ baseline): descend ``β · L(θ; D∖U) − (1 − β) · mean_{i∈U} ℓ_i(θ)`` with epochs
  over the retained data and the forget batches cycled alongside. They tune β per setting
  (values near 1, because U is small); the default β = 0.95 and a quarter of the training
  epochs (their runs use a few epochs of fine-tuning, far fewer than training).
"""

from __future__ import annotations

from unlearn.methods.base import Unlearner
from unlearn.methods.loops import loop_unlearner, mean_ce


def _ascent_loss(apply, params, aux, progress, retain, forget):
    return -mean_ce(apply, params, forget)


def _neggrad_plus_loss(apply, params, aux, progress, retain, forget):
    beta = aux["beta"]
    return beta * mean_ce(apply, params, retain, aux["l2"]) - (1 - beta) * mean_ce(
        apply, params, forget)


def neggrad(epochs: int | None = None, lr: float | None = None,
            lr_scale: float = 0.1) -> Unlearner:
    """Gradient ascent on the forget set for ``epochs`` epochs over U (see module doc); the
    learning rate is ``lr`` or, by default, ``lr_scale`` × the training learning rate."""
    return loop_unlearner("neggrad", _ascent_loss, driver="forget", epochs=epochs, lr=lr,
                          hparams={}, lr_scale=lr_scale)


def neggrad_plus(beta: float = 0.95, epochs: int | None = None,
                 lr: float | None = None) -> Unlearner:
    """Descent on D∖U weighted β plus ascent on U weighted 1 − β (Kurmanji et al. 2023)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1].")
    return loop_unlearner("neggrad_plus", _neggrad_plus_loss, driver="retain", epochs=epochs,
                          lr=lr, hparams={"beta": beta})
