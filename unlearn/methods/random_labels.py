"""Random labels ("RL"): fine-tune on D∖U together with U relabelled at random.

Golatkar et al. 2020 and Jia et al. 2023 ("Model sparsity can simplify machine unlearning",
NeurIPS, the RL baseline): each forget example gets a uniformly random *other* class and the
model is fine-tuned on the union D∖U ∪ Ũ. Each step pairs a retained batch with a cycled
relabelled forget batch and descends ``L(θ; D∖U) + (|U|/|D∖U|) · mean_{i∈U} ℓ(f_θ(x_i), ỹ_i)``,
whose expectation is the union's mean loss up to the factor |D|/|D∖U| (every example, retained
or relabelled, weighs the same, as in a pass over the union). Jia et al. run 10 epochs (of 182
training epochs) at a tuned learning rate; here the default is a quarter of the training epochs
at the training optimiser and learning rate.
"""

from __future__ import annotations

from unlearn.methods.base import Unlearner
from unlearn.methods.loops import loop_unlearner, mean_ce


def relabel_loss(apply, params, aux, progress, retain, forget):
    """CE on the retained batch (with weight decay) + |U|/|D∖U| · CE on the relabelled batch."""
    return mean_ce(apply, params, retain, aux["l2"]) + aux["forget_ratio"] * mean_ce(
        apply, params, forget)


def random_labels(epochs: int | None = None, lr: float | None = None) -> Unlearner:
    """Fine-tune on D∖U ∪ {(x_i, random ỹ_i ≠ y_i) : i ∈ U} (see module doc)."""
    return loop_unlearner("random_labels", relabel_loss, driver="retain", epochs=epochs, lr=lr,
                          hparams={}, relabel=True)
