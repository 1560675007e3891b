r"""Global-mesh helpers: one program over the devices of every process.

JAX's multi-process model (``jax.distributed``, switched on by
:func:`unlearn.runtime.initialize`): every process runs the same Python program; a *global*
``jax.Array`` has a global shape and lives in pieces on the devices of all processes; a jitted
function of global arrays is one XLA program over the whole mesh, and XLA inserts the
collectives (all-reduce of a sum over a sharded axis, all-gather where a replicated result is
needed). Nothing here is a hand-written reduction.

* :func:`global_mesh` — a 1-D ``Mesh`` over all devices of all processes, grouped by process
  (process ``p``'s devices are a contiguous block of the axis).
* :func:`shard_examples` — the example axis of a dataset as global arrays sharded over that
  axis: process ``p`` contributes its contiguous slice of the rows, padded to the common
  per-process length with weight-0 copies of a real row. Pass the global ``x, y, w`` to the
  existing jitted sums (``curvature.hvp``/``ggn_vp``, ``kfac.kfac_factors``,
  ``influence.influence_scores``): a weighted sum over the rows becomes per-device partial sums
  and one all-reduce, and padding rows weigh 0 in every weighted sum.
* :func:`shard_members` — a stacked member axis (the engine's ensembles) laid on the mesh;
  :func:`replicate` — a pytree copied onto every device (parameters, test points).
* :func:`gather` — a global result brought to every process as NumPy
  (``multihost_utils.process_allgather``); :func:`unpad` drops the padding rows again.

With one process every helper works on that process's devices alone (a mesh of one or of
``--xla_force_host_platform_device_count`` devices), so the same code runs in both settings.
Layer 0: imports only jax and numpy.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any


def _devices(mesh: Mesh) -> list:
    return list(np.asarray(mesh.devices).reshape(-1))


def global_mesh(axis: str = "data", devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``axis`` over ``devices`` (default: ``jax.devices()``, every device of
    every process), ordered by (process index, device id) so that each process's devices form
    one contiguous block of the axis."""
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"axis={axis!r}: pass a non-empty axis name such as 'data'.")
    devs = jax.devices() if devices is None else list(devices)
    if not devs:
        raise ValueError("devices is empty: pass at least one device (or None for all).")
    devs = sorted(devs, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs, dtype=object), (axis,))


def _layout(mesh: Mesh) -> tuple[list[int], int]:
    """(process indices in mesh order, devices per process); every process must hold the same
    number of the mesh's devices, in one contiguous block."""
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh has axes {mesh.axis_names}; pass a 1-D mesh (global_mesh()).")
    procs = [d.process_index for d in _devices(mesh)]
    order = list(dict.fromkeys(procs))
    per = len(procs) // len(order)
    if any(procs[i * per:(i + 1) * per] != [p] * per for i, p in enumerate(order)):
        raise ValueError("mesh: each process must own the same number of devices, as one "
                         "contiguous block of the axis; build it with global_mesh().")
    return order, per


def _leading(tree: PyTree, what: str) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{what}: the pytree has no arrays.")
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{what}: every leaf needs the same leading axis; got sizes "
                         f"{sorted(map(str, sizes))}.")
    return int(sizes.pop())


def _host(a) -> np.ndarray:
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
        raise ValueError("an input is a global array spread over other processes; pass host "
                         "(NumPy) data or a fully replicated array.")
    return np.asarray(a)


class Examples(NamedTuple):
    """The example axis as global arrays (:func:`shard_examples`).

    ``data``: the input pytree, each leaf of global length ``N``; ``w``: (N,) weights, 0 on
    padding rows; ``rows``: (N,) NumPy int, the original row of each global row (−1 for
    padding), the same on every process; ``n``: the number of real rows.
    """

    data: PyTree
    w: jax.Array
    rows: np.ndarray
    n: int


