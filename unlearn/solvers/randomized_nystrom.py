r"""The randomized Nyström approximation and preconditioner (Frangella, Tropp & Udell 2023).

:func:`nystrom` builds :math:`A \approx U\hat\Lambda U^\top` from ``rank`` operator products (one
batched call); :func:`nystrom_preconditioner` is eq. (5.3),
:math:`P^{-1} = (\hat\lambda_r + \mu)\,U(\hat\Lambda + \mu I)^{-1}U^\top + (I - UU^\top)`,
which makes the condition number of :math:`P^{-1/2}(A + \mu I)P^{-1/2}` at most
:math:`(\hat\lambda_r + \mu + \lVert A - \hat A\rVert)/\mu` — a handful of CG iterations once
``rank`` exceeds the effective dimension. Cached once by ``prepare``.

References: Frangella, Tropp & Udell, "Randomized Nyström preconditioning", SIAM J. Matrix Anal.
Appl. 2023.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from unlearn.solvers.operators import MatVec, _as_operator

Array = jax.Array


class NystromApprox(NamedTuple):
    r"""Randomized Nyström approximation :math:`\hat A = U\operatorname{diag}(\lambda)U^\top`
    (``u``: ``(p, r)`` orthonormal columns; ``lam``: ``(r,)`` descending, :math:`\ge 0`)."""

    u: Array
    lam: Array


@jax.jit
def _nystrom_core(op: Partial, omega: Array) -> tuple[Array, Array]:
    omega, _ = jnp.linalg.qr(omega)  # (p, r) orthonormal test matrix
    y = jax.vmap(op, in_axes=1, out_axes=1)(omega)  # A Ω: one batched product
    eps = jnp.finfo(y.dtype).eps
    # shift for stability: √p·ε·‖Y‖₂, with ‖Y‖₂ from the r×r Gram matrix — jnp.linalg.norm(Y, 2)
    # (and svd(compute_uv=False)) of a tall (p, r) matrix allocates p×p on XLA's CPU backend:
    # 80 GB at p = 10⁵ (measured; tests/test_solvers.py checks the compiled memory)
    top = jnp.linalg.eigvalsh(y.T @ y)[-1]
    nu = jnp.sqrt(y.shape[0]) * eps * jnp.sqrt(jnp.maximum(top, 0.0))
    y_nu = y + nu * omega
    core = omega.T @ y_nu
    c = jnp.linalg.cholesky(0.5 * (core + core.T))  # Ω^T Y_ν = C C^T (lower)
    bmat = jax.scipy.linalg.solve_triangular(c, y_nu.T, lower=True).T  # Y_ν C^{-T}
    u, sig, _ = jnp.linalg.svd(bmat, full_matrices=False)
    lam = jnp.maximum(sig**2 - nu, 0.0)
    return u, lam


def nystrom(
    matvec: MatVec | Array, like: Array, rank: int, key: Array | None = None
) -> NystromApprox:
    r"""Randomized Nyström approximation of a PSD operator from ``rank`` products.

    Frangella, Tropp & Udell (2023), Alg. 2.1 (after Tropp et al. 2017): with an orthonormal
    Gaussian test matrix :math:`\Omega \in \mathbb R^{p\times r}`, :math:`Y = A\Omega` (one
    ``vmap``-ed operator call), a small shift :math:`\nu = \sqrt p\,\epsilon\lVert Y\rVert`,
    :math:`Y_\nu = Y + \nu\Omega`, :math:`C C^\top = \Omega^\top Y_\nu`,
    :math:`B = Y_\nu C^{-\top} = U\Sigma V^\top`, the approximation is
    :math:`U\max(\Sigma^2 - \nu, 0)U^\top`. Its error in expectation is within a small factor of
    the best rank-:math:`r` approximation's when the spectrum decays.
    """
    op = _as_operator(matvec)
    p = like.shape[-1]
    if not 0 < rank < p:
        raise ValueError(f"rank={rank} must be in [1, p={p}); for rank >= p use Cholesky.")
    key = jax.random.PRNGKey(0) if key is None else key
    omega = jax.random.normal(key, (p, int(rank)), like.dtype)
    u, lam = _nystrom_core(op, omega)
    if not np.all(np.isfinite(np.asarray(lam))):  # on the host: no eager compile
        raise ValueError("Nyström approximation is not finite: the operator is not PSD "
                         "(add damping or use the Gauss-Newton product).")
    return NystromApprox(u, lam)


def _nystrom_apply(u: Array, scale: Array, r: Array) -> Array:
    c = r @ u  # U^T r without a transposed copy of U
    return r + (c * (scale - 1.0)) @ u.T


def nystrom_preconditioner(approx: NystromApprox, shift: float | Array) -> Partial:
    r"""Nyström preconditioner for :math:`A + \mu I` (Frangella et al. 2023, eq. (5.3)).

    :math:`P^{-1} = (\hat\lambda_r + \mu)\,U(\hat\Lambda + \mu I)^{-1}U^\top + (I - UU^\top)`:
    the top-:math:`r` eigendirections are scaled to the level of :math:`\hat\lambda_r + \mu` and
    the complement is left alone (its eigenvalues lie in :math:`[\mu, \hat\lambda_r + \mu +
    \lVert A - \hat A\rVert]`). ``shift`` :math:`\mu` is the part of the system's diagonal not
    in ``approx``: the damping, and the L2 coefficient if :math:`\hat A` was built from the
    data term only. Must be :math:`> 0` unless every :math:`\hat\lambda > 0`.
    """
    lam = approx.lam
    mu = jnp.asarray(shift, lam.dtype)
    floor = jnp.finfo(lam.dtype).tiny
    scale = (lam[-1] + mu) / jnp.maximum(lam + mu, floor)
    return Partial(_nystrom_apply, approx.u, scale)
