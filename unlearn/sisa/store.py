"""The persistent SISA model directory: a deletion service that never loses a deletion or keeps
a forgotten example. This module holds its commands — :func:`create` (``train``),
:func:`forget_persistent` (``forget``), :func:`verify`, :func:`evaluate` (``predict``),
:func:`status` and :func:`load` — and re-exports the directory's public names, so
``unlearn.sisa.store`` stays the one place to import the service from.

The package splits the service by concern:

- :mod:`unlearn.sisa.ledger` — the storage engine: the directory layout (format 2), atomic
  writes, the OS locks, the append-only ledger and its commit point, the manifests, recovery of
  an interrupted writer and the purge;
- :mod:`unlearn.sisa.checkpoints` — the content-addressed orbax checkpoints (one per shard and
  stage) and why they are not a ``CheckpointManager``;
- :mod:`unlearn.sisa.sources` — the data and model that ``config.json`` names, reloaded and
  rebuilt by every command, and the content hashes that catch changed data;
- this module — the commands, which check everything, then write in the order the ledger
  requires.

**Refusals change nothing.** A command that refuses (exit 2: bad input, unknown ids, changed
or missing data, a corrupt or busy directory, retraining that diverged) leaves every file of the
directory byte-identical except the OS lock files ``LOCK`` and ``READ.lock``: every check runs
before the first write. Recovery from an interrupted writer (the ledger tail, purging its
files, removing forgotten rows from ``data.npz``; :mod:`unlearn.sisa.ledger`) is a write too, so
only a command that gets past its checks does it: ``forget`` right before it writes its own
request; ``status``, ``verify``, ``predict`` and :func:`load` after their checks pass, and only
when no writer is active. A refused ``train`` removes what it made: the directory (and parents)
it created, or the files it added to an existing one.

**Exact verification.** ``verify`` retrains, from scratch on the retained data, every unit of
the shards that held a forgotten example and compares bit for bit (max |Δθ| must be 0). The
engine's numerics are member-independent (``unlearn.engine``: no operation spans the member
axis), so a shard's float32 parameters do not depend on which other shards shared its program
or in which slot; units still record the slot count of the program that produced them, which
verify replays (redundant since the engine change, kept as a belt-and-braces check).
Retraining is deterministic on one machine, so any difference —
e.g. a forgotten example still in the training set — shows as a non-zero difference.

**Several processes** (issue 31). After :func:`unlearn.runtime.initialize` (the CLI: the
``$UNLEARN_COORDINATOR``, ``$UNLEARN_NUM_PROCESSES``, ``$UNLEARN_PROCESS_ID`` variables,
:func:`unlearn.runtime.from_env`) every process runs the same command with the same arguments
as one SPMD program: training and the retraining of ``forget`` and ``verify`` lay the shard axis
on :func:`unlearn.distributed.global_mesh` (every device of every process) and every process
calls the same jitted computations in the same order. Only the writer, process 0, touches the
directory: it makes it, takes the writer lock, decides what a request means (ids, already
forgotten, a busy or damaged directory), writes the units, manifests and the ledger line,
purges and recovers; the other processes take no writer lock and only read (under the shared
read lock, like any reader), after process 0 holds the writer lock. Every step ends with an
agreement (:func:`_together`: the processes exchange their outcomes through JAX's coordination
service, no device collective, so a long write or a wait for the lock meets no collective
timeout): if any process failed, every process raises the error of the first one that did,
same type and message; a result the writer alone knows (``forget``'s) is the writer's on every
process. So every process returns the same result or raises the same error, after the writer
has finished writing. The ledger, lock and crash-safety semantics are those of one process.
Without ``jax.distributed`` nothing of this runs: one process, its own devices.
"""

from __future__ import annotations

import builtins
import dataclasses
import fcntl
import importlib
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np

from unlearn import distributed, engine, runtime
from unlearn.data import stable_hash
from unlearn.sisa.checkpoints import _load_ckpts, _write_version
from unlearn.sisa.ledger import (
    CONFIG,
    CURRENT,
    DATA_COPY,
    FORMAT,
    LAYOUT,
    LEDGER,
    LOCK,
    LOCK_TIMEOUT,
    READ_LOCK,
    UNITS,
    VERSIONS,
    Dir,
    ModelDirError,
    _append_ledger,
    _check_root,
    _crash_point,
    _flock,
    _purge,
    _read_dir,
    _recover,
    _recover_locked,
    _save_npz_atomic,
    _stored_forgotten,
    _write_atomic,
    open_dir,
    read_ledger,
    write_lock,
)
from unlearn.sisa.plan import Layout, Plan, check_config, check_finite, check_model, make_layout
from unlearn.sisa.sources import (
    ARRAY_KEYS,
    _load_data,
    _model_and_cfg,
    _model_kwargs_json,
    _training_data,
    build_model,
    content_hash,
)
from unlearn.sisa.train import (
    SisaState,
    _data_arrays,
    _init_stack,
    forget,
    predict,
    train,
)
from unlearn.train import TrainConfig, bucket

