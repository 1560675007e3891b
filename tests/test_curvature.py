"""Tests for unlearn.curvature: exact Hessians, closed form, HVP, GGN, per-example gradients.

All checks run in float64 (enabled only inside each test by a fixture, so x64 does not leak
into other test files); tolerances are stated relative to float64 round-off (~1e-16) or, for
finite differences, to the O(h^2) truncation error.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from unlearn import curvature as C


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


class MLP(nn.Module):
    hidden: int = 6
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(jnp.tanh(nn.Dense(self.hidden)(x)))


def _data(n=40, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float64)
    y = jnp.asarray(rng.integers(0, k, size=n))
    w = jnp.asarray(rng.uniform(size=n) > 0.2, jnp.float64)  # some examples removed
    return x, y, w


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _mlp(d=5, k=3, seed=1):
    model = MLP(classes=k)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, d), jnp.float64))
    return model.apply, _f64(params)


def _softmax(d=10, k=3, seed=2):
    model = nn.Dense(k)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, d), jnp.float64))
    # Non-trivial bias so that the bias block is exercised.
    params = jax.tree_util.tree_map(lambda a: a + 0.3, _f64(params))
    return model.apply, params


@functools.partial(jax.jit, static_argnums=0)
def _dense_hessian(apply, params, x, y, w, l2):
    theta, unravel = ravel_pytree(params)
    return jax.hessian(C.flat_objective(apply, unravel))(theta, x, y, w, l2)


def test_objective_convention():
    apply, params = _mlp()
    x, y, w = _data()
    logits = np.asarray(jax.jit(apply)(params, x))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -logp[np.arange(len(y)), np.asarray(y)]
    theta = np.asarray(ravel_pytree(params)[0])
    want = np.sum(np.asarray(w) * ce) / max(float(w.sum()), 1.0) + 0.5 * 0.1 * theta @ theta
    obj = jax.jit(C.objective, static_argnums=0)  # the one objective: (apply, params, x, y, w, l2)
    np.testing.assert_allclose(obj(apply, params, x, y, w, 0.1), want, rtol=1e-13)
    # all-zero weights: no division by zero
    assert jnp.isfinite(obj(apply, params, x, y, 0 * w, 0.1))


def test_hessian_matches_finite_differences():
    apply, params = _mlp()
    x, y, w = _data()
    l2 = 0.05
    h = C.hessian(apply, params, x, y, w, l2, chunk_size=16)
    theta, unravel = ravel_pytree(params)
    g = jax.jit(jax.grad(C.flat_objective(apply, unravel)))
    eps = 1e-5
    eye = jnp.eye(theta.size)
    fd = jnp.stack(
        [
            (g(theta + eps * e, x, y, w, l2) - g(theta - eps * e, x, y, w, l2)) / (2 * eps)
            for e in eye
        ]
    )
    # Central differences: O(eps^2) ~ 1e-10 truncation plus ~1e-16/eps ~ 1e-11 round-off.
    np.testing.assert_allclose(h, fd, atol=1e-8)
    np.testing.assert_allclose(h, h.T, atol=1e-14)


def test_hessian_chunked_equals_unchunked_and_jax_hessian():
    apply, params = _mlp()
    x, y, w = _data(n=37)  # not a multiple of the chunk: exercises zero-weight padding
    ref = _dense_hessian(apply, params, x, y, w, 0.01)
    for chunk in (8, 1000):
        h = C.hessian(apply, params, x, y, w, 0.01, chunk_size=chunk)
        np.testing.assert_allclose(h, ref, rtol=1e-11, atol=1e-13)


def test_softmax_closed_form_matches_jax_hessian():
    apply, params = _softmax(d=10, k=3)
    x, y, w = _data(n=60, d=10, k=3)
    theta, _ = ravel_pytree(params)
    # ravel_pytree order for flax Dense: bias (K,) first, then kernel (d, K) row-major.
    assert theta[:3].tolist() == params["params"]["bias"].tolist()
    ref = _dense_hessian(apply, params, x, y, w, 1e-3)
    for chunk, blocks in [(1024, None), (7, 3), (5, 8)]:
        h = C.softmax_regression_hessian(params, x, w, 1e-3, chunk_size=chunk, blocks=blocks)
        assert h.shape == (33, 33)
        np.testing.assert_allclose(h, ref, rtol=1e-12, atol=1e-14)
    # precomputed probabilities give the same matrix
    probs = jax.nn.softmax(apply(params, x))
    h = C.softmax_regression_hessian(params, x, w, 1e-3, probs=probs)
    np.testing.assert_allclose(h, ref, rtol=1e-12, atol=1e-14)
    # the generic chunked Hessian agrees too
    np.testing.assert_allclose(C.hessian(apply, params, x, y, w, 1e-3), ref, atol=1e-13)


def test_softmax_closed_form_kernel_first_pytree():
    apply, params = _softmax(d=4, k=3)
    p = params["params"]["Dense_0"] if "Dense_0" in params["params"] else params["params"]
    swapped = {"a_kernel": p["kernel"], "b_bias": p["bias"]}  # kernel before bias

    def apply2(q, x):
        return x @ q["a_kernel"] + q["b_bias"]

    x, y, w = _data(n=20, d=4, k=3)
    ref = _dense_hessian(apply2, swapped, x, y, w, 0.0)
    h = C.softmax_regression_hessian(swapped, x, w, 0.0)
    np.testing.assert_allclose(h, ref, rtol=1e-12, atol=1e-14)


def test_hvp_matches_dense():
    apply, params = _mlp()
    x, y, w = _data()
    h = _dense_hessian(apply, params, x, y, w, 0.02)
    v = jnp.asarray(np.random.default_rng(3).normal(size=h.shape[0]))
    mv = C.hvp(apply, params, x, y, w, 0.02)
    np.testing.assert_allclose(mv(v), h @ v, rtol=1e-11, atol=1e-13)
    damped = C.hvp(apply, params, x, y, w, 0.02, damping=0.5)
    np.testing.assert_allclose(damped(v), h @ v + 0.5 * v, rtol=1e-11, atol=1e-13)
    # a Partial is a pytree: it can be passed to jit as data
    np.testing.assert_allclose(jax.jit(lambda op, v: op(v))(mv, v), h @ v, rtol=1e-11)


def test_ggn_matches_dense_jt_h_j():
    apply, params = _mlp()
    x, y, w = _data()
    theta, unravel = ravel_pytree(params)

    @jax.jit
    def dense_ggn(theta, x, w):
        jac = jax.jacobian(lambda t: apply(unravel(t), x))(theta)  # (n, K, p)
        p = jax.nn.softmax(apply(unravel(theta), x))
        h_out = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p) * (w / w.sum())[:, None, None]
        return jnp.einsum("nkp,nkl,nlq->pq", jac, h_out, jac) + 0.02 * jnp.eye(theta.size)

    g = dense_ggn(theta, x, w)
    v = jnp.asarray(np.random.default_rng(4).normal(size=theta.shape))
    mv = C.ggn_vp(apply, params, x, y, w, 0.02)
    np.testing.assert_allclose(mv(v), g @ v, rtol=1e-11, atol=1e-13)
    assert jnp.linalg.eigvalsh(g)[0] > 0  # PSD (+ l2)
    # For a model linear in its parameters, GGN == Hessian.
    apply_s, params_s = _softmax(d=5, k=3)
    hs = _dense_hessian(apply_s, params_s, x, y, w, 0.0)
    vs = jnp.ones(hs.shape[0])
    np.testing.assert_allclose(
        C.ggn_vp(apply_s, params_s, x, y, w, 0.0)(vs), hs @ vs, rtol=1e-11, atol=1e-13
    )


def test_per_example_grads():
    apply, params = _mlp()
    x, y, _ = _data(n=13)
    theta, unravel = ravel_pytree(params)
    g = C.per_example_grads(apply, params, x, y)
    assert g.shape == (13, theta.size)
    grad = jax.jit(jax.grad(C.flat_objective(apply, unravel)))
    for i in (0, 7, 12):
        want = grad(theta, x[i : i + 1], y[i : i + 1], jnp.ones(1), 0.0)
        np.testing.assert_allclose(g[i], want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        C.per_example_grads(apply, params, x, y, chunk_size=4), g, rtol=1e-12
    )
    # mean of per-example grads == gradient of the unweighted objective
    np.testing.assert_allclose(
        g.mean(0), C.flat_grad(apply, params, x, y, jnp.ones(13), 0.0), rtol=1e-11, atol=1e-14
    )
