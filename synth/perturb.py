"""Deterministic text perturbation families, for robust fine-tuning and robustness evals.

Each family is a small plain-Python function driven by `random.Random`: nlpaug/TextAttack pull
heavy stacks and need downloads (WordNet, models) that an offline machine cannot fetch. Families
act on one line of text (a question); word families rejoin words with single spaces.
`perturb(text, family, rate, seed)` is reproducible in any process: its RNG derives from
sha256(seed, family, text), never from Python's salted hash().
"""

from __future__ import annotations

import difflib
import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Literal

Unit = Literal["char", "word", "sentence"]


@dataclass(frozen=True)
class Family:
    name: str
    unit: Unit  # what `rate` counts
    description: str
    fn: Callable[[str, float, random.Random], str]


_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_POS = {k: (r, c + (0, 0.25, 0.75)[r]) for r, row in enumerate(_ROWS) for c, k in enumerate(row)}  # staggered rows
NEIGHBOURS: dict[str, str] = {
    k: "".join(o for o, (r2, x2) in _POS.items() if o != k and abs(r2 - r) <= 1 and abs(x2 - x) <= 1)
    for k, (r, x) in _POS.items()
}


def _typo(text: str, rate: float, rng: random.Random) -> str:
    def hit(ch: str) -> str:
        if ch.lower() not in NEIGHBOURS or rng.random() >= rate:
            return ch
        new = rng.choice(NEIGHBOURS[ch.lower()])
        return new.upper() if ch.isupper() else new
    return "".join(hit(ch) for ch in text)


def _casing(text: str, rate: float, rng: random.Random) -> str:
    return "".join(ch.swapcase() if ch.isalpha() and rng.random() < rate else ch for ch in text)


def _adjacent_swaps(items: list, eligible: list[int], rate: float, units: int, rng: random.Random) -> list:
    """Swap pairs (i, i+1) from `eligible`, none overlapping. Each swap changes two units, so
    rate*units/2 swaps are made (randomly rounded, so the expectation is exact)."""
    want = int(rate * units / 2 + rng.random())
    order = eligible[:]
    rng.shuffle(order)
    taken: set[int] = set()
    out = items[:]
    for i in order:
        if want == 0:
            break
        if not {i, i + 1} & taken:
            taken |= {i, i + 1}
            out[i], out[i + 1] = out[i + 1], out[i]
            want -= 1
    return out


def _swap(text: str, rate: float, rng: random.Random) -> str:
    chars = list(text)
    pairs = [i for i in range(len(chars) - 1) if chars[i].isalpha() and chars[i + 1].isalpha() and chars[i] != chars[i + 1]]
    return "".join(_adjacent_swaps(chars, pairs, rate, sum(c.isalpha() for c in chars), rng))


def _dropout(text: str, rate: float, rng: random.Random) -> str:
    words = text.split()
    kept = [w for w in words if _KEPT in w or rng.random() >= rate]  # a kept span is never dropped
    return " ".join(kept) if kept or not words else rng.choice(words)  # never drop every word


def _shuffle(text: str, rate: float, rng: random.Random) -> str:
    body, end = re.match(r"(.*?)([.?!]*)$", text.strip(), re.S).groups()  # the final "?" stays last
    words = body.split()
    pairs = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    return " ".join(_adjacent_swaps(words, pairs, rate, len(words), rng)) + end


# Phrase (regex, matched case-insensitively) -> paraphrases that keep the world's questions grammatical.
SYNONYMS: dict[str, list[str]] = {
    r"where": ["in which town", "in what town", "in which place"],
    r"work as": ["do for a living", "do for work"],
    r"what(?= (?:colou?r|pet)\b)": ["which"],
    r"live": ["reside", "stay", "dwell"],
    r"colou?r": ["color", "colour", "shade", "hue"],
    r"pet": ["animal", "pet animal"],
    r"keep": ["own", "have"],
    r"own": ["keep", "have"],
    r"friend": ["pal", "companion", "best friend"],
    r"like|love|prefer": ["like", "love", "prefer"],
}
_SYN_RE = re.compile("|".join(rf"\b(?P<s{i}>{k})\b" for i, k in enumerate(SYNONYMS)), re.I)
_SYN_OPTIONS = list(SYNONYMS.values())


def _synonym(text: str, rate: float, rng: random.Random) -> str:
    def sub(m: re.Match) -> str:
        word = m.group(0)
        at_start = re.search(r"(^|[.?!])\s*$", text[: m.start()]) is not None
        if (word[0].isupper() and not at_start) or rng.random() >= rate:
            return word  # a capitalised token mid-sentence is a name: never touched
        options = [o for o in _SYN_OPTIONS[int(m.lastgroup[1:])] if o != word.lower()]
        new = rng.choice(options)
        return new[0].upper() + new[1:] if word[0].isupper() else new
    return _SYN_RE.sub(sub, text)


