r"""Influence functions: scores of every training point for many test points, and the
predicted leave-one-out change.

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
from unlearn.inverse import Backend, Curvature, Exact, InverseCurvature

Array = jax.Array
Params = Any
Apply = Callable[[Params, Array], Array]


def example_gradients(apply: Apply, params: Params, x: Array, y: Array,
                      measure: bool = False) -> Array:
    r"""Per-example loss gradients :math:`\nabla_\theta\ell(z)`, shape ``(m, p)`` (``vmap``);
    ``measure=True``: of the task's measurement :math:`m(z)` instead (margin, a logit, ...).
    Materialises ``m × p``: use it for a few points (test points, a forget set), and
    :func:`influence_scores` for all training points."""
    return curvature.per_example_grads(apply, params, x, y, measure=measure)


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
    return _over_chunks(lambda xc, yc: _scores_chunk(apply, params, xc, yc, s), x, y,
                        chunk_size)


def _over_chunks(fn, x: Array, y: Array, chunk_size: int) -> Array:
    """``fn(x_chunk, y_chunk)`` (outputs with the examples on axis 1) over chunks of the
    examples, concatenated: a Python loop of one compiled shape, the last chunk padded with
    copies of its first row (cut off again)."""
    n = x.shape[0]
    chunk = int(min(chunk_size, n))
    out = []
    for start in range(0, n, chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        m = xc.shape[0]
        if m < chunk:  # pad to the compiled shape
            xc = jnp.concatenate([xc, jnp.repeat(xc[:1], chunk - m, axis=0)])
            yc = jnp.concatenate([yc, jnp.repeat(yc[:1], chunk - m, axis=0)])
        out.append(fn(xc, yc)[:, :m])
    return jnp.concatenate(out, axis=1)


class Influence(NamedTuple):
    """``scores`` ``(n_test, n_train)`` = :math:`\\mathcal I_{\\text{up,loss}}` (``(n_test,
    n_train, T)`` from :func:`token_influence`); ``s_test``
    ``(n_test, p)`` the inverse-curvature test gradients; ``solution`` the solve's stats."""

    scores: Array
    s_test: Array
    solution: solvers.Solution


def _test_directions(curv: Curvature, x_test: Array, y_test: Array, backend, damping: float,
                     what: str):
    r"""One batched solve :math:`(H+\lambda_d)^{-1}\nabla m(z_t)` for every test point with
    ``backend`` (prepared here, or already an :class:`InverseCurvature`; default
    :class:`Exact`); warns when it did not converge. Returns the :class:`Solution`."""
    prepared = (backend if isinstance(backend, InverseCurvature)
                else (Exact() if backend is None else backend).prepare(curv, damping))
    sol = prepared.apply(example_gradients(curv.apply, curv.params, x_test, y_test,
                                           measure=True))
    if np.any(~np.asarray(sol.converged)):
        warnings.warn(f"{what} ({prepared.backend.name}): solve did not converge, relative "
                      f"residual {float(jnp.max(sol.residual)):.2e}", RuntimeWarning,
                      stacklevel=3)
    return sol


def influence_up_loss(curv: Curvature, x_test: Array, y_test: Array,
                      backend: Backend | InverseCurvature | None = None, *,
                      damping: float = 0.0, chunk_size: int = 512) -> Influence:
    r"""Koh & Liang (2017) eq. (2): ``scores[t, i]`` :math:`= -\nabla m(z^{\text{test}}_t)^\top
    (H + \lambda_d I)^{-1}\nabla\ell(z_i)`, for all training points and all test points, with
    :math:`m` the task's measurement (its loss by default, :math:`\mathcal I_{\text{up,loss}}`).

    :math:`H` is the curvature ``curv`` of the mean-normalised objective on its training data.
    The inverse-curvature products for ALL test points are one batched solve with the
    ``backend`` (``unlearn.inverse``; default :class:`~unlearn.inverse.Exact`), prepared here
    with ``damping`` — or pass an already prepared :class:`~unlearn.inverse.InverseCurvature`.
    The scores are then streamed over the training set in chunks by :func:`influence_scores`
    (no ``n × p`` gradient matrix).
    """
    sol = _test_directions(curv, x_test, y_test, backend, damping, "influence")
    scores = -influence_scores(curv.apply, curv.params, curv.x, curv.y, sol.x,
                               chunk_size=chunk_size)
    return Influence(scores, sol.x, sol)


def loo_test_loss_change(curv: Curvature, x_test: Array, y_test: Array,
                         backend: Backend | InverseCurvature | None = None, *,
                         damping: float = 0.0, correct_regulariser: bool = True) -> Array:
    r"""Predicted change of each test loss when each training point is left out, ``(n_test,
    n_train)``; positive means the test loss goes up without that point.

    ``correct_regulariser=True`` (default): :math:`(-\mathcal I + \lambda s_{\text{test}}^\top
    \theta^*)/(n-1)`, the one-step Newton prediction for the mean-normalised objective (module
    docstring). ``False``: Koh & Liang's :math:`-\mathcal I/n`.
    """
    out = influence_up_loss(curv, x_test, y_test, backend, damping=damping)
    n = curv.x.shape[0]
    if not correct_regulariser:
        return -out.scores / n
    return (-out.scores + curv.l2 * (out.s_test @ curv.theta)[:, None]) / (n - 1)


# --------------------------------------------------------------------------------------------
# Per-token scores
# --------------------------------------------------------------------------------------------


