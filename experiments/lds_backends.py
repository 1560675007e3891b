"""The linear datamodeling score of every influence backend, beside its leave-one-out
correlation, time and peak memory: an MLP and a CNN on mnist5k and a transformer on a
character corpus (issue #29; LDS: Park et al. 2023, TRAK, §2 — :mod:`unlearn.lds`).

Command: ``python -m experiments.lds_backends`` (``--config smoke``: MLP only, tiny).
Wall time of the default run: TIMING_NOTE below (measured once, with the machine's load
average noted, since other jobs shared its 2 cores).

For each model, all in float64 (``jax.enable_x64``), seeded:

* **θ*** — ``train.train(problem)``: Adam through the engine (``epochs``, ``batch_size``,
  ``lr``, L2 ``l2``); the MLP 784-32-10 (ReLU) and the tanh CNN (conv 3×3 ×(4, 8) + 2×2
  max-pool, dense 16) on the first ``n_train`` training images of mnist5k (real MNIST) and its
  first ``n_test`` test images; the decoder-only transformer (width 16, depth 2, 2 heads,
  7 536 parameters) on ``n_train`` = 128 sequences of ``data.char_corpus`` (16 tokens),
  tested on the next ``n_test``.
* **LDS** — for each of ``subset_seeds``: ``m`` random α-subsets (``lds.subset_masks``) and
  their models, trained as ONE engine ensemble with θ*'s recipe (``lds.subset_outputs``),
  measured (the task's loss: cross-entropy, or the per-sequence mean next-token loss) on the
  test examples. Each backend's influence scores (``influence.influence_up_loss``, Gauss–Newton
  curvature, damping ``damping`` — 1e-3; the transformer's own ``damping`` 0.1, a few times
  the mean eigenvalue of its GGN (0.024 — the trace of its EK-FAC over p — on a 10-epoch
  model), since at 1e-2 block CG needed 256 batched products there (109 s on 2 cores) and at
  0.1 100 (42 s); the transformer's K-FAC/EK-FAC factors use ``samples`` = 1 sampled label
  per token, as kronfluence — exact roots cost T·V = 720 backward passes per sequence) are
  computed once — the
  Krylov backends to relative residual ``cg_tol`` within ``cg_maxiter`` iterations, the
  table's "solve" column says whether they got there — and scored against every seed's subsets
  (``lds.score``: Spearman per test example). Reported: the LDS averaged over seeds; a 95 %
  Student-t interval over the test examples of their per-example ρ (averaged over the seeds;
  conditional on the subsets drawn); the per-seed LDS and their spread (max − min). ``random``
  (i.i.d. normal scores) and ``identity`` (``H ≈ I``: the plain gradient inner product ∇f·∇ℓ,
  no curvature) are baselines.
* **LOO r** — on the test example of highest loss under θ*, the ``loo_k`` training points of
  largest |score| under the reference backend (``reference``: CG, the exact damped answer) are
  each left out and the model retrained with the same key, hence the same initialisation and
  data-order rule, as one stacked ensemble with a control member on all the data
  (``lds.loo_outputs``); actual = f(LOO) − f(control). Each backend's prediction is
  −score/n (Koh & Liang 2017); the row reports Pearson r over the K points. **Caveat**: with
  minibatch SGD on a non-convex model, removing one example also shifts every later batch by
  one example, so the actual change is dominated by training noise of the same size as the
  effect; these r are small and noisy (the convex-model figure ``influence_loo`` is where LOO
  correlation is a sharp test). The LDS averages such noise over many subset models.
* **Seconds and peak memory** — each backend runs in its own fresh Python process
  (``isolate=True``): ``seconds`` is the wall time of ``influence_up_loss`` there (cold:
  XLA compilation, preparation — factors, eigenpairs, Nyström sketch — the batched solve
  and the streamed scores); ``peak_mb`` is that process's peak resident set
  (``VmHWM`` of ``/proc/self/status``: all of it, Python, JAX runtime, data and compiler
  included), and ``delta_mb`` = ``peak_mb`` − the resident set just before the call (from
  ``/proc/self/statm``): what the backend added at its peak, XLA buffers and compilation
  included. XLA's CPU client reports no allocator statistics, and ``tracemalloc`` sees only
  Python's allocator, so the operating system's count is the one that measures XLA's buffers;
  it is process-wide, hence one process per backend. ``identity``'s ``delta_mb`` is the floor
  every backend shares (test gradients, streamed scores, compilation); the table's "added over
  identity" column is a backend's ``delta_mb`` minus that floor — what its own preparation
  and solve held at the peak beyond the floor (a negative value means it stayed within the
  floor, to the noise of a few MiB). The process-start cost (~2–5 s of JAX import) is outside
  ``seconds``, inside the wall time of the run. ``table(payload)`` prints the markdown table.

Backends that cannot run are rows with a reason, not omissions (a backend still running after
``backend_timeout`` seconds is stopped and its row says "timeout"): K-FAC/EK-FAC (``kfac``,
``ekfac``, ``pcg-ekfac``) cover dense layers (and a transformer's embeddings and LayerNorms as
diagonal blocks) and refuse convolutions, so on the CNN they are "refused"; ``exact`` forms
the dense p × p curvature, so above ``exact_max_params`` parameters it is "skipped" (CG gives
the same damped answer matrix-free).

Figure ``paper_figures/lds_backends.png``: LDS ± CI per backend per model, seconds per
backend (log axis), and peak memory added per backend.
"""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import plotting, runner
from unlearn import data, engine, inverse, kfac, lds, models, train
from unlearn import influence as inf
from unlearn.train import cast

