"""Unlearning methods and their registry.

Adding a method is one file in this package plus one line in ``REGISTRY``: a constructor that
takes the method's hyperparameters as keyword arguments and returns an :class:`Unlearner`.
``convex_only`` marks methods whose maths needs a strictly convex objective (e.g. Newton
removal); the shared tests run those on softmax regression. ``tokens_only`` marks the
language-model methods (token data, a sequence model such as ``models.transformer``); they
refuse other tasks at ``prepare`` and the shared tests run them on a tiny transformer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from unlearn.methods.base import ParamState, Result, Unlearner
from unlearn.methods.certified import certified
from unlearn.methods.finetune import finetune
from unlearn.methods.fisher import fisher
from unlearn.methods.grad_ascent import grad_ascent, grad_diff
from unlearn.methods.idk import idk_dpo, idk_nll
from unlearn.methods.influence import influence_unlearning
from unlearn.methods.l1_sparse import l1_sparse
from unlearn.methods.neggrad import neggrad, neggrad_plus
from unlearn.methods.newton import newton
from unlearn.methods.npo import npo, simnpo
from unlearn.methods.random_labels import random_labels
from unlearn.methods.retrain import retrain
from unlearn.methods.rmu import rmu
from unlearn.methods.salun import salun
from unlearn.methods.scrub import scrub
from unlearn.methods.sisa import sisa
from unlearn.methods.undial import undial


class Entry(NamedTuple):
    """A registered method: its constructor and what it needs of the model."""

    make: Callable[..., Unlearner]
    convex_only: bool = False
    description: str = ""
    tokens_only: bool = False


REGISTRY: dict[str, Entry] = {
    "retrain": Entry(retrain, description="retrain from scratch on D∖U (exact oracle)"),
    "finetune": Entry(finetune, description="fine-tune on D∖U (Jia et al. 2023 FT)"),
    "sisa": Entry(sisa, description="SISA shards × slices, exact (Bourtoule et al. 2021)"),
    "neggrad": Entry(neggrad, description="gradient ascent on U (Jia et al. 2023 GA)"),
    "neggrad_plus": Entry(neggrad_plus, description="NegGrad+ (Kurmanji et al. 2023)"),
    "random_labels": Entry(random_labels, description="random labels on U (Golatkar 2020)"),
    "scrub": Entry(scrub, description="max/min teacher-student KL steps (Kurmanji et al. 2023)"),
    "fisher": Entry(fisher, description="retain-Fisher-shaped noise (Golatkar et al. 2020)"),
    "l1_sparse": Entry(l1_sparse, description="l1-sparse fine-tune (Jia et al. 2023)"),
    "salun": Entry(salun, description="saliency-masked random labels (Fan et al. 2024)"),
    "influence": Entry(influence_unlearning,
                       description="influence unlearning, one damped Newton step (Koh & Liang "
                                   "2017; Jia et al. 2023 IU)"),
    "newton": Entry(newton, description="batch Newton removal (Guo et al. 2020); damped GGN + "
                                        "trust rule on non-convex models"),
    "certified": Entry(certified, convex_only=True,
                       description="(ε, δ)-certified removal (Guo et al. 2020)"),
    # language-model unlearning (open-unlearning's losses; token tasks only)
    "grad_ascent": Entry(grad_ascent, tokens_only=True,
                         description="LM gradient ascent on U (Jang et al. 2023; TOFU GA)"),
    "grad_diff": Entry(grad_diff, tokens_only=True,
                       description="LM ascent on U + retain NLL/KL (Liu et al. 2022; TOFU)"),
    "npo": Entry(npo, tokens_only=True,
                 description="negative preference optimization (Zhang et al. 2024)"),
    "simnpo": Entry(simnpo, tokens_only=True,
                    description="reference-free, length-normalised NPO (Fan et al. 2024)"),
    "idk_dpo": Entry(idk_dpo, tokens_only=True,
                     description="DPO preferring an 'I don't know' answer (Maini et al. 2024; "
                                 "Rafailov et al. 2023)"),
    "idk_nll": Entry(idk_nll, tokens_only=True,
                     description="fine-tune U's prompts to 'I don't know' (Maini et al. 2024)"),
    "rmu": Entry(rmu, tokens_only=True,
                 description="representation misdirection (Li et al. 2024, WMDP)"),
    "undial": Entry(undial, tokens_only=True,
                    description="self-distillation with adjusted logits (Dong et al. 2024)"),
}


def register(name: str, make: Callable[..., Unlearner], *, convex_only: bool = False,
             description: str = "", replace: bool = False, tokens_only: bool = False) -> None:
    """Add a method to the registry (for methods defined outside this package); an existing
    name is refused unless ``replace=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string; got {name!r}.")
    if not callable(make):
        raise TypeError(f"make must be a constructor returning an Unlearner; got {make!r}.")
    if name in REGISTRY and not replace:
        raise ValueError(f"method {name!r} is already registered; pick another name or pass "
                         "replace=True.")
    REGISTRY[name] = Entry(make, convex_only, description, tokens_only)


def get(name: str, **hparams) -> Unlearner:
    """Construct the registered method ``name`` with keyword hyperparameters."""
    if name not in REGISTRY:
        raise ValueError(f"method={name!r} is not registered; choose one of {sorted(REGISTRY)}.")
    return REGISTRY[name].make(**hparams)


__all__ = ["REGISTRY", "Entry", "ParamState", "Result", "Unlearner", "get", "register"]
