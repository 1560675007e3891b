r"""kronfluence's EK-FAC vs this project's EK-FAC and EK-FAC-PCG on the SAME decoder transformer
(GitHub #29): time, peak memory, agreement with an exact damped reference and the LDS of each.

Command: ``python -m benchmarks.transformer_peers`` (``--n``, ``--width``, ``--queries``,
``--subsets``, ``--epochs``: sizes; ``--no-write``: do not touch RESULTS.md). Needs
``torch==2.13.0`` (CPU) and ``kronfluence==1.0.1``; without them only our rows run.

**Model and data.** ``data.char_corpus`` (seeded synthetic sentences, next-token targets,
padding ``-1``): the first ``n`` sequences train, the next ``queries`` are the test points.
``models.transformer(vocab, width, depth=2, heads=2, max_len=32, tied=False)`` (untied, so the
output layer is a dense layer kronfluence can track), trained by the engine (Adam, ``epochs``
epochs, batch 32, ``l2`` = λ) in float32. Loss: the per-sequence MEAN token cross-entropy
:math:`\ell_i` (the project's ``sequence_cross_entropy``), objective
:math:`\frac1n\sum_i\ell_i + \frac\lambda2\lVert\theta\rVert^2`. Measurement: the test
sequence's loss.

**What every row estimates.** ``scores[q, i]`` :math:`= -\nabla\ell_q^\top(G + (\lambda +
\lambda_d)I)^{-1}\nabla\ell_i`, :math:`G` the GGN of the mean loss. Reference: the same with
plain CG to relative residual 1e-8 in float64 (``inverse.CG``) on the exact damped GGN.

**kronfluence, its conventions (llm-unlearning.md §6.1).** It sums the training loss over a
batch; we make each sequence's term the project's per-sequence mean token loss, so its
"summed loss" is :math:`\sum_i\ell_i`. Its EK-FAC eigenvalue correction divides by the number
of sequences, so :math:`\Lambda` approximates the diagonal (in its Kronecker eigenbasis) of the
Fisher of the mean of :math:`\ell_i`, whose expectation over sampled labels is :math:`G`; its
covariances :math:`A, S` are token means (padding masked by ``get_attention_mask`` = ``y ≥ 0``)
and only fix the eigenbasis. Factors use labels **sampled** from the model, one per position
(its default ``use_empirical_fisher=False``; the re-sampled targets keep the padding mask);
scores use the true labels. ``damping_factor = λ + λ_d`` (its loss has no L2 term). It tracks
``nn.Linear`` modules only — the embeddings and LayerNorms (about 20 % of the parameters here)
contribute nothing to its scores, so the row ``ekfac (Dense only)`` gives our EK-FAC restricted
the same way. Its scores are :math:`+\nabla m^\top(\cdot)^{-1}\nabla\ell`: the sign is flipped.

**PyTorch twin.** ``benchmarks._torch.torch_transformer`` gets the flax weights copied in;
its float32 logits are asserted equal to JAX's to 1e-5 (relative to the largest logit) before
anything is timed.

**Timed rows** (each in a fresh subprocess, cold: JIT compilation included for ours; peak RSS
``VmHWM``): ``ekfac`` (``inverse.EKFAC``: factors with exact per-token output roots, no
sampling), ``ekfac-sampled`` (``inverse.EKFAC(samples=1)``: one sampled label per token, as
kronfluence), ``kronfluence-ekfac`` (``fit_all_factors`` + ``compute_pairwise_scores``); with
``--rows`` also ``pcg-ekfac`` (``inverse.EKFACPCG``, CG to 1e-5). All in float32. "second
call s": the same factors + scores computation again in the same process (ours: compiled
programs reused; kronfluence: under new factor/score names, so nothing is read back).

**Curvature products** (float64, not timed; ``--counts``, slow): plain CG and EK-FAC-PCG to
relative residual 1e-8 on the test gradients, one CG per right-hand side (``block=False``) and
block CG. Without it the reference's and the ``pcg-ekfac`` row's iterations are reported.

**LDS** (``unlearn.lds``): ``subsets`` models of the same config trained on random halves of
the training set (one engine ensemble), their test losses, Spearman per test sequence,
mean ± 95 % t-interval.
"""

