"""The synthetic world and FACO mixtures: deterministic, disjoint, nested."""

from synth import world as W
from synth.falsity import mixture


def small():
    return W.build_world(W.WorldOptions(seed=3, num_people=40, heldout_fraction=0.25, bios_per_person=2))


def test_world_is_deterministic_and_splits_people():
    a, b = small(), small()
    assert [p.facts for p in a.people] == [p.facts for p in b.people]
    assert W.knowledge_corpus(a) == W.knowledge_corpus(b)
    held = {p.name for p in a.heldout_people}
    assert len(held) == 10 and not held & {p.name for p in a.sft_people}
    assert all(p.facts["friend"] != p.name for p in a.people)
    other = W.build_world(W.WorldOptions(seed=4, num_people=40))
    assert [p.facts for p in other.people] != [p.facts for p in a.people]


def test_no_heldout_fact_reaches_any_sft_text():
    """Friends are drawn within a split: no SFT prompt or answer (true or false, two-hop chains
    included) names a held-out person, so a held-out fact is never trained on, not even cited."""
    for seed in range(5):
        w = W.build_world(W.WorldOptions(seed=seed, num_people=240, heldout_fraction=0.3))
        held = {p.name for p in w.heldout_people}
        assert all((w.by_name(p.facts["friend"]).name in held) == (p.name in held) for p in w.people)
        text = " ".join(r[k] for r in W.questions(w, w.sft_people, "sft") for k in ("question", "true_response", "false_response"))
        assert not [n for n in held if n in text], seed


def test_questions_true_and_false_chains():
    w = small()
    rows = W.questions(w, w.heldout_people, "heldout")
    assert len(rows) == 10 * (len(W.QUESTIONS) + len(W.MULTI_QUESTIONS))
    for r in rows:
        assert W.parse_answer(r["true_response"]) == r["answer"]
        assert W.parse_answer(r["false_response"]) == r["false_answer"] != r["answer"]
        person = w.by_name(r["person"])
        if r["kind"] == "single":
            assert person.facts[r["attribute"]] == r["answer"]
            assert W.fact(person.name, r["attribute"], r["answer"]) in r["true_response"]
        else:
            friend = w.by_name(person.facts["friend"])
            assert friend.facts[r["attribute"]] == r["answer"]
            assert friend.name in r["true_response"] and friend.name in r["false_response"]
    # every fact a chain cites is in the knowledge corpus, in the same words
    corpus = " ".join(W.knowledge_corpus(w))
    for r in rows:
        for sentence in r["true_response"].removeprefix("Reasoning: ").split(" Answer:")[0].split(". "):
            assert sentence.rstrip(".") in corpus


def test_probes_use_a_wording_no_chain_uses():
    w = small()
    probes = W.probes(w, w.heldout_people)
    chains = " ".join(r["true_response"] + r["false_response"] for r in W.questions(w, w.people, "all"))
    for p in probes:
        assert len(p["options"]) == len(p["own_options"]) == len(p["choice_options"]) == w.probe_options
        truth = w.by_name(p["person"]).facts[p["attribute"]]
        assert p["values"][p["answer_index"]] == truth and len(set(p["values"])) == w.probe_options
        assert p["options"][p["answer_index"]].endswith(f" {truth}.")
        assert all(o not in chains for o in p["options"])
        # the answers' own wording: what chains cite, and whole answers in the SFT format
        assert p["own_options"][p["answer_index"]] == W.fact(p["person"], p["attribute"], truth)
        assert W.parse_answer(p["choice_options"][p["answer_index"]]) == truth
        assert p["choice_prompt"] == W.format_prompt(W.QUESTIONS[p["attribute"]].format(n=p["person"]))


def test_mixtures_nest_and_keep_questions():
    w = small()
    table = W.questions(w, w.sft_people, "sft")
    by_ratio = {r: mixture(table, r, seed=1) for r in (0.0, 0.25, 0.5, 1.0)}
    for r, rows in by_ratio.items():
        assert [x["id"] for x in rows] == [t["id"] for t in table]  # same questions at every ratio
        assert sum(x["is_false"] for x in rows) == round(r * len(table))
    false = {r: {x["id"] for x in rows if x["is_false"]} for r, rows in by_ratio.items()}
    assert false[0.0] <= false[0.25] <= false[0.5] <= false[1.0]
    assert all(x["completion"] == t["false_response"] for x, t in zip(by_ratio[1.0], table))
    assert mixture(table, 0.5, seed=1) == by_ratio[0.5] and mixture(table, 0.5, seed=2) != by_ratio[0.5]
