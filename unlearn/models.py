"""Flax linen models used functionally, with model state (BatchNorm) and dropout.

The contract (one for every model, so the training engine needs no special cases):

- ``variables = model.init(key, x)``: a plain dict of flax collections,
  ``{"params": ...}`` and, for BatchNorm models (``model.has_state``), ``"batch_stats"``.
- **Eval mode** ``model.apply(variables, x) -> logits`` (``train=False``, the default):
  BatchNorm uses the stored running statistics, dropout is off, the function is deterministic.
  Every metric and every curvature computation (Hessian, HVP, GGN) uses eval mode, so the
  curvature is that of one fixed function of the parameters. For stateless models
  ``variables == {"params": ...}``, which is exactly what ``apply`` took before model state
  existed, so ``model.apply(params, x)`` everywhere keeps working.
- **Train mode** ``model.apply(variables, x, train=True, rng=key) -> (logits, new_state)``,
  *for every model*: ``new_state`` is a dict of the updated non-parameter collections
  (``{"batch_stats": ...}`` for BatchNorm models, ``{}`` for stateless ones). BatchNorm
  normalises with the batch statistics and updates the running averages; dropout draws its
  mask from ``rng``, an explicit key (the engine derives it from (key, epoch, step, member),
  so retraining is bit-exact). ``rng`` is required when ``model.stochastic`` and ignored
  otherwise.
- ``params, state = split_variables(variables)``: ``params == {"params": ...}`` (the same
  pytree shape as the pre-state "params" everywhere in the code base) and ``state`` the other
  collections; ``merge_variables(params, state)`` is the inverse. Gradients, optimiser states
  and curvature are taken w.r.t. ``params`` only; ``frozen_apply(model, state)`` gives the
  eval-mode ``apply(params, x)`` with the statistics held fixed.

Models carry static facts (``convex``, ``has_conv``, ``has_state``, ``stochastic``) and a
hashable ``spec = (name, ((kwarg, value), ...))`` from which :func:`make` / :func:`from_spec`
rebuild them. Construction is memoised on ``spec``: the same spec returns the *same* Model
object (same ``apply`` function), so compile caches keyed on the spec or on ``model.apply``
never recompile for an equal model.

BatchNorm (``nn.BatchNorm``): momentum 0.9 and epsilon 1e-5, i.e. PyTorch's defaults
(``momentum=0.1`` there is the weight of the new batch) as used by the CIFAR ResNet reference
implementations; running average ``r ← 0.9·r + 0.1·b`` of the batch mean and of the *biased*
batch variance (flax's convention; PyTorch stores the unbiased one); scale γ and shift β are
parameters, the running mean/var are ``batch_stats``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unlearn.task import Task, TaskApply, make_task

Params = Any
Variables = dict[str, Any]
Spec = tuple[str, tuple[tuple[str, Any], ...]]

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# A model is a :class:`unlearn.task.Task` (init/apply, facts, loss, measure, declared
# curvature); the package's own models are Tasks with a ``spec`` that ``from_spec`` rebuilds.
Model = Task


# ----------------------------------------------------------------------------- variables


def split_variables(variables: Mapping[str, Any]) -> tuple[Variables, Variables]:
    """``variables -> (params, state)`` with ``params = {"params": ...}`` and ``state`` the
    remaining collections (``{}`` for stateless models)."""
    if "params" not in variables:
        raise ValueError(f"variables must contain a 'params' collection; got keys "
                         f"{sorted(variables)} (use the dict returned by model.init).")
    params = {"params": variables["params"]}
    state = {k: v for k, v in variables.items() if k != "params"}
    return params, state


def merge_variables(params: Mapping[str, Any], state: Mapping[str, Any]) -> Variables:
    """Inverse of :func:`split_variables`: ``{"params": ..., **state}``."""
    if set(params) != {"params"}:
        raise ValueError(f"params must be exactly {{'params': ...}}; got keys {sorted(params)}.")
    if "params" in state:
        raise ValueError("state must not contain a 'params' collection.")
    return {**params, **state}


def frozen_apply(model: Model, state: Mapping[str, Any]) -> Callable[[Params, jax.Array],
                                                                      jax.Array]:
    """Eval-mode ``apply(params, x) -> logits`` with the model state (BatchNorm running
    statistics) held fixed: the function whose gradients, Hessians and HVPs are taken.
    For the plain CNN on CPU it is the convolution-free im2col form (:func:`im2col_apply`),
    equal up to float summation order and far faster inside the solvers' XLA loops on CPU."""
    state = dict(state)
    if not state:
        # On GPU convolutions are fast inside loops too; keep the model's own apply there.
        if has_im2col_form(model) and jax.default_backend() == "cpu":
            return im2col_apply(model)
        return model.apply

    def apply(params, x):
        return model.apply(merge_variables(params, state), x)

    # a closure over the state arrays: the task's loss and curvature, identity by object
    return model.apply.derive(apply) if isinstance(model.apply, TaskApply) else apply


