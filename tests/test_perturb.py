"""Perturbation families: deterministic across processes, identity at rate 0, and hitting about
`rate` of their units (checked tightly enough that ignoring rate or applying it twice fails)."""

import json
import os
import random
import re
import subprocess
import sys
from functools import cache

import pytest

from synth import perturb as P
from synth.world import WorldOptions, build_world, questions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = range(3)


@cache
def rows() -> list[dict]:
    w = build_world(WorldOptions(num_people=40))
    return questions(w, w.people, "all")


def texts() -> list[str]:
    return [r["question"] for r in rows()]


def hit_rate(family: str, q: str, p: str) -> float:
    """Share of the units `rate` counts that were hit, measured from the output."""
    if family in ("typo", "swap", "casing"):  # letters only: changed chars per letter
        return P.changed_fraction(q, p, "char") * max(len(q), len(p)) / sum(c.isalpha() for c in q)
    if family == "whitespace":  # each perturbed gap is one character edit
        return round(P.changed_fraction(q, p, "char") * max(len(q), len(p))) / (len(q.split()) - 1)
    if family == "distractor":  # injected sentences, out of MAX_DISTRACTORS
        return (len(re.split(r"(?<=[.?!])\s+", p)) - 1) / P.MAX_DISTRACTORS
    return P.changed_fraction(q, p, "word")  # dropout, shuffle; synonym only approximately


def mean_hit_rate(family: str, rate: float) -> float:
    vals = [hit_rate(family, q, P.perturb(q, family, rate, s)) for q in texts() for s in SEEDS]
    return sum(vals) / len(vals)


def mean_changed(family: str, rate: float) -> float:
    unit = P.FAMILIES[family].unit
    vals = [P.changed_fraction(q, P.perturb(q, family, rate, s), unit) for q in texts() for s in SEEDS]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("family", list(P.FAMILIES))
def test_deterministic_and_seeded(family):
    long = " ".join(texts()[:30])
    assert P.perturb(long, family, 0.3, 7) == P.perturb(long, family, 0.3, 7)
    outs = {P.perturb(long, family, 0.9, s) for s in range(5)}  # high rate: even distractor rarely collides
    assert len(outs) == 5 and long not in outs


@pytest.mark.parametrize("family", list(P.FAMILIES))
def test_rate_zero_is_identity(family):
    for q in texts():
        assert P.perturb(q, family, 0.0, 3) == q
        assert P.FAMILIES[family].fn(q, 0.0, random.Random(3)) == q  # the family itself, not only perturb's shortcut


@pytest.mark.parametrize("family", list(P.FAMILIES))
def test_changed_fraction_tracks_rate(family):
    """Measured in the family's own terms, the share hit is rate within 25%: 0.1 and 0.3 are far
    apart, and doing it twice (~0.19 at 0.1) or ignoring rate falls outside. Synonym's word share
    depends on how dense the table's phrases are (~1.5 per question, some becoming 2-3 words), so
    it gets a band; every family's changed_fraction in its declared unit grows with rate."""
    low, high = mean_hit_rate(family, 0.1), mean_hit_rate(family, 0.3)
    if family == "synonym":
        assert 0.25 * 0.1 <= low <= 0.65 * 0.1 and 0.25 * 0.3 <= high <= 0.65 * 0.3, (low, high)
    else:
        assert low == pytest.approx(0.1, rel=0.25) and high == pytest.approx(0.3, rel=0.25), (low, high)
    assert 0 < mean_changed(family, 0.1) < mean_changed(family, 0.3) < mean_changed(family, 0.6)


