"""The public Task: identity keys the compile caches, declared (never guessed) curvature, the
losses and measurements, and user models of every kind (linen, NNX, plain functions).

Every check is against something independent: a model trained alone in a fresh process
state, ``jax.hessian`` of the objective written out by hand in float64, finite differences,
numpy transcriptions of the loss formulas, or a ridge-regression normal-equation solve.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from test_byo_methods import NNXNet  # noqa: E402  (tests/ is on sys.path under pytest)

from unlearn import data, engine, influence, inverse, models, objective, task, train
from unlearn.curvature import ggn_vp


class _Act(nn.Module):
    act: str

    @nn.compact
    def __call__(self, x):
        f = {"tanh": jnp.tanh, "relu": nn.relu}[self.act]
        return nn.Dense(10)(f(nn.Dense(16)(x.reshape(x.shape[0], -1))))


@pytest.fixture(scope="module")
def digits():
    return data.load("digits").train.subset(np.arange(200))


def test_same_name_different_functions_never_share_a_program(digits):
    """Two tasks both named "net" (tanh vs ReLU) train to different params; each equals the
    same task trained with the engine cache cleared. Before the Task identity, the ReLU model
    reused the tanh model's compiled program and ended bit-identical to it."""
    cfg = train.TrainConfig(epochs=2, batch_size=64)
    tanh = task.from_linen(_Act("tanh"), name="net")
    relu = task.from_linen(_Act("relu"), name="net")
    assert tanh.identity != relu.identity
    a = train.fit(tanh, digits, cfg, jax.random.key(0))
    b = train.fit(relu, digits, cfg, jax.random.key(0))
    assert not np.array_equal(ravel_pytree(a.params)[0], ravel_pytree(b.params)[0])
    engine._PROGRAMS.clear()
    alone = train.fit(relu, digits, cfg, jax.random.key(0))
    np.testing.assert_array_equal(ravel_pytree(b.params)[0], ravel_pytree(alone.params)[0])
    # hand-built tasks from plain functions with the same name: identity is the functions
    m1 = models.Model(init=tanh.init, apply=tanh.apply.fn, name="net")
    m2 = models.Model(init=relu.init, apply=relu.apply.fn, name="net")
    assert engine.model_key(m1) != engine.model_key(m2)
    lb = dict(solver="lbfgs", dtype="float32", max_iter=30)
    c = train.fit(m1, digits, train.TrainConfig(**lb), jax.random.key(0))
    d = train.fit(m2, digits, train.TrainConfig(**lb), jax.random.key(0))
    assert not np.array_equal(ravel_pytree(c.params)[0], ravel_pytree(d.params)[0])


def test_equal_configurations_share_programs(digits):
    """Equal linen configurations (two instances) have one identity and one compiled program;
    a different loss on the same module is a different identity."""
    cfg = train.TrainConfig(epochs=1, batch_size=64)
    t1, t2 = task.from_linen(_Act("tanh")), task.from_linen(_Act("tanh"))
    assert t1.identity == t2.identity and hash(t1.apply) == hash(t2.apply)
    train.fit(t1, digits, cfg, jax.random.key(0))
    before = engine.cache_info()["programs"]
    train.fit(t2, digits, cfg, jax.random.key(1))
    assert engine.cache_info()["programs"] == before
    assert t1.with_measure("margin").identity != t1.identity
    assert t1.with_loss("squared_error").identity != t1.identity
    assert models.mlp(10, (8,)).identity == models.mlp(10, (8,)).identity


