r"""K-FAC and EK-FAC curvature for the dense layers of a flax model (own implementation).

For a dense layer :math:`z = W^\top a + b` write :math:`\tilde a = (1, a)` and
:math:`V = [b; W]` (shape ``(d_in + 1, d_out)``, the parameter-vector order of
``ravel_pytree``: bias first; a layer without bias has :math:`\tilde a = a`, :math:`V = W`).
The Gauss–Newton matrix of the weighted mean loss is

.. math::

    G = \sum_i \bar w_i\, J_i^\top H_i J_i
      = \sum_i \bar w_i \sum_{j} \operatorname{vec}(D_{ij})\operatorname{vec}(D_{ij})^\top,
    \qquad D_{ij} = \sum_t \tilde a_{it}\, g_{itj}^\top ,

with :math:`\bar w = w / \max(\sum w, 1)`, :math:`H_i = C_iC_i^\top` the loss's Hessian in
the model outputs, and :math:`g_{itj} = (\partial f_i/\partial z_{it})^\top c_{ij}` the
layer-output "pseudo-gradient" at position :math:`t` back-propagated from the column
:math:`c_{ij}` of the root :math:`C_i` — the *exact* expectation over the model's label
distribution (the "true Fisher" for the cross-entropy), not a sampled label, so no Monte-Carlo
noise. A layer applied to ``(batch, features)`` inputs has one position; one applied to
``(batch, tokens, features)`` inputs (a transformer's projections and MLPs) has one per token,
and :math:`D_{ij}` sums the per-token outer products (the weight is shared across tokens).

* **K-FAC** (Martens & Grosse 2015; over tokens as Grosse et al. 2023, §3.1, "tokens as
  independent"): :math:`G_{\text{layer}} \approx A \otimes S` with
  :math:`A = \sum_i \bar w_i \sum_t \mu_{it}\, \tilde a_{it}\tilde a_{it}^\top` (a mean over
  each example's positions, :math:`\sum_t\mu_{it} = 1`) and
  :math:`S = \sum_i\bar w_i\sum_t\sum_j g_{itj}g_{itj}^\top` (a sum over positions). For the
  per-sequence mean token loss (``"sequence_cross_entropy"``) :math:`\mu_{it} = m_{it}/c_i`,
  the token's weight in the loss (:math:`m_{it} = 1[y_{it}\ge 0]`, :math:`c_i = \max(\sum_t
  m_{it}, 1)`; padding positions do not enter :math:`A`) for layers whose positions are the
  targets' tokens; otherwise :math:`\mu_{it} = 1/T`. With one position this is the classic
  :math:`A = \sum_i\bar w_i\tilde a_i\tilde a_i^\top`, :math:`S = \sum_i\bar w_i\sum_j
  g_{ij}g_{ij}^\top`.
* **EK-FAC** (George et al. 2018; Grosse et al. 2023 eq. (20), as in kronfluence): keep the
  Kronecker eigenbasis :math:`Q_A \otimes Q_S` of :math:`A = Q_A\Lambda_AQ_A^\top`,
  :math:`S = Q_S\Lambda_SQ_S^\top` and replace the eigenvalues by the exact diagonal of
  :math:`G_{\text{layer}}` in that basis, from the per-example (per-sequence) pseudo-gradients:
  :math:`\Lambda^*_{ab} = \sum_i\bar w_i\sum_j (Q_A^\top D_{ij} Q_S)_{ab}^2` (with one position
  :math:`D_{ij}` is rank one and this is :math:`\sum_i\bar w_i\sum_j (q_{A,a}^\top\tilde a_i)^2
  (q_{S,b}^\top g_{ij})^2`).
* **Diagonal blocks** for the parameters of ``nn.Embed`` (token/position embeddings, a tied
  output layer) and ``nn.LayerNorm`` modules: the exact GGN diagonal
  :math:`\sum_i\bar w_i\sum_j (J_i^\top c_{ij})_k^2` — EK-FAC's corrected eigenvalues in the
  trivial (identity) basis; the same for K-FAC. Any other non-Dense parameter (convolutions,
  BatchNorm) is refused. A Dense layer applied twice in one forward pass (shared weights) is
  refused too: its curvature is not one Kronecker product.

**Output roots.** For ``(n, K)`` outputs with a label-free output Hessian (cross-entropy,
squared error) the root is the loss's ``output_root`` (``K`` pseudo-samples per example); with
targets ``y`` any loss's ``output_root`` (flattened outputs) works. For the sequence loss over
logits ``(n, T, V)`` the output Hessian is block-diagonal over tokens,
:math:`H_{it} = (m_{it}/c_i)(\operatorname{diag}p_{it} - p_{it}p_{it}^\top)`
(:func:`unlearn.objective.sequence_output_root`); its ``T·V`` pseudo-samples per sequence are
run ``V`` at a time (one token's block) in a ``lax.scan``. It depends on the padding mask, so
``y`` is required. Cost: ``T·V`` backward passes per sequence and pass (exact, deterministic).

**Sampled labels** (``samples=k``, the "true Fisher" estimate of Martens & Grosse 2015 §5 and
Grosse et al. 2023 §2.2, kronfluence's default): instead of the root's columns, ``k``
pseudo-samples :math:`c_{ij} = u_{ij}/\sqrt k` per example whose outer product is the
output Hessian in expectation, :math:`\mathbb E[u u^\top] = H_i` — for the cross-entropies
:math:`u_{t} = \sqrt{\mu_t}\,(p_t - e_{\hat y_t})` with a label :math:`\hat y_t \sim p_t`
drawn from the model per token (independent over tokens, so the cross-token terms vanish in
expectation; :math:`\mu_t = m_t/c` for the sequence loss, 1 for a classifier), for any other
loss :math:`u = C_i z` with :math:`z \sim N(0, I)`. Every statistic above is linear in
:math:`c_{ij}c_{ij}^\top`, so the factors, the EK-FAC eigenvalues and the diagonal blocks are
unbiased estimates of the exact ones, at ``k`` backward passes per example instead of ``T·V``
(one label draw per pass: the factor and correction passes draw independently). The draw of
example ``i`` is ``fold_in(fold_in(key, pass), i)`` for its row ``i`` of ``x``: the same
whatever the chunking, the processes or the devices.

Both approximations are block-diagonal over layers; the inverse of the damped curvature
:math:`G + (\lambda + \lambda_d) I` on a vector :math:`V` of one layer is
:math:`Q_A\big[(Q_A^\top V Q_S) \oslash (\Lambda + \lambda + \lambda_d)\big]Q_S^\top`
(:math:`\Lambda = \Lambda_A\Lambda_S^\top` for K-FAC), and :math:`v \oslash (\operatorname{diag}
+ \lambda + \lambda_d)` on a diagonal block. Facts used by the tests: for softmax regression
at parameters where every example has the same :math:`p_i` (e.g. zero weights),
:math:`G = A\otimes S` exactly, so K-FAC and EK-FAC are exact; in general :math:`\Lambda^*`
equals the diagonal of the exact GGN block in the Kronecker eigenbasis, and a diagonal block
the diagonal of the GGN.

Statistics are streamed over chunks of examples (two passes: factors, then corrected
eigenvalues), so memory is that of one chunk's pseudo-gradients plus the factors, never
:math:`O(n p)`; for token models the chunk is reduced so that it holds at most
:data:`TOKEN_BUDGET` (example, pseudo-sample, position) triples. Each example is run on its
own (``vmap``), which gives the per-example gradients of the diagonal blocks. Layers are found
by intercepting ``flax.linen`` module calls (``nn.intercept_methods``) of the eval-mode
``apply``.

Why not ``kfac-jax`` (DeepMind): it is an optimiser — its curvature estimator needs the model's
loss registered with its tags and is updated inside its own optimiser state, with Monte-Carlo
sampled Fisher and no eigenvalue correction (what influence needs is a fixed, prepared-once
factorisation with EK-FAC eigenvalues), and it is not installed here: ``pip install --dry-run
kfac-jax`` would add kfac-jax 0.0.8 plus distrax, tfp-nightly, chex, gast and toolz. The factors
here are checked against dense float64 GGN matrices and explicit per-token loops
(``tests/test_kfac.py``, ``tests/test_transformer.py``).

References: Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature", ICML 2015. George, Laurent, Bouthillier, Ballas & Vincent, "Fast approximate natural
gradient descent in a Kronecker-factored eigenbasis", NeurIPS 2018. Grosse et al., "Studying
large language model generalization with influence functions", 2023 (§2.2, §3.1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from unlearn.objective import (
    _token_weights,
    cross_entropy,
    loss_of,
    sequence_cross_entropy,
    sequence_output_root,
)

Array = jax.Array
PyTree = Any

__all__ = ["DIAGONAL_MODULES", "TOKEN_BUDGET", "KFACFactors", "kfac_factors", "kfac_inverse",
           "layer_names"]

DIAGONAL_MODULES = (nn.Embed, nn.LayerNorm)
"""Module types whose parameters get an exact GGN-diagonal block."""

TOKEN_BUDGET = 1 << 16
"""Most (example, pseudo-sample, position) triples in one chunk of a token model."""


class KFACFactors(NamedTuple):
    """Per dense layer (keyed by its module path ``'Dense_0'``, ``'block_0/attn/query'``, ...):
    eigenbases ``qa`` ``(d_in+1, d_in+1)`` (``(d_in, d_in)`` without bias), ``qb``
    ``(d_out, d_out)``, K-FAC eigenvalues ``lam_kfac`` and EK-FAC corrected eigenvalues
    ``lam_ekfac`` (both ``(d_in+1, d_out)``); ``diag``: per parameter of an ``nn.Embed`` /
    ``nn.LayerNorm`` module (keyed by its path, ``'embed/embedding'``) the exact GGN
    diagonal, the shape of the parameter."""

    qa: dict[str, Array]
    qb: dict[str, Array]
    lam_kfac: dict[str, Array]
    lam_ekfac: dict[str, Array]
    diag: dict[str, Array] = {}


class _Layer(NamedTuple):
    lead: tuple[int, ...]  # positions per example (() for (batch, features) inputs)
    d_in: int
    d_out: int
    bias: bool


class _Layout(NamedTuple):
    dense: tuple[tuple[str, _Layer], ...]
    diag: tuple[str, ...]
    out: tuple[int, ...]  # the outputs of one example


def _join(path: str, leaf: str) -> str:
    return f"{path}/{leaf}" if path else leaf


def _inner(params: PyTree) -> PyTree:
    return params["params"] if "params" in params else params


def _flat(params: PyTree) -> dict[str, Array]:
    return traverse_util.flatten_dict(_inner(params), sep="/")


def _rebuild(params: PyTree, flat: dict[str, Array]) -> PyTree:
    new = traverse_util.unflatten_dict(flat, sep="/")
    return {**params, "params": new} if "params" in params else new


def _interceptor(eps: dict[str, Array] | None, inputs: dict[str, Array],
                 types: dict[str, type] | None):
    def ic(next_fun, args, kwargs, context):
        mod = context.module
        path = "/".join(mod.path)
        if types is not None:
            types.setdefault(path, type(mod))
        if isinstance(mod, nn.Dense) and context.method_name == "__call__":
            if path in inputs:
                raise ValueError(f"K-FAC: dense layer {path!r} is applied more than once in one "
                                 "forward pass (shared weights); its curvature is not one "
                                 "Kronecker product. Use backend='cg' or 'pcg' for this model.")
            inputs[path] = args[0] if args else kwargs["inputs"]
            out = next_fun(*args, **kwargs)
            return out if eps is None else out + eps[path]
        return next_fun(*args, **kwargs)

    return ic


def _layout(apply: Callable, params: PyTree, x: Array) -> _Layout:
    """The dense layers ``apply`` calls (positions, widths, bias) and the diagonal-block
    parameters; raises ``ValueError`` naming any other parameter (e.g. convolutions)."""
    inputs: dict[str, Array] = {}
    types: dict[str, type] = {}

    def run(p, xx):
        inputs.clear()
        with nn.intercept_methods(_interceptor(None, inputs, types)):
            return apply(p, xx)

    out = jax.eval_shape(run, params, x[:2])
    flat = _flat(params)
    dense = {k: _Layer(tuple(a.shape[1:-1]), int(a.shape[-1]),
                       int(flat[_join(k, "kernel")].shape[-1]), _join(k, "bias") in flat)
             for k, a in inputs.items()}
    diag, other = [], set()
    for path in flat:
        mod, _, leaf = path.rpartition("/")
        if mod in dense and leaf in ("kernel", "bias"):
            continue
        if mod in types and issubclass(types[mod], DIAGONAL_MODULES):
            diag.append(path)
        else:
            other.add(mod or path)
    if other:
        raise ValueError(f"K-FAC/EK-FAC here covers flax Dense layers only (Kronecker blocks; "
                         f"nn.Embed and nn.LayerNorm parameters get diagonal blocks); the model "
                         f"also has parameters {sorted(other)} (e.g. convolutions). Use "
                         "backend='cg', 'pcg', 'arnoldi' or 'lissa' for this model.")
    return _Layout(tuple(sorted(dense.items())), tuple(sorted(diag)), tuple(out.shape[1:]))


def layer_names(apply: Callable, params: PyTree, x: Array) -> dict[str, tuple[int, int]]:
    """``{path: (d_in, d_out)}`` of the dense layers ``apply`` calls, checked to cover every
    parameter together with the diagonal blocks (raises ``ValueError`` naming the others,
    e.g. convolutions)."""
    return {k: (lay.d_in, lay.d_out) for k, lay in _layout(apply, params, x).dense}


def _is_sequence(apply: Callable) -> bool:
    return loss_of(apply).fn is sequence_cross_entropy


def _forward(apply, params, x):
    """Outputs and every dense layer's inputs ``(m, *positions, d_in)``."""
    inputs: dict[str, Array] = {}
    with nn.intercept_methods(_interceptor(None, inputs, None)):
        out = apply(params, x)
    return out, dict(inputs)