def example_rows(n: int, mesh: Mesh) -> np.ndarray:
    """The original row of every global row (−1 marks padding) when ``n`` rows are laid on
    ``mesh``: process ``k`` (in mesh order) takes rows ``[k c, min((k+1) c, n))`` with
    ``c = ⌈n / processes⌉``, padded to ``m`` = ``c`` rounded up to a multiple of its device
    count."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n={n!r}: pass a positive number of examples.")
    order, per = _layout(mesh)
    c = math.ceil(n / len(order))
    m = math.ceil(c / per) * per
    out = np.full((len(order), m), -1, np.int64)
    for k in range(len(order)):
        r = np.arange(k * c, min((k + 1) * c, n))
        out[k, :len(r)] = r
    return out.reshape(-1)


def shard_examples(tree: PyTree, mesh: Mesh, w=None) -> Examples:
    """Lay the leading (example) axis of ``tree`` on ``mesh``: every process passes the SAME
    host data (all ``n`` rows) and contributes its contiguous slice (:func:`example_rows`);
    ``w`` (n,) example weights (default 1). Padding rows repeat the slice's first real row
    (row 0 for an empty slice) with weight 0, so they are finite and add nothing to any sum
    weighted by ``w``. Per-example outputs of padding rows are garbage: drop them with
    :func:`unpad`."""
    n = _leading(tree, "shard_examples(tree)")
    w = np.ones(n) if w is None else _host(w)
    if w.shape != (n,):
        raise ValueError(f"w must have shape ({n},) to match the data; got {w.shape}.")
    rows = example_rows(n, mesh)
    order, per = _layout(mesh)
    m = len(rows) // len(order)
    me = order.index(jax.process_index()) if jax.process_index() in order else None
    if me is None:
        raise ValueError(f"mesh holds no device of process {jax.process_index()}.")
    mine = rows[me * m:(me + 1) * m]
    real = mine[mine >= 0]
    fill = np.where(mine >= 0, mine, real[0] if len(real) else 0)
    spec = NamedSharding(mesh, P(mesh.axis_names[0]))
    N = len(rows)

    def put(a):
        a = _host(a)
        return jax.make_array_from_process_local_data(spec, a[fill], (N, *a.shape[1:]))

    wdt = jax.dtypes.canonicalize_dtype(w.dtype if w.dtype.kind == "f" else np.float64)
    wl = np.where(mine >= 0, w[fill], 0).astype(wdt)
    return Examples(jax.tree.map(put, tree), put_local(wl, spec, N), rows, n)


def put_local(local: np.ndarray, sharding: NamedSharding, n_global: int) -> jax.Array:
    """This process's block of a global array sharded on its leading axis."""
    return jax.make_array_from_process_local_data(sharding, local,
                                                  (n_global, *local.shape[1:]))


def _put(a, sharding: NamedSharding) -> jax.Array:
    """``a`` (the same host value on every process, or a global array) with ``sharding``."""
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(a)
        return jax.random.wrap_key_data(_put(jax.random.key_data(a), sharding), impl=impl)
    if isinstance(a, jax.Array) and a.sharding == sharding:
        return a
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return call_together(_reshard(sharding), a)  # a reshard, no host copy
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


@functools.cache
def _reshard(sharding: NamedSharding):
    return jax.jit(lambda v: v, out_shardings=sharding)


