"""Scale-out on JAX's own runtime, measured: 1 vs 2 processes, one CPU core each.

Command: ``python -m benchmarks.distributed [--processes 1,2] [--no-write]`` (a few minutes on
2 CPU cores).

Each setting starts P fresh processes (``--worker``), process i pinned to core i
(``taskset -c i``) with XLA's CPU backend single-threaded (``XLA_FLAGS=
--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``) and one device;
for P > 1 they join one ``jax.distributed`` program (:func:`unlearn.runtime.initialize`, gloo
collectives, a localhost coordinator) and the work is laid on the global mesh
(:func:`unlearn.distributed.global_mesh`):

* ``ensemble``: 16 MLPs (64→256→10, Adam) trained 10 epochs on the digits training set
  through the engine, the member axis split across the processes
  (``engine.train_members(mesh=...)``; 8 members per process at P = 2);
* ``ekfac``: EK-FAC factors (``kfac.kfac_factors``: factor pass, eigendecompositions,
  eigenvalue-correction pass) of that MLP over 8 192 examples, the example axis split
  (:func:`unlearn.distributed.shard_examples`), the factor sums all-reduced by XLA;
* ``scores``: influence scores (``influence.influence_scores``) of 64 directions against the
  same 8 192 examples, the example axis split (no reduction: each process scores its rows).

Times are the best of 3 after one untimed warm-up call (compilation excluded), read on
process 0 after ``block_until_ready`` of global results; efficiency is ``t₁ / (P · t_P)``.
Process 0's CPU seconds for the same calls are reported too: on a loaded machine they show
whether the work was divided (they halve when it is) where the wall time cannot.
The other sessions on this machine share its two cores, so the load average is recorded with
each table: at a load above the core count a process gets a fraction of its core and the
speed-up is a statement about the scheduler, not about the program.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONE_CORE = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
N_MEMBERS, N_EXAMPLES, N_DIRECTIONS, HIDDEN, EPOCHS = 16, 8192, 64, (256,), 10


def _best(fn, repeat: int = 3) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``, each the minimum over ``repeat`` calls after one
    warm-up call; CPU time is this process's (all its threads)."""
    import jax

    jax.block_until_ready(fn())  # warm-up: compile
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def worker(pid: int, nproc: int, port: int, out: Path) -> None:
    """One process of a setting: time the three workloads, process 0 writes JSON."""
    from unlearn import runtime

    runtime.compile_cache()
    if nproc > 1:
        runtime.initialize(nproc, pid, f"127.0.0.1:{port}")
    import jax
    import numpy as np

    from unlearn import data, engine, influence, kfac, models
    from unlearn import distributed as dist

    mesh = dist.global_mesh()
    tr = data.load("digits").train
    m = models.mlp(10, HIDDEN)
    keys = jax.random.split(jax.random.key(0), N_MEMBERS)
    hashes = data.stable_hash(tr.ids)
    lr = np.geomspace(1e-3, 1e-2, N_MEMBERS)

    def ensemble():
        return engine.train_members(m, tr.x, tr.y, hashes, keys, epochs=EPOCHS, batch_size=64,
                                    optimizer="adam", lr=lr, l2=1e-4, dtype="float32",
                                    mesh=mesh).members.params

    res = {"ensemble": _best(ensemble)}
    params = jax.tree.map(np.asarray, engine.unstack(dist.gather(ensemble()), 0))
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(tr), N_EXAMPLES)
    x = tr.x[rows] + rng.normal(0, 0.05, (N_EXAMPLES, tr.x.shape[1])).astype(np.float32)
    ex = dist.shard_examples((x, tr.y[rows]), mesh)
    (xs, ys), w = ex.data, ex.w
    pr = dist.replicate(params, mesh)
    p = sum(a.size for a in jax.tree.leaves(params))
    s = dist.replicate(rng.normal(size=(N_DIRECTIONS, p)).astype(np.float32), mesh)
    # one chunk: each device streams only its own rows (the functions' Python chunk loops
    # slice the global example axis, and a slice of a sharded axis moves rows between
    # processes; see unlearn.distributed)
    chunk = N_EXAMPLES
    res["ekfac"] = _best(lambda: kfac.kfac_factors(m.apply, pr, xs, w, chunk_size=chunk, y=ys))
    res["scores"] = _best(lambda: influence.influence_scores(m.apply, pr, xs, ys, s,
                                                             chunk_size=chunk))
    res["devices"] = len(jax.devices())
    if pid == 0:
        out.write_text(json.dumps(res))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(nproc: int, tmp: Path) -> dict:
    """Start ``nproc`` pinned worker processes; return process 0's timings."""
    port, out = _free_port(), tmp / f"p{nproc}.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ONE_CORE,
           "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    cores = os.cpu_count() or 1
    procs = [subprocess.Popen(["taskset", "-c", str(i % cores), sys.executable, "-m",
                               "benchmarks.distributed", "--worker", str(i), str(nproc),
                               str(port), str(out)], env=env, cwd=ROOT)
             for i in range(nproc)]
    for p in procs:
        if p.wait(timeout=1800):
            raise RuntimeError(f"a worker of the {nproc}-process setting failed "
                               f"(exit {p.returncode})")
    return json.loads(out.read_text())


