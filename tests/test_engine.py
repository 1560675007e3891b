"""The training engine: members against independent single-model runs, strategies against each
other, model state against a hand-written flax/optax loop, the compile cache, divergence."""

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unlearn import data, engine, models, train
from unlearn.metrics import flat


@pytest.fixture(scope="module")
def digits():
    return data.load("digits").train.subset(np.arange(300))


# ----------------------------------------------------------------------------- a stateful model


class _BNNet(nn.Module):
    """Dense (no bias: BatchNorm would cancel it and Adam would amplify its rounding-level
    gradient) → BatchNorm → ReLU → Dense: the smallest model with state."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16, use_bias=False)(x.reshape((x.shape[0], -1)))  # BN removes a bias
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.relu(x))


class StateModel(NamedTuple):
    init: object
    apply: object
    name: str
    convex: bool = False
    has_conv: bool = False
    has_state: bool = True


def bn_model() -> StateModel:
    """The functional contract of the models module: ``apply(variables, x, *, train, rng)``
    returns ``(logits, new_state)`` in train mode, logits in eval mode."""
    mod = _BNNet()

    def init(key, x):
        return mod.init(key, jnp.asarray(x[:1]))

    def apply(variables, x, *, train=False, rng=None):
        if train:
            return mod.apply(variables, x, train=True, mutable=["batch_stats"])
        return mod.apply(variables, x)

    return StateModel(init, apply, "bnnet")


def test_batchnorm_training_matches_a_hand_written_flax_loop(digits, x64):
    """The engine's stateful step = flax ``mutable=["batch_stats"]`` + optax.adam applied by
    hand to the same batches, in float64 (same operations: equal to rounding, 1e-12)."""
    m = bn_model()
    cfg = train.TrainConfig(epochs=2, batch_size=64, lr=1e-2, l2=1e-3, dtype="float64")
    key = jax.random.key(5)
    fit = train.fit(m, digits, cfg, key)
    assert "batch_stats" in fit.params
    # reference: the same init, the same data order, a plain loop
    mod = _BNNet()
    v = train.init_params(m, digits, key, "float64")
    params, stats = {"params": v["params"]}, v["batch_stats"]
    opt = optax.adam(cfg.lr)
    o = opt.init(params)
    x, y = jnp.asarray(digits.x, jnp.float64), jnp.asarray(digits.y)
    h = data.stable_hash(digits.ids)
    for e in range(cfg.epochs):
        idx, msk = train.batch_indices(np.arange(len(digits)),
                                       train.epoch_order(h, train.key_seed(key), e), 64)
        for i, w in zip(idx, msk):
            def loss(p, i=i, w=w, stats=stats):
                z, upd = mod.apply({**p, "batch_stats": stats}, x[i], train=True,
                                   mutable=["batch_stats"])
                ce = optax.softmax_cross_entropy_with_integer_labels(z, y[i])
                pen = sum(jnp.vdot(a, a) for a in jax.tree.leaves(p))
                return jnp.sum(w * ce) / max(w.sum(), 1) + 0.5 * cfg.l2 * pen, upd

            (_, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
            u, o = opt.update(g, o, params)
            params, stats = optax.apply_updates(params, u), upd["batch_stats"]
    np.testing.assert_allclose(flat(fit.params["params"]), flat(params["params"]),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(flat(fit.params["batch_stats"]), flat(stats),
                               rtol=1e-12, atol=1e-12)
    # the statistics moved from their initial values (mean 0, var 1)
    assert np.abs(flat(stats) - flat(v["batch_stats"])).max() > 1e-2


# ----------------------------------------------------------------------------- members


def test_grid_members_equal_separate_fits(digits):
    """Each point of a learning-rate × weight-decay grid trained as one ensemble equals
    ``fit`` with that point's config, run separately, bit for bit in float32 (a member's
    arithmetic does not depend on the other members)."""
    m = models.mlp(10, (16,))
    cfg = train.TrainConfig(epochs=2, batch_size=64, dtype="float32")
    lrs, l2s = [1e-3, 3e-3, 1e-2], [0.0, 1e-3, 1e-2]
    stacked, grid = train.train_grid(m, digits, cfg, jax.random.key(1), lr=lrs, l2=l2s)
    np.testing.assert_array_equal(grid, np.c_[lrs, l2s])
    for g, (lr, l2) in enumerate(zip(lrs, l2s)):
        ref = train.fit(m, digits, dataclasses.replace(cfg, lr=lr, l2=l2), jax.random.key(1))
        np.testing.assert_array_equal(flat(engine.unstack(stacked, g)), flat(ref.params))
    assert not np.allclose(flat(engine.unstack(stacked, 0)), flat(engine.unstack(stacked, 2)))


@pytest.mark.parametrize("strategy", ["loop", "vmap", "fused"])
def test_strategies_agree_with_scan_on_padded_members(digits, strategy, x64):
    """Members of different sizes (no-op steps) give the same result under every strategy
    (float64, the same per-member arithmetic: 1e-10)."""
    m = models.cnn(10, features=(4,), dense=8, image_shape=(8, 8, 1))
    keys = jnp.stack([jax.random.key(0), jax.random.key(1)])
    w = np.ones((2, len(digits)), np.float32)
    w[1, :100] = 0  # member 1 has fewer batches
    kw = dict(epochs=1, batch_size=64, optimizer="adam", lr=1e-2, l2=1e-3, dtype="float64",
              weights=w)
    h = data.stable_hash(digits.ids)
    a = engine.train_members(m, digits.x, digits.y, h, keys, strategy="scan", **kw)
    b = engine.train_members(m, digits.x, digits.y, h, keys, strategy=strategy, **kw)
    np.testing.assert_allclose(flat(a.members.params), flat(b.members.params), rtol=1e-10,
                               atol=1e-12)


def test_auto_strategy_fuses_the_plain_cnn_only_and_refuses_fused_elsewhere():
    """On CPU ``auto`` picks the im2col ``fused`` form for the plain CNN, ``loop`` for conv
    models without one (dropout, BatchNorm ResNets), ``scan`` for dense models; asking for
    ``fused`` on a model without the im2col form is an error naming the alternatives."""
    assert jax.default_backend() == "cpu"
    assert engine.resolve_strategy(models.cnn(10, image_shape=(8, 8, 1))) == "fused"
    assert engine.resolve_strategy(models.cnn(10, features=(4,), dense=8)) == "fused"
    assert engine.resolve_strategy(models.cnn(10, dropout=0.5)) == "loop"
    assert engine.resolve_strategy(models.resnet9(10, width=8)) == "loop"
    assert engine.resolve_strategy(models.mlp(10, (8,))) == "scan"
    for m in (models.cnn(10, dropout=0.5), models.resnet9(10, width=8), models.mlp(10, (8,))):
        with pytest.raises(ValueError, match="strategy='fused' needs the plain CNN"):
            engine.resolve_strategy(m, "fused")


def test_noop_steps_leave_a_member_untouched(digits):
    """A member whose schedule is all no-op steps keeps params and Adam state bit for bit."""
    m = models.mlp(10, (8,))
    keys = jnp.stack([jax.random.key(0), jax.random.key(1)])
    v = engine.init_variables(m, jnp.asarray(digits.x[:1]), keys, "float32")
    mem = engine.init_members(v, "adam", 1e-2)
    d = engine.device_data(digits.x, digits.y, None, "float32")
    idx, w = engine.batch_indices(np.arange(len(digits)), np.arange(len(digits)), 64)
    sched = engine.stack_schedules([((idx, w),), None], 64)
    out, _ = engine.run(m, mem, d, sched, keys=keys, aux={"l2": jnp.zeros(2)},
                        optimizer="adam", dtype="float32")
    for new, old in zip(jax.tree.leaves(engine.unstack(out, 1)),
                        jax.tree.leaves(engine.unstack(mem, 1))):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    assert not np.array_equal(flat(engine.unstack(out.params, 0)),
                              flat(engine.unstack(mem.params, 0)))


def test_schedule_steps_pad_with_noops_and_local_members():
    """``stack_schedules(steps=T)`` pads every member to T no-op steps (what each process of a
    multi-process mesh uses so that all agree on T while building only their own members'
    batches) and refuses a T below the longest member; in one process every member is
    local."""
    idx, w = engine.batch_indices(np.arange(10), np.arange(10), 4)  # 3 batches
    a = engine.stack_schedules([((idx, w),), None], 4)
    b = engine.stack_schedules([((idx, w),), None], 4, steps=5)
    assert a.steps == 3 and b.steps == 5
    np.testing.assert_array_equal(b.active, [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.idx[0][:, :3], a.idx[0])
    with pytest.raises(ValueError, match="steps=2 is below"):
        engine.stack_schedules([((idx, w),)], 4, steps=2)
    from unlearn import distributed

    mesh = distributed.global_mesh()
    n = 2 * len(jax.devices())
    assert distributed.local_members(n, mesh).tolist() == [True] * n


_MEMBER_MODELS = {  # strategy -> a small model of the kind that strategy serves
    "scan": lambda: models.mlp(10, (16,)),
    "fused": lambda: models.cnn(10, features=(4, 8), dense=16, image_shape=(8, 8, 1)),
    "loop": bn_model,  # model state (BatchNorm statistics)
    "vmap": lambda: models.cnn(10, features=(4,), dense=8, dropout=0.3,
                               image_shape=(8, 8, 1)),  # dropout: keys matter
}


@pytest.mark.parametrize("strategy", ["scan", "fused", "loop", "vmap"])
def test_a_member_is_bit_identical_whatever_the_other_members(digits, strategy):
    """float32: member "me" trained alone (S = 1) and in programs whose other members are
    changed (other data, sizes, keys, learning rates — some shorter, so with no-op steps),
    reordered ("me" in another slot) and removed or added (S = 1, 2, 3, 5) ends with the
    same parameters, optimiser state and model state, bit for bit.

    Before the member axis was unrolled/looped this failed on CPU: a vmapped member axis
    let XLA pick kernels by S (S = 1 vs S ≥ 2, grouped convolutions by group count) and a
    ``where`` compiled only into programs with no-op steps changed the update's fusion."""
    m = _MEMBER_MODELS[strategy]()
    n = len(digits)
    h = data.stable_hash(digits.ids)

    def rows(a, b):
        w = np.zeros(n, np.float32)
        w[a:b] = 1
        return w

    me = (0, rows(0, 120), 1e-2)
    others = [(1, rows(50, 90), 3e-3), (2, rows(0, 200), 2e-2), (3, rows(120, 300), 5e-3),
              (4, rows(10, 40), 1e-2), (5, rows(0, 120), 1e-3)]  # 5: my rows, another key

    def train_group(specs):
        out = engine.train_members(
            m, digits.x, digits.y, h, jnp.stack([jax.random.key(k) for k, _, _ in specs]),
            epochs=2, batch_size=16, optimizer="adam", lr=np.array([s[2] for s in specs]),
            l2=1e-3, dtype="float32", strategy=strategy,
            weights=np.stack([s[1] for s in specs]))
        return out.members

    groups = {"alone": [me], "with two": [me, others[0], others[1]],
              "second slot": [others[2], me], "five": others[:2] + [me] + others[3:]}
    results = {name: train_group(g) for name, g in groups.items()}
    ref = engine.unstack(results["alone"], 0)
    for name, g in groups.items():
        got = engine.unstack(results[name], g.index(me))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    # the check can fail: every member trained, and on its own data/key/rate
    five = results["five"]
    assert not np.array_equal(flat(engine.unstack(five.params, 2)),
                              flat(engine.unstack(five.params, 4)))  # same rows, other key
    init = engine.init_variables(m, jnp.asarray(digits.x[:1], jnp.float32),
                                 jnp.stack([jax.random.key(0)]), "float32")
    assert not np.array_equal(flat(ref.params), flat(engine.split_variables(
        engine.unstack(init, 0))[0]))
    if strategy == "loop":  # the BatchNorm statistics moved too
        assert ref.model_state and not np.array_equal(
            flat(ref.model_state), flat(engine.split_variables(engine.unstack(init, 0))[1]))


