"""Run every experiment at its default (CPU-friendly) scale and render every figure.

Command: ``python -m experiments.reproduce`` (``--smoke`` for the tiny configs, ``--plot-only``
to re-render from saved JSON, ``--force`` to rerun finished experiments, ``--only a,b``).
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from unlearn import runner

EXPERIMENTS = ["forget_basic", "influence_loo", "certified_removal", "sisa_tradeoff", "scaling",
               "compare_methods"]


def main(argv: list[str] | None = None) -> None:
    """Run the experiments in order; finished ones are skipped unless ``--force``."""
    ap = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny configs (CI)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated experiment names")
    ap.add_argument("--out", type=Path, default=runner.DEFAULT_OUT)
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or EXPERIMENTS
    t0 = time.perf_counter()
    for name in names:
        module = importlib.import_module(f"experiments.{name}")
        runner.run_experiment(module, config="smoke" if a.smoke else "default", out=a.out,
                              force=a.force, plot_only=a.plot_only)
    print(f"reproduce: {len(names)} experiment(s) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
