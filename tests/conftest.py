"""Test setup: CPU backend, 4 virtual devices, a persistent compilation cache, x64 on demand.

The environment variables must be set before JAX is imported anywhere.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import importlib.util  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# This directory is the namespace package ``tests`` (``tests.byo_factory`` is a user factory the
# SISA store tests import by name). An installed regular package called ``tests`` would win over
# a namespace package wherever it sits on sys.path — kronfluence 1.0.1 (the optional torch
# extra) installs one — so point ``tests`` at this directory explicitly.
_HERE = Path(__file__).resolve().parent
_found = importlib.util.find_spec("tests")
if _found is None or not any(Path(p).resolve() == _HERE
                             for p in (_found.submodule_search_locations or [])):
    _pkg = types.ModuleType("tests")
    _pkg.__path__ = [str(_HERE)]
    sys.modules["tests"] = _pkg

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("UNLEARN_JAX_CACHE", os.path.join(tempfile.gettempdir(), "unlearn-jax-cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def x64():
    """Enable float64 for one test and restore the previous setting afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)
