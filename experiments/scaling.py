"""Cost of one unlearning request vs model size: where each method stops paying.

Command: ``python -m experiments.scaling`` (about 2 minutes on 2 CPU cores; smoke: ~30 s;
``--config full`` goes to p = 10⁶, over 10 minutes).

Softmax regression on synthetic Gaussian data with K=10 classes and d features, so the number
of parameters p = K(d+1) runs from ~10² to ~10⁶. For each p, k points are removed by

* ``exact``: closed-form Hessian of the retained objective + Cholesky + solve (memory ∝ p²,
  time ∝ n p² + p³; only where p² fits),
* ``cg``: Newton step by Hessian-vector products and conjugate gradients (memory ∝ n d + p),
* ``lissa``: the same step by the LiSSA recursion (fixed depth),
* ``sisa``: retraining one shard of S=8 (what a SISA forget costs for one point),
* ``retrain``: L-BFGS on D∖U from scratch (the oracle).

Each p runs in its own subprocess (so one size's memory never counts against another). Each
method's memory is the peak rise of the process's resident set during its (compiled, warm)
run, sampled every 2 ms by a thread; big buffers are mmap-ed and returned when freed, so this
is the method's own working memory (to within the sampling interval). Times exclude
compilation (a warm-up run first) up to p = 2·10⁵; above that the single run includes it,
which is a small share there. The plot marks the
crossovers where an implicit method becomes cheaper than the exact one and where retraining one
shard becomes cheaper than a Newton step.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from experiments import plotting, runner

NAME = "scaling"
# What ran where is exact; wall times only within a factor of 5 (shared machine), and only at
# the largest p, where they are seconds rather than milliseconds.
HEADLINES = {
    "methods": ("results.rows.*.method", "exact"),
    "p": ("results.rows.*.p", "exact"),
    "time_cg_largest_p": ("results.largest_p.time_cg", "timing"),
    "time_retrain_largest_p": ("results.largest_p.time_retrain", "timing"),
}
METHODS = ("retrain", "sisa", "cg", "lissa", "exact")
CONFIGS = {
    "default": dict(ps=(100, 1000, 10_000, 100_000, 300_000), n=1000, k=10, classes=10,
                    exact_max_p=12_000, shards=8, lbfgs_iter=100, cg_tol=1e-6,
                    lissa_depth=100, seed=0),
    # Up to p = 10⁶ (memory allows it: the data are 0.4 GB), but over 10 minutes on 2 cores.
    "full": dict(ps=(100, 1000, 10_000, 100_000, 1_000_000), n=1000, k=10, classes=10,
                 exact_max_p=12_000, shards=8, lbfgs_iter=100, cg_tol=1e-6,
                 lissa_depth=100, seed=0),
    "smoke": dict(ps=(300,), n=300, k=5, classes=10, exact_max_p=5000, shards=8,
                  lbfgs_iter=30, cg_tol=1e-5, lissa_depth=20, seed=0),
}


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _PeakRSS:
    """Samples the resident set every 2 ms in a thread: the peak rise during a ``with`` block.

    Large arrays are ``mmap``-ed and returned to the OS when freed, so each method's own peak
    is seen even when an earlier method used more.
    """

    def __enter__(self):
        import threading

        self.base = self.peak = _rss_now_mb()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_now_mb())
                self._stop.wait(0.002)

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_now_mb())

    @property
    def rise_mb(self) -> float:
        return self.peak - self.base


def worker(methods: list[str], p: int, n: int, k: int, classes: int, shards: int,
           lbfgs_iter: int, cg_tol: float, lissa_depth: int, seed: int) -> list[dict]:
    """Time one request of each method at size ``p`` (runs inside its own process)."""
    import tempfile

    import jax

    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(tempfile.gettempdir(), "unlearn-jax-cache"))
    import jax.numpy as jnp

    from unlearn import curvature, solvers, train
    from unlearn.data import make
    from unlearn.models import logreg

    d = max(1, p // classes - 1)
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, d)) * 2.0 / np.sqrt(d)
    y = rng.integers(0, classes, size=n)
    x = (means[y] + rng.normal(size=(n, d))).astype(np.float32)
    ds = make(x, y, num_classes=classes, name=f"synthetic-d{d}")
    model = logreg(classes)
    cfg = train.TrainConfig(solver="lbfgs", l2=1e-3, tol=1e-5, max_iter=lbfgs_iter)
    key = jax.random.key(seed)
    # θ*: a few L-BFGS iterations (untimed); the cost of a Newton step does not depend on it.
    theta = train.fit(model, ds, train.TrainConfig(solver="lbfgs", l2=1e-3, max_iter=20),
                      key).params
    w = np.ones(n, np.float32)
    w[:k] = 0.0
    xj, yj, wj = jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)
    flat, unravel = jax.flatten_util.ravel_pytree(theta)

    def grad_r():
        return jax.grad(lambda t: train.objective(model.apply, unravel(t), xj, yj, wj,
                                                  cfg.l2))(flat)

    def run(method):
        if method == "exact":
            h = curvature.softmax_regression_hessian(theta, xj, wj, cfg.l2)
            fac = solvers.cholesky_factor(h)
            return solvers.cholesky_solve(fac, grad_r())
        if method == "cg":
            op = curvature.hvp(model.apply, theta, xj, yj, wj, cfg.l2)
            return solvers.solve(op, grad_r(), "cg", tol=cg_tol, maxiter=500).x
        if method == "lissa":
            op = curvature.hvp(model.apply, theta, xj, yj, wj, cfg.l2)
            return solvers.solve(op, grad_r(), "lissa", depth=lissa_depth,
                                 check_curvature=True).x
        if method == "sisa":
            shard = np.arange(n) % shards == 0
            return train.fit(model, ds, cfg, key, weights=(w * shard)).params
        if method == "retrain":
            return train.fit(model, ds, cfg, key, weights=w).params
        raise ValueError(f"method={method!r}: choose one of {METHODS}.")

    out = []
    for method in methods:
        if p <= 200_000:  # compile first; at larger p compilation is a negligible share
            jax.block_until_ready(run(method))
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            jax.block_until_ready(run(method))
            dt = time.perf_counter() - t0
        out.append({"method": method, "p": int(flat.size), "d": d, "n": n, "time": dt,
                    "peak_mb": mem.rise_mb})
    return out


def run(*, ps, n, k, classes, exact_max_p, shards, lbfgs_iter, cg_tol, lissa_depth,
        seed, progress=None) -> dict:
    """Run every (method, p) in a subprocess; failures (e.g. out of memory) are recorded."""
    progress = progress or runner.no_progress
    rows = []
    for p in ps:
        progress(f"p={p} (subprocess)")
        methods = list(METHODS)
        if p > exact_max_p:
            methods.remove("exact")
            rows.append({"method": "exact", "p": p, "skipped": f"p > exact_max_p "
                         f"({exact_max_p}): the p² float32 Hessian needs "
                         f"{4 * p * p / 2**30:.1f} GiB"})
        args = json.dumps(dict(methods=methods, p=p, n=n, k=k, classes=classes,
                               shards=shards, lbfgs_iter=lbfgs_iter, cg_tol=cg_tol,
                               lissa_depth=lissa_depth, seed=seed))
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
               "XLA_FLAGS": ""}
        out = subprocess.run([sys.executable, "-m", "experiments.scaling", "--worker", args],
                             capture_output=True, text=True, env=env, timeout=900,
                             cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
        if out.returncode != 0:
            rows += [{"method": m, "p": p, "failed": out.stderr.strip().splitlines()[-1:]}
                     for m in methods]
        else:
            rows += json.loads(out.stdout.strip().splitlines()[-1])
    big = max(ps)
    headline = {f"time_{r['method']}": r["time"] for r in rows if r["p"] == big and "time" in r}
    return {"rows": rows, "crossovers": crossovers(rows), "largest_p": headline}


def _curve(rows, method):
    pts = sorted((r["p"], r["time"]) for r in rows if r["method"] == method and "time" in r)
    return np.array(pts, dtype=float).reshape(-1, 2)


def crossovers(rows) -> list[dict]:
    """p where method a's time curve crosses method b's (log-log linear interpolation)."""
    out = []
    for a, b in (("cg", "exact"), ("sisa", "cg"), ("retrain", "exact"), ("sisa", "exact")):
        ca, cb = _curve(rows, a), _curve(rows, b)
        common = sorted(set(ca[:, 0]) & set(cb[:, 0]))
        ta = {p: t for p, t in ca}
        tb = {p: t for p, t in cb}
        diff = [np.log(ta[p]) - np.log(tb[p]) for p in common]
        for i in range(len(common) - 1):
            if diff[i] == 0 or np.sign(diff[i]) != np.sign(diff[i + 1]):
                lp0, lp1 = np.log(common[i]), np.log(common[i + 1])
                f = diff[i] / (diff[i] - diff[i + 1]) if diff[i] != diff[i + 1] else 0.0
                out.append({"a": a, "b": b, "p": float(np.exp(lp0 + f * (lp1 - lp0))),
                            "cheaper_after": a if diff[i + 1] < 0 else b})
    return out


def plot(payload: dict, outdir) -> list:
    """Log-log time and memory vs p per method, crossovers marked."""
    rows = payload["results"]["rows"]
    with plotting.style() as plt:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        for m in METHODS:
            pts = sorted((r["p"], r["time"], r["peak_mb"]) for r in rows
                         if r["method"] == m and "time" in r)
            if not pts:
                continue
            p, t, mb = map(np.array, zip(*pts, strict=True))
            st = plotting.method_style({"exact": "newton", "cg": "influence",
                                        "lissa": "certified"}.get(m, m))
            a1.loglog(p, t, marker=st["marker"], color=st["color"], label=m)
            a2.loglog(p, np.maximum(mb, 1.0), marker=st["marker"], color=st["color"], label=m)
        for c in payload["results"]["crossovers"]:
            a1.axvline(c["p"], color="grey", lw=0.8, ls=":")
            a1.text(c["p"], a1.get_ylim()[1], f"{c['a']}/{c['b']}", rotation=90, fontsize=6,
                    va="top", ha="right")
        a1.set_xlabel("parameters p")
        a1.set_ylabel("time per request (s)")
        a2.set_xlabel("parameters p")
        a2.set_ylabel("peak memory increase (MB)")
        a1.legend(fontsize=7)
        cfg = payload["config"]
        fig.suptitle(f"Cost of removing {cfg['k']} points vs model size "
                     f"(softmax regression, n={cfg['n']})")
        return plotting.savefig(fig, f"{outdir}/{NAME}.png")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(**json.loads(sys.argv[2]))))
    else:
        runner.main(sys.modules[__name__])