# The module itself: ``unlearn.sisa.train`` as an attribute of the package is the ``train``
# function it re-exports. ``verify`` looks ``_run_stages`` up on it at each call, as the lazy
# import it replaces did (a test wraps it to check the slot count of every rerun program).
_sisa_train = importlib.import_module("unlearn.sisa.train")

__all__ = [
    "ARRAY_KEYS", "CONFIG", "CURRENT", "DATA_COPY", "FORMAT", "LAYOUT", "LEDGER", "LOCK",
    "LOCK_TIMEOUT", "READ_LOCK", "UNITS", "VERSIONS", "Dir", "ModelDirError", "build_model",
    "content_hash", "create", "evaluate", "forget_persistent", "load", "open_dir", "read_ledger",
    "resolve_ids", "status", "verify", "write_lock",
]


# ----------------------------------------------------------------------------- train


def create(root: str | Path, *, data: str, model: str = "mlp", shards: int = 4, slices: int = 2,
           assignment: str = "uniform", overlap: float = 0.0, epochs: int = 20,
           lr: float = 1e-3, batch_size: int = 32, l2: float = 1e-4, seed: int = 0,
           test_fraction: float = 0.25, model_kwargs: dict | None = None,
           lock_timeout: float = LOCK_TIMEOUT):
    """Train a SISA model on ``data`` and commit it as version 0 of ``root``.

    ``model``: a registry name or a factory ``package.module:function`` (called with
    ``model_kwargs``); ``data``: a :func:`unlearn.data.load` name, ``arrays:PATH.npz`` (copied
    into ``root``) or a loader ``package.module:function`` (:mod:`unlearn.sisa.sources`).
    ``test_fraction`` in [0, 1): the held-out share (0: train on everything, no test split; a
    loader's own Split is kept as it is unless 0). Every input error is found before ``root``
    is made; a refused run (an error, also diverged training) leaves nothing behind: ``root``
    and its parents are removed if it created them, else the files it added. Errors name the
    argument (``--shards``, ``--model``, ...)."""
    root = Path(root)
    mesh = _mesh()

    def check():  # every input error is found before the directory is made
        plan = _plan(shards, slices, assignment, overlap)
        check_config(SimpleNamespace(epochs=epochs, lr=lr, batch_size=batch_size, l2=l2))
        tc = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, l2=l2)
        _check_fraction(test_fraction)
        taken = _check_new_dir(root)
        kw_json = _model_kwargs_json(model_kwargs)
        ds, copy, m = _training_inputs(data, model, kw_json, seed, test_fraction, tc)
        key = jax.random.key(seed)
        if plan.shards > len(ds):
            raise ValueError(f"shards={shards} (--shards) is more than the {len(ds)} training "
                             "examples of --data: use at most one shard per example (far fewer "
                             "in practice).")
        _check_mesh(plan, mesh)
        return SimpleNamespace(plan=plan, tc=tc, taken=taken, kw_json=kw_json, ds=ds,
                               copy=copy, m=m, key=key, layout=make_layout(plan, ds, key))

    c = _together(check)
    w = SimpleNamespace(made=[], lock_existed=False, before=set())
    with ExitStack() as held:

        def take_dir():  # the writer only
            w.made = _mkdirs(root)
            w.lock_existed = (root / LOCK).exists()
            # a lock that times out belongs to another `train` of the same directory: nothing
            # to undo
            held.enter_context(write_lock(root, "train", lock_timeout))
            if any(p.exists() for p in c.taken):
                raise FileExistsError(f"{root} already holds a SISA model (written by another "
                                      "process meanwhile); pick a new directory.")
            w.before = set(os.listdir(root))

        _together(take_dir, writer_only=True, wait_s=lock_timeout + _WAIT_S)
        try:
            state = _together(lambda: _train_checked(c, mesh))
            cfgd = {"format": FORMAT, "data": data, "model": model,
                    "model_kwargs": json.loads(c.kw_json), "seed": seed,
                    "test_fraction": test_fraction, "num_classes": c.ds.num_classes,
                    "plan": dataclasses.asdict(c.plan),
                    "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "l2": l2}}
            _together(lambda: _commit_training(root, state, c.ds, c.copy, cfgd),
                      writer_only=True)
        except BaseException as e:
            _after_error(e, lambda: _undo_train(root, w.before, w.made, w.lock_existed))
            raise
    return state


def _train_checked(c: SimpleNamespace, mesh) -> SisaState:
    state = train(c.m, c.ds, c.tc, c.plan, c.key, layout=c.layout, mesh=mesh)
    check_finite(state.ckpts)
    return state


def _check_mesh(plan: Plan, mesh) -> None:
    """In a multi-process program the shard axis is laid on every device of every process."""
    if mesh is None or plan.shards % mesh.devices.size == 0:
        return
    n = mesh.devices.size
    raise ValueError(f"shards={plan.shards} (--shards): the {jax.process_count()} processes "
                     f"train the shards on their {n} devices together, so --shards must be a "
                     f"multiple of {n}.")


def _plan(shards, slices, assignment, overlap):
    """A :class:`~unlearn.sisa.plan.Plan`; its errors name the command-line flag."""
    try:
        return Plan(shards, slices, assignment, overlap)
    except ValueError as e:
        field, _, _ = str(e).partition("=")
        head, _, tail = str(e).partition(":")
        raise ValueError(f"{head} (--{field}):{tail}") from None


def _check_fraction(test_fraction) -> None:
    ok = isinstance(test_fraction, (int, float)) and not isinstance(test_fraction, bool) \
        and math.isfinite(test_fraction) and 0 <= test_fraction < 1
    if not ok:
        raise ValueError(f"test_fraction={test_fraction!r} (--test-fraction): pass a fraction in "
                         "[0, 1); 0 trains on everything (no test split).")


def _check_new_dir(root: Path) -> tuple[Path, ...]:
    """Refuse a ``root`` that is a file or already holds a model's files; returns the files
    whose presence means another ``train`` got there first (checked again under the lock)."""
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
    return taken


def _training_inputs(data: str, model: str, kw_json: str, seed: int, test_fraction: float,
                     tc: TrainConfig):
    """``(train set, dataset to store or None, model)`` for ``create``, checked to fit
    together; errors name ``--data``, ``--model`` or ``--model-kwargs``."""
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
    return ds, copy, m


def _mkdirs(root: Path) -> list[Path]:
    """Create ``root`` and missing parents; returns the directories created, deepest first."""
    made, p = [], root
    while not p.exists():
        made.append(p)
        p = p.parent
    root.mkdir(parents=True, exist_ok=True)
    return made


def _commit_training(root: Path, state: SisaState, ds, copy, cfgd: dict) -> None:
    """Write version 0 (under the writer lock): the data copy and the layout, the units and
    their manifest, ``config.json``, and last the ledger line — the commit point."""
    plan = state.plan
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




# ----------------------------------------------------------------------------- read


def load(root: str | Path, *, need_train: bool = True):
    """Open a model directory: ``(state, version, test set)``.

    ``state.data`` holds every trained id in layout order (a forgotten example whose file was
    deleted is a zero row, never trained on: ``alive`` is False). A retained example whose file
    is missing is an error unless ``need_train=False`` (prediction). After the checks pass it
    finishes an interrupted writer's work if no writer is active (module docstring)."""
    st, d, test, _ = _together(lambda: _state(open_dir(root), need_train))
    _reader_recover(d)
    return st, d.version, test


def evaluate(root: str | Path, how: str = "mean_prob") -> dict:
    """Test accuracy of the served ensemble on the held-out split (``predict``). A model
    trained with ``test_fraction=0`` has no held-out split: that is an error saying so."""
    if how not in ("mean_prob", "vote"):
        raise ValueError(f"how={how!r} (--how): choose 'mean_prob' or 'vote'.")
    st, d, test, _ = _together(lambda: _scorable(root, _state(open_dir(root),
                                                               need_train=False)))
    _reader_recover(d)
    # every process scores the whole test split itself (the same numbers: no sum spans
    # processes, so the accuracy does not depend on their number)
    acc = _together(lambda: float(np.mean(np.argmax(np.asarray(predict(st, test.x, how)), -1)
                                          == test.y)))
    return {"version": d.version, "test_accuracy": acc, "aggregation": how,
            "test_examples": len(test)}


def _scorable(root, opened):
    """``opened`` (:func:`_state`'s result) if its test split is not empty, else the error."""
    _, d, test, _ = opened
    if len(test) == 0:
        why = ("it was trained with --test-fraction 0, on every example"
               if d.cfg.get("test_fraction") == 0 else "its data has no example outside the "
               "training set")
        raise ValueError(f"{root} has no held-out test split to score ({why}); predict "
                         "measures test accuracy, so there is nothing to measure.")
    return opened


def _state(d: Dir, need_train: bool):
    """``(state, dir, test set, present)``; ``present`` marks layout ids on disk. The version
    is re-read and its checkpoints loaded under one shared read lock, so a purge by a writer
    that committed meanwhile cannot delete them half-way: the state is one committed version."""
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
                   engine.resolve_strategy(model, "auto"), _mesh())
    return st, d, test, present


