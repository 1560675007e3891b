"""Helpers shared by the benchmark scripts: timing and the RESULTS.md section writer.

Importing this module switches JAX's persistent compilation cache on for the benchmark's
process (:func:`unlearn.runtime.compile_cache`; ``UNLEARN_JAX_CACHE=off`` keeps it off), so a
rerun does not compile again. Benchmarks report steady-state times after warm-up calls, which
the cache does not change; a compile time a benchmark reports is then a cache read.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import jax

from unlearn import runtime

runtime.compile_cache()

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def best_time(fn: Callable, *, repeat: int = 3, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the ``<!-- name -->`` … ``<!-- /name -->`` section of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"<!-- {name} -->\n{body.rstrip()}\n<!-- /{name} -->"
    pat = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text + ("" if text.endswith("\n") else "\n"))
