"""Tests for unlearn.solvers: Cholesky, CG and LiSSA against dense solves, plus failure modes.

float64 is enabled only inside each test (fixture). Tolerances: direct solves of a
well-conditioned (cond ~ 1e3) float64 system are accurate to ~cond * eps ~ 1e-13; CG is run to
tol 1e-10 so agrees to ~cond * 1e-10; LiSSA is a truncated series whose error after D steps is
<= (1 - lambda_min / s)^D, and we choose D so that bound is ~1e-8.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn import curvature as C
from unlearn import solvers as S
from unlearn.solvers import residual_replacement
from unlearn.solvers.randomized_nystrom import _nystrom_core


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _softmax_problem(n, d, k, l2, seed=0):
    rng = np.random.default_rng(seed)
    centers = 2.0 * rng.normal(size=(k, d))
    y = rng.integers(0, k, size=n)
    x = jnp.asarray(centers[y] + rng.normal(size=(n, d)), jnp.float64)
    params = {"params": {"bias": 0.1 * rng.normal(size=k), "kernel": 0.1 * rng.normal(size=(d, k))}}
    params = _f64(params)
    return nn.Dense(k).apply, params, x, jnp.asarray(y), jnp.ones(n, jnp.float64), l2


def _relerr(a, b):
    """Norm-wise relative error (the quantity bounded by cond(A) * backward error)."""
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _spd(p=30, cond=1e3, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(p, p)))
    ev = np.logspace(0, np.log10(cond), p)
    return jnp.asarray((q * ev) @ q.T), jnp.asarray(q), jnp.asarray(ev)


def test_methods_agree_with_dense_solve():
    apply, params, x, y, w, l2 = _softmax_problem(200, 10, 3, 1e-1)
    h = C.softmax_regression_hessian(params, x, w, l2)
    b = jnp.asarray(np.random.default_rng(5).normal(size=h.shape[0]))
    ref = jnp.linalg.solve(h, b)
    cond = float(jnp.linalg.cond(h))

    r = S.solve(h, b, "cholesky")
    assert r.method == "cholesky" and bool(r.converged) and float(r.residual) < 1e-12
    assert _relerr(r.x, ref) < cond * 1e-14
    fac = S.cholesky_factor(h)
    assert _relerr(S.cholesky_solve(fac, b), ref) < cond * 1e-14
    two = S.solve(fac, jnp.stack([b, 2 * b], 1), "cholesky")  # several right-hand sides
    assert _relerr(two.x[:, 1], 2 * ref) < cond * 1e-14

    op = C.hvp(apply, params, x, y, w, l2)
    r = S.solve(op, b, "cg", tol=1e-10)
    assert r.method == "cg" and bool(r.converged) and float(r.residual) <= 1e-10
    # CG's error bound 2((sqrt(k)-1)/(sqrt(k)+1))^m in the A-norm (Hestenes & Stiefel; e.g.
    # Saad, Iterative Methods, Thm 6.29) turned into a residual bound (factor sqrt(cond)):
    # m <= ceil(sqrt(cond)/2 * log(2 sqrt(cond) / tol)); far below the default cap 10 p.
    bound = int(np.ceil(0.5 * np.sqrt(cond) * np.log(2 * np.sqrt(cond) / 1e-10)))
    assert 0 < int(r.iterations) <= min(bound, h.shape[0] + 5)
    assert _relerr(r.x, ref) < cond * 1e-10
    r = S.solve(h, b, "cg", tol=1e-10, precond="jacobi")  # dense + Jacobi
    assert _relerr(r.x, ref) < cond * 1e-10

    lo, hi = S.lanczos_extremes(h, b)
    ev = jnp.linalg.eigvalsh(h)
    np.testing.assert_allclose([lo, hi], [ev[0], ev[-1]], rtol=1e-6)
    scale = 1.2 * hi
    depth = int(np.ceil(np.log(1e-8) / np.log(1 - ev[0] / scale)))
    r = S.lissa(op, b, scale=scale, depth=depth, tol=1e-6)
    assert r.method == "lissa" and bool(r.converged)
    assert _relerr(r.x, ref) < 1e-6


def test_damping_is_the_same_system_for_every_method():
    h, _, _ = _spd(20, cond=50)
    b = jnp.arange(20.0) - 7
    ref = jnp.linalg.solve(h + 0.3 * jnp.eye(20), b)
    for method, opts in [
        ("cholesky", {}),
        ("cg", {"tol": 1e-12}),
        ("lissa", {"depth": 3000}),
    ]:
        r = S.solve(h, b, method, damping=0.3, **opts)
        assert _relerr(r.x, ref) < 1e-8, method
    op = C.dense_matvec(h)
    r = S.solve(op, b, "lissa", damping=0.3, depth=3000, scale=80.0)
    assert _relerr(r.x, ref) < 1e-8


def test_cg_regression_large_n_softmax():
    """JAX 0.10.2 CPU: an HVP on a constant zero tangent inside jit gave NaN at n >= 6000.

    CG must never apply the operator to a compile-time zero; the true residual must match a
    dense solve at a size where the bug bites (n = 6500), with the operator both passed as
    data (Partial) and closed over (constants in the program, the worst case).
    """
    apply, params, x, y, w, l2 = _softmax_problem(6500, 20, 5, 1e-3)
    h = C.softmax_regression_hessian(params, x, w, l2)
    b = C.flat_grad(apply, params, x, y, w, l2)
    ref = jnp.linalg.solve(h, b)
    op = C.hvp(apply, params, x, y, w, l2)

    def closure(v):  # closes over params and data
        return op(v)

    for mv in (op, closure):
        r = S.cg(mv, b, tol=1e-9)
        assert bool(r.converged) and int(r.iterations) > 0
        true_res = float(jnp.linalg.norm(b - h @ r.x) / jnp.linalg.norm(b))
        assert true_res <= 1e-6 and abs(true_res - float(r.residual)) < 1e-8
        assert float(jnp.linalg.norm(r.x - ref) / jnp.linalg.norm(ref)) <= 1e-6
    # warm start passed as an argument
    r = S.cg(op, b, x0=0.5 * ref, tol=1e-9)
    assert bool(r.converged) and float(r.residual) <= 1e-9


def test_cg_not_converged_flags_and_warns():
    h, _, _ = _spd(30, cond=1e3)
    b = jnp.ones(30)
    with pytest.warns(RuntimeWarning, match="did not converge.*residual"):
        r = S.solve(h, b, "cg", maxiter=2)
    assert not bool(r.converged) and int(r.iterations) == 2 and float(r.residual) > 1e-3
    with pytest.warns(RuntimeWarning, match="2 iterations"):
        S.cg(h, b, maxiter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = jax.jit(lambda b: S.cg(h, b, maxiter=2))(b)  # no warning under jit
    assert isinstance(out, S.Solution) and out.method == "cg" and not bool(out.converged)


def test_not_positive_definite_raises_and_damping_warns():
    h, q, ev = _spd(12, cond=10)
    ev = ev.at[0].set(-0.5)
    h = (q * ev) @ q.T
    b = jnp.ones(12)
    with pytest.raises(ValueError, match="damping") as exc:
        S.solve(h, b, "cholesky")
    assert "-5.0000e-01" in str(exc.value)
    with pytest.raises(ValueError, match="damping"):
        S.solve(h, b, "cg")
    with pytest.raises(ValueError, match="damping"):
        S.cholesky_factor(h)
    with pytest.warns(RuntimeWarning, match=r"not PSD.*-5\.0000e-01"):
        r = S.solve(h, b, "cholesky", damping=1.0)
    assert _relerr(r.x, jnp.linalg.solve(h + jnp.eye(12), b)) < 1e-12
    with pytest.warns(RuntimeWarning, match="not PSD"):
        r = S.solve(C.dense_matvec(h), b, "cg", damping=1.0, tol=1e-12)
    assert _relerr(r.x, jnp.linalg.solve(h + jnp.eye(12), b)) < 1e-10


def test_lissa_divergence_detected():
    h, _, ev = _spd(20, cond=100)  # lambda_max = 100
    b = jnp.ones(20)
    with pytest.raises(ValueError, match="scale"):
        S.lissa(h, b, scale=40.0, depth=200)
    with pytest.raises(ValueError, match="scale"):
        S.solve(h, b, "lissa", scale=40.0)
    with pytest.warns(RuntimeWarning, match="diverged"):
        r = S.lissa(h, b, scale=40.0, depth=200, check_scale=False)
    assert not bool(r.converged) and "scale" in r.message


def test_lissa_stochastic_minibatch_matvec():
    apply, params, x, y, w, l2 = _softmax_problem(200, 5, 3, 2e-1)
    h = C.softmax_regression_hessian(params, x, w, l2)
    b = jnp.ones(h.shape[0])
    op = C.hvp(apply, params, x, y, w, l2)

    def batch_hvp(v, key):  # HVP on a random half of the data (unbiased for H)
        mask = jax.random.bernoulli(key, 0.5, (x.shape[0],)).astype(x.dtype)
        return C.hvp(apply, params, x, y, mask, l2)(v)

    _, hi = S.lanczos_extremes(op, b)
    r = S.lissa(
        op,
        b,
        scale=2 * hi,
        depth=150,
        repeats=4,
        stochastic_matvec=batch_hvp,
        key=jax.random.PRNGKey(0),
        tol=0.1,
        warn=False,
    )
    ref = jnp.linalg.solve(h, b)
    assert float(jnp.linalg.norm(r.x - ref) / jnp.linalg.norm(ref)) < 0.1
    assert not r.message


def test_batched_pcg_matches_dense_and_loop():
    """Rows of B solved in ONE vmapped CG equal dense float64 solves and the per-row loop;
    the Nyström preconditioner cuts the iterations and converges to the same answer."""
    apply, params, x, y, w, l2 = _softmax_problem(400, 20, 5, 1e-3)
    h = C.softmax_regression_hessian(params, x, w, l2)
    cond = float(jnp.linalg.cond(h))
    bs = jnp.asarray(np.random.default_rng(1).normal(size=(6, h.shape[0])))
    ref = jnp.linalg.solve(h, bs.T).T
    op = C.hvp(apply, params, x, y, w, l2)
    plain = S.cg(op, bs, tol=1e-10)
    assert plain.x.shape == bs.shape and plain.iterations.shape == (6,)
    assert bool(jnp.all(plain.converged)) and float(jnp.max(plain.residual)) <= 1e-10
    for i in range(6):
        assert _relerr(plain.x[i], ref[i]) < cond * 1e-10
        one = S.cg(op, bs[i], tol=1e-10)
        # Same recursion; batched products sum in another order, so the stopping test may
        # trip one or two iterations apart (cond ~ 1e4 amplifies rounding).
        assert abs(int(one.iterations) - int(plain.iterations[i])) <= 2
        assert _relerr(one.x, plain.x[i]) < cond * 1e-10
    # Nyström of the data term (l2 is the shift mu of the preconditioner).
    data_op = C.hvp(apply, params, x, y, w, 0.0)
    approx = S.nystrom(data_op, bs[0], rank=40, key=jax.random.PRNGKey(3))
    pre = S.nystrom_preconditioner(approx, l2)
    sol = S.linear_solve(op, bs, S.CG(tol=1e-10, precond=pre))
    assert bool(jnp.all(sol.converged))
    for i in range(6):
        assert _relerr(sol.x[i], ref[i]) < cond * 1e-10
    assert int(jnp.max(sol.iterations)) < int(jnp.min(plain.iterations))
    assert sol.stats["iterations"] == int(jnp.max(sol.iterations))
    # Warm start from the preconditioned first guess: converges, never more iterations.
    warm = S.cg(op, bs, x0=jax.vmap(pre)(bs), tol=1e-10, precond=pre)
    assert bool(jnp.all(warm.converged))
    assert int(jnp.max(warm.iterations)) <= int(jnp.max(sol.iterations)) + 1


def test_block_cg_matches_dense_in_fewer_iterations():
    """Block CG solves every row to the dense float64 answer, including linearly dependent
    rows (a duplicate, a multiple) and a zero row, in no more iterations than the vmapped CG
    (its Krylov space contains every single-vector one), with and without Nyström."""
    apply, params, x, y, w, l2 = _softmax_problem(400, 20, 5, 1e-3)
    h = C.softmax_regression_hessian(params, x, w, l2)
    cond = float(jnp.linalg.cond(h))
    b = np.random.default_rng(1).normal(size=(9, h.shape[0]))
    b[6], b[7], b[8] = b[0], -3.0 * b[1], 0.0
    bs = jnp.asarray(b)
    ref = jnp.linalg.solve(h, bs.T).T
    op = C.hvp(apply, params, x, y, w, l2)
    plain = S.cg(op, bs, tol=1e-10)
    blk = S.cg(op, bs, tol=1e-10, block=True)
    assert blk.method == "block-cg" and blk.iterations.shape == (9,)
    assert bool(jnp.all(blk.converged)) and float(jnp.max(blk.residual)) <= 1e-10
    for i in range(9):
        assert _relerr(blk.x[i], ref[i]) < cond * 1e-10 or float(jnp.linalg.norm(ref[i])) == 0
    assert float(jnp.abs(blk.x[8]).max()) == 0.0
    assert int(blk.iterations[0]) <= int(jnp.max(plain.iterations))
    data_op = C.hvp(apply, params, x, y, w, 0.0)
    pre = S.nystrom_preconditioner(S.nystrom(data_op, bs[0], rank=40,
                                             key=jax.random.PRNGKey(3)), l2)
    pblk = S.cg(op, bs, tol=1e-10, precond=pre, block=True)
    assert bool(jnp.all(pblk.converged))
    assert float(jnp.max(jnp.abs(pblk.x - ref))) / float(jnp.max(jnp.abs(ref))) < cond * 1e-10
    assert int(pblk.iterations[0]) <= int(blk.iterations[0])
    warm = S.cg(op, bs, x0=jax.vmap(pre)(bs), tol=1e-10, precond=pre, block=True)
    assert bool(jnp.all(warm.converged))


@pytest.mark.parametrize("block", [False, True])
def test_float32_cg_reaches_the_true_residual(block):
    """In float32 the recursion's residual drifts from b - Ax by ~eps·cond. On these cond-100
    systems at tol 1e-5, stopping on the recursion alone left seed 8 above tol (true residual
    1.02e-5, converged=False: measured without the replacement). With residual replacement
    every solve converges, and an independent float64 residual agrees with the reported one
    to float32's evaluation error (eps·cond ~ 1e-5 relative to tol)."""
    for seed in range(10):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(300, 300)))
        a = ((q * np.logspace(0, 2, 300)) @ q.T).astype(np.float32)
        b = rng.normal(size=(4, 300)).astype(np.float32)
        sol = S.cg(jnp.asarray(a), jnp.asarray(b), tol=1e-5, block=block)
        x = np.asarray(sol.x, np.float64)
        true = np.linalg.norm(b - x @ a.astype(np.float64), axis=1) / np.linalg.norm(b, axis=1)
        assert bool(jnp.all(sol.converged)), (seed, true)
        assert np.all(true <= 1.2e-5), (seed, true)