# ----------------------------------------------------------------------------- forget


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
    root = Path(root)
    w = SimpleNamespace(d=None)
    with ExitStack() as held:

        def decide():  # the writer only, under its lock; reads only
            _check_root(root)
            held.enter_context(write_lock(root, "forget " + " ".join(map(str, names))[:200],
                                          lock_timeout))
            d = w.d = open_dir(root)  # reads only: every check below runs before the first write
            ids, notes = _request_ids(d, names)
            gone = d.forgotten()
            already = {i: f"already forgotten by request {gone[i]}" for i in ids if i in gone}
            todo = [i for i in ids if i not in gone]
            if not todo:
                _recover_locked(root)
                return {"noop": True, "version": d.version, "not_trained_on": notes,
                        "already_forgotten": already}
            return {"noop": False, "todo": todo, "not_trained_on": notes,
                    "already_forgotten": already}

        req = _together(decide, writer_only=True, share=True, wait_s=lock_timeout + _WAIT_S)
        if req["noop"]:
            return req
        todo, notes, already = req["todo"], req["not_trained_on"], req["already_forgotten"]
        # every process loads the served version (the writer holds the lock: it cannot change)
        state, d = _together(lambda: _retrain_inputs(w.d if w.d is not None else
                                                     open_dir(root), todo))
        new, stats = _together(lambda: _retrain_run(state, todo))

        def commit():  # the writer only
            # the checks passed: from here on the directory changes. First finish what an
            # interrupted writer left (a torn ledger line must go before this request's line).
            _recover_locked(root)
            v = d.version + 1
            digest = _write_version(root, v, new.ckpts, _forget_meta(d, new, todo, v))
            _crash_point("after_checkpoint")
            _append_ledger(root, {"request": v, "op": "forget", "version": v, "ids": todo,
                                  "digest": digest, "time": time.time(), "pid": os.getpid(),
                                  "host": socket.gethostname(),
                                  "shards_retrained": stats["shards_retrained"]})
            _crash_point("after_ledger")
            purged = _purge(_read_dir(root))
            return {"noop": False, "version": v, "forgotten": todo, "purged_files": purged,
                    "not_trained_on": notes, "already_forgotten": already, **stats}

        return _together(commit, writer_only=True, share=True)


