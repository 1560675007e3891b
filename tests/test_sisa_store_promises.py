"""The model directory's promises, kept (issue 28), and bring-your-own model and data
(issue 27): a refused command leaves every non-lock file byte-identical; a refused ``train``
leaves nothing; ``--test-fraction 0`` trains on everything; a model factory
``package.module:function`` and ``arrays:PATH.npz`` data work through every command.

Tiny data (36 Gaussian examples, 3 classes) and the tiny MLP of ``tests/byo_factory.py``."""

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from unlearn import data, models, sisa, train
from unlearn.sisa import ledger, store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests.byo_factory` is importable as from the repository root
from tests import byo_factory  # noqa: E402

FACTORY = "tests.byo_factory:tiny_mlp"
# kronfluence 1.0.1 (the optional torch extra) installs a regular package named ``tests``; in a
# fresh process it shadows this directory (a namespace package), so `tests.byo_factory` cannot
# be imported there (conftest.py fixes it for this process only)
_found = importlib.machinery.PathFinder.find_spec("tests", [p for p in sys.path if p])
SHADOWED = _found is not None and _found.origin is not None and (
    Path(_found.origin).resolve().parent != ROOT / "tests")
KW = '{"hidden": 8, "outputs": 3}'
SMALL = ["--shards", "3", "--slices", "2", "--epochs", "2", "--batch-size", "4", "--lr", "0.01"]
LOCKS = {"LOCK", "READ.lock"}


def files(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` but the OS lock files: {relative path: bytes}."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in LOCKS}


