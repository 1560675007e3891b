"""SISA's accuracy / unlearning-cost trade-off (Bourtoule et al. 2021, Figs. 5-7 style) and the
seed material's hockey-jersey example.

Command: ``python -m experiments.sisa_tradeoff`` (about 2-3 min on 2 CPU cores; smoke: ~20 s).

Setting 1 (digits, MLP): for S ∈ {1, 2, 4, 8, 16} shards and R ∈ {1, 2, 4} slices, train the
SISA ensemble, report test accuracy of the aggregate (mean probability and majority vote), then
serve a stream of random single-point deletion requests and report, per request, the
example-gradients recomputed and the wall time, against full retraining of one model on all
data (S = R = 1: ``points`` = epochs × n, time measured). Setting 2 (the seed tutorial's
shape): a synthetic 3-class image folder of jersey-like pictures (``Away_image03.png``, ...),
the team's whole folder as training set (tested on a second, held-out folder), a small CNN,
4 shards, 2 slices with 50% overlap (see ``unlearn.sisa`` on what overlap means under
incremental training), three named images forgotten by file name; exactness is checked
against training the same plan on the data without them.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from experiments import plotting, runner
from unlearn import data, models, sisa, train

NAME = "sisa_tradeoff"
CONFIGS = {
    "default": dict(dataset="digits", hidden=64, shards=(1, 2, 4, 8, 16), slices=(1, 2, 4),
                    epochs=20, lr=2e-3, batch_size=32, requests=8, hockey_epochs=12,
                    hockey_size=16, seed=0),
    # The smoke run skips the CNN (hockey_epochs=0): its unrolled 4-shard program alone takes
    # about a minute to compile on 2 CPU cores.
    "smoke": dict(dataset="digits", hidden=32, shards=(1, 4), slices=(2,), epochs=3,
                  lr=3e-3, batch_size=32, requests=2, hockey_epochs=0, hockey_size=8, seed=0),
    # For users who have prepared the TFDS sets (`tfds build mnist` etc.); not run in CI.
    **{f"tfds_{n}": dict(dataset=n, hidden=256, shards=(1, 2, 4, 8, 16), slices=(1, 2, 4),
                         epochs=10, lr=1e-3, batch_size=128, requests=8, hockey_epochs=12,
                         hockey_size=16, seed=0)
       for n in ("mnist", "fashion_mnist", "cifar10")},
}
FORGET_NAMES = ("Away_image03.png", "Home_image07.png", "Third_image11.png")


def _acc(scores, y) -> float:
    return float(np.mean(np.argmax(np.asarray(scores), -1) == y))


def tradeoff(*, dataset, hidden, shards, slices, epochs, lr, batch_size, requests,
             seed) -> list[dict]:
    """Accuracy and per-request unlearning cost for every (S, R)."""
    split = data.load(dataset, seed=seed)
    tr, te = split.train, split.test
    m = models.mlp(tr.num_classes, (hidden,))
    cfg = train.TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size)
    key = jax.random.key(seed)
    rng = np.random.default_rng(seed)
    stream = tr.ids[rng.choice(len(tr), requests, replace=False)]
    rows, warm = [], set()
    for S in shards:
        for R in slices:
            plan = sisa.Plan(S, R)
            if S not in warm:  # one compiled program per shard count: warm it once
                sisa.train(m, tr, cfg, plan, key)
                warm.add(S)
            t0 = time.perf_counter()
            st = sisa.train(m, tr, cfg, plan, key)
            t_train = time.perf_counter() - t0
            row = {"S": S, "R": R, "train_time": t_train,
                   "acc_mean_prob": _acc(sisa.predict(st, te.x, "mean_prob"), te.y),
                   "acc_vote": _acc(sisa.predict(st, te.x, "vote"), te.y)}
            if not rows:
                sisa.forget(st, stream[:1])  # compile the one-shard program once
            pts, wall = [], []
            for i in stream:
                st, s = sisa.forget(st, [i])
                pts.append(s["points_retrained"])
                wall.append(s["time"])
            row.update(points_per_request=float(np.mean(pts)), time_per_request=float(
                np.mean(wall)), full_points=epochs * len(tr))
            rows.append(row)
            print(f"[{NAME}] S={S} R={R} acc={row['acc_mean_prob']:.3f} "
                  f"pts={row['points_per_request']:.0f} t={row['time_per_request']:.3f}s",
                  file=sys.stderr)
    base = next(r for r in rows if r["S"] == 1 and r["R"] == 1) if any(
        r["S"] == 1 and r["R"] == 1 for r in rows) else None
    for r in rows:
        full_t = base["train_time"] if base else r["train_time"]
        r["speedup_time"] = full_t / max(r["time_per_request"], 1e-9)
        r["speedup_points"] = r["full_points"] / max(r["points_per_request"], 1.0)
    return rows


def jersey_folder(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    """A synthetic 3-class image folder: jerseys with class-specific colours and stripes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    kinds = {"Away": ((230, 230, 230), (200, 20, 20), 0), "Home": ((20, 40, 160),
             (240, 240, 240), 1), "Third": ((20, 20, 20), (240, 200, 0), 2)}
    for cname, (body, stripe, orient) in kinds.items():
        (root / cname).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((32, 32, 3)) + np.array(body)
            w = rng.integers(2, 5)
            for k in range(rng.integers(0, 4), 32, 8):
                if orient == 0:
                    img[k: k + w, 6:26] = stripe
                elif orient == 1:
                    img[4:28, k: k + w] = stripe
                else:
                    img[max(0, k - 4): k, max(0, k - 4): k] = stripe
            img[:, :6] = img[:, 26:] = rng.integers(60, 200, 3)  # background / ice
            img += rng.normal(0, 20, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / cname / f"{cname}_image{i:02d}.png")
    return root


