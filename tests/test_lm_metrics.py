"""Tests of unlearn.lm_metrics, each against an independent computation: hand-worked literals,
numpy loops in float64, scipy, scikit-learn, Python-loop generation and per-example jax.grad."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import types
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

import unlearn
from unlearn import lm_metrics as lm
from unlearn.data import CHARLM_CHARS, CharTokenizer
from unlearn.models import transformer


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _random_logits_y(seed=0, n=4, t=7, v=6):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, t, v)).astype(np.float32) * 2
    y = rng.integers(0, v, size=(n, t)).astype(np.int32)
    y[0, :2] = -1          # prompt positions
    y[1, 5:] = -1          # padding
    y[2, [0, 3]] = -1      # non-contiguous labels
    return logits, y


# ----------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_worked_case():
    # target     the cat sat on the mat   (6 tokens)
    # prediction the cat is  on a   mat   (6 tokens)
    # LCS = the, cat, on, mat → 4 ; R = 4/6, P = 4/6, F = 4/6
    r = lm.rouge_l(["The cat sat on the mat."], ["the cat is on a mat"])
    assert r["recall"][0] == pytest.approx(4 / 6)
    assert r["precision"][0] == pytest.approx(4 / 6)
    assert r["f1"][0] == pytest.approx(4 / 6)
    # an empty prediction scores 0 (rouge-score's rule)
    assert lm.rouge_l(["a b"], [""])["recall"][0] == 0.0


def _lcs(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_rouge_l_equals_plain_python_lcs_without_stemmer():
    rng = np.random.default_rng(0)
    words = ["ada", "lives", "in", "brask", "red", "kite", "1947", "the", "of", "a"]
    seps = [" ", ", ", ". ", " - ", "  "]
    targets, preds = [], []
    for _ in range(40):
        mk = (lambda: "".join(str(rng.choice(words)) + str(rng.choice(seps))
                              for _ in range(rng.integers(1, 9))))
        targets.append(mk().upper() if rng.random() < 0.2 else mk())
        preds.append(mk())
    got = lm.rouge_l(targets, preds, use_stemmer=False)

    def tok(s):
        return re.sub(r"[^a-z0-9]+", " ", s.lower()).split()

    for i, (t, p) in enumerate(zip(targets, preds, strict=True)):
        tt, pp = tok(t), tok(p)
        lcs = _lcs(tt, pp)
        assert got["recall"][i] == pytest.approx(lcs / len(tt))
        assert got["precision"][i] == pytest.approx(lcs / len(pp))


def test_rouge_l_stemmer_matters_where_it_should():
    # stemmed: target [dog, run], prediction [the, dog, run, fast] → LCS 2: R = 1, P = 1/2;
    # unstemmed: [dogs, running] vs [the, dog, runs, fast] → LCS 0
    on = lm.rouge_l(["dogs running"], ["the dog runs fast"], use_stemmer=True)
    off = lm.rouge_l(["dogs running"], ["the dog runs fast"], use_stemmer=False)
    assert on["recall"][0] == 1.0 and on["precision"][0] == 0.5
    assert off["recall"][0] == 0.0
    # no word longer than 3 characters: the stemmer changes nothing
    a = lm.rouge_l(["the cat sat"], ["a cat sat"], use_stemmer=True)
    b = lm.rouge_l(["the cat sat"], ["a cat sat"], use_stemmer=False)
    assert a["f1"][0] == b["f1"][0] == pytest.approx(2 / 3)


def test_rouge_l_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        lm.rouge_l(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="not a string"):
        lm.rouge_l("abc", "abc")


# ----------------------------------------------------------------------------- NLL, logprobs


def test_sequence_nll_and_probability_match_numpy_loop():
    logits, y = _random_logits_y()
    nll, n = lm.sequence_nll(logits, y)
    lsm = _np_log_softmax(logits)
    for i in range(len(y)):
        s, c = 0.0, 0
        for t in range(y.shape[1]):
            if y[i, t] >= 0:
                s -= lsm[i, t, y[i, t]]
                c += 1
        assert n[i] == c
        assert nll[i] == pytest.approx(s, rel=1e-5)
        assert lm.avg_loss(logits, y)[i] == pytest.approx(s / c, rel=1e-5)
        assert lm.probability(logits, y)[i] == pytest.approx(math.exp(-s / c), rel=1e-5)


def test_token_logprobs_drops_exactly_the_last_labelled_position():
    logits, y = _random_logits_y(seed=1)
    lp, mask = lm.token_logprobs(logits, y)
    lsm = _np_log_softmax(logits)
    for i in range(len(y)):
        lab = np.flatnonzero(y[i] >= 0)
        expect = np.zeros(y.shape[1], bool)
        expect[lab[:-1]] = True
        np.testing.assert_array_equal(mask[i], expect)
        for t in lab[:-1]:
            assert lp[i, t] == pytest.approx(lsm[i, t, y[i, t]], rel=1e-5)
        assert np.all(lp[i, ~expect] == 0)


def test_avg_loss_refuses_rows_without_labels():
    logits, y = _random_logits_y()
    y[3] = -1
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        lm.avg_loss(logits, y)
    with pytest.raises(ValueError, match="vocabulary size"):
        lm.sequence_nll(logits, np.full_like(y, 99))
    with pytest.raises(ValueError, match="shape"):
        lm.sequence_nll(logits, y[:, :3])


# ----------------------------------------------------------------------------- truth ratio


def test_truth_ratio_literal_example():
    lc = [0.5, 1.0]
    lw = [[0.4, 0.8], [2.0, 1.0]]
    # item 1: mean wrong loss 0.6 → TR = Pw/Pc = e^{-0.6}/e^{-0.5} = e^{-0.1}
    # item 2: mean wrong loss 1.5 → TR = e^{-1.5}/e^{-1.0} = e^{-0.5}
    tr1, tr2 = math.exp(-0.1), math.exp(-0.5)
    agg, tr = lm.truth_ratio(lc, lw, "closer_to_1_better")
    np.testing.assert_allclose(tr, [tr1, tr2], rtol=1e-9)
    assert agg == pytest.approx((tr1 + tr2) / 2)          # both TR < 1: min(TR, 1/TR) = TR
    agg, _ = lm.truth_ratio(lc, lw, "true_better")
    assert agg == pytest.approx(((1 - tr1) + (1 - tr2)) / 2)
    agg, tr = lm.truth_ratio(lc, lw, "prob_mean")          # Pc/(Pc+Pw) = 1/(1+TR)
    np.testing.assert_allclose(tr, [1 / (1 + tr1), 1 / (1 + tr2)], rtol=1e-9)
    assert agg == pytest.approx((1 / (1 + tr1) + 1 / (1 + tr2)) / 2)
    # TR > 1 (wrong answers likelier): closer_to_1_better takes 1/TR, true_better clips at 0
    agg, tr = lm.truth_ratio([2.0], [[1.0, 1.0]], "closer_to_1_better")
    assert tr[0] == pytest.approx(math.e) and agg == pytest.approx(1 / math.e)
    assert lm.truth_ratio([2.0], [[1.0, 1.0]], "true_better")[0] == 0.0


def test_truth_ratio_equals_legacy_tofu_form():
    rng = np.random.default_rng(0)
    lc = rng.uniform(0.1, 3, 50)
    lw = rng.uniform(0.1, 3, (50, 5))
    stat = np.exp(lw.mean(1) - lc)  # legacy: P_c / P_w
    forget, _ = lm.truth_ratio(lc, lw, "closer_to_1_better")
    retain, _ = lm.truth_ratio(lc, lw, "true_better")
    assert forget == pytest.approx(np.mean(np.minimum(stat, 1 / stat)), rel=1e-8)
    assert retain == pytest.approx(np.mean(np.maximum(0, 1 - 1 / stat)), rel=1e-8)


def test_normalised_probability_literal_and_errors():
    # Pc = 1, P = 1/2, 1/4 → 1 / 1.75
    agg, per = lm.normalised_probability([0.0], [[math.log(2), math.log(4)]])
    assert per[0] == pytest.approx(1 / 1.75) and agg == pytest.approx(1 / 1.75)
    with pytest.raises(ValueError, match="aggregator"):
        lm.truth_ratio([1.0], [[1.0]], "mean")
    with pytest.raises(ValueError, match="avg_loss_perturbed"):
        lm.truth_ratio([1.0, 2.0], [[1.0]])


# ----------------------------------------------------------------------------- FQ, MU


def test_forget_quality_ks_and_monotone_invariance():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(0, 1, 40), rng.lognormal(0.5, 1, 40)
    fq = lm.forget_quality(a, b)
    assert fq == stats.ks_2samp(a, b).pvalue
    # the three truth-ratio forms are strictly monotone maps of each other
    assert lm.forget_quality(1 / a, 1 / b) == pytest.approx(fq)
    assert lm.forget_quality(1 / (1 + a), 1 / (1 + b)) == pytest.approx(fq)
    assert lm.forget_quality(np.log(a), np.log(b)) == pytest.approx(fq)
    # literals: identical samples → 1; fully separated 3 vs 3 → exact p = 2 / C(6, 3) = 0.1
    assert lm.forget_quality(a, a) == 1.0
    assert lm.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


def test_model_utility_hmean_and_zero_rule():
    v = [0.9, 0.5, 0.3, 0.7, 0.2, 0.6]
    assert lm.model_utility(v) == pytest.approx(stats.hmean(v))
    assert lm.model_utility(v) == pytest.approx(len(v) / sum(1 / x for x in v))
    assert lm.model_utility([0.9, 0.0, 0.5]) == 0.0
    with pytest.raises(ValueError, match="values"):
        lm.model_utility([0.5, -0.1])


# ----------------------------------------------------------------------------- MIAs


def test_min_k_plus_plus_hand_computed():
    # one sequence, 3 labelled positions (the last, the EOS, is dropped) → 2 scored positions
    p0 = np.array([0.5, 0.5, 0.0 + 1e-30])      # uniform over 2 tokens: σ² = 0 → floor 1e-6
    p1 = np.array([0.25, 0.75, 1e-30])
    p2 = np.array([0.1, 0.2, 0.7])
    logits = np.log(np.stack([p0, p1, p2]))[None].astype(np.float32)
    y = np.array([[0, 0, 2]], np.int32)
    # position 0: μ = log 0.5, z = (log 0.5 − log 0.5)/1e-3 = 0
    z0 = 0.0
    # position 1: μ = .25 log .25 + .75 log .75, σ² = .25 log²(.25) + .75 log²(.75) − μ²
    mu = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    var = 0.25 * math.log(0.25) ** 2 + 0.75 * math.log(0.75) ** 2 - mu**2
    z1 = (math.log(0.25) - mu) / math.sqrt(var)          # = −√3 (two-point distribution)
    assert z1 == pytest.approx(-math.sqrt(3))
    # k = 0.4: K = max(1, ⌊2·0.4⌋) = 1 → −min z; k = 1: K = 2 → −mean z
    assert lm.mia_min_k_plus_plus(logits, y, k=0.4)[0] == pytest.approx(-min(z0, z1), rel=1e-4)
    assert lm.mia_min_k_plus_plus(logits, y, k=1.0)[0] == pytest.approx(-(z0 + z1) / 2,
                                                                        rel=1e-4)


def test_min_k_matches_sorted_numpy():
    rng = np.random.default_rng(0)
    lp = -rng.exponential(size=(6, 12))
    mask = rng.random((6, 12)) < 0.7
    mask[5] = False
    for k in (0.2, 0.4, 1.0):
        got = lm.mia_min_k(lp, mask, k=k)
        for i in range(6):
            vals = np.sort(lp[i][mask[i]])
            if len(vals) == 0:
                assert got[i] == 0.0
                continue
            kk = max(1, int(len(vals) * k))
            assert got[i] == pytest.approx(-vals[:kk].mean())
    with pytest.raises(ValueError, match="k="):
        lm.mia_min_k(lp, mask, k=0.0)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 5, 30).astype(float)
    h = rng.integers(1, 6, 25).astype(float)
    labels = np.r_[np.zeros(30), np.ones(25)]
    assert lm.auc(f, h) == pytest.approx(roc_auc_score(labels, np.r_[f, h]))
    assert lm.auc([1.0, 2.0], [3.0, 4.0]) == 1.0        # holdout loss higher: forget memorised
    assert lm.auc([1.0, 1.0], [1.0, 1.0]) == 0.5        # all ties count ½


def test_privleak_literals_and_sign():
    assert lm.privleak(0.7, 0.7) == pytest.approx(0.0, abs=1e-6)
    # under-unlearning (forget still looks member-like, AUC 0.9 vs 0.5): negative
    assert lm.privleak(0.9, 0.5) == pytest.approx((0.1 - 0.5) / 0.5 * 100)
    # over-unlearning (AUC 0.4): positive
    assert lm.privleak(0.4, 0.5) == pytest.approx((0.6 - 0.5) / 0.5 * 100)


def test_zlib_loss_reference():
    import zlib

    a = np.array([1.0, 2.0])
    texts = ["ada lives in brask", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
    got = lm.mia_zlib(a, texts)
    assert got[1] == pytest.approx(2.0 / len(zlib.compress(texts[1].encode())))
    assert len(zlib.compress(texts[1].encode())) < len(texts[1])
    np.testing.assert_array_equal(lm.mia_loss(a), a)
    np.testing.assert_array_equal(lm.mia_reference(a, [0.5, 0.5]), [0.5, 1.5])


# ----------------------------------------------------------------------------- EM, ES


def _argmax_logits(pred, v=5):
    """Logits whose argmax at each position is ``pred`` (−1: token v−1)."""
    pred = np.asarray(pred)
    out = np.zeros(pred.shape + (v,), np.float32)
    np.put_along_axis(out, np.where(pred >= 0, pred, v - 1)[..., None], 5.0, -1)
    return out


def test_exact_memorization_and_extraction_strength_hand_made():
    # labels: prompt −1, then 3 scored tokens and a final EOS (=4) whose prediction is ignored
    y = np.array([[-1, 1, 2, 3, 4]] * 6 + [[-1, -1, -1, -1, 4]], np.int32)
    pred = np.array([
        [0, 1, 2, 3, 0],   # all 3 right (EOS predicted wrong: ignored) → EM 1, k*=0, ES 1
        [0, 0, 2, 3, 4],   # first wrong → EM 2/3, k*=1, ES 2/3
        [0, 0, 0, 3, 4],   # only the last right → EM 1/3, k*=2, ES 1/3
        [0, 0, 0, 0, 4],   # nothing right → EM 0; quirk: k* = n−1 = 2, ES 1/3 (paper: 0)
        [0, 1, 0, 3, 4],   # middle wrong → EM 2/3, k*=2, ES 1/3
        [0, 1, 2, 0, 4],   # last wrong → EM 2/3; no suffix matches → quirk ES 1/3
        [0, 0, 0, 0, 0],   # one labelled position: no scored position → EM NaN, ES 0
    ])
    logits = _argmax_logits(pred)
    em = lm.exact_memorization(logits, y)
    es = lm.extraction_strength(logits, y)
    np.testing.assert_allclose(em[:6], [1, 2 / 3, 1 / 3, 0, 2 / 3, 2 / 3])
    assert np.isnan(em[6])
    np.testing.assert_allclose(es, [1, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 0])


# ----------------------------------------------------------------------------- model-based


@pytest.fixture(scope="module")
def tiny_lm():
    model = transformer(11, width=16, depth=1, heads=2, max_len=16)
    x = np.random.default_rng(0).integers(3, 11, (5, 12)).astype(np.int32)
    params = model.init(jax.random.key(0), x)
    return model, params


def test_greedy_generate_matches_python_loop(tiny_lm):
    model, params = tiny_lm
    rng = np.random.default_rng(1)
    lengths = np.array([3, 5, 1, 4, 6])
    x = np.zeros((5, 8), np.int32)
    for i, n in enumerate(lengths):
        x[i, :n] = rng.integers(3, 11, n)
    steps = 6
    fwd = jax.jit(model.apply)
    # eos = the first token row 0 generates, so row 0 stops at once and others maybe later
    first = np.asarray(model.apply(params, jnp.asarray(x)))[0, lengths[0] - 1].argmax()
    eos = int(first)
    got = lm.greedy_generate(model.apply, params, x, lengths, max_new_tokens=steps, eos=eos,
                             batch_size=2)
    expect = np.full((5, steps), -1)
    for i in range(5):
        seq = list(x[i, :lengths[i]])
        for k in range(steps):
            buf = np.zeros((1, 16), np.int32)
            buf[0, :len(seq)] = seq
            nxt = int(np.asarray(fwd(params, jnp.asarray(buf)))[0, len(seq) - 1].argmax())
            expect[i, k] = nxt
            seq.append(nxt)
            if nxt == eos:
                break
    np.testing.assert_array_equal(got, expect)
    assert got[0, 0] == eos and np.all(got[0, 1:] == -1)
    with pytest.raises(ValueError, match="max_len=16"):
        lm.greedy_generate(model.apply, params, x, lengths, max_new_tokens=12, eos=eos,
                           max_len=16)


def test_gradnorm_matches_per_example_grad_loop(tiny_lm):
    model, params = tiny_lm
    rng = np.random.default_rng(2)
    x = rng.integers(3, 11, (3, 10)).astype(np.int32)
    y = rng.integers(3, 11, (3, 10)).astype(np.int32)
    y[0, :4] = -1
    y[1, 7:] = -1

    @jax.jit
    def ref_grad(prm, xi, yi, keep):
        def loss(q):
            logp = jax.nn.log_softmax(model.apply(q, xi[None])[0], -1)
            lp = logp[jnp.arange(len(yi)), jnp.maximum(yi, 0)]
            return -jnp.sum(jnp.where(keep, lp, 0.0)) / jnp.sum(keep)
        return jax.grad(loss)(prm)

    grads = []
    for i in range(3):
        keep = np.zeros(x.shape[1], bool)
        keep[np.flatnonzero(y[i] >= 0)[:-1]] = True   # §1.3: every labelled but the last
        g = ref_grad(params, jnp.asarray(x[i]), jnp.asarray(y[i]), jnp.asarray(keep))
        grads.append([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(g)])
    for p in (1, 2, np.inf):
        got = lm.mia_gradnorm(model.apply, params, x, y, p=p, batch_size=2)
        for i in range(3):
            expect = np.mean([np.linalg.norm(g, ord=p) for g in grads[i]])
            assert got[i] == pytest.approx(expect, rel=1e-4)


# ----------------------------------------------------------------------------- evaluate_tofu


@dataclass(frozen=True)
class _QA:
    id: str
    person: str
    question: str
    answer: str
    paraphrase: str
    perturbed: tuple


def _fake_people(tok):
    """A stand-in for unlearn.people with the documented encode/prompts semantics."""

    def prompt(q):
        return f"q {q.question}? a "

    def text(q, i, answer):
        if answer == "answer":
            return q.answer
        if answer == "paraphrase":
            return q.paraphrase
        return q.perturbed[answer[1]]

    def encode(items, tok, *, seq_len, answer="answer"):
        x = np.zeros((len(items), seq_len), np.int32)
        y = np.full((len(items), seq_len), -1, np.int32)
        for i, q in enumerate(items):
            p = tok.encode(prompt(q), bos=True)
            a = tok.encode(text(q, i, answer), eos=True)
            seq = np.concatenate([p, a])
            assert len(seq) - 1 <= seq_len
            x[i, :len(seq) - 1] = seq[:-1]
            y[i, len(p) - 1:len(seq) - 1] = a
        return types.SimpleNamespace(x=x, y=y)

    def prompts(items, tok, *, seq_len):
        x = np.zeros((len(items), seq_len), np.int32)
        lengths = np.zeros(len(items), np.int64)
        for i, q in enumerate(items):
            p = tok.encode(prompt(q), bos=True)
            x[i, :len(p)] = p
            lengths[i] = len(p)
        return x, lengths

    return types.SimpleNamespace(encode=encode, prompts=prompts, prompt=prompt)


def _fake_bench():
    towns = ["brask", "doln", "elvar", "morrow", "quill", "tarn", "uffo", "vesk"]
    rng = np.random.default_rng(3)
    splits: dict[str, list] = {}

    def person_items(pid, name, n_pert):
        out = []
        for j, attr in enumerate(["lives in", "works in", "was born in"]):
            town = towns[rng.integers(len(towns))]
            others = [t for t in towns if t != town][:n_pert]
            out.append(_QA(f"{pid}/q{j}", pid, f"where {name} {attr}",
                           f"{name} {attr} {town}", f"in {town} {name} {attr}",
                           tuple(f"{name} {attr} {o}" for o in others)))
        return out

    splits["forget05"] = person_items("p0", "ada", 5) + person_items("p1", "bram", 5)
    splits["retain_eval"] = person_items("p2", "cleo", 5) + person_items("p3", "dov", 5)
    splits["holdout05"] = person_items("h0", "esme", 5) + person_items("h1", "fenn", 5)
    splits["world"] = [_QA(f"w{j}", "world", f"capital of land{j}", f"the capital is {t}",
                           f"the capital is {t}", tuple(o for o in towns if o != t)[:3])
                       for j, t in enumerate(towns[:5])]

    class Bench:
        def items(self, split):
            return list(splits[split])

    return Bench(), splits


def _bigram_model(tok, texts):
    """A real (if tiny) language model: add-0.1 bigram log-probabilities fitted on ``texts``;
    ``apply(params, x)[t]`` depends on ``x[t]`` only, so it is causal."""
    v = len(tok)
    counts = np.full((v, v), 0.1)
    for s in texts:
        ids = tok.encode(s, bos=True, eos=True)
        for a, b in zip(ids[:-1], ids[1:], strict=True):
            counts[a, b] += 1
    table = np.log(counts / counts.sum(1, keepdims=True)).astype(np.float32)

    def apply(params, x):
        return params["w"][x]

    return apply, {"w": jnp.asarray(table)}, table


def test_evaluate_tofu_glue_against_direct_computation(monkeypatch):
    tok = CharTokenizer(chars=CHARLM_CHARS + "?")
    fake = _fake_people(tok)
    monkeypatch.setitem(sys.modules, "unlearn.people", fake)
    monkeypatch.setattr(unlearn, "people", fake, raising=False)
    bench, splits = _fake_bench()
    trained = splits["forget05"] + splits["retain_eval"] + splits["world"]
    apply, params, table = _bigram_model(tok, [fake.prompt(q) + q.answer for q in trained])
    seq_len, new = 64, 24
    res = lm.evaluate_tofu(apply, params, bench, "forget05", tok, seq_len=seq_len,
                           max_new_tokens=new, batch_size=7)

    def losses(items, answer="answer"):
        d = fake.encode(items, tok, seq_len=seq_len, answer=answer)
        return lm.avg_loss(table[d.x], d.y), d   # the model's logits, computed in numpy

    f_ans, f_d = losses(splits["forget05"])
    assert res["forget_prob"] == pytest.approx(np.mean(np.exp(-f_ans)), rel=1e-6)
    f_par, _ = losses(splits["forget05"], "paraphrase")
    f_w = np.stack([losses(splits["forget05"], ("perturbed", j))[0] for j in range(5)], 1)
    agg, tr = lm.truth_ratio(f_par, f_w, "closer_to_1_better")
    assert res["forget_truth_ratio"] == pytest.approx(agg, rel=1e-6)
    np.testing.assert_allclose(res["forget_tr"], tr, rtol=1e-6)
    w_ans, _ = losses(splits["world"])
    w_w = np.stack([losses(splits["world"], ("perturbed", j))[0] for j in range(3)], 1)
    assert res["world_prob"] == pytest.approx(lm.normalised_probability(w_ans, w_w)[0], rel=1e-6)

    # ROUGE from a Python-loop greedy decoding of the forget prompts
    gens = []
    for q in splits["forget05"]:
        seq = list(tok.encode(fake.prompt(q), bos=True))
        out = []
        for _ in range(new):
            nxt = int(table[seq[-1]].argmax())   # the bigram model's last-position logits
            if nxt == tok.EOS:
                break
            out.append(nxt)
            seq.append(nxt)
        gens.append(tok.decode(out).strip())
    rouge = lm.rouge_l([q.answer for q in splits["forget05"]], gens)["recall"].mean()
    assert res["forget_rouge"] == pytest.approx(rouge)
    assert res["forget_rouge"] > 0     # the comparison is between non-empty generations
    assert [d["generation"] for d in res["forget_samples"]] == gens[:3]

    # MIA AUCs vs scikit-learn on directly computed scores
    h_ans, h_d = losses(splits["holdout05"])
    labels = np.r_[np.zeros(len(f_ans)), np.ones(len(h_ans))]
    assert res["mia_loss_auc"] == pytest.approx(roc_auc_score(labels, np.r_[f_ans, h_ans]))
    lp_f, m_f = lm.token_logprobs(table[f_d.x], f_d.y)
    lp_h, m_h = lm.token_logprobs(table[h_d.x], h_d.y)
    mk = np.r_[lm.mia_min_k(lp_f, m_f), lm.mia_min_k(lp_h, m_h)]
    assert res["mia_min_k_auc"] == pytest.approx(roc_auc_score(labels, mk))
    assert res["privleak"] == pytest.approx(lm.privleak(res["mia_min_k_auc"], 0.5))
    es = lm.extraction_strength(table[f_d.x], f_d.y)
    assert res["extraction_strength"] == pytest.approx(es.mean())

    util = [res[k] for k in ("retain_prob", "retain_rouge", "retain_truth_ratio", "world_prob",
                             "world_rouge", "world_truth_ratio")]
    assert res["model_utility"] == pytest.approx(lm.model_utility(util))
    assert res["forget_quality"] is None
    assert (res["n_forget"], res["n_holdout"], res["n_world"]) == (6, 6, 5)

    again = lm.evaluate_tofu(apply, params, bench, "forget05", tok, seq_len=seq_len,
                             max_new_tokens=new, retain_tr=res["forget_tr"], retain_auc=0.6,
                             batch_size=7)
    assert again["forget_quality"] == 1.0                     # same sample → p = 1
    alt = lm.evaluate_tofu(apply, params, bench, "forget05", tok, seq_len=seq_len,
                           max_new_tokens=new, batch_size=7, truth_ratio_correct="answer")
    assert alt["forget_truth_ratio"] == pytest.approx(
        lm.truth_ratio(f_ans, f_w, "closer_to_1_better")[0], rel=1e-6)
    assert alt["forget_prob"] == pytest.approx(res["forget_prob"], rel=1e-6)
    assert again["privleak"] == pytest.approx(lm.privleak(res["mia_min_k_auc"], 0.6))
    with pytest.raises(ValueError, match="forget_split"):
        lm.evaluate_tofu(apply, params, bench, "forget50", tok, seq_len=seq_len,
                         max_new_tokens=new)
    with pytest.raises(ValueError, match="retain_tr"):
        lm.evaluate_tofu(apply, params, bench, "forget05", tok, seq_len=seq_len,
                         max_new_tokens=new, retain_tr=[1.0, 2.0])


@pytest.mark.skipif(importlib.util.find_spec("unlearn.people") is None,
                    reason="unlearn.people (the benchmark generator) is not in the tree yet")
def test_evaluate_tofu_end_to_end_on_people():
    from unlearn import people

    bench = people.generate(persons=20, facts=3, world=6, seed=0)
    tok = people.tokenizer()
    seq_len = max(len(people.prompt(q)) + max(len(a) for a in (q.answer, q.paraphrase,
                                                                 *q.perturbed)) + 1
                  for q in bench.qa)
    plen = max(len(people.prompt(q)) + 1 for q in bench.qa)
    new = 16
    model = transformer(len(tok), width=16, depth=1, heads=2, max_len=max(seq_len, plen + new))
    params = model.init(jax.random.key(0), np.zeros((1, seq_len), np.int32))
    res = lm.evaluate_tofu(model.apply, params, bench, "forget10", tok, seq_len=seq_len,
                           max_new_tokens=new)
    assert res["n_forget"] == len(bench.items("forget10"))
    for k in ("forget_prob", "retain_prob", "world_prob", "mia_loss_auc", "mia_min_k_auc",
              "extraction_strength"):
        assert 0.0 <= res[k] <= 1.0, k
    # the batched pass agrees with a direct one on people.encode's sequences
    d = people.encode(bench.items("forget10"), tok, seq_len=seq_len)
    direct = lm.probability(np.asarray(jax.jit(model.apply)(params, d.x)), d.y)
    assert res["forget_prob"] == pytest.approx(direct.mean(), rel=1e-5)
    # an untrained model: a per-token probability near 1/vocab
    assert res["forget_prob"] < 5.0 / len(tok)
