"""The seeded fictitious-people QA benchmark (unlearn/people.py): reproducibility (a recorded
digest, another hash seed in a subprocess), the split rules checked with set algebra and
hand-computed sizes, perturbed answers checked word by word against the person's recorded
fact (sums against integer arithmetic), and the label layout of ``encode`` checked by decoding
the labelled positions back to ``answer + <eos>``."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unlearn import people

ROOT = Path(__file__).resolve().parent.parent

# recorded from generate() at the commit that introduced it; a change means the corpus changed
DEFAULT_DIGEST = "0a80385d1a990a81965fa9cc3952270b4273013c6b44ab5454f5dec4ce63c5d4"


@pytest.fixture(scope="module")
def bench():
    return people.generate()


@pytest.fixture(scope="module")
def small():
    # 37 persons: forget01/05/10 = ceil(0.37), ceil(1.85), ceil(3.7) = 1, 2, 4 persons
    return people.generate(persons=37, facts=6, world=9, seed=3)


def _words(text):
    return text.split(" ")


def test_digest_is_recorded_and_content_sensitive(bench):
    assert bench.digest() == DEFAULT_DIGEST
    assert people.generate().digest() == DEFAULT_DIGEST  # same call, same corpus
    # one character of one answer changes the digest
    qa = list(bench.qa)
    qa[5] = dataclasses.replace(qa[5], answer=qa[5].answer[:-1] + "!")
    assert dataclasses.replace(bench, qa=tuple(qa)).digest() != DEFAULT_DIGEST


def test_digest_independent_of_python_hash_seed():
    code = "from unlearn import people; print(people.generate().digest())"
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, text=True,
                         capture_output=True, timeout=120, check=True)
    assert out.stdout.strip() == DEFAULT_DIGEST


def test_different_seeds_give_different_corpora(bench):
    other = people.generate(seed=1)
    assert other.digest() != bench.digest()
    assert [p.name for p in other.persons] != [p.name for p in bench.persons]
    assert [q.answer for q in other.qa] != [q.answer for q in bench.qa]


@pytest.mark.parametrize("fixture, n, facts, world, sizes", [
    ("bench", 100, 10, 40, (1, 5, 10)),
    ("small", 37, 6, 9, (1, 2, 4)),
])
def test_splits_partition(request, fixture, n, facts, world, sizes):
    b = request.getfixturevalue(fixture)
    s = {k: set(v) for k, v in b.splits.items()}
    assert sorted(b.splits) == sorted(people.SPLITS)
    for k, v in b.splits.items():
        assert list(v) == sorted(v) and len(v) == len(set(v)), k
    seed = b.seed
    person = {q.id: q.person for q in b.qa}
    trained = {f"people/{seed}/p{k}" for k in range(n)}
    assert len(s["full"]) == n * facts
    assert {person[i] for i in s["full"]} == trained
    assert len(s["world"]) == world and {person[i] for i in s["world"]} == {"world"}
    for tag, m in zip(("01", "05", "10"), sizes):
        forget, retain = s[f"forget{tag}"], s[f"retain{100 - int(tag)}"]
        # the last m trained persons, all their facts
        assert {person[i] for i in forget} == {f"people/{seed}/p{k}" for k in range(n - m, n)}
        assert len(forget) == m * facts
        assert forget < s["full"] and retain == s["full"] - forget
        # holdout: m persons beyond the trained ones
        hold = s[f"holdout{tag}"]
        assert {person[i] for i in hold} == {f"people/{seed}/p{k}" for k in range(n, n + m)}
        assert len(hold) == m * facts and not {person[i] for i in hold} & trained
    assert s["forget01"] < s["forget05"] < s["forget10"] or n < 20
    assert s["forget01"] <= s["forget05"] <= s["forget10"]
    assert s["holdout01"] <= s["holdout05"] <= s["holdout10"]
    assert s["retain_eval"] <= s["retain90"] and len(s["retain_eval"]) == len(s["forget10"])
    # every QA is in exactly one of full / holdout10 / world
    everything = [i for k in ("full", "holdout10", "world") for i in b.splits[k]]
    assert sorted(everything) == sorted(q.id for q in b.qa)
    assert len(b.persons) == n + sizes[2]
    names = [p.name for p in b.persons]
    assert len(set(names)) == len(names)
    for q in b.qa:
        assert re.fullmatch(rf"people/{seed}/(p\d+/q\d+|w\d+)", q.id), q.id
    assert {q.person for q in b.items("forget10")} == set(
        b.person_of(list(b.splits["forget10"])).tolist())


def test_perturbed_answers_share_the_answer_template(bench, small):
    capitals = {h + t for h in people.CAPITAL_HEADS for t in people.CAPITAL_TAILS}
    for b in (bench, small):
        persons = {p.id: p for p in b.persons}
        for q in b.qa:
            world = q.person == "world"
            assert len(q.perturbed) == (3 if world else 5), q.id
            assert len(set(q.perturbed)) == len(q.perturbed) and q.answer not in q.perturbed
            assert q.paraphrase != q.answer
            aw = _words(q.answer)
            true_words = set()
            for p in q.perturbed:
                pw = _words(p)
                assert len(pw) == len(aw), (q.answer, p)
                diff = [i for i, (u, v) in enumerate(zip(aw, pw)) if u != v]
                assert len(diff) == 1, (q.answer, p)
                true_words.add(aw[diff[0]].rstrip("."))
                wrong = pw[diff[0]].rstrip(".")
                if world and "plus" in aw:
                    a, b_, c = int(aw[0]), int(aw[2]), int(aw[4].rstrip("."))
                    assert aw[1] == "plus" and c == a + b_ and int(wrong) != a + b_
                elif world:
                    assert wrong in capitals
                else:
                    j = int(q.id.rsplit("/q", 1)[1])
                    assert wrong in people.ATTRIBUTES[j].values
            assert len(true_words) == 1  # one fact slot
            (value,) = true_words
            if not world:
                person = persons[q.person]
                j = int(q.id.rsplit("/q", 1)[1])
                assert person.attributes[j] == (people.ATTRIBUTES[j].name, value)
                assert person.name in q.question and person.name in q.paraphrase
            assert value in re.findall(r"[a-z0-9]+", q.paraphrase)


def test_person_facts_do_not_depend_on_persons_or_facts():
    a = people.generate(persons=20, facts=10, world=4, seed=7)
    b = people.generate(persons=30, facts=5, world=2, seed=7)
    for pa, pb in zip(a.persons[:20], b.persons[:20]):
        assert pa.name == pb.name and pa.attributes[:5] == pb.attributes
    qa_b = {q.id: q for q in b.qa}
    for q in a.qa:
        if q.id in qa_b:
            assert qa_b[q.id] == q
    assert len(qa_b) == 33 * 5 + 2


def test_tokenizer_encodes_every_text(bench, small):
    tok = people.tokenizer()
    assert len(tok) == 3 + len(set(tok.chars)) == 45
    texts = list(people.IDK)
    assert len(people.IDK) >= 10 and len(set(people.IDK)) == len(people.IDK)
    for b in (bench, small, people.generate(seed=11, facts=12, world=96)):
        for q in b.qa:
            texts += [people.prompt(q), q.answer, q.paraphrase, *q.perturbed]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t


ANSWER_SPECS = ["answer", "paraphrase", ("perturbed", 0), ("perturbed", 2), "idk"]


@pytest.mark.parametrize("spec", ANSWER_SPECS)
def test_encode_labels_exactly_answer_and_eos(small, spec):
    tok = people.tokenizer()
    items = small.items("forget10") + small.items("world") + small.items("retain_eval")
    if spec == "idk":
        texts = [people.IDK[i % len(people.IDK)] for i in range(len(items))]
        spec_arg, suffix = texts, "#alt"
    else:
        texts = [getattr(q, spec) if isinstance(spec, str) else q.perturbed[spec[1]]
                 for q in items]
        spec_arg = spec
        suffix = ("" if spec == "answer" else "#paraphrase" if spec == "paraphrase"
                  else f"#perturbed{spec[1]}")
    ds = people.encode(items, tok, seq_len=90, answer=spec_arg)
    assert ds.targets == "tokens" and ds.num_classes == len(tok) and ds.name == "people"
    assert ds.ids.tolist() == [q.id + suffix for q in items]
    assert ds.x.shape == ds.y.shape == (len(items), 90)
    for i, (q, text) in enumerate(zip(items, texts)):
        lab = np.flatnonzero(ds.y[i] >= 0)
        assert tok.decode(ds.y[i, lab], keep_special=True) == text + "<eos>"
        # contiguous, starting at the logits of the last prompt character
        assert lab.tolist() == list(range(len(people.prompt(q)), len(people.prompt(q))
                                          + len(text) + 1))
        n = len(people.prompt(q)) + len(text) + 1  # <bos> prompt answer (eos not input)
        assert tok.decode(ds.x[i, :n], keep_special=True) == "<bos>" + people.prompt(q) + text
        assert (ds.x[i, n:] == tok.PAD).all() and (ds.y[i, n:] == -1).all()
        assert (ds.y[i, lab[:-1]] == ds.x[i, lab[:-1] + 1]).all()  # next-token shift


def test_prompts_match_encode(small):
    tok = people.tokenizer()
    items = small.items("holdout05") + small.items("world")
    x, lengths = people.prompts(items, tok, seq_len=60)
    full = people.encode(items, tok, seq_len=90)
    for i, q in enumerate(items):
        assert lengths[i] == len(people.prompt(q)) + 1
        assert tok.decode(x[i], keep_special=True).replace("<pad>", "") == (
            "<bos>" + people.prompt(q))
        assert (x[i, : lengths[i]] == full.x[i, : lengths[i]]).all()
        assert full.y[i, lengths[i] - 1] >= 0 and (full.y[i, : lengths[i] - 1] < 0).all()


def test_training_set_and_stats(bench):
    tok = people.tokenizer()
    st = people.stats(bench, tok)
    ds = people.training_set(bench, tok, seq_len=st["seq_len_train"])
    expected = [q.id for q in bench.qa if q.person == "world" or q.id in
                set(bench.splits["full"])]
    assert ds.ids.tolist() == expected and len(ds) == 100 * 10 + 40
    assert st["persons"] == 100 and st["holdout_persons"] == 10 and st["facts"] == 10
    assert st["world"] == 40 and st["vocab"] == 45 and st["train_sequences"] == len(ds)
    assert st["qa"] == {k: len(v) for k, v in bench.splits.items()}
    assert st["train_labelled_tokens"] == int((ds.y >= 0).sum())
    assert st["train_tokens"] == int((ds.x != tok.PAD).sum()) + len(ds)  # + the final <eos>
    with pytest.raises(ValueError, match=rf"seq_len >= {st['seq_len_train']}"):
        people.training_set(bench, tok, seq_len=st["seq_len_train"] - 1)
    for spec in ("answer", "paraphrase", *(("perturbed", j) for j in range(3))):
        people.encode(bench.qa, tok, seq_len=st["seq_len_all"], answer=spec)
    longest = max(people.IDK, key=len)
    people.encode(bench.qa, tok, seq_len=st["seq_len_all"], answer=[longest] * len(bench.qa))
    _, lengths = people.prompts(bench.qa, tok, seq_len=st["seq_len_all"])
    assert st["max_prompt_len"] == lengths.max()
    # the default corpus stays short enough for a small char model
    assert st["seq_len_all"] <= 96
    # the retain oracle's data: the same rows minus the forget persons
    rest = ds.without(list(bench.splits["forget10"]))
    assert set(bench.person_of(rest.ids).tolist()).isdisjoint(
        {q.person for q in bench.items("forget10")})


def test_person_of(bench):
    ids = [bench.splits["forget01"][0], bench.splits["world"][0],
           bench.splits["forget01"][0] + "#perturbed3"]
    out = bench.person_of(ids)
    last = f"people/0/p{99}"
    assert out.tolist() == [last, "world", last]
    with pytest.raises(ValueError, match="qa_ids"):
        bench.person_of(["people/0/p999/q0"])


def test_bad_inputs(bench):
    tok = people.tokenizer()
    with pytest.raises(ValueError, match=r"split='nope'.*forget10"):
        bench.items("nope")
    with pytest.raises(ValueError, match="persons=9"):
        people.generate(persons=9)
    with pytest.raises(ValueError, match="persons=True"):
        people.generate(persons=True)
    with pytest.raises(ValueError, match="facts=0"):
        people.generate(facts=0)
    with pytest.raises(ValueError, match="facts=13"):
        people.generate(facts=len(people.ATTRIBUTES) + 1)
    with pytest.raises(ValueError, match="world=97"):
        people.generate(world=people.max_world() + 1)
    with pytest.raises(ValueError, match="seed=-1"):
        people.generate(seed=-1)
    with pytest.raises(ValueError, match="persons=900"):
        people.generate(persons=900)
    q = bench.items("forget01")[0]
    need = len(people.prompt(q)) + len(q.answer) + 1
    with pytest.raises(ValueError, match=rf"seq_len={need - 1}.*{q.id}.*seq_len >= {need}"):
        people.encode([q], tok, seq_len=need - 1)
    assert people.encode([q], tok, seq_len=need).x.shape == (1, need)
    with pytest.raises(ValueError, match="seq_len"):
        people.prompts([q], tok, seq_len=len(people.prompt(q)) + 1)
    w = bench.items("world")[0]
    with pytest.raises(ValueError, match=r"answer=\('perturbed', 3\).*w0"):
        people.encode([q, w], tok, seq_len=90, answer=("perturbed", 3))
    with pytest.raises(ValueError, match=r"answer=\('perturbed', 5\)"):
        people.encode([q], tok, seq_len=90, answer=("perturbed", 5))
    for bad in ("bogus", ("perturbed", "0"), ("perturbed",), 3, None):
        with pytest.raises(ValueError, match="answer="):
            people.encode([q], tok, seq_len=90, answer=bad)
    with pytest.raises(ValueError, match="answer has 2 strings for 1 items"):
        people.encode([q], tok, seq_len=90, answer=["a", "b"])
    with pytest.raises(ValueError, match="items is empty"):
        people.encode([], tok, seq_len=90)
    with pytest.raises(ValueError, match="outside the tokenizer"):
        people.encode([q], tok, seq_len=90, answer=["ALL CAPS"])


def test_data_load_people_is_the_training_set_and_the_holdout_persons():
    """``data.load("people")`` = the training set (train) and the holdout persons' QA (test),
    built by the people module's own functions at the corpus' longest sequence length."""
    from unlearn import data

    s = data.load("people", persons=12, facts=3, world=5, seed=2)
    bench = people.generate(persons=12, facts=3, world=5, seed=2)
    tok = people.tokenizer()
    seq_len = people.stats(bench, tok)["seq_len_all"]
    want = people.training_set(bench, tok, seq_len=seq_len)
    np.testing.assert_array_equal(s.train.x, want.x)
    np.testing.assert_array_equal(s.train.ids, want.ids)
    assert list(s.test.ids) == list(bench.splits["holdout10"])
    assert not set(s.test.ids) & set(s.train.ids)
    assert s.train.targets == s.test.targets == "tokens"
