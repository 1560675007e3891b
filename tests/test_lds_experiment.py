"""``experiments/lds_backends.py`` (issue #29's LDS table): the memory measurement against a
known allocation, a backend run in its own process against the same call in this one, the
refusal rows, and the smoke run end to end (its leave-one-out control against θ*, its rows
against the headline paths)."""

import json

import jax
import numpy as np
import pytest

from experiments import lds_backends as lb
from experiments import runner
from unlearn import models, train


def test_isolated_peak_memory_sees_a_known_allocation():
    """A 200 MiB array touched in the child raises its peak resident set by 200 MiB over the
    resident set before the call — to within 1 MiB below (``statm`` and ``ru_maxrss`` count a
    few pages differently: 199.95 measured) and a little above (NumPy allocates nothing
    else)."""
    got = lb.isolated("experiments.lds_backends:_allocate", {"megabytes": 200}, x64=False)
    assert got["result"] == 200 * 2**20 / 8  # the sum of the ones: the call really ran
    assert 199 <= got["delta_mb"] <= 230
    assert got["peak_mb"] == pytest.approx(got["rss_before_mb"] + got["delta_mb"])


@pytest.mark.slow
def test_isolated_backend_equals_the_in_process_call():
    """The child rebuilds the model from its spec, the key from its seed and float64 from the
    flag: its K-FAC scores equal those computed here (same program, same CPU)."""
    with jax.enable_x64(True):
        spec = {**lb._MLP, "n_train": 60, "n_test": 4, "hidden": (3,), "epochs": 1}
        problem, te = lb._problem("mlp", spec, 0)
        params = jax.tree.map(np.asarray, train.train(problem).params)
        kw = dict(problem=problem, params=params, x_test=te.x, y_test=te.y, name="kfac",
                  damping=1e-3, options={"key": 2})
        here = lb.backend_scores(**kw)
    there = lb.isolated("experiments.lds_backends:backend_scores", kw)
    assert there["result"]["scores"].dtype == np.float64
    np.testing.assert_allclose(there["result"]["scores"], here["scores"], rtol=1e-10,
                               atol=1e-14)
    assert there["peak_mb"] > there["delta_mb"] > 0


def test_refusals_name_the_reason():
    """K-FAC-based backends refuse the CNN's convolutions (K-FAC's own check); the dense
    exact backend is skipped above ``exact_max_params`` and runs below it; the MLP is
    accepted by K-FAC."""
    with jax.enable_x64(True):
        cnn, _ = lb._problem("cnn", {**lb._CNN, "n_train": 20, "n_test": 2}, 0)
        mlp, _ = lb._problem("mlp", {**lb._MLP, "n_train": 20, "n_test": 2}, 0)
        v_cnn = train.init_params(cnn.model, cnn.train, cnn.key, "float64")
        v_mlp = train.init_params(mlp.model, mlp.train, mlp.key, "float64")
        for name in lb.KFAC_BACKENDS:
            why = lb._refusal(name, cnn, v_cnn, 10**9)
            assert why.startswith("refused:") and "Dense" in why
            assert lb._refusal(name, mlp, v_mlp, 10**9) is None
        p = models.num_params({"params": v_mlp["params"]})
        assert p == 784 * 32 + 32 + 32 * 10 + 10
        assert lb._refusal("exact", mlp, v_mlp, p - 1).startswith("skipped:")
        assert lb._refusal("exact", mlp, v_mlp, p) is None


@pytest.mark.slow
def test_smoke_run_in_process(tmp_path):
    """The smoke config end to end (backends in this process): every row ran, CG converged,
    the leave-one-out control equals θ* (same key, same data order: the same training run),
    and the headline paths resolve."""
    path = runner.run_experiment(lb, config="smoke", out=tmp_path, isolate=False)
    payload = json.loads(path.read_text())
    res = payload["results"]["models"]["mlp"]
    rows = res["rows"]
    assert set(rows) == {"cg", "kfac", "identity", "random"}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["cg"]["converged"] and rows["cg"]["residual"] <= 1e-6
    assert res["n_train"] == 200 and res["subset_size"] == 100
    assert all(r["n_defined"] == [10] for r in rows.values())
    for r in rows.values():
        assert r["ci_low"] <= r["lds"] <= r["ci_high"]
        assert len(r["loo_predicted"]) == 5
    assert abs(res["loo"]["control_minus_theta_star"]) <= 1e-9
    assert len(set(res["loo"]["train_ids"])) == 5
    for name, (hpath, _) in lb.HEADLINES.items():
        assert runner.get_path(payload, hpath) is not None, name
    assert "| cg |" in lb.table(payload)
    assert (tmp_path / "smoke" / "lds_backends.png").exists()
