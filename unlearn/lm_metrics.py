"""Language-model unlearning metrics: TOFU, MUSE and the membership-inference attacks.

Every definition follows the reference implementations read at pinned commits and written up
in ``/work/shared/llm-unlearning.md`` (open-unlearning "OU" @ d3d7cf9, legacy TOFU @ bdc209e,
MUSE @ 54719c5, rouge-score 0.1.2). Section numbers (§) below refer to that document.

Data convention (this codebase): ``x`` (n, T) input ids, ``y`` (n, T) next-token targets
already shifted (``y[:, t]`` is the target of ``logits[:, t]``), ``y < 0`` = not labelled.
For QA data the labelled positions are the answer characters plus the final ``<eos>``
(:func:`unlearn.people.encode`, TOFU's §1.1).

Primitives on ``(logits, y)``
  * :func:`sequence_nll`, :func:`avg_loss`, :func:`probability` — §1.2, EOS included.
  * :func:`token_logprobs` — §1.3: every labelled position except the last labelled one of
    each sequence (OU drops the EOS prediction), used by Min-K, Min-K++, GradNorm, EM, ES.
  * :func:`greedy_generate` — argmax decoding (§1.4), one jitted ``lax.fori_loop``.
  * :func:`rouge_l` — ROUGE-L of ``rouge-score`` (§1.4), ``score(target, prediction)``.

TOFU metrics (§2): :func:`truth_ratio`, :func:`normalised_probability`,
:func:`forget_quality`, :func:`model_utility`, :func:`exact_memorization`,
:func:`extraction_strength`.

MIAs (§4), every score signed "higher = less likely a member": :func:`mia_loss`,
:func:`mia_zlib`, :func:`mia_min_k`, :func:`mia_min_k_plus_plus`, :func:`mia_gradnorm`,
:func:`mia_reference`; :func:`auc` (OU's convention, §4.7) and :func:`privleak` (§3.3).

:func:`evaluate_tofu` evaluates one model on the fictitious-people benchmark
(:mod:`unlearn.people`) the way OU's ``configs/eval/tofu.yaml`` does, with the adaptations
stated in its docstring.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

Params = Any
Apply = Callable[[Params, jax.Array], jax.Array]

EPS = 1e-10
"""The ε of OU's truth ratio, normalised probability and PrivLeak (§2.3, §2.5, §3.3)."""
MINKPP_VAR_FLOOR = 1e-6
"""Min-K%++ floors the per-position variance σ² at this value (§4)."""
AGGREGATORS = ("closer_to_1_better", "true_better", "prob_mean")
FORGET_SPLITS = ("forget01", "forget05", "forget10")


# ----------------------------------------------------------------------------- validation


def _check_logits_y(logits, y) -> tuple[jax.Array, jax.Array]:
    if np.ndim(logits) != 3:
        raise ValueError(f"logits must have shape (n, T, vocab); got {np.shape(logits)}.")
    if np.ndim(y) != 2 or tuple(np.shape(y)) != tuple(np.shape(logits)[:2]):
        raise ValueError(f"y must have shape (n, T) = {tuple(np.shape(logits)[:2])} matching "
                         f"logits; got {np.shape(y)}.")
    if not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise ValueError(f"y must hold integer token ids (negative = not labelled); got dtype "
                         f"{np.asarray(y).dtype}.")
    if np.size(y) and int(np.max(y)) >= np.shape(logits)[2]:
        raise ValueError(f"y has token id {int(np.max(y))} >= the vocabulary size "
                         f"{np.shape(logits)[2]} of logits.")
    return jnp.asarray(logits), jnp.asarray(y, jnp.int32)


def _vector(a, name: str, *, ndim: int = 1) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array; got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values at {np.argwhere(~np.isfinite(a))[:5]}; "
                         "pass finite numbers.")
    return a


# ----------------------------------------------------------------------------- primitives


