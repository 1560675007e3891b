"""Result files: JSON with the config, seed, package versions and git revision."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "scikit-learn", "lineax",
            "orbax-checkpoint", "tensorflow-datasets", "matplotlib", "mnist1d")


def versions() -> dict[str, str]:
    """Installed versions of the packages results depend on, plus Python's."""
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def git_revision() -> str:
    """The current git commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout
        return rev + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "fma")


def cpu() -> dict[str, Any]:
    """The CPU's model name and the vector extensions XLA's CPU code generator picks from
    (two hosts with different ones sum float32 in different orders); empty off Linux."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", ""), "isa": [f for f in _ISA if f in flags]}


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import jax

    return {"platform": platform.platform(), "processor": platform.machine(), "cpu": cpu(),
            "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def to_jsonable(obj: Any) -> Any:
    """NumPy/JAX scalars and arrays to plain JSON types; NaN/inf to null-safe strings."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    return str(obj)


def write(path: str | os.PathLike, results: Any, *, config: dict, seed: int,
          timings: bool = True) -> Path:
    """Write ``{"config", "seed", "results", "meta"}`` atomically as JSON.

    ``meta`` holds versions, git revision and machine. With ``timings=False`` nothing
    wall-clock-dependent is added, so the same command gives byte-identical files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"versions": versions(), "git": git_revision(), "machine": machine()}
    if timings:
        meta["written"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    payload = {"config": to_jsonable(config), "seed": seed, "results": to_jsonable(results),
               "meta": meta}
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read(path: str | os.PathLike) -> dict:
    """Read a file written by :func:`write`."""
    with open(path) as f:
        return json.load(f)