def test_restarts_patched_where_it_is_read(monkeypatch):
    """Seed 8 of the test above with the residual replacement switched off through the module
    that reads RESTARTS: the recursion alone stops one row above tol (true residual 1.04e-5),
    so the constant is read there. The operator is a fresh callable, so the loop is traced
    with the patched value (jit caches by the operator's function)."""
    monkeypatch.setattr(residual_replacement, "RESTARTS", 0)
    rng = np.random.default_rng(8)
    q, _ = np.linalg.qr(rng.normal(size=(300, 300)))
    a = jnp.asarray(((q * np.logspace(0, 2, 300)) @ q.T).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(4, 300)).astype(np.float32))
    sol = S.cg(lambda v: a @ v, b, tol=1e-5, warn=False)
    assert not bool(jnp.all(sol.converged)), np.asarray(sol.residual)


def test_block_cg_finite_termination_on_low_rank_update():
    """Theory: for A = I + U S U^T of rank r, x_j = b_j - U c_j, and the block Krylov space of
    m generic right-hand sides contains range(U) after ceil(r / m) products, so block CG ends
    in ceil(r / m) + 1 steps where single-vector CG needs r + 1."""
    p, r, m = 60, 12, 4
    u, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(p, r)))
    a = jnp.asarray(np.eye(p) + (u * np.logspace(0, 2, r)) @ u.T)
    bs = jnp.asarray(np.random.default_rng(1).normal(size=(m, p)))
    blk = S.cg(a, bs, tol=1e-10, block=True)
    one = S.cg(a, bs, tol=1e-10)
    assert bool(jnp.all(blk.converged))
    assert int(blk.iterations[0]) <= -(-r // m) + 1
    assert int(jnp.min(one.iterations)) >= r
    ref = jnp.linalg.solve(a, bs.T).T
    assert float(jnp.max(jnp.abs(blk.x - ref))) < 1e-9


def test_block_cg_flags_indefinite_and_bad_shapes():
    a, q, ev = _spd(p=30)
    indef = a - 5.0 * jnp.eye(30)  # two eigenvalues below zero
    bs = jnp.asarray(np.random.default_rng(2).normal(size=(3, 30)))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        sol = S.cg(indef, bs, tol=1e-10, block=True)
    assert "non-positive curvature" in sol.message and not bool(jnp.any(sol.converged))
    assert bool(jnp.all(jnp.isfinite(sol.x)))
    with pytest.raises(ValueError, match="1 <= m < p"):
        S.cg(a, bs[0], block=True)
    with pytest.raises(ValueError, match="1 <= m < p"):
        S.cg(a, jnp.ones((30, 30)), block=True)
    with pytest.raises(ValueError, match="x0 has shape"):
        S.cg(a, bs, x0=jnp.zeros((2, 30)), block=True)


def test_nystrom_exact_on_low_rank_and_two_step_pcg():
    """For A of rank r <= rank the Nyström approximation is A itself (Frangella et al. 2023,
    Lemma A.1), so P^-1 (A + mu I) has two eigenvalues and PCG stops in <= 2 iterations."""
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.normal(size=(80, 6)) * np.logspace(0, 1.5, 6))
    a = g @ g.T
    approx = S.nystrom(a, jnp.ones(80), rank=10, key=jax.random.PRNGKey(0))
    rebuilt = (approx.u * approx.lam) @ approx.u.T
    assert _relerr(rebuilt, a) < 1e-9
    top = np.linalg.eigvalsh(np.asarray(a))[::-1][:6]
    # absolute error of order the stabilising shift nu = sqrt(p) eps ||Y|| (Alg. 2.1)
    np.testing.assert_allclose(approx.lam[:6], top, rtol=1e-9,
                               atol=10 * np.sqrt(80) * np.finfo(np.float64).eps * top[0])
    mu = 1e-1  # cond(A + mu I) ~ 1e5: residual 1e-10 is attainable in float64
    b = jnp.asarray(rng.normal(size=80))
    r = S.cg(C.dense_matvec(a, mu), b, tol=1e-10, precond=S.nystrom_preconditioner(approx, mu))
    assert int(r.iterations) <= 3 and bool(r.converged)  # 2 in exact arithmetic
    assert _relerr(r.x, jnp.linalg.solve(a + mu * jnp.eye(80), b)) < 1e-8
    with pytest.raises(ValueError, match="rank"):
        S.nystrom(a, b, rank=80)