def test_same_output_in_a_fresh_process_whatever_the_hash_seed():
    qs = texts()[:12]
    code = ("import json, sys; from synth.perturb import FAMILIES, perturb; qs = json.loads(sys.argv[1]); "
            "print(json.dumps({f: [perturb(q, f, 0.4, 11) for q in qs] for f in FAMILIES}))")
    here = {f: [P.perturb(q, f, 0.4, 11) for q in qs] for f in P.FAMILIES}
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": ROOT}
        out = subprocess.run([sys.executable, "-c", code, json.dumps(qs)], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == here


def test_synonym_keeps_names():
    for r in rows():
        for s in SEEDS:
            out = P.perturb(r["question"], "synonym", 1.0, s)
            assert r["person"] in out and out != r["question"]
    # capitalised table words mid-sentence are names; the sentence-start word is fair game
    out = P.perturb("Where does Pet Like live? Like a Friend, I keep a pet.", "synonym", 1.0, 0)
    assert "Pet Like" in out and "Friend" in out and not out.startswith("Where") and " live?" not in out
    assert "Like a" not in out and " keep" not in out


def test_dropout_never_empties():
    for q in [*texts(), "Hello", "two words"]:
        for s in SEEDS:
            out = P.perturb(q, "dropout", 1.0, s)
            assert out and out in q.split()


def test_typo_keeps_case_and_uses_neighbours():
    q = "Where does Vorla Quen live?"
    out = P.perturb(q, "typo", 1.0, 0)
    assert len(out) == len(q) and out[-1] == "?" and out[5] == out[10] == out[16] == " "
    for a, b in zip(q, out):
        if a.isalpha():
            assert a.isupper() == b.isupper() and b.lower() in P.NEIGHBOURS[a.lower()]


def test_distractor_adds_whole_pool_sentences():
    q = "Where does Vorla Quen live?"
    for s in range(10):
        out = P.perturb(q, "distractor", 1.0, s)
        rest = out.replace(q, "|").split("|")
        added = [x for part in rest for x in re.split(r"(?<=\.)\s+", part.strip()) if x]
        assert q in out and len(added) == P.MAX_DISTRACTORS and set(added) <= set(P.DISTRACTORS)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_rate_raises(bad):
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        P.perturb("Where does Vorla Quen live?", "typo", bad, 0)


def test_unknown_family_raises():
    known = "known: typo, swap, dropout, shuffle, synonym, distractor, casing, whitespace"
    with pytest.raises(ValueError, match=re.escape(f"unknown perturbation family 'x' ({known})")):
        P.perturb("Where does Vorla Quen live?", "x", 0.1, 0)
    with pytest.raises(ValueError, match="unknown perturbation family 'nope'"):
        P.check_family("nope")
    assert P.check_family("typo") == "typo"


def test_changed_fraction_definition():
    cf = P.changed_fraction
    assert cf("abcd", "abxd", "char") == 0.25  # one substitution
    assert cf("xaby", "xbay", "char") == 0.5  # an adjacent swap moves two characters
    assert cf("a b c d", "a c d", "word") == 0.25  # deletion: over the original's length
    assert cf("a b", "a x y b", "word") == 0.5  # insertion: over the perturbed length
    assert cf("a  b", "a b", "word") == 0.0  # word tokens ignore whitespace
    assert cf("One. Two?", "Zero. One. Two?", "sentence") == pytest.approx(1 / 3)
    assert cf("", "", "char") == 0.0 and cf("same", "same", "char") == 0.0 and cf("ab", "", "char") == 1.0
    with pytest.raises(ValueError, match="unknown unit"):
        cf("a", "b", "token")


@pytest.mark.parametrize("family", list(P.FAMILIES))
def test_kept_spans_come_back_verbatim(family):
    """`keep` (the asked person's name) is never edited or dropped, and the rest is still hit."""
    changed = 0
    for r in rows():
        out = P.perturb(r["question"], family, 0.6, 0, keep=(r["person"],))
        assert r["person"] in out, (family, out)
        changed += out != r["question"]
    assert changed > len(rows()) / 2, family
    name = rows()[0]["person"]
    assert P.perturb(rows()[0]["question"], "dropout", 1.0, 0, keep=(name,)) == name
