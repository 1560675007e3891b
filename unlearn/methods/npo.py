r"""Negative preference optimisation (NPO) and its reference-free variant SimNPO.

As open-unlearning (OU @ d3d7cf9, ``npo.py``, ``simnpo.py``, ``compute_dpo_loss``;
``/work/shared/llm-unlearning.md`` §5), both with OU's GradDiff structure
:math:`\gamma L_f + \alpha L_{\mathrm{retain}}` (retain ``"nll"`` by default, or ``"kl"``):

* ``npo`` (Zhang et al. 2024, "Negative preference optimization: from catastrophic collapse
  to effective unlearning"): per forget sequence
  :math:`L_f = -\frac{2}{\beta}\log\sigma\bigl(-\beta[\log\pi_\theta(y|x) -
  \log\pi_{\mathrm{ref}}(y|x)]\bigr)` with summed log-likelihoods,
  :math:`\pi_{\mathrm{ref}}` the model before the request; β = 0.1, γ = α = 1.
* ``simnpo`` (Fan et al. 2024, "Simplicity prevails: rethinking negative preference
  optimization for LLM unlearning"): :math:`L_f = -\frac{2}{\beta}\log\sigma\bigl(\beta(
  \mathrm{NLL}(y|x)/|y| - \delta)\bigr)`, length-normalised, no reference model; β = 4.5,
  δ = 0, γ = 0.125, α = 1.

Run: epochs over the forget set with retain batches cycled alongside (OU's 10 epochs at lr
1e-5 are for 7B models); here 10 epochs at ``lr_scale`` × the training learning rate of the
tiny transformer (module doc of :mod:`unlearn.methods.grad_ascent`; measured in
``tests/test_lm_methods.py``).
"""

from __future__ import annotations

from unlearn.methods.base import Unlearner
from unlearn.methods.lm_losses import (
    check_nonnegative,
    check_positive,
    check_retain,
    lm_unlearner,
    npo_loss,
    simnpo_loss,
)


def npo_term(apply, params, aux, forget):
    """NPO's forget loss with ``aux["beta"]`` and ``aux["teacher"]`` as π_ref."""
    return npo_loss(apply, params, aux["teacher"], forget, aux["beta"])


def simnpo_term(apply, params, aux, forget):
    """SimNPO's forget loss with ``aux["beta"]``, ``aux["delta"]``."""
    return simnpo_loss(apply, params, forget, aux["beta"], aux["delta"])


def npo(beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0, retain: str = "nll",
        epochs: int | None = None, lr: float | None = None, lr_scale: float = 0.1,
        checkpoint_every: int | None = None) -> Unlearner:
    """NPO (module doc; OU defaults β = 0.1, γ = α = 1, retain NLL)."""
    check_positive(beta=beta)
    check_nonnegative(gamma=gamma, alpha=alpha)
    check_retain(retain)
    return lm_unlearner("npo", npo_term, retain,
                        {"beta": beta, "gamma": gamma, "alpha": alpha}, epochs=epochs, lr=lr,
                        lr_scale=lr_scale, checkpoint_every=checkpoint_every)


def simnpo(beta: float = 4.5, delta: float = 0.0, gamma: float = 0.125, alpha: float = 1.0,
           retain: str = "nll", epochs: int | None = None, lr: float | None = None,
           lr_scale: float = 0.1, checkpoint_every: int | None = None) -> Unlearner:
    """SimNPO (module doc; OU defaults β = 4.5, δ = 0, γ = 0.125, α = 1, retain NLL)."""
    check_positive(beta=beta)
    check_nonnegative(gamma=gamma, alpha=alpha)
    check_retain(retain)
    if isinstance(delta, bool) or not isinstance(delta, int | float):
        raise ValueError(f"delta={delta!r} must be a number (the margin on the mean NLL).")
    return lm_unlearner("simnpo", simnpo_term, retain,
                        {"beta": beta, "delta": delta, "gamma": gamma, "alpha": alpha},
                        epochs=epochs, lr=lr, lr_scale=lr_scale,
                        checkpoint_every=checkpoint_every)
