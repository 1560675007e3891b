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

from unlearn import curvature, objective, solvers

Array = jax.Array
Params = Any
Apply = Callable[[Params, Array], Array]

__all__ = [
    "NewtonFactor",
    "DecoupledCholesky",
    "coupled_coordinates",
    "NystromCache",
    "nystrom_cache",
    "full_hessian",
    "newton_factor",
    "removed_curvature_factor",
    "projected_removed_curvature",
    "woodbury_solve",
    "downdated_gradient",
    "retained_gradient",
    "newton_step",
    "influence_up_loss",
    "loo_test_loss_change",
    "example_gradients",
    "BACKENDS",
    "InverseCurvature",
    "prepare_inverse",
    "inverse_hvp",
    "influence_scores",
    "Influence",
]


# --------------------------------------------------------------------------------------------
# Dense Hessian and the cached factor
# --------------------------------------------------------------------------------------------


def full_hessian(apply: Apply, params: Params, x: Array, y: Array, w: Array,
                 l2: float) -> Array:
    """Dense :math:`\nabla^2 L(\theta; w)` over the flat params.

    The closed form the task *declares* (``task.curvature`` on ``apply``:
    ``"softmax_regression"`` → ``curvature.softmax_regression_hessian``, ``"binary_logistic"``
    → ``curvature.binary_logistic_hessian``, or the task's own ``hessian(params, x, y, w, l2)``
    function); otherwise the chunked autodiff ``curvature.hessian``. Never guessed from the
    parameter shapes: a linear head on fixed features has the shapes of softmax regression
    and a different Hessian.
    """
    kind = declared_curvature(apply)
    if kind == "softmax_regression":
        return curvature.softmax_regression_hessian(params, x, w, l2)
    if kind == "binary_logistic":
        return curvature.binary_logistic_hessian(params, x, w, l2)
    if callable(kind):
        return jnp.asarray(kind(params, x, y, w, l2))
    return curvature.hessian(apply, params, x, y, w, l2)


def declared_curvature(apply: Apply):
    """The closed-form curvature the task of ``apply`` declares (``None`` if none)."""
    return getattr(apply, "curvature", None)


def _is_linear_model(apply: Apply) -> bool:
    """Declared softmax or binary logistic regression (the coupled-coordinate closed form)."""
    return declared_curvature(apply) in ("softmax_regression", "binary_logistic")


def _active_features(x: Array, w: Array) -> np.ndarray:
    """Indices of the input features that are non-zero on some example of positive weight."""
    xn = np.asarray(x).reshape(np.shape(x)[0], -1)
    return np.flatnonzero(np.any(xn[np.asarray(w) > 0] != 0, axis=0))


def coupled_coordinates(params: Params, x: Array,
                        w: Array) -> tuple[Params, Array, np.ndarray | None]:
    r"""The *coupled* part of softmax (or binary logistic) regression: its params and inputs
    without the features that are zero on every example of positive weight, and the flat
    indices of the kept coordinates (``None`` when every feature is kept).

    The weight of input feature :math:`a` enters the loss only through :math:`x_{ia}`: when
    :math:`x_{ia} = 0` on every example of positive weight, its rows of :math:`H` are zero
    off the diagonal and it *decouples* with curvature :math:`\lambda` (e.g. the 124 of 784
    MNIST pixels that are black in every image of ``mnist5k``). The closed-form Hessian of the
    returned params on the returned inputs is therefore exactly :math:`H` on the kept
    coordinates, and the factorisation shrinks from :math:`p` to their number
    (:class:`DecoupledCholesky`).
    """
    active = _active_features(x, w)
    xf = jnp.asarray(x).reshape(np.shape(x)[0], -1)
    if active.size == xf.shape[1]:
        return params, xf, None
    leaves, treedef = jax.tree.flatten(params)
    offsets = np.cumsum([0] + [np.size(a) for a in leaves])
    idx, kept = [], []
    for leaf, off in zip(leaves, offsets[:-1], strict=True):
        flat = np.arange(off, off + np.size(leaf)).reshape(np.shape(leaf))
        if np.ndim(leaf) == 2:  # the (d, K) kernel: keep the active rows
            flat, leaf = flat[active], leaf[active]
        idx.append(flat.reshape(-1))
        kept.append(leaf)
    return jax.tree.unflatten(treedef, kept), xf[:, active], np.concatenate(idx)


