"""Content-addressed checkpoints of the persistent SISA model directory: one orbax checkpoint
per unit (shard, stage), stored under ``units/<digest>``, and the versions that list them.

**Why not orbax's CheckpointManager.** A CheckpointManager step is one self-contained directory
per version and can only delete whole steps. Here versions share most units (a one-id request
retrains one shard from one slice), and the purge must delete single (shard, stage) units of
the previous version while keeping the rest. So each unit is its own orbax ``PyTreeCheckpointer``
checkpoint (the pytree itself, not flattened leaves), stored under its content digest; versions
are manifests of digests (:mod:`unlearn.sisa.ledger`). Identical units are stored once and the
digest is checked on load, after the unit's files are checked against the manifest's checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np

from unlearn.data import Dataset
from unlearn.sisa.ledger import (
    FORMAT,
    UNITS,
    VERSIONS,
    Dir,
    ModelDirError,
    _crash_point,
    _fsync_dir,
    _manifest_digest,
    _manifest_path,
    _tmp_name,
    _write_atomic,
)
from unlearn.sisa.train import _init_stack


def _digest(tree) -> str:
    h = hashlib.sha256()
    for a in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:40]


def _quiet_orbax():
    """``orbax.checkpoint``, with absl's logger quieted. Imported here, on first use: it is
    heavy (tensorstore) and only reading or writing a unit needs it: ``import unlearn.sisa``
    (so ``import unlearn.methods``) and ``status`` neither load it nor change absl's logging."""
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp


def _checkpointer(ocp):
    """An orbax pytree checkpointer for this process alone. In one process orbax's default;
    in a multi-process program one whose primary host and only active process is this one
    (a default one expects every process to join each save and restore, but the SISA store
    is written by process 0 alone and read by each process on its own)."""
    if jax.process_count() == 1:
        return ocp.PyTreeCheckpointer()
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp),
                            multiprocessing_options=mp)


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
    with _checkpointer(ocp) as ck:  # closed: no orbax threads left at exit
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
        with _checkpointer(ocp) as ck:
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


def _template(model, cfg, x_shape, key):
    """Shapes of one ``{variables, opt_state}`` unit by shape inference of the trainer's own
    initialisation (no compilation)."""
    one = Dataset(np.zeros((1, *x_shape), np.float32), np.zeros(1, np.int32), np.array(["0"]),
                  1, "template")
    v, o = jax.eval_shape(lambda: _init_stack(model, one, cfg, key, 1))
    drop = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)  # noqa: E731
    return {"variables": jax.tree.map(drop, v), "opt_state": jax.tree.map(drop, o)}


def _load_ckpts(d: Dir, model, cfg, x_shape, key):
    """The served checkpoints stacked (R+1, S) as ``(variables, opt_state)`` host arrays."""
    tmpl = _template(model, cfg, x_shape, key)
    rows = [[_load_unit(d.root, u, tmpl) for u in row] for row in d.manifest["units"]]
    stack = jax.tree.map(lambda *a: np.stack(a), *[jax.tree.map(lambda *b: np.stack(b), *row)
                                                   for row in rows])
    return stack["variables"], stack["opt_state"]


def _split_units(ckpts) -> list[list]:
    """(R+1, S)-stacked (variables, opt_state) -> grid of per-unit pytrees."""
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

