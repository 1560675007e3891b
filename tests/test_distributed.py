"""Scale-out on JAX's own runtime, with real processes: ``jax.distributed`` over a localhost
coordinator with gloo CPU collectives (:mod:`unlearn.runtime`), the member and example axes on
a global mesh (:mod:`unlearn.distributed`), compared with the single-process results.

The worker (``tests/_dist_worker.py``) and the reference run the same :func:`compute`: an
engine ensemble (4 MLPs, a learning-rate grid), SISA training and ``forget``, and at a trained
member's parameters an HVP, a GGN product, K-FAC/EK-FAC factors (eigenvalue products, EK-FAC
corrected eigenvalues, and the K-FAC and EK-FAC inverse products of a vector: the eigenvectors
themselves are fixed only up to sign and, in the null space of an input factor — digits has
constant pixels —, up to rotation) and influence scores, all in float64.

Bit-equal (``max |Δ| = 0``): everything trained — members are independent, each runs the same
loop body on its own device whatever the mesh — and the influence scores (one row per
example, no sum over examples). To a stated tolerance: the sums over examples (HVP, GGN,
K-FAC/EK-FAC factors): each device sums its rows, then an all-reduce adds the partial sums,
so the float64 additions happen in another order. A reordered sum of n terms differs by at
most ``(n−1)·eps·Σ|terms|`` (Higham 2002, §4.2); with n = 50 and eps = 2.2e-16 that is
``1.1e-14·Σ|terms|``. We allow ``1e-12 · max|reference|`` (the terms here are within a factor
~10 of the result; measured: ≤ 7e-16); the inverse products amplify a perturbation of the
factors by up to the condition number of ``factor + shift`` (shift 1e-2), hence ``1e-9``
(measured: 9e-15).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from unlearn import distributed as dist
from unlearn import runtime

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_dist_worker.py"
EXACT = ("ensemble", "sisa", "scores")  # prefixes compared bit for bit
SUMS = ("hvp", "ggn", "kfac_lam", "kfac_diag")  # sums over examples: 1e-12 relative
AMPLIFIED = ("kfac_inverse", "ekfac_inverse")  # inverses of the sums: 1e-9 relative


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(n: int, tmp: Path, devices_per_process: int = 1) -> list[subprocess.Popen]:
    """Start ``n`` worker processes (the same command but the process id) on a free port."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    return [subprocess.Popen([sys.executable, str(WORKER), str(i), str(n), str(port), str(tmp)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(n)]


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{log[-3000:]}"


def _compute_fn():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _dist_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    return _dist_worker.compute


def _compare(got: dict, ref: dict, where: str) -> dict[str, float]:
    """Assert each result against the reference at its tolerance; returns max |Δ| per key."""
    keys = set(ref) - {"devices", "processes"}
    assert set(got) - {"devices", "processes"} == keys, where
    out = {}
    for k in sorted(keys):
        a, b = np.asarray(got[k], np.float64), np.asarray(ref[k], np.float64)
        assert a.shape == b.shape, (where, k, a.shape, b.shape)
        d = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        out[k] = d
        if k.startswith(EXACT):
            assert d == 0.0, f"{where}: {k} differs by {d:.3g} (bit-equal expected)"
        elif k.startswith(SUMS):
            assert d <= 1e-12 * scale, f"{where}: {k} differs by {d:.3g} (scale {scale:.3g})"
        elif k.startswith(AMPLIFIED):
            assert d <= 1e-9 * scale, f"{where}: {k} differs by {d:.3g} (scale {scale:.3g})"
        else:
            raise AssertionError(f"{k}: no tolerance stated")
    return out


@pytest.fixture(scope="module")
def reference():
    """The single-process results (no mesh), computed once for the module."""
    old = jax.config.jax_enable_x64
    try:
        return _compute_fn()(None)
    finally:
        jax.config.update("jax_enable_x64", old)


def _run_pair(tmp_path: Path, reference_fixture_request, n: int, per: int):
    procs = _spawn(n, tmp_path, per)  # start first: they run while the reference computes
    ref = reference_fixture_request.getfixturevalue("reference")
    _wait(procs)
    for i in range(n):
        got = dict(np.load(tmp_path / f"result_{i}.npz"))
        assert int(got["processes"]) == n and int(got["devices"]) == n * per
        _compare(got, ref, f"process {i} of {n} ({per} device(s) each)")