@jax.jit
def _token_stats(logits: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Per-token quantities of one batch (in float32, or the logits' wider float type).

    ``lp``: log p(y_t) at labelled positions (0 elsewhere); ``z``: the Min-K%++ normalised
    log-prob (lp − μ_t)/σ_t; ``correct``: argmax_v p_t(v) == y_t; ``labelled``: y_t ≥ 0;
    ``keep``: the §1.3 positions (labelled but not the last labelled one of the row).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
                              axis=-1)
    labelled = y >= 0
    lp = jnp.take_along_axis(logp, jnp.where(labelled, y, 0)[..., None], axis=-1)[..., 0]
    lp = jnp.where(labelled, lp, 0.0)
    p = jnp.exp(logp)
    mu = jnp.sum(p * logp, axis=-1)
    var = jnp.maximum(jnp.sum(p * logp**2, axis=-1) - mu**2, MINKPP_VAR_FLOOR)
    z = jnp.where(labelled, (lp - mu) / jnp.sqrt(var), 0.0)
    t = jnp.arange(y.shape[1])
    last = jnp.max(jnp.where(labelled, t, -1), axis=1)
    keep = labelled & (t[None, :] != last[:, None])
    correct = labelled & (jnp.argmax(logp, axis=-1) == y)
    return {"lp": lp, "z": z, "correct": correct, "labelled": labelled, "keep": keep}


def sequence_nll(logits, y) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence, ``(NLL_sum, n_labelled)``: NLL_sum = Σ_{t: y_t ≥ 0} −log softmax(z_t)[y_t]
    and n_labelled = #{t: y_t ≥ 0} (answer tokens + EOS for QA data; OU
    ``evaluate_probability``, §1.2). Returns float64 and int64 arrays of shape (n,)."""
    s = _token_stats(*_check_logits_y(logits, y))
    return (-np.asarray(s["lp"], np.float64).sum(1),
            np.asarray(s["labelled"]).sum(1).astype(np.int64))


def _mean_loss(nll: np.ndarray, n: np.ndarray) -> np.ndarray:
    if np.any(n == 0):
        raise ValueError(f"rows {np.flatnonzero(n == 0)[:10].tolist()} of y have no labelled "
                         "position (y >= 0): their average loss is undefined; drop them.")
    return nll / n


def avg_loss(logits, y) -> np.ndarray:
    """Per sequence, NLL_sum / n_labelled (§1.2: the mean NLL over the answer tokens and the
    EOS). A row without labelled positions raises ValueError."""
    return _mean_loss(*sequence_nll(logits, y))


def probability(logits, y) -> np.ndarray:
    """Per sequence, exp(−avg_loss) = (Π_t p(y_t|·))^(1/n): the geometric-mean per-token
    probability (OU ``probability``, §1.2/§2.2)."""
    return np.exp(-avg_loss(logits, y))


def token_logprobs(logits, y) -> tuple[np.ndarray, np.ndarray]:
    """``(lp, mask)``, both (n, T): ``lp[i, t]`` = log p(y_it | ·) and ``mask`` marks the
    positions of OU's ``tokenwise_logprobs`` (§1.3): every labelled position except the
    LAST labelled one of each row ("-1 to ignore eos prediction"; for QA data the EOS).
    ``lp`` is 0 where ``mask`` is False."""
    s = _token_stats(*_check_logits_y(logits, y))
    mask = np.asarray(s["keep"])
    return np.where(mask, np.asarray(s["lp"], np.float64), 0.0), mask


@functools.partial(jax.jit, static_argnames=("apply", "max_new_tokens", "eos", "pad"))
def _generate(apply, params, buf, lengths, *, max_new_tokens: int, eos: int, pad: int):
    n, width = buf.shape
    rows = jnp.arange(n)

    def step(carry):
        k, buf, out, done = carry
        logits = apply(params, buf)
        nxt = jnp.argmax(logits[rows, lengths - 1 + k], axis=-1).astype(buf.dtype)
        out = out.at[:, k].set(jnp.where(done, pad, nxt))
        pos = lengths + k
        safe = jnp.minimum(pos, width - 1)
        buf = buf.at[rows, safe].set(jnp.where(pos < width, nxt, buf[rows, safe]))
        return k + 1, buf, out, done | (nxt == eos)

    def more(carry):  # stop early once every row has produced its eos
        k, _, _, done = carry
        return (k < max_new_tokens) & ~jnp.all(done)

    out = jnp.full((n, max_new_tokens), pad, buf.dtype)
    init = (jnp.asarray(0, jnp.int32), buf, out, jnp.zeros((n,), bool))
    return jax.lax.while_loop(more, step, init)[2]


def greedy_generate(apply: Apply, params: Params, x, lengths, *, max_new_tokens: int,
                    eos: int, pad: int = -1, max_len: int | None = None,
                    batch_size: int | None = None) -> np.ndarray:
    """Greedy (argmax) decoding from right-padded prompts: ``tokens`` (n, max_new_tokens).

    Row i's prompt is ``x[i, :lengths[i]]``; generated token k is the argmax of the logits at
    position ``lengths[i] − 1 + k`` and is placed at position ``lengths[i] + k`` for the next
    step (OU ``configs/generation/default.yaml``: ``do_sample: False``). Each row stops at its
    first ``eos``: the ``eos`` is kept and every later token is ``pad`` (−1 by default, which
    :meth:`unlearn.data.CharTokenizer.decode` drops). One jitted ``lax.while_loop``
    recomputes the full causal forward pass each step (no KV cache; fine for tiny models) and
    stops once every row of the chunk has produced ``eos``.

    The model sees a buffer of width ``max(lengths) + max_new_tokens − 1`` (the last token is
    never fed back), so that must not exceed the model's ``max_len`` (the transformer raises
    otherwise). Pass ``max_len`` to get this check up front, with the largest
    ``max_new_tokens`` that fits. ``batch_size``: rows per compiled call (all by default;
    the last chunk is padded so every chunk shares one program).
    """
    x = np.asarray(x)
    lengths = np.asarray(lengths)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"x must be integer token ids of shape (n, T); got {x.dtype} {x.shape}.")
    if lengths.shape != (len(x),) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be integers of shape ({len(x)},); got "
                         f"{lengths.dtype} {lengths.shape}.")
    if len(x) and (lengths.min() < 1 or lengths.max() > x.shape[1]):
        raise ValueError(f"lengths must lie in [1, {x.shape[1]}] (each prompt has at least "
                         f"<bos>); got min {lengths.min()}, max {lengths.max()}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: pass an integer >= 1.")
    if len(x) == 0:
        return np.zeros((0, max_new_tokens), np.int32)
    width = int(lengths.max()) + int(max_new_tokens) - 1
    if max_len is not None and width > max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens}: the longest prompt has "
                         f"{int(lengths.max())} tokens, so prompt + generation needs "
                         f"{width} > max_len={max_len} positions; pass max_new_tokens <= "
                         f"{max_len - int(lengths.max()) + 1} or a model with a larger max_len.")
    buf = np.zeros((len(x), width), np.int32)
    cols = min(width, x.shape[1])
    buf[:, :cols] = x[:, :cols]
    b = len(x) if batch_size is None else batch_size
    out = _chunked(lambda xb, lb: {"t": _generate(apply, params, xb, lb,
                                                  max_new_tokens=int(max_new_tokens),
                                                  eos=int(eos), pad=int(pad))},
                   buf, lengths.astype(np.int32), b)
    return out["t"]


@functools.cache
def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(targets: Sequence[str], predictions: Sequence[str], *,
            use_stemmer: bool = True) -> dict[str, np.ndarray]:
    """ROUGE-L per pair: ``{"recall", "precision", "f1"}`` arrays (n,).

    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=...)``, called as
    ``score(target, prediction)`` (§1.4): lower-case, non-alphanumerics → spaces, Porter stems
    of tokens longer than 3 characters when ``use_stemmer``; L = |LCS|, R = L/|target|,
    P = L/|prediction|, F = 2PR/(P+R). OU uses ``use_stemmer=True`` (the default), original
    MUSE ``False``. TOFU's ROUGE is the recall, MUSE's the F1.
    """
    if isinstance(targets, str) or isinstance(predictions, str):
        raise ValueError("targets and predictions must be sequences of strings, not a string.")
    if len(targets) != len(predictions):
        raise ValueError(f"targets ({len(targets)}) and predictions ({len(predictions)}) must "
                         "have the same length.")
    bad = [i for i, s in enumerate(list(targets) + list(predictions)) if not isinstance(s, str)]
    if bad:
        raise ValueError(f"targets/predictions must be strings; entry {bad[0]} is not.")
    scorer = _scorer(bool(use_stemmer))
    scores = [scorer.score(t, p)["rougeL"] for t, p in zip(targets, predictions, strict=True)]
    return {"recall": np.array([s.recall for s in scores], np.float64),
            "precision": np.array([s.precision for s in scores], np.float64),
            "f1": np.array([s.fmeasure for s in scores], np.float64)}


# ----------------------------------------------------------------------------- TOFU metrics


def _loss_pair(avg_loss_correct, avg_loss_perturbed) -> tuple[np.ndarray, np.ndarray]:
    c = _vector(avg_loss_correct, "avg_loss_correct")
    w = _vector(avg_loss_perturbed, "avg_loss_perturbed", ndim=2)
    if w.shape[0] != c.shape[0] or w.shape[1] < 1:
        raise ValueError(f"avg_loss_perturbed must have shape (n, m) = ({len(c)}, m >= 1), one "
                         f"row per item of avg_loss_correct; got {w.shape}.")
    if len(c) == 0:
        raise ValueError("avg_loss_correct is empty: pass at least one item.")
    return c, w


def truth_ratio(avg_loss_correct, avg_loss_perturbed,
                aggregator: str = "closer_to_1_better") -> tuple[float, np.ndarray]:
    """TOFU's Truth Ratio (OU ``truth_ratio``, §2.5): ``(aggregate, per-item TR)``.

    With L_c the average loss of the "correct" answer and L̄_w the mean over the item's m
    perturbed answers of their average losses (OU's ``aggregate_to_1D``):
    P_c = exp(−L_c), P_w = exp(−L̄_w) (the geometric mean of the perturbed per-token
    probabilities; the TOFU paper writes an arithmetic mean, both codes use this one).

    * ``"closer_to_1_better"`` (forget set): TR = P_w/(P_c + 1e−10),
      aggregate = mean min(TR, 1/(TR + 1e−10)).
    * ``"true_better"`` (retain / world sets, Model Utility): TR as above,
      aggregate = mean max(0, 1 − TR).
    * ``"prob_mean"`` (OU's newer "extent of knowledge"): TR = P_c/(P_c + P_w + 1e−10),
      aggregate = mean TR.

    Legacy TOFU's stat P_c/P_w with mean min(s, 1/s) and mean max(0, 1 − 1/s) gives the same
    aggregates up to the ε's.
    """
    if aggregator not in AGGREGATORS:
        raise ValueError(f"aggregator={aggregator!r}: pass one of {AGGREGATORS}.")
    c, w = _loss_pair(avg_loss_correct, avg_loss_perturbed)
    p_c, p_w = np.exp(-c), np.exp(-w.mean(axis=1))
    if aggregator == "prob_mean":
        tr = p_c / (p_c + p_w + EPS)
        return float(np.mean(tr)), tr
    tr = p_w / (p_c + EPS)
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(tr, 1.0 / (tr + EPS)))), tr
    return float(np.mean(np.maximum(0.0, 1.0 - tr))), tr


def normalised_probability(avg_loss_correct, avg_loss_perturbed) -> tuple[float, np.ndarray]:
    """Probability normalised against the perturbed answers (OU ``probability_w_options``,
    §2.3; TOFU's real-authors / world-facts Prob): per item
    P_c/(P_c + Σ_j P_j + 1e−10), P = exp(−avg_loss); ``(mean, per-item)``."""
    c, w = _loss_pair(avg_loss_correct, avg_loss_perturbed)
    p_c = np.exp(-c)
    score = p_c / (p_c + np.exp(-w).sum(axis=1) + EPS)
    return float(np.mean(score)), score


def forget_quality(tr_unlearned, tr_retain) -> float:
    """TOFU's Forget Quality (OU ``ks_test``, §2.6): the p-value of the two-sample
    Kolmogorov–Smirnov test (``scipy.stats.ks_2samp``, two-sided, default ``method='auto'``)
    between the unlearned model's per-item forget truth ratios and the retain model's on the
    same questions. KS is invariant to a strictly monotone map of both samples, so the
    wrong/correct, correct/wrong and correct/(correct+wrong) forms give the same value."""
    a, b = _vector(tr_unlearned, "tr_unlearned"), _vector(tr_retain, "tr_retain")
    if len(a) == 0 or len(b) == 0:
        raise ValueError("tr_unlearned and tr_retain must both be non-empty.")
    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(values) -> float:
    """TOFU's Model Utility (OU ``hm_aggregate``, §2.7): the harmonic mean
    (``scipy.stats.hmean``) of the utility values; 0 if any of them is 0. Values must be
    finite and non-negative."""
    v = _vector(values, "values")
    if len(v) == 0 or np.any(v < 0):
        raise ValueError(f"values must be a non-empty list of numbers >= 0; got {v.tolist()}.")
    if np.any(v == 0):
        return 0.0
    return float(stats.hmean(v))


def _positions(logits, y) -> tuple[np.ndarray, np.ndarray]:
    s = _token_stats(*_check_logits_y(logits, y))
    return np.asarray(s["correct"]), np.asarray(s["keep"])


def _em_from(correct: np.ndarray, keep: np.ndarray) -> np.ndarray:
    n = keep.sum(1)
    hits = (correct & keep).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, hits / np.maximum(n, 1), np.nan)


def _es_from(correct: np.ndarray, keep: np.ndarray) -> np.ndarray:
    n = keep.sum(1)
    rank = np.cumsum(keep, axis=1) - 1  # index of each §1.3 position among the row's
    wrong = keep & ~correct
    last_wrong = np.max(np.where(wrong, rank, -1), axis=1)
    k_star = np.minimum(last_wrong + 1, np.maximum(n - 1, 0))  # quirk: no suffix → n − 1
    return np.where(n > 0, 1.0 - k_star / np.maximum(n, 1), 0.0)


def exact_memorization(logits, y) -> np.ndarray:
    """Exact Memorisation per item (OU ``exact_memorization``, §2.8): the fraction of the
    §1.3 positions (EOS prediction excluded) where the teacher-forced argmax equals the
    label. NaN for an item without such positions (OU returns None and skips it)."""
    return _em_from(*_positions(logits, y))


def extraction_strength(logits, y) -> np.ndarray:
    """Extraction Strength per item (OU ``extraction_strength``, §2.8; Carlini et al.'s
    extraction via teacher-forced argmax): over the n §1.3 positions with argmax predictions
    ŷ, ES = 1 − k*/n with k* the first k whose suffix ŷ_{k:} equals y_{k:}.

    Quirk kept from OU: its loop ``for k in range(n): if match: break`` leaves k* = n − 1
    when no suffix matches, so ES = 1/n both when only the last token is right and when none
    is (the paper's definition gives 0 for the latter). n = 0 gives 0.
    """
    return _es_from(*_positions(logits, y))


# ----------------------------------------------------------------------------- MIAs


def mia_loss(avg_loss) -> np.ndarray:
    """LOSS attack (OU ``mia/loss.py``, §4): the score is the average loss (§1.2, EOS
    included); higher = less likely a member."""
    return _vector(avg_loss, "avg_loss").copy()


def mia_zlib(avg_loss, texts: Sequence[str]) -> np.ndarray:
    """ZLib attack (OU ``mia/zlib.py``, §4): avg_loss / len(zlib.compress(text.encode())),
    text = the labelled answer text (specials dropped), default zlib level."""
    a = _vector(avg_loss, "avg_loss")
    if isinstance(texts, str) or len(texts) != len(a):
        raise ValueError(f"texts must be a list of {len(a)} strings, one per avg_loss.")
    sizes = np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], np.float64)
    return a / sizes


def _min_k_from(values: np.ndarray, mask: np.ndarray, k: float) -> np.ndarray:
    if not 0 < k <= 1:
        raise ValueError(f"k={k!r}: pass the fraction of lowest tokens, 0 < k <= 1.")
    n = mask.sum(1)
    kk = np.maximum(1, np.floor(n * float(k)).astype(np.int64))
    srt = np.sort(np.where(mask, np.asarray(values, np.float64), np.inf), axis=1)
    take = np.arange(values.shape[1])[None, :] < kk[:, None]
    s = -np.where(take, srt, 0.0).sum(1) / kk
    return np.where(n > 0, s, 0.0)


def mia_min_k(lp, mask, k: float = 0.4) -> np.ndarray:
    """Min-K% Prob (Shi et al. 2024; OU ``mia/min_k.py``, §4): over the row's n masked
    positions (§1.3, :func:`token_logprobs`), K = max(1, ⌊n·k⌋) and the score is
    −mean of the K smallest log-probs; n = 0 gives 0. OU's configs use k = 0.4."""
    lp, mask = np.asarray(lp, np.float64), np.asarray(mask, bool)
    if lp.ndim != 2 or lp.shape != mask.shape:
        raise ValueError(f"lp and mask must have the same (n, T) shape; got {lp.shape} and "
                         f"{mask.shape}.")
    return _min_k_from(lp, mask, k)


def mia_min_k_plus_plus(logits, y, k: float = 0.4) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024; OU ``mia/min_k_plus_plus.py``, §4). At each §1.3
    position t, under the model's own next-token distribution p_t:
    μ_t = Σ_v p_t(v) log p_t(v), σ²_t = max(Σ_v p_t(v) (log p_t(v))² − μ_t², 1e−6),
    z_t = (log p_t(y_t) − μ_t)/σ_t; the score is −mean of the K = max(1, ⌊n·k⌋) smallest z."""
    s = _token_stats(*_check_logits_y(logits, y))
    return _min_k_from(np.asarray(s["z"], np.float64), np.asarray(s["keep"]), k)


@functools.partial(jax.jit, static_argnames=("apply",))
def _gradnorms(apply, params, x, y):
    """Per example, the mean over parameter leaves of ‖∇L‖_1, ‖∇L‖_2, ‖∇L‖_∞: (n, 3)."""
    def loss(prm, xi, yi):
        logits = apply(prm, xi[None])[0]
        s = _token_stats(logits[None], yi[None])
        keep = s["keep"][0]
        return -jnp.sum(jnp.where(keep, s["lp"][0], 0.0)) / jnp.sum(keep)

    def one(xi, yi):
        leaves = [g.reshape(-1) for g in jax.tree.leaves(jax.grad(loss)(params, xi, yi))]
        norms = jnp.stack([jnp.stack([jnp.sum(jnp.abs(g)), jnp.sqrt(jnp.sum(g * g)),
                                      jnp.max(jnp.abs(g))]) for g in leaves])
        return jnp.mean(norms, axis=0)

    return jax.vmap(one)(x, y)


_NORM_COLUMN = {1: 0, 2: 1, float("inf"): 2}


def mia_gradnorm(apply: Apply, params: Params, x, y, p: float = 2,
                 batch_size: int = 64) -> np.ndarray:
    """GradNorm attack (OU ``mia/gradnorm.py``, §4): per example, L = the mean of −log p(y_t)
    over the §1.3 positions; the score is the mean over the parameter tensors (leaves of
    ``params``) of ‖∇_P L‖_p (not a global norm). ``p`` ∈ {1, 2, inf}. Adaptation: OU runs
    the model in train mode (dropout); our models have no dropout, so eval-mode ``apply``
    is the same. A row with fewer than 2 labelled positions (no §1.3 position) raises."""
    if p not in _NORM_COLUMN:
        raise ValueError(f"p={p!r}: pass 1, 2 or float('inf').")
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must have the same (n, T) shape; got {x.shape}, {y.shape}.")
    n_keep = (y >= 0).sum(1) - 1
    if np.any(n_keep < 1):
        raise ValueError(f"rows {np.flatnonzero(n_keep < 1)[:10].tolist()} have fewer than 2 "
                         "labelled positions: GradNorm's mean loss over them is undefined.")
    out = _chunked(lambda xb, yb: {"g": _gradnorms(apply, params, xb, yb)}, x,
                   y.astype(np.int32), batch_size)
    return np.asarray(out["g"][:, _NORM_COLUMN[float(p)]], np.float64)


def mia_reference(avg_loss, avg_loss_ref) -> np.ndarray:
    """Reference-model attack (OU ``mia/reference.py``, §4): avg_loss_target −
    avg_loss_reference (the reference is the retain / retrain model)."""
    a, b = _vector(avg_loss, "avg_loss"), _vector(avg_loss_ref, "avg_loss_ref")
    if a.shape != b.shape:
        raise ValueError(f"avg_loss {a.shape} and avg_loss_ref {b.shape} must match.")
    return a - b


def auc(forget_scores, holdout_scores) -> float:
    """MIA AUC in OU's convention (``mia_auc``, §4.7): ``roc_auc_score`` with the forget set
    labelled 0 and the holdout set 1 on "higher = less member" scores, i.e.
    P(s_holdout > s_forget) + ½·P(tie) (the Mann–Whitney form, computed from midranks).
    1 = forget data clearly memorised, 0.5 = indistinguishable from the holdout."""
    f, h = _vector(forget_scores, "forget_scores"), _vector(holdout_scores, "holdout_scores")
    if len(f) == 0 or len(h) == 0:
        raise ValueError("forget_scores and holdout_scores must both be non-empty.")
    ranks = stats.rankdata(np.concatenate([f, h]))
    u = ranks[len(f):].sum() - len(h) * (len(h) + 1) / 2
    return float(u / (len(f) * len(h)))


def privleak(auc_unlearn: float, auc_retrain: float) -> float:
    """PrivLeak (MUSE; OU ``privleak``, §3.3), in OU's AUC convention:
    ((1 − AUC_unlearn) − (1 − AUC_retrain)) / ((1 − AUC_retrain) + 1e−10) × 100.
    ≈ 0 is ideal; negative = under-unlearning (forget data still looks like members),
    positive = over-unlearning. OU uses AUC_retrain = 0.5 when no retain model is given."""
    for name, v in (("auc_unlearn", auc_unlearn), ("auc_retrain", auc_retrain)):
        if not np.isfinite(v) or not 0 <= v <= 1:
            raise ValueError(f"{name}={v!r}: pass an AUC in [0, 1].")
    return float(((1 - auc_unlearn) - (1 - auc_retrain)) / ((1 - auc_retrain) + EPS) * 100)


# ----------------------------------------------------------------------------- batching


def _chunked(fn: Callable[..., dict], x: np.ndarray, y: np.ndarray,
             batch_size: int) -> dict[str, np.ndarray]:
    """``fn`` over fixed-size row chunks of (x, y), the last chunk padded with copies of the
    first row whose outputs are dropped (so one compiled program serves every chunk);
    outputs concatenated."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: pass an integer >= 1.")
    n = len(x)
    b = min(batch_size, n)
    parts: dict[str, list] = {}
    for i in range(0, n, b):
        xb, yb = x[i:i + b], y[i:i + b]
        m = len(xb)
        if m < b:
            xb = np.concatenate([xb, np.repeat(x[:1], b - m, 0)])
            yb = np.concatenate([yb, np.repeat(y[:1], b - m, 0)])
        out = fn(jnp.asarray(xb), jnp.asarray(yb))
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v)[:m])
    return {k: np.concatenate(v) for k, v in parts.items()}


