"""One process of the multi-process SISA store tests (``tests/test_distributed_store.py``).

``python tests/_dist_store_worker.py COMMANDS.json RESULT.json`` runs every command of
``COMMANDS.json`` (a list of argument lists of ``python -m unlearn.sisa``) through
:func:`unlearn.sisa.cli` in this one process, in order, and writes
``[{"argv", "rc", "out", "err"}, ...]`` (exit status, stdout, the CLI's stderr) to
``RESULT.json``. Nothing here sets up JAX: with ``$UNLEARN_COORDINATOR``,
``$UNLEARN_NUM_PROCESSES`` and ``$UNLEARN_PROCESS_ID`` the CLI itself joins the multi-process
program (:func:`unlearn.runtime.from_env`), so launching this in N processes is launching the
same CLI commands in N processes (one program for all the commands: the processes must stay in
step across commands). Without them it is the single-process reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def run_commands(commands: list[list[str]]) -> list[dict]:
    from unlearn.sisa.cli import cli  # imports no JAX array: from_env can still run

    out = []
    for argv in commands:
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            rc = cli(list(argv))
        out.append({"argv": list(argv), "rc": rc, "out": so.getvalue(), "err": se.getvalue()})
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(sys.argv[1], encoding="utf-8") as f:
        cmds = json.load(f)
    res = run_commands(cmds)
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(res, f)
