r"""Certified removal (Guo et al. 2020) as a registered, stateful method.

The maths (loss perturbation, Newton removal, residual bounds, budget) lives in
:mod:`unlearn.certified`, which does not import this package; this file only keeps the budget
bookkeeping. Defaults: ε = 1, δ = 1e-4, σ = 1, the data-dependent bound. ``prepare`` retrains
θ* with the loss perturbation bᵀθ (so the served model differs from the plain θ*); a request
whose bound would overspend the budget σε/c is served by retraining with fresh noise
(``stats["retrained"]``). Works for softmax regression and binary logistic regression
(``models.binary_logreg``, with Guo et al.'s binary constants γ = 1/4, C = 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from unlearn import certified as cr
from unlearn.methods.base import Unlearner, check_convex, next_weights, params_result
from unlearn.train import Fit, Problem

Params = Any


class CertifiedState(NamedTuple):
    """Params, retained weights, the training noise ``b`` and the budget bookkeeping."""

    problem: Problem
    params: Params
    weights: np.ndarray
    b: jax.Array
    beta: float
    budget: float
    retrains: int


def certified(epsilon: float = 1.0, delta: float = 1e-4, sigma: float = 1.0,
              bound: str = "data", tol: float | None = None, max_iter: int = 5000
              ) -> Unlearner:
    r"""A stateful :math:`(\epsilon,\delta)`-certified removal ``Unlearner`` (Guo et al. 2020).

    ``prepare`` trains with loss perturbation (noise from ``problem.key``; warm start from
    ``trained``). ``forget`` takes one Newton step (:func:`unlearn.certified.newton_removal`),
    adds the ``bound`` (``data`` or ``worst``) to :math:`\beta`, and if :math:`\beta` would
    exceed :math:`\sigma\epsilon/c` retrains from scratch with fresh noise from ``key`` instead
    (``stats["retrained"]``). Stats carry the gradient residual norm (sum form) and both bounds.
    """
    eps_budget = cr.budget(sigma, epsilon, delta)
    if bound not in ("data", "worst"):
        raise ValueError(f"bound={bound!r}: choose 'data' or 'worst'.")

    def prepare(problem: Problem, trained: Fit) -> CertifiedState:
        check_convex(problem, "certified")
        cr.constants(problem.model)  # the bounds' constants: logistic/softmax regression only
        b = cr.draw_noise(jax.random.fold_in(problem.key, 7), trained.params, sigma,
                          problem.cfg.dtype)
        fit = cr.fit_perturbed(problem, b, params=trained.params, tol=tol, max_iter=max_iter)
        w = np.ones(len(problem.train), np.float32)
        r0 = cr.residual_norm(problem, fit.params, w, b)
        return CertifiedState(problem, fit.params, w, b, r0, eps_budget, 0)

    def forget(state: CertifiedState, forget_ids, key):
        _, w = next_weights(state, forget_ids)
        p = state.problem
        rem = cr.newton_removal(p, state.params, state.weights, w, state.b)
        add = rem.data_bound if bound == "data" else rem.worst_bound
        stats = {"residual_norm": rem.residual_norm, "data_bound": rem.data_bound,
                 "worst_bound": rem.worst_bound, "budget": state.budget, "retrained": False,
                 "solve_residual": rem.solve_residual}
        if state.beta + add <= state.budget:
            beta = state.beta + add
            params, b, retrains = rem.params, state.b, state.retrains
        else:
            b = cr.draw_noise(key, state.params, sigma, p.cfg.dtype)
            fit = cr.fit_perturbed(p, b, weights=w, tol=tol, max_iter=max_iter)
            params, retrains = fit.params, state.retrains + 1
            beta = cr.residual_norm(p, params, w, b)
            stats.update(retrained=True, residual_norm=beta)
        stats.update(beta=beta, retrains=retrains)
        out = state._replace(params=params, weights=w, b=b, beta=beta, retrains=retrains)
        return params_result(p, params, stats), out

    return Unlearner("certified", prepare, forget)