@functools.partial(jax.jit, static_argnames=("apply",))
def _forward_stats(apply, params, x, y):
    s = _token_stats(apply(params, x), y)
    return {"nll": -s["lp"].sum(1), "n": s["labelled"].sum(1), "lp": s["lp"], "z": s["z"],
            "correct": s["correct"], "keep": s["keep"]}


def forward_stats(apply: Apply, params: Params, x, y, *,
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """One batched, jitted forward pass over (x, y): per row ``nll`` (NLL_sum), ``n``
    (labelled count), ``avg_loss``; per token ``lp``, ``z`` (Min-K%++), ``correct``
    (argmax == y) and ``keep`` (§1.3 mask). Rows go through in chunks of ``batch_size``
    (the last padded), so a few hundred sequences take one compiled program."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must have the same (n, T) shape; got {x.shape}, {y.shape}.")
    if len(x) == 0:
        raise ValueError("x is empty: pass at least one sequence.")
    out = _chunked(lambda xb, yb: _forward_stats(apply, params, xb, yb), x,
                   y.astype(np.int32), batch_size)
    out["nll"] = out["nll"].astype(np.float64)
    out["avg_loss"] = _mean_loss(out["nll"], out["n"])
    return out


# ----------------------------------------------------------------------------- TOFU glue


def _labelled_text(tok, y: np.ndarray) -> list[str]:
    return [tok.decode(row[row >= 0]) for row in y]


def evaluate_tofu(apply: Apply, params: Params, bench, forget_split: str, tok, *,
                  seq_len: int, max_new_tokens: int, retain_tr=None, retain_auc=None,
                  batch_size: int = 256, truth_ratio_correct: str = "paraphrase") -> dict:
    """The TOFU evaluation of one model (OU ``configs/eval/tofu.yaml`` + Model Utility and
    the MIAs), on a :class:`unlearn.people.Benchmark`.

    Sets: ``forget_split`` (forget01/05/10), ``"retain_eval"``, ``"world"`` and the matching
    holdout split (forget05 ↔ holdout05). Sequences are built by :func:`unlearn.people.encode`
    (labels on answer + EOS); all teacher-forced passes run as one batched jitted forward.

    Returned keys:
      * ``forget_prob``, ``retain_prob`` — mean exp(−avg_loss) of the answer (§2.2);
        ``world_prob`` — normalised against the 3 perturbed answers (§2.3).
      * ``forget_rouge``, ``retain_rouge``, ``world_rouge`` — mean ROUGE-L recall (stemmer on)
        of the answer vs the greedy generation from the prompt (:func:`people.prompts`),
        cut at EOS and ``.strip()``-ed (§2.4); ``forget_samples`` etc.: the first three
        (question, answer, generation) of each set, for reading.
      * ``forget_truth_ratio`` (paraphrase vs 5 perturbed, closer_to_1_better),
        ``retain_truth_ratio`` (paraphrase vs perturbed, true_better), ``world_truth_ratio``
        (answer vs 3 perturbed, true_better) (§2.5); ``forget_tr`` — the per-item forget TR
        (list), to pass a retain model's back in as ``retain_tr``.
        ``truth_ratio_correct="answer"`` (adaptation, not TOFU's default) takes the answer
        instead of the paraphrase as the "correct" side of the forget and retain truth ratios,
        as TOFU does for its real-authors / world-facts sets. Reason: a model trained from
        scratch never sees a paraphrase, so its paraphrase is less likely than the perturbed
        answers (which share the answer's template) and the retain truth ratio is 0 for every
        model (measured: persons=20, width-64 transformer trained to loss 1e-3, full and
        retain models both 0.0, so Model Utility 0). Pass the same value for the retain model
        whose ``forget_tr`` feeds ``retain_tr``; the output records it.
      * ``model_utility`` — hmean of the six values retain prob / ROUGE / TR and world
        normalised prob / ROUGE / TR. Adaptation: TOFU has nine (real authors AND world
        facts); this corpus has one untouched-knowledge set ("world"), so six.
      * ``forget_quality`` — KS p-value vs ``retain_tr`` (§2.6); None without it.
      * ``extraction_strength``, ``exact_memorization`` — means over the forget answers
        (§2.8; EM skips items without §1.3 positions, as OU).
      * ``mia_loss_auc``, ``mia_zlib_auc``, ``mia_min_k_auc``, ``mia_min_k_plus_plus_auc`` —
        forget (members) vs holdout AUCs, OU convention, k = 0.4 (§4); ``privleak`` — from the
        Min-K AUC vs ``retain_auc`` (a retain model's ``mia_min_k_auc``), else 0.5 (OU's
        ``ref_value``); ``privleak_reference`` says which was used.
      * ``n_forget``, ``n_retain``, ``n_world``, ``n_holdout``, ``n_perturbed_forget``,
        ``n_perturbed_retain``, ``n_perturbed_world`` — sample sizes; ``forget_split``,
        ``holdout_split``.

    ``max_new_tokens``: the longest prompt + ``max_new_tokens − 1`` must fit the model's
    ``max_len`` (see :func:`greedy_generate`).
    """
    from unlearn import people

    if forget_split not in FORGET_SPLITS:
        raise ValueError(f"forget_split={forget_split!r}: pass one of {FORGET_SPLITS}.")
    if truth_ratio_correct not in ("paraphrase", "answer"):
        raise ValueError(f"truth_ratio_correct={truth_ratio_correct!r}: pass 'paraphrase' "
                         "(TOFU) or 'answer'.")
    holdout_split = "holdout" + forget_split.removeprefix("forget")
    sets = {"forget": bench.items(forget_split), "retain": bench.items("retain_eval"),
            "world": bench.items("world"), "holdout": bench.items(holdout_split)}
    for name, items in sets.items():
        if not items:
            raise ValueError(f"the benchmark's {name} set is empty; evaluate_tofu needs items.")
    m = {name: min(len(q.perturbed) for q in items) for name, items in sets.items()
         if name != "holdout"}
    for name, items in sets.items():
        if name != "holdout" and any(len(q.perturbed) != m[name] for q in items):
            raise ValueError(f"the {name} items have different numbers of perturbed answers; "
                             "the truth ratio needs the same number per item.")
    if retain_tr is not None and len(retain_tr) != len(sets["forget"]):
        raise ValueError(f"retain_tr has {len(retain_tr)} values but {forget_split} has "
                         f"{len(sets['forget'])} items: pass the retain model's forget_tr on "
                         "the same split.")

    # every teacher-forced sequence, one batched forward pass
    blocks: list[tuple[str, Any]] = []
    for name in ("forget", "retain", "world", "holdout"):
        blocks.append((f"{name}/answer", people.encode(sets[name], tok, seq_len=seq_len)))
    if truth_ratio_correct == "paraphrase":
        for name in ("forget", "retain"):
            blocks.append((f"{name}/paraphrase", people.encode(sets[name], tok, seq_len=seq_len,
                                                               answer="paraphrase")))
    for name in ("forget", "retain", "world"):
        for j in range(m[name]):
            blocks.append((f"{name}/perturbed{j}", people.encode(
                sets[name], tok, seq_len=seq_len, answer=("perturbed", j))))
    x = np.concatenate([d.x for _, d in blocks])
    y = np.concatenate([d.y for _, d in blocks])
    fw = forward_stats(apply, params, x, y, batch_size=batch_size)
    part, start = {}, 0
    for key, d in blocks:
        part[key] = (slice(start, start + len(d.x)), d)
        start += len(d.x)

    def loss(key: str) -> np.ndarray:
        return fw["avg_loss"][part[key][0]]

    def perturbed(name: str) -> np.ndarray:
        return np.stack([loss(f"{name}/perturbed{j}") for j in range(m[name])], axis=1)

    out: dict[str, Any] = {"forget_split": forget_split, "holdout_split": holdout_split,
                           "truth_ratio_correct": truth_ratio_correct}
    tc = truth_ratio_correct
    out["forget_prob"] = float(np.mean(np.exp(-loss("forget/answer"))))
    out["retain_prob"] = float(np.mean(np.exp(-loss("retain/answer"))))
    out["world_prob"], _ = normalised_probability(loss("world/answer"), perturbed("world"))
    out["forget_truth_ratio"], f_tr = truth_ratio(loss(f"forget/{tc}"), perturbed("forget"),
                                                  "closer_to_1_better")
    out["retain_truth_ratio"], _ = truth_ratio(loss(f"retain/{tc}"), perturbed("retain"),
                                               "true_better")
    out["world_truth_ratio"], _ = truth_ratio(loss("world/answer"), perturbed("world"),
                                              "true_better")
    out["forget_tr"] = f_tr.tolist()

    # greedy generation from the prompts → ROUGE-L recall against the answers
    gen_sets = ("forget", "retain", "world")
    prompt_parts = [people.prompts(sets[name], tok, seq_len=seq_len) for name in gen_sets]
    width = max(int(p[0].shape[1]) for p in prompt_parts)
    px = np.concatenate([np.pad(p[0], ((0, 0), (0, width - p[0].shape[1])))
                         for p in prompt_parts])
    pl = np.concatenate([p[1] for p in prompt_parts]).astype(np.int64)
    gen = greedy_generate(apply, params, px, pl, max_new_tokens=int(max_new_tokens),
                          eos=tok.EOS, batch_size=batch_size)
    start = 0
    for name in gen_sets:
        k = len(sets[name])
        texts = [tok.decode(row).strip() for row in gen[start:start + k]]
        start += k
        targets = [t.strip() for t in _labelled_text(tok, part[f"{name}/answer"][1].y)]
        out[f"{name}_rouge"] = float(np.mean(rouge_l(targets, texts)["recall"]))
        out[f"{name}_samples"] = [{"question": q.question, "answer": a, "generation": g}
                                  for q, a, g in zip(sets[name][:3], targets, texts)]

    out["model_utility"] = model_utility([out["retain_prob"], out["retain_rouge"],
                                          out["retain_truth_ratio"], out["world_prob"],
                                          out["world_rouge"], out["world_truth_ratio"]])
    out["forget_quality"] = (None if retain_tr is None
                             else forget_quality(f_tr, np.asarray(retain_tr, np.float64)))

    fs, hs = part["forget/answer"][0], part["holdout/answer"][0]
    correct, keep = fw["correct"][fs], fw["keep"][fs]
    em = _em_from(correct, keep)
    out["exact_memorization"] = float(np.nanmean(em)) if np.any(np.isfinite(em)) else None
    out["extraction_strength"] = float(np.mean(_es_from(correct, keep)))

    f_texts = _labelled_text(tok, part["forget/answer"][1].y)
    h_texts = _labelled_text(tok, part["holdout/answer"][1].y)
    out["mia_loss_auc"] = auc(mia_loss(fw["avg_loss"][fs]), mia_loss(fw["avg_loss"][hs]))
    out["mia_zlib_auc"] = auc(mia_zlib(fw["avg_loss"][fs], f_texts),
                              mia_zlib(fw["avg_loss"][hs], h_texts))
    out["mia_min_k_auc"] = auc(_min_k_from(fw["lp"][fs].astype(np.float64), fw["keep"][fs], 0.4),
                               _min_k_from(fw["lp"][hs].astype(np.float64), fw["keep"][hs], 0.4))
    out["mia_min_k_plus_plus_auc"] = auc(
        _min_k_from(fw["z"][fs].astype(np.float64), fw["keep"][fs], 0.4),
        _min_k_from(fw["z"][hs].astype(np.float64), fw["keep"][hs], 0.4))
    ref = 0.5 if retain_auc is None else float(retain_auc)
    out["privleak"] = privleak(out["mia_min_k_auc"], ref)
    out["privleak_reference"] = "retain_auc" if retain_auc is not None else "0.5 (OU ref_value)"
    out.update({f"n_{name}": len(items) for name, items in sets.items()})
    out.update({f"n_perturbed_{name}": v for name, v in m.items()})
    return out
