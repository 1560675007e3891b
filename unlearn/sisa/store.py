"""The persistent SISA model directory: orbax checkpoints, the deletion ledger, ``CURRENT``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import data as data_lib
from unlearn import models as models_lib
from unlearn.data import Dataset, stable_hash
from unlearn.sisa.plan import Layout, Plan
from unlearn.sisa.train import (
    SisaState,
    _data_arrays,
    _init_stack,
    _run_stages,
    forget,
    resolve_strategy,
    train,
)
from unlearn.train import TrainConfig

# ----------------------------------------------------------------------------- persistence

CURRENT = "CURRENT"
LEDGER = "ledger.jsonl"
CONFIG = "config.json"


class ModelDirError(RuntimeError):
    """A SISA model directory is missing, corrupt or inconsistent."""


def _crash_point(name: str) -> None:
    """Hook for failure-injection tests (monkeypatched to raise); does nothing otherwise."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_ledger(root: Path, entry: dict) -> None:
    """Append one JSON line atomically: copy the ledger to a temp file, append, fsync, rename."""
    path = root / LEDGER
    old = path.read_text() if path.exists() else ""
    _write_atomic(path, old + json.dumps(entry, sort_keys=True) + "\n")


def read_ledger(root: str | Path) -> list[dict]:
    """The deletion requests recorded in ``root``'s ledger, oldest first."""
    path = Path(root) / LEDGER
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ModelDirError(f"{path} line {n + 1} is not JSON ({e}); the ledger is "
                                "append-only: restore it from a backup.") from e
    return out


def _digest(leaves) -> str:
    h = hashlib.sha256()
    for a in leaves:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _save_version(root: Path, version: int, state: SisaState) -> None:
    import orbax.checkpoint as ocp

    final = root / "versions" / f"v{version:06d}"
    tmp = root / "versions" / f".v{version:06d}.tmp"
    for p in (tmp, final):  # leftovers of an interrupted request are not referenced: replace
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir(parents=True)
    leaves = [np.asarray(a) for a in jax.tree.leaves(state.ckpts)]
    ocp.PyTreeCheckpointer().save((tmp / "ckpt").resolve(),
                                  {f"l{i:04d}": a for i, a in enumerate(leaves)})
    meta = {"version": version, "digest": _digest(leaves),
            "forgotten": state.data.ids[~state.alive].tolist()}
    _write_atomic(tmp / "meta.json", json.dumps(meta))
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _load_ckpts(root: Path, version: int, template):
    import orbax.checkpoint as ocp

    d = root / "versions" / f"v{version:06d}"
    try:
        meta = json.loads((d / "meta.json").read_text())
        raw = ocp.PyTreeCheckpointer().restore((d / "ckpt").resolve())
        leaves = [np.asarray(raw[f"l{i:04d}"]) for i in range(len(raw))]
    except Exception as e:
        raise ModelDirError(f"checkpoint {d} is missing or corrupt ({type(e).__name__}: "
                            f"{str(e)[:200]}); nothing was changed. Restore the directory from a "
                            "backup or retrain with `python -m unlearn.sisa train`.") from e
    if _digest(leaves) != meta["digest"]:
        raise ModelDirError(f"checkpoint {d} is corrupt (checksum mismatch); nothing was "
                            "changed. Restore it from a backup or retrain.")
    treedef = jax.tree.structure(template)
    if treedef.num_leaves != len(leaves):
        raise ModelDirError(f"checkpoint {d} does not match the model in {CONFIG}.")
    return jax.tree.unflatten(treedef, leaves), meta


def _build(cfgd: dict, layout_ids: np.ndarray | None = None):
    """Model, train set, test set, config, plan and key of a model directory's config.

    With ``layout_ids`` the training set is exactly the examples of the trained layout that are
    still on disk (and the test set everything else), so deleting image files later does not
    move other examples between train and test.
    """
    split = data_lib.load(cfgd["data"], seed=cfgd["seed"])
    ds, test = split.train, split.test
    if layout_ids is not None:
        full = Dataset(np.concatenate([ds.x, test.x]), np.concatenate([ds.y, test.y]),
                       np.concatenate([ds.ids, test.ids]), ds.num_classes, ds.name)
        inside = np.isin(full.ids, layout_ids)
        ds, test = full.subset(inside), full.subset(~inside)
    model = models_lib.make(cfgd["model"], ds.num_classes, **cfgd.get("model_kwargs", {}))
    tc = TrainConfig(**cfgd["train"])
    plan = Plan(**cfgd["plan"])
    return model, ds, test, tc, plan, jax.random.key(cfgd["seed"])


