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
