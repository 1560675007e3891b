"""Per-token influence scores (unlearn.influence.token_influence / token_scores) on a tiny
2-layer transformer in float64, against independent computations:

* the per-sequence scores of ``influence_up_loss`` with the same prepared backend (the token
  scores must sum over positions to them);
* a brute-force loop over sequences and positions: ``jax.grad`` (reverse mode) of the
  written-out weighted token loss :math:`w_{it}\\ell_{it}` with :math:`w_{it}` counted by NumPy,
  dotted with the inverse-curvature test gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from unlearn import influence, inverse, models

V, T, N = 7, 6, 5


@pytest.fixture(scope="module")
def setup():
    with jax.enable_x64(True):
        model = models.transformer(V, width=4, depth=2, heads=2, max_len=T, mlp_ratio=2)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.integers(0, V, size=(N, T)))
        y = rng.integers(0, V, size=(N, T))
        y[1, 4:] = -1  # padding
        y[3, 2:] = -1
        y = jnp.asarray(y)
        p0 = model.init(jax.random.key(0), x)
        theta, unravel = ravel_pytree(p0)
        noise = jax.random.normal(jax.random.key(1), theta.shape)
        params = unravel(theta.astype(jnp.float64) + 0.3 * noise)
        xt = jnp.asarray(rng.integers(0, V, size=(3, T)))
        yt = jnp.asarray(rng.integers(0, V, size=(3, T)))
        return model, params, x, y, xt, yt


@pytest.fixture
def f64():
    with jax.enable_x64(True):
        yield


def _brute_force(model, params, x, y, s):
    """(m, n, T): s_qᵀ ∇θ (w_it ℓ_it), one reverse-mode gradient per (i, t)."""
    theta, unravel = ravel_pytree(params)

    @jax.jit
    def grad_term(th, xi, t, target, count):
        def term(th):
            z = model.apply(unravel(th), xi[None])[0, t]
            return -(z[target] - jax.scipy.special.logsumexp(z)) / count

        return jax.grad(term)(th)

    out = np.zeros((s.shape[0], x.shape[0], x.shape[1]))
    for i in range(x.shape[0]):
        yi = np.asarray(y[i])
        count = float(max(int((yi >= 0).sum()), 1))
        for t in range(x.shape[1]):
            if yi[t] < 0:
                continue  # weight 0: no term
            g = grad_term(theta, x[i], t, int(yi[t]), count)
            out[:, i, t] = np.asarray(s) @ np.asarray(g)
    return out


def test_token_scores_sum_to_sequence_scores_and_match_a_loop(setup, f64):
    """token_influence (Exact GGN backend, damping 1e-2): scores (m, n, T) sum over T to
    influence_up_loss's per-sequence scores (same backend, rtol 1e-10), equal the brute-force
    loop over positions (rtol 1e-9), and padding positions are exactly 0 — for chunks of 2
    (the last one padded) and of all sequences alike."""
    model, params, x, y, xt, yt = setup
    curv = inverse.Curvature(model.apply, params, x, y, 1e-3, kind="ggn")
    prepared = inverse.Exact().prepare(curv, 1e-2)
    seq = influence.influence_up_loss(curv, xt, yt, prepared)
    tok = influence.token_influence(curv, xt, yt, prepared, chunk_size=2)
    assert tok.scores.shape == (3, N, T)
    np.testing.assert_allclose(tok.s_test, seq.s_test, rtol=0, atol=0)
    np.testing.assert_allclose(tok.scores.sum(-1), seq.scores, rtol=1e-10,
                               atol=1e-12 * float(jnp.abs(seq.scores).max()))
    pad = np.asarray(y) < 0
    assert pad.sum() == 6 and np.all(np.asarray(tok.scores)[:, pad] == 0.0)
    assert np.all(np.asarray(tok.scores)[:, ~pad] != 0.0)
    ref = -_brute_force(model, params, x, y, tok.s_test)
    np.testing.assert_allclose(tok.scores, ref, rtol=1e-9,
                               atol=1e-12 * np.abs(ref).max())
    whole = influence.token_scores(model.apply, params, x, y, tok.s_test, chunk_size=N)
    np.testing.assert_allclose(-whole, tok.scores, rtol=1e-12, atol=1e-15)


def test_token_scores_with_an_iterative_backend_sum_to_its_sequence_scores(setup, f64):
    """With CG (not the dense solve) the same identity holds: the token scores are a split of
    the per-sequence scores of whatever backend solved for s_test."""
    model, params, x, y, xt, yt = setup
    curv = inverse.Curvature(model.apply, params, x, y, 1e-2, kind="ggn")
    prepared = inverse.CG(tol=1e-10, block=False).prepare(curv, 0.0)
    seq = influence.influence_up_loss(curv, xt, yt, prepared)
    tok = influence.token_influence(curv, xt, yt, prepared)
    np.testing.assert_allclose(tok.scores.sum(-1), seq.scores, rtol=1e-10,
                               atol=1e-12 * float(jnp.abs(seq.scores).max()))


def test_token_scores_refuse_a_loss_without_token_terms(f64):
    mlp = models.mlp(3, hidden=(4,))
    x = jnp.ones((4, 2))
    params = mlp.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="sequence_cross_entropy"):
        influence.token_scores(mlp.apply, params, x, jnp.zeros(4, int), jnp.ones((1, 23)))
    model = models.transformer(V, width=4, depth=1, heads=2, max_len=T)
    xs = jnp.zeros((2, T), int)
    p = model.init(jax.random.key(0), xs)
    with pytest.raises(ValueError, match="s must be"):
        influence.token_scores(model.apply, p, xs, xs, jnp.ones(3))
    with pytest.raises(ValueError, match="chunk_size"):
        influence.token_scores(model.apply, p, xs, xs, jnp.ones((1, 3)), chunk_size=0)
