r"""Newton removal (Guo et al. 2020, "Certified Data Removal from Machine Learning Models", ICML).

One batch Newton step on the retained objective removes all ``k`` requested points at once:
:math:`\theta^- = \theta - (H_r + \lambda_d I)^{-1}\nabla L(\theta; D\setminus U)`, optionally
followed by a second step at :math:`\theta^-` (``steps=2``). Solvers (``unlearn.influence``):

* ``exact`` — ``prepare`` eigendecomposes the full-data Hessian at :math:`\theta^*` once and
  sums the example gradients there; each request is an exact Woodbury downdate for the removed
  points' curvature and the regulariser's re-weighting (see :mod:`unlearn.influence`): the
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

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import curvature as curv
from unlearn import engine, influence, models
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
    factor: influence.NewtonFactor | influence.NystromCache | None
    model_state: Params = None


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
    if solver not in ("auto", "exact", "cg", "lissa"):
        raise ValueError(f"solver={solver!r}: choose 'auto', 'exact', 'cg' or 'lissa'.")
    if precond not in ("nystrom", None):
        raise ValueError(f"precond={precond!r}: choose 'nystrom' or None.")
    if curvature not in ("auto", "hessian", "ggn"):
        raise ValueError(f"curvature={curvature!r}: choose 'auto', 'hessian' or 'ggn'.")
    if rank < 1:
        raise ValueError(f"rank={rank!r} must be >= 1.")
    if steps not in (1, 2):
        raise ValueError(f"steps={steps!r}: choose 1 or 2.")
    if damping is not None and damping < 0:
        raise ValueError(f"damping={damping!r} must be >= 0.")

    def resolved(problem: Problem) -> tuple[str, float]:
        convex = problem.model.convex
        s = solver if solver != "auto" else ("exact" if convex else "cg")
        lam = (0.0 if convex else 1e-3) if damping is None else float(damping)
        return s, lam

    def curvature_fn(problem: Problem):
        use_ggn = curvature == "ggn" or (curvature == "auto" and not problem.model.convex)
        return curv.ggn_vp if use_ggn else curv.hvp

    def prepare(problem: Problem, trained: Fit) -> NewtonState:
        solver, damping = resolved(problem)
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
        apply = models.frozen_apply(problem.model, mstate)
        x = cast(jnp.asarray(problem.train.x), dtype)
        y = jnp.asarray(problem.train.y)
        w = np.ones(len(problem.train), np.float32)
        factor = None
        wj = jnp.asarray(w, x.dtype)
        if solver == "exact":
            factor = influence.newton_factor(apply, params, x, y, wj,
                                             problem.cfg.l2, damping)
        elif solver == "cg" and precond == "nystrom":
            p = jax.flatten_util.ravel_pytree(params)[0].size
            factor = influence.nystrom_cache(
                apply, params, x, y, wj, problem.cfg.l2, damping,
                rank=min(rank, p - 1), key=jax.random.fold_in(problem.key, 7),
                curvature_fn=curvature_fn(problem))
        return NewtonState(problem, params, w, x, y, params, w, factor, mstate)

    def forget(state: NewtonState, forget_ids, key):
        pos, w = next_weights(state, forget_ids)
        p = state.problem
        solver, damping = resolved(p)
        apply = models.frozen_apply(p.model, state.model_state or {})
        l2 = p.cfg.l2
        wj = jnp.asarray(w, state.x.dtype)
        common = dict(damping=damping, tol=tol, maxiter=maxiter, lissa_depth=lissa_depth,
                      lissa_scale=lissa_scale, key=key)
        # Everything removed since the anchor, padded with zero-weight rows to a power of two
        # so that requests of different sizes reuse a few compiled programs.
        removed = np.nonzero((state.anchor_weights > 0) & (w == 0))[0]
        rows = np.zeros(bucket(len(removed)), np.int64)
        rows[: len(removed)] = removed
        removed_w = np.zeros(len(rows))
        removed_w[: len(removed)] = state.anchor_weights[removed]
        removed_x, removed_w = state.x[rows], jnp.asarray(removed_w, state.x.dtype)
        grad = None
        if state.factor is not None and state.params is state.anchor:
            # At θ*: the cached Σ_D ∇ℓ_i minus the removed points' gradients (exact, O(kp)).
            grad = influence.downdated_gradient(
                apply, state.anchor, state.factor.grad_sum, removed_x, state.y[rows], removed_w,
                jnp.asarray(w.sum(), state.x.dtype), jnp.asarray(l2, state.x.dtype))
        nystrom = isinstance(state.factor, influence.NystromCache)
        cg_opts = {}
        if solver == "cg":
            cg_opts["curvature_fn"] = curvature_fn(p)
        convex = p.model.convex
        lam = damping
        accepted = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for attempt in range(1 if convex else max_retries + 1):
                common["damping"] = lam
                retries = attempt
                if nystrom:
                    cg_opts["precond"] = state.factor._replace(damping=lam).preconditioner()
                params, res = influence.newton_step(
                    apply, state.params, state.x, state.y, wj, l2, solver=solver,
                    factor=None if nystrom else state.factor, removed_x=removed_x,
                    removed_w=removed_w, anchor=state.anchor, grad=grad, **common, **cg_opts)
                results = [res]
                if steps == 2:
                    params, res2 = influence.newton_step(
                        apply, params, state.x, state.y, wj, l2,
                        solver=solver, **common, **cg_opts)
                    results.append(res2)
                if convex:
                    break
                # Trust rule (non-convex): accept only a step that lowers the retained loss.
                before = float(objective(apply, state.params, state.x, state.y, wj, l2))
                after = float(objective(apply, params, state.x, state.y, wj, l2))
                accepted = bool(np.isfinite(after) and after <= before)
                if accepted:
                    break
                lam = 10.0 * lam
            if not accepted:
                params = state.params
        converged = all(bool(r.converged) for r in results)
        for c in caught:
            warnings.warn(c.message, c.category, stacklevel=2)
        if not converged and not caught:
            warnings.warn(f"newton({solver}): the linear solve did not converge "
                          f"(relative residual {max(float(r.residual) for r in results):.2e})",
                          RuntimeWarning, stacklevel=2)
        stats = {
            "solver": solver,
            "steps": steps,
            "k": int(len(pos)),
            "iterations": int(sum(int(r.iterations) for r in results)),
            "residual": float(max(float(r.residual) for r in results)),
            "converged": converged,
            "method": results[0].method,
            "preconditioned": nystrom,
            "damping": lam,
            "accepted": accepted,
            "retries": retries,
        }
        if report_residual:
            g = influence.retained_gradient(apply, params, state.x, state.y, wj, l2)
            stats["grad_norm"] = float(jnp.linalg.norm(g))
        full = engine.merge_variables(params, state.model_state or {})
        return params_result(p, full, stats), state._replace(params=params, weights=w)

    return Unlearner("newton", prepare, forget)
