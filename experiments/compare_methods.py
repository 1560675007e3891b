"""Every registered unlearning method against retraining, with membership inference.

Command: ``python -m experiments.compare_methods`` (default: about 6 minutes on 2 CPU cores;
``--config smoke``: digits/MLP only, 1–2 minutes, almost all of it XLA compilation).

Settings: scikit-learn digits with an MLP, MNIST-1D with a small CNN (features (16, 32),
dense 64), and digits with softmax regression trained by L-BFGS in float64 (the convex setting,
where the oracle is the exact optimum and the convex-only second-order methods such as
``newton`` run too; SISA, which trains SGD shards, is skipped there); forget requests: a random
1 %, a random 10 % and a whole class (class 0). Every method in ``unlearn.methods.REGISTRY``
runs (methods marked convex-only are skipped on the non-convex models), each evaluated by
``unlearn.evaluate.evaluate`` with the MIA extra (loss-threshold AUC and the NeurIPS 2023
kit's logistic attack, forget vs test). A method that
raises or returns NaN params is reported as failed in the table. Output: a Markdown table
(mean ± std over seeds; also stored in the JSON under ``table``) and a figure: wall time (log
axis) vs Avg. Gap to retrain, and MIA AUC per method.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from unlearn import data, methods, models, plotting, runner
from unlearn.evaluate import evaluate, mean_std_over_seeds, mia_extra
from unlearn.train import Problem, TrainConfig, train

NAME = "compare_methods"
_DIGITS = dict(dataset="digits", model="mlp", model_kwargs={"hidden": (64,)}, epochs=20,
               lr=1e-3, batch_size=64, l2=1e-4)
_MNIST1D = dict(dataset="mnist1d", model="cnn",
                model_kwargs={"features": (16, 32), "dense": 64}, epochs=10, lr=2e-3,
                batch_size=64, l2=1e-4)
# The convex setting of Guo et al. / Koh & Liang: softmax regression trained by L-BFGS to
# ‖∇L‖ ≤ 1e-8 in float64, so the oracle is the exact optimum and the second-order methods
# (convex-only) run too. SISA trains minibatch SGD shards, so it is left out here.
_DIGITS_CONVEX = dict(dataset="digits", model="logreg", model_kwargs={}, solver="lbfgs",
                      l2=1e-3, tol=1e-8, max_iter=5000, dtype="float64", epochs=20, lr=1e-3,
                      batch_size=64, skip=("sisa",))
_FORGETS = (("random", 0.01), ("random", 0.1), ("class", 0))
CONFIGS = {
    "default": dict(settings=(_DIGITS, _MNIST1D, _DIGITS_CONVEX), forgets=_FORGETS,
                    seeds=(0, 1), methods=None),
    "convex": dict(settings=(_DIGITS_CONVEX,), forgets=_FORGETS, seeds=(0, 1), methods=None),
    "smoke": dict(settings=({**_DIGITS, "epochs": 3},), forgets=(("random", 0.1),),
                  seeds=(0,), methods=None),
    # For users who have prepared the TFDS sets (`tfds build mnist` etc.); not run in CI.
    **{f"tfds_{n}": dict(settings=({**_MNIST1D, "dataset": n, "epochs": 5,
                                    "model_kwargs": {"features": (32, 64), "dense": 128}},),
                         forgets=_FORGETS, seeds=(0,), methods=None)
       for n in ("mnist", "fashion_mnist", "cifar10")},
}
SHOW = ("retain_acc", "forget_acc", "test_acc", "mia_auc", "mia_kit_auc", "avg_gap", "time")


def _forget_ids(ds, kind: str, arg, seed: int):
    if kind == "class":
        return data.select_forget(ds, kind="class", cls=int(arg))
    return data.select_forget(ds, kind="random", fraction=float(arg), seed=seed)


def _methods(names, convex: bool, skip=()) -> tuple[dict, list]:
    names = [n for n in (names or methods.REGISTRY) if n != "retrain"]
    use = {n: methods.get(n) for n in names
           if (convex or not methods.REGISTRY[n].convex_only) and n not in skip}
    return use, [n for n in names if n not in use]


def run(*, settings, forgets, seeds, methods=None) -> dict:
    """Per setting × seed: train θ* once; per forget request: every method vs retrain.

    The model object is built once per setting, so every seed and request reuses the compiled
    steps (a new model would be a new ``apply`` and a recompile).
    """
    out = []
    for st in settings:
        st = dict(st)
        name = f"{st['dataset']}/{st['model']}"
        mname, mkw, dataset = st.pop("model"), st.pop("model_kwargs", {}), st.pop("dataset")
        skip = st.pop("skip", ())
        model = None
        per_forget: dict = {}
        with jax.enable_x64(st.get("dtype") == "float64" or jax.config.jax_enable_x64):
            for seed in seeds:
                split = data.load(dataset, seed=seed)
                if model is None:
                    model = models.make(mname, split.train.num_classes, **mkw)
                problem = Problem(model, split.train, TrainConfig(**st), jax.random.key(seed))
                trained = train(problem)
                use, skipped = _methods(methods, model.convex, skip)
                for kind, arg in forgets:
                    label = f"{name} {kind} {arg if kind == 'class' else f'{float(arg):.0%}'}"
                    t0 = time.perf_counter()
                    ids = _forget_ids(problem.train, kind, arg, seed)
                    res = evaluate(problem, split, ids, use, jax.random.key(seed + 1000),
                                   trained=trained, extras=[mia_extra])
                    slot = per_forget.setdefault(label, {"setting": label, "per_seed": [],
                                                         "skipped": skipped, "wall_s": 0.0})
                    slot["per_seed"].append(res["rows"])
                    slot["forget_count"] = int(len(ids))
                    slot["wall_s"] += time.perf_counter() - t0
                    print(f"[{NAME}] {label} seed {seed}: {time.perf_counter() - t0:.1f} s",
                          file=sys.stderr)
        for slot in per_forget.values():
            slot["summary"] = mean_std_over_seeds(slot["per_seed"])
            out.append(slot)
    return {"results": out, "table": table(out)}


def _cell(row: dict, k: str) -> str:
    if k not in row:
        return "—"
    m, s = row[k]["mean"], row[k]["std"]
    return f"{m:.3g} ± {s:.2g}" if k == "time" else f"{m:.3f} ± {s:.3f}"


def table(results: list[dict], show=SHOW) -> str:
    """One Markdown table: a row per (setting, method), mean ± std over seeds."""
    lines = ["| setting | method | " + " | ".join(show) + " |",
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


def plot(payload: dict, outdir) -> list:
    """Left: time (log) vs Avg. Gap per method and setting; right: MIA AUC per method (mean
    ± std over the random-forgetting settings, where retraining gives ≈ 0.5)."""
    res = payload["results"]
    print(res["table"], file=sys.stdout)
    names = list(dict.fromkeys(n for r in res["results"] for n in r["summary"]))
    with plotting.style() as plt:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        for n in names:
            st = plotting.method_style(n)
            rows = [r["summary"][n] for r in res["results"]
                    if "failed" not in r["summary"].get(n, {"failed": 1})]
            if not rows:
                continue
            t = [max(r["time"]["mean"], 1e-4) for r in rows]
            a1.scatter(t, [r["avg_gap"]["mean"] for r in rows], marker=st["marker"],
                       color=st["color"], label=n, s=40)
            auc = [r["summary"][n]["mia_auc"]["mean"] for r in res["results"]
                   if " random " in r["setting"]
                   and "failed" not in r["summary"].get(n, {"failed": 1})] or [np.nan]
            i = names.index(n)
            a2.bar(i, np.mean(auc), yerr=np.std(auc), color=st["color"])
        a1.set_xscale("log")
        a1.set_xlabel("unlearning wall time (s, log)")
        a1.set_ylabel("Avg. Gap to retrain (lower is better)")
        a1.legend(fontsize=7, ncol=2)
        a2.axhline(0.5, color="k", lw=0.8, ls="--")
        a2.set_xticks(range(len(names)), names, rotation=45, ha="right")
        a2.set_ylabel("MIA AUC, loss threshold\n(mean over random-forget settings)")
        fig.suptitle("Unlearning methods vs retraining: "
                     + ", ".join(sorted({r["setting"].split(" ")[0] for r in res["results"]})))
        return plotting.savefig(fig, f"{outdir}/{NAME}.png")


if __name__ == "__main__":
    runner.main(sys.modules[__name__])
