"""The persistent SISA model directory: a deletion service that never loses a deletion or keeps
a forgotten example.

Layout of ``MODEL_DIR`` (format 2)::

    config.json        data, model, plan, training settings, seed (written once)
    layout.npz         every trained id, its shard, its earliest slice and a content hash
    ledger.jsonl       append-only: one JSON line per request (request 0 = training)
    units/<digest>/    one orbax PyTree checkpoint per (shard, stage): {params, opt_state}
    versions/vNNNNNN.json  the served version's manifest: the unit digest of every (stage, shard)
    LOCK, READ.lock    OS locks (fcntl.flock): one writer; readers vs the purge

**Commit point.** The ledger line of a request names the version it produced and the digest of
that version's manifest. A request writes its new units (unique temp name, then rename), then
the manifest, then appends its ledger line with ``O_APPEND`` and fsyncs the file and the
directory — the commit — and then purges. The served version is the last complete ledger line:
there is no separate pointer to get out of step. A torn last line (a crash mid-append) is not
committed; the next writer truncates it.

**Purge.** A unit (shard s, stage r) is trained on the examples of shard s in slices < r that
were alive when it was trained. After a deletion every stored unit that saw a forgotten example
is deleted: forget retrains exactly those units, and every unit not referenced by the new
manifest is removed (an unchanged unit has the same digest in both versions and is shared, so
is kept). The store therefore holds one version; the ledger keeps the history. ``status``
recomputes, from the ledger and the stored layout alone, that no stored unit has a forgotten
example in its training set.

**Why not orbax's CheckpointManager.** A CheckpointManager step is one self-contained directory
per version and can only delete whole steps. Here versions share most units (a one-id request
retrains one shard from one slice), and the purge must delete single (shard, stage) units of
the previous version while keeping the rest. So each unit is its own orbax ``PyTreeCheckpointer``
checkpoint (the pytree itself, not flattened leaves), stored under its content digest; versions
are manifests of digests. Identical units are stored once and the digest is checked on load.

**Exact verification.** ``verify`` retrains, from scratch on the retained data, every unit of
the shards that held a forgotten example and compares bit for bit (max |Δθ| must be 0). XLA's
CPU code for the vmapped step depends on the number of shard slots in the program (measured
here: up to 3e-8 in float32 between a 1-4-slot and an 8-slot program for the same shard), so
each unit records the slot count of the program that produced it and verify reruns each unit
with a program of that size. Retraining is deterministic on one machine, so any difference —
e.g. a forgotten example still in the training set — shows as a non-zero difference.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

FORMAT = 2
LEDGER = "ledger.jsonl"
CONFIG = "config.json"
LAYOUT = "layout.npz"
LOCK = "LOCK"
READ_LOCK = "READ.lock"
CURRENT = "CURRENT"  # format 1's pointer; its presence means an old directory
UNITS = "units"
VERSIONS = "versions"
LOCK_TIMEOUT = 600.0


class ModelDirError(RuntimeError):
    """A SISA model directory is missing, corrupt, inconsistent or busy."""


def _crash_point(name: str) -> None:
    """Hook for failure-injection tests (monkeypatched to raise, or to SIGKILL the process in
    the crash tests); does nothing otherwise."""
    env = os.environ.get("UNLEARN_SISA_CRASH_AT")
    if env == name:
        os.kill(os.getpid(), 9)


# ----------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    """A temp name unique to this writer (pid + random), next to ``final``."""
    return final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- locks


def _holder(root: Path) -> str:
    try:
        h = json.loads((root / LOCK).read_text() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
        return (f"pid {h['pid']} on host {h['host']} running {h['command']!r} since {since} "
                f"({time.time() - h['since']:.0f} s)")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (holder unknown)"


@contextmanager
def write_lock(root: Path, command: str, timeout: float = LOCK_TIMEOUT):
    """Exclusive writer lock on ``root`` (``fcntl.flock`` on ``root/LOCK``; released by the OS
    if the process dies). Waits up to ``timeout`` s, then fails naming the holder."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() - t0 >= timeout:
                    raise ModelDirError(
                        f"{root} is locked by {_holder(root)}; waited {timeout:.0f} s. Wait for "
                        "that command to finish (or raise --lock-timeout) and run this one "
                        "again; nothing was changed.") from None
                time.sleep(0.05)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "command": command, "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def _flock(path: Path, mode: int):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def _try_write_lock(root: Path):
    """The writer lock if it is free now, else ``None``."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


# ----------------------------------------------------------------------------- ledger

_ENTRY = {"request": int, "op": str, "version": int, "ids": list, "digest": str, "time": float}


def _check_entry(e, path: Path, n: int, expect: int) -> dict:
    where = f"{path} line {n}"
    if not isinstance(e, dict):
        raise ModelDirError(f"{where} is not a JSON object; the ledger is append-only and was "
                            "edited by hand: restore it from a backup.")
    for k, t in _ENTRY.items():
        v = e.get(k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) if t is float else \
            isinstance(v, t) and not (t is int and isinstance(v, bool))
        if not ok:
            raise ModelDirError(f"{where} has {k}={v!r}, expected a {t.__name__}; the ledger "
                                "line has the wrong shape: restore the ledger from a backup.")
    if not all(isinstance(i, str) for i in e["ids"]):
        raise ModelDirError(f"{where}: ids must be strings; restore the ledger from a backup.")
    if e["request"] != expect or e["version"] != expect:
        raise ModelDirError(f"{where} is request {e['request']} (version {e['version']}) but "
                            f"request {expect} was expected: the ledger is out of order or was "
                            "edited; restore it from a backup.")
    if (e["op"] == "train") != (expect == 0) or e["op"] not in ("train", "forget"):
        raise ModelDirError(f"{where} has op={e['op']!r}: request 0 is 'train', the rest "
                            "'forget'; restore the ledger from a backup.")
    return e


def read_ledger(root: str | Path, *, _torn: list | None = None) -> list[dict]:
    """The committed requests of ``root``'s ledger, oldest first (request 0 = training).

    A last line without its newline is a request torn by a crash mid-append: not committed,
    ignored here (and truncated by the next writer). Any complete line that is not a ledger
    entry of the right shape is an error."""
    path = Path(root) / LEDGER
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if _torn is not None:
        _torn.append(len(raw) - end)
    out = []
    for n, line in enumerate(raw[:end].decode("utf-8").splitlines()):
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise ModelDirError(f"{path} line {n + 1} is not JSON ({err}); the ledger is "
                                "append-only: restore it from a backup.") from err
        out.append(_check_entry(e, path, n + 1, len(out)))
    return out


def _append_ledger(root: Path, entry: dict) -> None:
    """Append one line with ``O_APPEND`` (one ``write``), fsync the file and the directory."""
    line = (json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(root / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, line) != len(line):
            raise ModelDirError(f"short write to {root / LEDGER}: disk full? nothing committed.")
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(root)


def _repair_ledger(root: Path) -> None:
    """Writer-only recovery: drop a torn (newline-less) last line left by a crash."""
    path = root / LEDGER
    torn: list = []
    read_ledger(root, _torn=torn)
    if torn and torn[0]:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - torn[0])
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- units


def _digest(tree) -> str:
    import jax

    h = hashlib.sha256()
    for a in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:40]


def _quiet_orbax():
    import logging

    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp


def _file_sums(d: Path) -> dict[str, str]:
    """sha256 of every file under a unit directory, by relative path."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            out[p.relative_to(d).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()[:32]
    return out