NAME = "lds_backends"
ROOT = Path(__file__).resolve().parent.parent
TIMING_NOTE = ("535 s wall (8.9 min) at 09:51-10:00 UTC, load average 1.8-2.4 (this run "
               "alone on the 2 cores); 872 CPU-s (process + children). MLP 1.5 min, CNN 3 "
               "min, transformer 4.4 min (its Krylov backends: CG 51 s, Nyström-PCG 28 s, "
               "EK-FAC-PCG 84 s)")
BACKENDS = ("exact", "cg", "pcg", "pcg-ekfac", "ekfac", "kfac", "arnoldi", "lissa")
KFAC_BACKENDS = ("pcg-ekfac", "ekfac", "kfac")
MODELS = ("mlp", "cnn", "transformer")

_MLP = dict(n_train=1000, n_test=20, hidden=(32,), epochs=20, batch_size=64, lr=3e-3, l2=1e-3)
_CNN = dict(n_train=500, n_test=20, features=(4, 8), dense=16, epochs=20, batch_size=64,
            lr=3e-3, l2=1e-3)
_TRANSFORMER = dict(n_train=128, n_test=20, seq_len=16, width=16, depth=2, heads=2, epochs=20,
                    batch_size=32, lr=3e-3, l2=1e-4, damping=0.1, samples=1)
_DEFAULT = dict(models={"mlp": _MLP, "cnn": _CNN, "transformer": _TRANSFORMER}, m=50,
                alpha=0.5, subset_seeds=(0, 1), damping=1e-3, backends=BACKENDS,
                reference="cg", exact_max_params=5000, rank=50, lissa_depth=50, cg_tol=1e-6,
                cg_maxiter=1000, backend_timeout=180, loo_k=25, isolate=True, seed=0)
CONFIGS = {
    "default": _DEFAULT,
    "smoke": {**_DEFAULT, "models": {"mlp": {**_MLP, "n_train": 200, "n_test": 10,
                                             "hidden": (8,), "epochs": 15, "batch_size": 32}},
              "m": 10, "subset_seeds": (0,), "backends": ("cg", "kfac"), "loo_k": 5,
              "rank": 10, "lissa_depth": 10, "isolate": True},
}
HEADLINES = {
    "n_train": ("results.models.*.n_train", "exact"),
    "num_params": ("results.models.*.num_params", "exact"),
    "status": ("results.models.*.rows.*.status", "exact"),
    "lds": ("results.models.*.rows.*.lds", "correlation"),
    "lds_per_seed": ("results.models.*.rows.*.lds_per_seed", "correlation"),
    "loo_pearson": ("results.models.*.rows.*.loo_pearson", "correlation"),
}


# ----------------------------------------------------------------------------- problems