def _pseudo_grads(apply, layout: _Layout, params, x, cots, with_diag: bool):
    """Per example ``i`` and pseudo-sample ``j`` (the cotangents ``cots`` ``(m, P, *out)``):
    the dense layers' output gradients ``g`` ``{k: (m, P, *positions, d_out)}`` and, with
    ``with_diag``, the gradients of the diagonal-block parameters ``{path: (m, P, *shape)}``."""
    dtype = cots.dtype
    flat = _flat(params)
    diag0 = {k: flat[k] for k in layout.diag} if with_diag else {}
    eps0 = {k: jnp.zeros((1, *lay.lead, lay.d_out), dtype) for k, lay in layout.dense}

    def one(xi, ci):
        def f(eps, leaves):
            p = _rebuild(params, {**flat, **leaves}) if leaves else params
            with nn.intercept_methods(_interceptor(eps, {}, None)):
                return apply(p, xi[None])

        out, vjp = jax.vjp(f, eps0, diag0)
        g, d = jax.vmap(vjp)(ci[:, None].astype(out.dtype))
        return {k: v[:, 0] for k, v in g.items()}, d

    return jax.vmap(one)(x, cots)


def _sampled(apply, logits, y, dtype, keys, samples: int) -> Array:
    r"""``samples`` pseudo-sample cotangents per example, ``(m, samples, *out)``, each with
    :math:`\mathbb E[cc^\top] = H_i/\text{samples}` (module docstring, "Sampled labels");
    ``keys``: one per example."""
    loss = loss_of(apply)
    scale = 1.0 / math.sqrt(samples)
    if loss.fn is cross_entropy or _is_sequence(apply):
        p = jax.nn.softmax(logits.astype(dtype), axis=-1)
        draw = jax.vmap(lambda k, z: jax.random.categorical(k, z, shape=(samples,) + z.shape[:-1]))
        lab = draw(keys, logits.astype(dtype))  # (m, samples, *positions)
        u = p[:, None] - jax.nn.one_hot(lab, p.shape[-1], dtype=dtype)
        if _is_sequence(apply):
            u = u * jnp.sqrt(_token_weights(y, dtype))[:, None, :, None]
        return u * scale
    k = math.prod(logits.shape[1:])
    root = loss.output_root(logits, y, dtype)  # (m, K, K)
    z = jax.vmap(lambda kk: jax.random.normal(kk, (k, samples), dtype))(keys)
    return jnp.swapaxes(root @ z, 1, 2).reshape((logits.shape[0], samples) + logits.shape[1:]) \
        * scale


