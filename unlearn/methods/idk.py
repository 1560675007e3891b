r"""Unlearning towards "I don't know": IdkDPO and IdkNLL (TOFU, Maini et al. 2024, §4; OU's
``unlearn/tofu/idk.yaml`` experiment).

Each forget example (prompt :math:`x`, answer :math:`y_l`) gets an alternate answer
:math:`y_w` for the same prompt: one of the refusal strings ``answers`` (default
:data:`unlearn.people.IDK`), drawn uniformly per example from the request's key (OU's
``QAwithIdkDataset`` draws one per access). The alternate sequence is
``<bos> prompt ⊕ y_w ⊕ <eos>``, labelled on ``y_w ⊕ <eos>``; it reaches the loss as a third
batch aligned with the forget batch (:class:`unlearn.methods.loops.AltInputs`). Both methods
have OU's GradDiff structure :math:`\gamma L_f + \alpha L_{\mathrm{retain}}` (retain
``"nll"``, or ``"kl"``):

* ``idk_dpo`` (Rafailov et al. 2023 DPO with the refusal preferred; OU ``DPO`` trainer,
  ``compute_dpo_loss``): :math:`L_f = -\frac{2}{\beta}\log\sigma\bigl(\beta[(\log\pi_\theta(y_w)
  - \log\pi_{\mathrm{ref}}(y_w)) - (\log\pi_\theta(y_l) - \log\pi_{\mathrm{ref}}(y_l))]\bigr)`,
  summed log-likelihoods, π_ref the model before the request; β = 0.1, γ = α = 1.
* ``idk_nll`` (TOFU's "IDK" fine-tuning baseline): :math:`L_f` = the token-weighted NLL of the
  refusal answers (descent), γ = α = 1.

Token data must be character-level with the vocabulary of :class:`unlearn.data.CharTokenizer`
(``Dataset.classes`` = ``<pad>``, ``<bos>``, ``<eos>``, then one character per id), the
labelled positions of a forget row one contiguous run (the answer and its ``<eos>``) after
the prompt. Run hyperparameters: 10 epochs over the forget set at ``lr_scale`` = 0.1 × the
training rate (OU's 10 epochs at lr 1e-5 are for 7B models; see
:mod:`unlearn.methods.grad_ascent`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from unlearn.data import CharTokenizer, Dataset
from unlearn.methods.base import Unlearner
from unlearn.methods.lm_losses import (
    check_nonnegative,
    check_positive,
    check_retain,
    dpo_loss,
    lm_unlearner,
    token_mean_nll,
)
from unlearn.methods.loops import AltInputs, Setup


def tokenizer_of(ds: Dataset) -> CharTokenizer:
    """The character tokenizer whose vocabulary is ``ds.classes``; raises if it is not one."""
    classes = tuple(ds.classes or ())
    n = len(CharTokenizer.SPECIALS)
    specials = CharTokenizer.SPECIALS
    if classes[:n] != specials or any(len(c) != 1 for c in classes[n:]):
        raise ValueError(
            f"the IDK methods need a character vocabulary (Dataset.classes = {specials} then "
            f"one character per id, as unlearn.data.CharTokenizer); got classes "
            f"{classes[:8]}...")
    return CharTokenizer("".join(classes[n:]))


def alternate_rows(ds: Dataset, rows: np.ndarray, texts: Sequence[str]) -> AltInputs:
    """Training rows ``rows`` with their answer replaced by ``texts[j]``: the prompt (the
    inputs up to the first labelled target) ⊕ the text ⊕ ``<eos>``, shifted as the data are
    (``x`` = sequence[:-1], ``y`` = sequence[1:], ``-1`` on the prompt and the padding),
    padded to the wider of the data's width and the longest alternate."""
    tok = tokenizer_of(ds)
    seqs, firsts = [], []
    for r, text in zip(rows, texts):
        lab = np.nonzero(np.asarray(ds.y[r]) >= 0)[0]
        if len(lab) == 0:
            raise ValueError(f"forget row {ds.ids[r]!r} has no labelled target: no answer to "
                             "replace.")
        f = int(lab[0])
        if not np.array_equal(lab, np.arange(f, f + len(lab))):
            raise ValueError(f"forget row {ds.ids[r]!r}: its labelled targets are not one "
                             "contiguous answer after the prompt.")
        seqs.append(np.concatenate([np.asarray(ds.x[r][: f + 1]), tok.encode(text, eos=True)]))
        firsts.append(f)
    width = max(ds.x.shape[1], max(len(s) - 1 for s in seqs))
    x = np.full((len(rows), width), tok.PAD, np.asarray(ds.x).dtype)
    y = np.full((len(rows), width), -1, np.asarray(ds.y).dtype)
    for j, (s, f) in enumerate(zip(seqs, firsts)):
        x[j, : len(s) - 1] = s[:-1]
        y[j, f: len(s) - 1] = s[f + 1:]
    return AltInputs(np.asarray(rows), x, y)


