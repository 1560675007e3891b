"""Forget-set kinds and the tuning protocol of the evaluation harness."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from unlearn import data


@pytest.fixture(scope="module")
def digits():
    return data.load("digits").train


def test_subclass_is_the_largest_kmeans_cluster_of_the_class(digits):
    ids = data.select_forget(digits, kind="subclass", cls=4, clusters=3, seed=2)
    rows = np.nonzero(digits.y == 4)[0]
    lab = KMeans(n_clusters=3, n_init=10, random_state=2).fit(digits.x[rows]).labels_
    sizes = np.bincount(lab)
    assert set(ids) == set(digits.ids[rows[lab == np.argmax(sizes)]])
    assert len(ids) == sizes.max() < len(rows)
    np.testing.assert_array_equal(
        ids, data.select_forget(digits, kind="subclass", cls=4, clusters=3, seed=2))
    small = data.select_forget(digits, kind="subclass", cls=4, clusters=3, cluster=2, seed=2)
    assert len(small) == sizes.min()


def test_hard_is_knn_label_disagreement(digits):
    ids = data.select_forget(digits, kind="hard", count=30, seed=0)
    # Brute force: dense distance matrix, 10 nearest others, fraction with another label.
    x = digits.x.astype(np.float64)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1, kind="stable")[:, :10]
    score = np.mean(digits.y[nn] != digits.y[:, None], axis=1)
    chosen = score[digits.positions(ids)]
    assert chosen.min() >= np.sort(score)[-30]  # the 30 highest (ties broken by the seed)
    assert chosen.mean() > 0.3 and score.mean() < 0.05
    np.testing.assert_array_equal(ids, data.select_forget(digits, kind="hard", count=30, seed=0))
    given = np.arange(len(digits), dtype=float)
    np.testing.assert_array_equal(
        data.select_forget(digits, kind="hard", count=3, scores=given), digits.ids[-3:])


@pytest.mark.parametrize("kw, match", [
    (dict(kind="subclass", cls=None), "cls"),
    (dict(kind="subclass", cls=1, clusters=1), "clusters"),
    (dict(kind="subclass", cls=1, cluster=5), "cluster"),
    (dict(kind="hard", count=3, scores=[1.0, 2.0]), "scores"),
    (dict(kind="nope"), "kind"),
])
def test_bad_forget_kinds(digits, kw, match):
    with pytest.raises(ValueError, match=match):
        data.select_forget(digits, **kw)


# ----------------------------------------------------------------------------- tuning protocol


@pytest.fixture(scope="module")
def small():
    import jax

    from unlearn import models, train

    s = data.load("digits")
    tr = s.train.subset(np.arange(400))
    p = train.Problem(models.mlp(10, (16,)), tr,
                      train.TrainConfig(epochs=8, batch_size=32, lr=3e-3), jax.random.key(0))
    return p, data.Split(tr, s.test.subset(np.arange(200))), train.train(p)


def test_grid_points_scale_the_training_lr():
    from unlearn import evaluate as ev
    from unlearn.train import TrainConfig

    pts = ev.grid_points("l1_sparse", TrainConfig(lr=2e-3),
                         {"l1_sparse": {"lr": (0.5, 2.0), "gamma": (1e-4,)}})
    assert pts == [{"lr": 1e-3, "gamma": 1e-4}, {"lr": 4e-3, "gamma": 1e-4}]
    assert ev.grid_points("sisa", TrainConfig()) == []


def test_validation_forget_is_disjoint(digits):
    from unlearn import evaluate as ev

    ids = data.select_forget(digits, fraction=0.1, seed=3)
    val = ev.validation_forget(digits, "random", 0.1, 3, ids)
    assert len(val) == len(ids) and not set(val) & set(ids)
    cls = ev.validation_forget(digits, "class", 9, 0, data.select_forget(digits, kind="class",
                                                                         cls=9))
    assert set(digits.y[digits.positions(cls)]) == {0}


def test_tune_rejects_a_destructive_learning_rate_and_evaluate_uses_the_cache(
        small, tmp_path, monkeypatch):
    import json

    import jax

    from unlearn import evaluate as ev
    from unlearn import metrics

    problem, split, trained = small
    ids = data.select_forget(problem.train, fraction=0.1, seed=0)
    val = ev.validation_forget(problem.train, "random", 0.1, 0, ids)
    # Gradient ascent at 100× the training lr wrecks the model (RA, TA collapse): a large gap.
    grids = {"neggrad": {"lr": (0.01, 100.0)}}
    out = ev.tune(problem, split, val, ["neggrad"], jax.random.key(1), trained=trained,
                  grids=grids)["neggrad"]
    gaps = [g["avg_gap"] for g in out["grid"]]
    assert out["chosen"] == {"lr": 0.01 * problem.cfg.lr} and gaps[1] > gaps[0] + 10, gaps
    # The gap of each point is Avg. Gap over UA, RA, TA, MIA-efficacy against the oracle row.
    res = ev.evaluate(problem, split, val, ["retrain"], jax.random.key(1), trained=trained,
                      warmup=False, hparams=None)["rows"]["retrain"]
    assert gaps[0] == pytest.approx(metrics.avg_gap(out["grid"][0], res), abs=1e-9)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"here": {"neggrad": {"chosen": {"lr": 1e-4}}}}))
    monkeypatch.setattr(ev, "TUNED_PATH", path)
    rows = ev.evaluate(problem, split, ids, ["neggrad"], jax.random.key(1), trained=trained,
                       warmup=False, setting="here")["rows"]
    assert rows["neggrad"]["hparams"] == {"lr": 1e-4}
    assert {"UA", "RA", "TA", "MIA-efficacy", "RTE", "avg_gap"} <= set(rows["neggrad"])