def _save_unit(root: Path, unit) -> tuple[str, dict]:
    """Save ``{params, opt_state}`` as ``units/<digest>`` unless that content is stored;
    returns the digest and the checksums of the unit's files."""
    digest = _digest(unit)
    final = root / UNITS / digest
    if final.exists():
        return digest, _file_sums(final)
    ocp = _quiet_orbax()
    tmp = _tmp_name(final)
    with ocp.PyTreeCheckpointer() as ck:  # closed: no orbax threads left at exit
        ck.save(tmp.resolve(), args=ocp.args.PyTreeSave(unit))
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    sums = _file_sums(tmp)
    os.rename(tmp, final)  # under the writer lock nobody else creates ``final``
    _fsync_dir(final.parent)
    return digest, sums


def _load_unit(root: Path, u: dict, template):
    """Restore one unit, after checking its files against the manifest's checksums (so a
    damaged checkpoint is reported before orbax reads it: a failed orbax restore leaves
    tensorstore callbacks that print "Event loop is closed" tracebacks at exit)."""
    import jax

    d = root / UNITS / u["digest"]
    sums = _file_sums(d) if d.is_dir() else {}
    want = u.get("files", {})
    bad = sorted(k for k in set(sums) | set(want) if sums.get(k) != want.get(k))
    if not sums or bad:
        what = "missing" if not sums else f"corrupt (files {bad[:5]} differ from the manifest)"
        raise ModelDirError(f"checkpoint {d} is {what}; nothing was changed. Restore the "
                            "directory from a backup or retrain with `python -m unlearn.sisa "
                            "train`.")
    ocp = _quiet_orbax()
    try:
        ra = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), template)
        with ocp.PyTreeCheckpointer() as ck:
            unit = ck.restore(d.resolve(), args=ocp.args.PyTreeRestore(item=template,
                                                                       restore_args=ra))
    except Exception as e:  # orbax raises many types for a damaged directory
        raise ModelDirError(f"checkpoint {d} is missing or corrupt ({type(e).__name__}: "
                            f"{str(e)[:200]}); nothing was changed. Restore the directory from "
                            "a backup or retrain with `python -m unlearn.sisa train`.") from e
    if _digest(unit) != u["digest"]:
        raise ModelDirError(f"checkpoint {d} is corrupt (checksum mismatch); nothing was "
                            "changed. Restore it from a backup or retrain.")
    return unit


