r"""Sequence log-likelihood pieces shared by the language-model unlearning methods.

Token data (``Dataset.targets == "tokens"``): ``x`` ``(B, T)`` token ids, ``y`` ``(B, T)``
next-token targets already shifted (``y[:, t]`` is the target of ``logits[:, t]``) and
``y < 0`` where a position is not labelled (prompt, padding). For QA data the labelled
positions are the answer and its ``<eos>``. A batch (:class:`unlearn.engine.Batch`) carries
per-sequence weights ``w``: the engine pads the last batch of an epoch with weight-0 rows, so
every reduction below multiplies *per-sequence* terms by ``w``.

The reductions follow open-unlearning (OU, locuslab/open-unlearning @ d3d7cf9;
``/work/shared/llm-unlearning.md`` §5, quirk 11), which differ between methods:

* :func:`token_mean_nll` — HuggingFace's ``outputs.loss``: the mean cross-entropy over every
  labelled token of the batch (token-weighted), used by GradAscent/GradDiff and as the retain
  ``NLL``: :math:`\sum_i w_i\sum_t m_{it}\ell_{it} / \max(\sum_i w_i\sum_t m_{it}, 1)`.
* :func:`sequence_nll` — OU's ``compute_batch_nll``: the per-sequence **sum**
  :math:`\sum_t m_{it}\ell_{it} = -\log\pi_\theta(y_i|x_i)` (NPO, DPO), and the count
  :math:`|y_i| = \sum_t m_{it}` (SimNPO divides by it).
* :func:`weighted_mean` — the mean over the sequences of a batch of a per-sequence term.

Every function takes ``apply(params, x) -> logits (B, T, V)``; the reference model
:math:`\pi_{\mathrm{ref}}` is ``apply`` at frozen params (``aux["teacher"]``, the params
before the request), behind ``stop_gradient``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unlearn.engine import Batch
from unlearn.methods.base import Unlearner, prepare_params
from unlearn.methods.loops import loop_unlearner
from unlearn.objective import cross_entropy
from unlearn.train import Fit, Problem

Params = Any

__all__ = ["DEFAULT_EPOCHS", "RETAIN_TERMS", "check_nonnegative", "check_positive", "check_retain",
           "combined_loss", "dpo_loss", "kl_retain", "label_mask", "lm_unlearner", "masked_mse",
           "npo_loss", "prepare_tokens", "require_tokens", "sequence_nll", "simnpo_loss",
           "token_mean_nll", "token_nll", "undial_loss", "weighted_mean"]


def label_mask(y: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``m_it = 1[y_it ≥ 0]``: the labelled positions, shape ``(B, T)``."""
    return (y >= 0).astype(dtype)


