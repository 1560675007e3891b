r"""The one return type of every solver, :class:`Solution`, and the checks they all share.

Every solver returns a :class:`Solution` whose ``residual`` is the *true* relative residual
:math:`\lVert b - (A + \lambda_d I)x\rVert / \lVert b\rVert`, recomputed from the returned ``x``
(never the recursion's running estimate); here are that residual (:func:`_rel_residual`), the
default tolerances per method and dtype, and the warning on non-convergence.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

Array = jax.Array


class Solution(NamedTuple):
    """Outcome of a linear solve (the one return type of every solver here).

    Attributes:
      x: the solution estimate, ``(p,)`` or ``(m, p)`` for ``m`` right-hand sides (rows).
      iterations: CG iterations (per right-hand side), LiSSA recursion steps or 0 for direct
        solves.
      residual: true relative residual ``||b - A x|| / ||b||`` recomputed from ``x`` (with ``A``
        the damped operator actually solved); per right-hand side when batched.
      converged: ``residual <= tol`` and no breakdown/divergence (per right-hand side).
      method: ``'cholesky'``, ``'cg'``, ``'lissa'``, ``'woodbury'``, ...
      message: empty, or why it did not converge (negative curvature, divergence, ...).
    """

    x: Array
    iterations: Array
    residual: Array
    converged: Array
    method: str = ""
    message: str = ""

    @property
    def stats(self) -> dict[str, Any]:
        """Plain-Python summary for results JSON (maxima over right-hand sides)."""
        its = np.asarray(self.iterations)
        return {
            "method": self.method,
            "iterations": int(its.max()) if its.size else 0,
            "iterations_mean": float(its.mean()) if its.size else 0.0,
            "residual": float(np.max(np.asarray(self.residual))),
            "converged": bool(np.all(np.asarray(self.converged))),
            "message": self.message,
        }


# Register so that ``method``/``message`` are static metadata: a Solution can be returned
# from a jitted function.
jax.tree_util.register_pytree_node(
    Solution,
    lambda r: ((r.x, r.iterations, r.residual, r.converged), (r.method, r.message)),
    lambda aux, ch: Solution(*ch, *aux),
)


def _is_concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def _default_tol(dtype: Any, method: str) -> float:
    f64 = jnp.dtype(dtype) == jnp.float64
    return {
        "cg": 1e-8 if f64 else 1e-5,
        "cholesky": 1e-8 if f64 else 1e-4,
        "lissa": 1e-3,
    }[method]


def _rel_residual(op: Partial, x: Array, b: Array) -> Array:
    bnorm = jnp.linalg.norm(b)
    res = jnp.linalg.norm(b - op(x))
    return jnp.where(bnorm > 0, res / jnp.where(bnorm > 0, bnorm, 1.0), res)


def _warn_if_not_converged(result: Solution, stacklevel: int = 3) -> None:
    if _is_concrete(result.converged) and not np.all(np.asarray(result.converged)):
        extra = f" ({result.message})" if result.message else ""
        bad = np.size(result.converged) - int(np.sum(np.asarray(result.converged)))
        which = f" ({bad} of {np.size(result.converged)} right-hand sides)" if np.ndim(
            result.converged) else ""
        warnings.warn(
            f"{result.method} did not converge{extra}{which}: relative residual "
            f"{float(jnp.max(result.residual)):.3e} after "
            f"{int(jnp.max(result.iterations))} iterations",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
