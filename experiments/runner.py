"""The shared driver of every experiment script: ``run`` -> JSON, ``plot`` -> figures, and the
headline-number check that ``python -m experiments.reproduce`` reports.

An experiment module defines ``NAME``, ``CONFIGS`` (``{"default": {...}, "smoke": {...}}``, each
a dict of ``run``'s keyword arguments), ``run(**cfg) -> dict`` (expensive, JSON-able; it may take
a ``progress`` callback, called with a short description at each step), ``plot(payload, outdir)
-> list[Path]`` (reads only) and ``HEADLINES``: ``{name: (path, kind)}``, the numbers a rerun
must reproduce. ``path`` walks the JSON payload (``results.pearson.exact``; ``*`` maps over a
list's items or a dict's values in key order); ``kind`` picks the tolerance (:data:`TOLERANCES`).
``main(module)`` gives each script the same command line::

    python -m experiments.NAME [--config smoke] [--plot-only] [--force] [--out paper_figures]
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from unlearn import results, runtime

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "paper_figures"


def _seed_means_agree(a: dict, b: dict) -> bool:
    """Two ``{"mean", "std", "n"}`` summaries (``evaluate.mean_std_over_seeds``) agree.

    Why this width: a float32 unlearning method that alternates ascent and descent (SCRUB's
    max/min steps, fine-tuning on a forget set) amplifies summation-order differences between
    CPUs until a seed's outcome changes (measured: SCRUB, digits class 0, seed 0, UA 100 % on
    one host and 6 % on another, same code and config). Such a seed is a fresh draw from the
    method's outcome distribution, so two runs' means can only be held to their sampling error,
    which the across-seed spread estimates: ``|Δmean| ≤ 3 √(s_a²/n_a + s_b²/n_b)``.
    """
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return a is None and b is None  # a metric absent from both payloads agrees
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return abs(a["mean"] - b["mean"]) <= max(1.0, 3.0 * se)


# kind -> (description, comparison). Widths: float64 optimisations converge to ‖∇L‖ ≤ 1e-10
# and agree across machines to ~1e-9 relative (9th–15th digit measured), so 1e-6 is tight yet
# safe; float32 SGD sums in an order the CPU's vectoriser picks, and a float32-trained net's
# accuracy can flip a prediction or two across machines (1 in 450 test images is 0.0022);
# wall times on a shared machine vary severalfold.
TOLERANCES: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "exact": ("equal (counts, ids, settings)", lambda a, b: a == b),
    "float64": ("relative 1e-6 (float64 optimisation to the optimum)",
                lambda a, b: abs(a - b) <= 1e-6 * max(abs(a), abs(b)) + 1e-12),
    "float32": ("relative 1e-3 (float32 SGD training; summation order differs across CPUs)",
                lambda a, b: abs(a - b) <= 1e-3 * max(abs(a), abs(b)) + 1e-6),
    "accuracy": ("absolute 0.01 (accuracy of a float32-trained net: a few predictions may "
                 "flip across machines)", lambda a, b: abs(a - b) <= 0.01),
    "correlation": ("absolute 0.02 (a correlation coefficient from non-convex float64 training, "
                    "whose iterates amplify summation-order differences across CPUs)",
                    lambda a, b: abs(a - b) <= 0.02),
    "timing": ("within a factor of 5 (wall time on a shared machine)",
               lambda a, b: a > 0 and b > 0 and max(a / b, b / a) <= 5.0),
    "seeds": ("means over seeds (values in %) within 3 standard errors of their difference, "
              "from both runs' across-seed spread, and at least 1 percentage point (the "
              "'accuracy' width); a single-seed setting gets the 1-point width only",
              _seed_means_agree),
}


def no_progress(_: str) -> None:
    """The default ``progress`` callback of an experiment's ``run``: does nothing."""


def data_path(module: ModuleType, config: str, out: Path) -> Path:
    """Where an experiment's JSON lives: ``out/data/NAME[-config].json``."""
    suffix = "" if config == "default" else f"-{config}"
    return out / "data" / f"{module.NAME}{suffix}.json"


def figure_dir(config: str, out: Path) -> Path:
    """Where an experiment's figures go: ``out`` (default config) or ``out/<config>``."""
    return out if config == "default" else out / config


