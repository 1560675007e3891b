"""The persistent SISA deletion service (issue 10): ledger, lock, purge, provenance, exact
verify, data deleted after a deletion, crashes at every write boundary, concurrent writers and
bad input. Tiny image folder (PNG/JPEG written with PIL, names with spaces and unicode) and a
tiny MLP so the whole file stays fast."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from unlearn import data, models, sisa, train
from unlearn.sisa import ledger, store

ROOT = Path(__file__).resolve().parent.parent
# float32, same machine: a forget and a from-scratch training in programs with different
# numbers of shard slots can differ by a few ulps (measured 3e-8); verify itself is exact.
ATOL = 1e-6
TRAIN = ["--model", "mlp", "--shards", "3", "--slices", "2", "--epochs", "2",
         "--batch-size", "4", "--lr", "0.01"]


def image_folder(root: Path, n_per: int = 8) -> Path:
    rng = np.random.default_rng(0)
    colours = {"Away": (200, 30, 30), "Home": (30, 30, 200), "Third": (30, 160, 30)}
    for cname, col in colours.items():
        (root / cname).mkdir(parents=True)
        for i in range(n_per):
            img = np.clip(np.array(col) + rng.normal(0, 25, (6, 6, 3)), 0, 255).astype(np.uint8)
            name = (f"{cname} image {i:02d}.JPG" if i == 5 else f"{cname}_été_{i:02d}.png"
                    if i == 6 else f"{cname}_image{i:02d}.JPG")
            Image.fromarray(img).save(root / cname / name, quality=95)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("sisa_store")
    imgs = image_folder(base / "imgs")
    d = base / "model"
    assert sisa.cli(["train", str(d), "--data", f"folder:{imgs}", "--test-fraction", "0.2",
                     *TRAIN]) == 0
    return imgs, d


@pytest.fixture
def model_dir(trained, tmp_path):
    """A private copy of the trained image folder and model directory."""
    imgs, d = trained
    shutil.copytree(imgs, tmp_path / "imgs")
    shutil.copytree(d, tmp_path / "model")
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    cfg["data"] = f"folder:{tmp_path / 'imgs'}"
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "model"


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _trained_names(d, shard=None):
    lay = np.load(d / "layout.npz")
    ids = lay["ids"].astype(str)
    return [i for i, s in zip(ids.tolist(), lay["shard"].tolist(), strict=True)
            if shard is None or s == shard]


def _run(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "unlearn.sisa", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------- purge scan


def purge_scan(d: Path) -> dict:
    """Walk every file of the model directory. Every checkpoint found is restored with orbax
    directly and must equal (≤ ATOL) the unit at its (shard, stage) of a model trained FROM
    SCRATCH on the data minus every id in the ledger — so none can hold a forgotten example —
    and no file may be anything but bookkeeping or part of such a checkpoint."""
    ledger = [json.loads(x) for x in (d / "ledger.jsonl").read_text().splitlines()]
    gone = [i for e in ledger for i in e["ids"]]
    st, _, _ = sisa.load(d, need_train=False)
    keep = ~np.isin(st.data.ids, gone)
    clean = sisa.train(st.model, st.data.subset(keep), st.cfg, st.plan, st.key,
                       layout=st.layout)
    p, o = clean.ckpts
    R, S = st.plan.slices, st.plan.shards
    ref = {(r, s): {"variables": jax.tree.map(lambda a, r=r, s=s: np.asarray(a[r, s]), p),
                    "opt_state": jax.tree.map(lambda a, r=r, s=s: np.asarray(a[r, s]), o)}
           for r in range(R + 1) for s in range(S)}
    bookkeeping = {"config.json", "layout.npz", "ledger.jsonl", "LOCK", "READ.lock"}
    units, strays, matched = set(), [], set()
    for f in d.rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(d).parts
        if len(rel) == 1 and rel[0] in bookkeeping:
            continue
        if rel[0] == "versions" and len(rel) == 2 and rel[1].endswith(".json"):
            continue
        if rel[0] == "units" and len(rel) >= 3:
            units.add(d / "units" / rel[1])
            continue
        strays.append(str(f))
    template = ref[(0, 0)]
    ra = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), template)
    bad = []
    for u in sorted(units):
        with ocp.PyTreeCheckpointer() as ck:
            got = ck.restore(u.resolve(), args=ocp.args.PyTreeRestore(item=template,
                                                                      restore_args=ra))
        hits = [k for k, v in ref.items() if _max_diff(got, v) <= ATOL]
        if hits:
            matched.update(hits)
        else:
            bad.append(u.name)
    return {"checkpoints": len(units), "trained_on_forgotten": bad, "strays": strays,
            "complete": len(matched) == len(ref), "forgotten": gone}


def test_forget_purges_everything_trained_on_forgotten_data(model_dir, capsys):
    st0, v0, _ = sisa.load(model_dir)
    units0 = {p.name for p in (model_dir / "units").iterdir()}
    a_id = _trained_names(model_dir, 0)[1]
    a = a_id.split("/")[1]
    assert sisa.cli(["forget", str(model_dir), "--ids", a]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == v0 + 1 and not out["noop"] and out["purged_files"] > 0
    b = _trained_names(model_dir, 1)[0]
    assert sisa.cli(["forget", str(model_dir), "--ids", b]) == 0
    capsys.readouterr()
    scan = purge_scan(model_dir)
    assert scan["trained_on_forgotten"] == [] and scan["strays"] == [] and scan["complete"]
    # the original version's checkpoints of the affected shards are gone, the rest are shared
    units2 = {p.name for p in (model_dir / "units").iterdir()}
    assert units0 - units2 and units0 & units2
    assert [p.name for p in (model_dir / "versions").iterdir()] == ["v000002.json"]
    # status proves the same from the ledger and the layout alone
    assert sisa.cli(["status", str(model_dir)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["checkpoints_trained_on_forgotten_data"] == 0 and s["forgotten"] == 2
    assert s["checkpoints_stored"] == scan["checkpoints"] == len(units2)
    assert {u["digest"] for u in s["provenance"]} == units2
    assert all(u["forgotten_examples_in_training_set"] == 0 for u in s["provenance"])
    assert {u["trained_by_request"] for u in s["provenance"]} == {0, 1, 2}
    # the served model equals training without both ids from scratch
    st, v, _ = sisa.load(model_dir)
    scratch = sisa.train(st0.model, st0.data.without([a_id, b]), st0.cfg, st0.plan,
                         st0.key, layout=st0.layout)
    assert v == 2 and _max_diff(st.ckpts, scratch.ckpts) <= ATOL
    # repeated forget: a no-op naming the request; unknown name: an error, nothing changed
    assert sisa.cli(["forget", str(model_dir), "--ids", a]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["noop"] and out["already_forgotten"] == {
        a_id: "already forgotten by request 1"}
    assert sisa.cli(["forget", str(model_dir), "--ids", "nobody.png", a]) == 2
    assert "'nobody.png' is not in the dataset" in capsys.readouterr().err
    assert len(sisa.read_ledger(model_dir)) == 3


def test_verify_float32_exact_after_five_chained_requests(model_dir, monkeypatch):
    lay = np.load(model_dir / "layout.npz")
    rows = list(zip(lay["ids"].astype(str).tolist(), lay["shard"].tolist(),
                    lay["slice"].tolist(), strict=True))
    by = {(s, r): [i for i, s_, r_ in rows if (s_, r_) == (s, r)] for s in range(3)
          for r in range(2)}
    # one 3-shard request (4 slots), three 1-shard requests from slice 0 (each rewrites a whole
    # shard with a 1-slot program), one 2-shard request from slice 1 (2 slots)
    requests = [[by[0, 1][0], by[1, 1][0], by[2, 1][0]], [by[0, 0][0]], [by[1, 0][0]],
                [by[2, 0][0]], [by[0, 1][1], by[1, 1][1]]]
    for r in requests:
        assert not store.forget_persistent(model_dir, r)["noop"]
    sisa_train = sys.modules["unlearn.sisa.train"]  # the module (``sisa.train`` is a function)
    calls, real = [], sisa_train._run_stages
    units = store.open_dir(model_dir).manifest["units"]

    def spy(state, shards, start, x, y):
        # the slot counts recorded for the first checkpoint each real slot reproduces
        want = {units[r + 1][s]["slots"] for s, r in zip(shards.tolist(), start.tolist(),
                                                         strict=True) if r < state.plan.slices}
        calls.append((len(shards), want))
        return real(state, shards, start, x, y)

    monkeypatch.setattr(sisa_train, "_run_stages", spy)
    res = sisa.verify(model_dir)
    # each program has exactly the slot count recorded for the checkpoints it reproduces (XLA
    # CPU results depend on it: measured 3e-8 between 1- and 8-slot programs)
    assert calls and all(want == {n} for n, want in calls)
    assert {n for n, _ in calls} >= {1, 2}
    assert res["ok"] and res["max_abs_diff"] == 0.0 and res["units_checked"] == 9
    assert res["version"] == 5 and res["missing_retained"] == []
    # a model that is NOT the retrained one is caught: serve another unit in one slot
    d = store.open_dir(model_dir)
    units = d.manifest["units"]
    units[2][0], units[2][1] = units[2][1], units[2][0]
    man = ledger._manifest_path(model_dir, 5)
    man.write_text(json.dumps({**json.loads(man.read_text()), "units": units}))
    with pytest.raises(sisa.ModelDirError, match="does not match the digest"):
        sisa.verify(model_dir)  # the manifest no longer matches its ledger entry


def test_forget_then_delete_the_files(model_dir, capsys):
    imgs = Path(json.loads((model_dir / "config.json").read_text())["data"][7:])
    a, b = _trained_names(model_dir, 0)[:2]
    assert sisa.cli(["forget", str(model_dir), "--ids", a, b]) == 0
    capsys.readouterr()
    for i in (a, b):
        (imgs / i).unlink()  # the natural next step
    assert sisa.cli(["status", str(model_dir)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["forgotten"] == 2 and s["checkpoints_trained_on_forgotten_data"] == 0
    assert sisa.cli(["forget", str(model_dir), "--ids", a.split("/")[1]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["noop"] and out["already_forgotten"] == {a: "already forgotten by request 1"}
    assert sisa.cli(["verify", str(model_dir)]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["ok"] and v["max_abs_diff"] == 0.0 and v["shards_checked"] == [0]
    assert v["units_checked"] == 3
    # a further request still works without the deleted files
    c = _trained_names(model_dir, 1)[0]
    assert sisa.cli(["forget", str(model_dir), "--ids", c]) == 0
    capsys.readouterr()
    assert purge_scan(model_dir)["trained_on_forgotten"] == []
    # a retained example deleted without a request: verify names it and does not say ok
    lost = _trained_names(model_dir, 2)[0]
    (imgs / lost).unlink()
    assert sisa.cli(["verify", str(model_dir)]) == 1
    v = json.loads(capsys.readouterr().out)
    assert not v["ok"] and v["missing_retained"] == [lost] and v["unverifiable_shards"] == []
    assert v["shards_checked"] == [0, 1]
    d = _trained_names(model_dir, 1)[1]
    assert sisa.cli(["forget", str(model_dir), "--ids", d]) == 2
    assert lost in capsys.readouterr().err
    assert len(sisa.read_ledger(model_dir)) == 3  # unchanged by the refused request


# ----------------------------------------------------------------------------- crashes, locks


@pytest.mark.parametrize("where", ["after_units", "after_checkpoint", "after_ledger",
                                   "during_purge"])
def test_sigkill_at_each_write_boundary(model_dir, where):
    name = _trained_names(model_dir, 1)[0]
    r = _run("forget", model_dir, "--ids", name, env={"UNLEARN_SISA_CRASH_AT": where})
    assert r.returncode == -signal.SIGKILL, r.stderr
    committed = where in ("after_ledger", "during_purge")
    s = sisa.status(model_dir)  # opening finishes the interrupted purge
    assert s["version"] == int(committed) and s["forgotten"] == int(committed)
    assert s["checkpoints_trained_on_forgotten_data"] == 0 and s["unreferenced_files"] == []
    out = store.forget_persistent(model_dir, [name])
    assert out["noop"] == committed
    scan = purge_scan(model_dir)
    assert scan["trained_on_forgotten"] == [] and scan["strays"] == [] and scan["complete"]
    assert sisa.verify(model_dir)["max_abs_diff"] == 0.0


def test_second_writer_waits_then_names_the_holder(model_dir, capsys):
    with store.write_lock(model_dir, "forget --ids held-by-test"):
        rc = sisa.cli(["forget", str(model_dir), "--ids", _trained_names(model_dir)[0],
                       "--lock-timeout", "0.3"])
        err = capsys.readouterr().err
        assert sisa.status(model_dir)["version"] == 0  # readers are not blocked
    assert rc == 2
    assert f"pid {os.getpid()}" in err and "held-by-test" in err and "waited 0 s" in err
    assert len(sisa.read_ledger(model_dir)) == 1


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_concurrent_forgets_in_subprocesses(model_dir, n):
    names = [_trained_names(model_dir, s % 3)[3 + s // 3] for s in range(n)]
    procs = [subprocess.Popen([sys.executable, "-m", "unlearn.sisa", "forget", str(model_dir),
                               "--ids", n], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in names]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [e for _, e in outs]
    assert not any("Traceback" in e or "Event loop is closed" in e for _, e in outs)
    led = sisa.read_ledger(model_dir)
    assert sorted(i for e in led for i in e["ids"]) == sorted(names)
    assert [e["version"] for e in led] == list(range(n + 1))
    v = sisa.verify(model_dir)
    assert v["ok"] and v["max_abs_diff"] == 0.0
    assert purge_scan(model_dir)["trained_on_forgotten"] == []


def test_torn_and_malformed_ledger_lines(model_dir):
    led = model_dir / "ledger.jsonl"
    with open(led, "ab") as f:
        f.write(b'{"request": 1, "op": "forget", "ver')  # a crash mid-append
    assert sisa.status(model_dir)["version"] == 0
    assert not store.forget_persistent(model_dir, [_trained_names(model_dir)[0]])["noop"]
    assert [e["request"] for e in sisa.read_ledger(model_dir)] == [0, 1]
    good = led.read_bytes()
    for bad, match in ((b'{"request": 1, "op": "forget"}\n', "wrong shape"),
                       (b"[1, 2]\n", "not a JSON object"), (b"garbage\n", "not JSON"),
                       (b'{"request": 7, "op": "forget", "version": 7, "ids": [], "digest": "x",'
                        b' "time": 1.0}\n', "out of order")):
        led.write_bytes(good + bad)
        with pytest.raises(sisa.ModelDirError, match=match):
            sisa.status(model_dir)
        assert sisa.cli(["forget", str(model_dir), "--ids", "x"]) == 2
    led.write_bytes(good)
    man = next((model_dir / "versions").iterdir())
    man.write_text("garbage")  # the version pointer / manifest
    with pytest.raises(sisa.ModelDirError, match="v000001.json .* is missing or corrupt"):
        sisa.status(model_dir)
    (model_dir / "ledger.jsonl").unlink()
    (model_dir / "CURRENT").write_text("garbage\n")  # a directory of the old format
    with pytest.raises(sisa.ModelDirError, match="older version"):
        sisa.status(model_dir)
    with pytest.raises(sisa.ModelDirError, match="not a SISA model"):
        sisa.status(model_dir.parent / "nowhere")


def test_corrupt_checkpoint_is_a_clear_error(model_dir, capsys):
    unit = sorted((model_dir / "units").iterdir())[0]
    victim = max((p for p in unit.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert sisa.cli(["forget", str(model_dir), "--ids", _trained_names(model_dir)[0]]) == 2
    assert "nothing was changed" in capsys.readouterr().err
    assert len(sisa.read_ledger(model_dir)) == 1
    shutil.rmtree(next(p for p in unit.iterdir() if p.name.startswith("ocdbt")))
    r = _run("predict", model_dir)  # once printed asyncio "Event loop is closed" tracebacks
    assert r.returncode == 2 and "is corrupt" in r.stderr and "Traceback" not in r.stderr


def test_cli_is_quiet_and_status_compiles_nothing(model_dir):
    code = ("import jax; jax.config.update('jax_log_compiles', True); import sys; "
            "from unlearn.sisa.cli import cli; sys.exit(cli(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "status", str(model_dir)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 0
    assert "ompil" not in r.stderr, r.stderr  # no "Compiling ..." / "Finished ... compilation"
    r = _run("forget", model_dir, "--ids", _trained_names(model_dir)[0])
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no orbax/asyncio tracebacks


# ----------------------------------------------------------------------------- ids and input


def test_ids_names_and_types(model_dir, capsys, tmp_path):
    ds = data.load("digits").train
    with pytest.raises(TypeError, match="never positions"):
        data.select_forget(ds, kind="ids", ids=[2])
    with pytest.raises(TypeError, match="int"):
        ds.positions([ds.ids[0], 3])
    assert data.select_forget(ds, kind="ids", ids=[ds.ids[1]]).tolist() == [ds.ids[1]]
    st, _, test = sisa.load(model_dir)
    with pytest.raises(TypeError, match="int"):
        sisa.forget(st, [2])
    with pytest.raises(TypeError, match="not str"):
        sisa.resolve_ids(st.data, [2])
    # a file held out for testing says so, and is not an error in a request with others
    held = test.ids[0]
    with pytest.raises(KeyError, match="held-out test split"):
        sisa.resolve_ids(st.data, [held.split("/")[1]], test_ids=test.ids)
    assert sisa.cli(["forget", str(model_dir), "--ids", held.split("/")[1],
                     st.data.ids[0]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["forgotten"] == [st.data.ids[0]]
    assert "held-out test split" in out["not_trained_on"][held.split("/")[1]]
    # one file name in two class folders: the candidates are listed
    imgs = Path(json.loads((model_dir / "config.json").read_text())["data"][7:])
    dup = st.data.ids[5].split("/")[1]
    other = next(c for c in ("Away", "Home", "Third") if c != st.data.ids[5].split("/")[0])
    shutil.copy(imgs / st.data.ids[5], imgs / other / dup)
    two = data.image_folder(str(imgs), size=(6, 6))
    with pytest.raises(KeyError, match="names 2 files") as e:
        sisa.resolve_ids(two, [dup])
    assert st.data.ids[5] in str(e.value) and f"{other}/{dup}" in str(e.value)


def test_bad_training_input_is_a_clear_error(tmp_path, capsys):
    imgs = image_folder(tmp_path / "imgs", n_per=4)
    spec = f"folder:{imgs}"
    d = tmp_path / "m"
    for flag, value, match in (("--batch-size", "0", "batch_size=0"),
                               ("--epochs", "0", "epochs=0"), ("--lr", "nan", "lr=nan"),
                               ("--lr", "inf", "lr=inf"), ("--lr", "-1", "lr=-1")):
        args = dict(zip(TRAIN[::2], TRAIN[1::2], strict=True)) | {flag: value}
        assert sisa.cli(["train", str(d), "--data", spec,
                         *[x for kv in args.items() for x in kv]]) == 2
        err = capsys.readouterr().err
        assert match in err and flag in err
        assert not d.exists()  # a refused train leaves nothing
    # diverged training: nothing saved, the directory it made removed again
    assert sisa.cli(["train", str(d), "--data", spec, *TRAIN[:-1], "1e38"]) == 2
    assert "diverged" in capsys.readouterr().err and not d.exists()
    # a model with fewer outputs than classes
    ds = data.image_folder(str(imgs), size=(6, 6))
    with pytest.raises(ValueError, match="3 classes"):
        sisa.train(models.mlp(2, (8,)), ds, train.TrainConfig(epochs=1, batch_size=4),
                   sisa.Plan(2, 1), jax.random.key(0))
    # a path without folder:
    with pytest.raises(FileNotFoundError, match="folder:PATH"):
        data.load(str(tmp_path / "no_such_dir"))
    assert sisa.cli(["train", str(d), "--data", "./no/such/images"]) == 2
    assert "folder:PATH" in capsys.readouterr().err


def test_image_folder_bad_files(tmp_path):
    imgs = image_folder(tmp_path / "imgs", n_per=3)
    hidden = imgs / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(next((imgs / "Away").iterdir()), hidden / "Away_image00-checkpoint.JPG")
    ds = data.image_folder(str(imgs), size=(6, 6))
    assert ds.classes == ["Away", "Home", "Third"] and len(ds) == 9  # hidden: not a class
    (imgs / "Empty").mkdir()
    with pytest.raises(ValueError, match="Empty holds no images"):
        data.image_folder(str(imgs))
    (imgs / "Empty").rmdir()
    (imgs / "Home" / "broken.JPG").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.JPG cannot be read"):
        data.image_folder(str(imgs))