def _request_ids(d: Dir, names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The trained ids a request names, and a note for each name of a held-out test example
    (never trained on). Unknown, ambiguous or repeated names are errors. Reads only."""
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
    return ids, notes


def _retrain_inputs(d: Dir, todo: list[str]) -> tuple[SisaState, Dir]:
    """``(state, directory as re-read)``: the served version, checked to be retrainable for
    ``todo`` (retained examples missing from the data are an error). Reads only."""
    state, d, _, present = _state(d, need_train=False)
    missing = np.setdiff1d(state.data.ids[state.alive & ~present], todo)
    if len(missing):
        raise ModelDirError(f"retained examples {missing[:10].tolist()} ({len(missing)} in "
                            "all) are no longer in the data but were never forgotten: "
                            "restore those files, or add them to --ids.")
    return state, d


def _retrain_run(state: SisaState, todo: list[str]) -> tuple[SisaState, dict]:
    """``(new state, stats)``: the units that saw ``todo`` retrained, in memory (on the
    state's mesh: every process of a multi-process program). Retraining that diverged is an
    error."""
    new, stats = forget(state, todo)
    check_finite(new.ckpts, "retraining")
    return new, stats


def _forget_meta(d: Dir, new: SisaState, todo: list[str], v: int) -> list[list[dict]]:
    """The manifest entries of version ``v``: each shard that held a forgotten id has its units
    from its earliest affected slice on produced by request ``v`` (with the slot count of the
    program that retrained it); every other unit is the served version's, unchanged."""
    pos = new.layout.positions(todo)
    shards = np.unique(new.layout.shard[pos])
    start = {int(s): int(new.layout.slice[pos][new.layout.shard[pos] == s].min())
             for s in shards}
    meta = [[dict(u) for u in row] for row in d.manifest["units"]]
    for s, r0 in start.items():
        for r in range(r0 + 1, new.plan.slices + 1):
            meta[r][s] = {"request": v, "slots": bucket(len(shards))}
    return meta


# ----------------------------------------------------------------------------- verify, status


def verify(root: str | Path) -> dict:
    """Retrain from scratch, on the retained data, every unit of the shards that held a
    forgotten example (every shard if nothing was forgotten) and compare bit for bit with the
    stored units (see the module docstring for why this is exact). Retained examples missing
    from the data are listed, and their shards reported unverifiable (``ok`` false)."""
    state, d, _, present = _together(lambda: _state(open_dir(root), need_train=False))
    _reader_recover(d)
    return _together(lambda: _check_units(state, d, present))


def _check_units(state: SisaState, d: Dir, present: np.ndarray) -> dict:
    """``verify``'s comparison (on the state's mesh: every process of a multi-process
    program retrains the checked shards together)."""
    lay = state.layout
    missing = state.data.ids[state.alive & ~present]
    gone = state.data.ids[~state.alive]
    shards = np.unique(lay.lookup(gone)[0]) if len(gone) else np.arange(state.plan.shards)
    bad_shards = np.unique(lay.lookup(missing)[0]) if len(missing) else np.array([], int)
    check = np.setdiff1d(shards, bad_shards)
    out = {"version": d.version, "shards_checked": [int(s) for s in check],
           "units_checked": 0, "max_abs_diff": None, "missing_retained": missing.tolist(),
           "unverifiable_shards": [int(s) for s in np.intersect1d(shards, bad_shards)]}
    if len(check) == 0:
        out["ok"] = False
        out["reason"] = ("nothing could be checked: every shard to verify has retained examples "
                         "missing from the data (listed in missing_retained); restore them.")
        return out
    ref = _rerun(state, d.manifest["units"], check.tolist())
    diff = 0.0
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state.ckpts), strict=True):
        a, b = np.asarray(a)[:, check], np.asarray(b)[:, check]
        diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    out.update(units_checked=int(len(check) * (state.plan.slices + 1)), max_abs_diff=diff,
               ok=diff == 0.0 and not len(missing))
    if len(missing):
        out["reason"] = ("retained examples are missing from the data (missing_retained): the "
                         "checked shards match, but the data no longer matches the model; "
                         "restore those files or forget them.")
    return out


