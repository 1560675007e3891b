"""The training engine's strategies, measured: how one epoch should run on this backend, and
what a hyperparameter grid on the member axis costs.

Command: ``python -m benchmarks.train_epoch`` (about 1–2 minutes on 2 CPU cores).

docs/architecture.md ("The engine") records why: on CPU a convolution inside any XLA loop runs
~20× slower than at the top level of a jitted function, and a ``vmap``-ed convolution becomes a
slow grouped convolution, while dense models scan and vmap well. ``engine.resolve_strategy``
picks the strategy (``auto`` on CPU: ``fused`` — vmap of the im2col form — for the plain CNN,
``loop`` for other conv models, ``scan`` otherwise); this script times one epoch of
``train.fit`` under each strategy for logreg, MLP and CNN (``fused`` for the CNN only), and
reports which ``auto`` picked. The second table trains 8 learning rates as ONE ensemble
(``train.train_grid``) against one model of the same size, on the same data.
"""

from __future__ import annotations

import dataclasses
import os
import platform

import jax
import numpy as np

from benchmarks._common import best_time, write_section
from unlearn import data, engine, models, train


def matmul_peak(n: int = 2048) -> float:
    """GFLOP/s of one float32 n×n matmul on this machine (best of 10): the compute ceiling."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / best_time(lambda: f(a), repeat=10) / 1e9


def epoch_flop(n: int, d: int, hidden: tuple[int, ...], k: int) -> float:
    """Matmul FLOPs of one training epoch of a dense MLP: forward, the weight gradient of
    every layer and the input gradient of every layer but the first (the data needs none),
    2 FLOPs per multiply-add."""
    widths = (d, *hidden, k)
    layers = [a * b for a, b in zip(widths[:-1], widths[1:])]
    return 2 * n * (3 * sum(layers) - layers[0])


def main() -> None:
    """Time one epoch per (model, strategy) and the 8-point LR grid; print and record."""
    mnist1d = data.load("mnist1d")
    ds = mnist1d.train
    key = jax.random.key(0)
    rows = []
    settings = [
        ("logreg", models.logreg(10)),
        ("mlp", models.mlp(10, (256, 256))),
        ("cnn", models.cnn(10, features=(32, 64), dense=128)),
    ]
    cfg = train.TrainConfig(epochs=1, batch_size=128)
    for name, m in settings:
        p0 = train.init_params(m, ds, key)
        t = {}
        for strat in ("scan", "loop") + (("fused",) if m.has_conv else ()):
            c = dataclasses.replace(cfg, strategy=strat)
            t[strat] = best_time(
                lambda c=c, m=m, p0=p0: train.fit(m, ds, c, key, params=p0).params, repeat=5)
        auto = engine.resolve_strategy(m, "auto")
        rows.append((name, len(ds), t["scan"], t["loop"], t.get("fused"), auto,
                     t[auto] / min(t.values())))

    grid = np.geomspace(1e-4, 1e-2, 8)
    peak = matmul_peak()
    grid_rows = []
    for name, hidden in (("mlp 40-256-256-10", (256, 256)), ("mlp 40-128-10", (128,)),
                         ("logreg 40-10", ())):
        m = models.mlp(10, hidden) if hidden else models.logreg(10)
        one = best_time(lambda m=m: train.fit(m, ds, cfg, key).params, repeat=7)
        eight = best_time(lambda m=m: train.train_grid(m, ds, cfg, key, lr=grid)[0], repeat=7)
        flop = 8 * epoch_flop(len(ds), ds.x.shape[1], hidden, 10)
        grid_rows.append((name, one, eight, eight / one, flop / eight / 1e9,
                          flop / (peak * 1e9) / one))

    load = os.getloadavg()[0]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, backend "
             f"{jax.default_backend()}, jax {jax.__version__}; load average {load:.1f} at the "
             f"end (a shared machine: compare ratios within one run). One epoch of mnist1d "
             f"(n={len(ds)}, batch 128) through `train.fit` (the engine, one member), best of "
             f"5 after a warm-up.", "",
             "| model | n | scan (s) | loop of jitted steps (s) | fused (im2col, s) | "
             "auto picks | auto / best |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        fused = "–" if r[4] is None else f"{r[4]:.3f}"
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {fused} | {r[5]} | "
                     f"{r[6]:.2f} |")
    lines += ["", "Learning-rate grid on the member axis: 8 learning rates (1e-4 … 1e-2) trained "
              "as one ensemble (`train.train_grid`, one shared schedule: one gather, one wide "
              "matmul for the first layer, batched matmuls after it) vs one model, one epoch "
              "each, best of 7 (target ≤ 1.5×). "
              "The compute floor: the ensemble's matmul FLOPs (forward, weight and input "
              f"gradients) at this machine's float32 matmul peak, {peak:.0f} GFLOP/s (one "
              "2048² matmul, best of 10, same run), as a multiple of the one-model time; no "
              "implementation on this CPU can go below it.", "",
              "| model | one model (s) | 8 LRs as one ensemble (s) | ratio | ensemble GFLOP/s "
              "| floor at peak (× one model) |", "|---|---|---|---|---|---|"]
    for r in grid_rows:
        lines.append(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.2f}× | {r[4]:.0f} | "
                     f"{r[5]:.2f}× |")
    table = "\n".join(lines)
    print(table)
    write_section("train_epoch", "## Training engine (`benchmarks/train_epoch.py`)\n\n" + table)
    assert np.isfinite([r[2] for r in rows]).all()


if __name__ == "__main__":
    main()