# ----------------------------------------------------------------------------- manifest


def _manifest_path(root: Path, version: int) -> Path:
    return root / VERSIONS / f"v{version:06d}.json"


def _manifest_digest(units: list) -> str:
    grid = [[u["digest"] for u in row] for row in units]
    return hashlib.sha256(json.dumps(grid).encode()).hexdigest()


def _read_manifest(root: Path, entry: dict) -> dict:
    path = _manifest_path(root, entry["version"])
    try:
        m = json.loads(path.read_text())
        units = m["units"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelDirError(f"{path} (version {entry['version']}, committed by ledger request "
                            f"{entry['request']}) is missing or corrupt ({e}); restore the "
                            "directory from a backup.") from e
    if _manifest_digest(units) != entry["digest"]:
        raise ModelDirError(f"{path} does not match the digest in ledger request "
                            f"{entry['request']}; restore the directory from a backup.")
    return m


# ----------------------------------------------------------------------------- directory


@dataclasses.dataclass
class Dir:
    """What a model directory holds, read without touching the data or compiling anything."""

    root: Path
    cfg: dict
    ids: np.ndarray  # layout ids (the original training set)
    shard: np.ndarray
    slice: np.ndarray
    content: np.ndarray  # per-example content hash (hex)
    ledger: list
    manifest: dict

    @property
    def version(self) -> int:
        return self.ledger[-1]["version"]

    def forgotten(self) -> dict[str, int]:
        """Forgotten id -> the request that forgot it."""
        return {i: e["request"] for e in self.ledger for i in e["ids"]}


def _check_root(root: Path) -> None:
    if (root / CURRENT).exists() and not (root / LEDGER).exists():
        raise ModelDirError(f"{root} was written by an older version of unlearn (format 1, with "
                            f"a {CURRENT} pointer); retrain it with `python -m unlearn.sisa "
                            "train` into a new directory.")
    if not (root / CONFIG).exists():
        raise ModelDirError(f"{root} is not a SISA model directory (no {CONFIG}); create one "
                            "with `python -m unlearn.sisa train`.")


def _read_dir(root: Path) -> Dir:
    _check_root(root)
    try:
        cfg = json.loads((root / CONFIG).read_text())
        with np.load(root / LAYOUT, allow_pickle=False) as lay:
            ids, shard, sl, content = (lay["ids"].astype(str), lay["shard"], lay["slice"],
                                       lay["content"].astype(str))
    except (OSError, ValueError, KeyError) as e:
        raise ModelDirError(f"{root}: {CONFIG} or {LAYOUT} is missing or corrupt ({e}); "
                            "restore them from a backup.") from e
    if cfg.get("format") != FORMAT:
        raise ModelDirError(f"{root}/{CONFIG} has format {cfg.get('format')!r}, expected "
                            f"{FORMAT}: retrain with this version of unlearn.")
    ledger = read_ledger(root)
    if not ledger:
        raise ModelDirError(f"{root} has no committed training (empty {LEDGER}): the `train` "
                            "command was interrupted; delete the directory and train again.")
    return Dir(root, cfg, ids, shard, sl, content, ledger, _read_manifest(root, ledger[-1]))


def _stale(d: Dir) -> list[Path]:
    """Files that the served version does not reference: units of older versions (trained on
    data forgotten since), manifests of other versions, temp files of interrupted writers."""
    keep = {u["digest"] for row in d.manifest["units"] for u in row}
    out = []
    for sub in (UNITS, VERSIONS):
        p = d.root / sub
        if p.exists():
            for q in p.iterdir():
                if sub == UNITS and q.name in keep:
                    continue
                if sub == VERSIONS and q.name == _manifest_path(d.root, d.version).name:
                    continue
                out.append(q)
    out += [q for q in d.root.iterdir() if q.name.startswith(".tmp-")]
    return out


def _purge(d: Dir) -> int:
    """Delete every stale file (under the writer lock; waits for readers in flight)."""
    stale = _stale(d)
    if stale:
        with _flock(d.root / READ_LOCK, fcntl.LOCK_EX):
            for p in stale:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                _crash_point("during_purge")
            for sub in (UNITS, VERSIONS):
                _fsync_dir(d.root / sub)
    return len(stale)


def open_dir(root: str | Path, *, writer: bool = False) -> Dir:
    """Read a model directory. A writer (holding the lock) repairs a torn ledger line and
    purges stale files; a reader purges too when no writer is active, so the files of an
    interrupted request do not outlive it."""
    root = Path(root)
    if writer:
        _check_root(root)
        _repair_ledger(root)
        d = _read_dir(root)
        _purge(d)
        return d
    _check_root(root)  # before creating any lock file in a directory that is not a model
    with _flock(root / READ_LOCK, fcntl.LOCK_SH):
        d = _read_dir(root)
        stale = _stale(d)
    if stale:
        fd = _try_write_lock(root)
        if fd is not None:
            try:
                _repair_ledger(root)
                d = _read_dir(root)
                _purge(d)
            finally:
                os.close(fd)
    return d


# ----------------------------------------------------------------------------- data


def content_hash(ds) -> np.ndarray:
    """Per-example hash of the features and the label (hex), to notice changed files."""
    x = np.ascontiguousarray(ds.x).reshape(len(ds), -1)
    return np.array([hashlib.blake2b(x[i].tobytes() + int(ds.y[i]).to_bytes(8, "little"),
                                     digest_size=12).hexdigest() for i in range(len(ds))])


def _load_data(d: Dir):
    """(train set in layout order with zero rows for missing files, present mask, test set).

    Examples of the layout still on disk are checked against their stored content hash."""
    from unlearn import data as data_lib
    from unlearn.data import Dataset

    c = d.cfg
    split = data_lib.load(c["data"], seed=c["seed"], test_fraction=c.get("test_fraction", 0.25))
    full_x = np.concatenate([split.train.x, split.test.x])
    full_y = np.concatenate([split.train.y, split.test.y])
    full_ids = np.concatenate([split.train.ids, split.test.ids]).astype(str)
    index = {k: i for i, k in enumerate(full_ids.tolist())}
    rows = np.array([index.get(i, -1) for i in d.ids.tolist()])
    present = rows >= 0
    x = np.zeros((len(d.ids), *full_x.shape[1:]), full_x.dtype)
    y = np.zeros(len(d.ids), full_y.dtype)
    x[present], y[present] = full_x[rows[present]], full_y[rows[present]]
    tr = Dataset(x, y, d.ids, split.train.num_classes, split.train.name)
    got = content_hash(tr.subset(present))
    changed = d.ids[present][got != d.content[present]]
    if len(changed):
        raise ModelDirError(f"files {changed[:10].tolist()} changed since the model was trained "
                            "(content hash differs); restore the originals — exact forgetting "
                            "needs the training data as it was.")
    in_layout = np.isin(full_ids, d.ids)
    test = Dataset(full_x[~in_layout], full_y[~in_layout], full_ids[~in_layout],
                   split.train.num_classes, split.train.name)
    return tr, present, test


def _model_and_cfg(d: Dir):
    import jax

    from unlearn.sisa.plan import Plan
    from unlearn.train import TrainConfig

    c = d.cfg
    model = _model(c["model"], c["num_classes"], json.dumps(c.get("model_kwargs", {}),
                                                            sort_keys=True))
    return model, TrainConfig(**c["train"]), Plan(**c["plan"]), jax.random.key(c["seed"])


@functools.lru_cache(maxsize=16)
def _model(name: str, num_classes: int, kwargs: str):
    """One model object per static configuration, so the compile caches (keyed on the model's
    functions) are hit by every directory and command in a process with the same model."""
    from unlearn import models as models_lib

    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(kwargs).items()}
    return models_lib.make(name, num_classes, **kw)