def _rerun(state: SisaState, units: list, check: list[int]):
    """Every unit of the shards ``check`` retrained from scratch on the retained data, stacked
    (R+1, S) like ``state.ckpts`` (other shards keep the initial state). Each segment of a
    shard's stages produced by one request is rerun by a program with that request's slot
    count; shards whose next segments share a slot count share a program."""
    R, S = state.plan.slices, state.plan.shards
    p0, o0 = _init_stack(state.model, state.data, state.cfg, state.key, S)
    ref = jax.tree.map(lambda a: np.array(np.broadcast_to(a, (R + 1, *a.shape))), (p0, o0))
    segs = {s: _segments(units, s, R) for s in check}
    x, y = _data_arrays(state)
    while any(segs.values()):
        heads = {s: seg[0] for s, seg in segs.items() if seg}
        for k in sorted({h[2] for h in heads.values()}):
            same_k = [s for s, h in heads.items() if h[2] == k]
            for c in range(0, len(same_k), k):  # a k-slot program holds at most k shards
                group = same_k[c: c + k]
                ref = _rerun_group(state, ref, group, heads, k, x, y)
                for s in group:
                    segs[s] = segs[s][1:]
    return ref


def _segments(units: list, s: int, R: int) -> list[tuple[int, int, int]]:
    """Shard ``s``'s stages 1..R as ``(first, last, slots)`` runs of consecutive stages
    produced by one request (so by one program size)."""
    seg, r = [], 1
    while r <= R:
        b = r
        while b + 1 <= R and _producer(units[b + 1][s]) == _producer(units[r][s]):
            b += 1
        seg.append((r, b, units[r][s]["slots"]))
        r = b + 1
    return seg


