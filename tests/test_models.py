"""Models: parameter counts against published/hand-derived numbers, the eval/train contract,
BatchNorm running statistics against a NumPy recomputation, dropout keyed by ``rng``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn import models


def _count(model, shape):
    """Parameter count without materialising the weights (shape evaluation only)."""
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))


def test_resnet18_param_count_matches_published():
    # kuangliu/pytorch-cifar ResNet18 (the CIFAR variant used across the unlearning
    # literature): 11,173,962 trainable parameters for 10 classes.
    assert _count(models.resnet18(10), (1, 32, 32, 3)) == 11_173_962


def test_resnet9_param_count_matches_layer_arithmetic():
    # DAWNBench ResNet-9 (Page 2018), counted layer by layer from its description:
    # 3x3 convs without bias, each followed by BN (2 params per channel), dense without bias.
    def count(w, k=10, c=3):
        convs = [(c, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w),
                 (4 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w)]
        return sum(9 * a * b + 2 * b for a, b in convs) + 8 * w * k

    assert count(64) == 6_573_120  # the ~6.57 M of the published net
    for w in (64, 8):
        assert _count(models.resnet9(10, width=w), (1, 32, 32, 3)) == count(w)


def test_dense_and_cnn_param_counts():
    assert _count(models.logreg(10), (1, 784)) == 784 * 10 + 10
    assert _count(models.mlp(10, (128, 64)), (1, 784)) == (784 * 128 + 128) + (128 * 64 + 64) \
        + (64 * 10 + 10)
    # 28x28x1 -> conv32 pool 14 -> conv64 pool 7 -> conv128 pool 3 -> 3*3*128 -> 512 -> 10
    conv = (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128)
    dense = (3 * 3 * 128 * 512 + 512) + (512 * 10 + 10)
    assert _count(models.cnn(10, image_shape=(28, 28, 1)), (1, 784)) == conv + dense
    assert _count(models.cnn(10, image_shape=(28, 28, 1), dropout=0.5), (1, 784)) == conv + dense


SMALL = {
    "logreg": lambda: models.logreg(5),
    "mlp": lambda: models.mlp(5, (8,)),
    "cnn": lambda: models.cnn(5, features=(4, 8), dense=8),
    "cnn_dropout": lambda: models.cnn(5, features=(4, 8), dense=8, dropout=0.5),
    "resnet18": lambda: models.resnet18(5, width=4),
    "resnet9": lambda: models.resnet9(5, width=4),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_contract_shapes_and_eval_determinism(name):
    m = SMALL[name]()
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
    v = m.init(jax.random.key(0), x)
    assert ("batch_stats" in v) == m.has_state
    params, state = models.split_variables(v)
    assert set(params) == {"params"} and set(state) == ({"batch_stats"} if m.has_state else set())
    assert models.merge_variables(params, state).keys() == v.keys()
    out = m.apply(v, x)
    assert out.shape == (6, 5)
    np.testing.assert_array_equal(out, m.apply(v, x))
    # eval mode is per-example (running statistics, no dropout): a sub-batch gives the same
    # rows; tolerance: float32 convolutions may block differently for another batch size.
    np.testing.assert_allclose(m.apply(v, x[2:5]), out[2:5], rtol=1e-5, atol=1e-5)
    # the plain CNN's frozen apply is its im2col form: float32 summation order differs
    np.testing.assert_allclose(models.frozen_apply(m, state)(params, x), out, rtol=1e-5,
                               atol=1e-6)
    logits, new_state = m.apply(v, x, train=True, rng=jax.random.key(3))
    assert logits.shape == (6, 5)
    assert set(new_state) == set(state)
    if not m.has_state and not m.stochastic:
        np.testing.assert_array_equal(logits, out)  # train mode == eval mode without state
        assert new_state == {}
    if m.has_state:
        assert jax.tree.structure(new_state) == jax.tree.structure(state)


def _conv3x3_same(x, k):
    """NumPy 3x3 'SAME' convolution (cross-correlation, as XLA/flax), NHWC, HWIO kernel."""
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, k.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += xp[:, i:i + h, j:j + w, :] @ k[i, j]
    return out


def test_batchnorm_running_average_matches_numpy():
    m = models.resnet18(5, width=4)
    x = jax.random.normal(jax.random.key(1), (7, 8, 8, 3))
    v = m.init(jax.random.key(0), x)
    # start from non-trivial running statistics so the momentum recursion is visible
    rs = np.random.default_rng(0)
    bs = jax.tree.map(lambda a: jnp.asarray(rs.uniform(0.5, 1.5, a.shape), a.dtype),
                      v["batch_stats"])
    v = {"params": v["params"], "batch_stats": bs}
    _, new = m.apply(v, x, train=True)
    # first BatchNorm normalises the stem convolution's output
    z = _conv3x3_same(np.asarray(x, np.float64),
                      np.asarray(v["params"]["Conv_0"]["kernel"], np.float64))
    mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))  # biased variance (flax)
    old = bs["BatchNorm_0"]
    mo = models.BN_MOMENTUM
    got = new["batch_stats"]["BatchNorm_0"]
    # float32 conv + reductions over 448 values of O(1): ~1e-6 relative
    np.testing.assert_allclose(got["mean"], mo * np.asarray(old["mean"]) + (1 - mo) * mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], mo * np.asarray(old["var"]) + (1 - mo) * var,
                               rtol=1e-5, atol=1e-6)
    # every BatchNorm layer's statistics moved; params are not part of the new state
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new["batch_stats"], bs)
    assert all(jax.tree.leaves(changed))


def test_batchnorm_train_mode_normalises_with_batch_statistics():
    # in train mode the stem BN output has zero batch mean / unit variance per channel (before
    # ReLU), regardless of the running statistics; eval mode uses the stored ones instead.
    m = models.resnet18(5, width=4)
    x = jax.random.normal(jax.random.key(1), (7, 8, 8, 3)) * 3.0 + 1.0
    v = m.init(jax.random.key(0), x)
    out_train, _ = m.apply(v, x, train=True)
    out_eval = m.apply(v, x)
    assert not np.allclose(out_train, out_eval, atol=1e-3)


def test_dropout_keyed_by_rng():
    m = models.cnn(5, features=(4,), dense=64, dropout=0.5)
    assert m.stochastic and not models.cnn(5, features=(4,), dense=64).stochastic
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    v = m.init(jax.random.key(0), x)
    a, _ = m.apply(v, x, train=True, rng=jax.random.key(5))
    b, _ = m.apply(v, x, train=True, rng=jax.random.key(5))
    c, _ = m.apply(v, x, train=True, rng=jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, m.apply(v, x))
    with pytest.raises(ValueError, match="rng"):
        m.apply(v, x, train=True)


def test_dropout_mask_rate_and_scaling():
    # Inverted dropout: the hidden layer's train-mode value is h * mask / (1 - p) with
    # mask ~ Bernoulli(1 - p). Recover it from the output layer (a linear map of the hidden
    # units): with an identity-like output layer we read the hidden units directly.
    p, h = 0.5, 4096
    m = models.cnn(h, features=(4,), dense=h, dropout=p)
    x = jnp.ones((1, 2, 2, 1))
    v = m.init(jax.random.key(0), x)
    pp = jax.tree.map(lambda a: a, v["params"])
    pp["Dense_1"] = {"kernel": jnp.eye(h), "bias": jnp.zeros(h)}
    hidden = m.apply({"params": pp}, x)[0]
    dropped, _ = m.apply({"params": pp}, x, train=True, rng=jax.random.key(2))
    dropped = dropped[0]
    live = np.asarray(hidden) > 0
    kept = np.asarray(dropped)[live] != 0
    # kept fraction ~ Binomial(n, 0.5)/n: 5 standard deviations
    n = live.sum()
    assert n > 500 and abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(np.asarray(dropped)[live][kept],
                               np.asarray(hidden)[live][kept] / (1 - p), rtol=1e-6)


def test_spec_round_trip_and_memoised():
    m = models.cnn(10, features=[8, 16], dense=32, image_shape=(8, 8, 1))
    assert models.from_spec(m.spec) is m
    assert models.make("cnn", 10, features=(8, 16), dense=32, image_shape=(8, 8, 1)) is m
    assert models.make("resnet9", 10, width=8) is models.resnet9(10, width=8)
    assert models.cnn(10, dropout=0.5) is not models.cnn(10)
    hash(m)
    f = jax.jit(lambda v, x, model: model.apply(v, x), static_argnums=2)
    x = jnp.ones((2, 64))
    v = m.init(jax.random.key(0), x)
    np.testing.assert_allclose(f(v, x, m), m.apply(v, x), rtol=1e-6)


def test_bad_inputs_are_named():
    m = models.resnet9(5, width=4)
    x = jnp.ones((2, 8, 8, 3))
    v = m.init(jax.random.key(0), x)
    params, state = models.split_variables(v)
    with pytest.raises(ValueError, match="batch_stats"):
        m.apply(params, x)
    with pytest.raises(ValueError, match="params"):
        models.split_variables(state)
    with pytest.raises(ValueError, match="params"):
        models.merge_variables(v, {})
    with pytest.raises(ValueError, match="unknown"):
        models.make("resnet", 10)
    with pytest.raises(ValueError, match="dropout"):
        models.cnn(10, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        models.mlp(0)


def test_frozen_apply_gradients_exclude_statistics(x64):
    # curvature code differentiates params only, statistics frozen, eval mode: the gradient
    # pytree is params-shaped and matches a finite difference of the eval-mode loss.
    m = models.resnet9(3, width=2)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3), jnp.float64)
    v = jax.tree.map(lambda a: a.astype(jnp.float64), m.init(jax.random.key(0), x))
    _, new = m.apply(v, x, train=True)  # non-trivial statistics
    params, _ = models.split_variables(v)
    f = models.frozen_apply(m, new)
    loss = jax.jit(lambda p: jnp.sum(f(p, x) ** 2))
    g = jax.jit(jax.grad(loss))(params)
    assert jax.tree.structure(g) == jax.tree.structure(params)
    d = jax.tree.map(lambda a: jax.random.normal(jax.random.key(9), a.shape, a.dtype), params)
    eps = 1e-6
    fd = (loss(jax.tree.map(lambda a, b: a + eps * b, params, d))
          - loss(jax.tree.map(lambda a, b: a - eps * b, params, d))) / (2 * eps)
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
    # float64 central difference (piecewise-smooth ReLU/max-pool net, no kink within 1e-6 at
    # this point): O(eps^2) truncation + O(1e-16/eps) rounding, ~1e-9 relative
    np.testing.assert_allclose(fd, dot, rtol=1e-6)


def test_frozen_apply_of_the_cnn_is_the_convolution_free_form(x64):
    # curvature code gets the im2col CNN (no conv op inside CG/Lanczos loops): it must be the
    # same function as flax's conv net, values and gradients, to float64 summation order
    m = models.cnn(4, features=(3, 5), dense=6, image_shape=(9, 7, 2))
    x = jax.random.normal(jax.random.key(1), (5, 9 * 7 * 2), jnp.float64)
    v = jax.tree.map(lambda a: a.astype(jnp.float64), m.init(jax.random.key(0), x))
    f = models.frozen_apply(m, {})
    assert f is not m.apply and models.frozen_apply(m, {}) is f
    np.testing.assert_allclose(jax.jit(f)(v, x), jax.jit(m.apply)(v, x), rtol=1e-12, atol=1e-13)
    g_f = jax.jit(jax.grad(lambda p: jnp.sum(f(p, x) ** 2)))(v)
    g_m = jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2)))(v)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_m), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    d = models.cnn(4, dropout=0.5)  # stochastic: keeps flax's apply (its own dropout masks)
    assert models.frozen_apply(d, {}) is d.apply


@pytest.mark.parametrize("kind", ["2d", "2d_flat", "1d", "tanh"])
def test_ensemble_apply_matches_per_member(kind, x64):
    # float64: the fused (im2col, batched-matmul) CNN differs from per-member convolutions only
    # in summation order over <= 9*16 products per output, so agreement to ~1e-13 relative.
    S = 3
    if kind == "2d":
        m, shape = models.cnn(4, features=(3, 5), dense=6), (S, 5, 9, 7, 2)
    elif kind == "2d_flat":
        m, shape = models.cnn(4, features=(4, 8, 16), dense=6, image_shape=(8, 8, 1)), (S, 5, 64)
    elif kind == "tanh":  # the smooth CNN of the non-convex leave-one-out panel
        m, shape = models.cnn(4, features=(3, 5), dense=6, activation="tanh"), (S, 5, 9, 7, 2)
    else:
        m, shape = models.cnn(4, features=(3, 5), dense=6), (S, 5, 11)
    xs = jax.random.normal(jax.random.key(1), shape, jnp.float64)
    # every computation jitted: eager dispatch of each small op costs more than the checks
    vs = jax.jit(jax.vmap(m.init, in_axes=(0, None)))(jax.random.split(jax.random.key(0), S),
                                                      xs[0])
    vs = jax.tree.map(lambda a: a.astype(jnp.float64), vs)
    f = models.ensemble_apply(m)
    assert models.ensemble_apply(models.make(*m.spec[:1], **dict(m.spec[1]))) is f
    take = lambda t, s: jax.tree.map(lambda a: a[s], t)
    one = jax.jit(m.apply)
    ref = jnp.stack([one(take(vs, s), xs[s]) for s in range(S)])
    got = jax.jit(f)(vs, xs)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # gradients of the summed per-member losses w.r.t. the stacked params: per-member grads
    g = jax.jit(jax.grad(lambda v: jnp.sum(f(v, xs) ** 2)))(vs)
    g_one = jax.jit(jax.grad(lambda v, xb: jnp.sum(m.apply(v, xb) ** 2)))
    for s in range(S):
        gs = g_one(take(vs, s), xs[s])
        for a, b in zip(jax.tree.leaves(take(g, s)), jax.tree.leaves(gs)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_ensemble_apply_float32_and_fallbacks():
    m = models.cnn(10, image_shape=(28, 28, 1))  # the tutorial CNN at MNIST size
    S = 2
    xs = jax.random.normal(jax.random.key(1), (S, 4, 784))
    vs = jax.vmap(m.init, in_axes=(0, None))(jax.random.split(jax.random.key(0), S), xs[0])
    take = lambda t, s: jax.tree.map(lambda a: a[s], t)
    ref = jnp.stack([m.apply(take(vs, s), xs[s]) for s in range(S)])
    # float32: two summation orders over up to 1152 products (unit roundoff 6e-8): ~1e-5
    np.testing.assert_allclose(models.ensemble_apply(m)(vs, xs), ref, rtol=1e-4, atol=1e-5)
    d = models.mlp(3, (4,))
    vd = jax.vmap(d.init, in_axes=(0, None))(jax.random.split(jax.random.key(0), S), xs[0])
    np.testing.assert_allclose(models.ensemble_apply(d)(vd, xs),
                               jnp.stack([d.apply(take(vd, s), xs[s])
                                          for s in range(S)]), rtol=1e-6)
    with pytest.raises(ValueError, match="dropout"):
        models.ensemble_apply(models.cnn(10, dropout=0.5))
    with pytest.raises(ValueError, match="resnet9"):
        models.ensemble_apply(models.resnet9(10, width=4))


def test_cnn_activation_option():
    # tanh is a different function from the ReLU net with the same weights; the default stays
    # out of the spec so older specs name the same model
    r, t = models.cnn(3, features=(2,), dense=4), models.cnn(3, features=(2,), dense=4,
                                                             activation="tanh")
    assert "activation" not in dict(r.spec[1]) and dict(t.spec[1])["activation"] == "tanh"
    assert models.from_spec(t.spec) is t
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
    v = r.init(jax.random.key(1), x)
    assert not np.allclose(r.apply(v, x), t.apply(v, x))
    with pytest.raises(ValueError, match="activation='gelu' is unknown"):
        models.cnn(3, activation="gelu")