class DecoupledCholesky(NamedTuple):
    r"""Exact inverse of a damped curvature with decoupled coordinates: the Cholesky factor
    on the coupled flat indices ``index``, and ``shift`` (L2 + damping), the curvature of
    every other coordinate (:func:`coupled_coordinates`)."""

    cholesky: solvers.CholeskyFactor
    index: Array
    shift: Array


@jax.jit
def _decoupled_solve(f: DecoupledCholesky, rhs: Array) -> Array:
    """``(H + λ_d I)^{-1}`` on the rows of ``rhs`` ``(m, p)``."""
    inner = solvers.cholesky_solve(f.cholesky, rhs[:, f.index].T).T
    return (rhs / f.shift).at[:, f.index].set(inner)


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


def newton_factor(apply: Apply, params: Params, x: Array, y: Array, w: Array, l2: float,
                  damping: float = 0.0) -> NewtonFactor:
    r"""Eigendecompose :math:`H_D + \lambda_d I` once and sum the example gradients at
    ``params``.

    Raises ``ValueError`` naming the most negative eigenvalue and a sufficient ``damping=`` if
    :math:`H_D + \lambda_d I` is not positive definite.
    """
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


def nystrom_cache(apply: Apply, params: Params, x: Array, y: Array, w: Array, l2: float,
                  damping: float = 0.0, rank: int = 100, key: Array | None = None,
                  curvature_fn: Callable[..., Any] | None = None) -> NystromCache:
    r"""Prepare the matrix-free Newton path once: a rank-``rank`` Nyström approximation of the
    data-term curvature at ``params`` (HVP by default; ``curvature_fn=curvature.ggn_vp`` for
    the Gauss–Newton matrix) and the summed example gradients there."""
    fn = curvature.hvp if curvature_fn is None else curvature_fn
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
    removed_w: Array | None = None,
    removed_y: Array | None = None,
    anchor: Params | None = None,
    grad: Array | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
    lissa_depth: int = 1000,
    lissa_scale: float | None = None,
    key: Array | None = None,
    precond: Any = None,
    x0: Array | None = None,
    curvature_fn: Callable[..., Any] | None = None,
) -> tuple[Params, solvers.Solution]:
    r"""One Newton step :math:`\theta - (H_r+\lambda_dI)^{-1}\nabla L(\theta; w)` on the
    retained objective (weights ``w``).

    ``solver``: ``exact`` — with ``factor`` (of the full-data Hessian at ``anchor``) and
    ``removed_x`` (the examples removed since; ``removed_w`` their weights, 0 for padding
    rows), an exact Woodbury-downdated solve with the Hessian at ``anchor``
    (:func:`woodbury_solve`); without a factor, a fresh dense Hessian at ``params`` and a
    Cholesky solve.
    ``cg`` / ``lissa`` — matrix-free on the HVP at ``params`` (``curvature_fn`` picks another
    product, e.g. ``curvature.ggn_vp``); ``precond`` (e.g. ``NystromCache.preconditioner()``)
    and a warm start ``x0`` go to CG. ``grad`` may pass a precomputed gradient.
    """
    theta, unravel = ravel_pytree(params)
    g = retained_gradient(apply, params, x, y, w, l2) if grad is None else grad
    if solver == "exact":
        if factor is not None:
            if anchor is None or removed_x is None:
                raise ValueError("solver='exact' with a factor needs anchor= and removed_x=.")
            rw = jnp.ones(removed_x.shape[0]) if removed_w is None else jnp.asarray(removed_w)
            z = projected_removed_curvature(apply, anchor, removed_x, factor.evecs, rw,
                                            removed_y)
            res = woodbury_solve(factor, z, int(round(float(rw.sum()))), g, projected=True)
            if not bool(res.converged):
                warnings.warn(f"Woodbury solve: relative residual {float(res.residual):.2e}",
                              RuntimeWarning, stacklevel=2)
        else:
            h = full_hessian(apply, params, x, y, w, l2)
            res = solvers.linear_solve(h, g, solvers.Cholesky(tol=tol), damping=damping,
                                       check_curvature=False)
    elif solver in ("cg", "lissa"):
        op = (curvature.hvp if curvature_fn is None else curvature_fn)(
            apply, params, x, y, w, l2)
        if solver == "cg":
            res = solvers.linear_solve(
                op, g, solvers.CG(tol=tol, maxiter=maxiter, precond=precond, x0=x0),
                damping=damping, check_curvature=damping > 0 and precond is None)
        else:
            res = solvers.linear_solve(
                op, g, solvers.LiSSA(scale=lissa_scale, depth=lissa_depth, key=key, tol=tol),
                damping=damping, check_curvature=True)
    else:
        raise ValueError(f"solver={solver!r}: choose 'exact', 'cg' or 'lissa'.")
    return unravel(theta - res.x), res


