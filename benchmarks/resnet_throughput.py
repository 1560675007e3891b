"""Training throughput of the CIFAR ResNets on this machine (issue 13): images per second.

Command: ``python -m benchmarks.resnet_throughput`` (about 3–6 min on 2 CPU cores;
``--models resnet9`` for one model; ``--no-write`` leaves RESULTS.md alone).

One jitted training step (train-mode BatchNorm with its running statistics carried, SGD with
momentum 0.9 at lr 0.1 and weight decay 5e-4 through the one objective's L2 term, as in the
CIFAR ResNet recipes) on a batch of 128 random 32×32×3 images, params and optimiser state
donated; ``--warm`` untimed steps after the compile, then ``--steps`` timed steps (min and
median reported). Throughput = 128 / step time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unlearn import models
from unlearn.objective import objective

BATCH = 128


def make_step(model: models.Model, opt: optax.GradientTransformation, l2: float):
    """``step(params, state, opt_state, x, y) -> (params, state, opt_state, loss)``."""

    def loss_fn(params, state, x, y):
        logits, new_state = model.apply(models.merge_variables(params, state), x, train=True)
        w = jnp.ones(x.shape[0], logits.dtype)
        return objective(lambda _p, _x: logits, params, x, y, w, l2), new_state

    def step(params, state, opt_state, x, y):
        (loss, state), g = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def measure(name: str, steps: int, warm: int) -> dict:
    model = models.make(name, 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, BATCH))
    params, state = models.split_variables(model.init(jax.random.key(0), x))
    opt = optax.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)
    step = make_step(model, opt, 5e-4)
    t0 = time.perf_counter()
    params, state, opt_state, loss = jax.block_until_ready(step(params, state, opt_state, x, y))
    compile_s = time.perf_counter() - t0
    for _ in range(warm):
        params, state, opt_state, loss = jax.block_until_ready(
            step(params, state, opt_state, x, y))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, state, opt_state, loss = jax.block_until_ready(
            step(params, state, opt_state, x, y))
        times.append(time.perf_counter() - t0)
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"{name}: non-finite loss {float(loss)}")
    return {"model": name, "params": models.num_params({"params": params["params"]}),
            "step_min": min(times), "step_median": statistics.median(times),
            "ips_best": BATCH / min(times), "ips_median": BATCH / statistics.median(times),
            "compile_s": compile_s, "steps": steps}


def table(rows: list[dict], wall: float) -> str:
    lines = [
        "## ResNet training throughput (`python -m benchmarks.resnet_throughput`)", "",
        f"Machine: {platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} CPU "
        f"cores shared with other jobs, backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), jax {jax.__version__}; load average "
        f"{os.getloadavg()[0]:.1f} at the end ({wall:.0f} s in all). One jitted train step "
        f"(BatchNorm in train mode, SGD momentum 0.9), batch {BATCH} of 32×32×3, float32.", "",
        "| model | params | step (s), best | step (s), median | images/s, best | "
        "images/s, median | compile (s) | timed steps |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['step_min']:.2f} | "
                     f"{r['step_median']:.2f} | {r['ips_best']:.1f} | {r['ips_median']:.1f} | "
                     f"{r['compile_s']:.1f} | {r['steps']} |")
    lines += ["", "A 50 000-image CIFAR-10 epoch at the median rate takes "
              + ", ".join(f"{r['model']} ≈ {50000 / r['ips_median'] / 60:.0f} min"
                          for r in rows) + " on this CPU."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,resnet9")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for name in a.models.split(","):
        rows.append(measure(name, a.steps, a.warm))
        print(rows[-1], flush=True)
    text = table(rows, time.perf_counter() - t0)
    print(text)
    if not a.no_write:
        from benchmarks._common import write_section

        write_section("resnet_throughput", text)


if __name__ == "__main__":
    main()
