r"""Newton removal (Guo et al. 2020, "Certified Data Removal from Machine Learning Models", ICML).

One batch Newton step on the retained objective removes all ``k`` requested points at once:
:math:`\theta^- = \theta - (H_r + \lambda_d I)^{-1}\nabla L(\theta; D\setminus U)`, optionally
followed by a second step at :math:`\theta^-` (``steps=2``). Solvers (``unlearn.removal``,
``unlearn.inverse``):

* ``exact`` — ``prepare`` eigendecomposes the full-data Hessian at :math:`\theta^*` once and
  sums the example gradients there; each request is an exact Woodbury downdate for the removed
  points' curvature and the regulariser's re-weighting (see :mod:`unlearn.removal`): the
  removed points' gradients and three passes over the eigenvectors. Later requests reuse the
  factor at :math:`\theta^*` with every point removed so far (curvature at the anchor, a full
  gradient at the current params). The second step (``steps=2``) uses a fresh dense Hessian
  at :math:`\theta^-`.
* ``cg`` — matrix-free conjugate gradients on the curvature at the current params,
  preconditioned by default (``precond='nystrom'``): ``prepare`` builds a rank-``rank``
  randomized Nyström approximation of the full-data curvature at :math:`\theta^*` (one batched
  call of ``rank`` products; Frangella, Tropp & Udell 2023) and sums the example gradients
  there, so a request at :math:`\theta^*` costs the removed points' gradients and a handful of
  preconditioned CG iterations on the exact retained curvature — it converges to the exact
  Newton step, the preconditioner only changes how fast (``benchmarks/newton.py``).
* ``lissa`` — the stochastic Neumann series of Agarwal et al. (2017) on the HVP.

Strictly convex models (``model.convex``, softmax regression) use the Hessian, which is then
positive definite, and the step approximates retraining to second order. **Non-convex
models** (MLP, CNN, ResNets in eval mode) run with ``solver='cg'`` on the damped
Gauss–Newton matrix :math:`G + \lambda_d I` (PSD, so CG is well defined; ``curvature='hessian'``
uses the Hessian and fails loudly at negative curvature) with ``damping > 0`` and a
Levenberg–Marquardt trust rule (Moré 1978; Martens 2010 §4.1): a step is accepted only if it
lowers the retained objective; otherwise the damping is multiplied by 10 and the step
recomputed, up to ``max_retries`` times, after which the params are left unchanged and
``stats['accepted']`` is False.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import engine, inverse, models, removal
from unlearn.methods.base import Unlearner, check_convex, next_weights, params_result
from unlearn.objective import objective
from unlearn.train import Fit, Problem, bucket, cast

Params = Any


class NewtonState(NamedTuple):
    """Problem, current params and retained weights, plus the cached factor and its anchor."""

    problem: Problem
    params: Params
    weights: np.ndarray
    x: jax.Array
    y: jax.Array
    anchor: Params
    anchor_weights: np.ndarray
    factor: removal.NewtonFactor | removal.NystromCache | None
    model_state: Params = None


@dataclasses.dataclass(frozen=True)
class NewtonConfig:
    """The hyperparameters of :func:`newton` (validated there)."""

    solver: str = "auto"
    steps: int = 1
    damping: float | None = None
    tol: float | None = None
    maxiter: int | None = None
    lissa_depth: int = 1000
    lissa_scale: float | None = None
    report_residual: bool = True
    precond: str | None = "nystrom"
    rank: int = 100
    curvature: str = "auto"
    max_retries: int = 3

    def check(self) -> NewtonConfig:
        choices = {"solver": ("auto", "exact", "cg", "lissa"), "precond": ("nystrom", None),
                   "curvature": ("auto", "hessian", "ggn"), "steps": (1, 2)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}.")
        if self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be >= 1.")
        if self.damping is not None and self.damping < 0:
            raise ValueError(f"damping={self.damping!r} must be >= 0.")
        return self

    def resolved(self, problem: Problem) -> tuple[str, float]:
        """(solver, damping) for this problem: exact and no damping for convex models."""
        convex = problem.model.convex
        s = self.solver if self.solver != "auto" else ("exact" if convex else "cg")
        lam = (0.0 if convex else 1e-3) if self.damping is None else float(self.damping)
        return s, lam

    def kind(self, problem: Problem) -> str:
        """The curvature: the Hessian for convex models, the Gauss–Newton matrix otherwise."""
        ggn = self.curvature == "ggn" or (self.curvature == "auto" and not problem.model.convex)
        return "ggn" if ggn else "hessian"


def newton(
    solver: str = "auto",
    steps: int = 1,
    damping: float | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
    lissa_depth: int = 1000,
    lissa_scale: float | None = None,
    report_residual: bool = True,
    precond: str | None = "nystrom",
    rank: int = 100,
    curvature: str = "auto",
    max_retries: int = 3,
) -> Unlearner:
    r"""Batch Newton removal.

    Args:
      solver: ``exact`` (cached eigendecomposition + Woodbury), ``cg`` or ``lissa``;
        non-convex models need ``cg``; ``auto`` (default): ``exact`` for convex models,
        ``cg`` otherwise.
      steps: 1 (Guo et al.) or 2 (a second Newton step at the first step's result).
      damping: :math:`\lambda_d` added to the curvature's diagonal (default: 0 for convex
        models, 1e-3 otherwise).
      tol, maxiter: CG/LiSSA tolerance and CG iteration cap (non-convergence is warned about and
        reported in ``stats``).
      lissa_depth, lissa_scale: LiSSA recursion depth and scale (default: 1.5 × a Lanczos
        estimate of the largest eigenvalue).
      report_residual: compute the gradient norm of the retained objective after the update
        (one more gradient) into ``stats["grad_norm"]``.
      precond: ``'nystrom'`` (CG preconditioned by a rank-``rank`` Nyström approximation
        cached at prepare) or ``None`` (plain CG, nothing prepared).
      rank: Nyström rank (``rank`` curvature products at prepare, :math:`O(p\,r)` memory).
      curvature: ``'hessian'``, ``'ggn'`` or ``'auto'`` (Hessian for convex models, GGN else).
      max_retries: non-convex trust rule: how many times the damping is raised ×10 when a step
        does not lower the retained objective.
    """
    cfg = NewtonConfig(solver, steps, damping, tol, maxiter, lissa_depth, lissa_scale,
                       report_residual, precond, rank, curvature, max_retries).check()
    return Unlearner("newton", functools.partial(_prepare, cfg),
                     functools.partial(_forget, cfg))


def _prepare(cfg: NewtonConfig, problem: Problem, trained: Fit) -> NewtonState:
    solver, damping = cfg.resolved(problem)
    if not problem.model.convex:
        if solver != "cg":
            check_convex(problem, f"newton(solver={solver!r})")
        if damping <= 0:
            raise ValueError(
                f"newton on the non-convex model {problem.model.name!r} needs damping > 0 "
                "(e.g. damping=1e-3): the curvature is only positive semi-definite.")
    dtype = problem.cfg.dtype
    # Curvature and steps act on the trainable params in eval mode; BatchNorm statistics
    # stay frozen (and are returned unchanged).
    params, mstate = engine.split_variables(cast(trained.params, dtype))
    x = cast(jnp.asarray(problem.train.x), dtype)
    y = jnp.asarray(problem.train.y)
    w = np.ones(len(problem.train), np.float32)
    curv = inverse.Curvature(models.frozen_apply(problem.model, mstate), params, x, y,
                             problem.cfg.l2, jnp.asarray(w, x.dtype), cfg.kind(problem))
    factor = None
    if solver == "exact":
        factor = removal.newton_factor(curv._replace(kind="hessian"), damping)
    elif solver == "cg" and cfg.precond == "nystrom":
        p = jax.flatten_util.ravel_pytree(params)[0].size
        factor = removal.nystrom_cache(curv, damping, rank=min(cfg.rank, p - 1),
                                       key=jax.random.fold_in(problem.key, 7))
    return NewtonState(problem, params, w, x, y, params, w, factor, mstate)


def _removed_since_anchor(state: NewtonState, w: np.ndarray) -> tuple[np.ndarray, jax.Array]:
    """Rows removed since the anchor, padded with zero-weight rows to a power of two so that
    requests of different sizes reuse a few compiled programs; and their weights."""
    removed = np.nonzero((state.anchor_weights > 0) & (w == 0))[0]
    rows = np.zeros(bucket(len(removed)), np.int64)
    rows[: len(removed)] = removed
    removed_w = np.zeros(len(rows))
    removed_w[: len(removed)] = state.anchor_weights[removed]
    return rows, jnp.asarray(removed_w, state.x.dtype)


def _backend(cfg: NewtonConfig, state: NewtonState, solver: str, damping: float, key):
    """The inverse-curvature backend of one (non-Woodbury) step at this damping."""
    if solver == "lissa":
        return inverse.LiSSA(depth=cfg.lissa_depth, key=key, scale=cfg.lissa_scale)
    if solver == "exact":
        return inverse.Exact(tol=cfg.tol)
    precond = None
    if isinstance(state.factor, removal.NystromCache):
        precond = state.factor._replace(damping=damping).preconditioner()
    return inverse.CG(tol=cfg.tol, maxiter=cfg.maxiter, precond=precond)


def _steps(cfg: NewtonConfig, state: NewtonState, curv: inverse.Curvature, solver: str,
           damping: float, key, grad, downdate):
    """``cfg.steps`` Newton steps from ``state.params``; returns (params, solutions)."""
    backend = _backend(cfg, state, solver, damping, key)
    params, res = removal.newton_step(curv, backend, damping=damping, grad=grad,
                                      downdate=downdate)
    results = [res]
    if cfg.steps == 2:
        params, res2 = removal.newton_step(curv._replace(params=params), backend,
                                           damping=damping)
        results.append(res2)
    return params, results


def _with_trust_rule(cfg: NewtonConfig, state: NewtonState, curv: inverse.Curvature,
                     solver: str, damping: float, key, grad, downdate):
    """Convex: one attempt. Non-convex: accept only a step that lowers the retained
    objective, raising the damping ×10 up to ``max_retries`` times (Levenberg–Marquardt)."""
    convex = state.problem.model.convex
    lam, accepted, params, results, retries = damping, True, state.params, [], 0
    for attempt in range(1 if convex else cfg.max_retries + 1):
        retries = attempt
        params, results = _steps(cfg, state, curv, solver, lam, key, grad, downdate)
        if convex:
            break
        before = float(objective(curv.apply, state.params, curv.x, curv.y, curv.w, curv.l2))
        after = float(objective(curv.apply, params, curv.x, curv.y, curv.w, curv.l2))
        accepted = bool(np.isfinite(after) and after <= before)
        if accepted:
            break
        lam = 10.0 * lam
    if not accepted:
        params = state.params
    return params, results, {"damping": lam, "accepted": accepted, "retries": retries}


def _forget(cfg: NewtonConfig, state: NewtonState, forget_ids, key):
    pos, w = next_weights(state, forget_ids)
    p = state.problem
    solver, damping = cfg.resolved(p)
    apply = models.frozen_apply(p.model, state.model_state or {})
    l2 = p.cfg.l2
    wj = jnp.asarray(w, state.x.dtype)
    curv = inverse.Curvature(apply, state.params, state.x, state.y, l2, wj, cfg.kind(p))
    rows, removed_w = _removed_since_anchor(state, w)
    removed_x = state.x[rows]
    grad = downdate = None
    if state.factor is not None and state.params is state.anchor:
        # At θ*: the cached Σ_D ∇ℓ_i minus the removed points' gradients (exact, O(kp)).
        grad = removal.downdated_gradient(
            apply, state.anchor, state.factor.grad_sum, removed_x, state.y[rows], removed_w,
            jnp.asarray(w.sum(), state.x.dtype), jnp.asarray(l2, state.x.dtype))
    if isinstance(state.factor, removal.NewtonFactor):
        downdate = removal.Downdate(state.factor, state.anchor, removed_x, removed_w,
                                    state.y[rows])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, results, trust = _with_trust_rule(cfg, state, curv, solver, damping, key,
                                                  grad, downdate)
    converged = all(bool(r.converged) for r in results)
    for c in caught:
        warnings.warn(c.message, c.category, stacklevel=2)
    if not converged and not caught:
        warnings.warn(f"newton({solver}): the linear solve did not converge "
                      f"(relative residual {max(float(r.residual) for r in results):.2e})",
                      RuntimeWarning, stacklevel=2)
    stats = {"solver": solver, "steps": cfg.steps, "k": int(len(pos)),
             "iterations": int(sum(int(r.iterations) for r in results)),
             "residual": float(max(float(r.residual) for r in results)),
             "converged": converged, "method": results[0].method,
             "preconditioned": isinstance(state.factor, removal.NystromCache), **trust}
    if cfg.report_residual:
        g = removal.retained_gradient(apply, params, state.x, state.y, wj, l2)
        stats["grad_norm"] = float(jnp.linalg.norm(g))
    full = engine.merge_variables(params, state.model_state or {})
    return params_result(p, full, stats), state._replace(params=params, weights=w)
