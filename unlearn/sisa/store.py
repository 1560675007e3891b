"""The persistent SISA model directory: a deletion service that never loses a deletion or keeps
a forgotten example.

Layout of ``MODEL_DIR`` (format 2)::

    config.json        data, model, plan, training settings, seed (written once)
    layout.npz         every trained id, its shard, its earliest slice and a content hash
    data.npz           only for ``--data arrays:PATH``: the examples, copied at training
                       (forgotten rows are removed from it by the purge)
    ledger.jsonl       append-only: one JSON line per request (request 0 = training)
    units/<digest>/    one orbax PyTree checkpoint per (shard, stage): {variables, opt_state}
    versions/vNNNNNN.json  the served version's manifest: the unit digest of every (stage, shard)
    LOCK, READ.lock    OS locks (fcntl.flock): one writer; readers vs the purge

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

**Commit point.** The ledger line of a request names the version it produced and the digest of
that version's manifest. A request writes its new units (unique temp name, then rename), then
the manifest, then appends its ledger line with ``O_APPEND`` and fsyncs the file and the
directory — the commit — and then purges. The served version is the last complete ledger line:
there is no separate pointer to get out of step.

**The ledger's last line.** Every committed line ends in a newline (one ``write`` of the whole
line). A last line without its newline is one of two things. If it parses as the next entry it
is a whole line that lost only its newline: it is committed, and recovery appends the newline.
If it does not parse it is an append torn by a crash before the commit — the previous version
is still in place, its manifest on disk — so it is not committed: readers ignore it and
recovery truncates it. A torn line *after* whose previous version was already purged is a
committed line damaged since (a truncated file): an error asking for a backup; it is never
"repaired" away, since that would drop a recorded deletion.

**Refusals change nothing.** A command that refuses (exit 2: bad input, unknown ids, changed
or missing data, a corrupt or busy directory, retraining that diverged) leaves every file of the
directory byte-identical except the OS lock files ``LOCK`` and ``READ.lock``: every check runs
before the first write. Recovery from an interrupted writer (the ledger tail above, purging its
files, removing forgotten rows from ``data.npz``) is a write too, so only a command that gets
past its checks does it: ``forget`` right before it writes its own request; ``status``,
``verify``, ``predict`` and :func:`load` after their checks pass, and only when no writer is
active. A refused ``train`` removes what it made: the directory (and parents) it created, or the
files it added to an existing one.

**Purge.** A unit (shard s, stage r) is trained on the examples of shard s in slices < r that
were alive when it was trained. After a deletion every stored unit that saw a forgotten example
is deleted: forget retrains exactly those units, and every unit not referenced by the new
manifest is removed (an unchanged unit has the same digest in both versions and is shared, so
is kept). The store therefore holds one version; the ledger keeps the history. ``status``
recomputes, from the ledger and the stored layout alone, that no stored unit has a forgotten
example in its training set, and that ``data.npz`` holds no forgotten example.

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
import importlib
import inspect
import json
import os
import re
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
DATA_COPY = "data.npz"
LOCK = "LOCK"
READ_LOCK = "READ.lock"
CURRENT = "CURRENT"  # format 1's pointer; its presence means an old directory
UNITS = "units"
VERSIONS = "versions"
LOCK_TIMEOUT = 600.0
ARRAY_KEYS = ("x", "y", "ids", "num_classes")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


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


def _save_npz_atomic(path: Path, **arrays) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
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


def _open_lock(root: Path) -> int:
    try:
        return os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        raise ModelDirError(f"{root} does not exist (a refused `train` that had created it "
                            "removed it while this command waited for the lock); nothing was "
                            "changed.") from None


def _is_linked(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (a refused ``train`` removes the lock file
    it created; a process that waited on the old file must lock the new one)."""
    st = os.fstat(fd)
    try:
        cur = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)


