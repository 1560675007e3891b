r"""Influence unlearning ("IU"; Koh & Liang 2017, as the deep-net baseline of Izzo et al. 2021
and Jia et al. 2023, "Model sparsity can simplify machine unlearning", NeurIPS).

One damped Newton step on the retained objective, with the curvature of the *full* training
objective at the trained params :math:`\theta^*` prepared once and the gradient of the retained
objective taken as if :math:`\theta^*` were stationary for the full objective (an SGD-trained
deep net is not, and the full gradient would make the step finish training instead of removing
the points). For the mean-normalised objective :math:`L = \frac1n\sum_i\ell_i + \frac\lambda2
\lVert\theta\rVert^2` and a request :math:`U` of :math:`k` points out of :math:`n` retained,
:math:`\nabla L_{D\setminus U}(\theta) = -\frac1{n-k}\bigl(\sum_{i\in U}\nabla\ell_i(\theta)
+ k\lambda\theta\bigr) + \frac{n}{n-k}\nabla L_D(\theta)`; dropping the last term,

.. math::
   \theta^- = \theta + \alpha\,(H + \lambda_d I)^{-1}\,\frac{1}{n-k}
   \Bigl(\sum_{i\in U}\nabla\ell_i(\theta) + k\lambda\theta\Bigr),

:math:`\alpha = 1` being Koh & Liang's first-order estimate and the scale Jia et al. tune
(their ``alpha`` for the WoodFisher step). ``H`` is the Gauss–Newton matrix for non-convex
models (PSD; ``curvature='hessian'`` for the Hessian) and the Hessian for convex ones, always in
eval mode with frozen BatchNorm statistics (``models.frozen_apply``), which the step leaves
unchanged. Backends are those of :mod:`unlearn.inverse`: ``pcg`` (default:
CG on the exact damped curvature, preconditioned by a Nyström approximation prepared once —
converges to the exact step), ``cg``, ``exact`` (dense, small models), ``ekfac``/``kfac``
(dense layers only), ``arnoldi``, ``lissa``. Chained requests reuse the inverse prepared at
:math:`\theta^*` with the gradients at the current params.

Difference from ``newton``: Newton removal takes the full retained gradient at the current
params (exact for a converged convex model, where it is the same step) and a trust rule;
IU assumes stationarity and needs only the removed points' gradients, so a request costs
:math:`k` gradients and one batched inverse-curvature product.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from unlearn import engine, inverse, models
from unlearn import influence as inf
from unlearn.inverse import InverseCurvature
from unlearn.methods.base import Unlearner, next_weights, params_result
from unlearn.train import Fit, Problem, cast

Params = Any


class InfluenceState(NamedTuple):
    """Problem, current trainable params and model state, retained weights, prepared inverse."""

    problem: Problem
    params: Params
    model_state: Params
    weights: np.ndarray
    inverse: InverseCurvature


def influence_unlearning(
    backend: str = "pcg",
    damping: float | None = None,
    alpha: float = 1.0,
    curvature: str = "auto",
    rank: int = 50,
    tol: float | None = None,
    maxiter: int | None = None,
    lissa_depth: int = 200,
    chunk_size: int = 1024,
) -> Unlearner:
    r"""Influence unlearning (one damped Newton step from the prepared full-data curvature).

    Args:
      backend: inverse-curvature backend (a name in :data:`unlearn.inverse.BACKENDS`).
      damping: :math:`\lambda_d` added to the curvature (default: 0 for convex models,
        1e-3 otherwise; non-convex models need > 0).
      alpha: scale of the step (1: the influence-function estimate).
      curvature: ``'auto'`` (Hessian for convex models, Gauss–Newton otherwise), ``'hessian'``
        or ``'ggn'``.
      rank: Nyström rank (``pcg``) or number of eigenpairs (``arnoldi``).
      tol, maxiter: CG tolerance and iteration cap.
      lissa_depth: LiSSA recursion depth.
      chunk_size: examples per chunk when the (E)K-FAC factors are accumulated.
    """
    if backend not in inverse.BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {tuple(inverse.BACKENDS)}.")
    if curvature not in ("auto", "hessian", "ggn"):
        raise ValueError(f"curvature={curvature!r}: choose 'auto', 'hessian' or 'ggn'.")
    if damping is not None and damping < 0:
        raise ValueError(f"damping={damping!r} must be >= 0.")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r} must be a positive number.")
    if rank < 1:
        raise ValueError(f"rank={rank!r} must be >= 1.")

    def prepare(problem: Problem, trained: Fit) -> InfluenceState:
        convex = problem.model.convex
        lam = (0.0 if convex else 1e-3) if damping is None else float(damping)
        if not convex and lam <= 0:
            raise ValueError(
                f"influence unlearning on the non-convex model {problem.model.name!r} needs "
                "damping > 0 (e.g. damping=1e-3): its curvature is only positive semi-definite.")
        kind = curvature if curvature != "auto" else ("hessian" if convex else "ggn")
        dtype = problem.cfg.dtype
        params, mstate = engine.split_variables(cast(trained.params, dtype))
        x = cast(jnp.asarray(problem.train.x), dtype)
        y = jnp.asarray(problem.train.y)
        p = ravel_pytree(params)[0].size
        curv = inverse.Curvature(models.frozen_apply(problem.model, mstate), params, x, y,
                                 problem.cfg.l2, kind=kind)
        solver = inverse.backend(backend, rank=min(rank, p - 1), tol=tol, maxiter=maxiter,
                                 key=jax.random.fold_in(problem.key, 11), depth=lissa_depth,
                                 chunk_size=chunk_size)
        prepared = solver.prepare(curv, lam)
        return InfluenceState(problem, params, mstate,
                              np.ones(len(problem.train), np.float32), prepared)

    def forget(state: InfluenceState, forget_ids, key):
        del key  # deterministic (LiSSA draws its minibatches from the prepare-time key)
        pos, w = next_weights(state, forget_ids)
        p = state.problem
        apply = models.frozen_apply(p.model, state.model_state)
        dtype = p.cfg.dtype
        x = cast(jnp.asarray(p.train.x[pos]), dtype)
        y = jnp.asarray(p.train.y[pos])
        theta, unravel = ravel_pytree(state.params)
        n_left = float(w.sum())  # n - k
        k = len(pos)
        grads = inf.example_gradients(apply, state.params, x, y)
        rhs = (jnp.sum(grads, axis=0) + k * p.cfg.l2 * theta) / n_left
        sol = state.inverse.apply(rhs[None].astype(theta.dtype))
        step = alpha * sol.x[0]
        new = unravel(theta + step.astype(theta.dtype))
        stats = {
            "backend": state.inverse.backend.name,
            "k": k,
            "iterations": int(sol.iterations[0]),
            "residual": float(sol.residual[0]),
            "converged": bool(sol.converged[0]),
            "step_norm": float(jnp.linalg.norm(step)),
            "prepare_seconds": state.inverse.prepare_seconds,
        }
        full = engine.merge_variables(new, state.model_state)
        return params_result(p, full, stats), state._replace(params=new, weights=w)

    return Unlearner("influence", prepare, forget)