# ----------------------------------------------------------------------------- modules


def _to_image(x, image_shape):
    """Reshape flat inputs to ``image_shape``; give channel-less inputs one channel."""
    n = x.shape[0]
    if image_shape is not None:
        x = x.reshape((n, *image_shape))
    if x.ndim == 2 or (x.ndim == 3 and image_shape is None):
        x = x[..., None]
    return x


def _bn(train: bool, name: str | None = None):
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        name=name)


class _Logistic(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class _MLP(nn.Module):
    num_classes: int
    hidden: Sequence[int] = (128,)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


# Hidden-layer nonlinearities of the CNN: ReLU (the tutorial's), or tanh — smooth, as in Koh &
# Liang's (2017) All-CNN-C for the non-convex leave-one-out experiment, so that the Hessian is
# continuous and full-batch L-BFGS / leave-one-out retraining converge.
ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh}


class _CNN(nn.Module):
    """The seed tutorial's CNN (3 conv layers 32/64/128, dense 512, dropout 0.5), scaled.

    Conv 3×3 (or width 3 in 1-d) + ReLU + 2× max-pool per layer, while the spatial size allows,
    then dense + ReLU, dropout (rate ``dropout``, off when 0; the tutorial's Keras model puts
    Dropout(0.5) between Dense(512) and the output layer) and the output layer. 1-d inputs
    ``(n, L)`` use 1-d convolutions; 2-d images ``(n, H, W[, C])`` 2-d ones; ``image_shape``
    reshapes flat inputs first.
    """

    num_classes: int
    features: Sequence[int] = (32, 64, 128)
    dense: int = 512
    image_shape: tuple[int, ...] | None = None
    dropout: float = 0.0
    activation: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = x.shape[0]
        act = ACTIVATIONS[self.activation]
        x = _to_image(x, self.image_shape)
        spatial = x.ndim - 2
        for f in self.features:
            x = act(nn.Conv(f, (3,) * spatial, padding="SAME")(x))
            if min(x.shape[1:-1]) >= 2:
                x = nn.max_pool(x, (2,) * spatial, strides=(2,) * spatial)
        x = x.reshape((n, -1))
        x = act(nn.Dense(self.dense)(x))
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016, Fig. 2 left): two 3×3 conv-BN, identity shortcut,
    or 1×1 conv-BN projection when the stride or width changes (option B)."""

    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        s = (self.stride, self.stride)
        y = nn.Conv(self.features, (3, 3), s, padding=((1, 1), (1, 1)), use_bias=False)(x)
        y = nn.relu(_bn(train)(y))
        y = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(y)
        y = _bn(train)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), s, use_bias=False)(x)
            x = _bn(train)(x)
        return nn.relu(x + y)


class _ResNet18(nn.Module):
    """CIFAR-variant ResNet-18: 3×3 stride-1 stem conv (64) + BN + ReLU, no max-pool, four
    stages of two basic blocks (64, 128, 256, 512; stride 1, 2, 2, 2), global average pool,
    dense. 11,173,962 parameters for 10 classes (as the widely used kuangliu/pytorch-cifar
    model used in the unlearning literature, e.g. Jia et al. 2023)."""

    num_classes: int
    width: int = 64
    stages: Sequence[int] = (2, 2, 2, 2)
    image_shape: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _to_image(x, self.image_shape)
        x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
        x = nn.relu(_bn(train)(x))
        for i, blocks in enumerate(self.stages):
            for b in range(blocks):
                x = _BasicBlock(self.width * 2 ** i, 2 if (b == 0 and i > 0) else 1)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def _conv_bn(x, features: int, train: bool):
    x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
    return nn.relu(_bn(train)(x))


class _ResNet9(nn.Module):
    """ResNet-9 of the DAWNBench CIFAR-10 entries (Page 2018, "How to train your ResNet"),
    the small ResNet of the TRAK / KLOM work: prep conv-BN-ReLU (w); layer 1 conv-BN-ReLU (2w)
    + 2× max-pool + residual of two conv-BN-ReLU; layer 2 conv-BN-ReLU (4w) + max-pool;
    layer 3 conv-BN-ReLU (8w) + max-pool + residual of two conv-BN-ReLU; global max pool;
    dense without bias; logits scaled by ``scale`` (0.125). ``width`` w = 64 is the published
    net (6,573,120 parameters for 10 classes); small widths give test-sized nets."""

    num_classes: int
    width: int = 64
    scale: float = 0.125
    image_shape: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = self.width
        pool = lambda z: nn.max_pool(z, (2, 2), strides=(2, 2))
        x = _to_image(x, self.image_shape)
        x = _conv_bn(x, w, train)
        x = pool(_conv_bn(x, 2 * w, train))
        x = x + _conv_bn(_conv_bn(x, 2 * w, train), 2 * w, train)
        x = pool(_conv_bn(x, 4 * w, train))
        x = pool(_conv_bn(x, 8 * w, train))
        x = x + _conv_bn(_conv_bn(x, 8 * w, train), 8 * w, train)
        x = jnp.max(x, axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=False)(x) * self.scale


class _CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention with ``nn.Dense`` projections ``query``, ``key``,
    ``value`` (``width → width``, split into ``heads`` heads of ``width/heads``) and ``out``:
    :math:`\operatorname{softmax}(QK^\top/\sqrt{d_h} + M)V` per head, :math:`M_{qk} = -\infty`
    for :math:`k > q` (position ``q`` sees positions ``≤ q`` only), heads concatenated, then
    ``out`` (Vaswani et al. 2017, §3.2). Every parameter is a Dense layer applied to
    ``(n, T, width)`` inputs, which K-FAC sees per token (:mod:`unlearn.kfac`)."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, h):
        n, t, _ = h.shape
        dh = self.width // self.heads

        def proj(name):
            return nn.Dense(self.width, name=name)(h).reshape(n, t, self.heads, dh)

        q, k, v = proj("query"), proj("key"), proj("value")
        s = jnp.einsum("nqhd,nkhd->nhqk", q, k) * (dh ** -0.5)
        causal = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
        o = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(s, axis=-1), v)
        return nn.Dense(self.width, name="out")(o.reshape(n, t, self.width))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2, Radford et al. 2019):
    ``h + attn(LN(h))``, then ``h + W₂ GELU(W₁ LN(h))`` with ``W₁: width → mlp_ratio·width``
    (flax's tanh-approximated GELU, as GPT-2)."""

    width: int
    heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, h):
        h = h + _CausalSelfAttention(self.width, self.heads, name="attn")(
            nn.LayerNorm(name="ln_attn")(h))
        m = nn.Dense(self.mlp_ratio * self.width, name="mlp_in")(nn.LayerNorm(name="ln_mlp")(h))
        return h + nn.Dense(self.width, name="mlp_out")(nn.gelu(m))