@contextmanager
def write_lock(root: Path, command: str, timeout: float = LOCK_TIMEOUT):
    """Exclusive writer lock on ``root`` (``fcntl.flock`` on ``root/LOCK``; released by the OS
    if the process dies). Waits up to ``timeout`` s, then fails naming the holder."""
    t0 = time.monotonic()
    fd = _open_lock(root)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() - t0 >= timeout:
                    raise ModelDirError(
                        f"{root} is locked by {_holder(root)}; waited {timeout:.0f} s. Wait for "
                        "that command to finish (or raise --lock-timeout) and run this one "
                        "again; nothing was changed.") from None
                time.sleep(0.05)
                continue
            if _is_linked(fd, root / LOCK):
                break
            os.close(fd)
            fd = -1
            fd = _open_lock(root)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "command": command, "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        if fd >= 0:
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
    except OSError:
        os.close(fd)
        return None
    if not _is_linked(fd, root / LOCK):
        os.close(fd)
        return None
    return fd


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


def _scan_ledger(root: Path) -> tuple[list[dict], str | None, int]:
    """``(committed entries, tail, tail bytes)``: ``tail`` is ``None`` (the file ends in a
    newline), ``"newline"`` (the last line is a whole entry without its newline: committed) or
    ``"torn"`` (a last line that does not parse: an append cut short, not committed)."""
    path = root / LEDGER
    if not path.exists():
        return [], None, 0
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    out = []
    for n, line in enumerate(raw[:end].decode("utf-8").splitlines()):
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise ModelDirError(f"{path} line {n + 1} is not JSON ({err}); the ledger is "
                                "append-only: restore it from a backup.") from err
        out.append(_check_entry(e, path, n + 1, len(out)))
    tail = raw[end:]
    if not tail:
        return out, None, 0
    try:
        e = json.loads(tail.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return out, "torn", len(tail)
    out.append(_check_entry(e, path, len(out) + 1, len(out)))
    return out, "newline", 0


def read_ledger(root: str | Path) -> list[dict]:
    """The committed requests of ``root``'s ledger, oldest first (request 0 = training).

    A last line without its newline that parses as the next entry is committed (it lost only
    its newline); one that does not parse is a request torn by a crash mid-append: not
    committed, ignored (module docstring). Any complete line that is not a ledger entry of the
    right shape is an error. Reads only."""
    return _scan_ledger(Path(root))[0]


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


def _repair_ledger(root: Path) -> bool:
    """Writer-only recovery of the ledger's last line (module docstring): truncate a torn
    append, or give a whole last entry its missing newline. Returns whether it wrote."""
    path = root / LEDGER
    _, tail, torn = _scan_ledger(root)
    if tail == "torn":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - torn)
            f.flush()
            os.fsync(f.fileno())
    elif tail == "newline":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    return tail is not None


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
    """Save ``{variables, opt_state}`` as ``units/<digest>`` unless that content is stored;
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


def _load_unit(root: Path, u: dict, template):  # template: ShapeDtypeStructs
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
    ledger, tail, torn = _scan_ledger(root)
    if not ledger:
        raise ModelDirError(f"{root} has no committed training (empty {LEDGER}): the `train` "
                            "command was interrupted; delete the directory and train again.")
    if tail == "torn" and not _manifest_path(root, ledger[-1]["version"]).exists():
        raise ModelDirError(
            f"{root / LEDGER} ends in an incomplete line ({torn} bytes) and version "
            f"{ledger[-1]['version']} before it has no manifest: that line was a committed "
            "request (a crash mid-append leaves the previous version in place) and the file "
            "was damaged since. Restore ledger.jsonl from a backup; nothing was changed.")
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


def _stored_forgotten(d: Dir) -> np.ndarray:
    """The forgotten ids still in the directory's copy of the data (``arrays:`` sources)."""
    name = d.cfg.get("data_copy")
    if not name or not (d.root / name).exists():
        return np.array([], str)
    try:
        with np.load(d.root / name, allow_pickle=False) as z:
            ids = z["ids"].astype(str)
    except (OSError, ValueError, KeyError) as e:
        raise ModelDirError(f"{d.root / name} (the stored copy of the data) is corrupt ({e}); "
                            "restore it from a backup.") from e
    return ids[np.isin(ids, list(d.forgotten()))]