def _blocks(apply, logits, y, dtype, step, acc, keys=None, samples=None):
    """Run ``acc = step(acc, cots)`` over the pseudo-sample cotangents ``(m, P, *out)`` of
    the loss's output root: one block (``P = K``) for a flat root, ``T`` blocks of ``V`` (one
    token's root each, in a ``lax.scan``) for the sequence loss; with ``samples``, one block
    of that many sampled cotangents (:func:`_sampled`)."""
    m = logits.shape[0]
    if samples is not None:
        return step(acc, _sampled(apply, logits, y, dtype, keys, samples))
    if _is_sequence(apply):
        r = sequence_output_root(logits, y, dtype)  # (m, T, V, V)
        _, t, v, _ = r.shape

        def body(carry, s):
            cols = jnp.swapaxes(jax.lax.dynamic_index_in_dim(r, s, 1, keepdims=False), 1, 2)
            cots = jnp.zeros((m, v, t, v), dtype)
            cots = jax.lax.dynamic_update_index_in_dim(cots, cols[:, :, None], s, 2)
            return step(carry, cots), None

        acc, _ = jax.lax.scan(body, acc, jnp.arange(t))
        return acc
    k = math.prod(logits.shape[1:])
    root = loss_of(apply).output_root(logits, y, dtype)
    if root.shape != (m, k, k):
        raise ValueError(f"K-FAC: loss {loss_of(apply).name!r} gave an output root of shape "
                         f"{root.shape} for outputs {logits.shape}; expected {(m, k, k)}.")
    return step(acc, jnp.swapaxes(root, 1, 2).reshape((m, k) + logits.shape[1:]))