# --------------------------------------------------------------------------------------------
# Influence functions
# --------------------------------------------------------------------------------------------


def example_gradients(apply: Apply, params: Params, x: Array, y: Array,
                      measure: bool = False) -> Array:
    r"""Per-example loss gradients :math:`\nabla_\theta\ell(z)`, shape ``(m, p)`` (``vmap``);
    ``measure=True``: of the task's measurement :math:`m(z)` instead (margin, a logit, ...).
    Materialises ``m × p``: use it for a few points (test points, a forget set), and
    :func:`influence_scores` for all training points."""
    return curvature.per_example_grads(apply, params, x, y, measure=measure)


BACKENDS = ("exact", "cg", "pcg", "pcg-ekfac", "ekfac", "kfac", "arnoldi", "lissa")


class InverseCurvature(NamedTuple):
    r"""An inverse of the damped curvature :math:`(H + \lambda_d I)^{-1}` prepared once
    (:func:`prepare_inverse`), applied to many right-hand sides by :func:`inverse_hvp`.

    ``backend``: one of :data:`BACKENDS`. ``op``: the damped curvature operator (exact HVP or
    GGN product) used by CG/LiSSA and for the true residual of every backend. ``factor``:
    Cholesky factor (``exact``). ``approx``: a ``v -> M v`` with :math:`M \approx
    (H+\lambda_dI)^{-1}` (``ekfac``/``kfac``; the preconditioner for ``pcg``/``pcg-ekfac``).
    ``eig``: top-k eigenpairs (``arnoldi``). ``options``: tol, maxiter, LiSSA scale/depth.
    ``prepare_seconds``: wall time of the preparation.
    """

    backend: str
    op: Any
    factor: Any = None
    approx: Any = None
    eig: tuple[Array, Array] | None = None
    options: dict | None = None
    prepare_seconds: float = 0.0