from __future__ import annotations

import argparse
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

L2, DAMPING, T, DEPTH, HEADS = 1e-4, 1e-3, 32, 2, 2
REF_TOL = 1e-8
ROWS = ("ekfac", "ekfac-sampled", "kronfluence-ekfac")
"""Default rows; ``pcg-ekfac`` (``--row``) needs thousands of products at this damping (the
reference's CG took 4 400–4 600 per test gradient, and EK-FAC preconditioning needs more:
RESULTS.md), so it is not in the default run."""


def _rss_mb() -> float:
    """This process's peak resident memory (MB): ``VmHWM`` (reset by ``exec``; Linux keeps
    ``ru_maxrss`` across ``exec``, so a child would report its parent's peak), else
    ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _spec(cfg: dict):
    from unlearn import models

    return models.transformer(cfg["vocab"], width=cfg["width"], depth=DEPTH, heads=HEADS,
                              max_len=T, tied=False)


def _data(cfg: dict):
    from unlearn import data

    ds = data.char_corpus(n=cfg["n"] + cfg["queries"], seq_len=T, seed=0)
    return ds.subset(np.arange(cfg["n"])), ds.subset(np.arange(cfg["n"], len(ds)))


def _save_params(path: Path, params) -> None:
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params, sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def _load_params(path: Path, dtype=np.float32):
    import jax.numpy as jnp
    from flax import traverse_util

    z = np.load(path)
    return traverse_util.unflatten_dict({k: jnp.asarray(z[k], dtype) for k in z.files}, sep="/")


# ------------------------------------------------------------------------------ rows


def run_ours(row: str, cfg: dict, workdir: Path) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from jax.flatten_util import ravel_pytree

    from unlearn import influence, inverse

    rss0 = _rss_mb()
    model = _spec(cfg)
    tr, te = _data(cfg)
    params = _load_params(workdir / "params.npz")
    x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)
    curv = inverse.Curvature(model.apply, params, x, y, L2, kind="ggn")
    backend = {"ekfac": inverse.EKFAC(chunk_size=64),
               # one sampled label per token, as kronfluence's factors (same key every run)
               "ekfac-sampled": inverse.EKFAC(chunk_size=64, samples=1, key=jax.random.key(0)),
               "pcg-ekfac": inverse.EKFACPCG(chunk_size=64, tol=1e-5, block=False,
                                             maxiter=3000)}[row]
    def once():
        t0 = time.perf_counter()
        prepared = backend.prepare(curv, DAMPING)
        t1 = time.perf_counter()
        out = influence.influence_up_loss(curv, jnp.asarray(te.x), jnp.asarray(te.y), prepared)
        scores = np.asarray(jax.block_until_ready(out.scores), np.float64)
        return out, scores, t0, t1, time.perf_counter()

    out, scores, t0, t1, t2 = once()  # cold: compilation included
    *_, w0, _, w2 = once()  # warm: the same call again in this process
    res = {"prepare_s": t1 - t0, "request_s": t2 - t1, "total_s": t2 - t0, "rss0_mb": rss0,
           "warm_s": w2 - w0, "iterations": np.asarray(out.solution.iterations).tolist()}
    np.save(workdir / f"scores_{row}.npy", scores)
    if row == "ekfac":  # restricted to the Dense layers, as kronfluence tracks them
        flat = traverse_util.flatten_dict(params, sep="/")
        keep = {k: jnp.full(v.shape, float(_is_dense(k, flat)), v.dtype) for k, v in flat.items()}
        mask = ravel_pytree(traverse_util.unflatten_dict(keep, sep="/"))[0]
        sd = influence.influence_scores(model.apply, params, x, y, out.s_test * mask[None])
        np.save(workdir / "scores_ekfac-dense.npy", -np.asarray(sd, np.float64))
        res["dense_fraction"] = float(mask.mean())
    return res


def _is_dense(key: str, flat: dict) -> bool:
    """A Dense layer's kernel or bias (not an Embed table, not a LayerNorm scale/bias)."""
    mod, _, leaf = key.rpartition("/")
    return leaf == "kernel" or (leaf == "bias" and f"{mod}/kernel" in flat)