def test_tail_padding_is_a_function_of_the_ids_present():
    """Padded rows repeat the tail batch's own rows (weight 0), never a fixed data row."""
    idx, w = engine.batch_indices(np.array([10, 11, 12, 13, 14]), np.arange(5), 4)
    np.testing.assert_array_equal(idx, [[10, 11, 12, 13], [14, 14, 14, 14]])
    np.testing.assert_array_equal(w, [[1, 1, 1, 1], [1, 0, 0, 0]])


# ----------------------------------------------------------------------------- compile cache


def test_fresh_model_objects_share_compiled_programs(digits):
    """A second run with newly built (equal) model and config objects and another learning
    rate traces nothing new."""
    cfg = train.TrainConfig(epochs=1, batch_size=64)
    train.fit(models.mlp(10, (12,)), digits, cfg, jax.random.key(0))
    before = engine.cache_info()
    train.fit(models.mlp(10, (12,)), digits, dataclasses.replace(cfg, lr=5e-3),
              jax.random.key(1))
    assert engine.cache_info() == before
    train.fit(models.mlp(10, (13,)), digits, cfg, jax.random.key(0))  # another model
    assert engine.cache_info()["traces"] > before["traces"]


# ----------------------------------------------------------------------------- errors


def test_divergence_names_the_member(digits):
    m = models.mlp(10, (16,))
    cfg = train.TrainConfig(epochs=3, batch_size=64, optimizer="sgd")
    with pytest.raises(FloatingPointError, match=r"member\(s\) \[1\].*lr=\[1e\+30\]"):
        train.train_grid(m, digits, cfg, jax.random.key(0), lr=[1e-3, 1e30])


