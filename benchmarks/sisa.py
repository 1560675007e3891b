"""SISA speed, side by side in one run (Bourtoule et al. 2021).

Command: ``python -m benchmarks.sisa`` (a few minutes on 2 CPU cores).

1. Training an S-shard ensemble (S = 8, 16; R = 1; same epochs) three ways: the batched SISA
   trainer (``unlearn.sisa.train``: vmap for dense models, the shard axis unrolled inside one
   jit for conv nets on CPU), a Python loop over shards each trained with ``train.py``'s own
   compiled single-model step (``sisa.train_loop``), and one model on all data
   (``train.fit``). Compiles are warmed up first; each time is the median of ``REPEATS``.
2. Forgetting one random point with S = 8, R = 4 (MLP): example-gradients recomputed vs full
   retraining of the one model, and wall time vs retraining the one model and the whole
   ensemble. Mean over ``FORGETS`` random points.

Targets (CPU): batched ≤ 1.0× loop and ≤ 1.5× one model; one-point forget recomputes ≤ 1/8 of
the points and is ≥ 5× faster than full retraining. Writes its table into
``benchmarks/RESULTS.md`` between ``<!-- sisa -->`` markers.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from unlearn import data, models, sisa, train

REPEATS = 3
FORGETS = 5
EPOCHS = 5
RESULTS = Path(__file__).with_name("RESULTS.md")


def _time(fn) -> float:
    fn()  # compile
    ts = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _models(k: int):
    return {"logreg": models.logreg(k), "mlp": models.mlp(k, (128,)),
            "cnn": models.cnn(k, features=(16, 32), dense=64, image_shape=(8, 8, 1))}


def training_rows(tr) -> list[dict]:
    cfg = train.TrainConfig(epochs=EPOCHS, batch_size=32, lr=1e-3)
    key = jax.random.key(0)
    rows = []
    for name, m in _models(tr.num_classes).items():
        t_one = _time(lambda m=m: train.fit(m, tr, cfg, key).params)
        for S in (8, 16):
            plan = sisa.Plan(S, 1)
            t_b = _time(lambda m=m, plan=plan: sisa.train(m, tr, cfg, plan, key).ckpts)
            t_l = _time(lambda m=m, plan=plan: sisa.train_loop(m, tr, cfg, plan, key))
            rows.append({"model": name, "S": S,
                         "strategy": sisa.resolve_strategy(m), "batched_s": t_b, "loop_s": t_l,
                         "one_model_s": t_one, "batched/loop": t_b / t_l,
                         "batched/one": t_b / t_one})
            print(rows[-1], flush=True)
    return rows


def forget_row(tr) -> dict:
    cfg = train.TrainConfig(epochs=20, batch_size=32, lr=1e-3)
    key = jax.random.key(0)
    m = models.mlp(tr.num_classes, (128,))
    plan = sisa.Plan(8, 4)
    st = sisa.train(m, tr, cfg, plan, key)
    t_full_sisa = _time(lambda: sisa.train(m, tr, cfg, plan, key).ckpts)
    t_one = _time(lambda: train.fit(m, tr, cfg, key).params)
    rng = np.random.default_rng(0)
    sisa.forget(st, tr.ids[rng.choice(len(tr), 1)])  # warm the k = 1 program
    stats = [sisa.forget(st, tr.ids[rng.choice(len(tr), 1)])[1] for _ in range(FORGETS)]
    pts = float(np.mean([s["points_retrained"] for s in stats]))
    wall = float(np.mean([s["time"] for s in stats]))
    return {"points_retrained": pts, "one_model_points": cfg.epochs * len(tr),
            "points_fraction": pts / (cfg.epochs * len(tr)), "forget_s": wall,
            "retrain_one_s": t_one, "retrain_sisa_s": t_full_sisa,
            "speedup_vs_one": t_one / wall, "speedup_vs_sisa": t_full_sisa / wall}


def table(rows: list[dict], fg: dict) -> str:
    load = os.getloadavg()[0]
    lines = [f"Digits train set ({EPOCHS} epochs, batch 32, R = 1), CPU "
             f"({os.cpu_count()} cores, load average {load:.1f} at the end of the run: other "
             f"jobs share the cores, so ratios are noisy), jax {jax.__version__}; median of "
             f"{REPEATS}.", "",
             "| model | S | strategy | batched (s) | loop over shards (s) | one model (s) | "
             "batched / loop | batched / one model |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['S']} | {r['strategy']} | {r['batched_s']:.3f} | "
                     f"{r['loop_s']:.3f} | {r['one_model_s']:.3f} | {r['batched/loop']:.2f}× | "
                     f"{r['batched/one']:.2f}× |")
    lines += ["", f"One-point forget, MLP, S = 8, R = 4, 20 epochs (mean of {FORGETS} random "
              "points):", "",
              "| points retrained | one-model retrain points | fraction | forget (s) | "
              "retrain one model (s) | retrain all shards (s) | speed-up vs one model | "
              "speed-up vs all shards |", "|---|---|---|---|---|---|---|---|",
              f"| {fg['points_retrained']:.0f} | {fg['one_model_points']} | "
              f"{fg['points_fraction']:.3f} | {fg['forget_s']:.3f} | {fg['retrain_one_s']:.3f} | "
              f"{fg['retrain_sisa_s']:.3f} | {fg['speedup_vs_one']:.1f}× | "
              f"{fg['speedup_vs_sisa']:.1f}× |"]
    return "\n".join(lines)


def write_results(text: str, name: str = "sisa") -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, re-read right before."""
    block = f"<!-- {name} -->\n## SISA (`python -m benchmarks.sisa`)\n\n{text}\n<!-- /{name} -->"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pat = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    new = pat.sub(lambda _: block, old) if pat.search(old) else old.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(new)


def main() -> None:
    tr = data.load("digits").train
    rows = training_rows(tr)
    fg = forget_row(tr)
    print(fg)
    text = table(rows, fg)
    print(text)
    write_results(text)


if __name__ == "__main__":
    main()
