r"""Language-model unlearning on a seeded fictitious-people benchmark: the TOFU figure and table.

Command: ``python -m experiments.llm_unlearning`` (``--config smoke``: a tiny corpus and model,
well under a minute). The default takes several minutes on 2 CPU cores (see ``TIMING`` in the
results JSON and the module's note in README).

**Benchmark** (:mod:`unlearn.people`, Maini et al. 2024 "TOFU" adapted): persons generated
from a seed with ``facts`` attributes each, one question/answer per fact, an exact paraphrase and
5 perturbed (wrong-attribute) answers per question, world facts (3 perturbed answers) that every
model trains on, forget01/05/10 = the last 1/5/10 % of persons (nested), holdout persons never
trained on (for the membership attacks). Character-level tokenizer; labels on answer + EOS.

**Models.** One decoder transformer (:func:`unlearn.models.transformer`) trained on every
trained person's QA plus the world facts, and — in the SAME engine ensemble — one retain model
per forget split: the same init key and data-order rule with the forget persons' weights at 0.
That is the project's exact retrain oracle (``train.retrain``), so TOFU's "retain model that
must be trained separately" is here the exact oracle of each split, trained in one program.

**Methods.** The language-model methods of :mod:`unlearn.methods` (GradAscent, GradDiff, NPO,
SimNPO, IdkDPO, RMU, UNDIAL: losses and defaults of open-unlearning, run lengths adapted to the
tiny model — see each module), each with ``checkpoint_every`` so the curve shows forget quality
vs model utility over unlearning steps; second-order unlearning of the transformer: influence
unlearning (one damped Gauss–Newton step by CG, 30 curvature products: on the transformer
EK-FAC-preconditioned CG needs more products than plain CG — see ``tests/test_transformer.py``
— its exact-root factors cost V backward passes per token (``samples=1`` makes that one per
sequence), and the rank-50 Nyström sketch's 50 batched
GGN products over the whole corpus ran out of 24 GB here); SISA over
persons (whole persons dealt to shards, :func:`unlearn.sisa.make_layout` with groups; the
aggregate is the shards' mean output); and the reference points ``retrain`` (the oracle itself) and
``original`` (do nothing).

``seconds`` of a method = its ``prepare`` (once per method; SISA trains its shards there,
influence its preconditioner) plus one ``forget``.

**Metrics** (:func:`unlearn.lm_metrics.evaluate_tofu`, definitions of open-unlearning):
forget quality = KS-test p-value of the forget truth ratios vs the oracle's (adaptation: the
truth ratio's "correct" answer is the answer itself, not TOFU's paraphrase — a model trained
from scratch on these QA never sees a paraphrase, so it has no knowledge of the fact in that
wording and the paraphrase-based ratio is uninformative for every model); model utility =
harmonic mean of retain/world probability, ROUGE-L recall and truth ratio (six values — this
corpus has one untouched-knowledge set, TOFU has two); ROUGE-L recall on forget and retain;
PrivLeak from the Min-K% (k = 0.4) AUC vs the oracle's; extraction strength; wall time.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from experiments import plotting, runner
from unlearn import engine, lm_metrics, methods, mia, models, people, train

NAME = "llm_unlearning"

_LOOP = ("grad_ascent", "grad_diff", "npo", "simnpo", "idk_dpo", "rmu", "undial")
_DEFAULT = dict(persons=40, facts=10, world=20, width=64, depth=2, heads=4, epochs=100,
                lr=3e-3, batch_size=16, splits=("forget01", "forget05", "forget10"),
                methods=_LOOP + ("influence", "sisa"), unlearn_epochs=10, checkpoints=4,
                method_options={"influence": {"backend": "cg", "damping": 1e-2,
                                              "maxiter": 30},
                                "sisa": {"shards": 5, "slices": 1}},
                seed=0)
CONFIGS = {
    "default": _DEFAULT,
    "smoke": {**_DEFAULT, "persons": 20, "facts": 4, "world": 8, "width": 16, "depth": 1,
              "heads": 2, "epochs": 3, "splits": ("forget05",),
              "methods": ("grad_diff", "npo", "influence", "sisa"), "unlearn_epochs": 1,
              "checkpoints": 2,
              "method_options": {"influence": {"backend": "pcg-ekfac", "damping": 1e-2,
                                               "maxiter": 20},
                                 "sisa": {"shards": 2, "slices": 1}}},
}
HEADLINES = {
    "corpus_digest": ("results.corpus.digest", "exact"),
    "corpus_sizes": ("results.corpus.stats.qa", "exact"),
    "train_tokens": ("results.corpus.stats.train_tokens", "exact"),
    "oracle_forget_quality": ("results.reference.*.retrain.forget_quality", "exact"),
    "other_seed_retrain_fq_above_p05": ("results.checks.other_seed_fq_above_p05", "exact"),
    "original_fq_below_p05": ("results.checks.original_fq_below_p05", "exact"),
    "original_model_utility": ("results.reference.*.original.model_utility", "accuracy"),
    "original_forget_rouge": ("results.reference.*.original.forget_rouge", "accuracy"),
}
_TABLE_KEYS = ("forget_quality", "model_utility", "forget_rouge", "retain_rouge", "privleak",
               "extraction_strength", "forget_truth_ratio")


def _person_groups(bench: people.Benchmark):
    """SISA's groups: the person of each QA id, each world fact its own group."""
    def groups(ids):
        owner = bench.person_of(ids)
        return np.where(owner == "world", np.asarray(ids, str), owner)
    return groups


