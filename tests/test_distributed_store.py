"""The persistent SISA store across processes (issue 31): the same CLI commands launched in 2
processes (``jax.distributed`` over a localhost coordinator, gloo; the CLI joins through
``$UNLEARN_COORDINATOR``/``$UNLEARN_NUM_PROCESSES``/``$UNLEARN_PROCESS_ID``) against the same
commands run in ONE process in another directory.

Compared, with no tolerance: every command's exit status, JSON output (but ``forget``'s wall
time and ``train``'s directory name) and error message; the ledger (but time, pid, host); the
manifests (but the orbax files' checksums, which differ between any two saves); the set of
stored checkpoints (content digests); and every checkpoint array, loaded from both
directories, bit for bit (float32, as the store trains). Both processes must print the same
thing. The shard axis lies on a mesh of 2 devices (one per process), so a one-shard ``forget``
runs a 2-slot program where the single process runs 1 slot: the members are independent, so
the results are the same.

Refusals across processes, through ``python -m unlearn.sisa`` itself: an unknown id (decided
by process 0, which alone takes the writer lock) and a directory whose lock another process
holds: both processes exit 2 with the same message and every non-lock file is byte-identical;
``--shards`` that does not fit the devices of the processes: both refuse, nothing is created.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from unlearn.sisa import store
from unlearn.sisa.sources import _training_data

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_dist_store_worker.py"
TRAIN = ["--data", "digits", "--model", "mlp", "--model-kwargs", '{"hidden": [32]}',
         "--shards", "4", "--slices", "2", "--epochs", "2"]
LOCKS = {"LOCK", "READ.lock"}
VOLATILE = {"time", "pid", "host"}  # ledger fields of the process and moment that wrote them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv, n: int = 2) -> list[subprocess.Popen]:
    """``argv`` (a python command line, or a function of the process id giving it) in ``n``
    processes of one jax.distributed program."""
    port = _free_port()
    procs = []
    for i in range(n):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
               "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "UNLEARN_COORDINATOR": f"127.0.0.1:{port}", "UNLEARN_NUM_PROCESSES": str(n),
               "UNLEARN_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, *(argv(i) if callable(argv) else argv)],
                                      cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    try:
        out = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, out, strict=True)]


def _commands(d: Path, ids: list[str]) -> list[list[str]]:
    return [["train", str(d), *TRAIN],
            ["forget", str(d), "--ids", ids[0]],  # one shard: 1 slot alone, 2 on the mesh
            ["forget", str(d), "--ids", *ids[1:]],  # several shards
            ["forget", str(d), "--ids", ids[0]],  # already forgotten: a no-op
            ["forget", str(d), "--ids", "nobody"],  # refused
            ["verify", str(d)],
            ["predict", str(d)],
            ["status", str(d)]]


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in LOCKS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The command sequence in 2 processes (one program) and in one process."""
    base = tmp_path_factory.mktemp("dist_store")
    train_ids = _training_data("digits", 0, 0.25)[0].ids
    ids = [str(train_ids[i]) for i in (1, 2, 400, 800)]
    two, one = base / "two", base / "one"
    bad = ["train", str(base / "bad"), *TRAIN]
    bad[bad.index("--shards") + 1] = "3"  # not a multiple of the 2 devices
    (base / "cmds.json").write_text(json.dumps(_commands(two, ids) + [bad]))
    t0 = time.perf_counter()
    procs = _launch(lambda i: [str(WORKER), str(base / "cmds.json"), str(base / f"r{i}.json")])
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _dist_store_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    try:
        ref = _dist_store_worker.run_commands(_commands(one, ids))  # meanwhile: one process
        t_one = time.perf_counter() - t0
    finally:
        logs = _wait(procs)
    t_two = time.perf_counter() - t0
    for i, (rc, _, err) in enumerate(logs):
        assert rc == 0, f"worker {i} exited with {rc}:\n{err[-3000:]}"
    got = [json.loads((base / f"r{i}.json").read_text()) for i in range(2)]
    print(f"one process: {t_one:.1f} s; two processes: {t_two:.1f} s (concurrently)")
    return {"base": base, "two": two, "one": one, "ids": ids, "got": got, "ref": ref}