def create(root: str | Path, *, data: str, model: str = "mlp", shards: int = 4, slices: int = 2,
           assignment: str = "uniform", overlap: float = 0.0, epochs: int = 20,
           lr: float = 1e-3, batch_size: int = 32, l2: float = 1e-4, seed: int = 0,
           model_kwargs: dict | None = None) -> SisaState:
    """Train a SISA model on dataset ``data`` and save it as version 0 of directory ``root``."""
    root = Path(root)
    if (root / CURRENT).exists():
        raise FileExistsError(f"{root} already holds a SISA model; pick a new directory or "
                              "delete it first.")
    cfgd = {"data": data, "model": model, "model_kwargs": model_kwargs or {}, "seed": seed,
            "plan": dataclasses.asdict(Plan(shards, slices, assignment, overlap)),
            "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "l2": l2}}
    m, ds, _, tc, plan, key = _build(cfgd)
    state = train(m, ds, tc, plan, key)
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / CONFIG, json.dumps(cfgd, indent=1))
    np.savez(root / "layout.npz", ids=state.layout.ids, shard=state.layout.shard,
             slice=state.layout.slice)
    _save_version(root, 0, state)
    _write_atomic(root / CURRENT, "0\n")
    return state


def _recover(root: Path) -> int:
    """The served version, rolling ``CURRENT`` forward if a request was logged but the pointer
    switch was interrupted (the ledger entry is the commit point)."""
    if not (root / CURRENT).exists():
        raise ModelDirError(f"{root} is not a SISA model directory (no {CURRENT}); create one "
                            "with `python -m unlearn.sisa train`.")
    cur = int((root / CURRENT).read_text().strip())
    led = read_ledger(root)
    if led and led[-1]["version"] > cur:
        v = led[-1]["version"]
        if not (root / "versions" / f"v{v:06d}" / "meta.json").exists():
            raise ModelDirError(f"ledger names version {v} but its checkpoint is missing.")
        _write_atomic(root / CURRENT, f"{v}\n")
        cur = v
    return cur


def load(root: str | Path) -> tuple[SisaState, int, Dataset]:
    """Open a model directory: ``(state, version, test set)``."""
    root = Path(root)
    version = _recover(root)
    try:
        cfgd = json.loads((root / CONFIG).read_text())
        lay = np.load(root / "layout.npz")
        ids = lay["ids"].astype(str)
        layout = Layout(ids, lay["shard"], lay["slice"], stable_hash(ids))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{root}: {CONFIG} or layout.npz is missing or corrupt ({e}); "
                            "restore them from a backup.") from e
    model, ds, test, tc, plan, key = _build(cfgd, layout.ids)
    forgotten = {i for e in read_ledger(root) if e["version"] <= version for i in e["ids"]}
    missing = set(layout.ids.tolist()) - set(ds.ids.tolist())
    if missing - forgotten:
        raise ModelDirError(f"examples {sorted(missing - forgotten)[:10]} of the trained model "
                            "are no longer in the dataset but were never forgotten: run "
                            "`forget --ids ...` on the original data first.")
    alive = ~np.isin(ds.ids, list(forgotten))
    template = _init_stack(model, ds.subset(np.arange(1)), tc, key, plan.shards)
    template = jax.tree.map(lambda a: np.broadcast_to(a, (plan.slices + 1, *a.shape)), template)
    ckpts, meta = _load_ckpts(root, version, template)
    present = set(ds.ids.tolist())
    if set(meta["forgotten"]) & present != forgotten & present:
        raise ModelDirError(f"version {version} does not match the ledger; restore from backup.")
    st = SisaState(model, tc, plan, key, ds, layout, alive, ckpts,
                   resolve_strategy(model, "auto"))
    return st, version, test


