"""Retraining vs fine-tuning after forgetting a random 1% of digits (the seed blog's table).

Command: ``python -m experiments.forget_basic`` (about 30 s on 2 CPU cores; smoke: 10 s).

An MLP is trained on scikit-learn's digits; a random 1% of the training set is forgotten by
exact retraining and by fine-tuning on the retained data. Table: accuracy on retain / forget /
test, KL to the retrained model, relative parameter distance, time and speed-up; mean ± std
over seeds. Figure: ``paper_figures/forget_basic.png``.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from experiments import plotting, runner
from unlearn import data
from unlearn.evaluate import default_problem, evaluate

NAME = "forget_basic"
CONFIGS = {
    "default": dict(dataset="digits", model="mlp", methods=("finetune",), fraction=0.01,
                    seeds=(0, 1, 2), epochs=20, lr=1e-3, batch_size=64, l2=1e-4),
    "smoke": dict(dataset="digits", model="mlp", methods=("finetune",), fraction=0.01,
                  seeds=(0,), epochs=3, lr=1e-3, batch_size=64, l2=1e-4),
    # For users who have prepared the TFDS sets (`tfds build mnist` etc.); not run in CI.
    **{f"tfds_{n}": dict(dataset=n, model="mlp", methods=("finetune",), fraction=0.01,
                         seeds=(0,), epochs=10, lr=1e-3, batch_size=128, l2=1e-4)
       for n in ("mnist", "fashion_mnist", "cifar10")},
}
# Accuracies of float32-trained MLPs (absolute 0.01: a prediction may flip across CPUs); the
# KL between them with the float32 relative tolerance; the forget-set ids exactly.
HEADLINES = {
    "retrain_test_acc": ("results.summary.retrain.test_acc.mean", "accuracy"),
    "finetune_test_acc": ("results.summary.finetune.test_acc.mean", "accuracy"),
    "finetune_forget_acc": ("results.summary.finetune.forget_acc.mean", "accuracy"),
    "finetune_kl_test": ("results.summary.finetune.kl_test.mean", "float32"),
    "forget_ids": ("results.forget_ids", "exact"),
}
SHOW = ("retain_acc", "forget_acc", "test_acc", "kl_test", "rel_distance", "time", "speedup")


def run(*, dataset, model, methods, fraction, seeds, epochs, lr, batch_size, l2,
        progress=None) -> dict:
    """Per seed: train, forget a random ``fraction``, evaluate every method vs retrain."""
    progress = progress or runner.no_progress
    per_seed, forget_ids = [], []
    for seed in seeds:
        progress(f"seed {seed}: train, forget, evaluate")
        problem, split = default_problem(dataset, model, seed=seed, epochs=epochs, lr=lr,
                                         batch_size=batch_size, l2=l2)
        ids = data.select_forget(problem.train, kind="random", fraction=fraction, seed=seed)
        forget_ids.append(ids.tolist())
        out = evaluate(problem, split, ids, list(methods), jax.random.key(seed + 1000))
        per_seed.append(out["rows"])
    return {"per_seed": per_seed, "summary": summarize(per_seed), "forget_ids": forget_ids}


def summarize(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of every numeric metric, per method."""
    out: dict = {}
    for name in per_seed[0]:
        rows = [r[name] for r in per_seed if "failed" not in r.get(name, {"failed": 1})]
        if not rows:
            out[name] = {"failed": per_seed[0][name].get("failed", "failed")}
            continue
        keys = [k for k, v in rows[0].items() if isinstance(v, int | float)]
        out[name] = {k: {"mean": float(np.nanmean([r[k] for r in rows if r.get(k) is not None])),
                         "std": float(np.nanstd([r[k] for r in rows if r.get(k) is not None]))}
                     for k in keys}
    return out


def table(summary: dict, show=SHOW) -> str:
    """A Markdown table of mean ± std per method."""
    lines = ["| method | " + " | ".join(show) + " |", "|---" * (len(show) + 1) + "|"]
    for name, row in summary.items():
        if "failed" in row:
            lines.append(f"| {name} | failed: {row['failed']} |")
            continue
        cells = [f"{row[k]['mean']:.4g} ± {row[k]['std']:.2g}" if k in row else "—"
                 for k in show]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(payload: dict, outdir) -> list:
    """Bars of retain/forget/test accuracy per method, and time per method."""
    summary = payload["results"]["summary"]
    print(table(summary), file=sys.stdout)
    names = [n for n in summary if "failed" not in summary[n]]
    with plotting.style() as plt:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3), gridspec_kw={"width_ratios": [2, 1]})
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            st = plotting.method_style(n)
            ks = ("retain_acc", "forget_acc", "test_acc")
            a1.bar(np.arange(3) + i * width, [summary[n][k]["mean"] for k in ks], width,
                   yerr=[summary[n][k]["std"] for k in ks], color=st["color"], label=n)
            a2.bar(i, summary[n]["time"]["mean"], yerr=summary[n]["time"]["std"],
                   color=st["color"])
        a1.set_xticks(np.arange(3) + 0.4 - width / 2, ["retain", "forget", "test"])
        a1.set_ylabel("accuracy")
        lowest = min(summary[n][k]["mean"] for n in names for k in ks)
        a1.set_ylim(min(0.8, lowest - 0.05), 1.005)
        a1.legend()
        a2.set_xticks(range(len(names)), names)
        a2.set_ylabel("wall time (s)")
        cfg = payload["config"]
        fig.suptitle(f"Forgetting {cfg['fraction']:.0%} of {cfg['dataset']} ({cfg['model']})")
        return plotting.savefig(fig, f"{outdir}/{NAME}.png")


if __name__ == "__main__":
    runner.main(sys.modules[__name__])