def _purge(d: Dir) -> int:
    """Delete every stale file and the forgotten rows of the stored data (under the writer
    lock; waits for readers in flight). Returns the number of files deleted."""
    stale = _stale(d)
    scrub = len(_stored_forgotten(d)) > 0
    if stale or scrub:
        with _flock(d.root / READ_LOCK, fcntl.LOCK_EX):
            for p in stale:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                _crash_point("during_purge")
            for sub in (UNITS, VERSIONS):
                _fsync_dir(d.root / sub)
            if scrub:
                path = d.root / d.cfg["data_copy"]
                with np.load(path, allow_pickle=False) as z:
                    a = {k: z[k] for k in z.files}
                keep = ~np.isin(a["ids"].astype(str), list(d.forgotten()))
                _save_npz_atomic(path, x=a["x"][keep], y=a["y"][keep], ids=a["ids"][keep],
                                 num_classes=a["num_classes"])
    return len(stale)


def _recover_locked(root: Path) -> int:
    """Finish what an interrupted writer left (the ledger's last line, stale files, forgotten
    rows of the stored data). The caller holds the writer lock and has passed its checks."""
    _read_dir(root)  # a damaged directory is an error before anything is repaired
    _repair_ledger(root)
    return _purge(_read_dir(root))


def _recover(d: Dir) -> Dir:
    """A reader's recovery, after its checks passed: only if something is left to finish and
    no writer is active (module docstring). Returns the directory as read afterwards."""
    _, tail, _ = _scan_ledger(d.root)
    if tail is None and not _stale(d) and not len(_stored_forgotten(d)):
        return d
    fd = _try_write_lock(d.root)
    if fd is None:
        return d
    try:
        _recover_locked(d.root)
        return _read_dir(d.root)
    finally:
        os.close(fd)


def open_dir(root: str | Path, *, writer: bool = False) -> Dir:
    """Read a model directory, checking its config, layout, ledger and served manifest.

    Reading never writes (a torn ledger line is ignored, stale files are not loaded). With
    ``writer=True`` the caller holds the writer lock and wants the directory recovered first
    (the ledger's last line repaired, stale files purged): a write, for a command that has
    already passed its checks."""
    root = Path(root)
    _check_root(root)  # before creating any lock file in a directory that is not a model
    if writer:
        _recover_locked(root)
        return _read_dir(root)
    with _flock(root / READ_LOCK, fcntl.LOCK_SH):
        return _read_dir(root)


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
    import zipfile

    from unlearn import data as data_lib

    if not path.is_file():
        raise FileNotFoundError(f"{label}: {path} is not a file; pass arrays:PATH with PATH an "
                                ".npz written by np.savez(PATH, x=..., y=..., ids=...).")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array, not an .npz archive of named arrays")
        with z:
            a = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        hint = (" (an object array: save ids as strings, np.array(ids, dtype=str))"
                if "Object arrays" in str(e) else "")
        raise ValueError(f"{label}: {path} is not a readable .npz of arrays x, y[, ids, "
                         f"num_classes] ({e}){hint}.") from e
    unknown = sorted(set(a) - set(ARRAY_KEYS))
    missing = [k for k in ("x", "y") if k not in a]
    if unknown or missing:
        raise ValueError(f"{label}: {path} holds arrays {sorted(a)}; it needs x and y and may "
                         f"have ids and num_classes (missing {missing}, unknown {unknown}).")
    x, y = a["x"], a["y"]
    if x.ndim < 2 or x.dtype.kind not in "biuf":
        raise ValueError(f"{label}: x has shape {x.shape} and dtype {x.dtype}; it must be a "
                         "numeric array with one row per example, shape (n, features...).")
    ids = None
    if "ids" in a:
        ids = a["ids"]
        if ids.shape != y.shape or ids.dtype.kind not in "USiu":
            raise ValueError(f"{label}: ids has shape {ids.shape} and dtype {ids.dtype}; pass "
                             f"one string per example, shape {y.shape}.")
        ids = ids.astype(str)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{label}: ids {uniq[counts > 1][:10].tolist()} appear more than "
                             "once; every example needs its own id.")
    nc = None
    if "num_classes" in a:
        v = a["num_classes"]
        if v.size != 1 or v.dtype.kind not in "iu" or int(v.reshape(())) < 1:
            raise ValueError(f"{label}: num_classes={v.tolist()!r}; pass one integer ≥ 1.")
        nc = int(v.reshape(()))
    try:
        return data_lib.make(x, y, num_classes=nc, ids=ids, name="arrays")
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from e


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
    from unlearn.data import Dataset, Split

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
    from unlearn import data as data_lib
    from unlearn.data import Split

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
    from unlearn import data as data_lib
    from unlearn.data import Split

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
    from unlearn.data import Dataset

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
    from unlearn import models as models_lib

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
    from unlearn.models import Model

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
    import jax

    from unlearn.sisa.plan import Plan
    from unlearn.train import TrainConfig

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
    from unlearn import models as models_lib

    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(kwargs).items()}
    return models_lib.make(name, num_classes, **kw)


