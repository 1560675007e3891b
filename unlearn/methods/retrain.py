"""Exact unlearning by retraining from scratch: the oracle every metric compares to."""

from __future__ import annotations

from unlearn.methods.base import ParamState, Unlearner, next_weights, params_result, prepare_params
from unlearn.train import fit


def retrain() -> Unlearner:
    """Retrain on D∖U with the same init key and data-order rule (``train.retrain``)."""

    def forget(state: ParamState, forget_ids, key):
        del key  # the oracle is a function of the problem's key only
        pos, w = next_weights(state, forget_ids)
        p = state.problem
        out = fit(p.model, p.train, p.cfg, p.key, weights=w)
        stats = {"points_retrained": int(w.sum()), **out.info}
        return params_result(p, out.params, stats), state._replace(params=out.params, weights=w)

    return Unlearner("retrain", prepare_params, forget)