class _Transformer(nn.Module):
    """Decoder-only (GPT-style) transformer over token ids ``x`` ``(n, T)`` → next-token
    logits ``(n, T, vocab)``: token embedding + learned position embedding (both
    ``nn.Embed``, N(0, 0.02²) init as GPT-2), ``depth`` pre-LN blocks, a final LayerNorm,
    and the output layer: the token embedding's transpose when ``tied`` (Press & Wolf 2017),
    else a bias-free ``nn.Dense`` ``head``. Position ``t``'s logits depend on ``x[:, :t+1]``
    only, so padding at the end of a sequence never changes the outputs before it."""

    vocab: int
    width: int = 32
    depth: int = 2
    heads: int = 2
    max_len: int = 64
    mlp_ratio: int = 4
    tied: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 2:
            raise ValueError(f"transformer: x must be token ids of shape (n, T); got {x.shape}.")
        n, t = x.shape
        if t > self.max_len:
            raise ValueError(f"transformer: sequences of length {t} exceed max_len="
                             f"{self.max_len}; build the model with max_len >= {t}.")
        init = nn.initializers.normal(0.02)
        embed = nn.Embed(self.vocab, self.width, embedding_init=init, name="embed")
        pos = nn.Embed(self.max_len, self.width, embedding_init=init, name="pos")
        h = embed(x.astype(jnp.int32)) + pos(jnp.arange(t))[None]
        for i in range(self.depth):
            h = _Block(self.width, self.heads, self.mlp_ratio, name=f"block_{i}")(h)
        h = nn.LayerNorm(name="ln_final")(h)
        if self.tied:
            return embed.attend(h)
        return nn.Dense(self.vocab, use_bias=False, name="head")(h)