class _Head(nn.Module):
    """A linear head on fixed features: the parameter shapes of softmax regression."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(jnp.tanh(3.0 * x.reshape(x.shape[0], -1) / 16.0))


def _dense_objective_hessian(apply, params, x, y, l2):
    """The Hessian of mean CE + (l2/2)|θ|² by jax.hessian of a hand-written objective."""
    theta, unravel = ravel_pytree(params)

    def f(t):
        z = apply(unravel(t), x)
        ce = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0]
        return jnp.mean(ce) + 0.5 * l2 * jnp.sum(t * t)

    return jax.hessian(f)(theta), theta


def test_exact_backend_on_a_linear_head_is_the_dense_solve(digits, x64):
    """The old shape guess used the softmax-regression closed form here (wrong by 860 % in
    Frobenius norm on this model); the declared-structure rule differentiates twice."""
    head = task.from_linen(_Head(), convex=True)
    x = jnp.asarray(digits.x[:120], jnp.float64)
    y = jnp.asarray(digits.y[:120])
    xt, yt = jnp.asarray(digits.x[120:130], jnp.float64), jnp.asarray(digits.y[120:130])
    params = jax.tree.map(lambda a: a.astype(jnp.float64), head.init(jax.random.key(1), x))
    l2 = 1e-2
    h, theta = _dense_objective_hessian(head.apply, params, x, y, l2)
    hf = inverse.full_hessian(head.apply, params, x, y, jnp.ones(120), l2)
    np.testing.assert_allclose(hf, h, rtol=1e-10, atol=1e-12)
    out = influence.influence_up_loss(inverse.Curvature(head.apply, params, x, y, l2), xt, yt,
                                      inverse.Exact())
    gt = jax.vmap(lambda xi, yi: jax.grad(lambda t: objective.cross_entropy(
        head.apply(ravel_pytree(params)[1](t), xi[None]), yi[None])[0])(theta))
    g_test, g_train = gt(xt, yt), gt(x, y)
    ref = -g_test @ np.linalg.solve(np.asarray(h), np.asarray(g_train).T)
    np.testing.assert_allclose(out.scores, ref, rtol=1e-7, atol=1e-10)
    # and the package's logreg, which declares the closed form, still gets it
    lr = models.logreg(10)
    p2 = jax.tree.map(lambda a: a.astype(jnp.float64), lr.init(jax.random.key(2), x))
    np.testing.assert_allclose(inverse.full_hessian(lr.apply, p2, x, y, jnp.ones(120), l2),
                               _dense_objective_hessian(lr.apply, p2, x, y, l2)[0],
                               rtol=1e-10, atol=1e-12)


def test_declared_curvature_hook_is_used(digits, x64):
    """A user ``curvature`` function is what the exact backend factors (here: a hook that
    returns the true Hessian scaled by 2 gives half the inverse-curvature product)."""
    base = task.from_linen(_Head())
    x, y = jnp.asarray(digits.x[:60], jnp.float64), jnp.asarray(digits.y[:60])
    params = jax.tree.map(lambda a: a.astype(jnp.float64), base.init(jax.random.key(0), x))

    def twice(p, xx, yy, w, l2):
        return 2.0 * _dense_objective_hessian(base.apply, p, xx, yy, l2)[0]

    hooked = task.from_linen(_Head(), curvature=twice)
    a = influence.influence_up_loss(inverse.Curvature(base.apply, params, x, y, 1e-2), x[:3],
                                    y[:3]).scores
    # the solve's true residual is checked against the real operator: the hook is flagged
    with pytest.warns(RuntimeWarning, match="did not converge"):
        b = influence.influence_up_loss(inverse.Curvature(hooked.apply, params, x, y, 1e-2),
                                        x[:3], y[:3]).scores
    np.testing.assert_allclose(b, 0.5 * a, rtol=1e-9)
    with pytest.raises(ValueError, match="curvature='bogus'"):
        task.from_linen(_Head(), curvature="bogus")


def test_losses_against_numpy_and_autodiff(x64):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 4, 7))
    y = rng.integers(0, 7, size=(5, 4))
    y[1, 2:] = -1  # padding
    y[3, :] = -100  # a sequence of padding only
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    tok = -np.take_along_axis(lp, np.maximum(y, 0)[..., None], -1)[..., 0]
    mask = y >= 0
    ref = (tok * mask).sum(1) / np.maximum(mask.sum(1), 1)
    np.testing.assert_allclose(objective.sequence_cross_entropy(jnp.asarray(z), jnp.asarray(y)),
                               ref, rtol=1e-12)
    out, t = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    np.testing.assert_allclose(objective.squared_error(jnp.asarray(out), jnp.asarray(t)),
                               0.5 * ((out - t) ** 2).sum(1), rtol=1e-12)
    z2, y2 = rng.normal(size=(6, 5)), rng.integers(0, 5, size=6)
    marg = z2[np.arange(6), y2] - np.where(np.eye(5)[y2] > 0, -np.inf, z2).max(1)
    np.testing.assert_allclose(objective.margin(jnp.asarray(z2), jnp.asarray(y2)), marg)
    # output curvature: the closed forms and the autodiff fallback equal jax.hessian per row
    user = objective.as_loss(lambda o, yy: jnp.sum(jnp.log1p((o - yy) ** 2), axis=-1))
    for loss, yy in ((objective.CROSS_ENTROPY, y2), (objective.SQUARED_ERROR, t[:, :1]),
                     (user, rng.normal(size=(6, 5)))):
        zz = jnp.asarray(z2 if loss is not objective.SQUARED_ERROR else out[:, :1])
        yj = jnp.asarray(yy)
        hs = jax.vmap(lambda zi, yi, f=loss.fn: jax.hessian(
            lambda q: f(q[None], yi[None])[0])(zi))(zz, yj)
        v = jnp.asarray(rng.normal(size=zz.shape))
        np.testing.assert_allclose(loss.output_hvp(zz, yj, v),
                                   jnp.einsum("nij,nj->ni", hs, v), rtol=1e-10, atol=1e-12)
        c = loss.output_root(zz, yj, jnp.float64)
        psd = jax.vmap(lambda h: (lambda e, q: q @ jnp.diag(jnp.maximum(e, 0)) @ q.T)(
            *jnp.linalg.eigh(h)))(hs)
        np.testing.assert_allclose(jnp.einsum("nij,nkj->nik", c, c), psd, atol=1e-10)
    with pytest.raises(ValueError, match="loss='hinge'"):
        objective.as_loss("hinge")


def test_ggn_of_squared_error_is_jtj(x64):
    """The GGN product for a squared-error task is (JᵀJ/n + λ)v with J the dense Jacobian."""
    mlp = task.from_linen(_Act("tanh"), loss="squared_error")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(9, 4)))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), mlp.init(jax.random.key(0), x))
    theta, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda t: mlp.apply(unravel(t), x).ravel())(theta)
    v = jnp.asarray(np.random.default_rng(2).normal(size=theta.shape))
    y = jnp.zeros((9, 10))
    got = ggn_vp(mlp.apply, params, x, y, jnp.ones(9), 0.1)(v)
    np.testing.assert_allclose(got, jac.T @ (jac @ v) / 9 + 0.1 * v, rtol=1e-10)


def test_squared_error_linear_regression_reaches_the_ridge_solution(x64):
    """A convex squared-error task trained by L-BFGS equals the normal-equation solution of
    ridge regression (mean ½‖Wx+b−y‖² + λ/2‖θ‖², bias penalised as everywhere here)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5))
    y = x @ rng.normal(size=(5, 2)) + 0.3 + 0.1 * rng.normal(size=(80, 2))
    ds = data.make(x, y, targets="real")
    lin = task.from_linen(nn.Dense(2), loss="squared_error", convex=True, name="ridge")
    cfg = train.TrainConfig(solver="lbfgs", dtype="float64", tol=1e-10, l2=0.05)
    fit = train.fit(lin, ds, cfg, jax.random.key(0))
    xt = np.hstack([np.asarray(ds.x, np.float64), np.ones((80, 1))])
    sol = np.linalg.solve(xt.T @ xt / 80 + 0.05 * np.eye(6), xt.T @ np.asarray(ds.y) / 80)
    p = fit.params["params"]
    np.testing.assert_allclose(np.vstack([p["kernel"], p["bias"][None]]), sol, atol=1e-8)


