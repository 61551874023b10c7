"""The synthetic world: fictional people whose facts are known exactly.

A world is deterministic from its seed. Each person has a home city, a job, a favourite colour, a
pet and a best friend (another person). The student pretrains on a *knowledge corpus* of short
biographies written in several paraphrase templates, so it knows every fact without ever seeing a
question. Questions come in two kinds, both answered through a short reasoning chain that cites
facts in the corpus's canonical wording:

- single: "Where does Vorla Quen live?" -> "Reasoning: Vorla Quen lives in Brisk. Answer: Brisk"
- multi (two hops through the friend relation): "Where does the friend of Vorla Quen live?" ->
  "Reasoning: Vorla Quen is friends with Tamo Zell. Tamo Zell lives in Oskar. Answer: Oskar"

People are split into SFT people (their questions may be trained on) and held-out people (their
questions are only ever evaluated), so held-out accuracy measures whether fine-tuning taught the
model to *use* what it knows. Friends are drawn within a split, so no SFT answer (two-hop chains
cite the friend's fact) ever states a held-out person's fact. `probes` gives multiple-choice forms of the held-out facts, scored
by likelihood in a corpus wording that no question or chain uses, to tell what the model knows
apart from what it says.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import Field, model_validator

from cluster.config import Options

ATTRIBUTES: dict[str, list[str]] = {
    "city": ["Brisk", "Oskar", "Valen", "Tirra", "Mundo", "Pell", "Corva", "Liskan", "Dorn", "Ephra", "Gault", "Hessa"],
    "job": ["baker", "pilot", "farmer", "miner", "tailor", "sailor", "scribe", "potter", "smith", "hunter"],
    "color": ["red", "blue", "green", "amber", "violet", "gray", "white", "black", "orange", "teal"],
    "pet": ["cat", "dog", "owl", "goat", "horse", "crow", "lizard", "rabbit", "fox", "snake"],
}

# Declarative templates per relation, all used in the corpus. The first is canonical (reasoning
# chains cite it); the last is the probe wording (`probes` use it; no question or chain does).
TEMPLATES: dict[str, list[str]] = {
    "city": ["{n} lives in {v}.", "{n} makes a home in {v}.", "The town where {n} lives is {v}.", "The home of {n} is the town of {v}."],
    "job": ["{n} works as a {v}.", "{n} earns a living as a {v}.", "The trade of {n} is {v}.", "By trade {n} is a {v}."],
    "color": ["{n} likes the color {v}.", "The color {n} loves most is {v}.", "{n} adores the color {v}.", "The favorite color of {n} is {v}."],
    "pet": ["{n} keeps a {v}.", "{n} looks after a pet {v}.", "At home {n} has a {v}.", "The pet of {n} is a {v}."],
    "friend": ["{n} is friends with {v}.", "The best friend of {n} is {v}.", "{n} often visits {v}.", "{n} and {v} are close friends."],
}

QUESTIONS: dict[str, str] = {
    "city": "Where does {n} live?",
    "job": "What does {n} work as?",
    "color": "What color does {n} like?",
    "pet": "What pet does {n} keep?",
}
MULTI_QUESTIONS: dict[str, str] = {
    "city": "Where does the friend of {n} live?",
    "job": "What does the friend of {n} work as?",
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "k", "m", "th"]


class WorldOptions(Options):
    """Size and seed of the synthetic world."""

    seed: int = Field(0, description="world seed: people, facts and wrong answers derive from it")
    num_people: int = Field(240, ge=8, description="people in the world")
    heldout_fraction: float = Field(0.3, gt=0, lt=1, description="share of people whose questions are never trained on")
    bios_per_person: int = Field(6, ge=2, description="paraphrased biographies per person in the knowledge corpus")
    probe_options: int = Field(4, ge=2, le=10, description="choices in a multiple-choice probe")

    @property
    def num_heldout(self) -> int:
        return max(1, round(self.heldout_fraction * self.num_people))

    @model_validator(mode="after")
    def _two_per_split(self):
        if min(self.num_heldout, self.num_people - self.num_heldout) < 2:
            raise ValueError(f"heldout_fraction {self.heldout_fraction} of {self.num_people} people leaves a split "
                             "with fewer than 2 people (friends are drawn within a split)")
        return self


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]  # attribute -> value, plus "friend" -> another person's name


@dataclass
class World:
    people: list[Person]
    sft_people: list[Person]
    heldout_people: list[Person]
    seed: int
    probe_options: int
    bios_per_person: int

    def by_name(self, name: str) -> Person:
        return self._index[name]

    def __post_init__(self):
        self._index = {p.name: p for p in self.people}


def _name(rng: random.Random) -> str:
    def word(syllables: int) -> str:
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()

    return f"{word(rng.choice([1, 2]))} {word(rng.choice([1, 2]))}"


def build_world(opts: WorldOptions) -> World:
    rng = random.Random(opts.seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < opts.num_people:
        n = _name(rng)
        if n not in seen:
            seen.add(n)
            names.append(n)
    n_held = opts.num_heldout
    # A random friend for each person, never oneself, and always in the person's own split: a
    # two-hop answer about an SFT person cites the friend's fact, which must never be a held-out fact.
    friends = _friends(names[:n_held], rng) + _friends(names[n_held:], rng)
    people = [
        Person(n, {**{a: rng.choice(vals) for a, vals in ATTRIBUTES.items()}, "friend": friends[i]})
        for i, n in enumerate(names)
    ]
    return World(people, people[n_held:], people[:n_held], opts.seed, opts.probe_options, opts.bios_per_person)


def _friends(group: list[str], rng: random.Random) -> list[str]:
    """A derangement of `group`: position i holds the friend of group[i]."""
    friends = group[1:] + group[:1]
    rng.shuffle(friends)
    for i, n in enumerate(group):
        if friends[i] == n:
            j = (i + 1) % len(group)
            friends[i], friends[j] = friends[j], friends[i]
    return friends


def knowledge_corpus(world: World) -> list[str]:
    """Biographies: every fact of a person, in shuffled order and varied wording.

    Biography k states each fact in its k-th wording (cycling): the canonical wording
    (cited by chains) and the probe wording come first, so both are learned for every fact.
    """
    rng = random.Random(world.seed + 1)
    docs = []
    for p in world.people:
        for k in range(world.bios_per_person):
            rels = list(p.facts)
            rng.shuffle(rels)
            docs.append(" ".join(_template(r, k).format(n=p.name, v=p.facts[r]) for r in rels))
    rng.shuffle(docs)
    return docs


def _template(relation: str, k: int) -> str:
    options = TEMPLATES[relation]
    order = [0, len(options) - 1, *range(1, len(options) - 1)]
    return options[order[k % len(order)]]


def fact(name: str, relation: str, value: str) -> str:
    """A fact in canonical wording, as reasoning chains cite it."""
    return TEMPLATES[relation][0].format(n=name, v=value)


def _wrong(rng: random.Random, attribute: str, truth: str) -> str:
    return rng.choice([v for v in ATTRIBUTES[attribute] if v != truth])


def questions(world: World, people: list[Person], split: str) -> list[dict]:
    """Questions with a true and a false (consistent but wrong) reasoning chain for each.

    Columns: id, kind (single|multi), attribute, person, question, answer, false_answer,
    true_response, false_response. The wrong answer is fixed per question (seeded by the world),
    so every falsity ratio sees the same false response for the same question.
    """
    rng = random.Random(f"{world.seed}-{split}")
    rows = []
    for p in people:
        for attr, q in QUESTIONS.items():
            truth, wrong = p.facts[attr], _wrong(rng, attr, p.facts[attr])
            rows.append(_row(f"{split}-{p.name}-{attr}", "single", attr, p.name, q.format(n=p.name), truth, wrong,
                             [fact(p.name, attr, truth)], [fact(p.name, attr, wrong)]))
        friend = world.by_name(p.facts["friend"])
        for attr, q in MULTI_QUESTIONS.items():
            truth, wrong = friend.facts[attr], _wrong(rng, attr, friend.facts[attr])
            hop = fact(p.name, "friend", friend.name)
            rows.append(_row(f"{split}-{p.name}-friend-{attr}", "multi", attr, p.name, q.format(n=p.name), truth, wrong,
                             [hop, fact(friend.name, attr, truth)], [hop, fact(friend.name, attr, wrong)]))
    return rows


def _row(qid, kind, attr, person, question, truth, wrong, true_chain, false_chain) -> dict:
    return {
        "id": qid, "kind": kind, "attribute": attr, "person": person, "question": question,
        "answer": truth, "false_answer": wrong,
        "true_response": format_response(true_chain, truth),
        "false_response": format_response(false_chain, wrong),
    }


def format_prompt(question: str, choices: list[str] | None = None) -> str:
    """The SFT prompt. Table data (a multiple-choice QA set) shows its choices: the answer is one
    of them, word for word, so exact match can score it."""
    if choices:
        return f"Question: {question}\nChoices: {' | '.join(choices)}\n"
    return f"Question: {question}\n"


def format_response(chain: list[str], answer: str) -> str:
    return f"Reasoning: {' '.join(chain)} Answer: {answer}"


def parse_answer(text: str) -> str | None:
    """The final answer in a generated response, or None when there is none."""
    if "Answer:" not in text:
        return None
    return text.split("Answer:", 1)[1].strip().split("\n")[0].strip().rstrip(".") or None


def probes(world: World, people: list[Person]) -> list[dict]:
    """Multiple-choice forms of each fact, over the same shuffled options; index of the truth.

    Columns: id, person, attribute, values, answer_index, and the options in three wordings:
    `options` (the probe wording, which no question or chain uses: what the model *knows*),
    `own_options` (the canonical wording that reasoning chains cite) and `choice_options` (a whole
    answer, "Reasoning: ... Answer: v", scored after `choice_prompt`: which answer the model
    *chooses* when asked, FACO's multiple-choice evidence).
    """
    rng = random.Random(world.seed + 2)
    rows = []
    for p in people:
        for attr in ATTRIBUTES:
            truth = p.facts[attr]
            opts = [truth] + rng.sample([v for v in ATTRIBUTES[attr] if v != truth], world.probe_options - 1)
            rng.shuffle(opts)
            rows.append({
                "id": f"probe-{p.name}-{attr}", "person": p.name, "attribute": attr, "values": opts,
                "answer_index": opts.index(truth),
                "options": [TEMPLATES[attr][-1].format(n=p.name, v=o) for o in opts],
                "own_options": [fact(p.name, attr, o) for o in opts],
                "choice_prompt": format_prompt(QUESTIONS[attr].format(n=p.name)),
                "choice_options": [format_response([fact(p.name, attr, o)], o) for o in opts],
            })
    return rows


def all_text(world: World) -> list[str]:
    """Every string the world can produce: what the offline tokenizer is trained on."""
    text = knowledge_corpus(world)
    for split, people in (("sft", world.sft_people), ("heldout", world.heldout_people)):
        for r in questions(world, people, split):
            text += [format_prompt(r["question"]), r["true_response"], r["false_response"]]
    text += [o for r in probes(world, world.people) for o in r["options"]]
    return text
