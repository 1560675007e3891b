"""What the two CG loops (``conjugate_gradients``, ``block_cg``) share around their recursion:
the start and residual replacement.

* The start never applies the operator to a compile-time zero: with JAX 0.10.2 on CPU an HVP
  whose tangent is a constant zero inside ``jit`` returns NaN for softmax regression at
  n >= 6000 (docs/architecture.md; not reproduced with this jaxlib build, see the
  ``unlearn.solvers`` docstring), so starting from ``x0 = 0`` we take ``r0 = b`` and the
  iterate is ``0 * b`` (a runtime value).
* Residual replacement (van der Vorst & Ye 2000): when the recursion stops, the true residual
  ``b - A x`` is recomputed and, while it is above the tolerance, CG restarts from it, at most
  :data:`RESTARTS` times. The constant is read when a solver is traced: to change it, patch it
  on this module (``unlearn.solvers.residual_replacement.RESTARTS``; the package's
  ``solvers.RESTARTS`` is a copy for reading) and solve with an operator not traced before.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _start(apply: Callable[[Array], Array], b: Array, x0: Array | None) -> tuple[Array, Array]:
    """First iterate and residual. x0 = 0 is ``0 * b`` with ``r = b``: the operator is never
    applied to a compile-time zero (the JAX 0.10.2 bug in the module docstring)."""
    if x0 is None:
        return 0 * b, b
    x = jnp.asarray(x0, b.dtype)
    return x, b - apply(x)


#: Residual replacement (van der Vorst & Ye 2000): when the recursion's residual says
#: converged but the true one b - Ax does not (in float32 the two drift apart by ~eps·cond:
#: e.g. 1.05e-5 true at 1e-5 recursive on an MLP Hessian), CG restarts from the true residual,
#: at most this many times.
RESTARTS = 2


def _run_again(threshold: Array, maxiter: Array, state: tuple[Array, ...]) -> Array:
    """Outer loop of the residual replacement: the first run, then a restart while the true
    residual is above the threshold (any row of a block), iterations remain and no breakdown."""
    _, _, k, bad, rnorm, runs = state
    return (runs == 0) | ((runs <= RESTARTS) & jnp.any(rnorm > threshold) & (k < maxiter)
                          & ~bad)


def _rel_norm(r: Array, bnorm: Array) -> Array:
    res = jnp.linalg.norm(r, axis=-1)
    return jnp.where(bnorm > 0, res / jnp.where(bnorm > 0, bnorm, 1.0), res)
