"""Every registered unlearning method against retraining, in the papers' table format, tuned.

Command: ``python -m experiments.compare_methods`` (default: a few minutes on 2 CPU cores);
``--config tune`` reruns the tuning grids (about 10 minutes) and rewrites the cache
``unlearn/tuned_hparams.json``; ``--config smoke``: digits/MLP, 3 epochs, under a minute;
``--config deep``: the CNN on mnist5k (real MNIST digits; slow on CPU, ~20 min).

Settings: scikit-learn digits with an MLP (64) (3 seeds), softmax regression on digits
trained to the optimum in float64 (the convex setting, where ``newton`` and ``certified`` run;
untuned, 1 seed) and ``mnist5k`` (5 000 real MNIST digits) with
an MLP (256) trained 40 epochs without weight decay — it overfits (train 100 %, test ≈ 94 %),
so membership inference can tell the original model from a retrained one. Forget requests:
a random 10 % and a whole class (class 0) — the two scenarios of Jia et al. 2023 and Fan et
al. 2024. Every registered method runs (convex-only ones are skipped on these non-convex
models), plus ``original`` (do nothing), and every tuned method also with its constructor
defaults (``<name> (default)``) so the table shows Avg. Gap before and after tuning.

Metrics (``unlearn.evaluate``): UA, RA, TA, MIA-efficacy (the SVC attack of Song & Mittal as
in Jia et al.), Avg. Gap to retrain over those four, RTE (seconds); plus the MIA-efficacy an
exact unlearner should get (``MIA-expected``: the attack's non-member rate on held-out test
examples), the loss-threshold MIA AUC and the relearn time (Adam steps on the forget set
until its accuracy is back to the original model's). Hyperparameters: the values chosen by
the tuning protocol (``unlearn.evaluate.tune``: a small grid per method on a validation forget set
disjoint from the reported one, chosen by Avg. Gap), cached in ``unlearn/tuned_hparams.json``.
Output: a Markdown table (mean ± std over seeds; JSON ``table``), the tuning grids
(JSON ``tuning``), and a figure with one panel per setting: Avg. Gap vs RTE per method, the
untuned point joined to the tuned one, every point labelled directly.
"""

from __future__ import annotations

import json
import sys
import time

import jax

from experiments import plotting, runner
from unlearn import data, methods, models
from unlearn import evaluate as ev
from unlearn import mia as mia_lib
from unlearn.train import Problem, TrainConfig, train

NAME = "compare_methods"
_DIGITS = dict(dataset="digits", model="mlp", model_kwargs={"hidden": (64,)}, epochs=20,
               lr=1e-3, batch_size=64, l2=1e-4, seeds=(0, 1, 2))
_MNIST5K = dict(dataset="mnist5k", model="mlp", model_kwargs={"hidden": (256,)}, epochs=40,
                lr=1e-3, batch_size=64, l2=0.0, seeds=(0,))
_MNIST5K_CNN = dict(dataset="mnist5k", model="cnn",
                    model_kwargs={"features": (16, 32), "dense": 64}, epochs=8, lr=2e-3,
                    batch_size=64, l2=1e-4, seeds=(0,))
# The convex setting of Guo et al. / Koh & Liang: softmax regression trained by L-BFGS to
# ‖∇L‖ ≤ 1e-8 in float64, so the oracle is the exact optimum and the second-order methods
# (convex-only) run too; SISA (minibatch SGD shards) is left out. Not tuned (constructor
# defaults), one seed.
_DIGITS_CONVEX = dict(dataset="digits", model="logreg", model_kwargs={}, solver="lbfgs",
                      l2=1e-3, tol=1e-8, max_iter=5000, dtype="float64", epochs=20, lr=1e-3,
                      batch_size=64, skip=("sisa",), seeds=(0,))
_FORGETS = (("random", 0.1), ("class", 0))
CONFIGS = {
    "default": dict(settings=(_DIGITS, _MNIST5K, _DIGITS_CONVEX), forgets=_FORGETS,
                    methods=None, tune=False),
    "tune": dict(settings=(_DIGITS, _MNIST5K), forgets=_FORGETS, methods=None, tune=True),
    "smoke": dict(settings=({**_DIGITS, "epochs": 3, "seeds": (0,)},),
                  forgets=(("random", 0.1),), methods=None, tune=False),
    "deep": dict(settings=(_MNIST5K_CNN,), forgets=_FORGETS, methods=None, tune=True),
}
SHOW = ("UA", "RA", "TA", "MIA-efficacy", "avg_gap", "RTE")
HEADER = ("UA", "RA", "TA", "MIA-efficacy", "Avg. Gap", "RTE (s)")
HEADLINES = {
    "settings": ("results.results.*.setting", "exact"),
    "forget_counts": ("results.results.*.forget_count", "exact"),
    # TA and Avg. Gap are in %; "seeds" holds a mean to its across-seed sampling error (some
    # float32 methods' outcomes differ from CPU to CPU: see runner._seed_means_agree).
    "TA": ("results.results.*.summary.*.TA", "seeds"),
    "avg_gap": ("results.results.*.summary.*.avg_gap", "seeds"),
}