def _template(model, cfg, x_shape, shards: int):
    """Shapes of one (params, opt_state) unit by shape inference (no compilation)."""
    import jax
    import jax.numpy as jnp

    from unlearn.train import cast, make_optimizer

    opt = make_optimizer(cfg)

    def one(k):
        p = cast(model.init(k, jnp.zeros((1, *x_shape), cfg.dtype)), cfg.dtype)
        return {"params": p, "opt_state": opt.init(p)}

    return jax.eval_shape(one, jax.random.key(0))


def _load_ckpts(d: Dir, model, cfg, x_shape):
    """The served checkpoints stacked (R+1, S) as ``(params, opt_state)`` host arrays."""
    import jax

    tmpl = _template(model, cfg, x_shape, len(d.manifest["units"][0]))
    rows = [[_load_unit(d.root, u, tmpl) for u in row] for row in d.manifest["units"]]
    stack = jax.tree.map(lambda *a: np.stack(a), *[jax.tree.map(lambda *b: np.stack(b), *row)
                                                   for row in rows])
    return stack["params"], stack["opt_state"]


def _split_units(ckpts) -> list[list]:
    """(R+1, S)-stacked (params, opt_state) -> grid of per-unit pytrees."""
    import jax

    p, o = ckpts
    n_r, n_s = jax.tree.leaves(p)[0].shape[:2]
    return [[{"params": jax.tree.map(lambda a, r=r, s=s: np.asarray(a[r, s]), p),
              "opt_state": jax.tree.map(lambda a, r=r, s=s: np.asarray(a[r, s]), o)}
             for s in range(n_s)] for r in range(n_r)]


