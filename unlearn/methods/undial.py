r"""UNDIAL: unlearning by self-distillation with adjusted logits (Dong et al. 2024, "UNDIAL:
self-distillation with adjusted logits for robust unlearning in large language models").

As open-unlearning (OU @ d3d7cf9, ``undial.py``, ``compute_undial_loss``;
``/work/shared/llm-unlearning.md`` §5): the student (the params being unlearned) is distilled
towards the frozen model before the request with the forget token's logit lowered by β,
:math:`q_t = \operatorname{softmax}(z_{\mathrm{ref},t} - \beta\,\mathrm{onehot}(y_t))`, by the
soft-label cross-entropy :math:`-\sum_v q_t(v)\log p_\theta(v\mid x, y_{<t})`
(:func:`unlearn.methods.lm_losses.undial_loss`); β = 10, γ = 1, α = 0 (no retain term; with
α > 0 the retain term is ``retain``: ``"nll"`` or ``"kl"``).

Deviation from OU, documented (``llm-unlearning.md`` §8): OU averages over every position of
the batch without a label mask (prompt and padding included, and a ``-100`` label selects
vocabulary id ``V − 100``); here the mean is over the labelled (answer) tokens only.

Run: OU trains UNDIAL at lr 1e-4, 10× its other methods' 1e-5, for 10 epochs; here 10 epochs
over the forget set at ``lr_scale`` = 0.1 × the tiny transformer's training rate, as the other
LM methods: OU's 10× ratio (``lr_scale=1``, Adam at 3e-3) was measured to wreck the model (the
mean answer NLL of forget and retain sequences both 0.24–0.31 → 2.4; at 0.1: forget 1.50,
retain 1.03; 96 char-corpus QA, width 32, depth 2, 10 forgotten).
"""

from __future__ import annotations

from unlearn.methods.base import Unlearner
from unlearn.methods.lm_losses import (
    check_nonnegative,
    check_positive,
    check_retain,
    lm_unlearner,
    undial_loss,
)


def undial_term(apply, params, aux, forget):
    """UNDIAL's forget loss with ``aux["beta"]`` and ``aux["teacher"]`` as the reference."""
    return undial_loss(apply, params, aux["teacher"], forget, aux["beta"])


def undial(beta: float = 10.0, gamma: float = 1.0, alpha: float = 0.0, retain: str = "nll",
           epochs: int | None = None, lr: float | None = None, lr_scale: float = 0.1,
           checkpoint_every: int | None = None) -> Unlearner:
    """UNDIAL (module doc; OU defaults β = 10, γ = 1, α = 0)."""
    check_positive(beta=beta)
    check_nonnegative(gamma=gamma, alpha=alpha)
    check_retain(retain)
    return lm_unlearner("undial", undial_term, retain if alpha > 0 else None,
                        {"beta": beta, "gamma": gamma, "alpha": alpha}, epochs=epochs, lr=lr,
                        lr_scale=lr_scale, checkpoint_every=checkpoint_every)
