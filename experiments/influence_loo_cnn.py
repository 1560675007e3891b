"""Influence vs leave-one-out for a non-convex CNN on real MNIST (Koh & Liang 2017, Fig. 2 right).

Command: ``python -m experiments.influence_loo_cnn`` (about 3–4 min on 2 CPU cores; smoke
~30 s).

Koh & Liang §5.1 ("non-convexity and non-convergence"): a small CNN with smooth (tanh)
activations, trained to a point θ̃ that is *not* a minimum; the Hessian there may be
indefinite, so the influence uses the damped curvature :math:`H + \\delta I` (their δ = 0.01);
each "actual" leave-one-out change comes from *retraining from θ̃* without the point, not from
scratch. They report Pearson r = 0.86 between predicted and actual test-loss changes.

Here, all in float64:

* data: a class-balanced ``n_train`` subset of ``mnist5k`` (real MNIST, 10 classes; the first
  ``n_train/10`` training rows of each digit in the fixed split order), the full mnist5k test set;
* model: ``models.cnn(10, features, dense, activation="tanh")`` — conv 3×3 + tanh + 2× max-pool
  per layer, dense + tanh, output (Koh & Liang's All-CNN-C also uses tanh; it replaces pooling
  by strided convolutions);
* θ̃: Adam through the training engine (``adam_epochs``), then ``lbfgs_iter`` full-batch L-BFGS
  steps; the gradient norm reached is recorded (not 0: θ̃ is not a minimum);
* predicted: ``influence.loo_test_loss_change`` with damping δ, for each curvature backend in
  ``backends`` (label: ``curvature-solver``; CG converges to the exact damped inverse, Arnoldi
  and LiSSA approximate it), for the ``test_points`` test points of highest loss;
* actual: the ``top`` training points of largest |prediction| (first backend) are each left
  out and the model retrained from θ̃ by ``retrain_steps`` steps of full-batch heavy-ball
  gradient descent (``train.descend_members``, all leave-one-out runs and one control run as one
  batched program); actual = test loss of the leave-one-out run − test loss of the control run
  (the same steps with every point), so θ̃'s own drift cancels.

Figure ``paper_figures/influence_loo_cnn.png``: predicted vs actual, one panel per backend,
Pearson r in each title beside the paper's 0.86.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import plotting, runner
from unlearn import data, influence, inverse, models, train
from unlearn.objective import cross_entropy

NAME = "influence_loo_cnn"
PAPER_PEARSON = 0.86  # Koh & Liang (2017), Fig. 2 right (CNN on MNIST, damping 0.01)
# label -> (prepare_inverse backend, curvature kind)
BACKENDS = {
    "hessian-cg": ("cg", "hessian"),
    "ggn-cg": ("cg", "ggn"),
    "hessian-arnoldi": ("arnoldi", "hessian"),
    "hessian-lissa": ("lissa", "hessian"),
}
_DEFAULT = dict(n_train=500, features=(4, 8), dense=16, l2=1e-3, adam_epochs=60, adam_lr=3e-3,
                batch_size=50, lbfgs_iter=300, damping=0.01,
                backends=("hessian-cg", "ggn-cg", "hessian-arnoldi", "hessian-lissa"),
                rank=50, test_points=1, top=30, retrain_steps=100, retrain_lr=0.5,
                retrain_momentum=0.9, seed=0)
CONFIGS = {
    "default": _DEFAULT,
    "smoke": {**_DEFAULT, "n_train": 100, "adam_epochs": 10, "lbfgs_iter": 30, "top": 8,
              "retrain_steps": 20, "backends": ("hessian-cg", "ggn-cg"), "rank": 10,
              "damping": 0.1},
}
HEADLINES = {
    "n_train": ("results.n_train", "exact"),
    "test_indices": ("results.test_indices", "exact"),
    "pearson_hessian_cg": ("results.pearson.hessian-cg", "correlation"),
    "pearson_ggn_cg": ("results.pearson.ggn-cg", "correlation"),
}


def _subset(split: data.Split, n_train: int) -> data.Dataset:
    tr = split.train
    if n_train % tr.num_classes:
        raise ValueError(f"n_train={n_train} must be a multiple of {tr.num_classes} (classes).")
    per = n_train // tr.num_classes
    pos = [np.nonzero(tr.y == c)[0][:per] for c in range(tr.num_classes)]
    if min(len(p) for p in pos) < per:
        raise ValueError(f"n_train={n_train}: mnist5k has fewer than {per} training images of "
                         "some digit.")
    return tr.subset(np.sort(np.concatenate(pos)))


def run(*, n_train, features, dense, l2, adam_epochs, adam_lr, batch_size, lbfgs_iter, damping,
        backends, rank, test_points, top, retrain_steps, retrain_lr, retrain_momentum, seed,
        progress=None) -> dict:
    """Predicted (per backend) vs actual leave-one-out test-loss changes; Pearson r."""
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"backends {unknown} unknown; choose from {sorted(BACKENDS)}.")
    progress = progress or runner.no_progress
    with jax.enable_x64(True):
        split = data.load("mnist5k", seed=seed)
        tr, te = _subset(split, n_train), split.test
        model = models.cnn(10, features=features, dense=dense, activation="tanh")
        key = jax.random.key(seed)
        progress("θ̃: Adam (engine, float64)")
        t0 = time.perf_counter()
        cfg = train.TrainConfig(epochs=adam_epochs, batch_size=batch_size, lr=adam_lr, l2=l2,
                                dtype="float64")
        adam = train.fit(model, tr, cfg, key)
        progress("θ̃: L-BFGS (float64)")
        lb = train.fit(model, tr, train.TrainConfig(solver="lbfgs", l2=l2, tol=1e-12,
                                                    max_iter=lbfgs_iter, dtype="float64"),
                       key, params=adam.params)
        star = lb.params
        train_s = time.perf_counter() - t0
        apply = models.frozen_apply(model, {})
        x, y = jnp.asarray(tr.x, jnp.float64), jnp.asarray(tr.y)
        xt_all, yt_all = jnp.asarray(te.x, jnp.float64), jnp.asarray(te.y)
        losses = np.asarray(cross_entropy(apply(star, xt_all), yt_all))
        test_acc = float(np.mean(np.argmax(np.asarray(apply(star, xt_all)), -1) == te.y))
        chosen = np.argsort(-losses)[:test_points]
        xt, yt = xt_all[chosen], yt_all[chosen]
        preds, seconds = {}, {}
        for label in backends:
            solver, kind = BACKENDS[label]
            progress(f"influence ({label})")
            t = time.perf_counter()
            opts = {"rank": rank, "key": jax.random.fold_in(key, 1)} \
                if solver in ("arnoldi", "lissa") else {}
            if solver == "cg":
                opts.update(tol=1e-8, maxiter=5000)
            preds[label] = np.asarray(influence.loo_test_loss_change(
                inverse.Curvature(apply, star, x, y, l2, kind=kind), xt, yt,
                inverse.backend(solver, **opts), damping=damping))
            seconds[label] = time.perf_counter() - t
        first = backends[0]
        rows, drift, t = [], [], time.perf_counter()
        for j, tidx in enumerate(chosen):
            progress(f"retrain from θ̃ without each of {top} points (test point {j + 1})")
            idx = np.argsort(-np.abs(preds[first][j]))[:top]
            w = np.ones((top + 1, len(tr)))
            w[np.arange(top), idx] = 0.0  # the last member is the control
            stacked = train.descend_members(model, star, x, y, w, l2=l2, lr=retrain_lr,
                                            momentum=retrain_momentum, steps=retrain_steps)
            tl = np.asarray(jax.vmap(lambda p, j=j: cross_entropy(
                apply(p, xt[j:j + 1]), yt[j:j + 1])[0])(stacked))
            for r, i in enumerate(idx):
                rows.append({"test_index": int(tidx), "train_id": str(tr.ids[i]),
                               "actual": float(tl[r] - tl[top]),
                               **{f"pred_{b}": float(preds[b][j, i]) for b in backends}})
            drift.append(float(tl[top] - losses[tidx]))  # θ̃'s own drift over the retrain
        retrain_s = time.perf_counter() - t
    actual = np.array([p["actual"] for p in rows])
    pearson = {b: float(np.corrcoef(actual, [p[f"pred_{b}"] for p in rows])[0, 1])
               for b in backends}
    # least-squares slope of actual on predicted: 1 when the damped prediction has the scale of
    # the retrain's change (Pearson r ignores scale)
    slope = {b: float(np.polyfit([p[f"pred_{b}"] for p in rows], actual, 1)[0])
             for b in backends}
    return {"points": rows, "control_drift": drift,
            "pearson": pearson, "slope": slope, "paper_pearson": PAPER_PEARSON,
            "test_indices": chosen.tolist(), "test_losses": losses[chosen].tolist(),
            "n_train": len(tr), "num_params": models.num_params({"params": star["params"]}),
            "test_accuracy": test_acc, "grad_norm": lb.info["grad_norm"],
            "lbfgs_iterations": lb.info["iterations"],
            "seconds": {"train": train_s, "influence": seconds, "retrain": retrain_s}}


def plot(payload: dict, outdir) -> list:
    """Predicted vs actual, one panel per backend, Pearson r beside the paper's."""
    res, cfg = payload["results"], payload["config"]
    backends = cfg["backends"]
    actual = np.array([p["actual"] for p in res["points"]])
    print({k: round(v, 4) for k, v in res["pearson"].items()})
    panels = [(f"{b}: r = {res['pearson'][b]:.3f}", [p[f"pred_{b}"] for p in res["points"]])
              for b in backends]
    with plotting.style() as plt:
        fig = plotting.prediction_panels(plt, actual, panels, diagonal=False, height=3.3,
                                         xlabel="actual Δ test loss (retrain from θ̃)")
        fig.suptitle(f"Non-convex leave-one-out: tanh CNN ({res['num_params']:,} params) on "
                     f"mnist5k, n={res['n_train']}, damping {cfg['damping']:g}; "
                     f"Koh & Liang 2017: r = {res['paper_pearson']}", y=1.03)
        return plotting.savefig(fig, f"{outdir}/{NAME}.png")


if __name__ == "__main__":
    runner.main(sys.modules[__name__])
