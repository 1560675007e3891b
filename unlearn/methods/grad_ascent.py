r"""Gradient ascent (GradAscent) and gradient difference (GradDiff) on a language model.

As open-unlearning (OU @ d3d7cf9, ``src/trainer/unlearn/grad_ascent.py``, ``grad_diff.py``;
``/work/shared/llm-unlearning.md`` §5), on token data:

* ``grad_ascent`` (Jang et al. 2023, "Knowledge unlearning for mitigating privacy risks in
  language models"; TOFU's GA baseline, Maini et al. 2024):
  :math:`L = -\mathrm{NLL}(U)`, the negated mean cross-entropy over every labelled token of
  the forget batch (HuggingFace's token-weighted ``outputs.loss``); no retain term.
* ``grad_diff`` (Liu et al. 2022, "Continual learning and private unlearning"; TOFU's
  GradDiff): :math:`L = \gamma\,(-\mathrm{NLL}(U)) + \alpha\,L_{\mathrm{retain}}`, γ = α = 1,
  the retain loss the token-weighted NLL of the retain batch (``retain="nll"``, OU's default)
  or the KL from the model before the request (``retain="kl"``,
  :func:`unlearn.methods.lm_losses.kl_retain`).

Run: epochs over the forget set with retain batches cycled alongside
(:func:`unlearn.methods.lm_losses.lm_unlearner`). OU's 10 epochs at lr 1e-5 (batch 32) are for
7B models fine-tuned at that same rate; the tiny character transformers here are trained with
Adam at ~1e-3, and the default learning rate is ``lr_scale`` = 0.1 × the training rate for 10
epochs. Measured on ``tests/test_lm_methods.py``'s model (Adam at 3e-3; mean answer NLL of the
12 forgotten / 84 retained sequences 0.26 / 0.30 before): at ``lr_scale=1`` GradAscent gives
8.1 / 7.3 and GradDiff 7.1 / 1.1 (worse than a uniform guess, ln 43 = 3.8); at the default 0.1,
1.92 / 0.71 and 1.72 / 0.51.
"""

from __future__ import annotations

from unlearn.methods.base import Unlearner
from unlearn.methods.lm_losses import (
    check_nonnegative,
    check_retain,
    lm_unlearner,
    token_mean_nll,
)


def ascent_term(apply, params, aux, forget):
    """``−NLL(U)``: the negated token-weighted NLL of the forget batch."""
    return -token_mean_nll(apply, params, forget)


def grad_ascent(epochs: int | None = None, lr: float | None = None, lr_scale: float = 0.1,
                checkpoint_every: int | None = None) -> Unlearner:
    """GradAscent: minimise ``−NLL(U)`` (module doc); ``epochs`` over U (default 10), learning
    rate ``lr`` or ``lr_scale`` × the training rate; ``checkpoint_every`` steps →
    ``stats["checkpoints"]``."""
    return lm_unlearner("grad_ascent", ascent_term, None, {"gamma": 1.0}, epochs=epochs,
                        lr=lr, lr_scale=lr_scale, checkpoint_every=checkpoint_every)


def grad_diff(gamma: float = 1.0, alpha: float = 1.0, retain: str = "nll",
              epochs: int | None = None, lr: float | None = None, lr_scale: float = 0.1,
              checkpoint_every: int | None = None) -> Unlearner:
    """GradDiff: ``γ·(−NLL(U)) + α·L_retain`` with ``retain`` ``"nll"`` or ``"kl"`` (module
    doc; OU defaults γ = α = 1, NLL)."""
    check_nonnegative(gamma=gamma, alpha=alpha)
    check_retain(retain)
    return lm_unlearner("grad_diff", ascent_term, retain, {"gamma": gamma, "alpha": alpha},
                        epochs=epochs, lr=lr, lr_scale=lr_scale,
                        checkpoint_every=checkpoint_every)