# ----------------------------------------------------------------------------- wrapping


def _wrap(module: nn.Module, spec: Spec, curvature: str | None = None, **facts) -> Model:
    has_state = facts.get("has_state", False)
    stochastic = facts.get("stochastic", False)
    name = spec[0]

    def init(key: jax.Array, x: jax.Array) -> Variables:
        return dict(module.init(key, jnp.asarray(x[:1]), train=False))

    def apply(variables: Variables, x: jax.Array, *, train: bool = False,
              rng: jax.Array | None = None):
        if has_state and "batch_stats" not in variables:
            raise ValueError(f"model {name!r} has BatchNorm: variables need 'batch_stats' "
                             f"(got {sorted(variables)}); pass merge_variables(params, state) "
                             f"or use frozen_apply(model, state).")
        if not train:
            return module.apply(variables, x, train=False)
        rngs = {}
        if stochastic:
            if rng is None:
                raise ValueError(f"model {name!r} uses dropout: apply(..., train=True) needs "
                                 f"rng=<jax.random key>.")
            rngs = {"dropout": rng}
        if has_state:
            logits, new_state = module.apply(variables, x, train=True, rngs=rngs,
                                             mutable=["batch_stats"])
            return logits, dict(new_state)
        return module.apply(variables, x, train=True, rngs=rngs), {}

    # the package's models: identified by their spec (equal specs = the same function)
    return make_task(init, apply, name, source=("spec", spec), spec=spec,
                     curvature=curvature, **facts)


def _hashable(v):
    if isinstance(v, list | tuple):
        return tuple(_hashable(a) for a in v)
    return v


def _spec(name: str, **kwargs) -> Spec:
    return (name, tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())))


@functools.cache
def from_spec(spec: Spec) -> Model:
    """Build (memoised) the model a ``spec`` describes: equal specs give the same object."""
    name, items = spec
    kw = dict(items)
    if name == "logreg":
        return _wrap(_Logistic(**kw), spec, convex=True, curvature="softmax_regression")
    if name == "mlp":
        return _wrap(_MLP(**kw), spec)
    if name == "cnn":
        return _wrap(_CNN(**kw), spec, has_conv=True, stochastic=kw.get("dropout", 0.0) > 0)
    if name == "resnet18":
        return _wrap(_ResNet18(**kw), spec, has_conv=True, has_state=True)
    if name == "resnet9":
        return _wrap(_ResNet9(**kw), spec, has_conv=True, has_state=True)
    if name == "binary_logreg":
        return _wrap(_BinaryLogistic(), spec, convex=True, curvature="binary_logistic")
    if name == "transformer":
        return _wrap(_Transformer(**kw), spec, loss="sequence_cross_entropy")
    raise ValueError(f"model={name!r} is unknown; choose one of {sorted(REGISTRY)}.")


def _check_classes(num_classes) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    return num_classes


def logreg(num_classes: int) -> Model:
    """Softmax (multinomial logistic) regression: logits = W x + b."""
    return from_spec(_spec("logreg", num_classes=_check_classes(num_classes)))


def mlp(num_classes: int, hidden: Sequence[int] = (128,)) -> Model:
    """A ReLU multilayer perceptron with the given hidden widths."""
    return from_spec(_spec("mlp", num_classes=_check_classes(num_classes), hidden=tuple(hidden)))


