r"""Dense Cholesky :math:`LL^\top` of :math:`H + \lambda_d I`, and the LAPACK thread guard.

Factor once (:func:`cholesky_factor`), then every request is two triangular solves
(:func:`cholesky_solve`). Above :data:`LAPACK_THREADED_LIMIT` the factorisation runs
single-threaded (:func:`lapack_guard`): on this machine (2 cores, OpenBLAS 0.3.30/0.3.31 inside
scipy/numpy wheels) the threaded ``potrf`` segfaults at p ≳ 23 000 while the single-threaded one
works (``tests/test_solvers.py``, ``slow``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import scipy.linalg.cython_lapack  # noqa: F401  (jaxlib's LAPACK: loaded so the guard sees it)
import threadpoolctl
from jax.tree_util import Partial

from unlearn.solvers.solution import _is_concrete, _rel_residual

Array = jax.Array


#: Largest matrix order factorised with OpenBLAS's threads. Measured on this machine (2 cores,
#: the OpenBLAS 0.3.30/0.3.31 builds inside the scipy and numpy wheels that jaxlib's LAPACK
#: kernels call): threaded float64 ``potrf`` at p = 23 500 kills the process (SIGSEGV, exit
#: 139) while float32 at 24 000 survives (47 s); single-threaded, float64 at 23 500 works
#: (109 s) (``tests/test_solvers.py::test_exact_path_large_p``, ``slow``). The limit must see
#: scipy's OpenBLAS, which jaxlib loads lazily: this module imports it first.
#: Above this order :func:`lapack_guard` runs the factorisation with one BLAS thread.
LAPACK_THREADED_LIMIT = 20_000


@contextlib.contextmanager
def lapack_guard(order: int) -> Iterator[None]:
    """Run dense factorisations of a matrix of this ``order`` without crashing the process.

    Above :data:`LAPACK_THREADED_LIMIT` the BLAS behind LAPACK is limited to one thread
    (``threadpoolctl``) for the duration; callers must block on the result inside the block
    (JAX dispatches asynchronously).
    """
    if order <= LAPACK_THREADED_LIMIT:
        yield
        return
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


class CholeskyFactor(NamedTuple):
    """Lower Cholesky factor ``L`` of ``A + damping I`` (``A + damping I = L L^T``)."""

    factor: Array


def _factor_matvec(factor: Array, v: Array) -> Array:
    # L (L^T v); ``factor.T @ v`` with a vector v copies the transposed factor on XLA's CPU
    # backend (15x slower at p = 7850), the einsum contracts over the first axis in place.
    return factor @ jnp.einsum("ij,i...->j...", factor, v)


@jax.jit
def _cho_factor(a: Array, damping: Array) -> tuple[Array, Array]:
    a = 0.5 * (a + a.T) + damping * jnp.eye(a.shape[0], dtype=a.dtype)
    c, _ = jax.scipy.linalg.cho_factor(a, lower=True)
    c = jnp.tril(c)
    # The breakdown test inside the same program: done eagerly, isfinite and the reduction
    # compiled as two more programs on every cold call (0.26 s at p = 7850).
    return c, jnp.all(jnp.isfinite(c))


def cholesky_factor(h: Array, damping: float = 0.0) -> CholeskyFactor:
    r"""Cholesky factor of :math:`H + \lambda_d I` (symmetrised first).

    Raises:
      ValueError: if the matrix is not positive definite (the factor contains NaN). The
        message reports the most negative eigenvalue of :math:`H + \lambda_d I` (``eigvalsh``,
        computed only on this error path) and suggests a ``damping=`` that makes it PD.
    """
    h = jnp.asarray(h)
    with lapack_guard(h.shape[0]):
        factor, finite = jax.block_until_ready(_cho_factor(h, jnp.asarray(damping, h.dtype)))
    if _is_concrete(finite) and not bool(finite):
        hs = 0.5 * (h + h.T)
        with lapack_guard(h.shape[0]):
            lam = float(jnp.linalg.eigvalsh(hs)[0])
        need = max(-lam, 0.0)
        raise ValueError(
            "Cholesky failed: the curvature matrix plus damping="
            f"{damping:g} is not positive definite (most negative eigenvalue of H is "
            f"{lam:.4e}). Pass damping= larger than {need:.3e} "
            f"(e.g. damping={1.1 * need + 1e-8:.3e}), use the Gauss-Newton matrix "
            "(unlearn.curvature.ggn_vp), or increase the L2 coefficient."
        )
    return CholeskyFactor(factor)


@jax.jit
def cholesky_solve(factor: CholeskyFactor, b: Array) -> Array:
    """Solve ``(L L^T) x = b`` with two triangular solves; ``b`` may be ``(p,)`` or ``(p, m)``."""
    return jax.scipy.linalg.cho_solve((factor.factor, True), b)


@jax.jit
def _cholesky_solve_checked(
    factor: CholeskyFactor, b: Array, tol: Array
) -> tuple[Array, Array, Array]:
    x = jax.scipy.linalg.cho_solve((factor.factor, True), b)
    fop = Partial(_factor_matvec, factor.factor)
    bb = b.reshape(b.shape[0], -1)
    xx = x.reshape(x.shape[0], -1)
    res = jnp.max(jax.vmap(_rel_residual, (None, 1, 1))(fop, xx, bb))
    return x, res, (res <= tol) & jnp.all(jnp.isfinite(x))
