"""The shared driver of every experiment script: ``run`` -> JSON, ``plot`` -> figures.

An experiment module defines ``NAME``, ``CONFIGS`` (``{"default": {...}, "smoke": {...}}``, each
a dict of ``run``'s keyword arguments), ``run(**cfg) -> dict`` (expensive, JSON-able) and
``plot(payload, outdir) -> list[Path]`` (reads only). ``main(module)`` gives each script the
same command line::

    python -m experiments.NAME [--config smoke] [--plot-only] [--force] [--out paper_figures]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import ModuleType

from unlearn import results

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "paper_figures"


def data_path(module: ModuleType, config: str, out: Path) -> Path:
    """Where an experiment's JSON lives: ``out/data/NAME[-config].json``."""
    suffix = "" if config == "default" else f"-{config}"
    return out / "data" / f"{module.NAME}{suffix}.json"


def run_experiment(module: ModuleType, *, config: str = "default", out: Path = DEFAULT_OUT,
                   force: bool = False, plot_only: bool = False, **overrides) -> Path:
    """Run (unless its JSON exists and not ``force``) and plot one experiment."""
    if config not in module.CONFIGS:
        raise ValueError(f"config={config!r}: {module.NAME} has {sorted(module.CONFIGS)}.")
    cfg = {**module.CONFIGS[config], **overrides}
    path = data_path(module, config, out)
    if plot_only and not path.exists():
        raise FileNotFoundError(f"--plot-only needs {path}; run without --plot-only first.")
    if force or not path.exists():
        t0 = time.perf_counter()
        res = module.run(**cfg)
        print(f"[{module.NAME}] ran in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results.write(path, res, config={"experiment": module.NAME, "config": config, **cfg},
                      seed=cfg.get("seed", 0), timings=False)
    else:
        print(f"[{module.NAME}] {path} exists; skipping the run (use --force).",
              file=sys.stderr)
    figdir = out if config == "default" else out / config
    for p in module.plot(results.read(path), figdir):
        print(f"[{module.NAME}] wrote {p}", file=sys.stderr)
    return path


def main(module: ModuleType, argv: list[str] | None = None) -> Path:
    """Command-line entry point shared by every experiment script."""
    ap = argparse.ArgumentParser(prog=f"python -m experiments.{module.NAME}",
                                 description=(module.__doc__ or "").split("\n")[0])
    ap.add_argument("--config", default="default", choices=sorted(module.CONFIGS))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="rerun even if the JSON exists")
    ap.add_argument("--plot-only", action="store_true", help="only re-render from the JSON")
    a = ap.parse_args(argv)
    return run_experiment(module, config=a.config, out=a.out, force=a.force,
                          plot_only=a.plot_only)