def _write_version(root: Path, version: int, ckpts, units_meta: list) -> str:
    """Save the units not yet stored and the version's manifest; return its digest."""
    grid = _split_units(ckpts)
    for r, row in enumerate(grid):
        for s, unit in enumerate(row):
            units_meta[r][s]["digest"], units_meta[r][s]["files"] = _save_unit(root, unit)
    _crash_point("after_units")
    man = {"format": FORMAT, "version": version, "units": units_meta}
    (root / VERSIONS).mkdir(exist_ok=True)
    _write_atomic(_manifest_path(root, version), json.dumps(man, indent=0))
    return _manifest_digest(units_meta)


# ----------------------------------------------------------------------------- commands


def create(root: str | Path, *, data: str, model: str = "mlp", shards: int = 4, slices: int = 2,
           assignment: str = "uniform", overlap: float = 0.0, epochs: int = 20,
           lr: float = 1e-3, batch_size: int = 32, l2: float = 1e-4, seed: int = 0,
           test_fraction: float = 0.25, model_kwargs: dict | None = None,
           lock_timeout: float = LOCK_TIMEOUT):
    """Train a SISA model on dataset ``data`` and commit it as version 0 of ``root``."""
    import jax

    from unlearn import data as data_lib
    from unlearn import models as models_lib
    from unlearn.sisa.plan import Plan, check_config, check_finite, check_model
    from unlearn.sisa.train import train
    from unlearn.train import TrainConfig, bucket

    root = Path(root)
    plan = Plan(shards, slices, assignment, overlap)
    tc = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, l2=l2)
    check_config(tc)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; pass a directory for the model.")
    root.mkdir(parents=True, exist_ok=True)
    with write_lock(root, "train", lock_timeout):
        if (root / LEDGER).exists() or (root / CONFIG).exists() or (root / CURRENT).exists():
            raise FileExistsError(f"{root} already holds a SISA model; pick a new directory or "
                                  "delete it first.")
        split = data_lib.load(data, seed=seed, test_fraction=test_fraction)
        ds = split.train
        m = models_lib.make(model, ds.num_classes, **(model_kwargs or {}))
        check_model(m, ds, tc.dtype)
        state = train(m, ds, tc, plan, jax.random.key(seed))
        check_finite(state.ckpts)
        cfgd = {"format": FORMAT, "data": data, "model": model, "model_kwargs": model_kwargs or {},
                "seed": seed, "test_fraction": test_fraction, "num_classes": ds.num_classes,
                "plan": dataclasses.asdict(plan),
                "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "l2": l2}}
        tmp = _tmp_name(root / LAYOUT)
        with open(tmp, "wb") as f:
            np.savez(f, ids=state.layout.ids, shard=state.layout.shard,
                     slice=state.layout.slice, content=content_hash(ds))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / LAYOUT)
        (root / UNITS).mkdir(exist_ok=True)
        k = bucket(plan.shards)
        meta = [[{"request": 0, "slots": k} for _ in range(plan.shards)]
                for _ in range(plan.slices + 1)]
        digest = _write_version(root, 0, state.ckpts, meta)
        _write_atomic(root / CONFIG, json.dumps(cfgd, indent=1, ensure_ascii=False))
        _append_ledger(root, {"request": 0, "op": "train", "version": 0, "ids": [],
                              "digest": digest, "time": time.time(), "pid": os.getpid(),
                              "host": socket.gethostname()})
    return state