@pytest.mark.parametrize("field,value", [
    ("batch_size", 0), ("epochs", -1), ("epochs", 1.5), ("lr", float("nan")), ("lr", 0.0),
    ("lr", float("inf")), ("l2", -1e-3), ("optimizer", "adamw"), ("strategy", "pmap"),
    ("dtype", "bfloat16"), ("solver", "newton"), ("augment", "mixup"),
])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}="):
        train.TrainConfig(**{field: value})


# ----------------------------------------------------------------------------- SISA on the engine


def _sisa_exactness(model, tr, strategy="auto"):
    from unlearn import sisa

    cfg = train.TrainConfig(epochs=2, batch_size=16, lr=1e-2, dtype="float64",
                            augment="crop_flip", strategy=strategy)
    plan = sisa.Plan(shards=4, slices=2)
    key = jax.random.key(0)
    st = sisa.train(model, tr, cfg, plan, key)
    forget = tr.ids[[3, 50, 77]]
    new, stats = sisa.forget(st, forget)
    assert 1 <= stats["shards_retrained"] <= 3
    w = np.ones(len(tr), np.float32)
    w[tr.positions(forget)] = 0
    scratch = sisa.train(model, tr, cfg, plan, key, weights=w, layout=st.layout)
    stats_leaves = jax.tree.leaves(new.ckpts[0]["batch_stats"])
    assert stats_leaves and all(np.asarray(a).dtype == np.float64 for a in stats_leaves)
    d_params = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves(new.ckpts[0]["params"]), jax.tree.leaves(scratch.ckpts[0]["params"])))
    d_stats = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        stats_leaves, jax.tree.leaves(scratch.ckpts[0]["batch_stats"])))
    assert d_params == 0.0 and d_stats == 0.0, (d_params, d_stats)
    for a, b in zip(jax.tree.leaves(new.ckpts), jax.tree.leaves(scratch.ckpts), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # optimiser states too
    # the test can fail: augmentation and the forget request both change the models
    plain = sisa.train(model, tr, dataclasses.replace(cfg, augment="none"), plan, key)
    assert not np.array_equal(flat(plain.params["params"]), flat(st.params["params"]))
    assert not np.array_equal(flat(new.params["params"]), flat(st.params["params"]))
    assert not np.array_equal(flat(new.params["batch_stats"]), flat(st.params["batch_stats"]))


@pytest.fixture(scope="module")
def digit_images(digits):
    tr = digits.subset(np.arange(160))
    return data.make(tr.x.reshape(-1, 8, 8, 1), tr.y, num_classes=10, ids=tr.ids,
                     name="digits-img")


def test_sisa_exact_with_batchnorm_and_augmentation(digit_images, x64):
    """``forget(train(D), U) == train(D∖U)`` with BatchNorm and random crop + flip, float64:
    every checkpoint's parameters, batch statistics and optimiser state agree bit for bit
    (max |Δθ| = max |Δ stats| = 0: the retrained shards replay the same batches, augmentation
    keys and statistics)."""
    _sisa_exactness(bn_model(), digit_images)


@pytest.mark.slow
def test_sisa_exact_with_resnet9_and_augmentation(digit_images, x64):
    """The same with a (narrow) BatchNorm ResNet-9, shards unrolled (CPU conv strategy)."""
    _sisa_exactness(models.resnet9(10, width=4, image_shape=(8, 8, 1)), digit_images)