def token_nll(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy ``ℓ_it`` (0 where not labelled) and the mask ``m_it``."""
    m = label_mask(y)
    tok = cross_entropy(logits, jnp.where(y >= 0, y, 0))
    m = m.astype(tok.dtype)
    return tok * m, m


def sequence_nll(apply: Callable, params: Params, x: jax.Array,
                 y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(Σ_t m_t ℓ_t, Σ_t m_t)`` per sequence, each ``(B,)``: the summed negative
    log-likelihood :math:`-\\log\\pi_\\theta(y|x)` of the labelled tokens (OU
    ``compute_batch_nll``) and their number ``|y|`` (answer tokens plus ``<eos>``)."""
    tok, m = token_nll(apply(params, x), y)
    return jnp.sum(tok, axis=-1), jnp.sum(m, axis=-1)


def weighted_mean(values: jax.Array, w: jax.Array) -> jax.Array:
    """``Σ_i w_i v_i / max(Σ_i w_i, 1)``: the mean over a batch's real (weight-1) sequences."""
    w = w.astype(values.dtype)
    return jnp.sum(w * values) / jnp.maximum(jnp.sum(w), 1.0)


def _token_weighted(tok: jax.Array, m: jax.Array, w: jax.Array) -> jax.Array:
    """``Σ_i w_i Σ_t tok_it / max(Σ_i w_i Σ_t m_it, 1)`` (``tok`` already masked)."""
    w = w.astype(tok.dtype)
    return jnp.sum(w * jnp.sum(tok, -1)) / jnp.maximum(jnp.sum(w * jnp.sum(m, -1)), 1.0)


def token_mean_nll(apply: Callable, params: Params, b: Batch) -> jax.Array:
    """Mean cross-entropy over every labelled token of the batch (HuggingFace's
    ``outputs.loss``, token-weighted: long answers count more), rows weighted by ``w``."""
    tok, m = token_nll(apply(params, b.x), b.y)
    return _token_weighted(tok, m, b.w)


def _log_probs(apply, params, x):
    z = apply(params, x)
    return jax.nn.log_softmax(z.astype(jnp.result_type(z, jnp.float32)), axis=-1)


def kl_retain(apply: Callable, params: Params, teacher: Params, b: Batch) -> jax.Array:
    r"""OU's retain ``KL``: :math:`\mathrm{KL}(p_{\mathrm{ref}}\,\|\,p_\theta)` per position,
    :math:`\sum_v p_{\mathrm{ref}}(v)(\log p_{\mathrm{ref}}(v) - \log p_\theta(v))`, averaged
    over positions (``kl_div(..., reduction="batchmean")`` on flattened logits).

    OU averages over every position of its batch, prompt included, and also over the padding
    up to the batch's longest sequence (quirk 10). Here the sequences are padded to a fixed
    width, so padding would weigh arbitrarily: the positions averaged are each sequence's
    prompt and answer, ``t ≤ last labelled t`` (padding after the ``<eos>`` target excluded),
    token-weighted over the batch and rows weighted by ``w``.
    """
    lt = jax.lax.stop_gradient(_log_probs(apply, teacher, b.x))
    ls = _log_probs(apply, params, b.x)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    t = jnp.arange(b.y.shape[1])
    last = jnp.max(jnp.where(b.y >= 0, t, -1), axis=-1, keepdims=True)
    r = (t[None, :] <= last).astype(kl.dtype)
    return _token_weighted(kl * r, r, b.w)


def npo_loss(apply: Callable, params: Params, teacher: Params, b: Batch,
             beta: jax.Array) -> jax.Array:
    r"""NPO's forget loss (Zhang et al. 2024, "Negative preference optimization"; OU
    ``npo.py``): per sequence
    :math:`-\frac{2}{\beta}\log\sigma\bigl(-\beta[\log\pi_\theta(y|x) -
    \log\pi_{\mathrm{ref}}(y|x)]\bigr)` with summed log-likelihoods, averaged over the
    sequences."""
    nll, _ = sequence_nll(apply, params, b.x, b.y)
    ref, _ = sequence_nll(apply, teacher, b.x, b.y)
    log_ratio = -nll + jax.lax.stop_gradient(ref)
    return weighted_mean(-2.0 / beta * jax.nn.log_sigmoid(-beta * log_ratio), b.w)


def simnpo_loss(apply: Callable, params: Params, b: Batch, beta: jax.Array,
                delta: jax.Array) -> jax.Array:
    r"""SimNPO's forget loss (Fan et al. 2024, "Simplicity prevails"; OU ``simnpo.py``): per
    sequence :math:`-\frac{2}{\beta}\log\sigma\bigl(\beta(\mathrm{NLL}(y|x)/|y| - \delta)\bigr)`
    with the length-normalised NLL and no reference model, averaged over the sequences (OU's
    δ enters inside β(·), i.e. the paper's margin γ = βδ)."""
    nll, count = sequence_nll(apply, params, b.x, b.y)
    avg = nll / jnp.maximum(count, 1.0)
    return weighted_mean(-2.0 / beta * jax.nn.log_sigmoid(beta * (avg - delta)), b.w)


def dpo_loss(apply: Callable, params: Params, teacher: Params, win: Batch, lose: Batch,
             beta: jax.Array) -> jax.Array:
    r"""DPO (Rafailov et al. 2023) as OU's ``compute_dpo_loss``: per prompt
    :math:`-\frac{2}{\beta}\log\sigma\bigl(\beta[(\log\pi_\theta(y_w) -
    \log\pi_{\mathrm{ref}}(y_w)) - (\log\pi_\theta(y_l) - \log\pi_{\mathrm{ref}}(y_l))]\bigr)`
    with summed log-likelihoods; ``win`` and ``lose`` hold the same prompts in the same rows
    (rows weighted by ``lose.w``)."""
    nw, _ = sequence_nll(apply, params, win.x, win.y)
    nl, _ = sequence_nll(apply, params, lose.x, lose.y)
    rw, _ = sequence_nll(apply, teacher, win.x, win.y)
    rl, _ = sequence_nll(apply, teacher, lose.x, lose.y)
    rw, rl = jax.lax.stop_gradient(rw), jax.lax.stop_gradient(rl)
    margin = (-nw + rw) - (-nl + rl)
    return weighted_mean(-2.0 / beta * jax.nn.log_sigmoid(beta * margin), lose.w)


def undial_loss(apply: Callable, params: Params, teacher: Params, b: Batch,
                beta: jax.Array) -> jax.Array:
    r"""UNDIAL's forget loss (Dong et al. 2024, "UNDIAL: self-distillation with adjusted
    logits"; OU ``compute_undial_loss``): the soft-label cross-entropy
    :math:`-\sum_v q_t(v)\log p_\theta(v)` to the target
    :math:`q_t = \operatorname{softmax}(z_{\mathrm{ref},t} - \beta\,\mathrm{onehot}(y_t))`,
    averaged over the **labelled** tokens of the batch (token-weighted, rows weighted by
    ``w``).

    OU averages over every position without a label mask, so prompt and padding positions
    enter and a ``-100`` label indexes vocabulary id ``V − 100`` (quirk 9); following
    ``llm-unlearning.md`` §8 the mean here is over the labelled positions only.
    """
    zr = jax.lax.stop_gradient(apply(teacher, b.x))
    zr = zr.astype(jnp.result_type(zr, jnp.float32))
    m = label_mask(b.y, zr.dtype)
    onehot = jax.nn.one_hot(jnp.where(b.y >= 0, b.y, 0), zr.shape[-1], dtype=zr.dtype)
    q = jax.nn.softmax(zr - beta * onehot, axis=-1)
    ce = -jnp.sum(q * _log_probs(apply, params, b.x), axis=-1)
    return _token_weighted(ce * m, m, b.w)


def masked_mse(h: jax.Array, target: jax.Array, mask: jax.Array, w: jax.Array) -> jax.Array:
    r"""RMU's activation loss (Li et al. 2024, WMDP; OU ``compute_activation_loss``): per
    sequence :math:`\sum_t m_t\,\mathrm{mean}_d(h_{td} - c_{td})^2 / \sum_t m_t`, averaged
    over the sequences (rows weighted by ``w``; a row without masked positions counts 0).

    OU's code divides the ``(B,)`` sums by ``(B, 1)`` counts, which broadcasts to ``(B, B)``
    and averages :math:`\mathrm{mean}_j s_j \cdot \mathrm{mean}_i 1/n_i` when ``B > 1``; the
    per-sequence form here is what its comments and the WMDP paper state.
    """
    sq = jnp.mean((h - target) ** 2, axis=-1)
    mask = mask.astype(sq.dtype)
    per = jnp.sum(sq * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    return weighted_mean(per, w)


def require_tokens(problem: Problem, method: str) -> None:
    """Raise a clear ``ValueError`` unless the task is a language model on token data
    (``Dataset.targets == "tokens"``: next-token targets, ``y < 0`` not labelled)."""
    targets = getattr(problem.train, "targets", "classes")
    if targets != "tokens":
        raise ValueError(
            f"method {method!r} is a language-model unlearning method: it needs token data "
            f"(Dataset.targets='tokens', e.g. unlearn.data.char_corpus or the people benchmark) "
            f"and a sequence model such as unlearn.models.transformer; got targets={targets!r} "
            f"and model {problem.model.name!r}. For classifiers use 'neggrad', 'neggrad_plus', "
            "'scrub', 'finetune', 'influence', 'newton' or 'retrain'.")


def prepare_tokens(method: str, check: Callable[[Problem], Any] | None = None
                   ) -> Callable[[Problem, Fit], Any]:
    """:func:`unlearn.methods.base.prepare_params` for token tasks only (and ``check``, a
    method's own test of the problem, raising ValueError)."""

    def prepare(problem: Problem, trained: Fit):
        require_tokens(problem, method)
        if check is not None:
            check(problem)
        return prepare_params(problem, trained)

    return prepare


def _retain_nll(apply, params, aux, b: Batch) -> jax.Array:
    return token_mean_nll(apply, params, b)


def _retain_kl(apply, params, aux, b: Batch) -> jax.Array:
    return kl_retain(apply, params, aux["teacher"], b)


RETAIN_TERMS: dict[str, Callable] = {"nll": _retain_nll, "kl": _retain_kl}


def check_retain(retain: str | None, *, allow_none: bool = False) -> None:
    """Validate a retain-loss name (``"nll"``, ``"kl"``; ``None`` where allowed)."""
    allowed = (*RETAIN_TERMS, *((None,) if allow_none else ()))
    if retain not in allowed:
        raise ValueError(f"retain={retain!r}: choose one of {allowed} (the retain loss: "
                         "token-weighted NLL, or KL to the model before the request).")


@functools.cache
def combined_loss(forget_term: Callable, retain: str | None) -> Callable:
    r"""The engine loss :math:`\gamma L_{\mathrm{forget}} + \alpha L_{\mathrm{retain}}` (OU's
    ``GradDiff`` structure, inherited by NPO, SimNPO, DPO, RMU, UNDIAL) with ``γ``/``α`` read
    from ``aux["gamma"]``/``aux["alpha"]``; ``forget_term(apply, params, aux, forget, *alt)``
    and ``retain`` a name in :data:`RETAIN_TERMS`, or ``None`` for no retain term.

    Memoised: the same (term, retain) is the same function object, so the engine's compiled
    program is reused across requests and methods' instances.
    """
    if retain is not None:
        check_retain(retain)
    retain_term = None if retain is None else RETAIN_TERMS[retain]

    def loss(apply, params, aux, progress, retain_b: Batch, forget_b: Batch, *alt: Batch):
        value = aux["gamma"] * forget_term(apply, params, aux, forget_b, *alt)
        if retain_term is not None:
            value = value + aux["alpha"] * retain_term(apply, params, aux, retain_b)
        return value

    loss.__name__ = f"{getattr(forget_term, '__name__', 'forget')}+{retain}"
    return loss


def check_positive(**values: float) -> None:
    """Raise a ValueError naming the first argument that is not a finite number > 0."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a finite number > 0.")


def check_nonnegative(**values: float) -> None:
    """Raise a ValueError naming the first argument that is not a finite number ≥ 0."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) or v < 0:
            raise ValueError(f"{name}={v!r} must be a finite number >= 0.")


#: Epochs over the forget set of every language-model method (OU's 10 epochs).
DEFAULT_EPOCHS = 10


def lm_unlearner(name: str, forget_term: Callable | None, retain: str | None, hparams: dict,
                 *, epochs: int | None, lr: float | None, lr_scale: float,
                 checkpoint_every: int | None, setup: Callable | None = None,
                 check: Callable[[Problem], Any] | None = None) -> Unlearner:
    r"""A language-model method as a loop method (:func:`unlearn.methods.loops.loop_unlearner`):
    an epoch is the forget set's batches with retain batches cycled alongside (OU's
    ``ForgetRetainDataset``, anchor = forget), the loss :func:`combined_loss` of
    ``forget_term`` and ``retain`` (or, with ``forget_term=None``, the loss ``setup`` returns
    per request), ``prepare`` refusing non-token tasks.

    Run hyperparameters (OU's lr 1e-5, 10 epochs, batch 32 are for 7B models): ``epochs``
    over the forget set (default :data:`DEFAULT_EPOCHS` = 10, OU's), the training batch size,
    the training optimiser and learning rate ``lr`` or ``lr_scale`` × the training learning
    rate. ``checkpoint_every`` keeps the params every that many steps
    (``stats["checkpoints"] = [(step, params), ...]`` after steps k, 2k, ... and the last).
    """
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                               or epochs < 1):
        raise ValueError(f"epochs={epochs!r} must be a positive int (epochs over the forget "
                         "set) or None.")
    if lr is not None:
        check_positive(lr=lr)
    check_positive(lr_scale=lr_scale)
    loss = None if forget_term is None else combined_loss(forget_term, retain)
    return loop_unlearner(name, loss,
                          driver="forget", epochs=epochs or DEFAULT_EPOCHS, lr=lr,
                          hparams=hparams, lr_scale=lr_scale, setup=setup,
                          checkpoint_every=checkpoint_every,
                          prepare=prepare_tokens(name, check))