def setting_label(dataset: str, model: str, kind: str, arg) -> str:
    """The key of a setting in tables and in the tuning cache."""
    return f"{dataset}/{model} " + (f"class {arg}" if kind == "class" else
                                   f"random {float(arg):.0%}")


def _forget_ids(ds, kind: str, arg, seed: int):
    if kind == "class":
        return data.select_forget(ds, kind="class", cls=int(arg))
    return data.select_forget(ds, kind="random", fraction=float(arg), seed=seed)


def _names(names, convex: bool, skip=()) -> tuple[list, list]:
    # the language-model methods (tokens_only) have their own experiment (llm_unlearning)
    names = [n for n in (names or methods.REGISTRY) if n != "retrain"
             and not methods.REGISTRY[n].tokens_only]
    use = [n for n in names if (convex or not methods.REGISTRY[n].convex_only)
           and n not in skip]
    return use, [n for n in names if n not in use]


def mia_expected_extra(*, result, problem, split, forget_ids, **_) -> dict:
    """``extras=`` hook: MIA-efficacy an exact unlearner should get (held-out test rate)."""
    retain = problem.train.without(forget_ids)
    return {"MIA-expected": mia_lib.mia_efficacy_expected(result.logits, retain, split.test)}


def run(*, settings, forgets, methods=None, tune: bool = False) -> dict:
    """Per setting × seed: train θ* once; per forget request: every method (tuned values, and
    constructor defaults for the tuned ones), ``original`` and retrain. With ``tune``, first the
    tuning grids on a validation forget set (seed 0), written to ``unlearn/tuned_hparams.json``.
    """
    cache = ev.load_tuned()
    out, tuning = [], {}
    for st in settings:
        st = dict(st)
        with jax.enable_x64(st.get("dtype") == "float64" or jax.config.jax_enable_x64):
            per_forget = _run_setting(st, forgets, methods, tune, cache, tuning)
        for slot in per_forget.values():
            slot["summary"] = ev.mean_std_over_seeds(slot["per_seed"])
            out.append(slot)
    if tune:
        merged = {**cache, **tuning}
        ev.TUNED_PATH.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    used = tuning or {r["setting"]: cache.get(r["setting"], {}) for r in out}
    return {"results": out, "table": table(out), "tuning": used,
            "tuning_table": tuning_table(out, used)}