def _with_ones(a: Array, bias: bool) -> Array:
    if not bias:
        return a
    return jnp.concatenate([jnp.ones(a.shape[:-1] + (1,), a.dtype), a], axis=-1)


def _position_weights(apply, lay: _Layer, y, dtype, m: int) -> Array:
    """:math:`\\mu_{it}` ``(m, *positions)``: per example, the positions' weights in
    :math:`A` (they sum to 1, or 0 for a sequence of padding only)."""
    if not lay.lead:
        return jnp.ones((m,), dtype)
    if _is_sequence(apply) and y is not None and tuple(y.shape[1:]) == lay.lead:
        mask = (y >= 0).astype(dtype)
        return mask / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    return jnp.full((m,) + lay.lead, 1.0 / math.prod(lay.lead), dtype)


@functools.partial(jax.jit, static_argnames=("apply", "layout", "samples"))
def _factor_pass(apply, layout, params, x, y, wbar, keys, samples):
    """This chunk's share of every ``A``, ``S`` and diagonal block."""
    dtype = wbar.dtype
    m = x.shape[0]
    logits, acts = _forward(apply, params, x)
    a_f = {}
    for k, lay in layout.dense:
        a = _with_ones(acts[k].astype(dtype), lay.bias).reshape(m, -1, lay.d_in + lay.bias)
        mu = (_position_weights(apply, lay, y, dtype, m).reshape(m, -1) * wbar[:, None])
        a_f[k] = jnp.einsum("mta,mtb,mt->ab", a, a, mu)
    flat = _flat(params)
    init = ({k: jnp.zeros((lay.d_out, lay.d_out), dtype) for k, lay in layout.dense},
            {k: jnp.zeros(flat[k].shape, dtype) for k in layout.diag})

    def step(acc, cots):
        s_f, d_f = acc
        g, d = _pseudo_grads(apply, layout, params, x, cots, True)
        new = {}
        for k, lay in layout.dense:
            gg = g[k].reshape(m, -1, lay.d_out)  # every (pseudo-sample, position)
            new[k] = s_f[k] + jnp.einsum("mjo,mjq,m->oq", gg, gg, wbar)
        d_f = {k: d_f[k] + jnp.einsum("mj...,m->...", d[k] ** 2, wbar) for k in layout.diag}
        return new, d_f

    s_f, d_f = _blocks(apply, logits, y, dtype, step, init, keys, samples)
    return a_f, s_f, d_f


