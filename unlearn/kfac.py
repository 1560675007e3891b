r"""K-FAC and EK-FAC curvature for the dense layers of a flax model (own implementation).

For a dense layer :math:`z = W^\top a + b` write :math:`\tilde a = (1, a)` and
:math:`V = [b; W]` (shape ``(d_in + 1, d_out)``, the parameter-vector order of
``ravel_pytree``: bias first). The Gauss–Newton matrix of the weighted mean cross-entropy is

.. math::

    G = \sum_i \bar w_i\, J_i^\top (\operatorname{diag}p_i - p_ip_i^\top) J_i
      = \sum_i \bar w_i \sum_{k=1}^K \operatorname{vec}(\tilde a_i g_{ik}^\top)
        \operatorname{vec}(\tilde a_i g_{ik}^\top)^\top ,

with :math:`\bar w = w / \sum w` and :math:`g_{ik} = J_{z,i}^\top c_{ik}` the layer-output
"pseudo-gradients" back-propagated from the columns :math:`c_{ik}` of the curvature root
:math:`C_i C_i^\top = \operatorname{diag}p_i - p_ip_i^\top` — the *exact* expectation over the
model's label distribution (the "true Fisher"), not a sampled label, so no Monte-Carlo noise.

* **K-FAC** (Martens & Grosse 2015): :math:`G_{\text{layer}} \approx A \otimes B`,
  :math:`A = \sum_i \bar w_i \tilde a_i\tilde a_i^\top`,
  :math:`B = \sum_i\bar w_i\sum_k g_{ik}g_{ik}^\top`.
* **EK-FAC** (George et al. 2018; Grosse et al. 2023 eq. (20), as in kronfluence): keep the
  Kronecker eigenbasis :math:`Q_A \otimes Q_B` of :math:`A = Q_A\Lambda_AQ_A^\top`,
  :math:`B = Q_B\Lambda_BQ_B^\top` and replace the eigenvalues by the exact diagonal of
  :math:`G_{\text{layer}}` in that basis,
  :math:`\Lambda^*_{ab} = \sum_i\bar w_i\sum_k (q_{A,a}^\top\tilde a_i)^2(q_{B,b}^\top g_{ik})^2`.

Both are block-diagonal over layers; the inverse of the damped curvature
:math:`G + (\lambda + \lambda_d) I` on a vector :math:`V` of one layer is
:math:`Q_A\big[(Q_A^\top V Q_B) \oslash (\Lambda + \lambda + \lambda_d)\big]Q_B^\top`
(:math:`\Lambda = \Lambda_A\Lambda_B^\top` for K-FAC). Facts used by the tests: for softmax
regression at parameters where every example has the same :math:`p_i` (e.g. zero weights),
:math:`G = A\otimes B` exactly, so K-FAC and EK-FAC are exact; in general
:math:`\Lambda^*` equals the diagonal of the exact GGN block in the Kronecker eigenbasis.

Statistics are streamed over chunks of examples (two passes: factors, then corrected
eigenvalues), so memory is :math:`O(\text{chunk}\cdot(d_{\text{in}}+K d_{\text{out}}))` plus the
factors, never :math:`O(n p)`. Layers are found by intercepting ``flax.linen.Dense.__call__``
(``nn.intercept_methods``), so any flax model whose parameters are all ``Dense`` layers works
(logreg, MLP; eval-mode ``apply``). Other parameters (convolutions, BatchNorm) raise.

Why not ``kfac-jax`` (DeepMind): it is an optimiser — its curvature estimator needs the model's
loss registered with its tags and is updated inside its own optimiser state, with Monte-Carlo
sampled Fisher and no eigenvalue correction (what influence needs is a fixed, prepared-once
factorisation with EK-FAC eigenvalues), and it is not installed here: ``pip install --dry-run
kfac-jax`` would add kfac-jax 0.0.8 plus distrax, tfp-nightly, chex, gast and toolz. The factors
here are ~150 lines, exact in expectation, and checked against dense float64 GGN matrices
(``tests/test_kfac.py``).

References: Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature", ICML 2015. George, Laurent, Bouthillier, Ballas & Vincent, "Fast approximate natural
gradient descent in a Kronecker-factored eigenbasis", NeurIPS 2018. Grosse et al., "Studying
large language model generalization with influence functions", 2023.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from unlearn.objective import loss_of

Array = jax.Array
PyTree = Any

__all__ = ["KFACFactors", "kfac_factors", "kfac_inverse", "layer_names"]


class KFACFactors(NamedTuple):
    """Per dense layer (keyed by its module path ``'Dense_0'``, ...): eigenbases ``qa``
    ``(d_in+1, d_in+1)``, ``qb`` ``(d_out, d_out)``, K-FAC eigenvalues ``lam_kfac`` and EK-FAC
    corrected eigenvalues ``lam_ekfac`` (both ``(d_in+1, d_out)``)."""

    qa: dict[str, Array]
    qb: dict[str, Array]
    lam_kfac: dict[str, Array]
    lam_ekfac: dict[str, Array]


def _dense_interceptor(eps: dict[str, Array] | None, inputs: dict[str, Array]):
    def ic(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            name = "/".join(context.module.path)
            a = args[0]
            if a.ndim != 2:
                raise ValueError(f"K-FAC: dense layer {name!r} sees inputs of shape {a.shape}; "
                                 "only (batch, features) inputs are supported.")
            inputs[name] = a
            out = next_fun(*args, **kwargs)
            return out if eps is None else out + eps[name]
        return next_fun(*args, **kwargs)

    return ic


def layer_names(apply: Callable, params: PyTree, x: Array) -> dict[str, tuple[int, int]]:
    """``{path: (d_in, d_out)}`` of the dense layers ``apply`` calls, checked to cover every
    parameter (raises ``ValueError`` naming the others, e.g. convolutions)."""
    inputs: dict[str, Array] = {}

    def run(p, xx):
        with nn.intercept_methods(_dense_interceptor(None, inputs)):
            return apply(p, xx)

    out = jax.eval_shape(run, params, x[:2])
    del out
    shapes = {k: (v.shape[1], None) for k, v in inputs.items()}
    flat = params["params"] if "params" in params else params
    other = sorted(set(flat) - set(shapes))
    if other:
        raise ValueError(f"K-FAC/EK-FAC here covers flax Dense layers only; the model also has "
                         f"parameters {other} (e.g. convolutions). Use backend='cg', 'pcg', "
                         "'arnoldi' or 'lissa' for this model.")
    return {k: (d_in, flat[k]["kernel"].shape[1]) for k, (d_in, _) in shapes.items()}


def _layer_stats(apply, params, x, layers):
    """Inputs ``a`` ``(n, d_in)`` and pseudo-gradients ``g`` ``(K, n, d_out)`` per layer."""
    inputs: dict[str, Array] = {}
    eps0 = {k: jnp.zeros((x.shape[0], d_out), x.dtype) for k, (_, d_out) in layers.items()}

    def f(eps):
        inputs.clear()
        with nn.intercept_methods(_dense_interceptor(eps, inputs)):
            logits = apply(params, x)
        return logits, dict(inputs)

    logits, vjp, acts = jax.vjp(f, eps0, has_aux=True)
    loss = loss_of(apply)
    if loss.root is None or logits.ndim != 2:
        raise ValueError(f"K-FAC/EK-FAC here needs (n, K) outputs and a loss whose output "
                         f"Hessian is label-free (cross-entropy, squared error); got loss "
                         f"{loss.name!r} with outputs {logits.shape}. Use backend='cg'/'pcg'.")
    root = loss.output_root(logits, None, x.dtype)  # (n, K, K), C C^T = loss Hessian
    gs = jax.vmap(lambda c: vjp(c.astype(logits.dtype))[0], in_axes=2)(root)  # {k: (K, n, o)}
    return acts, gs


def _with_ones(a: Array) -> Array:
    return jnp.concatenate([jnp.ones((a.shape[0], 1), a.dtype), a], axis=1)


@functools.partial(jax.jit, static_argnames=("apply", "layers_key"))
def _factor_pass(apply, layers_key, params, x, wbar):
    layers = dict(layers_key)
    acts, gs = _layer_stats(apply, params, x, layers)
    out = {}
    for k in layers:
        a = _with_ones(acts[k])
        g = gs[k]
        out[k] = ((a * wbar[:, None]).T @ a,
                  jnp.einsum("kno,knp->op", g * wbar[None, :, None], g))
    return out


@functools.partial(jax.jit, static_argnames=("apply", "layers_key"))
def _correction_pass(apply, layers_key, params, x, wbar, qa, qb):
    layers = dict(layers_key)
    acts, gs = _layer_stats(apply, params, x, layers)
    out = {}
    for k in layers:
        a2 = (_with_ones(acts[k]) @ qa[k]) ** 2  # (n, d_in+1)
        g2 = jnp.sum((gs[k] @ qb[k]) ** 2, axis=0)  # sum over the K pseudo-samples: (n, d_out)
        out[k] = (a2 * wbar[:, None]).T @ g2
    return out


def kfac_factors(apply: Callable, params: PyTree, x: Array, w: Array | None = None,
                 chunk_size: int = 1024) -> KFACFactors:
    """K-FAC factors and EK-FAC corrected eigenvalues of the GGN at ``params`` (see module
    docstring), streamed over chunks of ``chunk_size`` examples (weights ``w``, default 1)."""
    n = x.shape[0]
    theta, _ = ravel_pytree(params)
    dtype = theta.dtype
    w = jnp.ones(n, dtype) if w is None else jnp.asarray(w, dtype)
    wbar = w / jnp.maximum(jnp.sum(w), 1.0)
    layers = layer_names(apply, params, x)
    key = tuple(sorted(layers.items()))
    x = jnp.asarray(x, dtype)
    starts = range(0, n, chunk_size)
    acc = None
    for s in starts:
        part = _factor_pass(apply, key, params, x[s:s + chunk_size], wbar[s:s + chunk_size])
        acc = part if acc is None else jax.tree.map(jnp.add, acc, part)
    qa, qb, lam_k = {}, {}, {}
    for k, (a_f, b_f) in acc.items():
        ea, qa[k] = jnp.linalg.eigh(0.5 * (a_f + a_f.T))
        eb, qb[k] = jnp.linalg.eigh(0.5 * (b_f + b_f.T))
        lam_k[k] = jnp.maximum(ea, 0.0)[:, None] * jnp.maximum(eb, 0.0)[None, :]
    lam_e = None
    for s in starts:
        part = _correction_pass(apply, key, params, x[s:s + chunk_size],
                                wbar[s:s + chunk_size], qa, qb)
        lam_e = part if lam_e is None else jax.tree.map(jnp.add, lam_e, part)
    return KFACFactors(qa, qb, lam_k, lam_e)


def _inverse_apply(unravel, qa, qb, lam, shift, v):
    tree = unravel(v)
    inner = tree["params"] if "params" in tree else tree
    new = dict(inner)
    for k in qa:
        layer = inner[k]
        vmat = jnp.concatenate([layer["bias"][None, :], layer["kernel"]], axis=0)
        core = (qa[k].T @ vmat @ qb[k]) / (lam[k] + shift)
        out = qa[k] @ core @ qb[k].T
        new[k] = {"bias": out[0], "kernel": out[1:]}
    tree = {"params": new} if "params" in tree else new
    return ravel_pytree(tree)[0]


def kfac_inverse(factors: KFACFactors, params: PyTree, shift: float | Array,
                 kind: str = "ekfac") -> Partial:
    r"""``v -> (G_{\text{(E)K-FAC}} + \text{shift}\,I)^{-1} v`` on flat vectors, as a
    ``Partial`` (usable as a CG preconditioner or as the approximate inverse itself).
    ``shift`` is the L2 coefficient plus the damping; ``kind`` is ``'ekfac'`` or ``'kfac'``."""
    if kind not in ("ekfac", "kfac"):
        raise ValueError(f"kind={kind!r}: choose 'ekfac' or 'kfac'.")
    _, unravel = ravel_pytree(params)
    lam = factors.lam_ekfac if kind == "ekfac" else factors.lam_kfac
    if float(shift) <= 0:
        raise ValueError(f"shift={shift!r} must be > 0 (L2 + damping): the K-FAC curvature is "
                         "singular without it.")
    return Partial(functools.partial(_inverse_apply, unravel), factors.qa, factors.qb, lam,
                   jnp.asarray(shift))