def table(results: dict[int, dict], loads: dict[int, tuple[float, ...]]) -> str:
    """The markdown table: time per workload and process count, speed-up, efficiency."""
    base = results[min(results)]
    lines = ["| workload | processes | wall (s) | speed-up | efficiency | CPU s of process 0 | "
             "load avg (1 min) after |", "|---|---|---|---|---|---|---|"]
    for what in ("ensemble", "ekfac", "scores"):
        for n, r in sorted(results.items()):
            sp = base[what][0] / r[what][0]
            lines.append(f"| {what} | {n} | {r[what][0]:.3f} | {sp:.2f}× | {sp / n:.0%} | "
                         f"{r[what][1]:.3f} | {loads[n][0]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--worker", nargs=4, metavar=("PID", "N", "PORT", "OUT"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(int(a.worker[0]), int(a.worker[1]), int(a.worker[2]), Path(a.worker[3]))
        return
    import tempfile

    counts = [int(c) for c in a.processes.split(",") if c]
    if not counts or min(counts) < 1:
        raise ValueError(f"--processes {a.processes!r}: pass positive counts such as 1,2.")
    results, loads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            results[n] = run_setting(n, Path(tmp))
            loads[n] = os.getloadavg()
            print(n, results[n], loads[n], flush=True)
    body = table(results, loads)
    print(body)
    if a.no_write:
        return
    from benchmarks._common import write_section

    cores = os.cpu_count()
    title = "## Scale-out: 1 vs 2 processes on `jax.distributed` (`benchmarks/distributed.py`)"
    write_section("distributed", f"""{title}

{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {cores} CPU cores, JAX CPU backend; each
process pinned to one core (`taskset`), XLA single-threaded (`{ONE_CORE}`), one device per
process, gloo collectives over a localhost coordinator. Ensemble: {N_MEMBERS} MLPs (64→256→10),
{EPOCHS} epochs of digits (1 347 rows, batch 64) through the engine, members split across
processes. EK-FAC factors and influence scores ({N_DIRECTIONS} directions) at one member's
parameters: {N_EXAMPLES} examples split across processes, one chunk (each device its own rows;
XLA all-reduces the factor sums). Best of 3 after a warm-up; efficiency = t₁ / (P·t_P).

{body}

The load average is the machine's: other sessions share the two cores, and above 2 a pinned
process gets only part of its core, so the wall-time speed-up measures the scheduler as much
as the program; process 0's CPU seconds show whether the work was divided.
""")


if __name__ == "__main__":
    main()