def resolve_ids(ds: Dataset, names: Sequence[str]) -> list[str]:
    """Map each name to a dataset id: an exact id, or a unique file name (``a.png`` for
    ``class/a.png``); unknown or ambiguous names are an error."""
    base: dict[str, list[str]] = {}
    for i in ds.ids.tolist():
        base.setdefault(os.path.basename(i), []).append(i)
    known = set(ds.ids.tolist())
    out, bad = [], []
    for n in names:
        if n in known:
            out.append(n)
        elif len(base.get(n, [])) == 1:
            out.append(base[n][0])
        else:
            bad.append(n)
    if bad:
        raise KeyError(f"--ids {bad[:10]} are not in the dataset (or name several files); "
                       f"ids look like {ds.ids[:3].tolist()}.")
    return out


def forget_persistent(root: str | Path, names: Sequence[str]) -> dict:
    """Serve one deletion request on a model directory.

    Order: retrain into a new versioned directory; append the ledger entry (the commit point);
    switch ``CURRENT``. A crash before the ledger write leaves the old version served and the
    request repeatable; a crash after it is rolled forward on the next open. Ids forgotten by an
    earlier request are reported and skipped; a request of only such ids is a no-op.
    """
    root = Path(root)
    state, version, _ = load(root)
    ids = resolve_ids(state.data, names)
    pos = state.data.positions(ids, argname="--ids")
    already = [i for i, p in zip(ids, pos, strict=True) if not state.alive[p]]
    todo = [i for i in ids if i not in set(already)]
    if not todo:
        return {"noop": True, "already_forgotten": already, "version": version}
    new, stats = forget(state, todo)
    _save_version(root, version + 1, new)
    _crash_point("after_checkpoint")
    _append_ledger(root, {"version": version + 1, "ids": todo, "time": time.time(),
                          "shards_retrained": stats["shards_retrained"]})
    _crash_point("after_ledger")
    _write_atomic(root / CURRENT, f"{version + 1}\n")
    old = root / "versions" / f"v{version:06d}"
    if version > 0 and old.exists():  # keep v0 (as trained) and the served version
        shutil.rmtree(old)
    return {"noop": False, "already_forgotten": already, "forgotten": todo,
            "version": version + 1, **stats}


def verify(root: str | Path, *, atol: float = 1e-6) -> dict:
    """Retrain the affected shards from scratch without the ledger's ids and compare them with
    the served checkpoints (every stage). ``ok`` when the largest difference is ≤ ``atol``."""
    state, version, _ = load(Path(root))
    gone = state.data.ids[~state.alive]
    if len(gone) == 0:
        return {"ok": True, "version": version, "shards_checked": 0, "max_abs_diff": 0.0}
    shard_of, _ = state.layout.lookup(gone)
    shards = np.unique(shard_of)
    p0, o0 = _init_stack(state.model, state.data, state.cfg, state.key, state.plan.shards)
    fresh = jax.tree.map(lambda a: np.broadcast_to(a, (state.plan.slices + 1, *a.shape)),
                         (p0, o0))
    x, y = _data_arrays(state)
    ref, _ = _run_stages(state._replace(ckpts=fresh), shards, np.zeros_like(shards), x, y)
    diff = max(float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32)[:, shards]
                                     - jnp.asarray(b, jnp.float32)[:, shards])))
               for a, b in zip(jax.tree.leaves(ref[0]), jax.tree.leaves(state.ckpts[0]),
                               strict=True))
    return {"ok": diff <= atol, "version": version, "shards_checked": int(len(shards)),
            "max_abs_diff": diff}


def status(root: str | Path) -> dict:
    """Version served, ledger length, ids forgotten and per-shard sizes."""
    state, version, _ = load(Path(root))
    return {"version": version, "requests": len(read_ledger(root)),
            "forgotten": int((~state.alive).sum()), "shards": state.plan.shards,
            "slices": state.plan.slices, "shard_sizes": state.shard_sizes().tolist()}

