"""Process-wide switches: JAX's persistent compilation cache and ``jax.distributed``.

Two switches, each the one place its setting is made:

* :func:`compile_cache` — JAX's persistent compilation cache
  (``jax_compilation_cache_dir``): compiled XLA programs are written to a directory outside
  the working tree and reused by later processes, so a second run of an experiment, a
  benchmark or a CLI command skips most compilation. Directory: the ``path`` argument, else
  ``$UNLEARN_JAX_CACHE``, else :func:`default_cache_dir` (``unlearn.data``'s cache root).
  ``UNLEARN_JAX_CACHE=off`` (or ``0``/``false``/``no``/``none``) or ``enabled=False`` leaves
  it off. The SISA CLI, every experiment (``experiments/runner.py``)
  and every benchmark (``benchmarks/_common.py``) call it; library users call it once.
* :func:`initialize` / :func:`from_env` — several processes (hosts) as one JAX program:
  gloo CPU collectives (``jax_cpu_collectives_implementation``) and
  ``jax.distributed.initialize`` with a coordinator address, the number of processes and this
  process's id. After it, ``jax.devices()`` lists the devices of every process and a mesh over
  them (:func:`unlearn.distributed.global_mesh`) spreads the engine's member axis and the
  curvature sums' example axis across processes; XLA inserts the collectives. Without it
  nothing changes: one process, its own devices.

Both must run before JAX creates its backends (before the first array is made).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax

OFF = ("off", "0", "false", "no", "none")
ENV_CACHE = "UNLEARN_JAX_CACHE"
ENV_COORDINATOR = "UNLEARN_COORDINATOR"
ENV_NUM_PROCESSES = "UNLEARN_NUM_PROCESSES"
ENV_PROCESS_ID = "UNLEARN_PROCESS_ID"
MIN_COMPILE_SECS = 0.2  # programs compiling faster than this are not worth a disk entry

_STATE: dict[str, object] = {"cache": None, "distributed": None}


def default_cache_dir() -> Path:
    """``jax`` under ``unlearn.data``'s cache root (``$UNLEARN_CACHE``, else
    ``$XDG_CACHE_HOME/unlearn-cache``, else ``<system temp dir>/unlearn-cache``), outside the
    working tree: the directory the SISA CLI has always used."""
    root = os.environ.get("UNLEARN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", tempfile.gettempdir()), "unlearn-cache")
    return Path(root) / "jax"


def compile_cache(path: str | os.PathLike | None = None, *,
                  enabled: bool | None = None) -> Path | None:
    """Switch JAX's persistent compilation cache on for this process; returns its directory,
    or None when it is off.

    ``path``: the cache directory (default ``$UNLEARN_JAX_CACHE``, else
    :func:`default_cache_dir`). ``enabled``: ``False`` turns it off, ``True`` on even when
    ``$UNLEARN_JAX_CACHE`` says ``off``; ``None`` (default) follows the environment.
    Idempotent: a second call with the same settings changes nothing; a call with another
    directory moves the cache there (JAX reads the setting at each compilation).
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"enabled={enabled!r}: pass True, False or None (follow "
                         f"${ENV_CACHE}).")
    env = os.environ.get(ENV_CACHE, "").strip()
    if enabled is None:
        enabled = env == "" or env.lower() not in OFF
    if not enabled:
        if _STATE["cache"] is not None:
            jax.config.update("jax_enable_compilation_cache", False)
            _STATE["cache"] = None
        return None
    if path is None:
        path = env if env and env.lower() not in OFF else default_cache_dir()
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"path={str(path)!r} is a file; pass a directory for the compilation "
                         "cache.")
    if _STATE["cache"] == path:
        return path
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    _STATE["cache"] = path
    return path


def cache_dir() -> Path | None:
    """The directory :func:`compile_cache` switched on in this process (None when off)."""
    return _STATE["cache"]  # type: ignore[return-value]


def initialize(num_processes: int, process_id: int, coordinator: str, *,
               local_device_ids: list[int] | None = None) -> None:
    """Join a multi-process JAX program: gloo CPU collectives, then
    ``jax.distributed.initialize(coordinator, num_processes, process_id)``.

    ``coordinator``: ``host:port`` of process 0's coordinator service (every process passes
    the same). Call it first thing in every process, before any JAX array exists. Idempotent
    for the same arguments; a second call with others raises.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) \
            or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r}: pass a positive int.")
    if isinstance(process_id, bool) or not isinstance(process_id, int) \
            or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id!r}: pass an int in [0, {num_processes}).")
    if not isinstance(coordinator, str) or ":" not in coordinator:
        raise ValueError(f"coordinator={coordinator!r}: pass 'host:port' of process 0, e.g. "
                         "'127.0.0.1:12345'.")
    args = (num_processes, process_id, coordinator)
    if _STATE["distributed"] is not None:
        if _STATE["distributed"] != args:
            raise ValueError(f"jax.distributed is already initialised with {_STATE['distributed']}"
                             f" (num_processes, process_id, coordinator); got {args}.")
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    _STATE["distributed"] = args


def from_env(environ: dict[str, str] | None = None) -> bool:
    """:func:`initialize` from ``$UNLEARN_COORDINATOR``, ``$UNLEARN_NUM_PROCESSES`` and
    ``$UNLEARN_PROCESS_ID``; returns whether it did. Without ``$UNLEARN_COORDINATOR``
    nothing happens (one process); with it, the other two are required."""
    env = os.environ if environ is None else environ
    coord = env.get(ENV_COORDINATOR, "").strip()
    if not coord:
        return False
    vals = {}
    for name in (ENV_NUM_PROCESSES, ENV_PROCESS_ID):
        raw = env.get(name, "").strip()
        try:
            vals[name] = int(raw)
        except ValueError:
            raise ValueError(f"${name}={raw!r}: set it to an int when ${ENV_COORDINATOR} is set "
                             "(the number of processes / this process's id).") from None
    initialize(vals[ENV_NUM_PROCESSES], vals[ENV_PROCESS_ID], coord)
    return True


def is_distributed() -> bool:
    """Whether this process runs as one of several (``jax.process_count() > 1``)."""
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes shared outputs (files, the SISA store): process 0."""
    return jax.process_index() == 0


__all__ = ["cache_dir", "compile_cache", "default_cache_dir", "from_env", "initialize",
           "is_distributed", "is_writer"]
