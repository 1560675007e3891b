r"""Certified removal (Guo, Goldstein, Hannun & van der Maaten 2020, "Certified Data Removal from
Machine Learning Models", ICML) for softmax regression.

**Loss perturbation** (Guo et al. §3.2, Alg. 1). Training minimises, in the sum form of the
paper,

.. math::

    L_b(\theta; D) = \sum_{i\in D}\ell_i(\theta) + \frac{\lambda |D|}{2}\lVert\theta\rVert^2
                     + b^\top\theta, \qquad b \sim \mathcal N(0, \sigma^2 I),

i.e. ``train.objective`` (mean form) :math:`+\, b^\top\theta/|D|` times :math:`|D|`; trained
with L-BFGS to convergence (:func:`fit_perturbed`). The noise :math:`b` is drawn once and kept
across removals.

**Removal** is one Newton step on the retained sum-form objective (Hessian at the current
params, exact dense solve): :math:`\theta^- = \theta - H^{-1}\Delta`,
:math:`\Delta = \nabla L_b(\theta; D')`. The **gradient residual** :math:`\lVert\nabla
L_b(\theta^-; D')\rVert` is the quantity certified.

**Bounds** (softmax generalisation of Guo et al. Thm. 1/Cor. 1 and Cor. 2). Write
:math:`v = H^{-1}\Delta`, :math:`\tilde X` the retained inputs with the bias column
(:math:`\tilde x = (1, x)`), :math:`R = \max_i\lVert\tilde x_i\rVert`, :math:`V` the
``(d+1, K)`` matrix of :math:`v` and :math:`u_i = V^\top\tilde x_i` the logit change of example
:math:`i`. The residual is :math:`\sum_i \tilde x_i\otimes r_i` with
:math:`r_i = g(z_i+u_i) - g(z_i) - J(z_i)u_i`, :math:`g(z) = \operatorname{softmax}(z) - e_y`,
:math:`J = \operatorname{diag}p - pp^\top`, and :math:`\lVert r_i\rVert\le\gamma\lVert u_i
\rVert^2` when :math:`J` is :math:`\gamma`-Lipschitz (Guo et al. use the mean-value form without
the factor 1/2; we keep theirs). Hence

* data-dependent (Cor. 2): :math:`\lVert\nabla L_b(\theta^-; D')\rVert \le \gamma R\,
  \lVert\tilde X\rVert_2\,\lVert v\rVert\,\lVert\tilde X V\rVert_F`;
* worst case (Thm. 1 / Cor. 1 for a batch of :math:`m`): with
  :math:`\lVert\nabla\ell_i\rVert\le CR` and :math:`\lambda\lVert\theta\rVert \le CR +
  (\lVert b\rVert + \lVert r\rVert)/n` from optimality (:math:`r` the current residual),
  :math:`\lVert\Delta\rVert\le m(2CR + (\lVert b\rVert+\lVert r\rVert)/n) + \lVert r\rVert` and
  :math:`\lVert v\rVert\le\lVert\Delta\rVert/(\lambda(n-m))`, so the residual is
  :math:`\le \gamma R^3\lVert\Delta\rVert^2/(\lambda^2(n-m))` — for :math:`R = 1`,
  :math:`b = r = 0` exactly Guo et al.'s :math:`4\gamma m^2C^2/(\lambda^2(n-m))`.

The ``Unlearner`` built on these functions (budget bookkeeping, retraining when spent) is
``unlearn.methods.certified``; this module does not import ``unlearn.methods``.

Constants. Binary logistic loss (``models.binary_logreg``, logits :math:`[0, z]`; the logit
change is :math:`u = (0, \Delta z)` so the softmax formulas below reduce to Guo et al.'s):
:math:`\gamma = 1/4`, :math:`C = 1` (Guo et al.). Softmax
(used here): :math:`C = \sqrt 2` (:math:`\lVert p - e_y\rVert\le\sqrt2`) and
:math:`\gamma = 1/\sqrt 2`: the derivative of :math:`J` is the third cumulant tensor
:math:`T[u,a,a] = \mathbb E_p[(u-\bar u)(a-\bar a)^2]`; for a symmetric trilinear form the norm
is :math:`\sup_{\lVert u\rVert=1}|T[u,u,u]|` (Banach 1938), and for unit :math:`u` the third
central moment satisfies :math:`|\mathbb E Y^3|\le\max|Y|\,\mathbb E Y^2 \le \sqrt2\cdot\tfrac12`
(range :math:`\le\sqrt2`, Popoviciu's variance bound). Checked numerically in the tests.

**Budget** (Guo et al. Thm. 3): with :math:`c = \sqrt{2\log(1.5/\delta)}`, the released model is
:math:`(\epsilon,\delta)`-certified while the accumulated bound :math:`\beta` (sum of the
per-removal bounds, starting from the training residual) satisfies
:math:`\beta\le\sigma\epsilon/c`. A removal that would exceed it is served by retraining from
scratch on :math:`D'` with fresh noise, which resets :math:`\beta`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from unlearn import inverse, removal
from unlearn.train import Fit, Problem, cast, init_params, lbfgs_loop, objective

Params = Any

GAMMA_BINARY = 0.25
C_BINARY = 1.0
GAMMA_SOFTMAX = 1.0 / math.sqrt(2.0)
C_SOFTMAX = math.sqrt(2.0)

__all__ = [
    "GAMMA_BINARY", "C_BINARY", "GAMMA_SOFTMAX", "C_SOFTMAX", "budget", "perturbed_objective",
    "fit_perturbed", "sum_gradient", "data_dependent_bound", "worst_case_bound", "constants",
    "draw_noise", "residual_norm", "Removal", "newton_removal", "input_norm",
]


def budget(sigma: float, epsilon: float, delta: float) -> float:
    r"""The gradient-residual budget :math:`\sigma\epsilon/c`,
    :math:`c=\sqrt{2\log(1.5/\delta)}`."""
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r} must be > 0 (the loss-perturbation scale).")
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon!r} must be > 0.")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1).")
    return sigma * epsilon / math.sqrt(2.0 * math.log(1.5 / delta))


def perturbed_objective(apply, params: Params, x, y, w, l2: float, b) -> jax.Array:
    r"""Mean form :math:`L(\theta; w) + b^\top\theta/\sum w` (``b`` flat like the params)."""
    theta, _ = ravel_pytree(params)
    return objective(apply, params, x, y, w, l2) + jnp.vdot(b, theta) / jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("apply", "max_iter"))
def _lbfgs_perturbed(apply, params, x, y, w, l2, b, tol, max_iter):
    fun = lambda p: perturbed_objective(apply, p, x, y, w, l2, b)  # noqa: E731
    return lbfgs_loop(fun, params, tol, max_iter)


def _default_tol(dtype: str) -> float:
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def fit_perturbed(problem: Problem, b: jax.Array, *, weights: np.ndarray | None = None,
                  params: Params | None = None, tol: float | None = None,
                  max_iter: int = 5000) -> Fit:
    r"""Minimise :math:`L(\theta; w) + b^\top\theta/\sum w` with full-batch L-BFGS until the
    mean-form gradient norm is :math:`\le` ``tol`` (default 1e-10 in float64, the recommended
    precision, 1e-5 in float32). The remaining gradient counts against the budget."""
    dtype = problem.cfg.dtype
    tol = _default_tol(dtype) if tol is None else tol
    tr = problem.train
    w = np.ones(len(tr)) if weights is None else np.asarray(weights)
    if params is None:
        params = init_params(problem.model, tr, problem.key, dtype)
    params = cast(params, dtype)
    x = cast(jnp.asarray(tr.x), dtype)
    p, it, gnorm = _lbfgs_perturbed(problem.model.apply, params, x, jnp.asarray(tr.y),
                                    cast(jnp.asarray(w), dtype), problem.cfg.l2,
                                    cast(jnp.asarray(b), dtype), tol, max_iter)
    return Fit(p, {"iterations": int(it), "grad_norm": float(gnorm),
                   "converged": bool(gnorm <= tol)})


@functools.partial(jax.jit, static_argnames=("apply",))
def sum_gradient(apply, params: Params, x, y, w, l2: float, b) -> jax.Array:
    r"""Flat :math:`\nabla L_b(\theta; D')` of the **sum** form (:math:`\sum w` × mean form)."""
    theta, unravel = ravel_pytree(params)
    g = jax.grad(lambda t: perturbed_objective(apply, unravel(t), x, y, w, l2, b))(theta)
    return jnp.sum(w) * g


def input_norm(x: np.ndarray) -> float:
    r""":math:`\lVert\tilde X\rVert_2` of the inputs with the bias column (one SVD)."""
    return float(np.linalg.norm(_xt(x), 2))


def _xt(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return np.concatenate([np.ones((len(x), 1)), x], axis=1)


def data_dependent_bound(apply, v: jax.Array, unravel, x_retained: np.ndarray,
                         gamma: float = GAMMA_SOFTMAX, x_norm: float | None = None) -> float:
    r""":math:`\gamma R\lVert\tilde X\rVert_2\lVert v\rVert\lVert\tilde XV\rVert_F` (module doc).

    ``v`` is the flat Newton step :math:`H^{-1}\Delta`; :math:`\tilde XV` are the logit changes
    ``apply(unravel(v), x)`` (the model is linear in its params, bias included). ``x_norm`` may
    pass an upper bound on :math:`\lVert\tilde X\rVert_2` (e.g. that of all the training
    rows: removing rows never increases it) to skip the SVD in long removal sequences.
    """
    xt = _xt(x_retained)
    r = float(np.sqrt((xt ** 2).sum(1).max()))
    x_norm = float(np.linalg.norm(xt, 2)) if x_norm is None else float(x_norm)
    u = np.asarray(apply(unravel(v), jnp.asarray(x_retained, v.dtype)), np.float64)
    return gamma * r * x_norm * float(jnp.linalg.norm(v)) * float(np.linalg.norm(u))


def worst_case_bound(m: int, n: int, l2: float, r: float, *, b_norm: float = 0.0,
                     residual: float = 0.0, gamma: float = GAMMA_SOFTMAX,
                     c: float = C_SOFTMAX) -> float:
    r"""Guo et al. Cor. 1 generalised: :math:`\gamma R^3\lVert\Delta\rVert^2/(\lambda^2(n-m))`
    with :math:`\lVert\Delta\rVert\le m(2CR + (\lVert b\rVert+\lVert r\rVert)/n) + \lVert r\rVert`
    (``n`` points before removing ``m``; ``r`` = max input norm with the bias column)."""
    if not 0 < m < n:
        raise ValueError(f"m={m} removals must be in (0, n={n}).")
    delta = m * (2 * c * r + (b_norm + residual) / n) + residual
    return gamma * r ** 3 * delta ** 2 / (l2 ** 2 * (n - m))


def constants(model) -> tuple[float, float]:
    r"""(:math:`\gamma`, :math:`C`) for the model's *declared* structure: Guo et al.'s binary
    constants for one sigmoid score (``curvature="binary_logistic"``, ``models.binary_logreg``),
    the softmax ones for ``"softmax_regression"`` (``models.logreg``). The bounds are proved
    for these losses only; any other task is refused."""
    kind = getattr(model.apply, "curvature", None)
    if kind == "binary_logistic":
        return GAMMA_BINARY, C_BINARY
    if kind == "softmax_regression":
        return GAMMA_SOFTMAX, C_SOFTMAX
    raise ValueError(
        f"certified removal's bounds (Guo et al. 2020) hold for logistic/softmax regression; "
        f"task {model.name!r} declares curvature={kind!r}. Use models.logreg/binary_logreg, or "
        "declare curvature='softmax_regression' only if the model is exactly that.")


def draw_noise(key: jax.Array, params: Params, sigma: float, dtype: str) -> jax.Array:
    r"""The loss-perturbation vector :math:`b\sim\mathcal N(0,\sigma^2 I)`, flat like the
    params."""
    theta, _ = ravel_pytree(params)
    return sigma * jax.random.normal(key, theta.shape, jnp.dtype(dtype))


def residual_norm(problem: Problem, params: Params, w: np.ndarray, b: jax.Array) -> float:
    r""":math:`\lVert\nabla L_b(\theta; w)\rVert` of the sum-form objective (the certified
    quantity)."""
    dtype = problem.cfg.dtype
    x = cast(jnp.asarray(problem.train.x), dtype)
    g = sum_gradient(problem.model.apply, params, x, jnp.asarray(problem.train.y),
                     cast(jnp.asarray(w), dtype), problem.cfg.l2, b)
    return float(jnp.linalg.norm(g))


class Removal(NamedTuple):
    """One Newton removal: new params, the residual it leaves and both bounds on it."""

    params: Params
    residual_norm: float
    data_bound: float
    worst_bound: float
    solve_residual: float


def newton_removal(problem: Problem, params: Params, w_prev: np.ndarray, w: np.ndarray,
                   b: jax.Array, *, x_norm: float | None = None) -> Removal:
    r"""One Newton step on the retained perturbed objective (retained weights ``w``, previous
    ``w_prev``), exact dense solve with the closed-form Hessian, and its bounds (module doc):
    the data-dependent bound over the retained inputs and the worst case for the
    :math:`m = \sum(w_{prev} - w)` points removed, both with :func:`constants` of the model.
    ``x_norm``: see :func:`data_dependent_bound`."""
    apply, l2, dtype = problem.model.apply, problem.cfg.l2, problem.cfg.dtype
    tr = problem.train
    x = cast(jnp.asarray(tr.x), dtype)
    y = jnp.asarray(tr.y)
    wj = cast(jnp.asarray(w), dtype)
    gamma, c = constants(problem.model)
    n_prev = float(np.sum(w_prev))
    m = int(round(n_prev - float(np.sum(w))))
    r_prev = residual_norm(problem, params, w_prev, b)
    g = sum_gradient(apply, params, x, y, wj, l2, b) / jnp.sum(wj)
    new, res = removal.newton_step(inverse.Curvature(apply, params, x, y, l2, wj), grad=g)
    theta, unravel = ravel_pytree(params)
    v = theta - ravel_pytree(new)[0]
    keep = np.asarray(w) > 0
    data_b = data_dependent_bound(apply, v, unravel, tr.x[keep], gamma=gamma, x_norm=x_norm)
    r_max = float(np.sqrt((_xt(tr.x) ** 2).sum(1).max()))
    worst_b = worst_case_bound(m, int(n_prev), l2, r_max, b_norm=float(jnp.linalg.norm(b)),
                               residual=r_prev, gamma=gamma, c=c)
    return Removal(new, residual_norm(problem, new, w, b), data_b, worst_b,
                   float(res.residual))