def load(root: str | Path, *, need_train: bool = True):
    """Open a model directory: ``(state, version, test set)``.

    ``state.data`` holds every trained id in layout order (a forgotten example whose file was
    deleted is a zero row, never trained on: ``alive`` is False). A retained example whose file
    is missing is an error unless ``need_train=False`` (prediction)."""
    st, d, test, _ = _state(open_dir(root), need_train)
    return st, d.version, test


def _state(d: Dir, need_train: bool):
    """``(state, dir, test set, present)``; ``present`` marks layout ids on disk. The version
    is re-read and its checkpoints loaded under one shared read lock, so a purge by a writer
    that committed meanwhile cannot delete them half-way: the state is one committed version."""
    from unlearn.data import stable_hash
    from unlearn.sisa.plan import Layout
    from unlearn.sisa.train import SisaState, resolve_strategy

    model, tc, plan, key = _model_and_cfg(d)
    tr, present, test = _load_data(d)  # depends on the layout only, which never changes
    with _flock(d.root / READ_LOCK, fcntl.LOCK_SH):
        d = _read_dir(d.root)
        ckpts = _load_ckpts(d, model, tc, tr.x.shape[1:])
    alive = ~np.isin(d.ids, list(d.forgotten()))
    missing = d.ids[alive & ~present]
    if need_train and len(missing):
        raise ModelDirError(f"retained examples {missing[:10].tolist()} ({len(missing)} in all) "
                            "are no longer in the data but were never forgotten: restore those "
                            "files, or forget them with `forget --ids ...`.")
    layout = Layout(d.ids, d.shard, d.slice, stable_hash(d.ids))
    st = SisaState(model, tc, plan, key, tr, layout, alive, ckpts,
                   resolve_strategy(model, "auto"))
    return st, d, test, present


def resolve_ids(ds_or_ids, names: Sequence[str], *, test_ids: Sequence[str] = (),
                argname: str = "--ids") -> list[str]:
    """Map each name to a trained id: an exact id, or a unique file name (``a.png`` for
    ``class/a.png``). A name of the wrong type, unknown, ambiguous (candidates listed) or only in
    the held-out test split (``test_ids``) is an error that says so."""
    ids, held_out, errs = _resolve(ds_or_ids, names, test_ids, argname)
    errs += [f"{n!r} is in the held-out test split ({i}), so the model never trained on it"
             for n, i in held_out.items()]
    if errs:
        raise KeyError(f"{argname}: " + "; ".join(errs[:10]) + ".")
    return ids


def _resolve(ds_or_ids, names, test_ids, argname):
    """(trained ids, {name: test id} for held-out names, error messages)."""
    ids = np.asarray(getattr(ds_or_ids, "ids", ds_or_ids)).astype(str).tolist()
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{argname} must be a list of id strings, not one string {names!r}.")
    wrong = [n for n in names if not isinstance(n, (str, np.str_))]
    if wrong:
        raise TypeError(f"{argname} {wrong[:10]} are {type(wrong[0]).__name__}, not str: ids "
                        f"are strings such as {ids[:2]}; pass them as text.")
    base: dict[str, list[str]] = {}
    for i in ids:
        base.setdefault(os.path.basename(i), []).append(i)
    test = np.asarray(test_ids).astype(str).tolist()
    tbase: dict[str, list[str]] = {}
    for i in test:
        tbase.setdefault(os.path.basename(i), []).append(i)
    known, tknown = set(ids), set(test)
    out, held_out, errs = [], {}, []
    for n in map(str, names):
        if n in known:
            out.append(n)
        elif len(base.get(n, [])) == 1:
            out.append(base[n][0])
        elif len(base.get(n, [])) > 1:
            errs.append(f"{n!r} names {len(base[n])} files: {base[n][:10]}; pass the full id "
                        "(class/file)")
        elif n in tknown or len(tbase.get(n, [])) == 1:
            held_out[n] = n if n in tknown else tbase[n][0]
        elif len(tbase.get(n, [])) > 1:
            errs.append(f"{n!r} names {len(tbase[n])} held-out files: {tbase[n][:10]}; pass "
                        "the full id (class/file)")
        else:
            errs.append(f"{n!r} is not in the dataset (ids look like {ids[:2]})")
    return out, held_out, errs


