"""Command line of the persistent SISA model: ``python -m unlearn.sisa ...``.

Exit status: 0 success, 1 ``verify`` found a difference (or could not check), 2 a clear error
that names the wrong argument (message on stderr; every file of the directory but the lock
files byte-identical, and a refused ``train`` leaves no directory it created; see
:mod:`unlearn.sisa.store`).

Several processes: with ``$UNLEARN_COORDINATOR`` (``host:port`` of process 0),
``$UNLEARN_NUM_PROCESSES`` and ``$UNLEARN_PROCESS_ID`` set, the same command launched in every
process runs as one program (:func:`unlearn.runtime.from_env`, called before any JAX array):
the shards train on every device of every process, process 0 alone writes the directory, and
every process prints the same result or the same error with the same exit status (the store's
"Several processes"). Without them nothing changes."""

from __future__ import annotations

import argparse
import json
import sys

from unlearn import models as models_lib
from unlearn import runtime
from unlearn.sisa.store import (
    LOCK_TIMEOUT,
    ModelDirError,
    create,
    evaluate,
    forget_persistent,
    status,
    verify,
)


def cli(argv: list[str] | None = None) -> int:
    """``python -m unlearn.sisa {train,forget,predict,verify,status} MODEL_DIR ...``"""
    a = _parser().parse_args(argv)
    try:
        runtime.from_env()  # several processes as one program, when the variables say so
        if a.cmd in ("train", "forget", "verify", "predict"):
            # keep compiled programs between runs: a second forget does not recompile
            runtime.compile_cache()
        out = _run(a)
    except (ModelDirError, KeyError, ValueError, TypeError, FileExistsError, FileNotFoundError,
            FloatingPointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str, ensure_ascii=False))
    return 0 if out.get("ok", True) else 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m unlearn.sisa",
                                 description="A persistent SISA model (Bourtoule et al. 2021).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a new model directory")
    t.add_argument("dir")
    t.add_argument("--data", required=True,
                   help="a dataset name (digits, mnist1d, a TFDS name), folder:PATH (an image "
                        "folder), arrays:PATH.npz (arrays x, y[, ids, num_classes]; copied into "
                        "the directory) or package.module:function (a loader returning an "
                        "unlearn.data.Split or Dataset)")
    t.add_argument("--model", default="mlp",
                   help=f"one of {', '.join(sorted(models_lib.REGISTRY))} (default %(default)s) "
                        "or package.module:function, a factory returning an unlearn.models.Model")
    t.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of the model as a JSON object, e.g. "
                        "'{\"hidden\": [32]}' (default for cnn: small widths)")
    t.add_argument("--shards", type=int, default=4)
    t.add_argument("--slices", type=int, default=2)
    t.add_argument("--assignment", default="uniform", choices=["uniform", "class_balanced"])
    t.add_argument("--overlap", type=float, default=0.0)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--test-fraction", type=float, default=0.25,
                   help="held-out share of the data, in [0, 1) (default %(default)s); 0 "
                        "trains on everything, and predict then has no test split to score")
    f = sub.add_parser("forget", help="forget examples by id (file name for image folders)")
    f.add_argument("dir")
    f.add_argument("--ids", nargs="+", required=True)
    p = sub.add_parser("predict", help="test accuracy of the served ensemble")
    p.add_argument("dir")
    p.add_argument("--how", default="mean_prob", choices=["mean_prob", "vote"])
    for name in ("verify", "status"):
        sub.add_parser(name).add_argument("dir")
    for q in (t, f):
        q.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT,
                       help="seconds to wait for another writer (default %(default)s)")
    return ap


def _run(a: argparse.Namespace) -> dict:
    """The command's JSON result."""
    if a.cmd == "train":
        st = create(a.dir, data=a.data, model=a.model, shards=a.shards, slices=a.slices,
                    assignment=a.assignment, overlap=a.overlap, epochs=a.epochs, lr=a.lr,
                    batch_size=a.batch_size, seed=a.seed, test_fraction=a.test_fraction,
                    model_kwargs=_model_kwargs(a), lock_timeout=a.lock_timeout)
        return {"trained": a.dir, "examples": len(st.data),
                "shard_sizes": st.shard_sizes().tolist()}
    if a.cmd == "forget":
        return forget_persistent(a.dir, a.ids, lock_timeout=a.lock_timeout)
    if a.cmd == "predict":
        return evaluate(a.dir, a.how)
    if a.cmd == "verify":
        return verify(a.dir)
    return status(a.dir)


def _model_kwargs(a: argparse.Namespace) -> dict:
    """``--model-kwargs`` parsed (a JSON object), or the default of ``--model``."""
    if a.model_kwargs is None:
        return {"features": (16, 32), "dense": 64} if a.model == "cnn" else {}
    try:
        kw = json.loads(a.model_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs {a.model_kwargs!r} is not JSON ({e}); pass "
                         "a JSON object such as '{\"hidden\": [32]}'.") from e
    if not isinstance(kw, dict):
        raise ValueError(f"--model-kwargs {a.model_kwargs!r} must be a JSON object "
                         "such as '{\"hidden\": [32]}'.")
    return kw
