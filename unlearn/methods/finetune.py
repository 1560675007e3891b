"""Fine-tuning on the retained data (the "FT" baseline of Warnecke et al. 2023 and
Jia et al. 2023, "Model sparsity can simplify machine unlearning", NeurIPS).

Catastrophic forgetting is the mechanism: a few epochs of training on D∖U from θ* let the
model drift away from U. Defaults follow Jia et al.'s FT: a short run (they use 10 epochs on
CIFAR-10, a fraction of the original budget) at the original optimiser; here ``epochs`` defaults
to a quarter of the training epochs (at least 1).
"""

from __future__ import annotations

import dataclasses

from unlearn.methods.base import ParamState, Unlearner, next_weights, params_result, prepare_params
from unlearn.train import fit


def finetune(epochs: int | None = None, lr: float | None = None) -> Unlearner:
    """Continue SGD on the retained data from the current params for ``epochs`` epochs."""

    def forget(state: ParamState, forget_ids, key):
        pos, w = next_weights(state, forget_ids)
        p = state.problem
        cfg = p.cfg
        if cfg.solver != "sgd":
            cfg = dataclasses.replace(cfg, solver="sgd")
        n_ep = epochs if epochs is not None else max(1, cfg.epochs // 4)
        cfg = dataclasses.replace(cfg, epochs=n_ep, lr=lr if lr is not None else cfg.lr)
        out = fit(p.model, p.train, cfg, key, weights=w, params=state.params)
        stats = {"epochs": n_ep, "examples_processed": int(w.sum()) * n_ep}
        return params_result(p, out.params, stats), state._replace(params=out.params, weights=w)

    return Unlearner("finetune", prepare_params, forget)