def test_nystrom_memory_does_not_grow_with_p_squared(x64):
    # regression: the stabilising shift took ||Y||_2 of the tall (p, r) sample, which XLA's CPU
    # backend computes with a p×p buffer (80 GB at p = 1e5, where the matrix-free path is for).
    # Compiled temporary memory of the whole prepare step at p = 20 000, r = 20 must stay far
    # below one p×p float64 matrix (3.2 GB), i.e. O(p·r).
    p, r = 20_000, 20
    d = jnp.linspace(1.0, 2.0, p)
    op = jax.tree_util.Partial(lambda dd, v: dd * v, d)
    omega = jax.ShapeDtypeStruct((p, r), jnp.float64)
    mem = _nystrom_core.lower(op, omega).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 100 * p * r * 8, mem.temp_size_in_bytes


def test_lanczos_topk_matches_eigh():
    h, q, ev = _spd(40, cond=1e3)
    vals, vecs = S.lanczos_topk(h, jnp.ones(40), k=4, steps=40)
    np.testing.assert_allclose(vals, ev[::-1][:4], rtol=1e-9)
    for j in range(4):  # eigenvectors up to sign
        assert abs(abs(float(vecs[:, j] @ q[:, -1 - j])) - 1) < 1e-8


def test_lineax_cg_from_zero():
    """The JAX 0.10.2 zero-tangent check against lineax (pinned): its CG, started from the
    default and from ``0 * b``, on the softmax HVP at n = 6500 (where docs/architecture.md
    reports the NaN), inside jit with the operator closed over the data, agrees with the dense
    solve and with our CG. The measurement behind keeping our own CG is in solvers' docstring."""
    lx = pytest.importorskip("lineax")
    apply, params, x, y, w, l2 = _softmax_problem(6500, 20, 5, 1e-3)
    h = C.softmax_regression_hessian(params, x, w, l2)
    b = C.flat_grad(apply, params, x, y, w, l2)
    ref = jnp.linalg.solve(h, b)
    op = C.hvp(apply, params, x, y, w, l2)
    spec = jax.ShapeDtypeStruct(b.shape, b.dtype)

    @jax.jit
    def via_lineax(b):
        lop = lx.FunctionLinearOperator(lambda v: op(v), spec, tags=lx.positive_semidefinite_tag)
        sol = lx.linear_solve(lop, b, lx.CG(rtol=1e-10, atol=0.0), options={"y0": 0 * b},
                              throw=False)
        return sol.value, sol.stats["num_steps"]

    xl, steps = via_lineax(b)
    assert int(steps) > 0 and bool(jnp.all(jnp.isfinite(xl)))
    assert _relerr(xl, ref) < 1e-8
    assert _relerr(S.cg(op, b, tol=1e-10).x, xl) < 1e-8


def test_solve_rejects_options_of_another_solver():
    h, _, _ = _spd(10)
    with pytest.raises(ValueError, match="takes the options"):
        S.solve(h, jnp.ones(10), "cg", depth=3)
    with pytest.raises(TypeError, match="solvers.CG"):
        S.linear_solve(h, jnp.ones(10), "cg")


@pytest.mark.slow
def test_exact_path_large_p():
    """p = 23 500 in float64: threaded OpenBLAS potrf segfaulted the process here (exit 139,
    measured); cholesky_factor runs it single-threaded above LAPACK_THREADED_LIMIT and the
    factor must reproduce the matrix (checked on random columns) — ~2 min, 4.4 GB."""
    p = 23_500
    assert p > S.LAPACK_THREADED_LIMIT
    g = jax.random.normal(jax.random.PRNGKey(0), (p, 32), jnp.float64)
    a = g @ g.T / 32 + jnp.eye(p)
    fac = S.cholesky_factor(a)
    idx = np.random.default_rng(0).choice(p, 5, replace=False)
    cols = jnp.eye(p, dtype=jnp.float64)[:, idx]
    rebuilt = fac.factor @ (fac.factor[idx, :].T)
    assert _relerr(rebuilt, a @ cols) < 1e-12
