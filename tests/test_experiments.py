"""Experiment scripts (smoke configs), the driver, and the reproduction report's logic."""

import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import certified_removal, forget_basic, influence_loo, reproduce, runner

ROOT = Path(__file__).resolve().parent.parent


def test_forget_basic_smoke_is_deterministic(tmp_path):
    p1 = runner.run_experiment(forget_basic, config="smoke", out=tmp_path / "a")
    p2 = runner.run_experiment(forget_basic, config="smoke", out=tmp_path / "b")
    r1, r2 = json.loads(p1.read_text()), json.loads(p2.read_text())
    walltime = lambda k: "time" in k or k in ("speedup", "RTE")
    strip = lambda r: {m: {k: v for k, v in row.items() if not walltime(k)}
                       for m, row in r["results"]["summary"].items()}
    assert strip(r1) == strip(r2)
    # The recorded revision and versions are the real ones, not the fallbacks.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert r1["meta"]["git"].removesuffix("-dirty") == head
    assert r1["meta"]["versions"]["jax"] == jax.__version__
    assert (tmp_path / "a" / "smoke" / "forget_basic.png").exists()
    # The summary is the mean over seeds of the per-seed rows (recomputed here).
    per_seed = r1["results"]["per_seed"]
    for method in ("retrain", "finetune"):
        for key in ("test_acc", "kl_test"):
            want = np.mean([row[method][key] for row in per_seed])
            assert r1["results"]["summary"][method][key]["mean"] == pytest.approx(want)
    assert r1["results"]["summary"]["finetune"]["kl_test"]["mean"] > 0  # not the oracle itself


def test_plot_only_needs_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="plot-only"):
        runner.run_experiment(forget_basic, config="smoke", out=tmp_path, plot_only=True)


def test_influence_loo_smoke_on_mnist_1v7(tmp_path):
    seen = []
    path = runner.run_experiment(influence_loo, config="smoke", out=tmp_path,
                                 progress=seen.append)
    res = json.loads(path.read_text())["results"]
    assert res["classes"] == ["1", "7"] and res["n_train"] == 750
    assert len(res["points"]) == 6 and all(p["converged"] for p in res["points"])
    # exact and CG predictions agree (same linear system, two solvers)
    for p in res["points"]:
        assert p["pred_cg"] == pytest.approx(p["pred_exact"], rel=1e-4, abs=1e-9)
    assert res["pearson"]["exact"] > 0.9
    assert any("leave-one-out" in s for s in seen)


@pytest.mark.slow
def test_influence_loo_cnn_smoke_predicts_real_retrains(tmp_path):
    # ~35 s: the non-convex panel end to end on 100 real MNIST digits; the actual changes come
    # from retraining (independent of the influence maths), the control run's drift subtracted
    from experiments import influence_loo_cnn

    path = runner.run_experiment(influence_loo_cnn, config="smoke", out=tmp_path)
    res = json.loads(path.read_text())["results"]
    assert res["n_train"] == 100 and len(res["points"]) == 8
    assert len({p["train_id"] for p in res["points"]}) == 8
    assert all(abs(p["actual"]) > 0 for p in res["points"])
    assert res["pearson"]["hessian-cg"] > 0.8 and res["pearson"]["ggn-cg"] > 0.8
    assert (tmp_path / "smoke" / "influence_loo_cnn.png").exists()


def test_certified_removal_smoke_on_mnist_3v8(tmp_path):
    path = runner.run_experiment(certified_removal, config="smoke", out=tmp_path)
    res = json.loads(path.read_text())["results"]
    assert res["classes"] == ["3", "8"] and res["n_train"] == 120
    for row in res["curve"]:
        assert 0 < row["residual_norm"] <= row["data_bound"] <= row["worst_bound"]
    betas = [r["beta"] for r in res["sequence"]]
    assert betas == sorted(betas)
    # removals supported = the prefix of the sequence within the budget σε/c
    for s in res["supported"]:
        budget = res["c"] and 10.0 * s["epsilon"] / res["c"]
        assert s["removals"] == sum(b <= budget for b in betas) or s["capped"]


# ----------------------------------------------------------------------------- report logic


def _payload(**results):
    return {"config": {}, "results": results, "meta": {}}


def test_check_tolerance_kinds():
    spec = {"n": ("results.n", "exact"), "r": ("results.r", "float64"),
            "acc": ("results.acc", "accuracy"), "t": ("results.t", "timing"),
            "kl": ("results.kl", "float32"), "ids": ("results.rows.*.id", "exact")}
    ref = _payload(n=800, r=0.98, acc=0.95, t=2.0, kl=0.01, rows=[{"id": "a"}, {"id": "b"}])
    same = runner.check("x", spec, ref, ref)
    assert all(c.ok for c in same) and runner.report(same).endswith("6 of 6 reproduced")
    cases = [  # (field, value, ok?)
        ("n", 801, False), ("r", 0.98 * (1 + 5e-7), True), ("r", 0.98 * (1 + 5e-6), False),
        ("acc", 0.955, True), ("acc", 0.97, False), ("t", 7.0, True), ("t", 11.0, False),
        ("kl", 0.01 * (1 + 5e-4), True), ("kl", 0.0102, False),
        ("rows", [{"id": "a"}, {"id": "c"}], False), ("rows", [{"id": "a"}], False),
    ]
    for field, value, ok in cases:
        run = _payload(**{**ref["results"], field: value})
        checks = {c.name: c for c in runner.check("x", spec, run, ref)}
        name = "ids" if field == "rows" else field
        assert checks[name].ok is ok, (field, value, checks[name])
    missing = runner.check("x", spec, ref, None)
    assert not any(c.ok for c in missing) and "no reference" in missing[0].detail
    with pytest.raises(ValueError, match="kind"):
        runner.headline_spec(types.SimpleNamespace(NAME="y", HEADLINES={"a": ("r", "fuzzy")}))


