"""Curvature products to agree with the exact damped answer: plain block CG vs EK-FAC-PCG vs
Nyström-PCG on the transformer of the LDS table (issue #29's "fewer curvature products").

Command: ``python -m benchmarks.pcg_products [--no-write]`` (≈ 8 min on 2 cores).

The problem is ``experiments.lds_backends``' transformer, built and trained by the same code
(``_problem("transformer", _TRANSFORMER, 0)``: width 16, depth 2, 128 sequences × 16 tokens,
p = 7 536, Gauss–Newton curvature, L2 1e-4 + damping 0.1), float64, and its 20 test
sequences. Reference: the scores of block CG to relative residual 1e-10. For each solver and
budget k (block iterations; each is one batched curvature product for all 20 right-hand
sides, i.e. k products per test gradient), the solve is stopped after k iterations
(``maxiter=k``, tolerance 1e-12 so that only the budget stops it), and its influence scores
(the same streamed ``influence_scores``) are compared with the reference: Pearson r over
all (test, train) pairs, the smallest per-test-sequence r, and the worst relative residual.

Preconditioners are prepared once; their preparation is reported in products too:
Nyström at rank r costs r curvature-vector products (one batched product of r vectors);
EK-FAC's factors cost two passes of backward passes over the training set, one per sequence
with one sampled label per token (``samples=1``) or T·V per sequence with exact roots
(``samples`` None); they are not curvature products, so they count 0 here and their cost is
in the seconds column.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

BUDGETS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 40, 80)
TARGET = 0.999


def run(log=print) -> dict:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from experiments import lds_backends as lb
    from unlearn import inverse, lds, train
    from unlearn.influence import example_gradients, influence_scores

    spec = lb._TRANSFORMER
    problem, te = lb._problem("transformer", spec, 0)
    fit = train.train(problem)
    curv = lds.influence_curvature(problem, train.Fit(fit.params, {}), "ggn")
    damping = float(spec["damping"])
    xt, yt = jnp.asarray(te.x), jnp.asarray(te.y)
    rhs = example_gradients(curv.apply, curv.params, xt, yt, measure=True)

    def scores(sol):
        return -np.asarray(influence_scores(curv.apply, curv.params, curv.x, curv.y, sol.x))

    t0 = time.perf_counter()
    ref_inv = inverse.CG(tol=1e-10, maxiter=5000).prepare(curv, damping)
    ref_sol = ref_inv.backend.apply(ref_inv, rhs)
    ref = scores(ref_sol)
    info = {"p": int(curv.theta.size), "n": int(curv.x.shape[0]), "m": int(rhs.shape[0]),
            "damping": damping, "reference_iterations": int(np.max(ref_sol.iterations)),
            "reference_residual": float(np.max(ref_sol.residual)),
            "reference_s": time.perf_counter() - t0}
    log(f"reference: {info['reference_iterations']} block iterations, residual "
        f"{info['reference_residual']:.1e}")
    solvers = {
        "cg": (inverse.CG(tol=1e-12), 0),
        "pcg-ekfac (samples=1)": (inverse.EKFACPCG(tol=1e-12, samples=1,
                                                   key=jax.random.key(0)), 0),
        "pcg-ekfac (exact roots)": (inverse.EKFACPCG(tol=1e-12), 0),
        "pcg (Nyström rank 50)": (inverse.NystromPCG(tol=1e-12, rank=50,
                                                     key=jax.random.key(0)), 50),
    }
    rows = {}
    for name, (backend, prep_products) in solvers.items():
        t0 = time.perf_counter()
        inv = backend.prepare(curv, damping)
        prep_s = time.perf_counter() - t0
        row = {"prepare_s": prep_s, "prepare_products": prep_products, "budgets": {}}
        for k in BUDGETS:
            sol = dataclasses.replace(backend, maxiter=k).apply(inv, rhs)
            sc = scores(sol)
            r = float(np.corrcoef(sc.ravel(), ref.ravel())[0, 1])
            rmin = float(min(np.corrcoef(sc[t], ref[t])[0, 1] for t in range(len(sc))))
            row["budgets"][k] = {"pearson": r, "pearson_min": rmin,
                                 "residual": float(np.max(sol.residual)),
                                 "iterations": int(np.max(sol.iterations))}
            log(f"{name} k={k}: r {r:.6f} (min {rmin:.6f}), residual "
                f"{float(np.max(sol.residual)):.1e}")
        for crit, field in (("all", "pearson"), ("min", "pearson_min")):
            hit = [k for k in BUDGETS if row["budgets"][k][field] >= TARGET]
            row[f"first_k_{crit}"] = hit[0] if hit else None
        rows[name] = row
    info["rows"] = rows
    return info


def render(info: dict, command: str) -> str:
    import os
    import platform

    import jax

    lines = ["## Curvature products to the exact damped answer on the transformer "
             "(`python -m benchmarks.pcg_products`)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.platform()}, "
             f"{os.cpu_count()} CPU cores, jax {jax.__version__}; load average at the end "
             f"{os.getloadavg()[0]:.1f}.", "",
             f"`experiments.lds_backends`' transformer (p = {info['p']:,}, {info['n']} "
             f"sequences × 16 tokens, GGN + L2 1e-4 + damping {info['damping']:g}, float64), "
             f"{info['m']} test sequences. Reference: block CG to residual 1e-10 "
             f"({info['reference_iterations']} block iterations, residual "
             f"{info['reference_residual']:.0e}). Each cell: Pearson r of the influence scores "
             "(all test × train pairs) against the reference, and the smallest per-test r, "
             "after k block iterations (k curvature products per test gradient). Command: "
             f"`{command}`.", "",
             "| solver | prepare (products, s) | " + " | ".join(f"k = {k}" for k in BUDGETS)
             + f" | first k: r ≥ {TARGET} | first k: min r ≥ {TARGET} |",
             "|---|---|" + "---|" * len(BUDGETS) + "---|---|"]
    for name, row in info["rows"].items():
        cells = [f"{b['pearson']:.4f} ({b['pearson_min']:.4f})"
                 for b in (row["budgets"][k] for k in BUDGETS)]
        firsts = ["—" if row[f"first_k_{c}"] is None else
                  f"{row[f'first_k_{c}']} (+{row['prepare_products']})" for c in ("all", "min")]
        lines.append(f"| {name} | {row['prepare_products']}, {row['prepare_s']:.1f} s | "
                     + " | ".join(cells) + " | " + " | ".join(firsts) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", help="also write the measurements to this JSON file")
    args = ap.parse_args(argv)
    info = run()
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    command = "python -m benchmarks.pcg_products" + (" --no-write" if args.no_write else "")
    body = render(info, command)
    print(body)
    if not args.no_write:
        from benchmarks._common import write_section

        write_section("pcg_products", body)


if __name__ == "__main__":
    main(sys.argv[1:])
