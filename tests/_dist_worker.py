"""One worker of the multi-process tests (``tests/test_distributed.py``), and the problem they
share.

``python tests/_dist_worker.py PROCESS_ID NUM_PROCESSES PORT OUTDIR`` joins a
``jax.distributed`` program on ``127.0.0.1:PORT`` (:func:`unlearn.runtime.initialize`, gloo
CPU collectives), runs :func:`compute` on the global mesh over every process's devices and
writes its results to ``OUTDIR/result_<PROCESS_ID>.npz``. The test runs :func:`compute`
without a mesh in its own process and compares.

What :func:`compute` runs (float64): an ensemble of 4 MLPs through the engine (a learning-rate
grid on the member axis), SISA training and ``forget`` (4 shards, 2 slices), and at a trained
member's parameters an HVP, a GGN product, K-FAC/EK-FAC factors and influence scores, whose
example axis is sharded over the mesh (:func:`unlearn.distributed.shard_examples`; 50 rows,
so 2 and 4 processes need padding rows).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before JAX makes its backends
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from unlearn import runtime

    runtime.compile_cache()
    runtime.initialize(int(sys.argv[2]), int(sys.argv[1]), f"127.0.0.1:{sys.argv[3]}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from unlearn import curvature, data, engine, influence, kfac, models, sisa, train  # noqa: E402
from unlearn import distributed as dist  # noqa: E402

N_CURV = 50  # rows of the curvature sums: not a multiple of 2 or 4 processes' devices


def _flat(prefix: str, tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(dist.gather(tree))[0]
    return {f"{prefix}{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in leaves}


def compute(mesh=None) -> dict[str, np.ndarray]:
    """Every compared result, as NumPy arrays keyed by name; ``mesh`` None: one process, no
    mesh (the reference); else the member and example axes on ``mesh``."""
    jax.config.update("jax_enable_x64", True)
    split = data.load("digits")
    tr = split.train.subset(np.arange(96))
    m = models.mlp(10, (8,))
    out: dict[str, np.ndarray] = {}

    # an ensemble: 4 members, a learning-rate grid, through the engine's one trainer
    keys = jax.random.split(jax.random.key(3), 4)
    ens = engine.train_members(m, tr.x, tr.y, data.stable_hash(tr.ids), keys, epochs=2,
                               batch_size=16, optimizer="adam",
                               lr=np.array([1e-3, 2e-3, 4e-3, 8e-3]), l2=1e-3, dtype="float64",
                               mesh=mesh)
    out.update(_flat("ensemble", ens.members.params))
    out["ensemble_loss"] = np.asarray(ens.info["final_loss"])

    # SISA: training and forget; the shard axis on the mesh
    cfg = train.TrainConfig(epochs=2, batch_size=16, lr=3e-3, dtype="float64")
    st = sisa.train(m, tr, cfg, sisa.Plan(4, 2), jax.random.key(0), mesh=mesh)
    out.update(_flat("sisa", st.params))
    after, _ = sisa.forget(st, tr.ids[[1, 40, 77]])  # a shard retrains from its checkpoint
    out.update(_flat("sisa_forget", after.params))

    # curvature sums over the example axis at a trained member's parameters
    params = jax.tree.map(np.asarray, engine.unstack(dist.gather(ens.members.params), 0))
    x, y = np.asarray(split.test.x[:N_CURV], np.float64), np.asarray(split.test.y[:N_CURV])
    p = sum(a.size for a in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    v, s = rng.normal(size=p), rng.normal(size=(2, p))
    if mesh is None:
        ex_x, ex_y, w = jnp.asarray(x), jnp.asarray(y), jnp.ones(N_CURV)
        put = jnp.asarray
    else:
        ex = dist.shard_examples((x, y), mesh)
        (ex_x, ex_y), w = ex.data, ex.w
        params = dist.replicate(params, mesh)
        put = lambda a: dist.replicate(a, mesh)  # noqa: E731
    dist.barrier()  # (each process arrives here after its own compiles; see call_together)
    out["hvp"] = dist.gather(curvature.hvp(m.apply, params, ex_x, ex_y, w, 1e-3)(put(v)))
    out["ggn"] = dist.gather(curvature.ggn_vp(m.apply, params, ex_x, ex_y, w, 1e-3)(put(v)))
    dist.barrier()
    f = kfac.kfac_factors(m.apply, params, ex_x, w, chunk_size=25, y=ex_y)
    # eigenvectors are fixed only up to sign (and rotation within a repeated eigenvalue:
    # constant pixels give A factors a null space), so compare what does not depend on the
    # basis: the eigenvalue products, the diagonal blocks and both inverse products
    out.update(_flat("kfac_lam_kfac", f.lam_kfac))
    out.update(_flat("kfac_diag", f.diag))
    out.update(_flat("kfac_lam_ekfac", f.lam_ekfac))
    for kind in ("kfac", "ekfac"):
        inv = kfac.kfac_inverse(f, params, 1e-2, kind)
        out[f"{kind}_inverse_v"] = dist.gather(inv(put(v)))
    dist.barrier()
    sc = influence.influence_scores(m.apply, params, ex_x, ex_y, put(s), chunk_size=25)
    out["scores"] = np.asarray(sc) if mesh is None else dist.unpad(sc, ex, axis=1)
    out["devices"] = np.array(0 if mesh is None else np.asarray(mesh.devices).size)
    out["processes"] = np.array(jax.process_count())
    return out


if __name__ == "__main__":
    res = compute(dist.global_mesh())
    np.savez(os.path.join(sys.argv[4], f"result_{sys.argv[1]}.npz"), **res)
