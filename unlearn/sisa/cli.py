"""Command line of the persistent SISA model: ``python -m unlearn.sisa ...``."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from unlearn import models as models_lib
from unlearn.sisa.store import ModelDirError, create, forget_persistent, load, status, verify
from unlearn.sisa.train import predict


def cli(argv: list[str] | None = None) -> int:
    """``python -m unlearn.sisa {train,forget,predict,verify,status} MODEL_DIR ...``"""
    ap = argparse.ArgumentParser(prog="python -m unlearn.sisa",
                                 description="A persistent SISA model (Bourtoule et al. 2021).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a new model directory")
    t.add_argument("dir")
    t.add_argument("--data", required=True, help="digits, mnist1d, folder:PATH, ...")
    t.add_argument("--model", default="mlp", choices=sorted(models_lib.REGISTRY))
    t.add_argument("--shards", type=int, default=4)
    t.add_argument("--slices", type=int, default=2)
    t.add_argument("--assignment", default="uniform", choices=["uniform", "class_balanced"])
    t.add_argument("--overlap", type=float, default=0.0)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("forget", help="forget examples by id (file name for image folders)")
    f.add_argument("dir")
    f.add_argument("--ids", nargs="+", required=True)
    p = sub.add_parser("predict", help="test accuracy of the served ensemble")
    p.add_argument("dir")
    p.add_argument("--how", default="mean_prob", choices=["mean_prob", "vote"])
    for name in ("verify", "status"):
        sub.add_parser(name).add_argument("dir")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "train":
            kw = {"features": (16, 32), "dense": 64} if a.model == "cnn" else {}
            st = create(a.dir, data=a.data, model=a.model, shards=a.shards, slices=a.slices,
                        assignment=a.assignment, overlap=a.overlap, epochs=a.epochs, lr=a.lr,
                        batch_size=a.batch_size, seed=a.seed, model_kwargs=kw)
            out = {"trained": a.dir, "examples": len(st.data),
                   "shard_sizes": st.shard_sizes().tolist()}
        elif a.cmd == "forget":
            out = forget_persistent(a.dir, a.ids)
        elif a.cmd == "predict":
            st, v, test = load(a.dir)
            acc = float(np.mean(np.argmax(np.asarray(predict(st, test.x, a.how)), -1) == test.y))
            out = {"version": v, "test_accuracy": acc, "aggregation": a.how}
        elif a.cmd == "verify":
            out = verify(a.dir)
        else:
            out = status(a.dir)
    except (ModelDirError, KeyError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str))
    return 0 if out.get("ok", True) else 1