def cnn(
    num_classes: int,
    features: Sequence[int] = (32, 64, 128),
    dense: int = 512,
    image_shape: tuple[int, ...] | None = None,
    dropout: float = 0.0,
    activation: str = "relu",
) -> Model:
    """The seed material's 3-conv CNN, with widths scaled by ``features`` and ``dense``;
    ``dropout=0.5`` restores the tutorial's dropout (train mode then needs ``rng``);
    ``activation='tanh'`` makes it smooth (Koh & Liang's non-convex leave-one-out setting)."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown; choose one of "
                         f"{sorted(ACTIVATIONS)}.")
    # The default stays out of the spec, so specs (and model directories) written before the
    # option existed describe the same model.
    extra = {} if activation == "relu" else {"activation": activation}
    return from_spec(_spec("cnn", num_classes=_check_classes(num_classes),
                           features=tuple(features), dense=dense,
                           image_shape=None if image_shape is None else tuple(image_shape),
                           dropout=float(dropout), **extra))


def resnet18(num_classes: int, width: int = 64,
             image_shape: tuple[int, ...] | None = None) -> Model:
    """CIFAR-variant ResNet-18 with BatchNorm (``width`` 64 is the published net)."""
    return from_spec(_spec("resnet18", num_classes=_check_classes(num_classes), width=width,
                           image_shape=None if image_shape is None else tuple(image_shape)))


def resnet9(num_classes: int, width: int = 64,
            image_shape: tuple[int, ...] | None = None) -> Model:
    """DAWNBench ResNet-9 with BatchNorm (``width`` 64 is the published net; e.g. 8 for tests)."""
    return from_spec(_spec("resnet9", num_classes=_check_classes(num_classes), width=width,
                           image_shape=None if image_shape is None else tuple(image_shape)))


REGISTRY: dict[str, Callable[..., Model]] = {
    "logreg": logreg, "mlp": mlp, "cnn": cnn, "resnet18": resnet18, "resnet9": resnet9,
}


def make(name: str, num_classes: int, **kwargs) -> Model:
    """Build a model by name (``logreg``, ``mlp``, ``cnn``, ``resnet18``, ``resnet9``,
    ``binary_logreg``, ``transformer``);
    ``make(*model.spec ...)`` round-trips through :func:`from_spec`."""
    if name not in REGISTRY:
        raise ValueError(f"model={name!r} is unknown; choose one of {sorted(REGISTRY)}.")
    return REGISTRY[name](num_classes, **kwargs)


def _patches(x: jax.Array, spatial: int) -> jax.Array:
    """Width-3 'SAME' patches of ``x`` ``(S, B, *spatial, C)`` -> ``(S, B, *spatial, 3^d·C)``,
    ordered (offset_1, …, offset_d, channel) like a flattened ``(3,)*d + (C, F)`` kernel."""
    sizes = x.shape[2:2 + spatial]
    xp = jnp.pad(x, ((0, 0), (0, 0)) + ((1, 1),) * spatial + ((0, 0),))
    if spatial == 1:
        cols = [xp[:, :, i:i + sizes[0]] for i in range(3)]
    else:
        cols = [xp[:, :, i:i + sizes[0], j:j + sizes[1]] for i in range(3) for j in range(3)]
    return jnp.concatenate(cols, axis=-1)


def _max_pool2(x: jax.Array, spatial: int) -> jax.Array:
    """2× max-pool, stride 2, 'VALID' (floor), of ``(S, B, *spatial, C)``, as nn.max_pool."""
    s, b, c = x.shape[0], x.shape[1], x.shape[-1]
    half = [d // 2 for d in x.shape[2:2 + spatial]]
    x = x[(slice(None), slice(None)) + tuple(slice(0, 2 * h) for h in half)]
    shape = (s, b) + tuple(v for h in half for v in (h, 2)) + (c,)
    return jnp.max(x.reshape(shape), axis=tuple(3 + 2 * i for i in range(spatial)))


def has_im2col_form(model: Model) -> bool:
    """The plain CNN (no dropout): the model that has an im2col (convolution-free) form."""
    return (isinstance(model, Task) and model.source == ("spec", model.spec)
            and model.spec[0] == "cnn" and not model.stochastic)


@functools.cache
def ensemble_apply(model: Model) -> Callable[[Variables, jax.Array], jax.Array]:
    """Eval-mode apply of S stacked members at once: ``f(stacked_variables, xs) -> (S, B, K)``
    with ``xs`` of shape ``(S, B, ...)`` (member s sees its own batch ``xs[s]``), equal to
    ``stack([model.apply(variables[s], xs[s]) for s])`` up to float summation order.

    For the CNN every convolution is written as patches (im2col) times the member's kernel,
    one *batched* matmul over the member axis (``einsum('sb…k,skf->sb…f')``), and the dense
    layers likewise. On XLA's CPU backend this avoids both slow paths measured here: the
    grouped convolution that ``vmap`` of a conv becomes, and S separate small convolutions
    (see ``benchmarks/cnn_strategies.py`` and RESULTS.md). Gradients follow by autodiff (a
    batched matmul's transpose is a batched matmul). Models without convolutions get
    ``jax.vmap(model.apply)`` (dense models vmap well). Memoised per model: the same function
    object for the same spec, so compile caches keyed on it hit.

    The CNN with dropout is not supported (its masks are drawn per member by flax; use the
    per-member strategies), nor are BatchNorm models.
    """
    name, items = model.spec
    kw = dict(items)
    if not model.has_conv:
        return jax.vmap(model.apply)
    if not has_im2col_form(model):
        raise ValueError(f"ensemble_apply fuses the plain CNN only; got {name!r}"
                         f"{' with dropout' if model.stochastic else ''}. Use a per-member "
                         f"strategy (unroll/loop) for this model.")
    n_conv, image_shape = len(kw["features"]), kw["image_shape"]
    act = ACTIVATIONS[kw.get("activation", "relu")]

    def apply(variables: Variables, xs: jax.Array) -> jax.Array:
        p = variables["params"]
        s, b = xs.shape[:2]
        x = _to_image(xs.reshape((s * b,) + xs.shape[2:]), image_shape)
        x = x.reshape((s, b) + x.shape[1:])
        spatial = x.ndim - 3
        for i in range(n_conv):
            k, bias = p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"]
            kk = k.reshape(s, -1, k.shape[-1])
            x = jnp.einsum("sb...k,skf->sb...f", _patches(x, spatial), kk)
            x = act(x + bias.reshape((s, 1) + (1,) * spatial + (-1,)))
            if min(x.shape[2:-1]) >= 2:
                x = _max_pool2(x, spatial)
        x = x.reshape(s, b, -1)
        d0, d1 = p["Dense_0"], p["Dense_1"]
        x = act(jnp.einsum("sbi,sio->sbo", x, d0["kernel"]) + d0["bias"][:, None])
        return jnp.einsum("sbi,sio->sbo", x, d1["kernel"]) + d1["bias"][:, None]

    return apply


@functools.cache
def im2col_apply(model: Model) -> Callable[[Params, jax.Array], jax.Array]:
    """The plain CNN's eval-mode apply written as im2col patches times kernels (the one-member
    case of :func:`ensemble_apply`): the same function up to float summation order, but with
    no convolution op. Curvature solvers run their products inside ``lax.while_loop`` (CG,
    Lanczos, LiSSA), where XLA's CPU backend runs a convolution ~20× slower than at the top
    level of a jit; measured here, 20 CG iterations of a damped GGN product on a 26 698-param
    CNN (1 000 MNIST images, 4 right-hand sides) take 34 s in this form and 277 s with flax's
    convolutions. Memoised per model, so compile caches keyed on the function hit."""
    ens = ensemble_apply(model)

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return ens(jax.tree.map(lambda a: a[None], params), x[None])[0]

    return model.apply.derive(apply, "im2col")


def num_params(variables: Mapping[str, Any]) -> int:
    """Number of trainable parameters (the ``params`` collection only)."""
    return sum(int(a.size) for a in jax.tree.leaves(split_variables(variables)[0]))


# ----------------------------------------------------------------------------- binary logistic


class _BinaryLogistic(nn.Module):
    """One linear score ``z = wᵀx + b`` returned as the two logits ``[0, z]``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        z = nn.Dense(1)(x)
        return jnp.concatenate([jnp.zeros_like(z), z], axis=-1)


