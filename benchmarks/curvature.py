"""Curvature benchmark: exact Hessians, HVP vs gradient, CG / Cholesky solves — side by side.

Softmax regression (the convex model of the Newton/influence experiments) at two sizes:

* digits-like: d=64, K=10, n=1347 (p=650), float64;
* MNIST-like: d=784, K=10, n=60000 (p=7850), float32, synthetic Gaussian-mixture data.

Measured in one run on this machine: the closed-form Hessian (chunked ``lax.scan``), the generic
chunked ``jax.hessian`` (at p=7850 timed on a 6000-example subset and extrapolated linearly in n,
since its cost is exactly linear in n), one HVP vs one gradient (ratio), a CG solve to tol 1e-6
and a dense Cholesky solve. PyTorch baselines (a row-by-row ``torch.autograd.grad`` Hessian loop
and ``torch.func.hessian``) run only when torch is importable.

Usage::

    python benchmarks/curvature.py            # full sizes (~3-5 min on 2 CPU cores)
    python benchmarks/curvature.py --quick    # small sizes, seconds

Prints a Markdown table and writes it between ``<!-- curvature -->`` and
``<!-- /curvature -->`` in ``benchmarks/RESULTS.md`` (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearn import curvature as C  # noqa: E402
from unlearn import solvers as S  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- curvature -->", "<!-- /curvature -->"


def apply(params: dict, x: jax.Array) -> jax.Array:
    """Softmax regression logits, flax ``nn.Dense`` parameter layout."""
    p = params["params"]
    return x @ p["kernel"] + p["bias"]


def problem(n: int, d: int, k: int, dtype: type, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) / np.sqrt(d) * 3
    y = rng.integers(0, k, size=n)
    x = (centers[y] + rng.normal(size=(n, d)) / np.sqrt(d)).astype(dtype)
    params = {
        "params": {
            "bias": (0.1 * rng.normal(size=k)).astype(dtype),
            "kernel": (0.1 * rng.normal(size=(d, k))).astype(dtype),
        }
    }
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return params, jnp.asarray(x), jnp.asarray(y), jnp.ones(n, dtype)


def timeit(fn, *args, repeats: int = 3) -> tuple[float, float]:
    """(first call incl. compile, median of ``repeats`` warm calls) in seconds."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return first, float(np.median(times))


def torch_rows(n: int, d: int, k: int, rows: int) -> tuple[float, float] | None:
    """PyTorch row-by-row Hessian loop; returns (seconds for ``rows`` rows, rows/sec)."""
    try:
        import torch
    except ImportError:
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    w = (0.1 * torch.randn(d, k, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(k, generator=g)).requires_grad_()
    loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5e-3 * (
        w.square().sum() + b.square().sum()
    )
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, (b, w), create_graph=True)])
    rows = min(rows, grad.numel())
    t = time.perf_counter()
    for i in range(rows):
        torch.autograd.grad(grad[i], (b, w), retain_graph=True)
    dt = time.perf_counter() - t
    return dt, rows / dt


def torch_func_hessian(n: int, d: int, k: int) -> float | None:
    try:
        import torch
        from torch.func import hessian
    except ImportError:
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    theta = 0.1 * torch.randn(k + d * k, generator=g)

    def f(t):
        logits = x @ t[k:].reshape(d, k) + t[:k]
        return torch.nn.functional.cross_entropy(logits, y) + 0.5e-3 * t.square().sum()

    t = time.perf_counter()
    hessian(f)(theta)
    return time.perf_counter() - t


