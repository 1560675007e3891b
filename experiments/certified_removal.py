"""Certified removal (Guo et al. 2020, Fig. 1/2 style): gradient residual and its bounds vs the
number of removed points, and test accuracy vs ε.

Command: ``python -m experiments.certified_removal`` (about 1-2 min on 2 CPU cores; smoke ~20 s).

Softmax regression on digits with rows scaled to unit norm (as Guo et al. normalise inputs; with
the bias column R = √2), λ, float64, trained with loss perturbation bᵀθ (b ~ N(0, σ²I)) by
L-BFGS. Left: for m removed points (one batch Newton step, ``unlearn.certified``), the gradient
residual norm ‖∇L_b(θ⁻; D')‖, the data-dependent bound and the worst-case bound (log y). Right:
for each ε (δ fixed), σ = c·β/ε is the noise that certifies ``support`` removals without
retraining, where β is the accumulated data-dependent bound of removing them one at a time;
test accuracy (mean over noise draws) of the perturbed model vs ε, and the unperturbed accuracy,
for several λ: a larger λ shrinks the removal bound (fewer, smaller Newton corrections) and
so the noise a given ε needs, at the price of a more biased model — the trade-off Guo et al.
discuss for choosing λ.
Figure: ``paper_figures/certified_removal.png``.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from unlearn import certified, data, metrics, models, plotting, runner, train

NAME = "certified_removal"
CONFIGS = {
    "default": dict(l2=1e-3, sigma=1.0, removals=(1, 2, 5, 10, 20, 50, 100), support=20,
                    epsilons=(0.1, 0.3, 1.0, 3.0, 10.0), delta=1e-4, draws=3, seed=0,
                    l2_sweep=(1e-3, 1e-2, 1e-1)),
    "smoke": dict(l2=1e-3, sigma=1.0, removals=(1, 5, 20), support=5,
                  epsilons=(0.3, 3.0), delta=1e-4, draws=1, seed=0, l2_sweep=(1e-3, 1e-1)),
}


def _problem(l2, seed):
    split = data.load("digits", seed=seed)
    tr, te = split.train, split.test
    unit = lambda d: data.make(d.x / np.linalg.norm(d.x, axis=1, keepdims=True), d.y,  # noqa
                               num_classes=10, ids=d.ids, name="digits-unit")
    tr, te = unit(tr), unit(te)
    cfg = train.TrainConfig(solver="lbfgs", l2=l2, tol=1e-10, max_iter=10000, dtype="float64")
    return train.Problem(models.logreg(10), tr, cfg, jax.random.key(seed)), te


def _prepared(l2, *, sigma, delta, seed):
    """Problem, test set, θ* and the certified state (a budget that never retrains) at λ."""
    problem, te = _problem(l2, seed)
    trained = train.train(problem)
    u = certified.certified(epsilon=1e9, delta=delta, sigma=sigma)
    return problem, te, trained, u, u.prepare(problem, trained)


def _accuracy_vs_eps(prepared, *, support, epsilons, delta, draws, seed) -> dict:
    """β of ``support`` sequential single removals at this λ, then the test accuracy of models
    trained with the noise σ = c·β/ε that certifies them, for each ε."""
    problem, te, trained, u, st = prepared
    for i, id_ in enumerate(data.select_forget(problem.train, count=support, seed=seed)):
        _, st = u.forget(st, [id_], jax.random.key(i))
    beta = st.beta
    c = math.sqrt(2 * math.log(1.5 / delta))
    test_x = jnp.asarray(te.x)
    base_acc = metrics.accuracy(np.asarray(problem.model.apply(trained.params, test_x)), te.y)
    p = jax.flatten_util.ravel_pytree(trained.params)[0].size
    acc = []
    for eps in epsilons:
        sig = c * beta / eps
        accs = []
        for d in range(draws):
            b = sig * jax.random.normal(jax.random.key(1000 + d), (p,), jnp.float64)
            fit = certified.fit_perturbed(problem, b, params=trained.params)
            accs.append(metrics.accuracy(
                np.asarray(problem.model.apply(fit.params, test_x)), te.y))
        acc.append({"epsilon": eps, "sigma": sig, "acc_mean": float(np.mean(accs)),
                    "acc_std": float(np.std(accs))})
    return {"l2": problem.cfg.l2, "beta_support": beta, "accuracy": acc, "c": c,
            "unperturbed_acc": base_acc}


def run(*, l2, sigma, removals, support, epsilons, delta, draws, seed, l2_sweep) -> dict:
    """Residual and bounds vs m at ``l2``; accuracy vs ε for each λ of ``l2_sweep``."""
    with jax.enable_x64(True):
        main = _prepared(l2, sigma=sigma, delta=delta, seed=seed)
        problem, _, _, u, state = main
        curve = []
        for m in removals:
            ids = data.select_forget(problem.train, count=m, seed=seed + m)
            res, _ = u.forget(state, ids, jax.random.key(m))
            curve.append({"m": m, **{k: res.stats[k] for k in
                                     ("residual_norm", "data_bound", "worst_bound")}})
        sweep = [_accuracy_vs_eps(main if lam == l2 else
                                  _prepared(lam, sigma=sigma, delta=delta, seed=seed),
                                  support=support, epsilons=epsilons, delta=delta,
                                  draws=draws, seed=seed) for lam in l2_sweep]
        return {"curve": curve, "accuracy_by_l2": sweep}


def plot(payload: dict, outdir) -> list:
    """Left: residual and bounds vs m (log y). Right: test accuracy vs ε (log x)."""
    res, cfg = payload["results"], payload["config"]
    with plotting.style() as plt:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        m = [r["m"] for r in res["curve"]]
        for key, label, ls in (("worst_bound", "worst-case bound", ":"),
                               ("data_bound", "data-dependent bound", "--"),
                               ("residual_norm", "gradient residual", "-")):
            a1.plot(m, [r[key] for r in res["curve"]], ls, marker="o", ms=3, label=label)
        a1.set_xscale("log")
        a1.set_yscale("log")
        a1.set_xlabel("points removed (one batch Newton step)")
        a1.set_ylabel("‖∇L(θ⁻; D')‖")
        a1.legend()
        for i, sw in enumerate(res["accuracy_by_l2"]):
            eps = [r["epsilon"] for r in sw["accuracy"]]
            line = a2.errorbar(eps, [r["acc_mean"] for r in sw["accuracy"]],
                               yerr=[r["acc_std"] for r in sw["accuracy"]], marker="o", ms=3,
                               color=f"C{i}", label=f"λ={sw['l2']:g}")
            a2.axhline(sw["unperturbed_acc"], color=line[0].get_color(), ls="--", lw=0.8)
        a2.plot([], [], color="grey", ls="--", lw=0.8, label="no noise")
        a2.set_xscale("log")
        a2.set_xlabel(f"ε (δ={cfg['delta']:g}, {cfg['support']} removals supported)")
        a2.set_ylabel("test accuracy")
        a2.set_title("accuracy of the noisy model vs ε", fontsize=9)
        a2.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
        a1.set_title(f"residual and bounds at λ={cfg['l2']:g}", fontsize=9)
        fig.suptitle("Certified removal, digits softmax regression (unit-norm rows)")
        return plotting.savefig(fig, f"{outdir}/{NAME}.png")


if __name__ == "__main__":
    runner.main(sys.modules[__name__])