def forget_persistent(root: str | Path, names: Sequence[str], *,
                      lock_timeout: float = LOCK_TIMEOUT) -> dict:
    """Serve one deletion request on a model directory (under the writer lock).

    Order: retrain the affected units; save the new units and the manifest; append the ledger
    line (the commit point); purge every unit trained on a forgotten example. A crash before the
    ledger line leaves the old version served and the request repeatable; a crash after it is a
    committed request whose purge the next open finishes. An id forgotten by an earlier request
    is reported ("already forgotten by request N") and skipped; a request of only such ids is a
    no-op. Works after the forgotten files were deleted from the data.
    """
    from unlearn.sisa.plan import check_finite
    from unlearn.sisa.train import forget
    from unlearn.train import bucket

    root = Path(root)
    _check_root(root)
    with write_lock(root, "forget " + " ".join(map(str, names))[:200], lock_timeout):
        d = open_dir(root, writer=True)
        gone = d.forgotten()
        ids, held_out, errs = _resolve(d.ids, names, (), "--ids")
        if errs:  # names outside the training set: are they held-out test examples?
            ids, held_out, errs = _resolve(d.ids, names, _load_data(d)[2].ids, "--ids")
        if errs:
            raise KeyError("--ids: " + "; ".join(errs[:10]) + "; nothing was changed.")
        notes = {n: f"{i} is in the held-out test split: the model never trained on it, "
                    "nothing to forget" for n, i in held_out.items()}
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"--ids names {dup[:10]} more than once; pass each id once.")
        already = {i: gone[i] for i in ids if i in gone}
        todo = [i for i in ids if i not in gone]
        if not todo:
            return {"noop": True, "version": d.version, "not_trained_on": notes,
                    "already_forgotten": {i: f"already forgotten by request {n}"
                                          for i, n in already.items()}}
        state, d, _, present = _state(d, need_train=False)
        version = d.version
        missing = np.setdiff1d(state.data.ids[state.alive & ~present], todo)
        if len(missing):
            raise ModelDirError(f"retained examples {missing[:10].tolist()} ({len(missing)} in "
                                "all) are no longer in the data but were never forgotten: "
                                "restore those files, or add them to --ids.")
        new, stats = forget(state, todo)
        check_finite(new.ckpts, "retraining")
        pos = new.layout.positions(todo)
        shards = np.unique(new.layout.shard[pos])
        start = {int(s): int(new.layout.slice[pos][new.layout.shard[pos] == s].min())
                 for s in shards}
        meta = [[dict(u) for u in row] for row in d.manifest["units"]]
        v = version + 1
        for s, r0 in start.items():
            for r in range(r0 + 1, state.plan.slices + 1):
                meta[r][s] = {"request": v, "slots": bucket(len(shards))}
        digest = _write_version(root, v, new.ckpts, meta)
        _crash_point("after_checkpoint")
        _append_ledger(root, {"request": v, "op": "forget", "version": v, "ids": todo,
                              "digest": digest, "time": time.time(), "pid": os.getpid(),
                              "host": socket.gethostname(),
                              "shards_retrained": stats["shards_retrained"]})
        _crash_point("after_ledger")
        purged = _purge(_read_dir(root))
    return {"noop": False, "version": v, "forgotten": todo, "purged_files": purged,
            "not_trained_on": notes,
            "already_forgotten": {i: f"already forgotten by request {n}"
                                  for i, n in already.items()}, **stats}