def binary_logreg(num_classes: int = 2) -> Model:
    r"""Binary logistic regression: :math:`P(y=1\mid x) = \sigma(z)`, :math:`z = w^\top x + b`.

    The logits are :math:`[0, z]`, so the project's one softmax cross-entropy of them is exactly
    the logistic loss :math:`\log(1 + e^{-\tilde y z})` (:math:`\tilde y = 2y - 1`) and accuracy
    and ``argmax`` work unchanged. Params: a ``(d, 1)`` kernel and a ``(1,)`` bias (p = d + 1);
    ``unlearn.curvature.binary_logistic_hessian`` is its closed-form Hessian. Used by Koh & Liang
    (2017) and Guo et al. (2020) on MNIST class pairs.
    """
    if num_classes != 2:
        raise ValueError(f"binary_logreg needs num_classes=2, got {num_classes}; use "
                         "models.logreg for softmax regression over more classes.")
    return from_spec(_spec("binary_logreg"))


REGISTRY["binary_logreg"] = binary_logreg


# ----------------------------------------------------------------------------- transformer


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int; got {v!r}.")
    return int(v)


def transformer(vocab: int, width: int = 32, depth: int = 2, heads: int = 2,
                max_len: int = 64, mlp_ratio: int = 4, tied: bool = True) -> Model:
    r"""A decoder-only transformer language model (GPT-2 layout; Radford et al. 2019).

    Inputs: integer token ids ``(n, T)`` with ``T ≤ max_len``; outputs: next-token logits
    ``(n, T, vocab)``. Token and learned position embeddings, ``depth`` pre-LayerNorm blocks
    of causal multi-head self-attention (``heads`` heads, ``width/heads`` each; ``nn.Dense``
    query/key/value/out projections) and a GELU MLP (hidden ``mlp_ratio·width``), a final
    LayerNorm, and tied (``logits = h E^\top``, ``E`` the token embedding) or untied
    (bias-free dense) output weights. Dropout is not used (deterministic training).

    The task's loss is ``"sequence_cross_entropy"``: per sequence, the mean over non-padding
    targets (``y < 0`` is padding) of the next-token cross-entropy,
    :math:`\ell_i = \sum_t m_{it}\,\mathrm{CE}(z_{it}, y_{it}) / \max(\sum_t m_{it}, 1)`
    (:func:`unlearn.objective.sequence_cross_entropy`). Data: :func:`unlearn.data.char_corpus`.
    ``models.make("transformer", vocab, ...)`` builds the same model (``vocab`` plays the role
    of ``num_classes``).
    """
    vocab, width, depth, heads, max_len, mlp_ratio = (
        _positive_int(k, v) for k, v in (("vocab", vocab), ("width", width), ("depth", depth),
                                         ("heads", heads), ("max_len", max_len),
                                         ("mlp_ratio", mlp_ratio)))
    if width % heads:
        raise ValueError(f"width={width} must be a multiple of heads={heads} (each head has "
                         "width/heads features).")
    if not isinstance(tied, bool):
        raise ValueError(f"tied must be True or False; got {tied!r}.")
    return from_spec(_spec("transformer", vocab=vocab, width=width, depth=depth, heads=heads,
                           max_len=max_len, mlp_ratio=mlp_ratio, tied=tied))


