r"""Inverse-curvature-vector products: dense Cholesky, (preconditioned, batched) CG and LiSSA.

Every solver solves :math:`(A + \lambda_d I)\,x = b` for a symmetric positive-definite curvature
:math:`A` (the Hessian or Gauss–Newton matrix of ``unlearn.curvature``) and damping
:math:`\lambda_d \ge 0`, and returns ONE type, :class:`Solution`: the solution, iterations and
the *true* relative residual :math:`\lVert b - (A + \lambda_d I)x\rVert / \lVert b\rVert`,
recomputed from the returned ``x`` (never the recursion's running estimate). Options live with
each solver, lineax-style: ``linear_solve(a, b, CG(tol=1e-8, precond=...), damping=...)``.

* :class:`Cholesky` / :func:`cholesky_factor` / :func:`cholesky_solve` — dense :math:`LL^\top`;
  factor once, then every request is two triangular solves. Above
  :data:`LAPACK_THREADED_LIMIT` the factorisation runs single-threaded: on this machine
  (2 cores, OpenBLAS 0.3.30/0.3.31 inside scipy/numpy wheels) the threaded ``potrf`` segfaults
  at p ≳ 23 000 while the single-threaded one works (``tests/test_solvers.py``, ``slow``).
* :class:`CG` / :func:`cg` — preconditioned conjugate gradients (Hestenes & Stiefel 1952) on a
  matrix-free operator (the HVP of Koh & Liang 2017). ``b`` may hold many right-hand sides
  ``(m, p)``: the whole ``lax.while_loop`` is ``vmap``-ed, so every iteration is ONE batched
  operator application (many test points, or many removal requests, in one solve).
  It never applies the operator to a compile-time zero: with JAX 0.10.2 on CPU an HVP whose
  tangent is a constant zero inside ``jit`` returns NaN for softmax regression at
  n >= 6000 (docs/architecture.md; not reproduced with this jaxlib build, see below), so
  starting from ``x0 = 0`` we take ``r0 = b`` and the iterate is ``0 * b`` (a runtime value).
* ``cg(..., block=True)`` — block PCG (O'Leary 1980): many right-hand sides in ONE Krylov space,
  directions re-orthonormalised and deflated each step (Dubrulle 2001): for 100 influence test
  gradients 6–8× fewer iterations than the vmapped :func:`cg` at the same cost per iteration
  (``influence.prepare_inverse`` uses it for its CG backends).
* :func:`nystrom` / :func:`nystrom_preconditioner` — the randomized Nyström approximation
  :math:`A \approx U\hat\Lambda U^\top` from ``rank`` operator products (one batched call) and
  the preconditioner of Frangella, Tropp & Udell (2023, eq. (5.3)),
  :math:`P^{-1} = (\hat\lambda_r + \mu)\,U(\hat\Lambda + \mu I)^{-1}U^\top + (I - UU^\top)`,
  which makes the condition number of :math:`P^{-1/2}(A + \mu I)P^{-1/2}` at most
  :math:`(\hat\lambda_r + \mu + \lVert A - \hat A\rVert)/\mu` — a handful of CG iterations
  once ``rank`` exceeds the effective dimension. Cached once by ``prepare``.
* :func:`lanczos_topk` — the top-``k`` Ritz pairs of a Krylov space (Lanczos with full
  re-orthogonalisation, i.e. the Arnoldi iteration of Schioppa et al. 2022 on a symmetric
  operator).
* :class:`LiSSA` / :func:`lissa` — the stochastic Neumann-series estimator of Agarwal, Bullins &
  Hazan (2017) in the form used by Koh & Liang (2017).
* :func:`linear_solve` — the single entry point: handles damping, warns on non-convergence and
  raises on non-PSD curvature with advice. :func:`solve` is the same with the solver named by a
  string and its options as keywords.

lineax (pinned at 0.1.1), measured here: its ``CG`` started from the default or from ``0 * b``
solves the softmax-regression HVP system at n = 6500 to 3e-12 (73 steps), inside ``jit`` and
with the operator closed over the data too, and a constant-zero-tangent HVP is finite at
n = 60 000, d = 784 in float32 and float64 — the JAX 0.10.2 bug does not reproduce with this
jaxlib build (``tests/test_solvers.py::test_lineax_cg_from_zero`` keeps the check). The solver
here stays our own because it needs what lineax's CG does not report: per-right-hand-side
iterations and true residuals under ``vmap``, and detection of non-positive curvature with a
suggested damping. lineax serves as the independent CG reference in the tests.

References: Hestenes & Stiefel, "Methods of conjugate gradients for solving linear systems",
1952. Frangella, Tropp & Udell, "Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl.
2023. Agarwal, Bullins & Hazan, "Second-order stochastic optimization for machine learning in
linear time", JMLR 2017. Koh & Liang, "Understanding black-box predictions via influence
functions", ICML 2017. Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling up influence functions",
AAAI 2022. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
differential and integral operators", 1950.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg.cython_lapack  # noqa: F401  (jaxlib's LAPACK: loaded so the guard sees it)
import threadpoolctl
from jax.tree_util import Partial

from unlearn.curvature import dense_matvec

Array = jax.Array
MatVec = Callable[[Array], Array]

__all__ = [
    "Solution",
    "SolveResult",
    "Cholesky",
    "CG",
    "LiSSA",
    "CholeskyFactor",
    "NystromApprox",
    "LAPACK_THREADED_LIMIT",
    "lapack_guard",
    "cholesky_factor",
    "cholesky_solve",
    "cg",
    "lissa",
    "lanczos_extremes",
    "lanczos_topk",
    "nystrom",
    "nystrom_preconditioner",
    "jacobi_preconditioner",
    "linear_solve",
    "solve",
]


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


SolveResult = Solution  # the name used before the options objects (kept for callers)

# Register so that ``method``/``message`` are static metadata: a Solution can be returned
# from a jitted function.
jax.tree_util.register_pytree_node(
    Solution,
    lambda r: ((r.x, r.iterations, r.residual, r.converged), (r.method, r.message)),
    lambda aux, ch: Solution(*ch, *aux),
)


def _is_concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


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


# --------------------------------------------------------------------------------------------
# Lanczos: extreme eigenvalue estimates for matrix-free operators
# --------------------------------------------------------------------------------------------


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
    :math:`\mathcal K_m(A, v_0)` and :math:`T = Q A Q^	op`; the Ritz pairs of :math:`T`
    (:math:`T = S\Theta S^	op`, vectors :math:`Q^	op S`) with the largest Ritz values
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


# --------------------------------------------------------------------------------------------
# Cholesky
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Conjugate gradients
# --------------------------------------------------------------------------------------------


def _start(apply: Callable[[Array], Array], b: Array, x0: Array | None) -> tuple[Array, Array]:
    """First iterate and residual. x0 = 0 is ``0 * b`` with ``r = b``: the operator is never
    applied to a compile-time zero (the JAX 0.10.2 bug in the module docstring)."""
    if x0 is None:
        return 0 * b, b
    x = jnp.asarray(x0, b.dtype)
    return x, b - apply(x)


def _apply_precond(precond: Partial | None, r: Array) -> Array:
    return r if precond is None else precond(r)


@jax.jit
def _cg_core(
    op: Partial,
    b: Array,
    x0: Array | None,
    tol: Array,
    maxiter: Array,
    precond: Partial | None,
) -> tuple[Array, Array, Array, Array, Array]:
    bnorm = jnp.linalg.norm(b)
    x, r = _start(op, b, x0)
    threshold = tol * bnorm

    def cond(state: tuple[Array, ...]) -> Array:
        _, r, _, _, k, neg = state
        return (k < maxiter) & (jnp.linalg.norm(r) > threshold) & ~neg

    def body(state: tuple[Array, ...]) -> tuple[Array, ...]:
        x, r, p, rz, k, _ = state
        ap = op(p)
        pap = jnp.vdot(p, ap)
        neg = ~(pap > 0)  # also catches NaN
        alpha = jnp.where(neg, 0.0, rz / jnp.where(neg, 1.0, pap))
        x = x + alpha * p
        r = r - alpha * ap
        z = _apply_precond(precond, r)
        rz_new = jnp.vdot(r, z)
        beta = rz_new / jnp.where(rz == 0, 1.0, rz)
        p = z + beta * p
        return x, r, p, rz_new, k + 1, neg

    def run(state: tuple[Array, ...]) -> tuple[Array, ...]:
        # One CG run from the iterate and its TRUE residual, which is then recomputed.
        x, r, k, neg, _, runs = state
        z = _apply_precond(precond, r)
        x, _, _, _, k, neg = jax.lax.while_loop(cond, body, (x, r, z, jnp.vdot(r, z), k, neg))
        r = b - op(x)
        return x, r, k, neg, jnp.linalg.norm(r), runs + 1

    x, r, k, neg, _, _ = jax.lax.while_loop(
        functools.partial(_run_again, threshold, maxiter), run,
        (x, r, jnp.asarray(0, jnp.int32), jnp.asarray(False), jnp.asarray(jnp.inf, b.dtype),
         jnp.asarray(0, jnp.int32)))
    res = _rel_norm(r, bnorm)
    converged = (res <= tol) & ~neg & jnp.all(jnp.isfinite(x))
    return x, k, res, converged, neg


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


def jacobi_preconditioner(diag: Array, damping: float = 0.0) -> Partial:
    """Jacobi preconditioner ``r -> r / (diag(A) + damping)`` (entries floored at tiny > 0)."""
    d = jnp.asarray(diag) + damping
    d = jnp.where(d > 0, d, jnp.finfo(d.dtype).tiny)
    return Partial(_jacobi_apply, 1.0 / d)


def _jacobi_apply(inv_diag: Array, r: Array) -> Array:
    return inv_diag * r


_cg_batched = jax.jit(jax.vmap(_cg_core.__wrapped__, in_axes=(None, 0, 0, None, None, None)))
_cg_batched_cold = jax.jit(
    jax.vmap(_cg_core.__wrapped__, in_axes=(None, 0, None, None, None, None)))


def _as_precond(precond: MatVec | Array | None) -> Partial | None:
    if precond is None:
        return None
    if isinstance(precond, NystromApprox):
        raise TypeError("pass nystrom_preconditioner(approx, shift), not the NystromApprox itself")
    if not callable(precond):
        return jacobi_preconditioner(precond)
    return precond if isinstance(precond, Partial) else Partial(precond)


def cg(
    matvec: MatVec | Array,
    b: Array,
    x0: Array | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
    precond: MatVec | Array | None = None,
    warn: bool = True,
    block: bool = False,
) -> Solution:
    r"""Preconditioned conjugate gradients for :math:`A x = b`, :math:`A` symmetric PD.

    A ``lax.while_loop`` over the Hestenes–Stiefel recursion: stop when the recursive residual
    :math:`\lVert r_k\rVert \le \mathrm{tol}\,\lVert b\rVert`, after ``maxiter`` steps, or when
    a direction of non-positive curvature :math:`p^\top A p \le 0` proves :math:`A` is not PD.
    The reported residual is recomputed as :math:`\lVert b - A x_k\rVert/\lVert b\rVert`;
    when the recursion stopped but that true residual is still above ``tol`` (they drift apart
    by ~eps·cond in float32), CG restarts from it, at most :data:`RESTARTS` times (residual
    replacement, van der Vorst & Ye 2000). ``iterations`` counts all runs.

    With ``b`` of shape ``(m, p)`` the solve is ``vmap``-ed over the ``m`` rows: one while
    loop whose every iteration applies the operator to all unconverged right-hand sides at once
    (a batched HVP, far cheaper per vector than ``m`` separate products); iterations, residual
    and convergence are reported per row.

    The default start ``x0 = 0`` is realised as ``r0 = b`` and ``x = 0 * b`` (runtime values),
    so the operator is never applied to a compile-time zero — see the module docstring.

    Args:
      matvec: ``v -> A v`` (a ``jax.tree_util.Partial`` from ``unlearn.curvature`` is traced
        as data; other callables are treated as static) or a dense matrix.
      b: right-hand side ``(p,)`` or right-hand sides ``(m, p)``.
      x0: optional warm start, same shape as ``b``.
      tol: relative tolerance; default ``1e-8`` in float64, ``1e-5`` in float32.
      maxiter: default ``10 * p``.
      precond: ``r -> M r`` with :math:`M \approx A^{-1}` (e.g. :func:`nystrom_preconditioner`),
        or an array read as the diagonal of :math:`A` (Jacobi).
      warn: warn (outside ``jit``) when not converged.
      block: solve the rows of ``b`` ``(m, p)``, ``1 <= m < p``, by block CG in ONE shared
        Krylov space instead of one CG per row (below).

    **Block CG** (``block=True``; O'Leary 1980). Each iteration applies the operator to ``m``
    search directions at once (one batched product, the cost of one iteration of the vmapped
    CG) but takes the Galerkin step on their whole span, so every right-hand side gains from
    the directions of all the others: the space after :math:`k` steps has dimension up to
    :math:`km`, and the eigen-directions the right-hand sides share (the top of a network's
    curvature spectrum) are found once for all. With :math:`D` the current directions (rows)
    and :math:`Q = DA`, :math:`X \mathrel{+}= \alpha^\top D`,
    :math:`\alpha = (DQ^\top)^{-1}DR^\top`; the new directions are :math:`Z - \beta^\top D`
    with :math:`Z = RM` and :math:`\beta = (DQ^\top)^{-1}QZ^\top` (A-conjugate to :math:`D`),
    re-orthonormalised by a QR factorisation each step, which keeps :math:`DQ^\top` as well
    conditioned as :math:`A` itself; directions that are (to :math:`\sqrt{\epsilon}`)
    combinations of the others — linearly dependent right-hand sides, duplicated test points,
    converged rows — are deflated (zeroed) instead of normalised rounding noise, which would
    break the conjugacy to earlier blocks (the breakdown of the plain block recursion;
    Dubrulle 2001). Measured (``benchmarks/influence_peers.py``, MLP p = 25 450, 100 test
    gradients, tol 1e-3): 13 iterations unpreconditioned against 106 for the vmapped CG, 11
    against 27 with a rank-100 Nyström preconditioner; the same scores (Pearson 0.99995 with
    the exact inverse). It stops when every row's residual is below ``tol``, after
    ``maxiter`` steps, or when :math:`DQ^\top` is not positive definite (the operator is not
    PD on the Krylov space: reported in ``message``); ``iterations`` is the block count for
    every row. References: O'Leary, "The block conjugate gradient algorithm and related
    methods", Linear Algebra Appl. 1980. Dubrulle, "Retooling the method of block conjugate
    gradients", Electron. Trans. Numer. Anal. 2001.

    Returns:
      :class:`Solution` with ``method='cg'`` (``'block-cg'`` with ``block=True``).
    """
    b = jnp.asarray(b)
    if b.ndim not in (1, 2):
        raise ValueError(f"b must be (p,) or (m, p) right-hand sides; got shape {b.shape}")
    if block and (b.ndim != 2 or not 1 <= b.shape[0] < b.shape[1]):
        raise ValueError(f"block=True needs right-hand sides as rows (m, p) with 1 <= m < p; "
                         f"got shape {b.shape} (use block=False)")
    if x0 is not None and jnp.shape(x0) != b.shape:
        raise ValueError(f"x0 has shape {jnp.shape(x0)}; it must match b's {b.shape}")
    op = _as_operator(matvec)
    p = b.shape[-1]
    tol = _default_tol(b.dtype, "cg") if tol is None else tol
    maxiter = 10 * p if maxiter is None else maxiter
    pre = _as_precond(precond)
    args = (jnp.asarray(tol, b.dtype), jnp.asarray(maxiter, jnp.int32), pre)
    x0 = None if x0 is None else jnp.asarray(x0, b.dtype)
    if block:
        core = _block_cg_core
    else:
        core = _cg_core if b.ndim == 1 else _cg_batched_cold if x0 is None else _cg_batched
    x, k, res, conv, neg = core(op, b, x0, *args)
    message = ""
    if _is_concrete(neg) and np.any(np.asarray(neg)):
        message = ("non-positive curvature (D A D^T not positive definite on the Krylov space)"
                   if block else "non-positive curvature p^T A p <= 0 met") + \
            ": the operator is not positive definite"
    result = Solution(x, k, res, conv, "block-cg" if block else "cg", message)
    if warn:
        _warn_if_not_converged(result)
    return result


def _orth_rows(y: Array) -> tuple[Array, Array]:
    """Orthonormal rows spanning the rows of ``y`` ``(m, p)``, with the rows that are (to
    sqrt(eps)) combinations of earlier ones, or zero, set to zero (deflation), and their mask."""
    q, r = jnp.linalg.qr(y.T)
    tau = jnp.sqrt(jnp.finfo(y.dtype).eps)
    keep = jnp.abs(jnp.diagonal(r)) > tau * jnp.linalg.norm(y, axis=1)
    return q.T * keep[:, None], keep


@jax.jit
def _block_cg_core(
    op: Partial,
    b: Array,
    x0: Array | None,
    tol: Array,
    maxiter: Array,
    precond: Partial | None,
) -> tuple[Array, Array, Array, Array, Array]:
    """Block PCG on the rows of ``b`` ``(m, p)`` (``cg(..., block=True)``)."""
    apply = jax.vmap(op)
    pre = (lambda r: r) if precond is None else jax.vmap(precond)
    bnorm = jnp.linalg.norm(b, axis=1)
    x, r = _start(apply, b, x0)
    threshold = tol * bnorm

    def cond(state: tuple[Array, ...]) -> Array:
        _, r, _, _, k, bad = state
        return (k < maxiter) & jnp.any(jnp.linalg.norm(r, axis=1) > threshold) & ~bad

    def body(state: tuple[Array, ...]) -> tuple[Array, ...]:
        x, r, d, keep, k, _ = state
        q = apply(d)  # ONE batched product: m operator applications
        dq = d @ q.T + jnp.diag(jnp.where(keep, 0.0, 1.0).astype(d.dtype))  # 1 on deflated
        chol = jnp.linalg.cholesky(0.5 * (dq + dq.T))  # D A D^T: SPD iff A is on span(D)
        bad = ~jnp.all(jnp.isfinite(chol))
        solve = functools.partial(jax.scipy.linalg.cho_solve, (chol, True))
        alpha = solve(d @ r.T)  # Galerkin step on span(D)
        x_new = x + alpha.T @ d
        r_new = r - alpha.T @ q
        z = pre(r_new)
        beta = solve(q @ z.T)  # new directions A-conjugate to D
        d_new, keep_new = _orth_rows(z - beta.T @ d)
        old = lambda new, prev: jnp.where(bad, prev, new)  # noqa: E731
        return (old(x_new, x), old(r_new, r), old(d_new, d), old(keep_new, keep), k + 1,
                bad)

    def run(state: tuple[Array, ...]) -> tuple[Array, ...]:
        # One block run from the iterate and its TRUE residual (residual replacement, as cg).
        x, r, k, bad, _, runs = state
        d, keep = _orth_rows(pre(r))  # (m, p): orthonormal or zero (deflated) rows
        x, _, _, _, k, bad = jax.lax.while_loop(cond, body, (x, r, d, keep, k, bad))
        r = b - apply(x)
        return x, r, k, bad, jnp.linalg.norm(r, axis=1), runs + 1

    x, r, k, bad, _, _ = jax.lax.while_loop(
        functools.partial(_run_again, threshold, maxiter), run,
        (x, r, jnp.asarray(0, jnp.int32), jnp.asarray(False),
         jnp.full(b.shape[0], jnp.inf, b.dtype), jnp.asarray(0, jnp.int32)))
    res = _rel_norm(r, bnorm)
    converged = (res <= tol) & ~bad & jnp.all(jnp.isfinite(x), axis=1)
    return x, jnp.broadcast_to(k, res.shape), res, converged, bad  # the block count per row


# --------------------------------------------------------------------------------------------
# Randomized Nyström preconditioner
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# LiSSA
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("depth", "repeats", "stochastic"))
def _lissa_core(
    op: Partial,
    stoch: Partial | None,
    b: Array,
    scale: Array,
    damping: Array,
    key: Array,
    depth: int,
    repeats: int,
    stochastic: bool,
) -> tuple[Array, Array, Array]:
    def one_repeat(rkey: Array) -> tuple[Array, Array, Array]:
        def step(x: Array, j: Array) -> tuple[Array, Array]:
            hx = stoch(x, jax.random.fold_in(rkey, j)) if stochastic else op(x)
            x_new = b + (1 - damping) * x - hx / scale
            return x_new, jnp.linalg.norm(x_new - x)

        x, steps = jax.lax.scan(step, b, jnp.arange(depth))
        return x / scale, steps[0], steps[-1]

    keys = jax.random.split(key, repeats)
    xs, first, last = jax.lax.map(one_repeat, keys)
    return jnp.mean(xs, axis=0), first, last


def lissa(
    matvec: MatVec | Array,
    b: Array,
    scale: float,
    damping: float = 0.0,
    depth: int = 1000,
    repeats: int = 1,
    key: Array | None = None,
    stochastic_matvec: Callable[[Array, Array], Array] | None = None,
    tol: float | None = None,
    check_scale: bool = True,
    warn: bool = True,
) -> Solution:
    r"""LiSSA estimate of :math:`(H + \text{damping}\cdot\text{scale}\cdot I)^{-1} b`.

    The recursion of Agarwal et al. (2017) as implemented by Koh & Liang (2017):

    .. math::

        x_0 = b, \qquad x_j = b + (1 - d)\,x_{j-1} - \frac{H x_{j-1}}{s}, \qquad
        \hat x = x_{\text{depth}} / s,

    a truncated Neumann series for :math:`(H/s + dI)^{-1}`; its fixed point gives
    :math:`\hat x = (H + d s I)^{-1} b`. The error contracts by
    :math:`\rho = \max_\lambda |1 - d - \lambda/s|` per step, so it converges iff
    :math:`0 < d + \lambda/s < 2` for every eigenvalue :math:`\lambda` of :math:`H`: the scale
    must exceed the largest eigenvalue (practically :math:`s > \lambda_{\max}`) and :math:`H`
    must be PSD (or :math:`d` large enough). The estimate is averaged over ``repeats``
    recursions; with ``stochastic_matvec(v, key)`` (e.g. an HVP on a sampled minibatch) each
    step uses a fresh key, otherwise every repeat is the same deterministic recursion.

    Divergence checks: before running, ``scale`` is compared with a Lanczos estimate of
    :math:`\lambda_{\max}` (``check_scale``) and a ``ValueError`` suggests a larger scale;
    after running, a non-finite result or a last step longer than the first
    (:math:`\lVert x_D - x_{D-1}\rVert > \lVert x_1 - x_0\rVert`, which for a deterministic
    symmetric recursion proves :math:`\rho > 1`) marks the result ``converged=False``.

    Args:
      matvec: deterministic ``v -> H v`` (also used for the final residual) or a dense matrix.
      b: right-hand side.
      scale: :math:`s`, larger than the largest eigenvalue of :math:`H`.
      damping: :math:`d` in the recursion (adds :math:`d s` to the diagonal of the system).
      depth: recursion steps.
      repeats: independent recursions averaged.
      key: PRNG key for ``stochastic_matvec`` (default ``PRNGKey(0)``).
      stochastic_matvec: optional ``(v, key) -> H_batch v``.
      tol: residual tolerance for ``converged`` (default ``1e-3``; LiSSA is approximate).
      check_scale: run the Lanczos scale check (30 products) first.
      warn: warn (outside ``jit``) when not converged.
    """
    b = jnp.asarray(b)
    op = _as_operator(matvec)
    tol = _default_tol(b.dtype, "lissa") if tol is None else tol
    if check_scale and _is_concrete(b, scale):
        _, lam_max = lanczos_extremes(op, b, steps=min(30, b.shape[0]))
        if scale <= lam_max:
            raise ValueError(
                f"LiSSA would diverge: scale={scale:g} is not larger than the largest "
                f"eigenvalue of the curvature (Lanczos estimate {lam_max:.4e}); the recursion "
                f"contracts only if scale > lambda_max. Use a larger scale, e.g. "
                f"scale={1.5 * lam_max:.3e}."
            )
    stochastic = stochastic_matvec is not None
    stoch = None
    if stochastic:
        stoch = (
            stochastic_matvec
            if isinstance(stochastic_matvec, Partial)
            else Partial(stochastic_matvec)
        )
    key = jax.random.PRNGKey(0) if key is None else key
    dtype = b.dtype
    x, first, last = _lissa_core(
        op,
        stoch,
        b,
        jnp.asarray(scale, dtype),
        jnp.asarray(damping, dtype),
        key,
        depth=int(depth),
        repeats=int(repeats),
        stochastic=stochastic,
    )
    system = Partial(_damped, op, jnp.asarray(damping * scale, dtype))
    res = _rel_residual(system, x, b)
    growth = 100.0 if stochastic else 1.0
    diverged = ~jnp.all(jnp.isfinite(x)) | jnp.any(last > growth * first)
    converged = (res <= tol) & ~diverged
    message = ""
    if _is_concrete(diverged) and bool(diverged):
        message = (
            "LiSSA diverged (the recursion's steps grew or became non-finite): increase "
            f"scale (now {scale:g}) above the largest eigenvalue of the curvature, or add "
            "damping if the curvature is not positive semi-definite"
        )
    result = Solution(x, jnp.asarray(depth), res, converged, "lissa", message)
    if warn:
        _warn_if_not_converged(result)
    return result


# --------------------------------------------------------------------------------------------
# Solver options (lineax-style) and the single entry point
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cholesky:
    """Dense Cholesky on a matrix (or an existing :class:`CholeskyFactor`).

    ``tol``: residual tolerance for ``converged`` (default 1e-8 in float64, 1e-4 in float32).
    """

    tol: float | None = None


@dataclasses.dataclass(frozen=True)
class CG:
    """Preconditioned CG (:func:`cg`): ``tol``, ``maxiter``, ``precond`` (an operator such as
    :func:`nystrom_preconditioner`, the diagonal as an array, or ``'jacobi'`` for a dense
    matrix), an optional warm start ``x0`` and ``block`` (block CG over the rows of ``b``)."""

    tol: float | None = None
    maxiter: int | None = None
    precond: Any = None
    x0: Array | None = None
    block: bool = False


@dataclasses.dataclass(frozen=True)
class LiSSA:
    """LiSSA (:func:`lissa`): ``scale=None`` picks 1.5 × a Lanczos estimate of
    :math:`\\lambda_{\\max}` of the damped operator; the recursion's own damping is set to
    :math:`\\lambda_d / s` so every solver solves the same system."""

    scale: float | None = None
    depth: int = 1000
    repeats: int = 1
    key: Array | None = None
    stochastic_matvec: Callable[[Array, Array], Array] | None = None
    tol: float | None = None


_SOLVERS: dict[str, type] = {"cholesky": Cholesky, "cg": CG, "lissa": LiSSA}


def _check_damping(op: Partial, b: Array, damping: float) -> None:
    """With damping > 0, warn if the undamped curvature has a negative eigenvalue."""
    lo, hi = lanczos_extremes(op, b, steps=min(20, b.shape[0]))
    eps = float(jnp.finfo(b.dtype).eps)
    if lo < -np.sqrt(eps) * max(abs(hi), 1e-30):
        status = (
            "the damped matrix is still indefinite"
            if damping <= -lo
            else "the damped system is positive definite"
        )
        warnings.warn(
            f"the curvature is not PSD: most negative eigenvalue estimate {lo:.4e} (Lanczos); "
            f"damping={damping:g} added, {status}. The solution is that of the damped system.",
            RuntimeWarning,
            stacklevel=4,
        )


def _not_pd_error(op: Partial, b: Array, damping: float, method: str) -> ValueError:
    lo, _ = lanczos_extremes(op, b, steps=min(40, b.shape[0]))
    need = max(-lo, 0.0)
    return ValueError(
        f"{method}: the curvature plus damping={damping:g} is not positive definite (most "
        f"negative eigenvalue estimate {lo:.4e}, Lanczos). Pass damping= larger than "
        f"{need:.3e} (e.g. damping={1.1 * need + 1e-8:.3e}) or use the Gauss-Newton product "
        "(unlearn.curvature.ggn_vp), which is always PSD."
    )


def linear_solve(
    a: Array | MatVec | CholeskyFactor,
    b: Array,
    solver: Cholesky | CG | LiSSA | None = None,
    *,
    damping: float = 0.0,
    check_curvature: bool = True,
) -> Solution:
    r"""Solve :math:`(A + \lambda_d I)\,x = b` with the given solver (options object).

    Args:
      a: a dense symmetric matrix, a ``v -> A v`` operator (e.g. ``curvature.hvp(...)``) or a
        :class:`CholeskyFactor` (already damped; ``damping`` must then be 0).
      b: right-hand side ``(p,)``; CG also takes right-hand sides as rows ``(m, p)``, Cholesky
        as columns ``(p, m)``.
      solver: :class:`Cholesky` (default), :class:`CG` or :class:`LiSSA`.
      damping: :math:`\lambda_d \ge 0` added to the diagonal. When positive and
        ``check_curvature``, a Lanczos estimate of the most negative eigenvalue of the
        undamped :math:`A` is taken and a warning reports it if :math:`A` is indefinite.
      check_curvature: run the PSD / LiSSA-scale checks.

    Returns:
      :class:`Solution`; a warning is issued if it did not converge.

    Raises:
      ValueError: if the (damped) curvature is not positive definite — Cholesky breakdown or a
        CG direction with :math:`p^\top A p \le 0` — with the most negative eigenvalue and a
        suggested ``damping=``; if LiSSA diverges (suggests a larger ``scale``).
      TypeError: unknown solver object.
    """
    solver = Cholesky() if solver is None else solver
    if not isinstance(solver, (Cholesky, CG, LiSSA)):
        raise TypeError(f"solver={solver!r}: pass solvers.Cholesky(), solvers.CG(...) or "
                        "solvers.LiSSA(...)")
    b = jnp.asarray(b)
    if isinstance(a, CholeskyFactor) and damping:
        raise ValueError("a CholeskyFactor is already damped; pass damping=0 with a factor")
    dense = not callable(a) and not isinstance(a, CholeskyFactor)
    undamped = _as_operator(a)
    first = b if b.ndim == 1 else (b[0] if isinstance(solver, CG) else b[:, 0])
    if damping and check_curvature:
        _check_damping(undamped, first, damping)
    op = _as_operator(a, damping) if not dense else dense_matvec(jnp.asarray(a), damping)

    if isinstance(solver, Cholesky):
        if isinstance(a, CholeskyFactor):
            factor = a
        elif dense:
            factor = cholesky_factor(jnp.asarray(a), damping)
        else:
            raise ValueError(
                "solvers.Cholesky needs a dense matrix or a CholeskyFactor; use solvers.CG() "
                "for a matrix-free operator (or curvature.hessian to build the matrix)"
            )
        tol = _default_tol(b.dtype, "cholesky") if solver.tol is None else solver.tol
        x, res, conv = _cholesky_solve_checked(factor, b, jnp.asarray(tol, b.dtype))
        result = Solution(x, jnp.asarray(0), res, conv, "cholesky")
        _warn_if_not_converged(result)
        return result

    if isinstance(solver, CG):
        precond = solver.precond
        if isinstance(precond, str):
            if precond != "jacobi" or not dense:
                raise ValueError("precond='jacobi' needs a dense matrix; pass the diagonal")
            precond = jacobi_preconditioner(jnp.diag(jnp.asarray(a)), damping)
        result = cg(op, b, x0=solver.x0, tol=solver.tol, maxiter=solver.maxiter,
                    precond=precond, warn=False, block=solver.block)
        if result.message and check_curvature:
            raise _not_pd_error(undamped, first, damping, "cg") from None
        _warn_if_not_converged(result)
        return result

    scale = solver.scale
    if scale is None:
        _, lam_max = lanczos_extremes(op, b, steps=min(30, b.shape[0]))
        scale = 1.5 * lam_max
    result = lissa(
        undamped,
        b,
        scale=scale,
        damping=damping / scale,
        depth=solver.depth,
        repeats=solver.repeats,
        key=solver.key,
        stochastic_matvec=solver.stochastic_matvec,
        tol=solver.tol,
        check_scale=check_curvature,
        warn=False,
    )
    if result.message:
        raise ValueError(result.message)
    _warn_if_not_converged(result)
    return result


def solve(
    a: Array | MatVec | CholeskyFactor,
    b: Array,
    method: str = "cholesky",
    *,
    damping: float = 0.0,
    check_curvature: bool = True,
    **options: Any,
) -> Solution:
    """:func:`linear_solve` with the solver named (``'cholesky'``, ``'cg'``, ``'lissa'``) and
    its options as keywords (the fields of :class:`Cholesky`, :class:`CG`, :class:`LiSSA`).

    Raises ``ValueError`` for an unknown method or an option the chosen solver does not take.
    """
    name = method.lower()
    if name not in _SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose 'cholesky', 'cg' or 'lissa'")
    cls = _SOLVERS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"method={name!r} takes the options {sorted(fields)}; got "
                         f"{unknown} (options of another solver?)")
    return linear_solve(a, b, cls(**options), damping=damping, check_curvature=check_curvature)