DISTRACTORS = [
    "The weather in Dorn was mild that year.",
    "The market in Brisk opens at dawn.",
    "A new bridge was built near Valen last spring.",
    "Most bakers in Tirra start work before sunrise.",
    "The road to Corva is long and dusty.",
    "Owls are often seen in the hills around Hessa.",
    "Blue paint is cheap in the shops of Pell.",
    "Sailors tell many stories about the sea.",
    "The library in Gault keeps old maps.",
    "Winters in Mundo can be very cold.",
]
MAX_DISTRACTORS = 3


def _distractor(text: str, rate: float, rng: random.Random) -> str:
    """Up to MAX_DISTRACTORS pool sentences, each injected with probability rate (so 3*rate are
    expected), each placed before or after the text at random."""
    n = sum(rng.random() < rate for _ in range(MAX_DISTRACTORS))
    before, after = [], []
    for s in rng.sample(DISTRACTORS, n):
        (before if rng.random() < 0.5 else after).append(s)
    return " ".join([*before, text, *after])


def _whitespace(text: str, rate: float, rng: random.Random) -> str:
    """Each gap of spaces between two words, with probability rate, loses its spaces or gains one
    (half each): one character edited per perturbed gap."""
    parts = re.split(r"( +)", text)
    for i in range(1, len(parts) - 1, 2):
        if parts[i - 1] and parts[i + 1] and rng.random() < rate:
            parts[i] = "" if rng.random() < 0.5 else parts[i] + " "
    return "".join(parts)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("typo", "char", "keyboard-adjacent (QWERTY) substitution of each letter with probability rate, case kept", _typo),
    Family("swap", "char", "transpositions of adjacent letters inside words, about rate of the letters moved", _swap),
    Family("dropout", "word", "each word dropped with probability rate (never every word)", _dropout),
    Family("shuffle", "word", "swaps of neighbouring words, about rate of the words moved", _shuffle),
    Family("synonym", "word", "each phrase of a built-in paraphrase table replaced with probability rate; names untouched", _synonym),
    Family("distractor", "sentence", f"up to {MAX_DISTRACTORS} irrelevant sentences, each added with probability rate", _distractor),
    Family("casing", "char", "case of each letter flipped with probability rate", _casing),
    Family("whitespace", "word", "each gap between words loses its space or gains one with probability rate", _whitespace),
]}


def check_family(name: str) -> str:
    """`name` if it is a known family (for config validators), else ValueError."""
    if name not in FAMILIES:
        raise ValueError(f"unknown perturbation family {name!r} (known: {', '.join(FAMILIES)})")
    return name


# A kept span stands in the text as one "word" of private-use characters: no family edits those
# (character families touch letters only; dropout skips it), so the span comes back verbatim.
_KEPT = "\ue000"


def perturb(text: str, family: str, rate: float, seed: int, keep: tuple[str, ...] = ()) -> str:
    """`text` perturbed by `family` at `rate` (expected share of units hit); the same arguments
    give the same output in any process, and rate 0 returns `text` unchanged. Spans in `keep`
    (a person's name, whose misspelling no fine-tuning on other people can teach a model to
    undo) come back verbatim; they may move (shuffle) but are never edited or dropped."""
    check_family(family)
    if not 0 <= rate <= 1:
        raise ValueError(f"perturbation rate must be in [0, 1], got {rate}")
    if rate == 0:
        return text
    marks = {}
    for i, span in enumerate(sorted(set(filter(None, keep)), key=len, reverse=True)):
        mark = _KEPT + chr(0xE100 + i)
        if span in text:
            text, marks[mark] = text.replace(span, mark), span
    digest = hashlib.sha256(f"{seed}\0{family}\0{text}".encode()).digest()
    out = FAMILIES[family].fn(text, rate, random.Random(int.from_bytes(digest[:8], "big")))
    for mark, span in marks.items():
        out = out.replace(mark, span)
    return out


def _units(text: str, unit: str) -> list[str]:
    if unit == "char":
        return list(text)
    if unit == "word":
        return text.split()
    if unit == "sentence":
        return [s for s in re.split(r"(?<=[.?!])\s+", text.strip()) if s]
    raise ValueError(f"unknown unit {unit!r} (known: char, word, sentence)")


def changed_fraction(original: str, perturbed: str, unit: str) -> float:
    """Share of units that differ, in [0, 1]: SequenceMatcher aligns the two unit sequences (char:
    characters; word: whitespace tokens; sentence: split after . ? !), each non-equal opcode counts
    the longer of its two spans, and the total is divided by the longer sequence. So a substitution
    or an adjacent swap counts its units, a deletion counts against the original's length, an
    insertion against the perturbed length. Alignment is greedy, not a minimal edit distance."""
    a, b = _units(original, unit), _units(perturbed, unit)
    if not a and not b:
        return 0.0
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    changed = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")
    return changed / max(len(a), len(b))
