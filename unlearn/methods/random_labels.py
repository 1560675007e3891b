"""Random labels ("RL"): fine-tune on D∖U together with U relabelled at random.

Golatkar et al. 2020 and Jia et al. 2023 ("Model sparsity can simplify machine unlearning",
NeurIPS, the RL baseline): each forget example gets a uniformly random *other* class and the
model descends ``L(θ; D∖U) + mean_{i∈U} ℓ(f_θ(x_i), ỹ_i)``, epochs over the retained data with
the relabelled forget batches cycled alongside. Jia et al. run 10 epochs (of 182 training
epochs) at a tuned learning rate; here the default is a quarter of the training epochs at the
training optimiser and learning rate.
"""

from __future__ import annotations

from unlearn.methods._loops import loop_unlearner, mean_ce
from unlearn.methods.base import Unlearner


def relabel_loss(apply, params, aux, progress, retain, forget):
    """CE on the retained batch (with weight decay) + CE on the relabelled forget batch."""
    return mean_ce(apply, params, retain, aux["l2"]) + mean_ce(apply, params, forget)


def random_labels(epochs: int | None = None, lr: float | None = None) -> Unlearner:
    """Fine-tune on D∖U ∪ {(x_i, random ỹ_i ≠ y_i) : i ∈ U} (see module doc)."""
    return loop_unlearner("random_labels", relabel_loss, driver="retain", epochs=epochs, lr=lr,
                          hparams={}, relabel=True)