def verify(root: str | Path) -> dict:
    """Retrain from scratch, on the retained data, every unit of the shards that held a
    forgotten example (every shard if nothing was forgotten) and compare bit for bit with the
    stored units (see the module docstring for why this is exact). Retained examples missing
    from the data are listed, and their shards reported unverifiable (``ok`` false)."""
    import jax

    from unlearn.sisa.train import _data_arrays, _init_stack, _run_stages

    state, d, _, present = _state(open_dir(root), need_train=False)
    version = d.version
    lay = state.layout
    missing = state.data.ids[state.alive & ~present]
    gone = state.data.ids[~state.alive]
    shards = np.unique(lay.lookup(gone)[0]) if len(gone) else np.arange(state.plan.shards)
    bad_shards = np.unique(lay.lookup(missing)[0]) if len(missing) else np.array([], int)
    check = np.setdiff1d(shards, bad_shards)
    out = {"version": version, "shards_checked": [int(s) for s in check],
           "units_checked": 0, "max_abs_diff": None, "missing_retained": missing.tolist(),
           "unverifiable_shards": [int(s) for s in np.intersect1d(shards, bad_shards)]}
    if len(check) == 0:
        out["ok"] = False
        out["reason"] = ("nothing could be checked: every shard to verify has retained examples "
                         "missing from the data (listed in missing_retained); restore them.")
        return out
    R, S = state.plan.slices, state.plan.shards
    p0, o0 = _init_stack(state.model, state.data, state.cfg, state.key, S)
    ref = jax.tree.map(lambda a: np.array(np.broadcast_to(a, (R + 1, *a.shape))), (p0, o0))
    units = d.manifest["units"]
    # segments of each shard: consecutive stages produced by one request (same program size)
    segs = {}
    for s in check.tolist():
        seg, r = [], 1
        while r <= R:
            b = r
            while b + 1 <= R and _producer(units[b + 1][s]) == _producer(units[r][s]):
                b += 1
            seg.append((r, b, units[r][s]["slots"]))
            r = b + 1
        segs[s] = seg
    x, y = _data_arrays(state)
    while any(segs.values()):
        heads = {s: seg[0] for s, seg in segs.items() if seg}
        for k in sorted({h[2] for h in heads.values()}):
            group = [s for s, h in heads.items() if h[2] == k]
            others = [s for s in range(S) if s not in group]
            pad = (others * k)[: max(0, k - len(group))] if others else [group[0]] * (
                k - len(group))
            sh = np.array(group + pad)
            st = np.array([heads[s][0] - 1 for s in group] + [R] * len(pad))
            ck, _ = _run_stages(state._replace(ckpts=ref, mesh=None), sh, st, x, y)
            for s in group:
                a, b, _ = heads[s]
                ref = jax.tree.map(lambda dst, src, s=s, a=a, b=b: _put(dst, src, s, a, b),
                                   ref, ck)
                segs[s] = segs[s][1:]
    diff = 0.0
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state.ckpts), strict=True):
        a, b = np.asarray(a)[:, check], np.asarray(b)[:, check]
        diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    out.update(units_checked=int(len(check) * (R + 1)), max_abs_diff=diff,
               ok=diff == 0.0 and not len(missing))
    if len(missing):
        out["reason"] = ("retained examples are missing from the data (missing_retained): the "
                         "checked shards match, but the data no longer matches the model; "
                         "restore those files or forget them.")
    return out


def _producer(u: dict) -> tuple:
    return u["request"], u["slots"]


def _put(dst, src, s, a, b):
    dst = np.array(dst)
    dst[a: b + 1, s] = np.asarray(src)[a: b + 1, s]
    return dst


def status(root: str | Path) -> dict:
    """Version served, requests, forgotten ids, shard sizes and the provenance of every stored
    checkpoint — computed from the directory alone (no data, no JAX compilation)."""
    d = open_dir(root)
    gone = d.forgotten()
    plan = d.cfg["plan"]
    S, R = plan["shards"], plan["slices"]
    g_ids = np.array(sorted(gone), dtype=str)
    pos = np.nonzero(np.isin(d.ids, g_ids))[0]
    g_shard, g_slice = d.shard[pos], d.slice[pos]
    g_req = np.array([gone[i] for i in d.ids[pos].tolist()], int)
    units, bad = [], []
    for r, row in enumerate(d.manifest["units"]):
        for s, u in enumerate(row):
            # unit (s, r) trained on shard s, slices < r, minus ids forgotten by requests ≤ u's
            seen = (g_shard == s) & (g_slice < r) & (g_req > u["request"])
            units.append({"shard": s, "stage": r, "digest": u["digest"],
                          "trained_by_request": u["request"],
                          "forgotten_examples_in_training_set": int(seen.sum())})
            if seen.any():
                bad.append((s, r))
    alive = ~np.isin(d.ids, g_ids)
    stored = {q.name for q in (d.root / UNITS).iterdir()}
    listed = {u["digest"] for u in units}
    return {"version": d.version, "requests": len(d.ledger) - 1, "forgotten": len(gone),
            "shards": S, "slices": R,
            "shard_sizes": np.bincount(d.shard[alive], minlength=S).tolist(),
            "consistent_with_request": d.version,
            "checkpoints_stored": len(stored),
            "checkpoints_trained_on_forgotten_data": len(bad),
            "unreferenced_files": sorted(stored - listed),
            "provenance": units}