def _constructor(name: str, bench, options: dict, every: int | None):
    opts = dict(options.get(name, {}))
    if name == "sisa":
        opts["groups"] = _person_groups(bench)
    if every is not None:
        opts["checkpoint_every"] = every
    return methods.REGISTRY[name].make(**opts)


def run(*, persons, facts, world, width, depth, heads, epochs, lr, batch_size, splits, methods,
        unlearn_epochs, checkpoints, method_options, seed, progress=None) -> dict:
    """Train the model and the oracles, run every method on every split, evaluate."""
    progress = progress or runner.no_progress
    t_start = time.perf_counter()
    bench = people.generate(persons=persons, facts=facts, world=world, seed=seed)
    tok = people.tokenizer()
    stats = people.stats(bench, tok)
    seq_len = stats["seq_len_all"]
    max_new = seq_len - stats["max_prompt_len"] + 1
    ds = people.training_set(bench, tok, seq_len=seq_len)
    model = models.transformer(len(tok), width=width, depth=depth, heads=heads, max_len=seq_len)
    cfg = train.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, l2=0.0)
    key = jax.random.key(seed)

    # the model, one exact retain oracle per split (same key: same init and data order, the
    # forget persons' weights at 0) and one retain model per split from another key (what an
    # independent retraining gives: the seed-noise floor of forget quality) — one ensemble
    progress(f"train the model and 2 × {len(splits)} retain models ({epochs} epochs)")
    key2 = jax.random.fold_in(key, 1)
    k = len(splits)
    w = np.ones((1 + 2 * k, len(ds)), np.float32)
    for s, split in enumerate(splits):
        rows = ds.positions(np.asarray(bench.splits[split]))
        w[1 + s, rows] = w[1 + k + s, rows] = 0.0
    t0 = time.perf_counter()
    stacked = mia.train_ensemble(model, ds, cfg, [key] * (1 + k) + [key2] * k, w)
    train_seconds = time.perf_counter() - t0
    full = engine.unstack(stacked, 0)
    oracles = {split: engine.unstack(stacked, 1 + s) for s, split in enumerate(splits)}
    others = {split: engine.unstack(stacked, 1 + k + s) for s, split in enumerate(splits)}
    problem = train.Problem(model, ds, cfg, key)
    trained = train.Fit(full, {})

    def evaluate(apply, params, split, ref=None):
        return lm_metrics.evaluate_tofu(
            apply, params, bench, split, tok, seq_len=seq_len, max_new_tokens=max_new,
            retain_tr=None if ref is None else ref["forget_tr"],
            retain_auc=None if ref is None else ref["mia_min_k_auc"],
            truth_ratio_correct="answer")

    reference, curves, table = {}, {}, []
    for split in splits:
        progress(f"{split}: evaluate the oracle and the original model")
        oracle_ref = evaluate(model.apply, oracles[split], split)
        oracle = evaluate(model.apply, oracles[split], split, oracle_ref)  # FQ = 1 by definition
        other = evaluate(model.apply, others[split], split, oracle_ref)
        original = evaluate(model.apply, full, split, oracle_ref)
        per_model = train_seconds / len(w)
        reference[split] = {"retrain": _row(oracle, per_model),
                            "retrain_other_seed": _row(other, per_model),
                            "original": _row(original, 0.0), "oracle_ref": oracle_ref}

    forget_ids = {split: np.asarray(bench.splits[split]) for split in splits}
    n_steps = {}
    for name in methods:
        loop = name in _LOOP
        prepared, prepare_seconds = None, 0.0  # one prepare (factors, SISA shards) per method
        for split in splits:
            every = None
            if loop:  # steps of the run over the forget set: epochs × batches of U
                steps = unlearn_epochs * -(-len(forget_ids[split]) // batch_size)
                every = max(1, -(-steps // checkpoints))
                n_steps[split] = steps
            opts = {**method_options, name: {**method_options.get(name, {}),
                                             **({"epochs": unlearn_epochs} if loop else {})}}
            unl = _constructor(name, bench, opts, every)
            progress(f"{split}: {name}")
            if prepared is None or loop:
                t0 = time.perf_counter()
                prepared = unl.prepare(problem, trained)
                prepare_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            result, _ = unl.forget(prepared, forget_ids[split], jax.random.fold_in(key, 7))
            jax.block_until_ready(jax.tree.leaves(result.params) if result.params else 0)
            seconds = time.perf_counter() - t0 + prepare_seconds
            ref = reference[split]["oracle_ref"]
            if result.params is None:  # an ensemble (SISA): its aggregate predicts
                final = evaluate(lambda _p, x, f=result.logits: f(x), {}, split, ref)
            else:
                final = evaluate(model.apply, result.params, split, ref)
            curve = [{"step": 0, **_point(reference[split]["original"])}]
            for step, params in result.stats.get("checkpoints", []):
                ev = (final if step == result.stats["checkpoints"][-1][0]
                      else evaluate(model.apply, params, split, ref))
                curve.append({"step": int(step), **_point(ev)})
            if not loop:
                curve.append({"step": 1, **_point(final)})
            curves.setdefault(split, {})[name] = curve
            table.append({"split": split, "method": name, **_row(final, seconds),
                          "stats": _stats(result.stats)})
    for split in splits:
        for ref_name in ("retrain", "retrain_other_seed", "original"):
            table.append({"split": split, "method": ref_name,
                          **reference[split][ref_name]})
    for split in splits:
        reference[split].pop("oracle_ref")
    checks = {"other_seed_fq_above_p05": [reference[s]["retrain_other_seed"]["forget_quality"]
                                           > 0.05 for s in splits],
              "original_fq_below_p05": [reference[s]["original"]["forget_quality"] < 0.05
                                         for s in splits]}
    return {"checks": checks,
            "corpus": {"digest": bench.digest(), "stats": stats, "seq_len": seq_len,
                       "max_new_tokens": max_new},
            "model": {"params": int(sum(a.size for a in jax.tree.leaves(full))),
                      "train_seconds": train_seconds},
            "reference": reference, "curves": curves, "table": table, "steps": n_steps,
            "seconds": time.perf_counter() - t_start}


def _point(ev: dict) -> dict:
    return {"forget_quality": ev["forget_quality"], "model_utility": ev["model_utility"]}


def _row(ev: dict, seconds: float) -> dict:
    out = {k: ev[k] for k in _TABLE_KEYS}
    out.update({"seconds": seconds, "n_forget": ev["n_forget"],
                "mia_min_k_auc": ev["mia_min_k_auc"]})
    return out


def _stats(stats: dict) -> dict:
    """The JSON-able scalars of a method's stats (checkpoints and arrays left out)."""
    return {k: v for k, v in stats.items()
            if isinstance(v, bool | int | float | str) and k != "checkpoints"}


def table_markdown(res: dict) -> str:
    """Per split × method: FQ, MU, ROUGE-L forget/retain, PrivLeak, seconds."""
    lines = ["| split | method | forget quality | model utility | ROUGE-L forget | "
             "ROUGE-L retain | PrivLeak | seconds |", "|" + "---|" * 8]
    for r in res["table"]:
        lines.append(f"| {r['split']} | {r['method']} | {r['forget_quality']:.3g} | "
                     f"{r['model_utility']:.3f} | {r['forget_rouge']:.3f} | "
                     f"{r['retain_rouge']:.3f} | {r['privleak']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(payload: dict, outdir) -> list:
    """The TOFU figure: forget quality (log) vs model utility over unlearning steps, one curve
    per method, one panel per forget split, retrain and do-nothing as reference points."""
    res = payload["results"]
    print(table_markdown(res))
    splits = list(res["curves"])
    with plotting.style() as plt:
        fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.8),
                                 squeeze=False)
        for ax, split in zip(axes[0], splits, strict=True):
            for i, (name, curve) in enumerate(res["curves"][split].items()):
                mu = [c["model_utility"] for c in curve]
                fq = [max(c["forget_quality"], 1e-30) for c in curve]
                ax.plot(mu, fq, "-o", ms=3, lw=1.2, color=f"C{i % 10}", label=name)
            ref = res["reference"][split]
            ax.plot(ref["retrain"]["model_utility"], ref["retrain"]["forget_quality"], "*",
                    ms=14, color="k", label="retrain (oracle)")
            ax.plot(ref["retrain_other_seed"]["model_utility"],
                    ref["retrain_other_seed"]["forget_quality"], "P", ms=10, color="k",
                    label="retrain, another seed")
            ax.plot(ref["original"]["model_utility"],
                    max(ref["original"]["forget_quality"], 1e-30), "X", ms=10, color="grey",
                    label="original (do nothing)")
            ax.set_yscale("log")
            ax.set_xlabel("model utility")
            ax.set_title(f"{split} ({ref['retrain']['n_forget']} QA)")
        axes[0][0].set_ylabel("forget quality (KS p-value)")
        axes[0][-1].legend(fontsize=7, loc="lower left", frameon=False)
        fig.suptitle("Unlearning fictitious people (TOFU-style): forget quality vs model "
                     "utility over unlearning steps", y=1.02)
        return plotting.savefig(fig, f"{outdir}/{NAME}.png")


if __name__ == "__main__":
    runner.main(sys.modules[__name__])
