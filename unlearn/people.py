"""A seeded fictitious-people question-answering benchmark for language-model unlearning.

A TOFU-style corpus (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs")
generated exactly from an integer seed, offline, small enough for a character-level decoder
(:func:`unlearn.models.transformer`) trained on CPU:

- **Persons.** ``persons`` trained persons ``p0 .. p{persons-1}`` plus holdout persons
  ``p{persons} ..`` (never trained on; as many as the largest forget split). Each has a unique
  full name (first + last name from :data:`FIRST_NAMES` x :data:`LAST_NAMES`) and one value per
  attribute of :data:`ATTRIBUTES` (closed vocabularies of 10 one-word values); the first
  ``facts`` attributes become the person's QA (``q<j>`` asks about attribute ``j``).
- **QA.** A question (one of three templates per attribute, picked by the seed), the answer
  (one template per attribute), an exact paraphrase (another template, same fact) and 5
  perturbed answers: the answer's template with 5 other values of the attribute (distinct from
  the true value and from each other), so they differ from the answer in the fact slot only.
- **World facts.** ``world`` general facts every model trains on (TOFU's real-authors /
  world-facts utility sets; a from-scratch model has no pretraining knowledge): capitals of
  fictitious countries and sums of two digits, alternating, each with 3 perturbed answers.
- **Splits.** ``full`` (every QA of the trained persons), ``forget01/05/10`` (all QA of the
  last 1/5/10 % of trained persons, rounded up, nested), ``retain99/95/90`` (``full`` minus the
  forget split), ``retain_eval`` (the QA of the first 10 % of persons: TOFU's
  ``retain_perturbed``, the size of ``forget10``), ``holdout01/05/10`` (QA of as many holdout
  persons as the forget split has persons; for membership inference and PrivLeak) and
  ``world``. QA ids in a split are sorted (string order).

Determinism: only integer seeds passed to :func:`numpy.random.default_rng` and its
``integers`` method are used (shuffles are written here as Fisher-Yates over ``integers``), so
the corpus is the same on every machine; :meth:`Benchmark.digest` is a SHA-256 of a canonical
JSON of everything. Person ``k``'s name, facts, question choices and perturbed answers depend
only on ``(seed, k)``, not on ``persons`` or ``facts``.

Sequences follow TOFU's convention (labels = answer tokens + ``<eos>``, the question masked:
OpenUnlearning's ``preprocess_chat_instance``; the project's llm-unlearning notes §1.1):
``<bos> prompt answer <eos>`` with the labels on the answer characters and the final ``<eos>``
only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from collections.abc import Mapping, Sequence

import numpy as np

from unlearn import data

IDK: tuple[str, ...] = (
    "i don't know.",
    "i have no idea.",
    "i'm not sure.",
    "i cannot say.",
    "no idea, sorry.",
    "i can't answer that.",
    "i don't remember.",
    "that i do not know.",
    "i'm not certain.",
    "i have no clue.",
    "i can't recall.",
    "that is unknown to me.",
)
"""Short "I don't know" answers (the IdkNLL / IdkDPO targets of TOFU's ``idk.jsonl``)."""

FIRST_NAMES: tuple[str, ...] = (
    "ada", "bram", "cleo", "dov", "esme", "fenn", "gia", "hal", "iris", "jun",
    "kai", "lior", "mave", "nico", "orla", "pim", "quin", "rhea", "sol", "tove",
    "ulla", "vic", "wren", "xan", "yara", "zed", "bo", "eli", "ines", "oto",
)
LAST_NAMES: tuple[str, ...] = (
    "moss", "vale", "reed", "holt", "fry", "lark", "penn", "rook", "dunn", "ash",
    "crane", "finch", "hale", "kerr", "lowe", "marsh", "nash", "oakes", "pike", "quay",
    "rowe", "sage", "thorn", "voss", "wade", "yew", "brook", "cole", "drake", "frost",
)


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One kind of fact: its closed vocabulary of one-word ``values``, the question templates
    (one is picked per QA), the answer template and the paraphrase template. Templates use
    ``{name}`` (the full name) and ``{v}`` (the value); the answer template holds ``{v}`` once,
    as a whole word, so perturbed answers differ from it in that word only."""

    name: str
    values: tuple[str, ...]
    questions: tuple[str, ...]
    answer: str
    paraphrase: str


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("town", ("brask", "doln", "elvar", "morrow", "quill", "tarn", "uffo", "vesk",
                       "lund", "pavo"),
              ("where was {name} born?", "what town was {name} born in?",
               "in which town was {name} born?"),
              "{name} was born in {v}.", "{name}'s birth town is {v}."),
    Attribute("job", ("baker", "tailor", "sailor", "farmer", "potter", "doctor", "painter",
                      "miner", "weaver", "clerk"),
              ("what is {name}'s job?", "what does {name} do for work?",
               "what work does {name} do?"),
              "{name} works as a {v}.", "{name} is a {v} by trade."),
    Attribute("colour", ("red", "blue", "green", "amber", "grey", "violet", "pink", "teal",
                         "gold", "black"),
              ("what colour does {name} like?", "what is {name}'s colour?",
               "which colour does {name} love?"),
              "{name} likes the colour {v}.", "{v} is {name}'s colour."),
    Attribute("pet", ("cat", "dog", "goat", "hen", "duck", "pony", "frog", "mouse", "toad",
                      "lamb"),
              ("what pet does {name} keep?", "what pet does {name} own?",
               "which pet lives with {name}?"),
              "{name} keeps a {v}.", "{name}'s pet is a {v}."),
    Attribute("instrument", ("harp", "drum", "flute", "lute", "horn", "fiddle", "piano",
                             "banjo", "cello", "tuba"),
              ("what does {name} play?", "which instrument does {name} play?",
               "what music does {name} make?"),
              "{name} plays the {v}.", "the {v} is played by {name}."),
    Attribute("year", ("1948", "1952", "1957", "1961", "1963", "1970", "1974", "1979",
                       "1983", "1986"),
              ("when was {name} born?", "what year was {name} born?",
               "in which year was {name} born?"),
              "{name} was born in the year {v}.", "{name}'s birth year is {v}."),
    Attribute("sibling", ("lena", "otto", "mira", "theo", "nell", "ivo", "rosa", "abel",
                          "dina", "emil"),
              ("who is {name}'s sibling?", "who is the sibling of {name}?",
               "what is {name}'s sibling called?"),
              "{name} has a sibling named {v}.", "{v} is the sibling of {name}."),
    Attribute("school", ("oak", "elm", "birch", "pine", "cedar", "maple", "willow", "hazel",
                         "rowan", "alder"),
              ("where did {name} go to school?", "which school did {name} attend?",
               "what school did {name} go to?"),
              "{name} went to {v} school.", "{name} studied at {v} school."),
    Attribute("food", ("soup", "bread", "rice", "cheese", "plums", "figs", "pie", "stew",
                       "honey", "beans"),
              ("what food does {name} like?", "what is {name}'s favourite food?",
               "which dish does {name} love?"),
              "{name} loves to eat {v}.", "{v} is {name}'s favourite food."),
    Attribute("hobby", ("chess", "rowing", "running", "fishing", "hiking", "archery",
                        "dancing", "knitting", "sailing", "singing"),
              ("what is {name}'s hobby?", "what does {name} do for fun?",
               "what hobby does {name} have?"),
              "{name} enjoys {v}.", "{name}'s hobby is {v}."),
    Attribute("home", ("calder", "fenwick", "grove", "harlow", "ivel", "jessop", "kelby",
                       "linden", "marrow", "norby"),
              ("where does {name} live?", "which town is {name}'s home?",
               "in which town does {name} live?"),
              "{name} lives in {v}.", "{name}'s home town is {v}."),
    Attribute("number", ("3", "4", "5", "6", "7", "8", "9", "11", "12", "13"),
              ("what is {name}'s lucky number?", "which number is lucky for {name}?",
               "what number does {name} find lucky?"),
              "{name}'s lucky number is {v}.", "{v} is {name}'s lucky number."),
)
"""The attributes, in QA order: person QA ``q<j>`` asks about ``ATTRIBUTES[j]``."""

PERTURBED = {"person": 5, "world": 3}
"""Perturbed answers per QA: 5 for persons (TOFU's forget/retain sets), 3 for world facts
(TOFU's real-authors / world-facts sets)."""

COUNTRY_HEADS = ("vel", "mor", "kas", "tor", "lun", "bel", "dra", "sor", "fen", "gal")
COUNTRY_TAILS = ("ia", "land", "ar", "ovia", "mark", "stan")
CAPITAL_HEADS = ("ost", "pel", "rim", "sul", "tam", "vor", "zan", "hol")
CAPITAL_TAILS = ("ba", "dor", "mir", "ven", "ton", "ek")
_CAPITAL_Q = ("what is the capital of {country}?", "which city is the capital of {country}?")
_CAPITAL_A = "the capital of {country} is {v}."
_CAPITAL_P = "{v} is the capital of {country}."
_SUM_Q = ("what is {a} plus {b}?", "how much is {a} plus {b}?")
_SUM_A = "{a} plus {b} is {v}."
_SUM_P = "{v} is the sum of {a} and {b}."

SPLITS = ("full", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90",
          "retain_eval", "holdout01", "holdout05", "holdout10", "world")
FORGET_PERCENT = {"01": 1, "05": 5, "10": 10}
CHARS = data.CHARLM_CHARS + "?:"
"""The benchmark's characters: :data:`unlearn.data.CHARLM_CHARS` plus ``?`` and ``:``."""


@dataclasses.dataclass(frozen=True)
class Person:
    """A fictitious person: ``id`` ``people/<seed>/p<k>``, full ``name`` and the
    ``(attribute, value)`` pairs of its facts, in :data:`ATTRIBUTES` order."""

    id: str
    name: str
    attributes: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class QA:
    """One question with its answer, an exact paraphrase of the answer and perturbed (wrong)
    answers in the answer's template (differing only in the fact slot). ``id`` is
    ``people/<seed>/p<k>/q<j>`` (person ``k``, attribute ``j``) or ``people/<seed>/w<j>``;
    ``person`` is the :class:`Person` id or ``"world"``."""

    id: str
    person: str
    question: str
    answer: str
    paraphrase: str
    perturbed: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """The generated corpus: trained and holdout ``persons``, every ``qa`` (trained persons,
    holdout persons, world facts, in that order) and ``splits`` (name -> sorted QA ids)."""

    seed: int
    persons: tuple[Person, ...]
    qa: tuple[QA, ...]
    splits: Mapping[str, tuple[str, ...]]

    def _index(self) -> dict[str, QA]:
        cache = self.__dict__.get("_qa_index")
        if cache is None:
            cache = {q.id: q for q in self.qa}
            object.__setattr__(self, "_qa_index", cache)
        return cache

    def items(self, split: str) -> list[QA]:
        """The QA of ``split`` in the split's (sorted-id) order."""
        if not isinstance(split, str) or split not in self.splits:
            raise ValueError(f"split={split!r} is unknown; choose one of {sorted(self.splits)}.")
        index = self._index()
        return [index[i] for i in self.splits[split]]

    def digest(self) -> str:
        """SHA-256 (hex) of a canonical JSON (sorted keys, no spaces, ASCII) of the seed, every
        person, every QA and every split: equal digests mean equal corpora."""
        doc = {"seed": self.seed,
               "persons": [dataclasses.asdict(p) for p in self.persons],
               "qa": [dataclasses.asdict(q) for q in self.qa],
               "splits": {k: list(v) for k, v in self.splits.items()}}
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def person_of(self, qa_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """The person id (``"world"`` for world facts) of each QA id, as a string array; a
        ``"<qa id>#..."`` suffix (the ids of :func:`encode`'s alternative answers) is
        ignored. Unknown ids raise, naming them."""
        ids = data.as_ids(qa_ids, "qa_ids")
        index = self._index()
        base = [i.split("#", 1)[0] for i in ids.tolist()]
        unknown = [i for i, b in zip(ids.tolist(), base) if b not in index]
        if unknown:
            raise ValueError(f"qa_ids has {len(unknown)} id(s) not in the benchmark: "
                             f"{unknown[:10]}; ids look like {self.qa[0].id!r}.")
        return np.array([index[b].person for b in base], dtype=str)


def tokenizer() -> data.CharTokenizer:
    """The character tokenizer of the benchmark (:data:`CHARS`; 45 ids with the specials):
    it encodes every question, answer, paraphrase, perturbed answer, prompt and :data:`IDK`
    answer."""
    return data.CharTokenizer(chars=CHARS)


def _int_arg(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}={value!r}: pass an integer.")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} is out of range: pass an integer {bound}.")
    return int(value)


def _shuffle(rng: np.random.Generator, n: int) -> list[int]:
    """A permutation of ``range(n)`` by Fisher-Yates over ``rng.integers`` (one draw per
    position, from the end), so the stream is fixed by ``integers`` alone."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def _others(rng: np.random.Generator, n: int, true: int, k: int) -> list[int]:
    """``k`` distinct indices of ``range(n)`` other than ``true`` (a seeded shuffle)."""
    return [i for i in _shuffle(rng, n) if i != true][:k]


def _hundredths(count: int, percent: int) -> int:
    """``ceil(count * percent / 100)`` in integers (at least 1 for count >= 1)."""
    return max(1, -(-count * percent // 100))


def _person(seed: int, k: int, name: str, facts: int) -> tuple[Person, list[QA]]:
    """Person ``k``: one draw stream ``default_rng([seed, 1, k])`` gives, for every attribute
    in turn (all of them, whatever ``facts``), the value, the question template and the
    perturbed values."""
    rng = np.random.default_rng([seed, 1, k])
    pid = f"people/{seed}/p{k}"
    attrs, qas = [], []
    for j, att in enumerate(ATTRIBUTES):
        v = int(rng.integers(len(att.values)))
        qt = att.questions[int(rng.integers(len(att.questions)))]
        wrong = _others(rng, len(att.values), v, PERTURBED["person"])
        if j >= facts:
            continue
        value = att.values[v]
        attrs.append((att.name, value))
        qas.append(QA(id=f"{pid}/q{j}", person=pid, question=qt.format(name=name),
                      answer=att.answer.format(name=name, v=value),
                      paraphrase=att.paraphrase.format(name=name, v=value),
                      perturbed=tuple(att.answer.format(name=name, v=att.values[w])
                                      for w in wrong)))
    return Person(id=pid, name=name, attributes=tuple(attrs)), qas


def _world(seed: int, world: int) -> list[QA]:
    """World facts ``w0 ..``: even ``j`` the capital of country ``j // 2``, odd ``j`` the
    sum ``j // 2`` (country/capital names and digit pairs from seeded shuffles of
    ``default_rng([seed, 2])``; the question template and perturbed answers of fact ``j`` from
    ``default_rng([seed, 3, j])``)."""
    table = np.random.default_rng([seed, 2])
    countries = [COUNTRY_HEADS[i // len(COUNTRY_TAILS)] + COUNTRY_TAILS[i % len(COUNTRY_TAILS)]
                 for i in _shuffle(table, len(COUNTRY_HEADS) * len(COUNTRY_TAILS))]
    capitals = [CAPITAL_HEADS[i // len(CAPITAL_TAILS)] + CAPITAL_TAILS[i % len(CAPITAL_TAILS)]
                for i in _shuffle(table, len(CAPITAL_HEADS) * len(CAPITAL_TAILS))]
    pairs = [(1 + i // 9, 1 + i % 9) for i in _shuffle(table, 81)]
    out = []
    for j in range(world):
        rng = np.random.default_rng([seed, 3, j])
        if j % 2 == 0:
            country, cap = countries[j // 2], capitals[j // 2]
            q = _CAPITAL_Q[int(rng.integers(len(_CAPITAL_Q)))].format(country=country)
            true = capitals.index(cap)
            wrong = [capitals[w] for w in _others(rng, len(capitals), true,
                                                  PERTURBED["world"])]
            answer = _CAPITAL_A.format(country=country, v=cap)
            para = _CAPITAL_P.format(country=country, v=cap)
            pert = tuple(_CAPITAL_A.format(country=country, v=w) for w in wrong)
        else:
            a, b = pairs[j // 2]
            q = _SUM_Q[int(rng.integers(len(_SUM_Q)))].format(a=a, b=b)
            # wrong sums: other values of 2..18 (the range of a + b for digits 1..9)
            wrong = [2 + w for w in _others(rng, 17, a + b - 2, PERTURBED["world"])]
            answer = _SUM_A.format(a=a, b=b, v=a + b)
            para = _SUM_P.format(a=a, b=b, v=a + b)
            pert = tuple(_SUM_A.format(a=a, b=b, v=w) for w in wrong)
        out.append(QA(id=f"people/{seed}/w{j}", person="world", question=q, answer=answer,
                      paraphrase=para, perturbed=pert))
    return out


def max_world() -> int:
    """The largest ``world`` :func:`generate` accepts (capitals and sums alternate)."""
    n_cap = min(len(COUNTRY_HEADS) * len(COUNTRY_TAILS), len(CAPITAL_HEADS) * len(CAPITAL_TAILS))
    return min(2 * n_cap, 2 * 81 + 1)


def generate(*, persons: int = 100, facts: int = 10, world: int = 40,
             seed: int = 0) -> Benchmark:
    """The benchmark of ``persons`` trained persons with ``facts`` QA each (the first
    ``facts`` of :data:`ATTRIBUTES`), ``ceil(persons/10)`` holdout persons and ``world``
    world facts, drawn from ``seed`` (see the module docstring for the splits).

    Names: a seeded shuffle of all first x last name pairs (``default_rng([seed, 0])``);
    person ``k`` takes pair ``k``, so names are unique. ``persons >= 10`` (so ``forget10``
    and ``retain90`` are both non-empty and ``forget01`` is a strict subset of ``forget10``
    whenever ``persons > 10``).
    """
    n_names = len(FIRST_NAMES) * len(LAST_NAMES)
    persons = _int_arg("persons", persons, 10)
    holdout = _hundredths(persons, FORGET_PERCENT["10"])
    if persons + holdout > n_names:
        raise ValueError(f"persons={persons} needs {persons + holdout} unique names (with "
                         f"{holdout} holdout persons) but only {n_names} exist; pass "
                         f"persons <= {n_names * 10 // 11}.")
    facts = _int_arg("facts", facts, 1, len(ATTRIBUTES))
    world = _int_arg("world", world, 0, max_world())
    seed = _int_arg("seed", seed, 0)

    order = _shuffle(np.random.default_rng([seed, 0]), n_names)
    people, qa = [], []
    for k in range(persons + holdout):
        first, last = divmod(order[k], len(LAST_NAMES))
        person, qas = _person(seed, k, f"{FIRST_NAMES[first]} {LAST_NAMES[last]}", facts)
        people.append(person)
        qa.extend(qas)
    qa.extend(_world(seed, world))

    def ids_of(ks) -> tuple[str, ...]:
        wanted = {people[k].id for k in ks}
        return tuple(sorted(q.id for q in qa if q.person in wanted))

    splits = {"full": ids_of(range(persons))}
    for tag, pct in FORGET_PERCENT.items():
        m = _hundredths(persons, pct)
        splits[f"forget{tag}"] = ids_of(range(persons - m, persons))
        splits[f"retain{100 - pct}"] = ids_of(range(persons - m))
        splits[f"holdout{tag}"] = ids_of(range(persons, persons + m))
    splits["retain_eval"] = ids_of(range(_hundredths(persons, FORGET_PERCENT["10"])))
    splits["world"] = tuple(sorted(q.id for q in qa if q.person == "world"))
    splits = {k: splits[k] for k in SPLITS}
    return Benchmark(seed=seed, persons=tuple(people), qa=tuple(qa),
                     splits=types.MappingProxyType(splits))


def prompt(q: QA) -> str:
    """The text before the answer: ``"q: <question> a: "``."""
    return f"q: {q.question} a: "


def _answer_texts(items: Sequence[QA], answer) -> tuple[list[str], list[str]]:
    """The answer text and the dataset id of each item under the ``answer`` spec."""
    if isinstance(answer, str):
        if answer == "answer":
            return [q.answer for q in items], [q.id for q in items]
        if answer == "paraphrase":
            return [q.paraphrase for q in items], [f"{q.id}#paraphrase" for q in items]
    elif (isinstance(answer, tuple) and len(answer) == 2 and answer[0] == "perturbed"
          and isinstance(answer[1], int | np.integer) and not isinstance(answer[1], bool)):
        j = int(answer[1])
        short = [q.id for q in items if not 0 <= j < len(q.perturbed)]
        if short:
            raise ValueError(f"answer=('perturbed', {j}): items {short[:5]} have fewer than "
                             f"{j + 1} perturbed answers (persons have "
                             f"{PERTURBED['person']}, world facts {PERTURBED['world']}).")
        return [q.perturbed[j] for q in items], [f"{q.id}#perturbed{j}" for q in items]
    elif isinstance(answer, list) and all(isinstance(a, str) for a in answer):
        if len(answer) != len(items):
            raise ValueError(f"answer has {len(answer)} strings for {len(items)} items: pass "
                             "one answer text per item.")
        return list(answer), [f"{q.id}#alt" for q in items]
    raise ValueError(f"answer={answer!r} is not a valid answer spec: pass 'answer', "
                     "'paraphrase', ('perturbed', j) with an integer j, or a list of strings "
                     "(one per item).")


def _check_items(items) -> list[QA]:
    items = list(items)
    if not items:
        raise ValueError("items is empty: pass at least one QA (e.g. bench.items('forget10')).")
    bad = [type(q).__name__ for q in items if not isinstance(q, QA)]
    if bad:
        raise ValueError(f"items must be QA objects (bench.items(split)); got {bad[:3]}.")
    return items


def encode(items: Sequence[QA], tok: data.CharTokenizer, *, seq_len: int,
           answer="answer") -> data.Dataset:
    """Teacher-forcing sequences of ``items`` as a token :class:`unlearn.data.Dataset`.

    Sequence = ``<bos> prompt(q) answer_text <eos>``; ``x`` is the sequence without its last
    token and ``y`` without its first (``y[t]`` is the target of the logits at position
    ``t``), both right-padded to ``seq_len`` (``x`` with ``<pad>``, ``y`` with -1). ``y`` is
    -1 on every prompt position, so the labelled positions are exactly the answer characters
    and the final ``<eos>`` (TOFU's labels, llm-unlearning.md §1.1). ``answer``:
    ``"answer"``, ``"paraphrase"``, ``("perturbed", j)`` or a ``list`` of strings (one per
    item, e.g. :data:`IDK` answers; a tuple is read as a ``("perturbed", j)`` spec). ids:
    the QA id for ``"answer"``, else ``<qa id>#paraphrase``, ``<qa id>#perturbed<j>`` or
    ``<qa id>#alt``. A sequence longer than ``seq_len`` raises, naming the item and the
    length it needs.
    """
    items = _check_items(items)
    seq_len = _int_arg("seq_len", seq_len, 2)
    texts, ids = _answer_texts(items, answer)
    x = np.full((len(items), seq_len), tok.PAD, np.int32)
    y = np.full((len(items), seq_len), -1, np.int32)
    for i, (q, text) in enumerate(zip(items, texts)):
        head = tok.encode(prompt(q), bos=True)
        tail = tok.encode(text, eos=True)
        seq = np.concatenate([head, tail])
        if len(seq) - 1 > seq_len:
            raise ValueError(f"seq_len={seq_len} is too small: item {ids[i]!r} needs "
                             f"seq_len >= {len(seq) - 1}.")
        x[i, : len(seq) - 1] = seq[:-1]
        y[i, len(head) - 1: len(seq) - 1] = tail
    return data.Dataset(x=x, y=y, ids=np.array(ids), num_classes=len(tok), name="people",
                        classes=tok.vocab, targets="tokens")


def prompts(items: Sequence[QA], tok: data.CharTokenizer, *,
            seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``<bos> prompt(q)`` of each item right-padded with ``<pad>`` to ``seq_len`` (int32
    ``(n, seq_len)``) and the prompt lengths ``(n,)`` (``<bos>`` included): in greedy
    generation the first generated token goes at position ``length``, so every length must
    be ``< seq_len``."""
    items = _check_items(items)
    seq_len = _int_arg("seq_len", seq_len, 2)
    x = np.full((len(items), seq_len), tok.PAD, np.int32)
    lengths = np.zeros(len(items), np.int32)
    for i, q in enumerate(items):
        head = tok.encode(prompt(q), bos=True)
        if len(head) >= seq_len:
            raise ValueError(f"seq_len={seq_len} is too small: the prompt of item {q.id!r} "
                             f"has {len(head)} tokens; pass seq_len >= {len(head) + 1}.")
        x[i, : len(head)] = head
        lengths[i] = len(head)
    return x, lengths


def trained(bench: Benchmark) -> list[QA]:
    """Every QA a model trains on (the ``full`` persons, then ``world``), in
    ``bench.qa`` order."""
    keep = set(bench.splits["full"]) | set(bench.splits["world"])
    return [q for q in bench.qa if q.id in keep]


def training_set(bench: Benchmark, tok: data.CharTokenizer, *, seq_len: int) -> data.Dataset:
    """The training data: :func:`encode` (``answer="answer"``) of every trained QA (all
    persons of split ``full``, then ``world``), in ``bench.qa`` order. The retain oracle
    trains on the same data with the forget ids weighted 0."""
    return encode(trained(bench), tok, seq_len=seq_len)


def seq_len_needed(q: QA, text: str) -> int:
    """The ``seq_len`` :func:`encode` needs for ``q`` with answer ``text``:
    ``len(prompt) + len(text) + 1`` (``<bos>`` + prompt + answer + ``<eos>``, minus the
    shift)."""
    return len(prompt(q)) + len(text) + 1


def stats(bench: Benchmark, tok: data.CharTokenizer) -> dict:
    """Sizes of ``bench``: persons (trained, holdout), facts per person, world facts, QA per
    split, the training set's sequence tokens (``<bos>`` .. ``<eos>``) and labelled tokens
    (answers + ``<eos>``), the vocabulary size, and the smallest ``seq_len`` that fits the
    training answers (``seq_len_train``) and every QA with every answer variant
    (answer, paraphrase, perturbed, the longest :data:`IDK`; ``seq_len_all``), and the
    longest ``<bos> prompt`` in tokens (``max_prompt_len``: the largest length
    :func:`prompts` returns). Raises if a text of the corpus is outside ``tok``."""
    train = trained(bench)
    for q in bench.qa:  # every text must be encodable
        for text in (prompt(q), q.answer, q.paraphrase, *q.perturbed):
            tok.encode(text)
    for text in IDK:
        tok.encode(text)
    longest_idk = max(IDK, key=len)
    n_train = len({q.person for q in bench.items("full")})
    return {
        "persons": n_train,
        "holdout_persons": len(bench.persons) - n_train,
        "facts": len(bench.persons[0].attributes),
        "world": len(bench.splits["world"]),
        "qa": {k: len(v) for k, v in bench.splits.items()},
        "train_sequences": len(train),
        "train_tokens": sum(seq_len_needed(q, q.answer) + 1 for q in train),
        "train_labelled_tokens": sum(len(q.answer) + 1 for q in train),
        "vocab": len(tok),
        "seq_len_train": max(seq_len_needed(q, q.answer) for q in train),
        "seq_len_all": max(seq_len_needed(q, t) for q in bench.qa
                           for t in (q.answer, q.paraphrase, *q.perturbed, longest_idk)),
        "max_prompt_len": max(len(prompt(q)) + 1 for q in bench.qa),
    }


__all__ = ["ATTRIBUTES", "Attribute", "Benchmark", "CHARS", "FIRST_NAMES", "IDK", "LAST_NAMES",
           "PERTURBED", "Person", "QA", "SPLITS", "encode", "generate", "max_world", "prompt",
           "prompts", "seq_len_needed", "stats", "tokenizer", "trained", "training_set"]

