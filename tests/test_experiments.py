"""Smoke runs of the experiment scripts and the reproduction driver (tiny configs)."""

import json

import pytest

from experiments import forget_basic, reproduce
from unlearn import runner


def test_forget_basic_smoke_is_deterministic(tmp_path):
    p1 = runner.run_experiment(forget_basic, config="smoke", out=tmp_path / "a")
    p2 = runner.run_experiment(forget_basic, config="smoke", out=tmp_path / "b")
    r1, r2 = json.loads(p1.read_text()), json.loads(p2.read_text())
    strip = lambda r: {m: {k: v for k, v in row.items() if "time" not in k and k != "speedup"}
                       for m, row in r["results"]["summary"].items()}
    assert strip(r1) == strip(r2)
    assert r1["meta"]["git"] and r1["meta"]["versions"]["jax"]
    assert (tmp_path / "a" / "smoke" / "forget_basic.png").exists()
    row = r1["results"]["summary"]["retrain"]
    assert row["kl_test"]["mean"] == 0.0


def test_plot_only_needs_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="plot-only"):
        runner.run_experiment(forget_basic, config="smoke", out=tmp_path, plot_only=True)


def test_reproduce_smoke(tmp_path):
    reproduce.main(["--smoke", "--out", str(tmp_path), "--only", "forget_basic"])
    assert (tmp_path / "data" / "forget_basic-smoke.json").exists()


def test_tfds_config_runs_on_mocked_mnist(tmp_path):
    """A TFDS variant runs end to end offline, on TFDS's own mock data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=200, policy=tfds.testing.MockPolicy.USE_CODE):
        path = runner.run_experiment(forget_basic, config="tfds_mnist", out=tmp_path,
                                     epochs=1, fraction=0.05)
    res = json.loads(path.read_text())
    assert res["config"]["dataset"] == "mnist"
    assert set(res["results"]["summary"]) == {"retrain", "finetune"}