def prepare_inverse(
    apply: Apply,
    params: Params,
    x: Array,
    y: Array,
    l2: float,
    *,
    backend: str = "exact",
    damping: float = 0.0,
    w: Array | None = None,
    curvature_kind: str = "hessian",
    rank: int = 100,
    key: Array | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
    lissa_depth: int = 200,
    lissa_batch: int | None = None,
    hessian: Array | None = None,
    chunk_size: int = 1024,
    block: bool = True,
) -> InverseCurvature:
    r"""Prepare :math:`(H + \lambda_d I)^{-1}` once for many requests, with the chosen backend.

    :math:`H` is the Hessian (``curvature_kind='hessian'``) or the Gauss–Newton matrix
    (``'ggn'``, PSD for any network) of the mean objective on ``x`` (weights ``w``) at
    ``params``, with the L2 term; eval-mode ``apply`` (pass ``models.frozen_apply`` for models
    with BatchNorm state).

    Backends (prepare / per request):

    * ``exact`` — dense Hessian (closed form for softmax/binary logistic regression, on its
      coupled coordinates only: :func:`coupled_coordinates`) + Cholesky / two triangular
      solves. :math:`O(p^2)` memory; refused above 40 000 (coupled) parameters.
    * ``cg`` — nothing / block CG on the exact operator (``solvers.cg(..., block=True)``: all
      right-hand sides in one shared Krylov space, each iteration one batched product;
      ``block=False``: the ``vmap``-ed single-vector CG), converges to the exact answer.
    * ``pcg`` — rank-``rank`` randomized Nyström approximation of the data term (``rank``
      batched products) / preconditioned block CG — exact answer, fewer iterations.
    * ``pcg-ekfac`` — EK-FAC factors / CG preconditioned by the EK-FAC inverse — exact answer.
    * ``ekfac`` / ``kfac`` — (E)K-FAC factors of the GGN (``unlearn.kfac``, dense layers) /
      one Kronecker-factored inverse per layer: approximate (Grosse et al. 2023).
    * ``arnoldi`` — top-``rank`` eigenpairs from ``2·rank + 20`` Lanczos/Arnoldi steps
      (Schioppa et al. 2022) / projection on that subspace: approximate.
    * ``lissa`` — scale from a Lanczos estimate / ``lissa_depth`` steps of the LiSSA recursion
      (Agarwal et al. 2017; Koh & Liang 2017) on minibatches of ``lissa_batch`` examples
      (full batch if None): approximate, stochastic.
    """
    import time

    from unlearn import kfac

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}.")
    if curvature_kind not in ("hessian", "ggn"):
        raise ValueError(f"curvature_kind={curvature_kind!r}: choose 'hessian' or 'ggn'.")
    t0 = time.perf_counter()
    theta, _ = ravel_pytree(params)
    p = theta.size
    w = jnp.ones(x.shape[0], theta.dtype) if w is None else jnp.asarray(w, theta.dtype)
    fn = curvature.hvp if curvature_kind == "hessian" else curvature.ggn_vp
    op = fn(apply, params, x, y, w, l2, damping)
    opts = {"tol": tol, "maxiter": maxiter, "block": bool(block)}
    factor = approx = eig = None
    if backend == "exact":
        index, order, limit = None, p, 2 * solvers.LAPACK_THREADED_LIMIT
        linear = _is_linear_model(apply)
        if hessian is None and linear:  # the closed form (GGN = Hessian for these models)
            reduced, x_coupled, index = coupled_coordinates(params, x, w)
            order = p if index is None else index.size
        if hessian is None and order > limit:
            coupled = "" if order == p else f"; {p} parameters, {order} coupled"
            raise ValueError(
                f"backend='exact' needs a dense {order}×{order} curvature "
                f"({8 * order**2 / 2**30:.1f} GiB in float64{coupled}) and its factorisation; "
                f"above {limit} parameters use backend='pcg' or 'cg' (the same answer, "
                "matrix-free), or 'ekfac'/'arnoldi' (approximate).")
        if hessian is None and linear:
            hessian = full_hessian(apply, reduced, x_coupled, y, w, l2)
        elif hessian is None:
            hessian = (full_hessian(apply, params, x, y, w, l2) if curvature_kind == "hessian"
                       else jax.vmap(fn(apply, params, x, y, w, l2))(
                           jnp.eye(p, dtype=theta.dtype)))
        factor = solvers.cholesky_factor(hessian, damping)
        if index is not None:
            factor = DecoupledCholesky(factor, jnp.asarray(index),
                                       jnp.asarray(l2 + damping, theta.dtype))
    elif backend == "pcg":
        data_op = fn(apply, params, x, y, w, 0.0)
        ny = solvers.nystrom(data_op, theta, min(rank, p - 1), key)
        approx = solvers.nystrom_preconditioner(ny, l2 + damping)
    elif backend in ("pcg-ekfac", "ekfac", "kfac"):
        facs = kfac.kfac_factors(apply, params, x, w, chunk_size=chunk_size)
        approx = kfac.kfac_inverse(facs, params, l2 + damping,
                                   "kfac" if backend == "kfac" else "ekfac")
    elif backend == "arnoldi":
        eig = solvers.lanczos_topk(op, theta, min(rank, p), steps=min(p, 2 * rank + 20),
                                   key=key)
        if float(eig[0][-1]) <= 0:
            raise ValueError("arnoldi: a kept eigenvalue of the damped curvature is <= 0; "
                             "add damping or use curvature_kind='ggn'.")
    elif backend == "lissa":
        _, lam_max = solvers.lanczos_extremes(op, theta, steps=min(30, p))
        opts.update(scale=1.5 * lam_max, depth=int(lissa_depth), batch=lissa_batch,
                    key=jax.random.PRNGKey(0) if key is None else key,
                    x=x, y=y, w=w, fn=fn, apply=apply, params=params, l2=l2, damping=damping)
    jax.block_until_ready((factor, approx, eig))
    return InverseCurvature(backend, op, factor, approx, eig, opts, time.perf_counter() - t0)


@functools.partial(jax.jit, static_argnames=("depth",))
def _lissa_batched(hvp_batch: Callable, rhs: Array, scale: Array, keys: Array, depth: int):
    """x_j = b + x_{j-1} - H_j x_{j-1} / s for all rows at once; returns x_depth / s."""

    def step(xs, key):
        hx = hvp_batch(xs, key)
        return rhs + xs - hx / scale, None

    xs, _ = jax.lax.scan(step, rhs, keys[:depth])
    return xs / scale