def refused(capsys, args, d: Path) -> str:
    """Run the CLI; it must exit 2 and leave every non-lock file of ``d`` byte-identical.
    Returns stderr."""
    before = files(d)
    assert sisa.cli([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    after = files(d)
    assert after.keys() == before.keys(), (sorted(after.keys() ^ before.keys()), err)
    assert [k for k in before if before[k] != after[k]] == [], err
    return err


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model directory trained with the factory model on arrays data (then the original
    .npz is deleted: the directory holds its own copy)."""
    base = tmp_path_factory.mktemp("promises")
    x, y, ids = byo_factory.arrays()
    src = write_npz(base / "user data.npz", x=x, y=y, ids=ids)
    d = base / "model"
    assert sisa.cli(["train", str(d), "--data", f"arrays:{src}", "--model", FACTORY,
                     "--model-kwargs", KW, "--test-fraction", "0.25", *SMALL]) == 0
    src.unlink()
    return d


@pytest.fixture
def model_dir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "model")
    return tmp_path / "model"


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _ids(d: Path, shard=None) -> list[str]:
    lay = np.load(d / "layout.npz")
    return [i for i, s in zip(lay["ids"].astype(str).tolist(), lay["shard"].tolist(),
                              strict=True) if shard is None or s == shard]


# ----------------------------------------------------------------------------- refusals


def test_refused_commands_leave_every_file_byte_identical(model_dir, capsys):
    a, b = _ids(model_dir, 0)[:2]
    assert sisa.cli(["forget", str(model_dir), "--ids", a]) == 0  # v1; v0's manifest purged
    capsys.readouterr()
    ledger = model_dir / "ledger.jsonl"
    good = ledger.read_bytes()
    # what an interrupted writer leaves: a torn append (the served version's manifest still on
    # disk), a unit it renamed into place, a temp file. Recovery of these is a write.
    ledger.write_bytes(good + b'{"request": 2, "op": "forget", "ver')
    (model_dir / "units" / ("0" * 40)).mkdir()
    (model_dir / "units" / ("0" * 40) / "leftover").write_bytes(b"half a checkpoint")
    (model_dir / ".tmp-layout.npz-1-abc").write_bytes(b"junk")
    test_id = sorted(set(np.load(model_dir / "data.npz")["ids"].astype(str)) - set(_ids(
        model_dir)))[0]
    for args, match in ((["--ids", "nobody"], "'nobody' is not in the dataset"),
                        (["--ids", b, b], "more than once"),
                        (["--ids", test_id, "nobody"], "'nobody' is not in the dataset")):
        assert match in refused(capsys, ["forget", model_dir, *args], model_dir)
    with store.write_lock(model_dir, "forget --ids held-by-test"):
        err = refused(capsys, ["forget", model_dir, "--ids", b, "--lock-timeout", "0.2"],
                      model_dir)
        assert "held-by-test" in err
    assert "already holds a SISA model" in refused(
        capsys, ["train", model_dir, "--data", "digits"], model_dir)
    # a retained example whose stored row changed: every command that reads data refuses
    z = dict(np.load(model_dir / "data.npz"))
    good_data = (model_dir / "data.npz").read_bytes()
    row = list(z["ids"].astype(str)).index(b)
    z["x"][row] += 1
    np.savez(model_dir / "data.npz", **z)
    for cmd in (["forget", model_dir, "--ids", _ids(model_dir, 1)[0]], ["verify", model_dir],
                ["predict", model_dir]):
        assert "changed since the model was trained" in refused(capsys, cmd, model_dir)
    (model_dir / "data.npz").write_bytes(good_data)
    # the measured bug: the committed line of request 1 cut short. Truncating it would drop a
    # recorded deletion (and serve a version whose manifest is gone): refused, file intact
    ledger.write_bytes(good[:-40])
    for cmd in (["forget", model_dir, "--ids", b], ["status", model_dir],
                ["verify", model_dir], ["predict", model_dir]):
        err = refused(capsys, cmd, model_dir)
        assert "ledger.jsonl ends in an incomplete line" in err and "damaged" in err
    before = files(model_dir)
    r = subprocess.run([sys.executable, "-m", "unlearn.sisa", "forget", str(model_dir), "--ids",
                        b], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "damaged" in r.stderr and files(model_dir) == before, r.stderr
    # the torn append back: a command that succeeds finishes the interrupted writer's work
    ledger.write_bytes(good + b'{"request": 2, "op": "forget", "ver')
    s = sisa.status(model_dir)
    assert s["version"] == 1 and s["unreferenced_files"] == []
    assert ledger.read_bytes() == good and not (model_dir / ".tmp-layout.npz-1-abc").exists()
    assert not (model_dir / "units" / ("0" * 40)).exists()


def test_a_committed_line_that_lost_its_newline_is_committed(model_dir):
    a = _ids(model_dir, 2)[0]
    store.forget_persistent(model_dir, [a])
    ledger = model_dir / "ledger.jsonl"
    good = ledger.read_bytes()
    ledger.write_bytes(good[:-1])  # e.g. an editor that strips the final newline
    assert [e["request"] for e in sisa.read_ledger(model_dir)] == [0, 1]
    assert sisa.status(model_dir)["version"] == 1  # and status restored the newline
    assert ledger.read_bytes() == good
    ledger.write_bytes(good[:-1])
    out = store.forget_persistent(model_dir, [_ids(model_dir, 0)[0]])
    assert out["version"] == 2 and [e["request"] for e in sisa.read_ledger(model_dir)] == [0, 1, 2]


def test_corrupt_or_unbuildable_directory_refuses_unchanged(model_dir, capsys):
    cfg = json.loads((model_dir / "config.json").read_text())
    unit = sorted((model_dir / "units").iterdir())[0]
    victim = max((p for p in unit.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = victim.read_bytes()
    victim.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    for cmd in (["forget", model_dir, "--ids", _ids(model_dir)[0]], ["verify", model_dir],
                ["predict", model_dir]):
        assert "is corrupt" in refused(capsys, cmd, model_dir)
    victim.write_bytes(raw)
    # the factory named in config.json can no longer be imported
    (model_dir / "config.json").write_text(json.dumps({**cfg, "model": "tests.byo_factory:gone"}))
    err = refused(capsys, ["forget", model_dir, "--ids", _ids(model_dir)[0]], model_dir)
    assert "tests.byo_factory:gone" in err and "cannot be rebuilt now" in err
    assert sisa.cli(["status", str(model_dir)]) == 0  # status runs no model code
    assert json.loads(capsys.readouterr().out)["model"] == "tests.byo_factory:gone"


def test_write_lock_follows_a_lock_file_removed_by_a_refused_train(tmp_path):
    """A waiter that wakes on a lock file a refused ``train`` unlinked must lock the file now
    at ``LOCK``, else two writers would hold "the" lock at once."""
    got, done = threading.Event(), threading.Event()

    def waiter():
        with store.write_lock(tmp_path, "second", timeout=10):
            got.set()
            done.wait(10)

    with store.write_lock(tmp_path, "first"):
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)
        (tmp_path / "LOCK").unlink()
    assert got.wait(10)
    fd = ledger._try_write_lock(tmp_path)
    try:
        assert fd is None  # the second writer holds the lock on the file at LOCK
    finally:
        if fd is not None:
            os.close(fd)
        done.set()
        t.join()


def test_refused_train_leaves_nothing(tmp_path, capsys):
    x, y, ids = byo_factory.arrays()
    src = f"arrays:{write_npz(tmp_path / 'd.npz', x=x, y=y, ids=ids)}"
    nested = tmp_path / "new" / "deeper" / "model"
    base = ["train", nested, "--data", src, "--model", FACTORY, "--model-kwargs", KW, *SMALL]
    for flag, value, match in (("--shards", "5000", "--shards"), ("--shards", "0", "--shards"),
                               ("--slices", "0", "--slices"), ("--overlap", "1", "--overlap"),
                               ("--test-fraction", "1", "--test-fraction"),
                               ("--test-fraction", "-0.1", "--test-fraction"),
                               ("--batch-size", "0", "--batch-size")):
        args = [*base, flag, value]
        assert sisa.cli(list(map(str, args))) == 2
        err = capsys.readouterr().err
        assert match in err and value in err, err
        assert not (tmp_path / "new").exists()
    # training that diverges is refused after the directory was made: it is removed again,
    # with the parents this command created
    assert sisa.cli(list(map(str, [*base[:-1], "1e38"]))) == 2
    assert "diverged" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # an existing directory keeps exactly what it held
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert sisa.cli(list(map(str, ["train", mine, *base[2:-1], "1e38"]))) == 2
    capsys.readouterr()
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- test fraction 0


def test_test_fraction_zero_trains_on_everything(tmp_path, capsys):
    x, y, ids = byo_factory.arrays()
    src = f"arrays:{write_npz(tmp_path / 'd.npz', x=x, y=y, ids=ids)}"
    d = tmp_path / "all"
    assert sisa.cli(["train", str(d), "--data", src, "--model", FACTORY, "--model-kwargs", KW,
                     "--test-fraction", "0", *SMALL]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == len(ids)
    assert sorted(_ids(d)) == sorted(ids.tolist())
    gone = ids[[4, 17]].tolist()
    assert sisa.cli(["forget", str(d), "--ids", *gone]) == 0
    assert json.loads(capsys.readouterr().out)["forgotten"] == gone
    assert sisa.cli(["verify", str(d)]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["ok"] and v["max_abs_diff"] == 0.0
    err = refused(capsys, ["predict", d], d)
    assert "no held-out test split" in err and "--test-fraction 0" in err
    # the served model is training from scratch on everything but the forgotten ids
    st, _, test = sisa.load(d)
    assert len(test) == 0
    full = data.make(x, y, ids=ids, num_classes=3, name="arrays")
    scratch = sisa.train(st.model, full.without(gone), st.cfg, st.plan, st.key,
                         layout=st.layout)
    assert _max_diff(st.ckpts, scratch.ckpts) <= 1e-6


def test_test_fraction_zero_with_a_named_dataset(tmp_path, capsys):
    d = tmp_path / "digits"
    assert sisa.cli(["train", str(d), "--data", "digits", "--model", "logreg", "--test-fraction",
                     "0", "--shards", "2", "--slices", "1", "--epochs", "1", "--batch-size",
                     "64"]) == 0
    capsys.readouterr()
    s = data.load("digits")
    assert sorted(_ids(d)) == sorted(np.concatenate([s.train.ids, s.test.ids]).tolist())
    assert "no held-out test split" in refused(capsys, ["predict", d], d)


# ----------------------------------------------------------------------------- other messages


def test_select_forget_count_errors_name_count():
    ds = data.load("digits").train
    for bad in (-3, 0, True, 2.5):
        with pytest.raises(ValueError, match=f"count={bad!r}") as e:
            data.select_forget(ds, count=bad)
        assert "fraction=" not in str(e.value)
    with pytest.raises(ValueError, match=f"count={len(ds)} would forget every example"):
        data.select_forget(ds, count=len(ds))
    with pytest.raises(ValueError, match="fraction=1.0 would forget every example"):
        data.select_forget(ds, fraction=1.0)
    with pytest.raises(ValueError, match="fraction=0.0001 of"):
        data.select_forget(ds, fraction=1e-4)
    assert len(data.select_forget(ds, count=3)) == 3


def test_train_checks_the_output_width_before_training():
    ds = data.load("digits").train
    cfg = train.TrainConfig(epochs=1, batch_size=64)
    problem = train.Problem(models.mlp(3, (8,)), ds, cfg, jax.random.key(0))
    for call in (lambda: train.train(problem),
                 lambda: train.fit(problem.model, ds, cfg, problem.key)):
        with pytest.raises(ValueError, match="outputs 3 values per example") as e:
            call()
        assert "num_classes=10" in str(e.value) and "diverged" not in str(e.value)
    params = train.init_params(problem.model, ds, problem.key)
    # a model declaring another loss (e.g. squared error) is not a classifier: not checked
    for loss in ("squared_error", SimpleNamespace(name="squared_error")):
        other = SimpleNamespace(apply=problem.model.apply, name="regressor", loss=loss)
        assert train.check_outputs(other, params, ds) is None
    with pytest.raises(ValueError, match="num_classes=10"):
        train.check_outputs(SimpleNamespace(apply=problem.model.apply, name="m",
                                            loss="cross_entropy"), params, ds)


# ----------------------------------------------------------------------------- bring your own


def test_factory_model_and_arrays_data_through_every_command(model_dir, capsys):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model"] == FACTORY and cfg["model_kwargs"] == json.loads(KW)
    assert cfg["data_copy"] == "data.npz"  # the original .npz was deleted after training
    x, y, ids = byo_factory.arrays()
    a, b = _ids(model_dir, 0)[0], _ids(model_dir, 2)[1]
    # a fresh process imports the factory again from config.json
    if SHADOWED:
        pytest.skip(f"an installed package 'tests' ({_found.origin}) shadows tests/ in a fresh "
                    "process (kronfluence installs one)")
    r = subprocess.run([sys.executable, "-m", "unlearn.sisa", "forget", str(model_dir), "--ids",
                        a, b], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["forgotten"] == [a, b]
    stored = np.load(model_dir / "data.npz")["ids"].astype(str)  # forgotten rows removed
    assert a not in stored and b not in stored and len(stored) == len(ids) - 2
    assert sisa.cli(["verify", str(model_dir)]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["ok"] and v["max_abs_diff"] == 0.0 and v["shards_checked"] == [0, 2]
    assert sisa.cli(["predict", str(model_dir)]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["version"] == 1 and p["test_examples"] == len(ids) - len(_ids(model_dir))
    assert sisa.cli(["status", str(model_dir)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["model"] == FACTORY and s["forgotten"] == 2
    assert s["checkpoints_trained_on_forgotten_data"] == 0
    assert s["stored_data"] == "data.npz" and s["forgotten_examples_in_stored_data"] == 0
    # independently: the served model is the factory's model trained from scratch on the
    # original arrays without the forgotten ids
    st, _, _ = sisa.load(model_dir)
    assert st.model.name == "byo_tiny_mlp"
    full = data.make(x, y, ids=ids, num_classes=3, name="arrays")
    trained_ids = _ids(model_dir)
    scratch = sisa.train(byo_factory.tiny_mlp(8, 3), full.subset(full.positions(trained_ids))
                         .without([a, b]), st.cfg, st.plan, st.key, layout=st.layout)
    assert _max_diff(st.ckpts, scratch.ckpts) <= 1e-6


def test_importable_loaders(tmp_path, capsys):
    d = tmp_path / "split"
    assert sisa.cli(["train", str(d), "--data", "tests.byo_factory:loader_split", "--model",
                     FACTORY, "--model-kwargs", KW, *SMALL]) == 0
    capsys.readouterr()
    own = byo_factory.loader_split()
    assert sorted(_ids(d)) == sorted(own.train.ids.tolist())  # the loader's own split is kept
    assert sisa.cli(["forget", str(d), "--ids", own.test.ids[0], own.train.ids[0]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["forgotten"] == [own.train.ids[0]]
    assert "held-out test split" in out["not_trained_on"][own.test.ids[0]]
    assert sisa.cli(["predict", str(d)]) == 0
    assert json.loads(capsys.readouterr().out)["test_examples"] == len(own.test)
    d0 = tmp_path / "dataset"
    assert sisa.cli(["train", str(d0), "--data", "tests.byo_factory:loader_dataset", "--model",
                     FACTORY, "--model-kwargs", KW, "--test-fraction", "0", *SMALL]) == 0
    capsys.readouterr()
    assert sorted(_ids(d0)) == sorted(byo_factory.loader_dataset().ids.tolist())
    assert not (d0 / "data.npz").exists()  # a loader is re-imported, not copied


def test_bring_your_own_errors_name_the_argument(tmp_path, capsys):
    x, y, ids = byo_factory.arrays()
    good = f"arrays:{write_npz(tmp_path / 'd.npz', x=x, y=y, ids=ids)}"
    d = tmp_path / "m"
    cases = [
        (["--model", "tests.byo_factory:nope"], "--model", "has no attribute"),
        (["--model", "no_such_pkg.mod:fn"], "--model", "cannot import module 'no_such_pkg.mod'"),
        (["--model", "tests.byo_factory:NOT_CALLABLE"], "--model", "not a callable"),
        (["--model", "tests.byo_factory:not_a_model"], "--model",
         "not an unlearn.models.Model"),
        (["--model", "tests.byo_factory:broken"], "--model", "RuntimeError: the weights file"),
        (["--model", "nosuch"], "--model", "neither a model name"),
        (["--model", FACTORY, "--model-kwargs", "[8]"], "--model-kwargs", "JSON object"),
        (["--model", FACTORY, "--model-kwargs", "{bad"], "--model-kwargs", "is not JSON"),
        (["--model", FACTORY, "--model-kwargs", '{"depth": 2}'], "--model-kwargs", "depth"),
        (["--model", "mlp", "--model-kwargs", '{"depth": 2}'], "--model-kwargs", "depth"),
        (["--model", FACTORY, "--model-kwargs", '{"outputs": 2}'], "--model", "3 classes"),
    ]
    for extra, flag, match in cases:
        assert sisa.cli(["train", str(d), "--data", good, *SMALL, *extra]) == 2
        err = capsys.readouterr().err
        assert flag in err and match in err, (extra, err)
        assert not d.exists()
    bad_files = {
        "missing.npz": None,
        "keys.npz": dict(x=x, labels=y),
        "dup.npz": dict(x=x, y=y, ids=np.array(["a"] * len(y))),
        "obj.npz": dict(x=x, y=y, ids=np.array(list(ids), dtype=object)),
        "flat.npz": dict(x=x[:, 0], y=y),
        "classes.npz": dict(x=x, y=y, num_classes=np.int64(2)),
        "notzip.npz": b"plain text",
    }
    matches = {"missing.npz": "is not a file", "keys.npz": "unknown ['labels']",
               "dup.npz": "appear more than once", "obj.npz": "object array",
               "flat.npz": "one row per example", "classes.npz": "outside [0, num_classes=2)",
               "notzip.npz": "not a readable .npz"}
    for name, content in bad_files.items():
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif content is not None:
            np.savez(p, **content)
        assert sisa.cli(["train", str(d), "--data", f"arrays:{p}", *SMALL]) == 2
        err = capsys.readouterr().err
        assert f"--data arrays:{p}" in err and matches[name] in err, (name, err)
        assert not d.exists()
    for spec, match in (("tests.byo_factory:broken", "the loader raised RuntimeError"),
                        ("tests.byo_factory:not_a_model", "returned a dict")):
        assert sisa.cli(["train", str(d), "--data", spec, *SMALL]) == 2
        err = capsys.readouterr().err
        assert f"--data {spec!r}" in err and match in err, err
        assert not d.exists()
