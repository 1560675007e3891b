"""The storage engine of the persistent SISA model directory: its files, the OS locks, the
append-only ledger, the manifests, recovery of an interrupted writer and the purge.

Layout of ``MODEL_DIR`` (format 2)::

    config.json        data, model, plan, training settings, seed (written once)
    layout.npz         every trained id, its shard, its earliest slice and a content hash
    data.npz           only for ``--data arrays:PATH``: the examples, copied at training
                       (forgotten rows are removed from it by the purge)
    ledger.jsonl       append-only: one JSON line per request (request 0 = training)
    units/<digest>/    one orbax PyTree checkpoint per (shard, stage): {variables, opt_state}
                       (:mod:`unlearn.sisa.checkpoints`)
    versions/vNNNNNN.json  the served version's manifest: the unit digest of every (stage, shard)
    LOCK, READ.lock    OS locks (fcntl.flock): one writer; readers vs the purge

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

**Recovery is a write.** Finishing an interrupted writer's work (the ledger tail above, purging
its files, removing forgotten rows from ``data.npz``) changes the directory, so only a command
that has passed its checks does it (:mod:`unlearn.sisa.store`, "Refusals change nothing"): a
writer under its lock (:func:`_recover_locked`), a reader only when no writer is active
(:func:`_recover`). Reading (:func:`open_dir`, :func:`read_ledger`) never writes.

**Purge.** A unit (shard s, stage r) is trained on the examples of shard s in slices < r that
were alive when it was trained. After a deletion every stored unit that saw a forgotten example
is deleted: forget retrains exactly those units, and every unit not referenced by the new
manifest is removed (an unchanged unit has the same digest in both versions and is shared, so
is kept). The store therefore holds one version; the ledger keeps the history. ``status``
recomputes, from the ledger and the stored layout alone, that no stored unit has a forgotten
example in its training set, and that ``data.npz`` holds no forgotten example.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
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


class ModelDirError(RuntimeError):
    """A SISA model directory is missing, corrupt, inconsistent or busy."""


def _crash_point(name: str) -> None:
    """Failure injection for the crash tests: SIGKILL the process here when
    ``$UNLEARN_SISA_CRASH_AT`` is ``name`` (points ``after_units``, ``after_checkpoint``,
    ``after_ledger``, ``during_purge``); does nothing otherwise."""
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