def _lissa_hvp(fn, apply, batch, params, x, y, w, l2, damping, xs, key):
    if batch is None:
        mask = w
    else:
        idx = jax.random.choice(key, x.shape[0], (batch,), replace=False)
        mask = jnp.zeros_like(w).at[idx].set(w[idx])
    op = fn(apply, params, x, y, mask, l2, damping)
    return jax.vmap(op)(xs)


@functools.lru_cache(maxsize=32)
def _lissa_fn(fn, apply, batch):
    return functools.partial(_lissa_hvp, fn, apply, batch)


@jax.jit
def _batched_residual(op: Any, xs: Array, rhs: Array) -> tuple[Array, Array]:
    """True relative residual of every row, one compiled batched product (``op`` is a
    ``Partial``, traced as data; eagerly each primitive of the product compiles on its own)."""
    res = jax.vmap(lambda xx, bb: solvers._rel_residual(op, xx, bb))(xs, rhs)
    return res, jnp.all(jnp.isfinite(xs), axis=1)


def inverse_hvp(inv: InverseCurvature, rhs: Array) -> solvers.Solution:
    r"""Apply a prepared :class:`InverseCurvature` to the rows of ``rhs`` (``(m, p)``) in one
    batched computation; the :class:`solvers.Solution` carries per-row iterations and the
    true relative residual :math:`\lVert b - (H+\lambda_dI)x\rVert/\lVert b\rVert` against
    the exact damped operator (so approximate backends report their error too)."""
    rhs = jnp.asarray(rhs)
    if rhs.ndim != 2:
        raise ValueError(f"rhs must be (m, p) right-hand sides as rows; got {rhs.shape}")
    o = inv.options or {}
    m = rhs.shape[0]
    zeros = jnp.zeros(m, jnp.int32)
    b = inv.backend
    if b in ("cg", "pcg", "pcg-ekfac"):
        return solvers.cg(inv.op, rhs, tol=o.get("tol"), maxiter=o.get("maxiter"),
                          precond=None if b == "cg" else inv.approx,
                          block=o.get("block", True) and 1 < m < rhs.shape[1])
    if b == "exact":
        if isinstance(inv.factor, DecoupledCholesky):
            xs = _decoupled_solve(inv.factor, rhs)
        else:
            xs = solvers.cholesky_solve(inv.factor, rhs.T).T
        its, method = zeros, "cholesky"
    elif b in ("ekfac", "kfac"):
        xs, its, method = jax.vmap(inv.approx)(rhs), zeros, b
    elif b == "arnoldi":
        vals, vecs = inv.eig
        xs = ((rhs @ vecs) / vals) @ vecs.T
        its, method = zeros + vals.shape[0], "arnoldi"
    else:  # lissa
        hv = jax.tree_util.Partial(
            _lissa_fn(o["fn"], o["apply"], o["batch"]), o["params"], o["x"], o["y"], o["w"],
            jnp.asarray(o["l2"]), jnp.asarray(o["damping"]))
        keys = jax.random.split(o["key"], o["depth"])
        xs = _lissa_batched(hv, rhs, jnp.asarray(o["scale"], rhs.dtype), keys,
                            depth=o["depth"])
        its, method = zeros + o["depth"], "lissa"
    res, finite = _batched_residual(inv.op, xs, rhs)
    tol = o.get("tol") or (1e-8 if rhs.dtype == jnp.float64 else 1e-4)
    exact = method == "cholesky"
    # On the host: eager jnp comparisons would each compile a program on a cold call.
    conv = jnp.asarray(np.asarray(res) <= tol if exact else np.asarray(finite))
    msg = "" if exact else "approximate inverse: converged means finite; residual is its error"
    return solvers.Solution(xs, its, res, conv, method, msg)


@functools.partial(jax.jit, static_argnames=("apply",))
def _scores_chunk(apply: Apply, params: Params, xc: Array, yc: Array, s: Array) -> Array:
    theta, unravel = ravel_pytree(params)

    def losses(t):
        return objective.loss_of(apply)(apply(unravel(t), xc), yc)

    _, lin = jax.linearize(losses, theta)
    return jax.vmap(lin)(s.astype(theta.dtype))  # (m, chunk)