def _answers(answers: Sequence[str] | None) -> tuple[str, ...]:
    if answers is None:
        from unlearn.people import IDK

        answers = IDK
    if isinstance(answers, str) or not len(answers) or not all(
            isinstance(a, str) and a for a in answers):
        raise ValueError(f"answers must be a non-empty sequence of non-empty strings (the "
                         f"refusals); got {answers!r}.")
    return tuple(answers)


def _setup(texts: tuple[str, ...]):
    def setup(state, forget_rows: np.ndarray, key: jax.Array) -> Setup:
        pick = np.asarray(jax.random.randint(key, (len(forget_rows),), 0, len(texts)))
        return Setup(alt=alternate_rows(state.problem.train, forget_rows,
                                        [texts[j] for j in pick]))

    return setup


def dpo_term(apply, params, aux, forget, alt):
    """DPO with the refusal (``alt``) preferred over the forget answer (``forget``)."""
    return dpo_loss(apply, params, aux["teacher"], alt, forget, aux["beta"])


def idk_nll_term(apply, params, aux, forget, alt):
    """The token-weighted NLL of the refusal answers (rows weighted as the forget batch)."""
    return token_mean_nll(apply, params, alt._replace(w=forget.w))


def idk_dpo(answers: Sequence[str] | None = None, beta: float = 0.1, gamma: float = 1.0,
            alpha: float = 1.0, retain: str = "nll", epochs: int | None = None,
            lr: float | None = None, lr_scale: float = 0.1,
            checkpoint_every: int | None = None) -> Unlearner:
    """IdkDPO (module doc; OU defaults β = 0.1, γ = α = 1, retain NLL)."""
    texts = _answers(answers)
    check_positive(beta=beta)
    check_nonnegative(gamma=gamma, alpha=alpha)
    check_retain(retain)
    return lm_unlearner("idk_dpo", dpo_term, retain,
                        {"beta": beta, "gamma": gamma, "alpha": alpha}, epochs=epochs, lr=lr,
                        lr_scale=lr_scale, checkpoint_every=checkpoint_every,
                        setup=_setup(texts))


def idk_nll(answers: Sequence[str] | None = None, gamma: float = 1.0, alpha: float = 1.0,
            retain: str = "nll", epochs: int | None = None, lr: float | None = None,
            lr_scale: float = 0.1, checkpoint_every: int | None = None) -> Unlearner:
    """IdkNLL (module doc): fit the refusals on the forget prompts, γ = α = 1."""
    texts = _answers(answers)
    check_nonnegative(gamma=gamma, alpha=alpha)
    check_retain(retain)
    return lm_unlearner("idk_nll", idk_nll_term, retain, {"gamma": gamma, "alpha": alpha},
                        epochs=epochs, lr=lr, lr_scale=lr_scale,
                        checkpoint_every=checkpoint_every, setup=_setup(texts))