@functools.partial(jax.jit, static_argnames=("apply", "layout", "samples"))
def _correction_pass(apply, layout, params, x, y, wbar, keys, samples, qa, qb):
    r"""This chunk's share of :math:`\Lambda^*_{ab} = \sum_i\bar w_i\sum_j
    (Q_A^\top D_{ij}Q_S)_{ab}^2`."""
    dtype = wbar.dtype
    m = x.shape[0]
    logits, acts = _forward(apply, params, x)
    aq = {k: _with_ones(acts[k].astype(dtype), lay.bias).reshape(m, -1, lay.d_in + lay.bias)
          @ qa[k] for k, lay in layout.dense}  # (m, L, d_in+1)
    init = {k: jnp.zeros((lay.d_in + lay.bias, lay.d_out), dtype) for k, lay in layout.dense}

    def step(acc, cots):
        g, _ = _pseudo_grads(apply, layout, params, x, cots, False)
        out = {}
        for k, lay in layout.dense:
            gq = g[k].reshape(m, cots.shape[1], -1, lay.d_out) @ qb[k]  # (m, P, L, d_out)
            if not lay.lead:  # D_ij = ã_i g_ijᵀ is rank one: square the two projections
                out[k] = acc[k] + jnp.einsum("ma,mo,m->ao", aq[k][:, 0] ** 2,
                                             jnp.sum(gq[:, :, 0] ** 2, axis=1), wbar)
            else:
                dq = jnp.einsum("mta,mjto->mjao", aq[k], gq)
                out[k] = acc[k] + jnp.einsum("mjao,m->ao", dq ** 2, wbar)
        return out

    return _blocks(apply, logits, y, dtype, step, init, keys, samples)