def influence_scores(apply: Apply, params: Params, x: Array, y: Array, s: Array,
                     chunk_size: int = 1024) -> Array:
    r""":math:`S_{ti} = s_t^\top\nabla_\theta\ell(z_i)` for every row :math:`s_t` of ``s``
    (``(m, p)``) and every example of ``x`` — shape ``(m, n)`` — without per-example gradients.

    :math:`s^\top\nabla\ell_i = \frac{d}{d\epsilon}\ell_i(\theta + \epsilon s)` is a
    forward-mode directional derivative of the vector of per-example losses: per chunk of
    ``chunk_size`` examples ``jax.linearize`` once, then the linear map is ``vmap``-ed over the
    ``m`` directions (a batched forward pass). Memory :math:`O(m\cdot\text{chunk} +
    \text{chunk activations})`, never :math:`O(np)`. Chunks run as a Python loop of one
    compiled function (the last chunk padded), since convolutions inside an XLA loop are
    slow on CPU (docs/architecture.md).
    """
    n = x.shape[0]
    chunk = int(min(chunk_size, n))
    out = []
    for start in range(0, n, chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        m = xc.shape[0]
        if m < chunk:  # pad to the compiled shape
            xc = jnp.concatenate([xc, jnp.repeat(xc[:1], chunk - m, axis=0)])
            yc = jnp.concatenate([yc, jnp.repeat(yc[:1], chunk - m, axis=0)])
        out.append(_scores_chunk(apply, params, xc, yc, s)[:, :m])
    return jnp.concatenate(out, axis=1)


class Influence(NamedTuple):
    """``scores`` ``(n_test, n_train)`` = :math:`\\mathcal I_{\\text{up,loss}}`; ``s_test``
    ``(n_test, p)`` the inverse-curvature test gradients; ``solution`` the solve's stats."""

    scores: Array
    s_test: Array
    solution: solvers.Solution


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
    prepared: InverseCurvature | None = None,
    chunk_size: int = 512,
    **backend_options: Any,
) -> Influence:
    r"""Koh & Liang (2017) eq. (2): ``scores[t, i]`` :math:`= -\nabla m(z^{\text{test}}_t)^\top
    (H + \lambda_d I)^{-1}\nabla\ell(z_i)`, for all training points and all test points, with
    :math:`m` the task's measurement (its loss by default, :math:`\mathcal I_{\text{up,loss}}`).

    :math:`H` is the curvature of the mean-normalised objective on all of ``x_train`` at
    ``params``. The inverse-curvature products for ALL test points are one batched solve
    (:func:`inverse_hvp`, backend ``solver`` — see :func:`prepare_inverse`, or pass
    ``prepared``); the scores are then streamed over the training set in chunks by
    :func:`influence_scores` (no ``n × p`` gradient matrix). Always returns :class:`Influence`.
    """
    if prepared is None:
        prepared = prepare_inverse(apply, params, x_train, y_train, l2, backend=solver,
                                   damping=damping, hessian=hessian, tol=tol, maxiter=maxiter,
                                   **backend_options)
    g_test = example_gradients(apply, params, x_test, y_test, measure=True)
    sol = inverse_hvp(prepared, g_test)
    if np.any(~np.asarray(sol.converged)):
        warnings.warn(f"influence ({prepared.backend}): solve did not converge, relative "
                      f"residual {float(jnp.max(sol.residual)):.2e}", RuntimeWarning,
                      stacklevel=2)
    scores = -influence_scores(apply, params, x_train, y_train, sol.x, chunk_size=chunk_size)
    return Influence(scores, sol.x, sol)


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
    prepared: InverseCurvature | None = None,
    **backend_options: Any,
) -> Array:
    r"""Predicted change of each test loss when each training point is left out, ``(n_test,
    n_train)``; positive means the test loss goes up without that point.

    ``correct_regulariser=True`` (default): :math:`(-\mathcal I + \lambda s_{\text{test}}^\top
    \theta^*)/(n-1)`, the one-step Newton prediction for the mean-normalised objective (module
    docstring). ``False``: Koh & Liang's :math:`-\mathcal I/n`.
    """
    out = influence_up_loss(apply, params, x_train, y_train, x_test, y_test, l2,
                            solver=solver, damping=damping, hessian=hessian, tol=tol,
                            maxiter=maxiter, prepared=prepared, **backend_options)
    n = x_train.shape[0]
    if not correct_regulariser:
        return -out.scores / n
    theta, _ = ravel_pytree(params)
    return (-out.scores + l2 * (out.s_test @ theta)[:, None]) / (n - 1)