def test_two_processes_equal_one(tmp_path, request):
    """2 processes × 2 devices (a global mesh of 4): ensemble, SISA train + forget, HVP, GGN,
    K-FAC/EK-FAC, influence scores on every process equal the one-process run."""
    _run_pair(tmp_path, request, 2, 2)


@pytest.mark.slow
def test_four_processes_equal_one(tmp_path, request):
    _run_pair(tmp_path, request, 4, 1)


@pytest.mark.slow
def test_one_process_several_devices_equal_no_mesh(reference):
    """One process, the conftest's ``--xla_force_host_platform_device_count=4`` devices."""
    assert len(jax.devices()) == 4
    old = jax.config.jax_enable_x64
    try:
        got = _compute_fn()(dist.global_mesh())
    finally:
        jax.config.update("jax_enable_x64", old)
    assert int(got["devices"]) == 4
    _compare(got, reference, "one process, 4 devices")


def test_example_rows_layout():
    """Contiguous slices per process, padded to a multiple of its devices (hand-computed)."""
    mesh = dist.global_mesh(devices=jax.devices()[:4])  # one process, 4 devices
    assert dist.example_rows(6, mesh).tolist() == [0, 1, 2, 3, 4, 5, -1, -1]
    assert dist.example_rows(8, mesh).tolist() == list(range(8))
    with pytest.raises(ValueError, match="n="):
        dist.example_rows(0, mesh)


def test_shard_examples_and_unpad():
    """Padding rows weigh 0, the weighted sum over a sharded axis equals numpy's, and
    ``unpad`` returns the rows in their original order."""
    mesh = dist.global_mesh(devices=jax.devices()[:4])
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    w = np.linspace(0.5, 1.4, 10).astype(np.float32)
    ex = dist.shard_examples(x, mesh, w)
    assert ex.data.shape == (12, 3) and ex.n == 10
    assert np.asarray(ex.w)[ex.rows < 0].tolist() == [0.0, 0.0]
    total = jax.jit(lambda a, v: v @ a)(ex.data, ex.w)
    np.testing.assert_allclose(np.asarray(total), w @ x, rtol=1e-6)
    np.testing.assert_array_equal(dist.unpad(ex.data, ex), x)
    with pytest.raises(ValueError, match="w must have shape"):
        dist.shard_examples(x, mesh, w[:3])
    with pytest.raises(ValueError, match="multiple of the mesh size"):
        dist.shard_members(np.zeros((3, 2)), mesh)


def test_runtime_switches(tmp_path, monkeypatch):
    """The cache directory follows the argument, then the environment; 'off' turns it off."""
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
    try:
        assert runtime.compile_cache(tmp_path / "c") == (tmp_path / "c").resolve()
        assert jax.config.jax_compilation_cache_dir == str((tmp_path / "c").resolve())
        monkeypatch.setenv("UNLEARN_JAX_CACHE", str(tmp_path / "env"))
        assert runtime.compile_cache() == (tmp_path / "env").resolve()
        monkeypatch.setenv("UNLEARN_JAX_CACHE", "off")
        assert runtime.compile_cache() is None and not jax.config.jax_enable_compilation_cache
        assert runtime.compile_cache(tmp_path / "c", enabled=True) is not None
        with pytest.raises(ValueError, match="enabled="):
            runtime.compile_cache(enabled="yes")
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_enable_compilation_cache", before[1])
        runtime._STATE["cache"] = None
    assert runtime.from_env({}) is False  # no coordinator: nothing changes
    with pytest.raises(ValueError, match="UNLEARN_NUM_PROCESSES"):
        runtime.from_env({"UNLEARN_COORDINATOR": "127.0.0.1:1"})
    with pytest.raises(ValueError, match="process_id"):
        runtime.initialize(2, 2, "127.0.0.1:1")
    with pytest.raises(ValueError, match="coordinator"):
        runtime.initialize(2, 0, "localhost")
