"""K-FAC / EK-FAC against dense float64 Gauss–Newton matrices (unlearn.kfac).

Theory used (module docstring of unlearn.kfac): with the same softmax probabilities for every
example the GGN of softmax regression is exactly A ⊗ B, so both inverses are exact; in general
the EK-FAC eigenvalues are the exact diagonal of each layer's GGN block in the Kronecker
eigenbasis. Tolerances: float64 dense algebra on p <= 200 (errors ~1e-13 relative).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from unlearn import curvature as C
from unlearn import kfac, models


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _dense_ggn(apply, params, x, l2):
    theta, _ = ravel_pytree(params)
    op = C.ggn_vp(apply, params, x, jnp.zeros(x.shape[0], jnp.int32), jnp.ones(x.shape[0]), l2)
    return jax.vmap(op)(jnp.eye(theta.size)).T


def test_kfac_and_ekfac_exact_for_softmax_regression_with_shared_probs():
    rng = np.random.default_rng(0)
    m = models.logreg(4)
    x = jnp.asarray(rng.normal(size=(50, 6)))
    params = jax.tree.map(jnp.zeros_like, m.init(jax.random.key(0), x))  # p_i uniform
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    g = _dense_ggn(m.apply, params, x, 0.0)
    fac = kfac.kfac_factors(m.apply, params, x, chunk_size=16)  # 4 chunks: streaming
    shift = 1e-2
    b = jnp.asarray(rng.normal(size=g.shape[0]))
    ref = jnp.linalg.solve(g + shift * jnp.eye(g.shape[0]), b)
    for kind in ("kfac", "ekfac"):
        out = kfac.kfac_inverse(fac, params, shift, kind)(b)
        np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9 * float(jnp.abs(ref).max()))


def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_basis():
    rng = np.random.default_rng(1)
    m = models.mlp(3, (5,))
    x = jnp.asarray(rng.normal(size=(40, 4)))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), m.init(jax.random.key(1), x))
    g = _dense_ggn(m.apply, params, x, 0.0)
    fac = kfac.kfac_factors(m.apply, params, x, chunk_size=13)
    # Flat layout: Dense_0/bias (5), Dense_0/kernel (4*5), Dense_1/bias (3), Dense_1/kernel (5*3)
    blocks = {"Dense_0": (0, 25, 5, 5), "Dense_1": (25, 43, 6, 3)}
    for name, (lo, hi, din1, dout) in blocks.items():
        gb = g[lo:hi, lo:hi]  # rows ordered [bias; kernel] row-major = vec of (din+1, dout)
        q = jnp.kron(fac.qa[name], fac.qb[name])
        diag = jnp.diag(q.T @ gb @ q).reshape(din1, dout)
        np.testing.assert_allclose(fac.lam_ekfac[name], diag, rtol=1e-9,
                                   atol=1e-12 * float(jnp.abs(diag).max()))


def test_kfac_rejects_conv_models():
    m = models.make("cnn", 3, features=(2,), dense=4, image_shape=(4, 4, 1))
    x = jnp.ones((2, 16))
    params = m.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="Dense layers only.*Conv_0"):
        kfac.kfac_factors(m.apply, params, x)


def test_kfac_refuses_a_dense_layer_applied_twice():
    """Shared weights (one Dense called twice) have no single Kronecker factorisation."""
    import flax.linen as nn

    from unlearn import task

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(3)
            return d(jnp.tanh(d(x)))

    t = task.from_linen(Twice())
    x = jnp.ones((4, 3))
    params = t.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="'Dense_0' is applied more than once"):
        kfac.kfac_factors(t.apply, params, x)
