"""How one training epoch should run on this backend: ``lax.scan`` vs a loop of jitted steps.

Command: ``python -m benchmarks.train_epoch`` (about 1–2 minutes on 2 CPU cores).

DESIGN.md measured that on CPU a convolution inside any XLA loop runs ~20× slower than at the
top level of a jitted function, while dense models scan fine. ``train.use_scan`` picks the
strategy (``auto``: loop for conv models on CPU, scan otherwise); this script measures both
strategies side by side for logreg, MLP and CNN and reports which ``auto`` picked.
"""

from __future__ import annotations

import dataclasses
import platform

import jax
import numpy as np

from benchmarks._common import best_time, write_section
from unlearn import data, models, train


def main() -> None:
    """Time one epoch per (model, strategy); print and record a Markdown table."""
    mnist1d = data.load("mnist1d")
    rows = []
    settings = [
        ("logreg", models.logreg(10), mnist1d.train),
        ("mlp", models.mlp(10, (256, 256)), mnist1d.train),
        ("cnn", models.cnn(10, features=(32, 64), dense=128), mnist1d.train),
    ]
    for name, m, ds in settings:
        cfg = train.TrainConfig(epochs=1, batch_size=128)
        key = jax.random.key(0)
        p0 = train.init_params(m, ds, key)
        t = {}
        for strat in ("scan", "loop"):
            c = dataclasses.replace(cfg, strategy=strat)
            t[strat] = best_time(
                lambda c=c, m=m, ds=ds, p0=p0, key=key: train.fit(m, ds, c, key, params=p0).params)
        auto = "scan" if train.use_scan(m, "auto") else "loop"
        rows.append((name, len(ds), t["scan"], t["loop"], auto,
                     t[auto] / min(t.values())))
    lines = [f"Machine: {platform.machine()}, backend {jax.default_backend()}, "
             f"{len(jax.devices())} device(s). One epoch of mnist1d "
             f"(n={len(mnist1d.train)}, batch 128), best of 3 after a warm-up.", "",
             "| model | n | scan (s) | loop of jitted steps (s) | auto picks | auto / best |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]} | {r[5]:.2f} |")
    table = "\n".join(lines)
    print(table)
    write_section("train_epoch", "## Epoch strategy (`benchmarks/train_epoch.py`)\n\n" + table)
    assert np.isfinite([r[2] for r in rows]).all()


if __name__ == "__main__":
    main()