def _run_setting(st: dict, forgets, methods, tune: bool, cache: dict, tuning: dict) -> dict:
    """One setting over its seeds (the model object is built once, so every seed and request
    reuses the compiled programs)."""
    mname, mkw, dataset = st.pop("model"), st.pop("model_kwargs", {}), st.pop("dataset")
    seeds, skip = st.pop("seeds"), st.pop("skip", ())
    model = None
    per_forget: dict = {}
    for seed in seeds:
        split = data.load(dataset, seed=seed)
        if model is None:
            model = models.make(mname, split.train.num_classes, **mkw)
        problem = Problem(model, split.train, TrainConfig(**st), jax.random.key(seed))
        trained = train(problem)
        names, skipped = _names(methods, model.convex, skip)
        for kind, arg in forgets:
            label = setting_label(dataset, mname, kind, arg)
            t0 = time.perf_counter()
            ids = _forget_ids(problem.train, kind, arg, seed)
            if tune and seed == seeds[0]:
                val = ev.validation_forget(problem.train, kind, arg, seed, ids)
                tuning[label] = ev.tune(problem, split, val, names,
                                        jax.random.key(seed + 2000), trained=trained)
                tuning[label]["_validation_forget_count"] = int(len(val))
                print(f"[{NAME}] {label}: tuned in {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr)
            chosen = {m: v["chosen"] for m, v in
                      (tuning.get(label) or cache.get(label, {})).items()
                      if not m.startswith("_")}
            ms = {n: methods_get(n, chosen.get(n, {})) for n in names}
            ms.update({f"{n} (default)": methods_get(n, {}) for n in names
                       if n in chosen})
            ms["original"] = ev.do_nothing()
            res = ev.evaluate(problem, split, ids, ms, jax.random.key(seed + 1000),
                              trained=trained,
                              extras=[ev.mia_extra, mia_expected_extra, ev.relearn_extra],
                              hparams=None)
            slot = per_forget.setdefault(label, {"setting": label, "per_seed": [],
                                                 "skipped": skipped, "wall_s": 0.0,
                                                 "hparams": chosen})
            slot["per_seed"].append(res["rows"])
            slot["forget_count"] = int(len(ids))
            slot["wall_s"] += time.perf_counter() - t0
            print(f"[{NAME}] {label} seed {seed}: {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
    return per_forget


def methods_get(name: str, hp: dict):
    """A registered method with hyperparameters ``hp``."""
    return methods.get(name, **hp)


def _cell(row: dict, k: str) -> str:
    if k not in row:
        return "—"
    m, s = row[k]["mean"], row[k]["std"]
    if k == "RTE":
        return f"{m:.3g}"
    return f"{m:.2f} ± {s:.2f}" if row[k]["n"] > 1 else f"{m:.2f}"


def table(results: list[dict], show=SHOW) -> str:
    """The papers' table (Jia et al. 2023, Table 3): a row per (setting, method), in percent,
    mean ± std over seeds; Avg. Gap to retrain over UA, RA, TA, MIA-efficacy."""
    lines = ["| setting | method | " + " | ".join(HEADER) + " |",
             "|---" * (len(show) + 2) + "|"]
    for r in results:
        for name, row in r["summary"].items():
            if "failed" in row:
                reason = str(row["failed"]).replace("|", "/").splitlines()[0][:80]
                lines.append(f"| {r['setting']} | {name} | failed: {reason} |"
                             + " |" * (len(show) - 1))
                continue
            lines.append(f"| {r['setting']} | {name} | "
                         + " | ".join(_cell(row, k) for k in show) + " |")
    return "\n".join(lines)


def tuning_table(results: list[dict], tuning: dict) -> str:
    """Avg. Gap before (constructor defaults) and after tuning, per setting and method, on the
    reported forget set; the chosen hyperparameters and the grid size."""
    lines = ["| setting | method | Avg. Gap default | Avg. Gap tuned | chosen | grid points |",
             "|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        for name, t in tuning.get(r["setting"], {}).items():
            if name.startswith("_") or name not in s or f"{name} (default)" not in s:
                continue
            a, b = s[f"{name} (default)"], s[name]
            if "failed" in a or "failed" in b:
                continue
            hp = ", ".join(f"{k}={v:.3g}" for k, v in t["chosen"].items())
            lines.append(f"| {r['setting']} | {name} | {a['avg_gap']['mean']:.2f} | "
                         f"{b['avg_gap']['mean']:.2f} | {hp} | {len(t['grid'])} |")
    return "\n".join(lines)


def plot(payload: dict, outdir) -> list:
    """One panel per setting: Avg. Gap (y) vs RTE (x, log) for every method, labelled at the
    point; a grey segment joins a method's untuned point (hollow) to its tuned one."""
    res = payload["results"]
    print(res["table"], file=sys.stdout)
    print(res.get("tuning_table", ""), file=sys.stdout)
    panels = res["results"]
    with plotting.style() as plt:
        ncol = min(2, len(panels))
        nrow = (len(panels) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.2 * nrow), squeeze=False)
        for ax, r in zip(axes.flat, panels, strict=False):
            s = r["summary"]
            pts = []
            for name, row in s.items():
                if "failed" in row or name.endswith("(default)"):
                    continue
                st = plotting.method_style(name)
                x, y = max(row["RTE"]["mean"], 1e-4), row["avg_gap"]["mean"]
                d = s.get(f"{name} (default)")
                if d and "failed" not in d:
                    xd, yd = max(d["RTE"]["mean"], 1e-4), d["avg_gap"]["mean"]
                    ax.plot([xd, x], [yd, y], color="0.7", lw=0.8, zorder=1)
                    ax.scatter([xd], [yd], facecolors="none", edgecolors=st["color"],
                               marker=st["marker"], s=30, zorder=2)
                ax.scatter([x], [y], color=st["color"], marker=st["marker"], s=40, zorder=3)
                pts.append((name, x, y, st["color"]))
            ax.set_xscale("log")
            _direct_labels(ax, pts)
            ax.set_title(f"{r['setting']} (|U| = {r['forget_count']})", fontsize=9)
            ax.set_xlabel("RTE: unlearning wall time (s, log)")
            ax.set_ylabel("Avg. Gap to retrain (pp, lower is better)")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle("Tuned unlearning methods vs retraining (hollow: constructor defaults)")
        fig.tight_layout()
        return plotting.savefig(fig, f"{outdir}/{NAME}.png")


def _direct_labels(ax, pts: list) -> None:
    """Label each point with its method name, labels pushed apart vertically (in axes
    fractions) so that close points stay readable; a thin line joins a moved label to its
    point."""
    ax.figure.canvas.draw()
    to_axes = ax.transAxes.inverted()
    placed: list[tuple[float, float]] = []
    for name, x, y, color in sorted(pts, key=lambda p: p[2]):
        fx, fy = to_axes.transform(ax.transData.transform((x, y)))
        ly = fy + 0.02
        for px, py in sorted(placed, key=lambda p: p[1]):
            if abs(px - fx) < 0.22 and abs(py - ly) < 0.05:
                ly = py + 0.05
        placed.append((fx, ly))
        moved = abs(ly - fy) > 0.04
        ax.annotate(name, (x, y), xytext=(fx + 0.02, ly), textcoords="axes fraction",
                    fontsize=7, color=color, va="center",
                    arrowprops=dict(arrowstyle="-", color=color, lw=0.5, alpha=0.6)
                    if moved else None)


if __name__ == "__main__":
    runner.main(sys.modules[__name__])
