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
  (the influence CG backends use it).
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

Layout: one concern per module, everything public re-exported here (``solvers.cg``,
``solvers.Solution``, ... are the names to use):

* ``solution`` — :class:`Solution` and what every solver shares: the true residual, the default
  tolerances, the warning on non-convergence;
* ``operators`` — what counts as an operator (a dense matrix, a factor, a callable);
* ``lanczos`` — Ritz pairs and extreme eigenvalues;
* ``cholesky`` — the dense factorisation and its LAPACK thread guard;
* ``conjugate_gradients`` — CG on one or many right-hand sides, the Jacobi preconditioner;
* ``block_cg`` — block CG with deflation;
* ``residual_replacement`` — the start and the restarts both CG loops share (``RESTARTS``:
  patch it there, this package's copy is for reading);
* ``randomized_nystrom`` — the Nyström approximation and preconditioner;
* ``neumann_series`` — LiSSA;
* this ``__init__`` — the solver objects :class:`Cholesky`, :class:`CG`, :class:`LiSSA` and the
  single entry point :func:`linear_solve` / :func:`solve`.

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

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from unlearn.curvature import dense_matvec
from unlearn.solvers.cholesky import (
    LAPACK_THREADED_LIMIT,
    CholeskyFactor,
    _cholesky_solve_checked,
    cholesky_factor,
    cholesky_solve,
    lapack_guard,
)
from unlearn.solvers.conjugate_gradients import cg, jacobi_preconditioner
from unlearn.solvers.lanczos import lanczos_extremes, lanczos_topk
from unlearn.solvers.neumann_series import lissa
from unlearn.solvers.operators import MatVec, _as_operator
from unlearn.solvers.randomized_nystrom import NystromApprox, nystrom, nystrom_preconditioner
from unlearn.solvers.residual_replacement import RESTARTS as RESTARTS
from unlearn.solvers.solution import Solution, _default_tol, _warn_if_not_converged
from unlearn.solvers.solution import _rel_residual as _rel_residual

Array = jax.Array

# Re-exported beyond __all__: RESTARTS (a copy for reading; patch it on residual_replacement)
# and _rel_residual (used by unlearn.inverse).
__all__ = [
    "Solution",
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
