"""What the solvers accept as an operator: a dense matrix, a :class:`CholeskyFactor`, a
``jax.tree_util.Partial`` or any callable, turned into one jit-friendly ``Partial``
(optionally damped: ``v -> A v + damping * v``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from unlearn.curvature import dense_matvec
from unlearn.solvers.cholesky import CholeskyFactor, _factor_matvec

Array = jax.Array
MatVec = Callable[[Array], Array]


def _as_operator(a: Any, damping: float = 0.0) -> Partial:
    """A dense matrix, a ``Partial`` or any callable as a jit-friendly ``Partial`` operator."""
    if isinstance(a, CholeskyFactor):
        return Partial(_factor_matvec, a.factor)
    if callable(a):
        op = a if isinstance(a, Partial) else Partial(a)
        if damping:
            return Partial(_damped, op, jnp.asarray(damping))
        return op
    return dense_matvec(jnp.asarray(a), damping)


def _damped(op: Partial, damping: Array, v: Array) -> Array:
    return op(v) + damping * v