def _check_targets(apply, x, y) -> None:
    loss = loss_of(apply)
    if y is None and (loss.root is None or _is_sequence(apply)):
        raise ValueError(f"K-FAC/EK-FAC for loss {loss.name!r} needs the targets: pass y= (its "
                         "output Hessian depends on them, e.g. the padding mask of the sequence "
                         "loss); only label-free output Hessians (cross-entropy, squared error) "
                         "work without.")
    if y is not None and jnp.shape(y)[0] != x.shape[0]:
        raise ValueError(f"y has {jnp.shape(y)[0]} rows but x has {x.shape[0]} examples.")


def _chunk(chunk_size: int, apply, layout: _Layout, samples: int | None = None) -> int:
    """``chunk_size``, reduced for token models to keep one block's pseudo-gradients (per
    example: pseudo-samples × positions) within :data:`TOKEN_BUDGET`."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: pass a positive integer.")
    positions = max([math.prod(lay.lead) for _, lay in layout.dense] or [1])
    if positions == 1:
        return chunk_size
    pseudo = samples or (layout.out[-1] if _is_sequence(apply) else math.prod(layout.out))
    return max(1, min(chunk_size, TOKEN_BUDGET // (pseudo * positions)))


def kfac_factors(apply: Callable, params: PyTree, x: Array, w: Array | None = None,
                 chunk_size: int = 1024, *, y: Array | None = None,
                 samples: int | None = None, key: Array | None = None) -> KFACFactors:
    """K-FAC factors, EK-FAC corrected eigenvalues and diagonal blocks of the GGN at
    ``params`` (see module docstring), streamed over chunks of ``chunk_size`` examples
    (weights ``w``, default 1). ``y``: the targets — required when the loss's output Hessian
    depends on them (the sequence loss: its padding mask), ignored by the cross-entropy and
    squared error. Integer inputs (token ids) are kept as they are.

    ``samples``: None (default) for the exact output-Hessian roots; an int ``k`` ≥ 1 for
    ``k`` sampled-label pseudo-samples per example (module docstring: unbiased, ``k``
    backward passes per example and pass instead of ``K`` or ``T·V``), drawn from ``key``
    (a ``jax.random`` key, required then)."""
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples={samples!r}: pass None (exact roots) or a positive int "
                             "(sampled labels per example).")
        if key is None:
            raise ValueError("samples is set: pass key= (a jax.random key) for the label "
                             "draws.")
    n = x.shape[0]
    theta, _ = ravel_pytree(params)
    dtype = theta.dtype
    w = jnp.ones(n, dtype) if w is None else jnp.asarray(w, dtype)
    if w.shape != (n,):
        raise ValueError(f"w must have shape ({n},); got {w.shape}.")
    wbar = w / jnp.maximum(jnp.sum(w), 1.0)
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(dtype)
    _check_targets(apply, x, y)
    y = None if y is None else jnp.asarray(y)
    layout = _layout(apply, params, x)
    chunk = _chunk(chunk_size, apply, layout, samples)

    def part(s, stage):
        keys = None
        if samples is not None:
            keys = jax.vmap(functools.partial(jax.random.fold_in, jax.random.fold_in(key, stage)))(
                jnp.arange(s, min(s + chunk, n)))
        return (x[s:s + chunk], None if y is None else y[s:s + chunk], wbar[s:s + chunk], keys,
                samples)

    starts = range(0, n, chunk)
    acc = None
    for s in starts:
        out = _factor_pass(apply, layout, params, *part(s, 0))
        acc = out if acc is None else jax.tree.map(jnp.add, acc, out)
    a_f, s_f, diag = acc
    qa, qb, lam_k = {}, {}, {}
    for k, _ in layout.dense:
        ea, qa[k] = jnp.linalg.eigh(0.5 * (a_f[k] + a_f[k].T))
        eb, qb[k] = jnp.linalg.eigh(0.5 * (s_f[k] + s_f[k].T))
        lam_k[k] = jnp.maximum(ea, 0.0)[:, None] * jnp.maximum(eb, 0.0)[None, :]
    lam_e = None
    for s in starts:
        out = _correction_pass(apply, layout, params, *part(s, 1), qa, qb)
        lam_e = out if lam_e is None else jax.tree.map(jnp.add, lam_e, out)
    return KFACFactors(qa, qb, lam_k, lam_e, diag)


def _inverse_apply(unravel, qa, qb, lam, diag, shift, v):
    tree = unravel(v)
    flat = _flat(tree)
    for k in qa:
        kk, bk = _join(k, "kernel"), _join(k, "bias")
        bias = bk in flat
        vmat = jnp.concatenate([flat[bk][None, :], flat[kk]], axis=0) if bias else flat[kk]
        core = (qa[k].T @ vmat @ qb[k]) / (lam[k] + shift)
        out = qa[k] @ core @ qb[k].T
        if bias:
            flat[bk], flat[kk] = out[0], out[1:]
        else:
            flat[kk] = out
    for k in diag:
        flat[k] = flat[k] / (diag[k] + shift)
    return ravel_pytree(_rebuild(tree, flat))[0]


def kfac_inverse(factors: KFACFactors, params: PyTree, shift: float | Array,
                 kind: str = "ekfac") -> Partial:
    r"""``v -> (G_{\text{(E)K-FAC}} + \text{shift}\,I)^{-1} v`` on flat vectors, as a
    ``Partial`` (usable as a CG preconditioner or as the approximate inverse itself).
    ``shift`` is the L2 coefficient plus the damping; ``kind`` is ``'ekfac'`` or ``'kfac'``
    (the diagonal blocks are the same for both)."""
    if kind not in ("ekfac", "kfac"):
        raise ValueError(f"kind={kind!r}: choose 'ekfac' or 'kfac'.")
    _, unravel = ravel_pytree(params)
    lam = factors.lam_ekfac if kind == "ekfac" else factors.lam_kfac
    if float(shift) <= 0:
        raise ValueError(f"shift={shift!r} must be > 0 (L2 + damping): the K-FAC curvature is "
                         "singular without it.")
    return Partial(functools.partial(_inverse_apply, unravel), factors.qa, factors.qb, lam,
                   dict(factors.diag), jnp.asarray(shift))
