"""What a persistent SISA model directory names in ``config.json`` — its data source and its
model — read again by every command, with the content hashes that catch changed data.

**Sources.** ``--model`` is a name of :data:`unlearn.models.REGISTRY` or an importable factory
``package.module:function`` called as ``function(**model_kwargs)`` that returns an
:class:`unlearn.models.Model`; ``--data`` is a :func:`unlearn.data.load` name, ``arrays:PATH``
(an ``.npz`` with ``x``, ``y`` and optionally ``ids`` and ``num_classes``, copied into the
directory) or an importable loader ``package.module:function`` returning a
:class:`~unlearn.data.Split` or :class:`~unlearn.data.Dataset`. ``config.json`` records the
names and kwargs; every later command rebuilds the model and reloads the data from them (so a
factory or loader must stay importable and deterministic: opening a directory imports the code
it names — open only directories you trust). The content hash of every trained example
(``layout.npz``) catches data that changed since training.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import re
import zipfile
from pathlib import Path

import jax
import numpy as np

from unlearn import data as data_lib
from unlearn import models as models_lib
from unlearn.data import Dataset, Split
from unlearn.models import Model
from unlearn.sisa.ledger import CONFIG, Dir, ModelDirError
from unlearn.sisa.plan import Plan
from unlearn.train import TrainConfig

ARRAY_KEYS = ("x", "y", "ids", "num_classes")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


# ----------------------------------------------------------------------------- data


def content_hash(ds) -> np.ndarray:
    """Per-example hash of the features and the label (hex), to notice changed files."""
    x = np.ascontiguousarray(ds.x).reshape(len(ds), -1)
    return np.array([hashlib.blake2b(x[i].tobytes() + int(ds.y[i]).to_bytes(8, "little"),
                                     digest_size=12).hexdigest() for i in range(len(ds))])


def _import_callable(spec: str, flag: str):
    """The callable named ``package.module:function`` (errors name ``flag``)."""
    mod_name, _, attr = spec.partition(":")
    if not (_DOTTED.fullmatch(mod_name) and _DOTTED.fullmatch(attr)):
        raise ValueError(f"{flag} {spec!r} is not of the form package.module:function.")
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:  # anything the user's module raises on import
        raise ValueError(f"{flag} {spec!r}: cannot import module {mod_name!r} "
                         f"({type(e).__name__}: {e}); make it importable (run from the "
                         "directory that holds the package, or add it to PYTHONPATH).") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{flag} {spec!r}: {mod_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{flag} {spec!r} is a {type(obj).__name__}, not a callable.")
    return obj


def _is_import_spec(spec: str) -> bool:
    return spec.count(":") == 1 and all(map(_DOTTED.fullmatch, spec.split(":")))


def _data_kind(spec: str) -> str:
    """``arrays`` (``arrays:PATH``), ``loader`` (``package.module:function``) or ``load`` (a
    :func:`unlearn.data.load` name: ``digits``, ``folder:PATH``, ``tfds:NAME``, ...)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--data {spec!r}: pass a dataset name, folder:PATH, arrays:PATH.npz "
                         "or package.module:function.")
    if spec.startswith("arrays:"):
        return "arrays"
    if not spec.startswith(("folder:", "tfds:")) and _is_import_spec(spec):
        return "loader"
    return "load"


def _read_arrays(path: Path, label: str):
    """The :class:`~unlearn.data.Dataset` of an ``.npz`` with ``x``, ``y`` and optionally
    ``ids`` (unique strings; default ``"0".."n-1"``) and ``num_classes`` (default max(y)+1).
    Errors start with ``label`` (the argument that named the file)."""
    a = _read_npz(path, label)
    unknown = sorted(set(a) - set(ARRAY_KEYS))
    missing = [k for k in ("x", "y") if k not in a]
    if unknown or missing:
        raise ValueError(f"{label}: {path} holds arrays {sorted(a)}; it needs x and y and may "
                         f"have ids and num_classes (missing {missing}, unknown {unknown}).")
    x, y = a["x"], a["y"]
    if x.ndim < 2 or x.dtype.kind not in "biuf":
        raise ValueError(f"{label}: x has shape {x.shape} and dtype {x.dtype}; it must be a "
                         "numeric array with one row per example, shape (n, features...).")
    ids = _array_ids(a["ids"], y, label) if "ids" in a else None
    nc = _array_num_classes(a["num_classes"], label) if "num_classes" in a else None
    try:
        return data_lib.make(x, y, num_classes=nc, ids=ids, name="arrays")
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from e