def _template(model, cfg, x_shape, key):
    """Shapes of one ``{variables, opt_state}`` unit by shape inference of the trainer's own
    initialisation (no compilation)."""
    import jax

    from unlearn.data import Dataset
    from unlearn.sisa.train import _init_stack

    one = Dataset(np.zeros((1, *x_shape), np.float32), np.zeros(1, np.int32), np.array(["0"]),
                  1, "template")
    v, o = jax.eval_shape(lambda: _init_stack(model, one, cfg, key, 1))
    drop = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)  # noqa: E731
    return {"variables": jax.tree.map(drop, v), "opt_state": jax.tree.map(drop, o)}


def _load_ckpts(d: Dir, model, cfg, x_shape, key):
    """The served checkpoints stacked (R+1, S) as ``(variables, opt_state)`` host arrays."""
    import jax

    tmpl = _template(model, cfg, x_shape, key)
    rows = [[_load_unit(d.root, u, tmpl) for u in row] for row in d.manifest["units"]]
    stack = jax.tree.map(lambda *a: np.stack(a), *[jax.tree.map(lambda *b: np.stack(b), *row)
                                                   for row in rows])
    return stack["variables"], stack["opt_state"]


def _split_units(ckpts) -> list[list]:
    """(R+1, S)-stacked (variables, opt_state) -> grid of per-unit pytrees."""
    import jax

    p, o = ckpts
    n_r, n_s = jax.tree.leaves(p)[0].shape[:2]
    return [[{"variables": jax.tree.map(lambda a, r=r, s=s: np.asarray(a[r, s]), p),
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


def _plan(shards, slices, assignment, overlap):
    """A :class:`~unlearn.sisa.plan.Plan`; its errors name the command-line flag."""
    from unlearn.sisa.plan import Plan

    try:
        return Plan(shards, slices, assignment, overlap)
    except ValueError as e:
        field, _, _ = str(e).partition("=")
        head, _, tail = str(e).partition(":")
        raise ValueError(f"{head} (--{field}):{tail}") from None


def _check_fraction(test_fraction) -> None:
    import math

    ok = isinstance(test_fraction, (int, float)) and not isinstance(test_fraction, bool) \
        and math.isfinite(test_fraction) and 0 <= test_fraction < 1
    if not ok:
        raise ValueError(f"test_fraction={test_fraction!r} (--test-fraction): pass a fraction in "
                         "[0, 1); 0 trains on everything (no test split).")


def _mkdirs(root: Path) -> list[Path]:
    """Create ``root`` and missing parents; returns the directories created, deepest first."""
    made, p = [], root
    while not p.exists():
        made.append(p)
        p = p.parent
    root.mkdir(parents=True, exist_ok=True)
    return made


def _undo_train(root: Path, before: set[str], made: list[Path], lock_existed: bool) -> None:
    """Remove what a refused ``train`` added (called under the writer lock, so nothing else
    wrote meanwhile): the files it created, its lock file, and the directories it created."""
    for name in set(os.listdir(root)) - before:
        q = root / name
        if q.is_dir():
            shutil.rmtree(q, ignore_errors=True)
        else:
            q.unlink(missing_ok=True)
    if not lock_existed:  # waiters notice the unlinked file and lock a new one (write_lock)
        (root / LOCK).unlink(missing_ok=True)
    for q in made:
        try:
            q.rmdir()  # only if empty: never someone else's files
        except OSError:
            break


def create(root: str | Path, *, data: str, model: str = "mlp", shards: int = 4, slices: int = 2,
           assignment: str = "uniform", overlap: float = 0.0, epochs: int = 20,
           lr: float = 1e-3, batch_size: int = 32, l2: float = 1e-4, seed: int = 0,
           test_fraction: float = 0.25, model_kwargs: dict | None = None,
           lock_timeout: float = LOCK_TIMEOUT):
    """Train a SISA model on ``data`` and commit it as version 0 of ``root``.

    ``model``: a registry name or a factory ``package.module:function`` (called with
    ``model_kwargs``); ``data``: a :func:`unlearn.data.load` name, ``arrays:PATH.npz`` (copied
    into ``root``) or a loader ``package.module:function`` (module docstring).
    ``test_fraction`` in [0, 1): the held-out share (0: train on everything, no test split; a
    loader's own Split is kept as it is unless 0). Every input error is found before ``root``
    is made; a refused run (an error, also diverged training) leaves nothing behind: ``root``
    and its parents are removed if it created them, else the files it added. Errors name the
    argument (``--shards``, ``--model``, ...)."""
    import jax

    from unlearn.sisa.plan import check_config, check_finite, check_model, make_layout
    from unlearn.sisa.train import train
    from unlearn.train import TrainConfig, bucket

    root = Path(root)
    plan = _plan(shards, slices, assignment, overlap)
    from types import SimpleNamespace

    check_config(SimpleNamespace(epochs=epochs, lr=lr, batch_size=batch_size, l2=l2))
    tc = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, l2=l2)
    _check_fraction(test_fraction)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; pass a directory for the model.")
    taken = (root / LEDGER, root / CONFIG, root / CURRENT)
    if any(p.exists() for p in taken):
        raise FileExistsError(f"{root} already holds a SISA model; pick a new directory or "
                              "delete it first.")
    used = [n for n in (LAYOUT, DATA_COPY, UNITS, VERSIONS) if (root / n).exists()]
    if used:
        raise FileExistsError(f"{root} already holds {used}, which a model directory uses; "
                              "pick a new or empty directory.")
    # everything that can be wrong with the input is found before the directory is made
    kw_json = _model_kwargs_json(model_kwargs)
    ds, copy = _training_data(data, seed, test_fraction)
    if getattr(ds, "targets", "classes") != "classes":
        raise ValueError(f"--data {data} has {ds.targets!r} targets; a SISA model directory "
                         "trains classifiers (integer class labels).")
    m = build_model(model, ds.num_classes, kw_json)
    try:
        check_model(m, ds, tc.dtype)
    except ValueError as e:
        raise ValueError(f"--model {model} (--model-kwargs {kw_json}) does not fit --data "
                         f"{data}: {e}") from e
    key = jax.random.key(seed)
    if plan.shards > len(ds):
        raise ValueError(f"shards={shards} (--shards) is more than the {len(ds)} training "
                         "examples of --data: use at most one shard per example (far fewer in "
                         "practice).")
    layout = make_layout(plan, ds, key)
    made = _mkdirs(root)
    lock_existed = (root / LOCK).exists()
    # a lock that times out belongs to another `train` of the same directory: nothing to undo
    with write_lock(root, "train", lock_timeout):
        if any(p.exists() for p in taken):
            raise FileExistsError(f"{root} already holds a SISA model (written by another "
                                  "process meanwhile); pick a new directory.")
        before = set(os.listdir(root))
        try:
            state = train(m, ds, tc, plan, key, layout=layout)
            check_finite(state.ckpts)
            cfgd = {"format": FORMAT, "data": data, "model": model,
                    "model_kwargs": json.loads(kw_json), "seed": seed,
                    "test_fraction": test_fraction, "num_classes": ds.num_classes,
                    "plan": dataclasses.asdict(plan),
                    "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "l2": l2}}
            if copy is not None:
                _save_npz_atomic(root / DATA_COPY, x=copy.x, y=copy.y, ids=copy.ids,
                                 num_classes=np.int64(copy.num_classes))
                cfgd["data_copy"] = DATA_COPY
            _save_npz_atomic(root / LAYOUT, ids=state.layout.ids, shard=state.layout.shard,
                             slice=state.layout.slice, content=content_hash(ds))
            (root / UNITS).mkdir(exist_ok=True)
            k = bucket(plan.shards)
            meta = [[{"request": 0, "slots": k} for _ in range(plan.shards)]
                    for _ in range(plan.slices + 1)]
            digest = _write_version(root, 0, state.ckpts, meta)
            _write_atomic(root / CONFIG, json.dumps(cfgd, indent=1, ensure_ascii=False))
            _append_ledger(root, {"request": 0, "op": "train", "version": 0, "ids": [],
                                  "digest": digest, "time": time.time(), "pid": os.getpid(),
                                  "host": socket.gethostname()})
        except BaseException:
            _undo_train(root, before, made, lock_existed)
            raise
    return state


def load(root: str | Path, *, need_train: bool = True):
    """Open a model directory: ``(state, version, test set)``.

    ``state.data`` holds every trained id in layout order (a forgotten example whose file was
    deleted is a zero row, never trained on: ``alive`` is False). A retained example whose file
    is missing is an error unless ``need_train=False`` (prediction). After the checks pass it
    finishes an interrupted writer's work if no writer is active (module docstring)."""
    st, d, test, _ = _state(open_dir(root), need_train)
    _recover(d)
    return st, d.version, test


def evaluate(root: str | Path, how: str = "mean_prob") -> dict:
    """Test accuracy of the served ensemble on the held-out split (``predict``). A model
    trained with ``test_fraction=0`` has no held-out split: that is an error saying so."""
    from unlearn.sisa.train import predict

    if how not in ("mean_prob", "vote"):
        raise ValueError(f"how={how!r} (--how): choose 'mean_prob' or 'vote'.")
    st, d, test, _ = _state(open_dir(root), need_train=False)
    if len(test) == 0:
        why = ("it was trained with --test-fraction 0, on every example"
               if d.cfg.get("test_fraction") == 0 else "its data has no example outside the "
               "training set")
        raise ValueError(f"{root} has no held-out test split to score ({why}); predict "
                         "measures test accuracy, so there is nothing to measure.")
    _recover(d)
    acc = float(np.mean(np.argmax(np.asarray(predict(st, test.x, how)), -1) == test.y))
    return {"version": d.version, "test_accuracy": acc, "aggregation": how,
            "test_examples": len(test)}


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
        ckpts = _load_ckpts(d, model, tc, tr.x.shape[1:], key)
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
    line (the commit point); purge every unit trained on a forgotten example (and the forgotten
    rows of a stored ``data.npz``). Every check — ids, data, checkpoints, the retraining itself —
    runs before the first write, so a refused request (an error) leaves the directory as it was,
    recovery of an interrupted writer included (module docstring). A crash before the
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
        d = open_dir(root)  # reads only: every check below runs before the first write
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
            _recover_locked(root)
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
        # the checks passed: from here on the directory changes. First finish what an
        # interrupted writer left (a torn ledger line must go before this request's line).
        _recover_locked(root)
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
    _recover(d)
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
            same_k = [s for s, h in heads.items() if h[2] == k]
            for c in range(0, len(same_k), k):  # a k-slot program holds at most k shards
                group = same_k[c: c + k]
                others = [s for s in range(S) if s not in group] or group[:1]
                pad = (others * k)[: k - len(group)]
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
    checkpoint — computed from the directory alone (no data, no model code, no JAX
    compilation). It first finishes an interrupted writer's work when no writer is active."""
    d = _recover(open_dir(root))
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
            "model": d.cfg["model"], "model_kwargs": d.cfg.get("model_kwargs", {}),
            "data": d.cfg["data"], "test_fraction": d.cfg.get("test_fraction"),
            "shards": S, "slices": R,
            "shard_sizes": np.bincount(d.shard[alive], minlength=S).tolist(),
            "consistent_with_request": d.version,
            "checkpoints_stored": len(stored),
            "checkpoints_trained_on_forgotten_data": len(bad),
            "stored_data": d.cfg.get("data_copy"),
            "forgotten_examples_in_stored_data": int(len(_stored_forgotten(d))),
            "unreferenced_files": sorted(stored - listed),
            "provenance": units}