def sequence_token_losses(logits: Array, y: Array) -> Array:
    r"""The per-token terms of :func:`unlearn.objective.sequence_cross_entropy`, ``(n, T)``:
    :math:`w_{it}\ell_{it}` with :math:`\ell_{it} = -\log\operatorname{softmax}(z_{it})_{y_{it}}`
    and :math:`w_{it} = m_{it}/\max(\sum_s m_{is}, 1)`, :math:`m_{it} = 1[y_{it}\ge 0]`, so that
    their sum over ``t`` is the per-sequence loss. Padding positions are exactly 0."""
    mask = y >= 0
    tok = objective.cross_entropy(logits, jnp.where(mask, y, 0))
    m = mask.astype(tok.dtype)
    return tok * (m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0))


def token_losses_of(apply: Apply) -> Callable[[Array, Array], Array]:
    """The per-token loss terms ``fn(outputs, y) -> (n, T)`` of ``apply``'s task: defined for
    the sequence loss (:func:`sequence_token_losses`); any other loss raises ``ValueError``."""
    loss = objective.loss_of(apply)
    if loss.fn is objective.sequence_cross_entropy:
        return sequence_token_losses
    raise ValueError(f"per-token scores need a loss that is a sum of per-token terms; the task's "
                     f"loss is {loss.name!r}. Use a task with loss 'sequence_cross_entropy', or "
                     "pass token_loss=fn(outputs, y) -> (n, T) whose sum over T is the loss.")


@functools.partial(jax.jit, static_argnames=("apply", "token_loss"))
def _token_scores_chunk(apply: Apply, token_loss: Callable, params: Params, xc: Array,
                        yc: Array, s: Array) -> Array:
    theta, unravel = ravel_pytree(params)

    def terms(t):
        return token_loss(apply(unravel(t), xc), yc)  # (chunk, T)

    _, lin = jax.linearize(terms, theta)
    return jax.vmap(lin)(s.astype(theta.dtype))  # (m, chunk, T)


def token_scores(apply: Apply, params: Params, x: Array, y: Array, s: Array,
                 chunk_size: int = 64,
                 token_loss: Callable[[Array, Array], Array] | None = None) -> Array:
    r""":math:`S_{qit} = s_q^\top\nabla_\theta(w_{it}\ell_{it})` for every row :math:`s_q` of
    ``s`` ``(m, p)``, every training sequence :math:`i` and every position :math:`t`: shape
    ``(m, n, T)``. Since the per-sequence loss is :math:`\ell_i = \sum_t w_{it}\ell_{it}`
    (:func:`sequence_token_losses`), ``token_scores(...).sum(-1)`` equals
    :func:`influence_scores` (up to rounding), and a padding position (:math:`w_{it} = 0`)
    scores exactly 0.

    Computed like :func:`influence_scores`: per chunk of ``chunk_size`` sequences one
    ``jax.linearize`` of the ``(chunk, T)`` per-token terms, ``vmap``-ed over the ``m``
    directions (forward mode; memory :math:`O(m\cdot\text{chunk}\cdot T + \text{chunk
    activations})`, no per-token gradients). ``token_loss``: ``fn(outputs, y) -> (n, T)``,
    the task's per-token terms by default (:func:`token_losses_of`).
    """
    fn = token_losses_of(apply) if token_loss is None else token_loss
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: pass a positive integer.")
    s = jnp.asarray(s)
    if s.ndim != 2:
        raise ValueError(f"s must be (m, p) directions as rows; got shape {s.shape}.")
    return _over_chunks(lambda xc, yc: _token_scores_chunk(apply, fn, params, xc, yc, s), x, y,
                        chunk_size)


def token_influence(curv: Curvature, x_test: Array, y_test: Array,
                    backend: Backend | InverseCurvature | None = None, *,
                    damping: float = 0.0, chunk_size: int = 64,
                    token_loss: Callable[[Array, Array], Array] | None = None) -> Influence:
    r"""Per-token influence: ``scores[q, i, t]`` :math:`= -\nabla m(z^{\text{test}}_q)^\top
    (H + \lambda_d I)^{-1}\nabla_\theta(w_{it}\ell_{it})`, shape ``(n_test, n_train, T)``, the
    contribution of training sequence :math:`i`'s loss term at position :math:`t` to
    :func:`influence_up_loss`'s score; ``scores.sum(-1)`` is that per-sequence score with the
    same backend and damping, and padding positions score exactly 0.

    **Which "token".** kronfluence (``compute_per_token_scores``; Grosse et al. 2023) attributes
    to the position where a dense layer *acts*: :math:`\sum_{\text{layers}}\langle\hat G_q,
    g_{i,t}a_{i,t}^\top\rangle` with :math:`g_{i,t}` the gradient of the whole sequence loss at
    that layer's output at :math:`t` (later tokens' losses enter through attention). Here a
    token is a *loss term*: position :math:`t`'s next-token prediction, with everything it
    depends on (earlier positions through attention included). Chosen because (1) it is defined
    for every parameter — embeddings, LayerNorm, any module and any backend, not just dense
    layers under a Kronecker preconditioner; (2) it is the first-order effect of up-weighting
    one target token's loss, the unit a user can remove or mask in training data; (3) it sums
    exactly to the per-sequence score. Both definitions agree on the sum over :math:`t`.

    The inverse-curvature products are one batched solve as in :func:`influence_up_loss`
    (``s_test`` and ``solution`` returned alike); the scores are streamed by
    :func:`token_scores` in chunks of ``chunk_size`` sequences.
    """
    fn = token_losses_of(curv.apply) if token_loss is None else token_loss
    sol = _test_directions(curv, x_test, y_test, backend, damping, "token influence")
    scores = -token_scores(curv.apply, curv.params, curv.x, curv.y, sol.x,
                           chunk_size=chunk_size, token_loss=fn)
    return Influence(scores, sol.x, sol)


__all__ = ["Influence", "example_gradients", "influence_scores", "influence_up_loss",
           "loo_test_loss_change", "sequence_token_losses", "token_influence",
           "token_losses_of", "token_scores"]
