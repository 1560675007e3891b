"""Binary logistic regression (``models.binary_logreg``) and its convex fast paths on real MNIST
pairs (``mnist5k``), float64: the logistic loss, the closed-form Hessian vs ``jax.hessian``,
Newton removal vs retraining, certified removal with Guo et al.'s binary constants."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from unlearn import certified, curvature, data, inverse, methods, models, train
from unlearn.objective import example_losses, objective


@pytest.fixture(scope="module")
def pair():
    """120 training images of digits 3 and 8, rows scaled to unit norm (as Guo et al.)."""
    tr = data.load("mnist5k", classes=(3, 8)).train
    keep = np.concatenate([np.nonzero(tr.y == c)[0][:60] for c in (0, 1)])
    tr = tr.subset(np.sort(keep))
    x = tr.x.reshape(len(tr), -1)
    return data.make(x / np.linalg.norm(x, axis=1, keepdims=True), tr.y, num_classes=2,
                     ids=tr.ids, name="mnist5k-3v8")


@pytest.fixture
def fitted(pair, x64):
    cfg = train.TrainConfig(solver="lbfgs", l2=1e-2, tol=1e-10, max_iter=5000, dtype="float64")
    problem = train.Problem(models.binary_logreg(2), pair, cfg, jax.random.key(0))
    return problem, train.train(problem)


def test_cross_entropy_of_0_z_is_the_logistic_loss(pair, x64):
    m = models.binary_logreg()
    params = train.cast(m.init(jax.random.key(3), pair.x[:2]), "float64")
    x = jnp.asarray(pair.x, jnp.float64)
    z = np.asarray(m.apply(params, x))[:, 1]
    ytil = 2.0 * pair.y - 1.0
    ref = np.logaddexp(0.0, -ytil * z)  # log(1 + exp(-ỹ z)), written independently
    got = np.asarray(example_losses(m.apply, params, x, jnp.asarray(pair.y)))
    np.testing.assert_allclose(got, ref, rtol=1e-13)
    assert np.asarray(m.apply(params, x))[:, 0].max() == 0.0
    with pytest.raises(ValueError, match="num_classes=2"):
        models.binary_logreg(3)


def test_closed_form_hessian_matches_autodiff(pair, x64):
    m = models.binary_logreg()
    params = train.cast(m.init(jax.random.key(1), pair.x[:2]), "float64")
    params = jax.tree.map(lambda a: a + 0.3, params)  # away from 0 so σ(1−σ) varies
    x = jnp.asarray(pair.x, jnp.float64)
    y = jnp.asarray(pair.y)
    w = jnp.asarray(np.random.default_rng(0).integers(0, 3, len(pair)), jnp.float64)
    theta, unravel = ravel_pytree(params)
    ref = jax.hessian(lambda t: objective(m.apply, unravel(t), x, y, w, 0.05))(theta)
    got = curvature.binary_logistic_hessian(params, x, w, 0.05)
    assert got.shape == (785, 785)
    # float64, entries O(1): agreement to rounding of an n-term sum
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(inverse.full_hessian(m.apply, params, x, y, w, 0.05), ref,
                               rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="K >= 2"):
        curvature.binary_logistic_hessian(models.logreg(3).init(jax.random.key(0), x[:1]), x,
                                          w, 0.0)


@pytest.mark.parametrize("k", [1, 8])
def test_newton_removal_tracks_retraining(fitted, k):
    """One exact Newton step (cached eigenfactor + Woodbury) lands far closer to the retrained
    optimum than θ* is: the error is second order in the removed fraction."""
    problem, star = fitted
    ids = data.select_forget(problem.train, count=k, seed=k)
    oracle = train.retrain(problem, ids)
    u = methods.get("newton", solver="exact")
    res, _ = u.forget(u.prepare(problem, star), ids, jax.random.key(0))
    t_star, t_new, t_re = (ravel_pytree(p)[0] for p in (star.params, res.params, oracle.params))
    before = float(jnp.linalg.norm(t_star - t_re))
    after = float(jnp.linalg.norm(t_new - t_re))
    assert after < 0.05 * before, (before, after)


def test_certified_uses_binary_constants_and_bounds_hold(fitted):
    problem, star = fitted
    assert certified.constants(problem.model) == (certified.GAMMA_BINARY, certified.C_BINARY)
    u = methods.get("certified", epsilon=1e6, sigma=1.0)
    st = u.prepare(problem, star)
    ids = data.select_forget(problem.train, count=4, seed=0)
    res, st = u.forget(st, ids, jax.random.key(0))
    s = res.stats
    assert not s["retrained"]
    assert 0 < s["residual_norm"] <= s["data_bound"] <= s["worst_bound"]


def test_certified_maths_does_not_import_methods():
    code = ("import sys, unlearn.certified; "
            "assert 'unlearn.methods' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(
        __import__("pathlib").Path(__file__).resolve().parent.parent))
