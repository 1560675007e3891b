r"""RMU: representation misdirection for unlearning (Li et al. 2024, "The WMDP benchmark:
measuring and reducing malicious use with unlearning", §5).

As open-unlearning (OU @ d3d7cf9, ``rmu.py``; ``/work/shared/llm-unlearning.md`` §5): with
:math:`h_\theta` the residual stream after block ``layer``
(:func:`unlearn.models.hidden_states`, HuggingFace's ``model.layers[layer]`` output) and a
control vector :math:`c = s\,u/\lVert u\rVert`, :math:`u \sim U[0, 1)^d` drawn once per
request from its key (OU: ``torch.rand(1, 1, d)``, sampled once),

.. math::
   L = \gamma\,\mathrm{MSE}_m(h_\theta(U), c) + \alpha\,\mathrm{MSE}_m(h_\theta(R),
   h_{\mathrm{ref}}(R)),

each :math:`\mathrm{MSE}_m` the per-sequence mean over masked positions of the mean over
features of the squared difference, averaged over sequences
(:func:`unlearn.methods.lm_losses.masked_mse`); the retain term is OU's ``EMBED_DIFF`` to the
frozen model before the request (``retain="embed_diff"``; ``"nll"``/``"kl"`` also accepted).
Every parameter is trained (OU's TOFU config; WMDP trains three MLP projections only).

The mask: OU masks the positions that *hold* labelled tokens (HF labels are unshifted). Here
targets are shifted and the ``<eos>`` is a target only, never an input, so the mask is the
positions that *predict* a labelled token (``y ≥ 0``): the last prompt token through the last
answer token — as many positions as OU's, one to the left.

Adapted run hyperparameters: the steering coefficient s must exceed the activations' scale
(WMDP picks it per model: 6.5 for Zephyr-7B; OU's TOFU config 2, its class default 20). The
trained tiny transformer of ``tests/test_lm_methods.py`` (width 32) has a per-token residual
norm ≈ 5.8 after block 0, so the default here is OU's class default s = 20 (≈ 3.5× that
norm), at ``layer`` = ⌊7·depth/32⌋ (OU's layer 7 of Llama's 32: block 0 for the tiny
models), 10 epochs over the forget set at ``lr_scale`` = 0.1 × the training rate (see
:mod:`unlearn.methods.grad_ascent`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unlearn import models
from unlearn.methods.base import Unlearner
from unlearn.methods.lm_losses import (
    RETAIN_TERMS,
    check_nonnegative,
    check_positive,
    label_mask,
    lm_unlearner,
    masked_mse,
)
from unlearn.methods.loops import Setup

RETAINS = ("embed_diff", *RETAIN_TERMS)


def default_layer(depth: int) -> int:
    """⌊7·depth/32⌋: OU's ``model.layers.7`` of a 32-block Llama, scaled to ``depth``."""
    return (7 * depth) // 32


@functools.cache
def rmu_loss(model, layer: int, retain: str):
    """The engine loss of RMU for ``model``'s block ``layer`` (memoised per (model, layer,
    retain), so the compiled program is reused); reads ``aux["control"]``, ``aux["gamma"]``,
    ``aux["alpha"]`` and ``aux["teacher"]``."""

    def loss(apply, params, aux, progress, retain_b, forget_b):
        h = models.hidden_states(model, params, forget_b.x, layer)
        value = aux["gamma"] * masked_mse(h, aux["control"].astype(h.dtype),
                                          label_mask(forget_b.y, h.dtype), forget_b.w)
        if retain == "embed_diff":
            hr = models.hidden_states(model, params, retain_b.x, layer)
            ref = jax.lax.stop_gradient(
                models.hidden_states(model, aux["teacher"], retain_b.x, layer))
            r = masked_mse(hr, ref, label_mask(retain_b.y, hr.dtype), retain_b.w)
        else:
            r = RETAIN_TERMS[retain](apply, params, aux, retain_b)
        return value + aux["alpha"] * r

    loss.__name__ = f"rmu_block{layer}+{retain}"
    return loss


def control_vector(key: jax.Array, width: int, steering_coeff: float) -> jax.Array:
    """``s·u/‖u‖`` with ``u ~ U[0, 1)^width`` (OU's ``torch.rand`` direction)."""
    u = jax.random.uniform(key, (width,), jnp.float32)
    return steering_coeff * u / jnp.linalg.norm(u)


def rmu(steering_coeff: float = 20.0, layer: int | None = None, gamma: float = 1.0,
        alpha: float = 1.0, retain: str = "embed_diff", epochs: int | None = None,
        lr: float | None = None, lr_scale: float = 0.1,
        checkpoint_every: int | None = None) -> Unlearner:
    """RMU (module doc): steer block ``layer``'s forget activations to a random control
    vector of norm ``steering_coeff``, keep the retain activations (``embed_diff``)."""
    check_positive(steering_coeff=steering_coeff)
    check_nonnegative(gamma=gamma, alpha=alpha)
    if retain not in RETAINS:
        raise ValueError(f"retain={retain!r}: choose one of {RETAINS}.")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                              or layer < 0):
        raise ValueError(f"layer={layer!r} must be a block index >= 0 or None.")

    def block(model) -> tuple[int, dict]:
        spec = getattr(model, "spec", None)
        if spec is None or spec[0] != "transformer":
            raise ValueError(f"rmu needs a unlearn.models.transformer (it reads a block's "
                             f"hidden states); got model {model.name!r}.")
        kw = dict(spec[1])
        blk = default_layer(kw["depth"]) if layer is None else layer
        if blk >= kw["depth"]:
            raise ValueError(f"layer={blk} is out of range: the model has depth="
                             f"{kw['depth']} blocks (0..{kw['depth'] - 1}).")
        return blk, kw

    def setup(state, forget_rows: np.ndarray, key: jax.Array) -> Setup:
        model = state.problem.model
        blk, spec = block(model)
        c = control_vector(key, spec["width"], steering_coeff)
        return Setup(aux={"control": c}, loss=rmu_loss(model, blk, retain))

    return lm_unlearner("rmu", None, None,
                        {"steering_coeff": steering_coeff, "gamma": gamma, "alpha": alpha},
                        epochs=epochs, lr=lr, lr_scale=lr_scale,
                        checkpoint_every=checkpoint_every, setup=setup,
                        check=lambda problem: block(problem.model))