def _problem(kind: str, spec: dict, seed: int) -> tuple[train.Problem, data.Dataset]:
    """The training problem (float64, Adam through the engine) and the test set of a model."""
    cfg = train.TrainConfig(epochs=spec["epochs"], batch_size=spec["batch_size"],
                            lr=spec["lr"], l2=spec["l2"], dtype="float64")
    if kind in ("mlp", "cnn"):
        split = data.load("mnist5k", seed=seed)
        tr = split.train.subset(np.arange(spec["n_train"]))
        te = split.test.subset(np.arange(spec["n_test"]))
        model = (models.mlp(10, tuple(spec["hidden"])) if kind == "mlp" else
                 models.cnn(10, features=tuple(spec["features"]), dense=spec["dense"],
                            activation="tanh"))
    elif kind == "transformer":
        corpus = data.char_corpus(n=spec["n_train"] + spec["n_test"], seq_len=spec["seq_len"],
                                  seed=seed)
        tr = corpus.subset(np.arange(spec["n_train"]))
        te = corpus.subset(np.arange(spec["n_train"], len(corpus)))
        model = models.transformer(corpus.num_classes, width=spec["width"],
                                   depth=spec["depth"], heads=spec["heads"],
                                   max_len=spec["seq_len"])
    else:
        raise ValueError(f"model {kind!r} is unknown; choose from {MODELS}.")
    return train.Problem(model, tr, cfg, jax.random.key(seed)), te


# ----------------------------------------------------------------------------- backends


class _Identity(inverse.Backend):
    """No curvature: :math:`(H+\\lambda I)^{-1}\\approx I`, so the score is the plain gradient
    inner product :math:`-\\nabla f(z_t)^\\top\\nabla\\ell(z_i)` (an LDS baseline, and the
    memory floor shared by every backend)."""

    name = "identity"
    exact = False

    def _solve(self, inv, rhs):
        return rhs, jnp.zeros(rhs.shape[0], jnp.int32), "identity"


def _solver(name: str, options: dict) -> inverse.Backend:
    if name == "identity":
        return _Identity()
    return inverse.backend(name, **options)


def backend_scores(problem: train.Problem, params, x_test, y_test, name: str, *,
                   damping: float, options: dict) -> dict:
    """Influence scores ``(n_test, n_train)`` of one backend on the Gauss–Newton curvature at
    ``params`` (:func:`unlearn.lds.influence_curvature`), timed (``seconds``: the whole
    ``influence_up_loss`` call, compilation included), with the solve's convergence, worst
    relative residual and iterations."""
    curv = lds.influence_curvature(problem, train.Fit(params, {}), "ggn")
    solver = _solver(name, {**options, "key": jax.random.key(options.get("key", 0))})
    xt = cast(jnp.asarray(x_test), problem.cfg.dtype)
    yt = jnp.asarray(y_test)
    t0 = time.perf_counter()
    out = inf.influence_up_loss(curv, xt, yt, solver, damping=damping)
    scores = np.asarray(jax.block_until_ready(out.scores), np.float64)
    seconds = time.perf_counter() - t0
    sol = out.solution
    return {"scores": scores, "seconds": seconds,
            "converged": bool(np.all(np.asarray(sol.converged))),
            "residual": float(np.max(np.asarray(sol.residual))),
            "iterations": int(np.max(np.asarray(sol.iterations)))}


