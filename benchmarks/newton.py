"""Newton removal with a cached factor vs warm-started retraining, at p = 7850 — side by side.

Softmax regression on synthetic MNIST-shaped data (d=784, K=10, Gaussian mixture, n_train
given by ``--n``, default MNIST's 60000), **float64**, λ=1e-3. θ* is L-BFGS to ‖∇L‖ ≤ 1e-9;
the oracle θ_r is L-BFGS on D∖U to 1e-9 (warm-started from θ*; the objective is strictly
convex, so the optimum is unique). For k random points removed we time, best of ``--repeat``
after a warm-up (compiles excluded):

* ``newton exact``: the registered ``newton`` method's ``forget`` with the eigendecomposition
  of the full-data Hessian and the summed example gradients cached by ``prepare`` (k example
  gradients + an exact Woodbury downdate; prepare time reported apart);
* ``newton cg``: the same step with HVP-CG (tol 1e-8 relative residual);
* ``retrain (warm)``: ``train.fit`` L-BFGS from θ* on D∖U, stopped at the **same gradient norm**
  the Newton result has (same first-order accuracy).

Relative distance ‖θ − θ_r‖/‖θ* − θ_r‖ is reported for each, so "same accuracy" can be read
off. Usage: ``python benchmarks/newton.py`` (~6 min on 2 CPU cores) or ``--quick``.
Writes its table between ``<!-- newton -->`` markers in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that defines them)
import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import best_time, write_section  # noqa: E402
from unlearn import data, methods, models, train  # noqa: E402
from unlearn.metrics import relative_distance  # noqa: E402


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60000, help="training examples")
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--ks", default="1,10,100", help="comma-separated forget-set sizes")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="n=3000, d=196")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.d = 3000, 196
    t_start = time.perf_counter()
    split = data.load("synthetic", n=int(round(a.n / 0.75)), d=a.d, num_classes=10,
                      separation=3.0, seed=0)
    tr = split.train
    cfg = train.TrainConfig(solver="lbfgs", l2=1e-3, tol=1e-9, max_iter=20000, dtype="float64")
    problem = train.Problem(models.logreg(10), tr, cfg, jax.random.key(0))
    t0 = time.perf_counter()
    trained = train.train(problem)
    t_train = time.perf_counter() - t0
    p = (a.d + 1) * 10
    rows = []
    nx = methods.get("newton", solver="exact", report_residual=False, tol=1e-10)
    ncg = methods.get("newton", solver="cg", report_residual=False, tol=1e-8)
    t0 = time.perf_counter()
    st_exact = nx.prepare(problem, trained)
    jax.block_until_ready(st_exact.factor.evecs)
    t_prep = time.perf_counter() - t0
    st_cg = ncg.prepare(problem, trained)
    for k in [int(s) for s in a.ks.split(",")]:
        ids = data.select_forget(tr, count=k, seed=k)
        w = train.retain_mask(problem, ids)
        oracle = train.fit(problem.model, tr, cfg, problem.key, weights=w, params=trained.params)
        key = jax.random.key(0)
        t_nx = best_time(lambda: nx.forget(st_exact, ids, key)[0].params, repeat=a.repeat)
        res_x, _ = nx.forget(st_exact, ids, key)
        t_cg = best_time(lambda: ncg.forget(st_cg, ids, key)[0].params, repeat=a.repeat)
        res_c, _ = ncg.forget(st_cg, ids, key)
        gnorm = float(np.linalg.norm(np.asarray(train_grad(problem, res_x.params, w))))
        warm_cfg = dataclasses.replace(cfg, tol=gnorm)
        fit_warm = lambda: train.fit(problem.model, tr, warm_cfg, problem.key,  # noqa: E731
                                     weights=w, params=trained.params)
        t_rt = best_time(lambda: fit_warm().params, repeat=max(1, a.repeat - 1))
        warm = fit_warm()
        d = lambda prm: relative_distance(prm, oracle.params, trained.params)  # noqa: E731
        rows.append(dict(k=k, t_nx=t_nx, t_cg=t_cg, t_rt=t_rt, it_rt=warm.info["iterations"],
                         it_cg=res_c.stats["iterations"], d_nx=d(res_x.params),
                         d_cg=d(res_c.params), d_rt=d(warm.params), gnorm=gnorm))
        print(rows[-1], flush=True)
    lines = [
        "## Newton removal vs warm-started retrain (`benchmarks/newton.py`)",
        "",
        f"Machine: {platform.machine()}, backend {jax.default_backend()}, "
        f"{len(jax.devices())} device(s). Softmax regression, synthetic d={a.d}, K=10, "
        f"n={len(tr)}, p={p}, **float64**, λ=1e-3. θ* by L-BFGS to ‖∇L‖≤1e-9 "
        f"({t_train:.1f} s, {trained.info['iterations']} it). `newton exact` prepare "
        f"(closed-form Hessian + eigendecomposition + summed gradients, once): {t_prep:.1f} s. "
        "Retrain (warm) = L-BFGS from "
        "θ* stopped at the Newton result's gradient norm (same first-order accuracy). "
        "Best of repeats after a warm-up; distance = ‖θ−θ_r‖/‖θ*−θ_r‖ to the converged retrain.",
        "",
        "| k | newton exact (s) | newton cg (s) | retrain warm (s) | retrain / exact | "
        "retrain / cg | dist exact | dist cg | dist retrain | cg it | L-BFGS it |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['t_nx']:.3f} | {r['t_cg']:.3f} | {r['t_rt']:.3f} | "
            f"{r['t_rt'] / r['t_nx']:.1f}× | {r['t_rt'] / r['t_cg']:.1f}× | {r['d_nx']:.2e} | "
            f"{r['d_cg']:.2e} | {r['d_rt']:.2e} | {r['it_cg']} | {r['it_rt']} |")
    lines.append("")
    lines.append(
        "A request from θ* costs the removed points' gradients, three passes over the cached "
        "eigenvectors and a kK×kK Cholesky, with k padded by zero-weight rows to a power "
        "of two (10 runs as 16, 100 as 128) so a new request size reuses a compiled "
        "program instead of compiling for ~1 s; the O(p·(kK)²) capacitance work grows "
        "with k, "
        "while a warm retrain needs fewer iterations for larger k (the Newton step is less "
        "accurate, so the gradient-norm target is looser). CG (matrix-free) pays ~40 HVPs at "
        "every request and needs no prepare.")
    lines.append("")
    lines.append(f"Total benchmark time {time.perf_counter() - t_start:.0f} s.")
    body = "\n".join(lines)
    print(body)
    if not a.no_write and not a.quick:
        write_section("newton", body)
    return body


def train_grad(problem, params, w):
    """Mean-form gradient of the retained objective (flat)."""
    from unlearn import influence

    x = np.asarray(problem.train.x, np.float64)
    return influence.retained_gradient(problem.model.apply, params, x, problem.train.y,
                                       np.asarray(w, np.float64), problem.cfg.l2)


if __name__ == "__main__":
    main()
