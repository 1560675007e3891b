r"""Newton removal and influence functions for strictly convex (softmax-regression) models.

Objective (mean-normalised, as in :mod:`unlearn.train`): for retained examples :math:`R`,

.. math::

    L(\theta; R) = \frac{1}{|R|}\sum_{i\in R}\ell_i(\theta)
                   + \frac{\lambda}{2}\lVert\theta\rVert^2 .

**Newton removal** (Guo et al. 2020, "Certified Data Removal from Machine Learning Models",
ICML, eq. (1)/§3): removing the set :math:`U` (:math:`|U| = k`) from :math:`D` (:math:`|D| = n`)
in one step,

.. math::

    \theta^- = \theta^* - H_r^{-1}\,\nabla L(\theta^*; D\setminus U), \qquad
    H_r = \nabla^2 L(\theta^*; D\setminus U) .

*Cached factor + Woodbury downdate.* With :math:`G_U = \sum_{i\in U}\nabla^2\ell_i(\theta^*)`
and :math:`H_D = \nabla^2 L(\theta^*; D)`, the mean normalisation gives

.. math::

    H_r = \frac{n (H_D - \lambda I) - G_U}{n - k} + \lambda I
    \quad\Longleftrightarrow\quad
    \tfrac{n-k}{n}\,(H_r + \lambda_d I) = \underbrace{A - V V^\top / n}_{B} - \delta I,

where :math:`A = H_D + \lambda_d I` (factored once, :math:`A = LL^\top`), :math:`\lambda_d` the
damping, :math:`\delta = k(\lambda + \lambda_d)/n`, and :math:`G_U = VV^\top`. For softmax
regression :math:`\nabla^2\ell_i = J_i^\top(\operatorname{diag}p_i - p_ip_i^\top)J_i` with
:math:`J_i` the (constant) Jacobian of the logits, and
:math:`\operatorname{diag}p - pp^\top = C C^\top` with :math:`C = \operatorname{diag}\sqrt p -
p\sqrt p^\top` (uses :math:`\sum_k p_k = 1`), so :math:`V_i = J_i^\top C_i` has :math:`K` columns
(rank :math:`\le K-1`), computed by ``vjp``. :math:`B^{-1}` is the Woodbury identity
:math:`A^{-1} + A^{-1}V(nI - V^\top A^{-1}V)^{-1}V^\top A^{-1}` — products with the cached
:math:`A^{-1}` (formed once from :math:`L`) plus a :math:`kK\times kK` Cholesky. The
remaining diagonal shift :math:`\delta I` is not low rank; it is removed exactly by the
fixed-point iteration
:math:`x \leftarrow B^{-1}(s g + \delta x)` (:math:`s = (n-k)/n`), which contracts with rate
:math:`\delta/\lambda_{\min}(B) \le k/n` (because :math:`B \succeq (\lambda+\lambda_d)I`), i.e.
a handful of extra matrix-vector products. A request therefore costs one gradient and
:math:`O(p^2 kK)` work instead of an :math:`O(p^3)` factorisation.

**Influence functions** (Koh & Liang 2017, "Understanding Black-box Predictions via Influence
Functions", ICML, eq. (2)):
:math:`\mathcal I_{\text{up,loss}}(z, z_{\text{test}}) = -\nabla\ell(z_{\text{test}})^\top
H^{-1}\nabla\ell(z)` — one solve :math:`s_{\text{test}} = H^{-1}\nabla\ell(z_{\text{test}})`
per test point, then per-example gradients by ``vmap``. *Leave-one-out prediction for the
mean-normalised objective:* since :math:`\nabla L(\theta^*; D) = 0`, one Newton step for
:math:`D\setminus\{z\}` is :math:`\Delta\theta = H^{-1}(\nabla\ell(z) + \lambda\theta^*)/(n-1)`,
so

.. math::

    \Delta\ell_{\text{test}} \approx \frac{\nabla\ell_{\text{test}}^\top H^{-1}
    (\nabla\ell(z) + \lambda\theta^*)}{n-1}
    = -\frac{\mathcal I_{\text{up,loss}}(z, z_{\text{test}}) - \lambda\, s_{\text{test}}^\top
    \theta^*}{n - 1}.

Koh & Liang's :math:`-\mathcal I/n` is the same up to :math:`O(1/n^2)` when the regulariser is
counted per example; with a fixed :math:`\lambda` and a mean over the data, removing a point
also re-weights the regulariser, which is the :math:`\lambda s_{\text{test}}^\top\theta^*` term
(:func:`loo_test_loss_change`, ``correct_regulariser=False`` gives the plain :math:`-\mathcal
I/n`). Checked against real leave-one-out retraining in ``experiments/influence_loo.py``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from unlearn import curvature, solvers

Array = jax.Array
Params = Any
Apply = Callable[[Params, Array], Array]

__all__ = [
    "NewtonFactor",
    "full_hessian",
    "newton_factor",
    "removed_curvature_factor",
    "woodbury_solve",
    "retained_gradient",
    "newton_step",
    "influence_up_loss",
    "loo_test_loss_change",
    "example_gradients",
]


# --------------------------------------------------------------------------------------------
# Dense Hessian and the cached factor
# --------------------------------------------------------------------------------------------


def full_hessian(apply: Apply, params: Params, x: Array, y: Array, w: Array,
                 l2: float) -> Array:
    """Dense :math:`\\nabla^2 L(\\theta; w)` over the flat params.

    The closed softmax-regression form (``curvature.softmax_regression_hessian``) when the
    params are one ``(d, K)`` kernel and one ``(K,)`` bias, otherwise the chunked
    ``curvature.hessian``.
    """
    leaves = jax.tree.leaves(params)
    shapes = sorted(np.ndim(a) for a in leaves)
    if len(leaves) == 2 and shapes == [1, 2]:
        return curvature.softmax_regression_hessian(params, x, w, l2)
    return curvature.hessian(apply, params, x, y, w, l2)


class NewtonFactor(NamedTuple):
    r"""Cholesky factor :math:`L` and explicit inverse of :math:`A = H_D + \lambda_d I` at the
    anchor params.

    ``inv`` = :math:`A^{-1}` (formed once from :math:`L`) turns every per-request solve into
    matrix-vector products: on XLA's CPU backend a triangular solve of one vector is ~30× slower
    than a matvec of the same size. ``n`` is :math:`\sum w` at factor time; ``l2`` and
    ``damping`` are :math:`\lambda` and :math:`\lambda_d`.
    """

    chol: Array
    inv: Array
    n: float
    l2: float
    damping: float


@jax.jit
def _inverse_from_cholesky(chol: Array) -> Array:
    eye = jnp.eye(chol.shape[0], dtype=chol.dtype)
    inv = jax.scipy.linalg.cho_solve((chol, True), eye)
    return 0.5 * (inv + inv.T)


def newton_factor(apply: Apply, params: Params, x: Array, y: Array, w: Array, l2: float,
                  damping: float = 0.0) -> NewtonFactor:
    r"""Factor :math:`H_D + \lambda_d I = LL^\top` once (``solvers.cholesky_factor``) and form
    its inverse.

    Raises ``ValueError`` (from the solver) with a suggested ``damping=`` if not PD.
    """
    h = full_hessian(apply, params, x, y, w, l2)
    fac = solvers.cholesky_factor(h, damping)
    del h
    return NewtonFactor(fac.factor, _inverse_from_cholesky(fac.factor),
                        float(np.sum(np.asarray(w))), float(l2), float(damping))


# --------------------------------------------------------------------------------------------
# Low-rank factor of the removed points' curvature
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("apply",))
def removed_curvature_factor(apply: Apply, params: Params, x: Array) -> Array:
    r"""``V`` of shape ``(p, m K)`` with :math:`VV^\top = \sum_i J_i^\top(\operatorname{diag}
    p_i - p_ip_i^\top)J_i` over the rows of ``x``.

    That is the Gauss–Newton matrix of the cross-entropy summed over the given examples, which
    equals :math:`\sum_i\nabla^2\ell_i` exactly when the logits are linear in :math:`\theta`
    (softmax regression). :math:`V_i = J_i^\top C_i`, :math:`C_i = \operatorname{diag}\sqrt{p_i}
    - p_i\sqrt{p_i}^\top`, each column a ``vjp`` of the logits.
    """
    theta, unravel = ravel_pytree(params)

    def one(xi: Array) -> Array:
        f = lambda t: apply(unravel(t), xi[None])[0]  # noqa: E731
        logits, vjp = jax.vjp(f, theta)
        p = jax.nn.softmax(logits.astype(theta.dtype))
        sp = jnp.sqrt(p)
        c = jnp.diag(sp) - p[:, None] * sp[None, :]  # (K, K), C C^T = diag p - p p^T
        return jax.vmap(lambda col: vjp(col.astype(logits.dtype))[0])(c.T)  # (K, p)

    v = jax.vmap(one)(x)  # (m, K, p)
    return v.reshape(-1, theta.size).T


# --------------------------------------------------------------------------------------------
# Woodbury downdate with exact diagonal-shift correction
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("maxiter",))
def _woodbury_core(chol: Array, inv: Array, v: Array, n: Array, k: Array, lam: Array, g: Array,
                   tol: Array, maxiter: int):
    r = v.shape[1]
    wv = inv @ v  # A^{-1} V
    cap = n * jnp.eye(r, dtype=chol.dtype) - v.T @ wv
    lc = jnp.linalg.cholesky(0.5 * (cap + cap.T))

    def b_inv(rhs: Array) -> Array:  # (A - V V^T / n)^{-1} rhs, Woodbury
        return inv @ rhs + wv @ jax.scipy.linalg.cho_solve((lc, True), wv.T @ rhs)

    def b_mv(u: Array) -> Array:  # (A - V V^T / n) u
        return chol @ (chol.T @ u) - v @ (v.T @ u) / n

    s = (n - k) / n
    delta = k * lam / n
    x0 = b_inv(s * g)

    def cond(c):
        _, dx, it = c
        return (it < maxiter) & (dx > 0)

    def body(c):
        x, _, it = c
        xn = b_inv(s * g + delta * x)
        dx = jnp.linalg.norm(xn - x)
        dx = jnp.where(dx <= tol * jnp.linalg.norm(xn), 0.0, dx)
        return xn, dx, it + 1

    x, _, it = jax.lax.while_loop(cond, body, (x0, jnp.asarray(1.0, g.dtype), 0))
    # (H_r + damping) x = (B x - delta x) / s ; true relative residual against g.
    hx = (b_mv(x) - delta * x) / s
    res = jnp.linalg.norm(hx - g) / jnp.maximum(jnp.linalg.norm(g), jnp.finfo(g.dtype).tiny)
    finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(lc))
    return x, it, res, finite


def woodbury_solve(factor: NewtonFactor, v: Array, k: int, g: Array, *, tol: float | None = None,
                   maxiter: int = 200) -> solvers.SolveResult:
    r"""Solve :math:`(H_r + \lambda_d I)x = g` from the cached factor of :math:`H_D+\lambda_dI`.

    ``v`` is :func:`removed_curvature_factor` of the ``k`` removed examples (at the anchor
    params). See the module docstring for the algebra; ``iterations`` counts the shift
    corrections (rate :math:`\le k/n`), ``residual`` is
    :math:`\lVert(H_r+\lambda_dI)x - g\rVert/\lVert g\rVert` with :math:`H_r` reconstructed from
    the factor.
    """
    g = jnp.asarray(g)
    if not 0 <= k < factor.n:
        raise ValueError(f"k={k} removed examples must be in [0, n={factor.n:g}).")
    dtype = g.dtype
    tol = (1e-13 if dtype == jnp.float64 else 1e-6) if tol is None else tol
    x, it, res, finite = _woodbury_core(
        factor.chol, factor.inv, jnp.asarray(v, dtype), jnp.asarray(factor.n, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(factor.l2 + factor.damping, dtype), g, jnp.asarray(tol, dtype), maxiter)
    if not bool(finite):
        raise ValueError(
            "Woodbury downdate failed: the retained Hessian is not positive definite at the "
            "anchor params (capacitance matrix not PD). Pass damping > 0 or refactor.")
    ftol = 1e-8 if dtype == jnp.float64 else 1e-3
    conv = bool(res <= ftol) and int(it) < maxiter
    return solvers.SolveResult(x, it, res, jnp.asarray(conv), "woodbury")


# --------------------------------------------------------------------------------------------
# Newton removal
# --------------------------------------------------------------------------------------------


def retained_gradient(apply: Apply, params: Params, x: Array, y: Array, w: Array,
                      l2: float) -> Array:
    r""":math:`\nabla L(\theta; w)` as a flat vector (``curvature.flat_grad``)."""
    return curvature.flat_grad(apply, params, x, y, w, l2)


def newton_step(
    apply: Apply,
    params: Params,
    x: Array,
    y: Array,
    w: Array,
    l2: float,
    *,
    solver: str = "exact",
    damping: float = 0.0,
    factor: NewtonFactor | None = None,
    removed_x: Array | None = None,
    anchor: Params | None = None,
    grad: Array | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
    lissa_depth: int = 1000,
    lissa_scale: float | None = None,
    key: Array | None = None,
) -> tuple[Params, solvers.SolveResult]:
    r"""One Newton step :math:`\theta - (H_r+\lambda_dI)^{-1}\nabla L(\theta; w)` on the
    retained objective (weights ``w``).

    ``solver``: ``exact`` — with ``factor`` (of the full-data Hessian at ``anchor``) and
    ``removed_x`` (the examples removed since), a Woodbury-downdated solve with the Hessian at
    ``anchor``; without a factor, a fresh dense Hessian at ``params`` and a Cholesky solve.
    ``cg`` / ``lissa`` — matrix-free on the HVP at ``params`` (``solvers.solve``). ``grad``
    may pass a precomputed gradient.
    """
    theta, unravel = ravel_pytree(params)
    g = retained_gradient(apply, params, x, y, w, l2) if grad is None else grad
    if solver == "exact":
        if factor is not None:
            if anchor is None or removed_x is None:
                raise ValueError("solver='exact' with a factor needs anchor= and removed_x=.")
            v = removed_curvature_factor(apply, anchor, removed_x)
            res = woodbury_solve(factor, v, int(removed_x.shape[0]), g, tol=tol)
            if not bool(res.converged):
                warnings.warn(f"Woodbury solve: relative residual {float(res.residual):.2e}",
                              RuntimeWarning, stacklevel=2)
        else:
            h = full_hessian(apply, params, x, y, w, l2)
            res = solvers.solve(h, g, "cholesky", damping=damping, tol=tol,
                                check_curvature=False)
    elif solver in ("cg", "lissa"):
        op = curvature.hvp(apply, params, x, y, w, l2)
        if solver == "cg":
            res = solvers.solve(op, g, "cg", damping=damping, tol=tol, maxiter=maxiter,
                                check_curvature=damping > 0)
        else:
            res = solvers.solve(op, g, "lissa", damping=damping, tol=tol, scale=lissa_scale,
                                lissa_depth=lissa_depth, key=key, check_curvature=True)
    else:
        raise ValueError(f"solver={solver!r}: choose 'exact', 'cg' or 'lissa'.")
    return unravel(theta - res.x), res


# --------------------------------------------------------------------------------------------
# Influence functions
# --------------------------------------------------------------------------------------------


def example_gradients(apply: Apply, params: Params, x: Array, y: Array) -> Array:
    r"""Per-example loss gradients :math:`\nabla_\theta\ell(z)`, shape ``(m, p)`` (``vmap``)."""
    return curvature.per_example_grads(apply, params, x, y)


def _inverse_hvps(apply, params, x, y, l2, rhs: Array, solver: str, damping: float,
                  hessian: Array | None, tol, maxiter) -> tuple[Array, dict]:
    """:math:`H^{-1}` applied to each row of ``rhs`` (``(m, p)``), with solve stats."""
    w = jnp.ones(x.shape[0], rhs.dtype)
    if solver == "exact":
        h = full_hessian(apply, params, x, y, w, l2) if hessian is None else hessian
        fac = solvers.cholesky_factor(h, damping)
        s = solvers.cholesky_solve(fac, rhs.T).T
        return s, {"method": "cholesky", "iterations": [0] * rhs.shape[0]}
    if solver != "cg":
        raise ValueError(f"solver={solver!r}: choose 'exact' or 'cg'.")
    op = curvature.hvp(apply, params, x, y, w, l2)
    out, its, res = [], [], []
    for b in rhs:
        r = solvers.solve(op, b, "cg", damping=damping, tol=tol, maxiter=maxiter,
                          check_curvature=damping > 0)
        out.append(r.x)
        its.append(int(r.iterations))
        res.append(float(r.residual))
    return jnp.stack(out), {"method": "cg", "iterations": its, "residual": res}


def influence_up_loss(
    apply: Apply,
    params: Params,
    x_train: Array,
    y_train: Array,
    x_test: Array,
    y_test: Array,
    l2: float,
    *,
    solver: str = "exact",
    damping: float = 0.0,
    hessian: Array | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
    return_stats: bool = False,
):
    r"""Koh & Liang (2017) eq. (2): ``I[t, i]`` :math:`= -\nabla\ell(z^{\text{test}}_t)^\top
    H^{-1}\nabla\ell(z_i)`, shape ``(n_test, n_train)``.

    :math:`H` is the Hessian of the mean-normalised objective on all of ``x_train`` at
    ``params`` (plus ``damping``); one solve per test point (``exact``: one Cholesky, batched
    triangular solves; ``cg``: HVP-CG per test point), then a matrix product with the
    ``vmap``-ed per-example gradients.
    """
    g_test = example_gradients(apply, params, x_test, y_test)
    s_test, stats = _inverse_hvps(apply, params, x_train, y_train, l2, g_test, solver, damping,
                                  hessian, tol, maxiter)
    g_train = example_gradients(apply, params, x_train, y_train)
    infl = -(s_test @ g_train.T)
    return (infl, s_test, stats) if return_stats else infl


def loo_test_loss_change(
    apply: Apply,
    params: Params,
    x_train: Array,
    y_train: Array,
    x_test: Array,
    y_test: Array,
    l2: float,
    *,
    solver: str = "exact",
    damping: float = 0.0,
    hessian: Array | None = None,
    correct_regulariser: bool = True,
    tol: float | None = None,
    maxiter: int | None = None,
) -> Array:
    r"""Predicted change of each test loss when each training point is left out, ``(n_test,
    n_train)``; positive means the test loss goes up without that point.

    ``correct_regulariser=True`` (default): :math:`(-\mathcal I + \lambda s_{\text{test}}^\top
    \theta^*)/(n-1)`, the one-step Newton prediction for the mean-normalised objective (module
    docstring). ``False``: Koh & Liang's :math:`-\mathcal I/n`.
    """
    infl, s_test, _ = influence_up_loss(apply, params, x_train, y_train, x_test, y_test, l2,
                                        solver=solver, damping=damping, hessian=hessian, tol=tol,
                                        maxiter=maxiter, return_stats=True)
    n = x_train.shape[0]
    if not correct_regulariser:
        return -infl / n
    theta, _ = ravel_pytree(params)
    return (-infl + l2 * (s_test @ theta)[:, None]) / (n - 1)
