"""LiSSA (:func:`lissa`): the stochastic Neumann-series estimator of Agarwal, Bullins & Hazan
(2017) in the form used by Koh & Liang (2017), with its divergence checks.

References: Agarwal, Bullins & Hazan, "Second-order stochastic optimization for machine learning
in linear time", JMLR 2017. Koh & Liang, "Understanding black-box predictions via influence
functions", ICML 2017.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from unlearn.solvers.lanczos import lanczos_extremes
from unlearn.solvers.operators import MatVec, _as_operator, _damped
from unlearn.solvers.solution import (
    Solution,
    _default_tol,
    _is_concrete,
    _rel_residual,
    _warn_if_not_converged,
)

Array = jax.Array


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