def test_seeds_kind_holds_means_to_their_sampling_error():
    """The "seeds" width is 3 standard errors of the difference of two means over seeds
    (computed here from per-seed values with numpy), at least 1 point."""
    spec = {"gap": ("results.rows.*.gap", "seeds")}

    def summary(xs):
        xs = np.asarray(xs, float)
        return {"mean": float(xs.mean()), "std": float(xs.std()), "n": len(xs)}

    def ok(run_seeds, ref_seeds):
        run = _payload(rows=[{"gap": summary(run_seeds)}])
        ref = _payload(rows=[{"gap": summary(ref_seeds)}])
        return runner.check("x", spec, run, ref)[0].ok

    # a bimodal method: one of three seeds lands elsewhere on another CPU -> within the spread
    bimodal_ref, bimodal_run = [0.2, 0.3, 4.1], [49.0, 0.3, 11.3]
    se = np.sqrt(np.var(bimodal_ref) / 3 + np.var(bimodal_run) / 3)
    assert abs(np.mean(bimodal_run) - np.mean(bimodal_ref)) < 3 * se
    assert ok(bimodal_run, bimodal_ref)
    # a tight method that moved by far more than its spread -> a failure
    assert not ok([5.0, 5.1, 4.9], [1.0, 1.1, 0.9])
    # single seed: the 1-point floor only
    assert ok([2.5], [1.71]) and not ok([2.74], [1.71])
    # a plain number where a summary belongs is not a match
    run = _payload(rows=[{"gap": 1.0}])
    assert not runner.check("x", spec, run, _payload(rows=[{"gap": summary([1.0])}]))[0].ok


@pytest.fixture
def fake_experiment(monkeypatch):
    """A tiny experiment module registered as ``experiments.fake`` (instant run and plot)."""
    mod = types.ModuleType("experiments.fake")
    mod.NAME = "fake"
    mod.CONFIGS = {"default": {"scale": 1.0}, "smoke": {"scale": 1.0}}
    mod.HEADLINES = {"count": ("results.count", "exact"), "value": ("results.value", "float64")}

    def run(*, scale, progress=None):
        (progress or runner.no_progress)("computing")
        return {"count": 3, "value": scale / 3.0}

    mod.run = run
    mod.plot = lambda payload, outdir: []
    monkeypatch.setitem(sys.modules, "experiments.fake", mod)
    monkeypatch.setattr(reproduce, "EXPERIMENTS", ["fake"])
    return mod


def test_reproduce_passes_then_fails_on_a_perturbed_reference(tmp_path, fake_experiment,
                                                              capsys):
    ref = tmp_path / "ref"
    args = ["--reference", str(ref), "--run-dir", str(tmp_path / "run")]
    assert reproduce.main(args) == 1  # no reference yet
    assert "0 of 2 reproduced" in capsys.readouterr().out
    assert reproduce.main([*args, "--update-reference"]) == 0
    ref_json = ref / "data" / "fake.json"
    assert ref_json.exists()
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    assert "2 of 2 reproduced" in out and "total time" in out
    payload = json.loads(ref_json.read_text())
    payload["results"]["value"] *= 1 + 1e-5  # outside float64's relative 1e-6
    ref_json.write_text(json.dumps(payload))
    assert reproduce.main(args) == 1
    out = capsys.readouterr().out
    assert "1 of 2 reproduced" in out and "FAIL fake.value" in out
    assert reproduce.main([*args, "--plot-only"]) == 0


def test_every_experiment_declares_valid_headlines():
    import importlib

    for name in reproduce.EXPERIMENTS:
        mod = importlib.import_module(f"experiments.{name}")
        spec = reproduce._spec(mod)
        assert spec, f"{name} has no headline numbers"
        ref = json.loads(runner.data_path(mod, "default", runner.DEFAULT_OUT).read_text())
        for hname, (path, _) in spec.items():
            assert runner.get_path(ref, path) is not None, (name, hname, path)


def test_tfds_config_runs_on_mocked_mnist(tmp_path):
    """A TFDS variant runs end to end offline, on TFDS's own mock data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=200, policy=tfds.testing.MockPolicy.USE_CODE):
        path = runner.run_experiment(forget_basic, config="tfds_mnist", out=tmp_path,
                                     epochs=1, fraction=0.05)
    res = json.loads(path.read_text())
    assert res["config"]["dataset"] == "mnist"
    assert set(res["results"]["summary"]) == {"retrain", "finetune"}