def _rss_mb() -> float:
    """The resident set of this process now (Linux ``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's peak resident set so far, MiB: ``VmHWM`` of ``/proc/self/status``
    (reset by ``exec``; ``getrusage``'s ``ru_maxrss`` is not — a child started by a large
    parent would report the parent's peak), else ``ru_maxrss`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _allocate(megabytes: float) -> float:
    """Touch a fresh float64 array of ``megabytes`` MiB (a calibration target for
    :func:`isolated`: its ``delta_mb`` must be at least that)."""
    a = np.ones(int(megabytes * 2**20 / 8))
    return float(a.sum())


def _job(target: str, kwargs: dict, x64: bool) -> dict:
    """Run ``target`` (``"module:function"``) on ``kwargs`` and measure it (the worker)."""
    jax.config.update("jax_enable_x64", x64)
    module, fn = target.split(":")
    fn = getattr(__import__(module, fromlist=[fn]), fn)
    if "problem" in kwargs:  # the model is sent as its spec (its functions do not pickle)
        p = kwargs["problem"]
        kwargs = {**kwargs, "problem": p._replace(model=models.from_spec(p.model),
                                                  key=jax.random.key(p.key))}
    rss = _rss_mb()
    result = fn(**kwargs)
    peak = _peak_mb()
    return {"result": result, "rss_before_mb": rss, "peak_mb": peak, "delta_mb": peak - rss}


def _worker(inp: str, outp: str) -> None:
    with open(inp, "rb") as f:
        job = pickle.load(f)
    out = _job(**job)
    with open(outp, "wb") as f:
        pickle.dump(out, f)


def isolated(target: str, kwargs: dict, *, x64: bool = True, timeout: float = 600) -> dict:
    """Run ``target(**kwargs)`` (``"module:function"``, importable from the repository root)
    in a fresh Python process and return ``{"result", "rss_before_mb", "peak_mb",
    "delta_mb"}``: the peak resident set of that process (``ru_maxrss``) and its rise over
    the resident set just before the call. A ``problem`` argument (``train.Problem``) travels
    with its model as the model's ``spec`` and its key as an int seed."""
    if "problem" in kwargs:
        p = kwargs["problem"]
        if p.model.spec is None:
            raise ValueError("isolated: problem.model must be a package model with a spec.")
        kwargs = {**kwargs, "problem": p._replace(model=p.model.spec,
                                                  key=engine.key_seed(p.key))}
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "job.pkl", Path(tmp) / "out.pkl"
        with open(inp, "wb") as f:
            pickle.dump({"target": target, "kwargs": kwargs, "x64": x64}, f)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        code = "import sys; from experiments.lds_backends import _worker; _worker(*sys.argv[1:])"
        proc = subprocess.run([sys.executable, "-c", code, str(inp), str(outp)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"isolated {target} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-2000:]}")
        with open(outp, "rb") as f:
            return pickle.load(f)


def _refusal(name: str, problem: train.Problem, params, exact_max_params: int) -> str | None:
    """Why ``name`` cannot run on this model (checked in this process, cheaply), or None."""
    if name in KFAC_BACKENDS:
        p, state = engine.split_variables(params)
        try:
            kfac.layer_names(models.frozen_apply(problem.model, state), p,
                             jnp.asarray(problem.train.x[:1]))
        except ValueError as e:
            return f"refused: {e}"
    if name == "exact":
        n = models.num_params({"params": params["params"]})
        if n > exact_max_params:
            return (f"skipped: dense {n}×{n} curvature ({8 * n * n / 2**30:.1f} GiB float64) "
                    f"above exact_max_params={exact_max_params}; CG gives the same damped "
                    "answer")
    return None


# ----------------------------------------------------------------------------- one model


def _pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _one_model(kind, spec, *, m, alpha, subset_seeds, damping, backends, reference,
               exact_max_params, rank, lissa_depth, cg_tol, cg_maxiter, backend_timeout, loo_k,
               isolate, seed, progress) -> dict:
    problem, te = _problem(kind, spec, seed)
    damping = float(spec.get("damping", damping))  # a model's own damping wins
    n = len(problem.train)
    progress(f"{kind}: θ* (Adam, float64)")
    t0 = time.perf_counter()
    star = train.train(problem)
    train_s = time.perf_counter() - t0
    params = jax.tree.map(np.asarray, star.params)
    x_test, y_test = np.asarray(te.x), np.asarray(te.y)
    base = lds.stacked_measure(problem.model, jax.tree.map(lambda a: a[None], star.params),
                               x_test, y_test, "float64")[0]

    subsets, t0 = [], time.perf_counter()
    for s in subset_seeds:
        progress(f"{kind}: {m} subset models, seed {s} (one ensemble)")
        key = jax.random.key(s)
        masks = lds.subset_masks(n, m, alpha, jax.random.fold_in(key, 0))
        outputs = lds.subset_outputs(problem, masks, x_test, y_test, jax.random.fold_in(key, 1))
        subsets.append((masks, outputs))
    subsets_s = time.perf_counter() - t0

    options = {"rank": rank, "depth": lissa_depth, "tol": cg_tol, "maxiter": cg_maxiter,
               "key": seed + 2, "samples": spec.get("samples")}
    names = [reference, *[b for b in backends if b != reference], "identity"]
    raw: dict[str, dict] = {}
    for name in names:
        why = _refusal(name, problem, params, exact_max_params)
        if why:
            raw[name] = {"status": why.split(":")[0], "reason": why}
            continue
        progress(f"{kind}: influence ({name}{', own process' if isolate else ''})")
        kwargs = dict(problem=problem, params=params, x_test=x_test, y_test=y_test, name=name,
                      damping=damping, options=options)
        try:
            if isolate:
                got = isolated("experiments.lds_backends:backend_scores", kwargs,
                               timeout=backend_timeout)
                raw[name] = {**got.pop("result"), **got, "status": "ok"}
            else:
                raw[name] = {**backend_scores(**kwargs), "status": "ok"}
        except subprocess.TimeoutExpired:
            raw[name] = {"status": "timeout", "reason": f"timeout: stopped after "
                                                        f"backend_timeout={backend_timeout} s"}
        except Exception as e:  # noqa: BLE001 — a failing backend is a row, not a crash
            raw[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:2000]}
    rng = np.random.default_rng(seed)
    raw["random"] = {"status": "ok", "scores": rng.normal(size=(len(te), n)), "seconds": 0.0}

    # the leave-one-out points: the largest |score| of the reference (else of the first
    # backend that ran) on the test example of highest loss
    t_star = int(np.argmax(base))
    chooser = next(b for b in [reference, *raw] if raw[b]["status"] == "ok")
    progress(f"{kind}: {loo_k} leave-one-out retrains + control (one ensemble; by {chooser})")
    top = np.argsort(-np.abs(raw[chooser]["scores"][t_star]))[:loo_k]
    t0 = time.perf_counter()
    actual, full = lds.loo_outputs(problem, top, x_test[t_star:t_star + 1],
                                   y_test[t_star:t_star + 1])
    loo_s = time.perf_counter() - t0
    actual = actual[:, 0]

    rows = {}
    for name, r in raw.items():
        if r["status"] != "ok":
            rows[name] = {k: v for k, v in r.items() if k != "scores"}
            continue
        per_seed = [lds.score(r["scores"], mk, out) for mk, out in subsets]
        rho = np.nanmean(np.stack([p.per_example for p in per_seed]), axis=0)
        lo, hi = lds.t_interval(rho)
        seeds_lds = [p.mean for p in per_seed]
        pred = -r["scores"][t_star, top] / n
        rows[name] = {
            "status": "ok", "lds": float(np.mean(seeds_lds)), "ci_low": lo, "ci_high": hi,
            "lds_per_seed": seeds_lds, "seed_spread": float(np.ptp(seeds_lds)),
            "n_defined": [p.n_defined for p in per_seed],
            "loo_pearson": _pearson(pred, actual), "loo_predicted": pred.tolist(),
            **{k: r[k] for k in ("seconds", "converged", "residual", "iterations",
                                 "peak_mb", "delta_mb", "rss_before_mb") if k in r}}
    return {"n_train": n, "n_test": len(te), "m": m, "alpha": alpha,
            "subset_seeds": list(subset_seeds), "subset_size": lds.subset_size(n, alpha),
            "num_params": models.num_params({"params": params["params"]}),
            "measure": problem.model.measure.name, "damping": damping,
            "kfac_samples": spec.get("samples"),
            "train_loss_test_mean": float(base.mean()),
            "loo": {"test_index": t_star, "chosen_by": chooser, "train_ids": [str(i) for i in
                                                        problem.train.ids[top]],
                    "actual": actual.tolist(),
                    "control_minus_theta_star": float(full[0] - base[t_star])},
            "seconds": {"theta_star": train_s, "subset_models": subsets_s, "loo": loo_s},
            "rows": rows}