REGISTRY["transformer"] = transformer


def hidden_states(task: Model, variables: Mapping[str, Any], x: jax.Array,
                  layer: int) -> jax.Array:
    """The residual stream after block ``layer`` of a :func:`transformer`: the output of its
    submodule ``block_{layer}``, shape ``(n, T, width)`` (before the final LayerNorm when
    ``layer = depth − 1``). HuggingFace's ``model.layers[layer]`` output, which RMU steers
    (Li et al. 2024; ``unlearn.methods.rmu``).

    Read with flax's ``capture_intermediates`` on that submodule; the transformer's outputs and
    parameters are the model's own (``variables`` as from ``task.init``). Differentiable in
    ``variables``; under ``jit`` the unused later blocks are dropped as dead code.
    """
    spec = getattr(task, "spec", None)
    if spec is None or spec[0] != "transformer":
        raise ValueError(f"hidden_states needs a models.transformer task; got "
                         f"{getattr(task, 'name', task)!r}.")
    kw = dict(spec[1])
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < kw["depth"]:
        raise ValueError(f"layer={layer!r} must be an int in [0, depth={kw['depth']}).")
    name = f"block_{layer}"
    _, state = _Transformer(**kw).apply(
        {"params": variables["params"]}, x,
        capture_intermediates=lambda mdl, method: mdl.name == name and method == "__call__",
        mutable=["intermediates"])
    return state["intermediates"][name]["__call__"][0]