def test_two_processes_print_the_same_and_equal_one(runs):
    p0, p1 = runs["got"]
    assert p0 == p1  # every command: exit status, JSON output, error message
    *same, bad = p0
    assert len(same) == len(runs["ref"])
    for g, r in zip(same, runs["ref"], strict=True):
        cmd = g["argv"][0]
        assert (g["rc"], g["err"]) == (r["rc"], r["err"]), (g, r)
        if g["out"]:
            a, b = json.loads(g["out"]), json.loads(r["out"])
            if cmd == "train":
                assert a.pop("trained") == str(runs["two"]) and b.pop("trained") == str(
                    runs["one"])
            if cmd == "forget" and not a["noop"]:
                a.pop("time"), b.pop("time")
            assert a == b, (cmd, a, b)
    assert [g["rc"] for g in same] == [0, 0, 0, 0, 2, 0, 0, 0]
    fg = [json.loads(g["out"]) for g in same[1:4]]
    assert fg[0]["shards_retrained"] == 1 and fg[1]["shards_retrained"] >= 2 and fg[2]["noop"]
    assert "'nobody' is not in the dataset" in same[4]["err"]
    v = json.loads(same[5]["out"])
    assert v["ok"] and v["max_abs_diff"] == 0.0 and v["units_checked"] > 0
    # --shards 3 on 2 devices: both processes refuse before anything is made
    assert bad["rc"] == 2 and "multiple of 2" in bad["err"] and "--shards" in bad["err"]
    assert not (runs["base"] / "bad").exists()


def test_two_process_directory_equals_one(runs):
    two, one = runs["two"], runs["one"]
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(two) == names(one)
    assert names(two / "units") == names(one / "units")  # content digests of the checkpoints
    assert names(two / "versions") == names(one / "versions") == ["v000002.json"]
    assert (two / "config.json").read_bytes() == (one / "config.json").read_bytes()
    for k in ("ids", "shard", "slice", "content"):
        np.testing.assert_array_equal(np.load(two / "layout.npz")[k],
                                      np.load(one / "layout.npz")[k])
    strip = lambda e: {k: v for k, v in e.items() if k not in VOLATILE}  # noqa: E731
    assert [strip(e) for e in store.read_ledger(two)] == [strip(e) for e in
                                                          store.read_ledger(one)]
    unfiled = lambda d: [[{k: v for k, v in u.items() if k != "files"} for u in row]  # noqa
                         for row in store.open_dir(d).manifest["units"]]
    assert unfiled(two) == unfiled(one)
    st2, v2, _ = store.load(two)
    st1, v1, _ = store.load(one)
    assert v2 == v1 == 2
    leaves2, leaves1 = jax.tree.leaves(st2.ckpts), jax.tree.leaves(st1.ckpts)
    assert len(leaves2) == len(leaves1) > 0
    for a, b in zip(leaves2, leaves1, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)  # bit for bit, no tolerance
    assert any(a.dtype == np.float32 for a in leaves2)


def test_refusals_through_the_cli_in_two_processes(runs, tmp_path):
    """``python -m unlearn.sisa`` itself in 2 processes: an unknown id, and a directory
    locked by another process (only process 0 tries the lock): both exit 2 with the same
    message, every non-lock file byte-identical."""
    unknown, locked = tmp_path / "unknown", tmp_path / "locked"
    shutil.copytree(runs["two"], unknown)
    shutil.copytree(runs["two"], locked)
    before = {d: _files(d) for d in (unknown, locked)}
    with store.write_lock(locked, "forget --ids held-by-test"):
        pa = _launch(["-m", "unlearn.sisa", "forget", str(unknown), "--ids", "nobody"])
        pb = _launch(["-m", "unlearn.sisa", "forget", str(locked), "--ids", runs["ids"][1],
                      "--lock-timeout", "1"])
        res = {unknown: _wait(pa), locked: _wait(pb)}
    for d, want in ((unknown, "'nobody' is not in the dataset"), (locked, "held-by-test")):
        errs = []
        for rc, out, err in res[d]:
            assert rc == 2 and out == "", (d.name, rc, out, err[-2000:])
            errs.append([ln for ln in err.splitlines() if ln.startswith("error: ")])
        assert errs[0] == errs[1] and len(errs[0]) == 1 and want in errs[0][0], errs
        assert _files(d) == before[d], d.name
