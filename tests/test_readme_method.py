"""README "Add your own method": its two code blocks, run as written, give a method that the
registry serves and that behaves like one (finite predictions, deterministic, ids refused
twice, the forget set's predictions pushed towards uniform)."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from unlearn import data, methods, models, train

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Add your own method"):]
    section = section[: section.index("\n## ", 5)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_method_runs_and_forgets():
    blocks = _blocks()
    assert len(blocks) == 2
    ns: dict = {}
    exec(compile(blocks[0], "README:my_method", "exec"), ns)
    exec(compile(blocks[1], "README:register", "exec"), ns)
    try:
        tr = data.load("digits").train.subset(np.arange(200))
        cfg = train.TrainConfig(epochs=30, batch_size=64, lr=1e-2)
        problem = train.Problem(models.mlp(10, (32,)), tr, cfg, jax.random.key(0))
        trained = train.train(problem)
        m = methods.get("my_method", weight=2.0, epochs=4)
        ids = tr.ids[tr.y == 3]
        state = m.prepare(problem, trained)
        res, state2 = m.forget(state, ids, jax.random.key(1))
        again, _ = m.forget(state, ids, jax.random.key(1))
        fx = tr.x[tr.y == 3]
        out = np.asarray(res.logits(fx))
        np.testing.assert_array_equal(out, np.asarray(again.logits(fx)))

        def entropy(z):
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            return float(np.mean(-(p * np.log(p + 1e-12)).sum(1)))

        before = entropy(np.asarray(problem.model.apply(trained.params, fx)))
        assert before < 0.5  # a trained model: confident on its training class
        assert entropy(out) > before + 0.5  # pulled towards uniform (max entropy ln 10)
        with pytest.raises(ValueError, match="already forgotten"):
            m.forget(state2, ids[:1], jax.random.key(2))
    finally:
        methods.REGISTRY.pop("my_method", None)