class _Seqs:
    """A torch map-style dataset of (x, y) pairs."""

    def __init__(self, x, y):
        import torch

        self.x, self.y = torch.from_numpy(np.asarray(x)).long(), torch.from_numpy(
            np.asarray(y)).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _seq_mean_ce(torch, logits, y):
    """Σ_i (per-sequence mean token CE over y ≥ 0): the project's ℓ_i, summed (kronfluence)."""
    import torch.nn.functional as F

    mask = (y >= 0).to(logits.dtype)
    tok = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")
    return ((tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)).sum()


def run_kronfluence(cfg: dict, workdir: Path) -> dict:
    import logging

    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from benchmarks._torch import load_flax_transformer, torch_transformer

    rss0 = _rss_mb()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tr, te = _data(cfg)
    net = torch_transformer(_spec(cfg).spec)
    load_flax_transformer(net, _load_params(workdir / "params.npz"))
    net.eval()

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            xb, yb = batch
            logits = model(xb)
            if sample:
                with torch.no_grad():
                    p = torch.softmax(logits.detach(), -1)
                    s = torch.multinomial(p.reshape(-1, p.shape[-1]), 1).reshape(yb.shape)
                    yb = torch.where(yb >= 0, s, yb)
            return _seq_mean_ce(torch, logits, yb)

        def compute_measurement(self, batch, model):
            xb, yb = batch
            return _seq_mean_ce(torch, model(xb), yb)

        def get_attention_mask(self, batch):
            return (batch[1] >= 0).long()

    logging.disable(logging.WARNING)
    task = _Task()
    model = prepare_model(net, task)
    out_dir = tempfile.mkdtemp(prefix="kronfluence-")
    an = Analyzer("transformer", model=model, task=task, cpu=True, disable_tqdm=True,
                  output_dir=out_dir)
    trd, ted = _Seqs(tr.x, tr.y), _Seqs(te.x, te.y)

    def once(tag):
        t0 = time.perf_counter()
        an.fit_all_factors(f"ekfac{tag}", dataset=trd, per_device_batch_size=64,
                           factor_args=FactorArguments(strategy="ekfac"),
                           overwrite_output_dir=True)
        t1 = time.perf_counter()
        an.compute_pairwise_scores(f"s{tag}", f"ekfac{tag}", query_dataset=ted,
                                   train_dataset=trd, per_device_query_batch_size=len(ted),
                                   per_device_train_batch_size=64,
                                   score_args=ScoreArguments(damping_factor=L2 + DAMPING),
                                   overwrite_output_dir=True)
        sc = an.load_pairwise_scores(f"s{tag}")["all_modules"]
        return sc, t0, t1, time.perf_counter()

    sc, t0, t1, t2 = once("")
    _, w0, _, w2 = once("-again")  # the same computation again (new names: nothing cached)
    np.save(workdir / "scores_kronfluence-ekfac.npy", -sc.numpy().astype(np.float64))
    return {"prepare_s": t1 - t0, "request_s": t2 - t1, "total_s": t2 - t0, "rss0_mb": rss0,
            "warm_s": w2 - w0}


def child(row: str, cfg: dict, workdir: Path) -> None:
    res = run_kronfluence(cfg, workdir) if row == "kronfluence-ekfac" else run_ours(
        row, cfg, workdir)
    res["peak_mb"] = _rss_mb()
    (workdir / f"row_{row}.json").write_text(json.dumps(res))


# ------------------------------------------------------------------------------ parent