def _rerun_group(state: SisaState, ref, group: list[int], heads: dict, k: int, x, y):
    """Rerun the next segment of each shard of ``group`` in one ``k``-slot program (padded with
    other shards, whose results are dropped); returns ``ref`` with those stages written."""
    S, R = state.plan.shards, state.plan.slices
    others = [s for s in range(S) if s not in group] or group[:1]
    pad = (others * k)[: k - len(group)]
    sh = np.array(group + pad)
    st = np.array([heads[s][0] - 1 for s in group] + [R] * len(pad))
    ck, _ = _sisa_train._run_stages(state._replace(ckpts=ref), sh, st, x, y)
    for s in group:
        a, b, _ = heads[s]
        ref = jax.tree.map(lambda dst, src, s=s, a=a, b=b: _put(dst, src, s, a, b), ref, ck)
    return ref


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
    d = _reader_recover(_together(lambda: open_dir(root)))
    return _together(lambda: _status(d))


def _status(d: Dir) -> dict:
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


# ----------------------------------------------------------------------------- processes

_WAIT_S = 24 * 3600.0  # how long a process waits for its peers at an agreement (a backstop:
# JAX's coordination service notices a peer that died and ends the program)


def _multi() -> bool:
    """Whether this process is one of several (``jax.distributed`` initialised). Asked without
    starting JAX's backends, so ``status`` and early refusals still start none in one process
    (and ``runtime.initialize`` may still follow them)."""
    return jax.distributed.is_initialized() and runtime.is_distributed()


def _is_writer() -> bool:
    return not _multi() or runtime.is_writer()


def _mesh():
    """The mesh the shard axis is laid on: every device of every process in a multi-process
    program (:func:`unlearn.distributed.global_mesh`), else None (unchanged: no mesh)."""
    return distributed.global_mesh() if _multi() else None


def _together(fn: Callable, *, writer_only: bool = False, share: bool = False,
              wait_s: float = _WAIT_S):
    """``fn()``, agreed by every process of a multi-process program; just ``fn()`` in one.

    ``writer_only``: only process 0 runs ``fn`` (the others wait for its outcome). Then the
    processes exchange outcomes through JAX's coordination service (a key-value store: no
    device collective, so nothing times out while the writer writes or waits for the lock): if
    any process raised, every process raises the error of the lowest-numbered one that did,
    same type and message (its own exception on that process). ``share``: every process
    returns process 0's result (JSON); else each its own."""
    if not _multi():
        return fn()
    me = jax.process_index()
    value, err = None, None
    if not writer_only or _is_writer():
        try:
            value = fn()
        except Exception as e:  # agreed below; an interrupt ends this process
            err = e
    if err is not None:
        mine = {"error": [type(err).__name__, _message(err)]}
    else:
        mine = {"ok": value if share and me == 0 else None}
    outcomes = _exchange(json.dumps(mine, default=_plain), wait_s)
    for p, o in enumerate(outcomes):
        if "error" in o:
            if p == me:
                raise err
            raise _rebuild(*o["error"])
    return outcomes[0]["ok"] if share else value


def _exchange(text: str, wait_s: float) -> list[dict]:
    """Every process's ``text`` (JSON), in process order (:func:`distributed.exchange`)."""
    return [json.loads(t) for t in distributed.exchange(text, wait_s)]


def _message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _rebuild(name: str, msg: str) -> Exception:
    """Another process's error, as this process raises it: same type (this module's, or a
    builtin one) and message; other types become RuntimeError naming theirs."""
    cls = ModelDirError if name == ModelDirError.__name__ else getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(msg)
        except Exception:  # an exception type with another constructor
            pass
    return RuntimeError(f"{name}: {msg}")


def _plain(o):
    """JSON for NumPy scalars and arrays in a shared result."""
    if isinstance(o, np.generic | np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _after_error(e: BaseException, undo: Callable) -> None:
    """After a command failed: the writer's clean-up ``undo``. In a multi-process program the
    processes then agree once more, so none returns before the directory is final (an
    interrupt is not agreed: the writer cleans up alone)."""
    if _multi() and isinstance(e, Exception):
        _together(undo, writer_only=True)
    elif _is_writer():
        undo()


def _reader_recover(d: Dir) -> Dir:
    """A reader's :func:`~unlearn.sisa.ledger._recover` (after its checks passed). In a
    multi-process program process 0 alone recovers, then every process reads the directory
    again."""
    if not _multi():
        return _recover(d)
    _together(lambda: _recover(d), writer_only=True)
    return _together(lambda: open_dir(d.root))