def hockey(*, epochs, size, seed) -> dict:
    """4 shards × 2 overlapping slices on the jersey folder; forget three named images."""
    # The team's folder is the whole training set (so every named image is in it); the test
    # set is a second folder of the same kinds of pictures, as if from another game.
    with tempfile.TemporaryDirectory() as tmp:
        root = jersey_folder(Path(tmp) / "jerseys", seed=seed)
        held_out = jersey_folder(Path(tmp) / "held_out", per_class=10, seed=seed + 1)
        tr = data.image_folder(str(root), size=(size, size))
        te = data.image_folder(str(held_out), size=(size, size))
    forget_ids = sisa.resolve_ids(tr, FORGET_NAMES)  # as `python -m unlearn.sisa forget --ids`
    m = models.cnn(tr.num_classes, features=(8, 16), dense=32)
    cfg = train.TrainConfig(epochs=epochs, lr=3e-3, batch_size=8)
    plan = sisa.Plan(4, 2, overlap=0.5)
    key = jax.random.key(seed)
    st = sisa.train(m, tr, cfg, plan, key)
    before = _acc(sisa.predict(st, te.x), te.y)
    new, stats = sisa.forget(st, forget_ids)
    scratch = sisa.train(m, tr.without(forget_ids), cfg, plan, key, layout=st.layout)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(new.ckpts), jax.tree.leaves(scratch.ckpts),
                               strict=True))
    return {"n_train": len(tr), "n_test": len(te), "forgotten": forget_ids,
            "strategy": st.strategy, "test_acc_before": before,
            "test_acc_after": _acc(sisa.predict(new, te.x), te.y),
            "max_abs_diff_vs_scratch": diff, "slice_sizes": np.bincount(
                st.layout.slice, minlength=2).tolist(), **stats}


def run(*, dataset, hidden, shards, slices, epochs, lr, batch_size, requests, hockey_epochs,
        hockey_size, seed) -> dict:
    """Both settings; JSON-able."""
    rows = tradeoff(dataset=dataset, hidden=hidden, shards=shards, slices=slices, epochs=epochs,
                    lr=lr, batch_size=batch_size, requests=requests, seed=seed)
    hk = hockey(epochs=hockey_epochs, size=hockey_size, seed=seed) if hockey_epochs else None
    return {"rows": rows, "hockey": hk}


def plot(payload: dict, outdir) -> list:
    """Accuracy vs shards (per R) and unlearning speed-up vs shards (wall time and points)."""
    res = payload["results"]
    rows, hk = res["rows"], res["hockey"]
    Rs = sorted({r["R"] for r in rows})
    with plotting.style() as plt:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        st = plotting.method_style("sisa")
        for j, R in enumerate(Rs):
            rr = sorted((r for r in rows if r["R"] == R), key=lambda r: r["S"])
            S = [r["S"] for r in rr]
            alpha = 0.4 + 0.6 * (j + 1) / len(Rs)
            a1.plot(S, [r["acc_mean_prob"] for r in rr], marker="o", color=st["color"],
                    alpha=alpha, label=f"R={R} mean prob")
            a1.plot(S, [r["acc_vote"] for r in rr], marker="s", ls=":", color=st["color"],
                    alpha=alpha, label=f"R={R} vote")
            a2.plot(S, [r["speedup_time"] for r in rr], marker="o", color=st["color"],
                    alpha=alpha, label=f"R={R} wall time")
            a2.plot(S, [r["speedup_points"] for r in rr], marker="^", ls="--", color="#ff7f0e",
                    alpha=alpha, label=f"R={R} points")
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_xlabel("shards S")
        a1.set_ylabel("test accuracy of the aggregate")
        a1.legend(fontsize=6)
        a2.set_yscale("log")
        a2.set_ylabel("speed-up vs full retraining")
        a2.legend(fontsize=6)
        title = f"SISA on {payload['config']['dataset']}"
        if hk:
            title += (f"; jerseys (4×2, 50% overlap): forgot 3 images, "
                      f"{hk['shards_retrained']} shards retrained, acc "
                      f"{hk['test_acc_before']:.2f}→{hk['test_acc_after']:.2f}")
        fig.suptitle(title, fontsize=8)
        return plotting.savefig(fig, f"{outdir}/{NAME}.png")


if __name__ == "__main__":
    runner.main(sys.modules[__name__])