def run_experiment(module: ModuleType, *, config: str = "default", out: Path = DEFAULT_OUT,
                   force: bool = False, plot_only: bool = False,
                   progress: Callable[[str], None] | None = None,
                   log: Callable[[str], None] | None = None, **overrides) -> Path:
    """Run (unless its JSON exists and not ``force``) and plot one experiment.

    ``progress`` is passed to ``module.run`` when it accepts one; ``log`` receives the lines
    this function would print to stderr. JAX's persistent compilation cache is switched on
    first (:func:`unlearn.runtime.compile_cache`; ``UNLEARN_JAX_CACHE=off`` keeps it off):
    a second run of an experiment reuses the compiled programs of the first. (``scaling``
    times its methods in worker processes of its own, which do not inherit it.)
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    runtime.compile_cache()  # compiled programs persist between runs (UNLEARN_JAX_CACHE=off)
    if config not in module.CONFIGS:
        raise ValueError(f"config={config!r}: {module.NAME} has {sorted(module.CONFIGS)}.")
    cfg = {**module.CONFIGS[config], **overrides}
    path = data_path(module, config, Path(out))
    if plot_only and not path.exists():
        raise FileNotFoundError(f"--plot-only needs {path}; run without --plot-only first.")
    if not plot_only and (force or not path.exists()):
        t0 = time.perf_counter()
        kwargs = dict(cfg)
        if progress is not None and "progress" in inspect.signature(module.run).parameters:
            kwargs["progress"] = progress
        res = module.run(**kwargs)
        log(f"[{module.NAME}] ran in {time.perf_counter() - t0:.1f} s")
        results.write(path, res, config={"experiment": module.NAME, "config": config, **cfg},
                      seed=cfg.get("seed", 0), timings=False)
    elif not plot_only:
        log(f"[{module.NAME}] {path} exists; skipping the run (use --force).")
    for p in module.plot(results.read(path), figure_dir(config, Path(out))):
        log(f"[{module.NAME}] wrote {p}")
    return path


# ----------------------------------------------------------------------------- headlines


def get_path(obj: Any, path: str) -> Any:
    """Follow a dotted ``path`` into nested dicts/lists; ``*`` maps over all items (dict values
    in sorted key order); integer segments index lists. A missing key gives ``None``."""
    parts = path.split(".")

    def walk(o, i):
        if i == len(parts):
            return o
        key = parts[i]
        if key == "*":
            items = [o[k] for k in sorted(o)] if isinstance(o, dict) else list(o or [])
            return [walk(v, i + 1) for v in items]
        if isinstance(o, list):
            return walk(o[int(key)], i + 1) if key.lstrip("-").isdigit() else None
        if isinstance(o, dict):
            return walk(o.get(key), i + 1) if key in o else None
        return None

    return walk(obj, 0)


def headline_spec(module: ModuleType, fallback: dict | None = None) -> dict[str, tuple[str, str]]:
    """``module.HEADLINES`` (or ``fallback`` for a module without one); kinds validated."""
    spec = getattr(module, "HEADLINES", None) or fallback or {}
    for name, (path, kind) in spec.items():
        if "[" in path or "]" in path:
            raise ValueError(f"{module.NAME}.HEADLINES[{name!r}] path {path!r}: use dots and "
                             "'*' (e.g. 'results.points.*.actual'), not brackets.")
        if kind not in TOLERANCES:
            raise ValueError(f"{module.NAME}.HEADLINES[{name!r}] has kind {kind!r}; choose one "
                             f"of {sorted(TOLERANCES)}.")
    return spec


def _leaves(v: Any) -> list:
    if isinstance(v, list):
        return [x for item in v for x in _leaves(item)]
    return [v]


def _close(kind: str, a: Any, b: Any) -> bool:
    if kind == "seeds":
        return TOLERANCES[kind][1](a, b)
    if a is None or b is None or isinstance(a, str | bool) or isinstance(b, str | bool):
        return a == b
    if kind == "exact":
        return a == b
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return TOLERANCES[kind][1](a, b)


class Check(NamedTuple):
    """One headline number of a run against its reference."""

    experiment: str
    name: str
    kind: str
    value: Any
    reference: Any
    ok: bool
    detail: str


def _summary(v: Any) -> str:
    leaves = _leaves(v)
    if len(leaves) == 1:
        x = leaves[0]
        if isinstance(x, dict) and {"mean", "std", "n"} <= set(x):
            return f"{x['mean']:.4g} ± {x['std']:.2g} (n={x['n']})"
        return f"{x:.10g}" if isinstance(x, float) else repr(x)
    return f"{len(leaves)} values"


def check(experiment: str, spec: dict[str, tuple[str, str]], run: dict,
          reference: dict | None) -> list[Check]:
    """Compare each headline of ``run`` (a results payload) with ``reference``.

    Lists are compared element by element (same length required); the first mismatch is named.
    """
    out = []
    for name, (path, kind) in spec.items():
        value = get_path(run, path)
        if reference is None:
            out.append(Check(experiment, name, kind, value, None, False, "no reference JSON"))
            continue
        ref = get_path(reference, path)
        a, b = _leaves(value), _leaves(ref)
        if value is None and ref is None:
            ok, detail = False, f"path {path!r} is in neither payload"
        elif len(a) != len(b):
            ok, detail = False, f"{len(a)} values vs {len(b)} in the reference"
        else:
            bad = [i for i, (x, y) in enumerate(zip(a, b)) if not _close(kind, x, y)]
            ok = not bad
            detail = "" if ok else (f"item {bad[0]}: {_summary(a[bad[0]])} vs "
                                    f"{_summary(b[bad[0]])}"
                                    + (f" ({len(bad)} of {len(a)} differ)" if len(a) > 1 else ""))
        out.append(Check(experiment, name, kind, value, ref, ok, detail))
    return out


def report(checks: list[Check]) -> str:
    """A plain-text reproduction report ending in "N of M reproduced"."""
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else "FAIL"
        ref = "—" if c.reference is None else _summary(c.reference)
        line = f"{mark} {c.experiment}.{c.name} = {_summary(c.value)} (reference {ref}; {c.kind})"
        if c.detail:
            line += f" — {c.detail}"
        lines.append(line)
    kinds = sorted({c.kind for c in checks})
    lines.append("tolerances: " + "; ".join(f"{k}: {TOLERANCES[k][0]}" for k in kinds))
    n_ok = sum(c.ok for c in checks)
    lines.append(f"{n_ok} of {len(checks)} reproduced")
    return "\n".join(lines)


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