def test_nnx_task_is_the_module_and_trains(digits):
    """``from_nnx``: init per key gives the module nnx would build with that key; eval apply
    equals calling the merged module; training lowers the loss; equal constructors share an
    identity; a module with stored random streams is refused."""
    t = task.from_nnx(NNXNet)
    x = jnp.asarray(digits.x[:8])
    v = t.init(jax.random.key(3), x)
    ref = NNXNet(nnx.Rngs(jax.random.key(3)))
    np.testing.assert_allclose(t.apply(v, x), ref(x), rtol=1e-6)
    v2 = t.init(jax.random.key(4), x)
    assert not np.array_equal(ravel_pytree(v)[0], ravel_pytree(v2)[0])
    assert task.from_nnx(NNXNet).identity == t.identity
    cfg = train.TrainConfig(epochs=10, batch_size=64, lr=1e-2)
    fit = train.fit(t, digits, cfg, jax.random.key(0))
    init = t.init(jax.random.key(0), x)
    xx, yy, w = jnp.asarray(digits.x), jnp.asarray(digits.y), jnp.ones(len(digits))
    assert float(objective.objective(t.apply, fit.params, xx, yy, w, 0.0)) < 0.5 * float(
        objective.objective(t.apply, init, xx, yy, w, 0.0))

    class Drop(nnx.Module):
        def __init__(self, rngs):
            self.d = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.d(x)

    with pytest.raises(ValueError, match="random streams"):
        task.from_nnx(Drop)
    with pytest.raises(TypeError, match="constructor"):
        task.from_nnx(NNXNet(nnx.Rngs(0)))


def test_bad_task_arguments_are_named():
    with pytest.raises(TypeError, match="linen.Module"):
        task.from_linen(lambda x: x)
    with pytest.raises(ValueError, match="measure='logit'"):
        task.from_linen(_Head(), measure="logit")
    with pytest.raises(ValueError, match="targets='real'"):
        data.make(np.zeros((3, 2)), np.array([0.5, 1.0, np.nan]), targets="real")