def run(*, models, m, alpha, subset_seeds, damping, backends, reference, exact_max_params,
        rank, lissa_depth, cg_tol, cg_maxiter, backend_timeout, loo_k, isolate, seed,
        progress=None) -> dict:
    """Per model: θ*, the subset models of every seed, each backend's scores, LDS, LOO r,
    seconds and memory (module docstring)."""
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"backends {unknown} unknown; choose from {BACKENDS}.")
    if reference not in BACKENDS or reference in KFAC_BACKENDS:
        raise ValueError(f"reference={reference!r}: pass an exact backend that runs on every "
                         "model, e.g. 'cg'.")
    progress = progress or runner.no_progress
    out = {}
    with jax.enable_x64(True):
        for kind, spec in models.items():
            out[kind] = _one_model(kind, spec, m=m, alpha=alpha, subset_seeds=subset_seeds,
                                   damping=damping, backends=backends, reference=reference,
                                   exact_max_params=exact_max_params, rank=rank,
                                   lissa_depth=lissa_depth, cg_tol=cg_tol,
                                   cg_maxiter=cg_maxiter, backend_timeout=backend_timeout,
                                   loo_k=loo_k,
                                   isolate=isolate, seed=seed, progress=progress)
    cpu = sum(getattr(resource.getrusage(who), f) for who in
              (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    return {"models": out, "load_average": list(os.getloadavg()), "cpu_seconds": cpu}


# ----------------------------------------------------------------------------- figure


def _order(res: dict) -> list[str]:
    names = []
    for mres in res["models"].values():
        names += [b for b in mres["rows"] if b not in names]
    head = [b for b in BACKENDS if b in names]
    return head + [b for b in ("identity", "random") if b in names]


def plot(payload: dict, outdir) -> list:
    """LDS ± CI, seconds (log) and peak memory added, per backend (x) and model (bars)."""
    res = payload["results"]
    names = _order(res)
    kinds = list(res["models"])
    width = 0.8 / len(kinds)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    with plotting.style() as plt:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        for j, kind in enumerate(kinds):
            rows = res["models"][kind]["rows"]
            xs = np.arange(len(names)) + (j - (len(kinds) - 1) / 2) * width
            for x, b in zip(xs, names, strict=True):
                r = rows.get(b)
                if r is None:
                    continue
                if r["status"] != "ok":
                    for ax in axes:
                        ax.text(x, 0.0, r["status"], rotation=90, ha="center", va="bottom",
                                fontsize=6, color=colours[j % 3],
                                transform=ax.get_xaxis_transform())
                    continue
                label = kind if b == next(n for n in names if rows.get(n, {}).get(
                    "status") == "ok") else None
                axes[0].bar(x, r["lds"], width, color=colours[j % 3], label=label,
                            yerr=[[r["lds"] - r["ci_low"]], [r["ci_high"] - r["lds"]]],
                            capsize=2, error_kw={"lw": 0.8})
                if b != "random":
                    axes[1].bar(x, r["seconds"], width, color=colours[j % 3])
                if "delta_mb" in r:
                    axes[2].bar(x, r["delta_mb"], width, color=colours[j % 3])
        axes[0].axhline(0, color="grey", lw=0.6)
        axes[0].set_ylabel("LDS (Spearman, mean over test examples)")
        axes[0].legend(loc="upper right")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("seconds (cold, own process)")
        axes[2].set_ylabel("peak RSS added by the call (MiB)")
        for ax in axes:
            ax.set_xticks(np.arange(len(names)))
            ax.set_xticklabels(names, rotation=45, ha="right")
        first = next(iter(res["models"].values()))
        damp = ", ".join(f"{k} {v['damping']:g}" for k, v in res["models"].items())
        fig.suptitle(f"LDS per influence backend (M={first['m']} subset models × "
                     f"{len(first['subset_seeds'])} seeds, α={first['alpha']}, GGN, damping: "
                     f"{damp}); 95 % CI over test examples", y=1.02)
        return plotting.savefig(fig, f"{outdir}/{NAME}.png")


def table(payload: dict) -> str:
    """The LDS table as markdown, one row per (model, backend): LDS [95 % CI], the per-seed
    LDS, LOO r, seconds, peak resident set and what the call added over ``identity``'s."""
    res = payload["results"]
    lines = ["| model | backend | LDS [95 % CI] | LDS per subset seed | LOO r | seconds | "
             "peak RSS (MiB) | added over identity (MiB) | solve |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, mres in res["models"].items():
        rows = mres["rows"]
        floor = rows.get("identity", {}).get("delta_mb")
        for b in _order(res):
            r = rows.get(b)
            if r is None:
                continue
            if r["status"] != "ok":
                lines.append(f"| {kind} | {b} | {r['status']}: {r['reason'].split(': ', 1)[1]}"
                             " | | | | | | |")
                continue
            seeds = ", ".join(f"{v:.3f}" for v in r["lds_per_seed"])
            secs = "—" if b == "random" else f"{r['seconds']:.1f}"
            peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "—"
            added = (f"{r['delta_mb'] - floor:+.0f}" if "delta_mb" in r and floor is not None
                     else "—")
            solve = ("—" if "residual" not in r else
                     f"res {r['residual']:.1e}, {r['iterations']} it"
                     + ("" if r["converged"] else ", NOT converged"))
            lines.append(f"| {kind} | {b} | {r['lds']:.3f} [{r['ci_low']:.3f}, "
                         f"{r['ci_high']:.3f}] | {seeds} | {r['loo_pearson']:.2f} | {secs} | "
                         f"{peak} | {added} | {solve} |")
    return "\n".join(lines)


if __name__ == "__main__":
    runner.main(sys.modules[__name__])