def run_size(name: str, n: int, d: int, k: int, dtype: type, generic_n: int, torch_n_rows: int):
    params, x, y, w = problem(n, d, k, dtype)
    p = (d + 1) * k
    l2 = 1e-3
    rows: list[tuple[str, str, str]] = []
    print(f"== {name}: n={n} d={d} K={k} p={p} {np.dtype(dtype).name}", flush=True)

    def once(jitted, *args, **kw):
        """Compile (timed separately), then one timed run; returns (compile s, run s, out)."""
        t = time.perf_counter()
        compiled = jitted.lower(*args, **kw).compile()
        t_comp = time.perf_counter() - t
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*[a for a in args if not callable(a)], **kw))
        return t_comp, time.perf_counter() - t, out

    t_comp, t_closed, h = once(C.softmax_regression_hessian, params, x, w, l2)
    rows.append(
        (
            "exact Hessian, closed form (chunked scan)",
            f"{t_closed:.2f} s",
            f"compile {t_comp:.1f} s",
        )
    )
    print(rows[-1], flush=True)

    sub = slice(0, min(generic_n, n))
    t_comp, t_gen, hg = once(C.hessian, apply, params, x[sub], y[sub], w[sub], l2)
    if generic_n < n:
        rows.append(
            (
                "exact Hessian, generic chunked jax.hessian",
                f"≈{t_gen * n / generic_n:.1f} s (est.)",
                f"measured {t_gen:.2f} s on n={generic_n}, × n/{generic_n}; compile {t_comp:.1f} s",
            )
        )
    else:
        err = float(jnp.max(jnp.abs(hg - h)) / jnp.max(jnp.abs(h)))
        rows.append(
            (
                "exact Hessian, generic chunked jax.hessian",
                f"{t_gen:.2f} s",
                f"max rel. diff to closed form {err:.1e}; compile {t_comp:.1f} s",
            )
        )
    print(rows[-1], flush=True)

    grad = jax.jit(lambda params, x, y, w: C.flat_grad(apply, params, x, y, w, l2))
    _, t_grad = timeit(grad, params, x, y, w, repeats=10)
    op = C.hvp(apply, params, x, y, w, l2)
    v = jnp.ones(p, dtype)
    hvp = jax.jit(lambda op, v: op(v))
    _, t_hvp = timeit(hvp, op, v, repeats=10)
    rows.append(("one gradient", f"{1e3 * t_grad:.1f} ms", ""))
    rows.append(
        (
            "one HVP (jvp of grad)",
            f"{1e3 * t_hvp:.1f} ms",
            f"HVP/gradient = {t_hvp / t_grad:.2f} (target ≤ 2)",
        )
    )
    print(rows[-2:], flush=True)

    b = grad(params, x, y, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        S.cg(op, b, tol=1e-6, warn=False)  # compile
        t = time.perf_counter()
        r = S.cg(op, b, tol=1e-6, warn=False)
        jax.block_until_ready(r.x)
        t_cg = time.perf_counter() - t
    rows.append(
        (
            "CG solve H x = ∇L (HVP, tol 1e-6)",
            f"{t_cg:.2f} s",
            f"{int(r.iterations)} iterations, true rel. residual {float(r.residual):.1e}, "
            f"converged={bool(r.converged)}",
        )
    )
    print(rows[-1], flush=True)
    t = time.perf_counter()
    fac = S.cholesky_factor(h)
    xs_ = S.cholesky_solve(fac, b)
    jax.block_until_ready(xs_)
    t_chol = time.perf_counter() - t
    res = float(jnp.linalg.norm(h @ xs_ - b) / jnp.linalg.norm(b))
    rows.append(
        (
            "Cholesky factor + solve (dense H)",
            f"{t_chol:.2f} s",
            f"rel. residual {res:.1e} (incl. compile)",
        )
    )
    print(rows[-1], flush=True)

    tr = torch_rows(n, d, k, torch_n_rows)
    if tr is None:
        rows.append(("PyTorch row-by-row Hessian loop", "skipped", "torch not installed"))
        rows.append(("torch.func.hessian", "skipped", "torch not installed"))
    else:
        dt, rate = tr
        if torch_n_rows < p:
            rows.append(
                (
                    "PyTorch row-by-row Hessian loop",
                    f"≈{p / rate:.0f} s (est.)",
                    f"{min(torch_n_rows, p)} rows in {dt:.1f} s, × {p} rows; closed form is "
                    f"{p / rate / t_closed:.0f}× faster (target ≥ 20)",
                )
            )
        else:
            rows.append(("PyTorch row-by-row Hessian loop", f"{dt:.1f} s",
                         f"{p} rows; closed form is {dt / t_closed:.0f}× faster"))
        mem = 4 * n * p * p / 2**30
        if mem < 8:
            rows.append(("torch.func.hessian", f"{torch_func_hessian(n, d, k):.1f} s", ""))
        else:
            rows.append(("torch.func.hessian", "skipped", f"would need ~{mem:.0f} GiB"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.quick:
        sizes = [
            ("digits-like (quick)", 300, 64, 10, np.float64, 500, 650),
            ("MNIST-like (quick)", 3000, 784, 10, np.float32, 500, 100),
        ]
    else:
        sizes = [
            ("digits-like", 1347, 64, 10, np.float64, 1347, 650),
            ("MNIST-like", 60000, 784, 10, np.float32, 6000, 200),
        ]
    sections = []
    for name, n, d, k, dtype, gen_n, t_rows in sizes:
        ctx = jax.enable_x64(dtype == np.float64)
        with ctx:
            rows = run_size(name, n, d, k, dtype, gen_n, t_rows)
        p = (d + 1) * k
        lines = [
            f"**{name}** — softmax regression, n={n}, d={d}, K={k}, p={p}, {np.dtype(dtype).name}",
            "",
            "| what | time | notes |",
            "|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        sections.append("\n".join(lines))
    total = time.perf_counter() - t0
    header = (
        f"## Curvature (`python benchmarks/curvature.py{' --quick' if args.quick else ''}`)\n\n"
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, backend {jax.default_backend()}; total {total:.0f} s. "
        "Targets: exact Hessian at p=7850/n=60000 ≤ 60 s; HVP ≤ 2× gradient. Timings are "
        "medians of warm runs unless marked (compile excluded); the machine may be shared: "
        f"load average at the end {os.getloadavg()[0]:.1f}.\n"
    )
    body = header + "\n" + "\n\n".join(sections) + "\n"
    print("\n" + body)
    if not args.no_write:
        block = f"{BEGIN}\n{body}{END}"
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
        text = (
            pattern.sub(lambda _: block, text)
            if pattern.search(text)
            else text.rstrip() + "\n\n" + block + "\n"
        )
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
