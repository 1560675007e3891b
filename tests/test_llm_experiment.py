"""The language-model unlearning experiment (experiments/llm_unlearning.py): its retain oracle
is the project's exact retrain, and its smoke run produces the figure's curves and the table."""

import json

import jax
import numpy as np
import pytest

from experiments import llm_unlearning, runner
from unlearn import engine, mia, models, people, train


def test_ensemble_oracle_equals_train_retrain():
    """The experiment trains the model and its retain oracles as one engine ensemble (same key,
    forget persons weighted 0); each oracle equals ``train.retrain`` without the forget
    persons, and the model equals ``train.fit``, bit for bit (float32)."""
    bench = people.generate(persons=10, facts=2, world=4, seed=3)
    tok = people.tokenizer()
    seq_len = people.stats(bench, tok)["seq_len_all"]
    ds = people.training_set(bench, tok, seq_len=seq_len)
    model = models.transformer(len(tok), width=8, depth=1, heads=2, max_len=seq_len)
    cfg = train.TrainConfig(epochs=2, batch_size=8, lr=3e-3, l2=0.0)
    key = jax.random.key(0)
    forget = np.asarray(bench.splits["forget10"])
    w = np.ones((2, len(ds)), np.float32)
    w[1, ds.positions(forget)] = 0.0
    stacked = mia.train_ensemble(model, ds, cfg, [key, key], w)
    problem = train.Problem(model, ds, cfg, key)
    for member, want in ((0, train.train(problem).params),
                         (1, train.retrain(problem, forget).params)):
        got = engine.unstack(stacked, member)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # ~1 min on 2 free cores: four methods' programs compile
def test_smoke_run_has_every_curve_and_row(tmp_path):
    path = runner.run_experiment(llm_unlearning, config="smoke", out=tmp_path)
    res = json.loads(path.read_text())["results"]
    cfg = llm_unlearning.CONFIGS["smoke"]
    (split,) = cfg["splits"]
    assert res["corpus"]["digest"] == people.generate(
        persons=cfg["persons"], facts=cfg["facts"], world=cfg["world"],
        seed=cfg["seed"]).digest()
    # the exact oracle compared with itself: identical truth ratios, KS p-value exactly 1
    assert res["reference"][split]["retrain"]["forget_quality"] == 1.0
    assert res["reference"][split]["retrain"]["privleak"] == pytest.approx(0.0, abs=1e-9)
    methods = {r["method"] for r in res["table"]}
    assert methods == set(cfg["methods"]) | {"retrain", "retrain_other_seed", "original"}
    for name, curve in res["curves"][split].items():
        steps = [c["step"] for c in curve]
        assert steps[0] == 0 and steps == sorted(set(steps)), (name, steps)
        assert curve[0]["forget_quality"] == res["reference"][split]["original"][
            "forget_quality"]
        for c in curve:
            assert 0.0 <= c["forget_quality"] <= 1.0 and 0.0 <= c["model_utility"] <= 1.0
    n_loop = [m for m in cfg["methods"] if m in llm_unlearning._LOOP]
    for name in n_loop:  # every checkpoint of the run, the last one at the final step
        assert res["curves"][split][name][-1]["step"] == res["steps"][split]
    assert (tmp_path / "smoke" / "llm_unlearning.png").exists()
    assert "| forget05 | npo |" in llm_unlearning.table_markdown(res)
