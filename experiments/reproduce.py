"""Run every experiment and check its headline numbers against the committed reference.

Command: ``python -m experiments.reproduce`` — runs every experiment at its default config into
a fresh run directory ``runs/reproduce-<UTC time>/`` (JSON in ``data/``, figures beside), then
prints a reproduction report: each headline number (``HEADLINES`` of each experiment) against
the reference JSON in ``paper_figures/data/``, with its tolerance kind
(``experiments.runner.TOLERANCES``), and "N of M reproduced". Exit status 1 if any number falls
outside its tolerance or a reference is missing.

Options: ``--update-reference`` (after the run, copy its JSON into ``paper_figures/data/`` and
redraw ``paper_figures/*.png``; the report then compares with the old reference, for
information), ``--plot-only`` (only redraw ``paper_figures/`` from the reference JSON, seconds),
``--smoke`` (tiny configs, compared with ``paper_figures/data/NAME-smoke.json`` where present),
``--only a,b``, ``--run-dir DIR``, ``--reference DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import shutil
import sys
import time
from pathlib import Path

from experiments import runner
from unlearn import results

EXPERIMENTS = ["forget_basic", "influence_loo", "influence_loo_cnn", "certified_removal",
               "sisa_tradeoff", "scaling", "compare_methods", "lds_backends", "llm_unlearning"]
RUNS = Path(__file__).resolve().parent.parent / "runs"

# Headlines of experiments whose modules do not (yet) declare ``HEADLINES`` themselves; the
# owners of those scripts may move these into the modules (a module's own spec wins).
FALLBACK_HEADLINES: dict[str, dict[str, tuple[str, str]]] = {
    "sisa_tradeoff": {
        "settings": ("results.rows.*.S", "exact"),
        "slices": ("results.rows.*.R", "exact"),
        "points_per_request": ("results.rows.*.points_per_request", "exact"),
        "aggregate_test_acc": ("results.rows.*.acc_vote", "accuracy"),
        "hockey_forgotten": ("results.hockey.forgotten", "exact"),
        "hockey_points_retrained": ("results.hockey.points_retrained", "exact"),
        "hockey_max_abs_diff_vs_scratch": ("results.hockey.max_abs_diff_vs_scratch", "exact"),
    },
}


def _spec(module) -> dict[str, tuple[str, str]]:
    """The module's ``HEADLINES``, else the fallback above (validated kinds)."""
    return runner.headline_spec(module, FALLBACK_HEADLINES.get(module.NAME))


def _check(name: str, spec: dict, run: dict, ref: dict | None) -> list[runner.Check]:
    return runner.check(name, spec, run, ref)


def main(argv: list[str] | None = None) -> int:
    """Run, check, report; returns the exit status (0: every headline reproduced)."""
    ap = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny configs (CI)")
    ap.add_argument("--plot-only", action="store_true",
                    help="only redraw the figures from the reference JSON")
    ap.add_argument("--update-reference", action="store_true",
                    help="overwrite the committed reference JSON and figures with this run")
    ap.add_argument("--only", default="", help="comma-separated experiment names")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="where this run writes (default runs/reproduce-<UTC time>)")
    ap.add_argument("--reference", type=Path, default=runner.DEFAULT_OUT,
                    help="directory holding data/NAME.json (default paper_figures)")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or EXPERIMENTS
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        ap.error(f"--only names unknown experiments {unknown}; choose from {EXPERIMENTS}.")
    config = "smoke" if a.smoke else "default"
    modules = {n: importlib.import_module(f"experiments.{n}") for n in names}
    t0 = time.perf_counter()

    if a.plot_only:
        for m in modules.values():
            runner.run_experiment(m, config=config, out=a.reference, plot_only=True)
        print(f"reproduce --plot-only: {len(names)} figure set(s) in "
              f"{time.perf_counter() - t0:.0f} s")
        return 0

    from tqdm.auto import tqdm

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = a.run_dir or RUNS / f"reproduce-{stamp}{'-smoke' if a.smoke else ''}"
    print(f"reproduce: {len(names)} experiment(s), config {config!r}, writing to {run_dir}")
    checks: list[runner.Check] = []
    times = {}
    for i, (n, m) in enumerate(modules.items()):
        t1 = time.perf_counter()
        with tqdm(desc=f"[{i + 1}/{len(names)}] {n}", unit="step", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            def progress(msg: str, bar=bar) -> None:
                bar.set_postfix_str(msg[:60], refresh=False)
                bar.update(1)

            path = runner.run_experiment(m, config=config, out=run_dir, force=True,
                                         progress=progress, log=lambda s: None)
        times[n] = time.perf_counter() - t1
        ref_path = runner.data_path(m, config, a.reference)
        ref = results.read(ref_path) if ref_path.exists() else None
        mine = _check(n, _spec(m), results.read(path), ref)
        checks += mine
        ok = sum(c.ok for c in mine)
        tqdm.write(f"  {n}: {times[n]:.0f} s, {ok} of {len(mine)} headline(s) reproduced",
                   file=sys.stderr)
        if a.update_reference:
            ref_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, ref_path)
            m.plot(results.read(ref_path), runner.figure_dir(config, a.reference))
    total = time.perf_counter() - t0
    print("\nReproduction report (run " + str(run_dir) + " vs reference "
          + str(a.reference / "data") + ")")
    print(runner.report(checks))
    print("time per experiment: " + ", ".join(f"{n} {t:.0f} s" for n, t in times.items()))
    print(f"total time: {total:.0f} s ({total / 60:.1f} min)")
    if a.update_reference:
        print(f"reference updated: {a.reference / 'data'} now holds this run's JSON "
              "(the report above compared with the previous reference).")
        return 0
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