def prepare(cfg: dict, workdir: Path, log) -> dict:
    """Train (float32), check the PyTorch twin, the float64 reference and the CG/PCG counts."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from unlearn import influence, inverse, train

    tr, te = _data(cfg)
    model = _spec(cfg)
    tcfg = train.TrainConfig(epochs=cfg["epochs"], batch_size=32, lr=3e-3, l2=L2)
    t0 = time.perf_counter()
    fit = train.fit(model, tr, tcfg, jax.random.key(0))
    out = {"train_s": time.perf_counter() - t0, "final_loss": fit.info.get("final_loss")}
    _save_params(workdir / "params.npz", fit.params)
    out["p"] = int(ravel_pytree(fit.params)[0].size)
    log(f"trained p={out['p']} in {out['train_s']:.0f} s, loss {out['final_loss']:.3f}")
    try:
        import torch

        from benchmarks._torch import load_flax_transformer, torch_transformer

        net = torch_transformer(model.spec)
        load_flax_transformer(net, fit.params)
        with torch.no_grad():
            lt = net(torch.from_numpy(np.asarray(tr.x)).long()).numpy()
        lj = np.asarray(model.apply(fit.params, jnp.asarray(tr.x)))
        err = float(np.abs(lt - lj).max() / np.abs(lj).max())
        out["twin_rel_err"] = err
        if err > 1e-5:
            raise AssertionError(f"PyTorch twin logits differ from JAX's by {err:.1e} (rel)")
        log(f"PyTorch twin: logits agree to {err:.1e} (relative to the largest)")
    except ImportError:
        pass
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), fit.params)
        x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)
        curv = inverse.Curvature(model.apply, params, x, y, L2, kind="ggn")
        g = influence.example_gradients(model.apply, params, jnp.asarray(te.x),
                                        jnp.asarray(te.y), measure=True)
        t0 = time.perf_counter()
        ref = inverse.CG(tol=REF_TOL, block=False, maxiter=20000).prepare(curv, DAMPING).apply(g)
        out["reference_s"] = time.perf_counter() - t0
        out["reference_residual"] = float(np.max(np.asarray(ref.residual)))
        out["reference_its"] = np.asarray(ref.iterations).tolist()
        scores = -influence.influence_scores(model.apply, params, x, y, ref.x)
        np.save(workdir / "scores_reference.npy", np.asarray(scores, np.float64))
        log(f"reference: CG to {REF_TOL:g} in {out['reference_s']:.0f} s, residual "
            f"{out['reference_residual']:.1e}, iterations {out['reference_its']}")
        counts = {}
        if not cfg.get("counts"):
            out["counts"] = counts
            return out
        pcg = inverse.EKFACPCG(chunk_size=64, tol=1e-8, block=False, maxiter=20000)
        pre = pcg.prepare(curv, DAMPING)
        for name, b, prep in (
                ("cg", inverse.CG(tol=1e-8, block=False, maxiter=20000), None),
                ("cg-block", inverse.CG(tol=1e-8, block=True, maxiter=20000), None),
                ("pcg-ekfac", pcg, pre),
                ("pcg-ekfac-block", inverse.CG(tol=1e-8, block=True, maxiter=20000,
                                               precond=pre.state), None)):
            sol = (prep or b.prepare(curv, DAMPING)).apply(g)
            its = np.asarray(sol.iterations)
            sx = np.asarray(sol.x)
            pear = min(float(np.corrcoef(sx[i], np.asarray(ref.x[i]))[0, 1])
                       for i in range(len(sx)))
            counts[name] = {"mean_its": float(its.mean()), "max_its": int(its.max()),
                            "min_pearson_s_test": pear}
            log(f"{name}: iterations mean {its.mean():.0f} max {its.max()}")
        out["counts"] = counts
    return out


def lds_outputs(cfg: dict, log) -> tuple[np.ndarray, np.ndarray, float]:
    import jax
    import jax.numpy as jnp

    from unlearn import lds, train

    tr, te = _data(cfg)
    tcfg = train.TrainConfig(epochs=cfg["epochs"], batch_size=32, lr=3e-3, l2=L2)
    problem = train.Problem(_spec(cfg), tr, tcfg, jax.random.key(0))
    masks = lds.subset_masks(len(tr), cfg["subsets"], 0.5, jax.random.key(1))
    t0 = time.perf_counter()
    outs = lds.subset_outputs(problem, masks, jnp.asarray(te.x), jnp.asarray(te.y),
                              jax.random.key(2))
    dt = time.perf_counter() - t0
    log(f"LDS: {cfg['subsets']} subset models in {dt:.0f} s")
    return masks, outs, dt


def _spawn(row: str, cfg: dict, workdir: Path, timeout: float = 3600):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.transformer_peers", "--row", row,
                           "--workdir", str(workdir), "--cfg", json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parent.parent)
    return proc.returncode, proc.stderr[-1500:], time.perf_counter() - t0


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for mod in ("jax", "torch", "kronfluence"):
        try:
            out.append(f"{mod} {version(mod)}")
        except PackageNotFoundError:
            out.append(f"{mod} not installed")
    return ", ".join(out)


def run(cfg: dict, log=print) -> dict:
    from unlearn import lds

    workdir = Path(tempfile.mkdtemp(prefix="transformer_peers-"))
    info = {"cfg": cfg, "load_start": os.getloadavg(), "uptime_start": _uptime()}
    t_start = time.perf_counter()
    info.update(prepare(cfg, workdir, log))
    try:
        import kronfluence  # noqa: F401
        import torch  # noqa: F401
        rows = list(cfg.get("rows") or ROWS)
    except ImportError as e:
        info["missing"] = str(e)
        rows = [r for r in cfg.get("rows") or ROWS if r != "kronfluence-ekfac"]
    results = {}
    for row in rows:
        info[f"load_{row}"] = os.getloadavg()
        rc, err, wall = _spawn(row, cfg, workdir)
        jf = workdir / f"row_{row}.json"
        if rc != 0 or not jf.exists():
            results[row] = {"failed": (err.strip().splitlines() or [f"exit {rc}"])[-1][:200]}
            log(f"{row}: FAILED {results[row]['failed']}")
            continue
        results[row] = json.loads(jf.read_text()) | {"wall_s": wall}
        log(f"{row}: {results[row]['total_s']:.1f} s, peak {results[row]['peak_mb']:.0f} MB")
    masks, outs, lds_s = lds_outputs(cfg, log)
    info["lds_s"] = lds_s
    ref = np.load(workdir / "scores_reference.npy")
    for row in ["reference", *rows, "ekfac-dense"]:
        f = workdir / f"scores_{row}.npy"
        if not f.exists():
            continue
        sc = np.load(f)
        r = results.setdefault(row, {})
        r["pearson"] = float(np.corrcoef(sc.ravel(), ref.ravel())[0, 1])
        r["pearson_per_query_min"] = float(min(np.corrcoef(sc[q], ref[q])[0, 1]
                                               for q in range(len(sc))))
        s = lds.score(sc, masks, outs)
        r["lds"], r["lds_ci"] = s.mean, s.ci
        log(f"{row}: Pearson {r['pearson']:.4f}, LDS {s.mean:.3f} [{s.ci[0]:.3f}, {s.ci[1]:.3f}]")
    info["results"] = results
    info["load_end"] = os.getloadavg()
    info["seconds"] = time.perf_counter() - t_start
    return info


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def render(info: dict, command: str) -> str:
    cfg, res = info["cfg"], info["results"]
    lines = ["## Transformer influence: kronfluence vs ours (`python -m "
             "benchmarks.transformer_peers`)", "",
             f"Machine: {platform.platform()}, {platform.machine()}, 2 CPU cores shared with "
             f"other agents' jobs (timings are noisy: the load was {info['load_start'][0]:.1f} "
             f"at start — `{info['uptime_start']}` — and {info['load_end'][0]:.1f} at the end); "
             f"{_versions()}. Command: `{command}`; whole run {info['seconds'] / 60:.1f} min.", "",
             f"Model: `models.transformer(vocab=43, width={cfg['width']}, depth={DEPTH}, "
             f"heads={HEADS}, max_len={T}, tied=False)`, p = {info['p']}, trained on the first "
             f"{cfg['n']} `char_corpus` sequences (Adam, {cfg['epochs']} epochs, λ = {L2:g}, "
             f"final loss {info['final_loss']:.3f}); {cfg['queries']} test sequences; damping "
             f"λ_d = {DAMPING:g} (kronfluence `damping_factor` = λ + λ_d = {L2 + DAMPING:g}). "
             f"PyTorch twin logits agree to {info.get('twin_rel_err', float('nan')):.1e}. "
             f"Reference: plain CG to {REF_TOL:g} on the damped GGN in float64 "
             f"({info['reference_s']:.0f} s, residual {info['reference_residual']:.0e}). "
             f"LDS: {cfg['subsets']} subset models (α = 0.5) trained as one engine ensemble "
             f"({info['lds_s']:.0f} s).", "",
             "| row | prepare s | request s | total s | second call s | peak RSS MB (after "
             "imports) | Pearson vs ref (min per query) | LDS (95 % CI) |",
             "|---|---|---|---|---|---|---|---|"]
    names = {"reference": f"reference (exact damped GGN, CG {REF_TOL:g} f64)",
             "ekfac": "ours `ekfac` (f32, exact per-token roots)",
             "ekfac-sampled": "ours `ekfac` (f32, `samples=1`: one sampled label per token)",
             "ekfac-dense": "ours `ekfac`, Dense layers only",
             "pcg-ekfac": "ours `pcg-ekfac` (f32, tol 1e-5)",
             "kronfluence-ekfac": "kronfluence 1.0.1 EK-FAC (f32, sampled labels)"}
    for row in ("reference", "ekfac", "ekfac-sampled", "ekfac-dense", "pcg-ekfac",
                "kronfluence-ekfac"):
        r = res.get(row)
        if r is None:
            continue
        if "failed" in r:
            lines.append(f"| {names[row]} | failed: {r['failed']} | | | | | | |")
            continue
        t = (f"{r['prepare_s']:.1f} | {r['request_s']:.1f} | {r['total_s']:.1f} | "
             f"{r.get('warm_s', float('nan')):.1f} | {r['peak_mb']:.0f} ({r['rss0_mb']:.0f})"
             if "total_s" in r else " | | | | ")
        lines.append(f"| {names[row]} | {t} | {r['pearson']:.4f} "
                     f"({r['pearson_per_query_min']:.4f}) | {r['lds']:.3f} "
                     f"({r['lds_ci'][0]:.3f}, {r['lds_ci'][1]:.3f}) |")
    c = info["counts"]
    pcg = res.get("pcg-ekfac", {})
    lines += ["", f"CG iterations per test gradient: reference (plain CG, float64, to "
              f"{REF_TOL:g}) {info['reference_its']}; `pcg-ekfac` row (float32, to 1e-5) "
              f"{pcg.get('iterations', 'n/a')}."]
    if c:
        lines += ["", "Curvature products to relative residual 1e-8 (float64, per test "
                  "gradient; block rows: block iterations, each one product per right-hand "
                  "side): " + ", ".join(
                      f"`{k}` {v['mean_its']:.0f} mean / {v['max_its']} max (Pearson of s_test "
                      f"vs reference ≥ {v['min_pearson_s_test']:.6f})" for k, v in c.items())
                  + "."]
    lines += [
              "", "Our `ekfac` row's factors use the exact per-token output roots (T·V "
              "backward passes per sequence, no sampling); `ekfac-sampled` and kronfluence's "
              "use one sampled label per position (one backward pass per sequence and pass). "
              "kronfluence tracks only `nn.Linear` modules "
              f"({100 * res.get('ekfac', {}).get('dense_fraction', float('nan')):.0f} % of "
              "the parameters here); the embeddings and LayerNorms are missing from its "
              "scores."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--counts", action="store_true",
                    help="also count CG / EK-FAC-PCG products to 1e-8 in float64 (slow)")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help="timed rows, comma-separated, from ekfac, ekfac-sampled, pcg-ekfac, "
                         "kronfluence-ekfac (default %(default)s)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--row")
    ap.add_argument("--workdir")
    ap.add_argument("--cfg")
    args = ap.parse_args(argv)
    if args.row:
        child(args.row, json.loads(args.cfg), Path(args.workdir))
        return
    cfg = {"n": args.n, "width": args.width, "queries": args.queries, "subsets": args.subsets,
           "epochs": args.epochs, "vocab": 43, "counts": args.counts,
           "rows": [r for r in args.rows.split(",") if r]}
    unknown = set(cfg["rows"]) - {"ekfac", "ekfac-sampled", "pcg-ekfac", "kronfluence-ekfac"}
    if unknown:
        ap.error(f"--rows names unknown rows {sorted(unknown)}.")
    info = run(cfg)
    command = "python -m benchmarks.transformer_peers " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    body = render(info, command.strip())
    print(body)
    if not args.no_write:
        from benchmarks._common import write_section

        write_section("transformer_peers", body)


if __name__ == "__main__":
    main()
