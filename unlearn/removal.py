r"""Newton removal (Guo et al. 2020): one exact or matrix-free Newton step on the retained
objective, from a cached factor with an exact low-rank downdate.

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
    \tfrac{n-k}{n}\,(H_r + \lambda_d I) = A - \delta I - V V^\top / n,

where :math:`A = H_D + \lambda_d I`, :math:`\lambda_d` the damping,
:math:`\delta = k(\lambda + \lambda_d)/n` (removing points re-weights the regulariser against
the data term) and :math:`G_U = VV^\top`. For softmax regression
:math:`\nabla^2\ell_i = J_i^\top(\operatorname{diag}p_i - p_ip_i^\top)J_i` with :math:`J_i`
the (constant) Jacobian of the logits, and :math:`\operatorname{diag}p - pp^\top = C C^\top`
with :math:`C = \operatorname{diag}\sqrt p - p\sqrt p^\top` (uses :math:`\sum_k p_k = 1`), so
:math:`V_i = J_i^\top C_i` has :math:`K` columns (rank :math:`\le K-1`).

``prepare`` caches the *eigendecomposition* :math:`A = Q\Lambda Q^\top` (once,
:math:`O(p^3)`). A Cholesky factor would absorb the low-rank term but not the shift
:math:`\delta I`, which is not low rank; in the eigenbasis the shift is exact:
:math:`(A - \delta I)^{-1} = Q(\Lambda-\delta)^{-1}Q^\top`, and with :math:`Z = Q^\top V`
the Woodbury identity gives

.. math::

    x = Q\,\hat y,\qquad
    \hat y = s\,\big[D\hat g + DZ\,(nI - Z^\top D Z)^{-1} Z^\top D\hat g\big],\qquad
    D = (\Lambda - \delta I)^{-1},\ \hat g = Q^\top g,\ s = \tfrac{n-k}{n}.

:math:`Z = (J_U Q)^\top C` is computed without forming :math:`V`: the logits' linear map
applied to every eigenvector (``jax.linearize`` + ``vmap``), :math:`O(p^2 k)` flops in one pass
over :math:`Q`. The gradient is downdated too: :math:`\sum_{i\in D\setminus U}\nabla\ell_i =
\sum_{i\in D}\nabla\ell_i - \sum_{i\in U}\nabla\ell_i`, with the full sum cached at
:math:`\theta^*` (not assumed zero). A request from :math:`\theta^*` therefore costs
:math:`k` example gradients, three passes over :math:`Q` and a Cholesky of size
:math:`\min(kK, p)` (for :math:`kK \ge p` the downdated matrix in the eigenbasis is factored
directly), instead of a full gradient, a fresh Hessian and its factorisation
(``benchmarks/newton.py``).

Everything here works on a :class:`unlearn.inverse.Curvature` (the objective's
``(apply, params, x, y, w, l2)`` and which matrix) and returns parameters with a
``solvers.Solution``; the loss is the task's (carried by ``apply``).
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

from unlearn import curvature, objective, solvers
from unlearn.inverse import Backend, Curvature, Exact, declared_curvature, full_hessian

Array = jax.Array
Params = Any
Apply = Callable[[Params, Array], Array]

class NewtonFactor(NamedTuple):
    r"""Eigendecomposition :math:`A = Q\Lambda Q^\top` of :math:`A = H_D + \lambda_d I` at the
    anchor params, and the summed example gradients there.

    ``evals`` (ascending, all :math:`>0`) and ``evecs`` :math:`= Q` (one eigenvector per
    column). On XLA's CPU backend a product with a transposed operand copies it first (at
    p = 7850 in float64, 0.24 s instead of 0.016 s for a matrix-vector product), so every
    per-request product is arranged as ``v @ Q`` or ``Q @ v``. ``grad_sum`` is
    :math:`\sum_i w_i\nabla\ell_i(\theta^*)` over the factor's data, so the retained gradient
    at the anchor costs only the removed points' gradients. ``n`` is :math:`\sum w` at factor
    time; ``l2`` and ``damping`` are :math:`\lambda` and :math:`\lambda_d`.
    """

    evals: Array
    evecs: Array
    grad_sum: Array
    n: float
    l2: float
    damping: float


@jax.jit
def _eigh(h: Array, damping: Array) -> tuple[Array, Array]:
    a = 0.5 * (h + h.T) + damping * jnp.eye(h.shape[0], dtype=h.dtype)
    return jnp.linalg.eigh(a)


def newton_factor(curv: Curvature, damping: float = 0.0) -> NewtonFactor:
    r"""Eigendecompose :math:`H_D + \lambda_d I` once and sum the example gradients at
    ``curv.params`` (the Hessian of ``curv``'s objective).

    Raises ``ValueError`` naming the most negative eigenvalue and a sufficient ``damping=`` if
    :math:`H_D + \lambda_d I` is not positive definite.
    """
    apply, params, x, y, w, l2 = (curv.apply, curv.params, curv.x, curv.y, curv.weights,
                                  curv.l2)
    h = full_hessian(apply, params, x, y, w, l2)
    with solvers.lapack_guard(h.shape[0]):
        evals, evecs = jax.block_until_ready(_eigh(h, jnp.asarray(damping, h.dtype)))
    dtype = h.dtype
    del h
    lo, hi = float(evals[0]), float(evals[-1])
    # Singular to working precision counts as not PD: the solve would amplify rounding errors.
    if not np.isfinite(lo) or lo <= evals.shape[0] * float(jnp.finfo(dtype).eps) * abs(hi):
        need = max(damping - lo, 0.0)
        raise ValueError(
            f"The Hessian plus damping={damping:g} is not positive definite (smallest "
            f"eigenvalue {lo:.4e}, so the Hessian's is {lo - damping:.4e}). Newton removal "
            f"needs a strictly convex objective: pass damping= larger than {need:.3e} "
            f"(e.g. damping={1.1 * need + 1e-8:.3e}) or increase the L2 coefficient.")
    n = float(np.sum(np.asarray(w)))
    theta, _ = ravel_pytree(params)
    g = curvature.flat_grad(apply, params, x, y, w, l2)
    grad_sum = max(n, 1.0) * (g - l2 * theta)  # Σ w_i ∇ℓ_i (the objective's normaliser)
    return NewtonFactor(evals, evecs, grad_sum, n, float(l2), float(damping))


class NystromCache(NamedTuple):
    r"""What the matrix-free (preconditioned CG) path caches at :math:`\theta^*`.

    ``approx``: randomized Nyström approximation of the data term of the curvature
    (``solvers.nystrom``; the L2 term and the damping are the preconditioner's shift), built
    from ``rank`` curvature-vector products in one batched call; ``grad_sum``: :math:`\sum_i
    w_i\nabla\ell_i(\theta^*)` so a request at the anchor needs only the removed points'
    gradients (as :class:`NewtonFactor`). Memory :math:`O(p\,r)`, never :math:`O(p^2)`.
    """

    approx: solvers.NystromApprox
    grad_sum: Array
    n: float
    l2: float
    damping: float

    def preconditioner(self) -> Any:
        r""":func:`solvers.nystrom_preconditioner` for :math:`H + \lambda_d I`."""
        return solvers.nystrom_preconditioner(self.approx, self.l2 + self.damping)


def nystrom_cache(curv: Curvature, damping: float = 0.0, rank: int = 100,
                  key: Array | None = None) -> NystromCache:
    r"""Prepare the matrix-free Newton path once: a rank-``rank`` Nyström approximation of the
    data-term curvature of ``curv`` (Hessian or GGN, its ``kind``) and the summed example
    gradients at its params."""
    apply, params, x, y, w, l2 = (curv.apply, curv.params, curv.x, curv.y, curv.weights,
                                  curv.l2)
    fn = curv.product
    theta, _ = ravel_pytree(params)
    data_op = fn(apply, params, x, y, w, 0.0)
    approx = solvers.nystrom(data_op, theta, rank, key)
    n = float(np.sum(np.asarray(w)))
    g = curvature.flat_grad(apply, params, x, y, w, l2)
    grad_sum = max(n, 1.0) * (g - l2 * theta)
    return NystromCache(approx, grad_sum, n, float(l2), float(damping))


# --------------------------------------------------------------------------------------------
# Low-rank factor of the removed points' curvature
# --------------------------------------------------------------------------------------------


def _curvature_root(apply: Apply, logits: Array, y: Array | None, dtype,
                    w: Array | None = None) -> Array:
    r""":math:`C_i = \sqrt{w_i}\,R_i` per row with :math:`R_iR_i^\top` the loss's Hessian in
    the outputs (cross-entropy: :math:`R = \operatorname{diag}\sqrt p - p\sqrt p^\top`,
    :math:`RR^\top = \operatorname{diag}p - pp^\top`); shape ``(m, K, K)``. ``y`` may be
    ``None`` for losses whose output Hessian does not depend on the target (cross-entropy,
    squared error)."""
    loss = objective.loss_of(apply)
    if y is None:
        if loss.root is None:
            raise ValueError(f"the curvature of loss {loss.name!r} depends on the targets: "
                             "pass the removed examples' y (removed_y=).")
        y = jnp.zeros(logits.shape[0], jnp.int32)
    c = loss.output_root(logits, y, dtype)
    return c if w is None else jnp.sqrt(w.astype(dtype))[:, None, None] * c


@functools.partial(jax.jit, static_argnames=("apply",))
def removed_curvature_factor(apply: Apply, params: Params, x: Array,
                             w: Array | None = None, y: Array | None = None) -> Array:
    r"""``V`` of shape ``(p, m K)`` with :math:`VV^\top = \sum_i w_iJ_i^\top(\operatorname{diag}
    p_i - p_ip_i^\top)J_i` over the rows of ``x`` (weights ``w``, default 1; a zero weight
    pads the batch without changing the result).

    That is the Gauss–Newton matrix of the cross-entropy summed over the given examples, which
    equals :math:`\sum_i\nabla^2\ell_i` exactly when the logits are linear in :math:`\theta`
    (softmax regression). :math:`V_i = J_i^\top C_i`, each column a ``vjp`` of the logits.
    """
    theta, unravel = ravel_pytree(params)
    w = jnp.ones(x.shape[0], theta.dtype) if w is None else w

    yy = jnp.zeros(x.shape[0], jnp.int32) if y is None else y

    def one(xi: Array, wi: Array, yi: Array) -> Array:
        f = lambda t: apply(unravel(t), xi[None])[0]  # noqa: E731
        logits, vjp = jax.vjp(f, theta)
        c = _curvature_root(apply, logits[None], None if y is None else yi[None],
                            theta.dtype, wi[None])[0]  # (K, K)
        return jax.vmap(lambda col: vjp(col.astype(logits.dtype))[0])(c.T)  # (K, p)

    v = jax.vmap(one)(x, w, yy)  # (m, K, p)
    return v.reshape(-1, theta.size).T


@functools.partial(jax.jit, static_argnames=("apply",))
def projected_removed_curvature(apply: Apply, params: Params, x: Array, evecs: Array,
                                w: Array | None = None, y: Array | None = None) -> Array:
    r""":math:`Z = Q^\top V`, shape ``(p, m K)``, for :math:`V` =
    :func:`removed_curvature_factor` of the rows of ``x`` (weights ``w``) and ``evecs``
    :math:`= Q`.

    For softmax regression (one ``(d, K)`` kernel and one ``(K,)`` bias, as in
    ``curvature.softmax_regression_hessian``) the logits are :math:`\tilde x^\top\tilde W`, so
    :math:`J_UQ` is one plain product :math:`\tilde X_U\,Q_{(d+1)\times Kp}` of the removed
    inputs with :math:`Q` viewed as ``(d+1, K p)`` — :math:`O(p^2 m)` flops in one pass over
    :math:`Q`, then :math:`Z = (J_UQ)^\top C`. Other models: :math:`(V^\top Q)^\top`,
    :math:`O(p^2 mK)`.
    """
    theta, _ = ravel_pytree(params)
    evecs = evecs.astype(theta.dtype)
    if declared_curvature(apply) != "softmax_regression":
        return (removed_curvature_factor(apply, params, x, w, y).T @ evecs).T
    _, bias, bias_first = curvature._dense_leaves(params)
    m, k = x.shape[0], bias.shape[0]
    xf = x.reshape(m, -1).astype(theta.dtype)
    ones = jnp.ones((m, 1), theta.dtype)
    xt = jnp.concatenate([ones, xf] if bias_first else [xf, ones], axis=1)  # (m, d+1)
    jq = (xt @ evecs.reshape(xt.shape[1], -1)).reshape(m, k, -1)  # [i, c, j] = (J_i q_j)_c
    c = _curvature_root(apply, apply(params, x), y, theta.dtype, w)  # (m, K, K)
    return jnp.einsum("icj,ice->jie", jq, c).reshape(theta.size, -1)


# --------------------------------------------------------------------------------------------
# Woodbury downdate in the eigenbasis
# --------------------------------------------------------------------------------------------


@jax.jit
def _eig_woodbury(evals: Array, evecs: Array, z: Array, n: Array, k: Array, lam: Array,
                  g: Array):
    s = (n - k) / n
    lam_d = evals - k * lam / n  # Λ - δ, > 0 because Λ ≥ λ + λ_d > δ
    d = 1.0 / lam_d
    gh = s * (g @ evecs)  # s Q^T g
    if z.shape[1] < z.shape[0]:  # Woodbury: a (kK × kK) capacitance
        dz = d[:, None] * z
        cap = n * jnp.eye(z.shape[1], dtype=z.dtype) - z.T @ dz
        lc = jnp.linalg.cholesky(0.5 * (cap + cap.T))
        dg = d * gh
        yh = dg + dz @ jax.scipy.linalg.cho_solve((lc, True), dg @ z)  # dg @ z = Z^T dg
    else:  # kK ≥ p: the (p × p) downdated matrix itself is the smaller system
        m = jnp.diag(lam_d) - z @ z.T / n
        lc = jnp.linalg.cholesky(0.5 * (m + m.T))
        yh = jax.scipy.linalg.cho_solve((lc, True), gh)
    # Residual of (Λ - δ - Z Z^T / n) ŷ = s Q^T g in the eigenbasis (Q is orthogonal).
    r = lam_d * yh - z @ (yh @ z) / n - gh
    res = jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(gh), jnp.finfo(g.dtype).tiny)
    x = evecs @ yh  # Q ŷ
    finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(lc))
    return x, res, finite


def woodbury_solve(factor: NewtonFactor, v: Array, k: int, g: Array, *,
                   projected: bool = False) -> solvers.Solution:
    r"""Solve :math:`(H_r + \lambda_d I)x = g` from the cached eigendecomposition of
    :math:`H_D+\lambda_dI`, exactly (no iteration).

    ``v`` is :func:`removed_curvature_factor` of the ``k`` removed examples (at the anchor
    params), or with ``projected=True`` already :math:`Q^\top V`
    (:func:`projected_removed_curvature`). See the module docstring for the algebra;
    ``residual`` is :math:`\lVert(H_r+\lambda_dI)x - g\rVert/\lVert g\rVert` with :math:`H_r`
    assembled from the factor (in the eigenbasis, :math:`O(p\,kK)`).
    """
    g = jnp.asarray(g)
    if not 0 <= k < factor.n:
        raise ValueError(f"k={k} removed examples must be in [0, n={factor.n:g}).")
    dtype = g.dtype
    v = jnp.asarray(v, dtype)
    evecs = factor.evecs.astype(dtype)
    z = v if projected else (v.T @ evecs).T
    x, res, finite = _eig_woodbury(
        factor.evals.astype(dtype), evecs, z,
        jnp.asarray(factor.n, dtype), jnp.asarray(k, dtype),
        jnp.asarray(factor.l2 + factor.damping, dtype), g)
    if not bool(finite):
        raise ValueError(
            "Woodbury downdate failed: the retained Hessian is not positive definite at the "
            "anchor params (capacitance matrix not PD). Pass damping > 0 or refactor.")
    ftol = 1e-8 if dtype == jnp.float64 else 1e-3
    return solvers.Solution(x, jnp.asarray(0), res, jnp.asarray(res <= ftol), "woodbury")


# --------------------------------------------------------------------------------------------
# Newton removal
# --------------------------------------------------------------------------------------------


def retained_gradient(apply: Apply, params: Params, x: Array, y: Array, w: Array,
                      l2: float) -> Array:
    r""":math:`\nabla L(\theta; w)` as a flat vector (``curvature.flat_grad``)."""
    return curvature.flat_grad(apply, params, x, y, w, l2)


@functools.partial(jax.jit, static_argnames=("apply",))
def downdated_gradient(apply: Apply, anchor: Params, grad_sum: Array, removed_x: Array,
                       removed_y: Array, removed_w: Array, n_retained: Array, l2: Array
                       ) -> Array:
    r""":math:`\nabla L(\theta^*; D\setminus U) = (\sum_D w_i\nabla\ell_i - \sum_U
    w_i\nabla\ell_i)/\max(n_r, 1) + \lambda\theta^*` from the cached ``grad_sum``
    (:class:`NewtonFactor`) and the removed examples' gradients only — exact, :math:`O(kp)`.
    """
    theta, _ = ravel_pytree(anchor)
    ge = curvature.per_example_grads(apply, anchor, removed_x, removed_y)  # (k, p)
    gsum = grad_sum - removed_w.astype(ge.dtype) @ ge
    return gsum / jnp.maximum(n_retained, 1.0) + l2 * theta


class Downdate(NamedTuple):
    """The exact path of :func:`newton_step`: the cached ``factor`` of the full-data curvature
    at ``anchor`` and the examples removed since (``removed_w`` their weights, 0 for padding
    rows; ``removed_y`` their targets, needed only by losses whose output curvature depends
    on them)."""

    factor: NewtonFactor
    anchor: Params
    removed_x: Array
    removed_w: Array | None = None
    removed_y: Array | None = None


def newton_step(curv: Curvature, backend: Backend | None = None, *, damping: float = 0.0,
                grad: Array | None = None, downdate: Downdate | None = None
                ) -> tuple[Params, solvers.Solution]:
    r"""One Newton step :math:`\theta - (H_r+\lambda_dI)^{-1}\nabla L(\theta; w)` on the
    retained objective ``curv`` (its weights ``w``; ``grad`` may pass the gradient).

    With ``downdate``: the exact Woodbury-downdated solve with the curvature at the anchor
    (:func:`woodbury_solve`). Otherwise the inverse-curvature ``backend``
    (``unlearn.inverse``; default :class:`~unlearn.inverse.Exact`: a fresh dense curvature at
    ``curv.params`` and a Cholesky solve; ``CG(precond=...)``, ``LiSSA(...)`` matrix-free).
    """
    theta, unravel = ravel_pytree(curv.params)
    g = retained_gradient(curv.apply, curv.params, curv.x, curv.y, curv.weights,
                          curv.l2) if grad is None else grad
    if downdate is not None:
        d = downdate
        rw = (jnp.ones(d.removed_x.shape[0]) if d.removed_w is None
              else jnp.asarray(d.removed_w))
        z = projected_removed_curvature(curv.apply, d.anchor, d.removed_x, d.factor.evecs, rw,
                                        d.removed_y)
        res = woodbury_solve(d.factor, z, int(round(float(rw.sum()))), g, projected=True)
        if not bool(res.converged):
            warnings.warn(f"Woodbury solve: relative residual {float(res.residual):.2e}",
                          RuntimeWarning, stacklevel=2)
    else:
        sol = (Exact() if backend is None else backend).prepare(curv, damping).apply(g[None])
        res = solvers.Solution(sol.x[0], sol.iterations[0], sol.residual[0], sol.converged[0],
                               sol.method, sol.message)
    return unravel(theta - res.x), res


__all__ = ["Downdate", "NewtonFactor", "NystromCache", "downdated_gradient", "newton_factor",
           "newton_step", "nystrom_cache", "projected_removed_curvature",
           "removed_curvature_factor", "retained_gradient", "woodbury_solve"]
