"""SISA speed, side by side in one run (Bourtoule et al. 2021).

Command: ``python -m benchmarks.sisa`` (about 5 min on 2 CPU cores; ``--data digits`` for the
small embedded set only, ~1 min).

1. Training an S-shard ensemble (S = 8, 16; R = 1; same epochs) three ways: the batched SISA
   trainer (``unlearn.sisa.train``: vmap for dense models, for the CNN on CPU its im2col form
   vmapped over the shard axis, the engine's ``fused`` strategy), a Python loop over shards
   each trained with ``train.py``'s own compiled single-model epoch (``sisa.train_loop``),
   and one model on all data (``train.fit``). Compiles are warmed up first; each time is the
   median of ``REPEATS``.
2. Forgetting one random point with S = 8, R = 4 (MLP): example-gradients recomputed vs full
   retraining of the one model, and wall time vs retraining the one model and the whole
   ensemble. Mean over ``FORGETS`` random points.

Data: by default a synthetic 10-class Gaussian mixture with 8×8 inputs and n = 16000 training
examples (MNIST-scale work per epoch: on the 1347 examples of ``digits`` a whole 5-epoch
training takes 10–50 ms, so the ratios there measure Python dispatch, not training), then the
forget row again on ``digits`` to show the fixed per-request overhead at that scale.

Targets (CPU): batched ≤ 1.0× loop and ≤ 1.5× one model at S = 8; one-point forget recomputes
≤ 1/8 of the points and is ≥ 5× faster than full retraining. Writes its tables into
``benchmarks/RESULTS.md`` between ``<!-- sisa -->`` markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

from benchmarks._common import write_section
from unlearn import data, engine, models, sisa, train

REPEATS = 3
FORGETS = 5
EPOCHS = 5


def _time(fn) -> float:
    jax.block_until_ready(fn())  # compile
    ts = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _models(k: int):
    return {"logreg": models.logreg(k), "mlp": models.mlp(k, (128,)),
            "cnn": models.cnn(k, features=(16, 32), dense=64, image_shape=(8, 8, 1))}


def load(name: str, n: int):
    if name == "digits":
        return data.load("digits").train
    return data.load("synthetic", n=int(round(n / 0.75)), d=64, num_classes=10,
                     separation=3.0, seed=0).train


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
                         "strategy": engine.resolve_strategy(m), "batched_s": t_b, "loop_s": t_l,
                         "one_model_s": t_one, "batched/loop": t_b / t_l,
                         "batched/one": t_b / t_one})
            print(rows[-1], flush=True)
    return rows


def torch_rows(tr, rows: list[dict], shards: int = 8) -> list[dict]:
    """Optional rows (the ``torch`` extra): the obvious PyTorch alternative, one ``nn.Module``
    per shard trained in a Python loop (2 threads), same model sizes, shard sizes, epochs,
    batch 32 and Adam 1e-3 (``benchmarks/_torch.py``); skipped when torch is absent."""
    try:
        from benchmarks._torch import sisa_loop
    except ImportError:
        print("torch not installed: PyTorch rows skipped (pip install torch==2.13.0)")
        return []
    from benchmarks.cnn_strategies import schedule

    idx, w = schedule(len(tr), shards, EPOCHS, 32)
    out = []
    for name, m in _models(tr.num_classes).items():
        ours = next(r["batched_s"] for r in rows if r["model"] == name and r["S"] == shards)
        t = {th: statistics.median(sisa_loop(m.spec, tr.x, tr.y, idx, w, threads=th)["seconds"]
                                   for _ in range(REPEATS)) for th in (1, 2)}
        out.append({"model": name, "S": shards, "batched_s": ours, "torch1_s": t[1],
                    "torch2_s": t[2]})
        print(out[-1], flush=True)
    return out


def torch_table(rows: list[dict]) -> str:
    lines = ["", "PyTorch loop (torch 2.13 CPU, one `nn.Module` per shard, 1 and 2 threads; same "
             "run; speed vs the faster PyTorch row, > 1× = the project is faster):", "",
             "| model | S | batched (s) | PyTorch 1 thread (s) | PyTorch 2 threads (s) | "
             "speed vs PyTorch |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['S']} | {r['batched_s']:.3f} | {r['torch1_s']:.3f} | "
              f"{r['torch2_s']:.3f} | "
              f"{min(r['torch1_s'], r['torch2_s']) / r['batched_s']:.2f}× |" for r in rows]
    return "\n".join(lines)


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
    row = {"n": len(tr), "points_retrained": pts, "one_model_points": cfg.epochs * len(tr),
           "points_fraction": pts / (cfg.epochs * len(tr)), "forget_s": wall,
           "retrain_one_s": t_one, "retrain_sisa_s": t_full_sisa,
           "speedup_vs_one": t_one / wall, "speedup_vs_sisa": t_full_sisa / wall}
    print(row, flush=True)
    return row


def table(name: str, n: int, rows: list[dict], forgets: list[tuple[str, dict]]) -> str:
    lines = ["## SISA (`python -m benchmarks.sisa`)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, backend "
             f"{jax.default_backend()}, jax {jax.__version__}; load average "
             f"{os.getloadavg()[0]:.1f} at the end of the run. Training: {name} (n = {n}), "
             f"{EPOCHS} epochs, batch 32, R = 1; "
             f"median of {REPEATS} after a warm-up.", "",
             "| model | S | strategy | batched (s) | loop over shards (s) | one model (s) | "
             "batched / loop | batched / one model |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['S']} | {r['strategy']} | {r['batched_s']:.3f} | "
                     f"{r['loop_s']:.3f} | {r['one_model_s']:.3f} | {r['batched/loop']:.2f}× | "
                     f"{r['batched/one']:.2f}× |")
    lines += ["", f"One-point forget, MLP, S = 8, R = 4, 20 epochs (mean of {FORGETS} random "
              "points):", "",
              "| data | n | points retrained | one-model retrain points | fraction | forget (s) | "
              "retrain one model (s) | retrain all shards (s) | speed-up vs one model | "
              "speed-up vs all shards |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dname, fg in forgets:
        lines.append(
            f"| {dname} | {fg['n']} | {fg['points_retrained']:.0f} | {fg['one_model_points']} | "
            f"{fg['points_fraction']:.3f} | {fg['forget_s']:.3f} | {fg['retrain_one_s']:.3f} | "
            f"{fg['retrain_sisa_s']:.3f} | {fg['speedup_vs_one']:.1f}× | "
            f"{fg['speedup_vs_sisa']:.1f}× |")
    if len(forgets) > 1:
        lines += ["", "On digits a whole 20-epoch retrain of one model takes tens of "
                  "milliseconds, so the request's fixed host-side work (validation, data order, "
                  "checkpoint copies: a few ms) caps the wall-time speed-up below the "
                  "points ratio; the synthetic set shows the regime where training dominates."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="synthetic", choices=["synthetic", "digits"])
    ap.add_argument("--n", type=int, default=16000, help="synthetic training examples")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    tr = load(a.data, a.n)
    rows = training_rows(tr)
    trows = torch_rows(tr, rows)
    forgets = [(a.data, forget_row(tr))]
    if a.data != "digits":
        forgets.append(("digits", forget_row(load("digits", 0))))
    text = table(a.data, len(tr), rows, forgets)
    if trows:
        text += "\n" + torch_table(trows)
    print(text)
    if not a.no_write:
        write_section("sisa", text)


if __name__ == "__main__":
    main()
