"""Certified removal (Guo et al. 2020) as a registered method; the maths lives in
:mod:`unlearn.certified` (imported on use: that module builds on ``unlearn.methods``).

Defaults: ε = 1, δ = 1e-4, σ = 1, the data-dependent bound. ``prepare`` retrains θ* with the
loss perturbation bᵀθ (so the served model differs from the plain θ*); a request whose bound
would overspend the budget σε/c is served by retraining with fresh noise (``stats``).
"""

from __future__ import annotations

from unlearn.methods.base import Unlearner


def certified(**hparams) -> Unlearner:
    """``unlearn.certified.certified(**hparams)``: epsilon, delta, sigma, bound, tol, max_iter."""
    from unlearn.certified import certified as make

    return make(**hparams)
