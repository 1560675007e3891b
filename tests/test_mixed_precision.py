"""The engine's mixed-precision option (``compute_dtype``): float32 master weights and optimiser
state, bfloat16 forward/backward; checked against a hand-written training loop, against
float32 training and for member independence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unlearn import data, engine, models
from unlearn.objective import objective

KW = dict(epochs=2, batch_size=32, optimizer="adam", lr=3e-3, l2=1e-3, dtype="float32")


@pytest.fixture(scope="module")
def setting():
    tr = data.load("digits").train.subset(np.arange(256))
    return tr, models.mlp(10, (32,)), jax.random.split(jax.random.key(1), 3)


def _hand_loop(m, tr, key, compute):
    """Member ``key`` trained by a plain Python loop: the engine's data order
    (``member_batches``), the loss on ``compute``-dtype forward passes with float32 logits,
    float32 Adam (optax) on float32 parameters."""
    h = data.stable_hash(tr.ids)
    seed = engine.key_seed(key)
    params = engine.split_variables(m.init(jax.random.fold_in(key, 0), tr.x[:1]))[0]
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=KW["lr"])
    state = opt.init(params)

    def fwd(p, x):
        c = lambda t: jax.tree.map(lambda a: a.astype(compute), t)  # noqa: E731
        return m.apply(c(p), c(x)).astype(jnp.float32)

    apply = m.apply.derive(fwd)

    @jax.jit
    def step(p, s, xb, yb, wb):
        g = jax.grad(lambda q: objective(apply, q, xb, yb, wb, KW["l2"]))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for e in range(KW["epochs"]):
        idx, w = engine.member_batches(np.arange(len(tr)), h, seed, e, KW["batch_size"])
        for i, wb in zip(idx, w):
            params, state = step(params, state, jnp.asarray(tr.x[i]), jnp.asarray(tr.y[i]),
                                 jnp.asarray(wb))
    return params


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_bfloat16_matches_hand_loop_and_stays_float32(setting):
    tr, m, keys = setting
    h = data.stable_hash(tr.ids)
    out = engine.train_members(m, tr.x, tr.y, h, keys[:1], compute_dtype="bfloat16", **KW)
    assert {a.dtype for a in jax.tree.leaves(out.members.params)} == {jnp.dtype(jnp.float32)}
    assert {a.dtype for a in jax.tree.leaves(out.members.opt_state)
            if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    ref = _hand_loop(m, tr, keys[0], jnp.bfloat16)
    got = engine.unstack(out.members.params, 0)
    # the same arithmetic; 1e-6 (the float32 width the engine's tests allow between two
    # programs, for XLA fusing Adam or the loss differently; measured here: 0.0)
    assert _max_diff(got, ref) <= 1e-6
    # and bfloat16 really ran: a float32 hand loop is farther away than that
    ref32 = _hand_loop(m, tr, keys[0], jnp.float32)
    assert _max_diff(got, ref32) > 100 * max(_max_diff(got, ref), 1e-7)


def test_bfloat16_members_independent_and_close_to_float32(setting):
    tr, m, keys = setting
    h = data.stable_hash(tr.ids)
    alone = engine.train_members(m, tr.x, tr.y, h, keys[1:2], compute_dtype="bfloat16", **KW)
    group = engine.train_members(m, tr.x, tr.y, h, keys, compute_dtype="bfloat16", **KW)
    assert _max_diff(engine.unstack(alone.members.params, 0),
                     engine.unstack(group.members.params, 1)) == 0.0
    f32 = engine.train_members(m, tr.x, tr.y, h, keys, **KW)
    acc = [float(np.mean(np.asarray(jnp.argmax(engine.stacked_apply(m, t.members.params,
                                                                    jnp.asarray(tr.x)), -1))
                         == tr.y[None], axis=1).mean()) for t in (group, f32)]
    assert abs(acc[0] - acc[1]) <= 0.03, acc  # same training, 8-bit mantissa forward


def test_compute_dtype_errors(setting):
    tr, m, keys = setting
    h = data.stable_hash(tr.ids)
    with pytest.raises(ValueError, match="compute_dtype"):
        engine.train_members(m, tr.x, tr.y, h, keys[:1], compute_dtype="int8", **KW)
    with pytest.raises(ValueError, match="float32 master weights"):
        engine.train_members(m, tr.x, tr.y, h, keys[:1], compute_dtype="bfloat16",
                             **{**KW, "dtype": "float64"})