def _read_npz(path: Path, label: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, or an error that starts with ``label``."""
    if not path.is_file():
        raise FileNotFoundError(f"{label}: {path} is not a file; pass arrays:PATH with PATH an "
                                ".npz written by np.savez(PATH, x=..., y=..., ids=...).")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array, not an .npz archive of named arrays")
        with z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        hint = (" (an object array: save ids as strings, np.array(ids, dtype=str))"
                if "Object arrays" in str(e) else "")
        raise ValueError(f"{label}: {path} is not a readable .npz of arrays x, y[, ids, "
                         f"num_classes] ({e}){hint}.") from e


def _array_ids(ids: np.ndarray, y: np.ndarray, label: str) -> np.ndarray:
    """The ``ids`` array as unique strings, one per label."""
    if ids.shape != y.shape or ids.dtype.kind not in "USiu":
        raise ValueError(f"{label}: ids has shape {ids.shape} and dtype {ids.dtype}; pass "
                         f"one string per example, shape {y.shape}.")
    ids = ids.astype(str)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{label}: ids {uniq[counts > 1][:10].tolist()} appear more than "
                         "once; every example needs its own id.")
    return ids


def _array_num_classes(v: np.ndarray, label: str) -> int:
    """The ``num_classes`` array as one integer ≥ 1."""
    if v.size != 1 or v.dtype.kind not in "iu" or int(v.reshape(())) < 1:
        raise ValueError(f"{label}: num_classes={v.tolist()!r}; pass one integer ≥ 1.")
    return int(v.reshape(()))


def _join(split, label: str):
    """Train and test of a split as one dataset (train first)."""
    a, b = split.train, split.test
    if len(b) == 0:
        return a
    try:
        return dataclasses.replace(a, x=np.concatenate([a.x, b.x]),
                                   y=np.concatenate([a.y, b.y]),
                                   ids=np.concatenate([a.ids, b.ids]).astype(str))
    except ValueError as e:
        raise ValueError(f"{label}: its train and test parts cannot be joined ({e}).") from e


def _call_loader(spec: str):
    """A ``package.module:function`` loader's result: a Split or a Dataset."""
    fn = _import_callable(spec, "--data")
    try:
        got = fn()
    except Exception as e:
        raise ValueError(f"--data {spec!r}: the loader raised {type(e).__name__}: {e}") from e
    if not isinstance(got, (Split, Dataset)):
        raise ValueError(f"--data {spec!r} returned a {type(got).__name__}; a loader returns an "
                         "unlearn.data.Split or unlearn.data.Dataset.")
    return got


def _training_data(data: str, seed: int, test_fraction: float):
    """``(train set, dataset to store in the directory or None)`` for ``create``."""
    kind = _data_kind(data)

    def split(ds):
        if test_fraction == 0:
            return ds
        return data_lib.split(ds, test_fraction=test_fraction, seed=seed).train

    if kind == "arrays":
        full = _read_arrays(Path(data.removeprefix("arrays:")).expanduser(), f"--data {data}")
        return split(full), full
    if kind == "loader":
        got = _call_loader(data)
        if not isinstance(got, Split):
            return split(got), None
        return (_join(got, f"--data {data}") if test_fraction == 0 else got.train), None
    # data.load refuses test_fraction 0 (no split): any fraction gives the same union
    got = data_lib.load(data, seed=seed, test_fraction=test_fraction or 0.25)
    return (_join(got, f"--data {data}") if test_fraction == 0 else got.train), None


def _all_data(d: Dir):
    """Every example of the directory's data source now (train and test)."""
    c = d.cfg
    if c.get("data_copy"):
        path = d.root / c["data_copy"]
        try:
            return _read_arrays(path, f"{path} (the copy of --data {c['data']})")
        except (ValueError, FileNotFoundError) as e:
            raise ModelDirError(f"{e}; restore the directory from a backup.") from e
    if _data_kind(c["data"]) == "loader":
        try:
            got = _call_loader(c["data"])
        except ValueError as e:
            raise ModelDirError(f"{d.root / CONFIG} names the data loader {c['data']!r}, which "
                                f"fails now: {e}") from e
        return _join(got, f"--data {c['data']}") if isinstance(got, Split) else got
    split = data_lib.load(c["data"], seed=c["seed"], test_fraction=c.get("test_fraction") or 0.25)
    return _join(split, f"--data {c['data']}")


def _load_data(d: Dir):
    """(train set in layout order with zero rows for missing examples, present mask, test set).

    Examples of the layout still in the data are checked against their stored content hash;
    the test set is every example of the source that is not in the layout."""
    full = _all_data(d)
    if full.num_classes != d.cfg["num_classes"]:
        raise ModelDirError(f"the data {d.cfg['data']!r} now has {full.num_classes} classes but "
                            f"the model was trained on {d.cfg['num_classes']}; restore the data "
                            "as it was at training.")
    full_x, full_y, full_ids = full.x, full.y, full.ids.astype(str)
    index = {k: i for i, k in enumerate(full_ids.tolist())}
    rows = np.array([index.get(i, -1) for i in d.ids.tolist()])
    present = rows >= 0
    x = np.zeros((len(d.ids), *full_x.shape[1:]), full_x.dtype)
    y = np.zeros(len(d.ids), full_y.dtype)
    x[present], y[present] = full_x[rows[present]], full_y[rows[present]]
    tr = Dataset(x, y, d.ids, full.num_classes, full.name)
    got = content_hash(tr.subset(present))
    changed = d.ids[present][got != d.content[present]]
    if len(changed):
        raise ModelDirError(f"examples {changed[:10].tolist()} changed since the model was "
                            "trained (content hash differs); restore the originals — exact "
                            "forgetting needs the training data as it was.")
    in_layout = np.isin(full_ids, d.ids)
    test = Dataset(full_x[~in_layout], full_y[~in_layout], full_ids[~in_layout],
                   full.num_classes, full.name)
    return tr, present, test


# ----------------------------------------------------------------------------- model


def _model_kwargs_json(kwargs) -> str:
    """``--model-kwargs`` as canonical JSON (what config.json records and every command
    rebuilds the model from), or a clear error."""
    if kwargs is None:
        return "{}"
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"--model-kwargs {kwargs!r} must be a JSON object of keyword arguments, "
                         "e.g. '{\"hidden\": [32]}'.")
    try:
        return json.dumps(kwargs, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model-kwargs {kwargs!r} must be JSON (numbers, strings, lists, "
                         f"objects): {e}.") from e


def build_model(name: str, num_classes: int, kwargs_json: str = "{}"):
    """The model ``--model name`` / ``--model-kwargs`` describe: a registry name (built with
    ``num_classes``) or a factory ``package.module:function`` called as ``function(**kwargs)``
    that must return an :class:`unlearn.models.Model`. One object per configuration and process
    (compile caches are keyed on the model's functions). Errors name the argument."""
    if isinstance(name, str) and ":" in name:
        return _factory_model(name, kwargs_json)
    if name not in models_lib.REGISTRY:
        raise ValueError(f"--model {name!r} is neither a model name "
                         f"({', '.join(sorted(models_lib.REGISTRY))}) nor a factory "
                         "package.module:function.")
    try:
        return _model(name, num_classes, kwargs_json)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model-kwargs {kwargs_json} do not fit --model {name}: {e}") from e


@functools.lru_cache(maxsize=16)
def _factory_model(spec: str, kwargs_json: str):
    fn = _import_callable(spec, "--model")
    kw = json.loads(kwargs_json)
    try:
        inspect.signature(fn).bind(**kw)
    except TypeError as e:
        raise ValueError(f"--model-kwargs {kwargs_json} do not fit {spec}: {e}.") from e
    except ValueError:  # no signature (a builtin): let the call tell
        pass
    try:
        m = fn(**kw)
    except Exception as e:
        raise ValueError(f"--model {spec}: the factory raised {type(e).__name__}: {e}") from e
    if not isinstance(m, Model):
        raise ValueError(f"--model {spec} returned a {type(m).__name__}, not an "
                         "unlearn.models.Model (init, apply, name, ...).")
    return m


def _model_and_cfg(d: Dir):
    """``(model, train config, plan, key)`` rebuilt from the directory's ``config.json``."""
    c = d.cfg
    kw = json.dumps(c.get("model_kwargs", {}), sort_keys=True)
    try:
        model = build_model(c["model"], c["num_classes"], kw)
    except ValueError as e:
        raise ModelDirError(f"{d.root / CONFIG} names the model {c['model']!r} with kwargs {kw}, "
                            f"which cannot be rebuilt now: {e}") from e
    return model, TrainConfig(**c["train"]), Plan(**c["plan"]), jax.random.key(c["seed"])


@functools.lru_cache(maxsize=16)
def _model(name: str, num_classes: int, kwargs: str):
    """One model object per static configuration, so the compile caches (keyed on the model's
    functions) are hit by every directory and command in a process with the same model."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(kwargs).items()}
    return models_lib.make(name, num_classes, **kw)