def shard_members(tree: PyTree, mesh: Mesh, axis: int = 0) -> PyTree:
    """Lay axis ``axis`` (the member axis) of every leaf on ``mesh``'s first axis; the member
    count must be a multiple of the mesh size (pad with dummy members first). Every process
    passes the same host values (or global arrays, which are resharded)."""
    name, size = mesh.axis_names[0], int(np.asarray(mesh.devices).size)

    def put(a):
        if np.ndim(a) <= axis:
            raise ValueError(f"shard_members: a leaf of shape {np.shape(a)} has no axis {axis}.")
        if np.shape(a)[axis] % size:
            raise ValueError(f"shard_members: {np.shape(a)[axis]} members is not a multiple of "
                             f"the mesh size {size}; pad the member axis.")
        spec = [None] * np.ndim(a)
        spec[axis] = name
        return _put(a, NamedSharding(mesh, P(*spec)))

    return jax.tree.map(put, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf copied onto every device of ``mesh`` (a fully replicated global array);
    every process passes the same value."""
    spec = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: _put(a, spec), tree)


def local_members(count: int, mesh: Mesh) -> np.ndarray:
    """Which of ``count`` members (a multiple of the mesh size, laid on the mesh's first axis
    by :func:`shard_members`) sit on this process's devices: a boolean mask ``(count,)``."""
    devs = _devices(mesh)
    if count % len(devs):
        raise ValueError(f"local_members: {count} members is not a multiple of the mesh size "
                         f"{len(devs)}.")
    per = count // len(devs)
    me = jax.process_index()
    return np.repeat([d.process_index == me for d in devs], per)


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether ``mesh`` holds devices of more than one process."""
    if mesh is None:
        return False
    return len({d.process_index for d in _devices(mesh)}) > 1


_BARRIERS = [0]


def barrier(timeout_s: float = 1800.0) -> None:
    """Wait until every process reaches this call: a barrier of the coordination service
    (no device collective); nothing with one process. Every process must make the same
    sequence of calls (the barriers are numbered in call order)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _jd

    _BARRIERS[0] += 1
    _jd.global_state.client.wait_at_barrier(f"unlearn-barrier-{_BARRIERS[0]}",
                                            int(timeout_s * 1000))


_EXCHANGES = [0]


def exchange(text: str, timeout_s: float = 1800.0) -> list[str]:
    """Every process's ``text``, in process order (``[text]`` with one process): each sets its
    key of this exchange in the coordination service's key-value store and reads the others'
    (blocking up to ``timeout_s``). No device collective, so a process may take long (write
    files, wait for a lock) before it arrives. Every process must make the same sequence of
    calls (exchanges are numbered in call order). Once a process has read every key of
    exchange n, every process has finished reading exchange n−1, so its own key of n−1 is
    deleted (the store does not grow)."""
    if jax.process_count() == 1:
        return [text]
    from jax._src import distributed as _jd

    client = _jd.global_state.client
    _EXCHANGES[0] += 1
    n, me = _EXCHANGES[0], jax.process_index()
    client.key_value_set(f"unlearn-exchange/{n}/{me}", text)
    ms = int(min(timeout_s, 2e6) * 1000)  # (an int32 of milliseconds: at most ~24 days)
    out = [client.blocking_key_value_get(f"unlearn-exchange/{n}/{p}", ms)
           for p in range(jax.process_count())]
    if n > 1:
        client.key_value_delete(f"unlearn-exchange/{n - 1}/{me}")
    return out


def call_together(fn, *args):
    """``fn(*args)`` (a jitted function of global arrays), compiled first and dispatched by
    every process after a :func:`barrier`.

    Why: gloo gives a process 30 s to meet its peers at a collective (context set-up
    included, not configurable in jax 0.10.2); a process that compiles a big program while
    its peers already wait in the collective — a loaded machine, or one process compiling
    from the persistent cache and another not — fails with ``DEADLINE_EXCEEDED``. Compiling
    before the barrier leaves only the execution between it and the collectives. The
    compiled executable is kept (keyed by ``fn`` and the arguments' shapes, dtypes and
    shardings), so a later call with the same signature neither traces, lowers nor waits at a
    barrier: every process makes the same calls, so every process finds it compiled."""
    if jax.process_count() == 1:
        return fn(*args)
    leaves, tree = jax.tree.flatten(args)
    key = (fn, tree, tuple(_signature(a) for a in leaves))
    exe = _EXECUTABLES.get(key)
    if exe is None:
        exe = fn.lower(*args).compile()
        if len(_EXECUTABLES) >= _MAX_EXECUTABLES:
            _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
        _EXECUTABLES[key] = exe
        barrier()
    return exe(*args)


_EXECUTABLES: dict = {}
_MAX_EXECUTABLES = 256


def _signature(a):
    if isinstance(a, jax.Array):
        return ("array", a.shape, str(a.dtype), a.sharding, getattr(a, "weak_type", False))
    if isinstance(a, np.ndarray | np.generic):
        return ("numpy", a.shape, str(a.dtype))
    return ("value", type(a), a)  # Python scalars and None: part of the trace


def gather(tree: PyTree) -> PyTree:
    """Every leaf as a NumPy array holding the global value, on every process: a fully
    addressable or replicated array is read directly, a sharded global one is all-gathered
    (``jax.experimental.multihost_utils.process_allgather``, tiled: the global shape)."""
    from jax.experimental import multihost_utils

    def one(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
            return np.asarray(a)
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree.map(one, tree)


def unpad(a, examples: Examples, axis: int = 0) -> np.ndarray:
    """The real rows of a per-example result along ``axis``, in the original order: the
    gathered array with the padding rows of ``examples`` removed."""
    a = gather(a)
    if a.shape[axis] != len(examples.rows):
        raise ValueError(f"unpad: axis {axis} has {a.shape[axis]} rows, the sharded examples "
                         f"{len(examples.rows)}.")
    keep = np.nonzero(examples.rows >= 0)[0]
    return np.take(a, keep[np.argsort(examples.rows[keep])], axis=axis)


__all__ = ["Examples", "barrier", "call_together", "example_rows", "exchange", "gather",
           "global_mesh",
           "local_members", "put_local", "replicate", "shard_examples", "shard_members",
           "spans_processes", "unpad"]
