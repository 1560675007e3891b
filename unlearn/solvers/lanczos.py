"""Lanczos (1950) with full re-orthogonalisation on a symmetric matrix-free operator.

* :func:`lanczos_topk` — the top-``k`` Ritz pairs of a Krylov space (the Arnoldi iteration of
  Schioppa et al. 2022 on a symmetric operator).
* :func:`lanczos_extremes` — estimates of the extreme eigenvalues: they detect indefinite
  curvature and check the LiSSA scale.

References: Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
differential and integral operators", 1950. Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling up
influence functions", AAAI 2022.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from unlearn.solvers.operators import MatVec, _as_operator

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("steps",))
def _lanczos_basis(op: Partial, v0: Array, steps: int) -> tuple[Array, Array]:
    """Orthonormal Krylov basis ``(m, dim)`` and tridiagonal ``T`` ``(m, m)`` of ``steps``
    Lanczos iterations with full re-orthogonalisation."""
    dim = v0.shape[0]
    m = int(min(steps, dim))
    dtype = v0.dtype
    q0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((m + 1, dim), dtype).at[0].set(q0)
    alphas = jnp.zeros((m,), dtype)
    betas = jnp.zeros((m,), dtype)

    def body(j: Array, carry: tuple[Array, Array, Array, Array]) -> tuple[Array, ...]:
        basis, alphas, betas, alive = carry
        q = basis[j]
        z = op(q)
        a = jnp.vdot(q, z)
        znorm = jnp.linalg.norm(z)
        # Full re-orthogonalisation (twice is enough): the rows not yet filled are zero.
        z = z - (basis @ z) @ basis
        z = z - (basis @ z) @ basis
        beta = jnp.linalg.norm(z)
        ok = alive & (beta > 100 * jnp.finfo(dtype).eps * znorm) & (beta > 0)
        basis = basis.at[j + 1].set(jnp.where(ok, z / jnp.where(ok, beta, 1.0), 0.0))
        alphas = alphas.at[j].set(jnp.where(alive, a, jnp.nan))
        betas = betas.at[j].set(jnp.where(ok, beta, 0.0))
        return basis, alphas, betas, ok

    basis, alphas, betas, _ = jax.lax.fori_loop(
        0, m, body, (basis, alphas, betas, jnp.asarray(True)))
    # Steps after an invariant subspace was found are padded with a Ritz value already inside
    # the spectrum (alpha_0), so they cannot move the extreme estimates; their basis rows are 0.
    alphas = jnp.where(jnp.isnan(alphas), alphas[0], alphas)
    t = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return basis[:m], t


@functools.partial(jax.jit, static_argnames=("steps",))
def _lanczos(op: Partial, v0: Array, steps: int) -> tuple[Array, Array]:
    _, t = _lanczos_basis(op, v0, steps)
    ev = jnp.linalg.eigvalsh(t)
    return ev[0], ev[-1]


def lanczos_topk(
    matvec: MatVec | Array,
    like: Array,
    k: int,
    steps: int | None = None,
    key: Array | None = None,
) -> tuple[Array, Array]:
    r"""Top-``k`` eigenpairs of a symmetric operator from a ``steps``-dimensional Krylov space.

    The Arnoldi iteration of Schioppa et al. (2022, Alg. 1) — which for a symmetric operator is
    Lanczos (1950) with full re-orthogonalisation — builds an orthonormal basis :math:`Q` of
    :math:`\mathcal K_m(A, v_0)` and :math:`T = Q A Q^\top`; the Ritz pairs of :math:`T`
    (:math:`T = S\Theta S^\top`, vectors :math:`Q^\top S`) with the largest Ritz values
    converge first. Cost: ``steps`` operator applications plus :math:`O(m^2 p)`.

    Returns:
      ``(evals (k,), evecs (p, k))``, eigenvalues descending.
    """
    op = _as_operator(matvec)
    p = like.shape[0]
    steps = int(min(p, 2 * k + 20 if steps is None else steps))
    if not 0 < k <= steps:
        raise ValueError(f"k={k} must be in [1, steps={steps}] (and steps <= p={p}).")
    key = jax.random.PRNGKey(0) if key is None else key
    v0 = jax.random.normal(key, (p,), like.dtype)
    basis, t = _lanczos_basis(op, v0, steps)
    theta, s = jnp.linalg.eigh(t)
    order = jnp.argsort(-theta)[:k]
    return theta[order], basis.T @ s[:, order]


def lanczos_extremes(
    matvec: MatVec | Array,
    dim_or_like: int | Array,
    steps: int = 30,
    key: Array | None = None,
) -> tuple[float, float]:
    r"""Estimates of the smallest and largest eigenvalues of a symmetric operator.

    ``steps`` Lanczos iterations (Lanczos 1950) with full re-orthogonalisation from a random
    start; the extreme Ritz values of the tridiagonal matrix :math:`T` satisfy
    :math:`\lambda_{\min} \le \theta_{\min} \le \theta_{\max} \le \lambda_{\max}` and converge
    quickly for the extremes. Used to detect indefinite curvature (a negative
    :math:`\theta_{\min}` proves a negative eigenvalue) and to check the LiSSA scale.

    Args:
      matvec: the operator (callable/``Partial``) or a dense symmetric matrix.
      dim_or_like: the vector length, or an array whose shape/dtype to use.
      steps: Krylov dimension (cost: ``steps`` operator applications).
      key: PRNG key for the start vector (default ``PRNGKey(0)``).
    """
    op = _as_operator(matvec)
    if isinstance(dim_or_like, int):
        dim, dtype = dim_or_like, jnp.result_type(float)
    else:
        dim, dtype = dim_or_like.shape[0], dim_or_like.dtype
    key = jax.random.PRNGKey(0) if key is None else key
    v0 = jax.random.normal(key, (dim,), dtype)
    lo, hi = _lanczos(op, v0, steps)
    return float(lo), float(hi)
