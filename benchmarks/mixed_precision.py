"""The engine's mixed-precision option on a small ResNet: error vs float32 and speed on CPU.

Command: ``python -m benchmarks.mixed_precision [--no-write]`` (a few minutes on 2 CPU cores).

ResNet-9 (BatchNorm, width 8) on the digits images (8×8, 1 347 training rows), Adam, batch
64, trained through ``engine.train_members`` with float32 throughout and with
``compute_dtype='bfloat16'`` (float32 master weights and optimiser state, bfloat16
forward/backward). Reported: the parameters' relative distance to the float32 run
``‖θ_bf16 − θ_f32‖ / ‖θ_f32‖``, the largest parameter difference, train/test accuracy of
both, and the time of one epoch (best of 3 after a warm-up epoch that compiles).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import data, engine, models

EPOCHS, WIDTH, BATCH = 5, 8, 64


def _epoch_time(m, tr, h, key, compute) -> float:
    kw = dict(epochs=1, batch_size=BATCH, optimizer="adam", lr=3e-3, l2=1e-4,
              dtype="float32", compute_dtype=compute)
    jax.block_until_ready(engine.train_members(m, tr.x, tr.y, h, key[None], **kw).members)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(engine.train_members(m, tr.x, tr.y, h, key[None], **kw).members)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    a = ap.parse_args(argv)
    split = data.load("digits")
    tr, te = split.train, split.test
    m = models.resnet9(10, width=WIDTH, image_shape=(8, 8, 1))
    h = data.stable_hash(tr.ids)
    key = jax.random.key(0)
    out, rows = {}, []
    for compute in (None, "bfloat16"):
        t = engine.train_members(m, tr.x, tr.y, h, key[None], epochs=EPOCHS, batch_size=BATCH,
                                 optimizer="adam", lr=3e-3, l2=1e-4, dtype="float32",
                                 compute_dtype=compute)
        v = t.members.variables()
        acc = [float(np.mean(np.asarray(jnp.argmax(engine.stacked_apply(m, v, jnp.asarray(
            s.x)), -1))[0] == s.y)) for s in (tr, te)]
        out[compute] = (t.members.params, acc, _epoch_time(m, tr, h, key, compute))
    p32, pbf = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(out[c][0])])
                for c in (None, "bfloat16"))
    rel = float(np.linalg.norm(pbf - p32) / np.linalg.norm(p32))
    dmax = float(np.max(np.abs(pbf - p32)))
    for c in (None, "bfloat16"):
        _, acc, sec = out[c]
        rows.append(f"| {c or 'float32'} | {acc[0]:.4f} | {acc[1]:.4f} | {sec:.3f} | "
                    f"{out[None][2] / sec:.2f}× |")
    load = os.getloadavg()[0]
    body = "\n".join(["| compute | train acc | test acc | epoch (s) | speed vs float32 |",
                      "|---|---|---|---|---|", *rows])
    note = (f"‖θ_bf16 − θ_f32‖/‖θ_f32‖ = {rel:.3g} after {EPOCHS} epochs; "
            f"max |Δθ| = {dmax:.3g}. Load average (1 min) at the end: {load:.1f}.")
    print(body + "\n" + note)
    if a.no_write:
        return
    from benchmarks._common import write_section

    write_section("mixed_precision", f"""## Mixed precision on CPU (`benchmarks/mixed_precision.py`)

{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {os.cpu_count()} CPU cores shared with
other sessions, JAX {jax.__version__} CPU. ResNet-9 (BatchNorm, width {WIDTH}) on digits
(8×8 images, 1 347 train / 450 test), Adam, batch {BATCH}, {EPOCHS} epochs, one member,
``engine.train_members`` with float32 throughout vs ``compute_dtype='bfloat16'`` (float32
master weights and optimiser state). Epoch time: best of 3 after a compiling epoch.

{body}

{note}
""")


if __name__ == "__main__":
    main()
